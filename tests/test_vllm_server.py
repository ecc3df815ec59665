"""``guardrails serve --engine vllm``: the OpenAI-compatible app over a guarded vLLM engine, driven by the
official ``openai`` client (sync, async, streaming) through uvicorn on a loopback port.

Run with the vLLM venv's python (``bash scripts/test_vllm.sh`` runs this file after ``test_vllm.py``, in a
process of its own: one vLLM engine per process). References come from the same engine before a server
runs (unguarded ``llm.generate`` and ``GuardedVLLM.generate``): only one thread may drive an engine.
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from guardrails.vllm import INSTALL_HINT, vllm_available

ROOT = Path(__file__).resolve().parents[1]
N = 8
needs_vllm = pytest.mark.skipif(
    not vllm_available(), reason=f"vLLM is not importable by {sys.executable}: {INSTALL_HINT}"
)


def test_engine_vllm_without_vllm_names_the_install_script() -> None:
    """``guardrails serve --engine vllm`` where vLLM cannot be imported: exit 2 and the install script named."""
    code = (
        "import importlib.util, sys\n"
        "orig = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda name, *a: None if name.split('.')[0] == 'vllm' else orig(name, *a)\n"
        "from guardrails.cli.main import app\n"
        "sys.argv = ['guardrails', 'serve', '--engine', 'vllm']\n"
        "app()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 2, (out.stdout, out.stderr)
    text = " ".join((out.stdout + out.stderr).split())
    assert "scripts/install_vllm.sh" in text and "--engine vllm" in text, text
    assert "Traceback" not in text


def test_unknown_engine_is_refused() -> None:
    out = subprocess.run([sys.executable, "-m", "guardrails.cli.main", "serve", "--engine", "tgi"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT, env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 2
    assert "valid: hf, vllm" in " ".join((out.stdout + out.stderr).split())


# -- with vLLM -----------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """The session blocks IP sockets (conftest); these tests talk to 127.0.0.1 only."""
    blocked = socket.socket.connect

    def connect(self: socket.socket, address: Any) -> Any:
        local = isinstance(address, tuple) and address[0] in ("127.0.0.1", "::1")
        return _socket.socket.connect(self, address) if local else blocked(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)


@contextlib.contextmanager
def serving(app: Any) -> Iterator[str]:
    """uvicorn on a free loopback port in a thread; yields the base URL (…/v1)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()


