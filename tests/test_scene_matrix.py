"""Who may do what to a scene, in which state: every role × endpoint × scene state, from ONE table.

`MATRIX` below is the whole expectation. Each row is an endpoint in a scene state (`-` for the
endpoints that do not depend on a scene); each column a caller. A cell is `ok` (any 2xx) or an
abbreviation of the exact (status, code) the API must answer (see `OUTCOMES`). The table is parsed
at import, checked for completeness, and turned into one test per cell, on SQLite and PostgreSQL.

The expectations come from the rules (API.md, issue 3, docs/scenes.md), not from the code:
- another tenant (`other`) gets 404 not_found on every /scenes/{id} endpoint, in every state,
  exactly as for a missing scene — never 403, never 409;
- a role that may not do an action at all gets 403 role_not_permitted;
- the right role in the wrong state gets 409 wrong_state;
- the office, reviewers, auditors and the operator see every scene; the provider sees the scenes
  using its department's data (every scene here uses ycwjw datasets); an applicant its own.
Cells where the code is known to disagree with the rules are listed in `KNOWN_BUGS` and marked
xfail(strict=True), so fixing the code turns them into failures until the mark is removed.

Speed: one database, one app and one token per user are shared by all cells of a backend
(module-scoped). Read-only cells and refused mutating cells share one scene per state; a mutating
cell expected to succeed gets a fresh scene built in its state. A refused mutating cell must leave
its shared scene exactly as it was (checked in the database), and a shared scene that was changed
anyway is thrown away so that it cannot spoil the cells after it. `make test` runs every cell on
SQLite and the tenant-isolation column and global endpoints on PostgreSQL; `make test-slow` the other
PostgreSQL cells (see `_param`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, or_
from sqlmodel import Session, select, update

from policies.enforcer import scene_domain
from policies.models import CasbinRule
from sandbox.scenes.models import Scene, SceneEvent, SceneItem, SceneReview
from tests.conftest import _pg_admin, _pg_url, login, make_settings
from tests.scene_helpers import application, today

# --- the table ---------------------------------------------------------------------------------------

# column -> demo user. `own` is the scene's tenant; `other` is an applicant of another company.
ROLES = {
    "provider": "provider1",   # ycwjw: the source of every dataset in the scenes below
    "office": "office1",
    "reviewer": "reviewer1",
    "auditor": "auditor1",
    "operator": "operator1",
    "own": "insurer_a",        # company_a: every scene below is company_a's
    "other": "insurer_b",      # company_b
}

# cell abbreviation -> expected outcome: "ok" (2xx) or (HTTP status, error code)
OUTCOMES: dict[str, str | tuple[int, str]] = {
    "ok": "ok",
    "RNP": (403, "role_not_permitted"),   # the role may not do this at all
    "NF": (404, "not_found"),             # missing or another tenant's: indistinguishable
    "WS": (409, "wrong_state"),           # the right role, the wrong state
}
# (403 own_org_review cannot occur here: no demo applicant belongs to the office's organization.)

# The scene states, effective (as GET /scenes/{id} reports them).
#   approved: two approvals, valid_from in the future; active: approved and valid today;
#   expired: active, then the window moved into the past in the database (no job runs).
STATES = ("draft", "submitted", "returned", "rejected", "approved", "active", "suspended", "expired", "revoked")

# endpoint -> (method, path under /api/v1, JSON body or None, query params or None)
SCENE_ENDPOINTS: dict[str, tuple[str, str, dict | None, dict | None]] = {
    "read": ("GET", "/scenes/{id}", None, None),
    "explain": ("GET", "/scenes/{id}/explain", None,
                {"dataset": "health.outpatient_visit", "field": "district", "usage": "group_by"}),
    "edit": ("PATCH", "/scenes/{id}", {"title": "edited by the matrix"}, None),
    "submit": ("POST", "/scenes/{id}/submit", None, None),
    "approve": ("POST", "/scenes/{id}/reviews", {"decision": "approve", "comment": "matrix"}, None),
    "reject": ("POST", "/scenes/{id}/reviews", {"decision": "reject", "comment": "matrix"}, None),
    "return": ("POST", "/scenes/{id}/reviews", {"decision": "return", "comment": "matrix"}, None),
    "suspend": ("POST", "/scenes/{id}/suspend", {"reason": "matrix"}, None),
    "resume": ("POST", "/scenes/{id}/resume", {"reason": "matrix"}, None),
    "revoke": ("POST", "/scenes/{id}/revoke", {"reason": "matrix"}, None),
}
READ_ONLY = {"read", "explain"}
# Endpoints that take no scene. The emergency stop names company_b, which never has an approved
# scene here, so it cannot disturb the shared company_a scenes.
GLOBAL_ENDPOINTS: dict[str, tuple[str, str, dict | None, dict | None]] = {
    "create": ("POST", "/scenes", application(), None),
    "list": ("GET", "/scenes", None, None),
    "emergency_stop": ("POST", "/emergency-stop", {"org": "company_b", "reason": "matrix drill"}, None),
    "rules": ("GET", "/policy/rules", None, None),
}

MATRIX = """
endpoint        state      provider  office  reviewer  auditor  operator  own  other
read            draft      ok        ok      ok        ok       ok        ok   NF
read            submitted  ok        ok      ok        ok       ok        ok   NF
read            returned   ok        ok      ok        ok       ok        ok   NF
read            rejected   ok        ok      ok        ok       ok        ok   NF
read            approved   ok        ok      ok        ok       ok        ok   NF
read            active     ok        ok      ok        ok       ok        ok   NF
read            suspended  ok        ok      ok        ok       ok        ok   NF
read            expired    ok        ok      ok        ok       ok        ok   NF
read            revoked    ok        ok      ok        ok       ok        ok   NF

