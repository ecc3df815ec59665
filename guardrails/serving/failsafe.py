"""Failures after scoring follow the policy's ``on_error``: they never reach the caller as an exception.

Once a generation has been scored, an exception while building its result (decoding, token strings) or
mid-stream (a model or device error after the prefill) is a guard failure like a detector error: it is
recorded as an ``error`` decision with its reason, and ``on_error`` decides (``block``: the refusal;
``flag`` / ``allow``: the text released so far). Used by ``GuardedModel.generate`` and ``GuardedStream``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from guardrails.core.decision import Decision
from guardrails.serving.result import GenerationResult

if TYPE_CHECKING:
    from guardrails.engine.run import GuardRun
    from guardrails.serving.generation import GuardedModel

logger = logging.getLogger(__name__)


def apply_failure(guard: GuardedModel, result: GenerationResult, failure: BaseException, where: str,
                  shown: str) -> GenerationResult:
    """Record ``failure`` on ``result`` as an error decision and let ``on_error`` decide what the caller gets."""
    policy = guard.policy
    reason = f"{where} failed after scoring: {type(failure).__name__}: {failure}"
    logger.error("%s", reason)
    result.errors.append(reason)
    result.decisions.append(Decision(
        action="error", rule=f"({where})", score=float("nan"), threshold=float("nan"), position=-1,
        scope="output", reason=reason, resolution=policy.on_error,
    ))
    if policy.on_error == "block":
        result.blocked, result.text, result.released_text = True, policy.refusal, shown
    elif not result.blocked:
        result.text = result.released_text = shown
    return result


def result_or_on_error(guard: GuardedModel, run: GuardRun, b: int, prompt: str, released: list[int],
                       shown: str | None = None) -> GenerationResult:
    """``guard._result(...)``, or, when building it raises, a result decided by ``on_error``.

    ``shown``: the text the caller has already seen (streams); ``None`` for ``generate`` (nothing shown:
    the released tokens are decoded if that still works, else nothing is released).
    """
    try:
        return guard._result(run, b, prompt, released)
    except Exception as exc:
        if shown is None:
            try:
                shown = str(guard.tokenizer.decode(released, skip_special_tokens=True))
            except Exception:
                shown = ""
        blocked = run.blocked_at[b] is not None  # a block already decided stays a block, whatever on_error says
        result = GenerationResult(
            text=guard.policy.refusal if blocked else shown, blocked=blocked, steered=False,
            decisions=[d for d in run.decisions if d.sequence == b],
            prompt=prompt, released_text=shown, output_ids=list(released), policy=guard.policy.name,
            errors=list(run.errors),
        )
        if shown == "" and released:
            result.output_ids = []
        return apply_failure(guard, result, exc, "result", shown)


__all__ = ["apply_failure", "result_or_on_error"]
