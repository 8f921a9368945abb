"""The web console without a browser (TestClient through the real app): the login cookie carries the
API's token, the same casbin checks refuse the same things, forms need the CSRF token, every console
request is one audit event like an API request, every page renders in Chinese and English, and no
page shows a cell to a role that may not see it."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from sqlmodel import Session, select

from api.console.i18n import MESSAGES, VALUES
from pdao.kernel.audit import AuditEvent
from sandbox.results.models import QueryResult
from tests.conftest import DEMO_PASSWORD
from tests.console_support import CONSOLE, MISSING_MARK, console_client, csrf_of, post_form
from tests.scene_helpers import BY_DISTRICT, active_scene, create, today
from tests.test_audit_requests import count, the_one_event
from tests.test_export_review import BY_DISTRICT_FEES, held_result, review
from tests.test_queries import work_once
from tests.test_template_runs import applicants, health  # noqa: F401 - the `health` fixture


def _event_of(engine, r) -> AuditEvent:
    """The middleware's event of a request (a decision inside it may add its own, same request id)."""
    rid = r.headers["x-request-id"]
    with Session(engine) as s:
        return s.exec(select(AuditEvent).where(AuditEvent.request_id == rid, AuditEvent.path.is_not(None))).one()


# --- session, cookie, CSRF ------------------------------------------------------------------------

def test_anonymous_is_sent_to_login_and_the_request_is_audited_as_denied(app, engine):
    c = console_client(app)
    for path in ("/", "/scenes", "/audit", "/results/1", "/results/1/download"):
        before = count(engine)
        r = c.get(f"{CONSOLE}{path}")
        assert r.status_code == 303, (path, r.status_code)
        assert r.headers["location"].startswith(f"{CONSOLE}/login?next=")
        ev = the_one_event(engine, before, r)
        assert ev.decision == "deny" and ev.reason == "not_authenticated" and ev.actor is None
    page = c.get(r.headers["location"])
    assert page.status_code == 200 and 'name="csrf_token"' in page.text and "登录" in page.text


def test_login_sets_an_httponly_strict_cookie_holding_the_api_token(app, engine):
    c = console_client(app)
    token = csrf_of(c)
    before = count(engine)
    r = c.post(f"{CONSOLE}/login", data={"username": "auditor1", "password": DEMO_PASSWORD, "csrf_token": token,
                                          "next": f"{CONSOLE}/audit"})
    assert r.status_code == 303 and r.headers["location"] == f"{CONSOLE}/audit"
    ev = the_one_event(engine, before, r)
    assert (ev.action, ev.actor, ev.decision) == ("auth.login", "auditor1", "allow")
    set_cookie = [v for k, v in r.headers.multi_items() if k == "set-cookie" and v.startswith("pdao_session=")][0]
    low = set_cookie.lower()
    assert "httponly" in low and "samesite=strict" in low and "path=/console" in low
    # the very token the API issues: it works as a bearer token on the API
    session_token = c.cookies.get("pdao_session")
    me = c.get("/api/v1/me", headers={"Authorization": f"Bearer {session_token}"})
    assert me.status_code == 200 and me.json()["username"] == "auditor1"
    # … but the API itself never takes it from a cookie (no CSRF surface there)
    assert c.get("/api/v1/me", headers={"Cookie": f"pdao_session={session_token}"}).status_code == 401


def test_a_failed_login_is_a_bilingual_page_counted_and_audited(app, engine):
    c = console_client(app)
    token = csrf_of(c)
    before = count(engine)
    r = c.post(f"{CONSOLE}/login", data={"username": "insurer_a", "password": "wrong-password", "csrf_token": token})
    assert r.status_code == 401 and "登录失败" in r.text and "pdao_session" not in c.cookies
    ev = the_one_event(engine, before, r)
    # nobody signed in: the name typed is a detail, not the actor (review r2, finding 2)
    assert ev.decision == "deny" and ev.actor is None and ev.action == "auth.login"
    assert ev.detail == {"attempted_username": "insurer_a"} and ev.reason == "login_failed"
    assert "wrong-password" not in str(ev.detail) and "wrong-password" not in r.text


def test_login_refuses_a_form_without_the_csrf_token_or_from_elsewhere(app, engine):
    c = console_client(app)
    csrf_of(c)
    r = c.post(f"{CONSOLE}/login", data={"username": "insurer_a", "password": DEMO_PASSWORD})
    assert r.status_code == 403 and "csrf_failed" in r.text and "pdao_session" not in c.cookies
    r = c.post(f"{CONSOLE}/login", data={"username": "insurer_a", "password": DEMO_PASSWORD,
                                          "csrf_token": c.cookies.get("pdao_csrf")},
               headers={"Origin": "https://evil.example"})
    assert r.status_code == 403 and "pdao_session" not in c.cookies
    assert _event_of(engine, r).reason == "csrf_failed"


def test_form_posts_need_the_csrf_token_and_change_nothing_without_it(app, client, auth, engine):
    s = create(client, auth("insurer_a"))
    c = console_client(app, "insurer_a")
    for data, headers in (({}, {}), ({"csrf_token": "forged"}, {}),
                          ({"csrf_token": c.cookies.get("pdao_csrf")}, {"Origin": "https://evil.example"}),
                          ({"csrf_token": c.cookies.get("pdao_csrf")}, {"Sec-Fetch-Site": "cross-site"})):
        before = count(engine)
        r = c.post(f"{CONSOLE}/scenes/{s['id']}/submit", data=data, headers=headers)
        assert r.status_code == 403 and "csrf_failed" in r.text, r.text
        ev = the_one_event(engine, before, r)
        assert ev.decision == "deny" and ev.actor == "insurer_a" and ev.reason == "csrf_failed"
    assert client.get(f"/api/v1/scenes/{s['id']}", headers=auth("insurer_a")).json()["status"] == "draft"
    r = post_form(c, f"/scenes/{s['id']}/submit", headers={"Origin": "http://testserver"})
    assert r.status_code == 303
    assert client.get(f"/api/v1/scenes/{s['id']}", headers=auth("insurer_a")).json()["status"] == "submitted"


def test_logout_forgets_the_session_and_next_never_leaves_the_console(app):
    c = console_client(app)
    token = csrf_of(c)
    r = c.post(f"{CONSOLE}/login", data={"username": "office1", "password": DEMO_PASSWORD, "csrf_token": token,
                                          "next": "https://evil.example/x"})
    assert r.status_code == 303 and r.headers["location"] == f"{CONSOLE}/"
    assert csrf_of(c) != token              # a CSRF token planted before login is worth nothing after it
    assert c.get(f"{CONSOLE}/lang/en", params={"next": "//evil.example"}).headers["location"] == f"{CONSOLE}/"
    session_token = c.cookies.get("pdao_session")
    r = post_form(c, "/logout")
    assert r.status_code == 303 and "pdao_session" not in c.cookies
    assert c.get(f"{CONSOLE}/scenes").status_code == 303
    # the session is over on the server too: the old cookie (and the API token it is) no longer works
    replay = console_client(app)
    replay.cookies.set("pdao_session", session_token)
    assert replay.get(f"{CONSOLE}/scenes").status_code == 303
    assert c.get("/api/v1/me", headers={"Authorization": f"Bearer {session_token}"}).status_code == 401


def test_odd_audit_filters_are_a_clear_page_not_a_crash(app, client, auth, engine):
    c = console_client(app, "auditor1")
    for query in ("before_seq=9223372036854775808", "since=9999-12-31T23:59:59-23:00", "scene=999999999999",
                  "actor=a%00b"):
        r = c.get(f"{CONSOLE}/audit?{query}")
        assert r.status_code in (200, 422), (query, r.status_code)
        assert "Traceback" not in r.text
    assert c.get(f"{CONSOLE}/scenes/2147483648").status_code == 404


# --- the same casbin and tenant rules ----------------------------------------------------------------

