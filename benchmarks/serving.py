"""The OpenAI-compatible server under load: requests/s, tokens/s, p50/p95 latency and time to first token
at 1, 4 and 16 concurrent clients, guarded vs unguarded, in one run.

Both variants go through the same server, scheduler and decode loop on the bundled model; "guarded"
runs a shipped policy (``--policy``, default ``harmful-requests``: input rules, so it scores each prompt at
prefill and its decode steps run unhooked; an output policy such as ``harmful-compliance`` scores every
token), "unguarded" is the same loop with no hooks registered and nothing scored. Prompts are benign
(nothing blocks), so both variants generate the same number of tokens. Each client streams its requests
one after another over HTTP (uvicorn on 127.0.0.1, the official ``openai`` async client); throughput counts
the released tokens (``usage``).
Levels and variants are interleaved (each level runs guarded and unguarded back to back, ``--repeats``
rounds in alternating order) so machine load hits both alike; the table shows the best round.

    python benchmarks/serving.py                      # full: 1/4/16 clients, 24 new tokens, ~5 min on 2 cores
    python benchmarks/serving.py --quick              # smoke test (numbers mean nothing)
"""

from __future__ import annotations

import asyncio
import socket
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works.",
    "Describe a walk through a busy market.",
    "Give me a recipe for vegetable soup.",
    "Tell me about the history of the printing press.",
    "Write a letter to a friend about a holiday.",
    "Explain how rain forms.",
    "How do I plant a small vegetable garden?",
    "What makes a good cup of coffee?",
    "Describe the planets of the solar system.",
    "Write a poem about autumn leaves.",
    "How do airplanes stay in the air?",
    "Suggest a plan for learning to play guitar.",
    "Explain what a database index is.",
    "Describe a day in the life of a baker.",
    "What should I pack for a weekend hike?",
]


class _Served:
    def __init__(self, app: Any) -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


def _unguarded(guard: Any) -> Any:
    """The same GuardedModel loop with no hooks and nothing scored (the baseline)."""
    from guardrails.serving.generation import GuardedModel

    class Unguarded(GuardedModel):
        def _hooks(self, run: Any) -> dict[int, Any]:
            return {}

        def _scorable(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            return torch.zeros_like(mask, dtype=torch.bool)

    return Unguarded(guard.model, guard.tokenizer, guard.policy, saes=guard.saes)


async def _load(url: str, clients: int, per_client: int, max_tokens: int) -> dict[str, Any]:
    import openai

    ac = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
    lat: list[float] = []
    ttft: list[float] = []
    tokens = 0
    texts: list[tuple[str, str]] = []

    async def client(c: int) -> None:
        nonlocal tokens
        for i in range(per_client):
            p = PROMPTS[(c * per_client + i) % len(PROMPTS)]
            t0 = time.perf_counter()
            first = None
            pieces = []
            stream = await ac.chat.completions.create(
                model="guardrails", messages=[{"role": "user", "content": p}], max_tokens=max_tokens,
                temperature=0, stream=True, stream_options={"include_usage": True})
            async for ch in stream:
                if ch.choices and ch.choices[0].delta.content:
                    first = first or time.perf_counter()
                    pieces.append(ch.choices[0].delta.content)
                if ch.usage is not None:
                    tokens += ch.usage.completion_tokens
            end = time.perf_counter()
            lat.append(end - t0)
            ttft.append((first or end) - t0)
            texts.append((p, "".join(pieces)))

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*[client(c) for c in range(clients)])
    finally:
        await ac.close()
    wall = time.perf_counter() - t0
    n = clients * per_client
    q = statistics.quantiles(lat, n=20) if len(lat) > 1 else lat * 19
    return {"requests": n, "wall_s": wall, "req_per_s": n / wall, "tok_per_s": tokens / wall, "tokens": tokens,
            "p50_s": statistics.median(lat), "p95_s": q[18], "ttft_p50_s": statistics.median(ttft),
            "texts": sorted(texts)}


