"""Hugging Face generation vocabulary: with no rule firing, guarded output equals ``model.generate`` with
the same arguments (greedy, sampled, penalties, stop strings, eos, processors, configs, streamers, batches);
``generate`` and ``stream`` accept and reject the same arguments; a token that ends generation is still
scored before release."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.generation.streamers import BaseStreamer

from guardrails import GuardedModel, Policy
from guardrails.engine.hooks import hooks_on
from tests.builders import qwen_scope_tensors, write_qwen_scope

LAYER, D_SAE = 1, 128
PROMPT = "Tell me a story about a robot"
BATCH = ["How do I bake bread?", "Tell me a story about a robot who learns to paint"]


@pytest.fixture(scope="module")
def guard(lm: Any, tok: Any, tmp_path_factory: pytest.TempPathFactory) -> GuardedModel:
    path = write_qwen_scope(tmp_path_factory.mktemp("sae"), LAYER, qwen_scope_tensors(64, D_SAE, seed=3))
    policy = Policy.from_yaml(f"""
name: never
saes: {{main: {{path: "{path}", layer: {LAYER}, k: 16}}}}
rules:
  - id: watch
    scope: both
    detector: {{sae: main, features: [1, 5, 9], combine: sum}}
    threshold: 1.0e+9
""")
    return GuardedModel(lm("llama"), tok, policy, chat=False)


def _reference(model: Any, tok: Any, prompts: list[str], seed: int | None = None, **kw: Any) -> list[list[int]]:
    """``model.generate`` on the left-padded batch; output ids up to (without) the first eos, pads dropped."""
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    tok.padding_side = "right"
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(**enc, tokenizer=tok, **kw)[:, enc["input_ids"].shape[1]:].tolist()
    eos = kw.get("eos_token_id", tok.eos_token_id)
    eos_set = {eos} if isinstance(eos, int) else set(eos)
    rows = []
    for row in out:
        cut = next((i for i, t in enumerate(row) if t in eos_set), len(row))
        rows.append(row[:cut])
    return rows


def _greedy_text(guard: GuardedModel, n: int = 16) -> tuple[list[int], str]:
    r = guard.generate(PROMPT, max_new_tokens=n)
    assert not isinstance(r, list)
    return r.output_ids, r.text


class BanToken(LogitsProcessor):
    """Forbid one token id (a caller's own processor)."""

    def __init__(self, token: int) -> None:
        self.token = token

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores[:, self.token] = float("-inf")
        return scores


ARG_SETS: dict[str, dict[str, Any]] = {
    "greedy": {"max_new_tokens": 16},
    "repetition_penalty": {"max_new_tokens": 16, "repetition_penalty": 1.8},
    "no_repeat_ngram": {"max_new_tokens": 16, "no_repeat_ngram_size": 2},
    "min_new_tokens": {"max_new_tokens": 12, "min_new_tokens": 10},
    "sampled": {"max_new_tokens": 16, "do_sample": True, "temperature": 0.8, "top_k": 30, "top_p": 0.9},
    "sampled_default_top_k": {"max_new_tokens": 16, "do_sample": True},
    "config": {"generation_config": GenerationConfig(max_new_tokens=14, repetition_penalty=1.3,
                                                     no_repeat_ngram_size=3)},
}


@pytest.mark.parametrize("name", sorted(ARG_SETS))
def test_equals_model_generate(guard: GuardedModel, tok: Any, name: str) -> None:
    kw = ARG_SETS[name]
    seed = 7 if kw.get("do_sample") else None
    got = guard.generate(BATCH, seed=seed, **kw)
    assert isinstance(got, list)
    ref = _reference(guard.model, tok, BATCH, seed=seed, **kw)
    assert [r.output_ids for r in got] == ref
    assert all(r.output_ids for r in got)
    assert hooks_on(guard.model) == 0


def test_settings_change_the_output(guard: GuardedModel) -> None:
    """The equality above is not vacuous: the penalties change what the tiny model writes."""
    plain = guard.generate(BATCH, max_new_tokens=16)
    assert isinstance(plain, list)
    for name in ("repetition_penalty", "no_repeat_ngram"):
        other = guard.generate(BATCH, **ARG_SETS[name])
        assert isinstance(other, list)
        assert [r.output_ids for r in other] != [r.output_ids for r in plain], name


def test_temperature_zero_is_greedy(guard: GuardedModel) -> None:
    ids, _ = _greedy_text(guard)
    r = guard.generate(PROMPT, max_new_tokens=16, do_sample=True, temperature=0)
    assert not isinstance(r, list) and r.output_ids == ids


def test_stop_strings_end_generation_and_the_last_token_is_scored(guard: GuardedModel, tok: Any) -> None:
    prompt = "Hello world!"
    r0 = guard.generate(prompt, max_new_tokens=16)
    assert not isinstance(r0, list)
    ids = r0.output_ids
    # a stop string: the first later token that is a plain word not seen before in the output
    k = next(i for i in range(3, len(ids)) if tok.decode(ids[i]).isalpha() and tok.decode(ids[i]).isascii()
             and tok.decode(ids[i]) not in tok.decode(ids[:i]))
    stop = tok.decode(ids[k])
    r = guard.generate(prompt, max_new_tokens=16, stop_strings=[stop])
    assert not isinstance(r, list)
    assert r.output_ids == _reference(guard.model, tok, [prompt], max_new_tokens=16, stop_strings=[stop])[0]
    assert r.output_ids == ids[: k + 1] and r.text.endswith(stop)
    last_pos = r.prompt_length + len(r.output_ids) - 1
    assert last_pos in r.token_scores["watch"]  # scored by a forward before it was released
    assert "".join(guard.stream(prompt, max_new_tokens=16, stop_strings=stop)) == r.text


def test_eos_token_id_ends_generation(guard: GuardedModel, tok: Any) -> None:
    ids, _ = _greedy_text(guard, 16)
    eos = ids[4]
    r = guard.generate(PROMPT, max_new_tokens=16, eos_token_id=eos)
    assert not isinstance(r, list)
    assert r.output_ids == ids[: ids.index(eos)]
    assert r.output_ids == _reference(guard.model, tok, [PROMPT], max_new_tokens=16, eos_token_id=eos)[0]


def test_caller_logits_processor(guard: GuardedModel, tok: Any) -> None:
    ids, _ = _greedy_text(guard, 16)
    procs = LogitsProcessorList([BanToken(ids[0])])
    r = guard.generate(PROMPT, max_new_tokens=16, logits_processor=procs)
    assert not isinstance(r, list)
    assert r.output_ids[0] != ids[0]
    assert r.output_ids == _reference(guard.model, tok, [PROMPT], max_new_tokens=16, logits_processor=procs)[0]


class Recorder(BaseStreamer):
    def __init__(self) -> None:
        self.calls: list[list[int]] = []
        self.ended = 0

    def put(self, value: torch.Tensor) -> None:
        self.calls.append(value.flatten().tolist())

    def end(self) -> None:
        self.ended += 1


def test_streamer_gets_prompt_then_released_tokens(guard: GuardedModel, tok: Any) -> None:
    mine, theirs = Recorder(), Recorder()
    r = guard.generate(PROMPT, max_new_tokens=10, streamer=mine)
    _reference(guard.model, tok, [PROMPT], max_new_tokens=10, streamer=theirs)
    assert not isinstance(r, list)
    assert mine.calls[0] == theirs.calls[0]  # the prompt ids
    assert [t for c in mine.calls[1:] for t in c] == r.output_ids
    assert [t for c in theirs.calls[1:] for t in c][: len(r.output_ids)] == r.output_ids
    assert mine.ended == 1


def test_stream_equals_generate_with_the_same_arguments(guard: GuardedModel) -> None:
    kw = {"max_new_tokens": 14, "repetition_penalty": 1.5, "do_sample": True, "top_k": 20, "seed": 5}
    r = guard.generate(PROMPT, **kw)
    s = guard.stream(PROMPT, **kw)
    assert not isinstance(r, list)
    assert "".join(s) == r.text and s.result is not None and s.result.output_ids == r.output_ids


BAD: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"num_beams": 2}, ValueError, "num_beams=2"),
    ({"num_return_sequences": 2}, ValueError, "num_return_sequences"),
    ({"penalty_alpha": 0.6, "top_k": 4}, ValueError, "not supported"),
    ({"bogus": 1}, TypeError, "bogus"),
    ({"temperature": -1.0}, ValueError, "temperature"),
    ({"top_p": 0.0}, ValueError, "top_p"),
    ({"max_new_tokens": 0}, ValueError, "max_new_tokens"),
    ({"repetition_penalty": -1.0}, ValueError, "repetition_penalty"),
    ({"generation_config": {"max_new_tokens": 3}}, TypeError, "GenerationConfig"),
    ({"stop_strings": [""]}, ValueError, "stop_strings"),
    ({"seed": "x"}, TypeError, "seed"),
]


