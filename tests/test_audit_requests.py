"""Every request, allowed or denied, leaves exactly one audit event: who (actor, org, role, how
authenticated), what (action, method, path), the decision (allow / deny / error), the status, the
reason of a refusal, and the request id the client got in X-Request-ID."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func
from sqlmodel import Session, select

from api.deps import caller
from pdao.kernel.audit import AuditEvent
from tests.conftest import DEMO_PASSWORD
from tests.test_api_keys import PW

TOKEN_URL = "/api/v1/auth/token"


def events(engine) -> list[AuditEvent]:
    with Session(engine) as s:
        return list(s.exec(select(AuditEvent).order_by(AuditEvent.seq)).all())


def count(engine) -> int:
    with Session(engine) as s:
        return s.exec(select(func.count()).select_from(AuditEvent)).one()


def the_one_event(engine, before: int, r) -> AuditEvent:
    """The request made exactly one request event, and it is the one named by the response's request
    id (decisions appended with their change — no HTTP method — carry the same request id)."""
    evs = events(engine)
    decisions = [e for e in evs[before:] if e.method is None]
    assert all(e.request_id == r.headers.get("x-request-id") for e in decisions), decisions
    evs = [e for e in evs if e not in decisions]
    assert len(evs) == before + 1, [(e.action, e.status) for e in evs[before:]]
    ev = evs[-1]
    assert r.headers.get("x-request-id"), r.headers
    assert ev.request_id == r.headers["x-request-id"]
    assert ev.status == r.status_code
    assert ev.decision in ("allow", "deny", "error")
    assert ev.method == r.request.method and ev.path == r.request.url.path
    assert ev.at is not None
    return ev


@dataclass
class Case:
    id: str
    send: Callable  # (client, headers_of) -> response
    expect: dict = field(default_factory=dict)


def _h(who: str):  # noqa: ANN202
    return lambda c, hs: hs[who]


CASES = [
    Case("health_unauthenticated", lambda c, hs: c.get("/api/v1/health"),
         {"status": 200, "decision": "allow", "actor": None, "action": "health", "reason": None}),
    Case("no_credentials", lambda c, hs: c.get("/api/v1/datasets"),
         {"status": 401, "decision": "deny", "actor": None, "org": None, "role": None, "auth_method": None,
          "action": "catalog.read", "reason": "not_authenticated"}),
    Case("bad_token", lambda c, hs: c.get("/api/v1/datasets", headers={"Authorization": "Bearer x.y.z"}),
         {"status": 401, "decision": "deny", "actor": None, "reason": "invalid_token"}),
    Case("bad_api_key", lambda c, hs: c.get("/api/v1/me", headers={"X-API-Key": "pdao_nope"}),
         {"status": 401, "decision": "deny", "actor": None, "action": "me.read", "reason": "invalid_api_key"}),
    Case("unknown_route_anonymous", lambda c, hs: c.get("/api/v1/no/such/thing"),
         {"status": 404, "decision": "deny", "actor": None, "action": "unknown_route", "reason": "not_found"}),
    Case("unknown_route_outside_api", lambda c, hs: c.post("/wp-login.php", data={"log": "admin"}),
         {"status": 404, "decision": "deny", "action": "unknown_route"}),
    Case("wrong_method", lambda c, hs: c.delete("/api/v1/me", headers=hs["insurer_a"]),
         {"status": 405, "decision": "deny", "reason": "method_not_allowed"}),
    Case("failed_login_known_user", lambda c, hs: c.post(TOKEN_URL, data={"username": "insurer_b", "password": "x" * 9}),
         {"status": 401, "decision": "deny", "actor": None, "org": None, "action": "auth.login",
          "reason": "login_failed", "detail": {"attempted_username": "insurer_b"}}),   # nobody signed in
    Case("failed_login_unknown_user", lambda c, hs: c.post(TOKEN_URL, data={"username": "mallory", "password": "x" * 9}),
         {"status": 401, "decision": "deny", "actor": None, "action": "auth.login", "reason": "login_failed",
          "detail": {"attempted_username": "mallory"}}),
    Case("login_missing_password", lambda c, hs: c.post(TOKEN_URL, data={"username": "insurer_b"}),
         {"status": 422, "decision": "deny", "action": "auth.login", "reason": "invalid_request"}),
    Case("successful_login", lambda c, hs: c.post(TOKEN_URL, data={"username": "auditor1", "password": DEMO_PASSWORD}),
         {"status": 200, "decision": "allow", "actor": "auditor1", "org": "cac", "role": "auditor",
          "auth_method": "password", "action": "auth.login", "reason": None, "detail": None}),
    Case("token_use", lambda c, hs: c.get("/api/v1/datasets", headers=hs["insurer_a"]),
         {"status": 200, "decision": "allow", "actor": "insurer_a", "org": "company_a", "role": "applicant",
          "auth_method": "token", "action": "catalog.read", "reason": None}),
    Case("dataset_read_object", lambda c, hs: c.get("/api/v1/datasets/health.resident", headers=hs["insurer_a"]),
         {"status": 200, "decision": "allow", "action": "catalog.read", "object": "dataset:health.resident"}),
    Case("role_denied", lambda c, hs: c.get("/api/v1/users", headers=hs["insurer_a"]),
         {"status": 403, "decision": "deny", "actor": "insurer_a", "org": "company_a", "role": "applicant",
          "action": "user.read", "reason": "role_not_permitted"}),
    Case("not_visible", lambda c, hs: c.get("/api/v1/datasets/health.notifiable_disease", headers=hs["insurer_a"]),
         {"status": 404, "decision": "deny", "actor": "insurer_a", "reason": "not_found"}),
    Case("invalid_param", lambda c, hs: c.get("/api/v1/datasets?grade=42", headers=hs["insurer_a"]),
         {"status": 422, "decision": "deny", "actor": "insurer_a", "reason": "invalid_request"}),
    Case("bad_json", lambda c, hs: c.post("/api/v1/datasets", content=b"{",
                                          headers={**hs["provider1"], "Content-Type": "application/json"}),
         {"status": 400, "decision": "deny", "actor": "provider1", "action": "catalog.write", "reason": "bad_json"}),
    Case("too_large", lambda c, hs: c.post("/api/v1/datasets", content=b" " * (1024 * 1024 + 1),
                                           headers={**hs["provider1"], "Content-Type": "application/json"}),
         {"status": 413, "decision": "deny", "reason": "too_large"}),
    Case("operator_lists_users", lambda c, hs: c.get("/api/v1/users", headers=hs["operator1"]),
         {"status": 200, "decision": "allow", "actor": "operator1", "role": "operator", "action": "user.read"}),
]


@pytest.fixture
def headers_of(auth):
    return {u: auth(u) for u in ("insurer_a", "provider1", "operator1")}


def test_every_request_makes_exactly_one_event(client, engine, headers_of):
    for case in CASES:
        before = count(engine)
        r = case.send(client, headers_of)
        ev = the_one_event(engine, before, r)
        for k, v in case.expect.items():
            assert getattr(ev, k) == v, (case.id, k, getattr(ev, k), v)
        assert (ev.status >= 400) == (ev.decision != "allow"), case.id
        if ev.status >= 400:
            assert ev.reason, case.id  # a refusal always says why
        if ev.actor and case.expect.get("decision") == "allow":
            assert ev.org and ev.role and ev.auth_method, case.id


def test_logins_before_the_table_were_audited_too(client, engine):
    before = count(engine)
    r = client.post(TOKEN_URL, data={"username": "office1", "password": DEMO_PASSWORD})
    ev = the_one_event(engine, before, r)
    assert (ev.actor, ev.org, ev.role, ev.auth_method, ev.decision) == ("office1", "office", "office", "password",
                                                                         "allow")
    # the token is not in the event
    token = r.json()["access_token"]
    assert all(token not in str(v) for v in ev.model_dump().values())


def test_api_key_grant_claim_and_use_are_audited_under_their_real_actors(client, engine, auth):
    """The operator's grant is the operator's; the claim and every use of the key are the owner's."""
    r = client.post("/api/v1/api-keys", json={"username": "insurer_b"}, headers=auth("operator1"))
    ev = events(engine)[-1]
    assert (ev.action, ev.object, ev.decision, ev.status, ev.actor) == ("api_key.issue", "user:insurer_b", "allow",
                                                                        201, "operator1")
    owner = auth("insurer_b")
    before = count(engine)
    c = client.post(r.json()["claim_path"], json=PW, headers=owner)
    key = c.json()["key"]
    evs = events(engine)[before:]
    # the claim's request event and, committed with the key, its decision event
    assert [(e.action, e.actor, e.auth_method, e.request_id) for e in evs] == [
        ("api_key.claimed", "insurer_b", "token", c.headers["x-request-id"]),
        ("api_key.claim", "insurer_b", "token", c.headers["x-request-id"])]
    assert all(key not in str(e.model_dump()) for e in events(engine))
    before = count(engine)
    r = client.get("/api/v1/datasets", headers={"X-API-Key": key})
    ev = the_one_event(engine, before, r)
    assert (ev.actor, ev.org, ev.auth_method, ev.decision) == ("insurer_b", "company_b", "api_key", "allow")


