"""``guardrails audit list|show|export|verify`` and ``guardrails report``: the audit trail on the command line.

The database is ``--db``, else env ``GUARDRAILS_AUDIT_DB``, else ``./guardrails-audit.db``. Readers
open it read-only and never create it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from guardrails.cli.safe import cell, dumps, markup, visible

DEFAULT_DB = "guardrails-audit.db"
ENV_DB = "GUARDRAILS_AUDIT_DB"

DbOpt = Annotated[str | None, typer.Option("--db", help=f"Audit database; default: ${ENV_DB} or ./{DEFAULT_DB}")]
PolicyFilter = Annotated[str | None, typer.Option("--policy", help="Only records of this policy name")]
ActionFilter = Annotated[str | None, typer.Option(
    "--action", help="Only records with this action: block, steer, flag, error, allow")]
RuleFilter = Annotated[str | None, typer.Option("--rule", help="Only records where this rule decided something")]
SinceFilter = Annotated[str | None, typer.Option(
    "--since", help="Only records from then on: YYYY-MM-DD, an ISO date-time, or a duration (12h, 7d)")]


MAX_ID = 2**63 - 1
"""Largest record id or count SQLite can hold (the bound of ID and --limit)."""
IdArg = Annotated[int, typer.Argument(metavar="ID", min=1, max=MAX_ID, help="Record id")]
HeadOpt = Annotated[Path | None, typer.Option(
    "--head", help="Head file ({id, hash} of the newest record, from 'audit export --head'); catches truncation")]


def fail(message: str, code: int = 2) -> NoReturn:
    """One unwrapped error line on stderr (user text escaped), then exit (2: bad usage or input)."""
    from guardrails.cli.main import err_console
    from guardrails.cli.safe import markup

    err_console.print(f"[bold red]error:[/] {markup(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def db_path(db: str | None) -> Path:
    return Path(db or os.environ.get(ENV_DB) or DEFAULT_DB)


def _open(db: str | None) -> Any:
    from guardrails.audit.store import AuditError, AuditStore
    path = db_path(db)
    if not path.is_file():
        fail(f"audit database {str(path)!r} not found; pass --db PATH or set {ENV_DB}")
    try:
        return AuditStore(path, readonly=True)
    except AuditError as exc:
        fail(str(exc))


def _filters(action: str | None, since: str | None) -> None:
    from guardrails.audit.store import ACTIONS, parse_since
    if action is not None and action not in ACTIONS:
        fail(f"unknown --action {action!r}; valid: {', '.join(ACTIONS)}")
    if since is not None:
        try:
            parse_since(since)
        except ValueError as exc:
            fail(str(exc))


def _get(store: Any, record_id: int) -> Any:
    try:
        return store.get(record_id)
    except KeyError as exc:
        fail(str(exc.args[0]))


def _safe(fn: Any) -> Any:
    from guardrails.audit.store import AuditError
    try:
        return fn()
    except (AuditError, OSError, ValueError) as exc:
        fail(str(exc))


def audit_list(
    db: DbOpt = None, policy: PolicyFilter = None, action: ActionFilter = None, rule: RuleFilter = None,
    since: SinceFilter = None,
    limit: Annotated[int, typer.Option(min=1, max=MAX_ID, help="Newest records shown at most")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line")] = False,
) -> None:
    """List audit records, newest first."""
    from rich.table import Table

    from guardrails.cli.main import console

    _filters(action, since)
    store = _open(db)
    recs = _safe(lambda: store.list(policy=policy, action=action, since=since, limit=limit, rule=rule))
    if as_json:
        for r in recs:
            sys.stdout.write(dumps(r.to_dict()) + "\n")
        return
    t = Table("id", "time (UTC)", "policy", "action", "rules", "kind", "input")
    for r in recs:
        d = r.data
        if not r.readable:
            t.add_row(cell(r.id), cell(r.time), "", "", "", "", cell(f"(unreadable: {d['unreadable']})"))
            continue
        decisions = [x for x in d.get("decisions") or [] if isinstance(x, dict)]
        rules = ", ".join(sorted({str(x.get("rule")) for x in decisions}))
        inp = _field(d, "input").get("text")
        preview = "(redacted)" if inp is None else str(inp).replace("\n", " ")[-60:]
        t.add_row(cell(r.id), cell(r.time), cell(r.policy), cell(r.action), cell(rules), cell(d.get("kind", "")),
                  cell(preview))
    console.print(t)
    console.print(f"{len(recs)} record(s) shown from {visible(db_path(db))}", highlight=False, soft_wrap=True,
                  markup=False)


def _field(d: dict[str, Any], key: str) -> dict[str, Any]:
    v = d.get(key)
    return v if isinstance(v, dict) else {}


def audit_show(
    record_id: IdArg,
    db: DbOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the record as JSON")] = False,
) -> None:
    """Show one record: metadata, decisions and texts."""
    from rich.table import Table

    from guardrails.cli.main import console

    store = _open(db)
    rec = _get(store, record_id)
    if as_json:
        sys.stdout.write(dumps(rec.to_dict(), indent=2) + "\n")
        return
    d = rec.data
    if not rec.readable:
        fail(f"record {rec.id} is unreadable: {d['unreadable']}", code=1)
    pol = _field(d, "policy")
    saes = _field(d, "saes")
    lines = [
        f"record {rec.id}  {rec.time}  action={rec.action}  kind={d.get('kind')}",
        f"policy {pol.get('name')} v{pol.get('version')} (sha256 {pol.get('digest')})",
        f"model {d.get('model')}",
        *(f"sae {k}: {v.get('repr') if isinstance(v, dict) else v}" for k, v in saes.items()),
        f"hash {rec.hash}  prev {rec.prev_hash}",
    ]
    for line in lines:
        console.print(visible(line), highlight=False, markup=False)
    for label, field in (("input", _field(d, "input")), ("output", _field(d, "output"))):
        text = field.get("text")
        shown = text if text is not None else f"(redacted; sha256 {field.get('sha256')})"
        console.print(f"\n[bold]{label}[/]")
        console.print(visible(shown, keep_newlines=True), highlight=False, markup=False)
    t = Table("action", "rule", "scope", "pos", "token", "score", "threshold", "top features")
    for x in d.get("decisions") or []:
        if not isinstance(x, dict):
            continue
        feats = ", ".join(_feature(f) for f in (x.get("top_features") or [])[:5])
        score = x.get("score")
        t.add_row(cell(x.get("action")), cell(x.get("rule")), cell(x.get("scope")), cell(x.get("position")),
                  cell(repr(x.get("token"))), cell(_num(score)), cell(_num(x.get("threshold"))), cell(feats))
    console.print(t)


def _num(x: Any) -> str:
    if x is None:
        return "nan"
    return f"{x:.3f}" if isinstance(x, float | int) and not isinstance(x, bool) else str(x)


def _feature(f: Any) -> str:
    try:
        return f"{int(f[0])}:{float(f[1]):.2f}"
    except (TypeError, ValueError, IndexError, OverflowError):
        return str(f)


def audit_export(
    db: DbOpt = None,
    out: Annotated[Path | None, typer.Option("--out", help="JSONL file to write; default: standard output")] = None,
    head: Annotated[Path | None, typer.Option(
        "--head", help="Also write the head ({id, hash} of the newest record) to this file")] = None,
) -> None:
    """Export every record, in order, as JSON lines (with hashes, so the export can be verified)."""
    from guardrails.cli.main import err_console, output_path

    out = None if out is None else output_path(out, "--out")
    head = None if head is None else output_path(head, "--head")
    store = _open(db)
    if out is None:
        _safe(lambda: store.export_jsonl(sys.stdout))
        if head is not None:
            _write_head(store, head)
        return
    n = _safe(lambda: store.export_jsonl(out))
    err_console.print(f"{n} record(s) written to {markup(out)}", highlight=False, soft_wrap=True)
    if head is not None:
        _write_head(store, head)


def _write_head(store: Any, head: Path) -> None:
    from guardrails.cli.main import err_console

    h = _safe(lambda: store.write_head(head))
    if h is None:
        fail(f"{markup(db_path(None) if store is None else store.path)} is empty: no head to write")
    err_console.print(f"head (record {h.id}, hash {h.hash}) written to {markup(head)}", highlight=False,
                      soft_wrap=True)


def audit_verify(
    db: DbOpt = None,
    head: HeadOpt = None,
    save_head: Annotated[Path | None, typer.Option(
        "--save-head", help="After a successful check, write the head to this file (for the next --head)")] = None,
) -> None:
    """Recompute the hash chain over every column; exit 1 and name the first bad record when tampered."""
    from guardrails.cli.main import console, err_console, output_path

    save_head = None if save_head is None else output_path(save_head, "--save-head")
    store = _open(db)
    res = _safe(lambda: store.verify(head=head))
    where = markup(db_path(db))
    if res.ok:
        checked = f"; head file {markup(head)} matches" if head is not None else ""
        console.print(f"[green]ok[/] {res.checked} record(s) verified in {where}; head hash {res.head}{checked}",
                      highlight=False, soft_wrap=True)
        if save_head is not None:
            _write_head(store, save_head)
        return
    err_console.print(f"[bold red]TAMPERED[/] {where}: record {res.first_bad}: {markup(res.reason)} "
                      f"({max(0, (res.first_bad or 1) - 1)} record(s) before it verified)", highlight=False,
                      soft_wrap=True)
    raise typer.Exit(1)


def report(
    record_id: Annotated[int | None, typer.Argument(
        metavar="[ID]", min=1, max=MAX_ID, help="Record id (omit with --summary)")] = None,
    db: DbOpt = None,
    out: Annotated[Path | None, typer.Option("--out", help="HTML file (default: report-ID.html, summary.html)")] = None,
    summary: Annotated[bool, typer.Option("--summary", help="A summary page over the (filtered) records")] = False,
    policy: PolicyFilter = None, action: ActionFilter = None, rule: RuleFilter = None, since: SinceFilter = None,
) -> None:
    """Write a self-contained HTML report: one record's token heat map, or a summary (--summary)."""
    from guardrails.audit.report import render_record
    from guardrails.audit.summary import render_summary
    from guardrails.cli.main import console, output_path

    if summary and record_id is not None:
        fail("give either a record ID or --summary, not both")
    if not summary and record_id is None:
        fail("missing record ID; usage: guardrails report ID [--out report.html] or guardrails report --summary")
    _filters(action, since)
    out = None if out is None else output_path(out, "--out")
    store = _open(db)
    if summary:
        recs = _safe(lambda: list(store.iter_records(policy=policy, action=action, since=since, rule=rule)))
        page = render_summary(recs, title=f"Audit summary: {db_path(db).name}")
        target = out or Path("summary.html")
        what = f"summary of {len(recs)} record(s)"
    else:
        assert record_id is not None
        rec = _get(store, record_id)
        page = render_record(rec)
        target = out or Path(f"report-{record_id}.html")
        what = f"record {record_id}"
    try:
        target.write_text(page, encoding="utf-8")
    except OSError as exc:
        fail(f"cannot write {target}: {exc}")
    console.print(f"{what} -> {visible(target)}", highlight=False, soft_wrap=True, markup=False)


def register(app: typer.Typer) -> None:
    """Add ``audit`` (list, show, export, verify) and ``report`` to the ``guardrails`` app."""
    audit_app = typer.Typer(help="The audit trail: list, show, export and verify records.", no_args_is_help=True)
    audit_app.command("list")(audit_list)
    audit_app.command("show")(audit_show)
    audit_app.command("export")(audit_export)
    audit_app.command("verify")(audit_verify)
    app.add_typer(audit_app, name="audit")
    app.command("report")(report)
