"""sandbox/results/fingerprint.py: canonical cells, content fingerprints, export stamps, the three writers, and
reading a file found outside after the re-saves that happen to real files (pandas, spreadsheets).
Pure: no database, no server."""

from __future__ import annotations

import codecs
import csv
import datetime as dt
import decimal
import io
import json
import random
import time

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sandbox.results import fingerprint as fp
from sandbox.results.fingerprint import (
    Found,
    FoundFileError,
    canonical_cell,
    canonical_rows,
    content_fingerprint,
    csv_bytes,
    export_stamp,
    json_bytes,
    match_candidates,
    normalize_rows,
    parquet_bytes,
    read_found,
    similarity,
    verify_stamp,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
DISTRICTS = ["兴庆区", "金凤区", "西夏区", "永宁县", "贺兰县", "灵武市"]


def aggregate_table() -> pa.Table:
    """Like a DP answer: group keys, a noisy count and a noisy sum at full float precision."""
    rng = random.Random(5)
    return pa.table({
        "district": DISTRICTS,
        "month": [dt.date(2024, m, 1) for m in range(1, 7)],
        "visits": [rng.uniform(50, 5000) for _ in DISTRICTS],
        "fee_sum": [rng.uniform(1e4, 1e7) for _ in DISTRICTS],
        "people": [12, 7, 0, 3, 1500, 42],
    })


def rows_table() -> pa.Table:
    """Like a masked row answer: pseudonyms, partial masks, Chinese text, dates, decimals, nulls."""
    return pa.table({
        "pid": ["p_3f9a1c", "p_77b2e0", "p_0c1d9e", "p_91aa02", "p_5e6f70"],
        "name": ["张*", "李**", None, "王*", "赵*"],
        "phone": ["138****5678", "139****0001", "186****2222", None, "150****9999"],
        "sex": ["男", "女", "女", "男", None],
        "visit_date": pa.array([dt.date(2024, 3, 1), dt.date(2024, 3, 2), None, dt.date(2023, 12, 31),
                                dt.date(2024, 2, 29)], pa.date32()),
        "fee": pa.array([decimal.Decimal("123.40"), decimal.Decimal("8.00"), None, decimal.Decimal("0.10"),
                         decimal.Decimal("99999.99")], pa.decimal128(10, 2)),
        "chronic": [True, False, None, True, False],
        "complaint": ["头痛，发热 3 天", "咳嗽, \"干咳\"", "", "腹痛\n伴呕吐", "复诊"],
        "age": [34, 61, None, 7, 88],
    })


def stamp_for(table: pa.Table, export_id: str = "ex-20240301-0001", *, key: bytes = KEY,
              synthetic: bool = False) -> dict:
    cfp = content_fingerprint(key, table)
    return {"export_id": export_id, "fingerprint": export_stamp(key, export_id, cfp), "result_id": 7,
            "query_id": 3, "synthetic": synthetic}


def traced(data: bytes, table: pa.Table, filename: str | None = None) -> Found:
    found = read_found(data, filename)
    assert content_fingerprint(KEY, table) in match_candidates(KEY, found)
    return found


def comment_lines(data: bytes) -> int:
    return sum(1 for ln in data.decode("utf-8-sig").splitlines()[:3] if ln.startswith("# pdao"))


def strip_comments(data: bytes) -> bytes:
    text = data.decode("utf-8-sig")
    n = comment_lines(data)
    return (text.split("\n", n)[-1] if n else text).encode("utf-8")


def strip_comments_and_header(data: bytes) -> bytes:
    """What someone who deletes the first lines in an editor leaves: the data rows, byte for byte
    (neither our comment lines nor the header of these tables hold a line break)."""
    return strip_comments(data).split(b"\n", 1)[1]


def pandas_resave(data: bytes, shuffle: int | None = None, **to_csv) -> bytes:
    df = pd.read_csv(io.BytesIO(data), skiprows=comment_lines(data))
    if shuffle is not None:
        df = df.sample(frac=1, random_state=shuffle)
    return df.to_csv(**({"index": False, "header": False} | to_csv)).encode("utf-8")


def spreadsheet_cell(text: str) -> str:
    """What Excel/WPS on a Chinese Windows shows and saves back for one CSV cell, where the cell keeps
    its value: numbers at 15 significant digits (leading zeros gone), TRUE/FALSE, dates as 2024/3/1."""
    s = text.strip()
    if s.lower() in ("true", "false"):
        return s.upper()
    try:
        x = float(s)
    except ValueError:
        x = None
    if x is not None and s.lower() not in ("nan", "inf", "-inf", "infinity", "-infinity"):
        return "%.15G" % x
    try:
        d = dt.date.fromisoformat(s)
        return f"{d.year}/{d.month}/{d.day}"
    except ValueError:
        return text


def spreadsheet_resave(data: bytes, *, encoding: str = "utf-8-sig", delimiter: str = ",",
                       quoting: int = csv.QUOTE_MINIMAL, line_end: str = "\r\n") -> bytes:
    reader = csv.reader(io.StringIO(data.decode("utf-8-sig"), newline=""))
    out = io.StringIO(newline="")
    w = csv.writer(out, delimiter=delimiter, quoting=quoting, lineterminator=line_end)
    for row in reader:
        w.writerow(row if row and row[0].startswith("# pdao") else [spreadsheet_cell(c) for c in row])
    return out.getvalue().encode(encoding)


# ------------------------------------------------------------------------------------ canonical cells

@pytest.mark.parametrize("values, expected", [
    ([1234.5, "1234.50", "1.2345E3", "1.2345e+03", " 1234.5 ", decimal.Decimal("1234.500"), "+1234.5"], "1234.5"),
    ([-0.0, 0, "-0", "-0.000", "0e10", decimal.Decimal("-0.00")], "0"),
    ([7, "007", "7.0", 7.0, "7.", decimal.Decimal("7.00")], "7"),
    ([None, float("nan"), "", "  ", "NA", "NaN", "nan", "NULL", "None", "#N/A", "<NA>", decimal.Decimal("NaN")], ""),
    ([True, "TRUE", "True", "true", " true "], "true"),
    ([False, "FALSE", "False"], "false"),
    ([float("inf"), "inf", "Infinity", "INF"], "inf"),
    ([float("-inf"), "-inf", "-Infinity"], "-inf"),
    ([dt.date(2024, 3, 1), "2024-03-01", "2024/3/1", "2024/03/01", "2024.3.1", "2024年3月1日",
      "2024-03-01 00:00:00", "2024-03-01T00:00:00", "2024/3/1 0:00", dt.datetime(2024, 3, 1)], "2024-03-01"),
    ([dt.datetime(2024, 3, 1, 8, 30, tzinfo=dt.timezone.utc), "2024-03-01 08:30:00.000000Z",
      "2024-03-01T16:30:00+08:00", "2024-03-01T08:30:00+00:00"], "2024-03-01T08:30:00"),
    ([dt.datetime(2024, 3, 1, 8, 30), "2024/3/1 8:30", "2024-03-01 08:30:00.000000"], "2024-03-01T08:30:00"),
    ([dt.time(8, 30), "08:30:00.000000", "8:30", "8:30:00"], "08:30:00"),
    ([123456789.123456789, "123456789.12345679", "123456789.123457", "1.23456789123457E+08"], "123456789.123"),
    ([640102199001011234, "640102199001011234", "6.40102199001011E+17"], "640102199001000000"),
    ([1e20, "1e+20", "100000000000000000000"], "100000000000000000000"),
    ([1e-7, "1e-07", "0.0000001", "1E-7"], "0.0000001"),
    ([" 兴庆区 ", "兴庆区", "\u3000兴庆区"], "兴庆区"),
    (["腹痛\r\n伴呕吐", "腹痛\n伴呕吐", "腹痛\r伴呕吐"], "腹痛\n伴呕吐"),
    ([[1, 2], "[1, 2]", (1, 2)], "[1,2]"),
])
def test_canonical_cell_agrees_across_spellings(values, expected):
    assert [canonical_cell(v) for v in values] == [expected] * len(values)


def test_odd_numbers_never_break_a_file():
    for text in ("1e400", "-1e400", "1.0000000000005e9999999", "9" * 400, "1.000000000000500000e-300"):
        canonical_cell(text)
        fp._midpoint_readings(text)
    data = b"a,1e400\nb,1.0000000000005e9999999\nc,0.1234567890124e-30\n"
    assert read_found(data).candidates[-1] == [("a", "inf"), ("b", "inf"), ("c", "0.000000000000000000000000000000123456789012")]


@pytest.mark.parametrize("text", ["2024-02-30", "2024/13/1", "1-2", "12:75", "abc", "p_0012", "138****5678",
                                  "1,234", "0x1A", "1_000", "E11.9", "2024-03"])
def test_texts_that_are_not_numbers_or_dates_stay_text(text):
    assert canonical_cell(text) == text


def test_numbers_agree_with_every_printing_of_at_least_15_digits():
    rng = random.Random(1)
    for _ in range(20000):
        x = rng.choice([rng.uniform(-1, 1), rng.uniform(0, 1e4), rng.lognormvariate(0, 12), rng.gauss(0, 1e-6)])
        c = canonical_cell(x)
        assert canonical_cell(repr(x)) == c
        assert canonical_cell("%.17g" % x) == c
        # a 15-digit print agrees unless it sits exactly on a 12-digit midpoint (handled by alternates)
        text15 = "%.15G" % x
        if fp._midpoint_readings(text15) is None:
            assert canonical_cell(text15) == c, (x, text15)
        else:
            assert c in fp._midpoint_readings(text15)


def test_canonical_rows_of_a_table_with_float32_decimal_and_nanosecond_columns():
    t = pa.table({"f32": pa.array([0.1, None], pa.float32()),
                  "dec": pa.array([decimal.Decimal("1.10"), None], pa.decimal128(5, 2)),
                  "ns": pa.array([1_709_281_800_000_000_123, None], pa.timestamp("ns")),
                  "d": pa.array(["a", "b"]).dictionary_encode()})
    assert canonical_rows(t) == [("0.1", "1.1", "2024-03-01T08:30:00", "a"), ("", "", "", "b")]


# ----------------------------------------------------------------------------------------- fingerprint

def test_content_fingerprint_ignores_names_header_and_row_order():
    t = aggregate_table()
    base = content_fingerprint(KEY, t)
    assert len(base) == 64 and int(base, 16) >= 0
    assert content_fingerprint(KEY, t.rename_columns([f"c{i}" for i in range(t.num_columns)])) == base
    shuffled = t.take(pa.array([3, 0, 5, 1, 4, 2]))
    assert content_fingerprint(KEY, shuffled) == base
    assert content_fingerprint(KEY, canonical_rows(t)) == base
    # all-empty rows and trailing all-empty columns are not part of the content
    rows = canonical_rows(t)
    assert content_fingerprint(KEY, [r + ("",) for r in rows] + [("",) * 6]) == base


def test_content_fingerprint_changes_with_any_cell_a_row_the_column_order_or_the_key():
    t = aggregate_table()
    base = content_fingerprint(KEY, t)
    rows = canonical_rows(t)
    one_cell = [rows[0][:2] + ("999",) + rows[0][3:]] + rows[1:]
    assert content_fingerprint(KEY, one_cell) != base
    assert content_fingerprint(KEY, rows[1:]) != base                         # a row dropped
    assert content_fingerprint(KEY, rows + [rows[0]]) != base                 # a row duplicated
    assert content_fingerprint(KEY, [(r[1], r[0]) + r[2:] for r in rows]) != base   # two columns swapped
    assert content_fingerprint(OTHER_KEY, t) != base
    assert content_fingerprint(KEY, [("a,b",)]) != content_fingerprint(KEY, [("a", "b")])
    with pytest.raises(ValueError):
        content_fingerprint(b"short", t)


def test_export_stamp_verifies_and_a_forged_one_does_not():
    t = aggregate_table()
    cfp = content_fingerprint(KEY, t)
    stamp = stamp_for(t, "ex-1")
    assert verify_stamp(KEY, stamp, cfp)
    assert verify_stamp(KEY, stamp | {"fingerprint": stamp["fingerprint"].upper()}, cfp)
    assert not verify_stamp(KEY, stamp | {"export_id": "ex-2"}, cfp)               # export id changed
    assert not verify_stamp(KEY, stamp, content_fingerprint(KEY, canonical_rows(t)[1:]))   # other content
    assert not verify_stamp(OTHER_KEY, stamp, cfp)
    assert export_stamp(KEY, "ex-1", cfp) != export_stamp(OTHER_KEY, "ex-1", cfp)
    for bad in (None, {}, [], {"export_id": "ex-1"}, {"export_id": None, "fingerprint": "00"},
                {"export_id": True, "fingerprint": stamp["fingerprint"]}, {"export_id": "ex-1", "fingerprint": 5},
                {"export_id": "ex-1", "fingerprint": "égal"}):
        assert verify_stamp(KEY, bad, cfp) is False


def test_derive_key_is_per_purpose():
    secret = b"s" * 32
    assert fp.derive_key(secret) == fp.derive_key(secret) != fp.derive_key(secret, "other")
    assert len(fp.derive_key(secret)) == 32
    with pytest.raises(ValueError):
        fp.derive_key(b"short")


# --------------------------------------------------------------------------------------------- writers

@pytest.mark.parametrize("make", [aggregate_table, rows_table])
def test_round_trip_all_three_formats(make):
    t = make()
    stamp = stamp_for(t)
    cfp = content_fingerprint(KEY, t)
    for data, kind in ((csv_bytes(t, stamp), "csv"), (csv_bytes(t, stamp, bom=True), "csv"),
                       (parquet_bytes(t, stamp), "parquet"), (json_bytes(t, stamp, {"result_id": 7}), "json")):
        found = traced(data, t)
        assert found.format == kind
        assert found.stamp == stamp
        assert verify_stamp(KEY, found.stamp, cfp)
        assert match_candidates(KEY, found)[0] == cfp        # the first candidate is the right one
        assert found.columns == t.column_names


def test_csv_comment_lines_and_synthetic_notice():
    t = rows_table()
    real = csv_bytes(t, stamp_for(t)).decode()
    first, second = real.splitlines()[:2]
    assert first.startswith("# pdao export ex-20240301-0001 fingerprint ")
    assert not second.startswith("#")
    dev = csv_bytes(t, stamp_for(t, synthetic=True)).decode().splitlines()
    assert dev[1].startswith("# pdao synthetic") and "合成数据" in dev[1]
    for line in (first, dev[1]):        # one cell in every dialect a spreadsheet may pick
        assert not any(ch in line for ch in ',;\t|"')
    # awkward values survive the comment line
    odd = {"export_id": "ex 1,2;3", "fingerprint": "ab" * 32, "result_id": 7, "note": "a \"b\" 中文",
           "synthetic": False, "issued_at": "2024-03-01T08:30:00+00:00", "size": 1.5}
    line = csv_bytes(t, odd).decode().splitlines()[0]
    assert not any(ch in line for ch in ',;\t|"')
    assert read_found(csv_bytes(t, odd)).stamp == odd
    with pytest.raises(ValueError):
        csv_bytes(t, {"export_id": "x"})
    with pytest.raises(ValueError):
        csv_bytes(t, {"export_id": "x", "fingerprint": "y", "bad key": 1})


def test_json_is_strict_and_extra_cannot_replace_export_or_rows():
    t = pa.table({"x": [1.5, float("nan"), float("inf"), float("-inf")], "d": [decimal.Decimal("1.10")] * 4})
    stamp = stamp_for(t)

    def no_constants(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    extra = {"noise": {"x": {"epsilon": 0.5, "bound": float("inf"), "scale": float("nan")}}, "at": dt.date(2024, 3, 1)}
    body = json.loads(json_bytes(t, stamp, extra), parse_constant=no_constants)
    assert list(body) == ["export", "noise", "at", "rows"]
    assert body["noise"] == {"x": {"epsilon": 0.5, "bound": "inf", "scale": None}} and body["at"] == "2024-03-01"
    assert body["rows"] == [{"x": 1.5, "d": "1.10"}, {"x": None, "d": "1.10"}, {"x": "inf", "d": "1.10"},
                            {"x": "-inf", "d": "1.10"}]
    traced(json_bytes(t, stamp), t)
    for bad in ({"export": 1}, {"rows": []}):
        with pytest.raises(ValueError):
            json_bytes(t, stamp, bad)


def test_json_with_duplicate_column_names_keeps_every_column():
    t = pa.Table.from_arrays([pa.array([1, 2]), pa.array(["a", "b"])], names=["x", "x"])
    body = json.loads(json_bytes(t, stamp_for(t)))
    assert body["rows"] == [{"x": 1, "x_2": "a"}, {"x": 2, "x_2": "b"}]
    traced(json_bytes(t, stamp_for(t)), t)


def test_parquet_stamp_replaces_the_result_store_entry_and_keeps_other_metadata():
    t = aggregate_table().replace_schema_metadata({b"pdao": b'{"query_id": 3}', b"other": b"kept"})
    stamp = stamp_for(t)
    meta = pq.read_table(io.BytesIO(parquet_bytes(t, stamp))).schema.metadata
    assert json.loads(meta[b"pdao"]) == stamp and meta[b"other"] == b"kept"


def test_nested_binary_duration_and_other_types_are_written_so_they_still_match():
    t = pa.table({"k": ["a", "b"], "codes": [[1, 2], None], "s": [{"x": 1}, {"x": 2}],
                  "bin": pa.array([b"ab", b"\xff"]), "dur": pa.array([dt.timedelta(seconds=5), None], pa.duration("ms")),
                  "dict": pa.array(["x", "y"]).dictionary_encode(), "u64": pa.array([2**64 - 1, 0], pa.uint64()),
                  "t32": pa.array([dt.time(1, 2, 3), None], pa.time32("s")), "nothing": pa.nulls(2),
                  "d256": pa.array([decimal.Decimal("1.5"), None], pa.decimal256(40, 2))})
    for data in (csv_bytes(t, stamp_for(t)), json_bytes(t, stamp_for(t)), parquet_bytes(t, stamp_for(t))):
        traced(data, t)


# ---------------------------------------------------------------------------------------- found files

@pytest.mark.parametrize("make", [aggregate_table, rows_table])
def test_found_csv_as_downloaded_and_with_header_and_comment_stripped(make):
    t = make()
    data = csv_bytes(t, stamp_for(t, synthetic=True))
    traced(data, t)
    stripped = strip_comments_and_header(data)
    found = traced(stripped, t)
    assert found.stamp is None
    # header kept, comment stripped; comment kept, header stripped
    traced(b"".join(ln for ln in data.splitlines(keepends=True) if not ln.startswith(b"#")), t)
    lines = data.splitlines(keepends=True)
    found = traced(b"".join(lines[:2] + lines[3:]), t)
    assert found.stamp is not None


@pytest.mark.parametrize("make", [aggregate_table, rows_table])
def test_found_csv_resaved_by_pandas(make):
    t = make()
    data = csv_bytes(t, stamp_for(t))
    traced(pandas_resave(data), t)                                    # no header, no index
    traced(pandas_resave(data, header=True), t)
    traced(pandas_resave(data, index=True), t)                        # pandas' default: an index column
    traced(pandas_resave(data, index=True, header=False), t)
    traced(pandas_resave(data, sep="\t"), t, "out.tsv")
    traced(pandas_resave(data, sep=";", quoting=csv.QUOTE_ALL), t)


@pytest.mark.parametrize("make", [aggregate_table, rows_table])
def test_found_csv_resaved_by_a_spreadsheet(make):
    t = make()
    data = csv_bytes(t, stamp_for(t), bom=True)
    # Excel/WPS: CRLF + BOM, 15-digit numbers, TRUE/FALSE, 2024/3/1, quoting changed
    traced(spreadsheet_resave(data), t)
    traced(spreadsheet_resave(data, quoting=csv.QUOTE_ALL), t)
    # Chinese Windows default: GBK, no BOM, comment line kept
    found = traced(spreadsheet_resave(data, encoding="gbk"), t)
    assert found.details["encoding"] == "gb18030" and found.stamp is not None
    # "Unicode text": UTF-16 with BOM, tab-separated
    found = traced(spreadsheet_resave(data, encoding="utf-16", delimiter="\t"), t)
    assert found.details["delimiter"] == "\t"
    # the header and comment stripped, then re-saved in GBK
    traced(spreadsheet_resave(strip_comments_and_header(data), encoding="gbk"), t)


def test_found_csv_comment_padded_by_a_spreadsheet_still_gives_the_stamp():
    t = aggregate_table()
    stamp = stamp_for(t)
    lines = csv_bytes(t, stamp).decode().splitlines()
    padded = "\r\n".join([lines[0] + ",,,,", f'"{lines[0]}",,,,'] + lines[1:]) + "\r\n"
    found = traced(padded.encode("utf-8-sig"), t)
    assert found.stamp == stamp


def test_a_one_column_file_whose_cells_hold_semicolons():
    t = pa.table({"note": ["a;b", "c;d", "e;f"]})
    traced(strip_comments_and_header(csv_bytes(t, stamp_for(t))).replace(b'"', b""), t)
    t = pa.table({"note": ["a|b", "c", "e|f|g"]})
    traced(pandas_resave(csv_bytes(t, stamp_for(t))), t)


def test_found_csv_rows_shuffled_and_blank_lines_added():
    t = rows_table()
    buf = io.BytesIO()
    df = pd.read_csv(io.BytesIO(csv_bytes(t, stamp_for(t))), comment="#", dtype=str, keep_default_na=False)
    df.sample(frac=1, random_state=3).to_csv(buf, index=False)
    traced(buf.getvalue() + b"\n\n", t)


def test_found_json_and_parquet_exports_and_their_resaves():
    t = aggregate_table()
    stamp = stamp_for(t)
    body = json.loads(json_bytes(t, stamp))
    traced(json.dumps(body["rows"], ensure_ascii=False).encode("gbk"), t)                  # the list only
    traced(json.dumps([list(r.values()) for r in body["rows"]]).encode(), t)               # arrays
    traced(json.dumps([list(body["rows"][0])] + [list(r.values()) for r in body["rows"]]).encode(), t)
    traced("\n".join(json.dumps(r) for r in body["rows"]).encode(), t)                     # JSON lines
    df = pd.DataFrame(body["rows"])
    for orient in ("records", "split", "columns", "index", "values"):
        traced(df.to_json(orient=orient, double_precision=15).encode(), t)
    traced(json.dumps(df.to_dict("list")).encode(), t)
    # Parquet re-saved by pandas (metadata and types may change), with and without an index
    pdf = pd.read_parquet(io.BytesIO(parquet_bytes(t, stamp)))
    for index in (False, True, None):
        buf = io.BytesIO()
        pdf.sample(frac=1, random_state=1).to_parquet(buf, index=index)
        traced(buf.getvalue(), t)


def test_found_format_comes_from_the_content_not_the_name():
    t = aggregate_table()
    stamp = stamp_for(t)
    assert traced(parquet_bytes(t, stamp), t, "report.csv").format == "parquet"
    assert traced(json_bytes(t, stamp), t, "report.csv").format == "json"
    assert traced(csv_bytes(t, stamp), t, "report.json").format == "csv"
    # a CSV whose first cell starts with "[" is still a CSV
    t2 = pa.table({"bracket": ["[a]", "[b]"], "n": [1, 2]})
    assert traced(strip_comments_and_header(csv_bytes(t2, stamp_for(t2))), t2).format == "csv"


def test_a_cell_on_a_rounding_midpoint_is_tried_both_ways():
    # 15 significant digits, the last three 500: a 12-digit midpoint, so the file cannot tell which
    # way the original value rounds; both readings are looked up.
    below, above = 1.2345678901249999, 1.2345678901250001
    for x in (below, above):
        assert "%.15g" % x == "1.234567890125"
        t = pa.table({"k": ["a", "b"], "v": [x, 2.5]})
        data = f"a,{'%.15g' % x}\r\nb,2.5\r\n".encode()
        found = read_found(data)
        assert any(found.alternates)
        assert content_fingerprint(KEY, t) in match_candidates(KEY, found)
    assert canonical_cell(below) != canonical_cell(above)


def test_a_changed_cell_or_a_dropped_row_in_a_found_file_does_not_match():
    t = aggregate_table()
    data = strip_comments_and_header(csv_bytes(t, stamp_for(t)))
    lines = data.decode().splitlines(keepends=True)
    changed = lines[0].replace("兴庆区", "金凤区")
    assert content_fingerprint(KEY, t) not in match_candidates(KEY, read_found("".join([changed] + lines[1:]).encode()))
    assert content_fingerprint(KEY, t) not in match_candidates(KEY, read_found("".join(lines[1:]).encode()))
    assert content_fingerprint(OTHER_KEY, t) not in match_candidates(KEY, read_found(data))


def test_similarity_finds_a_file_whose_numbers_lost_digits():
    """Excel's General format keeps at most 11 characters (about 10 significant digits) when it saves a
    CSV, and 6 in scientific notation: the fingerprint no longer matches, similarity does."""
    t = aggregate_table()
    data = strip_comments_and_header(csv_bytes(t, stamp_for(t)))

    def general(c: str) -> str:
        try:
            x = float(c)
        except ValueError:
            return c
        return "%.6E" % x if abs(x) >= 1e11 else ("%.10g" % x)[:11]

    rows = [[general(c) for c in r] for r in csv.reader(io.StringIO(data.decode()))]
    out = io.StringIO()
    csv.writer(out).writerows(rows)
    found = read_found(out.getvalue().encode())
    assert content_fingerprint(KEY, t) not in match_candidates(KEY, found)
    assert similarity(found, t) == 1.0
    other = aggregate_table().set_column(2, "visits", pa.array([v * 1.001 for v in t.column(2).to_pylist()]))
    assert similarity(found, other) == 0.0
    half = t.slice(0, 3)
    assert similarity(found, half) == 0.5
    assert similarity(read_found(data), t) == 1.0
    assert similarity(found, pa.table({"x": [1]})) == 0.0


# --------------------------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("data, code", [
    (b"", "found_file_empty"),
    (b"  \r\n\t", "found_file_empty"),
    (bytes(random.Random(0).randbytes(4096)), "found_file_unreadable"),
    (b"\x00\x01\x02\x03" * 100, "found_file_unreadable"),
    (b"PK\x03\x04" + b"\x00" * 100, "found_file_unsupported"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00" * 100, "found_file_unsupported"),
    (b"PAR1garbagegarbagePAR1", "found_file_unreadable"),
    (b'{"rows": [1, 2', "found_file_unreadable"),
    (b'{"a": 1}', "found_file_unreadable"),
    (b"[" * 100000 + b"]" * 100000, "found_file_unreadable"),
    (b"# pdao export ex-1 fingerprint 00\n\n", "found_file_unreadable"),
    (('"' + "x" * 200000 + '"\n').encode(), "found_file_unreadable"),
])
def test_garbage_is_refused_with_a_clear_error(data, code):
    with pytest.raises(FoundFileError) as e:
        read_found(data)
    assert e.value.code == code
    assert e.value.message and e.value.message_zh
    assert isinstance(e.value, ValueError)


def test_too_large_is_refused_before_reading():
    t = aggregate_table()
    data = csv_bytes(t, stamp_for(t))
    with pytest.raises(FoundFileError) as e:
        read_found(data, max_bytes=len(data) - 1)
    assert e.value.code == "found_file_too_large" and e.value.status == 413
    for data in (data, parquet_bytes(t, stamp_for(t)), json_bytes(t, stamp_for(t))):
        with pytest.raises(FoundFileError) as e:
            read_found(data, max_rows=3)
        assert e.value.code == "found_file_too_large"


def test_damaged_files_never_raise_anything_but_found_file_error():
    t = rows_table()
    rng = random.Random(11)
    for data in (csv_bytes(t, stamp_for(t)), parquet_bytes(t, stamp_for(t)), json_bytes(t, stamp_for(t))):
        for _ in range(150):
            b = bytearray(data)
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            if rng.random() < 0.3:
                b = b[: rng.randrange(1, len(b))]
            try:
                found = read_found(bytes(b))
            except FoundFileError:
                continue
            match_candidates(KEY, found)


# ------------------------------------------------------------------------------------- property-style

def random_table(rng: random.Random) -> pa.Table:
    n = rng.randint(1, 25)
    text = "abcxyz张王李兴庆区金凤 ,;\"'\n-_*#.0123456789"

    def maybe(v):
        return None if rng.random() < 0.12 else v

    def string_value():
        r = rng.random()
        if r < 0.1:
            return rng.choice(["007", "1e5", "NA", "None", "TRUE", "  pad  ", "0.50", "2024/3/1", "-0", "inf"])
        return "".join(rng.choice(text) for _ in range(rng.randint(1, 12)))

    makers = {
        "int": lambda: maybe(rng.choice([rng.randint(-1000, 1000), rng.randint(-10**15, 10**15)])),
        "float": lambda: maybe(rng.choice([rng.uniform(-1e6, 1e6), rng.lognormvariate(0, 8),
                                           round(rng.uniform(0, 1e4), rng.randint(0, 4)), rng.gauss(0, 1e-4),
                                           float(rng.randint(0, 100))])),
        "date": lambda: maybe(dt.date(2020, 1, 1) + dt.timedelta(days=rng.randint(0, 2000))),
        "string": lambda: maybe(string_value()),
        "bool": lambda: maybe(rng.random() < 0.5),
    }
    types = {"int": pa.int64(), "float": pa.float64(), "date": pa.date32(), "string": pa.string(), "bool": pa.bool_()}
    cols = {}
    for i in range(rng.randint(1, 6)):
        kind = rng.choice(list(makers))
        cols[f"c{i}_{kind}"] = pa.array([makers[kind]() for _ in range(n)], types[kind])
    return pa.table(cols)


def test_property_random_tables_survive_a_pandas_resave():
    rng = random.Random(20240301)
    misses = []
    for i in range(300):
        t = random_table(rng)
        if not normalize_rows(canonical_rows(t)):
            continue
        data = csv_bytes(t, stamp_for(t, f"ex-{i}"))
        resaved = pandas_resave(data, shuffle=i, index=rng.random() < 0.3, header=rng.random() < 0.5)
        found = read_found(resaved)
        if content_fingerprint(KEY, t) not in match_candidates(KEY, found):
            misses.append((i, t.to_pydict(), resaved))
    assert not misses, misses[:2]


def test_property_random_tables_survive_a_spreadsheet_resave():
    rng = random.Random(7)
    misses = []
    for i in range(200):
        t = random_table(rng)
        if not normalize_rows(canonical_rows(t)):
            continue
        data = csv_bytes(t, stamp_for(t, f"ex-{i}"), bom=rng.random() < 0.5)
        if rng.random() < 0.5:
            data = strip_comments_and_header(data.removeprefix(codecs.BOM_UTF8))
        enc = rng.choice(["utf-8-sig", "gb18030", "utf-16"])
        resaved = spreadsheet_resave(data, encoding=enc, delimiter="\t" if enc == "utf-16" else ",",
                                     quoting=rng.choice([csv.QUOTE_MINIMAL, csv.QUOTE_ALL]))
        found = read_found(resaved)
        if content_fingerprint(KEY, t) not in match_candidates(KEY, found):
            misses.append((i, t.to_pydict(), resaved))
    assert not misses, misses[:2]


def test_a_ten_thousand_row_export_is_traced_quickly():
    rng = random.Random(3)
    n = 10_000
    t = pa.table({"pid": [f"p_{rng.getrandbits(40):010x}" for _ in range(n)],
                  "district": [rng.choice(DISTRICTS) for _ in range(n)],
                  "visit_date": [dt.date(2024, 1, 1) + dt.timedelta(days=rng.randint(0, 365)) for _ in range(n)],
                  "fee": [round(rng.lognormvariate(5, 1), 2) for _ in range(n)],
                  "age": [rng.randint(0, 99) for _ in range(n)],
                  "complaint": [rng.choice(["头痛", "咳嗽，发热", "复诊", None]) for _ in range(n)]})
    start = time.perf_counter()
    data = pandas_resave(csv_bytes(t, stamp_for(t)))
    traced(data, t)
    assert time.perf_counter() - start < 10


def _reference_fingerprint(key: bytes, t: pa.Table) -> str:
    """The fingerprint as the module defines it, cell by cell: canonical rows, normalized, a digest per row."""
    cells = [[canonical_cell(v) for v in fp._column_values(c)] for c in t.columns]
    rows = list(zip(*cells)) if cells else [() for _ in range(t.num_rows)]
    assert canonical_rows(t) == rows
    return content_fingerprint(key, rows)


def test_property_a_tables_fingerprint_is_that_of_its_canonical_rows():
    """A table's fingerprint is computed column by column in Arrow (each distinct value once, plain
    texts found by a regular expression, rows hashed in one call): the same value as cell by cell,
    on random tables, texts made to sit on the plain-text rule's edges, empty rows and columns."""
    rng = random.Random(11)
    edges = ["NA", "Na", "nA", "N/A", "n/a", "INF", "Infinity", "nULL", "None", "TRUE", "tRuE", "x ", " x", "a\x1c",
             "\x1fa", "Z", "_", "a-b", "e1", "E5", "a\r\nb", "é", "a\u3000", "[1]", "{}", "", " ", "A0000001"]
    for i in range(300):
        t = random_table(rng)
        if i % 3 == 0:
            n = rng.randint(0, 12)
            t = pa.table({"edge": [rng.choice(edges + [None]) for _ in range(n)],
                          "blank": pa.array([None] * n, pa.string()),
                          "mixed": [rng.choice([None, "", "k"]) for _ in range(n)]})
        assert content_fingerprint(KEY, t) == _reference_fingerprint(KEY, t), t.to_pydict()
    for t in (rows_table(), aggregate_table(), pa.table({"a": pa.array([], pa.string())}),
              pa.table({"l": [[1, 2], None, []], "d": pa.array(["x", "y", "x"]).dictionary_encode(),
                        "f": pa.array([1.5, None, float("nan")], pa.float32()),
                        "ts": pa.array([1, 2, 3], pa.timestamp("ns", "UTC")), "dec": pa.array(
                            [decimal.Decimal("1.10"), None, decimal.Decimal("-0")], pa.decimal128(5, 2))})):
        assert content_fingerprint(KEY, t) == _reference_fingerprint(KEY, t)


def test_the_writers_give_the_same_bytes_a_piece_at_a_time():
    """Downloads are written a batch at a time (bounded memory): the CSV and JSON bytes are those of
    the whole table at once, and the Parquet file reads back as the same table and stamp."""
    rng = random.Random(12)
    for t in [rows_table(), aggregate_table(), rows_table().slice(0, 0)] + [random_table(rng) for _ in range(20)]:
        stamp = stamp_for(t)
        for size in (1, 2, 7):
            pieces = t.to_batches(max_chunksize=size)
            out = io.BytesIO()
            fp.write_csv(out, t.schema, pieces, stamp)
            assert out.getvalue() == csv_bytes(t, stamp)
            out = io.BytesIO()
            fp.write_json(out, t.schema, pieces, stamp, {"result_id": 7})
            assert out.getvalue() == json_bytes(t, stamp, {"result_id": 7})
            assert json.loads(out.getvalue())["rows"] == json.loads(json_bytes(t, stamp, {"result_id": 7}))["rows"]
            out = io.BytesIO()
            fp.write_parquet(out, t.schema, pieces, stamp)
            back = pq.read_table(io.BytesIO(out.getvalue()))
            whole = pq.read_table(io.BytesIO(parquet_bytes(t, stamp)))
            assert back.schema == whole.schema and back.schema.metadata == whole.schema.metadata
            assert content_fingerprint(KEY, back) == content_fingerprint(KEY, whole) == content_fingerprint(KEY, t)


def test_a_large_tables_fingerprint_is_fast():
    n = 200_000
    t = pa.table({"ref": [f"A{i:07d}" for i in range(n)], "flag": [i % 3 == 0 for i in range(n)],
                  "band": [["0", "1", "2-3", "4+"][i % 4] for i in range(n)]})
    start = time.perf_counter()
    content_fingerprint(KEY, t)
    assert time.perf_counter() - start < 5
