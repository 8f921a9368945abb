"""SmartNoise SQL on the benchmark's query; run by bench/query_bench.py with bench/.peers-venv's Python.

    python snsql_query.py SNAPSHOT.parquet {district|month} EPSILON MAX_IDS ROW_COUNT

Reads the snapshot into pandas (the dataset's columns only: SmartNoise bounds each person itself),
loads it into SmartNoise's in-memory SQLite (`snsql.from_df`, which is how its pandas reader
works), runs COUNT(*), SUM(fee), AVG(fee) grouped by the key, and prints one JSON line: seconds
to read, to load and for the DP query, groups answered, its own peak RSS before the load.
SmartNoise's SQL has no DATE_TRUNC, so the month key is a YYYYMM column `visit_month` added on
read (timed as part of the read).

This file runs in the peers venv (smartnoise-sql pins opendp 0.14.2); it imports nothing of pdao.
"""

from __future__ import annotations

import json
import resource
import sys
import time


def main() -> int:
    path, key, epsilon, max_ids, row_count = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), \
        int(sys.argv[5])
    t0 = time.perf_counter()
    import snsql
    from snsql import Privacy
    imported = time.perf_counter() - t0

    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    t0 = time.perf_counter()
    table = pq.read_table(path, columns=["person_id", "district", "visit_date", "fee"])
    table = table.set_column(3, "fee", pc.cast(table["fee"], pa.float64()))   # DECIMAL(18,2) -> float
    if key == "month":
        dates = table["visit_date"]      # the month as YYYYMM (pyarrow's strftime is slow)
        month = pc.add(pc.multiply(pc.year(dates), 100), pc.month(dates))
        table = table.append_column("visit_month", month)
    df = table.drop_columns(["visit_date"]).to_pandas()
    del table
    read_seconds = time.perf_counter() - t0
    base_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    metadata = {
        "health": {
            "health": {
                "visit": {
                    "row_privacy": False,
                    "max_ids": max_ids,
                    "sample_max_ids": True,
                    "censor_dims": False,       # the groups come from public domains in the engine
                    "clamp_counts": True,
                    "rows": row_count,
                    "person_id": {"type": "int", "private_id": True},
                    "district": {"type": "string"},
                    "visit_month": {"type": "int"},
                    "fee": {"type": "float", "lower": 0.0, "upper": 5000.0, "nullable": False},
                }
            }
        }
    }
    t0 = time.perf_counter()
    reader = snsql.from_df(df, privacy=Privacy(epsilon=epsilon, delta=0.0), metadata=metadata)
    load_seconds = time.perf_counter() - t0
    del df
    key = "visit_month" if key == "month" else key   # MONTH is a keyword of SmartNoise's SQL
    sql = (f"SELECT {key}, COUNT(*) AS n, SUM(fee) AS total, AVG(fee) AS mean "
           f"FROM health.visit GROUP BY {key}")
    t0 = time.perf_counter()
    rows = reader.execute(sql)
    dp_seconds = time.perf_counter() - t0
    print(json.dumps({"import_seconds": imported, "read_seconds": read_seconds, "load_seconds": load_seconds,
                      "dp_seconds": dp_seconds, "seconds": read_seconds + load_seconds + dp_seconds,
                      "groups": len(rows) - 1, "base_mb": base_mb, "epsilon": epsilon}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
