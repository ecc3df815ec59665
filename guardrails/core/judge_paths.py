"""Judges named by import path: what ``--judge`` takes on the command line (``generate``, ``serve``, ``eval``).

``module:callable`` names a judge object (``module:make()`` calls a factory); ``NAME=module:callable`` binds it to
the policy's judge ``NAME`` (:func:`judges_from_cli`). The judges themselves, their verdicts and settings live in
:mod:`guardrails.core.cascade`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from guardrails.core.cascade import JudgeError, judge_name

if TYPE_CHECKING:
    from guardrails.core.policy import Policy


def import_judge(path: str) -> Any:
    """The object at ``module:attribute`` (``--judge`` on the command line); a factory named with ``()``
    at the end is called (``pkg.mod:make_judge()``)."""
    import importlib

    mod, sep, attr = path.partition(":")
    if not sep or not mod or not attr:
        raise JudgeError(f"--judge {path!r}: valid: 'module:callable' (e.g. guardrails.offline.text_judge:"
                         "bundled_judge())")
    call = attr.endswith("()")
    try:
        obj: Any = importlib.import_module(mod)
        for part in attr.removesuffix("()").split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise JudgeError(f"--judge {path!r}: cannot import: {exc}") from None
    return obj() if call else obj


def split_judge_spec(spec: str) -> tuple[str | None, str]:
    """``NAME=module:callable`` -> (NAME, path); a bare ``module:callable`` -> (None, path) (a module path holds no
    ``=`` before its ``:``)."""
    name, sep, path = spec.partition("=")
    return (name, path) if sep and ":" not in name else (None, spec)


def judges_from_cli(specs: Sequence[str], policy: Policy) -> dict[str, Any] | None:
    """Judges named on the command line (``--judge``, repeatable) bound for ``policy``: ``NAME=module:callable``
    binds the judge that name declares; a bare ``module:callable`` binds every judge the policy's escalating rules
    name. Without ``specs``: None, or an error naming the flag when a rule escalates (its judge would be unbound)."""
    escalating = [(i, r.id, n) for i, r in enumerate(policy.rules) if (n := judge_name(policy, r)) is not None]
    if not specs:
        if escalating:
            i, rid, n = escalating[0]
            raise JudgeError(f"policy {policy.name!r}: rules[{i}] ({rid!r}) escalates to judge {n!r}; bind it with "
                             f"--judge {n}=module:callable (e.g. --judge {n}=guardrails.offline.text_judge:"
                             "bundled_judge(), the offline stand-in)")
        return None
    wanted = sorted({n for *_, n in escalating} | set(policy.judges))
    if not wanted:
        raise JudgeError(f"--judge: policy {policy.name!r} has no cascade (no rule sets escalate_above); drop --judge")
    out: dict[str, Any] = {}
    for spec in specs:
        name, path = split_judge_spec(spec)
        if name is None:  # a bare path: every judge the policy names
            obj = import_judge(path)
            out.update({n: obj for n in wanted if n not in out})
            continue
        if name not in wanted:
            raise JudgeError(f"--judge {spec!r}: policy {policy.name!r} names no judge {name!r} "
                             f"(valid: {', '.join(wanted)})")
        out[name] = import_judge(path)
    return out


__all__ = ["import_judge", "judges_from_cli", "split_judge_spec"]
