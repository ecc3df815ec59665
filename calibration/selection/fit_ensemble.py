#!/usr/bin/env python3
"""Build an ensemble rule from shipped single-detector rules: the mean of their standardised token scores.

Each member is a shipped input rule (a probe, an SAE-feature rule). Its ``mean`` and ``std`` are those of its
served row score (highest mean over the window) on the **benign rows of the cal split**, so a member's unit is
"standard deviations above benign"; members are equally weighted unless ``--weights`` says otherwise (the
shipped 1:1 was fixed before any held-out number was looked at: equal weight on standardised scores is the
prior of a two-member average). The ensemble keeps the first member's window and aggregation (all members
must share them) and gets its threshold from ``guardrails calibrate`` on the cal split, as any rule does:

    SELECTION_DTYPE=float32 python calibration/selection/fit_ensemble.py \\
        --member policies/harmful-requests-probe.yaml --member policies/harmful-requests-sae.yaml \\
        --out policies/harmful-requests.yaml --description "Blocks harmful requests (weapons, malware, fraud, \
        harassment...) at the prompt, before any token is generated."
    guardrails calibrate --policy policies/harmful-requests.yaml --data calibration/data/harmful_requests.cal.jsonl \\
        --target-fpr 0.03 --rule harmful-request --no-test

The output policy is the first member's file (its other rules, normalisation and refusal kept) with the
first member's rule replaced by the ensemble (same id); members' weight files are re-pointed relative to
``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from heldout import Scorer  # noqa: E402
from select_detectors import Set  # noqa: E402

from guardrails.core.policy import EnsembleDetector, EnsembleMember, LinearDetector, Policy, Rule  # noqa: E402


def member_of(path: Path, rule_id: str | None, out_dir: Path, cal: Set, weight: float) -> tuple[EnsembleMember, str]:
    pol = Policy.from_path(path)
    rule = next(r for r in pol.rules if rule_id is None or r.id == rule_id)
    det = rule.detector
    if isinstance(det, EnsembleDetector):
        raise SystemExit(f"fit_ensemble.py: {path}: rule {rule.id!r} is already an ensemble")
    neg = Scorer(path, rule=rule.id).rows(cal)[cal.labels == 0]
    upd: dict[str, object] = {}
    if isinstance(det, LinearDetector):
        upd["weights"] = os.path.relpath(pol.resolve(det.weights), out_dir)
        upd["explained_by"] = []
    fields = {k: v for k, v in det.model_dump(exclude_unset=True).items() if k not in ("window", "aggregate")}
    fields.update(upd)
    member = EnsembleMember.model_validate({"detector": {"kind": det.kind, **fields}, "weight": weight,
                                            "mean": round(float(neg.mean()), 6), "std": round(float(neg.std()), 6)})
    return member, f"{pol.name}/{rule.id} (window {det.window}, {det.aggregate})"


def repoint(pol: Policy, rule: Rule, out_dir: Path) -> Rule:
    """``rule`` with its weight file named relative to ``out_dir`` (the policy is written there)."""
    det = rule.detector
    if not isinstance(det, LinearDetector):
        return rule
    path = os.path.relpath(pol.resolve(det.weights), out_dir)
    return rule.model_copy(update={"detector": det.model_copy(update={"weights": path})})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--member", action="append", required=True, help="policy YAML[:rule id] (repeatable, >= 2)")
    ap.add_argument("--weights", default="", help="comma-separated member weights (default: all 1)")
    ap.add_argument("--out", required=True, help="policy YAML to write")
    ap.add_argument("--rule-id", default="", help="id of the ensemble rule (default: the first member's)")
    ap.add_argument("--name", default="", help="policy name (default: the --out file's stem)")
    ap.add_argument("--description", default="", help="policy description (default: the first member's policy's)")
    args = ap.parse_args()
    if len(args.member) < 2:
        raise SystemExit("fit_ensemble.py: give at least two --member")
    weights = [float(x) for x in args.weights.split(",")] if args.weights else [1.0] * len(args.member)
    if len(weights) != len(args.member):
        raise SystemExit(f"fit_ensemble.py: --weights has {len(weights)} values for {len(args.member)} members")
    out = Path(args.out).resolve()
    cal = Set("requests.cal")
    members, names, windows = [], [], set()
    for spec, w in zip(args.member, weights, strict=True):
        path, _, rid = spec.partition(":")
        m, name = member_of(Path(path).resolve(), rid or None, out.parent, cal, w)
        members.append(m)
        names.append(name)
        first_rule = next(r for r in Policy.from_path(path).rules if not rid or r.id == rid)
        windows.add((first_rule.detector.window, first_rule.detector.aggregate))
    if len(windows) != 1:
        raise SystemExit(f"fit_ensemble.py: members differ in window/aggregate {sorted(windows)}; refit them alike")
    window, aggregate = windows.pop()
    base_path, _, base_rid = args.member[0].partition(":")
    base = Policy.from_path(base_path)
    i = next(j for j, r in enumerate(base.rules) if not base_rid or r.id == base_rid)
    old = base.rules[i]
    saes = dict(base.saes)
    for spec in args.member[1:]:
        saes |= {k: v for k, v in Policy.from_path(spec.partition(":")[0]).saes.items() if k not in saes}
    det = EnsembleDetector(kind="ensemble", members=members, window=window, aggregate=aggregate)
    desc = ("Ensemble: the mean of the standardised token scores of " + " and ".join(names)
            + f" (each member's mean/std on the cal split's benign rows; weights {weights}), highest mean over "
            f"{window} tokens; threshold by guardrails calibrate at 3% cal FPR")
    rule = old.model_copy(update={"id": args.rule_id or old.id, "detector": det, "description": desc})
    rules = [repoint(base, r, out.parent) for r in base.rules]
    rules[i] = rule
    pol = base.model_copy(update={"rules": rules, "saes": saes, "calibration": None, "name": args.name or out.stem,
                                  "description": args.description or base.description})
    header = f"# {pol.name}: ensemble by calibration/selection/fit_ensemble.py, threshold by guardrails calibrate\n"
    text = header + pol.to_yaml()
    Policy.from_yaml(text, source=str(out), base_dir=out.parent)
    out.write_text(text, encoding="utf-8")
    for m, n in zip(members, names, strict=True):
        print(f"{n}: mean {m.mean:.4f}, std {m.std:.4f}, weight {m.weight:g}")
    print(f"wrote {out} (rule {rule.id!r}, threshold still {rule.threshold}: run guardrails calibrate)")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
