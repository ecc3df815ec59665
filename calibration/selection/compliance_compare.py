#!/usr/bin/env python3
"""Two output policies on the same answer rows: the AUROC difference per group with a paired bootstrap interval.

Each policy's gated answer score as served (``compliance_heldout.gated``) on the response test split, from cached
residuals (float32). Groups: the test split, the sources held out of every fit pooled and one by one, and every
other source with both labels. A resample draws rows with replacement within each label of the group (the same
rows for both policies), so the interval is that of the difference, not of either AUROC.

    SELECTION_DTYPE=float32 python calibration/selection/compliance_compare.py policies/v036-compliance.yaml \\
        policies/harmful-compliance.yaml [--score-on cut|whole] [--resamples 2000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from compliance_heldout import gated  # noqa: E402
from maxwin import auroc  # noqa: E402
from responses_probe import CUTS, HELD, family  # noqa: E402
from select_detectors import Set  # noqa: E402

from guardrails.core.policy import Policy  # noqa: E402


def scores(path: Path, cut: str = "cut") -> np.ndarray:
    rule = next(r for r in Policy.from_path(path).rules if r.scope == "output")
    return gated(path, rule, "test", cut)


def compare(a: np.ndarray, b: np.ndarray, y: np.ndarray, resamples: int, seed: int = 0) -> dict[str, float]:
    """AUROC of ``a`` and ``b`` on the same rows, their difference ``b - a`` and its 95% paired bootstrap interval."""
    rng = np.random.default_rng(seed)
    pos, neg = np.nonzero(y == 1)[0], np.nonzero(y == 0)[0]
    diffs = np.empty(resamples)
    for k in range(resamples):
        p, n = rng.choice(pos, len(pos)), rng.choice(neg, len(neg))
        diffs[k] = auroc(b[p], b[n]) - auroc(a[p], a[n])
    lo, hi = np.quantile(diffs, [0.025, 0.975])
    base, new = auroc(a[pos], a[neg]), auroc(b[pos], b[neg])
    return {"n": len(y), "auroc_a": round(base, 4), "auroc_b": round(new, 4), "diff": round(new - base, 4),
            "ci95": [round(float(lo), 4), round(float(hi), 4)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("policy_a", type=Path, help="the baseline output policy")
    ap.add_argument("policy_b", type=Path, help="the policy compared with it")
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--score-on", choices=tuple(CUTS), default="cut",
                    help="replies cut to 400 characters (the caches up to v0.3.7) or 'whole' (as served)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    for p in (args.policy_a, args.policy_b):
        if not p.is_file():
            ap.error(f"{p}: no such policy file")
    test = Set(f"{CUTS[args.score_on]}.test")
    y, src = test.labels, np.array(test.sources)
    a, b = scores(args.policy_a, args.score_on), scores(args.policy_b, args.score_on)
    held = np.isin([family(s) for s in src], HELD)
    groups = {"test split": np.ones(len(y), bool), "held-out sources pooled": held}
    for s in sorted(set(src)):
        m = src == s
        if len(set(y[m])) == 2:
            groups[s] = m
    out = {}
    print(f"AUROC {args.policy_a.name} -> {args.policy_b.name}, difference and its 95% paired bootstrap interval")
    for name, m in groups.items():
        out[name] = compare(a[m], b[m], y[m], args.resamples)
        r = out[name]
        print(f"  {name:34s} n={r['n']:5d}  {r['auroc_a']:.3f} -> {r['auroc_b']:.3f}  {r['diff']:+.3f} "
              f"[{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}]", flush=True)
    if args.json:
        doc = {"policy_a": args.policy_a.name, "policy_b": args.policy_b.name, "resamples": args.resamples,
               "score_on": args.score_on,
               "groups": out}
        args.json.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
