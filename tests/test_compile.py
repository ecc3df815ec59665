"""One meaning of a policy on every path (issue 11): the compiler, the torch-free semantics, roles,
scans that decide what generation decides (``block_above`` included), and the layering of the package."""

from __future__ import annotations

import ast
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from guardrails import GuardedModel, Policy
from guardrails.core.semantics import (
    RuleSpec,
    decide_scan,
    escalate,
    is_block,
    is_flag,
    resolve_scan,
    scan_actions,
    scores_token,
    strongest_action,
    window_reference,
)
from guardrails.engine.compile import compile_policy
from guardrails.engine.scorers import window_aggregate
from guardrails.onnx.serve import window_scores
from tests.builders import bundled_tokenizer, random_sae, tiny_lm

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "guardrails"

# -- the reference window and the two engines ---------------------------------------------------------------

scores_st = st.lists(st.one_of(st.none(), st.floats(-50, 50, allow_nan=False, width=32)), min_size=1, max_size=24)


@settings(max_examples=150, deadline=None)
@given(scores=scores_st, window=st.integers(1, 6), how=st.sampled_from(["mean", "max", "sum"]),
       split=st.integers(0, 24))
def test_torch_and_numpy_windows_equal_the_reference(scores: list[float | None], window: int, how: str,
                                                     split: int) -> None:
    ref = window_reference(scores, window, how)
    vals = torch.tensor([[math.nan if s is None else s for s in scores]], dtype=torch.float32)
    # the torch engine sees the tokens in two forwards (a prefill then decode steps): same result
    cut = min(split, len(scores))
    hist = torch.full((1, window - 1), math.nan)
    a, hist = window_aggregate(hist, vals[:, :cut], window, how)
    b, _ = window_aggregate(hist, vals[:, cut:], window, how)
    got_torch = torch.cat([a, b], 1)[0].tolist()
    got_np = window_scores(vals[0].numpy(), window, how).tolist()
    for r, t, n in zip(ref, got_torch, got_np, strict=True):
        if r is None:
            assert math.isnan(t) and math.isnan(n)
        else:
            assert t == pytest.approx(r, rel=1e-5, abs=1e-4) and n == pytest.approx(r, rel=1e-5, abs=1e-4)


def test_semantics_by_hand() -> None:
    pol = Policy.from_dict({"name": "p", "rules": [
        {"id": "s", "scope": "output", "detector": {"kind": "linear", "layer": 0, "weights": "w.safetensors"},
         "threshold": 1.0, "action": "steer", "steer": {"block_above": 5.0}}]})
    rule = pol.rules[0]
    assert escalate(rule, 1.0) == "steer" and escalate(rule, 5.0) == "block"
    assert scores_token("input", is_output=False, role="system", input_roles=["user", "tool"]) is False
    assert scores_token("input", is_output=False, role="system", input_roles=["system", "user"]) is True
    assert scores_token("output", is_output=False, role="user", input_roles=["user"]) is False
    assert scores_token("both", is_output=True, role=None, input_roles=["user"]) is True
    assert scores_token("both", is_output=True, role=None, input_roles=["user"], scorable=False) is False
    # a steer that later reaches block_above blocks there; the block hides what comes after it
    specs = [RuleSpec("s", "steer", 1.0, 5.0), RuleSpec("f", "flag", 2.0)]
    w = [[0.0, 1.5, 3.0, 6.0, 9.0], [0.0, 0.0, 0.0, 0.0, 2.5]]
    ev = decide_scan(specs, w, [0, 1], [[True] * 5] * 2)
    assert [(e.action, e.position, e.threshold) for e in ev] == [("steer", 1, 1.0), ("block", 3, 5.0)]
    from guardrails.core.decision import Decision

    err = Decision("error", "e", math.nan, 1, 0, "input", resolution="block")
    assert strongest_action([Decision("flag", "f", 1, 1, 0, "input"), err]) == "block"
    assert is_block(Decision("error", "e", math.nan, 1, 0, "input", resolution="block"))
    # a scan cannot steer: a steer decision there carries its rule's scan action (default block) as resolution
    steer = Decision("steer", "s", 2.0, 1.0, 3, "output")
    assert not is_block(steer) and not is_flag(steer) and strongest_action([steer]) == "steer"  # generation
    blocked, = resolve_scan([steer], {})
    flagged, = resolve_scan([steer], {"s": "flag"})
    assert (blocked.action, blocked.resolution, flagged.resolution) == ("steer", "block", "flag")
    assert is_block(blocked) and not is_flag(blocked) and strongest_action([blocked]) == "block"
    assert is_flag(flagged) and not is_block(flagged) and strongest_action([flagged]) == "flag"
    other = [Decision("flag", "f", 1, 1, 0, "input"), Decision("block", "s", 6, 5, 4, "output"), err]
    assert resolve_scan(other, {}) == other  # only steer decisions (and flags steering waits for) are resolved
    trigger, = resolve_scan([other[0]], {"f": "block"})  # a flag that a steering: entry waits for
    assert trigger.resolution == "block" and is_block(trigger) and not is_flag(trigger)
    pol = Policy.from_dict({"name": "p", "rules": [
        {"id": "s", "scope": "output", "detector": {"kind": "linear", "layer": 0, "weights": "w.safetensors"},
         "threshold": 1.0, "action": "steer", "steer": {"scan_action": "flag"}},
        {"id": "g", "scope": "input", "detector": {"kind": "linear", "layer": 0, "weights": "w.safetensors"},
         "threshold": 1.0, "action": "flag"},
        {"id": "f", "scope": "input", "detector": {"kind": "linear", "layer": 0, "weights": "w.safetensors"},
         "threshold": 1.0, "action": "flag"}],
        "steering": [{"id": "a", "when": "g", "steer": {"direction": "d.safetensors", "scan_action": "flag"}},
                     {"id": "b", "when": "g", "steer": {"direction": "d.safetensors"}}]})
    assert scan_actions(pol) == {"s": "flag", "g": "block"}  # g: the strongest of its entries'; f: a plain flag


