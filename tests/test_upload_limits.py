"""Uploads that cannot exhaust the server, second review (issue #13): a Parquet bomb is refused
before its values are decoded (by its encoding, and by a count of its values within a memory limit
that stops past the limit), a bound that cannot be computed refuses the file, the PII scan is
linear and runs within a time budget, decimal columns are scanned, and each company has a rate and
a concurrency limit counted in the database before its file is read."""

from __future__ import annotations

import dataclasses
import io
import json
import struct
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sqlalchemy import update
from sqlmodel import Session, select

import api.routes.uploads as upload_routes
import sandbox.uploads.service as uploads
from pdao.kernel.db import utcnow
from pdao.kernel.errors import PdaoError
from pdao.kernel.identity.models import Organization, User
from sandbox.uploads.models import TenantUploadCheck
from sandbox.uploads.service import UPLOAD_LEASE_SECONDS, admit_upload, finish_upload
from tests.conftest import login
from tests.test_tenant_uploads import APPLICANTS, CLAIMS, IDS, applicant_rows, files_under, send, to_csv, upload_rows
from tests.test_upload_bounds import app_client, audit_reasons

API = "/api/v1"
DATA = Path(__file__).parent / "data"
# The review's file (gen_parquet_bomb.py 10000 1000000 500): 8,861 bytes; a string column of
# 10,000 identical values of 1 MB written with DELTA_BYTE_ARRAY, its footer claiming 20 MB. It cost
# 28 s of CPU and ~1 GB of memory per upload before the fix.
BOMB = DATA / "parquet_bomb_delta.parquet"
BOMB_SCHEMA = {"name": "bomb", "columns": [
    {"name": "id_number", "type": "string", "role": "join_key", "pii_kind": "cn_id", "joins": "health.resident.id_number"},
    {"name": "note1", "type": "string"}]}
NOTES_SCHEMA = {"name": "notes", "columns": [
    {"name": "id_number", "type": "string", "role": "join_key", "pii_kind": "cn_id", "joins": "health.resident.id_number"},
    {"name": "note", "type": "string"}]}
# The review's text for the address pattern: a start word, 30 administrative suffixes, an anchor.
ADDRESS_BAIT = "在" + "镇" * 30 + "1号"


def delta_bomb(path: Path, rows: int, value_len: int, per_group: int) -> Path:
    """The review's generator (gen_parquet_bomb.py): identical long strings, DELTA_BYTE_ARRAY."""
    schema = pa.schema([("id_number", pa.string()), ("note1", pa.string())])
    with pq.ParquetWriter(path, schema, compression="zstd", use_dictionary=False,
                          column_encoding={"id_number": "PLAIN", "note1": "DELTA_BYTE_ARRAY"}) as w:
        done = 0
        while done < rows:
            k = min(per_group, rows - done)
            w.write_table(pa.table({"id_number": [IDS[0]] * k, "note1": ["A" * value_len] * k}, schema=schema))
            done += k
    return path


def footer_claiming_plain(data: bytes) -> bytes:
    """The same file with a footer that lists PLAIN where the pages are DELTA_BYTE_ARRAY (the
    encodings list [RLE, DELTA_BYTE_ARRAY] and each page's encoding stats, thrift compact: 7 -> 0;
    the footer keeps its length). Readers decode by each page's own header, so it still decodes."""
    n = struct.unpack("<I", data[-8:-4])[0]
    start = len(data) - 8 - n
    footer = data[start:-8]
    lied = (footer.replace(b"\x25\x06\x0e", b"\x25\x06\x00").replace(b"\x25\x0e\x06", b"\x25\x00\x06")
            .replace(b"\x15\x00\x15\x0e", b"\x15\x00\x15\x00"))
    assert lied != footer and len(lied) == len(footer)
    return data[:start] + lied + data[-8:]


