"""Helpers to drive scenes through HTTP in tests."""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any

from pdao.kernel.db import utcnow
from sandbox.scenes.states import today_in_city

SCENE_ITEMS = [
    {"dataset": "health.outpatient_visit", "field": "district", "usage": "group_by"},
    {"dataset": "health.outpatient_visit", "field": "fee", "usage": "aggregate"},
    {"dataset": "health.outpatient_visit", "field": "visit_date", "usage": "filter"},
    {"dataset": "health.resident", "field": "id_number", "usage": "join_key"},
]


VISITS = "health.outpatient_visit"
DISTRICTS = ("兴庆区", "金凤区", "西夏区", "永宁县", "贺兰县", "灵武市")   # its public domain, in order
BY_DISTRICT = (f"SELECT district, COUNT(*) AS n, SUM(fee) AS total, AVG(fee) AS mean FROM {VISITS} "
               "WHERE visit_date >= DATE '2018-01-01' GROUP BY district ORDER BY n DESC")


def budget(client, auth, scene_id: int, who: str = "insurer_a") -> dict:
    return client.get(f"/api/v1/scenes/{scene_id}", headers=auth(who)).json()["budget"]


def today() -> date:
    return today_in_city(utcnow())


def application(**over: Any) -> dict[str, Any]:
    body = {
        "title": "智能核保 — 慢病标识", "purpose": "underwriting with chronic disease flags",
        "scene_type": "underwriting", "legal_basis": "PIPL art. 13(1): the applicant's consent",
        "consent_approach": "signed authorization per applicant", "emergency_plan": "stop on leak; notify office",
        "valid_from": today().isoformat(), "valid_to": (today() + timedelta(days=180)).isoformat(),
        "budget_epsilon": 3.0, "budget_delta": 1e-6, "max_query_epsilon": 0.5,
        "items": [dict(i) for i in SCENE_ITEMS],
    }
    body.update(over)
    return body


def create(client, headers, **over) -> dict:
    r = client.post("/api/v1/scenes", json=application(**over), headers=headers)
    assert r.status_code == 201, r.text
    return r.json()


def approve(client, auth, scene_id: int, approvers=("office1", "office2"), struck=()) -> dict:
    body = None
    for i, who in enumerate(approvers):
        r = client.post(f"/api/v1/scenes/{scene_id}/reviews", headers=auth(who),
                        json={"decision": "approve", "struck_items": list(struck) if i == 0 else [], "comment": "ok"})
        assert r.status_code == 200, r.text
        body = r.json()
    return body


def active_scene(client, auth, applicant="insurer_a", **over) -> dict:
    s = create(client, auth(applicant), **over)
    r = client.post(f"/api/v1/scenes/{s['id']}/submit", headers=auth(applicant))
    assert r.status_code == 200, r.text
    return approve(client, auth, s["id"])
