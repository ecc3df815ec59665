"""LangChain integration: GuardedChatModel, SAEGuard, SAEGuardMiddleware.

Fast tests run a tiny Llama with the bundled tokenizer (it has a chat template) and a random SAE.
Rule scores are made exact where a test needs them: a detector with feature weight 0 and bias 1
scores every scored token 1, so with ``window: 4096, aggregate: sum`` the score at a token is the
number of scored tokens up to it, which the test counts independently with the tokenizer.
"""

from __future__ import annotations

import asyncio
import sys
import time
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models import FakeListChatModel, GenericFakeChatModel
from langchain_core.messages import AIMessage, HumanMessage, RemoveMessage, SystemMessage, ToolMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompt_values import ChatPromptValue, StringPromptValue
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda

import guardrails.integrations.langchain.chat as glc
from guardrails import GenerationResult, GuardedModel, GuardrailViolation, Policy, PolicyError
from guardrails.integrations.langchain.chat import GuardedChatModel, SAEGuard, to_turns
from tests.builders import bundled_tokenizer, random_sae, tiny_lm

REFUSAL = "I can't help with that."
WIDE = 4096


_tok = bundled_tokenizer


@cache
def _lm() -> Any:
    return tiny_lm("llama", _tok())  # sharper logits: greedy output varies from token to token


def policy(threshold: float, *, scope: str = "output", action: str = "block", counting: bool = True,
           window: int = 1, aggregate: str = "max", extra: str = "", steer: str = "") -> Policy:
    """One rule on SAE 's'. counting: score 1 per scored token (weight 0, bias 1); else features 0-7."""
    det = ("features: [{id: 0, weight: 0.0}], bias: 1.0" if counting
           else "features: [0, 1, 2, 3, 4, 5, 6, 7], combine: sum")
    return Policy.from_yaml(f"""
name: test-policy
{extra}
saes: {{s: {{path: unused, layer: 1}}}}
rules:
  - id: r
    scope: {scope}
    action: {action}
    threshold: {threshold}
    detector: {{sae: s, {det}, window: {window}, aggregate: {aggregate}}}
""" + (f"    steer: {{{steer}}}\n" if steer else ""))


def guarded(pol: Policy, sae: Any = None) -> GuardedModel:
    return GuardedModel(_lm(), _tok(), pol, saes={"s": sae if sae is not None else random_sae(d_sae=256)})


def chat(pol: Policy, **kw: Any) -> GuardedChatModel:
    return GuardedChatModel(guard=guarded(pol), max_new_tokens=kw.pop("max_new_tokens", 6), **kw)


PASS, BLOCK = 1e9, -1e9


def n_scored(text: str, roles: list[int] | None = None) -> int:
    """Tokens a guard scores in a formatted text: not special, not position 0 (and, given roles, user/tool turns)."""
    tok = _tok()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    special = set(tok.all_special_ids)
    ok = [roles is None or roles[i] in (1, 3) for i in range(len(ids))]  # ROLE_CODES: user 1, tool 3
    return sum(1 for i, t in enumerate(ids) if i > 0 and t not in special and ok[i])


# -- GuardedChatModel -------------------------------------------------------------------------------------------


def test_invoke_passes_and_matches_the_guarded_model() -> None:
    model = chat(policy(PASS))
    msg = model.invoke([SystemMessage("Be brief."), HumanMessage("Tell me a story")])
    ref = model.guard.generate([{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "Tell me a story"}], max_new_tokens=6)
    assert isinstance(ref, GenerationResult)
    assert msg.content == ref.text and ref.text
    meta = msg.response_metadata["guardrails"]
    assert meta["blocked"] is False and meta["decisions"] == [] and meta["policy"] == "test-policy"
    assert msg.usage_metadata["output_tokens"] == len(ref.output_ids)


def test_invoke_block_returns_refusal_with_decisions() -> None:
    msg = chat(policy(BLOCK)).invoke("hello")
    meta = msg.response_metadata["guardrails"]
    assert msg.content == REFUSAL
    assert meta["blocked"] is True and msg.response_metadata["finish_reason"] == "blocked"
    first = meta["decisions"][0]
    assert (first["action"], first["rule"], first["scope"], first["output_index"]) == ("block", "r", "output", 0)
    assert first["score"] == 1.0  # weight 0, bias 1: every scored token scores exactly 1


def test_raise_on_block_raises_violation_with_result() -> None:
    model = chat(policy(BLOCK, extra="raise_on_block: true"))
    with pytest.raises(GuardrailViolation, match=r"test-policy.*rule 'r'") as info:
        model.invoke("hello")
    assert isinstance(info.value.result, GenerationResult) and info.value.result.blocked
    with pytest.raises(GuardrailViolation):
        list(model.stream("hello"))


def test_batch_equals_separate_invokes() -> None:
    model = chat(policy(PASS))
    prompts = ["hello", "what is the capital of France?"]
    assert [m.content for m in model.batch(prompts)] == [model.invoke(p).content for p in prompts]


class Tokens(BaseCallbackHandler):
    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.ended = 0

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens.append(token)

    def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        self.ended += 1


