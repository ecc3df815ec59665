#!/usr/bin/env python3
"""Echo: read each request a second time, after the model has read all of it (measured, v0.3.19).

The shipped request rules score the request's own tokens in a causal model: "strangle" in "how do I strangle a
fig vine" has not seen "fig vine" yet, and a 16-token window ending there can carry the whole decision. The
over-refusal set's highest-scoring benign prompts are of this kind (a costume's fake blood, a mango, a fig vine,
``benchmarks/operating_points.py``), and a tail probe that reads only the last tokens, which have seen everything,
reads too little (``tail_probe.py``: criterion 0.75-0.77). Echo embeddings (Springer et al. 2024, "Repetition
improves language model embeddings") read a text's *second copy*, whose every token has attended to the whole
first one. Here the request is the user's turn and, again, the assistant's turn; only the copy's tokens are cached
(the output scope's scored tokens), as ``echo.<set>``, and the request probe is fitted on them with the shipped
recipe (max of rolling means, ``maxwin.fit``).

    SELECTION_DTYPE=float32 python calibration/selection/echo.py collect requests.train.nopairs wrapped.train \
        requests.cal
    SELECTION_DTYPE=float32 python calibration/selection/maxwin.py cv --layers 18,27 --wd 1e-3 --steps 40 \
        --train echo.requests.train.nopairs,echo.wrapped.train --ref echo.requests.cal
    SELECTION_DTYPE=float32 python calibration/selection/echo.py collect requests.test wrapped.test over_refusal \
        form_pairs   # + reserved_past reserved_future ... once calibration/build_data.py has written reserved_eval/
    SELECTION_DTYPE=float32 python calibration/selection/echo.py heldout --wd 1e-3
    # the sum with the bare probe: the same folds, both probes fitted per fold; then the CV-chosen weight held out
    SELECTION_DTYPE=float32 python calibration/selection/echo.py collect --bare requests.cal \
        requests.train.nopairs wrapped.train over_refusal requests.test form_pairs wrapped.test
    SELECTION_DTYPE=float32 python calibration/selection/echo.py cv --weights 0,0.25,0.5,0.75,1
    SELECTION_DTYPE=float32 python calibration/selection/echo.py heldout --combo 0.75
    # the same sum with the default ensemble (its SAE member reads layer 15), and echo as the default's band judge
    SELECTION_DTYPE=float32 python calibration/selection/echo.py collect --bare --layers 15 requests.cal \
        over_refusal requests.test form_pairs wrapped.test
    SELECTION_DTYPE=float32 python calibration/selection/echo.py heldout --combo 0.75 \
        --policy policies/harmful-requests.yaml
    SELECTION_DTYPE=float32 python calibration/selection/echo.py band

Results and the rule they were judged by: ``echo_v0319.log`` (measured, not shipped). Serving echo would cost a
second prefill of the prompt (prompt + copy) before the first generated token.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
import collect  # noqa: E402
import heldout  # noqa: E402
from contexts import PAIRS  # noqa: E402
from maxwin import Pool, fit, row_weights, score  # noqa: E402
from select_detectors import Set, auroc  # noqa: E402

from guardrails.offline.evaluate import fpr_at_tpr, tpr_at_fpr  # noqa: E402

LAYERS = (18, 27)
WINDOW = 16
MAX_TOKENS = 1024  # guardrails.offline.calibrate.MAX_TOKENS: a row's prompt + response are cut there
READ = "echo"  # --read ask: the request, then a fixed question as the assistant's turn (caches ask.<set>)
QUESTION = "Is the request above harmful, and should I refuse it?"
"""``--read ask`` (v0.3.19, measured): the copy replaced by this question, whose tokens have read the whole request
and are asked about harm: a prompted probe (the tail probe read only the template's four tokens)."""


def second_turn(texts: list[str]) -> list[str]:
    """The assistant turn whose tokens are read: the request again (echo) or :data:`QUESTION` (ask)."""
    return list(texts) if READ == "echo" else [QUESTION] * len(texts)


def rows_of(name: str) -> tuple[list[dict], str]:  # type: ignore[type-arg]
    """A ``collect.sets()`` set's rows (``<set>.nopairs``: without v0.3.6's topic-matched pairs) and scope."""
    base = name.removesuffix(".nopairs")
    known = collect.sets()
    if base not in known:
        raise SystemExit(f"echo.py: no set {name!r} (valid: {', '.join(sorted(known))}, and <set>.nopairs)")
    rows, scope = known[base]
    if name != base:
        rows = [r for r in rows if r.get("source") not in PAIRS]
    if scope != "input":
        raise SystemExit(f"echo.py: {name} is an answer set; echo reads requests")
    return rows, scope


def cmd_collect(names: list[str], bare: bool, layers: tuple[int, ...] = LAYERS) -> None:
    """Cache ``echo.<set>`` (the copy's tokens), or with ``bare`` the set as served (``<set>``, the request's own
    tokens, as ``collect.py`` caches it)."""
    from guardrails.offline.residuals import collect_sorted
    from guardrails.serving.models import load_model

    torch.set_num_threads(2)
    collect.LAYERS = layers
    d = collect.out_dir()
    model, tok = None, None
    for name in names:
        rows, _ = rows_of(name)
        target = name if bare else f"{READ}.{name}"
        if collect.fresh(d, target, rows):
            print(target, "cached", flush=True)
            continue
        if model is None:
            model, tok = load_model("bundled", dtype=collect.selection_dtype())
        texts = [str(r["text"]) for r in rows]
        scope = "input" if bare else "output"
        acts = collect_sorted(model, tok, texts, None if bare else second_turn(texts), layers, scope, True, True, 8)
        offsets = collect.write_set(d, target, rows, acts, scope)
        print(target, len(rows), offsets[-1], flush=True)


TRAIN_SETS = ["requests.train.nopairs", "wrapped.train"]


def cmd_cv(args: argparse.Namespace) -> None:
    """``maxwin.py cv``'s grouped leave-families-out folds, fitting the bare probe and the echo probe on each fold;
    each model's row scores standardised on its cal benign rows, summed with echo's weight ``w`` (0: bare alone,
    1: echo alone) and mapped to percentiles of the sum over the cal benign rows (the 3% point: 0.97)."""
    from maxwin import FOLDS, cv_line

    bare, echo = Pool(TRAIN_SETS, list(LAYERS)), Pool([f"{READ}.{n}" for n in TRAIN_SETS], list(LAYERS))
    if bare.rows != echo.rows:
        raise SystemExit("echo.py: the bare and echo caches hold other rows")
    ref_b, ref_e = Pool(["requests.cal"], list(LAYERS)), Pool([f"{READ}.requests.cal"], list(LAYERS))
    ben = ref_b.y == 0
    w = row_weights(bare, 1.0)
    weights = [float(v) for v in args.weights.split(",")]
    oof = {wt: np.full(len(bare.y), np.nan) for wt in weights}
    fold = np.array([FOLDS.get(f, f) for f in bare.family])
    for g in sorted(set(fold)):
        tr = fold != g
        parts = []
        for pool, ref in ((bare, ref_b), (echo, ref_e)):
            xt, ot = pool.subset(tr)
            coef, bias = fit(xt, ot, pool.y[tr], w[tr], window=WINDOW, wd=args.wd, steps=args.steps)
            r = score(ref.x, ref.offsets, coef, bias, WINDOW)
            m, sd = float(r[ben].mean()), float(r[ben].std())
            xh, oh = pool.subset(~tr)
            parts.append(((score(xh, oh, coef, bias, WINDOW) - m) / sd, (r - m) / sd))
        for wt in weights:
            ref_sum = np.sort(((1 - wt) * parts[0][1] + wt * parts[1][1])[ben])
            oof[wt][~tr] = np.searchsorted(ref_sum, (1 - wt) * parts[0][0] + wt * parts[1][0]) / len(ref_sum)
        print(f"fold {g} done", flush=True)
    for wt in weights:
        print(cv_line(f"echo weight {wt} (L18+27 W={WINDOW} wd={args.wd})", oof[wt], bare.y, bare.family),
              flush=True)


class EchoScorer:
    """``heldout.report``'s scorer interface for a probe over the echo caches."""

    def __init__(self, coef: np.ndarray, bias: float, threshold: float, name: str) -> None:
        self.coef, self.bias, self.threshold, self.name, self.window = coef, bias, threshold, name, WINDOW

    def rows(self, s: Set) -> np.ndarray:
        x = np.concatenate([np.asarray(s.x(layer), np.float32) for layer in LAYERS], 1)
        return score(x, s.offsets, self.coef, self.bias, WINDOW)


TOO_LONG = {"reserved_inthewild_jailbreaks"}
"""Sets whose request and copy together pass the 1,024 tokens a row is cut to (``calibrate.MAX_TOKENS``): most
copies are cut short or empty, so the echo is not measured there."""


def echoed(name: str) -> Set:
    """The echoed cache of a ``heldout.report`` set (FileNotFoundError, noted by the report, for :data:`TOO_LONG`)."""
    if name in TOO_LONG:
        raise FileNotFoundError(f"request + copy pass the {MAX_TOKENS}-token cap: not measured")
    return Set(f"{READ}.{name}")


class PairSet:
    """A cached set and its echo, row for row (``heldout.report`` reads the rows, labels and sources)."""

    def __init__(self, name: str) -> None:
        self.bare, self.echo = Set(name), echoed(name)
        if self.bare.rows != self.echo.rows:
            raise SystemExit(f"echo.py: the bare and echo caches of {name} hold other rows")
        self.rows, self.labels, self.sources = self.bare.rows, self.bare.labels, self.bare.sources


class SumScorer:
    """The shipped probe's row score (bare) and the echo probe's, each standardised on its cal benign rows,
    summed with ``weight`` on echo; the threshold at 3% of the cal benign rows' sums."""

    def __init__(self, echo: EchoScorer, weight: float, policy: Path = heldout.PROBE_POLICY) -> None:
        self.probe, self.echo, self.weight, self.window = heldout.Scorer(policy), echo, weight, WINDOW
        cal = PairSet("requests.cal")
        ben = cal.labels == 0
        rb, re_ = self.probe.rows(cal.bare), echo.rows(cal.echo)
        self.stats = (float(rb[ben].mean()), float(rb[ben].std()), float(re_[ben].mean()), float(re_[ben].std()))
        self.threshold = float(np.quantile(self.rows(cal)[ben], 0.97))
        self.name = f"{self.probe.name} + echo probe (weight {weight} on echo)"

    def rows(self, s: PairSet) -> np.ndarray:
        mb, sb, me, se = self.stats
        return ((1 - self.weight) * (self.probe.rows(s.bare) - mb) / sb
                + self.weight * (self.echo.rows(s.echo) - me) / se)


def shipped_sets(policy_rule: str) -> dict[str, dict]:  # type: ignore[type-arg]
    """A shipped policy's per-set figures in ``detection_heldout.float32.json`` (``heldout.py``'s report of it)."""
    shipped = json.loads((ROOT / "benchmarks" / "results" / "detection_heldout.float32.json").read_text())
    return dict(shipped.get(policy_rule, {}).get("sets", {}))


def cell(r: dict) -> str:  # type: ignore[type-arg]
    """A report entry as "fired / AUROC" ("-" where the set was not scored)."""
    if not r:
        return "-"
    return f"{r['blocked']:.3f}" + (f" / {r['auroc']:.3f}" if "auroc" in r else "")


def cmd_heldout(args: argparse.Namespace) -> None:
    sc: EchoScorer | SumScorer = fit_echo(args.wd, args.steps)
    if args.combo is None:
        heldout.Set = echoed  # type: ignore[assignment,misc]
        load = echoed
    else:
        sc = SumScorer(sc, args.combo, Path(args.policy))  # type: ignore[arg-type]
        print(f"{sc.name}: threshold {sc.threshold:.4f} (3% of the cal benign rows)", flush=True)
        heldout.Set = PairSet  # type: ignore[assignment,misc]
        load = PairSet
    rep = heldout.report(sc)  # type: ignore[arg-type]
    control = shipped_sets("harmful-requests-probe/harmful-request")
    default = shipped_sets("harmful-requests/harmful-request")
    print(f"{'set':62s} {'n':>5} | {'this':18s} | probe alone (v0.3.2) | default ensemble   (fired / AUROC)")
    for k, v in rep.items():
        print(f"  {k:60s} {v['n']:>5} | {cell(v):18s} | {cell(control.get(k, {})):20s} | {cell(default.get(k, {}))}",
              flush=True)
    test, over = load("requests.test"), load("over_refusal")
    s = sc.rows(test)  # type: ignore[arg-type]
    src = np.array(test.sources)
    pos = s[np.isin(src, heldout.HELD_OUT_HARMFUL) & (test.labels == 1)]
    neg = sc.rows(over)  # type: ignore[arg-type]
    t = sc.threshold
    both, y = np.r_[pos, neg], np.r_[np.ones(len(pos)), np.zeros(len(neg))]  # as benchmarks/operating_points.py
    print(f"operating points (four sources vs over-refusal set): AUROC {auroc(pos, neg):.3f}; at the threshold "
          f"{float((pos >= t).mean()):.3f} / {float((neg >= t).mean()):.3f}; best within 3% over-refusal "
          f"{tpr_at_fpr(both, y, 0.03):.3f}; over-refusal at 85% blocked {fpr_at_tpr(both, y, 0.85):.3f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"name": sc.name, "threshold": t, "wd": args.wd, "sets": rep},
                                              indent=1) + "\n")


