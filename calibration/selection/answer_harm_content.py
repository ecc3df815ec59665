#!/usr/bin/env python3
"""v0.3.14's experiment (measured, not shipped): does the request probe, run over the *answer's* tokens, tell an
off-target answer (it opens like compliance and delivers nothing harmful) from a harmful one?

The output guard's gated score (``min(answer score, scale * request score + offset)``, as served) beside the
shipped gate rule's request probe scored over the reply tokens (``harm in the answer``, window 16), and two ways to
combine them, each thresholded at 3% FPR on the cal split: a second cap ``min(gated, s * harm + o)`` with ``s, o``
from the harmless cal answers and a slack of ``k`` standard deviations (``gate_from_scores``, as the request gate
is fitted), and a logistic regression on the two scores fitted on the cal split. Scored on the response test split
(per family) and blind answer set 5 (evaluation only; its off-target answers' flagged share). First, whether the
opening decides: the served window's front is partial (the first reply tokens average what they have), so the gated
score is recomputed over windows of at least ``m`` tokens (the whole reply when shorter).

    SELECTION_DTYPE=float32 python calibration/selection/collect.py --layers=12,15,18 responses_full.cal \\
        responses_prompts.cal responses_full.test responses_prompts.test answers_blind_5 answers_blind_5_prompts
    SELECTION_DTYPE=float32 python calibration/selection/answer_harm_content.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from heldout import Scorer  # noqa: E402
from select_detectors import Set, auroc  # noqa: E402

from guardrails.core.policy import Policy  # noqa: E402
from guardrails.offline.calibrate import fit_threshold  # noqa: E402
from guardrails.offline.scoring import gate_from_scores  # noqa: E402

POLICY = HERE.parents[1] / "policies" / "harmful-compliance.yaml"
SETS = {"cal": ("responses_full.cal", "responses_prompts.cal"),
        "test": ("responses_full.test", "responses_prompts.test"),
        "blind5": ("answers_blind_5", "answers_blind_5_prompts")}


def min_front(scorer: Scorer, d: Set, m: int) -> np.ndarray:
    """Per row: the highest mean over the scorer's window, counting only windows of at least ``m`` tokens."""
    tok, off, w = scorer.tokens(d), d.offsets, scorer.window
    out = np.empty(len(off) - 1)
    for i in range(len(out)):
        t = tok[off[i]:off[i + 1]]
        cs, end = np.r_[0.0, np.cumsum(t)], np.arange(1, len(t) + 1)
        start = np.maximum(0, end - w)
        means = (cs[end] - cs[start]) / (end - start)
        out[i] = means[(end - start) >= min(m, len(t))].max()
    return out


def main() -> None:
    gate = Policy.from_path(POLICY).rules[0].gate
    assert gate is not None
    answer, request = Scorer(POLICY, rule="harmful-compliance"), Scorer(POLICY, rule="harmful-request")
    got = {}
    for name, (ans, prompts) in SETS.items():
        d = Set(ans)
        gated = np.minimum(answer.rows(d), gate.scale * request.rows(Set(prompts)) + gate.offset)
        got[name] = (d, gated, request.rows(d))  # the request probe over the reply tokens: harm in the answer
    (dc, gc, hc), (dt, gt, ht), (d5, g5, h5) = got["cal"], got["test"], got["blind5"]
    src, yt, y5 = np.array(dt.sources), dt.labels, d5.labels
    kinds = np.array([r["kind"] for r in d5.rows])
    many = src == "pyrit_many_shot_llm_judged"
    fams = {"test": np.ones(len(yt), bool), "many-shot": many,
            "pyrit human-rated": np.char.startswith(src.astype(str), "pyrit_") & ~many,
            "blind 3": src == "blind_responses_3", "blind 4": src == "blind_responses_4"}

    def report(name: str, sc: np.ndarray, st: np.ndarray, s5: np.ndarray) -> None:
        thr = fit_threshold(sc, dc.labels, target_fpr=0.03)
        cells = [f"{k} {auroc(st[m & (yt == 1)], st[m & (yt == 0)]):.3f}" for k, m in fams.items()]
        print(f"{name:24s} {' | '.join(cells)} | test flagged {np.mean(st[yt == 1] >= thr):.3f} at "
              f"{np.mean(st[yt == 0] >= thr):.3f} | blind 5 {auroc(s5[y5 == 1], s5[y5 == 0]):.3f}, flagged "
              f"{np.mean(s5[y5 == 1] >= thr):.2f} at {np.mean(s5[y5 == 0] >= thr):.2f}, off-target "
              f"{np.mean(s5[kinds == 'off_target'] >= thr):.2f}", flush=True)

    for name, (d, gated, harm) in got.items():
        print(f"{name}: AUROC gated {auroc(gated[d.labels == 1], gated[d.labels == 0]):.3f}, harm in the answer "
              f"{auroc(harm[d.labels == 1], harm[d.labels == 0]):.3f}")
    print("blind 5, mean score per kind (gated / harm in the answer):",
          {k: (round(float(g5[kinds == k].mean()), 2), round(float(h5[kinds == k].mean()), 2))
           for k in sorted(set(kinds.tolist()))})
    report("shipped (gated)", gc, gt, g5)
    for m in (4, 8, 16, 32):  # only windows of at least m reply tokens count
        got_m = [np.minimum(min_front(answer, Set(SETS[k][0]), m), gate.scale * request.rows(Set(SETS[k][1]))
                            + gate.offset) for k in ("cal", "test", "blind5")]
        report(f"windows >= {m} tokens", *got_m)
    for k in (0.5, 1.0, 2.0, 3.0):
        s, o = gate_from_scores(gc, hc, dc.labels, k)
        report(f"second cap, slack {k:g}", np.minimum(gc, s * hc + o), np.minimum(gt, s * ht + o),
               np.minimum(g5, s * h5 + o))
    from sklearn.linear_model import LogisticRegression

    lr = LogisticRegression(C=1.0).fit(np.c_[gc, hc], dc.labels)
    report("logistic(gated, harm)", *(lr.decision_function(np.c_[g, h]) for g, h in ((gc, hc), (gt, ht), (g5, h5))))


if __name__ == "__main__":
    main()
