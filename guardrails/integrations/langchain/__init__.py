"""LangChain integration: ``GuardedChatModel`` (a chat model over :class:`GuardedModel`), ``SAEGuard``
(a Runnable that scans text going into or out of any runnable) and ``SAEGuardMiddleware`` (agents).

Needs ``langchain-core``; ``SAEGuardMiddleware`` also needs ``langchain`` v1 (``sae-guardrails[langchain]``).
"""

from typing import Any

from guardrails.integrations.langchain.chat import (
    PROMPT_METADATA_KEY,
    GuardedChatModel,
    GuardedSequence,
    SAEGuard,
    guard_metadata,
    message_to_turn,
    to_turns,
)


def __getattr__(name: str) -> Any:
    if name == "SAEGuardMiddleware":
        from guardrails.integrations.langchain import chat

        return chat.SAEGuardMiddleware
    raise AttributeError(f"module 'guardrails.integrations.langchain' has no attribute {name!r}")


__all__ = [
    "PROMPT_METADATA_KEY",
    "GuardedChatModel",
    "GuardedSequence",
    "SAEGuard",
    "SAEGuardMiddleware",
    "guard_metadata",
    "message_to_turn",
    "to_turns",
]
