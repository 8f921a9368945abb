"""The scene life cycle through HTTP: apply, review by two office members, enforce, suspend,
resume, revoke, expire, emergency stop."""

from __future__ import annotations

from datetime import timedelta

from sqlmodel import Session, select, update

from sandbox.scenes.models import Scene
from tests.scene_helpers import active_scene, application, approve, create, today


def explain(client, headers, sid, dataset="health.outpatient_visit", field="district", usage="group_by"):
    r = client.get(f"/api/v1/scenes/{sid}/explain", headers=headers,
                   params={"dataset": dataset, "field": field, "usage": usage})
    assert r.status_code == 200, r.text
    return r.json()


def test_two_approvals_make_a_scene_active_and_enforced(client, auth):
    a = auth("insurer_a")
    s = create(client, a)
    assert s["status"] == "draft" and s["effective_items"] == [] and len(s["items"]) == 4
    s = client.post(f"/api/v1/scenes/{s['id']}/submit", headers=a).json()
    assert s["status"] == "submitted" and s["round"] == 1
    first = client.post(f"/api/v1/scenes/{s['id']}/reviews", headers=auth("office1"),
                        json={"decision": "approve", "struck_items": [s["items"][3]["id"]], "comment": "no join"}).json()
    assert first["status"] == "submitted" and first["approvals"] == {"required": 2, "this_round": ["office1"]}
    again = client.post(f"/api/v1/scenes/{s['id']}/reviews", headers=auth("office1"), json={"decision": "approve"})
    assert again.status_code == 409 and again.json()["code"] == "already_reviewed"
    done = approve(client, auth, s["id"], approvers=("office2",))
    assert done["status"] == "active"
    assert {(i["field"], i["usage"]) for i in done["effective_items"]} == {
        ("district", "group_by"), ("fee", "aggregate"), ("visit_date", "filter")}
    assert explain(client, a, s["id"])["allowed"] is True
    struck = explain(client, a, s["id"], "health.resident", "id_number", "join_key")
    assert struck["allowed"] is False and struck["rule"] == "not_in_data_list"
    other_use = explain(client, a, s["id"], "health.outpatient_visit", "district", "filter")
    assert other_use["rule"] == "not_in_data_list"


def test_suspend_resume_revoke_take_effect_on_the_next_request(client, auth):
    a, o = auth("insurer_a"), auth("office1")
    sid = active_scene(client, auth)["id"]
    assert client.post(f"/api/v1/scenes/{sid}/suspend", headers=o, json={"reason": "audit"}).json()["status"] == "suspended"
    assert explain(client, a, sid)["rule"] == "scene_suspended"
    assert client.post(f"/api/v1/scenes/{sid}/resume", headers=o, json={}).json()["status"] == "active"
    assert explain(client, a, sid)["allowed"] is True
    r = client.post(f"/api/v1/scenes/{sid}/revoke", headers=o, json={"reason": "misuse"})
    assert r.json()["status"] == "revoked"
    assert explain(client, a, sid)["rule"] == "scene_revoked"
    r = client.post(f"/api/v1/scenes/{sid}/resume", headers=o, json={})
    assert r.status_code == 409 and r.json()["code"] == "wrong_state"
    history = [(e["action"], e["to_status"], e["actor"]) for e in client.get(f"/api/v1/scenes/{sid}", headers=o).json()["history"]]
    assert history[-3:] == [("suspend", "suspended", "office1"), ("resume", "approved", "office1"),
                            ("revoke", "revoked", "office1")]


def test_prohibited_and_identifier_misuse_refused_item_by_item(client, auth):
    a = auth("insurer_a")
    body = application(items=[
        {"dataset": "health.notifiable_disease", "field": "disease", "usage": "aggregate"},
        {"dataset": "health.resident", "field": "id_number", "usage": "group_by"},
        {"dataset": "health.resident", "field": "district", "usage": "group_by"},
    ], emergency_plan="  ")
    r = client.post("/api/v1/scenes", json=body, headers=a)
    assert r.status_code == 422 and r.json()["code"] == "scene_refused"
    rules = {(p["where"], p["rule"]) for p in r.json()["details"]}
    # a prohibited dataset is refused as unknown: a tenant cannot tell it from a missing one
    # (tests/test_org_visibility.py); the office's rule table still names it (policies/rules.py)
    assert rules == {("emergency_plan", "emergency_plan_required"), ("items[0]", "unknown_field"),
                     ("items[1]", "never:identifier:group_by")}
    assert client.get("/api/v1/scenes", headers=a).json() == []


