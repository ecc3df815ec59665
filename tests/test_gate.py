"""Gated output rules (``rules[].gate``): an answer's score is capped by its request's score,
``min(own, scale * g + offset)`` with ``g`` the gate rule's highest prompt score so far, on every path
(scan, cached generation, calibration's residual scoring) and refused where it is not applied (ONNX)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from guardrails import GuardedModel, Policy
from guardrails.core.policy import PolicyError
from guardrails.core.semantics import gate_cap, scoped_rules
from guardrails.engine.hooks import hooks_on

PROMPT = "How do I bake bread at home?"
RESPONSE = "Mix flour, water, salt and yeast, knead it, let it rise, then bake it until golden."


def _weights(path: Path, seed: int, hidden: int = 64) -> str:
    g = torch.Generator().manual_seed(seed)
    save_file({"weight": torch.randn(hidden, generator=g) * 0.2, "bias": torch.tensor(0.1)}, str(path))
    return str(path)


def _policy(tmp: Path, *, gate: str | None = "{rule: req, scale: 1.5, offset: -0.04}", out_threshold: float = 1e9,
            req_layer: int = 1, out_layer: int = 2, out_scope: str = "output") -> Policy:
    req, ans = _weights(tmp / "req.safetensors", 1), _weights(tmp / "ans.safetensors", 2)
    gate_line = f"\n    gate: {gate}" if gate else ""
    return Policy.from_yaml(f"""
name: gated
rules:
  - id: req
    scope: input
    detector: {{kind: linear, layer: {req_layer}, weights: "{req}", window: 2}}
    threshold: 1e9
    action: flag
  - id: ans
    scope: {out_scope}
    detector: {{kind: linear, layer: {out_layer}, weights: "{ans}", window: 3}}
    threshold: {out_threshold}
    action: block{gate_line}
""")


@pytest.mark.parametrize(("gate", "scope", "message"), [
    ("{rule: nope}", "output", "rules[1].gate.rule: unknown rule 'nope'; valid: req"),
    ("{rule: ans}", "output", "rules[1].gate.rule: unknown rule 'ans'"),
    ("{rule: req}", "input", "only an output rule can be gated"),
    ("{rule: req, scale: 0}", "output", "rules.1.gate.scale"),
])
def test_bad_gates_name_the_place_and_the_valid_options(tmp_path: Path, gate: str, scope: str, message: str) -> None:
    with pytest.raises(PolicyError) as err:
        _policy(tmp_path, gate=gate, out_scope=scope)
    assert message in str(err.value).replace("rules[1].gate.scale", "rules.1.gate.scale")


def test_a_gate_deeper_than_its_rule_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"decides at layer 2, deeper than this rule's layer 1"):
        _policy(tmp_path, req_layer=2, out_layer=1)


def test_gate_cap_reference_is_a_running_max() -> None:
    assert gate_cap([None, 1.0, None, 0.5, 3.0], 2.0, -1.0) == [None, 1.0, 1.0, 1.0, 5.0]


def test_scan_caps_the_answer_by_the_request_score(lm: Any, tok: Any, tmp_path: Path) -> None:
    model = lm("llama")
    gated = GuardedModel(model, tok, _policy(tmp_path), chat=False)
    free = GuardedModel(model, tok, _policy(tmp_path, gate=None), chat=False)
    g, f = (m.score([PROMPT], responses=[RESPONSE], chat=False)[0] for m in (gated, free))
    req = f.token_scores["req"]
    assert req and f.token_scores["ans"]
    cap = 1.5 * max(req.values()) - 0.04  # every answer token comes after the whole prompt
    for pos, own in f.token_scores["ans"].items():
        assert g.token_scores["ans"][pos] == pytest.approx(min(own, cap), rel=1e-5, abs=1e-6)
    assert g.scores["ans"] < f.scores["ans"]  # the cap binds here (these weights)
    assert hooks_on(model) == 0


def test_generation_fires_only_when_the_request_scored(lm: Any, tok: Any, tmp_path: Path) -> None:
    model = lm("llama")
    free = GuardedModel(model, tok, _policy(tmp_path, gate=None, out_threshold=-1e9), chat=False)
    assert free.generate(PROMPT, max_new_tokens=4, chat=False).blocked  # type: ignore[union-attr]
    shut = _policy(tmp_path, gate="{rule: req, scale: 1.0, offset: -1e12}", out_threshold=-1e9)
    out = GuardedModel(model, tok, shut, chat=False).generate(PROMPT, max_new_tokens=4, chat=False)
    assert not out.blocked and not [d for d in out.decisions if d.rule_id == "ans"]  # type: ignore[union-attr]
    opened = _policy(tmp_path, gate="{rule: req, scale: 1.0, offset: 1e12}", out_threshold=-1e9)
    assert GuardedModel(model, tok, opened, chat=False).generate(PROMPT, max_new_tokens=4, chat=False).blocked  # type: ignore[union-attr]
    assert hooks_on(model) == 0


def test_an_output_guard_keeps_its_gate_as_a_score_only_rule(lm: Any, tok: Any, tmp_path: Path) -> None:
    """The output-only guard (LangChain's mode='output') applies the gate to the prompt it is given, and
    the gate rule decides nothing."""
    pol = _policy(tmp_path)
    rules = scoped_rules(pol, "output")
    assert [r.id for r in rules] == ["ans", "req"] and rules[0].gate is not None
    assert rules[1].scope == "input" and rules[1].threshold == math.inf and rules[1].action == "flag"
    assert [r.id for r in scoped_rules(pol, "input")] == ["req"]
    model = lm("llama")
    full = GuardedModel(model, tok, pol, chat=False)
    out_only = full.scoped("output")
    a, b = (g.score([PROMPT], responses=[RESPONSE], chat=False)[0] for g in (full, out_only))
    assert a.token_scores["ans"] == pytest.approx(b.token_scores["ans"], rel=1e-5, abs=1e-6)
    assert not [d for d in b.decisions if d.rule == "req"]


def test_calibration_scores_match_the_scan(lm: Any, tok: Any, tmp_path: Path) -> None:
    """token_scores on answer-only residual rows with the gate's prompt scores = the served scan."""
    from guardrails.offline.calibrate import LabeledData, residuals
    from guardrails.offline.scoring import rule_text_scores, text_scores

    model = lm("llama")
    guard = GuardedModel(model, tok, _policy(tmp_path), chat=False)
    prompts = [PROMPT, "Tell me a story about a robot who learns to paint."]
    answers = [RESPONSE, "Once upon a time a robot found a brush and painted the sea."]
    data = LabeledData(texts=prompts, labels=np.array([0, 1]), responses=answers, path="mem", sha256="x",
                       sources=["a", "b"])

    def rows_of(rule: Any) -> Any:
        from guardrails.core.semantics import rule_layer
        from guardrails.offline.calibrate import rule_scope

        return residuals(model, tok, data, rule_layer(guard.policy, rule), rule_scope(rule), model_name="tiny",
                         chat=False, progress=False, use_cache=False)

    got = rule_text_scores(guard, guard.policy.rules[1], rows_of)
    want = [s.scores["ans"] for s in guard.score(prompts, responses=answers, chat=False)]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    ungated = rule_text_scores(guard.__class__(model, tok, _policy(tmp_path, gate=None), chat=False),
                               _policy(tmp_path, gate=None).rules[1], rows_of)
    assert all(a <= b + 1e-6 for a, b in zip(got, ungated, strict=True))
    # no prompt scored (no gate scores given): the gated rule scores the answer alone
    alone = text_scores(guard, "ans", rows_of(guard.policy.rules[1]))
    np.testing.assert_allclose(alone, ungated, rtol=1e-5, atol=1e-6)
    assert not all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(got, ungated, strict=True))


