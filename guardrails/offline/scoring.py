"""Rule scores over residual rows, computed by the engine (:class:`~guardrails.engine.run.GuardRun`): what
calibration, ``guardrails eval`` and the cascade evaluation score, exactly as serving scores it (multi-layer
rules, gated rules capped by their gate's prompt scores). Residual rows come from
:func:`guardrails.offline.residuals.residuals`."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from guardrails.core.policy import Policy, Rule
from guardrails.core.semantics import rule_layers, score_only


def unthresholded(policy: Policy) -> Policy:
    """The policy with every threshold out of reach, so scoring records scores but decides nothing."""
    return policy.model_copy(update={"rules": [score_only(r) for r in policy.rules]})


def token_scores(guard: Any, rule_id: str, rows: list[Tensor] | dict[int, list[Tensor]], *,
                 batch_size: int = 32, gate: np.ndarray | None = None) -> list[np.ndarray]:
    """Windowed per-token scores of one rule over residual rows, computed by the engine (GuardRun).

    ``gate``: for a gated rule (``Rule.gate``) scored on answers alone, each row's prompt score by the gate
    rule (:func:`gate_scores`); without it a gated rule scores the answer alone, as a guard given no prompt does.

    A multi-layer linear rule (``extra_layers``) takes ``{layer: rows}`` with the rows of each layer it reads
    (the same data and positions); the engine adds the shallower layers' terms as it does in a forward.

    With :class:`ResidualRows` positions, each row is laid out at its positions in the sequence (gaps
    unscored), exactly as a prefill presents it to the engine.
    """
    from guardrails.engine.run import GuardRun, StepContext
    from guardrails.offline.calibrate import CalibrationError, rule_scope  # calibrate re-exports this module

    rule = next((r for r in guard.policy.rules if r.id == rule_id), None)
    if rule is None:
        raise CalibrationError(f"no rule {rule_id!r}; rules: {', '.join(r.id for r in guard.policy.rules)}")
    reads = rule_layers(guard.policy, rule)
    layer = reads[-1]  # where the rule decides; the shallower ones feed it
    layered = rows if isinstance(rows, dict) else {layer: rows}
    missing = sorted(set(reads) - set(layered))
    if missing:
        raise CalibrationError(f"rule {rule_id!r} reads layers {reads}: no rows for {missing}")
    policy = unthresholded(guard.policy)
    scorers, feeds = _scorers_for(guard, policy)
    is_out = rule_scope(rule) == "output"
    base = layered[layer]
    positions = getattr(base, "positions", None) or [list(range(1, len(r) + 1)) for r in base]
    out: list[np.ndarray] = []
    d = next((r.shape[-1] for r in base if r.ndim == 2), 1)
    for start in range(0, len(base), batch_size):
        pchunk = positions[start : start + batch_size]
        width = max(1, max((p[-1] + 1 if p else 1) for p in pchunk))
        hidden = {L: torch.zeros(len(pchunk), width, d) for L in reads}
        mask = torch.zeros(len(pchunk), width, dtype=torch.bool)
        for b, p in enumerate(pchunk):
            if len(base[start + b]):
                idx = torch.tensor(p)
                mask[b, idx] = True
                for L in reads:  # the same tokens at every layer the rule reads
                    hidden[L][b, idx] = layered[L][start + b].float()
        pos = torch.arange(width).expand(len(pchunk), width)
        preset = None if gate is None or rule.gate is None else \
            {rule.gate.rule: torch.as_tensor(gate[start : start + batch_size], dtype=torch.float32)}
        run = GuardRun(policy, scorers, len(pchunk), [0 if is_out else width + 1] * len(pchunk),
                       feeds={L: f for L, f in feeds.items() if L in hidden}, gate_preset=preset)
        run.ctx = StepContext(pos, mask, torch.full_like(mask, is_out), torch.ones_like(mask))
        with torch.inference_mode():
            for L in reads:
                run.on_layer(L, hidden[L])
        ts = run.trace_scores[rule_id][0][1]
        for b, p in enumerate(pchunk):
            out.append(ts[b, torch.tensor(p, dtype=torch.long)].numpy().astype(np.float64) if p else np.zeros(0))
    return out


def _scorers_for(guard: Any, policy: Policy) -> tuple[dict[int, Any], dict[int, Any]]:
    """The serving scorers (and multi-layer feeds) of ``policy`` on ``guard``'s model (its loaded SAEs reused),
    on the CPU."""
    import dataclasses

    from guardrails.serving.generation import GuardedModel

    serving = GuardedModel(guard.model, guard.tokenizer, policy, saes=guard.saes, score_mode=guard.score_mode,
                           keep_full_saes=True, require_judges=False)  # scores only: no cascade judge is asked
    feeds = {layer: dataclasses.replace(f, weight=f.weight.cpu()) for layer, f in serving.compiled.feeds.items()}
    return {layer: scorer.to(torch.device("cpu")) for layer, scorer in serving.scorers.items()}, feeds


def text_scores(guard: Any, rule_id: str, rows: list[Tensor] | dict[int, list[Tensor]], *,
                gate: np.ndarray | None = None) -> np.ndarray:
    """Per-row decision score: the highest windowed token score (NaN where no token is scored)."""
    return np.array([float(np.max(s)) if len(s) else math.nan
                     for s in token_scores(guard, rule_id, rows, gate=gate)])


def gate_scores(guard: Any, rule: Rule, rows_of: Any) -> np.ndarray | None:
    """A gated rule's per-row gate: its gate rule's prompt score (``rows_of(rule)`` gives a rule's residual
    rows, as :func:`text_scores` takes them); None for an ungated rule or a gate not in the policy."""
    if rule.gate is None:
        return None
    g = next((r for r in guard.policy.rules if r.id == rule.gate.rule), None)
    return None if g is None else text_scores(guard, g.id, rows_of(g))


def rule_text_scores(guard: Any, rule: Rule, rows_of: Any) -> np.ndarray:
    """:func:`text_scores` of ``rule``, a gated rule capped by its gate's prompt scores as serving caps it."""
    return text_scores(guard, rule.id, rows_of(rule), gate=gate_scores(guard, rule, rows_of))


