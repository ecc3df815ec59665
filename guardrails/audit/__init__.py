"""The audit trail: record bodies (:mod:`.records`), the SQLite layout (:mod:`.schema`), the hash chain
and head files (:mod:`.chain`), the append-only store (:mod:`.store`) and its HTML views
(:mod:`.report`). Torch-free."""

from guardrails.audit.chain import Head, VerifyResult, chain_hash, read_head, verify_records, write_head
from guardrails.audit.records import ACTIONS, build_generation_record, build_scan_record, canonical_json, parse_since
from guardrails.audit.store import AuditError, AuditRecord, AuditStore

__all__ = [
    "ACTIONS",
    "AuditError",
    "AuditRecord",
    "AuditStore",
    "Head",
    "VerifyResult",
    "build_generation_record",
    "build_scan_record",
    "canonical_json",
    "chain_hash",
    "parse_since",
    "read_head",
    "verify_records",
    "write_head",
]
