"""Faults during generation: the policy's on_error decides, the decision is recorded with its reason, no hook
is left, and the model's next plain call gives exactly the logits it gave before it was ever wrapped.

Faults: NaN / inf activations written by a hook registered before the guard's on the watched layer, a
detector that raises (``LayerScorer.rule_scores``), an SAE on the wrong device (``meta`` tensors: the
only wrong device a CPU machine has), a KeyboardInterrupt raised from a hook mid-generation, and a
stream the caller abandons or closes midway. The rule counts scored tokens (feature weight 0, bias 1),
so with the threshold out of reach every decision in a run comes from the fault.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from guardrails import GenerationResult, GuardedModel, Policy
from guardrails.audit.store import AuditStore
from guardrails.engine.hooks import decoder_layers, hidden_of, hooks_on, replace_hidden
from guardrails.engine.scorers import LayerScorer
from tests._counts import count
from tests.builders import random_sae

LAYER, NEW, REFUSAL = 1, 6, "Refused by the guard."
PROMPT = "Tell me a story"


def policy(on_error: str, *, mode: str = "exact") -> Policy:
    return Policy.from_yaml(f"""
name: faults
refusal: {REFUSAL}
on_error: {on_error}
score_mode: {mode}
saes: {{s: {{path: unused, layer: {LAYER}}}}}
rules:
  - id: r
    scope: output
    threshold: 1.0e9
    detector: {{sae: s, features: [{{id: 0, weight: 0.0}}, 3], bias: 1.0}}
""")


def one(r: GenerationResult | list[GenerationResult]) -> GenerationResult:
    assert isinstance(r, GenerationResult)
    return r


def greedy(model: Any, tok: Any, prompt: str = PROMPT) -> list[int]:
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=NEW, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
    return out[: out.index(tok.eos_token_id)] if tok.eos_token_id in out else out


@pytest.fixture
def plain(lm: Any, tok: Any) -> Iterator[tuple[Any, Callable[[], torch.Tensor]]]:
    """The model, and a function giving its plain logits on PROMPT; checks at teardown that nothing changed."""
    model = lm("llama")
    ids = tok(PROMPT, return_tensors="pt", add_special_tokens=False).input_ids

    def logits() -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=ids).logits

    before = logits()
    yield model, logits
    assert hooks_on(model) == 0
    assert torch.equal(logits(), before), "the model does not give its unguarded logits after the fault"


@pytest.fixture
def decode_fault(plain: Any) -> Iterator[Callable[[float], None]]:
    """``set_value(v)``: from now on, write ``v`` into the watched layer's output on decode steps (length 1)."""
    model, _ = plain
    state: dict[str, float | None] = {"value": None}

    def hook(_m: Any, _i: Any, output: Any) -> Any:
        h = hidden_of(output)
        if state["value"] is None or h.shape[1] != 1:
            return None
        return replace_hidden(output, torch.full_like(h, state["value"]))

    handle = decoder_layers(model)[LAYER].register_forward_hook(hook)  # before the guard's own hooks
    try:
        yield lambda v: state.__setitem__("value", v)
    finally:
        handle.remove()


