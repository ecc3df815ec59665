"""Bad input in bulk (hypothesis): policy YAML, SAE files, prompts and CLI flags.

Each kind of input gets either a correct result or the library's own clear error (PolicyError,
SAEError, ValueError, a CLI exit code 1/2 with an error line): never another exception type, a
traceback, a hang or text released unscored. ``tests/_counts.py`` prints how many cases each
property tried.
"""

from __future__ import annotations

import json
import math
import pickle
import string
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from guardrails import GuardedModel, Policy, PolicyError, SAEError
from guardrails.engine.hooks import hooks_on
from guardrails.sae.model import SAE
from tests._counts import count
from tests.builders import bundled_tokenizer, qwen_scope_tensors, random_sae, tiny_lm, write_qwen_scope

FAST = settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), database=None)
SLOW = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)

# -- policy YAML -----------------------------------------------------------------------------------------------

VALID = {
    "name": "p",
    "saes": {"s": {"path": "bundled", "layer": 1, "k": 4}},
    "rules": [{"id": "r", "scope": "output", "threshold": 1.0, "action": "block",
               "detector": {"sae": "s", "features": [1, 2], "window": 2, "aggregate": "mean"}}],
}
KEYS = ["name", "saes", "rules", "id", "detector", "sae", "features", "threshold", "action", "scope", "steer",
        "kind", "layer", "weights", "window", "aggregate", "on_error", "score_mode", "path", "k", "weight",
        "strength", "method", "block_above", "calibration", "refusal", "combine", "bias", "message"]

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30), st.sampled_from([2**63, -(2**63) - 1, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20), st.sampled_from(["block", "steer", "flag", "input", "both", "linear", "sae_features",
                                            "\u202e\u0000", "ℌ𝔢𝔩𝔩𝔬", "é" * 50]),
)
trees = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), children, max_size=5),
    ),
    max_leaves=25,
)


def _mutate(data: Any, path: list[int], value: Any) -> Any:
    """``data`` with the node reached by following ``path`` (indices into keys/items) replaced by ``value``."""
    if not path or not isinstance(data, dict | list) or not data:
        return value
    if isinstance(data, dict):
        key = list(data)[path[0] % len(data)]
        return {**data, key: _mutate(data[key], path[1:], value)}
    i = path[0] % len(data)
    return [*data[:i], _mutate(data[i], path[1:], value), *data[i + 1 :]]


def _load_policy(text: str) -> Policy | None:
    try:
        return Policy.from_yaml(text, source="fuzz.yaml")
    except PolicyError as exc:
        assert str(exc).startswith("fuzz.yaml"), str(exc)  # the error names its source
        return None


@FAST
@given(trees)
def test_random_yaml_trees_give_a_policy_or_policy_error(tree: Any) -> None:
    count("policy yaml: random trees")
    text = yaml.safe_dump(tree, allow_unicode=True) if not isinstance(tree, float) or math.isfinite(tree) else "1"
    pol = _load_policy(text)
    assert pol is None or isinstance(pol, Policy)


@FAST
@given(st.lists(st.integers(0, 50), max_size=6), trees)
def test_mutated_valid_policies_give_a_policy_or_policy_error(path: list[int], value: Any) -> None:
    count("policy yaml: mutated valid policy")
    pol = _load_policy(yaml.safe_dump(_mutate(VALID, path, value), allow_unicode=True))
    if pol is not None:  # whatever was accepted round-trips through its own YAML
        assert Policy.from_yaml(pol.to_yaml()) == pol


@FAST
@given(st.text(alphabet=string.printable + "{}[]:&*!|>-'\"\u2028\ufeff", max_size=300))
def test_raw_text_gives_a_policy_or_policy_error(text: str) -> None:
    count("policy yaml: raw text")
    _load_policy(text)


