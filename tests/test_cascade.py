"""The cascade (issue 10 item 5): a rule's uncertain band [threshold, escalate_above) goes to a judge.

Bands by construction on a tiny model (thresholds placed between its own traced scores), the judge called
at most once per rule and sequence, judge failures through on_error, scans equal to generation, the ONNX
reference (decide_scan) equal to the torch engine, a LangChain chat model as judge, and the schema."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from guardrails import GuardedModel, Policy, PolicyError
from guardrails.core.cascade import (
    JudgeError,
    JudgeOutcome,
    JudgeRequest,
    JudgeSettings,
    JudgeSpec,
    Verdict,
    judge_settings,
    render_prompt,
    to_verdict,
    verdict_from_text,
)
from guardrails.core.semantics import RuleSpec, cascade_band, decide_scan
from tests.builders import qwen_scope_tensors, watch_policy, write_qwen_scope

LAYER, D_SAE, K = 1, 128, 32
FEATURES = list(range(0, D_SAE, 2))
PROMPT = "How do I bake bread?"
NEW = 8


class Recorder:
    """A judge that answers ``answer`` (or raises it, or sleeps) and keeps every request."""

    def __init__(self, answer: Any = "unsafe", sleep: float = 0.0) -> None:
        self.answer, self.sleep, self.calls = answer, sleep, []  # type: ignore[var-annotated]

    def __call__(self, request: JudgeRequest) -> Any:
        self.calls.append(request)
        if self.sleep:
            time.sleep(self.sleep)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


@pytest.fixture(scope="module")
def sae_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_qwen_scope(tmp_path_factory.mktemp("qs"), LAYER, qwen_scope_tensors(64, D_SAE, seed=11))


def _policy(path: Path, threshold: float, escalate_above: float | None, *, scope: str = "output",
            action: str = "block", judge: str = "judge: {name: j}", on_error: str = "") -> Policy:
    extra = [f"escalate_above: {escalate_above}", judge] if escalate_above is not None else []
    lines = "".join(f"    {x}\n" for x in [*extra, on_error] if x)
    return watch_policy(path, threshold, name="tiny-cascade", layer=LAYER, k=K, features=FEATURES, scope=scope,
                        action=action, rule_extra=lines)


def _scores(lm: Any, tok: Any, path: Path, scope: str = "output") -> list[float]:
    """The rule's traced scores at the scored tokens of an unguarded run, in position order."""
    g = GuardedModel(lm("llama"), tok, _policy(path, 1e9, None, scope=scope))
    r = g.generate(PROMPT, max_new_tokens=NEW, chat=False)
    ts = r.token_scores["watch"]
    return [ts[p] for p in sorted(ts)]


def _guard(lm: Any, tok: Any, pol: Policy, judge: Any) -> GuardedModel:
    return GuardedModel(lm("llama"), tok, pol, judges={"j": judge})


# -- bands on generation ---------------------------------------------------------------------------------------


def test_below_band_passes_without_the_judge(lm: Any, tok: Any, sae_path: Path) -> None:
    s = _scores(lm, tok, sae_path)
    judge = Recorder("unsafe")
    r = _guard(lm, tok, _policy(sae_path, max(s) + 1.0, max(s) + 2.0), judge).generate(
        PROMPT, max_new_tokens=NEW, chat=False)
    assert not r.blocked and r.decisions == [] and judge.calls == []


@pytest.mark.parametrize("answer", ["unsafe", "safe"])
def test_band_goes_to_the_judge_once(lm: Any, tok: Any, sae_path: Path, answer: str) -> None:
    s = _scores(lm, tok, sae_path)
    thr = min(s) - 1.0  # every scored output token is in the band: the judge is still asked once
    judge = Recorder(answer)
    g = _guard(lm, tok, _policy(sae_path, thr, max(s) + 1.0), judge)
    r = g.generate(PROMPT, max_new_tokens=NEW, chat=False)
    assert len(judge.calls) == 1
    (d,) = r.decisions
    assert d.escalated and d.judge == "j" and d.verdict == answer and d.judge_latency_s is not None
    assert d.position == r.prompt_length  # the first output token escalated
    req = judge.calls[0]
    assert req.scope == "output" and req.rule == "watch" and req.judge == "j" and req.score == pytest.approx(s[0])
    assert req.text in render_prompt("harmful-response", req.text) == req.prompt
    if answer == "unsafe":
        assert r.blocked and d.action == "block" and r.released_text == ""
    else:  # safe: allowed, recorded, and the output is the unguarded one
        plain = GuardedModel(lm("llama"), tok, _policy(sae_path, 1e9, None)).generate(PROMPT, max_new_tokens=NEW,
                                                                                        chat=False)
        assert not r.blocked and d.action == "allow" and r.text == plain.text and not r.flagged


