"""The domain store: versions are immutable Parquet snapshots with row count and SHA-256, and a
file that does not match its descriptor is refused whole."""

from __future__ import annotations

import hashlib
import os
import stat
from datetime import date
from decimal import Decimal
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sqlmodel import Session, func, select

from catalog.models import DatasetVersion
from pdao.kernel.errors import PdaoError
from sandbox.engine.store import load_version, snapshot_path

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


HOSPITALS = ["宁夏医科大学总医院", "银川市第一人民医院"]


def stay_table(n: int, start: int = 1) -> pa.Table:
    """Rows for health.inpatient_stay."""
    ids = list(range(start, start + n))
    return pa.table({
        "stay_id": pa.array(ids, pa.int64()),
        "person_id": pa.array([i % 7 for i in ids], pa.int64()),
        "hospital": [HOSPITALS[i % 2] for i in ids],
        "district": [DISTRICTS[i % 6] for i in ids],
        "department": ["内科"] * n,
        "admit_date": pa.array([date(2024, 1, 1 + i % 20) for i in ids], pa.date32()),
        "discharge_date": pa.array([date(2024, 1, 2 + i % 20) for i in ids], pa.date32()),
        "length_of_stay": pa.array([1] * n, pa.int64()),
        "main_icd10": ["I10"] * n,
        "icd10_chapter": ["IX"] * n,
        "total_cost": pa.array([Decimal("1234.50")] * n, pa.decimal128(18, 2)),
        "notes": ["出院"] * n,
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


def _refused(engine, settings, path: Path, code: str = "health.resident") -> dict:
    before = versions(engine)
    files_before = sorted(p for p in settings.domain_dir.rglob("*") if p.is_file())
    with pytest.raises(PdaoError) as err:
        load(engine, settings, path, code=code)
    assert err.value.code == "version_invalid" and err.value.status == 422
    assert versions(engine) == before, "a refused file must record nothing"
    assert sorted(p for p in settings.domain_dir.rglob("*") if p.is_file()) == files_before
    assert not list(settings.staging_dir.glob("load-*")), "staging must be cleaned"
    assert not list(settings.staging_dir.glob("src-*")), "staging must be cleaned"
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


def test_bad_values_in_csv_are_reported_by_data_row(engine, settings, tmp_path):
    """Positions are data rows (1-based, the header is not a row), not file lines: a quoted value
    may span lines."""
    df = resident_table(20).to_pandas()
    df.loc[1, "address"] = "兴庆区某路\n2号楼\n3单元"  # one value over three lines, before the bad rows
    df.loc[4, "district"] = "朝阳区"     # outside the public value domain -> data row 5
    df.loc[7, "birth_date"] = "1990-13-45"  # not a date -> data row 8
    df.loc[9, "name"] = None            # may not be empty -> data row 10
    csv = tmp_path / "x.csv"
    df.to_csv(csv, index=False)
    assert csv.read_text(encoding="utf-8").count("\n") == 21 + 2
    problems = {p["check"]: p for p in _refused(engine, settings, csv)["problems"]}
    assert problems["domain"]["column"] == "district" and problems["domain"]["first_rows"] == [5]
    assert "朝阳区" not in str(problems), "a report never quotes cells"
    assert problems["type"]["column"] == "birth_date" and problems["type"]["first_rows"] == [8]
    assert problems["null"]["column"] == "name" and problems["null"]["first_rows"] == [10]
    assert not any("first_lines" in p for p in problems.values())


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


# --- types, time zones, names and paths ---------------------------------------------------------

KINDS = {
    "code": "health.kinds", "title": {"zh": "类型测试", "en": "Type test"}, "source_department": "ycwjw",
    "standard": "test", "update_cycle": "once", "category": "public_health", "grade": 2,
    "opening_class": "conditional",
    "fields": [
        {"name": "rn", "type": "integer", "sensitivity": "public", "nullable": False,
         "description": {"zh": "序号", "en": "Row number"}},
        {"name": "amount", "type": "decimal", "sensitivity": "sensitive", "bounds": {"min": 0, "max": 1000},
         "description": {"zh": "金额", "en": "Amount"}},
        {"name": "at", "type": "timestamp", "sensitivity": "quasi_identifier",
         "description": {"zh": "时间", "en": "Time"}},
    ],
}


@pytest.fixture
def kinds(engine):
    from catalog.descriptor import parse_descriptor_dict
    from catalog.service import apply_descriptor

    desc, problems = parse_descriptor_dict(KINDS)
    assert desc is not None, problems
    with Session(engine) as s:
        assert apply_descriptor(s, desc) == "created"
        s.commit()
    return "health.kinds"


def _csv(path: Path, rows: list[str]) -> Path:
    path.write_text("rn,amount,at\n" + "".join(r + "\n" for r in rows), encoding="utf-8")
    return path


def _snapshot_rows(settings, v) -> list[tuple]:
    return duckdb.connect().execute(
        f"SELECT rn, amount, \"at\" FROM read_parquet('{snapshot_path(settings, v)}') ORDER BY rn").fetchall()


def test_timestamps_with_offsets_are_stored_in_utc(engine, settings, tmp_path, kinds):
    from datetime import datetime

    path = _csv(tmp_path / "t.csv", ["1,10.5,2024-01-01 10:00:00+08:00", "2,0,2024-01-01 10:00:00",
                                     "3,1,2024-01-01T10:00:00Z", "4,,"])
    v, _ = load(engine, settings, path, code=kinds)
    assert [r[2] for r in _snapshot_rows(settings, v)] == [
        datetime(2024, 1, 1, 2, 0), datetime(2024, 1, 1, 10, 0), datetime(2024, 1, 1, 10, 0), None]


_SNAPSHOT_IN_TZ = """
import sys
from pathlib import Path
from sqlmodel import Session
from pdao.kernel.db import make_engine
from sandbox.engine.store import load_version
from tests.conftest import make_settings
settings = make_settings(Path(sys.argv[1]), sys.argv[2])
engine = make_engine(settings.database_url)
with Session(engine) as s:
    v, _ = load_version(s, settings, sys.argv[3], Path(sys.argv[4]))
print(v.sha256)
"""


# The snapshot's bytes come from DuckDB (its session time zone pinned), not from the metadata
# database: three loads in three processes cost ~6 s a backend, so by default SQLite only. Loading on
# PostgreSQL (timestamps with offsets included): the other tests of this file.
@pytest.mark.default_backend("sqlite")
def test_a_snapshot_does_not_depend_on_the_server_time_zone(engine, settings, tmp_path, kinds):
    """The same Parquet with aware timestamps gives the same snapshot bytes under any TZ."""
    import subprocess
    import sys
    from datetime import UTC, datetime

    src = write(pa.table({"rn": pa.array([1, 2], pa.int64()), "amount": pa.array([1.5, 2.25]),
                          "at": pa.array([datetime(2024, 1, 1, 2, 0, tzinfo=UTC), datetime(2024, 6, 30, 23, 30, tzinfo=UTC)],
                                         pa.timestamp("us", tz="UTC"))}), tmp_path / "aware.parquet")
    root = Path(__file__).resolve().parents[1]
    digests = []
    for tz in ("UTC", "Asia/Shanghai", "America/New_York"):
        out = subprocess.run([sys.executable, "-c", _SNAPSHOT_IN_TZ, str(settings.home), settings.database_url, kinds,
                              str(src)], cwd=root, env={**os.environ, "TZ": tz}, capture_output=True, text=True,
                             check=True)
        digests.append(out.stdout.strip().splitlines()[-1])
    assert len(set(digests)) == 1, digests
    [v1, *_] = versions(engine)
    assert [r[2] for r in _snapshot_rows(settings, v1)] == [datetime(2024, 1, 1, 2, 0), datetime(2024, 6, 30, 23, 30)]


def test_decimals_are_never_rounded_silently(engine, settings, tmp_path, kinds):
    # CSV text: 99.999 would become 100.00
    details = _refused(engine, settings, _csv(tmp_path / "d.csv", ["1,12.50,", "2,99.999,", "3,0.10,", "4,1.005,"]), kinds)
    [p] = details["problems"]
    assert (p["check"], p["column"], p["count"], p["first_rows"]) == ("type", "amount", 2, [2, 4])
    assert "2 decimal places" in p["message"]
    # an integer with a fraction would be rounded too
    [p] = _refused(engine, settings, _csv(tmp_path / "i.csv", ["1,1,", "1.5,2,"]), kinds)["problems"]
    assert (p["check"], p["column"], p["first_rows"]) == ("type", "rn", [2])
    # Parquet: a double or a 3-place decimal that does not fit 2 places
    # … and a double beyond 2^53 / 100, whose cents a float no longer holds (the third review:
    # 6222021234567894.0 was stored as 6222021234567893.76 — the round trip hid it)
    for arr in (pa.array([1.25, 99.999]), pa.array([Decimal("1.250"), Decimal("99.999")], pa.decimal128(10, 3)),
                pa.array([1.25, 6222021234567894.0])):
        t = pa.table({"rn": pa.array([1, 2], pa.int64()), "amount": arr, "at": pa.array([None, None], pa.timestamp("us"))})
        [p] = _refused(engine, settings, write(t, tmp_path / "d.parquet"), kinds)["problems"]
        assert (p["check"], p["column"], p["first_rows"]) == ("type", "amount", [2])
    # exact values load, and keep their value
    v, _ = load(engine, settings, _csv(tmp_path / "ok.csv", ["1,12.50,", "2,99.990,", "3,.5,"]), code=kinds)
    assert [r[1] for r in _snapshot_rows(settings, v)] == [Decimal("12.50"), Decimal("99.99"), Decimal("0.50")]


def test_a_field_named_like_an_internal_alias_is_reported_not_a_crash(engine, settings, tmp_path, kinds):
    """The row-listing query numbers rows under an internal alias; a field named `rn` is just a field."""
    [p] = _refused(engine, settings, _csv(tmp_path / "r.csv", ["1,1,", "x,2,", ",3,"]), kinds)["problems"][:1]
    assert (p["check"], p["column"], p["first_rows"]) == ("type", "rn", [2])
    details = _refused(engine, settings, _csv(tmp_path / "r.csv", ["1,1,", "2,2,", ",3,"]), kinds)
    assert [(p["check"], p["column"], p["first_rows"]) for p in details["problems"]] == [("null", "rn", [3])]


@pytest.mark.parametrize("name", ["r[1].parquet", "r*.parquet", "r?.parquet"])
def test_a_file_name_with_glob_characters_reads_only_that_file(engine, settings, tmp_path, name):
    """DuckDB reads file names as globs; the loader must read exactly the file it was given."""
    folder = tmp_path / "in"
    folder.mkdir()
    write(resident_table(7), folder / "r1.parquet")        # what `r[1]`, `r*`, `r?` would also match
    write(resident_table(3, start=100), folder / name)
    v, report = load(engine, settings, folder / name)
    assert v.row_count == report.row_count == 3
    assert not list(settings.staging_dir.glob("src-*")), "the staged name is removed"


def test_a_home_with_glob_characters_still_reads_the_right_file(database_url, tmp_path):
    from pdao.kernel.db import make_engine
    from tests.conftest import make_settings

    s = make_settings(tmp_path / "home[1]*", database_url)
    s.ensure_home()
    (tmp_path / "home1x").mkdir()  # what the home would match as a glob
    eng = make_engine(database_url)
    try:
        v, _ = load(eng, s, write(resident_table(4), tmp_path / "a.parquet"))
        assert v.row_count == 4 and snapshot_path(s, v).is_file()
    finally:
        eng.dispose()
