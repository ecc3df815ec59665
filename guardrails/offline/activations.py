"""Residual-stream activations of labeled texts at the positions a guard scores.

The same positions as serving: prompts go through the chat template (as ``GuardedModel`` does),
position 0 (the attention sink), special tokens and the template's default system turn (not in the
default ``input_roles``) are left out, left padding is masked and
``position_ids`` follow the real tokens. ``scope`` picks prompt tokens (input rules), response tokens
(output rules) or both. The forward stops after the deepest requested layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from guardrails.engine.hooks import StopForward, capture, stop_after_layer


def tokenize_rows(
    tokenizer: Any,
    texts: Sequence[str],
    responses: Sequence[str | None] | None = None,
    *,
    chat: bool = True,
    max_tokens: int = 512,
) -> list[tuple[list[int], int]]:
    """``(token ids, number of prompt tokens)`` per text, formatted as a guard formats them."""
    resp = list(responses) if responses is not None else [None] * len(texts)
    if len(resp) != len(texts):
        raise ValueError(f"responses has {len(resp)} items but texts has {len(texts)}")
    out = []
    for text, response in zip(texts, resp, strict=True):
        prompt = text
        if chat and getattr(tokenizer, "chat_template", None):
            prompt = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
        p_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        r_ids = list(tokenizer(response, add_special_tokens=False)["input_ids"]) if response else []
        out.append(((p_ids + r_ids)[:max_tokens], len(p_ids)))
    return out


def system_prefix_tokens(tokenizer: Any, chat: bool = True) -> int:
    """Leading tokens of a one-user-turn prompt that belong to the system turn the chat template inserts
    on its own (SmolLM2's "You are a helpful AI assistant ..."). Input rules do not score them (the
    default ``input_roles`` are user and tool, see :mod:`guardrails.core.roles`); 0 without a template."""
    if not chat or not getattr(tokenizer, "chat_template", None):
        return 0
    from guardrails.core.roles import default_system_prefix, hf_render

    template = str(tokenizer.chat_template)
    prefix = default_system_prefix(hf_render(tokenizer), template)
    if not prefix:
        return 0
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                           add_generation_prompt=True)
    ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    head = list(tokenizer(prefix, add_special_tokens=False)["input_ids"])
    if not prompt.startswith(prefix) or ids[: len(head)] != head:
        return 0  # the prefix does not tokenize on its own boundary: score every token (serving does the same)
    return len(head)


def scored_positions(
    ids: Sequence[int], n_prompt: int, special: set[int], scope: Literal["input", "output", "both"], skip: int = 0
) -> list[int]:
    """Positions a guard scores in one row: not 0 (the attention sink), not special, in ``scope``, and for
    prompt tokens not among the first ``skip`` (the template's default system turn)."""
    return [
        j for j, t in enumerate(ids)
        if j > 0 and t not in special and (j >= n_prompt or j >= skip)
        and (scope == "both" or (j >= n_prompt if scope == "output" else j < n_prompt))
    ]


@torch.inference_mode()
def collect_residuals(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    layers: Sequence[int],
    *,
    responses: Sequence[str | None] | None = None,
    chat: bool = True,
    scope: Literal["input", "output", "both"] = "input",
    batch_size: int = 8,
    max_tokens: int = 512,
    progress: bool = True,
) -> dict[int, list[Tensor]]:
    """``{layer: [tensor [n_scored_i, d_model] per text]}`` (float32, CPU)."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    tokenized = tokenize_rows(tokenizer, texts, responses, chat=chat, max_tokens=max_tokens)
    skip = system_prefix_tokens(tokenizer, chat)
    out: dict[int, list[Tensor]] = {layer: [] for layer in layers}
    device = model.device if hasattr(model, "device") else torch.device("cpu")
    bar = tqdm(total=len(texts), unit="text", desc=f"activations L{','.join(map(str, layers))}", disable=not progress)
    try:
        for start in range(0, len(texts), batch_size):
            chunk = tokenized[start : start + batch_size]
            rows = [ids for ids, _ in chunk]
            width = max(len(r) for r in rows)
            pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
            ids_t = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
            pos = (mask.cumsum(1) - 1).masked_fill(mask == 0, -1)
            with capture(model, list(layers)) as store, stop_after_layer(model, max(layers)):
                try:
                    model(
                        input_ids=ids_t.to(device),
                        attention_mask=mask.to(device),
                        position_ids=pos.masked_fill(mask == 0, 1).to(device),
                        use_cache=False,
                    )
                except StopForward:
                    pass
            for layer in layers:
                hidden = store[layer].float().cpu()
                for b, (ids, n_prompt) in enumerate(chunk):
                    keep = [width - len(ids) + j for j in scored_positions(ids, n_prompt, special, scope, skip)]
                    out[layer].append(hidden[b][keep].clone())
            bar.update(len(rows))
    finally:
        bar.close()
    return out
