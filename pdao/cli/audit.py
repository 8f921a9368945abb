"""`pdao audit …`: verify, export and search the hash-chained audit log (docs/audit.md).

`verify --file` checks an exported file alone and touches no database; everything else works on
the metadata database of PDAO_HOME / PDAO_DATABASE_URL and is itself recorded in the log.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer

audit_app = typer.Typer(help="The audit log: verify, export, search.", no_args_is_help=True)

_EXIT_BROKEN = 1
_EXIT_ERROR = 2


def _db():  # noqa: ANN202
    from pdao.cli.main import _engine, _settings

    return _engine(_settings())


def _record(engine, action: str, decision: str, reason: str | None, detail: dict) -> None:  # noqa: ANN001
    """As pdao.cli.main._audit (actor cli:<os user>), with the outcome in the detail. A log that cannot
    be appended to is reported, never hidden; the command's own answer still stands."""
    import getpass
    import os

    from pdao.kernel import audit

    try:
        audit.record(engine, actor=f"cli:{getpass.getuser()}"[:64], auth_method="cli", action=f"cli.audit.{action}",
                     object="audit_log", decision=decision, reason=reason, detail={"pid": os.getpid(), **detail})
    except Exception as e:  # noqa: BLE001
        typer.secho(f"warning: this command could not be recorded in the audit log: {e}", fg="yellow", err=True)


def _anchor(seq: int | None, hash_: str | None) -> tuple[int, str] | None:
    if (seq is None) != (hash_ is None):
        typer.secho("give --anchor-seq and --anchor-hash together", fg="red", err=True)
        raise typer.Exit(_EXIT_ERROR)
    return (seq, hash_.lower()) if seq is not None else None


def _show(report, source: str) -> None:  # noqa: ANN001
    head = f"head seq {report.head_seq}, hash {report.head_hash}"
    if report.ok:
        typer.echo(f"OK: {report.checked} event(s) checked in {source}; {head}")
    else:
        typer.secho(f"BROKEN at seq {report.first_bad_seq}: {report.reason}", fg="red", err=True)
        typer.echo(f"first_bad_seq={report.first_bad_seq} checked={report.checked} ({source}; {head})")


@audit_app.command("verify")
def verify_cmd(
    file: Annotated[Path | None, typer.Option("--file", "-f", help="an exported JSONL file (no database needed)")] = None,
    from_seq: Annotated[int | None, typer.Option(help="start at this seq (database only)")] = None,
    anchor_seq: Annotated[int | None, typer.Option(help="a head recorded earlier: its seq …")] = None,
    anchor_hash: Annotated[str | None, typer.Option(help="… and its hash")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
) -> None:
    """Find the first broken link of the chain (exit 0: intact; 1: broken, with its seq; 2: error)."""
    from pdao.kernel import audit

    anchor = _anchor(anchor_seq, anchor_hash)
    if file is not None:
        if not file.is_file():
            typer.secho(f"no such file: {file}", fg="red", err=True)
            raise typer.Exit(_EXIT_ERROR)
        with file.open("rb") as f:
            report = audit.verify_lines(f, anchor=anchor)
        source = str(file)
    else:
        engine = _db()
        report = audit.verify(engine, from_seq=from_seq, anchor=anchor)
        _record(engine, "verify", "allow", None, {"ok": report.ok, "checked": report.checked,
                                                   "first_bad_seq": report.first_bad_seq,
                                                   "head_seq": report.head_seq})
        source = "the database"
    if as_json:
        typer.echo(json.dumps(report.as_dict()))
    else:
        _show(report, source)
    if not report.ok:
        raise typer.Exit(_EXIT_BROKEN)


@audit_app.command("export")
def export_cmd(
    file: Annotated[Path, typer.Argument(help="the JSONL file to write ('-' for standard output)")],
    from_seq: Annotated[int | None, typer.Option(min=1)] = None,
    to_seq: Annotated[int | None, typer.Option(min=1)] = None,
) -> None:
    """Export the log (a header line, then one event a line, with its chain) for outside checking."""
    from pdao.kernel import audit

    engine = _db()
    if str(file) == "-":
        n = audit.export_jsonl(engine, sys.stdout, from_seq, to_seq)
    else:
        partial = file.with_name(file.name + ".partial")
        with partial.open("w", encoding="utf-8", newline="\n") as out:
            n = audit.export_jsonl(engine, out, from_seq, to_seq)
        partial.replace(file)
        typer.echo(f"exported {n} event(s) to {file}", err=True)
    _record(engine, "export", "allow", None, {"from_seq": from_seq, "to_seq": to_seq, "events": n})


@audit_app.command("head")
def head_cmd() -> None:
    """Print the head (seq and hash): record or publish it regularly as an anchor."""
    from pdao.kernel import audit

    engine = _db()
    head = audit.read_head(engine)
    if head is None:
        typer.secho("the audit head row is missing", fg="red", err=True)
        raise typer.Exit(_EXIT_BROKEN)
    typer.echo(f"{head[0]} {head[1]}")


@audit_app.command("events")
def events_cmd(
    actor: str | None = None,
    org: str | None = None,
    scene: int | None = None,
    action: Annotated[str | None, typer.Option(help="exact, or a prefix ending in * (scene.*)")] = None,
    decision: str | None = None,
    since: Annotated[datetime | None, typer.Option(help="ISO date/time, UTC")] = None,
    until: Annotated[datetime | None, typer.Option(help="ISO date/time, UTC")] = None,
    after_seq: int | None = None,
    newest_first: Annotated[bool, typer.Option("--newest-first")] = False,
    limit: Annotated[int, typer.Option(min=1, max=100000)] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON event a line")] = False,
) -> None:
    """Search the log (oldest first unless --newest-first)."""
    from sqlmodel import Session

    from pdao.kernel import audit

    engine = _db()
    flt = audit.EventFilter(actor=actor, org=org, scene=scene, action=action, decision=decision, since=since,
                            until=until, after_seq=after_seq, newest_first=newest_first, limit=limit)
    with Session(engine) as session:
        events = audit.find_events(session, flt)
    for e in events:
        if as_json:
            typer.echo(audit.export_line(e), nl=False)
        else:
            typer.echo(f"{e.seq:>8} {audit.format_at(e.at)} {e.decision:<5} {e.status or '-':>3} "
                       f"{e.actor or '-':<16} {e.org or '-':<10} {e.action:<24} {e.object or ''} "
                       f"{e.reason or ''}".rstrip())
    _record(engine, "events", "allow", None, {"count": len(events), "filters": {
        k: (audit.format_at(v) if isinstance(v, datetime) and v.tzinfo else str(v) if isinstance(v, datetime) else v)
        for k, v in vars(flt).items() if v is not None and k not in ("limit", "newest_first")}})
