"""The decode loop: prefill, then one token per step with the policy's hooks in every forward.

A token is released only after the forward pass that reads it has scored it: a blocked generation never
shows a token at or after the one that tripped a rule, and steering applies from the tripping step on
every later cached step. The last generated token is scored by a forward cut at the deepest watched layer.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from guardrails.engine.hooks import StopForward, output_hooks, stop_after_layer
from guardrails.engine.run import GuardRun, StepContext
from guardrails.serving.judging import decode_text_source, escalates
from guardrails.serving.prompts import GenerationArgs, build_processors, generation_args, tokenizer_lock

if TYPE_CHECKING:
    from guardrails.serving.generation import GuardedModel


def steps(
    guard: GuardedModel,
    prompts: list[str],
    max_new_tokens: int | None,
    sampling: GenerationArgs | dict[str, Any],
    use_cache: bool = True,
) -> Generator[tuple[GuardRun, list[list[int]], bool], None, None]:
    """Yield ``(run, released ids per sequence, done)`` after each forward; hooks live for the whole loop.

    ``sampling``: checked :class:`~guardrails.serving.prompts.GenerationArgs`, or a legacy dict
    (``do_sample``, ``temperature``, ``top_p``, ``top_k``, ``seed``). ``max_new_tokens`` overrides the
    args' own. Each step is as in ``model.generate``: transformers' logits processors on the sequences
    so far (left padding included), argmax or a draw, pad after a row ends, then its stopping
    criteria. A token is released after the next forward has scored it; end-of-sequence tokens are not
    released (nor scored); a token that completes a stop string is scored by one more forward
    (truncated at the deepest watched layer when no row goes on) and then released.
    """
    args = sampling if isinstance(sampling, GenerationArgs) else _legacy_args(guard, sampling, max_new_tokens)
    tok = guard.tokenizer
    # padding side per call: never flip the caller's (shared) tokenizer, which concurrent calls would race on
    with tokenizer_lock(tok):
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False, padding_side="left")
    device = guard.model.device if hasattr(guard.model, "device") else torch.device("cpu")
    ids = enc["input_ids"].to(device)
    mask = enc["attention_mask"].to(device)
    empty = [i for i, n in enumerate(mask.sum(1).tolist()) if n == 0] if ids.numel() else list(range(len(prompts)))
    if empty:
        raise ValueError(f"prompt(s) {empty} produced no tokens (the tokenizer drops their characters)")
    B = ids.shape[0]
    max_new = int(max_new_tokens) if max_new_tokens is not None else args.max_new_tokens(ids.shape[1])
    if isinstance(sampling, GenerationArgs) and max_new_tokens is not None:
        args = GenerationArgs(**{**args.__dict__, "config": _with(args.config, max_new_tokens=max_new)})
    processors, stopping = build_processors(guard.model, tok, args, ids.shape[1], device)
    eos = _eos_ids(args, guard).to(device)
    pad = int(args.config.pad_token_id if args.config.pad_token_id is not None else tok.pad_token_id)
    lengths = mask.sum(1).tolist()
    run = guard._new_run([int(n) for n in lengths], prompts)
    positions = (mask.cumsum(1) - 1).masked_fill(mask == 0, -1)
    gen = _sampler(args)
    streamer = args.streamer
    if streamer is not None:
        streamer.put(ids.cpu())
    released: list[list[int]] = [[] for _ in range(B)]
    ended = torch.zeros(B, dtype=torch.bool, device=device)  # the row generates no more tokens
    pending: Tensor | None = None  # token of each row produced but not yet scored
    live = torch.zeros(B, dtype=torch.bool, device=device)  # pending holds a token to score and release
    all_ids, all_mask, all_pos = ids, mask, positions
    is_output = torch.zeros_like(mask, dtype=torch.bool)
    scores_output, hooks_decode = guard.compiled.scores_output, guard.compiled.hooks_decode
    past: Any = None
    try:
        for step in range(max_new + 1):
            # the last forward only scores: no row goes on after it
            last = step == max_new or (step > 0 and bool(ended.all()))
            if step == 0:
                cur_ids = ids
                score = guard._scorable(ids, mask, positions)
                past = _new_cache(guard.model) if use_cache else None
            else:
                assert pending is not None
                new_pos = all_pos.max(1).values + 1
                all_mask = torch.cat([all_mask, torch.ones_like(pending)[:, None]], 1)
                all_pos = torch.cat([all_pos, new_pos[:, None]], 1)
                is_output = torch.cat([is_output, torch.ones_like(pending, dtype=torch.bool)[:, None]], 1)
                active = live & torch.tensor([run.active(b) for b in range(B)], device=device)
                new_score = guard._scorable(pending[:, None], torch.ones_like(pending)[:, None], new_pos[:, None])
                new_score &= active[:, None] & scores_output  # input-only policies: nothing to score here
                if use_cache:
                    cur_ids = pending[:, None]
                    score = new_score
                else:
                    cur_ids = all_ids
                    score = torch.cat([torch.zeros_like(all_mask[:, :-1], dtype=torch.bool), new_score], 1)
            # the columns this forward sees: the whole sequence at prefill or without a cache, else the new token
            T = cur_ids.shape[1]
            cur_pos, cur_mask = all_pos[:, -T:], all_mask[:, -T:]
            run.ctx = StepContext(
                positions=cur_pos, score_mask=score, is_output=is_output[:, -T:], steer_mask=cur_mask.bool()
            )
            kwargs: dict[str, Any] = {
                "input_ids": cur_ids,
                "attention_mask": all_mask,
                "position_ids": cur_pos.masked_fill(cur_mask == 0, 1),  # padding: any valid id, it is masked
                "use_cache": use_cache,
            }
            if use_cache:
                kwargs[guard._cache_kw] = past
                kwargs["logits_to_keep"] = 1
            if run.judges or escalates(guard.policy):  # the cascade's judges read these rows (after the forward)
                run.judge_text = decode_text_source(guard, run, all_ids, all_mask, prompts)
            # the last forward only scores the pending token: skipped when no rule reads generated tokens
            skip = last and step > 0 and not scores_output
            logits = None if skip else forward(guard, run, kwargs, truncated=last, hooked=step == 0 or hooks_decode)
            run.check_all_scored()
            run.ctx = None
            # release the tokens this forward scored (those of rows still active)
            if pending is not None:
                for b in range(B):
                    if bool(live[b]) and run.active(b):
                        released[b].append(int(pending[b]))
                        if streamer is not None:
                            streamer.put(pending[b : b + 1].cpu())
            # rows blocked now stop; their tripping token is withheld (kept for the audit trace only)
            for b in range(B):
                if not run.active(b) and not bool(ended[b] & ~live[b]):
                    if pending is not None and bool(live[b]) and run.blocked_at[b] == int(all_pos[b, -1]):
                        run.tripping_token[b] = int(pending[b])
                    ended[b] = True
                    live[b] = False
            if logits is None:
                yield run, released, True
                return
            scores = processors(all_ids, logits.float())
            nxt = _next_token(scores, args.do_sample, gen)
            nxt = torch.where(ended, torch.full_like(nxt, pad), nxt)
            all_ids = torch.cat([all_ids, nxt[:, None]], 1)
            stop = stopping(all_ids, scores).to(device)
            is_eos = torch.isin(nxt, eos) & ~ended
            live = ~ended & ~is_eos
            ended = ended | is_eos | stop
            pending = nxt
            done = bool((ended & ~live).all())  # nothing left to score either
            yield run, released, done
            if done:
                return
    finally:
        if streamer is not None:
            streamer.end()


def _with(config: Any, **updates: Any) -> Any:
    import copy

    out = copy.copy(config)
    for k, v in updates.items():
        setattr(out, k, v)
    return out


def _legacy_args(guard: GuardedModel, sampling: dict[str, Any], max_new_tokens: int | None) -> GenerationArgs:
    """``GenerationArgs`` of a dict of the five settings earlier callers pass."""
    kw: dict[str, Any] = {"do_sample": bool(sampling.get("do_sample")), "max_new_tokens": max_new_tokens,
                          "seed": sampling.get("seed")}
    if kw["do_sample"]:
        kw.update(temperature=sampling.get("temperature", 1.0), top_p=sampling.get("top_p", 1.0),
                  top_k=int(sampling.get("top_k") or 0))
    return generation_args(guard.model, guard.tokenizer, kw, default_eos=guard._eos.tolist())


def _eos_ids(args: GenerationArgs, guard: GuardedModel) -> Tensor:
    eos = args.config.eos_token_id
    if eos is None:
        return guard._eos
    return torch.tensor([eos] if isinstance(eos, int) else list(eos), dtype=torch.long)


def forward(guard: GuardedModel, run: GuardRun, kwargs: dict[str, Any], *, truncated: bool,
            hooked: bool = True) -> Tensor | None:
    """One forward with this run's hooks (none with ``hooked=False``: a decode step of a policy that neither
    scores nor steers generated tokens), under the model's lock; hooks exist only for its duration.

    Registering per step (microseconds) keeps a suspended stream from touching other calls of
    the shared model, and lets threads interleave their steps.
    """
    with guard._lock, output_hooks(guard.model, guard._hooks(run) if hooked else {}, guard._blocks):
        if truncated:
            try:
                with stop_after_layer(guard.model, guard.deepest, guard._blocks[guard.deepest]):
                    guard.model(**kwargs)
            except StopForward:
                pass
            return None
        return guard.model(**kwargs).logits[:, -1, :]


def _sampler(args: GenerationArgs) -> torch.Generator | None:
    if not args.do_sample:
        return None
    g = torch.Generator()
    g.manual_seed(int(args.seed) if args.seed is not None else torch.seed())
    return g


def _next_token(scores: Tensor, do_sample: bool, gen: torch.Generator | None) -> Tensor:
    """As ``model.generate``: argmax of the processed scores, or one draw from their softmax."""
    if not do_sample:
        return scores.argmax(-1)
    probs = scores.softmax(-1).cpu()
    return torch.multinomial(probs, 1, generator=gen).flatten().to(scores.device)


def _new_cache(model: Any) -> Any:
    """A fresh KV cache; hybrid models (Qwen3.5 linear attention) need the config to lay it out."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older transformers
        return DynamicCache()
