"""Detection metrics against scikit-learn and hand counts; bootstrap intervals; policy scores."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from guardrails.offline.evaluate import bootstrap_intervals, metrics, rates_at, tpr_at_fpr

SCORES = np.array([0.1, 0.4, 0.35, 0.8, 0.7, 0.2, 0.9, 0.65, 0.3, 0.55, 0.05, 0.6])
LABELS = np.array([0, 0, 1, 1, 1, 0, 1, 0, 0, 1, 0, 1])


def test_metrics_equal_sklearn() -> None:
    from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

    m = metrics(SCORES, LABELS, threshold=0.5)
    assert m["auroc"] == pytest.approx(roc_auc_score(LABELS, SCORES))
    assert m["auprc"] == pytest.approx(average_precision_score(LABELS, SCORES))
    pred = (SCORES >= 0.5).astype(int)
    assert m["f1"] == pytest.approx(f1_score(LABELS, pred))
    assert m["fpr"] == pytest.approx(((pred == 1) & (LABELS == 0)).sum() / (LABELS == 0).sum())
    assert m["tpr"] == pytest.approx(((pred == 1) & (LABELS == 1)).sum() / (LABELS == 1).sum())


def test_tpr_at_fpr_matches_roc_curve() -> None:
    from sklearn.metrics import roc_curve

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    s = rng.normal(0, 1, 400) + 1.2 * y
    fpr, tpr, _ = roc_curve(y, s)
    for target in (0.01, 0.05, 0.2):
        want = tpr[fpr <= target + 1e-12].max()
        assert tpr_at_fpr(s, y, target) == pytest.approx(want)


def test_nan_scores_never_fire_and_rank_lowest() -> None:
    s = np.array([np.nan, 0.2, 0.9, np.nan])
    y = np.array([1, 0, 1, 0])
    r = rates_at(s, y, 0.0)
    assert r["tpr"] == 0.5 and r["fpr"] == 0.5
    assert metrics(s, y)["auroc"] == pytest.approx(0.625)  # NaN ties at the bottom


def test_single_class_reports_rates_only() -> None:
    m = metrics(np.array([0.1, 0.7, 0.3]), np.array([0, 0, 0]), threshold=0.5)
    assert math.isnan(m["auroc"]) and m["fpr"] == pytest.approx(1 / 3)


def test_bootstrap_interval_contains_point_estimate() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    s = rng.normal(0, 1, 300) + y
    ci = bootstrap_intervals(s, y, 0.5, n=200)
    point = metrics(s, y, 0.5)
    for k in ("auroc", "fpr", "tpr"):
        lo, hi = ci[k]
        assert lo <= point[k] <= hi
        assert hi - lo < 0.3


# -- eval scores each rule on its own layer (issue 11), per-group reports -------------------------------------


def test_grouped_metrics_single_label_groups_ranked_against_the_other_side() -> None:
    from sklearn.metrics import roc_auc_score

    from guardrails.offline.evaluate import grouped_metrics, worst_group

    s = np.array([0.9, 0.8, 0.2, 0.7, 0.1, 0.3, 0.6, 0.65, 0.4, 0.5])
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    g = ["a", "a", "b", "b", "n", "n", "n", "m", "m", "m"]
    per = grouped_metrics(s, y, g, 0.55, min_rows=2)
    # harmful group "b" against every benign row (none of them in "b")
    assert per["b"]["auroc"] == pytest.approx(roc_auc_score([1, 1, 0, 0, 0, 0, 0, 0], np.r_[s[2:4], s[4:]]), abs=1e-4)
    # benign group "m" against every harmful row
    assert per["m"]["auroc"] == pytest.approx(roc_auc_score([1, 1, 1, 1, 0, 0, 0], np.r_[s[:4], s[7:]]), abs=1e-4)
    assert per["m"]["fpr"] == pytest.approx(1 / 3, abs=1e-4)  # 0.65 >= 0.55
    assert per["a"]["tpr"] == 1.0 and per["b"]["tpr"] == pytest.approx(0.5)
    assert worst_group(per) == min(per, key=lambda k: per[k]["auroc"])


def test_fpr_at_tpr_mirrors_tpr_at_fpr() -> None:
    """What a recall target costs: the lowest FPR of any threshold that keeps at least that share of positives."""
    from guardrails.offline.evaluate import fpr_at_tpr, tpr_at_fpr

    pos = np.array([0.9, 0.8, 0.7, 0.6, 0.2])
    neg = np.array([0.75, 0.5, 0.4, 0.3, 0.1, 0.0, -0.1, -0.2, -0.3, -0.4])
    s, y = np.r_[pos, neg], np.r_[np.ones(5), np.zeros(10)]
    assert fpr_at_tpr(s, y, 0.4) == 0.0  # threshold 0.8: two of five, no negative
    assert fpr_at_tpr(s, y, 0.6) == pytest.approx(0.1)  # 0.7: the 0.75 negative fires
    assert fpr_at_tpr(s, y, 0.8) == pytest.approx(0.1)  # 0.6
    assert fpr_at_tpr(s, y, 1.0) == pytest.approx(0.4)  # 0.2: 0.75, 0.5, 0.4 and 0.3 fire
    assert tpr_at_fpr(s, y, 0.1) == pytest.approx(0.8) and tpr_at_fpr(s, y, 0.0) == pytest.approx(0.4)
    assert np.isnan(fpr_at_tpr(pos, np.ones(5), 0.5))


def test_worst_group_of_a_one_label_file_is_ranked_by_its_rate() -> None:
    """A file of harmful rows only (`eval --label 1 --by source`) has no AUROC: the worst source is the one the guard
    blocks least (it printed "worst:" and nothing); benign rows only: the one it blocks most."""
    from guardrails.offline.evaluate import grouped_metrics, worst_of

    s = np.array([0.9, 0.8, 0.2, 0.7, 0.1, 0.3])
    g = ["a", "a", "b", "b", "c", "c"]
    harmful = grouped_metrics(s, np.ones(6), g, 0.5, min_rows=2)
    assert worst_of(harmful) == ("c", "tpr")  # fires on a 2/2, b 1/2, c 0/2
    benign = grouped_metrics(s, np.zeros(6), g, 0.5, min_rows=2)
    assert worst_of(benign) == ("a", "fpr")
    y = np.array([1, 0, 1, 0, 1, 0])
    assert worst_of(grouped_metrics(s, y, g, 0.5, min_rows=2))[1] == "auroc"
    assert worst_of({}) is None


def test_eval_scores_two_same_scope_rules_on_their_own_layers(tmp_path, monkeypatch) -> None:
    """Two input rules at layers 1 and 3: eval of each rule equals the serving score of that rule."""
    import json as _json

    import yaml
    from sklearn.metrics import roc_auc_score
    from typer.testing import CliRunner

    from guardrails.cli.main import _register_extensions, app
    from guardrails.core.policy import Policy
    from guardrails.offline.baselines import save_linear
    from guardrails.offline.calibrate import load_labeled
    from guardrails.serving.generation import GuardedModel
    from guardrails.serving.models import load_model
    from tests.builders import tiny_lm, tiny_tokenizer

    monkeypatch.setenv("GUARDRAILS_CACHE", str(tmp_path / "cache"))
    tk = tiny_tokenizer()
    tiny_lm("llama", tk).save_pretrained(tmp_path / "model")
    tk.save_pretrained(tmp_path / "model")
    rng = np.random.default_rng(1)
    rules = []
    for rid, layer in (("low", 1), ("high", 3)):
        w = save_linear(tmp_path / f"{rid}.safetensors", rng.normal(0, 1, 64).astype(np.float32), 0.0)
        rules.append({"id": rid, "scope": "input", "threshold": 0.0, "action": "flag",
                      "detector": {"kind": "linear", "layer": layer, "weights": str(w), "window": 2}})
    (tmp_path / "two.yaml").write_text(yaml.safe_dump({"name": "two", "rules": rules}))
    words = ["bread", "robot", "fox", "paint", "flour", "dog", "world", "capital", "story", "yeast"]
    data = tmp_path / "d.jsonl"
    # unique texts: a repeated text ties with itself when served one at a time, but batched (padded)
    # collection may break the tie by float noise, moving AUROC by half a pair
    data.write_text("".join(_json.dumps({"text": f"{words[i % 10]} {words[i // 10 + 3]} {words[(i * 7) % 10]}",
                                         "label": int(i % 3 == 0), "source": "s" + str(i % 2),
                                         "category": "c" + str(i % 4 == 0), "form": f"f{i % 3}"}) + "\n"
                        for i in range(24)))
    _register_extensions()
    model, tok = load_model(str(tmp_path / "model"))
    d = load_labeled(data)
    served = GuardedModel(model, tok, Policy.from_path(tmp_path / "two.yaml")).score(d.texts)
    aurocs = {}
    for rid in ("low", "high"):
        res = CliRunner().invoke(app, ["eval", "--policy", str(tmp_path / "two.yaml"), "--data", str(data),
                                       "--rule", rid, "--model", str(tmp_path / "model"), "--json",
                                       "--by", "source", "--by", "category", "--by", "form", "--errors", "2",
                                       "--rows", str(tmp_path / f"{rid}.csv")])
        assert res.exit_code == 0, res.output
        got = _json.loads(res.stdout.strip().splitlines()[-1])
        want = np.array([t.scores[rid] for t in served])
        # --rows: every row's served score and decision; --errors: the worst mistakes, taken from those rows
        with (tmp_path / f"{rid}.csv").open() as f:
            written = list(csv.DictReader(f))
        assert [float(r["score"]) for r in written] == pytest.approx(want.tolist(), abs=1e-3)
        assert [int(r["fires"]) for r in written] == (want >= 0.0).astype(int).tolist()
        fp = [r for r in written if r["label"] == "0" and r["fires"] == "1"]
        assert [e["row"] for e in got["errors"]["false_positives"]] == [
            int(r["row"]) for r in sorted(fp, key=lambda r: -float(r["score"]))][:2]
        assert all(e["label"] == 1 and e["score"] < 0.0 for e in got["errors"]["false_negatives"])
        assert got["left_out_source"] == {} and got["left_out_category"] == {}
        assert got["auroc"] == pytest.approx(roc_auc_score(d.labels, want), abs=1e-4)
        assert got["fpr"] == pytest.approx((want[d.labels == 0] >= 0.0).mean(), abs=1e-4)
        assert set(got["by_source"]) == {"s0", "s1"} and set(got["by_category"]) == {"cTrue", "cFalse"}
        assert set(got["by_form"]) == {"f0", "f1", "f2"}  # any other column groups too
        assert got["worst_source"] in {"s0", "s1"}
        aurocs[rid] = got["auroc"]
    assert aurocs["low"] != aurocs["high"]  # the two rules really are scored on different activations
    # a steer rule: the report says what firing means (steered in generation, blocked from block_above; a scan does
    # its scan_action), with the share of each label reaching block_above
    low = np.array([t.scores["low"] for t in served])
    srt = np.sort(low)
    above = float((srt[len(srt) // 2 - 1] + srt[len(srt) // 2]) / 2)  # between two rows: no row sits on the edge
    steer_rule = {**rules[0], "action": "steer", "steer": {"strength": 0.0, "block_above": above}}
    (tmp_path / "steer.yaml").write_text(yaml.safe_dump({"name": "steer", "rules": [steer_rule, rules[1]]}))
    res = CliRunner().invoke(app, ["eval", "--policy", str(tmp_path / "steer.yaml"), "--data", str(data), "--rule",
                                   "low", "--model", str(tmp_path / "model"), "--json"])
    assert res.exit_code == 0, res.output
    st = _json.loads(res.stdout.strip().splitlines()[-1])["steer"]
    assert st["scan_action"] == "block" and st["block_above"] == above
    assert st["blocked_in_generation"]["label_1"] == pytest.approx((low[d.labels == 1] >= above).mean(), abs=1e-6)
    res = CliRunner().invoke(app, ["eval", "--policy", str(tmp_path / "steer.yaml"), "--data", str(data), "--rule",
                                   "low", "--model", str(tmp_path / "model")])
    assert "low steers" in res.output and "steer.scan_action: block" in " ".join(res.output.split())
    # a policy whose only rule steers says the same without --rule (harmful-compliance is one)
    (tmp_path / "steer1.yaml").write_text(yaml.safe_dump({"name": "steer1", "rules": [steer_rule]}))
    res = CliRunner().invoke(app, ["eval", "--policy", str(tmp_path / "steer1.yaml"), "--data", str(data), "--model",
                                   str(tmp_path / "model"), "--json"])
    assert res.exit_code == 0, res.output
    assert _json.loads(res.stdout.strip().splitlines()[-1])["steer"] == st
    res = CliRunner().invoke(app, ["eval", "--policy", str(tmp_path / "steer.yaml"), "--data", str(data), "--model",
                                   str(tmp_path / "model"), "--json"])
    both = _json.loads(res.stdout.strip().splitlines()[-1])  # the other rule flags: the steer rule alone decides
    assert both["score"] == "rule low" and both["steer"] == st
    # a harmful-only file (a recall check): only TPR is defined, and the table says so; --rows makes its folder
    ones = tmp_path / "ones.jsonl"
    ones.write_text("".join(_json.dumps({"text": f"{w} {w}", "label": 1}) + "\n" for w in words[:6]))
    res = CliRunner().invoke(app, ["eval", "--policy", str(tmp_path / "two.yaml"), "--data", str(ones), "--rule",
                                   "low", "--model", str(tmp_path / "model"), "--rows", str(tmp_path / "n" / "r.csv")])
    assert res.exit_code == 0, res.output
    assert "every row is label 1: only TPR" in " ".join(res.output.split())
    assert len((tmp_path / "n" / "r.csv").read_text().splitlines()) == 7


def test_row_errors_rank_mistakes_and_never_let_an_unscored_row_pass(tmp_path) -> None:
    """False positives highest first, false negatives lowest first; a NaN score (could not score) on a harmful
    row is a miss, not a pass; ``row`` is the file's 1-based data row (in a subset too), ``at`` its line."""
    import json

    from guardrails.cli.evaluate import row_errors, write_rows
    from guardrails.offline.calibrate import load_labeled

    data = tmp_path / "d.jsonl"
    rows = [("a", 1, 0.9), ("b", 1, float("nan")), ("c", 1, 0.2), ("d", 0, 0.8), ("e", 0, 0.6), ("f", 0, 0.1)]
    data.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y, _ in rows))
    d = load_labeled(data)
    s = np.array([r[2] for r in rows])
    err = row_errors(d, s, 0.5, 5)
    assert [e["text"] for e in err["false_positives"]] == ["d", "e"]
    assert [e["text"] for e in err["false_negatives"]] == ["b", "c"]
    assert err["false_negatives"][1]["row"] == 3
    assert [e["text"] for e in row_errors(d, s, 0.5, 1)["false_positives"]] == ["d"]
    write_rows(str(tmp_path / "rows.csv"), d, s, 0.5)
    with (tmp_path / "rows.csv").open() as f:
        written = list(csv.DictReader(f))
    assert [r["fires"] for r in written] == ["1", "0", "0", "1", "1", "0"]
    assert written[1]["score"] == "" and written[1]["correct"] == "0"
    assert written[2]["at"] == f"{data}:3"
    write_rows(str(tmp_path / "new" / "rows.csv"), d, s, 0.5)  # a missing folder is made
    assert (tmp_path / "new" / "rows.csv").read_text() == (tmp_path / "rows.csv").read_text()
    # a subset (eval --limit) keeps the file's row numbers; a CSV row's place is its line (the header is line 1)
    sub = d.select([2, 5])
    got = row_errors(sub, np.array([0.2, 0.9]), 0.5, 5)
    assert [(e["row"], e["at"]) for e in (*got["false_positives"], *got["false_negatives"])] == [
        (6, f"{data}:6"), (3, f"{data}:3")]
    (tmp_path / "d.csv").write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y, _ in rows))
    got = row_errors(load_labeled(tmp_path / "d.csv").select([3]), np.array([0.8]), 0.5, 5)
    assert [(e["row"], e["at"]) for e in got["false_positives"]] == [(4, f"{tmp_path / 'd.csv'}:5")]


def test_eval_by_a_field_the_data_lacks_is_an_error_before_scoring(tmp_path) -> None:
    """``--by category`` on rows without categories (or an unknown field) names the file and the fix, and never
    loads the model."""
    import json

    from guardrails.cli.evaluate import run_eval
    from guardrails.cli.session import Session

    class NoModel(Session):
        def guard(self, policy, score_mode=None, judges=None):
            raise AssertionError("scored before checking --by")

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"t{i}", "label": i % 2, "source": "s"}) + "\n" for i in range(4)))
    with pytest.raises(ValueError, match=r"--by category: no row of .*d.jsonl has a 'category' field"):
        run_eval(NoModel(), "harmful-requests", str(data), by=["category"])
    with pytest.raises(ValueError, match=r"unknown --by 'topic'; valid: source, category \(the columns of"):
        run_eval(NoModel(), "harmful-requests", str(data), by=["topic"])
    bare = tmp_path / "bare.jsonl"
    bare.write_text("".join(json.dumps({"text": f"t{i}", "label": i % 2}) + "\n" for i in range(4)))
    with pytest.raises(ValueError, match=r"--by source: no row of .*bare.jsonl has a 'source' field"):
        run_eval(NoModel(), "harmful-requests", str(bare), by=["source"])
