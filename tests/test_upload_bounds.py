"""Uploads that cannot exhaust the server (issue #13, finding 8): a row cap per upload checked before
any per-row work, a storage quota per tenant held under concurrency, and checks that run over whole
columns in DuckDB yet find exactly what the per-row Python checks found."""

from __future__ import annotations

import dataclasses
import io
import json
import random
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date, timedelta

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlmodel import Session, func, select

import sandbox.uploads.service as uploads
from catalog.identifiers import cn_id_check_char, is_cn_mobile, is_valid_cn_id
from pdao.kernel.db import make_engine, migrate
from pdao.kernel.errors import PdaoError
from pdao.kernel.identity.models import Organization, User
from sandbox.engine.pii import find_pii_batch
from sandbox.uploads.models import TenantUpload, TenantUploadUsage
from sandbox.uploads.service import (
    PII_MIN_SCORE,
    cn_id_ok_sql,
    csv_rows_at_most,
    parse_schema,
    phone_ok_sql,
    pii_prefilter_sql,
    store_upload,
    upload_usage,
    write_upload,
)
from tests.conftest import login
from tests.test_tenant_uploads import APPLICANTS, IDS, applicant_rows, files_under, send, to_csv, upload_rows

API = "/api/v1"
TODAY = date.today()


def app_client(settings, **bounds):  # noqa: ANN001, ANN201
    """The app on the test's database and home with other bounds (the caller closes both)."""
    from api.app import create_app

    app = create_app(dataclasses.replace(settings, **bounds))
    return app, TestClient(app, raise_server_exceptions=False)


def audit_reasons(engine, action: str = "upload.create") -> list[str]:  # noqa: ANN001
    with engine.connect() as conn:
        return [r[0] for r in conn.execute(text("SELECT reason FROM audit_event WHERE action = :a ORDER BY seq"),
                                           {"a": action})]


def usage_matches_the_versions(engine) -> dict[int, tuple[int, int]]:  # noqa: ANN001
    """org id -> (bytes, rows) of the usage rows, checked equal to the sums over the stored versions."""
    with Session(engine) as s:
        usage = {u.org_id: (u.stored_bytes, u.stored_rows) for u in s.exec(select(TenantUploadUsage)).all()}
        sums = {org: (int(b), int(r)) for org, b, r in s.exec(
            select(TenantUpload.org_id, func.sum(TenantUpload.size_bytes), func.sum(TenantUpload.row_count))
            .group_by(TenantUpload.org_id)).all()}
    assert {k: v for k, v in usage.items() if v != (0, 0)} == sums
    return usage


# --- the review's row bomb ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def row_bomb(tmp_path_factory):
    """The review's file: 4,000,000 applicants (unique references, valid ID numbers and consents)
    compressed into a few MB of Parquet — accepted after 83-98 s of checks before the cap."""
    path = tmp_path_factory.mktemp("bomb") / "applicants.parquet"
    body = "64010419800101001"
    duckdb.execute(
        f"COPY (SELECT 'A' || i::VARCHAR AS applicant_ref, '{body + cn_id_check_char(body)}' AS id_number, "
        "'C-' || (i % 100000)::VARCHAR AS consent_ref, DATE '2026-01-01' + (i % 3)::INT AS consent_signed_on, "
        "DATE '2099-01-01' AS consent_valid_until, NULL::VARCHAR AS note FROM range(4000000) t(i)) "
        f"TO '{path}' (FORMAT parquet, COMPRESSION zstd)")
    return path


