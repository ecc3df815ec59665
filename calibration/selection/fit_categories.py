#!/usr/bin/env python3
"""A category head for ``harmful-requests``: which hazard category a blocked request belongs to.

The rule decides at one token (the first whose windowed score reaches the threshold; for a row that does not fire,
the end of its highest window). The head reads the rule's deciding layer: the mean of the residuals over every
token the rule scored up to that one, through a multinomial logistic regression over the hazard categories of
``build_data.CATEGORIES`` (``other`` left out: it names no hazard). The engine computes it as the mean of per-token
logits (``guardrails/engine/categories.py``), which is the same number (the map is linear). Measured and not
kept (``categories_v033.log``): the mean over the deciding 16-token window alone (no better: 0.57 on the form
pairs' rows against 0.55), balanced class weights (within a few points at every ``min_prob``).

Fitted on the harmful rows of ``harmful_requests.train`` (their ``category``; some sources' categories come from
``build_data``'s keyword rules, so labels are noisy). L2 chosen by leave-one-source-out over train + cal (whole
sources held out, accuracy pooled over the held-out rows). Reported on the cal and test splits and on the
hand-labelled form pairs (``form_pairs.jsonl``, 480 harmful rows written for evaluation only, categories assigned
by their writers), overall and for the rows where the head's probability reaches ``--min-prob``.

    SELECTION_DTYPE=float32 python calibration/selection/fit_categories.py [--write] [--min-prob 0.5]

``--write`` saves ``calibration/probes/harmful-requests-categories.safetensors`` ('weight' [n_categories, hidden],
'bias' [n_categories], metadata 'labels') and points ``policies/harmful-requests.yaml``'s rule at it.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import itertools
import json
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "calibration"))
from build_data import CATEGORIES  # noqa: E402
from heldout import Scorer  # noqa: E402
from select_detectors import Set  # noqa: E402

POLICY = ROOT / "policies" / "harmful-requests.yaml"
OUT = ROOT / "calibration" / "probes" / "harmful-requests-categories.safetensors"
OUTPUT_POLICY = ROOT / "policies" / "harmful-compliance.yaml"  # --scope output (v0.3.7)
OUTPUT_OUT = ROOT / "calibration" / "probes" / "harmful-compliance-categories.safetensors"
HELD_OUT_ANSWERS = ("blind_responses_3", "blind_responses_4", "pyrit_many_shot_llm_judged")  # test only, held out whole
LABELS = tuple(c for c in CATEGORIES if c != "other")


def firing_windows(tok: np.ndarray, offsets: np.ndarray, window: int, threshold: float) -> list[tuple[int, int]]:
    """Per row, the ``[start, end)`` token span of the window the rule decides on: the first whose mean reaches
    ``threshold`` (the engine fires there), else the highest; partial windows at the front average what they have."""
    spans = []
    for a, b in itertools.pairwise(offsets):
        if b <= a:
            spans.append((a, a))
            continue
        cs = np.concatenate([[0.0], np.cumsum(tok[a:b], dtype=np.float64)])
        ends = np.arange(1, b - a + 1)
        starts = np.maximum(ends - window, 0)
        means = (cs[ends] - cs[starts]) / (ends - starts)
        hit = np.nonzero(means >= threshold)[0]
        e = int(hit[0]) if len(hit) else int(np.argmax(means))
        spans.append((a + int(starts[e]), a + int(ends[e])))
    return spans


def features(scorer: Scorer, s: Set, layer: int, categories: list[str | None] | None = None,
             prompts: Set | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The harmful rows' mean residuals at ``layer`` over every token up to the deciding one (as the engine's head
    reads them; with ``prompts``, the cached prompts of the same rows, over their tokens instead: ``reads: prompt``),
    their categories (``categories``, else each row's own) and sources."""
    cats = categories if categories is not None else [r.get("category") for r in s.rows]
    spans = firing_windows(scorer.tokens(s), s.offsets, scorer.window, scorer.threshold)
    keep = [i for i, r in enumerate(s.rows) if int(r["label"]) == 1 and cats[i] in LABELS
            and spans[i][1] > spans[i][0]]
    if prompts is not None:  # reads: prompt (the request's tokens, as the input rules score them)
        px = prompts.x(layer)
        xs = [px[prompts.offsets[i]:prompts.offsets[i + 1]].mean(0) for i in keep]
    else:  # every token the rule scored up to the deciding one, as the engine's head reads them
        x = s.x(layer)
        xs = [x[s.offsets[i]:spans[i][1]].mean(0) for i in keep]
    return np.stack(xs).astype(np.float32), np.array([cats[i] for i in keep]), [s.sources[i] for i in keep]


