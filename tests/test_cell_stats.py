"""Exact statistics for the disclosure checks (issue #5): `Execution(disclosure_stats=True)` makes an
aggregate answer carry `cell_stats` (one row per public cell, on the very rows the aggregate used:
WHERE, each person's first k rows, clamped values) and a rows answer carry `persons` (distinct
privacy units among exactly the rows returned). Checked here against a plain-Python computation
on the same bounded rows, on small Parquet snapshots laid out as the store writes them (with
`__pdao_rank`, stored by rank). No metadata database: fast."""

from __future__ import annotations

import datetime as dt
import random
from collections import defaultdict
from decimal import Decimal

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pdao.kernel.errors import PdaoError
from sandbox.engine import execute
from sandbox.engine.execute import DatasetMeta, Execution, FieldMeta
from sandbox.engine.sql import check_query
from sandbox.engine.store import RANK_COLUMN

CODE = "health.test_visit"
SEXES = ("F", "M")
DISTRICTS = ("兴庆区", "金凤区", "西夏区")
FEE = (0, 5000)          # yuan; the data hold fees above and below it, and NULLs
DAYS = (0, 30)
SCORE = (-1.0, 1.0)
USES = ("aggregate", "group_by", "filter", "masked_output", "join_key")

FIELDS = (
    FieldMeta("visit_id", "integer", "pseudonym", False, sensitivity="identifier"),
    FieldMeta("person_id", "integer", "pseudonym", False, sensitivity="identifier"),
    FieldMeta("sex", "string", "none", True, ("F", "M"), sensitivity="quasi_identifier"),
    FieldMeta("district", "string", "none", False, DISTRICTS, sensitivity="quasi_identifier"),
    FieldMeta("visit_date", "date", "month", True, bounds=("2024-01-01", "2024-12-31"), sensitivity="quasi_identifier"),
    FieldMeta("fee", "decimal", "none", True, bounds=FEE, sensitivity="sensitive"),
    FieldMeta("days", "integer", "none", True, bounds=DAYS, sensitivity="sensitive"),
    FieldMeta("score", "float", "none", True, bounds=SCORE, sensitivity="sensitive"),
)


def make_rows(seed: int = 7) -> list[dict]:
    """Person 1: 40 visits in 兴庆区 (fees far above the bound, some NULL); persons 2..80: 1–6 visits
    each, spread over districts, sexes (some NULL), months (some NULL), fees in [-50, 6000]."""
    rnd = random.Random(seed)
    rows: list[dict] = []

    def visit(person: int, **kw) -> None:
        rows.append({"visit_id": len(rows) + 1, "person_id": person, **kw})

    for i in range(40):
        visit(1, sex="F", district="兴庆区", visit_date=dt.date(2024, 1 + i % 3, 1 + i % 28),
              fee=None if i % 7 == 0 else Decimal("90000.55"), days=50, score=0.5)
    for p in range(2, 81):
        sex = rnd.choice([*SEXES, None])
        for _ in range(rnd.randint(1, 6)):
            date = None if rnd.random() < 0.1 else dt.date(2024, rnd.randint(1, 12), rnd.randint(1, 28))
            fee = None if rnd.random() < 0.1 else Decimal(rnd.randint(-5000, 600000)) / 100
            visit(p, sex=sex, district=rnd.choice(DISTRICTS), visit_date=date, fee=fee,
                  days=None if rnd.random() < 0.2 else rnd.randint(-3, 40),
                  score=None if rnd.random() < 0.2 else round(rnd.uniform(-1.5, 1.5), 3))
    return rows


