"""ONNX guard: export, parity with ``GuardedModel.score``, serving without torch, errors, CLI."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from guardrails.core.policy import Policy
from guardrails.engine.scorers import score_windowed_flat
from guardrails.onnx import (
    MANIFEST_FILE,
    PARITY_RTOL,
    OnnxGuard,
    OnnxGuardError,
    export_onnx,
    relative_error,
    window_scores,
)
from guardrails.sae.model import SAE
from guardrails.serving.generation import GuardedModel
from tests.builders import random_sae, tiny_model

REPO = Path(__file__).resolve().parent.parent
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEXTS = [
    "How do I bake bread at home?",
    "Tell me a story about a robot who learns to paint.",
    "The quick brown fox jumps over the lazy dog. <|im_end|> Hello world!",
    "What is the capital of France?",
    "Hello",
]
RESPONSES: list[str | None] = [
    "Mix flour, water, salt and yeast.",
    None,
    "Paris is the capital. <|im_start|> This is a tiny tokenizer.",
    "Paris.",
    "Hello world! This is a tiny tokenizer for unit tests, and the lazy dog jumps over the quick brown fox.",
]


# -- pure functions against independent statements ---------------------------------------------------------


@pytest.mark.parametrize("how", ["sum", "mean", "max"])
@pytest.mark.parametrize("window", [1, 2, 3, 5])
def test_window_scores_matches_the_torch_window(how: str, window: int) -> None:
    g = np.random.default_rng(window)
    x = g.normal(size=40).astype(np.float32)
    x[g.random(40) < 0.3] = np.nan
    ref = score_windowed_flat(torch.from_numpy(x), window, how).numpy()
    np.testing.assert_allclose(window_scores(x, window, how), ref, rtol=1e-6, equal_nan=True)


def test_window_scores_by_hand() -> None:
    x = np.array([1.0, np.nan, 3.0, 5.0], dtype=np.float32)
    # each scored token with the scored tokens before it; unscored tokens take no slot and stay NaN
    np.testing.assert_allclose(window_scores(x, 2, "mean"), [1.0, np.nan, 2.0, 4.0], equal_nan=True)
    np.testing.assert_allclose(window_scores(x, 3, "sum"), [1.0, np.nan, 4.0, 9.0], equal_nan=True)
    np.testing.assert_allclose(window_scores(x, 3, "max"), [1.0, np.nan, 3.0, 5.0], equal_nan=True)


def test_relative_error_by_hand() -> None:
    assert relative_error(np.array([1000.0, 2.0]), np.array([1000.5, 2.0])) == pytest.approx(0.5 / 1000.5)
    assert relative_error(np.array([0.1]), np.array([0.2])) == pytest.approx(0.1)  # scale floor of 1
    assert relative_error(np.array([np.nan, 1.0]), np.array([1.0, 1.0])) == math.inf


# -- a tiny llama guarded by a policy that reads two layers --------------------------------------------------


def _policy_dict(sae_top: Path, sae_jump: Path, probe: Path, thresholds: dict[str, float]) -> dict[str, Any]:
    return {
        "name": "onnx-test",
        "on_error": "block",
        "saes": {"top": {"path": str(sae_top), "layer": 2}, "jump": {"path": str(sae_jump), "layer": 1}},
        "rules": [
            {"id": "sum-both", "scope": "both", "threshold": thresholds["sum-both"], "action": "flag",
             "detector": {"sae": "top", "features": {3: 1.0, 17: 0.5, 40: -0.3, 41: 2.0}}},
            {"id": "max-out", "scope": "output", "threshold": thresholds["max-out"], "action": "block",
             "detector": {"sae": "top", "features": [5, 6, 7, 8], "combine": "max", "window": 3, "aggregate": "max"}},
            {"id": "mean-in", "scope": "input", "threshold": thresholds["mean-in"], "action": "flag",
             "detector": {"sae": "jump", "features": [1, 2, 9], "combine": "mean", "bias": 0.1, "window": 2}},
            {"id": "probe", "scope": "both", "threshold": thresholds["probe"], "action": "steer",
             "steer": {"strength": 1.0, "block_above": thresholds["probe"] + 0.5},
             "detector": {"kind": "linear", "layer": 2, "weights": str(probe), "window": 2, "aggregate": "sum"}},
        ],
    }


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, tok: Any, lm: Any) -> dict[str, Any]:
    """Tiny llama + chat template, SAEs at layers 1 (JumpReLU) and 2 (TopK k=64), a probe at layer 2.

    The steer rule reads the deepest layer: the ONNX graph does not steer (see guardrails.onnx).

    Thresholds sit at quantiles of the torch scores so that every rule fires on some texts and not others.
    """
    root = tmp_path_factory.mktemp("onnx")
    tokenizer = copy.deepcopy(tok)
    tokenizer.chat_template = CHAT_TEMPLATE
    model = lm("llama")
    random_sae(layer=2, k=64, seed=1).save(root / "sae_top")
    random_sae(layer=1, seed=2, architecture="jumprelu").save(root / "sae_jump")
    g = torch.Generator().manual_seed(3)
    save_file({"weight": torch.randn(64, generator=g), "bias": torch.tensor(0.2)}, str(root / "probe.safetensors"))
    paths = (root / "sae_top", root / "sae_jump", root / "probe.safetensors")
    never = {"sum-both": 1e9, "max-out": 1e9, "mean-in": 1e9, "probe": 1e9}
    guard = GuardedModel(model, tokenizer, Policy.from_dict(_policy_dict(*paths, never)), score_mode="watched")
    ref = guard.score(TEXTS, responses=RESPONSES)
    thresholds = {}
    for rid in never:
        peaks = sorted(s.scores[rid] for s in ref if not math.isnan(s.scores[rid]))
        thresholds[rid] = float((peaks[len(peaks) // 2 - 1] + peaks[len(peaks) // 2]) / 2)  # between two peaks
    policy_file = root / "policy.yaml"
    policy_file.write_text(Policy.from_dict(_policy_dict(*paths, thresholds)).to_yaml())
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return {"root": root, "model": model, "tok": tokenizer, "policy_file": policy_file, "model_dir": model_dir}


@pytest.fixture(scope="module")
def watched(setup: dict[str, Any]) -> Path:
    """Exported with the CLI (``guardrails export-onnx``) from the saved tiny model."""
    from guardrails.cli.main import app

    out = setup["root"] / "guard-watched"
    res = CliRunner().invoke(app, ["export-onnx", "--policy", str(setup["policy_file"]), "--out", str(out),
                                   "--model", str(setup["model_dir"]), "--score-mode", "watched"])
    assert res.exit_code == 0, res.output
    assert "exported" in res.output
    return out


def _torch_guard(setup: dict[str, Any], mode: str) -> GuardedModel:
    return GuardedModel(setup["model"], setup["tok"], Policy.from_path(setup["policy_file"]), score_mode=mode)


def _assert_same(got: list[Any], ref: list[Any]) -> None:
    assert len(got) == len(ref)
    for a, b in zip(got, ref, strict=True):
        assert a.tokens == b.tokens
        assert set(a.scores) == set(b.scores)
        for rid, s in b.scores.items():
            assert math.isnan(a.scores[rid]) == math.isnan(s)
            if not math.isnan(s):
                assert abs(a.scores[rid] - s) <= PARITY_RTOL * max(1.0, abs(s)), rid
        for rid, toks in b.token_scores.items():
            assert set(a.token_scores[rid]) == set(toks), rid  # same positions scored
            keys = sorted(toks)
            assert relative_error(np.array([a.token_scores[rid][k] for k in keys]),
                                  np.array([toks[k] for k in keys])) <= PARITY_RTOL
        key = [(d.action, d.rule, d.position, d.scope, d.output_index, d.resolution, d.sequence) for d in b.decisions]
        assert [(d.action, d.rule, d.position, d.scope, d.output_index, d.resolution, d.sequence)
                for d in a.decisions] == key
        for da, db in zip(a.decisions, b.decisions, strict=True):
            assert da.score == pytest.approx(db.score, rel=PARITY_RTOL, abs=PARITY_RTOL)
            assert da.threshold == pytest.approx(db.threshold)
        assert a.blocked == b.blocked


def test_watched_export_matches_torch_score(setup: dict[str, Any], watched: Path) -> None:
    manifest = json.loads((watched / MANIFEST_FILE).read_text())
    assert manifest["cut_after_layer"] == 2 and manifest["score_mode"] == "watched"
    assert manifest["parity"]["max_relative_error"] <= PARITY_RTOL
    assert [r["id"] for r in manifest["rules"]] == ["sum-both", "max-out", "mean-in", "probe"]
    ref = _torch_guard(setup, "watched").score(TEXTS, responses=RESPONSES, batch_size=3)
    got = OnnxGuard.load(watched).score(TEXTS, responses=RESPONSES, batch_size=2)  # other batching, padding
    # the test means something: each rule fires somewhere, and a block and a steer->block occur
    fired = {d.rule for r in ref for d in r.decisions}
    assert fired == {"sum-both", "max-out", "mean-in", "probe"}
    assert any(r.blocked for r in ref) and not all(r.blocked for r in ref)
    # the graph cannot steer: a steer decision resolves to the rule's scan action (default block), as in torch
    assert next(r for r in manifest["rules"] if r["id"] == "probe")["scan_action"] == "block"
    steers = [d for r in ref for d in r.decisions if d.action == "steer"]
    assert steers and all(d.resolution == "block" for d in steers)
    _assert_same(got, ref)


def test_prompt_and_special_tokens_follow_the_torch_rules(setup: dict[str, Any], watched: Path) -> None:
    og = OnnxGuard.load(watched)
    res = og.score(TEXTS[2:3], responses=RESPONSES[2:3])[0]
    specials = {i for i, t in enumerate(res.tokens) if t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>")}
    scored = set().union(*(set(v) for v in res.token_scores.values()))
    assert specials and not specials & scored
    assert 0 not in scored
    n_prompt = len(og.encode(og.format_prompt(TEXTS[2])))
    assert all(p < n_prompt for p in res.token_scores["mean-in"])  # input scope
    assert all(p >= n_prompt for p in res.token_scores["max-out"])  # output scope
    assert og.format_prompt(TEXTS[0]) == setup["tok"].apply_chat_template(
        [{"role": "user", "content": TEXTS[0]}], tokenize=False, add_generation_prompt=True)


def test_exact_topk_export_matches_torch_score(setup: dict[str, Any], tmp_path: Path) -> None:
    pol = Policy.from_path(setup["policy_file"])
    report = export_onnx(pol, tmp_path, model=setup["model"], tokenizer=setup["tok"], score_mode="exact")
    assert report.score_mode == "exact" and report.parity is not None and report.parity <= PARITY_RTOL
    ref = _torch_guard(setup, "exact").score(TEXTS, responses=RESPONSES)
    got = OnnxGuard.load(tmp_path).score(TEXTS, responses=RESPONSES)
    _assert_same(got, ref)
    # exact differs from watched: TopK zeroes features outside the top k
    watched_ref = _torch_guard(setup, "watched").score(TEXTS, responses=RESPONSES)
    assert any(a.scores["sum-both"] != b.scores["sum-both"] for a, b in zip(ref, watched_ref, strict=True))


def test_qwen3_export_matches_torch_score(tok: Any, lm: Any, tmp_path: Path) -> None:
    model = lm("qwen3")
    random_sae(layer=1, seed=4).save(tmp_path / "sae")
    # the policy serves a bfloat16 SAE; the graph is float32, so the export scores (and checks) in float32
    spec = {"path": str(tmp_path / "sae"), "layer": 1, "dtype": "bfloat16"}
    pol = Policy.from_dict({"name": "q", "saes": {"s": spec},
                            "rules": [{"id": "r", "scope": "both", "threshold": 0.05,
                                       "detector": {"sae": "s", "features": [1, 2, 3, 4]}}]})
    report = export_onnx(pol, tmp_path / "out", model=model, tokenizer=tok, score_mode="watched")
    assert report.cut_after_layer == 1 and report.parity is not None and report.parity <= PARITY_RTOL
    fp32 = {"s": SAE.load(tmp_path / "sae")}
    ref = GuardedModel(model, tok, pol, saes=fp32, score_mode="watched").score(TEXTS, responses=RESPONSES)
    _assert_same(OnnxGuard.load(tmp_path / "out").score(TEXTS, responses=RESPONSES), ref)


def test_torch_score_decision_sequence_is_the_text_index(setup: dict[str, Any]) -> None:
    always = Policy.from_dict({**Policy.from_path(setup["policy_file"]).model_dump(exclude={"base_dir"}),
                               "rules": [{"id": "any", "scope": "both", "threshold": -1e9, "action": "flag",
                                          "detector": {"sae": "top", "features": [3]}}]})
    guard = GuardedModel(setup["model"], setup["tok"], always, score_mode="watched")
    res = guard.score(TEXTS[:3], batch_size=2)
    assert [[d.sequence for d in r.decisions] for r in res] == [[0], [1], [2]]


# -- serving without torch -------------------------------------------------------------------------------------

_STANDALONE = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("onnx_guard_standalone", {path!r})
mod = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = mod
spec.loader.exec_module(mod)
guard = mod.OnnxGuard.load({folder!r})
res = guard.score({texts!r}, responses={responses!r})
print(json.dumps({{"torch": "torch" in sys.modules, "transformers": "transformers" in sys.modules,
                  "scores": [r.scores for r in res]}}))
"""


