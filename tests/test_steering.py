"""Steering on tiny models, checked against residuals computed by hand.

The public API (``guardrails.steering``): h + s·u, h + s·||h||·u and the clamp, by formula; positions
(prompt / generated / all) and rows; cached decode steps equal to uncached ones; hooks that come off.
Policies: ``steering:`` entries (always, when a gate rule fires) and new-style steer rules give the same
tokens as the API applied by hand, only to the flagged rows of a batch; the schema's errors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import guardrails
from guardrails import GenerationResult, GuardedModel, Policy, PolicyError, Steer
from guardrails.engine.hooks import capture, hooks_on
from guardrails.engine.steering import SteeringError, SteerVector, apply_steer
from tests.builders import HIDDEN, random_sae, tiny_lm, tiny_tokenizer

LAYER = 1
PROMPTS = ["How do I bake bread?", "Tell me a story about a fox"]
NEW = 6


@pytest.fixture(scope="module")
def tok() -> Any:
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def lm(tok: Any) -> Any:
    return tiny_lm("llama", tok)


def _direction(seed: int = 3) -> torch.Tensor:
    return torch.randn(HIDDEN, generator=torch.Generator().manual_seed(seed))


def _batch(tok: Any, prompts: list[str]) -> dict[str, torch.Tensor]:
    tok.padding_side = "left"
    return dict(tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False))


def _residual(lm: Any, enc: dict[str, torch.Tensor], layers: list[int]) -> dict[int, torch.Tensor]:
    with torch.no_grad(), capture(lm, layers) as store:
        lm(**enc)
    return {k: v.clone() for k, v in store.items()}


def _generate(lm: Any, tok: Any, enc: dict[str, torch.Tensor], use_cache: bool = True) -> list[list[int]]:
    with torch.no_grad():
        out = lm.generate(**enc, max_new_tokens=NEW, do_sample=False, use_cache=use_cache,
                          pad_token_id=tok.pad_token_id, eos_token_id=None)
    return out[:, enc["input_ids"].shape[1]:].tolist()


# -- the formula ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("relative_to", ["absolute", "norm"])
def test_add_matches_hand_computed_residual(lm: Any, tok: Any, relative_to: str) -> None:
    enc = _batch(tok, PROMPTS)
    d = _direction()
    base = _residual(lm, enc, [LAYER])[LAYER]
    s = 0.7 if relative_to == "norm" else 3.0
    with guardrails.steering(lm, [Steer(LAYER, direction=d, strength=s, relative_to=relative_to)]):  # type: ignore[arg-type]
        got = _residual(lm, enc, [LAYER])[LAYER]  # capture hook runs after the steering hook
    u = d / d.norm()
    scale = base.norm(dim=-1, keepdim=True) if relative_to == "norm" else torch.ones_like(base[..., :1])
    want = base + s * scale * u
    mask = enc["attention_mask"].bool()
    first = mask.float().argmax(1)  # position 0 of each row: never steered
    steered = mask.clone()
    steered[torch.arange(len(PROMPTS)), first] = False
    torch.testing.assert_close(got[steered], want[steered], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[~steered], base[~steered])


def test_negative_strength_steers_away_and_clamp_caps_projection() -> None:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 5, HIDDEN, generator=g) * 4
    u = _direction() / _direction().norm()
    away = apply_steer(h, SteerVector(u, -2.0, "absolute", "add"))
    torch.testing.assert_close(away @ u, h @ u - 2.0)
    cap = 0.5
    clamped = apply_steer(h, SteerVector(u, cap, "absolute", "clamp"))
    proj = h @ u
    torch.testing.assert_close(clamped @ u, torch.minimum(proj, torch.tensor(cap)), rtol=1e-5, atol=1e-5)
    below = proj <= cap  # tokens under the cap are untouched, byte for byte
    assert torch.equal(clamped[below], h[below])


# -- positions, rows, cache, hooks ------------------------------------------------------------------------------
def test_generated_positions_start_at_last_prompt_token(lm: Any, tok: Any) -> None:
    enc = _batch(tok, PROMPTS)
    d = _direction()
    base = _residual(lm, enc, [LAYER])[LAYER]
    P = enc["input_ids"].shape[1]
    for positions, cols in (("generated", [P - 1]), ("prompt", list(range(P)))):
        with guardrails.steering(lm, Steer(LAYER, direction=d, strength=2.0, relative_to="absolute"),
                                 positions=positions):  # type: ignore[arg-type]
            got = _residual(lm, enc, [LAYER])[LAYER]
        changed = (got - base).abs().amax(-1) > 1e-6
        real = enc["attention_mask"].bool()
        want = torch.zeros_like(changed)
        want[:, cols] = True
        want &= real
        want[torch.arange(len(PROMPTS)), real.float().argmax(1)] = False
        assert torch.equal(changed, want), positions


@pytest.mark.parametrize("positions", ["generated", "all"])
def test_cached_decode_equals_uncached_and_changes_output(lm: Any, tok: Any, positions: str) -> None:
    enc = _batch(tok, PROMPTS)
    plain = _generate(lm, tok, enc)
    steer = [Steer([0, LAYER], direction=_direction(), strength=1.5)]
    with guardrails.steering(lm, steer, positions=positions):  # type: ignore[arg-type]
        cached = _generate(lm, tok, enc, use_cache=True)
        uncached = _generate(lm, tok, enc, use_cache=False)
    assert cached == uncached  # every cached step is steered exactly as the full recompute
    assert cached != plain
    assert _generate(lm, tok, enc) == plain  # hooks came off


def test_rows_limit_steering_to_those_rows(lm: Any, tok: Any) -> None:
    enc = _batch(tok, PROMPTS)
    plain = _generate(lm, tok, enc)
    with guardrails.steering(lm, [Steer(LAYER, direction=_direction(), strength=1.5)], rows=[1]):
        out = _generate(lm, tok, enc)
    assert out[0] == plain[0] and out[1] != plain[1]


def test_handle_is_idempotent_and_context_manager(lm: Any, tok: Any) -> None:
    before = hooks_on(lm)
    h = guardrails.steering(lm, [Steer(LAYER, direction=_direction(), strength=1.0)])
    assert hooks_on(lm) == before + 1 and h.active
    h.remove()
    h.remove()
    assert hooks_on(lm) == before and not h.active
    with pytest.raises(RuntimeError), guardrails.steering(lm, [Steer(LAYER, direction=_direction(), strength=1.0)]):
        raise RuntimeError("boom")
    assert hooks_on(lm) == before


def test_sae_feature_direction_is_decoder_row(lm: Any, tok: Any) -> None:
    sae = random_sae(HIDDEN, 64, k=4, layer=LAYER)
    enc = _batch(tok, PROMPTS[:1])
    base = _residual(lm, enc, [LAYER])[LAYER]
    with guardrails.steering(lm, [Steer(LAYER, sae_feature=(sae, 5), strength=2.0, relative_to="absolute")]):
        got = _residual(lm, enc, [LAYER])[LAYER]
    u = sae.W_dec.data[5] / sae.W_dec.data[5].norm()
    torch.testing.assert_close(got[0, 1:], base[0, 1:] + 2.0 * u, rtol=1e-5, atol=1e-5)


def test_errors_name_the_problem(lm: Any) -> None:
    with pytest.raises(SteeringError, match="out of range"):
        guardrails.steering(lm, [Steer(99, direction=_direction())])
    with pytest.raises(SteeringError, match=r"valid: \(64,\)"):
        guardrails.steering(lm, [Steer(LAYER, direction=torch.ones(7))])
    with pytest.raises(SteeringError, match="exactly one"):
        Steer(LAYER)
    with pytest.raises(SteeringError, match="positions"):
        guardrails.steering(lm, [Steer(LAYER, direction=_direction())], positions="middle")  # type: ignore[arg-type]
    with pytest.raises(SteeringError, match="zero vector"):
        guardrails.steering(lm, [Steer(LAYER, direction=torch.zeros(HIDDEN))])
    assert hooks_on(lm) == 0


# -- policies ---------------------------------------------------------------------------------------------------
def _files(tmp_path: Path) -> tuple[Path, Path]:
    from safetensors.torch import save_file

    d = tmp_path / "dir.safetensors"
    save_file({"direction": _direction()}, str(d), metadata={"layer": str(LAYER)})
    w = tmp_path / "probe.safetensors"
    save_file({"weight": _direction(7), "bias": torch.zeros(())}, str(w))
    return d, w


def _policy(tmp_path: Path, steering: str, threshold: float = 1e9, gate_layer: int = 0) -> Policy:
    d, w = _files(tmp_path)
    return Policy.from_yaml(f"""
