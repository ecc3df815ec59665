#!/usr/bin/env python3
"""The output guard's report on the response test split, per source, from cached residuals (float32).

Each policy's gated answer score as served, ``min(answer score, scale * request score + offset)`` (the request
score is the gate rule's highest windowed score over the prompt, fixed before the answer starts), at a threshold
fitted the way ``guardrails calibrate`` fits it (3% FPR on the cal split) on these same caches, so policies
calibrated in another dtype are compared at their own float32 operating point. Prints AUROC, the share of
harmful answers flagged (TPR) and of harmless ones (FPR), per source, with the pooled test split and the held-out
sources (the many-shot answers, blind sets 3 and 4) named; for the blind sets also the flagged share per kind.

    SELECTION_DTYPE=float32 python calibration/selection/collect.py --layers=12,15,18 responses.train \\
        responses.cal responses.test responses_prompts.train responses_prompts.cal responses_prompts.test
    git show 6e387a1:policies/harmful-compliance.yaml > policies/v029-compliance.yaml
    SELECTION_DTYPE=float32 python calibration/selection/compliance_heldout.py \\
        --policy policies/v029-compliance.yaml --policy policies/harmful-compliance.yaml [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from compliance_composite import blind_kinds  # noqa: E402
from fit_categories import firing_windows  # noqa: E402
from heldout import Scorer  # noqa: E402
from maxwin import auroc  # noqa: E402
from responses_probe import CUTS, HELD, family  # noqa: E402
from select_detectors import Set  # noqa: E402

from guardrails.core.policy import Policy, Rule  # noqa: E402
from guardrails.offline.calibrate import fit_threshold  # noqa: E402

sys.path.insert(0, str(HERE.parent))
from build_data import BLIND_RESPONSE_SETS  # noqa: E402

BLIND_SOURCES = tuple(f"blind_responses_{n}" for n in BLIND_RESPONSE_SETS)


def cap(pol_path: Path, rule: Rule, split: str) -> np.ndarray | None:
    """Per row of ``split``: the gate's cap on the answer score (``scale * request score + offset``, fixed by the
    prompt before the answer starts), or None for an ungated rule."""
    if rule.gate is None:
        return None
    req = Scorer(pol_path, rule=rule.gate.rule).rows(Set(f"responses_prompts.{split}"))
    return np.asarray(rule.gate.scale * req + rule.gate.offset)


def gated(pol_path: Path, rule: Rule, split: str, cut: str = "cut") -> np.ndarray:
    """The output rule's score of the cached response rows of ``split`` (``cut``: replies cut to 400 characters;
    ``whole``: as served), gated by its request rule's score of their prompts where the policy says so."""
    own = Scorer(pol_path, rule=rule.id).rows(Set(f"{CUTS[cut]}.{split}"))
    c = cap(pol_path, rule, split)
    return own if c is None else np.minimum(own, c)


def trip_tokens(pol_path: Path, rule: Rule, split: str, cut: str, thr: float) -> np.ndarray:
    """Per row: how many reply tokens the guard has read when the rule first reaches ``thr`` while streaming (the
    end of ``fit_categories.firing_windows``' deciding window). Meaningful for the rows whose gated score reaches
    ``thr`` (the gate's cap is fixed before the answer starts, so it trips where the answer score does)."""
    scorer, data = Scorer(pol_path, rule=rule.id), Set(f"{CUTS[cut]}.{split}")
    spans = firing_windows(scorer.tokens(data), data.offsets, scorer.window, thr)
    return np.array([end - start for (_, end), start in zip(spans, data.offsets[:-1], strict=True)])


def rates(s: np.ndarray, y: np.ndarray, thr: float) -> dict[str, float | int | None]:
    pos, neg = s[y == 1], s[y == 0]
    return {"auroc": round(auroc(pos, neg), 4) if len(pos) and len(neg) else None,
            "tpr": round(float(np.mean(pos >= thr)), 4) if len(pos) else None,
            "fpr": round(float(np.mean(neg >= thr)), 4) if len(neg) else None, "n": len(y)}


def report(pol_path: Path, cut: str = "cut") -> dict[str, object]:
    rule = next(r for r in Policy.from_path(pol_path).rules if r.scope == "output")
    cal, test = Set(f"{CUTS[cut]}.cal"), Set(f"{CUTS[cut]}.test")
    thr = fit_threshold(gated(pol_path, rule, "cal", cut), cal.labels, target_fpr=0.03)
    s, y = gated(pol_path, rule, "test", cut), test.labels
    src = np.array(test.sources)
    hk = blind_kinds(test.rows)
    out: dict[str, object] = {"threshold_float32": round(thr, 4), "test": rates(s, y, thr)}
    if rule.steer is not None and rule.steer.block_above is not None:  # blocked outright, not steered
        out["test_blocked_above"] = {"block_above": rule.steer.block_above,
                                     **rates(s, y, float(rule.steer.block_above))}
    held = np.isin([family(x) for x in src], HELD)  # the sources held out of every fit
    out["test_without_held_out_sources"] = rates(s[~held], y[~held], thr)
    out["held_out_sources_pooled"] = rates(s[held], y[held], thr)
    # pyrit's human-rated answers pooled (every request harmful; only the answer differs), v0.3.14
    pyrit = np.char.startswith(src.astype(str), "pyrit_") & (src != "pyrit_many_shot_llm_judged")
    out["pyrit_human_rated_pooled"] = rates(s[pyrit], y[pyrit], thr)
    out["per_source"] = {so: rates(s[src == so], y[src == so], thr) for so in sorted(set(src))}
    trip = trip_tokens(pol_path, rule, "test", cut, thr)[(y == 1) & (s >= thr)]  # the flagged harmful answers
    lens = np.diff(test.offsets)[(y == 1) & (s >= thr)]
    out["tokens_read_when_tripped"] = {"median": float(np.median(trip)), "p90": float(np.quantile(trip, 0.9)),
                                       "median_share_of_reply": round(float(np.median(trip / lens)), 4),
                                       "n": len(trip)}
    for so in BLIND_SOURCES:
        m = src == so
        out[f"{so}_by_kind"] = {str(k): round(float(np.mean(s[m & (hk == k)] >= thr)), 4)
                                for k in sorted(set(hk[m])) if k}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--policy", type=Path, action="append", required=True)
    ap.add_argument("--score-on", choices=tuple(CUTS), default="cut",
                    help="replies cut to 400 characters (the caches up to v0.3.7) or 'whole' (as served)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    doc = {p.name: report(p, args.score_on) for p in args.policy}
    for name, r in doc.items():
        print(f"== {name}: threshold (3% cal FPR, float32 caches) {r['threshold_float32']}")
        for key in ("test", "test_blocked_above", "test_without_held_out_sources", "held_out_sources_pooled",
                    "pyrit_human_rated_pooled", "tokens_read_when_tripped"):
            if key not in r:
                continue
            print(f"  {key:32s} {r[key]}")
        for so, v in r["per_source"].items():  # type: ignore[attr-defined]
            print(f"  {so:32s} {v}")
        for so in BLIND_SOURCES:
            print(f"  {so + ' flagged by kind':32s} {r[f'{so}_by_kind']}")
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
