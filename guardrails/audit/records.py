"""Audit record bodies: what a guarded generation or a scan is recorded as, and its canonical text.

A record body is one JSON object; its canonical text (sorted keys, no spaces, UTF-8, no NaN) is what
the hash chain covers (:mod:`guardrails.audit.chain`). Everything else the store keeps in a row (time,
kind, policy, action, the actions and rules of its decisions) is derived from this body
(:func:`guardrails.audit.schema.derived_columns`), so the body is the one source of truth.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from guardrails.core.cascade import judge_name
from guardrails.core.outcomes import acted, flags
from guardrails.core.tokentext import token_pieces

ACTIONS = ("block", "steer", "flag", "error", "allow")
"""Values of a record's ``action`` (the strongest of its decisions; ``allow`` when none fired)."""


# -- canonical form and hashing ------------------------------------------------------------------------------


def _clean(obj: Any) -> Any:
    """JSON-safe copy: non-finite floats become None, tuples lists, keys strings."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, str):
        return _SURROGATE.sub("\ufffd", obj)  # a lone surrogate cannot be stored as UTF-8
    if obj is None or isinstance(obj, int | bool):
        return obj
    return str(obj)


def canonical_json(obj: Any) -> str:
    """The text that is hashed: sorted keys, no whitespace, UTF-8, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


_SURROGATE = re.compile("[\ud800-\udfff]")
_JSON_UNSAFE = re.compile("[\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ufeff\ufff9-\ufffb\ud800-\udfff]")


def json_line(obj: Any, **kwargs: Any) -> str:
    """JSON text safe to print to a terminal or write as UTF-8: DEL, C1 controls, bidi controls and lone
    surrogates escaped as ``\\uXXXX`` (``json`` already escapes C0). Loads back to the same value."""
    kwargs.setdefault("ensure_ascii", False)
    return _JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group(0)):04x}", json.dumps(obj, **kwargs))


def chain_hash(prev_hash: str, body: str) -> str:
    return hashlib.sha256((prev_hash + body).encode("utf-8")).hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def utc_now() -> str:
    return format_time(datetime.now(UTC))


def format_time(t: datetime) -> str:
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_RELATIVE = re.compile(r"^(\d{1,30})\s*([smhdw])$")
SINCE_FORMS = "YYYY-MM-DD, YYYY-MM-DDTHH:MM[:SS][+00:00], or a duration like 30m, 12h, 7d, 2w"


def parse_since(value: str | datetime, now: datetime | None = None) -> str:
    """A stored-time string from a date, datetime (naive means UTC) or duration back from now."""
    if isinstance(value, datetime):
        return format_time(value)
    text = value.strip()
    m = _RELATIVE.match(text)
    if m:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}[m.group(2)]
        try:
            return format_time((now or datetime.now(UTC)) - timedelta(**{unit: int(m.group(1))}))
        except (OverflowError, ValueError):
            raise ValueError(f"invalid --since {value!r}: reaches back before the year 1; valid: {SINCE_FORMS}"
                             ) from None
    try:
        return format_time(datetime.fromisoformat(text.replace("Z", "+00:00")))
    except (ValueError, OverflowError):
        raise ValueError(f"invalid --since {value!r}; valid: {SINCE_FORMS}") from None


# -- building records -----------------------------------------------------------------------------------------


def _display_tokens(tokens: list[str], tokenizer: Any) -> list[str]:
    """Readable text of each token (byte-level BPE markers decoded; a character split over several tokens shown
    whole on the first of them, ``token_pieces``)."""

    def text(group: Sequence[str]) -> str:
        if tokenizer is not None and None not in group:
            try:
                return str(tokenizer.convert_tokens_to_string(list(group)))
            except Exception:
                pass
        return "".join(str(t).replace("Ġ", " ").replace("Ċ", "\n").replace("▁", " ") for t in group)

    return token_pieces(tokens, text)


def _summary_action(blocked: bool, steered: bool, decisions: list[dict[str, Any]]) -> str:
    acts = {"error" if d.get("action") == "error" else acted(d.get("action"), d.get("resolution")) for d in decisions}
    if blocked:
        return "block"
    if steered or "steer" in acts:
        return "steer"
    if "flag" in acts:
        return "flag"
    if "error" in acts:
        return "error"
    return "allow"


def _guard_meta(guard: Any) -> dict[str, Any]:
    policy = guard.policy
    cfg = getattr(getattr(guard, "model", None), "config", None)
    model = getattr(cfg, "name_or_path", None) or getattr(cfg, "_name_or_path", None) or type(
        getattr(guard, "model", None)).__name__
    saes = {}
    loaded = getattr(guard, "saes", None) or {}
    configs = getattr(guard, "sae_configs", None) or {sid: getattr(s, "cfg", None) for sid, s in loaded.items()}
    for sid, c in configs.items():
        sae = loaded.get(sid, c)  # watched mode keeps only the configs of SAEs it dropped
        spec = policy.saes.get(sid)
        saes[sid] = {
            "repr": repr(sae),
            "path": spec.path if spec else None,
            "layer": spec.layer if spec else getattr(c, "layer", None),
            "architecture": getattr(c, "architecture", None),
            "d_model": getattr(c, "d_model", None),
            "d_sae": getattr(c, "d_sae", None),
            "k": getattr(c, "k", None),
            "trained_on": getattr(c, "model", None),
        }
    rules = {
        r.id: {"threshold": r.threshold, "action": r.action, "scope": r.scope, "description": r.description,
               **({"escalate_above": r.escalate_above, "judge": judge_name(policy, r)}  # the cascade's band
                  if getattr(r, "escalate_above", None) is not None else {})}
        for r in policy.rules
    }
    return {
        "policy": {"name": policy.name, "version": policy.version, "digest": policy.digest},
        "model": str(model),
        "saes": saes,
        "rules": rules,
        "redacted": bool(policy.redact),
    }


