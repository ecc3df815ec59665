"""A LangChain chat model as the cascade's second-stage judge (:mod:`guardrails.core.cascade`).

    from guardrails.integrations.langchain.judge import ChatModelJudge
    guard = GuardedModel(model, tok, policy, judges={"llm": ChatModelJudge(chat_model)})

A bare chat model works too (``judges={"llm": chat_model}``: the rendered prompt goes as one human
message and the reply's first word is the verdict); this adapter adds a system message, the words that
mean unsafe and safe (Llama Guard answers ``safe`` or ``unsafe\\nS1``), and a custom parser.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from guardrails.core.cascade import SAFE_WORDS, UNSAFE_WORDS, JudgeRequest, Verdict, verdict_from_text


class ChatModelJudge:
    """Sends the judge's prompt to a chat model and reads a verdict from its reply.

    ``system``: an optional system message; ``unsafe_words``/``safe_words``: the first words that mean
    unsafe/safe (case and punctuation ignored); ``parse``: a function of the reply text returning a
    :class:`~guardrails.core.cascade.Verdict` (replaces the first-word rule). A reply that is no verdict
    raises, and the rule's judge ``on_error`` decides.
    """

    def __init__(self, model: Any, *, system: str | None = None, unsafe_words: Sequence[str] = UNSAFE_WORDS,
                 safe_words: Sequence[str] = SAFE_WORDS, parse: Callable[[str], Verdict] | None = None) -> None:
        if not hasattr(model, "invoke"):
            raise TypeError(f"ChatModelJudge needs a LangChain chat model or Runnable (.invoke), got "
                            f"{type(model).__name__}")
        self.model = model
        self.system = system
        self.unsafe_words = tuple(w.lower() for w in unsafe_words)
        self.safe_words = tuple(w.lower() for w in safe_words)
        self.parse = parse

    def messages(self, request: JudgeRequest) -> list[Any]:
        """The messages sent: the system message (if any) and the rendered prompt as the human turn."""
        from langchain_core.messages import HumanMessage, SystemMessage

        out: list[Any] = [SystemMessage(content=self.system)] if self.system else []
        return [*out, HumanMessage(content=request.prompt)]

    def __call__(self, request: JudgeRequest) -> Verdict:
        reply = self.model.invoke(self.messages(request))
        content = getattr(reply, "content", reply)
        if isinstance(content, list):  # content blocks: keep the text ones
            content = "".join(b.get("text", "") if isinstance(b, dict) else str(b) for b in content)
        text = str(content)
        if self.parse is not None:
            return self.parse(text)
        return verdict_from_text(text, self.unsafe_words, self.safe_words)

    def __repr__(self) -> str:
        return f"ChatModelJudge({type(self.model).__name__})"


__all__ = ["ChatModelJudge"]
