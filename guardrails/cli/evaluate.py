"""``guardrails eval``: a policy's metrics on a labeled file, per source or category, with baselines and a
cascade judge on request. The workflow is a plain function (:func:`run_eval`) returning a dict.

``--data`` takes a JSONL file (or, for the baselines' train split, the common prefix of split files).
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from guardrails.cli.session import Session, split_files
from guardrails.core.semantics import rule_layer
from guardrails.offline.calibrate import load_labeled
from guardrails.offline.evaluate import json_safe as _json_safe


def run_eval(session: Session, policy_path: str, data_path: str, *, rule_id: str | None = None,
             baselines: bool = False, train_path: str | None = None, limit: int | None = None,
             intervals: bool = False, max_response_chars: int | None = None,
             train_limit: int | None = None, by: list[str] | None = None, judge: str | None = None) -> dict[str, Any]:
    """Metrics of a policy on a labeled file; ``by`` ("source", "category") adds per-group metrics
    and names the worst group (lowest AUROC). ``judge`` (``module:callable``): the cascade's rules with that
    judge: TPR, FPR and the share of rows escalated (``cascade``; see :mod:`guardrails.offline.cascade_eval`)."""
    from guardrails.core.policy import Policy
    from guardrails.offline.calibrate import rule_scope
    from guardrails.offline.evaluate import (
        bootstrap_intervals,
        grouped_metrics,
        metrics,
        policy_row_scores,
        round_metrics,
        rule_row_keys,
        rule_rows,
        worst_group,
    )

    policy = Policy.from_path(policy_path)
    data = load_labeled(data_path, limit=limit, max_response_chars=max_response_chars)
    for field_name in by or []:  # before any scoring: a wrong --by costs nothing
        if field_name not in ("source", "category"):
            raise ValueError(f"unknown --by {field_name!r}; valid: source, category")
        if not (data.categories is not None if field_name == "category" else any(data.sources)):
            raise ValueError(f"--by {field_name}: no row of {data.path} has a {field_name!r} field; add one per row "
                             f"(README, 'Labeled data') or leave out --by {field_name}")
    guard = session.guard(policy)
    # one set of rows per (scope, layer): each rule scores its own layer(s); one forward pass per scope
    keys = list(dict.fromkeys(key for r in policy.rules for key in rule_row_keys(policy, r)))
    rows: dict[tuple[str, int], list[Any]] = {}
    for scope in dict.fromkeys(k[0] for k in keys):
        got = session.rows_at(data, [k[1] for k in keys if k[0] == scope], scope)  # type: ignore[arg-type]
        rows.update({(scope, layer): r for layer, r in got.items()})
    scores, thr, what = policy_row_scores(guard, rows, rule_id)
    out: dict[str, Any] = round_metrics(metrics(scores, data.labels, thr))
    out.update(policy=policy.name, score=what, data=data.path, score_mode=guard.score_mode)
    fitted_here = sorted(rid for rid, e in (policy.calibration or {}).items() if isinstance(e, dict) and data.sha256 in
                         (e.get("data_sha256"), (e.get("features_from") or {}).get("sha256")))
    if fitted_here:  # the thresholds were fitted on these very rows
        out["in_sample"] = fitted_here
    if intervals:
        out["ci95"] = bootstrap_intervals(scores, data.labels, thr)
    for field_name in by or []:
        groups = data.sources if field_name == "source" else (data.categories or ["-"] * len(data))
        per = grouped_metrics(scores, data.labels, groups, thr)
        out[f"by_{field_name}"] = per
        out[f"worst_{field_name}"] = worst_group(per)
    if judge is not None:  # the cascade: the band goes to the judge (every judge name bound to it)
        from guardrails.offline.cascade_eval import cascade_metrics

        out["cascade"] = cascade_metrics(guard, lambda r: rule_rows(rows, policy, r), data, judge, rule_id)
    if baselines:
        rule = next(r for r in policy.rules if rule_id is None or r.id == rule_id)
        train = train_path or str(split_files(data_path).get("train") or "")
        tr = load_labeled(train, limit=train_limit, max_response_chars=max_response_chars) if train else None
        from guardrails.cli.baselines import run_baselines

        out["baselines"] = run_baselines(session, data, tr, rule_layer(policy, rule),
                                         rule_scope(rule), window=rule.detector.window)
    return out


def register(app: typer.Typer) -> None:
    """Add ``eval`` to ``app``."""

    @app.command("eval")
    def eval_(
        policy: Annotated[str, typer.Option("--policy", "-p", help="Policy file or shipped name")],
        data: Annotated[str, typer.Option(help="Labeled JSONL: {text,label} or {prompt,response,label}")],
        as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
        baselines: Annotated[bool, typer.Option(help="Also keyword, probe and DiffMean baselines")] = False,
        train: Annotated[str | None, typer.Option(help="Train split for the baselines (default: sibling)")] = None,
        rule: Annotated[str | None, typer.Option(help="Score one rule (default: all, max margin)")] = None,
        model: Annotated[str, typer.Option(help="Model id or path (default: bundled)")] = "bundled",
        limit: Annotated[int | None, typer.Option(help="Use at most this many rows (stratified)")] = None,
        intervals: Annotated[bool, typer.Option(help="Bootstrap 95% intervals")] = False,
        max_response_chars: Annotated[int | None, typer.Option(help="Cut responses to this many characters")] = None,
        train_limit: Annotated[int | None, typer.Option(help="Rows of the baselines' train split")] = None,
        by: Annotated[list[str] | None, typer.Option(help="Also per group: source and/or category (repeatable)")]
        = None,
        dtype: Annotated[str | None, typer.Option(help="Model weights dtype (default float32, as served)")] = None,
        judge: Annotated[str | None, typer.Option(help="Cascade judge as module:callable (a factory: "
                                                        "module:make()); reports the share escalated")] = None,
    ) -> None:
        """AUROC, AUPRC, TPR at 1%/5% FPR, F1, and FPR/TPR at the policy's threshold on a labeled file."""
        from guardrails.cli.main import _run_safely, console, resolve_policy_path

        path = str(resolve_policy_path(policy))
        res = _run_safely(lambda: run_eval(Session(model, progress=not as_json, dtype=dtype), path, data, rule_id=rule,
                                           baselines=baselines, train_path=train, limit=limit, intervals=intervals,
                                           max_response_chars=max_response_chars, train_limit=train_limit,
                                           by=by, judge=judge))
        if as_json:
            print(json.dumps(_json_safe(res), ensure_ascii=False))
            return
        from rich.table import Table

        t = Table("detector", "AUROC", "AUPRC", "TPR@1%FPR", "TPR@5%FPR", "F1", "FPR", "TPR",
                  title=f"{res['policy']} on {res['data']} ({res['n']} rows; score: {res['score']})")
        t.add_row(f"policy {res['policy']}", *(_fmt(res.get(k)) for k in
                                               ("auroc", "auprc", "tpr_at_1pct_fpr", "tpr_at_5pct_fpr", "f1", "fpr",
                                                "tpr")))
        for name, m in (res.get("baselines") or {}).items():
            t.add_row(name, *(_fmt(m.get(k)) for k in
                              ("auroc", "auprc", "tpr_at_1pct_fpr", "tpr_at_5pct_fpr", "f1", "fpr", "tpr")))
        console.print(t)
        if res.get("in_sample"):
            console.print(f"[yellow]warning[/]: the thresholds (or features) of {', '.join(res['in_sample'])} were "
                          "fitted on this file (same sha256): these numbers are in-sample; evaluate on rows the "
                          "policy never saw")
        if "cascade" in res:
            console.print(res["cascade"]["summary"])
        for field_name in by or []:
            g = Table(field_name, "n", "label 1", "label 0", "AUROC", "FPR", "TPR",
                      title=f"by {field_name} (single-label groups ranked against the other label's rows outside "
                            f"the group); worst: {res.get(f'worst_{field_name}')}")
            for name, m in res[f"by_{field_name}"].items():
                g.add_row(name, str(m["n"]), str(m["positives"]), str(m["negatives"]),
                          *(_fmt(m.get(k)) for k in ("auroc", "fpr", "tpr")))
            console.print(g)


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)
