"""Exceptions shared across the package (importing this module loads no torch)."""

from __future__ import annotations

from typing import Any


class GuardrailsError(Exception):
    """Base of the errors this package raises: bad input (policies, SAE files, models, arguments) or a guard
    that could not do its job. The CLI turns every one into a one-line message and exit code 2."""


class GuardrailViolation(GuardrailsError, RuntimeError):
    """Raised (when a policy says ``raise_on_block: true``) instead of returning a refusal.

    ``result`` holds the :class:`~guardrails.serving.generation.GenerationResult` or
    :class:`~guardrails.serving.generation.TextScore` with the decisions.
    """

    def __init__(self, message: str, result: Any = None) -> None:
        super().__init__(message)
        self.result = result


class CalibrationError(GuardrailsError, ValueError):
    """Labeled data or a calibration request is invalid; the message names the file and row."""
