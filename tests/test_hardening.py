"""Hardening found by the console's security review (issue 7), on the API and the console alike:
ids beyond the database's range answer 404 and are still audited; NUL in a path, query or login name
is a clear 422; logout ends the session's tokens; a company's own reviewer sees no review queue."""

from __future__ import annotations

import pytest
from sqlmodel import Session, select

from pdao.kernel.audit import AuditEvent
from tests.conftest import DEMO_PASSWORD


def _events(engine, path_part: str) -> list[AuditEvent]:
    with Session(engine) as s:
        return [e for e in s.exec(select(AuditEvent)).all() if path_part in (e.path or "")]


@pytest.mark.parametrize("path", ["/api/v1/scenes/2147483648", "/api/v1/scenes/99999999999999999999",
                                  "/api/v1/results/2147483648", "/api/v1/queries/9223372036854775808",
                                  "/api/v1/results/2147483648/lineage"])
def test_ids_beyond_the_range_are_404_and_audited(client, auth, engine, path):
    r = client.get(path, headers=auth("insurer_a"))
    assert r.status_code in (404, 422), r.text
    assert r.json()["code"] and r.json()["message_zh"]
    [e] = _events(engine, path)
    assert e.decision == "deny" and e.actor == "insurer_a"


@pytest.mark.parametrize("path", ["/api/v1/datasets?q=a%00b", "/api/v1/audit/events?actor=a%00b",
                                  "/api/v1/datasets/a%00b"])
def test_nul_in_a_path_or_query_is_a_clear_422(client, auth, engine, path):
    r = client.get(path, headers=auth("auditor1"))
    assert r.status_code == 422 and r.json()["code"] == "invalid_characters" and r.json()["message_zh"]
    assert any(e.decision == "deny" for e in _events(engine, path.split("?")[0].split("%00")[0]))


def test_nul_in_a_login_name_is_a_failed_login(client):
    r = client.post("/api/v1/auth/token", data={"username": "office1\x00", "password": "x"})
    assert r.status_code == 401 and r.json()["code"] == "login_failed"


def test_logout_ends_the_tokens_issued_so_far(client):
    token = client.post("/api/v1/auth/token", data={"username": "insurer_a", "password": DEMO_PASSWORD}).json()
    h = {"Authorization": f"Bearer {token['access_token']}"}
    assert client.get("/api/v1/me", headers=h).status_code == 200
    assert client.post("/api/v1/auth/logout", headers=h).status_code == 204
    r = client.get("/api/v1/me", headers=h)
    assert r.status_code == 401 and r.json()["code"] == "invalid_token"
    again = client.post("/api/v1/auth/token", data={"username": "insurer_a", "password": DEMO_PASSWORD}).json()
    assert client.get("/api/v1/me", headers={"Authorization": f"Bearer {again['access_token']}"}).status_code == 200


def test_a_lone_surrogate_in_an_audit_detail_is_still_audited(engine):
    from pdao.kernel import audit

    audit.record(engine, actor="insurer_a", action="template.run", decision="deny", reason="x",
                 detail={"params": {"as_of": "\ud800", "\udc00key": "a\x00b"}})
    with Session(engine) as s:
        ev = s.exec(select(AuditEvent).order_by(AuditEvent.seq.desc())).first()
    assert ev.detail["params"] == {"as_of": "?", "?key": "a\ufffdb"}
    assert audit.verify(engine).ok


def test_nul_in_a_json_string_is_a_422_on_both_backends(client, auth, engine):
    from tests.scene_helpers import application

    before = client.get("/api/v1/scenes", headers=auth("insurer_a")).json()
    r = client.post("/api/v1/scenes", headers=auth("insurer_a"), json=application(purpose="a\x00b"))
    # SQLite stores it; PostgreSQL refuses it: a 422, not a 500
    assert r.status_code == (422 if engine.dialect.name == "postgresql" else 201), r.text
    if r.status_code == 422:
        assert r.json()["code"] == "invalid_characters"
        assert client.get("/api/v1/scenes", headers=auth("insurer_a")).json() == before    # nothing changed
    r = client.get("/api/v1/uploads/appl%00icants", headers=auth("insurer_a"))
    assert r.status_code == 422 and r.json()["code"] == "invalid_characters"


def test_the_home_is_readable_by_the_servers_own_account_only(tmp_path):
    """The second review: snapshots, held answers with their exact statistics and the SQLite database
    (password hashes, the audit log) were readable by every local account."""
    from pdao.kernel.config import Settings

    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    Settings(home=home, database_url=f"sqlite:///{home / 'pdao.db'}").ensure_home()
    assert home.stat().st_mode & 0o777 == 0o700


