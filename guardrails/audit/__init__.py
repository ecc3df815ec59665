"""The audit trail: an append-only, hash-chained SQLite store (:mod:`.store`) and its HTML views
(:mod:`.report`). Torch-free."""

from guardrails.audit.store import (
    ACTIONS,
    AuditError,
    AuditRecord,
    AuditStore,
    VerifyResult,
    build_generation_record,
    build_scan_record,
    canonical_json,
    chain_hash,
    parse_since,
    verify_records,
)

__all__ = [
    "ACTIONS",
    "AuditError",
    "AuditRecord",
    "AuditStore",
    "VerifyResult",
    "build_generation_record",
    "build_scan_record",
    "canonical_json",
    "chain_hash",
    "parse_since",
    "verify_records",
]