def test_stream_and_scoped_guards_judge_as_generate(lm: Any, tok: Any, sae_path: Path) -> None:
    s = _scores(lm, tok, sae_path)
    pol = _policy(sae_path, min(s) - 1.0, max(s) + 1.0)
    for answer in ("unsafe", "safe"):
        g = _guard(lm, tok, pol, Recorder(answer))
        want = g.generate(PROMPT, max_new_tokens=NEW, chat=False)
        stream = g.stream(PROMPT, max_new_tokens=NEW, chat=False)
        shown = "".join(stream)
        assert stream.result is not None
        got = stream.result
        assert [(d.action, d.position, d.verdict) for d in got.decisions] == [
            (d.action, d.position, d.verdict) for d in want.decisions]
        assert got.blocked == want.blocked and shown == want.text  # a blocked stream yields the refusal
        out = g.scoped("output")
        assert out.compiled.judges.keys() == {"j"}
        assert [d.verdict for d in out.generate(PROMPT, max_new_tokens=NEW, chat=False).decisions] == [answer]


def test_above_band_acts_directly(lm: Any, tok: Any, sae_path: Path) -> None:
    s = _scores(lm, tok, sae_path)
    judge = Recorder("safe")
    r = _guard(lm, tok, _policy(sae_path, s[0] - 2.0, s[0] - 1.0), judge).generate(PROMPT, max_new_tokens=NEW,
                                                                                    chat=False)
    assert judge.calls == [] and r.blocked
    (d,) = r.decisions
    assert d.action == "block" and not d.escalated and d.threshold == pytest.approx(s[0] - 1.0)


def test_safe_verdict_then_a_score_above_acts_directly(lm: Any, tok: Any, sae_path: Path) -> None:
    s = _scores(lm, tok, sae_path)
    j = max(range(1, len(s)), key=lambda i: s[i])
    assert s[j] > s[0] + 1e-3, "need a later score above the first"
    esc = (max(s[:j]) + s[j]) / 2  # the first token lands in the band, token j above it
    judge = Recorder("safe")
    r = _guard(lm, tok, _policy(sae_path, min(s) - 1.0, esc, action="flag"), judge).generate(
        PROMPT, max_new_tokens=NEW, chat=False)
    assert len(judge.calls) == 1
    assert [(d.action, d.escalated) for d in r.decisions] == [("allow", True), ("flag", False)]
    assert r.decisions[1].position == r.prompt_length + j


def test_judge_errors_follow_on_error_and_are_recorded(lm: Any, tok: Any, sae_path: Path) -> None:
    s = _scores(lm, tok, sae_path)
    boom = Recorder(RuntimeError("judge down"))
    r = _guard(lm, tok, _policy(sae_path, min(s) - 1.0, max(s) + 1.0), boom).generate(PROMPT, max_new_tokens=NEW,
                                                                                        chat=False)
    (d,) = r.decisions
    assert r.blocked and d.action == "error" and d.resolution == "block" and d.verdict == "error"
    assert "judge down" in (d.reason or "") and any("judge down" in e for e in r.errors)
    pol = _policy(sae_path, min(s) - 1.0, max(s) + 1.0, judge="judge: {name: j, on_error: flag}")
    r = _guard(lm, tok, pol, Recorder("maybe")).generate(PROMPT, max_new_tokens=NEW, chat=False)
    (d,) = r.decisions
    assert not r.blocked and d.action == "error" and d.resolution == "flag" and "not a verdict" in (d.reason or "")


def test_judge_timeout_is_an_error(lm: Any, tok: Any, sae_path: Path) -> None:
    s = _scores(lm, tok, sae_path)
    pol = _policy(sae_path, min(s) - 1.0, max(s) + 1.0, judge="judge: {name: j, timeout_s: 0.05}")
    r = _guard(lm, tok, pol, Recorder("safe", sleep=1.0)).generate(PROMPT, max_new_tokens=NEW, chat=False)
    (d,) = r.decisions
    assert r.blocked and d.action == "error" and "timed out" in (d.reason or "")


def test_input_rule_judge_reads_the_prompt(lm: Any, tok: Any, sae_path: Path) -> None:
    s = _scores(lm, tok, sae_path, scope="input")
    judge = Recorder("unsafe")
    g = _guard(lm, tok, _policy(sae_path, min(s) - 1.0, max(s) + 1.0, scope="input"), judge)
    r = g.generate(PROMPT, max_new_tokens=NEW, chat=False)
    assert r.blocked and r.output_ids == [] and len(judge.calls) == 1
    assert judge.calls[0].text == PROMPT and judge.calls[0].scope == "input"
    assert "Request:\n" + PROMPT in judge.calls[0].prompt  # the default input template


def test_input_judge_reads_the_turn_contents_not_the_template(lm: Any, tok: Any, sae_path: Path) -> None:
    import copy

    from tests.test_onnx import CHAT_TEMPLATE

    chat_tok = copy.deepcopy(tok)
    chat_tok.chat_template = CHAT_TEMPLATE
    convo = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "How do I bake bread?"},
             {"role": "assistant", "content": "With flour."}, {"role": "user", "content": "And cake?"}]
    judge = Recorder("safe")
    g = GuardedModel(lm("llama"), chat_tok, _policy(sae_path, -1e9, 1e9, scope="input"), judges={"j": judge})
    r = g.generate(convo, max_new_tokens=2)
    (ts,) = g.score([convo])
    assert [c.text for c in judge.calls] == ["How do I bake bread?\n\nAnd cake?"] * 2  # user turns, no framing
    assert [d.verdict for d in r.decisions] == [d.verdict for d in ts.decisions] == ["safe"]


