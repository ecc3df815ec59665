"""The policy's meaning, torch-free: schema, decisions, errors and the rules every path applies.

Nothing under ``guardrails.core`` imports torch (a test checks), so the ONNX serving path, audits and
reports share it with the torch engine.
"""
