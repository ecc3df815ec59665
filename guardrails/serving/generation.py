"""``GuardedModel``: generation over a Hugging Face causal LM with the policy engine in the loop.

The loop is ours (greedy or sampled, KV cache, left-padded batches) so that a token is released only
after the forward pass that reads it has scored it: a blocked generation never shows a token at or
after the one that tripped a rule, streams hold back exactly one token, and steering applies from the
tripping step on every later cached step. The last generated token is scored by a forward that stops
at the deepest watched layer. With no rule firing, the output equals ``model.generate`` (greedy).
"""

from __future__ import annotations

import copy
import logging
import os
import threading
from collections.abc import Generator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from guardrails.core.cascade import bind_judges, judge_input_text
from guardrails.core.decision import TextScore
from guardrails.core.policy import Policy
from guardrails.core.roles import Span, token_roles
from guardrails.core.scan_plan import merge_scan, plan_scan  # issue 16
from guardrails.core.semantics import ROLE_CODES, ROLES, refusal_for
from guardrails.engine.compile import CompiledPolicy, compile_policy
from guardrails.engine.hooks import decoder_layers
from guardrails.engine.run import Decision, GuardRun
from guardrails.engine.scorers import LayerScorer
from guardrails.sae.model import SAE
from guardrails.serving import decode
from guardrails.serving.failsafe import result_or_on_error  # issue 16
from guardrails.serving.judging import escalates
from guardrails.serving.prescan import apply_prescan, prescan  # issue 16
from guardrails.serving.prompts import (
    GenerationArgs,
    Message,
    PromptLike,
    check_prompts,
    generation_args,
    is_batch,
    render_prompt,
    tokenizer_lock,
)
from guardrails.serving.result import GenerationResult, token_text, traced_ids
from guardrails.serving.scan import score_batch
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
        policy: Policy | CompiledPolicy | str | os.PathLike[str],
        *,
        saes: dict[str, SAE] | None = None,
        score_mode: str | None = None,
        chat: bool = True,
        audit: Any = None,
        keep_full_saes: bool = False,
        judges: Mapping[str, Any] | None = None,
        require_judges: bool = True,
    ) -> None:
        """``judges``: the cascade's second-stage judges by name (callables or LangChain chat models; see
        :mod:`guardrails.core.cascade`). With ``require_judges`` (default), a judge an escalating rule names but
        no one bound is an error here, naming the rule and the judges given."""
        self.model = model
        self.tokenizer = tokenizer
        self.compiled: CompiledPolicy
        if isinstance(policy, CompiledPolicy):
            if saes is not None or (score_mode is not None and score_mode != policy.score_mode):
                raise ValueError("saes= and score_mode= belong to compile_policy(); this policy is already compiled")
            self.compiled = policy
        else:
            self.compiled = compile_policy(policy, model, saes, score_mode, keep_full_saes=keep_full_saes)
        if judges is not None:  # the cascade: bind by name, check every escalating rule has one
            self.compiled = self.compiled.with_judges(judges, require=require_judges)
        elif require_judges:
            bind_judges(self.compiled.policy, self.compiled.judges)  # raises naming a rule whose judge is unbound
        self.chat = chat
        from guardrails.serving.sink import resolve_audit

        self.audit = resolve_audit(audit, self.policy)  # audit=, else GUARDRAILS_AUDIT_DB, else the policy's audit.db
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        layers = decoder_layers(model)
        self._blocks = {layer: layers[layer] for layer in self.scorers}
        self._spans: dict[str, list[Span]] = {}
        self._judge_inputs: dict[str, str] = {}
        """What an input rule's judge reads, by prompt text (bounded; see :meth:`format_prompt`)."""
        """Role spans of recently formatted prompts, by prompt text (bounded; see :meth:`format_prompt`)."""
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

    # -- the compiled policy ------------------------------------------------------------------------
    @property
    def policy(self) -> Policy:
        """The policy this guard applies."""
        return self.compiled.policy

    @property
    def score_mode(self) -> str:
        return self.compiled.score_mode

    @property
    def scorers(self) -> dict[int, LayerScorer]:
        return self.compiled.scorers

    @property
    def saes(self) -> dict[str, SAE]:
        return self.compiled.saes

    @property
    def sae_configs(self) -> dict[str, Any]:
        """Config of each SAE the policy uses (kept when watched mode drops the weights)."""
        return self.compiled.sae_configs

    @property
    def n_layers(self) -> int:
        return self.compiled.n_layers

    @property
    def deepest(self) -> int:
        return self.compiled.deepest

    def with_judges(self, judges: Mapping[str, Any] | None = None, **by_name: Any) -> GuardedModel:
        """This guard with cascade judges bound by name (added to those bound), sharing model and tensors."""
        other = copy.copy(self)
        other.compiled = self.compiled.with_judges({**(judges or {}), **by_name})
        return other

    def with_policy(self, policy: Policy | str | os.PathLike[str], *, saes: dict[str, SAE] | None = None,
                    score_mode: str | None = None, audit: Any = None,
                    judges: Mapping[str, Any] | None = None) -> GuardedModel:
        """A guard with ``policy`` (a file or a shipped name) on this guard's model and tokenizer, nothing reloaded
        but ``policy``'s SAEs and probes (or ``saes``, already loaded): e.g. an input guard with
        ``harmful-requests`` and an output guard with ``harmful-compliance`` around one hosted model.
        ``audit``: default this guard's store."""
        return GuardedModel(self.model, self.tokenizer, policy, saes=saes, score_mode=score_mode, chat=self.chat,
                            audit=audit if audit is not None else self.audit, judges=judges)

    def scoped(self, mode: Literal["input", "output"]) -> GuardedModel:
        """This guard with only its ``mode`` rules (``both`` rules rescoped), sharing model, tokenizer and tensors."""
        other = copy.copy(self)
        other.compiled = self.compiled.scoped(mode)
        other._blocks = {layer: self._blocks[layer] for layer in other.scorers}
        return other

    def __repr__(self) -> str:
        name = getattr(self.model.config, "_name_or_path", type(self.model).__name__)
        return (f"GuardedModel(policy={self.policy.name!r}, model={name!r}, rules={len(self.policy.rules)}, "
                f"layers={sorted(self.scorers)}, score_mode={self.score_mode!r})")

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
        judges: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> GuardedModel:
        """Load a model (the bundled SmolLM2-135M-Instruct by default) and guard it with ``policy``.

        ``audit``: an :class:`~guardrails.audit.store.AuditStore` or a database path; records every
        generation with decisions. ``judges``: the cascade's judges by name (see ``__init__``).
        """
        from guardrails.serving.models import load_model

        pol = policy if isinstance(policy, Policy) else Policy.from_path(policy)
        lm, tok = load_model(model or pol.model, dtype=dtype, device=device, **kwargs)
        return cls(lm, tok, pol, score_mode=score_mode, audit=audit, judges=judges)

    # -- prompts --------------------------------------------------------------------------------------
    def format_prompt(self, prompt: PromptLike, chat: bool | None = None) -> str:
        """The prompt text the model sees: chat messages (or a string, as one user turn) via the template."""
        text = render_prompt(self.tokenizer, prompt, self.chat if chat is None else chat, self._spans)
        if self.compiled.judges or escalates(self.policy):  # the cascade: what an input rule's judge reads
            if len(self._judge_inputs) >= 1024:
                self._judge_inputs.pop(next(iter(self._judge_inputs)), None)
            self._judge_inputs[text] = judge_input_text(prompt, self.policy.input_roles)
        return text

    # -- the loop -------------------------------------------------------------------------------------
    def _new_run(self, prompt_lengths: list[int], prompts: list[str] | None = None) -> GuardRun:
        run = self.compiled.new_run(prompt_lengths)
        if prompts is not None:
            run.prompt_roles = [self.prompt_roles(p) for p in prompts]
            if self.compiled.steers:  # steering gated by a deeper input rule: scan the prompts first (steering.py)
                from guardrails.engine.policy_steering import arm_from_scan

                arm_from_scan(self, run, prompts)
        return run

    @staticmethod
    def _role_names(run: GuardRun, b: int, n_tokens: int, n_prompt: int) -> list[str | None]:
        codes = run.prompt_roles[b] if run.prompt_roles else [ROLE_CODES["user"]] * n_prompt
        names: list[str | None] = [ROLES[c] if 0 <= c < len(ROLES) else None for c in codes[:n_prompt]]
        return names + ["assistant"] * (n_tokens - len(names))

    def prompt_roles(self, prompt_text: str) -> list[int]:
        """Role code of each token of a formatted prompt (``ROLE_CODES``; all user for a raw string)."""
        with tokenizer_lock(self.tokenizer):
            return token_roles(self.tokenizer, prompt_text, self._spans.get(prompt_text))

    def _hooks(self, run: GuardRun) -> dict[int, Any]:
        return {layer: run.on_layer for layer in self.compiled.hooked_layers}  # fed and steered layers too

    def _scorable(self, ids: Tensor, mask: Tensor, positions: Tensor) -> Tensor:
        if self._special_lut.device != ids.device:
            self._special_lut = self._special_lut.to(ids.device)
        special = self._special_lut[ids.clamp(0, len(self._special_lut) - 1)]
        return mask.bool() & ~special & (positions > 0)
    def _steps(
        self, prompts: list[str], max_new_tokens: int | None, sampling: GenerationArgs | dict[str, Any],
        use_cache: bool = True,
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
        chat: bool | None = None,
        use_cache: bool = True,
        **kwargs: Any,
    ) -> GenerationResult | list[GenerationResult]:
        """Generate under the policy. A list of prompts is a batch (guarded per sequence).

        Takes ``model.generate``'s vocabulary: ``generation_config``, any ``GenerationConfig`` field
        (``max_new_tokens`` (default 64), ``do_sample``, ``temperature`` (0 = greedy), ``top_k``, ``top_p``,
        ``repetition_penalty``, ``no_repeat_ngram_size``, ``min_new_tokens``, ``stop_strings``,
        ``eos_token_id``, ...), ``logits_processor``, ``stopping_criteria``, ``streamer``, plus ``seed``.
        With no rule firing, the output equals ``model.generate`` with the same arguments.
        """
        batch = is_batch(prompt)
        items: list[Any] = list(prompt) if batch else [prompt]
        prompts = [self.format_prompt(p, chat) for p in items]
        check_prompts(prompts)
        args = self.generation_args(kwargs, batch_size=len(prompts))
        last: tuple[GuardRun, list[list[int]], bool] | None = None
        with torch.inference_mode():
            for last in self._steps(prompts, None, args, use_cache=use_cache):  # noqa: B007
                pass
        assert last is not None
        run, released, _ = last
        # issue 16: a failure building a result after scoring follows on_error (guardrails/serving/failsafe.py)
        results = [result_or_on_error(self, run, b, prompts[b], released[b]) for b in range(len(prompts))]
        # -- issue 16 normalisation (guardrails/serving/prescan.py): the model generated from the original
        #    prompt; the normalized/decoded prompt is scored on the side (a no-op when nothing changes) --
        results = apply_prescan(self, prescan(self, items, chat), results)
        # -- end issue 16 --
        results = [self._audit(r) for r in results]
        return results if batch else results[0]

    def generation_args(self, kwargs: dict[str, Any], batch_size: int = 1) -> GenerationArgs:
        """The checked settings of one call (shared by ``generate`` and ``stream``; see :func:`.generation_args`)."""
        return generation_args(self.model, self.tokenizer, kwargs, batch_size=batch_size,
                               default_eos=self._eos.tolist())

    def _audit(self, result: GenerationResult) -> GenerationResult:
        """Write the audit record of every generation; if that fails, apply on_error."""
        if self.audit is None:
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
        texts: Sequence[PromptLike] | PromptLike,
        *,
        responses: Sequence[str | None] | None = None,
        chat: bool | None = None,
        batch_size: int = 8,
    ) -> list[TextScore]:
        """Scan texts with one prefill pass each (stopped at the deepest watched layer), no generation.

        A text (or a conversation: a list of ``{"role", "content"}`` messages) is scored as a prompt:
        input rules read the turns the policy's ``input_roles`` name (wrapped in the chat template
        unless ``chat=False``). With ``responses``, each response is appended as the assistant turn and
        its tokens are scored by output rules. The decisions are those generation would take at these
        tokens (``block_above`` included); a scan does not steer, so rules deeper than a firing steer
        rule read unsteered activations here, and a steer decision does what its rule's ``steer.scan_action``
        says (its ``resolution``: block by default, or flag).
        """
        items: list[Any] = [texts] if not is_batch(texts) else list(texts)
        resp: list[str | None] = list(responses) if responses is not None else [None] * len(items)
        if len(resp) != len(items):
            raise ValueError(f"responses has {len(resp)} items but texts has {len(items)}")
        # -- issue 16 normalisation (guardrails/core/normalize.py): score the normalized texts, and each decoded
        #    base64/hex/percent/tags segment as one more text whose decisions count for its origin --
        plan = plan_scan(items, resp, self.policy.normalize)
        items, resp = plan.items, plan.responses
        # -- end issue 16 --
        out: list[TextScore] = []
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            rchunk = resp[start : start + batch_size]
            out += score_batch(self, chunk, rchunk, chat, offset=start)
        return merge_scan(plan, out)  # issue 16: the first len(texts) scores, decoded decisions merged

    def _result(self, run: GuardRun, b: int, prompt: str, released: list[int]) -> GenerationResult:
        tok = self.tokenizer
        decisions = sorted((d for d in run.decisions if d.sequence == b), key=lambda d: d.position)
        with tokenizer_lock(tok):
            prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        blocked = run.blocked_at[b] is not None
        shown = tok.decode(released, skip_special_tokens=True)
        all_ids = traced_ids(prompt_ids, released, run.blocked_at[b], run.tripping_token.get(b, tok.pad_token_id))
        tokens = tok.convert_ids_to_tokens(all_ids)
        decisions = [Decision(**{**d.__dict__, "token": token_text(tok, all_ids, d.position)}) for d in decisions]
        refusal = refusal_for(self.policy, run.block_rule[b])
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
            roles=self._role_names(run, b, len(tokens), len(prompt_ids)),
        )


__all__ = ["GenerationResult", "GuardedModel", "GuardedStream", "Message", "PromptLike"]
