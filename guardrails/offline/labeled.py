"""Labeled data files: what ``discover``, ``calibrate`` and ``eval`` read.

JSONL (or CSV, TSV or a JSON array of objects with the same column names): ``{"text", "label"}`` (``prompt`` may
stand for ``text``; input rules read it as the user prompt, output rules as the reply to
``calibrate.CONTINUE_PROMPT``), or ``{"prompt", "response", "label"}``. A row scored in its deployment context
carries it: ``system`` (the system prompt before the row's user turn), or ``messages`` instead of ``text`` (a
conversation of ``{"role", "content"}`` turns ending in the user turn the row is about, or in that turn's assistant
reply, which the row's label is then about, as an answer row's ``response``; earlier turns are context, scored as
serving scores them: input rules read the user and tool turns; ShareGPT's ``conversations`` of ``{"from", "value"}``
turns read the same). A null ``response`` is no response.
:func:`with_system` puts one system prompt before every row (the CLI's ``--system``).

Labels are 0/1, true/false or the words in :data:`LABEL_WORDS` (an empty or null label is an error, never a 0);
optional ``source`` and ``category`` fields feed the per-source and per-category reports (``category`` may be a list of
names or a ``{name: true/false}`` object); any other scalar column can group ``eval --by``. Files may be gzipped.

A file in another layout (a public set's own columns: ``Goal``, ``is_safe``, ``prompt_label`` ...) is read through a
:class:`DataFormat` (:mod:`guardrails.offline.dataformat`): which of its columns holds each field, which label values
mean harmful, one label for every row of a file that has none (a set of harmful requests only), or unlabeled rows left
out.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from guardrails.core.errors import CalibrationError as CalibrationError
from guardrails.offline.datafiles import read_rows
from guardrails.offline.dataformat import FIELDS as FIELDS
from guardrails.offline.dataformat import DataFormat as DataFormat
from guardrails.serving.prompts import Message, check_messages

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                  "model": "assistant", "bot": "assistant", "system": "system", "tool": "tool", "function": "tool",
                  "observation": "tool"}
"""ShareGPT's ``from`` values (``conversations`` rows) as chat roles; another value fails naming the valid roles."""

LABEL_WORDS = {"1": 1, "0": 0, "true": 1, "false": 0, "harmful": 1, "benign": 0, "unsafe": 1, "safe": 0,
               "unharmful": 0, "harmless": 0}
"""Label spellings a data file may use besides 0/1 and JSON true/false (case and spaces ignored)."""


@dataclass(frozen=True)
class LabeledData:
    """Rows of one labeled JSONL file."""

    path: str
    """Where the rows came from."""
    sha256: str
    """sha256 of the file's bytes."""
    texts: list[str]
    """User prompts (``text`` or ``prompt``)."""
    responses: list[str] | None
    """Assistant replies (``response``), or None for text-only files."""
    labels: np.ndarray
    """0/1 labels, int64."""
    sources: list[str]
    """Per-row ``source`` field (empty when absent)."""
    categories: list[str] | None = None
    """Per-row ``category`` field (hazard category; '-' when absent), or None for files without one."""
    fields: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    """Any other scalar column (a ``form``, a ``language``...), per row as text ('-' when absent): what
    ``guardrails eval --by`` can group by besides source and category."""
    contexts: list[list[Message]] | None = None
    """Per row, the turns before its user turn (a system prompt, earlier turns; empty for none), or None when
    no row has any: the row is then its text alone, as one user turn."""
    rows: list[int] = dataclasses.field(default_factory=list)
    """Per row, its 1-based data row in the file (a subset keeps the file's numbers); empty: 1, 2, ..."""
    where: list[str] = dataclasses.field(default_factory=list)
    """Per row, its place in the file as errors name it (``file:line``, ``file[i]`` in a JSON array)."""
    skipped: int = 0
    """Rows of the file left out because their label was empty (``DataFormat.skip_unlabeled``)."""

    def __len__(self) -> int:
        return len(self.texts)

    def prompt(self, i: int, text: str | None = None) -> str | list[Message]:
        """Row ``i``'s prompt as the guard is given it: its text (or ``text``), after its context's turns."""
        t = self.texts[i] if text is None else text
        ctx = self.contexts[i] if self.contexts is not None else []
        return [*ctx, {"role": "user", "content": t}] if ctx else t

    def select(self, idx: Sequence[int] | np.ndarray) -> LabeledData:
        """A subset of rows (hash extended by the row ids so caches never collide)."""
        ix = [int(i) for i in idx]
        h = hashlib.sha256((self.sha256 + ",".join(map(str, ix))).encode()).hexdigest()
        return LabeledData(
            self.path, h, [self.texts[i] for i in ix],
            [self.responses[i] for i in ix] if self.responses is not None else None,
            self.labels[ix], [self.sources[i] for i in ix],
            [self.categories[i] for i in ix] if self.categories is not None else None,
            {k: [v[i] for i in ix] for k, v in self.fields.items()},
            [self.contexts[i] for i in ix] if self.contexts is not None else None,
            [self.row(i) for i in ix], [self.where[i] for i in ix] if self.where else [], self.skipped,
        )

    def row(self, i: int) -> int:
        """Row ``i``'s 1-based data row in its file (the file's number, also in a subset)."""
        return self.rows[i] if self.rows else i + 1