def test_stream_equals_invoke_and_fires_token_callbacks() -> None:
    model = chat(policy(PASS))
    handler = Tokens()
    chunks = list(model.stream("Tell me a story", config={"callbacks": [handler]}))
    assert "".join(c.content for c in chunks) == model.invoke("Tell me a story").content
    assert handler.tokens == [c.content for c in chunks] and handler.ended == 1
    assert len([c for c in chunks if c.content]) > 1  # really streamed, not one piece
    assert chunks[-1].response_metadata["guardrails"]["blocked"] is False


def test_stream_never_shows_the_tripping_token() -> None:
    # output score at output token i is i + 1 (count of scored output tokens): threshold 3 trips at i = 2
    free = chat(policy(PASS), max_new_tokens=6).guard.generate("Tell me a story", max_new_tokens=6)
    assert isinstance(free, GenerationResult)
    ids = free.output_ids
    assert len(ids) >= 3 and not set(ids[:3]) & set(_tok().all_special_ids)
    model = chat(policy(3, window=WIDE, aggregate="sum"))
    chunks = list(model.stream("Tell me a story"))
    shown = "".join(c.content for c in chunks)
    assert shown == _tok().decode(ids[:2]) + "\n" + REFUSAL
    assert _tok().decode(ids[:3]) not in shown
    meta = chunks[-1].response_metadata["guardrails"]
    assert meta["blocked"] and meta["decisions"][0]["output_index"] == 2 and meta["decisions"][0]["score"] == 3.0
    assert model.invoke("Tell me a story").content == REFUSAL


def test_block_decision_names_the_tripping_token() -> None:
    free = chat(policy(PASS)).guard.generate("Tell me a story", max_new_tokens=6)
    assert isinstance(free, GenerationResult)
    meta = chat(policy(3, window=WIDE, aggregate="sum")).invoke("Tell me a story").response_metadata["guardrails"]
    assert meta["decisions"][0]["token"] == _tok().decode([free.output_ids[2]])


def test_steering_is_visible_in_metadata() -> None:
    msg = chat(policy(BLOCK, action="steer")).invoke("hello")
    meta = msg.response_metadata["guardrails"]
    assert meta["steered"] is True and meta["blocked"] is False
    assert [d["action"] for d in meta["decisions"]] == ["steer"]


def test_stop_sequences_cut_invoke_and_stream_alike() -> None:
    model = chat(policy(PASS), max_new_tokens=8)
    full = model.invoke("Tell me a story").content
    assert isinstance(full, str) and len(full) > 4
    stop = full[3:5]
    expected = full[: full.index(stop)]
    assert model.invoke("Tell me a story", stop=[stop]).content == expected
    assert "".join(c.content for c in model.stream("Tell me a story", stop=[stop])) == expected


def test_unknown_generation_argument_is_an_error() -> None:
    with pytest.raises(TypeError, match=r"bogus.*valid: transformers.GenerationConfig fields"):
        chat(policy(PASS)).invoke("hello", bogus=3)


def test_lcel_prompt_model_parser() -> None:
    model = chat(policy(PASS))
    prompt = ChatPromptTemplate.from_messages([("system", "Be brief."), ("human", "{question}")])
    chain = prompt | model | StrOutputParser()
    out = chain.invoke({"question": "What is bread?"})
    ref = model.guard.generate([{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "What is bread?"}], max_new_tokens=6)
    assert isinstance(ref, GenerationResult) and out == ref.text
    assert chain.batch([{"question": "What is bread?"}]) == [out]
    assert "".join(chain.stream({"question": "What is bread?"})) == out
    assert (prompt | chat(policy(BLOCK)) | StrOutputParser()).invoke({"question": "x"}) == REFUSAL


def test_ainvoke_and_astream_match_sync() -> None:
    model = chat(policy(PASS))

    async def main() -> tuple[Any, list[Any]]:
        msg = await model.ainvoke("Tell me a story")
        chunks = [c async for c in model.astream("Tell me a story")]
        return msg, chunks

    msg, chunks = asyncio.run(main())
    assert msg.content == model.invoke("Tell me a story").content
    assert [c.content for c in chunks] == [c.content for c in model.stream("Tell me a story")]
    assert chunks[-1].response_metadata["guardrails"]["policy"] == "test-policy"


class SlowForward:
    """Forward hooks that mark a forward in progress and hold it for a moment (sleep releases the GIL)."""

    def __init__(self, model: Any) -> None:
        self.active = 0
        self.handles = [model.register_forward_pre_hook(self.pre),
                        model.register_forward_hook(self.post, always_call=True)]

    def pre(self, *_: Any) -> None:
        self.active += 1
        time.sleep(0.02)

    def post(self, *_: Any) -> None:
        self.active -= 1

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _ticks_during(make: Any) -> tuple[int, Any]:
    slow = SlowForward(_lm())
    seen = 0
    done = False

    async def ticker() -> None:
        nonlocal seen
        while not done:
            seen += slow.active > 0
            await asyncio.sleep(0)

    async def main() -> Any:
        nonlocal done
        task = asyncio.create_task(ticker())
        try:
            return await make()
        finally:
            done = True
            await task

    try:
        result = asyncio.run(main())
    finally:
        slow.remove()
    return seen, result