@pytest.fixture(scope="module")
def engine() -> dict[str, Any]:
    """One guarded engine: the shipped policy (default) and an output tripwire that blocks HARMFUL mid-answer
    (threshold just under the highest generated-token score of HARMFUL on the HF path), plus references."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CACHE_ROOT", tempfile.mkdtemp(prefix="vllm-cache-"))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import torch

    from guardrails import GuardedModel, Policy
    from guardrails.serving.models import load_model
    from guardrails.vllm import GuardedVLLM
    from tests.test_vllm import (
        BENIGN,
        HARMFUL,
        POLICY,
        _cascade_policy,
        _judge,
        _ojudge,
        _output_cascade_policy,
        _policy,
        _unguarded,
    )

    torch.set_num_threads(2)
    lm, tok = load_model("bundled")
    never = GuardedModel(lm, tok, _policy("tripwire", "output", 1e9, window=1))
    ranked = sorted(never.generate(HARMFUL, max_new_tokens=N).token_scores["tripwire"].values(), reverse=True)
    assert len(ranked) >= 2 and ranked[0] - ranked[1] > 0.02, ranked
    del lm, never
    shipped = Policy.from_path(POLICY)
    guard = GuardedVLLM({"max_model_len": 256, "max_num_seqs": 8, "dtype": "float32",
                         "gpu_memory_utilization": 0.1, "seed": 0},
                        [shipped, _policy("tripwire", "output", ranked[0] - 0.01, window=1), _cascade_policy(),
                         _output_cascade_policy(), _output_cascade_policy("late", ranked[0] - 0.01)],
                        judges={"j": _judge, "o": _ojudge})
    benign = BENIGN[:4]
    refs = {
        "plain": dict(zip(benign, _unguarded(guard, benign, N), strict=True)),
        "shipped": dict(zip([*benign, HARMFUL], guard.generate([*benign, HARMFUL], max_new_tokens=N), strict=True)),
        "trip": guard.generate(HARMFUL, max_new_tokens=N, policy="tripwire"),
        "raw": guard.generate(["The capital of France is", HARMFUL], max_new_tokens=N, chat=False),
    }
    assert refs["shipped"][HARMFUL].blocked, "the shipped policy does not block HARMFUL: the test needs a block"
    assert refs["trip"].blocked and refs["trip"].decisions[0].output_index is not None
    return {"guard": guard, "refs": refs, "benign": benign, "harmful": HARMFUL, "tok": guard.tokenizer}


def _app(engine: dict[str, Any], policy: str | None = None, **cfg: Any) -> Any:
    from guardrails.server import ServerConfig, create_app
    from guardrails.server.vllm_engine import VLLMScheduler

    config = ServerConfig(**cfg)
    sched = VLLMScheduler(engine["guard"], policy=policy, gather_ms=config.gather_ms)
    return create_app(engine["guard"], config, scheduler=sched), sched


def _chat(p: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": p}]


@needs_vllm
@pytest.mark.model
def test_harmful_blocked_with_verdict_benign_equal_to_unguarded(engine: dict[str, Any]) -> None:
    import openai

    guard, refs, harmful = engine["guard"], engine["refs"], engine["harmful"]
    app, _ = _app(engine)
    with serving(app) as url:
        c = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=300)
        bad = c.chat.completions.create(model="guardrails", max_tokens=N, messages=_chat(harmful))
        good = c.chat.completions.create(model="guardrails", max_tokens=N, messages=_chat(engine["benign"][0]))
        chunks = list(c.chat.completions.create(model="guardrails", max_tokens=N, stream=True,
                                                messages=_chat(engine["benign"][1])))
        with pytest.raises(openai.BadRequestError, match="max_model_len 256"):  # a 400, not a failed generation
            c.chat.completions.create(model="guardrails", max_tokens=300, messages=_chat(harmful))
        import httpx

        h = httpx.get(url.replace("/v1", "/healthz")).json()
        check = httpx.post(url + "/guard/check", json={"input": "hello"})
    refusal = guard.policy.refusal
    assert bad.choices[0].finish_reason == "content_filter" and bad.choices[0].message.content == refusal
    verdict = bad.model_extra["guardrails"]
    assert verdict["blocked"] is True and verdict["policy"] == guard.policy.name
    want = refs["shipped"][harmful].decisions
    assert [(d["rule"], d["action"], d["position"]) for d in verdict["decisions"]] == \
        [(d.rule, d.action, d.position) for d in want]
    plain = engine["tok"].decode(refs["plain"][engine["benign"][0]], skip_special_tokens=True)
    assert good.choices[0].message.content == plain  # equal to unguarded vLLM
    assert good.model_extra["guardrails"]["blocked"] is False and good.model_extra["guardrails"]["decisions"] == []
    assert good.choices[0].finish_reason == ("length" if len(refs["plain"][engine["benign"][0]]) == N else "stop")
    assert good.usage.completion_tokens == len(refs["plain"][engine["benign"][0]])
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == engine["tok"].decode(refs["plain"][engine["benign"][1]], skip_special_tokens=True)
    assert chunks[-1].model_extra["guardrails"]["blocked"] is False
    assert h["engine"] == "vllm" and h["policy"] == guard.policy.name
    assert check.status_code == 501 and "--engine hf" in check.json()["error"]["message"]


@needs_vllm
@pytest.mark.model
def test_cascade_input_bands_judged_between_two_passes(engine: dict[str, Any]) -> None:
    """``serve --engine vllm --judge``: an input rule's band held at the prefill (nothing streamed), judged off the
    engine's thread, the request run again with the verdict: answers equal GuardedVLLM.generate's, each prompt judged
    once per request."""
    import openai

    from tests.test_vllm import JUDGED

    guard, harmful, benign = engine["guard"], engine["harmful"], engine["benign"][0]
    want = dict(zip([benign, harmful], guard.generate([benign, harmful], max_new_tokens=N, policy="cascade"),
                    strict=True))
    assert [want[p].blocked for p in (benign, harmful)] == [False, True]
    app, _ = _app(engine, policy="cascade")
    JUDGED.clear()
    with serving(app) as url:
        c = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=300)
        with ThreadPoolExecutor(2) as ex:
            good, bad = ex.map(lambda p: c.chat.completions.create(model="guardrails", max_tokens=N,
                                                                   messages=_chat(p)), [benign, harmful])
        chunks = list(c.chat.completions.create(model="guardrails", max_tokens=N, stream=True,
                                                messages=_chat(harmful)))
    assert sorted(JUDGED) == sorted([benign, harmful, harmful])
    tok = engine["tok"]
    assert good.choices[0].message.content == tok.decode(want[benign].output_ids, skip_special_tokens=True)
    refusal = guard.policies["cascade"].refusal
    assert bad.choices[0].message.content == refusal and bad.choices[0].finish_reason == "content_filter"
    for answer, p in ((good, benign), (bad, harmful)):
        got = answer.model_extra["guardrails"]["decisions"]
        assert [(d["rule"], d["action"], d["position"], d["verdict"]) for d in got] == \
            [(d.rule, d.action, d.position, d.verdict) for d in want[p].decisions]
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == refusal
    assert chunks[-1].model_extra["guardrails"]["decisions"][0]["verdict"] == "unsafe"


@needs_vllm
@pytest.mark.model
def test_close_ends_requests_waiting_on_a_judge(engine: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Closing the vLLM scheduler while the cascade's judges are asked: the calls not started are cancelled and
    their requests end with ``error`` at once; the ones under way end with ``error`` when their judge returns (nothing
    is queued again), and the judge threads are not left behind."""
    from guardrails.server.vllm_engine import VLLMScheduler

    guard = engine["guard"]
    gate, asked = threading.Event(), []

    def slow(request: Any) -> str:
        asked.append(request.text)
        gate.wait(60)
        return "safe"

    monkeypatch.setitem(guard.judges, "j", slow)
    ends: dict[int, Any] = {}
    sched = VLLMScheduler(guard, policy="cascade")
    prompt = guard.format_prompt(_chat(engine["benign"][0]))
    for i in range(6):
        sched.submit(prompt, max_new_tokens=N,
                     sink=lambda e, i=i: ends.__setitem__(i, e.completion) if e.kind == "done" else None)
    deadline = time.monotonic() + 120
    while len(asked) < 4 and time.monotonic() < deadline:  # the pool's four threads each hold one
        time.sleep(0.05)
    assert len(asked) == 4 and not ends
    sched.close()
    assert len(ends) == 2 and {c.finish_reason for c in ends.values()} == {"error"}
    gate.set()
    deadline = time.monotonic() + 60
    while len(ends) < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted(ends) == list(range(6)) and {c.error for c in ends.values()} == {"server shutting down"}
    assert len(asked) == 4 and sched._judges_pool is None
    for t in threading.enumerate():
        if t.name.startswith("guardrails-vllm-judge"):
            t.join(10)
            assert not t.is_alive()


