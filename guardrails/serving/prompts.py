"""Prompts and generation arguments: chat messages, batches, and the checks every entry point shares."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Message = dict[str, str]
PromptLike = str | Sequence[Message]


def is_batch(prompt: Any) -> bool:
    if isinstance(prompt, str):
        return False
    if isinstance(prompt, Sequence) and prompt and all(isinstance(m, dict) for m in prompt):
        return False
    return isinstance(prompt, Sequence)


def check_messages(messages: Any) -> list[Message]:
    if not isinstance(messages, Sequence) or not messages:
        raise ValueError("a prompt must be a non-empty string or a non-empty list of {'role', 'content'} messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}] must be a dict with string 'role' and 'content', got {m!r:.80}")
        if m["role"] not in ("system", "user", "assistant", "tool"):
            raise ValueError(f"messages[{i}].role {m['role']!r} unknown; valid: system, user, assistant, tool")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def check_generation_args(
    prompts: list[str], max_new_tokens: int, temperature: float, top_p: float, top_k: int
) -> None:
    if not prompts:
        raise ValueError("no prompts given")
    for i, p in enumerate(prompts):
        check_text(p, f"prompt {i}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k!r}")


def check_text(text: Any, where: str) -> None:
    if not isinstance(text, str):
        raise TypeError(f"{where} must be a string, got {type(text).__name__}")
    if not text.strip():
        raise ValueError(f"{where} is empty")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{where} is not valid Unicode text (position {exc.start}: {exc.reason})") from None