name: steer-test
rules:
  - id: gate
    scope: input
    detector: {{kind: linear, layer: {gate_layer}, weights: "{w}"}}
    threshold: {threshold}
    action: flag
steering:
{steering.replace("DIR", str(d))}
""")


def _guarded(lm: Any, tok: Any, policy: Policy, prompts: list[str]) -> list[list[int]]:
    res = GuardedModel(lm, tok, policy, chat=False).generate(list(prompts), max_new_tokens=NEW)
    assert isinstance(res, list)
    return [r.output_ids for r in res]


def _cut(rows: list[list[int]], eos: int) -> list[list[int]]:
    """Each row up to its first eos (GuardedModel stops there)."""
    return [r[: r.index(eos)] if eos in r else r for r in rows]


def _api(lm: Any, tok: Any, prompts: list[str], rows: list[int] | None, layers: list[int], s: float) -> list[list[int]]:
    enc = _batch(tok, prompts)
    with guardrails.steering(lm, [Steer(layers, direction=_direction(), strength=s)], positions="generated",
                             rows=rows):
        return _cut(_generate(lm, tok, enc), tok.eos_token_id)


def test_always_entry_equals_api(lm: Any, tok: Any, tmp_path: Path) -> None:
    pol = _policy(tmp_path, """  - id: tone
    always: true
    steer: {direction: DIR, method: add, strength: 1.5, relative_to: norm, layers: [0, 1]}
