"""Serve an exported ONNX guard with onnxruntime, numpy and ``tokenizers`` only (no torch, no transformers).

It applies the same position rules as :meth:`GuardedModel.score` (padding, position 0 and special tokens
are not scored), scopes, windows, thresholds and actions, so its per-rule max scores and decisions match
the torch text guard. Decisions carry no ``top_features`` (the full SAE is not in the graph).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from guardrails.core.decision import Decision, TextScore
from guardrails.onnx.manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_FILE,
    MODEL_FILE,
    OUTPUT_NAME,
    OnnxGuardError,
)

logger = logging.getLogger(__name__)


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
