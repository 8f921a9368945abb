"""The `pdao` command."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from sqlmodel import Session, select

from pdao.cli.audit import audit_app
from pdao.cli.pii import pii_app
from pdao.cli.policy import policy_app
from pdao.kernel.config import Settings
from pdao.kernel.errors import PdaoError

app = typer.Typer(help="pdao — public-data authorized-operation sandbox (公共数据授权运营沙箱).",
                  no_args_is_help=True, pretty_exceptions_enable=False)
catalog_app = typer.Typer(help="The data catalog.", no_args_is_help=True)
data_app = typer.Typer(help="Data versions in the domain store.", no_args_is_help=True)
users_app = typer.Typer(help="Users and API keys.", no_args_is_help=True)
orgs_app = typer.Typer(help="Organizations.", no_args_is_help=True)
app.add_typer(catalog_app, name="catalog")
app.add_typer(data_app, name="data")
app.add_typer(users_app, name="users")
app.add_typer(orgs_app, name="orgs")
app.add_typer(policy_app, name="policy")
app.add_typer(pii_app, name="pii")
app.add_typer(audit_app, name="audit")


def _fail(err: PdaoError) -> None:
    typer.secho(f"error [{err.code}]: {err.message}\n       {err.message_zh}", fg="red", err=True)
    if err.details:
        details = err.details
        if isinstance(details, list) and details and isinstance(details[0], dict) and "file" in details[0]:
            for d in details:
                where = f"{d['file']}:{d['line']}" if d.get("line") else d["file"]
                typer.echo(f"  {where}: {d['path'] or '(document)'}: {d['message']}", err=True)
        else:
            typer.echo(json.dumps(details, ensure_ascii=False, indent=2, default=str), err=True)
    raise typer.Exit(1)


def _settings() -> Settings:
    return Settings.from_env()


def _engine(settings: Settings):  # noqa: ANN202
    from pdao.cli.demo import prepare_home

    return _run(lambda: prepare_home(settings))


def _run(fn, engine=None, action: str | None = None, obj: str | None = None):  # noqa: ANN001, ANN202
    """Run a command's work; with `action`, record it in the audit log like an API request
    (actor `cli:<os user>`), allowed or refused."""
    from sqlalchemy.exc import OperationalError

    try:
        result = fn()
    except PdaoError as e:
        if action:
            _audit(engine, action, obj, "deny", e.code)
        _fail(e)
    except OperationalError as e:
        _fail(PdaoError(503, "database_unavailable", f"The metadata database cannot be reached: {e.orig}",
                        f"无法连接元数据数据库：{e.orig}"))
    else:
        if action:
            _audit(engine, action, obj, "allow", None)
        return result


def _audit(engine, action: str, obj: str | None, decision: str, reason: str | None) -> None:  # noqa: ANN001
    import getpass
    import os

    from pdao.kernel import audit

    audit.record(engine, actor=f"cli:{getpass.getuser()}"[:64], auth_method="cli", action=f"cli.{action}",
                 object=obj[:200] if obj else None, decision=decision, reason=reason, detail={"pid": os.getpid()})


@app.command()
def init() -> None:
    """Create the home (PDAO_HOME) and bring the metadata database to the latest schema."""
    s = _settings()
    _engine(s).dispose()
    typer.echo(f"ready: {s.home} ({s.database_url.split('://')[0]})")


@catalog_app.command("import")
def catalog_import(paths: Annotated[list[Path] | None, typer.Argument(help="YAML files or folders")] = None) -> None:
    """Import descriptors all-or-nothing (default: the packaged health descriptors)."""
    from pdao.cli.demo import import_catalog

    engine = _engine(_settings())
    report = _run(lambda: import_catalog(engine, paths), engine, "catalog.import",
                  ",".join(str(p) for p in paths or []) or "packaged")
    for code, action in {**report.organizations, **report.datasets}.items():
        typer.echo(f"{action:<9} {code}")


@catalog_app.command("list")
def catalog_list() -> None:
    """List the datasets and their latest versions."""
    from catalog.service import DatasetFilters, list_datasets
    from policies.catalog_rules import ALL_CLASSES, CatalogScope

    engine = _engine(_settings())
    with Session(engine) as session:
        page = list_datasets(session, CatalogScope(ALL_CLASSES, None), DatasetFilters(limit=500))
    for d in page.items:
        typer.echo(f"{d.code:<30} grade {d.grade}  {d.opening_class:<13} prod v{d.latest_version['prod'] or '-'}  "
                   f"dev v{d.latest_version['dev'] or '-'}  {d.title_zh}")


@data_app.command("load")
def data_load(code: str, file: Path, env: Annotated[str, typer.Option(help="prod or dev (synthetic twin)")] = "prod",
              note: str = "") -> None:
    """Check FILE (Parquet, or CSV with a header) against CODE's descriptor and add it as a new version."""
    from pdao.kernel.db import session_scope
    from sandbox.engine.store import load_version

    if not file.is_file():
        typer.secho(f"no such file: {file}", fg="red", err=True)
        raise typer.Exit(1)
    s = _settings()
    engine = _engine(s)

    def go():  # noqa: ANN202
        with session_scope(engine) as session:
            return load_version(session, s, code, file, env=env, source="cli", note=note)

    version, report = _run(go, engine, "data.load", f"dataset:{code}:{env}")
    typer.echo(f"loaded {code} {env} v{version.number}: {version.row_count:,} rows, sha256 {version.sha256}")
    for w in report.warnings:
        typer.secho(f"warning: {w['message']}", fg="yellow")


