"""Export a policy's scorer to an ONNX guard folder (torch, imported lazily inside the functions)."""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from guardrails.core.semantics import on_error_of, rule_layer, scan_actions
from guardrails.onnx.manifest import (
    CHECK_TEXTS,
    FORMAT,
    FORMAT_VERSION,
    INPUT_NAMES,
    MANIFEST_FILE,
    MODEL_FILE,
    OUTPUT_NAME,
    PARITY_RTOL,
    POLICY_FILE,
    TOKENIZER_FILE,
    OnnxGuardError,
)
from guardrails.onnx.serve import OnnxGuard, relative_error

logger = logging.getLogger(__name__)




@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_onnx` wrote and how closely the ONNX guard matched the torch guard."""

    folder: Path
    """The output folder."""
    onnx_bytes: int
    """Size of the .onnx file(s)."""
    cut_after_layer: int
    """Deepest decoder block in the graph."""
    score_mode: str
    """exact or watched."""
    parity: float | None
    """Largest relative difference of per-token scores on :data:`CHECK_TEXTS` (None if not checked)."""
    seconds: float
    """Export time."""


def build_scoring_graph(model: Any, guard: Any) -> Any:
    """A ``torch.nn.Module``: ``(input_ids, attention_mask, position_ids) -> scores [B, T, n_rules]``.

    ``guard`` is a :class:`~guardrails.serving.generation.GuardedModel` over ``model``; its layer scorers give
    the SAE rows, linear detectors and per-rule combine. Works for decoder blocks that take
    ``position_embeddings`` from the model's ``rotary_emb`` (Llama, Qwen2, Qwen3, Qwen3-MoE).
    """
    import torch
    from torch import Tensor, nn

    from guardrails.engine.hooks import decoder_layers, hidden_of
    from guardrails.engine.scorers import WatchedEncoder

    base = model.model if hasattr(model, "model") else model
    for attr in ("embed_tokens", "rotary_emb"):
        if not hasattr(base, attr):
            kind = getattr(model.config, "model_type", type(model).__name__)
            raise OnnxGuardError(f"ONNX export needs a decoder with {attr!r}; a {kind!r} model has none "
                                 f"(supported: llama, qwen2, qwen3, qwen3_moe)")
    layer_types = getattr(model.config, "layer_types", None) or []
    if any(t not in ("full_attention", "sliding_attention") for t in layer_types[: guard.deepest + 1]):
        raise OnnxGuardError(f"ONNX export supports attention decoder blocks only; layers 0..{guard.deepest} "
                             f"include {sorted(set(layer_types[: guard.deepest + 1]))}")
    rule_pos = {rule.id: i for i, rule in enumerate(guard.policy.rules)}

    class LayerHead(nn.Module):
        """Scores of the rules reading one layer, ``[B, T, n_rules_here]``."""

        W: Tensor
        b: Tensor
        cols: Tensor
        b_dec: Tensor | None
        lin_W: Tensor | None
        lin_b: Tensor | None

        def __init__(self, scorer: Any, mode: str) -> None:
            super().__init__()
            self.exact_topk = False
            self.k = 0
            self.relu_after_topk = False
            self.rows: nn.Module | None = None  # watched rows: the torch path's own WatchedEncoder, in float32
            sae = scorer.sae
            if sae is not None and mode == "exact" and sae.cfg.architecture == "topk":
                # a feature is kept when its pre-activation reaches the k-th largest (TopK, ties aside)
                self.exact_topk = True
                self.k = int(sae.cfg.k or 0)
                self.relu_after_topk = bool(sae.cfg.relu_after_topk)
                self.register_buffer("W", sae.W_enc.detach().float().cpu().clone())
                self.register_buffer("b", sae.b_enc.detach().float().cpu().clone())
                self.register_buffer("cols", torch.tensor(scorer.features, dtype=torch.long))
                self.register_buffer("b_dec", sae.b_dec.detach().float().cpu().clone()
                                     if sae.cfg.apply_b_dec_to_input else None)
            elif scorer.encoder is not None or sae is not None:  # watched, or exact per-feature rule: the same
                rows = scorer.encoder if scorer.encoder is not None else WatchedEncoder(sae, scorer.features)
                self.rows = copy.deepcopy(rows).to("cpu", torch.float32)
            self.register_buffer("lin_W", None if scorer.linear_W is None else scorer.linear_W.detach().float().cpu())
            self.register_buffer("lin_b", None if scorer.linear_b is None else scorer.linear_b.detach().float().cpu())
            self.combine = [h.combine for h in scorer.heads]
            self.bias = [float(h.bias) for h in scorer.heads]
            for i, h in enumerate(scorer.heads):
                self.register_buffer(f"hc{i}", h.columns.detach().cpu().long())
                self.register_buffer(f"hw{i}", h.weights.detach().cpu().float())
            # (rule column, scale) per head: an ensemble's SAE member adds its scaled score to its ensemble's
            self.order = [(rule_pos[h.rule.id], 1.0) if h.carry is None else (rule_pos[h.carry[0]], h.carry[1])
                          for h in scorer.heads]

        def forward(self, hidden: Tensor) -> Tensor:
            x = hidden.float()
            parts = []
            if self.exact_topk:
                xin = x - self.b_dec if self.b_dec is not None else x
                pre = torch.nn.functional.linear(xin, self.W, self.b)
                kth = pre.topk(self.k, dim=-1).values[..., -1:]
                sel = pre.index_select(-1, self.cols)
                acts = torch.where(sel >= kth, sel, torch.zeros_like(sel))
                parts.append(torch.relu(acts) if self.relu_after_topk else acts)
            elif self.rows is not None:
                parts.append(self.rows(x).float())
            if self.lin_W is not None:
                parts.append(torch.nn.functional.linear(x, self.lin_W, self.lin_b))
            feats = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
            out = []
            for i, how in enumerate(self.combine):
                v = feats.index_select(-1, getattr(self, f"hc{i}")) * getattr(self, f"hw{i}")
                s = v.sum(-1) if how == "sum" else v.amax(-1) if how == "max" else v.mean(-1)
                out.append(s + self.bias[i])
            return torch.stack(out, dim=-1)

    class ScoringGraph(nn.Module):
        """Embeddings, decoder blocks 0..L, and the policy's heads."""

        route: Tensor

        def __init__(self) -> None:
            super().__init__()
            self.embed = base.embed_tokens
            self.rotary = base.rotary_emb
            self.blocks = nn.ModuleList(list(decoder_layers(model))[: guard.deepest + 1])
            heads = {str(layer): LayerHead(s, guard.score_mode) for layer, s in guard.scorers.items()}
            self.heads = nn.ModuleDict(heads)
            order = [p for layer in sorted(guard.scorers) for p in heads[str(layer)].order]
            route = torch.zeros(len(order), len(rule_pos))  # head columns -> rule columns
            for col, (pos, scale) in enumerate(order):
                route[col, pos] = scale
            self.register_buffer("route", route)
            # multi-layer linear rules: each feeding layer's term x · w_l, routed to its rule's column
            self.feed_layers = sorted(guard.compiled.feeds)
            for layer in self.feed_layers:
                fd = guard.compiled.feeds[layer]
                route = torch.zeros(len(fd.rule_ids), len(rule_pos))
                for j, rid in enumerate(fd.rule_ids):
                    route[j, rule_pos[rid]] = 1.0
                self.register_buffer(f"feed_w{layer}", fd.weight.detach().float().cpu())
                self.register_buffer(f"feed_route{layer}", route)

        def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
            h = self.embed(input_ids)
            cos_sin = self.rotary(h, position_ids=position_ids)
            seq = torch.arange(input_ids.shape[1], device=input_ids.device)
            allowed = (seq[None, :] <= seq[:, None])[None, None] & attention_mask.bool()[:, None, None, :]
            mask = torch.zeros(allowed.shape, dtype=h.dtype, device=h.device)
            mask = mask.masked_fill(~allowed, torch.finfo(h.dtype).min)
            outs = []
            carry: Tensor | None = None
            for i, block in enumerate(self.blocks):
                h = hidden_of(block(h, attention_mask=mask, position_ids=position_ids, position_embeddings=cos_sin))
                if i in self.feed_layers:
                    term = (h.float() @ getattr(self, f"feed_w{i}").T) @ getattr(self, f"feed_route{i}")
                    carry = term if carry is None else carry + term
                if str(i) in self.heads:
                    outs.append(self.heads[str(i)](h))
            scores = torch.cat(outs, dim=-1) @ self.route
            return scores if carry is None else scores + carry

    return ScoringGraph().eval()


def _export_policy(pol: Any) -> Any:
    """``pol`` as the export scores it: steer rules made flag rules (the same scores, no change to the
    activations) and SAEs loaded in float32 (the graph's dtype), whatever ``saes.*.dtype`` says."""
    rules = [r.model_copy(update={"action": "flag", "steer": None}) if r.action == "steer" else r for r in pol.rules]
    saes = {k: v.model_copy(update={"dtype": None}) for k, v in pol.saes.items()}
    copy = pol.model_copy(update={"rules": rules, "saes": saes})
    object.__setattr__(copy, "base_dir", pol.base_dir)
    return copy


def _rules_manifest(pol: Any) -> tuple[list[dict[str, Any]], list[int]]:

    rules = []
    actions = scan_actions(pol)
    for rule in pol.rules:
        det = rule.detector
        layer = rule_layer(pol, rule)
        rules.append({
            "id": rule.id, "layer": layer, "scope": rule.scope, "threshold": float(rule.threshold),
            "action": rule.action, "window": det.window, "aggregate": det.aggregate,
            "block_above": rule.steer.block_above if rule.steer else None,
            "scan_action": actions.get(rule.id),  # what its would-be steering does in a scan; None: its action
            "message": rule.message, "on_error": on_error_of(pol, rule), "category": rule.category,
            "category_head": "not exported" if rule.categories is not None else None,
            **_cascade_manifest(pol, rule),
        })
    order = sorted(range(len(rules)), key=lambda i: (rules[i]["layer"], i))
    return rules, order


def _cascade_manifest(pol: Any, rule: Any) -> dict[str, Any]:
    """A cascade rule's ``escalate_above`` and judge settings (name, prompt, on_error, timeout_s); {} without."""
    import dataclasses

    from guardrails.core.cascade import judge_settings

    settings = judge_settings(pol, rule)
    if settings is None:
        return {}
    return {"escalate_above": float(rule.escalate_above), "judge": dataclasses.asdict(settings)}


def _tokenizer_manifest(tokenizer: Any, folder: Path) -> dict[str, Any]:
    tokenizer.save_pretrained(str(folder))
    if not (folder / TOKENIZER_FILE).is_file():
        backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
        if backend is None:
            raise OnnxGuardError("the ONNX guard needs a fast tokenizer (one with a tokenizer.json)")
        backend.save(str(folder / TOKENIZER_FILE))
    special = {k: v for k, v in getattr(tokenizer, "special_tokens_map", {}).items() if isinstance(v, str)}
    return {
        "file": TOKENIZER_FILE,
        "pad_token_id": int(tokenizer.pad_token_id),
        "special_ids": sorted(int(i) for i in (getattr(tokenizer, "all_special_ids", []) or [])),
        "special_tokens": special,
        "chat_template": getattr(tokenizer, "chat_template", None),
    }


def export_onnx(
    policy: Any,
    out: str | os.PathLike[str],
    *,
    model: Any = None,
    tokenizer: Any = None,
    saes: dict[str, Any] | None = None,
    score_mode: str | None = None,
    chat: bool = True,
    check: bool = True,
    opset: int | None = None,
) -> ExportReport:
    """Export ``policy``'s scorer over ``model`` (default: the policy's model, else the bundled one) to ``out``.

    ``policy`` is a :class:`~guardrails.core.policy.Policy` or a path. ``score_mode`` defaults to the policy's.
    The graph is float32: SAEs are exported in float32 whatever ``saes.*.dtype`` says (a guard serving a
    bfloat16 SAE differs from the ONNX guard by bfloat16 rounding).
    With ``check`` the ONNX guard and ``GuardedModel.score`` score :data:`CHECK_TEXTS` and the largest
    relative difference goes into the manifest; above :data:`PARITY_RTOL` the export fails.
    """
    import torch

    from guardrails.core.policy import Policy
    from guardrails.serving.generation import GuardedModel
    from guardrails.serving.models import load_model

    t0 = time.perf_counter()
    pol = policy if isinstance(policy, Policy) else Policy.from_path(policy)
    gated = [r.id for r in pol.rules if r.gate is not None]
    if gated:  # the numpy decision path has no gate yet: refuse rather than score the rules ungated
        raise OnnxGuardError(f"policy {pol.name!r}: rule(s) {', '.join(gated)} have a gate (rules[].gate), which "
                             "the ONNX guard does not apply; valid: export a policy without gates, or serve it "
                             "with GuardedModel")
    by_category = [r.id for r in pol.rules if r.categories is not None and r.categories.actions]
    if by_category:  # the ONNX graph has no category head: the per-category actions would be lost
        raise OnnxGuardError(f"policy {pol.name!r}: rule(s) {', '.join(by_category)} set actions per category "
                             "(rules[].categories.actions), which the ONNX guard cannot apply (it carries no category "
                             "head); valid: remove 'actions', or serve it with GuardedModel")
    named = [r.id for r in pol.rules if r.categories is not None]
    if named:
        logger.warning("policy %r: the category head of rule(s) %s is not exported; the ONNX guard's decisions name "
                       "each rule's own category instead (the same actions)", pol.name, named)
    if model is None:
        model, tokenizer = load_model(pol.model, dtype=torch.float32)
    elif tokenizer is None:
        raise ValueError("pass the tokenizer with the model")
    if next(model.parameters()).dtype != torch.float32 or next(model.parameters()).device.type != "cpu":
        raise OnnxGuardError("export a float32 model on the CPU (load_model(..., dtype='float32'))")
    saes = {k: copy.deepcopy(s).to_dtype(torch.float32) if s.dtype != torch.float32 else s
            for k, s in (saes or {}).items()}
    guard = GuardedModel(model, tokenizer, _export_policy(pol), saes=saes, score_mode=score_mode, chat=chat,
                         require_judges=False)  # the export compares scores; judges are bound where it is served
    steer_layers = [r["layer"] for r in _rules_manifest(pol)[0] if r["action"] == "steer"]
    if any(layer < guard.deepest for layer in steer_layers):
        logger.warning("policy %r steers at layer(s) %s below layer %d: scans (the ONNX guard, GuardedModel.score) "
                       "do not steer, so once a steer rule fires their scores at deeper layers differ from a "
                       "generation's", pol.name, steer_layers, guard.deepest)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    graph = build_scoring_graph(model, guard)
    ids = torch.randint(0, int(model.config.vocab_size), (2, 8))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    pos = (mask.cumsum(1) - 1).masked_fill(mask == 0, 1)
    batch, seq = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("seq", min=2, max=131072)
    dyn = {name: {0: batch, 1: seq} for name in INPUT_NAMES}
    path = folder / MODEL_FILE
    with torch.inference_mode(False), torch.no_grad():
        program = torch.onnx.export(
            graph, (ids, mask, pos), input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
            dynamic_shapes=dyn, dynamo=True, opset_version=opset, verbose=False,
        )
        assert program is not None
        program.save(str(path))
    rules, order = _rules_manifest(pol)
    import onnx as onnx_pkg
    import transformers

    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_file": MODEL_FILE,
        "model": str(pol.model or getattr(model.config, "_name_or_path", "") or "bundled"),
        "architecture": getattr(model.config, "model_type", None),
        "cut_after_layer": guard.deepest,
        "score_mode": guard.score_mode,
        "dtype": "float32",
        "inputs": list(INPUT_NAMES),
        "output": OUTPUT_NAME,
        "chat": chat,
        "rules": rules,
        "evaluation_order": order,
        "policy": {"name": pol.name, "version": pol.version, "digest": pol.digest, "refusal": pol.refusal,
                   "input_roles": list(pol.input_roles),
                   "normalize": pol.normalize.model_dump(mode="json")},
        "tokenizer": _tokenizer_manifest(tokenizer, folder),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "onnx": onnx_pkg.__version__},
        "parity": None,
    }
    (folder / POLICY_FILE).write_text(pol.to_yaml(), encoding="utf-8")
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    parity = None
    if check:
        parity = check_parity(guard, OnnxGuard(folder, require_judges=False), CHECK_TEXTS)
        manifest["parity"] = {"max_relative_error": parity, "texts": len(CHECK_TEXTS), "rtol": PARITY_RTOL}
        (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if parity > PARITY_RTOL:
            raise OnnxGuardError(f"ONNX scores differ from torch by {parity:.2e} relative (> {PARITY_RTOL}); "
                                 f"the export in {folder} is not usable")
    size = sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith(MODEL_FILE))
    return ExportReport(folder, size, guard.deepest, guard.score_mode, parity, time.perf_counter() - t0)


def check_parity(guard: Any, onnx_guard: OnnxGuard, items: tuple[tuple[str, str | None], ...] | list[Any]) -> float:
    """Largest relative difference of windowed per-token scores between ``guard.score`` and the ONNX guard.

    ``guard`` should not steer (see the module docstring): export checks with steer rules made flags.
    """
    texts = [t for t, _ in items]
    responses = [r for _, r in items]
    ref = guard.score(texts, responses=responses)
    got = onnx_guard.score(texts, responses=responses)
    worst = 0.0
    for a, b in zip(got, ref, strict=True):
        for rid, ref_tokens in b.token_scores.items():
            got_tokens = a.token_scores.get(rid, {})
            if set(got_tokens) != set(ref_tokens):
                return math.inf
            keys = sorted(ref_tokens)
            worst = max(worst, relative_error(np.array([got_tokens[k] for k in keys]),
                                              np.array([ref_tokens[k] for k in keys])))
    return worst
