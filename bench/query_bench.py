"""Benchmark of the query engine (issue 4): DP COUNT/SUM/AVG by district and by month.

    python bench/query_bench.py --scales 10000000 100000000 [--runs 3] [--skip-peers]

For each scale (outpatient visit rows), the bench makes the data once and then runs every query
step in a fresh child process; the parent measures each child's wall time and peak resident set
size (``ru_maxrss`` of that one child, from ``os.wait4``), and each child times its own query
(what the table's "query s" is: the process start and imports are not in it):

(a) ``generate``  — ``sandbox.synth.generate(dir, scale, seed)`` (the other four files are dropped);
(b) ``load``      — ``sandbox.engine.store.load_version`` of the visit file through the real store path:
                    a temporary ``PDAO_HOME`` under bench/.data with a SQLite catalog, the packaged
                    descriptors imported. It writes the snapshot the engine reads: the descriptor's
                    columns plus ``__pdao_rank`` (each row's rank within its person), sorted by person,
                    rank. The rank is computed once here, so its cost is reported beside the queries.

Then, for each query — ``COUNT(*), SUM(fee), AVG(fee)`` ``GROUP BY district``, and the same
``GROUP BY DATE_TRUNC('month', visit_date)`` — on that one snapshot file:

(c) ``raw duckdb`` — the baseline: the same exact query in plain DuckDB on the snapshot (2 threads,
                    the engine's memory limit): no bounding, no clamping, no noise;
(d) ``engine``     — ``sandbox.engine.sql.check_query`` + ``sandbox.engine.execute.run`` at ε = 1 and 10
                    contributions per person (2 threads): rank filter, clamped cents, every cell of
                    the public domain, OpenDP noise. Each answer is checked afterwards (outside the
                    timed child) against the exact bounded aggregates: how many cells' noisy COUNT,
                    SUM and AVG fall within the error95 the answer reports;
(e) ``opendp context`` — OpenDP's Polars ``dp.Context`` on a ``scan_parquet`` of the snapshot:
                    privacy unit = person (``identifier="person_id"``), ``truncate_per_group(10)``,
                    ``dp.len()``, ``fee.dp.sum``, ``fee.dp.mean`` over bounds [0, 5000], public keys
                    (``with_keys``), ε = 1 for the one query (POLARS_MAX_THREADS=2);
(f) ``smartnoise sql`` — ``snsql`` 1.0.10 in its own venv (bench/.peers-venv, made on first use from
                    bench/peers-requirements.txt; it pins opendp 0.14.2), run as a child that reads
                    the snapshot with pandas, loads it into SmartNoise's SQLite (``from_df``) and runs
                    the query with ``max_ids`` = 10, ε = 1, δ = 0 (bench/peers/snsql_query.py).

Each step runs ``--runs`` times (median and range shown) unless its first run took longer than
``--cheap-seconds``. A step that exceeds ``--timeout`` seconds or ``--max-rss-gb`` resident memory is
killed and shown as such; a peer whose run at a smaller scale, scaled with the rows, projects past
twice those limits is not started at the larger one (the table says why; ``--no-projection`` runs
it anyway). The Markdown table (ratios to the raw DuckDB baseline) is printed and
appended with the command, the date and the machine to bench/RESULTS.md under
``## query engine`` (``--no-append`` to only print). Data live under bench/.data (git-ignored);
``--reuse-data`` keeps them between runs and skips (a) and (b) when a snapshot of the same scale
and seed is there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "RESULTS.md"
HEADING = "## query engine"
DATA = REPO / "bench" / ".data"
PEERS_VENV = REPO / "bench" / ".peers-venv"
PEERS_REQUIREMENTS = REPO / "bench" / "peers-requirements.txt"
DESCRIPTOR = REPO / "catalog" / "descriptors" / "health.outpatient_visit.yaml"
CODE = "health.outpatient_visit"

EPSILON = 1.0
K = 10                     # contributions per person
THREADS = 2
MEMORY_LIMIT = "4GB"
FEE_BOUNDS = (0.0, 5000.0)

KEYS = {
    "district": ("district", "district", "district"),
    "month": ("DATE_TRUNC('month', visit_date)", "month", "DATE_TRUNC('month', visit_date)"),
}


def engine_sql(key: str) -> str:
    expr, alias, group = KEYS[key]
    return (f"SELECT {expr} AS {alias}, COUNT(*) AS n, SUM(fee) AS total, AVG(fee) AS mean "
            f"FROM {CODE} GROUP BY {group}")


def raw_sql(key: str, snapshot: str) -> str:
    expr, alias, group = KEYS[key]
    if key == "month":   # the same key type as the engine's answer
        expr = group = "CAST(DATE_TRUNC('month', visit_date) AS DATE)"
    path = snapshot.replace("'", "''")
    return (f"SELECT {expr} AS {alias}, COUNT(*) AS n, SUM(fee) AS total, AVG(fee) AS mean "
            f"FROM read_parquet('{path}') GROUP BY {group}")


# =============================================================================================
# Children: each prints one JSON line last (its own timings), and nothing else matters


def _rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_generate(a: dict) -> dict:
    from sandbox.synth import generate

    t0 = time.perf_counter()
    paths = generate(Path(a["out"]), a["scale"], a["seed"])
    seconds = time.perf_counter() - t0
    import pyarrow.parquet as pq

    visits = paths[CODE]
    for code, p in paths.items():
        if code != CODE:
            Path(p).unlink(missing_ok=True)
    return {"seconds": seconds, "path": str(visits), "rows": pq.read_metadata(visits).num_rows,
            "bytes": Path(visits).stat().st_size}


def child_load(a: dict) -> dict:
    from pdao.cli.demo import import_catalog, prepare_home
    from pdao.kernel.config import Settings
    from pdao.kernel.db import session_scope
    from sandbox.engine.store import load_version, snapshot_path

    settings = Settings.from_env()
    engine = prepare_home(settings)
    import_catalog(engine)
    base = _rss_mb()
    t0 = time.perf_counter()
    with session_scope(engine) as session:
        version, report = load_version(session, settings, CODE, Path(a["src"]), env="prod", source="bench")
        path = snapshot_path(settings, version)
        rows = version.row_count
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "base_mb": base, "snapshot": str(path), "rows": rows,
            "bytes": path.stat().st_size, "warnings": [w["message"] for w in report.warnings]}


def child_raw(a: dict) -> dict:
    import duckdb
    import pyarrow  # noqa: F401  (imported by the engine's module too: neither pays it in the timed part)

    base = _rss_mb()
    t0 = time.perf_counter()
    con = duckdb.connect(config={"threads": THREADS, "memory_limit": MEMORY_LIMIT})
    table = con.sql(raw_sql(a["key"], a["snapshot"])).to_arrow_table()
    con.close()
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "base_mb": base, "groups": table.num_rows}


def _descriptor():
    import yaml

    from catalog.descriptor import DatasetDescriptor

    with DESCRIPTOR.open(encoding="utf-8") as f:
        return DatasetDescriptor.model_validate(yaml.safe_load(f))


def child_engine(a: dict) -> dict:
    from sandbox.engine.execute import DatasetMeta, Execution, run
    from sandbox.engine.sql import check_query

    d = _descriptor()
    snapshot = Path(a["snapshot"])
    base = _rss_mb()
    t0 = time.perf_counter()
    meta = DatasetMeta.from_fields(d.code, d.privacy_unit, d.fields, a["rows"])
    grants = {(d.code, f.name): ["aggregate", "group_by", "filter"] for f in d.fields}
    checked = check_query(engine_sql(a["key"]), grants, [meta.info()])
    answer = run(Execution(checked, meta, snapshot, epsilon=EPSILON, max_contributions=K, threads=THREADS,
                           memory_limit=MEMORY_LIMIT))
    seconds = time.perf_counter() - t0
    table = answer.table.to_pydict()
    key = KEYS[a["key"]][1]
    return {"seconds": seconds, "base_mb": base, "groups": answer.table.num_rows, "epsilon_spent": answer.epsilon_spent,
            "keys": [str(v) for v in table[key]], "n": table["n"], "total": table["total"], "mean": table["mean"],
            "mean_error95": table["mean_error95"],
            "error95": {alias: answer.noise[alias]["error95"] for alias in ("n", "total")}}


def child_context(a: dict) -> dict:
    import datetime as dt
    import warnings

    import opendp.prelude as dp
    import polars as pl

    dp.enable_features("contrib")
    key = a["key"]
    lf = pl.scan_parquet(a["snapshot"]).select("person_id", "district", "visit_date",
                                               pl.col("fee").cast(pl.Float64))
    if key == "month":
        lf = lf.with_columns(month=pl.col("visit_date").dt.truncate("1mo")).drop("visit_date")
        d = _descriptor()
        lo, hi = (dt.date.fromisoformat(str(b)) for b in
                  (next(f for f in d.fields if f.name == "visit_date").bounds.model_dump().values()))
        keys = [dt.date(y, m, 1) for y in range(lo.year, hi.year + 1) for m in range(1, 13)
                if (lo.year, lo.month) <= (y, m) <= (hi.year, hi.month)]
        domain = pl.LazyFrame({"month": keys}, schema={"month": pl.Date})
    else:
        lf = lf.drop("visit_date")
        d = _descriptor()
        keys = list(next(f for f in d.fields if f.name == "district").domain)
        domain = pl.LazyFrame({"district": keys})
    base = _rss_mb()
    t0 = time.perf_counter()
    ctx = dp.Context.compositor(
        data=lf,
        privacy_unit=dp.unit_of(contributions=1, identifier="person_id"),
        privacy_loss=dp.loss_of(epsilon=EPSILON),
        split_evenly_over=1,
        margins=[dp.polars.Margin(by=[key], max_length=a["rows"], max_groups=len(keys))],
    )
    fee = pl.col("fee")
    query = (ctx.query().truncate_per_group(K).group_by(key)
             .agg(dp.len(), fee.fill_null(0.0).dp.sum(FEE_BOUNDS).alias("total"),
                  fee.fill_null(0.0).dp.mean(FEE_BOUNDS).alias("mean"))
             .with_keys(domain))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = query.release().collect()
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "base_mb": base, "groups": out.height}


CHILDREN = {"generate": child_generate, "load": child_load, "raw": child_raw, "engine": child_engine,
            "context": child_context}


def child_main(step: str, payload: str) -> int:
    sys.path.insert(0, str(REPO))
    result = CHILDREN[step](json.loads(payload))
    print(json.dumps(result, default=str))
    return 0


# =============================================================================================
# The parent


@dataclass
class Run:
    seconds: float | None          # the child's own timing of its step
    wall: float                    # the child's wall time
    peak_mb: float                 # ru_maxrss of the child
    result: dict[str, Any]
    failure: str = ""


@dataclass
class Row:
    scale: int
    query: str
    method: str
    runs: list[Run] = field(default_factory=list)
    note: str = ""

    def ok(self) -> list[Run]:
        return [r for r in self.runs if r.seconds is not None]

    @property
    def seconds(self) -> float | None:
        ok = self.ok()
        return statistics.median(r.seconds for r in ok) if ok else None

    @property
    def wall(self) -> float | None:
        ok = self.ok()
        return statistics.median(r.wall for r in ok) if ok else None

    @property
    def peak_mb(self) -> float | None:
        ok = self.ok() or self.runs
        return max(r.peak_mb for r in ok) if ok else None


def run_child(argv: list[str], *, env: dict[str, str] | None, timeout: float, max_rss_mb: float) -> Run:
    """Run ``argv`` as a child; its last stdout line is its JSON result. Killed past the timeout or
    the RSS ceiling (polled from /proc)."""
    out = tempfile.TemporaryFile(mode="w+")
    err = tempfile.TemporaryFile(mode="w+")
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=err, text=True)
    killed = ""
    high = 0.0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        rss = _proc_rss_mb(proc.pid)
        high = max(high, rss)
        if time.perf_counter() - start > timeout:
            killed = f"killed after {timeout:.0f} s (time limit)"
        elif rss > max_rss_mb:
            killed = f"killed at {rss / 1024:.1f} GB resident (memory limit {max_rss_mb / 1024:.0f} GB)"
        if killed:
            proc.kill()
            pid, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.05)
    wall = time.perf_counter() - start
    proc.returncode = -9 if killed else os.waitstatus_to_exitcode(status)
    out.seek(0)
    err.seek(0)
    text, errors = out.read(), err.read()
    out.close()
    err.close()
    peak = max(usage.ru_maxrss / 1024, high)
    if killed:
        return Run(None, wall, peak, {}, killed)
    if proc.returncode != 0:
        tail = (errors.strip() or text.strip()).splitlines()[-1:] or ["?"]
        return Run(None, wall, peak, {}, f"failed ({proc.returncode}): {tail[0][:200]}")
    try:
        result = json.loads(text.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return Run(None, wall, peak, {}, f"no result: {text.strip()[-200:]}")
    return Run(result.get("seconds"), wall, peak, result)


def _proc_rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def child_argv(step: str, payload: dict) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--child", step, json.dumps(payload)]


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, **extra)
    env.pop("PDAO_DATABASE_URL", None)
    return env


def ensure_peers_venv() -> tuple[Path | None, str]:
    """bench/.peers-venv with SmartNoise SQL, made on first use."""
    py = PEERS_VENV / "bin" / "python"
    stamp = PEERS_VENV / ".installed"
    if py.exists() and stamp.exists() and stamp.stat().st_mtime >= PEERS_REQUIREMENTS.stat().st_mtime:
        return py, ""
    base = shutil.which("python3.11") or sys.executable
    try:
        if not py.exists():
            subprocess.run([base, "-m", "venv", str(PEERS_VENV)], check=True, capture_output=True, timeout=300)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "-r", str(PEERS_REQUIREMENTS)], check=True,
                       capture_output=True, text=True, timeout=1200)
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        return None, f"the peers venv could not be made: {str(detail).strip()[-200:]}"
    stamp.touch()
    return py, ""


def exact_bounded(snapshot: str, key: str) -> dict[str, tuple[int, float, int]]:
    """key -> (rows kept by the bound, clamped fee sum, non-null fees kept): what the engine noises."""
    import duckdb

    expr = "district" if key == "district" else "CAST(DATE_TRUNC('month', visit_date) AS DATE)"
    lo, hi = FEE_BOUNDS
    path = snapshot.replace("'", "''")
    con = duckdb.connect(config={"threads": THREADS, "memory_limit": MEMORY_LIMIT})
    rows = con.execute(
        f"SELECT CAST({expr} AS VARCHAR), count(*), sum(least(greatest(fee, {lo}), {hi})), count(fee) "
        f"FROM read_parquet('{path}') WHERE __pdao_rank <= {K} GROUP BY 1").fetchall()
    con.close()
    return {r[0]: (r[1], float(r[2] or 0), r[3]) for r in rows}


def total_rows(snapshot: str) -> int:
    import duckdb

    con = duckdb.connect()
    n = con.execute(f"SELECT count(*) FROM read_parquet('{snapshot.replace(chr(39), chr(39) * 2)}')").fetchone()[0]
    con.close()
    return n


def check_engine(run: Run, exact: dict[str, tuple[int, float, int]]) -> str:
    """How many cells' noisy values fall within the reported error95 of the exact bounded ones."""
    r = run.result
    within = {"count": 0, "sum": 0, "avg": 0}
    cells = len(r["keys"])
    avg_cells = 0
    for i, k in enumerate(r["keys"]):
        n, total, m = exact.get(k, (0, 0.0, 0))
        within["count"] += abs(r["n"][i] - n) <= r["error95"]["n"]
        within["sum"] += abs(r["total"][i] - total) <= r["error95"]["total"] + 1e-9
        if m:
            avg_cells += 1
            within["avg"] += r["mean"][i] is not None and abs(r["mean"][i] - total / m) <= r["mean_error95"][i] + 1e-9
    return (f"within error95: COUNT {within['count']}/{cells}, SUM {within['sum']}/{cells}, "
            f"AVG {within['avg']}/{avg_cells} non-empty cells; ε spent {r['epsilon_spent']:.3g}")


