"""The decision record (torch-free, so the ONNX serving path can use it too)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

DecisionAction = Literal["flag", "block", "steer", "error", "allow"]


@dataclass(frozen=True)
class Decision:
    """One thing the guard decided."""

    action: DecisionAction
    """flag, block, steer, error (scoring or the judge failed; ``resolution`` says what on_error did), or allow
    (a cascade's judge found the text safe: recorded, nothing done)."""
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
    """For errors: what on_error did (block, flag, allow). For a steer decision in a scan (text already written,
    nothing to steer): what the rule did instead, its ``steer.scan_action`` (block or flag); None in generation."""
    role: str | None = None
    """Turn the token is in: system, user, tool or assistant (prompt turns), or assistant for output tokens."""
    category: str | None = None
    """Hazard category of the rule that decided (from the rule's ``category``), if any."""
    escalated: bool = False
    """The score was in the rule's uncertain band and a judge decided (:mod:`guardrails.core.cascade`)."""
    judge: str | None = None
    """For escalated decisions: the name of the judge."""
    verdict: str | None = None
    """For escalated decisions: unsafe, safe or error."""
    judge_latency_s: float | None = None
    """For escalated decisions: wall time of the judge call."""
    judge_reason: str | None = None
    """For escalated decisions: the judge's reason, or why the call failed."""

    def to_dict(self) -> dict[str, object]:
        d = dict(self.__dict__)
        d["top_features"] = [list(p) for p in self.top_features]
        if isinstance(d["score"], float) and not math.isfinite(d["score"]):
            d["score"] = None
        return d


@dataclass
class TextScore:
    """Scores of a text scanned without generating (``GuardedModel.score``, ``OnnxGuard.score``)."""

    scores: dict[str, float]
    """Per rule, the highest windowed score over the scored tokens (NaN if none scored)."""
    token_scores: dict[str, dict[int, float]]
    """Per rule, windowed score at each scored position."""
    decisions: list[Decision]
    """What the policy would do (flag/block/steer/error) on this text."""
    tokens: list[str]
    """Token strings."""
    errors: list[str] = field(default_factory=list)
    """Scoring failures, if any (their decisions say what on_error did)."""
    roles: list[str | None] = field(default_factory=list)
    """Per token, the turn it is in (system, user, assistant, tool; None for padding-free template text)."""
    normalization: dict[str, Any] | None = None
    """What text normalisation did before scoring (steps, decoded segments and their scores); None: nothing."""

    @property
    def blocked(self) -> bool:
        from guardrails.core.outcomes import is_block

        return any(is_block(d) for d in self.decisions)

    @property
    def flagged(self) -> bool:
        from guardrails.core.outcomes import is_flag

        return any(is_flag(d) for d in self.decisions)

    def __repr__(self) -> str:
        top = ", ".join(f"{k}={v:.3g}" for k, v in self.scores.items())
        return f"TextScore(blocked={self.blocked}, decisions={len(self.decisions)}, scores={{{top}}})"


__all__ = ["Decision", "DecisionAction", "TextScore"]
