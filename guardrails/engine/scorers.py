"""Detectors: map the residual stream at one layer to a score per token for each rule.

Rules reading the same layer share one scorer, so an SAE is encoded once per forward. In ``exact``
mode the full TopK encode runs (faithful to the SAE); in ``watched`` mode only the encoder rows of the
watched features are kept and their pre-activations go through the SAE's rule (ReLU for TopK and ReLU
SAEs, the threshold for JumpReLU): a few dot products per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from guardrails.core.errors import GuardrailsError
from guardrails.core.policy import Policy, Rule, SAEFeaturesDetector
from guardrails.sae.model import SAE, SAEError


class DetectorError(GuardrailsError, RuntimeError):
    """A detector could not score (bad activations, device mismatch...)."""


@dataclass
class _RuleHead:
    """How one rule reads the per-layer feature matrix."""

    rule: Rule
    index: int
    columns: Tensor  # columns of the layer's feature matrix this rule reads
    weights: Tensor  # [n_columns]
    combine: str
    bias: float
    steer_direction: Tensor | None  # unit vector [d_model] for 'subtract'
    clamp_columns: Tensor | None  # columns of features to clamp, for 'clamp'
    clamp_dirs: Tensor | None  # decoder rows [n, d_model] of those features
    linear: bool = False
    carry: tuple[str, float] | None = None
    """An ensemble's SAE member: ``(ensemble rule id, scale)``; its token score times scale adds to that rule's
    (at the same layer, or carried to the rule's deeper layer), and it decides nothing itself."""


class WatchedEncoder(torch.nn.Module):
    """Encoder rows of selected SAE features, with the SAE's activation rule applied per feature."""

    def __init__(self, sae: SAE, features: list[int]) -> None:
        super().__init__()
        sae.check_features(features)
        idx = torch.tensor(features, dtype=torch.long, device=sae.device)
        self.arch = sae.cfg.architecture
        self.W: Tensor
        self.b: Tensor
        self.b_dec_in: Tensor | None
        self.threshold: Tensor | None
        self.register_buffer("W", sae.W_enc.data[idx].clone())
        self.register_buffer("b", sae.b_enc.data[idx].clone())
        self.register_buffer("b_dec_in", sae.b_dec.data.clone() if sae.cfg.apply_b_dec_to_input else None)
        thr = sae.threshold[idx].clone() if sae.threshold is not None else None
        self.register_buffer("threshold", thr)

    def forward(self, x: Tensor) -> Tensor:
        x = x.to(self.W.dtype)
        if self.b_dec_in is not None:
            x = x - self.b_dec_in
        pre = torch.nn.functional.linear(x, self.W, self.b)
        if self.arch == "jumprelu":
            assert self.threshold is not None
            return torch.relu(pre) * (pre > self.threshold)
        return torch.relu(pre)


class LayerScorer:
    """All rules reading one layer: one call gives scores ``[batch, seq, n_rules_here]``."""

    def __init__(
        self,
        layer: int,
        rules: list[tuple[int, Rule]],
        policy: Policy,
        saes: dict[str, SAE],
        linear: dict[str, tuple[Tensor, Tensor]],
        mode: str,
        carries: dict[str, tuple[str, float]] | None = None,
    ) -> None:
        self.layer = layer
        self.mode = mode
        self.rule_indices = [i for i, _ in rules]
        self.sae_id: str | None = None
        self.sae: SAE | None = None
        self.encoder: WatchedEncoder | None = None
        feats: list[int] = []
        sae_rules = [(i, r) for i, r in rules if isinstance(r.detector, SAEFeaturesDetector)]
        sae_ids = {r.detector.sae for _, r in sae_rules if isinstance(r.detector, SAEFeaturesDetector)}
        if len(sae_ids) > 1:
            raise SAEError(f"layer {layer}: rules read several SAEs ({sorted(sae_ids)}); use one SAE per layer")
        if sae_ids:
            self.sae_id = sae_ids.pop()
            self.sae = saes[self.sae_id]
            for _, r in sae_rules:
                assert isinstance(r.detector, SAEFeaturesDetector)
                feats += [f.id for f in r.detector.features]
                if r.steer and r.steer.features:
                    feats += r.steer.features
        self.features = sorted(set(feats))
        col = {f: c for c, f in enumerate(self.features)}
        n_lin = 0
        self.linear_W: Tensor | None = None
        self.linear_b: Tensor | None = None
        lin_rows: list[Tensor] = []
        lin_bias: list[Tensor] = []
        self.heads: list[_RuleHead] = []
        for i, r in rules:
            det = r.detector
            steer_dir = clamp_cols = clamp_dirs = None
            if isinstance(det, SAEFeaturesDetector):
                assert self.sae is not None
                cols = torch.tensor([col[f.id] for f in det.features])
                w = torch.tensor([f.weight for f in det.features], dtype=torch.float32)
                combine, bias = det.combine, det.bias
                if r.action == "steer" and r.steer is not None:
                    sf = r.steer.features or [f.id for f in det.features]
                    dirs = self.sae.W_dec.data[torch.tensor(sf)].float()
                    dirs = dirs / dirs.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                    if r.steer.method == "subtract":
                        weights = [1.0] * len(sf) if r.steer.features else [f.weight for f in det.features]
                        sw = torch.tensor(weights)
                        v = (sw[:, None] * dirs).sum(0)
                        steer_dir = v / v.norm().clamp_min(1e-12)
                    else:
                        clamp_cols = torch.tensor([col[f] for f in sf])
                        clamp_dirs = self.sae.W_dec.data[torch.tensor(sf)].float()
            else:  # a linear rule, or an ensemble's linear part at this layer (its SAE members are carry heads)
                weight, bias_t = linear[r.id]
                lin_rows.append(weight.float())
                lin_bias.append(bias_t.float().reshape(()))
                cols = torch.tensor([len(self.features) + n_lin])
                n_lin += 1
                w = torch.ones(1)
                combine, bias = "sum", 0.0
                if r.action == "steer" and r.steer is not None:
                    unit = weight.float() / weight.float().norm().clamp_min(1e-12)
                    if r.steer.method == "subtract":
                        steer_dir = unit
                    else:
                        clamp_cols = cols
                        clamp_dirs = unit[None]
            self.heads.append(_RuleHead(
                r, i, cols, w, combine, bias, steer_dir, clamp_cols, clamp_dirs,
                linear=not isinstance(det, SAEFeaturesDetector), carry=(carries or {}).get(r.id),
            ))
        if lin_rows:
            self.linear_W = torch.stack(lin_rows)
            self.linear_b = torch.stack(lin_bias)
        if self.sae is not None and mode == "watched":
            self.encoder = WatchedEncoder(self.sae, self.features)
        self._feat_index = torch.tensor(self.features, dtype=torch.long)
        self.top_n = 5
        self.audit_sae: SAE | None = None
        """An SAE declared at this layer that no rule reads: explains decisions of linear rules in audits."""
        """Top features kept per scored token for audits (0 to skip)."""
        self.last_top: tuple[Tensor, Tensor] | None = None

    def release_full_sae(self) -> None:
        """Watched mode: drop the reference to the full SAE (the rows and steering directions are kept)."""
        if self.encoder is not None:
            self.sae = None

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> LayerScorer:
        """Move scoring tensors next to the layer they read."""
        if self.encoder is not None:
            self.encoder.to(device)
        if self.sae is not None and self.mode == "exact":
            self.sae.to(device)
        self._feat_index = self._feat_index.to(device)
        if self.linear_W is not None and self.linear_b is not None:
            self.linear_W, self.linear_b = self.linear_W.to(device), self.linear_b.to(device)
        for h in self.heads:
            h.columns, h.weights = h.columns.to(device), h.weights.to(device)
            if h.steer_direction is not None:
                h.steer_direction = h.steer_direction.to(device)
            if h.clamp_columns is not None and h.clamp_dirs is not None:
                h.clamp_columns, h.clamp_dirs = h.clamp_columns.to(device), h.clamp_dirs.to(device)
        return self

    def feature_matrix(self, hidden: Tensor) -> Tensor:
        """Activations of the watched features (then linear detector outputs): ``[B, T, n_cols]``."""
        parts = []
        self.last_top = None
        if self.encoder is not None:
            watched = self.encoder(hidden).float()
            parts.append(watched)
            if self.top_n and watched.shape[-1]:
                vals, cols = watched.topk(min(self.top_n, watched.shape[-1]), dim=-1)
                self.last_top = (vals, self._feat_index[cols])
        elif self.sae is not None:
            dense = self.sae.encode(hidden)
            check_finite(dense, f"layer {self.layer} SAE activations")
            parts.append(dense.index_select(-1, self._feat_index).float())
            if self.top_n:
                vals, idx = dense.topk(self.top_n, dim=-1)
                self.last_top = (vals.float(), idx)
        if self.linear_W is not None and self.linear_b is not None:
            parts.append(torch.nn.functional.linear(hidden.float(), self.linear_W, self.linear_b))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def rule_scores(self, feats: Tensor) -> Tensor:
        """Per-token scores before windowing, ``[B, T, n_heads]``."""
        out = []
        for h in self.heads:
            x = feats.index_select(-1, h.columns) * h.weights
            if h.combine == "sum":
                s = x.sum(-1)
            elif h.combine == "max":
                s = x.max(-1).values
            else:
                s = x.mean(-1)
            out.append(s + h.bias)
        return torch.stack(out, dim=-1)

    def top_features(self, hidden: Tensor, n: int = 5) -> list[tuple[int, float]]:
        """Top-``n`` SAE features of one hidden vector ``[d_model]`` (full encode), for audits."""
        sae = self.sae or self.audit_sae
        if sae is None:
            if self.encoder is None:
                return []
            with torch.inference_mode():  # watched mode without the full SAE: top of the watched features
                acts = self.encoder(hidden)
                vals, cols = acts.topk(min(n, acts.shape[-1]))
            return [(int(self._feat_index[c]), round(float(v), 4)) for v, c in zip(vals, cols, strict=True) if v > 0]
        with torch.inference_mode():
            acts = sae.encode(hidden.to(sae.device))
            vals, idx = acts.topk(min(n, acts.shape[-1]))
        return [(int(i), round(float(v), 4)) for v, i in zip(vals, idx, strict=True) if float(v) > 0]


def window_aggregate(history: Tensor, scores: Tensor, window: int, how: str) -> tuple[Tensor, Tensor]:
    """Aggregate each scored token's score with the ``window - 1`` scored tokens before it.

    ``history`` ``[B, window-1]`` holds earlier scores (NaN padding at the front where none);
    ``scores`` ``[B, T]`` the new ones (NaN where not scored: padding, special tokens). Unscored
    positions take no window slot, so a prefill and the same tokens fed one step at a time agree.
    Returns the windowed scores ``[B, T]`` (NaN where not scored) and the new history.
    """
    if window == 1:
        return scores, history
    out = torch.full_like(scores, float("nan"))
    new_hist = history.clone()
    for b in range(scores.shape[0]):
        ok = ~torch.isnan(scores[b])
        if not bool(ok.any()):
            continue
        seq = torch.cat([history[b], scores[b][ok]])  # [W-1+n], NaN only at the front
        win = seq.unfold(0, window, 1)  # [n, W]
        valid = ~torch.isnan(win)
        filled = torch.nan_to_num(win, nan=0.0)
        if how == "sum":
            agg = filled.sum(-1)
        elif how == "mean":
            agg = filled.sum(-1) / valid.sum(-1).clamp_min(1)
        else:
            agg = win.nan_to_num(nan=float("-inf")).max(-1).values
        out[b, ok] = agg
        new_hist[b] = seq[-(window - 1) :]
    return out, new_hist


def score_windowed_flat(values: Tensor, window: int, how: str) -> Tensor:
    """Windowed aggregate over a 1-D sequence of token scores (same rule as streaming)."""
    hist = torch.full((1, window - 1), float("nan"))
    out, _ = window_aggregate(hist, values[None], window, how)
    return out[0]


def check_finite(t: Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        raise DetectorError(f"{what}: non-finite values (NaN/inf) in activations")
