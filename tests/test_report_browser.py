"""The HTML reports in a real headless browser (Debian's chromium): they render, the script runs, and
the flagged token is marked in the DOM and visible in a screenshot.

Skipped when chromium is missing, except under ``CI=true`` where that is a failure (CI installs it:
``apt-get install -y chromium``). ``GUARDRAILS_CHROMIUM`` overrides the binary.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from guardrails.audit.report import render_record
from guardrails.audit.store import AuditStore
from guardrails.audit.summary import render_summary
from tests.test_audit import FakeGuard, make_policy, make_result
from tests.test_report import Page

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
    "--disable-extensions", "--hide-scrollbars", "--mute-audio",
]


def _chromium() -> str:
    found = os.environ.get("GUARDRAILS_CHROMIUM") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
    if found:
        return found
    msg = "chromium not found (install it: apt-get install -y chromium)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(msg + "; CI must run the browser test")
    pytest.skip(msg)


def _run(tmp_path: Path, page: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [_chromium(), *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *extra, page.resolve().as_uri()]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    assert res.returncode == 0, f"chromium failed ({res.returncode}): {res.stderr[-2000:]}"
    return res


@pytest.fixture
def record_page(tmp_path: Path) -> Path:
    with AuditStore(tmp_path / "audit.db") as s:
        result = make_result()
        result.tokens[2] = "<script>document.title='pwned'</script>"  # a hostile prompt token
        rid = s.record(result, FakeGuard(make_policy(threshold=0.45)))
        html = render_record(s.get(rid))
    path = tmp_path / "report.html"
    path.write_text(html, encoding="utf-8")
    return path


def test_record_page_in_chromium_dom(tmp_path: Path, record_page: Path) -> None:
    dom = _run(tmp_path, record_page, "--dump-dom").stdout
    page = Page(dom)
    body = next(a for t, a in page.elements if t == "body")
    assert body.get("data-ready") == "1"  # our script ran to the end
    t7 = page.by_id("t7")
    assert {"tok", "decision", "decision-block", "selected", "over"} <= set(t7["class"].split())
    assert [a["id"] for a in page.with_class("selected")] == ["t7"]
    # the script filled the detail panel for the flagged token from its data attributes
    detail = " ".join(page.texts[i] for i, (_, a) in enumerate(page.elements) if _inside(page, i, "detail"))
    assert "token 7" in detail and "#3 = 4.5" in detail and "#17 = 1.25" in detail
    title = next(page.texts[i] for i, (t, _) in enumerate(page.elements) if t == "title")
    assert title == "Audit record 1"  # the prompt's <script> did not run


def _inside(page: Page, index: int, id_: str) -> bool:
    """Whether element ``index`` is the element with ``id_`` or follows it before the next <section>."""
    start = next(i for i, (_, a) in enumerate(page.elements) if a.get("id") == id_)
    end = next((i for i in range(start + 1, len(page.elements)) if page.elements[i][0] == "section"),
               len(page.elements))
    return start <= index < end


def test_record_page_screenshot_shows_the_marked_token(tmp_path: Path, record_page: Path) -> None:
    image = pytest.importorskip("PIL.Image")
    shot = tmp_path / "report.png"
    _run(tmp_path, record_page, f"--screenshot={shot}", "--window-size=1200,1000")
    img = image.open(shot).convert("RGB")
    assert img.size == (1200, 1000)
    pixels = list(img.getdata())
    assert len(set(pixels)) > 50  # not a blank page
    # tokens at or over the threshold: rgba(220, 38, 38, 0.78) over white = (228, 86, 86)
    red = sum(1 for r, g, b in pixels if abs(r - 228) < 12 and abs(g - 86) < 14 and abs(b - 86) < 14)
    assert red > 200
    # the block decision's outline, #991b1b
    outline = sum(1 for r, g, b in pixels if abs(r - 0x99) < 10 and abs(g - 0x1B) < 10 and abs(b - 0x1B) < 10)
    assert outline > 20


def test_summary_page_in_chromium(tmp_path: Path) -> None:
    with AuditStore(tmp_path / "audit.db") as s:
        for action in ("flag", "block", "block"):
            s.record(make_result(action=action), FakeGuard(make_policy()))
        html = render_summary(s.iter_records())
    path = tmp_path / "summary.html"
    path.write_text(html, encoding="utf-8")
    page = Page(_run(tmp_path, path, "--dump-dom").stdout)
    bars = sorted((a["data-action"], a["data-count"]) for a in page.with_class("bar"))
    assert bars == [("block", "2"), ("flag", "1")]
    assert len(page.with_class("record-row")) == 3