def test_a_locked_account_is_audited_with_its_reason(client, engine):
    for _ in range(5):
        client.post(TOKEN_URL, data={"username": "office2", "password": "wrong-pass"})
    before = count(engine)
    r = client.post(TOKEN_URL, data={"username": "office2", "password": DEMO_PASSWORD})
    ev = the_one_event(engine, before, r)
    assert (ev.status, ev.decision, ev.actor, ev.reason, ev.detail) == (
        429, "deny", None, "login_locked", {"attempted_username": "office2"})
    failures = [e for e in events(engine) if e.reason == "login_failed"]
    assert [(e.actor, e.detail) for e in failures] == [(None, {"attempted_username": "office2"})] * 5


def _boom(_p: caller("me", "read")):  # noqa: ANN202
    raise RuntimeError("boom")


def test_a_server_error_is_one_event_with_decision_error(app, engine):
    app.add_api_route("/api/v1/_boom", _boom, methods=["GET"], name="test.boom")
    with TestClient(app, raise_server_exceptions=False) as c:
        token = c.post(TOKEN_URL, data={"username": "insurer_a", "password": DEMO_PASSWORD}).json()["access_token"]
        before = count(engine)
        r = c.get("/api/v1/_boom", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 500
        ev = the_one_event(engine, before, r)
    assert (ev.decision, ev.actor, ev.action, ev.reason) == ("error", "insurer_a", "me.read", "internal_error")
    assert r.json()["details"]["request_id"] == ev.request_id


def test_request_ids_are_ours_and_a_plain_client_id_is_kept_beside(client, engine):
    """Our id is always fresh (two requests naming the same id stay apart); the client's own id is
    kept in the detail only when it is a plain token."""
    ids = []
    for _ in range(2):
        before = count(engine)
        r = client.get("/api/v1/health", headers={"X-Request-ID": "batch-42.item:7"})
        ev = the_one_event(engine, before, r)
        assert r.headers["x-request-id"] == ev.request_id != "batch-42.item:7" and len(ev.request_id) == 32
        assert ev.detail == {"client_request_id": "batch-42.item:7"}
        ids.append(ev.request_id)
    assert ids[0] != ids[1]
    for bad in ("has space", "x" * 65, "new\u2028line", "<script>", "-starts-with-dash"):
        before = count(engine)
        r = client.get("/api/v1/health", headers={"X-Request-ID": bad.encode("utf-8")})
        ev = the_one_event(engine, before, r)
        assert r.headers["x-request-id"] == ev.request_id and len(ev.request_id) == 32 and ev.detail is None


def test_request_ids_are_unique_and_sequence_grows(client, engine, auth):
    h = auth("auditor1")
    for _ in range(5):
        client.get("/api/v1/datasets", headers=h)
        client.get("/api/v1/nope")
    evs = events(engine)
    assert len({e.request_id for e in evs}) == len(evs)
    assert [e.seq for e in evs] == sorted(e.seq for e in evs)


def test_no_credentials_or_query_strings_in_the_audit_log(client, engine, auth):
    secret_q = "640104198801010011"
    client.get("/api/v1/datasets", params={"q": secret_q}, headers=auth("insurer_a"))
    client.post(TOKEN_URL, data={"username": "insurer_a", "password": "my-wrong-secret"})
    grant = client.post("/api/v1/api-keys", json={"username": "insurer_a"}, headers=auth("operator1")).json()
    wrong = client.post(grant["claim_path"], json={"password": "my-wrong-secret"}, headers=auth("insurer_a"))
    assert wrong.status_code == 403 and wrong.json()["code"] == "wrong_password"
    right = client.post(grant["claim_path"], json=PW, headers=auth("insurer_a"))
    assert right.status_code == 200
    dump = "\n".join(str(e.model_dump()) for e in events(engine))
    assert secret_q not in dump and "my-wrong-secret" not in dump and "pdao-demo" not in dump
    assert "Bearer" not in dump
