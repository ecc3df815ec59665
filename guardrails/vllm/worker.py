"""The vLLM worker extension: hooks at the policy's layers, scoring every request's rows every step.

vLLM mixes this class into its worker when the engine is built with
``worker_extension_cls="guardrails.vllm.worker.GuardWorkerExtension"`` (``GuardedVLLM`` does that);
the caller reaches it with ``llm.collective_rpc("guardrails_setup", args=...)``. Its methods run
inside the worker process, where ``self.model_runner`` is vLLM's (V1) model runner.

Per step: a pre-hook on the shallowest watched decoder layer reads the step's layout (request ids in
row order from ``input_batch.req_ids``, rows per request from ``query_start_loc``, positions from the
layer's own ``positions`` argument, token ids from the runner's ``input_ids`` buffer); a forward hook on
each watched layer rebuilds the residual stream (a vLLM decoder layer returns ``(hidden, residual)``
and the stream is their sum) and hands each request's rows to its own guard state. Steering edits
are added to the first output only, so the sum moves by the steering delta and nothing else.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from guardrails.core.policy import Policy
from guardrails.engine.hooks import decoder_layers
from guardrails.vllm.state import (
    EXTRA_ARGS_KEY,
    CompiledGuard,
    GuardSetupError,
    GuardState,
    active_state,
    compile_guard,
    set_active_state,
)

logger = logging.getLogger(__name__)

SUPPORTED_RUNNERS = ("CPUModelRunner", "GPUModelRunner")
"""vLLM V1 model runners whose batch layout this extension reads (Model Runner V2 differs)."""


def check_runner(model_runner: Any) -> str:
    """The runner's class name, or a :class:`GuardSetupError` for a runner whose layout is not the V1 one."""
    cls = type(model_runner)
    name, module = cls.__name__, cls.__module__
    # Model Runner V2 lives in vllm.v1.worker.gpu.model_runner and has no persistent input_batch.req_ids
    if name not in SUPPORTED_RUNNERS or module.startswith("vllm.v1.worker.gpu."):
        raise GuardSetupError(
            f"vLLM model runner {module}.{name} is not supported by the guard; supported: "
            f"{', '.join(SUPPORTED_RUNNERS)} (V1). On GPUs set VLLM_USE_V2_MODEL_RUNNER=0"
        )
    for attr in ("input_batch", "query_start_loc", "input_ids", "requests"):
        if not hasattr(model_runner, attr):
            raise GuardSetupError(f"vLLM model runner {name} has no attribute {attr!r}; the guard cannot map rows")
    return name


def check_eager(vllm_config: Any) -> None:
    """Compiled graphs (torch.compile, CUDA graphs) skip Python hooks without a word: require eager mode."""
    if not getattr(vllm_config.model_config, "enforce_eager", False):
        raise GuardSetupError(
            "the vLLM guard needs eager mode: build the engine with enforce_eager=True (--enforce-eager); "
            "compiled graphs skip the Python hooks that score the residual stream"
        )