def _alias_bomb(levels: int = 9) -> str:
    lines = ["name: p", "saes: {s: {path: bundled, layer: 1}}",
             "rules: [{id: r, detector: {sae: s, features: [1]}, threshold: 1}]", "calibration:",
             "  a: &a [x, x, x, x, x, x, x, x, x]"]
    prev = "a"
    for i in range(1, levels):
        name = f"l{i}"
        lines.append(f"  {name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
        prev = name
    return "\n".join(lines)


def test_deeply_nested_yaml_is_a_policy_error() -> None:
    count("policy yaml: hand-written")
    with pytest.raises(PolicyError):
        Policy.from_yaml("rules: " + "[" * 5000 + "]" * 5000)


def test_yaml_alias_bomb_is_refused_at_load() -> None:
    count("policy yaml: hand-written")
    small = Policy.from_yaml(_alias_bomb(3))  # expands to 729 items: fine either way
    assert small.digest
    with pytest.raises(PolicyError):
        Policy.from_yaml(_alias_bomb(9))  # 387 million items once expanded


def test_huge_numbers_and_unicode_are_named() -> None:
    count("policy yaml: hand-written", 3)
    with pytest.raises(PolicyError, match=r"rules\[0\]\.detector\.window"):
        Policy.from_dict(_mutate(VALID, [2, 0, 4, 2], 10**400))
    assert Policy.from_dict({**VALID, "name": "ℌ𝔢𝔩𝔩𝔬 \u202e"}).name == "ℌ𝔢𝔩𝔩𝔬 \u202e"
    for bad in (float("inf"), float("-inf"), float("nan")):  # a rule that never (or always) fires: refused
        with pytest.raises(PolicyError, match=r"rules\[0\]\.threshold: Input should be a finite number"):
            Policy.from_dict(_mutate(VALID, [2, 0, 2], bad))


# -- SAE files ---------------------------------------------------------------------------------------------------


@cache
def _sae_files(root: str) -> dict[str, Path]:
    base = Path(root)
    ours = random_sae(d_model=16, d_sae=32, k=4, layer=1).save(base / "ours")
    qwen = write_qwen_scope(base / "qwen", 1, qwen_scope_tensors(16, 32))
    return {"ours": ours / "sae.safetensors", "ours-cfg": ours / "cfg.json", "qwen": qwen}


@pytest.fixture(scope="module")
def sae_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _sae_files(str(tmp_path_factory.mktemp("sae_files")))


def _try_load(path: Path, **kw: Any) -> SAE | None:
    try:
        sae = SAE.load(path, **kw)
    except SAEError as exc:
        assert str(exc), "empty error message"
        return None
    for name, t in sae.tensors().items():  # a load that succeeds gives finite float weights
        assert t.is_floating_point() and bool(torch.isfinite(t).all()), name
    return sae


def _copy_with(src: Path, dst_dir: Path, data: bytes) -> Path:
    import shutil

    if dst_dir.exists():
        shutil.rmtree(dst_dir)
    shutil.copytree(src.parent, dst_dir)
    (dst_dir / src.name).write_bytes(data)
    return dst_dir / src.name


@SLOW
@given(st.sampled_from(["ours", "qwen"]), st.floats(0, 1, exclude_max=True))
def test_truncated_sae_files_are_sae_errors(sae_files: dict[str, Path], which: str, frac: float) -> None:
    count("sae files: truncated")
    src = sae_files[which]
    raw = src.read_bytes()
    target = _copy_with(src, src.parent.parent / f"trunc-{which}", raw[: int(len(raw) * frac)])
    load = target.parent if which == "ours" else target
    with pytest.raises(SAEError):
        SAE.load(load, k=4)


@SLOW
@given(st.sampled_from(["ours", "qwen"]), st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)),
                                                   min_size=1, max_size=8))
