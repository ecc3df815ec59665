"""Gated output rules (``rules[].gate``) in the engine: a rule's windowed scores capped by its gate rule's
running prompt score, ``min(own, scale * g + offset)`` (reference: :func:`guardrails.core.semantics.gate_cap`)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from guardrails.core.policy import Policy, Rule


class Gates:
    """Per gate rule, each row's highest windowed prompt score so far, and the caps it puts on gated rules.

    ``preset`` gives a gate's per-row prompt score when the prompt is not part of the run (calibration of a
    gated rule on answers alone; NaN: the prompt scored nothing). A gate that has scored nothing leaves its
    rules uncapped (they score the answer alone).
    """

    def __init__(self, policy: Policy, batch: int, preset: dict[str, Tensor] | None = None) -> None:
        ids = {r.id for r in policy.rules}
        self.best: dict[str, Tensor] = {}
        self.prefix: dict[str, Tensor] = {}  # per gate, its running best at each token of the current forward
        for rule in policy.rules:
            if rule.gate is not None and rule.gate.rule in ids:
                pre = (preset or {}).get(rule.gate.rule)
                self.best[rule.gate.rule] = torch.full((batch,), -math.inf) if pre is None else \
                    torch.as_tensor(pre, dtype=torch.float32).nan_to_num(nan=-math.inf)

    def __bool__(self) -> bool:
        return bool(self.best)

    def apply(self, rule: Rule, windowed: Tensor) -> Tensor:
        """Track ``rule``'s scores if it gates others; cap them if it is gated (NaN, not scored, stays NaN)."""
        best = self.best.get(rule.id)
        if best is not None:
            run = torch.cummax(windowed.nan_to_num(nan=-math.inf), dim=1).values
            self.prefix[rule.id] = torch.maximum(run, best[:, None])
            self.best[rule.id] = self.prefix[rule.id][:, -1].clone()
        gate = rule.gate
        if gate is None or gate.rule not in self.best:
            return windowed
        g = self.prefix.get(gate.rule)
        if g is None or g.shape != windowed.shape:  # the gate's layer did not run in this forward
            g = self.best[gate.rule][:, None].expand_as(windowed)
        cap = torch.where(torch.isinf(g), torch.full_like(g, math.inf), gate.scale * g + gate.offset)
        return torch.minimum(windowed, cap)

    def end_forward(self) -> None:
        self.prefix.clear()
