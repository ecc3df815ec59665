"""GuardedModel on tiny models: Qwen-Scope scoring by formula, generation equal to the unguarded model,
left-padded batches, cached vs uncached steering, blocks that leak nothing, hooks that always come off."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import pytest
import torch

from guardrails import GuardedModel, Policy, SAEError
from guardrails.engine.hooks import hooks_on
from tests.builders import (
    qwen_scope_encode,
    qwen_scope_tensors,
    tiny_qwen3_5_multimodal,
    watch_policy,
    write_qwen_scope,
)

LAYER, D_SAE, K = 1, 128, 32
FEATURES = list(range(0, D_SAE, 2))
PROMPTS = ["How do I bake bread?", "Tell me a story", "What is the capital"]
REFUSAL = "Sorry, no."
NEW = 8


@pytest.fixture(scope="module")
def sae_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    t = qwen_scope_tensors(64, D_SAE, seed=11)
    return write_qwen_scope(tmp_path_factory.mktemp("qwen_scope"), LAYER, t), t


def _policy(path: Path, *, threshold: float = 1e9, action: str = "block", scope: str = "output",
            features: list[int] | None = None, steer: str = "", k: int = K) -> Policy:
    return watch_policy(path, threshold, layer=LAYER, k=k, features=features or FEATURES, scope=scope,
                        action=action, refusal=REFUSAL, rule_extra=steer)


def _greedy(model: Any, tok: Any, prompt: str, n: int = NEW) -> list[int]:
    """The unguarded model's greedy continuation, without the eos token."""
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
    return out[: out.index(tok.eos_token_id)] if tok.eos_token_id in out else out


def _trip_at(guard: GuardedModel, prompt: str) -> tuple[float, int]:
    """A threshold that first trips at the highest-scoring output token, and that token's output index."""
    r = guard.generate(prompt, max_new_tokens=NEW, chat=False)
    scores = [r.token_scores["watch"][p] for p in sorted(r.token_scores["watch"])]
    j = max(range(len(scores)), key=lambda i: (scores[i], -i))
    # halfway between the best score and the best earlier one: robust to last-bit differences between runs
    below = max(scores[:j], default=scores[j] - 2e-3)
    assert scores[j] - below > 1e-4, "scores too close to pick a tripping token"
    return (scores[j] + below) / 2, j


# -- scoring: the Qwen-Scope formula on hidden_states[layer + 1] --------------------------------------------


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_5", "qwen3_5_multimodal"])
def test_score_equals_qwen_scope_formula(lm: Any, tok: Any, sae_file: Any, arch: str) -> None:
    path, t = sae_file
    model = tiny_qwen3_5_multimodal() if arch == "qwen3_5_multimodal" else lm(arch)
    texts = ["Hello world! <|im_start|> tell me a story", "How do I bake bread at home?"]
    with torch.no_grad():
        rows = [tok(x, return_tensors="pt", add_special_tokens=False).input_ids for x in texts]
        hidden = [model(input_ids=ids, output_hidden_states=True).hidden_states[LAYER + 1][0] for ids in rows]
    weights = torch.linspace(0.5, 2.0, len(FEATURES))
    feats = ", ".join(f"{{id: {f}, weight: {float(w)}}}" for f, w in zip(FEATURES, weights, strict=True))
    policy = Policy.from_yaml(f"""
name: s
saes: {{main: {{path: "{path}", layer: {LAYER}, k: {K}}}}}
rules:
  - id: watch
    scope: input
    detector: {{sae: main, features: [{feats}], combine: sum}}
    threshold: 1.0e9
""")
    guard = GuardedModel(model, tok, policy)
    results = guard.score(texts, chat=False)  # one left-padded batch
    special = set(tok.all_special_ids)
    for ids, h, res in zip(rows, hidden, results, strict=True):
        acts = qwen_scope_encode(h, t, K)[:, FEATURES]
        expected = {p: float(acts[p] @ weights) for p in range(ids.shape[1])
                    if p > 0 and int(ids[0, p]) not in special}
        got = res.token_scores["watch"]
        assert sorted(got) == sorted(expected)  # position 0 and special tokens are not scored
        for p, v in expected.items():
            assert got[p] == pytest.approx(v, rel=1e-4, abs=1e-4), p
        assert res.scores["watch"] == pytest.approx(max(expected.values()), rel=1e-4, abs=1e-4)
        assert any(v != 0 for v in expected.values())
    special_pos = rows[0][0].tolist().index(tok.convert_tokens_to_ids("<|im_start|>"))
    assert special_pos > 0 and special_pos not in results[0].token_scores["watch"]
    assert hooks_on(model) == 0


