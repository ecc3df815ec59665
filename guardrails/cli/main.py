"""The ``guardrails`` command: generate, demo, features, validate, train-sae (+ commands of sub-modules).

Other modules add their commands through a ``register(app)`` function listed in ``_EXTENSIONS``.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from guardrails.cli.safe import cell, dumps, markup, visible

app = typer.Typer(
    name="guardrails",
    help="Safety guardrails for LLMs built on SAE features (sae-guardrails).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# output written to a file or a pipe (a log, a results file) gets 120 columns instead of rich's 80, so that the eval
# tables' policy names and the error messages stay on one line; a terminal, or COLUMNS, sets its own width
_PIPED_WIDTH = None if os.environ.get("COLUMNS") else 120
console = Console(width=None if os.isatty(1) else _PIPED_WIDTH)
err_console = Console(stderr=True, width=None if os.isatty(2) else _PIPED_WIDTH)

DEFAULT_POLICY = "harmful-requests"
REPO_POLICIES = Path(__file__).resolve().parents[2] / "policies"  # the repository's; shipped: guardrails._data
_EXTENSIONS = ("guardrails.cli.audit", "guardrails.cli.discover", "guardrails.cli.calibrate", "guardrails.cli.evaluate",
               "guardrails.cli.onnx", "guardrails.cli.serve", "guardrails.cli.direction")


def resolve_policy_path(policy: str | None) -> Path:
    """A policy file path from a path or the name of a shipped policy (``harmful-requests``)."""
    from guardrails._data import shipped_policies, shipped_policy

    name = policy or DEFAULT_POLICY
    p = Path(name)
    if p.is_file():
        return p
    shipped = None if p.exists() else shipped_policy(name)
    if shipped is not None:
        return shipped
    names = shipped_policies()
    raise typer.BadParameter(f"policy {name!r} is neither a file nor a shipped policy; shipped: {', '.join(names)}")


def fail(message: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/] {markup(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def output_path(path: str | Path, flag: str) -> Path:
    """An output file named by ``flag``, checked before any work is done: its folder is created when missing
    (``--out mine/my.yaml`` makes ``mine/``); a path that is a folder, or whose folder cannot be made (a file in the
    way, no permission), fails here with the flag named instead of after the work, when nothing could be written."""
    p = Path(path)
    if p.is_dir():
        fail(f"{flag} {p}: is a folder; give a file path")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        fail(f"{flag} {p}: cannot create its folder {p.parent}: {exc.strerror or exc}")
    return p


def _load_guard(policy: str | None, model: str | None, score_mode: str | None, audit: str | None = None,
                judges: list[str] | None = None) -> Any:
    """A GuardedModel for the CLI; ``judges``: ``--judge`` values (``[NAME=]module:callable``) for a cascade."""
    from guardrails.core.judge_paths import judges_from_cli
    from guardrails.core.policy import Policy
    from guardrails.serving.generation import GuardedModel

    pol = Policy.from_path(resolve_policy_path(policy))
    bound = judges_from_cli(judges or [], pol)  # before the model loads: a bad --judge fails fast
    return GuardedModel.from_pretrained(model, policy=pol, score_mode=score_mode, audit=audit, judges=bound)


def _run_safely(fn: Any) -> Any:
    """Turn library errors into one clear line and exit code 2 (no traceback from deep inside)."""
    from guardrails.core.errors import GuardrailsError

    try:
        return fn()
    except (GuardrailsError, ValueError, TypeError, FileNotFoundError) as exc:
        fail(str(exc))


ModelOpt = Annotated[str | None, typer.Option("--model", help="Hugging Face id or path; default: the bundled SmolLM2")]
PolicyOpt = Annotated[str | None, typer.Option("--policy", "-p", help="Policy file or shipped policy name")]
ModeOpt = Annotated[str | None, typer.Option("--score-mode", help="exact or watched (default: the policy's)")]
JudgeOpt = Annotated[list[str] | None, typer.Option(
    "--judge", help="A cascade's judge: NAME=module:callable binds the policy's judge NAME, a bare module:callable "
                    "every judge it names; 'module:make()' calls a factory (repeatable; e.g. "
                    "guardrails.offline.text_judge:bundled_judge())")]


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="The user prompt")],
    policy: PolicyOpt = None,
    model: ModelOpt = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, max=4096, help="Tokens to generate at most")] = 64,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
    stream: Annotated[bool, typer.Option(help="Print tokens as they are released")] = False,
    score_mode: ModeOpt = None,
    audit_db: Annotated[
        str | None, typer.Option("--audit-db", envvar="GUARDRAILS_AUDIT_DB", help="Record decisions in this audit db")
    ] = None,
    repetition_penalty: Annotated[float | None, typer.Option(help="Penalize repeated tokens (e.g. 1.2)")] = None,
    no_repeat_ngram_size: Annotated[int | None, typer.Option(help="Never repeat an n-gram of this size")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop string (repeat the option)")] = None,
    temperature: Annotated[float | None, typer.Option(help="Sample at this temperature (0 = greedy)")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the sampler")] = None,
    judge: JudgeOpt = None,
) -> None:
    """Generate a reply to PROMPT under a policy and show what the guard decided."""
    gen: dict[str, Any] = {"max_new_tokens": max_new_tokens}
    for key, value in (("repetition_penalty", repetition_penalty), ("no_repeat_ngram_size", no_repeat_ngram_size),
                       ("stop_strings", stop or None), ("seed", seed)):
        if value is not None:
            gen[key] = value
    if temperature is not None:
        gen.update(temperature=temperature, do_sample=temperature > 0)
    if not prompt.strip():
        fail("PROMPT is empty")
    guard = _run_safely(lambda: _load_guard(policy, model, score_mode, audit_db, judge))
    if stream and not as_json:
        def run_stream() -> Any:
            s = guard.stream(prompt, **gen)  # bad input fails here, before any text
            for piece in s:
                console.print(visible(piece, keep_newlines=True), end="", highlight=False, markup=False)
            console.print()
            return s.result

        result = _run_safely(run_stream)
    else:
        result = _run_safely(lambda: guard.generate(prompt, **gen))
    if as_json:
        print(dumps(result.to_dict()))
        return
    if not stream:
        console.print(visible(result.text, keep_newlines=True), highlight=False, markup=False)
    _print_decisions(result)


def _print_decisions(result: Any) -> None:
    status = "[red]BLOCKED[/]" if result.blocked else "[yellow]STEERED[/]" if result.steered else "[green]allowed[/]"
    console.print(f"\n{status}  policy={markup(result.policy)}  decisions={len(result.decisions)}")
    if result.decisions:
        judged = any(d.escalated for d in result.decisions)
        t = Table("action", "rule", "category", "scope", "pos", "token", "score", "threshold", "top features",
                  *(("judge",) if judged else ()))
        for d in result.decisions:
            feats = ", ".join(f"{i}:{v:.1f}" for i, v in d.top_features[:3])
            verdict = (f"{d.judge}: {d.verdict}" + (f" ({d.judge_reason})" if d.judge_reason else "")
                       if d.escalated else "-")
            t.add_row(d.action, cell(d.rule), cell(d.category or "-"), d.scope, str(d.position), cell(repr(d.token)),
                      f"{d.score:.2f}", f"{d.threshold:.2f}", feats, *((cell(verdict),) if judged else ()))
        console.print(t)


@app.command()
def demo(
    policy: PolicyOpt = None,
    model: ModelOpt = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, max=512)] = 40,
) -> None:
    """Benign and harmful prompts side by side: the unguarded model vs the guarded one."""
    from guardrails.cli.demo import run_demo

    _run_safely(lambda: run_demo(console, resolve_policy_path(policy), model, max_new_tokens))


@app.command()
def features(
    prompt: Annotated[str, typer.Argument(help="Text to inspect")],
    sae: Annotated[str, typer.Option(help="SAE path, 'bundled[:name]' or hf://org/repo")] = "bundled",
    layer: Annotated[int | None, typer.Option(help="Layer the SAE reads (default: the SAE's own)")] = None,
    k: Annotated[int | None, typer.Option(help="TopK k where the SAE file does not store it")] = None,
    model: ModelOpt = None,
    top: Annotated[int, typer.Option(min=1, max=100, help="Features shown per token")] = 5,
    chat: Annotated[bool, typer.Option(help="Wrap PROMPT in the chat template as a user turn")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    feature: Annotated[int | None, typer.Option(help="Trace this one feature over every token instead")] = None,
) -> None:
    """The top SAE features at each token of PROMPT (the debugging use of SAEs), or one feature traced."""
    from guardrails.serving.inspect import feature_trace, top_features_per_token

    if feature is not None:
        trace = _run_safely(lambda: feature_trace(prompt, feature, sae=sae, layer=layer, k=k, model=model,
                                                  chat=chat))
        if as_json:
            print(dumps(trace))
            return
        peak = max((r["activation"] for r in trace), default=0.0) or 1.0
        t = Table("pos", "token", f"feature {feature}", "rank", "")
        for r in trace:
            bar = "█" * round(20 * max(r["activation"], 0.0) / peak)
            t.add_row(str(r["position"]), cell(repr(r["token"])), f"{r['activation']:.2f}",
                      "-" if r["rank"] is None else str(r["rank"]), bar)
        console.print(t)
        return
    rows = _run_safely(
        lambda: top_features_per_token(prompt, sae=sae, layer=layer, k=k, model=model, top=top, chat=chat)
    )
    if as_json:
        print(dumps(rows))
        return
    t = Table("pos", "token", f"top {top} features (id:activation)")
    for r in rows:
        t.add_row(str(r["position"]), cell(repr(r["token"])), "  ".join(f"{i}:{v:.1f}" for i, v in r["features"]))
    console.print(t)


@app.command()
def validate(
    files: Annotated[list[Path], typer.Argument(help="Policy YAML files")],
    deep: Annotated[bool, typer.Option(help="Also load the SAEs and model and check layers and feature ids")] = False,
) -> None:
    """Check policy files: schema, SAE and probe files (widths and hidden sizes from their headers), layers
    against the model's config, feature ids against SAE widths; no weights are loaded (--deep loads them).
    Exit 1 if any is invalid."""
    from guardrails.cli.checks import check_policy
    from guardrails.core.policy import Policy, PolicyError

    bad = 0
    for f in files:
        try:
            pol = Policy.from_path(f)
            problems, notes = check_policy(pol)
            for note in notes:
                err_console.print(f"[yellow]note[/] {markup(f)}: {markup(note)}", highlight=False)
            if problems:
                raise PolicyError(f"{f}: " + "; ".join(problems))
            if deep:
                _run_safely(lambda pol=pol: _deep_check(pol))
            console.print(f"[green]ok[/] {markup(f)}: policy {markup(repr(pol.name))}, {len(pol.rules)} rules, "
                          f"layers {pol.layers()}")
        except PolicyError as exc:
            bad += 1
            err_console.print(f"[red]invalid[/] {markup(exc)}", highlight=False)
    raise typer.Exit(1 if bad else 0)


def _deep_check(pol: Any) -> None:
    from guardrails.serving.generation import GuardedModel

    GuardedModel.from_pretrained(pol.model, policy=pol)


@app.command("train-sae")
def train_sae(
    corpus: Annotated[Path, typer.Option(help="Text corpus: .txt (one text per line) or .jsonl with a 'text' field")],
    out: Annotated[Path, typer.Option(help="Output folder (our format: cfg.json + sae.safetensors)")],
    layer: Annotated[list[int], typer.Option(help="Layer(s) to train at (repeat the option)")],
    model: ModelOpt = None,
    width: Annotated[int, typer.Option(min=16, help="Number of latents (Qwen-Scope: 16x the hidden size)")] = 9216,
    k: Annotated[int, typer.Option(min=1, help="Active latents per token")] = 50,
    tokens: Annotated[int, typer.Option(min=1000, help="Activation vectors to collect")] = 1_000_000,
    epochs: Annotated[int, typer.Option(min=1, max=100)] = 2,
    seq_len: Annotated[int, typer.Option(min=8, max=8192)] = 256,
    dtype: Annotated[str, typer.Option(help="Model dtype for collection (bf16 is ~2x faster on CPU)")] = "bf16",
) -> None:
    """Train TopK SAE(s) with the Qwen-Scope recipe and print FVU and dead latents."""
    from guardrails.offline.train import collect_activations, save_with_report, train_topk_sae
    from guardrails.serving.models import load_model

    if not corpus.is_file():
        fail(f"--corpus {corpus} not found")
    texts = _read_corpus(corpus)
    if k > width:
        fail(f"--k {k} must be <= --width {width}")
    lm, tok = _run_safely(lambda: load_model(model, dtype=dtype))
    n_layers = lm.config.num_hidden_layers
    bad = [x for x in layer if not 0 <= x < n_layers]
    if bad:
        fail(f"--layer {bad} out of range; valid: 0..{n_layers - 1}")
    tok.padding_side = "right"
    acts = collect_activations(lm, tok, texts, layer, max_tokens=tokens, seq_len=seq_len)
    for L, x in acts.items():
        sae, report = train_topk_sae(x, d_sae=width, k=k, epochs=epochs, layer=L, model_name=model or "bundled")
        if report.train_tokens == 0:  # an SAE it did not train is not written
            fail(f"layer {L}: 0 training steps ({len(x)} activation vectors collected from {corpus}, too few for "
                 "one batch after the held-out slice); give a larger --corpus or more --tokens. Nothing written.")
        path = save_with_report(sae, report, out / f"layer{L}" if len(layer) > 1 else out,
                                {"layer": L, "corpus": str(corpus), "collected_tokens": len(x)})
        console.print(
            f"layer {L}: FVU {report.fvu:.4f} (PCA-{k}: {report.pca_fvu:.4f}), "
            f"dead {report.dead_fraction:.2%} -> {markup(path)}"
        )


def _read_corpus(path: Path) -> list[str]:
    texts: list[str] = []
    with path.open(encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                try:
                    texts.append(str(json.loads(line)["text"]))
                except (json.JSONDecodeError, KeyError, TypeError):
                    fail(f"{path}:{i}: expected a JSON object with a 'text' field")
            else:
                texts.append(line.rstrip("\n"))
    if not texts:
        fail(f"{path}: no texts")
    return texts


def _register_extensions() -> None:
    for name in _EXTENSIONS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        module.register(app)


_register_extensions()


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    from guardrails.core.errors import GuardrailsError

    try:
        app(prog_name="guardrails")
    except GuardrailsError as exc:  # any command: one clear line, never a traceback from inside
        err_console.print(f"[bold red]error:[/] {markup(str(exc))}", highlight=False, soft_wrap=True)
        raise SystemExit(2) from None


if __name__ == "__main__":  # pragma: no cover
    main()
