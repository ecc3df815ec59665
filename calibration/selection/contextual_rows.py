#!/usr/bin/env python3
"""Training rows in HarmBench's contextual form (a pasted document, then a task about it), for a fit that adds them
(``FIT_SETS=requests.train.nopairs,wrapped.train,contextual.train fit_shipped.py ...``; v0.3.13, docs/results.md).

Passages: a middle paragraph (350-1100 characters, English) of WritingBench queries longer than 1,500 characters
(inspect_evals, a benign training source), none from a query whose cut form is in the cal or test split. Tasks:
``calibration/handwritten/experiments/contextual_tasks.tsv``, harmful task i and benign task i after passage i, so the
passage carries no label. Rendered as HarmBench's rows are (``context\\n\\ntask``).

    SELECTION_DTYPE=float32 python calibration/selection/contextual_rows.py [--name contextual.train]
"""

from __future__ import annotations

import argparse
import random
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "calibration"))
sys.path.insert(0, str(ROOT / "calibration" / "selection"))
sys.path.insert(0, str(ROOT))

from build_data import Sources, form_of, norm  # noqa: E402
from collect import cache_rows, read  # noqa: E402
from extra_rows import taken_texts  # noqa: E402

TASKS = ROOT / "calibration" / "handwritten" / "experiments" / "contextual_tasks.tsv"
_ASK = re.compile(r"(?i)^(please|i need|help me|as a|write|can you|i am|i'm)")


def passages(n: int, seed: int = 0) -> list[str]:
    src = Sources()
    path = src.inspect / "writingbench" / "benchmark_all.jsonl"
    held_heads = {norm(r["text"])[:80] for s in ("cal", "test")
                  for r in read(ROOT / "calibration" / "data" / f"harmful_requests.{s}.jsonl")}
    out = []
    for row in read(path):
        q = row["query"]
        if len(q) < 1500 or sum(c.isascii() for c in q) < 0.97 * len(q) or norm(q)[:80] in held_heads:
            continue
        paras = [p.strip() for p in re.split(r"\n", q) if 350 < len(p.strip()) < 1100 and p.isascii()]
        paras = [p for p in paras if not _ASK.match(p)]
        if paras:
            out.append(paras[len(paras) // 2])
    return random.Random(seed).sample(out, n)


def rows() -> list[dict[str, object]]:
    tasks = [ln.split("\t") for ln in TASKS.read_text(encoding="utf-8").split("\n") if ln.strip() and ln[0] != "#"]
    harmful = [t for t in tasks if t[0] == "harmful"]
    benign = [t for t in tasks if t[0] == "contrast"]
    taken = taken_texts()
    out: list[dict[str, object]] = []
    for p, (_, cat, h), (_, _, b) in zip(passages(len(harmful)), harmful, benign, strict=False):
        for text, label, category in ((f"{p}\n\n{h}", 1, cat), (f"{p}\n\n{b}", 0, "-")):
            assert norm(text) not in taken
            kind = "harmful" if label else "contrast"
            out.append({"text": text, "label": label, "source": f"handwritten_contextual_{kind}",
                        "form": form_of(text), "category": category})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", default="contextual.train")
    args = ap.parse_args()
    got = rows()
    print(f"{len(got)} rows ({sum(int(r['label']) for r in got)} harmful)")
    print(cache_rows(args.name, got, layers=(15, 18, 27)))


if __name__ == "__main__":
    main()
