"""HTML reports: structure of the record page (decision marks, colours by formula, escaping, no network
resources, redaction), the summary page's counts and chart, and the ``report`` CLI."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from guardrails.audit.report import OVER_COLOR, render_record
from guardrails.audit.store import AuditStore
from guardrails.audit.summary import render_summary
from guardrails.cli.main import app
from tests.test_audit import FakeGuard, make_policy, make_result

runner = CliRunner()


VOID = {"meta", "br", "hr", "img", "input", "link", "area", "base", "col", "embed", "source", "wbr"}


class Page(HTMLParser):
    """Elements with their attributes and direct text, the text of each token span and its block."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.texts: list[str] = []
        self.span_text: dict[str, str] = {}
        self.block_of: dict[str, str] = {}
        self.script_bodies: list[str] = []
        self._stack: list[int] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.elements.append((tag, a))
        self.texts.append("")
        if tag == "span" and "tok" in a.get("class", "").split():
            divs = [self.elements[i][1].get("class", "") for i in self._stack if self.elements[i][0] == "div"]
            self.block_of[a["id"]] = divs[-1] if divs else ""
        if tag not in VOID:
            self._stack.append(len(self.elements) - 1)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, {k: v or "" for k, v in attrs}))
        self.texts.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID or not self._stack:
            return
        i = self._stack.pop()
        t, a = self.elements[i]
        assert t == tag, f"unbalanced </{tag}> closing <{t}>"
        if t == "span" and "tok" in a.get("class", "").split():
            self.span_text[a["id"]] = self.texts[i]
        if t == "script":
            self.script_bodies.append(self.texts[i])

    def handle_data(self, data: str) -> None:
        if self._stack:
            self.texts[self._stack[-1]] += data

    def by_id(self, id_: str) -> dict[str, str]:
        return next(a for _, a in self.elements if a.get("id") == id_)

    def with_class(self, cls: str) -> list[dict[str, str]]:
        return [a for _, a in self.elements if cls in a.get("class", "").split()]

    def text_of(self, attrs: dict[str, str]) -> str:
        return next(self.texts[i] for i, (_, a) in enumerate(self.elements) if a is attrs)


def _record(tmp_path: Path, result: Any = None, policy: Any = None) -> Any:
    with AuditStore(tmp_path / "audit.db") as s:
        rid = s.record(result or make_result(), FakeGuard(policy or make_policy()))
        return s.get(rid)


def test_decision_token_is_marked(tmp_path: Path) -> None:
    page = Page(render_record(_record(tmp_path)))
    marked = page.with_class("decision")
    assert [a["id"] for a in marked] == ["t7"]  # the decision in make_result is at position 7
    t7 = marked[0]
    assert {"decision-block", "withheld"} <= set(t7["class"].split())
    assert "block by rule harm: score 0.7 >= threshold 0.6" in t7["title"]
    assert "#3=4.5" in t7["title"] and t7["data-features"] == "[[3,4.5],[17,1.25]]"
    assert page.span_text["t7"] == " secretword"
    assert page.by_id("detail") is not None and page.with_class("record-hash")


def test_prompt_and_output_blocks_and_token_order(tmp_path: Path) -> None:
    page = Page(render_record(_record(tmp_path)))
    ids = list(page.span_text)
    assert ids == [f"t{i}" for i in range(8)]
    assert [page.block_of[i] for i in ids] == ["tokens prompt"] * 4 + ["tokens output"] * 4
    assert "".join(page.span_text.values()) == "<s>Tell me how First get the secretword"


def test_colours_follow_the_formula(tmp_path: Path) -> None:
    # rule 'harm' (the block decision's rule is shown first): threshold 0.45, scores 0.1 * position, floor 0
    page = Page(render_record(_record(tmp_path, policy=make_policy(threshold=0.45))))
    for p in range(8):
        a = page.by_id(f"t{p}")
        style = a.get("style", "")
        if p == 0:
            assert style == ""  # unscored
        elif 0.1 * p >= 0.45:
            assert "over" in a["class"].split() and OVER_COLOR in style
        else:
            alpha = float(re.search(r"rgba\(245, 158, 11, ([0-9.]+)\)", style).group(1))  # type: ignore[union-attr]
            assert alpha == pytest.approx(0.08 + 0.55 * (0.1 * p) / 0.45, abs=1e-3)
            assert "over" not in a["class"].split()
    assert page.by_id("legend-threshold") is not None


