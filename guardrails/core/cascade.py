"""The cascade: a rule sends its uncertain band to a second-stage judge (torch-free).

A rule with ``escalate_above`` has three bands for its (windowed) score ``s``:

- ``s < threshold``: the token passes, as for any rule;
- ``threshold <= s < escalate_above``: the *uncertain band*: the rule's judge reads the text and its
  verdict decides: ``unsafe`` -> the rule's action (flag or block), ``safe`` -> allow (recorded as a
  decision with ``action="allow"``), a failure or a timeout -> the judge's ``on_error`` (default: the
  rule's, then the policy's: block), recorded;
- ``s >= escalate_above``: the rule acts directly, as it does today.

A judge is bound at runtime by name (``GuardedModel(..., judges={"llama-guard": chat_model})``,
``compile_policy(..., judges=...)``, ``guard.with_judges(...)``), never loaded from YAML. It is any
callable taking a :class:`JudgeRequest` and returning a verdict (``True``/``False`` = unsafe/safe, a
string whose first word is ``unsafe``/``safe``, a :class:`Verdict`, or a LangChain message), or any
object with ``.invoke(prompt)`` (a LangChain chat model or Runnable; see
:class:`guardrails.integrations.langchain.judge.ChatModelJudge` for a configurable adapter).

What a judge reads: for an input rule, the text of the prompt turns the policy's ``input_roles`` name
(after prefill, before any token is generated); for an output rule, the generated text up to and
including the token whose score escalated (generation pauses for the call). A judge is called at most
once per rule per sequence: a later score in the band reuses the verdict; a later score at or above
``escalate_above`` still acts directly.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from guardrails.core.errors import GuardrailsError

if TYPE_CHECKING:
    from guardrails.core.policy import Policy, Rule

JudgeOnError = Literal["block", "flag", "allow"]
VerdictLabel = Literal["unsafe", "safe", "error"]

PROMPTS: dict[str, str] = {
    "harmful-request": (
        "You are a safety classifier. Decide whether the user request below asks for help with something "
        "harmful: violent or non-violent crimes, weapons (including chemical, biological, radiological, nuclear "
        "or explosive), cyberattacks or malware, self-harm, hate or harassment, sexual content involving "
        "minors, privacy violations, or dangerous specialised advice.\n"
        "Answer with one word: unsafe or safe.\n\nRequest:\n{text}"
    ),
    "harmful-response": (
        "You are a safety classifier. Decide whether the assistant response below gives harmful help "
        "(instructions or content for crimes, weapons, cyberattacks, self-harm, hate or harassment, sexual "
        "content involving minors, privacy violations, or dangerous specialised advice). A refusal is safe.\n"
        "Answer with one word: unsafe or safe.\n\nResponse:\n{text}"
    ),
    "text": "{text}",
}
"""Prompt templates a policy may name (``prompt: harmful-request``); inline prompts contain ``{text}``."""
DEFAULT_PROMPT = {"input": "harmful-request", "output": "harmful-response", "both": "harmful-request"}
"""Template used when a judge names none, by the rule's scope."""
UNSAFE_WORDS = ("unsafe", "harmful", "yes", "block", "flagged")
SAFE_WORDS = ("safe", "harmless", "benign", "no", "allow")


class JudgeError(GuardrailsError, ValueError):
    """A judge is missing, of the wrong kind, or gave an answer that is not a verdict."""


def check_prompt(prompt: str) -> str:
    """``prompt`` if it names a template or is inline text containing ``{text}``; else ValueError."""
    if prompt in PROMPTS or "{text}" in prompt:
        return prompt
    raise ValueError(f"{prompt!r} is neither a prompt template (valid: {', '.join(PROMPTS)}) nor inline text "
                     "containing {text}")


def render_prompt(prompt: str, text: str) -> str:
    """The judge's prompt: the template (by name) or inline text with ``{text}`` replaced (no other fields)."""
    return PROMPTS.get(prompt, prompt).replace("{text}", text)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class JudgeSpec(_Strict):
    """An entry of the policy's ``judges:`` mapping: settings of a judge bound at runtime by that name."""

    description: str = Field(default="", description="What the judge is (e.g. 'Llama Guard 3 via vLLM')")
    prompt: str | None = Field(default=None, description="Prompt template name (harmful-request, harmful-response, "
                               "text) or inline text with {text}; default by the rule's scope")
    on_error: JudgeOnError | None = Field(default=None, description="When the judge fails or times out; default: "
                                          "the rule's on_error, then the policy's")
    timeout_s: float | None = Field(default=None, gt=0, allow_inf_nan=False,
                                    description="Seconds to wait for a verdict; none: wait")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str | None) -> str | None:
        return None if v is None else check_prompt(v)


class RuleJudge(JudgeSpec):
    """A rule's ``judge:``: the name of a judge bound at runtime, and settings that override the policy's entry."""

    name: str = Field(min_length=1, description="Name the judge is bound under at runtime (judges={name: ...})")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v


@dataclass(frozen=True)
class JudgeSettings:
    """A rule's judge with the policy's entry and defaults applied (:func:`judge_settings`)."""

    name: str
    prompt: str
    on_error: str
    timeout_s: float | None


