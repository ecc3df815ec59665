"""Issue 16, attacked from outside: tampering with the audit database file, hostile text read back through
every CLI command (tables, JSON, HTML), hostile policies (non-finite numbers, duplicate keys, ids that are
not integers, a FIFO for a weights file), and integer CLI arguments past every bound.

Each case states what an attacker did and checks the guard's answer against an independent statement:
``verify`` names the tampered record (never a traceback), the CLI exits 0/1/2 with no raw control byte
and no markup error, JSON output loads back to the stored strings, a policy is a ``PolicyError`` naming
the YAML path.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from guardrails.audit import AuditStore, Head, verify_records
from guardrails.core.policy import Policy, PolicyError
from tests._counts import count
from tests.test_audit import FakeGuard, make_policy, make_result

# -- audit: tampering with the file ---------------------------------------------------------------------------


def _db(tmp_path: Path, n: int = 5, actions: tuple[str, ...] = ("flag", "block", "steer")) -> Path:
    path = tmp_path / "audit.db"
    with AuditStore(path) as s:
        for i in range(n):
            s.record(make_result(f"m{i}", action=actions[i % len(actions)]), FakeGuard(make_policy()))
        # record n+1: an error record (what an attacker wants to hide from `audit list --action error`)
        s.append({**s.get(1).data, "action": "error", "decisions": [
            {**s.get(1).data["decisions"][0], "action": "error", "rule": "harm"}]})
    return path


def _raw(path: Path, *stmts: str, drop_triggers: bool = True) -> None:
    raw = sqlite3.connect(path)
    if drop_triggers:
        for t in ("records_no_update", "records_no_delete", "records_append_only"):
            raw.execute(f"DROP TRIGGER IF EXISTS {t}")
    for stmt in stmts:
        raw.execute(stmt)
    raw.commit()
    raw.close()


def _verify(path: Path, head: Head | None = None) -> Any:
    with AuditStore(path, readonly=True) as s:
        return s.verify(head=head)


COLUMN_ATTACKS = {
    "actions": ("UPDATE records SET actions = ' allow ' WHERE id = 6", 6, "actions"),
    "rules": ("UPDATE records SET rules = ' other ' WHERE id = 2", 2, "rules"),
    "kind": ("UPDATE records SET kind = 'scan:input' WHERE id = 3", 3, "kind"),
    "policy": ("UPDATE records SET policy = 'other' WHERE id = 4", 4, "policy"),
    "time": ("UPDATE records SET time = '1999-01-01T00:00:00.000000Z' WHERE id = 5", 5, "time"),
    "action": ("UPDATE records SET action = 'allow' WHERE id = 6", 6, "action"),
    "body as blob": ("UPDATE records SET body = CAST(body AS BLOB) WHERE id = 2", 2, "type blob"),
    "hash as blob": ("UPDATE records SET hash = CAST(hash AS BLOB) WHERE id = 3", 3, "type blob"),
    "prev_hash as blob": ("UPDATE records SET prev_hash = CAST(prev_hash AS BLOB) WHERE id = 4", 4, "type blob"),
    "body as number": ("UPDATE records SET body = 42 WHERE id = 2", 2, "edited"),  # TEXT affinity: '42'
    "kind as blob": ("UPDATE records SET kind = CAST(kind AS BLOB) WHERE id = 5", 5, "type blob"),
    "body emptied": ("UPDATE records SET body = '' WHERE id = 2", 2, "edited"),
    "delete middle": ("DELETE FROM records WHERE id = 3", 3, "missing"),
    "swap": ("UPDATE records SET id = CASE id WHEN 2 THEN 102 WHEN 3 THEN 2 END WHERE id IN (2, 3)", 2, ""),
}


@pytest.mark.parametrize("attack", sorted(COLUMN_ATTACKS))
def test_every_column_is_covered_by_verify(tmp_path: Path, attack: str) -> None:
    count("security: audit tampering")
    path = _db(tmp_path)
    assert _verify(path).ok
    sql, bad, reason = COLUMN_ATTACKS[attack]
    _raw(path, sql)
    res = _verify(path)
    assert not res.ok and res.first_bad == bad and reason in str(res.reason), res


def test_insert_or_replace_is_refused_while_the_triggers_stand(tmp_path: Path) -> None:
    count("security: audit tampering", 3)
    path = _db(tmp_path)
    raw = sqlite3.connect(path)
    row = raw.execute("SELECT * FROM records WHERE id = 6").fetchone()
    forged = (*row[:5], " allow ", *row[6:])  # same body and hash, the indexed actions column changed
    cols = "id, time, kind, policy, action, actions, rules, body, prev_hash, hash"
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        raw.execute(f"INSERT OR REPLACE INTO records ({cols}) VALUES (?,?,?,?,?,?,?,?,?,?)", forged)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):  # a new id chained to the wrong record
        raw.execute(f"INSERT INTO records ({cols}) VALUES (?,?,?,?,?,?,?,?,?,?)", (7, *forged[1:]))
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):  # REPLACE through a duplicate hash
        last = raw.execute("SELECT hash FROM records WHERE id = 6").fetchone()[0]
        raw.execute(f"REPLACE INTO records ({cols}) VALUES (?,?,?,?,?,?,?,?,?,?)", (7, *forged[1:8], last, row[9]))
    raw.close()
    assert _verify(path).ok and _verify(path).checked == 6


def test_insert_or_replace_after_dropping_the_triggers_is_detected_and_filters_ignore_it(tmp_path: Path) -> None:
    count("security: audit tampering")
    path = _db(tmp_path)
    with AuditStore(path, readonly=True) as s:
        before = [r.id for r in s.list(action="error")]
    assert before == [6]
    _raw(path, "INSERT OR REPLACE INTO records SELECT id, time, kind, policy, 'allow', ' allow ', ' none ', body, "
               "prev_hash, hash FROM records WHERE id = 6")
    res = _verify(path)
    assert not res.ok and res.first_bad == 6 and "action" in str(res.reason)
    with AuditStore(path, readonly=True) as s:  # the filters read the hashed body: the error record is still listed
        assert [r.id for r in s.list(action="error")] == [6]
        assert [r.id for r in s.list(rule="harm", action="error")] == [6]


def test_filters_are_exact_not_like_patterns(tmp_path: Path) -> None:
    count("security: filter injection", 6)
    path = _db(tmp_path)
    with AuditStore(path, readonly=True) as s:
        for pattern in ("%", "_", "%harm%", "h_rm", "harm' OR 1=1 --", "harm "):
            assert s.list(rule=pattern) == [], pattern
            assert s.list(policy=pattern) == [], pattern
        assert len(s.list(rule="harm")) == 6 and len(s.list(policy="test-policy")) == 6


def test_truncation_and_rewrites_are_caught_by_the_head_file(tmp_path: Path) -> None:
    count("security: audit tampering", 3)
    path = _db(tmp_path)
    head_file = tmp_path / "head.json"
    with AuditStore(path) as s:
        assert s.write_head(head_file) == Head(6, s.get(6).hash)
    assert _verify(path, head=Head(6, json.loads(head_file.read_text())["hash"])).ok
    _raw(path, "DELETE FROM records WHERE id >= 5")  # the newest records removed: a valid, shorter chain
    assert _verify(path).ok
    with AuditStore(path, readonly=True) as s:
        res = s.verify(head=head_file)
    assert not res.ok and res.first_bad == 5 and "truncated" in str(res.reason)
    # rewrite: same length, every hash recomputed from an edited first record
    path2 = _db(tmp_path / "b" if (tmp_path / "b").mkdir() is None else tmp_path)
    with AuditStore(path2) as s:
        head = s.head()
        rows = [s.get(i) for i in range(1, 7)]
    from guardrails.audit import canonical_json, chain_hash

    prev, stmts = "0" * 64, []
    for r in rows:
        data = {**r.data, "input": {"text": "innocent", "sha256": None}} if r.id == 1 else r.data
        body = canonical_json(data)
        h = chain_hash(prev, body)
        stmts.append(f"UPDATE records SET body = '{body.replace(chr(39), chr(39) * 2)}', prev_hash = '{prev}', "
                     f"hash = '{h}' WHERE id = {r.id}")
        prev = h
    _raw(path2, *stmts)
    assert _verify(path2).ok  # a consistent forgery: only the head kept elsewhere shows it
    res = _verify(path2, head=head)
    assert not res.ok and res.first_bad == 6 and "another hash" in str(res.reason)
    # the exported chain is checked the same way
    with AuditStore(path2, readonly=True) as s:
        lines = [r.to_dict() for r in s.iter_records()]
    assert not verify_records(lines, head=head).ok and verify_records(lines, head=Head(6, prev)).ok
    assert not verify_records(lines[:-1], head=Head(6, prev)).ok


@pytest.mark.parametrize("bad", [[1], "text", {"id": True}, {"id": 1, "hash": 3}])
def test_verify_records_never_raises_on_garbage_lines(bad: Any) -> None:
    count("security: audit tampering")
    res = verify_records([bad])
    assert not res.ok and res.first_bad == 1


# -- hostile text through every CLI command -------------------------------------------------------------------

HOSTILE = [
    "[/]", "[bold red]alarm[/bold red] [/]", "[link=file:///etc/passwd]click[/link]", "\x1b[2J\x1b[31mred",
    "\x1b]0;pwned\x07title", "line\roverwrite", "bidi \u202eevil\u202c text", "c1 \x9b31m csi", "nul \x00 byte",
    "<script>alert(1)</script>", "\u2028sep\u2029", "tab\tand\nnewline", "del \x7f", "{}[]\\\"'",
]
RAW_CONTROLS = ["\x1b", "\x9b", "\u202e", "\r", "\x00", "\x07", "\x7f", "\u2028"]


def _cli(*args: str) -> Any:
    from typer.testing import CliRunner

    from guardrails.cli.main import app

    return CliRunner().invoke(app, list(args))


@pytest.fixture
def hostile_db(tmp_path: Path) -> Path:
    path = tmp_path / "hostile.db"
    pol = Policy.from_dict({
        "name": "p [/] \x1b[31m", "saes": {"s": {"path": "bundled", "layer": 1}},
        "rules": [{"id": "r[/]\x1b", "detector": {"sae": "s", "features": [3]}, "threshold": 1.0}],
    })
    from guardrails.core.decision import Decision
    from guardrails.serving.result import GenerationResult

    with AuditStore(path) as s:
        for text in HOSTILE:
            d = Decision(action="block", rule="r[/]\x1b", score=2.0, threshold=1.0, position=1, scope="input",
                         token=text)
            s.record(GenerationResult(text=text, blocked=True, steered=False, decisions=[d], prompt=text,
                                      released_text=text, tokens=["a", text], token_scores={"r[/]\x1b": {1: 2.0}},
                                      prompt_length=2, policy=pol.name), FakeGuard(pol))
    return path


def _commands(db: Path, out: Path) -> list[list[str]]:
    n = len(HOSTILE)
    cmds = [["audit", "list", "--db", str(db)], ["audit", "list", "--db", str(db), "--json"],
            ["audit", "export", "--db", str(db)], ["audit", "verify", "--db", str(db)],
            ["report", "--summary", "--db", str(db), "--out", str(out / "summary.html")],
            ["audit", "list", "--db", str(db), "--rule", "[/]"], ["audit", "list", "--db", str(db), "--policy", "\x1b"]]
    for i in range(1, n + 1):
        cmds += [["audit", "show", str(i), "--db", str(db)], ["audit", "show", str(i), "--db", str(db), "--json"],
                 ["report", str(i), "--db", str(db), "--out", str(out / f"r{i}.html")]]
    return cmds


def test_hostile_text_never_breaks_or_reaches_the_terminal_raw(hostile_db: Path, tmp_path: Path) -> None:
    for cmd in _commands(hostile_db, tmp_path):
        count("security: CLI injection attempts")
        res = _cli(*cmd)
        assert res.exit_code == 0, (cmd, res.output)
        assert res.exception is None or isinstance(res.exception, SystemExit), (cmd, res.exception)
        for c in RAW_CONTROLS:
            assert c not in res.output, (cmd, repr(c))
        if "--json" in cmd or cmd[:2] == ["audit", "export"]:
            for line in res.stdout.split("\n" if "show" not in cmd else "\0"):
                if line.strip():
                    json.loads(line)
    # JSON loads back to the stored strings exactly (the escapes are JSON escapes)
    rows = [json.loads(x) for x in _cli("audit", "list", "--db", str(hostile_db), "--json").stdout.splitlines()]
    assert sorted(r["input"]["text"] for r in rows) == sorted(HOSTILE)
    assert verify_records(rows[::-1]).ok
    shown = _cli("audit", "show", "1", "--db", str(hostile_db)).output
    assert "[/]" in shown  # shown literally, not interpreted
    for i in range(1, len(HOSTILE) + 1):
        page = (tmp_path / f"r{i}.html").read_text()
        assert "<script>alert(1)</script>" not in page


def test_cli_errors_with_markup_in_the_message_do_not_crash(tmp_path: Path) -> None:
    count("security: CLI injection attempts", 2)
    res = _cli("audit", "list", "--db", str(tmp_path / "[/]\x1b[2J.db"))
    assert res.exit_code == 2 and "not found" in res.output and "\x1b" not in res.output
    bad = tmp_path / "[bold]x[red].yaml"
    bad.write_text("name: [/]\nrules: 3\n")
    res = _cli("validate", str(bad))
    assert res.exit_code == 1 and "invalid" in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)


@pytest.mark.parametrize(("args", "message"), [
    (["audit", "show", "100000000000"], "no audit record 100000000000"),
    (["report", "100000000000"], "no audit record 100000000000"),
    (["audit", "show", "99999999999999999999"], "Input should be"),
    (["report", "99999999999999999999"], "Input should be"),
    (["audit", "show", "0"], "Input should be"),
    (["audit", "show", "-5"], ""),
    (["audit", "list", "--limit", "99999999999999999999"], "Input should be"),
    (["audit", "list", "--limit", "0"], "Input should be"),
    (["audit", "list", "--since", "99999999999d"], "before the year 1"),
    (["audit", "list", "--since", "9" * 40 + "d"], "invalid --since"),
    (["audit", "list", "--since", "99999999999w"], "before the year 1"),
])
def test_integer_arguments_are_bounded(hostile_db: Path, args: list[str], message: str) -> None:
    count("security: CLI bounds")
    res = _cli(*args, "--db", str(hostile_db))
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output, res.output
    assert not isinstance(res.exception, OverflowError | ValueError | TypeError)


def test_a_large_limit_within_bounds_works(hostile_db: Path) -> None:
    res = _cli("audit", "list", "--db", str(hostile_db), "--limit", "100000000000")
    assert res.exit_code == 0 and f"{len(HOSTILE)} record(s) shown" in res.output


# -- hostile policies -------------------------------------------------------------------------------------------

BASE = """
name: p
saes: {s: {path: bundled, layer: 1}}
rules:
  - id: r
    action: ACTION
    threshold: THRESHOLD
    detector: {sae: s, features: [{id: FID, weight: WEIGHT}], bias: BIAS, window: WINDOW}
