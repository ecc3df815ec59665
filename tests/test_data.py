"""The committed labeled data: well-formed rows, splits that never share a prompt, categories from the taxonomy.

These files are what calibration, selection and the README's numbers are computed on; a broken row or a
prompt leaking between splits would silently inflate every held-out figure.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "calibration" / "data"
SPLITS = ("train", "cal", "test")
CATEGORIES = {"violent_crimes", "nonviolent_crimes", "weapons_cbrne", "cyber", "self_harm", "hate_harassment",
              "sexual_content", "privacy", "specialized_advice", "misinformation", "other"}


def _rows(name: str) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(x) for x in (DATA / name).read_text(encoding="utf-8").splitlines() if x.strip()]


def _key(text: str) -> str:
    return " ".join(text.lower().split())


@pytest.mark.parametrize("kind", ["harmful_requests", "responses"])
def test_rows_are_well_formed_and_splits_share_no_prompt(kind: str) -> None:
    seen: dict[str, str] = {}
    for split in SPLITS:
        for r in _rows(f"{kind}.{split}.jsonl"):
            assert r["label"] in (0, 1) and r["source"], r
            prompt = r["text"] if kind == "harmful_requests" else r["prompt"]
            assert prompt.strip(), r
            if kind == "responses":
                assert r["response"].strip(), r
            other = seen.setdefault(_key(prompt), split)
            assert other == split, f"{kind}: prompt in both {other} and {split}: {prompt[:80]!r}"


def test_harmful_rows_carry_a_hazard_category() -> None:
    for split in SPLITS:
        for r in _rows(f"harmful_requests.{split}.jsonl"):
            if r["label"] == 1:
                assert r.get("category") in CATEGORIES, r


def test_handwritten_files_parse_and_use_known_categories() -> None:
    hw = ROOT / "calibration" / "handwritten"
    for name, n_cols in (("harmful_forms.tsv", 3), ("benign_contrast.tsv", 4)):
        lines = [ln for ln in (hw / name).read_text(encoding="utf-8").splitlines() if ln and not ln.startswith("#")]
        assert len(lines) >= 300, name  # the issue asks for several hundred hand-written rows each side
        for ln in lines:
            cols = ln.split("\t")
            assert len(cols) == n_cols and cols[0] in CATEGORIES, (name, ln)


def test_form_pairs_are_twins_held_out_of_every_split() -> None:
    """form_pairs.jsonl (evaluation only): every harmful request has exactly one benign twin with the same
    category, frame and file, and no pair text is in a train, cal or test row."""
    rows = _rows("form_pairs.jsonl")
    pairs: dict[tuple[str, int], list[dict]] = {}  # type: ignore[type-arg]
    for r in rows:
        assert r["category"] in CATEGORIES and r["pair_set"] in ("a", "b"), r
        pairs.setdefault((r["pair_set"], r["pair"]), []).append(r)
    assert len(pairs) >= 400, len(pairs)
    for key, (first, *rest) in pairs.items():
        assert len(rest) == 1, key
        twin = rest[0]
        assert {first["label"], twin["label"]} == {0, 1}, key
        assert (first["category"], first["phrasing"]) == (twin["category"], twin["phrasing"]), key
    in_splits = {_key(r["text"]) for s in SPLITS for r in _rows(f"harmful_requests.{s}.jsonl")}
    leaked = [r["text"] for r in rows if _key(r["text"]) in in_splits]
    assert not leaked, leaked[:3]


def test_blind_answer_set_5_is_evaluation_only_and_labelled_by_kind() -> None:
    """answers_blind_5.jsonl (v0.3.14, evaluation only): every row is labelled by its kind (an off-target answer,
    one that looks like compliance and delivers nothing harmful, is 0), every kind occurs, and no prompt or reply of
    it is in a response split or near one fitted or calibrated on (half its word set shared)."""
    labels = {"harmful_answer": 1, "refusal": 0, "deflection": 0, "off_target": 0, "harmless_answer": 0}
    rows = _rows("answers_blind_5.jsonl")
    assert len(rows) >= 100 and {r["kind"] for r in rows} == set(labels)
    for r in rows:
        assert r["label"] == labels[r["kind"]] and r["category"] in CATEGORIES and r["response"].strip(), r

    def words(text: str) -> set[str]:
        return set(re.findall(r"[a-z0-9']+", text.lower()))

    split_prompts = {_key(r["prompt"]) for s in SPLITS for r in _rows(f"responses.{s}.jsonl")}
    assert not [r["prompt"] for r in rows if _key(r["prompt"]) in split_prompts]
    fitted = [words(t) for s in ("train", "cal") for r in _rows(f"responses.{s}.jsonl") for t in (r["prompt"],
                                                                                                 r["response"])]
    for r in rows:
        for w in (words(r["prompt"]), words(r["response"])):
            assert all(len(w & f) < 0.5 * len(w | f) for f in fitted if f & w), r["prompt"][:80]


def test_bundled_model_answers_are_labelled_by_refusal() -> None:
    """Answers the bundled model wrote: a refusal is never label 1, an answer to a benign request never
    label 1, and both labels occur in the train split (the output guard is fitted on them)."""
    from guardrails.offline.steering_eval import is_refusal

    gen = [json.loads(x) for x in (ROOT / "calibration/generated/bundled_answers.jsonl").read_text().splitlines()]
    assert {g["variant"] for g in gen} == {"plain", "prefill", "refusal"}
    for g in gen:
        cont = g["response"] if g["variant"] != "prefill" else g["response"][len("Sure, here is"):]
        assert g["label"] == int(g["request_label"] == 1 and not is_refusal(cont)), g
    train = [r for r in _rows("responses.train.jsonl") if r["source"].startswith("bundled_answers_")]
    assert {r["label"] for r in train} == {0, 1}
    assert all(re.fullmatch(r"bundled_answers_(plain|prefill|refusal)", r["source"]) for r in train)


def test_handwritten_training_answers_are_train_only_and_labelled_by_kind() -> None:
    """calibration/handwritten/train_answers_*.tsv (v0.3.7): each row parses (kind, category, prompt, reply), both
    labels and every kind occur, and their rows are in the response train split only, labelled by kind (a harmful
    answer 1; a refusal, a deflection or a helpful answer to a benign twin 0), with the file's line breaks."""
    hw = ROOT / "calibration" / "handwritten"
    labels = {"harmful_answer": 1, "refusal": 0, "deflection": 0, "harmless_answer": 0}
    expected: dict[tuple[str, str], int] = {}
    for path in sorted(hw.glob("train_answers_*.tsv")):
        for ln in path.read_text(encoding="utf-8").splitlines():
            if not ln.strip() or ln.startswith("#"):
                continue
            kind, cat, prompt, reply = ln.split("\t")
            assert kind in labels and cat in CATEGORIES and prompt.strip() and reply.strip(), (path.name, ln[:80])
            expected[(_key(prompt), reply.replace("\\n", "\n").splitlines()[0].strip())] = labels[kind]
    assert len(expected) >= 500 and set(expected.values()) == {0, 1}
    got = {s: [r for r in _rows(f"responses.{s}.jsonl") if r["source"] == "handwritten_train_answers"] for s in SPLITS}
    assert not got["cal"] and not got["test"]
    assert len(got["train"]) >= 500
    for r in got["train"]:
        assert expected[(_key(r["prompt"]), r["response"].splitlines()[0].strip())] == r["label"], r
    assert any("\n" in r["response"] for r in got["train"])  # markdown answers keep their line breaks