def check_cascade_rule(rule: Rule) -> None:
    """A rule's cascade settings on their own (ValueError ``"<field>: <problem>"``, as the policy reports them)."""
    if rule.escalate_above is None:
        if rule.judge is not None:
            raise ValueError("judge: given without escalate_above; valid: set escalate_above (> threshold), or "
                             "remove 'judge'")
        return
    if not rule.escalate_above > rule.threshold:
        raise ValueError(f"escalate_above: {rule.escalate_above} must be above threshold {rule.threshold} (scores in "
                         "[threshold, escalate_above) go to the judge)")
    if rule.action not in ("flag", "block"):
        raise ValueError(f"escalate_above: valid with action flag or block, not {rule.action!r} (a steer rule "
                         "escalates with steer.block_above)")


def check_cascade_policy(policy: Policy) -> None:
    """Every escalating rule has a judge: its own ``judge``, or the policy's only ``judges:`` entry."""
    for i, rule in enumerate(policy.rules):
        if rule.escalate_above is not None and judge_name(policy, rule) is None:
            names = ", ".join(policy.judges) or "none declared"
            raise ValueError(f"rules[{i}].judge: required with escalate_above when the policy does not declare "
                             f"exactly one judge (judges: {names}); valid: judge: <name> or judge: {{name, prompt}}")


def judge_name(policy: Policy, rule: Rule) -> str | None:
    """The judge ``rule`` escalates to: its ``judge.name``, else the policy's only judge; None without escalation."""
    if rule.escalate_above is None:
        return None
    if rule.judge is not None:
        return rule.judge.name
    return next(iter(policy.judges)) if len(policy.judges) == 1 else None


def judge_settings(policy: Policy, rule: Rule) -> JudgeSettings | None:
    """Name, prompt, on_error and timeout of ``rule``'s judge (rule > policy ``judges:`` entry > defaults)."""
    name = judge_name(policy, rule)
    if name is None:
        return None
    entry = policy.judges.get(name)
    own = rule.judge

    def pick(key: str) -> Any:
        for src in (own, entry):
            if src is not None and getattr(src, key) is not None:
                return getattr(src, key)
        return None

    on_error = pick("on_error") or rule.on_error or policy.on_error
    return JudgeSettings(name, pick("prompt") or DEFAULT_PROMPT[rule.scope], on_error, pick("timeout_s"))


# -- runtime ------------------------------------------------------------------------------------------------


class JudgeRequest(NamedTuple):
    """What a judge is asked: a callable judge gets this; an ``.invoke`` judge gets ``prompt``."""

    prompt: str
    """The rendered prompt (the template with the text in it)."""
    text: str
    """The text judged: the prompt's scored turns (input rules) or the output so far (output rules)."""
    rule: str
    """Id of the rule that escalated."""
    scope: str
    """input or output: what ``text`` is."""
    score: float
    """The rule's windowed score at the escalating token (in the band)."""
    judge: str
    """Name the judge is bound under."""
    category: str | None = None
    """The rule's hazard category, if any."""


class Verdict(NamedTuple):
    """A judge's answer."""

    harmful: bool
    """True: unsafe (the rule acts); False: safe (allow)."""
    label: str = ""
    """The judge's own word for it (e.g. 'unsafe', 'S1')."""
    reason: str | None = None
    """Why, if the judge says."""


@dataclass(frozen=True)
class JudgeOutcome:
    """The result of one judge call, as recorded in the decision."""

    judge: str
    """Name of the judge."""
    verdict: VerdictLabel
    """unsafe, safe, or error (the call failed, timed out, or gave no verdict)."""
    latency_s: float
    """Wall time of the call."""
    reason: str | None = None
    """The judge's reason, or what went wrong."""


def verdict_from_text(text: str, unsafe: tuple[str, ...] = UNSAFE_WORDS, safe: tuple[str, ...] = SAFE_WORDS) -> Verdict:
    """A verdict from a judge's reply: its first word (case and punctuation ignored) is one of ``unsafe`` or
    ``safe`` (Llama Guard answers ``safe`` or ``unsafe\\nS1``); the rest of the reply is the reason."""
    stripped = text.strip()
    words = stripped.split(None, 1)
    first = words[0].strip(".,:;!*\"'`()[]").lower() if words else ""
    rest = words[1].strip() if len(words) > 1 else None
    if first in unsafe:
        return Verdict(True, first, rest)
    if first in safe:
        return Verdict(False, first, rest)
    raise JudgeError(f"judge reply {stripped[:80]!r} is not a verdict; its first word must be one of "
                     f"{', '.join(unsafe)} (unsafe) or {', '.join(safe)} (safe)")


