"""Calibration: labeled data, cached activations, serving-exact scores, thresholds and weights.

The score a threshold is fitted on is the score serving computes: the residuals come from
:func:`guardrails.offline.activations.collect_residuals` (same chat formatting and scored positions as
``GuardedModel``) and go through the policy engine's own layer scorers and window rule
(:class:`guardrails.engine.run.GuardRun`), so ``GuardedModel.score`` on the same text gives the same number
(checked by :func:`check_against_serving`). Residuals are cached on disk per layer
(:mod:`guardrails.offline.residuals`), so recalibrating is instant.

Data files are JSONL (or CSV with the same column names): ``{"text", "label"}`` (``prompt`` may stand for
``text``; input rules read it as the user prompt, output rules as the reply to :data:`CONTINUE_PROMPT`), or
``{"prompt", "response", "label"}``. Labels are 0/1, true/false or the words in :data:`LABEL_WORDS`;
optional ``source`` and ``category`` fields feed the per-source and per-category reports.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from guardrails.core.errors import GuardrailsError
from guardrails.core.policy import Rule

logger = logging.getLogger(__name__)

CONTINUE_PROMPT = "Continue the text."
"""User turn that text-only rows answer when an output rule scores them."""

MAX_TOKENS = 1024
"""Tokens per row at most (prompt + response); longer rows are cut, as collect_residuals does."""

Scope = Literal["input", "output"]

_KNOWN_COLUMNS = frozenset({"text", "prompt", "response", "label", "source", "category"})

LABEL_WORDS = {"1": 1, "0": 0, "true": 1, "false": 0, "harmful": 1, "benign": 0, "unsafe": 1, "safe": 0}
"""Label spellings a data file may use besides 0/1 and JSON true/false (case and spaces ignored)."""


class CalibrationError(GuardrailsError, ValueError):
    """Labeled data or a calibration request is invalid; the message names the file and row."""


@dataclass(frozen=True)
class LabeledData:
    """Rows of one labeled JSONL file."""

    path: str
    """Where the rows came from."""
    sha256: str
    """sha256 of the file's bytes."""
    texts: list[str]
    """User prompts (``text`` or ``prompt``)."""
    responses: list[str] | None
    """Assistant replies (``response``), or None for text-only files."""
    labels: np.ndarray
    """0/1 labels, int64."""
    sources: list[str]
    """Per-row ``source`` field (empty when absent)."""
    categories: list[str] | None = None
    """Per-row ``category`` field (hazard category; '-' when absent), or None for files without one."""
    fields: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    """Any other scalar column (a ``form``, a ``language``...), per row as text ('-' when absent): what
    ``guardrails eval --by`` can group by besides source and category."""

    def __len__(self) -> int:
        return len(self.texts)

    def select(self, idx: Sequence[int] | np.ndarray) -> LabeledData:
        """A subset of rows (hash extended by the row ids so caches never collide)."""
        ix = [int(i) for i in idx]
        h = hashlib.sha256((self.sha256 + ",".join(map(str, ix))).encode()).hexdigest()
        return LabeledData(
            self.path, h, [self.texts[i] for i in ix],
            [self.responses[i] for i in ix] if self.responses is not None else None,
            self.labels[ix], [self.sources[i] for i in ix],
            [self.categories[i] for i in ix] if self.categories is not None else None,
            {k: [v[i] for i in ix] for k, v in self.fields.items()},
        )


