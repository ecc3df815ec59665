"""The cascade in vLLM: input rules' uncertain bands judged by the driver between two passes.

A judge (a Python callable, a LangChain chat model, an HTTP client) cannot run inside vLLM's forward pass, where the
guard decides. So :class:`~guardrails.vllm.guarded.GuardedVLLM` with ``judges=`` generates in two passes:

1. every request runs with its input bands *held* (:attr:`~guardrails.engine.run.GuardRun.hold_bands`): a band hit
   finds no judge in the worker, blocks at the prefill (nothing is released) and is recorded as an escalated
   decision with verdict ``error`` (reason :data:`~guardrails.engine.escalation.HELD`);
2. for those requests only, the driver asks the bound judge about the prompt (the turns ``input_roles`` names, as
   ``GuardedModel`` does) and runs the request again with the outcome preset in its guard settings: the worker's
   band hit then takes that verdict instead of calling (:attr:`~guardrails.engine.run.GuardRun.judge_presets`), and
   the decisions, blocking and steering follow as on the HF path.

Output rules' band hits cannot pause vLLM's decoding for a judge; they keep following ``on_error``. The server
(``guardrails serve --engine vllm --judge``) runs the same two passes per request
(:mod:`guardrails.server.vllm_engine`), its judges on threads of their own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from guardrails.core.cascade import Judge, JudgeRequest, call_judge, judge_input_text, judge_settings, render_prompt
from guardrails.core.policy import Policy
from guardrails.serving.result import GenerationResult


def input_band_verdicts(policy: Policy, judges: Mapping[str, Judge], prompt: Any,
                        result: GenerationResult) -> dict[str, list[Any]]:
    """The outcomes (``[judge, verdict, latency_s, reason]`` per rule id) of the bound judges on ``result``'s input
    band hits that the worker could not judge; empty when there is none to ask about."""
    rules = {r.id: r for r in policy.rules}
    out: dict[str, list[Any]] = {}
    for d in result.decisions:
        rule = rules.get(d.rule)
        if rule is None or d.scope != "input" or not d.escalated or d.verdict != "error" or d.rule in out:
            continue
        settings = judge_settings(policy, rule)
        if settings is None or settings.name not in judges:
            continue
        text = judge_input_text(prompt, policy.input_roles)
        request = JudgeRequest(render_prompt(settings.prompt, text), text, rule.id, "input", float(d.score),
                               settings.name, rule.category)
        outcome = call_judge(judges[settings.name], request, settings.timeout_s)
        out[rule.id] = [outcome.judge, outcome.verdict, outcome.latency_s, outcome.reason]
    return out


__all__ = ["input_band_verdicts"]
