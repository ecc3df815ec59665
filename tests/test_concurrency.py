"""One GuardedModel shared by threads and async tasks; an audited guard killed with SIGKILL mid-run.

The policy counts scored tokens (feature weight 0, bias 1, ``window: 4096, aggregate: sum``), so what
it decides for each prompt is known in advance from the tokenizer alone: the input rule blocks a
prompt with at least ``T_IN`` scored tokens, and the output rule flags the third scored output token
(a decision whose position, prompt length + 2, differs between prompts). Every concurrent result must
equal the serial one for its own prompt, decisions included. Several processes writing one audit store
are covered in tests/test_audit.py (test_many_processes, test_killed_writer_loses_no_committed_record);
here the killed writer is a real guard generating and auditing.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import signal
import threading
import time
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from guardrails import GenerationResult, GuardedModel, Policy
from guardrails.audit.store import AuditStore
from guardrails.engine.hooks import hooks_on
from tests._counts import count
from tests.builders import bundled_tokenizer, random_sae, tiny_lm

PROMPTS = [
    "Hi", "Tell me a story", "How do I bake bread at home today?", "What is the capital of France, and why?",
    "Write a poem about the sea and the wind and the rain over the old harbour town", "Paris",
]
NEW = 5
THREADS, PER_THREAD = 8, 3


_tok = bundled_tokenizer


@cache
def _model() -> Any:
    return tiny_lm("llama", _tok(), layers=2)


def n_scored(text: str, messages: list[dict[str, str]] | None = None) -> int:
    """Tokens an input rule scores: not special, not position 0, and (given the messages) in the user's turn."""
    from guardrails.core.roles import hf_render, role_spans, token_roles

    tok = _tok()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    special = set(tok.all_special_ids)
    roles = token_roles(tok, text, role_spans(hf_render(tok), messages, text)) if messages else [1] * len(ids)
    return sum(1 for i, t in enumerate(ids) if i > 0 and t not in special and roles[i] == 1)


@cache
def _t_in() -> int:
    counts = sorted(_prompt_counts_raw())
    return counts[len(counts) // 2]  # the median: about half the prompts are blocked


@cache
def _prompt_counts_raw() -> tuple[int, ...]:
    tok = _tok()
    out = []
    for p in PROMPTS:
        msgs = [{"role": "user", "content": p}]
        out.append(n_scored(str(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)), msgs))
    return tuple(out)


@cache
def _guard() -> GuardedModel:
    pol = Policy.from_yaml(f"""
name: counting
saes: {{s: {{path: unused, layer: 1}}}}
rules:
  - id: long-prompt
    scope: input
    threshold: {_t_in()}
    detector: {{sae: s, features: [{{id: 0, weight: 0.0}}], bias: 1.0, window: 4096, aggregate: sum}}
  - id: third-token
    scope: output
    action: flag
    threshold: 3
    detector: {{sae: s, features: [{{id: 0, weight: 0.0}}], bias: 1.0, window: 4096, aggregate: sum}}
""")
    return GuardedModel(_model(), _tok(), pol, saes={"s": random_sae(d_sae=64)})


def one(r: GenerationResult | list[GenerationResult]) -> GenerationResult:
    assert isinstance(r, GenerationResult)
    return r


def _key(r: GenerationResult) -> tuple[Any, ...]:
    return (r.text, r.blocked, r.released_text, tuple(r.output_ids), tuple(r.decisions),
            tuple(sorted((k, tuple(sorted(v.items()))) for k, v in r.token_scores.items())))


@cache
def _serial() -> dict[str, GenerationResult]:
    g = _guard()
    return {p: one(g.generate(p, max_new_tokens=NEW)) for p in PROMPTS}


def test_serial_decisions_are_the_expected_ones() -> None:
    """The independent statement the concurrent runs are compared through: blocked iff long, flag at +2."""
    serial = _serial()
    blocked = [serial[p].blocked for p in PROMPTS]
    assert blocked == [n >= _t_in() for n in _prompt_counts_raw()]
    assert 0 < sum(blocked) < len(PROMPTS)  # distinct outcomes: some blocked, some not
    for p in PROMPTS:
        r = serial[p]
        if r.blocked:
            assert [(d.rule, d.action, d.scope) for d in r.decisions] == [("long-prompt", "block", "input")]
        else:
            n_out = sum(1 for t in r.output_ids if t not in set(_tok().all_special_ids))
            flags = [d for d in r.decisions if d.rule == "third-token"]
            assert [(d.action, d.output_index) for d in flags] == ([("flag", 2)] if n_out >= 3 else [])


