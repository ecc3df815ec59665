"""ONNX guard: export the scorer of a policy, and score texts with onnxruntime alone.

:func:`export_onnx` writes a folder::

    guard.onnx      the model cut after the deepest watched layer + the policy's scoring head
    manifest.json   rules (scope, threshold, window, action...), tokenizer facts, versions, parity
    policy.yaml     the policy, for the record
    tokenizer.json  (+ tokenizer_config.json, chat template) the model's tokenizer

The graph takes ``input_ids``, ``attention_mask`` and ``position_ids`` (``[batch, seq]`` int64,
dynamic axes) and returns per-token rule scores ``[batch, seq, n_rules]`` before windowing, in the
policy's rule order. It runs the embeddings and decoder blocks ``0..L`` with the rotary embeddings and
a 4-D causal + padding mask built with ``finfo(dtype).min`` (``-inf`` gives NaN rows for padding),
then per watched layer: the encoder rows of the watched features with the SAE's activation rule
(``watched``), or for ``exact`` TopK the full pre-activations and the k-th largest as the cut
(a feature is kept when its pre-activation reaches it), and linear detectors; then each rule's
weighted ``sum``/``max``/``mean`` plus bias.

:class:`OnnxGuard` imports neither torch nor transformers: onnxruntime, numpy, ``tokenizers`` and
jinja2 (chat template). It applies the same positions rules as :meth:`GuardedModel.score` (padding,
position 0 and special tokens are not scored), scopes, windows, thresholds and actions, so its
per-rule max scores and decisions match the torch text guard. Decisions carry no ``top_features``
(the full SAE is not in the graph). Steer rules report their decisions but the graph does not steer:
where a steer rule reads a shallower layer than other rules and fires, ``GuardedModel.score`` scores
the deeper layers on steered activations and the ONNX guard on unsteered ones (the export warns).
Export code imports torch lazily, inside its functions.
"""

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

from guardrails.decision import Decision, TextScore

logger = logging.getLogger(__name__)

FORMAT = "sae-guardrails-onnx"
FORMAT_VERSION = 1
MODEL_FILE = "guard.onnx"
MANIFEST_FILE = "manifest.json"
POLICY_FILE = "policy.yaml"
TOKENIZER_FILE = "tokenizer.json"
INPUT_NAMES = ("input_ids", "attention_mask", "position_ids")
OUTPUT_NAME = "scores"
PARITY_RTOL = 1e-4
"""Largest relative difference accepted between the ONNX and torch scores (see :func:`relative_error`)."""

CHECK_TEXTS: tuple[tuple[str, str | None], ...] = (
    ("How do I bake bread at home?", "Mix flour, water, salt and yeast, knead, let it rise, then bake."),
    ("Write a short poem about the sea.", None),
    ("Explain how vaccines train the immune system.", "They show it a harmless piece of a germ."),
)
"""Texts (prompt, response) scored by both paths at export to record parity in the manifest."""


class OnnxGuardError(RuntimeError):
    """An ONNX guard folder is missing, invalid, or was made by an incompatible version."""


# =====================================================================================================
# serving: onnxruntime only
# =====================================================================================================


OnnxTextScore = TextScore
"""What :meth:`OnnxGuard.score` returns (``top_features`` of its decisions are empty: the graph holds only
the watched features)."""


def window_scores(scores: np.ndarray, window: int, how: str) -> np.ndarray:
    """Windowed aggregate of one row of token scores (NaN = not scored), as ``GuardedModel.score``.

    The window covers each scored token and the ``window - 1`` scored tokens before it: unscored
    (NaN) tokens take no slot, and stay NaN.
    """
    if window == 1:
        return scores.copy()
    ok = ~np.isnan(scores)
    out = np.full_like(scores, np.nan)
    out[ok] = _window_dense(scores[ok], window, how)
    return out