def answer_categories(s: Set) -> list[str | None]:
    """The hazard category of each answer row's request (v0.3.7, ``--scope output``): the hand-written answer files'
    own column (blind sets, training answers, ``responses.tsv``), else the category of the same prompt in the request
    data (the bundled model's answers and the many-shot answers answer requests of those sources); pyrit's
    answers have none and are left out."""
    from build_data import norm

    by_prompt = request_categories()
    return [by_prompt.get(norm(r["prompt"])) for r in s.rows]


@functools.cache
def request_categories() -> dict[str, str]:
    """Normalised request text -> hazard category, as ``answer_categories`` reads it (read once per run)."""
    from build_data import BLIND_RESPONSE_SETS, HANDWRITTEN_DIR, norm, read_tsv

    by_prompt: dict[str, str] = {}
    for split in ("train", "cal", "test"):
        for line in (ROOT / "calibration" / "data" / f"harmful_requests.{split}.jsonl").read_text().splitlines():
            r = json.loads(line)
            if int(r["label"]) == 1 and r.get("category"):
                by_prompt.setdefault(norm(r["text"]), r["category"])
    blind = [HANDWRITTEN_DIR / f"responses_blind_{n}.tsv" for n in BLIND_RESPONSE_SETS]
    files = [HANDWRITTEN_DIR / "responses.tsv", *blind, *sorted(HANDWRITTEN_DIR.glob("train_answers_*.tsv"))]
    for path in files:  # the writers' own categories win
        for _kind, cat, prompt, _reply in read_tsv(path, 4):
            by_prompt[norm(prompt)] = cat
    return by_prompt