def fit_gate(guard: Any, rule: Rule, rows_of: Any, labels: np.ndarray, slack: float = 1.0) -> Any:
    """``rule``'s gate with ``scale``/``offset`` fitted on labeled rows (``guardrails calibrate --fit-gate``).

    Both scores are standardised on the label-0 rows (the rule's own, ungated score; the gate rule's prompt
    score), and the request's is loosened by ``slack`` standard deviations, so the cap binds only on requests
    that look benign: ``min(z_own, z_gate + slack)``, i.e. ``scale = sd_own / sd_gate`` and ``offset =
    mean_own - scale * mean_gate + slack * sd_own``. The shipped harmful-compliance gate uses slack 1, chosen
    by leave-one-family-out (``calibration/selection/compliance_composite.py``).
    """
    from guardrails.offline.calibrate import CalibrationError

    if rule.gate is None:
        raise CalibrationError(f"rule {rule.id!r} has no gate to fit; valid: a rule with gate: {{rule: <input rule>}}")
    if not math.isfinite(slack) or slack < 0:
        raise CalibrationError(f"--fit-gate {slack!r}: the slack is a number of standard deviations >= 0")
    own = text_scores(guard, rule.id, rows_of(rule))  # no gate preset: the answer alone
    g = gate_scores(guard, rule, rows_of)
    if g is None:
        raise CalibrationError(f"rule {rule.id!r}: its gate rule {rule.gate.rule!r} is not in the policy")
    scale, offset = gate_from_scores(own, g, labels, slack, what=f"rule {rule.id!r}")
    return rule.gate.model_copy(update={"scale": round(scale, 4), "offset": round(offset, 4)})


def gate_from_scores(own: np.ndarray, gate: np.ndarray, labels: np.ndarray, slack: float, *,
                     what: str = "the gate") -> tuple[float, float]:
    """``(scale, offset)`` of :func:`fit_gate` from per-row scores: the rule's own (ungated) score and its gate
    rule's prompt score, standardised on the scored label-0 rows."""
    from guardrails.offline.calibrate import CalibrationError

    own, gate = np.asarray(own, dtype=np.float64), np.asarray(gate, dtype=np.float64)
    neg = (np.asarray(labels) == 0) & np.isfinite(own) & np.isfinite(gate)
    if neg.sum() < 2 or float(own[neg].std()) == 0 or float(gate[neg].std()) == 0:
        raise CalibrationError(f"{what}: fitting its gate needs label-0 rows whose scores vary "
                               f"(have {int(neg.sum())} scored label-0 rows)")
    scale = float(own[neg].std() / gate[neg].std())
    return scale, float(own[neg].mean() - scale * gate[neg].mean() + slack * own[neg].std())


def fit_members(guard_of: Any, policy: Policy, rule: Rule, rows_of: Any, labels: np.ndarray) -> Rule:
    """``rule`` (an ensemble) with each member's ``mean``/``std`` set to those of the member's own row score on the
    label-0 rows (``guardrails calibrate --fit-ensemble``): each member scored alone with the ensemble's window
    and aggregation, through the serving path (``guard_of(policy)`` builds a guard; ``rows_of(policy, rule)``
    gives a rule's residual rows). Weights are kept; the threshold is fitted afterwards as for any rule."""
    from guardrails.core.policy import EnsembleDetector
    from guardrails.offline.calibrate import CalibrationError

    det = rule.detector
    if not isinstance(det, EnsembleDetector):
        raise CalibrationError(f"rule {rule.id!r} is not an ensemble (detector kind {det.kind!r}); --fit-ensemble "
                               "standardises the members of kind: ensemble rules")
    neg = np.asarray(labels) == 0
    members = []
    for j, m in enumerate(det.members):
        part = m.detector.model_copy(update={"window": det.window, "aggregate": det.aggregate})
        alone = rule.model_copy(update={"id": f"{rule.id}/members[{j}]", "detector": part, "action": "flag",
                                        "steer": None, "gate": None, "escalate_above": None, "judge": None})
        pol = policy.model_copy(update={"rules": [alone], "steering": []})
        s = np.asarray(text_scores(guard_of(pol), alone.id, rows_of(pol, alone)), dtype=np.float64)
        ok = neg & np.isfinite(s)
        if ok.sum() < 2 or float(s[ok].std()) == 0:
            raise CalibrationError(f"rule {rule.id!r}: members[{j}] needs label-0 rows whose scores vary to be "
                                   f"standardised (have {int(ok.sum())} scored label-0 rows)")
        members.append(m.model_copy(update={"mean": round(float(s[ok].mean()), 6),
                                            "std": round(float(s[ok].std()), 6)}))
    return rule.model_copy(update={"detector": det.model_copy(update={"members": members})})
