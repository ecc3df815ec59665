"""Tiny models of each supported architecture, built from configs in code, and random SAEs."""

from __future__ import annotations

from functools import cache
from typing import Any

import torch

from guardrails.sae.model import SAE, SAEConfig

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


# -- tokenizer, generation-ready tiny models, multimodal Qwen3.5 --------------------------------------------

TOKENIZER_CORPUS = (
    "The quick brown fox jumps over the lazy dog.",
    "How do I bake bread at home? Mix flour, water, salt and yeast.",
    "Tell me a story about a robot who learns to paint.",
    "Hello world! This is a tiny tokenizer for unit tests.",
    "What is the capital of France? Paris is the capital.",
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def tiny_tokenizer(vocab_size: int = 320) -> Any:
    """A byte-level BPE tokenizer trained in memory (no files, no network); eos = pad = ``<|endoftext|>``.

    ``<|im_start|>`` and ``<|im_end|>`` are special tokens (ids 1 and 2), so tests can put special
    tokens inside a text. It has no chat template: prompts go to the model as they are.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tk.train_from_iterator(list(TOKENIZER_CORPUS) * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token=SPECIAL_TOKENS[0], pad_token=SPECIAL_TOKENS[0],
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
    )


@cache
def bundled_tokenizer() -> Any:
    """The bundled SmolLM2 tokenizer (real special tokens and chat template), loaded once."""
    from transformers import AutoTokenizer

    from guardrails.serving.models import bundled_model_path

    return AutoTokenizer.from_pretrained(bundled_model_path())


def tiny_lm(arch: str, tokenizer: Any, layers: int = 4, logit_scale: float = 20.0) -> Any:
    """``tiny_model`` with the tokenizer's vocabulary and a sharpened ``lm_head``.

    With the default init (std 0.02) logits are nearly flat and greedy decoding repeats one token;
    scaling ``lm_head`` by ``logit_scale`` makes outputs vary and keeps argmax gaps large enough that
    batched and single-sequence runs pick the same tokens.
    """
    model = tiny_model(arch, vocab_size=len(tokenizer), layers=layers)
    with torch.no_grad():
        model.lm_head.weight.mul_(logit_scale)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def tiny_qwen3_5_multimodal(vocab_size: int = 512, layers: int = 4, hidden: int = HIDDEN) -> Any:
    """``Qwen3_5ForConditionalGeneration`` (text layers under ``model.language_model.layers``), tiny vision."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    torch.manual_seed(0)
    text = dict(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, head_dim=16,
        layer_types=_hybrid(layers), linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=16,
        linear_value_head_dim=16,
    )
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
                  num_position_embeddings=64, patch_size=4)
    cfg = Qwen3_5Config(text_config=text, vision_config=vision, tie_word_embeddings=False)
    return Qwen3_5ForConditionalGeneration(cfg).eval()


# -- SAE files in the real layouts of other libraries ----------------------------------------------------


def qwen_scope_tensors(d_model: int = HIDDEN, d_sae: int = 256, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random float32 tensors in the Qwen-Scope layout: W_enc [d_sae, d_model], W_dec [d_model, d_sae]."""
    g = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(d_sae, d_model, generator=g) / d_model**0.5,
        "W_dec": torch.randn(d_model, d_sae, generator=g) / d_sae**0.5,
        "b_enc": torch.randn(d_sae, generator=g) * 0.1,
        "b_dec": torch.randn(d_model, generator=g) * 0.1,
    }


def write_qwen_scope(folder: Any, layer: int, tensors: dict[str, torch.Tensor]) -> Any:
    """Write ``layer{layer}.sae.pt`` as Qwen-Scope does (``torch.save`` of a plain dict); returns its path."""
    from pathlib import Path

    path = Path(folder) / f"layer{layer}.sae.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({n: t.contiguous() for n, t in tensors.items()}, path)
    return path


def qwen_scope_encode(x: torch.Tensor, tensors: dict[str, torch.Tensor], k: int) -> torch.Tensor:
    """The Qwen-Scope encode, by hand: ``pre = x @ W_enc.T + b_enc``; keep the top k of ``pre``, no ReLU."""
    pre = x.float() @ tensors["W_enc"].T + tensors["b_enc"]
    values, indices = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, indices, values)


def watch_policy(path: Any, threshold: float = 1e9, *, name: str = "tiny", layer: int = 1, k: int = 32,
                 features: list[int] | None = None, scope: str = "output", action: str = "block",
                 refusal: str = "Sorry, no.", rule_extra: str = "") -> Any:
    """A one-rule policy over a Qwen-Scope file at ``path``: the sum of ``features`` (default: every even id
    below 128) at ``layer``; ``rule_extra``: more YAML lines of the rule (indented four spaces)."""
    from guardrails import Policy

    feats = ", ".join(str(f) for f in (features if features is not None else range(0, 128, 2)))
    return Policy.from_yaml(f"""
name: {name}
refusal: "{refusal}"
saes:
  main: {{path: "{path}", layer: {layer}, k: {k}}}
rules:
  - id: watch
    scope: {scope}
    detector: {{sae: main, features: [{feats}], combine: sum}}
    threshold: {threshold}
    action: {action}
{rule_extra}""")


def assert_onnx_matches_torch(policy: Any, model: Any, tok: Any, out: Any, prompts: list[str], rule_id: str,
                              **export_kw: Any) -> None:
    """Export ``policy`` to ONNX at ``out`` and check its parity report and ``rule_id``'s per-token scores on
    ``prompts`` (the first with a response) against the torch guard's."""
    from guardrails import GuardedModel
    from guardrails.onnx import PARITY_RTOL, OnnxGuard, export_onnx

    report = export_onnx(policy, out, model=model, tokenizer=tok, **export_kw)
    assert report.parity is not None and report.parity <= PARITY_RTOL
    responses = ["Mix flour and water.", *[None] * (len(prompts) - 1)]
    ref = GuardedModel(model, tok, policy).score(prompts, responses=responses)
    got = OnnxGuard.load(out).score(prompts, responses=responses)
    for a, b in zip(got, ref, strict=True):
        assert set(a.token_scores[rule_id]) == set(b.token_scores[rule_id])
        for p, v in b.token_scores[rule_id].items():
            assert abs(a.token_scores[rule_id][p] - v) <= PARITY_RTOL * max(1.0, abs(v))


def assert_token_scores(got: dict[int, float], want: Any, *, tol: float = 1e-4) -> None:
    """Per-position scores ``got`` (a decision trace) equal ``want[pos]`` (a by-hand array) at every scored
    position, and there is at least one."""
    import pytest

    assert got and set(got) <= set(range(len(want)))
    for pos, val in got.items():
        assert val == pytest.approx(float(want[pos]), rel=tol, abs=tol), pos


def first_new_high(got: dict[int, float]) -> tuple[int, float]:
    """A later position whose score is the first to exceed every earlier one (by 1e-3), and a threshold midway
    between it and the earlier maximum: a rule at that threshold first trips exactly there."""
    order = sorted(got)
    pick = next(p for i, p in enumerate(order) if i and got[p] > max(got[q] for q in order[:i]) + 1e-3)
    return pick, (got[pick] + max(got[q] for q in order if q < pick)) / 2
