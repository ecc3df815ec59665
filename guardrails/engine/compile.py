"""The policy compiler: one :class:`CompiledPolicy` that every path scores with.

``compile_policy(policy, model, saes, score_mode)`` loads the SAEs and probe weights a policy needs,
checks them against the model, and builds one :class:`~guardrails.engine.scorers.LayerScorer` per
watched layer, placed on the device of that layer. Generation, streams, scans, the LangChain guards,
calibration, ``guardrails eval``, the ONNX export and the serving engines all take their scorers from it.
Variants (:meth:`CompiledPolicy.scoped`, :meth:`CompiledPolicy.unthresholded`) share its tensors:
nothing is reloaded (in watched mode the full SAE is gone after compiling; a variant never needs it).
:meth:`CompiledPolicy.score_residuals` scores residual rows captured elsewhere (a cache, another
engine) exactly as a forward hook would.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from guardrails.core.cascade import Judge, bind_judges
from guardrails.core.policy import (
    EnsembleDetector,
    LinearDetector,
    Policy,
    PolicyError,
    Rule,
    SAEFeaturesDetector,
    detector_offset,
    detector_parts,
    parts_where,
    regular_file,
)
from guardrails.core.semantics import ROLE_CODES, rule_layer, scoped_rules
from guardrails.engine.categories import LoadedHead, load_category_heads
from guardrails.engine.hooks import decoder_layers
from guardrails.engine.policy_steering import PlannedSteer, compile_steers
from guardrails.engine.run import GuardRun, StepContext
from guardrails.engine.scorers import LayerScorer
from guardrails.sae.model import SAE, SAEConfig, SAEError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Feed:
    """The shallower-layer terms of multi-layer linear rules at one layer: the token term ``x · weight[i]`` is
    carried to rule ``rule_ids[i]``'s own (deepest) layer and added to its score there, in the same forward."""

    rule_ids: tuple[str, ...]
    weight: Tensor
    """``[n_rules, d_model]`` float32, on the layer's device."""


