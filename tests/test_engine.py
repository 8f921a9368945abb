"""The engine's connection reads the bound snapshots and nothing else."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from sandbox.engine.connection import domain_connection


@pytest.fixture
def snapshots(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name, n in (("allowed", 10), ("other", 5)):
        p = tmp_path / f"{name}.parquet"
        duckdb.sql(f"COPY (SELECT range AS x FROM range({n})) TO '{p}' (FORMAT parquet)")
        out[name] = p
    return out


ESCAPES = [
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_parquet('{other}')",
    "SELECT * FROM '{other}'",
    "COPY (SELECT 1) TO '{tmp}/out.csv'",
    "ATTACH '{tmp}/x.db' AS x",
    "INSTALL httpfs",
    "LOAD httpfs",
    "SET enable_external_access = true",
    "SET allowed_paths = ['/etc/passwd']",
    "SET lock_configuration = false",
    "SELECT * FROM glob('/etc/*')",
]


def test_only_the_bound_snapshots_can_be_read(snapshots, tmp_path):
    with domain_connection({"v_allowed": snapshots["allowed"]}) as con:
        assert con.execute('SELECT count(*), sum(x) FROM "v_allowed"').fetchone() == (10, 45)
        for sql in ESCAPES:
            with pytest.raises(duckdb.Error):
                con.execute(sql.format(other=snapshots["other"], tmp=tmp_path)).fetchall()
    assert not (tmp_path / "out.csv").exists() and not (tmp_path / "x.db").exists()


def test_each_connection_binds_its_own_views(snapshots):
    with domain_connection({"v_other": snapshots["other"]}) as con:
        assert con.execute('SELECT count(*) FROM "v_other"').fetchone() == (5,)
        with pytest.raises(duckdb.Error):
            con.execute('SELECT * FROM "v_allowed"').fetchall()
