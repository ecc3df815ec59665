"""Append-only audit trail of guarded generations and scans: SQLite (WAL), records chained by sha256.

Each record is one canonical JSON text (sorted keys, no spaces). Its hash is
``sha256(prev_hash + body)`` where ``prev_hash`` is the hash of the record before it ("0" * 64 for
the first), so editing, deleting or reordering any record breaks the chain from there on:
:meth:`AuditStore.verify` names the first bad record. Triggers abort every UPDATE and DELETE, and the
store has no API for either. Removing records at the *end* leaves a valid shorter chain: keep the
head hash that ``verify()`` returns somewhere else (a log, a ticket) to detect that too.

Concurrency: every write runs in ``BEGIN IMMEDIATE`` (the database write lock is taken before the last
hash is read, so two writers, threads or processes, never chain to the same record) with a busy
timeout; one connection per store and process, guarded by a lock. Durability: ``synchronous=FULL``
with WAL. NORMAL would already survive a killed process (the WAL is in the OS before commit returns)
but may lose the last commits on power loss or an OS crash; an audit trail must not, and FULL costs
one fsync per record, small next to a generation.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import logging
import math
import os
import re
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

logger = logging.getLogger(__name__)

GENESIS = "0" * 64
ACTIONS = ("block", "steer", "flag", "error", "allow")
"""Values of a record's ``action`` (the strongest of its decisions; ``allow`` when none fired)."""
SCHEMA_VERSION = 1
DEFAULT_BUSY_TIMEOUT_S = 60.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY,
    time TEXT NOT NULL,
    kind TEXT NOT NULL,
    policy TEXT NOT NULL,
    action TEXT NOT NULL,
    actions TEXT NOT NULL,
    rules TEXT NOT NULL,
    body TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE
);
CREATE INDEX IF NOT EXISTS records_time ON records(time);
CREATE INDEX IF NOT EXISTS records_policy ON records(policy);
CREATE TRIGGER IF NOT EXISTS records_no_update BEFORE UPDATE ON records
BEGIN SELECT RAISE(ABORT, 'audit records are append-only: UPDATE is not allowed'); END;
CREATE TRIGGER IF NOT EXISTS records_no_delete BEFORE DELETE ON records
BEGIN SELECT RAISE(ABORT, 'audit records are append-only: DELETE is not allowed'); END;
"""


class AuditError(RuntimeError):
    """The audit store cannot be opened, read or written; the message names the database path."""


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
    """The record body (see :func:`build_generation_record`)."""

    @property
    def policy(self) -> str:
        return str(self.data.get("policy", {}).get("name", ""))

    @property
    def action(self) -> str:
        return str(self.data.get("action", ""))

    def to_dict(self) -> dict[str, Any]:
        """The body plus ``prev_hash`` and ``hash`` (one line of the JSONL export)."""
        return {**self.data, "prev_hash": self.prev_hash, "hash": self.hash}


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of checking the hash chain."""

    ok: bool
    """True when every record checked out."""
    checked: int
    """Records read."""
    first_bad: int | None = None
    """Id of the first bad record (or the id expected where one is missing)."""
    reason: str | None = None
    """What is wrong with it."""
    head: str | None = None
    """Hash of the last record (keep it elsewhere to detect removal of the newest records)."""

    def __bool__(self) -> bool:
        return self.ok


# -- canonical form and hashing ------------------------------------------------------------------------------


def _clean(obj: Any) -> Any:
    """JSON-safe copy: non-finite floats become None, tuples lists, keys strings."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if obj is None or isinstance(obj, str | int | bool):
        return obj
    return str(obj)


def canonical_json(obj: Any) -> str:
    """The text that is hashed: sorted keys, no whitespace, UTF-8, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def chain_hash(prev_hash: str, body: str) -> str:
    return hashlib.sha256((prev_hash + body).encode("utf-8")).hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def utc_now() -> str:
    return format_time(datetime.now(UTC))


