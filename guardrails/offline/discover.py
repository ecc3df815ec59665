"""Feature discovery: rank SAE features by how well they separate labeled texts, and explain them.

Each text is summarised per feature by its highest activation over the tokens a guard would score
(the decision score of a one-feature rule is exactly that). Features are ranked by the AUROC of that
summary against the labels; the table also gives how often the feature fires at all on each label
and the difference of the label means. A top feature is explained by the tokens, in context, where it
fires the most.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from torch import Tensor

from guardrails.core.tokentext import token_pieces
from guardrails.serving.prompts import PromptLike


@dataclass(frozen=True)
class FeatureStats:
    """How one SAE feature separates the labels."""

    feature: int
    """Feature id in the SAE."""
    auroc: float
    """AUROC of the per-text max activation (label 1 = positive)."""
    freq_pos: float
    """Share of label-1 texts where the feature fires on some token."""
    freq_neg: float
    """Share of label-0 texts where the feature fires on some token."""
    mean_pos: float
    """Mean per-text max activation on label-1 texts."""
    mean_neg: float
    """Mean per-text max activation on label-0 texts."""

    @property
    def mean_diff(self) -> float:
        return self.mean_pos - self.mean_neg


def feature_aurocs(pooled: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AUROC of every column of ``pooled`` ``[n, d]`` against 0/1 ``labels`` (ties count half)."""
    from scipy.stats import rankdata

    y = np.asarray(labels).astype(bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        raise ValueError("feature ranking needs both labels (0 and 1) in the data")
    ranks = rankdata(pooled, axis=0, method="average")
    return (ranks[y].sum(0) - n1 * (n1 + 1) / 2) / (n1 * n0)


def rank_features(
    pooled: np.ndarray, labels: np.ndarray, *, top: int = 20, min_freq: float = 0.0
) -> list[FeatureStats]:
    """The ``top`` features by AUROC (then by mean difference), firing on >= ``min_freq`` of label-1 texts."""
    y = np.asarray(labels).astype(bool)
    auc = feature_aurocs(pooled, y)
    fires = pooled > 0
    f_pos, f_neg = fires[y].mean(0), fires[~y].mean(0)
    m_pos, m_neg = pooled[y].mean(0), pooled[~y].mean(0)
    order = np.lexsort((-(m_pos - m_neg), -auc))
    out = []
    for i in order:
        if f_pos[i] < min_freq:
            continue
        out.append(FeatureStats(int(i), float(auc[i]), float(f_pos[i]), float(f_neg[i]), float(m_pos[i]),
                                float(m_neg[i])))
        if len(out) == top:
            break
    return out


def scored_tokens(tokenizer: Any, prompts: Sequence[PromptLike], responses: Sequence[str] | None, scope: str,
                  chat: bool = True) -> list[list[str]]:
    """Token strings at the positions collect_residuals keeps (same formatting and filters)."""
    from guardrails.offline.activations import scored_rows
    from guardrails.offline.calibrate import MAX_TOKENS

    out = []
    sc: Literal["input", "output"] = "output" if scope == "output" else "input"
    for ids, keep in scored_rows(tokenizer, prompts, responses, sc, chat=chat, max_tokens=MAX_TOKENS):
        toks = token_pieces(list(ids), lambda g: str(tokenizer.decode(list(g))))
        out.append([_context(toks, j) for j in keep])
    return out


def _context(toks: list[str], j: int, before: int = 6) -> str:
    while j > 0 and toks[j] == "":  # a later byte of a character split over tokens: show the whole character
        j -= 1
    left = "".join(toks[max(0, j - before) : j]).replace("\n", "⏎")
    return f"{left[-40:]}[[{toks[j].replace(chr(10), '⏎')}]]"


def explain(sae: Any, rows: list[Tensor], contexts: list[list[str]], features: list[int], *, n: int = 5,
            batch_tokens: int = 4096) -> dict[int, list[tuple[float, str]]]:
    """Top-``n`` (activation, token-in-context) per feature over all rows' tokens (one per text, each context once)."""
    import torch

    best: dict[int, list[tuple[float, int, str]]] = {f: [] for f in features}
    idx = torch.tensor(features)
    for r_i, (row, ctx) in enumerate(zip(rows, contexts, strict=True)):
        if not len(row):
            continue
        with torch.inference_mode():
            acts = sae.encode(row.to(sae.device, sae.dtype)).float().cpu().index_select(-1, idx)
        vals, pos = acts.max(0)
        for c, f in enumerate(features):
            v = float(vals[c])
            if v > 0:
                where = ctx[int(pos[c])] if int(pos[c]) < len(ctx) else "?"
                best[f].append((v, r_i, where))
    return {f: _distinct(sorted(b, key=lambda t: -t[0]), n) for f, b in best.items()}


def _distinct(ranked: list[tuple[float, int, str]], n: int) -> list[tuple[float, str]]:
    """The first ``n`` of ``ranked`` with distinct contexts: a file that repeats a text shows it once."""
    out: list[tuple[float, str]] = []
    seen: set[str] = set()
    for v, _, where in ranked:
        if where not in seen:
            seen.add(where)
            out.append((round(v, 2), where))
            if len(out) == n:
                break
    return out


def draft_rule(stats: list[FeatureStats], *, n_features: int = 5, threshold: float = 0.0, window: int = 4,
               sae_id: str = "main", scope: str = "input", rule_id: str = "discovered",
               explanations: dict[int, list[tuple[float, str]]] | None = None) -> dict[str, Any]:
    """A rule dict: the top positively separating features, equal weights, windowed mean of their sum."""
    chosen = [s for s in stats if s.auroc > 0.5][:n_features]
    feats = []
    for s in chosen:
        ex = (explanations or {}).get(s.feature) or []
        label = f"AUROC {s.auroc:.3f}; top: {ex[0][1]}" if ex else f"AUROC {s.auroc:.3f}"
        feats.append({"id": s.feature, "weight": 1.0, "label": label[:120]})
    return {
        "id": rule_id, "description": "Draft from guardrails discover; calibrate before use.", "scope": scope,
        "detector": {"kind": "sae_features", "sae": sae_id, "features": feats, "combine": "sum", "window": window,
                     "aggregate": "mean"},
        "threshold": round(float(threshold), 4), "action": "flag",
    }
