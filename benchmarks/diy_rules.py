#!/usr/bin/env python3
"""A new user's SAE-feature rule: ``guardrails discover``, then ``calibrate`` (as drafted, then ``--fit-weights``),
then ``eval``.

Runs the CLI exactly as the README shows it, on the repo's request data (``calibration/data/harmful_requests``:
features and weights from the train split, the threshold at 3% FPR on the cal split), for the two ways
``--fit-weights`` fits an SAE-feature rule: ``--objective pooled`` (at most N positive weights by L1 logistic
regression on max-pooled activations: a short list to read) and ``--objective window`` (signed weights and a bias
fitted on the score the rule serves, the recipe of the shipped ``harmful-requests-sae``), each at several feature
counts, and a linear probe at the SAE's layer (15) fitted both ways, and once more with ``--invariant-to form`` (the
rows' ``form`` column, imperative / question / other, erased within each label before the fit); the shipped
``harmful-requests-sae`` beside them. Then ``guardrails eval`` on rows none of them saw: the test
split (its external sources and hand-written sets are held out whole) and the form-paired requests (each harmful
request against its benign twin in the same frame).

    python benchmarks/diy_rules.py [--counts 16,256,2048] [--out-dir /tmp/diy] [--json-out FILE]

~6 minutes on 2 cores (the activations are cached after the first run). The window fit is not deterministic to the
second decimal (threaded reductions). Prints a table and, as the last line, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "calibration" / "data"
SOURCES = ("strongreject", "harmbench", "harmbench_contextual", "handwritten_blind_harmful",
           "handwritten_blind_contrast", "handwritten_short_forms_harmful", "handwritten_short_forms_contrast")
FRAMES = "handwritten_benign_frames"  # benign requests in AdvBench's frames (held out whole): the share blocked


def cli(*args: str) -> str:
    res = subprocess.run([sys.executable, "-m", "guardrails.cli.main", *args], capture_output=True, text=True,
                         check=False)
    if res.returncode:
        raise SystemExit(f"guardrails {' '.join(args)} failed ({res.returncode}):\n{res.stderr[-2000:]}")
    return res.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--counts", default="16,256,2048", help="feature counts of the window fits (pooled: 16)")
    ap.add_argument("--out-dir", type=Path, default=None, help="where the policies go (default: a temporary folder)")
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args()
    out = args.out_dir or Path(tempfile.mkdtemp(prefix="diy-rules-"))
    out.mkdir(parents=True, exist_ok=True)
    data = str(DATA / "harmful_requests")
    draft = out / "draft.yaml"
    cli("discover", "--data", data, "--out", str(draft), "--json")
    fits = [("pooled", 16)] + [("window", int(n)) for n in args.counts.split(",")]
    policies: dict[str, str] = {}
    # the draft as discover wrote it (its features summed with weight 1), calibrated as discover's hint says
    as_drafted = out / "drafted.yaml"
    cli("calibrate", "--policy", str(draft), "--data", data, "--target-fpr", "0.03", "--out", str(as_drafted), "--json")
    policies["SAE, as drafted (5 features)"] = str(as_drafted)
    for objective, n in fits:
        name = f"{objective} {n}"
        path = out / f"{objective}{n}.yaml"
        cli("calibrate", "--policy", str(draft), "--data", data, "--fit-weights", "--objective", objective,
            "--max-features", str(n), "--target-fpr", "0.03", "--out", str(path), "--json")
        policies[name] = str(path)
        print(f"fitted {name}: {path}", file=sys.stderr, flush=True)
    # a linear probe at the SAE's layer, the two ways --fit-weights fits one (written from a bare policy)
    import numpy as np
    import yaml

    from guardrails.offline.baselines import save_linear

    for objective, invariant in (("pooled", ""), ("window", ""), ("window", "form")):
        tag = objective + (f"-invariant-{invariant}" if invariant else "")
        # a placeholder (the bundled model's hidden size) that the fit replaces
        save_linear(out / f"probe-{tag}.safetensors", np.zeros(576, np.float32), 0.0)
        bare = {"name": f"diy-probe-{tag}", "rules": [{
            "id": "probe", "scope": "input", "threshold": 0.0, "action": "block",
            "detector": {"kind": "linear", "layer": 15, "weights": f"probe-{tag}.safetensors", "window": 16}}]}
        src = out / f"probe-{tag}.src.yaml"
        src.write_text(yaml.safe_dump(bare), encoding="utf-8")
        path = out / f"probe-{tag}.yaml"
        cli("calibrate", "--policy", str(src), "--data", data, "--fit-weights", "--objective", objective,
            "--target-fpr", "0.03", "--out", str(path), "--json", *(["--invariant-to", invariant] if invariant else []))
        name = f"probe L15 {objective}" + (f", invariant to {invariant}" if invariant else "")
        policies[name] = str(path)
        print(f"fitted {name}: {path}", file=sys.stderr, flush=True)
    policies["shipped harmful-requests-sae"] = "harmful-requests-sae"
    flags = [x for p in policies.values() for x in ("--policy", p)]
    pairs = json.loads(cli("eval", *flags, "--data", str(DATA / "form_pairs.jsonl"), "--json"))["policies"]
    test = json.loads(cli("eval", *flags, "--data", str(DATA / "harmful_requests.test.jsonl"), "--by", "source",
                          "--json"))["policies"]
    result: dict[str, dict[str, float | None]] = {}
    for name, p, t in zip(policies, pairs, test, strict=True):
        row = {"test_auroc": t["auroc"], "test_tpr": t["tpr"], "test_fpr": t["fpr"], "pairs_auroc": p["auroc"],
               "pairs_harmful_fired": p["tpr"], "pairs_twins_fired": p["fpr"]}
        row.update({f"{s}_auroc": t["by_source"].get(s, {}).get("auroc") for s in SOURCES})
        row["frames_blocked"] = t["by_source"].get(FRAMES, {}).get("fpr")
        result[name] = row
    cols = ["test_auroc", "test_tpr", "test_fpr", "pairs_auroc", "pairs_twins_fired", "strongreject_auroc",
            "harmbench_auroc", "handwritten_blind_harmful_auroc", "handwritten_short_forms_harmful_auroc",
            "frames_blocked"]
    print(f"{'rule':30s} " + " ".join(f"{c[:14]:>14s}" for c in cols))
    for name, row in result.items():
        print(f"{name:30s} " + " ".join(f"{'-' if row[c] is None else format(row[c], '.3f'):>14s}" for c in cols))
    doc = {"rules": result, "policies": policies, "data": data}
    if args.json_out:
        args.json_out.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(doc))


if __name__ == "__main__":
    main()