def test_corrupted_sae_files_load_correctly_or_are_sae_errors(
    sae_files: dict[str, Path], which: str, edits: list[tuple[float, int]]
) -> None:
    count("sae files: corrupted bytes")
    src = sae_files[which]
    raw = bytearray(src.read_bytes())
    for frac, byte in edits:
        raw[int(len(raw) * frac)] = byte
    target = _copy_with(src, src.parent.parent / f"corrupt-{which}", bytes(raw))
    _try_load(target.parent if which == "ours" else target, k=4)


cfg_values = st.one_of(scalars, st.lists(scalars, max_size=3), st.dictionaries(st.text(max_size=4), scalars,
                                                                                max_size=2))


@FAST
@given(st.sampled_from(["d_model", "d_sae", "architecture", "k", "apply_b_dec_to_input", "relu_after_topk", "layer",
                        "format", "metadata", "model"]), cfg_values)
def test_fuzzed_cfg_json_loads_correctly_or_is_an_sae_error(sae_files: dict[str, Path], key: str, value: Any) -> None:
    count("sae files: cfg.json values")
    src = sae_files["ours-cfg"]
    cfg = json.loads(src.read_text())
    cfg[key] = value
    target = _copy_with(src, src.parent.parent / "cfg-fuzz", json.dumps(cfg).encode())
    _try_load(target.parent)


@FAST
@given(st.sampled_from(["d_in", "d_sae", "architecture", "activation_fn_str", "k", "normalize_activations",
                        "apply_b_dec_to_input", "hook_layer", "meta", "activation_fn_kwargs"]), cfg_values)
def test_fuzzed_saelens_cfg_loads_correctly_or_is_an_sae_error(tmp_path_factory: pytest.TempPathFactory, key: str,
                                                                value: Any) -> None:
    count("sae files: saelens cfg values")
    folder = _saelens_folder(str(tmp_path_factory.getbasetemp()))
    cfg = json.loads((folder / "cfg.json").read_text())
    if key in ("d_in", "d_sae") and not (isinstance(value, int) and not isinstance(value, bool)):
        value = len(str(value))  # non-integer sizes: the strict xfail below
    cfg[key] = value
    (folder / "cfg.json").write_text(json.dumps(cfg))
    try:
        _try_load(folder)
    finally:
        (folder / "cfg.json").write_text(json.dumps(_SAELENS_CFG))


_SAELENS_CFG = {"d_in": 16, "d_sae": 32, "architecture": "standard", "activation_fn_str": "relu", "hook_layer": 1}


@cache
def _saelens_folder(root: str) -> Path:
    from safetensors.torch import save_file

    folder = Path(root) / "saelens-fuzz"
    folder.mkdir(exist_ok=True)
    g = torch.Generator().manual_seed(0)
    save_file({"W_enc": torch.randn(16, 32, generator=g), "W_dec": torch.randn(32, 16, generator=g),
               "b_enc": torch.zeros(32), "b_dec": torch.zeros(16)}, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(_SAELENS_CFG))
    return folder


@pytest.mark.parametrize("value", ["sixteen", [16], {"a": 1}, None, float("nan")])
def test_saelens_non_numeric_d_in_is_an_sae_error(tmp_path_factory: pytest.TempPathFactory, value: Any) -> None:
    count("sae files: hand-written")
    folder = _saelens_folder(str(tmp_path_factory.getbasetemp()))
    (folder / "cfg.json").write_text(json.dumps({**_SAELENS_CFG, "d_in": value}))
    try:
        with pytest.raises(SAEError):
            SAE.load(folder)
    finally:
        (folder / "cfg.json").write_text(json.dumps(_SAELENS_CFG))


shapes = st.lists(st.integers(0, 40), min_size=0, max_size=3).map(tuple)


@SLOW
@given(st.sampled_from(["W_enc", "W_dec", "b_enc", "b_dec"]), shapes,
       st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64, torch.bool]))
