"""Steering: add (or cap) a direction in the residual stream while the model runs, with no policy needed.

    import guardrails
    from guardrails import Steer

    with guardrails.steering(model, [Steer(12, direction=refusal, strength=0.25)], positions="generated"):
        model.generate(...)                                   # h' = h + 0.25 * ||h|| * d/||d|| at layer 12

A :class:`Steer` names a layer (or several), a direction (a tensor, a saved direction file, or an SAE
feature's decoder row via ``sae_feature=(sae, id)``) and a signed ``strength``: positive steers toward
the direction, negative away from it. ``relative_to="norm"`` (default) scales each token's shift by
that token's residual norm, so ``0.25`` means a quarter of the residual's length whatever the model;
``"absolute"`` adds ``strength`` residual-stream units. ``method="clamp"`` instead caps the projection
on the direction at ``strength`` (0: remove the positive part of it), which leaves tokens below the cap
untouched.

Positions (``positions=``) are counted per call of the model, from the attention mask and the cache
position, so they hold with ``model.generate`` (cached or not) and with our own decode loop:

- ``"prompt"``: the prompt's tokens (the first forward of a generation, the prefill);
- ``"generated"``: the columns whose output is a generated token, i.e. the last prompt token (it
  predicts the first generated token) and every generated token after it;
- ``"all"``: both.

Without a cache, a forward whose input extends the previous forward's input continues that generation.

Padding columns (attention mask 0) and each sequence's first token (position 0, the attention sink
whose residual norm is ~100x the others') are never steered; ``rows=`` limits steering to some rows.
The same primitives (:class:`SteerVector`, :func:`apply_steer`) serve policies' steer rules.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from guardrails.core.errors import GuardrailsError
from guardrails.engine.hooks import HookError, HookHandle, add_output_hooks, check_layer, decoder_layers

if TYPE_CHECKING:
    from guardrails.sae.model import SAE

Positions = Literal["all", "prompt", "generated"]
RelativeTo = Literal["norm", "absolute"]
Method = Literal["add", "clamp"]
POSITIONS: tuple[str, ...] = ("all", "prompt", "generated")
RELATIVE_TO: tuple[str, ...] = ("norm", "absolute")
METHODS: tuple[str, ...] = ("add", "clamp")


class SteeringError(GuardrailsError, ValueError):
    """A steering request is invalid (shape, layer, file, option); the message says where and what is valid."""


# -- primitives shared with policies ---------------------------------------------------------------------------
@dataclass(frozen=True)
class SteerVector:
    """One direction applied at one layer, ready for :func:`apply_steer`."""

    unit: Tensor
    """Unit direction ``[d_model]`` (float32)."""
    strength: float
    """Signed: ``add`` shifts by ``strength`` along ``unit``; ``clamp`` caps the projection at ``strength``."""
    relative_to: RelativeTo = "norm"
    """``norm``: ``strength`` is a multiple of each token's residual norm; ``absolute``: residual units."""
    method: Method = "add"
    """``add`` (h + s·u) or ``clamp`` (projection on u capped at s)."""
    label: str = ""
    """Where it came from (rule id, file, SAE feature), for errors and audits."""


def unit_direction(direction: Tensor, d_model: int | None = None, *, where: str = "direction") -> Tensor:
    """``direction / ||direction||`` as float32 ``[d_model]``, with a clear error for a bad vector."""
    if not isinstance(direction, Tensor):
        raise SteeringError(f"{where}: expected a tensor, got {type(direction).__name__}")
    d = direction.detach().float()
    if d.dim() == 2 and 1 in d.shape:  # [1, d] or [d, 1]
        d = d.flatten()
    if d.dim() != 1 or (d_model is not None and d.shape[0] != d_model):
        want = f"({d_model},)" if d_model is not None else "(d_model,)"
        raise SteeringError(f"{where}: shape {tuple(direction.shape)} does not fit the residual stream; valid: {want}")
    if not bool(torch.isfinite(d).all()):
        raise SteeringError(f"{where}: non-finite values (NaN/inf)")
    n = float(d.norm())
    if n == 0.0:
        raise SteeringError(f"{where}: the zero vector has no direction")
    return d / n


def load_direction(path: str | os.PathLike[str]) -> tuple[Tensor, dict[str, str]]:
    """Read a direction file (safetensors, tensor ``direction`` or ``weight``) and its metadata (layer...); a bare
    name that is no file here is a shipped direction (``refusal-l12``, ``french-l9``, ...)."""
    from safetensors import safe_open

    from guardrails._data import shipped_direction, shipped_directions

    p = Path(path)
    if not p.is_file():
        shipped = shipped_direction(str(path))
        if shipped is None:
            raise SteeringError(f"direction file {str(p)!r} not found; give a .safetensors file (guardrails "
                                f"direction writes one) or a shipped direction: {', '.join(shipped_directions())}")
        p = shipped
    try:
        with safe_open(str(p), framework="pt") as f:
            keys = list(f.keys())
            key = next((k for k in ("direction", "weight") if k in keys), None)
            if key is None:
                raise SteeringError(f"{p}: no tensor 'direction' (or 'weight'); found: {', '.join(keys) or 'none'}")
            return f.get_tensor(key).float(), dict(f.metadata() or {})
    except SteeringError:
        raise
    except Exception as exc:
        raise SteeringError(f"{p}: cannot read direction: {type(exc).__name__}: {exc}") from exc