""")
    got = _guarded(lm, tok, pol, PROMPTS)
    assert got == _api(lm, tok, PROMPTS, None, [0, 1], 1.5)
    assert got != _api(lm, tok, PROMPTS, None, [0, 1], 0.0)
    # subtract with a negative strength is the same as add: the sign is the direction
    pol2 = _policy(tmp_path, """  - id: tone
    always: true
    steer: {direction: DIR, method: subtract, strength: -1.5, relative_to: norm, layers: [0, 1]}
""")
    assert _guarded(lm, tok, pol2, PROMPTS) == got


def test_gated_entry_steers_only_flagged_rows(lm: Any, tok: Any, tmp_path: Path) -> None:
    probe = GuardedModel(lm, tok, _policy(tmp_path, "  []"), chat=False)
    hi = [max(s.scores.values()) for s in probe.score(PROMPTS, chat=False)]
    assert abs(hi[0] - hi[1]) > 1e-3
    fire = int(hi[1] > hi[0])
    threshold = (hi[0] + hi[1]) / 2  # only row `fire` trips the gate
    pol = _policy(tmp_path, """  - id: refuse
    when: gate
    steer: {direction: DIR, method: add, strength: 1.5, relative_to: norm}
""", threshold=threshold)  # layer from the direction file's metadata (1), deeper than the gate (0)
    guard = GuardedModel(lm, tok, pol, chat=False)
    res = guard.generate(list(PROMPTS), max_new_tokens=NEW)
    assert isinstance(res, list)
    assert [r.steered for r in res] == [b == fire for b in range(2)]
    plain = _api(lm, tok, PROMPTS, [], [LAYER], 0.0)
    want = _api(lm, tok, PROMPTS, [fire], [LAYER], 1.5)
    got = [r.output_ids for r in res]
    assert got[1 - fire] == plain[1 - fire]  # the other row: byte for byte unsteered
    assert got[fire] == want[fire] != plain[fire]


@pytest.mark.parametrize("scan_action", ["", "block", "flag"])
def test_a_scan_blocks_where_a_gated_entry_would_have_steered(lm: Any, tok: Any, tmp_path: Path,
                                                              scan_action: str) -> None:
    # a flag rule that steering waits for: generation steers; a scan (nothing to steer) does the entry's scan
    # action, block by default, instead of passing the text with a flag
    extra = f", scan_action: {scan_action}" if scan_action else ""
    pol = _policy(tmp_path, f"""  - id: refuse
    when: gate
    steer: {{direction: DIR, method: add, strength: 1.5, relative_to: norm{extra}}}
