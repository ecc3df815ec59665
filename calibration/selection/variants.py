#!/usr/bin/env python3
"""Cheap variants of the shipped request detectors aimed at short prompts, scored on the held-out sets.

Each variant's threshold is its 3% FPR point on the cal split's benign rows (as ``guardrails calibrate
--target-fpr 0.03`` fits the shipped ones); every other column is held out (``heldout.py``'s sets). The
variants, none of which needs new data:

- ``window``: the shipped detectors with a shorter window (fewer template and "How do I" tokens averaged in);
- ``last-token``: logistic probes on the last (1 or 3) scored prompt tokens, the post-instruction
  positions ("\\n", "assistant", "\\n") where refusal work reads harmfulness, fitted on the train split;
- ``position``: the window score minus ``a * log(tokens so far)`` (the threshold rising with the number of
  windows a prompt has; streaming-compatible);
- ``union``: row scores combined after standardising each on the cal benign rows (max or mean);
- ``data``: the shipped probe's recipe (``fit_shipped.py --probe-kind maxwin --probe-layers L --probe-wd 1e-3``,
  the layers ``harmful-requests-probe.yaml`` reads: 12,18 until v0.3.1, 18,27 since) refitted on the train split
  plus (a) nothing (a check that the recipe reproduces the shipped probe),
  (b) the 61 + 61 short questions of ``calibration/handwritten/short_questions.tsv``, (c) the four held-out
  harmful sources' test rows (their columns are then in-sample), (d) both;
- ``case`` (only with ``--only case``): v0.2.9's short typed rows that start in lower case, scored as typed and
  with the first letter capitalised;
- ``--sae`` adds SAE-rule policies fitted elsewhere (e.g. ``fit_shipped.py --only sae ... --sae-positive
  --sae-out /tmp/sae_pos.yaml``: non-negative feature weights).

Columns: AUROC / blocked on the four held-out harmful sources (against the held-out benign rows), the blind
hand-written harmful (AUROC against their contrasts) / blocked / contrasts blocked, test-split prompts under
8 words (AUROC / harmful blocked), past tense (AUROC / blocked), future blocked, over-refusal, held-out
benign, walledeval-wrapped harmful / benign, in-the-wild jailbreaks blocked.

    SELECTION_DTYPE=float32 python calibration/selection/variants.py [--sae extra.yaml ...]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
from heldout import BLIND, HELD_OUT_HARMFUL, PROBE_POLICY, SHORT_FORMS, Scorer, cache_layers, probe_layers  # noqa: E402
from select_detectors import Set, auroc, windowed_max  # noqa: E402

SETS = ("requests.train", "requests.cal", "requests.test", "over_refusal", "reserved_past", "reserved_future",
        "wrapped.test", "reserved_inthewild_jailbreaks")
RowFn = Callable[[str], np.ndarray]


class Bench:
    def __init__(self) -> None:
        self.sets = {n: Set(n) for n in SETS}

    def line(self, label: str, f: RowFn, thr: float | None = None) -> str:
        """One variant's columns; ``thr``: a fixed threshold instead of the 3% cal FPR point (a decision score)."""
        s = self.sets
        te, cal = s["requests.test"], s["requests.cal"]
        sc, src, lab = f("requests.test"), np.array(te.sources), te.labels
        blind = np.isin(src, BLIND)
        new = np.isin(src, SHORT_FORMS)  # v0.2.9's evaluation source: left out, so the columns keep their rows
        ben = sc[(lab == 0) & ~blind & ~new]
        cs = f("requests.cal")
        thr = np.quantile(cs[cal.labels == 0], 0.97) if thr is None else thr
        four = sc[np.isin(src, HELD_OUT_HARMFUL) & (lab == 1)]
        bh, bc = sc[src == BLIND[0]], sc[src == BLIND[1]]
        words = np.array([len(r["text"].split()) for r in te.rows])
        sh, sb = sc[(words < 8) & (lab == 1) & ~new], sc[(words < 8) & (lab == 0) & ~new]
        past = f("reserved_past")[s["reserved_past"].labels == 1]
        fut = f("reserved_future")[s["reserved_future"].labels == 1]
        wr = s["wrapped.test"]
        sw = f("wrapped.test")
        walled = np.array([str(r["template"]).startswith("walledeval") for r in wr.rows])

        def rate(x: np.ndarray) -> float:
            return float((x >= thr).mean())

        return (f"{label:34s} four {auroc(four, ben):.3f}/{rate(four):.3f} | blind {auroc(bh, bc):.3f}/{rate(bh):.2f}/"
                f"{rate(bc):.2f} | <8 words {auroc(sh, sb):.3f}/{rate(sh):.2f} | past {auroc(past, ben):.3f}/"
                f"{rate(past):.2f} fut {rate(fut):.2f} | over-refusal {rate(f('over_refusal')):.3f} benign "
                f"{rate(ben):.3f} | walledeval {rate(sw[walled & (wr.labels == 1)]):.3f}/"
                f"{rate(sw[walled & (wr.labels == 0)]):.3f} | in-the-wild "
                f"{rate(f('reserved_inthewild_jailbreaks')):.2f}")