def with_system(data: LabeledData, system: str) -> LabeledData:
    """Every row after the system prompt ``system`` (rows that carry their own system turn keep it): scores as
    a deployment under that system prompt would see them. The hash covers it, so caches never collide."""
    if not isinstance(system, str) or not system.strip():
        raise CalibrationError("--system: empty; give the system prompt text the deployment uses")
    turn: Message = {"role": "system", "content": system}
    ctx = data.contexts if data.contexts is not None else [[] for _ in data.texts]
    new = [c if any(m["role"] == "system" for m in c) else [turn, *c] for c in ctx]
    h = hashlib.sha256(f"{data.sha256}:system:{system}".encode()).hexdigest()
    return dataclasses.replace(data, sha256=h, contexts=new)


def _context(row: dict[str, Any], where: str) -> tuple[str | None, str | None, list[Message]]:
    """``(the user turn's text from 'messages' or None, the assistant reply 'messages' ends in or None, the turns
    before the user turn)`` of a row."""
    ctx: list[Message] = []
    text: str | None = None
    reply: str | None = None
    messages = row.get("messages")
    if messages in (None, "") and row.get("conversations") not in (None, ""):
        messages = row["conversations"]  # ShareGPT's name for the turns
    if messages not in (None, ""):
        if isinstance(messages, str):  # a CSV cell holds the JSON list
            try:
                messages = json.loads(messages)
            except json.JSONDecodeError as exc:
                raise CalibrationError(f"{where}: 'messages' is not a JSON list of turns: {exc}") from None
        if isinstance(messages, list):  # ShareGPT turns: {"from": "human" | "gpt" | ..., "value": ...}
            messages = [{"role": SHAREGPT_ROLES.get(str(m["from"]).lower(), m["from"]), "content": m["value"]}
                        if isinstance(m, dict) and "role" not in m and {"from", "value"} <= set(m) else m
                        for m in messages]
        if "text" in row or "prompt" in row:
            raise CalibrationError(f"{where}: give 'messages' (a conversation ending in the user turn) or "
                                   "'text'/'prompt', not both")
        if not isinstance(messages, list):
            raise CalibrationError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} turns")
        try:
            messages = check_messages(messages)  # the checks every serving entry point makes
        except ValueError as exc:
            raise CalibrationError(f"{where}: 'messages': {exc}") from None
        if messages[-1]["role"] == "assistant":  # the label is the reply's (Llama Guard's convention)
            if row.get("response") not in (None, ""):
                raise CalibrationError(f"{where}: 'messages' ends in an assistant turn and the row has a "
                                       "'response'; give the reply once")
            if len(messages) < 2 or messages[-2]["role"] != "user":
                raise CalibrationError(f"{where}: 'messages' ends in an assistant turn (the labeled reply) that "
                                       "does not follow a user turn")
            reply = messages[-1]["content"]
            messages = messages[:-1]
        if messages[-1]["role"] != "user":
            raise CalibrationError(f"{where}: the last of 'messages' must be the user turn the row is about, or "
                                   "its assistant reply (the row's label is then the reply's), got role "
                                   f"{messages[-1]['role']!r}")
        ctx = messages[:-1]
        text = messages[-1]["content"]
    system = row.get("system")
    if system not in (None, ""):
        if not isinstance(system, str):
            raise CalibrationError(f"{where}: 'system' must be a string (the system prompt), got {system!r:.80}")
        if any(m["role"] == "system" for m in ctx):
            raise CalibrationError(f"{where}: the row has a 'system' column and a system turn in 'messages'; "
                                   "give one")
        ctx = [{"role": "system", "content": system}, *ctx]
    return text, reply, ctx