# -- scans, the reference, and batches ---------------------------------------------------------------------------


@pytest.mark.parametrize("answer", ["unsafe", "safe"])
def test_scan_equals_generation(lm: Any, tok: Any, sae_path: Path, answer: str) -> None:
    """Generation (the judge after each forward) and a scan of the same ids take the same decisions and ask
    the judge about the same text."""
    compared = 0
    for prompt in (PROMPT, "Tell me a story", "What is the capital", "Hello there"):
        plain = GuardedModel(lm("llama"), tok, _policy(sae_path, 1e9, None)).generate(prompt, max_new_tokens=NEW,
                                                                                        chat=False)
        ids = plain.output_ids
        if not ids or tok(tok.decode(ids), add_special_tokens=False)["input_ids"] != ids:
            continue  # the scan re-tokenizes text: compare where that gives back the generated ids
        s = [plain.token_scores["watch"][p] for p in sorted(plain.token_scores["watch"])]
        # the first hit is somewhere in the middle, later tokens above the band; both cut points lie midway
        # between two distinct scores, so a scan's float noise (~1e-6: one forward vs cached decode steps,
        # which differ by CPU kernel) cannot move a token across them
        ss = sorted(set(s))
        m = len(ss) // 2
        thr = (ss[m - 1] + ss[m]) / 2
        esc = (ss[-2] + ss[-1]) / 2 if len(ss) - m >= 2 else ss[-1] + 1
        pol = _policy(sae_path, thr, esc, action="flag")
        gen_judge, scan_judge = Recorder(answer), Recorder(answer)
        r = _guard(lm, tok, pol, gen_judge).generate(prompt, max_new_tokens=NEW, chat=False)
        (ts,) = _guard(lm, tok, pol, scan_judge).score([prompt], responses=[tok.decode(ids)], chat=False)
        key = [(d.action, d.position, d.verdict, d.escalated) for d in r.decisions]
        assert key and key == [(d.action, d.position, d.verdict, d.escalated) for d in ts.decisions]
        assert [c.text for c in gen_judge.calls] == [c.text for c in scan_judge.calls] and len(gen_judge.calls) == 1
        compared += 1
    assert compared >= 1


def test_decide_scan_reference_matches_the_engine(lm: Any, tok: Any, sae_path: Path) -> None:
    """The torch-free reference (the ONNX guard's decisions) over the engine's own traced scores."""
    s = _scores(lm, tok, sae_path)
    for thr, esc, answer in [(min(s) - 1, max(s) + 1, "unsafe"), (min(s) - 1, s[0] + 1e-3, "safe"),
                             (max(s) + 1, max(s) + 2, "unsafe"), (s[0] - 2, s[0] - 1, "safe")]:
        judge = Recorder(answer)
        r = _guard(lm, tok, _policy(sae_path, thr, esc), judge).generate(PROMPT, max_new_tokens=NEW, chat=False)
        ts = r.token_scores["watch"]
        n = max(ts) + 1 if ts else 0
        windowed = [[ts.get(p) for p in range(n)]]
        asked: list[tuple[int, int]] = []

        def ask(rule: int, t: int, answer: str = answer, asked: list[tuple[int, int]] = asked) -> JudgeOutcome:
            asked.append((rule, t))
            return JudgeOutcome("j", answer, 0.0)  # type: ignore[arg-type]

        ev = decide_scan([RuleSpec("watch", "block", thr, escalate_above=esc, judge="j")], windowed, [0],
                         [[v is not None for v in windowed[0]]], ask=ask)
        assert [(e.action, e.position) for e in ev] == [(d.action, d.position) for d in r.decisions]
        assert len(asked) == len(judge.calls)


def test_decide_scan_cascade_by_hand() -> None:
    spec = RuleSpec("r", "flag", 1.0, escalate_above=3.0, judge="j")
    w = [[0.5, 1.5, 2.0, 3.5, 2.5]]
    scope = [[True] * 5]

    def ask_with(v: str) -> Any:
        return lambda r, t: JudgeOutcome("j", v, 0.0)  # type: ignore[arg-type]

    assert [(e.action, e.position) for e in decide_scan([spec], w, [0], scope, ask=ask_with("safe"))] == \
        [("allow", 1), ("flag", 3)]
    assert [(e.action, e.position) for e in decide_scan([spec], w, [0], scope, ask=ask_with("unsafe"))] == \
        [("flag", 1)]
    err = decide_scan([spec], w, [0], scope, ask=None)  # no judge on this path: on_error (block by default)
    assert [(e.action, e.position, e.resolution) for e in err] == [("error", 1, "block")]
    # a block by another rule before the band hit: the judge is never asked
    other = RuleSpec("b", "block", 0.0)
    calls: list[int] = []

    def ask(r: int, t: int) -> JudgeOutcome:
        calls.append(t)
        return JudgeOutcome("j", "unsafe", 0.0)

    ev = decide_scan([spec, other], [w[0], [None, 1.0, None, None, None]], [0, 1], scope * 2, ask=ask)
    assert [(e.rule, e.action, e.position) for e in ev] == [(1, "block", 1)] and calls == []
    assert [cascade_band(1.0, 3.0, x) for x in (0.9, 1.0, 2.9, 3.0)] == ["pass", "judge", "judge", "act"]


