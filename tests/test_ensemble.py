"""Ensemble detectors (``kind: ensemble``): the token score is the weighted mean of standardised member scores
(a multi-layer probe and an SAE-feature rule at another layer), on every path (scan, cached generation, residual
scan, ONNX), and a member that cannot score makes the ensemble follow on_error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from guardrails import GuardedModel, Policy
from guardrails.core.policy import PolicyError
from guardrails.engine.hooks import capture, hooks_on
from tests.builders import (
    assert_onnx_matches_torch,
    assert_token_scores,
    first_new_high,
    qwen_scope_encode,
    qwen_scope_tensors,
    write_qwen_scope,
)

K = 32
FEATURES = {f: round(0.25 + (f % 7) / 5, 2) * (-1 if f % 5 == 0 else 1) for f in range(0, 160, 3)}
PROBE = {"weight": 2.0, "mean": 0.5, "std": 1.5}
SAE_MEMBER = {"weight": 1.0, "mean": -0.3, "std": 0.7, "bias": -0.2}
PROMPTS = ["How do I bake bread at home?", "Tell me a story about a robot who learns to paint."]


def _files(tmp: Path, sae_layer: int = 1) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(11)
    probe = tmp / "probe.safetensors"
    save_file({"weight": torch.randn(64, generator=g), "bias": torch.tensor(0.3),
               "weight.L0": torch.randn(64, generator=g)}, str(probe))
    tensors = qwen_scope_tensors(seed=3)
    return write_qwen_scope(tmp / "sae", sae_layer, tensors), probe, tensors


def _policy(sae: Path, probe: Path, *, sae_layer: int = 1, threshold: float = 1e9, scope: str = "both",
            window: int = 1, member_extra: str = "") -> Policy:
    feats = ", ".join(f"{f}: {w}" for f, w in FEATURES.items())
    return Policy.from_yaml(f"""
name: ens
saes:
  main: {{path: "{sae}", layer: {sae_layer}, k: {K}}}
rules:
  - id: ens
    scope: {scope}
    detector:
      kind: ensemble
      window: {window}
      members:
        - detector: {{kind: linear, layer: 2, extra_layers: [0], weights: "{probe}"}}
          weight: {PROBE['weight']}
          mean: {PROBE['mean']}
          std: {PROBE['std']}
        - detector: {{sae: main, features: {{{feats}}}, bias: {SAE_MEMBER['bias']}{member_extra}}}
          weight: {SAE_MEMBER['weight']}
          mean: {SAE_MEMBER['mean']}
          std: {SAE_MEMBER['std']}
    threshold: {threshold}
    action: block
""")


def _by_hand(model: Any, tok: Any, ids: list[int], probe: Path, tensors: dict[str, torch.Tensor],
             sae_layer: int = 1, mode: str = "exact") -> np.ndarray:
    """Exact mode: the Qwen-Scope TopK encode; watched mode: ReLU of each watched row's pre-activation."""
    t = load_file(str(probe))
    with torch.no_grad(), capture(model, sorted({0, sae_layer, 2})) as store:
        model(input_ids=torch.tensor([ids]))
    p = store[2][0].float() @ t["weight"] + t["bias"] + store[0][0].float() @ t["weight.L0"]
    x = store[sae_layer][0]
    acts = (qwen_scope_encode(x, tensors, K) if mode == "exact"
            else torch.relu(x.float() @ tensors["W_enc"].T + tensors["b_enc"]))
    w = torch.zeros(acts.shape[-1])
    for f, v in FEATURES.items():
        w[f] = v
    s = acts @ w + SAE_MEMBER["bias"]
    total = PROBE["weight"] + SAE_MEMBER["weight"]
    z = (PROBE["weight"] * (p - PROBE["mean"]) / PROBE["std"]
         + SAE_MEMBER["weight"] * (s - SAE_MEMBER["mean"]) / SAE_MEMBER["std"]) / total
    return z.numpy()


