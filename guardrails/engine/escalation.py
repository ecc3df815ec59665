"""The cascade inside a :class:`~guardrails.engine.run.GuardRun`: band hits wait for a judge, verdicts become decisions.

A cascade rule's first hit between its ``threshold`` and ``escalate_above`` is queued during the forward
(:func:`cascade_hits`); after the forward, outside the model's lock, :func:`resolve_escalations` asks the
policy's judge about each queued hit and applies the verdict as :func:`guardrails.core.semantics.decide_scan`
does. A score at or above ``escalate_above`` acts directly, without the judge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from guardrails.core.cascade import JudgeOutcome, JudgeRequest, call_judge, judge_settings, render_prompt
from guardrails.core.decision import Decision
from guardrails.core.policy import Rule
from guardrails.core.semantics import judge_fields, judged_action
from guardrails.engine.columns import role_name
from guardrails.engine.scorers import LayerScorer

if TYPE_CHECKING:
    from guardrails.engine.run import GuardRun


@dataclass(frozen=True)
class PendingJudge:
    """A cascade rule's first hit in its uncertain band, waiting for the judge (after the forward pass)."""

    rule: Rule
    b: int
    pos: int
    score: float
    out: bool
    role: str
    top: tuple[tuple[int, float], ...]


def cascade_hits(
    run: GuardRun, rule: Rule, head: object, scorer: LayerScorer, b: int, w: Tensor, positions: Tensor,
    is_output: Tensor, hidden: Tensor, roles: Tensor | None,
) -> None:
    """Row ``b``'s hits of a cascade rule in this forward: a first hit in the band waits for the judge
    (once per rule and row); the first score at or above ``escalate_above`` acts directly."""
    esc = float(rule.escalate_above)  # type: ignore[arg-type]
    first = int(((w >= rule.threshold) & ~torch.isnan(w)).nonzero()[0])
    high_at = (w >= esc).nonzero()
    high = int(high_at[0]) if len(high_at) else None

    def role_of(t: int) -> int | None:
        return None if roles is None else int(roles[b, t])

    if high != first and (rule.id, b) not in run.verdicts and not bool(run.states[rule.id].fired[b]) \
            and not any(p.rule.id == rule.id and p.b == b for p in run.pending_judges):
        pos, out = int(positions[first]), bool(is_output[first])
        if run.accepts(b, pos):
            top = tuple(scorer.top_features(hidden[b, first].detach()))
            run.pending_judges.append(PendingJudge(rule, b, pos, float(w[first]), out,
                                                   role_name(out, role_of(first)), top))
    if high is not None and run.accepts(b, int(positions[high])):
        run.fire(rule, head, scorer, b, high, int(positions[high]), float(w[high]), bool(is_output[high]),
                 hidden, role_of(high), threshold=esc)


HELD = "held for the driver's judge"
"""The reason of a band hit held in vLLM's first pass (:attr:`GuardRun.hold_bands`): it blocks there."""


def resolve_escalations(run: GuardRun) -> None:
    """Ask the judges about the pending band hits (position order, layers then policy order), skipping any
    at or after a block, and apply the verdicts as :func:`guardrails.core.semantics.decide_scan` does."""
    if not run.pending_judges:
        return
    pending = sorted(run.pending_judges, key=lambda p: (p.b, p.pos, run.rule_rank[p.rule.id]))
    run.pending_judges = []
    for p in pending:
        rule, b = p.rule, p.b
        if not run.accepts(b, p.pos) or (rule.id, b) in run.verdicts:
            continue
        settings = judge_settings(run.policy, rule)
        assert settings is not None
        outcome = _ask(run, p, settings.name, settings.prompt, settings.timeout_s)
        run.verdicts[(rule.id, b)] = outcome
        held = outcome.reason == HELD and outcome.verdict == "error"
        action, resolution = judged_action(rule.action, outcome, "block" if held else settings.on_error)
        if action == "flag":  # the judged flag is the rule's first firing: its later direct flag is latched away
            run.decisions = [d for d in run.decisions
                             if not (d.sequence == b and d.rule == rule.id and d.position > p.pos)]
        if action in ("flag", "block"):
            run.states[rule.id].fired[b] = True
        if action == "error":
            run.errors.append(f"judge {outcome.judge!r} (rule {rule.id!r}): {outcome.reason}")
        run.decisions.append(Decision(
            action=action,  # type: ignore[arg-type]
            rule=rule.id, score=p.score, threshold=float(rule.threshold), position=p.pos,
            scope="output" if p.out else "input", sequence=b,
            output_index=p.pos - run.prompt_lengths[b] if p.out else None, top_features=p.top,
            reason=outcome.reason if action == "error" else None, resolution=resolution, role=p.role,
            category=rule.category, **judge_fields(outcome),
        ))
        if action == "block" or resolution == "block":
            run.block_row(b, p.pos, rule.id)
        elif action == "flag" and run.steer_state is not None:
            run.steer_state.on_fire(rule.id, b, p.pos)


def _ask(run: GuardRun, p: PendingJudge, name: str, prompt: str, timeout_s: float | None) -> JudgeOutcome:
    preset = run.judge_presets.get((p.rule.id, p.b))
    if preset is not None:
        return preset
    scope = "output" if p.out else "input"
    if run.hold_bands == "all" or (run.hold_bands == "input" and scope == "input"):
        return JudgeOutcome(name, "error", 0.0, HELD)
    try:
        if run.judge_text is None:
            raise RuntimeError("this path gives the judge no text (only GuardedModel generation and scans do)")
        text = run.judge_text(p.b, scope, p.pos)
    except Exception as exc:
        return JudgeOutcome(name, "error", 0.0, f"no text for the judge: {type(exc).__name__}: {exc}")
    request = JudgeRequest(render_prompt(prompt, text), text, p.rule.id, scope, p.score, name, p.rule.category)
    return call_judge(run.judges.get(name), request, timeout_s)
