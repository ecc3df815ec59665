"""Form erasure for the request probes (v0.3.5): AdvBench's sentence frames as a nuisance attribute.

The groups are "opens with one of AdvBench's frame verbs" and "does not", per row of the train split; the
directions and their projection are the package's (``guardrails.offline.erasure``, which ``guardrails calibrate
--invariant-to COLUMN`` uses for any labeled column). ``style_erasure.py`` measures variants, ``fit_shipped.py
--probe-erase`` fits the probe of ``harmful-requests-formfree``, ``maxwin.py cv --erase`` cross-validates it.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import numpy as np

from guardrails.offline.erasure import fold, invariance_basis, project


def frame_verbs(texts: Sequence[str], sources: Sequence[str], n: int = 20) -> set[str]:
    """The ``n`` most common first words of the AdvBench rows among ``texts`` ("Write", "Create", "Develop", ...)."""
    first = collections.Counter(t.split()[0] for t, s in zip(texts, sources, strict=True) if s == "advbench" and t)
    return {w for w, _ in first.most_common(n)}


def opens_with(texts: Sequence[str], verbs: set[str]) -> np.ndarray:
    return np.array([bool(t.split()) and t.split()[0] in verbs for t in texts])


def frame_rows(rows: Sequence[dict], sources: Sequence[str]) -> tuple[np.ndarray, set[str]]:  # type: ignore[type-arg]
    """Which of a cached set's rows open with one of its AdvBench rows' frame verbs, and those verbs."""
    texts = [r["text"] for r in rows]
    verbs = frame_verbs(texts, sources)
    return opens_with(texts, verbs), verbs


def frame_basis(pooled: np.ndarray, frame: np.ndarray, y: np.ndarray, labels: Sequence[int] = (0, 1)) -> np.ndarray:
    """Orthonormal basis [d, k] of the within-label frame directions of the labels in ``labels`` (one each)."""
    keep = np.isin(y, list(labels))
    groups = np.where(frame, "frame", "other")
    return invariance_basis(pooled[keep], groups[keep], y[keep])


def project_blocks(x: np.ndarray, bases: Sequence[np.ndarray], alpha: float = 1.0) -> np.ndarray:
    """Project each layer's block of a stacked [tokens, d x layers] matrix off its basis, in place (``alpha`` < 1:
    only that share of the component)."""
    d = x.shape[1] // len(bases)
    for i, u in enumerate(bases):
        block = x[:, i * d : (i + 1) * d]
        if alpha == 1.0:
            project(block, u)
        else:
            block -= alpha * ((block @ u) @ u.T)
    return x


def fold_weights(coef: np.ndarray, bases: Sequence[np.ndarray], alpha: float = 1.0) -> np.ndarray:
    """Stacked probe weights fitted on projected residuals as raw-space weights: ``w . (P h) = (P w) . h``."""
    parts = np.split(coef.astype(np.float32), len(bases))
    if alpha == 1.0:
        return np.concatenate([fold(p, u) for p, u in zip(parts, bases, strict=True)])
    return np.concatenate([p - alpha * (u @ (u.T @ p)) for p, u in zip(parts, bases, strict=True)])
