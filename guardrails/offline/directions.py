"""Steering directions as artifacts: build them from labeled data, save them with a record, load them.

Three kinds, all read at one layer's residual stream (the positions a guard scores: no attention sink,
no special tokens):

- ``contrastive``: the same prompts followed by two kinds of continuation (rows ``{prompt, response,
  label}``; e.g. label 1 a refusal, label 0 a compliant answer). Each row is the mean over its
  *continuation* tokens; the direction is mean(label 1) - mean(label 0). Steering toward it (+) makes
  the model continue like the label-1 rows. On the bundled model this refusal direction works where
  a prompt DiffMean does not (docs: DESIGN.md "Steering the bundled model").
- ``diffmean``: mean(label 1) - mean(label 0) of prompt residuals (rows ``{text, label}``), pooled as
  the last prompt token (``pool="last"``) or the mean of the prompt's tokens (``pool="mean"``).
- ``probe``: a logistic-regression probe on the same pooled prompt residuals (its weight vector).

:func:`save_direction` writes ``<name>.safetensors`` (tensor ``direction``, metadata ``layer`` and
``kind``; the unnormalised vector, so its norm is kept) and ``<name>.json`` (a record like the
calibration records: data file and sha256, counts, the median residual norm at the layer, and the
separation of the two groups along the direction on held-out rows).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from guardrails.core.errors import GuardrailsError
from guardrails.offline.activations import PromptLike
from guardrails.offline.dataformat import DataFormat
from guardrails.offline.labeled import load_labeled

Kind = Literal["contrastive", "diffmean", "probe"]
KINDS: tuple[str, ...] = ("contrastive", "diffmean", "probe")


class DirectionError(GuardrailsError, ValueError):
    """Direction data or arguments are invalid; the message says where and what is valid."""


@dataclass(frozen=True)
class DirectionRecord:
    """How a direction was built (saved next to it as JSON)."""

    kind: str
    """contrastive, diffmean or probe."""
    layer: int
    """Residual stream (output of this decoder block) the direction lives in."""
    data: str
    """Data file the direction was fitted on."""
    data_sha256: str
    """sha256 of that file's bytes."""
    n_positive: int
    """Rows with label 1 used for fitting (the side steering toward the direction goes to)."""
    n_negative: int
    """Rows with label 0 used for fitting."""
    pool: str
    """How a row becomes one vector: continuation mean (contrastive), last or mean prompt token."""
    residual_norm: float
    """Median residual norm at ``layer`` over the fitted tokens (strength 1 in ``relative_to: norm``)."""
    direction_norm: float
    """Norm of the saved (unnormalised) vector."""
    heldout_auroc: float | None
    """AUROC of the projection on the unit direction, label 1 vs 0, on the held-out rows (None: none held out)."""
    heldout_gap: float | None
    """Mean projection gap (label 1 - label 0) on held-out rows, in multiples of the residual norm."""
    n_heldout: int
    """Rows held out (every ``holdout``-th row) for the two numbers above."""
    model: str
    """Model the direction was read from."""
    date: str
    """UTC date of the build."""


class Direction:
    """A fitted direction and its record."""

    def __init__(self, vector: Tensor, record: DirectionRecord) -> None:
        self.vector = vector
        self.record = record

    @property
    def unit(self) -> Tensor:
        return self.vector / self.vector.norm().clamp_min(1e-12)


def pooled_residuals(
    model: Any, tokenizer: Any, texts: Sequence[PromptLike], layers: list[int], *, responses: list[str] | None = None,
    pool: str = "mean", batch_size: int = 8,
) -> dict[int, tuple[Tensor, float]]:
    """Per layer: one vector per row ``[n, d_model]`` and the median token norm.

    With ``responses``: mean over the response tokens; else the last (``pool="last"``) or mean prompt token.
    """
    from guardrails.offline.activations import collect_residuals

    scope: Literal["input", "output"] = "output" if responses is not None else "input"
    res = collect_residuals(model, tokenizer, texts, layers, responses=responses, scope=scope,
                            batch_size=batch_size, progress=False)
    out = {}
    for layer in layers:
        rows, norms = [], []
        for i, r in enumerate(res[layer]):
            if r.shape[0] == 0:
                raise DirectionError(f"row {i}: no scored tokens in its {'response' if responses else 'prompt'}")
            rows.append(r[-1] if (pool == "last" and responses is None) else r.mean(0))
            norms.append(r.norm(dim=-1))
        out[layer] = (torch.stack(rows), float(torch.cat(norms).median()))
    return out


def build_direction(
    model: Any, tokenizer: Any, data: str | os.PathLike[str], *, kind: Kind, layer: int, pool: str = "last",
    holdout: int = 5, limit: int | None = None, batch_size: int = 8, model_name: str = "bundled",
    fmt: DataFormat | None = None,
) -> Direction:
    """Fit a direction of ``kind`` at ``layer`` on a labeled JSONL file (see the module docstring; ``fmt``: a file
    in another layout, :class:`guardrails.offline.labeled.DataFormat`).

    Every ``holdout``-th row (0: none) is kept out of the fit and measures the separation.
    """
    return build_directions(model, tokenizer, data, kind=kind, layers=[layer], pool=pool, holdout=holdout,
                            limit=limit, batch_size=batch_size, model_name=model_name, fmt=fmt)[layer]