explain         draft      ok        ok      ok        ok       ok        ok   NF
explain         submitted  ok        ok      ok        ok       ok        ok   NF
explain         returned   ok        ok      ok        ok       ok        ok   NF
explain         rejected   ok        ok      ok        ok       ok        ok   NF
explain         approved   ok        ok      ok        ok       ok        ok   NF
explain         active     ok        ok      ok        ok       ok        ok   NF
explain         suspended  ok        ok      ok        ok       ok        ok   NF
explain         expired    ok        ok      ok        ok       ok        ok   NF
explain         revoked    ok        ok      ok        ok       ok        ok   NF

edit            draft      RNP       RNP     RNP       RNP      RNP       ok   NF
edit            submitted  RNP       RNP     RNP       RNP      RNP       WS   NF
edit            returned   RNP       RNP     RNP       RNP      RNP       ok   NF
edit            rejected   RNP       RNP     RNP       RNP      RNP       WS   NF
edit            approved   RNP       RNP     RNP       RNP      RNP       WS   NF
edit            active     RNP       RNP     RNP       RNP      RNP       WS   NF
edit            suspended  RNP       RNP     RNP       RNP      RNP       WS   NF
edit            expired    RNP       RNP     RNP       RNP      RNP       WS   NF
edit            revoked    RNP       RNP     RNP       RNP      RNP       WS   NF

submit          draft      RNP       RNP     RNP       RNP      RNP       ok   NF
submit          submitted  RNP       RNP     RNP       RNP      RNP       WS   NF
submit          returned   RNP       RNP     RNP       RNP      RNP       ok   NF
submit          rejected   RNP       RNP     RNP       RNP      RNP       WS   NF
submit          approved   RNP       RNP     RNP       RNP      RNP       WS   NF
submit          active     RNP       RNP     RNP       RNP      RNP       WS   NF
submit          suspended  RNP       RNP     RNP       RNP      RNP       WS   NF
submit          expired    RNP       RNP     RNP       RNP      RNP       WS   NF
submit          revoked    RNP       RNP     RNP       RNP      RNP       WS   NF