def format_time(t: datetime) -> str:
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_RELATIVE = re.compile(r"^(\d+)\s*([smhdw])$")
SINCE_FORMS = "YYYY-MM-DD, YYYY-MM-DDTHH:MM[:SS][+00:00], or a duration like 30m, 12h, 7d, 2w"


def parse_since(value: str | datetime, now: datetime | None = None) -> str:
    """A stored-time string from a date, datetime (naive means UTC) or duration back from now."""
    if isinstance(value, datetime):
        return format_time(value)
    text = value.strip()
    m = _RELATIVE.match(text)
    if m:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}[m.group(2)]
        return format_time((now or datetime.now(UTC)) - timedelta(**{unit: int(m.group(1))}))
    try:
        return format_time(datetime.fromisoformat(text.replace("Z", "+00:00")))
    except ValueError:
        raise ValueError(f"invalid --since {value!r}; valid: {SINCE_FORMS}") from None


# -- building records -----------------------------------------------------------------------------------------


def _display_tokens(tokens: list[str], tokenizer: Any) -> list[str]:
    """Readable text of each token (byte-level BPE markers decoded)."""
    out = []
    for t in tokens:
        s = None
        if tokenizer is not None and t is not None:
            try:
                s = tokenizer.convert_tokens_to_string([t])
            except Exception:
                s = None
        if s is None:
            s = str(t).replace("Ġ", " ").replace("Ċ", "\n").replace("▁", " ")
        out.append(s)
    return out


def _summary_action(blocked: bool, steered: bool, decisions: list[dict[str, Any]]) -> str:
    acts = {d.get("action") for d in decisions}
    if blocked:
        return "block"
    if steered or "steer" in acts:
        return "steer"
    if "flag" in acts:
        return "flag"
    if "error" in acts:
        return "error"
    return "allow"


def _guard_meta(guard: Any) -> dict[str, Any]:
    policy = guard.policy
    cfg = getattr(getattr(guard, "model", None), "config", None)
    model = getattr(cfg, "name_or_path", None) or getattr(cfg, "_name_or_path", None) or type(
        getattr(guard, "model", None)).__name__
    saes = {}
    loaded = getattr(guard, "saes", None) or {}
    configs = getattr(guard, "sae_configs", None) or {sid: getattr(s, "cfg", None) for sid, s in loaded.items()}
    for sid, c in configs.items():
        sae = loaded.get(sid, c)  # watched mode keeps only the configs of SAEs it dropped
        spec = policy.saes.get(sid)
        saes[sid] = {
            "repr": repr(sae),
            "path": spec.path if spec else None,
            "layer": spec.layer if spec else getattr(c, "layer", None),
            "architecture": getattr(c, "architecture", None),
            "d_model": getattr(c, "d_model", None),
            "d_sae": getattr(c, "d_sae", None),
            "k": getattr(c, "k", None),
            "trained_on": getattr(c, "model", None),
        }
    rules = {
        r.id: {"threshold": r.threshold, "action": r.action, "scope": r.scope, "description": r.description}
        for r in policy.rules
    }
    return {
        "policy": {"name": policy.name, "version": policy.version, "digest": policy.digest},
        "model": str(model),
        "saes": saes,
        "rules": rules,
        "redacted": bool(policy.redact),
    }


def _trace(
    tokens: list[str], token_scores: Mapping[str, Mapping[int, float]], prompt_length: int, redact: bool,
    tokenizer: Any, token_features: Mapping[int, Any] | None,
) -> dict[str, Any]:
    n = len(tokens)
    for per_pos in token_scores.values():
        if per_pos:
            n = max(n, max(int(p) for p in per_pos) + 1)
    scores: dict[str, list[float | None]] = {}
    for rule, per_pos in token_scores.items():
        row: list[float | None] = [None] * n
        for p, s in per_pos.items():
            if 0 <= int(p) < n and math.isfinite(float(s)):
                row[int(p)] = round(float(s), 6)
        scores[rule] = row
    features = {str(int(p)): [[int(i), round(float(a), 4)] for i, a in fs] for p, fs in (token_features or {}).items()}
    return {
        "n_tokens": n,
        "prompt_length": prompt_length,
        "tokens": None if redact else _display_tokens(list(tokens), tokenizer),
        "scores": scores,
        "features": features,
    }


