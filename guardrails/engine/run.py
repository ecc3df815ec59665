"""The policy engine: per-forward scoring, decisions, and steering, with state across decode steps.

One :class:`GuardRun` exists per guarded call (its own state: windows, latches, decisions), so a
shared model never mixes requests. The generation loop tells the run, before each forward, which
positions are new and which are prompt or output; the layer hooks call :meth:`GuardRun.on_layer`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from guardrails.core.cascade import Judge, JudgeOutcome
from guardrails.core.decision import Decision, DecisionAction
from guardrails.core.policy import Policy, Rule
from guardrails.core.semantics import ROLE_CODES, escalate, on_error_of, rule_layer, threshold_of
from guardrails.engine import escalation
from guardrails.engine.carry import Carry
from guardrails.engine.categories import CategoryState, LoadedHead
from guardrails.engine.columns import column_roles, prompt_columns, role_name, scope_columns
from guardrails.engine.escalation import PendingJudge
from guardrails.engine.gates import Gates
from guardrails.engine.policy_steering import PlannedSteer, SteerState, uses_plan
from guardrails.engine.scorers import LayerScorer, check_finite, window_aggregate

logger = logging.getLogger(__name__)

@dataclass
class StepContext:
    """What the loop tells the engine about the forward about to run."""

    positions: Tensor
    """[B, T] absolute position of each column (-1 for padding)."""
    score_mask: Tensor
    """[B, T] columns to score now (new, real, not special, not position 0, sequence active)."""
    is_output: Tensor
    """[B, T] columns that are generated tokens (else prompt)."""
    steer_mask: Tensor
    """[B, T] columns that may be steered (real tokens)."""
    roles: Tensor | None = None
    """[B, T] role code of each prompt column (``ROLE_CODES``; -1 none); None: every prompt token is the user's."""


@dataclass
class RuleState:
    history: Tensor
    fired: Tensor  # [B] bool: latched
    steer_from: Tensor  # [B] long: absolute position steering starts (large = never)