def test_the_console_refuses_what_casbin_refuses_with_a_page_and_an_audit_event(app, client, auth, engine):
    s = create(client, auth("insurer_a"))
    client.post(f"/api/v1/scenes/{s['id']}/submit", headers=auth("insurer_a"))
    tenant = console_client(app, "insurer_a")
    before = count(engine)
    r = tenant.get(f"{CONSOLE}/audit")
    assert r.status_code == 403 and "role_not_permitted" in r.text and "<html" in r.text
    ev = the_one_event(engine, before, r)
    assert (ev.action, ev.actor, ev.decision) == ("audit.read", "insurer_a", "deny")
    auditor = console_client(app, "auditor1")
    before = count(engine)
    r = post_form(auditor, f"/scenes/{s['id']}/reviews", {"decision": "approve"})
    assert r.status_code == 403
    ev = the_one_event(engine, before, r)
    assert (ev.action, ev.actor, ev.decision, ev.reason) == ("scene.review", "auditor1", "deny", "role_not_permitted")
    assert post_form(tenant, "/emergency-stop", {"org": "company_a", "reason": "x"}).status_code == 403
    assert tenant.get(f"{CONSOLE}/reviews").status_code == 403
    assert client.get(f"/api/v1/scenes/{s['id']}", headers=auth("insurer_a")).json()["status"] == "submitted"


def test_another_tenant_gets_404_for_scenes_queries_results_lineage_and_downloads(app, client, auth, engine, settings,
                                                                                loaded):
    scene = active_scene(client, auth)
    res = held_result(client, auth, engine, settings, scene["id"])
    assert review(client, auth("reviewer1"), res["id"]).status_code == 200
    other = console_client(app, "insurer_b")
    for path in (f"/scenes/{scene['id']}", f"/queries/{res['query_id']}", f"/results/{res['id']}",
                 f"/results/{res['id']}/lineage", f"/results/{res['id']}/download?format=csv"):
        before = count(engine)
        r = other.get(f"{CONSOLE}{path}")
        assert r.status_code == 404, (path, r.status_code)
        assert "not_found" in r.text and "Traceback" not in r.text
        assert the_one_event(engine, before, r).decision == "deny"
    assert post_form(other, f"/scenes/{scene['id']}/queries",
                     {"sql": BY_DISTRICT, "mode": "dev"}).status_code == 404
    for path in ("/scenes", "/queries", "/results", "/"):
        page = other.get(f"{CONSOLE}{path}").text
        assert f'data-scene="{scene["id"]}"' not in page and f'data-result="{res["id"]}"' not in page


def _cell_texts(settings, engine, rid: int) -> list[str]:
    """How the result's cells would print on a page (long numbers: no accidental match)."""
    from sandbox.queries.service import read_table

    with Session(engine) as s:
        table = read_table(settings, s.get(QueryResult, rid))
    out = []
    for col in table.column_names:
        for v in table.column(col).to_pylist():
            if isinstance(v, float) and len(str(v)) >= 8:
                out.append(str(v))
    return out


def test_no_page_shows_a_held_cell_to_anyone_but_its_reviewer(app, client, auth, engine, settings, loaded):
    scene = active_scene(client, auth)
    res = held_result(client, auth, engine, settings, scene["id"], sql=BY_DISTRICT_FEES)
    rid = res["id"]
    cells = _cell_texts(settings, engine, rid)
    assert cells, "the answer has noisy sums to look for"
    for who in ("insurer_a", "auditor1", "office1", "operator1"):
        c = console_client(app, who)
        for path in (f"/results/{rid}", f"/results/{rid}/lineage", "/results", "/", f"/scenes/{scene['id']}",
                     "/audit" if who in ("auditor1", "office1") else "/queries"):
            page = c.get(f"{CONSOLE}{path}")
            assert page.status_code in (200, 403), (who, path, page.status_code)
            assert 'id="result-cells"' not in page.text
            assert not [v for v in cells if v in page.text], (who, path)
        if who == "insurer_a":
            assert c.get(f"{CONSOLE}/results/{rid}/download?format=csv").status_code in (403, 409)
    reviewer = console_client(app, "reviewer1")
    page = reviewer.get(f"{CONSOLE}/results/{rid}").text
    assert 'id="result-cells"' in page and any(v in page for v in cells)
    assert 'id="review-box"' in page
    # released: the reviewer who decided sees no cells any more; the tenant does, and may download
    r = post_form(reviewer, f"/results/{rid}/review", {"decision": "release", "reason": "DP, cells fine"})
    assert r.status_code == 303
    assert 'id="result-cells"' not in reviewer.get(f"{CONSOLE}/results/{rid}").text
    tenant = console_client(app, "insurer_a")
    page = tenant.get(f"{CONSOLE}/results/{rid}").text
    assert 'id="result-cells"' in page and 'id="download-csv"' in page
    dl = tenant.get(f"{CONSOLE}/results/{rid}/download?format=csv")
    assert dl.status_code == 200 and dl.headers["x-pdao-export"] and dl.headers["x-pdao-fingerprint"]
    ev = _event_of(engine, dl)
    assert ev.action == "result.download" and ev.detail["export_id"] == dl.headers["x-pdao-export"]
    assert not [v for v in cells if v in str(ev.detail)]
    auditor = console_client(app, "auditor1")
    assert 'id="result-cells"' not in auditor.get(f"{CONSOLE}/results/{rid}").text
    assert auditor.get(f"{CONSOLE}/results/{rid}/download").status_code == 403


# --- the flows through the console -------------------------------------------------------------------

def test_office_reviews_item_by_item_strikes_and_approves_then_controls_the_scene(app, client, auth, engine):
    s = create(client, auth("insurer_a"))
    client.post(f"/api/v1/scenes/{s['id']}/submit", headers=auth("insurer_a"))
    office1 = console_client(app, "office1")
    page = office1.get(f"{CONSOLE}/scenes/{s['id']}").text
    assert 'id="review-form"' in page and page.count('name="strike"') == len(s["items"])
    assert "规则表判定" in page and "可用于" in page            # the rule table's verdict per item
    join_item = [i for i in s["items"] if i["usage"] == "join_key"][0]
    before = count(engine)
    r = post_form(office1, f"/scenes/{s['id']}/reviews",
                  [("decision", "approve"), ("strike", str(join_item["id"])), ("comment", "join key not needed")])
    assert r.status_code == 303, re.findall(r'id="error-message">([^<]*)', r.text)
    ev = the_one_event(engine, before, r)
    assert ev.action == "scene.review" and ev.detail == {"decision": "approve", "struck_items": [join_item["id"]]}
    r = post_form(console_client(app, "office2"), f"/scenes/{s['id']}/reviews", {"decision": "approve"})
    assert r.status_code == 303
    out = client.get(f"/api/v1/scenes/{s['id']}", headers=auth("insurer_a")).json()
    assert out["status"] == "active" and [i["struck"] for i in out["items"] if i["id"] == join_item["id"]] == [True]
    page = office1.get(f"{CONSOLE}/scenes/{s['id']}").text
    assert 'class="struck"' in page and 'id="suspend"' in page
    assert post_form(office1, f"/scenes/{s['id']}/suspend", {"reason": "check"}).status_code == 303
    assert client.get(f"/api/v1/scenes/{s['id']}", headers=auth("insurer_a")).json()["status"] == "suspended"
    assert post_form(office1, f"/scenes/{s['id']}/resume", {"reason": "ok"}).status_code == 303
    r = post_form(office1, "/emergency-stop", {"org": "company_a", "reason": "leak suspected"})
    assert r.status_code == 200 and 'id="emergency-done"' in r.text
    assert client.get(f"/api/v1/scenes/{s['id']}", headers=auth("insurer_a")).json()["status"] == "suspended"
    assert post_form(office1, f"/scenes/{s['id']}/revoke", {"reason": "for good"}).status_code == 303
    assert client.get(f"/api/v1/scenes/{s['id']}", headers=auth("insurer_a")).json()["status"] == "revoked"
    # a refused transition is a bilingual page, not a trace
    r = post_form(office1, f"/scenes/{s['id']}/resume", {})
    assert r.status_code == 409 and "Traceback" not in r.text and 'id="error-code"' in r.text


