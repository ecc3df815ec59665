"""Proxy mode: guard another OpenAI-compatible server (vLLM, a hosted API) with the local model as scanner.

The input is scanned before anything is forwarded (a block answers the refusal; the upstream never sees
the request). The upstream's answer is scanned as it arrives: the local model re-reads prompt + answer so
far (one prefill, stopped at the deepest watched layer) every ``scan_chars`` new characters, and only
text whose tokens were all scored without a block is released, minus the last ``holdback_tokens`` tokens
(whose tokenization may still change when more text comes). At the end the whole answer is scanned once
more before the rest goes out. A block sends the refusal with ``finish_reason: "content_filter"``;
upstream errors and timeouts become OpenAI-style errors, never an unscanned answer.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from guardrails.core.semantics import is_block, is_flag
from guardrails.server.config import ServerConfig
from guardrails.server.schemas import APIError, ChatCompletionRequest, clean

if TYPE_CHECKING:
    from fastapi import Request
    from fastapi.responses import Response

    from guardrails.server.app import ServerState
    from guardrails.serving.generation import GuardedModel


class Upstream:
    """An httpx client for the upstream server."""

    def __init__(self, config: ServerConfig) -> None:
        try:
            import httpx
        except ImportError as exc:  # pragma: no cover
            raise ImportError("proxy mode needs httpx: pip install 'sae-guardrails[server]'") from exc
        assert config.upstream is not None
        headers = {"Authorization": f"Bearer {config.upstream_api_key}"} if config.upstream_api_key else {}
        self.url = config.upstream.rstrip("/")
        self.client = httpx.AsyncClient(base_url=self.url, headers=headers,
                                        timeout=httpx.Timeout(config.upstream_timeout))

    async def aclose(self) -> None:
        await self.client.aclose()


def upstream_error(exc: Exception, url: str) -> APIError:
    import httpx

    if isinstance(exc, httpx.TimeoutException):
        return APIError(504, f"the upstream {url} did not answer in time ({type(exc).__name__})",
                        type="upstream_error", code="upstream_timeout")
    if isinstance(exc, APIError):
        return exc
    return APIError(502, f"the upstream {url} failed: {type(exc).__name__}: {exc}", type="upstream_error",
                    code="upstream_unavailable")


def _status_error(status: int, text: str, url: str) -> APIError:
    try:
        message = json.loads(text)["error"]["message"]
    except Exception:
        message = text[:300]
    return APIError(502, f"the upstream {url} answered {status}: {message}", type="upstream_error",
                    code="upstream_error")


def scan(guard: GuardedModel, prompt: str, response: str | None, kind: str | None = None) -> tuple[list[Any], bool]:
    """Decisions on ``prompt`` (input) or ``response`` to it (output scope only), and whether they block.

    With ``kind``, decisions are also written to the guard's audit store (as a scan of that kind).
    """
    ts = guard.score([prompt], responses=[response], chat=False)[0]
    decisions = [d for d in ts.decisions if response is None or d.scope == "output"]
    if kind is not None and guard.audit is not None:
        guard.audit.record_scan(ts, guard, response if response is not None else prompt, kind)
    return decisions, any(is_block(d) for d in decisions)


def _guard_field(guard: GuardedModel, decisions: list[Any], blocked: bool) -> dict[str, Any]:
    return {"policy": guard.policy.name, "mode": "proxy", "blocked": blocked,
            "flagged": any(is_flag(d) for d in decisions), "steered": False,
            "decisions": [d.to_dict() for d in decisions], "errors": []}


async def proxy_chat(state: ServerState, request: Request, req: ChatCompletionRequest, prompt: str,
                     t0: float) -> Response:
    from fastapi.responses import JSONResponse, StreamingResponse

    guard, cfg, metrics = state.scan_guard, state.config, state.metrics
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
            "model": req.model or cfg.model_name}
    in_decisions, blocked = await asyncio.to_thread(scan, guard, prompt, None, "input")
    metrics.decisions(in_decisions)
    refusal = guard.policy.refusal
    body = req.model_dump(exclude_none=True)
    if blocked:  # the upstream never sees a blocked request
        metrics.requests.labels("/v1/chat/completions", "200").inc()
        field = _guard_field(guard, in_decisions, True)
        if not req.stream:
            return JSONResponse(clean(_completion(meta, refusal, "content_filter", field)))

        async def refused() -> AsyncIterator[bytes]:
            yield _sse(_chunk(meta, {"role": "assistant", "content": refusal}))
            yield _sse(_chunk(meta, {}, "content_filter", guardrails=field))
            yield b"data: [DONE]\n\n"

        return StreamingResponse(refused(), media_type="text/event-stream")
    if not req.stream:
        state.inflight += 1
        try:
            answer = await _post(state, body)
        finally:
            state.inflight -= 1
        try:
            choice = answer["choices"][0]
            text = choice["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError):
            raise APIError(502, f"the upstream {state.proxy.url} answered without choices[0].message",
                           type="upstream_error", code="upstream_error") from None
        out_decisions, out_blocked = (await asyncio.to_thread(scan, guard, prompt, text, "output")) if text else (
            [], False)
        metrics.decisions(out_decisions)
        decisions = in_decisions + out_decisions
        field = _guard_field(guard, decisions, out_blocked)
        metrics.requests.labels("/v1/chat/completions", "200").inc()
        metrics.latency.labels("/v1/chat/completions").observe(time.perf_counter() - t0)
        if out_blocked:
            return JSONResponse(clean(_completion(meta, refusal, "content_filter", field, answer.get("usage"))))
        answer["guardrails"] = field
        return JSONResponse(clean(answer))
    state.streams += 1
    state.inflight += 1
    metrics.streams.set(state.streams)
    return StreamingResponse(_stream(state, body, prompt, meta, in_decisions, t0), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _post(state: ServerState, body: dict[str, Any]) -> dict[str, Any]:
    up = state.proxy
    try:
        r = await up.client.post("/chat/completions", json=body)
    except Exception as exc:
        state.metrics.errors.labels("upstream").inc()
        raise upstream_error(exc, up.url) from None
    if r.status_code != 200:
        state.metrics.errors.labels("upstream").inc()
        raise _status_error(r.status_code, r.text, up.url)
    try:
        out = r.json()
    except ValueError:
        raise APIError(502, f"the upstream {up.url} answered non-JSON", type="upstream_error",
                       code="upstream_error") from None
    if not isinstance(out, dict):
        raise APIError(502, f"the upstream {up.url} answered {type(out).__name__}, not an object",
                       type="upstream_error", code="upstream_error")
    return out


def _safe_end(guard: GuardedModel, text: str, holdback: int) -> int:
    """Characters of ``text`` that may go out: all but the last ``holdback`` tokens."""
    enc = guard.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    if len(offsets) <= holdback:
        return 0
    return int(offsets[-holdback][0])


async def _stream(state: ServerState, body: dict[str, Any], prompt: str, meta: dict[str, Any],
                  in_decisions: list[Any], t0: float) -> AsyncIterator[bytes]:
    guard, cfg, metrics, up = state.scan_guard, state.config, state.metrics, state.proxy
    text = ""  # everything the upstream sent
    sent = 0  # characters released to the client
    scanned = 0  # length of text at the last scan
    decisions: list[Any] = []
    finish: str | None = None
    usage: Any = None
    try:
        yield _sse(_chunk(meta, {"role": "assistant", "content": ""}))
        try:
            async with up.client.stream("POST", "/chat/completions", json={**body, "stream": True}) as r:
                if r.status_code != 200:
                    raise _status_error(r.status_code, (await r.aread()).decode("utf-8", "replace"), up.url)
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    try:
                        obj = json.loads(data)
                    except ValueError:
                        raise APIError(502, f"the upstream {up.url} sent a malformed event", type="upstream_error",
                                       code="upstream_error") from None
                    if "error" in obj:
                        raise _status_error(502, data, up.url)
                    usage = obj.get("usage") or usage
                    for choice in obj.get("choices") or []:
                        text += (choice.get("delta") or {}).get("content") or ""
                        finish = choice.get("finish_reason") or finish
                    if len(text) - scanned >= cfg.scan_chars:
                        scanned = len(text)
                        decisions, blocked = await asyncio.to_thread(scan, guard, prompt, text)
                        if blocked:
                            break
                        end = _safe_end(guard, text, cfg.holdback_tokens)
                        if end > sent:
                            yield _sse(_chunk(meta, {"content": text[sent:end]}))
                            sent = end
        except Exception as exc:
            err = upstream_error(exc, up.url)
            metrics.errors.labels("upstream").inc()
            metrics.requests.labels("/v1/chat/completions", str(err.status)).inc()
            yield _sse(err.body())
            yield b"data: [DONE]\n\n"
            return
        # the whole answer, scanned once more before the rest goes out
        decisions, blocked = (await asyncio.to_thread(scan, guard, prompt, text, "output")) if text else ([], False)
        metrics.decisions(decisions)
        field = _guard_field(guard, in_decisions + decisions, blocked)
        if blocked:
            yield _sse(_chunk(meta, {"content": ("\n" if sent else "") + guard.policy.refusal}))
            finish = "content_filter"
        elif len(text) > sent:
            yield _sse(_chunk(meta, {"content": text[sent:]}))
        yield _sse(_chunk(meta, {}, finish or "stop", guardrails=field))
        if usage is not None and (body.get("stream_options") or {}).get("include_usage"):
            yield _sse({**meta, "object": "chat.completion.chunk", "choices": [], "usage": usage})
        yield b"data: [DONE]\n\n"
        metrics.requests.labels("/v1/chat/completions", "200").inc()
        metrics.latency.labels("/v1/chat/completions").observe(time.perf_counter() - t0)
    finally:
        state.streams -= 1
        state.inflight -= 1
        metrics.streams.set(state.streams)


def _completion(meta: dict[str, Any], text: str, finish: str, field: dict[str, Any],
                usage: Any = None) -> dict[str, Any]:
    return {**meta, "object": "chat.completion", "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                         "logprobs": None, "finish_reason": finish}],
            "usage": usage or {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
            "guardrails": field}


def _chunk(meta: dict[str, Any], delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {**meta, "object": "chat.completion.chunk", "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}


def _sse(obj: Any) -> bytes:
    return f"data: {json.dumps(clean(obj), ensure_ascii=False)}\n\n".encode()
