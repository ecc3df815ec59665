"""Policy validation errors as users read them: one line per problem, ``source: path: message; valid: ...``.

pydantic's raw errors name internal model and union-tag names; these helpers turn them into the YAML path
(``rules[0].detector.layer``) and, for unknown keys and literals, the valid options.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ValidationError


def field_names(model: type[BaseModel]) -> list[str]:
    return [n for n in model.model_fields if n != "base_dir"]


def _models_by_field() -> dict[str, type[BaseModel]]:
    """The model behind each policy key that holds a mapping (for the valid keys of an unknown-key error)."""
    from guardrails.core.cascade import JudgeSpec, RuleJudge
    from guardrails.core.normalize import NormalizeSpec
    from guardrails.core.policy import (
        AuditSpec,
        CategoryHead,
        EnsembleMember,
        Feature,
        Gate,
        Rule,
        SAEFeaturesDetector,
        SAESpec,
        Steer,
        SteerRule,
    )

    return {
        "saes": SAESpec, "rules": Rule, "detector": SAEFeaturesDetector, "steer": Steer, "features": Feature,
        "normalize": NormalizeSpec, "steering": SteerRule, "judge": RuleJudge, "judges": JudgeSpec, "gate": Gate,
        "members": EnsembleMember, "categories": CategoryHead, "audit": AuditSpec,
    }


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("SAEFeaturesDetector", "LinearDetector", "EnsembleDetector", "sae_features", "linear",
                      "ensemble"):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One line per problem: ``source: path: message; valid: ...``."""
    from guardrails.core.policy import EnsembleDetector, LinearDetector, Policy

    models_by_field = _models_by_field()
    lines = []
    for err in exc.errors():
        loc = tuple(err.get("loc", ()))
        where = _loc(loc)
        msg = err.get("msg", "invalid")
        if err.get("type") == "extra_forbidden":
            parent = [p for p in loc[:-1] if isinstance(p, str) and p in models_by_field]
            model = models_by_field[parent[-1]] if parent else Policy
            if parent and parent[-1] == "detector":  # the detector kind's model (the tag follows 'detector')
                at = max(i for i, x in enumerate(loc[:-1]) if x == "detector")
                tag = loc[at + 1] if at + 1 < len(loc) - 1 else None
                kinds: dict[str, type[BaseModel]] = {"linear": LinearDetector, "LinearDetector": LinearDetector,
                                                     "ensemble": EnsembleDetector, "EnsembleDetector": EnsembleDetector}
                model = kinds.get(str(tag), model)
            msg = f"unknown key {loc[-1]!r}; valid: {', '.join(field_names(model))}"
        elif err.get("type") == "literal_error":
            expected = (err.get("ctx") or {}).get("expected", "")
            msg = f"invalid value {err.get('input')!r}; valid: {expected}"
        elif err.get("type") == "union_tag_invalid":
            kind = (err.get("input") or {}).get("kind")
            msg = f"unknown detector kind {kind!r}; valid: sae_features, linear, ensemble"
        elif err.get("type") == "missing":
            msg = f"missing required key {loc[-1]!r}" if loc else "missing required key"
        elif err.get("type") == "value_error":
            # our validators say "<path relative to the model>: <problem>"
            text = str(msg).removeprefix("Value error, ")
            rel, sep, rest = text.partition(": ")
            if sep and re.fullmatch(r"[A-Za-z_][\w.\[\]]*", rel):
                where = rel if where == "(top level)" else f"{where}.{rel}"
                text = rest
            msg = text
        elif "input" in err and not isinstance(err.get("input"), dict | list):
            msg = f"{msg}; got {err.get('input')!r}"
        lines.append(f"{where}: {msg}")
    return f"{source}: invalid policy:\n  " + "\n  ".join(lines)
