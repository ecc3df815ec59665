"""Normalisation on the generation path: score the normalized (and decoded) prompt, generate from the original.

Normalising the text the *model* reads would change what it generates (and the normal case, a prompt
that normalisation leaves unchanged, must stay byte-identical to an unguarded run). So ``generate`` and
``stream`` keep the original prompt for the model and, only when :func:`~guardrails.core.normalize.normalize`
changes a prompt or finds an encoded segment in it, scan the normalized prompt and its decoded segments
with :meth:`GuardedModel.score` first. A block there blocks the generation (nothing released), and so does a
steer rule that fires there but did not steer the generation (its ``steer.scan_action``, default block); flags
are added to the result's decisions; ``result.normalization`` records what was found. With
``normalize: false`` or an unchanged prompt nothing runs and nothing changes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from guardrails.core.decision import Decision, TextScore
from guardrails.core.scan_plan import plan_scan
from guardrails.core.semantics import is_block

if TYPE_CHECKING:
    from guardrails.serving.generation import GuardedModel
    from guardrails.serving.result import GenerationResult


def prescan(guard: GuardedModel, items: Sequence[Any], chat: bool | None) -> list[TextScore | None]:
    """Per prompt, the scan of its normalized form and decoded segments (None where normalisation found nothing)."""
    spec = getattr(guard.policy, "normalize", None)
    out: list[TextScore | None] = [None] * len(items)
    if spec is None or not spec.enabled:
        return out
    plan = plan_scan(list(items), [None] * len(items), spec)
    which = [i for i, info in enumerate(plan.info) if info is not None]
    if not which:
        return out
    for i, ts in zip(which, guard.score([items[i] for i in which], chat=chat), strict=True):
        out[i] = ts
    return out


def _refusal(guard: GuardedModel, decisions: list[Decision]) -> str:
    rules = {r.id: r for r in guard.policy.rules}
    for d in decisions:
        rule = rules.get(d.rule)
        if rule is not None and rule.message:
            return rule.message
    return guard.policy.refusal


def fired(decisions: Sequence[Decision]) -> set[str]:
    """Rules that fired with a steer or a flag in a generation (a flag that ``steering:`` entries wait for steers)."""
    return {d.rule for d in decisions if d.action in ("steer", "flag")}


def as_steered(decisions: Sequence[Decision], steered: set[str] | None) -> list[Decision]:
    """The pre-scan's ``decisions`` for a generation whose rules ``steered`` (:func:`fired`; None: not known yet,
    before the prefill: all of them) fired on the original prompt: their would-be steering on the normalized prompt
    (a steer rule's hit, a steering trigger's flag) is that steering, not a scan's block (resolution cleared); the
    others keep their ``steer.scan_action``."""
    return [dataclasses.replace(d, resolution=None)
            if d.action in ("steer", "flag") and (steered is None or d.rule in steered) else d for d in decisions]


def prescan_blocks(pre: TextScore, steered: set[str] | None) -> bool:
    """Whether the pre-scan ``pre`` blocks a generation whose rules ``steered`` fired (:func:`as_steered`)."""
    return any(is_block(d) for d in as_steered(pre.decisions, steered))


def apply_prescan(guard: GuardedModel, pre: list[TextScore | None], results: list[GenerationResult],
                  ) -> list[GenerationResult]:
    """Results with the pre-scan's verdicts applied (a block there withholds everything) and recorded."""
    for b, (r, ts) in enumerate(zip(results, pre, strict=True)):
        if ts is None:
            continue
        r.normalization = ts.normalization
        if r.blocked or not ts.decisions:
            continue  # the original prompt already decided, or nothing fired on the normalized one either
        steps = ", ".join((ts.normalization or {}).get("steps", [])) or "decoded segments"
        added = [dataclasses.replace(d, sequence=b, position=-1, output_index=None,
                                     reason=d.reason or f"in the normalized prompt ({steps})")
                 for d in as_steered(ts.decisions, fired(r.decisions))]
        r.decisions[:0] = added
        if any(is_block(d) for d in added):
            r.blocked = True
            r.text = _refusal(guard, [d for d in added if is_block(d)])
            r.released_text = ""
            r.output_ids = []
    return results


__all__ = ["apply_prescan", "as_steered", "fired", "prescan", "prescan_blocks"]
