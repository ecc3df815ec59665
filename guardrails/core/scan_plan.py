"""Scans of normalized text (:mod:`guardrails.core.normalize`): each item normalized and every decoded segment added
as an extra text, all scored in one batch (:func:`plan_scan`), then each decoded text's decisions merged back into the
item it came from (:func:`merge_scan`). The HF, ONNX and prescan paths share it. Torch-free."""

from __future__ import annotations

from typing import Any, NamedTuple

from guardrails.core.normalize import Normalized, NormalizeSpec, normalize


class ScanPlan(NamedTuple):
    """Texts to score for a scan of ``n`` items: the items normalized, then one extra per decoded segment."""

    items: list[Any]
    """Normalized items (strings or message lists), then the decoded texts (strings)."""
    responses: list[str | None]
    """Responses of the items (normalized), None for the extras."""
    n: int
    """Number of original items (the first ``n`` of ``items``)."""
    origin: list[int]
    """For each extra, the index of the item it was decoded from."""
    encodings: list[str]
    """For each extra, the encoding it was decoded from."""
    info: list[dict[str, Any] | None]
    """Per original item, what normalisation did (``Normalized.to_dict()``; None when nothing changed)."""


def _norm_item(item: Any, spec: NormalizeSpec) -> tuple[Any, list[Normalized]]:
    if isinstance(item, str):
        n = normalize(item, spec)
        if not n.text.strip():  # only invisible characters: score the text as given
            return item, [n._replace(text=item)]
        return n.text, [n]
    if isinstance(item, list | tuple) and all(isinstance(m, dict) for m in item):
        out, parts = [], []
        for m in item:
            content = m.get("content")
            if isinstance(content, str):
                n = normalize(content, spec)
                parts.append(n)
                m = {**m, "content": n.text if n.text.strip() else content}
            out.append(m)
        return out, parts
    return item, []  # not a prompt: the scorer reports it


def plan_scan(items: list[Any], responses: list[str | None], spec: NormalizeSpec | None) -> ScanPlan:
    """Normalize each item (every message's content) and response; add each decoded segment as a text."""
    if spec is None or not spec.enabled:
        return ScanPlan(list(items), list(responses), len(items), [], [], [None] * len(items))
    out_items: list[Any] = []
    out_resp: list[str | None] = []
    extras: list[str] = []
    origin: list[int] = []
    encodings: list[str] = []
    info: list[dict[str, Any] | None] = []
    for i, (item, resp) in enumerate(zip(items, responses, strict=True)):
        new, parts = _norm_item(item, spec)
        steps = sorted({s for p in parts for s in p.steps})
        decoded = [d for p in parts for d in p.decoded]
        if resp:
            r = normalize(resp, spec.model_copy(update={"decode": []}))
            resp = r.text
            steps = sorted(set(steps) | {f"response:{s}" for s in r.steps})
        out_items.append(new)
        out_resp.append(resp)
        for d in decoded:
            extras.append(d.text)
            origin.append(i)
            encodings.append(d.encoding)
        info.append(Normalized("", tuple(steps), tuple(decoded)).to_dict() if steps or decoded else None)
    return ScanPlan(out_items + extras, out_resp + [None] * len(extras), len(items), origin, encodings, info)


def merge_scan(plan: ScanPlan, scores: list[Any]) -> list[Any]:
    """The first ``n`` scores, each with the decisions of the texts decoded from it added (``reason`` says
    which decoding) and its ``normalization`` set. ``scores``: ``TextScore``-like objects, plan order."""
    out = list(scores[: plan.n])
    for k, i in enumerate(plan.origin):
        extra = scores[plan.n + k]
        info = plan.info[i] or {}
        encoding = plan.encodings[k]
        for d in extra.decisions:  # positions are the decoded text's: -1 marks "not a token of this text"
            out[i].decisions.append(type(d)(**{**d.__dict__, "sequence": i, "position": -1, "output_index": None,
                                               "reason": f"in {encoding} text decoded from the input"}))
        for rid, v in extra.scores.items():
            if v == v:  # not NaN: the decoded text's best score is kept next to the plain one
                info.setdefault("scores", []).append({"rule": rid, "score": float(v), "encoding": encoding})
        out[i].errors.extend(e for e in extra.errors if e not in out[i].errors)
    for i, ts in enumerate(out):
        if plan.info[i] is not None:
            ts.normalization = plan.info[i]
    return out


__all__ = ["ScanPlan", "merge_scan", "plan_scan"]