@dataclass
class CompiledPolicy:
    """A policy bound to a model: its scorers per layer and the SAEs kept for audits."""

    policy: Policy
    """The policy (for a scoped variant: its rules for that scope only)."""
    scorers: dict[int, LayerScorer]
    """One scorer per watched layer, on that layer's device."""
    saes: dict[str, SAE]
    """SAEs kept in memory (watched mode keeps only those that explain linear rules in audits)."""
    sae_configs: dict[str, SAEConfig]
    """Config of every SAE the policy uses (kept when watched mode drops the weights)."""
    score_mode: str
    """exact (full TopK encode) or watched (only the watched encoder rows)."""
    n_layers: int
    """Decoder layers of the model."""
    decide: bool = True
    """False for :meth:`unthresholded`: scores are traced, nothing fires."""
    scope: str | None = None
    """None, or the scope a :meth:`scoped` variant was made for."""
    steers: dict[int, list[PlannedSteer]] = field(default_factory=dict)
    """Steering plan per layer (:func:`guardrails.engine.steering.compile_steers`); hooked with the scorers."""
    judges: dict[str, Judge] = field(default_factory=dict)
    """Judges of the cascade rules, by name (:mod:`guardrails.core.cascade`); see :meth:`with_judges`."""
    feeds: dict[int, Feed] = field(default_factory=dict)
    """Multi-layer linear rules' shallower layers (``detector.extra_layers``): hooked like the scorers."""
    categories: dict[str, LoadedHead] = field(default_factory=dict)
    """Category heads by rule id (``rules[].categories``), on their rule's layer device."""
    _variants: dict[Any, CompiledPolicy] = field(default_factory=dict, repr=False)

    @property
    def deepest(self) -> int:
        """The deepest watched layer (a scan stops the forward after it)."""
        return max(self.scorers)

    @property
    def input_role_codes(self) -> frozenset[int]:
        """Integer codes of the prompt roles input rules score."""
        return frozenset(ROLE_CODES[r] for r in self.policy.input_roles)

    def new_run(
        self, prompt_lengths: list[int], *, steer: bool = True, record_trace: bool = True
    ) -> GuardRun:
        """Fresh per-call state over a batch (one row per prompt)."""
        return GuardRun(
            self.policy, self.scorers, len(prompt_lengths), prompt_lengths, record_trace=record_trace, steer=steer,
            decide=self.decide, input_roles=self.input_role_codes, steers=self.steers, judges=self.judges,
            feeds=self.feeds, categories=self.categories,
        )

    @property
    def hooked_layers(self) -> set[int]:
        """Every layer a guarded forward hooks: scored, feeding a multi-layer rule, or steered."""
        return {*self.scorers, *self.feeds, *self.steers}

    def with_judges(self, judges: Mapping[str, Any], *, require: bool = True) -> CompiledPolicy:
        """This policy with ``judges`` bound by name (callables or LangChain chat models), sharing its tensors;
        with ``require``, a judge an escalating rule names but ``judges`` lacks is an error naming both."""
        bound = bind_judges(self.policy, {**self.judges, **judges}, require=require)
        return dataclasses.replace(self, judges=bound, _variants={})

    @functools.cached_property
    def scores_output(self) -> bool:
        """Whether a rule reads generated tokens. When none does, decode steps score nothing (an input-only
        policy costs its prefill, plus the steering its rules planned) and audits hold the prompt's features.
        Cached: read per request and step on the vLLM path (variants are new objects with their own cache)."""
        return any(r.scope in ("output", "both") for r in self.policy.rules)

    @functools.cached_property
    def hooks_decode(self) -> bool:
        """Whether decode steps need the layer hooks: a rule reads generated tokens, or something may steer them
        (a steer rule, a ``steering:`` entry). Else only the prefill runs hooked."""
        return self.scores_output or bool(self.steers) or any(r.action == "steer" for r in self.policy.rules)

    def scoped(self, mode: Literal["input", "output"]) -> CompiledPolicy:
        """The rules for an ``mode``-only guard (``both`` rules rescoped), sharing this policy's tensors."""
        key = ("scoped", mode)
        if key not in self._variants:
            rules = {r.id: r for r in scoped_rules(self.policy, mode)}
            policy = self.policy.model_copy(update={"rules": [r for r in rules.values()]})
            scorers: dict[int, LayerScorer] = {}
            for layer, sc in self.scorers.items():
                heads = [dataclasses.replace(h, rule=rules[h.rule.id]) for h in sc.heads if h.rule.id in rules]
                heads += [dataclasses.replace(h, rule=h.rule.model_copy(update={"scope": rules[h.carry[0]].scope}))
                          for h in sc.heads if h.carry is not None and h.carry[0] in rules]  # ensembles' SAE members
                if heads:
                    clone = copy.copy(sc)
                    clone.heads = heads
                    scorers[layer] = clone
            feeds = {}
            for layer, fd in self.feeds.items():
                keep = [j for j, rid in enumerate(fd.rule_ids) if rid in rules]
                if keep:
                    feeds[layer] = Feed(tuple(fd.rule_ids[j] for j in keep), fd.weight[keep])
            self._variants[key] = dataclasses.replace(self, policy=policy, scorers=scorers, scope=mode, feeds=feeds,
                                                      _variants={})
        if self._variants[key].judges is not self.judges:  # bound after the variant was made
            self._variants[key] = dataclasses.replace(self._variants[key], judges=self.judges)
        return self._variants[key]

    def unthresholded(self) -> CompiledPolicy:
        """The same scorers with no decisions: for calibration, which reads the traced scores."""
        if "unthresholded" not in self._variants:
            self._variants["unthresholded"] = dataclasses.replace(self, decide=False, _variants={})
        return self._variants["unthresholded"]

    def score_residuals(
        self,
        residuals: dict[int, Tensor],
        *,
        score_mask: Tensor,
        is_output: Tensor,
        roles: Tensor | None = None,
        positions: Tensor | None = None,
        prompt_lengths: list[int] | None = None,
        run: GuardRun | None = None,
    ) -> GuardRun:
        """Score residual rows ``{layer: [B, T, d_model]}`` as the forward hooks would, without a model.

        ``score_mask``/``is_output``/``roles`` are ``[B, T]`` (see :class:`~guardrails.engine.run.StepContext`);
        ``positions`` default to ``0..T-1``. Pass ``run`` to continue a call (cached decode steps); the
        run is returned with its decisions and traced scores. Steering is not applied (nothing to steer).
        """
        read = sorted({*self.scorers, *self.feeds})  # scored or feeding a deeper multi-layer rule
        missing = sorted(set(read) - set(residuals))
        if missing:
            raise ValueError(f"score_residuals: no residuals for watched layer(s) {missing}; got {sorted(residuals)}")
        B, T = score_mask.shape
        if positions is None:
            positions = torch.arange(T).expand(B, T)
        if run is None:
            run = self.new_run(prompt_lengths or [int((~is_output[b]).sum()) for b in range(B)], steer=False)
        run.ctx = StepContext(positions=positions, score_mask=score_mask, is_output=is_output,
                              steer_mask=score_mask.clone(), roles=roles)
        try:
            for layer in read:
                run.on_layer(layer, residuals[layer])
            run.check_all_scored()
        finally:
            run.ctx = None
        return run


