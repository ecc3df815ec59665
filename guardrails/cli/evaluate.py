"""``guardrails eval``: a policy's metrics on a labeled file, per source or category, with baselines and a
cascade judge on request. The workflow is a plain function (:func:`run_eval`) returning a dict.

``--data`` takes a JSONL file (or, for the baselines' train split, the common prefix of split files).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import typer

from guardrails.cli.safe import cell, markup
from guardrails.cli.session import (
    ColumnsOption,
    LabelOption,
    MaxResponseCharsOption,
    PositiveOption,
    Session,
    SkipUnlabeledOption,
    SystemOption,
    model_for,
    split_files,
)
from guardrails.core.semantics import rule_layer
from guardrails.offline.dataformat import DataFormat
from guardrails.offline.evaluate import MIN_GROUP_ROWS, rules_that_decide
from guardrails.offline.evaluate import json_safe as _json_safe

if TYPE_CHECKING:
    from guardrails.offline.calibrate import LabeledData


def _row(data: LabeledData, i: int, score: float) -> dict[str, Any]:
    row: dict[str, Any] = {"row": data.row(i), "label": int(data.labels[i]), "score": round(float(score), 4),
                           "text": data.texts[i]}
    if data.where:
        row["at"] = data.where[i]
    if data.responses is not None:
        row["response"] = data.responses[i]
    if data.sources[i]:
        row["source"] = data.sources[i]
    if data.categories is not None:
        row["category"] = data.categories[i]
    return row


def row_errors(data: LabeledData, scores: np.ndarray, threshold: float, n: int) -> dict[str, list[dict[str, Any]]]:
    """The ``n`` worst mistakes at ``threshold`` each way: label-0 rows that fire, highest score first
    (``false_positives``), and label-1 rows that do not, lowest first (``false_negatives``; a row that could
    not be scored, NaN, counts as not firing). ``row`` is the 1-based data row of the file (also under --limit),
    ``at`` its place as errors name it (``file:line``, ``file[i]`` in a JSON array)."""
    s = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=-np.inf)
    y = np.asarray(data.labels)
    fp = [i for i in np.argsort(-s, kind="stable") if y[i] == 0 and s[i] >= threshold][:n]
    fn = [i for i in np.argsort(s, kind="stable") if y[i] == 1 and s[i] < threshold][:n]
    return {"false_positives": [_row(data, int(i), scores[i]) for i in fp],
            "false_negatives": [_row(data, int(i), scores[i]) for i in fn]}


def _place(r: dict[str, Any]) -> str:
    """Where an error row is in its file, short: the line (``28``), or ``[i]`` in a JSON array; else its row."""
    at = r.get("at")
    if not at:
        return str(r["row"])
    return at[at.rfind("["):] if at.endswith("]") else at.rpartition(":")[2]


def write_rows(path: str, data: LabeledData, scores: np.ndarray, threshold: float) -> None:
    """Every row's score and decision as CSV: row, at (file:line), label, score, threshold, fires, correct, source,
    category, text (and response for answer rows). A missing folder is created."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    cols = ["row", "at", "label", "score", "threshold", "fires", "correct", "source", "category", "text"]
    cols += ["response"] if data.responses is not None else []
    with out.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for i, sc in enumerate(np.asarray(scores, dtype=np.float64)):
            r = _row(data, i, sc)
            fires = bool(np.isfinite(sc) and sc >= threshold)
            r.update(threshold=threshold, fires=int(fires), correct=int(fires == bool(r["label"])),
                     score="" if not np.isfinite(sc) else r["score"])
            w.writerow(r)