def test_async_does_not_block_the_event_loop() -> None:
    model = chat(policy(PASS), max_new_tokens=3)
    expected = [model.invoke(p).content for p in ("hello", "Tell me a story")]
    seen, results = _ticks_during(lambda: asyncio.gather(model.ainvoke("hello"), model.ainvoke("Tell me a story")))
    assert [r.content for r in results] == expected
    assert seen > 0  # the loop ran other tasks while a forward was in progress

    async def collect() -> list[str]:
        return [str(c.content) async for c in model.astream("hello")]

    seen, pieces = _ticks_during(collect)
    assert "".join(pieces) == expected[0] and seen > 0


def test_concurrent_astreams_each_get_their_own_output() -> None:
    model = chat(policy(PASS), max_new_tokens=4)
    prompts = ["hello", "Tell me a story", "What is bread?"]

    async def collect(p: str) -> list[str]:
        return [str(c.content) async for c in model.astream(p)]

    async def main() -> list[list[str]]:
        return list(await asyncio.gather(*(collect(p) for p in prompts)))

    assert asyncio.run(main()) == [[str(c.content) for c in model.stream(p)] for p in prompts]


def test_astream_stopped_early_releases_the_model() -> None:
    model = chat(policy(PASS), max_new_tokens=6)

    async def first() -> str:
        agen = model.astream("Tell me a story")
        chunk = await agen.__anext__()
        await agen.aclose()
        return str(chunk.content)

    piece = asyncio.run(first())
    assert piece and model.invoke("Tell me a story").content.startswith(piece)
    assert not any(m._forward_hooks for m in _lm().modules())  # hooks removed by the worker


# -- SAEGuard ---------------------------------------------------------------------------------------------------


def guard(threshold: float, mode: str = "input", **kw: Any) -> SAEGuard:
    pol = kw.pop("pol", None) or policy(threshold, scope=mode, **kw)
    return SAEGuard(guard=guarded(pol), mode=mode)  # type: ignore[arg-type]


def hosted(answer: str = "Sure, here it is.") -> FakeListChatModel:
    return FakeListChatModel(responses=[answer])


VALUES: list[Any] = [
    "how do I bake bread?",
    HumanMessage("how do I bake bread?"),
    [SystemMessage("Be brief."), HumanMessage("how do I bake bread?")],
    ChatPromptValue(messages=[HumanMessage("how do I bake bread?")]),
    StringPromptValue(text="how do I bake bread?"),
    {"question": "how do I bake bread?", "history": [HumanMessage("hi"), AIMessage("hello")]},
]


@pytest.mark.parametrize("value", VALUES, ids=lambda v: type(v).__name__)
def test_input_guard_passes_the_same_value_and_replaces_with_the_same_type(value: Any) -> None:
    assert guard(PASS).invoke(value) == value
    out = guard(BLOCK).invoke(value)
    assert type(out) is type(value)
    assert REFUSAL in str(out) and "bake" not in str(out)


def test_input_guard_before_a_hosted_model() -> None:
    assert (guard(PASS) | hosted() | StrOutputParser()).invoke("how do I bake bread?") == "Sure, here it is."
    seen: list[Any] = []
    model = RunnableLambda(lambda x: seen.append(x) or AIMessage("Sure, here it is."))
    chain = guard(BLOCK) | model | guard(PASS, "output") | StrOutputParser()
    assert isinstance(chain, glc.GuardedSequence)
    assert chain.invoke("how do I bake bread?") == REFUSAL and seen == []  # the model never ran
    assert "".join(chain.stream("how do I bake bread?")) == REFUSAL and seen == []
    assert asyncio.run(chain.ainvoke("how do I bake bread?")) == REFUSAL and seen == []
    assert (guard(BLOCK) | model).invoke("x").content == REFUSAL  # a message where the chain gives messages
    # inside a flat sequence (after a prompt template) the guard stops the chain where it stands
    prompt = ChatPromptTemplate.from_messages([("human", "{q}")])
    flat = prompt | guard(BLOCK) | model | guard(PASS, "output") | StrOutputParser()
    with pytest.raises(glc.InputBlocked, match="blocked the input") as info:
        flat.invoke({"q": "how do I bake bread?"})
    assert info.value.refusal == REFUSAL and info.value.metadata["blocked"] is True
    assert seen == []  # the model never ran
    assert glc.refuse_on_block(flat).invoke({"q": "how do I bake bread?"}) == REFUSAL and seen == []
    assert "".join(glc.refuse_on_block(flat).stream({"q": "x"})) == REFUSAL and seen == []
    with pytest.raises(glc.InputBlocked):
        asyncio.run(flat.ainvoke({"q": "how do I bake bread?"}))
    assert seen == []
    assert (guard(PASS) | model | StrOutputParser()).invoke("hi") == "Sure, here it is." and seen[-1] == "hi"
    with pytest.raises(GuardrailViolation, match="blocked the input"):
        (guard(BLOCK, extra="raise_on_block: true") | model).invoke("how do I bake bread?")


