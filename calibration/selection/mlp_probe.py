#!/usr/bin/env python3
"""Does a small non-linear token head generalise better than the shipped linear probe?

The shipped request probe scores each token linearly (``x . w + b`` at layers 18 + 27) and decides on the highest
mean over 16 tokens. Its misses on held-out data are topic-matched benign requests ("kill a stuck process"): a
linear token score adds "alarming topic" and "intent" evidence, where harm is closer to their conjunction. Here the
token score gains a one-hidden-layer term on top of the linear one::

    token score = z . beta + b + v . gelu(z W + c)        (z: the standardised residuals of the layers, stacked)

fitted through the served aggregation (weighted logistic loss on the max of rolling means, as ``maxwin.py``): the
linear part first (the shipped recipe, ``fit_dense_window``), then all of it with Adam, L2 on ``W`` and ``v``.

Selection as ``maxwin.py cv`` (leave-families-out over the train split, scores as percentiles of the cal benign
rows, criterion (mean + worst family AUROC) / 2); ``--heldout`` fits on the whole train split, thresholds at 3% FPR
on the cal split and prints ``heldout.py``'s report for the linear probe and the MLP head fitted on the same rows.

    SELECTION_DTYPE=float32 python calibration/selection/mlp_probe.py cv --layers 18,27 --hidden 0,16 --wd 1e-3
    SELECTION_DTYPE=float32 python calibration/selection/mlp_probe.py heldout --layers 18,27 --hidden 16 --wd 1e-3

``--without-pairs`` leaves v0.3.6's topic-matched training pairs out of every fit (the default probe's train rows).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from heldout import print_report  # noqa: E402
from maxwin import FOLDS, TRAIN, Pool, cv_line, row_weights  # noqa: E402
from select_detectors import Set, windowed_max  # noqa: E402

from guardrails.offline.window_fit import fit_dense_window, window_scores  # noqa: E402


class Head:
    """A fitted token head: the linear probe plus, with ``hidden`` > 0, the one-hidden-layer term."""

    def __init__(self, mu: np.ndarray, sd: np.ndarray, beta: np.ndarray, b: float,
                 W: np.ndarray | None, c: np.ndarray | None, v: np.ndarray | None, cols: slice = slice(None)) -> None:
        self.mu, self.sd, self.beta, self.b, self.W, self.c, self.v = mu, sd, beta, b, W, c, v
        self.cols = cols  # the stacked residual columns the non-linear term reads

    def tokens(self, x: np.ndarray) -> np.ndarray:
        out = np.empty(len(x), np.float32)
        for i in range(0, len(x), 65536):
            z = torch.from_numpy((np.asarray(x[i:i + 65536], np.float32) - self.mu) / self.sd)
            s = z @ torch.from_numpy(self.beta) + self.b
            if self.W is not None:
                h = torch.nn.functional.gelu(z[:, self.cols] @ torch.from_numpy(self.W) + torch.from_numpy(self.c))
                s = s + h @ torch.from_numpy(self.v)
            out[i:i + 65536] = s.numpy()
        return out

    def rows(self, x: np.ndarray, offsets: np.ndarray, window: int) -> np.ndarray:
        return windowed_max(self.tokens(x), offsets, window)


def fit(x: np.ndarray, offsets: np.ndarray, y: np.ndarray, w: np.ndarray, *, window: int, wd: float,
        hidden: int, wd_mlp: float, steps: int, seed: int = 0, cols: slice = slice(None)) -> Head:
    coef, bias = fit_dense_window(x, offsets, y, w, window=window, wd=wd, steps=60, seed=seed)
    X = np.asarray(x, np.float32)
    mu, sd = X.mean(0), X.std(0) + 1e-6
    beta0 = (coef * sd).astype(np.float32)
    b0 = float(bias + (coef * mu).sum())
    if hidden == 0:
        return Head(mu, sd, beta0, b0, None, None, None)
    torch.manual_seed(seed)
    Z = torch.from_numpy((X - mu) / sd)
    off = torch.from_numpy(np.asarray(offsets)).long()
    row_of = torch.repeat_interleave(torch.arange(len(off) - 1), off[1:] - off[:-1])
    yt, wt = torch.from_numpy(y.astype(np.float32)), torch.from_numpy((w / w.mean()).astype(np.float32))
    beta = torch.from_numpy(beta0.copy()).requires_grad_(True)
    b = torch.tensor([b0], requires_grad=True)
    Zm = Z[:, cols]
    W = (torch.randn(Zm.shape[1], hidden) / np.sqrt(Zm.shape[1])).requires_grad_(True)
    c = torch.zeros(hidden, requires_grad=True)
    v = torch.zeros(hidden, requires_grad=True)
    opt = torch.optim.Adam([beta, b, W, c, v], lr=3e-3)
    bt0 = torch.from_numpy(beta0)
    for _ in range(steps):
        opt.zero_grad()
        tok = Z @ beta + b + torch.nn.functional.gelu(Zm @ W + c) @ v
        s = window_scores(tok, off, row_of, window)
        loss = (wt * torch.nn.functional.binary_cross_entropy_with_logits(s, yt, reduction="none")).mean()
        loss = loss + wd * ((beta - bt0) ** 2).sum() + wd_mlp * ((W ** 2).sum() + (v ** 2).sum())
        loss.backward()
        opt.step()
    return Head(mu, sd, beta.detach().numpy(), float(b.detach()[0]), W.detach().numpy(), c.detach().numpy(),
                v.detach().numpy(), cols)


class HeadScorer:
    """``heldout.report``'s scorer interface for a fitted head over the cached sets."""

    def __init__(self, head: Head, layers: list[int], window: int, threshold: float, name: str) -> None:
        self.head, self.layers, self.window, self.threshold, self.name = head, layers, window, threshold, name

    def rows(self, s: Set) -> np.ndarray:
        x = np.concatenate([np.asarray(s.x(L), np.float32) for L in self.layers], 1)
        return self.head.rows(x, s.offsets, self.window)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cmd", choices=["cv", "heldout"])
    ap.add_argument("--layers", default="18,27", type=lambda s: [int(v) for v in s.split(",")])
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--wd", type=float, default=1e-3, help="L2 of the linear part (the shipped probe's)")
    ap.add_argument("--hidden", default="0,16", type=lambda s: [int(v) for v in s.split(",")],
                    help="hidden widths (0: the linear probe alone)")
    ap.add_argument("--wd-mlp", default="1e-3", type=lambda s: [float(v) for v in s.split(",")])
    ap.add_argument("--steps", type=int, default=300, help="Adam steps of the non-linear fit")
    ap.add_argument("--mlp-layer", type=int, default=None,
                    help="the non-linear term reads this one of --layers only (default: all of them, stacked)")
    ap.add_argument("--without-pairs", action="store_true", help="leave v0.3.6's training pairs out of every fit")
    args = ap.parse_args()
    torch.set_num_threads(2)
    pool = Pool(list(TRAIN), args.layers)
    use = ~np.array([s.startswith("handwritten_pairs") for s in pool.sources]) if args.without_pairs \
        else np.ones(len(pool.y), bool)
    w = row_weights(pool, 1.0)
    ref = Pool(["requests.cal"], args.layers)
    ref_benign = ref.y == 0
    d = pool.x.shape[1] // len(args.layers)
    cols = slice(None) if args.mlp_layer is None else slice(d * args.layers.index(args.mlp_layer),
                                                             d * (args.layers.index(args.mlp_layer) + 1))
    configs = [(h, m) for h in args.hidden for m in (args.wd_mlp if h else [0.0])]
    for hidden, wd_mlp in configs:
        tag = f"L{'+'.join(map(str, args.layers))} W={args.window} wd={args.wd} hidden={hidden} wd_mlp={wd_mlp}" \
              f"{'' if args.mlp_layer is None else f' mlp_layer={args.mlp_layer}'}" \
              f"{' without pairs' if args.without_pairs else ''}"
        if args.cmd == "cv":
            oof = np.full(len(pool.y), np.nan)
            fold = np.array([FOLDS.get(f, f) for f in pool.family])
            for g in sorted(set(fold[use])):
                tr = (fold != g) & use
                xt, ot = pool.subset(tr)
                head = fit(xt, ot, pool.y[tr], w[tr], window=args.window, wd=args.wd, hidden=hidden,
                           wd_mlp=wd_mlp, steps=args.steps, cols=cols)
                held = (fold == g) & use
                xh, oh = pool.subset(held)
                refs = np.sort(head.rows(ref.x, ref.offsets, args.window)[ref_benign])
                oof[held] = np.searchsorted(refs, head.rows(xh, oh, args.window)) / len(refs)
            print(cv_line(tag, oof[use], pool.y[use], pool.family[use]), flush=True)
            continue
        xt, ot = pool.subset(use)
        head = fit(xt, ot, pool.y[use], w[use], window=args.window, wd=args.wd, hidden=hidden, wd_mlp=wd_mlp,
                   steps=args.steps, cols=cols)
        thr = float(np.quantile(head.rows(ref.x, ref.offsets, args.window)[ref_benign], 0.97))
        print_report(HeadScorer(head, args.layers, args.window, thr, tag),  # type: ignore[arg-type]
                     f"{tag} (threshold {thr:.4f})")


if __name__ == "__main__":
    main()
