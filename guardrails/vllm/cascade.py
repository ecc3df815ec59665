"""The cascade in vLLM: uncertain bands judged by the driver between two passes.

A judge (a Python callable, a LangChain chat model, an HTTP client) cannot run inside vLLM's forward pass, where the
guard decides. So :class:`~guardrails.vllm.guarded.GuardedVLLM` with ``judges=`` generates in two passes:

1. every request runs with its bands *held* (:attr:`~guardrails.engine.run.GuardRun.hold_bands`): a band hit finds
   no judge in the worker, blocks there (an input rule's at the prefill: nothing is released) and is recorded as an
   escalated decision with verdict ``error`` (reason :data:`~guardrails.engine.escalation.HELD`);
2. for those requests only, the driver asks the bound judge what ``GuardedModel`` would have asked (an input rule:
   the prompt's turns that ``input_roles`` names; an output rule: the generated text up to the escalating token) and
   runs the request again with the outcome preset in its guard settings: the worker's band hit then takes that
   verdict instead of calling (:attr:`~guardrails.engine.run.GuardRun.judge_presets`), and the decisions, blocking
   and steering follow as on the HF path.

Output rules' bands are held only when the second pass repeats the first one's tokens: greedy decoding, or sampling
with a seed (:func:`holds`); under unseeded sampling they follow the judge's ``on_error``. The server (``guardrails
serve --engine vllm --judge``) runs the same two passes per request (:mod:`guardrails.server.vllm_engine`), its
judges on threads of their own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from guardrails.core.cascade import Judge, JudgeRequest, call_judge, judge_input_text, judge_settings, render_prompt
from guardrails.core.policy import Policy
from guardrails.engine.escalation import HELD
from guardrails.serving.result import GenerationResult
from guardrails.vllm.state import GuardSetupError


def holds(judges: Mapping[str, Any], do_sample: bool, seed: int | None) -> str:
    """The bands a first pass holds: none without judges; output rules' too when the second pass repeats the
    first one's tokens (greedy, or seeded sampling)."""
    if not judges:
        return ""
    return "all" if not do_sample or seed is not None else "input"


def held(result: GenerationResult) -> bool:
    """Whether a first pass held a band hit of ``result`` for the driver's judge."""
    return any(d.escalated and d.judge_reason == HELD for d in result.decisions)


def band_verdicts(policy: Policy, judges: Mapping[str, Judge], prompt: Any, result: GenerationResult,
                  tokenizer: Any) -> dict[str, list[Any]]:
    """The outcomes (``[judge, verdict, latency_s, reason]`` per rule id) of the bound judges on ``result``'s held
    band hits; empty when it holds none. ``prompt``: the request as given (a string or messages)."""
    rules = {r.id: r for r in policy.rules}
    out: dict[str, list[Any]] = {}
    for d in result.decisions:
        rule = rules.get(d.rule)
        if rule is None or not d.escalated or d.judge_reason != HELD or d.rule in out:
            continue
        settings = judge_settings(policy, rule)
        if settings is None or settings.name not in judges:
            continue
        if d.scope == "output":  # what GuardedModel's judge reads: the generated tokens up to the escalating one
            tripping = tokenizer.convert_tokens_to_ids(result.tokens[d.position])
            text = str(tokenizer.decode([*result.output_ids, tripping], skip_special_tokens=True)).strip()
        else:
            text = judge_input_text(prompt, policy.input_roles)
        request = JudgeRequest(render_prompt(settings.prompt, text), text, rule.id, d.scope, float(d.score),
                               settings.name, rule.category)
        outcome = call_judge(judges[settings.name], request, settings.timeout_s)
        out[rule.id] = [outcome.judge, outcome.verdict, outcome.latency_s, outcome.reason]
    return out


def rerun_judged(guard: Any, results: list[GenerationResult], prompts: Sequence[Any], texts: Sequence[str],
                 policies: Sequence[str], settings: Mapping[str, Any]) -> list[GenerationResult]:
    """``GuardedVLLM.generate``'s second pass: the judges asked about each result's held band hits, those requests
    run again (one vLLM batch) with the outcomes preset; ``prompts`` as given, ``texts`` formatted, ``policies`` by
    name, ``settings`` the generation's keyword arguments. Results without a held hit are returned as they are."""
    judged = {i: v for i, r in enumerate(results)
              if (v := band_verdicts(guard.policies[policies[i]], guard.judges, prompts[i], r, guard.tokenizer))}
    if not judged:
        return results
    again = [guard.prepare(texts[i], policy=policies[i], index=i, judged=v, **settings) for i, v in judged.items()]
    outs = guard.llm.generate([r.prompt for r in again], [r.params for r in again], use_tqdm=False)
    verdicts = guard.verdicts([r.key for r in again])
    out = list(results)
    for i, req, o in zip(judged, again, outs, strict=True):
        if (verdict := verdicts.get(req.key)) is None:
            raise GuardSetupError(f"request {i}: the guard holds no result for its judged pass")
        out[i] = guard.result(req, list(o.outputs[0].token_ids), verdict, sequence=i)
    return out


__all__ = ["band_verdicts", "held", "holds", "rerun_judged"]