def compile_policy(
    policy: Policy | str | os.PathLike[str],
    model: Any,
    saes: dict[str, SAE] | None = None,
    score_mode: str | None = None,
    *,
    keep_full_saes: bool = False,
    judges: Mapping[str, Any] | None = None,
) -> CompiledPolicy:
    """Bind ``policy`` to ``model``: load its SAEs (unless given) and probes, check them, build scorers.

    ``judges``: the cascade's second-stage judges by name (see :mod:`guardrails.core.cascade`); when given,
    every judge an escalating rule names must be among them. Without, a band hit's judge call is an error
    that follows on_error (bind them later with :meth:`CompiledPolicy.with_judges`)."""
    pol = policy if isinstance(policy, Policy) else Policy.from_path(policy)
    mode = score_mode or pol.score_mode
    if mode not in ("exact", "watched"):
        raise ValueError(f"unknown score_mode {mode!r}; valid: exact, watched")
    layers = decoder_layers(model)
    cfg = model.config
    hidden = int(getattr(cfg, "hidden_size", 0) or cfg.get_text_config().hidden_size)
    loaded = _load_saes(pol, saes or {}, hidden)
    pol.check_against(len(layers), {k: s.d_sae for k, s in loaded.items()})
    linear, fed = _load_linear(pol, hidden)
    by_layer: dict[int, list[Any]] = {}
    for i, rule in enumerate(pol.rules):
        by_layer.setdefault(rule_layer(pol, rule), []).append((i, rule))
    carries: dict[str, tuple[str, float]] = {}
    for i, member, carry in _carry_rules(pol):  # ensembles' SAE members: heads at their SAE's layer
        by_layer.setdefault(rule_layer(pol, member), []).append((i, member))
        carries[member.id] = carry
    scorers: dict[int, LayerScorer] = {}
    for layer, rules in by_layer.items():
        scorer = LayerScorer(layer, rules, pol, loaded, linear, mode, carries)
        if scorer.sae is None:
            here = [s for s, spec in pol.saes.items() if spec.layer == layer and s in loaded]
            scorer.audit_sae = loaded[here[0]] if here else None
        dev = next(layers[layer].parameters()).device
        scorers[layer] = scorer.to(dev)
    configs = {sid: sae.cfg for sid, sae in loaded.items()}
    steers = compile_steers(pol, model, loaded, linear)  # before watched mode drops the full SAEs
    if mode == "watched" and not keep_full_saes:
        # only the watched encoder rows (and steering directions) stay in memory: a few KB instead of the
        # whole layer (2 GB for a Qwen3-8B W64K SAE); audits then list watched features only
        for scorer in scorers.values():
            scorer.release_full_sae()
        kept = {id(sc.audit_sae) for sc in scorers.values()}
        loaded = {sid: s for sid, s in loaded.items() if id(s) in kept}
    bound = bind_judges(pol, judges, require=judges is not None)
    feeds = {layer: Feed(fd.rule_ids, fd.weight.to(next(layers[layer].parameters()).device))
             for layer, fd in fed.items()}
    by_id = {r.id: r for r in pol.rules}
    heads = {rid: h.to(next(layers[rule_layer(pol, by_id[rid])].parameters()).device)
             for rid, h in load_category_heads(pol, hidden).items()}
    return CompiledPolicy(pol, scorers, loaded, configs, mode, len(layers), steers=steers, judges=bound, feeds=feeds,
                          categories=heads)


def _load_saes(policy: Policy, given: dict[str, SAE], hidden: int) -> dict[str, SAE]:
    used = {d.sae for r in policy.rules for _, d in detector_parts(r.detector) if isinstance(d, SAEFeaturesDetector)}
    rule_layers = set(policy.layers())
    # an SAE declared at a layer where only linear rules read still explains their decisions
    used |= {sid for sid, spec in policy.saes.items() if spec.layer in rule_layers}
    out: dict[str, SAE] = {}
    for sid in sorted(used):
        spec = policy.saes[sid]
        sae = given.get(sid) or SAE.load(
            policy.resolve(spec.path), layer=spec.layer, k=spec.k, format=spec.format, dtype=spec.dtype
        )
        if sae.device.type == "meta" or any(t.is_meta for t in sae.tensors().values()):
            raise SAEError(f"SAE {sid!r} ({spec.path}) has no data (meta device); load it onto a real device")
        if sae.d_model != hidden:
            raise SAEError(
                f"SAE {sid!r} ({spec.path}) reads d_model={sae.d_model} but the model's hidden size is {hidden}"
            )
        if sae.cfg.layer is not None and sae.cfg.layer != spec.layer:
            logger.warning(
                "SAE %r was trained at layer %s but the policy reads layer %s", sid, sae.cfg.layer, spec.layer
            )
        out[sid] = sae
    return out


