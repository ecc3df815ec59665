"""``guardrails eval --baselines``: keyword, probe and DiffMean baselines next to a policy's rules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from guardrails.cli.session import Session
from guardrails.offline.calibrate import LabeledData, Scope

TRAIN_TARGET = {"fpr": 0.01}
"""The baselines' threshold target without a cal split: 1% FPR on their own train rows (in-sample)."""


def run_baselines(session: Session, data: LabeledData, train: LabeledData | None, layer: int, scope: Scope, *,
                  window: int = 1, cal: LabeledData | None = None,
                  target: dict[str, float] = TRAIN_TARGET) -> dict[str, Any]:
    """Keyword, probe and DiffMean baselines on ``data`` (the last two fitted on ``train``), their thresholds fitted
    at ``target`` (``{"fpr": x}`` or ``{"recall": x}``) on ``cal``, else on ``train``."""
    import tempfile

    from guardrails.offline.baselines import (
        HARM_KEYWORDS,
        TOXIC_KEYWORDS,
        compliance_keyword_scores,
        fit_diffmean,
        fit_probe,
        keyword_scores,
        linear_policy,
        save_linear,
    )
    from guardrails.offline.evaluate import metrics, round_metrics
    from guardrails.offline.scoring import text_scores

    out: dict[str, Any] = {}
    if data.responses is not None:
        kw = compliance_keyword_scores(data.responses)
        out["keyword(refusal phrases, negated)"] = round_metrics(metrics(kw, data.labels, -0.5))
    else:
        words = TOXIC_KEYWORDS if scope == "output" else HARM_KEYWORDS
        kw = keyword_scores(data.texts, words)
        out["keyword"] = round_metrics(metrics(kw, data.labels, 0.5))
    if train is None:
        return out
    from guardrails.offline.calibrate import fit_threshold

    tr_rows = session.rows(train, layer, scope)
    rows = session.rows(data, layer, scope)
    thr_data = cal if cal is not None else train
    thr_rows = session.rows(cal, layer, scope) if cal is not None else tr_rows
    goal = {f"target_{k}": v for k, v in target.items()}
    with tempfile.TemporaryDirectory() as tmp:
        for method, fit in (("probe", fit_probe), ("diffmean", fit_diffmean)):
            w, b = fit(tr_rows, train.labels)
            path = save_linear(Path(tmp) / f"{method}.safetensors", w, b)
            guard = session.guard(linear_policy(path, layer, scope, method=method, window=window))
            thr = fit_threshold(text_scores(guard, "linear", thr_rows), thr_data.labels, **goal)
            s = text_scores(guard, "linear", rows)
            out[f"{method}(L{layer}, window {window})"] = round_metrics(metrics(s, data.labels, thr))
    return out
