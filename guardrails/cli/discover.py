"""``guardrails discover``: rank SAE features by how well they separate a labeled file's labels, explain them
with the tokens they fire on, and draft a rule (``guardrails calibrate`` then fits its threshold and weights).

The workflow is a plain function (:func:`run_discover`) returning a dict. ``--data`` takes a labeled file or a split
prefix (discovery reads its train split).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

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
    _scope_of_data,
    split_files,
    split_or_file,
)
from guardrails.offline.dataformat import DataFormat


def run_discover(session: Session, data_path: str, layer: int | None, sae_ref: str = "bundled", *, top: int = 20,
                 scope: str | None = None, limit: int | None = None, n_examples: int = 3,
                 target_fpr: float = 0.01, max_response_chars: int | None = None) -> dict[str, Any]:
    from guardrails.offline.calibrate import fit_threshold, prefix_aware_pooled
    from guardrails.offline.discover import draft_rule, explain, rank_features, scored_tokens
    from guardrails.sae.model import SAE

    files = split_files(data_path)
    data = session.load(split_or_file(files, data_path, "train", "discover ranks features on"), limit=limit,
                        max_response_chars=max_response_chars)
    sc = _scope_of_data(data, scope)
    sae = SAE.load(sae_ref, layer=layer)
    if layer is None:  # the layer the SAE file records (the bundled SAE's, a Qwen-Scope layer{n}.sae.pt's)
        if sae.cfg.layer is None:
            raise ValueError(f"--sae {sae_ref}: the SAE does not record which layer it reads; give --layer N "
                             "(the decoder block whose output it was trained on)")
        layer = int(sae.cfg.layer)
    rows = session.rows(data, layer, sc)
    pooled = prefix_aware_pooled(sae, rows)
    stats = rank_features(pooled, data.labels, top=top)
    _, tok = session.lm()
    from guardrails.offline.calibrate import rows_for_scope

    prompts, responses = rows_for_scope(data, sc)
    ctx = scored_tokens(tok, prompts, responses, sc)
    ex = explain(sae, rows, ctx, [s.feature for s in stats], n=n_examples)
    rule = draft_rule(stats, scope=sc, explanations=ex)
    feats = [f["id"] for f in rule["detector"]["features"]]
    if feats:  # draft threshold: a max-pooled sum at the target FPR on the same data (calibrate to replace it)
        rule["threshold"] = round(fit_threshold(pooled[:, feats].sum(1), data.labels, target_fpr=target_fpr), 4)
    policy = {"name": f"draft-{Path(data.path).stem}", "model": session.model_name,
              "saes": {"main": {"path": sae_ref, "layer": layer}}, "rules": [rule],
              # calibrate warns when it fits the threshold on the rows the features were chosen on
              "calibration": {rule["id"]: {"features_from": {"data": data.path, "sha256": data.sha256}}}}
    return {"data": data.path, "rows": len(data), "scope": sc, "layer": layer,
            "features": [{**s.__dict__, "mean_diff": s.mean_diff, "examples": ex.get(s.feature, [])} for s in stats],
            "policy": policy}



def register(app: typer.Typer) -> None:
    """Add ``discover`` to the ``guardrails`` app."""

    @app.command()
    def discover(
        data: Annotated[str, typer.Option(help="Labeled JSONL, CSV, TSV, JSON array (or "
                                                "gzipped), Parquet or Arrow, or a split "
                                                "prefix (uses its train split)")],
        layer: Annotated[int | None, typer.Option(help="Layer the SAE reads (default: the layer its file records; "
                                                       "the bundled SAE's is 15)")] = None,
        sae: Annotated[str, typer.Option(help="SAE path or 'bundled'")] = "bundled",
        top: Annotated[int, typer.Option(min=1, max=500, help="Features to list")] = 20,
        out: Annotated[Path | None, typer.Option(help="Write a draft policy YAML here")] = None,
        model: Annotated[str, typer.Option(help="Model id or path (default: bundled)")] = "bundled",
        scope: Annotated[str | None, typer.Option(help="input or output (default: output if rows have responses)")]
        = None,
        limit: Annotated[int | None, typer.Option(min=1, help="Use at most this many rows (stratified)")] = None,
        max_response_chars: MaxResponseCharsOption = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
        columns: ColumnsOption = None,
        positive: PositiveOption = None,
        label: LabelOption = None,
        skip_unlabeled: SkipUnlabeledOption = False,
        system: SystemOption = None,
    ) -> None:
        """Rank SAE features by how well they separate the labels; explain them; draft a rule."""
        import yaml

        from guardrails.cli.main import _run_safely, console, output_path

        if out is not None:
            out = output_path(out, "--out")
        fmt = _run_safely(lambda: DataFormat.parse(columns, positive, label, skip_unlabeled))
        session = Session(model, progress=not as_json, data_format=fmt, system=system)
        res = _run_safely(lambda: run_discover(session, data, layer, sae, top=top, scope=scope, limit=limit,
                                               max_response_chars=max_response_chars))
        if out is not None:
            out.write_text(yaml.safe_dump(res["policy"], sort_keys=False, allow_unicode=True), encoding="utf-8")
        if as_json:
            print(json.dumps(res, ensure_ascii=False))
            return
        from rich.table import Table

        t = Table("rank", "feature", "AUROC", "fires (1)", "fires (0)", "mean diff", "top tokens in context",
                  title=f"{markup(res['data'])}: {res['rows']} rows, {res['scope']} tokens, layer {res['layer']}")
        for i, f in enumerate(res["features"], 1):
            ex = "\n".join(f"{v:.1f} {w}" for v, w in f["examples"])
            t.add_row(str(i), str(f["feature"]), f"{f['auroc']:.3f}", f"{f['freq_pos']:.0%}", f"{f['freq_neg']:.0%}",
                      f"{f['mean_diff']:.2f}", cell(ex, keep_newlines=True))
        console.print(t)
        if out is None:  # the table alone ends a new user's first step with no way on: name it
            n = len(res["policy"]["rules"][0]["detector"]["features"])
            console.print(f"next: add --out FILE to write a draft policy of the top {n} features, then calibrate it "
                          "(the command is printed)", soft_wrap=True)
        if out is not None:
            import shlex

            # the file is read the same way at the next step: its --columns/--positive/--label, --system and the
            # response cut again (the draft names its model, which calibrate then loads)
            files = split_files(data)  # a prefix without a cal split: calibrate on the file discover read
            cal_data = data if "file" in files or "cal" in files else str(files["train"])
            nxt = shlex.join(["guardrails", "calibrate", "--policy", str(out), "--data", cal_data]
                             + (["--max-response-chars", str(max_response_chars)] if max_response_chars else []))
            nxt += f" {fmt.flags()}" if fmt is not None else ""
            nxt += f" --system {shlex.quote(system)}" if system else ""
            # the draft weighs its features 1.0 each: fitted weights rank better held out (README, "A new user's rule":
            # on the repo's request data test AUROC 0.867 as drafted, 0.908 with a window fit over 2,048 features)
            console.print(f"the draft sums its {len(res['policy']['rules'][0]['detector']['features'])} features with "
                          "weight 1; add --fit-weights to fit them (--objective window --max-features 2048: signed "
                          "weights over many features, the shipped SAE rule's recipe)"
                          + (" on the train split" if "train" in files else "; with one file, weights and threshold "
                             "come from the same rows"), soft_wrap=True)
            console.print(f"draft policy written to {markup(out)}; next: {markup(nxt)}", soft_wrap=True)
