#!/usr/bin/env python3
"""Form-paired requests: the shipped request policies on them, and refits of the probe member with them, v0.3.2.

``calibration/handwritten/form_pairs_{a,b}.tsv`` (built into ``calibration/data/form_pairs.jsonl``, evaluation
only) hold 240 + 240 hand-written pairs: a harmful request and, right after it, a benign twin in the same sentence
frame, often with the same alarming words (set A: instructions, text artefacts, "describe", lists, code, context +
task; set B: questions, past, future, hypotheticals, fiction, third person), ten hazard categories each.

``--shipped`` (default on) scores the shipped policies at their own thresholds: ``variants.py``'s held-out columns, the
pairs per set and frame (AUROC harmful vs twins / harmful blocked / twins blocked), and recall at equal held-out benign
blocks (``matched_line``). Then, per training variant (``none``, ``a``, ``b``, ``ab``: which pairs join the train
split), the shipped probe's recipe (``maxwin`` at the layers ``harmful-requests-probe.yaml`` reads, window 16, wd 1e-3,
the selection weights, the pairs' scaled by ``--pair-weight``) is refitted and scored alone and in the 3:1 ensemble with
the shipped SAE rule (members standardised on the cal split's benign rows, as ``fit_ensemble.py`` does), each at its own
3% cal FPR point. A pairs set trained on is in-sample; the other is a held-out frame family. ``--cal-third`` trains on
two thirds of the pairs and adds the other third's twins to the cal benign rows that set the threshold. Output of the
v0.3.2 runs: ``calibration/selection/form_pairs_v032.log`` (run while the shipped probe read layers 12 + 18, commit
7dc15a9; the caches need the probe's layers: ``collect.py --layers=...``).

    SELECTION_DTYPE=float32 python calibration/selection/form_pairs.py [--variants none,a,b,ab] [--pair-weight W]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
from heldout import BLIND, HELD_OUT_HARMFUL, PROBE_POLICY, SHORT_FORMS, Scorer, cache_layers, probe_layers  # noqa: E402
from select_detectors import Set, auroc, windowed_max  # noqa: E402
from variants import Bench  # noqa: E402

PAIRS = {"a": "form_pairs_a.tsv", "b": "form_pairs_b.tsv"}


def cache_pairs(key: str, part: str = "") -> str:
    """One pairs file's rows of ``calibration/data/form_pairs.jsonl`` (``pair_set`` a or b) as the cached set
    ``hw.pairs_<key>`` (residuals at 12, 15, 18), each file and label its own source for the selection weights;
    ``part`` "fit" or "cal": only the pairs whose index is not / is 2 mod 3 (a third of the pairs, both rows, set
    aside for the threshold), cached as ``hw.pairs_<key>.<part>``."""
    import collect

    rows = [dict(r, source=f"handwritten_pairs_{key}_{'harmful' if r['label'] else 'contrast'}")
            for r in collect.read(collect.DATA / "form_pairs.jsonl") if r["pair_set"] == key]
    if part:
        rows = [r for r in rows if (r["pair"] % 3 == 2) == (part == "cal")]
    return collect.cache_rows(f"hw.pairs_{key}" + (f".{part}" if part else ""), rows, layers=cache_layers())


def fit_probe(extras: list[str], out: Path, pair_weight: float = 1.0) -> Path:
    """The shipped probe's recipe on the train split plus ``extras``; the pairs' rows weighted ``pair_weight`` x
    their selection weight (before the equal-label-mass step)."""
    import maxwin

    from guardrails.offline.baselines import save_linear

    layers = probe_layers()
    pool = maxwin.Pool(["requests.train", "wrapped.train", *extras], layers)
    w = maxwin.row_weights(pool, 1.0)
    pairs = np.array([s.startswith("handwritten_pairs_") for s in pool.sources])
    if pairs.any() and pair_weight != 1.0:
        w[pairs] *= pair_weight
        for y in (0, 1):  # equal total weight per label again
            w[pool.y == y] *= len(w) / 2 / w[pool.y == y].sum()
    coef, bias = maxwin.fit(pool.x, pool.offsets, pool.y, w, window=16, wd=1e-3, steps=40)
    deep, extra = maxwin.split_layers(coef, layers)
    name = ("+".join(e.removeprefix("hw.") for e in extras) or "train") + f"_w{pair_weight:g}"
    return save_linear(out / f"probe_{name}.safetensors", deep, bias, extra=extra)


Stats = list[tuple[float, float]]


def member_stats(b: Bench, members: list[Scorer]) -> Stats:
    """Each member's served row score mean and std on the cal split's benign rows (``fit_ensemble.py``)."""
    cal = b.sets["requests.cal"]
    return [(float(r.mean()), float(r.std())) for r in (m.rows(cal)[cal.labels == 0] for m in members)]


def standardised(sets: dict[str, Set], members: list[Scorer], stats: Stats) -> dict[str, list[np.ndarray]]:
    """Per set, each member's token scores in units of its cal benign rows' standard deviation."""
    return {n: [(m.tokens(s) - mu) / sd for m, (mu, sd) in zip(members, stats, strict=True)] for n, s in sets.items()}


def combined(sets: dict[str, Set], z: dict[str, list[np.ndarray]], weights: tuple[float, ...]) -> dict[str, np.ndarray]:
    """Row scores of the weighted mean of standardised token scores (window 16), per set."""
    return {n: windowed_max(np.asarray(sum(w * t for w, t in zip(weights, z[n], strict=True)), np.float32)
                            / sum(weights), s.offsets, 16) for n, s in sets.items()}


def ensemble_rows(sets: dict[str, Set], members: list[Scorer], stats: Stats,
                  weights: tuple[float, ...] = (3.0, 1.0)) -> dict[str, np.ndarray]:
    """Row scores of the weighted ensemble of ``members`` (the shipped 3:1 probe : SAE rule by default)."""
    return combined(sets, standardised(sets, members, stats), weights)


def pairs_line(sets: dict[str, Set], rows: dict[str, np.ndarray], thr: float, by_form: bool = False) -> str:
    """AUROC (harmful vs twins) / harmful blocked / twins blocked on each pairs set, optionally per form."""
    out = []
    for n in sorted(k for k in sets if k.startswith("hw.pairs_")):
        r, y = rows[n], sets[n].labels
        out.append(f"{n.removeprefix('hw.')} {auroc(r[y == 1], r[y == 0]):.3f}/{(r[y == 1] >= thr).mean():.2f}/"
                   f"{(r[y == 0] >= thr).mean():.2f}")
        if by_form:
            form = np.array([row["phrasing"] for row in sets[n].rows])
            for f in dict.fromkeys(form):
                m = form == f
                out.append(f"  {f} {auroc(r[m & (y == 1)], r[m & (y == 0)]):.2f}/{(r[m & (y == 1)] >= thr).mean():.2f}/"
                           f"{(r[m & (y == 0)] >= thr).mean():.2f}")
    return "   pairs (AUROC/harmful/twins blocked): " + " | ".join(out)


def matched_line(b: Bench, rows: dict[str, np.ndarray]) -> str:
    """Recall at the thresholds where the pooled held-out benign rows (over-refusal set + held-out benign sources)
    are blocked 2 / 3 / 5%: a comparison of rankings at equal false positives (these thresholds are read off
    held-out rows, so they only compare variants; nothing is shipped at them)."""
    te, wr = b.sets["requests.test"], b.sets["wrapped.test"]
    src, lab, sc = np.array(te.sources), te.labels, rows["requests.test"]
    ben = np.r_[sc[(lab == 0) & ~np.isin(src, BLIND) & ~np.isin(src, SHORT_FORMS)], rows["over_refusal"]]
    four = sc[np.isin(src, HELD_OUT_HARMFUL) & (lab == 1)]
    past = rows["reserved_past"][b.sets["reserved_past"].labels == 1]
    fut = rows["reserved_future"][b.sets["reserved_future"].labels == 1]
    walled = np.array([str(r["template"]).startswith("walledeval") for r in wr.rows])
    wb = rows["wrapped.test"][walled & (wr.labels == 0)]
    out = []
    for fpr in (0.02, 0.03, 0.05):
        t = float(np.quantile(ben, 1 - fpr))
        out.append(f"@{fpr:.0%}: four {(four >= t).mean():.3f} past {(past >= t).mean():.2f} fut "
                   f"{(fut >= t).mean():.2f} blind {(sc[src == BLIND[0]] >= t).mean():.2f}/"
                   f"{(sc[src == BLIND[1]] >= t).mean():.2f} walled benign {(wb >= t).mean():.2f}")
    return "   at equal held-out benign blocks: " + " | ".join(out)


def pairs_only(b: Bench, sets: dict[str, Set], out: Path) -> None:
    """A probe fitted on pairs alone (unweighted; no train-split row), alone and as a third ensemble member."""
    import maxwin

    from guardrails.offline.baselines import save_linear

    layers, cal = probe_layers(), b.sets["requests.cal"]
    for keys in ("a", "b", "ab"):
        pool = maxwin.Pool([cache_pairs(k) for k in keys], layers)
        for wd in (1e-3, 1e-2):
            coef, bias = maxwin.fit(pool.x, pool.offsets, pool.y, np.ones(len(pool.y)), window=16, wd=wd, steps=40)
            deep, extra = maxwin.split_layers(coef, layers)
            path = save_linear(out / f"only_{keys}_{wd:g}.safetensors", deep, bias, extra=extra)
            members = [Scorer(ROOT / "policies" / f"{n}.yaml") for n in ("harmful-requests-probe",
                                                                         "harmful-requests-sae")]
            members.append(Scorer(PROBE_POLICY, str(path)))
            z = standardised(sets, members, member_stats(b, members))
            for wts in ((0, 0, 1), (3, 1, 1), (3, 1, 2)):
                rows = combined(sets, z, wts)
                thr = float(np.quantile(rows["requests.cal"][cal.labels == 0], 0.97))
                label = f"pairs-only probe ({keys}, wd {wd:g}), weights probe:SAE:pairs-only {wts}"
                print(b.line(label, lambda n, rows=rows: rows[n], thr), flush=True)
                print(pairs_line(sets, rows, thr) + "  (a set trained on is in-sample)", flush=True)
                print(matched_line(b, rows), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default="none,a,b,ab", help="comma list of none, a, b, ab")
    ap.add_argument("--pair-weight", type=float, default=1.0, help="multiplier of the pairs' selection weights")
    ap.add_argument("--shipped", action=argparse.BooleanOptionalAction, default=True,
                    help="score the shipped policies first (held-out columns and the pairs by form)")
    ap.add_argument("--cal-third", action="store_true",
                    help="train on two thirds of the pairs; the other third's benign rows join the cal benign rows "
                         "for the 3%% threshold, and that third is reported")
    ap.add_argument("--sae", nargs="*", default=[],
                    help="instead of the variants: SAE-rule policies (e.g. refitted with FIT_SETS=requests.train,"
                         "wrapped.train,hw.pairs_a fit_shipped.py --only sae ... --sae-out F), alone and in the 3:1 "
                         "ensemble with the shipped probe")
    ap.add_argument("--pairs-only", action="store_true",
                    help="instead of the variants: probes fitted on the pairs alone, alone and as a third member")
    ap.add_argument("--out", default="/tmp/form_pairs", help="where the refitted probe files go")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    b = Bench()
    sets = dict(b.sets) | {n: Set(n) for n in (cache_pairs("a"), cache_pairs("b"))}
    sae = Scorer(ROOT / "policies" / "harmful-requests-sae.yaml")
    if args.shipped:
        print("# shipped policies, each at its own threshold", flush=True)
        for name in ("harmful-requests", "harmful-requests-probe", "harmful-requests-sae"):
            sc = Scorer(ROOT / "policies" / f"{name}.yaml")
            rows = {n: sc.rows(s) for n, s in sets.items()}
            print(b.line(name, lambda n, rows=rows: rows[n], sc.threshold), flush=True)
            print(pairs_line(sets, rows, sc.threshold, by_form=True), flush=True)
            print(matched_line(b, rows), flush=True)
    if args.pairs_only:
        pairs_only(b, sets, out)
        return
    if args.sae:
        probe = Scorer(PROBE_POLICY)
        cal = b.sets["requests.cal"]
        for path in args.sae:
            rule = Scorer(Path(path))
            for label, rows in ((f"SAE rule {Path(path).name}", {n: rule.rows(s) for n, s in sets.items()}),
                                (f"3:1 ensemble, shipped probe + {Path(path).name}",
                                 ensemble_rows(sets, [probe, rule], member_stats(b, [probe, rule])))):
                thr = float(np.quantile(rows["requests.cal"][cal.labels == 0], 0.97))
                print(b.line(label, lambda n, rows=rows: rows[n], thr), flush=True)
                print(pairs_line(sets, rows, thr) + "  (a set trained on is in-sample)", flush=True)
                print(matched_line(b, rows), flush=True)
        return
    for v in args.variants.split(","):
        part = "fit" if args.cal_third else ""
        extras = [] if v == "none" else [cache_pairs(k, part) for k in v]
        probe = Scorer(PROBE_POLICY, str(fit_probe(extras, out, args.pair_weight)))
        label = "train" + "".join(f" + pairs {e.removeprefix('hw.pairs_')}" for e in extras) + (
            f" (x{args.pair_weight:g})" if extras and args.pair_weight != 1.0 else "")
        stats = member_stats(b, [probe, sae])
        ens = ensemble_rows(sets, [probe, sae], stats)
        cal = b.sets["requests.cal"]
        neg = ens["requests.cal"][cal.labels == 0]
        if not args.cal_third:
            print(b.line(f"probe, {label}", lambda n, p=probe: p.rows(b.sets[n])), flush=True)
            thr = float(np.quantile(neg, 0.97))
            print(b.line(f"3:1 ensemble, {label}", lambda n, e=ens: e[n], thr), flush=True)
            print(pairs_line(sets, ens, thr) + "  (a set trained on is in-sample)", flush=True)
            print(matched_line(b, ens), flush=True)
            continue
        held = {n: Set(n) for n in (cache_pairs(k, "cal") for k in "ab")}
        hs = ensemble_rows(held, [probe, sae], stats)
        thr = float(np.quantile(np.concatenate([neg, *[hs[n][s.labels == 0] for n, s in held.items()]]), 0.97))
        print(b.line(f"3:1 ensemble, {label}, thr cal+third", lambda n, e=ens: e[n], thr), flush=True)
        print(pairs_line(held, hs, thr).replace("pairs (", "set-aside third ("), flush=True)


if __name__ == "__main__":
    main()
