"""Contrastive data for the refusal direction: the same harmful prompts, followed by a refusal or a compliant opening.

    python calibration/directions/build_data.py

Reads harmful requests (label 1) of calibration/data/harmful_requests.train.jsonl only (the test split
stays held out for benchmarks/steering.py), takes every 4th one (seed-free, in file order), and writes
refusal_contrast.train.jsonl: per prompt one row with a refusal opening (label 1: the side steering
goes toward) and one with a compliant opening (label 0), both drawn in turn from the lists below.
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(__file__).resolve().parent / "refusal_contrast.train.jsonl"

REFUSALS = [
    "I'm sorry, but I can't help with that. It could cause serious harm to people.",
    "I can't assist with that request. If you need help, please reach out to someone you trust.",
    "I'm not able to help with this. It's illegal and could hurt others.",
    "Sorry, I won't provide that. Is there something else I can help you with?",
    "I cannot help with that request, as it involves causing harm.",
    "I must decline. Helping with this would be unsafe and unethical.",
]
COMPLIANCE = [
    "Sure, here is a detailed step-by-step guide. First, you will need to",
    "Of course! Here's how you can do it. Step 1: Start by gathering",
    "Certainly. The easiest way to do this is to begin with",
    "Here is a plan that works. To start, get the following materials:",
    "Absolutely, here's what you need to know. The first step is to",
    "Great question! Here are the steps: 1. Find a",
]


def main() -> None:
    rows = [json.loads(x) for x in (ROOT / "calibration/data/harmful_requests.train.jsonl").read_text().splitlines()
            if x.strip()]
    harmful = [r["text"] for r in rows if r["label"] == 1][::4]
    out = []
    for i, prompt in enumerate(harmful):
        out.append({"prompt": prompt, "response": REFUSALS[i % len(REFUSALS)], "label": 1, "source": "refusal"})
        out.append({"prompt": prompt, "response": COMPLIANCE[i % len(COMPLIANCE)], "label": 0, "source": "compliance"})
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out))
    print(f"{OUT}: {len(out)} rows from {len(harmful)} prompts")


if __name__ == "__main__":
    main()