def test_qwen_scope_shapes_and_dtypes(tmp_path_factory: pytest.TempPathFactory, name: str, shape: tuple[int, ...],
                                      dtype: torch.dtype) -> None:
    """A wrong shape is an SAEError; a right shape in any dtype loads as exactly the float32 of the file."""
    count("sae files: shapes and dtypes")
    t = qwen_scope_tensors(16, 32)
    t[name] = torch.ones(shape).to(dtype) if dtype == torch.bool else (torch.arange(math.prod(shape)).reshape(shape)
                                                                         % 7 - 3).to(dtype)
    path = write_qwen_scope(tmp_path_factory.getbasetemp() / "qwen-shapes", 1, t)
    expected = {"W_enc": (32, 16), "W_dec": (16, 32), "b_enc": (32,), "b_dec": (16,)}[name]
    sae = _try_load(path, k=4)
    if shape != expected:
        assert sae is None, f"{name} of shape {shape} was accepted"
        return
    assert sae is not None
    ours = {"W_enc": sae.W_enc, "W_dec": sae.W_dec.T, "b_enc": sae.b_enc, "b_dec": sae.b_dec}[name]
    assert torch.equal(ours, t[name].float())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_sae_errors(tmp_path: Path, bad: float) -> None:
    count("sae files: hand-written")
    t = qwen_scope_tensors(16, 32)
    t["W_enc"][3, 5] = bad
    with pytest.raises(SAEError, match="NaN or inf"):
        SAE.load(write_qwen_scope(tmp_path, 1, t), k=4)


class _Payload:
    """Unpickling this object would create the marker file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("how", ["torch-zip", "legacy-pickle", "tensor-dict-with-payload"])
def test_pickle_that_runs_code_is_refused_and_runs_nothing(tmp_path: Path, how: str) -> None:
    count("sae files: code-running pickle")
    marker = tmp_path / "pwned"
    path = tmp_path / "layer1.sae.pt"
    payload: Any = _Payload(marker)
    if how == "tensor-dict-with-payload":
        payload = {**qwen_scope_tensors(16, 32), "extra": _Payload(marker)}
    if how == "legacy-pickle":
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path)
    assert not marker.exists()
    with pytest.raises(SAEError, match="weights_only"):
        SAE.load(path, k=4)
    with pytest.raises(SAEError):
        SAE.load(tmp_path, layer=1, k=4)  # the folder form too
    assert not marker.exists()
    with open(path, "rb") as fh:  # the control: the file does run code when unpickled without weights_only
        torch.load(fh, weights_only=False) if how != "legacy-pickle" else pickle.load(fh)
    assert marker.exists()


# -- prompts -----------------------------------------------------------------------------------------------------

REFUSAL = "Refused."


_btok = bundled_tokenizer


@cache
def _blm() -> Any:
    return tiny_lm("llama", _btok(), layers=2)


def _always(scope: str) -> Policy:
    """Every scored token scores 1 (feature weight 0, bias 1) >= threshold 0.5: the rule fires on it."""
    return Policy.from_yaml(f"""
name: always
refusal: {REFUSAL}
saes: {{s: {{path: unused, layer: 1}}}}
rules:
  - id: r
    scope: {scope}
    threshold: 0.5
    detector: {{sae: s, features: [{{id: 0, weight: 0.0}}], bias: 1.0}}
""")


@cache
def _guard(scope: str) -> GuardedModel:
    return GuardedModel(_blm(), _btok(), _always(scope), saes={"s": random_sae(d_sae=64)})


def _specials() -> list[str]:
    tok = _btok()
    return sorted(set(tok.all_special_tokens) | {str(t) for t in tok.added_tokens_decoder.values()})


def prompts() -> st.SearchStrategy[str]:
    chars = st.characters()  # lone surrogates included
    piece = st.one_of(st.text(chars, max_size=30), st.sampled_from(_specials()),
                      st.text(st.characters(max_codepoint=31), min_size=1, max_size=5),
                      st.sampled_from(["\u202e", "\u200b", "\ufeff", "\x7f", "\r\n", " " * 10]))
    return st.lists(piece, max_size=6).map("".join)


def _scorable(text: str) -> list[int]:
    """Positions a guard scores in ``text`` (independently: not special, not position 0)."""
    tok = _btok()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    special = set(tok.all_special_ids)
    return [i for i, t in enumerate(ids) if i > 0 and t not in special]


def _normalized(text: str) -> str:
    """The text a scan scores: the policy's normalisation (default steps), the original when that is blank."""
    from guardrails.core.normalize import normalize

    n = normalize(text).text
    return n if n.strip() else text


