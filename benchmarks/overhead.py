"""Guarded vs unguarded generation on the bundled model: tokens/s and their ratio, measured in one run.

Variants, for batch 1 and 8: plain ``model.generate`` (greedy) and ``GuardedModel.generate`` in
``exact`` and ``watched`` mode with policies of 1, 10 and 100 features whose threshold never fires,
so the guarded output must equal the unguarded one (checked: the benchmark fails otherwise).
``--shipped NAME ...`` adds shipped policies with every threshold raised out of reach (the same detectors,
layers and SAE encodes, nothing fires): what the default guard costs. Also: the bytes of SAE weights each
mode keeps, the RSS growth of building a guard, the peak RSS,
and with ``--profile`` where the time of one guarded generation goes (cProfile, top functions).

    python benchmarks/overhead.py            # full: batch 1 and 8, 64 new tokens, 5 rounds
    python benchmarks/overhead.py --quick    # smoke test
    python benchmarks/overhead.py --batches 1 --features 10 --shipped harmful-requests harmful-compliance
"""

from __future__ import annotations

import cProfile
import gc
import io
import pstats
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util

PROMPTS = _util.GENERATION_PROMPTS


def main() -> None:
    p = _util.parser(__doc__.splitlines()[0])
    p.add_argument("--new-tokens", type=int, default=None, help="tokens to generate (default 64, quick 4)")
    p.add_argument("--batches", type=int, nargs="+", default=None, help="batch sizes (default 1 8, quick 1)")
    p.add_argument("--features", type=int, nargs="+", default=None, help="policy sizes (default 1 10 100, quick 10)")
    p.add_argument("--shipped", nargs="*", default=[], help="shipped policies to time too (thresholds out of reach)")
    p.add_argument("--profile", action="store_true", help="cProfile one guarded generation (batch 1, exact)")
    args = p.parse_args()
    _util.pin_threads(args.threads)
    quick = args.quick
    repeats = args.repeats or (1 if quick else 5)
    new_tokens = args.new_tokens or (4 if quick else 64)
    batches = args.batches or ([1] if quick else [1, 8])
    n_features = args.features or ([10] if quick else [1, 10, 100])
    modes = ["exact", "watched"]

    from guardrails.serving.generation import GuardedModel

    model, tok = _util.load_bundled()
    tmp = tempfile.TemporaryDirectory()
    sae_path, sae_kind = _util.bundled_or_random_sae(tmp.name)
    from guardrails.sae.model import SAE

    sae = SAE.load(sae_path)
    guards = {
        (mode, n): GuardedModel(model, tok, _util.feature_policy(sae_path, n, sae.d_sae, mode=mode), saes={"s": sae},
                                score_mode=mode)
        for mode in modes for n in n_features
    }
    for name in args.shipped:
        guards[(f"shipped:{name}", 0)] = GuardedModel(model, tok, never_fires(name))
    any_guard = next(iter(guards.values()))
    eos = sorted(int(i) for i in any_guard._eos.tolist())
    rows: list[list[Any]] = []
    results: list[dict[str, Any]] = []
    for batch in batches:
        prompts = (PROMPTS * ((batch + len(PROMPTS) - 1) // len(PROMPTS)))[:batch]
        formatted = [any_guard.format_prompt(x) for x in prompts]
        tok.padding_side = "left"
        enc = tok(formatted, return_tensors="pt", padding=True, add_special_tokens=False)
        outputs: dict[str, Any] = {}

        def unguarded(enc: Any = enc, outputs: dict[str, Any] = outputs) -> None:
            with torch.inference_mode():
                out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos,
                                     pad_token_id=tok.pad_token_id)
            outputs["unguarded"] = out[:, enc["input_ids"].shape[1]:]

        variants: dict[str, Callable[[], Any]] = {"unguarded": unguarded}
        for (mode, n), guard in guards.items():
            def guarded(guard: GuardedModel = guard, key: str = f"{mode}/{n}", prompts: list[str] = prompts,
                        outputs: dict[str, Any] = outputs) -> None:
                res = guard.generate(prompts, max_new_tokens=new_tokens)  # type: ignore[arg-type]
                outputs[key] = [r.output_ids for r in res]  # type: ignore[union-attr]
            variants[f"{mode}/{n}"] = guarded
        times = _util.interleaved(variants, repeats, warmup=0 if quick else 1)
        ref = outputs["unguarded"]
        ref_ids = [_util.until_eos(row.tolist(), eos) for row in ref]
        n_tokens = sum(min(len(r) + 1, new_tokens) for r in ref_ids)  # eos counts as generated
        for key, ids in outputs.items():
            if key != "unguarded" and ids != ref_ids:
                raise SystemExit(f"batch {batch}, {key}: guarded output differs from unguarded generate "
                                 f"(thresholds never fire, so they must be equal)")
        base = _util.stats(times["unguarded"])
        for key, ts in times.items():
            st = _util.stats(ts)
            mode, n = key.split("/") if key != "unguarded" else ("none", "0")
            ratio = base["median"] / st["median"]
            ratio_min = base["min"] / st["min"]
            results.append({"batch": batch, "mode": mode, "features": int(n), "tokens": n_tokens,
                            "seconds_median": st["median"], "seconds_min": st["min"],
                            "tokens_per_s_median": n_tokens / st["median"], "tokens_per_s_max": n_tokens / st["min"],
                            "ratio_median": ratio, "ratio_best": ratio_min, "repeats": st["n"]})
            rows.append([batch, mode, n, n_tokens, n_tokens / st["median"], n_tokens / st["min"], ratio, ratio_min])
    _util.table(f"guarded / unguarded generation ({new_tokens} new tokens, {args.threads} threads, SAE: {sae_kind})",
                ["batch", "mode", "features", "tokens", "tok/s median", "tok/s best", "ratio median", "ratio best"],
                rows)
    memory = _memory(model, tok, sae_path, sae.d_sae, modes, max(n_features), guards)
    _util.table("SAE weights kept by the guard", ["mode", "features", "guard tensor MB", "RSS growth MB"],
                [[m["mode"], m["features"], m["guard_tensor_bytes"] / 1e6, m["rss_growth_bytes"] / 1e6]
                 for m in memory])
    out: dict[str, Any] = {
        "benchmark": "overhead",
        "quick": quick,
        "sae": sae_kind,
        "new_tokens": new_tokens,
        "environment": _util.environment(args.threads),
        "results": results,
        "memory": memory,
        "peak_rss_bytes": _util.peak_rss_bytes(),
        "targets": {"exact_batch1": 0.97, "watched_batch1": 0.99},
    }
    if args.profile:
        out["profile"] = profile(guards[("exact", n_features[-1])], PROMPTS[0], new_tokens)
    _util.emit(out, args.json_out)




def never_fires(name: str) -> Any:
    """A shipped policy with every threshold (and escalate/block band) out of reach: it scores as shipped and
    decides nothing, so its output must equal unguarded generation. Not ``offline.scoring.unthresholded``: that
    turns steer rules into flag rules, and a policy that may steer keeps its hooks on every decode step."""
    from guardrails.core.policy import Policy

    pol = Policy.from_path(name)
    rules = []
    for r in pol.rules:
        upd: dict[str, Any] = {"threshold": 1e9}
        if r.escalate_above is not None:
            upd["escalate_above"] = 2e9
        if r.steer is not None and r.steer.block_above is not None:
            upd["steer"] = r.steer.model_copy(update={"block_above": 2e9})
        rules.append(r.model_copy(update=upd))
    if pol.steering:
        raise SystemExit(f"--shipped {name}: the policy steers always (steering:), so its output differs by design")
    return pol.model_copy(update={"rules": rules})


def _memory(model: Any, tok: Any, sae_path: str, d_sae: int, modes: list[str], n: int,
            built: dict[tuple[str, int], Any]) -> list[dict[str, Any]]:
    """Tensor bytes each mode keeps, and RSS growth of building a guard that loads its SAE from disk."""
    from guardrails.serving.generation import GuardedModel

    out = []
    for mode in modes:
        gc.collect()
        before = _util.rss_bytes()
        guard = GuardedModel(model, tok, _util.feature_policy(sae_path, n, d_sae, mode=mode), score_mode=mode)
        gc.collect()
        grown = _util.rss_bytes() - before
        kept = _util.tensor_bytes(_util.guard_tensors(guard))
        rows = _util.tensor_bytes([b for s in guard.scorers.values() if s.encoder is not None
                                   for b in s.encoder.buffers() if b is not None])
        out.append({"mode": mode, "features": n, "guard_tensor_bytes": kept, "watched_rows_bytes": rows,
                    "rss_growth_bytes": grown})
        del guard
    del built
    return out


def profile(guard: Any, prompt: str, new_tokens: int, top: int = 25) -> dict[str, Any]:
    """cProfile one guarded generation; print the top functions; return seconds by function."""
    guard.generate(prompt, max_new_tokens=2)  # warm
    prof = cProfile.Profile()
    prof.enable()
    guard.generate(prompt, max_new_tokens=new_tokens)
    prof.disable()
    buf = io.StringIO()
    st = pstats.Stats(prof, stream=buf).sort_stats("tottime")
    st.print_stats(top)
    print(buf.getvalue())
    total = sum(v[2] for v in st.stats.values())  # type: ignore[attr-defined]
    by_func: dict[str, float] = {}
    for (file, line, name), (_cc, _nc, _tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        if "guardrails" in file:
            by_func[f"{Path(file).name}:{line}:{name} (cumulative)"] = round(ct, 4)
    ranked = dict(sorted(by_func.items(), key=lambda kv: -kv[1])[:top])
    return {"total_seconds": round(total, 4), "guardrails_functions": ranked}


if __name__ == "__main__":
    main()
