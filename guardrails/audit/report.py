"""Self-contained HTML reports of audit records: a token heat map per record (the summary page of many records:
:mod:`guardrails.audit.summary`).

Pages load nothing from the network: styles and the small script are inline, charts are inline SVG.
Every piece of recorded text is escaped (prompts may contain ``<script>``); data for the script is
embedded as JSON with ``<`` escaped and read with ``textContent``, never ``innerHTML``.

Colours: for the selected rule, a token's score ``s`` with threshold ``t`` and floor ``lo`` (the
smaller of 0 and the rule's lowest score in the record) is shaded amber with opacity
``0.08 + 0.55 * clamp((s - lo) / (t - lo), 0, 1)``; a token with ``s >= t`` is red (class ``over``).
Tokens where a decision was taken carry the class ``decision`` (and ``decision-<action>``), an
outline and a title naming the rule, score and threshold.
"""

from __future__ import annotations

import html
import json
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from guardrails.audit.store import ACTIONS, AuditRecord
from guardrails.core.outcomes import blocks

ACTION_COLORS = {"block": "#dc2626", "steer": "#7c3aed", "flag": "#d97706", "error": "#6b7280", "allow": "#16a34a"}
OVER_COLOR = "rgba(220, 38, 38, 0.78)"

_CSS = """
:root { --fg: #1f2937; --muted: #6b7280; --line: #e5e7eb; }
* { box-sizing: border-box; }
body { font: 14px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
       margin: 0 auto; max-width: 1100px; padding: 24px; background: #fafafa; }
h1 { font-size: 22px; margin: 0 0 12px; } h2 { font-size: 16px; margin: 20px 0 8px; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 14px 18px; margin: 12px 0; }
dl.meta { display: grid; grid-template-columns: 150px 1fr; gap: 4px 12px; margin: 0; }
dl.meta dt { color: var(--muted); } dl.meta dd { margin: 0; overflow-wrap: anywhere; }
code, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12.5px; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; color: #fff; font-size: 12px;
         font-weight: 600; text-transform: uppercase; letter-spacing: .03em; }
.tokens { white-space: pre-wrap; font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
          font-size: 13.5px; line-height: 2.0; word-break: break-word; }
.tok { border-radius: 3px; padding: 1px 0; cursor: pointer; }
.tok:hover { outline: 1px solid #111827; }
.tok.over { color: #fff; }
.tok.decision { outline: 2px solid #111827; outline-offset: 1px; font-weight: 700; }
.tok.decision-block { outline-color: #991b1b; } .tok.decision-steer { outline-color: #5b21b6; }
.tok.withheld { text-decoration: line-through; }
.tok.selected { box-shadow: 0 0 0 3px #2563eb; }
.tok.redacted { color: #9ca3af; }
.tok.joined { display: inline-block; min-width: 4px; min-height: 1em; vertical-align: text-bottom; }
.legend { display: flex; align-items: center; gap: 10px; flex-wrap: wrap; color: var(--muted); }
.legend .bar { width: 220px; height: 12px; border-radius: 3px;
               background: linear-gradient(90deg, rgba(245,158,11,.08), rgba(245,158,11,.63)); }
.legend .over { width: 40px; height: 12px; border-radius: 3px; background: rgba(220, 38, 38, 0.78); }
table { border-collapse: collapse; width: 100%; } th, td { text-align: left; padding: 4px 8px;
        border-bottom: 1px solid var(--line); vertical-align: top; }
th { color: var(--muted); font-weight: 600; } td.time { white-space: nowrap; }
#detail { position: sticky; bottom: 0; background: #f8fafc; border: 1px solid #cbd5e1; }
#detail .empty { color: var(--muted); }
.note { color: var(--muted); font-size: 12.5px; }
svg text { font: 11px system-ui, sans-serif; fill: #374151; }
"""