def main() -> None:
    p = _util.parser(__doc__.splitlines()[0])
    p.add_argument("--max-tokens", type=int, default=None, help="tokens per answer (default 24, quick 4)")
    p.add_argument("--levels", default=None, help="client counts, comma-separated (default 1,4,16)")
    p.add_argument("--policy", default="harmful-requests", help="policy of the guarded variant")
    args = p.parse_args()
    _util.pin_threads(args.threads)
    repeats = args.repeats or (1 if args.quick else 2)
    max_tokens = args.max_tokens or (4 if args.quick else 24)
    levels = [int(x) for x in (args.levels or ("1,4" if args.quick else "1,4,16")).split(",")]

    from guardrails.server import ServerConfig, create_app
    from guardrails.serving.generation import GuardedModel

    policy = _util.load_policy(args.policy)  # a misspelt name fails before the model loads
    model, tok = _util.load_bundled()
    guard = GuardedModel(model, tok, policy)
    variants = {"guarded": guard, "unguarded": _unguarded(guard)}
    servers = {name: _Served(create_app(g, ServerConfig(max_batch=16, gather_ms=5))) for name, g in variants.items()}
    results: dict[int, dict[str, list[dict[str, Any]]]] = {c: {v: [] for v in variants} for c in levels}
    t_start = time.perf_counter()
    try:
        for s in servers.values():  # warm-up
            asyncio.run(_load(s.url, 1, 1, 2))
        for r in range(repeats):
            for c in levels:
                per_client = max(1, (4 if c == 1 else 2) if not args.quick else 1)
                order = list(variants) if (r + c) % 2 == 0 else list(reversed(variants))
                for name in order:
                    results[c][name].append(asyncio.run(_load(servers[name].url, c, per_client, max_tokens)))
    finally:
        batches = {name: list(s.server.config.app.state.guardrails.scheduler.batch_sizes)
                   for name, s in servers.items()}
        for s in servers.values():
            s.close()
    # the guard changes nothing on benign prompts: both variants must have said the same
    for c in levels:
        g, u = results[c]["guarded"][0]["texts"], results[c]["unguarded"][0]["texts"]
        if g != u:
            raise SystemExit(f"guarded and unguarded answers differ at {c} clients: the comparison is void")

    def best(c: int, v: str) -> dict[str, Any]:
        return max(results[c][v], key=lambda x: x["tok_per_s"])

    base = {v: best(levels[0], v)["tok_per_s"] for v in variants}
    rows, out = [], {}
    for c in levels:
        for v in variants:
            b = best(c, v)
            speedup = b["tok_per_s"] / base[v]
            ratio = b["tok_per_s"] / best(c, "unguarded")["tok_per_s"]
            rows.append([c, v, b["req_per_s"], b["tok_per_s"], b["p50_s"], b["p95_s"], b["ttft_p50_s"], speedup,
                         ratio])
            out[f"{v}_{c}"] = {k: b[k] for k in ("requests", "wall_s", "req_per_s", "tok_per_s", "tokens", "p50_s",
                                                 "p95_s", "ttft_p50_s")} | {"speedup_vs_1": speedup,
                                                                            "guarded_over_unguarded": ratio}
    cols = ["clients", "variant", "req/s", "tok/s", "p50 s", "p95 s", "TTFT p50 s", "x vs 1 client", "vs unguarded"]
    _util.table(f"Serving the bundled model, {max_tokens} new tokens, best of {repeats}", cols, rows)
    print()
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(_util._fmt(x) for x in row) + " |")
    top = levels[-1]
    result = {
        "benchmark": "serving", "quick": args.quick, "max_tokens": max_tokens, "repeats": repeats, "levels": levels,
        "results": out,
        "speedup_top_vs_1_guarded": best(top, "guarded")["tok_per_s"] / base["guarded"],
        "guarded_over_unguarded_min": min(best(c, "guarded")["tok_per_s"] / best(c, "unguarded")["tok_per_s"]
                                          for c in levels),
        "batch_size_max": {k: max(v, default=0) for k, v in batches.items()},
        "elapsed_s": time.perf_counter() - t_start,
        "environment": _util.environment(args.threads),
    }
    json_out = args.json_out
    if json_out is None and not args.quick:
        json_out = str(Path(__file__).resolve().parent / "results" / "serving.json")
    _util.emit(result, json_out)


if __name__ == "__main__":
    main()