def test_text_is_escaped(tmp_path: Path) -> None:
    evil = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    result = make_result(marker=evil, redactable="<b>bold</b>")
    result.tokens[2] = evil  # a prompt token
    policy = make_policy(name="pol</title><script>bad()</script>")
    text = render_record(_record(tmp_path, result, policy))
    page = Page(text)
    assert [t for t, _ in page.elements].count("script") == 2  # ours: the JSON data and the inline code
    assert not [a for t, a in page.elements if t == "img" or "onerror" in a]
    assert "bad()" not in "".join(page.script_bodies) and "alert" not in "".join(page.script_bodies)
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&lt;img" in text  # the token is shown, escaped
    assert page.span_text["t2"] == evil
    assert "pol&lt;/title&gt;&lt;script&gt;bad()" in text
    assert page.span_text["t7"] == " <b>bold</b>"


def test_no_network_resources(tmp_path: Path) -> None:
    for text in (render_record(_record(tmp_path)), render_summary([_record(tmp_path)])):
        page = Page(text)
        for _, attrs in page.elements:
            for key in ("src", "href", "srcset", "action", "xlink:href", "poster", "data"):
                v = attrs.get(key, "")
                assert not re.match(r"\s*([a-z]+:|//)", v) or v.startswith("data:"), (key, v)
        assert "http://" not in text and "https://" not in text
        assert "url(" not in text and "@import" not in text and "<link" not in text
        assert "default-src 'none'" in text  # the CSP also forbids any fetch


def test_redacted_record_shows_no_text(tmp_path: Path) -> None:
    rec = _record(tmp_path, make_result("zebracode", action="flag"), make_policy(redact=True))
    text = render_record(rec)
    page = Page(text)
    assert set(page.span_text.values()) == {"▪"} and len(page.span_text) == 8
    assert [a["id"] for a in page.with_class("decision")] == ["t7"]
    for secret in ("zebracode", "secretword", "Tell me", "First get"):
        assert secret not in text


# -- summary ------------------------------------------------------------------------------------------------------


def _rec(i: int, time: str, action: str, rules: list[tuple[str, str]], policy: str = "p") -> dict[str, Any]:
    return {"id": i, "time": time, "action": action, "policy": {"name": policy}, "input": {"text": f"text {i}"},
            "decisions": [{"rule": r, "action": a, "position": 1} for r, a in rules]}


def test_summary_counts_and_chart() -> None:
    recs = [
        _rec(1, "2024-03-01T10:00:00.000000Z", "block", [("harm", "block"), ("pii", "flag")]),
        _rec(2, "2024-03-01T11:00:00.000000Z", "flag", [("pii", "flag"), ("pii", "flag")]),
        _rec(3, "2024-03-01T23:59:00.000000Z", "block", [("harm", "block")]),
        _rec(4, "2024-03-04T08:00:00.000000Z", "steer", [("harm", "steer")], policy="q"),
    ]
    page = Page(render_summary(recs))
    counts = {a["data-action"]: int(a["data-count"]) for a in page.with_class("count-action")}
    assert counts == {"block": 2, "flag": 1, "steer": 1}
    cells = {(a["data-rule"], a["data-action"]): int(page.text_of(a)) for a in page.with_class("count")}
    # a record counts once per distinct (rule, action) pair
    assert cells[("harm", "block")] == 2 and cells[("pii", "flag")] == 2 and cells[("harm", "steer")] == 1
    assert cells[("pii", "block")] == 0
    bars = page.with_class("bar")
    # span > 48 h: one bucket per day, 03-01 (3 records: 2 block + 1 flag) and 03-04 (1 steer)
    got = sorted((a["data-bucket"], a["data-action"], int(a["data-count"])) for a in bars)
    assert got == [("2024-03-01", "block", 2), ("2024-03-01", "flag", 1), ("2024-03-04", "steer", 1)]
    peak = 3
    for a in bars:
        assert float(a["height"]) == pytest.approx(180 * int(a["data-count"]) / peak, abs=0.01)
    assert len(page.with_class("record-row")) == 4


def test_summary_uses_hours_for_short_spans() -> None:
    recs = [_rec(1, "2024-03-01T10:05:00.000000Z", "flag", [("a", "flag")]),
            _rec(2, "2024-03-01T12:59:00.000000Z", "flag", [("a", "flag")])]
    page = Page(render_summary(recs))
    assert sorted(a["data-bucket"] for a in page.with_class("bar")) == ["2024-03-01 10:00", "2024-03-01 12:00"]
    assert "per hour" in render_summary(recs)


def test_summary_of_nothing() -> None:
    assert "No records." in render_summary([])