STEER
"""


def _policy(**kw: str) -> str:
    vals = {"ACTION": "block", "THRESHOLD": "1.5", "FID": "3", "WEIGHT": "1.0", "BIAS": "0.0", "WINDOW": "1",
            "STEER": ""}
    vals.update(kw)
    text = BASE
    for k, v in vals.items():
        text = text.replace(k, v)
    return text


NON_FINITE = [".nan", ".NaN", "-.inf", ".inf", "+.inf", "1.0e400", "1e400", "-1e999"]


@pytest.mark.parametrize("value", NON_FINITE)
@pytest.mark.parametrize("where", ["THRESHOLD", "WEIGHT", "BIAS"])
def test_non_finite_numbers_are_refused(where: str, value: str) -> None:
    count("security: non-finite numbers tried")
    path = {"THRESHOLD": "rules[0].threshold", "WEIGHT": "rules[0].detector.features[0].weight",
            "BIAS": "rules[0].detector.bias"}[where]
    with pytest.raises(PolicyError, match=rf"{path.replace('[', '.').replace(']', '.')}"):
        Policy.from_yaml(_policy(**{where: value}))


@pytest.mark.parametrize("value", NON_FINITE)
@pytest.mark.parametrize("field", ["strength", "block_above"])
def test_non_finite_steering_numbers_are_refused(field: str, value: str) -> None:
    count("security: non-finite numbers tried")
    with pytest.raises(PolicyError, match=rf"rules.0..steer.{field}"):
        Policy.from_yaml(_policy(ACTION="steer", STEER=f"    steer: {{{field}: {value}}}"))


def test_finite_numbers_in_every_form_are_accepted() -> None:
    for v, want in (("1e9", 1e9), ("1.0e9", 1e9), ("2E-3", 2e-3), ("15", 15.0), (".5", 0.5), ("-3", -3.0)):
        count("security: non-finite numbers tried")
        assert Policy.from_yaml(_policy(THRESHOLD=v)).rules[0].threshold == want


def test_a_nan_threshold_would_have_failed_open() -> None:
    """The reason for the check: a NaN threshold compares False with every score, so nothing ever trips."""
    nan = float("nan")
    assert not any(s >= nan for s in (0.0, 8.16, 1e30))


@pytest.mark.parametrize(("yaml_text", "key", "lines"), [
    (_policy().replace("    threshold: 1.5\n", "    threshold: 15\n    threshold: 1.0e9\n"), "threshold", (7, 8)),
    ("on_error: block\n" + _policy() + "on_error: allow\n", "on_error", (1, 11)),
    (_policy().replace("name: p\n", "name: p\nname: q\n"), "name", (2, 3)),
    (_policy().replace("{id: 3, weight: 1.0}", "{id: 3, id: 4}"), "id", (8, 8)),
])
def test_duplicate_keys_are_errors_naming_the_key_and_both_lines(yaml_text: str, key: str, lines: tuple[int, int],
                                                                 ) -> None:
    count("security: duplicate keys tried")
    with pytest.raises(PolicyError, match=rf"duplicate key '{key}' at line {lines[1]} \(first at line {lines[0]}\)"):
        Policy.from_yaml(yaml_text)


@pytest.mark.parametrize(("kw", "path"), [
    ({"FID": "true"}, "features.0..id"), ({"FID": '"4828"'}, "features.0..id"), ({"FID": "4828.0"}, "features.0..id"),
    ({"WINDOW": "true"}, "window"), ({"WINDOW": "2.0"}, "window"), ({"WINDOW": '"2"'}, "window"),
    ({"THRESHOLD": "true"}, "threshold"), ({"THRESHOLD": '"1.5"'}, "threshold"), ({"WEIGHT": "false"}, "weight"),
])
def test_ids_and_counts_are_strict_integers_and_numbers_are_numbers(kw: dict[str, str], path: str) -> None:
    count("security: strict integers tried")
    with pytest.raises(PolicyError, match=path.replace(".", r"[.\[\]]")):
        Policy.from_yaml(_policy(**kw))


@pytest.mark.parametrize(("old", "new", "path"), [
    ("layer: 1}", "layer: true}", "saes.s.layer"), ("layer: 1}", 'layer: "1"}', "saes.s.layer"),
    ("layer: 1}", "layer: 1.0}", "saes.s.layer"), ("layer: 1}", "layer: 1, k: true}", "saes.s.k"),
    ("features: [{id: 3, weight: 1.0}]", "features: {4828.0: 1.0}", "features"),
    ("features: [{id: 3, weight: 1.0}]", "features: [true]", "features"),
])
def test_strict_integers_elsewhere(old: str, new: str, path: str) -> None:
    count("security: strict integers tried")
    with pytest.raises(PolicyError, match=path.replace(".", r"[.\[\]]")):
        Policy.from_yaml(_policy().replace(old, new))


def test_steer_feature_ids_are_strict() -> None:
    count("security: strict integers tried")
    with pytest.raises(PolicyError, match=r"steer\.features"):
        Policy.from_yaml(_policy(ACTION="steer", STEER="    steer: {features: [true]}"))


def _with_timeout(fn: Any, seconds: float = 20.0) -> Any:
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "hung (a FIFO opened for reading blocks until a writer comes)"
    return box


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs mkfifo")
def test_fifo_paths_are_refused_not_waited_on(tmp_path: Path, lm: Any, tok: Any) -> None:
    from guardrails.serving.generation import GuardedModel
    from tests.builders import HIDDEN

    count("security: hostile files", 3)
    fifo = tmp_path / "weights.safetensors"
    os.mkfifo(fifo)
    pol = Policy.from_dict({"name": "f", "rules": [{"id": "lin", "threshold": 1.0, "detector": {
        "kind": "linear", "layer": 1, "weights": str(fifo)}}]})
    box = _with_timeout(lambda: GuardedModel(lm("llama"), tok, pol))
    assert isinstance(box.get("error"), PolicyError) and "FIFO" in str(box["error"]), box
    assert "rules[0].detector.weights" in str(box["error"])
    pfifo = tmp_path / "policy.yaml"
    os.mkfifo(pfifo)
    box = _with_timeout(lambda: Policy.from_path(pfifo))
    assert isinstance(box.get("error"), PolicyError) and "not a regular file" in str(box["error"])
    # a linear weights file holding NaN fails open: refused too
    import torch
    from safetensors.torch import save_file

    w = torch.zeros(HIDDEN)
    w[0] = float("nan")
    save_file({"weight": w}, str(tmp_path / "nan.safetensors"))
    pol = Policy.from_dict({"name": "f", "rules": [{"id": "lin", "threshold": 1.0, "detector": {
        "kind": "linear", "layer": 1, "weights": str(tmp_path / "nan.safetensors")}}]})
    with pytest.raises(PolicyError, match="NaN or infinite"):
        GuardedModel(lm("llama"), tok, pol)


def test_max_new_tokens_must_be_an_int_not_a_bool(lm: Any, tok: Any) -> None:
    from guardrails.serving.generation import GuardedModel
    from tests.builders import random_sae

    count("security: hostile arguments", 4)
    g = GuardedModel(lm("llama"), tok, make_policy(), saes={"s": random_sae()})
    for bad in (True, False, 2.0, "3"):
        with pytest.raises((ValueError, TypeError), match="max_new_tokens"):
            g.generate("hi there", max_new_tokens=bad)


@pytest.mark.parametrize("text", [*HOSTILE, "\ud800 lone surrogate", "\U0001f600 emoji and ünïcödé stay"])
def test_safe_output_helpers(text: str) -> None:
    """cli/safe.py, checked on its own: no raw control byte survives, markup is text, JSON round-trips."""
    from rich.console import Console

    from guardrails.cli.safe import cell, dumps, markup, visible

    count("security: CLI injection attempts")
    shown = visible(text)
    assert not any(c in shown for c in [*RAW_CONTROLS, "\n", "\t", "\ud800"])
    assert visible(text, keep_newlines=True).count("\n") == text.count("\n")
    assert all(c in shown for c in text if c.isalnum() and c.isascii())  # ordinary text is kept as is
    console = Console(record=True, width=200, force_terminal=False)
    console.print(markup(text))  # would raise MarkupError if "[/]" were parsed
    console.print(cell(text))
    out = console.export_text()
    if "[/]" in text:
        assert "[/]" in out
    assert json.loads(dumps({"t": text})) == {"t": text}
    assert not any(c in dumps({"t": text}) for c in [*RAW_CONTROLS, "\ud800"])
    if "ünïcödé" in text:
        assert visible(text) == text and "ünïcödé" in dumps(text)
