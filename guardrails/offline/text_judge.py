"""An offline second-stage text classifier for the cascade: TF-IDF + logistic regression.

A stand-in for an LLM judge (Llama Guard, a hosted moderation model): it runs on the CPU in
microseconds, needs no network, and is fitted on the repository's training sources only
(``calibration/data/harmful_requests.train.jsonl`` and ``jailbreak_wrapped.train.jsonl``), with its
probability cut chosen on the calibration split. It reads the text of the request (the judge's
``request.text``), never the prompt template. It is no claim about what an LLM judge would do.

    python scripts/build_text_judge.py   # fit, pick the cut, write calibration/probes/text-judge.safetensors
    judge = bundled_judge()                       # the committed artifact
    guard = GuardedModel(model, tok, policy, judges={"text-judge": judge})

Saved as one ``.safetensors`` file (``idf`` and ``coef`` tensors; settings, vocabulary, cut, intercept and
provenance in its metadata): no pickle. Scoring re-implements ``TfidfVectorizer.transform`` (sublinear tf, l2 norm) over
scikit-learn's own analyzer, so it equals the fitted pipeline (checked when fitting).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from guardrails.core.cascade import JudgeRequest, Verdict

VECTORIZER = {"analyzer": "word", "ngram_range": [1, 2], "lowercase": True, "min_df": 2, "max_features": 30000,
              "sublinear_tf": True, "strip_accents": "unicode"}
"""TF-IDF settings (scikit-learn ``TfidfVectorizer`` arguments)."""
TRAIN_FILES = ("harmful_requests.train.jsonl", "jailbreak_wrapped.train.jsonl")
CAL_FILES = ("harmful_requests.cal.jsonl", "jailbreak_wrapped.cal.jsonl")
FORMAT = "sae-guardrails text judge"
TARGET_FPR = 0.05
"""The cut: the lowest probability whose false-positive rate on the calibration split is at most this."""


def _analyzer(settings: dict[str, Any]) -> Any:
    from sklearn.feature_extraction.text import TfidfVectorizer

    kw = {**settings, "ngram_range": tuple(settings["ngram_range"])}
    return TfidfVectorizer(**kw).build_analyzer()


@dataclass
class TextJudge:
    """A fitted classifier; call it with a :class:`~guardrails.core.cascade.JudgeRequest` (or use :meth:`proba`)."""

    settings: dict[str, Any]
    """TfidfVectorizer arguments."""
    vocabulary: dict[str, int]
    """Term -> column."""
    idf: np.ndarray
    """Inverse document frequency per column."""
    coef: np.ndarray
    """Logistic-regression weights per column."""
    intercept: float
    """Logistic-regression intercept."""
    cut: float = 0.5
    """Probability at or above which the text is unsafe."""
    meta: dict[str, Any] | None = None
    """Provenance: training files and their hashes, calibration FPR/TPR at the cut."""

    def __post_init__(self) -> None:
        self._analyze = _analyzer(self.settings)

    def proba(self, texts: Sequence[str]) -> np.ndarray:
        """P(harmful) per text."""
        out = np.empty(len(texts), dtype=np.float64)
        for i, text in enumerate(texts):
            counts: dict[int, int] = {}
            for term in self._analyze(text):
                j = self.vocabulary.get(term)
                if j is not None:
                    counts[j] = counts.get(j, 0) + 1
            if not counts:
                out[i] = 1.0 / (1.0 + math.exp(-self.intercept))
                continue
            cols = np.fromiter(counts, dtype=np.int64)
            tf = 1.0 + np.log(np.fromiter(counts.values(), dtype=np.float64))  # sublinear tf
            v = tf * self.idf[cols]
            v /= np.linalg.norm(v)
            z = float(v @ self.coef[cols]) + self.intercept
            out[i] = 1.0 / (1.0 + math.exp(-z))
        return out

    def __call__(self, request: JudgeRequest | str) -> Verdict:
        text = request if isinstance(request, str) else request.text
        p = float(self.proba([text])[0])
        return Verdict(p >= self.cut, "unsafe" if p >= self.cut else "safe", f"p(harmful)={p:.3f} (cut {self.cut:.3f})")

    def __repr__(self) -> str:
        return f"TextJudge({self.settings['analyzer']} {tuple(self.settings['ngram_range'])}-grams, " \
               f"{len(self.vocabulary)} terms, cut {self.cut:.3f})"

    # -- save / load ---------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write one ``.safetensors`` file: ``idf`` and ``coef`` tensors, settings/vocabulary/cut in its metadata."""
        from safetensors.numpy import save_file

        path = Path(path).with_suffix(".safetensors")
        terms = [""] * len(self.vocabulary)
        for t, j in self.vocabulary.items():
            terms[j] = t
        meta = {"format": FORMAT, "version": "1", "settings": json.dumps(self.settings), "cut": repr(self.cut),
                "intercept": repr(self.intercept), "terms": json.dumps(terms, ensure_ascii=False),
                "meta": json.dumps(self.meta or {})}
        save_file({"idf": self.idf.astype(np.float32), "coef": self.coef.astype(np.float32)}, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TextJudge:
        """Read a file written by :meth:`save`."""
        from safetensors import safe_open

        path = Path(path).with_suffix(".safetensors")
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path} is not a text judge (format {meta.get('format')!r})")
            idf, coef = f.get_tensor("idf").astype(np.float64), f.get_tensor("coef").astype(np.float64)
        vocab = {t: j for j, t in enumerate(json.loads(meta["terms"]))}
        return cls(json.loads(meta["settings"]), vocab, idf, coef, float(meta["intercept"]), float(meta["cut"]),
                   json.loads(meta["meta"]))


