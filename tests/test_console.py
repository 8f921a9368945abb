"""The web console without a browser (TestClient through the real app): the login cookie carries the
API's token, the same casbin checks refuse the same things, forms need the CSRF token, every console
request is one audit event like an API request, every page renders in Chinese and English, and no
page shows a cell to a role that may not see it."""

from __future__ import annotations

import re
from datetime import timedelta

from sqlmodel import Session, select

from api.console.i18n import MESSAGES, VALUES
from pdao.audit import AuditEvent
from sandbox.models import QueryResult
from tests.console_support import CONSOLE, MISSING_MARK, console_client, csrf_of, post_form
from tests.conftest import DEMO_PASSWORD
from tests.scene_helpers import BY_DISTRICT, active_scene, create, today
from tests.test_audit_requests import count, the_one_event
from tests.test_export_review import BY_DISTRICT_FEES, held_result, review
from tests.test_queries import work_once


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
    assert ev.decision == "deny" and ev.actor == "insurer_a" and ev.action == "auth.login"
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
    assert c.get(f"{CONSOLE}/lang/en", params={"next": "//evil.example"}).headers["location"] == f"{CONSOLE}/"
    r = post_form(c, "/logout")
    assert r.status_code == 303 and "pdao_session" not in c.cookies
    assert c.get(f"{CONSOLE}/scenes").status_code == 303


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
    from sandbox.queries import read_table

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
    from pdao.identity.models import Role
    from policies.rules import Usage
    from policies.schemas import SceneType
    from policies.states import TRANSITIONS
    from sandbox.models import RESULT_STATES

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
                      f"/results/{res['id']}", f"/results/{res['id']}/lineage", "/audit"],
        "office1": ["/", f"/scenes/{scene['id']}", "/emergency-stop", "/audit", "/audit/alerts", "/audit/verify"],
        "reviewer1": ["/", "/reviews", f"/results/{res['id']}"],
        "auditor1": ["/", "/audit", "/audit/verify", "/audit/alerts", f"/results/{res['id']}/lineage", "/results",
                     "/no-such-page"],
        "provider1": ["/", "/catalog", "/scenes"],
        "operator1": ["/", "/results"],
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
