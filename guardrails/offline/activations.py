"""Residual-stream activations of labeled texts at the positions a guard scores.

The same positions as serving: prompts (strings, or conversations) go through the chat template (as
``GuardedModel`` does); position 0 (the attention sink), special tokens and turns outside the default
``input_roles`` (the template's default system turn, a conversation's system and assistant turns) are left out;
left padding is masked and ``position_ids`` follow the real tokens. ``scope`` picks prompt tokens (input rules),
response tokens (output rules) or both. The forward stops after the deepest requested layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from guardrails.core.errors import CalibrationError
from guardrails.engine.hooks import StopForward, capture, stop_after_layer
from guardrails.offline.progress import progress_bar
from guardrails.serving.prompts import PromptLike  # a string (one user turn) or {"role", "content"} turns


def tokenize_rows(
    tokenizer: Any,
    texts: Sequence[PromptLike],
    responses: Sequence[str | None] | None = None,
    *,
    chat: bool = True,
    max_tokens: int = 512,
) -> list[tuple[list[int], int]]:
    """``(token ids, number of prompt tokens)`` per text (or conversation), formatted as a guard formats them."""
    return [(ids, n_prompt) for ids, n_prompt, _ in _tokenized(tokenizer, texts, responses, chat, max_tokens)]


def _tokenized(tokenizer: Any, texts: Sequence[PromptLike], responses: Sequence[str | None] | None, chat: bool,
               max_tokens: int) -> list[tuple[list[int], int, int | frozenset[int]]]:
    """Per row ``(token ids, number of prompt tokens, the prompt tokens input rules leave out besides specials and
    position 0)``, each prompt rendered once. Left out: for a string, the leading tokens of the template's default
    system turn (a count, :func:`system_prefix_tokens`); for a conversation, the positions of the tokens in turns
    outside the default ``input_roles`` (user and tool), found as serving finds them
    (:func:`guardrails.core.roles.token_roles`)."""
    from guardrails.core.roles import token_roles
    from guardrails.core.semantics import ROLE_CODES

    resp = list(responses) if responses is not None else [None] * len(texts)
    if len(resp) != len(texts):
        raise ValueError(f"responses has {len(resp)} items but texts has {len(texts)}")
    keep = {ROLE_CODES["user"], ROLE_CODES["tool"]}
    default: int | None = None
    out: list[tuple[list[int], int, int | frozenset[int]]] = []
    for text, response in zip(texts, resp, strict=True):
        spans: dict[str, Any] = {}
        prompt = prompt_text(tokenizer, text, chat, spans)
        p_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        r_ids = list(tokenizer(response, add_special_tokens=False)["input_ids"]) if response else []
        skip: int | frozenset[int]
        if isinstance(text, str):
            skip = default = system_prefix_tokens(tokenizer, chat) if default is None else default
        else:
            roles = token_roles(tokenizer, prompt, spans.get(prompt))
            skip = frozenset(j for j, code in enumerate(roles) if code not in keep)
        out.append(((p_ids + r_ids)[:max_tokens], len(p_ids), skip))
    return out


def prompt_text(tokenizer: Any, text: PromptLike, chat: bool = True, spans: dict[str, Any] | None = None) -> str:
    """The prompt the model sees: a string as one user turn through the chat template (as it is without ``chat``
    or a template), a conversation (``{"role", "content"}`` turns) through the template; ``spans`` collects its
    turns' character spans as ``GuardedModel`` records them."""
    if isinstance(text, str):
        if chat and getattr(tokenizer, "chat_template", None):
            return str(tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                     add_generation_prompt=True))
        return text
    from guardrails.serving.prompts import render_prompt

    if not getattr(tokenizer, "chat_template", None):
        raise CalibrationError("a conversation (a row's 'system' or 'messages', or --system) needs a tokenizer with a "
                               "chat template; this model's tokenizer has none: give the rows as 'text' alone")
    return render_prompt(tokenizer, list(text), True, spans if spans is not None else {})


def scored_rows(tokenizer: Any, texts: Sequence[PromptLike], responses: Sequence[str | None] | None,
                scope: Literal["input", "output", "both"], *, chat: bool = True, max_tokens: int = 512,
                ) -> list[tuple[list[int], list[int]]]:
    """``(token ids, positions collect_residuals keeps)`` per row, by tokenizing alone."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    return [(ids, scored_positions(ids, n_prompt, special, scope, skip))
            for ids, n_prompt, skip in _tokenized(tokenizer, texts, responses, chat, max_tokens)]


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
    ids: Sequence[int], n_prompt: int, special: set[int], scope: Literal["input", "output", "both"],
    skip: int | frozenset[int] = 0,
) -> list[int]:
    """Positions a guard scores in one row: not 0 (the attention sink), not special, in ``scope``, and for
    prompt tokens not among the first ``skip`` (the template's default system turn) or, for a set, not in it
    (a conversation's turns that input rules do not read)."""
    def prompt_ok(j: int) -> bool:
        return j >= skip if isinstance(skip, int) else j not in skip

    return [
        j for j, t in enumerate(ids)
        if j > 0 and t not in special and (j >= n_prompt or prompt_ok(j))
        and (scope == "both" or (j >= n_prompt if scope == "output" else j < n_prompt))
    ]


@torch.inference_mode()
def collect_residuals(
    model: Any,
    tokenizer: Any,
    texts: Sequence[PromptLike],
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
    tokenized = _tokenized(tokenizer, texts, responses, chat, max_tokens)
    out: dict[int, list[Tensor]] = {layer: [] for layer in layers}
    device = model.device if hasattr(model, "device") else torch.device("cpu")
    bar = progress_bar(total=len(texts), unit="text", desc=f"activations L{','.join(map(str, layers))}",
                       disable=not progress)
    try:
        for start in range(0, len(texts), batch_size):
            chunk = tokenized[start : start + batch_size]
            rows = [ids for ids, _, _ in chunk]
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
                for b, (ids, n_prompt, skip) in enumerate(chunk):
                    keep = [width - len(ids) + j for j in scored_positions(ids, n_prompt, special, scope, skip)]
                    out[layer].append(hidden[b][keep].clone())
            bar.update(len(rows))
    finally:
        bar.close()
    return out
