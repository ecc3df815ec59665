"""Shared helpers of the benchmarks: arguments, pinned threads, interleaved timing, tables, the JSON line.

Every benchmark prints a table and, as its last line, one JSON object (``emit``). Timings come from
``interleaved``: a warm-up call of every variant, then ``repeats`` rounds in which every variant runs
once, in an order rotated each round, so a burst of load on a shared machine hits all variants alike.
Report medians and minimums; the minimum is the least disturbed run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

BUNDLED_SHAPE = {"d_model": 576, "d_sae": 9216, "k": 50, "layer": 15}
"""The bundled SAE: TopK k=50, 9,216 latents (16x), on layer 15 of SmolLM2-135M-Instruct."""


GENERATION_PROMPTS = [
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in detail how a bicycle works, part by part.",
    "Describe a walk through a busy market in a city you like.",
    "Write a detailed recipe for vegetable soup with every step.",
    "Tell me the history of the printing press in several paragraphs.",
    "Write a letter to a friend describing your last holiday.",
    "Explain how rain forms, from evaporation to the storm.",
    "Describe how to plant and care for a small vegetable garden.",
]
"""Benign prompts that ask for long answers (throughput benchmarks: no rule should fire on them)."""


def until_eos(ids: list[int], eos: Iterable[int]) -> list[int]:
    """``ids`` cut before the first end-of-sequence id."""
    stop = set(eos)
    for i, t in enumerate(ids):
        if t in stop:
            return ids[:i]
    return ids


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke test (numbers mean nothing)")
    p.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 8), help="torch threads (pinned)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per variant (default: 5, quick: 1)")
    p.add_argument("--json-out", default=None, help="also write the JSON object to this file")
    return p


def load_policy(value: str, flag: str = "--policy") -> Any:
    """The policy a benchmark flag names (a file, or a shipped policy by name), loaded; a misspelt or invalid one
    exits with ``<script>: <flag>: <why>`` naming the shipped policies, not a traceback."""
    from guardrails.core.errors import GuardrailsError
    from guardrails.core.policy import Policy

    try:
        return Policy.from_path(value)
    except GuardrailsError as exc:
        raise SystemExit(f"{os.path.basename(sys.argv[0])}: {flag}: {exc}") from None


def pin_threads(n: int) -> None:
    """Fix torch's thread count so runs are comparable (the interop pool can only be set once)."""
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    os.environ["OMP_NUM_THREADS"] = str(n)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def environment(threads: int) -> dict[str, Any]:
    """What the numbers were measured on (load average included: the machine may be shared)."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),)
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "machine": platform.machine(),
        "loadavg_1m": round(load[0], 2),
    }


def interleaved(variants: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each variant: ``warmup`` untimed calls each, then rotated timed rounds."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            gc.collect()
            t0 = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def stats(values: Iterable[float]) -> dict[str, float]:
    v = list(values)
    return {"median": statistics.median(v), "min": min(v), "n": len(v)}


def rss_bytes() -> int:
    """Resident set size of this process now."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Largest resident set size of this process so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and shared weights counted once)."""
    seen: set[int] = set()
    total = 0
    for t in tensors:
        st = t.untyped_storage()
        if st.data_ptr() in seen:
            continue
        seen.add(st.data_ptr())
        total += st.nbytes()
    return total


def guard_tensors(guard: Any) -> list[torch.Tensor]:
    """Every tensor a GuardedModel holds besides the model: SAEs, watched rows, probes, heads."""
    out: list[torch.Tensor] = []
    for sae in getattr(guard, "saes", {}).values():
        out += [p.data for p in sae.parameters()] + list(sae.buffers())
    for scorer in guard.scorers.values():
        enc = getattr(scorer, "encoder", None)
        if enc is not None:
            out += [b for b in enc.buffers() if b is not None]
        if scorer.sae is not None:
            out += [p.data for p in scorer.sae.parameters()]
        for name in ("linear_W", "linear_b"):
            t = getattr(scorer, name, None)
            if t is not None:
                out.append(t)
    return out


def load_bundled(dtype: str = "float32") -> tuple[Any, Any]:
    from guardrails.serving.models import load_model

    model, tok = load_model(dtype=dtype)
    return model, tok


def bundled_or_random_sae(folder: str) -> tuple[str, str]:
    """Path of the bundled SAE, or of a random SAE of the same shape saved in ``folder``; and which it is."""
    from guardrails.sae.model import SAE, SAEConfig, SAEError

    try:
        SAE.load("bundled")
        return "bundled", "bundled"
    except SAEError:
        pass
    s = BUNDLED_SHAPE
    g = torch.Generator().manual_seed(0)
    d, n = s["d_model"], s["d_sae"]
    sae = SAE(SAEConfig(d_model=d, d_sae=n, k=s["k"], layer=s["layer"]), torch.randn(n, d, generator=g) / d**0.5,
              torch.randn(n, generator=g) * 0.1, torch.randn(n, d, generator=g) / d**0.5, torch.zeros(d))
    sae.save(folder)
    return folder, "random (bundled SAE not available yet)"


def feature_policy(sae_path: str, n_features: int, d_sae: int, *, threshold: float = 1e9, mode: str = "exact",
                   scope: str = "both", name: str | None = None) -> Any:
    """A policy with one rule summing ``n_features`` fixed features (a permutation with seed 0)."""
    from guardrails.core.policy import Policy

    g = torch.Generator().manual_seed(0)
    feats = torch.randperm(d_sae, generator=g)[:n_features].tolist()
    return Policy.from_dict({
        "name": name or f"bench-{n_features}f",
        "score_mode": mode,
        "saes": {"s": {"path": sae_path, "layer": BUNDLED_SHAPE["layer"]}},
        "rules": [{"id": "watch", "scope": scope, "threshold": threshold, "action": "block",
                   "detector": {"sae": "s", "features": feats}}],
    })


def table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    """Print a table (rich when installed, else plain text) to stdout."""
    cells = [[_fmt(c) for c in row] for row in rows]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover
        print(title)
        widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(columns)]
        print("  ".join(h.ljust(w) for h, w in zip(columns, widths, strict=True)))
        for r in cells:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
        return
    t = Table(*columns, title=title)
    for r in cells:
        t.add_row(*r)
    Console(width=max(100, sum(len(c) for c in columns) * 2)).print(t)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != v:
            return "-"
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


def emit(result: dict[str, Any], json_out: str | None = None) -> None:
    """Print ``result`` as the last line of output (one JSON object) and optionally write it to a file."""
    line = json.dumps(_clean(result), sort_keys=False, default=_json_default)
    if json_out:
        with open(json_out, "w", encoding="utf-8") as fh:
            fh.write(line + "\n")
    sys.stdout.flush()
    print(line, flush=True)


def _clean(o: Any) -> Any:
    """NaN and infinities become null (strict JSON)."""
    if isinstance(o, float):
        return o if o == o and abs(o) != float("inf") else None
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    return str(o)
