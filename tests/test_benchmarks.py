"""Smoke tests of the benchmarks: each runs as one command in --quick mode and ends with one JSON object.

Only the shape of the JSON is checked (and the correctness checks the benchmarks make themselves,
e.g. guarded output == unguarded output); never a timing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _run(name: str, *args: str, timeout: int = 900) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, str(BENCH / name), "--quick", "--threads", "1", *args],
                          capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    out = json.loads(last)
    assert isinstance(out, dict)
    assert out["quick"] is True and out["environment"]["threads"] == 1
    return out


def _numbers(row: dict[str, Any], keys: list[str]) -> None:
    for k in keys:
        assert isinstance(row[k], (int, float)) and row[k] >= 0, (k, row)


def test_scaling_quick_json_shape(tmp_path: Path) -> None:
    path = tmp_path / "scaling.json"
    out = _run("scaling.py", "--no-model", "--shapes", "SmolLM2", "--lengths", "128", "--json-out", str(path))
    assert out["benchmark"] == "scaling"
    assert json.loads(path.read_text()) == out
    rows = out["results"]
    assert {(r["mode"], r["length"]) for r in rows} == {("exact", 128), ("watched", 128)}
    for r in rows:
        _numbers(r, ["us_per_token_median", "us_per_token_best", "prompt_ms", "ratio_to_forward_flops"])
        assert r["width"] == r["d_sae"] // r["d_model"] == 16
    exact = next(r for r in rows if r["mode"] == "exact")
    watched = next(r for r in rows if r["mode"] == "watched")
    # bytes follow from the shapes: the full encoder vs 10 rows, float32
    assert exact["encoder_bytes"] == 9216 * 576 * 4 and watched["encoder_bytes"] == 10 * 576 * 4
    assert exact["ratio_to_forward_flops"] == pytest.approx(576 * 9216 / 0.135e9)


@pytest.mark.model
@pytest.mark.slow
def test_overhead_quick_json_shape() -> None:
    out = _run("overhead.py")
    assert out["benchmark"] == "overhead"
    modes = {(r["batch"], r["mode"], r["features"]) for r in out["results"]}
    assert modes == {(1, "none", 0), (1, "exact", 10), (1, "watched", 10)}
    for r in out["results"]:
        _numbers(r, ["tokens_per_s_median", "tokens_per_s_max", "ratio_median", "ratio_best", "tokens"])
    base = next(r for r in out["results"] if r["mode"] == "none")
    assert base["ratio_median"] == 1.0
    assert {m["mode"] for m in out["memory"]} == {"exact", "watched"}
    for m in out["memory"]:
        _numbers(m, ["guard_tensor_bytes", "watched_rows_bytes"])
    watched = next(m for m in out["memory"] if m["mode"] == "watched")
    assert watched["watched_rows_bytes"] == 10 * 576 * 4 + 10 * 4  # 10 encoder rows + 10 biases, float32


@pytest.mark.model
@pytest.mark.model
def test_operating_points_quick_json_shape() -> None:
    """The shipped point and the two moved thresholds come from the same scores: the best recall within the
    over-refusal budget is at least the shipped one wherever the shipped threshold is within it."""
    out = _run("operating_points.py")
    assert out["benchmark"] == "operating_points" and len(out["held_out_sources"]) == 4
    (rep,) = out["policies"]
    assert rep["policy"] == "harmful-requests" and rep["n_harmful"] == 8 and rep["n_over_refusal"] == 8
    best, cost = rep["best_recall_within_budget"], rep["over_refusal_at_target_recall"]
    for v in (rep["auroc"], rep["shipped"]["recall"], rep["shipped"]["over_refusal"], best["recall"],
              cost["over_refusal"]):
        assert 0.0 <= v <= 1.0
    assert rep["target_met_by_some_threshold"] == (best["recall"] >= cost["target_recall"])
    if rep["shipped"]["over_refusal"] <= best["max_over_refusal"]:  # the shipped threshold is one of those allowed
        assert best["recall"] >= rep["shipped"]["recall"]
    out = _run("operating_points.py", "--answers")  # the output guard's target, on answers with their prompts
    (rep,) = out["policies"]
    assert out["answers"] is True and rep["policy"] == "harmful-compliance" and rep["n_harmless"] == 8
    assert rep["harmless_at_target_recall"]["target_recall"] == 0.75 and 0.0 <= rep["shipped"]["harmless"] <= 1.0


def test_context_shift_quick_json_shape() -> None:
    """The request guard under each deployment context: the bare request changes no decision against itself; every
    context scores the same rows."""
    out = _run("context_shift.py")
    assert out["benchmark"] == "context_shift" and out["per_set"] == 3
    (rep,) = out["policies"]
    assert rep["policy"] == "harmful-requests" and len(rep["contexts"]) >= 4
    bare = rep["contexts"]["bare request (as every README figure)"]
    assert bare["decisions_changed"] == 0 and bare["mean_score_shift"] == 0.0 and bare["messages_before"] == []
    for r in rep["contexts"].values():
        assert r["rows"] == 15 and 0.0 <= r["auroc"] <= 1.0 and set(r["blocked"]) == set(bare["blocked"])


@pytest.mark.model
def test_context_shift_answers_quick_json_shape() -> None:
    """--answers: the output guard on prompt + response rows under the same contexts (--contexts: a subset)."""
    out = _run("context_shift.py", "--answers", "--policy", "harmful-compliance", "--contexts", "bare,support")
    (rep,) = out["policies"]
    assert rep["policy"] == "harmful-compliance"
    assert list(rep["contexts"]) == ["bare request (as every README figure)", "system: a product's support prompt"]
    bare = rep["contexts"]["bare request (as every README figure)"]
    assert set(bare["blocked"]) == {"harmful answers (test split)", "harmless answers (test split)"}
    assert bare["decisions_changed"] == 0 and all(r["rows"] == 6 for r in rep["contexts"].values())


@pytest.mark.parametrize("bad", ["support", "bare,nope"])
def test_context_shift_rejects_unknown_or_unanchored_contexts(bad: str) -> None:
    proc = subprocess.run([sys.executable, str(BENCH / "context_shift.py"), "--quick", "--contexts", bad],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and "--contexts" in proc.stderr and "support+exchange" in proc.stderr
    assert "'bare' first" in proc.stderr


@pytest.mark.parametrize(("script", "flag"), [("detection.py", "--policies"), ("operating_points.py", "--policy"),
                                             ("context_shift.py", "--policy"), ("serving.py", "--policy"),
                                             ("cascade.py", "--policy")])
def test_a_misspelt_policy_fails_naming_the_shipped_ones_before_the_model_loads(script: str, flag: str) -> None:
    args = ["score"] if script == "cascade.py" else []
    proc = subprocess.run([sys.executable, str(BENCH / script), *args, flag, "harmful-request"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"{script}: {flag}:" in proc.stderr and "harmful-requests-sae" in proc.stderr  # the valid names


@pytest.mark.model
@pytest.mark.slow
def test_peers_quick_json_shape() -> None:
    out = _run("peers.py", "--no-onnx")
    assert out["benchmark"] == "peers"
    methods = {c["method"] for c in out["cost"]}
    assert {"unguarded", "in-stream exact", "in-stream watched", "judge (post-hoc)",
            "torch text guard (post-hoc)"} <= methods
    for c in out["cost"]:
        _numbers(c, ["cost_ratio_median", "cost_ratio_best"])
    lat = out["latency"]
    j = out["onset"]["output_index"]
    for mode in ("exact", "watched"):
        # by construction the rule first trips at output token j: the in-stream guard decides there
        assert lat[f"in-stream {mode}"]["decided_at"] == j
        assert lat[f"in-stream {mode}"]["latency_tokens"] == 1
        assert lat[f"in-stream {mode}"]["shown_after_harm"] == 0
    assert lat["torch-scan (post-hoc)"]["latency_tokens"] >= 1


def test_output_scan_blocks_exactly_what_fires() -> None:
    # the shipped output guard behind a hosted model (SAEGuard): a steer rule cannot steer there, so it blocks
    proc = subprocess.run([sys.executable, str(BENCH / "output_scan.py"), "--limit", "24", "--by", "kind"],
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["rows"] == 24 and out["mismatches"] == 0
    harmful = out["groups"]["kind=harmful_answer"]
    assert harmful["blocked"] > 0 and harmful["flagged"] == 0  # blocked, not passed with a flag
    assert out["groups"]["kind=refusal"]["blocked"] == 0
