"""The output guard behind a hosted model: ``SAEGuard(mode="output")`` over a labeled answer file, the path a
LangChain chain takes when another model wrote the answer (nothing can be steered, so a steer rule does its
``steer.scan_action``; default block).

    python benchmarks/output_scan.py --policy harmful-compliance --data calibration/data/answers_blind_5.jsonl \\
        [--limit N] [--by kind] [--max-response-chars 2000]

Per label (and per group of ``--by``): the share of answers blocked (replaced by the refusal) and the share let
through with a flag. Each row's verdict is checked against its rule score and threshold (what ``guardrails eval``
counts as firing), so the figures are ``eval``'s TPR / FPR reached through the product path. Last line: one JSON
object.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from guardrails.core.errors import GuardrailsError  # noqa: E402
from guardrails.integrations.langchain import SAEGuard  # noqa: E402
from guardrails.offline.labeled import load_labeled  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default="harmful-compliance", help="policy file or shipped name (output rules)")
    ap.add_argument("--data", default=str(ROOT / "calibration" / "data" / "answers_blind_5.jsonl"),
                    help="labeled answers: prompt, response, label")
    ap.add_argument("--limit", type=int, default=None, help="at most this many rows (stratified by label)")
    ap.add_argument("--by", default=None, help="also per group of this column (kind, source, category ...)")
    ap.add_argument("--max-response-chars", type=int, default=2000, help="cut answers to this many characters")
    args = ap.parse_args(argv)

    try:
        data = load_labeled(args.data, limit=args.limit, max_response_chars=args.max_response_chars)
        if data.responses is None:
            ap.error(f"--data {args.data}: no response column; the output guard scores answers")
        guard = SAEGuard.from_policy(args.policy, mode="output")
    except GuardrailsError as exc:  # a bad file, policy or model: the message names it
        ap.error(str(exc))
    rules = {r.id: r for r in guard.policy.rules if r.scope == "output"}
    groups = data.fields.get(args.by) if args.by and args.by not in ("source", "category") else (
        data.sources if args.by == "source" else data.categories if args.by == "category" else None)
    if args.by and groups is None:
        ap.error(f"--by {args.by}: no such column; columns: source, category, {', '.join(sorted(data.fields))}")
    counts: dict[str, dict[str, int]] = defaultdict(lambda: {"n": 0, "blocked": 0, "flagged": 0})
    mismatches = 0
    for i in tqdm(range(len(data)), desc="SAEGuard(output)", unit="answer"):
        _, meta = guard.check({"input": data.texts[i], "output": data.responses[i]})
        fires = any(meta["scores"].get(rid) is not None and meta["scores"][rid] >= r.threshold
                    for rid, r in rules.items())
        mismatches += int(fires != (meta["blocked"] or meta["flagged"]))
        keys = [f"label {int(data.labels[i])}"] + ([f"{args.by}={groups[i]}"] if groups is not None else [])
        for k in keys:
            counts[k]["n"] += 1
            counts[k]["blocked"] += int(meta["blocked"])
            counts[k]["flagged"] += int(meta["flagged"] and not meta["blocked"])
    print(f"{args.policy} through SAEGuard(mode='output') on {args.data} ({len(data)} rows)")
    for k in sorted(counts):
        c = counts[k]
        print(f"  {k:<32} n {c['n']:>4}  blocked {c['blocked'] / c['n']:6.1%}  passed with a flag "
              f"{c['flagged'] / c['n']:6.1%}")
    print(f"  rows whose verdict differs from score >= threshold: {mismatches}")
    out = {"policy": args.policy, "data": args.data, "rows": len(data), "mismatches": mismatches,
           "groups": {k: {**c, "blocked_share": c["blocked"] / c["n"], "flagged_share": c["flagged"] / c["n"]}
                      for k, c in sorted(counts.items())}}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