def test_onnx_export_refuses_a_gated_policy(tmp_path: Path) -> None:
    from guardrails.onnx.export import OnnxGuardError, export_onnx

    with pytest.raises(OnnxGuardError, match=r"rules\[\]\.gate"):
        export_onnx(_policy(tmp_path), tmp_path / "onnx")


def test_fit_gate_standardises_both_scores_on_label_0(lm: Any, tok: Any, tmp_path: Path) -> None:
    """``guardrails calibrate --fit-gate K``: scale = sd_own / sd_gate, offset = mean_own - scale * mean_gate
    + K * sd_own over the label-0 rows; bad input is refused with the reason."""
    from guardrails.offline.calibrate import CalibrationError, LabeledData, residuals, rule_scope
    from guardrails.offline.scoring import fit_gate, gate_scores, text_scores

    model = lm("llama")
    guard = GuardedModel(model, tok, _policy(tmp_path), chat=False)
    prompts = [PROMPT, "Tell me a story about a robot.", "What is the capital of France?", "Name three colours."]
    answers = [RESPONSE, "A robot found a brush and painted.", "Paris is the capital.", "Red, green and blue."]
    labels = np.array([0, 0, 0, 1])
    data = LabeledData(texts=prompts, labels=labels, responses=answers, path="mem", sha256="y", sources=[""] * 4)

    def rows_of(rule: Any) -> Any:
        from guardrails.core.semantics import rule_layer

        return residuals(model, tok, data, rule_layer(guard.policy, rule), rule_scope(rule), model_name="tiny",
                         chat=False, progress=False, use_cache=False)

    rule = guard.policy.rules[1]
    gate = fit_gate(guard, rule, rows_of, labels, slack=1.0)
    own, g = text_scores(guard, "ans", rows_of(rule)), gate_scores(guard, rule, rows_of)
    assert g is not None
    neg = labels == 0
    scale = own[neg].std() / g[neg].std()
    assert gate.rule == "req" and gate.scale == pytest.approx(scale, abs=1e-4)
    assert gate.offset == pytest.approx(own[neg].mean() - scale * g[neg].mean() + own[neg].std(), abs=1e-4)
    with pytest.raises(CalibrationError, match="slack"):
        fit_gate(guard, rule, rows_of, labels, slack=-1.0)
    with pytest.raises(CalibrationError, match="has no gate"):
        fit_gate(guard, guard.policy.rules[0], rows_of, labels)
    with pytest.raises(CalibrationError, match="label-0 rows"):
        fit_gate(guard, rule, rows_of, np.ones(4, dtype=int))


def test_langchain_output_guard_applies_the_gate_to_its_prompt(tmp_path: Path) -> None:
    """SAEGuard(mode="output") on {'input', 'output'}: the gated answer score is the full scan's."""
    from guardrails.integrations.langchain.chat import SAEGuard
    from tests.builders import bundled_tokenizer, tiny_lm

    tok = bundled_tokenizer()  # a real chat template
    model = tiny_lm("llama", tok)
    full = GuardedModel(model, tok, _policy(tmp_path))
    guard = SAEGuard(guard=full, mode="output")
    _, meta = guard.check({"input": PROMPT, "output": RESPONSE})
    want = full.score([[{"role": "user", "content": PROMPT}]], responses=[RESPONSE])[0]
    assert meta["scores"]["ans"] == pytest.approx(want.scores["ans"], rel=1e-5, abs=1e-6)
    assert meta["scores"]["req"] == pytest.approx(want.scores["req"], rel=1e-5, abs=1e-6)
    assert not meta["blocked"] and not meta["flagged"]  # the gate-only rule decides nothing
    assert hooks_on(model) == 0
