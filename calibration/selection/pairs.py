#!/usr/bin/env python3
"""Do topic-matched training pairs teach the request probe harm rather than topic and form?

v0.3.6 adds ``calibration/handwritten/train_pairs_*.tsv`` to the train split (sources ``handwritten_pairs_harmful``
and ``handwritten_pairs_contrast``): per harmful request a benign twin with its topic, alarming words and sentence
form, every form on both sides (AdvBench's "Write a tutorial on ..." frames included), written without reading the
held-out hand-written sets. This fits the shipped probe recipe (max of rolling means, layers 18 + 27, window 16,
L2 1e-3, the selection row weights) on

- ``without``: the train split without the pairs (v0.3.5's data: the shipped probe's rows);
- ``with``: the train split with them;
- ``harm`` / ``twins``: only the pairs' harmful rows / only their benign twins added (which side does the work);
- ``with+frame2``: the pairs and formfree's erasure (the two within-label AdvBench-frame directions projected out);

each alone and in the shipped 3:1 ensemble with ``--ensemble-sae``'s rule, thresholded at 3% FPR on the cal split's
benign rows, and prints ``heldout.report``'s rows (every family it reports is held out of every variant).

    SELECTION_DTYPE=float32 python calibration/selection/pairs.py --ensemble-sae policies/harmful-requests-sae.yaml \
        [--variants without,with,harm,twins,with+frame2] [--steps 40]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))  # build_data.py (the pair files' reader)
from heldout import Scorer, report  # noqa: E402
from maxwin import Pool  # noqa: E402
from more_sources import Probe, fit_variant  # noqa: E402
from select_detectors import Set  # noqa: E402
from style_erasure import Ensemble, Mix, directions, print_report  # noqa: E402

LAYERS = [18, 27]
WINDOW, WD = 16, 1e-3
PAIRS = ("handwritten_pairs_harmful", "handwritten_pairs_contrast")
VARIANTS = ("without", "with", "harm", "twins", "with+frame2", "half", "no-history")
# "no-history": the pairs whose benign twin asks about the past ("How did ...", "Back in the 1990s ...", "... during
# ...") left out, both rows: a diagnostic of why the tense rephrasings lose (measured, never a candidate to ship)
HISTORY = re.compile(r"\b(did|was|were|used to|back in|in the (19|18|20)\d0s|during|historically|history)\b", re.I)


def keep_mask(pool: Pool, variant: str) -> np.ndarray:
    src = np.array(pool.sources)
    if variant in ("with", "with+frame2", "half"):
        return np.ones(len(src), bool)
    if variant == "no-history":  # the pairs as written (the split files are sorted): each harmful row, then its twin
        from build_data import HANDWRITTEN_DIR, read_tsv, tidy

        drop = set()
        for f in sorted(HANDWRITTEN_DIR.glob("train_pairs_*.tsv")):
            texts = [tidy(text) for _cat, _kind, text in read_tsv(f, 3)]
            for harm, twin in zip(texts[::2], texts[1::2], strict=True):
                if HISTORY.search(twin):
                    drop |= {harm, twin}
        return np.array([str(r["text"]) not in drop for r in pool.rows])
    drop = {"without": PAIRS, "harm": PAIRS[1:], "twins": PAIRS[:1]}[variant]
    return ~np.isin(src, drop)


def fit_pairs_variant(pool: Pool, train: Set, variant: str, steps: int) -> Probe:
    keep = keep_mask(pool, variant)
    src = np.array(pool.sources)[keep]
    basis = None
    if variant.endswith("+frame2"):
        frame2 = directions(train, "frame2")  # over the whole train split (the pairs' frame rows included)
        basis = [frame2[layer] for layer in LAYERS]
    scale = np.where(np.isin(src, PAIRS), 0.5, 1.0) if variant == "half" else None  # pair rows at half weight
    return fit_variant(pool, keep, variant, basis=basis, steps=steps, scale=scale)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default="without,with")
    ap.add_argument("--steps", type=int, default=40, help="L-BFGS iterations of each fit (the shipped fits: 40)")
    ap.add_argument("--ensemble-sae", default="", help="also score each probe in the 3:1 ensemble with this "
                    "SAE-feature policy's rule (the shipped default's second member: "
                    "policies/harmful-requests-sae.yaml)")
    ap.add_argument("--mix", default="", help="also score the ensemble of the variants' probes and the SAE rule "
                    "with these weights, one per variant then the SAE rule's (e.g. 1.5,1.5,1 for two variants)")
    ap.add_argument("--json", default="", help="write every variant's full report here")
    args = ap.parse_args()
    for v in args.variants.split(","):
        if v not in VARIANTS:
            ap.error(f"--variants: unknown {v!r} (valid: {', '.join(VARIANTS)})")
    if args.mix and (not args.ensemble_sae or len(args.mix.split(",")) != len(args.variants.split(",")) + 1):
        ap.error("--mix: needs --ensemble-sae and one weight per variant, then the SAE rule's "
                 f"({len(args.variants.split(',')) + 1} numbers for --variants {args.variants})")
    torch.set_num_threads(2)
    pool = Pool(["requests.train", "wrapped.train"], LAYERS)
    train = Set("requests.train")
    n_pairs = int(np.isin(np.array(pool.sources), PAIRS).sum())
    if not n_pairs:
        sys.exit("pairs.py: the train split holds no pair rows; rebuild it (python calibration/build_data.py) "
                 "and collect (calibration/selection/collect.py)")
    print(f"train pool: {len(pool.y)} rows, {n_pairs} of them pair rows", flush=True)
    results = {}
    probes: list[Probe] = []
    variants = args.variants.split(",")
    for v in [*variants, "mix"] if args.mix else variants:
        scorers: list[Probe | Ensemble | Mix] = []
        if v == "mix":
            mw = [float(t) for t in args.mix.split(",")]
            scorers.append(Mix([*probes, Scorer(Path(args.ensemble_sae))], mw, "mix " + args.mix))
        else:
            probe = fit_pairs_variant(pool, train, v, args.steps)
            probes.append(probe)
            scorers.append(probe)
            if args.ensemble_sae:
                scorers.append(Ensemble(probe, Scorer(Path(args.ensemble_sae)), (3.0, 1.0), f"{v}+sae"))
        for sc in scorers:
            rep = report(sc)  # type: ignore[arg-type]
            results[sc.name] = rep
            print_report(sc.name, sc.threshold, rep)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
