"""sae-guardrails: safety guardrails for LLMs built on sparse-autoencoder features.

Import name ``guardrails`` (distribution ``sae-guardrails``; unrelated to guardrails-ai).
Importing this package loads no model, prints nothing, and does not import torch: the public names
below are resolved on first use (PEP 562), so ``guardrails.onnx`` can serve without torch.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from guardrails.core.errors import GuardrailsError, GuardrailViolation

if TYPE_CHECKING:
    from guardrails.audit.store import AuditError, AuditStore
    from guardrails.core.cascade import JudgeError, JudgeRequest, Verdict
    from guardrails.core.decision import Decision, TextScore
    from guardrails.core.policy import Policy, PolicyError
    from guardrails.engine.compile import CompiledPolicy, compile_policy
    from guardrails.engine.steering import Steer, steering
    from guardrails.sae.model import SAE, EncodeOutput, SAEConfig, SAEError
    from guardrails.serving.generation import GenerationResult, GuardedModel, GuardedStream

logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.3.19"

_LAZY = {
    "SAE": "guardrails.sae.model",
    "SAEConfig": "guardrails.sae.model",
    "SAEError": "guardrails.sae.model",
    "EncodeOutput": "guardrails.sae.model",
    "Policy": "guardrails.core.policy",
    "PolicyError": "guardrails.core.policy",
    "Decision": "guardrails.core.decision",
    "GenerationResult": "guardrails.serving.generation",
    "GuardedModel": "guardrails.serving.generation",
    "GuardedStream": "guardrails.serving.generation",
    "TextScore": "guardrails.core.decision",
    "AuditStore": "guardrails.audit.store",
    "AuditError": "guardrails.audit.store",
    "CompiledPolicy": "guardrails.engine.compile",
    "compile_policy": "guardrails.engine.compile",
    "Steer": "guardrails.engine.steering",
    "steering": "guardrails.engine.steering",
    "JudgeError": "guardrails.core.cascade",
    "JudgeRequest": "guardrails.core.cascade",
    "Verdict": "guardrails.core.cascade",
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
    "AuditError",
    "AuditStore",
    "CompiledPolicy",
    "Decision",
    "EncodeOutput",
    "GenerationResult",
    "GuardedModel",
    "GuardedStream",
    "GuardrailViolation",
    "GuardrailsError",
    "JudgeError",
    "JudgeRequest",
    "Policy",
    "PolicyError",
    "SAEConfig",
    "SAEError",
    "Steer",
    "TextScore",
    "Verdict",
    "__version__",
    "compile_policy",
    "steering",
]