@data_app.command("verify")
def data_verify(code: Annotated[str | None, typer.Argument(help="a dataset code; all when left out")] = None) -> None:
    """Re-hash every snapshot and compare with the catalog; exit 1 if any is missing or altered."""
    from catalog.models import Dataset, DatasetVersion
    from sandbox.engine.store import verify_snapshot

    s = _settings()
    engine = _engine(s)
    bad = 0
    with Session(engine) as session:
        stmt = select(Dataset.code, DatasetVersion).join(DatasetVersion, DatasetVersion.dataset_id == Dataset.id)
        if code:
            stmt = stmt.where(Dataset.code == code)
        rows = session.exec(stmt.order_by(Dataset.code, DatasetVersion.env, DatasetVersion.number)).all()
    for ds_code, v in rows:
        verdict = verify_snapshot(s, v)
        bad += verdict != "ok"
        typer.echo(f"{verdict.upper():<8} {ds_code:<30} {v.env:<4} v{v.number}  sha256 {v.sha256[:16]}…")
    _audit(engine, "data.verify", code or "all", "allow" if not bad else "deny", f"{bad} bad" if bad else None)
    typer.echo(f"{len(rows)} snapshot(s) checked, {bad} missing or altered")
    if bad:
        raise typer.Exit(1)


@app.command()
def synth(scale: Annotated[int, typer.Option(help="outpatient visit rows (about)", min=100)] = 200_000,
          seed: Annotated[int, typer.Option(help="random seed; same seed, same files")] = 20240113,
          out: Annotated[Path | None, typer.Option(help="only write Parquet files here; load nothing")] = None,
          twin: Annotated[bool, typer.Option(help="also make the disjoint dev twin")] = True) -> None:
    """Generate synthetic Yinchuan health data, deterministic and streamed in chunks."""
    if out is not None:
        from sandbox.synth import generate

        out.mkdir(parents=True, exist_ok=True)
        for code, path in generate(out, scale=scale, seed=seed, twin=False).items():
            typer.echo(f"{code:<30} {path}")
        if twin:
            (out / "twin").mkdir(exist_ok=True)
            for code, path in generate(out / "twin", scale=scale, seed=seed, twin=True).items():
                typer.echo(f"{code:<30} {path}")
        return
    from pdao.cli.demo import import_catalog, synthesize

    s = _settings()
    engine = _engine(s)
    _run(lambda: import_catalog(engine), engine, "catalog.import", "packaged")
    report = _run(lambda: synthesize(engine, s, scale, seed, twin), engine, "synth", f"scale={scale} seed={seed}")
    for code, env, number, rows in report.loaded:
        typer.echo(f"{code:<30} {env:<4} v{number}  {rows:>12,} rows")