# -- CLI ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "audit.db"
    with AuditStore(path) as s:
        s.record(make_result("one", action="flag"), FakeGuard(make_policy("p1")))
        s.record(make_result("two"), FakeGuard(make_policy("p2")))
    return path


def test_cli_report_writes_the_page(db: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.html"
    res = runner.invoke(app, ["report", "2", "--db", str(db), "--out", str(out)])
    assert res.exit_code == 0, res.output
    with AuditStore(db, readonly=True) as s:
        assert out.read_text() == render_record(s.get(2))


def test_cli_summary(db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GUARDRAILS_AUDIT_DB", str(db))
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["report", "--summary", "--policy", "p1"])
    assert res.exit_code == 0, res.output
    page = Page((tmp_path / "summary.html").read_text())
    assert [a["data-count"] for a in page.with_class("count-action")] == ["1"]


@pytest.mark.parametrize(("args", "message"), [
    (["report"], "missing record ID"),
    (["report", "1", "--summary"], "either a record ID or --summary"),
    (["report", "9"], "valid ids: 1..2"),
    (["report", "--summary", "--action", "blok"], "valid: block, steer, flag, error, allow"),
    (["report", "--summary", "--since", "yesterday"], "valid: YYYY-MM-DD"),
])
def test_cli_report_errors(db: Path, args: list[str], message: str) -> None:
    res = runner.invoke(app, [*args, "--db", str(db)])
    assert res.exit_code == 2 and message in res.output
    assert "Traceback" not in res.output and (res.exception is None or isinstance(res.exception, SystemExit))


def test_cli_report_missing_db(tmp_path: Path) -> None:
    res = runner.invoke(app, ["report", "1", "--db", str(tmp_path / "none.db")])
    assert res.exit_code == 2 and "not found" in res.output and "GUARDRAILS_AUDIT_DB" in res.output


def test_tokens_of_a_character_split_over_several_show_it_whole() -> None:
    """Byte-level BPE splits an emoji, an accent or a CJK character over tokens; decoded one at a time each shows
    U+FFFD. The audit's per-token view and discover's examples show the character on the first of its tokens and
    nothing on the rest, so the pieces still join into the text; a U+FFFD in the text itself is still shown."""
    from guardrails.audit.records import _display_tokens
    from guardrails.core.tokentext import token_pieces
    from guardrails.offline.discover import _context
    from tests.builders import bundled_tokenizer

    def utf8(group):  # type: ignore[no-untyped-def]
        return b"".join(group).decode("utf-8", errors="replace")

    text = "héllo 👋 日本 ok"
    raw = [bytes([b]) for b in text.encode()]
    pieces = token_pieces(raw, utf8)
    assert "".join(pieces) == text and pieces.count("👋") == 1
    assert set(token_pieces([bytes([b]) for b in "\ufffd".encode()], utf8)) == {"\ufffd"}  # kept, never dropped
    assert pieces[raw.index(b"\xf0"):raw.index(b"\xf0") + 4] == ["👋", "", "", ""]
    tok = bundled_tokenizer()
    ids = tok("naïve café 👋 日本語")["input_ids"]
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # the case this is about
    shown = _display_tokens(tok.convert_ids_to_tokens(ids), tok)
    assert "".join(shown) == "naïve café 👋 日本語" and not any("\ufffd" in s for s in shown)
    assert _context(shown, shown.index("")).endswith("[[ 👋]]")  # a feature firing on the emoji's second byte


def test_the_later_pieces_of_a_split_character_stay_hoverable(tmp_path: Path) -> None:
    # the character shows on its first token; its later tokens have no text of their own, but stay spans one can
    # point at (a decision may sit on one), with a title saying what they are
    from dataclasses import replace

    from tests.builders import bundled_tokenizer

    tok = bundled_tokenizer()
    guard = FakeGuard(make_policy())
    guard.tokenizer = tok  # type: ignore[attr-defined]
    ids = tok("Tell me 👋 ok")["input_ids"]
    result = replace(make_result(), tokens=tok.convert_ids_to_tokens(ids), prompt_length=len(ids), decisions=[],
                     token_scores={"harm": {p: 0.1 for p in range(1, len(ids))}})
    with AuditStore(tmp_path / "audit.db") as s:
        page = Page(render_record(s.get(s.record(result, guard))))
    joined = page.with_class("joined")
    assert joined and all(page.span_text[a["id"]] == "" for a in joined)
    assert all("later piece of the character" in a["title"] for a in joined)
    assert "".join(page.span_text.values()) == "Tell me 👋 ok"
