"""The policy's meaning, in one torch-free place.

Every path that applies a policy (generation, streams, scans, LangChain guards and middleware, the ONNX
guard, calibration and ``guardrails eval``) asks these functions, so they cannot disagree:

- :func:`rule_layer`: the residual-stream layer a rule reads;
- :func:`scores_token`: whether a rule scores a token (its scope, the prompt roles input rules read,
  and the tokens no rule scores: padding, special tokens, position 0);
- :func:`window_reference`: windowed aggregation (reference implementation; the torch engine and the
  numpy ONNX path are property-tested against it);
- :func:`escalate` and :func:`threshold_of`: a steer rule's ``block_above`` turning it into a block;
- :func:`on_error_of`, :func:`refusal_for`: what a failure does, what a block says;
- :func:`is_block`, :func:`is_flag`, :func:`strongest_action`: predicates over decisions;
- :func:`scoped_rules`: a policy's rules for an input-only or output-only guard.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from guardrails.core.decision import Decision

if TYPE_CHECKING:
    from guardrails.core.policy import Policy, Rule

Role = Literal["system", "user", "assistant", "tool"]
ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")
"""Prompt roles, in the order of their integer codes (``ROLE_CODES``)."""
ROLE_CODES: dict[str, int] = {r: i for i, r in enumerate(ROLES)}
ACTION_ORDER: dict[str, int] = {"allow": 0, "flag": 1, "steer": 2, "block": 3}
"""Strength of an action, for :func:`strongest_action`."""


def rule_layer(policy: Policy, rule: Rule) -> int:
    """The residual-stream layer ``rule`` reads: its linear detector's layer, or its SAE's."""
    det = rule.detector
    layer = getattr(det, "layer", None)
    if layer is not None:
        return int(layer)
    return int(policy.saes[det.sae].layer)  # type: ignore[union-attr]


def scores_token(
    scope: str, *, is_output: bool, role: str | None, input_roles: Iterable[str], scorable: bool = True
) -> bool:
    """Whether a rule of ``scope`` scores a token.

    ``scorable`` is False for padding, special tokens and position 0 (the attention sink), which no
    rule scores. Input rules score prompt tokens whose turn's ``role`` is in the policy's
    ``input_roles`` (default user and tool: the system prompt only when listed); output rules score
    generated tokens (or a scanned response); ``both`` rules score either.
    """
    if not scorable:
        return False
    if is_output:
        return scope in ("output", "both")
    return scope in ("input", "both") and role in set(input_roles)


def window_reference(scores: Sequence[float | None], window: int, how: str) -> list[float | None]:
    """Windowed scores over a token sequence (``None`` = not scored).

    Each scored token's score is aggregated (``mean``, ``max`` or ``sum``) with the scores of up to
    ``window - 1`` scored tokens before it; unscored tokens take no slot and get ``None``.
    """
    out: list[float | None] = []
    seen: list[float] = []
    for s in scores:
        if s is None or (isinstance(s, float) and math.isnan(s)):
            out.append(None)
            continue
        seen.append(float(s))
        win = seen[-window:]
        out.append(sum(win) / len(win) if how == "mean" else max(win) if how == "max" else sum(win))
    return out


def escalate(rule: Rule, score: float) -> str:
    """The action ``rule`` takes at ``score`` (a tripped rule): a steer rule blocks at ``block_above``."""
    steer = rule.steer
    if rule.action == "steer" and steer is not None and steer.block_above is not None and score >= steer.block_above:
        return "block"
    return rule.action


def threshold_of(rule: Rule, action: str) -> float:
    """The threshold that decided ``action`` (a steer rule's ``block_above`` when it blocked)."""
    steer = rule.steer
    if action == "block" and rule.action == "steer" and steer is not None and steer.block_above is not None:
        return float(steer.block_above)
    return float(rule.threshold)


def on_error_of(policy: Policy, rule: Rule | None) -> str:
    """What a failure to score does: the rule's ``on_error``, else the policy's (default block)."""
    return (rule.on_error if rule is not None and rule.on_error else None) or policy.on_error


def refusal_for(policy: Policy, rule_id: str | None) -> str:
    """The text a blocked caller gets: the blocking rule's ``message``, else the policy's refusal."""
    rule = next((r for r in policy.rules if r.id == rule_id), None)
    return (rule.message if rule is not None and rule.message else None) or policy.refusal


def is_block(d: Decision) -> bool:
    """A decision that stops the text: a block, or an error resolved as block."""
    return d.action == "block" or (d.action == "error" and d.resolution == "block")


def is_flag(d: Decision) -> bool:
    """A decision that lets the text through but marks it: a flag, or an error (whatever it resolved to)."""
    return d.action in ("flag", "error")


def strongest_action(decisions: Iterable[Decision]) -> str:
    """``block`` > ``steer`` > ``flag`` > ``allow`` over ``decisions`` (errors count as their resolution)."""
    best = "allow"
    for d in decisions:
        a = (d.resolution or "block") if d.action == "error" else d.action
        if ACTION_ORDER.get(a, 0) > ACTION_ORDER[best]:
            best = a
    return best


@dataclass(frozen=True)
class RuleSpec:
    """What :func:`decide_scan` needs of a rule (from a :class:`Rule` or an ONNX manifest entry)."""

    id: str
    action: str
    threshold: float
    block_above: float | None = None
    on_error: str = "block"
    category: str | None = None


@dataclass(frozen=True)
class ScanEvent:
    """One decision of :func:`decide_scan`."""

    rule: int
    """Index of the rule in the list given."""
    action: str
    """flag, block, steer or error."""
    position: int
    score: float
    threshold: float
    resolution: str | None = None
    reason: str | None = None


def decide_scan(
    rules: Sequence[RuleSpec], windowed: Sequence[Sequence[float | None]], order: Sequence[int],
    in_scope: Sequence[Sequence[bool]], failed: dict[int, str] | None = None,
) -> list[ScanEvent]:
    """The decisions generation takes over a sequence whose windowed scores are all known (the reference).

    ``windowed[r][t]`` is rule ``r``'s windowed score at token ``t`` (None: not scored); ``order`` the
    evaluation order (layers ascending, policy order within a layer); ``failed`` maps rules that could not
    score to the reason. Token by token, a rule fires at its first hit and latches; a steer rule blocks at
    its first score reaching ``block_above``; a block stops the sequence, so nothing after its position is
    decided; a failure follows ``on_error`` at the rule's first scored token. Events come sorted by position.
    """
    failed = failed or {}
    events: list[ScanEvent] = []
    blocked_at: int | None = None

    def accepts(t: int) -> bool:
        return blocked_at is None or t < blocked_at

    def block(t: int) -> None:
        nonlocal blocked_at, events
        blocked_at = t
        events = [e for e in events if e.position <= t]

    for r in order:
        rule = rules[r]
        if r in failed:
            first = next((t for t, ok in enumerate(in_scope[r]) if ok), None)
            if first is None or not accepts(first):
                continue
            events.append(ScanEvent(r, "error", first, math.nan, rule.threshold, rule.on_error, failed[r]))
            if rule.on_error == "block":
                block(first)
            continue
        w = windowed[r]
        hits = [t for t, v in enumerate(w) if v is not None and v >= rule.threshold]
        if not hits:
            continue
        cands = {hits[0]}
        if rule.action == "steer" and rule.block_above is not None:
            high = next((t for t, v in enumerate(w) if v is not None and v >= rule.block_above), None)
            if high is not None:
                cands.add(high)
        fired = False
        for t in sorted(cands):
            if not accepts(t):
                break
            score = float(w[t])  # type: ignore[arg-type]
            action = "block" if rule.action == "steer" and rule.block_above is not None and score >= rule.block_above \
                else rule.action
            if fired and action != "block":
                continue
            fired = True
            thr = rule.block_above if action == "block" and rule.block_above is not None else rule.threshold
            events.append(ScanEvent(r, action, t, score, thr))
            if action == "block":
                block(t)
    return sorted(events, key=lambda e: e.position)


def scoped_rules(policy: Policy, mode: Literal["input", "output"]) -> list[Rule]:
    """The rules of ``policy`` for an ``mode``-only guard (``both`` rules included, rescoped to ``mode``).

    Raises :class:`~guardrails.core.policy.PolicyError` when none applies.
    """
    from guardrails.core.policy import PolicyError

    rules = [r.model_copy(update={"scope": mode}) for r in policy.rules if r.scope in (mode, "both")]
    if not rules:
        scopes = ", ".join(f"{r.id}: {r.scope}" for r in policy.rules)
        raise PolicyError(f"policy {policy.name!r} has no {mode} rules (rule scopes: {scopes}); an {mode} guard "
                          f"needs a rule with scope '{mode}' or 'both'")
    return rules


__all__ = [
    "ACTION_ORDER",
    "ROLES",
    "ROLE_CODES",
    "Role",
    "RuleSpec",
    "ScanEvent",
    "decide_scan",
    "escalate",
    "is_block",
    "is_flag",
    "on_error_of",
    "refusal_for",
    "rule_layer",
    "scoped_rules",
    "scores_token",
    "strongest_action",
    "threshold_of",
    "window_reference",
]
