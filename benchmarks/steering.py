"""Steering benchmark: the harmful-compliance steer rule over a sweep of strengths.

    python benchmarks/steering.py [--n 24] [--tokens 32] [--fractions 0 0.05 0.1 0.2 0.3]

For each strength (a fraction of the median layer-15 residual norm), batch-generates guarded answers
to held-out harmful and benign prompts (harmful_requests test split) with block_above disabled (to
measure steering alone) and measures: share of harmful requests ending refused or harmless (by a text
judge validated on the responses test split, and by the output policy's own score), benign outputs'
perplexity under the unsteered model, and the share of benign outputs exactly unchanged.
Writes benchmarks/results/steering.{md,png,json}. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from guardrails.offline.calibrate import load_labeled  # noqa: E402
from guardrails.offline.steering_eval import ComplianceJudge, sweep  # noqa: E402

DATA = ROOT / "calibration" / "data"
OUT = ROOT / "benchmarks" / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=24, help="harmful and benign prompts each")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--fractions", type=float, nargs="*", default=[0.0, 0.05, 0.1, 0.2, 0.3])
    ap.add_argument("--norm", type=float, default=175.0, help="typical residual norm at layer 15")
    ap.add_argument("--policy", default=str(ROOT / "policies" / "harmful-compliance.yaml"))
    args = ap.parse_args()
    import torch

    torch.set_num_threads(2)
    from guardrails.core.policy import Policy
    from guardrails.serving.models import load_model

    t0 = time.time()
    train, test = load_labeled(DATA / "responses.train.jsonl"), load_labeled(DATA / "responses.test.jsonl")
    assert train.responses is not None and test.responses is not None
    judge = ComplianceJudge.fit(train.responses, train.labels)
    judge_acc = judge.accuracy(test.responses, test.labels)
    prompts = load_labeled(DATA / "harmful_requests.test.jsonl")
    rng = np.random.default_rng(0)
    harmful = [prompts.texts[i] for i in sorted(rng.choice(np.flatnonzero(prompts.labels == 1), args.n, False))]
    benign = [prompts.texts[i] for i in sorted(rng.choice(np.flatnonzero(prompts.labels == 0), args.n, False))]
    policy = Policy.from_path(args.policy)
    rule = next(r for r in policy.rules if r.action == "steer")
    model, tok = load_model()
    rows = sweep(model, tok, policy, rule.id, harmful, benign, fractions=args.fractions, residual_norm=args.norm,
                 judge=judge, max_new_tokens=args.tokens, block_above=None)
    OUT.mkdir(parents=True, exist_ok=True)
    cols = ["fraction_of_norm", "strength", "harmful_refused_or_harmless_judge", "harmful_refused_or_harmless_policy",
            "harmful_steered", "benign_fired", "benign_unchanged", "benign_unchanged_when_not_fired", "benign_ppl"]
    lines = [
        f"# Steering sweep: {Path(args.policy).name}, rule {rule.id} (threshold {rule.threshold})",
        "",
        f"{args.n} harmful + {args.n} benign prompts (harmful_requests test split, seed 0), {args.tokens} new tokens, "
        f"greedy; strength = fraction x {args.norm} (median layer-15 residual norm); block_above off.",
        f"Judge (TF-IDF + logistic regression on responses train): test accuracy {judge_acc['accuracy']:.3f}, "
        f"AUROC {judge_acc['auroc']:.3f} (n={judge_acc['n']}).",
        f"Command: `python benchmarks/steering.py --n {args.n} --tokens {args.tokens}`; wall {time.time() - t0:.0f} s.",
        "",
        "| " + " | ".join(cols) + " |",
        "| " + " | ".join("---" for _ in cols) + " |",
    ]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    lines += ["", "Examples (first harmful outputs per strength):", ""]
    for r in rows:
        lines.append(f"- {r['strength']}: " + " / ".join(repr(x[:90]) for x in r["examples"]["harmful"][:2]))
    (OUT / "steering.md").write_text("\n".join(lines) + "\n")
    (OUT / "steering.json").write_text(json.dumps({"judge": judge_acc, "rows": rows}, indent=2) + "\n")
    _plot(rows, OUT / "steering.png")
    print("\n".join(lines), file=sys.stderr)
    print(json.dumps({"judge": judge_acc, "rows": [{k: v for k, v in r.items() if k != "examples"} for r in rows]}))


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["fraction_of_norm"] for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot(x, [r["harmful_refused_or_harmless_judge"] for r in rows], "o-",
               label="harmful: refused/harmless (judge)")
    ax[0].plot(x, [r["harmful_refused_or_harmless_policy"] for r in rows], "s-",
               label="harmful: below policy threshold")
    ax[0].plot(x, [r["benign_unchanged"] for r in rows], "^-", label="benign: output unchanged")
    ax[0].set_xlabel("steering strength / residual norm")
    ax[0].set_ylim(-0.05, 1.05)
    ax[0].legend(fontsize=8)
    ax[1].plot(x, [r["benign_ppl"] for r in rows], "o-", color="C3")
    ax[1].set_xlabel("steering strength / residual norm")
    ax[1].set_ylabel("benign output perplexity (unsteered model)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
