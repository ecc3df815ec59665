"""Detection metrics of a scored, labeled set, with bootstrap intervals, and evaluation of a policy.

A policy's score for a row is its decision score as served (``GuardedModel.score``): the highest
windowed token score of the rule. For a policy with several rules, :func:`policy_row_scores` uses the
largest margin ``score - threshold`` over the rules (a row is caught when any rule fires, i.e. the
margin is >= 0), so the "own threshold" of the combined score is 0.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np

METRIC_KEYS = ("auroc", "auprc", "tpr_at_1pct_fpr", "tpr_at_5pct_fpr", "f1", "fpr", "tpr")


def _clean(scores: np.ndarray) -> np.ndarray:
    """NaN (nothing scored) ranks below every real score."""
    s = np.asarray(scores, dtype=np.float64).copy()
    finite = s[np.isfinite(s)]
    low = (finite.min() - 1.0) if len(finite) else 0.0
    s[np.isnan(s)] = low
    return s


def tpr_at_fpr(scores: np.ndarray, labels: np.ndarray, fpr: float) -> float:
    """Highest TPR over thresholds whose FPR (share of negatives with score >= threshold) is <= ``fpr``."""
    s, y = _clean(scores), np.asarray(labels)
    neg = np.sort(s[y == 0])[::-1]
    pos = s[y == 1]
    if len(neg) == 0 or len(pos) == 0:
        return math.nan
    allowed = math.floor(fpr * len(neg) + 1e-9)
    thr = np.nextafter(neg[allowed], np.inf) if allowed < len(neg) else -np.inf
    return float((pos >= thr).mean())


def fpr_at_tpr(scores: np.ndarray, labels: np.ndarray, tpr: float) -> float:
    """Lowest FPR over thresholds whose TPR (share of positives with score >= threshold) is >= ``tpr``: what a recall
    target costs in false positives (``tpr_at_fpr``'s mirror)."""
    s, y = _clean(scores), np.asarray(labels)
    pos = np.sort(s[y == 1])[::-1]
    neg = s[y == 0]
    if len(neg) == 0 or len(pos) == 0:
        return math.nan
    needed = max(1, math.ceil(tpr * len(pos) - 1e-9))
    return float((neg >= pos[needed - 1]).mean())


def rates_at(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    """FPR, TPR, precision and F1 of "score >= threshold" (NaN scores never fire)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    hit = np.nan_to_num(s, nan=-np.inf) >= threshold
    tp = int((hit & (y == 1)).sum())
    fp = int((hit & (y == 0)).sum())
    fn = int((~hit & (y == 1)).sum())
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / n_pos if n_pos else math.nan
    f1 = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 0.0
    return {"fpr": fp / n_neg if n_neg else math.nan, "tpr": rec, "precision": prec, "f1": f1}


def metrics(scores: np.ndarray, labels: np.ndarray, threshold: float | None = None) -> dict[str, float]:
    """AUROC, AUPRC (average precision), TPR at 1% and 5% FPR, and F1/FPR/TPR at ``threshold``.

    With one class only, the ranking metrics are NaN and the rates at the threshold are still given
    (a benign-only set reports its FPR, a harmful-only set its detection rate).
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    s, y = _clean(scores), np.asarray(labels).astype(int)
    both = len(set(y.tolist())) == 2
    out: dict[str, float] = {
        "auroc": float(roc_auc_score(y, s)) if both else math.nan,
        "auprc": float(average_precision_score(y, s)) if both else math.nan,
        "tpr_at_1pct_fpr": tpr_at_fpr(s, y, 0.01) if both else math.nan,
        "tpr_at_5pct_fpr": tpr_at_fpr(s, y, 0.05) if both else math.nan,
    }
    if threshold is not None:
        r = rates_at(scores, y, threshold)
        out.update(f1=r["f1"], fpr=r["fpr"], tpr=r["tpr"], precision=r["precision"], threshold=float(threshold))
    out.update(n=len(y), positives=int(y.sum()), negatives=int((y == 0).sum()))
    return out


def bootstrap_intervals(
    scores: np.ndarray, labels: np.ndarray, threshold: float | None, *, n: int = 500, seed: int = 0,
    keys: tuple[str, ...] = ("auroc", "tpr_at_1pct_fpr", "fpr", "tpr"),
) -> dict[str, list[float]]:
    """95% percentile intervals of ``keys`` over ``n`` resamples of the rows (stratified by label)."""
    rng = np.random.default_rng(seed)
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    groups = [np.flatnonzero(y == lab) for lab in (0, 1) if (y == lab).any()]
    samples: dict[str, list[float]] = {k: [] for k in keys}
    for _ in range(n):
        idx = np.concatenate([rng.choice(g, size=len(g), replace=True) for g in groups])
        m = metrics(s[idx], y[idx], threshold)
        for k in keys:
            if k in m and not math.isnan(m[k]):
                samples[k].append(m[k])
    return {k: [round(float(np.percentile(v, 2.5)), 4), round(float(np.percentile(v, 97.5)), 4)]
            for k, v in samples.items() if v}


RowKey = tuple[str, int]
"""``(scope, layer)``: residual rows are collected once per scope and layer."""


def rule_row_keys(policy: Any, rule: Any) -> list[RowKey]:
    """Every ``(scope, layer)`` a rule reads: a multi-layer linear rule's extra layers, then its own."""
    from guardrails.core.semantics import rule_layers
    from guardrails.offline.calibrate import rule_scope

    return [(rule_scope(rule), layer) for layer in rule_layers(policy, rule)]


def rule_rows(rows_by_key: Mapping[RowKey, list[Any]], policy: Any, rule: Any) -> list[Any] | dict[int, list[Any]]:
    """A rule's residual rows as :func:`~guardrails.offline.scoring.token_scores` takes them (``{layer: rows}``
    for a multi-layer rule)."""
    keys = rule_row_keys(policy, rule)
    missing = [k for k in keys if k not in rows_by_key]
    if missing:
        raise KeyError(f"no residual rows for rule {rule.id!r} at (scope, layer) {missing}; have {sorted(rows_by_key)}")
    return rows_by_key[keys[0]] if len(keys) == 1 else {k[1]: rows_by_key[k] for k in keys}


def rules_that_decide(rules: list[Any], rule_id: str | None, where: str) -> list[Any]:
    """The rule ``rule_id`` names (``where``: the policy, for the error), or without one the rules that act (block or
    steer): flag-only rules (a gate, a framing flag) decide nothing and are left out unless every rule flags.
    ``guardrails eval`` scores these rules and ``guardrails calibrate`` fits their thresholds."""
    if rule_id is None:
        return [r for r in rules if r.action != "flag"] or list(rules)
    chosen = [r for r in rules if r.id == rule_id]
    if not chosen:
        raise ValueError(f"--rule {rule_id!r}: no such rule in {where}; valid: {', '.join(r.id for r in rules)}")
    return chosen


def policy_row_scores(guard: Any, rows_by_key: Mapping[RowKey, list[Any]], rule: str | None = None) -> tuple[
    np.ndarray, float, str
]:
    """Decision score per row and the threshold it is compared with: one rule's, or the max-margin combination
    of the rules that act (flag-only rules left out unless every rule flags).

    ``rows_by_key`` maps ``(scope, layer)`` (see :func:`rule_row_keys`) to residual rows (see
    :func:`guardrails.offline.residuals.residuals`): each rule is scored on the activations of its own
    layer, as serving scores it, even when two rules of one scope read different layers.
    Returns ``(scores, threshold, what)``.
    """
    from guardrails.offline.scoring import rule_text_scores

    chosen = rules_that_decide(guard.policy.rules, rule, f"policy {guard.policy.name!r}")

    def rows_of(r: Any) -> list[Any] | dict[int, list[Any]]:
        return rule_rows(rows_by_key, guard.policy, r)

    if len(chosen) == 1:
        r = chosen[0]
        return rule_text_scores(guard, r, rows_of), float(r.threshold), f"rule {r.id}"
    margins = np.stack([rule_text_scores(guard, r, rows_of) - r.threshold for r in chosen])
    return np.nanmax(margins, axis=0), 0.0, f"max over rules {', '.join(r.id for r in chosen)} of (score - threshold)"


MIN_GROUP_ROWS = 5
"""Groups (sources, categories) with fewer rows are not reported: their AUROC would be noise (:func:`small_groups`
names them)."""


def small_groups(groups: list[str], min_rows: int = MIN_GROUP_ROWS) -> dict[str, int]:
    """The groups :func:`grouped_metrics` leaves out (fewer than ``min_rows`` rows), with their row counts."""
    return {g: n for g, n in sorted(Counter(groups).items()) if n < min_rows}


def grouped_metrics(
    scores: np.ndarray, labels: np.ndarray, groups: list[str], threshold: float | None, *,
    min_rows: int = MIN_GROUP_ROWS,
) -> dict[str, dict[str, Any]]:
    """Metrics per group (a source or a category). A group of one label is ranked against every row of
    the other label outside it (its AUROC says how well it separates from the rest of the other side);
    a mixed group against its own rows. Groups with fewer than ``min_rows`` rows are left out."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(int)
    g = np.asarray(groups, dtype=object)
    out: dict[str, dict[str, Any]] = {}
    for name in sorted(set(groups)):
        m = g == name
        if m.sum() < min_rows:
            continue
        labs = set(y[m].tolist())
        own = metrics(s[m], y[m], threshold)
        if len(labs) == 1:
            other = (y != y[m][0]) & ~m
            idx = m | other
            vs = metrics(s[idx], y[idx], None)
            own.update({"auroc": vs["auroc"], "auprc": vs["auprc"], "tpr_at_1pct_fpr": vs["tpr_at_1pct_fpr"],
                        "tpr_at_5pct_fpr": vs["tpr_at_5pct_fpr"]})
            own["against"] = f"label-{1 - y[m][0]} rows outside the group"  # type: ignore[assignment]
        out[name] = round_metrics(own)
    return out


def grouped_with_intervals(
    scores: np.ndarray, labels: np.ndarray, groups: list[str], threshold: float | None, *, n: int = 100,
    min_rows: int = MIN_GROUP_ROWS,
) -> dict[str, dict[str, Any]]:
    """:func:`grouped_metrics` plus 95% bootstrap intervals per group (``ci95``): a single-label group is
    resampled together with the other label's rows outside it, a mixed group on its own."""
    per = grouped_metrics(scores, labels, groups, threshold, min_rows=min_rows)
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(int)
    g = np.asarray(groups, dtype=object)
    for name, m in per.items():
        inside = g == name
        idx = inside | ((y != y[inside][0]) & ~inside) if len(set(y[inside].tolist())) == 1 else inside
        ci = bootstrap_intervals(s[idx], y[idx], threshold, n=n, keys=("auroc",))
        own = bootstrap_intervals(s[inside], y[inside], threshold, n=n, keys=("fpr", "tpr"))
        m["ci95"] = {**ci, **own}
    return per


def worst_group(per_group: Mapping[str, Mapping[str, Any]], key: str = "auroc", *, highest: bool = False
                ) -> str | None:
    """The group with the lowest ``key`` (the highest with ``highest``, for an error rate); groups where it is
    missing are skipped."""
    vals: dict[str, float] = {k: float(v[key]) for k, v in per_group.items() if isinstance(v.get(key), float)}
    return (max if highest else min)(vals, key=lambda k: vals[k]) if vals else None


def worst_of(per_group: Mapping[str, Mapping[str, Any]]) -> tuple[str, str] | None:
    """The worst group and the metric that ranks it: the lowest AUROC; in a file of one label, where no group has an
    AUROC, the lowest TPR (harmful rows only) or the highest FPR (benign rows only)."""
    for key, highest in (("auroc", False), ("tpr", False), ("fpr", True)):
        if (name := worst_group(per_group, key, highest=highest)) is not None:
            return name, key
    return None


def round_metrics(m: dict[str, Any], digits: int = 4) -> dict[str, Any]:
    return {k: (round(v, digits) if isinstance(v, float) and math.isfinite(v) else
                (None if isinstance(v, float) else v)) for k, v in m.items()}


def round_up(x: float, digits: int = 4) -> float:
    """Round a threshold up (never below the fitted value, so the fitted FPR still holds)."""
    f = 10**digits
    return math.ceil(x * f) / f


def json_safe(obj: Any) -> Any:
    """``obj`` with numpy scalars as Python numbers and non-finite floats as None (strict JSON)."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float | np.floating):
        return None if not math.isfinite(float(obj)) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def category_naming(guard: Any, data: Any, rule_ids: list[str]) -> dict[str, dict[str, Any]]:
    """How each rule's category head (``rules[].categories``) names the label-1 rows that carry a labelled
    ``category``, from the decisions themselves (a scan, as served): per rule, the rows it fired on, the share of
    those it named a category for (the head reached ``min_prob``), and the share of the named ones that match the
    row's label. Rows are scanned only when some rule has a head; {} otherwise. ``unknown`` lists the file's
    categories the head cannot name (another taxonomy's labels: map them to the head's ``labels`` to compare)."""
    rules = {r.id: r for r in guard.policy.rules if r.id in rule_ids and r.categories is not None}
    cats = data.categories or []
    idx = [i for i, c in enumerate(cats) if int(data.labels[i]) == 1 and c not in ("", "-")]
    if not rules or not idx:
        return {}
    responses = [data.responses[i] for i in idx] if data.responses is not None else None
    scanned = guard.score([data.prompt(i) for i in idx], responses=responses)
    out: dict[str, dict[str, Any]] = {}
    for rid, rule in rules.items():
        fired = named = right = 0
        for i, ts in zip(idx, scanned, strict=True):
            d = next((d for d in ts.decisions if d.rule == rid), None)
            if d is None:
                continue
            fired += 1
            if d.category is not None and d.category != rule.category:
                named += 1
                right += int(d.category == cats[i])
        labels = guard.compiled.categories[rid].labels
        out[rid] = {"rows": len(idx), "fired": fired, "named": round(named / fired, 4) if fired else None,
                    "right_of_named": round(right / named, 4) if named else None, "labels": list(labels),
                    "unknown": sorted({cats[i] for i in idx} - set(labels))}
    return out
