"""Calibration: thresholds at a target FPR/recall, serving-exact scores, the activation cache, the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from guardrails.core.policy import Policy
from guardrails.offline.calibrate import (
    fit_sparse_weights,
    fit_threshold,
    load_labeled,
    residuals,
    residuals_at,
    text_scores,
)
from guardrails.serving.generation import GuardedModel
from tests.builders import random_sae, tiny_lm, tiny_tokenizer

# -- thresholds -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [0.0, 0.01, 0.05, 0.1, 0.333])
def test_threshold_hits_target_fpr(target: float) -> None:
    rng = np.random.default_rng(3)
    y = np.r_[np.zeros(300, int), np.ones(200, int)]
    s = rng.normal(0, 1, 500) + 2 * y
    t = fit_threshold(s, y, target_fpr=target)
    neg = s[y == 0]
    assert (neg >= t).mean() <= target  # the target holds
    # and the threshold is as low as it can be: the next lower negative score would break the target
    below = np.sort(neg[neg < t])[::-1]
    if len(below):
        assert (neg >= below[0]).mean() > target


@pytest.mark.parametrize("target", [0.5, 0.9, 1.0])
def test_threshold_hits_target_recall(target: float) -> None:
    rng = np.random.default_rng(4)
    y = np.r_[np.zeros(50, int), np.ones(77, int)]
    s = rng.normal(0, 1, 127) + y
    t = fit_threshold(s, y, target_recall=target)
    pos = s[y == 1]
    assert (pos >= t).mean() >= target
    above = np.sort(pos[pos > t])
    if len(above):
        assert (pos >= above[0]).mean() < target  # highest such threshold


def test_threshold_arguments_checked() -> None:
    from guardrails.offline.calibrate import CalibrationError

    with pytest.raises(CalibrationError, match="exactly one"):
        fit_threshold(np.ones(3), np.array([0, 1, 0]))
    with pytest.raises(CalibrationError, match=r"no label-0 \(benign\) rows.*or fit a recall \(--target-recall\)"):
        fit_threshold(np.ones(3), np.ones(3), target_fpr=0.1)
    with pytest.raises(CalibrationError, match=r"no label-1 \(harmful\) rows.*or fit an FPR \(--target-fpr\)"):
        fit_threshold(np.ones(3), np.zeros(3), target_recall=0.9)


def test_sparse_weights_find_planted_features() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    x = np.maximum(rng.normal(0, 1, (400, 50)), 0)
    x[:, 7] += 3 * y
    x[:, 21] += 1.5 * y
    w = fit_sparse_weights(x, y, max_features=2)
    assert set(w) == {7, 21}
    assert w[7] == 1.0 and 0 < w[21] <= 1.0


# -- serving-exact scores on a tiny model ----------------------------------------------------------------


def _policy(sae_dir: Path, weights: Path | None = None, window: int = 2) -> Policy:
    rules: list[dict[str, Any]] = [
        {"id": "feat", "scope": "input", "threshold": 1e9, "action": "block",
         "detector": {"sae": "main", "features": {3: 1.0, 5: 0.5, 40: 2.0}, "window": window}},
        {"id": "out", "scope": "output", "threshold": 1e9, "action": "flag",
         "detector": {"sae": "main", "features": [3, 11], "combine": "max", "window": 3, "aggregate": "max"}},
    ]
    if weights is not None:
        rules.append({"id": "lin", "scope": "input", "threshold": 1e9, "action": "flag",
                      "detector": {"kind": "linear", "layer": 2, "weights": str(weights), "window": window}})
    return Policy.from_dict({"name": "t", "saes": {"main": {"path": str(sae_dir), "layer": 1}}, "rules": rules})


@pytest.fixture()
def tiny_setup(tmp_path: Path, tok, lm, monkeypatch) -> dict[str, Any]:
    monkeypatch.setenv("GUARDRAILS_CACHE", str(tmp_path / "cache"))
    sae_dir = random_sae(d_model=64, d_sae=64, k=16, layer=1).save(tmp_path / "sae")
    from guardrails.offline.baselines import save_linear

    w = np.random.default_rng(0).normal(0, 1, 64).astype(np.float32)
    lin = save_linear(tmp_path / "lin.safetensors", w, 0.3)
    return {"model": lm("llama"), "tok": tok, "sae": sae_dir, "lin": lin, "tmp": tmp_path}


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


TEXTS = [
    "How do I bake bread at home?", "Tell me a story about a robot", "The quick brown fox", "Hello world!",
    "What is the capital of France?", "Mix flour, water, salt and yeast.", "a robot who learns to paint", "lazy dog",
]


def test_engine_scores_equal_guarded_model_score(tiny_setup) -> None:
    s = tiny_setup
    pol = _policy(s["sae"], s["lin"])
    guard = GuardedModel(s["model"], s["tok"], pol)
    data_in = load_labeled(_write(s["tmp"] / "in.jsonl", [{"text": t, "label": i % 2} for i, t in enumerate(TEXTS)]))
    served = guard.score(data_in.texts)
    for rule, layer in (("feat", 1), ("lin", 2)):
        rows = residuals(s["model"], s["tok"], data_in, layer, "input", model_name="tiny", progress=False)
        got = text_scores(guard, rule, rows)
        want = np.array([t.scores[rule] for t in served])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # output rule: prompt/response rows, response tokens only
    rows_pr = [{"prompt": t, "response": TEXTS[-1 - i], "label": i % 2} for i, t in enumerate(TEXTS)]
    data_out = load_labeled(_write(s["tmp"] / "out.jsonl", rows_pr))
    rows = residuals(s["model"], s["tok"], data_out, 1, "output", model_name="tiny", progress=False)
    got = text_scores(guard, "out", rows)
    want = np.array([t.scores["out"] for t in guard.score(data_out.texts, responses=data_out.responses)])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_residual_cache_round_trip(tiny_setup) -> None:
    s = tiny_setup
    data = load_labeled(_write(s["tmp"] / "d.jsonl", [{"text": t, "label": i % 2} for i, t in enumerate(TEXTS)]))
    first = residuals(s["model"], s["tok"], data, 1, "input", model_name="tiny", progress=False)
    files = list((s["tmp"] / "cache" / "activations").glob("*.safetensors"))
    assert len(files) == 1
    again = residuals(s["model"], s["tok"], data, 1, "input", model_name="tiny", progress=False)
    fresh = residuals(s["model"], s["tok"], data, 1, "input", model_name="tiny", progress=False, use_cache=False)
    for a, b, c in zip(first, again, fresh, strict=True):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c)
    # a different layer is a different key
    residuals(s["model"], s["tok"], data, 2, "input", model_name="tiny", progress=False)
    assert len(list((s["tmp"] / "cache" / "activations").glob("*.safetensors"))) == 2


def test_residuals_at_several_layers_one_pass(tiny_setup, monkeypatch) -> None:
    """Layers not cached yet come from one forward pass, each cached under its single-layer key."""
    import guardrails.offline.activations as acts

    s = tiny_setup
    data = load_labeled(_write(s["tmp"] / "m.jsonl", [{"text": t, "label": i % 2} for i, t in enumerate(TEXTS)]))
    one = {L: residuals(s["model"], s["tok"], data, L, "input", model_name="tiny", progress=False, use_cache=False)
           for L in (1, 2)}
    calls: list[list[int]] = []
    real = acts.collect_residuals
    monkeypatch.setattr(acts, "collect_residuals", lambda *a, **k: calls.append(list(a[3])) or real(*a, **k))
    both = residuals_at(s["model"], s["tok"], data, [2, 1, 2], "input", model_name="tiny", progress=False)
    assert calls == [[2, 1]] and list(both) == [2, 1]
    for L in (1, 2):
        assert both[L].positions is not None
        for a, b in zip(both[L], one[L], strict=True):
            torch.testing.assert_close(a, b)
    again = residuals(s["model"], s["tok"], data, 1, "input", model_name="tiny", progress=False)
    assert calls == [[2, 1]]  # a cache hit per layer
    for a, b in zip(again, both[1], strict=True):
        assert torch.equal(a, b)


def test_load_labeled_errors(tmp_path: Path) -> None:
    from guardrails.offline.calibrate import CalibrationError

    with pytest.raises(CalibrationError, match=r"bad.jsonl:2: label must be 0 or 1"):
        load_labeled(_write(tmp_path / "bad.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 3}]))
    with pytest.raises(CalibrationError, match="mix"):
        load_labeled(_write(tmp_path / "mix.jsonl", [{"text": "a", "label": 0},
                                                     {"prompt": "b", "response": "c", "label": 1}]))
    with pytest.raises(CalibrationError, match=r"no_label.jsonl:1: expected 'label'.*\['prompt'\]"):
        load_labeled(_write(tmp_path / "no_label.jsonl", [{"prompt": "a"}]))
    with pytest.raises(CalibrationError, match=r"word.jsonl:1: label must be 0 or 1 \(or true/false, harmful/benign"):
        load_labeled(_write(tmp_path / "word.jsonl", [{"text": "a", "label": "maybe"}]))
    with pytest.raises(CalibrationError, match=r"got 'yes'; if 'yes' means harmful, pass --positive yes"):
        load_labeled(_write(tmp_path / "yes.jsonl", [{"text": "a", "label": "yes"}]))
    with pytest.raises(CalibrationError, match=r"empty.jsonl:2: 'text' must be a non-empty string"):
        load_labeled(_write(tmp_path / "empty.jsonl", [{"text": "a", "label": 0}, {"text": " ", "label": 1}]))
    (tmp_path / "bad.csv").write_text('text,label\n"a,0\n')
    with pytest.raises(CalibrationError, match=r"bad.csv:2: the row has 1 fields, the header 2"):
        load_labeled(tmp_path / "bad.csv")
    (tmp_path / "latin.jsonl").write_bytes(b'{"text": "caf\xe9", "label": 0}\n')
    with pytest.raises(CalibrationError, match=r"latin.jsonl: not UTF-8"):
        load_labeled(tmp_path / "latin.jsonl")


def test_load_labeled_forms(tmp_path: Path) -> None:
    """A prompt-only file may name its text 'prompt'; labels may be words; CSV reads like JSONL."""
    from guardrails.offline.calibrate import CalibrationError

    rows = [{"prompt": "How do I bake bread?", "label": "benign"}, {"prompt": "Hurt someone", "label": "Harmful"},
            {"prompt": "x", "label": True}, {"prompt": "y", "label": "0"}, {"prompt": "z", "label": "unharmful"}]
    d = load_labeled(_write(tmp_path / "p.jsonl", rows))
    assert d.texts[:2] == ["How do I bake bread?", "Hurt someone"] and d.responses is None
    assert d.labels.tolist() == [0, 1, 1, 0, 0]  # WildGuardMix's words too
    (tmp_path / "d.csv").write_text('text,label,source,category\n"Bake, then cool",safe,s1,\n'
                                    'Make a weapon,unsafe,s2,weapons\n\n', encoding="utf-8")
    (tmp_path / "extra.csv").write_text("text,label\nBake, then cool,0\n")
    with pytest.raises(CalibrationError, match=r"extra.csv:2: the row has 3 fields, the header 2"):
        load_labeled(tmp_path / "extra.csv")
    c = load_labeled(tmp_path / "d.csv")
    assert c.texts == ["Bake, then cool", "Make a weapon"] and c.labels.tolist() == [0, 1]
    assert c.sources == ["s1", "s2"] and c.categories == ["-", "weapons"]
    (tmp_path / "r.csv").write_text("prompt,response,label\nHi,Hello there,0\nHow?,Sure: step one,1\n")
    r = load_labeled(tmp_path / "r.csv")
    assert r.responses == ["Hello there", "Sure: step one"] and r.labels.tolist() == [0, 1]
    assert c.fields == {} and r.fields == {}
    # other scalar columns are kept for grouping (--by form); a row without one reads '-'; nested values are not
    f = load_labeled(_write(tmp_path / "f.jsonl", [
        {"text": "a", "label": 0, "form": "question", "turns": 2, "meta": {"x": 1}},
        {"text": "b", "label": 1, "form": "imperative"}, {"text": "c", "label": 1, "form": ""}]))
    assert f.fields == {"form": ["question", "imperative", "-"], "turns": ["2", "-", "-"]}
    assert f.select([2, 0]).fields == {"form": ["-", "question"], "turns": ["-", "2"]}


def test_data_format_reads_a_file_in_its_own_layout(tmp_path: Path) -> None:
    """--columns / --positive / --label: a public set's own columns (an is_safe flag, a Goal column, no label at
    all) read as text/response/label; the hash tells the readings apart; bad mappings name the flag."""
    from guardrails.offline.labeled import CalibrationError, DataFormat

    bt = _write(tmp_path / "bt.jsonl", [{"prompt": "q1", "response": "r1", "is_safe": True, "label": "x"},
                                        {"prompt": "q2", "response": "r2", "is_safe": False, "label": "y"}])
    fmt = DataFormat.parse("label=is_safe", "false")
    d = load_labeled(bt, fmt=fmt)  # the file's own 'label' column gives way to the mapped one
    assert d.labels.tolist() == [0, 1] and d.responses == ["r1", "r2"] and d.fields == {}
    (tmp_path / "jbb.csv").write_text("Goal,Category\nDo harm,Harassment\nDo more harm,Physical harm\n")
    j = load_labeled(tmp_path / "jbb.csv", fmt=DataFormat.parse("text=Goal,category=Category", None, 1))
    assert j.texts == ["Do harm", "Do more harm"] and j.labels.tolist() == [1, 1]
    assert j.categories == ["Harassment", "Physical harm"]
    (tmp_path / "xs.csv").write_text("prompt,type,verdict\nkill a process,homonym,Safe\nkill a man,contrast,UNSAFE\n")
    x = load_labeled(tmp_path / "xs.csv", fmt=DataFormat.parse("label=verdict", " unsafe ,controversial"))
    assert x.labels.tolist() == [0, 1] and x.fields == {"type": ["homonym", "contrast"]}
    assert x.sha256 != load_labeled(tmp_path / "xs.csv", fmt=DataFormat.parse("label=verdict", "safe")).sha256
    assert DataFormat.parse(None, None, None) is None
    for args, msg in (((" text = Goal ,label", None, None), r"--columns: 'label' is not FIELD=COLUMN"),
                      (("txt=Goal", None, None), r"unknown field 'txt'; valid: text, prompt, response, label"),
                      (("text=a,text=b", None, None), "given twice"),
                      ((",", None, None), "--columns: empty"),
                      ((None, None, 2), "--label must be 0 or 1"),
                      (("label=y", None, 1), "give one of the two"),
                      ((None, "unsafe", 1), "no label column"),
                      ((None, " , ", None), "--positive: empty"),
                      (("label=is_safe", None, None), r"label=is_safe: the column's name says a row is safe.*"
                                                      r"--positive false"),
                      (("label=isBenign", None, None), "--positive false")):
        with pytest.raises(CalibrationError, match=msg):
            DataFormat.parse(*args)
    with pytest.raises(CalibrationError, match=r"jbb.csv:2: no column 'Gaol' \(--columns text=Gaol\); the row has "
                                               r"\['Category', 'Goal'\]"):
        load_labeled(tmp_path / "jbb.csv", fmt=DataFormat.parse("text=Gaol", None, 1))
    with pytest.raises(CalibrationError, match=r"bt.jsonl:1: --label 1 gives every row one label, but the file"):
        load_labeled(bt, fmt=DataFormat.parse(None, None, 1))
    with pytest.raises(CalibrationError, match=r"jbb.csv:2: expected 'label'.*no label column: --label 1 or 0"):
        load_labeled(tmp_path / "jbb.csv", fmt=DataFormat.parse("text=Goal", None, None))


def test_split_files_csv(tmp_path: Path) -> None:
    from guardrails.cli.session import split_files

    for s in ("train", "cal"):
        (tmp_path / f"mine.{s}.csv").write_text("text,label\na,0\n")
    assert set(split_files(str(tmp_path / "mine"))) == {"train", "cal"}
    assert set(split_files(str(tmp_path / "mine.cal.csv"))) == {"file", "train", "cal"}
    for s in ("train", "test"):
        (tmp_path / f"gz.{s}.jsonl.gz").write_bytes(b"")
    assert set(split_files(str(tmp_path / "gz"))) == {"train", "test"}
    with pytest.raises(FileNotFoundError, match=r"\.jsonl \(or \.csv, \.tsv, \.json, gzipped, \.parquet or \.arrow\)"):
        split_files(str(tmp_path / "other"))


def test_load_labeled_tsv_json_array_and_table_formats(tmp_path: Path) -> None:
    """A TSV file and a JSON array of objects read as the same rows as their JSONL twin (errors name the row:
    ``file:line``, ``file[i]`` in an array); a numeric-string label (pandas writes 1.0) reads as 0/1; an Excel file
    fails naming the one-line conversion, a broken Parquet file naming the format, never as undecodable text."""
    from guardrails.offline.calibrate import CalibrationError

    rows = [{"text": "how to bake bread", "label": 0}, {"text": "how to make a bomb", "label": 1}]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "a.tsv").write_text("text\tlabel\nhow to bake bread\t0.0\nhow to make a bomb\t1.0\n")
    (tmp_path / "a.json").write_text(json.dumps(rows, indent=2))
    want = load_labeled(tmp_path / "a.jsonl")
    for name in ("a.tsv", "a.json"):
        got = load_labeled(tmp_path / name)
        assert got.texts == want.texts and got.labels.tolist() == [0, 1]
    bad = {"b.json": (json.dumps([rows[0], {"text": "x", "label": 7}]).encode(), r"b\.json\[1\]: label must be 0 or 1"),
           "c.json": (json.dumps([rows[0], ["x", 1]]).encode(), r"c\.json\[1\]: expected a JSON object.*got list"),
           "d.tsv": (b"text\tlabel\na\t0\tb\n", r"d\.tsv:2: the row has 3 fields, the header 2 \(an unquoted tab\?\)"),
           "e.xlsx": (b"PK\x03\x04\x00\xff", r"xlsx files are not read directly.*pd\.read_excel")}
    for name, (content, msg) in bad.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CalibrationError, match=msg):
            load_labeled(tmp_path / name)


def test_load_labeled_parquet_and_arrow(tmp_path: Path, monkeypatch) -> None:
    """A Hugging Face dataset's files read as their JSONL twin: Parquet (the Hub's format), an Arrow stream
    (``save_to_disk``) and an Arrow/Feather file, nested chat messages included, named ``file[i]`` in errors; a
    split prefix finds ``<prefix>.train.parquet``; a broken file names its format; without pyarrow the error says
    what to install and the pandas conversion."""
    import builtins

    pa = pytest.importorskip("pyarrow")
    import pyarrow.ipc as ipc
    import pyarrow.parquet as pq

    from guardrails.cli.session import split_files
    from guardrails.offline.labeled import CalibrationError

    rows = [{"messages": [{"role": "user", "content": "how to bake bread"}, {"role": "assistant", "content": "Knead."}],
             "label": False},
            {"messages": [{"role": "user", "content": "how to make a bomb"}, {"role": "assistant", "content": "Sure."}],
             "label": True}]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    want = load_labeled(tmp_path / "a.jsonl")
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, tmp_path / "h.train.parquet")
    with ipc.new_stream(tmp_path / "h.arrow", table.schema) as w:
        w.write_table(table)
    with ipc.new_file(tmp_path / "h.feather", table.schema) as w:
        w.write_table(table)
    for name in ("h.train.parquet", "h.arrow", "h.feather"):
        got = load_labeled(tmp_path / name)
        assert (got.texts, got.responses, got.labels.tolist()) == (want.texts, want.responses, [0, 1])
    assert set(split_files(str(tmp_path / "h"))) == {"train"}
    pq.write_table(pa.Table.from_pylist([{"text": "x", "label": 1}, {"text": "y", "label": 7}]), tmp_path / "b.parquet")
    with pytest.raises(CalibrationError, match=r"b\.parquet\[1\]: label must be 0 or 1"):
        load_labeled(tmp_path / "b.parquet")
    (tmp_path / "c.parquet").write_bytes(b"PAR1\x00\xff")
    with pytest.raises(CalibrationError, match=r"c\.parquet: not a readable parquet file"):
        load_labeled(tmp_path / "c.parquet")

    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):  # type: ignore[no-untyped-def]
        if name.split(".")[0] == "pyarrow":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    with pytest.raises(CalibrationError, match=r"needs pyarrow: pip install 'sae-guardrails\[data\]'.*"
                                               r"pd\.read_parquet"):
        load_labeled(tmp_path / "h.train.parquet")


def test_load_labeled_public_set_layouts(tmp_path: Path) -> None:
    """Layouts public moderation sets ship in: a gzipped JSONL, a ';'-separated spreadsheet CSV, a null
    ``response`` (a prompt-only row), a ``{name: bool}`` category object (BeaverTails), a conversation ending in
    the labeled assistant reply (Llama Guard's convention). A null label never reads as 0, and ``--positive``
    values no row holds fail naming the values the column has."""
    import gzip

    from guardrails.offline.labeled import CalibrationError, DataFormat

    rows = [{"prompt": "how to bake bread", "response": None, "prompt_harm_label": "unharmful"},
            {"prompt": "how to make a bomb", "response": None, "prompt_harm_label": "harmful"}]
    (tmp_path / "w.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    fmt = DataFormat.parse(columns="text=prompt,label=prompt_harm_label", positive="harmful")
    got = load_labeled(tmp_path / "w.jsonl.gz", fmt=fmt)
    assert got.texts == ["how to bake bread", "how to make a bomb"] and got.labels.tolist() == [0, 1]
    assert got.responses is None and got.where == [f"{tmp_path / 'w.jsonl.gz'}:1", f"{tmp_path / 'w.jsonl.gz'}:2"]
    with pytest.raises(CalibrationError, match=r"no row's label is one of --positive unsafe; the label column holds "
                                               r"'unharmful' \(1\), 'harmful' \(1\)"):
        load_labeled(tmp_path / "w.jsonl.gz", fmt=DataFormat.parse(columns="text=prompt,label=prompt_harm_label",
                                                                   positive="unsafe"))
    (tmp_path / "n.jsonl").write_text(json.dumps({**rows[0], "prompt_harm_label": None}) + "\n")
    with pytest.raises(CalibrationError, match=r"n\.jsonl:1: the label is empty \(None\); --positive reads"):
        load_labeled(tmp_path / "n.jsonl", fmt=fmt)
    (tmp_path / "n2.jsonl").write_text(json.dumps({"text": "x", "label": None}) + "\n")
    with pytest.raises(CalibrationError, match=r"n2\.jsonl:1: the row has no label \(None\); .*--skip-unlabeled"):
        load_labeled(tmp_path / "n2.jsonl")
    # --skip-unlabeled: WildGuardMix's prompt-only rows have no answer label; they are left out and counted, and
    # the kept rows keep their file row numbers
    mix = [{"prompt": "how to make a bomb", "response": "Sure: mix the powders.", "response_harm_label": "harmful"},
           {"prompt": "how to bake bread", "response": None, "response_harm_label": None},
           {"prompt": "how to make a bomb", "response": "I can't help.", "response_harm_label": "unharmful"}]
    (tmp_path / "mix.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mix))
    skip = DataFormat.parse(columns="label=response_harm_label", positive="harmful", skip_unlabeled=True)
    assert skip is not None and skip.flags().endswith("--skip-unlabeled")
    got = load_labeled(tmp_path / "mix.jsonl", fmt=skip)
    assert got.labels.tolist() == [1, 0] and got.skipped == 1 and [got.row(i) for i in range(2)] == [1, 3]
    assert got.responses == ["Sure: mix the powders.", "I can't help."] and got.select([1]).skipped == 1
    assert DataFormat.parse(skip_unlabeled=True) == DataFormat(skip_unlabeled=True)
    (tmp_path / "none.jsonl").write_text(json.dumps(mix[1]) + "\n")
    with pytest.raises(CalibrationError, match=r"no rows \(1 unlabeled rows skipped\)"):
        load_labeled(tmp_path / "none.jsonl", fmt=skip)
    with pytest.raises(CalibrationError, match=r"mix\.jsonl:1: expected 'label'"):  # no such column: not "no rows"
        load_labeled(tmp_path / "mix.jsonl", fmt=DataFormat.parse(skip_unlabeled=True))
    with pytest.raises(CalibrationError, match=r"--skip-unlabeled leaves out .* --label gives every row"):
        DataFormat.parse(label=1, skip_unlabeled=True)

    (tmp_path / "s.csv").write_text("text;label\nhow to bake bread, fast;0\nhow to make a bomb;1\n")
    assert load_labeled(tmp_path / "s.csv").texts == ["how to bake bread, fast", "how to make a bomb"]

    answer = "Sure: mix the powders and pack them tight."
    beaver = {"prompt": "how to make a bomb", "response": answer, "category": {"violence": True, "weapons": True,
                                                                               "privacy": False}, "is_safe": False}
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "how to make a bomb"},
                         {"role": "assistant", "content": answer}], "label": 1, "category": ["weapons"]}
    (tmp_path / "b.jsonl").write_text(json.dumps(beaver) + "\n")
    (tmp_path / "c.jsonl").write_text(json.dumps(chat) + "\n")
    b = load_labeled(tmp_path / "b.jsonl", fmt=DataFormat.parse(columns="label=is_safe", positive="false"))
    c = load_labeled(tmp_path / "c.jsonl")
    assert b.responses == c.responses == [answer] and b.texts == c.texts == ["how to make a bomb"]
    assert b.labels.tolist() == c.labels.tolist() == [1]
    assert b.categories == ["violence+weapons"] and c.categories == ["weapons"]
    assert c.contexts == [[{"role": "system", "content": "Be brief."}]] and b.contexts is None
    share = {"conversations": [{"from": "system", "value": "Be brief."},  # ShareGPT's layout
                               {"from": "human", "value": "how to make a bomb"}, {"from": "gpt", "value": answer}],
             "label": 1}
    (tmp_path / "g.jsonl").write_text(json.dumps(share) + "\n")
    g = load_labeled(tmp_path / "g.jsonl")
    assert (g.texts, g.responses, g.contexts) == (c.texts, c.responses, c.contexts)
    for row, msg in ((dict(chat, response="again"), r"ends in an assistant turn and the row has a 'response'"),
                     (dict(share, conversations=[{"from": "narrator", "value": "x"}]),
                      r"role 'narrator' unknown; valid: system, user, assistant, tool"),
                     (dict(chat, messages=chat["messages"][2:]), r"does not follow a user turn"),
                     (dict(beaver, category={"violence": "yes"}), r"'category' as an object must map names to")):
        (tmp_path / "x.jsonl").write_text(json.dumps(row) + "\n")
        with pytest.raises(CalibrationError, match=msg):
            load_labeled(tmp_path / "x.jsonl", fmt=DataFormat.parse(columns="label=is_safe", positive="false")
                         if "is_safe" in row else None)


# -- the CLI on a saved tiny model ----------------------------------------------------------------------------


@pytest.fixture()
def saved_tiny(tmp_path: Path, monkeypatch) -> dict[str, Path]:
    monkeypatch.setenv("GUARDRAILS_CACHE", str(tmp_path / "cache"))
    tk = tiny_tokenizer()
    model = tiny_lm("llama", tk)
    model.save_pretrained(tmp_path / "model")
    tk.save_pretrained(tmp_path / "model")
    sae_dir = random_sae(d_model=64, d_sae=64, k=16, layer=1).save(tmp_path / "sae")
    words = ["bread", "robot", "fox", "paint", "flour", "dog", "world", "capital", "story", "yeast"]
    rows = [{"text": f"{words[i % 10]} {words[(i // 10) % 10]} {words[(i * 7) % 10]}", "label": int(i % 3 == 0)}
            for i in range(60)]
    for split, part in (("train", rows[:30]), ("cal", rows[30:45]), ("test", rows[45:])):
        _write(tmp_path / f"toy.{split}.jsonl", part)
    pol = {"name": "toy", "saes": {"main": {"path": str(sae_dir), "layer": 1}},
           "rules": [{"id": "r", "scope": "input", "threshold": 0.0, "action": "block",
                      "detector": {"sae": "main", "features": [1, 2, 3], "window": 2}}]}
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(pol))
    return {"tmp": tmp_path, "model": tmp_path / "model", "policy": tmp_path / "toy.yaml"}


def _cli(args: list[str]) -> Any:
    from typer.testing import CliRunner

    from guardrails.cli.main import _register_extensions, app

    _register_extensions()
    return CliRunner().invoke(app, args)


def thr_of(path: Path) -> float:
    return float(Policy.from_path(path).rules[0].threshold)


def test_cli_calibrate_then_eval(saved_tiny) -> None:
    t = saved_tiny
    out = t["tmp"] / "toy.cal.yaml"
    res = _cli(["calibrate", "--policy", str(t["policy"]), "--data", str(t["tmp"] / "toy"), "--target-fpr", "0.1",
                "--model", str(t["model"]), "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout.strip().splitlines()[-1])
    record = out.with_suffix(".record.json")  # next to --out, never in the package's data
    assert rep["record"] == str(record) and json.loads(record.read_text())["rules"]["r"]["threshold"] == thr_of(out)
    pol = Policy.from_path(out)
    thr = pol.rules[0].threshold
    assert rep["rules"]["r"]["threshold"] == thr
    assert rep["rules"]["r"]["serving_check_max_rel_diff"] < 1e-3
    # independent check through the serving path: FPR on the cal split at the written threshold <= 0.1
    from guardrails.serving.models import load_model

    model, tk = load_model(str(t["model"]))
    cal = load_labeled(t["tmp"] / "toy.cal.jsonl")
    scores = np.array([s.scores["r"] for s in GuardedModel(model, tk, pol).score(cal.texts)])
    assert (scores[cal.labels == 0] >= thr).mean() <= 0.1
    assert pol.calibration is not None and pol.calibration["r"]["data_sha256"] == cal.sha256

    res = _cli(["eval", "--policy", str(out), "--data", str(t["tmp"] / "toy.test.jsonl"), "--json", "--baselines",
                "--model", str(t["model"])])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout.strip().splitlines()[-1])
    for key in ("auroc", "auprc", "tpr_at_1pct_fpr", "tpr_at_5pct_fpr", "f1", "fpr", "tpr"):
        assert key in got
    test = load_labeled(t["tmp"] / "toy.test.jsonl")
    ts = np.array([s.scores["r"] for s in GuardedModel(model, tk, pol).score(test.texts)])
    from sklearn.metrics import roc_auc_score

    assert got["auroc"] == pytest.approx(roc_auc_score(test.labels, ts), abs=1e-4)
    assert got["fpr"] == pytest.approx((ts[test.labels == 0] >= thr).mean(), abs=1e-4)
    assert set(got["baselines"]) >= {"keyword"}
    assert any(k.startswith("probe") for k in got["baselines"])
    assert "in_sample" not in got  # the test split: rows the threshold never saw
    # the baselines' thresholds are fitted as the rule's: on the cal split at the rule's target (FPR 0.1 here), so on
    # that split no fitted baseline fires on more than 10% of the label-0 rows
    assert "toy.cal.jsonl" in got["baselines_thresholds"] and "FPR 0.1 on" in got["baselines_thresholds"]
    assert "the rule's target" in got["baselines_thresholds"]
    res = _cli(["eval", "--policy", str(out), "--data", str(t["tmp"] / "toy.cal.jsonl"), "--json", "--baselines",
                "--model", str(t["model"])])
    on_cal = json.loads(res.stdout.strip().splitlines()[-1])["baselines"]
    fitted = {k: v["fpr"] for k, v in on_cal.items() if k != "keyword"}
    assert len(fitted) == 2 and max(fitted.values()) <= 0.1, fitted
    res = _cli(["eval", "--policy", str(out), "--data", str(t["tmp"] / "toy.cal.jsonl"), "--model", str(t["model"])])
    assert res.exit_code == 0, res.output
    assert "were fitted on this file" in res.output and "in-sample" in res.output
    # the same rows in another layout: read through --columns / --positive, the same numbers
    own = [{"Question": q, "flag": "bad" if y else "ok"} for q, y in zip(test.texts, test.labels, strict=True)]
    _write(t["tmp"] / "own.jsonl", own)
    res = _cli(["eval", "--policy", str(out), "--data", str(t["tmp"] / "own.jsonl"), "--json", "--model",
                str(t["model"]), "--columns", "text=Question,label=flag", "--positive", "bad"])
    assert res.exit_code == 0, res.output
    again = json.loads(res.stdout.strip().splitlines()[-1])
    assert {k: again[k] for k in ("auroc", "fpr", "tpr", "n")} == {k: got[k] for k in ("auroc", "fpr", "tpr", "n")}
    assert "baselines_note" not in got  # toy.test.jsonl has its train split beside it
    # a file without a train split (an independent set): the probe and DiffMean baselines are fitted on the train
    # split the rule's calibration record names, the rows the rule was fitted beside, and the output says so
    own_args = ["eval", "--policy", str(out), "--data", str(t["tmp"] / "own.jsonl"), "--model", str(t["model"]),
                "--columns", "text=Question,label=flag", "--positive", "bad", "--baselines"]
    res = _cli([*own_args, "--json"])
    assert res.exit_code == 0, res.output
    indep = json.loads(res.stdout.strip().splitlines()[-1])
    assert Path(indep["baselines_train"]["path"]).resolve() == (t["tmp"] / "toy.train.jsonl").resolve()
    assert "calibration record" in indep["baselines_train"]["from"] and "baselines_note" not in indep
    aurocs = [{k: v["auroc"] for k, v in r["baselines"].items()} for r in (indep, got)]
    assert aurocs[0] == aurocs[1]  # the same train rows as the sibling split's: the same baselines
    # a record whose train split changed since (another sha256): only the keyword baseline runs, and the output
    # says why the others did not and how to give one
    rec = json.loads(record.read_text())
    rec["rules"]["r"]["train_data"]["sha256"] = "0" * 64
    record.write_text(json.dumps(rec))
    res = _cli(own_args)
    assert res.exit_code == 0, res.output
    assert "only the keyword baseline ran" in res.output and "has changed since" in " ".join(res.output.split())
    assert "--train FILE" in res.output
    res = _cli(["eval", "--policy", str(out), "--data", str(t["tmp"] / "own.jsonl"), "--model", str(t["model"])])
    assert res.exit_code == 2 and "--columns text=COLUMN,label=COLUMN" in res.output
    res = _cli(["calibrate", "--policy", str(out), "--data", str(t["tmp"] / "own.jsonl"), "--model", str(t["model"]),
                "--columns", "text=Question", "--positive", "bad", "--label", "1"])
    assert res.exit_code == 2 and "no label column" in res.output


def test_cli_recalibrating_keeps_the_rules_target(saved_tiny) -> None:
    """A rule recalibrated without ``--target-fpr`` keeps the target it was calibrated to (a shipped policy's 3%
    FPR, not the 1% a new rule gets), from the policy's ``calibration`` entry or, for a policy written before that
    entry held it, from the record file it names; a target given on the command line wins."""
    from guardrails.offline.records import recorded_target

    t = saved_tiny
    first, second = t["tmp"] / "a.yaml", t["tmp"] / "b.yaml"
    common = ["--data", str(t["tmp"] / "toy"), "--model", str(t["model"]), "--json"]
    res = _cli(["calibrate", "--policy", str(t["policy"]), "--target-fpr", "0.2", "--out", str(first), *common])
    assert res.exit_code == 0, res.output
    assert Policy.from_path(first).calibration["r"]["target"] == {"fpr": 0.2}
    res = _cli(["calibrate", "--policy", str(first), "--out", str(second), *common])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout.strip().splitlines()[-1])
    assert rep["rules"]["r"]["target"] == {"fpr": 0.2} and rep["target_from_policy"] == ["fpr 0.2"]
    assert rep["rules"]["r"]["threshold"] == thr_of(first)  # the same rows, the same target
    res = _cli(["calibrate", "--policy", str(first), "--target-recall", "0.5", "--out", str(second), *common])
    assert json.loads(res.stdout.strip().splitlines()[-1])["rules"]["r"]["target"] == {"recall": 0.5}
    # a policy calibrated before v0.3.13: the entry names only its record
    old = yaml.safe_load(first.read_text())
    del old["calibration"]["r"]["target"]
    first.write_text(yaml.safe_dump(old))
    assert recorded_target(Policy.from_path(first), "r") == {"fpr": 0.2}
    assert recorded_target(Policy.from_path(t["policy"]), "r") is None  # never calibrated: the 1% default
    res = _cli(["calibrate", "--policy", str(t["policy"]), "--out", str(second), *common])
    assert json.loads(res.stdout.strip().splitlines()[-1])["rules"]["r"]["target"] == {"fpr": 0.01}
    from guardrails.cli.main import resolve_policy_path

    assert recorded_target(Policy.from_path(resolve_policy_path("harmful-requests")), "harmful-request",
                           Path(__file__).resolve().parents[1]) == {"fpr": 0.03}


def test_recorded_train_split_of_a_shipped_rule(tmp_path) -> None:
    """``eval --baselines`` on a file with no train split beside it fits on the split the rule's record names: for a
    shipped rule the repository's train file, checked by sha256; a record naming a file that is not here gives the
    reason instead of a path, and a rule with no record gives neither."""
    from guardrails.cli.main import resolve_policy_path
    from guardrails.offline.records import recorded_train

    root = Path(__file__).resolve().parents[1]
    shipped = Policy.from_path(resolve_policy_path("harmful-requests"))
    path, why = recorded_train(shipped, "harmful-request", root)
    assert why is None and path == root / "calibration" / "data" / "harmful_requests.train.jsonl"
    record = json.loads((root / "calibration" / "records" / "harmful-requests.json").read_text())
    record["rules"]["harmful-request"]["train_data"]["path"] = "calibration/data/gone.train.jsonl"
    (tmp_path / "rec.json").write_text(json.dumps(record))
    moved = shipped.model_copy(update={"calibration": {"harmful-request": {"record": str(tmp_path / "rec.json")}}})
    path, why = recorded_train(moved, "harmful-request", root)
    assert path is None and "gone.train.jsonl" in why and "is not here" in why
    assert recorded_train(shipped.model_copy(update={"calibration": None}), "harmful-request", root) == (None, None)


def test_eval_compares_policies_on_the_same_rows(saved_tiny, monkeypatch) -> None:
    """Several --policy options: one result per policy, each equal to its own single-policy run; --rows writes a
    file per policy."""
    t = saved_tiny
    out = t["tmp"] / "toy.cal.yaml"
    assert _cli(["calibrate", "--policy", str(t["policy"]), "--data", str(t["tmp"] / "toy"), "--target-fpr", "0.1",
                 "--model", str(t["model"]), "--out", str(out)]).exit_code == 0
    test = str(t["tmp"] / "toy.test.jsonl")
    base = ["eval", "--data", test, "--model", str(t["model"]), "--json"]
    res = _cli([*base, "--policy", str(t["policy"]), "--policy", str(out), "--rows", str(t["tmp"] / "rows.csv")])
    assert res.exit_code == 0, res.output
    both = json.loads(res.stdout.strip().splitlines()[-1])["policies"]
    assert [b["policy_path"] for b in both] == [str(t["policy"]), str(out)]
    for b in both:
        one = json.loads(_cli([*base, "--policy", b["policy_path"]]).stdout.strip().splitlines()[-1])
        assert {k: one[k] for k in ("auroc", "fpr", "tpr", "threshold")} == {k: b[k] for k in
                                                                            ("auroc", "fpr", "tpr", "threshold")}
    assert (t["tmp"] / "rows.toy.csv").is_file() and (t["tmp"] / "rows.toy.cal.csv").is_file()
    from guardrails.cli.main import console

    monkeypatch.setattr(console, "width", 60)  # a narrow terminal: the table must fold the names, not cut them
    table = _cli(["eval", "--data", test, "--model", str(t["model"]), "--policy", str(t["policy"]), "--policy",
                  str(out)])
    assert table.exit_code == 0 and "2 policies on" in table.output
    # each row names its policy in full, folded in a narrow terminal rather than cut to "toy (toy…"
    first_col = "".join(line.split("│")[1].strip() for line in table.output.splitlines() if line.startswith("│"))
    assert "policytoy(toy.yaml)" in first_col and f"policytoy({out.name})" in first_col


def test_fit_weights_on_one_file_warns_in_sample(saved_tiny) -> None:
    t = saved_tiny
    one = t["tmp"] / "one.jsonl"
    one.write_text((t["tmp"] / "toy.cal.jsonl").read_text(encoding="utf-8"), encoding="utf-8")  # no splits
    res = _cli(["calibrate", "--policy", str(t["policy"]), "--data", str(one), "--target-fpr", "0.1", "--fit-weights",
                "--model", str(t["model"]), "--out", str(t["tmp"] / "one.yaml")])
    assert res.exit_code == 0, res.output
    assert "fitted on the same rows" in " ".join(res.output.split())


def test_fit_window_rule_finds_the_feature_of_one_window() -> None:
    """The window objective (signed weights + bias on the served max-of-rolling-means score): label-1 rows differ
    from label-0 rows only by one feature firing on a few consecutive tokens of a long row, which a pooled mean
    dilutes; the fitted rule weights that feature, scores every label-1 row above every label-0 row, and keeps at
    most ``max_features``."""
    from guardrails.offline.window_fit import fit_window_rule

    sae = random_sae(d_model=16, d_sae=32, k=32, layer=1, architecture="relu")
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(16, generator=gen)
    mark = 5 * sae.W_enc[5].float() / sae.W_enc[5].float().norm()  # raises feature 5's pre-activation
    rows, labels = [], []
    for i in range(40):
        x = base + 0.3 * torch.randn(30, 16, generator=gen)
        if i % 2:
            x[10:14] += mark
        rows.append(x)
        labels.append(i % 2)
    y = np.array(labels)
    weights, bias = fit_window_rule(sae, rows, y, window=4, max_features=3)
    assert 0 < len(weights) <= 3 and weights.get(5, 0.0) > 0 and np.isfinite(bias)
    served = []
    for x in rows:  # the rule as the engine scores it: sum of weighted activations + bias, then the window rule
        acts = sae.encode(x.float())
        tok = (sum(w * acts[:, f] for f, w in weights.items()) + bias).tolist()
        served.append(max(float(np.mean(tok[max(0, e - 3): e + 1])) for e in range(len(tok))))
    s = np.array(served)
    assert s[y == 1].min() > s[y == 0].max()
    with pytest.raises(ValueError, match="both labels"):
        fit_window_rule(sae, rows[:1], y[:1], window=4, max_features=3)


def test_cli_fit_weights_window_objective(saved_tiny) -> None:
    """calibrate --fit-weights --objective window: the rule gets signed weights, a bias, sum/mean, at most
    --max-features features, and serves the scores it was calibrated on; --objective without --fit-weights and on a
    probe are errors."""
    t = saved_tiny
    out = t["tmp"] / "win.yaml"
    res = _cli(["calibrate", "--policy", str(t["policy"]), "--data", str(t["tmp"] / "toy"), "--target-fpr", "0.1",
                "--fit-weights", "--objective", "window", "--max-features", "5", "--model", str(t["model"]),
                "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout.strip().splitlines()[-1])
    det = Policy.from_path(out).rules[0].detector
    assert 0 < len(det.features) <= 5 and det.combine == "sum" and det.aggregate == "mean"
    assert det.bias != 0.0 and rep["rules"]["r"]["serving_check_max_rel_diff"] < 1e-3
    # a probe: fitted on the served window score too, its file recording the objective; the scores serve as calibrated
    from safetensors import safe_open

    from guardrails.offline.baselines import save_linear

    save_linear(t["tmp"] / "lin.safetensors", np.zeros(64, np.float32), 0.0)
    probe = {"name": "toy-probe", "rules": [{"id": "p", "scope": "input", "threshold": 0.0, "action": "block",
                                             "detector": {"kind": "linear", "layer": 1, "weights": "lin.safetensors",
                                                          "window": 2}}]}
    (t["tmp"] / "probe.yaml").write_text(yaml.safe_dump(probe))
    res = _cli(["calibrate", "--policy", str(t["tmp"] / "probe.yaml"), "--data", str(t["tmp"] / "toy"),
                "--target-fpr", "0.1", "--fit-weights", "--objective", "window", "--model", str(t["model"]),
                "--out", str(t["tmp"] / "probe.win.yaml"), "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout.strip().splitlines()[-1])
    assert rep["rules"]["p"]["serving_check_max_rel_diff"] < 1e-3
    fitted = Policy.from_path(t["tmp"] / "probe.win.yaml")
    with safe_open(fitted.resolve(fitted.rules[0].detector.weights), framework="np") as f:
        assert (f.metadata() or {})["objective"] == "window" and np.abs(f.get_tensor("weight")).sum() > 0
    res = _cli(["calibrate", "--policy", str(t["policy"]), "--data", str(t["tmp"] / "toy"), "--objective", "window",
                "--model", str(t["model"]), "--out", str(out)])
    assert res.exit_code == 2 and "add --fit-weights" in res.output
    res = _cli(["calibrate", "--policy", str(t["policy"]), "--data", str(t["tmp"] / "toy"), "--objective", "mean",
                "--fit-weights", "--model", str(t["model"]), "--out", str(out)])
    assert res.exit_code == 2 and "valid: 'pooled' or 'window'" in res.output


def test_calibrate_out_elsewhere_keeps_the_source_files_and_rewrites_paths(saved_tiny) -> None:
    """A new user's first step: calibrate a policy into another folder. The written policy loads from there
    (its relative references rewritten), and --fit-weights writes a new weights file next to it instead of
    overwriting the source policy's."""
    import hashlib

    from guardrails.offline.baselines import save_linear

    t = saved_tiny
    src = t["tmp"] / "src"
    (src / "probes").mkdir(parents=True)
    lin = save_linear(src / "probes" / "lin.safetensors", np.random.default_rng(0).normal(0, 1, 64).astype(np.float32),
                      0.0)
    before = hashlib.sha256(lin.read_bytes()).hexdigest()
    pol = {"name": "lin", "rules": [{"id": "r", "scope": "input", "threshold": 0.0, "action": "block",
                                     "detector": {"kind": "linear", "layer": 1, "weights": "probes/lin.safetensors",
                                                  "window": 2}}]}
    (src / "lin.yaml").write_text(yaml.safe_dump(pol))
    elsewhere = t["tmp"] / "mine"  # not made here: `--out mine/thr.yaml` makes it (README: starting from a policy)
    for extra, name in (([], "thr.yaml"), (["--fit-weights"], "fit.yaml")):
        res = _cli(["calibrate", "--policy", str(src / "lin.yaml"), "--data", str(t["tmp"] / "toy"), "--target-fpr",
                    "0.1", "--model", str(t["model"]), "--out", str(elsewhere / name), *extra])
        assert res.exit_code == 0, res.output
        written = Policy.from_path(elsewhere / name)
        ref = written.rules[0].detector.weights  # type: ignore[union-attr]
        assert Path(written.resolve(ref)).is_file()
        if extra:  # its own weights file, named after the output, relative to it
            assert ref == "fit.r.safetensors"
        else:  # the source's file, named so that it resolves from the new folder
            assert Path(ref).resolve() == lin.resolve()
    assert hashlib.sha256(lin.read_bytes()).hexdigest() == before  # the source policy's probe is untouched
    res = _cli(["eval", "--policy", str(elsewhere / "fit.yaml"), "--data", str(t["tmp"] / "toy.test.jsonl"),
                "--model", str(t["model"]), "--json"])
    assert res.exit_code == 0, res.output


def test_rebased_rewrites_only_local_references(tmp_path) -> None:
    (tmp_path / "a" / "probes").mkdir(parents=True)
    pol = Policy.from_dict({
        "name": "p", "saes": {"s": {"path": "bundled", "layer": 1}, "t": {"path": "sae_dir", "layer": 1}},
        "rules": [{"id": "r", "scope": "input", "threshold": 0.0, "action": "steer",
                   "detector": {"kind": "ensemble", "members": [
                       {"detector": {"kind": "linear", "layer": 1, "weights": "probes/w.safetensors"}, "std": 1.0},
                       {"detector": {"sae": "s", "features": [1]}, "std": 1.0}]},
                   "steer": {"direction": "sae:s:1", "strength": 1.0}}],
        "audit": {"db": "audit.db"}}, base_dir=tmp_path / "a")
    up = pol.rebased(tmp_path)  # the files are under the new folder: relative paths through 'a/'
    det = up.rules[0].detector
    assert det.members[0].detector.weights == "a/probes/w.safetensors"  # type: ignore[union-attr]
    assert up.saes["s"].path == "bundled" and up.saes["t"].path == "a/sae_dir"
    assert up.rules[0].steer.direction == "sae:s:1"  # type: ignore[union-attr]
    assert up.audit.db == "a/audit.db"  # type: ignore[union-attr]
    away = pol.rebased(tmp_path / "b")  # a sibling folder: absolute paths
    assert away.saes["t"].path == str((tmp_path / "a" / "sae_dir").resolve())
    for moved in (up, away):  # both name the same file as the original
        assert Path(moved.resolve(moved.saes["t"].path)).resolve() == (tmp_path / "a" / "sae_dir").resolve()
    assert pol.rebased(tmp_path / "a") is pol


def test_cli_tables_show_rich_markup_in_the_users_data_literally(saved_tiny) -> None:
    """Row text, group and category names, rule ids and paths from the user's files are shown as written: ``[/x]``
    in a row raised rich's ``MarkupError`` (a traceback) in discover's examples and eval's --errors/--by tables."""
    t = saved_tiny
    folder = t["tmp"] / "d[red]"
    folder.mkdir()
    words = ["[/kill]", "[bold]x", "[link=http://e]y[/link]", "[/]", "fox", "robot", "bread", "dog"]
    rows = [{"text": f"{words[i % 8]} {words[(i * 3) % 8]} [/c]", "label": int(i % 2 == 0),
             "source": "[/src]" if i % 3 else "[red]s", "category": "[/cat]" if i % 2 == 0 else None}
            for i in range(40)]
    for split, part in (("train", rows[:20]), ("cal", rows[20:30]), ("test", rows[30:])):
        _write(folder / f"h[bold].{split}.jsonl", part)
    draft = folder / "p[/b].yaml"
    common = ["--model", str(t["model"])]
    res = _cli(["discover", "--data", str(folder / "h[bold]"), "--layer", "1", "--sae", str(t["tmp"] / "sae"),
                "--top", "8", "--out", str(draft), *common])
    assert res.exit_code == 0 and res.exception is None, res.output
    assert "[/kil" in res.output and "d[red]/p[/b].yaml; next:" in res.output  # the tiny tokenizer splits "[/kill]"
    res = _cli(["discover", "--data", str(folder / "h[bold]"), "--layer", "1", "--sae", str(t["tmp"] / "sae"), *common])
    assert res.exit_code == 0 and "next: add --out FILE" in res.output, res.output  # without --out: the way on
    text = draft.read_text().replace("id: discovered", "id: '[/r]x'")
    draft.write_text(text)
    out = folder / "o[/].yaml"
    res = _cli(["calibrate", "--policy", str(draft), "--data", str(folder / "h[bold]"), "--target-fpr", "0.2",
                "--out", str(out), *common])
    assert res.exit_code == 0 and res.exception is None, res.output
    assert "rule [/r]x" in res.output and "o[/].yaml" in res.output
    res = _cli(["eval", "--policy", str(out), "--data", str(folder / "h[bold].test.jsonl"), "--errors", "3",
                "--by", "source", "--by", "category", *common])
    assert res.exit_code == 0 and res.exception is None, res.output
    for shown in ("[/src]", "[red]s", "[/cat]", "[/c]", "h[bold].test.jsonl", "[/r]x"):
        assert shown in res.output, shown


def test_cli_discover_writes_draft(saved_tiny) -> None:
    t = saved_tiny
    out = t["tmp"] / "draft.yaml"
    res = _cli(["discover", "--data", str(t["tmp"] / "toy"), "--layer", "1", "--sae", str(t["tmp"] / "sae"),
                "--top", "5", "--model", str(t["model"]), "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(got["features"]) == 5
    aucs = [f["auroc"] for f in got["features"]]
    assert aucs == sorted(aucs, reverse=True)
    Policy.from_path(out)  # a valid policy


def test_cli_discover_takes_the_layer_the_sae_records(saved_tiny) -> None:
    """--layer defaults to the layer the SAE file records (a new user's `guardrails discover --data F` on the
    bundled SAE); an SAE that records none gets an error that names --layer."""
    t = saved_tiny
    base = ["discover", "--data", str(t["tmp"] / "toy"), "--top", "3", "--model", str(t["model"]), "--json"]
    res = _cli([*base, "--sae", str(t["tmp"] / "sae")])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["layer"] == 1 and got["policy"]["saes"]["main"]["layer"] == 1
    explicit = json.loads(_cli([*base, "--sae", str(t["tmp"] / "sae"), "--layer", "1"]).stdout.strip().splitlines()[-1])
    assert [f["feature"] for f in got["features"]] == [f["feature"] for f in explicit["features"]]
    unmarked = random_sae(d_model=64, d_sae=64, k=16, layer=None).save(t["tmp"] / "sae_nolayer")
    res = _cli([*base, "--sae", str(unmarked)])
    assert res.exit_code != 0
    assert "--layer" in res.output and "does not record which layer" in " ".join(res.output.split())


@pytest.mark.model
def test_eval_json_shipped_harmful_requests() -> None:
    root = Path(__file__).resolve().parent.parent
    res = _cli(["eval", "--policy", "harmful-requests", "--data",
                str(root / "calibration" / "data" / "harmful_requests.test.jsonl"), "--limit", "60", "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert {"auroc", "auprc", "tpr_at_1pct_fpr", "tpr_at_5pct_fpr", "f1", "fpr", "tpr"} <= set(got)
    assert got["auroc"] > 0.8


def test_window_same_in_prefill_and_decode() -> None:
    from guardrails.engine.scorers import window_aggregate

    nan = float("nan")
    scores = torch.tensor([[1.0, nan, 3.0, 5.0]])  # a special token (unscored) at position 1
    prefill, _ = window_aggregate(torch.full((1, 1), nan), scores, 2, "mean")
    hist = torch.full((1, 1), nan)
    steps = []
    for t in range(4):
        out, hist = window_aggregate(hist, scores[:, t : t + 1], 2, "mean")
        steps.append(float(out[0, 0]))
    torch.testing.assert_close(prefill[0], torch.tensor(steps), equal_nan=True)


def test_offline_scores_skip_the_default_system_turn_as_serving_does(tmp_path: Path, monkeypatch) -> None:
    """SmolLM2's template inserts a system turn; serving's input rules do not score it (input_roles), and
    neither may calibration: offline scores equal GuardedModel.score token for token."""
    from guardrails.offline.activations import system_prefix_tokens
    from guardrails.offline.baselines import save_linear
    from tests.builders import bundled_tokenizer

    monkeypatch.setenv("GUARDRAILS_CACHE", str(tmp_path / "cache"))
    tok = bundled_tokenizer()
    assert system_prefix_tokens(tok) > 5  # "<|im_start|>system\nYou are a helpful AI assistant named SmolLM..."
    model = tiny_lm("llama", tok)
    rng = np.random.default_rng(7)
    lin = save_linear(tmp_path / "lin.safetensors", rng.normal(0, 1, 64).astype(np.float32), 0.0)
    pol = Policy.from_dict({"name": "t", "rules": [
        {"id": "lin", "scope": "input", "threshold": 1e9, "action": "flag",
         "detector": {"kind": "linear", "layer": 2, "weights": str(lin), "window": 1, "aggregate": "mean"}}]})
    data = load_labeled(_write(tmp_path / "d.jsonl", [{"text": t, "label": i % 2} for i, t in enumerate(TEXTS)]))
    rows = residuals(model, tok, data, 2, "input", model_name="tiny-bundled-tok", progress=False)
    guard = GuardedModel(model, tok, pol)
    got = text_scores(guard, "lin", rows)
    want = np.array([t.scores["lin"] for t in guard.score(data.texts)])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # the scored tokens are the user's turn: its text is there, the inserted system prompt is not
    from guardrails.offline.calibrate import scored_positions

    for text, pos, r in zip(data.texts, scored_positions(tok, data.texts, None, "input"), rows, strict=True):
        prompt = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        seen = tok.decode([ids[j] for j in pos])
        assert text in seen and "helpful AI assistant" not in seen and len(pos) == len(r)


def test_record_names_the_sources_held_out_of_the_train_split(tmp_path: Path) -> None:
    """The calibration record's ``sources_held_out``: cal/test sources the train split does not contain."""
    import hashlib
    import json as _json

    from guardrails.cli.session import Session, _split_provenance, split_files

    rows = {"train": [("x", 0, "a"), ("y", 1, "b")], "cal": [("z", 0, "a"), ("w", 1, "c")],
            "test": [("v", 1, "d"), ("u", 0, "")]}
    for split, rs in rows.items():
        (tmp_path / f"toy.{split}.jsonl").write_text(
            "".join(_json.dumps({"text": t, "label": lab, "source": s}) + "\n" for t, lab, s in rs), encoding="utf-8")
    files = split_files(str(tmp_path / "toy"))
    cal, test = (load_labeled(files[s]) for s in ("cal", "test"))
    got = _split_provenance(Session(), files, cal, test)
    assert got["sources_held_out"] == ["c", "d"]
    assert got["train_data"]["sha256"] == hashlib.sha256(files["train"].read_bytes()).hexdigest()
    assert _split_provenance(Session(), {"file": files["cal"]}, cal, None) == {}


def test_cli_calibrate_one_rule_keeps_the_others_provenance(saved_tiny, monkeypatch) -> None:
    """Calibrating one rule of two leaves the other's calibration entry and record entry in place; the policy's
    header and entries name the record actually written."""
    t = saved_tiny
    monkeypatch.chdir(t["tmp"])
    pol = yaml.safe_load(t["policy"].read_text())
    pol["rules"].append({**pol["rules"][0], "id": "r2", "detector": {**pol["rules"][0]["detector"], "features": [4]}})
    two = t["tmp"] / "two.yaml"
    two.write_text(yaml.safe_dump(pol))
    base = ["--data", str(t["tmp"] / "toy"), "--target-fpr", "0.1", "--model", str(t["model"]), "--no-test"]
    res = _cli(["calibrate", "--policy", str(two), *base])
    assert res.exit_code == 0 and "every rule (r, r2) was calibrated on the same labels" in " ".join(res.output.split())
    first = Policy.from_path(two)
    assert set(first.calibration or {}) == {"r", "r2"}
    assert two.read_text().splitlines()[0].endswith("see two.record.json")
    assert all(e["record"] == "two.record.json" for e in (first.calibration or {}).values())
    res = _cli(["calibrate", "--policy", str(two), *base, "--rule", "r2", "--target-fpr", "0.3"])
    assert res.exit_code == 0, res.output
    second = Policy.from_path(two)
    assert (second.calibration or {})["r"] == (first.calibration or {})["r"]  # untouched
    rec = json.loads((t["tmp"] / "two.record.json").read_text())
    assert set(rec["rules"]) == {"r", "r2"} and rec["rules"]["r"]["threshold"] == second.rules[0].threshold
    assert rec["rules"]["r2"]["threshold"] == second.rules[1].threshold == (second.calibration or {})["r2"]["threshold"]
    assert _cli(["calibrate", "--policy", str(two), *base, "--rule", "r", "--no-record"]).exit_code == 0
    assert two.read_text().splitlines()[0].endswith("no calibration record written")
    assert "record" not in (Policy.from_path(two).calibration or {})["r"]


def test_cli_calibrate_leaves_a_flag_only_rule_alone(saved_tiny) -> None:
    """Without --rule, calibrate fits the rules that act (as eval scores them): a flag-only rule beside them (a
    framing flag, a gate) keeps the threshold fitted to its own labels, and the report says so; --rule fits it; a
    policy whose every rule flags is calibrated whole; an unknown --rule lists the valid ids."""
    t = saved_tiny
    pol = yaml.safe_load(t["policy"].read_text())
    pol["rules"].append({**pol["rules"][0], "id": "framing", "action": "flag", "threshold": 123.0,
                         "detector": {**pol["rules"][0]["detector"], "features": [4]}})
    two = t["tmp"] / "flag.yaml"
    two.write_text(yaml.safe_dump(pol))
    base = ["--data", str(t["tmp"] / "toy"), "--target-fpr", "0.1", "--model", str(t["model"]), "--no-test", "--json"]
    res = _cli(["calibrate", "--policy", str(two), *base])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(rep["rules"]) == {"r"}
    assert any("flag-only rules keep the thresholds" in w and "framing" in w for w in rep["warnings"])
    got = {r.id: r.threshold for r in Policy.from_path(two).rules}
    assert got["framing"] == 123.0 and got["r"] != 0.0
    res = _cli(["calibrate", "--policy", str(two), *base, "--rule", "framing"])
    assert res.exit_code == 0, res.output
    assert {r.id: r.threshold for r in Policy.from_path(two).rules}["framing"] != 123.0
    pol["rules"][0]["action"] = "flag"
    two.write_text(yaml.safe_dump(pol))
    res = _cli(["calibrate", "--policy", str(two), *base])
    assert res.exit_code == 0 and set(json.loads(res.stdout.strip().splitlines()[-1])["rules"]) == {"r", "framing"}
    res = _cli(["calibrate", "--policy", str(two), *base, "--rule", "nope"])
    assert res.exit_code != 0 and "--rule 'nope'" in res.output and "valid: r, framing" in " ".join(res.output.split())


def test_cli_discover_prints_a_next_command_that_reads_the_file_the_same_way(saved_tiny) -> None:
    """A file in its own layout needs its --columns/--positive flags again: the calibrate command discover prints
    carries them, so copying it works; it then runs as printed, on the model the draft names (no --model), as eval
    does; policies naming different models need --model."""
    import shlex

    t = saved_tiny
    rows = [json.loads(x) for x in (t["tmp"] / "toy.train.jsonl").read_text().splitlines()]
    own = t["tmp"] / "own layout.csv"
    own.write_text("Goal,verdict\n" + "".join(f"{r['text']},{'unsafe' if r['label'] else 'ok'}\n" for r in rows))
    draft = t["tmp"] / "draft.yaml"
    res = _cli(["discover", "--data", str(own), "--layer", "1", "--sae", str(t["tmp"] / "sae"), "--model",
                str(t["model"]), "--out", str(draft), "--columns", "text=Goal,label=verdict", "--positive", "unsafe"])
    assert res.exit_code == 0, res.output
    printed = " ".join(res.output.split()).split("next: ", 1)[1]
    assert printed == (f"guardrails calibrate --policy {shlex.quote(str(draft))} --data {shlex.quote(str(own))} "
                       "--columns text=Goal,label=verdict --positive unsafe")
    hint = " ".join(res.output.split())
    assert "add --fit-weights to fit them" in hint and "with one file, weights and threshold come from the same" in hint
    res = _cli([*shlex.split(printed)[1:], "--target-fpr", "0.1", "--no-test"])
    assert res.exit_code == 0, res.output
    assert Policy.from_path(draft).model == str(t["model"])
    test = str(t["tmp"] / "toy.test.jsonl")
    res = _cli(["eval", "--policy", str(draft), "--data", test])
    assert res.exit_code == 0, res.output
    res = _cli(["eval", "--policy", str(draft), "--policy", "harmful-requests", "--data", test])
    assert res.exit_code != 0 and "name different models" in res.output and "give --model" in res.output
    res = _cli(["discover", "--data", str(t["tmp"] / "toy"), "--layer", "1", "--sae", str(t["tmp"] / "sae"), "--model",
                str(t["model"]), "--out", str(draft), "--max-response-chars", "300"])
    assert res.exit_code == 0, res.output
    assert " ".join(res.output.split()).endswith(f"--data {t['tmp'] / 'toy'} --max-response-chars 300")
    assert "add --fit-weights to fit them" in res.output and "on the train split" in " ".join(res.output.split())


def test_cli_a_prefix_without_a_cal_split(saved_tiny) -> None:
    """Public sets often ship train and test only: discover reads the train split and prints a calibrate command on
    that file (its test sibling still reports); calibrate on the prefix fails naming the splits found and what to
    pass, and so does discover on a prefix without a train split, never a KeyError."""
    import shlex

    t = saved_tiny
    for split in ("train", "test"):
        (t["tmp"] / f"pub.{split}.jsonl").write_bytes((t["tmp"] / f"toy.{split}.jsonl").read_bytes())
    draft = t["tmp"] / "pub.yaml"
    common = ["--layer", "1", "--sae", str(t["tmp"] / "sae"), "--model", str(t["model"])]
    res = _cli(["discover", "--data", str(t["tmp"] / "pub"), *common, "--out", str(draft)])
    assert res.exit_code == 0, res.output
    printed = " ".join(res.output.split()).split("next: ", 1)[1]
    assert printed.endswith(f"--data {shlex.quote(str(t['tmp'] / 'pub.train.jsonl'))}")
    res = _cli([*shlex.split(printed)[1:], "--target-fpr", "0.1"])
    assert res.exit_code == 0 and "in-sample" in res.output, res.output
    res = _cli(["calibrate", "--policy", str(draft), "--data", str(t["tmp"] / "pub"), "--target-fpr", "0.1"])
    out = " ".join(res.output.split())
    assert res.exit_code != 0 and "no cal split, which calibrate fits thresholds on; add pub.cal.jsonl" in out, out
    (t["tmp"] / "pub.train.jsonl").rename(t["tmp"] / "pub.cal.jsonl")
    res = _cli(["discover", "--data", str(t["tmp"] / "pub"), *common])
    out = " ".join(res.output.split())
    assert res.exit_code != 0 and "no train split, which discover ranks features on" in out, out


def test_cli_discover_then_calibrate_on_the_same_rows_warns(saved_tiny) -> None:
    """A draft remembers the rows its features were chosen on; calibrating (or evaluating) it on those very rows
    says the numbers are in-sample, and on a split prefix it does not."""
    t = saved_tiny
    one = t["tmp"] / "mine.jsonl"  # one file, no splits
    one.write_bytes((t["tmp"] / "toy.train.jsonl").read_bytes())
    draft = t["tmp"] / "draft.yaml"
    res = _cli(["discover", "--data", str(one), "--layer", "1", "--sae", str(t["tmp"] / "sae"), "--model",
                str(t["model"]), "--out", str(draft), "--json"])
    assert res.exit_code == 0, res.output
    sha = load_labeled(one).sha256
    assert yaml.safe_load(draft.read_text())["calibration"]["discovered"]["features_from"]["sha256"] == sha
    res = _cli(["calibrate", "--policy", str(draft), "--data", str(one), "--target-fpr", "0.1", "--model",
                str(t["model"]), "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout.strip().splitlines()[-1])
    assert any("chosen by `guardrails discover` on these same rows" in w for w in rep["warnings"])
    assert (Policy.from_path(draft).calibration or {})["discovered"]["features_from"]["sha256"] == sha
    res = _cli(["eval", "--policy", str(draft), "--data", str(one), "--json", "--model", str(t["model"])])
    assert json.loads(res.stdout.strip().splitlines()[-1])["in_sample"] == ["discovered"]
    res = _cli(["calibrate", "--policy", str(draft), "--data", str(t["tmp"] / "toy"), "--target-fpr", "0.1",
                "--model", str(t["model"]), "--json", "--no-test"])
    assert res.exit_code == 0, res.output
    said = json.loads(res.stdout.strip().splitlines()[-1]).get("warnings", [])
    assert not any("chosen by `guardrails discover`" in w for w in said)
    # a cal split of 10 benign rows cannot pin a 10% FPR down: said, with how many rows would
    assert any("has 10 label-0 rows: a target FPR of 0.1 lets 1 of them fire" in w and "50 or more" in w for w in said)


def test_invariance_basis_erases_the_attribute_not_the_label() -> None:
    """Rows whose label moves them along ``f`` and whose form (a column, correlated with the label) moves them along
    ``e``: the basis spans ``e`` and not ``f``; a probe fitted on the projected rows and folded back has no weight
    along ``e`` and still separates the labels, also on rows whose form goes against the label."""
    from guardrails.offline.baselines import fit_probe
    from guardrails.offline.erasure import fold, invariance_basis, project

    rng = np.random.default_rng(0)
    d = 32
    e, f = np.eye(d)[3], np.eye(d)[7]
    y = np.array([i % 2 for i in range(1000)])
    form = np.where(rng.random(1000) < np.where(y == 1, 0.8, 0.2), "frame", "other")  # form goes with the label
    x = rng.normal(size=(1000, d)) + 3.0 * np.outer(y, f) + 3.0 * np.outer(form == "frame", e)
    u = invariance_basis(x, form, y)
    # one direction per label (e plus that label's noise): e lies in their span, f mostly not (the noise part is a
    # random unit vector)
    assert u.shape == (d, 2) and np.linalg.norm(u.T @ e) > 0.95 and np.linalg.norm(u.T @ f) < 0.5
    rows = [torch.from_numpy(project(r[None].astype(np.float32).copy(), u)) for r in x]
    w, b = fit_probe(rows, y)
    w = fold(w, u)
    assert np.abs(u.T @ w).max() < 1e-4 * float(np.linalg.norm(w))
    flipped = (form == "frame") != (y == 1)  # benign rows in the frame, harmful ones out of it
    s = x @ w + b
    assert auroc_of(s[flipped], y[flipped]) > 0.9
    plain_w, plain_b = fit_probe([torch.from_numpy(r[None].astype(np.float32)) for r in x], y)
    assert auroc_of((x @ plain_w + plain_b)[flipped], y[flipped]) < auroc_of(s[flipped], y[flipped])
    with pytest.raises(ValueError, match="two groups"):
        invariance_basis(x, np.array(["one"] * 1000), y)


def auroc_of(scores: np.ndarray, y: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, scores))


def test_cli_invariant_to_fits_a_probe_blind_to_a_column(saved_tiny) -> None:
    """calibrate --fit-weights --invariant-to form: the probe's weights have no part along the column's within-label
    mean differences of the train rows' residuals; the file and the record say what was erased; the scores serve as
    calibrated. Errors: a missing column (the file's columns named), an SAE rule, no --fit-weights."""
    from safetensors import safe_open

    from guardrails.offline.baselines import pooled, save_linear
    from guardrails.offline.erasure import column_basis
    from guardrails.offline.labeled import load_labeled

    t = saved_tiny
    for split in ("train", "cal", "test"):
        path = t["tmp"] / f"toy.{split}.jsonl"
        rows = [json.loads(x) for x in path.read_text().splitlines()]
        for i, r in enumerate(rows):
            r["form"] = "frame" if (i % 3 == 0) == (i % 4 != 0) else "other"
        _write(t["tmp"] / f"formed.{split}.jsonl", rows)
    save_linear(t["tmp"] / "lin.safetensors", np.zeros(64, np.float32), 0.0)
    probe = {"name": "toy-probe", "rules": [{"id": "p", "scope": "input", "threshold": 0.0, "action": "block",
                                             "detector": {"kind": "linear", "layer": 1, "weights": "lin.safetensors",
                                                          "window": 2}}]}
    (t["tmp"] / "probe.yaml").write_text(yaml.safe_dump(probe))
    out = t["tmp"] / "probe.inv.yaml"
    args = ["calibrate", "--policy", str(t["tmp"] / "probe.yaml"), "--data", str(t["tmp"] / "formed"),
            "--target-fpr", "0.1", "--model", str(t["model"])]
    res = _cli([*args, "--fit-weights", "--invariant-to", "form", "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout.strip().splitlines()[-1])["rules"]["p"]
    assert rep["invariant_to"] == ["form"] and rep["erased_directions"] >= 1
    assert rep["serving_check_max_rel_diff"] < 1e-3
    fitted = Policy.from_path(out)
    with safe_open(fitted.resolve(fitted.rules[0].detector.weights), framework="np") as f:
        meta, w = f.metadata() or {}, f.get_tensor("weight")
    assert json.loads(meta["invariant_to"]) == ["form"] and np.abs(w).sum() > 0
    from guardrails.cli.session import Session

    session = Session(str(t["model"]))
    train = load_labeled(t["tmp"] / "formed.train.jsonl")
    u = column_basis(train, ["form"], pooled(session.rows(train, 1, "input")))
    assert np.abs(u.T @ w).max() < 1e-4 * np.linalg.norm(w)
    res = _cli([*args, "--fit-weights", "--invariant-to", "language", "--out", str(out)])
    assert res.exit_code == 2 and "no such column" in res.output and "form" in res.output
    res = _cli([*args, "--invariant-to", "form", "--out", str(out)])
    assert res.exit_code == 2 and "add --fit-weights" in res.output
    res = _cli(["calibrate", "--policy", str(t["policy"]), "--data", str(t["tmp"] / "formed"), "--target-fpr", "0.1",
                "--model", str(t["model"]), "--fit-weights", "--invariant-to", "form", "--out", str(out)])
    assert res.exit_code == 2 and "not a linear probe" in res.output


def test_load_labeled_rows_in_their_deployment_context(tmp_path: Path) -> None:
    """A row may carry a 'system' prompt or be a conversation ('messages' ending in its user turn); --system puts
    one system prompt before every row; the hash covers it; bad rows name the place and the valid forms."""
    from guardrails.offline.calibrate import CalibrationError, with_system

    hist = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    d = load_labeled(_write(tmp_path / "c.jsonl", [
        {"text": "a", "label": 0, "system": "Be brief."},
        {"messages": [*hist, {"role": "user", "content": "b"}], "label": 1},
        {"text": "c", "label": 0}]))
    assert d.texts == ["a", "b", "c"] and d.fields == {}
    assert d.contexts == [[{"role": "system", "content": "Be brief."}], hist, []]
    assert d.prompt(0) == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"}]
    assert d.prompt(2) == "c" and d.select([1]).contexts == [hist]
    assert load_labeled(_write(tmp_path / "plain.jsonl", [{"text": "a", "label": 0}])).contexts is None
    s = with_system(d, "You are Nova.")
    assert s.sha256 != d.sha256 and s.sha256 != with_system(d, "You are Ada.").sha256
    assert s.contexts is not None and s.contexts[0] == d.contexts[0]  # a row's own system prompt stays
    assert s.contexts[1][0] == {"role": "system", "content": "You are Nova."} and s.contexts[2][1:] == []
    (tmp_path / "m.csv").write_text('messages,label\n"[{""role"": ""user"", ""content"": ""x""}]",1\n')
    assert load_labeled(tmp_path / "m.csv").texts == ["x"]
    bad = {
        "both": ({"text": "a", "messages": [{"role": "user", "content": "a"}], "label": 0}, "not both"),
        "last": ({"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}], "label": 0},
                 r"last of 'messages' must be the user turn.*or its assistant reply.*'tool'"),
        "role": ({"messages": [{"role": "bot", "content": "a"}, {"role": "user", "content": "b"}], "label": 0},
                 r"messages\[0\].*system, user, assistant, tool"),
        "two_systems": ({"system": "s", "messages": [{"role": "system", "content": "t"},
                                                     {"role": "user", "content": "b"}], "label": 0}, "give one"),
        "empty": ({"messages": [], "label": 0}, "non-empty list"),
        "typed": ({"text": "a", "system": 3, "label": 0}, "'system' must be a string"),
    }
    for name, (row, msg) in bad.items():
        with pytest.raises(CalibrationError, match=rf"{name}.jsonl:1: .*{msg}"):
            load_labeled(_write(tmp_path / f"{name}.jsonl", [row]))
    with pytest.raises(CalibrationError, match="--system: empty"):
        with_system(d, " ")


def test_offline_scores_of_conversations_equal_serving(tmp_path: Path, monkeypatch) -> None:
    """Rows in a deployment context (a system prompt, earlier turns) score offline as GuardedModel.score scores
    the same conversations: only the user turns are read, and the context moves the score."""
    from guardrails.offline.baselines import save_linear
    from guardrails.offline.calibrate import scored_positions
    from tests.builders import bundled_tokenizer

    monkeypatch.setenv("GUARDRAILS_CACHE", str(tmp_path / "cache"))
    tok = bundled_tokenizer()
    model = tiny_lm("llama", tok)
    lin = save_linear(tmp_path / "lin.safetensors", np.random.default_rng(7).normal(0, 1, 64).astype(np.float32), 0.0)
    pol = Policy.from_dict({"name": "t", "rules": [
        {"id": "lin", "scope": "input", "threshold": 1e9, "action": "flag",
         "detector": {"kind": "linear", "layer": 2, "weights": str(lin), "window": 2, "aggregate": "mean"}}]})
    hist = [{"role": "user", "content": "Recommend a book."}, {"role": "assistant", "content": "Try Dune, a classic."}]
    rows = [{"text": t, "label": i % 2, **({"system": "You are Nova, Acme's support bot."} if i % 3 == 0 else {}),
             **({"messages": [*hist, {"role": "user", "content": t}], "text": None} if i % 3 == 1 else {})}
            for i, t in enumerate(TEXTS)]
    rows = [{k: v for k, v in r.items() if v is not None} for r in rows]
    data = load_labeled(_write(tmp_path / "ctx.jsonl", rows))
    guard = GuardedModel(model, tok, pol)
    res = residuals(model, tok, data, 2, "input", model_name="tiny-bundled-tok", progress=False)
    prompts = [data.prompt(i) for i in range(len(data))]
    want = np.array([t.scores["lin"] for t in guard.score(prompts)])
    np.testing.assert_allclose(text_scores(guard, "lin", res), want, rtol=1e-4, atol=1e-5)
    bare = np.array([t.scores["lin"] for t in guard.score(data.texts)])
    assert np.abs(want - bare)[[0, 3, 6]].min() > 1e-4  # a system prompt moves the scores of the turn after it
    for i, (p, pos) in enumerate(zip(prompts, scored_positions(tok, prompts, None, "input"), strict=True)):
        from guardrails.offline.activations import prompt_text

        ids = tok(prompt_text(tok, p), add_special_tokens=False)["input_ids"]
        seen = tok.decode([ids[j] for j in pos])
        assert data.texts[i] in seen and "Nova" not in seen and "Dune" not in seen and len(pos) == len(res[i])
        assert ("Recommend a book" in seen) == (i % 3 == 1)  # an earlier user turn is read, as serving reads it


def test_cli_eval_and_calibrate_under_a_system_prompt(saved_tiny, monkeypatch) -> None:
    """--system scores every row after the deployment's system prompt; a tokenizer without a chat template says
    why it cannot, naming the flag."""
    t = saved_tiny
    res = _cli(["eval", "--policy", str(t["policy"]), "--data", str(t["tmp"] / "toy.test.jsonl"),
                "--model", str(t["model"]), "--system", "You are Nova.", "--json"])
    assert res.exit_code != 0 and "chat template" in res.output and "--system" in res.output, res.output
    res = _cli(["eval", "--policy", str(t["policy"]), "--data", str(t["tmp"] / "toy.test.jsonl"),
                "--model", str(t["model"]), "--system", "  ", "--json"])
    assert res.exit_code != 0 and "--system: empty" in res.output, res.output


def test_cli_calibrate_under_a_system_prompt_records_it(saved_tiny) -> None:
    """calibrate --system fits the threshold on the rows after that system prompt: another threshold than the bare
    rows', the record and the policy name the prompt, and the served score of the same conversation matches."""
    from transformers import AutoTokenizer

    t = saved_tiny
    tk = AutoTokenizer.from_pretrained(t["model"])
    tk.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                        "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
    tk.save_pretrained(t["model"])
    outs = {}
    for name, extra in (("bare", []), ("sys", ["--system", "You are Nova, a robot that paints bread."])):
        out = t["tmp"] / f"toy.{name}.yaml"
        res = _cli(["calibrate", "--policy", str(t["policy"]), "--data", str(t["tmp"] / "toy.cal.jsonl"),
                    "--target-fpr", "0.1", "--model", str(t["model"]), "--out", str(out), "--json", *extra])
        assert res.exit_code == 0, res.output
        outs[name] = (json.loads(res.stdout.strip().splitlines()[-1])["rules"]["r"], Policy.from_path(out))
    (bare, _), (sys_rec, sys_pol) = outs["bare"], outs["sys"]
    assert "context" not in bare and sys_rec["data_sha256"] != bare["data_sha256"]
    assert sys_rec["context"] == {"rows_with_context": 15, "rows_with_earlier_turns": 0,
                                  "system_prompts": ["You are Nova, a robot that paints bread."]}
    assert sys_pol.calibration is not None
    assert sys_pol.calibration["r"]["system_prompts"] == ["You are Nova, a robot that paints bread."]
    assert sys_rec["serving_check_max_rel_diff"] < 1e-3  # offline = GuardedModel.score on the conversations
    assert sys_rec["threshold"] != bare["threshold"]


def test_window_fit_does_not_stall_on_a_shared_template_prefix(monkeypatch) -> None:
    """Every row opens with the same template tokens (a chat header) that outweigh the content: from zero weights
    each row's highest window is that shared prefix, its gradients cancel between the labels, and L-BFGS used to stop
    at once with zero weights (leave-families-out CV folds of the request probe did; v0.3.10). The fit now starts
    again from the mean-pooled probe and finds the label's direction."""
    from sklearn.metrics import roc_auc_score

    from guardrails.offline import window_fit as wf

    rng = np.random.default_rng(0)
    head = np.full((3, 16), 2.0, np.float32)
    rows, y = [], np.arange(200) % 2
    for lab in y:
        c = rng.normal(0, 0.05, (8, 16)).astype(np.float32)
        c[rng.integers(0, 8), 0] += 0.3 * lab
        rows.append(np.vstack([head, c]))
    x, off = np.concatenate(rows), np.arange(0, 11 * 200 + 1, 11)

    def served(coef: np.ndarray, bias: float) -> np.ndarray:
        t = [r @ coef + bias for r in rows]
        return np.array([max(s[max(0, j - 3):j + 1].mean() for j in range(len(s))) for s in t])

    monkeypatch.setattr(wf, "STALLED", 1e9)  # no second start: the old behaviour
    coef, bias = wf.fit_dense_window(x, off, y, np.ones(200), window=4, wd=1e-3, steps=40)
    assert np.linalg.norm(coef) < 1e-2  # stalled at the start
    monkeypatch.undo()
    coef, bias = wf.fit_dense_window(x, off, y, np.ones(200), window=4, wd=1e-3, steps=40)
    assert roc_auc_score(y, served(coef, bias)) > 0.95


def test_cli_row_limits_below_one_are_refused() -> None:
    """``--limit 0`` used to read every row (0 was taken as 'no limit'); a count or a cut below one names the flag and
    the bound before anything is loaded."""
    for cmd in ("eval", "calibrate", "discover"):
        for flag in ("--limit", "--max-response-chars"):
            args = [cmd, "--data", "rows.jsonl", flag, "0"] + ([] if cmd == "discover" else ["--policy", "x"])
            res = _cli(args)
            out = " ".join(res.output.replace("│", " ").split())  # the error box wraps its lines
            assert res.exit_code == 2 and f"Invalid value for '{flag}'" in out and "greater than or equal to 1" in out
    res = _cli(["eval", "--policy", "x", "--data", "rows.jsonl", "--train-limit", "-3"])
    assert res.exit_code == 2 and "--train-limit" in res.output