def apply_steer(hidden: Tensor, vec: SteerVector, mask: Tensor | None = None) -> Tensor:
    """``hidden`` ``[B, T, d]`` steered by ``vec`` where ``mask`` ``[B, T]`` is true (everywhere if None)."""
    h = hidden.float()
    u = vec.unit.to(h.device)
    scale = h.norm(dim=-1, keepdim=True) if vec.relative_to == "norm" else torch.ones_like(h[..., :1])
    if vec.method == "add":
        delta = (vec.strength * scale) * u
    else:  # clamp: cap the projection on u at strength (x norm)
        proj = (h @ u)[..., None]
        delta = -torch.relu(proj - vec.strength * scale) * u
    if mask is not None:
        delta = delta * mask.to(h.device)[..., None].to(h.dtype)
    return (h + delta).to(hidden.dtype)


# -- the public API --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Steer:
    """Steer at ``layer`` (or each of several layers) along a direction or an SAE feature's decoder row."""

    layer: int | Sequence[int]
    """Decoder block(s) whose output (the residual stream after it) is steered."""
    direction: Tensor | str | os.PathLike[str] | None = None
    """A ``[d_model]`` tensor or a direction file (``guardrails direction`` writes them)."""
    sae_feature: tuple[SAE, int] | None = None
    """``(sae, feature_id)``: the feature's decoder direction, instead of ``direction``."""
    strength: float = 1.0
    """Signed: positive toward the direction, negative away (for ``clamp``: the cap)."""
    relative_to: RelativeTo = "norm"
    """``norm``: ``strength`` times each token's residual norm; ``absolute``: residual-stream units."""
    method: Method = "add"
    """``add``: h + strength·u; ``clamp``: cap the projection h·u at strength."""
    layers: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        layers = (self.layer,) if isinstance(self.layer, int) else tuple(self.layer)
        if not layers or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
            raise SteeringError(f"Steer.layer: expected an int or a list of ints, got {self.layer!r}")
        object.__setattr__(self, "layers", layers)
        if (self.direction is None) == (self.sae_feature is None):
            raise SteeringError("Steer: give exactly one of direction=... or sae_feature=(sae, feature_id)")
        if self.relative_to not in RELATIVE_TO:
            raise SteeringError(f"Steer.relative_to: {self.relative_to!r}; valid: {', '.join(RELATIVE_TO)}")
        if self.method not in METHODS:
            raise SteeringError(f"Steer.method: {self.method!r}; valid: {', '.join(METHODS)}")
        if not isinstance(self.strength, int | float) or self.strength != self.strength:
            raise SteeringError(f"Steer.strength: expected a number, got {self.strength!r}")

    def vector(self, d_model: int | None = None) -> SteerVector:
        """The unit direction and settings, checked against ``d_model``."""
        if self.sae_feature is not None:
            sae, fid = self.sae_feature
            sae.check_features([fid], where="Steer.sae_feature")
            raw, label = sae.W_dec.data[fid], f"sae feature {fid}"
        elif isinstance(self.direction, Tensor):
            raw, label = self.direction, "direction tensor"
        else:
            assert self.direction is not None
            raw, label = load_direction(self.direction)[0], str(self.direction)
        unit = unit_direction(raw, d_model, where=f"Steer({label})")
        return SteerVector(unit, float(self.strength), self.relative_to, self.method, label)


class SteeringHandle(HookHandle):
    """The hooks of one :func:`steering` call; ``remove()`` is idempotent, and it is a context manager."""

    def __init__(self, plan: dict[int, list[SteerVector]]) -> None:
        super().__init__()
        self.plan = plan
        """``{layer: [SteerVector, ...]}`` applied, in order, at each layer."""


@dataclass
class _CallState:
    """What the model-level pre-hook learned about the forward now running."""

    past: int = 0
    prompt_columns: int = 0
    attention_mask: Tensor | None = None
    last_ids: Tensor | None = None
    """Input ids of the last uncached forward: a longer input starting with them continues that generation."""