def build_directions(
    model: Any, tokenizer: Any, data: str | os.PathLike[str], *, kind: Kind, layers: list[int], pool: str = "last",
    holdout: int = 5, limit: int | None = None, batch_size: int = 8, model_name: str = "bundled",
    fmt: DataFormat | None = None,
) -> dict[int, Direction]:
    """:func:`build_direction` at several layers from one pass over the data."""
    from guardrails.engine.hooks import check_layer

    if kind not in KINDS:
        raise DirectionError(f"unknown direction kind {kind!r}; valid: {', '.join(KINDS)}")
    if pool not in ("last", "mean"):
        raise DirectionError(f"unknown pool {pool!r}; valid: last, mean")
    for layer in layers:
        check_layer(model, layer, where="direction layer")
    ds = load_labeled(data, limit=limit, fmt=fmt)
    if kind == "contrastive" and ds.responses is None:
        raise DirectionError(f"{data}: contrastive directions need rows with 'prompt', 'response' and 'label'")
    labels = np.asarray(ds.labels)
    if not ((labels == 1).any() and (labels == 0).any()):
        raise DirectionError(f"{data}: needs rows of both labels (1: steer toward, 0: away); got {sorted(set(labels))}")
    pooled = pooled_residuals(model, tokenizer, [ds.prompt(i) for i in range(len(ds))], layers,
                              responses=list(ds.responses) if kind == "contrastive" and ds.responses else None,
                              pool="mean" if kind == "contrastive" else pool, batch_size=batch_size)
    idx = np.arange(len(labels))
    held = idx % holdout == holdout - 1 if holdout and len(labels) >= 2 * holdout else np.zeros(len(labels), bool)
    if kind == "contrastive":  # hold out whole prompts: both continuations of a prompt on the same side
        first: dict[str, int] = {}
        for t in ds.texts:
            first.setdefault(t, len(first))
        held = np.array([holdout > 0 and first[t] % holdout == holdout - 1 for t in ds.texts]) \
            if holdout and len(first) >= 2 * holdout else np.zeros(len(labels), bool)
    fit = ~held
    y = torch.tensor(labels)
    yf = y[torch.tensor(fit)]
    if not ((yf == 1).any() and (yf == 0).any()):
        raise DirectionError(f"{data}: the fitted rows need both labels")
    out = {}
    for layer in layers:
        X, norm = pooled[layer]
        Xf = X[torch.tensor(fit)]
        vec = Xf[yf == 1].mean(0) - Xf[yf == 0].mean(0) if kind in ("contrastive", "diffmean") else _probe(Xf, yf)
        auroc = gap = None
        if held.any():
            Xh, yh = X[torch.tensor(held)], labels[held]
            proj = (Xh @ (vec / vec.norm())).numpy()
            if (yh == 1).any() and (yh == 0).any():
                auroc = _auroc(proj, yh)
                gap = float((proj[yh == 1].mean() - proj[yh == 0].mean()) / norm)
        record = DirectionRecord(
            kind=kind, layer=layer, data=str(data), data_sha256=ds.sha256, n_positive=int((yf == 1).sum()),
            n_negative=int((yf == 0).sum()), pool="continuation mean" if kind == "contrastive" else pool,
            residual_norm=round(norm, 4), direction_norm=round(float(vec.norm()), 4),
            heldout_auroc=None if auroc is None else round(auroc, 4),
            heldout_gap=None if gap is None else round(gap, 4),
            n_heldout=int(held.sum()), model=model_name, date=_dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d"),
        )
        out[layer] = Direction(vec.float(), record)
    return out


def _probe(X: Tensor, y: Tensor) -> Tensor:
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError as exc:
        raise ImportError("probe directions need scikit-learn: pip install 'sae-guardrails[calibrate]'") from exc
    mu, sd = X.mean(0), X.std(0).clamp_min(1e-6)
    clf = LogisticRegression(C=1.0, max_iter=2000, class_weight="balanced").fit(((X - mu) / sd).numpy(), y.numpy())
    return torch.tensor(clf.coef_[0], dtype=torch.float32) / sd  # the weight on raw residuals


def _auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def save_direction(direction: Direction, path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``path`` (``.safetensors``; suffix added when missing) and the JSON record beside it."""
    from safetensors.torch import save_file

    p = Path(path)
    if p.suffix != ".safetensors":
        p = p.with_name(p.name + ".safetensors")
    p.parent.mkdir(parents=True, exist_ok=True)
    rec = direction.record
    save_file({"direction": direction.vector.contiguous().float()}, str(p),
              metadata={"layer": str(rec.layer), "kind": rec.kind, "residual_norm": str(rec.residual_norm)})
    j = p.with_suffix(".json")
    j.write_text(json.dumps(asdict(rec), indent=2) + "\n")
    return p, j


def load_record(path: str | os.PathLike[str]) -> DirectionRecord:
    """The JSON record saved beside a direction file."""
    j = Path(path).with_suffix(".json")
    if not j.is_file():
        raise DirectionError(f"no record {str(j)!r} beside the direction {str(path)!r}")
    return DirectionRecord(**json.loads(j.read_text()))


__all__ = ["KINDS", "Direction", "DirectionError", "DirectionRecord", "build_direction", "build_directions",
           "load_record", "pooled_residuals", "save_direction"]