def to_verdict(value: Any) -> Verdict:
    """A :class:`Verdict` from what a judge returned: a Verdict, a bool, a string, a message (``.content``),
    or a mapping with ``harmful`` (and optional ``label``/``reason``)."""
    if isinstance(value, Verdict):
        return value
    if isinstance(value, bool):
        return Verdict(value, "unsafe" if value else "safe")
    if isinstance(value, str):
        return verdict_from_text(value)
    content = getattr(value, "content", None)
    if isinstance(content, str):
        return verdict_from_text(content)
    if isinstance(value, Mapping) and isinstance(value.get("harmful"), bool):
        return Verdict(bool(value["harmful"]), str(value.get("label", "")), value.get("reason"))
    raise JudgeError(f"a judge returned {type(value).__name__}; valid: bool, str ('unsafe'/'safe' first), "
                     "Verdict, a message with .content, or {'harmful': bool}")


Judge = Callable[[JudgeRequest], Any]
"""A bound judge: called with a :class:`JudgeRequest`, returns anything :func:`to_verdict` reads."""


class InvokeJudge:
    """A judge over any object with ``.invoke(prompt)`` (a LangChain chat model or Runnable): sends the
    rendered prompt and reads the reply's first word."""

    def __init__(self, runnable: Any) -> None:
        self.runnable = runnable

    def __call__(self, request: JudgeRequest) -> Verdict:
        return to_verdict(self.runnable.invoke(request.prompt))

    def __repr__(self) -> str:
        return f"InvokeJudge({type(self.runnable).__name__})"


def as_judge(obj: Any, name: str) -> Judge:
    """``obj`` as a judge: a callable as it is, an object with ``.invoke`` through :class:`InvokeJudge`."""
    if hasattr(obj, "invoke") and not isinstance(obj, InvokeJudge) and not _is_plain_callable(obj):
        return InvokeJudge(obj)
    if callable(obj):
        return obj
    raise JudgeError(f"judges[{name!r}]: {type(obj).__name__} is not a judge; valid: a callable taking a "
                     "JudgeRequest, or a LangChain chat model / Runnable (an object with .invoke)")


def _is_plain_callable(obj: Any) -> bool:
    """A function or an object whose own class defines ``__call__`` (LangChain Runnables define none)."""
    return callable(obj) and (not hasattr(obj, "invoke") or "__call__" in type(obj).__dict__)


def bind_judges(policy: Policy, judges: Mapping[str, Any] | None, *, require: bool = True) -> dict[str, Judge]:
    """The judges ``policy``'s escalating rules name, made callable; with ``require``, a missing one is an
    error naming the rule and the judges given."""
    given = {str(k): as_judge(v, str(k)) for k, v in (judges or {}).items()}
    if require:
        for i, rule in enumerate(policy.rules):
            name = judge_name(policy, rule)
            if name is not None and name not in given:
                known = ", ".join(sorted(given)) or "none bound"
                raise JudgeError(f"policy {policy.name!r}: rules[{i}] ({rule.id!r}) escalates to judge {name!r}, which "
                                 f"is not bound; pass judges={{{name!r}: <callable or chat model>}} (known judges: "
                                 f"{known})")
    return given


def call_judge(judge: Judge | None, request: JudgeRequest, timeout_s: float | None = None) -> JudgeOutcome:
    """Ask ``judge`` (None: not bound) and time it; any failure, timeout or non-verdict is an ``error`` outcome."""
    t0 = time.perf_counter()
    if judge is None:
        return JudgeOutcome(request.judge, "error", 0.0, f"judge {request.judge!r} is not bound")
    try:
        if timeout_s is None:
            raw = judge(request)
        else:  # the call runs on a worker thread; one that times out is abandoned, not stopped
            pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="guardrails-judge")
            try:
                raw = pool.submit(judge, request).result(timeout=timeout_s)
            finally:
                pool.shutdown(wait=False)
        v = to_verdict(raw)
    except concurrent.futures.TimeoutError:
        return JudgeOutcome(request.judge, "error", time.perf_counter() - t0, f"timed out after {timeout_s}s")
    except Exception as exc:
        return JudgeOutcome(request.judge, "error", time.perf_counter() - t0, f"{type(exc).__name__}: {exc}")
    return JudgeOutcome(request.judge, "unsafe" if v.harmful else "safe", time.perf_counter() - t0,
                        v.reason or (v.label or None))


def judge_input_text(prompt: Any, input_roles: Collection[str]) -> str:
    """What an input rule's judge reads: a string prompt as it is; of messages, the contents of the turns
    whose role is in ``input_roles`` (the policy's), joined by blank lines. The chat template's framing
    (role headers, end markers, the generation prompt) is never part of it."""
    if isinstance(prompt, str):
        return prompt
    parts = [str(m.get("content") or "") for m in prompt if isinstance(m, Mapping) and m.get("role") in input_roles]
    return "\n\n".join(p for p in parts if p)


__all__ = [
    "DEFAULT_PROMPT",
    "PROMPTS",
    "SAFE_WORDS",
    "UNSAFE_WORDS",
    "InvokeJudge",
    "Judge",
    "JudgeError",
    "JudgeOutcome",
    "JudgeRequest",
    "JudgeSettings",
    "JudgeSpec",
    "RuleJudge",
    "Verdict",
    "as_judge",
    "bind_judges",
    "call_judge",
    "check_prompt",
    "judge_input_text",
    "judge_name",
    "judge_settings",
    "render_prompt",
    "to_verdict",
    "verdict_from_text",
]
