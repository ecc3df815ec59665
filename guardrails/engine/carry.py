"""Cross-layer terms of one forward: what shallower layers contribute to a rule that decides deeper.

Two kinds of rule read more than one layer, and both decide at their deepest layer:

- a multi-layer linear probe: each shallower layer ``l`` adds ``x_l · w_l`` at the same token
  (:class:`~guardrails.engine.compile.Feed` per layer, computed from the raw hidden state);
- an ensemble with an SAE-feature member: the member is a "carry head" of the scorer at its SAE's layer,
  and its scaled token score is added to the ensemble's column, at that layer or a deeper one.

:class:`Carry` holds those terms between the layer hooks of one forward. A term that could not be
computed is kept as an error, so the rule it feeds follows ``on_error`` at its own layer instead of
scoring without the term. :meth:`Carry.clear` drops whatever a cut forward left behind.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from guardrails.engine.scorers import LayerScorer, check_finite


class Carry:
    """The cross-layer terms of one guarded call (reset after every forward)."""

    def __init__(self, scorers: dict[int, LayerScorer], feeds: dict[int, Any]) -> None:
        self.feeds = feeds
        self.terms: dict[str, Tensor] = {}
        """Rule id -> the summed token terms [B, T] waiting for that rule's layer."""
        self.error: Exception | None = None
        """Why a term of this forward could not be computed (its rule then fails too)."""
        # per layer, the ensembles' SAE members scored there: (head, the ensemble's head there or None, id, scale)
        self.members: dict[int, list[tuple[int, int | None, str, float]]] = {}
        for layer, sc in scorers.items():
            here = {h.rule.id: i for i, h in enumerate(sc.heads) if h.carry is None}
            self.members[layer] = [(i, here.get(h.carry[0]), *h.carry) for i, h in enumerate(sc.heads)
                                   if h.carry is not None]
        self.sae_fed = frozenset(c[2] for cs in self.members.values() for c in cs)
        """Ensemble rules with an SAE member (their decisions list that member's top features)."""

    def _add(self, rule_id: str, term: Tensor) -> None:
        prev = self.terms.get(rule_id)
        self.terms[rule_id] = term if prev is None else prev + term

    def feed(self, layer: int, hidden: Tensor) -> None:
        """Token terms ``x_l · w_l`` of the multi-layer rules this layer feeds (none: nothing to do)."""
        feed = self.feeds.get(layer)
        if feed is None:
            return
        try:
            part = hidden.float() @ feed.weight.to(hidden.device).T  # [B, T, n_rules_fed]
            check_finite(part, "multi-layer probe term")
        except Exception as exc:
            self.error = exc
            part = None
        for j, rid in enumerate(feed.rule_ids):
            self._add(rid, part[..., j] if part is not None else torch.zeros(hidden.shape[:2], device=hidden.device))

    def take(self, scorer: LayerScorer) -> dict[int, Tensor]:
        """The carried terms of the rules this scorer decides, by head index (removed from the carry); raises
        the error of a term that could not be computed."""
        carried = {h_i: self.terms.pop(h.rule.id) for h_i, h in enumerate(scorer.heads) if h.rule.id in self.terms}
        if carried and self.error is not None:
            raise self.error
        return carried

    def add_members(self, layer: int, raw: Tensor) -> None:
        """Ensembles' SAE members scored at this layer (columns of ``raw`` [B, T, heads]): each scaled token
        score is added to its ensemble's column here, or kept for the ensemble's deeper layer."""
        for h_i, j, target, scale in self.members[layer]:
            term = raw[..., h_i] * scale
            if j is not None:
                raw[..., j] += term
            else:
                self._add(target, term)

    def failed(self, layer: int, exc: Exception, shape: tuple[int, int], device: torch.device) -> None:
        """Scoring at ``layer`` failed: the deeper ensembles its SAE members feed cannot score either (an
        ensemble decided at this layer already follows on_error with the layer's other rules)."""
        deeper = {target for _, j, target, _ in self.members.get(layer, []) if j is None}
        self.error = exc if deeper else None
        for target in deeper:
            self.terms.setdefault(target, torch.zeros(shape, device=device))

    def clear(self) -> None:
        """End of a forward: drop the terms that never reached their rule's layer (a cut forward)."""
        self.terms.clear()
        self.error = None
