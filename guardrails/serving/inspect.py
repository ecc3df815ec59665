"""Debugging with SAEs: which features fire on which tokens."""

from __future__ import annotations

from typing import Any

import torch

from guardrails.engine.hooks import StopForward, capture, check_layer, stop_after_layer
from guardrails.sae.model import SAE
from guardrails.serving.models import load_model


@torch.inference_mode()
def top_features_per_token(
    text: str,
    *,
    sae: str | SAE = "bundled",
    layer: int | None = None,
    k: int | None = None,
    model: Any = None,
    tokenizer: Any = None,
    top: int = 5,
    chat: bool = False,
) -> list[dict[str, Any]]:
    """``[{position, token, features: [(id, activation), ...]}]`` for each token of ``text``.

    ``model`` may be a loaded model (then pass ``tokenizer``) or an id/path/None (bundled).
    """
    acts, tokens = _activations(text, sae=sae, layer=layer, k=k, model=model, tokenizer=tokenizer, chat=chat)
    vals, idx = acts.topk(top, dim=-1)
    rows = []
    for pos, tok in enumerate(tokens):
        feats = [(int(i), round(float(v), 3)) for v, i in zip(vals[pos], idx[pos], strict=True) if float(v) > 0]
        rows.append({"position": pos, "token": tok, "features": feats})
    return rows


@torch.inference_mode()
def feature_trace(
    text: str,
    feature: int,
    *,
    sae: str | SAE = "bundled",
    layer: int | None = None,
    k: int | None = None,
    model: Any = None,
    tokenizer: Any = None,
    chat: bool = False,
) -> list[dict[str, Any]]:
    """``[{position, token, activation, rank}]``: one feature over every token of ``text`` (rank among all
    features at that token, 1 = strongest; None where it is not active)."""
    acts, tokens = _activations(text, sae=sae, layer=layer, k=k, model=model, tokenizer=tokenizer, chat=chat,
                                feature=feature)
    col = acts[:, feature]
    ranks = (acts > col[:, None]).sum(-1) + 1
    return [{"position": pos, "token": tok, "activation": round(float(col[pos]), 4),
             "rank": int(ranks[pos]) if float(col[pos]) > 0 else None} for pos, tok in enumerate(tokens)]


def _activations(text: str, *, sae: str | SAE, layer: int | None, k: int | None, model: Any, tokenizer: Any,
                 chat: bool, feature: int | None = None) -> tuple[torch.Tensor, list[str]]:
    """SAE activations ``[T, d_sae]`` at every token of ``text`` and the token strings."""
    if not text:
        raise ValueError("text is empty")
    the_sae = sae if isinstance(sae, SAE) else SAE.load(sae, layer=layer, k=k)
    if feature is not None and not 0 <= feature < the_sae.d_sae:
        raise ValueError(f"feature {feature} out of range; valid: 0..{the_sae.d_sae - 1} (the SAE has "
                         f"{the_sae.d_sae} features)")
    L = layer if layer is not None else the_sae.cfg.layer
    if L is None:
        raise ValueError("the SAE does not record its layer; pass layer=")
    if model is None or isinstance(model, str):
        model, tokenizer = load_model(model)
    if the_sae.d_model != model.config.hidden_size:
        hidden = model.config.hidden_size
        raise ValueError(f"SAE reads d_model={the_sae.d_model} but the model's hidden size is {hidden}")
    check_layer(model, L)
    if chat:
        messages = [{"role": "user", "content": text}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with capture(model, [L]) as store, stop_after_layer(model, L):
        try:
            model(**enc, use_cache=False)
        except StopForward:
            pass
    acts = the_sae.encode(store[L][0])
    tokens = [tokenizer.convert_tokens_to_string([t]) for t in tokenizer.convert_ids_to_tokens(enc["input_ids"][0])]
    return acts, tokens
