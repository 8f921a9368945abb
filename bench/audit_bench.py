"""Benchmark of the hash-chained audit log (pdao/kernel/audit.py, docs/audit.md) on SQLite and PostgreSQL.

    python bench/audit_bench.py                          # 3 rounds of 1,000 appends a process; 500,000 events
    python bench/audit_bench.py --verify-events 1000000  # what bench/RESULTS.md shows

(1) Appends per second, each event in its own transaction as the request middleware writes them,
    from 1 and from 2 OS processes at once (each with its own engine, started together):
      plain   — the baseline: the same normalized values inserted with Core into a table of the
                same shape and indexes without the chain (`seq` autoincrement, no head);
      orm     — what `audit.record` did before the chain (SQLModel object, `session.add`, commit),
                into that same plain table;
      chain   — `audit.record`: lock the head, read it, hash, insert, move the head.
    Three rounds (methods in rotated order, so drifting load hits each alike); the median appends/s
    and its ratio to the baseline's with the same backend and processes.
    After the runs the chain is verified (and must be intact with contiguous seqs).
(2) Verification per million events: the log is emptied and N events (request-like, a third with
    SQL text in `detail`) are generated with the chain computed in Python and bulk-inserted
    (SQLite: executemany; PostgreSQL: COPY), in batches. Then, each step in a fresh child process
    (its wall time and peak RSS — bounded memory shows here):
      scan          — the baseline: the same streamed SELECT of the same columns, no hashing;
      verify        — `audit.verify(engine)`;
      export        — `audit.export_jsonl` to a file;
      json baseline — reading the exported file and `json.loads` of every line;
      verify_lines  — `audit.verify_lines` over the file;
      outsider      — the stdlib-only snippet of docs/audit.md, run by a bare `python -I -S`.

Scratch databases: a SQLite file in a temporary folder; on PostgreSQL the database
`pdao_audit_bench` (``--pg-url``), created fresh and dropped at the end. Prints Markdown tables and
appends them, with the command line, date and machine, to bench/RESULTS.md under
``## audit log`` (``--no-append`` to only print).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RESULTS = REPO / "bench" / "RESULTS.md"
HEADING = "## audit log"
PG_DEFAULT = "postgresql+psycopg://postgres@127.0.0.1:5432/pdao_audit_bench"
BATCH = 10_000

SQLS = ["SELECT district, COUNT(*) AS n, AVG(fee) AS mean FROM health.outpatient_visit "
        "WHERE visit_date >= DATE '2018-01-01' GROUP BY district",
        "SELECT DATE_TRUNC('month', admit_date) AS m, SUM(total_cost) FROM health.inpatient_stay GROUP BY 1"]
ACTIONS = [("catalog.read", "GET", "/api/v1/datasets", 200, "allow", None),
           ("queries.submit", "POST", "/api/v1/scenes/3/queries", 202, "allow", None),
           ("scene.read", "GET", "/api/v1/scenes/3", 404, "deny", "not_found"),
           ("auth.login", "POST", "/api/v1/auth/token", 401, "deny", "login_failed"),
           ("results.download", "GET", "/api/v1/results/17/download", 200, "allow", None)]


def fields(i: int) -> dict:
    """A request-like event (no cells: SQL text, ids, codes)."""
    action, method, path, status, decision, reason = ACTIONS[i % len(ACTIONS)]
    detail = {"sql": SQLS[i % 2], "mode": "dev", "epsilon": 0.5} if action == "queries.submit" else (
        {"client_request_id": f"batch-{i}"} if i % 3 == 0 else None)
    return {"request_id": uuid.UUID(int=i).hex, "actor": f"insurer_{'ab'[i % 2]}", "org": f"company_{'ab'[i % 2]}",
            "role": "applicant", "auth_method": "token", "action": action,
            "object": f"scene:{i % 40}" if "scene" in path else None, "scene_id": (i % 40) or None,
            "decision": decision, "status": status, "reason": reason, "method": method, "path": path,
            "client": "10.0.0.7", "detail": detail}


# --- databases -----------------------------------------------------------------------------------

def pg_admin(url: str, sql: str) -> None:
    import psycopg
    from sqlalchemy.engine import make_url

    u = make_url(url)
    dsn = u.set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql)


def fresh_database(backend: str, args, work: Path) -> str:  # noqa: ANN001
    from sqlalchemy.engine import make_url

    from pdao.kernel.db import migrate

    if backend == "sqlite":
        db = work / "audit-bench.db"
        for p in work.glob("audit-bench.db*"):
            p.unlink()
        url = f"sqlite:///{db}"
    else:
        url = args.pg_url
        name = make_url(url).database
        pg_admin(url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        pg_admin(url, f'CREATE DATABASE "{name}"')
    migrate(url)
    engine = make_plain(url)
    engine.dispose()
    return url


def drop_database(backend: str, url: str) -> None:
    if backend == "postgresql":
        from sqlalchemy.engine import make_url

        pg_admin(url, f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)')


def plain_table():  # noqa: ANN201
    """audit_event's shape and indexes without the chain: the baseline's table."""
    from sqlalchemy import Column, Index, MetaData, Table

    from pdao.kernel.audit import AuditEvent

    md = MetaData()
    cols = [Column(c.name, c.type, primary_key=c.primary_key, nullable=c.nullable)
            for c in AuditEvent.__table__.columns if c.name not in ("prev_hash", "hash")]
    t = Table("bench_plain_event", md, *cols)
    for name in ("at", "actor", "org", "action", "scene_id", "decision"):
        Index(f"ix_bench_plain_{name}", t.c[name])
    return t


def make_plain(url: str):  # noqa: ANN201
    from pdao.kernel.db import make_engine

    engine = make_engine(url)
    plain_table().metadata.create_all(engine)
    return engine


# --- (1) appends ---------------------------------------------------------------------------------

def _appender(url: str, method: str, n: int, offset: int, ready, start, out) -> None:  # noqa: ANN001
    from sqlalchemy import insert
    from sqlalchemy.orm import registry
    from sqlmodel import Session

    from pdao.kernel import audit
    from pdao.kernel.db import make_engine, utcnow

    engine = make_engine(url)
    table = plain_table()

    class Plain:  # the pre-chain record(): an ORM object added to a session, committed
        def __init__(self, **kw) -> None:  # noqa: ANN003
            for k, v in kw.items():
                setattr(self, k, v)

    registry().map_imperatively(Plain, table)

    def one(i: int) -> None:
        f = fields(offset + i)
        if method == "chain":
            audit.record(engine, **f)
        elif method == "plain":
            with engine.begin() as conn:
                conn.execute(insert(table).values(**audit.normalize(f), at=utcnow()))
        else:
            with Session(engine) as s:
                s.add(Plain(**f, at=utcnow()))
                s.commit()

    for i in range(20):  # warm up: connections, statement caches
        one(10_000_000 + i)
    ready.set()
    start.wait(120)
    t0 = time.time()
    for i in range(n):
        one(i)
    out.put((t0, time.time()))
    engine.dispose()


def run_appends(url: str, method: str, procs: int, n: int) -> float:
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    ready = [ctx.Event() for _ in range(procs)]
    ps = [ctx.Process(target=_appender, args=(url, method, n, k * n, ready[k], start, out)) for k in range(procs)]
    for p in ps:
        p.start()
    for r in ready:
        if not r.wait(120):
            raise RuntimeError("an appender did not come up")
    start.set()
    spans = [out.get(timeout=3600) for _ in ps]
    for p in ps:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"an appender failed ({p.exitcode})")
    return max(e for _, e in spans) - min(s for s, _ in spans)


# --- (2) verification ----------------------------------------------------------------------------

def bulk_chain(url: str, n: int) -> float:
    """Empty the log, then n chained events computed here and bulk-inserted; the head set. Seconds."""
    from sqlalchemy import text

    from pdao.kernel import audit
    from pdao.kernel.db import make_engine

    engine = make_engine(url)
    cols = list(audit.CHAINED_FIELDS) + ["hash"]
    t0 = time.perf_counter()
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM audit_event"))
        conn.execute(text("UPDATE audit_head SET seq = 0, hash = :h"), {"h": audit.GENESIS_HASH})
    prev = audit.GENESIS_HASH
    base = datetime(2026, 1, 1, tzinfo=UTC)
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        for lo in range(1, n + 1, BATCH):
            rows = []
            for seq in range(lo, min(lo + BATCH, n + 1)):
                rec = audit.normalize(fields(seq))
                at = base + timedelta(microseconds=seq * 1537)
                rec.update(seq=seq, prev_hash=prev, at=audit.format_at(at))
                prev = audit.event_hash(rec)
                detail = None if rec["detail"] is None else json.dumps(rec["detail"])
                stored_at = at.replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f") if url.startswith("sqlite") else at
                rows.append(tuple(stored_at if c == "at" else detail if c == "detail" else prev if c == "hash"
                                  else rec[c] for c in cols))
            if url.startswith("sqlite"):
                cur.executemany(f"INSERT INTO audit_event ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                                rows)
            else:
                with cur.copy(f"COPY audit_event ({', '.join(cols)}) FROM STDIN") as cp:
                    for r in rows:
                        cp.write_row(r)
        cur.execute("UPDATE audit_head SET seq = %s, hash = %s" if not url.startswith("sqlite") else
                    "UPDATE audit_head SET seq = ?, hash = ?", (n, prev))
        raw.commit()
        if not url.startswith("sqlite"):
            cur.execute("ANALYZE audit_event")
            raw.commit()
    finally:
        raw.close()
        engine.dispose()
    return time.perf_counter() - t0


def _step(kind: str, url: str, path: str, out) -> None:  # noqa: ANN001 - a child process
    from sqlalchemy import select

    from pdao.kernel import audit
    from pdao.kernel.db import make_engine

    engine = make_engine(url)
    t0 = time.perf_counter()
    count, ok = 0, None
    if kind == "scan":
        with audit._snapshot(engine) as conn:
            cols = [audit.AuditEvent.__table__.c[f] for f in audit.CHAINED_FIELDS] + [audit.AuditEvent.__table__.c.hash]
            for _ in conn.execution_options(yield_per=audit._BATCH).execute(
                    select(*cols).order_by(audit.AuditEvent.__table__.c.seq)):
                count += 1
    elif kind == "verify":
        r = audit.verify(engine)
        count, ok = r.checked, r.ok
    elif kind == "export":
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            count = audit.export_jsonl(engine, f)
    elif kind == "json":
        with open(path, encoding="utf-8") as f:
            for line in f:
                json.loads(line)
                count += 1
        count -= 1  # the header
    elif kind == "verify_lines":
        with open(path, "rb") as f:
            r = audit.verify_lines(f)
        count, ok = r.checked, r.ok
    seconds = time.perf_counter() - t0
    engine.dispose()
    out.put((seconds, count, ok, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def run_step(kind: str, url: str, path: Path) -> tuple[float, int, bool | None, float]:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    p = ctx.Process(target=_step, args=(kind, url, str(path), out))
    p.start()
    res = out.get(timeout=7200)
    p.join()
    return res


def run_outsider(path: Path, work: Path) -> tuple[float, bool]:
    doc = (REPO / "docs" / "audit.md").read_text(encoding="utf-8")
    code = re.search(r"<!-- outsider-check:begin -->\n```python\n(.*?)```", doc, re.S).group(1)
    script = work / "check_audit.py"
    script.write_text(code, encoding="utf-8")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-I", "-S", str(script), str(path)], capture_output=True, text=True)
    return time.perf_counter() - t0, r.returncode == 0


# --- report --------------------------------------------------------------------------------------

def ratio(x: float, base: float) -> str:
    return f"{x / base:.2f}" if base else "–"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--appends", type=int, default=1_000, help="appends per process, per method and round")
    ap.add_argument("--rounds", type=int, default=3, help="append rounds (the median is reported)")
    ap.add_argument("--verify-events", type=int, default=500_000)
    ap.add_argument("--backends", nargs="+", default=["sqlite", "postgresql"], choices=["sqlite", "postgresql"])
    ap.add_argument("--pg-url", default=PG_DEFAULT, help="a scratch database: dropped and created")
    ap.add_argument("--no-append", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = ap.parse_args(argv)
    from importlib.metadata import version

    from pdao.kernel import audit

    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    append_rows, verify_rows, notes = [], [], []
    with tempfile.TemporaryDirectory(prefix="audit-bench-") as tmp:
        work = Path(tmp)
        for backend in args.backends:
            url = fresh_database(backend, args, work)
            try:
                methods = ["plain", "orm", "chain"]
                for procs in (1, 2):
                    rates: dict[str, list[float]] = {m: [] for m in methods}
                    for r in range(args.rounds):  # rotated order: drifting load hits every method alike
                        for method in methods[r % 3:] + methods[:r % 3]:
                            secs = run_appends(url, method, procs, args.appends)
                            rates[method].append(procs * args.appends / secs)
                            print(backend, procs, method, f"{rates[method][-1]:,.0f}/s", flush=True)
                    base = statistics.median(rates["plain"])
                    for method in methods:
                        med = statistics.median(rates[method])
                        append_rows.append((backend, procs, method, procs * args.appends, min(rates[method]),
                                            med, max(rates[method]), med / base))
                report = audit.verify(_engine(url))
                if not report.ok:
                    raise SystemExit(f"{backend}: the chain is broken after the append runs: {report}")
                notes.append(f"{backend}: chain intact after the append runs ({report.checked:,} events)")

                n = args.verify_events
                gen = bulk_chain(url, n)
                verify_rows.append((backend, n, "generate + bulk insert (chain computed in Python)", gen, None, None,
                                    None))
                print(verify_rows[-1], flush=True)
                path = work / f"export-{backend}.jsonl"
                secs_of: dict[str, float] = {}
                baseline_of = {"scan": "scan", "verify": "scan", "json": "json", "verify_lines": "json",
                               "outsider": "json"}
                for kind in ("scan", "verify", "export", "json", "verify_lines", "outsider"):
                    if kind == "outsider":
                        secs, ok = run_outsider(path, work)
                        count, rss = (n if ok else -1), None
                    else:
                        secs, count, ok, rss = run_step(kind, url, path)
                    if count != n or ok is False:
                        raise SystemExit(f"{backend} {kind}: {count} events, ok={ok}")
                    secs_of[kind] = secs
                    rel = ratio(secs, secs_of[baseline_of[kind]]) if kind in baseline_of else None
                    verify_rows.append((backend, n, kind, secs, rss, ok, rel))
                    print(verify_rows[-1], flush=True)
                notes.append(f"{backend}: the export of {n:,} events is {path.stat().st_size / 1e6:,.0f} MB")
            finally:
                _dispose()
                drop_database(backend, url)
    wall = time.perf_counter() - started
    load_after = os.getloadavg()[0]

    labels = {"plain": "plain insert (baseline)", "orm": "ORM insert (the pre-chain `record`)",
              "chain": "`audit.record` (chained)"}
    t1 = ["| backend | processes | method | appends a round | appends/s (median) | range | × baseline |",
          "|---|---:|---|---:|---:|---|---:|"]
    for backend, procs, method, total, lo, med, hi, rel in append_rows:
        t1.append(f"| {backend} | {procs} | {labels[method]} | {total:,} | {med:,.0f} | {lo:,.0f}–{hi:,.0f} | "
                  f"{rel:.2f} |")
    steplabels = {"scan": "scan (baseline: same streamed SELECT, no hashing)", "verify": "`audit.verify` (database)",
                  "export": "`audit.export_jsonl` (to a file)", "json": "read + `json.loads` each line (baseline)",
                  "verify_lines": "`audit.verify_lines` (the file)",
                  "outsider": "docs/audit.md snippet (`python -I -S`)"}
    t2 = ["| backend | events | step | seconds | events/s | s per 1M events | peak RSS MB | × baseline |",
          "|---|---:|---|---:|---:|---:|---:|---:|"]
    for backend, n, kind, secs, rss, _ok, rel in verify_rows:
        t2.append(f"| {backend} | {n:,} | {steplabels.get(kind, kind)} | {secs:.1f} | {n / secs:,.0f} | "
                  f"{secs * 1e6 / n:.1f} | {f'{rss:,.0f}' if rss else '–'} | {rel or '–'} |")
    cmd = "python " + " ".join(shlex.quote(a) for a in ["bench/audit_bench.py", *(sys.argv[1:] if argv is None else argv)])
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    pg = ""
    if "postgresql" in args.backends:
        pg = f", PostgreSQL {_pg_version(args.pg_url)}"
    block = "\n".join([
        f"### {now}",
        "",
        f"Command: `{cmd}`. Machine: {os.cpu_count()} CPUs, {platform.system()} {platform.machine()}, Python "
        f"{platform.python_version()}, SQLAlchemy {version('sqlalchemy')}, psycopg {version('psycopg')}, SQLite "
        f"{_sqlite_version()}{pg} (both local; SQLite in WAL mode with synchronous=FULL as `pdao.kernel.db.make_engine` "
        f"sets it, PostgreSQL with its default synchronous_commit=on: every append is a durable commit). "
        f"Load average (1 min) {load_before:.1f} before, {load_after:.1f} after; whole run {wall:.0f} s.",
        "",
        f"Appends, one event per transaction (as the request middleware writes them), from 1 and 2 processes "
        f"started together, each with its own engine; {args.rounds} rounds in rotated order, the median and range "
        f"of appends/s; × baseline is the median over the plain insert's with the same backend and processes.",
        "",
        *t1,
        "",
        "Verification: the log filled with chained events computed in Python and bulk-inserted; each step then ran "
        "in a fresh child process (wall time, peak RSS of that child). × baseline: the database steps over the "
        "plain scan, the file steps over reading and parsing the same file.",
        "",
        *t2,
        "",
        "; ".join(notes) + ".",
        "",
    ])
    print(block)
    if not args.no_append:
        append_results(block)
        print(f"\nappended to {os.path.relpath(RESULTS, Path.cwd())}")
    return 0


_ENGINES: list = []


def _engine(url: str):  # noqa: ANN202
    from pdao.kernel.db import make_engine

    e = make_engine(url)
    _ENGINES.append(e)
    return e


def _dispose() -> None:
    while _ENGINES:
        _ENGINES.pop().dispose()


def _sqlite_version() -> str:
    import sqlite3

    return sqlite3.sqlite_version


def _pg_version(url: str) -> str:
    from sqlalchemy import text

    try:
        from pdao.kernel.db import make_engine

        e = make_engine(url.rsplit("/", 1)[0] + "/postgres")
        with e.connect() as c:
            v = c.execute(text("SHOW server_version")).scalar()
        e.dispose()
        return v.split()[0]
    except Exception:  # noqa: BLE001
        return "?"


def append_results(block: str) -> None:
    """Append ``block`` under ``## audit log`` (added at the end if the file's last heading is
    another one). Nothing above is rewritten."""
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else "# Benchmarks\n"
    headings = [ln for ln in text.splitlines() if ln.startswith("## ")]
    addition = "" if headings and headings[-1].strip() == HEADING else f"\n{HEADING}\n"
    with RESULTS.open("a", encoding="utf-8") as f:
        if not text.endswith("\n"):
            f.write("\n")
        f.write(addition + "\n" + block + "\n")


if __name__ == "__main__":
    sys.exit(main())