_SCRIPT = """
(function () {
  var meta = JSON.parse(document.getElementById('report-data').textContent);
  var toks = document.querySelectorAll('.tok');
  var sel = document.getElementById('rule-select');
  function shade(s, r) {
    if (s === null || s === undefined) return '';
    if (s >= r.threshold) return 'OVER';
    var span = r.threshold - r.lo, x = span > 0 ? (s - r.lo) / span : 0;
    x = Math.max(0, Math.min(1, x));
    return 'rgba(245, 158, 11, ' + (0.08 + 0.55 * x).toFixed(3) + ')';
  }
  function paint(rule) {
    var r = meta.rules[rule]; if (!r) return;
    toks.forEach(function (t) {
      var s = JSON.parse(t.getAttribute('data-scores'))[rule];
      var c = shade(s, r);
      t.classList.toggle('over', c === 'OVER');
      t.style.background = c === 'OVER' ? meta.over_color : c;
    });
    document.getElementById('legend-threshold').textContent = String(r.threshold);
    document.getElementById('legend-lo').textContent = String(r.lo);
    document.getElementById('legend-rule').textContent = rule;
  }
  function cell(row, text, tag) {
    var c = document.createElement(tag || 'td'); c.textContent = text; row.appendChild(c); return c;
  }
  function show(t) {
    document.querySelectorAll('.tok.selected').forEach(function (x) { x.classList.remove('selected'); });
    t.classList.add('selected');
    var d = document.getElementById('detail'); d.textContent = '';
    var h = document.createElement('div');
    h.textContent = 'token ' + t.getAttribute('data-pos') + ': ' + JSON.stringify(t.getAttribute('data-text'))
      + (t.getAttribute('data-decision') ? '  \u2014  ' + t.getAttribute('data-decision') : '');
    h.className = 'mono'; d.appendChild(h);
    var scores = JSON.parse(t.getAttribute('data-scores')), tb = document.createElement('table');
    var hr = document.createElement('tr'); cell(hr, 'rule', 'th'); cell(hr, 'score', 'th');
    cell(hr, 'threshold', 'th'); tb.appendChild(hr);
    Object.keys(meta.rules).forEach(function (k) {
      var tr = document.createElement('tr'); cell(tr, k);
      cell(tr, scores[k] === undefined || scores[k] === null ? '\u2013' : String(scores[k]));
      cell(tr, String(meta.rules[k].threshold)); tb.appendChild(tr);
    });
    d.appendChild(tb);
    var feats = JSON.parse(t.getAttribute('data-features') || '[]'), p = document.createElement('div');
    p.className = 'features';
    p.textContent = feats.length ? 'top SAE features: ' + feats.map(function (f) {
      return '#' + f[0] + ' = ' + f[1]; }).join(', ') : 'no SAE features recorded at this token';
    d.appendChild(p);
  }
  document.addEventListener('click', function (e) {
    var t = e.target.closest ? e.target.closest('.tok') : null; if (t) show(t);
  });
  if (sel) sel.addEventListener('change', function () { paint(sel.value); });
  var first = document.querySelector('.tok.decision-block') || document.querySelector('.tok.decision');
  if (first) show(first);
  document.body.setAttribute('data-ready', '1');
})();
"""


def _e(x: Any) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def _json_attr(obj: Any) -> str:
    return _e(json.dumps(obj, ensure_ascii=False, separators=(",", ":")))


def _json_script(obj: Any) -> str:
    """JSON safe to embed inside <script type=application/json> (no '</script>' can appear)."""
    return json.dumps(obj, ensure_ascii=False).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return "–" if x is None else str(x)


def _data(record: AuditRecord | Mapping[str, Any]) -> dict[str, Any]:
    return record.to_dict() if isinstance(record, AuditRecord) else dict(record)


def _page(title: str, body: str, script: str = "") -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; "
        "script-src 'unsafe-inline'; img-src data:\">"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>{body}"
        + (f"<script>{script}</script>" if script else "")
        + "</body></html>\n"
    )