def test_applicant_applies_previews_runs_dev_and_prod_and_reviewer_revises(app, client, auth, engine, settings, loaded):
    tenant = console_client(app, "insurer_a")
    r = post_form(tenant, "/scenes", {
        "title": "慢病统计", "purpose": "chronic disease statistics", "scene_type": "public_health",
        "valid_from": "2000-01-01", "valid_to": "2000-01-02", "budget_epsilon": "3", "max_query_epsilon": "0.5",
        "items": "health.outpatient_visit.district group_by\nhealth.nope.x aggregate"})
    assert r.status_code == 422 and "scene_refused" in r.text      # problems item by item, on a page
    r = post_form(tenant, "/scenes", {
        "title": "慢病统计", "purpose": "chronic disease statistics", "scene_type": "public_health",
        "valid_from": today().isoformat(), "valid_to": (today() + timedelta(days=30)).isoformat(),
        "budget_epsilon": "3", "max_query_epsilon": "0.5", "legal_basis": "PIPL art. 13",
        "emergency_plan": "suspend and notify the office",
        "items": "health.outpatient_visit.district group_by\nhealth.outpatient_visit.fee aggregate\n"
                 "health.outpatient_visit.visit_date filter"})
    assert r.status_code == 303, re.findall(r"<li>(.*?)</li>", r.text)
    sid = int(r.headers["location"].rsplit("/", 1)[1])
    assert post_form(tenant, f"/scenes/{sid}/submit").status_code == 303
    for who in ("office1", "office2"):
        assert post_form(console_client(app, who), f"/scenes/{sid}/reviews", {"decision": "approve"}).status_code == 303
    page = tenant.get(f"{CONSOLE}/scenes/{sid}").text
    assert 'id="query-box"' in page and 'class="chart gauge"' in page
    r = post_form(tenant, f"/scenes/{sid}/queries", {"sql": BY_DISTRICT_FEES, "mode": "prod", "epsilon": "0.5",
                                                     "preview": "1"})
    assert r.status_code == 200 and 'id="preview"' in r.text
    r = post_form(tenant, f"/scenes/{sid}/queries", {"sql": BY_DISTRICT_FEES, "mode": "dev"})
    assert r.status_code == 303
    dev_q = tenant.get(r.headers["location"]).text
    assert 'data-status="done"' in dev_q
    dev_rid = int(re.search(r'id="open-result" href="/console/results/(\d+)"', dev_q).group(1))
    assert 'id="result-cells"' in tenant.get(f"{CONSOLE}/results/{dev_rid}").text   # synthetic: at once
    before = count(engine)
    r = post_form(tenant, f"/scenes/{sid}/queries", {"sql": BY_DISTRICT_FEES, "mode": "prod", "epsilon": "0.5"})
    assert r.status_code == 303
    ev = the_one_event(engine, before, r)
    assert ev.action == "scene.query" and ev.detail["sql"] == BY_DISTRICT_FEES and ev.detail["mode"] == "prod"
    assert work_once(engine, settings)
    qpage = tenant.get(r.headers["location"]).text
    assert 'data-status="held"' in qpage
    rid = int(re.search(r'id="open-result" href="/console/results/(\d+)"', qpage).group(1))
    reviewer = console_client(app, "reviewer1")
    assert f'data-result="{rid}"' in reviewer.get(f"{CONSOLE}/reviews").text
    r = post_form(reviewer, f"/results/{rid}/revisions", {"revision": "round", "columns": "total", "base": "100",
                                                          "reason": "coarser sums"})
    assert r.status_code == 303
    new_id = int(r.headers["location"].rsplit("/", 1)[1])
    assert new_id != rid and 'data-status="held"' in reviewer.get(f"{CONSOLE}/results/{new_id}").text
    r = post_form(reviewer, f"/results/{new_id}/revisions", {"revision": "suppress", "reason": "failing cells"})
    assert r.status_code in (303, 409, 422), r.text
    assert "Traceback" not in r.text
    # the home page: budget gauge, queries and statuses
    home = tenant.get(f"{CONSOLE}/").text
    assert 'class="chart gauge"' in home and 'data-query="' in home


def test_audit_page_filters_charts_verifies_and_shows_a_broken_chain(app, client, auth, engine):
    c = console_client(app, "insurer_a")
    c.get(f"{CONSOLE}/audit")                           # a denial to find
    auditor = console_client(app, "auditor1")
    r = auditor.get(f"{CONSOLE}/audit", params={"actor": "insurer_a", "decision": "deny"})
    assert r.status_code == 200 and 'class="chart timeline"' in r.text and 'class="deny"' in r.text
    rows = re.findall(r'<tr class="d-(\w+)" data-seq', r.text)
    assert rows and set(rows) == {"deny"}
    ev = _event_of(engine, r)
    assert ev.action == "audit.read" and ev.detail["filters"] == {"actor": "insurer_a", "decision": "deny"}
    r = auditor.get(f"{CONSOLE}/audit", params={"since": "yesterday"})
    assert r.status_code == 422 and "bad_time" in r.text
    v = auditor.get(f"{CONSOLE}/audit/verify")
    assert 'data-ok="true"' in v.text and "哈希链完整" in v.text
    with Session(engine) as s:
        ev = s.exec(select(AuditEvent).where(AuditEvent.seq == 2)).one()
        ev.action = "tampered"
        s.add(ev)
        s.commit()
    v = auditor.get(f"{CONSOLE}/audit/verify", params={"lang": "en"})
    assert 'data-ok="false"' in v.text and "BROKEN" in v.text and "#2" in v.text
    assert auditor.get(f"{CONSOLE}/audit/alerts").status_code == 200


def test_lineage_graph_and_resource_map_are_server_side_svg(app, client, auth, engine, settings, loaded):
    scene = active_scene(client, auth)
    res = held_result(client, auth, engine, settings, scene["id"])
    assert review(client, auth("reviewer1"), res["id"]).status_code == 200
    auditor = console_client(app, "auditor1")
    r = auditor.get(f"{CONSOLE}/audit/lineage", params={"result": res["id"]})
    assert r.status_code == 303
    page = auditor.get(r.headers["location"]).text
    assert "<svg" in page and f'data-node="q:{res["query_id"]}"' in page and f'data-node="r:{res["id"]}"' in page
    assert f'data-node="s:{scene["id"]}"' in page and 'data-node="rv:0"' in page
    m = auditor.get(f"{CONSOLE}/catalog").text
    assert 'id="resource-map"' in m and f'data-node="sc:{scene["id"]}"' in m and 'data-node="org:company_a"' in m
    assert 'data-node="dep:' in m and 'data-node="ds:health.outpatient_visit"' in m
    # another tenant's map has no trace of company_a's scene
    m = console_client(app, "insurer_b").get(f"{CONSOLE}/catalog").text
    assert f'data-node="sc:{scene["id"]}"' not in m and "company_a" not in m


def test_an_unexpected_error_is_a_page_without_a_trace_and_is_audited(app, engine, monkeypatch):
    from api.console import routes

    def boom(*a, **kw):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(routes.scenes, "list_visible", boom)
    c = console_client(app, "office1")
    before = count(engine)
    r = c.get(f"{CONSOLE}/scenes")
    assert r.status_code == 500 and "internal_error" in r.text
    assert "Traceback" not in r.text and "secret internals" not in r.text
    assert the_one_event(engine, before, r).decision == "error"
    assert c.get(f"{CONSOLE}/no-such-page").status_code == 404


# --- both languages ----------------------------------------------------------------------------------

def test_every_message_and_every_known_value_has_both_languages():
    from catalog.descriptor import Category, Masking, OpeningClass, Sensitivity, UpdateCycle
    from pdao.kernel.identity.models import Role
    from policies.rules import Usage
    from sandbox.results.models import RESULT_STATES
    from sandbox.scenes.schemas import SceneType
    from sandbox.scenes.states import TRANSITIONS

    for key, (zh, en) in MESSAGES.items():
        assert zh.strip() and en.strip(), key
    known = {"role": [r.value for r in Role], "usage": [u.value for u in Usage],
             "sensitivity": [s.value for s in Sensitivity], "category": [c.value for c in Category],
             "opening_class": [o.value for o in OpeningClass], "masking": [m.value for m in Masking],
             "update_cycle": [u.value for u in UpdateCycle], "scene_type": [t.value for t in SceneType],
             "result_status": list(RESULT_STATES),
             "scene_status": sorted({s for froms, to in TRANSITIONS.values() for s in (*froms, to)}
                                    | {"draft", "active", "expired"}),
             "scene_action": list(TRANSITIONS),
             "query_status": ["queued", "running", "held", "done", "released", "rejected", "failed", "cancelled"]}
    for kind, values in known.items():
        for v in values:
            assert v in VALUES[kind], (kind, v)
            assert all(x.strip() for x in VALUES[kind][v]), (kind, v)


