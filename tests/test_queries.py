"""Queries through HTTP: dev answers at once on the twin; prod queries are jobs that reserve ε,
run in a worker, are charged once and held for export review; refusals are clear and change nothing."""

from __future__ import annotations

import pytest
from sqlmodel import Session, select

from policies.enforcer import SceneEnforcers
from sandbox.budgets import ledger
from sandbox.results.models import Query
from sandbox.worker import run_one, worker_name
from tests.scene_helpers import BY_DISTRICT, DISTRICTS, SCENE_ITEMS, VISITS, active_scene, budget


def work_once(engine, settings):
    return run_one(engine, settings, SceneEnforcers(engine), worker_name())


def test_dev_query_answers_at_once_on_the_twin_and_spends_nothing(client, auth, loaded):
    scene = active_scene(client, auth)
    r = client.post(f"/api/v1/scenes/{scene['id']}/queries", headers=auth("insurer_a"),
                    json={"sql": BY_DISTRICT, "mode": "dev", "epsilon": 0.5})
    assert r.status_code == 202, r.text
    q = r.json()
    assert q["status"] == "done" and q["synthetic"] is True and q["result_id"]
    res = client.get(f"/api/v1/results/{q['result_id']}", headers=auth("insurer_a")).json()
    assert res["synthetic"] is True and res["cells_visible"] is True and "synthetic" in res["notice"]
    assert [c["name"] for c in res["columns"]] == ["district", "n", "total", "mean", "mean_error95"]
    # every district of the public domain, in the noisy order asked for
    assert len(res["rows"]) == 6 and [r["n"] for r in res["rows"]] == sorted((r["n"] for r in res["rows"]), reverse=True)
    assert res["noise"]["n"]["scale"] == pytest.approx(10 * 3 / 0.5)   # k=10, ε split over 3 aggregates
    assert res["noise"]["n"]["error95"] > 0
    b = budget(client, auth, scene["id"])
    assert b["epsilon_spent"] == 0
    # another tenant sees nothing of it
    assert client.get(f"/api/v1/results/{q['result_id']}", headers=auth("insurer_b")).status_code == 404
    assert client.get(f"/api/v1/queries/{q['id']}", headers=auth("insurer_b")).status_code == 404


def test_prod_query_reserves_runs_in_a_worker_is_charged_once_and_held(client, auth, engine, settings, loaded):
    scene = active_scene(client, auth)
    r = client.post(f"/api/v1/scenes/{scene['id']}/queries", headers=auth("insurer_a"),
                    json={"sql": BY_DISTRICT, "mode": "prod", "epsilon": 0.5})
    assert r.status_code == 202, r.text
    q = r.json()
    assert q["status"] == "queued" and q["result_id"] is None
    assert budget(client, auth, scene["id"])["epsilon_spent"] == pytest.approx(0.5)   # reserved
    assert work_once(engine, settings)
    q = client.get(f"/api/v1/queries/{q['id']}", headers=auth("insurer_a")).json()
    assert q["status"] == "held" and q["progress"] == 1 and q["epsilon_spent"] == pytest.approx(0.5)
    res = client.get(f"/api/v1/results/{q['result_id']}", headers=auth("insurer_a")).json()
    assert res["status"] == "held" and res["cells_visible"] is False and res["rows"] is None
    assert res["synthetic"] is False and res["row_count"] == 6
    assert client.get(f"/api/v1/results/{q['result_id']}/download", headers=auth("insurer_a")).status_code == 403
    with Session(engine) as s:
        entries = ledger.entries(s, scene["id"])
    assert [(e.state, e.epsilon) for e in entries] == [("charged", 0.5)]
    assert budget(client, auth, scene["id"])["epsilon_spent"] == pytest.approx(0.5)
    assert not work_once(engine, settings)   # nothing left to run


def test_preview_reports_cost_and_error_and_spends_nothing(client, auth, loaded):
    scene = active_scene(client, auth)
    r = client.post(f"/api/v1/scenes/{scene['id']}/queries/preview", headers=auth("insurer_a"),
                    json={"sql": BY_DISTRICT, "mode": "prod", "epsilon": 0.3})
    assert r.status_code == 200, r.text
    p = r.json()
    assert p["epsilon_cost"] == 0.3 and p["cells"] == 6 and p["budget"]["affordable"] is True
    assert p["aggregates"]["n"]["error95"] > 0 and p["aggregates"]["total"]["scale"] > 0
    assert budget(client, auth, scene["id"])["epsilon_spent"] == 0


