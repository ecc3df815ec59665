#!/usr/bin/env python3
"""Short jailbreak framings for the ``jailbreak-framing`` probe (v0.3.13 experiment, docs/results.md).

The shipped framing probe was fitted on pyrit's templates (hundreds of tokens) and catches 94.7% of the in-the-wild
templates, but not a two-sentence "You are DAN ... DAN, <request>". ``short_framings.tsv`` holds hand-written short
framings and benign persona/role-play requests ("Pretend you are a pirate ..."), split into train and eval rows.

- ``cache``: the train framings, each around one harmful and one benign request of the train split (``template`` set,
  so the framing fit reads them as wrapped), and the train personas (plain), cached as the selection set
  ``framing.train`` for ``FRAMING_SETS=requests.train,wrapped.train,framing.train fit_shipped.py jailbreak``.
- ``eval --out FILE``: the eval framings around one harmful and one benign request of the test split (label 1: framed)
  and the eval personas (label 0), as a labeled JSONL for ``guardrails eval --rule jailbreak-framing``.

    SELECTION_DTYPE=float32 python calibration/selection/framing_rows.py cache
    python calibration/selection/framing_rows.py eval --out /tmp/framing_eval.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "calibration"))
sys.path.insert(0, str(ROOT / "calibration" / "selection"))
sys.path.insert(0, str(ROOT))

TSV = ROOT / "calibration" / "handwritten" / "experiments" / "short_framings.tsv"


def read(split: str) -> tuple[list[str], list[str]]:
    rows = [ln.split("\t") for ln in TSV.read_text(encoding="utf-8").split("\n") if ln.strip() and ln[0] != "#"]
    return ([t for s, k, t in rows if s == split and k == "framing"],
            [t for s, k, t in rows if s == split and k == "persona"])


def requests(split: str) -> tuple[list[str], list[str]]:
    """Short plain requests of a split (no template, under 200 characters): (harmful, benign)."""
    from collect import read

    rows = read(ROOT / "calibration" / "data" / f"harmful_requests.{split}.jsonl")
    short = [r for r in rows if len(r["text"]) < 200]
    return [r["text"] for r in short if r["label"] == 1], [r["text"] for r in short if r["label"] == 0]


def fill(template: str, request: str) -> str:
    return template.replace("{prompt}", request[0].lower() + request[1:] if template.rstrip().endswith(",")
                            or template.endswith(", {prompt}") else request)


def rows(split: str, data_split: str, seed: int = 0) -> list[dict[str, object]]:
    framings, personas = read(split)
    harmful, benign = requests(data_split)
    rng = random.Random(seed)
    out: list[dict[str, object]] = []
    for i, f in enumerate(framings):
        for label, pool in ((1, harmful), (0, benign)):
            out.append({"text": fill(f, rng.choice(pool)), "label": label, "source": f"short_framing_{split}",
                        "template": f"short_{split}_{i}"})
    out += [{"text": p, "label": 0, "source": f"persona_{split}"} for p in personas]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cmd", choices=("cache", "eval"))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.cmd == "cache":
        from collect import cache_rows

        got = rows("train", "train")
        print(len(got), cache_rows("framing.train", got, layers=(15, 18, 27)))
    else:
        if args.out is None:
            raise SystemExit("framing_rows.py eval: give --out FILE")
        got = [{"text": r["text"], "label": int("template" in r), "source": r["source"]} for r in rows("eval", "test")]
        args.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in got), encoding="utf-8")
        print(f"{len(got)} rows -> {args.out}")


if __name__ == "__main__":
    main()
