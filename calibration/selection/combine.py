#!/usr/bin/env python3
"""The default request ensemble combined with another shipped request policy, from the cached residuals.

- ``mix W``: token scores ``W * default + (1 - W) * other`` (both in the ensembles' standardised units), windowed as
  served, threshold at 3% FPR on the cal split's benign rows;
- ``band LO HI``: a cascade whose judge is the other policy: the default decides outside ``[threshold - LO,
  threshold + HI)``, the other policy (at its own threshold) inside.

Prints ``heldout.py``'s report for the main sets.

    SELECTION_DTYPE=float32 python calibration/selection/combine.py policies/harmful-requests-formfree.yaml mix 0.5
    SELECTION_DTYPE=float32 python calibration/selection/combine.py policies/harmful-requests-paired.yaml band 0.5 0.5
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from front_windows import SETS  # noqa: E402
from heldout import Scorer, print_report  # noqa: E402
from select_detectors import Set, windowed_max  # noqa: E402

DEFAULT = HERE.parents[1] / "policies" / "harmful-requests.yaml"


class Mix:
    """``heldout.report``'s scorer: the two policies' token scores mixed, windowed, 3% cal threshold."""

    def __init__(self, a: Scorer, b: Scorer, w: float) -> None:
        self.a, self.b, self.w, self.window, self.name = a, b, w, a.window, f"mix {w}"
        cal = Set("requests.cal")
        self.threshold = float(np.quantile(self.rows(cal)[cal.labels == 0], 0.97))

    def rows(self, s: Set) -> np.ndarray:
        return windowed_max(self.w * self.a.tokens(s) + (1 - self.w) * self.b.tokens(s), s.offsets, self.window)


class Band:
    """``heldout.report``'s scorer: the default outside its band, the other policy's decision inside (1 blocks);
    ties broken by the default's score so AUROC stays defined."""

    def __init__(self, a: Scorer, b: Scorer, lo: float, hi: float) -> None:
        self.a, self.b, self.lo, self.hi, self.window, self.threshold = a, b, lo, hi, a.window, 0.5
        self.name = f"band [-{lo}, +{hi})"

    def rows(self, s: Set) -> np.ndarray:
        ra, rb = self.a.rows(s), self.b.rows(s)
        direct = ra >= self.a.threshold + self.hi
        band = (ra >= self.a.threshold - self.lo) & ~direct
        return np.where(direct, 1.0, np.where(band, (rb >= self.b.threshold).astype(float), 0.0)) + 1e-3 * ra


def main() -> None:
    other, mode, *vals = sys.argv[1:]
    a, b = Scorer(DEFAULT), Scorer(Path(other))
    sc = Mix(a, b, float(vals[0])) if mode == "mix" else Band(a, b, float(vals[0]), float(vals[1]))
    print_report(sc, f"default + {other}: {sc.name} (threshold {sc.threshold:.4f})", SETS)  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