def _work(prompt: str, how: str) -> GenerationResult:
    g = _guard()
    if how == "stream":
        s = g.stream(prompt, max_new_tokens=NEW)
        for _ in s:
            pass
        assert s.result is not None
        return s.result
    if how == "batch":
        rs = g.generate([prompt, PROMPTS[0]], max_new_tokens=NEW)
        assert isinstance(rs, list)
        return rs[0]
    return one(g.generate(prompt, max_new_tokens=NEW))


def test_threads_share_one_guard() -> None:
    serial = _serial()
    hows = ["generate", "stream", "batch"]
    jobs = [[(PROMPTS[(t * PER_THREAD + i) % len(PROMPTS)], hows[(t + i) % 3]) for i in range(PER_THREAD)]
            for t in range(THREADS)]
    results: dict[int, list[tuple[str, str, GenerationResult]]] = {}
    errors: list[BaseException] = []
    scores: dict[int, Any] = {}
    start = threading.Barrier(THREADS)

    def run(t: int) -> None:
        try:
            start.wait()
            results[t] = [(p, how, _work(p, how)) for p, how in jobs[t]]
            scores[t] = _guard().score(PROMPTS)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=600)
    assert errors == [] and len(results) == THREADS
    count("concurrency: thread requests", THREADS * (PER_THREAD + 1))
    for t in range(THREADS):
        for p, how, r in results[t]:
            assert _key(r) == _key(serial[p]), (t, p, how)
        assert [s.blocked for s in scores[t]] == [serial[p].blocked for p in PROMPTS]
    assert hooks_on(_model()) == 0


def test_async_tasks_share_one_guard() -> None:
    from guardrails.integrations.langchain.chat import GuardedChatModel

    serial = _serial()
    chat = GuardedChatModel(guard=_guard(), max_new_tokens=NEW)
    g = _guard()

    async def main() -> tuple[list[Any], list[GenerationResult]]:
        lc = [chat.ainvoke(p) for p in PROMPTS * 2]
        th = [asyncio.to_thread(g.generate, p, max_new_tokens=NEW) for p in PROMPTS * 2]
        out = await asyncio.gather(*lc, *th)
        return list(out[: len(lc)]), [one(x) for x in out[len(lc):]]

    messages, results = asyncio.run(main())
    count("concurrency: async requests", len(messages) + len(results))
    for p, msg, r in zip(PROMPTS * 2, messages, results, strict=True):
        assert _key(r) == _key(serial[p]), p
        meta = msg.response_metadata["guardrails"]
        assert msg.content == serial[p].text and meta["blocked"] == serial[p].blocked, p
        assert meta["decisions"] == [d.to_dict() for d in serial[p].decisions], p
    assert hooks_on(_model()) == 0


# -- kill -9 of an audited guard ----------------------------------------------------------------------------------


def _audited_generator(db: str, log: str) -> None:
    """Generate and audit until killed; after each generate() returns, append its prompt to ``log``."""
    from tests.builders import tiny_lm, tiny_tokenizer

    tok = tiny_tokenizer()
    pol = Policy.from_yaml("""
name: flag-all
saes: {s: {path: unused, layer: 1}}
rules:
  - id: any
    scope: output
    action: flag
    threshold: 0.5
    detector: {sae: s, features: [{id: 0, weight: 0.0}], bias: 1.0}
""")
    guard = GuardedModel(tiny_lm("llama", tok), tok, pol, saes={"s": random_sae()}, audit=AuditStore(db))
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    i = 0
    while True:
        prompt = f"Tell me a story {i}"
        r = guard.generate(prompt, max_new_tokens=3)
        assert isinstance(r, GenerationResult) and r.flagged and not r.errors
        os.write(fd, f"{prompt}\n".encode())
        i += 1


@pytest.mark.slow
def test_kill_9_mid_run_keeps_every_committed_record(tmp_path: Path) -> None:
    db, log = tmp_path / "audit.db", tmp_path / "done.log"
    AuditStore(db).close()
    p = mp.get_context("spawn").Process(target=_audited_generator, args=(str(db), str(log)))
    p.start()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and p.is_alive() and (not log.exists() or log.read_text().count("\n") < 25):
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.join()
    assert p.exitcode == -signal.SIGKILL
    done = log.read_text().splitlines()
    assert len(done) >= 25
    with AuditStore(db) as store:
        res = store.verify()
        recs = list(store.iter_records())
        texts = [r.data["input"]["text"] for r in recs]
        assert res.ok and res.checked == len(recs) == store.count()
        assert [r.id for r in recs] == list(range(1, len(recs) + 1))
        assert texts[: len(done)] == done  # every record committed before the kill, in order, none doubled
        assert len(recs) - len(done) <= 1  # at most the one committed between the write and the log line
        assert all(r.data["action"] == "flag" for r in recs)
    count("audit: records written and verified after kill -9", len(recs))