def test_every_page_renders_in_chinese_and_english_with_no_missing_translation(app, client, auth, engine, settings,
                                                                              loaded):
    scene = active_scene(client, auth)
    res = held_result(client, auth, engine, settings, scene["id"])
    pages = {
        "insurer_a": ["/", "/catalog", "/catalog/health.outpatient_visit", "/scenes", "/scenes/new",
                      f"/scenes/{scene['id']}", "/queries", f"/queries/{res['query_id']}", "/results",
                      f"/results/{res['id']}", f"/results/{res['id']}/lineage", "/audit", "/uploads", "/trace",
                      "/api-keys", "/budgets"],
        "office1": ["/", f"/scenes/{scene['id']}", "/emergency-stop", "/audit", "/audit/alerts", "/audit/verify",
                    "/uploads", "/trace", "/budgets", f"/results/{res['id']}"],
        "reviewer1": ["/", "/reviews", f"/results/{res['id']}", f"/results/{res['id']}/lineage", "/uploads"],
        "auditor1": ["/", "/audit", "/audit/verify", "/audit/alerts", f"/results/{res['id']}/lineage", "/results",
                     "/no-such-page", "/uploads", "/trace", "/budgets", f"/scenes/{scene['id']}"],
        "provider1": ["/", "/catalog", "/scenes", "/uploads", "/api-keys"],
        "operator1": ["/", "/results", "/api-keys"],
    }
    seen = 0
    for lang, marker, html_lang in (("zh", "数据目录", 'lang="zh-CN"'), ("en", "Catalog", 'lang="en"')):
        for who, paths in pages.items():
            c = console_client(app, who, lang=lang)
            for path in paths:
                r = c.get(f"{CONSOLE}{path}")
                assert r.status_code in (200, 403, 404), (lang, who, path, r.status_code)
                assert MISSING_MARK not in r.text, (lang, who, path, r.text[r.text.find(MISSING_MARK) - 80:][:200])
                assert html_lang in r.text, (lang, who, path)
                if r.status_code == 200:
                    assert marker in r.text, (lang, who, path)
                seen += 1
        anon = console_client(app, lang=lang).get(f"{CONSOLE}/login").text
        assert MISSING_MARK not in anon and html_lang in anon
    assert seen > 50
    # the switch: a preference cookie, then back where one was
    c = console_client(app, "office1")
    r = c.get(f"{CONSOLE}/lang/en", params={"next": f"{CONSOLE}/scenes"})
    assert r.status_code == 303 and r.headers["location"] == f"{CONSOLE}/scenes"
    assert 'lang="en"' in c.get(f"{CONSOLE}/scenes").text


# --- uploads, template runs, trace, picked cells ------------------------------------------------------

def test_applicant_uploads_from_the_console_and_every_page_shows_metadata_only(app, client, auth, engine, settings):
    import json

    from tests.console_support import post_file
    from tests.test_tenant_uploads import APPLICANTS, IDS, applicant_rows, files_under, to_csv, upload_rows

    tenant = console_client(app, "insurer_a")
    page = tenant.get(f"{CONSOLE}/uploads").text
    assert 'id="upload-form"' in page and 'enctype="multipart/form-data"' in page
    data = to_csv(applicant_rows(30))
    schema = json.dumps(APPLICANTS, ensure_ascii=False)
    # CSRF: no token, a forged one, another site: refused before anything is stored, audited by name
    for token, headers in ((None, {}), ("forged", {}), ("", {"Origin": "https://evil.example"}),
                           ("", {"Sec-Fetch-Site": "cross-site"})):
        before = count(engine)
        r = post_file(tenant, "/uploads", {"file": ("a.csv", data, "text/csv")}, {"schema": schema}, token=token,
                      headers=headers)
        assert r.status_code == 403 and "csrf_failed" in r.text, (token, headers, r.status_code)
        ev = the_one_event(engine, before, r)
        assert (ev.actor, ev.decision, ev.reason) == ("insurer_a", "deny", "csrf_failed")
    assert upload_rows(engine) == 0 and files_under(settings) == []
    # the API's checks and errors, shown in both languages: a bad schema, bad rows
    bad = {"name": "applicants", "columns": [c for c in APPLICANTS["columns"] if c.get("role") != "join_key"]}
    for lang, words in (("zh", "声明的表结构无效"), ("en", "The declared schema is invalid")):
        c = console_client(app, "insurer_a", lang=lang)
        r = post_file(c, "/uploads", {"file": ("a.csv", data, "text/csv")}, {"schema": json.dumps(bad)})
        assert r.status_code == 422 and "schema_invalid" in r.text and words in r.text
        assert "join_key" in r.text and MISSING_MARK not in r.text
    rows = applicant_rows(5)
    rows[2]["id_number"] = "110101199001011234"   # not a valid resident ID
    r = post_file(tenant, "/uploads", {"file": ("a.csv", to_csv(rows), "text/csv")}, {"schema": schema})
    assert r.status_code == 422 and "upload_invalid" in r.text and "@ 4" in r.text, r.text   # line 4 of the file
    assert "110101199001011234" not in r.text
    assert upload_rows(engine) == 0
    # stored: the API's audit detail, then the list (metadata)
    before = count(engine)
    r = post_file(tenant, "/uploads", {"file": ("a.csv", data, "text/csv")}, {"schema": schema, "note": "batch 1"})
    assert r.status_code == 303, r.text
    ev = the_one_event(engine, before, r)
    assert ev.action == "upload.create" and ev.decision == "allow" and ev.path == f"{CONSOLE}/uploads"
    assert set(ev.detail) == {"upload", "version", "rows", "sha256", "format"} and ev.detail["rows"] == 30
    page = tenant.get(r.headers["location"]).text
    api = client.get("/api/v1/uploads", headers=auth("insurer_a")).json()["items"][0]
    assert 'id="upload-stored"' in page and 'data-upload="company_a/applicants"' in page
    assert api["sha256"] in page and "batch 1" in page and "关联键" in page   # roles in words
    # CSV and Parquet, both through the same form: a second version
    r = post_file(tenant, "/uploads", {"file": ("a.csv", data, "text/csv")}, {"name": "applicants"})   # latest schema
    assert r.status_code == 303
    assert 'data-version="2"' in tenant.get(f"{CONSOLE}/uploads").text
    cells = set(IDS[:30]) | {row["applicant_ref"] for row in applicant_rows(30)}
    for who, sees in (("insurer_a", True), ("office1", True), ("auditor1", True), ("reviewer1", True),
                      ("insurer_b", False), ("provider1", False), ("operator1", False)):
        c = console_client(app, who)
        page = c.get(f"{CONSOLE}/uploads")
        assert page.status_code == 200, who
        assert ('data-upload="company_a/applicants"' in page.text) is sees, who
        assert not [v for v in cells if v in page.text], who
        if who != "insurer_a":
            assert "batch 1" not in page.text, who   # the note is the tenant's own
        if who not in ("insurer_a", "insurer_b"):
            assert 'id="upload-form"' not in page.text, who
            r = post_file(c, "/uploads", {"file": ("a.csv", data, "text/csv")}, {"schema": schema})
            assert r.status_code == 403 and "role_not_permitted" in r.text, who
    assert upload_rows(engine) == 2