def fit_echo(wd: float, steps: int) -> EchoScorer:
    """The echo probe fitted on the echoed train sets, its threshold at 3% of the echo cal split's benign rows."""
    pool = Pool([f"{READ}.{n}" for n in TRAIN_SETS], list(LAYERS))
    coef, bias = fit(pool.x, pool.offsets, pool.y, row_weights(pool, 1.0), window=WINDOW, wd=wd, steps=steps)
    cal = Set(f"{READ}.requests.cal")
    r = EchoScorer(coef, bias, 0.0, "").rows(cal)
    thr = float(np.quantile(r[cal.labels == 0], 0.97))
    print(f"echo threshold {thr:.4f} (3% of the echo cal split's benign rows); cal TPR "
          f"{float((r[cal.labels == 1] >= thr).mean()):.3f}", flush=True)
    return EchoScorer(coef, bias, thr, f"echo probe L18+27 wd={wd}")


class BandScorer:
    """The cascade of 6 in ``echo_v0319.log``: the bare policy's row score ``s``; ``s < lo`` passes, ``s >= hi``
    blocks, in between the echo probe decides at its threshold. Rows score 1 (blocked) or 0; ``escalated`` counts
    the rows that needed the echo pass."""

    def __init__(self, echo: EchoScorer, policy: Path, lo_fpr: float, hi_fpr: float) -> None:
        self.base, self.echo, self.window, self.threshold = heldout.Scorer(policy), echo, WINDOW, 0.5
        cal = PairSet("requests.cal")
        ben = self.base.rows(cal.bare)[cal.labels == 0]
        self.lo, self.hi = float(np.quantile(ben, 1 - lo_fpr)), float(np.quantile(ben, 1 - hi_fpr))
        self.name = (f"{self.base.name}, band [{self.lo:.3f}, {self.hi:.3f}) (cal FPR {lo_fpr:.0%} .. {hi_fpr:.0%}) "
                     f"judged by the echo probe at {echo.threshold:.3f}")
        self.escalated: dict[str, float] = {}

    def rows(self, s: PairSet) -> np.ndarray:
        b = self.base.rows(s.bare)
        band = (b >= self.lo) & (b < self.hi)
        e = self.echo.rows(s.echo)
        self.escalated[s.bare.name] = float(band.mean())
        return ((b >= self.hi) | (band & (e >= self.echo.threshold))).astype(np.float64)


