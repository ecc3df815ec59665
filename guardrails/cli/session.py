"""The workflows' shared state: :class:`Session` (the model, its tokenizer and residual rows per data, layer
and scope, loaded once) and the split files behind ``--data`` (a file, or the prefix of
``<prefix>.{train,cal,test}.jsonl``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from guardrails.offline.calibrate import LabeledData, Scope, residuals_at
from guardrails.offline.dataformat import DataFormat
from guardrails.offline.labeled import load_labeled, with_system

# the options of every command that reads labeled data (discover, calibrate, eval, direction): a file in its own
# layout
ColumnsOption = Annotated[str | None, typer.Option(
    "--columns", help="The file's own column names: FIELD=COLUMN,... (fields: text, prompt, response, label, "
                      "source, category), e.g. text=Goal,label=is_safe")]
PositiveOption = Annotated[str | None, typer.Option(
    "--positive", help="Label values that mean harmful (label 1), comma-separated; every other value is 0 "
                       "(e.g. false for an is_safe column)")]
LabelOption = Annotated[int | None, typer.Option(
    "--label", help="Every row's label (0 or 1), for a file without a label column")]
SkipUnlabeledOption = Annotated[bool, typer.Option(
    "--skip-unlabeled", help="Leave out rows whose label is empty (public sets mix labeled and unlabeled rows, e.g. "
                             "prompt-only rows without an answer label); the count is printed")]
MaxResponseCharsOption = Annotated[int | None, typer.Option(
    "--max-response-chars", min=1, help="Cut responses to this many characters")]
SystemOption = Annotated[str | None, typer.Option(
    "--system", help="Score every row after this system prompt, as a deployment that sends it would (rows with "
                     "their own 'system' or system turn keep theirs); thresholds move with it")]


@dataclass
class Session:
    """The model, its tokenizer, and residuals per (data, layer, scope), loaded once."""

    model_name: str = "bundled"
    progress: bool = True
    dtype: str | None = None
    """Model weights dtype (None: float32). Residual caches are keyed by it; thresholds fitted in one dtype
    hold for serving in that dtype (bfloat16 activations differ from float32 by ~0.6%)."""
    data_format: DataFormat | None = None
    """How to read labeled files in another layout (``--columns``, ``--positive``, ``--label``); None: by name."""
    system: str | None = None
    """A system prompt before every row (``--system``; :func:`guardrails.offline.labeled.with_system`)."""
    _lm: Any = None
    _tok: Any = None
    _rows: dict[tuple[str, int, str], list[Any]] = field(default_factory=dict)

    def lm(self) -> tuple[Any, Any]:
        if self._lm is None:
            from guardrails.serving.models import load_model

            self._lm, self._tok = load_model(None if self.model_name == "bundled" else self.model_name,
                                             dtype=self.dtype)
        return self._lm, self._tok

    def load(self, path: str | Path, *, limit: int | None = None, max_response_chars: int | None = None,
             by_name: bool = False) -> LabeledData:
        """A labeled file, read in the session's :attr:`data_format` (``by_name``: in this repository's layout, for
        a file the user did not write), after its :attr:`system` prompt."""
        data = load_labeled(path, limit=limit, max_response_chars=max_response_chars,
                            fmt=None if by_name else self.data_format)
        if data.skipped:
            n = data.skipped
            typer.echo(f"note: {path}: {n} row{'s' * (n != 1)} with an empty label left out (--skip-unlabeled)",
                       err=True)
        return data if self.system is None else with_system(data, self.system)

    def rows(self, data: LabeledData, layer: int, scope: Scope) -> list[Any]:
        return self.rows_at(data, [layer], scope)[layer]

    def rows_at(self, data: LabeledData, layers: list[int], scope: Scope) -> dict[int, list[Any]]:
        """:meth:`rows` at several layers; the ones not loaded yet come from one forward pass."""
        missing = [L for L in dict.fromkeys(layers) if (data.sha256, L, scope) not in self._rows]
        if missing:
            lm, tok = self.lm()
            got = residuals_at(lm, tok, data, missing, scope, model_name=self.model_name, progress=self.progress)
            for L in missing:
                self._rows[(data.sha256, L, scope)] = got[L]
        return {L: self._rows[(data.sha256, L, scope)] for L in layers}

    def policy_rows(self, data: LabeledData, policy: Any) -> dict[tuple[str, int], list[Any]]:
        """Rows per ``(scope, layer)`` that the policy's rules read (:func:`guardrails.offline.evaluate.rule_row_keys`):
        each rule scores its own layer(s); one forward pass per scope. What
        :func:`guardrails.offline.evaluate.policy_row_scores` scores."""
        from guardrails.offline.evaluate import rule_row_keys

        keys = list(dict.fromkeys(key for r in policy.rules for key in rule_row_keys(policy, r)))
        rows: dict[tuple[str, int], list[Any]] = {}
        for scope in dict.fromkeys(k[0] for k in keys):
            got = self.rows_at(data, [k[1] for k in keys if k[0] == scope], scope)  # type: ignore[arg-type]
            rows.update({(scope, layer): r for layer, r in got.items()})
        return rows

    def rule_rows(self, data: LabeledData, policy: Any, rule: Any, scope: Scope) -> Any:
        """``rows`` at the rule's layer, or ``{layer: rows}`` over a multi-layer rule's layers."""
        from guardrails.core.semantics import rule_layers

        reads = list(rule_layers(policy, rule))
        return self.rows_at(data, reads, scope) if len(reads) > 1 else self.rows(data, reads[0], scope)

    def own_rows(self, data: LabeledData, policy: Any, rule: Any) -> Any:
        """:meth:`rule_rows` in the rule's own scope (a gated rule's gate reads the prompts)."""
        from guardrails.offline.calibrate import rule_scope

        return self.rule_rows(data, policy, rule, rule_scope(rule))

    def guard(self, policy: Any, score_mode: str | None = None, judges: dict[str, Any] | None = None) -> Any:
        from guardrails.serving.generation import GuardedModel

        lm, tok = self.lm()  # without judges a cascade policy's scores still serve (calibration, eval)
        return GuardedModel(lm, tok, policy, score_mode=score_mode, judges=judges, require_judges=judges is not None)


def _split_provenance(session: Session, files: dict[str, Path], cal: LabeledData, test: LabeledData | None,
                      ) -> dict[str, Any]:
    """The record's view of the splits: the train file's hash and the cal/test sources it does not contain
    (held out whole from whatever was fitted on the train split)."""
    if "train" not in files:
        return {}
    train = session.load(files["train"])
    seen = set(cal.sources) | set(test.sources if test is not None else [])
    return {"train_data": {"path": train.path, "sha256": train.sha256},
            "sources_held_out": sorted(s for s in seen - set(train.sources) if s)}


SPLIT_SUFFIXES = (".jsonl", ".csv", ".tsv", ".json", ".jsonl.gz", ".csv.gz", ".tsv.gz", ".json.gz", ".parquet",
                  ".arrow")
"""File endings of labeled data files (JSONL, CSV, TSV, or JSON: one array of objects or JSONL; or gzipped; Parquet
or Arrow with pyarrow)."""


def model_for(policy_paths: list[str], model: str | None) -> str:
    """The model to score with: ``--model`` when given, else the one the policies name (``model:``; none names
    one: the bundled model). Policies naming different models need ``--model``."""
    if model is not None:
        return model
    from guardrails.core.errors import GuardrailsError
    from guardrails.core.policy import Policy

    named = {p: Policy.from_path(p).model or "bundled" for p in policy_paths}
    if len(set(named.values())) > 1:
        raise GuardrailsError("--policy files name different models (" + ", ".join(f"{Path(p).name}: {m}" for p, m in
                                                                                named.items()) + "): give --model")
    return next(iter(named.values()), "bundled")


def split_files(data: str) -> dict[str, Path]:
    """``{"train"|"cal"|"test"|"file": path}`` for a file or a split prefix (``<prefix>.train.jsonl`` ...,
    or ``.csv``)."""
    p = Path(data)
    if p.is_file():
        out: dict[str, Path] = {"file": p}
        for split in ("train", "cal", "test"):
            for ext in SPLIT_SUFFIXES:
                if p.name.endswith(f".{split}{ext}"):
                    base = p.name[: -len(f".{split}{ext}")]
                    out.update({s: p.with_name(f"{base}.{s}{ext}") for s in ("train", "cal", "test")
                                if p.with_name(f"{base}.{s}{ext}").is_file()})
        return out
    for ext in SPLIT_SUFFIXES:
        found = {s: Path(f"{data}.{s}{ext}") for s in ("train", "cal", "test") if Path(f"{data}.{s}{ext}").is_file()}
        if found:
            return found
    raise FileNotFoundError(f"--data {data!r}: no such file, and no {data}.{{train,cal,test}}.jsonl (or .csv, .tsv, "
                            ".json, gzipped, .parquet or .arrow)")


def split_or_file(files: dict[str, Path], data: str, split: str, role: str) -> Path:
    """The file ``--data`` gave, or its prefix's ``split`` file; a prefix without that split fails naming the splits
    it has and what to pass instead (public sets often ship train and test only)."""
    if split in files:
        return files[split]
    if "file" in files:
        return files["file"]
    from guardrails.core.errors import CalibrationError

    found = ", ".join(f"{k} ({v.name})" for k, v in files.items())
    other = next(iter(files.values()))
    ext = next(e for e in sorted(SPLIT_SUFFIXES, key=len, reverse=True) if other.name.endswith(e))
    raise CalibrationError(f"--data {data!r}: the prefix has the splits {found} and no {split} split, which {role}; "
                           f"add {Path(data).name}.{split}{ext} or pass one file (--data {other})")


def _scope_of_data(data: LabeledData, scope: str | None) -> Scope:
    if scope in ("input", "output"):
        return scope  # type: ignore[return-value]
    return "output" if data.responses is not None else "input"
