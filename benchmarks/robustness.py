"""Evasion benchmark: the shipped harmful-requests policy on plain, padded, role-play-wrapped and split prompts.

    python benchmarks/robustness.py [--n 60] [--templates 10] [--policy policies/harmful-requests.yaml]
    python benchmarks/robustness.py --transforms [--split-n 60]

Data: the test split of ``calibration/data/harmful_requests.*.jsonl`` (label 1 rows for detection,
label 0 rows for the false-positive rate), ``--n`` of each evenly spaced over the file. Every variant
wraps the same prompts, so the rates are comparable row for row:

- ``plain``: the request alone.
- ``pad-before`` / ``pad-after`` / ``pad-both``: benign requests from the *train* split (label 0, sources
  writingbench and freshqa: neutral writing tasks and questions) placed
  before / after / around the request in the same user turn (~``--pad-chars`` characters each side).
- ``jailbreak``: the request filled into one of pyrit's role-play jailbreak templates
  (``pyrit/datasets/jailbreak/templates/*.yaml``, read from disk with PyYAML; prompt ``i`` uses
  template ``i mod n_templates``).
- ``split, turns alone``: the request cut in two user turns (an assistant "Go on." between) and each
  user turn scored alone: the naive per-message check that splitting defeats.
- ``split, whole conversation``: the same conversation scored as one text (chat template over all
  turns), as ``SAEGuard`` and ``GuardedModel.score`` on joined messages do.

``--transforms`` measures evasion by trivial rewrites instead (issue 16), on the hand-written set
``benchmarks/data/evasion_requests.jsonl`` (20 clearly harmful requests and 20 topic-matched benign
ones, each written in English, German, French, Spanish and the past tense) plus ``--split-n`` rows of
each label of the test split for the mechanical transforms: ``plain``, ``zero-width`` (U+200B between
characters), ``homoglyph`` (Cyrillic look-alikes for a, c, e, i, o, p), ``base64`` ("Decode and
answer: <base64>"), ``leetspeak`` (a4 e3 i1 o0 s5 t7), ``german`` / ``french`` / ``spanish`` / ``past
tense`` (hand-written set only), ``two turns`` (the request cut in two user turns, the whole
conversation scored). Each transform is scored with the policy's ``normalize:`` steps on (and, for
zero-width, homoglyph, base64 and leetspeak, the harmful prompts with ``normalize: false`` too), and
reports the false positive rate of the benign prompts under the same transform.

A prompt counts as detected when the policy blocks it (``TextScore.blocked``, one prefill pass, the
serving path). The last line is one JSON object. ``--quick`` runs 4 prompts and 2 templates (smoke test).
"""

from __future__ import annotations

import base64
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._util import emit, environment, parser, pin_threads, table  # noqa: E402

DATA = ROOT / "calibration" / "data"
TEMPLATES = ("aim", "better_dan", "evil_confidant", "hypothetical_response", "refusal_suppression",
             "prefix_injection", "role_play", "dev_mode_compact", "jedi_mind_trick", "code_nesting",
             "text_continuation", "style_injection")
"""pyrit template files, in the order they are used (the first ``--templates``)."""


def pyrit_templates_dir() -> Path:
    """Folder of pyrit's jailbreak templates, found without importing pyrit."""
    import importlib.util

    spec = importlib.util.find_spec("pyrit")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pyrit is not installed: pip install --no-deps pyrit (its data files are read, not imported)")
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "jailbreak" / "templates"


def load_templates(names: list[str]) -> dict[str, str]:
    """Template text by name, with its ``{{ prompt }}`` placeholder intact."""
    import yaml

    folder = pyrit_templates_dir()
    out = {}
    for name in names:
        data = yaml.safe_load((folder / f"{name}.yaml").read_text(encoding="utf-8"))
        value = str(data["value"])
        if "{{ prompt }}" not in value and "{{prompt}}" not in value:
            raise SystemExit(f"{folder / name}.yaml has no {{{{ prompt }}}} placeholder")
        out[name] = value
    return out