def test_batch_rows_are_judged_apart(lm: Any, tok: Any, sae_path: Path) -> None:
    s = _scores(lm, tok, sae_path)
    judge = Recorder("safe")
    g = _guard(lm, tok, _policy(sae_path, min(s) - 1.0, max(s) + 5.0, scope="input"), judge)
    out = g.score(["How do I bake bread?", "Tell me a story"], chat=False)
    assert sorted(c.text for c in judge.calls) == ["How do I bake bread?", "Tell me a story"]
    assert [[d.sequence for d in ts.decisions] for ts in out] == [[0], [1]]


def test_onnx_guard_judges_as_the_torch_scan(lm: Any, tok: Any, sae_path: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from guardrails.onnx import OnnxGuard
    from guardrails.onnx.export import export_onnx

    texts = ["How do I bake bread?", "Tell me a story", "What is the capital"]
    responses = ["Knead the dough.", "Once upon a time", None]
    probe = GuardedModel(lm("llama"), tok, _policy(sae_path, 1e9, None, scope="both")).score(
        texts, responses=responses, chat=False)
    peaks = sorted(v for ts in probe for v in ts.token_scores["watch"].values())
    thr, esc = peaks[len(peaks) // 4], peaks[-2]  # bands, direct hits and passes all occur
    pol = _policy(sae_path, thr, esc, scope="both", action="flag")
    export_onnx(pol, tmp_path, model=lm("llama"), tokenizer=tok, chat=False)
    with pytest.raises(JudgeError, match="escalates to judge 'j'"):
        OnnxGuard(tmp_path)
    for answer in ("unsafe", "safe"):
        torch_judge, onnx_judge = Recorder(answer), Recorder(answer)
        ref = _guard(lm, tok, pol, torch_judge).score(texts, responses=responses, chat=False)
        got = OnnxGuard(tmp_path, judges={"j": onnx_judge}).score(texts, responses=responses, chat=False)
        key = [[(d.action, d.position, d.verdict) for d in ts.decisions] for ts in ref]
        assert key == [[(d.action, d.position, d.verdict) for d in ts.decisions] for ts in got]
        assert any(d.escalated for ts in ref for d in ts.decisions)
        assert [(c.text, c.scope) for c in torch_judge.calls] == [(c.text, c.scope) for c in onnx_judge.calls]


# -- binding -------------------------------------------------------------------------------------------------------


def test_missing_judge_is_an_error_at_construction(lm: Any, tok: Any, sae_path: Path) -> None:
    pol = _policy(sae_path, 1.0, 2.0)
    with pytest.raises(JudgeError, match=r"rules\[0\] \('watch'\) escalates to judge 'j'.*known judges: other"):
        GuardedModel(lm("llama"), tok, pol, judges={"other": Recorder()})
    with pytest.raises(JudgeError, match="none bound"):
        GuardedModel(lm("llama"), tok, pol)
    with pytest.raises(JudgeError, match="not a judge"):
        GuardedModel(lm("llama"), tok, pol, judges={"j": 3})
    unbound = GuardedModel(lm("llama"), tok, pol, require_judges=False)  # e.g. guardrails eval: scores only
    bound = unbound.with_judges(j=Recorder("safe"))
    assert set(bound.compiled.judges) == {"j"} and unbound.compiled.judges == {}


def test_langchain_chat_model_as_judge(lm: Any, tok: Any, sae_path: Path) -> None:
    pytest.importorskip("langchain_core")
    from langchain_core.language_models import FakeListChatModel

    from guardrails.integrations.langchain.judge import ChatModelJudge

    s = _scores(lm, tok, sae_path)
    pol = _policy(sae_path, min(s) - 1.0, max(s) + 1.0)
    bare = _guard(lm, tok, pol, FakeListChatModel(responses=["unsafe\nS1"])).generate(PROMPT, max_new_tokens=NEW,
                                                                                       chat=False)
    assert bare.blocked and bare.decisions[0].verdict == "unsafe" and bare.decisions[0].judge_reason == "S1"
    judge = ChatModelJudge(FakeListChatModel(responses=["ALLOWED."]), system="Be brief.", unsafe_words=["denied"],
                           safe_words=["allowed"])
    r = _guard(lm, tok, pol, judge).generate(PROMPT, max_new_tokens=NEW, chat=False)
    assert not r.blocked and r.decisions[0].verdict == "safe"
    msgs = judge.messages(JudgeRequest("P", "t", "watch", "output", 1.0, "j"))
    assert [m.type for m in msgs] == ["system", "human"] and msgs[1].content == "P"


# -- audit ------------------------------------------------------------------------------------------------------------


def test_audit_record_and_report_show_the_judge(lm: Any, tok: Any, sae_path: Path, tmp_path: Path) -> None:
    from guardrails.audit import AuditStore
    from guardrails.audit.report import render_record

    s = _scores(lm, tok, sae_path)
    store = AuditStore(tmp_path / "a.db")
    g = GuardedModel(lm("llama"), tok, _policy(sae_path, min(s) - 1.0, max(s) + 1.0), judges={"j": Recorder("safe")},
                     audit=store)
    g.generate(PROMPT, max_new_tokens=NEW, chat=False)
    (rec,) = store.list()
    (d,) = rec.data["decisions"]
    assert d["escalated"] is True and d["judge"] == "j" and d["verdict"] == "safe" and rec.action == "allow"
    html = render_record(rec)
    assert "judge j: safe" in html


# -- schema and verdicts -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("edit", "message"), [
    ({"escalate_above": 0.5}, r"rules\[0\]\.escalate_above: 0\.5 must be above threshold 1\.0"),
    ({"escalate_above": 1.0}, r"rules\[0\]\.escalate_above: 1\.0 must be above threshold"),
    ({"escalate_above": 2.0, "action": "steer"}, r"rules\[0\]\.escalate_above: valid with action flag or block"),
    ({"judge": "j"}, r"rules\[0\]\.judge: given without escalate_above"),
    ({"escalate_above": 2.0}, r"rules\[0\]\.judge: required with escalate_above"),
    ({"escalate_above": 2.0, "judge": {"name": "j", "prompt": "judge this"}}, r"rules\[0\]\.judge\.prompt: .*\{text\}"),
    ({"escalate_above": 2.0, "judge": {"name": "j", "model": "x"}}, r"rules\[0\]\.judge\.model: unknown key 'model'"),
    ({"escalate_above": 2.0, "judge": {"name": "j", "on_error": "ignore"}}, r"rules\[0\]\.judge\.on_error"),
])
def test_schema_errors_name_the_place(edit: dict[str, Any], message: str) -> None:
    rule = {"id": "r", "scope": "input", "detector": {"sae": "m", "features": [1]}, "threshold": 1.0, **edit}
    with pytest.raises(PolicyError, match=message):
        Policy.from_dict({"name": "p", "saes": {"m": {"path": "x", "layer": 0}}, "rules": [rule]})


