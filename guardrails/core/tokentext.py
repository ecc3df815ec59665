"""Display text of single tokens.

A byte-level BPE tokenizer (GPT-2's, SmolLM2's, Qwen's) splits a character outside ASCII (an accent, an emoji, CJK)
over several tokens; decoded one at a time, each shows U+FFFD. :func:`token_pieces` decodes such a run together: the
whole character goes to the run's first token and the others show nothing, so the pieces still join into the text
(the audit report's per-token view, discover's token-in-context examples).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")
REPLACEMENT = "\ufffd"
MAX_RUN = 4  # a UTF-8 character is at most 4 bytes, so at most 4 byte-level tokens


def token_pieces(items: Sequence[T], decode: Callable[[Sequence[T]], str]) -> list[str]:
    """Per item (a token id or token string), its display text: ``decode([item])``, except that a run of items
    whose single decodes hold U+FFFD and whose joint decode is whole gives the joint text to its first item and ""
    to the rest. A run that never decodes whole (text that really holds U+FFFD) keeps its single decodes."""
    out: list[str] = []
    i = 0
    while i < len(items):
        single = decode(items[i : i + 1])
        if REPLACEMENT not in single:
            out.append(single)
            i += 1
            continue
        for n in range(2, min(MAX_RUN, len(items) - i) + 1):
            joined = decode(items[i : i + n])
            if REPLACEMENT not in joined:
                out += [joined] + [""] * (n - 1)
                i += n
                break
        else:
            out.append(single)
            i += 1
    return out
