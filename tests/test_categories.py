"""Category heads (``rules[].categories``): a decision names the hazard category its head finds most probable
(the rule's own ``category`` below ``min_prob``), a policy sets an action per category, and the head's file is
checked with errors that name the place. Tiny llama, a linear rule that fires on every prompt."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import save_file

from guardrails import GuardedModel, Policy, PolicyError
from guardrails.offline.baselines import save_linear

HIDDEN, LAYER = 64, 2
PROMPTS = ["How do I bake bread?", "Tell me a story about a fox", "What is the capital of France?"]


def _head(path: Path, weight: torch.Tensor, bias: torch.Tensor, labels: list[str] | None) -> Path:
    meta = {} if labels is None else {"labels": json.dumps(labels)}
    save_file({"weight": weight.float().contiguous(), "bias": bias.float().contiguous()}, str(path), metadata=meta)
    return path


def _policy(tmp: Path, categories: dict[str, Any] | None, *, action: str = "block", category: str | None = "x",
            threshold: float = -1e9, probe: torch.Tensor | None = None) -> Policy:
    save_linear(tmp / "probe.safetensors", (torch.ones(HIDDEN) * 0.01 if probe is None else probe).numpy(), 0.0)
    rule: dict[str, Any] = {"id": "r", "scope": "input", "threshold": threshold, "action": action,
                            "detector": {"kind": "linear", "layer": LAYER, "weights": "probe.safetensors"}}
    if category is not None:
        rule["category"] = category
    if categories is not None:
        rule["categories"] = categories
    (tmp / "p.yaml").write_text(yaml.safe_dump({"name": "cats", "rules": [rule]}))
    return Policy.from_path(tmp / "p.yaml")


def test_a_decision_names_the_heads_category(lm: Any, tok: Any, tmp_path: Path) -> None:
    _head(tmp_path / "h.safetensors", torch.zeros(2, HIDDEN), torch.tensor([0.0, 5.0]), ["a", "b"])
    g = GuardedModel(lm("llama"), tok, _policy(tmp_path, {"weights": "h.safetensors"}))
    r = g.generate(PROMPTS[0], max_new_tokens=2, chat=False)
    assert r.blocked and [(d.rule, d.category) for d in r.decisions] == [("r", "b")]
    # the audit trail keeps it, and the HTML report shows it
    from guardrails.audit.report import render_record
    from guardrails.audit.store import AuditStore

    GuardedModel(lm("llama"), tok, g.policy, audit=tmp_path / "a.db").generate(PROMPTS[0], max_new_tokens=2,
                                                                                chat=False)
    with AuditStore(tmp_path / "a.db", readonly=True) as s:
        rec = s.get(1)
    assert [x["category"] for x in rec.to_dict()["decisions"]] == ["b"]
    assert "<td>b</td>" in render_record(rec)
    # below min_prob (p(b) = 0.993): the rule's own category
    g = GuardedModel(lm("llama"), tok, _policy(tmp_path, {"weights": "h.safetensors", "min_prob": 0.999}))
    assert [d.category for d in g.generate(PROMPTS[0], max_new_tokens=2, chat=False).decisions] == ["x"]


def test_actions_per_category(lm: Any, tok: Any, tmp_path: Path) -> None:
    """``actions: {b: flag}`` on a blocking rule: category b is flagged and the answer goes through; a category
    without an entry keeps the rule's action."""
    _head(tmp_path / "h.safetensors", torch.zeros(2, HIDDEN), torch.tensor([0.0, 5.0]), ["a", "b"])
    g = GuardedModel(lm("llama"), tok, _policy(tmp_path, {"weights": "h.safetensors", "actions": {"b": "flag"}}))
    r = g.generate(PROMPTS[0], max_new_tokens=2, chat=False)
    assert not r.blocked and [(d.action, d.category) for d in r.decisions] == [("flag", "b")]
    g = GuardedModel(lm("llama"), tok, _policy(tmp_path, {"weights": "h.safetensors", "actions": {"a": "flag"}}))
    r = g.generate(PROMPTS[0], max_new_tokens=2, chat=False)
    assert r.blocked and [(d.action, d.category) for d in r.decisions] == [("block", "b")]