def test_watched_mode_scores_relu_of_watched_rows(lm: Any, tok: Any, sae_file: Any) -> None:
    path, t = sae_file
    model = lm("qwen3")
    text = "Tell me a story about a robot."
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        h = model(input_ids=ids, output_hidden_states=True).hidden_states[LAYER + 1][0]
    pre = h @ t["W_enc"][FEATURES].T + t["b_enc"][FEATURES]
    expected = torch.relu(pre).sum(-1)
    got = GuardedModel(model, tok, _policy(path, scope="input"), score_mode="watched").score(text, chat=False)[0]
    for p in range(1, ids.shape[1]):
        assert got.token_scores["watch"][p] == pytest.approx(float(expected[p]), rel=1e-4, abs=1e-4)


def test_sae_width_mismatch_is_refused(lm: Any, tok: Any, tmp_path: Path) -> None:
    path = write_qwen_scope(tmp_path, LAYER, qwen_scope_tensors(48, D_SAE))
    with pytest.raises(SAEError, match=r"d_model=48.*hidden size is 64"):
        GuardedModel(lm("qwen3"), tok, _policy(path))


# -- generation ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen3", "qwen3_5"])
def test_no_rule_fires_output_equals_greedy(lm: Any, tok: Any, sae_file: Any, arch: str) -> None:
    model = lm(arch)
    guard = GuardedModel(model, tok, _policy(sae_file[0]))
    outputs = []
    for prompt in PROMPTS:
        ref = _greedy(model, tok, prompt)
        r = guard.generate(prompt, max_new_tokens=NEW, chat=False)
        assert not r.blocked and not r.steered and r.decisions == []
        assert r.output_ids == ref
        assert r.text == tok.decode(ref, skip_special_tokens=True)
        outputs.append(ref)
    assert len({tuple(o) for o in outputs}) == len(PROMPTS)  # the tiny model's outputs vary
    assert any(len(set(o)) > 2 for o in outputs)
    assert hooks_on(model) == 0


@pytest.mark.parametrize("use_cache", [True, False])
def test_input_only_policy_scores_no_generated_token(lm: Any, tok: Any, sae_file: Any, monkeypatch: Any,
                                                     use_cache: bool) -> None:
    """No rule reads generated tokens: decode steps run unhooked (one encode, the prefill's) and the last
    scoring-only forward is skipped; the output is still the unguarded one, and an output rule still scores
    every generated token. (An input rule that steers keeps its hooks: test_steering_cached_equals_uncached.)"""
    from guardrails.engine.scorers import LayerScorer

    model = lm("qwen3")
    calls: list[int] = []
    real = LayerScorer.feature_matrix

    def counted(self: Any, x: torch.Tensor) -> torch.Tensor:
        calls.append(int(x.reshape(-1, x.shape[-1]).shape[0]))
        return real(self, x)

    monkeypatch.setattr(LayerScorer, "feature_matrix", counted)
    from guardrails.engine.run import GuardRun

    hooked: list[int] = []
    on_layer = GuardRun.on_layer
    monkeypatch.setattr(GuardRun, "on_layer", lambda self, layer, h: hooked.append(layer) or on_layer(self, layer, h))
    forwards: list[int] = []
    monkeypatch.setattr(model, "forward", _counting(model.forward, forwards))
    prompt = PROMPTS[0]
    ref = _greedy(model, tok, prompt)
    n_prompt = len(tok(prompt, add_special_tokens=False).input_ids)
    n_forwards = {}
    for scope, n_encodes in (("input", 1), ("output", len(ref) + 1)):
        calls.clear()
        forwards.clear()
        hooked.clear()
        guard = GuardedModel(model, tok, _policy(sae_file[0], scope=scope))
        assert guard.compiled.scores_output == (scope == "output")
        r = guard.generate(prompt, max_new_tokens=NEW, chat=False, use_cache=use_cache)
        assert r.output_ids == ref and not r.decisions
        assert len(calls) == n_encodes, (scope, calls)
        assert calls[0] == n_prompt - 1  # the prefill: every prompt token but the attention sink
        assert len(hooked) == n_encodes  # an input-only policy that does not steer hooks the prefill only
        n_forwards[scope] = len(forwards)
    # at the token limit an output rule needs one more (cut) forward to score the last token; after an eos, no
    # rule does
    assert n_forwards["input"] == n_forwards["output"] - (len(ref) == NEW)
    # an input rule that steers: the prompt trips it, and every decode step stays hooked to steer
    hooked.clear()
    forwards.clear()
    steer = "    steer: {method: subtract, strength: 40}\n"
    guard = GuardedModel(model, tok, _policy(sae_file[0], threshold=-1e9, scope="input", action="steer", steer=steer))
    r = guard.generate(prompt, max_new_tokens=NEW, chat=False, use_cache=use_cache)
    assert guard.compiled.hooks_decode and r.steered and r.output_ids != ref
    assert len(hooked) == len(forwards) > 1  # one watched layer: every forward ran its hook
    assert hooks_on(model) == 0


