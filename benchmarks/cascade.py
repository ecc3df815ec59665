"""Cascade benchmark: a policy's probe first, a second-stage judge only on its uncertain band.

    python benchmarks/cascade.py score [--policy harmful-requests] [--dtype bfloat16] [--limit 200]
    python benchmarks/cascade.py sweep [--judge guardrails.offline.text_judge:bundled_judge]

``score`` caches per-row windowed token scores of the policy's first rule on the labeled sets in
``calibration/data/eval/`` (the engine's scoring of cached residuals: the numbers ``GuardedModel.score``
gives) to ``benchmarks/results/cascade_scores.json``. ``sweep`` reads that cache and, for thresholds
(the policy's, and lower ones that widen the band) and ``escalate_above`` values, applies the cascade of
:mod:`guardrails.core.semantics` row by row: the first token at or above the threshold decides; at or
above ``escalate_above`` it acts directly, below it the judge reads the prompt (what an input rule's judge
reads in serving) and its verdict decides. It reports TPR on the harmful rows, FPR on the benign ones,
the share of rows escalated (judge calls) and the judge alone on the same rows, per set. The default
judge is the offline TF-IDF + logistic-regression text classifier of :mod:`guardrails.offline.text_judge`
(fitted on training sources only): a stand-in for an LLM judge such as Llama Guard, not a claim about one.
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from guardrails.core.cascade import JudgeRequest, to_verdict  # noqa: E402
from guardrails.offline.cascade_eval import cascade_row  # noqa: E402

EVAL = ROOT / "calibration" / "data" / "eval"
CACHE = ROOT / "benchmarks" / "results" / "cascade_scores.json"


def score(policy_name: str, dtype: str | None, limit: int | None, out: Path) -> dict[str, Any]:
    """Per-row windowed token scores of the policy's first rule on every eval set (cached to ``out``)."""
    import _util
    import torch

    from guardrails.cli.session import Session
    from guardrails.offline.calibrate import load_labeled, rule_scope
    from guardrails.offline.scoring import token_scores

    torch.set_num_threads(2)
    policy = _util.load_policy(policy_name)
    rule = policy.rules[0]
    session = Session("bundled", progress=False, dtype=dtype)
    sets: dict[str, Any] = {}
    for path in sorted(EVAL.glob("*.jsonl")):
        t0 = time.perf_counter()
        data = load_labeled(path, limit=limit)
        rows = session.rule_rows(data, policy, rule, rule_scope(rule))  # every layer the rule reads
        per_row = token_scores(session.guard(policy), rule.id, rows)
        sets[path.stem] = {
            "path": str(path.relative_to(ROOT)), "sha256": data.sha256, "texts": list(data.texts),
            "labels": [int(x) for x in data.labels], "sources": list(data.sources),
            "scores": [[round(float(v), 5) for v in s] for s in per_row],
        }
        print(f"{path.stem}: {len(data)} rows in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    res = {"policy": policy.name, "policy_digest": policy.digest, "rule": rule.id, "scope": rule.scope,
           "threshold": float(rule.threshold), "dtype": dtype or "float32", "limit": limit, "sets": sets}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res), encoding="utf-8")
    return res



def _rates(caught: np.ndarray, escalated: np.ndarray, y: np.ndarray) -> dict[str, float | int]:
    pos, neg = y == 1, y == 0
    return {"n": len(y), "tpr": float(caught[pos].mean()) if pos.any() else math.nan,
            "fpr": float(caught[neg].mean()) if neg.any() else math.nan, "escalated": float(escalated.mean())}