def test_template_scene_review_shows_sql_outputs_and_disclosure_and_the_applicant_runs_it(app, client, auth, engine,
                                                                                          settings, health):
    from tests.test_scene_templates import underwriting_items
    from tests.test_template_runs import upload

    upload(client, auth("insurer_a"), applicants(health[:25]))
    s = create(client, auth("insurer_a"), scene_type="underwriting", items=underwriting_items(),
               templates=[{"library": "underwriting"}])
    client.post(f"/api/v1/scenes/{s['id']}/submit", headers=auth("insurer_a"))
    office = console_client(app, "office1")
    page = office.get(f"{CONSOLE}/scenes/{s['id']}").text
    assert 'id="template-underwriting"' in page and "WITH person AS" in page            # the SQL
    assert 'data-output="max_inpatient_cost_band"' in page and "health.inpatient_stay.total_cost" in page
    assert 'data-dataset="health.inpatient_stay"' in page and "1024" in page             # combinations vs the cap
    assert 'id="run-template-underwriting"' not in page                                 # the office runs nothing
    en = console_client(app, "office1", lang="en").get(f"{CONSOLE}/scenes/{s['id']}").text
    assert "Value combinations per person" in en and MISSING_MARK not in en and MISSING_MARK not in page
    for who in ("office1", "office2"):
        assert post_form(console_client(app, who), f"/scenes/{s['id']}/reviews",
                         {"decision": "approve"}).status_code == 303
    tenant = console_client(app, "insurer_a")
    page = tenant.get(f"{CONSOLE}/scenes/{s['id']}").text
    assert 'id="run-template-underwriting"' in page and '<option value="applicants" selected>' in page
    en = console_client(app, "insurer_a", lang="en").get(f"{CONSOLE}/scenes/{s['id']}").text
    assert "Run the template" in en and MISSING_MARK not in en
    run = f"/scenes/{s['id']}/templates/underwriting/runs"
    # CSRF, bad parameters, wrong role, another tenant: refused, nothing run
    assert tenant.post(f"{CONSOLE}{run}", data={"upload": "applicants", "mode": "dev"}).status_code == 403
    r = post_form(tenant, run, {"upload": "applicants", "mode": "dev", "params": "{not json"})
    assert r.status_code == 422 and "bad_params" in r.text
    r = post_form(tenant, run, {"upload": "applicants", "mode": "dev", "params": '{"as_of": "1900-01-01"}'})
    assert r.status_code == 422 and "Traceback" not in r.text
    auditor = console_client(app, "auditor1")
    before = count(engine)
    r = post_form(auditor, run, {"upload": "applicants", "mode": "dev"})
    assert r.status_code == 403 and "role_not_permitted" in r.text
    ev = the_one_event(engine, before, r)
    assert (ev.action, ev.actor, ev.decision) == ("scene.query", "auditor1", "deny")
    assert post_form(console_client(app, "insurer_b"), run, {"upload": "applicants", "mode": "dev"}).status_code == 404
    with Session(engine) as ss:
        assert ss.exec(select(QueryResult)).all() == []
    # dev: the tenant's at once; prod: held, no cells for the tenant, derived values for the reviewer
    r = post_form(tenant, run, {"upload": "applicants", "mode": "dev"})
    assert r.status_code == 303, r.text
    q = tenant.get(r.headers["location"]).text
    assert 'data-status="done"' in q
    r = post_form(tenant, run, {"upload": "applicants", "mode": "prod", "params": "{}"})
    assert r.status_code == 303, r.text
    ev = _event_of(engine, r)      # the middleware's (the run writes its own `template.run` too)
    assert ev.action == "scene.query" and ev.detail == {"template": "underwriting", "upload": "applicants",
                                                          "mode": "prod", "params": {}}
    q = tenant.get(r.headers["location"]).text
    assert 'data-status="held"' in q
    rid = int(re.search(r'id="open-result" href="/console/results/(\d+)"', q).group(1))
    page = tenant.get(f"{CONSOLE}/results/{rid}").text
    assert 'id="result-cells"' not in page and 'id="cells-hidden"' in page
    assert not [x for x in health[:25] if x in page]
    reviewer = console_client(app, "reviewer1")
    page = reviewer.get(f"{CONSOLE}/results/{rid}").text
    assert 'id="result-cells"' in page and "A00000" in page and not [x for x in health[:25] if x in page]
    assert 'id="suppress-picked-form"' not in page                    # a rows answer: by class only


def test_trace_from_the_console_names_export_result_requester_and_reviewer(app, client, auth, engine, settings,
                                                                          loaded):
    from tests.console_support import post_file

    scene = active_scene(client, auth)
    res = held_result(client, auth, engine, settings, scene["id"])
    assert review(client, auth("reviewer1"), res["id"]).status_code == 200
    dl = client.get(f"/api/v1/results/{res['id']}/download", headers=auth("insurer_a"))
    export_id = dl.headers["X-Pdao-Export"]
    auditor = console_client(app, "auditor1", lang="en")
    assert 'id="trace-form"' in auditor.get(f"{CONSOLE}/trace").text
    # CSRF on the file form
    for token, headers in ((None, {}), ("forged", {}), ("", {"Origin": "https://evil.example"})):
        before = count(engine)
        r = post_file(auditor, "/trace", {"file": ("found.csv", dl.content, "text/csv")}, token=token, headers=headers)
        assert r.status_code == 403 and "csrf_failed" in r.text
        assert the_one_event(engine, before, r).reason == "csrf_failed"
    before = count(engine)
    r = post_file(auditor, "/trace", {"file": ("found.csv", dl.content, "text/csv")})
    assert r.status_code == 200 and 'data-matched="true"' in r.text and 'data-match="stamp"' in r.text
    assert f'<code id="trace-export">{export_id}</code>' in r.text and f"#{res['id']}" in r.text
    assert re.search(r'id="trace-requester">insurer_a<', r.text) and "reviewer1" in r.text
    assert MISSING_MARK not in r.text
    ev = the_one_event(engine, before, r)
    assert ev.action == "trace.create" and ev.detail == {"matched": True, "match": "stamp", "export_id": export_id,
                                                         "result_id": res["id"]}
    assert ev.object == f"result:{res['id']}" and ev.scene_id == scene["id"]
    # the office too, in Chinese; the cells without their stamp still match by content
    bare = b"\n".join(ln for ln in dl.content.splitlines() if not ln.startswith(b"#"))
    r = post_file(console_client(app, "office1"), "/trace", {"file": ("x.csv", bare, "text/csv")})
    assert r.status_code == 200 and 'data-match="content"' in r.text and "内容指纹" in r.text
    assert MISSING_MARK not in r.text
    r = post_file(auditor, "/trace", {"file": ("x.bin", b"\x00\x01PK\x03\x04junk")})
    assert r.status_code == 422 and "Traceback" not in r.text
    # the tenant and the reviewer may not trace: a page, audited
    for who in ("insurer_a", "reviewer1"):
        c = console_client(app, who)
        before = count(engine)
        r = c.get(f"{CONSOLE}/trace")
        assert r.status_code == 403 and "role_not_permitted" in r.text
        assert the_one_event(engine, before, r).decision == "deny"
        assert post_file(c, "/trace", {"file": ("found.csv", dl.content)}).status_code == 403


def test_reviewer_picks_failing_cells_to_suppress(app, client, auth, engine, settings, loaded):
    import json

    from tests.test_export_review import BY_DISTRICT_COUNT

    scene = active_scene(client, auth, release_policy={"auto_release": "dp_aggregates",
                                                       "thresholds": {"min_cell_count": 1000}})
    res = held_result(client, auth, engine, settings, scene["id"], sql=BY_DISTRICT_COUNT)
    rid = res["id"]
    reviewer = console_client(app, "reviewer1")
    page = reviewer.get(f"{CONSOLE}/results/{rid}").text
    assert 'id="suppress-picked-form"' in page and page.count('name="cell"') == 6
    values = re.findall(r'name="cell" value="([^"]*)"', page)
    picked = [json.loads(v.replace("&#34;", '"').replace("&quot;", '"')) for v in values[:2]]
    # only the reviewer who may decide sees the picker; others may not post it
    for who in ("insurer_a", "auditor1", "office1"):
        c = console_client(app, who)
        assert 'name="cell"' not in c.get(f"{CONSOLE}/results/{rid}").text
        before = count(engine)
        r = post_form(c, f"/results/{rid}/revisions", [("revision", "suppress"), ("reason", "x"),
                                                       ("cell", json.dumps(picked[0], ensure_ascii=False))])
        assert r.status_code == 403 and the_one_event(engine, before, r).reason == "role_not_permitted"
    # CSRF, malformed and unknown cells: refused, nothing changed
    r = reviewer.post(f"{CONSOLE}/results/{rid}/revisions",
                      data={"revision": "suppress", "reason": "x", "cell": json.dumps(picked[0])})
    assert r.status_code == 403 and "csrf_failed" in r.text
    for bad in ("not json", json.dumps({"district": "nowhere"}), json.dumps({"hospital": "x"}), "[1]"):
        r = post_form(reviewer, f"/results/{rid}/revisions", [("revision", "suppress"), ("reason", "x"), ("cell", bad)])
        assert r.status_code == 422 and "Traceback" not in r.text, (bad, r.status_code)
    assert client.get(f"/api/v1/results/{rid}", headers=auth("reviewer1")).json()["status"] == "held"
    r = post_form(reviewer, f"/results/{rid}/revisions",
                  [("revision", "suppress"), ("reason", "the two smallest districts")]
                  + [("cell", json.dumps(c, ensure_ascii=False)) for c in picked])
    assert r.status_code == 303, r.text
    ev = _event_of(engine, r)      # the middleware's (the decision writes `result.suppress` too)
    assert ev.action == "result.review" and ev.detail["action"] == "suppress"
    new_id = int(r.headers["location"].rsplit("/", 1)[1])
    v2 = client.get(f"/api/v1/results/{new_id}", headers=auth("reviewer1")).json()
    assert v2["parent_id"] == rid and v2["status"] == "held"
    gone = {c["district"] for c in picked}
    assert {row["district"] for row in v2["rows"] if row["n"] is None} == gone
    assert sorted(c["district"] for c in v2["revision"]["cells"]) == sorted(gone)