def windows(b: Bench, policies: list[Path]) -> None:
    print("# window (the shipped detectors' token scores, other windows)")
    for pol in policies:
        sc = Scorer(pol)
        tok = {n: sc.tokens(s) for n, s in b.sets.items()}
        for w in (16, 12, 10, 8, 6):
            print(b.line(f"{pol.stem} W{w}" + (" (shipped)" if w == sc.window else ""),
                         lambda n, w=w, tok=tok: windowed_max(tok[n], b.sets[n].offsets, w)), flush=True)


def last_token(b: Bench) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    print("# last-token probes (logistic regression on the last k scored prompt tokens, train split)")

    def feats(s: Set, layers: list[int], k: int) -> np.ndarray:
        o = s.offsets
        return np.concatenate([np.stack([s.x(layer)[max(e - k, a):e].mean(0) for a, e in pairwise(o)])
                               for layer in layers], 1)

    tr = b.sets["requests.train"]
    for layers in ([15], [18], [12, 18], [12, 15, 18]):
        for k in (1, 3):
            x = feats(tr, layers, k)
            std = StandardScaler().fit(x)
            lr = LogisticRegression(C=0.01, max_iter=2000).fit(std.transform(x), tr.labels)
            cache: dict[str, np.ndarray] = {}

            def f(n: str, layers: list[int] = layers, k: int = k, lr=lr, std=std,  # type: ignore[no-untyped-def]
                  cache: dict[str, np.ndarray] = cache) -> np.ndarray:
                if n not in cache:
                    cache[n] = lr.decision_function(std.transform(feats(b.sets[n], layers, k)))
                return cache[n]

            print(b.line(f"last{k} L{'+'.join(map(str, layers))}", f), flush=True)


def position(b: Bench, policy: Path) -> None:
    print("# position: window score - a * log(tokens so far), max over the prompt")
    sc = Scorer(policy)
    tok = {n: sc.tokens(s) for n, s in b.sets.items()}

    def rows(n: str, a: float) -> np.ndarray:
        o, t = b.sets[n].offsets, tok[n]
        cs = np.concatenate([[0.0], np.cumsum(t, dtype=np.float64)])
        lens = np.diff(o)
        start = np.repeat(o[:-1], lens)
        ends = np.arange(1, o[-1] + 1)
        means = (cs[ends] - cs[np.maximum(ends - sc.window, start)]) / (ends - np.maximum(ends - sc.window, start))
        return np.maximum.reduceat(means - a * np.log(ends - start), o[:-1])

    for a in (0.0, 0.2, 0.5, 0.8):
        print(b.line(f"{policy.stem} a={a}", lambda n, a=a: rows(n, a)), flush=True)


def union(b: Bench, policies: list[Path]) -> None:
    print("# union: row scores standardised on the cal benign rows, then combined")
    z: dict[str, dict[str, np.ndarray]] = {}
    for pol in policies:
        sc = Scorer(pol)
        r = {n: sc.rows(s) for n, s in b.sets.items() if n != "requests.train"}
        ref = r["requests.cal"][b.sets["requests.cal"].labels == 0]
        z[pol.stem] = {n: (v - ref.mean()) / ref.std() for n, v in r.items()}
    names = list(z)
    for i, p in enumerate(names):
        for q in names[i + 1:]:
            print(b.line(f"max({p}, {q})", lambda n, p=p, q=q: np.maximum(z[p][n], z[q][n])), flush=True)
            print(b.line(f"mean({p}, {q})", lambda n, p=p, q=q: (z[p][n] + z[q][n]) / 2), flush=True)


def _cache_short_questions() -> str:
    """The short questions of ``short_questions.tsv`` as a cached set ``hw.short`` (residuals at ``cache_layers()``),
    read and named as ``build_data.py`` reads them (train split since v0.2.9)."""
    import collect

    sys.path.insert(0, str(ROOT / "calibration"))
    from build_data import HANDWRITTEN_DIR, SHORT, read_tsv, tidy

    rows = [{"text": tidy(text), "label": int(kind == "harmful"), "form": "question", "category": cat,
             "source": SHORT[0] if kind == "harmful" else SHORT[1]}
            for cat, kind, text in read_tsv(HANDWRITTEN_DIR / "short_questions.tsv", 3)]
    return collect.cache_rows("hw.short", rows, layers=cache_layers())