def _window_dense(scores: np.ndarray, window: int, how: str) -> np.ndarray:
    n = scores.shape[0]
    if n == 0:
        return scores.copy()
    padded = np.concatenate([np.full(window - 1, np.nan, dtype=scores.dtype), scores])
    win = np.lib.stride_tricks.sliding_window_view(padded, window)[:n]  # [n, window]
    valid = ~np.isnan(win)
    filled = np.where(valid, win, 0.0)
    if how == "sum":
        agg = filled.sum(-1)
    elif how == "mean":
        agg = filled.sum(-1) / np.maximum(valid.sum(-1), 1)
    else:
        agg = np.where(valid, win, -np.inf).max(-1)
    return np.where(np.isnan(scores), np.nan, agg).astype(scores.dtype)


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    """Largest ``|a - b|`` over the NaN-free entries, divided by ``max(1, max |b|)`` of those entries."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    if not np.array_equal(np.isnan(a), np.isnan(b)):
        return math.inf
    ok = ~np.isnan(b)
    if not ok.any():
        return 0.0
    return float(np.abs(a[ok] - b[ok]).max() / max(1.0, float(np.abs(b[ok]).max())))


class _ChatTemplate:
    """The tokenizer's Jinja chat template, rendered the way transformers renders it."""

    def __init__(self, template: str, special: dict[str, str]) -> None:
        try:
            from jinja2.ext import loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError as exc:  # pragma: no cover - jinja2 ships with transformers and torch
            raise OnnxGuardError("chat templates need jinja2: pip install jinja2") from exc

        def raise_exception(message: str) -> None:
            raise OnnxGuardError(f"chat template error: {message}")

        def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
                   sort_keys: bool = False) -> str:
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
        self._template = env.from_string(template)
        self._special = special

    def render(self, messages: list[dict[str, str]]) -> str:
        return str(self._template.render(messages=messages, add_generation_prompt=True, tools=None, documents=None,
                                         **self._special))