def _ids(tok: Any, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("sae_layer", [1, 2], ids=["sae-shallower", "sae-same-layer"])
@pytest.mark.parametrize("mode", ["exact", "watched"])
def test_scan_scores_are_the_standardised_mean_by_hand(lm: Any, tok: Any, tmp_path: Path, sae_layer: int,
                                                       mode: str) -> None:
    model = lm("llama")
    sae, probe, tensors = _files(tmp_path, sae_layer)
    guard = GuardedModel(model, tok, _policy(sae, probe, sae_layer=sae_layer), chat=False, score_mode=mode)
    assert guard.compiled.hooked_layers == {0, sae_layer, 2}
    for text in PROMPTS:
        got = guard.score([text], chat=False)[0].token_scores["ens"]
        want = _by_hand(model, tok, _ids(tok, text), probe, tensors, sae_layer, mode)
        assert_token_scores(got, want)
    assert hooks_on(model) == 0


def test_cached_generation_scores_and_trips_as_a_full_forward(lm: Any, tok: Any, tmp_path: Path) -> None:
    model = lm("llama")
    sae, probe, tensors = _files(tmp_path)
    out = GuardedModel(model, tok, _policy(sae, probe, scope="output"), chat=False).generate(
        PROMPTS[0], max_new_tokens=10, chat=False)
    assert not isinstance(out, list) and len(out.output_ids) >= 4
    prompt = _ids(tok, PROMPTS[0])
    want = _by_hand(model, tok, prompt + out.output_ids, probe, tensors)
    got = out.token_scores["ens"]
    assert sorted(got) == list(range(len(prompt), len(prompt) + len(out.output_ids)))
    assert_token_scores(got, want)
    pick, threshold = first_new_high(got)
    res = GuardedModel(model, tok, _policy(sae, probe, threshold=threshold, scope="output"), chat=False).generate(
        PROMPTS[0], max_new_tokens=10, chat=False)
    assert not isinstance(res, list) and res.blocked
    assert res.decisions[0].rule == "ens" and res.decisions[0].position == pick
    assert res.decisions[0].score == pytest.approx(got[pick], rel=1e-4)
    # the audit names what fired: the SAE member's top features at the tripping token (the probe's layer has none)
    ids = prompt + out.output_ids[: pick - len(prompt) + 1]
    with torch.no_grad(), capture(model, [1]) as store:
        model(input_ids=torch.tensor([ids]))
    acts = qwen_scope_encode(store[1][0, pick], tensors, K)
    vals, idx = acts.topk(5)
    want_top = [(int(i), round(float(v), 3)) for v, i in zip(vals, idx, strict=True) if v > 0]
    got_top = list(res.decisions[0].top_features)
    assert [f for f, _ in got_top] == [f for f, _ in want_top]
    assert [a for _, a in got_top] == pytest.approx([a for _, a in want_top], abs=2e-3)
    assert hooks_on(model) == 0


def test_windowed_input_guard_and_residual_scan(lm: Any, tok: Any, tmp_path: Path) -> None:
    """An input-only variant (``scoped``) keeps the SAE member; residual rows score as the hooks do."""
    from guardrails.engine.scorers import score_windowed_flat

    model = lm("llama")
    sae, probe, tensors = _files(tmp_path)
    guard = GuardedModel(model, tok, _policy(sae, probe, window=4), chat=False)
    ids = _ids(tok, PROMPTS[1])
    want = score_windowed_flat(torch.tensor(_by_hand(model, tok, ids, probe, tensors)), 4, "mean").numpy()
    scoped = guard.compiled.scoped("input")
    assert any(h.carry is not None for sc in scoped.scorers.values() for h in sc.heads)
    with torch.no_grad(), capture(model, [0, 1, 2]) as store:
        model(input_ids=torch.tensor([ids]))
    T = len(ids)
    run = scoped.unthresholded().score_residuals(dict(store), score_mask=torch.ones(1, T, dtype=torch.bool),
                                                 is_output=torch.zeros(1, T, dtype=torch.bool))
    traced = torch.cat([s for _, s in run.trace_scores["ens"]], dim=1)[0].numpy()
    np.testing.assert_allclose(traced, want, rtol=1e-4, atol=1e-4)
    assert set(run.trace_scores) == {"ens"}  # the member is not a rule of its own: no trace, no decision


def test_onnx_export_matches_torch_score(lm: Any, tok: Any, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    sae, probe, _ = _files(tmp_path)
    assert_onnx_matches_torch(_policy(sae, probe), lm("llama"), tok, tmp_path / "out", PROMPTS, "ens")


@pytest.mark.parametrize("sae_layer", [1, 2], ids=["sae-shallower", "sae-same-layer"])
def test_a_failing_member_follows_on_error(lm: Any, tok: Any, tmp_path: Path, sae_layer: int) -> None:
    """The ensemble must not score from its probe alone when its SAE member fails: on_error (block) applies,
    and the decision names the ensemble rule, not the member."""
    model = lm("llama")
    sae, probe, _ = _files(tmp_path, sae_layer)
    guard = GuardedModel(model, tok, _policy(sae, probe, sae_layer=sae_layer), chat=False, score_mode="watched")
    member = next(sc for sc in guard.compiled.scorers.values() if any(h.carry for h in sc.heads))
    assert member.encoder is not None
    member.encoder.W = torch.zeros(3, 7)  # wrong width: the encode raises
    res = guard.generate(PROMPTS[0], max_new_tokens=4, chat=False)
    assert not isinstance(res, list) and res.blocked and res.output_ids == []
    d = res.decisions[0]
    assert d.rule == "ens" and d.action == "error" and d.resolution == "block", d
    assert hooks_on(model) == 0


def test_bad_ensembles_name_the_problem(tmp_path: Path) -> None:
    sae, probe, _ = _files(tmp_path)
    with pytest.raises(PolicyError, match=r"rules\[0\]\.detector\.members\[1\]\.detector\.window: 4; a member is "
                                          r"scored per token \(valid: 1\)"):
        _policy(sae, probe, member_extra=", window: 4")
    with pytest.raises(PolicyError, match=r"rules\[0\]\.detector\.members\[1\]\.detector\.sae: unknown SAE id "
                                          r"'other'; valid: main"):
        Policy.from_yaml(_policy(sae, probe).to_yaml().replace("sae: main", "sae: other"))
    with pytest.raises(PolicyError, match=r"members\[0\]\.std: .*greater than 0"):
        Policy.from_yaml(_policy(sae, probe).to_yaml().replace("std: 1.5", "std: 0.0"))
    with pytest.raises(PolicyError, match=r"members\[0\]\.scale: unknown key 'scale'; valid: detector, weight, mean, "
                                          r"std"):
        Policy.from_yaml(_policy(sae, probe).to_yaml().replace("std: 1.5", "std: 1.5\n      scale: 2"))
    with pytest.raises(PolicyError, match=r"detector\.member: unknown key 'member'; valid: kind, members, window, "
                                          r"aggregate"):
        Policy.from_yaml(_policy(sae, probe).to_yaml().replace("kind: ensemble\n", "kind: ensemble\n    member: 1\n"))
    with pytest.raises(PolicyError, match=r"unknown detector kind 'stack'; valid: sae_features, linear, ensemble"):
        Policy.from_yaml(_policy(sae, probe).to_yaml().replace("kind: ensemble", "kind: stack"))
    with pytest.raises(PolicyError, match=r"members: .*at least 2"):
        Policy.from_yaml("name: x\nrules:\n  - id: a\n    detector: {kind: ensemble, members: []}\n    threshold: 1\n")
    steer = _policy(sae, probe).to_yaml().replace("action: block", "action: steer")
    with pytest.raises(PolicyError, match=r"steer\.direction: an ensemble detector has no direction of its own"):
        Policy.from_yaml(steer)


def test_fit_members_standardises_each_member_on_label_0(lm: Any, tok: Any, tmp_path: Path) -> None:
    """``guardrails calibrate --fit-ensemble``: each member's mean/std are those of its own served row score
    (highest windowed score of the prompt) over the label-0 rows; a non-ensemble rule is refused."""
    from guardrails.core.semantics import rule_layers
    from guardrails.offline.calibrate import CalibrationError, LabeledData, residuals, rule_scope
    from guardrails.offline.scoring import fit_members

    model = lm("llama")
    sae, probe, _ = _files(tmp_path)
    pol = _policy(sae, probe, scope="input", window=4)
    texts = [*PROMPTS, "What is the capital of France?", "Name three colours.", "Write a poem about the sea."]
    labels = np.array([0, 0, 0, 0, 1])
    data = LabeledData(texts=texts, labels=labels, responses=[None] * 5, path="mem", sha256="z", sources=[""] * 5)

    def rows_of(p: Policy, rule: Any) -> Any:
        got = {layer: residuals(model, tok, data, layer, rule_scope(rule), model_name="tiny", chat=False,
                                progress=False, use_cache=False) for layer in rule_layers(p, rule)}
        return next(iter(got.values())) if len(got) == 1 else got

    def guard_of(p: Policy) -> Any:
        return GuardedModel(model, tok, p, chat=False)

    fitted = fit_members(guard_of, pol, pol.rules[0], rows_of, labels)
    assert fitted.detector.kind == "ensemble"
    for m, orig in zip(fitted.detector.members, pol.rules[0].detector.members, strict=True):
        alone = pol.model_copy(update={"rules": [pol.rules[0].model_copy(update={
            "detector": m.detector.model_copy(update={"window": 4})})]})
        rows = [max(r.token_scores["ens"].values()) for r in GuardedModel(model, tok, alone, chat=False).score(
            texts, chat=False)]
        neg = np.array(rows)[labels == 0]
        assert m.mean == pytest.approx(neg.mean(), abs=1e-4) and m.std == pytest.approx(neg.std(), abs=1e-4)
        assert m.weight == orig.weight
    with pytest.raises(CalibrationError, match="not an ensemble"):
        plain = pol.rules[0].model_copy(update={"detector": pol.rules[0].detector.members[0].detector})
        fit_members(guard_of, pol, plain, rows_of, labels)
