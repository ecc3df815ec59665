"""Find the decoder layers of a model; install capture, steering and stop hooks that always come off.

Every installer returns a :class:`HookHandle` whose ``remove()`` is idempotent, and each has a context
manager that registers inside ``try`` and removes in ``finally``: after any exception the model
behaves exactly as if it had never been hooked.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from guardrails.core.errors import GuardrailsError

# Attribute paths, tried in order, from the loaded object to its list of decoder blocks.
LAYER_PATHS: tuple[str, ...] = (
    "model.language_model.layers",  # Qwen3.5 / Qwen3-VL multimodal classes
    "model.layers",  # Llama, Qwen2/3, Qwen3-MoE, Qwen3.5 text classes, Mistral, Gemma
    "language_model.model.layers",
    "language_model.layers",
    "transformer.h",  # GPT-2 style
    "gpt_neox.layers",
    "layers",
)

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "qwen3_moe", "qwen3_5", "qwen3_5_text", "qwen3_5_moe")


class HookError(GuardrailsError, RuntimeError):
    """A hook could not be placed (unknown model layout, layer out of range)."""


class StopForward(Exception):  # control flow, not an error
    """Raised by a stop hook to end a forward pass after the deepest layer a guard needs."""


def _get_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder blocks (Llama, Qwen3, Qwen3-MoE, Qwen3.5, Qwen3.5-MoE, ...)."""
    for path in LAYER_PATHS:
        try:
            layers = _get_path(model, path)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
    kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    raise HookError(
        f"cannot find the decoder layers of a {kind!r} model; looked at {', '.join(LAYER_PATHS)}; "
        f"supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def check_layer(model: nn.Module, layer: int, *, where: str = "layer") -> nn.Module:
    """The block ``layer`` of ``model``, or a :class:`HookError` naming the valid range."""
    layers = decoder_layers(model)
    if not isinstance(layer, int) or not 0 <= layer < len(layers):
        raise HookError(f"{where}: layer {layer!r} out of range; valid: 0..{len(layers) - 1} ({len(layers)} layers)")
    return layers[layer]


def hidden_of(output: Any) -> Tensor:
    """The hidden-state tensor of a decoder block's output (a tensor or a tuple starting with one)."""
    return output[0] if isinstance(output, tuple) else output


def replace_hidden(output: Any, hidden: Tensor) -> Any:
    """``output`` with its hidden state replaced, in the same container type."""
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    return hidden


class HookHandle:
    """A group of registered hooks; ``remove()`` can be called any number of times.

    The hook dictionaries are held strongly: torch's ``RemovableHandle`` only keeps a weak reference,
    and the garbage collector clears weak references held by unreachable objects before it runs
    their finalizers, so a handle collected with an abandoned generator (a stream dropped midway)
    would otherwise fail to remove its hooks.
    """

    def __init__(self) -> None:
        self._handles: list[tuple[Any, list[dict[Any, Any]]]] = []

    def add(self, handle: Any) -> None:
        refs = [handle.hooks_dict_ref] if hasattr(handle, "hooks_dict_ref") else []
        refs += list(getattr(handle, "extra_dict_ref", ()))
        self._handles.append((handle, [d for d in (r() for r in refs) if d is not None]))

    def remove(self) -> None:
        while self._handles:
            handle, dicts = self._handles.pop()
            handle.remove()
            hook_id = getattr(handle, "id", None)
            for d in dicts:
                d.pop(hook_id, None)

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> HookHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


OutputHook = Callable[[int, Tensor], Tensor | None]
"""``fn(layer, hidden) -> new hidden or None``; called with the block's output hidden state."""


def add_output_hooks(
    model: nn.Module, hooks: dict[int, OutputHook], blocks: dict[int, nn.Module] | None = None
) -> HookHandle:
    """Register ``hooks[layer]`` on the output of each listed block; returns one handle for all.

    ``blocks`` (``{layer: module}``, from :func:`check_layer`) skips the layer lookup on hot paths.
    """
    handle = HookHandle()
    try:
        for layer, fn in hooks.items():
            block = blocks[layer] if blocks is not None and layer in blocks else check_layer(model, layer)
            handle.add(block.register_forward_hook(_wrap(layer, fn)))
    except BaseException:
        handle.remove()
        raise
    return handle


def _wrap(layer: int, fn: OutputHook) -> Callable[[nn.Module, Any, Any], Any]:
    def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
        new = fn(layer, hidden_of(output))
        return None if new is None else replace_hidden(output, new)

    hook._guardrails_hook = True  # type: ignore[attr-defined]  # lets hooks_on() tell ours from others
    return hook


@contextmanager
def output_hooks(
    model: nn.Module, hooks: dict[int, OutputHook], blocks: dict[int, nn.Module] | None = None
) -> Iterator[HookHandle]:
    """Context manager around :func:`add_output_hooks`; hooks are removed on exit, also on error."""
    handle = HookHandle()
    try:
        handle = add_output_hooks(model, hooks, blocks)
        yield handle
    finally:
        handle.remove()


@contextmanager
def capture(model: nn.Module, layers: list[int]) -> Iterator[dict[int, Tensor]]:
    """Record the residual stream after each block in ``layers``: ``{layer: [batch, seq, d_model]}``."""
    store: dict[int, Tensor] = {}

    def record(layer: int, hidden: Tensor) -> None:
        store[layer] = hidden.detach()

    with output_hooks(model, {layer: record for layer in layers}):
        yield store


def steering_hook(direction: Tensor, alpha: float, mask: Tensor | None = None) -> OutputHook:
    """A hook adding ``alpha * direction`` to the hidden state (where ``mask`` [batch, seq] is true)."""

    def fn(_layer: int, hidden: Tensor) -> Tensor:
        d = direction.to(hidden.device, hidden.dtype)
        if mask is None:
            return hidden + alpha * d
        m = mask.to(hidden.device)[..., -hidden.shape[1] :, None].to(hidden.dtype)
        return hidden + alpha * m * d

    return fn


@contextmanager
def stop_after_layer(model: nn.Module, layer: int, block: nn.Module | None = None) -> Iterator[None]:
    """Raise :class:`StopForward` after block ``layer`` runs, so callers skip the rest of the model.

    Catch :class:`StopForward` around the forward call; hooks registered on the same block before
    this one still run first.
    """

    def stop(_layer: int, _hidden: Tensor) -> None:
        raise StopForward

    with output_hooks(model, {layer: stop}, {layer: block} if block is not None else None):
        yield


def hooks_on(model: nn.Module) -> int:
    """Number of this library's hooks currently registered on the model's decoder blocks (tests, audits).

    Hooks placed by others are not counted: transformers itself keeps output-capturing hooks on the
    blocks once a model has been called with ``output_hidden_states=True``.
    """
    return sum(
        1
        for block in decoder_layers(model)
        for fn in (*block._forward_hooks.values(), *block._forward_pre_hooks.values())
        if getattr(fn, "_guardrails_hook", False)
    )


__all__ = [
    "HookError",
    "HookHandle",
    "StopForward",
    "add_output_hooks",
    "capture",
    "check_layer",
    "decoder_layers",
    "hidden_of",
    "hooks_on",
    "output_hooks",
    "replace_hidden",
    "steering_hook",
    "stop_after_layer",
    "torch",
]
