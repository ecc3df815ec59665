"""Which turn each prompt token is in (system, user, assistant, tool), from the chat template. Torch-free.

Input rules score the turns a policy's ``input_roles`` name (default user and tool), so a system prompt
saying "never explain how to build bombs" does not block "What is 2+2?". A turn covers its header and
content up to the end of its content; what follows the last content (end marker, generation prompt)
belongs to the last turn. A default system prompt that the template inserts on its own is the system's.
The torch path (Hugging Face tokenizers) and the ONNX path (``tokenizers`` + jinja) share these functions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from guardrails.core.semantics import ROLE_CODES

logger = logging.getLogger(__name__)

Span = tuple[int, int, str]
"""``(start, end, role)``: a character range of the rendered prompt and the turn it belongs to."""
Render = Callable[[list[dict[str, str]]], str]
"""Renders messages with the chat template (no generation prompt)."""

_SENTINEL = "\u2063GUARDRAILS_ROLE_SENTINEL\u2063"
_PREFIX: dict[str, str] = {}


def role_spans(render: Render, messages: Sequence[dict[str, str]], text: str, template: str = "") -> list[Span]:
    """Character spans of ``text`` (``messages`` rendered by the chat template) by turn."""
    spans: list[Span] = []
    prefix = default_system_prefix(render, template)
    start = len(prefix) if prefix and text.startswith(prefix) else 0
    if start:
        spans.append((0, start, "system"))
    cursor = start
    for m in messages:
        content = m["content"]
        at = text.find(content, cursor) if content else -1
        end = at + len(content) if at >= 0 else cursor
        spans.append((cursor, end, m["role"]))
        cursor = end
    if spans and cursor < len(text):
        s, _, role = spans[-1]
        spans[-1] = (s, len(text), role)
    return spans


def roles_from_offsets(offsets: Sequence[tuple[int, int]], spans: Sequence[Span] | None) -> list[int]:
    """Role code (``ROLE_CODES``) of each token from its character offsets; no spans: every token is the user's."""
    if not spans:
        return [ROLE_CODES["user"]] * len(offsets)
    return [ROLE_CODES[next((r for s, e, r in spans if s <= a < e), spans[-1][2])] for a, _ in offsets]


def token_roles(tokenizer: Any, text: str, spans: Sequence[Span] | None) -> list[int]:
    """Role codes of the tokens of ``text`` as a Hugging Face tokenizer splits it (no special tokens added)."""
    if spans:
        try:
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            return roles_from_offsets(enc["offset_mapping"], spans)
        except (NotImplementedError, TypeError, ValueError, KeyError):  # slow tokenizers have no offsets
            logger.debug("tokenizer gives no offsets: every prompt token counts as the user's")
    return [ROLE_CODES["user"]] * len(tokenizer(text, add_special_tokens=False)["input_ids"])


def hf_render(tokenizer: Any) -> Render:
    """A :data:`Render` over a Hugging Face tokenizer's chat template."""
    return lambda messages: str(tokenizer.apply_chat_template(messages, tokenize=False))


def default_system_prefix(render: Render, template: str = "") -> str:
    """The system turn a template inserts when the messages have none ("" if it inserts none).

    Rendered once per template: one user turn alone vs after an explicit system turn; the text before
    the user's content, less the user header both share, is the inserted system turn.
    """
    if template and template in _PREFIX:
        return _PREFIX[template]
    try:
        implicit = render([{"role": "user", "content": _SENTINEL}])
        explicit = render([{"role": "system", "content": "S" + _SENTINEL}, {"role": "user", "content": _SENTINEL}])
    except Exception:  # a template that needs other fields: no default system turn
        return ""
    head = implicit.split(_SENTINEL)[0]
    parts = explicit.split(_SENTINEL)
    prefix = ""
    if len(parts) >= 3 and head and head != parts[1]:
        gap = parts[1]
        n = 0
        while n < min(len(head), len(gap)) and head[-1 - n] == gap[-1 - n]:
            n += 1
        prefix = head[: len(head) - n]
    if template:
        _PREFIX[template] = prefix
    return prefix


__all__ = ["Render", "Span", "default_system_prefix", "hf_render", "role_spans", "roles_from_offsets", "token_roles"]
