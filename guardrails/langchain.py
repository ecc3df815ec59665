"""Short import path for the LangChain integration (:mod:`guardrails.integrations.langchain`)."""

from typing import Any

from guardrails.integrations.langchain import (
    PROMPT_METADATA_KEY,
    GuardedChatModel,
    GuardedSequence,
    InputBlocked,
    RefuseOnBlock,
    SAEGuard,
    guard_metadata,
    message_to_turn,
    parse_tool_calls,
    refuse_on_block,
    to_turns,
)


def __getattr__(name: str) -> Any:
    if name == "SAEGuardMiddleware":
        import guardrails.integrations.langchain as lc

        return lc.SAEGuardMiddleware
    raise AttributeError(f"module 'guardrails.langchain' has no attribute {name!r}")


__all__ = [
    "PROMPT_METADATA_KEY",
    "GuardedChatModel",
    "GuardedSequence",
    "InputBlocked",
    "RefuseOnBlock",
    "SAEGuard",
    "SAEGuardMiddleware",  # noqa: F822 (resolved by __getattr__)
    "guard_metadata",
    "message_to_turn",
    "parse_tool_calls",
    "refuse_on_block",
    "to_turns",
]