def _trace(
    tokens: list[str], token_scores: Mapping[str, Mapping[int, float]], prompt_length: int, redact: bool,
    tokenizer: Any, token_features: Mapping[int, Any] | None, roles: list[str | None] | None = None,
) -> dict[str, Any]:
    n = len(tokens)
    for per_pos in token_scores.values():
        if per_pos:
            n = max(n, max(int(p) for p in per_pos) + 1)
    scores: dict[str, list[float | None]] = {}
    for rule, per_pos in token_scores.items():
        row: list[float | None] = [None] * n
        for p, s in per_pos.items():
            if 0 <= int(p) < n and math.isfinite(float(s)):
                row[int(p)] = round(float(s), 6)
        scores[rule] = row
    features = {str(int(p)): [[int(i), round(float(a), 4)] for i, a in fs] for p, fs in (token_features or {}).items()}
    return {
        "n_tokens": n,
        "prompt_length": prompt_length,
        "tokens": None if redact else _display_tokens(list(tokens), tokenizer),
        "scores": scores,
        "features": features,
        **({"roles": list(roles)} if roles else {}),
    }


def _decisions(decisions: Iterable[Any], redact: bool, tokenizer: Any) -> list[dict[str, Any]]:
    out = []
    for d in decisions:
        dd = d.to_dict() if hasattr(d, "to_dict") else dict(d)
        if redact:
            dd["token"] = None
        elif dd.get("token") is not None:
            dd["token"] = _display_tokens([str(dd["token"])], tokenizer)[0]
        out.append(dd)
    return out


def _text_field(text: str | None, redact: bool) -> dict[str, Any]:
    if text is None:
        return {"text": None, "sha256": None}
    return {"text": None if redact else text, "sha256": sha256_text(text)}


def _normalization(info: Mapping[str, Any] | None, redact: bool) -> dict[str, Any]:
    """``{"normalization": ...}`` when normalisation found something; decoded texts dropped when redacting."""
    if not info:
        return {}
    out = dict(info)
    if redact:
        out["decoded"] = [{**d, "text": None} for d in out.get("decoded") or []]
    return {"normalization": out}


def build_generation_record(result: Any, guard: Any) -> dict[str, Any]:
    """The body of a record for a :class:`~guardrails.serving.generation.GenerationResult` (id and time added later)."""
    meta = _guard_meta(guard)
    redact = meta["redacted"]
    decisions = _decisions(result.decisions, redact, getattr(guard, "tokenizer", None))
    return {
        "kind": "generation",
        **meta,
        "input": _text_field(result.prompt, redact),
        "output": {**_text_field(result.text, redact),
                   "released": _text_field(result.released_text, redact)},
        "blocked": bool(result.blocked),
        "steered": bool(result.steered),
        "flagged": any(flags(d.get("action"), d.get("resolution")) for d in decisions),
        "action": _summary_action(bool(result.blocked), bool(result.steered), decisions),
        "decisions": decisions,
        "errors": list(getattr(result, "errors", []) or []),
        **_normalization(getattr(result, "normalization", None), redact),
        **({"stream_stopped": True} if getattr(result, "stream_stopped", False) else {}),
        "trace": _trace(result.tokens, result.token_scores, int(result.prompt_length), redact,
                        getattr(guard, "tokenizer", None), getattr(result, "token_features", None),
                        getattr(result, "roles", None)),
    }


def build_scan_record(text_score: Any, guard: Any, text: str, kind: str) -> dict[str, Any]:
    """The body of a record for a text scan (:class:`~guardrails.serving.generation.TextScore`)."""
    meta = _guard_meta(guard)
    redact = meta["redacted"]
    decisions = _decisions(text_score.decisions, redact, getattr(guard, "tokenizer", None))
    blocked = bool(text_score.blocked)
    prompt_length = len(text_score.tokens)  # a scan has no generated tokens: the report shows one text
    return {
        "kind": f"scan:{kind}",
        **meta,
        "input": _text_field(text, redact),
        "output": {"text": None, "sha256": None, "released": {"text": None, "sha256": None}},
        "blocked": blocked,
        "steered": False,
        "flagged": any(flags(d.get("action"), d.get("resolution")) for d in decisions),
        "action": _summary_action(blocked, False, decisions),
        "decisions": decisions,
        "errors": [],
        "scores": dict(text_score.scores),
        **_normalization(getattr(text_score, "normalization", None), redact),
        "trace": _trace(text_score.tokens, text_score.token_scores, prompt_length, redact,
                        getattr(guard, "tokenizer", None), getattr(text_score, "token_features", None),
                        getattr(text_score, "roles", None)),
    }
