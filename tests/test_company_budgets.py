"""Company budgets per dataset, across scenes (issue 13, finding 6): three identical scenes no
longer give a company three times the ε on the same data. Through HTTP, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import text
from sqlmodel import Session, select

from sandbox.budgets import ledger
from sandbox.results.models import Query
from tests.scene_helpers import BY_DISTRICT, VISITS, active_scene, approve, budget, create

RESIDENTS = "health.resident"


def prod_query(client, headers, scene_id: int, epsilon: float):
    return client.post(f"/api/v1/scenes/{scene_id}/queries", headers=headers,
                       json={"sql": BY_DISTRICT, "mode": "prod", "epsilon": epsilon})


def company_budget(client, auth, scene_id: int, dataset: str, who: str = "office1") -> dict:
    r = client.get(f"/api/v1/scenes/{scene_id}", headers=auth(who))
    assert r.status_code == 200, r.text
    return {b["dataset"]: b for b in r.json()["company_budgets"]}[dataset]


def budgets(client, headers, **params) -> dict[tuple[str, str], dict]:
    r = client.get("/api/v1/budgets", headers=headers, params=params)
    assert r.status_code == 200, r.text
    return {(b["org"], b["dataset"]): b for b in r.json()["items"]}


def test_three_identical_scenes_stop_at_the_company_cap(client, auth, engine, loaded):
    """The attack: insurer_a holds three identical scenes on the visits, ε 4 each (12 in all), against
    the default company cap of ε 10 on a dataset. Prod queries through all three stop at the cap
    with 429 company_budget_exhausted; a cancelled query credits the scene and the company;
    insurer_b's budget is its own; the office saw the overcommitment before approving."""
    a, b = auth("insurer_a"), auth("insurer_b")
    same = {"budget_epsilon": 4.0, "max_query_epsilon": 2.0}
    scenes = [active_scene(client, auth, **same)["id"] for _ in range(3)]
    b_scene = active_scene(client, auth, applicant="insurer_b", **same)["id"]

    # a fourth, identical application: the office sees, before approving, what the company could spend
    fourth = create(client, a, **same)["id"]
    assert client.post(f"/api/v1/scenes/{fourth}/submit", headers=a).status_code == 200
    seen = company_budget(client, auth, fourth, VISITS)
    assert (seen["org"], seen["source"], seen["epsilon_cap"], seen["epsilon_spent"], seen["epsilon_left"]) == \
        ("company_a", "default", 10.0, 0.0, 10.0)
    assert seen["this_scene_epsilon_left"] == 4.0 and seen["other_scenes_epsilon_left"] == 12.0
    assert [o["id"] for o in seen["other_scenes"]] == scenes   # insurer_b's scene is not company_a's
    assert "ε=16" in seen["warning"] and "ε=10" in seen["warning"] and "ε=16" in seen["warning_zh"]

    # the attack: two queries of ε 2 through each scene ask for 12
    answers = [prod_query(client, a, s, 2.0) for s in scenes for _ in range(2)]
    assert [r.status_code for r in answers] == [202] * 5 + [429], [r.text for r in answers]
    refused = answers[-1].json()
    assert refused["code"] == "company_budget_exhausted"
    assert refused["details"] == {**refused["details"], "dataset": VISITS, "epsilon_requested": 2.0,
                                  "epsilon_cap": 10.0}
    assert refused["details"]["epsilon_spent"] == pytest.approx(10.0)
    assert refused["details"]["epsilon_left"] == pytest.approx(0.0, abs=1e-9)
    assert VISITS in refused["message"] and "10" in refused["message"] and VISITS in refused["message_zh"]
    assert budget(client, auth, scenes[2])["epsilon_left"] == pytest.approx(2.0)   # the scene could pay: the cap stopped it
    with Session(engine) as s:    # the refusal wrote nothing
        assert len(s.exec(select(Query).where(Query.scene_id == scenes[2])).all()) == 1
        assert len(ledger.entries(s, scenes[2])) == 1
        reason = s.execute(text("SELECT reason, decision FROM audit_event WHERE status = 429")).all()
    assert reason == [("company_budget_exhausted", "deny")]

    # the office's view of the last scene: the cap is spent, and this scene's ε 2 left cannot be
    seen = company_budget(client, auth, scenes[2], VISITS)
    assert seen["epsilon_spent"] == pytest.approx(10.0) and seen["epsilon_left"] == pytest.approx(0.0, abs=1e-9)
    assert seen["this_scene_epsilon_left"] == pytest.approx(2.0) and seen["warning"]
    assert [(o["id"], o["epsilon_left"]) for o in seen["other_scenes"]] == [(scenes[0], 0.0), (scenes[1], 0.0)]
    resident = company_budget(client, auth, scenes[2], RESIDENTS)   # on the list, nothing read from it
    assert resident["epsilon_spent"] == 0 and resident["warning"] is None
    assert company_budget(client, auth, scenes[2], VISITS, who="insurer_a") == seen   # the tenant: its own facts

    # a cancelled query gives its ε back to its scene and to the company; the refused query now passes
    first = answers[0].json()["id"]
    assert client.post(f"/api/v1/queries/{first}/cancel", headers=a).json()["status"] == "cancelled"
    assert budget(client, auth, scenes[0])["epsilon_spent"] == pytest.approx(2.0)
    assert company_budget(client, auth, scenes[0], VISITS)["epsilon_spent"] == pytest.approx(8.0)
    assert prod_query(client, a, scenes[2], 2.0).status_code == 202
    assert prod_query(client, a, scenes[0], 2.0).json()["code"] == "company_budget_exhausted"

    # insurer_b's budget on the same dataset is untouched by all this, and its own queries pay from it
    untouched = budgets(client, auth("office1"), dataset=VISITS)[("company_b", VISITS)]
    assert (untouched["epsilon_spent"], untouched["epsilon_left"]) == (0.0, 10.0)
    assert prod_query(client, b, b_scene, 2.0).status_code == 202
    every = budgets(client, auth("office1"), dataset=VISITS)
    assert every[("company_a", VISITS)]["epsilon_spent"] == pytest.approx(10.0)
    assert every[("company_b", VISITS)]["epsilon_spent"] == pytest.approx(2.0)
    assert every[("company_b", VISITS)]["epsilon_left"] == pytest.approx(8.0)