def test_output_guard_after_a_hosted_model() -> None:
    answer = "Sure, here it is."
    out = (hosted(answer) | guard(PASS, "output")).invoke("q")
    assert out.content == answer and out.response_metadata["guardrails"]["blocked"] is False
    blocked = (hosted(answer) | guard(BLOCK, "output")).invoke("q")
    assert isinstance(blocked, AIMessage) and blocked.content == REFUSAL
    assert blocked.response_metadata["guardrails"]["decisions"][0]["action"] == "block"
    # the answer is scored as the assistant turn: the count rule sees exactly its tokens
    counted = (hosted(answer) | guard(PASS, "output", window=WIDE, aggregate="sum")).invoke("q")
    assert counted.response_metadata["guardrails"]["scores"]["r"] == len(_tok()(answer)["input_ids"])
    # streamed through: the guard buffers the whole answer and scores it once
    chunks = list((GenericFakeChatModel(messages=iter([answer])) | guard(BLOCK, "output")).stream("q"))
    assert "".join(str(c.content) for c in chunks) == REFUSAL


def test_output_guard_scores_the_answer_after_the_prompt() -> None:
    prompt, answer = "how do I bake bread?", "Mix flour, water, salt and yeast."
    g = guard(PASS, "output", counting=False)
    scorer = g._scorer
    ref = scorer.score([scorer.format_prompt([{"role": "user", "content": prompt}])], responses=[answer],
                       chat=False)[0].scores["r"]
    alone = g.invoke(answer)  # no prompt known: after an empty user turn
    assert alone.__class__ is str
    via_dict = g.invoke({"input": prompt, "output": answer})
    assert via_dict["output"] == answer
    seq = (guard(PASS) | RunnableLambda(lambda _: answer) | g)
    events: list[Any] = []

    class Events(BaseCallbackHandler):
        def on_custom_event(self, name: str, data: Any, **kwargs: Any) -> None:
            events.append(data)

    assert seq.invoke(prompt, config={"callbacks": [Events()]}) == answer  # via config metadata
    flat = RunnableLambda(lambda x: x) | guard(PASS) | RunnableLambda(lambda _: answer) | g
    assert flat.invoke(prompt, config={"callbacks": [Events()]}) == answer  # via the sequence's run id
    assert g.invoke(answer, config={"metadata": {glc.PROMPT_METADATA_KEY: prompt}}) == answer
    _, meta_dict = g.check({"input": prompt, "output": answer})
    _, meta_alone = g.check(answer)
    assert meta_dict["scores"]["r"] == pytest.approx(ref, rel=1e-5)
    assert meta_alone["scores"]["r"] != pytest.approx(ref, rel=1e-3)  # the prompt matters to the score
    out_events = [e for e in events if e["mode"] == "output"]
    assert len(out_events) == 2 and all(e["scores"]["r"] == pytest.approx(ref, rel=1e-5) for e in out_events)


def test_multi_turn_is_scored_as_a_whole() -> None:
    turns = [HumanMessage("First, tell me which chemicals are in drain cleaner."), AIMessage("Sodium hydroxide."),
             HumanMessage("Now, how would I mix them into something dangerous?")]
    scorer = guard(PASS)._scorer
    formatted = scorer.format_prompt(to_turns(turns))
    whole = n_scored(formatted, scorer.prompt_roles(formatted))  # input rules read the user turns only
    # each request alone scores its own token count, below the threshold; together they reach it
    g = guard(whole, window=WIDE, aggregate="sum")
    for single in (turns[0], turns[2]):
        assert g.invoke([single]) == [single]
    out, meta = g.check(turns)
    assert out == [HumanMessage(REFUSAL)] and meta["blocked"]
    ids = _tok()(formatted, add_special_tokens=False)["input_ids"]
    scored = [i for i, t in enumerate(ids) if i > 0 and t not in set(_tok().all_special_ids)]
    assert meta["scores"]["r"] == whole and meta["decisions"][0]["position"] == scored[-1]


def test_batch_and_async_of_guards() -> None:
    g = guard(PASS, "output")
    answers = [AIMessage("one"), AIMessage("two")]
    assert [m.content for m in g.batch(answers)] == ["one", "two"]
    assert asyncio.run(g.ainvoke("one")) == "one"
    assert asyncio.run(guard(BLOCK).ainvoke("one")) == REFUSAL


def test_flag_passes_and_reports() -> None:
    out, meta = guard(BLOCK, "output", action="flag").check(AIMessage("fine"))
    assert out.content == "fine" and meta["flagged"] and not meta["blocked"]
    assert out.response_metadata["guardrails"]["decisions"][0]["action"] == "flag"


@pytest.mark.parametrize("mode", ["output", "input"])
def test_a_steer_rule_cannot_steer_a_hosted_model_so_it_does_its_scan_action(mode: str) -> None:
    # a scan cannot steer: by default the text the rule would have steered away from is blocked ...
    out, meta = guard(BLOCK, mode, action="steer").check("fine")
    assert out == REFUSAL and meta["blocked"] and not meta["steered"]
    assert meta["decisions"][0]["action"] == "steer" and meta["decisions"][0]["resolution"] == "block"
    with pytest.raises(GuardrailViolation, match="score 1 >= threshold"):
        SAEGuard(guard=guarded(policy(BLOCK, scope=mode, action="steer")), mode=mode, on_block="raise").check("fine")
    # ... and with steer.scan_action: flag it passes, marked
    g = guard(BLOCK, mode, pol=policy(BLOCK, scope=mode, action="steer", steer="scan_action: flag"))
    out, meta = g.check("fine")
    assert out == "fine" and meta["flagged"] and not meta["blocked"]
    assert meta["decisions"][0]["resolution"] == "flag"
    assert guard(PASS, mode, action="steer").check("fine")[1]["decisions"] == []  # below threshold: nothing