def _calibrated_rules() -> Iterator[tuple[str, Any, Any, dict[str, Any]]]:
    """Each calibrated rule of each shipped policy: ``(where, policy, rule, record)``, the record read from
    the file the policy's calibration entry names (and checked to agree with the entry and the rule)."""
    from guardrails import Policy

    for path in sorted((ROOT / "policies").glob("*.yaml")):
        pol = Policy.from_path(path)
        for rid, entry in (pol.calibration or {}).items():
            rec = json.loads((ROOT / entry["record"]).read_text(encoding="utf-8"))["rules"][rid]
            rule = next(r for r in pol.rules if r.id == rid)
            assert rule.threshold == rec["threshold"] == entry["threshold"], (path.name, rid)
            assert rec["data_sha256"] == entry["data_sha256"], (path.name, rid)
            yield f"{path.name}/{rid}", pol, rule, rec


def test_every_shipped_threshold_was_fitted_on_the_current_cal_split() -> None:
    """Each shipped policy's calibration record names the data it was fitted on; its hash must be the current
    file's (read as the record says: limit, response cut), and the policy's threshold the record's. A split
    rebuilt without recalibrating (a stale threshold) fails here."""
    from guardrails.offline.calibrate import load_labeled

    checked = 0
    for where, _, _, rec in _calibrated_rules():
        data = ROOT / rec["data"]
        if not data.is_file():  # a generated split not built here (calibration/build_data.py)
            continue
        got = load_labeled(data, limit=rec.get("limit"), max_response_chars=rec.get("max_response_chars"))
        assert got.sha256 == rec["data_sha256"], f"{where}: recalibrate"
        checked += 1
    assert checked >= 3


