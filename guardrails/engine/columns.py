"""Which columns of a forward a rule (or its category head) reads: the prompt turns input rules score, each rule's
scope, and the chat role a decision names. The torch engine's side of
:func:`guardrails.core.semantics.scores_token`."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from guardrails.core.policy import Rule
from guardrails.core.semantics import ROLE_CODES, ROLES


def column_roles(ctx_roles: Tensor | None, prompt_roles: list[list[int]] | None, positions: Tensor) -> Tensor | None:
    """[B, T] role codes of the columns at ``positions``: the step context's (``ctx_roles``), else looked up by
    position in each row's ``prompt_roles`` (generated positions are the assistant's); None when neither is known
    (every prompt token is the user's)."""
    T = positions.shape[1]
    if ctx_roles is not None:
        return ctx_roles.to(positions.device)[:, -T:]
    if prompt_roles is None:
        return None
    width = max(1, max(len(r) for r in prompt_roles))
    table = torch.full((len(prompt_roles), width), -1, dtype=torch.long)
    for b, r in enumerate(prompt_roles):
        table[b, : len(r)] = torch.tensor(r, dtype=torch.long)
    table = table.to(positions.device)
    idx = positions.clamp(0, width - 1)
    roles = table.gather(1, idx)
    return roles.masked_fill((positions < 0) | (positions >= width), ROLE_CODES["assistant"])


def prompt_columns(is_output: Tensor, roles: Tensor | None, input_roles: Iterable[int]) -> Tensor:
    """Prompt columns in the turns input rules score (the policy's ``input_roles``, as role codes)."""
    prompt_ok = ~is_output
    if roles is not None:
        allowed = torch.tensor(sorted(input_roles), dtype=roles.dtype, device=roles.device)
        prompt_ok = prompt_ok & torch.isin(roles, allowed)
    return prompt_ok


def scope_columns(rule: Rule, is_output: Tensor, prompt_ok: Tensor) -> Tensor:
    """Columns ``rule`` scores by scope, given the prompt columns input rules score (:func:`prompt_columns`)."""
    if rule.scope == "input":
        return prompt_ok
    if rule.scope == "output":
        return is_output
    return prompt_ok | is_output


def role_name(out: bool, role: int | None) -> str:
    """The chat role a decision names: generated tokens are the assistant's, prompt tokens their turn's."""
    return "assistant" if out else (ROLES[role] if role is not None and 0 <= role < len(ROLES) else "user")
