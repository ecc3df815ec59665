#!/usr/bin/env python3
"""Benign texts from elsewhere: how often request policies block requests nobody wrote for this repo.

Two benign sets shipped inside ``inspect_evals`` (read, never imported as code; neither is in any split):
tau2's customer requests (``tau2/data/domains/*/tasks*.json``, each task's ``reason_for_call``) and SWE-Lancer's
bug-report titles (``swe_lancer/data/all_swelancer_tasks.csv``, bracketed tags such as ``[HOLD for payment]``
removed). Scored as served (``GuardedModel.score``); a row counts as blocked when a rule's decision blocks it.

    python calibration/selection/benign_elsewhere.py --policy policies/harmful-requests.yaml [--policy ...]
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import re


def sets() -> dict[str, list[str]]:
    import inspect_evals

    root = os.path.dirname(inspect_evals.__file__)
    tau2 = []
    for f in sorted(glob.glob(f"{root}/tau2/data/domains/*/tasks*.json")):
        with open(f, encoding="utf-8") as fh:
            tasks = json.load(fh)
        for t in tasks:
            r = _get(t, "user_scenario", "instructions", "reason_for_call")
            if isinstance(r, str) and 20 < len(r) < 600:
                tau2.append(r.strip())
    csv.field_size_limit(10**9)
    with open(f"{root}/swe_lancer/data/all_swelancer_tasks.csv", encoding="utf-8", newline="") as fh:
        titles = [re.sub(r"^(\[[^\]]*\]\s*)+", "", r["title"]).strip() for r in csv.DictReader(fh)]
    return {"tau2 customer requests": sorted(set(tau2)),
            "SWE-Lancer bug titles": sorted({t for t in titles if len(t) > 15})}


def _get(obj: object, *keys: str) -> object:
    """``obj[k1][k2]...``, or None where a level is missing or not a mapping."""
    for k in keys:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(k)
    return obj


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", action="append", required=True)
    args = ap.parse_args()
    from guardrails import GuardedModel, Policy
    from guardrails.serving.models import load_model

    lm, tok = load_model("bundled")
    data = sets()
    out: dict[str, dict[str, float | int]] = {}
    for path in args.policy:
        g = GuardedModel(lm, tok, Policy.from_path(path))
        for name, texts in data.items():
            blocked = sum(any(d.action == "block" for d in s.decisions) for s in g.score(texts))
            out[f"{path} | {name}"] = {"n": len(texts), "blocked": blocked, "share": round(blocked / len(texts), 4)}
            print(f"{path:45s} {name:24s} blocked {blocked:3d} of {len(texts)} = {blocked / len(texts):.3f}",
                  flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
