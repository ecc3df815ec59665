"""Detection benchmark: every shipped policy and its baselines on the test splits, over-refusal and reserved sets.

    python benchmarks/detection.py [--no-baselines] [--reserved-limit N]

Scores are the policies' decision scores as served (engine scoring of cached layer-15 residuals, the
same numbers ``GuardedModel.score`` gives; ``guardrails calibrate`` checks that on every run). The
reserved sets (calibration/data/reserved_eval, local-only) are never used for fitting: only their
detection rate at the policy's own threshold is reported. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from guardrails.cli.calibrate import Session, _json_safe, _layer, run_baselines  # noqa: E402
from guardrails.core.policy import Policy  # noqa: E402
from guardrails.offline.calibrate import load_labeled, rule_scope, text_scores  # noqa: E402
from guardrails.offline.evaluate import metrics, round_metrics  # noqa: E402

DATA = ROOT / "calibration" / "data"
RESERVED = DATA / "reserved_eval"
# Do-Not-Answer sources that are harmful-intent requests (the others are "should not answer" advice/chat)
DNA_HARMFUL = ("donotanswer_discrimination_exclusion_toxicity_hateful_offensive", "donotanswer_information_hazard",
               "donotanswer_malicious_uses")

PLAN: dict[str, dict[str, Any]] = {
    "harmful-requests": {
        "test": DATA / "harmful_requests.test.jsonl",
        "extra": [("over_refusal (FPR)", DATA / "over_refusal.jsonl", None, None)],
        "reserved": [
            ("donotanswer (harmful intents)", RESERVED / "donotanswer.jsonl", 300, DNA_HARMFUL),
            ("donotanswer (all)", RESERVED / "donotanswer.jsonl", 300, None),
            ("past tense", RESERVED / "phrasing_past_tense.jsonl", 150, None),
            ("future tense", RESERVED / "phrasing_future_tense.jsonl", 150, None),
            ("in-the-wild jailbreaks", RESERVED / "inthewild_jailbreaks.jsonl", 30, None),
        ],
    },
    "harmful-requests-sae": {
        "test": DATA / "harmful_requests.test.jsonl",
        "extra": [("over_refusal (FPR)", DATA / "over_refusal.jsonl", None, None)],
        "reserved": [],
    },
    "harmful-compliance": {"test": DATA / "responses.test.jsonl", "limit": 240, "max_response_chars": 300,
                           "extra": [], "reserved": []},
    "toxicity": {"test": DATA / "toxicity.test.jsonl", "limit": 240, "extra": [], "reserved": []},
}


def _scores(session: Session, policy: Policy, path: Path, limit: int | None, mrc: int | None = None) -> tuple[
    Any, np.ndarray, float
]:
    data = load_labeled(path, limit=limit, max_response_chars=mrc)
    rule = policy.rules[0]
    guard = session.guard(policy)
    rows = session.rows(data, _layer(policy, rule), rule_scope(rule))
    return data, text_scores(guard, rule.id, rows), float(rule.threshold)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument("--policies", nargs="*", default=list(PLAN))
    args = ap.parse_args()
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    session = Session("bundled", progress=True)
    result: dict[str, Any] = {}
    table = Table("policy / detector", "set", "n", "AUROC", "TPR@1%FPR", "TPR@5%FPR", "F1", "FPR", "TPR",
                  title="Detection (bundled SmolLM2-135M-Instruct, layer 15)")
    for name in args.policies:
        path = ROOT / "policies" / f"{name}.yaml"
        if not path.is_file():
            console.print(f"[yellow]skip {name}: {path} missing[/]")
            continue
        policy = Policy.from_path(path)
        plan = PLAN[name]
        res: dict[str, Any] = {}
        lim, mrc = plan.get("limit"), plan.get("max_response_chars")
        data, s, thr = _scores(session, policy, plan["test"], lim, mrc)
        res["test"] = round_metrics(metrics(s, data.labels, thr))
        _row(table, name, "test", res["test"])
        if not args.no_baselines:
            rule = policy.rules[0]
            train = load_labeled(str(plan["test"]).replace(".test.", ".train."), limit=lim, max_response_chars=mrc)
            if name.endswith("-sae"):
                res["baselines"] = {}
            else:
                res["baselines"] = run_baselines(session, data, train, _layer(policy, rule), rule_scope(rule),
                                                 window=rule.detector.window)
            for bname, m in res["baselines"].items():
                _row(table, f"  {bname}", "test", m)
        for label, p, limit, sources in plan["extra"] + plan["reserved"]:
            if not p.is_file():
                console.print(f"[yellow]{p} missing: run python calibration/build_data.py[/]")
                continue
            d, sc, _ = _scores(session, policy, p, limit)
            keep = np.array([sources is None or src in sources for src in d.sources])
            m = round_metrics(metrics(sc[keep], d.labels[keep], thr))
            res[label] = m
            _row(table, name, label, m)
        result[name] = res
    console.print(table)
    print(json.dumps(_json_safe(result)))


def _row(table: Any, name: str, split: str, m: dict[str, Any]) -> None:
    def f(k: str) -> str:
        v = m.get(k)
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"

    table.add_row(name, split, str(m.get("n", "")), f("auroc"), f("tpr_at_1pct_fpr"), f("tpr_at_5pct_fpr"), f("f1"),
                  f("fpr"), f("tpr"))


if __name__ == "__main__":
    main()
