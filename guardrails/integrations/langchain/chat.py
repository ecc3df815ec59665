"""LangChain integration: a guarded chat model, a guard for any chain, and agent middleware.

- :class:`GuardedChatModel` is a ``BaseChatModel`` over a :class:`~guardrails.GuardedModel`: the SAE
  watches every token it generates (``invoke``, ``batch``, ``stream``, ``ainvoke``, ``astream``).
- :class:`SAEGuard` is a ``Runnable`` placed before or after any runnable, a hosted model included:
  it scores the text with the local model and SAE in one prefill pass and passes, flags, replaces it
  with the refusal, or raises :class:`~guardrails.GuardrailViolation`.
- ``SAEGuardMiddleware`` (only where the optional ``langchain`` v1 package is installed) does the
  same in a ``create_agent`` loop through ``before_model`` / ``after_model``.

Messages map to chat turns as system/human/ai -> system/user/assistant; tool (and function) results
become ``tool`` turns and an AI message's tool calls are written into its turn as text, so both are
scored. Non-text content blocks (images, audio, files) are an error: the guard reads text only.

What each guard reports goes to ``response_metadata["guardrails"]`` of AI messages (``blocked``,
``flagged``, ``steered``, ``policy``, ``decisions``, ``errors``), to the log, and (``SAEGuard``) to a
``guardrails`` custom callback event.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Generator, Iterator
from typing import Any, Literal

try:
    from langchain_core.callbacks import (
        AsyncCallbackManagerForLLMRun,
        CallbackManagerForChainRun,
        CallbackManagerForLLMRun,
        adispatch_custom_event,
        dispatch_custom_event,
    )
    from langchain_core.language_models import BaseChatModel
    from langchain_core.messages import (
        AIMessage,
        AIMessageChunk,
        BaseMessage,
        ChatMessage,
        FunctionMessage,
        HumanMessage,
        SystemMessage,
        ToolMessage,
    )
    from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
    from langchain_core.prompt_values import ChatPromptValue, StringPromptValue
    from langchain_core.runnables import Runnable, RunnableConfig, RunnableSerializable
    from langchain_core.runnables.base import coerce_to_runnable
    from langchain_core.runnables.config import (
        ensure_config,
        get_async_callback_manager_for_config,
        get_callback_manager_for_config,
        patch_config,
    )
except ImportError as exc:  # pragma: no cover - langchain-core is a dependency
    raise ImportError("the LangChain integration needs langchain-core: pip install 'langchain-core>=1'") from exc
from pydantic import ConfigDict, Field, PrivateAttr

from guardrails import GuardrailViolation
from guardrails.core.policy import Policy, PolicyError
from guardrails.engine.run import Decision
from guardrails.serving.generation import GenerationResult, GuardedModel, TextScore

logger = logging.getLogger(__name__)

Turn = dict[str, str]
ACCEPTED = "str, BaseMessage, a list of messages, ChatPromptValue, StringPromptValue, or a dict"
_ROLES = {"system": "system", "human": "user", "user": "user", "ai": "assistant", "assistant": "assistant",
          "tool": "tool", "function": "tool"}


# -- messages -> chat turns ----------------------------------------------------------------------------------


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for i, block in enumerate(content or []):
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") in ("text", "reasoning"):
            parts.append(str(block.get("text") or block.get("reasoning") or ""))
        else:
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise TypeError(f"{where}.content[{i}]: content block of type {kind!r} is not text; "
                            "valid: str or 'text' blocks (SAE guards read text only)")
    return "".join(parts)


def message_to_turn(msg: BaseMessage, where: str = "message") -> Turn:
    """One LangChain message as a ``{"role", "content"}`` chat turn (see the module docstring)."""
    if isinstance(msg, SystemMessage):
        role = "system"
    elif isinstance(msg, HumanMessage):
        role = "user"
    elif isinstance(msg, AIMessage):
        role = "assistant"
    elif isinstance(msg, ToolMessage | FunctionMessage):
        role = "tool"
    elif isinstance(msg, ChatMessage) and msg.role in _ROLES:
        role = _ROLES[msg.role]
    else:
        extra = f" with role {msg.role!r}" if isinstance(msg, ChatMessage) else ""
        raise TypeError(f"{where}: cannot guard a {type(msg).__name__}{extra}; valid: SystemMessage, "
                        f"HumanMessage, AIMessage, ToolMessage, ChatMessage with role in {sorted(_ROLES)}")
    text = _text(msg.content, where)
    if isinstance(msg, AIMessage):
        for call in msg.tool_calls:
            text += f"\n[tool call] {call['name']}({call['args']})"
    return {"role": role, "content": text}


def to_turns(value: Any, where: str = "input") -> list[Turn]:
    """Chat turns of a string, message, message list, prompt value, or dict of prompt variables."""
    if isinstance(value, str):
        turns = [{"role": "user", "content": value}]
    elif isinstance(value, BaseMessage):
        turns = [message_to_turn(value, where)]
    elif isinstance(value, StringPromptValue):
        turns = [{"role": "user", "content": value.text}]
    elif isinstance(value, ChatPromptValue):
        turns = [message_to_turn(m, f"{where}.messages[{i}]") for i, m in enumerate(value.messages)]
    elif isinstance(value, dict):
        turns, text = [], []
        for key, v in value.items():
            if isinstance(v, str | int | float) and not isinstance(v, bool):
                text.append(str(v))
            elif isinstance(v, list | tuple) and all(isinstance(m, BaseMessage) for m in v):
                turns += [message_to_turn(m, f"{where}[{key!r}][{i}]") for i, m in enumerate(v)]
            else:
                raise TypeError(f"{where}[{key!r}]: cannot guard a {type(v).__name__}; valid values: str, "
                                "numbers, lists of messages")
        if text:
            turns.append({"role": "user", "content": "\n".join(text)})
    elif isinstance(value, list | tuple):
        turns = []
        for i, m in enumerate(value):
            if isinstance(m, BaseMessage):
                turns.append(message_to_turn(m, f"{where}[{i}]"))
            elif isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str):
                role = _ROLES.get(m["role"])
                if role is None:
                    raise TypeError(f"{where}[{i}].role {m['role']!r} unknown; valid: {sorted(_ROLES)}")
                turns.append({"role": role, "content": m["content"]})
            else:
                raise TypeError(f"{where}[{i}]: cannot guard a {type(m).__name__}; valid list items: "
                                "BaseMessage or {'role', 'content'} dicts")
    else:
        raise TypeError(f"{where}: cannot guard a {type(value).__name__}; valid: {ACCEPTED}")
    if not turns or not any(t["content"].strip() for t in turns):
        raise ValueError(f"{where}: empty input: nothing to score (got {type(value).__name__} with no text)")
    return turns


# -- results -> metadata -----------------------------------------------------------------------------------------


def guard_metadata(result: GenerationResult | TextScore, policy: Policy, **extra: Any) -> dict[str, Any]:
    """The ``guardrails`` entry of ``response_metadata``: outcome, policy and every decision."""
    decisions = result.decisions
    return {
        "blocked": result.blocked,
        "flagged": any(d.action in ("flag", "error") for d in decisions),
        "steered": bool(getattr(result, "steered", False)),
        "policy": policy.name,
        "policy_digest": policy.digest,
        "decisions": [d.to_dict() for d in decisions],
        "errors": list(getattr(result, "errors", None) or [d.reason for d in decisions if d.reason]),
        **extra,
    }


def _violation(policy: Policy, decisions: list[Decision], result: Any, what: str) -> GuardrailViolation:
    d = next((d for d in decisions if d.action == "block" or d.resolution == "block"), None)
    why = (f"rule {d.rule!r} at token {d.position} ({d.scope}): " + (
        f"score {d.score:.4g} >= threshold {d.threshold:.4g}" if d.action == "block" else f"scoring failed: {d.reason}"
    )) if d else "blocked"
    return GuardrailViolation(f"policy {policy.name!r} blocked the {what}: {why}", result)


def _refusal(policy: Policy, decisions: list[Decision]) -> str:
    d = next((d for d in decisions if d.action == "block" or d.resolution == "block"), None)
    rule = next((r for r in policy.rules if d is not None and r.id == d.rule), None)
    return (rule.message if rule and rule.message else None) or policy.refusal


# -- the guarded chat model ----------------------------------------------------------------------------------------

_GEN_KEYS = ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "seed")


class GuardedChatModel(BaseChatModel):
    """A LangChain chat model whose every generated token is scored by the policy before release.

    A block returns an ``AIMessage`` with the refusal (or raises :class:`~guardrails.GuardrailViolation`
    when the policy sets ``raise_on_block: true``); ``response_metadata["guardrails"]`` holds the
    decisions. Stop sequences cut the text shown; guarding is unchanged (the model still runs up to
    ``max_new_tokens`` and a later block still replaces the answer).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    guard: GuardedModel = Field(description="The guarded local model (model, tokenizer, policy, SAEs)")
    max_new_tokens: int = Field(default=64, ge=1, description="Most tokens generated per call")
    do_sample: bool = Field(default=False, description="Sample instead of greedy decoding")
    temperature: float = Field(default=1.0, gt=0, description="Sampling temperature (with do_sample)")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling mass (with do_sample)")
    top_k: int = Field(default=0, ge=0, description="Top-k sampling, 0 = off (with do_sample)")
    seed: int | None = Field(default=None, description="Sampling seed (with do_sample)")

    @classmethod
    def from_policy(cls, policy: str | Policy, model: str | None = None, **fields: Any) -> GuardedChatModel:
        """Load ``model`` (default: the policy's model, else the bundled SmolLM2) guarded by ``policy``."""
        return cls(guard=GuardedModel.from_pretrained(model, policy=policy), **fields)

    @property
    def _llm_type(self) -> str:
        return "sae-guardrails"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self._model_name, "policy": self.guard.policy.name,
                "policy_digest": self.guard.policy.digest, **{k: getattr(self, k) for k in _GEN_KEYS}}

    @property
    def _model_name(self) -> str:
        return str(getattr(self.guard.model.config, "name_or_path", "") or type(self.guard.model).__name__)

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> Any:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "sae-guardrails"
        params["ls_model_name"] = self._model_name
        return params

    def _gen_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(kwargs) - set(_GEN_KEYS))
        if unknown:
            raise TypeError(f"unknown generation argument(s) {unknown}; valid: {', '.join(_GEN_KEYS)}")
        return {k: kwargs.get(k, getattr(self, k)) for k in _GEN_KEYS}

    def _metadata(self, result: GenerationResult, max_new: int) -> dict[str, Any]:
        finish = "blocked" if result.blocked else "length" if len(result.output_ids) >= max_new else "stop"
        return {"guardrails": guard_metadata(result, self.guard.policy), "model_name": self._model_name,
                "finish_reason": finish}

    def _usage(self, result: GenerationResult) -> Any:
        n_in, n_out = result.prompt_length, len(result.output_ids)
        return {"input_tokens": n_in, "output_tokens": n_out, "total_tokens": n_in + n_out}

    def _check(self, result: GenerationResult) -> None:
        if result.blocked:
            logger.warning("policy %r blocked a generation", result.policy)
            if self.guard.policy.raise_on_block:
                raise _violation(self.guard.policy, result.decisions, result, "generation")
        elif result.decisions:
            logger.info("policy %r: %s", result.policy, ", ".join(f"{d.action} {d.rule}" for d in result.decisions))

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        gen = self._gen_kwargs(kwargs)
        result = self.guard.generate(to_turns(messages, "messages"), **gen)
        assert isinstance(result, GenerationResult)
        self._check(result)
        text = result.text if result.blocked else _cut_at_stop(result.text, stop)
        meta = self._metadata(result, gen["max_new_tokens"])
        message = AIMessage(content=text, response_metadata=meta, usage_metadata=self._usage(result))
        return ChatResult(generations=[ChatGeneration(message=message)], llm_output={"guardrails": meta["guardrails"]})

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        # the blocking generation runs on a worker thread; the event loop stays free
        return await asyncio.to_thread(self._generate, messages, stop, None, **kwargs)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Generator[ChatGenerationChunk, None, None]:
        gen = self._gen_kwargs(kwargs)
        stream = self.guard.stream(to_turns(messages, "messages"), **gen)
        pieces = iter(stream)
        held, cut = "", False  # held: text that may begin a stop sequence; cut: a stop sequence was seen
        try:
            for piece in pieces:
                if stream.result is not None:  # the refusal, yielded after the stream's result is set
                    break
                if cut:
                    continue
                if stop:
                    held += piece
                    at = _stop_index(held, stop)
                    if at is not None:
                        piece, held, cut = held[:at], "", True
                    else:
                        keep = _partial_stop(held, stop)
                        piece, held = held[: len(held) - keep], held[len(held) - keep :]
                if piece:
                    yield ChatGenerationChunk(message=AIMessageChunk(content=piece))
        finally:
            pieces.close()  # type: ignore[attr-defined]  # a generator: removes the hooks if we stop early
        result = stream.result
        assert result is not None
        self._check(result)
        last = (("\n" if result.released_text else "") + result.text) if result.blocked else held
        yield ChatGenerationChunk(message=AIMessageChunk(
            content=last, response_metadata=self._metadata(result, gen["max_new_tokens"]),
            usage_metadata=self._usage(result), chunk_position="last",
        ))

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        # One worker thread runs the whole stream (the model lock and hooks stay on that thread) and
        # hands each chunk to the event loop as soon as it is released.
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        stop_event = threading.Event()

        def put(item: tuple[str, Any]) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is gone; nobody is listening
                stop_event.set()

        def produce() -> None:
            chunks = self._stream(messages, stop, None, **kwargs)
            try:
                for chunk in chunks:
                    if stop_event.is_set():
                        break
                    put(("chunk", chunk))
            except BaseException as exc:  # carried to the consumer
                put(("error", exc))
            else:
                put(("done", None))
            finally:
                chunks.close()

        worker = loop.run_in_executor(None, contextvars.copy_context().run, produce)
        try:
            while True:
                kind, item = await queue.get()
                if kind == "error":
                    raise item
                if kind == "done":
                    break
                yield item
        finally:
            stop_event.set()
            await asyncio.wait([worker])