def _surrogate(text: str) -> bool:
    return any("\ud800" <= c <= "\udfff" for c in text)


def _may_refuse(guard: GuardedModel, prompt: str, chat: bool) -> bool:
    """A ValueError is the right answer: blank, not valid Unicode, or no token at all (e.g. '\\x06' alone), as
    given or once normalised (the guard also scores the normalised prompt: '\\x06\\u202e' is '\\x06' then)."""
    if not prompt.strip() or _surrogate(prompt):
        return True
    tok = _btok()
    return any(not tok(guard.format_prompt(p, chat), add_special_tokens=False)["input_ids"]
               for p in (prompt, _normalized(prompt)))


def _generate(guard: GuardedModel, prompt: str, chat: bool) -> Any:
    try:
        r = guard.generate(prompt, max_new_tokens=3, chat=chat)
    except ValueError as exc:
        assert _may_refuse(guard, prompt, chat), f"ValueError for a valid prompt: {exc}"
        assert str(exc)
        count("prompts: refused with ValueError")
        return None
    assert not _surrogate(prompt), "a prompt that is not valid Unicode was accepted"
    return r


@FAST
@given(prompts(), st.booleans())
def test_prompts_output_rule_releases_nothing_unscored(prompt: str, chat: bool) -> None:
    count("prompts: generate, output rule fires on every token")
    guard = _guard("output")
    r = _generate(guard, prompt, chat)
    assert hooks_on(guard.model) == 0
    if r is None:
        return
    special = set(_btok().all_special_ids)
    assert r.released_text == ""
    assert all(t in special for t in r.output_ids), "a released token that was not scored"
    if r.blocked:
        assert r.text == REFUSAL and r.decisions[0].scope == "output" and r.decisions[0].output_index == 0


@FAST
@given(prompts(), st.booleans())
@example("<|endoftext|>", False)  # its leet decoding fires in the pre-scan: a decoded-segment decision
def test_prompts_input_rule_scores_every_scorable_prompt_token(prompt: str, chat: bool) -> None:
    count("prompts: generate, input rule fires on every token")
    guard = _guard("input")
    r = _generate(guard, prompt, chat)
    if r is None:
        return
    # input rules read the user's turn (input_roles), not the template's default system prompt
    where = [i for i in _scorable(r.prompt) if i < len(r.roles) and r.roles[i] in ("user", "tool")]
    # the normalisation pre-scan also scores decoded segments (e.g. leet-decoded '<|endoftext|>' ->
    # '<lendoftextl>'); its decisions carry position -1 and say where they came from
    pre = [d for d in r.decisions if d.position == -1]
    assert all(any(k in (d.reason or "") for k in ("normalized prompt", "decoded from the input")) for d in pre)
    assert r.blocked == bool(where or pre)
    if where:
        assert r.text == REFUSAL and r.released_text == "" and r.output_ids == []
        d = r.decisions[0]
        assert (d.scope, d.position) == ("input", where[0])
        assert sorted(r.token_scores["r"]) == where  # the prefill scores every scorable prompt token


@FAST
@given(st.lists(prompts(), min_size=1, max_size=3))
def test_prompts_score_marks_every_scorable_token(texts: list[str]) -> None:
    guard = _guard("input")
    count("prompts: score")
    try:
        out = guard.score(texts, chat=False)
    except ValueError as exc:
        assert any(_may_refuse(guard, t, False) for t in texts), f"ValueError for valid texts: {exc}"
        count("prompts: refused with ValueError")
        return
    for text, s in zip(texts, out, strict=True):
        scored = _normalized(text)  # score() scores the normalized text (issue 16; '⅐' is '1⁄7' after NFKC)
        assert sorted(s.token_scores["r"]) == _scorable(scored)
        assert s.blocked == bool(_scorable(scored)) or bool(s.normalization and s.normalization["decoded"])


