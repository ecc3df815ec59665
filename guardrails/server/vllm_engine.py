"""``guardrails serve --engine vllm``: the server's requests run continuously batched inside a guarded vLLM.

:class:`VLLMScheduler` has the interface of :class:`~guardrails.serving.scheduler.Scheduler` (``submit``
returns a :class:`~guardrails.serving.scheduler.Ticket` that receives the same events and completion), so
the app's routes serve both engines. One thread owns vLLM's ``LLMEngine`` (it is not thread-safe): before
every step it adds the requests that arrived since the last one (an idle engine first waits ``gather_ms``
for companions, so requests sent together start in the same step), then runs ``llm_engine.step()``: one
forward over every running request, prefill chunks and decode rows mixed. Requests join and leave the
running batch at any step (vLLM's continuous batching; vLLM's ``max_num_seqs`` caps the batch and
queues the rest).

Streaming never sends a token the guard has not scored. A token sampled in step ``s`` is the input of step
``s + 1``, whose forward scores it; a block there ends the request in that step (the logits processor
forces EOS). So while a request runs, only its tokens before the last one are released; when it ends, its
verdict is read back from the worker (one ``collective_rpc`` per step for all requests that ended in it)
and :meth:`~guardrails.vllm.guarded.GuardedVLLM.finish` cuts the output right before a tripping token.
Stop strings are checked on the released text the same way (the request is then aborted in vLLM).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from guardrails.serving.scheduler import (
    Completion,
    Event,
    FinishReason,
    ThreadedScheduler,
    Ticket,
    _first_stop,
    _held_back,
)

logger = logging.getLogger(__name__)

SAMPLING_KEYS = ("do_sample", "temperature", "top_p", "top_k", "seed")
"""Sampling settings a vLLM request takes (``GuardedVLLM.prepare``'s keyword arguments)."""


def is_vllm_guard(guard: Any) -> bool:
    """True for a :class:`~guardrails.vllm.guarded.GuardedVLLM` (checked without importing vLLM)."""
    return type(guard).__module__.startswith("guardrails.vllm") and hasattr(guard, "prepare")


@dataclass
class _Live:
    """A request inside the engine."""

    ticket: Ticket
    req: Any
    """Its :class:`~guardrails.vllm.guarded.PreparedRequest`."""
    request_id: str
    prompt_tokens: int
    sent: str = ""


class VLLMScheduler(ThreadedScheduler):
    """Runs server requests in a guarded vLLM engine, continuously batched (see the module docstring)."""

    thread_name = "guardrails-vllm"

    def __init__(self, guard: Any, *, policy: str | None = None, gather_ms: float = 2.0,
                 max_queue: int = 256) -> None:
        if policy is not None and policy not in guard.policies:
            raise ValueError(f"policy: {policy!r} is not loaded; loaded: {', '.join(guard.policies)}")
        super().__init__(guard, gather_ms=gather_ms, max_queue=max_queue)
        self.policy = policy
        """The loaded policy every request runs under (None: the guard's default)."""
        self.engine = guard.llm.llm_engine
        self._waiting: list[tuple[Ticket, Any]] = []
        self._live: dict[str, _Live] = {}
        self._judges_pool: ThreadPoolExecutor | None = None
        """Threads asking the cascade's judges (never the engine's thread); shut down by :meth:`close`."""
        self._sent_before: dict[int, str] = {}
        """Per ticket queued again by the cascade: the text its first pass streamed."""

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._waiting)

    def _drain(self) -> list[Ticket]:
        left, self._waiting = self._waiting, []
        return [t for t, _ in left]

    # -- submission -----------------------------------------------------------------------------------
    def submit(self, prompt: str, *, max_new_tokens: int, sampling: dict[str, Any] | None = None,
               stop: list[str] | tuple[str, ...] = (), sink: Callable[[Event], None] | None = None) -> Ticket:
        """Queue one request (``prompt`` already formatted); returns its :class:`Ticket`.

        ``sampling``: ``do_sample``, ``temperature``, ``top_p``, ``top_k``, ``seed`` (the server's
        ``req.sampling()``); the prompt is tokenized here, so a bad one fails before it queues.
        """
        from guardrails.serving.prompts import check_generation_args, check_text

        check_text(prompt, "prompt")
        kw = dict(sampling or {})
        unknown = sorted(set(kw) - set(SAMPLING_KEYS))
        if unknown:
            raise ValueError(f"sampling: unknown settings {unknown} for the vLLM engine; "
                             f"valid: {', '.join(SAMPLING_KEYS)}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        check_generation_args([prompt], max_new_tokens, kw.get("temperature", 1.0), kw.get("top_p", 1.0),
                              kw.get("top_k", 0))
        from guardrails.vllm.cascade import holds

        hold = holds(self.guard.judges, bool(kw.get("do_sample")), kw.get("seed"))
        req = self.guard.prepare(prompt, policy=self.policy, max_new_tokens=max_new_tokens, hold_bands=hold, **kw)
        limit = getattr(getattr(self.engine, "model_config", None), "max_model_len", None)
        if isinstance(limit, int) and len(req.prompt_ids) + max_new_tokens + 1 > limit:
            raise ValueError(f"the prompt has {len(req.prompt_ids)} tokens and max_tokens is {max_new_tokens}: "
                             f"together (plus the one token the guard scores the last with) over the engine's "
                             f"max_model_len {limit}")
        ticket = Ticket(prompt, max_new_tokens, kw, tuple(x for x in stop if x), sink, next(self._ids))
        with self._cond:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            if len(self._waiting) + len(self._live) >= self.max_queue:
                raise OverflowError(f"{len(self._waiting) + len(self._live)} requests are queued or running "
                                    f"(max_queue={self.max_queue})")
            self._waiting.append((ticket, req))
            self._cond.notify_all()
        if self._thread is None:
            self.start()
        return ticket

    # -- the thread -----------------------------------------------------------------------------------
    def _take(self) -> list[tuple[Ticket, Any]] | None:
        """Requests to add before the next step (None: closed). Idle: wait for one, then for companions."""
        with self._cond:
            if not self._live:
                while not self._waiting and not self._closed:
                    self._cond.wait()
            if self._closed:
                return None
            idle = not self._live
        waited, seen = 0, -1
        while idle and self.gather_s > 0 and waited < 10:  # let requests sent together arrive together
            with self._cond:
                n = len(self._waiting)
            if n == seen:
                break
            seen = n
            time.sleep(self.gather_s)
            waited += 1
        with self._cond:
            new, self._waiting = self._waiting, []
            return new

    def _loop(self) -> None:
        while True:
            new = self._take()
            if new is None:
                self._fail_all("server shutting down")
                return
            try:
                self._step(new)
            except Exception as exc:  # the engine failed: every request in it gets the error
                logger.exception("vLLM step failed")
                self._fail_all(f"{type(exc).__name__}: {exc}")

    def _add(self, ticket: Ticket, req: Any) -> None:
        rid = f"guardrails-{ticket.uid}-{req.key[:8]}"
        prompt = req.prompt
        pre = getattr(self.guard.llm, "_preprocess_cmpl_one", None)  # vLLM's own rendering (no deprecation note)
        if pre is not None:
            prompt = pre(prompt, None)
        self.engine.add_request(rid, prompt, req.params)
        with self._cond:
            self._live[rid] = _Live(ticket, req, rid, len(req.prompt_ids), self._sent_before.pop(ticket.uid, ""))

    def _step(self, new: list[tuple[Ticket, Any]]) -> None:
        for ticket, req in new:
            if ticket.cancelled:
                self._count("cancelled")
                ticket.emit(Event("done", completion=Completion("", "cancelled", None, 0, 0)))
                continue
            try:
                self._add(ticket, req)
            except Exception as exc:
                self._count("error")
                ticket.fail(f"{type(exc).__name__}: {exc}")
        ended: list[tuple[_Live, list[int], FinishReason | None, str | None]] = []
        for lv in list(self._live.values()):
            if lv.ticket.cancelled:  # the client went away: out of the batch before this step
                self.engine.abort_request([lv.request_id])
                ended.append((lv, [], "cancelled", None))
        self._end(ended)
        if not self._live:
            return
        self._record_batch(len(self._live))
        outs = self.engine.step()
        ended = []
        for out in outs:
            found = self._live.get(out.request_id)
            if found is None:
                continue
            lv = found
            ids = list(out.outputs[0].token_ids)
            if out.finished:
                ended.append((lv, ids, None, None))
                continue
            cut = self._advance(lv, ids[:-1])  # the last token is scored by the next step
            if cut is not None:
                self.engine.abort_request([lv.request_id])
                ended.append((lv, ids[:-1], "stop", cut))
        self._end(ended)

    def _advance(self, lv: _Live, scored: list[int]) -> str | None:
        """Release the new scored text of a running request; the text up to a stop string when one appeared."""
        t = lv.ticket
        text = self.guard.tokenizer.decode(scored[: t.max_new_tokens], skip_special_tokens=True)
        cut = _first_stop(text, t.stop)
        if cut is not None:
            return text[:cut]
        if not text.endswith("\ufffd"):  # an incomplete UTF-8 sequence waits for the next token
            self._send(lv, text[: len(text) - _held_back(text, t.stop)])
        return None

    def _send(self, lv: _Live, text: str) -> None:
        if len(text) > len(lv.sent) and text.startswith(lv.sent):
            piece, lv.sent = text[len(lv.sent):], text
            lv.ticket.emit(Event("piece", piece))

    def _end(self, ended: list[tuple[_Live, list[int], FinishReason | None, str | None]]) -> None:
        """Finish requests that ended this step: one verdict read-back for all of them."""
        if not ended:
            return
        with self._cond:
            for lv, *_ in ended:
                self._live.pop(lv.request_id, None)
        from guardrails.vllm.cascade import held

        verdicts = self.guard.verdicts([lv.req.key for lv, *_ in ended])
        for lv, ids, reason, cut in ended:
            verdict = verdicts.get(lv.req.key)
            if verdict is None:  # cancelled before any step ran it
                self._count(reason or "cancelled")
                lv.ticket.emit(Event("done", completion=Completion("", reason or "cancelled", None,
                                                                   lv.prompt_tokens, 0)))
                continue
            result = self.guard.result(lv.req, ids, verdict, sequence=0)
            if reason is None and held(result):  # the cascade (judges bound): judge off this thread, then run again
                self._judge_later(lv.ticket, result, lv.sent)
                continue
            self._complete(lv, self.guard._audit(result), reason, cut)

    # -- the cascade (guardrails.vllm.cascade): a band hit held in the first pass, judged, run again ----------
    def _judge_later(self, ticket: Ticket, result: Any, sent: str) -> None:
        with self._cond:
            if self._closed:  # close() has shut the pool down: this request ends like the other waiting ones
                pool = None
            else:
                if self._judges_pool is None:
                    self._judges_pool = ThreadPoolExecutor(4, thread_name_prefix="guardrails-vllm-judge")
                pool = self._judges_pool
                fut = pool.submit(self._judge_and_requeue, ticket, result, sent)
        if pool is None:
            ticket.fail("server shutting down")
            return

        def cancelled(f: Future[None]) -> None:  # by close() before it started
            if f.cancelled():
                ticket.fail("server shutting down")

        fut.add_done_callback(cancelled)

    def close(self, timeout: float = 30.0) -> None:
        """As :meth:`ThreadedScheduler.close`; then the judge threads: calls not started are cancelled and their
        requests end with ``error``, calls under way end by the policy's judge timeout (their requests end with
        ``error``, as nothing is queued again after close) and the pool's threads are not waited for."""
        super().close(timeout)
        with self._cond:
            pool, self._judges_pool = self._judges_pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def _judge_and_requeue(self, ticket: Ticket, result: Any, sent: str) -> None:
        """Ask the judges about the held band hits; queue the request again with their outcomes preset (``sent``:
        the text the first pass streamed, which the second pass repeats and does not send again)."""
        from guardrails.vllm.cascade import band_verdicts

        try:
            policy = self.guard.policies[result.policy]
            judged = band_verdicts(policy, self.guard.judges, self.guard.judge_prompt(ticket.prompt), result,
                                   self.guard.tokenizer)
            req = self.guard.prepare(ticket.prompt, policy=self.policy, max_new_tokens=ticket.max_new_tokens,
                                     judged=judged, **ticket.sampling)
        except Exception as exc:  # the request fails alone
            logger.exception("cascade judge")
            with self._cond:
                self._count("error")
            ticket.fail(f"{type(exc).__name__}: {exc}")
            return
        with self._cond:
            closed = self._closed
            if not closed:
                self._sent_before[ticket.uid] = sent
                self._waiting.append((ticket, req))
                self._cond.notify_all()
        if closed:
            ticket.fail("server shutting down")

    def _complete(self, lv: _Live, result: Any, reason: FinishReason | None, cut: str | None) -> None:
        t = lv.ticket
        n_out = len(result.output_ids)
        if result.blocked:
            reason = "content_filter"
            t.emit(Event("piece", ("\n" if lv.sent else "") + result.text))
            out = result.text
        elif reason == "cancelled":
            out = result.text
        else:
            out = result.text if cut is None else cut
            if cut is None:
                stop_at = _first_stop(out, t.stop)
                if stop_at is not None:
                    out, reason = out[:stop_at], "stop"
                else:
                    reason = "length" if n_out >= t.max_new_tokens else "stop"
            self._send(lv, out)
        assert reason is not None
        self._count(reason)
        t.emit(Event("done", completion=Completion(out, reason, result, lv.prompt_tokens, n_out)))

    def _fail_all(self, why: str) -> None:
        with self._cond:
            live, self._live = list(self._live.values()), {}
        if live:
            try:
                self.engine.abort_request([lv.request_id for lv in live])
            except Exception:  # the engine is gone: nothing left to abort
                logger.exception("abort after a failed step")
        for lv in live:
            self._count("error")
            lv.ticket.emit(Event("done", completion=Completion("", "error", None, lv.prompt_tokens, 0, why)))
