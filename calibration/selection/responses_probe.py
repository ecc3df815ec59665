#!/usr/bin/env python3
"""Output-guard selection by leave-one-family-out over the response sources.

Families: ``pyrit`` (human-rated pyrit answers), ``handwritten`` (this repo's answers and refusals),
``bundled`` (the bundled model's own answers, ``calibration/build_model_answers.py``), ``blind`` (the blind
hand-written answer sets 1 and 2 of v0.3.0); the pyrit many-shot answers (LLM-judged labels) and blind sets 3
(v0.3.0) and 4 (v0.3.1) are held out of every fit; v0.3.7's hand-written training answers (train split only) are
in every fit and never scored. For each candidate (layer, detector, window) and each family
F: fit on the *train* split of the other families (equal weight per (source, label) cell), threshold at 3% FPR on
their *cal* split, then score every row of F (all splits); the held-out families are scored by the fit on every
family (as shipped).
Criterion: mean of the four held-out family AUROCs (the worst is printed too).

    python calibration/selection/collect.py --layers=12,15,18 responses.train responses.cal responses.test
    python calibration/selection/responses_probe.py [--layers 12,15,18] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from build_data import TRAIN_ANSWERS  # v0.3.7's hand-written training answers: train split only
from maxwin import Pool, auroc, fit, score
from select_detectors import fit_probe

MANY_SHOT = "pyrit_many_shot_llm_judged"
BLIND3, BLIND4 = "blind_responses_3", "blind_responses_4"
FAMILIES = ("pyrit", "handwritten", "bundled", "blind")
HELD = ("many_shot", "blind3", "blind4")  # held out of every fit: scored by the fit on all the families
CUTS = {"cut": "responses", "whole": "responses_full"}  # collect.py's response caches: replies cut to 400, whole
FIT_ONLY = ("train_answers",)  # fitted on in every fold, never scored (no cal or test rows)


def family(source: str) -> str:
    if source == MANY_SHOT:
        return "many_shot"
    if source in (BLIND3, BLIND4):  # held out whole (v0.3.0, v0.3.1)
        return "blind3" if source == BLIND3 else "blind4"
    if source == TRAIN_ANSWERS:
        return "train_answers"
    if source.startswith("blind_responses"):  # the blind hand-written sets 1 and 2 (v0.3.0)
        return "blind"
    if source.startswith("handwritten"):
        return "handwritten"
    if source.startswith("bundled_answers"):
        return "bundled"
    return "pyrit"


def cell_weights(sources: list[str], y: np.ndarray) -> np.ndarray:
    cells: dict[tuple[str, int], int] = {}
    for s_, y_ in zip(sources, y, strict=True):
        cells[(s_, int(y_))] = cells.get((s_, int(y_)), 0) + 1
    w = np.array([1.0 / cells[(s_, int(y_))] for s_, y_ in zip(sources, y, strict=True)])
    return w * len(w) / w.sum()


def subset(pool: Pool, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    x, off = pool.subset(keep)
    return x, off, pool.y[keep], [s for s, k in zip(pool.sources, keep, strict=True) if k]


def fit_head(kind: str, x: np.ndarray, off: np.ndarray, y: np.ndarray, w: np.ndarray, *, window: int = 16,
             wd: float = 1e-2) -> tuple[np.ndarray, float]:
    """One candidate's head: ``ridge`` (C=0.1 on mean-pooled replies) or ``maxwin`` (logistic loss on the
    served max-of-rolling-means score, W16, L2 1e-2 unless given). ``fit_shipped.py compliance`` ships the chosen
    one."""
    if kind == "ridge":
        pooled = np.stack([x[off[i] : off[i + 1]].mean(0) for i in range(len(off) - 1)])
        return fit_probe(pooled, y, w, 0.1)
    return fit(x, off, y, w, window=window, wd=wd, steps=40)


def rates(s: np.ndarray, y: np.ndarray, thr: float) -> dict[str, float]:
    neg = s[y == 0]
    return {"auroc": round(auroc(s[y == 1], neg), 4), "tpr": round(float(np.mean(s[y == 1] >= thr)), 4),
            "fpr": round(float(np.mean(neg >= thr)), 4),
            "tpr_at_own_3pct": round(float(np.mean(s[y == 1] >= np.quantile(neg, 0.97))), 4), "n": len(y)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", default="12,15,18", type=lambda v: [int(x) for x in v.split(",")])
    ap.add_argument("--kinds", default="ridge,maxwin", type=lambda v: v.split(","))
    ap.add_argument("--windows", default="4,16,64", type=lambda v: [int(x) for x in v.split(",")])
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    results = []
    for layer in args.layers:
        tr, ca, te = (Pool([f"responses.{s}"], [layer]) for s in ("train", "cal", "test"))
        fam = {n: np.array([family(s) for s in p.sources]) for n, p in (("tr", tr), ("ca", ca), ("te", te))}
        for kind in args.kinds:
            per: dict[int, dict[str, dict[str, float]]] = {w: {} for w in args.windows}
            for held in (*FAMILIES, *HELD):  # HELD: test-only families, scored by the fit on every family
                fit_fams = [f for f in (*FAMILIES, *FIT_ONLY) if f != held]
                x, off, y, src = subset(tr, np.isin(fam["tr"], fit_fams))
                c, b = fit_head(kind, x, off, y, cell_weights(src, y))  # the head does not depend on W
                cx, coff, cy, _ = subset(ca, np.isin(fam["ca"], fit_fams))
                splits = ((tr, fam["tr"]), (ca, fam["ca"]), (te, fam["te"]))
                parts = [(p, f == held) for p, f in splits if (f == held).any()]
                evals = [subset(p, m)[:3] for p, m in parts]
                hy = np.concatenate([yy for _, _, yy in evals])
                for W in args.windows:
                    sc = score(cx, coff, c, b, W)
                    thr = float(np.quantile(sc[cy == 0], 0.97))
                    hs = np.concatenate([score(hx, hoff, c, b, W) for hx, hoff, _ in evals])
                    per[W][held] = rates(hs, hy, thr)
            for W, d in per.items():
                fams = [d[f]["auroc"] for f in FAMILIES]
                row = {"layer": layer, "kind": kind, "window": W, "criterion": round(float(np.mean(fams)), 4),
                       "worst": round(float(min(fams)), 4), "held_out": d}
                results.append(row)
                print(f"L{layer} {kind:6s} W={W:3d}: crit {row['criterion']:.3f} worst {row['worst']:.3f} | "
                      + " ".join(f"{f} auroc {d[f]['auroc']:.3f} tpr {d[f]['tpr']:.2f} fpr {d[f]['fpr']:.2f}"
                                 for f in (*FAMILIES, *HELD)), flush=True)
    best = max(results, key=lambda r: r["criterion"])
    print(f"best: L{best['layer']} {best['kind']} W={best['window']} criterion {best['criterion']:.3f}")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "best": best}, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