""", threshold=-1e9)
    guard = GuardedModel(lm, tok, pol, chat=False)
    gen = guard.generate(PROMPTS[0], max_new_tokens=NEW)
    assert isinstance(gen, GenerationResult) and gen.steered and not gen.blocked
    assert [(d.action, d.resolution) for d in gen.decisions] == [("flag", None)]
    scan = guard.score([PROMPTS[0]], chat=False)[0]
    want = scan_action or "block"
    assert [(d.action, d.resolution) for d in scan.decisions] == [("flag", want)]
    assert scan.blocked == (want == "block") and scan.flagged == (want == "flag")
    plain = _policy(tmp_path, "  []", threshold=-1e9)  # no entry waits for the gate: its flag stays a flag
    flagged = GuardedModel(lm, tok, plain, chat=False).score([PROMPTS[0]], chat=False)[0]
    assert [(d.action, d.resolution) for d in flagged.decisions] == [("flag", None)] and not flagged.blocked


def test_rule_steer_with_direction_and_layers(lm: Any, tok: Any, tmp_path: Path) -> None:
    d, w = _files(tmp_path)
    pol = Policy.from_yaml(f"""
name: t
rules:
  - id: s
    scope: input
    detector: {{kind: linear, layer: 0, weights: "{w}"}}
    threshold: -1e9
    action: steer
    steer: {{direction: "{d}", method: add, strength: 1.5, relative_to: norm, layers: [1]}}
""")
    got = _guarded(lm, tok, pol, PROMPTS)
    # trips at the first scored prompt token (position 1): every later position at layer 1 is steered
    enc = _batch(tok, PROMPTS)
    with guardrails.steering(lm, [Steer(1, direction=_direction(), strength=1.5)], positions="all"):
        want = _cut(_generate(lm, tok, enc), tok.eos_token_id)
    assert got == want


def test_schema_errors(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"steering\[0\]\.when: unknown rule 'nope'"):
        _policy(tmp_path, "  - {id: x, when: nope, steer: {direction: DIR}}")
    with pytest.raises(PolicyError, match="exactly one of 'always: true' or 'when"):
        _policy(tmp_path, "  - {id: x, steer: {direction: DIR}}")
    with pytest.raises(PolicyError, match=r"steer\.direction: required"):
        _policy(tmp_path, "  - {id: x, always: true, steer: {method: add}}")
    with pytest.raises(PolicyError, match=r"steering\[0\]\.steer\.scan_action: only for entries with 'when"):
        _policy(tmp_path, "  - {id: x, always: true, steer: {direction: DIR, scan_action: flag}}")
    with pytest.raises(PolicyError, match="duplicate id 'gate'"):
        _policy(tmp_path, "  - {id: gate, always: true, steer: {direction: DIR}}")
    with pytest.raises(PolicyError, match="unknown SAE id 'main'"):
        _policy(tmp_path, "  - {id: x, always: true, steer: {direction: 'sae:main:3'}}")


def test_layer_out_of_range_in_policy(lm: Any, tok: Any, tmp_path: Path) -> None:
    pol = _policy(tmp_path, """  - id: tone
    always: true
    steer: {direction: DIR, method: add, strength: 1.0, layers: [9]}