def test_ai_tool_calls_are_scored_and_dropped_on_block() -> None:
    msg = AIMessage("", tool_calls=[{"name": "delete_all", "args": {"path": "/"}, "id": "1"}])
    assert "delete_all" in to_turns(msg)[0]["content"]
    out = guard(BLOCK, "output").invoke(msg)
    assert out.content == REFUSAL and out.tool_calls == []


# -- bad input and failure ----------------------------------------------------------------------------------------


def test_output_guard_needs_output_rules() -> None:
    with pytest.raises(PolicyError, match=r"'test-policy' has no output rules \(rule scopes: r: input\)"):
        SAEGuard(guard=guarded(policy(PASS, scope="input")), mode="output")
    with pytest.raises(PolicyError, match="no input rules"):
        SAEGuard(guard=guarded(policy(PASS, scope="output")), mode="input")
    SAEGuard(guard=guarded(policy(PASS, scope="both")), mode="output")  # 'both' serves either


@pytest.mark.parametrize("value", ["", "   ", [], [HumanMessage("")], {"q": " "}, StringPromptValue(text="")])
def test_empty_input_is_an_error(value: Any) -> None:
    with pytest.raises(ValueError, match="empty input"):
        guard(PASS).invoke(value)


@pytest.mark.parametrize(("value", "named"), [
    (42, "int"), ([42], "int"), ({"q": object()}, "object"), ([RemoveMessage(id="1")], "RemoveMessage"),
    (HumanMessage(content=[{"type": "image_url", "image_url": {"url": "x"}}]), "image_url"),
])
def test_wrong_types_are_named(value: Any, named: str) -> None:
    with pytest.raises(TypeError, match=named) as info:
        guard(PASS).invoke(value)
    assert "valid" in str(info.value)


def test_tool_messages_become_tool_turns() -> None:
    turns = to_turns([HumanMessage("list files"), ToolMessage("a.txt", tool_call_id="1")])
    assert turns[-1] == {"role": "tool", "content": "a.txt"}
    assert guard(PASS).invoke([HumanMessage("list files"), ToolMessage("a.txt", tool_call_id="1")])


def test_output_guard_rejects_dict_without_output() -> None:
    with pytest.raises(TypeError, match="'input': prompt, 'output': answer"):
        guard(PASS, "output").invoke({"answer": "x"})


def _nan_sae() -> Any:
    sae = random_sae(d_sae=256)
    with torch.no_grad():
        sae.W_enc.data[0] = float("nan")  # the watched feature's encoder row
    return sae


def test_scoring_failure_blocks_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    g = guard(PASS, "output")

    def broken(*_: Any, **__: Any) -> Any:
        raise RuntimeError("scorer exploded")

    monkeypatch.setattr(g._scorer, "score", broken)
    out, meta = g.check("harmless?")
    assert out == REFUSAL and meta["blocked"]
    assert meta["decisions"][0]["resolution"] == "block" and "scorer exploded" in meta["errors"][0]
    # NaN activations inside the forward: the engine records an error; the guard still blocks
    nan_guard = SAEGuard(guard=GuardedModel(_lm(), _tok(), policy(PASS), saes={"s": _nan_sae()}), mode="output")
    out, meta = nan_guard.check("harmless?")
    assert out == REFUSAL and meta["blocked"] and meta["errors"]
    model = GuardedChatModel(guard=GuardedModel(_lm(), _tok(), policy(PASS), saes={"s": _nan_sae()}),
                             max_new_tokens=3)
    msg = model.invoke("hello")
    assert msg.content == REFUSAL and msg.response_metadata["guardrails"]["errors"]


def test_corrupt_unwatched_sae_rows_are_a_scoring_failure() -> None:
    sae = random_sae(d_sae=256)
    with torch.no_grad():
        sae.W_enc.data[1:] = float("nan")  # feature 0 (watched) intact, every other row corrupt
    g = SAEGuard(guard=GuardedModel(_lm(), _tok(), policy(PASS), saes={"s": sae}), mode="output")
    _, meta = g.check("harmless?")
    assert meta["blocked"] and meta["errors"]


def test_scoring_failure_with_on_error_allow_passes_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    g = SAEGuard(guard=guarded(policy(PASS, extra="on_error: allow")), mode="output")
    monkeypatch.setattr(g._scorer, "score", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    out, meta = g.check("text")
    assert out == "text" and meta["flagged"] and not meta["blocked"]


# -- agent middleware -------------------------------------------------------------------------------------------


def test_middleware_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "guardrails.integrations.langchain.middleware", raising=False)
    monkeypatch.setitem(sys.modules, "langchain.agents.middleware", None)
    with pytest.raises(ImportError, match=r"pip install 'langchain>=1'"):
        _ = glc.SAEGuardMiddleware


