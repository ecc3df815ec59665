"""The cascade on labeled rows: what ``guardrails eval --judge`` reports (share escalated, TPR, FPR).

Per row and rule, from the rule's windowed token scores as served: the first token at or above the
threshold decides; at or above ``escalate_above`` the rule acts directly; in the band the judge is asked
(once) and its verdict decides, and a safe verdict still lets a later score at or above ``escalate_above``
act (:func:`guardrails.core.semantics.decide_scan`). A row is caught when any rule acts on it. The judge
reads the row's prompt for input rules (what an input rule's judge reads in serving) and the row's whole
response for output rules (serving passes the response up to the escalating token: an approximation here).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from guardrails.core.cascade import JudgeRequest, judge_settings, render_prompt, to_verdict
from guardrails.core.judge_paths import import_judge, split_judge_spec
from guardrails.core.semantics import cascade_band


def cascade_row(scores: Sequence[float], threshold: float, escalate_above: float | None,
                verdict: Any) -> tuple[bool, bool]:
    """``(caught, escalated)`` of one row's scores; ``verdict()`` is asked only in the band (True: unsafe)."""
    first = next((v for v in scores if v >= threshold), None)
    if first is None:
        return False, False
    if cascade_band(threshold, escalate_above, first) == "act":
        return True, False
    return bool(verdict()) or max(scores) >= escalate_above, True  # type: ignore[operator]


def cascade_metrics(guard: Any, rows_of: Any, data: Any, judge: Any, rule_id: str | None = None) -> dict[str, Any]:
    """TPR, FPR and share escalated of the policy's rules (``rule_id``: one) with ``judge`` on ``data``.

    ``rows_of(rule)`` gives the rule's residual rows (as ``guardrails eval`` caches them); ``judge`` is a
    judge or its ``module:callable`` path (``--judge``)."""
    from guardrails.offline.calibrate import rule_scope
    from guardrails.offline.scoring import gate_scores, token_scores

    path = judge if isinstance(judge, str) else None
    if path is not None:  # module:callable, or NAME=module:callable as generate and serve take it
        judge = import_judge(split_judge_spec(path)[1])

    policy = guard.policy
    rules = [r for r in policy.rules if rule_id is None or r.id == rule_id]
    n = len(data)
    caught = np.zeros(n, dtype=bool)
    escalated = np.zeros(n, dtype=bool)
    calls, seconds, errors = 0, 0.0, 0
    for rule in rules:
        per_row = token_scores(guard, rule.id, rows_of(rule), gate=gate_scores(guard, rule, rows_of))
        settings = judge_settings(policy, rule)
        scope = rule_scope(rule)
        for i, sc in enumerate(per_row):

            def ask(i: int = i, s: Any = sc, rule: Any = rule, settings: Any = settings, scope: str = scope) -> bool:
                nonlocal calls, seconds, errors
                text = (data.responses[i] if scope == "output" and data.responses else data.texts[i]) or ""
                prompt = render_prompt(settings.prompt, text) if settings else text
                t0 = time.perf_counter()
                calls += 1
                try:
                    harmful = to_verdict(judge(JudgeRequest(prompt, text, rule.id, scope, float(max(s)),
                                                            settings.name if settings else "judge"))).harmful
                except Exception:
                    errors += 1
                    harmful = (settings.on_error if settings else "block") in ("block", "flag")  # as on_error does
                seconds += time.perf_counter() - t0
                return harmful

            esc = rule.escalate_above
            c, e = cascade_row([float(v) for v in sc], float(rule.threshold), esc, ask) if len(sc) else (False, False)
            caught[i] |= c
            escalated[i] |= e
    y = np.asarray(data.labels)
    pos, neg = y == 1, y == 0
    out: dict[str, Any] = {
        "rules": [r.id for r in rules], "escalating_rules": [r.id for r in rules if r.escalate_above is not None],
        "judge": repr(judge), "judge_path": path, "escalated": float(escalated.mean()) if n else math.nan,
        "judge_calls": calls, "judge_errors": errors,
        "judge_ms_mean": round(1e3 * seconds / calls, 3) if calls else None,
        "tpr": float(caught[pos].mean()) if pos.any() else math.nan,
        "fpr": float(caught[neg].mean()) if neg.any() else math.nan,
    }

    def fmt(v: float) -> str:
        return "-" if math.isnan(v) else f"{v:.3f}"

    out["summary"] = (f"cascade with judge {path or out['judge']} (escalating rules: "
                      f"{', '.join(out['escalating_rules']) or 'none'}): TPR {fmt(out['tpr'])}, FPR {fmt(out['fpr'])}, "
                      f"escalated {fmt(out['escalated'])} of rows ({calls} judge calls, {errors} errors)")
    return out


__all__ = ["cascade_metrics", "cascade_row"]