def encodings_in_footer(data: bytes) -> set[str]:
    """The encodings a Parquet file's footer lists, as DuckDB reads them."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "f.parquet"
        path.write_bytes(data)
        return {e.strip() for (enc,) in duckdb.execute(f"SELECT encodings FROM parquet_metadata('{path}')").fetchall()
                for e in enc.split(",")}


def post(client, headers, data: bytes, schema: dict, filename: str = "b.parquet"):  # noqa: ANN001, ANN201
    return client.post(f"{API}/uploads", headers=headers, data={"schema": json.dumps(schema)},
                       files={"file": (filename, data, "application/octet-stream")})


def no_per_row_work(monkeypatch) -> None:  # noqa: ANN001
    def per_row_work(*_a, **_k):
        raise AssertionError("a per-row check ran")

    # what reads every value: the value checks' conditions, the PII scan, the canonical copy
    monkeypatch.setattr(uploads, "_type_problem_condition", per_row_work)
    monkeypatch.setattr(uploads, "scan_pii", per_row_work)
    monkeypatch.setattr(uploads, "_typed", per_row_work)


class PeakRss:
    """The process's resident memory, sampled while inside: how far above its level at entry it went."""

    def __enter__(self) -> PeakRss:
        self.before = self.peak = self._rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._sample, daemon=True)
        self._t.start()
        return self

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss())

    @property
    def grew(self) -> int:
        return self.peak - self.before


def nothing_stored(engine, settings) -> bool:  # noqa: ANN001
    staged = [p for p in settings.staging_dir.iterdir() if not p.name.startswith("duckdb")]
    return upload_rows(engine) == 0 and files_under(settings) == [] and staged == []


# --- the Parquet bomb ---------------------------------------------------------------------------

def test_the_review_parquet_bomb_is_refused_by_its_encoding_before_a_value_is_decoded(
        client, auth, engine, settings, monkeypatch):
    data = BOMB.read_bytes()
    assert len(data) == 8861 and pq.ParquetFile(BOMB).metadata.num_rows == 10_000
    no_per_row_work(monkeypatch)

    def count_values(*_a, **_k):
        raise AssertionError("the values were counted")

    monkeypatch.setattr(uploads, "parquet_value_bytes", count_values)
    started = time.perf_counter()
    with PeakRss() as rss:
        r = post(client, auth("insurer_a"), data, BOMB_SCHEMA)
    elapsed = time.perf_counter() - started
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["code"] == "upload_invalid" and body["message_zh"]
    [problem] = body["details"]["problems"]
    assert (problem["check"], problem["column"], problem["encodings"]) == ("encoding", "note1", ["DELTA_BYTE_ARRAY"])
    assert "PLAIN" in problem["message"]
    assert elapsed < 5, f"{elapsed:.1f} s"   # 0.1 s measured; 33 s (28 s of CPU) before
    assert rss.grew < 300 * 1024**2, rss.grew   # ~1 GB before
    assert nothing_stored(engine, settings)
    assert audit_reasons(engine) == ["upload_invalid"]


def test_a_bomb_whose_footer_hides_its_encoding_is_refused_within_the_memory_limit(
        client, auth, engine, settings, monkeypatch):
    """The footer is the writer's word: it can list PLAIN while every page is DELTA_BYTE_ARRAY.
    Then the values are counted on a connection that may hold `SIZING_MEMORY`: one page of the
    bomb decodes to 500 MB, more than that, so the file is refused (413) instead of decoded."""
    data = footer_claiming_plain(BOMB.read_bytes())
    assert "DELTA_BYTE_ARRAY" not in encodings_in_footer(data) and "PLAIN" in encodings_in_footer(data)
    no_per_row_work(monkeypatch)
    started = time.perf_counter()
    with PeakRss() as rss:
        r = post(client, auth("insurer_a"), data, BOMB_SCHEMA)
    elapsed = time.perf_counter() - started
    assert r.status_code == 413, r.text
    body = r.json()
    assert body["code"] == "values_too_large" and body["message_zh"]
    assert body["details"] == {"limit_bytes": 200 * 1024**2, "unpacked_bytes": None}
    assert "memory" in body["message"]
    assert elapsed < 5, f"{elapsed:.1f} s"
    assert rss.grew < 600 * 1024**2, rss.grew
    assert nothing_stored(engine, settings)
    assert audit_reasons(engine) == ["values_too_large"]


