"""sae-guardrails: safety guardrails for LLMs built on sparse-autoencoder features.

Import name ``guardrails`` (distribution ``sae-guardrails``; unrelated to guardrails-ai).
Importing this package loads no model, prints nothing, and does not import torch: the public names
below are resolved on first use (PEP 562), so ``guardrails.onnx`` can serve without torch.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from guardrails.errors import GuardrailViolation

if TYPE_CHECKING:
    from guardrails.decision import Decision, TextScore
    from guardrails.generation import GenerationResult, GuardedModel, GuardedStream
    from guardrails.policy import Policy, PolicyError
    from guardrails.sae import SAE, EncodeOutput, SAEConfig, SAEError

logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"

_LAZY = {
    "SAE": "guardrails.sae",
    "SAEConfig": "guardrails.sae",
    "SAEError": "guardrails.sae",
    "EncodeOutput": "guardrails.sae",
    "Policy": "guardrails.policy",
    "PolicyError": "guardrails.policy",
    "Decision": "guardrails.decision",
    "GenerationResult": "guardrails.generation",
    "GuardedModel": "guardrails.generation",
    "GuardedStream": "guardrails.generation",
    "TextScore": "guardrails.decision",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'guardrails' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "SAE",
    "Decision",
    "EncodeOutput",
    "GenerationResult",
    "GuardedModel",
    "GuardedStream",
    "GuardrailViolation",
    "Policy",
    "PolicyError",
    "SAEConfig",
    "SAEError",
    "TextScore",
    "__version__",
]
