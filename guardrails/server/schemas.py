"""Request bodies of the server (OpenAI's chat-completions schema, strict) and OpenAI-style errors.

Unknown fields are rejected with the list of valid ones; fields OpenAI defines that this server does not
implement (tools, logprobs, n > 1...) are rejected by name instead of being silently ignored.
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class APIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"] = Field(description="Only text parts are supported")
    text: str = Field(description="The text")


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"] = Field(description="Who wrote the turn")
    content: str | list[TextPart] = Field(description="The text, or a list of text parts")
    name: str | None = Field(default=None, description="Optional author name (ignored by the chat template)")
    tool_call_id: str | None = Field(default=None, description="Accepted for tool turns (tool calls are not supported)")

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = Field(default=False, description="Send a last chunk with token usage")


UNSUPPORTED = {
    "tools": None, "tool_choice": None, "functions": None, "function_call": None, "response_format": None,
    "logit_bias": None, "top_logprobs": None, "audio": None, "modalities": None, "prediction": None,
    "parallel_tool_calls": None, "reasoning_effort": None, "web_search_options": None,
}
"""OpenAI fields accepted only when absent or null (this server cannot honour them)."""


def _stops(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def _sampling(temp: float | None, top_p: float | None, seed: int | None) -> dict[str, Any]:
    """``model.generate`` arguments: temperature 0, or absent with top_p absent, is greedy (top_k off)."""
    if temp == 0 or (temp is None and top_p is None):
        return {"do_sample": False}
    return {"do_sample": True, "temperature": 1.0 if temp is None else temp,
            "top_p": 1.0 if top_p is None else top_p, "top_k": 0, "seed": seed}


class _GenerationRequest(_Strict):
    """Fields and helpers both generation endpoints share (OpenAI's names and ranges)."""

    model: str | None = Field(default=None, description="Model id (see GET /v1/models); default: the served model")
    max_tokens: int | None = Field(default=None, ge=1, description="Most tokens to generate")
    temperature: float | None = Field(default=None, ge=0, le=2, description="0 or absent: greedy; > 0: sampling")
    top_p: float | None = Field(default=None, gt=0, le=1, description="Nucleus sampling mass")
    stop: str | list[str] | None = Field(default=None, description="Up to 4 strings that end the answer (not included)")
    seed: int | None = Field(default=None, description="Seed for sampling (reproducible answers)")
    stream: bool = Field(default=False, description="Answer as server-sent events")
    stream_options: StreamOptions | None = Field(default=None, description="Streaming options")
    n: int | None = Field(default=None, ge=1, le=1, description="Number of answers: only 1")
    user: str | None = Field(default=None, description="End-user id (recorded nowhere)")
    presence_penalty: float | None = Field(default=None, ge=0, le=0, description="Only 0 (not implemented)")
    frequency_penalty: float | None = Field(default=None, ge=0, le=0, description="Only 0 (not implemented)")

    def limit(self) -> int | None:
        return self.max_tokens

    def stops(self) -> list[str]:
        return _stops(self.stop)

    def sampling(self) -> dict[str, Any]:
        """``model.generate`` arguments: temperature 0, or absent with top_p absent, is greedy (top_k off)."""
        return _sampling(self.temperature, self.top_p, self.seed)


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1, description="The conversation")
    max_completion_tokens: int | None = Field(default=None, ge=1, description="Same as max_tokens (newer name)")
    logprobs: bool | None = Field(default=None, description="Only false (not implemented)")
    store: bool | None = Field(default=None, description="Ignored")
    metadata: dict[str, str] | None = Field(default=None, description="Ignored")
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    logit_bias: Any = None
    top_logprobs: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    parallel_tool_calls: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None

    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def chat_messages(self) -> list[dict[str, str]]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


COMPLETION_UNSUPPORTED = {"suffix": None, "logit_bias": None, "logprobs": None}
"""Fields of OpenAI's completions API accepted only when absent or null."""


class CompletionRequest(_GenerationRequest):
    """OpenAI's (legacy) completions API: one prompt, continued as given (no chat template)."""

    prompt: str | list[str] = Field(description="The text to continue (a list: exactly one string)")
    best_of: int | None = Field(default=None, ge=1, le=1, description="Only 1 (not implemented)")
    echo: bool | None = Field(default=None, description="Only false (not implemented)")
    suffix: Any = None
    logit_bias: Any = None
    logprobs: Any = None

    def text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise APIError(400, f"'prompt' has {len(self.prompt)} strings; this server takes exactly one",
                           param="prompt", code="invalid_value")
        return self.prompt[0]


