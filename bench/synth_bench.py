"""Benchmark of the synthetic data generator (`sandbox.synth.generate`) and of `pdao synth`.

    python bench/synth_bench.py --scales 1000000 10000000

For each scale, each step runs in a fresh child process, and the parent measures its wall time and
its peak resident set size (``ru_maxrss`` of that one child, from ``os.wait4``):

(a) ``generate``      — ``sandbox.synth.generate(dir, scale, seed)``: the five Parquet files;
(b) ``duckdb``        — the baseline: DuckDB (all cores) writing, with ``COPY (SELECT … FROM range(n))
                        TO '….parquet'``, random data with the same row count and the same column
                        types as each of the five files (a) wrote, zstd-compressed like them;
(c) ``pdao synth``    — the full command ``python -m pdao synth --scale N --seed S`` on a fresh
                        temporary ``PDAO_HOME``: generate production data and its dev twin and load
                        both as catalog versions. Skipped, with a note, when ``python -m pdao``
                        cannot be run.

It prints a Markdown table and appends it, with the exact command line, the date and the machine, to
``bench/RESULTS.md`` under the heading ``## pdao synth`` (``--no-append`` to only print).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "RESULTS.md"
HEADING = "## pdao synth"


@dataclass
class Step:
    scale: int
    step: str
    seconds: float | None
    peak_mb: float | None
    visit_rows: int | None = None
    note: str = ""


def run_child(argv: list[str], *, env: dict[str, str] | None = None, timeout: float) -> tuple[float, float, int, str]:
    """Run ``argv`` as a child; answer (wall seconds, peak RSS MB of that child, exit status, output)."""
    out = tempfile.TemporaryFile(mode="w+")
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    deadline = start + timeout
    timed_out = False
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            proc.kill()
            timed_out = True
            pid, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.02)
    seconds = time.perf_counter() - start
    rc = -9 if timed_out else os.waitstatus_to_exitcode(status)
    proc.returncode = rc  # reaped by wait4 above; tell Popen so it does not wait again
    out.seek(0)
    text = out.read()
    out.close()
    return seconds, usage.ru_maxrss / 1024, rc, text  # Linux ru_maxrss is in kilobytes


def _python_code(body: str) -> list[str]:
    return [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(REPO)!r})\n{body}"]


def bench_generate(scale: int, seed: int, work: Path, timeout: float) -> tuple[Step, dict]:
    out = work / "generate"
    code = (
        "import json\n"
        "from sandbox.synth import generate\n"
        f"paths = generate({str(out)!r}, {scale}, {seed})\n"
        "print(json.dumps({c: str(p) for c, p in paths.items()}))\n"
    )
    seconds, mb, rc, text = run_child(_python_code(code), timeout=timeout)
    if rc != 0:
        return Step(scale, "generate", None, mb, note=f"failed ({rc}): {text.strip()[-300:]}"), {}
    import pyarrow.parquet as pq

    paths = json.loads(text.strip().splitlines()[-1])
    shapes = {}
    for c, p in paths.items():
        md = pq.read_metadata(p)
        schema = pq.read_schema(p)
        shapes[c] = {"rows": md.num_rows, "types": [str(f.type) for f in schema], "bytes": Path(p).stat().st_size}
    visits = shapes["health.outpatient_visit"]["rows"]
    total_rows = sum(s["rows"] for s in shapes.values())
    total_mb = sum(s["bytes"] for s in shapes.values()) / 2**20
    step = Step(scale, "generate", seconds, mb, visits, note=f"{total_rows:,} rows in 5 files, {total_mb:,.0f} MB")
    return step, shapes


_RANDOM_SQL = {
    "int64": "(random() * 1e12)::BIGINT",
    "string": "((random() * 1e15)::BIGINT)::VARCHAR",  # ~15 random digits, like an ID or phone
    "date32[day]": "DATE '2019-01-01' + (random() * 2556)::INTEGER",
    "double": "round(random() * 5000, 2)",
}


def bench_duckdb(scale: int, shapes: dict, work: Path, timeout: float) -> Step:
    out = work / "duckdb"
    statements = []
    for c, s in shapes.items():
        cols = ", ".join(f"{_RANDOM_SQL[t]} AS c{i}" for i, t in enumerate(s["types"]))
        target = out / f"{c}.parquet"
        statements.append(
            f"COPY (SELECT {cols} FROM range({s['rows']})) TO '{target}' (FORMAT parquet, COMPRESSION zstd)"
        )
    code = (
        "import duckdb, os\n"
        f"os.makedirs({str(out)!r}, exist_ok=True)\n"
        "con = duckdb.connect()\n"
        "con.execute('SET enable_progress_bar = false')\n"
        f"for q in {statements!r}:\n"
        "    con.execute(q)\n"
    )
    seconds, mb, rc, text = run_child(_python_code(code), timeout=timeout)
    if rc != 0:
        return Step(scale, "duckdb baseline", None, mb, note=f"failed ({rc}): {text.strip()[-300:]}")
    visits = shapes["health.outpatient_visit"]["rows"]
    return Step(scale, "duckdb baseline", seconds, mb, visits, note="same rows × column types, random values")


def pdao_available() -> tuple[bool, str]:
    probe = [sys.executable, "-m", "pdao", "--help"]
    try:
        r = subprocess.run(probe, cwd=REPO, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"`python -m pdao` could not run: {exc}"
    if r.returncode != 0 or "synth" not in r.stdout:
        return False, f"`python -m pdao --help` failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-200:]}"
    return True, ""


def bench_pdao(scale: int, seed: int, work: Path, timeout: float) -> Step:
    home = work / "pdao-home"
    env = dict(os.environ, PDAO_HOME=str(home))
    env.pop("PDAO_DATABASE_URL", None)
    argv = [sys.executable, "-m", "pdao", "synth", "--scale", str(scale), "--seed", str(seed)]
    seconds, mb, rc, text = run_child(argv, env=env, timeout=timeout)
    if rc != 0:
        why = "timed out" if rc == -9 else f"failed ({rc})"
        return Step(scale, "pdao synth", None, mb, note=f"{why}: {text.strip()[-300:]}")
    visits = None
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] == "health.outpatient_visit" and "prod" in parts:
            visits = int(parts[-2].replace(",", ""))
    return Step(scale, "pdao synth", seconds, mb, visits, note="prod + dev twin, generated and loaded")


def table(steps: list[Step]) -> str:
    base = {s.scale: s.seconds for s in steps if s.step == "duckdb baseline" and s.seconds}
    base_mb = {s.scale: s.peak_mb for s in steps if s.step == "duckdb baseline" and s.seconds}
    lines = [
        "| scale | step | visit rows | seconds | peak MB | × baseline time | × baseline RSS | note |",
        "|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for s in steps:
        rows = f"{s.visit_rows:,}" if s.visit_rows is not None else "–"
        secs = f"{s.seconds:.1f}" if s.seconds is not None else "–"
        peak = f"{s.peak_mb:,.0f}" if s.peak_mb is not None else "–"
        ratio = f"{s.seconds / base[s.scale]:.1f}" if s.seconds and base.get(s.scale) else "–"
        ratio_mb = f"{s.peak_mb / base_mb[s.scale]:.1f}" if s.seconds and s.peak_mb and base_mb.get(s.scale) else "–"
        lines.append(f"| {s.scale:,} | {s.step} | {rows} | {secs} | {peak} | {ratio} | {ratio_mb} | {s.note} |")
    return "\n".join(lines)


def machine() -> str:
    import duckdb
    import numpy
    import pyarrow

    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
        mem = f", {kb / 2**20:.0f} GB RAM"
    except OSError:
        pass
    return (
        f"{os.cpu_count()} CPUs{mem}, {platform.system()} {platform.machine()}, Python {platform.python_version()}, "
        f"numpy {numpy.__version__}, pyarrow {pyarrow.__version__}, duckdb {duckdb.__version__}"
    )


def append_results(block: str) -> None:
    """Append ``block`` to bench/RESULTS.md under ``## pdao synth`` (created if missing). Nothing
    already in the file is changed: a new heading is added unless the file's last section is ours."""
    exists = RESULTS.exists()
    text = RESULTS.read_text(encoding="utf-8") if exists else ""
    headings = [ln for ln in text.splitlines() if ln.startswith("## ")]
    addition = "" if headings and headings[-1].strip() == HEADING else f"\n{HEADING}\n"
    with RESULTS.open("a", encoding="utf-8") as f:
        if not exists:
            f.write("# Benchmarks\n")
        elif text and not text.endswith("\n"):
            f.write("\n")
        f.write(addition + "\n" + block + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scales", type=int, nargs="+", default=[1_000_000, 10_000_000], help="visit rows")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--skip-pdao", action="store_true", help="skip step (c), the full `pdao synth`")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per step")
    ap.add_argument("--no-append", action="store_true", help="print only; leave bench/RESULTS.md alone")
    ap.add_argument("--workdir", type=Path, default=None, help="where the scratch files go (default: a temp dir)")
    args = ap.parse_args(argv)

    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, REPO), *(argv or sys.argv[1:])])
    notes = []
    have_pdao, why = (False, "--skip-pdao given") if args.skip_pdao else pdao_available()
    if not have_pdao:
        notes.append(f"(c) `pdao synth` skipped: {why}")

    steps: list[Step] = []
    load_before = os.getloadavg()[0]
    for scale in args.scales:
        work = Path(tempfile.mkdtemp(prefix=f"synth-bench-{scale}-", dir=args.workdir))
        try:
            gen, shapes = bench_generate(scale, args.seed, work, args.timeout)
            steps.append(gen)
            print(table([gen]).splitlines()[-1], flush=True)
            if shapes:
                shutil.rmtree(work / "generate", ignore_errors=True)
                steps.append(bench_duckdb(scale, shapes, work, args.timeout))
                print(table(steps[-1:]).splitlines()[-1], flush=True)
                shutil.rmtree(work / "duckdb", ignore_errors=True)
            if have_pdao:
                steps.append(bench_pdao(scale, args.seed, work, args.timeout))
                print(table(steps[-1:]).splitlines()[-1], flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    now = datetime.now(timezone.utc).astimezone().strftime("%Y-%m-%d %H:%M %Z")
    block = "\n".join(
        [
            f"### {now}",
            "",
            f"Command: `{command}` (seed {args.seed}). Machine: {machine()}.",
            "Each step ran in a fresh child process; seconds are wall time, peak MB is that child's `ru_maxrss`. "
            f"Load average (1 min) {load_before:.1f} before, {os.getloadavg()[0]:.1f} after: other work on the "
            "machine slows every step alike.",
            "",
            table(steps),
        ]
        + ([""] + [f"- {n}" for n in notes] if notes else [])
    )
    print()
    print(block)
    if not args.no_append:
        append_results(block)
        print(f"\nappended to {os.path.relpath(RESULTS, Path.cwd())}")
    return 0 if all(s.seconds is not None for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