def test_a_returned_application_cannot_smuggle_in_a_prohibited_dataset(client, auth):
    a = auth("insurer_a")
    s = create(client, a)
    client.post(f"/api/v1/scenes/{s['id']}/submit", headers=a)
    r = client.post(f"/api/v1/scenes/{s['id']}/reviews", headers=auth("office1"), json={"decision": "return",
                                                                                       "comment": "narrow it"})
    assert r.json()["status"] == "returned"
    bad = client.patch(f"/api/v1/scenes/{s['id']}", headers=a, json={"items": [
        {"dataset": "health.notifiable_disease", "field": "reported_on", "usage": "filter"}]})
    assert bad.status_code == 422 and bad.json()["details"][0]["rule"] == "unknown_field"
    kept = client.get(f"/api/v1/scenes/{s['id']}", headers=a).json()
    assert {i["dataset"] for i in kept["items"]} == {"health.outpatient_visit", "health.resident"}


def test_not_yet_valid_and_expired_without_any_job(client, auth, engine):
    a = auth("insurer_a")
    later = active_scene(client, auth, valid_from=(today() + timedelta(days=3)).isoformat(),
                         valid_to=(today() + timedelta(days=30)).isoformat())
    assert later["status"] == "approved" and explain(client, a, later["id"])["rule"] == "scene_approved"
    now = active_scene(client, auth)
    assert explain(client, a, now["id"])["allowed"] is True
    # time passes: the window ends yesterday (nothing runs; the next request simply sees it)
    with Session(engine) as s:
        s.exec(update(Scene).where(Scene.id == now["id"]).values(valid_from=today() - timedelta(days=10),
                                                                 valid_to=today() - timedelta(days=1)))
        s.commit()
    assert explain(client, a, now["id"])["rule"] == "scene_expired"
    got = client.get(f"/api/v1/scenes/{now['id']}", headers=a).json()
    assert got["status"] == "expired" and got["stored_status"] == "approved" and got["effective_items"] == []
    r = client.post(f"/api/v1/scenes/{now['id']}/suspend", headers=auth("office1"), json={})
    assert r.status_code == 409 and r.json()["details"]["status"] == "expired"


def test_validity_rules(client, auth):
    a = auth("insurer_a")
    past = client.post("/api/v1/scenes", headers=a, json=application(
        valid_from=(today() - timedelta(days=30)).isoformat(), valid_to=(today() - timedelta(days=1)).isoformat()))
    assert {p["rule"] for p in past.json()["details"]} == {"validity_in_past"}
    long = client.post("/api/v1/scenes", headers=a, json=application(valid_to=(today() + timedelta(days=400)).isoformat()))
    assert {p["rule"] for p in long.json()["details"]} == {"validity_too_long"}


def test_other_tenant_sees_nothing(client, auth):
    sid = active_scene(client, auth)["id"]
    b = auth("insurer_b")
    for method, path in [("get", "/api/v1/scenes/{}"), ("get", "/api/v1/scenes/{}/explain?dataset=a&field=b&usage=filter"),
                         ("post", "/api/v1/scenes/{}/submit"), ("patch", "/api/v1/scenes/{}")]:
        extra = {"json": {}} if method != "get" else {}
        r = getattr(client, method)(path.format(sid), headers=b, **extra)
        missing = getattr(client, method)(path.format(999999), headers=b, **extra)
        assert (r.status_code, r.json()) == (missing.status_code, missing.json()) == (404, r.json())
    assert client.get("/api/v1/scenes", headers=b).json() == []


