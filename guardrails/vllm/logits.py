"""A vLLM V1 logits processor that ends a blocked request in the step its tripping token is scored.

The worker's hooks score the step's rows before the logits exist; this processor then forces EOS on
the logits row of every request the guard blocked, so vLLM finishes it in that same step
(``finish_reason == "stop"``; read the guard's verdict back with ``GuardedVLLM``). Logits rows follow
the batch order (``input_batch.req_ids``), which is the order the hook recorded for this step. It is
registered through the ``vllm.logits_processors`` entry point (installed with this package) and
does nothing while no guard is set up.
"""

from __future__ import annotations

from typing import Any

import torch

from guardrails.vllm import require_vllm
from guardrails.vllm.state import active_state

require_vllm()

from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor  # noqa: E402


def _eos_ids(vllm_config: Any) -> list[int]:
    hf = vllm_config.model_config.hf_config
    ids: set[int] = set()
    for src in (hf, getattr(hf, "get_text_config", lambda: hf)()):
        eos = getattr(src, "eos_token_id", None)
        ids |= {eos} if isinstance(eos, int) else set(eos or [])
    try:
        gen = vllm_config.model_config.try_get_generation_config()
        eos = gen.get("eos_token_id")
        ids |= {eos} if isinstance(eos, int) else set(eos or [])
    except Exception:  # no generation config: the model config's EOS is enough
        pass
    return sorted(ids)


class GuardLogitsProcessor(LogitsProcessor):
    """Forces EOS on the rows of requests the guard blocked (see the module docstring)."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        eos = _eos_ids(vllm_config)
        if not eos:
            raise RuntimeError("guardrails logits processor: the served model declares no eos_token_id")
        self.eos = eos[0]
        self.device = device

    def is_argmax_invariant(self) -> bool:
        return False  # it changes the argmax of blocked rows

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        return None  # the guard state keeps its own per-request bookkeeping

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        state = active_state()
        if state is None or not state.blocked_rows:
            return logits
        rows = torch.tensor([r for r in state.blocked_rows if r < logits.shape[0]], dtype=torch.long,
                            device=logits.device)
        if rows.numel():
            logits[rows] = float("-inf")
            logits[rows, self.eos] = 0.0
        return logits