def steering(
    model: nn.Module,
    steers: Steer | Sequence[Steer],
    *,
    positions: Positions = "all",
    rows: Sequence[int] | None = None,
) -> SteeringHandle:
    """Install steering hooks on ``model``; returns a handle to ``remove()`` or to use as ``with`` block.

    ``rows``: batch rows to steer (default all). See the module docstring for ``positions``.
    """
    items = [steers] if isinstance(steers, Steer) else list(steers)
    if not items or not all(isinstance(s, Steer) for s in items):
        raise SteeringError("steering: expected a Steer or a non-empty list of Steer")
    if positions not in POSITIONS:
        raise SteeringError(f"steering: positions={positions!r}; valid: {', '.join(POSITIONS)}")
    row_set = None if rows is None else sorted({int(r) for r in rows})
    d_model = hidden_size(model)
    plan: dict[int, list[SteerVector]] = {}
    for i, s in enumerate(items):
        vec = s.vector(d_model)
        for layer in s.layers:
            try:
                check_layer(model, layer, where=f"steers[{i}].layer")
            except HookError as exc:
                raise SteeringError(str(exc)) from None
            plan.setdefault(layer, []).append(vec)
    state = _CallState()
    handle = SteeringHandle(plan)

    def pre(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        emb = kwargs.get("inputs_embeds")
        T = int(ids.shape[1]) if isinstance(ids, Tensor) else int(emb.shape[1]) if isinstance(emb, Tensor) else 0
        state.past = _past_length(kwargs)
        if state.past == 0:  # a new prompt, unless an uncached step re-feeds the last input plus new tokens
            last = state.last_ids
            cont = (isinstance(ids, Tensor) and last is not None and ids.shape[0] == last.shape[0]
                    and ids.shape[1] > last.shape[1] and bool((ids[:, : last.shape[1]] == last).all()))
            if not cont:
                state.prompt_columns = T
            state.last_ids = ids.detach().clone() if isinstance(ids, Tensor) else None
        mask = kwargs.get("attention_mask")
        state.attention_mask = mask if isinstance(mask, Tensor) and mask.dim() == 2 else None

    def make(layer: int) -> Any:
        vecs = plan[layer]

        def fn(_layer: int, hidden: Tensor) -> Tensor:
            m = _position_mask(state, hidden, positions, row_set)
            for v in vecs:
                hidden = apply_steer(hidden, v, m)
            return hidden

        return fn

    try:
        handle.add(model.register_forward_pre_hook(pre, with_kwargs=True))
        inner = add_output_hooks(model, {layer: make(layer) for layer in plan})
        handle._handles.extend(inner._handles)  # one handle owns every hook
        inner._handles.clear()
    except BaseException:
        handle.remove()
        raise
    return handle


def _position_mask(state: _CallState, hidden: Tensor, positions: str, rows: list[int] | None) -> Tensor:
    B, T = hidden.shape[:2]
    dev = hidden.device
    col = state.past + torch.arange(T, device=dev)
    mask = state.attention_mask
    if mask is not None and mask.shape[0] == B and mask.shape[1] >= T:
        full = mask.to(dev).long()
        real = full[:, -T:].bool()
        pos = (full.cumsum(1) - 1)[:, -T:]  # each row's own token position (left padding)
    else:
        real = torch.ones(B, T, dtype=torch.bool, device=dev)
        pos = col[None, :].expand(B, T)
    m = real & (pos > 0)  # position 0 is the attention sink (norm ~100x the others): never steered
    if positions == "generated":  # the last prompt column predicts the first generated token
        m &= (col >= state.prompt_columns - 1)[None, :]
    elif positions == "prompt":
        m &= (col < state.prompt_columns)[None, :]
    if rows is not None:
        bad = [r for r in rows if not 0 <= r < B]
        if bad:
            raise SteeringError(f"steering rows={bad} out of range for a batch of {B}; valid: 0..{B - 1}")
        sel = torch.zeros(B, dtype=torch.bool, device=dev)
        sel[torch.tensor(rows, dtype=torch.long, device=dev)] = True
        m &= sel[:, None]
    return m


def _past_length(kwargs: dict[str, Any]) -> int:
    cp = kwargs.get("cache_position")
    if isinstance(cp, Tensor) and cp.numel():
        return int(cp.flatten()[0])
    for key in ("past_key_values", "cache"):
        cache = kwargs.get(key)
        if cache is None:
            continue
        get = getattr(cache, "get_seq_length", None)
        if callable(get):
            return int(get())
        if isinstance(cache, tuple | list) and cache and isinstance(cache[0], tuple | list) and cache[0]:
            return int(cache[0][0].shape[-2])
    return 0


def hidden_size(model: nn.Module) -> int | None:
    """The model's residual width from its config (a multimodal config's text part), None when it has none."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    size = getattr(cfg, "hidden_size", None)
    if size is None and hasattr(cfg, "get_text_config"):
        size = getattr(cfg.get_text_config(), "hidden_size", None)
    if size is None:
        decoder_layers(model)  # a clear HookError for an unknown layout
    return int(size) if size else None


__all__ = [
    "METHODS",
    "POSITIONS",
    "RELATIVE_TO",
    "Steer",
    "SteerVector",
    "SteeringError",
    "SteeringHandle",
    "apply_steer",
    "load_direction",
    "steering",
    "unit_direction",
]
