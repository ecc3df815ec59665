"""Append-only audit trail of guarded generations and scans: SQLite (WAL), records chained by sha256.

Each record is one canonical JSON text (:mod:`.records`). Its hash is ``sha256(prev_hash + body)``
where ``prev_hash`` is the hash of the record before it ("0" * 64 for the first), so editing, deleting
or reordering any record breaks the chain from there on: :meth:`AuditStore.verify` names the first bad
record (:mod:`.chain`). Every other column is derived from the body and checked against it, and the
filters read the body, not the columns (:mod:`.schema`). Triggers abort UPDATE, DELETE and any INSERT
that is not the next append (``INSERT OR REPLACE`` included), and the store has no API for either.
Removing records at the *end* leaves a valid shorter chain: keep the head (:meth:`AuditStore.head`,
``guardrails audit export --head FILE``) elsewhere and pass it to ``verify(head=...)``.

Concurrency: every write runs in ``BEGIN IMMEDIATE`` (the database write lock is taken before the last
hash is read, so two writers, threads or processes, never chain to the same record) with a busy
timeout; one connection per store and process, guarded by a lock whose waits are bounded too.
Fork-safe: a fork waits until no thread of the parent is inside the store, and the child never touches
the parent's connection (it opens its own; the inherited one is kept open but unused, as SQLite
requires; :mod:`.forksafe`). Durability: ``synchronous=FULL`` with WAL (one fsync per record, small next to a
generation). A failed open or write names its likely cause, read from the file system (:mod:`.diagnose`).
"""

from __future__ import annotations

import builtins
import json
import logging
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from guardrails.audit import forksafe
from guardrails.audit.chain import Head, VerifyResult, chain_hash, read_head, verify_records, verify_rows, write_head
from guardrails.audit.diagnose import failure_cause
from guardrails.audit.records import (
    ACTIONS,
    SINCE_FORMS,
    _clean,
    build_generation_record,
    build_scan_record,
    canonical_json,
    format_time,
    json_line,
    parse_since,
    sha256_text,
    utc_now,
)
from guardrails.audit.schema import COLUMNS, GENESIS, SCHEMA, SCHEMA_VERSION, derived_columns, where_clause
from guardrails.audit.schema import split_schema as _split_schema
from guardrails.core.errors import GuardrailsError

logger = logging.getLogger(__name__)

DEFAULT_BUSY_TIMEOUT_S = 30.0
MAX_SQL_INT = 2**63 - 1
"""Largest id or limit SQLite can hold."""


class AuditError(GuardrailsError, RuntimeError):
    """The audit store cannot be opened, read or written; the message names the database path and cause."""


@dataclass(frozen=True)
class AuditRecord:
    """One stored record."""

    id: int
    """Sequence number, 1, 2, 3... (no gaps)."""
    time: str
    """UTC time of writing, ISO 8601 with microseconds and a ``Z``."""
    hash: str
    """sha256 hex of ``prev_hash + body``."""
    prev_hash: str
    """Hash of the previous record (``"0" * 64`` for the first)."""
    data: dict[str, Any]
    """The record body (see :func:`build_generation_record`); ``{"unreadable": why}`` for a broken row."""

    @property
    def policy(self) -> str:
        p = self.data.get("policy")
        return str(p.get("name", "")) if isinstance(p, Mapping) else ""

    @property
    def action(self) -> str:
        return str(self.data.get("action", ""))

    @property
    def readable(self) -> bool:
        """False when the stored body could not be read (a tampered row; ``verify`` says more)."""
        return "unreadable" not in self.data or len(self.data) != 1

    def to_dict(self) -> dict[str, Any]:
        """The body plus ``prev_hash`` and ``hash`` (one line of the JSONL export)."""
        return {**self.data, "prev_hash": self.prev_hash, "hash": self.hash}


def _check_int(value: Any, what: str) -> int:
    if type(value) is not int or not 1 <= value <= MAX_SQL_INT:
        raise ValueError(f"{what} must be an integer in 1..{MAX_SQL_INT}, got {value!r}")
    return value


