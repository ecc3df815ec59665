"""Fork safety of open audit stores: a fork waits until no thread of the parent is inside a store (each store's lock
is taken before the fork, up to its busy timeout, and released after it in the parent); the child gets fresh locks
and never touches the parent's connections: they are kept open but unused, as SQLite requires, and each store
opens its own on next use."""

from __future__ import annotations

import os
import threading
import weakref
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from guardrails.audit.store import AuditStore

_STORES: weakref.WeakSet[AuditStore] = weakref.WeakSet()
_INHERITED: list[Any] = []  # connections inherited over fork: never closed, never used in the child
_HELD: list[AuditStore] = []


def track(store: AuditStore) -> None:
    """Make ``store`` fork-safe for as long as it lives."""
    _STORES.add(store)


def keep_inherited(conn: Any) -> None:
    """Keep a connection inherited over fork open and unused for the life of the process (closing it in the child
    would touch the parent's database state)."""
    _INHERITED.append(conn)


def _before_fork() -> None:
    for s in list(_STORES):
        if s._lock.acquire(timeout=s.busy_timeout_s):
            _HELD.append(s)


def _after_fork_parent() -> None:
    while _HELD:
        _HELD.pop()._lock.release()


def _after_fork_child() -> None:
    _HELD.clear()
    for s in list(_STORES):
        s._lock = threading.RLock()
        if s._conn is not None:
            keep_inherited(s._conn)
        s._conn = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_parent, after_in_child=_after_fork_child)
