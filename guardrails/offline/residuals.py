"""Residual rows for calibration and evaluation, cached on disk.

:func:`residuals_at` runs the model over a labeled file (chat formatting and scored positions as
``GuardedModel`` uses them, via :func:`guardrails.offline.activations.collect_residuals`) and keeps, per
row, the residuals of the tokens rules of a scope score. Each layer is cached under a key of the data
file's sha256, the model, the layer, the scope, the chat flag and the weights' dtype, so recalibrating is
instant; layers not cached yet come from one forward pass.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from guardrails.offline.activations import PromptLike
    from guardrails.offline.calibrate import LabeledData, Scope

logger = logging.getLogger(__name__)


def cache_root() -> Path:
    from guardrails.serving.models import cache_dir

    return cache_dir() / "activations"


def cache_path(data_sha256: str, model_name: str, layer: int, scope: str, chat: bool, dtype: str) -> Path:
    """Where :func:`residuals_at` caches one layer's rows (``dtype``: the weights', e.g. ``"float32"``)."""
    from guardrails.offline.calibrate import MAX_TOKENS

    key = [data_sha256, model_name, layer, scope, chat, dtype, MAX_TOKENS, "v2-no-system"]
    return cache_root() / f"{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:24]}.safetensors"


class ResidualRows(list[Tensor]):
    """Per-row residuals ``[n_scored_i, d_model]``, with each scored token's position in its sequence.

    Positions matter for windows: in a prefill the engine's window spans positions, so an unscored
    token (a special token, a prompt token for an output rule) inside a window leaves a gap.
    """

    positions: list[list[int]] | None = None

    def take(self, idx: Sequence[int] | np.ndarray) -> ResidualRows:
        """The rows at ``idx``, positions kept."""
        out = ResidualRows(self[int(i)] for i in idx)
        out.positions = [self.positions[int(i)] for i in idx] if self.positions is not None else None
        return out


def scored_positions(tokenizer: Any, prompts: Sequence[PromptLike], responses: Sequence[str] | None, scope: Scope,
                     chat: bool = True) -> list[list[int]]:
    """Positions collect_residuals keeps per row (not 0, not special, in scope), by tokenizing alone."""
    from guardrails.offline.activations import scored_rows
    from guardrails.offline.calibrate import MAX_TOKENS

    sc: Literal["input", "output"] = "output" if scope == "output" else "input"
    return [pos for _, pos in scored_rows(tokenizer, prompts, responses, sc, chat=chat, max_tokens=MAX_TOKENS)]


def residuals(
    model: Any, tokenizer: Any, data: LabeledData, layer: int, scope: Scope, *, model_name: str,
    chat: bool = True, progress: bool = True, use_cache: bool = True, batch_size: int = 8,
) -> ResidualRows:
    """Per-row residuals ``[n_scored_i, d_model]`` at ``layer`` over the tokens ``scope`` rules score."""
    return residuals_at(model, tokenizer, data, [layer], scope, model_name=model_name, chat=chat, progress=progress,
                        use_cache=use_cache, batch_size=batch_size)[layer]


def residuals_at(
    model: Any, tokenizer: Any, data: LabeledData, layers: Sequence[int], scope: Scope, *, model_name: str,
    chat: bool = True, progress: bool = True, use_cache: bool = True, batch_size: int = 8,
) -> dict[int, ResidualRows]:
    """:func:`residuals` at several layers: the layers not cached yet are collected in one forward pass
    (cached per layer, so a later call for any one of them is a cache hit)."""
    from safetensors.torch import load_file, save_file

    from guardrails.offline.calibrate import rows_for_scope

    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    wanted = list(dict.fromkeys(layers))
    paths = {layer: cache_path(data.sha256, model_name, layer, scope, chat, dtype) for layer in wanted}
    prompts, responses = rows_for_scope(data, scope)
    got: dict[int, list[Tensor]] = {}
    for layer, path in paths.items():
        if use_cache and path.is_file():
            t = load_file(str(path))
            x, offsets = t["x"], t["offsets"].tolist()
            got[layer] = [x[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
    missing = [layer for layer in wanted if layer not in got]
    if missing:
        got.update(collect_sorted(model, tokenizer, prompts, responses, missing, scope, chat, progress, batch_size))
    for layer in missing if use_cache else []:
        path = paths[layer]
        path.parent.mkdir(parents=True, exist_ok=True)
        ends = np.cumsum([0] + [len(r) for r in got[layer]])
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({"x": torch.cat(list(got[layer])).contiguous(), "offsets": torch.tensor(ends)}, str(tmp),
                  metadata={"data": data.path, "model": model_name, "layer": str(layer), "scope": scope})
        tmp.replace(path)
    pos = scored_positions(tokenizer, prompts, responses, scope, chat)
    out: dict[int, ResidualRows] = {}
    for layer in wanted:
        res = out[layer] = ResidualRows(got[layer])
        if [len(p) for p in pos] == [len(r) for r in res]:
            res.positions = pos
        else:
            logger.warning("scored positions do not match the cached residuals of %s; windows assume no gaps",
                           data.path)
    return out


def collect_sorted(
    model: Any, tokenizer: Any, prompts: Sequence[PromptLike], responses: list[str] | None, layers: Sequence[int],
    scope: Scope, chat: bool, progress: bool, batch_size: int,
) -> dict[int, list[Tensor]]:
    """collect_residuals over rows sorted by length (less padding), returned in the original order."""
    from guardrails.offline.activations import collect_residuals
    from guardrails.offline.calibrate import MAX_TOKENS

    lengths = [(len(p) if isinstance(p, str) else sum(len(m["content"]) for m in p))
               + len(responses[i] if responses else "") for i, p in enumerate(prompts)]
    order = np.argsort(lengths, kind="stable")
    got = collect_residuals(
        model, tokenizer, [prompts[i] for i in order], list(layers),
        responses=[responses[i] for i in order] if responses is not None else None,
        chat=chat, scope=scope, batch_size=batch_size, max_tokens=MAX_TOKENS, progress=progress,
    )
    out: dict[int, list[Tensor]] = {}
    for layer in layers:
        rows: list[Tensor] = [torch.empty(0)] * len(prompts)
        for pos, i in enumerate(order):
            rows[int(i)] = got[layer][pos]
        out[layer] = rows
    return out