def test_counting_the_values_stops_soon_after_the_limit(settings, engine, tmp_path, monkeypatch):
    """A bomb of smaller values (each page fits in memory), its footer lying too: the count stops
    at the first batch past the limit, long before the 100 MB the values decode to."""
    path = delta_bomb(tmp_path / "b.parquet", rows=20_000, value_len=5_000, per_group=2_000)
    data = footer_claiming_plain(path.read_bytes())
    total = 20_000 * (5_000 + 18)
    assert len(data) < 100_000
    no_per_row_work(monkeypatch)
    app, c = app_client(settings, max_tenant_upload_bytes=1024**2)
    try:
        with c:
            r = post(c, login(c, "insurer_a"), data, BOMB_SCHEMA)
            assert r.status_code == 413 and r.json()["code"] == "values_too_large", r.text
            counted = r.json()["details"]["unpacked_bytes"]
            assert 1024**2 < counted < total / 2, counted
            assert "1 MB" in r.json()["message"]
    finally:
        app.state.engine.dispose()
    assert nothing_stored(engine, settings)


def claims_table(n: int = 30) -> pa.Table:
    from datetime import date

    return pa.table({
        "claim_ref": [f"CLM-{i:06d}" for i in range(n)],
        "id_number": [IDS[i % len(IDS)] for i in range(n)],
        "hospital": ["银川市第一人民医院" if i % 2 else None for i in range(n)],
        "admit_date": [date(2026, 1, 1 + i % 20) for i in range(n)],
        "discharge_date": [date(2026, 1, 2 + i % 20) for i in range(n)],
        "amount": pa.array([Decimal(f"{1000 + i}.25") for i in range(n)], pa.decimal128(18, 2)),
        "consent_ref": [f"C-{i:04d}" for i in range(n)],
        "consent_signed_on": [date(2026, 1, 1)] * n,
        "consent_valid_until": [date(2099, 1, 1)] * n,
    })


def _written(table: pa.Table | None = None, **kw) -> bytes:  # noqa: ANN003
    buf = io.BytesIO()
    pq.write_table(claims_table() if table is None else table, buf, **kw)
    return buf.getvalue()


def _duckdb_written(tmp_path: Path, options: str) -> bytes:
    src, out = tmp_path / "src.parquet", tmp_path / f"out{abs(hash(options))}.parquet"
    pq.write_table(claims_table(), src)
    duckdb.execute(f"COPY (SELECT * FROM '{src}') TO '{out}' (FORMAT parquet{options})")
    return out.read_bytes()


