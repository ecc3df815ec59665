"""Where a guard writes its audit records: the caller's store, else ``GUARDRAILS_AUDIT_DB``, else the
policy's ``audit.db``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from guardrails.core.policy import Policy

ENV_DB = "GUARDRAILS_AUDIT_DB"
"""Environment variable naming the audit database every entry point (Python, LangChain, CLI) writes to."""


def resolve_audit(audit: Any, policy: Policy) -> Any:
    """The audit store of a guard: ``audit`` (a store or a path), else env ``GUARDRAILS_AUDIT_DB``, else
    ``policy.audit.db`` (relative to the policy's folder), else None (no audit)."""
    if audit is not None and not isinstance(audit, str | os.PathLike):
        return audit
    path: str | os.PathLike[str] | None = audit or os.environ.get(ENV_DB) or None
    if path is None and policy.audit is not None and policy.audit.db:
        path = policy.resolve(policy.audit.db)
    if path is None:
        return None
    from guardrails.audit.store import AuditStore

    return AuditStore(Path(path))
