"""Chains around an input guard: ``input_guard | rest`` skips ``rest`` on a block; ``refuse_on_block(chain)``
answers the refusal where an input guard inside ``chain`` stopped it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.messages import AIMessage
from langchain_core.runnables import Runnable, RunnableConfig, RunnableSerializable
from langchain_core.runnables.config import (
    ensure_config,
    get_async_callback_manager_for_config,
    get_callback_manager_for_config,
    patch_config,
)
from pydantic import ConfigDict, Field

from guardrails.integrations.langchain.guard import PROMPT_METADATA_KEY, InputBlocked, SAEGuard


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
            guard_config = patch_config(config, callbacks=run.get_child("guard"))
            value, meta = self.first._invoke_meta(input, guard_config, stop=False)
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
            value, meta = await self.first._ainvoke_meta(input, patch_config(config, callbacks=run.get_child("guard")),
                                                          stop=False)
            out = self._blocked_output(meta) if meta["blocked"] else await self.rest.ainvoke(
                value, self._rest_config(config, input, run.get_child("rest")), **kwargs)
        except BaseException as exc:
            await run.on_chain_error(exc)
            raise
        await run.on_chain_end(out)
        return out

    def stream(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Iterator[Any]:
        config = ensure_config(config)
        value, meta = self.first._invoke_meta(input, config, stop=False)
        if meta["blocked"]:
            yield self._blocked_output(meta)
            return
        yield from self.rest.stream(value, self._rest_config(config, input, config.get("callbacks")), **kwargs)

    async def astream(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> AsyncIterator[Any]:
        config = ensure_config(config)
        value, meta = await self.first._ainvoke_meta(input, config, stop=False)
        if meta["blocked"]:
            yield self._blocked_output(meta)
            return
        async for chunk in self.rest.astream(value, self._rest_config(config, input, config.get("callbacks")),
                                             **kwargs):
            yield chunk


class RefuseOnBlock(RunnableSerializable[Any, Any]):
    """``chain`` whose input guards answer the refusal instead of raising :class:`InputBlocked`.

    The refusal comes back as a ``str`` when ``chain`` outputs strings, else as an ``AIMessage`` with
    the guard's metadata. Nothing after the blocking guard runs.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    chain: Runnable[Any, Any] = Field(description="The chain with input guards inside")

    def _answer(self, exc: InputBlocked) -> Any:
        if self.chain.OutputType is str:
            return exc.refusal
        return AIMessage(content=exc.refusal, response_metadata={"guardrails": exc.metadata})

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        try:
            return self.chain.invoke(input, config, **kwargs)
        except InputBlocked as exc:
            return self._answer(exc)

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        try:
            return await self.chain.ainvoke(input, config, **kwargs)
        except InputBlocked as exc:
            return self._answer(exc)

    def stream(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Iterator[Any]:
        try:
            yield from self.chain.stream(input, config, **kwargs)
        except InputBlocked as exc:
            yield self._answer(exc)

    async def astream(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> AsyncIterator[Any]:
        try:
            async for chunk in self.chain.astream(input, config, **kwargs):
                yield chunk
        except InputBlocked as exc:
            yield self._answer(exc)


def refuse_on_block(chain: Runnable[Any, Any]) -> RefuseOnBlock:
    """Wrap ``chain`` so that an input guard inside it answers the refusal (see :class:`RefuseOnBlock`)."""
    return RefuseOnBlock(chain=chain)