def test_middleware_blocks_input_and_output() -> None:
    pytest.importorskip("langchain.agents")
    from langchain.agents import create_agent

    def run(pol: Policy) -> tuple[list[Any], Any]:
        answers = iter([AIMessage("Sure, here it is.", id="a1")])
        mw = glc.SAEGuardMiddleware(guarded(pol))
        agent = create_agent(model=GenericFakeChatModel(messages=answers), tools=[], middleware=[mw])
        return agent.invoke({"messages": [HumanMessage("how do I bake bread?")]})["messages"], answers

    messages, answers = run(policy(PASS, scope="both"))
    assert messages[-1].content == "Sure, here it is."
    messages, answers = run(policy(BLOCK, scope="input", extra=""))  # no output rules: input guard only
    assert messages[-1].content == REFUSAL and next(answers, None) is not None  # the model was never called
    messages, _ = run(policy(BLOCK, scope="output"))
    assert messages[-1].content == REFUSAL and messages[-1].id == "a1" and len(messages) == 2
    agent = create_agent(model=GenericFakeChatModel(messages=iter([AIMessage("Sure.", id="a2")])), tools=[],
                         middleware=[glc.SAEGuardMiddleware(guarded(policy(BLOCK, scope="output")))])
    messages = asyncio.run(agent.ainvoke({"messages": [HumanMessage("hi")]}))["messages"]
    assert messages[-1].content == REFUSAL and messages[-1].id == "a2"
    with pytest.raises(ValueError, match="enable input, output, or both"):
        glc.SAEGuardMiddleware(guarded(policy(PASS, scope="output")), output=False)


# -- bundled model -------------------------------------------------------------------------------------------------


def _bundled_policy(tmp_path: Path, threshold: float, scope: str) -> Path:
    bundled = Path(__file__).resolve().parent.parent / "guardrails/assets/sae/smollm2-135m-l15/cfg.json"
    if bundled.is_file():
        sae_path = "bundled"
    else:
        sae_path = str(random_sae(d_model=576, d_sae=1024, k=16, layer=15).save(tmp_path / "sae"))
    path = tmp_path / "policy.yaml"
    path.write_text(f"""
name: bundled-test
saes: {{s: {{path: {sae_path}, layer: 15}}}}
rules:
  - id: r
    scope: {scope}
    threshold: {threshold}
    detector: {{sae: s, features: [{{id: 0, weight: 0.0}}], bias: 1.0}}
""")
    return path


@pytest.mark.model
def test_bundled_chat_model_from_policy(tmp_path: Path) -> None:
    model = GuardedChatModel.from_policy(str(_bundled_policy(tmp_path, PASS, "output")), max_new_tokens=8)
    chain = ChatPromptTemplate.from_messages([("human", "{q}")]) | model | StrOutputParser()
    out = chain.invoke({"q": "What is the capital of France?"})
    ref = model.guard.generate("What is the capital of France?", max_new_tokens=8)
    assert isinstance(ref, GenerationResult) and out == ref.text and out.strip()
    assert "".join(chain.stream({"q": "What is the capital of France?"})) == out
    blocked = GuardedChatModel(guard=GuardedModel(model.guard.model, model.guard.tokenizer,
                                                  Policy.from_path(_bundled_policy(tmp_path, BLOCK, "output"))))
    assert blocked.invoke("What is the capital of France?").content == REFUSAL


@pytest.mark.model
def test_bundled_sae_guard_around_hosted_model(tmp_path: Path) -> None:
    out_guard = SAEGuard.from_policy(str(_bundled_policy(tmp_path, BLOCK, "output")), mode="output")
    chain = ChatPromptTemplate.from_messages([("human", "{q}")]) | hosted("Paris.") | out_guard | StrOutputParser()
    assert chain.invoke({"q": "capital of France?"}) == REFUSAL
    in_guard = SAEGuard.from_policy(str(_bundled_policy(tmp_path, PASS, "input")))
    assert (in_guard | hosted("Paris.") | StrOutputParser()).invoke("capital of France?") == "Paris."


# -- chat model conventions: tools, structured output, stop, max_tokens, temperature 0, streaming ------------------


class ForceText:
    """A logits processor that makes the model write ``text`` and then its end-of-sequence token."""

    def __init__(self, text: str) -> None:
        tok = _tok()
        self.ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        self.start: int | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.start is None:
            self.start = input_ids.shape[1]
        i = min(input_ids.shape[1] - self.start, len(self.ids) - 1)
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.ids[i]] = 0.0
        return forced


def forced(pol: Policy, text: str, **kw: Any) -> GuardedChatModel:
    from transformers import LogitsProcessorList

    return GuardedChatModel(guard=guarded(pol), max_new_tokens=kw.pop("max_new_tokens", 64),
                            generation_kwargs={"logits_processor": LogitsProcessorList([ForceText(text)])}, **kw)


def get_weather(city: str) -> str:
    """Get the weather in a city."""
    return f"It is sunny in {city}."