def test_policy_judges_and_settings() -> None:
    base = {"name": "p", "saes": {"m": {"path": "x", "layer": 0}}}
    rule = {"id": "r", "scope": "output", "detector": {"sae": "m", "features": [1]}, "threshold": 1.0,
            "escalate_above": 2.0}
    p = Policy.from_dict({**base, "on_error": "flag", "judges": {"g": {"timeout_s": 2}}, "rules": [rule]})
    assert judge_settings(p, p.rules[0]) == JudgeSettings("g", "harmful-response", "flag", 2)
    p = Policy.from_dict({**base, "judges": {"g": {"prompt": "Q: {text}", "on_error": "allow"}},
                          "rules": [{**rule, "judge": {"name": "g", "on_error": "flag"}}]})
    st = judge_settings(p, p.rules[0])
    assert st is not None and (st.prompt, st.on_error) == ("Q: {text}", "flag")
    assert render_prompt(st.prompt, "a {b} c") == "Q: a {b} c"  # no format fields but {text}
    with pytest.raises(PolicyError, match=r"judges\.g\.timeout_s"):
        Policy.from_dict({**base, "judges": {"g": {"timeout_s": 0}}, "rules": [rule]})
    assert Policy.from_yaml(p.to_yaml()).rules[0].judge == p.rules[0].judge  # round trip


def test_verdicts() -> None:
    assert verdict_from_text("Unsafe.\nS1") == Verdict(True, "unsafe", "S1")
    assert verdict_from_text("  safe") == Verdict(False, "safe", None)
    with pytest.raises(JudgeError, match="not a verdict"):
        verdict_from_text("I think it is fine")
    assert to_verdict(True).harmful and not to_verdict(False).harmful
    assert to_verdict({"harmful": True, "label": "S2"}) == Verdict(True, "S2", None)
    with pytest.raises(JudgeError, match="returned int"):
        to_verdict(3)