""")
    with pytest.raises(PolicyError, match=r"steering\[0\]\.steer\.layers: \[9\] out of range"):
        GuardedModel(lm, tok, pol, chat=False)


# -- directions as artifacts ------------------------------------------------------------------------------------
def test_contrastive_direction_is_mean_difference_over_continuations(lm: Any, tok: Any, tmp_path: Path) -> None:
    import json

    from guardrails.engine.steering import load_direction
    from guardrails.offline.activations import collect_residuals
    from guardrails.offline.directions import build_direction, load_record, save_direction

    prompts = ["Tell me a story", "How do I bake bread?", "What is the capital"]
    pos, neg = "Sorry, no.", "Sure, here is how"
    rows: list[dict[str, Any]] = [{"prompt": p, "response": r, "label": y}
                                  for p in prompts for r, y in ((pos, 1), (neg, 0))]
    data = tmp_path / "c.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    d = build_direction(lm, tok, data, kind="contrastive", layer=LAYER, holdout=0)
    res = collect_residuals(lm, tok, [r["prompt"] for r in rows], [LAYER], responses=[r["response"] for r in rows],
                            scope="output", progress=False)[LAYER]
    means = torch.stack([r.mean(0) for r in res])
    y = torch.tensor([r["label"] for r in rows])
    torch.testing.assert_close(d.vector, means[y == 1].mean(0) - means[y == 0].mean(0))
    # the same rows in their own layout (--columns / --positive): the same direction
    from guardrails.offline.labeled import DataFormat

    own = tmp_path / "own.jsonl"
    own.write_text("".join(json.dumps({"q": r["prompt"], "a": r["response"], "kind": "refuse" if r["label"] else "ok"})
                           + "\n" for r in rows))
    fmt = DataFormat.parse("prompt=q,response=a,label=kind", "refuse")
    again = build_direction(lm, tok, own, kind="contrastive", layer=LAYER, holdout=0, fmt=fmt)
    torch.testing.assert_close(again.vector, d.vector)
    path, _ = save_direction(d, tmp_path / "dir")
    vec, meta = load_direction(path)
    assert torch.equal(vec, d.vector) and meta["layer"] == str(LAYER)
    assert load_record(path).n_positive == 3 and load_record(path).kind == "contrastive"


def test_direction_cli_rejects_unknown_kind(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from guardrails.cli.main import app

    r = CliRunner().invoke(app, ["direction", "--kind", "pca", "--data", str(tmp_path), "--layer", "1",
                                 "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "valid: contrastive, diffmean, probe" in r.output


# -- the benchmark's measurements -------------------------------------------------------------------------------
def test_eval_helpers_by_hand() -> None:
    from guardrails.offline.steering_eval import is_french, is_refusal, repeated_ngram_share

    assert is_french("Le chat dort sur le canapé et il fait beau.") and not is_french("The cat sleeps on the sofa.")
    assert repeated_ngram_share("a b c d a b c d") == pytest.approx(1 / 5)  # 5 four-grams, 'a b c d' seen twice
    assert repeated_ngram_share("one two three") == 0.0
    assert is_refusal("I'm sorry, but I can't help with that.") and not is_refusal("Sure, here is a recipe.")


def test_selective_feature_and_perplexity_on_tiny_chat_model() -> None:
    from guardrails.offline.steering_eval import generate, reference_perplexity, selective_feature
    from tests.builders import bundled_tokenizer

    tok = bundled_tokenizer()
    lm = tiny_lm("llama", tok, layers=2)
    sae = random_sae(HIDDEN, 64, k=8, layer=LAYER)
    texts = ["one two three four", "five six seven eight"]
    fid, on, off = selective_feature(lm, tok, sae, LAYER, [[1, 2, 3], []], [[], [1, 2, 3]], texts)
    assert 0 <= fid < 64 and on >= off
    ppl0 = reference_perplexity(lm, tok, ["Hi"], ["Hello there"])
    steer = [Steer(LAYER, direction=_direction(), strength=2.0)]
    assert ppl0 > 1 and reference_perplexity(lm, tok, ["Hi"], ["Hello there"], steer) != ppl0
    assert reference_perplexity(lm, tok, ["Hi"], ["Hello there"]) == pytest.approx(ppl0)  # hooks came off
    out = generate(lm, tok, ["Hi", "Tell me more"], max_new_tokens=3)
    assert len(out) == 2 and generate(lm, tok, ["Hi", "Tell me more"], max_new_tokens=3, steers=steer) != out


def test_gate_deeper_than_steer_scans_prompt_first(lm: Any, tok: Any, tmp_path: Path) -> None:
    """Gate at layer 2, steering at layer 1 over the prompt too: the prompt is scanned first, so the flagged
    row is steered from position 1 exactly as the API does, the other row stays byte for byte the same."""
    probe = GuardedModel(lm, tok, _policy(tmp_path, "  []", gate_layer=2), chat=False)
    hi = [max(s.scores.values()) for s in probe.score(PROMPTS, chat=False)]
    fire = int(hi[1] > hi[0])
    pol = _policy(tmp_path, """  - id: refuse
    when: gate
    steer: {direction: DIR, method: add, strength: 1.5, relative_to: norm, layers: [1], positions: all}
