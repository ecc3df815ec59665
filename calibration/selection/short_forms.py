#!/usr/bin/env python3
"""v0.2.9's experiments with short hand-written requests: what adding them to the train split does.

Run on **v0.2.8's train split** (``python calibration/build_data.py --without-short-questions``, then
``collect.py --layers=12,15,18 requests.train``): the shipped data now holds the short questions already.
Sets: ``hw.short`` (``short_questions.tsv``, 61 + 61, cached by ``variants.py``) and ``hw.forms``
(``short_forms.tsv``, 111 + 154, cached here; v0.2.9 ships it as an evaluation source, held out whole).

- ``fit``: the probe (v0.2.8 recipe: layers 12 + 18, window 16, served-score objective, L2 1e-3), the SAE rule
  (128 features, window 16) and their ensemble (1:1 on scores standardised on the cal benign rows) refitted on
  train + nothing / ``hw.short`` / ``hw.short`` + ``hw.forms``; ``variants.py``'s columns, thresholds at each
  detector's 3% cal FPR. Also the new probes inside an ensemble with the *shipped* SAE rule.
- ``typed`` (on v0.2.9's train split): the probe refitted with a "typed" copy of every train request row
  (lower case, end punctuation stripped; both labels), alone and in the ensemble with the shipped SAE rule,
  against the same without the copies; ``variants.py``'s columns plus the held-out short forms of the test split.
- ``lofo``: leave one form family of ``hw.forms`` out (lower case / capitalised question / capitalised
  imperative), train on the rest (+ ``hw.short``), score the held-out family's rows.

    SELECTION_DTYPE=float32 python calibration/selection/short_forms.py fit|lofo|typed
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "calibration"))
import collect  # noqa: E402
import maxwin  # noqa: E402
from heldout import Scorer  # noqa: E402
from select_detectors import Set, auroc, load_sae, weights, windowed_max  # noqa: E402
from variants import Bench, _cache_short_questions  # noqa: E402

TokFn = Callable[[Set], np.ndarray]


def cache_forms() -> str:
    """``short_forms.tsv`` as the cached set ``hw.forms`` (residuals at 12, 15, 18)."""
    from build_data import form_of, read_tsv, tidy

    rows = [{"text": tidy(t), "label": int(k == "harmful"), "form": form_of(tidy(t)), "category": c,
             "source": "handwritten_shortform_" + ("harmful" if k == "harmful" else "contrast")}
            for c, k, t in read_tsv(ROOT / "calibration/handwritten/short_forms.tsv", 3)]
    return collect.cache_rows("hw.forms", rows)


class Fit:
    """Probe and SAE rule fitted on the kept rows of a pool; token scores of any cached set."""

    def __init__(self, pool: maxwin.Pool, codes: tuple[np.ndarray, np.ndarray], keep: np.ndarray) -> None:
        sae, self.tag = load_sae()
        self.sae = sae
        idx = np.flatnonzero(keep)
        x, off = pool.subset(keep)
        y = pool.y[keep]
        w = weights([pool.rows[i] for i in idx], y, [pool.sources[i] for i in idx])
        coef, self.bias = maxwin.fit(x, off, y, w, window=16, wd=1e-3, steps=40)
        self.c12, self.c18 = np.split(coef, 2)  # Pool stacks the layers in the order given
        t, t_off = pool.tokens(keep)
        self.ws, self.bs = maxwin.fit_sae(codes[0][t], codes[1][t], t_off, y, w, sae.d_sae, window=16, n_features=128)

    def probe(self, s: Set) -> np.ndarray:
        return np.asarray(s.x(18), np.float32) @ self.c18 + np.asarray(s.x(12), np.float32) @ self.c12 + self.bias

    def sae_rule(self, s: Set) -> np.ndarray:
        v, ids = s.sae_codes(self.sae, self.tag)
        return (v.astype(np.float32) * self.ws.astype(np.float32)[ids.astype(np.int64)]).sum(1) + self.bs


def ensemble(members: list[TokFn], cal: Set) -> Callable[[Set], np.ndarray]:
    """Row scores of the 1:1 mean of the members' token scores, each standardised on the cal benign rows."""
    stats = []
    for f in members:
        neg = windowed_max(f(cal), cal.offsets, 16)[cal.labels == 0]
        stats.append((neg.mean(), neg.std()))
    return lambda s: windowed_max(sum((f(s) - m) / sd for f, (m, sd) in zip(members, stats, strict=True))
                                  / len(members), s.offsets, 16)


def pool_and_codes(names: list[str]) -> tuple[maxwin.Pool, tuple[np.ndarray, np.ndarray]]:
    sae, tag = load_sae()
    codes = [Set(n).sae_codes(sae, tag) for n in names]
    return maxwin.Pool(names, [12, 18]), (np.concatenate([c[0] for c in codes]), np.concatenate([c[1] for c in codes]))