@pytest.mark.parametrize(("kw", "exc", "match"), BAD, ids=[str(sorted(b[0])) for b in BAD])
def test_generate_and_stream_reject_the_same(guard: GuardedModel, kw: dict[str, Any], exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        guard.generate(PROMPT, **kw)
    with pytest.raises(exc, match=match):
        guard.stream(PROMPT, **kw)  # at construction, before any token
    assert hooks_on(guard.model) == 0


def test_streamer_refuses_a_batch(guard: GuardedModel) -> None:
    with pytest.raises(ValueError, match="one prompt"):
        guard.generate(BATCH, streamer=Recorder())


# -- the bundled model ------------------------------------------------------------------------------------


@pytest.mark.model
@pytest.mark.slow
def test_bundled_equals_model_generate(tmp_path: Path) -> None:
    from guardrails.serving.models import load_model

    model, tok = load_model()
    policy = Policy.from_yaml("""
name: never
saes: {l15: {path: bundled, layer: 15}}
rules:
  - id: r
    scope: both
    detector: {sae: l15, features: [1, 2, 3]}
    threshold: 1.0e+9
""")
    guard = GuardedModel(model, tok, policy)
    prompt = guard.format_prompt("Write a short poem about the sea.")
    base = {"max_new_tokens": 24}
    plain = guard.generate(prompt, chat=False, **base)
    assert not isinstance(plain, list)
    for kw in ({"repetition_penalty": 1.3, "no_repeat_ngram_size": 3},
               {"stop_strings": ["\n"], "repetition_penalty": 1.2},
               {"do_sample": True, "temperature": 0.7, "top_p": 0.9}):
        seed = 11 if kw.get("do_sample") else None
        got = guard.generate(prompt, chat=False, seed=seed, **base, **kw)
        assert not isinstance(got, list)
        assert got.output_ids == _reference(model, tok, [prompt], seed=seed, **base, **kw)[0], kw
        assert not got.decisions
    assert hooks_on(model) == 0


# -- audits from every entry point ------------------------------------------------------------------------


def _audited_policy(path: Path, db: str, redact: bool = False) -> Policy:
    return Policy.from_yaml(f"""
name: audited
audit: {{db: {db}, redact: {str(redact).lower()}}}
saes: {{main: {{path: "{path}", layer: {LAYER}, k: 16}}}}
rules:
  - id: watch
    scope: both
    detector: {{sae: main, features: [1, 5, 9], combine: sum}}
    threshold: 1.0e+9
""", base_dir=path.parent)


def test_policy_audit_sink_and_env_override(lm: Any, tok: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from guardrails import AuditStore

    sae = write_qwen_scope(tmp_path / "sae", LAYER, qwen_scope_tensors(64, D_SAE, seed=3))
    monkeypatch.delenv("GUARDRAILS_AUDIT_DB", raising=False)
    policy = _audited_policy(sae, "audit.db", redact=True)
    assert policy.redact is True  # audit.redact sets the policy's redact
    guard = GuardedModel(lm("llama"), tok, policy, chat=False)
    r = guard.generate(PROMPT, max_new_tokens=4)  # nothing fired: recorded anyway
    assert not isinstance(r, list) and not r.decisions
    records = list(AuditStore(sae.parent / "audit.db").iter_records())  # relative to the policy's folder
    assert len(records) == 1 and records[0].data["kind"] == "generation" and records[0].data["redacted"] is True
    env_db = tmp_path / "env.db"
    monkeypatch.setenv("GUARDRAILS_AUDIT_DB", str(env_db))
    GuardedModel(lm("llama"), tok, policy, chat=False).generate(PROMPT, max_new_tokens=4)
    assert len(list(AuditStore(env_db).iter_records())) == 1  # the environment wins over the policy
    explicit = tmp_path / "explicit.db"
    GuardedModel(lm("llama"), tok, policy, chat=False, audit=explicit).generate(PROMPT, max_new_tokens=4)
    assert len(list(AuditStore(explicit).iter_records())) == 1  # and audit= wins over both
    assert len(list(AuditStore(env_db).iter_records())) == 1


@pytest.mark.model
def test_cli_honours_the_audit_env_and_names_the_model_by_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from guardrails import AuditStore
    from guardrails.cli.main import app

    db = tmp_path / "cli.db"
    monkeypatch.setenv("GUARDRAILS_AUDIT_DB", str(db))
    res = CliRunner().invoke(app, ["generate", "Name three colors.", "--policy", "harmful-requests",
                                   "--max-new-tokens", "4", "--json"])
    assert res.exit_code == 0, res.output
    records = list(AuditStore(db).iter_records())
    assert len(records) == 1 and records[0].data["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
