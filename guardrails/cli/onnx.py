"""``guardrails export-onnx``: write an ONNX guard folder (see :mod:`guardrails.onnx`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Add ``export-onnx`` to the main app."""
    app.command("export-onnx")(export_onnx_command)


def export_onnx_command(
    out: Annotated[Path, typer.Option("--out", help="Output folder (guard.onnx, manifest.json, tokenizer)")],
    policy: Annotated[str | None, typer.Option("--policy", "-p", help="Policy file or shipped policy name")] = None,
    model: Annotated[str | None, typer.Option("--model", help="Hugging Face id or path; default: the policy's")] = None,
    score_mode: Annotated[str | None, typer.Option("--score-mode", help="exact or watched (default: policy's)")] = None,
    check: Annotated[bool, typer.Option(help="Score sample texts with torch and ONNX and record the parity")] = True,
    opset: Annotated[int | None, typer.Option(help="ONNX opset (default: the exporter's)")] = None,
) -> None:
    """Export the model cut at the deepest watched layer plus the policy's scoring head to ONNX."""
    from guardrails.cli.main import _run_safely, console, fail, resolve_policy_path
    from guardrails.cli.safe import markup
    from guardrails.core.policy import Policy
    from guardrails.onnx.export import OnnxGuardError, export_onnx
    from guardrails.serving.models import load_model

    if score_mode not in (None, "exact", "watched"):
        fail(f"--score-mode {score_mode!r} unknown; valid: exact, watched")
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    pol = _run_safely(lambda: Policy.from_path(resolve_policy_path(policy)))
    steps = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console)
    with steps:
        task = steps.add_task(f"1/2 loading {model or pol.model or 'bundled'} ...", total=None)
        lm, tok = _run_safely(lambda: load_model(model or pol.model, dtype="float32"))
        steps.update(task, completed=1, total=1)
        what = "exporting and checking parity" if check else "exporting"
        task = steps.add_task(f"2/2 {what}: policy {pol.name!r} -> {out} ...", total=None)
        try:
            report = _run_safely(lambda: export_onnx(pol, out, model=lm, tokenizer=tok, score_mode=score_mode,
                                                     check=check, opset=opset))
        except OnnxGuardError as exc:
            fail(str(exc))
        steps.update(task, completed=1, total=1)
    parity = "not checked" if report.parity is None else f"max relative difference {report.parity:.1e}"
    console.print(
        f"[green]exported[/] {markup(report.folder)}: layers 0..{report.cut_after_layer}, {report.score_mode} mode, "
        f"{report.onnx_bytes / 1e6:.1f} MB, {report.seconds:.0f} s; parity with torch: {parity}"
    )
    console.print(f"serve it with: guardrails.onnx.OnnxGuard.load({markup(repr(str(report.folder)))}).score(texts)")
