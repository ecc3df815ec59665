"""LangChain integration: ``GuardedChatModel`` (a chat model over :class:`GuardedModel`), ``SAEGuard``
(a Runnable that scans text going into or out of any runnable) and ``SAEGuardMiddleware`` (agents).

Needs ``langchain-core``; ``SAEGuardMiddleware`` also needs ``langchain`` v1 (``sae-guardrails[langchain]``).
Modules: messages, chat_model, tools, streaming, guard, sequence, middleware, judge (a chat model as
the cascade's judge).
"""

from typing import Any

try:
    import langchain_core  # noqa: F401
except ImportError as exc:  # an optional extra
    hint = "the LangChain integration needs langchain-core: pip install 'sae-guardrails[langchain]'"
    raise ImportError(hint) from exc

from guardrails.integrations.langchain.chat_model import GuardedChatModel
from guardrails.integrations.langchain.guard import PROMPT_METADATA_KEY, InputBlocked, SAEGuard
from guardrails.integrations.langchain.judge import ChatModelJudge
from guardrails.integrations.langchain.messages import guard_metadata, message_to_turn, to_turns
from guardrails.integrations.langchain.sequence import GuardedSequence, RefuseOnBlock, refuse_on_block
from guardrails.integrations.langchain.tools import parse_tool_calls


def __getattr__(name: str) -> Any:
    if name == "SAEGuardMiddleware":
        from guardrails.integrations.langchain.middleware import SAEGuardMiddleware

        return SAEGuardMiddleware
    raise AttributeError(f"module 'guardrails.integrations.langchain' has no attribute {name!r}")


__all__ = [
    "PROMPT_METADATA_KEY",
    "ChatModelJudge",
    "GuardedChatModel",
    "GuardedSequence",
    "InputBlocked",
    "RefuseOnBlock",
    "SAEGuard",
    "SAEGuardMiddleware",
    "guard_metadata",
    "message_to_turn",
    "parse_tool_calls",
    "refuse_on_block",
    "to_turns",
]