def test_the_review_form_is_offered_only_to_who_may_decide(app, client, auth, engine, settings, loaded):
    from tests.test_export_review import _org_of, make_user

    scene = active_scene(client, auth)
    rid = held_result(client, auth, engine, settings, scene["id"])["id"]
    make_user(engine, settings, "qa_a", _org_of(engine, "insurer_a"), "reviewer")   # insurer_a's own reviewer
    own = console_client(app, "qa_a")
    page = own.get(f"{CONSOLE}/results/{rid}")
    assert page.status_code == 200 and 'name="decision"' not in page.text
    assert f'data-result="{rid}"' not in own.get(f"{CONSOLE}/reviews").text     # nor in their queue
    other = console_client(app, "reviewer1")
    assert 'name="decision"' in other.get(f"{CONSOLE}/results/{rid}").text


# --- issue 13 in the console: export review with overrides, API keys, company budgets, linkage -------

def _rows_scene_and_sql(client, auth, synth_files):
    """An active scene with masked rows, and the review's differencing attack: the same rows query
    up to a day, and up to the next (which adds that day's only mental-health visit)."""
    import datetime as dt

    from tests.test_row_answers import ROWS_ITEMS, one_visit_day

    day = one_visit_day(synth_files)
    scene = active_scene(client, auth, items=ROWS_ITEMS)
    sql = ("SELECT department, person_id FROM health.outpatient_visit WHERE icd10_chapter = 'V' "
           "AND visit_date < DATE '{}'")
    return scene, sql.format(day.isoformat()), sql.format((day + dt.timedelta(days=1)).isoformat())


def _status_of(client, auth, rid: int) -> str:
    return client.get(f"/api/v1/results/{rid}", headers=auth("reviewer1")).json()["status"]


# By default on SQLite only (a page over the same service, whose API path runs on both backends).
@pytest.mark.default_backend("sqlite")
def test_a_reviewer_releases_a_row_answer_from_the_console(app, client, auth, engine, settings, loaded,
                                                          synth_files):
    """Before: the console's review called `export.review` without the settings, so every row answer
    (checked again at release against the scene's released row answers) answered 409
    `release_needs_recheck`."""
    scene, sql, _ = _rows_scene_and_sql(client, auth, synth_files)
    res = held_result(client, auth, engine, settings, scene["id"], sql=sql)
    assert res["kind"] == "rows" and res["report"]["verdict"] == "pass", res["report"]["summary"]
    reviewer = console_client(app, "reviewer1")
    page = reviewer.get(f"{CONSOLE}/results/{res['id']}").text
    assert 'id="release"' in page and 'data-needs-override="false"' in page
    assert 'id="override"' in page and ' required' not in page.split('id="override"')[1][:20]   # optional here
    before = count(engine)
    r = post_form(reviewer, f"/results/{res['id']}/review", {"decision": "release", "reason": "masked, k ≥ 5"})
    assert r.status_code == 303, re.findall(r'id="error-code">([^<]*)', r.text)
    ev = _event_of(engine, r)
    assert ev.action == "result.review" and ev.detail == {"decision": "release", "override": False}
    assert count(engine) - before == 2          # the request's event and the decision's `result.release`
    assert _status_of(client, auth, res["id"]) == "released"
    with Session(engine) as s:                  # checked again at release, as through the API
        assert s.get(QueryResult, res["id"]).report["checked_at_release"]
    tenant = console_client(app, "insurer_a")
    assert 'id="result-cells"' in tenant.get(f"{CONSOLE}/results/{res['id']}").text


# By default on SQLite only (a page over the same service, whose API path runs on both backends).
@pytest.mark.default_backend("sqlite")
def test_a_differenced_row_answer_needs_two_reviewers_overrides_in_the_console(app, client, auth, engine, settings,
                                                                              loaded, synth_files):
    from tests.test_row_answers import second_reviewer

    second_reviewer(engine, settings)
    scene, first_sql, second_sql = _rows_scene_and_sql(client, auth, synth_files)
    first = held_result(client, auth, engine, settings, scene["id"], sql=first_sql)
    r1, r2 = console_client(app, "reviewer1"), console_client(app, "reviewer2")
    assert post_form(r1, f"/results/{first['id']}/review", {"decision": "release", "reason": "ok"}).status_code == 303
    second = held_result(client, auth, engine, settings, scene["id"], sql=second_sql)
    rid = second["id"]
    # the differencing check's cells: the earlier result, linked, and by how many persons
    for lang, words in (("zh", "相差 1 人"), ("en", "by 1 persons")):
        page = console_client(app, "reviewer1", lang=lang).get(f"{CONSOLE}/results/{rid}").text
        assert MISSING_MARK not in page
        row = page.split('data-check="differencing"')[1].split("</tr>")[0]
        assert f'data-diff-result="{first["id"]}"' in row and f'href="/console/results/{first["id"]}"' in row
        assert words in row and 'class="diff-region"' in row
    page = r1.get(f"{CONSOLE}/results/{rid}").text
    assert 'data-needs-override="true"' in page and 'data-overrides="0" data-required="2"' in page
    assert re.search(r'id="override"\s+required', page) and 'id="release"' in page
    assert 'id="override-count">已覆盖 0 / 2<' in page
    # a plain release is refused, naming the check; nothing changes
    r = post_form(r1, f"/results/{rid}/review", {"decision": "release", "reason": "fine"})
    assert r.status_code == 409 and "release_needs_override" in r.text and "<code>differencing</code>" in r.text
    assert "Traceback" not in r.text and _status_of(client, auth, rid) == "held"
    assert post_form(r1, f"/results/{rid}/review", {"decision": "release", "reason": "x",
                                                     "override": "maybe"}).status_code == 422
    # one override leaves it held; the page says so; a second reviewer's override releases it
    before = count(engine)
    r = post_form(r1, f"/results/{rid}/review", {"decision": "release", "reason": "one day's visit is public",
                                                  "override": "1"})
    assert r.status_code == 303 and _event_of(engine, r).detail == {"decision": "release", "override": True}
    with Session(engine) as s:
        decided = s.exec(select(AuditEvent).where(AuditEvent.seq > before, AuditEvent.action == "result.release")).one()
    assert decided.detail["override"] is True and decided.detail["overridden"] == ["differencing"]
    assert decided.detail["status"] == "held"
    assert 'id="override-count">已覆盖 1 / 2<' in r2.get(f"{CONSOLE}/results/{rid}").text
    assert post_form(r2, f"/results/{rid}/review", {"decision": "release", "reason": "ok"}).status_code == 409
    r = post_form(r2, f"/results/{rid}/review", {"decision": "release", "reason": "second pair of eyes",
                                                  "override": "1"})
    assert r.status_code == 303 and _status_of(client, auth, rid) == "released"
    # the lineage: overrides and the checks they overrode for staff, not for the tenant
    page = console_client(app, "auditor1", lang="en").get(f"{CONSOLE}/results/{rid}/lineage").text
    assert page.count('data-override="true"') == 2 and "overrode failing checks: differencing" in page
    assert "reviewer2 · override" in page                           # the graph's review node
    theirs = console_client(app, "insurer_a").get(f"{CONSOLE}/results/{rid}/lineage").text
    assert "data-override=" not in theirs and "differencing" not in theirs and "覆盖" not in theirs
    assert "second pair of eyes" not in theirs and "reviewer2" not in theirs   # no review but a rejection's


