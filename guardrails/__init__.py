"""sae-guardrails: safety guardrails for LLMs built on sparse-autoencoder features.

Import name ``guardrails`` (distribution ``sae-guardrails``; unrelated to guardrails-ai).
Importing this package loads no model and prints nothing.
"""

from __future__ import annotations

import logging

from guardrails.engine import Decision
from guardrails.generation import GenerationResult, GuardedModel, GuardedStream, TextScore
from guardrails.policy import Policy, PolicyError
from guardrails.sae import SAE, EncodeOutput, SAEConfig, SAEError

logging.getLogger(__name__).addHandler(logging.NullHandler())


class GuardrailViolation(RuntimeError):
    """Raised (when a policy says ``raise_on_block: true``) instead of returning a refusal."""

    def __init__(self, message: str, result: GenerationResult | TextScore | None = None) -> None:
        super().__init__(message)
        self.result = result


__version__ = "0.1.0"

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
