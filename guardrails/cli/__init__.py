"""The ``guardrails`` command: thin commands over the library's workflows."""

from guardrails.cli.main import app, main

__all__ = ["app", "main"]