def run_eval(session: Session, policy_path: str, data_path: str, *, rule_id: str | None = None,
             baselines: bool = False, train_path: str | None = None, limit: int | None = None,
             intervals: bool = False, max_response_chars: int | None = None,
             train_limit: int | None = None, by: list[str] | None = None, judge: str | None = None,
             errors: int = 0, rows_out: str | None = None) -> dict[str, Any]:
    """Metrics of a policy on a labeled file; ``by`` ("source", "category" or any other column) adds per-group metrics
    and names the worst group (lowest AUROC), and lists the groups too small to report (``left_out_<field>``).
    ``judge`` (``module:callable``): the cascade's rules with that judge: TPR, FPR and the share of rows
    escalated (``cascade``; see :mod:`guardrails.offline.cascade_eval`). ``errors``: the that many worst
    false positives and false negatives at the threshold (``errors``); ``rows_out``: every row's score and
    decision written to that CSV file."""
    from guardrails.core.policy import Policy
    from guardrails.offline.calibrate import rule_scope
    from guardrails.offline.evaluate import (
        bootstrap_intervals,
        grouped_metrics,
        metrics,
        policy_row_scores,
        round_metrics,
        rule_rows,
        small_groups,
        worst_of,
    )

    if errors < 0:
        raise ValueError(f"--errors must be >= 0 (rows to list per kind), got {errors}")
    policy = Policy.from_path(policy_path)
    data = session.load(data_path, limit=limit, max_response_chars=max_response_chars)
    # the columns --by can group: None where no row has that field
    columns = {"source": data.sources if any(data.sources) else None, "category": data.categories, **data.fields}
    for field_name in by or []:  # before any scoring: a wrong --by costs nothing
        if field_name not in columns:
            raise ValueError(f"unknown --by {field_name!r}; valid: {', '.join(columns)} (the columns of {data.path})")
        if columns[field_name] is None:
            raise ValueError(f"--by {field_name}: no row of {data.path} has a {field_name!r} field; add one per row "
                             f"(README, 'Labeled data') or leave out --by {field_name}")
    guard = session.guard(policy)
    rows = session.policy_rows(data, policy)
    scores, thr, what = policy_row_scores(guard, rows, rule_id)
    out: dict[str, Any] = round_metrics(metrics(scores, data.labels, thr))
    out.update(policy=policy.name, policy_path=policy_path, score=what, data=data.path, score_mode=guard.score_mode)
    fitted_here = sorted(rid for rid, e in (policy.calibration or {}).items() if isinstance(e, dict) and data.sha256 in
                         (e.get("data_sha256"), (e.get("features_from") or {}).get("sha256")))
    if fitted_here:  # the thresholds were fitted on these very rows
        out["in_sample"] = fitted_here
    # the one rule the score is of (--rule, or a policy whose only deciding rule it is): a steer rule's rates need
    # saying what "fires" means
    chosen = rules_that_decide(policy.rules, rule_id, f"policy {policy.name!r}")
    scored = chosen[0] if len(chosen) == 1 else None
    if scored is not None and scored.action == "steer" and scored.steer is not None:
        out["steer"] = steer_report(scored, scores, data.labels)
    if intervals:
        out["ci95"] = bootstrap_intervals(scores, data.labels, thr)
    for field_name in by or []:
        groups = columns[field_name]
        assert groups is not None  # checked above
        per = grouped_metrics(scores, data.labels, groups, thr)
        out[f"by_{field_name}"] = per
        worst = worst_of(per)
        out[f"worst_{field_name}"], out[f"worst_{field_name}_by"] = worst if worst is not None else (None, None)
        out[f"left_out_{field_name}"] = small_groups(groups)
    if data.categories is not None:  # rules[].categories: does the head name the labelled category?
        from guardrails.offline.evaluate import category_naming

        named = category_naming(guard, data, [r.id for r in policy.rules if rule_id is None or r.id == rule_id])
        if named:
            out["category_naming"] = named
    if errors:
        out["errors"] = row_errors(data, scores, thr, errors)
    if rows_out is not None:
        write_rows(rows_out, data, scores, thr)
    if judge is not None:  # the cascade: the band goes to the judge (every judge name bound to it)
        from guardrails.offline.cascade_eval import cascade_metrics

        out["cascade"] = cascade_metrics(guard, lambda r: rule_rows(rows, policy, r), data, judge, rule_id)
    if baselines:
        rule = next(r for r in policy.rules if rule_id is None or r.id == rule_id)
        train, why = train_path or str(split_files(data_path).get("train") or ""), None
        from guardrails._data import data_root
        from guardrails.offline.records import DEFAULT_TARGET_FPR, recorded_target, recorded_train

        if not train:  # an independent file: the baselines fit on what the rule was fitted on, as its record names
            found, why = recorded_train(policy, rule.id, data_root())
            if found is not None:
                train = str(found)
                out["baselines_train"] = {"path": train, "from": f"the calibration record of rule {rule.id!r}"}
        ours = "baselines_train" in out  # our train file: read in this repository's layout, not --columns
        tr = session.load(train, limit=train_limit, max_response_chars=max_response_chars,
                          by_name=ours) if train else None
        # the baselines' thresholds as the rule's: on the cal split beside their train split, at the rule's target
        cal_path = split_files(train).get("cal") if train else None
        cal = session.load(cal_path, max_response_chars=max_response_chars,
                           by_name=ours) if cal_path is not None else None
        from guardrails.cli.baselines import TRAIN_TARGET, run_baselines

        recorded = recorded_target(policy, rule.id, data_root())
        if cal is None:
            target, where = TRAIN_TARGET, f"{train} (no cal split beside it)"
        else:
            target = recorded or {"fpr": DEFAULT_TARGET_FPR}
            where = f"{cal_path} ({'the rule' if recorded else 'a rule never calibrated'}'s target)"
        out["baselines"] = run_baselines(session, data, tr, rule_layer(policy, rule),
                                         rule_scope(rule), window=rule.detector.window, cal=cal, target=target)
        if tr is not None:
            goal = ", ".join(f"{k.upper() if k == 'fpr' else k} {v:g}" for k, v in target.items())
            out["baselines_thresholds"] = f"fitted at {goal} on {where}"
        else:  # the probe and DiffMean baselines are fitted: without rows to fit on only keywords ran
            out["baselines_note"] = ("only the keyword baseline ran: the probe and DiffMean baselines are fitted on a "
                                     f"train split, and {Path(data_path).name} has none beside it "
                                     "(<prefix>.train.jsonl next to <prefix>.test.jsonl)"
                                     + (f"; {why}" if why else "") + "; give --train FILE")
    return out