def _rows(paths: Sequence[Path]) -> tuple[list[str], np.ndarray, list[dict[str, str]]]:
    texts, labels, prov = [], [], []
    for p in paths:
        data = p.read_bytes()
        prov.append({"file": p.name, "sha256": hashlib.sha256(data).hexdigest()})
        for line in data.decode("utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                texts.append(str(row.get("text") or row.get("prompt")))
                labels.append(int(row["label"]))
    return texts, np.array(labels), prov


def fit(train: Sequence[Path], cal: Sequence[Path], *, target_fpr: float = TARGET_FPR, c: float = 4.0) -> TextJudge:
    """Fit TF-IDF + logistic regression on ``train`` (class-balanced) and set the cut on ``cal``."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    texts, y, prov = _rows(train)
    vec = TfidfVectorizer(**{**VECTORIZER, "ngram_range": tuple(VECTORIZER["ngram_range"])})  # type: ignore[arg-type]
    x = vec.fit_transform(texts)
    clf = LogisticRegression(C=c, class_weight="balanced", max_iter=2000).fit(x, y)
    vocab = {str(t): int(j) for t, j in vec.vocabulary_.items()}
    judge = TextJudge(dict(VECTORIZER), vocab, vec.idf_.astype(np.float64), clf.coef_[0].astype(np.float64),
                      float(clf.intercept_[0]))
    ref = clf.predict_proba(x[:50])[:, 1]
    if not np.allclose(judge.proba(texts[:50]), ref, atol=1e-6):
        raise RuntimeError("text judge: the re-implemented transform differs from scikit-learn's")
    ctexts, cy, cprov = _rows(cal)
    p = judge.proba(ctexts)
    neg = np.sort(p[cy == 0])
    k = math.floor(target_fpr * len(neg))  # at most k negatives at or above the cut
    judge.cut = float(np.nextafter(neg[len(neg) - k - 1], 1.0)) if len(neg) > k else 0.5
    hit = p >= judge.cut
    judge.meta = {"train": prov, "cal": cprov, "C": c, "target_fpr": target_fpr,
                  "cal_fpr": float(hit[cy == 0].mean()), "cal_tpr": float(hit[cy == 1].mean()),
                  "note": "TF-IDF + logistic regression on training sources only; a stand-in for an LLM judge"}
    return judge


def artifact_stem() -> Path:
    from guardrails._data import data_root

    return data_root() / "calibration" / "probes" / "text-judge"


def bundled_judge() -> TextJudge:
    """The committed judge (``calibration/probes/text-judge.safetensors``); use as ``--judge
    guardrails.offline.text_judge:bundled_judge()``."""
    return TextJudge.load(artifact_stem())