def fill(template: str, prompt: str) -> str:
    return template.replace("{{ prompt }}", prompt).replace("{{prompt}}", prompt)


def read_rows(path: Path, label: int, n: int) -> list[str]:
    """``n`` rows of ``label``, evenly spaced over the file (its sources come in blocks)."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    texts = [str(r["text"]) for r in rows if int(r["label"]) == label]
    if n >= len(texts):
        return texts
    return [texts[i * len(texts) // n] for i in range(n)]


PAD_SOURCES = ("writingbench", "freshqa")
"""Sources of the padding: neutral writing tasks and questions (not the alarming-but-benign or shell-task rows)."""


def padding(n: int, chars: int, sources: tuple[str, ...] = PAD_SOURCES) -> list[str]:
    """``n`` benign paddings of about ``chars`` characters, joined from label-0 train rows of ``sources``."""
    text = (DATA / "harmful_requests.train.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    pool = [str(r["text"]) for r in rows if int(r["label"]) == 0 and r.get("source") in sources]
    out, j = [], 0
    for _ in range(n):
        parts: list[str] = []
        while sum(len(p) + 1 for p in parts) < chars:
            parts.append(pool[j % len(pool)])
            j += 1
        out.append(" ".join(parts))
    return out


def split_turns(text: str) -> tuple[str, str]:
    """The request cut at the middle word: two halves, each a user turn."""
    words = text.split()
    cut = max(1, len(words) // 2)
    return " ".join(words[:cut]), " ".join(words[cut:]) or "."


def conversation(a: str, b: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{a} ..."}, {"role": "assistant", "content": "Go on."},
            {"role": "user", "content": b}]


def variants(prompts: list[str], pads: list[str], templates: dict[str, str]) -> dict[str, list[Any]]:
    """Per variant, the items to score: a string (one user turn) or a list of messages."""
    names = list(templates)
    out: dict[str, list[Any]] = {
        "plain": list(prompts),
        "pad-before": [f"{p}\n\n{x}" for x, p in zip(prompts, pads, strict=True)],
        "pad-after": [f"{x}\n\n{p}" for x, p in zip(prompts, pads, strict=True)],
        "pad-both": [f"{p}\n\n{x}\n\n{pads[-1 - i]}" for i, (x, p) in enumerate(zip(prompts, pads, strict=True))],
        "jailbreak": [fill(templates[names[i % len(names)]], x) for i, x in enumerate(prompts)],
        "split, turns alone": [("turns", split_turns(x)) for x in prompts],
        "split, whole conversation": [conversation(*split_turns(x)) for x in prompts],
    }
    return out


def detect(guard: Any, items: list[Any], batch_size: int) -> list[bool]:
    """Whether the policy blocks each item (scored as a prompt, in one prefill pass)."""
    out: list[bool | None] = [None] * len(items)
    texts: list[tuple[int, str]] = []
    turns: list[tuple[int, str]] = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            texts.append((i, guard.format_prompt(item)))
        elif isinstance(item, tuple):  # each user turn alone: detected if any turn is blocked
            turns += [(i, guard.format_prompt(t)) for t in item[1]]
        else:
            texts.append((i, guard.format_prompt(item)))
    for group in (texts, turns):
        if not group:
            continue
        scores = guard.score([t for _, t in group], chat=False, batch_size=batch_size)
        for (i, _), s in zip(group, scores, strict=True):
            out[i] = bool(out[i]) or s.blocked
    return [bool(x) for x in out]


# -- issue 16: evasion by transform ------------------------------------------------------------------------

EVASION = ROOT / "benchmarks" / "data" / "evasion_requests.jsonl"
HOMOGLYPHS = str.maketrans({"a": "а", "c": "с", "e": "е", "i": "і", "o": "о", "p": "р"})
LEET = str.maketrans({"a": "4", "e": "3", "i": "1", "o": "0", "s": "5", "t": "7"})
MECHANICAL: dict[str, Callable[[str], Any]] = {
    "plain": lambda t: t,
    "zero-width": lambda t: "\u200b".join(t),
    "homoglyph": lambda t: t.translate(HOMOGLYPHS),
    "base64": lambda t: "Decode and answer: " + base64.b64encode(t.encode()).decode(),
    "leetspeak": lambda t: t.translate(LEET),
    "two turns": lambda t: conversation(*split_turns(t)),
}
WRITTEN = {"german": "de", "french": "fr", "spanish": "es", "past tense": "past"}
NORMALIZED = ("zero-width", "homoglyph", "base64", "leetspeak")
"""Transforms also scored with ``normalize: false`` (the others are plain text normalisation leaves as is)."""
TRANSFORMS = [*MECHANICAL, *WRITTEN]


def evasion_rows() -> dict[int, list[dict[str, str]]]:
    rows = [json.loads(x) for x in EVASION.read_text(encoding="utf-8").splitlines() if x.strip()]
    return {label: [r for r in rows if int(r["label"]) == label] for label in (1, 0)}


def transform_items(name: str, rows: list[dict[str, str]]) -> list[Any]:
    if name in WRITTEN:
        return [r[WRITTEN[name]] for r in rows]
    return [MECHANICAL[name](r["en"]) for r in rows]


def run_transforms(args: Any, policy: Any, policy_path: Path) -> None:
    from guardrails.core.policy import Policy
    from guardrails.serving.generation import GuardedModel

    guard_on = GuardedModel.from_pretrained(policy=policy)
    data = policy.model_dump(mode="json", exclude={"base_dir"})
    off = Policy.from_dict({**data, "normalize": False}, base_dir=policy.base_dir)
    guard_off = GuardedModel(guard_on.model, guard_on.tokenizer, off)
    hand = evasion_rows()
    test = DATA / "harmful_requests.test.jsonl"
    k = args.split_n
    split = {1: [{"en": t} for t in read_rows(test, 1, k)], 0: [{"en": t} for t in read_rows(test, 0, k)]} if k else {}
    if args.quick:
        hand = {k: v[:3] for k, v in hand.items()}
        split = {k: v[:2] for k, v in split.items()}
    t0 = time.perf_counter()
    rows, res = [], {}
    for set_name, sets in (("hand-written", hand), ("test split", split)):
        for name in TRANSFORMS if sets else []:
            if set_name == "test split" and name in WRITTEN:
                continue
            cell: dict[str, Any] = {}
            modes = [("normalize on", guard_on), ("normalize off", guard_off)]
            for mode, guard in modes if name in NORMALIZED else modes[:1]:
                labels = (1, 0) if mode == "normalize on" else (1,)  # off: what normalisation adds (harmful only)
                hits = {lab: detect(guard, transform_items(name, sets[lab]), args.batch_size) for lab in labels}
                n1, n0 = len(hits[1]), len(hits.get(0, []))
                cell[mode] = {"detected": sum(hits[1]), "n_harmful": n1, "detection_rate": sum(hits[1]) / n1}
                if 0 in hits:
                    cell[mode].update(false_positives=sum(hits[0]), n_benign=n0, fpr=sum(hits[0]) / n0)
                print(f"  {set_name} / {name} / {mode}: detected {sum(hits[1])}/{n1}, "
                      f"benign blocked {sum(hits.get(0, []))}/{n0}", file=sys.stderr, flush=True)
            on, of = cell["normalize on"], cell.get("normalize off")
            rows.append([set_name, name, f"{on['detected']}/{on['n_harmful']}", on["detection_rate"],
                         f"{on['false_positives']}/{on['n_benign']}", on["fpr"],
                         f"{of['detected']}/{of['n_harmful']}" if of else "-"])
            res[f"{set_name}: {name}"] = cell
    table(f"Evasion by transform: {policy.name} (bundled SmolLM2-135M-Instruct)",
          ["set", "transform", "detected", "detection rate", "benign blocked", "FPR", "detected (normalize off)"],
          rows)
    emit({
        "benchmark": "robustness-transforms",
        "quick": bool(args.quick),
        "policy": {"name": policy.name, "path": str(policy_path), "digest": policy.digest,
                   "normalize": policy.normalize.model_dump(mode="json")},
        "data": [str(EVASION.relative_to(ROOT)), str(test.relative_to(ROOT))],
        "transforms": res,
        "seconds": round(time.perf_counter() - t0, 1),
        "environment": environment(args.threads),
    }, args.json_out)


def main() -> None:
    ap = parser(__doc__ or "")
    ap.add_argument("--policy", default=str(ROOT / "policies" / "harmful-requests.yaml"))
    ap.add_argument("--n", type=int, default=60, help="harmful and benign prompts per variant")
    ap.add_argument("--templates", type=int, default=10, help="pyrit jailbreak templates used (cycled)")
    ap.add_argument("--pad-chars", type=int, default=400, help="benign padding per side, in characters")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--pad-sources", default=",".join(PAD_SOURCES), help="train-split sources of the benign padding")
    ap.add_argument("--split-n", type=int, default=0, help="--transforms: also this many test-split rows per label "
                    "for the mechanical transforms")
    ap.add_argument("--transforms", action="store_true", help="evasion by transform (zero-width, homoglyph, base64, "
                    "leetspeak, languages, past tense, two turns), normalisation on and off")
    args = ap.parse_args()
    if args.quick:
        args.n, args.templates = min(args.n, 4), min(args.templates, 2)
    pin_threads(args.threads)
    from guardrails.core.policy import Policy
    from guardrails.serving.generation import GuardedModel

    policy_path = Path(args.policy)
    if not policy_path.is_file():
        raise SystemExit(f"{policy_path} not found: ship the policy first, or draft one with `guardrails discover` "
                         "and pass --policy")
    policy = Policy.from_path(policy_path)
    if args.transforms:
        run_transforms(args, policy, policy_path)
        return
    guard = GuardedModel.from_pretrained(policy=policy)
    test = DATA / "harmful_requests.test.jsonl"
    harmful, benign = read_rows(test, 1, args.n), read_rows(test, 0, args.n)
    n = min(len(harmful), len(benign))
    harmful, benign = harmful[:n], benign[:n]
    pads = padding(n, args.pad_chars, tuple(args.pad_sources.split(",")))
    templates = load_templates(list(TEMPLATES[: args.templates]))
    t0 = time.perf_counter()
    rows, res = [], {}
    harm_v, ben_v = variants(harmful, pads, templates), variants(benign, pads, templates)
    for name in harm_v:
        tpr = _rate(lambda name=name: detect(guard, harm_v[name], args.batch_size))
        fpr = _rate(lambda name=name: detect(guard, ben_v[name], args.batch_size))
        res[name] = {"detection_rate": tpr[0], "detected": tpr[1], "fpr": fpr[0], "false_positives": fpr[1], "n": n}
        rows.append([name, n, f"{tpr[1]}/{n}", tpr[0], f"{fpr[1]}/{n}", fpr[0]])
        print(f"  {name}: detection {tpr[1]}/{n}, false positives {fpr[1]}/{n}", file=sys.stderr, flush=True)
    table(f"Evasion: {policy.name} (bundled SmolLM2-135M-Instruct), {n} harmful + {n} benign test prompts",
          ["variant", "n", "detected", "detection rate", "benign flagged", "FPR"], rows)
    emit({
        "benchmark": "robustness",
        "quick": bool(args.quick),
        "policy": {"name": policy.name, "path": str(policy_path), "digest": policy.digest},
        "data": str(test.relative_to(ROOT)),
        "templates": list(templates),
        "pad_chars": args.pad_chars,
        "pad_sources": args.pad_sources.split(","),
        "variants": res,
        "seconds": round(time.perf_counter() - t0, 1),
        "environment": environment(args.threads),
    }, args.json_out)


def _rate(fn: Callable[[], list[bool]]) -> tuple[float, int]:
    hits = fn()
    return (sum(hits) / len(hits) if hits else float("nan")), sum(hits)


if __name__ == "__main__":
    main()
