"""Prompts and generation arguments: chat messages, batches, and the checks every entry point shares."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

Message = dict[str, str]
PromptLike = str | Sequence[Message]


def is_batch(prompt: Any) -> bool:
    if isinstance(prompt, str):
        return False
    if isinstance(prompt, Sequence) and prompt and all(isinstance(m, dict) for m in prompt):
        return False
    return isinstance(prompt, Sequence)


def check_messages(messages: Any) -> list[Message]:
    if not isinstance(messages, Sequence) or not messages:
        raise ValueError("a prompt must be a non-empty string or a non-empty list of {'role', 'content'} messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}] must be a dict with string 'role' and 'content', got {m!r:.80}")
        if m["role"] not in ("system", "user", "assistant", "tool"):
            raise ValueError(f"messages[{i}].role {m['role']!r} unknown; valid: system, user, assistant, tool")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def check_generation_args(
    prompts: list[str], max_new_tokens: int, temperature: float, top_p: float, top_k: int
) -> None:
    """The legacy check (prompts plus the four sampling numbers); :func:`generation_args` does the full one."""
    check_prompts(prompts)
    _check_numbers(max_new_tokens, temperature, top_p, top_k)


def check_prompts(prompts: list[str]) -> None:
    if not prompts:
        raise ValueError("no prompts given")
    for i, p in enumerate(prompts):
        check_text(p, f"prompt {i}")


def _check_numbers(max_new_tokens: Any, temperature: Any, top_p: Any, top_k: Any) -> None:
    if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int)
                                       or max_new_tokens < 1):
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if temperature is not None and not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k!r}")


# -- Hugging Face generation arguments -----------------------------------------------------------------------

DEFAULT_MAX_NEW_TOKENS = 64
LOOP_ARGS = ("logits_processor", "stopping_criteria", "streamer", "prefix_allowed_tokens_fn")
"""``model.generate`` arguments that are objects, not ``GenerationConfig`` fields."""
GUARD_ARGS = ("seed",)
"""Arguments of ours: ``seed`` seeds the sampler of this call (a private ``torch.Generator``)."""
_MODES = ("greedy_search", "sample")
_FLOATS = ("temperature", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "repetition_penalty",
           "encoder_repetition_penalty", "length_penalty")


@dataclass(frozen=True)
class GenerationArgs:
    """One call's generation settings, merged and checked once for ``generate`` and ``stream`` alike."""

    config: Any
    """The merged ``transformers.GenerationConfig``: model defaults < ``generation_config`` < keyword args."""
    logits_processor: Any = None
    """Extra ``LogitsProcessorList`` of the caller (merged with the config's own processors)."""
    stopping_criteria: Any = None
    """Extra ``StoppingCriteriaList`` of the caller."""
    streamer: Any = None
    """A ``transformers`` streamer: gets the prompt ids, then each token as it is released."""
    prefix_allowed_tokens_fn: Any = None
    """As in ``model.generate``: constrains the tokens allowed at each step."""
    seed: int | None = None
    """Seed of this call's sampler (None: a random seed)."""

    @property
    def do_sample(self) -> bool:
        return bool(self.config.do_sample)

    def max_new_tokens(self, prompt_length: int) -> int:
        """Tokens to generate after a prompt of ``prompt_length`` tokens (``max_length`` counts the prompt)."""
        if self.config.max_new_tokens is not None:
            return int(self.config.max_new_tokens)
        n = int(self.config.max_length) - prompt_length
        if n < 1:
            raise ValueError(f"max_length={self.config.max_length} leaves no room after the {prompt_length}-token "
                             "prompt; set max_new_tokens instead")
        return n


