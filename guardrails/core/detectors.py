"""Detectors of a policy's rules: SAE-feature combinations, linear (multi-layer) probes, and ensembles of them; and
a rule's category head (:class:`CategoryHead`), which reads the same residuals to name a decision's category.

How each one scores a token is implemented in :mod:`guardrails.engine.scorers` (and carried across layers by
:mod:`guardrails.engine.compile`); these are the validated YAML models. Re-exported by
:mod:`guardrails.core.policy`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Aggregate = Literal["max", "mean", "sum"]
Action = Literal["flag", "block", "steer"]
"""What a tripped rule does (``rules[].action``; also a category's action in :class:`CategoryHead`)."""
FiniteFloat = Annotated[float, Field(strict=True, allow_inf_nan=False)]
"""A number that is finite (NaN, inf and overflowing literals such as 1.0e400 are errors), never a bool or string."""
StrictInt = Annotated[int, Field(strict=True)]
"""An integer as such: ``true``, ``"4828"`` and ``4828.0`` are errors."""



class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Feature(_Strict):
    """One watched SAE feature and its weight in the rule's score."""

    id: StrictInt = Field(ge=0, description="Feature (latent) index in the SAE")
    weight: FiniteFloat = Field(default=1.0, description="Multiplier of this feature's activation in the score")
    label: str | None = Field(default=None, description="Human-readable name of the feature")


class SAEFeaturesDetector(_Strict):
    """Score = combination of the activations of a set of SAE features, aggregated over a window."""

    kind: Literal["sae_features"] = Field(default="sae_features", description="Detector kind")
    sae: str = Field(description="Id of an SAE declared under 'saes'")
    features: list[Feature] = Field(min_length=1, description="Watched features with weights")
    combine: Literal["sum", "max", "mean"] = Field(default="sum", description="How weighted features combine per token")
    bias: FiniteFloat = Field(default=0.0, description="Added to the combined score of each token")
    window: StrictInt = Field(default=1, ge=1, le=4096,
                              description="Tokens aggregated (the current and the previous ones)")
    aggregate: Aggregate = Field(default="mean", description="Aggregation over the window")

    @field_validator("features", mode="before")
    @classmethod
    def _features_shorthand(cls, v: Any) -> Any:
        # allow {123: 1.0, 456: 0.5} and [123, 456]
        if isinstance(v, dict):
            return [{"id": k, "weight": w} for k, w in v.items()]
        if isinstance(v, list):
            return [{"id": x} if isinstance(x, int) and not isinstance(x, bool) else x for x in v]
        return v


class LinearDetector(_Strict):
    """Score = x · w + b on the raw residual stream (a linear probe or a DiffMean direction)."""

    kind: Literal["linear"] = Field(description="Detector kind")
    layer: StrictInt = Field(ge=0, description="Decoder block whose output is read (the deepest, for a multi-layer "
                             "probe: the rule decides there)")
    weights: str = Field(description="safetensors with 'weight' [d_model], optional 'bias' [], and 'weight.L<l>' "
                         "[d_model] for each of extra_layers; relative to YAML")
    method: Literal["probe", "diffmean"] = Field(default="probe", description="How the direction was fitted")
    window: StrictInt = Field(default=1, ge=1, le=4096,
                              description="Tokens aggregated (the current and the previous ones)")
    aggregate: Aggregate = Field(default="mean", description="Aggregation over the window")
    explained_by: list[Feature] = Field(default_factory=list, description="SAE features that explain the direction")
    extra_layers: list[StrictInt] | None = Field(
        default=None, min_length=1, description="Shallower layers whose residual adds to the token score "
        "(a multi-layer probe: score = sum over layers of x_l · w_l + b, at the same token)")

    @model_validator(mode="after")
    def _extra_layers(self) -> LinearDetector:
        extra = self.extra_layers or []
        bad = [x for x in extra if not 0 <= x < self.layer]
        if bad:
            raise ValueError(f"extra_layers: {bad} must be shallower than layer {self.layer}; "
                             f"valid: 0..{self.layer - 1}")
        if len(set(extra)) != len(extra):
            raise ValueError(f"extra_layers: {extra} lists a layer twice")
        return self


def _sae_by_default(v: Any) -> Any:
    """A detector mapping without ``kind`` is an SAE-feature detector (the policy format's default kind)."""
    if isinstance(v, dict) and "kind" not in v:
        return {"kind": "sae_features", **v}
    return v


class EnsembleMember(_Strict):
    """One detector of an ensemble, standardised: its token score enters as ``(score - mean) / std``."""

    detector: SAEFeaturesDetector | LinearDetector = Field(discriminator="kind", description="The member's detector "
                                                           "(its token score; window and aggregate are the ensemble's)")
    weight: FiniteFloat = Field(default=1.0, gt=0, description="Weight of the standardised score in the mean")
    mean: FiniteFloat = Field(default=0.0, description="Subtracted from the member's score (e.g. its mean on benign "
                              "calibration rows)")
    std: FiniteFloat = Field(default=1.0, gt=0, description="Divides the member's score after the mean")

    _default_kind = field_validator("detector", mode="before")(classmethod(lambda cls, v: _sae_by_default(v)))

    @model_validator(mode="after")
    def _no_own_window(self) -> EnsembleMember:
        if self.detector.window != 1:
            raise ValueError(f"detector.window: {self.detector.window}; a member is scored per token (valid: 1): "
                             "set window and aggregate on the ensemble detector")
        if isinstance(self.detector, LinearDetector) and self.detector.explained_by:
            raise ValueError("detector.explained_by: not valid on an ensemble member")
        return self


class EnsembleDetector(_Strict):
    """Score = weighted mean of standardised member token scores, then aggregated over a window.

    Token score ``sum_i weight_i * (s_i - mean_i) / std_i / sum_i weight_i``, where ``s_i`` is member ``i``'s
    token score (a linear probe at its layers, an SAE-feature combination at its SAE's layer). The rule decides
    at the deepest layer any member reads; shallower members' terms are carried there within the same forward.
    """

    kind: Literal["ensemble"] = Field(description="Detector kind")
    members: list[EnsembleMember] = Field(min_length=2, description="The detectors combined")
    window: StrictInt = Field(default=1, ge=1, le=4096,
                              description="Tokens aggregated (the current and the previous ones)")
    aggregate: Aggregate = Field(default="mean", description="Aggregation over the window")


Detector = SAEFeaturesDetector | LinearDetector | EnsembleDetector


def detector_parts(det: Detector) -> list[tuple[float, SAEFeaturesDetector | LinearDetector]]:
    """The single detectors behind ``det`` with the scale of each one's token score in the rule's score
    (an ensemble: ``weight / (std * sum of weights)``; the constant terms are :func:`detector_offset`)."""
    if isinstance(det, EnsembleDetector):
        total = sum(m.weight for m in det.members)
        return [(m.weight / (m.std * total), m.detector) for m in det.members]
    return [(1.0, det)]


def detector_offset(det: Detector) -> float:
    """The constant an ensemble adds to its scaled members (``-sum_i weight_i * mean_i / std_i / sum of weights``)."""
    if isinstance(det, EnsembleDetector):
        total = sum(m.weight for m in det.members)
        return -sum(m.weight * m.mean / m.std for m in det.members) / total
    return 0.0


def parts_where(where: str, det: Detector) -> list[tuple[str, SAEFeaturesDetector | LinearDetector]]:
    """Each single detector of ``det`` with its YAML path (an ensemble's: ``<where>.members[i].detector``)."""
    if isinstance(det, EnsembleDetector):
        return [(f"{where}.members[{i}].detector", m.detector) for i, m in enumerate(det.members)]
    return [(where, det)]


class CategoryHead(_Strict):
    """Which hazard category a decision names (``categories: {weights, min_prob, actions}`` on a rule).

    A multinomial linear head over the residual stream at the rule's deciding layer: the file holds ``weight``
    ``[n_categories, hidden]``, ``bias`` ``[n_categories]`` and its category names in the metadata ``labels`` (a
    JSON list). When the rule fires, the head's logits are averaged over every token the rule scored up to the
    deciding one (``reads: prompt``: over all the prompt's scored tokens instead: an input rule's whole request, an
    output rule's request), and the most probable category is
    named in the decision (and the audit); below ``min_prob`` the
    decision names the rule's own ``category`` instead. ``actions`` lets a policy treat categories differently
    (block weapons, flag the rest): the named category's action replaces the rule's. Written by
    ``calibration/selection/fit_categories.py``; not carried by ``guardrails export-onnx`` (see there).
    """

    weights: str = Field(min_length=1, description="Head file (safetensors), relative to the YAML file")
    min_prob: FiniteFloat = Field(default=0.0, ge=0, le=1, description="Name a category only at this probability "
                                  "or more (else the rule's own category)")
    actions: dict[str, Action] = Field(default_factory=dict, description="Per named category, the action taken "
                                       "instead of the rule's (category names: the head file's labels)")
    reads: Literal["scored", "prompt"] = Field(default="scored", description="The tokens the head averages: 'scored' "
                                               "(the rule's own, up to the deciding one) or 'prompt' (the prompt's "
                                               "tokens the input rules score, read by the end of the deciding "
                                               "forward: an input rule's whole request, an output rule's request; "
                                               "no prompt, no category)")
