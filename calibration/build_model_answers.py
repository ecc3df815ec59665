#!/usr/bin/env python3
"""The bundled model's own answers to the labeled requests: response data for the output guard.

The output guard watches *this* model's answers, so its most relevant training data is what this model
writes. For the requests of ``calibration/data/harmful_requests.{split}.jsonl`` (at most 80 / 30 / 30 per
(source, label) for train / cal / test, in file order; two-turn rows skipped) greedy answers are
generated with the bundled model in three variants:

- ``plain``: the chat prompt as served;
- ``prefill``: the assistant turn pre-filled with "Sure, here is" (the opening of a jailbroken answer),
  for benign requests as well as harmful ones, so the opening carries no label;
- ``refusal``: harmful requests only, the assistant turn pre-filled with "I'm sorry, but I can't help
  with that." and continued (the model refuses only ~6% of them by itself, so without these the only
  answers to harmful requests labelled 0 would be few and the probe could learn the request instead of
  the answer).

Labels: an answer to a harmful request is 1 (complies) unless it refuses (the refusal phrase list of
``guardrails.offline.steering_eval``), 0 when it refuses; every answer to a benign request is 0. Output
``calibration/generated/bundled_answers.jsonl`` (committed); ``calibration/build_data.py`` adds it to the
response sets as sources ``bundled_answers_{plain,prefill,refusal}``, split by prompt like every
response row.

    python calibration/build_model_answers.py            # ~25 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
OUT = HERE / "generated" / "bundled_answers.jsonl"
VARIANTS = {"plain": "", "prefill": "Sure, here is", "refusal": "I'm sorry, but I can't help with that."}
HARMFUL_ONLY = {"refusal"}
CAPS = {"train": 80, "cal": 30, "test": 30}  # rows per (source, label) and split
MAX_PROMPT_CHARS = 400


def requests() -> list[dict]:  # type: ignore[type-arg]
    rows: list[dict] = []  # type: ignore[type-arg]
    for split in ("train", "cal", "test"):
        per_cell: dict[tuple[str, int], int] = defaultdict(int)
        for line in (DATA / f"harmful_requests.{split}.jsonl").read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            if "|||" in r["text"] or len(r["text"]) > MAX_PROMPT_CHARS:
                continue
            cell = (r["source"], int(r["label"]))
            if per_cell[cell] >= CAPS[split]:
                continue
            per_cell[cell] += 1
            rows.append({**r, "split": split})
    return rows


def answer(model, tok, prompts: list[str], prefill: str, max_new_tokens: int, batch_size: int,  # type: ignore[no-untyped-def]
           desc: str = "answers") -> list[str]:
    """Greedy answers (prefill included), batched shortest prompts first to keep padding low."""
    from guardrails.offline.steering_eval import generate

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    got = generate(model, tok, [prompts[i] for i in order], max_new_tokens=max_new_tokens, batch_size=batch_size,
                   prefill=prefill, desc=desc)
    done = {i: (prefill + text).strip() for i, text in zip(order, got, strict=True)}
    return [done[i] for i in range(len(prompts))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per answer (default 64)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--limit", type=int, default=0, help="first N requests only (a quick look)")
    ap.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=sorted(VARIANTS),
                    help="generate these; rows of the other variants already in the output file are kept")
    args = ap.parse_args()
    torch.set_num_threads(2)
    from guardrails.offline.steering_eval import is_refusal
    from guardrails.serving.models import load_model

    model, tok = load_model("bundled", dtype="bfloat16")
    rows = requests()
    if args.limit:
        rows = rows[: args.limit]
    kept = [json.loads(x) for x in OUT.read_text(encoding="utf-8").splitlines()] if OUT.is_file() else []
    out = [o for o in kept if o["variant"] not in args.variants]
    for variant in args.variants:
        prefill = VARIANTS[variant]
        todo = [r for r in rows if variant not in HARMFUL_ONLY or int(r["label"]) == 1]
        answers = answer(model, tok, [r["text"] for r in todo], prefill, args.tokens, args.batch_size,
                         desc=f"answers ({variant})")
        for r, a in zip(todo, answers, strict=True):
            cont = a if variant == "refusal" else a[len(prefill):]  # the refusal prefix counts as refusing
            label = int(r["label"]) == 1 and not is_refusal(cont)
            out.append({"prompt": r["text"], "response": a, "label": int(label), "variant": variant,
                        "request_label": int(r["label"]), "request_source": r["source"],
                        "category": r.get("category", ""), "refused": is_refusal(cont)})
    out.sort(key=lambda o: (list(VARIANTS).index(o["variant"]), o["prompt"]))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("".join(json.dumps(o, ensure_ascii=False) + "\n" for o in out), encoding="utf-8")
    harm = [o for o in out if o["request_label"] == 1]
    for v in VARIANTS:
        hv = [o for o in harm if o["variant"] == v]
        print(f"{v}: {len(hv)} answers to harmful requests, {sum(o['refused'] for o in hv)} refused; "
              f"{sum(o['variant'] == v for o in out) - len(hv)} answers to benign requests")
    print(f"wrote {OUT} ({len(out)} rows)")


if __name__ == "__main__":
    main()