def _load_linear(policy: Policy, hidden: int) -> tuple[dict[str, tuple[Tensor, Tensor]], dict[int, Feed]]:
    """Each linear (or ensemble) rule's ``(weight, bias)`` at the layer where it decides, and the terms read at
    shallower layers (a multi-layer probe's ``weight.L<l>``, an ensemble's linear members elsewhere), grouped by
    the layer that feeds them (one read of each file). An ensemble's weights are scaled as its mean of
    standardised members says (:func:`~guardrails.core.policy.detector_parts`); its SAE members are carried by
    their own heads (:func:`_carry_rules`), and its constant part is in the bias here."""
    out: dict[str, tuple[Tensor, Tensor]] = {}
    fed_rows: dict[int, list[tuple[str, Tensor]]] = {}
    for i, rule in enumerate(policy.rules):
        if isinstance(rule.detector, SAEFeaturesDetector):
            continue
        at = rule_layer(policy, rule)
        weight, bias = torch.zeros(hidden), torch.tensor(detector_offset(rule.detector))
        parts = zip(parts_where(f"rules[{i}].detector", rule.detector), detector_parts(rule.detector), strict=True)
        for (where, det), (scale, _) in parts:
            if not isinstance(det, LinearDetector):
                continue
            w, b, extra = _read_probe(policy, det, where, hidden)
            bias = bias + scale * b.reshape(())
            for layer, row in [(det.layer, w), *extra.items()]:
                if layer == at:
                    weight = weight + scale * row
                else:
                    fed_rows.setdefault(layer, []).append((rule.id, scale * row))
        out[rule.id] = (weight, bias)
    feeds = {layer: Feed(tuple(r for r, _ in v), torch.stack([x for _, x in v])) for layer, v in fed_rows.items()}
    return out, feeds


def _read_probe(
    policy: Policy, det: LinearDetector, where: str, hidden: int
) -> tuple[Tensor, Tensor, dict[int, Tensor]]:
    """``(weight, bias, {extra layer: weight})`` of one linear detector's file, checked."""
    from safetensors.torch import load_file

    path = policy.resolve(det.weights)
    regular_file(path, f"{where}.weights")  # a FIFO would hang load_file (issue 16)
    try:
        t = load_file(path)
    except Exception as exc:
        raise PolicyError(f"{where}.weights: cannot read {path!r}: {exc}") from exc
    w = t.get("weight")
    if w is None or tuple(w.shape) != (hidden,):
        shape = None if w is None else tuple(w.shape)
        raise PolicyError(f"{where}.weights: 'weight' must have shape ({hidden},), got {shape}")
    bias = t.get("bias", torch.zeros(()))
    fed = sorted(int(k.removeprefix("weight.L")) for k in t if k.startswith("weight.L"))
    if fed and not set(fed) <= set(det.extra_layers or []):  # a part of a multi-layer probe is another probe
        raise PolicyError(f"{where}.weights: {path!r} is a multi-layer probe (terms for layers {fed} "
                          f"and {det.layer}); set detector.extra_layers: {fed}")
    if not (bool(torch.isfinite(w.float()).all()) and bool(torch.isfinite(bias.float()).all())):
        raise PolicyError(f"{where}.weights: {path!r} holds NaN or infinite values (would fail open)")
    extra: dict[int, Tensor] = {}
    for layer in det.extra_layers or []:
        we = t.get(f"weight.L{layer}")
        if we is None or tuple(we.shape) != (hidden,):
            got = "missing" if we is None else f"shape {tuple(we.shape)}"
            raise PolicyError(f"{where}.weights: extra layer {layer} needs 'weight.L{layer}' of shape "
                              f"({hidden},), {got}; the file holds: {', '.join(sorted(t))}")
        if not bool(torch.isfinite(we.float()).all()):
            raise PolicyError(f"{where}.weights: 'weight.L{layer}' holds NaN or infinite values")
        extra[layer] = we.float()
    return w.float(), bias.float(), extra


def _carry_rules(policy: Policy) -> list[tuple[int, Rule, tuple[str, float]]]:
    """The SAE members of ensemble rules as rules of their own (``<rule id>/members[j]``, scored at their SAE's
    layer), each with the ensemble rule it feeds and its scale there."""
    out = []
    for i, rule in enumerate(policy.rules):
        det = rule.detector
        if not isinstance(det, EnsembleDetector):
            continue
        for j, (scale, part) in enumerate(detector_parts(det)):
            if isinstance(part, SAEFeaturesDetector):
                member = Rule(id=f"{rule.id}/members[{j}]", scope=rule.scope, detector=part, threshold=0.0,
                              action="flag", on_error=rule.on_error)
                out.append((i, member, (rule.id, scale)))
    return out


__all__ = ["CompiledPolicy", "Feed", "compile_policy"]