# By default on SQLite only (a page over the same service, whose API path runs on both backends).
@pytest.mark.default_backend("sqlite")
def test_a_failed_run_offers_no_release_in_the_console(app, client, auth, engine, settings, loaded, monkeypatch):
    import duckdb

    import sandbox.engine.execute

    scene = active_scene(client, auth)
    r = client.post(f"/api/v1/scenes/{scene['id']}/queries", headers=auth("insurer_a"),
                    json={"sql": BY_DISTRICT, "mode": "prod", "epsilon": 0.3})
    assert r.status_code == 202

    def failing_on_a_row(*args, **kwargs):
        raise duckdb.ConversionException("Could not convert string '兴庆区' to INT32")

    monkeypatch.setattr(sandbox.engine.execute, "domain_connection", failing_on_a_row)
    assert work_once(engine, settings)
    rid = client.get(f"/api/v1/queries/{r.json()['id']}", headers=auth("insurer_a")).json()["result_id"]
    reviewer = console_client(app, "reviewer1")
    page = reviewer.get(f"{CONSOLE}/results/{rid}").text
    assert 'id="review-box"' in page and 'data-failed-run="true"' in page
    assert 'id="release"' not in page and 'id="override"' not in page and 'id="reject-result"' in page
    # the tenant sees a held answer like any other: no word of a failure
    tenant = console_client(app, "insurer_a").get(f"{CONSOLE}/results/{rid}").text
    assert "release-rule" not in tenant and "兴庆区' to" not in tenant and "在域内失败" not in tenant
    for body in ({"decision": "release", "reason": "x"}, {"decision": "release", "reason": "x", "override": "1"}):
        r = post_form(reviewer, f"/results/{rid}/review", body)
        assert r.status_code == 409 and "failed_run_not_releasable" in r.text
    assert _status_of(client, auth, rid) == "held"
    assert post_form(reviewer, f"/results/{rid}/review", {"decision": "reject", "reason": "nothing to release"}
                     ).status_code == 303
    assert _status_of(client, auth, rid) == "rejected"


# By default on SQLite only (a page over the same service, whose API path runs on both backends).
@pytest.mark.default_backend("sqlite")
def test_the_owner_claims_an_api_key_in_the_console_and_sees_it_once(app, client, auth, engine):
    operator = console_client(app, "operator1")
    page = operator.get(f"{CONSOLE}/api-keys").text
    assert 'id="grant-form"' in page and MISSING_MARK not in page
    # CSRF on the grant; a key for the office is refused as on the API
    assert operator.post(f"{CONSOLE}/api-keys", data={"username": "insurer_a"}).status_code == 403
    r = post_form(operator, "/api-keys", {"username": "office1", "label": "x"})
    assert r.status_code == 422 and "api_key_role" in r.text
    before = count(engine)
    r = post_form(operator, "/api-keys", {"username": "insurer_a", "label": "nightly batch", "valid_days": "30"})
    assert r.status_code == 303
    ev = _event_of(engine, r)
    assert (ev.action, ev.actor, ev.object) == ("api_key.issue", "operator1", "user:insurer_a")
    assert count(engine) - before == 2                   # and the grant's own `api_key.granted`
    key_id = int(r.headers["location"].rsplit("=", 1)[1])
    page = operator.get(r.headers["location"]).text
    assert 'id="key-granted"' in page and f'data-key="{key_id}" data-status="pending"' in page
    # the owner's page offers the claim; nobody else may claim it
    tenant = console_client(app, "insurer_a")
    page = tenant.get(f"{CONSOLE}/api-keys").text
    assert f'id="claim-{key_id}"' in page and "nightly batch" in page
    assert f'id="claim-password-{key_id}"' in page and 'type="password" name="password"' in page
    assert 'id="grant-form"' not in page
    pw = {"password": DEMO_PASSWORD}
    assert post_form(console_client(app, "insurer_b"), f"/api-keys/{key_id}/claim", pw).status_code == 404
    assert f'data-key="{key_id}"' not in console_client(app, "insurer_b").get(f"{CONSOLE}/api-keys").text
    r = post_form(operator, f"/api-keys/{key_id}/claim", pw)
    assert r.status_code == 403 and "role_not_permitted" in r.text
    assert tenant.post(f"{CONSOLE}/api-keys/{key_id}/claim", data=pw).status_code == 403       # no CSRF token
    # the session cookie alone claims nothing (review r2, finding 3): the password, typed again,
    # is checked and a wrong one counts like a failed login
    r = post_form(tenant, f"/api-keys/{key_id}/claim")
    assert r.status_code == 422 and "password_required" in r.text
    r = post_form(tenant, f"/api-keys/{key_id}/claim", {"password": "not-my-password"})
    assert r.status_code == 403 and "wrong_password" in r.text and 'id="claimed-key"' not in r.text
    from tests.conftest import throttle

    assert throttle(engine, "insurer_a").failures == 1
    # the claim: the key once, on an answer nobody stores
    before = count(engine)
    r = post_form(tenant, f"/api-keys/{key_id}/claim", pw)
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    key = re.search(r'id="claimed-key"[^>]*>([^<]+)<', r.text).group(1)
    assert key.startswith("pdao_") and len(key) > 40 and MISSING_MARK not in r.text
    secret = key.split("_", 2)[2]             # pdao_<prefix>_<secret>: the prefix alone is metadata
    assert len(secret) >= 40
    me = client.get("/api/v1/me", headers={"X-API-Key": key})
    assert me.status_code == 200 and me.json()["username"] == "insurer_a"
    with Session(engine) as s:
        events = s.exec(select(AuditEvent).where(AuditEvent.seq > before)).all()
    assert {e.action for e in events} >= {"api_key.claim", "api_key.claimed"}
    assert all(secret not in str(e.detail) for e in events)
    assert DEMO_PASSWORD not in str([e.model_dump() for e in events])
    # a second claim (a reload) is refused and shows no key
    r = post_form(tenant, f"/api-keys/{key_id}/claim", pw)
    assert r.status_code == 409 and "api_key_claimed" in r.text and secret not in r.text
    # no page shows the key again, to the owner or the operator; the operator sees metadata
    for c in (tenant, operator):
        page = c.get(f"{CONSOLE}/api-keys").text
        assert secret not in page
        assert f'data-key="{key_id}" data-status="active"' in page
    # the owner revokes it: it stops working at once
    assert post_form(tenant, f"/api-keys/{key_id}/revoke").status_code == 303
    assert client.get("/api/v1/me", headers={"X-API-Key": key}).status_code == 401
    assert 'data-status="revoked"' in operator.get(f"{CONSOLE}/api-keys").text
    # the operator revokes a pending grant of a provider; the provider sees it revoked
    r = post_form(operator, "/api-keys", {"username": "provider1"})
    pid = int(r.headers["location"].rsplit("=", 1)[1])
    assert post_form(console_client(app, "insurer_a"), f"/api-keys/{pid}/revoke").status_code == 404
    assert post_form(operator, f"/api-keys/{pid}/revoke").status_code == 303
    provider = console_client(app, "provider1", lang="en").get(f"{CONSOLE}/api-keys").text
    assert f'data-key="{pid}" data-status="revoked"' in provider and f'id="claim-{pid}"' not in provider
    assert MISSING_MARK not in provider


