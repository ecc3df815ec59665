"""The hash chain: ``hash = sha256(prev_hash + body)``, checked row by row, and the head file.

:func:`verify_rows` checks stored rows (every column: its SQLite type, the chain, and each derived
column against the body); :func:`verify_records` checks an exported chain (JSONL lines). Neither raises
on tampered input: each returns a :class:`VerifyResult` naming the first bad record and why.

Removing the newest records leaves a valid, shorter chain; a *head file* (:func:`write_head`, written
by ``guardrails audit export --head FILE`` or ``audit verify --save-head FILE``) keeps the id and hash
of the newest record elsewhere, and ``verify(head=...)`` fails when that record is gone or changed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from guardrails.audit.records import canonical_json, chain_hash
from guardrails.audit.schema import COLUMN_TYPES, COLUMNS, GENESIS, derived_columns


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


class Head(NamedTuple):
    """The newest record of a chain, kept outside the database."""

    id: int
    """Its id (the number of records then)."""
    hash: str
    """Its hash."""


def _hex64(x: Any) -> bool:
    return isinstance(x, str) and len(x) == 64 and all(c in "0123456789abcdef" for c in x)


def verify_rows(rows: Iterable[Sequence[Any]], head: Head | None = None) -> VerifyResult:
    """Check stored rows: ``(*COLUMNS, *typeof(column) for each column)`` in id order."""
    prev = GENESIS
    n = 0
    hashes: dict[int, str] = {}
    for n, row in enumerate(rows, 1):
        values = dict(zip(COLUMNS, row[: len(COLUMNS)], strict=True))
        types = dict(zip(COLUMNS, row[len(COLUMNS):], strict=True))
        rid = values["id"]
        where = rid if isinstance(rid, int) else n
        for col, want in COLUMN_TYPES.items():
            if types[col] != want:
                return VerifyResult(False, n, where, f"column {col} has type {types[col]}, expected {want} (edited)")
        if rid != n:
            return VerifyResult(False, n, n, f"record {n} is missing (next id is {rid})")
        if values["prev_hash"] != prev:
            return VerifyResult(False, n, rid, "prev_hash does not match the hash of the previous record")
        body = values["body"]
        if chain_hash(prev, body) != values["hash"]:
            return VerifyResult(False, n, rid, "content does not match its hash (edited)")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, RecursionError):
            return VerifyResult(False, n, rid, "body is not valid JSON")
        if not isinstance(data, dict):
            return VerifyResult(False, n, rid, f"body is a JSON {type(data).__name__}, not an object")
        expected = derived_columns(data)
        bad = [c for c, v in expected.items() if values[c] != v or type(values[c]) is not type(v)]
        if bad:
            return VerifyResult(False, n, rid, f"indexed columns ({', '.join(bad)}) differ from the hashed body")
        prev = values["hash"]
        hashes[n] = prev
    return _check_head(VerifyResult(True, n, head=prev if n else None), head, hashes)


def _check_head(res: VerifyResult, head: Head | None, hashes: Mapping[int, str]) -> VerifyResult:
    """A verified chain must still hold the head file's record, with the same hash."""
    if head is None or not res.ok:
        return res
    if head.id > res.checked:
        return VerifyResult(False, res.checked, res.checked + 1,
                            f"truncated: the head file names record {head.id} but the chain ends at {res.checked}",
                            res.head)
    if hashes.get(head.id) != head.hash:
        return VerifyResult(False, res.checked, head.id,
                            "record named by the head file has another hash (chain rewritten)", res.head)
    return res


def verify_records(records: Iterable[Mapping[str, Any]], head: Head | None = None) -> VerifyResult:
    """Check a chain given as record dicts (``AuditRecord.to_dict()`` or JSONL export lines) in id order."""
    prev = GENESIS
    n = 0
    hashes: dict[int, str] = {}
    for rec in records:
        n += 1
        if not isinstance(rec, Mapping):
            return VerifyResult(False, n, n, f"line {n} is a JSON {type(rec).__name__}, not an object")
        body_obj = {k: v for k, v in rec.items() if k not in ("hash", "prev_hash")}
        rid = body_obj.get("id")
        if type(rid) is not int or rid != n:
            return VerifyResult(False, n, n, f"record id {rid!r} where {n} was expected (missing or reordered)")
        if rec.get("prev_hash") != prev:
            return VerifyResult(False, n, n, "prev_hash does not match the hash of the previous record")
        try:
            text = canonical_json(body_obj)
        except (TypeError, ValueError) as exc:
            return VerifyResult(False, n, n, f"body cannot be put in canonical form: {exc}")
        if not _hex64(rec.get("hash")) or chain_hash(prev, text) != rec.get("hash"):
            return VerifyResult(False, n, n, "content does not match its hash (edited)")
        prev = str(rec["hash"])
        hashes[n] = prev
    return _check_head(VerifyResult(True, n, head=prev if n else None), head, hashes)


# -- head files ------------------------------------------------------------------------------------------------


def write_head(path: str | os.PathLike[str], head: Head) -> None:
    """Write ``{"id": ..., "hash": ...}`` to ``path`` (replaced atomically)."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps({"id": head.id, "hash": head.hash}) + "\n", encoding="utf-8")
    os.replace(tmp, p)


def read_head(path: str | os.PathLike[str]) -> Head:
    """Read a head file; ``ValueError`` naming the file when it is missing or malformed."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"head file {str(p)!r} not found (or not a regular file)")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"head file {str(p)!r} is not readable JSON: {exc}") from None
    if (not isinstance(data, dict) or type(data.get("id")) is not int or data["id"] < 1
            or not _hex64(data.get("hash"))):
        raise ValueError(f"head file {str(p)!r}: expected {{\"id\": <int >= 1>, \"hash\": <64 hex digits>}}")
    return Head(int(data["id"]), str(data["hash"]))
