#!/usr/bin/env python3
"""Does the end of the prompt read a request better than its most alarming stretch?

The shipped request rules score every prompt token and decide on the highest mean over 16 tokens, so a probe
fires on "kill" in "how do I kill a stuck process" before the words that make it benign arrive. The chat
template ends every user turn with the same few tokens ("\\n", "ass", "istant", "\\n" for SmolLM2: the
generation prompt, scored as the user's turn). The model has read the whole request there; refusal-direction
work reads harmfulness at these post-instruction positions. A *tail* probe reads only the last ``k`` scored
tokens of a prompt (their mean, or one term per position with ``--concat``) at the given layers.

Selection as ``maxwin.py cv``: leave-families-out over the train split (``FOLDS``), each fold's scores mapped to
percentiles of its scores of the cal benign rows, criterion (mean + worst family AUROC) / 2. ``--heldout``
then fits the chosen configuration on the whole train split, thresholds it at 3% FPR on the cal split and
prints ``heldout.py``'s report for it, for the shipped ensemble, and for their standardised sum.

    SELECTION_DTYPE=float32 python calibration/selection/tail_probe.py --layers 18 27 18,27 --k 1 4 --C 0.01 0.1
    SELECTION_DTYPE=float32 python calibration/selection/tail_probe.py --layers 18,27 --k 4 --C 0.1 --heldout
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
from heldout import Scorer, print_report  # noqa: E402
from maxwin import FOLDS, TRAIN, Pool, criterion, family_aurocs, row_weights  # noqa: E402
from select_detectors import Set  # noqa: E402


def tail(s: Set, layers: list[int], k: int, concat: bool) -> np.ndarray:
    """Per row: the last ``k`` scored tokens' residuals at each layer, averaged (or one block per position)."""
    ends = s.offsets[1:]
    blocks = []
    for layer in layers:
        x = np.asarray(s.x(layer), np.float32)
        pos = [np.maximum(ends - 1 - j, s.offsets[:-1]) for j in range(k)]  # short rows repeat their first token
        per = [x[p] for p in pos]
        blocks.extend(per if concat else [np.mean(per, 0)])
    return np.concatenate(blocks, 1)


class TailScorer:
    """``heldout.report``'s scorer interface for a fitted tail probe (optionally summed with another scorer,
    both standardised on the cal benign rows)."""

    def __init__(self, model, layers: list[int], k: int, concat: bool, threshold: float,  # type: ignore[no-untyped-def]
                 name: str, plus: tuple[Scorer, tuple[float, float], tuple[float, float]] | None = None) -> None:
        self.model, self.layers, self.k, self.concat = model, layers, k, concat
        self.threshold, self.name, self.plus, self.window = threshold, name, plus, 0

    def raw(self, s: Set) -> np.ndarray:
        return self.model.decision_function(tail(s, self.layers, self.k, self.concat))

    def rows(self, s: Set) -> np.ndarray:
        r = self.raw(s)
        if self.plus is None:
            return r
        other, (mt, st), (mo, so) = self.plus
        return ((r - mt) / st + (other.rows(s) - mo) / so) / 2


def fit(x: np.ndarray, y: np.ndarray, w: np.ndarray, C: float):  # type: ignore[no-untyped-def]
    from sklearn.pipeline import make_pipeline

    m = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))
    m.fit(x, y, logisticregression__sample_weight=w)
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", nargs="+", default=["18"], help="layer sets, each comma-separated")
    ap.add_argument("--k", nargs="+", type=int, default=[4])
    ap.add_argument("--C", nargs="+", type=float, default=[0.1])
    ap.add_argument("--concat", action="store_true", help="one block per tail position instead of their mean")
    ap.add_argument("--heldout", action="store_true", help="fit the (single) configuration on the train split and "
                    "print the held-out report")
    ap.add_argument("--ensemble", default=str(ROOT / "policies" / "harmful-requests.yaml"))
    args = ap.parse_args()
    layer_sets = [[int(v) for v in ls.split(",")] for ls in args.layers]
    need = sorted({v for ls in layer_sets for v in ls})
    pool = Pool(list(TRAIN), need[:1])
    w = row_weights(pool, 1.0)
    cal = Set("requests.cal")
    cal_benign = cal.labels == 0
    fold = np.array([FOLDS.get(f, f) for f in pool.family])
    for layers in layer_sets:
        for k in args.k:
            xs = np.concatenate([tail(s, layers, k, args.concat) for s in pool.sets])
            xc = tail(cal, layers, k, args.concat)
            for C in args.C:
                tag = f"tail L{'+'.join(map(str, layers))} k={k}{' concat' if args.concat else ''} C={C}"
                if not args.heldout:
                    oof = np.full(len(pool.y), np.nan)
                    for g in sorted(set(fold)):
                        tr = fold != g
                        m = fit(xs[tr], pool.y[tr], w[tr], C)
                        ref = np.sort(m.decision_function(xc)[cal_benign])
                        oof[~tr] = np.searchsorted(ref, m.decision_function(xs[~tr])) / len(ref)
                    per = family_aurocs(oof, pool.y, pool.family)
                    crit, mean, worst = criterion(per)
                    print(f"{tag}: crit {crit:.3f} mean {mean:.3f} worst {worst} {per[worst]:.3f} | "
                          + " ".join(f"{f}={v:.3f}" for f, v in per.items()), flush=True)
                    continue
                m = fit(xs, pool.y, w, C)
                cs = m.decision_function(xc)
                thr = float(np.quantile(cs[cal_benign], 0.97))
                ens = Scorer(Path(args.ensemble))
                es = ens.rows(cal)
                stats_t = (float(cs[cal_benign].mean()), float(cs[cal_benign].std()))
                stats_e = (float(es[cal_benign].mean()), float(es[cal_benign].std()))
                both = ((cs - stats_t[0]) / stats_t[1] + (es - stats_e[0]) / stats_e[1]) / 2
                scorers = [TailScorer(m, layers, k, args.concat, thr, tag),
                           ens,
                           TailScorer(m, layers, k, args.concat, float(np.quantile(both[cal_benign], 0.97)),
                                      f"{tag} + shipped ensemble (z-mean)", plus=(ens, stats_t, stats_e))]
                for sc in scorers:
                    print_report(sc, f"{sc.name} (threshold {sc.threshold:.4f})")  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
