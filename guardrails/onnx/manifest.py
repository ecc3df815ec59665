"""The ONNX guard folder's format: file names, version, parity tolerance and check texts (no torch)."""

from __future__ import annotations

from guardrails.core.errors import GuardrailsError

FORMAT = "sae-guardrails-onnx"
FORMAT_VERSION = 1
MODEL_FILE = "guard.onnx"
MANIFEST_FILE = "manifest.json"
POLICY_FILE = "policy.yaml"
TOKENIZER_FILE = "tokenizer.json"
INPUT_NAMES = ("input_ids", "attention_mask", "position_ids")
OUTPUT_NAME = "scores"
PARITY_RTOL = 1e-4
"""Largest relative difference accepted between the ONNX and torch scores (see :func:`relative_error`)."""

CHECK_TEXTS: tuple[tuple[str, str | None], ...] = (
    ("How do I bake bread at home?", "Mix flour, water, salt and yeast, knead, let it rise, then bake."),
    ("Write a short poem about the sea.", None),
    ("Explain how vaccines train the immune system.", "They show it a harmless piece of a germ."),
)
"""Texts (prompt, response) scored by both paths at export to record parity in the manifest."""


class OnnxGuardError(GuardrailsError, RuntimeError):
    """An ONNX guard folder is missing, invalid, or was made by an incompatible version."""