def steer_report(rule: Any, scores: Any, labels: Any) -> dict[str, Any]:
    """A steer rule's firing, split by what it does: a generation steers from the threshold and blocks from
    ``block_above`` (the shares of each label reaching it); a scan of text already written cannot steer and does the
    rule's ``steer.scan_action`` from the threshold."""
    above = rule.steer.block_above
    out: dict[str, Any] = {"rule": rule.id, "threshold": float(rule.threshold), "block_above": above,
                           "scan_action": rule.steer.scan_action}
    if above is not None:
        hit = np.nan_to_num(np.asarray(scores, dtype=float), nan=-np.inf) >= above
        y = np.asarray(labels)
        out["blocked_in_generation"] = {f"label_{k}": float(hit[y == k].mean()) if (y == k).any() else None
                                        for k in (1, 0)}
    return out


def register(app: typer.Typer) -> None:
    """Add ``eval`` to ``app``."""

    @app.command("eval")
    def eval_(
        policy: Annotated[list[str], typer.Option("--policy", "-p", help="Policy file or shipped name (repeatable: "
                                                                         "policies side by side on the same rows)")],
        data: Annotated[str, typer.Option(help="Labeled JSONL, CSV, TSV, JSON array (or "
                                                "gzipped), Parquet or Arrow: {text,label} or "
                                                "{prompt,response,label}")],
        as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
        baselines: Annotated[bool, typer.Option(help="Also keyword, probe and DiffMean baselines")] = False,
        train: Annotated[str | None, typer.Option(help="Train split for the baselines (default: the sibling, "
                                                       "else the one the rule's record names)")] = None,
        rule: Annotated[str | None, typer.Option(help="Score one rule (default: all, max margin)")] = None,
        model: Annotated[str | None, typer.Option(help="Model id or path (default: the policy's)")] = None,
        limit: Annotated[int | None, typer.Option(min=1, help="Use at most this many rows (stratified)")] = None,
        intervals: Annotated[bool, typer.Option(help="Bootstrap 95% intervals")] = False,
        max_response_chars: MaxResponseCharsOption = None,
        train_limit: Annotated[int | None, typer.Option(min=1, help="Rows of the baselines' train split")] = None,
        by: Annotated[list[str] | None, typer.Option(help="Also per group: source, category or any other column "
                                                          "(repeatable)")] = None,
        dtype: Annotated[str | None, typer.Option(help="Model weights dtype (default float32, as served)")] = None,
        judge: Annotated[str | None, typer.Option(help="Cascade judge as [NAME=]module:callable (a factory: "
                                                        "module:make()), for every escalating rule; reports the "
                                                        "share escalated")] = None,
        errors: Annotated[int, typer.Option(help="List the N worst false positives and false negatives")] = 0,
        rows: Annotated[str | None, typer.Option(help="Write every row's score and decision to this CSV (several "
                                                      "policies: one file each, <stem>.<policy>.csv)")] = None,
        columns: ColumnsOption = None,
        positive: PositiveOption = None,
        label: LabelOption = None,
        skip_unlabeled: SkipUnlabeledOption = False,
        system: SystemOption = None,
    ) -> None:
        """AUROC, AUPRC, TPR at 1%/5% FPR, F1, and FPR/TPR at the policy's threshold on a labeled file; several
        --policy options compare policies on the same rows (activations computed once)."""
        from guardrails.cli.main import _run_safely, console, output_path, resolve_policy_path

        paths = [str(resolve_policy_path(p)) for p in policy]
        fmt = _run_safely(lambda: DataFormat.parse(columns, positive, label, skip_unlabeled))
        model = _run_safely(lambda: model_for(paths, model))
        session = Session(model, progress=not as_json, dtype=dtype, data_format=fmt, system=system)

        row_files = [f if f is None else str(output_path(f, "--rows")) for f in _row_files(rows, paths)]
        results = [_run_safely(lambda path=path, rows_out=rows_out: run_eval(
            session, path, data, rule_id=rule, baselines=baselines, train_path=train, limit=limit,
            intervals=intervals, max_response_chars=max_response_chars, train_limit=train_limit, by=by, judge=judge,
            errors=errors, rows_out=rows_out)) for path, rows_out in zip(paths, row_files, strict=True)]
        if as_json:
            print(json.dumps(_json_safe(results[0] if len(results) == 1 else {"policies": results}),
                             ensure_ascii=False))
            return
        from rich.table import Column, Table

        cols = ("auroc", "auprc", "tpr_at_1pct_fpr", "tpr_at_5pct_fpr", "f1", "fpr", "tpr")
        first = results[0]
        title = (f"{first['policy']} on {first['data']} ({first['n']} rows; score: {first['score']})"
                 if len(results) == 1 else f"{len(results)} policies on {first['data']} ({first['n']} rows; each "
                                           "at its own threshold)")
        # a narrow terminal folds a long policy name instead of cutting it ("harmful-req…" named two policies alike)
        t = Table(Column("detector", overflow="fold"), "AUROC", "AUPRC", "TPR@1%FPR", "TPR@5%FPR", "F1", "FPR", "TPR",
                  title=markup(title))
        names = [r["policy"] for r in results]
        # two policies of one name (a calibrated copy): the file tells them apart
        shown = [n if names.count(n) == 1 else f"{n} ({Path(p).name})" for n, p in zip(names, paths, strict=True)]
        for res, name in zip(results, shown, strict=True):
            t.add_row(cell(f"policy {name}"), *(_fmt(res.get(k)) for k in cols))
            for name, m in (res.get("baselines") or {}).items():
                t.add_row(cell(name if len(results) == 1 else f"  {name}"), *(_fmt(m.get(k)) for k in cols))
        console.print(t)
        for res, name, rows_out in zip(results, shown, row_files, strict=True):
            _print_details(console, res, by or [], rows_out, who=markup(f"{name}: ") if len(results) > 1 else "")