@orgs_app.command("create")
def orgs_create(code: str, name_zh: Annotated[str, typer.Option()], name_en: Annotated[str, typer.Option()],
                kind: Annotated[str, typer.Option(help="department|company|office|operator|regulator")] = "company",
                credit_code: str | None = None) -> None:
    """Create or update an organization (a tenant company, usually)."""
    from pydantic import ValidationError

    from catalog.descriptor import OrganizationSpec
    from catalog.service import upsert_organization
    from pdao.kernel.db import session_scope

    try:
        spec = OrganizationSpec(code=code, name={"zh": name_zh, "en": name_en}, kind=kind, credit_code=credit_code)
    except ValidationError as e:
        typer.secho(str(e), fg="red", err=True)
        raise typer.Exit(1) from None
    if credit_code:
        from catalog.identifiers import is_valid_uscc

        if not is_valid_uscc(credit_code):
            typer.secho("not a valid unified social credit code (GB 32100)", fg="red", err=True)
            raise typer.Exit(1)
    engine = _engine(_settings())

    def go() -> str:
        with session_scope(engine) as session:
            return upsert_organization(session, spec)

    typer.echo(f"{_run(go, engine, 'orgs.create', f'org:{code}')} {code}")


@orgs_app.command("list")
def orgs_list() -> None:
    from pdao.kernel.identity.models import Organization

    engine = _engine(_settings())
    with Session(engine) as session:
        for o in session.exec(select(Organization).order_by(Organization.kind, Organization.code)):
            typer.echo(f"{o.code:<12} {o.kind:<10} {o.name_zh}  ({o.name_en})")


def _password(password: str | None) -> str:
    return password if password is not None else typer.prompt("password", hide_input=True, confirmation_prompt=True)


@users_app.command("create")
def users_create(username: str, org: Annotated[str, typer.Option(help="organization code")],
                 role: Annotated[str, typer.Option(help="provider|applicant|office|reviewer|auditor|operator")],
                 password: Annotated[str | None, typer.Option(help="prompted when left out")] = None,
                 display_name: str = "") -> None:
    """Create a user in an organization with a role."""
    from pdao.kernel.db import session_scope
    from pdao.kernel.identity.service import create_user

    engine = _engine(_settings())
    pw = _password(password)

    def go() -> None:
        with session_scope(engine) as session:
            create_user(session, username, pw, org, role, display_name)

    _run(go, engine, "users.create", f"user:{username}")
    typer.echo(f"created {username} ({role} of {org})")


@users_app.command("list")
def users_list() -> None:
    from pdao.kernel.identity.service import list_users

    engine = _engine(_settings())
    with Session(engine) as session:
        for u, o in list_users(session):
            state = "active" if u.is_active else "disabled"
            typer.echo(f"{u.username:<16} {u.role:<10} {o.code:<12} {state}")


@users_app.command("set-password")
def users_set_password(username: str, password: Annotated[str | None, typer.Option()] = None) -> None:
    """Change a password; every token issued before stops working, and the user's API keys and
    pending grants are revoked."""
    from pdao.kernel.db import session_scope
    from pdao.kernel.identity.service import cli_actor, set_password

    engine = _engine(_settings())
    pw = _password(password)

    def go() -> list[int]:
        with session_scope(engine) as session:
            return set_password(session, username, pw, by=cli_actor())

    revoked = _run(go, engine, "users.set_password", f"user:{username}")
    typer.echo(f"password changed for {username}" + _revoked_note(revoked))


def _revoked_note(revoked: list[int]) -> str:
    return f"; revoked API key(s) {', '.join(f'#{i}' for i in revoked)}" if revoked else ""


def _set_active(username: str, active: bool) -> None:
    from pdao.kernel.db import session_scope
    from pdao.kernel.identity.service import cli_actor, set_active

    engine = _engine(_settings())

    def go() -> list[int]:
        with session_scope(engine) as session:
            return set_active(session, username, active, by=cli_actor())

    revoked = _run(go, engine, "users.enable" if active else "users.disable", f"user:{username}")
    typer.echo(f"{'enabled' if active else 'disabled'} {username}" + _revoked_note(revoked))


@users_app.command("disable")
def users_disable(username: str) -> None:
    """Disable a user; their tokens stop working at once, their API keys and pending grants are revoked."""
    _set_active(username, False)


@users_app.command("enable")
def users_enable(username: str) -> None:
    _set_active(username, True)