def generation_args(model: Any, tokenizer: Any, kwargs: dict[str, Any], *, batch_size: int = 1,
                    default_eos: list[int] | None = None) -> GenerationArgs:
    """Merge and check ``model.generate``-style arguments (``generation_config`` plus keyword arguments).

    The same merge as ``model.generate`` (model's ``generation_config`` < ``generation_config`` < keyword
    arguments); ``temperature=0`` means greedy; beam search, assisted and contrastive decoding and
    several return sequences are refused (a guard releases one token per sequence at a time); unknown
    names are an error listing the valid ones. Processors are built once here so that bad values fail
    before any token is generated (``stream`` fails where ``generate`` does).
    """
    from transformers import GenerationConfig

    kw = dict(kwargs)
    given = kw.pop("generation_config", None)
    if given is not None and not isinstance(given, GenerationConfig):
        raise TypeError(f"generation_config must be a transformers.GenerationConfig, got {type(given).__name__}")
    loop = {k: kw.pop(k, None) for k in LOOP_ARGS}
    seed = kw.pop("seed", None)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an integer, got {seed!r}")

    def setting(name: str) -> Any:
        return kw[name] if name in kw else getattr(given, name, None) if given is not None else None

    for name in _FLOATS:  # transformers' processors want floats: repetition_penalty=2 means 2.0
        if isinstance(kw.get(name), int) and not isinstance(kw[name], bool):
            kw[name] = float(kw[name])
    _check_numbers(setting("max_new_tokens"), setting("temperature"), setting("top_p"), setting("top_k"))
    if setting("temperature") == 0:  # the OpenAI convention: temperature 0 is greedy decoding
        kw["temperature"], kw["do_sample"] = None, False
    base_cfg = getattr(model, "generation_config", None)
    if setting("max_new_tokens") is None and setting("max_length") is None and getattr(
        base_cfg, "max_new_tokens", None
    ) is None:
        kw["max_new_tokens"] = DEFAULT_MAX_NEW_TOKENS
    if setting("eos_token_id") is None and default_eos:
        kw["eos_token_id"] = list(default_eos) if len(default_eos) > 1 else default_eos[0]
    if setting("pad_token_id") is None and getattr(tokenizer, "pad_token_id", None) is not None:
        kw["pad_token_id"] = tokenizer.pad_token_id
    if hasattr(model, "_prepare_generation_config"):
        import logging as _logging

        tf_log = _logging.getLogger("transformers.generation.utils")
        old = tf_log.level
        tf_log.setLevel(_logging.ERROR)  # the "generation_config together with kwargs" notice: we merge on purpose
        try:
            config, unused = model._prepare_generation_config(given, **kw)
        finally:
            tf_log.setLevel(old)
    else:  # not a transformers GenerationMixin
        config = GenerationConfig(**(base_cfg.to_dict() if base_cfg is not None else {}))
        if given is not None:
            config.update(**given.to_diff_dict())
        unused = config.update(**kw)
    unused = {k: v for k, v in unused.items() if k not in ("output_attentions", "output_hidden_states")}
    if unused:
        raise TypeError(f"unknown generation argument(s) {sorted(unused)}; valid: transformers.GenerationConfig "
                        f"fields (max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty, "
                        f"no_repeat_ngram_size, min_new_tokens, stop_strings, eos_token_id, ...), "
                        f"{', '.join(LOOP_ARGS + GUARD_ARGS)}, generation_config, chat, use_cache")
    if (config.num_beams or 1) != 1:
        raise ValueError(f"num_beams={config.num_beams}: beam search is not supported (a guard releases one token "
                         "per sequence at a time); valid: num_beams=1")
    if (config.num_return_sequences or 1) != 1:
        raise ValueError(f"num_return_sequences={config.num_return_sequences} is not supported; valid: 1 "
                         "(pass the prompt several times in a batch instead)")
    mode = str(getattr(config.get_generation_mode(), "value", config.get_generation_mode()))
    if mode not in _MODES:
        raise ValueError(f"generation mode {mode!r} is not supported; valid: greedy (do_sample=False) or "
                         "sampling (do_sample=True)")
    if loop["streamer"] is not None and batch_size != 1:
        raise ValueError(f"a streamer takes one prompt, got a batch of {batch_size}")
    if config.stop_strings is not None:
        stops = [config.stop_strings] if isinstance(config.stop_strings, str) else list(config.stop_strings)
        if not stops or not all(isinstance(s, str) and s for s in stops):
            raise ValueError(f"stop_strings must be a non-empty string or list of them, got {config.stop_strings!r}")
    args = GenerationArgs(config, seed=seed, **loop)
    try:
        build_processors(model, tokenizer, args, prompt_length=1, device="cpu")  # fail now on bad values
    except (ValueError, TypeError) as exc:
        named = ", ".join(f"{k}={v!r}" for k, v in sorted(kwargs.items()) if k not in LOOP_ARGS)
        what = named or "generation_config"
        raise type(exc)(f"generation arguments rejected by transformers ({what}): {exc}") from exc
    return args


