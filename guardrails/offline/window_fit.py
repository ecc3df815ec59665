"""Rules fitted on the score the guard serves: the recipes of the shipped ``harmful-requests`` probe and SAE rule.

A rule's served score is the highest mean, over ``window`` consecutive scored tokens, of a per-token score. Both fits
here take a logistic loss on that row score itself (multiple-instance learning: every window of a label-0 row is
pushed down, some window of a label-1 row up; the production Gemini probes train max-of-rolling-means this way):

- :func:`fit_window_probe`: a linear probe (token score ``x . w + b``), L-BFGS with L2 on standardised weights;
- :func:`fit_window_rule`: an SAE-feature rule (token score ``sum_f weight_f * activation_f + bias``): Adam with an
  L1 penalty on the standardised weights picks the features, the ``max_features`` largest are kept and refitted
  (L-BFGS, small L2). Weights are signed. On held-out topic-matched requests this reads a request far better than a
  few positive features of the highest mean-pooled AUROC (docs/results.md, v0.3.3: short typed requests against
  their benign twins 0.729 AUROC with 128 features, 0.869 with 2,048), at the cost of a rule that is no longer a
  short list to read.

``guardrails calibrate --fit-weights --objective window`` uses them; ``calibration/selection/`` fits the shipped
rules with them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def window_scores(tok: torch.Tensor, offsets: torch.Tensor, row_of: torch.Tensor, window: int,
                  full_front: bool = False) -> torch.Tensor:
    """Differentiable served row score: max over a row's tokens of the rolling mean of up to ``window`` tokens
    (partial windows at the front average what they have). ``offsets`` [rows + 1] delimit the rows in ``tok``.
    ``full_front``: no partial window counts but a whole row shorter than ``window`` (an experiment, not served)."""
    cs = torch.cat([tok.new_zeros(1), torch.cumsum(tok, 0)])
    ends = torch.arange(1, len(tok) + 1)
    starts = torch.maximum(ends - window, offsets[row_of])
    means = (cs[ends] - cs[starts]) / (ends - starts)
    if full_front:
        lens = (offsets[1:] - offsets[:-1])[row_of]
        means = torch.where(ends - offsets[row_of] >= torch.clamp(lens, max=window), means,
                            torch.full_like(means, -1e9))
    out = tok.new_full((len(offsets) - 1,), -1e9)
    return out.scatter_reduce(0, row_of, means, "amax", include_self=False)


def fit_dense_window(x: np.ndarray, offsets: np.ndarray, y: np.ndarray, w: np.ndarray, *, window: int, wd: float,
                     steps: int = 60, seed: int = 0, anchor: tuple[np.ndarray, float] | None = None,
                     full_front: bool = False,
                     ) -> tuple[np.ndarray, float]:
    """A linear probe on token residuals ``x`` [tokens, d] (rows stacked, delimited by ``offsets``): weighted
    logistic loss on the served row score + ``wd`` x squared norm of the standardised weights (with ``anchor``, a
    raw-space probe: of their distance to it, starting from it). Returns raw-space (coef [d], bias)."""
    torch.manual_seed(seed)
    X = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    mu, sd = X.mean(0), X.std(0) + 1e-6
    Z = (X - mu) / sd
    off = torch.from_numpy(np.asarray(offsets)).long()
    row_of = torch.repeat_interleave(torch.arange(len(off) - 1), off[1:] - off[:-1])
    yt, wt = torch.from_numpy(y.astype(np.float32)), torch.from_numpy((w / w.mean()).astype(np.float32))
    beta0 = torch.zeros(Z.shape[1])
    b0 = torch.zeros(1)
    if anchor is not None:
        beta0 = torch.from_numpy(anchor[0].astype(np.float32)) * sd
        b0 = torch.tensor([anchor[1] + float((torch.from_numpy(anchor[0].astype(np.float32)) * mu).sum())])
    def run(start: torch.Tensor, start_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        beta = start.clone().requires_grad_(True)
        b = start_b.clone().requires_grad_(True)
        opt = torch.optim.LBFGS([beta, b], lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")
        losses: list[float] = []

        def closure() -> torch.Tensor:
            opt.zero_grad()
            s = window_scores(Z @ beta + b, off, row_of, window, full_front)
            loss = (wt * torch.nn.functional.binary_cross_entropy_with_logits(s, yt, reduction="none")).mean()
            loss = loss + wd * ((beta - beta0) ** 2).sum()
            loss.backward()
            losses.append(float(loss.detach()))
            return loss

        opt.step(closure)
        return beta.detach(), b.detach(), losses[0], losses[-1]

    beta, b, first, last = run(beta0, b0)
    if anchor is None and last > STALLED * first:
        # Stalled near the start: from zero weights every row's highest window can be the same template token (the
        # user turn's header), whose gradients nearly cancel between the labels, and L-BFGS stops within a few steps
        # close to the starting loss. Start again from the mean-pooled logistic probe (a convex fit); keep the better.
        beta2, b2, _, last2 = run(*_pooled_start(Z, off, row_of, yt, wt, wd))
        if last2 < last:
            beta, b = beta2, b2
    coef = (beta / sd).numpy()
    return coef, float(b[0] - (coef * mu.numpy()).sum())


STALLED = 0.5
"""A window fit whose loss ends above this share of its starting loss may have stalled: it is run again from the
mean-pooled probe and the lower loss kept (see :func:`fit_dense_window`). The shipped probes' fits end near 0.1."""


