#!/usr/bin/env python3
"""Cache hand-written training rows outside the data splits as a selection set, for a fit that adds them
(``FIT_SETS=requests.train.nopairs,wrapped.train,<name> fit_shipped.py ...``).

The TSV's columns are ``kind<TAB>category<TAB>form<TAB>text`` (``kind``: ``harmful``, label 1, or ``contrast``, label 0;
``#`` lines are comments). Rows that repeat a data split's text or a reserved evaluation set's are refused. The rows'
surface form (``form``, as ``build_data.py`` assigns it) feeds the fit's row weights; the TSV's own form is kept as
``written_form``.

    SELECTION_DTYPE=float32 python calibration/selection/extra_rows.py \
        calibration/handwritten/experiments/train_tense.tsv tense.train [--kinds harmful]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "calibration"))
sys.path.insert(0, str(ROOT / "calibration" / "selection"))
sys.path.insert(0, str(ROOT))

from build_data import form_of, norm  # noqa: E402
from collect import cache_rows, read  # noqa: E402

DATA = ROOT / "calibration" / "data"


def taken_texts() -> set[str]:
    """Every text of the data splits and of the reserved evaluation sets (where built), normalised."""
    files = [DATA / f"harmful_requests.{s}.jsonl" for s in ("train", "cal", "test")]
    files += sorted((DATA / "reserved_eval").glob("*.jsonl"))
    return {norm(r["text"]) for f in files for r in read(f)}


def read_rows(path: Path, kinds: set[str]) -> list[dict[str, object]]:
    taken = taken_texts()
    rows: list[dict[str, object]] = []
    for n, ln in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not ln.strip() or ln.startswith("#"):
            continue
        parts = ln.split("\t")
        if len(parts) != 4 or parts[0] not in ("harmful", "contrast"):
            raise SystemExit(f"{path}:{n}: expected kind<TAB>category<TAB>form<TAB>text, kind harmful|contrast")
        kind, category, form, text = parts
        if norm(text) in taken:
            raise SystemExit(f"{path}:{n}: the text is already in a data split or a reserved set")
        if kind in kinds:
            rows.append({"text": text, "label": int(kind == "harmful"), "source": f"handwritten_extra_{kind}",
                         "form": form_of(text), "category": category if kind == "harmful" else "-",
                         "written_form": form})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tsv", type=Path)
    ap.add_argument("name", help="the selection set to write (e.g. tense.train)")
    ap.add_argument("--kinds", default="harmful,contrast", help="row kinds to keep (default: both)")
    ap.add_argument("--layers", default="15,18,27", help="layers to cache (the SAE's 15 and the probe's 18, 27)")
    args = ap.parse_args()
    rows = read_rows(args.tsv, set(args.kinds.split(",")))
    print(f"{len(rows)} rows ({sum(int(r['label']) for r in rows)} harmful)")
    print(cache_rows(args.name, rows, layers=tuple(int(x) for x in args.layers.split(","))))


if __name__ == "__main__":
    main()