def test_parquet_as_common_writers_write_it_is_accepted(client, auth, tmp_path):
    """The allowed encodings cover what pyarrow (pandas, polars) and DuckDB write, by default and
    with their newer options: dictionary, plain, DELTA_LENGTH_BYTE_ARRAY, DELTA_BINARY_PACKED,
    BYTE_STREAM_SPLIT, data pages v2."""
    a = auth("insurer_a")
    files = {
        "pyarrow default": _written(),
        "pyarrow 1.0, data page v2": _written(version="1.0", data_page_version="2.0"),
        "pyarrow no dictionary": _written(use_dictionary=False),
        # (amounts as DOUBLE: DuckDB reads BYTE_STREAM_SPLIT only for numbers, not for a DECIMAL's bytes)
        "pyarrow delta, byte stream split": _written(
            claims_table().set_column(5, "amount", pa.array([1000.25 + i for i in range(30)])),
            use_dictionary=False, column_encoding={"claim_ref": "DELTA_LENGTH_BYTE_ARRAY",
                                                   "hospital": "DELTA_LENGTH_BYTE_ARRAY", "amount": "BYTE_STREAM_SPLIT"}),
        "duckdb": _duckdb_written(tmp_path, ""),
        "duckdb v2": _duckdb_written(tmp_path, ", PARQUET_VERSION V2"),
    }
    assert {"DELTA_LENGTH_BYTE_ARRAY", "BYTE_STREAM_SPLIT"} <= encodings_in_footer(files["pyarrow delta, byte stream split"])
    for label, data in files.items():
        r = post(client, a, data, CLAIMS)
        assert r.status_code == 201, (label, r.text)
        assert r.json()["row_count"] == 30


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_a_bound_that_cannot_be_computed_refuses_the_file(client, auth, engine, settings, monkeypatch, fmt):
    """Before, a row count or a value count that failed returned None and the checks went on as if
    there were no bound; now the file is refused, and nothing is stored."""
    a = auth("insurer_a")
    rows = applicant_rows(10)
    data = to_csv(rows) if fmt == "csv" else _applicants_parquet(rows)

    def fails(*_a, **_k):
        raise duckdb.IOException("cannot count")

    with monkeypatch.context() as m:
        m.setattr(uploads, "rows_up_to", fails)
        r = send(client, a, data)
        assert r.status_code == 422, r.text
        assert r.json()["details"]["problems"] == [{"check": "readable", "message": f"the file cannot be read as {fmt}"}]
    if fmt == "csv":
        with monkeypatch.context() as m:
            m.setattr(uploads, "csv_rows_at_most", lambda _p: (_ for _ in ()).throw(OSError("gone")))
            r = send(client, a, data)
            assert r.status_code == 422 and r.json()["details"]["problems"][0]["check"] == "readable", r.text
    else:
        with monkeypatch.context() as m:
            m.setattr(uploads, "parquet_value_bytes", fails)
            r = send(client, a, data)
            assert r.status_code == 422 and r.json()["details"]["problems"][0]["check"] == "readable", r.text
    assert nothing_stored(engine, settings)
    assert send(client, a, data).status_code == 201   # the same file, once its bounds can be computed