def test_emergency_stop_by_dataset(client, auth):
    s1 = active_scene(client, auth)["id"]
    s2 = active_scene(client, auth, "insurer_b", items=[
        {"dataset": "health.inpatient_stay", "field": "district", "usage": "group_by"}])["id"]
    r = client.post("/api/v1/emergency-stop", headers=auth("office2"),
                    json={"dataset": "health.outpatient_visit", "reason": "suspected leak"})
    assert r.status_code == 200 and r.json() == {"suspended": [s1], "returned": []}
    assert client.get(f"/api/v1/scenes/{s2}", headers=auth("office1")).json()["status"] == "active"
    r = client.post("/api/v1/emergency-stop", headers=auth("office2"), json={"org": "company_b", "reason": "x"})
    assert r.json() == {"suspended": [s2], "returned": []}


def _principal(session, username):
    from pdao.kernel.identity.models import Organization, User
    from pdao.kernel.identity.service import _principal as make

    user = session.exec(select(User).where(User.username == username)).one()
    return make(user, session.get(Organization, user.org_id), "token")


def test_simultaneous_last_approvals_approve_exactly_once(client, auth, engine, settings):
    """Two office members approving at the same moment: the scene ends active, not stuck."""
    import threading

    from sandbox.scenes import service as svc
    from sandbox.scenes.schemas import ReviewIn

    for _ in range(3):
        a = auth("insurer_a")
        sid = create(client, a)["id"]
        client.post(f"/api/v1/scenes/{sid}/submit", headers=a)
        barrier, errors = threading.Barrier(2), []

        def approve_as(who):
            try:
                with Session(engine) as s:
                    p = _principal(s, who)
                    scene = s.get(Scene, sid)
                    barrier.wait()
                    svc.review(s, settings, p, scene, ReviewIn(decision="approve"))
                    s.commit()
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=approve_as, args=(w,)) for w in ("office1", "office2")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        got = client.get(f"/api/v1/scenes/{sid}", headers=a).json()
        assert got["status"] == "active", got["history"]
        assert [e["action"] for e in got["history"]].count("approve") == 1


def test_emergency_stop_ignores_struck_items(client, auth):
    a = auth("insurer_a")
    s = create(client, a)
    client.post(f"/api/v1/scenes/{s['id']}/submit", headers=a)
    join_item = next(i["id"] for i in s["items"] if i["dataset"] == "health.resident")
    approve(client, auth, s["id"], struck=[join_item])
    r = client.post("/api/v1/emergency-stop", headers=auth("office1"), json={"dataset": "health.resident", "reason": "x"})
    assert r.json() == {"suspended": [], "returned": []}


def test_the_applicants_own_organization_never_approves(client, auth, engine, settings):
    """Role-to-organization rules keep office members out of companies, so this is checked on the
    service itself: an office-role principal of the tenant organization is refused."""
    from dataclasses import replace

    import pytest

    from pdao.kernel.errors import PdaoError
    from sandbox.scenes import service as svc
    from sandbox.scenes.schemas import ReviewIn

    a = auth("insurer_a")
    sid = create(client, a)["id"]
    client.post(f"/api/v1/scenes/{sid}/submit", headers=a)
    with Session(engine) as s:
        scene = s.get(Scene, sid)
        insider = replace(_principal(s, "office1"), org_id=scene.org_id)
        with pytest.raises(PdaoError) as err:
            svc.review(s, settings, insider, scene, ReviewIn(decision="approve"))
    assert (err.value.status, err.value.code) == (403, "own_org_review")


def test_a_dataset_closed_after_approval_is_refused_at_once(client, auth):
    """Closing a dataset (禁止开放) takes effect on the next request, in every active scene."""
    from catalog.descriptor import PACKAGED_DESCRIPTORS

    a = auth("insurer_a")
    sid = active_scene(client, auth)["id"]
    assert explain(client, a, sid)["allowed"] is True
    text = (PACKAGED_DESCRIPTORS / "health.outpatient_visit.yaml").read_text(encoding="utf-8")
    closed = text.replace("opening_class: conditional", "opening_class: prohibited")
    r = client.post("/api/v1/datasets", content=closed.encode(),
                    headers={**auth("provider1"), "Content-Type": "application/yaml"})
    assert r.status_code == 200 and r.json()["action"] == "updated", r.text
    assert explain(client, a, sid)["rule"] == "prohibited_dataset"
    got = client.get(f"/api/v1/scenes/{sid}", headers=a).json()
    assert got["status"] == "active"
    assert {i["dataset"] for i in got["effective_items"]} == {"health.resident"}