def write_snapshot(path, rows: list[dict], *, rank: bool = True, seed: int = 11) -> None:
    """As the store lays a snapshot out: each row's rank within its person (an order that does not
    follow the file's), rows stored by rank, then person."""
    rows = [dict(r) for r in rows]
    if rank:
        rnd = random.Random(seed)
        by_person: dict[int, list[dict]] = defaultdict(list)
        for r in rows:
            by_person[r["person_id"]].append(r)
        for mine in by_person.values():
            ranks = list(range(1, len(mine) + 1))
            rnd.shuffle(ranks)
            for r, k in zip(mine, ranks):
                r[RANK_COLUMN] = k
        rows.sort(key=lambda r: (r[RANK_COLUMN], r["person_id"]))
    columns = {
        "visit_id": pa.array([r["visit_id"] for r in rows], pa.int64()),
        "person_id": pa.array([r["person_id"] for r in rows], pa.int64()),
        "sex": pa.array([r["sex"] for r in rows], pa.string()),
        "district": pa.array([r["district"] for r in rows], pa.string()),
        "visit_date": pa.array([r["visit_date"] for r in rows], pa.date32()),
        "fee": pa.array([r["fee"] for r in rows], pa.decimal128(18, 2)),
        "days": pa.array([r["days"] for r in rows], pa.int64()),
        "score": pa.array([r["score"] for r in rows], pa.float64()),
    }
    if rank:
        columns[RANK_COLUMN] = pa.array([r[RANK_COLUMN] for r in rows], pa.int64())
    pq.write_table(pa.table(columns), path)
    return rows


@pytest.fixture(scope="module")
def snap(tmp_path_factory):
    path = tmp_path_factory.mktemp("cellstats") / "visits.parquet"
    rows = write_snapshot(path, make_rows())
    meta = DatasetMeta(CODE, "person_id", {f.name: f for f in FIELDS}, row_count=len(rows))
    return meta, path, rows


def execution(meta, path, sql, *, uploads=None, upload_columns=None, **kw) -> Execution:
    grants = {(CODE, f): USES for f in meta.fields}
    checked = check_query(sql, grants, [meta.info()], upload_columns or {})
    kw.setdefault("epsilon", 1.0)
    kw.setdefault("disclosure_stats", True)
    return Execution(checked, meta, path, uploads=uploads or {}, **kw)


# ---------------------------------------------------------------------------------------------
# The reference: plain Python on the same bounded rows


def clamp(v, lo, hi):
    return None if v is None else min(max(v, lo), hi)


VALUE = {   # field -> its clamped value in exact units (cents for DECIMAL), and the factor back
    "fee": (lambda r: clamp(None if r["fee"] is None else int(r["fee"] * 100), FEE[0] * 100, FEE[1] * 100), 100),
    "days": (lambda r: clamp(r["days"], *DAYS), 1),
    "score": (lambda r: clamp(r["score"], *SCORE), 1),
}


def month(d):
    return None if d is None else dt.date(d.year, d.month, 1)


def reference(rows, k, key, where=lambda r: True, fields=("fee",), unit="person_id"):
    """cell -> {persons, rows, <field>: (total, top1, top2, min, nulls)} over the rows each person
    keeps (rank <= k) that pass `where`."""
    cells: dict[tuple, dict] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if where(r) and (unit is None or r[RANK_COLUMN] <= k):
            cells[key(r)][r[unit] if unit else r["visit_id"]].append(r)
    out = {}
    for cell, persons in cells.items():
        got = {"persons": len(persons), "rows": sum(len(v) for v in persons.values())}
        for f in fields:
            value, factor = VALUE[f]
            totals, values, nulls = [], [], 0
            for mine in persons.values():
                vs = [value(r) for r in mine]
                nulls += sum(v is None for v in vs)
                vs = [v for v in vs if v is not None]
                values += vs
                if vs:
                    totals.append(sum(vs))
            totals.sort(reverse=True)

            def nat(v):
                return None if v is None else v / factor
            got[f] = (nat(sum(values)) if values else None, nat(totals[0]) if totals else None,
                      nat(totals[1]) if len(totals) > 1 else None, nat(min(values)) if values else None, nulls)
        out[cell] = got
    return out


