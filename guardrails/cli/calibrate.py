"""``guardrails calibrate`` (``guardrails discover``: :mod:`guardrails.cli.discover`; ``guardrails eval``:
:mod:`guardrails.cli.evaluate`).

The workflow is a plain function (:func:`run_calibrate`) returning a dict, so benchmarks and tests call it without
the CLI.

``--data`` takes a JSONL file, or the common prefix of split files (``calibration/data/harmful_requests``
for ``harmful_requests.{train,cal,test}.jsonl``): discovery and weight fitting read the train split,
thresholds the cal split, and the record reports the test split too.
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from guardrails.cli.safe import markup
from guardrails.cli.session import (
    ColumnsOption,
    LabelOption,
    MaxResponseCharsOption,
    PositiveOption,
    Session,
    SkipUnlabeledOption,
    SystemOption,
    _split_provenance,
    model_for,
    split_files,
    split_or_file,
)
from guardrails.core.semantics import rule_layer
from guardrails.offline.calibrate import CalibrationError
from guardrails.offline.dataformat import DataFormat
from guardrails.offline.evaluate import round_up

RECORDS = Path(__file__).resolve().parents[2] / "calibration" / "records"


# -- calibrate ---------------------------------------------------------------------------------------------


def run_calibrate(session: Session, policy_path: str, data_path: str, *, target_fpr: float | None = None,
                  target_recall: float | None = None, fit_weights: bool = False, rule_id: str | None = None,
                  out: str | None = None, record_dir: Path | None = RECORDS, check: int = 8,
                  limit: int | None = None, max_features: int = 16, max_response_chars: int | None = None,
                  train_limit: int | None = None, record_path: Path | None = None,
                  evaluate_test: bool = True, fit_gate: float | None = None,
                  fit_ensemble: bool = False, objective: str = "pooled",
                  invariant_to: tuple[str, ...] = ()) -> dict[str, Any]:
    """``record_path``: where the record goes (wins over ``record_dir``/<name>.json); never the package's data.
    ``fit_gate``: fit a gated rule's scale/offset first (the slack in SDs;
    :func:`~guardrails.offline.scoring.fit_gate`); ``fit_ensemble``: standardise ensemble rules' members on the
    cal split's label-0 rows first (:func:`~guardrails.offline.scoring.fit_members`). ``objective`` (with
    ``fit_weights``): ``pooled``, at most ``max_features`` positive weights by L1 logistic regression on max-pooled
    activations (a probe: ridge on mean-pooled rows); ``window``, signed weights and a bias fitted on the served window
    score (:mod:`guardrails.offline.window_fit`, the shipped ``harmful-requests-sae`` and probe recipes).
    ``invariant_to`` (with ``fit_weights``, probes): columns of the train split whose within-label mean differences
    are projected out of the residuals before the fit (:mod:`guardrails.offline.erasure`)."""
    from guardrails.core.policy import EnsembleDetector, LinearDetector, Policy, SAEFeaturesDetector
    from guardrails.offline.calibrate import (
        allowed_false_positives,
        check_against_serving,
        fit_sparse_weights,
        fit_threshold,
        prefix_aware_pooled,
        rule_scope,
    )
    from guardrails.offline.evaluate import (
        bootstrap_intervals,
        grouped_with_intervals,
        metrics,
        round_metrics,
        rules_that_decide,
    )
    from guardrails.offline.records import (
        DEFAULT_TARGET_FPR,
        features_from,
        make_record,
        recorded_target,
        write_calibrated,
    )
    from guardrails.offline.scoring import rule_text_scores

    if invariant_to and not fit_weights:
        raise CalibrationError("invariant_to changes how weights are fitted: it needs fit_weights")
    policy = Policy.from_path(policy_path)
    files = split_files(data_path)
    cal = session.load(split_or_file(files, data_path, "cal", "calibrate fits thresholds on"), limit=limit,
                       max_response_chars=max_response_chars)
    # a flag-only rule (a gate, a framing flag) keeps the threshold fitted to its own labels unless named
    rules = rules_that_decide(policy.rules, rule_id, policy_path)
    new_rules = {r.id: r for r in policy.rules}
    erasures: dict[str, dict[str, Any]] = {}
    out_path = Path(out or policy_path)
    moving = out_path.resolve() != Path(policy.base_dir or ".", Path(policy_path).name).resolve()
    report: dict[str, Any] = {"policy": policy.name, "rules": {}}
    warnings: list[str] = []
    if fit_weights and "train" not in files:
        warnings.append(f"--fit-weights with one file ({data_path}): weights and threshold are fitted on the "
                        "same rows; give a split prefix (<prefix>.train/.cal/.test.jsonl) for held-out ones")
    left = [r.id for r in policy.rules if r.id not in {c.id for c in rules}]
    if rule_id is None and left:
        warnings.append(f"flag-only rules keep the thresholds fitted to their own labels: {', '.join(left)} "
                        f"(--rule {left[0]} calibrates it on these rows)")
    if rule_id is None and len(rules) > 1:
        warnings.append(f"every rule ({', '.join(r.id for r in rules)}) was calibrated on the same labels; when the "
                        "rules catch different things (a jailbreak framing rule beside a harm rule), pass --rule ID "
                        "to calibrate one and keep the others' thresholds")
    for r in rules:
        source = features_from(policy, r.id)
        if source and source.get("sha256") == cal.sha256:
            warnings.append(f"rule {r.id!r}: its features were chosen by `guardrails discover` on these same rows "
                            f"({source.get('data')}), so the cal metrics are in-sample; give a split prefix "
                            "(discover reads its train split, calibrate its cal split)")
    # a rule recalibrated without a target keeps the one it was calibrated to (a shipped policy's 3% FPR)
    given = {"fpr": target_fpr} if target_fpr is not None else \
        {"recall": target_recall} if target_recall is not None else None
    kept_t = {r.id: t for r in rules if not given and (t := recorded_target(policy, r.id, RECORDS.parents[1]))}
    targets = {r.id: given or kept_t.get(r.id) or {"fpr": DEFAULT_TARGET_FPR} for r in rules}
    if kept_t:
        report["target_from_policy"] = sorted({f"{k} {v:g}" for t in kept_t.values() for k, v in t.items()})
    n_neg = int((cal.labels == 0).sum())
    for fpr in sorted({t["fpr"] for t in targets.values() if "fpr" in t}):
        if 0 < fpr * n_neg < 5:
            warnings.append(f"{cal.path} has {n_neg} label-0 rows: a target FPR of {fpr:g} lets "
                            f"{allowed_false_positives(fpr, n_neg)} of them fire, so a row or two set the threshold "
                            f"and the FPR it gives on new rows is loose (the record's intervals say how loose); "
                            f"{math.ceil(5 / fpr)} or more label-0 rows pin it down")
    if warnings:
        report["warnings"] = warnings
    test_data = session.load(files["test"], limit=train_limit or limit, max_response_chars=max_response_chars) \
        if "test" in files and evaluate_test else None
    splits = _split_provenance(session, files, cal, test_data)

    @functools.cache
    def train_split() -> Any:  # read once, for every rule whose weights are fitted
        return session.load(split_or_file(files, data_path, "train", "--fit-weights fits weights on"),
                            limit=train_limit or limit, max_response_chars=max_response_chars)

    for rule in rules:
        det = rule.detector
        sc = rule_scope(rule)
        if invariant_to and not isinstance(det, LinearDetector):
            raise CalibrationError(f"rules: {rule.id!r} is not a linear probe; --invariant-to fits probes (an SAE "
                                   "rule's weights are per feature, and a projection would give every feature one)")
        if fit_weights and isinstance(det, SAEFeaturesDetector):
            train = train_split()
            guard0 = session.guard(policy)
            sae_rows = session.rows(train, policy.saes[det.sae].layer, sc)
            update: dict[str, Any] = {}
            if objective == "window":  # signed weights and a bias, fitted on the score the rule serves
                from guardrails.offline.window_fit import fit_window_rule

                weights, bias = fit_window_rule(guard0.saes[det.sae], sae_rows, train.labels, window=det.window,
                                                max_features=max_features)
                update = {"bias": bias, "combine": "sum", "aggregate": "mean"}
            else:
                weights = fit_sparse_weights(prefix_aware_pooled(guard0.saes[det.sae], sae_rows), train.labels,
                                             max_features=max_features)
            from guardrails.core.policy import Feature

            old = {f.id: f.label for f in det.features}
            det = det.model_copy(update={**update, "features": [Feature(id=i, weight=w, label=old.get(i))
                                                                for i, w in weights.items()]})
            rule = rule.model_copy(update={"detector": det})
            new_rules[rule.id] = rule
            policy = policy.model_copy(update={"rules": [new_rules[r.id] for r in policy.rules]})
        layer = rule_layer(policy, rule)
        if fit_weights and isinstance(det, EnsembleDetector):
            raise CalibrationError(f"rules: {rule.id!r} is an ensemble; --fit-weights fits one detector: fit its "
                                   "members on their own, or calibrate the ensemble's threshold without it")
        if fit_weights and isinstance(det, LinearDetector) and objective == "window" and det.method != "probe":
            raise CalibrationError(f"rules: {rule.id!r} is a DiffMean direction (method {det.method!r}); --objective "
                                   "window fits probes and SAE-feature rules: leave out --objective")
        if fit_weights and isinstance(det, LinearDetector):
            from guardrails.offline.baselines import fit_diffmean, fit_probe, save_linear

            if getattr(det, "extra_layers", None):
                raise CalibrationError(f"rules: {rule.id!r} is a multi-layer probe (extra_layers {det.extra_layers}); "
                                       "--fit-weights fits one layer: calibrate its threshold without it")
            train = train_split()
            rows, erased = session.rows(train, layer, sc), None
            if invariant_to:  # fit on residuals with the columns' within-label mean differences projected out
                from guardrails.offline.baselines import pooled
                from guardrails.offline.erasure import column_basis, fold, project_rows

                erased = column_basis(train, invariant_to, pooled(rows))
                rows = project_rows(rows, erased)
            if objective == "window":  # fitted on the score the rule serves (the shipped request probe's recipe)
                from guardrails.offline.window_fit import fit_window_probe

                w, b = fit_window_probe(rows, train.labels, window=det.window)
                det = det.model_copy(update={"aggregate": "mean"})  # the aggregation the fit took its loss on
            else:
                fit = fit_probe if det.method == "probe" else fit_diffmean
                w, b = fit(rows, train.labels)
            if erased is not None:  # w . (P h) = (P w) . h: the served weights have no part along the erased ones
                w = fold(w, erased)
                erasures[rule.id] = {"invariant_to": list(invariant_to), "erased_directions": int(erased.shape[1])}
            if moving:  # a copy written elsewhere gets its own weights file: the source policy's stays as it was
                fitted = out_path.resolve().parent / f"{out_path.stem}.{rule.id}.safetensors"
                # named from the source policy's folder for now; rebased() below names it from the output's
                det = det.model_copy(update={"weights": os.path.relpath(fitted, policy.base_dir or ".")})
            save_linear(policy.resolve(det.weights), w, b, {
                "method": det.method, "layer": str(layer), "train": train.path, "train_sha256": train.sha256,
                "objective": objective, **{k: json.dumps(v) for k, v in erasures.get(rule.id, {}).items()}})
            sae_ids = [k for k, v in policy.saes.items() if v.layer == layer]
            if sae_ids:  # name the SAE features that explain the direction (decoder cosine)
                from guardrails.core.policy import Feature
                from guardrails.offline.calibrate import explain_direction
                from guardrails.sae.model import SAE

                spec = policy.saes[sae_ids[0]]
                sae = SAE.load(policy.resolve(spec.path), layer=spec.layer, k=spec.k, format=spec.format)
                expl = [Feature(id=i, weight=c, label=f"decoder cosine {c:.3f} with the {det.method} direction")
                        for i, c in explain_direction(sae, w)]
                det = det.model_copy(update={"explained_by": expl})
            rule = rule.model_copy(update={"detector": det})
            new_rules[rule.id] = rule
            policy = policy.model_copy(update={"rules": [new_rules[r.id] for r in policy.rules]})
        if fit_ensemble and isinstance(rule.detector, EnsembleDetector):
            from guardrails.offline.scoring import fit_members

            rule = new_rules[rule.id] = fit_members(session.guard, policy, rule,
                                                    functools.partial(session.own_rows, cal), cal.labels)
            policy = policy.model_copy(update={"rules": [new_rules[r.id] for r in policy.rules]})
        guard = session.guard(policy)
        if fit_gate is not None and rule.gate is not None:  # scale/offset of the gate, then the threshold
            from guardrails.offline.scoring import fit_gate as _fit_gate

            gate = _fit_gate(guard, rule, functools.partial(session.own_rows, cal, policy), cal.labels, fit_gate)
            rule = new_rules[rule.id] = rule.model_copy(update={"gate": gate})
            policy = policy.model_copy(update={"rules": [new_rules[r.id] for r in policy.rules]})
            guard = session.guard(policy)
        scores = rule_text_scores(guard, rule, functools.partial(session.own_rows, cal, policy))
        target = targets[rule.id]
        thr = round_up(fit_threshold(scores, cal.labels, target_fpr=target.get("fpr"),
                                     target_recall=target.get("recall")))
        upd: dict[str, Any] = {"threshold": thr}
        if rule.steer is not None and rule.steer.block_above is not None:
            # steer from the threshold; block above every label-0 row of the cal split (FPR 0 there)
            above = round_up(max(thr, fit_threshold(scores, cal.labels, target_fpr=0.0)))
            upd["steer"] = rule.steer.model_copy(update={"block_above": above})
        new_rules[rule.id] = rule.model_copy(update=upd)
        policy = policy.model_copy(update={"rules": [new_rules[r.id] for r in policy.rules]})
        m_cal = metrics(scores, cal.labels, thr)
        rec_metrics: dict[str, Any] = {"cal": {**round_metrics(m_cal), "ci95": bootstrap_intervals(scores, cal.labels,
                                                                                                     thr)}}
        if any(cal.sources):
            rec_metrics["cal"]["per_source"] = grouped_with_intervals(scores, cal.labels, cal.sources, thr)
        if test_data is not None:
            ts = rule_text_scores(guard, rule, functools.partial(session.own_rows, test_data, policy))
            rec_metrics["test"] = {**round_metrics(metrics(ts, test_data.labels, thr)),
                                   "ci95": bootstrap_intervals(ts, test_data.labels, thr)}
            if any(test_data.sources):
                rec_metrics["test"]["per_source"] = grouped_with_intervals(ts, test_data.labels, test_data.sources, thr)
        drift = check_against_serving(guard, cal, rule.id, scores, n=check) if check else math.nan
        record = make_record(policy=policy, data=cal, model_name=session.model_name, score_mode=guard.score_mode,
                             rule_id=rule.id, threshold=thr, target=target,
                             metrics=rec_metrics, extra={"serving_check_max_rel_diff": drift,
                                                         "weights_fitted": bool(fit_weights),
                                                         **erasures.get(rule.id, {}),
                                                         "gate": rule.gate.model_dump() if rule.gate else None,
                                                         "model_dtype": session.dtype or "float32",
                                                         "max_response_chars": max_response_chars,
                                                         "limit": limit, "train_limit": train_limit, **splits})
        report["rules"][rule.id] = record
    if record_path is None and record_dir is not None:
        record_path = record_dir / f"{policy.name}.json"
    write_calibrated(policy, report, out_path, record_path)
    if record_path is not None:
        report["record"] = str(record_path)
    report["out"] = str(out_path)
    return report


# -- the commands --------------------------------------------------------------------------------------------


def register(app: typer.Typer) -> None:
    """Add ``calibrate`` to the ``guardrails`` app."""

    @app.command()
    def calibrate(
        policy: Annotated[str, typer.Option("--policy", "-p", help="Policy file or shipped name")],
        data: Annotated[str, typer.Option(help="Labeled JSONL, CSV, TSV, JSON array (or "
                                                "gzipped), Parquet or Arrow, or a split prefix "
                                                "(thresholds on its cal split)")],
        target_fpr: Annotated[float | None, typer.Option(help="False-positive rate to fit (default: the rule's last "
                                                          "target, shipped 0.03; a new rule's 0.01)")] = None,
        target_recall: Annotated[float | None, typer.Option(help="Recall to fit instead")] = None,
        fit_weights: Annotated[bool, typer.Option(help="Fit feature weights by L1 logistic regression (train)")]
        = False,
        rule: Annotated[str | None, typer.Option(help="Calibrate only this rule (default: the rules that block or "
                                                 "steer; flag-only rules keep their thresholds unless all flag)")]
        = None,
        out: Annotated[str | None, typer.Option(help="Output policy (default: overwrite --policy)")] = None,
        model: Annotated[str | None, typer.Option(help="Model id or path (default: the policy's)")] = None,
        limit: Annotated[int | None, typer.Option(min=1, help="Use at most this many rows per split (stratified)")]
        = None,
        no_record: Annotated[bool, typer.Option(help="Do not write the calibration record")] = False,
        record: Annotated[str | None, typer.Option(help="Write the record here (default: <out>.record.json next to "
                                                   "the output policy)")] = None,
        max_response_chars: MaxResponseCharsOption = None,
        train_limit: Annotated[int | None, typer.Option(min=1, help="Rows of the train/test splits (default: --limit)")]
        = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print the record as one JSON object")] = False,
        dtype: Annotated[str | None, typer.Option(help="Model weights dtype (default float32, as served)")] = None,
        test: Annotated[bool, typer.Option(help="Also report the test split in the record")] = True,
        fit_gate: Annotated[float | None, typer.Option(help="Gated rules: fit gate scale/offset on the cal split "
                                                       "first, the request loosened by this many SDs (shipped: 1)")]
        = None,
        fit_ensemble: Annotated[bool, typer.Option(help="Ensemble rules: set each member's mean/std from its own "
                                                   "score on the cal split's label-0 rows first")] = False,
        max_features: Annotated[int, typer.Option(min=1, help="--fit-weights on an SAE-feature rule: features kept "
                                                  "at most")] = 16,
        objective: Annotated[str, typer.Option(help="--fit-weights: 'pooled' (an SAE rule's positive weights on "
                                               "max-pooled activations; a probe on mean-pooled rows) or 'window' "
                                               "(fitted on the served window score; an SAE rule gets signed weights "
                                               "and a bias: use many features, e.g. --max-features 2048)")] = "pooled",
        invariant_to: Annotated[list[str] | None, typer.Option(
            help="--fit-weights on a probe: a column of the labeled rows (a form, a language, the source) the probe "
                 "must not read: its groups' mean differences within each label are projected out first "
                 "(repeatable)")] = None,
        columns: ColumnsOption = None,
        positive: PositiveOption = None,
        label: LabelOption = None,
        skip_unlabeled: SkipUnlabeledOption = False,
        system: SystemOption = None,
    ) -> None:
        """Fit thresholds (and optionally feature weights) to a target FPR or recall; write policy + record."""
        from guardrails.cli.main import _run_safely, console, fail, output_path, resolve_policy_path

        if target_fpr is not None and target_recall is not None:
            fail("give --target-fpr or --target-recall, not both")
        fmt = _run_safely(lambda: DataFormat.parse(columns, positive, label, skip_unlabeled))
        if objective not in ("pooled", "window"):
            fail(f"--objective {objective!r}: valid: 'pooled' or 'window'")
        if objective != "pooled" and not fit_weights:
            fail("--objective chooses how --fit-weights fits a rule's weights; add --fit-weights")
        if invariant_to and not fit_weights:
            fail("--invariant-to changes how --fit-weights fits a probe's weights; add --fit-weights")
        path = str(resolve_policy_path(policy))
        if out is None and not Path(policy or "").is_file():
            fail(f"--policy {policy or 'harmful-requests'!r} is a shipped policy (package data): give --out for the "
                 "calibrated copy")
        out_path = output_path(out, "--out") if out is not None else Path(path)
        record_path = None if no_record else Path(record) if record else out_path.with_suffix(".record.json")
        if record is not None and record_path is not None:
            record_path = output_path(record_path, "--record")
        model = _run_safely(lambda: model_for([path], model))
        session = Session(model, progress=not as_json, dtype=dtype, data_format=fmt, system=system)
        rep = _run_safely(lambda: run_calibrate(
            session, path, data, target_fpr=target_fpr,
            target_recall=target_recall,
            fit_weights=fit_weights, rule_id=rule, out=out, limit=limit, record_dir=None, record_path=record_path,
            max_response_chars=max_response_chars, train_limit=train_limit, evaluate_test=test, fit_gate=fit_gate,
            fit_ensemble=fit_ensemble, max_features=max_features, objective=objective,
            invariant_to=tuple(invariant_to or ())))
        if as_json:
            print(json.dumps(rep, ensure_ascii=False, default=float))
            return
        for rid, r in rep["rules"].items():
            m = r["metrics"]
            line = f"rule [bold]{markup(rid)}[/]: threshold {r['threshold']:.4f}  cal FPR {m['cal']['fpr']:.3f} " \
                   f"TPR {m['cal']['tpr']:.3f}"
            if "test" in m:
                line += f"  | test AUROC {m['test']['auroc']}, FPR {m['test']['fpr']:.3f}, TPR {m['test']['tpr']:.3f}"
            console.print(line)
        if rep.get("target_from_policy"):
            console.print(f"target: {markup(', '.join(rep['target_from_policy']))}, as the policy was calibrated "
                          "before (--target-fpr or --target-recall to change it)")
        for w in rep.get("warnings", []):
            console.print(f"[yellow]warning[/]: {markup(w)}")
        console.print(f"wrote {markup(rep['out'])}")
