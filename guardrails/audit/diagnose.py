"""Why an audit database could not be opened or written, read from the file system itself (a missing folder, a
read-only mount, a full disk, a file or folder without write permission, a lock held too long, a damaged file)
rather than from SQLite's terse words. :class:`~guardrails.audit.store.AuditStore` adds it to its errors."""

from __future__ import annotations

import errno
import os
from pathlib import Path

LOW_DISK_BYTES = 1 << 20
"""Free space below which a failed write is reported as a full disk."""


def failure_cause(path: Path, exc: BaseException, busy_timeout_s: float) -> str:
    """The likely cause of a failed open or write of the database at ``path`` ("" when none is found)."""
    msg = str(exc).lower()
    folder = path.resolve().parent
    if not folder.is_dir():
        return f"folder {str(folder)!r} does not exist"
    try:
        st = os.statvfs(folder)
    except OSError:
        st = None
    if st is not None and st.f_flag & os.ST_RDONLY:
        return f"the file system holding {str(folder)!r} is mounted read-only"
    free = st.f_bavail * st.f_frsize if st is not None else None
    code = getattr(exc, "sqlite_errorname", "") or ""
    if "full" in msg or code == "SQLITE_FULL" or getattr(exc, "errno", None) == errno.ENOSPC or (
            free is not None and free < LOW_DISK_BYTES and ("i/o" in msg or "ioerr" in code.lower())):
        return "disk or database full" + (f" ({free} bytes free on {str(folder)!r})" if free is not None else "")
    if "readonly" in msg or "read-only" in msg or "unable to open" in msg or "i/o" in msg:
        for target in (path, Path(str(path) + "-wal"), Path(str(path) + "-shm")):
            if target.exists() and not os.access(target, os.W_OK):
                return f"no write permission on {str(target)!r} (read-only file)"
        if not os.access(folder, os.W_OK | os.X_OK):
            return f"no write permission on folder {str(folder)!r}"
        if "readonly" in msg or "read-only" in msg:
            return "the database was opened read-only"
    if "locked" in msg or "busy" in msg:
        return f"still locked by another writer after {busy_timeout_s:g} s"
    if "not a database" in msg or "malformed" in msg:
        return "the file is not an SQLite database or is damaged"
    return ""
