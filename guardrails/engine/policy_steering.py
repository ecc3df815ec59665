"""Policy steering: steer rules and ``steering:`` entries compiled per layer, and their per-call state.

:func:`compile_steers` turns a policy's steers into :class:`PlannedSteer` per layer (directions resolved
from files, SAE decoder rows or probe weights); a :class:`SteerState` per guarded call tracks which rows
steer from which position, as their trigger rules fire; :func:`arm_from_scan` arms it from a prompt
pre-scan. The vectors are applied with :func:`guardrails.engine.steering.apply_steer`, the primitive that
also serves :func:`guardrails.engine.steering.steering`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from guardrails.engine.hooks import decoder_layers
from guardrails.engine.steering import (
    SteeringError,
    SteerVector,
    apply_steer,
    hidden_size,
    load_direction,
    unit_direction,
)

if TYPE_CHECKING:
    from guardrails.sae.model import SAE

# -- policies: steer rules compiled per layer, and their per-call state --------------------------------------
NEVER = 2**62
"""Start position meaning "not steering this row"."""


@dataclass(frozen=True)
class PlannedSteer:
    """One policy steer (a steer rule's, or a ``steering:`` entry's) at one layer."""

    id: str
    """The rule or steering entry id."""
    trigger: Literal["self", "when", "always"]
    """self: a rule with ``action: steer`` steers from its own trip; when: from another rule's; always."""
    gate: str | None
    """Rule whose firing starts steering (self and when)."""
    positions: str
    """generated | all (for when/always)."""
    vector: SteerVector
    """Direction and settings."""


def uses_plan(steer: Any) -> bool:
    """Whether a rule's ``steer:`` settings go through this module (else the scorer's legacy subtract/clamp)."""
    return bool(steer.direction is not None or steer.layers is not None or steer.method == "add"
                or steer.relative_to == "norm")


def compile_steers(
    policy: Any, model: nn.Module, saes: dict[str, SAE], linear: dict[str, tuple[Tensor, Tensor]],
) -> dict[int, list[PlannedSteer]]:
    """``{layer: [PlannedSteer]}`` for the policy's steer rules (new-style settings) and ``steering:`` entries."""
    from guardrails.core.policy import PolicyError, SAEFeaturesDetector
    from guardrails.core.semantics import rule_layer

    n_layers = len(decoder_layers(model))
    d_model = hidden_size(model)
    plan: dict[int, list[PlannedSteer]] = {}
    entries: list[tuple[str, Any, Any, str | None, str, Any]] = []
    for i, r in enumerate(policy.rules):
        if r.action == "steer" and r.steer is not None and uses_plan(r.steer):
            entries.append((f"rules[{i}].steer", r.steer, "self", r.id, r.id, r))
    for i, sr in enumerate(getattr(policy, "steering", []) or []):
        entries.append((f"steering[{i}].steer", sr.steer, "always" if sr.always else "when", sr.when, sr.id, None))
    for where, st, trigger, gate, sid, rule in entries:
        layers = st.layers
        ref = st.direction
        if ref is not None and ref.startswith("sae:"):
            _, sae_id, fid = ref.split(":")
            sae = saes.get(sae_id) or _load_sae(policy, sae_id)
            try:
                sae.check_features([int(fid)], where=f"{where}.direction")
            except Exception as exc:
                raise PolicyError(f"policy {policy.name!r}: {exc}") from None
            raw = sae.W_dec.data[int(fid)]
            layers = layers or [policy.saes[sae_id].layer]
        elif ref is not None:
            raw, meta = load_direction(policy.resolve(ref))
            if layers is None and "layer" in meta:
                layers = [int(meta["layer"])]
        elif rule is not None and isinstance(rule.detector, SAEFeaturesDetector):
            sae = saes.get(rule.detector.sae) or _load_sae(policy, rule.detector.sae)
            feats = st.features or [f.id for f in rule.detector.features]
            weights = [1.0] * len(feats) if st.features else [f.weight for f in rule.detector.features]
            rows = sae.W_dec.data[torch.tensor(feats)].float()
            rows = rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            raw = (torch.tensor(weights)[:, None] * rows).sum(0)
        else:
            assert rule is not None
            raw = linear[rule.id][0]
        if layers is None:
            if rule is None:
                raise PolicyError(f"policy {policy.name!r}: {where}.layers: required (the direction file "
                                  f"{ref!r} records no layer)")
            layers = [rule_layer(policy, rule)]
        bad = [x for x in layers if not 0 <= x < n_layers]
        if bad:
            raise PolicyError(f"policy {policy.name!r}: {where}.layers: {bad} out of range; valid: 0..{n_layers - 1}")
        try:
            unit = unit_direction(raw, d_model, where=f"{where}.direction")
        except SteeringError as exc:
            raise PolicyError(f"policy {policy.name!r}: {exc}") from None
        sign = -1.0 if st.method == "subtract" else 1.0
        vec = SteerVector(unit, sign * float(st.strength), st.relative_to, "clamp" if st.method == "clamp" else "add",
                          label=sid)
        for layer in layers:
            plan.setdefault(layer, []).append(PlannedSteer(sid, trigger, gate, st.positions, vec))
    return plan


