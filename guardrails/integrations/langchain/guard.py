"""``SAEGuard``: a Runnable that scores the text going into or out of any runnable, a hosted model included.

It scores the text with the local model and SAE in one prefill pass and passes, flags, replaces it
with the refusal, or raises :class:`~guardrails.GuardrailViolation`; an input guard inside a chain
stops the chain (:class:`InputBlocked`). What it reports goes to ``response_metadata["guardrails"]``
of AI messages, to the log, to a ``guardrails`` custom callback event and to the audit store.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any, Literal

from langchain_core.callbacks import CallbackManagerForChainRun, adispatch_custom_event, dispatch_custom_event
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage
from langchain_core.prompt_values import ChatPromptValue, StringPromptValue
from langchain_core.runnables import RunnableConfig, RunnableSerializable
from langchain_core.runnables.base import coerce_to_runnable
from pydantic import ConfigDict, Field, PrivateAttr

from guardrails import GuardrailViolation
from guardrails.core.decision import Decision, TextScore
from guardrails.core.policy import Policy
from guardrails.core.semantics import scoped_rules
from guardrails.integrations.langchain.messages import Turn, guard_metadata, refusal_of, to_turns, violation
from guardrails.serving.generation import GuardedModel

logger = logging.getLogger(__name__)

PROMPT_METADATA_KEY = "guardrails_prompt"
"""Config metadata key an output guard reads the prompt from (any accepted input type)."""


class InputBlocked(GuardrailViolation):
    """An input guard inside a chain blocked its input; the chain stopped there.

    ``refusal`` is the policy's refusal text and ``metadata`` the guard's report (as in
    ``response_metadata["guardrails"]``). ``refuse_on_block(chain)`` returns the refusal instead.
    """

    def __init__(self, policy: Policy, metadata: dict[str, Any]) -> None:
        d = next(iter(metadata.get("decisions") or []), None)
        why = f": rule {d['rule']!r} at token {d['position']}" if d else ""
        super().__init__(f"policy {policy.name!r} blocked the input{why}; the chain stopped before its next step "
                         "(refuse_on_block(chain) returns the refusal instead)", metadata)
        self.refusal: str = metadata.get("refusal") or policy.refusal
        self.metadata = metadata


class Carry:
    """What input guards saw, by parent run id, for output guards later in the same flat sequence (bounded)."""

    def __init__(self, size: int = 4096) -> None:
        self._items: OrderedDict[Any, tuple[list[Turn], bool]] = OrderedDict()
        self._lock = threading.Lock()
        self._size = size

    def put(self, parent: Any, turns: list[Turn], blocked: bool) -> None:
        with self._lock:
            self._items[parent] = (turns, blocked)
            while len(self._items) > self._size:
                self._items.popitem(last=False)

    def get(self, parent: Any) -> tuple[list[Turn], bool] | None:
        with self._lock:
            return self._items.get(parent)


def carry_of(guard: GuardedModel) -> Carry:
    """The carry of one local model: every guard over it, input and output, shares it (set once, atomically)."""
    carry: Carry = vars(guard.model).setdefault("_guardrails_langchain_carry", Carry())
    return carry


def scoped_policy(policy: Policy, mode: Literal["input", "output"]) -> Policy:
    """The rules of ``policy`` that apply to ``mode`` (see :func:`guardrails.core.semantics.scoped_rules`)."""
    return policy.model_copy(update={"rules": scoped_rules(policy, mode)})


class SAEGuard(RunnableSerializable[Any, Any]):
    """Score text with the local model and SAE (one prefill pass) and pass, flag, replace or raise.

    ``mode="input"`` scores the whole conversation (every turn, through the chat template) with the
    policy's input rules. ``mode="output"`` scores the answer as the assistant turn after the prompt
    with the output rules. The output guard finds the prompt, in order: in a dict input
    ``{"input": prompt, "output": answer}``; in ``config["metadata"]["guardrails_prompt"]`` (which
    ``SAEGuard(mode="input") | chain`` sets, see :class:`GuardedSequence`); carried from an input guard
    that ran earlier in the same flat LCEL sequence (``prompt | input_guard | model | output_guard``);
    else it scores the answer after an empty user turn.

    ``input_guard | chain`` is a :class:`GuardedSequence`: a blocked input returns the refusal without
    running ``chain``. An input guard anywhere inside a chain (``prompt | input_guard | hosted_model``)
    stops it where it stands: it raises :class:`InputBlocked` (a ``GuardrailViolation`` carrying the
    refusal and metadata), so nothing after it runs; ``refuse_on_block(chain)`` turns that into the
    refusal as the chain's answer.

    Every scan is recorded in the guard's audit store (``guard.audit``) when it has one.

    On pass the input comes back unchanged (an ``AIMessage`` gains ``response_metadata["guardrails"]``);
    on block it is replaced by the refusal in the same type, or :class:`~guardrails.GuardrailViolation`
    is raised (``on_block="raise"``, default from the policy's ``raise_on_block``). A steer rule cannot
    steer a model it does not run: here it does what its ``steer.scan_action`` says (default block; flag lets
    the text through, marked). A scoring failure follows ``on_error`` (default block): nothing unscored passes.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    guard: GuardedModel = Field(description="The local model, tokenizer, policy and SAEs that score text")
    mode: Literal["input", "output"] = Field(default="input", description="Score the prompt or the answer")
    on_block: Literal["replace", "raise"] | None = Field(
        default=None, description="replace with the refusal or raise; default: the policy's raise_on_block"
    )
    _scorer: GuardedModel = PrivateAttr()

    def __init__(self, **kwargs: Any) -> None:
        guard, mode = kwargs.get("guard"), kwargs.get("mode", "input")
        if isinstance(guard, GuardedModel) and mode in ("input", "output"):
            scoped_policy(guard.policy, mode)  # a PolicyError here, not wrapped in a pydantic ValidationError
        super().__init__(**kwargs)

    def model_post_init(self, context: Any, /) -> None:
        # the guard's compiled policy, scoped: same tensors, nothing reloaded (watched mode has no full SAE left)
        self._scorer = self.guard.scoped(self.mode)

    @classmethod
    def from_policy(
        cls, policy: str | Policy, model: str | None = None,
        mode: Literal["input", "output"] | Sequence[Literal["input", "output"]] = "input", *, audit: Any = None,
        judges: Mapping[str, Any] | None = None, **fields: Any,
    ) -> Any:
        """Load ``model`` (default: the policy's, else the bundled SmolLM2) and guard with ``policy``.

        ``mode=("input", "output")`` returns one guard per mode, all sharing the one loaded model;
        ``audit``: an AuditStore or database path (default: the policy's ``audit.db``, else
        ``GUARDRAILS_AUDIT_DB``); ``judges``: a cascade policy's judges by name (callables or chat models).
        """
        shared = GuardedModel.from_pretrained(model, policy=policy, audit=audit, judges=judges)
        if isinstance(mode, str):
            return cls(guard=shared, mode=mode, **fields)
        return tuple(cls(guard=shared, mode=m, **fields) for m in mode)

    @property
    def policy(self) -> Policy:
        """The rules this guard applies (the policy's rules for its mode)."""
        return self._scorer.policy

    # -- the check -------------------------------------------------------------------------------------------
    def check(self, value: Any, prompt: Any = None) -> tuple[Any, dict[str, Any]]:
        """Score ``value`` and return ``(output, metadata)``; raises GuardrailViolation when so configured."""
        out, meta, violation = self._evaluate(value, prompt, None)
        if violation is not None:
            raise violation
        return out, meta

    def _evaluate(self, value: Any, prompt: Any, carried: tuple[list[Turn], bool] | None) -> tuple[Any, dict, Any]:
        answer_value = value
        if self.mode == "output" and isinstance(value, dict) and "output" in value:
            answer_value = value["output"]
            prompt = value.get("input", prompt)
        elif self.mode == "output" and isinstance(value, dict):
            raise TypeError(f"an output guard takes a dict as {{'input': prompt, 'output': answer}}, got keys "
                            f"{sorted(map(str, value))}")
        turns = to_turns(answer_value, "output" if self.mode == "output" else "input")
        prompt_turns = to_turns(prompt, "prompt") if prompt is not None else None
        if self.mode == "output":
            if isinstance(answer_value, list | tuple | ChatPromptValue) and len(turns) > 1:
                prompt_turns, turns = turns[:-1], turns[-1:]  # a conversation: score its last turn
            if prompt_turns is None and carried is not None:
                prompt_turns, input_blocked = carried
                if input_blocked:
                    meta: dict[str, Any] = {
                        "blocked": True, "flagged": False, "steered": False, "policy": self.policy.name,
                        "decisions": [], "errors": [], "mode": self.mode, "reason": "input guard blocked",
                        "refusal": self.policy.refusal,
                    }
                    return self._replace(value, self.policy.refusal, meta), meta, None
        try:
            if self.mode == "input":
                score = self._scorer.score([turns])[0]  # turns, not text: input rules read the policy's roles
            else:
                convo = prompt_turns or [{"role": "user", "content": ""}]
                score = self._scorer.score([convo], responses=[turns[-1]["content"]])[0]
        except Exception as exc:  # every scoring failure goes to on_error
            score = self._failed(exc)
        score = self._record(score, turns if self.mode == "input" else turns[-1:], prompt_turns)
        meta = guard_metadata(score, self.policy, mode=self.mode, scores={
            k: (v if v == v else None) for k, v in score.scores.items()
        })
        if score.blocked:
            logger.warning("%s guard (policy %r) blocked: %s", self.mode, self.policy.name, meta["decisions"][:1])
            raising = self.on_block == "raise" or (self.on_block is None and self.guard.policy.raise_on_block)
            if raising:
                return None, meta, violation(self.policy, score.decisions, score, self.mode)
            meta["refusal"] = refusal_of(self.policy, score.decisions)
            return self._replace(value, meta["refusal"], meta), meta, None
        if meta["flagged"] or score.decisions:
            logger.info("%s guard (policy %r) flagged: %s", self.mode, self.policy.name,
                        ", ".join(f"{d.action} {d.rule}" for d in score.decisions))
            meta["flagged"] = True
        return self._annotate(value, meta), meta, None

    def _record(self, score: TextScore, turns: list[Turn], prompt_turns: list[Turn] | None) -> TextScore:
        """Write the scan to the audit store; a failed write follows on_error like a failed score."""
        store = self.guard.audit
        if store is None or not hasattr(store, "record_scan"):
            return score
        if self.mode == "input":
            text = "\n".join(f"{t['role']}: {t['content']}" for t in turns)
        else:
            text = turns[-1]["content"]
        try:
            store.record_scan(score, self._scorer, text, self.mode)
        except Exception as exc:
            return self._failed(exc, "audit record failed: ")
        return score

    def _failed(self, exc: Exception, what: str = "") -> TextScore:
        reason = f"{what}{type(exc).__name__}: {exc}"
        logger.warning("%s guard could not score or record: %s", self.mode, reason)
        decisions = [Decision(action="error", rule=r.id, score=float("nan"), threshold=r.threshold, position=-1,
                              scope=self.mode, reason=reason, resolution=r.on_error or self.policy.on_error)
                     for r in self.policy.rules]
        return TextScore({r.id: float("nan") for r in self.policy.rules}, {}, decisions, [])

    def _replace(self, value: Any, refusal: str, meta: dict[str, Any]) -> Any:
        if isinstance(value, str):
            return refusal
        if isinstance(value, AIMessage):
            cls = AIMessageChunk if isinstance(value, AIMessageChunk) else AIMessage
            return cls(content=refusal, id=value.id, response_metadata={**value.response_metadata, "guardrails": meta})
        if isinstance(value, BaseMessage):
            return value.model_copy(update={"content": refusal})
        if isinstance(value, StringPromptValue):
            return StringPromptValue(text=refusal)
        if isinstance(value, ChatPromptValue):
            return ChatPromptValue(messages=[HumanMessage(refusal)])
        if isinstance(value, list | tuple):
            if self.mode == "output" and value:
                return [*value[:-1], self._replace(value[-1], refusal, meta)]
            return [HumanMessage(refusal)]
        if isinstance(value, dict) and self.mode == "output":
            return {**value, "output": self._replace(value["output"], refusal, meta)}
        if isinstance(value, dict):
            return {k: [] if isinstance(v, list | tuple) else refusal for k, v in value.items()}
        raise TypeError(f"cannot replace a {type(value).__name__}")  # pragma: no cover - to_turns rejects it

    @staticmethod
    def _annotate(value: Any, meta: dict[str, Any]) -> Any:
        if isinstance(value, AIMessage):
            return value.model_copy(update={"response_metadata": {**value.response_metadata, "guardrails": meta}})
        return value

    # -- Runnable protocol -------------------------------------------------------------------------------------
    def _prompt_and_carry(
        self, run_manager: CallbackManagerForChainRun | Any, config: RunnableConfig
    ) -> tuple[Any, tuple[list[Turn], bool] | None, Any]:
        parent = getattr(run_manager, "parent_run_id", None)
        prompt = (config.get("metadata") or {}).get(PROMPT_METADATA_KEY)
        carried = carry_of(self.guard).get(parent) if self.mode == "output" and parent is not None else None
        return prompt, carried, parent

    def _after(self, value: Any, parent: Any, meta: dict[str, Any]) -> None:
        if self.mode == "input" and parent is not None:
            carry_of(self.guard).put(parent, to_turns(value, "input"), bool(meta["blocked"]))

    def _stop(self, meta: dict[str, Any], parent: Any, stop: bool) -> None:
        """An input blocked inside a chain stops it there: nothing after this guard runs."""
        if stop and self.mode == "input" and parent is not None and meta["blocked"]:
            raise InputBlocked(self.policy, meta)

    def _run(self, value: Any, run_manager: CallbackManagerForChainRun, config: RunnableConfig,
             stop: bool = True) -> Any:
        prompt, carried, parent = self._prompt_and_carry(run_manager, config)
        out, meta, violation = self._evaluate(value, prompt, carried)
        dispatch_custom_event("guardrails", meta, config=config)
        if violation is not None:
            raise violation
        self._stop(meta, parent, stop)
        self._after(value, parent, meta)
        return out, meta

    async def _arun(self, value: Any, run_manager: Any, config: RunnableConfig, stop: bool = True) -> Any:
        prompt, carried, parent = self._prompt_and_carry(run_manager, config)
        out, meta, violation = await asyncio.to_thread(self._evaluate, value, prompt, carried)
        await adispatch_custom_event("guardrails", meta, config=config)
        if violation is not None:
            raise violation
        self._stop(meta, parent, stop)
        self._after(value, parent, meta)
        return out, meta

    def _invoke_meta(self, input: Any, config: RunnableConfig | None, stop: bool = True) -> tuple[Any, dict[str, Any]]:
        return self._call_with_config(partial(self._run, stop=stop), input, config, run_type="chain")

    async def _ainvoke_meta(self, input: Any, config: RunnableConfig | None,
                            stop: bool = True) -> tuple[Any, dict[str, Any]]:
        return await self._acall_with_config(partial(self._arun, stop=stop), input, config, run_type="chain")

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        return self._invoke_meta(input, config)[0]

    def __or__(self, other: Any) -> Any:
        """``input_guard | chain``: a :class:`GuardedSequence` that skips ``chain`` when the input is blocked."""
        if self.mode != "input":
            return super().__or__(other)
        from guardrails.integrations.langchain.sequence import GuardedSequence

        return GuardedSequence(first=self, rest=coerce_to_runnable(other))

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        return (await self._ainvoke_meta(input, config))[0]