def fit(x: np.ndarray, y: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression on standardised inputs, folded back: ``logits = x @ W.T + b``, rows of ``W``
    in ``LABELS`` order (a category absent from ``y`` gets a constant -inf-like logit)."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    clf = LogisticRegression(C=c, max_iter=3000, class_weight=None).fit((x - mu) / sd, y)
    w = np.zeros((len(LABELS), x.shape[1]), np.float32)
    b = np.full(len(LABELS), -30.0, np.float32)
    for k, lab in enumerate(clf.classes_):
        j = LABELS.index(lab)
        w[j] = clf.coef_[k] / sd
        b[j] = clf.intercept_[k] - float((clf.coef_[k] / sd) @ mu)
    return w, b


def predict(w: np.ndarray, b: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    z = x @ w.T + b
    z = z - z.max(1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    return np.array(LABELS)[p.argmax(1)], p.max(1)


def report(name: str, y: np.ndarray, pred: np.ndarray, prob: np.ndarray, min_prob: float) -> dict[str, float]:
    sure = prob >= min_prob
    out = {"n": len(y), "accuracy": round(float(np.mean(pred == y)), 4),
           "named_share": round(float(sure.mean()), 4),
           "accuracy_named": round(float(np.mean(pred[sure] == y[sure])), 4) if sure.any() else None}
    print(f"{name:26s} n={len(y):4d} accuracy {out['accuracy']:.3f} | p >= {min_prob:g}: {out['named_share']:.0%} "
          f"of rows named, accuracy there {out['accuracy_named']}", flush=True)
    return out  # type: ignore[return-value]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--min-prob", type=float, default=None,
                    help="probability below which a decision names no category (default: the lowest of 0.3, 0.35, "
                         "... whose named cal rows reach --target-accuracy)")
    ap.add_argument("--target-accuracy", type=float, default=0.85)
    ap.add_argument("--write", action="store_true", help="save the head and point the policy's rule at it")
    ap.add_argument("--scope", choices=("input", "output"), default="input",
                    help="input: the request rule's head on the request data (default); output (v0.3.7): the "
                         "answer rule's head on the harmful answers (harmful-compliance), named by their request's "
                         "category")
    ap.add_argument("--policy", type=Path, default=None,
                    help=f"the policy whose first rule gets the head (default: {POLICY.name}; --scope output: "
                         f"{OUTPUT_POLICY.name})")
    ap.add_argument("--out", type=Path, default=None, help=f"the head's file (default: {OUT.name}; --scope output: "
                                                             f"{OUTPUT_OUT.name}, next to the shipped probes)")
    ap.add_argument("--reads", choices=("scored", "prompt"), default="scored",
                    help="the tokens the head reads (categories.reads): the rule's scored tokens up to its decision, "
                         "or the prompt's (--scope output, v0.3.8: an answer named by its request; --scope input, "
                         "v0.3.9: the whole request, not only the words before the rule tripped)")
    args = ap.parse_args()
    output = args.scope == "output"
    policy = (args.policy or (OUTPUT_POLICY if output else POLICY)).resolve()
    out = (args.out or (OUTPUT_OUT if output else OUT)).resolve()
    scorer = Scorer(policy)
    layer = scorer.layer
    kind = "responses_full" if output else "requests"  # answers whole, as served (v0.3.8; v0.3.7: the first 400 chars)
    train_set, cal_set, test_set = (f"{kind}.{s_}" for s_ in ("train", "cal", "test"))
    if output:
        data = {}
        for n in (train_set, cal_set, test_set):
            cached = Set(n)
            prompts = Set(n.replace("responses_full", "responses_prompts")) if args.reads == "prompt" else None
            if prompts is not None and [r["prompt"] for r in cached.rows] != [r["text"] for r in prompts.rows]:
                sys.exit(f"fit_categories.py: the caches {n} and its prompts hold other rows: collect.py them again")
            data[n] = features(scorer, cached, layer, answer_categories(cached), prompts)
        for src in HELD_OUT_ANSWERS:  # sources held out of every answer fit, each on its own
            m = np.array([s_ == src for s_ in data[test_set][2]])
            data[src] = (data[test_set][0][m], data[test_set][1][m], [src] * int(m.sum()))
        reported = (cal_set, test_set, *HELD_OUT_ANSWERS)
    else:
        data = {n: features(scorer, Set(n), layer, prompts=Set(n) if args.reads == "prompt" else None)
                for n in (train_set, cal_set, test_set, "form_pairs")}
        reported = (cal_set, test_set, "form_pairs")
    xt, yt, st = (np.concatenate([data[n][k] for n in (train_set, cal_set)]) if k < 2 else
                  data[train_set][2] + data[cal_set][2] for k in range(3))
    per_category = dict(Counter(map(str, data[train_set][1])))
    print(f"layer {layer}, window {scorer.window}; train rows per category: {per_category}")
    sources = sorted(set(st))
    best = None
    for c in (0.003, 0.01, 0.03, 0.1):  # leave-one-source-out over train + cal
        right = total = 0
        for src in sources:
            held = np.array([s == src for s in st])
            if held.all() or not held.any():
                continue
            w, b = fit(xt[~held], yt[~held], c)
            pred, _ = predict(w, b, xt[held])
            right += int((pred == yt[held]).sum())
            total += int(held.sum())
        acc = right / total
        print(f"C={c:g}: leave-one-source-out accuracy {acc:.3f} ({total} rows, {len(sources)} sources)", flush=True)
        if best is None or acc > best[1]:
            best = (c, acc)
    assert best is not None
    w, b = fit(*data[train_set][:2], best[0])
    if args.min_prob is None:  # on the cal split (sources the head was fitted on; the test split and pairs are not)
        x, y, _ = data[cal_set]
        pred, prob = predict(w, b, x)
        ok = [m for m in np.arange(0.3, 0.96, 0.05) if (prob >= m).any() and
              np.mean(pred[prob >= m] == y[prob >= m]) >= args.target_accuracy]
        args.min_prob = round(float(ok[0]) if ok else 0.95, 2)
        print(f"min_prob {args.min_prob} (cal accuracy of the named rows >= {args.target_accuracy})")
    metrics = {"C": best[0], "leave_one_source_out_accuracy": round(best[1], 4), "min_prob": args.min_prob}
    for n in reported:
        x, y, _ = data[n]
        metrics[n] = report(n, y, *predict(w, b, x), args.min_prob)  # type: ignore[assignment]
    x, y, _ = data[reported[-1]]  # the form pairs; --scope output: the many-shot answers
    pred, _ = predict(w, b, x)
    print(f"{reported[-1]} by category (accuracy):",
          {c: round(float(np.mean(pred[y == c] == c)), 2) for c in LABELS if (y == c).any()})
    if not args.write:
        return
    import torch
    from safetensors.torch import save_file

    from guardrails.core.policy import CategoryHead, Policy

    train = ROOT / "calibration" / "data" / f"{'responses' if output else 'harmful_requests'}.train.jsonl"
    save_file({"weight": torch.from_numpy(w), "bias": torch.from_numpy(b)}, str(out), metadata={
                            "method": "category_head", "layer": str(layer), "window": str(scorer.window),
                            "labels": json.dumps(list(LABELS)),
                            "train": str(train.relative_to(ROOT)),
                            "train_sha256": hashlib.sha256(train.read_bytes()).hexdigest(),
                            "objective": "multinomial logistic regression on the mean residual of "
                                         + ("the prompt's scored tokens (categories.reads: prompt)"
                                            if args.reads == "prompt"
                                            else "every token the rule scored up to its deciding one"),
                            "metrics": json.dumps(metrics)})
    sys.path.insert(0, str(HERE))
    from fit_shipped import write_policy

    pol = Policy.from_path(policy)
    rule = next(r for r in pol.rules if r.id == scorer.rule.id)
    head = CategoryHead(weights=os.path.relpath(out, policy.parent), min_prob=args.min_prob,
                        actions=rule.categories.actions if rule.categories else {}, reads=args.reads)
    new = rule.model_copy(update={"categories": head})
    write_policy(policy, pol.model_copy(update={"rules": [new if r.id == new.id else r for r in pol.rules]}))
    print(f"wrote {out.relative_to(ROOT)} and pointed {policy.relative_to(ROOT)} (rule {rule.id}) at it")


if __name__ == "__main__":
    main()
