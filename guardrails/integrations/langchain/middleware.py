"""``SAEGuardMiddleware``: the SAE guard in a ``create_agent`` loop (needs the optional ``langchain`` v1).

``before_model`` scores the conversation (input rules), ``after_model`` the answer (output rules,
tool-call text included; tool results are scored as ``tool`` turns of the next input). Each instance
has a ``name`` (default from its policy and modes) so that several can sit in one agent. Every
decision lands in the final AI message's ``response_metadata["guardrails_middleware"][name]``
(``{"input": ..., "output": ...}``) and, for scans, in the audit store of its guard.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

try:
    from langchain.agents.middleware import AgentMiddleware, AgentState, hook_config
except ImportError as exc:
    raise ImportError(
        "SAEGuardMiddleware needs the optional 'langchain' package (v1): pip install 'langchain>=1'"
    ) from exc
from typing import NotRequired

from langchain_core.messages import AIMessage

from guardrails.core.policy import Policy
from guardrails.integrations.langchain.guard import SAEGuard
from guardrails.serving.generation import GuardedModel

META_KEY = "guardrails_middleware"
"""``response_metadata`` key of the final AI message: ``{middleware name: {"input": meta, "output": meta}}``."""


def _merge(left: dict[str, Any] | None, right: dict[str, Any] | None) -> dict[str, Any]:
    return {**(left or {}), **(right or {})}


class GuardrailsState(AgentState):
    """Agent state plus the decisions of each guard middleware in this run."""

    guardrails: NotRequired[Annotated[dict[str, Any], _merge]]


class SAEGuardMiddleware(AgentMiddleware):
    """Agent middleware: score the conversation before each model call and the answer after it.

    A blocked input ends the run with the refusal as the last AI message (the model is not called);
    a blocked answer is replaced (same message id, tool calls dropped) by the refusal and the run
    ends. With ``on_block="raise"`` (or the policy's ``raise_on_block``) GuardrailViolation is raised.
    """

    state_schema = GuardrailsState

    def __init__(self, guard: GuardedModel, *, input: bool | None = None, output: bool | None = None,
                 on_block: Literal["replace", "raise"] | None = None, name: str | None = None) -> None:
        """``input`` / ``output``: None (default) = on when the policy has rules of that scope."""
        super().__init__()
        scopes = {r.scope for r in guard.policy.rules}
        input = bool(scopes & {"input", "both"}) if input is None else input
        output = bool(scopes & {"output", "both"}) if output is None else output
        if not (input or output):
            raise ValueError("SAEGuardMiddleware: enable input, output, or both")
        self.input_guard = SAEGuard(guard=guard, mode="input", on_block=on_block) if input else None
        self.output_guard = SAEGuard(guard=guard, mode="output", on_block=on_block) if output else None
        modes = "+".join(m for m, on in (("input", input), ("output", output)) if on)
        self._name = name or f"SAEGuardMiddleware[{guard.policy.name}, {modes}]"

    @property
    def name(self) -> str:
        return self._name

    def __repr__(self) -> str:
        return f"SAEGuardMiddleware(name={self._name!r})"

    @classmethod
    def from_policy(cls, policy: str | Policy, model: str | None = None, *, audit: Any = None,
                    **kw: Any) -> SAEGuardMiddleware:
        return cls(GuardedModel.from_pretrained(model, policy=policy, audit=audit), **kw)

    def _entry(self, state: Any, **update: Any) -> dict[str, Any]:
        mine = dict((state.get("guardrails") or {}).get(self._name) or {})
        mine.update(update)
        return mine

    @staticmethod
    def _annotated(message: AIMessage, state: Any, own: dict[str, Any]) -> AIMessage:
        entries = {**(state.get("guardrails") or {}), **own}
        meta = {**message.response_metadata, META_KEY: {**message.response_metadata.get(META_KEY, {}), **entries}}
        return message.model_copy(update={"response_metadata": meta})

    @hook_config(can_jump_to=["end"])
    def before_model(self, state: Any, runtime: Any) -> dict[str, Any] | None:
        messages = list(state["messages"])
        if self.input_guard is None or not messages:
            return None
        _, meta = self.input_guard.check(messages)
        own = {self._name: self._entry(state, input=meta)}
        if not meta["blocked"]:
            return {"guardrails": own}
        message = AIMessage(content=meta["refusal"], response_metadata={"guardrails": meta})
        return {"messages": [self._annotated(message, state, own)], "guardrails": own, "jump_to": "end"}

    @hook_config(can_jump_to=["end"])
    def after_model(self, state: Any, runtime: Any) -> dict[str, Any] | None:
        messages = list(state["messages"])
        if not messages or not isinstance(messages[-1], AIMessage):
            return None
        answer = messages[-1]
        if self.output_guard is None:
            own = {self._name: self._entry(state)}
            return {"messages": [self._annotated(answer, state, own)]}
        out, meta = self.output_guard.check({"input": messages[:-1] or None, "output": answer})
        own = {self._name: self._entry(state, output=meta)}
        update: dict[str, Any] = {"messages": [self._annotated(out["output"], state, own)], "guardrails": own}
        if meta["blocked"]:
            update["jump_to"] = "end"
        return update

    @hook_config(can_jump_to=["end"])
    async def abefore_model(self, state: Any, runtime: Any) -> dict[str, Any] | None:
        return await asyncio.to_thread(self.before_model, state, runtime)

    @hook_config(can_jump_to=["end"])
    async def aafter_model(self, state: Any, runtime: Any) -> dict[str, Any] | None:
        return await asyncio.to_thread(self.after_model, state, runtime)