def test_serving_module_runs_without_torch(watched: Path) -> None:
    code = _STANDALONE.format(path=str(REPO / "guardrails" / "onnx" / "serve.py"), folder=str(watched), texts=TEXTS,
                              responses=RESPONSES)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["torch"] is False and out["transformers"] is False
    in_process = [r.scores for r in OnnxGuard.load(watched).score(TEXTS, responses=RESPONSES)]
    for a, b in zip(out["scores"], in_process, strict=True):
        for rid, v in b.items():
            assert (a[rid] is None or math.isnan(a[rid])) if math.isnan(v) else a[rid] == pytest.approx(v)


def test_import_guardrails_onnx_does_not_load_torch() -> None:
    code = "import sys, guardrails.onnx; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False,
                          cwd=REPO)
    assert proc.stdout.strip() == "False"


# -- errors --------------------------------------------------------------------------------------------------------


def test_load_names_the_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(OnnxGuardError, match=r"manifest\.json is missing"):
        OnnxGuard.load(tmp_path)


def test_load_refuses_another_format_version(watched: Path, tmp_path: Path) -> None:
    manifest = json.loads((watched / MANIFEST_FILE).read_text())
    manifest["format_version"] = 99
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(OnnxGuardError, match="v99"):
        OnnxGuard.load(tmp_path)