# On PostgreSQL by default (SQLite in `make test-slow`): there the same race is run on the ledger by
# tests/test_ledger.py::test_parallel_reservations_across_scenes_never_overspend_the_company_cap[sqlite].
@pytest.mark.default_backend("postgresql")
def test_parallel_submissions_across_scenes_never_overspend_the_company_cap(client, auth, engine, loaded):
    scenes = [active_scene(client, auth, budget_epsilon=4.0, max_query_epsilon=1.0)["id"] for _ in range(3)]
    r = client.put(f"/api/v1/budgets/company_a/{VISITS}", headers=auth("office1"), json={"epsilon": 3.0})
    assert r.status_code == 200, r.text
    headers = auth("insurer_a")

    def submit(i: int) -> int:
        r = prod_query(client, headers, scenes[i % 3], 0.5)
        assert r.status_code == 202 or r.json()["code"] == "company_budget_exhausted", r.text
        return r.status_code

    with ThreadPoolExecutor(12) as pool:
        codes = list(pool.map(submit, range(12)))
    assert codes.count(202) == 6 and codes.count(429) == 6, codes
    assert company_budget(client, auth, scenes[0], VISITS)["epsilon_spent"] == pytest.approx(3.0)
    assert sum(budget(client, auth, s)["epsilon_spent"] for s in scenes) == pytest.approx(3.0)
    with Session(engine) as s:
        entries = [e for sid in scenes for e in ledger.entries(s, sid)]
        queued = s.exec(select(Query).where(Query.scene_id.in_(scenes))).all()
    assert len(entries) == 6 and len(queued) == 6 and {q.budget_entry_id for q in queued} == {e.id for e in entries}


