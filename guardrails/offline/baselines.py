"""Baselines beside SAE features: a keyword list, a linear probe and a DiffMean direction.

The probe and the DiffMean direction are fitted on per-row means of the raw residual stream (the
tokens a guard scores, at the rule's layer) of the train split, and are then scored like any linear
rule as served: ``x · w + b`` per token, windowed, max over tokens (:func:`linear_policy`), so their
numbers compare with a policy's and either can be shipped as a ``detector: {kind: linear}`` rule.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

HARM_KEYWORDS = (
    "bomb", "explosive", "weapon", "gun", "kill", "murder", "poison", "drug", "meth", "cocaine", "heroin",
    "hack", "malware", "virus", "ransomware", "exploit", "steal", "fraud", "scam", "phishing", "launder",
    "counterfeit", "terror", "attack", "violence", "suicide", "self-harm", "harass", "threat", "racist",
    "illegal", "smuggle", "traffick", "assault", "abuse", "kidnap", "torture", "stalk", "blackmail", "extort",
)
"""Words whose presence a naive filter treats as harmful (counted as substrings, case-insensitive)."""

COMPLIANCE_KEYWORDS = ("sure", "here is", "here's", "step 1", "first,", "1.", "to do this")
REFUSAL_KEYWORDS = (
    "i can't", "i cannot", "i can not", "i won't", "i will not", "i'm sorry", "i am sorry", "sorry,", "as an ai",
    "i'm not able", "i am not able", "i'm unable", "i am unable", "not appropriate", "cannot provide",
    "can't help", "cannot help", "can't assist", "cannot assist", "i must decline", "against my", "unethical",
    "illegal and", "i apologize",
)
"""Phrases of a refusal; their count is a refusal baseline, its negation a compliance baseline."""

TOXIC_KEYWORDS = (
    "fuck", "shit", "bitch", "ass", "dick", "cock", "pussy", "cunt", "bastard", "damn", "crap", "whore", "slut",
    "fag", "nigg", "retard", "idiot", "stupid", "dumb", "moron", "hate", "kill", "die", "sex", "naked", "porn",
    "suck", "loser", "ugly", "fat", "rape",
)
"""Profanity, slurs (as stems) and insults; substrings, case-insensitive."""

KEYWORDS: dict[str, tuple[str, ...]] = {"harm": HARM_KEYWORDS, "toxic": TOXIC_KEYWORDS}


def keyword_scores(texts: list[str], words: tuple[str, ...]) -> np.ndarray:
    """Number of keyword occurrences per text (word-start match, case-insensitive)."""
    pat = re.compile("|".join(r"\b" + re.escape(w) for w in words), re.IGNORECASE)
    return np.array([float(len(pat.findall(t))) for t in texts])


def compliance_keyword_scores(responses: list[str]) -> np.ndarray:
    """Compliance baseline: minus the number of refusal phrases in the response."""
    return -keyword_scores(responses, REFUSAL_KEYWORDS)


def shared_prefix(rows: list[Tensor], *, check: int = 64, rtol: float = 1e-3) -> int:
    """Leading positions where every row's residual is the same (a chat template's system prompt).

    Causal attention makes the residuals of a common prefix identical across texts, so they carry no
    label information; pooling skips them.
    """
    sample = [r for r in rows if len(r)][:check]
    if len(sample) < 2:
        return 0
    n = min(len(r) for r in sample) - 1  # keep at least one token per row
    p = 0
    while p < n and all(torch.allclose(sample[0][p], r[p], rtol=rtol, atol=rtol * float(r[p].abs().max()))
                        for r in sample[1:]):
        p += 1
    return p


def pooled(rows: list[Tensor], skip: int | None = None) -> np.ndarray:
    """Mean residual per row ``[n_rows, d_model]`` over the tokens after the shared prefix (``skip``;
    detected when None); zeros for rows with no scored token."""
    d = next(r.shape[-1] for r in rows if r.ndim == 2)
    p = shared_prefix(rows) if skip is None else skip
    return np.stack([
        (r[p:] if len(r) > p else r).float().mean(0).numpy() if len(r) else np.zeros(d, np.float32) for r in rows
    ])


def fit_probe(rows: list[Tensor], labels: np.ndarray, *, c: float = 0.05) -> tuple[np.ndarray, float]:
    """Logistic regression on standardised mean residuals; returns ``(w, b)`` in raw residual units."""
    from sklearn.linear_model import LogisticRegression

    x = pooled(rows)
    mu, sd = x.mean(0), x.std(0) + 1e-6
    clf = LogisticRegression(C=c, class_weight="balanced", max_iter=5000)
    clf.fit((x - mu) / sd, labels)
    coef = clf.coef_[0] / sd
    bias = float(clf.intercept_[0] - (coef * mu).sum())
    return coef.astype(np.float32), bias


def fit_diffmean(rows: list[Tensor], labels: np.ndarray) -> tuple[np.ndarray, float]:
    """Unit difference-of-means direction; bias puts the midpoint of the class means at 0."""
    x = pooled(rows)
    m1, m0 = x[labels == 1].mean(0), x[labels == 0].mean(0)
    w = m1 - m0
    w = w / (np.linalg.norm(w) + 1e-12)
    return w.astype(np.float32), float(-w @ (m1 + m0) / 2)


def save_linear(path: str | Path, w: np.ndarray, b: float, meta: dict[str, str] | None = None,
                extra: dict[int, np.ndarray] | None = None) -> Path:
    """Write a linear detector's weights (``weight`` [d_model], ``bias`` []) as safetensors; ``extra``: the
    shallower layers' weights of a multi-layer probe (``weight.L<l>``, the detector's ``extra_layers``)."""
    from safetensors.torch import save_file

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"weight": t(w), "bias": torch.tensor(float(b), dtype=torch.float32)}
    tensors |= {f"weight.L{layer}": t(v) for layer, v in (extra or {}).items()}
    save_file(tensors, str(p), metadata=meta or {})
    return p


def linear_policy(
    weights: str | Path, layer: int, scope: str, *, method: str = "probe", window: int = 1, aggregate: str = "mean",
    name: str = "linear-baseline", rule_id: str = "linear", threshold: float = 0.0,
) -> Any:
    """A one-rule policy whose detector is a linear direction, for scoring a baseline as served."""
    from guardrails.core.policy import Policy

    return Policy.from_dict({
        "name": name, "model": "bundled",
        "rules": [{"id": rule_id, "scope": scope, "threshold": threshold, "action": "flag",
                   "detector": {"kind": "linear", "layer": layer, "weights": str(Path(weights).resolve()),
                                "method": method, "window": window, "aggregate": aggregate}}],
    })