def load_labeled(
    path: str | os.PathLike[str], *, limit: int | None = None, max_response_chars: int | None = None,
    fmt: DataFormat | None = None,
) -> LabeledData:
    """Read a labeled JSONL, CSV, TSV or JSON-array file (fields: see the module docstring; ``fmt``: a file in
    another layout).

    ``limit`` keeps a stratified random subset (seed 0; each label in proportion); ``max_response_chars``
    cuts responses at a word boundary (the head of a reply is what a guard sees first), and the data
    hash covers the cut.
    """
    p = Path(path)
    if not p.is_file():
        raise CalibrationError(f"data file {str(p)!r} not found")
    raw = p.read_bytes()
    texts: list[str] = []
    responses: list[str] = []
    labels: list[int] = []
    sources: list[str] = []
    categories: list[str] = []
    extra: list[dict[str, str]] = []
    contexts: list[list[Message]] = []
    places: list[str] = []
    has_resp: bool | None = None
    raw_labels: dict[str, int] = {}  # under --positive: each label value read and how often
    skipped = 0
    numbers: list[int] = []  # each kept row's 1-based data row in the file
    for number, (where, row) in enumerate(read_rows(p, raw), 1):
        if fmt is not None and fmt.unlabeled(row):
            skipped += 1
            continue
        numbers.append(number)
        places.append(where)
        if fmt is not None:
            if fmt.positive:
                value = row.get(fmt.label_column)
                key_ = str(value).strip().lower()
                raw_labels[key_] = raw_labels.get(key_, 0) + 1
            row = fmt.apply(row, where)
        if "label" not in row:
            raise CalibrationError(f"{where}: expected 'label' and 'text' (or 'prompt', or 'messages'), or 'prompt', "
                                   f"'response' and 'label'; the row has {sorted(row)} (other column names: "
                                   "--columns text=COLUMN,label=COLUMN; no label column: --label 1 or 0)")
        if row.get("response", "") is None:  # a null reply (a prompt-only row of a prompt + response set)
            row = {k: v for k, v in row.items() if k != "response"}
        said, reply, ctx = _context(row, where)
        if said is not None:
            row = {**{k: v for k, v in row.items() if k != "messages"}, "prompt": said}
        if reply is not None:
            row["response"] = reply
        contexts.append(ctx)
        this_resp = "response" in row
        if has_resp is None:
            has_resp = this_resp
        elif has_resp != this_resp:
            raise CalibrationError(f"{where}: rows mix 'text' and 'prompt'/'response' forms")
        key = "text" if "text" in row else "prompt"
        text = row.get(key)
        if not isinstance(text, str) or not text.strip():
            raise CalibrationError(f"{where}: {key!r} must be a non-empty string (a row needs 'text' or 'prompt')")
        texts.append(text)
        resp = str(row.get("response") or "")
        if max_response_chars is not None and len(resp) > max_response_chars:
            resp = resp[:max_response_chars].rsplit(" ", 1)[0]
        responses.append(resp)
        labels.append(_label(row["label"], where))
        sources.append(str(row.get("source") or ""))
        categories.append(_category(row.get("category"), where))
        extra.append({k: str(v) for k, v in row.items()
                      if k not in FIELDS and isinstance(v, str | int | float | bool) and v != ""})
    if not texts:
        raise CalibrationError(f"{p}: no rows" + (f" ({skipped} unlabeled rows skipped)" if skipped else ""))
    if fmt is not None and fmt.positive and not any(v in fmt.positive for v in raw_labels):
        seen = ", ".join(f"{v!r} ({n})" for v, n in sorted(raw_labels.items(), key=lambda kv: -kv[1])[:10])
        raise CalibrationError(f"{p}: no row's label is one of --positive {','.join(fmt.positive)}; the label "
                               f"column holds {seen}")
    digest = hashlib.sha256(raw).hexdigest()
    if fmt is not None:
        digest = hashlib.sha256(f"{digest}:{fmt.signature()}".encode()).hexdigest()
    if max_response_chars is not None and has_resp:
        digest = hashlib.sha256(f"{digest}:head{max_response_chars}".encode()).hexdigest()
    data = LabeledData(str(p), digest, texts, responses if has_resp else None,
                       np.asarray(labels, dtype=np.int64), sources,
                       categories if any(c != "-" for c in categories) else None,
                       {k: [e.get(k, "-") for e in extra] for k in sorted({k for e in extra for k in e})},
                       contexts if any(contexts) else None, numbers, places, skipped)
    if limit is not None and limit < len(data):
        rng = np.random.default_rng(0)
        keep: list[int] = []
        for lab in (0, 1):
            ids = np.flatnonzero(data.labels == lab)
            n_keep = round(limit * len(ids) / len(data))
            keep += sorted(rng.choice(ids, size=min(len(ids), max(n_keep, 1)), replace=False).tolist())
        data = data.select(sorted(keep))
    return data


