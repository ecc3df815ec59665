"""Steering settings of a policy: a steer rule's ``steer:`` (:class:`Steer`) and the ``steering:`` entries that
steer without a detector of their own (:class:`SteerRule`). Re-exported from :mod:`guardrails.core.policy`; what
the engine does with them: :mod:`guardrails.engine.steering`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from guardrails.core.detectors import FiniteFloat, StrictInt, _Strict


class Steer(_Strict):
    """Steering applied from the token that tripped the rule onwards (or always, or when another rule fires).

    Directions: ``direction`` (a direction file written by ``guardrails direction``, relative to the YAML,
    or ``sae:<sae id>:<feature>`` for an SAE feature's decoder row); default: the detector's own direction.
    See :mod:`guardrails.engine.steering`.
    """

    method: Literal["subtract", "add", "clamp"] = Field(
        default="subtract",
        description="add: h + strength * unit direction; subtract: h - strength * unit direction; clamp: cap the "
        "projection on the direction at strength (0: remove it; without 'direction': the features' contribution)",
    )
    strength: FiniteFloat = Field(default=8.0, description="Signed; in residual units, or x the token's residual "
                                  "norm with relative_to: norm")
    relative_to: Literal["absolute", "norm"] = Field(
        default="absolute",
        description="absolute: strength in residual-stream units; norm: x each token's residual norm",
    )
    direction: str | None = Field(default=None, description="Direction file (.safetensors) or 'sae:<sae id>:<feature>'"
                                  "; default: the detector's direction")
    layers: list[StrictInt] | None = Field(default=None, min_length=1, description="Layers steered; default: the "
                                           "detector's layer (a direction file's own layer for steering: entries)")
    positions: Literal["generated", "all"] = Field(
        default="generated", description="steering: entries: from the first generated token (generated) or "
        "every token after position 0 (all, the prompt too)"
    )
    features: list[StrictInt] | None = Field(default=None,
                                             description="SAE features to steer against; default: detector's")
    block_above: FiniteFloat | None = Field(default=None, description="Block instead when the score reaches this value")
    scan_action: Literal["block", "flag"] = Field(
        default="block",
        description="What the rule (or, in a steering: entry with when:, its trigger rule) does where it cannot "
        "steer, in a scan of text already written (GuardedModel.score, the LangChain SAEGuard, the server's proxy "
        "mode and /v1/guard/check, the ONNX guard): block (default: the text it would have steered away from is not "
        "let through) or flag (let it through, marked)",
    )


class SteerRule(_Strict):
    """An entry of ``steering:``: steering with no detector of its own, always on or when a rule fires."""

    id: str = Field(min_length=1, description="Unique id (shared namespace with rules)")
    description: str = Field(default="", description="What the steering does")
    always: bool = Field(default=False, description="Steer every generation (from the first generated token)")
    when: str | None = Field(default=None, description="Id of a rule in 'rules': steer a row once that rule fires")
    steer: Steer = Field(description="What to steer: direction, method, strength, layers")

    @model_validator(mode="after")
    def _trigger(self) -> SteerRule:
        if self.always == (self.when is not None):
            raise ValueError("give exactly one of 'always: true' or 'when: <rule id>'")
        if self.steer.features:
            raise ValueError("steer.features: only valid on a rule with an sae_features detector; use direction")
        if self.steer.direction is None:
            raise ValueError("steer.direction: required in steering: entries (a file or 'sae:<sae id>:<feature>')")
        if self.always and self.steer.scan_action != "block":  # the default is written back by to_yaml: accept it
            raise ValueError("steer.scan_action: only for entries with 'when: <rule id>' (what a scan does when that "
                             "rule fires); an always-on entry has no trigger; remove it")
        return self


__all__ = ["Steer", "SteerRule"]
