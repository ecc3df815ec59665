"""Rows of a labeled data file, as :mod:`guardrails.offline.labeled` reads them: JSONL, CSV, TSV or a JSON array of
objects, any of them gzipped, and Parquet or Arrow (a Hugging Face dataset's files) where pyarrow is installed; each
row named by its place (``file:line``; ``file[i]`` in a JSON array or a table) for errors. What the rows' fields
mean is :mod:`guardrails.offline.labeled`'s business."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from guardrails.core.errors import CalibrationError

ARROW_FORMATS = {".parquet": "read_parquet", ".arrow": "read_feather", ".feather": "read_feather"}
"""Table formats read through pyarrow (the ``data`` extra): Parquet, and Arrow IPC files or streams (``.arrow``: a
``datasets`` ``save_to_disk`` shard; ``.feather``). The values map is pandas' reader, for the conversion the error
names where pyarrow is missing."""
BINARY_FORMATS = {".xlsx": "read_excel", ".xls": "read_excel"}
"""Table formats read only through pandas (not a dependency): the error names the one-line conversion."""


def _convert_hint(p: Path, reader: str) -> str:
    return (f"python -c \"import pandas as pd; pd.{reader}('{p}')"
            f".to_json('{p.with_suffix('.jsonl')}', orient='records', lines=True, force_ascii=False)\"")


def arrow_rows(p: Path, raw: bytes, suffix: str) -> list[tuple[str, dict[str, Any]]]:
    """The rows of a Parquet or Arrow table as dicts (nested lists and structs as Python lists and dicts), named
    ``file[i]``."""
    try:
        import pyarrow as pa
    except ImportError:
        raise CalibrationError(
            f"{p}: reading {suffix[1:]} files needs pyarrow: pip install 'sae-guardrails[data]' (or convert it "
            f"once: {_convert_hint(p, ARROW_FORMATS[suffix])})") from None
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(pa.BufferReader(raw))
        else:
            import pyarrow.ipc as ipc

            try:
                table = ipc.open_file(pa.BufferReader(raw)).read_all()
            except pa.ArrowInvalid:  # the stream format: what datasets' save_to_disk writes
                table = ipc.open_stream(pa.BufferReader(raw)).read_all()
    except (pa.ArrowException, OSError) as exc:
        raise CalibrationError(f"{p}: not a readable {suffix[1:]} file ({exc})") from None
    return [(f"{p}[{i}]", row) for i, row in enumerate(table.to_pylist())]


def read_rows(p: Path, raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """``(where, row)`` of each row, ``where`` being ``file:line`` (``file[i]`` in a JSON array): JSONL; CSV
    (``.csv``) or TSV (``.tsv``), a header row then one row per record; a ``.json`` file holding one array of
    objects (a ``.json`` file of one object per line is JSONL); any of them gzipped (``.jsonl.gz``); or a Parquet or
    Arrow table (``ARROW_FORMATS``, with pyarrow)."""
    suffix = p.suffix.lower()
    if suffix == ".gz":  # data.jsonl.gz, data.csv.gz: read as the name under .gz says
        import gzip

        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise CalibrationError(f"{p}: not gzip data ({exc})") from None
        suffix = Path(p.stem).suffix.lower()
    if suffix in ARROW_FORMATS:
        return arrow_rows(p, raw, suffix)
    if suffix in BINARY_FORMATS:
        raise CalibrationError(
            f"{p}: {suffix[1:]} files are not read directly (data files are JSONL, CSV, TSV, a JSON array, Parquet "
            f"or Arrow); convert it once: {_convert_hint(p, BINARY_FORMATS[suffix])}")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CalibrationError(f"{p}: not UTF-8 text ({exc})") from None
    if suffix in (".csv", ".tsv"):
        import csv
        import io

        kind = suffix[1:].upper()
        delimiter = "\t" if suffix == ".tsv" else ","
        header = text.split("\n", 1)[0]
        if suffix == ".csv" and "," not in header and ";" in header:
            delimiter = ";"  # a spreadsheet's CSV in a locale whose decimal mark is a comma
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
        rows: list[tuple[str, dict[str, Any]]] = []
        try:
            for r in reader:
                if not any((v or "").strip() for v in r.values() if isinstance(v, str)):
                    continue  # a blank line
                if None in r.values() or None in r:  # fewer fields than the header, or more
                    n_fields = sum(v is not None for k, v in r.items() if k is not None) + len(r.get(None) or [])
                    sep = {"\t": "tab", ",": "comma", ";": "semicolon"}[delimiter]
                    raise CalibrationError(f"{p}:{reader.line_num}: the row has {n_fields} fields, the header "
                                           f"{len(reader.fieldnames or [])} (an unquoted {sep}?)")
                rows.append((f"{p}:{reader.line_num}", dict(r)))
        except csv.Error as exc:
            raise CalibrationError(f"{p}:{reader.line_num}: not {kind}: {exc}") from None
        return rows
    if suffix == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CalibrationError(f"{p}: not a JSON array: {exc}") from None
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise CalibrationError(f"{p}[{i}]: expected a JSON object with 'label' and 'text' (or 'prompt', "
                                       f"'response'), got {type(item).__name__}")
        return [(f"{p}[{i}]", item) for i, item in enumerate(items)]
    out: list[tuple[str, dict[str, Any]]] = []
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 is valid JSON text
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CalibrationError(f"{p}:{n}: not JSON: {exc} (data files are JSONL, a JSON array, or CSV/TSV named "
                                   "*.csv/*.tsv)") from None
        if not isinstance(row, dict):
            raise CalibrationError(f"{p}:{n}: expected a JSON object with 'label' and 'text' (or 'prompt', 'response')")
        out.append((f"{p}:{n}", row))
    return out
