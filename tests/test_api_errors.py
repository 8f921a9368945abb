"""Every error path answers exactly the JSON error of API.md — {code, message, message_zh, details?}
with the fitting status, no stack trace, no server paths — and changes nothing.

The main test is one table: each row is a request and the status and code it must get. Every row
also checks that the database (all tables but the audit log) and the domain store are the same
after the refused request as before it."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from fastapi.testclient import TestClient
from sqlalchemy import inspect, text
from sqlmodel import Session, select

from api.deps import SessionDep, caller
from catalog.descriptor import PACKAGED_DESCRIPTORS
from pdao.kernel.identity.models import User
from tests.conftest import DEMO_PASSWORD, login

ERROR_KEYS = {"code", "message", "message_zh"}
CJK = re.compile(r"[\u4e00-\u9fff]")
LEAKS = ("Traceback", 'File "', "site-packages", "/work/", "/tmp/", "/home/", ".py\"", ".py:", "sqlalchemy",
         "psycopg", "sqlite3", "RuntimeError", "Exception")


def assert_error_shape(r, status: int, code: str | None = None) -> dict:
    """The one error shape, nothing else, and nothing a client should not see."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert isinstance(body, dict)
    assert ERROR_KEYS <= set(body) <= ERROR_KEYS | {"details"}, body
    assert all(isinstance(body[k], str) and body[k].strip() for k in ERROR_KEYS), body
    assert re.fullmatch(r"[a-z][a-z0-9_]*", body["code"]), body
    assert CJK.search(body["message_zh"]), body  # a real Chinese message, not a copy of the English
    if code is not None:
        assert body["code"] == code, body
    for leak in LEAKS:
        assert leak not in r.text, (leak, r.text)
    assert r.headers.get("x-request-id"), "every answer names its request"
    return body


# --- fixtures of the table ----------------------------------------------------------------------

def packaged(code: str) -> dict:
    """A packaged descriptor as JSON would carry it (YAML dates become ISO strings)."""
    d = yaml.safe_load((PACKAGED_DESCRIPTORS / f"{code}.yaml").read_text(encoding="utf-8"))
    return json.loads(json.dumps(d, default=str, ensure_ascii=False))


def resident_descriptor(**changes) -> dict:
    d = packaged("health.resident")
    d.update(changes)
    return d


def settlement_descriptor() -> dict:
    d = packaged("health.insurance_settlement")
    d["title"]["en"] = "changed by another department"
    return d


def new_descriptor() -> dict:
    return resident_descriptor(code="health.resident_copy")


CSV_OK_HEADER = "person_id,id_number,name,phone,sex,birth_date,district,address,insurance_type\n"


def upload(client, code: str, data: bytes, headers, env: str | None = "prod", filename: str = "f.csv"):
    form = {"env": env} if env is not None else {}
    return client.post(f"/api/v1/datasets/{code}/versions", files={"file": (filename, data, "text/csv")},
                       data=form, headers=headers)


def db_state(engine) -> dict[str, list]:
    """Every row of every table except the audit log (which must grow), the failed-login counter
    of unknown usernames (which must count) and Alembic's."""
    out = {}
    with engine.connect() as conn:
        for table in sorted(inspect(engine).get_table_names()):
            if table in ("audit_event", "audit_head", "login_throttle", "alembic_version"):
                continue
            rows = conn.execute(text(f'SELECT * FROM "{table}"')).all()
            out[table] = sorted(repr(tuple(r)) for r in rows)
    return out


def domain_state(settings) -> list[str]:
    return sorted(str(p.relative_to(settings.home)) for p in settings.domain_dir.rglob("*"))


Send = Callable[[TestClient, Callable[[str], dict]], object]


@dataclass
class Case:
    id: str
    status: int
    code: str
    send: Send
    users: tuple[str, ...] = ()
    check: Callable[[dict], None] | None = None
    headers: dict[str, str] = field(default_factory=dict)  # response headers that must be present


