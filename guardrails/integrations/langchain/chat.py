"""Former single module of the LangChain integration; its names now live in modules by concept.

:mod:`.messages` (messages -> chat turns, metadata), :mod:`.chat_model` (``GuardedChatModel``),
:mod:`.tools` (tool prompts and tool-call parsing), :mod:`.guard` (``SAEGuard``), :mod:`.sequence`
(``GuardedSequence``, ``refuse_on_block``), :mod:`.middleware` (``SAEGuardMiddleware``, optional
``langchain``). Import from :mod:`guardrails.integrations.langchain` (or :mod:`guardrails.langchain`).
"""

from __future__ import annotations

from typing import Any

from guardrails.integrations.langchain.chat_model import GuardedChatModel
from guardrails.integrations.langchain.guard import PROMPT_METADATA_KEY, InputBlocked, SAEGuard, scoped_policy
from guardrails.integrations.langchain.messages import guard_metadata, message_to_turn, to_turns
from guardrails.integrations.langchain.sequence import GuardedSequence, RefuseOnBlock, refuse_on_block


def __getattr__(name: str) -> Any:
    if name == "SAEGuardMiddleware":
        from guardrails.integrations.langchain.middleware import SAEGuardMiddleware

        return SAEGuardMiddleware
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["PROMPT_METADATA_KEY", "GuardedChatModel", "GuardedSequence", "InputBlocked", "RefuseOnBlock", "SAEGuard",
           "guard_metadata", "message_to_turn", "refuse_on_block", "scoped_policy", "to_turns"]
