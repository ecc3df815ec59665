#!/usr/bin/env python3
"""Cache hand-written training rows outside the data splits as a selection set, for a fit that adds them
(``FIT_SETS=requests.train.nopairs,wrapped.train,<name> fit_shipped.py ...``).

The TSV's columns are ``kind<TAB>category<TAB>form<TAB>text`` (``kind``: ``harmful``, label 1, or ``contrast``, label 0;
``#`` lines are comments). Rows that repeat a data split's text or a reserved evaluation set's are refused. The rows'
surface form (``form``, as ``build_data.py`` assigns it) feeds the fit's row weights; the TSV's own form is kept as
``written_form``.

    SELECTION_DTYPE=float32 python calibration/selection/extra_rows.py \
        calibration/handwritten/experiments/train_tense.tsv tense.train [--kinds harmful] [--drop-near-eval]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "calibration"))
sys.path.insert(0, str(ROOT / "calibration" / "selection"))
sys.path.insert(0, str(ROOT))

from build_data import form_of, near_word_sets, norm, word_set  # noqa: E402
from collect import cache_rows, read  # noqa: E402

DATA = ROOT / "calibration" / "data"


def taken_texts() -> set[str]:
    """Every text of the data splits and of the reserved evaluation sets (where built), normalised."""
    files = [DATA / f"harmful_requests.{s}.jsonl" for s in ("train", "cal", "test")]
    files += sorted((DATA / "reserved_eval").glob("*.jsonl"))
    return {norm(r["text"]) for f in files for r in read(f)}


def eval_word_sets() -> list[frozenset[str]]:
    """The word sets of every evaluation-side request text: the test split, the over-refusal set, the form pairs, the
    wrapped test split and the reserved sets (where built)."""
    files = [DATA / "harmful_requests.test.jsonl", DATA / "over_refusal.jsonl", DATA / "form_pairs.jsonl",
             DATA / "jailbreak_wrapped.test.jsonl", *sorted((DATA / "reserved_eval").glob("*.jsonl"))]
    return [w for f in files if f.is_file() for r in read(f) if (w := word_set(str(r["text"])))]


def read_rows(path: Path, kinds: set[str], drop_near: bool = False) -> list[dict[str, object]]:
    """The TSV's rows of ``kinds``; ``drop_near``: leave out each pair (a harmful row and the contrast twin after it)
    of which either row shares half its words with an evaluation row (``build_data.NEAR_DUPLICATE``)."""
    taken = taken_texts()
    rows: list[dict[str, object]] = []
    lines = [(n, ln) for n, ln in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             if ln.strip() and not ln.startswith("#")]
    near: set[int] = set()
    if drop_near:
        hits = near_word_sets([[word_set(ln.split("\t")[-1])] for _, ln in lines], eval_word_sets())
        pair = [0] * len(lines)  # each contrast row belongs to the harmful row before it
        for i, (_, ln) in enumerate(lines):
            pair[i] = i if ln.startswith("harmful") or i == 0 else pair[i - 1]
        near = {i for i in range(len(lines)) if pair[i] in {pair[h] for h in hits}}
        print(f"left out {len(near)} rows: {len(hits)} share half their words with an evaluation row, with twins")
    for i, (n, ln) in enumerate(lines):
        if i in near:
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
    ap.add_argument("--drop-near-eval", action="store_true",
                    help="leave out pairs with a row sharing half its words with an evaluation row (v0.3.16)")
    args = ap.parse_args()
    rows = read_rows(args.tsv, set(args.kinds.split(",")), drop_near=args.drop_near_eval)
    print(f"{len(rows)} rows ({sum(int(r['label']) for r in rows)} harmful)")
    print(cache_rows(args.name, rows, layers=tuple(int(x) for x in args.layers.split(","))))


if __name__ == "__main__":
    main()
