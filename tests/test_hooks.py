"""Decoder layers of each architecture, capture/steer/stop hooks, and hooks that always come off."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from guardrails.engine.hooks import (
    HookError,
    HookHandle,
    StopForward,
    add_output_hooks,
    capture,
    check_layer,
    decoder_layers,
    hooks_on,
    output_hooks,
    steering_hook,
    stop_after_layer,
)
from tests.builders import tiny_model, tiny_qwen3_5_multimodal

ARCHS = ["llama", "qwen3", "qwen3_moe", "qwen3_5", "qwen3_5_moe"]
N_LAYERS = 4


@pytest.fixture(scope="module")
def models() -> dict[str, Any]:
    out = {arch: tiny_model(arch, layers=N_LAYERS) for arch in ARCHS}
    out["qwen3_5_multimodal"] = tiny_qwen3_5_multimodal(layers=N_LAYERS)
    return out


def _text_model(model: Any) -> Any:
    """The module holding ``layers`` and ``norm`` (``model.model`` or ``model.model.language_model``)."""
    inner = model.model
    return getattr(inner, "language_model", inner)


def _ids(seed: int = 0, batch: int = 2, seq: int = 7) -> torch.Tensor:
    return torch.randint(3, 500, (batch, seq), generator=torch.Generator().manual_seed(seed))


ALL = [*ARCHS, "qwen3_5_multimodal"]


@pytest.mark.parametrize("arch", ALL)
def test_decoder_layers_path(models: dict[str, Any], arch: str) -> None:
    model = models[arch]
    layers = decoder_layers(model)
    assert layers is _text_model(model).layers
    assert len(layers) == N_LAYERS
    if arch == "qwen3_5_multimodal":
        assert layers is model.model.language_model.layers
    assert check_layer(model, 2) is layers[2]


@pytest.mark.parametrize("arch", ALL)
def test_capture_equals_hidden_states(models: dict[str, Any], arch: str) -> None:
    model = models[arch]
    ids = _ids()
    with torch.no_grad():
        ref = model(input_ids=ids, output_hidden_states=True).hidden_states
        with capture(model, list(range(N_LAYERS))) as store:
            model(input_ids=ids)
    assert hooks_on(model) == 0
    # hidden_states[0] is the embedding; hidden_states[n + 1] the output of block n ...
    for n in range(N_LAYERS - 1):
        torch.testing.assert_close(store[n], ref[n + 1], rtol=0, atol=0)
    # ... except the last, which transformers reports after the final norm
    with torch.no_grad():
        torch.testing.assert_close(_text_model(model).norm(store[N_LAYERS - 1]), ref[N_LAYERS])


def test_unknown_model_and_layer_out_of_range(models: dict[str, Any]) -> None:
    with pytest.raises(HookError, match=r"cannot find the decoder layers.*model\.layers.*supported.*qwen3_5"):
        decoder_layers(nn.Linear(3, 3))
    with pytest.raises(HookError, match=r"layer 4 out of range; valid: 0\.\.3 \(4 layers\)"):
        check_layer(models["qwen3"], 4)
    with pytest.raises(HookError, match=r"layer -1 out of range"):
        check_layer(models["qwen3"], -1)


# -- a toy model whose blocks return a tensor or a tuple ---------------------------------------------------


class _Block(nn.Module):
    def __init__(self, d: int, as_tuple: bool) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.as_tuple = as_tuple

    def forward(self, h: torch.Tensor) -> Any:
        out = h + torch.tanh(self.lin(h))
        return (out, "extra") if self.as_tuple else out


class _Toy(nn.Module):
    def __init__(self, as_tuple: bool, d: int = 8, n: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(_Block(d, as_tuple) for _ in range(n))

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, list[Any]]:
        seen = []
        for block in self.layers:
            out = block(h)
            seen.append(out)
            h = out[0] if isinstance(out, tuple) else out
        return h, seen


@pytest.mark.parametrize("as_tuple", [False, True])
def test_tensor_or_tuple_block_outputs(as_tuple: bool) -> None:
    toy = _Toy(as_tuple)
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        base, _ = toy(x)
        h1 = toy.layers[1](toy.layers[0](x)[0] if as_tuple else toy.layers[0](x))
        h1 = h1[0] if as_tuple else h1
        with capture(toy, [1]) as store:
            toy(x)
        torch.testing.assert_close(store[1], h1)

        d = torch.randn(8)
        with output_hooks(toy, {1: steering_hook(d, 2.0)}):
            steered, seen = toy(x)
        out1 = seen[1]
        # the container type is kept (tuple stays a tuple with its extra items)
        assert isinstance(out1, tuple) == as_tuple
        if as_tuple:
            assert out1[1] == "extra"
        torch.testing.assert_close(out1[0] if as_tuple else out1, h1 + 2.0 * d)
        expected = toy.layers[2](h1 + 2.0 * d)
        torch.testing.assert_close(steered, expected[0] if as_tuple else expected)
    assert hooks_on(toy) == 0
    torch.testing.assert_close(toy(x)[0], base)


def test_steering_mask_only_touches_masked_positions() -> None:
    toy = _Toy(False)
    x = torch.randn(2, 4, 8)
    mask = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 1]], dtype=torch.bool)
    d = torch.randn(8)
    with torch.no_grad(), capture(toy, [0]) as plain:
        toy(x)
    with torch.no_grad(), output_hooks(toy, {0: steering_hook(d, -3.0, mask)}), capture(toy, [0]) as store:
        toy(x)
    expected = plain[0] - 3.0 * mask[..., None].float() * d
    torch.testing.assert_close(store[0], expected)


# -- removal ---------------------------------------------------------------------------------------------


class _Boom(RuntimeError):
    pass


def _raiser(_layer: int, _hidden: torch.Tensor) -> None:
    raise _Boom("inside a hook")


@pytest.mark.parametrize("arch", ["llama", "qwen3_5"])
def test_hooks_removed_after_exception_inside_a_hook(models: dict[str, Any], arch: str) -> None:
    model = models[arch]
    ids = _ids(1)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with pytest.raises(_Boom), capture(model, [0, 3]), output_hooks(model, {2: _raiser}):
            model(input_ids=ids)
        assert hooks_on(model) == 0
        after = model(input_ids=ids).logits
    assert torch.equal(after, before)


def test_hooks_removed_after_exception_in_caller(models: dict[str, Any]) -> None:
    model = models["qwen3"]
    d = torch.ones(64)
    with pytest.raises(KeyError), output_hooks(model, {1: steering_hook(d, 5.0)}):
        assert hooks_on(model) == 1
        raise KeyError("caller failed")
    assert hooks_on(model) == 0


def test_add_output_hooks_unwinds_when_a_later_layer_is_invalid(models: dict[str, Any]) -> None:
    model = models["qwen3"]
    noop: Callable[[int, torch.Tensor], None] = lambda _l, _h: None  # noqa: E731
    with pytest.raises(HookError, match="layer 9 out of range"):
        add_output_hooks(model, {0: noop, 1: noop, 9: noop})
    assert hooks_on(model) == 0


def test_hook_handle_remove_is_idempotent(models: dict[str, Any]) -> None:
    model = models["llama"]
    handle = add_output_hooks(model, {0: lambda _l, _h: None, 3: lambda _l, _h: None})
    assert isinstance(handle, HookHandle) and handle.active and hooks_on(model) == 2
    handle.remove()
    assert hooks_on(model) == 0 and not handle.active
    handle.remove()  # second call: no error, nothing else removed
    assert hooks_on(model) == 0
    # a handle does not remove hooks it does not own
    other = add_output_hooks(model, {1: lambda _l, _h: None})
    handle.remove()
    assert hooks_on(model) == 1
    other.remove()
    assert hooks_on(model) == 0


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_5_multimodal"])
def test_stop_after_layer(models: dict[str, Any], arch: str) -> None:
    model = models[arch]
    ids = _ids(2)
    calls: list[int] = []
    with torch.no_grad():
        ref = model(input_ids=ids, output_hidden_states=True).hidden_states
        with capture(model, [1]) as store, output_hooks(model, {2: lambda n, _h: calls.append(n)}):
            with stop_after_layer(model, 1), pytest.raises(StopForward):
                model(input_ids=ids)
            assert calls == []  # block 2 never ran
    torch.testing.assert_close(store[1], ref[2])
    assert hooks_on(model) == 0


def test_hooks_on_counts_only_this_librarys_hooks(models: dict[str, Any]) -> None:
    model = models["qwen3_moe"]
    foreign = decoder_layers(model)[0].register_forward_hook(lambda *_: None)
    try:
        with torch.no_grad():
            model(input_ids=_ids(), output_hidden_states=True)  # transformers adds its own capture hooks
        assert hooks_on(model) == 0
        with capture(model, [0, 2]):
            assert hooks_on(model) == 2
        assert hooks_on(model) == 0
    finally:
        foreign.remove()


def test_hooks_removed_when_an_abandoned_generator_is_garbage_collected(models: dict[str, Any]) -> None:
    """A suspended generator in a reference cycle (like a stream dropped midway) is freed by the cyclic
    collector, which clears weak references held by the garbage before finalizers run."""
    import gc

    model = models["llama"]

    class Holder:
        it: Any = None

    def steps(_holder: Holder) -> Any:
        with output_hooks(model, {0: lambda _l, _h: None, 2: lambda _l, _h: None}):
            yield 1
            yield 2

    holder = Holder()
    holder.it = steps(holder)  # cycle: holder -> generator -> frame -> holder
    next(holder.it)
    assert hooks_on(model) == 2
    del holder
    gc.collect()
    assert hooks_on(model) == 0