def _applicants_parquet(rows: list[dict]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


# --- the time budget and the PII scan --------------------------------------------------------------

def review_notes_csv(megabytes: float) -> bytes:
    """The review's CSV (f15_pii_scan_regex_cost.py): ~30 KB notes of the address bait, each distinct."""
    out, size, i = ["id_number,note\n"], 0, 0
    while size < megabytes * 1024 * 1024:
        line = f"{IDS[0]},{ADDRESS_BAIT * 300}{i}\n"
        out.append(line)
        size += len(line.encode())
        i += 1
    return "".join(out).encode()


def test_the_review_address_text_is_scanned_in_seconds(client, auth, engine):
    """1.08 MB of the review's notes cost 21 s of server CPU (~65 min for 200 MB); the linear
    pattern scans them in about a second. It holds no personal data: stored."""
    data = review_notes_csv(1.0)
    assert 1.0e6 < len(data) < 1.2e6
    started = time.perf_counter()
    r = send(client, auth("insurer_a"), data, NOTES_SCHEMA)
    elapsed = time.perf_counter() - started
    assert r.status_code == 201, r.text
    assert r.json()["row_count"] == 37
    assert elapsed < 8, f"{elapsed:.1f} s"   # ~1.5 s measured; 22 s before


# By default on sqlite only (a time budget in-process; uploads on PostgreSQL: test_the_review_parquet_bomb_is_refused_by_its_encoding_before_a_value_is_decoded).
@pytest.mark.default_backend("sqlite")
def test_checks_past_the_time_budget_are_refused(settings, engine):
    """Whatever runs when the budget ends — the scan in Python or a DuckDB query — stops, and the
    file is refused (413), nothing stored; the refusal comes when the budget ends, not after."""
    app, c = app_client(settings, upload_check_seconds=0.5)
    try:
        with c:
            a = login(c, "insurer_a")
            cases = [("the PII scan", review_notes_csv(6.0), NOTES_SCHEMA),   # ~5 s of scan
                     ("the DuckDB checks", to_csv(_many_applicants(300_000)), APPLICANTS)]
            for label, data, schema in cases:
                started = time.perf_counter()
                r = send(c, a, data, schema)
                elapsed = time.perf_counter() - started
                assert r.status_code == 413, (label, r.text)
                body = r.json()
                assert body["code"] == "check_time_exceeded" and body["message_zh"], label
                assert body["details"] == {"limit_seconds": 0.5}
                assert "PDAO_UPLOAD_CHECK_SECONDS" in body["message"]
                assert elapsed < 4, (label, f"{elapsed:.1f} s")   # receiving the file included
    finally:
        app.state.engine.dispose()
    assert nothing_stored(engine, settings)
    assert audit_reasons(engine) == ["check_time_exceeded"] * 2


def _many_applicants(n: int) -> list[dict]:
    from catalog.identifiers import cn_id_check_char

    rows = []
    for i in range(n):
        body = f"640104{1950 + i // 10_000}0101{i % 1000:03d}"
        rows.append({"applicant_ref": f"A{i:07d}", "id_number": body + cn_id_check_char(body),
                     "consent_ref": f"C-{i:07d}", "consent_signed_on": "2026-01-01",
                     "consent_valid_until": "2099-01-01", "note": ""})
    return rows


# --- decimal columns ----------------------------------------------------------------------------------

REVIEW_DECIMALS = ["13812345678", "6222021234567894", "110105710923001"]   # mobile; card (Luhn); 15-digit ID
POLICIES = {"name": "policies", "columns": [
    {"name": "id_number", "type": "string", "role": "join_key", "pii_kind": "cn_id", "joins": "health.resident.id_number"},
    {"name": "policy_amount", "type": "decimal"}]}


def test_personal_data_in_a_decimal_column_is_refused(client, auth, engine, settings):
    """The review stored a mobile number, a card number and an ID number in a `decimal` column (the
    same values in `integer` or `string` were refused). The scan reads a decimal's integer digits."""
    a = auth("insurer_a")
    csv_text = "id_number,policy_amount\n" + "".join(f"{IDS[0]},{v}\n" for v in REVIEW_DECIMALS)
    sent = {
        "csv": (csv_text.encode(), "p.csv"),
        "csv with cents": (csv_text.replace("\n", ".00\n").replace("policy_amount.00", "policy_amount").encode(), "p.csv"),
        "parquet decimal": (_parquet({"id_number": [IDS[0]] * 3, "policy_amount": pa.array(
            [Decimal(v) for v in REVIEW_DECIMALS], pa.decimal128(18, 2))}), "p.parquet"),
        "parquet bigint": (_parquet({"id_number": [IDS[0]] * 3, "policy_amount": [int(v) for v in REVIEW_DECIMALS]}),
                           "p.parquet"),
    }
    for label, (data, filename) in sent.items():
        r = post(client, a, data, POLICIES, filename)
        assert r.status_code == 422, (label, r.text)
        body = r.json()
        assert body["code"] == "unexpected_pii", label
        found = {(f["column"], f["kind"], f["count"]) for f in body["details"]["findings"]}
        assert found == {("policy_amount", "bank_card", 1), ("policy_amount", "cn_id", 1),
                         ("policy_amount", "phone", 1)}, label
        assert not any(v in r.text for v in REVIEW_DECIMALS), label
    # as doubles, the 16-digit card number is beyond what a double holds to the cent: refused as a type
    # before any scan (sandbox/engine/store.py), never stored rounded
    data = _parquet({"id_number": [IDS[0]] * 3, "policy_amount": [float(v) for v in REVIEW_DECIMALS]})
    r = post(client, a, data, POLICIES, "p.parquet")
    assert r.status_code == 422 and r.json()["code"] in ("upload_invalid", "unexpected_pii"), r.text
    assert not any(v in r.text for v in REVIEW_DECIMALS)
    assert nothing_stored(engine, settings)
    amounts = "id_number,policy_amount\n" + "".join(f"{IDS[i]},{v}\n" for i, v in enumerate(
        ["1234.56", "0", "99999999.99", "-15.5", "10000000000.00"]))
    r = post(client, a, amounts.encode(), POLICIES, "p.csv")
    assert r.status_code == 201, r.text


def _parquet(columns: dict) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table(columns), buf)
    return buf.getvalue()