# The refusal comes from the SQL checker, before anything is written: every case on SQLite, the first
# on PostgreSQL too (the others there in `make test-slow`).
_CHECKER_ONLY = pytest.mark.default_backend("sqlite")


@pytest.mark.parametrize("sql, code, needle", [
    (f"SELECT hospital, COUNT(*) FROM {VISITS} GROUP BY hospital", "query_refused", "group_by"),
    pytest.param(f"SELECT district, COUNT(*) FROM {VISITS} WHERE icd10 = 'I10' GROUP BY district", "query_refused",
                 "filter", marks=_CHECKER_ONLY),
    pytest.param(f"SELECT * FROM {VISITS}", "query_refused", "SELECT *", marks=_CHECKER_ONLY),
    pytest.param(f"SELECT district, COUNT(*) FROM {VISITS} GROUP BY district; DROP TABLE scene", "query_refused",
                 "one statement", marks=_CHECKER_ONLY),
    pytest.param(f"SELECT fee FROM {VISITS}", "query_refused", "masked_output", marks=_CHECKER_ONLY),
])
def test_refusals_name_the_construct_and_change_nothing(client, auth, loaded, sql, code, needle):
    scene = active_scene(client, auth)
    r = client.post(f"/api/v1/scenes/{scene['id']}/queries", headers=auth("insurer_a"),
                    json={"sql": sql, "mode": "prod", "epsilon": 0.5})
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["code"] == code and body["message_zh"] and needle in r.text
    assert budget(client, auth, scene["id"])["epsilon_spent"] == 0
    assert client.get(f"/api/v1/scenes/{scene['id']}/queries", headers=auth("insurer_a")).json() == []


def test_who_may_query(client, auth, loaded):
    scene = active_scene(client, auth)
    body = {"sql": BY_DISTRICT, "mode": "dev"}
    url = f"/api/v1/scenes/{scene['id']}/queries"
    assert client.post(url, headers=auth("insurer_b"), json=body).status_code == 404     # another tenant
    assert client.post(url, headers=auth("office1"), json=body).status_code == 403       # not an applicant
    assert client.post(url, json=body).status_code == 401
    r = client.post(f"/api/v1/scenes/{scene['id']}/suspend", headers=auth("office1"), json={"reason": "check"})
    assert r.status_code == 200
    r = client.post(url, headers=auth("insurer_a"), json=body)
    assert r.status_code == 409 and r.json()["code"] == "scene_not_active"


def test_over_budget_and_over_cap_are_refused(client, auth, loaded):
    scene = active_scene(client, auth, budget_epsilon=1.0, max_query_epsilon=0.6)
    url = f"/api/v1/scenes/{scene['id']}/queries"
    r = client.post(url, headers=auth("insurer_a"), json={"sql": BY_DISTRICT, "mode": "prod", "epsilon": 0.7})
    assert r.status_code == 422 and r.json()["code"] == "epsilon_above_query_cap"
    assert client.post(url, headers=auth("insurer_a"), json={"sql": BY_DISTRICT, "mode": "prod",
                                                             "epsilon": 0.6}).status_code == 202
    r = client.post(url, headers=auth("insurer_a"), json={"sql": BY_DISTRICT, "mode": "prod", "epsilon": 0.6})
    assert r.status_code == 429 and r.json()["code"] == "budget_exhausted"
    assert len(client.get(f"{url}", headers=auth("insurer_a")).json()) == 1


def test_a_literal_of_the_wrong_type_is_refused_at_submission(client, auth, engine, loaded):
    # DuckDB would cast district row by row and fail only if a row passed the other conditions:
    # the failure would tell whether such a row exists. Refused before anything runs.
    scene = active_scene(client, auth, items=SCENE_ITEMS + [{"dataset": VISITS, "field": "district", "usage": "filter"}])
    sql = f"SELECT COUNT(*) AS n FROM {VISITS} WHERE visit_date >= DATE '2018-01-01' AND district = 5"
    r = client.post(f"/api/v1/scenes/{scene['id']}/queries", headers=auth("insurer_a"),
                    json={"sql": sql, "mode": "prod", "epsilon": 0.2})
    assert r.status_code == 422 and r.json()["code"] == "query_refused", r.text
    assert "number literal for health.outpatient_visit.district" in r.text
    assert budget(client, auth, scene["id"])["epsilon_spent"] == 0
    with Session(engine) as s:
        assert ledger.entries(s, scene["id"]) == [] and s.exec(select(Query)).all() == []