def measure(row: Row, argv: list[str], env: dict[str, str], args: argparse.Namespace, runs: int | None = None) -> Row:
    for i in range(runs or args.runs):
        r = run_child(argv, env=env, timeout=args.timeout, max_rss_mb=args.max_rss_gb * 1024)
        row.runs.append(r)
        if r.seconds is None:
            row.note = (row.note + "; " if row.note else "") + r.failure
            break
        if i == 0 and r.wall > args.cheap_seconds:
            break
    print(format_row(row, {}), flush=True)
    return row


def hopeless(row: Row, done: list[Row], args: argparse.Namespace) -> str:
    """Why a peer step is not run at this scale (empty: run it): at a smaller scale it was killed,
    or its time or memory, scaled with the rows, would pass twice the limits (``--no-projection``
    runs it anyway; nearer the limits it runs and is killed if it passes them)."""
    if args.no_projection:
        return ""
    before = [r for r in done if (r.query, r.method) == (row.query, row.method) and r.scale < row.scale]
    if not before:
        return ""
    prev = max(before, key=lambda r: r.scale)
    if not prev.ok():
        return f"not run: at {prev.scale:,} rows it was {prev.runs[-1].failure if prev.runs else 'not run'}"
    f = row.scale / prev.scale
    wall, mb = prev.runs[0].wall * f, prev.peak_mb * f
    if mb > 2 * args.max_rss_gb * 1024 or wall > 2 * args.timeout:
        return (f"not run: at {prev.scale:,} rows it took {prev.runs[0].wall:,.0f} s and {prev.peak_mb / 1024:.1f} GB; "
                f"×{f:g} the rows projects to ~{wall / 60:,.0f} min and ~{mb / 1024:.0f} GB, past twice the limits "
                f"({args.timeout / 60:.0f} min, {args.max_rss_gb:g} GB)")
    return ""