# By default on SQLite only (a page over the same service, whose API path runs on both backends).
@pytest.mark.default_backend("sqlite")
def test_the_office_sees_company_budgets_with_the_warning_and_sets_a_cap(app, client, auth, engine, settings,
                                                                        loaded):
    """Two scenes of company_a on one dataset could spend ε 12 against the company's default cap of
    10: the office sees the warning beside the approve form, and may raise the cap."""
    from tests.test_export_review import BY_DISTRICT_FEES

    live = active_scene(client, auth, budget_epsilon=6.0)
    asking = create(client, auth("insurer_a"), budget_epsilon=6.0)
    client.post(f"/api/v1/scenes/{asking['id']}/submit", headers=auth("insurer_a"))
    office = console_client(app, "office1")
    page = office.get(f"{CONSOLE}/scenes/{asking['id']}").text
    row = page.split('data-budget="health.outpatient_visit"')[1].split("</tr>")[0]
    assert 'data-source="default"' in row and "ε 10 " in row and "默认值" in row
    assert f'data-other-scene="{live["id"]}"' in row and "ε 6" in row          # the other live scene, linked
    assert 'class="this-left">ε 6<' in row
    form = page.split('id="review-form"')[1].split("</form>")[0]
    assert 'class="alert warn review-budget-warning" data-warning="health.outpatient_visit"' in form
    assert "超过该单位在数据集 health.outpatient_visit 上剩余的 ε=10" in form
    en = console_client(app, "office1", lang="en").get(f"{CONSOLE}/scenes/{asking['id']}").text
    assert "more than the ε=10 left of the company&#39;s cap" in en and MISSING_MARK not in en
    assert 'data-cap-form="company_a/health.outpatient_visit"' in page
    # the office raises the cap from the scene page: the API's route, its audit event, back to the page
    before = count(engine)
    r = post_form(office, "/budgets/company_a/health.outpatient_visit",
                  {"epsilon": "20", "reason": "two scenes approved", "next": f"{CONSOLE}/scenes/{asking['id']}"})
    assert r.status_code == 303 and r.headers["location"] == f"{CONSOLE}/scenes/{asking['id']}"
    ev = _event_of(engine, r)
    assert ev.action == "budget.write" and ev.detail["epsilon_cap"] == [10.0, 20.0]
    with Session(engine) as s:
        cap_set = s.exec(select(AuditEvent).where(AuditEvent.seq > before, AuditEvent.action == "budget.cap_set")).one()
    assert cap_set.actor == "office1" and cap_set.reason == "two scenes approved"
    page = office.get(f"{CONSOLE}/scenes/{asking['id']}").text
    row = page.split('data-budget="health.outpatient_visit"')[1].split("</tr>")[0]
    assert 'data-source="office"' in row and "office1" in row
    assert 'data-warning="health.outpatient_visit"' not in page and 'data-warning="health.resident"' in page
    # refusals: not a number, another site, below what is spent
    assert post_form(office, "/budgets/company_a/health.outpatient_visit", {"epsilon": "lots"}).status_code == 422
    assert office.post(f"{CONSOLE}/budgets/company_a/health.outpatient_visit",
                       data={"epsilon": "1"}).status_code == 403
    held_result(client, auth, engine, settings, live["id"], sql=BY_DISTRICT_FEES, epsilon=0.5)
    r = post_form(office, "/budgets/company_a/health.outpatient_visit", {"epsilon": "0.1"})
    assert r.status_code == 409 and "cap_below_spent" in r.text
    # the tenant: its own company's budgets on the scene and the workbench, no cap form; others 403/404
    tenant = console_client(app, "insurer_a")
    page = tenant.get(f"{CONSOLE}/scenes/{live['id']}").text
    assert 'id="company-budgets"' in page and "data-cap-form" not in page
    home = tenant.get(f"{CONSOLE}/").text
    gauge = home.split('class="company-budget" data-budget="health.outpatient_visit"')[1].split("</div>")[0]
    assert "ε 20" in gauge and "已用 ε 0.5" in gauge and 'class="chart gauge"' in gauge
    r = post_form(tenant, "/budgets/company_a/health.outpatient_visit", {"epsilon": "100"})
    assert r.status_code == 403 and "role_not_permitted" in r.text
    other = console_client(app, "insurer_b")
    assert "company_a" not in other.get(f"{CONSOLE}/budgets").text
    assert other.get(f"{CONSOLE}/budgets", params={"org": "company_a"}).status_code == 200
    auditor = console_client(app, "auditor1").get(f"{CONSOLE}/budgets").text
    assert 'data-budget="company_a/health.outpatient_visit"' in auditor and "data-cap-form" not in auditor
    assert 'id="company-budgets"' not in console_client(app, "reviewer1").get(f"{CONSOLE}/scenes/{live['id']}").text


# By default on SQLite only (a page over the same service, whose API path runs on both backends).
@pytest.mark.default_backend("sqlite")
def test_link_pseudonyms_round_trips_from_the_application_form(app, client, auth):
    tenant = console_client(app, "insurer_a")
    form = tenant.get(f"{CONSOLE}/scenes/new").text
    assert 'name="link_pseudonyms"' in form and "两次结果无法按人对应" in form
    base = {"title": "理赔核验", "purpose": "claims", "scene_type": "claims", "valid_from": today().isoformat(),
            "valid_to": (today() + timedelta(days=30)).isoformat(), "budget_epsilon": "3",
            "max_query_epsilon": "0.5", "legal_basis": "PIPL art. 13", "emergency_plan": "suspend",
            "items": "health.outpatient_visit.district group_by\nhealth.outpatient_visit.fee aggregate"}
    ids = {}
    for linked, value in ((True, "1"), (False, None)):
        r = post_form(tenant, "/scenes", {**base, **({"link_pseudonyms": value} if value else {})})
        assert r.status_code == 303, r.text
        ids[linked] = int(r.headers["location"].rsplit("/", 1)[1])
        assert client.get(f"/api/v1/scenes/{ids[linked]}", headers=auth("insurer_a")).json()["link_pseudonyms"] \
            is linked
        page = tenant.get(r.headers["location"]).text
        assert f'id="link-pseudonyms" data-linked="{str(linked).lower()}"' in page
    r = post_form(tenant, "/scenes", {**base, "link_pseudonyms": "maybe"})
    assert r.status_code == 422 and "bad_checkbox" in r.text
    # the office sees it when it reviews
    assert post_form(tenant, f"/scenes/{ids[True]}/submit").status_code == 303
    page = console_client(app, "office1", lang="en").get(f"{CONSOLE}/scenes/{ids[True]}").text
    assert 'id="review-linked"' in page and "would join on a person" in page and MISSING_MARK not in page


# By default on sqlite only (pages over query_out; the API's on PostgreSQL: tests/test_query_jobs.py::test_the_heartbeat_interrupts_the_engine_on_cancel_and_at_the_time_limit).
@pytest.mark.default_backend("sqlite")
def test_a_waiting_dev_query_says_so_and_a_prod_runs_progress_stays_hidden(app, client, auth, engine, settings,
                                                                          loaded):
    from sandbox.results.models import Query
    from sandbox.worker import claim

    scene = active_scene(client, auth)
    first = client.post(f"/api/v1/scenes/{scene['id']}/queries", headers=auth("insurer_a"),
                        json={"sql": BY_DISTRICT, "mode": "dev"}).json()
    with Session(engine) as s:    # as if the first were still running: the next one waits for it
        s.get(Query, first["id"]).status = "queued"
        s.commit()
        assert claim(s, settings, "busy", mode="dev").id == first["id"]
    tenant = console_client(app, "insurer_a")
    r = post_form(tenant, f"/scenes/{scene['id']}/queries", {"sql": BY_DISTRICT, "mode": "dev"})
    assert r.status_code == 303
    page = tenant.get(r.headers["location"]).text
    assert 'data-status="queued"' in page and 'id="query-waiting"' in page and "开发查询仍在排队" in page
    assert f'id="refresh-waiting" href="{r.headers["location"]}"' in page and "<script" not in page
    # a prod run: its tenant sees neither progress nor attempts; staff do
    prod = client.post(f"/api/v1/scenes/{scene['id']}/queries", headers=auth("insurer_a"),
                       json={"sql": BY_DISTRICT, "mode": "prod", "epsilon": 0.3}).json()
    with Session(engine) as s:
        q = s.get(Query, prod["id"])
        q.status, q.progress, q.attempts = "running", 0.3737, 2
        s.commit()
    for path in (f"/queries/{prod['id']}", "/queries", f"/scenes/{scene['id']}", "/"):
        page = tenant.get(f"{CONSOLE}{path}").text
        assert "37.4" not in page and "0.3737" not in page, path
    page = tenant.get(f"{CONSOLE}/queries/{prod['id']}").text
    assert "<dd>—</dd>" in page.split("进度")[1][:30] and 'id="query-waiting"' in page
    assert "37.4%" in console_client(app, "office1").get(f"{CONSOLE}/queries/{prod['id']}").text