def test_scene_requests_are_audited_with_their_scene(client, auth, engine):
    from pdao.kernel.audit import AuditEvent

    sid = active_scene(client, auth)["id"]
    for who, expected in (("insurer_a", 200), ("insurer_b", 404)):
        r = client.get(f"/api/v1/scenes/{sid}", headers=auth(who))
        assert r.status_code == expected
        with Session(engine) as s:
            ev = s.exec(select(AuditEvent).where(AuditEvent.request_id == r.headers["x-request-id"])).one()
        assert (ev.actor, ev.scene_id, ev.action) == (who, sid, "scene.read")
        assert ev.decision == ("allow" if expected == 200 else "deny")
    with Session(engine) as s:
        actions = [e.action for e in s.exec(select(AuditEvent).where(AuditEvent.scene_id == sid)
                                             .order_by(AuditEvent.seq)).all()]
    assert actions[:4] == ["scene.create", "scene.submit", "scene.review", "scene.review"]


def test_emergency_stop_returns_pending_applications_and_is_audited(client, auth, engine):
    """A scene waiting for its last approval cannot go live right after a stop."""
    from pdao.kernel.audit import AuditEvent

    a = auth("insurer_a")
    pending = create(client, a)["id"]
    client.post(f"/api/v1/scenes/{pending}/submit", headers=a)
    client.post(f"/api/v1/scenes/{pending}/reviews", headers=auth("office1"), json={"decision": "approve"})
    live = active_scene(client, auth)["id"]
    r = client.post("/api/v1/emergency-stop", headers=auth("office2"),
                    json={"dataset": "health.outpatient_visit", "reason": "suspected leak"})
    assert r.json() == {"suspended": [live], "returned": [pending]}
    late = client.post(f"/api/v1/scenes/{pending}/reviews", headers=auth("office2"), json={"decision": "approve"})
    assert late.status_code == 409 and late.json()["details"]["status"] == "returned"
    with Session(engine) as s:
        ev = s.exec(select(AuditEvent).where(AuditEvent.request_id == r.headers["x-request-id"])).one()
    assert ev.detail == {"suspended": [live], "returned": [pending]}


def test_an_approval_by_someone_since_disabled_does_not_count(client, auth, engine):
    from pdao.kernel.identity.service import set_active

    a = auth("insurer_a")
    sid = create(client, a)["id"]
    client.post(f"/api/v1/scenes/{sid}/submit", headers=a)
    client.post(f"/api/v1/scenes/{sid}/reviews", headers=auth("office1"), json={"decision": "approve"})
    o2 = auth("office2")
    with Session(engine) as s:
        set_active(s, "office1", False)
        s.commit()
    got = client.post(f"/api/v1/scenes/{sid}/reviews", headers=o2, json={"decision": "approve"}).json()
    assert got["status"] == "submitted" and got["approvals"]["this_round"] == ["office2"]


def test_review_decisions_are_in_the_audit(client, auth, engine):
    from pdao.kernel.audit import AuditEvent

    a = auth("insurer_a")
    s = create(client, a)
    client.post(f"/api/v1/scenes/{s['id']}/submit", headers=a)
    item = s["items"][0]["id"]
    r = client.post(f"/api/v1/scenes/{s['id']}/reviews", headers=auth("office1"),
                    json={"decision": "return", "struck_items": [item], "comment": "narrow it"})
    with Session(engine) as db:
        ev = db.exec(select(AuditEvent).where(AuditEvent.request_id == r.headers["x-request-id"])).one()
    assert (ev.action, ev.scene_id, ev.detail) == ("scene.review", s["id"], {"decision": "return", "struck_items": [item]})


def test_validity_must_start_today_or_within_ninety_days(client, auth):
    a = auth("insurer_a")
    back = client.post("/api/v1/scenes", headers=a, json=application(
        valid_from=(today() - timedelta(days=3)).isoformat()))
    assert {p["rule"] for p in back.json()["details"]} == {"validity_backdated"}
    far = client.post("/api/v1/scenes", headers=a, json=application(
        valid_from=(today() + timedelta(days=200)).isoformat(), valid_to=(today() + timedelta(days=300)).isoformat()))
    assert {p["rule"] for p in far.json()["details"]} == {"validity_starts_too_late"}
