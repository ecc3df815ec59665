"""Guarded vs unguarded vLLM throughput on the bundled model, batch 1 and 8, measured in one run.

One engine (eager, in-process) serves both variants: unguarded requests are plain ``llm.generate``
calls (no guard settings, so the hooks skip them), guarded ones go through ``GuardedVLLM.generate``
with a shipped policy whose rules do not fire on these benign prompts; the guarded output must equal
the unguarded one token for token (checked: the benchmark fails otherwise). Rounds are interleaved
(see ``_util.interleaved``); tokens/s counts released output tokens. Target: guarded/unguarded >= 0.95
at batch 8. Run with the vLLM venv's python (``bash scripts/install_vllm.sh``):

    /opt/venvs/vllm/bin/python benchmarks/vllm_throughput.py            # 64 new tokens, 3 rounds
    /opt/venvs/vllm/bin/python benchmarks/vllm_throughput.py --quick    # smoke test
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in detail how a bicycle works, part by part.",
    "Describe a walk through a busy market in a city you like.",
    "Write a detailed recipe for vegetable soup with every step.",
    "Tell me the history of the printing press in several paragraphs.",
    "Write a letter to a friend describing your last holiday.",
    "Explain how rain forms, from evaporation to the storm.",
    "Describe how to plant and care for a small vegetable garden.",
]


def main() -> None:
    p = _util.parser(__doc__.splitlines()[0])
    p.add_argument("--policy", default=str(ROOT / "policies" / "harmful-requests.yaml"), help="policy YAML")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens per request (default 64, quick 8)")
    args = p.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CACHE_ROOT", tempfile.mkdtemp(prefix="vllm-cache-"))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from guardrails.vllm import GuardedVLLM

    n_new = args.new_tokens or (8 if args.quick else 64)
    repeats = args.repeats or (1 if args.quick else 3)
    guard = GuardedVLLM({"max_model_len": 512, "max_num_seqs": 8, "dtype": "float32",
                         "gpu_memory_utilization": 0.1, "seed": 0}, args.policy)
    tok = guard.tokenizer
    eos = guard._eos_ids

    def unguarded(prompts: list[str]) -> list[list[int]]:
        ids = [tok(guard.format_prompt(q), add_special_tokens=False)["input_ids"] for q in prompts]
        outs = guard.llm.generate([TokensPrompt(prompt_token_ids=i) for i in ids],
                                  SamplingParams(max_tokens=n_new, temperature=0.0), use_tqdm=False)
        res = []
        for o in outs:
            t = list(o.outputs[0].token_ids)
            res.append(t[: next((k for k, x in enumerate(t) if x in eos), len(t))])
        return res

    def guarded(prompts: list[str]) -> list[list[int]]:
        out = guard.generate(prompts, max_new_tokens=n_new)
        return [r.output_ids for r in (out if isinstance(out, list) else [out])]

    rows: list[list[Any]] = []
    result: dict[str, Any] = {"policy": guard.default_policy, "new_tokens": n_new, "repeats": repeats,
                              "self_check_error": guard.self_check_error, "runner": guard.setup_info["runner"]}
    for batch in (1, 8):
        prompts = PROMPTS[:batch]
        plain, held = unguarded(prompts), guarded(prompts)
        if plain != held:
            raise SystemExit(f"batch {batch}: guarded output differs from unguarded vLLM (a rule fired or rows mixed)")
        if any(r.blocked or r.decisions for r in guard.generate(prompts, max_new_tokens=2)):  # type: ignore[union-attr]
            raise SystemExit(f"batch {batch}: the policy fired on the benchmark prompts; pick one that does not")
        n_tokens = sum(len(t) for t in plain)
        times = _util.interleaved({"unguarded": lambda q=prompts: unguarded(q),
                                   "guarded": lambda q=prompts: guarded(q)}, repeats, warmup=0)
        tps = {k: n_tokens / _util.stats(v)["median"] for k, v in times.items()}
        ratio = tps["guarded"] / tps["unguarded"]
        rows.append([batch, n_tokens, tps["unguarded"], tps["guarded"], ratio])
        result[f"batch{batch}"] = {"tokens": n_tokens, "tokens_per_s_unguarded": tps["unguarded"],
                                   "tokens_per_s_guarded": tps["guarded"], "ratio": ratio,
                                   "seconds": {k: _util.stats(v) for k, v in times.items()}}
    _util.table(f"vLLM (CPU, eager) guarded vs unguarded, {n_new} new tokens, policy {guard.default_policy}",
                ["batch", "tokens", "unguarded tok/s", "guarded tok/s", "guarded/unguarded"], rows)
    result["target_batch8"] = 0.95
    result["meets_target"] = result["batch8"]["ratio"] >= 0.95
    result["environment"] = _util.environment(int(os.environ.get("OMP_NUM_THREADS", "0") or 0))
    _util.emit(result, args.json_out)


if __name__ == "__main__":
    main()