@dataclass
class GuardRun:
    """State of one guarded call over a batch of ``batch`` sequences."""

    policy: Policy
    scorers: dict[int, LayerScorer]
    batch: int
    prompt_lengths: list[int]
    record_trace: bool = True
    ctx: StepContext | None = None
    decisions: list[Decision] = field(default_factory=list)
    blocked_at: list[int | None] = field(default_factory=list)
    block_rule: list[str | None] = field(default_factory=list)
    trace_scores: dict[str, list[tuple[Tensor, Tensor]]] = field(default_factory=dict)
    states: dict[str, RuleState] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    seen_layers: set[int] = field(default_factory=set)
    tripping_token: dict[int, int] = field(default_factory=dict)
    """Per blocked sequence, the id of the withheld token that tripped the rule (for audits)."""
    steer: bool = True
    """Apply steer rules (False when only scanning text: deeper rules then read unsteered activations)."""
    decide: bool = True
    """Fire rules (False: trace scores only, for calibration)."""
    input_roles: frozenset[int] = frozenset({ROLE_CODES["user"], ROLE_CODES["tool"]})
    """Role codes of the prompt turns input rules score (the policy's ``input_roles``)."""
    prompt_roles: list[list[int]] | None = None
    """Per row, the role code of each prompt token (the decode loop's prompts); None: all the user's."""
    steers: dict[int, list[PlannedSteer]] = field(default_factory=dict)
    """Steering plan per layer (steer rules with direction/layers/add/norm settings, and ``steering:`` entries)."""
    steer_state: SteerState | None = None
    judges: dict[str, Judge] = field(default_factory=dict)
    """Bound judges by name (cascade rules; :mod:`guardrails.core.cascade`)."""
    judge_text: Callable[[int, str, int], str] | None = None
    """``judge_text(row, "input"|"output", position)``: the text a judge reads (set by the serving path; None:
    a judge call is an error and follows on_error)."""
    verdicts: dict[tuple[str, int], JudgeOutcome] = field(default_factory=dict)
    """Judge outcome per (rule id, row): a judge is asked at most once per rule and sequence."""
    judge_presets: dict[tuple[str, int], JudgeOutcome] = field(default_factory=dict)
    """Outcomes already known per (rule id, row), used instead of calling the judge (vLLM: the driver judged the
    prompt between two passes, :mod:`guardrails.vllm.cascade`)."""
    hold_bands: str = ""
    """``"input"``: an input rule's band hit without a preset outcome blocks, recorded as held for the driver's judge
    (vLLM's first pass: the request ends at its prefill, nothing is released, and it runs again once judged);
    ``"all"``: output rules' band hits too (greedy or seeded decoding, which the second pass repeats); ``""``: off."""
    feeds: dict[int, Any] = field(default_factory=dict)
    """Shallower-layer terms of multi-layer linear rules (:class:`~guardrails.engine.compile.Feed` per layer):
    their token scores are carried to the rule's own layer within the same forward and added there."""
    gate_preset: dict[str, Tensor] | None = None
    """Per gate rule id, each row's prompt score when the prompt is not part of this run (calibrating a gated
    rule on answers alone; :class:`~guardrails.engine.gates.Gates`). Generation and scans compute it."""
    categories: dict[str, LoadedHead] = field(default_factory=dict)
    """Category heads by rule id (``rules[].categories``): what each decision names, and its action per category."""
    pending_judges: list[PendingJudge] = field(default_factory=list)
    """Cascade band hits of this forward, waiting for the judge (:mod:`guardrails.engine.escalation`)."""
    _top_chunks: list[tuple[Tensor, Tensor, Tensor, Tensor]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.blocked_at = [None] * self.batch
        self.block_rule = [None] * self.batch
        self.steer_state = SteerState(self.steers, self.batch, self.prompt_lengths)  # steering plan (steering.py)
        for rule in self.policy.rules:
            w = rule.detector.window
            self.states[rule.id] = RuleState(
                history=torch.full((self.batch, w - 1), float("nan")),
                fired=torch.zeros(self.batch, dtype=torch.bool),
                steer_from=torch.full((self.batch,), 2**62, dtype=torch.long),
            )
            self.trace_scores[rule.id] = []
        self._gates = Gates(self.policy, self.batch, self.gate_preset)
        self._categories = CategoryState(self.categories)
        # per layer, the heads in scoring order: gated rules after the others, so a gate at the same layer is
        # known before the rules it caps
        self._head_order = {layer: [i for i, h in enumerate(s.heads) if h.rule.gate is None and h.carry is None]
                            + [i for i, h in enumerate(s.heads) if h.rule.gate is not None and h.carry is None]
                            for layer, s in self.scorers.items()}
        self._carry = Carry(self.scorers, self.feeds)  # cross-layer terms (multi-layer probes, ensembles)
        order = sorted(range(len(self.policy.rules)), key=lambda i: (rule_layer(self.policy, self.policy.rules[i]), i))
        # rule id -> place in scoring order (layer, then policy order): ties at one position resolve so
        self.rule_rank = {self.policy.rules[i].id: n for n, i in enumerate(order)}

    # -- queries ----------------------------------------------------------------------------------
    def active(self, b: int) -> bool:
        return self.blocked_at[b] is None

    def accepts(self, b: int, pos: int) -> bool:
        """Whether a decision at ``pos`` can still happen: the row is not blocked at or before it.

        One forward may score many positions (prefill, scans): a block found at a later position by
        one layer does not hide an earlier one found by the next layer, exactly as token-by-token.
        """
        at = self.blocked_at[b]
        return at is None or pos < at

    def steered(self, b: int) -> bool:
        planned = self.steer_state is not None and self.steer_state.steered(b)
        return planned or any(bool(s.steer_from[b] < 2**62) for s in self.states.values())

    def on_error_of(self, rule: Rule) -> str:
        return on_error_of(self.policy, rule)

    # -- the hook --------------------------------------------------------------------------------
    def on_layer(self, layer: int, hidden: Tensor) -> Tensor | None:
        """Score the new tokens at ``layer``, record decisions, and return steered hidden (or None)."""
        ctx = self.ctx
        if ctx is None:
            return None
        self._carry.feed(layer, hidden)
        if layer not in self.scorers:  # a layer only steered (steering plan) or feeding a deeper rule
            return self._steer_planned(layer, hidden, None)
        self.seen_layers.add(layer)
        scorer = self.scorers[layer]
        B, T = hidden.shape[:2]
        dev = hidden.device
        score_mask = ctx.score_mask.to(dev)[:, -T:]
        is_output = ctx.is_output.to(dev)[:, -T:]
        positions = ctx.positions.to(dev)[:, -T:]
        try:
            carried = self._carry.take(scorer)  # raises when a shallower term of a rule here failed
            if bool(score_mask.all()):  # decode steps: every row's one new token (no gather/scatter)
                feats_all = scorer.feature_matrix(hidden)
                check_finite(feats_all, f"layer {layer} feature activations")  # NaN/inf in x propagates here
                if self.record_trace and scorer.last_top is not None:
                    self._top_chunks.append((positions, score_mask, *scorer.last_top))
                raw = scorer.rule_scores(feats_all)
            elif bool(score_mask.any()):
                sel = hidden[score_mask]
                feats_sel = scorer.feature_matrix(sel)
                check_finite(feats_sel, f"layer {layer} feature activations")
                if self.record_trace and scorer.last_top is not None:
                    self._top_chunks.append((positions, score_mask, *scorer.last_top))
                raw = torch.full((B, T, len(scorer.heads)), float("nan"), device=dev)
                raw[score_mask] = scorer.rule_scores(feats_sel)
            else:
                raw = torch.full((B, T, len(scorer.heads)), float("nan"), device=dev)
            for h_i, part in carried.items():  # multi-layer linear rules: add their shallower layers' terms
                raw[..., h_i] += part.to(raw.device, raw.dtype)
            self._carry.add_members(layer, raw)
        except Exception as exc:
            self._carry.failed(layer, exc, (B, T), dev)
            self._scoring_failed(scorer, positions, score_mask, is_output, exc)
            return self._steer(scorer, hidden, positions, ctx.steer_mask.to(dev)[:, -T:]) if self.steer else None

        roles = column_roles(ctx.roles, self.prompt_roles, positions)
        prompt_ok = prompt_columns(is_output, roles, self.input_roles)  # once per forward: every rule's scope uses it
        for h_i in self._head_order[layer]:
            head = scorer.heads[h_i]
            rule = head.rule
            st = self.states[rule.id]
            scope_ok = scope_columns(rule, is_output, prompt_ok) & score_mask
            s = raw[..., h_i].masked_fill(~scope_ok, float("nan")).cpu()
            if self.decide and rule.id in self.categories:  # the tokens its category head reads
                reads = prompt_ok & score_mask if self._categories.reads_prompt(rule.id) else scope_ok
                self._categories.observe(rule.id, hidden, reads)
            windowed, st.history = window_aggregate(st.history, s, rule.detector.window, rule.detector.aggregate)
            if self._gates:
                windowed = self._gates.apply(rule, windowed)  # rules[].gate: an answer capped by its request
            if self.record_trace:
                self.trace_scores[rule.id].append((positions.cpu(), windowed))
            if not self.decide:
                continue
            hits = (windowed >= rule.threshold) & ~torch.isnan(windowed)
            if not bool(hits.any()):
                continue
            block_above = rule.steer.block_above if rule.action == "steer" and rule.steer else None
            for b in hits.any(dim=1).nonzero().flatten().tolist():
                if rule.escalate_above is not None:  # cascade: the band waits for the judge (resolve_escalations)
                    escalation.cascade_hits(self, rule, head, scorer, b, windowed[b], positions[b], is_output[b],
                                            hidden, roles)
                    continue
                # the first hit fires; for a steer rule with block_above, so does the first score reaching it
                # (token by token, a later forward would see it: a scan of many tokens must too)
                cands = [int(hits[b].nonzero()[0])]
                if block_above is not None:
                    high = (windowed[b] >= block_above).nonzero()
                    if len(high):
                        cands.append(int(high[0]))
                for t in sorted(set(cands)):
                    pos = int(positions[b, t])
                    if not self.accepts(b, pos):
                        break
                    self.fire(rule, head, scorer, b, t, pos, float(windowed[b, t]), bool(is_output[b, t]), hidden,
                              None if roles is None else int(roles[b, t]))
        if not self.steer:
            return None
        return self._steer(scorer, hidden, positions, ctx.steer_mask.to(dev)[:, -T:])

    def token_features(self, b: int) -> dict[int, list[tuple[int, float]]]:
        """Top SAE features (id, activation) at each scored position of sequence ``b`` (built lazily)."""
        out: dict[int, list[tuple[int, float]]] = {}
        for positions, score_mask, vals, idx in self._top_chunks:
            rows = score_mask.nonzero().tolist()
            v, i = vals.reshape(-1, vals.shape[-1]).cpu().tolist(), idx.reshape(-1, idx.shape[-1]).cpu().tolist()
            for (row, t), vs, ids in zip(rows, v, i, strict=True):
                if row == b:
                    out[int(positions[row, t])] = [(int(f), round(float(a), 3)) for a, f in zip(vs, ids, strict=True)
                                                   if a > 0]
        return out

    def check_all_scored(self) -> None:
        """After a forward: a watched layer whose hook never ran could not score; apply on_error. Then the
        judges decide the band hits of this forward (:meth:`resolve_escalations`)."""
        ctx = self.ctx
        self._carry.clear()  # terms of a forward that never reached their rule's layer (a cut forward)
        self._gates.end_forward()
        if ctx is not None:
            for layer, scorer in self.scorers.items():
                if layer not in self.seen_layers and bool(ctx.score_mask.any()):
                    exc = RuntimeError(f"the hook on layer {layer} did not run during the forward pass")
                    self._scoring_failed(scorer, ctx.positions, ctx.score_mask, ctx.is_output, exc)
            self.seen_layers.clear()
        self.resolve_escalations()

    # -- the cascade (its queue and judges: guardrails/engine/escalation.py) ---------------------------------
    def resolve_escalations(self) -> None:
        """Ask the judges about this forward's pending band hits and apply the verdicts."""
        escalation.resolve_escalations(self)

    def fire(
        self, rule: Rule, head: object, scorer: LayerScorer, b: int, t: int, pos: int, score: float, out: bool,
        hidden: Tensor, role: int | None = None, threshold: float | None = None,
    ) -> None:
        """Rule ``rule`` fires on row ``b`` at token ``t`` (absolute position ``pos``): record the decision
        (latched after the first unless it blocks), then block the row or start its steering."""
        st = self.states[rule.id]
        action: DecisionAction = escalate(rule, score)  # type: ignore[assignment]
        decided_at = threshold_of(rule, action) if threshold is None else threshold  # before a category's action
        named = self._categories.name(rule.id, b, t)  # rules[].categories: the category this decision names
        category = named if named is not None else rule.category
        action = self._categories.action(rule.id, named, action)  # type: ignore[assignment]
        if bool(st.fired[b]) and action != "block":
            return  # latched: first firing recorded; steering already on
        st.fired[b] = True
        top = tuple(scorer.top_features(hidden[b, t].detach()))
        if not top and self.record_trace and rule.id in self._carry.sae_fed:
            # an ensemble deciding at a layer without an SAE: the top features its SAE member saw at this token
            top = tuple(self.token_features(b).get(pos, []))
        d = Decision(
            action=action,
            rule=rule.id,
            score=score,
            threshold=decided_at,
            position=pos,
            scope="output" if out else "input",
            sequence=b,
            output_index=pos - self.prompt_lengths[b] if out else None,
            top_features=top,
            role=role_name(out, role),
            category=category,
        )
        self.decisions.append(d)
        if action == "block":
            self.block_row(b, pos, rule.id)
        elif action == "steer":
            st.steer_from[b] = pos
        if action != "block" and self.steer_state is not None:
            self.steer_state.on_fire(rule.id, b, pos)  # starts steer plans gated by this rule (steering.py)

    def block_row(self, b: int, pos: int, rule_id: str) -> None:
        """Row ``b`` stops at ``pos``; decisions a token-by-token run would never reach are dropped."""
        self.blocked_at[b] = pos
        self.block_rule[b] = rule_id
        self.decisions = [d for d in self.decisions if d.sequence != b or d.position <= pos]

    def _scoring_failed(
        self, scorer: LayerScorer, positions: Tensor, score_mask: Tensor, is_output: Tensor, exc: Exception
    ) -> None:
        reason = f"{type(exc).__name__}: {exc}"
        self.errors.append(reason)
        logger.warning("guard could not score at layer %d: %s", scorer.layer, reason)
        roles = column_roles(self.ctx.roles, self.prompt_roles, positions) if self.ctx is not None else None
        prompt_ok = prompt_columns(is_output, roles, self.input_roles)
        for head in scorer.heads:
            if head.carry is not None:  # an ensemble's member: the ensemble follows on_error at its own layer
                continue
            rule = head.rule
            scope_ok = scope_columns(rule, is_output, prompt_ok) & score_mask
            for b in scope_ok.any(dim=1).nonzero().flatten().tolist():
                t = int(scope_ok[b].nonzero()[0])
                pos = int(positions[b, t])
                if not self.accepts(b, pos):
                    continue
                resolution = self.on_error_of(rule)
                out = bool(is_output[b, t])
                self.decisions.append(Decision(
                    action="error", rule=rule.id, score=float("nan"), threshold=rule.threshold, position=pos,
                    scope="output" if out else "input", sequence=b,
                    output_index=pos - self.prompt_lengths[b] if out else None,
                    reason=reason, resolution=resolution,
                ))
                if resolution == "block":
                    self.block_row(b, pos, rule.id)

    def _steer(self, scorer: LayerScorer, hidden: Tensor, positions: Tensor, steer_mask: Tensor) -> Tensor | None:
        out: Tensor | None = None
        for head in scorer.heads:
            rule = head.rule
            if rule.action != "steer" or rule.steer is None or uses_plan(rule.steer):
                continue  # new-style steer settings run in the steering plan (below)
            start = self.states[rule.id].steer_from.to(hidden.device)
            where = (positions >= start[:, None]) & steer_mask & (positions >= 0)
            if not bool(where.any()):
                continue
            base = hidden if out is None else out
            m = where[..., None].to(hidden.dtype)
            if rule.steer.method == "subtract":
                assert head.steer_direction is not None
                delta = rule.steer.strength * head.steer_direction.to(hidden.dtype)
                out = base - m * delta
            else:
                assert head.clamp_columns is not None and head.clamp_dirs is not None
                if head.linear:  # remove the positive projection on the unit direction
                    acts = torch.relu(base.float() @ head.clamp_dirs.float().T)  # [B, T, 1]
                else:  # remove each feature's decoded contribution (clamp its activation to 0)
                    acts = scorer.feature_matrix(base).index_select(-1, head.clamp_columns)
                out = base - m * (acts.to(hidden.dtype) @ head.clamp_dirs.to(hidden.dtype))
        return self._steer_planned(scorer.layer, hidden, out)

    def _steer_planned(self, layer: int, hidden: Tensor, out: Tensor | None) -> Tensor | None:
        """The steering plan at ``layer`` on top of ``out`` (or ``hidden``); ``out`` when it adds nothing."""
        ctx = self.ctx
        if not self.steer or ctx is None or self.steer_state is None or layer not in self.steers:
            return out
        T = hidden.shape[1]
        dev = hidden.device
        planned = self.steer_state.apply(layer, hidden if out is None else out, ctx.positions.to(dev)[:, -T:],
                                         ctx.steer_mask.to(dev)[:, -T:])
        return out if planned is None else planned

    # -- results ------------------------------------------------------------------------------------
    def token_scores(self, b: int) -> dict[str, dict[int, float]]:
        """``{rule: {position: windowed score}}`` for sequence ``b`` over every scored token."""
        out: dict[str, dict[int, float]] = {}
        for rule_id, chunks in self.trace_scores.items():
            d: dict[int, float] = {}
            for pos, sc in chunks:
                row_p, row_s = pos[b], sc[b]
                ok = ~torch.isnan(row_s)
                for p, s in zip(row_p[ok].tolist(), row_s[ok].tolist(), strict=True):
                    d[int(p)] = float(s)
            out[rule_id] = d
        return out