def assert_matches(stats: pa.Table, ref: dict, key_names: list[str], aliases: dict[str, str]):
    """Every row of `stats` against the reference (cells absent from it: 0 persons, NULL values)."""
    for row in stats.to_pylist():
        cell = tuple(row[n] for n in key_names)
        want = ref.get(cell)
        if want is None:
            assert row["__persons"] == 0 and row["__rows"] == 0, cell
            for alias in aliases:
                assert [row[f"{alias}__{s}"] for s in ("total", "top1", "top2", "min", "nulls")] == [None] * 4 + [0]
            continue
        assert (row["__persons"], row["__rows"]) == (want["persons"], want["rows"]), cell
        for alias, f in aliases.items():
            got = tuple(row[f"{alias}__{s}"] for s in ("total", "top1", "top2", "min", "nulls"))
            assert got[4] == want[f][4], (cell, alias)
            for g, w in zip(got[:4], want[f][:4]):
                assert (g is None and w is None) or g == pytest.approx(w, rel=1e-12, abs=1e-9), (cell, alias, got, want[f])
    assert {tuple(r[n] for n in key_names) for r in stats.to_pylist()} >= set(ref)   # no cell with data is missing


# ---------------------------------------------------------------------------------------------
# Aggregates


@pytest.mark.parametrize("k", [1, 3, 10])
def test_cell_stats_equal_a_plain_computation_on_the_bounded_clamped_rows(snap, k):
    meta, path, rows = snap
    ex = execution(meta, path, f"SELECT sex, DATE_TRUNC('month', visit_date) AS m, COUNT(*) AS n, "
                               f"COUNT(DISTINCT person_id) AS people, SUM(fee) AS total, AVG(days) AS mean_days, "
                               f"MEDIAN(score) AS med FROM {CODE} GROUP BY sex, m", max_contributions=k)
    answer = execute.run(ex)
    stats = answer.cell_stats
    assert stats is not None and stats.num_rows == answer.cells == 3 * 13    # F, M, NULL × 12 months + NULL
    assert stats.column_names == ["sex", "m", "__persons", "__rows",
                                  *[f"{a}__{s}" for a in ("total", "mean_days", "med")
                                    for s in ("total", "top1", "top2", "min", "nulls")]]
    types = {f.name: f.type for f in stats.schema}
    assert types["__persons"] == types["__rows"] == types["total__nulls"] == pa.int64()
    assert types["total__total"] == types["mean_days__top1"] == types["med__min"] == pa.float64()
    # the keys: the answer's own cells, values and types
    for name in ("sex", "m"):
        assert stats.column(name).to_pylist() == answer.table.column(name).to_pylist()
        assert stats.schema.field(name).type == answer.table.schema.field(name).type
    assert stats.column("m").type == pa.date32() and None in stats.column("sex").to_pylist()
    ref = reference(rows, k, lambda r: (r["sex"], month(r["visit_date"])), fields=("fee", "days", "score"))
    assert_matches(stats, ref, ["sex", "m"], {"total": "fee", "mean_days": "days", "med": "score"})
    # person 1 (40 visits, F, Jan–Mar) is counted at most k times
    assert sum(v["rows"] for c, v in ref.items() if c[0] == "F") == sum(
        r["__rows"] for r in stats.to_pylist() if r["sex"] == "F")