# -- a tiny model, two layers, three kinds of rules ------------------------------------------------------------

TEXTS = ["How do I bake bread at home?", "Tell me a story about a robot.", "What is the capital of France?"]
RESPONSES = ["Mix flour, water, salt and yeast.", "Once upon a time a robot learned to paint.", "Paris."]


def _policy(thresholds: tuple[float, float, float], block_above: float, roles: str = "[user, tool]",
            scan_action: str = "block") -> Policy:
    a, b, c = thresholds
    return Policy.from_yaml(f"""
name: three
input_roles: {roles}
saes:
  s1: {{path: unused, layer: 1}}
  s2: {{path: unused, layer: 2}}
rules:
  - id: steer-then-block
    scope: output
    detector: {{sae: s1, features: [1, 2, 3, 4, 5, 6, 7, 8], combine: sum, window: 2}}
    threshold: {a}
    action: steer
    steer: {{strength: 0.0, block_above: {block_above}, scan_action: {scan_action}}}
  - id: flag-both
    scope: both
    detector: {{sae: s2, features: [9, 10, 11, 12], combine: max}}
    threshold: {b}
    action: flag
  - id: block-input
    scope: input
    detector: {{sae: s2, features: [20, 21, 22, 23, 24], combine: mean, window: 3, aggregate: max}}
    threshold: {c}
    action: block
""")


@pytest.fixture(scope="module")
def tiny() -> dict[str, Any]:
    tok = bundled_tokenizer()
    return {"tok": tok, "model": tiny_lm("llama", tok),
            "saes": {"s1": random_sae(d_sae=64, k=16, layer=1, seed=3), "s2": random_sae(d_sae=64, k=16, layer=2,
                                                                                          seed=4)}}


def _guard(tiny: dict[str, Any], pol: Policy, **kw: Any) -> GuardedModel:
    return GuardedModel(tiny["model"], tiny["tok"], pol, saes=tiny["saes"], **kw)


def _quantile(ts: dict[int, float], q: float) -> float:
    vals = sorted(ts.values())
    return vals[min(len(vals) - 1, int(q * len(vals)))] if vals else 0.0