def cmd_fit() -> None:
    b = Bench()
    short, forms = _cache_short_questions(), cache_forms()
    cal = b.sets["requests.cal"]
    shipped_sae = Scorer(ROOT / "policies" / "harmful-requests-sae.yaml")
    for label, extras in (("train", []), ("+ short", [short]), ("+ short + forms", [short, forms])):
        pool, codes = pool_and_codes(["requests.train", "wrapped.train", *extras])
        fit = Fit(pool, codes, np.ones(len(pool.y), bool))
        rows = {"probe": lambda s, fit=fit: windowed_max(fit.probe(s), s.offsets, 16),
                "SAE rule": lambda s, fit=fit: windowed_max(fit.sae_rule(s), s.offsets, 16),
                "ensemble": ensemble([fit.probe, fit.sae_rule], cal),
                "ensemble with the shipped SAE rule": ensemble([fit.probe, shipped_sae.tokens], cal)}
        for kind, f in rows.items():
            print(b.line(f"{kind}, train {label}", lambda n, f=f: f(b.sets[n])), flush=True)


def family(text: str) -> str:
    return "lower case" if text[:1].islower() else ("question" if text.rstrip().endswith("?") else "imperative")


def cmd_lofo() -> None:
    short, forms_name = _cache_short_questions(), cache_forms()
    pool, codes = pool_and_codes(["requests.train", "wrapped.train", short, forms_name])
    forms, cal = Set(forms_name), Set("requests.cal")
    fam = np.array([family(r["text"]) for r in forms.rows])
    new = np.array([s.startswith("handwritten_shortform") for s in pool.sources])
    pool_fam = np.full(len(pool.y), "", dtype=object)
    pool_fam[new] = fam
    for held in ("lower case", "question", "imperative", None):
        keep = ~new | (new & (pool_fam != held)) if held else ~new
        fit = Fit(pool, codes, keep)
        detectors = {"probe": lambda s, fit=fit: windowed_max(fit.probe(s), s.offsets, 16),
                     "SAE rule": lambda s, fit=fit: windowed_max(fit.sae_rule(s), s.offsets, 16),
                     "ensemble": ensemble([fit.probe, fit.sae_rule], cal)}
        for kind, f in detectors.items():
            thr = np.quantile(f(cal)[cal.labels == 0], 0.97)
            r, out = f(forms), []
            for g in ("lower case", "question", "imperative"):
                if held is not None and g != held:
                    continue
                m = fam == g
                pos, neg = r[m & (forms.labels == 1)], r[m & (forms.labels == 0)]
                out.append(f"{g} n={m.sum()} AUROC {auroc(pos, neg):.3f} harmful blocked {(pos >= thr).mean():.2f} "
                           f"benign blocked {(neg >= thr).mean():.2f}")
            print(f"held out: {held or 'every family (no hw.forms row trained on)'}, {kind}: " + " | ".join(out),
                  flush=True)


def cache_typed() -> str:
    """Lower-cased, end-punctuation-stripped copies of the train split's request rows (``requests.train_typed``;
    source ``<source>+typed``, so the source caps of the row weights treat them as their own sources)."""
    rows = []
    for r in Set("requests.train").rows:
        t = r["text"].lower().rstrip(" .?!")
        if t != r["text"] and len(t) > 3:
            rows.append(dict(r, text=t, source=r["source"] + "+typed"))
    return collect.cache_rows("requests.train_typed", rows)


def cmd_typed() -> None:
    from heldout import SHORT_FORMS

    typed = cache_typed()
    b = Bench()
    cal, te = b.sets["requests.cal"], b.sets["requests.test"]
    sae = Scorer(ROOT / "policies" / "harmful-requests-sae.yaml")
    src = np.array(te.sources)
    low = np.array([r["text"][:1].islower() for r in te.rows])

    def forms_line(label: str, f: Callable[[Set], np.ndarray]) -> None:
        thr = np.quantile(f(cal)[cal.labels == 0], 0.97)
        r, out = f(te), []
        for nm, m in (("all", np.ones(len(src), bool)), ("lower case", low), ("capitalised", ~low)):
            pos, neg = r[m & (src == SHORT_FORMS[0])], r[m & (src == SHORT_FORMS[1])]
            out.append(f"{nm} {auroc(pos, neg):.3f} {(pos >= thr).mean():.2f}/{(neg >= thr).mean():.2f}")
        print(f"{label:34s} short forms AUROC harmful/benign blocked: " + " | ".join(out), flush=True)

    for label, extras in (("shipped recipe", []), ("+ typed copies", [typed])):
        pool = maxwin.Pool(["requests.train", "wrapped.train", *extras], [12, 18])
        coef, bias = maxwin.fit(pool.x, pool.offsets, pool.y, maxwin.row_weights(pool, 1.0), window=16, wd=1e-3,
                                steps=40)
        c12, c18 = np.split(coef, 2)

        def probe(s: Set, c12: np.ndarray = c12, c18: np.ndarray = c18, bias: float = bias) -> np.ndarray:
            return np.asarray(s.x(18), np.float32) @ c18 + np.asarray(s.x(12), np.float32) @ c12 + bias

        detectors = {"probe": lambda s, probe=probe: windowed_max(probe(s), s.offsets, 16),
                     "ensemble": ensemble([probe, sae.tokens], cal)}
        for kind, f in detectors.items():
            print(b.line(f"{kind} {label}", lambda n, f=f: f(b.sets[n])), flush=True)
            forms_line(f"{kind} {label}", f)


if __name__ == "__main__":
    cmds = {"fit": cmd_fit, "lofo": cmd_lofo, "typed": cmd_typed}
    if len(sys.argv) != 2 or sys.argv[1] not in cmds:
        raise SystemExit(f"usage: short_forms.py {{{'|'.join(cmds)}}}")
    cmds[sys.argv[1]]()