def _decisions(decisions: Iterable[Any], redact: bool, tokenizer: Any) -> list[dict[str, Any]]:
    out = []
    for d in decisions:
        dd = d.to_dict() if hasattr(d, "to_dict") else dict(d)
        if redact:
            dd["token"] = None
        elif dd.get("token") is not None:
            dd["token"] = _display_tokens([str(dd["token"])], tokenizer)[0]
        out.append(dd)
    return out


def _text_field(text: str | None, redact: bool) -> dict[str, Any]:
    if text is None:
        return {"text": None, "sha256": None}
    return {"text": None if redact else text, "sha256": sha256_text(text)}


def build_generation_record(result: Any, guard: Any) -> dict[str, Any]:
    """The body of a record for a :class:`~guardrails.serving.generation.GenerationResult` (id and time added later)."""
    meta = _guard_meta(guard)
    redact = meta["redacted"]
    decisions = _decisions(result.decisions, redact, getattr(guard, "tokenizer", None))
    return {
        "kind": "generation",
        **meta,
        "input": _text_field(result.prompt, redact),
        "output": {**_text_field(result.text, redact),
                   "released": _text_field(result.released_text, redact)},
        "blocked": bool(result.blocked),
        "steered": bool(result.steered),
        "flagged": any(d["action"] in ("flag", "error") for d in decisions),
        "action": _summary_action(bool(result.blocked), bool(result.steered), decisions),
        "decisions": decisions,
        "errors": list(getattr(result, "errors", []) or []),
        "trace": _trace(result.tokens, result.token_scores, int(result.prompt_length), redact,
                        getattr(guard, "tokenizer", None), getattr(result, "token_features", None)),
    }


def build_scan_record(text_score: Any, guard: Any, text: str, kind: str) -> dict[str, Any]:
    """The body of a record for a text scan (:class:`~guardrails.serving.generation.TextScore`)."""
    meta = _guard_meta(guard)
    redact = meta["redacted"]
    decisions = _decisions(text_score.decisions, redact, getattr(guard, "tokenizer", None))
    blocked = bool(text_score.blocked)
    prompt_length = len(text_score.tokens)  # a scan has no generated tokens: the report shows one text
    return {
        "kind": f"scan:{kind}",
        **meta,
        "input": _text_field(text, redact),
        "output": {"text": None, "sha256": None, "released": {"text": None, "sha256": None}},
        "blocked": blocked,
        "steered": False,
        "flagged": any(d["action"] in ("flag", "error") for d in decisions),
        "action": _summary_action(blocked, False, decisions),
        "decisions": decisions,
        "errors": [],
        "scores": dict(text_score.scores),
        "trace": _trace(text_score.tokens, text_score.token_scores, prompt_length, redact,
                        getattr(guard, "tokenizer", None), getattr(text_score, "token_features", None)),
    }


# -- the store --------------------------------------------------------------------------------------------------


def verify_records(records: Iterable[Mapping[str, Any]]) -> VerifyResult:
    """Check a chain given as record dicts (``AuditRecord.to_dict()`` or JSONL export lines) in id order."""
    prev = GENESIS
    n = 0
    for rec in records:
        n += 1
        body_obj = {k: v for k, v in rec.items() if k not in ("hash", "prev_hash")}
        rid = body_obj.get("id")
        if rid != n:
            return VerifyResult(False, n, n, f"record id {rid!r} where {n} was expected (missing or reordered)")
        if rec.get("prev_hash") != prev:
            return VerifyResult(False, n, n, "prev_hash does not match the hash of the previous record")
        if chain_hash(prev, canonical_json(body_obj)) != rec.get("hash"):
            return VerifyResult(False, n, n, "content does not match its hash (edited)")
        prev = str(rec["hash"])
    return VerifyResult(True, n, head=prev if n else None)