def _cache_held_out_harmful() -> str:
    """The four held-out harmful sources' rows of the test split as a cached set ``requests.heldsrc``."""
    import collect

    test = Set("requests.test")
    keep = [i for i, r in enumerate(test.rows) if r["source"] in HELD_OUT_HARMFUL]
    o = test.offsets
    acts = {layer: [test.x(layer)[o[i]:o[i + 1]] for i in keep] for layer in cache_layers()}
    collect.write_set(collect.out_dir(), "requests.heldsrc", [test.rows[i] for i in keep], acts, test.scope)
    return "requests.heldsrc"


def data(b: Bench, out: Path) -> None:
    import maxwin

    from guardrails.offline.baselines import save_linear

    print("# data: the shipped probe's recipe on the train split + more rows")
    short, held = _cache_short_questions(), _cache_held_out_harmful()
    layers = probe_layers()
    out.mkdir(parents=True, exist_ok=True)
    for extras in ([], [short], [held], [short, held]):
        pool = maxwin.Pool(["requests.train", "wrapped.train", *extras], layers)
        coef, bias = maxwin.fit(pool.x, pool.offsets, pool.y, maxwin.row_weights(pool, 1.0), window=16, wd=1e-3,
                                steps=40)
        deep, extra = maxwin.split_layers(coef, layers)
        path = save_linear(out / f"probe_{'+'.join(extras) or 'train'}.safetensors", deep, bias, extra=extra)
        sc = Scorer(PROBE_POLICY, str(path))
        label = "probe, train" + "".join(f" + {e}" for e in extras) + (" (four sources in-sample)" if held in extras
                                                                         else "")
        print(b.line(label, lambda n, sc=sc: sc.rows(b.sets[n])), flush=True)


def case(policies: list[Path]) -> None:
    """The short typed rows that start in lower case, scored as typed and with their first letter capitalised
    (residuals of the capitalised texts cached as ``short_forms.capitalised``): does case alone move the score?
    Thresholds: each policy's own."""
    import collect

    test = Set("requests.test")
    keep = [i for i, r in enumerate(test.rows) if r["source"] in SHORT_FORMS and r["text"][:1].islower()]
    rows = [test.rows[i] for i in keep]
    capital = [dict(r, text=r["text"][:1].upper() + r["text"][1:]) for r in rows]
    capped = Set(collect.cache_rows("short_forms.capitalised", capital))
    y = capped.labels
    print(f"# case: {len(rows)} short typed rows that start in lower case, as typed vs first letter capitalised")
    for pol in policies:
        sc = Scorer(pol)
        typed = sc.rows(test)[keep]
        for how, r in (("as typed", typed), ("capitalised", sc.rows(capped))):
            print(f"{pol.stem:26s} {how:12s} AUROC {auroc(r[y == 1], r[y == 0]):.3f} harmful blocked "
                  f"{(r[y == 1] >= sc.threshold).mean():.3f} benign blocked {(r[y == 0] >= sc.threshold).mean():.3f}",
                  flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sae", action="append", default=[], help="extra SAE-rule policy YAML to score (repeatable)")
    ap.add_argument("--only", choices=("window", "last-token", "position", "union", "data", "sae", "case"),
                    default=None)
    ap.add_argument("--out", default="/tmp/variants", help="where the data variants' probe files go")
    args = ap.parse_args()
    shipped = [ROOT / "policies" / f"{n}.yaml" for n in ("harmful-requests", "harmful-requests-probe",
                                                          "harmful-requests-sae")]
    if args.only == "case":
        case(shipped)
        return
    b = Bench()
    if args.only in (None, "window"):
        windows(b, shipped)
    if args.only in (None, "last-token"):
        last_token(b)
    if args.only in (None, "position"):
        position(b, shipped[0])
    if args.only in (None, "union"):
        union(b, shipped)
    if args.only in (None, "data"):
        data(b, Path(args.out))
    if args.sae:
        print("# SAE-rule policies given with --sae (their own window)")
        for p in map(Path, args.sae):
            sc = Scorer(p)
            print(b.line(p.stem, lambda n, sc=sc: sc.rows(b.sets[n])), flush=True)


if __name__ == "__main__":
    main()