def test_the_review_row_bomb_is_refused_before_any_per_row_work(client, auth, engine, settings, row_bomb,
                                                                monkeypatch):
    data = row_bomb.read_bytes()
    assert len(data) < 8 * 1024**2 and pq.ParquetFile(row_bomb).metadata.num_rows == 4_000_000

    def per_row_work(*_a, **_k):
        raise AssertionError("a per-row check ran")

    # what runs over the rows: the value checks' conditions, the PII scan, the canonical copy
    monkeypatch.setattr(uploads, "_type_problem_condition", per_row_work)
    monkeypatch.setattr(uploads, "scan_pii", per_row_work)
    monkeypatch.setattr(uploads, "_typed", per_row_work)
    a = auth("insurer_a")
    started = time.perf_counter()
    r = client.post(f"{API}/uploads", headers=a, data={"schema": json.dumps(APPLICANTS)},
                    files={"file": ("applicants.parquet", data)})
    elapsed = time.perf_counter() - started
    assert r.status_code == 413, r.text
    body = r.json()
    assert body["code"] == "too_many_rows" and body["message_zh"]
    assert body["details"] == {"limit_rows": 1_000_000, "rows": 4_000_000}
    assert "1,000,000" in body["message"] and "PDAO_UPLOAD_MAX_ROWS" in body["message"]
    assert elapsed < 10, f"{elapsed:.2f} s"   # 0.2 s measured, on a busy machine too; 83 s before the cap
    assert upload_rows(engine) == 0 and files_under(settings) == []
    assert [p for p in settings.staging_dir.iterdir() if not p.name.startswith("duckdb")] == []
    assert audit_reasons(engine) == ["too_many_rows"]
    assert set(usage_matches_the_versions(engine).values()) <= {(0, 0)}   # nothing counted


# By default on sqlite only (refused before any write; the row bomb on both backends).
@pytest.mark.default_backend("sqlite")
@pytest.mark.parametrize("dictionary", [True, False], ids=["dictionary", "plain"])
def test_a_small_parquet_of_huge_values_is_refused_before_any_per_row_work(client, auth, engine, settings,
                                                                         tmp_path, monkeypatch, dictionary):
    """Under the row cap, a few KB of Parquet can still unpack to gigabytes: one long note repeated
    through a dictionary, or long distinct notes in plain pages. Either is refused like a CSV of
    that size would be, before the value checks read a row (each took minutes before)."""
    path = tmp_path / "notes.parquet"
    rows, note = (20_000, "repeat('续保', 50000)") if dictionary else (2_000, "i::VARCHAR || repeat('续保', 20000)")
    options = "" if dictionary else ", DICTIONARY_COMPRESSION_RATIO_THRESHOLD -1"
    duckdb.execute(
        f"COPY (SELECT 'A' || i::VARCHAR AS applicant_ref, '{IDS[0]}' AS id_number, 'C-' || i::VARCHAR AS consent_ref, "
        f"DATE '2026-01-01' AS consent_signed_on, DATE '2099-01-01' AS consent_valid_until, {note} AS note "
        f"FROM range({rows}) t(i)) TO '{path}' (FORMAT parquet, COMPRESSION zstd{options})")
    assert path.stat().st_size < 200_000

    def per_row_work(*_a, **_k):
        raise AssertionError("a per-row check ran")

    monkeypatch.setattr(uploads, "_type_problem_condition", per_row_work)
    monkeypatch.setattr(uploads, "scan_pii", per_row_work)
    started = time.perf_counter()
    r = client.post(f"{API}/uploads", headers=auth("insurer_a"), data={"schema": json.dumps(APPLICANTS)},
                    files={"file": ("notes.parquet", path.read_bytes())})
    assert r.status_code == 413 and r.json()["code"] == "values_too_large", r.text
    d = r.json()["details"]
    assert d["limit_bytes"] == 200 * 1024**2 and d["unpacked_bytes"] > d["limit_bytes"]
    assert "200 MB" in r.json()["message"] and r.json()["message_zh"]
    assert time.perf_counter() - started < 10   # 0.1 s measured; minutes before
    assert upload_rows(engine) == 0 and files_under(settings) == []
    assert audit_reasons(engine) == ["values_too_large"]