def _counting(fn: Any, log: list[int]) -> Any:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        log.append(1)
        return fn(*args, **kwargs)

    return wrapped


def test_uncached_qwen3_5_equals_greedy(lm: Any, tok: Any, sae_file: Any) -> None:
    model = lm("qwen3_5")
    guard = GuardedModel(model, tok, _policy(sae_file[0]))
    prompt = PROMPTS[1]
    got = guard.generate(prompt, max_new_tokens=5, chat=False, use_cache=False).output_ids
    assert got == _greedy(model, tok, prompt, n=5)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_left_padded_batch_rows_equal_single_runs(lm: Any, tok: Any, sae_file: Any, arch: str) -> None:
    model = lm(arch)
    guard = GuardedModel(model, tok, _policy(sae_file[0]))
    lengths = {len(tok(p, add_special_tokens=False).input_ids) for p in PROMPTS}
    assert len(lengths) > 1  # the batch really is padded
    batch = guard.generate(PROMPTS, max_new_tokens=NEW, chat=False)
    assert isinstance(batch, list)
    for prompt, row in zip(PROMPTS, batch, strict=True):
        single = guard.generate(prompt, max_new_tokens=NEW, chat=False)
        assert row.output_ids == single.output_ids
        assert row.token_scores["watch"].keys() == single.token_scores["watch"].keys()
        for p, v in single.token_scores["watch"].items():
            assert row.token_scores["watch"][p] == pytest.approx(v, rel=1e-3, abs=1e-3)


def test_steering_cached_equals_uncached(lm: Any, tok: Any, sae_file: Any) -> None:
    model = lm("qwen3")
    prompt = PROMPTS[1]
    threshold, j = _trip_at(GuardedModel(model, tok, _policy(sae_file[0])), prompt)
    assert 0 < j < NEW - 1, "pick a prompt whose highest score is mid-output"
    steer = "    steer: {method: subtract, strength: 40}\n"
    guard = GuardedModel(model, tok, _policy(sae_file[0], threshold=threshold, action="steer", steer=steer))
    cached = guard.generate(prompt, max_new_tokens=NEW, chat=False)
    uncached = guard.generate(prompt, max_new_tokens=NEW, chat=False, use_cache=False)
    ref = _greedy(model, tok, prompt)
    for r in (cached, uncached):
        assert r.steered and not r.blocked
        assert [(d.action, d.position, d.output_index) for d in r.decisions] == [
            ("steer", r.prompt_length + j, j)
        ]
        # tokens up to and including the tripping one are untouched; steering changes what follows
        assert r.output_ids[: j + 1] == ref[: j + 1]
        assert r.output_ids[j + 1 :] != ref[j + 1 :]
    assert cached.output_ids == uncached.output_ids
    assert cached.token_scores["watch"].keys() == uncached.token_scores["watch"].keys()
    for p, v in cached.token_scores["watch"].items():
        assert uncached.token_scores["watch"][p] == pytest.approx(v, rel=1e-3, abs=1e-3)
    assert hooks_on(model) == 0


@pytest.mark.parametrize("prompt", PROMPTS)
def test_block_releases_nothing_at_or_after_the_trip(lm: Any, tok: Any, sae_file: Any, prompt: str) -> None:
    model = lm("qwen3")
    threshold, j = _trip_at(GuardedModel(model, tok, _policy(sae_file[0])), prompt)
    guard = GuardedModel(model, tok, _policy(sae_file[0], threshold=threshold))
    ref = _greedy(model, tok, prompt)
    r = guard.generate(prompt, max_new_tokens=NEW, chat=False)
    assert r.blocked and r.text == REFUSAL
    d = r.block_decision
    assert d is not None and d.rule == "watch" and d.score >= threshold and d.threshold == threshold
    assert d.position == r.prompt_length + j
    assert r.prompt_length + len(r.output_ids) <= d.position  # nothing released at or after the trip
    assert r.output_ids == ref[:j]
    assert r.released_text == tok.decode(ref[:j], skip_special_tokens=True)

    stream = guard.stream(prompt, max_new_tokens=NEW, chat=False)
    pieces = list(stream)
    assert stream.result is not None and stream.result.blocked
    assert pieces[-1].strip() == REFUSAL
    shown = "".join(pieces[:-1])
    allowed = tok.decode(ref[:j], skip_special_tokens=True)
    assert allowed.startswith(shown)  # only text of tokens before the tripping one
    assert stream.result.output_ids == ref[:j]
    assert hooks_on(model) == 0


