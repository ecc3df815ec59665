"""Faults during generation: the policy's on_error decides, the decision is recorded with its reason, no hook
is left, and the model's next plain call gives exactly the logits it gave before it was ever wrapped.

Faults: NaN / inf activations written by a hook registered before the guard's on the watched layer, a
detector that raises (``LayerScorer.rule_scores``), an SAE on the wrong device (``meta`` tensors: the
only wrong device a CPU machine has), a KeyboardInterrupt raised from a hook mid-generation, and a
stream the caller abandons or closes midway. The rule counts scored tokens (feature weight 0, bias 1),
so with the threshold out of reach every decision in a run comes from the fault.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from guardrails import GenerationResult, GuardedModel, Policy
from guardrails.audit.store import AuditStore
from guardrails.engine.hooks import decoder_layers, hidden_of, hooks_on, replace_hidden
from guardrails.engine.scorers import LayerScorer
from tests._counts import count
from tests.builders import random_sae

LAYER, NEW, REFUSAL = 1, 6, "Refused by the guard."
PROMPT = "Tell me a story"


def policy(on_error: str, *, mode: str = "exact") -> Policy:
    return Policy.from_yaml(f"""
name: faults
refusal: {REFUSAL}
on_error: {on_error}
score_mode: {mode}
saes: {{s: {{path: unused, layer: {LAYER}}}}}
rules:
  - id: r
    scope: output
    threshold: 1.0e9
    detector: {{sae: s, features: [{{id: 0, weight: 0.0}}, 3], bias: 1.0}}
""")


def one(r: GenerationResult | list[GenerationResult]) -> GenerationResult:
    assert isinstance(r, GenerationResult)
    return r


def greedy(model: Any, tok: Any, prompt: str = PROMPT) -> list[int]:
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=NEW, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
    return out[: out.index(tok.eos_token_id)] if tok.eos_token_id in out else out


@pytest.fixture
def plain(lm: Any, tok: Any) -> Iterator[tuple[Any, Callable[[], torch.Tensor]]]:
    """The model, and a function giving its plain logits on PROMPT; checks at teardown that nothing changed."""
    model = lm("llama")
    ids = tok(PROMPT, return_tensors="pt", add_special_tokens=False).input_ids

    def logits() -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=ids).logits

    before = logits()
    yield model, logits
    assert hooks_on(model) == 0
    assert torch.equal(logits(), before), "the model does not give its unguarded logits after the fault"


@pytest.fixture
def decode_fault(plain: Any) -> Iterator[Callable[[float], None]]:
    """``set_value(v)``: from now on, write ``v`` into the watched layer's output on decode steps (length 1)."""
    model, _ = plain
    state: dict[str, float | None] = {"value": None}

    def hook(_m: Any, _i: Any, output: Any) -> Any:
        h = hidden_of(output)
        if state["value"] is None or h.shape[1] != 1:
            return None
        return replace_hidden(output, torch.full_like(h, state["value"]))

    handle = decoder_layers(model)[LAYER].register_forward_hook(hook)  # before the guard's own hooks
    try:
        yield lambda v: state.__setitem__("value", v)
    finally:
        handle.remove()