def _parquet(rows: list[dict]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


def test_the_cap_counts_csv_rows_not_lines(settings, engine):
    """At most `upload_max_rows` data rows: a CSV at the cap passes, one more row is refused; quoted
    line breaks and blank lines make more lines than rows, and are counted as DuckDB reads them."""
    app, c = app_client(settings, upload_max_rows=20)
    try:
        with c:
            a = login(c, "insurer_a")
            r = send(c, a, to_csv(applicant_rows(21)))
            assert r.status_code == 413 and r.json()["code"] == "too_many_rows", r.text
            assert r.json()["details"] == {"limit_rows": 20, "rows": None}   # counting stopped past the cap
            assert "more than 20" in r.json()["message"]
            r = send(c, a, _parquet(applicant_rows(21)))
            assert r.status_code == 413 and r.json()["details"] == {"limit_rows": 20, "rows": 21}
            assert upload_rows(engine) == 0 and files_under(settings) == []

            rows = applicant_rows(20)
            for i in range(0, 20, 2):
                rows[i]["note"] = "第一行\n第二行\r\n第三行"   # 40 line breaks more than rows
            data = to_csv(rows)
            assert csv_rows_at_most_bytes(data) > 20
            assert send(c, a, data).status_code == 201
            crlf = to_csv(applicant_rows(20)).replace(b"\n", b"\r\n") + b"\r\n"   # and a blank last line
            assert send(c, a, crlf).status_code == 201
            assert send(c, a, _parquet(applicant_rows(20))).status_code == 201
            rows.append(applicant_rows(21)[20])
            r = send(c, a, to_csv(rows))
            assert r.status_code == 413 and r.json()["code"] == "too_many_rows"
            assert audit_reasons(engine) == ["too_many_rows"] * 2 + [None] * 3 + ["too_many_rows"]
    finally:
        app.state.engine.dispose()
    assert upload_rows(engine) == 3


def csv_rows_at_most_bytes(data: bytes) -> int:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "f.csv"
        p.write_bytes(data)
        return csv_rows_at_most(p)


def test_csv_rows_at_most_is_an_upper_bound(monkeypatch):
    monkeypatch.setattr(uploads, "_CHUNK", 3)   # a \r\n split across reads, many times
    for data, rows in [(b"h\n1\n2\n", 2), (b"h\n1\n2", 2), (b"h\r\n1\r\n2\r\n", 2), (b"h\r1\r2", 2),
                       (b"h\n", 0), (b"h", 0), (b"", 0), (b"h\n\n1\n", 2), (b'h\n"a\nb"\n', 2)]:
        assert csv_rows_at_most_bytes(data) == rows, data
    for n in range(1, 40):
        data = to_csv(applicant_rows(n))
        assert csv_rows_at_most_bytes(data) == n
        assert csv_rows_at_most_bytes(data.replace(b"\n", b"\r\n")) == n


# --- the quota --------------------------------------------------------------------------------------

def test_the_quota_counts_rows_and_bytes_per_organization(settings, engine, monkeypatch):
    app, c = app_client(settings, tenant_upload_quota_rows=50)
    try:
        with c:
            a, b = login(c, "insurer_a"), login(c, "insurer_b")
            assert send(c, a, to_csv(applicant_rows(30))).status_code == 201
            r = send(c, a, to_csv(applicant_rows(25)))
            assert r.status_code == 413, r.text
            body = r.json()
            assert body["code"] == "upload_quota_exceeded" and body["message_zh"]
            d = body["details"]
            assert (d["used_rows"], d["limit_rows"], d["version_rows"]) == (30, 50, 25)
            assert d["used_bytes"] > 0 and d["limit_bytes"] == settings.tenant_upload_quota_bytes
            assert "30 rows" in body["message"] and "50 rows" in body["message"]
            assert upload_rows(engine) == 1 and len(files_under(settings)) == 1
            assert send(c, b, to_csv(applicant_rows(30))).status_code == 201   # another tenant's own quota
            assert send(c, a, to_csv(applicant_rows(20))).status_code == 201   # exactly up to the quota
            usage = usage_matches_the_versions(engine)
            assert sorted(rows for _b, rows in usage.values()) == [30, 50]

            # full: refused before the file is read
            def read(*_a, **_k):
                raise AssertionError("a full quota still read the file")

            monkeypatch.setattr(uploads, "write_upload", read)
            r = send(c, a, to_csv(applicant_rows(1)))
            assert r.status_code == 413 and r.json()["code"] == "upload_quota_exceeded"
            assert r.json()["details"]["used_rows"] == 50
    finally:
        app.state.engine.dispose()
    assert upload_rows(engine) == 3 and len(files_under(settings)) == 3
    assert audit_reasons(engine) == [None, "upload_quota_exceeded", None, None, "upload_quota_exceeded"]


def test_the_quota_counts_the_stored_bytes(settings, engine, tmp_path):
    src = tmp_path / "a.csv"
    src.write_bytes(to_csv(applicant_rows(30)))
    staged, _ = write_upload(settings, src, parse_schema(APPLICANTS))
    one = staged.stat().st_size   # what the stored version will weigh (the same bytes every time)
    staged.unlink()
    app, c = app_client(settings, tenant_upload_quota_bytes=one + one // 2)
    try:
        with c:
            a = login(c, "insurer_a")
            first = send(c, a, src.read_bytes())
            assert first.status_code == 201 and first.json()["size_bytes"] == one
            r = send(c, a, src.read_bytes())
            assert r.status_code == 413 and r.json()["code"] == "upload_quota_exceeded"
            d = r.json()["details"]
            assert (d["used_bytes"], d["version_bytes"], d["limit_bytes"]) == (one, one, one + one // 2)
    finally:
        app.state.engine.dispose()
    assert upload_rows(engine) == 1 and len(files_under(settings)) == 1
    usage_matches_the_versions(engine)


def test_concurrent_uploads_never_overrun_the_quota(engine, settings, tmp_path):
    """Six uploads of 5 rows at once against room for three: three stored, three refused."""
    bounded = dataclasses.replace(settings, tenant_upload_quota_rows=15)
    schema = parse_schema(APPLICANTS)
    srcs = []
    for i in range(6):
        p = tmp_path / f"a{i}.csv"
        p.write_bytes(to_csv(applicant_rows(5)))
        srcs.append(p)
    with Session(engine) as s:
        org = s.exec(select(Organization).where(Organization.code == "company_a")).one()
        user = s.exec(select(User).where(User.username == "insurer_a")).one()

    def one(src):  # noqa: ANN001, ANN202
        with Session(engine, expire_on_commit=False) as s:
            try:
                return store_upload(s, bounded, org=org, user_id=user.id, schema=schema, src=src)[0].version
            except PdaoError as e:
                return e.code

    with ThreadPoolExecutor(6) as pool:
        outcomes = list(pool.map(one, srcs))
    assert sorted(o for o in outcomes if isinstance(o, int)) == [1, 2, 3], outcomes
    assert [o for o in outcomes if not isinstance(o, int)] == ["upload_quota_exceeded"] * 3
    assert usage_matches_the_versions(engine)[org.id][1] == 15
    assert len(files_under(settings)) == 3
    with Session(engine) as s:
        assert upload_usage(s, org.id).rows == 15


def test_the_migration_counts_the_versions_already_stored(empty_url):
    migrate(empty_url, "0010")   # tenant uploads exist since 0009; the usage table comes with 0014
    eng = make_engine(empty_url)
    now = "2026-01-01 00:00:00"
    try:
        with eng.begin() as conn:
            for i, code in ((1, "company_a"), (2, "company_b"), (3, "company_c")):
                conn.execute(text("INSERT INTO organization (id, code, name_zh, name_en, kind, created_at) "
                                  "VALUES (:i, :c, :c, :c, 'company', :t)"), {"i": i, "c": code, "t": now})
            conn.execute(text("INSERT INTO app_user (id, username, display_name, org_id, role, password_hash, "
                              "is_active, failed_logins, tokens_valid_after, created_at) VALUES "
                              "(1, 'u', 'u', 1, 'applicant', 'x', true, 0, :t, :t)"), {"t": now})
            for org, version, rows, size in ((1, 1, 30, 1000), (1, 2, 40, 2500), (2, 1, 7, 300)):
                conn.execute(text("INSERT INTO tenant_upload (org_id, name, version, columns, format, row_count, "
                                  "size_bytes, sha256, storage_path, warnings, note, uploaded_by, created_at) VALUES "
                                  "(:o, 't', :v, '[]', 'csv', :r, :s, 'x', 'p', '[]', '', 1, :t)"),
                             {"o": org, "v": version, "r": rows, "s": size, "t": now})
        migrate(empty_url, "0014")
        with eng.connect() as conn:
            got = conn.execute(text("SELECT org_id, stored_bytes, stored_rows FROM tenant_upload_usage "
                                    "ORDER BY org_id")).all()
        assert [tuple(r) for r in got] == [(1, 3500, 70), (2, 300, 7)]
    finally:
        eng.dispose()


# --- checks over whole columns find what the per-row checks found -----------------------------------

def _id_like(rng: random.Random) -> str:
    body = f"{rng.choice(['640104', '110105', '000000', '999999'])}{rng.randint(1700, 2100)}" \
           f"{rng.randint(0, 13):02d}{rng.randint(0, 32):02d}{rng.randint(0, 999):03d}"
    return body + rng.choice([cn_id_check_char(body), "X", "x", "0", "9", "Y", ""])


def identifier_samples() -> list[str]:
    rng = random.Random(13)
    out = list(IDS) + [i.lower() for i in IDS] + ["11010519491231002X", "11010519491231002x", ""]
    for i in IDS[:10]:   # every single-character change of a valid number
        for pos in range(18):
            for ch in "0159Xx a٣９":
                out.append(i[:pos] + ch + i[pos + 1:])
        out += [i[:17], i + "0", " " + i, i + " ", i[:6] + "18000229" + i[14:], i[:6] + "20000229" + i[14:]]
    for born in ("17991231", "18000101", "19000229", "20000229", "20230229", "20240229", "19801131", "19800431",
                 "00000101", "99991231"):
        body = f"640104{born}123"
        out += [body + cn_id_check_char(body), body + "0"]
    out += [_id_like(rng) for _ in range(3000)]
    phones = ["13912345678", "+8613912345678", "+86 13912345678", "+86-13912345678", "8613912345678",
              "+86  13912345678", "1391234567", "139123456789", "12912345678", "1391234567８", " 13912345678",
              "13912345678\n", "+8613912345678 "]
    out += phones + ["".join(rng.choice("0123456789+- 1") for _ in range(rng.randint(9, 16))) for _ in range(2000)]
    return out


def test_the_sql_identifier_checks_equal_the_python_ones():
    samples = identifier_samples()
    con = duckdb.connect()
    got = con.execute(f"SELECT v, {cn_id_ok_sql('v')}, {phone_ok_sql('v')} FROM (SELECT unnest(?) AS v)",
                      [samples]).fetchall()
    assert len(got) == len(samples)
    wrong = [(v, cid, ph) for v, cid, ph in got if cid != is_valid_cn_id(v) or ph != is_cn_mobile(v)]
    assert wrong == []
    assert sum(cid for _, cid, _ in got) > 200 and sum(ph for _, _, ph in got) >= 5   # not vacuous
    assert con.execute(f"SELECT {cn_id_ok_sql('NULL::VARCHAR')}, {phone_ok_sql('NULL::VARCHAR')}").fetchone() == (
        False, False)


def prefilter_corpus(tmp_path) -> list[str]:  # noqa: ANN001
    from sandbox import synth
    from tests.test_pii import _fuzz

    paths = synth.generate(tmp_path / "synth", scale=1500, seed=3)
    texts = pq.read_table(paths["health.outpatient_visit"], columns=["chief_complaint"]).column(0).to_pylist()
    texts += pq.read_table(paths["health.inpatient_stay"], columns=["notes"]).column(0).to_pylist()
    residents = pq.read_table(paths["health.resident"], columns=["name", "id_number", "phone"]).to_pylist()
    texts += [v for r in residents[:500] for v in r.values()]
    texts += _fuzz(random.Random(13), 6000)
    texts += identifier_samples()
    texts += ["张伟，咳嗽3天", "王芳代诉头痛", "患者\n李娜，发热", "护照号码：E12345678", "台胞证 12345678",
              "回乡证H12345678", "宁A12345", "银川市兴庆区解放西街12号", "zhang.wei@example.com", "6222 0212 3456 7890 128",
              "138-1234-5678", "0086 13812345678", "E12345678", "A0000001", "C-0000001", "2026-01-01", "续保",
              "91640100MA76ABCDE" + "X", "北京中路3栋2单元501室", "红星村三组25号", "阳光小区3-2-501"]
    return [t for t in texts if isinstance(t, str)]


def test_the_pii_prefilter_keeps_every_value_with_a_finding(tmp_path):
    """The pre-filter only spares Presidio values where it would find nothing that refuses a file,
    so the scan finds what it found when every value went through Presidio."""
    texts = prefilter_corpus(tmp_path)
    con = duckdb.connect()
    flagged = dict(con.execute(f"SELECT v, {pii_prefilter_sql('v')} FROM (SELECT DISTINCT unnest(?) AS v)",
                               [texts]).fetchall())
    findings = find_pii_batch(list(flagged))
    refusing = {v for v, fs in zip(flagged, findings, strict=True) if any(f.score >= PII_MIN_SCORE for f in fs)}
    assert len(refusing) > 1000   # the corpus has plenty of personal data
    assert [v for v in refusing if not flagged[v]] == []
    # and it does spare most values without any
    spared = [v for v in flagged if not flagged[v]]
    assert len(spared) > 2000, len(spared)
    for ref in ("A0000001", "C-0000001", "续保"):   # references, words
        assert flagged[ref] is False, ref


def test_findings_of_a_big_file_are_the_per_row_ones(client, auth, engine, settings):
    """A file whose problems and warnings sit at its end, of a size where per-row work showed: the same
    report as before, by row and by line (one line per record: counted, not read again)."""
    a = auth("insurer_a")
    n = 20_000
    start, end = (TODAY - timedelta(days=30)).isoformat(), (TODAY + timedelta(days=300)).isoformat()
    rows = []
    for i in range(n):
        body = f"640104{(date(1950, 1, 1) + timedelta(days=i // 500)).strftime('%Y%m%d')}{i % 500:03d}"
        rows.append({"applicant_ref": f"A{i:07d}", "id_number": body + cn_id_check_char(body),
                     "consent_ref": f"C-{i:07d}", "consent_signed_on": start, "consent_valid_until": end, "note": ""})
    rows[n - 3]["note"] = "请致电 13912345678"              # line n - 1
    rows[n - 2]["id_number"] = rows[n - 2]["id_number"][:17] + ("0" if rows[n - 2]["id_number"][17] != "0" else "1")
    r = send(client, a, to_csv(rows))
    assert r.status_code == 422 and r.json()["code"] == "upload_invalid"
    p = r.json()["details"]["problems"]
    assert [(x["check"], x["column"], x["count"], x["first_rows"], x["first_lines"]) for x in p] == [
        ("cn_id", "id_number", 1, [n - 1], [n])]
    rows[n - 2] = dict(rows[n - 4], applicant_ref="A9999999", consent_ref="C-9999999")  # repeats a key: a warning
    r = send(client, a, to_csv(rows))
    assert r.status_code == 422 and r.json()["code"] == "unexpected_pii"
    f = r.json()["details"]["findings"]
    assert [(x["column"], x["kind"], x["count"], x["first_rows"], x["first_lines"]) for x in f] == [
        ("note", "phone", 1, [n - 2], [n - 1])]
    assert [(w["check"], w["first_rows"], w["first_lines"]) for w in r.json()["details"]["warnings"]] == [
        ("duplicate_key", [n - 1], [n])]
    rows[n - 3]["note"] = ""
    r = send(client, a, to_csv(rows))
    assert r.status_code == 201 and r.json()["row_count"] == n
    assert [(w["check"], w["first_lines"]) for w in r.json()["warnings"]] == [("duplicate_key", [n])]
    assert "13912345678" not in r.text
