"""Scans on the Hugging Face path: one batch of prompts (and optional responses) through a single prefill that stops
at the deepest watched layer, scored as generation would score these tokens (:meth:`GuardedModel.score` plans the
batches, normalisation included). A scan cannot steer: a steer decision (and a flag that ``steering:`` entries wait
for) carries the ``steer.scan_action`` as its resolution (default block;
:func:`~guardrails.core.semantics.resolve_scan`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from guardrails.core.decision import TextScore
from guardrails.core.semantics import ROLE_CODES, ROLES, resolve_scan, scan_actions
from guardrails.engine.hooks import StopForward, output_hooks, stop_after_layer
from guardrails.engine.run import Decision, StepContext
from guardrails.serving.judging import text_source
from guardrails.serving.prompts import PromptLike, check_text, tokenizer_lock
from guardrails.serving.result import token_text

if TYPE_CHECKING:
    from guardrails.serving.generation import GuardedModel


def score_batch(gm: GuardedModel, texts: list[PromptLike], responses: list[str | None], chat: bool | None,
                offset: int = 0) -> list[TextScore]:
    """``texts`` (rows ``offset``... of the scan) and their ``responses`` scored in one forward of ``gm``'s model."""
    tok = gm.tokenizer
    rows: list[list[int]] = []
    n_prompt: list[int] = []
    role_rows: list[list[int]] = []
    formatted_rows: list[str] = []
    for text, response in zip(texts, responses, strict=True):
        if isinstance(text, str):
            check_text(text, f"texts[{len(rows) + offset}]")
        if response is not None and response:
            check_text(response, f"responses[{len(rows) + offset}]")
        formatted = gm.format_prompt(text, chat)
        formatted_rows.append(formatted)
        with tokenizer_lock(tok):
            p_ids = tok(formatted, add_special_tokens=False)["input_ids"]
        if not p_ids:
            raise ValueError(f"texts[{len(rows) + offset}] produced no tokens")
        with tokenizer_lock(tok):
            r_ids = tok(response, add_special_tokens=False)["input_ids"] if response else []
        rows.append(list(p_ids) + list(r_ids))
        n_prompt.append(len(p_ids))
        p_roles = gm.prompt_roles(formatted)
        if len(p_roles) != len(p_ids):  # tokenizers that differ with offsets: fall back to user turns
            p_roles = [ROLE_CODES["user"]] * len(p_ids)
        role_rows.append(p_roles + [ROLE_CODES["assistant"]] * len(r_ids))
    width = max(len(r) for r in rows)
    pad = int(tok.pad_token_id)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    positions = (mask.cumsum(1) - 1).masked_fill(mask == 0, -1)
    is_output = positions >= torch.tensor(n_prompt)[:, None]
    roles = torch.tensor([[-1] * (width - len(r)) + r for r in role_rows])
    run = gm.compiled.new_run(n_prompt, steer=False)
    run.ctx = StepContext(positions, gm._scorable(ids, mask, positions), is_output, mask.bool(), roles=roles)
    run.judge_text = text_source(tok, lambda b: rows[b], n_prompt, lambda b: role_rows[b],  # the cascade
                                 run.input_roles, lambda b: gm._judge_inputs.get(formatted_rows[b]))
    device = gm.model.device if hasattr(gm.model, "device") else torch.device("cpu")
    with gm._lock, output_hooks(gm.model, gm._hooks(run)), stop_after_layer(gm.model, gm.deepest):
        try:
            gm.model(
                input_ids=ids.to(device), attention_mask=mask.to(device),
                position_ids=positions.masked_fill(mask == 0, 1).to(device), use_cache=False,
            )
        except StopForward:
            pass
    run.ctx = None
    run.resolve_escalations()  # the cascade's judges, outside the model's lock
    results = []
    actions = scan_actions(gm.policy)  # a scan cannot steer: what would-be steering does instead
    for b, row in enumerate(rows):
        ts = run.token_scores(b)
        scores = {rid: (max(v.values()) if v else float("nan")) for rid, v in ts.items()}
        decisions = resolve_scan([
            Decision(**{**d.__dict__, "sequence": offset + b, "token": token_text(tok, row, d.position)})
            for d in sorted((d for d in run.decisions if d.sequence == b), key=lambda d: d.position)
        ], actions)
        names = [ROLES[c] if 0 <= c < len(ROLES) else None for c in role_rows[b]]
        results.append(TextScore(scores, ts, decisions, tok.convert_ids_to_tokens(row), list(run.errors), names))
    return results
