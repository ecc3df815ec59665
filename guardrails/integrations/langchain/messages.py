"""LangChain messages as chat turns, and guard outcomes as message metadata.

Messages map to chat turns as system/human/ai -> system/user/assistant; tool (and function) results
become ``tool`` turns and an AI message's tool calls are written into its turn in the ``<tool_call>``
JSON format the model itself emits, so both are scored. Non-text content blocks (images, audio,
files) are an error: the guard reads text only.
"""

from __future__ import annotations

import json
from typing import Any

from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.prompt_values import ChatPromptValue, StringPromptValue

from guardrails import GuardrailViolation
from guardrails.core.decision import Decision, TextScore
from guardrails.core.policy import Policy
from guardrails.core.semantics import is_block, is_flag
from guardrails.serving.result import GenerationResult

Turn = dict[str, str]
ACCEPTED = "str, BaseMessage, a list of messages, ChatPromptValue, StringPromptValue, or a dict"
_ROLES = {"system": "system", "human": "user", "user": "user", "ai": "assistant", "assistant": "assistant",
          "tool": "tool", "function": "tool"}


# -- messages -> chat turns ----------------------------------------------------------------------------------


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for i, block in enumerate(content or []):
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") in ("text", "reasoning"):
            parts.append(str(block.get("text") or block.get("reasoning") or ""))
        else:
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise TypeError(f"{where}.content[{i}]: content block of type {kind!r} is not text; "
                            "valid: str or 'text' blocks (SAE guards read text only)")
    return "".join(parts)


def message_to_turn(msg: BaseMessage, where: str = "message") -> Turn:
    """One LangChain message as a ``{"role", "content"}`` chat turn (see the module docstring)."""
    if isinstance(msg, SystemMessage):
        role = "system"
    elif isinstance(msg, HumanMessage):
        role = "user"
    elif isinstance(msg, AIMessage):
        role = "assistant"
    elif isinstance(msg, ToolMessage | FunctionMessage):
        role = "tool"
    elif isinstance(msg, ChatMessage) and msg.role in _ROLES:
        role = _ROLES[msg.role]
    else:
        extra = f" with role {msg.role!r}" if isinstance(msg, ChatMessage) else ""
        raise TypeError(f"{where}: cannot guard a {type(msg).__name__}{extra}; valid: SystemMessage, "
                        f"HumanMessage, AIMessage, ToolMessage, ChatMessage with role in {sorted(_ROLES)}")
    text = _text(msg.content, where)
    if isinstance(msg, AIMessage):
        for call in msg.tool_calls:
            text += "\n<tool_call>\n" + json.dumps({"name": call["name"], "arguments": call["args"]}) + "\n</tool_call>"
    return {"role": role, "content": text}


def to_turns(value: Any, where: str = "input") -> list[Turn]:
    """Chat turns of a string, message, message list, prompt value, or dict of prompt variables."""
    if isinstance(value, str):
        turns = [{"role": "user", "content": value}]
    elif isinstance(value, BaseMessage):
        turns = [message_to_turn(value, where)]
    elif isinstance(value, StringPromptValue):
        turns = [{"role": "user", "content": value.text}]
    elif isinstance(value, ChatPromptValue):
        turns = [message_to_turn(m, f"{where}.messages[{i}]") for i, m in enumerate(value.messages)]
    elif isinstance(value, dict):
        turns, text = [], []
        for key, v in value.items():
            if isinstance(v, str | int | float) and not isinstance(v, bool):
                text.append(str(v))
            elif isinstance(v, list | tuple) and all(isinstance(m, BaseMessage) for m in v):
                turns += [message_to_turn(m, f"{where}[{key!r}][{i}]") for i, m in enumerate(v)]
            else:
                raise TypeError(f"{where}[{key!r}]: cannot guard a {type(v).__name__}; valid values: str, "
                                "numbers, lists of messages")
        if text:
            turns.append({"role": "user", "content": "\n".join(text)})
    elif isinstance(value, list | tuple):
        turns = []
        for i, m in enumerate(value):
            if isinstance(m, BaseMessage):
                turns.append(message_to_turn(m, f"{where}[{i}]"))
            elif isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str):
                role = _ROLES.get(m["role"])
                if role is None:
                    raise TypeError(f"{where}[{i}].role {m['role']!r} unknown; valid: {sorted(_ROLES)}")
                turns.append({"role": role, "content": m["content"]})
            else:
                raise TypeError(f"{where}[{i}]: cannot guard a {type(m).__name__}; valid list items: "
                                "BaseMessage or {'role', 'content'} dicts")
    else:
        raise TypeError(f"{where}: cannot guard a {type(value).__name__}; valid: {ACCEPTED}")
    if not turns or not any(t["content"].strip() for t in turns):
        raise ValueError(f"{where}: empty input: nothing to score (got {type(value).__name__} with no text)")
    return turns


# -- results -> metadata -----------------------------------------------------------------------------------------


def guard_metadata(result: GenerationResult | TextScore, policy: Policy, **extra: Any) -> dict[str, Any]:
    """The ``guardrails`` entry of ``response_metadata``: outcome, policy and every decision."""
    decisions = result.decisions
    return {
        "blocked": result.blocked,
        "flagged": any(is_flag(d) for d in decisions),
        "steered": bool(getattr(result, "steered", False)),
        "policy": policy.name,
        "policy_digest": policy.digest,
        "decisions": [d.to_dict() for d in decisions],
        "errors": list(getattr(result, "errors", None) or [d.reason for d in decisions if d.reason]),
        **extra,
    }


def violation(policy: Policy, decisions: list[Decision], result: Any, what: str) -> GuardrailViolation:
    d = next((d for d in decisions if is_block(d)), None)
    why = (f"rule {d.rule!r} at token {d.position} ({d.scope}): " + (
        f"score {d.score:.4g} >= threshold {d.threshold:.4g}" if d.action != "error" else f"scoring failed: {d.reason}"
    )) if d else "blocked"
    return GuardrailViolation(f"policy {policy.name!r} blocked the {what}: {why}", result)


def refusal_of(policy: Policy, decisions: list[Decision]) -> str:
    d = next((d for d in decisions if is_block(d)), None)
    rule = next((r for r in policy.rules if d is not None and r.id == d.rule), None)
    return (rule.message if rule and rule.message else None) or policy.refusal
