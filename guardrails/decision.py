"""The decision record (torch-free, so the ONNX serving path can use it too)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

DecisionAction = Literal["flag", "block", "steer", "error"]


@dataclass(frozen=True)
class Decision:
    """One thing the guard decided."""

    action: DecisionAction
    """flag, block, steer, or error (scoring failed; ``resolution`` says what on_error did)."""
    rule: str
    """Id of the rule."""
    score: float
    """The rule's (windowed) score at the token (NaN for errors)."""
    threshold: float
    """The rule's threshold."""
    position: int
    """Absolute token index in the sequence (prompt and output, padding excluded)."""
    scope: Literal["input", "output"]
    """Whether the token was part of the prompt or of the output."""
    sequence: int = 0
    """Index of the sequence in the batch."""
    output_index: int | None = None
    """Index of the token among generated tokens (None for prompt tokens)."""
    token: str | None = None
    """Text of the token (filled in by the generation wrapper)."""
    top_features: tuple[tuple[int, float], ...] = ()
    """Top SAE features (id, activation) at the token, for audits."""
    reason: str | None = None
    """For errors: what went wrong."""
    resolution: str | None = None
    """For errors: what on_error did (block, flag, allow)."""

    def to_dict(self) -> dict[str, object]:
        d = dict(self.__dict__)
        d["top_features"] = [list(p) for p in self.top_features]
        if isinstance(d["score"], float) and not math.isfinite(d["score"]):
            d["score"] = None
        return d


__all__ = ["Decision", "DecisionAction"]
