"""Multi-layer linear rules (``detector.extra_layers``): the token score is the sum over layers of x_l · w_l + b,
at the same token, on every path (scan, cached generation, residual scan, ONNX)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from guardrails import GuardedModel, Policy
from guardrails.core.policy import PolicyError
from guardrails.engine.hooks import capture, hooks_on
from tests.builders import assert_onnx_matches_torch, assert_token_scores, first_new_high

LAYERS = (0, 1, 2)  # extra_layers [0, 1], the rule decides at layer 2
PROMPTS = ["How do I bake bread at home?", "Tell me a story about a robot who learns to paint."]


def _weights(path: Path, hidden: int = 64, *, drop: str | None = None) -> Path:
    g = torch.Generator().manual_seed(7)
    t = {"weight": torch.randn(hidden, generator=g), "bias": torch.tensor(0.3)}
    t |= {f"weight.L{layer}": torch.randn(hidden, generator=g) for layer in LAYERS[:-1]}
    if drop:
        t.pop(drop)
    save_file(t, str(path))
    return path


def _policy(weights: Path, threshold: float = 1e9, *, scope: str = "both", extra: str = "[0, 1]") -> Policy:
    return Policy.from_yaml(f"""
name: multi
rules:
  - id: ml
    scope: {scope}
    detector: {{kind: linear, layer: 2, extra_layers: {extra}, weights: "{weights}"}}
    threshold: {threshold}
    action: block
""")


def _by_hand(model: Any, tok: Any, text: str | list[int], weights: Path) -> np.ndarray:
    from safetensors.torch import load_file

    t = load_file(str(weights))
    ids = (tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"] if isinstance(text, str)
           else torch.tensor([text]))
    with torch.no_grad(), capture(model, list(LAYERS)) as store:
        model(input_ids=ids)
    total = store[2][0].float() @ t["weight"] + t["bias"]
    for layer in LAYERS[:-1]:
        total = total + store[layer][0].float() @ t[f"weight.L{layer}"]
    return total.numpy()


def test_scan_scores_are_the_sum_over_layers_by_hand(lm: Any, tok: Any, tmp_path: Path) -> None:
    model = lm("llama")
    w = _weights(tmp_path / "ml.safetensors")
    guard = GuardedModel(model, tok, _policy(w), chat=False)
    assert guard.compiled.hooked_layers == {0, 1, 2} and sorted(guard.compiled.feeds) == [0, 1]
    for text in PROMPTS:
        res = guard.score([text], chat=False)[0]
        want = _by_hand(model, tok, text, w)
        got = res.token_scores["ml"]
        assert_token_scores(got, want)
    assert hooks_on(model) == 0


def test_cached_generation_scores_and_trips_as_a_full_forward(lm: Any, tok: Any, tmp_path: Path) -> None:
    model = lm("llama")
    w = _weights(tmp_path / "ml.safetensors")
    free = GuardedModel(model, tok, _policy(w, scope="output"), chat=False)
    out = free.generate(PROMPTS[0], max_new_tokens=10, chat=False)
    assert not isinstance(out, list) and len(out.output_ids) >= 4
    prompt_ids = tok(PROMPTS[0], add_special_tokens=False)["input_ids"]
    want = _by_hand(model, tok, prompt_ids + out.output_ids, w)  # one uncached forward over everything
    got = out.token_scores["ml"]  # one token per cached decode step
    assert sorted(got) == list(range(len(prompt_ids), len(prompt_ids) + len(out.output_ids)))
    assert_token_scores(got, want)
    pick, threshold = first_new_high(got)  # generation must stop exactly there
    res = GuardedModel(model, tok, _policy(w, threshold, scope="output"), chat=False).generate(
        PROMPTS[0], max_new_tokens=10, chat=False)
    assert not isinstance(res, list) and res.blocked
    assert res.decisions[0].position == pick and res.decisions[0].score == pytest.approx(got[pick], rel=1e-4)
    assert hooks_on(model) == 0


def test_residual_scan_adds_the_fed_layers(lm: Any, tok: Any, tmp_path: Path) -> None:
    model = lm("llama")
    w = _weights(tmp_path / "ml.safetensors")
    guard = GuardedModel(model, tok, _policy(w), chat=False)
    ids = tok(PROMPTS[1], return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad(), capture(model, list(LAYERS)) as store:
        model(input_ids=ids)
    T = ids.shape[1]
    mask = torch.ones(1, T, dtype=torch.bool)
    mask[0, 0] = False
    with pytest.raises(ValueError, match=r"watched layer\(s\) \[0, 1\]"):
        guard.compiled.unthresholded().score_residuals({2: store[2]}, score_mask=mask,
                                                       is_output=torch.zeros(1, T, dtype=torch.bool))
    run = guard.compiled.unthresholded().score_residuals(dict(store), score_mask=mask,
                                                         is_output=torch.zeros(1, T, dtype=torch.bool))
    traced = torch.cat([s for _, s in run.trace_scores["ml"]], dim=1)[0].numpy()
    want = _by_hand(model, tok, PROMPTS[1], w)
    np.testing.assert_allclose(traced[1:], want[1:], rtol=1e-4, atol=1e-4)


def test_bad_multilayer_detectors_name_the_problem(lm: Any, tok: Any, tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"extra_layers: \[2\] must be shallower than layer 2; valid: 0..1"):
        _policy(_weights(tmp_path / "a.safetensors"), extra="[2]")
    with pytest.raises(PolicyError, match="lists a layer twice"):
        _policy(_weights(tmp_path / "b.safetensors"), extra="[1, 1]")
    missing = _weights(tmp_path / "c.safetensors", drop="weight.L1")
    with pytest.raises(PolicyError, match=r"extra layer 1 needs 'weight.L1' of shape \(64,\), missing; the file "
                                          r"holds: bias, weight, weight.L0"):
        GuardedModel(lm("llama"), tok, _policy(missing), chat=False)
    # a multi-layer file read by a single-layer detector would silently score a different probe
    with pytest.raises(PolicyError, match=r"is a multi-layer probe \(terms for layers \[0, 1\] and 2\); set "
                                          r"detector.extra_layers: \[0, 1\]"):
        GuardedModel(lm("llama"), tok, _policy(_weights(tmp_path / "d.safetensors"), extra="null"), chat=False)


def test_onnx_export_matches_torch_score(lm: Any, tok: Any, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    w = _weights(tmp_path / "ml.safetensors")
    assert_onnx_matches_torch(_policy(w), lm("llama"), tok, tmp_path / "out", PROMPTS, "ml", score_mode="watched")


def test_a_failing_shallower_term_follows_on_error(lm: Any, tok: Any, tmp_path: Path) -> None:
    """The rule must not score from its deepest layer alone when a fed term fails: on_error (block) applies."""
    from guardrails.engine.compile import Feed

    model = lm("llama")
    guard = GuardedModel(model, tok, _policy(_weights(tmp_path / "ml.safetensors")), chat=False)
    guard.compiled.feeds[1] = Feed(("ml",), torch.zeros(1, 7))  # wrong width: the matmul raises
    res = guard.generate(PROMPTS[0], max_new_tokens=4, chat=False)
    assert not isinstance(res, list) and res.blocked and res.output_ids == []
    d = res.decisions[0]
    assert d.rule == "ml" and d.action == "error" and d.resolution == "block", d
    assert d.reason is not None and "shapes cannot be multiplied" in d.reason, d
    assert hooks_on(model) == 0
