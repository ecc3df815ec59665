"""Audit store: record contents, the hash chain, append-only triggers, tampering, redaction, concurrency
across threads and processes, a killed writer, error mapping, and the CLI."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import signal
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from guardrails.audit.report import render_record
from guardrails.audit.store import (
    ACTIONS,
    GENESIS,
    AuditError,
    AuditStore,
    parse_since,
    verify_records,
)
from guardrails.core.policy import Policy
from guardrails.engine.run import Decision
from guardrails.serving.generation import GenerationResult, TextScore

# -- fakes: a guard object with what AuditStore reads, and results built by hand --------------------------------


def make_policy(name: str = "test-policy", redact: bool = False, threshold: float = 1.0) -> Policy:
    return Policy.from_dict({
        "name": name,
        "redact": redact,
        "saes": {"s": {"path": "bundled", "layer": 1}},
        "rules": [
            {"id": "harm", "detector": {"sae": "s", "features": [3]}, "threshold": threshold, "action": "block"},
            {"id": "pii", "detector": {"sae": "s", "features": [5]}, "threshold": 2.0, "action": "flag"},
        ],
    })


@dataclass
class FakeSAE:
    cfg: Any

    def __repr__(self) -> str:
        return f"FakeSAE(d_sae={self.cfg.d_sae})"


@dataclass
class FakeGuard:
    policy: Policy
    model: Any = None
    saes: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from types import SimpleNamespace

        self.model = SimpleNamespace(config=SimpleNamespace(name_or_path="org/fake-model"))
        self.saes = {"s": FakeSAE(SimpleNamespace(d_sae=256, d_model=64, k=8, architecture="topk", layer=1,
                                                  model=None))}


PROMPT_TOKENS = ["<s>", "Tell", "Ġme", "Ġhow"]
OUTPUT_TOKENS = ["ĠFirst", "Ġget", "Ġthe", "Ġsecretword"]


def make_result(marker: str = "", action: str = "block", redactable: str = "secretword") -> GenerationResult:
    """A blocked (or flagged/steered) generation over 8 tokens; the decision is at position 7."""
    tokens = [*PROMPT_TOKENS, *OUTPUT_TOKENS]
    tokens[-1] = "Ġ" + redactable
    scores = {"harm": {p: 0.1 * p for p in range(1, 8)}, "pii": {p: 0.25 * p for p in range(1, 8)}}
    d = Decision(action=action, rule="harm", score=0.7, threshold=0.6, position=7, scope="output",  # type: ignore[arg-type]
                 output_index=3, token=tokens[-1], top_features=((3, 4.5), (17, 1.25)))
    blocked = action == "block"
    released = " First get the" + ("" if blocked else " " + redactable)
    return GenerationResult(
        text="I can't help with that." if blocked else released, blocked=blocked, steered=action == "steer",
        decisions=[d], prompt=f"Tell me how {marker}", released_text=released, output_ids=[1, 2, 3],
        tokens=tokens, token_scores=scores, prompt_length=4, policy="test-policy",
    )


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@pytest.fixture
def store(tmp_path: Path) -> Any:
    s = AuditStore(tmp_path / "audit.db")
    yield s
    s.close()


# -- contents --------------------------------------------------------------------------------------------------------


def test_record_holds_what_happened(store: AuditStore) -> None:
    guard = FakeGuard(make_policy())
    result = make_result("m1")
    before = datetime.now(UTC)
    rid = store.record(result, guard)
    after = datetime.now(UTC)
    rec = store.get(rid).data
    assert rid == 1 and rec["id"] == 1
    t = datetime.fromisoformat(rec["time"].replace("Z", "+00:00"))
    assert before - timedelta(seconds=1) <= t <= after + timedelta(seconds=1) and rec["time"].endswith("Z")
    assert rec["policy"] == {"name": "test-policy", "version": "1", "digest": guard.policy.digest}
    assert rec["model"] == "org/fake-model"
    assert rec["saes"]["s"]["repr"] == "FakeSAE(d_sae=256)" and rec["saes"]["s"]["layer"] == 1
    assert rec["input"] == {"text": "Tell me how m1", "sha256": hashlib.sha256(b"Tell me how m1").hexdigest()}
    assert rec["output"]["text"] == "I can't help with that."
    assert rec["output"]["released"]["text"] == " First get the"
    assert (rec["blocked"], rec["steered"], rec["flagged"], rec["action"]) == (True, False, False, "block")
    expected_decision = {**result.decisions[0].to_dict(), "token": " secretword"}  # display form of the token
    assert rec["decisions"] == [expected_decision]
    assert rec["rules"]["harm"]["threshold"] == 1.0 and rec["rules"]["pii"]["action"] == "flag"
    tr = rec["trace"]
    assert tr["tokens"] == ["<s>", "Tell", " me", " how", " First", " get", " the", " secretword"]
    assert tr["prompt_length"] == 4 and tr["n_tokens"] == 8
    assert tr["scores"]["harm"] == [None] + [pytest.approx(0.1 * p) for p in range(1, 8)]
    assert tr["scores"]["pii"][4] == pytest.approx(1.0)


def test_summary_action_is_the_strongest(store: AuditStore) -> None:
    guard = FakeGuard(make_policy())
    for action in ("flag", "steer", "block"):
        store.record(make_result(action=action), guard)
    assert [r.action for r in store.list()] == ["block", "steer", "flag"]
    assert [r.id for r in store.list(action="steer")] == [2]
    assert store.list(action="allow") == []


def test_scan_record(store: AuditStore) -> None:
    guard = FakeGuard(make_policy())
    d = Decision(action="flag", rule="pii", score=2.5, threshold=2.0, position=2, scope="input", token="Ġme")
    ts = TextScore(scores={"harm": 0.3, "pii": 2.5}, token_scores={"pii": {1: 1.0, 2: 2.5}}, decisions=[d],
                   tokens=["<s>", "Tell", "Ġme"])
    rid = store.record_scan(ts, guard, "Tell me", "input")
    rec = store.get(rid).data
    assert rec["kind"] == "scan:input" and rec["action"] == "flag" and rec["flagged"] and not rec["blocked"]
    assert rec["input"]["text"] == "Tell me" and rec["scores"] == {"harm": 0.3, "pii": 2.5}
    assert rec["trace"]["scores"]["pii"] == [None, 1.0, 2.5]
    with pytest.raises(ValueError, match="kind"):
        store.record_scan(ts, guard, "Tell me", "")


@pytest.mark.parametrize("resolution", ["block", "flag"])
def test_scan_record_of_a_steer_a_scan_could_not_apply(store: AuditStore, resolution: str) -> None:
    # a scan cannot steer: the steer decision carries what the rule did instead (steer.scan_action)
    guard = FakeGuard(make_policy())
    d = Decision(action="steer", rule="harm", score=2.5, threshold=2.0, position=2, scope="input", token="Ġme",
                 resolution=resolution)
    ts = TextScore(scores={"harm": 2.5}, token_scores={"harm": {1: 1.0, 2: 2.5}}, decisions=[d],
                   tokens=["<s>", "Tell", "Ġme"])
    rec = store.get(store.record_scan(ts, guard, "Tell me", "output")).data
    assert rec["action"] == resolution and rec["blocked"] == (resolution == "block")
    assert rec["flagged"] == (resolution == "flag") and not rec["steered"]
    assert rec["decisions"][0]["action"] == "steer" and rec["decisions"][0]["resolution"] == resolution
    page = render_record(store.get(store.list()[0].id))
    assert '(in a scan: <span class="badge"' in page and f">{resolution}</span>)" in page


def test_list_filters(store: AuditStore) -> None:
    g1, g2 = FakeGuard(make_policy("p1")), FakeGuard(make_policy("p2"))
    store.record(make_result(action="flag"), g1)
    store.record(make_result(action="block"), g2)
    store.record(make_result(action="block"), g1)
    assert [r.id for r in store.list(policy="p1")] == [3, 1]
    assert [r.id for r in store.list(policy="p1", action="block")] == [3]
    assert [r.id for r in store.list(limit=2)] == [3, 2]
    assert [r.id for r in store.list(rule="harm")] == [3, 2, 1]
    assert store.list(rule="pii") == []
    t2 = store.get(2).time
    assert [r.id for r in store.list(since=t2)] == [3, 2]
    assert store.list(since=datetime.now(UTC) + timedelta(hours=1)) == []
    with pytest.raises(ValueError, match="valid: " + ", ".join(ACTIONS)):
        store.list(action="blok")
    with pytest.raises(KeyError, match=r"valid ids: 1\.\.3"):
        store.get(4)


def test_parse_since_forms() -> None:
    now = datetime(2024, 5, 10, 12, 30, tzinfo=UTC)
    assert parse_since("2h", now) == "2024-05-10T10:30:00.000000Z"
    assert parse_since("7d", now) == "2024-05-03T12:30:00.000000Z"
    assert parse_since("2024-05-01") == "2024-05-01T00:00:00.000000Z"
    assert parse_since("2024-05-01T10:00+02:00") == "2024-05-01T08:00:00.000000Z"
    for bad in ("yesterday", "7x", "2024-13-01"):
        with pytest.raises(ValueError, match="valid: YYYY-MM-DD"):
            parse_since(bad)


# -- the chain ------------------------------------------------------------------------------------------------------


def test_hash_chain_formula(store: AuditStore) -> None:
    guard = FakeGuard(make_policy())
    for i in range(3):
        store.record(make_result(f"m{i}"), guard)
    prev = "0" * 64
    for rid in (1, 2, 3):
        rec = store.get(rid)
        assert rec.prev_hash == prev
        assert rec.hash == hashlib.sha256((prev + canonical(rec.data)).encode()).hexdigest()
        prev = rec.hash
    res = store.verify()
    assert res.ok and res.checked == 3 and res.head == prev and res.first_bad is None


def test_update_and_delete_are_refused(store: AuditStore) -> None:
    store.record(make_result(), FakeGuard(make_policy()))
    raw = sqlite3.connect(store.path)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        raw.execute("UPDATE records SET body = '{}' WHERE id = 1")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        raw.execute("DELETE FROM records")
    raw.close()
    assert not hasattr(store, "update") and not hasattr(store, "delete")
    assert store.verify().ok


def _tamper(path: Path, *sql: tuple[str, tuple[Any, ...]]) -> None:
    raw = sqlite3.connect(path)
    raw.execute("DROP TRIGGER records_no_update")
    raw.execute("DROP TRIGGER records_no_delete")
    for stmt, args in sql:
        raw.execute(stmt, args)
    raw.commit()
    raw.close()


@pytest.mark.parametrize("attack", ["edit", "edit-and-rehash", "delete", "column"])
def test_tampering_is_detected(tmp_path: Path, attack: str) -> None:
    path = tmp_path / "audit.db"
    with AuditStore(path) as s:
        for i in range(4):
            s.record(make_result(f"m{i}"), FakeGuard(make_policy()))
        rec2 = s.get(2)
    edited = canonical({**rec2.data, "input": {**rec2.data["input"], "text": "innocent"}})
    if attack == "edit":
        _tamper(path, ("UPDATE records SET body = ? WHERE id = 2", (edited,)))
        expect_bad, reason = 2, "edited"
    elif attack == "edit-and-rehash":  # recompute this record's hash: the next record's link breaks
        new_hash = hashlib.sha256((rec2.prev_hash + edited).encode()).hexdigest()
        _tamper(path, ("UPDATE records SET body = ?, hash = ? WHERE id = 2", (edited, new_hash)))
        expect_bad, reason = 3, "prev_hash"
    elif attack == "delete":
        _tamper(path, ("DELETE FROM records WHERE id = 2", ()))
        expect_bad, reason = 2, "missing"
    else:  # the indexed column the filters use, body untouched
        _tamper(path, ("UPDATE records SET action = 'allow' WHERE id = 2", ()))
        expect_bad, reason = 2, "columns"
    with AuditStore(path, readonly=True) as s:
        res = s.verify()
    assert not res.ok and res.first_bad == expect_bad and reason in str(res.reason)


def test_export_jsonl_round_trip_and_verify(tmp_path: Path, store: AuditStore) -> None:
    for i in range(3):
        store.record(make_result(f"m{i}"), FakeGuard(make_policy()))
    out = tmp_path / "audit.jsonl"
    assert store.export_jsonl(out) == 3
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert lines == [store.get(i).to_dict() for i in (1, 2, 3)]
    assert verify_records(lines).ok and verify_records(lines).head == store.verify().head
    lines[1]["output"]["text"] = "changed"
    res = verify_records(lines)
    assert not res.ok and res.first_bad == 2


# -- redaction ------------------------------------------------------------------------------------------------------


def test_redaction_stores_no_plain_text(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    guard = FakeGuard(make_policy(redact=True))
    result = make_result("zebracode", action="flag", redactable="secretword")
    with AuditStore(path) as s:
        rid = s.record(result, guard)
        rec = s.get(rid).data
        raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("audit.db"))
    assert rec["redacted"] is True
    assert rec["input"] == {"text": None, "sha256": hashlib.sha256(result.prompt.encode()).hexdigest()}
    assert rec["output"]["text"] is None and rec["output"]["sha256"] == hashlib.sha256(result.text.encode()).hexdigest()
    assert rec["trace"]["tokens"] is None and rec["decisions"][0]["token"] is None
    assert rec["trace"]["scores"]["harm"][7] == pytest.approx(0.7)  # scores are kept
    for secret in (b"zebracode", b"secretword", b"Tell me", b"First get"):
        assert secret not in raw


# -- errors -----------------------------------------------------------------------------------------------------------


def test_closed_store(tmp_path: Path) -> None:
    s = AuditStore(tmp_path / "a.db")
    s.close()
    s.close()  # twice is fine
    with pytest.raises(AuditError, match=r"a\.db.*closed"):
        s.record(make_result(), FakeGuard(make_policy()))
    with pytest.raises(AuditError, match="closed"):
        s.list()


def test_missing_directory_and_missing_db(tmp_path: Path) -> None:
    with pytest.raises(AuditError, match="does not exist"):
        AuditStore(tmp_path / "nope" / "a.db")
    with pytest.raises(AuditError, match="not found"):
        AuditStore(tmp_path / "absent.db", readonly=True)
    assert not (tmp_path / "absent.db").exists()


def test_read_only_store_refuses_writes(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    AuditStore(path).close()
    with AuditStore(path, readonly=True) as ro, pytest.raises(AuditError, match="read-only") as exc:
        ro.record(make_result(), FakeGuard(make_policy()))
    assert str(path) in str(exc.value)


def test_disk_full_is_an_audit_error_and_leaves_the_chain_intact(store: AuditStore) -> None:
    guard = FakeGuard(make_policy())
    store.record(make_result("first"), guard)
    conn = store._connection()
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")  # the file may not grow: SQLITE_FULL
    with pytest.raises(AuditError, match="full") as exc:
        store.record(make_result("x" * 200_000), guard)
    assert str(store.path) in str(exc.value)
    conn.execute("PRAGMA max_page_count = 1073741823")
    assert store.count() == 1 and store.verify().ok
    assert store.record(make_result("after"), guard) == 2


def test_guard_does_not_release_text_when_the_audit_write_fails(tmp_path: Path, lm: Any, tok: Any) -> None:
    """With the store closed, generate() either raises AuditError or (once GuardedModel applies on_error)
    returns a blocked result: never released text without a record."""
    from guardrails.serving.generation import GuardedModel
    from tests.builders import random_sae

    policy = Policy.from_dict({
        "name": "low", "saes": {"s": {"path": "unused", "layer": 1}},
        "rules": [{"id": "any", "detector": {"sae": "s", "features": list(range(256)), "combine": "max"},
                   "threshold": -1e9, "action": "flag"}],
    })
    store = AuditStore(tmp_path / "a.db")
    guard = GuardedModel(lm("llama"), tok, policy, saes={"s": random_sae(layer=1)}, audit=store, chat=False)
    store.close()
    try:
        result = guard.generate("hello there", max_new_tokens=3)
    except AuditError as exc:
        assert "closed" in str(exc)
    else:
        assert isinstance(result, GenerationResult)
        assert result.blocked and result.text == policy.refusal  # the caller gets the refusal, not the output
        assert any(d.action == "error" and "closed" in str(d.reason) for d in result.decisions)


# -- concurrency ------------------------------------------------------------------------------------------------------


def _check_all_there(path: Path, markers: set[str]) -> None:
    with AuditStore(path, readonly=True) as s:
        recs = list(s.iter_records())
        res = s.verify()
    got = [r.data["input"]["text"].removeprefix("Tell me how ") for r in recs]
    assert sorted(got) == sorted(markers)  # none lost, none duplicated
    assert [r.id for r in recs] == list(range(1, len(markers) + 1))
    assert res.ok and res.checked == len(markers)


def test_many_threads_one_store_and_own_stores(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    shared = AuditStore(path)
    guard = FakeGuard(make_policy())
    errors: list[BaseException] = []

    def work(name: str, own: bool) -> None:
        try:
            s = AuditStore(path) if own else shared
            for i in range(20):
                s.record(make_result(f"{name}-{i}"), guard)
            if own:
                s.close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(f"t{j}", j % 2 == 0)) for j in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    shared.close()
    assert errors == []
    _check_all_there(path, {f"t{j}-{i}" for j in range(8) for i in range(20)})


def _process_writer(path: str, name: str, n: int) -> None:
    guard = FakeGuard(make_policy())
    with AuditStore(path) as s:
        for i in range(n):
            s.record(make_result(f"{name}-{i}"), guard)


def test_many_processes(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    AuditStore(path).close()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_process_writer, args=(str(path), f"p{j}", 50)) for j in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    _check_all_there(path, {f"p{j}-{i}" for j in range(4) for i in range(50)})


def _endless_writer(path: str, log: str) -> None:
    """Write records until killed; after each commit, append 'id marker' to ``log`` (unbuffered)."""
    guard = FakeGuard(make_policy())
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    s = AuditStore(path)
    i = 0
    while True:
        rid = s.record(make_result(f"k-{i}"), guard)
        os.write(fd, f"{rid} k-{i}\n".encode())
        i += 1


def test_killed_writer_loses_no_committed_record(tmp_path: Path) -> None:
    path, log = tmp_path / "audit.db", tmp_path / "committed.log"
    AuditStore(path).close()
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=_endless_writer, args=(str(path), str(log)))
    p.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not log.exists() or log.read_text().count("\n") < 30):
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)  # mid-run, possibly inside a transaction
    p.join()
    assert p.exitcode == -signal.SIGKILL
    committed = [line.split() for line in log.read_text().splitlines()]
    assert len(committed) >= 30
    with AuditStore(path) as s:  # a fresh writer recovers the WAL
        for rid, marker in committed:
            assert s.get(int(rid)).data["input"]["text"] == f"Tell me how {marker}"
        n = s.count()
        assert n >= len(committed) and s.verify().ok
        assert s.record(make_result("after-crash"), FakeGuard(make_policy())) == n + 1
        assert s.verify().ok and s.verify().checked == n + 1


def test_genesis_constant() -> None:
    assert GENESIS == "0" * 64


# -- the real model ---------------------------------------------------------------------------------------------------


@pytest.mark.model
def test_real_generation_is_recorded(tmp_path: Path) -> None:
    import torch

    from guardrails.sae.model import SAE, SAEConfig
    from guardrails.serving.generation import GuardedModel
    from guardrails.serving.models import load_model

    model, tokenizer = load_model()
    bundled = Path(__file__).resolve().parent.parent / "guardrails" / "assets" / "sae" / "smollm2-135m-l15"
    if (bundled / "cfg.json").is_file():
        sae, sae_path = SAE.load("bundled"), "bundled"
    else:
        g = torch.Generator().manual_seed(0)
        cfg = SAEConfig(d_model=576, d_sae=1024, k=32, layer=15)
        sae = SAE(cfg, torch.randn(1024, 576, generator=g) / 24, torch.zeros(1024),
                  torch.randn(1024, 576, generator=g) / 24, torch.zeros(576))
        sae_path = str(sae.save(tmp_path / "sae"))
    policy = Policy.from_dict({
        "name": "audit-smoke", "saes": {"s": {"path": sae_path, "layer": 15}},
        "rules": [{"id": "any", "detector": {"sae": "s", "features": list(range(sae.d_sae)), "combine": "max"},
                   "threshold": 0.0, "action": "flag", "scope": "output"}],
    })
    store = AuditStore(tmp_path / "audit.db")
    guard = GuardedModel(model, tokenizer, policy, saes={"s": sae}, audit=store)
    result = guard.generate("Name a colour.", max_new_tokens=6)
    assert isinstance(result, GenerationResult) and result.decisions
    rec = store.list()[0].data
    assert rec["model"] == model.config.name_or_path
    assert rec["policy"]["digest"] == policy.digest and rec["saes"]["s"]["repr"] == repr(sae)
    assert rec["input"]["text"] == result.prompt and rec["output"]["text"] == result.text
    assert rec["decisions"][0]["position"] == result.decisions[0].position
    assert "".join(rec["trace"]["tokens"]) == tokenizer.decode(
        tokenizer.convert_tokens_to_ids(result.tokens))  # display tokens join back to the text
    store.close()


# -- CLI --------------------------------------------------------------------------------------------------------------


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "audit.db"
    with AuditStore(path) as s:
        s.record(make_result("one", action="flag"), FakeGuard(make_policy("p1")))
        s.record(make_result("two"), FakeGuard(make_policy("p2")))
        s.record(make_result("three", action="steer"), FakeGuard(make_policy("p1")))
    return path


def _cli(*args: str) -> Any:
    from typer.testing import CliRunner

    from guardrails.cli.main import app

    return CliRunner().invoke(app, list(args))


def test_cli_list_json_and_filters(db: Path) -> None:
    res = _cli("audit", "list", "--db", str(db), "--json")
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in res.stdout.splitlines()]
    assert [r["id"] for r in rows] == [3, 2, 1] and verify_records(rows[::-1]).ok
    res = _cli("audit", "list", "--db", str(db), "--json", "--policy", "p1", "--action", "steer")
    assert [json.loads(x)["id"] for x in res.stdout.splitlines()] == [3]
    res = _cli("audit", "list", "--db", str(db), "--json", "--since", "1h")
    assert len(res.stdout.splitlines()) == 3
    res = _cli("audit", "list", "--db", str(db), "--json", "--since", "2999-01-01")
    assert res.exit_code == 0 and res.stdout == ""
    res = _cli("audit", "list", "--db", str(db))
    assert res.exit_code == 0 and "3 record(s) shown" in res.output


def test_cli_show_export_verify(db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GUARDRAILS_AUDIT_DB", str(db))
    res = _cli("audit", "show", "2", "--json")
    with AuditStore(db, readonly=True) as s:
        assert json.loads(res.stdout) == s.get(2).to_dict()
        head = s.verify().head
    res = _cli("audit", "show", "2")
    assert res.exit_code == 0 and "Tell me how two" in res.output and "harm" in res.output
    out = tmp_path / "x.jsonl"
    assert _cli("audit", "export", "--out", str(out)).exit_code == 0
    assert verify_records(json.loads(x) for x in out.read_text().splitlines()).head == head
    res = _cli("audit", "export")
    assert res.stdout == out.read_text()
    res = _cli("audit", "verify")
    assert res.exit_code == 0 and "3 record(s) verified" in res.output and str(head) in res.output
    _tamper(db, ("UPDATE records SET body = replace(body, 'two', 'TWO') WHERE id = 2", ()))
    res = _cli("audit", "verify")
    assert res.exit_code == 1 and "record 2" in res.output and "edited" in res.output


def test_cli_outputs_make_their_folder_or_fail_first(db: Path, tmp_path: Path) -> None:
    """``--out mine/x`` makes ``mine/`` (as calibrate, discover, eval --rows and direction do: one helper); a path
    whose folder cannot be made fails before anything is written, naming the flag."""
    out, head = tmp_path / "new" / "x.jsonl", tmp_path / "other" / "head.json"
    res = _cli("audit", "export", "--db", str(db), "--out", str(out), "--head", str(head))
    assert res.exit_code == 0, res.output
    assert len(out.read_text().splitlines()) == 3 and json.loads(head.read_text())["id"] == 3
    res = _cli("report", "--summary", "--db", str(db), "--out", str(tmp_path / "html" / "s.html"))
    assert res.exit_code == 0 and (tmp_path / "html" / "s.html").read_text().startswith("<!")
    (tmp_path / "afile").write_text("")
    bad = tmp_path / "afile" / "x.jsonl"
    res = _cli("audit", "export", "--db", str(db), "--out", str(tmp_path / "y.jsonl"), "--head", str(bad))
    msg = " ".join(res.output.split())
    assert res.exit_code == 2 and f"--head {bad}: cannot create its folder" in msg, msg
    assert not (tmp_path / "y.jsonl").exists()  # failed before the export, not after it
    res = _cli("report", "--summary", "--db", str(db), "--out", str(tmp_path))
    assert res.exit_code == 2 and "is a folder; give a file path" in " ".join(res.output.split())


@pytest.mark.parametrize(("args", "message"), [
    (["audit", "list", "--action", "blok"], "unknown --action 'blok'; valid: block, steer, flag, error, allow"),
    (["audit", "list", "--since", "last week"], "valid: YYYY-MM-DD"),
    (["audit", "show", "7"], "no audit record 7"),
    (["audit", "show"], "Missing argument 'ID'"),
])
def test_cli_bad_input(db: Path, args: list[str], message: str) -> None:
    res = _cli(*args, "--db", str(db))
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output


def test_cli_missing_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GUARDRAILS_AUDIT_DB", raising=False)
    for cmd in (["audit", "list"], ["audit", "verify"], ["audit", "export"], ["audit", "show", "1"]):
        res = _cli(*cmd)
        assert res.exit_code == 2 and "guardrails-audit.db' not found" in res.output, cmd
        assert len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "guardrails-audit.db").exists()  # readers never create the database


def test_check_writable(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    s = AuditStore(path)
    s.check_writable()
    with AuditStore(path, readonly=True) as ro, pytest.raises(AuditError, match="read-only"):
        ro.check_writable()
    s.close()
    with pytest.raises(AuditError, match="closed"):
        s.check_writable()