# -- hooks always come off -----------------------------------------------------------------------------------


def test_hooks_removed_after_abandoned_stream(lm: Any, tok: Any, sae_file: Any) -> None:
    model = lm("qwen3")
    guard = GuardedModel(model, tok, _policy(sae_file[0]))
    stream = guard.stream(PROMPTS[1], max_new_tokens=NEW, chat=False)
    got = None
    for piece in stream:
        got = piece
        break
    assert got is not None
    assert hooks_on(model) == 0  # hooks exist only during each forward step, not while suspended
    del stream
    gc.collect()
    assert hooks_on(model) == 0

    it = iter(guard.stream(PROMPTS[1], max_new_tokens=NEW, chat=False))
    next(it)
    it.close()  # type: ignore[attr-defined]
    assert hooks_on(model) == 0
    assert guard.generate(PROMPTS[0], max_new_tokens=NEW, chat=False).output_ids == _greedy(model, tok, PROMPTS[0])


class _Boom(RuntimeError):
    pass


def test_hooks_removed_after_exception(lm: Any, tok: Any, sae_file: Any) -> None:
    model = lm("qwen3")
    guard = GuardedModel(model, tok, _policy(sae_file[0]))
    ids = tok(PROMPTS[0], return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        before = model(input_ids=ids).logits
    calls = {"n": 0}

    def fail_on_third(*_: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise _Boom("forward failed mid-generation")

    handle = model.lm_head.register_forward_hook(fail_on_third)
    try:
        with pytest.raises(_Boom):
            guard.generate(PROMPTS[0], max_new_tokens=NEW, chat=False)
        assert hooks_on(model) == 0
        calls["n"] = 0
        s = guard.stream(PROMPTS[0], max_new_tokens=NEW, chat=False)
        shown = "".join(s)  # a stream has shown text already: the failure follows on_error (block) instead
        assert s.result is not None and s.result.blocked and shown.endswith(REFUSAL)
        assert any(d.action == "error" and "_Boom" in (d.reason or "") for d in s.result.decisions)
        assert hooks_on(model) == 0
    finally:
        handle.remove()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)  # the model behaves as if never wrapped
    assert guard.generate(PROMPTS[0], max_new_tokens=NEW, chat=False).output_ids == _greedy(model, tok, PROMPTS[0])


def test_suspended_stream_does_not_steer_other_calls(lm: Any, tok: Any, sae_file: Any) -> None:
    model = lm("qwen3")
    expected = _greedy(model, tok, PROMPTS[2])
    steer = "    steer: {method: subtract, strength: 40}\n"
    steering = GuardedModel(model, tok, _policy(sae_file[0], threshold=-1e9, action="steer", steer=steer))
    # positive control: the same stream run to the end did steer, and steering changed PROMPTS[2]'s output
    done = steering.generate(PROMPTS[2], max_new_tokens=NEW, chat=False)
    assert done.steered and done.output_ids != expected
    it = iter(steering.stream(PROMPTS[1], max_new_tokens=NEW, chat=False))
    next(it)  # the stream has tripped its steer rule and is now suspended
    try:
        assert _greedy(model, tok, PROMPTS[2]) == expected
    finally:
        it.close()  # type: ignore[attr-defined]
    assert hooks_on(model) == 0


def test_guard_checks_policy_against_model_and_sae(lm: Any, tok: Any, sae_file: Any) -> None:
    from guardrails import PolicyError

    model = lm("qwen3")
    with pytest.raises(PolicyError, match=rf"rules\[0\]\.detector\.features\[1\]\.id: {D_SAE} out of range; "
                                          rf"valid: 0\.\.{D_SAE - 1}"):
        GuardedModel(model, tok, _policy(sae_file[0], features=[0, D_SAE]))
    deep = Policy.from_yaml(_policy(sae_file[0]).to_yaml().replace(f"layer: {LAYER}", "layer: 9"))
    with pytest.raises(PolicyError, match=r"saes\.main\.layer: 9 out of range; valid: 0\.\.3"):
        GuardedModel(model, tok, deep)
    assert hooks_on(model) == 0