class AuditStore:
    """Append-only, hash-chained audit records in one SQLite file (see the module docstring).

    ``readonly=True`` opens an existing database for reading (list, get, export, verify) and never
    creates one. Usable as a context manager; safe to share between threads; a forked child opens its
    own connection.
    """

    def __init__(self, path: str | os.PathLike[str], *, readonly: bool = False,
                 busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S) -> None:
        self.path = Path(path)
        self.readonly = readonly
        if not 0 < float(busy_timeout_s) < 86_400:
            raise ValueError(f"busy_timeout_s must be in (0, 86400) seconds, got {busy_timeout_s!r}")
        self.busy_timeout_s = float(busy_timeout_s)
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        self._closed = False
        if readonly and not self.path.is_file():
            raise AuditError(f"audit database {str(self.path)!r} not found"
                             + (" (not a regular file)" if self.path.exists() else ""))
        if self.path.exists() and not self.path.is_file():
            raise AuditError(f"audit database {str(self.path)!r} is not a regular file")
        if not readonly:
            parent = self.path.resolve().parent
            if not parent.is_dir():
                raise AuditError(f"cannot create audit database {str(self.path)!r}: directory {str(parent)!r} "
                                 "does not exist")
        forksafe.track(self)
        with self._locked():
            self._connection()

    # -- connection ----------------------------------------------------------------------------------------
    @contextmanager
    def _locked(self) -> Iterator[None]:
        lock = self._lock
        if not lock.acquire(timeout=self.busy_timeout_s):
            raise AuditError(f"audit database {str(self.path)!r}: another thread held the store for more than "
                             f"{self.busy_timeout_s:g} s (busy_timeout_s)")
        try:
            yield
        finally:
            lock.release()

    def _cause(self, exc: BaseException) -> str:
        """The likely cause of a failed open or write, from the file system itself (not SQLite's words)."""
        return failure_cause(self.path, exc, self.busy_timeout_s)

    def _error(self, exc: BaseException, doing: str) -> AuditError:
        cause = self._cause(exc)
        where = f"audit database {str(self.path)!r}: cannot {doing}"
        return AuditError(f"{where}: {exc}" + (f" ({cause})" if cause else ""))

    def _connection(self) -> sqlite3.Connection:
        if self._closed:
            raise AuditError(f"audit store {str(self.path)!r} is closed")
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        if self._conn is not None:  # inherited over fork without the hook: keep it open, never use it
            forksafe.keep_inherited(self._conn)
        self._conn = None
        conn = None
        try:
            if self.readonly:
                conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True,
                                       isolation_level=None, check_same_thread=False)
            else:
                conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
            if not self.readonly:
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise AuditError(f"audit database {str(self.path)!r}: WAL mode not available (got {mode})")
                conn.execute("PRAGMA synchronous = FULL")
                conn.execute("BEGIN IMMEDIATE")
                try:
                    for stmt in _split_schema(SCHEMA):
                        conn.execute(stmt)
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
            else:
                conn.execute("SELECT count(*) FROM records").fetchone()
        except (sqlite3.Error, OSError) as exc:
            if conn is not None:
                conn.close()
            raise self._error(exc, "open") from exc
        self._conn, self._pid = conn, os.getpid()
        return conn

    def close(self) -> None:
        """Close the store; later calls raise :class:`AuditError`. Safe to call twice."""
        with self._locked():
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None
            self._closed = True

    def __enter__(self) -> AuditStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing -------------------------------------------------------------------------------------------
    def check_writable(self) -> None:
        """Raise :class:`AuditError` unless a record could be written now (open, writable, lock obtainable).

        For callers that release text before recording (streams): check first, record after.
        """
        if self.readonly:
            raise AuditError(f"audit database {str(self.path)!r} is opened read-only")
        with self._locked():
            conn = self._connection()
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("ROLLBACK")
            except sqlite3.Error as exc:
                raise self._error(exc, "write") from exc

    def record(self, result: Any, guard: Any) -> int:
        """Append a record of a guarded generation (a ``GenerationResult``); return its id.

        Raises :class:`AuditError` when the record cannot be written: the caller must then not release
        the text as if it had been recorded.
        """
        return self.append(build_generation_record(result, guard))

    def record_scan(self, text_score: Any, guard: Any, text: str, kind: str) -> int:
        """Append a record of a text scanned by a text guard (``kind``: e.g. input, output); return its id."""
        if not isinstance(kind, str) or not kind:
            raise ValueError("kind must be a non-empty string such as 'input' or 'output'")
        return self.append(build_scan_record(text_score, guard, text, kind))

    def append(self, body: Mapping[str, Any]) -> int:
        """Append a record body (a JSON-able mapping with at least ``action`` and ``policy.name``)."""
        data = _clean(body)
        if not isinstance(data, dict):
            raise TypeError(f"an audit record body must be a mapping, got {type(body).__name__}")
        data.pop("id", None)
        data.pop("time", None)
        with self._locked():
            if self.readonly:
                raise AuditError(f"audit database {str(self.path)!r}: cannot write an audit record: "
                                 "the store is opened read-only")
            conn = self._connection()
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    row = conn.execute("SELECT id, hash FROM records ORDER BY id DESC LIMIT 1").fetchone()
                    rid, prev = (row[0] + 1, row[1]) if row else (1, GENESIS)
                    full = {**data, "id": rid, "time": utc_now()}
                    text = canonical_json(full)
                    cols = derived_columns(full)
                    conn.execute(
                        f"INSERT INTO records ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                        (*(cols[c] for c in COLUMNS[:7]), text, prev, chain_hash(prev, text)),
                    )
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            except (sqlite3.Error, OSError) as exc:
                raise self._error(exc, "write an audit record") from exc
        logger.debug("audit record %d written to %s", rid, self.path)
        return int(rid)

    # -- reading -------------------------------------------------------------------------------------------
    @staticmethod
    def _row(row: tuple[Any, ...]) -> AuditRecord:
        rid, time, body, prev, h = row
        data: Any
        try:
            if not isinstance(body, str):
                raise ValueError(f"body stored as {type(body).__name__}, not text")
            data = json.loads(body)
            if not isinstance(data, dict):
                raise ValueError(f"body is a JSON {type(data).__name__}, not an object")
        except (ValueError, RecursionError) as exc:
            data = {"unreadable": f"{exc} (run 'guardrails audit verify')"}
        return AuditRecord(id=int(rid) if isinstance(rid, int) else -1, time=str(time), hash=str(h),
                           prev_hash=str(prev), data=data)

    def _query(self, sql: str, args: Iterable[Any] = ()) -> builtins.list[tuple[Any, ...]]:
        with self._locked():
            conn = self._connection()
            try:
                return conn.execute(sql, tuple(args)).fetchall()
            except sqlite3.Error as exc:
                raise self._error(exc, "read") from exc

    def get(self, id: int) -> AuditRecord:
        """The record with ``id``; ``KeyError`` when there is none."""
        rows = []
        if type(id) is int and 1 <= id <= MAX_SQL_INT:
            rows = self._query("SELECT id, time, body, prev_hash, hash FROM records WHERE id = ?", (id,))
        if not rows:
            n = self.count()
            raise KeyError(f"no audit record {id!r} in {str(self.path)!r}; valid ids: "
                           + (f"1..{n}" if n else "none (empty)"))
        return self._row(rows[0])

    def count(self) -> int:
        return int(self._query("SELECT count(*) FROM records")[0][0])

    def head(self) -> Head | None:
        """Id and hash of the newest record (``None`` when empty); keep it to detect truncation."""
        rows = self._query("SELECT id, hash FROM records ORDER BY id DESC LIMIT 1")
        return Head(int(rows[0][0]), str(rows[0][1])) if rows else None

    def write_head(self, path: str | os.PathLike[str]) -> Head | None:
        """Write :meth:`head` to a file (see :func:`guardrails.audit.chain.write_head`); return it."""
        h = self.head()
        if h is not None:
            write_head(path, h)
        return h

    def iter_records(self, *, policy: str | None = None, action: str | None = None,
                     since: str | datetime | None = None, rule: str | None = None) -> Iterator[AuditRecord]:
        """All matching records in id order (read in one snapshot)."""
        where, args = where_clause(policy, action, since, rule)
        for row in self._query(f"SELECT id, time, body, prev_hash, hash FROM records{where} ORDER BY id", args):
            yield self._row(row)

    def export_jsonl(self, out: str | os.PathLike[str] | IO[str]) -> int:
        """Write every record, in id order, as JSON lines (``AuditRecord.to_dict()``); return the count."""
        n = 0
        if isinstance(out, str | os.PathLike):
            with open(out, "w", encoding="utf-8") as fh:
                return self.export_jsonl(fh)
        for rec in self.iter_records():
            out.write(json_line(rec.to_dict(), sort_keys=True) + "\n")
            n += 1
        return n

    def verify(self, head: Head | str | os.PathLike[str] | None = None) -> VerifyResult:
        """Recompute the chain over every record and column (one snapshot); name the first bad record.

        ``head``: a :class:`Head` or a head file; the chain must still hold that record with that hash.
        """
        if head is not None and not isinstance(head, Head):
            head = read_head(head)
        types = ", ".join(f"typeof({c})" for c in COLUMNS)
        rows = self._query(f"SELECT {', '.join(COLUMNS)}, {types} FROM records ORDER BY id")
        return verify_rows(rows, head)

    def list(self, policy: str | None = None, action: str | None = None, since: str | datetime | None = None,
             limit: int | None = 100, *, rule: str | None = None) -> builtins.list[AuditRecord]:
        """Matching records, newest first. ``action``: one of :data:`ACTIONS` (any decision with it);
        ``rule``: a rule id (exact); ``since``: datetime, ISO date/time or a duration back (``12h``, ``7d``)."""
        where, args = where_clause(policy, action, since, rule)
        sql = f"SELECT id, time, body, prev_hash, hash FROM records{where} ORDER BY id DESC"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(_check_int(limit, "limit"))
        return [self._row(r) for r in self._query(sql, args)]


__all__ = [
    "ACTIONS", "DEFAULT_BUSY_TIMEOUT_S", "GENESIS", "MAX_SQL_INT", "SCHEMA_VERSION", "SINCE_FORMS", "AuditError",
    "AuditRecord", "AuditStore", "Head", "VerifyResult", "build_generation_record", "build_scan_record",
    "canonical_json", "chain_hash", "format_time", "parse_since", "read_head", "sha256_text", "utc_now",
    "verify_records", "write_head",
]