def test_a_job_failing_in_the_engine_is_held_and_charged_and_never_shows_engine_text(client, auth, engine, settings,
                                                                                     loaded, monkeypatch):
    """A prod run that fails while reading the data looks like any held answer to its tenant and is
    charged like one (tests/test_outcomes.py: the whole tenant view compared with a successful run)."""
    import duckdb

    import sandbox.engine.execute

    scene = active_scene(client, auth)
    r = client.post(f"/api/v1/scenes/{scene['id']}/queries", headers=auth("insurer_a"),
                    json={"sql": BY_DISTRICT, "mode": "prod", "epsilon": 0.2})
    assert r.status_code == 202, r.text

    def broken(*args, **kwargs):
        raise duckdb.IOException(f"Could not read file: {DISTRICTS[0]}")   # engine text that names a value

    monkeypatch.setattr(sandbox.engine.execute, "domain_connection", broken)
    assert work_once(engine, settings)
    q = client.get(f"/api/v1/queries/{r.json()['id']}", headers=auth("insurer_a")).json()
    assert q["status"] == "held" and q["error"] is None and q["result_id"], q
    res = client.get(f"/api/v1/results/{q['result_id']}", headers=auth("insurer_a")).json()
    for seen in (q, res, client.get(f"/api/v1/results/{q['result_id']}", headers=auth("reviewer1")).json()):
        assert "Could not" not in str(seen) and not any(d in str(seen) for d in DISTRICTS)
    assert budget(client, auth, scene["id"])["epsilon_spent"] == pytest.approx(0.2)
    with Session(engine) as s:
        assert [e.state for e in ledger.entries(s, scene["id"])] == ["charged"]


def test_a_held_row_level_answer_hides_its_size_from_the_tenant(client, auth, engine, settings, loaded):
    items = SCENE_ITEMS + [{"dataset": VISITS, "field": "person_id", "usage": "masked_output"}]
    scene = active_scene(client, auth, items=items)
    q = client.post(f"/api/v1/scenes/{scene['id']}/queries", headers=auth("insurer_a"),
                    json={"sql": f"SELECT person_id FROM {VISITS} WHERE visit_date >= DATE '2025-06-01'",
                          "mode": "prod"}).json()
    assert q["status"] == "queued" and q["epsilon"] == 0
    assert work_once(engine, settings)
    rid = client.get(f"/api/v1/queries/{q['id']}", headers=auth("insurer_a")).json()["result_id"]
    mine = client.get(f"/api/v1/results/{rid}", headers=auth("insurer_a")).json()
    assert mine["status"] == "held" and mine["rows"] is None and mine["row_count"] is None and mine["notes"] == []
    review = client.get(f"/api/v1/results/{rid}", headers=auth("reviewer1")).json()
    # the reviewer sees what would go out (masked), to review it
    assert review["row_count"] > 0 and review["rows"] is not None and len(review["rows"]) == review["row_count"]


def test_cancel_a_queued_query_refunds(client, auth, engine, loaded):
    scene = active_scene(client, auth)
    q = client.post(f"/api/v1/scenes/{scene['id']}/queries", headers=auth("insurer_a"),
                    json={"sql": BY_DISTRICT, "mode": "prod", "epsilon": 0.4}).json()
    assert client.post(f"/api/v1/queries/{q['id']}/cancel", headers=auth("insurer_b")).status_code == 404
    r = client.post(f"/api/v1/queries/{q['id']}/cancel", headers=auth("insurer_a"))
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert budget(client, auth, scene["id"])["epsilon_spent"] == 0
    r = client.post(f"/api/v1/queries/{q['id']}/cancel", headers=auth("insurer_a"))
    assert r.status_code == 409 and r.json()["code"] == "query_finished"
    with Session(engine) as s:
        assert s.exec(select(Query.status)).all() == ["cancelled"]
