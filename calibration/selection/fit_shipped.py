#!/usr/bin/env python3
"""Fit the shipped input detectors with the configuration leave-one-source-out CV chose.

Weights are fitted on the *train* splits only (``harmful_requests.train`` + ``jailbreak_wrapped.train``,
form- and source-balanced row weights, see ``select_detectors.weights``); the thresholds are then fitted
on the cal split by ``guardrails calibrate`` through the serving path (see the commands in
docs/results.md). Writes ``calibration/probes/harmful-requests-probe.safetensors`` and the detector
sections of ``policies/harmful-requests-probe.yaml`` / ``policies/harmful-requests-sae.yaml``; the shipped
``policies/harmful-requests.yaml`` is their ensemble, rebuilt from both by ``fit_ensemble.py`` after a refit.

    nice -n 5 python calibration/selection/fit_shipped.py --probe-layer 15 --probe-c 0.1 --probe-window 16 \
        --sae-kind sparse --sae-n 16 --sae-window 16
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))
from select_detectors import Set, concat, fit_few_features, fit_probe, fit_sparse_sae, load_sae, weights  # noqa: E402

from guardrails.core.policy import Feature, LinearDetector, Policy  # noqa: E402
from guardrails.offline.baselines import save_linear  # noqa: E402
from guardrails.offline.calibrate import explain_direction  # noqa: E402

TRAIN_SETS = tuple(os.environ.get("FIT_SETS", "requests.train,wrapped.train").split(","))


FRAMINGS = "calibration/handwritten/experiments/short_framings.tsv"  # framing_rows.py's source (v0.3.13)


def data_hash() -> str:
    h = hashlib.sha256()
    for f in ("harmful_requests.train.jsonl", "jailbreak_wrapped.train.jsonl"):
        h.update((ROOT / "calibration" / "data" / f).read_bytes())
    return h.hexdigest()


def write_policy(path: Path, policy: Policy) -> None:
    text = (path.read_text(encoding="utf-8").splitlines()[0] + "\n") + policy.to_yaml()
    Policy.from_yaml(text, source=str(path), base_dir=path.parent)
    path.write_text(text, encoding="utf-8")


def policy_to_write(shipped_name: str, target: str | None) -> Path:
    """The policy file a fit rewrites: the shipped ``policies/<shipped_name>``, or ``target`` (relative to the repo),
    made a copy of the shipped one first (``write_policy`` keeps the file's first, comment line)."""
    shipped = ROOT / "policies" / shipped_name
    path = (ROOT / target).resolve() if target else shipped
    if path != shipped:
        shutil.copyfile(shipped, path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--probe-layer", type=int, default=15)
    ap.add_argument("--probe-layers", default="", type=lambda v: [int(x) for x in v.split(",") if x],
                    help="maxwin: a multi-layer probe over these layers (token score = sum of one term per layer); "
                         "overrides --probe-layer")
    ap.add_argument("--probe-c", type=float, default=0.1)
    ap.add_argument("--probe-window", type=int, default=16)
    ap.add_argument("--sae-kind", choices=("sparse", "few"), default="sparse")
    ap.add_argument("--sae-n", type=int, default=16)
    ap.add_argument("--sae-window", type=int, default=16)
    ap.add_argument("--only", choices=("probe", "sae", "both"), default="both")
    ap.add_argument("--probe-kind", choices=("ridge", "maxwin"), default="ridge",
                    help="maxwin: logistic loss on the served max-of-rolling-means row score (maxwin.py)")
    ap.add_argument("--probe-wd", type=float, default=1e-2, help="maxwin: L2 on the standardised weights")
    ap.add_argument("--probe-bag", type=int, default=1,
                    help="maxwin: average this many fits on bootstrap resamples of the rows (a linear probe still)")
    ap.add_argument("--probe-dro", type=float, default=0.0,
                    help="maxwin: group DRO step size over the source families (maxwin.dro_refit; 0: off)")
    ap.add_argument("--probe-dro-rounds", type=int, default=3, help="maxwin: group DRO refits")
    ap.add_argument("--probe-hard", type=float, default=1.0,
                    help="maxwin: weight multiplier of the hand-written hard benign rows (maxwin.row_weights)")
    ap.add_argument("--probe-anchor", action="store_true",
                    help="maxwin: start from the ridge probe and penalise the distance to it instead of the norm")
    ap.add_argument("--probe-erase", action="store_true",
                    help="maxwin: fit on residuals projected off the within-label directions of AdvBench's sentence "
                         "frames in requests.train (erasure.py; the served weights are the projected ones)")
    ap.add_argument("--sae-objective", choices=("mean", "maxwin"), default="mean",
                    help="maxwin: the sparse SAE probe fitted on the served row score (maxwin.fit_sae)")
    ap.add_argument("--resample-seed", type=int, default=None,
                    help="sae: refit on a bootstrap of the train rows (Poisson(1) row weights, this seed) to "
                         "measure how much the fitted rule varies; use with --sae-out")
    ap.add_argument("--sae-positive", action="store_true",
                    help="sae (maxwin objective): non-negative feature weights (maxwin.fit_sae positive=True)")
    ap.add_argument("--sae-out", default=None, help="sae: write the policy here instead of policies/")
    ap.add_argument("--probe-out", default="calibration/probes/harmful-requests-probe.safetensors",
                    help="probe: weight file to write (relative to the repo); harmful-requests-probe.yaml is "
                         "re-pointed to it (harmful-compliance's gate and harmful-requests-steer keep theirs)")
    ap.add_argument("--probe-policy", default="policies/harmful-requests-probe.yaml",
                    help="probe: the policy re-pointed to --probe-out (another path: a copy of the shipped probe "
                         "policy is made there first, e.g. a member for fit_ensemble.py)")
    args = ap.parse_args()
    sets = [Set(n) for n in TRAIN_SETS]
    rows, y, sources = concat(sets)
    w = weights(rows, y, sources)
    if args.resample_seed is not None:
        if args.only != "sae" or not args.sae_out:
            raise SystemExit("fit_shipped.py: --resample-seed needs --only sae and --sae-out (not the shipped policy)")
        w = w * np.random.default_rng(args.resample_seed).poisson(1.0, len(w))
    names = [n.replace("requests", "harmful_requests").replace("wrapped", "jailbreak_wrapped") for n in TRAIN_SETS]
    meta = {"train": ",".join(f"calibration/data/{n}.jsonl" for n in names),
            "train_sha256": data_hash(), "row_weights": "form- and source-balanced (select_detectors.weights)"}

    sae, tag = load_sae()
    if args.only in ("probe", "both"):
        fit_request_probe(args, sets, y, w, meta, sae)
    if args.only in ("sae", "both"):
        fit_sae_rule(args, sets, y, w, sae, tag)


def fit_request_probe(args, sets, y, w, meta, sae) -> None:  # type: ignore[no-untyped-def]
    layers = sorted(args.probe_layers) or [args.probe_layer]
    L = layers[-1]  # the rule decides at its deepest layer; the shallower ones add their terms there
    if len(layers) > 1 and (args.probe_kind != "maxwin" or args.probe_anchor):
        raise SystemExit("fit_shipped.py: --probe-layers needs --probe-kind maxwin (without --probe-anchor)")
    X = np.concatenate([s.mean_pooled(L) for s in sets])
    coef, bias = fit_probe(X, y, w, args.probe_c)
    how = f"ridge C={args.probe_c} on mean-pooled rows"
    extra: dict[int, np.ndarray] = {}
    if args.probe_kind == "maxwin":
        import maxwin

        pool = maxwin.Pool(list(TRAIN_SETS), layers)
        bases = []
        if args.probe_erase:
            import erasure

            if args.probe_anchor:
                raise SystemExit("fit_shipped.py: --probe-erase does not go with --probe-anchor")
            plain = sets[list(TRAIN_SETS).index("requests.train")]
            frame, verbs = erasure.frame_rows(plain.rows, plain.sources)
            bases = [erasure.frame_basis(plain.mean_pooled(layer), frame, plain.labels) for layer in layers]
            erasure.project_blocks(pool.x, bases)
            meta = {**meta, "erasure": "within-label frame directions of requests.train projected out (erasure.py)",
                    "frame_verbs": ",".join(sorted(verbs))}
        w_rows = maxwin.row_weights(pool, args.probe_hard)
        fits = []
        for b in range(args.probe_bag):  # bagging: Poisson(1) bootstrap row weights, the fits' weights averaged
            wb = w_rows if args.probe_bag == 1 else w_rows * np.random.default_rng(b).poisson(1.0, len(w_rows))
            fits.append(maxwin.fit(pool.x, pool.offsets, pool.y, wb, window=args.probe_window, wd=args.probe_wd,
                                   steps=40, anchor=(coef, bias) if args.probe_anchor else None))
            if args.probe_dro:  # group DRO over the source families (maxwin.dro_refit)
                fits[-1] = maxwin.dro_refit(pool.x, pool.offsets, pool.y, wb, pool.family, *fits[-1],
                                            eta=args.probe_dro, rounds=args.probe_dro_rounds,
                                            window=args.probe_window, wd=args.probe_wd, steps=40)
        coef, bias = np.mean([c for c, _ in fits], axis=0), float(np.mean([b for _, b in fits]))
        if args.probe_bag > 1:
            meta = {**meta, "bagged": f"{args.probe_bag} fits on Poisson(1) bootstrap row weights, averaged"}
        if bases:
            coef = erasure.fold_weights(coef, bases)
        coef, extra = maxwin.split_layers(coef, layers)
        how = (f"logistic loss on the served max-of-rolling-means score, L2 {args.probe_wd}"
               + (f", group DRO over source families (eta {args.probe_dro}, {args.probe_dro_rounds} refits)"
                  if args.probe_dro else "")
               + (f" towards the ridge probe (C={args.probe_c})" if args.probe_anchor else "")
               + ("; AdvBench's sentence frames erased from the residuals (within-label directions)" if bases else ""))
    probe_path = ROOT / args.probe_out
    save_linear(probe_path, coef, bias, {**meta, "method": "probe", "layer": str(L), "C": str(args.probe_c),
                                         "layers": ",".join(map(str, layers)), "objective": how}, extra=extra)
    pol_path = policy_to_write("harmful-requests-probe.yaml", args.probe_policy)
    pol = Policy.from_path(pol_path)
    rule = pol.rules[0]
    expl = [Feature(id=i, weight=c, label=f"decoder cosine {c:.3f} with the probe direction")
            for i, c in explain_direction(sae, coef)] if L == 15 else []
    det = rule.detector.model_copy(update={"layer": L, "window": args.probe_window, "aggregate": "mean",
                                           "weights": os.path.relpath(probe_path, pol_path.parent),
                                           "explained_by": expl, "extra_layers": layers[:-1] or None})
    where = f"layer-{L} residual stream" if len(layers) == 1 else \
        f"residual streams of layers {' + '.join(map(str, layers))} (one term per layer, summed per token)"
    desc = (f"Linear probe on the {where} (highest mean over {args.probe_window} tokens), "
            f"fitted on harmful_requests.train + jailbreak_wrapped.train with form-balanced row weights ({how}); "
            f"configuration chosen by leave-source-out CV (docs/results.md)")
    rules = [rule.model_copy(update={"detector": det, "description": desc}), *pol.rules[1:]]  # jailbreak rule kept
    write_policy(pol_path, pol.model_copy(update={"rules": rules}))
    print(json.dumps({"probe": str(probe_path), "probe_layers": layers}))


def fit_sae_rule(args, sets, y, w, sae, tag) -> None:  # type: ignore[no-untyped-def]
    F = np.concatenate([s.sae_pooled(sae, tag) for s in sets])
    if args.sae_kind == "sparse" and args.sae_objective == "maxwin":
        import maxwin

        codes = [s.sae_codes(sae, tag) for s in sets]
        offsets = np.concatenate([[0]] + [np.diff(s.offsets) for s in sets]).cumsum()
        wt, b = maxwin.fit_sae(np.concatenate([c[0] for c in codes]), np.concatenate([c[1] for c in codes]),
                               offsets, y, w, sae.d_sae, window=args.sae_window, n_features=args.sae_n,
                               positive=args.sae_positive)
        sign = " with non-negative weights" if args.sae_positive else ""
        how = (f"sparse SAE probe, {args.sae_n} features{sign}, fitted on the served max-of-rolling-means row score "
               "(L1 selection, then refit)")
    elif args.sae_kind == "sparse":
        wt, b = fit_sparse_sae(F, y, w, args.sae_n)
        how = f"sparse (L1) logistic probe over mean-pooled SAE features, {args.sae_n} features"
    else:
        wt, b = fit_few_features(F, y, w, args.sae_n)
        how = f"few-feature rule: {args.sae_n} features by standardised mean difference, no trained head"
    ids = np.flatnonzero(wt)
    feats = [Feature(id=int(i), weight=round(float(wt[i]), 6)) for i in ids[np.argsort(-np.abs(wt[ids]))]]
    shipped = ROOT / "policies" / "harmful-requests-sae.yaml"
    spol = Policy.from_path(shipped)
    sp = Path(args.sae_out) if args.sae_out else shipped
    if sp != shipped:
        shutil.copyfile(shipped, sp)  # write_policy keeps the file's first (comment) line
    srule = spol.rules[0]
    sdet = srule.detector.model_copy(update={"features": feats, "bias": round(b, 6), "combine": "sum",
                                             "window": args.sae_window, "aggregate": "mean"})
    chosen = ("objective by the probe's leave-source-out CV, feature count (v0.3.3: 128 / 256 / 512 / 1024 / 2048 / "
              "4096) by cal-split AUROC"
              if args.sae_objective == "maxwin" else "chosen by leave-one-source-out CV")
    sdesc = (f"{how} (bundled SAE {tag}), highest mean over {args.sae_window} tokens; fitted on "
             f"harmful_requests.train + jailbreak_wrapped.train; {chosen}"
             + (f"; bootstrap of the train rows, seed {args.resample_seed}" if args.resample_seed is not None else ""))
    spol = spol.model_copy(update={"rules": [srule.model_copy(update={"detector": sdet, "description": sdesc})]})
    write_policy(sp, spol)
    print(json.dumps({"sae_tag": tag, "sae_features": len(feats)}))




def fit_compliance() -> None:
    """Output guard: the configuration ``responses_probe.py`` chose by leave-one-family-out (its JSON,
    ``benchmarks/results/compliance_selection.json``), fitted on the whole train split of the response
    caches (``collect.py``: replies cut to 400 characters, or whole since v0.3.8 where the gated run's JSON says
    ``"fit_on": "whole"``; every family but the held-out many-shot answers; equal total weight per (source, label)
    cell). The threshold is then fitted on the cal split by ``guardrails calibrate`` (docs/results.md)."""
    import maxwin
    import torch
    from responses_probe import CUTS, FAMILIES, MANY_SHOT, cell_weights, fit_head, subset

    torch.set_num_threads(2)
    sel = json.loads((ROOT / "benchmarks" / "results" / "compliance_selection.json").read_text())["best"]
    layer, kind, window = int(sel["layer"]), sel["kind"], int(sel["window"])
    # since v0.3.0 the gated run of compliance_composite.py (its JSON) names the head's layers: a multi-layer
    # maxwin probe, one term per layer, deciding at the deepest
    gated = json.loads((ROOT / "benchmarks" / "results" / "compliance_gate.json").read_text())
    layers = sorted(int(v) for v in gated.get("layers", [layer]))
    if len(layers) > 1 or layers[0] != layer:
        layer, kind, window = layers[-1], "maxwin", int(gated.get("window", window))
        sel = {"layer": layer, "kind": kind, "window": window, "criterion": gated["criterion"][gated["chosen"]],
               "worst": min(gated["families"][f][gated["chosen"]]["auroc"] for f in FAMILIES)}
    fit_on = str(gated.get("fit_on", "cut"))
    from build_data import MAX_RESPONSE_CHARS as WHOLE_CHARS  # the data files' own cut
    from collect import MAX_RESPONSE_CHARS as CUT_CHARS

    chars = str(CUT_CHARS if fit_on == "cut" else WHOLE_CHARS)
    # COMPLIANCE_SETS: other cached sets to fit on (v0.3.11: ctx.responses.train beside the bare rows, contexts.py)
    fit_sets = os.environ.get("COMPLIANCE_SETS", f"{CUTS[fit_on]}.train").split(",")
    pool = maxwin.Pool(fit_sets, layers)
    keep = np.array([s != MANY_SHOT for s in pool.sources])
    x, off, y, src = subset(pool, keep)
    coef, b = fit_head(kind, x, off, y, cell_weights(src, y), window=window)  # exactly the head the selection scored
    coef, extra = maxwin.split_layers(coef, layers)
    how = ("ridge C=0.1 on mean-pooled replies" if kind == "ridge"
           else f"logistic loss on the served max-of-rolling-means score (W{window}), L2 0.01")
    digest = hashlib.sha256((ROOT / "calibration/data/responses.train.jsonl").read_bytes()).hexdigest()
    # COMPLIANCE_PROBE / COMPLIANCE_POLICY: write a candidate instead of the shipped files (the policy is copied
    # from the shipped one first)
    path = ROOT / os.environ.get("COMPLIANCE_PROBE", "calibration/probes/harmful-compliance-probe.safetensors")
    save_linear(path, coef, b, {"method": "probe", "layer": str(layer),
                                "train": "calibration/data/responses.train.jsonl", "train_sha256": digest,
                                "cached_sets": ",".join(fit_sets),
                                "max_response_chars": chars, "objective": how,
                                "row_weights": "equal per (source, label)",
                                "layers": ",".join(map(str, layers)),
                                "selection": json.dumps({k: sel[k] for k in ("layer", "kind", "window", "criterion",
                                                                             "worst")})}, extra=extra)
    pol_path = policy_to_write("harmful-compliance.yaml", os.environ.get("COMPLIANCE_POLICY"))
    pol = Policy.from_path(pol_path)
    rule = pol.rules[0]
    det = rule.detector.model_copy(update={"layer": layer, "window": window, "aggregate": "mean",
                                           "weights": os.path.relpath(path, pol_path.parent),
                                           "extra_layers": layers[:-1] or None})
    where = f"layer-{layer} residuals" if len(layers) == 1 else \
        f"the residuals of layers {' + '.join(map(str, layers))} (one term per layer, summed per token)"
    desc = (f"Linear probe on {where} of response tokens (highest mean over {window} tokens), "
            f"fitted on calibration/data/responses.train.jsonl ({how}; replies cut to {chars} characters, equal "
            "weight per source and label); detector and window chosen by leave-one-family-out CV "
            "(calibration/selection/responses_probe.py), the layers with the gate (compliance_composite.py)")
    new = rule.model_copy(update={"detector": det, "description": desc})
    write_policy(pol_path, pol.model_copy(update={"rules": [new, *pol.rules[1:]]}))
    print(json.dumps({"compliance": {"layer": layer, "kind": kind, "window": window}}))


def fit_compliance_gate() -> None:
    """Gate the output guard by the request (``compliance_composite.py`` measured it, leave-one-family-out):
    harmful compliance = a harmful request *and* an answer that goes along. ``harmful-compliance`` gets the
    shipped request rule of ``harmful-requests`` as a flag-only input rule, and its answer rule a gate
    ``min(answer score, scale * request score + offset)`` that puts both scores in the same units: each
    standardised on the label-0 rows of the response cal split (every family but the held-out many-shot
    answers), the request's loosened by the slack ``compliance_composite.py`` chose (``k`` request SDs, so the
    cap binds only on requests that look benign): ``scale = sd_answer / sd_request``, ``offset = mean_answer -
    scale * mean_request + k * sd_answer``. The
    threshold is then fitted on the cal split by ``guardrails calibrate --rule harmful-compliance``."""
    from heldout import Scorer
    from responses_probe import CUTS, MANY_SHOT

    from guardrails.core.policy import Gate
    from guardrails.offline.scoring import gate_from_scores

    # COMPLIANCE_POLICY: gate the candidate that ``fit_shipped.py compliance`` wrote there (relative to the repo)
    pol_path = ROOT / os.environ.get("COMPLIANCE_POLICY", "policies/harmful-compliance.yaml")
    # the gate rule already in the policy (v0.2.6's request probe, on whose scale the gate was chosen):
    # harmful-requests-probe.yaml has since moved to another probe file and threshold
    answers = Scorer(pol_path, rule="harmful-compliance")
    request = Scorer(pol_path, rule="harmful-request")
    sel = json.loads((ROOT / "benchmarks" / "results" / "compliance_gate.json").read_text())
    cal, prompts = Set(f"{CUTS[sel.get('score_on', 'cut')]}.cal"), Set("responses_prompts.cal")
    keep = np.array([s != MANY_SHOT for s in cal.sources])
    slack = float(sel["slack"])
    scale, offset = gate_from_scores(answers.rows(cal)[keep], request.rows(prompts)[keep], cal.labels[keep], slack)
    pol = Policy.from_path(pol_path)
    comp = next(x for x in pol.rules if x.id == "harmful-compliance")
    comp = comp.model_copy(update={"gate": Gate(rule="harmful-request", scale=round(scale, 4),
                                                offset=round(offset, 4))})
    write_policy(pol_path, pol.model_copy(update={"rules": [comp if x.id == comp.id else x for x in pol.rules]}))
    n0 = int((keep & (cal.labels == 0)).sum())
    print(json.dumps({"gate": {"scale": scale, "offset": offset, "slack": slack, "n_label0": n0}}))


def fit_jailbreak() -> None:
    """A second rule of ``harmful-requests``: jailbreak framing (a role-play / persona / "developer mode"
    template around the request), whatever the request inside. Same objective as the request probe
    (``maxwin.fit``, layer 18, window 16, L2 1e-2); label = the row is template-wrapped (jailbreak_wrapped.train,
    harmful and benign requests alike) vs a plain request (harmful_requests.train, both labels), equal weight
    per label. Threshold: midway between the highest plain cal row and the lowest wrapped cal row (the cal
    split separates them completely). Action ``flag``: the request rule decides blocking, so a template around
    a benign request is recorded, not refused; set ``action: block`` to refuse jailbreak framing as such.
    Since v0.3.13 the wrapped rows include hand-written *short* framings and the plain ones benign persona requests
    (``framing.train``: ``framing_rows.py cache`` first). ``FRAMING_SETS`` (default
    ``requests.train,wrapped.train,framing.train``), ``FRAMING_OUT`` (the probe file) and ``FRAMING_POLICY`` (the
    policy whose rule is rewritten, relative to the repo) fit a candidate elsewhere."""
    import maxwin

    sets = os.environ.get("FRAMING_SETS", "requests.train,wrapped.train,framing.train").split(",")
    pool = maxwin.Pool(sets, [18])
    yj = np.array([1 if "template" in r else 0 for r in pool.rows])
    w = np.where(yj == 1, 0.5 / yj.mean(), 0.5 / (1 - yj.mean()))
    coef, bias = maxwin.fit(pool.x, pool.offsets, yj, w, window=16, wd=1e-2, steps=40)
    cal = maxwin.Pool(["requests.cal", "wrapped.cal"], [18])
    yc = np.array([1 if "template" in r else 0 for r in cal.rows])
    sc = maxwin.score(cal.x, cal.offsets, coef, bias, 16)
    lo, hi = float(sc[yc == 0].max()), float(sc[yc == 1].min())
    thr = round((lo + hi) / 2, 4)
    path = ROOT / os.environ.get("FRAMING_OUT", "calibration/probes/jailbreak-framing-probe.safetensors")
    meta = {"method": "probe", "layer": "18", "objective": "maxwin L2 1e-2",
            "train": "+".join(sets) + " (label: the row wraps its request in a template)",
            "train_sha256": data_hash(), "cal_plain_max": f"{lo:.4f}", "cal_wrapped_min": f"{hi:.4f}"}
    if "framing.train" in sets:  # the hand-written short framings it wraps requests in (framing_rows.py)
        meta["framings_sha256"] = hashlib.sha256((ROOT / FRAMINGS).read_bytes()).hexdigest()
    save_linear(path, coef, bias, meta)
    pol_path = ROOT / os.environ.get("FRAMING_POLICY", "policies/harmful-requests-probe.yaml")
    pol = Policy.from_path(pol_path)
    base = pol.rules[0]
    det = LinearDetector(kind="linear", layer=18, method="probe", window=16, aggregate="mean",
                         weights=os.path.relpath(path, pol_path.parent))
    rule = base.model_copy(update={
        "id": "jailbreak-framing", "detector": det, "threshold": thr, "action": "flag", "category": "jailbreak",
        "description": "Jailbreak framing (persona, role-play, 'developer mode' templates) whatever the request inside:"
                       " "
                       "linear probe at layer 18 (highest mean over 16 tokens) fitted on wrapped vs plain requests "
                       "through the served aggregation; flags (the request rule decides blocking)"})
    rules = [r for r in pol.rules if r.id != "jailbreak-framing"] + [rule]
    write_policy(pol_path, pol.model_copy(update={"rules": rules}))
    print(json.dumps({"jailbreak_threshold": thr, "cal_plain_max": lo, "cal_wrapped_min": hi}))


if __name__ == "__main__":
    if sys.argv[1:2] == ["compliance"]:
        fit_compliance()
    elif sys.argv[1:2] == ["compliance-gate"]:
        fit_compliance_gate()
    elif sys.argv[1:2] == ["jailbreak"]:
        fit_jailbreak()
    else:
        main()