@users_app.command("issue-key")
def users_issue_key(username: str,
                    by: Annotated[str, typer.Option(help="the operator granting it (the key's granted_by)")],
                    label: str = "",
                    days: Annotated[int, typer.Option(min=1, max=3650, help="the key's life from its claim")] = 365,
                    ) -> None:
    """Grant a user an API key; the user claims it (no key is made or shown here).

    The owner claims the key signed in, with their own password, and only they ever see it. The
    audit log names you (the OS user, cli:<name>) as the actor; --by is recorded as the grant's
    operator (`granted_by`, `detail.issued_by`) and must name an operator."""
    from pdao.kernel.db import session_scope
    from pdao.kernel.identity.service import claim_window, cli_actor, grant_api_key, principal_for

    settings = _settings()
    engine = _engine(settings)

    def go() -> tuple[int, str]:
        with session_scope(engine) as session:
            row = grant_api_key(session, principal_for(session, by, "cli"), username, label, days,
                                claim_window(settings), actor=cli_actor())
            return row.id, row.claim_by.isoformat(timespec="seconds")

    key_id, claim_by = _run(go, engine, "users.issue_key", f"user:{username}")
    typer.echo(f"granted API key #{key_id} to {username} (pending: no key exists until {username} claims it)\n"
               f"{username} claims it before {claim_by}, signed in and with their own password:\n"
               f"  POST /api/v1/api-keys/{key_id}/claim {{\"password\": ...}}   (bearer token from POST /api/v1/auth/token)\n"
               f"  or in Python: Client.login(URL, \"{username}\", PASSWORD).claim_api_key({key_id}, PASSWORD)")


@users_app.command("revoke-key")
def users_revoke_key(key_id: int,
                     by: Annotated[str | None, typer.Option(
                         help="on whose word (recorded as detail.stated_by; the actor is you, the OS user)")] = None,
                     ) -> None:
    """Revoke an API key or a pending grant (whoever runs the command on the server may)."""
    from pdao.kernel.db import session_scope
    from pdao.kernel.identity.service import cli_actor, revoke_api_key_by_command

    engine = _engine(_settings())

    def go() -> None:
        with session_scope(engine) as session:
            revoke_api_key_by_command(session, key_id, cli_actor(), stated_by=by)

    _run(go, engine, "users.revoke_key", f"api_key:{key_id}")
    typer.echo(f"revoked API key #{key_id}")


@app.command()
def trace(file: Annotated[Path, typer.Argument(help="a file found outside: CSV (even without its header), Parquet or JSON")],
          as_json: Annotated[bool, typer.Option("--json", help="print the whole answer as JSON")] = False) -> None:
    """Name the export, query, scene, datasets and versions, requester and reviewers of a file found
    outside the domain (exit 1 when nothing matches)."""
    from sandbox.results import export

    s = _settings()
    engine = _engine(s)
    if not file.is_file():
        _fail(PdaoError(404, "file_not_found", f"No such file: {file}", f"文件不存在：{file}"))
    data = file.read_bytes()
    with Session(engine) as session:
        out = _run(lambda: export.trace(session, s, data, file.name), engine, "trace", file.name)
    if as_json:
        typer.echo(json.dumps(out, ensure_ascii=False, indent=2, default=str))
    elif not out["matched"]:
        typer.echo(f"no match / 无匹配: {out['message']}")
    else:
        lin = out["lineage"]
        typer.echo(f"matched by {out['match']}; stamp valid: {out['stamp_valid']}")
        typer.echo(f"export:    {out['export_id'] or '(one of: ' + ', '.join(out['candidate_exports']) + ')'}")
        typer.echo(f"result:    {out['result_id']} (v{lin['result']['version']}, {lin['result']['status']}, "
                   f"released by {out['released_by']})")
        typer.echo(f"query:     {out['query_id']}  {lin['query']['sql']}")
        typer.echo(f"scene:     {out['scene_id']}  {lin['scene']['title']}  ({lin['scene']['org']['code']})")
        for d in lin["datasets"]:
            typer.echo(f"dataset:   {d['code']} v{d['version']} ({d['env']}) sha256 {d['sha256'][:16]}…")
        typer.echo(f"requester: {out['requester']['username']} ({out['requester']['org']})")
        typer.echo("reviewers: " + (", ".join(f"{r['username']} ({r['org']})" for r in out["reviewers"]) or "-"))
    if not out["matched"]:
        raise typer.Exit(1)


