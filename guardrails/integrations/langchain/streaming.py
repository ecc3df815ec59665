"""Streams for LangChain: cutting at stop sequences without showing their start, and async from a thread."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any


def stop_index(text: str, stop: list[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return min(found) if found else None


def partial_stop(text: str, stop: list[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of a stop sequence."""
    return max((n for s in stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)


def cut_stream(stream: Any, stop: list[str] | None, state: dict[str, Any]) -> Iterator[str]:
    """Pieces of a :class:`~guardrails.GuardedStream` up to the first stop sequence (excluded).

    Text that may begin a stop sequence is held back; when the stream ends, ``state["held"]`` holds it
    (shown only if no stop followed) and ``state["cut"]`` says whether a stop sequence was seen. The
    refusal a blocked stream yields last is not passed on (the caller reads ``stream.result``).
    """
    pieces = iter(stream)
    held, cut = "", False
    try:
        for piece in pieces:
            if stream.result is not None:  # the refusal, yielded after the stream's result is set
                break
            if cut:
                continue
            if stop:
                held += piece
                at = stop_index(held, stop)
                if at is not None:
                    piece, held, cut = held[:at], "", True
                else:
                    keep = partial_stop(held, stop)
                    piece, held = held[: len(held) - keep], held[len(held) - keep :]
            if piece:
                yield piece
    finally:
        pieces.close()  # a generator: removes the hooks if we stop early
        state["held"], state["cut"] = held, cut


async def astream_in_thread(make: Callable[[], Iterator[Any]]) -> AsyncIterator[Any]:
    """Run a blocking iterator on one worker thread (the model lock and hooks stay on it) and hand each
    item to the event loop as soon as it is produced; stopping early closes the iterator."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    stop_event = threading.Event()

    def put(item: tuple[str, Any]) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is gone; nobody is listening
            stop_event.set()

    def produce() -> None:
        items = make()
        try:
            for item in items:
                if stop_event.is_set():
                    break
                put(("item", item))
        except BaseException as exc:  # carried to the consumer
            put(("error", exc))
        else:
            put(("done", None))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

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