def bench_scale(scale: int, args: argparse.Namespace, peers_py: Path | None, peers_note: str,
                done: list[Row]) -> list[Row]:
    rows: list[Row] = []
    work = args.datadir / f"{scale}-seed{args.seed}"
    marker = work / "snapshot.json"
    if args.reuse_data and marker.exists() and Path(json.loads(marker.read_text())["snapshot"]).exists():
        info = json.loads(marker.read_text())
        for kept in info.get("rows_made", []):   # how long making them took, when they were made
            row = Row(scale, "–", kept["method"], [Run(kept["seconds"], kept["wall"], kept["peak_mb"], {})],
                      kept["note"] + f" (measured when the data were made, {kept['when']})")
            rows.append(row)
            print(format_row(row, {}), flush=True)
    else:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        gen = measure(Row(scale, "–", "generate"), child_argv("generate", {"out": str(work / "synth"), "scale": scale,
                                                                          "seed": args.seed}),
                      child_env(), args, runs=1)
        rows.append(gen)
        if gen.seconds is None:
            return rows
        g = gen.runs[0].result
        gen.note = f"{g['rows']:,} visit rows, {g['bytes'] / 2**20:,.0f} MB Parquet"
        home = work / "home"
        load = measure(Row(scale, "–", "load (store)"), child_argv("load", {"src": g["path"]}),
                       child_env(PDAO_HOME=str(home)), args, runs=1)
        rows.append(load)
        if load.seconds is None:
            return rows
        info = load.runs[0].result
        load.note = (f"check + rank + sort + zstd Parquet: {info['bytes'] / 2**20:,.0f} MB snapshot; "
                     "SQLite catalog")
        shutil.rmtree(work / "synth", ignore_errors=True)
        when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        info["rows_made"] = [{"method": r.method, "seconds": r.seconds, "wall": r.wall, "peak_mb": r.peak_mb,
                              "note": r.note, "when": when} for r in (gen, load)]
        marker.write_text(json.dumps(info))
    snapshot, n_rows = info["snapshot"], info["rows"]

    for key in ("district", "month"):
        exact = exact_bounded(snapshot, key)
        kept = sum(v[0] for v in exact.values())
        payload = {"snapshot": snapshot, "key": key, "rows": n_rows}
        raw = measure(Row(scale, key, "raw duckdb"), child_argv("raw", payload), child_env(), args)
        raw.note = "exact, unbounded: the baseline"
        rows.append(raw)
        eng = measure(Row(scale, key, "engine"), child_argv("engine", payload), child_env(), args)
        if eng.ok():
            eng.note = (check_engine(eng.ok()[0], exact) + f"; k = {K} keeps {kept / n_rows:.0%} of rows"
                        + (f"; {eng.note}" if eng.note else ""))
        rows.append(eng)
        if args.skip_peers:
            continue
        ctx = Row(scale, key, "opendp context")
        if skip := hopeless(ctx, done, args):
            ctx.note = skip
            print(format_row(ctx, {}), flush=True)
        else:
            measure(ctx, child_argv("context", payload), child_env(POLARS_MAX_THREADS=str(THREADS)), args)
        if ctx.ok():
            ctx.note = "polars 1.36.1 lazy scan; truncate_per_group(10) samples each person's rows" + \
                (f"; {ctx.note}" if ctx.note else "")
        rows.append(ctx)
        sn = Row(scale, key, "smartnoise sql")
        if peers_py is None:
            sn.note = peers_note
            rows.append(sn)
            continue
        argv = [str(peers_py), str(REPO / "bench" / "peers" / "snsql_query.py"), snapshot, key, str(EPSILON), str(K),
                str(n_rows)]
        if skip := hopeless(sn, done, args):
            sn.note = skip
            print(format_row(sn, {}), flush=True)
        else:
            measure(sn, argv, child_env(OMP_NUM_THREADS=str(THREADS)), args)
        if sn.ok():
            r = sn.ok()[0].result
            sn.note = (f"pandas read {r['read_seconds']:.1f} s + SQLite load {r['load_seconds']:.1f} s + "
                       f"DP query {r['dp_seconds']:.1f} s (first run); "
                       + ("month as a YYYYMM column added on read; " if key == "month" else "")
                       + f"{r['groups']} groups (those present)" + (f"; {sn.note}" if sn.note else ""))
        rows.append(sn)
    return rows