def _stop_index(text: str, stop: list[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return min(found) if found else None


def _partial_stop(text: str, stop: list[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of a stop sequence."""
    return max((n for s in stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)


def _cut_at_stop(text: str, stop: list[str] | None) -> str:
    at = _stop_index(text, stop) if stop else None
    return text if at is None else text[:at]


# -- a guard for any chain -------------------------------------------------------------------------------------

PROMPT_METADATA_KEY = "guardrails_prompt"
"""Config metadata key an output guard reads the prompt from (any accepted input type)."""

_CARRY: OrderedDict[Any, tuple[list[Turn], bool]] = OrderedDict()
_CARRY_LOCK = threading.Lock()
_CARRY_MAX = 4096


def _carry_put(parent: Any, turns: list[Turn], blocked: bool) -> None:
    with _CARRY_LOCK:
        _CARRY[parent] = (turns, blocked)
        while len(_CARRY) > _CARRY_MAX:
            _CARRY.popitem(last=False)


def _carry_get(parent: Any) -> tuple[list[Turn], bool] | None:
    with _CARRY_LOCK:
        return _CARRY.get(parent)


def scoped_policy(policy: Policy, mode: Literal["input", "output"]) -> Policy:
    """The rules of ``policy`` that apply to ``mode`` (``both`` rules included, rescoped to ``mode``)."""
    rules = [r.model_copy(update={"scope": mode}) for r in policy.rules if r.scope in (mode, "both")]
    if not rules:
        scopes = ", ".join(f"{r.id}: {r.scope}" for r in policy.rules)
        raise PolicyError(f"policy {policy.name!r} has no {mode} rules (rule scopes: {scopes}); an {mode} guard "
                          f"needs a rule with scope '{mode}' or 'both'")
    return policy.model_copy(update={"rules": rules})


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
    running ``chain``. An input guard placed inside a sequence instead (``prompt | input_guard | model``)
    can only replace the input with the refusal, so ``model`` runs on the refusal text; an output guard
    later in that sequence then returns the refusal too.

    On pass the input comes back unchanged (an ``AIMessage`` gains ``response_metadata["guardrails"]``);
    on block it is replaced by the refusal in the same type, or :class:`~guardrails.GuardrailViolation`
    is raised (``on_block="raise"``, default from the policy's ``raise_on_block``). A steer rule cannot
    steer a model it does not run: here it flags. A scoring failure follows ``on_error`` (default
    block): nothing unscored passes.
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
        g = self.guard
        policy = scoped_policy(g.policy, self.mode)
        self._scorer = GuardedModel(g.model, g.tokenizer, policy, saes=g.saes, score_mode=g.score_mode, chat=g.chat)

    @classmethod
    def from_policy(
        cls, policy: str | Policy, model: str | None = None, mode: Literal["input", "output"] = "input", **fields: Any
    ) -> SAEGuard:
        """Load ``model`` (default: the policy's, else the bundled SmolLM2) and guard with ``policy``."""
        return cls(guard=GuardedModel.from_pretrained(model, policy=policy), mode=mode, **fields)

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
                text = self._scorer.format_prompt(turns)
                score = self._scorer.score([text], chat=False)[0]
            else:
                text = self._scorer.format_prompt(prompt_turns or [{"role": "user", "content": ""}])
                score = self._scorer.score([text], responses=[turns[-1]["content"]], chat=False)[0]
        except Exception as exc:  # every scoring failure goes to on_error
            score = self._failed(exc)
        meta = guard_metadata(score, self.policy, mode=self.mode, scores={
            k: (v if v == v else None) for k, v in score.scores.items()
        })
        if score.blocked:
            logger.warning("%s guard (policy %r) blocked: %s", self.mode, self.policy.name, meta["decisions"][:1])
            raising = self.on_block == "raise" or (self.on_block is None and self.guard.policy.raise_on_block)
            if raising:
                return None, meta, _violation(self.policy, score.decisions, score, self.mode)
            meta["refusal"] = _refusal(self.policy, score.decisions)
            return self._replace(value, meta["refusal"], meta), meta, None
        if meta["flagged"] or score.decisions:
            logger.info("%s guard (policy %r) flagged: %s", self.mode, self.policy.name,
                        ", ".join(f"{d.action} {d.rule}" for d in score.decisions))
            meta["flagged"] = True
        return self._annotate(value, meta), meta, None

    def _failed(self, exc: Exception) -> TextScore:
        reason = f"{type(exc).__name__}: {exc}"
        logger.warning("%s guard could not score: %s", self.mode, reason)
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
        carried = _carry_get(parent) if self.mode == "output" and parent is not None else None
        return prompt, carried, parent

    def _after(self, value: Any, parent: Any, meta: dict[str, Any]) -> None:
        if self.mode == "input" and parent is not None:
            _carry_put(parent, to_turns(value, "input"), bool(meta["blocked"]))

    def _run(self, value: Any, run_manager: CallbackManagerForChainRun, config: RunnableConfig) -> Any:
        prompt, carried, parent = self._prompt_and_carry(run_manager, config)
        out, meta, violation = self._evaluate(value, prompt, carried)
        dispatch_custom_event("guardrails", meta, config=config)
        if violation is not None:
            raise violation
        self._after(value, parent, meta)
        return out, meta

    async def _arun(self, value: Any, run_manager: Any, config: RunnableConfig) -> Any:
        prompt, carried, parent = self._prompt_and_carry(run_manager, config)
        out, meta, violation = await asyncio.to_thread(self._evaluate, value, prompt, carried)
        await adispatch_custom_event("guardrails", meta, config=config)
        if violation is not None:
            raise violation
        self._after(value, parent, meta)
        return out, meta

    def _invoke_meta(self, input: Any, config: RunnableConfig | None) -> tuple[Any, dict[str, Any]]:
        return self._call_with_config(self._run, input, config, run_type="chain")

    async def _ainvoke_meta(self, input: Any, config: RunnableConfig | None) -> tuple[Any, dict[str, Any]]:
        return await self._acall_with_config(self._arun, input, config, run_type="chain")

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        return self._invoke_meta(input, config)[0]

    def __or__(self, other: Any) -> Any:
        """``input_guard | chain``: a :class:`GuardedSequence` that skips ``chain`` when the input is blocked."""
        if self.mode != "input":
            return super().__or__(other)
        return GuardedSequence(first=self, rest=coerce_to_runnable(other))

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        return (await self._ainvoke_meta(input, config))[0]


class GuardedSequence(RunnableSerializable[Any, Any]):
    """``SAEGuard(mode="input") | rest``: the guard checks the input; a block returns the refusal at once.

    ``rest`` never runs on a blocked input. The refusal comes back as a ``str`` when ``rest`` outputs
    strings (e.g. ends in ``StrOutputParser``), else as an ``AIMessage`` carrying the guard's metadata.
    The input reaches ``rest`` under ``config["metadata"]["guardrails_prompt"]``, so an output guard
    inside ``rest`` scores the answer after it. ``guarded | more`` extends ``rest``.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    first: SAEGuard = Field(description="The input guard")
    rest: Runnable[Any, Any] = Field(description="What runs on inputs the guard passes")

    def __or__(self, other: Any) -> Any:
        return GuardedSequence(first=self.first, rest=self.rest | other)

    def _blocked_output(self, meta: dict[str, Any]) -> Any:
        if self.rest.OutputType is str:
            return meta["refusal"]
        return AIMessage(content=meta["refusal"], response_metadata={"guardrails": meta})

    def _rest_config(self, config: RunnableConfig, value: Any, callbacks: Any) -> RunnableConfig:
        cfg = patch_config(config, callbacks=callbacks)
        cfg["metadata"] = {**(cfg.get("metadata") or {}), PROMPT_METADATA_KEY: value}
        return cfg

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        config = ensure_config(config)
        run = get_callback_manager_for_config(config).on_chain_start(
            None, input, name=config.get("run_name") or self.get_name(), run_id=config.pop("run_id", None))
        try:
            value, meta = self.first._invoke_meta(input, patch_config(config, callbacks=run.get_child("guard")))
            out = self._blocked_output(meta) if meta["blocked"] else self.rest.invoke(
                value, self._rest_config(config, input, run.get_child("rest")), **kwargs)
        except BaseException as exc:
            run.on_chain_error(exc)
            raise
        run.on_chain_end(out)
        return out

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        config = ensure_config(config)
        run = await get_async_callback_manager_for_config(config).on_chain_start(
            None, input, name=config.get("run_name") or self.get_name(), run_id=config.pop("run_id", None))
        try:
            value, meta = await self.first._ainvoke_meta(input, patch_config(config, callbacks=run.get_child("guard")))
            out = self._blocked_output(meta) if meta["blocked"] else await self.rest.ainvoke(
                value, self._rest_config(config, input, run.get_child("rest")), **kwargs)
        except BaseException as exc:
            await run.on_chain_error(exc)
            raise
        await run.on_chain_end(out)
        return out

    def stream(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Iterator[Any]:
        config = ensure_config(config)
        value, meta = self.first._invoke_meta(input, config)
        if meta["blocked"]:
            yield self._blocked_output(meta)
            return
        yield from self.rest.stream(value, self._rest_config(config, input, config.get("callbacks")), **kwargs)

    async def astream(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> AsyncIterator[Any]:
        config = ensure_config(config)
        value, meta = await self.first._ainvoke_meta(input, config)
        if meta["blocked"]:
            yield self._blocked_output(meta)
            return
        async for chunk in self.rest.astream(value, self._rest_config(config, input, config.get("callbacks")),
                                             **kwargs):
            yield chunk


# -- agent middleware (optional `langchain` package) ----------------------------------------------------------------

_MIDDLEWARE: type | None = None
_INSTALL_HINT = "SAEGuardMiddleware needs the optional 'langchain' package (v1): pip install 'langchain>=1'"


def _middleware_class() -> type:
    global _MIDDLEWARE
    if _MIDDLEWARE is not None:
        return _MIDDLEWARE
    try:
        from langchain.agents.middleware import AgentMiddleware, hook_config
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc

    class SAEGuardMiddleware(AgentMiddleware):
        """Agent middleware: score the conversation before each model call and the answer after it.

        A blocked input ends the run with the refusal as the last AI message; a blocked answer is
        replaced (same message id, tool calls dropped) by the refusal and the run ends. With
        ``on_block="raise"`` (or the policy's ``raise_on_block``) GuardrailViolation is raised.
        """

        def __init__(self, guard: GuardedModel, *, input: bool | None = None, output: bool | None = None,
                     on_block: Literal["replace", "raise"] | None = None) -> None:
            """``input`` / ``output``: None (default) = on when the policy has rules of that scope."""
            super().__init__()
            scopes = {r.scope for r in guard.policy.rules}
            input = bool(scopes & {"input", "both"}) if input is None else input
            output = bool(scopes & {"output", "both"}) if output is None else output
            if not (input or output):
                raise ValueError("SAEGuardMiddleware: enable input, output, or both")
            self.input_guard = SAEGuard(guard=guard, mode="input", on_block=on_block) if input else None
            self.output_guard = SAEGuard(guard=guard, mode="output", on_block=on_block) if output else None

        @classmethod
        def from_policy(cls, policy: str | Policy, model: str | None = None, **kw: Any) -> Any:
            return cls(GuardedModel.from_pretrained(model, policy=policy), **kw)

        @hook_config(can_jump_to=["end"])
        def before_model(self, state: Any, runtime: Any) -> dict[str, Any] | None:
            messages = list(state["messages"])
            if self.input_guard is None or not messages:
                return None
            _, meta = self.input_guard.check(messages)
            if not meta["blocked"]:
                return None
            message = AIMessage(content=meta["refusal"], response_metadata={"guardrails": meta})
            return {"messages": [message], "jump_to": "end"}

        @hook_config(can_jump_to=["end"])
        def after_model(self, state: Any, runtime: Any) -> dict[str, Any] | None:
            messages = list(state["messages"])
            if self.output_guard is None or not messages or not isinstance(messages[-1], AIMessage):
                return None
            out, meta = self.output_guard.check({"input": messages[:-1] or None, "output": messages[-1]})
            if meta["blocked"]:
                return {"messages": [out["output"]], "jump_to": "end"}
            return {"messages": [out["output"]]} if meta["flagged"] else None

        @hook_config(can_jump_to=["end"])
        async def abefore_model(self, state: Any, runtime: Any) -> dict[str, Any] | None:
            return await asyncio.to_thread(self.before_model, state, runtime)

        @hook_config(can_jump_to=["end"])
        async def aafter_model(self, state: Any, runtime: Any) -> dict[str, Any] | None:
            return await asyncio.to_thread(self.after_model, state, runtime)

    _MIDDLEWARE = SAEGuardMiddleware
    return SAEGuardMiddleware


def __getattr__(name: str) -> Any:
    if name == "SAEGuardMiddleware":
        return _middleware_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["PROMPT_METADATA_KEY", "GuardedChatModel", "GuardedSequence", "SAEGuard", "guard_metadata",
           "message_to_turn", "to_turns"]