def test_money_is_in_yuan_a_person_counts_k_rows_and_top_values_are_per_person(tmp_path):
    """兴庆区: person 1 has 5 visits of 100.10 (k=3 keeps 3 → 300.30), person 2 one of 250.00 and
    one of 4999.99 + one above the bound (→ 5000.00), person 3 one NULL fee. Per person, not per row."""
    rows = []
    for i in range(5):
        rows.append(dict(person_id=1, fee=Decimal("100.10")))
    rows += [dict(person_id=2, fee=Decimal("250.00")), dict(person_id=2, fee=Decimal("4999.99")),
             dict(person_id=2, fee=Decimal("12345.67")), dict(person_id=3, fee=None),
             dict(person_id=4, fee=Decimal("-20.00"))]
    full = [dict(visit_id=i + 1, sex="F", district="兴庆区" if r["person_id"] < 4 else "金凤区",
                 visit_date=dt.date(2024, 5, 5), days=1, score=0.0, **r) for i, r in enumerate(rows)]
    path = tmp_path / "v.parquet"
    write_snapshot(path, full)
    meta = DatasetMeta(CODE, "person_id", {f.name: f for f in FIELDS}, row_count=len(full))
    ex = execution(meta, path, f"SELECT district, SUM(fee) AS s FROM {CODE} GROUP BY district", max_contributions=3)
    stats = {r["district"]: r for r in execute.run(ex).cell_stats.to_pylist()}
    x = stats["兴庆区"]
    assert (x["__persons"], x["__rows"]) == (3, 3 + 3 + 1)
    assert x["s__total"] == pytest.approx(300.30 + 250.00 + 4999.99 + 5000.00)          # yuan, clamped
    assert x["s__top1"] == pytest.approx(250.00 + 4999.99 + 5000.00)                     # person 2's total
    assert x["s__top2"] == pytest.approx(300.30)                                         # person 1: 3 rows kept
    assert x["s__min"] == pytest.approx(100.10) and x["s__nulls"] == 1
    y = stats["金凤区"]   # one person, a negative fee clamped to 0: a zero, not a negative; no second person
    assert (y["__persons"], y["s__total"], y["s__top1"], y["s__top2"], y["s__min"]) == (1, 0.0, 0.0, None, 0.0)
    z = stats["西夏区"]   # no rows: 0 persons, NULL values
    assert (z["__persons"], z["__rows"], z["s__total"], z["s__top1"], z["s__min"], z["s__nulls"]) == (0, 0, None, None, None, 0)


def test_where_is_respected_and_cells_follow_the_answer(snap):
    meta, path, rows = snap
    ex = execution(meta, path, f"SELECT DATE_TRUNC('month', visit_date) AS m, district, SUM(fee) AS s, COUNT(*) AS n "
                               f"FROM {CODE} WHERE visit_date >= DATE '2024-07-01' AND fee > 100 AND sex = 'M' "
                               "GROUP BY 1, 2 ORDER BY n DESC LIMIT 4", max_contributions=2)
    answer = execute.run(ex)
    stats = answer.cell_stats
    assert answer.table.num_rows == 4 and stats.num_rows == answer.cells == 6 * 3   # Jul–Dec (NULL pruned) × 3
    assert stats.column("m").to_pylist()[0] == dt.date(2024, 7, 1) and None not in stats.column("m").to_pylist()

    def where(r):
        return (r["visit_date"] is not None and r["visit_date"] >= dt.date(2024, 7, 1) and r["fee"] is not None
                and r["fee"] > 100 and r["sex"] == "M")
    ref = reference(rows, 2, lambda r: (month(r["visit_date"]), r["district"]), where)
    assert ref and all(v["persons"] > 0 for v in ref.values())
    assert_matches(stats, ref, ["m", "district"], {"s": "fee"})
    assert sum(stats.column("__rows").to_pylist()) == sum(v["rows"] for v in ref.values())


def test_no_group_keys_one_cell_and_keys_not_selected(snap):
    meta, path, rows = snap
    one = execute.run(execution(meta, path, f"SELECT SUM(days) AS d FROM {CODE} WHERE district = '西夏区'",
                                max_contributions=4)).cell_stats
    ref = reference(rows, 4, lambda r: (), lambda r: r["district"] == "西夏区", fields=("days",))
    assert one.num_rows == 1 and one.column_names[:2] == ["__persons", "__rows"]
    assert_matches(one, ref, [], {"d": "days"})
    # a key grouped on but not selected is named __k{i}
    hidden = execute.run(execution(meta, path, f"SELECT COUNT(*) AS n FROM {CODE} GROUP BY district")).cell_stats
    assert hidden.column_names == ["__k0", "__persons", "__rows"]
    assert hidden.column("__k0").to_pylist() == list(DISTRICTS)
    ref = reference(rows, 10, lambda r: (r["district"],), fields=())
    assert {r["__k0"]: r["__persons"] for r in hidden.to_pylist()} == {c[0]: v["persons"] for c, v in ref.items()}


