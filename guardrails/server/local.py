"""Local mode: requests checked, queued on the scheduler, answered (JSON or server-sent events).

Serves ``/v1/chat/completions`` (``kind="chat"``) and ``/v1/completions`` (``kind="text"``, the prompt
as given, no chat template) for both engines: the HF :class:`~guardrails.serving.scheduler.Scheduler`
and the vLLM :class:`~guardrails.server.vllm_engine.VLLMScheduler` take the same ``submit`` call and
push the same events. Answers follow OpenAI's schema plus a ``guardrails`` field (verdict, decisions);
a block answers the policy's refusal with ``finish_reason: "content_filter"``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Literal

from guardrails.server.config import ServerConfig
from guardrails.server.schemas import APIError, ChatCompletionRequest, CompletionRequest, clean
from guardrails.serving.scheduler import Completion, Event

if TYPE_CHECKING:
    from fastapi import Request

    from guardrails.server.app import ServerState

Kind = Literal["chat", "text"]
PATHS: dict[str, str] = {"chat": "/v1/chat/completions", "text": "/v1/completions"}


def _limits(req: ChatCompletionRequest | CompletionRequest, cfg: ServerConfig, *, proxy: bool = False) -> int:
    """Checks shared by both routes (model, stop strings, max_tokens); the request's max_tokens."""
    if req.model is not None and req.model != cfg.model_name and not proxy:
        raise APIError(404, f"model {req.model!r} is not served here; valid: {cfg.model_name}", param="model",
                       code="model_not_found")
    stops = req.stops()
    if len(stops) > 4 or any(not s for s in stops):
        raise APIError(400, "'stop' takes up to 4 non-empty strings", param="stop", code="invalid_value")
    max_tokens = req.limit() or cfg.default_max_tokens
    if max_tokens > cfg.max_tokens_limit:
        name = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) is not None else "max_tokens"
        raise APIError(400, f"'{name}' is {max_tokens}; valid: 1..{cfg.max_tokens_limit}", param=name,
                       code="invalid_value")
    return max_tokens