def load_labeled(
    path: str | os.PathLike[str], *, limit: int | None = None, max_response_chars: int | None = None
) -> LabeledData:
    """Read a labeled JSONL or CSV file (fields: see the module docstring).

    ``limit`` keeps a stratified random subset (seed 0; each label in proportion); ``max_response_chars``
    cuts responses at a word boundary (the head of a reply is what a guard sees first), and the data
    hash covers the cut.
    """
    p = Path(path)
    if not p.is_file():
        raise CalibrationError(f"data file {str(p)!r} not found")
    raw = p.read_bytes()
    texts: list[str] = []
    responses: list[str] = []
    labels: list[int] = []
    sources: list[str] = []
    categories: list[str] = []
    extra: list[dict[str, str]] = []
    has_resp: bool | None = None
    for n, row in _read_rows(p, raw):
        if "label" not in row:
            raise CalibrationError(f"{p}:{n}: expected 'label' and 'text' (or 'prompt'), or 'prompt', 'response' "
                                   f"and 'label'; the row has {sorted(row)}")
        this_resp = "response" in row
        if has_resp is None:
            has_resp = this_resp
        elif has_resp != this_resp:
            raise CalibrationError(f"{p}:{n}: rows mix 'text' and 'prompt'/'response' forms")
        key = "prompt" if this_resp or "text" not in row else "text"
        text = row.get(key)
        if not isinstance(text, str) or not text.strip():
            raise CalibrationError(f"{p}:{n}: {key!r} must be a non-empty string (a row needs 'text' or 'prompt')")
        texts.append(text)
        resp = str(row.get("response") or "")
        if max_response_chars is not None and len(resp) > max_response_chars:
            resp = resp[:max_response_chars].rsplit(" ", 1)[0]
        responses.append(resp)
        labels.append(_label(row["label"], f"{p}:{n}"))
        sources.append(str(row.get("source") or ""))
        categories.append(str(row["category"]) if row.get("category") not in (None, "") else "-")
        extra.append({k: str(v) for k, v in row.items()
                      if k not in _KNOWN_COLUMNS and isinstance(v, str | int | float | bool) and v != ""})
    if not texts:
        raise CalibrationError(f"{p}: no rows")
    digest = hashlib.sha256(raw).hexdigest()
    if max_response_chars is not None and has_resp:
        digest = hashlib.sha256(f"{digest}:head{max_response_chars}".encode()).hexdigest()
    data = LabeledData(str(p), digest, texts, responses if has_resp else None,
                       np.asarray(labels, dtype=np.int64), sources,
                       categories if any(c != "-" for c in categories) else None,
                       {k: [e.get(k, "-") for e in extra] for k in sorted({k for e in extra for k in e})})
    if limit is not None and limit < len(data):
        rng = np.random.default_rng(0)
        keep: list[int] = []
        for lab in (0, 1):
            ids = np.flatnonzero(data.labels == lab)
            n_keep = round(limit * len(ids) / len(data))
            keep += sorted(rng.choice(ids, size=min(len(ids), max(n_keep, 1)), replace=False).tolist())
        data = data.select(sorted(keep))
    return data


def _read_rows(p: Path, raw: bytes) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, row)`` of a JSONL file, or of a CSV file (``.csv``: a header row, then one row per line)."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CalibrationError(f"{p}: not UTF-8 text ({exc})") from None
    if p.suffix.lower() == ".csv":
        import csv
        import io

        reader = csv.DictReader(io.StringIO(text, newline=""))
        rows: list[tuple[int, dict[str, Any]]] = []
        try:
            for r in reader:
                if not any((v or "").strip() for v in r.values() if isinstance(v, str)):
                    continue  # a blank line
                if None in r.values() or None in r:  # fewer fields than the header, or more
                    n_fields = sum(v is not None for k, v in r.items() if k is not None) + len(r.get(None) or [])
                    raise CalibrationError(f"{p}:{reader.line_num}: the row has {n_fields} fields, the header "
                                           f"{len(reader.fieldnames or [])} (an unquoted comma?)")
                rows.append((reader.line_num, dict(r)))
        except csv.Error as exc:
            raise CalibrationError(f"{p}:{reader.line_num}: not CSV: {exc}") from None
        return rows
    out: list[tuple[int, dict[str, Any]]] = []
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 is valid JSON text
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CalibrationError(f"{p}:{n}: not JSON: {exc} (data files are JSONL, or CSV named *.csv)") from None
        if not isinstance(row, dict):
            raise CalibrationError(f"{p}:{n}: expected a JSON object with 'label' and 'text' (or 'prompt', 'response')")
        out.append((n, row))
    return out


def _label(value: Any, where: str) -> int:
    """0/1 from a row's label: 0/1, true/false, or a word of :data:`LABEL_WORDS`."""
    if isinstance(value, bool) or value in (0, 1):
        return int(value)
    if isinstance(value, str) and value.strip().lower() in LABEL_WORDS:
        return LABEL_WORDS[value.strip().lower()]
    raise CalibrationError(f"{where}: label must be 0 or 1 (or true/false, {'/'.join(list(LABEL_WORDS)[4:])}), "
                           f"got {value!r}")


def rows_for_scope(data: LabeledData, scope: Scope) -> tuple[list[str], list[str] | None]:
    """``(prompts, responses)`` as the guard sees them for rules of ``scope``."""
    if scope == "input":
        return data.texts, None
    if data.responses is not None:
        return data.texts, data.responses
    return [CONTINUE_PROMPT] * len(data), data.texts


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
            raise CalibrationError("no negative (label 0) rows to fit a threshold on")
        allowed = math.floor(target_fpr * n_neg + 1e-9)
        if allowed >= len(neg):
            return float(np.min(s[ok])) if ok.any() else 0.0
        return float(np.nextafter(neg[allowed], np.inf))
    assert target_recall is not None
    if not 0 < target_recall <= 1:
        raise CalibrationError(f"target_recall must be in (0, 1], got {target_recall}")
    pos = np.sort(s[ok & (y == 1)])[::-1]
    n_pos = int((y == 1).sum())
    if n_pos == 0:
        raise CalibrationError("no positive (label 1) rows to fit a threshold on")
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