""", threshold=(hi[0] + hi[1]) / 2, gate_layer=2)
    res = GuardedModel(lm, tok, pol, chat=False).generate(list(PROMPTS), max_new_tokens=NEW)
    assert isinstance(res, list)
    assert [r.steered for r in res] == [b == fire for b in range(2)]
    assert [d.rule for d in res[fire].decisions] == ["gate"] and res[1 - fire].decisions == []
    enc = _batch(tok, PROMPTS)
    plain = _cut(_generate(lm, tok, enc), tok.eos_token_id)
    with guardrails.steering(lm, [Steer(1, direction=_direction(), strength=1.5)], positions="all", rows=[fire]):
        want = _cut(_generate(lm, tok, enc), tok.eos_token_id)
    got = [r.output_ids for r in res]
    assert got[1 - fire] == plain[1 - fire]
    assert got[fire] == want[fire] != plain[fire]


def test_copy_positions_by_hand() -> None:
    from guardrails.offline.steering_eval import copy_positions

    # 1 2 3 4 1 2 3 4 5: residual 6 predicts the token (4) that completes "1 2 3 4" a second time
    assert copy_positions([1, 2, 3, 4, 1, 2, 3, 4, 5]) == [False] * 6 + [True, False]
    assert copy_positions([7, 7, 7, 7, 7]) == [False, False, False, True]
    assert copy_positions([1, 2], n=2) == [False]
    assert copy_positions([]) == []


def test_shipped_directions_load_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from guardrails.engine.steering import load_direction

    monkeypatch.chdir(tmp_path)  # no such file here: the bare name is the shipped direction
    d, meta = load_direction("refusal-l12")
    same, _ = load_direction(Path(__file__).resolve().parents[1] / "calibration/directions/refusal-l12.safetensors")
    assert torch.equal(d, same) and meta.get("layer") == "12"
    assert torch.equal(load_direction("refusal-l12.safetensors")[0], same)
    with pytest.raises(SteeringError, match=r"'nope' not found; .* shipped direction: .*french-l9.*refusal-l12"):
        load_direction("nope")
