"""Exceptions shared across the package (importing this module loads no torch)."""

from __future__ import annotations

from typing import Any


class GuardrailViolation(RuntimeError):
    """Raised (when a policy says ``raise_on_block: true``) instead of returning a refusal.

    ``result`` holds the :class:`~guardrails.serving.generation.GenerationResult` or
    :class:`~guardrails.serving.generation.TextScore` with the decisions.
    """

    def __init__(self, message: str, result: Any = None) -> None:
        super().__init__(message)
        self.result = result