class GuardCheckRequest(_Strict):
    input: str | list[str] | None = Field(default=None, description="Text(s) to scan (each alone, or as responses)")
    messages: list[ChatMessage] | None = Field(default=None, description="A conversation to scan (instead of input)")
    scope: Literal["input", "output"] = Field(
        "input", description="input: scan as the user's prompt; output: scan as the assistant's answer "
        "(to `prompt`, or, with messages, the last assistant turn answering the turns before it)")
    prompt: str | None = Field(default=None, description="With scope output and input: the prompt being answered")
    model: str | None = Field(default=None, description="Model id (optional)")


def parse_body(raw: bytes, schema: type[BaseModel]) -> Any:
    """JSON bytes to ``schema``; any problem becomes a 400 that names the field and what is valid."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    for name in UNSUPPORTED if schema is ChatCompletionRequest else ():
        if data.get(name) is not None:
            raise APIError(400, f"'{name}' is not supported by this server; remove it", param=name,
                           code="unsupported_parameter")
    if schema is ChatCompletionRequest and data.get("logprobs"):
        raise APIError(400, "'logprobs' is not supported by this server; valid: false", param="logprobs",
                       code="unsupported_parameter")
    for name in COMPLETION_UNSUPPORTED if schema is CompletionRequest else ():
        if data.get(name) is not None:
            raise APIError(400, f"'{name}' is not supported by this server; remove it", param=name,
                           code="unsupported_parameter")
    if schema is CompletionRequest and data.get("echo"):
        raise APIError(400, "'echo' is not supported by this server; valid: false", param="echo",
                       code="unsupported_parameter")
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise _field_error(exc, schema) from None


def _field_error(exc: ValidationError, schema: type[BaseModel]) -> APIError:
    err = exc.errors()[0]
    loc = _loc(err["loc"])
    if err["type"] == "extra_forbidden":
        model = _model_at(schema, err["loc"][:-1])
        hidden = UNSUPPORTED if schema is not CompletionRequest else {**UNSUPPORTED, **COMPLETION_UNSUPPORTED}
        names = [n for n in model.model_fields if n not in hidden]  # "model", then the required ones, then the rest
        rank = {n: (n != "model", not model.model_fields[n].is_required()) for n in names}
        valid = ", ".join(sorted(names, key=rank.__getitem__))
        return APIError(400, f"unknown field '{loc}'; valid: {valid}", param=loc, code="unknown_parameter")
    if err["type"] == "missing":
        return APIError(400, f"'{loc}' is required", param=loc, code="missing_parameter")
    got = err.get("input")
    valid = _valid_of(schema, err["loc"])
    hint = f"; valid: {valid}" if valid else ""
    shown = json.dumps(got)[:80] if _jsonable(got) else repr(got)[:80]
    return APIError(400, f"invalid '{loc}': {err['msg']} (got {shown}){hint}", param=loc, code="invalid_value")


def _loc(parts: tuple[Any, ...]) -> str:
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif p in ("str", "list[TextPart]", "list[str]", "StreamOptions", "list[ChatMessage]"):
            continue  # pydantic's union branch names
        else:
            out += ("." if out else "") + str(p)
    return out


def _model_at(schema: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel]:
    model = schema
    for p in loc:
        if isinstance(p, int) or p not in model.model_fields:
            continue
        ann = model.model_fields[p].annotation
        for cand in (ChatMessage, TextPart, StreamOptions):
            if cand.__name__ in str(ann):
                model = cand
                break
    return model


def _valid_of(schema: type[BaseModel], loc: tuple[Any, ...]) -> str:
    name = next((p for p in reversed(loc) if isinstance(p, str) and not p.startswith(("list", "str"))), "")
    return {
        "role": "system, developer, user, assistant, tool",
        "type": "text",
        "temperature": "a number in [0, 2]",
        "top_p": "a number in (0, 1]",
        "max_tokens": "an integer >= 1",
        "max_completion_tokens": "an integer >= 1",
        "n": "1",
        "best_of": "1",
        "prompt": "a string, or a list of exactly one string",
        "presence_penalty": "0",
        "frequency_penalty": "0",
        "scope": "input, output",
        "stream": "true, false",
        "content": "a string or a list of {type: text, text} parts",
    }.get(name, "")


def _jsonable(x: Any) -> bool:
    try:
        json.dumps(x)
        return True
    except (TypeError, ValueError):
        return False


def clean(obj: Any) -> Any:
    """Replace non-finite floats with None so the JSON is standard (``NaN`` is not JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [clean(v) for v in obj]
    return obj