@pytest.mark.parametrize("qs", [(0.3, 0.9, 0.95), (0.6, 0.5, 0.99), (0.0, 1.1, 0.2), (0.9, 0.2, 1.1)])
@pytest.mark.parametrize("mode", ["exact", "watched"])
def test_torch_scan_decides_as_the_reference(tiny: dict[str, Any], qs: tuple[float, float, float],
                                             mode: str) -> None:
    """``GuardedModel.score`` == :func:`decide_scan` over its own traced scores, for thresholds across the range."""
    probe = _guard(tiny, _policy((1e9, 1e9, 1e9), 1e9), score_mode=mode).score(TEXTS, responses=RESPONSES)
    for i, p in enumerate(probe):
        ts = p.token_scores
        thr = tuple(_quantile(ts[r], q) + (1e6 if q > 1 else 0) for r, q in
                    zip(["steer-then-block", "flag-both", "block-input"], qs, strict=True))
        block_above = _quantile(ts["steer-then-block"], min(1.0, qs[0] + 0.3)) if qs[0] < 1 else 1e9
        pol = _policy(thr, block_above)  # type: ignore[arg-type]
        got = _guard(tiny, pol, score_mode=mode).score([TEXTS[i]], responses=[RESPONSES[i]])[0]
        n = len(got.tokens)
        windowed = [[got.token_scores[r.id].get(t) for t in range(n)] for r in pol.rules]  # its own trace
        specs = [RuleSpec(r.id, r.action, r.threshold, r.steer.block_above if r.steer else None, "block")
                 for r in pol.rules]
        order = sorted(range(3), key=lambda j: ([1, 2, 2][j], j))  # layers ascending, policy order within
        in_scope = [[w is not None for w in row] for row in windowed]
        want = [(specs[e.rule].id, e.action, e.position) for e in decide_scan(specs, windowed, order, in_scope)]
        assert [(d.rule, d.action, d.position) for d in got.decisions] == want


def test_scan_applies_block_above_as_generation_does(tiny: dict[str, Any]) -> None:
    """The bug: a scan flagged (steer) what generation blocks once the score reaches block_above."""
    probes = _guard(tiny, _policy((1e9, 1e9, 1e9), 1e9)).score(TEXTS, responses=RESPONSES)
    # a text whose first output score is below a later one: steer at the first, block at the later
    i = next(i for i, p in enumerate(probes) if (ts := p.token_scores["steer-then-block"]) and
             max(v for q, v in ts.items() if q > min(ts)) > ts[min(ts)])
    ts = probes[i].token_scores["steer-then-block"]
    hi = max(v for q, v in ts.items() if q > min(ts))
    pol = _policy((min(ts.values()) - 1, 1e9, 1e9), hi)
    scan = _guard(tiny, pol).score([TEXTS[i]], responses=[RESPONSES[i]])[0]
    assert scan.blocked
    assert [d.action for d in scan.decisions] == ["steer", "block"]
    assert scan.decisions[-1].threshold == hi and scan.decisions[-1].score >= hi * (1 - 1e-6)
    from guardrails.integrations.langchain import SAEGuard

    g = SAEGuard(guard=_guard(tiny, pol), mode="output")
    out, meta = g.check({"input": TEXTS[i], "output": RESPONSES[i]})
    assert meta["blocked"] and out["output"] == pol.refusal


@pytest.mark.parametrize("scan_action", ["block", "flag"])
def test_a_scan_does_the_steer_rules_scan_action(tiny: dict[str, Any], scan_action: str) -> None:
    """Generation steers where the rule fires; a scan of the same text cannot, so it blocks there (default) or
    flags (``steer.scan_action: flag``): never the silent pass of a steer nobody applied."""
    probes = _guard(tiny, _policy((1e9, 1e9, 1e9), 1e9)).score(TEXTS, responses=RESPONSES)
    ts = probes[0].token_scores["steer-then-block"]
    pol = _policy((min(ts.values()) - 1, 1e9, 1e9), 1e9, scan_action=scan_action)  # steers, never reaches block
    scan = _guard(tiny, pol).score([TEXTS[0]], responses=[RESPONSES[0]])[0]
    d, = scan.decisions
    assert (d.rule, d.action, d.resolution) == ("steer-then-block", "steer", scan_action)
    assert scan.blocked == (scan_action == "block") and scan.flagged == (scan_action == "flag")
    gen = _guard(tiny, pol).generate(TEXTS[0], max_new_tokens=3)  # generation steers (strength 0 here)
    assert not gen.blocked and gen.steered and [(g.action, g.resolution) for g in gen.decisions] == [("steer", None)]


