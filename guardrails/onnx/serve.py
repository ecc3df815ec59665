"""Serve an exported ONNX guard with onnxruntime, numpy and ``tokenizers`` only (no torch, no transformers).

It applies the same position rules as :meth:`GuardedModel.score` (padding, position 0 and special tokens
are not scored), scopes, windows, thresholds and actions, so its per-rule max scores and decisions match
the torch text guard. Decisions carry no ``top_features`` (the full SAE is not in the graph). Cascade rules
(``escalate_above``) ask the judges bound by name (``OnnxGuard(folder, judges={...})``) as the torch scan does
(:func:`guardrails.core.semantics.decide_scan`).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from guardrails.core.cascade import (
    JudgeError,
    JudgeOutcome,
    JudgeRequest,
    as_judge,
    call_judge,
    judge_input_text,
    render_prompt,
)
from guardrails.core.decision import Decision, TextScore
from guardrails.core.normalize import NormalizeSpec
from guardrails.core.roles import Span, role_spans, roles_from_offsets
from guardrails.core.scan_plan import merge_scan, plan_scan
from guardrails.core.semantics import ROLE_CODES, ROLES, RuleSpec, decide_scan, judge_fields, resolve_scan
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


def _num(v: float | None) -> float:
    return math.nan if v is None else float(v)


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

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return str(self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, tools=None,
                                         documents=None, **self._special))


class OnnxGuard:
    """Score texts with an exported guard (``guardrails export-onnx``) and onnxruntime only."""

    def __init__(self, folder: str | os.PathLike[str], *, threads: int | None = None,
                 providers: list[str] | None = None, judges: Mapping[str, Any] | None = None,
                 require_judges: bool = True) -> None:
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
        self.scan_actions: dict[str, str] = {r["id"]: r.get("scan_action") or "block" for r in self.rules
                                             if r.get("scan_action") or r["action"] == "steer"}
        """What would-be steering does in this scan (``semantics.scan_actions``; manifests before it: block)."""
        self.policy_name: str = self.manifest["policy"]["name"]
        roles = self.manifest["policy"].get("input_roles", ["user", "tool"])
        self.input_roles = frozenset(ROLE_CODES[r] for r in roles)
        """Role codes of the prompt turns input rules score (manifests before roles existed: user and tool)."""
        self._template_text = str(template or "")
        self.normalize = NormalizeSpec.model_validate(self.manifest["policy"].get("normalize", True))
        """The policy's ``normalize:`` steps (manifests written before it existed: the default, all on)."""
        self.judges: dict[str, Any] = {}
        """Cascade judges by name (see :mod:`guardrails.core.cascade`)."""
        self._bind(judges or {}, require_judges)

    def _bind(self, judges: Mapping[str, Any], require: bool) -> None:
        self.judges = {**self.judges, **{str(k): as_judge(v, str(k)) for k, v in judges.items()}}
        for i, rule in enumerate(self.rules):
            name = (rule.get("judge") or {}).get("name")
            if require and name is not None and name not in self.judges:
                raise JudgeError(f"{self.folder}: rules[{i}] ({rule['id']!r}) escalates to judge {name!r}, which is "
                                 f"not bound; pass judges={{{name!r}: ...}} (known judges: "
                                 f"{', '.join(sorted(self.judges)) or 'none bound'})")

    def with_judges(self, judges: Mapping[str, Any] | None = None, **by_name: Any) -> OnnxGuard:
        """This guard (same session) with cascade judges bound by name, added to those bound."""
        other = copy.copy(self)
        other._bind({**(judges or {}), **by_name}, True)
        return other

    @classmethod
    def load(cls, folder: str | os.PathLike[str], *, threads: int | None = None,
             providers: list[str] | None = None, judges: Mapping[str, Any] | None = None) -> OnnxGuard:
        """Open a folder written by :func:`export_onnx` (``judges``: the cascade's, by name)."""
        return cls(folder, threads=threads, providers=providers, judges=judges)

    @property
    def rule_ids(self) -> list[str]:
        return [r["id"] for r in self.rules]

    def format_prompt(self, text: str | list[dict[str, str]], chat: bool | None = None) -> str:
        """The prompt as the model sees it: one user turn (or the messages) through the chat template."""
        return self._prompt(text, chat)[0]

    def _prompt(self, text: str | list[dict[str, str]], chat: bool | None) -> tuple[str, list[Span] | None]:
        use_chat = self.chat if chat is None else chat
        if isinstance(text, str) and (not use_chat or self._template is None):
            return text, None
        if self._template is None:
            raise OnnxGuardError("messages need a chat template, and this guard folder has none")
        messages = [{"role": "user", "content": text}] if isinstance(text, str) else [dict(m) for m in text]
        template = self._template
        rendered = template.render(messages)
        return rendered, role_spans(lambda m: template.render(m, add_generation_prompt=False), messages, rendered,
                                    self._template_text)

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
        # -- issue 16 normalisation, as GuardedModel.score (guardrails/core/normalize.py) --
        plan = plan_scan(items, resp, self.normalize)
        items, resp = plan.items, plan.responses
        # -- end issue 16 --
        out: list[OnnxTextScore] = []
        for start in range(0, len(items), batch_size):
            out += self._score_batch(items[start : start + batch_size], resp[start : start + batch_size], chat, start)
        return merge_scan(plan, out)

    def _score_batch(self, texts: list[str], responses: list[str | None], chat: bool | None,
                     offset: int) -> list[OnnxTextScore]:
        rows: list[list[int]] = []
        n_prompt: list[int] = []
        role_rows: list[list[int]] = []
        judge_inputs = [judge_input_text(t, self.manifest["policy"].get("input_roles", ["user", "tool"]))
                        if isinstance(t, str | list) else "" for t in texts]  # what an input rule's judge reads
        for text, response in zip(texts, responses, strict=True):
            if not isinstance(text, str | list):
                raise TypeError(f"texts must be strings or message lists, got {type(text).__name__}")
            formatted, spans = self._prompt(text, chat)
            enc = self.tokenizer.encode(formatted, add_special_tokens=False)
            p_ids = list(enc.ids)
            r_ids = self.encode(response) if response else []
            rows.append(p_ids + r_ids)
            n_prompt.append(len(p_ids))
            role_rows.append(roles_from_offsets(enc.offsets, spans) + [ROLE_CODES["assistant"]] * len(r_ids))
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
            pos = np.arange(len(row))
            scorable = ~np.isin(np.array(row, dtype=np.int64), self.special_ids) & (pos > 0)
            is_output = pos >= n_prompt[b]
            roles = np.array(role_rows[b], dtype=np.int64)
            results.append(self._decide(raw[b, pad:], scorable, is_output, roles, n_prompt[b], row, offset + b, error,
                                        judge_inputs[b]))
        return results

    def _decide(self, raw: np.ndarray, scorable: np.ndarray, is_output: np.ndarray, roles: np.ndarray,
                n_prompt: int, row: list[int], sequence: int, error: str | None,
                judge_input: str | None = None) -> OnnxTextScore:
        tokens = [self.tokenizer.id_to_token(i) or "" for i in row]
        prompt_ok = ~is_output & np.isin(roles, sorted(self.input_roles))
        in_scope = [self._scope(rule, is_output, prompt_ok) & scorable for rule in self.rules]
        failed_layers: dict[int, str] = {}
        for r, rule in enumerate(self.rules):
            if error is not None:
                failed_layers[rule["layer"]] = error
            elif not np.isfinite(raw[scorable, r]).all():
                failed_layers.setdefault(rule["layer"], f"non-finite rule scores at layer {rule['layer']}")
        token_scores: dict[str, dict[int, float]] = {}
        scores: dict[str, float] = {}
        windowed: list[list[float | None]] = []
        for r, rule in enumerate(self.rules):
            s = np.where(in_scope[r], raw[:, r], np.nan).astype(np.float32)
            if rule["layer"] in failed_layers:
                s = np.full_like(s, np.nan)
            w = window_scores(s, rule["window"], rule["aggregate"])
            windowed.append([None if math.isnan(v) else float(v) for v in w.tolist()])
            ok = ~np.isnan(w)
            token_scores[rule["id"]] = {int(p): float(v) for p, v in zip(np.nonzero(ok)[0], w[ok], strict=True)}
            scores[rule["id"]] = float(w[ok].max()) if ok.any() else math.nan
        specs = [RuleSpec(r["id"], r["action"], float(r["threshold"]), r.get("block_above"), r["on_error"],
                          r.get("category"), r.get("escalate_above"), (r.get("judge") or {}).get("on_error", "block"),
                          (r.get("judge") or {}).get("name")) for r in self.rules]
        failed = {i: failed_layers[r["layer"]] for i, r in enumerate(self.rules) if r["layer"] in failed_layers}

        def ask(r: int, t: int) -> JudgeOutcome:  # the cascade: the text a torch scan's judge reads
            spec = self.rules[r]["judge"]
            out = bool(is_output[t])
            if out or judge_input is None:
                ids = row[n_prompt : t + 1] if out else [i for i, c in zip(row[:n_prompt], roles.tolist(), strict=False)
                                                         if int(c) in self.input_roles]
                text = str(self.tokenizer.decode(ids, skip_special_tokens=True)).strip()
            else:
                text = judge_input
            request = JudgeRequest(render_prompt(spec["prompt"], text), text, specs[r].id,
                                   "output" if out else "input", _num(windowed[r][t]), spec["name"],
                                   specs[r].category)
            return call_judge(self.judges.get(spec["name"]), request, spec.get("timeout_s"))

        events = decide_scan(specs, windowed, self.order, [list(m) for m in in_scope], failed, ask)
        decisions = []
        for e in events:
            t, out = e.position, bool(is_output[e.position])
            role = "assistant" if out else (ROLES[int(roles[t])] if 0 <= int(roles[t]) < len(ROLES) else None)
            decisions.append(Decision(
                e.action, specs[e.rule].id, e.score, e.threshold, t, "output" if out else "input",  # type: ignore[arg-type]
                sequence, t - n_prompt if out else None, tokens[t], reason=e.reason, resolution=e.resolution,
                role=role, category=specs[e.rule].category, **(judge_fields(e.judge) if e.judge else {}),
            ))
        names = [ROLES[int(c)] if 0 <= int(c) < len(ROLES) else None for c in roles]
        decisions = resolve_scan(decisions, self.scan_actions)
        return TextScore(scores, token_scores, decisions, tokens, sorted(set(failed_layers.values())), names)

    @staticmethod
    def _scope(rule: dict[str, Any], is_output: np.ndarray, prompt_ok: np.ndarray) -> np.ndarray:
        """Tokens ``rule`` scores by scope and prompt role (:func:`guardrails.core.semantics.scores_token`)."""
        if rule["scope"] == "input":
            return prompt_ok.copy()
        if rule["scope"] == "output":
            return is_output.copy()
        return prompt_ok | is_output
