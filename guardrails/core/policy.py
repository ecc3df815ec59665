"""Safety policies in YAML: which SAE features to watch, how to score them, and what to do.

A policy is strict: unknown keys, wrong types, and out-of-range values are errors naming the YAML
path and the valid options. Checks that need the model and SAE (feature ids beyond the SAE width,
layers beyond the model) run in :meth:`Policy.check_against` when a guard is built.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from guardrails.core.cascade import JudgeSpec, RuleJudge, check_cascade_policy, check_cascade_rule
from guardrails.core.detectors import Action as Action  # re-exported
from guardrails.core.detectors import Aggregate as Aggregate  # re-exported (the detector models' module)
from guardrails.core.detectors import CategoryHead as CategoryHead  # re-exported
from guardrails.core.detectors import (
    Detector,
    EnsembleDetector,
    FiniteFloat,
    LinearDetector,
    SAEFeaturesDetector,
    StrictInt,
    _sae_by_default,
    _Strict,
    parts_where,
)
from guardrails.core.detectors import EnsembleMember as EnsembleMember  # re-exported
from guardrails.core.detectors import Feature as Feature  # re-exported
from guardrails.core.detectors import detector_offset as detector_offset  # re-exported
from guardrails.core.detectors import detector_parts as detector_parts  # re-exported
from guardrails.core.errors import GuardrailsError
from guardrails.core.normalize import NormalizeSpec
from guardrails.core.policy_errors import field_names as _field_names
from guardrails.core.policy_errors import format_validation_error as format_validation_error  # re-exported
from guardrails.core.steer_spec import Steer as Steer  # re-exported (the steering settings' module)
from guardrails.core.steer_spec import SteerRule as SteerRule  # re-exported
from guardrails.core.yaml_io import MAX_YAML_NODES, UniqueKeyLoader
from guardrails.core.yaml_io import DuplicateKeyError as DuplicateKeyError  # re-exported
from guardrails.core.yaml_io import regular_file as regular_file  # re-exported
from guardrails.core.yaml_io import too_big as _too_big

Scope = Literal["input", "output", "both"]
OnError = Literal["block", "flag", "allow"]
ScoreMode = Literal["exact", "watched"]
class PolicyError(GuardrailsError, ValueError):
    """A policy is invalid; the message names the source, the YAML path and the valid options."""


class SAESpec(_Strict):
    """Where to load one SAE from and which residual-stream layer it reads."""

    path: str = Field(description="File, folder, 'bundled[:name]' or 'hf://org/repo'; relative to the YAML file")
    layer: StrictInt = Field(ge=0, description="Decoder block whose output the SAE reads (residual stream after it)")
    k: StrictInt | None = Field(default=None, ge=1, description="TopK k where the file does not store it (Qwen-Scope)")
    format: str | None = Field(default=None, description="SAE file format; detected when omitted")
    dtype: str | None = Field(default=None, description="dtype for the SAE weights (float32, bfloat16, float16)")


class Gate(_Strict):
    """An output rule that counts only as far as the request was harmful (``gate: {rule, scale, offset}``).

    The gated rule's score at a token is ``min(own score, scale * g + offset)``, where ``g`` is the gate rule's
    highest windowed score on the prompt so far: an answer is scored as harmful compliance only when its
    request scored harmful too. An output-only guard keeps the gate rule to score the prompt it is given;
    without a scored prompt, the rule scores the answer alone. See :func:`guardrails.core.semantics.gate_cap`.
    """

    rule: str = Field(min_length=1, description="Input rule of this policy whose prompt score gates this rule")
    scale: FiniteFloat = Field(default=1.0, gt=0, description="Maps the gate rule's score into this rule's units")
    offset: FiniteFloat = Field(default=0.0, description="Added after scaling")


class Rule(_Strict):
    """One check: a detector, a threshold and an action."""

    id: str = Field(min_length=1, description="Unique rule id, used in decisions and audit records")
    description: str = Field(default="", description="What the rule catches")
    scope: Scope = Field(default="output", description="input: prompt tokens at prefill; output: generated tokens")
    detector: Detector = Field(discriminator="kind", description="How a token is scored")
    threshold: FiniteFloat = Field(description="A token whose (windowed) score reaches this value trips the rule")
    action: Action = Field(default="block", description="flag, block, or steer")
    steer: Steer | None = Field(default=None, description="Steering settings, for action: steer")
    message: str | None = Field(default=None, description="Refusal text for this rule; default: the policy's")
    on_error: OnError | None = Field(default=None, description="What to do when scoring fails; default: policy's")
    category: str | None = Field(
        default=None, description="Hazard category this rule catches (e.g. weapons_cbrne); named in its decisions"
    )
    categories: CategoryHead | None = Field(default=None, description="A head that names the hazard category of "
                                            "each decision (and may set its action per category); see CategoryHead")
    escalate_above: FiniteFloat | None = Field(default=None, description="Cascade: scores in [threshold, this) go to "
                                               "the rule's judge, whose verdict decides (guardrails.core.cascade)")
    judge: RuleJudge | None = Field(default=None, description="Judge of the uncertain band: a name bound at runtime, "
                                    "or {name, prompt, on_error, timeout_s}; default: the policy's only judge")
    gate: Gate | None = Field(default=None, description="Output rules: capped by an input rule's prompt score "
                              "(score = min(own, scale * request score + offset)); see Gate")

    _default_kind = field_validator("detector", mode="before")(classmethod(lambda cls, v: _sae_by_default(v)))

    @model_validator(mode="after")
    def _steer_settings(self) -> Rule:
        if self.action == "steer" and self.steer is None:
            object.__setattr__(self, "steer", Steer())
        if isinstance(self.detector, EnsembleDetector) and self.steer is not None and (
                self.steer.direction is None or self.steer.features):
            raise ValueError("steer.direction: an ensemble detector has no direction of its own; give a direction "
                             "file or 'sae:<sae id>:<feature>' (steer.features is not valid with an ensemble)")
        if self.action != "steer" and self.steer is not None:
            raise ValueError(
                f"steer: settings given but action is {self.action!r}; valid: action: steer, or remove 'steer'"
            )
        check_cascade_rule(self)
        if self.categories is not None and "steer" in self.categories.actions.values() and self.action != "steer":
            bad = sorted(k for k, v in self.categories.actions.items() if v == "steer")
            raise ValueError(f"categories.actions: {bad} steer, but this rule has no steer settings (action "
                             f"{self.action!r}); valid: flag or block, or make the rule action: steer")
        return self


class AuditSpec(_Strict):
    """Where a policy's decisions are recorded (``audit: {db: ..., redact: ...}``)."""

    db: str | None = Field(default=None, description="SQLite audit database every guarded call of this policy writes "
                           "to (relative: against the policy's folder); env GUARDRAILS_AUDIT_DB overrides it")
    redact: bool | None = Field(default=None, description="Records keep hashes instead of text (sets the policy's "
                                "redact)")


