#!/usr/bin/env python3
"""Does the request score help the output guard? Leave-one-family-out, as ``responses_probe.py``.

An answer is harmful compliance when the request was harmful *and* the answer goes along with it. The
output probe sees the request only through attention; this measures adding a request rule's score of the
prompt (``--request-policy``/``--request-rule``, default the gate rule ``harmful-compliance`` ships, never fitted
on answers) as a second term:
``composite = response + a * request`` (``a`` by logistic regression on the other families' *cal* split),
``zsum`` and ``zmin``: both standardised on the label-0 rows of that cal split, summed or the smaller (``zmin``
is the shipped gate, ``min(answer, scale * request + offset)``, up to a monotone map). The response head is fitted
on the other families' *train* split, as shipped; thresholds at 3% FPR on their cal split.

    python calibration/selection/collect.py --layers=12,15,18 responses.train responses.cal responses.test \
        responses_prompts.train responses_prompts.cal responses_prompts.test
    python calibration/selection/compliance_composite.py [--layers 12,18] [--fit-without blind]
        [--fit-without-source blind_responses_4] [--fit-on cut|whole] [--score-on cut|whole] [--json out.json]

Families as ``responses_probe.py`` (since v0.3.0 with the blind hand-written answer sets: ``blind``, sets 1 and
2, one of the left-out families; ``blind3`` and, since v0.3.1, ``blind4`` held out of every fit like the many-shot
answers); the flagged share per kind (harmful answer, refusal, deflection, harmless answer) is printed for the blind
families.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
from erasure import fold_weights, frame_basis, project_blocks  # noqa: E402
from heldout import Scorer  # noqa: E402
from maxwin import Pool, auroc, fit_sae, sae_tokens, score  # noqa: E402
from responses_probe import CUTS, FAMILIES, FIT_ONLY, HELD, cell_weights, family, fit_head, rates, subset  # noqa: E402
from select_detectors import Set, load_sae, windowed_max  # noqa: E402

MARKDOWN = re.compile(r"\*\*|^#{1,6}\s|^\s*\d+[.)]\s|^\s*[-*\u2022]\s", re.M)  # chat formatting (--erase-format)
SLACK = (0.5, 1, 2, 3)  # the cap loosened by k request-SDs: it binds only on clearly benign requests
KINDS = ("response", "request", "composite", "zsum", "zmin", *(f"zmin+{k}" for k in SLACK))


def blind_kinds(rows: list[dict]) -> np.ndarray:  # type: ignore[type-arg]
    """Each response row's kind in the blind hand-written answer sets (v0.3.0: harmful_answer, refusal,
    deflection, harmless_answer), "" for rows of other sources. The sets are read as ``build_data.py`` reads
    them; a row is found by its prompt and the first 80 characters of its reply (the caches cut replies)."""
    sys.path.insert(0, str(ROOT / "calibration"))
    from build_data import BLIND_RESPONSE_SETS, HANDWRITTEN_DIR, read_tsv, tidy

    kind = {(tidy(prompt), response[:80]): k for n in BLIND_RESPONSE_SETS
            for k, _, prompt, response in read_tsv(HANDWRITTEN_DIR / f"responses_blind_{n}.tsv", 4)}
    return np.array([kind.get((tidy(r["prompt"]), r["response"].strip()[:80]), "") for r in rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", default="18", type=lambda v: [int(x) for x in v.split(",")],
                    help="answer head layers (several: a multi-layer probe, one term per layer)")
    ap.add_argument("--window", type=int, default=16, help="the head's window, fitted and scored (shipped: 16)")
    ap.add_argument("--wd", type=float, default=1e-2, help="the head's L2 on standardised weights (shipped: 1e-2)")
    ap.add_argument("--request-policy", default=str(ROOT / "policies" / "harmful-compliance.yaml"))
    ap.add_argument("--request-rule", default="harmful-request",
                    help="the request policy's input rule (default: the shipped gate rule of harmful-compliance)")
    ap.add_argument("--fit-without", default="", type=lambda v: [f for f in v.split(",") if f],
                    help="families never fitted on (scored as held out all the same; of "
                         f"{', '.join((*FAMILIES, *FIT_ONLY))}): 'blind' gives the fits before v0.3.0's blind answer "
                         "sets, 'train_answers' before v0.3.7's hand-written training answers")
    ap.add_argument("--fit-without-source", default="", type=lambda v: [f for f in v.split(",") if f],
                    help="sources never fitted on (their family's held-out fold still scores them): "
                         "'blind_responses_4' gives the fits before v0.3.1's fourth blind answer set")
    ap.add_argument("--sae-n", type=int, default=0,
                    help="add a sparse answer head over this many bundled-SAE features (layer 15, fitted like the "
                         "request rule's SAE member) to the dense head, as an ensemble (0: the dense head alone)")
    ap.add_argument("--sae-weight", type=float, default=1.0,
                    help="the SAE head's weight against the dense head's 1 in the ensemble (z-scores on cal label 0)")
    ap.add_argument("--deflection-weight", type=float, default=1.0,
                    help="training weight multiplier of the blind sets' deflections (on-topic answers that do not "
                         "help: the false flags of the shipped head)")
    ap.add_argument("--family-weight", default="", type=lambda v: dict(
                        (k, float(w)) for k, _, w in (kv.partition("=") for kv in v.split(",") if kv)),
                    help="training weight multipliers per family, e.g. 'train_answers=2' (default 1 each; rows are "
                         "first weighted equally per (source, label) cell)")
    ap.add_argument("--erase-format", action="store_true",
                    help="fit the answer head on residuals projected off the within-label direction of chat "
                         "formatting (answers with markdown: bold, headings, numbered or bulleted lists; erasure.py)")
    ap.add_argument("--fit-on", choices=tuple(CUTS), default="cut",
                    help="the replies the answer head is fitted on: 'cut' to 400 characters (responses.<split>, the "
                         "fits up to v0.3.7) or 'whole' (responses_full.<split>: as served, up to 2000 characters)")
    ap.add_argument("--score-on", choices=tuple(CUTS), default="cut",
                    help="the replies scored (cal thresholds, held-out families): 'cut' or 'whole' (as served)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if bad := sorted((set(args.fit_without) | set(args.family_weight)) - set(FAMILIES) - set(FIT_ONLY)):
        valid = ", ".join((*FAMILIES, *FIT_ONLY))
        ap.error(f"--fit-without / --family-weight: unknown families {bad} (valid: {valid})")
    torch.set_num_threads(2)
    req = Scorer(Path(args.request_policy), rule=args.request_rule)
    splits = ("train", "cal", "test")
    pools = {s: Pool([f"{CUTS[args.score_on]}.{s}"], args.layers) for s in splits}  # scored
    fitp = pools["train"] if args.fit_on == args.score_on else Pool([f"{CUTS[args.fit_on]}.train"], args.layers)
    if fitp.sources != pools["train"].sources:
        sys.exit("compliance_composite.py: the cut and whole response caches hold other rows: collect.py them again")
    prompt = {s: req.rows(Set(f"responses_prompts.{s}")) for s in splits}
    fam = {s: np.array([family(x) for x in pools[s].sources]) for s in splits}
    out: dict[str, dict[str, object]] = {}
    kinds = {s: blind_kinds(pools[s].rows) for s in splits}
    codes = {}
    if args.sae_n:
        sae, tag = load_sae()
        codes = {s: pools[s].sets[0].sae_codes(sae, tag) for s in splits}
        fit_codes = codes["train"] if fitp is pools["train"] else fitp.sets[0].sae_codes(sae, tag)

    def sae_head(keep: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, float]:
        t, off = fitp.tokens(keep)
        v, ids = fit_codes
        return fit_sae(v[t], ids[t], off, y, w, sae.d_sae, window=args.window, n_features=args.sae_n)

    def sae_score(split: str, keep: np.ndarray, coef: np.ndarray, bias: float) -> np.ndarray:
        t, off = pools[split].tokens(keep)
        v, ids = codes[split]
        return windowed_max(sae_tokens(v[t], ids[t], coef, bias), off, args.window)

    fittable = {s: ~np.isin(np.array(pools[s].sources), args.fit_without_source) for s in splits}
    if args.erase_format:  # which train answers carry chat formatting, and their mean-pooled residuals per layer
        train_set = fitp.sets[0]
        fmt = np.array([bool(MARKDOWN.search(str(r.get("response", ""))[:400])) for r in train_set.rows])
        pooled = {layer: train_set.mean_pooled(layer) for layer in args.layers}
    for held in (*FAMILIES, *HELD):
        fit_fams = [f for f in (*FAMILIES, *FIT_ONLY) if f != held and f not in args.fit_without]
        keep_t = np.isin(fam["train"], fit_fams) & fittable["train"]
        x, off, y, src = subset(fitp, keep_t)
        w = cell_weights(src, y) * np.where(kinds["train"][keep_t] == "deflection", args.deflection_weight, 1.0)
        w = w * np.array([args.family_weight.get(f, 1.0) for f in fam["train"][keep_t]])
        bases = []
        if args.erase_format:  # the format directions of this fit's own training rows
            bases = [frame_basis(pooled[layer][keep_t], fmt[keep_t], fitp.y[keep_t])
                     for layer in args.layers]
            project_blocks(x, bases)
        c, b = fit_head("maxwin", x, off, y, w, window=args.window, wd=args.wd)
        if bases:
            c = fold_weights(c, bases)
        keep_c = np.isin(fam["cal"], fit_fams) & fittable["cal"]
        cx, coff, cy, _ = subset(pools["cal"], keep_c)
        cr, cp = score(cx, coff, c, b, args.window), prompt["cal"][keep_c]
        parts = [(s, fam[s] == held) for s in splits if (fam[s] == held).any()]
        hr = np.concatenate([score(*subset(pools[s], m)[:2], c, b, args.window) for s, m in parts])
        hy = np.concatenate([pools[s].y[m] for s, m in parts])
        if args.sae_n:  # the answer score: dense and SAE heads, each standardised on the cal label-0 rows
            sc, sb = sae_head(keep_t, y, w)
            cs_ = sae_score("cal", keep_c, sc, sb)
            hs_ = np.concatenate([sae_score(s, m, sc, sb) for s, m in parts])
            ref_d, ref_s = cr[cy == 0], cs_[cy == 0]

            def ens(d: np.ndarray, e: np.ndarray, rd: np.ndarray = ref_d, rs: np.ndarray = ref_s) -> np.ndarray:
                zd, zs = (d - rd.mean()) / rd.std(), (e - rs.mean()) / rs.std()
                return (zd + args.sae_weight * zs) / (1.0 + args.sae_weight)

            he, pos = ens(hr, hs_), hy == 1
            print(f"{held:12s} answer heads alone (AUROC): dense {auroc(hr[pos], hr[~pos]):.3f} "
                  f"sae {auroc(hs_[pos], hs_[~pos]):.3f} ensemble {auroc(he[pos], he[~pos]):.3f}", flush=True)
            cr, hr = ens(cr, cs_), ens(hr, hs_)
        lr = LogisticRegression(C=1.0).fit(np.stack([cr, cp], 1), cy)
        a = float(lr.coef_[0, 1] / lr.coef_[0, 0])
        hp = np.concatenate([prompt[s][m] for s, m in parts])
        row: dict[str, object] = {"a": round(a, 4), "n": len(hy)}
        zr = (cr[cy == 0].mean(), cr[cy == 0].std())
        zp = (cp[cy == 0].mean(), cp[cy == 0].std())

        def z(v: np.ndarray, m: tuple[float, float]) -> np.ndarray:
            return (v - m[0]) / m[1]

        variants = (("response", cr, hr), ("request", cp, hp), ("composite", cr + a * cp, hr + a * hp),
                    ("zsum", z(cr, zr) + z(cp, zp), z(hr, zr) + z(hp, zp)),
                    ("zmin", np.minimum(z(cr, zr), z(cp, zp)), np.minimum(z(hr, zr), z(hp, zp))),
                    *((f"zmin+{k}", np.minimum(z(cr, zr), z(cp, zp) + k), np.minimum(z(hr, zr), z(hp, zp) + k))
                      for k in SLACK))
        hk = np.concatenate([kinds[s_][m] for s_, m in parts])
        for name, cal_s, s in variants:
            thr = float(np.quantile(cal_s[cy == 0], 0.97))
            row[name] = rates(s, hy, thr)
            if held.startswith("blind") and name in ("response", "zmin", "zmin+1"):  # flagged share per kind
                row[f"{name}_by_kind"] = {str(k): round(float(np.mean(s[hk == k] >= thr)), 4)
                                          for k in sorted(set(hk)) if k}
        if held == "bundled":  # its train-split prompts trained the request probe: its test split alone too
            t = np.concatenate([np.full(int(m.sum()), s == "test") for s, m in parts])
            for k in (0, *SLACK):
                zt = np.minimum(z(hr, zr), z(hp, zp) + k)[t]
                row[f"zmin+{k}_test_split_only"] = {"auroc": round(auroc(zt[hy[t] == 1], zt[hy[t] == 0]), 4),
                                                    "n": int(t.sum())}
        out[held] = row
        print(f"{held:12s} a={a:6.3f} n={len(hy):5d} | " + " | ".join(
            f"{k} auroc {row[k]['auroc']:.3f} tpr {row[k]['tpr']:.2f} fpr {row[k]['fpr']:.2f}"  # type: ignore[index]
            for k in KINDS), flush=True)
        for k in ("response", "zmin", "zmin+1"):
            if f"{k}_by_kind" in row:
                print(f"{'':12s} {k} flagged by kind: {row[f'{k}_by_kind']}", flush=True)
    crit = {k: float(np.mean([out[f][k]["auroc"] for f in FAMILIES])) for k in KINDS}  # type: ignore[index]
    print("criterion (mean held-out family AUROC): " + ", ".join(f"{k} {v:.3f}" for k, v in crit.items()))
    best = max((k for k in KINDS if k.startswith("zmin")), key=lambda k: crit[k])
    slack = float(best.partition("+")[2] or 0)
    print(f"chosen gate: {best} (slack {slack:g} request SDs; fit_shipped.py compliance-gate ships it)")
    if args.json:
        doc = {"families": out, "criterion": crit, "chosen": best, "slack": slack, "layers": args.layers,
               "window": args.window, "request_policy": Path(args.request_policy).name,
               "request_rule": args.request_rule, "fit_without": args.fit_without,
               "fit_without_source": args.fit_without_source, "fit_on": args.fit_on, "score_on": args.score_on}
        args.json.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