# --- how often and how many at once ---------------------------------------------------------------------

def _ids(engine, org_code: str = "company_a", username: str = "insurer_a") -> tuple[int, int]:  # noqa: ANN001
    with Session(engine) as s:
        org = s.exec(select(Organization).where(Organization.code == org_code)).one()
        user = s.exec(select(User).where(User.username == username)).one()
        return org.id, user.id


def _never_read(*_a, **_k):
    raise AssertionError("the file was read")


def test_a_company_may_start_only_so_many_uploads_an_hour(settings, engine, monkeypatch):
    app, c = app_client(settings, upload_rate_per_hour=3)
    try:
        with c:
            a, b = login(c, "insurer_a"), login(c, "insurer_b")
            bad = applicant_rows(5)
            bad[0]["id_number"] = "640104198001010000"
            assert send(c, a, to_csv(bad)).status_code == 422      # a refused upload counts too
            assert send(c, a, to_csv(applicant_rows(5))).status_code == 201
            assert send(c, a, to_csv(applicant_rows(6))).status_code == 201
            with monkeypatch.context() as m:
                m.setattr(upload_routes, "receive_file", _never_read)
                r = send(c, a, to_csv(applicant_rows(7)))
            assert r.status_code == 429, r.text
            body = r.json()
            assert body["code"] == "upload_rate_limited" and body["message_zh"]
            assert body["details"]["limit_per_hour"] == 3
            wait = int(r.headers["Retry-After"])
            assert 3500 < wait <= 3600 and body["details"]["retry_after_seconds"] == wait
            assert "PDAO_UPLOAD_RATE_PER_HOUR" in body["message"]
            assert send(c, b, to_csv(applicant_rows(5))).status_code == 201   # another company's own rate

            # an hour later (the first upload's start moved back past the hour) one more may start
            org_a, _ = _ids(engine)
            with Session(engine) as s:
                first = s.exec(select(TenantUploadCheck).where(TenantUploadCheck.org_id == org_a)
                               .order_by(TenantUploadCheck.id)).first()
                s.exec(update(TenantUploadCheck).where(TenantUploadCheck.id == first.id).values(
                    started_at=utcnow() - timedelta(hours=1, seconds=1)))
                s.commit()
            assert send(c, a, to_csv(applicant_rows(8))).status_code == 201
            r = send(c, a, to_csv(applicant_rows(9)))
            assert r.status_code == 429 and r.json()["code"] == "upload_rate_limited"
    finally:
        app.state.engine.dispose()
    assert upload_rows(engine) == 4
    assert audit_reasons(engine) == ["upload_invalid", None, None, "upload_rate_limited", None, None,
                                     "upload_rate_limited"]
    assert [p for p in settings.staging_dir.iterdir() if not p.name.startswith("duckdb")] == []


def test_a_second_upload_while_one_is_checked_answers_429_in_another_process(settings, engine, monkeypatch):
    """Two server processes (two apps on one database): while company_a's upload is being checked
    in one, its next upload in the other answers 429 without reading the file; company_b's is not
    held up; once the first is done, company_a may upload again."""
    app1, c1 = app_client(settings)
    app2, c2 = app_client(settings)
    checking, go_on = threading.Event(), threading.Event()
    original = uploads.write_upload
    calls = []

    def held_first(*args, **kw):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        if len(calls) == 1:
            checking.set()
            assert go_on.wait(30)
        return original(*args, **kw)

    monkeypatch.setattr(uploads, "write_upload", held_first)
    try:
        with c1, c2, ThreadPoolExecutor(1) as pool:
            a1, a2, b2 = login(c1, "insurer_a"), login(c2, "insurer_a"), login(c2, "insurer_b")
            first = pool.submit(send, c1, a1, to_csv(applicant_rows(5)))
            assert checking.wait(30)
            with monkeypatch.context() as m:
                m.setattr(upload_routes, "receive_file", _never_read)
                r = send(c2, a2, to_csv(applicant_rows(6)))
            assert r.status_code == 429, r.text
            body = r.json()
            assert body["code"] == "upload_in_progress" and body["message_zh"]
            assert body["details"]["limit_concurrent"] == 1 and int(r.headers["Retry-After"]) > 0
            assert "PDAO_UPLOAD_CONCURRENCY" in body["message"]
            assert send(c2, b2, to_csv(applicant_rows(5))).status_code == 201
            go_on.set()
            assert first.result(60).status_code == 201
            assert send(c2, a2, to_csv(applicant_rows(6))).status_code == 201
    finally:
        go_on.set()
        app1.state.engine.dispose()
        app2.state.engine.dispose()
    assert upload_rows(engine) == 3
    with Session(engine) as s:   # every slot given back
        assert s.exec(select(TenantUploadCheck).where(TenantUploadCheck.finished_at.is_(None))).all() == []