class OnnxGuard:
    """Score texts with an exported guard (``guardrails export-onnx``) and onnxruntime only."""

    def __init__(self, folder: str | os.PathLike[str], *, threads: int | None = None,
                 providers: list[str] | None = None) -> None:
        self.folder = Path(folder)
        manifest_path = self.folder / MANIFEST_FILE
        if not manifest_path.is_file():
            raise OnnxGuardError(f"{self.folder} is not an ONNX guard folder: {MANIFEST_FILE} is missing "
                                 f"(make one with: guardrails export-onnx --policy P --out {self.folder})")
        try:
            self.manifest: dict[str, Any] = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise OnnxGuardError(f"{manifest_path}: cannot read: {exc}") from None
        if self.manifest.get("format") != FORMAT or self.manifest.get("format_version") != FORMAT_VERSION:
            raise OnnxGuardError(
                f"{manifest_path}: format {self.manifest.get('format')!r} v{self.manifest.get('format_version')}; "
                f"this version reads {FORMAT!r} v{FORMAT_VERSION}"
            )
        try:
            import onnxruntime as ort
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise OnnxGuardError(f"the ONNX guard needs onnxruntime and tokenizers: pip install onnxruntime "
                                 f"tokenizers ({exc})") from exc
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        model_path = self.folder / self.manifest.get("model_file", MODEL_FILE)
        if not model_path.is_file():
            raise OnnxGuardError(f"{model_path} is missing")
        self.session = ort.InferenceSession(str(model_path), opts, providers=providers or ["CPUExecutionProvider"])
        tok = self.manifest["tokenizer"]
        self.tokenizer = Tokenizer.from_file(str(self.folder / tok["file"]))
        self.pad_id = int(tok["pad_token_id"])
        self.special_ids = np.array(sorted(tok["special_ids"]), dtype=np.int64)
        self.chat = bool(self.manifest.get("chat", True))
        template = tok.get("chat_template")
        self._template = _ChatTemplate(template, tok.get("special_tokens", {})) if template else None
        self.rules: list[dict[str, Any]] = self.manifest["rules"]
        self.order: list[int] = self.manifest["evaluation_order"]
        self.policy_name: str = self.manifest["policy"]["name"]

    @classmethod
    def load(cls, folder: str | os.PathLike[str], *, threads: int | None = None,
             providers: list[str] | None = None) -> OnnxGuard:
        """Open a folder written by :func:`export_onnx`."""
        return cls(folder, threads=threads, providers=providers)

    @property
    def rule_ids(self) -> list[str]:
        return [r["id"] for r in self.rules]

    def format_prompt(self, text: str, chat: bool | None = None) -> str:
        """The prompt as the model sees it: one user turn through the chat template (unless ``chat=False``)."""
        use_chat = self.chat if chat is None else chat
        if not use_chat or self._template is None:
            return text
        return self._template.render([{"role": "user", "content": text}])

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def raw_scores(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Per-token rule scores ``[batch, seq, n_rules]`` before windowing, for left-padded ids."""
        ids = np.asarray(input_ids, dtype=np.int64)
        mask = np.asarray(attention_mask, dtype=np.int64)
        positions = np.where(mask == 0, 1, np.cumsum(mask, axis=1) - 1).astype(np.int64)
        out = self.session.run([OUTPUT_NAME], {"input_ids": ids, "attention_mask": mask, "position_ids": positions})
        return np.asarray(out[0], dtype=np.float32)

    def score(self, texts: list[str] | str, *, responses: list[str | None] | None = None,
              chat: bool | None = None, batch_size: int = 8) -> list[OnnxTextScore]:
        """Score texts like :meth:`GuardedModel.score`: prompts by input rules, responses by output rules."""
        items = [texts] if isinstance(texts, str) else list(texts)
        resp: list[str | None] = list(responses) if responses is not None else [None] * len(items)
        if len(resp) != len(items):
            raise ValueError(f"responses has {len(resp)} items but texts has {len(items)}")
        out: list[OnnxTextScore] = []
        for start in range(0, len(items), batch_size):
            out += self._score_batch(items[start : start + batch_size], resp[start : start + batch_size], chat, start)
        return out

    def _score_batch(self, texts: list[str], responses: list[str | None], chat: bool | None,
                     offset: int) -> list[OnnxTextScore]:
        rows: list[list[int]] = []
        n_prompt: list[int] = []
        for text, response in zip(texts, responses, strict=True):
            if not isinstance(text, str):
                raise TypeError(f"texts must be strings, got {type(text).__name__}")
            p_ids = self.encode(self.format_prompt(text, chat))
            rows.append(p_ids + (self.encode(response) if response else []))
            n_prompt.append(len(p_ids))
        width = max(len(r) for r in rows)
        ids = np.array([[self.pad_id] * (width - len(r)) + r for r in rows], dtype=np.int64)
        mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=np.int64)
        error: str | None = None
        try:
            raw = self.raw_scores(ids, mask)
        except Exception as exc:  # a failure goes to the rules' on_error, never lets text through
            error = f"{type(exc).__name__}: {exc}"
            logger.warning("ONNX guard could not score: %s", error)
            raw = np.full((*ids.shape, len(self.rules)), np.nan, dtype=np.float32)
        results = []
        for b, row in enumerate(rows):
            pad = width - len(row)
            r_ids = np.array(row, dtype=np.int64)
            pos = np.arange(len(row))
            scorable = ~np.isin(r_ids, self.special_ids) & (pos > 0)
            is_output = pos >= n_prompt[b]
            results.append(self._decide(raw[b, pad:], scorable, is_output, n_prompt[b], row, offset + b, error))
        return results

    def _decide(self, raw: np.ndarray, scorable: np.ndarray, is_output: np.ndarray, n_prompt: int,
                row: list[int], sequence: int, error: str | None) -> OnnxTextScore:
        tokens = [self.tokenizer.id_to_token(i) or "" for i in row]
        in_scope = [self._scope(rule, is_output) & scorable for rule in self.rules]
        failed_layers: dict[int, str] = {}
        for r, rule in enumerate(self.rules):
            if error is not None:
                failed_layers[rule["layer"]] = error
            elif not np.isfinite(raw[scorable, r]).all():
                failed_layers.setdefault(rule["layer"], f"non-finite rule scores at layer {rule['layer']}")
        token_scores: dict[str, dict[int, float]] = {}
        scores: dict[str, float] = {}
        windowed: list[np.ndarray] = []
        for r, rule in enumerate(self.rules):
            s = np.where(in_scope[r], raw[:, r], np.nan).astype(np.float32)
            if rule["layer"] in failed_layers:
                s = np.full_like(s, np.nan)
            w = window_scores(s, rule["window"], rule["aggregate"])
            windowed.append(w)
            ok = ~np.isnan(w)
            token_scores[rule["id"]] = {int(p): float(v) for p, v in zip(np.nonzero(ok)[0], w[ok], strict=True)}
            scores[rule["id"]] = float(w[ok].max()) if ok.any() else math.nan
        decisions: list[Decision] = []
        blocked = False
        errors = sorted(set(failed_layers.values()))
        for r in self.order:  # the torch hooks' order: layers ascending, rules in policy order
            rule = self.rules[r]
            if blocked:
                break
            if rule["layer"] in failed_layers:
                hits = np.nonzero(in_scope[r])[0]
                if not len(hits):
                    continue
                t = int(hits[0])
                resolution = rule["on_error"]
                decisions.append(Decision(
                    "error", rule["id"], math.nan, rule["threshold"], t, "output" if is_output[t] else "input",
                    sequence, t - n_prompt if is_output[t] else None, tokens[t],
                    reason=failed_layers[rule["layer"]], resolution=resolution,
                ))
                blocked = resolution == "block"
                continue
            w = windowed[r]
            hits = np.nonzero(~np.isnan(w) & (np.nan_to_num(w, nan=-np.inf) >= rule["threshold"]))[0]
            if not len(hits):
                continue
            t = int(hits[0])
            score = float(w[t])
            action, threshold = rule["action"], rule["threshold"]
            if action == "steer" and rule.get("block_above") is not None and score >= rule["block_above"]:
                action, threshold = "block", float(rule["block_above"])
            decisions.append(Decision(
                action, rule["id"], score, threshold, t, "output" if is_output[t] else "input", sequence,
                t - n_prompt if is_output[t] else None, tokens[t],
            ))
            blocked = action == "block"
        return TextScore(scores, token_scores, decisions, tokens, errors)

    @staticmethod
    def _scope(rule: dict[str, Any], is_output: np.ndarray) -> np.ndarray:
        if rule["scope"] == "input":
            return ~is_output
        if rule["scope"] == "output":
            return is_output.copy()
        return np.ones_like(is_output)


# =====================================================================================================
# export: torch, imported lazily
# =====================================================================================================


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

    ``guard`` is a :class:`~guardrails.generation.GuardedModel` over ``model``; its layer scorers give
    the SAE rows, linear detectors and per-rule combine. Works for decoder blocks that take
    ``position_embeddings`` from the model's ``rotary_emb`` (Llama, Qwen2, Qwen3, Qwen3-MoE).
    """
    import torch
    from torch import Tensor, nn

    from guardrails.detectors import WatchedEncoder
    from guardrails.hooks import decoder_layers, hidden_of

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
            self.order = [rule_pos[h.rule.id] for h in scorer.heads]

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

        perm: Tensor

        def __init__(self) -> None:
            super().__init__()
            self.embed = base.embed_tokens
            self.rotary = base.rotary_emb
            self.blocks = nn.ModuleList(list(decoder_layers(model))[: guard.deepest + 1])
            heads = {str(layer): LayerHead(s, guard.score_mode) for layer, s in guard.scorers.items()}
            self.heads = nn.ModuleDict(heads)
            order = [p for layer in sorted(guard.scorers) for p in heads[str(layer)].order]
            self.register_buffer("perm", torch.tensor([order.index(i) for i in range(len(order))], dtype=torch.long))

        def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
            h = self.embed(input_ids)
            cos_sin = self.rotary(h, position_ids=position_ids)
            seq = torch.arange(input_ids.shape[1], device=input_ids.device)
            allowed = (seq[None, :] <= seq[:, None])[None, None] & attention_mask.bool()[:, None, None, :]
            mask = torch.zeros(allowed.shape, dtype=h.dtype, device=h.device)
            mask = mask.masked_fill(~allowed, torch.finfo(h.dtype).min)
            outs = []
            for i, block in enumerate(self.blocks):
                h = hidden_of(block(h, attention_mask=mask, position_ids=position_ids, position_embeddings=cos_sin))
                if str(i) in self.heads:
                    outs.append(self.heads[str(i)](h))
            return torch.cat(outs, dim=-1).index_select(-1, self.perm)

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
    from guardrails.policy import LinearDetector

    rules = []
    for rule in pol.rules:
        det = rule.detector
        layer = det.layer if isinstance(det, LinearDetector) else pol.saes[det.sae].layer
        rules.append({
            "id": rule.id, "layer": layer, "scope": rule.scope, "threshold": float(rule.threshold),
            "action": rule.action, "window": det.window, "aggregate": det.aggregate,
            "block_above": rule.steer.block_above if rule.steer else None,
            "message": rule.message, "on_error": rule.on_error or pol.on_error,
        })
    order = sorted(range(len(rules)), key=lambda i: (rules[i]["layer"], i))
    return rules, order


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

    ``policy`` is a :class:`~guardrails.policy.Policy` or a path. ``score_mode`` defaults to the policy's.
    The graph is float32: SAEs are exported in float32 whatever ``saes.*.dtype`` says (a guard serving a
    bfloat16 SAE differs from the ONNX guard by bfloat16 rounding).
    With ``check`` the ONNX guard and ``GuardedModel.score`` score :data:`CHECK_TEXTS` and the largest
    relative difference goes into the manifest; above :data:`PARITY_RTOL` the export fails.
    """
    import torch

    from guardrails.generation import GuardedModel
    from guardrails.models import load_model
    from guardrails.policy import Policy

    t0 = time.perf_counter()
    pol = policy if isinstance(policy, Policy) else Policy.from_path(policy)
    if model is None:
        model, tokenizer = load_model(pol.model, dtype=torch.float32)
    elif tokenizer is None:
        raise ValueError("pass the tokenizer with the model")
    if next(model.parameters()).dtype != torch.float32 or next(model.parameters()).device.type != "cpu":
        raise OnnxGuardError("export a float32 model on the CPU (load_model(..., dtype='float32'))")
    saes = {k: copy.deepcopy(s).to_dtype(torch.float32) if s.dtype != torch.float32 else s
            for k, s in (saes or {}).items()}
    guard = GuardedModel(model, tokenizer, _export_policy(pol), saes=saes, score_mode=score_mode, chat=chat)
    steer_layers = [r["layer"] for r in _rules_manifest(pol)[0] if r["action"] == "steer"]
    if any(layer < guard.deepest for layer in steer_layers):
        logger.warning("policy %r steers at layer(s) %s below layer %d: the ONNX guard does not steer, so its scores "
                       "at deeper layers differ from GuardedModel.score once a steer rule fires", pol.name,
                       steer_layers, guard.deepest)
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
        "policy": {"name": pol.name, "version": pol.version, "digest": pol.digest, "refusal": pol.refusal},
        "tokenizer": _tokenizer_manifest(tokenizer, folder),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "onnx": onnx_pkg.__version__},
        "parity": None,
    }
    (folder / POLICY_FILE).write_text(pol.to_yaml(), encoding="utf-8")
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    parity = None
    if check:
        parity = check_parity(guard, OnnxGuard.load(folder), CHECK_TEXTS)
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