def _badge(action: str) -> str:
    color = ACTION_COLORS.get(action, "#374151")
    return f'<span class="badge" style="background:{color}">{_e(action)}</span>'


def rule_floor(scores: list[float | None]) -> float:
    """The low end of a rule's colour scale: min(0, lowest score)."""
    vals = [s for s in scores if s is not None]
    return min([0.0, *vals])


def shade(score: float | None, threshold: float, lo: float) -> str | None:
    """Background of a token (see the module docstring); None for unscored tokens."""
    if score is None:
        return None
    if score >= threshold:
        return OVER_COLOR
    span = threshold - lo
    x = (score - lo) / span if span > 0 else 0.0
    x = max(0.0, min(1.0, x))
    return f"rgba(245, 158, 11, {0.08 + 0.55 * x:.3f})"


# -- one record ----------------------------------------------------------------------------------------------


def render_record(record: AuditRecord | Mapping[str, Any]) -> str:
    """One self-contained HTML page for an audit record (``AuditRecord`` or its ``to_dict()``)."""
    d = _data(record)
    trace = d.get("trace") or {}
    n = int(trace.get("n_tokens") or 0)
    prompt_len = int(trace.get("prompt_length") or 0)
    tokens: list[str] | None = trace.get("tokens")
    redacted = tokens is None
    scores: dict[str, list[float | None]] = trace.get("scores") or {}
    rules_meta: dict[str, Any] = d.get("rules") or {}
    decisions: list[dict[str, Any]] = d.get("decisions") or []

    rule_ids = list(rules_meta) or list(scores)
    for rid in scores:
        if rid not in rule_ids:
            rule_ids.append(rid)
    rules_js = {}
    for rid in rule_ids:
        thr = rules_meta.get(rid, {}).get("threshold")
        if thr is None:
            thr = next((x.get("threshold") for x in decisions if x.get("rule") == rid), 1.0)
        rules_js[rid] = {"threshold": float(thr), "lo": rule_floor(scores.get(rid, []))}
    rank = {a: i for i, a in enumerate(ACTIONS)}  # strongest decision first: block, steer, flag, error
    fired = sorted((x for x in decisions if x.get("rule") in rules_js), key=lambda x: rank.get(str(x.get("action")), 9))
    current = fired[0]["rule"] if fired else (rule_ids[0] if rule_ids else None)

    features: dict[int, list[list[float]]] = {int(k): v for k, v in (trace.get("features") or {}).items()}
    by_pos: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for x in decisions:
        pos = x.get("position")
        if isinstance(pos, int):
            by_pos[pos].append(x)
            if x.get("top_features") and pos not in features:
                features[pos] = x["top_features"]

    blocked_at = next((x.get("position") for x in decisions if blocks(x.get("action"), x.get("resolution"))), None)
    spans: list[str] = []
    for pos in range(n):
        text = "▪" if tokens is None else str(tokens[pos]) if pos < len(tokens) else ""
        tok_scores = {rid: scores[rid][pos] for rid in scores if pos < len(scores[rid])}
        classes = ["tok"]
        style = ""
        if current is not None:
            bg = shade(tok_scores.get(current), rules_js[current]["threshold"], rules_js[current]["lo"])
            if bg == OVER_COLOR:
                classes.append("over")
            if bg:
                style = f' style="background:{bg}"'
        roles = trace.get("roles") or []
        turn = f" ({roles[pos]} turn)" if pos < len(roles) and roles[pos] else ""
        title = [f"token {pos}{turn}"] + [f"{rid}: {_fmt(s)} (threshold {_fmt(rules_js.get(rid, {}).get('threshold'))})"
                                    for rid, s in tok_scores.items() if s is not None]
        dec_text = ""
        if pos in by_pos:
            acts = sorted({str(x.get("action")) for x in by_pos[pos]})
            classes += ["decision"] + [f"decision-{a}" for a in acts]
            dec_text = "; ".join(f"{x.get('action')} by rule {x.get('rule')}: score {_fmt(x.get('score'))} "
                                 f">= threshold {_fmt(x.get('threshold'))}"
                                 + (f" (judge {x.get('judge')}: {x.get('verdict')})" if x.get("escalated") else "")
                                 for x in by_pos[pos])
            title.append(dec_text)
        if pos in features:
            title.append("top features: " + ", ".join(f"#{int(f[0])}={_fmt(float(f[1]))}" for f in features[pos][:8]))
        if blocked_at is not None and pos == blocked_at and pos >= prompt_len:
            classes.append("withheld")
            title.append("withheld from the caller")
        if redacted:
            classes.append("redacted")
        if tokens is not None and not text:  # a later byte of a character shown whole on its first token
            classes.append("joined")
            title.append("a later piece of the character shown on the token before")
        attrs = (f' id="t{pos}" class="{" ".join(classes)}" data-pos="{pos}" data-text="{_e(text)}"'
                 f' data-scores="{_json_attr(tok_scores)}" data-features="{_json_attr(features.get(pos, []))}"'
                 f' title="{_e(chr(10).join(title))}"')
        if dec_text:
            attrs += f' data-decision="{_e(dec_text)}"'
        spans.append(f"<span{attrs}{style}>{_e(text)}</span>")

    parts = [_header(d)]
    parts.append(_legend(current, rules_js, redacted))
    kind = str(d.get("kind", "generation"))
    text_html = '<section class="card"><h2>Text</h2>'
    if redacted:
        text_html += ('<p class="note">This policy redacts text: the record keeps only sha256 hashes, so tokens '
                      "are shown as ▪ with their scores.</p>")
    if kind == "generation":
        text_html += (f'<h2>Prompt</h2><div class="tokens prompt">{"".join(spans[:prompt_len])}</div>'
                      f'<h2>Output</h2><div class="tokens output">{"".join(spans[prompt_len:])}</div>')
        if not redacted and d.get("blocked"):
            text_html += (f'<p class="note">Blocked: the caller received the refusal '
                          f'<q>{_e((d.get("output") or {}).get("text"))}</q>.</p>')
    else:
        text_html += f'<div class="tokens scanned">{"".join(spans)}</div>'
    text_html += "</section>"
    parts.append(text_html)
    parts.append('<section id="detail" class="card"><span class="empty">Click a token to see its rule scores '
                 "and top SAE features (hover shows them too).</span></section>")
    parts.append(_decision_table(decisions))
    if d.get("errors"):
        parts.append('<section class="card"><h2>Scoring errors</h2><ul>'
                     + "".join(f"<li>{_e(x)}</li>" for x in d["errors"]) + "</ul></section>")
    parts.append(f'<script type="application/json" id="report-data">'
                 f'{_json_script({"rules": rules_js, "over_color": OVER_COLOR})}</script>')
    parts.append('<p class="note">Generated by sae-guardrails. This page is self-contained and loads nothing.</p>')
    return _page(f"Audit record {d.get('id', '')}", "".join(parts), _SCRIPT)


