"""Calibration: labeled data, cached activations, serving-exact scores, thresholds and weights.

The score a threshold is fitted on is the score serving computes: the residuals come from
:func:`guardrails.offline.activations.collect_residuals` (same chat formatting and scored positions as
``GuardedModel``) and go through the policy engine's own layer scorers and window rule
(:class:`guardrails.engine.run.GuardRun`), so ``GuardedModel.score`` on the same text gives the same number
(checked by :func:`check_against_serving`). Residuals are cached on disk per layer
(:mod:`guardrails.offline.residuals`), so recalibrating is instant.

Data files: :mod:`guardrails.offline.labeled` (text-only rows are, for output rules, the reply to
:data:`CONTINUE_PROMPT`).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from guardrails.core.policy import Rule

# the labeled-data reader lived here until v0.3.4: its names stay importable from this module
from guardrails.offline.labeled import LABEL_WORDS as LABEL_WORDS
from guardrails.offline.labeled import CalibrationError as CalibrationError
from guardrails.offline.labeled import DataFormat as DataFormat
from guardrails.offline.labeled import LabeledData as LabeledData
from guardrails.offline.labeled import load_labeled as load_labeled
from guardrails.offline.labeled import with_system as with_system
from guardrails.serving.prompts import PromptLike

logger = logging.getLogger(__name__)

CONTINUE_PROMPT = "Continue the text."
"""User turn that text-only rows answer when an output rule scores them."""

MAX_TOKENS = 1024
"""Tokens per row at most (prompt + response); longer rows are cut, as collect_residuals does."""

Scope = Literal["input", "output"]

def rows_for_scope(data: LabeledData, scope: Scope) -> tuple[list[PromptLike], list[str] | None]:
    """``(prompts, responses)`` as the guard sees them for rules of ``scope`` (a prompt is a conversation where
    the row has context turns: ``LabeledData.prompt``)."""
    if scope == "output" and data.responses is None:
        return [data.prompt(i, CONTINUE_PROMPT) for i in range(len(data))], data.texts
    return [data.prompt(i) for i in range(len(data))], (None if scope == "input" else data.responses)


# -- serving-exact scores ---------------------------------------------------------------------------------


def rule_scope(rule: Rule) -> Scope:
    return "input" if rule.scope in ("input", "both") else "output"


def check_against_serving(
    guard: Any, data: LabeledData, rule_id: str, computed: np.ndarray, *, n: int = 8, rtol: float = 1e-3
) -> float:
    """Score ``n`` rows with ``GuardedModel.score`` and return the largest relative difference to ``computed``."""
    rule = next(r for r in guard.policy.rules if r.id == rule_id)
    prompts, responses = rows_for_scope(data, rule_scope(rule))
    idx = np.linspace(0, len(data) - 1, num=min(n, len(data))).astype(int)
    got = guard.score([prompts[i] for i in idx], responses=[responses[i] for i in idx] if responses else None)
    worst = 0.0
    for j, i in enumerate(idx):
        a, b = got[j].scores[rule_id], computed[i]
        diff = abs(a - b) / max(1.0, abs(a), abs(b))
        worst = max(worst, diff)
    if worst > rtol:
        logger.warning("calibration scores differ from GuardedModel.score by up to %.3g (relative)", worst)
    return worst


# -- thresholds -----------------------------------------------------------------------------------------------


def allowed_false_positives(target_fpr: float, n_neg: int) -> int:
    """How many of ``n_neg`` label-0 rows may fire at ``target_fpr`` (what :func:`fit_threshold` fits to)."""
    return math.floor(target_fpr * n_neg + 1e-9)


def fit_threshold(
    scores: np.ndarray, labels: np.ndarray, *, target_fpr: float | None = None, target_recall: float | None = None
) -> float:
    """The lowest threshold with FPR <= ``target_fpr`` (a token fires when score >= threshold), or the highest
    threshold with recall >= ``target_recall``. NaN scores (nothing scored) never fire."""
    if (target_fpr is None) == (target_recall is None):
        raise CalibrationError("give exactly one of target_fpr, target_recall")
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    ok = ~np.isnan(s)
    if target_fpr is not None:
        if not 0 <= target_fpr < 1:
            raise CalibrationError(f"target_fpr must be in [0, 1), got {target_fpr}")
        neg = np.sort(s[ok & (y == 0)])[::-1]
        n_neg = int((y == 0).sum())
        if n_neg == 0:
            raise CalibrationError("no label-0 (benign) rows to fit a threshold at a target FPR on: add benign rows "
                                   "to the calibration data, or fit a recall (--target-recall)")
        allowed = allowed_false_positives(target_fpr, n_neg)
        if allowed >= len(neg):
            return float(np.min(s[ok])) if ok.any() else 0.0
        return float(np.nextafter(neg[allowed], np.inf))
    assert target_recall is not None
    if not 0 < target_recall <= 1:
        raise CalibrationError(f"target_recall must be in (0, 1], got {target_recall}")
    pos = np.sort(s[ok & (y == 1)])[::-1]
    n_pos = int((y == 1).sum())
    if n_pos == 0:
        raise CalibrationError("no label-1 (harmful) rows to fit a threshold at a target recall on: add harmful "
                               "rows to the calibration data, or fit an FPR (--target-fpr)")
    need = math.ceil(target_recall * n_pos - 1e-9)
    if need > len(pos):
        raise CalibrationError(f"recall {target_recall} unreachable: only {len(pos)} of {n_pos} positives scored")
    return float(pos[need - 1])


# -- weights ---------------------------------------------------------------------------------------------------


def prefix_aware_pooled(sae: Any, rows: list[Tensor]) -> np.ndarray:
    """Max-pooled features over the tokens after the rows' shared prefix (a chat template's system prompt),
    with every feature that fires on that prefix zeroed: such a feature gives every text the same floor
    score, so it cannot separate texts as served (max over tokens)."""
    from guardrails.offline.baselines import shared_prefix

    p = shared_prefix(rows)
    pooled = max_pooled_features(sae, [r[p:] if len(r) > p else r for r in rows])
    if p:
        with torch.inference_mode():
            on_prefix = (sae.encode(rows[0][:p].to(sae.device, sae.dtype)).float().cpu() > 0).any(0).numpy()
        pooled[:, on_prefix] = 0.0
    return pooled


def max_pooled_features(sae: Any, rows: list[Tensor], *, batch_tokens: int = 4096) -> np.ndarray:
    """Per-row max over tokens of every SAE feature's activation, ``[n_rows, d_sae]`` (0 for empty rows)."""
    out = np.zeros((len(rows), sae.d_sae), dtype=np.float32)
    flat = [r for r in rows if len(r)]
    if not flat:
        return out
    x = torch.cat(flat)
    owner = torch.cat([torch.full((len(r),), i) for i, r in enumerate(rows) if len(r)])
    pooled = torch.full((len(rows), sae.d_sae), -math.inf)
    with torch.inference_mode():
        for s in range(0, len(x), batch_tokens):
            acts = sae.encode(x[s : s + batch_tokens].to(sae.device, sae.dtype)).float().cpu()
            idx = owner[s : s + batch_tokens][:, None].expand_as(acts)
            pooled.scatter_reduce_(0, idx, acts, reduce="amax")
    pooled[torch.isinf(pooled)] = 0.0
    return pooled.numpy()