def _fmt(v: float | None, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def format_row(r: Row, base: dict[tuple[int, str], Row]) -> str:
    b = base.get((r.scale, r.query))
    ratio = _fmt(r.seconds / b.seconds, ".2f") if b and b.seconds and r.seconds is not None else "–"
    ratio_mb = _fmt(r.peak_mb / b.peak_mb, ".1f") if b and b.peak_mb and r.peak_mb and r.seconds is not None else "–"
    n_ok = len(r.ok())
    runs = f"{n_ok}" if n_ok == len(r.runs) else f"{n_ok}/{len(r.runs)}"
    spec = ".3f" if r.seconds is not None and r.seconds < 10 else ".1f"
    secs = _fmt(r.seconds, spec)
    if n_ok > 1:
        secs += f" ({min(x.seconds for x in r.ok()):{spec}}–{max(x.seconds for x in r.ok()):{spec}})"
    return (f"| {r.scale:,} | {r.query} | {r.method} | {runs} | {secs} | {ratio} | {_fmt(r.wall, '.1f')} | "
            f"{_fmt(r.peak_mb, ',.0f')} | {ratio_mb} | {r.note} |")


def table(rows: list[Row]) -> str:
    base = {(r.scale, r.query): r for r in rows if r.method == "raw duckdb"}
    lines = ["| visit rows | group by | method | runs | query s: median (min–max) | × raw | child s | peak MB | × raw RSS | note |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|---|"]
    lines += [format_row(r, base) for r in rows]
    return "\n".join(lines)


def machine() -> str:
    from importlib.metadata import version

    mem = ""
    try:
        with open("/proc/meminfo") as f:
            mem = f", {int(f.readline().split()[1]) / 2**20:.0f} GB RAM"
    except OSError:
        pass
    libs = ", ".join(f"{p} {version(p)}" for p in ("duckdb", "pyarrow", "opendp", "polars", "sqlglot"))
    return f"{os.cpu_count()} CPUs{mem}, {platform.system()} {platform.machine()}, Python {platform.python_version()}, {libs}"


def commit() -> str:
    """The commit the engine ran at, and whether sandbox/ differed from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "sandbox"], cwd=REPO, capture_output=True,
                               text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    if not head:
        return ""
    return f" at commit {head}" + (" (sandbox/ had uncommitted changes)" if dirty else "")


def append_results(block: str) -> None:
    """Append ``block`` under ``## query engine`` (added unless the file's last section is ours)."""
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else "# Benchmarks\n"
    headings = [ln for ln in text.splitlines() if ln.startswith("## ")]
    addition = "" if headings and headings[-1].strip() == HEADING else f"\n{HEADING}\n"
    if not text.endswith("\n"):
        text += "\n"
    RESULTS.write_text(text + addition + "\n" + block + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child_main(argv[1], argv[2])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scales", type=int, nargs="+", default=[10_000_000, 100_000_000], help="visit rows")
    ap.add_argument("--runs", type=int, default=3, help="runs per query step (median shown)")
    ap.add_argument("--skip-peers", action="store_true", help="no OpenDP Context, no SmartNoise SQL")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per child")
    ap.add_argument("--max-rss-gb", type=float, default=12, help="a child above this resident size is killed")
    ap.add_argument("--no-projection", action="store_true",
                    help="run peers even when a smaller scale projects them past --timeout or --max-rss-gb")
    ap.add_argument("--cheap-seconds", type=float, default=120,
                    help="a step whose first run took longer runs once")
    ap.add_argument("--datadir", type=Path, default=DATA)
    ap.add_argument("--reuse-data", action="store_true", help="keep the data and reuse a snapshot already there")
    ap.add_argument("--no-append", action="store_true", help="print only; leave bench/RESULTS.md alone")
    ap.add_argument("--note", default="", help="a line to add under the command in the results")
    args = ap.parse_args(argv)
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, REPO), *argv])

    peers_py, peers_note = (None, "") if args.skip_peers else ensure_peers_venv()
    load_before = os.getloadavg()[0]
    rows: list[Row] = []
    started = time.perf_counter()
    print(table([]), flush=True)
    for scale in args.scales:
        rows += bench_scale(scale, args, peers_py, peers_note, rows)
        if not args.reuse_data:
            shutil.rmtree(args.datadir / f"{scale}-seed{args.seed}", ignore_errors=True)
    elapsed = time.perf_counter() - started

    now = datetime.now(timezone.utc).astimezone().strftime("%Y-%m-%d %H:%M %Z")
    block = "\n".join([
        f"### {now}",
        "",
        f"Command: `{command}` (seed {args.seed}){commit()}. Machine: {machine()}.",
        *([args.note] if args.note else []),
        f"ε = {EPSILON:g}, {K} contributions per person, {THREADS} threads (DuckDB `threads`, POLARS_MAX_THREADS), "
        f"DuckDB memory limit {MEMORY_LIMIT}. Queries: `{engine_sql('district')}`, and the same grouped by "
        "`DATE_TRUNC('month', visit_date)` (144 public months, 2015–2026), on the one snapshot the store wrote. "
        "Each step ran in a fresh child process: 'query s' is the child's own timing of the query (median and "
        "range of the runs; process start and imports excluded), 'child s' the child's wall time, 'peak MB' its "
        "`ru_maxrss`; ratios are to the raw DuckDB query on the same snapshot. "
        f"Load average (1 min) {load_before:.1f} before, {os.getloadavg()[0]:.1f} after; whole run {elapsed / 60:.0f} min.",
        "",
        table(rows),
    ])
    print()
    print(block)
    if not args.no_append:
        append_results(block)
        print(f"\nappended to {os.path.relpath(RESULTS, Path.cwd())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
