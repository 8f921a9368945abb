"""The domain store: versions are immutable Parquet snapshots with row count and SHA-256, and a
file that does not match its descriptor is refused whole."""

from __future__ import annotations

import hashlib
import os
import stat
from datetime import date
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sqlmodel import Session, func, select

from catalog.models import DatasetVersion
from pdao.errors import PdaoError
from sandbox.store import load_version, snapshot_path

DISTRICTS = ["兴庆区", "金凤区", "西夏区", "永宁县", "贺兰县", "灵武市"]


def resident_table(n: int, start: int = 1) -> pa.Table:
    ids = list(range(start, start + n))
    return pa.table({
        "person_id": pa.array(ids, pa.int64()),
        "id_number": [f"64010419800101{i % 1000:03d}X" for i in ids],
        "name": [f"测试{i}" for i in ids],
        "phone": [f"139{i:08d}" for i in ids],
        "sex": ["M" if i % 2 else "F" for i in ids],
        "birth_date": pa.array([date(1950 + i % 60, 1 + i % 12, 1 + i % 28) for i in ids], pa.date32()),
        "district": [DISTRICTS[i % 6] for i in ids],
        "address": [f"{DISTRICTS[i % 6]}某路{i}号" for i in ids],
        "insurance_type": ["城乡居民"] * n,
    })


def write(table: pa.Table, path: Path) -> Path:
    pq.write_table(table, path)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def versions(engine) -> list[DatasetVersion]:
    with Session(engine) as s:
        return list(s.exec(select(DatasetVersion).order_by(DatasetVersion.id)).all())


def load(engine, settings, path: Path, code: str = "health.resident", env: str = "prod"):
    with Session(engine) as session:
        return load_version(session, settings, code, path, env=env)


def test_a_version_is_an_immutable_snapshot_with_hash_and_row_count(engine, settings, tmp_path):
    v1, report = load(engine, settings, write(resident_table(500), tmp_path / "a.parquet"))
    snap1 = snapshot_path(settings, v1)
    assert (v1.number, v1.env, v1.row_count, report.row_count) == (1, "prod", 500, 500)
    assert v1.sha256 == sha256(snap1) and v1.size_bytes == snap1.stat().st_size
    assert snap1.is_relative_to(settings.domain_dir)
    assert not os.stat(snap1).st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH), "snapshot must be read-only"
    # the snapshot holds the descriptor's columns, in its order and types
    con = duckdb.connect()
    cols = con.execute(f"DESCRIBE SELECT * FROM read_parquet('{snap1}')").fetchall()
    assert [(c[0], c[1]) for c in cols][:2] == [("person_id", "BIGINT"), ("id_number", "VARCHAR")]
    assert con.execute(f"SELECT count(*) FROM read_parquet('{snap1}')").fetchone()[0] == 500

    before = snap1.read_bytes()
    v2, _ = load(engine, settings, write(resident_table(300, start=1000), tmp_path / "b.parquet"))
    assert v2.number == 2 and v2.row_count == 300 and v2.sha256 != v1.sha256
    assert snap1.read_bytes() == before and sha256(snap1) == v1.sha256, "a new version rewrote an old one"
    assert snapshot_path(settings, v2) != snap1
    # the same content again is still a new version (a new load), with the same hash
    v3, _ = load(engine, settings, tmp_path / "a.parquet")
    assert v3.number == 3 and v3.sha256 == v1.sha256 and snapshot_path(settings, v3) != snap1
    # the dev twin numbers its versions apart
    v_dev, _ = load(engine, settings, tmp_path / "b.parquet", env="dev")
    assert (v_dev.env, v_dev.number) == ("dev", 1)


def test_csv_with_header_loads_with_types(engine, settings, tmp_path):
    csv = tmp_path / "r.csv"
    resident_table(50).to_pandas().to_csv(csv, index=False)
    v, _ = load(engine, settings, csv)
    assert v.row_count == 50
    con = duckdb.connect()
    types = dict((c[0], c[1]) for c in con.execute(
        f"DESCRIBE SELECT * FROM read_parquet('{snapshot_path(settings, v)}')").fetchall())
    assert types["person_id"] == "BIGINT" and types["birth_date"] == "DATE"