def test_the_office_sets_a_cap_audited_never_below_what_is_spent(client, auth, engine, loaded):
    a, office = auth("insurer_a"), auth("office1")
    scene = active_scene(client, auth, budget_epsilon=4.0, max_query_epsilon=2.0)["id"]
    url = f"/api/v1/budgets/company_a/{VISITS}"

    for who in ("insurer_a", "auditor1", "reviewer1"):
        r = client.put(url, headers=auth(who), json={"epsilon": 50})
        assert (r.status_code, r.json()["code"]) == (403, "role_not_permitted"), who
    r = client.put(url, headers=office, json={"epsilon": 3, "reason": "three scenes, one purpose"})
    assert r.status_code == 200, r.text
    got = r.json()
    assert (got["source"], got["epsilon_cap"], got["delta_cap"], got["set_by"]) == ("office", 3.0, 1e-5, "office1")
    request_id = r.headers["X-Request-ID"]
    with Session(engine) as s:
        events = s.execute(text("SELECT action, object, reason, detail FROM audit_event WHERE request_id = :r "
                                "ORDER BY seq"), {"r": request_id}).all()
    assert [(e[0], e[1]) for e in events] == [("budget.cap_set", f"budget:company_a/{VISITS}"),
                                              ("budget.write", f"budget:company_a/{VISITS}")]
    assert events[0][2] == "three scenes, one purpose"
    detail = events[0][3] if isinstance(events[0][3], dict) else json.loads(events[0][3])
    assert detail == {"org": "company_a", "dataset": VISITS, "epsilon_cap": [10.0, 3.0], "delta_cap": [1e-5, 1e-5],
                      "epsilon_spent": 0.0, "delta_spent": 0.0}

    assert prod_query(client, a, scene, 2.0).status_code == 202
    r = prod_query(client, a, scene, 2.0)      # the scene has 2 left; the company's cap 1
    assert (r.status_code, r.json()["code"], r.json()["details"]["epsilon_cap"]) == (429, "company_budget_exhausted", 3.0)

    r = client.put(url, headers=office, json={"epsilon": 1.5})
    assert (r.status_code, r.json()["code"]) == (409, "cap_below_spent")
    assert r.json()["details"]["epsilon_spent"] == pytest.approx(2.0) and "message_zh" in r.json()
    assert client.get(url, headers=office).json()["epsilon_cap"] == 3.0    # changed nothing
    r = client.put(url, headers=office, json={"epsilon": 2.0, "delta": 0})  # exactly what is spent: allowed
    assert r.status_code == 200 and (r.json()["epsilon_left"], r.json()["delta_cap"]) == (0.0, 0.0)
    with Session(engine) as s:
        assert s.execute(text("SELECT count(*) FROM audit_event WHERE action = 'budget.cap_set'")).scalar() == 2

    for bad in ({"epsilon": -1}, {"epsilon": 101}, {"epsilon": 1, "delta": 1}, {}, {"epsilon": "lots"}):
        r = client.put(url, headers=office, json=bad)
        assert (r.status_code, r.json()["code"]) == (422, "invalid_request"), bad
    r = client.put(url, headers={**office, "Content-Type": "application/json"}, content=b'{"epsilon": 1e999}')
    assert r.status_code == 422
    assert client.put("/api/v1/budgets/company_a/no.such_dataset", headers=office,
                      json={"epsilon": 1}).status_code == 404
    assert client.put(f"/api/v1/budgets/no_such_org/{VISITS}", headers=office, json={"epsilon": 1}).status_code == 404
    assert client.get(url, headers=office).json()["epsilon_cap"] == 2.0


def test_budgets_are_read_by_the_office_auditors_and_each_tenant_its_own(client, auth, loaded):
    a_scene = active_scene(client, auth)["id"]
    b_scene = active_scene(client, auth, applicant="insurer_b")["id"]
    assert prod_query(client, auth("insurer_b"), b_scene, 0.5).status_code == 202
    pairs = {("company_a", VISITS), ("company_a", RESIDENTS), ("company_b", VISITS), ("company_b", RESIDENTS)}
    for who in ("office1", "auditor1"):
        r = client.get("/api/v1/budgets", headers=auth(who))
        assert set(budgets(client, auth(who))) == pairs, who
        assert (r.json()["default_epsilon"], r.json()["default_delta"]) == (10.0, 1e-5)
    assert set(budgets(client, auth("insurer_a"))) == {p for p in pairs if p[0] == "company_a"}
    assert budgets(client, auth("insurer_a"), org="company_b") == {}
    mine = budgets(client, auth("insurer_b"))
    assert set(mine) == {p for p in pairs if p[0] == "company_b"} and mine[("company_b", VISITS)]["epsilon_spent"] == 0.5
    for who in ("provider1", "reviewer1", "operator1"):
        r = client.get("/api/v1/budgets", headers=auth(who))
        assert (r.status_code, r.json()["code"]) == (403, "role_not_permitted"), who

    # another company's budget answers exactly like a company that does not exist
    other = client.get(f"/api/v1/budgets/company_b/{VISITS}", headers=auth("insurer_a"))
    missing = client.get(f"/api/v1/budgets/company_z/{VISITS}", headers=auth("insurer_a"))
    assert other.status_code == missing.status_code == 404
    assert other.text.replace("company_b", "?") == missing.text.replace("company_z", "?")
    own = client.get(f"/api/v1/budgets/company_b/{VISITS}", headers=auth("insurer_b")).json()
    assert own["epsilon_spent"] == 0.5 and own["source"] == "default"

    # the scene view: the office and auditors see the company's budgets, the tenant its own,
    # the roles without `budget read` none
    for who in ("office1", "auditor1", "insurer_a"):
        got = client.get(f"/api/v1/scenes/{a_scene}", headers=auth(who)).json()["company_budgets"]
        assert {b["dataset"] for b in got} == {VISITS, RESIDENTS} and {b["org"] for b in got} == {"company_a"}, who
    for who in ("reviewer1", "operator1", "provider1"):
        r = client.get(f"/api/v1/scenes/{a_scene}", headers=auth(who))
        assert r.status_code in (200, 404) and r.json().get("company_budgets") is None, who
    assert client.get(f"/api/v1/scenes/{a_scene}", headers=auth("insurer_b")).status_code == 404