class GuardWorkerExtension:
    """Methods vLLM adds to its worker (see the module docstring)."""

    model_runner: Any
    vllm_config: Any

    def guardrails_setup(
        self,
        policies: list[tuple[str, str | None]],
        special_ids: list[int] | None = None,
        default_policy: str | None = None,
        record_trace: bool = True,
    ) -> dict[str, Any]:
        """Load ``policies`` (``(yaml text, base dir)`` pairs), install the hooks; returns what was set up."""
        self.guardrails_teardown()
        runner = check_runner(self.model_runner)
        check_eager(self.vllm_config)
        model = self.model_runner.get_model()
        layers = decoder_layers(model)
        device = next(model.parameters()).device
        guards: dict[str, CompiledGuard] = {}
        for yaml_text, base_dir in policies:
            policy = Policy.from_yaml(yaml_text, source="<guardrails_setup>", base_dir=base_dir)
            if policy.name in guards:
                raise GuardSetupError(f"two policies named {policy.name!r}; policy names must be unique")
            guards[policy.name] = compile_guard(policy, model)
        if special_ids is None:
            special_ids = _special_ids(self.vllm_config)
        state = GuardState(guards, special_ids, default_policy=default_policy, record_trace=record_trace)
        handles = [layers[state.layers[0]].register_forward_pre_hook(self._guardrails_pre_hook())]
        for layer in state.layers:
            handles.append(layers[layer].register_forward_hook(_layer_hook(state, layer)))
        self._guardrails_handles = handles
        set_active_state(state)
        logger.info("guardrails: policies %s at layers %s (%s)", list(guards), state.layers, runner)
        return {"runner": runner, "layers": state.layers, "policies": list(guards), "device": str(device)}

    def guardrails_teardown(self) -> None:
        """Remove the hooks and forget all guard state (the model behaves as never hooked)."""
        for h in getattr(self, "_guardrails_handles", []):
            h.remove()
        self._guardrails_handles = []
        set_active_state(None)

    def guardrails_results(self, keys: list[str]) -> dict[str, dict[str, Any] | None]:
        """Per request key, its guard result (decisions, scores, verdict), removed from the worker."""
        state = active_state()
        if state is None:
            raise GuardSetupError("guardrails_results: the guard is not set up in this worker")
        return state.pop_results(keys)

    def guardrails_stats(self) -> dict[str, Any]:
        """Counters for self-checks: hook calls and steps seen since setup."""
        state = active_state()
        if state is None:
            return {"hook_calls": 0, "steps": 0, "active": False}
        return {"hook_calls": state.hook_calls, "steps": state.steps, "active": True}

    def _guardrails_pre_hook(self) -> Any:
        runner = self.model_runner
        info = _info_of(runner)

        def pre_hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            state = active_state()
            if state is None:
                return
            batch = runner.input_batch
            n = int(batch.num_reqs)
            req_ids = list(batch.req_ids[:n])
            qsl = runner.query_start_loc.np[: n + 1]
            counts = (qsl[1:] - qsl[:-1]).tolist() if n else []
            total = int(qsl[n]) if n else 0
            positions = args[0]
            token_ids = runner.input_ids.gpu[:total]
            state.begin_step(req_ids, counts, positions[:total], token_ids, info)

        return pre_hook


def _info_of(runner: Any) -> Any:
    def info(rid: str) -> tuple[dict[str, Any] | None, int]:
        req = runner.requests[rid]
        params = req.sampling_params
        extra = (params.extra_args or {}) if params is not None else {}
        return extra.get(EXTRA_ARGS_KEY), int(req.num_prompt_tokens)

    return info


def _layer_hook(state: GuardState, layer: int) -> Any:
    def hook(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if not state.segments:
            state.hook_calls += 1
            return None
        if isinstance(output, tuple) and len(output) == 2 and output[1] is not None:
            hidden, residual = output
            stream = hidden + residual
        else:
            hidden = output[0] if isinstance(output, tuple) else output
            residual = None
            stream = hidden
        with torch.inference_mode():
            edits = state.on_layer(layer, stream)
        if not edits:
            return None
        new_hidden = hidden.clone()
        for start, end, delta in edits:
            new_hidden[start:end] += delta.to(new_hidden.dtype)
        if residual is not None:
            return (new_hidden, residual)
        return (new_hidden, *output[1:]) if isinstance(output, tuple) else new_hidden

    return hook


def _special_ids(vllm_config: Any) -> list[int]:
    """Special token ids of the served tokenizer (never scored, as in GuardedModel)."""
    from transformers import AutoTokenizer

    mc = vllm_config.model_config
    tok = AutoTokenizer.from_pretrained(mc.tokenizer, trust_remote_code=mc.trust_remote_code)
    return sorted(set(getattr(tok, "all_special_ids", []) or []))