def _raise_in_detector(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(self: LayerScorer, feats: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("detector exploded")

    monkeypatch.setattr(LayerScorer, "rule_scores", boom)


def _check_decided(r: GenerationResult, on_error: str, reason: str) -> None:
    errors = [d for d in r.decisions if d.action == "error"]
    assert errors and errors == r.decisions, r.decisions  # every decision comes from the fault
    assert all(d.resolution == on_error and d.reason and reason in d.reason for d in errors), errors
    assert errors[0].scope == "output" and errors[0].output_index == 0 and r.errors
    if on_error == "block":
        assert r.blocked and r.text == REFUSAL and r.released_text == "" and r.output_ids == []
        assert len(errors) == 1
    else:
        assert not r.blocked and r.text == r.released_text


ON_ERROR = ["block", "flag", "allow"]


@pytest.mark.parametrize("on_error", ON_ERROR)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_activations(plain: Any, decode_fault: Any, tok: Any, on_error: str, value: float) -> None:
    count("faults: non-finite activations")
    model, _ = plain
    guard = GuardedModel(model, tok, policy(on_error), saes={"s": random_sae()})
    decode_fault(value)
    r = one(guard.generate(PROMPT, max_new_tokens=NEW, chat=False))
    _check_decided(r, on_error, "non-finite")
    assert hooks_on(model) == 0


@pytest.mark.parametrize("mode", ["exact", "watched"])
@pytest.mark.parametrize("on_error", ON_ERROR)
def test_detector_raises(plain: Any, tok: Any, monkeypatch: pytest.MonkeyPatch, on_error: str, mode: str) -> None:
    count("faults: detector raises")
    model, _ = plain
    expected = greedy(model, tok)
    guard = GuardedModel(model, tok, policy(on_error, mode=mode), saes={"s": random_sae()})
    _raise_in_detector(monkeypatch)
    r = one(guard.generate(PROMPT, max_new_tokens=NEW, chat=False))
    _check_decided(r, on_error, "detector exploded")
    if on_error != "block":  # the fault is in the guard only: the output is the unguarded one, every token errs
        assert r.output_ids == expected
        assert len(r.decisions) == len(expected) + (len(expected) < NEW)  # + the eos step


@pytest.mark.parametrize("on_error", ON_ERROR)
def test_sae_on_the_wrong_device(plain: Any, tok: Any, on_error: str) -> None:
    count("faults: SAE on the wrong device")
    model, _ = plain
    expected = greedy(model, tok)
    sae = random_sae()
    guard = GuardedModel(model, tok, policy(on_error), saes={"s": sae})
    sae.to("meta")  # the weights leave the device the layer runs on
    r = one(guard.generate(PROMPT, max_new_tokens=NEW, chat=False))
    _check_decided(r, on_error, "device")
    if on_error != "block":
        assert r.output_ids == expected


@pytest.mark.parametrize("on_error", ["block", "flag"])
def test_fault_decisions_reach_the_audit_store(plain: Any, tok: Any, monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path, on_error: str) -> None:
    count("faults: detector raises (audited)")
    model, _ = plain
    store = AuditStore(tmp_path / "audit.db")
    guard = GuardedModel(model, tok, policy(on_error), saes={"s": random_sae()}, audit=store)
    _raise_in_detector(monkeypatch)
    r = one(guard.generate(PROMPT, max_new_tokens=NEW, chat=False))
    rec = store.get(1)
    assert store.count() == 1 and store.verify().ok
    assert rec.data["blocked"] == r.blocked == (on_error == "block")
    errs = [d for d in rec.data["decisions"] if d["action"] == "error"]
    assert errs and all(d["resolution"] == on_error and "detector exploded" in d["reason"] for d in errs)
    assert rec.data["output"]["released"]["text"] == r.released_text
    store.close()


def _interrupt_on_call(model: Any, n: int) -> Any:
    """A hook on lm_head raising KeyboardInterrupt on its ``n``-th call (the caller pressing Ctrl-C)."""
    calls = {"n": 0}

    def hook(*_: Any) -> None:
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt

    return model.lm_head.register_forward_hook(hook)


@pytest.mark.parametrize("at", [1, 2, 4])
@pytest.mark.parametrize("api", ["generate", "stream", "score-then-generate"])
def test_keyboard_interrupt_from_a_hook(plain: Any, tok: Any, api: str, at: int) -> None:
    count("faults: KeyboardInterrupt in a hook")
    model, _ = plain
    guard = GuardedModel(model, tok, policy("block"), saes={"s": random_sae()})
    handle = _interrupt_on_call(model, at)
    try:
        with pytest.raises(KeyboardInterrupt):
            if api == "stream":
                list(guard.stream(PROMPT, max_new_tokens=NEW, chat=False))
            else:
                if api == "score-then-generate":
                    guard.score([PROMPT], chat=False)  # stops before lm_head: not interrupted
                guard.generate(PROMPT, max_new_tokens=NEW, chat=False)
        assert hooks_on(model) == 0
    finally:
        handle.remove()
    assert one(guard.generate(PROMPT, max_new_tokens=NEW, chat=False)).output_ids == greedy(model, tok)


@pytest.mark.parametrize("after", [0, 1, 3])
@pytest.mark.parametrize("how", ["close", "abandon", "interrupt-consumer"])
def test_stream_stopped_by_the_caller(plain: Any, tok: Any, how: str, after: int) -> None:
    """Closing, abandoning, or raising in the consumer midway: no hook stays, other calls are unaffected."""
    count("faults: stream stopped by the caller")
    model, logits = plain
    guard = GuardedModel(model, tok, policy("block"), saes={"s": random_sae()})
    expected = greedy(model, tok)
    stream = guard.stream(PROMPT, max_new_tokens=NEW, chat=False)
    it = iter(stream)
    shown = [next(it) for _ in range(after)]
    if how == "interrupt-consumer":
        with pytest.raises(KeyboardInterrupt):
            for _piece in it:
                raise KeyboardInterrupt
    # suspended (not closed): hooks exist only inside a forward step, so none is left and others run plain
    assert hooks_on(model) == 0
    assert one(guard.generate(PROMPT, max_new_tokens=NEW, chat=False)).output_ids == expected
    if how == "close":
        stream.close()
        assert stream.result is None  # nothing was decided about an output the caller stopped
    elif how == "abandon":
        del it, stream
    assert "".join(shown) == tok.decode(expected, skip_special_tokens=True)[: len("".join(shown))]
    assert hooks_on(model) == 0
    _ = logits  # the fixture checks the logits at teardown


def test_sae_without_data_is_refused_when_the_guard_is_built(lm: Any, tok: Any) -> None:
    from guardrails import SAEError

    count("faults: SAE on the wrong device")
    with pytest.raises(SAEError, match="meta"):
        GuardedModel(lm("llama"), tok, policy("block"), saes={"s": random_sae().to("meta")})