def test_struck_datasets_and_ended_scenes_do_not_count(client, auth):
    """The office's figures: a dataset whose items are all struck is off the list; a revoked scene
    no longer counts among the company's live scenes."""
    office = auth("office1")
    live = active_scene(client, auth)["id"]
    gone = active_scene(client, auth)["id"]
    assert client.post(f"/api/v1/scenes/{gone}/revoke", headers=office, json={"reason": "done"}).status_code == 200
    s = create(client, auth("insurer_a"))
    assert client.post(f"/api/v1/scenes/{s['id']}/submit", headers=auth("insurer_a")).status_code == 200
    resident_items = [i["id"] for i in s["items"] if i["dataset"] == RESIDENTS]
    out = approve(client, auth, s["id"], struck=resident_items)
    assert {b["dataset"] for b in out["company_budgets"]} == {VISITS}
    seen = {b["dataset"]: b for b in out["company_budgets"]}[VISITS]
    assert [o["id"] for o in seen["other_scenes"]] == [live] and seen["other_scenes_epsilon_left"] == 3.0
    assert seen["this_scene_epsilon_left"] == 3.0 and seen["warning"] is None
    revoked = company_budget(client, auth, gone, VISITS)
    assert revoked["this_scene_epsilon_left"] == 0 and {o["id"] for o in revoked["other_scenes"]} == {live, s["id"]}


def test_the_migration_counts_what_companies_spent_before_it(client, auth, engine, settings, loaded):
    """Upgrading a database whose ledger predates company budgets: each entry learns its query's
    dataset and tenant, and the reserved and charged ones (not the refunded) become the company's spent."""
    from alembic import command

    from pdao.kernel.db import alembic_config, migrate
    from policies.enforcer import SceneEnforcers
    from sandbox.worker import run_one, worker_name

    a_scene = active_scene(client, auth)["id"]
    b_scene = active_scene(client, auth, applicant="insurer_b")["id"]
    ids = [prod_query(client, auth("insurer_a"), a_scene, 0.5).json()["id"] for _ in range(3)]
    assert run_one(engine, settings, SceneEnforcers(engine), worker_name())               # charged
    assert client.post(f"/api/v1/queries/{ids[1]}/cancel", headers=auth("insurer_a")).status_code == 200  # refunded
    assert prod_query(client, auth("insurer_b"), b_scene, 0.25).status_code == 202       # reserved
    before = budgets(client, auth("office1"), dataset=VISITS)
    engine.dispose()
    client.app.state.engine.dispose()

    command.downgrade(alembic_config(settings.database_url), "0011")
    migrate(settings.database_url)

    after = budgets(client, auth("office1"), dataset=VISITS)
    assert after[("company_a", VISITS)]["epsilon_spent"] == pytest.approx(1.0)
    assert after[("company_b", VISITS)]["epsilon_spent"] == pytest.approx(0.25)
    assert {k: v["epsilon_spent"] for k, v in after.items()} == {k: v["epsilon_spent"] for k, v in before.items()}
    with Session(engine) as s:
        entries = ledger.entries(s, a_scene)
    assert [(e.state, e.dataset) for e in entries] == [("charged", VISITS), ("refunded", VISITS), ("reserved", VISITS)]
    assert client.post(f"/api/v1/queries/{ids[2]}/cancel", headers=auth("insurer_a")).status_code == 200
    assert budgets(client, auth("office1"))[("company_a", VISITS)]["epsilon_spent"] == pytest.approx(0.5)