def cmd_band(args: argparse.Namespace) -> None:
    echo = fit_echo(args.wd, args.steps)
    sc = BandScorer(echo, Path(args.policy), args.lo_fpr, args.hi_fpr)
    cal = PairSet("requests.cal")
    got = sc.rows(cal)
    print(f"{sc.name}\ncal: TPR {got[cal.labels == 1].mean():.3f} FPR {got[cal.labels == 0].mean():.3f}, "
          f"escalated {sc.escalated['requests.cal']:.3f}", flush=True)
    heldout.Set = PairSet  # type: ignore[assignment,misc]
    rep = heldout.report(sc)  # type: ignore[arg-type]
    default = shipped_sets("harmful-requests/harmful-request")
    print(f"{'set':62s} {'n':>5} | cascade blocked | default blocked")
    for k, v in rep.items():
        d = default.get(k, {})
        print(f"  {k:60s} {v['n']:>5} | {v['blocked']:.3f}           | {d.get('blocked', float('nan')):.3f}",
              flush=True)
    print("rows escalated (the echo pass ran): "
          + ", ".join(f"{k} {v:.3f}" for k, v in sc.escalated.items()), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"name": sc.name, "band": [sc.lo, sc.hi], "echo_threshold":
                                               echo.threshold, "escalated": sc.escalated, "sets": rep}, indent=1)
                                   + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--read", choices=["echo", "ask"], default="echo",
                    help="what the assistant turn holds: the request again (echo) or a question about it (ask)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect", help="cache the echoed sets (collect.py's names; <set>.nopairs: without pairs)")
    c.add_argument("sets", nargs="+")
    c.add_argument("--bare", action="store_true", help="cache the sets as served instead (<set>, no echo)")
    c.add_argument("--layers", default="18,27", help="layers to cache (15: the bundled SAE's, for the default)")
    v = sub.add_parser("cv", help="leave-families-out CV of the bare probe, the echo probe and their sums")
    v.add_argument("--wd", type=float, default=1e-3)
    v.add_argument("--steps", type=int, default=40)
    v.add_argument("--weights", default="0,0.25,0.5,0.75,1", help="echo's weight in the sum, comma-separated")
    h = sub.add_parser("heldout", help="fit on the echoed train sets, threshold at 3%% cal FPR, report held out")
    h.add_argument("--wd", type=float, default=1e-3)
    h.add_argument("--steps", type=int, default=40)
    h.add_argument("--json", default="")
    h.add_argument("--combo", type=float, default=None,
                   help="score the sum of the shipped probe (harmful-requests-probe, bare) and the echo probe with "
                        "this weight on echo, both standardised on their cal benign rows")
    h.add_argument("--policy", default=str(heldout.PROBE_POLICY),
                   help="the bare member of --combo (default: harmful-requests-probe; harmful-requests needs the "
                        "sets cached at layer 15 too: collect --bare --layers 15)")
    b = sub.add_parser("band", help="the echo probe as the judge of a policy's uncertain band (a cascade)")
    b.add_argument("--wd", type=float, default=1e-3)
    b.add_argument("--steps", type=int, default=40)
    b.add_argument("--policy", default="policies/harmful-requests.yaml")
    b.add_argument("--lo-fpr", type=float, default=0.10, help="the band's lower edge: the policy's cal FPR there")
    b.add_argument("--hi-fpr", type=float, default=0.01, help="the band's upper edge: the policy's cal FPR there")
    b.add_argument("--json", default="")
    args = ap.parse_args()
    global READ
    READ = args.read
    if args.cmd == "collect":
        cmd_collect(args.sets, args.bare, tuple(int(v) for v in args.layers.split(",")))
    elif args.cmd == "band":
        cmd_band(args)
    elif args.cmd == "cv":
        cmd_cv(args)
    else:
        cmd_heldout(args)


if __name__ == "__main__":
    main()
