"""A judge behind an OpenAI-compatible chat endpoint: the cascade's second stage as a served classifier.

    from guardrails.integrations.openai_judge import OpenAIJudge
    guard = GuardedModel.from_pretrained(policy="my-cascade.yaml",
                                         judges={"llm": OpenAIJudge("http://127.0.0.1:8001/v1", "llama-guard")})

or from the command line, configured by the environment (``GUARDRAILS_JUDGE_URL``, ``GUARDRAILS_JUDGE_MODEL``,
optional ``GUARDRAILS_JUDGE_API_KEY`` and ``GUARDRAILS_JUDGE_TIMEOUT_S``)::

    guardrails serve --policy my-cascade.yaml --judge "llm=guardrails.integrations.openai_judge:from_env()"

Each call POSTs the judge's rendered prompt as one user turn to ``<base_url>/chat/completions`` (vLLM, TGI,
llama.cpp's server, OpenAI ...) and returns the reply text, whose first word is the verdict (Llama Guard's
``safe`` / ``unsafe\\nS1`` parse as is; for Llama Guard, whose chat template frames the conversation itself, name
the judge prompt ``text`` in the policy so that the user's text is sent unwrapped). The standard library's HTTP
client is used, so no dependency is added. A failed call (HTTP error, timeout, a reply without a message) raises;
the rule's judge ``on_error`` then decides and the decision records why.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Any

from guardrails.core.cascade import JudgeError, JudgeRequest

ENV_URL, ENV_MODEL, ENV_KEY, ENV_TIMEOUT = ("GUARDRAILS_JUDGE_URL", "GUARDRAILS_JUDGE_MODEL",
                                            "GUARDRAILS_JUDGE_API_KEY", "GUARDRAILS_JUDGE_TIMEOUT_S")


class OpenAIJudge:
    """Sends the rendered judge prompt to ``<base_url>/chat/completions`` and returns the reply's text.

    ``base_url``: the API root, e.g. ``http://127.0.0.1:8001/v1``; ``model``: the model id the server expects;
    ``system``: an optional system message; ``max_tokens``: the reply's length (a verdict is a few tokens);
    ``timeout_s``: the HTTP timeout (the policy's judge ``timeout_s`` also bounds the call)."""

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, system: str | None = None,
                 max_tokens: int = 16, timeout_s: float = 30.0) -> None:
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise JudgeError(f"OpenAIJudge: base_url {base_url!r} is not an http(s) URL "
                             "(valid: e.g. http://127.0.0.1:8001/v1)")
        if not isinstance(model, str) or not model.strip():
            raise JudgeError("OpenAIJudge: model is empty; valid: the model id the server serves "
                             "(GET <base_url>/models)")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise JudgeError(f"OpenAIJudge: max_tokens {max_tokens!r}; valid: an integer >= 1")
        if not timeout_s > 0:
            raise JudgeError(f"OpenAIJudge: timeout_s {timeout_s!r}; valid: seconds > 0")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key, self.system = model, api_key, system
        self.max_tokens, self.timeout_s = max_tokens, float(timeout_s)

    def body(self, request: JudgeRequest) -> dict[str, Any]:
        """The JSON body sent: greedy, short, the prompt as the user turn (after the system message, if any)."""
        messages = [{"role": "system", "content": self.system}] if self.system else []
        messages.append({"role": "user", "content": request.prompt})
        return {"model": self.model, "messages": messages, "max_tokens": self.max_tokens, "temperature": 0.0}

    def __call__(self, request: JudgeRequest) -> str:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=json.dumps(self.body(request)).encode(), headers=headers,
                                     method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                reply = json.loads(resp.read().decode("utf-8"))
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")[:200]
            raise JudgeError(f"{self.url}: HTTP {exc.code} {detail}") from None
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            raise JudgeError(f"{self.url}: {getattr(exc, 'reason', exc)}") from None
        except json.JSONDecodeError:
            raise JudgeError(f"{self.url}: the reply is not JSON") from None
        try:
            content = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise JudgeError(f"{self.url}: the reply has no choices[0].message.content") from None
        if not isinstance(content, str):
            raise JudgeError(f"{self.url}: the reply's content is {type(content).__name__}, not text")
        return content

    def __repr__(self) -> str:
        return f"OpenAIJudge({self.url!r}, {self.model!r})"


def from_env() -> OpenAIJudge:
    """An :class:`OpenAIJudge` from ``GUARDRAILS_JUDGE_URL`` and ``GUARDRAILS_JUDGE_MODEL`` (required),
    ``GUARDRAILS_JUDGE_API_KEY`` and ``GUARDRAILS_JUDGE_TIMEOUT_S`` (optional): for ``--judge
    NAME=guardrails.integrations.openai_judge:from_env()``."""
    missing = [k for k in (ENV_URL, ENV_MODEL) if not os.environ.get(k)]
    if missing:
        raise JudgeError(f"openai_judge.from_env(): set {' and '.join(missing)} "
                         f"(e.g. {ENV_URL}=http://127.0.0.1:8001/v1 {ENV_MODEL}=llama-guard; "
                         f"optional {ENV_KEY}, {ENV_TIMEOUT})")
    raw = os.environ.get(ENV_TIMEOUT, "30")
    try:
        timeout = float(raw)
    except ValueError:
        raise JudgeError(f"{ENV_TIMEOUT}={raw!r} is not a number of seconds") from None
    return OpenAIJudge(os.environ[ENV_URL], os.environ[ENV_MODEL], api_key=os.environ.get(ENV_KEY) or None,
                       timeout_s=timeout)


__all__ = ["OpenAIJudge", "from_env"]