def _details_are_problems(body: dict) -> None:
    assert isinstance(body["details"], list) and body["details"]
    for p in body["details"]:
        assert {"path", "message"} <= set(p) and p["message"], p


def _details_name_locations(body: dict) -> None:
    assert isinstance(body["details"], list) and body["details"]
    for p in body["details"]:
        assert set(p) == {"loc", "message", "type"} and p["loc"] and p["message"], p


BIG = b"x" * (1024 * 1024 + 10)
SECRET_ID = "640104198801010011"
# 400 bytes that expand to 10^9 strings ("billion laughs"); the enum error would repr all of them
YAML_BOMB = "\n".join(['a0: &a0 ["x","x","x","x","x","x","x","x","x","x"]']
                      + [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
                      + ["code: health.bomb", "category: *a8"])  # a value a client sent; it must not be echoed back

CASES = [
    # 401: no or bad credentials
    Case("no_credentials", 401, "not_authenticated", lambda c, a: c.get("/api/v1/datasets"),
         headers={"www-authenticate": "Bearer"}),
    Case("no_credentials_post", 401, "not_authenticated", lambda c, a: c.post("/api/v1/datasets", json=new_descriptor())),
    Case("no_credentials_upload", 401, "not_authenticated",
         lambda c, a: upload(c, "health.resident", CSV_OK_HEADER.encode(), {})),
    Case("no_credentials_me", 401, "not_authenticated", lambda c, a: c.get("/api/v1/me")),
    Case("basic_auth_scheme", 401, "not_authenticated",
         lambda c, a: c.get("/api/v1/datasets", headers={"Authorization": "Basic aW5zdXJlcl9hOnBkYW8tZGVtbw=="})),
    Case("bad_bearer", 401, "invalid_token",
         lambda c, a: c.get("/api/v1/datasets", headers={"Authorization": "Bearer not.a.token"})),
    Case("empty_bearer", 401, "not_authenticated",
         lambda c, a: c.get("/api/v1/datasets", headers={"Authorization": "Bearer "})),
    Case("bad_api_key", 401, "invalid_api_key",
         lambda c, a: c.get("/api/v1/datasets", headers={"X-API-Key": "pdao_0123456789ab_" + "x" * 43})),
    Case("garbage_api_key", 401, "invalid_api_key",
         lambda c, a: c.get("/api/v1/datasets", headers={"X-API-Key": "garbage"})),
    Case("login_wrong_password", 401, "login_failed",
         lambda c, a: c.post("/api/v1/auth/token", data={"username": "nobody", "password": "x" * 12})),
    # 403: the role may not
    Case("applicant_registers", 403, "role_not_permitted",
         lambda c, a: c.post("/api/v1/datasets", json=new_descriptor(), headers=a("insurer_a")), ("insurer_a",)),
    Case("auditor_registers", 403, "role_not_permitted",
         lambda c, a: c.post("/api/v1/datasets", json=new_descriptor(), headers=a("auditor1")), ("auditor1",)),
    Case("applicant_uploads", 403, "role_not_permitted",
         lambda c, a: upload(c, "health.resident", CSV_OK_HEADER.encode(), a("insurer_a")), ("insurer_a",)),
    Case("provider_issues_key", 403, "role_not_permitted",
         lambda c, a: c.post("/api/v1/api-keys", json={"username": "provider1"}, headers=a("provider1")),
         ("provider1",)),
    Case("operator_claims_a_key", 403, "role_not_permitted",
         lambda c, a: c.post("/api/v1/api-keys/1/claim", headers=a("operator1")), ("operator1",)),
    Case("office_lists_keys", 403, "role_not_permitted",
         lambda c, a: c.get("/api/v1/api-keys", headers=a("office1")), ("office1",)),
    Case("office_lists_users", 403, "role_not_permitted",
         lambda c, a: c.get("/api/v1/users", headers=a("office1")), ("office1",)),
    Case("other_department_changes", 403, "not_your_department",
         lambda c, a: c.post("/api/v1/datasets", json=settlement_descriptor(), headers=a("provider1")), ("provider1",)),
    Case("other_department_claims", 403, "not_your_department",
         lambda c, a: c.post("/api/v1/datasets", json=resident_descriptor(code="health.x", source_department="ycybj"),
                             headers=a("provider1")), ("provider1",)),
    Case("other_department_loads", 403, "not_your_department",
         lambda c, a: upload(c, "health.insurance_settlement", b"settlement_id\n1\n", a("provider1")), ("provider1",)),
    # 404: no such route or object (and a prohibited dataset is "no such dataset" for an applicant)
    Case("unknown_route_get_api", 404, "not_found", lambda c, a: c.get("/api/v1/nope")),
    Case("unknown_route_post_api", 404, "not_found", lambda c, a: c.post("/api/v1/nope", json={"a": 1})),
    Case("unknown_route_get_root", 404, "not_found", lambda c, a: c.get("/nope")),
    Case("unknown_route_post_root", 404, "not_found", lambda c, a: c.post("/nope", content=b"x")),
    Case("unknown_route_authenticated", 404, "not_found",
         lambda c, a: c.get("/api/v1/datasets/health.resident/rows", headers=a("auditor1")), ("auditor1",)),
    Case("unknown_dataset", 404, "not_found",
         lambda c, a: c.get("/api/v1/datasets/health.nope", headers=a("auditor1")), ("auditor1",)),
    Case("prohibited_dataset_for_applicant", 404, "not_found",
         lambda c, a: c.get("/api/v1/datasets/health.notifiable_disease", headers=a("insurer_a")), ("insurer_a",)),
    Case("upload_unknown_dataset", 404, "not_found",
         lambda c, a: upload(c, "health.nope", CSV_OK_HEADER.encode(), a("provider1")), ("provider1",)),
    Case("revoke_unknown_key", 404, "not_found",
         lambda c, a: c.delete("/api/v1/api-keys/424242", headers=a("operator1")), ("operator1",)),
    Case("claim_unknown_key", 404, "not_found",
         lambda c, a: c.post("/api/v1/api-keys/424242/claim", headers=a("insurer_a")), ("insurer_a",)),
    Case("claim_key_beyond_the_id_range", 404, "not_found",
         lambda c, a: c.post("/api/v1/api-keys/99999999999/claim", headers=a("insurer_a")), ("insurer_a",)),
    Case("owner_revokes_unknown_key", 404, "not_found",
         lambda c, a: c.delete("/api/v1/api-keys/424242", headers=a("provider1")), ("provider1",)),
    Case("key_for_unknown_user", 404, "not_found",
         lambda c, a: c.post("/api/v1/api-keys", json={"username": "ghost"}, headers=a("operator1")), ("operator1",)),
    # 405
    Case("delete_datasets", 405, "method_not_allowed", lambda c, a: c.delete("/api/v1/datasets", headers=a("auditor1")),
         ("auditor1",), headers={"allow": ""}),
    Case("put_token", 405, "method_not_allowed", lambda c, a: c.put("/api/v1/auth/token", data={"username": "x"})),
    Case("get_token", 405, "method_not_allowed", lambda c, a: c.get("/api/v1/auth/token")),
    Case("post_health", 405, "method_not_allowed", lambda c, a: c.post("/api/v1/health")),
    # 422: invalid parameters
    Case("grade_out_of_range", 422, "invalid_request",
         lambda c, a: c.get("/api/v1/datasets?grade=9", headers=a("auditor1")), ("auditor1",), _details_name_locations),
    Case("limit_not_a_number", 422, "invalid_request",
         lambda c, a: c.get("/api/v1/datasets?limit=abc", headers=a("auditor1")), ("auditor1",), _details_name_locations),
    Case("limit_zero", 422, "invalid_request",
         lambda c, a: c.get("/api/v1/datasets?limit=0", headers=a("auditor1")), ("auditor1",)),
    Case("negative_offset", 422, "invalid_request",
         lambda c, a: c.get("/api/v1/datasets?offset=-1", headers=a("auditor1")), ("auditor1",)),
    Case("unknown_category", 422, "invalid_request",
         lambda c, a: c.get("/api/v1/datasets?category=bogus", headers=a("auditor1")), ("auditor1",)),
    Case("unknown_sensitivity", 422, "invalid_request",
         lambda c, a: c.get("/api/v1/datasets?sensitivity=secret", headers=a("auditor1")), ("auditor1",)),
    Case("q_too_long", 422, "invalid_request",
         lambda c, a: c.get("/api/v1/datasets", params={"q": "x" * 101}, headers=a("auditor1")), ("auditor1",)),
    Case("login_missing_fields", 422, "invalid_request", lambda c, a: c.post("/api/v1/auth/token", data={}),
         check=_details_name_locations),
    Case("login_missing_password", 422, "invalid_request",
         lambda c, a: c.post("/api/v1/auth/token", data={"username": "insurer_a"})),
    Case("login_json_instead_of_form", 422, "invalid_request",
         lambda c, a: c.post("/api/v1/auth/token", json={"username": "insurer_a", "password": DEMO_PASSWORD})),
    Case("api_key_bad_json", 422, "invalid_request",
         lambda c, a: c.post("/api/v1/api-keys", content=b"{bad",
                             headers={**a("operator1"), "Content-Type": "application/json"}), ("operator1",)),
    Case("api_key_valid_days_zero", 422, "invalid_request",
         lambda c, a: c.post("/api/v1/api-keys", json={"username": "insurer_a", "valid_days": 0},
                             headers=a("operator1")), ("operator1",)),
    Case("api_key_claim_id_not_int", 422, "invalid_request",
         lambda c, a: c.post("/api/v1/api-keys/abc/claim", headers=a("insurer_a")), ("insurer_a",)),
    Case("api_key_id_not_int", 422, "invalid_request",
         lambda c, a: c.delete("/api/v1/api-keys/abc", headers=a("operator1")), ("operator1",)),
    Case("upload_bad_env", 422, "dev_is_synthetic",
         lambda c, a: upload(c, "health.resident", CSV_OK_HEADER.encode(), a("provider1"), env="staging"),
         ("provider1",)),
    Case("upload_missing_file", 400, "no_file",
         lambda c, a: c.post("/api/v1/datasets/health.resident/versions", data={"env": "prod"},
                             headers=a("provider1")), ("provider1",)),
    Case("upload_wrong_columns", 422, "version_invalid",
         lambda c, a: upload(c, "health.resident", f"person_id,id_number\n1,{SECRET_ID}\n".encode(), a("provider1")),
         ("provider1",)),
    # 400 / 422: bad bodies on POST /datasets
    Case("bad_json_body", 400, "bad_json",
         lambda c, a: c.post("/api/v1/datasets", content=b"{not json",
                             headers={**a("provider1"), "Content-Type": "application/json"}), ("provider1",)),
    Case("json_array_body", 400, "bad_json",
         lambda c, a: c.post("/api/v1/datasets", json=[1, 2], headers=a("provider1")), ("provider1",)),
    Case("empty_body", 400, "bad_json",
         lambda c, a: c.post("/api/v1/datasets", content=b"",
                             headers={**a("provider1"), "Content-Type": "application/json"}), ("provider1",)),
    Case("yaml_not_utf8", 400, "bad_encoding",
         lambda c, a: c.post("/api/v1/datasets", content="code: 数据".encode("gb18030"),
                             headers={**a("provider1"), "Content-Type": "application/yaml"}), ("provider1",)),
    Case("upload_empty_file", 400, "empty_file",
         lambda c, a: upload(c, "health.resident", b"", a("provider1")), ("provider1",)),
    Case("invalid_descriptor_json", 422, "descriptor_invalid",
         lambda c, a: c.post("/api/v1/datasets", json={"code": "Bad Code", "grade": 9}, headers=a("provider1")),
         ("provider1",), _details_are_problems),
    Case("invalid_descriptor_semantics", 422, "descriptor_invalid",
         lambda c, a: c.post("/api/v1/datasets", json=resident_descriptor(code="health.y", privacy_unit="nope"),
                             headers=a("provider1")), ("provider1",), _details_are_problems),
    Case("invalid_descriptor_yaml_syntax", 422, "descriptor_invalid",
         lambda c, a: c.post("/api/v1/datasets", content="code: [unclosed\n  title: {zh: x".encode(),
                             headers={**a("provider1"), "Content-Type": "application/yaml"}), ("provider1",),
         _details_are_problems),
    Case("invalid_descriptor_yaml_list", 422, "descriptor_invalid",
         lambda c, a: c.post("/api/v1/datasets", content=b"- a\n- b\n",
                             headers={**a("provider1"), "Content-Type": "application/yaml"}), ("provider1",),
         _details_are_problems),
    Case("yaml_alias_bomb", 422, "descriptor_invalid",
         lambda c, a: c.post("/api/v1/datasets", content=YAML_BOMB.encode(),
                             headers={**a("provider1"), "Content-Type": "application/yaml"}), ("provider1",),
         _details_are_problems),
    Case("unknown_department", 403, "not_your_department",
         lambda c, a: c.post("/api/v1/datasets", json=resident_descriptor(code="health.z", source_department="nowhere"),
                             headers=a("provider1")), ("provider1",)),
    # 413
    Case("descriptor_too_large", 413, "too_large",
         lambda c, a: c.post("/api/v1/datasets", content=BIG,
                             headers={**a("provider1"), "Content-Type": "application/json"}), ("provider1",)),
    Case("descriptor_too_large_yaml", 413, "too_large",
         lambda c, a: c.post("/api/v1/datasets", content=b"# " + BIG,
                             headers={**a("provider1"), "Content-Type": "application/yaml"}), ("provider1",)),
    Case("login_body_too_large", 413, "too_large",
         lambda c, a: c.post("/api/v1/auth/token", data={"username": "insurer_a", "password": "p" * (1024 * 1024 + 1)})),
]


def test_error_table(client, auth, engine, settings, subtests):
    """One database per backend for the whole table (each row is a refusal, so each row starts
    from the same state); each row is its own subtest."""
    assert len({c.id for c in CASES}) == len(CASES)
    for u in {u for c in CASES for u in c.users}:  # log in first: a login legitimately changes last_login_at
        auth(u)
    for case in CASES:
        with subtests.test(case.id):
            before, files_before = db_state(engine), domain_state(settings)
            r = case.send(client, auth)
            body = assert_error_shape(r, case.status, case.code)
            for h, v in case.headers.items():
                assert h in r.headers and (not v or r.headers[h] == v), (h, r.headers)
            if case.check:
                case.check(body)
            assert SECRET_ID not in r.text
            assert db_state(engine) == before, "a refused request changed the database"
            assert domain_state(settings) == files_before, "a refused request changed the domain store"


def test_the_table_covers_every_error_status():
    assert {c.status for c in CASES} >= {400, 401, 403, 404, 405, 413, 422}


def test_refused_registration_leaves_the_catalog_as_it_was(client, auth):
    """The dataset count, as a client sees it, is unchanged after each kind of refused register."""
    office = auth("office1")
    total = client.get("/api/v1/datasets", headers=office).json()["total"]
    for headers, body in ((auth("insurer_a"), new_descriptor()), (auth("provider1"), {"code": "health.q"}),
                          ({}, new_descriptor())):
        assert client.post("/api/v1/datasets", json=body, headers=headers).status_code in (401, 403, 422)
        assert client.get("/api/v1/datasets", headers=office).json()["total"] == total
    assert client.post("/api/v1/datasets", json=new_descriptor(), headers=auth("provider1")).status_code == 201
    assert client.get("/api/v1/datasets", headers=office).json()["total"] == total + 1


def test_every_api_route_but_health_and_login_needs_credentials(app, client):
    """One authentication path for every endpoint: without credentials, each answers 401."""
    public = {("/api/v1/health", "get"), ("/api/v1/auth/token", "post")}
    checked = 0
    for path, ops in app.openapi()["paths"].items():
        for method in ops:
            if (path, method) in public:
                continue
            r = client.request(method.upper(), re.sub(r"\{[^}]+\}", "1", path))
            assert_error_shape(r, 401, "not_authenticated")
            checked += 1
    assert checked >= 7
    assert client.get("/api/v1/health").status_code == 200


def test_a_chunked_body_over_the_limit_is_413(client, auth, engine):
    """Without a Content-Length, the body is counted as it streams in."""
    headers = {**auth("provider1"), "Content-Type": "application/json"}
    before = db_state(engine)

    def chunks():
        for _ in range(20):
            yield b" " * (64 * 1024)

    r = client.post("/api/v1/datasets", content=chunks(), headers=headers)
    assert "content-length" not in {k.lower() for k in r.request.headers}
    assert_error_shape(r, 413, "too_large")
    assert db_state(engine) == before


def test_upload_over_the_limit_is_413_and_stores_nothing(settings, engine):
    from api.app import create_app

    small = dataclasses.replace(settings, max_upload_bytes=1000)
    app = create_app(small)
    try:
        with TestClient(app, raise_server_exceptions=False) as c:
            headers = login(c, "provider1")
            before, files_before = db_state(engine), domain_state(settings)
            data = (CSV_OK_HEADER + "1,x,y,z,M,1980-01-01,兴庆区,a,城镇职工\n" * 40).encode()
            assert len(data) > 1000
            body = assert_error_shape(upload(c, "health.resident", data, headers), 413, "too_large")
            assert "1000 bytes" in body["message"] and "1000 bytes" in body["message_zh"]
            # far over the limit: refused while reading, still the JSON shape
            assert_error_shape(upload(c, "health.resident", b"a" * (3 * 1024 * 1024), headers), 413, "too_large")
            assert db_state(engine) == before
            assert domain_state(settings) == files_before
            assert list(small.staging_dir.glob("upload-*")) == []  # the partial upload was removed
    finally:
        app.state.engine.dispose()


def _boom(principal: caller("me", "read"), session: SessionDep):  # noqa: ANN202
    # a half-done change, then a bug: the change must not survive
    user = session.exec(select(User).where(User.username == principal.username)).one()
    user.display_name = "half-done change"
    session.add(user)
    session.flush()
    raise RuntimeError(f"bug with a secret {SECRET_ID} at {Path(__file__)}")


async def _boom_async():  # noqa: ANN202
    raise ValueError("an async bug " + SECRET_ID)


def test_unexpected_exception_is_a_500_without_traceback_and_changes_nothing(app, engine, settings):
    app.add_api_route("/api/v1/_boom", _boom, methods=["POST"], name="test.boom")
    app.add_api_route("/_boom_async", _boom_async, methods=["GET"], name="test.boom_async")
    with TestClient(app, raise_server_exceptions=False) as c:
        headers = login(c, "insurer_a")
        before = db_state(engine)
        for r in (c.post("/api/v1/_boom", headers=headers), c.get("/_boom_async")):
            body = assert_error_shape(r, 500, "internal_error")
            assert SECRET_ID not in r.text
            assert body["details"]["request_id"] == r.headers["x-request-id"]
        assert db_state(engine) == before
    with Session(engine) as s:
        assert s.exec(select(User).where(User.username == "insurer_a")).one().display_name != "half-done change"


def test_validation_details_do_not_echo_input(client, auth):
    r = client.get("/api/v1/datasets", params={"grade": SECRET_ID}, headers=auth("auditor1"))
    assert_error_shape(r, 422, "invalid_request")
    assert SECRET_ID not in r.text
    r = client.post("/api/v1/api-keys", json={"username": SECRET_ID * 5, "valid_days": SECRET_ID},
                    headers=auth("operator1"))
    assert_error_shape(r, 422, "invalid_request")
    assert SECRET_ID not in r.text
    json.dumps(r.json())