def _raise_in_detector(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(self: LayerScorer, feats: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("detector exploded")

    monkeypatch.setattr(LayerScorer, "rule_scores", boom)


def _check_decided(r: GenerationResult, on_error: str, reason: str) -> None:
    errors = [d for d in r.decisions if d.action == "error"]
    assert errors and errors == r.decisions, r.decisions  # every decision comes from the fault
    assert all(d.resolution == on_error and d.reason and reason in d.reason for d in errors), errors
    assert errors[0].scope == "output" and errors[0].output_index == 0 and r.errors
    if on_error == "block":
        assert r.blocked and r.text == REFUSAL and r.released_text == "" and r.output_ids == []
        assert len(errors) == 1
    else:
        assert not r.blocked and r.text == r.released_text


ON_ERROR = ["block", "flag", "allow"]


@pytest.mark.parametrize("on_error", ON_ERROR)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_activations(plain: Any, decode_fault: Any, tok: Any, on_error: str, value: float) -> None:
    count("faults: non-finite activations")
    model, _ = plain
    guard = GuardedModel(model, tok, policy(on_error), saes={"s": random_sae()})
    decode_fault(value)
    r = one(guard.generate(PROMPT, max_new_tokens=NEW, chat=False))
    _check_decided(r, on_error, "non-finite")
    assert hooks_on(model) == 0


@pytest.mark.parametrize("mode", ["exact", "watched"])
@pytest.mark.parametrize("on_error", ON_ERROR)
def test_detector_raises(plain: Any, tok: Any, monkeypatch: pytest.MonkeyPatch, on_error: str, mode: str) -> None:
    count("faults: detector raises")
    model, _ = plain
    expected = greedy(model, tok)
    guard = GuardedModel(model, tok, policy(on_error, mode=mode), saes={"s": random_sae()})
    _raise_in_detector(monkeypatch)
    r = one(guard.generate(PROMPT, max_new_tokens=NEW, chat=False))
    _check_decided(r, on_error, "detector exploded")
    if on_error != "block":  # the fault is in the guard only: the output is the unguarded one, every token errs
        assert r.output_ids == expected
        assert len(r.decisions) == len(expected) + (len(expected) < NEW)  # + the eos step


@pytest.mark.parametrize("on_error", ON_ERROR)
def test_sae_on_the_wrong_device(plain: Any, tok: Any, on_error: str) -> None:
    count("faults: SAE on the wrong device")
    model, _ = plain
    expected = greedy(model, tok)
    sae = random_sae()
    guard = GuardedModel(model, tok, policy(on_error), saes={"s": sae})
    sae.to("meta")  # the weights leave the device the layer runs on
    r = one(guard.generate(PROMPT, max_new_tokens=NEW, chat=False))
    _check_decided(r, on_error, "device")
    if on_error != "block":
        assert r.output_ids == expected


@pytest.mark.parametrize("on_error", ["block", "flag"])
def test_fault_decisions_reach_the_audit_store(plain: Any, tok: Any, monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path, on_error: str) -> None:
    count("faults: detector raises (audited)")
    model, _ = plain
    store = AuditStore(tmp_path / "audit.db")
    guard = GuardedModel(model, tok, policy(on_error), saes={"s": random_sae()}, audit=store)
    _raise_in_detector(monkeypatch)
    r = one(guard.generate(PROMPT, max_new_tokens=NEW, chat=False))
    rec = store.get(1)
    assert store.count() == 1 and store.verify().ok
    assert rec.data["blocked"] == r.blocked == (on_error == "block")
    errs = [d for d in rec.data["decisions"] if d["action"] == "error"]
    assert errs and all(d["resolution"] == on_error and "detector exploded" in d["reason"] for d in errs)
    assert rec.data["output"]["released"]["text"] == r.released_text
    store.close()


def _interrupt_on_call(model: Any, n: int) -> Any:
    """A hook on lm_head raising KeyboardInterrupt on its ``n``-th call (the caller pressing Ctrl-C)."""
    calls = {"n": 0}

    def hook(*_: Any) -> None:
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt

    return model.lm_head.register_forward_hook(hook)


@pytest.mark.parametrize("at", [1, 2, 4])
@pytest.mark.parametrize("api", ["generate", "stream", "score-then-generate"])
def test_keyboard_interrupt_from_a_hook(plain: Any, tok: Any, api: str, at: int) -> None:
    count("faults: KeyboardInterrupt in a hook")
    model, _ = plain
    guard = GuardedModel(model, tok, policy("block"), saes={"s": random_sae()})
    handle = _interrupt_on_call(model, at)
    try:
        with pytest.raises(KeyboardInterrupt):
            if api == "stream":
                list(guard.stream(PROMPT, max_new_tokens=NEW, chat=False))
            else:
                if api == "score-then-generate":
                    guard.score([PROMPT], chat=False)  # stops before lm_head: not interrupted
                guard.generate(PROMPT, max_new_tokens=NEW, chat=False)
        assert hooks_on(model) == 0
    finally:
        handle.remove()
    assert one(guard.generate(PROMPT, max_new_tokens=NEW, chat=False)).output_ids == greedy(model, tok)


@pytest.mark.parametrize("after", [0, 1, 3])
@pytest.mark.parametrize("how", ["close", "abandon", "interrupt-consumer"])
def test_stream_stopped_by_the_caller(plain: Any, tok: Any, how: str, after: int) -> None:
    """Closing, abandoning, or raising in the consumer midway: no hook stays, other calls are unaffected."""
    count("faults: stream stopped by the caller")
    model, logits = plain
    guard = GuardedModel(model, tok, policy("block"), saes={"s": random_sae()})
    expected = greedy(model, tok)
    stream = guard.stream(PROMPT, max_new_tokens=NEW, chat=False)
    it = iter(stream)
    shown = [next(it) for _ in range(after)]
    if how == "interrupt-consumer":
        with pytest.raises(KeyboardInterrupt):
            for _piece in it:
                raise KeyboardInterrupt
    # suspended (not closed): hooks exist only inside a forward step, so none is left and others run plain
    assert hooks_on(model) == 0
    assert one(guard.generate(PROMPT, max_new_tokens=NEW, chat=False)).output_ids == expected
    if how == "close":
        stream.close()
        if after:  # a started stream keeps a result of what it showed (one never started decided nothing)
            assert stream.result is not None and stream.result.released_text == "".join(shown)
        else:
            assert stream.result is None
    elif how == "abandon":
        del it, stream
    assert "".join(shown) == tok.decode(expected, skip_special_tokens=True)[: len("".join(shown))]
    assert hooks_on(model) == 0
    _ = logits  # the fixture checks the logits at teardown


def test_sae_without_data_is_refused_when_the_guard_is_built(lm: Any, tok: Any) -> None:
    from guardrails import SAEError

    count("faults: SAE on the wrong device")
    with pytest.raises(SAEError, match="meta"):
        GuardedModel(lm("llama"), tok, policy("block"), saes={"s": random_sae().to("meta")})


# -- issue 16: streams the caller stops, a full disk mid-stream, failures after scoring --------------------------


def flag_all(on_error: str = "block") -> Policy:
    """A rule that flags every scored output token (so every generation has decisions to record)."""
    return Policy.from_yaml(f"""
name: flags
refusal: {REFUSAL}
on_error: {on_error}
saes: {{s: {{path: unused, layer: {LAYER}}}}}
rules:
  - id: f
    scope: output
    action: flag
    threshold: 0.5
    detector: {{sae: s, features: [{{id: 0, weight: 0.0}}], bias: 1.0}}
""")


STOPS = ["break", "close", "garbage-collected", "consumer-raises"]


@pytest.mark.parametrize("how", STOPS)
def test_a_stopped_stream_still_writes_its_record_of_what_it_showed(plain: Any, tok: Any, tmp_path: Path,
                                                                    how: str) -> None:
    import gc

    count("faults: stream stopped, record written")
    model, _ = plain
    store = AuditStore(tmp_path / "a.db")
    guard = GuardedModel(model, tok, flag_all(), saes={"s": random_sae()}, audit=store)
    stream = guard.stream(PROMPT, max_new_tokens=NEW, chat=False)
    shown: list[str] = []
    if how == "break":
        for piece in stream:
            shown.append(piece)
            if len(shown) == 2:
                break
        del piece
    elif how == "close":
        it = iter(stream)
        shown += [next(it), next(it)]
        stream.close()
    elif how == "garbage-collected":
        it = iter(stream)
        shown += [next(it), next(it)]
        result_holder = stream
        del it, stream
        result = result_holder.result
        del result_holder
        gc.collect()
        stream = None  # type: ignore[assignment]
    else:
        class Boom(Exception):
            pass

        with pytest.raises(Boom):
            for piece in stream:
                shown.append(piece)
                if len(shown) == 2:
                    raise Boom
        gc.collect()
    if stream is not None:
        if how != "close":
            stream._it.close()  # what the interpreter does when the stream is dropped
        result = stream.result
    recs = store.list()
    assert len(recs) == 1, f"{how}: no audit record of a stream that showed {shown!r}"
    rec = recs[0].data
    assert rec["output"]["released"]["text"] == "".join(shown) and rec.get("stream_stopped") is True
    assert rec["action"] == "flag" and rec["decisions"]
    if how != "garbage-collected":
        assert result is not None and result.released_text == "".join(shown)
    assert hooks_on(model) == 0
    store.close()


def test_full_audit_disk_mid_stream_shown_text_equals_released_text(plain: Any, tok: Any, tmp_path: Path) -> None:
    from guardrails.audit import AuditError

    count("faults: audit disk full mid-stream", 2)
    model, _ = plain
    store = AuditStore(tmp_path / "a.db")
    guard = GuardedModel(model, tok, flag_all("block"), saes={"s": random_sae()}, audit=store)
    stream = guard.stream(PROMPT, max_new_tokens=NEW, chat=False)  # check_writable passes here

    def full(*_: Any) -> int:  # the disk fills up while the stream runs (a real full disk: test below)
        raise AuditError(f"audit database {str(store.path)!r}: cannot write an audit record: database or disk is "
                         "full (disk or database full)")

    store.record = full  # type: ignore[method-assign]
    pieces = list(stream)
    r = stream.result
    assert r is not None and r.blocked and r.text == REFUSAL and any("audit record failed" in e for e in r.errors)
    assert pieces[-1] == "\n" + REFUSAL  # the refusal comes after the text already shown
    shown = "".join(pieces[:-1])
    assert shown and r.released_text == shown, (shown, r.released_text)
    assert store.count() == 0
    # and in generate(), where nothing was shown yet, nothing is released
    r2 = one(guard.generate(PROMPT, max_new_tokens=NEW, chat=False))
    assert r2.blocked and r2.released_text == "" and r2.text == REFUSAL
    store.close()


@pytest.mark.parametrize("on_error", ON_ERROR)
def test_a_failure_after_scoring_follows_on_error_in_streams(plain: Any, tok: Any, monkeypatch: pytest.MonkeyPatch,
                                                             on_error: str) -> None:
    count("faults: failure after scoring", 2)
    model, _ = plain
    guard = GuardedModel(model, tok, flag_all(on_error), saes={"s": random_sae()})

    def broken_result(*_: Any, **__: Any) -> Any:
        raise RuntimeError("result builder exploded")

    monkeypatch.setattr(guard, "_result", broken_result)
    stream = guard.stream(PROMPT, max_new_tokens=NEW, chat=False)
    pieces = list(stream)  # no exception reaches the consumer
    r = stream.result
    assert r is not None and any(d.action == "error" and d.resolution == on_error for d in r.decisions)
    assert any("result builder exploded" in e for e in r.errors)
    if on_error == "block":
        assert r.blocked and pieces[-1].endswith(REFUSAL) and r.released_text == "".join(pieces[:-1])
    else:
        assert not r.blocked and r.released_text == "".join(pieces) == r.text
    # a model failure mid-stream (after the prefill was scored)
    monkeypatch.undo()
    calls = {"n": 0}
    real = type(model).forward

    def flaky(self: Any, *a: Any, **kw: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("device lost")
        return real(self, *a, **kw)

    monkeypatch.setattr(type(model), "forward", flaky)
    stream = guard.stream(PROMPT, max_new_tokens=NEW, chat=False)
    pieces = list(stream)
    r = stream.result
    assert r is not None and any("device lost" in e for e in r.errors)
    assert r.blocked == (on_error == "block")
    shown = "".join(pieces[:-1]) if r.blocked else "".join(pieces)
    assert r.released_text == shown
    monkeypatch.undo()
    assert hooks_on(model) == 0


def test_tokenizer_padding_side_is_never_changed(plain: Any, tok: Any) -> None:
    import threading

    count("faults: tokenizer state", 4)
    model, _ = plain
    tok.padding_side = "right"
    guard = GuardedModel(model, tok, policy("block"), saes={"s": random_sae()})
    seen: set[str] = set()
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.add(tok.padding_side)

    w = threading.Thread(target=watch)
    w.start()
    try:
        threads = [threading.Thread(target=lambda: guard.generate([PROMPT, "Hi", "A much longer prompt here"],
                                                                  max_new_tokens=2, chat=False)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        stop.set()
        w.join()
    assert tok.padding_side == "right" and seen == {"right"}, seen


# -- issue 16: the store under fork, locks, full and read-only disks ---------------------------------------------


def test_fork_while_another_thread_writes(tmp_path: Path) -> None:
    import os
    import threading
    import time

    from tests.test_audit import FakeGuard, make_policy, make_result

    if not hasattr(os, "fork"):
        pytest.skip("needs fork")
    count("faults: fork while writing", 6)
    store = AuditStore(tmp_path / "a.db")
    guard = FakeGuard(make_policy())
    stop = threading.Event()

    def writer() -> None:
        while not stop.is_set():
            store.record(make_result("parent"), guard)

    t = threading.Thread(target=writer)
    t.start()
    pids = []
    try:
        for i in range(6):
            time.sleep(0.02)
            pid = os.fork()
            if pid == 0:  # child: the inherited store must work (its own connection), within a bounded time
                code = 1
                try:
                    store.record(make_result(f"child{i}"), guard)
                    code = 0
                finally:
                    os._exit(code)
            pids.append(pid)
        deadline = time.monotonic() + 60
        codes = {}
        while len(codes) < len(pids) and time.monotonic() < deadline:
            for pid in pids:
                if pid not in codes:
                    done, status = os.waitpid(pid, os.WNOHANG)
                    if done:
                        codes[pid] = os.waitstatus_to_exitcode(status)
            time.sleep(0.05)
        for pid in pids:
            if pid not in codes:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
    finally:
        stop.set()
        t.join()
    assert len(codes) == len(pids), "a forked child hung in the audit store"
    assert all(c == 0 for c in codes.values()), codes
    res = store.verify()
    texts = [r.data["input"]["text"] for r in store.iter_records()]
    assert res.ok and sum(x.startswith("Tell me how child") for x in texts) == 6
    store.close()


def test_a_locked_database_fails_within_the_bounded_wait(tmp_path: Path) -> None:
    import sqlite3

    from tests.test_audit import FakeGuard, make_policy, make_result

    count("faults: bounded waits")
    path = tmp_path / "a.db"
    AuditStore(path).close()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        store = AuditStore(path, busy_timeout_s=0.5)
    except Exception as exc:  # opening takes the write lock too (schema): same bounded error
        assert "locked" in str(exc) and "0.5 s" in str(exc)
    else:
        with pytest.raises(Exception, match=r"locked by another writer after 0\.5 s"):
            store.record(make_result(), FakeGuard(make_policy()))
        # the bound SQLite waits for, read back from the connection (not a wall-clock measurement)
        assert store._connection().execute("PRAGMA busy_timeout").fetchone()[0] == 500
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_disk_errors_name_the_cause(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLite says "disk I/O error" or "unable to open"; the store looks at the file system and says why."""
    import os
    import sqlite3
    from types import SimpleNamespace

    count("faults: disk errors named", 3)
    store = AuditStore(tmp_path / "a.db")
    real = os.statvfs

    def nearly_full(path: Any) -> Any:
        st = real(path)
        return SimpleNamespace(f_flag=st.f_flag, f_bavail=3, f_frsize=4096)

    monkeypatch.setattr(os, "statvfs", nearly_full)
    msg = str(store._error(sqlite3.OperationalError("disk I/O error"), "write an audit record"))
    assert "disk or database full" in msg and "12288 bytes free" in msg
    monkeypatch.setattr(os, "statvfs", lambda p: SimpleNamespace(f_flag=os.ST_RDONLY, f_bavail=10**9, f_frsize=4096))
    msg = str(store._error(sqlite3.OperationalError("unable to open database file"), "open"))
    assert "mounted read-only" in msg
    monkeypatch.undo()
    gone = AuditStore.__new__(AuditStore)
    gone.path, gone.busy_timeout_s = tmp_path / "missing" / "a.db", 1.0
    assert "does not exist" in str(gone._error(sqlite3.OperationalError("unable to open database file"), "open"))
    store.close()


def _tmpfs(path: Path, size: str) -> bool:
    import subprocess

    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def _umount(path: Path) -> None:
    import subprocess

    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_a_real_full_and_read_only_disk(tmp_path: Path) -> None:
    """On a real tmpfs (needs root and mount; skipped elsewhere): a full disk and a read-only remount."""
    import os
    import subprocess

    from guardrails.audit import AuditError
    from tests.test_audit import FakeGuard, make_policy, make_result

    mnt = tmp_path / "mnt"
    if not _tmpfs(mnt, "256k"):
        pytest.skip("cannot mount a tmpfs here")
    count("faults: disk errors named", 2)
    try:
        store = AuditStore(mnt / "a.db")
        store.record(make_result("first"), FakeGuard(make_policy()))
        fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError:
            pass
        finally:
            os.close(fd)
        with pytest.raises(AuditError, match="full") as exc:
            for i in range(50):
                store.record(make_result("x" * 20_000 + str(i)), FakeGuard(make_policy()))
        assert str(mnt / "a.db") in str(exc.value)
        store.close()
        (mnt / "filler").unlink()
        assert subprocess.run(["mount", "-o", "remount,ro", str(mnt)], capture_output=True).returncode == 0
        with pytest.raises(AuditError, match="read-only"):
            AuditStore(mnt / "a.db").record(make_result("y"), FakeGuard(make_policy()))
    finally:
        _umount(mnt)


@pytest.mark.parametrize("on_error", ON_ERROR)
def test_a_failure_building_the_result_follows_on_error_in_generate(plain: Any, tok: Any,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   on_error: str) -> None:
    count("faults: failure after scoring")
    model, _ = plain
    guard = GuardedModel(model, tok, flag_all(on_error), saes={"s": random_sae()})
    expected = tok.decode(greedy(model, tok), skip_special_tokens=True)

    def broken_result(*_: Any, **__: Any) -> Any:
        raise RuntimeError("result builder exploded")

    monkeypatch.setattr(guard, "_result", broken_result)
    r = one(guard.generate(PROMPT, max_new_tokens=NEW, chat=False))  # no exception reaches the caller
    assert any(d.action == "error" and d.resolution == on_error for d in r.decisions)
    if on_error == "block":
        assert r.blocked and r.text == REFUSAL
    else:
        assert not r.blocked and r.text == r.released_text == expected