approve         draft      RNP       WS      RNP       RNP      RNP       RNP  NF
approve         submitted  RNP       ok      RNP       RNP      RNP       RNP  NF
approve         returned   RNP       WS      RNP       RNP      RNP       RNP  NF
approve         rejected   RNP       WS      RNP       RNP      RNP       RNP  NF
approve         approved   RNP       WS      RNP       RNP      RNP       RNP  NF
approve         active     RNP       WS      RNP       RNP      RNP       RNP  NF
approve         suspended  RNP       WS      RNP       RNP      RNP       RNP  NF
approve         expired    RNP       WS      RNP       RNP      RNP       RNP  NF
approve         revoked    RNP       WS      RNP       RNP      RNP       RNP  NF

reject          draft      RNP       WS      RNP       RNP      RNP       RNP  NF
reject          submitted  RNP       ok      RNP       RNP      RNP       RNP  NF
reject          returned   RNP       WS      RNP       RNP      RNP       RNP  NF
reject          rejected   RNP       WS      RNP       RNP      RNP       RNP  NF
reject          approved   RNP       WS      RNP       RNP      RNP       RNP  NF
reject          active     RNP       WS      RNP       RNP      RNP       RNP  NF
reject          suspended  RNP       WS      RNP       RNP      RNP       RNP  NF
reject          expired    RNP       WS      RNP       RNP      RNP       RNP  NF
reject          revoked    RNP       WS      RNP       RNP      RNP       RNP  NF

return          draft      RNP       WS      RNP       RNP      RNP       RNP  NF
return          submitted  RNP       ok      RNP       RNP      RNP       RNP  NF
return          returned   RNP       WS      RNP       RNP      RNP       RNP  NF
return          rejected   RNP       WS      RNP       RNP      RNP       RNP  NF
return          approved   RNP       WS      RNP       RNP      RNP       RNP  NF
return          active     RNP       WS      RNP       RNP      RNP       RNP  NF
return          suspended  RNP       WS      RNP       RNP      RNP       RNP  NF
return          expired    RNP       WS      RNP       RNP      RNP       RNP  NF
return          revoked    RNP       WS      RNP       RNP      RNP       RNP  NF

suspend         draft      RNP       WS      RNP       RNP      RNP       RNP  NF
suspend         submitted  RNP       WS      RNP       RNP      RNP       RNP  NF
suspend         returned   RNP       WS      RNP       RNP      RNP       RNP  NF
suspend         rejected   RNP       WS      RNP       RNP      RNP       RNP  NF
suspend         approved   RNP       ok      RNP       RNP      RNP       RNP  NF
suspend         active     RNP       ok      RNP       RNP      RNP       RNP  NF
suspend         suspended  RNP       WS      RNP       RNP      RNP       RNP  NF
suspend         expired    RNP       WS      RNP       RNP      RNP       RNP  NF
suspend         revoked    RNP       WS      RNP       RNP      RNP       RNP  NF

resume          draft      RNP       WS      RNP       RNP      RNP       RNP  NF
resume          submitted  RNP       WS      RNP       RNP      RNP       RNP  NF
resume          returned   RNP       WS      RNP       RNP      RNP       RNP  NF
resume          rejected   RNP       WS      RNP       RNP      RNP       RNP  NF
resume          approved   RNP       WS      RNP       RNP      RNP       RNP  NF
resume          active     RNP       WS      RNP       RNP      RNP       RNP  NF
resume          suspended  RNP       ok      RNP       RNP      RNP       RNP  NF
resume          expired    RNP       WS      RNP       RNP      RNP       RNP  NF
resume          revoked    RNP       WS      RNP       RNP      RNP       RNP  NF

revoke          draft      RNP       WS      RNP       RNP      RNP       RNP  NF
revoke          submitted  RNP       WS      RNP       RNP      RNP       RNP  NF
revoke          returned   RNP       WS      RNP       RNP      RNP       RNP  NF
revoke          rejected   RNP       WS      RNP       RNP      RNP       RNP  NF
revoke          approved   RNP       ok      RNP       RNP      RNP       RNP  NF
revoke          active     RNP       ok      RNP       RNP      RNP       RNP  NF
revoke          suspended  RNP       ok      RNP       RNP      RNP       RNP  NF
revoke          expired    RNP       ok      RNP       RNP      RNP       RNP  NF
revoke          revoked    RNP       WS      RNP       RNP      RNP       RNP  NF

