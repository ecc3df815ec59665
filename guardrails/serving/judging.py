"""The text a cascade's judge reads, from the token rows a guarded call has (generation or a scan).

An input rule's judge reads the prompt turns the policy's ``input_roles`` name (the tokens input rules
score), decoded without special tokens; an output rule's judge reads the generated text (or the scanned
response) up to and including the token whose score escalated. Generation and scans build the same
text from the same tokens, so their verdicts agree. See :mod:`guardrails.core.cascade`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any

from torch import Tensor

from guardrails.serving.prompts import tokenizer_lock

TextSource = Callable[[int, str, int], str]


def text_source(
    tokenizer: Any, rows: Callable[[int], Sequence[int]], n_prompt: Sequence[int],
    roles: Callable[[int], Sequence[int] | None], input_roles: Collection[int],
    inputs: Callable[[int], str | None] | None = None,
) -> TextSource:
    """``source(row, scope, position)``: the judge's text. ``rows(b)`` gives row ``b``'s token ids indexed by
    absolute position (no padding); ``roles(b)`` the role code of each prompt token (None: all the user's);
    ``inputs(b)`` the prompt's input-role contents (:func:`guardrails.core.cascade.judge_input_text`), else
    the input-role tokens are decoded (template framing included)."""

    def source(b: int, scope: str, pos: int) -> str:
        if scope != "output" and inputs is not None and (given := inputs(b)) is not None:
            return given
        ids = list(rows(b))
        if scope == "output":
            picked = ids[n_prompt[b] : pos + 1]
        else:
            codes = roles(b)
            prompt = ids[: n_prompt[b]]
            picked = prompt if codes is None else [t for t, c in zip(prompt, codes, strict=False) if c in input_roles]
        with tokenizer_lock(tokenizer):
            return str(tokenizer.decode(picked, skip_special_tokens=True)).strip()

    return source


def decode_text_source(guard: Any, run: Any, ids: Tensor, mask: Tensor, prompts: Sequence[str]) -> TextSource:
    """The source for the decode loop's rows (``ids``/``mask``: ``[B, T]``, left-padded, the token being scored
    last; ``prompts``: the formatted prompts); rows are read only when a judge is asked."""
    return text_source(guard.tokenizer, lambda b: ids[b][mask[b].bool()].tolist(), run.prompt_lengths,
                       lambda b: run.prompt_roles[b] if run.prompt_roles else None, run.input_roles,
                       lambda b: guard._judge_inputs.get(prompts[b]))


def escalates(policy: Any) -> bool:
    """Whether any rule of ``policy`` has a cascade (``escalate_above``)."""
    return any(r.escalate_above is not None for r in policy.rules)


__all__ = ["TextSource", "decode_text_source", "escalates", "text_source"]
