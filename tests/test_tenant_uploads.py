"""Tenant uploads (issue #6): checked against a declared schema, scanned for undeclared personal
data, refused whole with a report by line, kept as immutable read-only versions in the tenant's own
space, never visible to another tenant or to providers, metadata only to the office and auditors,
and never a cell value in an answer or in the audit log."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import stat
from datetime import date, timedelta

import pyarrow as pa
import pyarrow.parquet as pq
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlmodel import Session, select

from catalog.identifiers import cn_id_check_char, is_valid_cn_id
from sandbox.uploads.models import TenantUpload
from sandbox.uploads.service import (
    join_key_of,
    latest_upload,
    parse_schema,
    tenant_upload_columns,
    upload_path,
    upload_roles,
    verify_upload,
)
from tests.conftest import login

API = "/api/v1"
TODAY = date.today()


def cn_id(i: int, born: str = "19800101") -> str:
    body = f"640104{born}{i % 1000:03d}"
    return body + cn_id_check_char(body)


IDS = [cn_id(i, f"19{50 + i % 40}0{1 + i % 9}1{i % 9}") for i in range(1, 41)]

APPLICANTS = {"name": "applicants", "columns": [
    {"name": "applicant_ref", "type": "string", "role": "row_ref"},
    {"name": "id_number", "type": "string", "role": "join_key", "pii_kind": "cn_id", "nullable": False,
     "joins": "health.resident.id_number"},
    {"name": "consent_ref", "type": "string", "role": "consent_ref", "nullable": False},
    {"name": "consent_signed_on", "type": "date", "role": "consent_valid_from", "nullable": False},
    {"name": "consent_valid_until", "type": "date", "role": "consent_valid_until", "nullable": False},
    {"name": "note", "type": "string", "nullable": True},
]}

CLAIMS = {"name": "claims", "columns": [
    {"name": "claim_ref", "type": "string", "nullable": False},
    {"name": "id_number", "type": "string", "role": "join_key", "pii_kind": "cn_id", "nullable": False,
     "joins": "health.resident.id_number"},
    {"name": "hospital", "type": "string"},
    {"name": "admit_date", "type": "date"},
    {"name": "discharge_date", "type": "date"},
    {"name": "amount", "type": "decimal"},
    {"name": "consent_ref", "type": "string", "role": "consent_ref"},
    {"name": "consent_signed_on", "type": "date", "role": "consent_valid_from"},
    {"name": "consent_valid_until", "type": "date", "role": "consent_valid_until"},
]}


def applicant_rows(n: int = 30) -> list[dict]:
    start, end = TODAY - timedelta(days=30), TODAY + timedelta(days=300)
    return [{"applicant_ref": f"A{i:05d}", "id_number": IDS[i], "consent_ref": f"C-{i:04d}",
             "consent_signed_on": start.isoformat(), "consent_valid_until": end.isoformat(),
             "note": "续保" if i % 3 else ""} for i in range(n)]


def to_csv(rows: list[dict]) -> bytes:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue().encode()


def send(client, headers, data: bytes, schema: dict | None = APPLICANTS, **fields):  # noqa: ANN001, ANN201
    form = dict(fields)
    if schema is not None:
        form["schema"] = json.dumps(schema, ensure_ascii=False)
    return client.post(f"{API}/uploads", headers=headers, data=form, files={"file": ("t.csv", data, "text/csv")})


def files_under(settings) -> list:  # noqa: ANN001
    root = settings.home / "tenants"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def upload_rows(engine) -> int:  # noqa: ANN001
    with Session(engine) as s:
        return len(s.exec(select(TenantUpload)).all())


def audit_text(engine) -> str:  # noqa: ANN001
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT * FROM audit_event")).all()
    return "\x00".join("\x00".join("" if v is None else str(v) for v in row) for row in rows)


def test_generated_ids_are_valid():
    assert all(is_valid_cn_id(i) for i in IDS) and len(set(IDS)) == len(IDS)


def test_csv_and_parquet_are_stored_as_immutable_versions(client, auth, engine, settings):
    a = auth("insurer_a")
    rows = applicant_rows()
    r = send(client, a, to_csv(rows), note="首批投保人")
    assert r.status_code == 201, r.text
    v1 = r.json()
    assert (v1["org"], v1["name"], v1["version"], v1["row_count"], v1["format"]) == (
        "company_a", "applicants", 1, 30, "csv")
    assert v1["note"] == "首批投保人" and v1["warnings"] == [] and "storage_path" not in v1
    assert [c["name"] for c in v1["columns"]] == [c["name"] for c in APPLICANTS["columns"]]

    # the same table as Parquet (typed dates), a lower-case check character, without `note`
    # in the body: a new version, the old one untouched
    t = pa.table({"applicant_ref": [r["applicant_ref"] for r in rows[:10]],
                  "id_number": [r["id_number"].lower() for r in rows[:10]],
                  "consent_ref": [r["consent_ref"] for r in rows[:10]],
                  "consent_signed_on": [TODAY - timedelta(days=1)] * 10,
                  "consent_valid_until": [TODAY + timedelta(days=10)] * 10,
                  "note": [None] * 10})
    buf = io.BytesIO()
    pq.write_table(t, buf)
    r = send(client, a, buf.getvalue())
    assert r.status_code == 201, r.text
    assert (r.json()["version"], r.json()["format"], r.json()["row_count"]) == (2, "parquet", 10)
    assert r.json()["sha256"] != v1["sha256"]

    # a third version with the raw body and ?name=: the schema of the latest version
    r = client.post(f"{API}/uploads?name=applicants", headers={**a, "Content-Type": "text/csv"},
                    content=to_csv(rows[:5]))
    assert r.status_code == 201, r.text
    assert r.json()["version"] == 3

    with Session(engine) as s:
        ups = s.exec(select(TenantUpload).order_by(TenantUpload.version)).all()
        assert [u.version for u in ups] == [1, 2, 3]
        for u in ups:
            p = upload_path(settings, u)
            assert p.is_file() and p.is_relative_to(settings.home / "tenants" / "company_a" / "uploads" / "applicants")
            assert p.name.startswith(f"v{u.version}-{u.sha256[:12]}")
            assert not os.stat(p).st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
            assert verify_upload(settings, u) == "ok"
        stored = pq.read_table(upload_path(settings, ups[1]))
        assert stored.column("id_number").to_pylist() == [x["id_number"] for x in rows[:10]]  # 'x' -> 'X'
        assert str(stored.schema.field("consent_valid_until").type) == "date32[day]"
        # the integrator's API
        org_a = ups[0].org_id
        latest = latest_upload(s, org_a, "applicants")
        assert latest is not None and latest.version == 3
        assert latest_upload(s, org_a, "claims") is None
        assert tenant_upload_columns(s, org_a) == {"applicants": [c["name"] for c in APPLICANTS["columns"]]}
        assert join_key_of(latest) == ("id_number", "health.resident.id_number")
        assert upload_roles(latest) == {"row_ref": "applicant_ref", "join_key": "id_number",
                                        "consent_ref": "consent_ref", "consent_valid_from": "consent_signed_on",
                                        "consent_valid_until": "consent_valid_until"}
        # rows are immutable
        ups[0].note = "changed"
        s.add(ups[0])
        try:
            s.commit()
            raise AssertionError("an upload row was rewritten")
        except ValueError:
            s.rollback()

    listed = client.get(f"{API}/uploads", headers=a).json()
    assert listed["total"] == 1 and listed["items"][0]["version"] == 3 and listed["items"][0]["version_count"] == 3
    versions = client.get(f"{API}/uploads/applicants", headers=a).json()
    assert [v["version"] for v in versions] == [1, 2, 3]
    for body in (listed, versions):
        assert not any(x in json.dumps(body) for x in IDS)


def test_claims_table_with_decimal_and_hospital(client, auth):
    a = auth("insurer_a")
    rows = [{"claim_ref": f"CLM{i:06d}", "id_number": IDS[i], "hospital": "宁夏医科大学总医院",
             "admit_date": "2026-01-0%d" % (1 + i % 5), "discharge_date": "2026-01-1%d" % (i % 5),
             "amount": f"{1000 + i}.5", "consent_ref": f"K{i}", "consent_signed_on": "2025-12-01",
             "consent_valid_until": (TODAY + timedelta(days=100)).isoformat()} for i in range(12)]
    r = send(client, a, to_csv(rows), CLAIMS)
    assert r.status_code == 201, r.text
    assert r.json()["row_count"] == 12


def test_bad_rows_are_reported_by_line_and_nothing_is_stored(client, auth, engine, settings):
    a = auth("insurer_a")
    rows = applicant_rows(12)
    rows[3]["consent_signed_on"] = "2026-02-30"                     # data row 4, line 5
    rows[6]["id_number"] = IDS[6][:17] + ("0" if IDS[6][17] != "0" else "1")   # check digit, line 8
    rows[8]["applicant_ref"] = ""                                    # not nullable, line 10
    rows[9]["consent_valid_until"] = "2020-01-01"                    # before signed on, line 11
    rows[9]["consent_signed_on"] = "2020-06-01"
    r = send(client, a, to_csv(rows))
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["code"] == "upload_invalid" and body["message_zh"]
    by = {(p["check"], p.get("column")): p for p in body["details"]["problems"]}
    assert by[("type", "consent_signed_on")]["first_lines"] == [5]
    assert by[("cn_id", "id_number")]["first_lines"] == [8]
    assert by[("cn_id", "id_number")]["first_rows"] == [7]
    assert by[("null", "applicant_ref")]["first_lines"] == [10]
    assert by[("consent_order", "consent_valid_until")]["first_lines"] == [11]
    assert rows[6]["id_number"] not in r.text and IDS[0] not in r.text
    # a quoted value spanning lines shifts the lines, not the rows
    rows = applicant_rows(6)
    rows[1]["note"] = "第一行\n第二行"
    rows[4]["id_number"] = "12345"
    r = send(client, a, to_csv(rows))
    p = [p for p in r.json()["details"]["problems"] if p["check"] == "cn_id"][0]
    assert (p["first_rows"], p["first_lines"]) == ([5], [7])
    # a malformed line: reported by line by the CSV reader
    data = to_csv(applicant_rows(5)) + b"A9,1,2\n"
    r = send(client, a, data)
    assert r.status_code == 422
    p = r.json()["details"]["problems"][0]
    assert p["check"] == "malformed" and p["first_lines"] == [7]
    assert upload_rows(engine) == 0 and files_under(settings) == []
    assert [p for p in settings.staging_dir.iterdir() if not p.name.startswith("duckdb")] == []


def test_wrong_columns_and_bad_schemas(client, auth, engine, settings):
    a = auth("insurer_a")
    rows = [{k: v for k, v in r.items() if k != "consent_ref"} | {"extra": "x", IDS[0]: "y"} for r in applicant_rows(3)]
    r = send(client, a, to_csv(rows))
    assert r.status_code == 422 and r.json()["code"] == "upload_invalid"
    cols = [p for p in r.json()["details"]["problems"] if p["check"] == "columns"]
    assert {tuple(p["columns"]) for p in cols} == {("consent_ref",), ("extra",)}
    assert IDS[0] not in r.text   # a header that is data is not echoed
    bad = [
        {**APPLICANTS, "name": "Bad-Name"},
        {"name": "t", "columns": [{"name": "id_number", "type": "string", "role": "join_key", "pii_kind": "cn_id",
                                   "nullable": False, "joins": "health.nope.id_number"}]},
        {"name": "t", "columns": [{"name": "id_number", "type": "string", "role": "join_key", "pii_kind": None,
                                   "nullable": False, "joins": "health.resident.id_number"}]},
        {"name": "t", "columns": [{"name": "x", "type": "text"}]},
        {"name": "t", "columns": [{"name": "x", "type": "string"}]},   # no join key
    ]
    # a prohibited dataset is no join target, and says so exactly like a missing one
    prohibited = {"name": "t", "columns": [{"name": "person_id", "type": "integer", "role": "join_key",
                                            "nullable": False, "joins": "health.notifiable_disease.person_id"}]}
    missing = {"name": "t", "columns": [{"name": "person_id", "type": "integer", "role": "join_key",
                                         "nullable": False, "joins": "health.no_such.person_id"}]}
    answers = [send(client, a, b"person_id\n1\n", s).json() for s in (prohibited, missing)]
    assert answers[0]["code"] == "schema_invalid" and answers[0]["details"] == answers[1]["details"]
    for schema in bad:
        r = send(client, a, to_csv(applicant_rows(2)), schema)
        assert r.status_code == 422 and r.json()["code"] == "schema_invalid", (schema, r.text)
    r = send(client, a, to_csv(applicant_rows(2)), None)
    assert r.status_code == 422 and r.json()["code"] == "schema_required"
    r = client.post(f"{API}/uploads", headers=a, data={"schema": "{not json"},
                    files={"file": ("t.csv", b"a\n1\n")})
    assert r.status_code == 422 and r.json()["code"] == "schema_invalid"
    assert upload_rows(engine) == 0 and files_under(settings) == []


def test_unexpected_pii_is_refused_naming_column_kind_and_line(client, auth, engine, settings):
    a = auth("insurer_a")
    rows = applicant_rows(8)
    phone = "13912345678"
    rows[5]["note"] = f"请回电 {phone}"          # data row 6, line 7
    rows[2]["consent_ref"] = IDS[20]             # an ID number where a consent reference should be, line 4
    r = send(client, a, to_csv(rows))
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["code"] == "unexpected_pii"
    found = {(f["column"], f["kind"]): f for f in body["details"]["findings"]}
    assert found[("note", "phone")]["first_lines"] == [7]
    assert found[("consent_ref", "cn_id")]["first_lines"] == [4]
    assert "consent_ref" in body["message"] or "note" in body["message"]
    assert phone not in r.text and IDS[20] not in r.text
    # personal data in the note is refused too
    r = send(client, a, to_csv(applicant_rows(3)), note=f"联系人电话 {phone}")
    assert r.status_code == 422 and r.json()["code"] == "unexpected_pii" and phone not in r.text
    assert phone not in audit_text(engine) and IDS[20] not in audit_text(engine)
    with engine.connect() as conn:
        refused = conn.execute(text("SELECT object, reason FROM audit_event WHERE action = 'upload.create' "
                                    "ORDER BY seq")).all()
    assert [tuple(x) for x in refused] == [("upload:company_a/applicants", "unexpected_pii")] * 2
    assert upload_rows(engine) == 0 and files_under(settings) == []


def test_over_the_size_limit_is_413_and_stores_nothing(settings, engine):
    from api.app import create_app

    small = dataclasses.replace(settings, max_tenant_upload_bytes=2000)
    app = create_app(small)
    try:
        with TestClient(app, raise_server_exceptions=False) as c:
            a = login(c, "insurer_a")
            data = to_csv(applicant_rows(40))
            assert len(data) > 2000
            r = send(c, a, data)
            assert r.status_code == 413 and r.json()["code"] == "too_large", r.text
            assert r.json()["details"]["limit_bytes"] == 2000
            # far over: refused by the body limit before anything is read, the same JSON error
            r = send(c, a, to_csv(applicant_rows(40)) * 100)
            assert r.status_code == 413 and r.json()["code"] == "too_large"
            assert list(small.staging_dir.glob("upload-*")) == []
            assert send(c, a, to_csv(applicant_rows(5))).status_code == 201   # under the limit: fine
    finally:
        app.state.engine.dispose()
    assert upload_rows(engine) == 1


def test_who_sees_what(client, auth, engine):
    a, b = auth("insurer_a"), auth("insurer_b")
    assert send(client, a, to_csv(applicant_rows()), note="仅本公司可见").status_code == 201
    # another tenant: nothing, and the name answers exactly like a missing one
    assert client.get(f"{API}/uploads", headers=b).json() == {"items": [], "total": 0}
    r1, r2 = client.get(f"{API}/uploads/applicants", headers=b), client.get(f"{API}/uploads/nothing", headers=b)
    assert r1.status_code == r2.status_code == 404 and r1.json() == r2.json()
    assert client.get(f"{API}/uploads/applicants?org=company_a", headers=b).status_code == 404
    # providers and operators: nothing; no one but an applicant uploads
    for who in ("provider1", "operator1"):
        assert client.get(f"{API}/uploads", headers=auth(who)).json()["total"] == 0
        assert client.get(f"{API}/uploads/applicants", headers=auth(who)).status_code == 404
    for who in ("provider1", "office1", "auditor1", "reviewer1", "operator1"):
        r = send(client, auth(who), to_csv(applicant_rows(2)))
        assert r.status_code == 403 and r.json()["code"] == "role_not_permitted"
    # office and auditors: metadata, not the tenant's note or warnings, never cells
    for who in ("office1", "auditor1"):
        items = client.get(f"{API}/uploads", headers=auth(who)).json()["items"]
        assert [(i["org"], i["name"], i["row_count"]) for i in items] == [("company_a", "applicants", 30)]
        assert items[0]["note"] is None and items[0]["warnings"] is None and len(items[0]["sha256"]) == 64
        v = client.get(f"{API}/uploads/applicants?org=company_a", headers=auth(who))
        assert v.status_code == 200 and v.json()[0]["columns"][1]["pii_kind"] == "cn_id"
        assert client.get(f"{API}/uploads/applicants?org=company_b", headers=auth(who)).status_code == 404
    with Session(engine) as s:
        b_org = s.exec(text("SELECT id FROM organization WHERE code = 'company_b'")).one()[0]
        assert tenant_upload_columns(s, b_org) == {} and latest_upload(s, b_org, "applicants") is None
    # no answer and no audit row holds a cell
    everything = audit_text(engine)
    assert not [i for i in IDS[:30] if i in everything]
    assert "A00001" not in everything and "C-0001" not in everything


def test_warnings_for_expired_consent_and_duplicate_keys(client, auth):
    a = auth("insurer_a")
    rows = applicant_rows(6)
    rows[2]["consent_valid_until"] = (TODAY - timedelta(days=1)).isoformat()
    rows[4]["id_number"] = rows[1]["id_number"]
    r = send(client, a, to_csv(rows))
    assert r.status_code == 201, r.text
    # a repeated row reference is refused, by line
    rows[5]["applicant_ref"] = rows[0]["applicant_ref"]
    bad = send(client, a, to_csv(rows))
    assert bad.status_code == 422 and bad.json()["code"] == "upload_invalid"
    p = bad.json()["details"]["problems"][0]
    assert (p["check"], p["column"], p["first_lines"]) == ("duplicate_ref", "applicant_ref", [7])
    w = {x["check"]: x for x in r.json()["warnings"]}
    assert w["consent_expired"]["first_lines"] == [4]
    assert w["duplicate_key"]["first_lines"] == [6]
    assert rows[1]["id_number"] not in r.text


def test_parse_schema_defaults():
    s = parse_schema({"name": "t", "columns": [
        {"name": "k", "type": "string", "role": "join_key", "pii_kind": "cn_id", "nullable": False,
         "joins": "health.resident.id_number"}, {"name": "v", "type": "integer"}]})
    assert [(c.name, c.role, c.nullable) for c in s.columns] == [("k", "join_key", False), ("v", "attribute", True)]
    s = parse_schema({"name": "t", "columns": [{"name": "k", "type": "string", "role": "join_key", "pii_kind": "cn_id",
                                                "joins": "health.resident.id_number"}]})
    assert s.columns[0].nullable is False   # a join key is never null, declared or not


def test_concurrent_uploads_get_consecutive_versions(engine, settings, tmp_path):
    """Four uploads of one table at once: versions 1–4, one file each, all read-only."""
    from concurrent.futures import ThreadPoolExecutor

    from pdao.kernel.identity.models import Organization, User
    from sandbox.uploads.service import store_upload

    schema = parse_schema(APPLICANTS)
    srcs = []
    for i in range(4):
        p = tmp_path / f"a{i}.csv"
        p.write_bytes(to_csv(applicant_rows(5 + (i % 2))))   # two pairs of identical files
        srcs.append(p)
    with Session(engine) as s:
        org = s.exec(select(Organization).where(Organization.code == "company_a")).one()
        user = s.exec(select(User).where(User.username == "insurer_a")).one()

    def one(src):  # noqa: ANN001, ANN202
        with Session(engine, expire_on_commit=False) as s:
            return store_upload(s, settings, org=org, user_id=user.id, schema=schema, src=src)[0].version

    with ThreadPoolExecutor(4) as pool:
        versions = sorted(pool.map(one, srcs))
    assert versions == [1, 2, 3, 4]
    with Session(engine) as s:
        ups = s.exec(select(TenantUpload)).all()
        assert sorted(u.version for u in ups) == [1, 2, 3, 4]
        assert all(verify_upload(settings, u) == "ok" for u in ups)
    assert len(files_under(settings)) == 4
