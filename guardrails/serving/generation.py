"""``GuardedModel``: generation over a Hugging Face causal LM with the policy engine in the loop.

The loop is ours (greedy or sampled, KV cache, left-padded batches) so that a token is released only
after the forward pass that reads it has scored it: a blocked generation never shows a token at or
after the one that tripped a rule, streams hold back exactly one token, and steering applies from the
tripping step on every later cached step. The last generated token is scored by a forward that stops
at the deepest watched layer. With no rule firing, the output equals ``model.generate`` (greedy).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Generator, Sequence
from typing import Any

import torch
from torch import Tensor

from guardrails.core.decision import TextScore
from guardrails.core.policy import LinearDetector, Policy, PolicyError, SAEFeaturesDetector
from guardrails.engine.hooks import StopForward, decoder_layers, output_hooks, stop_after_layer
from guardrails.engine.run import Decision, GuardRun, StepContext
from guardrails.engine.scorers import LayerScorer
from guardrails.sae.model import SAE, SAEError
from guardrails.serving import decode
from guardrails.serving.prompts import Message, PromptLike, check_generation_args, check_messages, check_text, is_batch
from guardrails.serving.result import GenerationResult
from guardrails.serving.stream import GuardedStream

logger = logging.getLogger(__name__)



_LOCKS_GUARD = threading.Lock()


def _model_lock(model: Any) -> threading.RLock:
    with _LOCKS_GUARD:
        lock = getattr(model, "_guardrails_lock", None)
        if lock is None:
            lock = threading.RLock()
            model._guardrails_lock = lock
        return lock


class GuardedModel:
    """A causal LM guarded by a :class:`~guardrails.core.policy.Policy` (see the module docstring)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        policy: Policy | str | os.PathLike[str],
        *,
        saes: dict[str, SAE] | None = None,
        score_mode: str | None = None,
        chat: bool = True,
        audit: Any = None,
        keep_full_saes: bool = False,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.policy = policy if isinstance(policy, Policy) else Policy.from_path(policy)
        self.score_mode = score_mode or self.policy.score_mode
        if self.score_mode not in ("exact", "watched"):
            raise ValueError(f"unknown score_mode {self.score_mode!r}; valid: exact, watched")
        self.chat = chat
        if isinstance(audit, str | os.PathLike):
            from guardrails.audit.store import AuditStore

            audit = AuditStore(audit)
        self.audit = audit
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        layers = decoder_layers(model)
        self.n_layers = len(layers)
        hidden = int(getattr(model.config, "hidden_size", 0) or model.config.get_text_config().hidden_size)
        self.saes = self._load_saes(saes or {}, hidden)
        self.policy.check_against(self.n_layers, {k: s.d_sae for k, s in self.saes.items()})
        linear = self._load_linear(hidden)
        by_layer: dict[int, list[Any]] = {}
        for i, rule in enumerate(self.policy.rules):
            det = rule.detector
            layer = det.layer if isinstance(det, LinearDetector) else self.policy.saes[det.sae].layer
            by_layer.setdefault(layer, []).append((i, rule))
        self.scorers: dict[int, LayerScorer] = {}
        for layer, rules in by_layer.items():
            scorer = LayerScorer(layer, rules, self.policy, self.saes, linear, self.score_mode)
            if scorer.sae is None:
                here = [s for s, spec in self.policy.saes.items() if spec.layer == layer and s in self.saes]
                scorer.audit_sae = self.saes[here[0]] if here else None
            dev = next(layers[layer].parameters()).device
            self.scorers[layer] = scorer.to(dev)
        self.sae_configs = {sid: sae.cfg for sid, sae in self.saes.items()}
        """Config of each SAE the policy uses (kept when watched mode drops the weights)."""
        if self.score_mode == "watched" and not keep_full_saes:
            # only the watched encoder rows (and steering directions) stay in memory: a few KB instead of
            # the whole layer (2 GB for a Qwen3-8B W64K SAE); audits then list watched features only
            for scorer in self.scorers.values():
                scorer.release_full_sae()
            kept = {id(sc.audit_sae) for sc in self.scorers.values()}
            self.saes = {sid: s for sid, s in self.saes.items() if id(s) in kept}
        self.deepest = max(self.scorers)
        self._blocks = {layer: layers[layer] for layer in self.scorers}
        self._lock = _model_lock(model)
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        vocab = max(len(tokenizer), int(getattr(model.config, "vocab_size", 0) or 0), max(special, default=0) + 1)
        self._special_lut = torch.zeros(vocab, dtype=torch.bool)
        self._special_lut[torch.tensor(sorted(special), dtype=torch.long)] = True
        eos = model.generation_config.eos_token_id if getattr(model, "generation_config", None) else None
        eos_ids = {eos} if isinstance(eos, int) else set(eos or [])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        self._eos = torch.tensor(sorted(eos_ids), dtype=torch.long)
        import inspect

        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        model: str | None = None,
        *,
        policy: Policy | str | os.PathLike[str],
        dtype: str | torch.dtype | None = None,
        device: str | None = None,
        score_mode: str | None = None,
        audit: Any = None,
        **kwargs: Any,
    ) -> GuardedModel:
        """Load a model (the bundled SmolLM2-135M-Instruct by default) and guard it with ``policy``.

        ``audit``: an :class:`~guardrails.audit.store.AuditStore` or a database path; records every
        generation with decisions.
        """
        from guardrails.serving.models import load_model

        pol = policy if isinstance(policy, Policy) else Policy.from_path(policy)
        lm, tok = load_model(model or pol.model, dtype=dtype, device=device, **kwargs)
        return cls(lm, tok, pol, score_mode=score_mode, audit=audit)

    def _load_saes(self, given: dict[str, SAE], hidden: int) -> dict[str, SAE]:
        used = {r.detector.sae for r in self.policy.rules if isinstance(r.detector, SAEFeaturesDetector)}
        rule_layers = set(self.policy.layers())
        # an SAE declared at a layer where only linear rules read still explains their decisions
        used |= {sid for sid, spec in self.policy.saes.items() if spec.layer in rule_layers}
        out: dict[str, SAE] = {}
        for sid in sorted(used):
            spec = self.policy.saes[sid]
            sae = given.get(sid) or SAE.load(
                self.policy.resolve(spec.path), layer=spec.layer, k=spec.k, format=spec.format, dtype=spec.dtype
            )
            if sae.device.type == "meta" or any(t.is_meta for t in sae.tensors().values()):
                raise SAEError(f"SAE {sid!r} ({spec.path}) has no data (meta device); load it onto a real device")
            if sae.d_model != hidden:
                raise SAEError(
                    f"SAE {sid!r} ({spec.path}) reads d_model={sae.d_model} but the model's hidden size is {hidden}"
                )
            if sae.cfg.layer is not None and sae.cfg.layer != spec.layer:
                logger.warning(
                    "SAE %r was trained at layer %s but the policy reads layer %s", sid, sae.cfg.layer, spec.layer
                )
            out[sid] = sae
        return out

    def _load_linear(self, hidden: int) -> dict[str, tuple[Tensor, Tensor]]:
        from safetensors.torch import load_file

        out = {}
        for i, rule in enumerate(self.policy.rules):
            det = rule.detector
            if not isinstance(det, LinearDetector):
                continue
            path = self.policy.resolve(det.weights)
            try:
                t = load_file(path)
            except Exception as exc:
                raise PolicyError(f"rules[{i}].detector.weights: cannot read {path!r}: {exc}") from exc
            w = t.get("weight")
            if w is None or tuple(w.shape) != (hidden,):
                shape = None if w is None else tuple(w.shape)
                raise PolicyError(f"rules[{i}].detector.weights: 'weight' must have shape ({hidden},), got {shape}")
            out[rule.id] = (w.float(), t.get("bias", torch.zeros(())).float())
        return out

    # -- prompts --------------------------------------------------------------------------------------
    def format_prompt(self, prompt: PromptLike, chat: bool | None = None) -> str:
        """The prompt text the model sees: chat messages (or a string, as one user turn) via the template."""
        use_chat = self.chat if chat is None else chat
        if isinstance(prompt, str):
            if not use_chat or not getattr(self.tokenizer, "chat_template", None):
                return prompt
            messages: list[Message] = [{"role": "user", "content": prompt}]
        else:
            messages = check_messages(prompt)
        return str(self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))

    # -- the loop -------------------------------------------------------------------------------------
    def _new_run(self, prompt_lengths: list[int]) -> GuardRun:
        return GuardRun(self.policy, self.scorers, len(prompt_lengths), prompt_lengths)

    def _hooks(self, run: GuardRun) -> dict[int, Any]:
        return {layer: run.on_layer for layer in self.scorers}

    def _scorable(self, ids: Tensor, mask: Tensor, positions: Tensor) -> Tensor:
        if self._special_lut.device != ids.device:
            self._special_lut = self._special_lut.to(ids.device)
        special = self._special_lut[ids.clamp(0, len(self._special_lut) - 1)]
        return mask.bool() & ~special & (positions > 0)
    def _steps(
        self, prompts: list[str], max_new_tokens: int, sampling: dict[str, Any], use_cache: bool = True
    ) -> Generator[tuple[GuardRun, list[list[int]], bool], None, None]:
        """Yield ``(run, released ids per sequence, done)`` after each step (see :func:`.decode.steps`)."""
        return decode.steps(self, prompts, max_new_tokens, sampling, use_cache)

    def _forward(self, run: GuardRun, kwargs: dict[str, Any], *, truncated: bool) -> Tensor | None:
        return decode.forward(self, run, kwargs, truncated=truncated)

    # -- public API -------------------------------------------------------------------------------------
    def generate(
        self,
        prompt: PromptLike | Sequence[PromptLike],
        *,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        chat: bool | None = None,
        use_cache: bool = True,
    ) -> GenerationResult | list[GenerationResult]:
        """Generate under the policy. A list of prompts is a batch (guarded per sequence)."""
        batch = is_batch(prompt)
        items: list[Any] = list(prompt) if batch else [prompt]
        prompts = [self.format_prompt(p, chat) for p in items]
        check_generation_args(prompts, max_new_tokens, temperature, top_p, top_k)
        sampling = {"do_sample": do_sample, "temperature": temperature, "top_p": top_p, "top_k": top_k, "seed": seed}
        last: tuple[GuardRun, list[list[int]], bool] | None = None
        with torch.inference_mode():
            for last in self._steps(prompts, max_new_tokens, sampling, use_cache=use_cache):  # noqa: B007
                pass
        assert last is not None
        run, released, _ = last
        results = [self._result(run, b, prompts[b], released[b]) for b in range(len(prompts))]
        results = [self._audit(r) for r in results]
        return results if batch else results[0]

    def _audit(self, result: GenerationResult) -> GenerationResult:
        """Write the audit record of a result with decisions; if that fails, apply on_error."""
        if self.audit is None or not result.decisions:
            return result
        try:
            self.audit.record(result, self)
        except Exception as exc:
            reason = f"audit record failed: {type(exc).__name__}: {exc}"
            logger.error("%s", reason)
            result.errors.append(reason)
            if self.policy.on_error == "block":
                result.blocked = True
                result.text = self.policy.refusal
                result.released_text = ""
            result.decisions.append(Decision(
                action="error", rule="(audit)", score=float("nan"), threshold=float("nan"),
                position=-1, scope="output", reason=reason, resolution=self.policy.on_error,
            ))
        return result

    def stream(self, prompt: PromptLike, **kwargs: Any) -> GuardedStream:
        """Iterate over text pieces as tokens are released; ``.result`` holds the outcome afterwards."""
        return GuardedStream(self, prompt, **kwargs)

    @torch.inference_mode()
    def score(
        self,
        texts: Sequence[str] | str,
        *,
        responses: Sequence[str | None] | None = None,
        chat: bool | None = None,
        batch_size: int = 8,
    ) -> list[TextScore]:
        """Scan texts with one prefill pass each (stopped at the deepest watched layer), no generation.

        A text alone is scored as a prompt (input rules; wrapped in the chat template unless
        ``chat=False``). With ``responses``, each response is appended as the assistant turn and its
        tokens are scored by output rules.
        """
        items = [texts] if isinstance(texts, str) else list(texts)
        resp: list[str | None] = list(responses) if responses is not None else [None] * len(items)
        if len(resp) != len(items):
            raise ValueError(f"responses has {len(resp)} items but texts has {len(items)}")
        out: list[TextScore] = []
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            rchunk = resp[start : start + batch_size]
            out += self._score_batch(chunk, rchunk, chat, offset=start)
        return out

    def _score_batch(
        self, texts: list[str], responses: list[str | None], chat: bool | None, offset: int = 0
    ) -> list[TextScore]:
        tok = self.tokenizer
        rows: list[list[int]] = []
        n_prompt: list[int] = []
        for text, response in zip(texts, responses, strict=True):
            check_text(text, f"texts[{len(rows) + offset}]")
            if response is not None and response:
                check_text(response, f"responses[{len(rows) + offset}]")
            p_ids = tok(self.format_prompt(text, chat), add_special_tokens=False)["input_ids"]
            if not p_ids:
                raise ValueError(f"texts[{len(rows) + offset}] produced no tokens")
            r_ids = tok(response, add_special_tokens=False)["input_ids"] if response else []
            rows.append(list(p_ids) + list(r_ids))
            n_prompt.append(len(p_ids))
        width = max(len(r) for r in rows)
        pad = int(tok.pad_token_id)
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        positions = (mask.cumsum(1) - 1).masked_fill(mask == 0, -1)
        is_output = positions >= torch.tensor(n_prompt)[:, None]
        run = GuardRun(self.policy, self.scorers, len(rows), n_prompt, steer=False)
        run.ctx = StepContext(positions, self._scorable(ids, mask, positions), is_output, mask.bool())
        device = self.model.device if hasattr(self.model, "device") else torch.device("cpu")
        with self._lock, output_hooks(self.model, self._hooks(run)), stop_after_layer(self.model, self.deepest):
            try:
                self.model(
                    input_ids=ids.to(device), attention_mask=mask.to(device),
                    position_ids=positions.masked_fill(mask == 0, 1).to(device), use_cache=False,
                )
            except StopForward:
                pass
        results = []
        for b, row in enumerate(rows):
            ts = run.token_scores(b)
            scores = {rid: (max(v.values()) if v else float("nan")) for rid, v in ts.items()}
            decisions = [Decision(**{**d.__dict__, "sequence": offset + b}) for d in run.decisions if d.sequence == b]
            results.append(TextScore(scores, ts, decisions, tok.convert_ids_to_tokens(row)))
        return results

    def _result(self, run: GuardRun, b: int, prompt: str, released: list[int]) -> GenerationResult:
        tok = self.tokenizer
        decisions = [d for d in run.decisions if d.sequence == b]
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        blocked = run.blocked_at[b] is not None
        shown = tok.decode(released, skip_special_tokens=True)
        all_ids = list(prompt_ids) + released
        if blocked:
            at = int(run.blocked_at[b])  # type: ignore[arg-type]
            extra = at - len(all_ids) + 1
            if extra > 0:  # the tripping token itself, kept only for the audit trace
                all_ids = all_ids + [run.tripping_token.get(b, tok.pad_token_id)] * extra
        tokens = tok.convert_ids_to_tokens(all_ids)
        def token_text(pos: int) -> str | None:
            return str(tok.decode([all_ids[pos]])) if 0 <= pos < len(all_ids) else None

        decisions = [Decision(**{**d.__dict__, "token": token_text(d.position)}) for d in decisions]
        rule = next((r for r in self.policy.rules if r.id == run.block_rule[b]), None)
        refusal = (rule.message if rule and rule.message else None) or self.policy.refusal
        return GenerationResult(
            text=refusal if blocked else shown,
            blocked=blocked,
            steered=run.steered(b),
            decisions=decisions,
            prompt=prompt,
            released_text=shown,
            output_ids=released,
            tokens=tokens,
            token_scores=run.token_scores(b),
            prompt_length=len(prompt_ids),
            policy=self.policy.name,
            errors=list(run.errors),
            token_features=run.token_features(b),
        )


__all__ = ["GenerationResult", "GuardedModel", "GuardedStream", "Message", "PromptLike"]