def _load_sae(policy: Any, sae_id: str) -> SAE:
    from guardrails.sae.model import SAE

    spec = policy.saes[sae_id]
    return SAE.load(policy.resolve(spec.path), layer=spec.layer, k=spec.k, format=spec.format, dtype=spec.dtype)


class SteerState:
    """Per-call state of a plan: from which position each row is steered by each entry."""

    def __init__(self, plan: dict[int, list[PlannedSteer]], batch: int, prompt_lengths: list[int]) -> None:
        self.plan = plan
        self.prompt_lengths = prompt_lengths
        self.start: dict[str, Tensor] = {}
        for ps in (p for items in plan.values() for p in items):
            if ps.id in self.start:
                continue
            start = torch.full((batch,), NEVER, dtype=torch.long)
            if ps.trigger == "always":
                start = torch.tensor([1 if ps.positions == "all" else max(n - 1, 1) for n in prompt_lengths],
                                     dtype=torch.long)
            self.start[ps.id] = start

    def on_fire(self, rule_id: str, b: int, pos: int) -> None:
        """Rule ``rule_id`` fired on row ``b`` at ``pos``: start the entries it gates."""
        for ps in (p for items in self.plan.values() for p in items):
            if ps.gate != rule_id:
                continue
            at = pos if ps.trigger == "self" or ps.positions == "all" else max(pos, self.prompt_lengths[b] - 1)
            self.start[ps.id][b] = min(int(self.start[ps.id][b]), at)

    def steered(self, b: int) -> bool:
        return any(int(s[b]) < NEVER for s in self.start.values())

    def prescan_gates(self, policy: Any) -> set[str]:
        """Input rules gating an entry they cannot reach in one pass: the gate reads a deeper layer than
        the entry steers, so at prefill its verdict comes after the prompt (and the last prompt token,
        which predicts the first generated token) went through the steered layer. A scan of the prompt
        first (:func:`arm_from_scan`) opens such gates before the prefill."""
        from guardrails.core.semantics import rule_layer

        rules = {r.id: r for r in policy.rules}
        out = set()
        for layer, items in self.plan.items():
            for ps in items:
                gate = rules.get(ps.gate or "") if ps.trigger == "when" else None
                if gate is not None and gate.scope == "input" and rule_layer(policy, gate) > layer:
                    out.add(gate.id)
        return out


    def apply(self, layer: int, hidden: Tensor, positions: Tensor, steer_mask: Tensor) -> Tensor | None:
        """``hidden`` steered by the entries at ``layer`` on the rows and positions they cover (None: none)."""
        out: Tensor | None = None
        for ps in self.plan.get(layer, ()):
            start = self.start[ps.id].to(hidden.device)
            where = (positions >= start[:, None]) & steer_mask & (positions > 0)
            if bool(where.any()):
                out = apply_steer(hidden if out is None else out, ps.vector, where)
        return out


def arm_from_scan(guard: Any, run: Any, prompts: list[str]) -> None:
    """Open, before the prefill, the steering gated by input rules that fire on a scan of the prompts.

    ``prompts`` are the formatted prompt texts. The gate's decision from the scan goes into the run (and
    latches the rule there, so the steered prefill does not record it again).
    """
    state: SteerState | None = run.steer_state
    if state is None:
        return
    gates = state.prescan_gates(guard.policy)
    if not gates:
        return
    scans = guard.score(prompts, chat=False)
    for b, scan in enumerate(scans):
        for d in scan.decisions:
            if d.rule in gates and d.action in ("flag", "steer") and not bool(run.states[d.rule].fired[b]):
                run.states[d.rule].fired[b] = True
                run.decisions.append(type(d)(**{**d.__dict__, "sequence": b}))
                state.on_fire(d.rule, b, 1)



__all__ = ["NEVER", "PlannedSteer", "SteerState", "arm_from_scan", "compile_steers", "uses_plan"]
