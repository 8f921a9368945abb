"""API keys reach only their owner (issue 13, finding 3).

The attack: `POST /api-keys {"username": "insurer_a"}` as operator1 answered insurer_a's key to the
operator, who could then read insurer_a's cells and download its results while the audit log
recorded it all as insurer_a. Now the operator only *grants* a key (a row without a secret); the
owner, signed in with their own password, *claims* it and is the only one ever to see it. Every
grant, claim and revocation is in the audit chain under the real actor.

Every test runs through the real HTTP API on SQLite and on PostgreSQL (see conftest)."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text
from sqlmodel import Session, select

from pdao import audit
from pdao.audit import AuditEvent
from pdao.identity import tokens
from pdao.identity.models import ApiKey, User
from tests.conftest import first_also_on_postgresql

API = "/api/v1/api-keys"


def granted_key(client, auth, username: str, **body) -> tuple[str, int]:
    """An API key the way its owner gets one: operator1 grants it, the owner claims it.
    (key, id)."""
    r = client.post(API, json={"username": username, **body}, headers=auth("operator1"))
    assert r.status_code == 201, r.text
    c = client.post(f"{API}/{r.json()['id']}/claim", headers=auth(username))
    assert c.status_code == 200, c.text
    return c.json()["key"], c.json()["id"]


def assert_error(r, status: int, code: str) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert body["code"] == code and body["message"] and body["message_zh"], body
    assert set(body) <= {"code", "message", "message_zh", "details"}
    return body


def grant(client, auth, username: str = "insurer_a", **body) -> dict:
    r = client.post(API, json={"username": username, **body}, headers=auth("operator1"))
    assert r.status_code == 201, r.text
    return r.json()


def key_row(engine, key_id: int) -> ApiKey:
    with Session(engine) as s:
        return s.get(ApiKey, key_id)


def all_events(engine) -> list[AuditEvent]:
    with Session(engine) as s:
        return list(s.exec(select(AuditEvent).order_by(AuditEvent.seq)).all())


def decisions(engine, action: str) -> list[AuditEvent]:
    return [e for e in all_events(engine) if e.action == action]


# --- the attack ----------------------------------------------------------------------------------

def test_an_operator_granting_a_key_never_holds_it_and_cannot_act_as_the_tenant(client, engine, auth):
    op = auth("operator1")
    granting = client.post(API, json={"username": "insurer_a", "label": "nightly"}, headers=op)
    assert granting.status_code == 201, granting.text
    g = granting.json()
    # the answer holds no key: none exists yet
    assert "key" not in g and tokens.API_KEY_PREFIX not in granting.text
    assert (g["username"], g["status"], g["prefix"], g["granted_by"]) == ("insurer_a", "pending", None, "operator1")
    assert g["claim_path"] == f"{API}/{g['id']}/claim"
    row = key_row(engine, g["id"])
    assert row.prefix is None and row.key_sha256 is None and row.claimed_at is None
    assert timedelta(days=6, hours=23) < row.claim_by - datetime.now(UTC) <= timedelta(days=7)
    # the operator can neither claim it (its role claims nothing, the grant is not its own) nor
    # read a key anywhere
    assert_error(client.post(g["claim_path"], headers=op), 403, "role_not_permitted")
    listed = client.get(API, headers=op)
    assert listed.status_code == 200 and tokens.API_KEY_PREFIX not in listed.text
    assert key_row(engine, g["id"]).key_sha256 is None     # the refused claim made nothing

    # the owner claims it, signed in with their own password, and is the only one to see it
    r = client.post(g["claim_path"], headers=auth("insurer_a"))
    assert r.status_code == 200, r.text
    key = r.json()["key"]
    assert key.startswith(tokens.API_KEY_PREFIX) and r.json()["status"] == "active"
    assert key_row(engine, g["id"]).key_sha256 == tokens.api_key_digest(key)
    use = client.get("/api/v1/me", headers={"X-API-Key": key})
    assert use.json()["username"] == "insurer_a"
    # a second claim gets no second key, for no one
    assert_error(client.post(g["claim_path"], headers=auth("insurer_a")), 409, "api_key_claimed")
    assert_error(client.post(g["claim_path"], headers=op), 403, "role_not_permitted")

    # the audit chain names each real actor; the operator acts only as itself; no event holds the key
    events = all_events(engine)
    assert all(key not in repr(e.model_dump()) for e in events)
    [granted] = decisions(engine, "api_key.granted")
    assert (granted.actor, granted.role, granted.object, granted.request_id) == (
        "operator1", "operator", f"api_key:{g['id']}", granting.headers["x-request-id"])
    assert granted.detail["owner"] == "insurer_a"
    [claimed] = decisions(engine, "api_key.claimed")
    assert (claimed.actor, claimed.role, claimed.auth_method) == ("insurer_a", "applicant", "token")
    assert claimed.request_id == r.headers["x-request-id"]
    assert {(e.actor, e.role) for e in events if e.actor == "operator1"} == {("operator1", "operator")}
    assert {e.auth_method for e in events if e.actor == "insurer_a"} == {"password", "token", "api_key"}
    [used] = [e for e in events if e.request_id == use.headers["x-request-id"]]
    assert (used.actor, used.auth_method, used.detail) == ("insurer_a", "api_key", {"api_key_id": g["id"]})
    assert audit.verify(engine).ok


def test_the_grant_and_its_audit_event_commit_together(client, engine, auth):
    r = client.post(API, json={"username": "provider1"}, headers=auth("operator1"))
    [ev] = decisions(engine, "api_key.granted")
    assert ev.request_id == r.headers["x-request-id"] and ev.path is None   # the decision, beside the request's event
    [request_event] = [e for e in all_events(engine) if e.request_id == ev.request_id and e.path is not None]
    assert (request_event.action, request_event.status, request_event.actor) == ("api_key.issue", 201, "operator1")
    assert ev.seq < request_event.seq


# --- who may claim -------------------------------------------------------------------------------

@pytest.mark.parametrize("other", first_also_on_postgresql(["insurer_b", "provider1"]))
def test_another_users_grant_answers_404_like_a_missing_one(client, engine, auth, other):
    g = grant(client, auth, "insurer_a")
    missing = assert_error(client.post(f"{API}/999999/claim", headers=auth(other)), 404, "not_found")
    assert assert_error(client.post(g["claim_path"], headers=auth(other)), 404, "not_found") == missing
    assert assert_error(client.delete(f"{API}/{g['id']}", headers=auth(other)), 404, "not_found") == \
        assert_error(client.delete(f"{API}/999999", headers=auth(other)), 404, "not_found")
    assert client.get(API, headers=auth(other)).json() == []
    row = key_row(engine, g["id"])
    assert row.key_sha256 is None and row.revoked_at is None      # untouched
    assert decisions(engine, "api_key.claimed") == decisions(engine, "api_key.revoked") == []


def test_a_claim_needs_the_owners_password_login_not_an_api_key(client, engine, auth):
    """A leaked key must not mint more keys: claims take a bearer token from a password login."""
    key, _ = granted_key(client, auth, "insurer_a")
    g = grant(client, auth, "insurer_a")
    assert_error(client.post(g["claim_path"], headers={"X-API-Key": key}), 403, "password_login_required")
    assert key_row(engine, g["id"]).key_sha256 is None
    # the same owner, signed in, claims it
    assert client.post(g["claim_path"], headers=auth("insurer_a")).status_code == 200


def test_claimed_revoked_and_lapsed_grants_answer_409(client, engine, auth):
    owner = auth("provider1")
    claimed = grant(client, auth, "provider1")
    assert client.post(claimed["claim_path"], headers=owner).status_code == 200
    assert_error(client.post(claimed["claim_path"], headers=owner), 409, "api_key_claimed")

    revoked = grant(client, auth, "provider1")
    assert client.delete(f"{API}/{revoked['id']}", headers=auth("operator1")).json()["status"] == "revoked"
    assert_error(client.post(revoked["claim_path"], headers=owner), 409, "api_key_revoked")

    lapsed = grant(client, auth, "provider1")
    with Session(engine) as s:   # its claim window has passed
        row = s.get(ApiKey, lapsed["id"])
        row.claim_by = datetime.now(UTC) - timedelta(seconds=1)
        s.add(row)
        s.commit()
    assert_error(client.post(lapsed["claim_path"], headers=owner), 409, "api_key_grant_lapsed")
    assert key_row(engine, lapsed["id"]).key_sha256 is None
    statuses = {k["id"]: k["status"] for k in client.get(API, headers=owner).json()}
    assert statuses == {claimed["id"]: "active", revoked["id"]: "revoked", lapsed["id"]: "lapsed"}
    assert len(decisions(engine, "api_key.claimed")) == 1


def test_parallel_claims_give_one_key(client, engine, auth):
    g = grant(client, auth, "insurer_b")
    headers = auth("insurer_b")
    n = 6
    barrier = threading.Barrier(n)
    answers: list[tuple[int, str | None]] = []

    def claim() -> None:
        barrier.wait()
        r = client.post(g["claim_path"], headers=headers)
        answers.append((r.status_code, r.json().get("key") or r.json().get("code")))

    threads = [threading.Thread(target=claim) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [a for s, a in answers if s == 200]
    assert len(won) == 1 and sorted(answers)[1:] == [(409, "api_key_claimed")] * (n - 1), answers
    assert key_row(engine, g["id"]).key_sha256 == tokens.api_key_digest(won[0])
    assert client.get("/api/v1/me", headers={"X-API-Key": won[0]}).status_code == 200
    assert len(decisions(engine, "api_key.claimed")) == 1


def test_the_key_lives_valid_days_from_its_claim(client, engine, auth):
    g = grant(client, auth, "insurer_a", valid_days=30)
    assert g["valid_days"] == 30 and g["expires_at"] is None
    r = client.post(g["claim_path"], headers=auth("insurer_a")).json()
    claimed_at, expires_at = datetime.fromisoformat(r["claimed_at"]), datetime.fromisoformat(r["expires_at"])
    assert expires_at - claimed_at == timedelta(days=30)


# --- listing and revoking ------------------------------------------------------------------------

def test_owners_list_and_revoke_their_own_keys_the_operator_any(client, engine, auth):
    key_a, id_a = granted_key(client, auth, "insurer_a", label="a-script")
    pending_a = grant(client, auth, "insurer_a", label="a-later")
    key_b, id_b = granted_key(client, auth, "insurer_b")
    mine = client.get(API, headers=auth("insurer_a"))
    assert [(k["id"], k["status"], k["label"]) for k in mine.json()] == [
        (id_a, "active", "a-script"), (pending_a["id"], "pending", "a-later")]
    assert key_a not in mine.text and tokens.API_KEY_PREFIX not in mine.text
    assert {k["id"] for k in client.get(API, headers=auth("operator1")).json()} == {id_a, pending_a["id"], id_b}

    # the owner revokes their own key: it stops at once; the revocation names the owner
    r = client.delete(f"{API}/{id_a}", headers=auth("insurer_a"))
    assert r.status_code == 200 and r.json()["status"] == "revoked"
    assert_error(client.get("/api/v1/me", headers={"X-API-Key": key_a}), 401, "invalid_api_key")
    # the operator revokes another's
    assert client.delete(f"{API}/{id_b}", headers=auth("operator1")).status_code == 200
    assert_error(client.get("/api/v1/me", headers={"X-API-Key": key_b}), 401, "invalid_api_key")
    # revoking twice changes nothing and records nothing new
    assert client.delete(f"{API}/{id_b}", headers=auth("operator1")).status_code == 200
    revocations = [(e.actor, e.role, e.object, e.detail["owner"]) for e in decisions(engine, "api_key.revoked")]
    assert revocations == [("insurer_a", "applicant", f"api_key:{id_a}", "insurer_a"),
                           ("operator1", "operator", f"api_key:{id_b}", "insurer_b")]
    with Session(engine) as s:
        ids = {u.username: u.id for u in s.exec(select(User)).all()}
    assert key_row(engine, id_a).revoked_by == ids["insurer_a"] and key_row(engine, id_b).revoked_by == ids["operator1"]


# --- the command line ----------------------------------------------------------------------------

def test_cli_issue_key_grants_and_prints_no_key(client, engine, auth, settings, monkeypatch):
    from typer.testing import CliRunner

    from pdao.cli import app

    monkeypatch.setenv("PDAO_HOME", str(settings.home))
    monkeypatch.setenv("PDAO_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("PDAO_SECRET_KEY", "test-signing-key-of-at-least-32-bytes")
    out = CliRunner().invoke(app, ["users", "issue-key", "insurer_a", "--by", "operator1", "--label", "nightly"])
    assert out.exit_code == 0, out.output
    assert tokens.API_KEY_PREFIX not in out.output and "claim" in out.output
    with Session(engine) as s:
        row = s.exec(select(ApiKey)).one()
    assert f"#{row.id}" in out.output and row.key_sha256 is None and row.label == "nightly"
    [ev] = decisions(engine, "api_key.granted")
    assert (ev.actor, ev.role, ev.auth_method) == ("operator1", "operator", "cli")
    # only an operator grants, and --by is required
    refused = CliRunner().invoke(app, ["users", "issue-key", "insurer_a", "--by", "insurer_b"])
    assert refused.exit_code == 1 and "not_operator" in refused.output
    assert CliRunner().invoke(app, ["users", "issue-key", "insurer_a"]).exit_code != 0
    # the owner claims what the command granted
    r = client.post(f"{API}/{row.id}/claim", headers=auth("insurer_a"))
    assert r.status_code == 200 and r.json()["key"].startswith(tokens.API_KEY_PREFIX)
    out = CliRunner().invoke(app, ["users", "revoke-key", str(row.id), "--by", "operator1"])
    assert out.exit_code == 0, out.output
    [ev] = decisions(engine, "api_key.revoked")
    assert (ev.actor, ev.auth_method) == ("operator1", "cli")


# --- the migration -------------------------------------------------------------------------------

def test_the_migration_revokes_keys_the_operator_was_given(empty_url):
    """Every key made before 0011 was answered to the operator who issued it: the upgrade revokes
    them. A downgrade drops the grants the old schema cannot hold (no key)."""
    from alembic import command

    from pdao.db import alembic_config, make_engine, migrate

    migrate(empty_url, "0010")
    engine = make_engine(empty_url)
    try:
        with engine.begin() as c:
            c.execute(text("INSERT INTO organization (id, code, name_zh, name_en, kind, created_at) "
                           "VALUES (1, 'company_a', '甲', 'A', 'company', CURRENT_TIMESTAMP)"))
            c.execute(text("INSERT INTO app_user (id, username, display_name, org_id, role, password_hash, "
                           "is_active, failed_logins, tokens_valid_after, created_at) VALUES (1, 'insurer_a', "
                           "'A', 1, 'applicant', 'x', true, 0, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"))
            c.execute(text("INSERT INTO api_key (id, user_id, prefix, key_sha256, label, created_at) "
                           "VALUES (1, 1, 'abcdefabcdef', :d, 'old', CURRENT_TIMESTAMP)"), {"d": "0" * 64})
        migrate(empty_url)
        with Session(engine) as s:
            old = s.get(ApiKey, 1)
            assert old.revoked_at is not None and old.claimed_at == old.created_at
            s.add(ApiKey(id=2, user_id=1, label="pending", claim_by=datetime.now(UTC) + timedelta(days=1)))
            s.commit()
        command.downgrade(alembic_config(empty_url), "0010")
        with engine.connect() as c:
            assert c.execute(text("SELECT id FROM api_key")).scalars().all() == [1]
    finally:
        engine.dispose()