@app.command()
def serve(host: str = "127.0.0.1", port: int = 8000,
          workers: Annotated[int, typer.Option(help="server processes")] = 1,
          query_workers: Annotated[int, typer.Option(min=0, help="query worker processes beside the server "
                                                     "(`pdao worker` runs more elsewhere)")] = 1) -> None:
    """Serve the API (and /docs) for an existing home, with query workers in processes of their own.

    A prod run never shares the server's process: its CPU time would show in every request's
    latency, and so would what it depends on (how many rows a held answer matched; review r6)."""
    import uvicorn

    from sandbox.results.export import sweep_orphans

    s = _settings()
    eng = _engine(s)  # migrate before any worker starts
    with Session(eng) as session:
        swept = sweep_orphans(session, s)
    if swept:
        typer.echo(f"removed {swept} result file(s) a crash left without a result row")
        _audit(eng, "results.sweep", f"{swept} files", "allow", None)
    pool = WorkerProcesses(query_workers)
    pool.start()
    typer.echo(f"serving {s.home} on http://{host}:{port}  (API docs: http://{host}:{port}/docs)")
    try:
        uvicorn.run("api.main:app", host=host, port=port, workers=workers, log_level="info",
                    proxy_headers=False, server_header=False)
    finally:
        pool.stop()


class WorkerProcesses:
    """`pdao worker` processes beside the server, started again when one dies, stopped with it."""

    def __init__(self, n: int) -> None:
        import threading

        self.n, self.procs, self.stopping = n, [], threading.Event()

    def _spawn(self):  # noqa: ANN202
        import subprocess
        import sys

        return subprocess.Popen([sys.executable, "-m", "pdao", "worker"])

    def start(self) -> None:
        import threading

        self.procs = [self._spawn() for _ in range(self.n)]
        if self.n:
            threading.Thread(target=self._watch, daemon=True, name="pdao-worker-watch").start()

    def _watch(self) -> None:
        while not self.stopping.wait(5.0):
            for i, p in enumerate(self.procs):
                if p.poll() is not None and not self.stopping.is_set():
                    typer.echo(f"query worker {p.pid} ended ({p.returncode}); starting another", err=True)
                    self.procs[i] = self._spawn()

    def stop(self) -> None:
        self.stopping.set()
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except Exception:  # noqa: BLE001 - it would not stop: end it
                p.kill()


@app.command()
def worker(once: Annotated[bool, typer.Option("--once", help="stop when the queue is empty")] = False,
           poll: Annotated[float, typer.Option(min=0.05, help="seconds between looks at an empty queue")] = 1.0) -> None:
    """Run queued prod queries (any number of these may run beside `pdao serve`)."""
    import logging

    from sandbox.worker import work

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    s = _settings()
    work(_engine(s), s, poll_seconds=poll, once=once)


@app.command()
def demo(serve_: Annotated[bool, typer.Option("--serve/--no-serve", help="serve when ready")] = True,
         scale: Annotated[int, typer.Option(min=100)] = 200_000, seed: int = 20240113,
         host: str = "127.0.0.1", port: int = 8000) -> None:
    """Set up a demo home (catalog, synthetic data, demo users) and serve it."""
    from pdao.cli.demo import DEMO_USERS, run_demo

    s = _settings()
    _run(lambda: run_demo(s, scale=scale, seed=seed, echo=typer.echo))
    typer.echo("\nDemo users (password: $PDAO_DEMO_PASSWORD, default 'pdao-demo'):")
    for username, org, role in DEMO_USERS:
        typer.echo(f"  {username:<10} {role:<9} {org}")
    typer.echo(f"\nLog in:\n  curl -s -X POST http://{host}:{port}/api/v1/auth/token "
               "-d username=insurer_a -d password=pdao-demo\n"
               f"  then: curl -s -H 'Authorization: Bearer <token>' http://{host}:{port}/api/v1/datasets\n"
               f"  or open http://{host}:{port}/docs and use 'Authorize'.")
    if serve_:
        serve(host=host, port=port)


def main() -> None:  # pragma: no cover
    app(prog_name="pdao")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