def _header(d: dict[str, Any]) -> str:
    pol = d.get("policy") or {}
    saes = d.get("saes") or {}
    sae_txt = "<br>".join(f"<b>{_e(k)}</b>: <code>{_e(v.get('repr'))}</code> from <code>{_e(v.get('path'))}</code>"
                          for k, v in saes.items()) or "–"
    inp, out = d.get("input") or {}, d.get("output") or {}
    rows = [
        ("Time (UTC)", _e(d.get("time"))),
        ("Policy", f"{_e(pol.get('name'))} v{_e(pol.get('version'))} <code title=\"{_e(pol.get('digest'))}\">"
                   f"sha256 {_e(str(pol.get('digest', ''))[:16])}…</code>"),
        ("Model", f"<code>{_e(d.get('model'))}</code>"),
        ("SAE", sae_txt),
        ("Kind", _e(d.get("kind"))),
        ("Outcome", " ".join(x for x, on in (("blocked", d.get("blocked")), ("steered", d.get("steered")),
                                             ("flagged", d.get("flagged"))) if on) or "allowed"),
        ("Input sha256", f"<code>{_e(inp.get('sha256'))}</code>"),
        ("Output sha256", f"<code>{_e(out.get('sha256'))}</code>"),
        ("Record hash", f"<code class=\"record-hash\">{_e(d.get('hash'))}</code>"),
        ("Previous hash", f"<code>{_e(d.get('prev_hash'))}</code>"),
    ]
    dl = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in rows)
    return (f'<header class="card"><h1>Audit record #{_e(d.get("id"))} {_badge(str(d.get("action", "")))}</h1>'
            f'<dl class="meta">{dl}</dl></header>')