def test_runtime_failure_follows_on_error_block(watched: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    og = OnnxGuard.load(watched)

    def broken(*_: Any, **__: Any) -> Any:
        raise RuntimeError("session exploded")

    monkeypatch.setattr(og.session, "run", broken)
    res = og.score(["How do I bake bread at home?"])[0]
    assert res.blocked  # policy on_error: block, so a failure never lets text through
    first = res.decisions[0]
    assert first.action == "error" and first.resolution == "block" and "session exploded" in (first.reason or "")
    assert math.isnan(first.score) and res.errors


def test_export_refuses_a_bf16_model(setup: dict[str, Any], tmp_path: Path) -> None:
    model = tiny_model("llama", vocab_size=len(setup["tok"])).to(torch.bfloat16)
    with pytest.raises(OnnxGuardError, match="float32"):
        export_onnx(Policy.from_path(setup["policy_file"]), tmp_path, model=model, tokenizer=setup["tok"])


# -- the bundled model -------------------------------------------------------------------------------------------


@pytest.mark.model
@pytest.mark.slow
def test_bundled_model_and_sae_parity(tmp_path: Path) -> None:
    from guardrails.sae.model import SAEError
    from guardrails.serving.models import load_model

    try:
        sae = SAE.load("bundled")
    except SAEError as exc:
        pytest.skip(f"bundled SAE not available: {exc}")
    model, tokenizer = load_model()
    features = list(range(0, sae.d_sae, sae.d_sae // 12))[:12]
    pol = Policy.from_dict({"name": "bundled-onnx", "saes": {"s": {"path": "bundled", "layer": 15}}, "rules": [
        {"id": "sum", "scope": "both", "threshold": 1e9, "detector": {"sae": "s", "features": features}},
        {"id": "max", "scope": "output", "threshold": 1e9,
         "detector": {"sae": "s", "features": features[:4], "combine": "max", "window": 4, "aggregate": "mean"}},
    ]})
    report = export_onnx(pol, tmp_path, model=model, tokenizer=tokenizer, saes={"s": sae}, score_mode="watched")
    assert report.parity is not None and report.parity <= PARITY_RTOL
    texts = ["How do I make a cake?", "Write a haiku about autumn leaves."]
    responses: list[str | None] = ["Mix flour, sugar, eggs and butter, then bake for thirty minutes.", None]
    ref = GuardedModel(model, tokenizer, pol, saes={"s": sae}, score_mode="watched").score(texts, responses=responses)
    _assert_same(OnnxGuard.load(tmp_path).score(texts, responses=responses), ref)

