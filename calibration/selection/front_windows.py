#!/usr/bin/env python3
"""Do the short front windows decide? A request rule's served score is the highest mean over ``window`` scored
tokens, and the first tokens' windows are partial (they average what they have), so "how to kill" could decide before
"a stuck process" arrives. Here a rule's token scores are windowed with every window holding at least ``m`` tokens
(the whole row when it is shorter), the threshold refitted at 3% FPR on the cal split's benign rows, and
``heldout.py``'s report printed for the main sets. The rule is not refitted (its weights are the shipped ones).
``cv`` / ``heldout`` refit the request probe (the shipped recipe, the default's train rows) with and without partial
front windows in the fit and the score: leave-families-out CV as ``maxwin.py cv``, and the held-out report.

    SELECTION_DTYPE=float32 python calibration/selection/front_windows.py policies/harmful-requests.yaml 1,4,8,16
    SELECTION_DTYPE=float32 python calibration/selection/front_windows.py cv
    SELECTION_DTYPE=float32 python calibration/selection/front_windows.py heldout
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from heldout import Scorer, print_report
from maxwin import FOLDS, TRAIN, Pool, cv_line, row_weights
from select_detectors import Set, windowed_max

from guardrails.offline.window_fit import fit_dense_window

LAYERS, WINDOW, WD = [18, 27], 16, 1e-3  # the shipped request probe's recipe

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


def score_rows(x: np.ndarray, offsets: np.ndarray, coef: np.ndarray, bias: float, full: bool) -> np.ndarray:
    tok = x @ coef.astype(np.float32) + bias
    return windowed_max_min(tok, offsets, WINDOW, WINDOW) if full else windowed_max(tok, offsets, WINDOW)


class ProbeScorer:
    """``heldout.report``'s scorer for a refitted probe, full front windows or not."""

    def __init__(self, coef: np.ndarray, bias: float, full: bool, threshold: float) -> None:
        self.coef, self.bias, self.full, self.threshold, self.window = coef, bias, full, threshold, WINDOW
        self.name = f"probe L18+27 {'full' if full else 'partial'} front windows"

    def rows(self, s: Set) -> np.ndarray:
        x = np.concatenate([np.asarray(s.x(L), np.float32) for L in LAYERS], 1)
        return score_rows(x, s.offsets, self.coef, self.bias, self.full)


def refit(cmd: str) -> None:
    pool = Pool(list(TRAIN), LAYERS)
    use = ~np.array([s.startswith("handwritten_pairs") for s in pool.sources])  # the default probe's train rows
    w = row_weights(pool, 1.0)
    ref = Pool(["requests.cal"], LAYERS)
    ref_benign = ref.y == 0
    fold = np.array([FOLDS.get(f, f) for f in pool.family])
    for full in (False, True):
        if cmd == "cv":
            oof = np.full(len(pool.y), np.nan)
            for g in sorted(set(fold[use])):
                tr, held = (fold != g) & use, (fold == g) & use
                xt, ot = pool.subset(tr)
                coef, bias = fit_dense_window(xt, ot, pool.y[tr], w[tr], window=WINDOW, wd=WD, full_front=full)
                refs = np.sort(score_rows(ref.x, ref.offsets, coef, bias, full)[ref_benign])
                xh, oh = pool.subset(held)
                oof[held] = np.searchsorted(refs, score_rows(xh, oh, coef, bias, full)) / len(refs)
            print(cv_line(f"full_front={full}", oof[use], pool.y[use], pool.family[use]), flush=True)
            continue
        xt, ot = pool.subset(use)
        coef, bias = fit_dense_window(xt, ot, pool.y[use], w[use], window=WINDOW, wd=WD, full_front=full)
        thr = float(np.quantile(score_rows(ref.x, ref.offsets, coef, bias, full)[ref_benign], 0.97))
        sc = ProbeScorer(coef, bias, full, thr)
        print_report(sc, f"{sc.name} (threshold {thr:.4f})", SETS)  # type: ignore[arg-type]


def main() -> None:
    if sys.argv[1] in ("cv", "heldout"):
        refit(sys.argv[1])
        return
    base = Scorer(Path(sys.argv[1]))
    for m in (int(v) for v in sys.argv[2].split(",")):
        sc = MinScorer(base, m)
        print_report(sc, f"min{m} thr {sc.threshold:.4f}", SETS)  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