def test_a_flood_of_anonymous_refusals_is_audited_in_summaries_and_cut_off(app, engine, settings):
    """Review r5 #4: every anonymous refusal was one chained event (269 a second from one client,
    22 GB a day, under the log's lock). Per address and minute: the first few are audited one by one,
    the rest counted into one summary event, and past a second number answered 429 before they run;
    a request with credentials from the same address is untouched."""
    from fastapi.testclient import TestClient

    from api.refusals import SUMMARY_ACTION, AnonymousRefusals
    from tests.conftest import login

    app.state.refusals = AnonymousRefusals(audited_per_minute=5, answered_per_minute=20)
    with Session(engine) as s:
        before = s.exec(select(AuditEvent.seq).order_by(AuditEvent.seq.desc())).first() or 0
    with TestClient(app, raise_server_exceptions=False) as c:     # its end writes what is held (shutdown)
        token = login(c, "insurer_a")
        got = [c.get("/api/v1/scenes").status_code for _ in range(25)]
        assert got == [401] * 20 + [429] * 5
        r = c.get("/api/v1/scenes")
        assert r.json()["code"] == "too_many_refused_requests" and r.json()["message_zh"] and r.headers["retry-after"]
        me = c.get("/api/v1/me", headers=token)      # credentials: run and audited
        assert me.status_code == 200
    with Session(engine) as s:
        events = s.exec(select(AuditEvent).where(AuditEvent.seq > before).order_by(AuditEvent.seq)).all()
    one_by_one = [e for e in events if e.path == "/api/v1/scenes"]
    summaries = [e for e in events if e.action == SUMMARY_ACTION]
    assert len(one_by_one) == 5 and {e.status for e in one_by_one} == {401}
    assert sum(e.detail["count"] for e in summaries) == 21
    assert sum(e.detail["statuses"].get("401", 0) for e in summaries) == 15
    assert sum(e.detail["statuses"].get("429", 0) for e in summaries) == 6
    assert all(e.client == "testclient" and e.decision == "deny" and e.actor is None for e in summaries)
    assert any(e.path == "/api/v1/me" and e.actor == "insurer_a" for e in events)


@pytest.mark.parametrize("carried", [{"headers": {"Authorization": "Bearer x"}},
                                     {"cookies": {"pdao_session": "x"}},
                                     {"headers": {"Authorization": "Bearer eyJhbGciOiJIUzI1NiJ9.e30.c2ln"}}])
def test_made_up_credentials_are_bounded_like_none(app, engine, carried):
    """Review r6 #1: a made-up `Authorization: Bearer x` (or session cookie) skipped the bounds on
    anonymous refusals, one chained event per request again. What a request proves decides: a
    refusal that resolved nobody is counted, and before it runs only one of our tokens exempts it."""
    from fastapi.testclient import TestClient

    from api.refusals import SUMMARY_ACTION, AnonymousRefusals

    app.state.refusals = AnonymousRefusals(audited_per_minute=3, answered_per_minute=8)
    with Session(engine) as s:
        before = s.exec(select(AuditEvent.seq).order_by(AuditEvent.seq.desc())).first() or 0
    with TestClient(app, raise_server_exceptions=False, cookies=carried.get("cookies")) as c:
        got = [c.get("/api/v1/scenes", headers=carried.get("headers")).status_code for _ in range(12)]
    assert got == [401] * 8 + [429] * 4
    with Session(engine) as s:
        events = s.exec(select(AuditEvent).where(AuditEvent.seq > before)).all()
    assert len([e for e in events if e.path == "/api/v1/scenes"]) == 3
    assert sum(e.detail["count"] for e in events if e.action == SUMMARY_ACTION) == 9


def test_guesses_past_the_one_by_one_share_still_raise_the_failed_logins_alert(app, client, auth, engine):
    """Review r6 #3: an attacker spent an address's one-by-one share on `GET /me` without a token,
    then guessed: the guesses went into a summary without the name, and no alert fired. The summary
    keeps the names typed with their counts, and the alert counts them."""
    from fastapi.testclient import TestClient

    from api.app import _write_summaries
    from api.refusals import SUMMARY_ACTION, AnonymousRefusals

    app.state.refusals = AnonymousRefusals(audited_per_minute=5, answered_per_minute=600)
    attacker = TestClient(app, raise_server_exceptions=False, client=("203.0.113.50", 1))
    assert {attacker.get("/api/v1/me").status_code for _ in range(5)} == {401}       # the share, spent
    guesses = [attacker.post("/api/v1/auth/token", data={"username": "provider1", "password": f"guess-{i}-xx"})
               for i in range(12)]
    assert {r.status_code for r in guesses} <= {401, 429}
    _write_summaries(app, app.state.refusals.flush_all())
    with Session(engine) as s:
        [summary] = s.exec(select(AuditEvent).where(AuditEvent.action == SUMMARY_ACTION)).all()
    assert summary.detail["attempted_usernames"] == {"provider1": 12} and summary.actor is None
    alerts = client.get("/api/v1/audit/alerts", headers=auth("auditor1")).json()["alerts"]
    [a] = [a for a in alerts if a["kind"] == "failed_logins"]
    assert a["detail"]["attempted_username"] == "provider1" and a["count"] == 12
    assert a["detail"]["clients"] == {"203.0.113.50": 12}


def test_a_paging_offset_beyond_the_database_range_is_a_clear_422(client, auth):
    """Found by the schemathesis run (`tests/test_api_fuzz.py`): an offset of 10³² made SQLite
    overflow and the catalog list answered 500."""
    r = client.get("/api/v1/datasets", headers=auth("insurer_a"), params={"offset": 10**32})
    assert r.status_code == 422 and r.json()["code"] == "invalid_request" and r.json()["message_zh"]