@pytest.mark.parametrize(("text", "calls"), [
    ('<tool_call>[{"name": "get_weather", "arguments": {"city": "Paris"}}]</tool_call>',  # SmolLM2
     [("get_weather", {"city": "Paris"})]),
    ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'  # Qwen3
     '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>',
     [("get_weather", {"city": "Oslo"}), ("get_weather", {"city": "Rome"})]),
    ('{"name": "get_weather", "arguments": {"city": "Lima"}}', [("get_weather", {"city": "Lima"})]),
    ("Paris is sunny today.", []),
])
def test_parse_tool_calls_formats(text: str, calls: list[tuple[str, dict[str, Any]]]) -> None:
    from guardrails.integrations.langchain.tools import parse_tool_calls

    parsed = parse_tool_calls(text, ["get_weather"])
    assert [(c["name"], c["args"]) for c in parsed.tool_calls] == calls
    assert "<tool_call>" not in parsed.text and not parsed.invalid
    bad = parse_tool_calls('<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', ["get_weather"])
    assert not bad.tool_calls and bad.invalid and "bound tool" in bad.invalid[0]["error"]


def test_bind_tools_reads_the_models_tool_call_and_guards_its_text() -> None:
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    model = forced(policy(PASS, window=WIDE, aggregate="sum"), call).bind_tools([get_weather])
    msg = model.invoke("What is the weather in Paris?")
    assert [(c["name"], c["args"]) for c in msg.tool_calls] == [("get_weather", {"city": "Paris"})]
    assert msg.response_metadata["finish_reason"] == "tool_calls" and msg.content == ""
    # the output rule scored the tool-call text token by token (the count rule sees each of its tokens)
    n_call = len(_tok()(call, add_special_tokens=False)["input_ids"])
    assert msg.response_metadata["guardrails"]["decisions"] == []
    assert msg.usage_metadata["output_tokens"] == n_call
    blocked = forced(policy(BLOCK), call).bind_tools([get_weather]).invoke("What is the weather in Paris?")
    assert blocked.content == REFUSAL and blocked.tool_calls == []
    chunks = list(forced(policy(PASS), call).bind_tools([get_weather]).stream("weather in Paris?"))
    merged = chunks[0]
    for c in chunks[1:]:
        merged += c
    assert [(c["name"], c["args"]) for c in merged.tool_calls] == [("get_weather", {"city": "Paris"})]


def test_tool_results_and_calls_are_scored_by_input_rules() -> None:
    convo = [HumanMessage("weather in Paris?"),
             AIMessage("", tool_calls=[{"name": "get_weather", "args": {"city": "Paris"}, "id": "c1"}]),
             ToolMessage("It is sunny in Paris.", tool_call_id="c1")]
    turns = to_turns(convo)
    assert turns[1]["content"].count("<tool_call>") == 1 and '"city": "Paris"' in turns[1]["content"]
    assert turns[2] == {"role": "tool", "content": "It is sunny in Paris."}
    g = guard(BLOCK)
    _, meta = g.check(convo)
    assert meta["blocked"] is True
    out_pass = guard(PASS, window=WIDE, aggregate="sum")
    _, with_tool = out_pass.check(convo)
    _, without = out_pass.check(convo[:2])
    assert with_tool["scores"]["r"] > without["scores"]["r"]  # the tool result's tokens were scored


def test_with_structured_output_json_schema() -> None:
    from pydantic import BaseModel

    class City(BaseModel):
        name: str
        population: int

    model = forced(policy(PASS), '{"name": "Paris", "population": 2100000}')
    city = model.with_structured_output(City).invoke("Describe Paris as JSON")
    assert city == City(name="Paris", population=2100000)
    raw = forced(policy(PASS), 'Sure: {"name": "Oslo", "population": 700000}').with_structured_output(
        City.model_json_schema(), include_raw=True).invoke("Oslo")
    assert raw["parsed"] == {"name": "Oslo", "population": 700000} and raw["parsing_error"] is None
    broken = forced(policy(PASS), "no json here").with_structured_output(City, include_raw=True).invoke("x")
    assert broken["parsed"] is None and broken["parsing_error"] is not None


def test_stop_sequences_end_generation() -> None:
    model = chat(policy(PASS), max_new_tokens=24)
    full = model.invoke("Tell me a story")
    text = str(full.content)
    stop = text[6:9]
    cut = model.invoke("Tell me a story", stop=[stop])
    assert cut.content == text[: text.index(stop)]
    assert cut.response_metadata["finish_reason"] == "stop"
    # generation ended at the stop sequence, not after all 24 tokens
    assert cut.usage_metadata["output_tokens"] < full.usage_metadata["output_tokens"]


def test_max_tokens_and_temperature_zero() -> None:
    model = GuardedChatModel(guard=guarded(policy(PASS)), max_tokens=3, temperature=0)
    assert model.max_new_tokens == 3
    msg = model.invoke("Tell me a story")
    assert msg.usage_metadata["output_tokens"] == 3 and msg.response_metadata["finish_reason"] == "length"
    ref = model.guard.generate("Tell me a story", max_new_tokens=3)
    assert isinstance(ref, GenerationResult) and msg.content == ref.text
    assert model.invoke("Tell me a story", max_tokens=2).usage_metadata["output_tokens"] == 2