def test_a_dataset_without_privacy_unit_counts_each_row_as_its_own_contributor(tmp_path):
    rows = make_rows()
    path = tmp_path / "plain.parquet"
    write_snapshot(path, rows, rank=False)
    meta = DatasetMeta(CODE, None, {f.name: f for f in FIELDS}, row_count=len(rows))
    ex = execution(meta, path, f"SELECT district, SUM(fee) AS s, COUNT(*) AS n FROM {CODE} GROUP BY district")
    stats = execute.run(ex).cell_stats
    ref = reference(rows, None, lambda r: (r["district"],), unit=None)
    assert_matches(stats, ref, ["district"], {"s": "fee"})
    assert all(r["__persons"] == r["__rows"] for r in stats.to_pylist())
    assert sum(stats.column("__rows").to_pylist()) == len(rows)      # nothing bounded


def test_a_join_with_an_upload_bounds_and_counts_persons_once(snap, tmp_path):
    meta, path, rows = snap
    upload = tmp_path / "applicants.parquet"
    pq.write_table(pa.table({"pid": pa.array([1, 1, 1, 2, 3, 4], pa.int64())}), upload)
    ex = execution(meta, path, f"SELECT district, SUM(fee) AS s FROM {CODE} JOIN applicants ON person_id = applicants.pid "
                               "GROUP BY district", uploads={"applicants": upload},
                   upload_columns={"applicants": {"pid": "integer"}}, max_contributions=5)
    stats = execute.run(ex).cell_stats
    ref = reference(rows, 5, lambda r: (r["district"],), lambda r: r["person_id"] in (1, 2, 3, 4))
    assert_matches(stats, ref, ["district"], {"s": "fee"})
    assert sum(stats.column("__rows").to_pylist()) == sum(v["rows"] for v in ref.values())


def test_output_fields_map_each_output_to_its_field(snap):
    meta, path, _ = snap
    answer = execute.run(execution(meta, path, f"SELECT district AS d, DATE_TRUNC('year', visit_date) AS y, COUNT(*) AS n, "
                                               f"AVG(fee) AS a FROM {CODE} GROUP BY 1, 2"))
    assert answer.output_fields == {"d": "district", "y": "visit_date", "n": None, "a": "fee", "a_error95": None}
    assert list(answer.output_fields) == answer.table.column_names


def test_without_disclosure_stats_nothing_extra_runs(snap):
    meta, path, _ = snap
    seen = []
    ex = execution(meta, path, f"SELECT district, SUM(fee) AS s FROM {CODE} GROUP BY district", disclosure_stats=False)
    answer = execute.run(ex, on_connection=seen.append)
    assert answer.cell_stats is None and answer.persons is None and answer.table.num_rows == 3
    assert len(seen) == 1 and isinstance(seen[0], duckdb.DuckDBPyConnection)   # the plain connection: one statement
    rows = execute.run(execution(meta, path, f"SELECT district FROM {CODE} LIMIT 5", disclosure_stats=False,
                                 pseudonym_key=b"k" * 32, epsilon=None))
    assert rows.persons is None and rows.cell_stats is None


def test_both_statements_share_one_session_and_an_interrupt_stops_the_rest(snap):
    meta, path, _ = snap
    ex = execution(meta, path, f"SELECT district, SUM(fee) AS s FROM {CODE} GROUP BY district")
    seen = []
    execute.run(ex, on_connection=seen.append)
    assert len(seen) == 1 and seen[0].done == 2          # one connection, two statements
    with pytest.raises(duckdb.InterruptException):
        execute.run(ex, on_connection=lambda con: con.interrupt())   # cancelled before the first


