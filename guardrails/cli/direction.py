"""``guardrails direction``: build a steering direction from labeled data and save it with its record.

    guardrails direction --kind contrastive --data calibration/directions/refusal_contrast.train.jsonl \
        --layer 12 --out calibration/directions/refusal-l12

See :mod:`guardrails.offline.directions` (contrastive: rows ``{prompt, response, label}``; diffmean and
probe: rows ``{text, label}``). Label 1 is the side that a positive strength steers toward.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from guardrails.cli.safe import markup
from guardrails.cli.session import ColumnsOption, LabelOption, PositiveOption, SkipUnlabeledOption


def register(app: typer.Typer) -> None:
    """Add ``direction`` to the main app."""
    app.command("direction")(direction_command)


def direction_command(
    kind: Annotated[str, typer.Option("--kind", help="contrastive, diffmean or probe")],
    data: Annotated[Path, typer.Option("--data", help="Labeled JSONL (label 1: the side to steer toward)")],
    layer: Annotated[int, typer.Option("--layer", help="Decoder block whose output (residual stream) is read")],
    out: Annotated[Path, typer.Option("--out", help="Output path (.safetensors; a .json record goes beside it)")],
    model: Annotated[str | None, typer.Option("--model", help="Hugging Face id or path; default: bundled")] = None,
    pool: Annotated[str, typer.Option("--pool", help="diffmean/probe: last or mean prompt token")] = "last",
    holdout: Annotated[int, typer.Option("--holdout", help="Every N-th row (prompt) held out to measure; 0: none")] = 5,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Stratified subset of this many rows")] = None,
    columns: ColumnsOption = None,
    positive: PositiveOption = None,
    label: LabelOption = None,
    skip_unlabeled: SkipUnlabeledOption = False,
) -> None:
    """Fit a steering direction at one layer and save it (safetensors + JSON record)."""
    from guardrails.cli.main import _run_safely, console, fail, output_path
    from guardrails.offline.directions import KINDS, DirectionError, build_direction, save_direction
    from guardrails.serving.models import load_model

    if kind not in KINDS:
        fail(f"--kind {kind!r} unknown; valid: {', '.join(KINDS)}")
    if pool not in ("last", "mean"):
        fail(f"--pool {pool!r} unknown; valid: last, mean")
    if not data.is_file():
        fail(f"--data {str(data)!r} not found")
    output_path(out, "--out")  # its folder made (or the flag named) before the model runs
    from guardrails.offline.dataformat import DataFormat

    fmt = _run_safely(lambda: DataFormat.parse(columns, positive, label, skip_unlabeled))
    lm, tok = _run_safely(lambda: load_model(model, dtype="float32"))
    with console.status(f"building a {kind} direction at layer {layer} from {data} ..."):
        try:
            d = _run_safely(lambda: build_direction(lm, tok, data, kind=kind, layer=layer, pool=pool,  # type: ignore[arg-type]
                                                    holdout=holdout, limit=limit, model_name=model or "bundled",
                                                    fmt=fmt))
        except DirectionError as exc:
            fail(str(exc))
    path, record = save_direction(d, out)
    r = d.record
    sep = "not measured" if r.heldout_auroc is None else (
        f"held-out AUROC {r.heldout_auroc:.3f}, gap {r.heldout_gap:.3f} x norm (n={r.n_heldout})")
    console.print(f"wrote {markup(path)} and {markup(record)}: {r.kind} at layer {r.layer}, "
                  f"{r.n_positive}+{r.n_negative} rows, residual norm {r.residual_norm:.1f}; {sep}", highlight=False)