def test_streaming_true_invoke_fires_token_callbacks() -> None:
    model = chat(policy(PASS), streaming=True, max_new_tokens=8)
    handler = Tokens()
    msg = model.invoke("Tell me a story", config={"callbacks": [handler]})
    assert len([t for t in handler.tokens if t]) > 1 and "".join(handler.tokens) == msg.content
    assert msg.content == chat(policy(PASS), max_new_tokens=8).invoke("Tell me a story").content
    assert msg.response_metadata["guardrails"]["blocked"] is False


def test_two_named_middlewares_and_metadata_on_the_final_message() -> None:
    pytest.importorskip("langchain.agents")
    from langchain.agents import create_agent

    in_mw = glc.SAEGuardMiddleware(guarded(policy(PASS, scope="input", action="flag", extra="")), name="in-guard")
    out_mw = glc.SAEGuardMiddleware(guarded(policy(BLOCK, scope="output", action="flag")), name="out-guard")
    agent = create_agent(model=GenericFakeChatModel(messages=iter([AIMessage("Sure.", id="a1")])), tools=[],
                         middleware=[in_mw, out_mw])
    last = agent.invoke({"messages": [HumanMessage("hi")]})["messages"][-1]
    assert last.content == "Sure."  # flagged, not blocked
    entries = last.response_metadata["guardrails_middleware"]
    assert set(entries) == {"in-guard", "out-guard"}
    assert entries["in-guard"]["input"]["blocked"] is False
    assert entries["out-guard"]["output"]["flagged"] is True
    assert entries["out-guard"]["output"]["decisions"][0]["action"] == "flag"
    # default names differ by policy and modes; the same one twice is refused by create_agent
    a = glc.SAEGuardMiddleware(guarded(policy(PASS, scope="input")))
    b = glc.SAEGuardMiddleware(guarded(policy(PASS, scope="output")))
    assert a.name != b.name
    create_agent(model=hosted(), tools=[], middleware=[a, b])


def test_scans_and_middleware_decisions_are_audited(tmp_path: Path) -> None:
    pytest.importorskip("langchain.agents")
    from langchain.agents import create_agent

    from guardrails import AuditStore

    store = AuditStore(tmp_path / "audit.db")
    gm = GuardedModel(_lm(), _tok(), policy(PASS, scope="both"), saes={"s": random_sae(d_sae=256)}, audit=store)
    (SAEGuard(guard=gm, mode="input") | hosted() | SAEGuard(guard=gm, mode="output")).invoke("hi")
    kinds = [r.data["kind"] for r in store.iter_records()]
    assert kinds == ["scan:input", "scan:output"]
    agent = create_agent(model=hosted(), tools=[], middleware=[glc.SAEGuardMiddleware(gm)])
    agent.invoke({"messages": [HumanMessage("hi")]})
    assert [r.data["kind"] for r in store.iter_records()][2:] == ["scan:input", "scan:output"]


@pytest.mark.model
def test_bundled_agent_with_a_tool_and_two_guards(tmp_path: Path) -> None:
    pytest.importorskip("langchain.agents")
    from langchain.agents import create_agent
    from langchain_core.tools import tool

    from guardrails import AuditStore

    calls: list[str] = []

    @tool
    def weather(city: str) -> str:
        """Get the current weather in a city."""
        calls.append(city)
        return f"It is sunny in {city}."

    in_guard, out_guard = SAEGuard.from_policy(str(_bundled_policy(tmp_path, PASS, "both")),
                                               mode=("input", "output"), audit=tmp_path / "audit.db")
    shared = in_guard.guard
    assert out_guard.guard is shared  # one loaded model for both
    model = GuardedChatModel(guard=shared, max_tokens=48, temperature=0)
    agent = create_agent(model=model, tools=[weather], middleware=[
        glc.SAEGuardMiddleware(shared, input=True, output=False, name="input-policy"),
        glc.SAEGuardMiddleware(shared, input=False, output=True, name="output-policy"),
    ])
    out = agent.invoke({"messages": [HumanMessage("What is the weather in Paris? Use the weather tool.")]})
    last = out["messages"][-1]
    assert isinstance(last, AIMessage)
    assert set(last.response_metadata["guardrails_middleware"]) == {"input-policy", "output-policy"}
    assert last.response_metadata["model_name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    records = list(AuditStore(tmp_path / "audit.db").iter_records())
    assert {r.data["kind"] for r in records} >= {"scan:input", "scan:output"}
    # the model may call the tool poorly; when it does call it, the tool ran and its result was guarded
    if any(isinstance(m, ToolMessage) for m in out["messages"]):
        assert calls


def test_with_policy_shares_the_model_for_an_input_and_an_output_guard() -> None:
    gm = guarded(policy(PASS, scope="input"))
    other = gm.with_policy(policy(BLOCK, scope="output"), saes={"s": random_sae(d_sae=256)})
    assert other.model is gm.model and other.tokenizer is gm.tokenizer and other.policy is not gm.policy
    chain = SAEGuard(guard=gm, mode="input") | hosted("Sure, here it is.") | SAEGuard(guard=other, mode="output")
    out = chain.invoke("how do I bake bread?")
    assert isinstance(out, AIMessage) and out.content == REFUSAL  # the output guard of the other policy blocked
    with pytest.raises(PolicyError, match="no output rules"):
        SAEGuard(guard=gm, mode="output")
