"""Guard cost as the prompt grows (128 to 4096 tokens) and the SAE widens (16x to 64x), on real SAE shapes.

Times the SAE encode alone, on random weights shaped like the Qwen-Scope SAEs (and the bundled one):
``exact`` (all ``d_sae`` pre-activations, then TopK) vs ``watched`` (the rows of 10 features, ReLU).
Per token, and as a share of one forward of the model: measured for the bundled model (its forward
runs here at each length), estimated for the Qwen models as SAE FLOPs over ``2 x active parameters``
per token (attention left out, which overstates the guard's share at long prompts).

The encode works on chunks of 256 tokens and at most ``--token-cap`` tokens per length (its cost is
linear in tokens: no attention), so the largest layer (Qwen3.5-27B W80K: 5120 x 81920 encoder, 1.7 GB
in float32) stays under ~2.5 GB. ``--dtype bfloat16`` halves that.

    python benchmarks/scaling.py           # full
    python benchmarks/scaling.py --quick   # smoke test
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path
from typing import Any, NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util


class Shape(NamedTuple):
    name: str
    d_model: int
    d_sae: int
    k: int
    active_params: float
    """Nominal parameters used per token (from the model name / card; MoE: activated)."""


SHAPES = [
    Shape("SmolLM2-135M (bundled) 9K", 576, 9216, 50, 0.135e9),
    Shape("Qwen3-1.7B W32K", 2048, 32768, 50, 1.7e9),
    Shape("Qwen3.5-2B W32K", 2048, 32768, 50, 2.0e9),
    Shape("Qwen3-8B W64K", 4096, 65536, 50, 8.2e9),
    Shape("Qwen3.5-9B W64K", 4096, 65536, 50, 9.0e9),
    Shape("Qwen3.5-27B W80K", 5120, 81920, 50, 27e9),
    Shape("Qwen3-30B-A3B W32K", 2048, 32768, 50, 3.3e9),
    Shape("Qwen3-30B-A3B W128K", 2048, 131072, 100, 3.3e9),
    Shape("Qwen3.5-35B-A3B W128K", 2048, 131072, 100, 3.0e9),
]
CHUNK = 256
WATCHED = 10


def main() -> None:
    p = _util.parser(__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=None, help="prompt lengths (default 128..4096)")
    p.add_argument("--token-cap", type=int, default=None, help="tokens encoded per length (default 512, quick 64)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="SAE weight dtype")
    p.add_argument("--shapes", nargs="+", default=None, help="substrings of shape names to run (default: all)")
    p.add_argument("--no-model", action="store_true", help="skip timing the bundled model's forward")
    args = p.parse_args()
    _util.pin_threads(args.threads)
    quick = args.quick
    repeats = args.repeats or (1 if quick else 3)
    lengths = args.lengths or ([128, 256] if quick else [128, 512, 1024, 2048, 4096])
    cap = args.token_cap or (64 if quick else 512)
    dtype = getattr(torch, args.dtype)
    shapes = SHAPES[:2] if quick else SHAPES
    if args.shapes:
        shapes = [s for s in SHAPES if any(x.lower() in s.name.lower() for x in args.shapes)]

    forward = {} if args.no_model else model_forward_seconds(lengths, repeats, quick)
    rows, results = [], []
    for shape in shapes:
        g = torch.Generator().manual_seed(0)
        W = torch.empty(shape.d_sae, shape.d_model, dtype=dtype).normal_(generator=g).mul_(shape.d_model ** -0.5)
        b = torch.zeros(shape.d_sae, dtype=dtype)
        rows_idx = torch.randperm(shape.d_sae, generator=g)[:WATCHED]
        W_rows, b_rows = W[rows_idx].clone(), b[rows_idx].clone()
        for T in lengths:
            n = min(T, cap)
            x = torch.randn(n, shape.d_model, generator=g).to(dtype)

            def exact(x: torch.Tensor = x, shape: Shape = shape, W: torch.Tensor = W, b: torch.Tensor = b) -> None:
                with torch.inference_mode():
                    for c in range(0, x.shape[0], CHUNK):
                        torch.nn.functional.linear(x[c : c + CHUNK], W, b).topk(shape.k, dim=-1)

            def watched(x: torch.Tensor = x, W: torch.Tensor = W_rows, b: torch.Tensor = b_rows) -> None:
                with torch.inference_mode():
                    torch.relu(torch.nn.functional.linear(x, W, b))

            times = _util.interleaved({"exact": exact, "watched": watched}, repeats, warmup=1)
            flops_ratio = shape.d_model * shape.d_sae / shape.active_params
            for mode, ts in times.items():
                st = _util.stats(ts)
                per_tok = st["median"] / n
                per_tok_best = st["min"] / n
                fwd = forward.get(T)
                measured = per_tok / (fwd / T) if fwd and shape.name.startswith("SmolLM2") else None
                est = flops_ratio if mode == "exact" else shape.d_model * WATCHED / shape.active_params
                results.append({"shape": shape.name, "d_model": shape.d_model, "d_sae": shape.d_sae,
                                "width": shape.d_sae // shape.d_model, "k": shape.k, "mode": mode, "length": T,
                                "tokens_timed": n, "us_per_token_median": per_tok * 1e6,
                                "us_per_token_best": per_tok_best * 1e6, "prompt_ms": per_tok * T * 1e3,
                                "ratio_to_forward_measured": measured, "ratio_to_forward_flops": est,
                                "encoder_bytes": W.numel() * W.element_size() if mode == "exact"
                                else W_rows.numel() * W_rows.element_size()})
                rows.append([shape.name, f"{shape.d_sae // shape.d_model}x", mode, T, per_tok * 1e6, per_tok * T * 1e3,
                             measured if measured is not None else float("nan"), est])
        del W, b, W_rows, b_rows
        gc.collect()
    _util.table(f"SAE encode cost ({args.dtype}, {args.threads} threads, <= {cap} tokens timed per length)",
                ["shape", "width", "mode", "prompt tokens", "us/token", "prompt ms", "share of forward (measured)",
                 "share of forward (FLOPs)"], rows)
    if forward:
        _util.table("bundled model forward (full model, batch 1)", ["prompt tokens", "ms", "us/token"],
                    [[T, s * 1e3, s / T * 1e6] for T, s in forward.items()])
    _util.emit({
        "benchmark": "scaling",
        "quick": quick,
        "dtype": args.dtype,
        "token_cap": cap,
        "environment": _util.environment(args.threads),
        "model_forward_seconds": {str(k): v for k, v in forward.items()},
        "results": results,
        "peak_rss_bytes": _util.peak_rss_bytes(),
    }, args.json_out)


def model_forward_seconds(lengths: list[int], repeats: int, quick: bool) -> dict[int, float]:
    """Median seconds of one full forward of the bundled model over ``T`` tokens (batch 1)."""
    model, _tok = _util.load_bundled()
    out: dict[int, float] = {}
    g = torch.Generator().manual_seed(0)
    for T in lengths:
        ids = torch.randint(0, int(model.config.vocab_size), (1, T), generator=g)

        def fwd(ids: torch.Tensor = ids, model: Any = model) -> Any:
            with torch.inference_mode():
                return model(input_ids=ids, use_cache=False, logits_to_keep=1)

        times = _util.interleaved({"forward": fwd}, repeats, warmup=0 if quick else 1)["forward"]
        out[T] = _util.stats(times)["median"]
    del model
    gc.collect()
    return out


if __name__ == "__main__":
    main()
