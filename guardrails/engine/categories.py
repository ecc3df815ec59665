"""Category heads (``rules[].categories``): which hazard category a decision names, and its action per category.

A head is a multinomial linear map over the residual stream at its rule's deciding layer. Per guarded call,
:class:`CategoryState` keeps, for each row, the running sum of the head's logits over the tokens the rule scored (with
``reads: prompt``: over the prompt's tokens the input rules score);
when the rule fires at a token, the decision names the most probable category of the mean up to that token (the
same number whether the prompt came in one forward or many, as the rule's own windows); with ``reads: prompt``, of the
mean over every prompt token read by the end of the deciding forward (a prefill: the whole request, so an input rule
is named by all of it, not by the words before it tripped; vLLM's chunked prefill: the chunks up to the deciding one).
See
:class:`guardrails.core.policy.CategoryHead`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
from torch import Tensor

from guardrails.core.policy import Policy, PolicyError
from guardrails.core.yaml_io import regular_file


@dataclass(frozen=True)
class LoadedHead:
    """One rule's category head, read and checked."""

    labels: tuple[str, ...]
    weight: Tensor
    """``[n_categories, hidden]`` float32."""
    bias: Tensor
    """``[n_categories]`` float32."""
    min_prob: float
    actions: dict[str, str]
    reads: str = "scored"
    """``scored``: the rule's own tokens up to the deciding one; ``prompt``: the prompt's tokens the input rules score,
    all those of the deciding forward."""

    def to(self, device: torch.device | str) -> LoadedHead:
        return LoadedHead(self.labels, self.weight.to(device), self.bias.to(device), self.min_prob, self.actions,
                          self.reads)


def load_category_heads(policy: Policy, hidden: int) -> dict[str, LoadedHead]:
    """Each rule's category head by rule id, its file checked: shapes against ``hidden``, labels in the metadata,
    ``actions`` naming only those labels."""
    from safetensors import safe_open

    out: dict[str, LoadedHead] = {}
    for i, rule in enumerate(policy.rules):
        spec = rule.categories
        if spec is None:
            continue
        where = f"rules[{i}].categories"
        path = policy.resolve(spec.weights)
        regular_file(path, f"{where}.weights")
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        except Exception as exc:
            raise PolicyError(f"{where}.weights: cannot read {path!r}: {exc}") from exc
        try:
            labels = tuple(str(x) for x in json.loads(meta.get("labels", "")))
        except ValueError:
            labels = ()
        if not labels or len(set(labels)) != len(labels):
            raise PolicyError(f"{where}.weights: {path!r} needs its category names as a JSON list of distinct "
                              "strings in the metadata 'labels' (calibration/selection/fit_categories.py writes it)")
        w, b = t.get("weight"), t.get("bias")
        want = (len(labels), hidden)
        if w is None or tuple(w.shape) != want or b is None or tuple(b.shape) != (len(labels),):
            got = {k: tuple(v.shape) for k, v in t.items()}
            raise PolicyError(f"{where}.weights: needs 'weight' {want} and 'bias' ({len(labels)},) for "
                              f"{len(labels)} labels and hidden size {hidden}; the file holds {got}")
        if not (bool(torch.isfinite(w.float()).all()) and bool(torch.isfinite(b.float()).all())):
            raise PolicyError(f"{where}.weights: {path!r} holds NaN or infinite values")
        if bad := sorted(set(spec.actions) - set(labels)):
            raise PolicyError(f"{where}.actions: unknown categories {bad}; valid: {', '.join(labels)}")
        out[rule.id] = LoadedHead(labels, w.float(), b.float(), float(spec.min_prob), dict(spec.actions), spec.reads)
    return out


@dataclass
class CategoryState:
    """Per guarded call: running logit sums of each head's rule over the rows it scored."""

    heads: dict[str, LoadedHead]
    _sums: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    """Committed per rule: ``([B, C] logit sums, [B] token counts)`` before the current forward."""
    _now: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    """Per rule, this forward's cumulative ``([B, T, C], [B, T])`` including the committed part."""

    def reads_prompt(self, rule_id: str) -> bool:
        head = self.heads.get(rule_id)
        return head is not None and head.reads == "prompt"

    def observe(self, rule_id: str, hidden: Tensor, scored: Tensor) -> None:
        """The rule's head on this forward's ``hidden`` ``[B, T, d]`` at the tokens it reads ``[B, T]`` (the rule's
        scored ones, or with ``reads: prompt`` the prompt's)."""
        head = self.heads.get(rule_id)
        if head is None:
            return
        self._commit(rule_id)
        B, T = scored.shape
        C = len(head.labels)
        z = torch.zeros(B, T, C)
        if bool(scored.any()):
            z[scored.cpu()] = (hidden[scored].float() @ head.weight.T + head.bias).cpu()
        sums, counts = self._sums.get(rule_id, (torch.zeros(B, C), torch.zeros(B)))
        self._now[rule_id] = (sums[:, None, :] + z.cumsum(1), counts[:, None] + scored.cpu().float().cumsum(1))

    def _commit(self, rule_id: str) -> None:
        if rule_id in self._now:
            cums, counts = self._now.pop(rule_id)
            self._sums[rule_id] = (cums[:, -1], counts[:, -1])

    def name(self, rule_id: str, b: int, t: int) -> str | None:
        """The category the rule's head names for row ``b`` firing at column ``t`` of this forward; None when the
        rule has no head, scored nothing, or the most probable category is below ``min_prob``."""
        head, now = self.heads.get(rule_id), self._now.get(rule_id)
        if head is None or now is None:
            return None
        cums, counts = now
        col = -1 if head.reads == "prompt" else t  # the whole prompt read so far, not only the tokens before t
        n = float(counts[b, col])
        if n <= 0:
            return None
        p = torch.softmax(cums[b, col] / n, dim=-1)
        k = int(p.argmax())
        return head.labels[k] if float(p[k]) >= head.min_prob else None

    def action(self, rule_id: str, category: str | None, action: str) -> str:
        """The action the named ``category`` takes instead of the rule's ``action`` (``categories.actions``)."""
        head = self.heads.get(rule_id)
        return head.actions.get(category, action) if head is not None and category is not None else action
