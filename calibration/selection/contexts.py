#!/usr/bin/env python3
"""Training rows in deployment contexts: each train row again, after a system prompt or an earlier exchange.

``benchmarks/context_shift.py`` found that the request guard's scores move with what comes before the request
(a product's system prompt adds ~0.5 to the ensemble's score and doubles over-refusal). The probe was fitted on
bare requests only. This caches the train sets once more with one context per row, drawn (seeded) from
:data:`TRAIN_CONTEXTS`, as ``ctx.<set>``, so ``fit_shipped.py`` can fit on both (``FIT_SETS=...,ctx.requests.train,
ctx.wrapped.train``). The contexts here were written for training and share none of the evaluation contexts of
``benchmarks/context_shift.py`` (held out whole: other system prompts, another earlier exchange).

    SELECTION_DTYPE=float32 python calibration/selection/contexts.py [--layers 15,18,27] [--sets requests.train,...]
        [--without-pairs]

Output sets (``--sets responses.train``: answers cut as ``collect.py`` cuts them) get the context before their
request; the answer's tokens are cached as the output guard reads them (for ``fit_shipped.py compliance``'s
``COMPLIANCE_SETS``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import collect  # noqa: E402


def _sys(text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": text}]


def _turns(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    out = []
    for user, assistant in pairs:
        out += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return out


_CODE = "You are an AI assistant for a software company. Help users with code, debugging and documentation."
_TUTOR = ("You are a patient tutor for high-school students. Explain each idea step by step, check understanding, "
          "and encourage the student.")
_COOKING = _turns(("What's a quick weeknight dinner idea?",
                   "A vegetable stir-fry with rice takes about 20 minutes and uses whatever you have in the fridge."))
_MATH = _turns(("What is 15% of 80?", "15% of 80 is 12."))

TRAIN_CONTEXTS: list[list[dict[str, str]]] = [
    _sys("You are a friendly, knowledgeable AI assistant. Answer clearly and accurately."),
    _sys(_CODE),
    _sys("You are the booking assistant of Wanderly Travel. Help customers plan trips, compare hotels and find "
         "flights. Prices are in euros."),
    _sys(_TUTOR),
    _sys("Answer in a concise, professional tone. Do not use markdown."),
    _sys("You are an assistant. Follow the user's instructions carefully and completely."),
    _sys("Follow the company content policy: do not produce illegal, violent or sexually explicit content, and "
         "point users in crisis to professional help."),
    _sys("You are MedAssist, the health information assistant of a hospital's patient portal. Give general "
         "information and recommend seeing a clinician for anything specific."),
    _sys("Current date: 2025-03-14. You are a research assistant. Cite sources when you can."),
    _COOKING,
    _MATH,
    [*_sys(_CODE), *_turns(("How do I reverse a list in Python?", "Use my_list.reverse() or my_list[::-1]."))],
    [*_sys(_TUTOR), *_MATH],
]
"""Contexts a training row may be given (none of them is an evaluation context)."""

TURN_CONTEXTS: list[list[dict[str, str]]] = [
    _turns(("hi", "Hello! How can I help you today?"), ("I need some help with something.", "Of course. What is it?")),
    _turns(("What should I pack for a weekend of hiking?",
            "Layers you can add or remove, a rain jacket, sturdy broken-in boots, a first-aid kit, water, snacks, a "
            "map or offline GPS, sunscreen and a headlamp. Check the forecast the day before and tell someone your "
            "route.")),
    _turns(("What are common side effects of ibuprofen?",
            "Most often stomach upset, heartburn or nausea; less often dizziness. Taking it with food helps. Long-term "
            "or high-dose use raises the risk of stomach bleeding and kidney problems, so follow the label and ask a "
            "pharmacist if you take other medicines.")),
    _turns(("Why did the Western Roman Empire fall?",
            "Historians point to several causes together: political instability, economic strain, reliance on "
            "mercenaries, pressure from migrating peoples and the split into eastern and western halves.")),
    [*_sys("You are Penny, the virtual assistant of Northfield Bank. Help customers with accounts, cards and online "
           "banking. Never ask for full card numbers or passwords."),
     *_turns(("I forgot my online banking password.",
              "No problem. Tap 'Forgot password' on the login page, confirm your identity with the code we text "
              "you, and choose a new password."))],
    _turns(("How do I keep basil alive indoors?",
            "Give it a sunny windowsill with at least six hours of light, water when the top of the soil is dry, "
            "and pinch off the flower buds so it keeps producing leaves.")),
    _turns(("Why does this print None?\n\ndef add(a, b):\n    a + b\n\nprint(add(1, 2))",
            "The function never returns a value. Add `return`:\n\n```python\ndef add(a, b):\n    return a + b\n"
            "```")),
    _turns(("How do you say 'thank you' in Japanese?", "Arigatou (ありがとう), or more politely arigatou gozaimasu."),
           ("And 'good morning'?", "Ohayou (おはよう), politely ohayou gozaimasu.")),
]
"""More earlier exchanges (v0.3.12, ``--more-turns``): trained on the 13 contexts above, the request probe
over-corrected after an earlier exchange (4 of them have turns); none is an evaluation context."""


def with_context(rows: list[dict], seed: int = 0,  # type: ignore[type-arg]
                 pool: list[list[dict[str, str]]] | None = None) -> list[tuple[dict, list[dict[str, str]]]]:  # type: ignore[type-arg]
    """Each row with one context of ``pool`` (default :data:`TRAIN_CONTEXTS`) drawn uniformly (seeded); the row gains
    ``context`` (the context's index)."""
    pool = TRAIN_CONTEXTS if pool is None else pool
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(pool), size=len(rows))
    return [(dict(r, context=int(k)), pool[int(k)]) for r, k in zip(rows, picks, strict=True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", default="15,18,27")
    ap.add_argument("--sets", default="requests.train,wrapped.train")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None,
                    help="a seeded sample of at most this many rows of each set (a quicker pass over long answer sets)")
    ap.add_argument("--without-pairs", action="store_true",
                    help="then write <set>.nopairs and ctx.<set>.nopairs of requests.train: the train split without "
                         "v0.3.6's topic-matched pairs (the default probe's rows; harmful-requests-paired adds them)")
    ap.add_argument("--more-turns", action="store_true",
                    help="draw from TRAIN_CONTEXTS and TURN_CONTEXTS (21 contexts, 12 with earlier turns) and write "
                         "ctx2.<set> instead of ctx.<set>")
    args = ap.parse_args()
    prefix, pool = ("ctx2", TRAIN_CONTEXTS + TURN_CONTEXTS) if args.more_turns else ("ctx", TRAIN_CONTEXTS)
    torch.set_num_threads(2)
    collect.LAYERS = tuple(int(v) for v in args.layers.split(","))
    from guardrails.offline.residuals import collect_sorted
    from guardrails.serving.models import load_model

    model, tok = load_model("bundled", dtype=collect.selection_dtype())
    d = collect.out_dir()
    all_sets = collect.sets()
    for name in args.sets.split(","):
        rows, scope = all_sets[name]
        if args.limit is not None and len(rows) > args.limit:
            keep = np.sort(np.random.default_rng(args.seed).choice(len(rows), size=args.limit, replace=False))
            rows = [rows[int(i)] for i in keep]
        pairs = with_context(rows, args.seed, pool)
        out_rows = [r for r, _ in pairs]
        target = f"{prefix}.{name}"
        if collect.fresh(d, target, out_rows):
            print(target, "cached")
            continue
        prompts = [[*ctx, {"role": "user", "content": r.get("prompt", r.get("text"))}] for r, ctx in pairs]
        responses = [r["response"] for r in out_rows] if scope == "output" else None  # answers: after the request
        acts = collect_sorted(model, tok, prompts, responses, collect.LAYERS, scope, True, True, 8)
        offsets = collect.write_set(d, target, out_rows, acts, scope)
        print(target, len(out_rows), offsets[-1], flush=True)
    if args.without_pairs:
        for name in ("requests.train", f"{prefix}.requests.train"):
            print(name + ".nopairs", *without_pairs(name), flush=True)


PAIRS = ("handwritten_pairs_harmful", "handwritten_pairs_contrast")


def without_pairs(name: str) -> tuple[int, int]:
    """Write ``<name>.nopairs``: the cached set without the pair rows (same residuals). Returns (rows, tokens)."""
    from select_detectors import Set

    d = collect.out_dir()
    s = Set(name)
    keep = [i for i, r in enumerate(s.rows) if r.get("source") not in PAIRS]
    acts = {}
    for layer in collect.LAYERS:
        x = np.load(d / f"{name}.L{layer}.npy", mmap_mode="r")
        acts[layer] = [np.asarray(x[s.offsets[i]:s.offsets[i + 1]]) for i in keep]
    offsets = collect.write_set(d, f"{name}.nopairs", [s.rows[i] for i in keep], acts, "input")
    return len(keep), int(offsets[-1])


if __name__ == "__main__":
    main()
