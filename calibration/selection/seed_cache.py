#!/usr/bin/env python3
"""Copy residuals collect.py gathered (bfloat16 model) into the activation cache ``guardrails calibrate``
and ``eval`` read (``guardrails.offline.calibrate.residuals``), keyed exactly as they key a bfloat16 run,
so a ``--dtype bfloat16`` calibration does not run the model again. bfloat16 values are exact in float16.

    python calibration/selection/seed_cache.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from collect import DATA, LAYERS, out_dir  # noqa: E402

from guardrails.offline.calibrate import load_labeled  # noqa: E402
from guardrails.offline.residuals import cache_path  # noqa: E402

FILES = {"requests.train": ("harmful_requests.train.jsonl", None), "requests.cal": ("harmful_requests.cal.jsonl", None),
         "requests.test": ("harmful_requests.test.jsonl", None),
         "wrapped.train": ("jailbreak_wrapped.train.jsonl", None), "wrapped.cal": ("jailbreak_wrapped.cal.jsonl", None),
         "wrapped.test": ("jailbreak_wrapped.test.jsonl", None), "over_refusal": ("over_refusal.jsonl", None),
         "reserved_past": ("reserved_eval/phrasing_past_tense.jsonl", 150),
         "reserved_future": ("reserved_eval/phrasing_future_tense.jsonl", 150),
         **{f"eval.{f.stem}": (f"eval/{f.name}", None) for f in sorted((DATA / "eval").glob("*.jsonl"))}}


def main() -> None:
    from transformers import AutoTokenizer

    from guardrails.offline.activations import system_prefix_tokens
    from guardrails.serving.models import bundled_model_path

    tok = AutoTokenizer.from_pretrained(str(bundled_model_path()))
    special = set(tok.all_special_ids)
    skip = system_prefix_tokens(tok)
    prompt = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    # collect.py's rows were gathered before the default system turn stopped being scored: drop its tokens
    drop = sum(1 for j in range(1, skip) if ids[j] not in special)
    print("dropping", drop, "system-prompt tokens per row")
    for name, (fname, limit) in FILES.items():
        meta_p = out_dir() / f"{name}.json"
        if not meta_p.is_file():
            continue
        data = load_labeled(DATA / fname, limit=limit)
        meta = json.loads(meta_p.read_text())
        n_drop = drop if meta.get("system_turn_scored", True) else 0
        assert len(meta["rows"]) == len(data)
        assert all(r["text"] == t for r, t in zip(meta["rows"], data.texts, strict=True))
        for layer in LAYERS:
            path = cache_path(data.sha256, "bundled", layer, "input", True, "bfloat16")
            if path.is_file() or not (out_dir() / f"{name}.L{layer}.npy").is_file():
                continue
            x = np.load(out_dir() / f"{name}.L{layer}.npy")
            off = np.asarray(meta["offsets"])
            keep = np.concatenate([np.arange(off[i] + min(n_drop, off[i + 1] - off[i]), off[i + 1])
                                   for i in range(len(off) - 1)])
            lens = [max(0, off[i + 1] - off[i] - n_drop) for i in range(len(off) - 1)]
            xt = torch.from_numpy(x[keep].astype(np.float32))
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({"x": xt.contiguous(), "offsets": torch.tensor(np.cumsum([0, *lens]))}, str(path),
                      metadata={"data": str(DATA / fname), "model": "bundled", "layer": str(layer), "scope": "input"})
            print("seeded", fname, layer, path.name)


if __name__ == "__main__":
    main()