@pytest.mark.parametrize("api", ["generate", "score"])
def test_lone_surrogate_prompt_is_a_clear_value_error(api: str) -> None:
    count("prompts: hand-written")
    guard = _guard("output")
    with pytest.raises(ValueError, match=r"(?i)unicode|utf-8|surrogate"):
        if api == "generate":
            guard.generate("hello \ud800 world", max_new_tokens=2)
        else:
            guard.score(["hello \ud800 world"])


@pytest.mark.parametrize("api", ["generate", "stream", "score"])
def test_prompt_with_no_tokens_is_a_clear_value_error(api: str) -> None:
    count("prompts: hand-written")
    guard = _guard("output")
    assert _may_refuse(guard, "\x06", False)
    with pytest.raises(ValueError, match=r"(?i)token"):
        if api == "generate":
            guard.generate("\x06", max_new_tokens=2, chat=False)
        elif api == "stream":
            list(guard.stream("\x06", max_new_tokens=2, chat=False))
        else:
            guard.score(["\x06"], chat=False)


def test_every_special_token_as_text_is_scored_around(tok: Any) -> None:
    """All special tokens of the bundled tokenizer in one prompt: the text between them is still scored."""
    specials = _specials()
    count("prompts: hand-written", len(specials))
    prompt = " word ".join(specials) + " end"
    r = _guard("input").generate(prompt, max_new_tokens=2, chat=True)
    assert r.blocked and r.released_text == ""
    s = _guard("input").score([prompt], chat=False)[0]
    assert sorted(s.token_scores["r"]) == _scorable(prompt) and len(_scorable(prompt)) >= len(specials)


@pytest.mark.slow
def test_100k_character_prompt_is_scored(tok: Any) -> None:
    """A 100,000-character prompt (bundled tokenizer: ~17k tokens) is scored in full at prefill, then blocked."""
    count("prompts: hand-written")
    words = ["bread", "river", "über", "日本", "42", "Ω"]
    prompt = " ".join(words[i % len(words)] for i in range(30_000))[:100_000]
    assert len(prompt) == 100_000
    r = _guard("input").generate(prompt, max_new_tokens=1, chat=False)
    where = _scorable(prompt)
    assert len(where) > 10_000 and sorted(r.token_scores["r"]) == where
    assert r.blocked and r.decisions[0].position == where[0] and r.released_text == "" and r.output_ids == []


# -- CLI flags ---------------------------------------------------------------------------------------------------

COMMANDS = {
    "generate": ["PROMPT"], "validate": ["FILE"], "features": ["PROMPT"], "audit list": [], "audit show": ["ID"],
    "audit verify": [], "audit export": [], "eval": [], "calibrate": [], "export-onnx": [], "discover": [],
}
BAD_OPTIONS = st.sampled_from([
    ["--max-new-tokens", "0"], ["--max-new-tokens", "-3"], ["--max-new-tokens", "abc"], ["--max-new-tokens", "1e9"],
    ["--policy", "/nonexistent/p.yaml"], ["--policy", "POLICY_FILE"], ["--policy", ""], ["--model", "/nonexistent/m"],
    ["--score-mode", "fuzzy"], ["--sae", "/nonexistent/sae"], ["--sae", "GARBAGE_FILE"], ["--layer", "-1"],
    ["--layer", "x"], ["--k", "0"], ["--top", "0"], ["--top", "1000"], ["--db", "GARBAGE_FILE"],
    ["--db", "/nonexistent/dir/a.db"], ["--action", "explode"], ["--since", "yesterday-ish"],
    ["--data", "GARBAGE_FILE"],
    ["--data", "/nonexistent.jsonl"], ["--target-fpr", "2"], ["--target-fpr", "-0.1"], ["--limit", "-5"],
    ["--out", "/nonexistent/dir/x"], ["--opset", "-1"], ["--rule", "no-such-rule"], ["--bogus"], ["-Z"],
    ["--json", "x"],
])