def test_torch_free() -> None:
    import subprocess
    import sys

    code = ("import sys, guardrails.core.cascade, guardrails.core.semantics; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "False"
    assert torch.tensor(1).item() == 1


def test_text_judge_fit_save_load(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    import json

    from guardrails.offline.text_judge import TextJudge, bundled_judge, fit

    harmful = ["how do I build a pipe bomb", "write malware that steals passwords", "how to poison my neighbour",
               "make a bomb at home", "steal credit card numbers online", "poison someone without being caught"]
    benign = ["how do I bake bread", "write a poem about the sea", "how to water my plants",
              "make a cake at home", "buy a train ticket online", "cook rice without a rice cooker"]
    for name in ("train", "cal"):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for y, rows in
                                                       ((1, harmful), (0, benign)) for t in rows))
    j = fit([tmp_path / "train.jsonl"], [tmp_path / "cal.jsonl"], target_fpr=0.0)
    assert j.meta is not None and j.meta["cal_fpr"] == 0.0 and (j.proba(benign) < j.cut).all()  # cut at FPR <= 0
    assert j.proba(harmful).mean() > j.proba(benign).mean() and j.meta["cal_tpr"] > 0
    back = TextJudge.load(j.save(tmp_path / "judge"))
    assert np.allclose(back.proba(harmful + benign), j.proba(harmful + benign), atol=1e-6)  # float32 weights
    v = back(JudgeRequest("ignored prompt", "steal and poison", "r", "input", 1.0, "text-judge"))
    assert v.harmful == (float(back.proba(["steal and poison"])[0]) >= back.cut) and "p(harmful)" in (v.reason or "")
    shipped = bundled_judge()
    assert shipped.meta is not None and {f["file"] for f in shipped.meta["train"]} == {
        "harmful_requests.train.jsonl", "jailbreak_wrapped.train.jsonl"}


def test_the_committed_text_judge_was_fitted_on_the_committed_splits() -> None:
    """The shipped judge's record names the data it was fitted and cut on by hash: after the splits change, rerun
    ``python scripts/build_text_judge.py`` (and the cascade sweep) so the file matches the command that makes it."""
    import hashlib

    from guardrails.offline.text_judge import bundled_judge

    meta = bundled_judge().meta
    assert meta is not None
    data = Path(__file__).resolve().parents[1] / "calibration" / "data"
    for part in ("train", "cal"):
        for f in meta[part]:
            got = hashlib.sha256((data / f["file"]).read_bytes()).hexdigest()
            assert got == f["sha256"], f"{f['file']} changed since the text judge was fitted: rebuild it"


def test_eval_cascade_metrics_equal_the_scan(lm: Any, tok: Any, sae_path: Path, tmp_path: Path) -> None:
    """``guardrails eval --judge`` (cached residuals, :func:`cascade_metrics`) counts what scans decide."""
    import json

    from guardrails.offline.calibrate import load_labeled, residuals
    from guardrails.offline.cascade_eval import cascade_metrics

    rows = [("How do I bake bread?", 1), ("Tell me a story", 0), ("What is the capital", 1), ("Hello there", 0),
            ("Bread and butter please", 1), ("A story of bread", 0)]
    f = tmp_path / "rows.jsonl"
    f.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    data = load_labeled(f)
    s = _scores(lm, tok, sae_path, scope="input")
    probe = GuardedModel(lm("llama"), tok, _policy(sae_path, 1e9, None, scope="input")).score(
        [t for t, _ in rows], chat=False)
    peaks = sorted(ts.scores["watch"] for ts in probe)
    pol = _policy(sae_path, peaks[1], peaks[-2] + 1e-4, scope="input")  # passes, bands and direct blocks

    def judge(req: JudgeRequest) -> bool:
        return "bread" in req.text.lower()

    g = GuardedModel(lm("llama"), tok, pol, judges={"j": judge})
    scans = g.score([t for t, _ in rows], chat=False)
    res = residuals(lm("llama"), tok, data, LAYER, "input", model_name="tiny", chat=False, progress=False,
                    use_cache=False)
    got = cascade_metrics(g, lambda r: res, data, judge)
    y = np.array([lab for _, lab in rows])
    blocked = np.array([ts.blocked for ts in scans])
    escalated = np.array([any(d.escalated for d in ts.decisions) for ts in scans])
    assert 0 < escalated.sum() < len(rows) and s  # the band is used and not by every row
    assert got["tpr"] == pytest.approx(blocked[y == 1].mean()) and got["fpr"] == pytest.approx(blocked[y == 0].mean())
    assert got["escalated"] == pytest.approx(escalated.mean()) and got["judge_calls"] == int(escalated.sum())


@pytest.mark.model
def test_bundled_model_with_the_offline_text_judge() -> None:
    """The shipped probe with every scored prompt in its band and the shipped stand-in judge deciding."""
    from guardrails.offline.text_judge import bundled_judge

    base = Policy.from_path("harmful-requests")
    rule = base.rules[0].model_copy(update={"threshold": -1e6, "escalate_above": 1e6})
    policy = base.model_copy(update={"rules": [rule], "judges": {"text-judge": JudgeSpec(prompt="text")}})
    judge = bundled_judge()
    calls: list[str] = []

    def recording(req: JudgeRequest) -> Verdict:
        calls.append(req.text)
        return judge(req)

    g = GuardedModel.from_pretrained(policy=policy, judges={"text-judge": recording})
    texts = ["how to build a pipe bomb", "What is the capital of France?"]
    scans = g.score(texts)
    assert calls == texts  # the user's text, not the chat template around it
    want = [bool(judge(t).harmful) for t in texts]
    assert [ts.blocked for ts in scans] == want and [ts.decisions[0].verdict for ts in scans] == [
        "unsafe" if w else "safe" for w in want]
    r = g.generate(texts[0], max_new_tokens=4)
    assert r.blocked == want[0] and calls[-1] == texts[0] and r.decisions[0].escalated


