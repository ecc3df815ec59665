#!/usr/bin/env python3
"""The ensemble's member weights chosen by leave-families-out CV on the train split (``maxwin.py cv``'s folds,
scale and criterion), instead of the a-priori 1:1.

Each fold refits both members with the shipped recipes (the probe: layers 12 + 18, window 16, served-score
objective, L2 1e-3; the SAE rule: 128 features of the bundled SAE (``--sae-n``), window 16) on the other folds'
rows; each member is standardised on the cal split's benign rows (as ``fit_ensemble.py`` does); the weighted mean of
the standardised token scores is windowed (16) and every out-of-fold row score becomes its percentile among the same
ensemble's scores of the cal benign rows. Per family: AUROC against the out-of-fold rows of the other label;
criterion: mean of the mean and the worst family AUROC. Weights are probe : SAE rule (1 : 0 is the probe alone).

    SELECTION_DTYPE=float32 python calibration/selection/ensemble_cv.py [--layers 18,27]

``--layers``: the probe member's layers (default 12,18, the v0.2.9 probe; v0.3.2's is 18,27).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from maxwin import FOLDS, TRAIN, Pool, criterion, family_aurocs, fit, fit_sae, row_weights  # noqa: E402
from select_detectors import Set, load_sae, windowed_max  # noqa: E402

WEIGHTS = ((1.0, 0.0), (3.0, 1.0), (2.0, 1.0), (1.0, 1.0), (1.0, 2.0), (0.0, 1.0))
Stats = list[tuple[float, float]]


def ensemble(p: np.ndarray, s: np.ndarray, offsets: np.ndarray, stats: Stats, a: float, b: float) -> np.ndarray:
    """Row scores of the weighted mean of the two members' standardised token scores."""
    z = (a * (p - stats[0][0]) / stats[0][1] + b * (s - stats[1][0]) / stats[1][1]) / (a + b)
    return windowed_max(z, offsets, 16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sae-n", type=int, default=128, help="the SAE member's feature count (128 in the shipped "
                    "ensemble; harmful-requests-sae has 2048 since v0.3.3)")
    ap.add_argument("--layers", default=[12, 18], type=lambda v: [int(x) for x in v.split(",")],
                    help="the probe member's layers (comma list; the deepest decides)")
    ap.add_argument("--train", default="", help="cached sets to cross-validate on, comma-separated (default: "
                                                "requests.train,wrapped.train)")
    args = ap.parse_args()
    layers = args.layers
    sae, tag = load_sae()
    pool = Pool(args.train.split(",") if args.train else list(TRAIN), layers)
    codes = [s.sae_codes(sae, tag) for s in pool.sets]
    v_all, ids_all = np.concatenate([c[0] for c in codes]), np.concatenate([c[1] for c in codes])
    cal = Set("requests.cal")
    cal_x = np.concatenate([np.asarray(cal.x(layer), np.float32) for layer in layers], 1)
    cal_v, cal_ids = cal.sae_codes(sae, tag)
    w = row_weights(pool, 1.0)
    fold = np.array([FOLDS.get(f, f) for f in pool.family])
    oof = {wt: np.full(len(pool.y), np.nan) for wt in WEIGHTS}
    for g in sorted(set(fold)):
        tr = fold != g
        xt, ot = pool.subset(tr)
        coef, bias = fit(xt, ot, pool.y[tr], w[tr], window=16, wd=1e-3, steps=40)
        t, off = pool.tokens(tr)
        ws, bs = fit_sae(v_all[t], ids_all[t], off, pool.y[tr], w[tr], sae.d_sae, window=16, n_features=args.sae_n)
        ws32 = ws.astype(np.float32)
        cp = cal_x @ coef + bias
        cs = (cal_v.astype(np.float32) * ws32[cal_ids.astype(np.int64)]).sum(1) + bs
        stats = [(float(r.mean()), float(r.std()))
                 for r in (windowed_max(m, cal.offsets, 16)[cal.labels == 0] for m in (cp, cs))]
        hspans, oh = pool.tokens(~tr)
        hp = pool.x[hspans] @ coef + bias
        hs = (v_all[hspans].astype(np.float32) * ws32[ids_all[hspans].astype(np.int64)]).sum(1) + bs
        for a, b in WEIGHTS:
            ref = np.sort(ensemble(cp, cs, cal.offsets, stats, a, b)[cal.labels == 0])
            oof[(a, b)][~tr] = np.searchsorted(ref, ensemble(hp, hs, oh, stats, a, b)) / len(ref)
        print(f"fold {g} done", flush=True)
    for wt, o in oof.items():
        per = family_aurocs(o, pool.y, pool.family)
        crit, mean, worst = criterion(per)
        harm = pool.y == 1
        print(f"probe (L{'+'.join(map(str, layers))}):SAE {wt[0]:g}:{wt[1]:g}  crit {crit:.3f} mean {mean:.3f} "
              f"worst {worst} {per[worst]:.3f} oof TPR@3% {float((o[harm] >= 0.97).mean()):.3f} "
              f"FPR {float((o[~harm] >= 0.97).mean()):.3f}", flush=True)


if __name__ == "__main__":
    main()