def _refused(engine, settings, path: Path) -> dict:
    before = versions(engine)
    files_before = sorted(p for p in settings.domain_dir.rglob("*") if p.is_file())
    with pytest.raises(PdaoError) as err:
        load(engine, settings, path)
    assert err.value.code == "version_invalid" and err.value.status == 422
    assert versions(engine) == before, "a refused file must record nothing"
    assert sorted(p for p in settings.domain_dir.rglob("*") if p.is_file()) == files_before
    assert not list(settings.staging_dir.glob("load-*")), "staging must be cleaned"
    return err.value.details


def test_missing_and_extra_columns_are_refused(engine, settings, tmp_path):
    t = resident_table(10).drop_columns(["phone"]).append_column("blood_type", pa.array(["A"] * 10))
    details = _refused(engine, settings, write(t, tmp_path / "x.parquet"))
    messages = " ".join(p["message"] for p in details["problems"])
    assert "missing columns: phone" in messages and "not in the descriptor: blood_type" in messages


def test_wrong_type_is_refused(engine, settings, tmp_path):
    t = resident_table(10)
    t = t.set_column(t.schema.get_field_index("person_id"), "person_id", pa.array([1.5] * 10))
    [problem] = _refused(engine, settings, write(t, tmp_path / "x.parquet"))["problems"]
    assert problem["check"] == "type" and problem["column"] == "person_id"


def test_bad_values_in_csv_are_reported_by_line(engine, settings, tmp_path):
    df = resident_table(20).to_pandas()
    df.loc[4, "district"] = "朝阳区"     # outside the public value domain -> line 6 (header is line 1)
    df.loc[7, "birth_date"] = "1990-13-45"  # not a date -> line 9
    df.loc[9, "name"] = None            # may not be empty -> line 11
    csv = tmp_path / "x.csv"
    df.to_csv(csv, index=False)
    problems = {p["check"]: p for p in _refused(engine, settings, csv)["problems"]}
    assert problems["domain"]["column"] == "district" and problems["domain"]["first_lines"] == [6]
    assert "朝阳区" not in str(problems), "a report never quotes cells"
    assert problems["type"]["column"] == "birth_date" and problems["type"]["first_lines"] == [9]
    assert problems["null"]["column"] == "name" and problems["null"]["first_lines"] == [11]


def test_out_of_bounds_values_only_warn(engine, settings, tmp_path):
    t = resident_table(10)
    dates = [date(1890, 1, 1)] + [date(1980, 1, 1)] * 9
    t = t.set_column(t.schema.get_field_index("birth_date"), "birth_date", pa.array(dates, pa.date32()))
    v, report = load(engine, settings, write(t, tmp_path / "x.parquet"))
    assert v.row_count == 10
    [w] = report.warnings
    assert w["check"] == "bounds" and w["column"] == "birth_date" and w["count"] == 1


def test_not_a_data_file_is_refused(engine, settings, tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00\x01 not a table")
    _refused(engine, settings, junk)


def test_unknown_dataset_is_404(engine, settings, tmp_path):
    with pytest.raises(PdaoError) as err:
        load(engine, settings, write(resident_table(3), tmp_path / "a.parquet"), code="health.nope")
    assert err.value.status == 404


def test_a_crashed_loader_file_never_gets_overwritten(engine, settings, tmp_path):
    """A file left by a loader that died before recording its version keeps its bytes; the new
    load takes the next free name."""
    path = write(resident_table(20), tmp_path / "a.parquet")
    v1, _ = load(engine, settings, path)
    snap = snapshot_path(settings, v1)
    orphan = snap.with_name(f"v2-{v1.sha256[:12]}.parquet")
    orphan.write_bytes(b"left by a crash")
    v2, _ = load(engine, settings, path)
    assert orphan.read_bytes() == b"left by a crash"
    assert v2.number == 3
    with Session(engine) as s:
        assert s.exec(select(func.count()).select_from(DatasetVersion)).one() == 2