@pytest.mark.parametrize("concurrency, rate, admitted", [(2, 100, 2), (100, 3, 3)], ids=["slots", "rate"])
def test_admissions_at_once_never_pass_the_limits(settings, engine, concurrency, rate, admitted):
    """Eight uploads of one company admitted at the same instant: exactly as many as the limit."""
    bounded = dataclasses.replace(settings, upload_concurrency=concurrency, upload_rate_per_hour=rate)
    org, user = _ids(engine)
    start = threading.Barrier(8)

    def one(_):  # noqa: ANN001, ANN202
        start.wait()
        try:
            return admit_upload(engine, bounded, org, user)
        except PdaoError as e:
            return e.code

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(one, range(8)))
    assert len([o for o in outcomes if isinstance(o, int)]) == admitted, outcomes
    refused = "upload_in_progress" if concurrency < 8 else "upload_rate_limited"
    assert [o for o in outcomes if not isinstance(o, int)] == [refused] * (8 - admitted)


def test_a_slot_whose_process_died_frees_itself(settings, engine):
    """A slot is a lease the request renews: one left by a process that died (never finished,
    never renewed) stops counting when its lease ends; a finished one at once."""
    org, user = _ids(engine)
    old = utcnow() - timedelta(seconds=UPLOAD_LEASE_SECONDS + 1)
    admit_upload(engine, settings, org, user, now=old)          # a crash: its lease has run out
    live = admit_upload(engine, settings, org, user)            # so this one may start
    with pytest.raises(PdaoError) as e:
        admit_upload(engine, settings, org, user)
    assert e.value.status == 429 and e.value.code == "upload_in_progress"
    finish_upload(engine, live)
    admit_upload(engine, settings, org, user)
    # rows older than the hour are dropped as new ones come
    with Session(engine) as s:
        s.exec(update(TenantUploadCheck).values(started_at=utcnow() - timedelta(hours=2),
                                               finished_at=utcnow() - timedelta(hours=2)))
        s.commit()
    admit_upload(engine, dataclasses.replace(settings, upload_concurrency=5), org, user)
    with Session(engine) as s:
        assert len(s.exec(select(TenantUploadCheck)).all()) == 1


def test_the_console_form_takes_the_same_slot(app, client, auth, engine, settings):
    """The console's form reads its body before the route's code runs, so it is counted as soon as
    its checks would start: while an upload of the company is running, it answers 429 too."""
    from tests.console_support import console_client, post_file

    org, user = _ids(engine)
    running = admit_upload(engine, settings, org, user)
    tenant = console_client(app, "insurer_a")
    schema = json.dumps(APPLICANTS, ensure_ascii=False)
    r = post_file(tenant, "/uploads", {"file": ("a.csv", to_csv(applicant_rows(5)), "text/csv")}, {"schema": schema})
    assert r.status_code == 429 and "upload_in_progress" in r.text
    assert upload_rows(engine) == 0
    finish_upload(engine, running)
    r = post_file(tenant, "/uploads", {"file": ("a.csv", to_csv(applicant_rows(5)), "text/csv")}, {"schema": schema})
    assert r.status_code == 303, r.text
    assert upload_rows(engine) == 1
