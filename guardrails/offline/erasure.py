"""Probes that cannot read a nuisance attribute: concept erasure of a labeled column before the fit.

A probe trained where an attribute that is not harm (a request's sentence form, its language, the source it
came from) goes with the label learns the attribute: the shipped request probe learned AdvBench's imperative
frames and blocked half of the plain benign requests written in them (README, Detection). When the rows say
the attribute (a column: ``form``, ``language``, ``source``...), the directions along which its groups' mean
residuals differ **with the label held fixed** are differences of that attribute, not of harm. Fitting on
residuals projected off them gives a probe with no component along them; the projection ``P = I - U U^T`` is
symmetric, so ``w . (P h) = (P w) . h`` and the served probe is an ordinary one with weights ``P w``
(:func:`fold`). This erases the attribute's mean differences (the first moment, as LEACE does for a linear
classifier); what the attribute changes beyond them stays readable.

``guardrails calibrate --fit-weights --invariant-to COLUMN`` uses it; ``calibration/selection/erasure.py`` builds
``harmful-requests-formfree`` with it (the groups: rows opening with one of AdvBench's frame verbs or not).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from guardrails.offline.labeled import CalibrationError

if TYPE_CHECKING:
    import torch

    from guardrails.offline.labeled import LabeledData

MIN_ROWS = 5
"""Rows a group needs within a label to give a direction (fewer: too noisy a mean)."""


def invariance_basis(pooled: np.ndarray, groups: Sequence[str] | np.ndarray, labels: np.ndarray, *,
                     min_rows: int = MIN_ROWS) -> np.ndarray:
    """An orthonormal basis ``[d, k]`` of the directions along which ``groups`` move the rows' pooled residuals
    within each label: per label, every group with at least ``min_rows`` rows of it gives ``mean(its rows) -
    mean(those groups' rows)`` (k <= the number of such groups minus one, summed over the labels). Raises
    ValueError when no label has two such groups."""
    x = np.asarray(pooled, np.float64)
    g = np.asarray([str(v) for v in groups])
    y = np.asarray(labels)
    if len(g) != len(x) or len(y) != len(x):
        raise ValueError(f"invariance_basis: {len(x)} rows, {len(g)} group values, {len(y)} labels")
    vecs = []
    for lab in sorted(set(y.tolist())):
        in_lab = y == lab
        kept = [v for v in sorted(set(g[in_lab].tolist())) if int((in_lab & (g == v)).sum()) >= min_rows]
        if len(kept) < 2:
            continue
        mask = in_lab & np.isin(g, kept)
        centre = x[mask].mean(0)
        vecs += [x[in_lab & (g == v)].mean(0) - centre for v in kept]
    if not vecs:
        raise ValueError(f"no label has two groups of at least {min_rows} rows")
    u, s, _ = np.linalg.svd(np.stack(vecs, 1), full_matrices=False)
    return u[:, s > 1e-6 * s[0]].astype(np.float32)


def project(x: np.ndarray, basis: np.ndarray, *, chunk: int = 65536) -> np.ndarray:
    """``x`` ``[n, d]`` with its components along ``basis`` removed, in place (float arrays), chunked."""
    u = basis.astype(x.dtype, copy=False)
    for a in range(0, len(x), chunk):
        part = x[a : a + chunk]
        part -= (part @ u) @ u.T
    return x


def fold(weight: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """Weights fitted on projected residuals as weights on raw ones (``P w``: no component along ``basis``)."""
    w = np.asarray(weight, np.float32)
    u = basis.astype(np.float32, copy=False)
    return w - u @ (u.T @ w)


def column_values(data: LabeledData, column: str) -> list[str]:
    """A labeled file's column per row (``source``, ``category`` or any other scalar column), '-' where absent."""
    if column == "source":
        values: list[str] | None = [s or "-" for s in data.sources]
    elif column == "category":
        values = data.categories
    else:
        values = data.fields.get(column)
    if values is None or all(v in ("", "-") for v in values):
        have = ["source"] * any(data.sources) + ["category"] * (data.categories is not None) + sorted(data.fields)
        raise CalibrationError(f"--invariant-to {column!r}: {data.path} has no such column (columns: "
                               f"{', '.join(have) or 'none besides text and label'})")
    return values


def column_basis(data: LabeledData, columns: Sequence[str], pooled: np.ndarray) -> np.ndarray:
    """The directions of every column in ``columns`` (:func:`invariance_basis` over the rows that have a value),
    orthonormalised together."""
    parts = []
    for column in columns:
        values = np.asarray(column_values(data, column))
        has = ~np.isin(values, ["", "-"])
        try:
            parts.append(invariance_basis(pooled[has], values[has], np.asarray(data.labels)[has]))
        except ValueError as e:
            raise CalibrationError(f"--invariant-to {column!r}: {e} in {data.path} (its groups need >= {MIN_ROWS} "
                                   "rows each, two of them within one label)") from None
    u, s, _ = np.linalg.svd(np.concatenate(parts, 1), full_matrices=False)
    return u[:, s > 1e-6 * s[0]].astype(np.float32)


def project_rows(rows: Sequence[torch.Tensor], basis: np.ndarray) -> list[torch.Tensor]:
    """Per-row residuals ``[tokens, d]`` with their components along ``basis`` removed (float32 copies)."""
    import torch

    u = torch.from_numpy(np.ascontiguousarray(basis, np.float32))
    out = []
    for r in rows:
        x = r.float().cpu()
        out.append(x - (x @ u) @ u.T)
    return out
