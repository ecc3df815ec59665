"""Guarded vs unguarded vLLM throughput on the bundled model, batch 1 and 8, measured in one run.

One engine (eager, in-process) serves both variants: unguarded requests are plain ``llm.generate``
calls (no guard settings, so the hooks skip them), guarded ones go through ``GuardedVLLM.generate``
with a shipped policy whose rules do not fire on these benign prompts; the guarded output must equal
the unguarded one token for token (checked: the benchmark fails otherwise). Rounds are interleaved
(see ``_util.interleaved``: every round runs both, order rotated), and each round's guarded/unguarded
ratio is paired (same round, same load). Tokens/s counts released output tokens. Target:
guarded/unguarded >= 0.95 at batch 8.

Prefix caching is off by default: every round repeats the same prompts, so with it on only the
unguarded requests would skip their prefill from the second round on (guarded requests never read the
cache: cached tokens would go unscored), which measures the benchmark's repetition, not the guard;
``--prefix-caching`` measures that case. Run with the vLLM venv's python (``bash scripts/install_vllm.sh``):

    /opt/venvs/vllm/bin/python benchmarks/vllm_throughput.py              # 64 new tokens, 5 rounds
    /opt/venvs/vllm/bin/python benchmarks/vllm_throughput.py --quick      # smoke test
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = _util.GENERATION_PROMPTS


def main() -> None:
    p = _util.parser(__doc__.splitlines()[0])
    p.add_argument("--policy", default=str(ROOT / "policies" / "harmful-requests.yaml"), help="policy YAML")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens per request (default 64, quick 8)")
    p.add_argument("--batches", type=int, nargs="+", default=None, help="batch sizes (default 1 8)")
    p.add_argument("--prefix-caching", action="store_true", help="leave vLLM's prefix cache on (see above)")
    args = p.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CACHE_ROOT", tempfile.mkdtemp(prefix="vllm-cache-"))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from guardrails.vllm import GuardedVLLM

    n_new = args.new_tokens or (8 if args.quick else 64)
    repeats = args.repeats or (1 if args.quick else 5)
    batches = args.batches or [1, 8]
    guard = GuardedVLLM({"max_model_len": 512, "max_num_seqs": max(batches), "dtype": "float32",
                         "gpu_memory_utilization": 0.1, "seed": 0, "enable_prefix_caching": args.prefix_caching},
                        args.policy)
    tok = guard.tokenizer

    def unguarded(prompts: list[str]) -> list[list[int]]:
        ids = [tok(guard.format_prompt(q), add_special_tokens=False)["input_ids"] for q in prompts]
        outs = guard.llm.generate([TokensPrompt(prompt_token_ids=i) for i in ids],
                                  SamplingParams(max_tokens=n_new, temperature=0.0), use_tqdm=False)
        return [_util.until_eos(list(o.outputs[0].token_ids), guard._eos_ids) for o in outs]

    def guarded(prompts: list[str]) -> list[list[int]]:
        out = guard.generate(prompts, max_new_tokens=n_new)
        return [r.output_ids for r in (out if isinstance(out, list) else [out])]

    rows: list[list[Any]] = []
    result: dict[str, Any] = {"policy": guard.default_policy, "new_tokens": n_new, "repeats": repeats,
                              "prefix_caching": args.prefix_caching, "self_check_error": guard.self_check_error,
                              "runner": guard.setup_info["runner"], "load_before": os.getloadavg()[0]}
    for batch in batches:
        prompts = (PROMPTS * (batch // len(PROMPTS) + 1))[:batch]
        plain, held = unguarded(prompts), guarded(prompts)  # also the warm-up of both
        if plain != held:
            raise SystemExit(f"batch {batch}: guarded output differs from unguarded vLLM (a rule fired or rows mixed)")
        probe = guard.generate(prompts, max_new_tokens=2)
        if any(r.blocked or r.decisions for r in (probe if isinstance(probe, list) else [probe])):
            raise SystemExit(f"batch {batch}: the policy fired on the benchmark prompts; pick one that does not")
        n_tokens = sum(len(t) for t in plain)
        def run_plain(q: list[str] = prompts) -> None:
            unguarded(q)

        def run_guarded(q: list[str] = prompts) -> None:
            guarded(q)

        times = _util.interleaved({"unguarded": run_plain, "guarded": run_guarded}, repeats, warmup=0)
        paired = [u / g for u, g in zip(times["unguarded"], times["guarded"], strict=True)]
        st = {k: _util.stats(v) for k, v in times.items()}
        tps = {k: n_tokens / s["median"] for k, s in st.items()}
        entry = {"tokens": n_tokens, "tokens_per_s_unguarded": tps["unguarded"], "tokens_per_s_guarded": tps["guarded"],
                 "ratio_of_medians": tps["guarded"] / tps["unguarded"], "ratio_of_minimums": st["unguarded"]["min"]
                 / st["guarded"]["min"], "paired_ratio_median": statistics.median(paired),
                 "paired_ratio_range": [min(paired), max(paired)], "paired_ratios": paired,
                 "seconds": {k: {**s, "max": max(times[k]), "all": times[k]} for k, s in st.items()}}
        result[f"batch{batch}"] = entry
        rows.append([batch, n_tokens, tps["unguarded"], tps["guarded"], entry["ratio_of_medians"],
                     entry["paired_ratio_median"], f"{min(paired):.3f}-{max(paired):.3f}", entry["ratio_of_minimums"]])
    _util.table(f"vLLM (CPU, eager) guarded vs unguarded, {n_new} new tokens, {repeats} rounds, policy "
                f"{guard.default_policy}, prefix caching {'on' if args.prefix_caching else 'off'}",
                ["batch", "tokens", "unguarded tok/s (median)", "guarded tok/s (median)", "ratio of medians",
                 "paired ratio (median)", "paired range", "ratio of minimums"], rows)
    if "batch8" in result:
        result["target_batch8"] = 0.95
        result["meets_target"] = result["batch8"]["paired_ratio_median"] >= 0.95
    result["environment"] = _util.environment(int(os.environ.get("OMP_NUM_THREADS", "0") or 0))
    _util.emit(result, args.json_out)


if __name__ == "__main__":
    main()
