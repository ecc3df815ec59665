"""The SQLite layout of the audit store: one ``records`` table, append-only triggers, derived columns.

Every column besides ``body``, ``prev_hash`` and ``hash`` is derived from the body
(:func:`derived_columns`): :meth:`AuditStore.verify` recomputes each one and compares it, and the
filters of ``list`` read the body itself (``json_extract``), never a column an attacker could edit
alone. Triggers refuse UPDATE, DELETE and any INSERT that is not the next append (a reused id, as in
``INSERT OR REPLACE``, a gap, a ``prev_hash`` other than the last hash, a hash already stored).
Triggers can be dropped by whoever can write the file: they stop mistakes, the chain catches the rest.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from guardrails.audit.records import ACTIONS, parse_since

GENESIS = "0" * 64
SCHEMA_VERSION = 2

COLUMNS = ("id", "time", "kind", "policy", "action", "actions", "rules", "body", "prev_hash", "hash")
"""Every stored column, in table order."""
COLUMN_TYPES = {c: ("integer" if c == "id" else "text") for c in COLUMNS}
"""SQLite storage class each column must have (``typeof()``); anything else is tampering."""

SCHEMA = f"""
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
CREATE TRIGGER IF NOT EXISTS records_append_only BEFORE INSERT ON records
WHEN NEW.id IS NOT (SELECT coalesce(max(id), 0) + 1 FROM records)
  OR NEW.prev_hash IS NOT coalesce((SELECT hash FROM records ORDER BY id DESC LIMIT 1), '{GENESIS}')
  OR EXISTS (SELECT 1 FROM records WHERE hash = NEW.hash)
BEGIN SELECT RAISE(ABORT,
 'audit records are append-only: only the next record, chained to the last, may be added'); END;
"""


def split_schema(script: str = SCHEMA) -> list[str]:
    """Statements of the schema script (triggers contain ';' inside BEGIN ... END)."""
    out, cur = [], ""
    for line in script.strip().splitlines():
        cur += line + "\n"
        if line.rstrip().endswith(";") and (not cur.lstrip().startswith("CREATE TRIGGER") or "END;" in line):
            out.append(cur.strip())
            cur = ""
    return out


def decision_field(body: Mapping[str, Any], key: str) -> list[str]:
    """Sorted distinct ``key`` values (``action``, ``rule``) of a body's decisions."""
    decisions = body.get("decisions")
    if not isinstance(decisions, list):
        return []
    return sorted({str(d.get(key)) for d in decisions if isinstance(d, Mapping)})


def derived_columns(body: Mapping[str, Any]) -> dict[str, Any]:
    """The value of every column but ``body``/``prev_hash``/``hash``, computed from the body alone."""
    policy = body.get("policy")
    action = str(body.get("action", "allow"))
    actions = sorted(set(decision_field(body, "action")) | {action})
    return {
        "id": body.get("id"),
        "time": body.get("time"),
        "kind": str(body.get("kind", "")),
        "policy": str(policy.get("name", "")) if isinstance(policy, Mapping) else "",
        "action": action,
        "actions": " " + " ".join(actions) + " ",
        "rules": " " + " ".join(decision_field(body, "rule")) + " ",
    }


# filters over the body (exact matches; json_each of a missing path yields no rows)
FILTER_SQL = {
    "policy": "json_extract(body, '$.policy.name') = ?",
    "action": ("(json_extract(body, '$.action') = ? OR EXISTS (SELECT 1 FROM json_each(body, '$.decisions') AS d"
               " WHERE json_extract(d.value, '$.action') = ?))"),
    "rule": ("EXISTS (SELECT 1 FROM json_each(body, '$.decisions') AS d WHERE json_extract(d.value, '$.rule') = ?)"),
    "since": "json_extract(body, '$.time') >= ?",
}


def guarded(clause: str) -> str:
    """``clause`` evaluated only on rows whose body is JSON text (others never match a filter; ``verify``
    reports them). Nested CASE because SQLite does not promise to short-circuit AND."""
    return f"(CASE WHEN typeof(body) = 'text' THEN (CASE WHEN json_valid(body) THEN ({clause}) ELSE 0 END) ELSE 0 END)"


def where_clause(policy: str | None, action: str | None, since: str | datetime | None, rule: str | None
                 ) -> tuple[str, list[Any]]:
    """Filters over the hashed body (exact matches), never over the derived columns."""
    clauses, args = [], []
    if policy is not None:
        clauses.append(guarded(FILTER_SQL["policy"]))
        args.append(str(policy))
    if action is not None:
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}; valid: {', '.join(ACTIONS)}")
        clauses.append(guarded(FILTER_SQL["action"]))
        args += [action, action]
    if rule is not None:
        clauses.append(guarded(FILTER_SQL["rule"]))
        args.append(str(rule))
    if since is not None:
        clauses.append(guarded(FILTER_SQL["since"]))
        args.append(parse_since(since))
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", args
