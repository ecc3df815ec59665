#!/usr/bin/env python3
"""How much the shipped ensemble moves when its SAE member is refitted: ensembles of the shipped probe with each
bootstrap refit of the SAE rule (``fit_shipped.py --resample-seed N --sae-out ...`` then ``guardrails calibrate``,
as in docs/results.md v0.2.6), built by ``fit_ensemble.py``, thresholded at 3% FPR on the cal split's benign rows
(what ``guardrails calibrate`` gives), scored on the held-out sets by ``heldout.report`` (no bootstrap intervals).

    SELECTION_DTYPE=float32 python calibration/selection/ensemble_bootstrap.py /tmp/refit/sae_s1.yaml \\
        /tmp/refit/sae_s2.yaml /tmp/refit/sae_s3.yaml --json benchmarks/results/sae_rule_bootstrap/ensemble.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
import heldout  # noqa: E402
from ensemble import threshold_at  # noqa: E402
from select_detectors import Set  # noqa: E402

KEYS = ("held-out harmful (all four)", "blind hand-written harmful (held out whole)",
        "blind hand-written contrasts (held out whole)", "over-refusal set (evaluation only)",
        "wrapped harmful, walledeval templates (held out whole)",
        "wrapped benign, walledeval templates (held out whole)", "reserved past (label 1)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sae_policies", nargs="+", help="refitted SAE-rule policies (the ensemble's second member)")
    ap.add_argument("--probe", default=str(ROOT / "policies" / "harmful-requests-probe.yaml"))
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    heldout.boot = lambda fn, *a, **k: [float("nan"), float("nan")]  # point estimates only
    cal = Set("requests.cal")
    out: dict[str, object] = {}
    tmp = Path(tempfile.mkdtemp())
    runs = [("shipped", ROOT / "policies" / "harmful-requests.yaml")]
    for p in args.sae_policies:
        ens = tmp / f"ensemble_{Path(p).stem}.yaml"
        subprocess.run([sys.executable, str(HERE / "fit_ensemble.py"), "--member", f"{args.probe}:harmful-request",
                        "--member", p, "--out", str(ens)], check=True, capture_output=True)
        runs.append((Path(p).stem, ens))
    print("columns: AUROC/blocked for " + " | ".join(KEYS))
    for name, pol in runs:
        sc = heldout.Scorer(pol)
        c = sc.rows(cal)
        sc.threshold = threshold_at(c[cal.labels == 0], 0.03)
        rep = heldout.report(sc)
        tpr = float((c[cal.labels == 1] >= sc.threshold).mean())
        out[name] = {"threshold": sc.threshold, "cal_tpr": tpr, "sets": {k: rep[k] for k in KEYS}}
        print(f"{name}: threshold {sc.threshold:.4f}, cal TPR {tpr:.3f}\n    " + " | ".join(
            f"{rep[k].get('auroc', float('nan')):.3f}/{rep[k]['blocked']:.3f}" for k in KEYS), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=lambda x: None) + "\n")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
