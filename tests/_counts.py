"""Counts of the cases the robustness suites tried, printed in pytest's terminal summary.

Tests call ``count(kind)`` once per case (a hypothesis example, an injected fault, a concurrent
request...). ``tests/conftest.py`` imports :func:`pytest_terminal_summary` so pytest runs it.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

COUNTS: Counter[str] = Counter()


def count(kind: str, n: int = 1) -> None:
    """Record ``n`` more cases of ``kind`` (shown at the end of the run)."""
    COUNTS[kind] += n


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: Any) -> None:
    if not COUNTS:
        return
    terminalreporter.section("robustness: cases tried")
    for kind in sorted(COUNTS):
        terminalreporter.write_line(f"{kind}: {COUNTS[kind]}")
    terminalreporter.write_line(f"total: {sum(COUNTS.values())}")