@needs_vllm
@pytest.mark.model
@pytest.mark.parametrize("verdict", ["safe", "unsafe"])
@pytest.mark.parametrize("policy", ["ocascade", "late"])
def test_cascade_output_band_streams_once(engine: dict[str, Any], verdict: str, policy: str) -> None:
    """An output rule's band through the vLLM server (greedy): the first pass streams up to the held token, the
    second repeats those tokens without sending them again; the stream equals GuardedVLLM.generate's answer.
    ``ocascade`` escalates at the first generated token, ``late`` at HARMFUL's highest-scoring one, mid-answer."""
    import openai

    from tests.test_vllm import JUDGED_OUT, OUT_VERDICT

    guard, prompt = engine["guard"], engine["harmful"] if policy == "late" else engine["benign"][0]
    OUT_VERDICT["v"] = verdict
    want = guard.generate(prompt, max_new_tokens=N, policy=policy)
    assert want.decisions and (policy == "ocascade" or want.decisions[0].output_index > 0)
    app, _ = _app(engine, policy=policy)
    JUDGED_OUT.clear()
    with serving(app) as url:
        c = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=300)
        chunks = list(c.chat.completions.create(model="guardrails", max_tokens=N, stream=True,
                                                messages=_chat(prompt)))
    assert len(JUDGED_OUT) == 1
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert want.blocked == (verdict == "unsafe")
    released = engine["tok"].decode(want.output_ids, skip_special_tokens=True)
    assert streamed == ((released + "\n" if released else "") + want.text if want.blocked else want.text)
    got = chunks[-1].model_extra["guardrails"]["decisions"]
    assert [(d["rule"], d["action"], d["position"], d["verdict"]) for d in got] == \
        [(d.rule, d.action, d.position, d.verdict) for d in want.decisions]


