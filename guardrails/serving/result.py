"""The outcome of one guarded generation (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from guardrails.core.decision import Decision
from guardrails.core.semantics import is_block, is_flag


@dataclass
class GenerationResult:
    """The outcome of one guarded generation."""

    text: str
    """What the caller gets: the output, or the refusal message when blocked."""
    blocked: bool
    """A block rule (or on_error: block) stopped the generation."""
    steered: bool
    """A steer rule fired and steering was applied."""
    decisions: list[Decision]
    """Every decision, in order (flag, block, steer, error)."""
    prompt: str
    """The prompt as the model saw it (after the chat template)."""
    released_text: str = ""
    """Output text released before a block (what a stream showed); equals ``text`` when not blocked."""
    output_ids: list[int] = field(default_factory=list)
    """Released output token ids."""
    tokens: list[str] = field(default_factory=list)
    """Token strings of prompt and output up to the tripping token (for audits; not for the caller)."""
    token_scores: dict[str, dict[int, float]] = field(default_factory=dict)
    """Per rule, windowed score at each scored position (for audits)."""
    prompt_length: int = 0
    """Number of prompt tokens (padding excluded)."""
    policy: str = ""
    """Policy name."""
    errors: list[str] = field(default_factory=list)
    """Scoring failures, if any (their decisions say what on_error did)."""
    token_features: dict[int, list[tuple[int, float]]] = field(default_factory=dict)
    """Per scored position, its top SAE features (id, activation), for audits (watched ones in watched mode)."""
    roles: list[str | None] = field(default_factory=list)
    """Per token of ``tokens``, the turn it is in (system, user, tool, assistant)."""
    normalization: dict[str, Any] | None = None
    """What text normalisation found in the prompt before generating (steps, decoded segments); None: nothing.
    The model generates from the original prompt; the normalized and decoded texts are scored on the side."""

    def __repr__(self) -> str:
        text = self.text if len(self.text) <= 60 else self.text[:57] + "..."
        state = "blocked" if self.blocked else "steered" if self.steered else "flagged" if self.flagged else "allowed"
        rules = sorted({d.rule for d in self.decisions})
        return (f"GenerationResult({state}, text={text!r}, tokens={len(self.output_ids)}, "
                f"decisions={len(self.decisions)}{' ' + str(rules) if rules else ''}, policy={self.policy!r})")

    @property
    def flagged(self) -> bool:
        return any(is_flag(d) for d in self.decisions)

    @property
    def block_decision(self) -> Decision | None:
        return next((d for d in self.decisions if is_block(d)), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "blocked": self.blocked,
            "steered": self.steered,
            "flagged": self.flagged,
            "policy": self.policy,
            "decisions": [d.to_dict() for d in self.decisions],
            "errors": self.errors,
        }


def traced_ids(prompt_ids: list[int], released: list[int], blocked_at: int | None, tripping_token: int) -> list[int]:
    """Prompt and released ids, extended up to a block's position with the tripping token (kept only for the audit
    trace: the caller never sees it)."""
    ids = list(prompt_ids) + list(released)
    if blocked_at is not None and blocked_at >= len(ids):
        ids += [tripping_token] * (blocked_at - len(ids) + 1)
    return ids


def token_text(tokenizer: Any, ids: list[int], pos: int) -> str | None:
    """The text of the token at ``pos`` of ``ids`` (a decision's ``token``), None outside them."""
    return str(tokenizer.decode([ids[pos]])) if 0 <= pos < len(ids) else None