class Policy(_Strict):
    """A named set of rules over SAE features of one model."""

    name: str = Field(min_length=1, description="Policy name, recorded in decisions and audits")
    version: str = Field(default="1", description="Policy version")
    description: str = Field(default="", description="What the policy is for")
    model: str | None = Field(default=None, description="Model the policy was calibrated for ('bundled' or an id)")
    saes: dict[str, SAESpec] = Field(default_factory=dict, description="SAEs by id")
    score_mode: ScoreMode = Field(default="exact", description="exact: full TopK encode; watched: watched rows only")
    on_error: OnError = Field(default="block", description="What a rule does when it cannot score")
    refusal: str = Field(default="I can't help with that.", description="Text returned when a generation is blocked")
    redact: bool = Field(default=False, description="Audit records keep hashes instead of input and output text")
    audit: AuditSpec | None = Field(default=None, description="Audit sink of this policy: {db: path, redact: bool}")
    raise_on_block: bool = Field(default=False, description="LangChain: raise GuardrailViolation instead of returning")
    input_roles: list[Literal["system", "user", "assistant", "tool"]] = Field(
        default=["user", "tool"], min_length=1,
        description="Turns of the prompt that input rules score (the system prompt only when listed here)",
    )
    normalize: NormalizeSpec = Field(
        default_factory=NormalizeSpec,
        description="Text normalisation before scoring (NFKC, invisible characters, homoglyphs, decoded base64/hex/"
                    "percent/tags scored too); true (default) or false, or the steps one by one",
    )
    rules: list[Rule] = Field(min_length=1, description="The rules, checked in order")
    steering: list[SteerRule] = Field(default_factory=list, description="Steering that is always on or gated "
                                      "by a rule (see guardrails.engine.steering)")
    judges: dict[str, JudgeSpec] = Field(default_factory=dict, description="Second-stage judges by name (bound at "
                                         "runtime: judges={name: callable or chat model}); see escalate_above")
    calibration: dict[str, Any] | None = Field(default=None, description="Record of how thresholds were fitted")
    base_dir: str | None = Field(default=None, exclude=True, description="Folder relative paths resolve against")

    @model_validator(mode="after")
    def _audit_redact(self) -> Policy:
        if self.audit is not None and self.audit.redact is not None:
            object.__setattr__(self, "redact", self.audit.redact)
        return self

    @model_validator(mode="after")
    def _cross_refs(self) -> Policy:
        seen: set[str] = set()
        for i, rule in enumerate(self.rules):
            if rule.id in seen:
                raise ValueError(f"rules[{i}].id: duplicate rule id {rule.id!r}")
            seen.add(rule.id)
            det = rule.detector
            for where, part in parts_where(f"rules[{i}].detector", det):
                if isinstance(part, SAEFeaturesDetector) and part.sae not in self.saes:
                    valid = ", ".join(self.saes) or "(none declared under 'saes')"
                    raise ValueError(f"{where}.sae: unknown SAE id {part.sae!r}; valid: {valid}")
            if rule.steer and rule.steer.features and not isinstance(det, SAEFeaturesDetector):
                raise ValueError(f"rules[{i}].steer.features: only valid with an sae_features detector")
        self._check_gates()
        for i, sr in enumerate(self.steering):  # steering entries: ids, gates and SAE references
            if sr.id in seen:
                raise ValueError(f"steering[{i}].id: duplicate id {sr.id!r} (rules and steering share ids)")
            seen.add(sr.id)
            if sr.when is not None and sr.when not in {r.id for r in self.rules}:
                raise ValueError(f"steering[{i}].when: unknown rule {sr.when!r}; valid: "
                                 f"{', '.join(r.id for r in self.rules)}")
        for where, st in [(f"rules[{i}].steer", r.steer) for i, r in enumerate(self.rules)] + [
                (f"steering[{i}].steer", sr.steer) for i, sr in enumerate(self.steering)]:
            ref = st.direction if st is not None else None
            if ref and ref.startswith("sae:"):
                parts = ref.split(":")
                if len(parts) != 3 or not parts[2].isdigit():
                    raise ValueError(f"{where}.direction: {ref!r}; valid: 'sae:<sae id>:<feature id>' or a file")
                if parts[1] not in self.saes:
                    valid = ", ".join(self.saes) or "(none declared under 'saes')"
                    raise ValueError(f"{where}.direction: unknown SAE id {parts[1]!r}; valid: {valid}")
        check_cascade_policy(self)
        return self

    def _check_gates(self) -> None:
        from guardrails.core.semantics import rule_layer

        by_id = {r.id: r for r in self.rules}
        for i, rule in enumerate(self.rules):
            if rule.gate is None:
                continue
            where = f"rules[{i}].gate"
            gate = by_id.get(rule.gate.rule)
            inputs = [r.id for r in self.rules if r.scope == "input" and r.gate is None and r.id != rule.id]
            valid = ", ".join(inputs) or "(no input rule in this policy)"
            if gate is None or gate is rule:
                raise ValueError(f"{where}.rule: unknown rule {rule.gate.rule!r}; valid: {valid}")
            if rule.scope != "output":
                raise ValueError(f"{where}: only an output rule can be gated (this rule's scope is {rule.scope!r}); "
                                 "valid: scope: output, or remove 'gate'")
            if gate.scope != "input" or gate.gate is not None:
                raise ValueError(f"{where}.rule: {gate.id!r} must be an ungated input rule; valid: {valid}")
            if rule_layer(self, gate) > rule_layer(self, rule):  # a one-forward scan decides layers in order
                raise ValueError(f"{where}.rule: {gate.id!r} decides at layer {rule_layer(self, gate)}, deeper than "
                                 f"this rule's layer {rule_layer(self, rule)}; valid: a gate at layer <= "
                                 f"{rule_layer(self, rule)}")

    # -- loading ------------------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, text: str, *, source: str = "<yaml>", base_dir: str | os.PathLike[str] | None = None) -> Policy:
        """Parse and validate a policy from YAML text."""
        try:
            data = yaml.load(text, Loader=UniqueKeyLoader)  # a SafeLoader subclass
            if _too_big(data, MAX_YAML_NODES):  # aliases can expand a few bytes into billions of nodes
                raise PolicyError(f"{source}: policy expands to more than {MAX_YAML_NODES} YAML nodes (alias bomb?)")
        except yaml.YAMLError as exc:
            raise PolicyError(f"{source}: invalid YAML: {exc}") from None
        except RecursionError:
            raise PolicyError(f"{source}: invalid YAML: nested too deeply") from None
        return cls.from_dict(data, source=source, base_dir=base_dir)

    @classmethod
    def from_dict(
        cls, data: Any, *, source: str = "<dict>", base_dir: str | os.PathLike[str] | None = None
    ) -> Policy:
        if not isinstance(data, dict):
            raise PolicyError(f"{source}: a policy must be a mapping with keys {', '.join(_field_names(cls))}")
        try:
            policy = cls.model_validate(data)
        except ValidationError as exc:
            raise PolicyError(format_validation_error(exc, source)) from None
        except RecursionError:
            raise PolicyError(f"{source}: invalid policy: nested too deeply") from None
        if base_dir is not None:
            object.__setattr__(policy, "base_dir", str(base_dir))
        return policy

    @classmethod
    def from_path(cls, path: str | os.PathLike[str]) -> Policy:
        """Read a policy file (or a shipped policy by name: ``harmful-requests``); relative paths inside it
        resolve against its folder."""
        from guardrails._data import shipped_policy

        p = Path(path)
        shipped = None if p.exists() else shipped_policy(str(path))
        if shipped is not None:
            p = shipped
        if not p.is_file():
            hint = _shipped_hint()
            what = "is not a regular file" if p.exists() else "not found"
            raise PolicyError(f"policy file {str(p)!r} {what}{hint}")
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise PolicyError(f"{p}: cannot read policy: {exc}") from None
        return cls.from_yaml(text, source=str(p), base_dir=p.resolve().parent)

    def resolve(self, ref: str) -> str:
        """A path from the policy, made absolute against the policy's folder when relative."""
        from guardrails.core.policy_refs import is_local_ref

        if not is_local_ref(ref) or self.base_dir is None:
            return ref
        return str(Path(self.base_dir) / ref)

    def rebased(self, base_dir: str | os.PathLike[str]) -> Policy:
        """The same policy for a file written to ``base_dir``, its relative file references rewritten to name the
        same files from there (:func:`guardrails.core.policy_refs.rebased`)."""
        from guardrails.core.policy_refs import rebased

        return rebased(self, base_dir)

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", exclude_none=True, exclude={"base_dir"})
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)

    @property
    def digest(self) -> str:
        """sha256 of the policy's canonical YAML (recorded in audits)."""
        return hashlib.sha256(self.to_yaml().encode()).hexdigest()

    def layers(self) -> list[int]:
        """Residual-stream layers the rules read."""
        from guardrails.core.semantics import rule_layers

        return sorted({layer for rule in self.rules for layer in rule_layers(self, rule)})

    def check_against(self, n_layers: int, sae_widths: dict[str, int], d_model: int | None = None) -> None:
        """Check layers and feature ids against the model and the loaded SAEs."""
        problems = []
        for sid, spec in self.saes.items():
            if spec.layer >= n_layers:
                problems.append(f"saes.{sid}.layer: {spec.layer} out of range; valid: 0..{n_layers - 1}")
        for i, rule in enumerate(self.rules):
            width = None
            for where, det in parts_where(f"rules[{i}].detector", rule.detector):
                if isinstance(det, LinearDetector):
                    if det.layer >= n_layers:
                        problems.append(f"{where}.layer: {det.layer} out of range; valid: 0..{n_layers - 1}")
                    continue
                width = sae_widths.get(det.sae)
                if width is None:
                    continue
                for j, f in enumerate(det.features):
                    if f.id >= width:
                        problems.append(
                            f"{where}.features[{j}].id: {f.id} out of range; valid: 0..{width - 1} "
                            f"(SAE {det.sae!r} has {width} features)"
                        )
            if width is None or not isinstance(rule.detector, SAEFeaturesDetector):
                continue
            for j, fid in enumerate((rule.steer.features if rule.steer else None) or []):
                if not 0 <= fid < width:
                    problems.append(f"rules[{i}].steer.features[{j}]: {fid} out of range; valid: 0..{width - 1}")
        if problems:
            raise PolicyError(f"policy {self.name!r}: " + "; ".join(problems))


def _shipped_hint() -> str:
    from guardrails._data import shipped_policies

    names = shipped_policies()
    return f"; shipped policies (by name): {', '.join(names)}" if names else ""
