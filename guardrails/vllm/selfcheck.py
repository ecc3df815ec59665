"""The vLLM guard's start-up self-check: a hook must fire during a forward pass (compiled or CUDA graphs skip
Python hooks), and the residual it captures must equal the Hugging Face model's ``hidden_states[L + 1]`` on one
prompt, within a tolerance per served dtype; otherwise :class:`~guardrails.vllm.guarded.GuardedVLLM` refuses to
serve."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from guardrails.vllm.state import EXTRA_ARGS_KEY, GuardSetupError

logger = logging.getLogger(__name__)

SELF_CHECK_PROMPT = "The capital of France is Paris, and the capital of Italy is"
SELF_CHECK_RTOL = {"float32": 1e-3, "bfloat16": 3e-2, "float16": 1e-2}
"""Largest relative error (norm of the difference over norm of the HF residual) per served dtype."""


def self_check(llm: Any, tokenizer: Any, policy: str, model_path: str, dtype: str) -> float:
    """Run one guarded forward of ``SELF_CHECK_PROMPT`` under ``policy`` with capture on; raise
    :class:`GuardSetupError` when no hook fired or the residual differs from HF. Returns the largest relative error."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    ids = tokenizer(SELF_CHECK_PROMPT, add_special_tokens=False)["input_ids"]
    key = f"selfcheck-{uuid.uuid4().hex}"
    params = SamplingParams(
        max_tokens=1, temperature=0.0, skip_reading_prefix_cache=True,
        extra_args={EXTRA_ARGS_KEY: {"policy": policy, "key": key, "capture": True, "steer": False}},
    )
    before = llm.collective_rpc("guardrails_stats")[0]["hook_calls"]
    llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)
    after = llm.collective_rpc("guardrails_stats")[0]["hook_calls"]
    result = llm.collective_rpc("guardrails_results", args=([key],))[0][key]
    if after == before or result is None or not result.get("capture"):
        raise GuardSetupError(
            "start-up self-check: the guard's hook did not fire during a forward pass (compiled graphs or "
            "CUDA graphs skip Python hooks): serve with enforce_eager=True"
        )
    return _compare_with_hf(model_path, ids, result["capture"], dtype)


def _compare_with_hf(model_path: str, ids: list[int], capture: dict[Any, Any], dtype: str) -> float:
    """Largest relative error between the captured residual rows and HF ``hidden_states[L + 1]``."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    hf.eval()
    with torch.inference_mode():
        hs = hf(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    rtol = SELF_CHECK_RTOL.get(dtype, 3e-2)
    worst = 0.0
    for layer, rows in capture.items():
        got = torch.tensor(rows, dtype=torch.float32)
        ref = hs[int(layer) + 1][0].float()
        if got.shape != ref.shape:
            raise GuardSetupError(
                f"start-up self-check: layer {layer}: captured {tuple(got.shape)} residual rows but the HF model "
                f"gives {tuple(ref.shape)}; the guard cannot map vLLM rows to tokens"
            )
        # position 0 is an attention sink with a huge norm: compare the other rows, each relative to itself
        err = ((got[1:] - ref[1:]).norm(dim=-1) / ref[1:].norm(dim=-1).clamp_min(1e-6)).max().item()
        worst = max(worst, err)
        if not err <= rtol:
            raise GuardSetupError(
                f"start-up self-check: layer {layer}: the residual the guard reads differs from the HF model's "
                f"hidden_states[{int(layer) + 1}] by {err:.3g} (relative; allowed {rtol:g} in {dtype}): refusing to "
                "serve (the hook is not at the residual stream the policy was calibrated on)"
            )
    logger.info("guardrails self-check: residual matches HF within %.3g", worst)
    return worst