def sweep(cache: dict[str, Any], judge: Any, held_out: set[str] | None = None) -> dict[str, Any]:
    """TPR/FPR/share escalated per (threshold, escalate_above) on every set, the whole-source held-out rows,
    and all rows; the judge's verdict is computed once per row (it is what the judge would answer)."""
    thr0 = float(cache["threshold"])
    rows = [(name, t, int(y), src, sc) for name, st in cache["sets"].items()
            for t, y, src, sc in zip(st["texts"], st["labels"], st["sources"], st["scores"], strict=True)]
    t0 = time.perf_counter()
    verdicts = [bool(to_verdict(judge(JudgeRequest(t, t, cache["rule"], "input", math.nan, "judge"))).harmful)
                for _, t, _, _, _ in rows]
    judge_s = (time.perf_counter() - t0) / max(1, len(rows))
    y = np.array([r[2] for r in rows])
    groups = {"all": np.ones(len(rows), dtype=bool)}
    if held_out is not None:
        groups["held_out_sources"] = np.array([r[3] not in held_out for r in rows])
    for name in cache["sets"]:
        groups[name] = np.array([r[0] == name for r in rows])
    grid = []
    for dt in (0.0, -0.25, -0.5):
        thr = thr0 + dt
        for de in (None, 0.25, 0.5, 0.75, 1.0, 1.5, math.inf):
            esc = None if de is None else thr + de
            out = [cascade_row(r[4], thr, esc, lambda v=v: v) for r, v in zip(rows, verdicts, strict=True)]
            caught = np.array([o[0] for o in out])
            escalated = np.array([o[1] for o in out])
            grid.append({"threshold": round(thr, 4),
                         "escalate_above": None if esc is None else "inf" if math.isinf(esc) else round(esc, 4),
                         **{g: _rates(caught[m], escalated[m], y[m]) for g, m in groups.items()}})
    v = np.array(verdicts)
    judge_alone = {g: _rates(v[m], np.ones(int(m.sum()), dtype=bool), y[m]) for g, m in groups.items()}
    return {"policy": cache["policy"], "rule": cache["rule"], "policy_threshold": thr0, "dtype": cache["dtype"],
            "judge": repr(judge), "judge_ms_per_row": round(judge_s * 1e3, 3), "judge_alone": judge_alone,
            "grid": grid}


def _print(res: dict[str, Any]) -> None:
    cols = [g for g in res["grid"][0] if isinstance(res["grid"][0][g], dict)]
    print(f"policy {res['policy']} (rule {res['rule']}, threshold {res['policy_threshold']}, {res['dtype']}); "
          f"judge {res['judge']} ({res['judge_ms_per_row']} ms/row)")
    print("TPR / FPR / share escalated per group")
    print(f"{'threshold':>9} {'escalate':>8}  " + "  ".join(f"{g[:22]:>22}" for g in cols))

    def cell(m: dict[str, Any]) -> str:
        def f(x: Any) -> str:
            return "  - " if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"

        return f"{f(m['tpr'])}/{f(m['fpr'])}/{f(m['escalated'])}"

    for row in res["grid"]:
        e = row["escalate_above"]
        esc = "-" if e is None else e if isinstance(e, str) else f"{e:.2f}"
        print(f"{row['threshold']:>9.3f} {esc:>8}  " + "  ".join(f"{cell(row[g]):>22}" for g in cols))
    print(f"{'judge':>9} {'alone':>8}  " + "  ".join(f"{cell(res['judge_alone'][g]):>22}" for g in cols))


def training_sources() -> set[str]:
    """Sources of the judge's and the probe's training and calibration splits (rows from them are not held out)."""
    out: set[str] = set()
    for f in ("harmful_requests.train", "jailbreak_wrapped.train", "harmful_requests.cal", "jailbreak_wrapped.cal"):
        for line in (ROOT / "calibration" / "data" / f"{f}.jsonl").read_text(encoding="utf-8").splitlines():
            if line.strip():
                out.add(str(json.loads(line).get("source", "")))
    return out


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=["score", "sweep"])
    p.add_argument("--policy", default="harmful-requests")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--limit", type=int, default=None, help="rows per set (stratified)")
    p.add_argument("--cache", default=str(CACHE))
    p.add_argument("--judge", default="guardrails.offline.text_judge:bundled_judge()",
                   help="module:callable (a factory with '()') taking a JudgeRequest")
    p.add_argument("--json-out", default=None)
    a = p.parse_args(argv)
    if a.mode == "score":
        r = score(a.policy, a.dtype, a.limit, Path(a.cache))
        print(json.dumps({k: v for k, v in r.items() if k != "sets"}))
        return
    from guardrails.core.judge_paths import import_judge

    res = sweep(json.loads(Path(a.cache).read_text(encoding="utf-8")), import_judge(a.judge), training_sources())
    _print(res)
    line = json.dumps(_finite(res))
    if a.json_out:
        Path(a.json_out).write_text(line + "\n", encoding="utf-8")
    print(line)


def _finite(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


if __name__ == "__main__":
    main(sys.argv[1:])
