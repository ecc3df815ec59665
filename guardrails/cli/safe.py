"""Printing user-controlled text (prompts, outputs, tokens, rule ids, file names, error messages) safely.

Three hazards, one rule each:

- **rich markup**: ``[/]`` or ``[link=...]`` in a prompt must not be parsed (it raised ``MarkupError``
  and hid the whole audit listing). Table cells are :class:`rich.text.Text` objects (:func:`cell`), and
  text embedded in a markup string goes through :func:`markup`.
- **terminal control**: ESC, other C0/C1 controls, DEL, bidi overrides (U+202E...), line and paragraph
  separators and lone surrogates are shown as escapes (``\\x1b``, ``\\u202e``): nothing user-controlled
  moves the cursor, recolours the terminal, rewrites earlier lines or reorders what the operator reads.
- **JSON**: :func:`dumps` escapes the same characters as ``\\uXXXX`` (still valid JSON that loads back to
  the same strings), so ``--json`` output piped to a terminal is safe too and never fails to encode.
"""

from __future__ import annotations

import json
import re
from typing import Any

from rich.markup import escape as _rich_escape
from rich.text import Text

# C0 (but tab/newline handled by the caller's choice), DEL, C1, bidi embeddings/overrides/isolates,
# marks, line/paragraph separators, BOM/zero-width no-break, interlinear annotations, surrogates
_UNSAFE = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ufeff\ufff9-\ufffb\ud800-\udfff]"
)
_UNSAFE_WITH_LINES = re.compile(_UNSAFE.pattern[:-1] + "\t\n]")


def _escape_char(m: re.Match[str]) -> str:
    c = m.group(0)
    o = ord(c)
    if c == "\n":
        return "\\n"
    if c == "\t":
        return "\\t"
    return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}"


def visible(text: Any, *, keep_newlines: bool = False) -> str:
    """``text`` with every control/bidi character shown as an escape; newlines and tabs kept if asked."""
    s = "" if text is None else str(text)
    pattern = _UNSAFE if keep_newlines else _UNSAFE_WITH_LINES
    return pattern.sub(_escape_char, s)


def markup(text: Any, *, keep_newlines: bool = True) -> str:
    """User text to embed in a rich markup string: controls escaped (newlines kept), then markup escaped."""
    return _rich_escape(visible(text, keep_newlines=keep_newlines))


def cell(text: Any, *, keep_newlines: bool = False) -> Text:
    """A table cell that rich never parses as markup."""
    return Text(visible(text, keep_newlines=keep_newlines))


def _json_escape(m: re.Match[str]) -> str:
    return f"\\u{ord(m.group(0)):04x}"


def dumps(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` (``ensure_ascii=False``) with control/bidi characters and lone surrogates escaped."""
    kwargs.setdefault("ensure_ascii", False)
    text = json.dumps(obj, **kwargs)
    # raw control characters can only occur inside JSON strings, where \\uXXXX means the same character
    return _UNSAFE.sub(_json_escape, text)


__all__ = ["cell", "dumps", "markup", "visible"]
