"""``GuardedChatModel``: a LangChain chat model whose every generated token is scored before release.

Follows the chat model conventions: ``max_tokens`` (alias of ``max_new_tokens``), ``temperature=0``
(greedy), ``stop`` sequences that end generation (they become ``stop_strings``; the text is cut before
them), ``streaming=True`` (``invoke`` streams and calls ``on_llm_new_token``), ``bind_tools`` (tool calls
read from the model's ``<tool_call>`` JSON, see :mod:`.tools`) and ``with_structured_output``. Any
``model.generate`` argument passes through ``generation_kwargs`` or as a call keyword.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Generator, Mapping, Sequence
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from pydantic import ConfigDict, Field

from guardrails.core.policy import Policy
from guardrails.integrations.langchain.messages import guard_metadata, to_turns, violation
from guardrails.integrations.langchain.streaming import astream_in_thread, cut_stream
from guardrails.integrations.langchain.tools import (
    first_json,
    json_prompt,
    parse_tool_calls,
    tool_schemas,
    tools_prompt,
)
from guardrails.serving.generation import GenerationResult, GuardedModel

logger = logging.getLogger(__name__)

_GEN_KEYS = ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "seed")
_BIND_KEYS = ("tools", "tool_choice", "response_format", "ls_structured_output_format")


class GuardedChatModel(BaseChatModel):
    """A LangChain chat model over a :class:`~guardrails.GuardedModel` (see the module docstring).

    A block returns an ``AIMessage`` with the refusal (or raises :class:`~guardrails.GuardrailViolation`
    when the policy sets ``raise_on_block: true``); ``response_metadata["guardrails"]`` holds the
    decisions.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, populate_by_name=True)

    guard: GuardedModel = Field(description="The guarded local model (model, tokenizer, policy, SAEs)")
    max_new_tokens: int = Field(default=64, ge=1, alias="max_tokens", description="Most tokens generated per call")
    do_sample: bool = Field(default=False, description="Sample instead of greedy decoding")
    temperature: float = Field(default=1.0, ge=0, description="Sampling temperature (with do_sample); 0 = greedy")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling mass (with do_sample)")
    top_k: int = Field(default=0, ge=0, description="Top-k sampling, 0 = off (with do_sample)")
    seed: int | None = Field(default=None, description="Sampling seed (with do_sample)")
    streaming: bool = Field(default=False, description="invoke() streams the tokens (on_llm_new_token callbacks)")
    generation_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="More model.generate arguments (repetition_penalty, stop_strings, ...)"
    )

    @classmethod
    def from_policy(cls, policy: str | Policy, model: str | None = None, *, audit: Any = None,
                    judges: Mapping[str, Any] | None = None, **fields: Any) -> GuardedChatModel:
        """Load ``model`` (default: the policy's, else the bundled SmolLM2) guarded by ``policy``.

        ``policy``: a path, a shipped policy's name, or a :class:`Policy`; ``audit``: an AuditStore or a
        database path (default: the policy's ``audit.db``, else ``GUARDRAILS_AUDIT_DB``); ``judges``: a cascade
        policy's judges by name (callables or chat models).
        """
        return cls(guard=GuardedModel.from_pretrained(model, policy=policy, audit=audit, judges=judges), **fields)

    @property
    def _llm_type(self) -> str:
        return "sae-guardrails"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self._model_name, "policy": self.guard.policy.name,
                "policy_digest": self.guard.policy.digest, **{k: getattr(self, k) for k in _GEN_KEYS}}

    @property
    def _model_name(self) -> str:
        return model_name(self.guard)

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> Any:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "sae-guardrails"
        params["ls_model_name"] = self._model_name
        params["ls_max_tokens"] = self.max_new_tokens
        params["ls_temperature"] = self.temperature if self.do_sample else 0.0
        return params

    # -- tools and structured output -------------------------------------------------------------------------
    def bind_tools(self, tools: Sequence[Any], *, tool_choice: str | None = None, **kwargs: Any) -> Runnable:
        """Show ``tools`` to the model (a system turn of JSON schemas); its ``<tool_call>`` answers become
        ``AIMessage.tool_calls``. ``tool_choice``: a tool name, "any"/"required" (asks for a call), or None."""
        return self.bind(tools=tool_schemas(tools), tool_choice=tool_choice, **kwargs)

    def with_structured_output(self, schema: Any, *, include_raw: bool = False,
                               method: Literal["json_schema", "function_calling"] = "json_schema",
                               **kwargs: Any) -> Runnable:
        """Answers parsed into ``schema`` (a pydantic model, TypedDict, JSON schema dict or tool).

        ``json_schema`` asks for one JSON object matching the schema and parses the first one in the
        answer; ``function_calling`` binds the schema as a tool and parses its call.
        """
        if method == "function_calling":
            return super().with_structured_output(schema, include_raw=include_raw, **kwargs)
        if kwargs:
            raise TypeError(f"with_structured_output: unknown argument(s) {sorted(kwargs)}")
        from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
        from langchain_core.runnables import RunnableLambda, RunnableMap, RunnablePassthrough
        from pydantic import BaseModel

        fn = tool_schemas([schema])[0]["function"]
        is_model = isinstance(schema, type) and issubclass(schema, BaseModel)
        bound = self.bind(response_format=fn.get("parameters", {}), ls_structured_output_format={
            "kwargs": {"method": method}, "schema": fn})
        base: Any = PydanticOutputParser(pydantic_object=schema) if is_model else JsonOutputParser()

        def parse(message: AIMessage) -> Any:
            value = first_json(str(message.content))
            if value is None:
                raise ValueError(f"the model answered no JSON object: {str(message.content)[:200]!r}")
            return base.parse(json.dumps(value))

        parser = RunnableLambda(parse)
        if not include_raw:
            return bound | parser
        parsed = RunnablePassthrough.assign(parsed=lambda x: parse(x["raw"]), parsing_error=lambda _: None)
        fallback = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=bound) | parsed.with_fallbacks([fallback], exception_key="parsing_error")

    # -- generation ----------------------------------------------------------------------------------------
    def _gen_kwargs(self, kwargs: dict[str, Any], stop: list[str] | None) -> dict[str, Any]:
        """Fields, then ``generation_kwargs``, then call keywords; ``stop`` sequences end generation."""
        gen = {k: getattr(self, k) for k in _GEN_KEYS}
        if self.temperature == 0:
            gen["do_sample"] = False
        if not gen["do_sample"]:
            for k in ("temperature", "top_p", "top_k"):
                gen.pop(k)
        gen.update(self.generation_kwargs)
        gen.update({k: v for k, v in kwargs.items() if k not in _BIND_KEYS})
        if "max_tokens" in gen:
            gen["max_new_tokens"] = gen.pop("max_tokens")
        stops = [s for s in (stop or []) if s]
        if stops:
            extra = gen.get("stop_strings") or []
            gen["stop_strings"] = [*([extra] if isinstance(extra, str) else extra), *stops]
        return gen

    def _turns(self, messages: list[BaseMessage], kwargs: dict[str, Any]) -> list[dict[str, str]]:
        turns = to_turns(messages, "messages")
        notes = []
        if kwargs.get("tools"):
            notes.append(tools_prompt(kwargs["tools"]))
            choice = kwargs.get("tool_choice")
            if choice in ("any", "required"):
                notes.append("Call one of the functions.")
            elif isinstance(choice, str) and choice not in ("auto", "none"):
                notes.append(f"Call the function {choice!r}.")
        if kwargs.get("response_format") is not None:
            notes.append(json_prompt(kwargs["response_format"]))
        if notes:
            if turns[0]["role"] == "system":
                turns = [{"role": "system", "content": turns[0]["content"] + "\n\n" + "\n".join(notes)}, *turns[1:]]
            else:
                turns = [{"role": "system", "content": "\n".join(notes)}, *turns]
        return turns

    def _metadata(self, result: GenerationResult, max_new: int, stopped: bool) -> dict[str, Any]:
        finish = ("blocked" if result.blocked else "stop" if stopped else
                  "length" if len(result.output_ids) >= max_new else "stop")
        return {"guardrails": guard_metadata(result, self.guard.policy), "model_name": self._model_name,
                "finish_reason": finish}

    def _usage(self, result: GenerationResult) -> Any:
        n_in, n_out = result.prompt_length, len(result.output_ids)
        return {"input_tokens": n_in, "output_tokens": n_out, "total_tokens": n_in + n_out}

    def _check(self, result: GenerationResult) -> None:
        if result.blocked:
            logger.warning("policy %r blocked a generation", result.policy)
            if self.guard.policy.raise_on_block:
                raise violation(self.guard.policy, result.decisions, result, "generation")
        elif result.decisions:
            logger.info("policy %r: %s", result.policy, ", ".join(f"{d.action} {d.rule}" for d in result.decisions))

    def _message(self, text: str, result: GenerationResult, meta: dict[str, Any], kwargs: dict[str, Any],
                 cls: type = AIMessage) -> Any:
        if result.blocked or not kwargs.get("tools"):
            return cls(content=text, response_metadata=meta, usage_metadata=self._usage(result))
        names = [t["function"]["name"] for t in kwargs["tools"]]
        parsed = parse_tool_calls(text, names)
        extra: dict[str, Any] = {}
        if cls is AIMessageChunk:
            extra["tool_call_chunks"] = [
                {"name": c["name"], "args": json.dumps(c["args"]), "id": c["id"], "index": i, "type": "tool_call_chunk"}
                for i, c in enumerate(parsed.tool_calls)
            ]
        else:
            extra = {"tool_calls": parsed.tool_calls, "invalid_tool_calls": parsed.invalid}
        if parsed.tool_calls:
            meta = {**meta, "finish_reason": "tool_calls"}
        return cls(content=parsed.text, response_metadata=meta, usage_metadata=self._usage(result), **extra)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if self.streaming:
            from langchain_core.language_models.chat_models import generate_from_stream

            return generate_from_stream(self._stream(messages, stop, run_manager, **kwargs))
        gen = self._gen_kwargs(kwargs, stop)
        result = self.guard.generate(self._turns(messages, kwargs), **gen)
        assert isinstance(result, GenerationResult)
        self._check(result)
        text, stopped = (result.text, False) if result.blocked else _cut_at_stop(result.text, stop)
        meta = self._metadata(result, int(gen.get("max_new_tokens", 64)), stopped)
        message = self._message(text, result, meta, kwargs)
        return ChatResult(generations=[ChatGeneration(message=message)], llm_output={"guardrails": meta["guardrails"]})

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if self.streaming:
            from langchain_core.language_models.chat_models import agenerate_from_stream

            return await agenerate_from_stream(self._astream(messages, stop, run_manager, **kwargs))
        # the blocking generation runs on a worker thread; the event loop stays free
        return await asyncio.to_thread(self._generate, messages, stop, None, **kwargs)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Generator[ChatGenerationChunk, None, None]:
        gen = self._gen_kwargs(kwargs, stop)
        stream = self.guard.stream(self._turns(messages, kwargs), **gen)
        tools = bool(kwargs.get("tools"))
        shown: list[str] = []
        state: dict[str, Any] = {}
        for piece in cut_stream(stream, stop, state):
            shown.append(piece)
            if tools:
                continue  # tool calls are parsed from the whole answer, sent in the last chunk
            if run_manager is not None:
                run_manager.on_llm_new_token(piece)
            yield ChatGenerationChunk(message=AIMessageChunk(content=piece))
        result = stream.result
        assert result is not None
        self._check(result)
        if result.blocked:
            last = ("\n" if result.released_text and not tools else "") + result.text
        else:
            last = "".join(shown) if tools else state["held"]
        meta = self._metadata(result, int(gen.get("max_new_tokens", 64)), bool(state.get("cut")))
        chunk = self._message(last, result, meta, kwargs, cls=AIMessageChunk)
        chunk.chunk_position = "last"
        if run_manager is not None and chunk.content:
            run_manager.on_llm_new_token(str(chunk.content))
        yield ChatGenerationChunk(message=chunk)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        async for chunk in astream_in_thread(lambda: self._stream(messages, stop, None, **kwargs)):
            if run_manager is not None and chunk.text:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk


def model_name(guard: GuardedModel) -> str:
    """The model's id (``HuggingFaceTB/SmolLM2-135M-Instruct`` for the bundled one), else its class name."""
    cfg = guard.model.config
    return str(getattr(cfg, "_name_or_path", "") or type(guard.model).__name__)


def _cut_at_stop(text: str, stop: list[str] | None) -> tuple[str, bool]:
    from guardrails.integrations.langchain.streaming import stop_index

    at = stop_index(text, stop) if stop else None
    return (text, False) if at is None else (text[:at], True)

