"""What decisions do (torch-free): block, flag, steer or nothing, and, in a scan of text already written, what a
would-be steering does instead. :mod:`guardrails.core.semantics` re-exports these; every path asks them.

A scan (``GuardedModel.score``, the LangChain ``SAEGuard``, the server's proxy and ``/v1/guard/check``, the ONNX
guard) cannot steer: a steer rule's decision, and the flag of a rule that ``steering:`` entries wait for
(``when:``), carry the ``steer.scan_action`` (default block) as their ``resolution``. The decision itself (rule,
token, score, action) stays what generation decides there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from guardrails.core.decision import Decision

if TYPE_CHECKING:
    from guardrails.core.policy import Policy

ACTION_ORDER: dict[str, int] = {"allow": 0, "flag": 1, "steer": 2, "block": 3}
"""Strength of an action, for :func:`strongest_action`."""


def blocks(action: str | None, resolution: str | None) -> bool:
    """Whether a decision (or a recorded one) with this ``action`` and ``resolution`` stops the text: a block, an
    error resolved as block, or (in a scan) a steer decision or a steering trigger's flag resolved as block."""
    return action == "block" or (action in ("error", "steer", "flag") and resolution == "block")


def flags(action: str | None, resolution: str | None) -> bool:
    """Whether it lets the text through but marks it: a flag (unless a scan resolved it as block), an error
    (whatever it resolved to), or a steer decision a scan resolved as flag."""
    if action == "flag":
        return resolution != "block"
    return action == "error" or (action == "steer" and resolution == "flag")


def is_block(d: Decision) -> bool:
    """A decision that stops the text (:func:`blocks`)."""
    return blocks(d.action, d.resolution)


def is_flag(d: Decision) -> bool:
    """A decision that lets the text through but marks it (:func:`flags`)."""
    return flags(d.action, d.resolution)


def acted(action: str | None, resolution: str | None) -> str | None:
    """What a decision did: its action; an error's resolution (default block); in a scan, the resolution of a steer
    decision or of a steering trigger's flag."""
    if action == "error":
        return resolution or "block"
    if action in ("steer", "flag") and resolution:
        return resolution
    return action


def scan_actions(policy: Policy) -> dict[str, str]:
    """Per rule id, what its decisions do in a scan, where nothing can be steered: a steer rule's
    ``steer.scan_action``; a rule that ``steering:`` entries wait for (``when:``), the strongest of theirs (block
    over flag). Rules not listed act as they say."""
    out: dict[str, str] = {r.id: r.steer.scan_action for r in policy.rules if r.action == "steer" and r.steer}
    for sr in policy.steering:
        if sr.when is not None:
            out[sr.when] = "block" if "block" in (sr.steer.scan_action, out.get(sr.when)) else sr.steer.scan_action
    return out


def resolve_scan(decisions: Sequence[Decision], actions: Mapping[str, str]) -> list[Decision]:
    """``decisions`` of a scan with what each would-be steering does there: a steer decision, and a flag of a rule
    that ``steering:`` entries wait for, get ``resolution`` = ``actions[rule id]`` (:func:`scan_actions`; a steer
    rule missing there: block)."""
    out = []
    for d in decisions:
        if d.resolution is None and (d.action == "steer" or (d.action == "flag" and d.rule in actions)):
            d = dataclasses.replace(d, resolution=actions.get(d.rule, "block"))
        out.append(d)
    return out


def strongest_action(decisions: Iterable[Decision]) -> str:
    """``block`` > ``steer`` > ``flag`` > ``allow`` over ``decisions`` (errors and scan-resolved decisions count as
    their resolution)."""
    best = "allow"
    for d in decisions:
        a = acted(d.action, d.resolution) or "allow"
        if ACTION_ORDER.get(a, 0) > ACTION_ORDER[best]:
            best = a
    return best


__all__ = ["ACTION_ORDER", "acted", "blocks", "flags", "is_block", "is_flag", "resolve_scan", "scan_actions",
           "strongest_action"]