def _where(policy: str | None, action: str | None, since: str | datetime | None, rule: str | None
           ) -> tuple[str, builtins.list[Any]]:
    clauses, args = [], []
    if policy is not None:
        clauses.append("policy = ?")
        args.append(policy)
    if action is not None:
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}; valid: {', '.join(ACTIONS)}")
        clauses.append("(action = ? OR actions LIKE ?)")
        args += [action, f"% {action} %"]
    if rule is not None:
        clauses.append("rules LIKE ?")
        args.append(f"% {rule} %")
    if since is not None:
        clauses.append("time >= ?")
        args.append(parse_since(since))
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", args


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
        self.busy_timeout_s = busy_timeout_s
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        self._closed = False
        if readonly and not self.path.is_file():
            raise AuditError(f"audit database {str(self.path)!r} not found")
        if not readonly:
            parent = self.path.resolve().parent
            if not parent.is_dir():
                raise AuditError(f"cannot create audit database {str(self.path)!r}: directory {str(parent)!r} "
                                 "does not exist")
        with self._lock:
            self._connection()

    # -- connection ----------------------------------------------------------------------------------------
    def _error(self, exc: sqlite3.Error, doing: str) -> AuditError:
        msg = str(exc)
        low = msg.lower()
        if "full" in low:
            hint = " (disk or database full)"
        elif "readonly" in low or "read-only" in low:
            hint = " (the database, its folder or its file system is read-only)"
        elif "unable to open" in low:
            hint = " (missing folder or no permission)"
        elif "locked" in low or "busy" in low:
            hint = f" (still locked by another writer after {self.busy_timeout_s:g} s)"
        else:
            hint = ""
        return AuditError(f"audit database {str(self.path)!r}: cannot {doing}: {msg}{hint}")

    def _connection(self) -> sqlite3.Connection:
        if self._closed:
            raise AuditError(f"audit store {str(self.path)!r} is closed")
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        self._conn = None  # inherited over fork: never use the parent's connection
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
                    for stmt in _split_schema(_SCHEMA):
                        conn.execute(stmt)
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
            else:
                conn.execute("SELECT count(*) FROM records").fetchone()
        except sqlite3.DatabaseError as exc:
            raise self._error(exc, "open") from exc
        self._conn, self._pid = conn, os.getpid()
        return conn

    def close(self) -> None:
        """Close the store; later calls raise :class:`AuditError`. Safe to call twice."""
        with self._lock:
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
        with self._lock:
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
        data.pop("id", None)
        data.pop("time", None)
        action = str(data.get("action", "allow"))
        decisions = data.get("decisions") or []
        actions = " " + " ".join(sorted({str(d.get("action")) for d in decisions} | {action})) + " "
        rules = " " + " ".join(sorted({str(d.get("rule")) for d in decisions})) + " "
        policy = str((data.get("policy") or {}).get("name", ""))
        with self._lock:
            conn = self._connection()
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    row = conn.execute("SELECT id, hash FROM records ORDER BY id DESC LIMIT 1").fetchone()
                    rid, prev = (row[0] + 1, row[1]) if row else (1, GENESIS)
                    now = utc_now()
                    full = {**data, "id": rid, "time": now}
                    text = canonical_json(full)
                    h = chain_hash(prev, text)
                    conn.execute(
                        "INSERT INTO records (id, time, kind, policy, action, actions, rules, body, prev_hash, hash)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (rid, now, str(data.get("kind", "")), policy, action, actions, rules, text, prev, h),
                    )
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise self._error(exc, "write an audit record") from exc
        logger.debug("audit record %d written to %s", rid, self.path)
        return int(rid)

    # -- reading -------------------------------------------------------------------------------------------
    @staticmethod
    def _row(row: tuple[Any, ...]) -> AuditRecord:
        rid, time, body, prev, h = row
        return AuditRecord(id=int(rid), time=str(time), hash=str(h), prev_hash=str(prev), data=json.loads(body))

    def _query(self, sql: str, args: Iterable[Any] = ()) -> builtins.list[tuple[Any, ...]]:
        with self._lock:
            conn = self._connection()
            try:
                return conn.execute(sql, tuple(args)).fetchall()
            except sqlite3.Error as exc:
                raise self._error(exc, "read") from exc

    def get(self, id: int) -> AuditRecord:
        """The record with ``id``; ``KeyError`` when there is none."""
        rows = self._query("SELECT id, time, body, prev_hash, hash FROM records WHERE id = ?", (int(id),))
        if not rows:
            n = self.count()
            raise KeyError(f"no audit record {id} in {str(self.path)!r}; valid ids: "
                           + (f"1..{n}" if n else "none (empty)"))
        return self._row(rows[0])

    def count(self) -> int:
        return int(self._query("SELECT count(*) FROM records")[0][0])

    def iter_records(self, *, policy: str | None = None, action: str | None = None,
                     since: str | datetime | None = None, rule: str | None = None) -> Iterator[AuditRecord]:
        """All matching records in id order (read in one snapshot)."""
        where, args = _where(policy, action, since, rule)
        for row in self._query(f"SELECT id, time, body, prev_hash, hash FROM records{where} ORDER BY id", args):
            yield self._row(row)

    def export_jsonl(self, out: str | os.PathLike[str] | IO[str]) -> int:
        """Write every record, in id order, as JSON lines (``AuditRecord.to_dict()``); return the count."""
        n = 0
        if isinstance(out, str | os.PathLike):
            with open(out, "w", encoding="utf-8") as fh:
                return self.export_jsonl(fh)
        for rec in self.iter_records():
            out.write(json.dumps(rec.to_dict(), ensure_ascii=False, sort_keys=True) + "\n")
            n += 1
        return n

    def verify(self) -> VerifyResult:
        """Recompute the chain over every record (one snapshot); name the first bad record."""
        rows = self._query("SELECT id, time, body, prev_hash, hash, policy, action FROM records ORDER BY id")
        prev = GENESIS
        for n, (rid, time, body, prev_hash, h, policy, action) in enumerate(rows, 1):
            if rid != n:
                return VerifyResult(False, n, n, f"record {n} is missing (next id is {rid})")
            if prev_hash != prev:
                return VerifyResult(False, n, rid, "prev_hash does not match the hash of the previous record")
            if chain_hash(prev, body) != h:
                return VerifyResult(False, n, rid, "content does not match its hash (edited)")
            try:
                data = json.loads(body)
            except json.JSONDecodeError:
                return VerifyResult(False, n, rid, "body is not valid JSON")
            if (data.get("id"), data.get("time"), data.get("action"), (data.get("policy") or {}).get("name")) != (
                    rid, time, action, policy):
                return VerifyResult(False, n, rid, "indexed columns (id, time, action, policy) differ from the body")
            prev = h
        return VerifyResult(True, len(rows), head=prev if rows else None)

    def list(self, policy: str | None = None, action: str | None = None, since: str | datetime | None = None,
             limit: int | None = 100, *, rule: str | None = None) -> builtins.list[AuditRecord]:
        """Matching records, newest first. ``action``: one of :data:`ACTIONS` (any decision with it);
        ``since``: datetime, ISO date/time or a duration back from now (``12h``, ``7d``)."""
        where, args = _where(policy, action, since, rule)
        sql = f"SELECT id, time, body, prev_hash, hash FROM records{where} ORDER BY id DESC"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(int(limit))
        return [self._row(r) for r in self._query(sql, args)]


def _split_schema(script: str) -> builtins.list[str]:
    """Statements of the schema script (triggers contain ';' inside BEGIN ... END)."""
    out, cur = [], ""
    for line in script.strip().splitlines():
        cur += line + "\n"
        if line.rstrip().endswith(";") and (not cur.lstrip().startswith("CREATE TRIGGER") or "END;" in line):
            out.append(cur.strip())
            cur = ""
    return out
