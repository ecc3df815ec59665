"""Integration tests on the bundled model and SAE (marked ``model``; run in CI)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from guardrails import SAE
from guardrails.engine.hooks import capture, hooks_on

pytestmark = pytest.mark.model

TEXTS = [
    "Return the number of elements in the container. Raises ValueError if the container is closed.",
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
    "Write a short story about a robot who learns to paint sunsets over the ocean.",
    "Compute the mean of the values along the given axis, ignoring NaNs where present.",
]


@pytest.fixture(scope="module")
def bundled() -> tuple[Any, Any]:
    from guardrails.serving.models import load_model

    return load_model()


def test_bundled_sae_reads_layer_15(bundled: tuple[Any, Any]) -> None:
    model, tok = bundled
    sae = SAE.load("bundled")
    assert (sae.d_model, sae.d_sae, sae.k, sae.cfg.layer) == (576, 9216, 50, 15)
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    with torch.inference_mode(), capture(model, [14, 15, 16]) as store:
        model(**enc)
    keep = enc["attention_mask"].bool().clone()
    keep[:, 0] = False  # attention sink
    fvu = {layer: sae.fvu(store[layer][keep]) for layer in (14, 15, 16)}
    assert fvu[15] < fvu[14] and fvu[15] < fvu[16], fvu  # the hook index is right
    assert fvu[15] < 0.35, fvu  # the recorded held-out FVU is 0.120 (TRAINING.json); these few texts are noisier
    assert hooks_on(model) == 0


def test_guarded_generation_equals_plain_generation_when_nothing_fires(bundled: tuple[Any, Any]) -> None:
    from guardrails import GuardedModel, Policy

    model, tok = bundled
    policy = Policy.from_yaml("""
name: never
saes: {l15: {path: bundled, layer: 15}}
rules:
  - id: r
    scope: both
    detector: {sae: l15, features: [1, 2, 3]}
    threshold: 1.0e9
""")
    guard = GuardedModel(model, tok, policy)
    prompts = ["What is the capital of France?", "Name three colors."]
    results = guard.generate(prompts, max_new_tokens=12)
    assert isinstance(results, list)
    for prompt, result in zip(prompts, results, strict=True):
        enc = tok(guard.format_prompt(prompt), return_tensors="pt", add_special_tokens=False)
        ref = model.generate(**enc, max_new_tokens=12, do_sample=False)[0, enc["input_ids"].shape[1] :].tolist()
        ref = [t for t in ref if t != tok.eos_token_id]
        assert result.output_ids == ref
        assert not result.decisions and not result.blocked
    assert hooks_on(model) == 0


def test_features_cli_shows_top_features(bundled: tuple[Any, Any]) -> None:
    from guardrails.cli.main import app
    from guardrails.serving.inspect import top_features_per_token

    out = CliRunner().invoke(app, ["features", "--json", "--top", "3", "The cat sat on the mat."])
    assert out.exit_code == 0, out.output
    rows = json.loads(out.stdout)
    model, tok = bundled
    direct = top_features_per_token("The cat sat on the mat.", model=model, tokenizer=tok, top=3)
    assert [r["features"] for r in rows] == [[list(p) for p in r["features"]] for r in direct]
    assert all(len(r["features"]) == 3 for r in rows[1:])  # TopK: every token has k >= 3 active


def test_shipped_french_directions_steer_the_answer_language(bundled: tuple[Any, Any]) -> None:
    """The shipped French directions (layers 6/9/12, 0.08x norm, prompt included) turn English answers French,
    through the API and through an ``always: true`` policy alike (same tokens)."""
    from guardrails import GuardedModel, Policy, Steer
    from guardrails._data import data_root
    from guardrails.offline.steering_eval import generate, is_french

    model, tok = bundled
    d = data_root() / "calibration" / "directions"
    prompts = ["Why is the sky blue?", "Describe your favourite season."]
    plain = generate(model, tok, prompts, max_new_tokens=20)
    french = [Steer(L, direction=d / f"french-l{L}.safetensors", strength=0.08) for L in (6, 9, 12)]
    steered = generate(model, tok, prompts, max_new_tokens=20, steers=french, positions="all")
    assert not any(map(is_french, plain)) and all(map(is_french, steered)), (plain, steered)
    entries = "\n".join(f"""  - id: fr{L}
    always: true
    steer: {{direction: {d}/french-l{L}.safetensors, method: add, strength: 0.08, relative_to: norm,
            layers: [{L}], positions: all}}""" for L in (6, 9, 12))
    policy = Policy.from_yaml(f"""
name: french
saes: {{l15: {{path: bundled, layer: 15}}}}
rules:
  - id: never
    detector: {{sae: l15, features: [1]}}
    threshold: 1.0e9
steering:
{entries}
""")
    via_policy = GuardedModel(model, tok, policy).generate(prompts, max_new_tokens=20)
    assert isinstance(via_policy, list)
    assert [r.text for r in via_policy] == steered
    assert hooks_on(model) == 0