def _pooled_start(Z: torch.Tensor, off: torch.Tensor, row_of: torch.Tensor, y: torch.Tensor, w: torch.Tensor,
                  wd: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardised weights and bias of a weighted logistic probe on each row's mean token (L2 ``wd``)."""
    n = len(off) - 1
    means = torch.zeros(n, Z.shape[1]).index_add_(0, row_of, Z) / (off[1:] - off[:-1]).clamp(min=1)[:, None]
    beta = torch.zeros(Z.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([beta, b], lr=1.0, max_iter=100, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (w * torch.nn.functional.binary_cross_entropy_with_logits(means @ beta + b, y, reduction="none")).mean()
        loss = loss + wd * (beta ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return beta.detach(), b.detach()


def fit_sparse_window(v: np.ndarray, ids: np.ndarray, offsets: np.ndarray, y: np.ndarray, w: np.ndarray,
                      d_sae: int, *, window: int, n_features: int, l1: float = 3e-3, steps: int = 150,
                      positive: bool = False) -> tuple[np.ndarray, float]:
    """The fit on TopK codes: ``v``/``ids`` [tokens, k] (values and feature ids of every scored token, rows
    stacked), ``offsets`` [rows + 1], labels ``y`` and row weights ``w``. ``positive``: weights kept >= 0
    (projected Adam in both stages). Returns dense raw-unit weights [d_sae] and the bias."""
    vt = torch.from_numpy(v.astype(np.float32))
    it = torch.from_numpy(ids.astype(np.int64))
    n = float(len(v))
    m1 = np.bincount(ids.ravel(), weights=v.astype(np.float64).ravel(), minlength=d_sae) / n
    m2 = np.bincount(ids.ravel(), weights=(v.astype(np.float64) ** 2).ravel(), minlength=d_sae) / n
    sd = torch.from_numpy(np.sqrt(np.maximum(m2 - m1**2, 0)) + 1e-3).float()
    off = torch.from_numpy(np.asarray(offsets)).long()
    row_of = torch.repeat_interleave(torch.arange(len(off) - 1), off[1:] - off[:-1])
    yt, wt = torch.from_numpy(y.astype(np.float32)), torch.from_numpy((w / w.mean()).astype(np.float32))

    def loss_of(beta: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        tok = (vt * (beta / sd)[it]).sum(1) + b
        sc = window_scores(tok, off, row_of, window)
        return (wt * torch.nn.functional.binary_cross_entropy_with_logits(sc, yt, reduction="none")).mean()

    beta = torch.zeros(d_sae, requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([beta, b], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_of(beta, b) + l1 * beta.abs().sum()
        loss.backward()
        opt.step()
        if positive:
            with torch.no_grad():
                beta.clamp_(min=0)
    keep = torch.argsort(-beta.detach().abs())[:n_features]
    mask = torch.zeros(d_sae)
    mask[keep] = 1.0
    beta2 = (beta.detach() * mask).requires_grad_(True)
    b2 = b.detach().clone().requires_grad_(True)
    if positive:
        opt2 = torch.optim.Adam([beta2, b2], lr=0.02)
        for _ in range(2 * steps):
            opt2.zero_grad()
            loss = loss_of(beta2 * mask, b2) + 1e-3 * (beta2 * mask).pow(2).sum()
            loss.backward()
            opt2.step()
            with torch.no_grad():
                beta2.clamp_(min=0)
        return ((beta2.detach() * mask) / sd).numpy(), float(b2.detach()[0])
    lb = torch.optim.LBFGS([beta2, b2], lr=1.0, max_iter=60, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        lb.zero_grad()
        loss = loss_of(beta2 * mask, b2) + 1e-3 * (beta2 * mask).pow(2).sum()
        loss.backward()
        return loss

    lb.step(closure)
    coef = ((beta2.detach() * mask) / sd).numpy()
    return coef, float(b2.detach()[0])


def sae_codes(sae: Any, rows: Sequence[torch.Tensor], *, batch_tokens: int = 4096) -> tuple[np.ndarray, np.ndarray,
                                                                                               np.ndarray]:
    """TopK codes of every scored token of ``rows`` (per-row residuals at the SAE's layer): values, ids and the
    rows' offsets."""
    flat = torch.cat([r.float() for r in rows]) if rows else torch.zeros(0, int(sae.cfg.d_model))
    vs, ids = [], []
    with torch.inference_mode():  # on the SAE's device and dtype, as max_pooled_features encodes
        for a in range(0, len(flat), batch_tokens):
            out = sae.encode_sparse(flat[a : a + batch_tokens].to(sae.device, sae.dtype))
            vs.append(out[0].float().cpu().numpy())
            ids.append(out[1].cpu().numpy())
    offsets = _offsets(rows)
    if not vs:
        return np.zeros((0, 1), np.float32), np.zeros((0, 1), np.int64), offsets
    return np.concatenate(vs), np.concatenate(ids), offsets


def fit_window_rule(sae: Any, rows: Sequence[torch.Tensor], labels: np.ndarray, *, window: int, max_features: int,
                    ) -> tuple[dict[int, float], float]:
    """A signed sparse SAE-feature rule (``{feature: weight}``, bias) fitted on the served window score of
    ``rows`` (per-row residuals at the SAE's layer, as :func:`guardrails.offline.calibrate.residuals` gives them),
    each label carrying half the weight. (Equal weight per (source, label) cell instead was measured on the
    request data and not kept: form pairs +0.010 AUROC, blind and short typed -0.008 and -0.017.)"""
    y, w = _balanced(labels)
    v, ids, offsets = sae_codes(sae, rows)
    coef, bias = fit_sparse_window(v, ids, offsets, y, w, int(sae.cfg.d_sae), window=window, n_features=max_features)
    kept = np.flatnonzero(coef)
    order = kept[np.argsort(-np.abs(coef[kept]))]
    return {int(i): round(float(coef[i]), 6) for i in order}, round(bias, 6)


def fit_window_probe(rows: Sequence[torch.Tensor], labels: np.ndarray, *, window: int, wd: float = 1e-3,
                     ) -> tuple[np.ndarray, float]:
    """A linear probe (weight [d], bias) fitted on the served window score of ``rows`` (per-row residuals at the
    probe's layer), each label carrying half the weight; ``wd`` as the shipped request probe (L2 1e-3 on
    standardised weights)."""
    y, w = _balanced(labels)
    x = torch.cat([r.float().cpu() for r in rows]).numpy()
    return fit_dense_window(x, _offsets(rows), y, w, window=window, wd=wd, steps=40)


def _offsets(rows: Sequence[torch.Tensor]) -> np.ndarray:
    """Where each row's tokens start in the rows stacked, and where the last ends: ``[rows + 1]``."""
    return np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)


def _balanced(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """0/1 labels and row weights giving each label half the total (mean 1)."""
    y = np.asarray(labels).astype(np.int64)
    if len(set(y.tolist())) < 2:
        raise ValueError("fitting weights needs rows of both labels")
    n1, n0 = int((y == 1).sum()), int((y == 0).sum())
    return y, np.where(y == 1, 0.5 / n1, 0.5 / n0) * len(y)