@needs_vllm
@pytest.mark.model
def test_decode_block_streams_nothing_from_the_tripping_token_on(engine: dict[str, Any]) -> None:
    """An output rule trips mid-answer: the stream carries exactly the text before the tripping token, then
    the refusal; the non-streamed answer is the refusal; both carry the verdict."""
    import openai

    ref, harmful, tok = engine["refs"]["trip"], engine["harmful"], engine["tok"]
    app, _ = _app(engine, policy="tripwire")
    with serving(app) as url:
        c = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=300)
        chunks = list(c.chat.completions.create(model="guardrails", max_tokens=N, stream=True,
                                                messages=_chat(harmful)))
        whole = c.chat.completions.create(model="guardrails", max_tokens=N, messages=_chat(harmful))
    refusal = engine["guard"].policies["tripwire"].refusal
    pieces = [ch.choices[0].delta.content or "" for ch in chunks if ch.choices]
    text = "".join(pieces)
    released = tok.decode(ref.output_ids, skip_special_tokens=True)
    assert text == (released + "\n" if released else "") + refusal
    assert len(ref.output_ids) == ref.decisions[0].output_index  # released = everything before the tripping token
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    verdict = chunks[-1].model_extra["guardrails"]
    assert verdict["blocked"] and verdict["policy"] == "tripwire"
    assert [(d["rule"], d["position"], d["output_index"]) for d in verdict["decisions"]] == \
        [(d.rule, d.position, d.output_index) for d in ref.decisions]
    assert whole.choices[0].message.content == refusal and whole.choices[0].finish_reason == "content_filter"


@needs_vllm
@pytest.mark.model
def test_concurrent_requests_share_engine_steps(engine: dict[str, Any]) -> None:
    """Requests sent together run in the same vLLM steps (one forward for all) and each equals its serial run."""
    import openai

    refs, benign, harmful = engine["refs"]["shipped"], engine["benign"], engine["harmful"]
    prompts = [*benign, harmful]
    app, sched = _app(engine, gather_ms=20.0)

    async def run(url: str) -> list[Any]:
        c = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=300)
        return list(await asyncio.gather(*(c.chat.completions.create(model="guardrails", max_tokens=N,
                                                                     messages=_chat(p)) for p in prompts)))

    with serving(app) as url:
        answers = asyncio.run(run(url))
    for p, a in zip(prompts, answers, strict=True):
        assert a.choices[0].message.content == refs[p].text, p
        assert a.model_extra["guardrails"]["blocked"] is refs[p].blocked
    assert max(sched.batch_sizes) == len(prompts), sched.batch_sizes  # all five in one step
    assert sched.finish_counts.get("content_filter") == 1


@needs_vllm
@pytest.mark.model
def test_text_completions_equal_the_library_path(engine: dict[str, Any]) -> None:
    """/v1/completions continues the prompt as given (no chat template), as ``generate(..., chat=False)``."""
    import openai

    refs = engine["refs"]["raw"]
    app, _ = _app(engine)
    with serving(app) as url:
        c = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=300)
        plain = c.completions.create(model="guardrails", prompt="The capital of France is", max_tokens=N)
        streamed = list(c.completions.create(model="guardrails", prompt="The capital of France is", max_tokens=N,
                                             stream=True))
        bad = c.completions.create(model="guardrails", prompt=engine["harmful"], max_tokens=N)
        with pytest.raises(openai.BadRequestError, match="echo"):
            c.completions.create(model="guardrails", prompt="x", max_tokens=2, echo=True)
    assert plain.object == "text_completion" and plain.choices[0].text == refs[0].text
    assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == refs[0].text
    assert bad.choices[0].text == refs[1].text
    assert bad.model_extra["guardrails"]["blocked"] is refs[1].blocked
    assert bad.choices[0].finish_reason in (("content_filter",) if refs[1].blocked else ("stop", "length"))