def fit_sparse_weights(
    features: np.ndarray, labels: np.ndarray, *, max_features: int = 16, c: float | None = None
) -> dict[int, float]:
    """Positive feature weights by L1 logistic regression on (standardised) max-pooled activations.

    Weights are returned in activation units (coefficient / feature scale), largest ``max_features`` kept,
    normalised so the largest is 1. ``c`` (inverse regularisation) is searched when not given.
    """
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError as exc:  # pragma: no cover
        raise ImportError("--fit-weights needs scikit-learn: pip install scikit-learn") from exc
    scale = features.std(0) + 1e-6
    z = features / scale
    best: dict[int, float] = {}
    for cc in [c] if c is not None else [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]:
        clf = LogisticRegression(C=cc, solver="liblinear", class_weight="balanced", max_iter=2000, **_l1())
        clf.fit(z, labels)
        coef = clf.coef_[0] / scale
        pos = {int(i): float(coef[i]) for i in np.flatnonzero(coef > 0)}
        if pos:
            best = pos
        if len(pos) >= max_features:
            break
    if not best:
        raise CalibrationError("sparse logistic regression kept no positive feature; try more data or a larger C")
    top = sorted(best.items(), key=lambda kv: -kv[1])[:max_features]
    m = top[0][1]
    return {i: round(w / m, 4) for i, w in top}


def _l1() -> dict[str, Any]:
    """L1 penalty arguments for this scikit-learn ('penalty' is deprecated from 1.8 on)."""
    import sklearn

    major, minor = (int(p) for p in sklearn.__version__.split(".")[:2])
    return {"l1_ratio": 1.0} if (major, minor) >= (1, 8) else {"penalty": "l1"}


def explain_direction(sae: Any, weight: np.ndarray, *, n: int = 5) -> list[tuple[int, float]]:
    """SAE features whose decoder directions align best with a linear detector's weight (cosine)."""
    w = torch.as_tensor(weight, dtype=torch.float32)
    dec = sae.W_dec.detach().float().cpu()
    cos = (dec @ w) / (dec.norm(dim=-1) * w.norm()).clamp_min(1e-12)
    vals, idx = cos.topk(n)
    return [(int(i), round(float(v), 3)) for v, i in zip(vals, idx, strict=True)]


# cached residuals live in guardrails.offline.residuals and scoring them through the engine in
# guardrails.offline.scoring; these names stay importable here
from guardrails.offline.residuals import ResidualRows as ResidualRows  # noqa: E402
from guardrails.offline.residuals import cache_root as cache_root  # noqa: E402
from guardrails.offline.residuals import collect_sorted as collect_sorted  # noqa: E402
from guardrails.offline.residuals import residuals as residuals  # noqa: E402
from guardrails.offline.residuals import residuals_at as residuals_at  # noqa: E402
from guardrails.offline.residuals import scored_positions as scored_positions  # noqa: E402
from guardrails.offline.scoring import gate_scores as gate_scores  # noqa: E402
from guardrails.offline.scoring import rule_text_scores as rule_text_scores  # noqa: E402
from guardrails.offline.scoring import text_scores as text_scores  # noqa: E402
from guardrails.offline.scoring import token_scores as token_scores  # noqa: E402
from guardrails.offline.scoring import unthresholded as unthresholded  # noqa: E402
