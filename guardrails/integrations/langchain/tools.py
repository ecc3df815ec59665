"""Tools for a local chat model: how they are shown to the model and how its tool calls are read back.

The model sees the tools as JSON schemas in a system turn, and is asked to answer a call as
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``: the format of the SmolLM2 instruct
models (a JSON list inside one tag) and of Qwen3 (one JSON object per tag). :func:`parse_tool_calls`
reads both, and a bare JSON object ``{"name", "arguments"}`` naming a bound tool. Because the call
is text the model generates, output rules score it token by token like any answer.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from typing import Any, NamedTuple

TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

TOOLS_PROMPT = (
    "You are a function calling AI model. You may call one or more of these functions to help with the "
    "user's request:\n<tools>\n{tools}\n</tools>\n"
    "To call a function, answer only with a JSON object inside tags, like this:\n"
    '<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>\n'
    "If no function fits, answer the user directly."
)
JSON_PROMPT = (
    "Answer only with one JSON object (no other text) that matches this JSON schema:\n{schema}"
)


class ParsedOutput(NamedTuple):
    """A model's answer split into text and tool calls."""

    text: str
    """The answer with the tool-call blocks removed."""
    tool_calls: list[dict[str, Any]]
    """LangChain tool calls: ``{"name", "args", "id", "type": "tool_call"}``."""
    invalid: list[dict[str, Any]]
    """Blocks that did not parse: ``{"name", "args" (raw text), "id", "error", "type": "invalid_tool_call"}``."""


def tool_schemas(tools: Sequence[Any]) -> list[dict[str, Any]]:
    """OpenAI-style function schemas of LangChain tools, pydantic models, functions or dicts."""
    from langchain_core.utils.function_calling import convert_to_openai_tool

    return [convert_to_openai_tool(t) for t in tools]


def tools_prompt(schemas: list[dict[str, Any]]) -> str:
    return TOOLS_PROMPT.format(tools="\n".join(json.dumps(s["function"]) for s in schemas))


def json_prompt(schema: dict[str, Any]) -> str:
    return JSON_PROMPT.format(schema=json.dumps(schema))


def _call(obj: Any, names: set[str] | None) -> dict[str, Any] | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    if names is not None and obj["name"] not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        args = json.loads(args)
    if not isinstance(args, dict):
        raise ValueError(f"arguments of {obj['name']!r} must be a JSON object, got {type(args).__name__}")
    return {"name": obj["name"], "args": args, "id": f"call_{uuid.uuid4().hex[:12]}", "type": "tool_call"}


def parse_tool_calls(text: str, names: Sequence[str] | None = None) -> ParsedOutput:
    """Tool calls in ``text`` (see the module docstring); ``names``: the bound tools (others are text)."""
    allowed = set(names) if names is not None else None
    calls: list[dict[str, Any]] = []
    invalid: list[dict[str, Any]] = []
    blocks = list(TOOL_CALL.finditer(text))
    for m in blocks:
        raw = m.group(1).strip()
        try:
            value = json.loads(raw)
            items = value if isinstance(value, list) else [value]
            for item in items:
                call = _call(item, allowed)
                if call is None:
                    raise ValueError(f"not a call of a bound tool ({sorted(allowed or [])}): {item!r:.80}")
                calls.append(call)
        except (ValueError, TypeError) as exc:
            invalid.append({"name": None, "args": raw, "id": f"call_{uuid.uuid4().hex[:12]}",
                            "error": f"{type(exc).__name__}: {exc}", "type": "invalid_tool_call"})
    rest = TOOL_CALL.sub("", text).strip() if blocks else text
    if not blocks:  # a bare JSON object naming a bound tool
        obj = first_json(text)
        try:
            call = _call(obj, allowed) if obj is not None and allowed else None
        except (ValueError, TypeError):
            call = None
        if call is not None:
            calls.append(call)
            rest = ""
    return ParsedOutput(rest, calls, invalid)


def first_json(text: str) -> Any:
    """The first JSON object or array in ``text`` (after any prose or code fence), or None."""
    dec = json.JSONDecoder()
    for i, ch in enumerate(text):
        if ch in "{[":
            try:
                return dec.raw_decode(text[i:])[0]
            except ValueError:
                continue
    return None
