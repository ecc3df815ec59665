"""The FastAPI app: OpenAI-compatible (chat) completions under the guard, a scan endpoint, health, metrics.

``create_app(guard, config)`` serves one :class:`~guardrails.serving.generation.GuardedModel` (engine
``hf``) or one :class:`~guardrails.vllm.guarded.GuardedVLLM` (engine ``vllm``). Local mode generates with
the batching :class:`~guardrails.serving.scheduler.Scheduler` (hf) or the continuously batching
:class:`~guardrails.server.vllm_engine.VLLMScheduler` (vllm; routes in :mod:`guardrails.server.local`); proxy mode
(``config.upstream``) forwards to another OpenAI-compatible server and scans what goes there and what
comes back (:mod:`guardrails.server.proxy`). Answers follow OpenAI's schema, plus a ``guardrails`` field
with the decisions; a block answers the refusal with ``finish_reason: "content_filter"``.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException
except ImportError as exc:  # pragma: no cover
    raise ImportError("the server needs fastapi and uvicorn: pip install 'sae-guardrails[server]'") from exc

from guardrails.core.semantics import is_block, is_flag
from guardrails.server.config import ServerConfig
from guardrails.server.local import (
    Kind,
    check_chat,
    check_completion,
    completion_body,
    stream_events,
    submit,
    wait_done,
)
from guardrails.server.metrics import Metrics
from guardrails.server.schemas import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    GuardCheckRequest,
    clean,
    parse_body,
)
from guardrails.server.vllm_engine import VLLMScheduler, is_vllm_guard
from guardrails.serving.scheduler import Scheduler

if TYPE_CHECKING:
    from guardrails.serving.generation import GuardedModel

logger = logging.getLogger(__name__)


class ServerState:
    """What the routes share: the guard, its scheduler, limits, metrics, live stream count."""

    def __init__(self, guard: GuardedModel, config: ServerConfig, scheduler: Any) -> None:
        self.guard = guard
        self.engine = "vllm" if is_vllm_guard(guard) else "hf"
        self.scan_guard = _scan_view(guard)
        """The guard with its own tokenizer copy, for work outside the scheduler thread (prompt checks,
        scans): a fast tokenizer's padding settings are shared state, so a call without padding on another
        thread can break the scheduler's padded batch encode."""
        self.config = config
        self.metrics = Metrics()
        self.scheduler = scheduler
        self.streams = 0
        self.inflight = 0
        self.started = time.time()
        self.proxy: Any = None
        if config.upstream:
            from guardrails.server.proxy import Upstream

            self.proxy = Upstream(config)


def _scan_view(guard: GuardedModel) -> GuardedModel:
    view = copy.copy(guard)  # same model, scorers, lock and audit store (and a GuardedVLLM's prompt spans)
    try:
        view.tokenizer = copy.deepcopy(guard.tokenizer)
    except Exception:  # a tokenizer wrapper that cannot be copied (vLLM's): shared, it is never padded there
        if not is_vllm_guard(guard):
            raise
    return view


