"""``guardrails serve``: the OpenAI-compatible server (see :mod:`guardrails.server`)."""

from __future__ import annotations

import ipaddress
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Add ``serve`` to the main app."""
    app.command("serve")(serve_command)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve_command(
    policy: Annotated[str | None, typer.Option("--policy", "-p", help="Policy file or shipped policy name")] = None,
    model: Annotated[str | None, typer.Option("--model", help="Hugging Face id or path; default: the policy's")] = None,
    host: Annotated[str, typer.Option(help="Address to bind (default loopback only)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port")] = 8000,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="GUARDRAILS_API_KEY",
                                                help="Require 'Authorization: Bearer KEY' on /v1 and /metrics")] = None,
    upstream: Annotated[str | None, typer.Option(help="Proxy mode: base URL of an OpenAI-compatible server, "
                                                 "e.g. http://127.0.0.1:8001/v1")] = None,
    upstream_api_key: Annotated[str | None, typer.Option("--upstream-api-key", envvar="GUARDRAILS_UPSTREAM_API_KEY",
                                                         help="Bearer key for the upstream")] = None,
    upstream_timeout: Annotated[float, typer.Option(help="Seconds to wait for the upstream")] = 60.0,
    model_name: Annotated[str, typer.Option("--model-name", help="Model id clients use")] = "guardrails",
    audit: Annotated[str | None, typer.Option(help="Audit database: every decision is recorded")] = None,
    score_mode: Annotated[str | None, typer.Option("--score-mode", help="exact or watched")] = None,
    max_batch: Annotated[int, typer.Option(help="Most requests decoded together")] = 16,
    max_tokens_limit: Annotated[int, typer.Option(help="Largest max_tokens a request may ask for")] = 1024,
    max_streams: Annotated[int, typer.Option(help="Most streams open at once")] = 32,
    threads: Annotated[int | None, typer.Option(help="torch threads (default: torch's)")] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
    engine: Annotated[str, typer.Option(help="hf: this package's decode loop; vllm: the guard inside vLLM "
                                        "(continuous batching; run from the vLLM venv)")] = "hf",
    max_model_len: Annotated[int | None, typer.Option("--max-model-len", help="vLLM: longest prompt + answer "
                                                      "(default: the model's)")] = None,
    tensor_parallel_size: Annotated[int, typer.Option("--tensor-parallel-size", min=1,
                                                      help="vLLM: GPUs per replica")] = 1,
    judge: Annotated[list[str] | None, typer.Option(
        "--judge", help="A cascade's judge: NAME=module:callable binds the policy's judge NAME, a bare "
                        "module:callable every judge it names; 'module:make()' calls a factory (repeatable; "
                        "engine vllm: output rules' bands only under greedy or seeded decoding)")] = None,
) -> None:
    """Serve the guarded model with OpenAI-compatible endpoints (/v1/chat/completions, /v1/completions,
    /v1/models, /v1/guard/check, /healthz, /metrics); with --upstream, guard another server instead;
    with --engine vllm, generate inside a guarded vLLM engine."""
    from guardrails.cli.main import _load_guard, _run_safely, err_console, fail
    from guardrails.cli.safe import markup

    try:
        import uvicorn

        from guardrails.server import ServerConfig, create_app
    except ImportError as exc:
        fail(f"{exc}; install the server extra: pip install 'sae-guardrails[server]'")
        return
    if score_mode not in (None, "exact", "watched"):
        fail(f"unknown --score-mode {score_mode!r}; valid: exact, watched")
    if engine not in ("hf", "vllm"):
        fail(f"unknown --engine {engine!r}; valid: hf, vllm")
    if engine == "vllm":
        from guardrails.vllm import INSTALL_HINT, vllm_available

        if not vllm_available():
            fail(f"--engine vllm: vLLM is not importable by this Python; {INSTALL_HINT} "
                 "(then: /opt/venvs/vllm/bin/guardrails serve --engine vllm ...)")
        if upstream:
            fail("--engine vllm and --upstream exclude each other: proxy mode scans with the HF model")
        if score_mode is not None:
            fail("--score-mode applies to --engine hf only (vLLM scores with the policy's own mode)")
    if not _loopback(host) and not api_key:
        err_console.print(f"[bold yellow]warning:[/] binding {markup(host)} without an API key: anyone who can reach "
                          "this port can use the model (set --api-key or GUARDRAILS_API_KEY)", highlight=False)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    if engine == "vllm":
        guard = _run_safely(lambda: _load_vllm_guard(policy, model, audit, max_model_len, tensor_parallel_size,
                                                     max_batch, judge))
    else:
        guard = _run_safely(lambda: _load_guard(policy, model, score_mode, audit, judge))
    try:
        config = ServerConfig(model_name=model_name, api_key=api_key or None, upstream=upstream,
                              upstream_api_key=upstream_api_key, upstream_timeout=upstream_timeout,
                              max_batch=max_batch, max_tokens_limit=max_tokens_limit, max_streams=max_streams)
    except ValueError as exc:
        fail(str(exc))
        return
    app = create_app(guard, config)
    mode = f"proxy for {upstream}" if upstream else f"local, engine {engine}"
    err_console.print(f"serving policy [bold]{markup(guard.policy.name)}[/] as model {markup(repr(model_name))} "
                      f"({markup(mode)}) on http://{markup(host)}:{port}/v1", highlight=False)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


def _load_vllm_guard(policy: str | None, model: str | None, audit: str | None, max_model_len: int | None,
                     tensor_parallel_size: int, max_batch: int, judges: list[str] | None = None) -> object:
    """A GuardedVLLM on the policy's model (the bundled one by default); vLLM batches up to ``max_batch``;
    ``judges``: ``--judge`` values for a cascade (bands judged between two passes, guardrails.vllm.cascade)."""
    from guardrails.cli.main import resolve_policy_path
    from guardrails.core.judge_paths import judges_from_cli
    from guardrails.core.policy import Policy
    from guardrails.vllm import GuardedVLLM

    pol = Policy.from_path(resolve_policy_path(policy))
    bound = judges_from_cli(judges or [], pol)  # before the engine starts: a bad --judge fails fast
    args: dict[str, object] = {"model": model or pol.model, "max_num_seqs": max_batch,
                               "tensor_parallel_size": tensor_parallel_size}
    if max_model_len is not None:
        args["max_model_len"] = max_model_len
    return GuardedVLLM(args, pol, audit=audit, judges=bound)
