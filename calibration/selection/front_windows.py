#!/usr/bin/env python3
"""Do the short front windows decide? A request rule's served score is the highest mean over ``window`` scored
tokens, and the first tokens' windows are partial (they average what they have), so "how to kill" could decide before
"a stuck process" arrives. Here a rule's token scores are windowed with every window holding at least ``m`` tokens
(the whole row when it is shorter), the threshold refitted at 3% FPR on the cal split's benign rows, and
``heldout.py``'s report printed for the main sets. The rule is not refitted (its weights are the shipped ones).

    SELECTION_DTYPE=float32 python calibration/selection/front_windows.py policies/harmful-requests.yaml 1,4,8,16
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from heldout import Scorer, report
from select_detectors import Set

SETS = ("held-out harmful (all four)", "blind hand-written harmful (held out whole)",
        "blind hand-written contrasts (held out whole)", "short typed harmful (held out whole)",
        "short typed benign (held out whole)", "over-refusal set (evaluation only)",
        "form-paired harmful (evaluation only)", "form-paired twins (evaluation only)",
        "wrapped harmful, walledeval templates (held out whole)",
        "wrapped benign, walledeval templates (held out whole)",
        "reserved past (label 1)", "reserved future (label 1)", "benign requests in AdvBench's frames (held out whole)",
        "held-out benign sources", "reserved donotanswer (label 1)")


def windowed_max_min(tok: np.ndarray, offsets: np.ndarray, window: int, m: int) -> np.ndarray:
    """``select_detectors.windowed_max`` with the windows of fewer than ``min(m, row length)`` tokens left out."""
    offsets = np.asarray(offsets)
    lens = np.diff(offsets)
    out = np.full(len(lens), np.nan)
    ok = lens > 0
    cs = np.concatenate([[0.0], np.cumsum(tok, dtype=np.float64)])
    row_start = np.repeat(offsets[:-1], lens)
    ends = np.arange(1, offsets[-1] + 1)
    starts = np.maximum(ends - window, row_start)
    means = (cs[ends] - cs[starts]) / (ends - starts)
    means = np.where(ends - row_start >= np.minimum(m, np.repeat(lens, lens)), means, -np.inf)
    out[ok] = np.maximum.reduceat(means, offsets[:-1][ok])
    return out


class MinScorer:
    """``heldout.report``'s scorer: the policy's token scores, windows of at least ``m`` tokens, 3% cal threshold."""

    def __init__(self, base: Scorer, m: int) -> None:
        self.base, self.m, self.window = base, m, base.window
        self.name = f"{base.name} min{m}"
        cal = Set("requests.cal")
        self.threshold = float(np.quantile(self.rows(cal)[cal.labels == 0], 0.97))

    def rows(self, s: Set) -> np.ndarray:
        return windowed_max_min(self.base.tokens(s), s.offsets, self.window, self.m)


def main() -> None:
    base = Scorer(Path(sys.argv[1]))
    for m in (int(v) for v in sys.argv[2].split(",")):
        sc = MinScorer(base, m)
        rep = report(sc)  # type: ignore[arg-type]
        print(f"== min{m} thr {sc.threshold:.4f}", flush=True)
        for k in SETS:
            v = rep[k]
            extra = f" auroc {v['auroc']:.3f}" if "auroc" in v else ""
            print(f"  {k:60s} n={v['n']:<4} fired {v['blocked']:.3f}{extra}", flush=True)


if __name__ == "__main__":
    main()
