"""API keys reach only their owner (issue 13, finding 3).

The attack: `POST /api-keys {"username": "insurer_a"}` as operator1 answered insurer_a's key to the
operator, who could then read insurer_a's cells and download its results while the audit log
recorded it all as insurer_a. Now the operator only *grants* a key (a row without a secret); the
owner, signed in with their own password, *claims* it and is the only one ever to see it. Every
grant, claim and revocation is in the audit chain under the real actor.

Every test runs through the real HTTP API on SQLite and on PostgreSQL (see conftest)."""

from __future__ import annotations

import getpass
import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text
from sqlmodel import Session, select

from pdao.kernel import audit
from pdao.kernel.audit import AuditEvent
from pdao.kernel.identity import tokens
from pdao.kernel.identity.models import ApiKey, User
from tests.conftest import DEMO_PASSWORD, first_also_on_postgresql, set_throttle_instant, throttle

API = "/api/v1/api-keys"
PW = {"password": DEMO_PASSWORD}   # a claim's body: the owner's password, typed again


def granted_key(client, auth, username: str, **body) -> tuple[str, int]:
    """An API key the way its owner gets one: operator1 grants it, the owner claims it.
    (key, id)."""
    r = client.post(API, json={"username": username, **body}, headers=auth("operator1"))
    assert r.status_code == 201, r.text
    c = client.post(f"{API}/{r.json()['id']}/claim", json=PW, headers=auth(username))
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


def user_row(engine, username: str) -> User:
    with Session(engine) as s:
        return s.exec(select(User).where(User.username == username)).one()


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
    assert_error(client.post(g["claim_path"], json=PW, headers=op), 403, "role_not_permitted")
    listed = client.get(API, headers=op)
    assert listed.status_code == 200 and tokens.API_KEY_PREFIX not in listed.text
    assert key_row(engine, g["id"]).key_sha256 is None     # the refused claim made nothing

    # the owner claims it, signed in with their own password, and is the only one to see it
    r = client.post(g["claim_path"], json=PW, headers=auth("insurer_a"))
    assert r.status_code == 200, r.text
    key = r.json()["key"]
    assert key.startswith(tokens.API_KEY_PREFIX) and r.json()["status"] == "active"
    assert key_row(engine, g["id"]).key_sha256 == tokens.api_key_digest(key)
    use = client.get("/api/v1/me", headers={"X-API-Key": key})
    assert use.json()["username"] == "insurer_a"
    # a second claim gets no second key, for no one
    assert_error(client.post(g["claim_path"], json=PW, headers=auth("insurer_a")), 409, "api_key_claimed")
    assert_error(client.post(g["claim_path"], json=PW, headers=op), 403, "role_not_permitted")

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
    missing = assert_error(client.post(f"{API}/999999/claim", json=PW, headers=auth(other)), 404, "not_found")
    assert assert_error(client.post(g["claim_path"], json=PW, headers=auth(other)), 404, "not_found") == missing
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
    assert_error(client.post(g["claim_path"], json=PW, headers={"X-API-Key": key}), 403, "password_login_required")
    assert key_row(engine, g["id"]).key_sha256 is None
    # the same owner, signed in, claims it
    assert client.post(g["claim_path"], json=PW, headers=auth("insurer_a")).status_code == 200


