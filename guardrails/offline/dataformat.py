"""A labeled file in its own layout (a public set's columns: ``Goal``, ``is_safe``, ``prompt_label`` ...), read
through a :class:`DataFormat`: which of its columns holds each field, which label values mean harmful, one label for
every row, or unlabeled rows left out (the CLI's ``--columns``, ``--positive``, ``--label``, ``--skip-unlabeled``).
What the fields then mean is :mod:`guardrails.offline.labeled`'s business."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from guardrails.core.errors import CalibrationError

FIELDS = ("text", "prompt", "response", "label", "source", "category", "system", "messages")
"""The fields a row can have by name (:class:`DataFormat` maps a file's own columns onto them)."""


def _says_safe(column: str) -> bool:
    """A label column whose name says the row is safe (``is_safe``, ``benign``, ``harmless``): its 1 means label 0."""
    words = re.split(r"[^a-z]+", re.sub(r"([a-z])([A-Z])", r"\1_\2", column).lower())
    return any(w in ("safe", "benign", "harmless", "unharmful", "innocuous", "ok", "acceptable") for w in words)


def _empty(value: Any) -> bool:
    """A label cell holding nothing: null, or blank text."""
    return value is None or str(value).strip() == ""


@dataclass(frozen=True)
class DataFormat:
    """How to read a file whose columns are not named as :mod:`guardrails.offline.labeled` expects.

    ``columns``: ``(field, column)`` pairs, the file's ``column`` read as ``field`` (one of :data:`FIELDS`);
    ``positive``: label values (case and spaces ignored) that mean label 1, every other value meaning 0 (an
    ``is_safe`` column: ``positive=("false",)``); ``label``: every row's label, for a file without a label column;
    ``skip_unlabeled``: leave out rows whose label is empty (public sets mix labeled and unlabeled rows: a
    prompt-only row has no answer label), counted in :attr:`LabeledData.skipped`.
    """

    columns: tuple[tuple[str, str], ...] = ()
    positive: tuple[str, ...] = ()
    label: int | None = None
    skip_unlabeled: bool = False

    @classmethod
    def parse(cls, columns: str | None = None, positive: str | None = None, label: int | None = None,
              skip_unlabeled: bool = False) -> DataFormat | None:
        """From the CLI's ``--columns field=column,...``, ``--positive v1,v2``, ``--label 0|1`` and
        ``--skip-unlabeled``; None when all are absent (the file is read by its own column names)."""
        if columns is None and positive is None and label is None and not skip_unlabeled:
            return None
        if skip_unlabeled and label is not None:
            raise CalibrationError("--skip-unlabeled leaves out rows whose label column is empty; --label gives every "
                                   "row one label, so none would be: give one of the two")
        pairs: list[tuple[str, str]] = []
        for part in (columns or "").split(","):
            if not part.strip():
                continue
            field, eq, column = (x.strip() for x in part.partition("="))
            if not eq or not field or not column:
                raise CalibrationError(f"--columns: {part.strip()!r} is not FIELD=COLUMN (e.g. --columns "
                                       "text=Goal,label=is_safe)")
            if field not in FIELDS:
                raise CalibrationError(f"--columns: unknown field {field!r}; valid: {', '.join(FIELDS)}")
            if field in dict(pairs):
                raise CalibrationError(f"--columns: {field!r} is given twice")
            pairs.append((field, column))
        if columns is not None and not pairs:
            raise CalibrationError("--columns: empty; give FIELD=COLUMN pairs (e.g. --columns text=Goal,label=is_safe)")
        if label is not None and label not in (0, 1):
            raise CalibrationError(f"--label must be 0 or 1 (every row's label), got {label}")
        if label is not None and "label" in dict(pairs):
            raise CalibrationError("--label gives every row one label; --columns label=... reads it from a column: "
                                   "give one of the two")
        if label is not None and positive is not None:
            raise CalibrationError("--positive names the label column's harmful values; with --label there is no "
                                   "label column to read")
        mapped = dict(pairs).get("label")
        if mapped is not None and positive is None and _says_safe(mapped):
            raise CalibrationError(
                f"--columns label={mapped}: the column's name says a row is safe, so its true/1/yes would read as "
                f"harmful; give the values that mean harmful: --positive false (or --positive no, 0)")
        pos = tuple(v.strip().lower() for v in (positive or "").split(",") if v.strip())
        if positive is not None and not pos:
            raise CalibrationError("--positive: empty; give the label values that mean harmful (e.g. --positive "
                                   "unsafe or --positive false for an is_safe column)")
        return cls(tuple(pairs), pos, label, skip_unlabeled)

    @property
    def label_column(self) -> str:
        """The file's column read as the label."""
        return dict(self.columns).get("label", "label")

    def unlabeled(self, row: dict[str, Any]) -> bool:
        """Under ``skip_unlabeled``: the row's label column is there and empty (a missing column is an error, not a
        row to skip)."""
        return self.skip_unlabeled and self.label_column in row and _empty(row[self.label_column])

    def apply(self, row: dict[str, Any], where: str) -> dict[str, Any]:
        """``row`` with the mapped columns renamed to their fields and the label rewritten as 0/1."""
        out = dict(row)
        for field, column in self.columns:
            if column not in row:
                raise CalibrationError(f"{where}: no column {column!r} (--columns {field}={column}); the row has "
                                       f"{sorted(row)}")
            out.pop(field, None)  # the file's own column of that name gives way to the mapped one
            out.pop(column, None)
        out.update({field: row[column] for field, column in self.columns})
        if self.label is not None:
            if "label" in out:
                raise CalibrationError(f"{where}: --label {self.label} gives every row one label, but the file has a "
                                       "'label' column; drop --label, or map another column with --columns")
            out["label"] = self.label
        elif self.positive and "label" in out:
            if _empty(out["label"]):
                raise CalibrationError(f"{where}: the label is empty ({out['label']!r}); --positive reads every other "
                                       "value as 0, so an unlabeled row would count as benign: pass --skip-unlabeled "
                                       "to leave such rows out")
            out["label"] = int(str(out["label"]).strip().lower() in self.positive)  # JSON true reads "true"
        return out

    def flags(self) -> str:
        """The CLI flags that read a file this way (for a command line to copy)."""
        import shlex

        out = []
        if self.columns:
            out.append("--columns " + shlex.quote(",".join(f"{f}={c}" for f, c in self.columns)))
        if self.positive:
            out.append("--positive " + shlex.quote(",".join(self.positive)))
        if self.label is not None:
            out.append(f"--label {self.label}")
        if self.skip_unlabeled:
            out.append("--skip-unlabeled")
        return " ".join(out)

    def signature(self) -> str:
        """Part of the data hash: the same file read another way is other data."""
        return json.dumps([self.columns, self.positive, self.label, *(["skip"] if self.skip_unlabeled else [])])