def create_app(guard: GuardedModel, config: ServerConfig | None = None, *,
               scheduler: Scheduler | VLLMScheduler | None = None) -> FastAPI:
    """A FastAPI app serving ``guard`` (see the module docstring); the scheduler starts with the app."""
    cfg = config or ServerConfig()
    if is_vllm_guard(guard) and cfg.upstream:
        raise ValueError("proxy mode (upstream) scans with the HF model: serve a GuardedModel, not a GuardedVLLM")
    if scheduler is None and not cfg.upstream:
        if is_vllm_guard(guard):  # vLLM's max_num_seqs caps its batch
            scheduler = VLLMScheduler(guard, gather_ms=cfg.gather_ms, max_queue=cfg.max_inflight)
        else:
            scheduler = Scheduler(guard, max_batch=cfg.max_batch, gather_ms=cfg.gather_ms, max_queue=cfg.max_inflight)
    state = ServerState(guard, cfg, scheduler)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if state.scheduler is not None:
            state.scheduler.start()
        try:
            yield
        finally:
            if state.scheduler is not None:
                await asyncio.to_thread(state.scheduler.close)
            if state.proxy is not None:
                await state.proxy.aclose()

    app = FastAPI(title="sae-guardrails", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.guardrails = state

    def error_response(exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status,
                            headers={"WWW-Authenticate": "Bearer"} if exc.status == 401 else None)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        state.metrics.requests.labels(request.url.path, str(exc.status)).inc()
        if exc.status >= 500:
            state.metrics.errors.labels(exc.type).inc()
        else:
            state.metrics.errors.labels("request").inc()
        return error_response(exc)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error_response(APIError(exc.status_code, str(exc.detail), code="not_found"
                                       if exc.status_code == 404 else None))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:  # pragma: no cover
        return error_response(APIError(400, str(exc)))

    def authorize(request: Request) -> None:
        key = cfg.api_key
        if not key:
            return
        got = request.headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    async def read_body(request: Request) -> bytes:
        limit = cfg.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"the body has {declared} bytes; the limit is {limit}", code="body_too_large")
        chunks, n = [], 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > limit:
                raise APIError(413, f"the body is over the limit of {limit} bytes", code="body_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    # -- routes ---------------------------------------------------------------------------------------------
    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "policy": guard.policy.name, "model": cfg.model_name,
                "mode": "proxy" if cfg.upstream else "local", "engine": state.engine,
                "queued": state.scheduler.queued if state.scheduler else 0, "streams": state.streams,
                "uptime_s": round(time.time() - state.started, 1)}

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        authorize(request)
        body, ctype = state.metrics.render()
        return Response(body, media_type=ctype)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        state.metrics.requests.labels("/v1/models", "200").inc()
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model",
                                            "created": int(state.started), "owned_by": "sae-guardrails"}]}

    @app.post("/v1/guard/check")
    async def guard_check(request: Request) -> JSONResponse:
        t0 = time.perf_counter()
        authorize(request)
        req = parse_body(await read_body(request), GuardCheckRequest)
        if state.engine == "vllm":
            raise APIError(501, "/v1/guard/check is not served by --engine vllm (scans run the HF model); "
                           "serve a scanner with --engine hf", code="not_implemented")
        results = await asyncio.to_thread(check_texts, state.scan_guard, req, cfg)
        for r in results:
            state.metrics.decisions(r["_decisions"])
        out = [{k: v for k, v in r.items() if not k.startswith("_")} for r in results]
        state.metrics.requests.labels("/v1/guard/check", "200").inc()
        state.metrics.latency.labels("/v1/guard/check").observe(time.perf_counter() - t0)
        return JSONResponse(clean({"id": f"guardcheck-{uuid.uuid4().hex[:24]}", "object": "guard.check",
                                   "model": cfg.model_name, "policy": guard.policy.name, "scope": req.scope,
                                   "results": out}))

    def admit(req: ChatCompletionRequest | CompletionRequest) -> None:
        if state.inflight >= cfg.max_inflight:
            raise APIError(429, f"{state.inflight} requests in flight (limit {cfg.max_inflight}); retry later",
                           type="rate_limit_error", code="too_many_requests")
        if req.stream and state.streams >= cfg.max_streams:
            raise APIError(429, f"{state.streams} streams open (limit {cfg.max_streams}); retry later",
                           type="rate_limit_error", code="too_many_streams")

    async def local(request: Request, req: ChatCompletionRequest | CompletionRequest, prompt: str,
                    max_tokens: int, kind: Kind, t0: float) -> Response:
        """Queue a checked, admitted request and answer it (JSON or a stream)."""
        ticket, events = submit(state, prompt, req, max_tokens)
        meta = {"id": f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}",
                "created": int(time.time()), "model": cfg.model_name}
        path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
        if not req.stream:
            state.inflight += 1
            try:
                done = await wait_done(request, ticket, events)
            finally:
                state.inflight -= 1
            if done is None:  # the client went away; its row was cancelled
                return Response(status_code=499)
            body = completion_body(state, meta, done, kind)
            state.metrics.latency.labels(path).observe(time.perf_counter() - t0)
            if ticket.first_piece is not None:
                state.metrics.ttft.observe(ticket.first_piece - ticket.submitted)
            return JSONResponse(clean(body))
        state.streams += 1
        state.inflight += 1
        state.metrics.streams.set(state.streams)
        return StreamingResponse(stream_events(state, meta, ticket, events, req, t0, kind),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        t0 = time.perf_counter()
        authorize(request)
        req = parse_body(await read_body(request), ChatCompletionRequest)
        prompt, max_tokens = check_chat(state.scan_guard, req, cfg, proxy=state.proxy is not None)
        admit(req)
        if state.proxy is not None:
            from guardrails.server.proxy import proxy_chat

            return await proxy_chat(state, request, req, prompt, t0)
        return await local(request, req, prompt, max_tokens, "chat", t0)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        t0 = time.perf_counter()
        authorize(request)
        req = parse_body(await read_body(request), CompletionRequest)
        if state.proxy is not None:
            raise APIError(501, "/v1/completions is not served in proxy mode; use /v1/chat/completions",
                           code="not_implemented")
        prompt, max_tokens = check_completion(state.scan_guard, req, cfg)
        admit(req)
        return await local(request, req, prompt, max_tokens, "text", t0)

    return app


# -- the scan endpoint ---------------------------------------------------------------------------------------


def check_texts(guard: GuardedModel, req: GuardCheckRequest, cfg: ServerConfig) -> list[dict[str, Any]]:
    """Scan ``req``'s texts with one prefill each (no generation); one result per text."""
    if (req.input is None) == (req.messages is None):
        raise APIError(400, "give exactly one of 'input' (text or list of texts) and 'messages'", param="input")
    responses: list[str | None]
    if req.messages is not None:
        if len(req.messages) > cfg.max_messages:
            raise APIError(400, f"{len(req.messages)} messages; the limit is {cfg.max_messages}", param="messages")
        msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        if req.scope == "output":
            if msgs[-1]["role"] != "assistant" or len(msgs) < 2:
                raise APIError(400, "scope 'output' with messages: the last message must be the assistant's "
                               "answer, after at least one other turn", param="messages")
            prompts, responses = [_format(guard, msgs[:-1])], [msgs[-1]["content"]]
        else:
            prompts, responses = [_format(guard, msgs)], [None]
        texts = [msgs[-1]["content"]]
        chat = False
    else:
        texts = [req.input] if isinstance(req.input, str) else list(req.input or [])
        if not texts:
            raise APIError(400, "'input' is empty", param="input")
        if len(texts) > cfg.max_messages:
            raise APIError(400, f"{len(texts)} texts; the limit is {cfg.max_messages}", param="input")
        if req.scope == "output":
            if not req.prompt:
                raise APIError(400, "scope 'output' with 'input' needs 'prompt' (the request being answered)",
                               param="prompt")
            prompts, responses, chat = [req.prompt] * len(texts), list(texts), True
        else:
            prompts, responses, chat = list(texts), [None] * len(texts), True
    try:
        scores = guard.score(prompts, responses=responses, chat=chat)
    except (ValueError, TypeError) as exc:
        raise APIError(400, str(exc), param="input" if req.input is not None else "messages") from None
    out = []
    for text, ts in zip(texts, scores, strict=True):
        decisions = [d for d in ts.decisions if req.scope == "input" or d.scope == "output"]
        blocked = any(is_block(d) for d in decisions)
        if guard.audit is not None:
            guard.audit.record_scan(ts, guard, text, req.scope)
        out.append({"blocked": blocked, "flagged": any(is_flag(d) for d in decisions),
                    "scores": dict(ts.scores), "decisions": [d.to_dict() for d in decisions],
                    "errors": list(ts.errors), "_decisions": decisions})
    return out


def _format(guard: GuardedModel, msgs: list[dict[str, str]]) -> str:
    try:
        return guard.format_prompt(msgs)
    except (ValueError, TypeError) as exc:
        raise APIError(400, f"messages: {exc}", param="messages") from None
