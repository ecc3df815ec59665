"""French-vs-English contrastive directions at several early-middle layers (language steering).

    python calibration/directions/build_french.py [--generate] [--layers 6 9 12]

Data: french.train.jsonl, the bundled model's own greedy answers (40 new tokens) to benign prompts of
calibration/data/harmful_requests.train.jsonl (< 200 characters, every 3rd, first 90; the test split
stays held out for benchmarks/steering.py), once as asked and once with "Réponds en français." appended.
A prompt is kept when the instructed answer is French and the plain one is not (``is_french``); both
answers are then stored after the *plain* prompt, label 1 (French) and 0 (English), so the direction is
"the same request, answered in French rather than English" (a contrastive direction: mean residual over
the continuation tokens, French minus English). ``--generate`` rewrites the data file.

Writes ``french-l<L>.safetensors`` + record per layer (held-out AUROC on every 5th prompt's pair).
benchmarks/steering.py adds them together at their own layers (one :class:`Steer` per layer).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
HERE = Path(__file__).resolve().parent
DATA = HERE / "french.train.jsonl"
INSTRUCTION = "\n\nRéponds en français."


def prompts() -> list[str]:
    rows = [json.loads(x) for x in (ROOT / "calibration/data/harmful_requests.train.jsonl").read_text().splitlines()
            if x.strip()]
    benign = [r["text"] for r in rows if r["label"] == 0 and len(r["text"]) < 200]
    return benign[::3][:90]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--generate", action="store_true", help="regenerate french.train.jsonl")
    ap.add_argument("--layers", type=int, nargs="+", default=[6, 9, 12])
    args = ap.parse_args()
    torch.set_num_threads(2)
    from guardrails.offline.directions import Direction, build_directions, save_direction
    from guardrails.offline.steering_eval import generate, is_french
    from guardrails.serving.models import load_model

    model, tok = load_model()
    if args.generate or not DATA.is_file():
        ps = prompts()
        fr = generate(model, tok, [p + INSTRUCTION for p in ps], max_new_tokens=40)
        en = generate(model, tok, ps, max_new_tokens=40)
        kept = [(p, a, b) for p, a, b in zip(ps, fr, en, strict=True) if is_french(a) and not is_french(b)]
        DATA.write_text("".join(json.dumps({"prompt": p, "response": r, "label": y}, ensure_ascii=False) + "\n"
                                for p, a, b in kept for r, y in ((a, 1), (b, 0))), encoding="utf-8")
        print(f"{len(kept)} of {len(ps)} prompts answered in French when asked and in English otherwise")
    dirs = build_directions(model, tok, DATA, kind="contrastive", layers=args.layers, holdout=5)
    for layer, d in dirs.items():
        d = Direction(d.vector, dataclasses.replace(d.record, data=str(DATA.relative_to(ROOT))))
        save_direction(d, HERE / f"french-l{layer}")
        print(f"layer {layer}: {d.record.n_positive} pairs; held out {d.record.n_heldout} rows: "
              f"AUROC {d.record.heldout_auroc}, gap {d.record.heldout_gap} x norm")


if __name__ == "__main__":
    main()