def test_generation_decides_as_its_scan(tiny: dict[str, Any]) -> None:
    """Token by token (generate, stream) and all at once (score of the same ids) take the same decisions."""
    tok = tiny["tok"]
    free = _guard(tiny, _policy((1e9, 1e9, 1e9), 1e9))
    compared = 0
    for prompt in TEXTS:
        gen = free.generate(prompt, max_new_tokens=10)
        ids = gen.output_ids
        text = tok.decode(ids)
        if tok(text, add_special_tokens=False)["input_ids"] != ids or not ids:
            continue  # the scan re-tokenizes text: compare where that gives back the generated ids
        ts = gen.token_scores
        pol = _policy((_quantile(ts["steer-then-block"], 0.5), _quantile(ts["flag-both"], 0.7), 1e9),
                      _quantile(ts["steer-then-block"], 0.8))
        guard = _guard(tiny, pol)
        g = guard.generate(prompt, max_new_tokens=10)
        s = guard.stream(prompt, max_new_tokens=10)
        shown = "".join(s)
        assert s.result is not None
        scan = guard.score([prompt], responses=[text])[0]
        key = [(d.rule, d.action, d.position) for d in g.decisions]
        assert key == [(d.rule, d.action, d.position) for d in s.result.decisions]
        assert key == [(d.rule, d.action, d.position) for d in scan.decisions]
        assert g.blocked == scan.blocked == s.result.blocked
        assert shown.startswith(s.result.released_text)
        compared += 1
    assert compared >= 1


def test_input_rules_skip_the_system_prompt_unless_listed(tiny: dict[str, Any]) -> None:
    convo = [{"role": "system", "content": "Never explain how to build bombs."},
             {"role": "user", "content": "What is 2+2?"}]
    always = _policy((1e9, 1e9, -1e9), 1e9)  # block-input trips at the first token it scores
    res = _guard(tiny, always).score([convo])[0]
    d = res.decisions[0]
    assert d.rule == "block-input" and d.role == "user"
    first_user = res.roles.index("user")
    assert d.position >= first_user and "system" in res.roles
    assert all(r == "system" for r in res.roles[1:first_user - 4])  # the system turn's own tokens
    opted = _policy((1e9, 1e9, -1e9), 1e9, roles="[system, user, tool]")
    d2 = _guard(tiny, opted).score([convo])[0].decisions[0]
    assert d2.role == "system" and d2.position < first_user
    # generation reads the same roles: the prompt's first decision is in the user turn
    gen = _guard(tiny, always).generate(convo, max_new_tokens=2)
    assert gen.blocked and gen.decisions[0].role == "user" and gen.decisions[0].position == d.position


def test_scoped_variants_share_tensors_and_reload_nothing(tiny: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path) -> None:
    sae_dir = tmp_path / "sae"
    tiny["saes"]["s2"].save(sae_dir)
    pol = Policy.from_yaml(f"""
name: w
score_mode: watched
saes: {{s2: {{path: "{sae_dir}", layer: 2}}}}
rules:
  - {{id: a, scope: input, detector: {{sae: s2, features: [1, 2]}}, threshold: 1e9, action: block}}
  - {{id: b, scope: output, detector: {{sae: s2, features: [3]}}, threshold: 1e9, action: flag}}
""")
    compiled = compile_policy(pol, tiny["model"])
    from guardrails.sae import model as sae_model

    def no_load(*a: Any, **k: Any) -> Any:
        raise AssertionError("a variant reloaded an SAE")

    monkeypatch.setattr(sae_model.SAE, "load", no_load)
    inp = compiled.scoped("input")
    assert [r.id for r in inp.policy.rules] == ["a"] and inp.scorers[2].encoder is compiled.scorers[2].encoder
    assert compiled.scoped("input") is inp
    cal = compiled.unthresholded()
    guard = GuardedModel(tiny["model"], tiny["tok"], cal)
    res = guard.score(TEXTS[:1], responses=RESPONSES[:1])[0]
    assert res.decisions == [] and res.token_scores["a"] and res.token_scores["b"]
    from guardrails.integrations.langchain import SAEGuard

    SAEGuard(guard=GuardedModel(tiny["model"], tiny["tok"], compiled), mode="output").check("Paris.")


