"""Tiny models of each supported architecture, built from configs in code, and random SAEs."""

from __future__ import annotations

from typing import Any

import torch

from guardrails.sae import SAE, SAEConfig

HIDDEN = 64


def tiny_model(arch: str, vocab_size: int = 512, layers: int = 4, hidden: int = HIDDEN) -> Any:
    """A randomly initialised causal LM of ``arch`` (llama, qwen3, qwen3_moe, qwen3_5, qwen3_5_moe)."""
    torch.manual_seed(0)
    common: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False,
    )
    if arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(**common)).eval()
    if arch == "qwen3":
        from transformers import Qwen3Config, Qwen3ForCausalLM

        return Qwen3ForCausalLM(Qwen3Config(**common, head_dim=16)).eval()
    if arch == "qwen3_moe":
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

        cfg = Qwen3MoeConfig(**common, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                             decoder_sparse_step=1)
        return Qwen3MoeForCausalLM(cfg).eval()
    if arch == "qwen3_5":
        from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

        cfg = Qwen3_5TextConfig(**common, head_dim=16, layer_types=_hybrid(layers), linear_num_key_heads=2,
                                linear_num_value_heads=2, linear_key_head_dim=16, linear_value_head_dim=16)
        return Qwen3_5ForCausalLM(cfg).eval()
    if arch == "qwen3_5_moe":
        from transformers import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig

        cfg = Qwen3_5MoeTextConfig(**common, head_dim=16, layer_types=_hybrid(layers), linear_num_key_heads=2,
                                   linear_num_value_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
                                   num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                   shared_expert_intermediate_size=32)
        return Qwen3_5MoeForCausalLM(cfg).eval()
    raise ValueError(f"unknown arch {arch}")


def _hybrid(layers: int) -> list[str]:
    """Qwen3.5 pattern: three Gated DeltaNet (linear attention) layers, then one full attention layer."""
    return ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(layers)]


def random_sae(d_model: int = HIDDEN, d_sae: int = 256, k: int = 8, layer: int | None = 1, seed: int = 0,
               architecture: str = "topk") -> SAE:
    g = torch.Generator().manual_seed(seed)
    cfg = SAEConfig(d_model=d_model, d_sae=d_sae, architecture=architecture,  # type: ignore[arg-type]
                    k=k if architecture == "topk" else None, layer=layer)
    thr = torch.rand(d_sae, generator=g) if architecture == "jumprelu" else None
    return SAE(cfg, torch.randn(d_sae, d_model, generator=g) / d_model**0.5, torch.randn(d_sae, generator=g) * 0.1,
               torch.randn(d_sae, d_model, generator=g) / d_model**0.5, torch.randn(d_model, generator=g) * 0.1, thr)