def _legend(current: str | None, rules_js: dict[str, Any], redacted: bool) -> str:
    if current is None:
        return '<section class="card legend">No rule scores recorded.</section>'
    r = rules_js[current]
    select = ""
    if len(rules_js) > 1:
        opts = "".join(f'<option value="{_e(k)}"{" selected" if k == current else ""}>{_e(k)}</option>'
                       for k in rules_js)
        select = f'<label>colour by rule <select id="rule-select">{opts}</select></label>'
    return (f'<section class="card legend">{select}<span>rule <b id="legend-rule">{_e(current)}</b>:</span>'
            f'<span id="legend-lo">{_e(_fmt(r["lo"]))}</span><span class="bar"></span>'
            f'<span>threshold <b id="legend-threshold">{_e(_fmt(r["threshold"]))}</b></span>'
            f'<span class="over"></span><span>score ≥ threshold</span>'
            '<span>· outlined: a decision was taken at that token</span></section>')


def _decision_table(decisions: list[dict[str, Any]]) -> str:
    if not decisions:
        return '<section class="card"><h2>Decisions</h2><p class="note">None.</p></section>'
    head = "".join(f"<th>{h}</th>" for h in ("action", "rule", "category", "scope", "position", "token", "score",
                                               "threshold", "top features"))
    rows = []
    for x in decisions:
        feats = ", ".join(f"#{int(f[0])}={_fmt(float(f[1]))}" for f in (x.get("top_features") or [])[:8])
        pos = x.get("position")
        link = f'<a href="#t{_e(pos)}">{_e(pos)}</a>' if isinstance(pos, int) else _e(pos)
        extra = f" ({_e(x.get('reason'))}; on_error: {_e(x.get('resolution'))})" if x.get("action") == "error" else ""
        if x.get("action") in ("steer", "flag") and x.get("resolution"):  # would-be steering in a scan: scan_action
            extra = f" (in a scan: {_badge(str(x['resolution']))})"
        if x.get("escalated"):  # the cascade: a judge decided this band score
            why = x.get("judge_reason") if x.get("action") != "error" else None
            extra += (f" <span class=\"judge\">judge {_e(x.get('judge'))}: {_e(x.get('verdict'))} in "
                      f"{_e(_fmt(x.get('judge_latency_s')))}s{f' ({_e(why)})' if why else ''}</span>")
        rows.append(f"<tr class=\"decision-row\"><td>{_badge(str(x.get('action')))}{extra}</td><td>{_e(x.get('rule'))}"
                    f"</td><td>{_e(x.get('category') or '-')}</td><td>{_e(x.get('scope'))}</td><td>{link}</td>"
                    f"<td><code>{_e(repr(x.get('token')))}</code></td>"
                    f"<td>{_e(_fmt(x.get('score')))}</td><td>{_e(_fmt(x.get('threshold')))}</td><td>{_e(feats)}</td></tr>")
    return f'<section class="card"><h2>Decisions</h2><table><tr>{head}</tr>{"".join(rows)}</table></section>'