create          -          RNP       RNP     RNP       RNP      RNP       ok   ok
list            -          ok        ok      ok        ok       ok        ok   ok
emergency_stop  -          RNP       ok      RNP       RNP      RNP       RNP  RNP
rules           -          ok        ok      ok        ok       ok        ok   ok
"""

# Cells where the code disagrees with the rules: (endpoint, state, role) -> (what the code answers
# instead, why). State "*": every state. Such a cell is xfail(strict=True) and fails only *with* that
# wrong answer: any other wrong answer is a plain failure, and the right one an XPASS, which strict
# turns into a failure until the entry is removed.
KNOWN_BUGS: dict[tuple[str, str, str], tuple[str, str]] = {}


class KnownBug(AssertionError):
    """The code gave the wrong answer recorded in KNOWN_BUGS."""


@dataclass(frozen=True)
class Cell:
    endpoint: str
    state: str  # "-" for GLOBAL_ENDPOINTS
    role: str
    expect: str | tuple[int, str]

    @property
    def id(self) -> str:
        return f"{self.endpoint}-{self.state}-{self.role}"


def parse_matrix(text: str) -> list[Cell]:
    """The table as cells; refuses a malformed, unknown, duplicate or missing row or cell."""
    lines = [ln.split() for ln in text.strip().splitlines() if ln.strip()]
    header, rows = lines[0], lines[1:]
    roles = header[2:]
    assert header[:2] == ["endpoint", "state"] and roles == list(ROLES), f"bad header {header}"
    cells: list[Cell] = []
    seen: set[tuple[str, str]] = set()
    for row in rows:
        assert len(row) == 2 + len(roles), f"row {row}: expected {len(roles)} cells"
        endpoint, state, *tokens = row
        if endpoint in SCENE_ENDPOINTS:
            assert state in STATES, f"row {row}: unknown state {state!r}"
        else:
            assert endpoint in GLOBAL_ENDPOINTS and state == "-", f"row {row}: unknown endpoint or state"
        assert (endpoint, state) not in seen, f"row {row}: listed twice"
        seen.add((endpoint, state))
        for role, token in zip(roles, tokens, strict=True):
            assert token in OUTCOMES, f"row {row}: unknown outcome {token!r} (one of {list(OUTCOMES)})"
            cells.append(Cell(endpoint, state, role, OUTCOMES[token]))
    wanted = {(e, s) for e in SCENE_ENDPOINTS for s in STATES} | {(e, "-") for e in GLOBAL_ENDPOINTS}
    assert seen == wanted, f"rows missing from the table: {sorted(wanted - seen)}"
    return cells


CELLS = parse_matrix(MATRIX)


def _check_known_bugs() -> None:
    for (endpoint, state, role), (got, _why) in KNOWN_BUGS.items():
        assert got in OUTCOMES, f"KNOWN_BUGS: unknown outcome {got!r}"
        assert any(c.endpoint == endpoint and state in ("*", c.state) and c.role == role for c in CELLS), \
            f"KNOWN_BUGS: no such cell {(endpoint, state, role)}"


_check_known_bugs()


def known_bug(cell: Cell) -> tuple[str | tuple[int, str], str] | None:
    """(the wrong answer the code gives, why) for a cell listed in KNOWN_BUGS."""
    bug = KNOWN_BUGS.get((cell.endpoint, cell.state, cell.role)) or KNOWN_BUGS.get((cell.endpoint, "*", cell.role))
    return (OUTCOMES[bug[0]], bug[1]) if bug else None


def _param(cell: Cell):  # noqa: ANN202
    bug = known_bug(cell)
    marks = [pytest.mark.xfail(strict=True, raises=KnownBug, reason=bug[1])] if bug else []
    if cell.state != "-" and cell.role != "other":
        # By default the whole table runs on SQLite; on PostgreSQL the `other` column (tenant
        # isolation, decided by the SQL that finds a scene) and the global endpoints. Role and state
        # checks are decided in Python on the scene row read; on PostgreSQL the transitions, the
        # 409 wrong_state answers and the other tenant's 404 are also run by test_scenes_flow, and
        # the cache invalidation by test_scene_processes. The rest of the PostgreSQL half
        # (~540 cells, ~25 s) runs in `make test-slow`.
        marks.append(pytest.mark.default_backend("sqlite"))
    return pytest.param(cell, id=cell.id, marks=marks)


# --- one database, app and set of tokens per backend -------------------------------------------------

MISSING_ID = 999_999_999


@dataclass
class Env:
    client: TestClient
    engine: Any
    tokens: dict[str, dict[str, str]]
    shared: dict[str, int] = field(default_factory=dict)          # state -> shared scene id
    missing: dict[tuple[str, str], Any] = field(default_factory=dict)  # (endpoint, role) -> answer

    def headers(self, user: str) -> dict[str, str]:
        return self.tokens[user]

    def call(self, user: str, method: str, path: str, body: dict | None, params: dict | None):  # noqa: ANN201
        kw: dict[str, Any] = {"headers": self.headers(user)}
        if body is not None:
            kw["json"] = body
        if params is not None:
            kw["params"] = params
        return self.client.request(method, "/api/v1" + path, **kw)

    def ok(self, user: str, method: str, path: str, body: dict | None = None) -> dict:
        r = self.call(user, method, path, body, None)
        assert r.is_success, f"building a scene: {method} {path} as {user}: {r.status_code} {r.text}"
        return r.json()

    # scenes in a given state, built through HTTP (expired: through the database, as time would)
    def build(self, state: str) -> int:
        over = {}
        if state == "approved":  # approved, not yet valid
            over = {"valid_from": (today() + timedelta(days=3)).isoformat(),
                    "valid_to": (today() + timedelta(days=30)).isoformat()}
        sid = self.ok("insurer_a", "POST", "/scenes", application(**over))["id"]
        if state != "draft":
            self.ok("insurer_a", "POST", f"/scenes/{sid}/submit")
        if state in ("returned", "rejected"):
            decision = {"returned": "return", "rejected": "reject"}[state]
            self.ok("office1", "POST", f"/scenes/{sid}/reviews", {"decision": decision, "comment": "setup"})
        if state in ("approved", "active", "suspended", "expired", "revoked"):
            for who in ("office1", "office2"):
                self.ok(who, "POST", f"/scenes/{sid}/reviews", {"decision": "approve", "comment": "setup"})
        if state in ("suspended", "revoked"):
            action = {"suspended": "suspend", "revoked": "revoke"}[state]
            self.ok("office2", "POST", f"/scenes/{sid}/{action}", {"reason": "setup"})
        if state == "expired":
            with Session(self.engine) as s:
                s.exec(update(Scene).where(Scene.id == sid).values(valid_from=today() - timedelta(days=10),
                                                                   valid_to=today() - timedelta(days=1)))
                s.commit()
        got = self.ok("office2", "GET", f"/scenes/{sid}")["status"]
        assert got == state, f"built a scene for {state!r} but it is {got!r}"
        return sid

    def shared_scene(self, state: str) -> int:
        if state not in self.shared:
            self.shared[state] = self.build(state)
        return self.shared[state]

    def fingerprint(self, sid: int) -> tuple:
        """Everything a mutating request could change about a scene."""
        with Session(self.engine) as s:
            scene = s.get(Scene, sid)
            dom = scene_domain(sid)

            def count(model, *where) -> int:  # noqa: ANN001
                return s.exec(select(func.count()).select_from(model).where(*where)).one()

            items = s.exec(select(SceneItem.id, SceneItem.dataset, SceneItem.field, SceneItem.usage, SceneItem.struck)
                           .where(SceneItem.scene_id == sid).order_by(SceneItem.id)).all()
            return (scene.model_dump(), tuple(map(tuple, items)),
                    count(SceneEvent, SceneEvent.scene_id == sid), count(SceneReview, SceneReview.scene_id == sid),
                    count(CasbinRule, or_(CasbinRule.v1 == dom, CasbinRule.v2 == dom)))


@pytest.fixture(scope="module")
def env(backend, tmp_path_factory) -> Iterator[Env]:
    from api.app import create_app

    kind, template = backend
    work = tmp_path_factory.mktemp(f"matrix-{kind}")
    pg_name = None
    if kind == "sqlite":
        shutil.copyfile(template, work / "pdao.db")
        url = f"sqlite:///{work / 'pdao.db'}"
    else:
        pg_name = f"pdao_matrix_{os.getpid()}"
        _pg_admin(f"DROP DATABASE IF EXISTS {pg_name} WITH (FORCE)")
        _pg_admin(f"CREATE DATABASE {pg_name} TEMPLATE {template}")
        url = _pg_url(pg_name)
    settings = make_settings(work / "home", url)
    settings.ensure_home()
    app = create_app(settings)
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            users = set(ROLES.values()) | {"office2"}
            yield Env(client, app.state.engine, {u: login(client, u) for u in sorted(users)})
    finally:
        app.state.engine.dispose()
        if pg_name:
            _pg_admin(f"DROP DATABASE IF EXISTS {pg_name} WITH (FORCE)")


def _outcome(r) -> str | tuple[int, str]:  # noqa: ANN001
    if r.is_success:
        return "ok"
    body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
    return (r.status_code, body.get("code"))


def _check(r, cell: Cell, what: str) -> None:  # noqa: ANN001
    bug = known_bug(cell)
    if bug and _outcome(r) == bug[0] != cell.expect:
        raise KnownBug(f"{what}: got {bug[0]}, the known bug; the rules want {cell.expect}")
    expect = cell.expect
    if expect == "ok":
        assert r.is_success, f"{what}: expected 2xx, got {r.status_code} {r.text[:300]}"
        return
    body = r.json() if r.headers.get("content-type", "").startswith("application/json") else r.text
    got = (r.status_code, body.get("code") if isinstance(body, dict) else body)
    assert got == expect, f"{what}: expected {expect}, got {got}: {str(body)[:300]}"


# --- the tests ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("cell", [_param(c) for c in CELLS if c.state != "-"])
def test_scene_endpoint(env: Env, cell: Cell) -> None:
    method, path, body, params = SCENE_ENDPOINTS[cell.endpoint]
    user = ROLES[cell.role]
    mutating = cell.endpoint not in READ_ONLY
    fresh = mutating and cell.expect == "ok"
    sid = env.build(cell.state) if fresh else env.shared_scene(cell.state)
    before = env.fingerprint(sid) if mutating and not fresh else None
    r = env.call(user, method, path.format(id=sid), body, params)
    what = f"{method} {path} on a {cell.state} scene as {user}"
    if before is not None:
        changed = env.fingerprint(sid) != before
        if changed:
            env.shared.pop(cell.state, None)  # spoilt: later cells get a new one
        assert r.is_success or not changed, f"{what}: refused ({r.status_code}) but changed the scene"
    _check(r, cell, what)
    if cell.expect == "ok" and cell.endpoint != "explain":
        assert r.json()["id"] == sid
    if cell.expect == OUTCOMES["NF"]:
        # not merely 404: the very answer a missing scene gets, so existence never leaks
        key = (cell.endpoint, cell.role)
        if key not in env.missing:
            m = env.call(user, method, path.format(id=MISSING_ID), body, params)
            env.missing[key] = (m.status_code, m.json())
        assert (r.status_code, r.json()) == env.missing[key], f"{what}: differs from a missing scene's answer"


@pytest.mark.parametrize("cell", [_param(c) for c in CELLS if c.state == "-"])
def test_global_endpoint(env: Env, cell: Cell) -> None:
    method, path, body, params = GLOBAL_ENDPOINTS[cell.endpoint]
    r = env.call(ROLES[cell.role], method, path, body, params)
    _check(r, cell, f"{method} {path} as {ROLES[cell.role]}")
