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
    if not text:
        raise ValueError("text is empty")
    the_sae = sae if isinstance(sae, SAE) else SAE.load(sae, layer=layer, k=k)
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
    hidden = store[L][0]
    vals, idx = the_sae.encode(hidden).topk(top, dim=-1)
    tokens = tokenizer.convert_ids_to_tokens(enc["input_ids"][0])
    rows = []
    for pos, tok in enumerate(tokens):
        feats = [(int(i), round(float(v), 3)) for v, i in zip(vals[pos], idx[pos], strict=True) if float(v) > 0]
        rows.append({"position": pos, "token": tokenizer.convert_tokens_to_string([tok]), "features": feats})
    return rows