def test_a_name_the_statistics_need_is_refused_when_an_output_has_it(snap):
    meta, path, _ = snap
    sql = f"SELECT district AS s__total, SUM(fee) AS s FROM {CODE} GROUP BY 1"
    with pytest.raises(PdaoError) as e:
        execute.run(execution(meta, path, sql))
    assert e.value.code == "output_name_taken"
    with pytest.raises(PdaoError):
        execute.preview(execution(meta, path, sql))
    assert execute.run(execution(meta, path, sql, disclosure_stats=False)).cell_stats is None


# ---------------------------------------------------------------------------------------------
# Rows


def test_rows_persons_counts_exactly_the_rows_returned(snap):
    meta, path, rows = snap
    key = b"k" * 32
    for limit in (1, 7, 40, 200):
        ex = execution(meta, path, f"SELECT person_id, district, fee FROM {CODE} LIMIT {limit}",
                       pseudonym_key=key, epsilon=None)
        answer = execute.run(ex)
        assert answer.table.column_names == ["person_id", "district", "fee"]     # the unit column never leaves
        assert answer.table.num_rows == limit
        assert answer.persons == len(set(answer.table.column("person_id").to_pylist()))   # pseudonyms are 1:1
        assert answer.output_fields == {"person_id": "person_id", "district": "district", "fee": "fee"}
    one = execute.run(execution(meta, path, f"SELECT district AS __pdao_unit, visit_date FROM {CODE} "
                                            "WHERE person_id = 1 LIMIT 30", epsilon=None))
    assert one.table.num_rows == 30 and one.persons == 1 and one.table.column_names == ["__pdao_unit", "visit_date"]
    assert set(one.table.column("__pdao_unit").to_pylist()) == {"兴庆区"}       # the output, not the unit
    everyone = execute.run(execution(meta, path, f"SELECT district FROM {CODE} WHERE district = '金凤区'", epsilon=None))
    assert everyone.persons == len({r["person_id"] for r in rows if r["district"] == "金凤区"})
    assert everyone.output_fields == {"district": "district"}


def test_rows_without_privacy_unit_count_rows(tmp_path):
    rows = make_rows()[:50]
    path = tmp_path / "plain.parquet"
    write_snapshot(path, rows, rank=False)
    meta = DatasetMeta(CODE, None, {f.name: f for f in FIELDS}, row_count=len(rows))
    answer = execute.run(execution(meta, path, f"SELECT district FROM {CODE} LIMIT 9", epsilon=None))
    assert answer.persons == 9 and answer.table.column_names == ["district"]


def test_sensitivity_comes_from_the_catalog():
    from pathlib import Path

    from catalog.descriptor import parse_descriptor_text

    text = (Path(__file__).resolve().parents[1] / "catalog/descriptors/health.outpatient_visit.yaml").read_text()
    d, problems = parse_descriptor_text(text, "health.outpatient_visit.yaml")
    assert not problems
    meta = DatasetMeta.from_fields(d.code, d.privacy_unit, d.fields)
    assert (meta.fields["person_id"].sensitivity, meta.fields["district"].sensitivity, meta.fields["fee"].sensitivity,
            meta.fields["department"].sensitivity, meta.fields["chief_complaint"].sensitivity) == (
        "identifier", "quasi_identifier", "sensitive", "public", "free_text")

    class Row:   # a catalog DatasetField row: plain strings; and an object without the attribute
        def __init__(self, **kw):
            self.__dict__.update(kw)
    fields = [Row(name="a", type="integer", masking="none", nullable=True, domain=None, bounds=None, sensitivity="sensitive"),
              Row(name="b", type="integer", masking="none", nullable=True, domain=None, bounds=None)]
    got = DatasetMeta.from_fields("x.y", None, fields).fields
    assert (got["a"].sensitivity, got["b"].sensitivity) == ("sensitive", "public")