def build_processors(model: Any, tokenizer: Any, args: GenerationArgs, prompt_length: int,
                     device: Any) -> tuple[Any, Any]:
    """Transformers' own ``LogitsProcessorList`` and ``StoppingCriteriaList`` for ``args`` (as generate builds)."""
    import copy

    from transformers import LogitsProcessorList, StoppingCriteriaList

    config = copy.copy(args.config)
    if config.max_new_tokens is not None:
        config.max_length = prompt_length + config.max_new_tokens
    if config.min_new_tokens is not None:
        config.min_length = prompt_length + config.min_new_tokens
    if not hasattr(model, "_get_logits_processor"):
        raise TypeError(f"{type(model).__name__} is not a transformers generation model (no _get_logits_processor)")
    model._prepare_special_tokens(config, True, device=device)
    processors = model._get_logits_processor(
        generation_config=config, input_ids_seq_length=prompt_length, encoder_input_ids=None,
        prefix_allowed_tokens_fn=args.prefix_allowed_tokens_fn,
        logits_processor=args.logits_processor if args.logits_processor is not None else LogitsProcessorList(),
        device=device, model_kwargs={},
    )
    stopping = model._get_stopping_criteria(
        generation_config=config,
        stopping_criteria=args.stopping_criteria if args.stopping_criteria is not None else StoppingCriteriaList(),
        tokenizer=tokenizer,
    )
    return processors, stopping


def check_text(text: Any, where: str) -> None:
    if not isinstance(text, str):
        raise TypeError(f"{where} must be a string, got {type(text).__name__}")
    if not text.strip():
        raise ValueError(f"{where} is empty")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{where} is not valid Unicode text (position {exc.start}: {exc.reason})") from None


_TOKENIZER_LOCKS = threading.Lock()
_LOCK_OF: weakref.WeakKeyDictionary[Any, threading.RLock] = weakref.WeakKeyDictionary()
_LOCK_BY_ID: dict[int, threading.RLock] = {}


def tokenizer_lock(tokenizer: Any) -> threading.RLock:
    """One lock per tokenizer: a fast tokenizer's padding and truncation settings are shared state that each
    call sets, so a padded batch on one thread and an unpadded call on another corrupt each other.

    Kept outside the tokenizer (a lock attribute would break ``copy.deepcopy`` and pickling of it).
    """
    with _TOKENIZER_LOCKS:
        try:
            lock = _LOCK_OF.get(tokenizer)
            if lock is None:
                lock = _LOCK_OF[tokenizer] = threading.RLock()
        except TypeError:  # not weak-referenceable
            lock = _LOCK_BY_ID.setdefault(id(tokenizer), threading.RLock())
        return lock


def render_prompt(tokenizer: Any, prompt: Any, use_chat: bool, spans: dict[str, Any], keep: int = 1024) -> str:
    """The prompt text the model sees: chat messages (or a string, as one user turn) via the template.

    Records the turn spans of the rendered text in ``spans`` (bounded to ``keep`` prompts, oldest dropped),
    so the roles of its tokens can be read back (:func:`guardrails.core.roles.token_roles`). A string
    without chat (or without a template) goes to the model as it is.
    """
    from guardrails.core.roles import hf_render, role_spans

    if isinstance(prompt, str):
        if not use_chat or not getattr(tokenizer, "chat_template", None):
            return prompt
        messages: list[Message] = [{"role": "user", "content": prompt}]
    else:
        messages = check_messages(prompt)
    text = str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    if len(spans) >= keep:
        spans.pop(next(iter(spans)), None)
    spans[text] = role_spans(hf_render(tokenizer), messages, text, str(getattr(tokenizer, "chat_template", "") or ""))
    return text
