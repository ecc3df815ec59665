"""Batched concurrency: one scheduler thread runs the guarded decode loop over batches of requests.

Requests queue in :meth:`Scheduler.submit`; the thread takes the oldest waiting request plus every other
waiting request with the same sampling settings (up to ``max_batch``), and runs them as one left-padded
batch through :func:`guardrails.serving.decode.steps`. Each row has its own guard state (the
:class:`~guardrails.engine.run.GuardRun` tracks windows, latches and blocks per row), its own
``max_new_tokens``, stop strings and cancel flag; a row that ends early is finalized at once (its
result is exactly what a serial run with its own limit gives) while the others go on. Arrivals during
a batch wait for the next one. The batch stops as soon as every row has ended or was cancelled, which
drops its KV cache; hooks exist only during each forward, so nothing stays registered.

Why results equal serial runs: rows of a left-padded batch never attend to each other; a row that
reaches its own limit at step ``n`` has had exactly the forwards a serial run with ``max_new_tokens=n``
has (the serial run's last forward stops at the deepest watched layer, which scores the same).
Sampled rows share one random generator per batch, so a request with a ``seed`` runs in a batch of its
own (then its draws equal a serial run with that seed); greedy rows batch freely.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Self

import torch

from guardrails.serving.result import GenerationResult

if TYPE_CHECKING:
    from guardrails.serving.generation import GuardedModel

logger = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "content_filter", "cancelled", "error"]


class Completion(NamedTuple):
    """The end of one request."""

    text: str
    """What the caller gets: the output (cut before a stop string) or the refusal when blocked."""
    finish_reason: FinishReason
    """``stop`` (end of sequence or a stop string), ``length``, ``content_filter`` (blocked), ``cancelled``,
    ``error``."""
    result: GenerationResult | None
    """The guarded generation's full result (decisions, scores) as of the row's end; None on ``error``."""
    prompt_tokens: int
    """Prompt length in tokens."""
    completion_tokens: int
    """Released output tokens."""
    error: str | None = None
    """Why the request failed (``finish_reason == "error"``)."""


class Event(NamedTuple):
    """What a ticket receives: text pieces as they are released, then one completion."""

    kind: Literal["piece", "done"]
    """``piece``: ``text`` is new output; ``done``: ``completion`` is set and nothing follows."""
    text: str = ""
    """The new text (``piece``)."""
    completion: Completion | None = None
    """The end of the request (``done``)."""


def sampling_key(sampling: dict[str, Any], uid: int) -> tuple[Any, ...]:
    """Requests with equal keys may share a batch: equal settings, and no seed when sampling."""
    greedy = not sampling.get("do_sample") or sampling.get("temperature") == 0
    if not greedy and sampling.get("seed") is not None:
        return ("seeded", uid)  # one generator per batch: a seeded draw must not depend on neighbours
    rest = {k: v for k, v in sampling.items() if not (greedy and k == "seed")}
    return (greedy, *sorted((k, repr(v)) for k, v in rest.items()))


@dataclass
class Ticket:
    """One submitted request: the scheduler pushes :class:`Event` s to ``sink``; ``cancel()`` ends it."""

    prompt: str
    """The prompt as the model sees it (after the chat template)."""
    max_new_tokens: int
    sampling: dict[str, Any]
    stop: tuple[str, ...] = ()
    sink: Callable[[Event], None] | None = None
    """Called on the scheduler thread for every event (must not block); default: an internal queue."""
    uid: int = 0
    submitted: float = field(default_factory=time.perf_counter)
    first_piece: float | None = None
    """perf_counter time of the first released text (time to first token)."""
    completion: Completion | None = None
    _queue: queue.Queue[Event] = field(default_factory=queue.Queue)
    _cancelled: threading.Event = field(default_factory=threading.Event)
    _done: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Stop this request (a client went away); its row stops at the next step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def emit(self, event: Event) -> None:
        if event.kind == "piece" and self.first_piece is None:
            self.first_piece = time.perf_counter()
        if event.kind == "done":
            self.completion = event.completion
        (self.sink or self._queue.put)(event)
        if event.kind == "done":
            self._done.set()

    def fail(self, why: str) -> None:
        """End this request with ``error`` and no output (the server shutting down, a failure before it ran)."""
        self.emit(Event("done", completion=Completion("", "error", None, 0, 0, why)))

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Events as they come (only without a ``sink``); stops after ``done``."""
        while True:
            ev = self._queue.get(timeout=timeout)
            yield ev
            if ev.kind == "done":
                return

    def wait(self, timeout: float | None = None) -> Completion:
        """Block until the request ends; its completion."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.uid} did not finish within {timeout} s")
        assert self.completion is not None
        return self.completion


class _Row:
    """Per-row bookkeeping inside one batch."""

    def __init__(self, ticket: Ticket, prompt_tokens: int) -> None:
        self.ticket = ticket
        self.prompt_tokens = prompt_tokens
        self.sent = ""  # text already handed out as pieces
        self.ended = False


class ThreadedScheduler:
    """What both engines' schedulers share: one worker thread, a condition guarding the waiting queue, the
    lifecycle (``start``, ``close``, context manager) and the counters the server's metrics read.
    Subclasses implement ``_loop`` (the thread) and ``_drain`` (the requests ``close`` ends)."""

    thread_name = "guardrails-scheduler"

    def __init__(self, guard: Any, *, gather_ms: float, max_queue: int) -> None:
        self.guard = guard
        self.gather_s = gather_ms / 1000
        self.max_queue = max_queue
        self._cond = threading.Condition()
        self._closed = False
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self.batches_run = 0
        """Batches (engine steps) run so far (for tests and metrics)."""
        self.batch_sizes: list[int] = []
        """Requests in each batch (engine step) run (the last 1,000)."""
        self.finish_counts: dict[str, int] = {}
        """How many requests ended with each finish reason."""

    # -- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> Self:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=self.thread_name, daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float = 30.0) -> None:
        """Stop the thread; requests still waiting (and, per engine, running) end with ``error``."""
        with self._cond:
            self._closed = True
            left = self._drain()
            self._cond.notify_all()
        for t in left:
            t.fail("server shutting down")
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._cond:
            late = self._drain()
        for t in late:
            t.fail("server shutting down")

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _count(self, reason: str) -> None:
        self.finish_counts[reason] = self.finish_counts.get(reason, 0) + 1

    def _record_batch(self, size: int) -> None:
        self.batches_run += 1
        self.batch_sizes = [*self.batch_sizes[-999:], size]

    def _drain(self) -> list[Ticket]:
        """Take the waiting tickets out of the queue (called holding ``_cond``)."""
        raise NotImplementedError

    def _loop(self) -> None:
        raise NotImplementedError


class Scheduler(ThreadedScheduler):
    """Gathers waiting requests into batched guarded decode steps (see the module docstring)."""

    def __init__(self, guard: GuardedModel, *, max_batch: int = 16, gather_ms: float = 2.0,
                 max_queue: int = 256) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        super().__init__(guard, gather_ms=gather_ms, max_queue=max_queue)
        self.guard: GuardedModel = guard
        self.max_batch = max_batch
        self._waiting: list[Ticket] = []

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._waiting)

    def _drain(self) -> list[Ticket]:
        left, self._waiting = self._waiting, []
        return left

    # -- submission -----------------------------------------------------------------------------------
    def submit(self, prompt: str, *, max_new_tokens: int, sampling: dict[str, Any] | None = None,
               stop: list[str] | tuple[str, ...] = (), sink: Callable[[Event], None] | None = None) -> Ticket:
        """Queue one request (``prompt`` already formatted); returns its :class:`Ticket`.

        ``sampling``: ``model.generate`` keyword arguments (``do_sample``, ``temperature`` (0 = greedy),
        ``top_p``, ``top_k``, ``seed``...), checked here so a bad value fails before the request queues.
        """
        from guardrails.serving.prompts import check_text

        check_text(prompt, "prompt")
        kw = dict(sampling or {})
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        self._args({**kw, "max_new_tokens": max_new_tokens}, 1)  # raises on a bad setting
        stops = tuple(x for x in stop if x)
        ticket = Ticket(prompt, max_new_tokens, kw, stops, sink, next(self._ids))
        with self._cond:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            if len(self._waiting) >= self.max_queue:
                raise OverflowError(f"{len(self._waiting)} requests are waiting (max_queue={self.max_queue})")
            self._waiting.append(ticket)
            self._cond.notify_all()
        if self._thread is None:
            self.start()
        return ticket

    def _args(self, kwargs: dict[str, Any], batch_size: int) -> Any:
        make = getattr(self.guard, "generation_args", None)
        if make is None:  # an older GuardedModel: the loop takes a plain dict
            return {"do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "seed": None, **kwargs}
        return make(kwargs, batch_size=batch_size)

    # -- the thread -----------------------------------------------------------------------------------
    def _take(self) -> list[Ticket] | None:
        with self._cond:
            while not self._waiting and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
        # let requests sent together arrive together: wait while they keep coming (at most 10 gather periods)
        waited, seen = 0, -1
        while self.gather_s > 0 and waited < 10:
            with self._cond:
                n = len(self._waiting)
            if n == seen or n >= self.max_batch:
                break
            seen = n
            time.sleep(self.gather_s)
            waited += 1
        with self._cond:
            self._waiting = [t for t in self._waiting if not t.cancelled or self._drop(t)]
            if not self._waiting:
                return []
            key = sampling_key(self._waiting[0].sampling, self._waiting[0].uid)
            batch = [t for t in self._waiting if sampling_key(t.sampling, t.uid) == key][: self.max_batch]
            taken = {id(t) for t in batch}
            self._waiting = [t for t in self._waiting if id(t) not in taken]
            return batch

    @staticmethod
    def _drop(t: Ticket) -> bool:
        t.emit(Event("done", completion=Completion("", "cancelled", None, 0, 0)))
        return False

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            if not batch:
                continue
            try:
                self.run_batch(batch)
            except Exception as exc:  # the batch failed as a whole: every unfinished row gets the error
                logger.exception("batch of %d failed", len(batch))
                for t in batch:
                    if t.completion is None:
                        t.fail(f"{type(exc).__name__}: {exc}")

    def run_batch(self, tickets: list[Ticket]) -> None:
        """Run ``tickets`` (same sampling settings) as one batch, finalizing each row when it ends."""
        guard = self.guard
        tok = guard.tokenizer
        self._record_batch(len(tickets))
        prompts = [t.prompt for t in tickets]
        rows = [_Row(t, len(tok(t.prompt, add_special_tokens=False)["input_ids"])) for t in tickets]
        limit = max(t.max_new_tokens for t in tickets)
        args = self._args({**tickets[0].sampling, "max_new_tokens": limit}, len(tickets))
        with torch.inference_mode():
            steps = guard._steps(prompts, limit, args)
            try:
                for step, (run, released, done) in enumerate(steps):
                    for b, row in enumerate(rows):
                        if not row.ended:
                            self._advance(row, b, step, run, released[b], done)
                    if all(r.ended for r in rows):
                        break
            finally:
                steps.close()  # drops the KV cache early when every row ended before the limit

    def _advance(self, row: _Row, b: int, step: int, run: Any, ids: list[int], done: bool) -> None:
        t = row.ticket
        if t.cancelled:
            self._finish(row, b, run, ids, "cancelled")
            return
        blocked = not run.active(b)
        eos = len(ids) < step and not blocked  # the row ended with its end-of-sequence token
        text = self.guard.tokenizer.decode(ids, skip_special_tokens=True)
        cut = _first_stop(text, t.stop)
        if cut is not None:
            self._send(row, text[:cut])
            self._finish(row, b, run, ids, "stop", text[:cut])
            return
        if not text.endswith("\ufffd"):  # an incomplete UTF-8 sequence waits for the next token
            self._send(row, text[: len(text) - _held_back(text, t.stop)])
        if blocked:
            self._finish(row, b, run, ids, "content_filter")
        elif eos or (done and len(ids) < t.max_new_tokens):  # done early: every row's last token was eos
            self._finish(row, b, run, ids, "stop", text)
        elif step >= t.max_new_tokens or done:
            self._finish(row, b, run, ids, "length", text)

    def _send(self, row: _Row, text: str) -> None:
        if len(text) > len(row.sent) and text.startswith(row.sent):
            piece, row.sent = text[len(row.sent):], text
            row.ticket.emit(Event("piece", piece))

    def _finish(self, row: _Row, b: int, run: Any, ids: list[int], reason: FinishReason,
                text: str | None = None) -> None:
        row.ended = True
        self._count(reason)
        guard = self.guard
        result = guard._result(run, b, row.ticket.prompt, list(ids))
        # the row's place in the batch is no business of the request: number it as a run of its own
        result.decisions = [dataclasses.replace(d, sequence=0) for d in result.decisions]
        result = guard._audit(result)
        if result.blocked:
            reason = "content_filter"  # an audit failure under on_error: block also blocks
        if reason == "content_filter":
            refusal = ("\n" if row.sent else "") + result.text
            row.ticket.emit(Event("piece", refusal))
            out = result.text
        else:
            out = result.text if text is None else text
            if reason != "cancelled":
                self._send(row, out)
        row.ticket.emit(Event("done", completion=Completion(out, reason, result, row.prompt_tokens, len(ids))))


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Index of the earliest stop string in ``text``, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of ``text`` that could still grow into a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if s.startswith(text[-n:]):
                best = n
                break
    return best