def test_a_category_that_blocks_a_steer_rule_keeps_the_threshold_that_decided(lm: Any, tok: Any,
                                                                                 tmp_path: Path) -> None:
    _head(tmp_path / "h.safetensors", torch.zeros(2, HIDDEN), torch.tensor([0.0, 5.0]), ["a", "b"])
    pol = _policy(tmp_path, {"weights": "h.safetensors", "actions": {"b": "block"}}, action="steer")
    pol = pol.model_copy(update={"rules": [pol.rules[0].model_copy(update={
        "steer": pol.rules[0].steer.model_copy(update={"block_above": 1e9})})]})  # type: ignore[union-attr]
    r = GuardedModel(lm("llama"), tok, pol).generate(PROMPTS[0], max_new_tokens=2, chat=False)
    assert r.blocked and [(d.action, d.category, d.threshold) for d in r.decisions] == [("block", "b", -1e9)]


def test_the_category_reads_the_tokens_up_to_the_decision(lm: Any, tok: Any, tmp_path: Path) -> None:
    """A head that depends on the residuals: generation (prefill), a scan and a batch name the same category,
    which is the argmax of the head's mean logit over the rule's scored tokens up to the firing one."""
    gen = torch.Generator().manual_seed(0)
    _head(tmp_path / "h.safetensors", torch.randn(3, HIDDEN, generator=gen), torch.zeros(3), ["a", "b", "c"])
    # a threshold each prompt reaches only part way in, so the mean spans several tokens
    probe = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(1))
    quiet = GuardedModel(lm("llama"), tok, _policy(tmp_path, None, threshold=1e9, probe=probe))
    n = {p: len(tok(p)["input_ids"]) for p in PROMPTS}
    highs = [max(s for pos, s in r.token_scores["r"].items() if 2 < pos < n[p])
             for p, r in zip(PROMPTS, quiet.generate(PROMPTS, max_new_tokens=1, chat=False), strict=True)]
    pol = _policy(tmp_path, {"weights": "h.safetensors"}, action="flag", threshold=min(highs) - 1e-6, probe=probe)
    g = GuardedModel(lm("llama"), tok, pol)
    one = [g.generate(p, max_new_tokens=2, chat=False).decisions[0].category for p in PROMPTS]
    batch = [r.decisions[0].category for r in g.generate(PROMPTS, max_new_tokens=2, chat=False)]
    scan = [ts.decisions[0].category for ts in g.score(PROMPTS, chat=False)]
    assert one == batch == scan and all(c in ("a", "b", "c") for c in one)
    # by hand: the residuals at the rule's layer (output of block LAYER) over the scored prompt tokens
    w = torch.randn(3, HIDDEN, generator=torch.Generator().manual_seed(0))
    model = lm("llama")
    positions = []
    for p, got in zip(PROMPTS, one, strict=True):
        d = g.generate(p, max_new_tokens=2, chat=False).decisions[0]
        ids = tok(p, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            hs = model(ids, output_hidden_states=True).hidden_states[LAYER + 1][0]
        scored = hs[1 : d.position + 1]  # position 0 is never scored (attention sink)
        want = ["a", "b", "c"][int((scored @ w.T).mean(0).argmax())]
        assert got == want
        positions.append(d.position)
    assert max(positions) > 2, positions  # the mean really spans several tokens somewhere


def test_an_input_rule_reading_the_prompt_names_the_whole_request(lm: Any, tok: Any, tmp_path: Path) -> None:
    """``reads: prompt`` on an input rule that trips early: the decision names the argmax of the head's mean logit
    over every scored prompt token (not only those up to the firing one), in generation, a batch and a scan."""
    w = torch.randn(3, HIDDEN, generator=torch.Generator().manual_seed(0))
    _head(tmp_path / "h.safetensors", w, torch.zeros(3), ["a", "b", "c"])
    g = GuardedModel(lm("llama"), tok, _policy(tmp_path, {"weights": "h.safetensors", "reads": "prompt"},
                                               action="flag"))
    model = lm("llama")
    one = [g.generate(p, max_new_tokens=2, chat=False).decisions[0] for p in PROMPTS]
    assert [d.category for d in one] == [r.decisions[0].category for r in
                                         g.generate(PROMPTS, max_new_tokens=2, chat=False)]
    assert [d.category for d in one] == [ts.decisions[0].category for ts in g.score(PROMPTS, chat=False)]
    wants = []
    for p, d in zip(PROMPTS, one, strict=True):
        ids = tok(p, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            hs = model(ids, output_hidden_states=True).hidden_states[LAYER + 1][0]
        assert d.position < len(hs) - 1  # it trips before the prompt's end ...
        wants.append(["a", "b", "c"][int((hs[1:] @ w.T).mean(0).argmax())])  # ... and is named by all of it
    assert [d.category for d in one] == wants and len(set(wants)) > 1, wants


def _output_policy(tmp: Path, reads: str) -> Policy:
    """An output rule that fires on the first generated token, with a category head reading ``reads``."""
    save_linear(tmp / "probe.safetensors", (torch.ones(HIDDEN) * 0.01).numpy(), 0.0)
    rule = {"id": "r", "scope": "output", "threshold": -1e9, "action": "flag",
            "detector": {"kind": "linear", "layer": LAYER, "weights": "probe.safetensors"},
            "categories": {"weights": "h.safetensors", "reads": reads}}
    (tmp / "out.yaml").write_text(yaml.safe_dump({"name": "cats-out", "rules": [rule]}))
    return Policy.from_path(tmp / "out.yaml")


def test_an_output_rule_reading_the_prompt_names_the_requests_category(lm: Any, tok: Any, tmp_path: Path) -> None:
    """``reads: prompt``: the answer's decision names the argmax of the head's mean logit over the prompt's scored
    tokens (by hand below), in generation and in a scan of the same prompt and answer."""
    w = torch.randn(3, HIDDEN, generator=torch.Generator().manual_seed(0))
    _head(tmp_path / "h.safetensors", w, torch.zeros(3), ["a", "b", "c"])
    g = GuardedModel(lm("llama"), tok, _output_policy(tmp_path, "prompt"))
    model = lm("llama")
    wants = []
    for p in PROMPTS:
        r = g.generate(p, max_new_tokens=2, chat=False)
        ids = tok(p, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            hs = model(ids, output_hidden_states=True).hidden_states[LAYER + 1][0]
        want = ["a", "b", "c"][int((hs[1:] @ w.T).mean(0).argmax())]  # position 0 is never scored (attention sink)
        assert [(d.rule, d.category) for d in r.decisions] == [("r", want)]
        scan = g.score([p], responses=[r.text], chat=False)[0]
        assert [d.category for d in scan.decisions if d.rule == "r"] == [want]
        wants.append(want)
    assert len(set(wants)) > 1, wants  # the head really depends on the prompt
    with pytest.raises(PolicyError, match=r"categories\.reads"):
        _policy(tmp_path, {"weights": "h.safetensors", "reads": "answer"})


@pytest.mark.parametrize(("head", "message"), [
    ("nolabels", "metadata 'labels'"),
    ("shape", "needs 'weight' (2, 64) and 'bias' (2,)"),
    ("action", "categories.actions: unknown categories ['z']; valid: a, b"),
    ("missing", "categories.weights"),
])
def test_bad_heads_are_named(lm: Any, tok: Any, tmp_path: Path, head: str, message: str) -> None:
    labels = None if head == "nolabels" else ["a", "b"]
    width = 32 if head == "shape" else HIDDEN
    if head != "missing":
        _head(tmp_path / "h.safetensors", torch.zeros(2, width), torch.zeros(2), labels)
    spec = {"weights": "h.safetensors", **({"actions": {"z": "flag"}} if head == "action" else {})}
    with pytest.raises(PolicyError, match="rules\\[0\\]\\.categories") as err:
        GuardedModel(lm("llama"), tok, _policy(tmp_path, spec))
    assert message in str(err.value)


def test_schema_checks_actions_and_rebases_the_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"categories\.actions: \['b'\] steer, but this rule has no steer"):
        _policy(tmp_path, {"weights": "h.safetensors", "actions": {"b": "steer"}})
    with pytest.raises(PolicyError, match="min_prob"):
        _policy(tmp_path, {"weights": "h.safetensors", "min_prob": 1.5})
    with pytest.raises(PolicyError, match=r"rules\[0\]\.categories\.weightz: unknown key 'weightz'; valid: weights, "
                                          r"min_prob, actions, reads"):
        _policy(tmp_path, {"weightz": "h.safetensors"})
    pol = _policy(tmp_path, {"weights": "h.safetensors"})
    moved = pol.rebased(tmp_path / "elsewhere")
    assert Path(moved.resolve(moved.rules[0].categories.weights)) == (tmp_path / "h.safetensors").resolve()  # type: ignore[union-attr]


def test_onnx_export_refuses_actions_per_category(lm: Any, tok: Any, tmp_path: Path) -> None:
    from guardrails.onnx.export import OnnxGuardError, export_onnx

    _head(tmp_path / "h.safetensors", torch.zeros(2, HIDDEN), torch.zeros(2), ["a", "b"])
    pol = _policy(tmp_path, {"weights": "h.safetensors", "actions": {"b": "flag"}})
    with pytest.raises(OnnxGuardError, match=r"actions per category .*valid: remove 'actions'"):
        export_onnx(pol, tmp_path / "onnx", model=lm("llama"), tokenizer=tok)
    assert not (tmp_path / "onnx").exists()


def test_validate_checks_the_head_shape(tmp_path: Path) -> None:
    from guardrails.cli.checks import check_policy

    _head(tmp_path / "h.safetensors", torch.zeros(2, 32), torch.zeros(2), ["a", "b"])
    problems, _ = check_policy(_policy(tmp_path, {"weights": "h.safetensors"}))  # model: bundled (hidden 576)
    assert any("rules[0].categories.weights: 'weight' has shape [2, 32], the model needs [n_categories, 576]" in p
               for p in problems), problems


def test_eval_reports_how_the_head_names_labelled_rows(lm: Any, tok: Any, tmp_path: Path) -> None:
    """``guardrails eval`` on rows with a ``category``: the share of fired label-1 rows named, and named right,
    read from the decisions of a scan."""
    from guardrails.offline.calibrate import load_labeled
    from guardrails.offline.evaluate import category_naming

    _head(tmp_path / "h.safetensors", torch.zeros(2, HIDDEN), torch.tensor([0.0, 5.0]), ["a", "b"])
    g = GuardedModel(lm("llama"), tok, _policy(tmp_path, {"weights": "h.safetensors"}))
    rows = [("bread", 1, "b"), ("fox", 1, "a"), ("capital", 1, "b"), ("story", 0, "b"), ("paint", 1, "-")]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t, "label": y, "category": c}) + "\n"
                                              for t, y, c in rows))
    got = category_naming(g, load_labeled(tmp_path / "d.jsonl"), ["r"])
    assert got == {"r": {"rows": 3, "fired": 3, "named": 1.0, "right_of_named": round(2 / 3, 4), "labels": ["a", "b"],
                         "unknown": []}}
    (tmp_path / "other.jsonl").write_text(json.dumps({"text": "bread", "label": 1, "category": "Physical harm"}) + "\n")
    other = category_naming(g, load_labeled(tmp_path / "other.jsonl"), ["r"])["r"]  # another taxonomy's label
    assert other["unknown"] == ["Physical harm"] and other["right_of_named"] == 0.0
    assert category_naming(g, load_labeled(tmp_path / "d.jsonl"), []) == {}  # no rule with a head asked for