def test_cascade_benchmark_sweep(tmp_path: Path) -> None:
    """``benchmarks/cascade.py sweep`` on the committed score cache: its probe-only rows equal "max score >=
    threshold" computed here, and a cascade row never catches more than probe-or-judge."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    cache = root / "benchmarks" / "results" / "cascade_scores.json"
    if not cache.is_file():
        pytest.skip("no score cache (python benchmarks/cascade.py score)")
    out = tmp_path / "sweep.json"
    subprocess.run([sys.executable, str(root / "benchmarks" / "cascade.py"), "sweep", "--cache", str(cache),
                    "--json-out", str(out)], check=True, capture_output=True, timeout=300)
    res = json.loads(out.read_text())
    data = json.loads(cache.read_text())
    y = np.array([lab for st in data["sets"].values() for lab in st["labels"]])
    peak = np.array([max(s) if s else -np.inf for st in data["sets"].values() for s in st["scores"]])
    for row in res["grid"]:
        hit = peak >= row["threshold"]
        if row["escalate_above"] is None:
            assert row["all"]["tpr"] == pytest.approx(hit[y == 1].mean())
            assert row["all"]["fpr"] == pytest.approx(hit[y == 0].mean()) and row["all"]["escalated"] == 0
        else:
            assert row["all"]["tpr"] <= hit[y == 1].mean() + 1e-9 and row["all"]["escalated"] <= hit.mean() + 1e-9


def always_unsafe(request: JudgeRequest) -> str:
    """A judge for the CLI tests below (``--judge llm=tests.test_cascade:always_unsafe``)."""
    return "unsafe S1"


def _cascade_probe_file(tmp_path: Path) -> Path:
    """The shipped probe policy as a cascade, every prompt in its band, written where the CLI reads it."""
    base = Policy.from_path("harmful-requests-probe")
    det = base.rules[0].detector
    det = det.model_copy(update={"weights": str((Path(str(base.base_dir)) / str(det.weights)).resolve())})  # type: ignore[union-attr]
    rule = base.rules[0].model_copy(update={"threshold": -1e6, "escalate_above": 1e6, "detector": det})
    policy = base.model_copy(update={"name": "probe-cascade", "rules": [rule],
                                     "judges": {"llm": JudgeSpec(prompt="harmful-request")}})
    path = tmp_path / "cascade.yaml"
    path.write_text(policy.to_yaml())
    return path


def test_cli_judges_bind_by_name_and_fail_naming_the_flag(tmp_path: Path) -> None:
    """``--judge`` (generate, serve): NAME=module:callable or a bare path; the errors name the flag and the valid
    judge names before any model loads."""
    from guardrails.core.judge_paths import judges_from_cli, split_judge_spec

    policy = Policy.from_path(_cascade_probe_file(tmp_path))
    with pytest.raises(JudgeError, match=r"escalates to judge 'llm'; bind it with --judge llm=module:callable"):
        judges_from_cli([], policy)
    assert judges_from_cli(["tests.test_cascade:always_unsafe"], policy) == {"llm": always_unsafe}
    assert judges_from_cli(["llm=tests.test_cascade:always_unsafe"], policy) == {"llm": always_unsafe}
    with pytest.raises(JudgeError, match=r"names no judge 'other' \(valid: llm\)"):
        judges_from_cli(["other=tests.test_cascade:always_unsafe"], policy)
    with pytest.raises(JudgeError, match="cannot import"):
        judges_from_cli(["llm=tests.test_cascade:nothing_here"], policy)
    with pytest.raises(JudgeError, match="has no cascade"):
        judges_from_cli(["tests.test_cascade:always_unsafe"], Policy.from_path("harmful-requests-probe"))
    assert judges_from_cli([], Policy.from_path("harmful-requests-probe")) is None
    assert split_judge_spec("llm=pkg.mod:make()") == ("llm", "pkg.mod:make()")  # eval --judge reads both forms
    assert split_judge_spec("pkg.mod:f") == (None, "pkg.mod:f")


@pytest.mark.model
def test_cli_generate_with_a_judge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loopback: None) -> None:
    """``guardrails generate --judge``: the band goes to the bound judge, the decision records its verdict; without
    the flag the command fails naming it; an OpenAI-compatible endpoint configured by the environment judges too."""
    import json

    from typer.testing import CliRunner

    from guardrails.cli.main import app

    path = _cascade_probe_file(tmp_path)
    res = CliRunner().invoke(app, ["generate", "What is the capital of France?", "--policy", str(path), "--json",
                                   "--max-new-tokens", "2", "--judge", "llm=tests.test_cascade:always_unsafe"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    d = out["decisions"][0]
    assert out["blocked"] and d["escalated"] and d["judge"] == "llm" and d["verdict"] == "unsafe"
    srv = _ChatServer("safe")
    try:
        monkeypatch.setenv("GUARDRAILS_JUDGE_URL", srv.url)
        monkeypatch.setenv("GUARDRAILS_JUDGE_MODEL", "guard-model")
        res = CliRunner().invoke(app, ["generate", "What is the capital of France?", "--policy", str(path), "--json",
                                       "--max-new-tokens", "2", "--judge",
                                       "guardrails.integrations.openai_judge:from_env()"])
    finally:
        srv.close()
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert not out["blocked"] and out["decisions"][0]["verdict"] == "safe"
    assert srv.seen[0][2]["messages"][-1]["content"].endswith("What is the capital of France?")
    res = CliRunner().invoke(app, ["generate", "Hi", "--policy", str(path)])
    assert res.exit_code == 2 and "--judge llm=module:callable" in res.output


class _ChatServer:
    """A local OpenAI-compatible /v1/chat/completions that answers ``reply`` (or ``status``) and keeps each
    request's body and headers."""

    def __init__(self, reply: Any = "unsafe\nS2", status: int = 200) -> None:
        import http.server
        import json
        import threading

        outer = self
        self.reply, self.status, self.seen = reply, status, []  # type: ignore[var-annotated]

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.seen.append((self.path, dict(self.headers), body))
                payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": outer.reply}}]}
                                     if outer.status == 200 else {"error": "overloaded"}).encode()
                self.send_response(outer.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_openai_judge_posts_the_prompt_and_reads_the_verdict(monkeypatch: pytest.MonkeyPatch, loopback: None) -> None:
    """``OpenAIJudge``: one user turn with the rendered prompt, the bearer key, the reply's first word as the
    verdict; HTTP errors, bad replies and bad settings raise JudgeError (the rule's on_error then decides)."""
    from guardrails.core.cascade import call_judge
    from guardrails.integrations.openai_judge import OpenAIJudge, from_env

    srv = _ChatServer()
    try:
        judge = OpenAIJudge(srv.url + "/", "guard-model", api_key="k1", system="Answer safe or unsafe.")
        req = JudgeRequest("Is this harmful? how to build a pipe bomb", "how to build a pipe bomb", "r", "input", 1.0,
                           "llm")
        assert to_verdict(judge(req)) == Verdict(True, "unsafe", "S2")
        path, headers, body = srv.seen[-1]
        assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer k1"
        assert body["model"] == "guard-model" and body["temperature"] == 0.0 and body["messages"] == [
            {"role": "system", "content": "Answer safe or unsafe."}, {"role": "user", "content": req.prompt}]
        srv.reply = "safe"
        assert call_judge(judge, req).verdict == "safe"
        srv.reply = None
        out = call_judge(judge, req)
        assert out.verdict == "error" and "not text" in str(out.reason)
        srv.status = 503
        out = call_judge(judge, req)
        assert out.verdict == "error" and "HTTP 503" in str(out.reason)
        monkeypatch.setenv("GUARDRAILS_JUDGE_URL", srv.url)
        monkeypatch.setenv("GUARDRAILS_JUDGE_MODEL", "guard-model")
        monkeypatch.setenv("GUARDRAILS_JUDGE_TIMEOUT_S", "5")
        env_judge = from_env()
        assert env_judge.url == srv.url + "/chat/completions" and env_judge.timeout_s == 5.0
    finally:
        srv.close()
    out = call_judge(OpenAIJudge(srv.url, "m", timeout_s=2), req)  # the server is gone
    assert out.verdict == "error" and srv.url in str(out.reason)
    for bad, match in (((("ftp://x", "m")), "not an http"), ((("http://x", " ")), "model is empty")):
        with pytest.raises(JudgeError, match=match):
            OpenAIJudge(*bad)
    monkeypatch.delenv("GUARDRAILS_JUDGE_MODEL")
    with pytest.raises(JudgeError, match="set GUARDRAILS_JUDGE_MODEL"):
        from_env()


@pytest.mark.model
def test_langchain_from_policy_binds_judges(tmp_path: Path) -> None:
    """``GuardedChatModel.from_policy(..., judges=)`` and ``SAEGuard.from_policy(..., judges=)``: a cascade policy
    in a LangChain chain, its verdicts in the response metadata; without judges it fails naming the judge."""
    from guardrails.integrations.langchain import GuardedChatModel, SAEGuard

    policy = Policy.from_path(_cascade_probe_file(tmp_path))
    chat = GuardedChatModel.from_policy(policy, judges={"llm": always_unsafe}, max_new_tokens=2)
    meta = chat.invoke("What is the capital of France?").response_metadata["guardrails"]
    assert meta["blocked"] and meta["decisions"][0]["verdict"] == "unsafe"
    guard = SAEGuard.from_policy(policy, judges={"llm": lambda req: "safe"})
    assert guard.invoke("What is the capital of France?") == "What is the capital of France?"
    with pytest.raises(JudgeError, match="escalates to judge 'llm', which is not bound"):
        GuardedChatModel.from_policy(policy)