def _prompt_length(guard: Any, prompt: str, cfg: ServerConfig, param: str) -> None:
    n = len(guard.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if n > cfg.max_prompt_tokens:
        raise APIError(400, f"the prompt has {n} tokens; the limit is {cfg.max_prompt_tokens}", param=param,
                       code="context_length_exceeded")
    if n == 0:
        raise APIError(400, "the prompt produced no tokens", param=param)


def check_chat(guard: Any, req: ChatCompletionRequest, cfg: ServerConfig, *,
               proxy: bool = False) -> tuple[str, int]:
    """The prompt text and max_tokens of a chat request, or a 400/404 naming what is wrong."""
    if len(req.messages) > cfg.max_messages:
        raise APIError(400, f"{len(req.messages)} messages; the limit is {cfg.max_messages}", param="messages")
    max_tokens = _limits(req, cfg, proxy=proxy)
    for i, m in enumerate(req.messages):
        if not m.text().strip():
            raise APIError(400, f"messages[{i}].content is empty", param=f"messages[{i}].content")
    try:
        prompt = guard.format_prompt(req.chat_messages())
    except (ValueError, TypeError) as exc:
        raise APIError(400, f"messages: {exc}", param="messages") from None
    _prompt_length(guard, prompt, cfg, "messages")
    return prompt, max_tokens


def check_completion(guard: Any, req: CompletionRequest, cfg: ServerConfig) -> tuple[str, int]:
    """The prompt (as given: no chat template) and max_tokens of a text completion, or a 400/404."""
    max_tokens = _limits(req, cfg)
    prompt = req.text()
    if not prompt.strip():
        raise APIError(400, "'prompt' is empty", param="prompt")
    _prompt_length(guard, prompt, cfg, "prompt")
    return prompt, max_tokens


def submit(state: ServerState, prompt: str, req: ChatCompletionRequest | CompletionRequest,
           max_tokens: int) -> tuple[Any, asyncio.Queue[Event]]:
    """Queue a request on the scheduler; its events arrive on an asyncio queue of the running loop."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()

    def sink(ev: Event) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed (server shutting down)
            loop.call_soon_threadsafe(events.put_nowait, ev)

    assert state.scheduler is not None
    try:
        ticket = state.scheduler.submit(prompt, max_new_tokens=max_tokens, sampling=req.sampling(),
                                        stop=req.stops(), sink=sink)
    except OverflowError as exc:
        raise APIError(429, str(exc), type="rate_limit_error", code="too_many_requests") from None
    except (ValueError, TypeError) as exc:
        raise APIError(400, str(exc)) from None
    return ticket, events


async def wait_done(request: Request, ticket: Any, events: asyncio.Queue[Event]) -> Completion | None:
    """The completion of a non-streaming request; None (and the row cancelled) if the client left."""

    async def completion() -> Completion:
        while True:
            ev = await events.get()
            if ev.kind == "done":
                assert ev.completion is not None
                return ev.completion

    async def disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    done_task = asyncio.ensure_future(completion())
    gone_task = asyncio.ensure_future(disconnect())
    try:
        await asyncio.wait({done_task, gone_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone_task.cancel()
        if not done_task.done():
            done_task.cancel()
            ticket.cancel()  # the client went away (or the handler was cancelled): free the row
    return done_task.result() if not done_task.cancelled() else None


def guard_field(guard: Any, done: Completion) -> dict[str, Any]:
    """The ``guardrails`` field of an answer: the verdict and every decision."""
    r = done.result
    if r is None:
        return {"policy": guard.policy.name, "blocked": False, "flagged": False, "steered": False,
                "decisions": [], "errors": [done.error] if done.error else []}
    return {"policy": r.policy, "blocked": r.blocked, "flagged": r.flagged, "steered": r.steered,
            "decisions": [d.to_dict() for d in r.decisions], "errors": list(r.errors)}


def _failed(state: ServerState, done: Completion, kind: Kind) -> APIError:
    state.metrics.errors.labels("internal").inc()
    state.metrics.requests.labels(PATHS[kind], "500").inc()
    return APIError(500, f"generation failed: {done.error}", type="server_error", code="generation_failed")


def completion_body(state: ServerState, meta: dict[str, Any], done: Completion, kind: Kind = "chat") -> dict[str, Any]:
    if done.finish_reason == "error":
        raise _failed(state, done, kind)
    record(state, done)
    state.metrics.requests.labels(PATHS[kind], "200").inc()
    if kind == "chat":
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": done.text, "refusal": None},
                                  "logprobs": None, "finish_reason": done.finish_reason}
    else:
        choice = {"index": 0, "text": done.text, "logprobs": None, "finish_reason": done.finish_reason}
    return {**meta, "object": "chat.completion" if kind == "chat" else "text_completion", "system_fingerprint": None,
            "choices": [choice], "usage": usage(done), "guardrails": guard_field(state.guard, done)}


def usage(done: Completion) -> dict[str, int]:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


def record(state: ServerState, done: Completion) -> None:
    if done.result is not None:
        state.metrics.decisions(done.result.decisions)
    state.metrics.tokens.inc(done.completion_tokens)


def sse(obj: Any) -> bytes:
    return f"data: {json.dumps(clean(obj), ensure_ascii=False)}\n\n".encode()


def chunk(meta: dict[str, Any], delta: dict[str, Any], finish: str | None = None, kind: Kind = "chat",
          **extra: Any) -> dict[str, Any]:
    """One streamed chunk: a chat delta, or (``kind="text"``) a text completion piece."""
    if kind == "text":
        return {**meta, "object": "text_completion", "system_fingerprint": None,
                "choices": [{"index": 0, "text": delta.get("content", ""), "logprobs": None,
                             "finish_reason": finish}], **extra}
    return {**meta, "object": "chat.completion.chunk", "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}


async def stream_events(state: ServerState, meta: dict[str, Any], ticket: Any, events: asyncio.Queue[Event],
                        req: ChatCompletionRequest | CompletionRequest, t0: float,
                        kind: Kind = "chat") -> AsyncIterator[bytes]:
    """SSE chunks as OpenAI sends them; the slot and the row are freed however the stream ends."""
    finished = False
    path = PATHS[kind]
    try:
        if kind == "chat":
            yield sse(chunk(meta, {"role": "assistant", "content": ""}))
        while True:
            ev = await events.get()
            if ev.kind == "piece":
                if ev.text:
                    yield sse(chunk(meta, {"content": ev.text}, kind=kind))
                continue
            done = ev.completion
            assert done is not None
            finished = True
            if done.finish_reason == "error":
                yield sse(_failed(state, done, kind).body())
                yield b"data: [DONE]\n\n"
                return
            record(state, done)
            state.metrics.requests.labels(path, "200").inc()
            yield sse(chunk(meta, {}, done.finish_reason, kind, guardrails=guard_field(state.guard, done)))
            if req.stream_options is not None and req.stream_options.include_usage:
                yield sse({**meta, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                           "system_fingerprint": None, "choices": [], "usage": usage(done)})
            yield b"data: [DONE]\n\n"
            if ticket.first_piece is not None:
                state.metrics.ttft.observe(ticket.first_piece - ticket.submitted)
            state.metrics.latency.labels(path).observe(time.perf_counter() - t0)
            return
    finally:
        if not finished:
            ticket.cancel()  # the client went away mid-stream: its row stops at the next step
        state.streams -= 1
        state.inflight -= 1
        state.metrics.streams.set(state.streams)