@cache
def _cli_files(root: str) -> dict[str, str]:
    base = Path(root)
    base.mkdir(parents=True, exist_ok=True)
    garbage = base / "garbage.bin"
    garbage.write_bytes(bytes(range(256)) * 4)
    policy = base / "fuzz-policy.yaml"
    policy.write_text("name: [unclosed\nrules: {")
    return {"GARBAGE_FILE": str(garbage), "POLICY_FILE": str(policy)}


def _cli_args(command: str, options: list[list[str]], positional: str, files: dict[str, str]) -> list[str]:
    args = command.split()
    for p in COMMANDS[command]:
        args.append({"FILE": files["POLICY_FILE"], "ID": positional or "x"}.get(p, positional))
    for opt in options:
        args += [files.get(o, o) for o in opt]
    if "--model" in _options_of(command) and not any(o[0] in ("--model", "--bogus", "-Z") for o in options):
        args += ["--model", "/nonexistent/m"]  # a combination that happens to be valid must still fail fast
    return args


@cache
def _options_of(command: str) -> frozenset[str]:
    """The option names ``command`` accepts (so the fuzz appends only flags that parse and reaches the body)."""
    import typer.main

    from guardrails.cli.main import app

    cmd: Any = typer.main.get_command(app)
    for part in command.split():
        cmd = cmd.commands[part]
    return frozenset(o for p in cmd.params for o in getattr(p, "opts", []))


def test_cli_fuzz_reaches_command_bodies(tmp_path: Path) -> None:
    """Parseable but bad input gets the command's own error, not a usage message (the fuzz is not all parsing)."""
    from typer.testing import CliRunner

    from guardrails.cli.main import app

    files = _cli_files(str(tmp_path / "cli"))
    for args in (["audit", "list", "--db", files["GARBAGE_FILE"]], ["audit", "verify", "--db", files["GARBAGE_FILE"]],
                 ["validate", files["POLICY_FILE"]], ["generate", "hi", "--policy", files["POLICY_FILE"]]):
        res = CliRunner().invoke(app, args, env={"COLUMNS": "200", "HF_HUB_OFFLINE": "1"})
        out = res.output + (res.stderr if res.stderr_bytes is not None else "")
        assert res.exit_code in (1, 2) and "Usage:" not in out and "Traceback" not in out, (args, out)


@FAST
@given(st.sampled_from(sorted(COMMANDS)), st.lists(BAD_OPTIONS, min_size=1, max_size=3),
       st.text(st.characters(blacklist_categories=("Cs",)), max_size=12))
def test_cli_bad_flags_exit_2_or_1_with_an_error_and_no_traceback(
    tmp_path_factory: pytest.TempPathFactory, command: str, options: list[list[str]], positional: str
) -> None:
    from typer.testing import CliRunner

    from guardrails.cli.main import app

    count("cli: bad flags")
    files = _cli_files(str(tmp_path_factory.getbasetemp() / "cli"))
    args = _cli_args(command, options, positional, files)
    res = CliRunner().invoke(app, args, env={"COLUMNS": "200", "HF_HUB_OFFLINE": "1"})
    out = res.output + (res.stderr if res.stderr_bytes is not None else "")
    assert "Traceback" not in out, (args, out)
    assert res.exception is None or isinstance(res.exception, SystemExit), (args, repr(res.exception), out)
    assert res.exit_code in (1, 2), (args, res.exit_code, out)
    assert any(w in out.lower() for w in ("error", "invalid", "usage", "not found")), (args, out)