def _category(value: Any, where: str) -> str:
    """A row's hazard category as text ('-' for none): a string, a list of names (joined with '+'), or a
    ``{name: true/false}`` object (BeaverTails' layout: the names set true)."""
    if value is None or value == "":
        return "-"
    if isinstance(value, dict):
        if not all(isinstance(v, bool | int) and not isinstance(v, float) for v in value.values()):
            raise CalibrationError(f"{where}: 'category' as an object must map names to true/false, got "
                                   f"{value!r:.120}")
        value = [k for k, v in value.items() if v]
    if isinstance(value, list):
        if not all(isinstance(v, str) for v in value):
            raise CalibrationError(f"{where}: 'category' as a list must hold names, got {value!r:.120}")
        return "+".join(value) or "-"
    if isinstance(value, str | int | float | bool):
        return str(value)
    raise CalibrationError(f"{where}: 'category' must be a name, a list of names or a {{name: true/false}} object, "
                           f"got {type(value).__name__}")


def _label(value: Any, where: str) -> int:
    """0/1 from a row's label: 0/1, true/false, or a word of :data:`LABEL_WORDS`."""
    if value is None or value == "":
        raise CalibrationError(f"{where}: the row has no label ({value!r}); label every row, or pass "
                               "--skip-unlabeled to leave unlabeled rows out")
    if isinstance(value, bool) or value in (0, 1):
        return int(value)
    if isinstance(value, str) and value.strip().lower() in LABEL_WORDS:
        return LABEL_WORDS[value.strip().lower()]
    if isinstance(value, str):  # a numeric column written by pandas: "1.0"
        try:
            number = float(value)
        except ValueError:
            number = None
        if number in (0.0, 1.0):
            return int(number)
    hint = (f"; if {value!r} means harmful, pass --positive {shlex.quote(str(value).strip())} (every other value "
            "then reads as 0)") if isinstance(value, str) and value.strip() else ""
    raise CalibrationError(f"{where}: label must be 0 or 1 (or true/false, {'/'.join(list(LABEL_WORDS)[4:])}), "
                           f"got {value!r}{hint}")