def test_score_residuals_equals_the_hooks(tiny: dict[str, Any]) -> None:
    pol = _policy((1e9, 1e9, 1e9), 1e9)
    guard = _guard(tiny, pol)
    ref = guard.score([TEXTS[1]], responses=[RESPONSES[1]], chat=False)[0]
    tok = tiny["tok"]
    ids = tok(TEXTS[1] + RESPONSES[1], add_special_tokens=False)["input_ids"]
    n_prompt = len(tok(TEXTS[1], add_special_tokens=False)["input_ids"])
    if len(ref.tokens) != len(ids):
        pytest.skip("tokenization of the joined text differs")
    with torch.no_grad():
        hs = tiny["model"](torch.tensor([ids]), output_hidden_states=True).hidden_states
    T = len(ids)
    pos = torch.arange(T)[None]
    mask = (pos > 0) & ~torch.isin(torch.tensor([ids]), torch.tensor(tok.all_special_ids))
    run = guard.compiled.score_residuals({1: hs[2], 2: hs[3]}, score_mask=mask, is_output=pos >= n_prompt)
    for rule in pol.rules:
        got = run.token_scores(0)[rule.id]
        assert set(got) == set(ref.token_scores[rule.id])
        for p, v in got.items():
            assert v == pytest.approx(ref.token_scores[rule.id][p], rel=1e-4, abs=1e-4)


# -- the layout --------------------------------------------------------------------------------------------------

FLOORS = {"_data": 0, "core": 0, "audit": 1, "sae": 1, "engine": 2, "serving": 3, "onnx": 4, "offline": 4, "server": 5,
          "integrations": 5, "vllm": 5, "cli": 6}


def test_no_floor_imports_a_higher_one() -> None:
    bad = []
    for f in PKG.rglob("*.py"):
        parts = f.relative_to(PKG).parts
        if len(parts) < 2 or parts[0] not in FLOORS:
            continue
        here = FLOORS[parts[0]]
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                bits = name.split(".")
                if bits[0] == "guardrails" and len(bits) > 1 and bits[1] in FLOORS and FLOORS[bits[1]] > here:
                    bad.append(f"{f.relative_to(REPO)} imports {name}")
    assert not bad, "\n".join(bad)


def test_packages_every_module_belongs_to_a_floor() -> None:
    tops = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert tops <= set(FLOORS), f"sub-packages without a floor: {sorted(tops - set(FLOORS))}"


def test_torch_free_floors_do_not_import_torch() -> None:
    code = ("import sys; import guardrails, guardrails.core.policy, guardrails.core.semantics, guardrails.core.roles, "
            "guardrails.core.decision, guardrails.audit, guardrails.audit.report, guardrails.audit.summary, "
            "guardrails.onnx, guardrails.onnx.serve; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stderr


def test_modules_stay_readable() -> None:
    long = {str(f.relative_to(REPO)): n for f in PKG.rglob("*.py")
            if (n := len(f.read_text(encoding="utf-8").splitlines())) > 520}
    assert not long, f"modules over 520 lines (split by concept): {long}"


def test_every_error_is_a_guardrails_error() -> None:
    from guardrails import GuardrailsError, GuardrailViolation, PolicyError, SAEError
    from guardrails.audit import AuditError
    from guardrails.engine.hooks import HookError
    from guardrails.onnx import OnnxGuardError
    from guardrails.serving.models import ModelLoadError

    for cls in (PolicyError, SAEError, AuditError, HookError, OnnxGuardError, ModelLoadError, GuardrailViolation):
        assert issubclass(cls, GuardrailsError), cls


def test_numpy_window_is_the_onnx_one() -> None:
    x = np.array([1.0, np.nan, 3.0, 5.0], dtype=np.float32)
    assert window_scores(x, 2, "mean").tolist()[3] == pytest.approx(4.0)


def test_audits_and_reports_name_the_turn_of_each_token(tiny: dict[str, Any], tmp_path: Path) -> None:
    from guardrails.audit import AuditStore
    from guardrails.audit.report import render_record

    store = AuditStore(tmp_path / "a.db")
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    gen = _guard(tiny, _policy((1e9, -1e9, 1e9), 1e9), audit=store).generate(convo, max_new_tokens=3)
    assert gen.roles[:2] == ["system", "system"] and "user" in gen.roles
    assert gen.roles[gen.prompt_length:] == ["assistant"] * (len(gen.tokens) - gen.prompt_length)
    rec = store.list()[0]
    assert rec.data["trace"]["roles"] == gen.roles
    assert rec.data["decisions"][0]["role"] in ("user", "assistant")
    assert "(user turn)" in render_record(rec) and "(system turn)" in render_record(rec)
