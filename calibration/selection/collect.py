#!/usr/bin/env python3
"""Collect layer-{9,12,15,18,21} residuals of every labeled set once, for detector selection.

Same formatting and scored positions as serving (``guardrails.offline.activations.collect_residuals``:
chat template, no attention sink, no special tokens). Model weights in bfloat16 for speed (activations
differ from float32 by ~0.6%; the shipped thresholds are fitted afterwards by ``guardrails calibrate``
in the serving dtype). Output: ``<cache>/selection/<set>.L<layer>.npy`` (float16, all scored tokens
stacked) + ``<set>.json`` (rows and per-row offsets). A set whose data file changed (other rows than its
cache holds) is collected again, the model run only on rows no cached set holds (``Reuse``).

    nice -n 5 python calibration/selection/collect.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "calibration" / "data"
LAYERS = (9, 12, 15, 18, 21)
MAX_RESPONSE_CHARS = 400  # responses.<split>: replies cut here; responses_full.<split>: whole replies
RESERVED_SAMPLE = 150  # rows per reserved tense file (evaluation only; never fitted on)


DTYPE = "bfloat16"  # --dtype=float32 writes <cache>/selection-float32/ instead


def selection_dtype() -> str:
    """The model dtype of the caches read and written: ``SELECTION_DTYPE``, else bfloat16."""
    import os

    return os.environ.get("SELECTION_DTYPE", DTYPE)


def out_dir() -> Path:
    from guardrails.serving.models import cache_dir

    dtype = selection_dtype()
    d = cache_dir() / ("selection" if dtype == "bfloat16" else f"selection-{dtype}")
    d.mkdir(parents=True, exist_ok=True)
    return d


def read(path: Path) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(x) for x in path.read_text(encoding="utf-8").split("\n") if x.strip()]


def sets() -> dict[str, tuple[list[dict], str]]:  # type: ignore[type-arg]
    out: dict[str, tuple[list[dict], str]] = {}  # type: ignore[type-arg]
    for s in ("train", "cal", "test"):
        out[f"requests.{s}"] = (read(DATA / f"harmful_requests.{s}.jsonl"), "input")
        out[f"wrapped.{s}"] = (read(DATA / f"jailbreak_wrapped.{s}.jsonl"), "input")
    out["over_refusal"] = (read(DATA / "over_refusal.jsonl"), "input")
    out["form_pairs"] = (read(DATA / "form_pairs.jsonl"), "input")
    for f in sorted((DATA / "eval").glob("*.jsonl")):  # eval_subsets.py: per-source capped test files
        out[f"eval.{f.stem}"] = (read(f), "input")
    for tense in ("past", "future"):
        p = DATA / "reserved_eval" / f"phrasing_{tense}_tense.jsonl"
        if p.is_file():  # the stratified subset load_labeled(limit=...) keeps, so caches line up
            from guardrails.offline.calibrate import load_labeled

            d = load_labeled(p, limit=RESERVED_SAMPLE)
            rows = [{"text": t, "label": int(lab), "source": so} for t, lab, so in zip(d.texts, d.labels, d.sources,
                                                                                       strict=True)]
            out[f"reserved_{tense}"] = (rows, "input")
    for name, limit in (("inthewild_jailbreaks", 150), ("donotanswer", 300)):
        p = DATA / "reserved_eval" / f"{name}.jsonl"
        if p.is_file():
            from guardrails.offline.calibrate import load_labeled

            d = load_labeled(p, limit=limit)
            rows = [{"text": t, "label": int(lab), "source": so} for t, lab, so in zip(d.texts, d.labels, d.sources,
                                                                                       strict=True)]
            out[f"reserved_{name}"] = (rows, "input")

    for s in ("train", "cal", "test"):
        rows = read(DATA / f"responses.{s}.jsonl")
        for r in rows:
            if len(r["response"]) > MAX_RESPONSE_CHARS:
                r["response"] = r["response"][:MAX_RESPONSE_CHARS].rsplit(" ", 1)[0]
        out[f"responses.{s}"] = (rows, "output")
        # whole answers (the data files cut them at 2000 characters), as the shipped rule is calibrated and served
        out[f"responses_full.{s}"] = (read(DATA / f"responses.{s}.jsonl"), "output")
        # the same rows' prompts alone, scored as the input rules score them (the request score of an answer)
        out[f"responses_prompts.{s}"] = ([{"text": r["prompt"], "label": int(r["label"]), "source": r["source"]}
                                          for r in rows], "input")
    if (DATA / "answers_blind_5.jsonl").is_file():  # v0.3.14: blind answer set 5, evaluation only, whole answers
        out["answers_blind_5"] = (read(DATA / "answers_blind_5.jsonl"), "output")
        out["answers_blind_5_prompts"] = ([{"text": r["prompt"], "label": int(r["label"]), "source": r["source"]}
                                           for r in out["answers_blind_5"][0]], "input")
    return out


def main() -> None:
    torch.set_num_threads(2)
    import os

    from guardrails.serving.models import load_model

    global LAYERS
    args = sys.argv[1:]
    dtype = selection_dtype()
    while args and args[0].startswith("--"):
        key, _, value = args.pop(0).partition("=")
        if key == "--layers":
            LAYERS = tuple(int(v) for v in value.split(","))
        elif key == "--dtype":
            dtype = os.environ["SELECTION_DTYPE"] = value
        else:
            sys.exit(f"collect.py: unknown option {key!r} (valid: --layers=L,L --dtype=bfloat16|float32)")
    only = set(args)
    lm = load_model("bundled", dtype=dtype)
    model, tok = lm
    d = out_dir()
    reuse = Reuse(d)
    for name, (rows, scope) in sets().items():
        if only and name not in only:
            continue
        if fresh(d, name, rows):
            continue
        prompts = [r.get("prompt", r.get("text")) for r in rows]
        responses = [r["response"] for r in rows] if scope == "output" else None
        keys = [(scope, p, responses[i] if responses else None) for i, p in enumerate(prompts)]
        cached = [reuse.get(k) for k in keys]
        todo = [i for i, c in enumerate(cached) if c is None]
        got = collect_multi(model, tok, [prompts[i] for i in todo],
                            [responses[i] for i in todo] if responses is not None else None, scope) if todo else {}
        acts = {layer: [torch.from_numpy(c[layer]) if c is not None else None for c in cached] for layer in LAYERS}
        for layer in LAYERS:
            for pos, i in enumerate(todo):
                acts[layer][i] = got[layer][pos]
        offsets = write_set(d, name, rows, acts, scope)
        print(name, len(rows), offsets[-1], f"({len(todo)} rows run, {len(rows) - len(todo)} reused)", flush=True)


def write_set(d: Path, name: str, rows: list[dict], acts: dict, scope: str) -> list[int]:  # type: ignore[type-arg]
    """Write one cached set: per layer of ``acts`` the rows' scored tokens stacked (float16; each row a tensor
    or an array), and ``<name>.json`` with the rows and their offsets; SAE codes of an older version go.
    Returns the offsets."""
    first = next(iter(acts.values()))
    offsets = np.cumsum([0] + [len(a) for a in first]).tolist()
    for stale in d.glob(f"{name}.sae-*.npz"):  # SAE codes of the residuals this replaces
        stale.unlink()
    for layer, parts in acts.items():  # a new file, not rewritten in place: Reuse may hold the old one mapped
        tmp = d / f"{name}.L{layer}.tmp.npy"
        np.save(tmp, np.concatenate([a.to(torch.float16).numpy() if isinstance(a, torch.Tensor)
                                     else np.asarray(a, np.float16) for a in parts]))
        tmp.replace(d / f"{name}.L{layer}.npy")
    (d / f"{name}.json").write_text(json.dumps({"rows": rows, "offsets": offsets, "scope": scope,
                                               "system_turn_scored": False}))
    return offsets


def cache_rows(name: str, rows: list[dict], layers: tuple[int, ...] = (12, 15, 18)) -> str:  # type: ignore[type-arg]
    """Cache the input residuals of ``rows`` (their ``text``) at ``layers`` as the set ``name``, with the bundled
    model in the selection dtype, unless that cache already holds exactly these rows. Returns ``name``."""
    global LAYERS
    d = out_dir()
    LAYERS = layers
    if not fresh(d, name, rows):
        from guardrails.serving.models import load_model

        model, tok = load_model("bundled", dtype=selection_dtype())
        got = collect_multi(model, tok, [r["text"] for r in rows], None, "input")
        write_set(d, name, rows, {layer: got[layer] for layer in layers}, "input")
    return name


def fresh(d: Path, name: str, rows: list[dict]) -> bool:  # type: ignore[type-arg]
    """The set's cache exists for every layer and holds exactly these rows (a rebuilt data file
    with other rows makes it stale: it is collected again, reusing the rows it shares)."""
    meta = d / f"{name}.json"
    if not meta.is_file() or not all((d / f"{name}.L{L}.npy").is_file() for L in LAYERS):
        return False
    return bool(json.loads(meta.read_text())["rows"] == rows)


class Reuse:
    """Residuals already cached in ``d`` for the same (scope, prompt, response), from any set, so a
    rebuilt data file only runs the model on its new rows. Residuals are per row and independent of the
    batch they were computed in (up to float noise from padding)."""

    def __init__(self, d: Path) -> None:
        self.index: dict[tuple[str, str, str | None], tuple[str, int, int]] = {}
        self.arrays: dict[tuple[str, int], np.ndarray] = {}
        for meta in sorted(d.glob("*.json")):
            name = meta.stem
            if not all((d / f"{name}.L{L}.npy").is_file() for L in LAYERS):
                continue
            m = json.loads(meta.read_text())
            off = m["offsets"]
            for layer in LAYERS:  # mapped now: the files may be replaced while this runs
                self.arrays[(name, layer)] = np.load(d / f"{name}.L{layer}.npy", mmap_mode="r")
            for i, r in enumerate(m["rows"]):
                response = r.get("response") if m["scope"] == "output" else None
                key = (m["scope"], r.get("prompt", r.get("text")), response)
                self.index.setdefault(key, (name, off[i], off[i + 1]))

    def get(self, key: tuple[str, str, str | None]) -> dict[int, np.ndarray] | None:
        hit = self.index.get(key)
        if hit is None:
            return None
        name, a, b = hit
        out = {}
        for layer in LAYERS:
            out[layer] = np.asarray(self.arrays[(name, layer)][a:b], dtype=np.float32)
        return out


def collect_multi(model: Any, tok: Any, prompts: list[str], responses: list[str] | None,
                  scope: Any) -> dict[int, list[torch.Tensor]]:
    """The rows' residuals at ``LAYERS`` in their order (run sorted by length: less padding)."""
    from guardrails.offline.residuals import collect_sorted

    return collect_sorted(model, tok, prompts, responses, LAYERS, scope, True, False, 8)


if __name__ == "__main__":
    main()
