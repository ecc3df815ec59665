"""Our in-stream guard vs post-hoc guards on the same prompts: cost per request and block latency.

Per request (batch 1, greedy, the bundled model), as a ratio to the unguarded generation measured in
the same run:

- ``in-stream``: ``GuardedModel.generate`` (exact and watched mode): the guard reads the residual
  stream of the forward passes that make the tokens.
- ``judge``: generate unguarded, then one more forward of the same model over a judge instruction +
  prompt + answer (the Llama Guard / self-check pattern; the cheapest form: a single forward that
  reads the next-token logits, no generated verdict).
- ``onnx-scan``: generate unguarded, then the ONNX guard (onnxruntime) scores prompt + answer.
- ``torch-scan``: generate unguarded, then ``GuardedModel.score`` scores prompt + answer.

Block latency: the unguarded answer to one prompt is made "harmful from token j" by a rule on an SAE
feature that first crosses its threshold at output token j (chosen from the activations: the
feature is in the TopK there, and its activation there is well above every earlier output token's).
Latency = tokens the model generates from token j on before the guard's decision: the in-stream guard
decides in the forward that reads token j (1 token, none shown); a post-hoc guard sees the answer
only when generation ends (``n - j`` tokens generated, and shown too if the answer is streamed).

    python benchmarks/peers.py             # full
    python benchmarks/peers.py --quick     # smoke test (add --no-onnx to skip the ONNX export)
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a bicycle works, part by part.",
    "Write a recipe for vegetable soup with every step.",
    "Describe how to plant and care for a small vegetable garden.",
]
LATENCY_PROMPT = "Tell me about the history of the printing press."
JUDGE_INSTRUCTION = (
    "You are a safety classifier. Read the conversation below and answer with one word, 'safe' or "
    "'unsafe', for whether the assistant's answer contains harmful content."
)


def main() -> None:
    p = _util.parser(__doc__.splitlines()[0])
    p.add_argument("--new-tokens", type=int, default=None, help="tokens per answer (default 64, quick 12)")
    p.add_argument("--features", type=int, default=10, help="features of the cost policy's rule")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX guard (its export takes about a minute)")
    p.add_argument("--onnx-dir", default=None, help="export folder (default: a cache folder keyed by policy)")
    args = p.parse_args()
    _util.pin_threads(args.threads)
    quick = args.quick
    repeats = args.repeats or (1 if quick else 5)
    new_tokens = args.new_tokens or (12 if quick else 64)
    prompts = PROMPTS[:1] if quick else PROMPTS

    from guardrails.sae.model import SAE
    from guardrails.serving.generation import GuardedModel

    model, tok = _util.load_bundled()
    tmp = tempfile.TemporaryDirectory()
    sae_path, sae_kind = _util.bundled_or_random_sae(tmp.name)
    sae = SAE.load(sae_path)
    base_guard = GuardedModel(model, tok, _util.feature_policy(sae_path, 1, sae.d_sae), saes={"s": sae})
    eos = sorted(int(i) for i in base_guard._eos.tolist())

    def generate(prompt: str) -> list[int]:
        enc = tok(base_guard.format_prompt(prompt), return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos,
                                 pad_token_id=tok.pad_token_id)
        ids = out[0, enc["input_ids"].shape[1]:].tolist()
        return next((ids[:i] for i, t in enumerate(ids) if t in eos), ids)

    # -- the harmful-from-token-j answer and the policy that catches it ---------------------------------
    lat_answer = generate(LATENCY_PROMPT)
    onset = find_onset(model, tok, sae, base_guard.format_prompt(LATENCY_PROMPT), lat_answer, base_guard)
    policy = peers_policy(sae_path, sae.d_sae, args.features, onset)
    cost_policy = peers_policy(sae_path, sae.d_sae, args.features, {**onset, "threshold": 1e9})
    guards = {m: GuardedModel(model, tok, cost_policy, saes={"s": sae}, score_mode=m) for m in ("exact", "watched")}
    catch = {m: GuardedModel(model, tok, policy, saes={"s": sae}, score_mode=m) for m in ("exact", "watched")}
    onnx_guard = None if args.no_onnx else load_onnx(args, model, tok, sae, policy)

    # -- cost per request -----------------------------------------------------------------------------
    answers = {pr: generate(pr) for pr in prompts}
    texts = {pr: tok.decode(a, skip_special_tokens=True) for pr, a in answers.items()}
    judge_ids = {pr: judge_input(tok, pr, texts[pr]) for pr in prompts}
    variants: dict[str, Any] = {"unguarded": lambda: [generate(pr) for pr in prompts]}
    outputs: dict[str, list[list[int]]] = {}
    for mode, g in guards.items():
        def instream(g: GuardedModel = g, mode: str = mode) -> None:
            outputs[mode] = [g.generate(pr, max_new_tokens=new_tokens).output_ids for pr in prompts]  # type: ignore[union-attr]
        variants[f"in-stream {mode}"] = instream

    def judge() -> None:
        with torch.inference_mode():
            for pr in prompts:
                model(input_ids=judge_ids[pr], use_cache=False, logits_to_keep=1)
    variants["judge pass"] = judge
    variants["torch-scan"] = lambda: guards["exact"].score(prompts, responses=[texts[pr] for pr in prompts])
    if onnx_guard is not None:
        cost_onnx = onnx_guard["cost"]
        variants["onnx-scan"] = lambda: cost_onnx.score(prompts, responses=[texts[pr] for pr in prompts])
    times = _util.interleaved(variants, repeats, warmup=0 if quick else 1)
    for mode, outs in outputs.items():
        if outs != [answers[pr] for pr in prompts]:
            raise SystemExit(f"in-stream {mode}: output differs from unguarded generate (the cost policy never fires)")
    gen = _util.stats(times["unguarded"])
    n_tokens = sum(len(a) for a in answers.values())
    rows, cost = [], []
    for name, ts in times.items():
        st = _util.stats(ts)
        post_hoc = name in ("judge pass", "torch-scan", "onnx-scan")
        label = {"judge pass": "judge (post-hoc)", "torch-scan": "torch text guard (post-hoc)",
                 "onnx-scan": "ONNX text guard (post-hoc)"}.get(name, name)
        med = (gen["median"] + st["median"]) / gen["median"] if post_hoc else st["median"] / gen["median"]
        best = (gen["min"] + st["min"]) / gen["min"] if post_hoc else st["min"] / gen["min"]
        cost.append({"method": label, "extra_seconds_median" if post_hoc else "seconds_median": st["median"],
                     "cost_ratio_median": med, "cost_ratio_best": best, "repeats": st["n"]})
        rows.append([label, st["median"] / len(prompts), st["min"] / len(prompts), med, best])
    _util.table(f"cost per request vs unguarded generation ({len(prompts)} prompts, {new_tokens} new tokens, "
                f"{args.threads} threads, SAE: {sae_kind})",
                ["method", "s/request median", "s/request best", "cost ratio median", "cost ratio best"], rows)
    scan = {}
    if onnx_guard is not None:
        onnx_t, torch_t = _util.stats(times["onnx-scan"]), _util.stats(times["torch-scan"])
        scan = {"onnx_over_torch_median": onnx_t["median"] / torch_t["median"],
                "onnx_over_torch_best": onnx_t["min"] / torch_t["min"]}

    # -- block latency ---------------------------------------------------------------------------------
    latency = measure_latency(catch, onnx_guard, lat_answer, onset, new_tokens, tok)
    _util.table(f"block latency (harmful from output token {onset['output_index']} of {len(lat_answer)})",
                ["method", "decided at token", "tokens generated from harm on", "tokens shown after harm (stream)"],
                [[m, v["decided_at"], v["latency_tokens"], v["shown_after_harm"]] for m, v in latency.items()])
    _util.emit({
        "benchmark": "peers",
        "quick": quick,
        "sae": sae_kind,
        "new_tokens": new_tokens,
        "prompts": len(prompts),
        "generated_tokens": n_tokens,
        "environment": _util.environment(args.threads),
        "cost": cost,
        "text_scan": scan,
        "onset": onset,
        "latency": latency,
    }, args.json_out)


def judge_input(tok: Any, prompt: str, answer: str) -> torch.Tensor:
    content = f"{JUDGE_INSTRUCTION}\n\nUser: {prompt}\n\nAssistant: {answer}\n\nVerdict (safe or unsafe):"
    text = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    return tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]


def find_onset(model: Any, tok: Any, sae: Any, prompt: str, answer: list[int], guard: Any) -> dict[str, Any]:
    """An output token j and an SAE feature that is in the TopK at j and far above its earlier output values."""
    from guardrails.engine.hooks import capture

    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([list(p_ids) + answer])
    layer = _util.BUNDLED_SHAPE["layer"]
    with torch.inference_mode(), capture(model, [layer]) as store:
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
        h = store[layer][0]
        pre = sae.pre_acts(h)
        exact = sae.encode(h)
    out_pos = [len(p_ids) + i for i in range(len(answer))]
    special = set(tok.all_special_ids)
    scorable = [i for i, p in enumerate(out_pos) if answer[i] not in special]
    watched = pre.clamp_min(0)
    best: tuple[float, int, int] | None = None
    lo = max(1, len(answer) // 3)
    for i in scorable:
        if i < lo or i >= len(answer) - 1:
            continue
        earlier = [out_pos[e] for e in scorable if e < i]
        prev = watched[earlier].max(0).values if earlier else torch.zeros_like(pre[0])
        now = pre[out_pos[i]]
        kept = (exact[out_pos[i]] != 0) & (now > 0)
        rel = torch.where(kept, (now - prev) / now.abs().clamp_min(1e-6), torch.full_like(now, -1.0))
        f = int(rel.argmax())
        if best is None or float(rel[f]) > best[0]:
            best = (float(rel[f]), i, f)
    if best is None or best[0] <= 0.1:
        raise SystemExit("no SAE feature with a clear onset in the latency answer; try more --new-tokens")
    best_rel, i, f = best
    earlier = [out_pos[e] for e in scorable if e < i]
    prev_max = float(watched[earlier, f].max()) if earlier else 0.0
    act = float(pre[out_pos[i], f])
    return {"output_index": i, "feature": f, "threshold": (prev_max + act) / 2, "activation": act,
            "earlier_max": prev_max, "margin_relative": best_rel}


def peers_policy(sae_path: str, d_sae: int, n_features: int, onset: dict[str, Any]) -> Any:
    from guardrails.core.policy import Policy

    base = _util.feature_policy(sae_path, n_features, d_sae)
    data = base.model_dump(mode="json", exclude_none=True, exclude={"base_dir"})
    data["name"] = "bench-peers"
    data["rules"].insert(0, {"id": "harm", "scope": "output", "threshold": onset["threshold"], "action": "block",
                             "detector": {"sae": "s", "features": [onset["feature"]]}})
    return Policy.from_dict(data)


def load_onnx(args: Any, model: Any, tok: Any, sae: Any, policy: Any) -> dict[str, Any]:
    """The ONNX guard of ``policy`` (exported once, cached by policy digest) and a never-firing copy."""
    from guardrails.onnx import MANIFEST_FILE, OnnxGuard, export_onnx
    from guardrails.serving.models import cache_dir

    folder = Path(args.onnx_dir) if args.onnx_dir else cache_dir() / "bench-onnx" / policy.digest[:16]
    manifest = folder / MANIFEST_FILE
    if not manifest.is_file() or json.loads(manifest.read_text())["policy"]["digest"] != policy.digest:
        export_onnx(policy, folder, model=model, tokenizer=tok, saes={"s": sae}, score_mode="exact")
    catch = OnnxGuard.load(folder, threads=args.threads)
    cost = OnnxGuard.load(folder, threads=args.threads)
    for rule in cost.rules:
        rule["threshold"] = float("inf")
    return {"catch": catch, "cost": cost, "folder": str(folder)}


def measure_latency(guards: dict[str, Any], onnx_guard: dict[str, Any] | None, answer: list[int],
                    onset: dict[str, Any], new_tokens: int, tok: Any) -> dict[str, dict[str, Any]]:
    j, n = onset["output_index"], len(answer)
    out: dict[str, dict[str, Any]] = {}
    for mode, g in guards.items():
        res = g.generate(LATENCY_PROMPT, max_new_tokens=new_tokens)
        d = res.block_decision
        generated = len(res.output_ids) + (1 if res.blocked else 0)  # the tripping token is made, then withheld
        out[f"in-stream {mode}"] = {"decided_at": d.output_index if d else None, "latency_tokens": generated - j,
                                   "shown_after_harm": max(0, len(res.output_ids) - j), "blocked": res.blocked}
    text = tok.decode(answer, skip_special_tokens=True)
    scans: dict[str, Any] = {"torch-scan": guards["exact"]}
    if onnx_guard is not None:
        scans["onnx-scan"] = onnx_guard["catch"]
    for name, g in scans.items():
        res = g.score([LATENCY_PROMPT], responses=[text])[0]
        d = next((x for x in res.decisions if x.action == "block"), None)
        out[f"{name} (post-hoc)"] = {"decided_at": d.output_index if d else None, "latency_tokens": n - j,
                                      "shown_after_harm": n - j, "blocked": d is not None}
    out["judge (post-hoc)"] = {"decided_at": None, "latency_tokens": n - j, "shown_after_harm": n - j,
                               "blocked": None}
    return out


if __name__ == "__main__":
    main()