def test_every_sae_rule_was_calibrated_on_the_sae_it_ships_with() -> None:
    """A policy that watches SAE features names feature ids of one particular SAE; retraining the bundled
    SAE renumbers them. Each calibration record stores the SAE file's sha256: it must be the shipped file's,
    or the features and threshold belong to another SAE."""
    import hashlib

    from guardrails.offline.records import sae_weights_file

    checked = 0
    for where, pol, rule, rec in _calibrated_rules():
        sae_name = getattr(rule.detector, "sae", None)
        if sae_name is None:
            continue
        sae_file = sae_weights_file(pol.resolve(pol.saes[sae_name].path))
        assert sae_file is not None, where
        digest = hashlib.sha256(sae_file.read_bytes()).hexdigest()
        assert rec["saes"][sae_name]["sha256"] == digest, f"{where}: refit and recalibrate on this SAE"
        checked += 1
    assert checked >= 1


def test_the_committed_data_is_exactly_what_build_data_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Provenance: every committed data file is what ``calibration/build_data.py`` writes from the installed data
    packages and the hand-written files, byte for byte (a hand edit, or a script change without a rebuild, fails).
    Built into a temporary folder, so the checkout's files are only read."""
    import importlib
    import sys

    monkeypatch.syspath_prepend(str(ROOT / "calibration"))
    build = importlib.import_module("build_data")
    out = tmp_path / "data"
    monkeypatch.setattr(build, "OUT", out)
    monkeypatch.setattr(sys, "argv", ["build_data.py"])
    try:
        build.main()
    except SystemExit as exc:  # a data package missing: build_data names it and how to install it
        pytest.skip(f"build_data.py could not run here: {exc}")
    committed = ["harmful_requests.train.jsonl", "harmful_requests.cal.jsonl", "harmful_requests.test.jsonl",
                 "jailbreak_wrapped.train.jsonl", "responses.train.jsonl", "over_refusal.jsonl", "form_pairs.jsonl",
                 "answers_blind_5.jsonl", "STATS.md", "PROVENANCE.md", ".gitignore"]
    for name in committed:
        assert (DATA / name).is_file(), name
    differ = [f.name for f in sorted(out.iterdir())
              if f.is_file() and (DATA / f.name).is_file() and f.read_bytes() != (DATA / f.name).read_bytes()]
    assert differ == [], f"rebuild with `python calibration/build_data.py`: {differ} differ from what it writes"
    assert {f.name for f in out.iterdir()} >= set(committed)
