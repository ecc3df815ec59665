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

if TYPE_CHECKING:
    from guardrails.serving.generation import GuardedModel


def steps(
    guard: GuardedModel,
    prompts: list[str],
    max_new_tokens: int,
    sampling: dict[str, Any],
    use_cache: bool = True,
) -> Generator[tuple[GuardRun, list[list[int]], bool], None, None]:
    """Yield ``(run, released ids per sequence, done)`` after each step; hooks live for the whole loop."""
    tok = guard.tokenizer
    old_side = tok.padding_side
    tok.padding_side = "left"
    try:
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tok.padding_side = old_side
    device = guard.model.device if hasattr(guard.model, "device") else torch.device("cpu")
    ids = enc["input_ids"].to(device)
    mask = enc["attention_mask"].to(device)
    empty = [i for i, n in enumerate(mask.sum(1).tolist()) if n == 0] if ids.numel() else list(range(len(prompts)))
    if empty:
        raise ValueError(f"prompt(s) {empty} produced no tokens (the tokenizer drops their characters)")
    B = ids.shape[0]
    lengths = mask.sum(1).tolist()
    run = guard._new_run([int(n) for n in lengths])
    positions = (mask.cumsum(1) - 1).masked_fill(mask == 0, -1)
    gen = _sampler(sampling)
    released: list[list[int]] = [[] for _ in range(B)]
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    pending: Tensor | None = None  # token of each row produced but not yet scored
    all_ids, all_mask, all_pos = ids, mask, positions
    is_output = torch.zeros_like(mask, dtype=torch.bool)
    past: Any = None
    for step in range(max_new_tokens + 1):
        last = step == max_new_tokens
        if step == 0:
            cur_ids = ids
            score = guard._scorable(ids, mask, positions)
            past = _new_cache(guard.model) if use_cache else None
        else:
            assert pending is not None
            new_pos = all_pos.max(1).values + 1
            all_ids = torch.cat([all_ids, pending[:, None]], 1)
            all_mask = torch.cat([all_mask, torch.ones_like(pending)[:, None]], 1)
            all_pos = torch.cat([all_pos, new_pos[:, None]], 1)
            is_output = torch.cat([is_output, torch.ones_like(pending, dtype=torch.bool)[:, None]], 1)
            active = ~finished & torch.tensor([run.active(b) for b in range(B)], device=device)
            new_score = guard._scorable(pending[:, None], torch.ones_like(pending)[:, None], new_pos[:, None])
            new_score &= active[:, None]
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
        logits = forward(guard, run, kwargs, truncated=last)
        run.check_all_scored()
        run.ctx = None
        # release the tokens this forward scored (those of rows still active)
        if pending is not None:
            for b in range(B):
                if not bool(finished[b]) and run.active(b):
                    released[b].append(int(pending[b]))
        # rows blocked now stop; their tripping token is withheld (kept for the audit trace only)
        for b in range(B):
            if not run.active(b) and not bool(finished[b]):
                finished[b] = True
                if pending is not None and run.blocked_at[b] == int(all_pos[b, -1]):
                    run.tripping_token[b] = int(pending[b])
        if logits is None:
            yield run, released, True
            return
        nxt = _next_token(logits.float(), sampling, gen)
        nxt = torch.where(finished, torch.full_like(nxt, int(tok.pad_token_id)), nxt)
        is_eos = torch.isin(nxt, guard._eos.to(device)) & ~finished
        finished |= is_eos
        pending = nxt
        done = bool(finished.all())
        yield run, released, done
        if done:
            return

def forward(guard: GuardedModel, run: GuardRun, kwargs: dict[str, Any], *, truncated: bool) -> Tensor | None:
    """One forward with this run's hooks, under the model's lock; hooks exist only for its duration.

    Registering per step (microseconds) keeps a suspended stream from touching other calls of
    the shared model, and lets threads interleave their steps.
    """
    with guard._lock, output_hooks(guard.model, guard._hooks(run), guard._blocks):
        if truncated:
            try:
                with stop_after_layer(guard.model, guard.deepest, guard._blocks[guard.deepest]):
                    guard.model(**kwargs)
            except StopForward:
                pass
            return None
        return guard.model(**kwargs).logits[:, -1, :]


def _sampler(sampling: dict[str, Any]) -> torch.Generator | None:
    if not sampling.get("do_sample"):
        return None
    g = torch.Generator()
    g.manual_seed(int(sampling["seed"]) if sampling.get("seed") is not None else torch.seed())
    return g


def _next_token(logits: Tensor, sampling: dict[str, Any], gen: torch.Generator | None) -> Tensor:
    if not sampling.get("do_sample"):
        return logits.argmax(-1)
    logits = logits / float(sampling.get("temperature", 1.0))
    top_k = int(sampling.get("top_k") or 0)
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1])).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    top_p = float(sampling.get("top_p", 1.0))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1).cpu()
    return torch.multinomial(probs, 1, generator=gen).flatten().to(logits.device)


def _new_cache(model: Any) -> Any:
    """A fresh KV cache; hybrid models (Qwen3.5 linear attention) need the config to lay it out."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older transformers
        return DynamicCache()