def _row_files(rows: str | None, paths: list[str]) -> list[str | None]:
    """Where each policy's ``--rows`` CSV goes: the file itself for one policy; for several,
    ``<stem>.<policy file stem>[.<n>].csv`` (``.<n>`` where two policy files share a stem)."""
    if rows is None or len(paths) == 1:
        return [rows] * len(paths)
    out, stems = Path(rows), [Path(p).stem for p in paths]
    tags = [s if stems.count(s) == 1 else f"{s}.{i + 1}" for i, s in enumerate(stems)]
    return [str(out.with_name(f"{out.stem}.{tag}{out.suffix or '.csv'}")) for tag in tags]


def _print_details(console: Any, res: dict[str, Any], by: list[str], rows: str | None, *, who: str) -> None:
    """Everything after the main table for one policy's result (``who``: its name before each line when several
    policies are shown, markup-escaped): warnings, cascade, groups, errors, the rows file. Every other piece of text
    that comes from the user's files (paths, rule ids, row text, group and category names) is escaped: a row holding
    ``[/x]`` is shown, never parsed as rich markup (it raised ``MarkupError``)."""
    from rich.table import Column, Table

    if res.get("in_sample"):
        fitted = markup(", ".join(res["in_sample"]))
        console.print(f"[yellow]warning[/]: {who}the thresholds (or features) of {fitted} were fitted on this file "
                      "(same sha256): these numbers are in-sample; evaluate on rows the policy never saw")
    if res.get("baselines_note"):
        console.print(f"[yellow]note[/]: {who}{markup(res['baselines_note'])}")
    if res.get("baselines_thresholds"):
        console.print(f"[dim]{who}baseline thresholds {markup(res['baselines_thresholds'])}[/]")
    if res.get("baselines_train"):
        bt = res["baselines_train"]
        console.print(f"[dim]{who}the probe and DiffMean baselines were fitted on {markup(bt['path'])}, the train "
                      f"split that {markup(bt['from'])} names; --train FILE fits them on other rows[/]")
    if not res.get("positives") or not res.get("negatives"):
        only, rate = ("label 1", "TPR (the share that fires)") if res.get("positives") else ("label 0", "FPR")
        console.print(f"[yellow]note[/]: {who}every row is {only}: only {rate} is defined here; AUROC and the "
                      "rates at a fixed FPR need both labels")
    if "steer" in res:
        st = res["steer"]
        gen = st.get("blocked_in_generation") or {}
        blocked = ", ".join(f"{k.replace('_', ' ')} {_fmt(v)}" for k, v in gen.items() if v is not None)
        of_rows = f" ({blocked} of the rows)" if blocked else ""
        console.print(f"{who}{markup(st['rule'])} steers: the rates above are the rows it fires on. A generation "
                      f"steers them and blocks from block_above {st['block_above']}{of_rows}"
                      + f"; a scan of text already written (SAEGuard, the proxy, /v1/guard/check) cannot steer and "
                      f"{'blocks' if st['scan_action'] == 'block' else 'flags'} them (steer.scan_action: "
                      f"{st['scan_action']})")
    if "cascade" in res:
        console.print(who + markup(res["cascade"]["summary"]))
    for rid, c in (res.get("category_naming") or {}).items():
        named = "-" if c["named"] is None else f"{c['named']:.0%}"
        right = "-" if c["right_of_named"] is None else f"{c['right_of_named']:.0%}"
        console.print(f"{who}categories ({markup(rid)}): fired on {c['fired']} of {c['rows']} label-1 rows with a "
                      f"category; named one on {named} of those, the labelled one on {right} of the named")
        if c.get("unknown"):
            shown = ", ".join(c["unknown"][:8]) + (", ..." if len(c["unknown"]) > 8 else "")
            console.print(f"[yellow]note[/]: {who}the file's categories {markup(shown)} are not labels the head names, "
                          f"so they never count as right; its labels: {markup(', '.join(c['labels']))}")
    for field_name in by:
        g = Table(Column(cell(field_name)), "n", "label 1", "label 0", "AUROC", "FPR", "TPR",
                  title=f"{who}by {markup(field_name)} (single-label groups ranked against the other label's rows "
                        f"outside the group); worst: {_worst(res, field_name)}")
        for name, m in res[f"by_{field_name}"].items():
            g.add_row(cell(name), str(m["n"]), str(m["positives"]), str(m["negatives"]),
                      *(_fmt(m.get(k)) for k in ("auroc", "fpr", "tpr")))
        console.print(g)
        if res.get(f"left_out_{field_name}"):
            small = ", ".join(f"{k} ({v})" for k, v in res[f"left_out_{field_name}"].items())
            console.print(f"{who}not reported (under {MIN_GROUP_ROWS} rows): {markup(small)}")
    for kind, title in (("false_positives", "label 0, fires"), ("false_negatives", "label 1, does not fire")):
        found = (res.get("errors") or {}).get(kind)
        if found:
            e = Table("line" if "at" in found[0] else "row", "score", "text",
                      *(["category"] if "category" in found[0] else []),
                      title=f"{who}{kind.replace('_', ' ')} ({title}; threshold {res['threshold']:.4g})")
            for r in found:
                text = r["text"] if "response" not in r else f"{r['text']} -> {r['response']}"
                e.add_row(_place(r), f"{r['score']:.3f}", cell(text[:160]),
                          *([cell(r["category"])] if "category" in r else []))
            console.print(e)
    if rows:
        console.print(f"{who}per-row scores written to {markup(rows)}")


def _worst(res: dict[str, Any], field_name: str) -> str:
    """``name (metric)``, markup-escaped, or ``-`` where no group could be ranked."""
    name, by = res.get(f"worst_{field_name}"), res.get(f"worst_{field_name}_by")
    how = {"auroc": "lowest AUROC", "tpr": "lowest TPR", "fpr": "highest FPR"}.get(str(by), str(by))
    return "-" if name is None else markup(f"{name} ({how})")


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)
