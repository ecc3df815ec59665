"""The policy's meaning, in one torch-free place.

Every path that applies a policy (generation, streams, scans, LangChain guards and middleware, the ONNX
guard, calibration and ``guardrails eval``) asks these functions, so they cannot disagree:

- :func:`rule_layer`: the residual-stream layer a rule reads;
- :func:`scores_token`: whether a rule scores a token (its scope, the prompt roles input rules read,
  and the tokens no rule scores: padding, special tokens, position 0);
- :func:`window_reference`: windowed aggregation (reference implementation; the torch engine and the
  numpy ONNX path are property-tested against it);
- :func:`gate_cap`: an output rule gated by an input rule's prompt score (``gate:``);
- :func:`escalate` and :func:`threshold_of`: a steer rule's ``block_above`` turning it into a block;
- :func:`on_error_of`, :func:`refusal_for`: what a failure does, what a block says;
- :func:`is_block`, :func:`is_flag`, :func:`strongest_action`, and what would-be steering does in a scan
  (:func:`scan_actions`, :func:`resolve_scan`, :func:`acted`): what decisions do, in
  :mod:`guardrails.core.outcomes` (re-exported here);
- :func:`scoped_rules`: a policy's rules for an input-only or output-only guard;
- :func:`cascade_band`, :func:`judged_action`, :func:`judge_fields`: the cascade (a rule's uncertain band
  between ``threshold`` and ``escalate_above`` goes to a judge; :mod:`guardrails.core.cascade`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from guardrails.core.cascade import JudgeOutcome
from guardrails.core.outcomes import ACTION_ORDER as ACTION_ORDER  # re-exported (what decisions do: outcomes.py)
from guardrails.core.outcomes import acted as acted  # re-exported
from guardrails.core.outcomes import is_block as is_block  # re-exported
from guardrails.core.outcomes import is_flag as is_flag  # re-exported
from guardrails.core.outcomes import resolve_scan as resolve_scan  # re-exported
from guardrails.core.outcomes import scan_actions as scan_actions  # re-exported
from guardrails.core.outcomes import strongest_action as strongest_action  # re-exported

if TYPE_CHECKING:
    from guardrails.core.policy import Policy, Rule

Role = Literal["system", "user", "assistant", "tool"]
ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")
"""Prompt roles, in the order of their integer codes (``ROLE_CODES``)."""
ROLE_CODES: dict[str, int] = {r: i for i, r in enumerate(ROLES)}


def rule_layer(policy: Policy, rule: Rule) -> int:
    """The residual-stream layer where ``rule`` decides: its linear detector's layer, or its SAE's; an
    ensemble's deepest member's (shallower members' terms are carried there)."""
    from guardrails.core.policy import detector_parts

    return max(_single_layer(policy, det) for _, det in detector_parts(rule.detector))


def _single_layer(policy: Policy, det: Any) -> int:
    layer = getattr(det, "layer", None)
    return int(layer) if layer is not None else int(policy.saes[det.sae].layer)


def rule_layers(policy: Policy, rule: Rule) -> list[int]:
    """Every layer ``rule`` reads, shallowest first: a multi-layer linear rule's ``extra_layers``, then its own
    (:func:`rule_layer`, where it decides); for an ensemble, every member's."""
    from guardrails.core.policy import detector_parts

    out: set[int] = set()
    for _, det in detector_parts(rule.detector):
        out |= {*(getattr(det, "extra_layers", None) or []), _single_layer(policy, det)}
    return sorted(out)


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


def gate_cap(gate_scores: Sequence[float | None], scale: float, offset: float) -> list[float | None]:
    """A gated rule's cap at each token (reference): ``scale * g + offset`` with ``g`` the gate rule's highest
    windowed score up to that token; None before the gate scored anything (the rule then scores alone).
    The gated rule's score is ``min(own, cap)`` (:class:`~guardrails.core.policy.Gate`)."""
    out: list[float | None] = []
    best: float | None = None
    for g in gate_scores:
        if g is not None and not (isinstance(g, float) and math.isnan(g)):
            best = float(g) if best is None else max(best, float(g))
        out.append(None if best is None else scale * best + offset)
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


def cascade_band(threshold: float, escalate_above: float | None, score: float) -> Literal["pass", "judge", "act"]:
    """Where ``score`` falls: below ``threshold`` it passes; at or above ``escalate_above`` (or with no cascade)
    the rule acts directly; in between, the judge decides."""
    if not score >= threshold:
        return "pass"
    return "act" if escalate_above is None or score >= escalate_above else "judge"


def judged_action(action: str, outcome: JudgeOutcome, on_error: str) -> tuple[str, str | None]:
    """``(decision action, resolution)`` after a judge: unsafe -> the rule's action; safe -> allow (recorded);
    error -> ``error`` resolved by the judge's ``on_error``."""
    if outcome.verdict == "unsafe":
        return action, None
    if outcome.verdict == "safe":
        return "allow", None
    return "error", on_error


def judge_fields(outcome: JudgeOutcome) -> dict[str, Any]:
    """The :class:`Decision` fields that record a judge call."""
    return {"escalated": True, "judge": outcome.judge, "verdict": outcome.verdict,
            "judge_latency_s": round(outcome.latency_s, 6), "judge_reason": outcome.reason}


@dataclass(frozen=True)
class RuleSpec:
    """What :func:`decide_scan` needs of a rule (from a :class:`Rule` or an ONNX manifest entry)."""

    id: str
    action: str
    threshold: float
    block_above: float | None = None
    on_error: str = "block"
    category: str | None = None
    escalate_above: float | None = None
    """Cascade: scores in [threshold, escalate_above) go to the judge."""
    judge_on_error: str = "block"
    """What a failed judge call does."""
    judge: str | None = None
    """Name of the rule's judge."""


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
    judge: JudgeOutcome | None = None
    """The judge call that decided (cascade), if any."""


Asker = Callable[[int, int], JudgeOutcome]
"""``ask(rule index, position)``: the outcome of the rule's judge on the text at that token."""


def decide_scan(
    rules: Sequence[RuleSpec], windowed: Sequence[Sequence[float | None]], order: Sequence[int],
    in_scope: Sequence[Sequence[bool]], failed: dict[int, str] | None = None, ask: Asker | None = None,
) -> list[ScanEvent]:
    """The decisions generation takes over a sequence whose windowed scores are all known (the reference).

    ``windowed[r][t]`` is rule ``r``'s windowed score at token ``t`` (None: not scored); ``order`` the
    evaluation order (layers ascending, policy order within a layer); ``failed`` maps rules that could not
    score to the reason. Token by token, a rule fires at its first hit and latches; a steer rule blocks at
    its first score reaching ``block_above``; a block stops the sequence, so nothing after its position is
    decided; a failure follows ``on_error`` at the rule's first scored token. Events come sorted by position.

    Cascade rules (``escalate_above``): a first hit at or above ``escalate_above`` acts directly; a first hit
    in the band is *pending*, and so is nothing else of the rule but its first score at or above
    ``escalate_above`` (which acts directly). Once the direct decisions of every rule are known, pending hits
    are judged in position order (``ask``; None: the judge is missing, an error), skipping any at or after a
    block: unsafe -> the rule's action there (a flag then replaces the rule's own later direct flag); safe
    -> an ``allow`` event; error -> ``error`` resolved by ``judge_on_error``. GuardRun does the same with the
    judge called after the forward pass.
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

    pending: list[tuple[int, int, int]] = []  # (position, rank in order, rule) of band hits awaiting the judge
    for rank, r in enumerate(order):
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
        esc = rule.escalate_above
        if esc is not None:
            high = next((t for t, v in enumerate(w) if v is not None and v >= esc), None)
            if high != hits[0]:
                pending.append((hits[0], rank, r))
            if high is not None and accepts(high):
                events.append(ScanEvent(r, rule.action, high, float(w[high]), esc))  # type: ignore[arg-type]
                if rule.action == "block":
                    block(high)
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
    for t, _, r in sorted(pending):
        if not accepts(t):
            continue
        rule = rules[r]
        outcome = ask(r, t) if ask is not None else JudgeOutcome(rule.judge or "?", "error", 0.0, "no judge bound")
        action, resolution = judged_action(rule.action, outcome, rule.judge_on_error)
        if action == "flag":  # the judged flag is the rule's first firing: its later direct flag is latched away
            events = [e for e in events if not (e.rule == r and e.position > t)]
        reason = outcome.reason if action == "error" else None
        events.append(ScanEvent(r, action, t, float(windowed[r][t]), rule.threshold,  # type: ignore[arg-type]
                                resolution, reason, outcome))
        if action == "block" or resolution == "block":
            block(t)
    return sorted(events, key=lambda e: e.position)


def score_only(rule: Rule) -> Rule:
    """``rule`` with its threshold out of reach: it records scores and decides nothing (no flag, steer, block or
    judge); used for calibration and for the gate rules an output guard keeps."""
    return rule.model_copy(update={"threshold": math.inf, "action": "flag", "steer": None, "escalate_above": None,
                                   "judge": None})


def scoped_rules(policy: Policy, mode: Literal["input", "output"]) -> list[Rule]:
    """The rules of ``policy`` for an ``mode``-only guard (``both`` rules included, rescoped to ``mode``).

    An output guard keeps the input rules that gate its rules (``rules[].gate``) as gate-only rules: they
    score the prompt it is given (a threshold out of reach, so they decide nothing); given no prompt, the
    gated rules score the answer alone. Raises :class:`~guardrails.core.policy.PolicyError` when none applies.
    """
    from guardrails.core.policy import PolicyError

    rules = [r.model_copy(update={"scope": mode}) for r in policy.rules if r.scope in (mode, "both")]
    gates = {r.gate.rule for r in rules if r.gate is not None}
    if mode == "output" and gates:
        rules += [score_only(r) for r in policy.rules if r.id in gates]
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
    "acted",
    "cascade_band",
    "decide_scan",
    "escalate",
    "gate_cap",
    "is_block",
    "is_flag",
    "judge_fields",
    "judged_action",
    "on_error_of",
    "refusal_for",
    "resolve_scan",
    "rule_layer",
    "rule_layers",
    "scan_actions",
    "scoped_rules",
    "score_only",
    "scores_token",
    "strongest_action",
    "threshold_of",
    "window_reference",
]