def test_claimed_revoked_and_lapsed_grants_answer_409(client, engine, auth):
    owner = auth("provider1")
    claimed = grant(client, auth, "provider1")
    assert client.post(claimed["claim_path"], json=PW, headers=owner).status_code == 200
    assert_error(client.post(claimed["claim_path"], json=PW, headers=owner), 409, "api_key_claimed")

    revoked = grant(client, auth, "provider1")
    assert client.delete(f"{API}/{revoked['id']}", headers=auth("operator1")).json()["status"] == "revoked"
    assert_error(client.post(revoked["claim_path"], json=PW, headers=owner), 409, "api_key_revoked")

    lapsed = grant(client, auth, "provider1")
    with Session(engine) as s:   # its claim window has passed
        row = s.get(ApiKey, lapsed["id"])
        row.claim_by = datetime.now(UTC) - timedelta(seconds=1)
        s.add(row)
        s.commit()
    assert_error(client.post(lapsed["claim_path"], json=PW, headers=owner), 409, "api_key_grant_lapsed")
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
        r = client.post(g["claim_path"], json=PW, headers=headers)
        answers.append((r.status_code, r.json().get("key") or r.json().get("code")))

    threads = [threading.Thread(target=claim) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [a for s, a in answers if s == 200]
    # the others: already claimed — or, when six password checks overlap, refused by the lockout
    # (each attempt is counted before its check; the fifth at once locks the address for a window)
    assert len(won) == 1 and {a for a in answers if a[0] != 200} <= {(409, "api_key_claimed"),
                                                                      (429, "login_locked")}, answers
    assert key_row(engine, g["id"]).key_sha256 == tokens.api_key_digest(won[0])
    assert client.get("/api/v1/me", headers={"X-API-Key": won[0]}).status_code == 200
    assert len(decisions(engine, "api_key.claimed")) == 1


def test_the_key_lives_valid_days_from_its_claim(client, engine, auth):
    g = grant(client, auth, "insurer_a", valid_days=30)
    assert g["valid_days"] == 30 and g["expires_at"] is None
    r = client.post(g["claim_path"], json=PW, headers=auth("insurer_a")).json()
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

    from pdao.cli.main import app

    monkeypatch.setenv("PDAO_HOME", str(settings.home))
    monkeypatch.setenv("PDAO_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("PDAO_SECRET_KEY", "test-signing-key-of-at-least-32-bytes")
    out = CliRunner().invoke(app, ["users", "issue-key", "insurer_a", "--by", "operator1", "--label", "nightly"])
    assert out.exit_code == 0, out.output
    assert tokens.API_KEY_PREFIX not in out.output and "claim" in out.output
    with Session(engine) as s:
        row = s.exec(select(ApiKey)).one()
    assert f"#{row.id}" in out.output and row.key_sha256 is None and row.label == "nightly"
    # the actor is whoever ran the command (the OS user), never the operator it named (review r2,
    # finding 4: tests/test_cli.py); --by is the grant's operator
    [ev] = decisions(engine, "api_key.granted")
    assert (ev.actor, ev.role, ev.org, ev.auth_method) == (f"cli:{getpass.getuser()}", None, None, "cli")
    assert ev.detail["issued_by"] == "operator1"
    assert [k["granted_by"] for k in client.get(API, headers=auth("operator1")).json()] == ["operator1"]
    # only an operator grants, and --by is required
    refused = CliRunner().invoke(app, ["users", "issue-key", "insurer_a", "--by", "insurer_b"])
    assert refused.exit_code == 1 and "not_operator" in refused.output
    assert CliRunner().invoke(app, ["users", "issue-key", "insurer_a"]).exit_code != 0
    # the owner claims what the command granted
    r = client.post(f"{API}/{row.id}/claim", json=PW, headers=auth("insurer_a"))
    assert r.status_code == 200 and r.json()["key"].startswith(tokens.API_KEY_PREFIX)
    out = CliRunner().invoke(app, ["users", "revoke-key", str(row.id), "--by", "operator1"])
    assert out.exit_code == 0, out.output
    [ev] = decisions(engine, "api_key.revoked")
    assert (ev.actor, ev.auth_method, ev.detail["stated_by"]) == (f"cli:{getpass.getuser()}", "cli", "operator1")
    assert key_row(engine, row.id).revoked_by is None      # no user revoked it: the OS user did
    assert_error(client.get("/api/v1/me", headers={"X-API-Key": r.json()["key"]}), 401, "invalid_api_key")
    # --by is optional for a revocation, and must name a user when given
    again = grant(client, auth, "insurer_a")
    assert CliRunner().invoke(app, ["users", "revoke-key", str(again["id"]), "--by", "ghost"]).exit_code == 1
    assert key_row(engine, again["id"]).revoked_at is None
    assert CliRunner().invoke(app, ["users", "revoke-key", str(again["id"])]).exit_code == 0
    assert key_row(engine, again["id"]).revoked_at is not None


# --- review r2, finding 3: a bearer token alone claimed a key, and the key outlived the password ----

def test_a_token_alone_claims_no_key_and_a_wrong_password_counts_like_a_login(client, engine, auth):
    """The attack: whoever held the owner's bearer token for a moment (a proxy log, the console's
    cookie) found a pending grant and claimed a key living up to ten years. Now a claim needs the
    owner's password typed again, and a wrong one counts towards the lockout like a login."""
    g = grant(client, auth, "insurer_b", valid_days=3650)
    stolen = auth("insurer_b")
    # the token alone: refused, nothing made, nothing counted
    assert_error(client.post(g["claim_path"], headers=stolen), 422, "password_required")
    assert_error(client.post(g["claim_path"], json={}, headers=stolen), 422, "password_required")
    assert throttle(engine, "insurer_b") is None
    # guesses: each one checked and counted like a failed login
    for i in range(4):
        assert_error(client.post(g["claim_path"], json={"password": f"guess-{i}-xx"}, headers=stolen), 403,
                     "wrong_password")
        assert throttle(engine, "insurer_b").failures == i + 1
    # the fifth locks the account: claims and logins alike, the right password included
    assert_error(client.post(g["claim_path"], json={"password": "guess-4-xx"}, headers=stolen), 403, "wrong_password")
    assert_error(client.post(g["claim_path"], json=PW, headers=stolen), 429, "login_locked")
    assert_error(client.post("/api/v1/auth/token", data={"username": "insurer_b", "password": DEMO_PASSWORD}), 429,
                 "login_locked")
    assert key_row(engine, g["id"]).key_sha256 is None and decisions(engine, "api_key.claimed") == []
    # once the lock is over, the owner's own password claims it, and the count goes back to 0
    set_throttle_instant(engine, "insurer_b", datetime.now(UTC) - timedelta(seconds=1))
    r = client.post(g["claim_path"], json=PW, headers=stolen)
    assert r.status_code == 200 and r.json()["key"].startswith(tokens.API_KEY_PREFIX)
    assert throttle(engine, "insurer_b") is None
    # the refused claims are the token holder's refusals in the audit chain; no password is in it
    refused = [e for e in all_events(engine) if e.action == "api_key.claim" and e.decision == "deny"]
    assert [(e.actor, e.reason) for e in refused] == (
        [("insurer_b", "password_required")] * 2 + [("insurer_b", "wrong_password")] * 5
        + [("insurer_b", "login_locked")])
    assert all("guess-" not in repr(e.model_dump()) and DEMO_PASSWORD not in repr(e.model_dump())
               for e in all_events(engine))


def _cli(settings, monkeypatch, *args: str):  # noqa: ANN202
    from typer.testing import CliRunner

    from pdao.cli.main import app

    monkeypatch.setenv("PDAO_HOME", str(settings.home))
    monkeypatch.setenv("PDAO_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("PDAO_SECRET_KEY", "test-signing-key-of-at-least-32-bytes")
    return CliRunner().invoke(app, list(args))


@pytest.mark.parametrize("change", first_also_on_postgresql(["set-password", "disable"]))
def test_a_password_reset_or_disabling_revokes_the_users_keys_and_grants(client, engine, auth, settings, monkeypatch,
                                                                        change):
    """The rest of the attack: a key claimed with a stolen session lived on after the victim logged
    out everywhere and the admin reset the password. Now a reset (or disabling the account) revokes
    the user's active keys and pending grants, each in the audit chain under who made the change,
    in the change's own transaction."""
    key, key_id = granted_key(client, auth, "insurer_b", label="nightly")
    pending = grant(client, auth, "insurer_b")
    other_key, _ = granted_key(client, auth, "insurer_a")
    lapsed = grant(client, auth, "insurer_b")
    with Session(engine) as s:   # a grant already lapsed: nothing to revoke
        row = s.get(ApiKey, lapsed["id"])
        row.claim_by = datetime.now(UTC) - timedelta(seconds=1)
        s.add(row)
        s.commit()
    assert client.get("/api/v1/me", headers={"X-API-Key": key}).status_code == 200
    assert client.post("/api/v1/auth/logout", headers=auth("insurer_b")).status_code == 204
    assert client.get("/api/v1/me", headers={"X-API-Key": key}).status_code == 200   # logout ends tokens only
    args = ["users", "set-password", "insurer_b", "--password", "a-new-pass-1"] if change == "set-password" \
        else ["users", "disable", "insurer_b"]

    # the change and its revocations are one transaction: if the audit chain cannot take them,
    # nothing changes
    from pdao.kernel import audit as audit_module

    def refuse(*_a, **_k):  # noqa: ANN002, ANN003
        raise RuntimeError("audit down")

    with monkeypatch.context() as m:
        m.setattr(audit_module, "append", refuse)
        assert _cli(settings, monkeypatch, *args).exit_code != 0
    assert client.get("/api/v1/me", headers={"X-API-Key": key}).status_code == 200
    assert user_row(engine, "insurer_b").is_active and key_row(engine, pending["id"]).revoked_at is None

    out = _cli(settings, monkeypatch, *args)
    assert out.exit_code == 0, out.output
    assert f"revoked API key(s) #{key_id}, #{pending['id']}" in out.output
    assert_error(client.get("/api/v1/me", headers={"X-API-Key": key}), 401, "invalid_api_key")
    statuses = {k["id"]: k["status"] for k in client.get(API, headers=auth("operator1")).json()}
    assert statuses[key_id] == statuses[pending["id"]] == "revoked" and statuses[lapsed["id"]] == "lapsed"
    assert client.get("/api/v1/me", headers={"X-API-Key": other_key}).status_code == 200   # another user's stays
    if change == "set-password":   # the owner, signed in again, cannot claim the revoked grant either
        owner = {"Authorization": "Bearer " + client.post("/api/v1/auth/token", data={
            "username": "insurer_b", "password": "a-new-pass-1"}).json()["access_token"]}
        assert_error(client.post(pending["claim_path"], json={"password": "a-new-pass-1"}, headers=owner), 409,
                     "api_key_revoked")
    because = "password_changed" if change == "set-password" else "user_disabled"
    revoked = decisions(engine, "api_key.revoked")
    assert [(e.object, e.actor, e.role, e.auth_method, e.detail["owner"], e.detail["because"], e.detail["was"])
            for e in revoked] == [
        (f"api_key:{key_id}", f"cli:{getpass.getuser()}", None, "cli", "insurer_b", because, "active"),
        (f"api_key:{pending['id']}", f"cli:{getpass.getuser()}", None, "cli", "insurer_b", because, "pending")]
    command = [e for e in all_events(engine) if e.action.startswith("cli.users.") and e.decision == "allow"]
    assert len(command) == 1 and command[0].seq > revoked[-1].seq
    assert audit.verify(engine).ok


# --- the migration -------------------------------------------------------------------------------

def test_the_migration_revokes_keys_the_operator_was_given(empty_url):
    """Every key made before 0011 was answered to the operator who issued it: the upgrade revokes
    them. A downgrade drops the grants the old schema cannot hold (no key)."""
    from alembic import command

    from pdao.kernel.db import alembic_config, make_engine, migrate

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
