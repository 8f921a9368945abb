"""Benchmark of the underwriting template (issue 6): N applicants against the synthetic city.

    python bench/underwriting_bench.py --visits 10000000 --applicants 100000 [--runs 3]

The city is made once with ``sandbox.synth.generate`` at ``--visits`` outpatient visit rows (its
residents, chronic conditions and inpatient stays scale with it); the applicants are the first
``--applicants`` residents' ID numbers, 90% with valid consent. Then, alternating, ``--runs`` times:

- ``template``: ``sandbox.templates.library.run_template`` — the checked template, regenerated SQL with the
  sandbox's consent filter, DuckDB locked to the given files (2 threads, 1 GB), the answer checked
  (one row per consented applicant, only declared labels);
- ``raw duckdb``: the baseline — the same rendered SQL in plain DuckDB (2 threads, 1 GB) over views
  of the same files, no checks.

Prints the medians and the ratio, as a Markdown table for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from sandbox.engine.sql import upload_view_name, view_name  # noqa: E402
from sandbox.synth import generate  # noqa: E402
from sandbox.templates import library as templates  # noqa: E402


def applicants(resident: Path, n: int, out: Path, as_of: dt.date) -> Path:
    ids = pq.read_table(resident, columns=["id_number"]).column(0).slice(0, n).to_pylist()
    valid, expired = as_of + dt.timedelta(days=300), as_of - dt.timedelta(days=1)
    pq.write_table(pa.table({
        "applicant_ref": [f"A{i:07d}" for i in range(len(ids))],
        "id_number": ids,
        "consent_ref": [f"C{i:07d}" for i in range(len(ids))],
        "consent_valid_from": [as_of - dt.timedelta(days=30)] * len(ids),
        "consent_valid_until": [expired if i % 10 == 9 else valid for i in range(len(ids))],
    }), out)
    return out


def raw(sql: str, files: dict[str, Path], upload: Path) -> float:
    con = duckdb.connect(config={"threads": 2, "memory_limit": "1GB"})
    for code, path in files.items():
        con.execute(f'CREATE VIEW "{view_name(code)}" AS SELECT * FROM read_parquet(\'{path}\')')
    con.execute(f'CREATE VIEW "{upload_view_name("applicants")}" AS SELECT * FROM read_parquet(\'{upload}\')')
    start = time.perf_counter()
    rows = con.sql(sql).to_arrow_table().num_rows
    took = time.perf_counter() - start
    con.close()
    assert rows > 0
    return took


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--visits", type=int, default=1_000_000)
    ap.add_argument("--applicants", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    data = ROOT / ".data" / f"underwriting-{args.visits}"
    t0 = time.perf_counter()
    if not (data / "done").exists():
        data.mkdir(parents=True, exist_ok=True)
        generate(data, scale=args.visits, seed=1, twin=False)
        (data / "done").write_text("ok")
    files = {c: p for c in ("health.resident", "health.chronic_condition", "health.inpatient_stay")
             for p in data.rglob(f"{c}*.parquet")}
    as_of = dt.date(2025, 12, 31)
    upload = applicants(files["health.resident"], args.applicants, data / f"applicants-{args.applicants}.parquet", as_of)
    print(f"data ready in {time.perf_counter() - t0:.1f} s: "
          + ", ".join(f"{c} {pq.ParquetFile(p).metadata.num_rows:,} rows" for c, p in files.items()))
    template = templates.library_template("underwriting")
    ours, base = [], []
    answer = None
    for _ in range(args.runs):
        start = time.perf_counter()
        answer = templates.run_template(template, {"as_of": as_of.isoformat()}, files, upload, as_of=as_of)
        ours.append(time.perf_counter() - start)
        base.append(raw(answer.sql, files, upload))
    m_ours, m_base = statistics.median(ours), statistics.median(base)
    print(f"\n{answer.persons:,} applicants answered, {answer.excluded:,} left out for consent\n")
    print("| applicants | visit rows | step | median s | range s | × raw |")
    print("|---:|---:|---|---:|---|---:|")
    print(f"| {args.applicants:,} | {args.visits:,} | raw duckdb (same SQL) | {m_base:.2f} | "
          f"{min(base):.2f}–{max(base):.2f} | 1.00 |")
    print(f"| {args.applicants:,} | {args.visits:,} | run_template | {m_ours:.2f} | "
          f"{min(ours):.2f}–{max(ours):.2f} | {m_ours / m_base:.2f} |")


if __name__ == "__main__":
    main()
