"""Row answers through HTTP (issue 13): they cannot be differenced, their pseudonyms do not link
unless the scene says so (and then the row checks run over the union), a failing check needs two
reviewers' overrides, a failed run is never released, and automatic release of DP aggregates is
decided on public facts and the noisy answer alone. Each attack runs on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import json

import pyarrow.parquet as pq
import pytest
from sqlmodel import Session, select

from pdao.kernel.audit import AuditEvent
from sandbox.results import export
from sandbox.results.models import QueryResult, ResultReview
from tests.scene_helpers import SCENE_ITEMS, VISITS, active_scene
from tests.test_export_review import _org_of, held_result, make_user, review
from tests.test_queries import work_once

ROWS_ITEMS = SCENE_ITEMS + [{"dataset": VISITS, "field": "department", "usage": "masked_output"},
                            {"dataset": VISITS, "field": "person_id", "usage": "masked_output"},
                            {"dataset": VISITS, "field": "icd10_chapter", "usage": "filter"}]
LINK_ITEMS = SCENE_ITEMS + [{"dataset": VISITS, "field": "person_id", "usage": "masked_output"},
                            {"dataset": VISITS, "field": "visit_date", "usage": "masked_output"}]


def visits(synth_files):
    return pq.read_table(synth_files["prod"][VISITS]).to_pandas()


def one_visit_day(synth_files, chapter: str = "V") -> dt.date:
    """A day with exactly one visit of `chapter`, after at least 10 people had one (the review's
    attack: the day's only mental-health visit)."""
    df = visits(synth_files)
    df = df[df.icd10_chapter == chapter].sort_values("visit_date")
    per_day = df.groupby("visit_date").size()
    for day, n in per_day.items():
        before = df[df.visit_date < day]
        if n == 1 and before.person_id.nunique() >= 12:
            return day
    raise AssertionError("no such day in the synthetic data")


def second_reviewer(engine, settings) -> None:
    make_user(engine, settings, "reviewer2", _org_of(engine, "reviewer1"), "reviewer")


def override(client, headers, rid: int, reason: str = "the office accepts the risk: one day's visit is public"):
    return client.post(f"/api/v1/results/{rid}/review", headers=headers,
                       json={"decision": "release", "reason": reason, "override": True})


def checks_of(res: dict) -> dict[str, dict]:
    return {c["name"]: c for c in res["report"]["checks"]}


def test_two_row_queries_one_day_apart_cannot_be_differenced(client, auth, engine, settings, loaded, synth_files):
    """The review's attack: the same row query with the date filter one day later would tell that
    day's only mental-health visit (department, and the patient's pseudonym)."""
    from tests.conftest import login

    second_reviewer(engine, settings)
    day = one_visit_day(synth_files)
    scene = active_scene(client, auth, items=ROWS_ITEMS)
    sql = (f"SELECT department, person_id FROM {VISITS} WHERE icd10_chapter = 'V' AND visit_date < DATE '{{}}'")
    first = held_result(client, auth, engine, settings, scene["id"], sql=sql.format(day.isoformat()))
    # on its own the first answer passes every check: a reviewer releases it
    assert first["report"]["verdict"] == "pass", first["report"]["summary"]
    assert checks_of(first)["differencing"]["verdict"] == "pass"
    assert review(client, auth("reviewer1"), first["id"]).json()["status"] == "released"

    second = held_result(client, auth, engine, settings, scene["id"],
                         sql=sql.format((day + dt.timedelta(days=1)).isoformat()))
    assert second["row_count"] == first["row_count"] + 1          # what the attacker wanted to subtract
    diff = checks_of(second)["differencing"]
    assert diff["verdict"] == "fail" and second["report"]["verdict"] == "fail"
    assert {"result_id": first["id"], "difference": 1} in diff["cells"] and f"#{first['id']}" in diff["reason"]
    # a row answer is never released by policy, and the tenant sees neither the cells nor the verdict
    mine = client.get(f"/api/v1/results/{second['id']}", headers=auth("insurer_a")).json()
    assert mine["status"] == "held" and mine["rows"] is None and mine["report"] is None
    assert mine["row_count"] is None

    # a reviewer's release is refused, naming the failing check; nothing changes
    r = review(client, auth("reviewer1"), second["id"])
    assert r.status_code == 409 and r.json()["code"] == "release_needs_override" and r.json()["message_zh"]
    assert r.json()["details"]["failing"] == ["differencing"]
    with Session(engine) as s:
        assert s.get(QueryResult, second["id"]).status == "held"
        assert s.exec(select(ResultReview).where(ResultReview.result_id == second["id"])).all() == []
    # one override is not enough: a second, distinct reviewer must override too
    r = override(client, auth("reviewer1"), second["id"])
    assert r.status_code == 200 and r.json()["status"] == "held", r.text
    # the second review: a release that leaves a one-reviewer scene's answer held said a check failed;
    # now the tenant sees the same answer and lineage as before any review
    assert client.get(f"/api/v1/results/{second['id']}", headers=auth("insurer_a")).json() == mine
    assert client.get(f"/api/v1/results/{second['id']}/lineage", headers=auth("insurer_a")).json()["reviews"] == []
    assert override(client, auth("reviewer1"), second["id"]).status_code == 409     # the same reviewer twice
    r = review(client, login(client, "reviewer2"), second["id"])                      # a plain release
    assert r.status_code == 409 and r.json()["code"] == "release_needs_override"
    r = override(client, login(client, "reviewer2"), second["id"], "second pair of eyes: accepted")
    assert r.status_code == 200 and r.json()["status"] == "released", r.text

    # the audit chain and the lineage show both overrides, with their reasons
    with Session(engine) as s:
        events = s.exec(select(AuditEvent).where(AuditEvent.object == f"result:{second['id']}",
                                                 AuditEvent.action == "result.release",
                                                 AuditEvent.actor.in_(["reviewer1", "reviewer2"]))
                        .order_by(AuditEvent.seq)).all()
    decided = [e for e in events if e.detail and e.detail.get("overridden") is not None]
    assert [(e.actor, e.detail["override"], e.detail["overridden"], e.detail["status"]) for e in decided] == [
        ("reviewer1", True, ["differencing"], "held"), ("reviewer2", True, ["differencing"], "released")]
    # the chain holds which checks were overridden, never the differences' sizes or the cells
    assert all("difference" not in json.dumps(e.detail) and "cells" not in e.detail for e in decided)
    lin = client.get(f"/api/v1/results/{second['id']}/lineage", headers=auth("auditor1")).json()
    assert [(v["reviewer"]["username"], v["override"], v["overridden_checks"]) for v in lin["reviews"]] == [
        ("reviewer1", True, ["differencing"]), ("reviewer2", True, ["differencing"])]
    assert lin["reviews"][1]["reason"] == "second pair of eyes: accepted"
    # the tenant's lineage names no review at all: two releases of a one-reviewer scene would say a
    # check failed (an exact statistic); a tenant sees a rejection's reason only
    theirs = client.get(f"/api/v1/results/{second['id']}/lineage", headers=auth("insurer_a")).json()
    assert theirs["reviews"] == [] and theirs["result"]["status"] == "released"


def test_releases_in_another_order_are_checked_again(client, auth, engine, settings, loaded, synth_files):
    """Both answers held: the later one goes out first (nothing released to difference it with),
    then the earlier one is checked again at release against it and refused."""
    day = one_visit_day(synth_files)
    scene = active_scene(client, auth, items=ROWS_ITEMS)
    sql = f"SELECT department, person_id FROM {VISITS} WHERE icd10_chapter = 'V' AND visit_date < DATE '{{}}'"
    first = held_result(client, auth, engine, settings, scene["id"], sql=sql.format(day.isoformat()))
    second = held_result(client, auth, engine, settings, scene["id"],
                         sql=sql.format((day + dt.timedelta(days=1)).isoformat()))
    assert checks_of(second)["differencing"]["verdict"] == "fail"    # against the held first one
    r = review(client, auth("reviewer1"), second["id"])              # nothing released yet: it may go
    assert r.status_code == 200 and r.json()["status"] == "released", r.text
    with Session(engine) as s:
        stored = s.get(QueryResult, second["id"]).report
    assert stored["checked_at_release"] and {c["name"]: c for c in stored["checks"]}["differencing"]["verdict"] == "pass"
    r = review(client, auth("reviewer1"), first["id"])
    assert r.status_code == 409 and r.json()["code"] == "release_needs_override"
    assert {"result_id": second["id"], "difference": 1} in r.json()["details"]["checks"][0]["cells"]
    # rejecting stays possible, and is final
    assert review(client, auth("reviewer1"), first["id"], "reject", "differs by one visit").json()["status"] == "rejected"


def _person_ids(client, auth, rid: int) -> set[str]:
    res = client.get(f"/api/v1/results/{rid}", headers=auth("reviewer1")).json()
    return {row["person_id"] for row in res["rows"]}


@pytest.mark.parametrize("linked", [False, True])
def test_pseudonyms_link_across_answers_only_when_the_scene_says_so(client, auth, engine, settings, loaded, linked):
    scene = active_scene(client, auth, items=LINK_ITEMS, link_pseudonyms=linked)
    # the office saw it when it approved, and everyone who sees the scene sees it
    for who in ("office1", "insurer_a"):
        assert client.get(f"/api/v1/scenes/{scene['id']}", headers=auth(who)).json()["link_pseudonyms"] is linked
    sql = f"SELECT person_id, visit_date FROM {VISITS} WHERE visit_date >= DATE '2025-01-01'"
    a = held_result(client, auth, engine, settings, scene["id"], sql=sql)
    b = held_result(client, auth, engine, settings, scene["id"], sql=sql)
    assert checks_of(b)["differencing"]["verdict"] == "pass"       # the same rows: nothing to difference
    ours_a, ours_b = _person_ids(client, auth, a["id"]), _person_ids(client, auth, b["id"])
    assert len(ours_a) >= 10
    if linked:
        assert ours_a == ours_b
    else:
        assert not ours_a & ours_b


@pytest.mark.parametrize("linked", [True, False])
def test_a_linked_union_that_breaks_k_anonymity_fails(client, auth, engine, settings, loaded, linked):
    """Two answers, each k-anonymous on its own: joined on linked pseudonyms, a person's months in
    one and the other single them out."""
    scene = active_scene(client, auth, items=LINK_ITEMS, link_pseudonyms=linked)
    sql = f"SELECT person_id, visit_date FROM {VISITS} WHERE visit_date >= DATE '{{}}' AND visit_date < DATE '{{}}'"
    first = held_result(client, auth, engine, settings, scene["id"], sql=sql.format("2025-01-01", "2025-04-01"))
    assert first["report"]["verdict"] == "pass", first["report"]["summary"]
    assert review(client, auth("reviewer1"), first["id"]).json()["status"] == "released"
    second = held_result(client, auth, engine, settings, scene["id"], sql=sql.format("2025-04-01", "2025-07-01"))
    k = checks_of(second)["k_anonymity"]
    if not linked:   # nothing joins: the answer alone is judged, and passes
        assert k["verdict"] == "pass" and second["report"]["verdict"] == "pass"
        return
    assert k["verdict"] == "fail" and f"#{first['id']}" in k["reason"] and "linked:visit_date" in k["columns"]
    assert any("linked:visit_date" in cell for cell in k["cells"])
    r = review(client, auth("reviewer1"), second["id"])
    assert r.status_code == 409 and r.json()["details"]["failing"] == ["k_anonymity"]
    # suppressing the failing classes of the union leaves rows that pass, their identities aligned
    r = client.post(f"/api/v1/results/{second['id']}/revisions", headers=auth("reviewer1"),
                    json={"action": "suppress", "cells": "failing", "reason": "drop classes the union singles out"})
    assert r.status_code == 201, r.text
    v2 = r.json()
    assert v2["row_count"] < second["row_count"] and checks_of(v2)["k_anonymity"]["verdict"] == "pass"
    with Session(engine) as s:
        new = s.get(QueryResult, v2["id"])
        assert new.stats_path and new.stats_path != s.get(QueryResult, second["id"]).stats_path
        assert len(export.stored_row_keys(settings, new)) == new.row_count


def test_a_pii_fail_is_released_only_by_two_overrides(client, auth, engine, settings):
    """A provider's field classified public while it holds phone numbers: the answer's PII check
    fails, and only two reviewers' overrides let it out."""
    from tests.conftest import login

    desc = {"code": "health.hotline", "title": {"zh": "热线记录", "en": "Hotline calls"},
            "source_department": "ycwjw", "standard": "none", "update_cycle": "daily", "category": "public_health",
            "grade": 3, "opening_class": "conditional", "privacy_unit": "person_id",
            "fields": [{"name": "person_id", "type": "integer", "sensitivity": "identifier", "pii_kind": "person_key",
                        "masking": "pseudonym", "nullable": False, "description": {"zh": "居民主索引", "en": "Person key"}},
                       {"name": "topic", "type": "string", "sensitivity": "public", "masking": "none",
                        "description": {"zh": "主题", "en": "Topic"}}]}
    assert client.post("/api/v1/datasets", json=desc, headers=auth("provider1")).status_code == 201
    lines = ["person_id,topic"] + [f"{i},{'请回电 13912345678' if i % 7 == 0 else '咨询'}" for i in range(1, 41)]
    r = client.post("/api/v1/datasets/health.hotline/versions", headers=auth("provider1"), data={"env": "prod"},
                    files={"file": ("calls.csv", ("\n".join(lines) + "\n").encode(), "text/csv")})
    assert r.status_code in (200, 201), r.text
    items = [{"dataset": "health.hotline", "field": f, "usage": "masked_output"} for f in ("person_id", "topic")]
    scene = active_scene(client, auth, items=items)
    res = held_result(client, auth, engine, settings, scene["id"], sql="SELECT person_id, topic FROM health.hotline")
    assert checks_of(res)["pii"]["verdict"] == "fail" and res["report"]["verdict"] == "fail"
    assert checks_of(res)["differencing"]["verdict"] == "pass"
    r = review(client, auth("reviewer1"), res["id"])
    assert r.status_code == 409 and r.json()["code"] == "release_needs_override"
    assert r.json()["details"]["failing"] == ["pii"]
    # an override is for a release only, and for a result that fails a check
    bad = client.post(f"/api/v1/results/{res['id']}/review", headers=auth("reviewer1"),
                      json={"decision": "reject", "reason": "x", "override": True})
    assert bad.status_code == 422 and bad.json()["code"] == "override_is_for_release"
    second_reviewer(engine, settings)
    assert override(client, auth("reviewer1"), res["id"], "phone is the hotline's own").json()["status"] == "held"
    assert override(client, login(client, "reviewer2"), res["id"], "confirmed").json()["status"] == "released"
    assert client.get(f"/api/v1/results/{res['id']}/download", headers=auth("insurer_a")).status_code == 200


def test_an_override_where_nothing_fails_is_refused(client, auth, engine, settings, loaded):
    scene = active_scene(client, auth)
    rid = held_result(client, auth, engine, settings, scene["id"],
                      sql=f"SELECT district, COUNT(*) AS n FROM {VISITS} GROUP BY district")["id"]
    r = override(client, auth("reviewer1"), rid)
    assert r.status_code == 409 and r.json()["code"] == "nothing_to_override" and r.json()["message_zh"]
    with Session(engine) as s:
        assert s.get(QueryResult, rid).status == "held"
    lin = client.get(f"/api/v1/results/{rid}/lineage", headers=auth("reviewer1")).json()
    assert lin["release"] == {"failing": [], "failed_run": False, "needs_override": False, "releases": 0,
                              "overrides": 0, "required": 1}
    assert client.get(f"/api/v1/results/{rid}/lineage", headers=auth("insurer_a")).json()["release"] is None


def test_a_failed_run_is_never_released(client, auth, engine, settings, synth_files, monkeypatch):
    from pdao.kernel.errors import PdaoError
    from sandbox.engine.store import load_version
    from sandbox.templates import library as templates
    from tests.conftest import login
    from tests.test_scene_templates import underwriting_items
    from tests.test_template_runs import DATASETS, applicants, upload

    with Session(engine) as s:
        for code in DATASETS:
            load_version(s, settings, code, synth_files["prod"][code], env="prod", source="synth")
    ids = pq.read_table(synth_files["prod"]["health.resident"], columns=["id_number"]).column(0).to_pylist()
    upload(client, auth("insurer_a"), applicants(ids[:10]))
    scene = active_scene(client, auth, scene_type="underwriting", items=underwriting_items(),
                         templates=[{"library": "underwriting"}])

    def broken(*a, **kw):
        raise PdaoError(500, "template_output_mismatch", "withheld", "不予返回")

    monkeypatch.setattr(templates, "run_template", broken)
    r = client.post(f"/api/v1/scenes/{scene['id']}/templates/underwriting/runs", headers=auth("insurer_a"),
                    json={"upload": "applicants"})
    assert r.status_code == 201, r.text
    rid = r.json()["result_id"]
    second_reviewer(engine, settings)
    for who in (auth("reviewer1"), login(client, "reviewer2")):
        for body in ({"decision": "release", "reason": "x"},
                     {"decision": "release", "reason": "x", "override": True}):
            r = client.post(f"/api/v1/results/{rid}/review", headers=who, json=body)
            assert r.status_code == 409 and r.json()["code"] == "failed_run_not_releasable", r.text
    with Session(engine) as s:
        assert s.get(QueryResult, rid).status == "held"
    lin = client.get(f"/api/v1/results/{rid}/lineage", headers=auth("auditor1")).json()
    assert lin["release"]["failed_run"] is True
    assert review(client, auth("reviewer1"), rid, "reject", "nothing to release").json()["status"] == "rejected"


MINIMUM = 45   # persons per district run from 38 to 99; their noisy counts (scale 5) from about 90
AUTO = {"auto_release": "dp_aggregates", "thresholds": {"min_cell_count": MINIMUM}}


def test_auto_release_is_decided_on_noisy_counts_not_exact_statistics(client, auth, engine, settings, loaded,
                                                                      synth_files):
    """A DP aggregate with cells of fewer than 45 people (exact) but noisy counts far above 45 goes
    out at once; one whose noisy counts are below 45 is held. The exact check still runs and is
    in the report for the reviewers."""
    df = visits(synth_files)
    few = df.groupby("district").person_id.nunique()
    assert (few < MINIMUM).any() and (few >= MINIMUM).any()      # some districts have fewer than 45 people
    items = SCENE_ITEMS + [{"dataset": VISITS, "field": "icd10_chapter", "usage": "filter"},
                           {"dataset": VISITS, "field": "department", "usage": "group_by"}]
    scene = active_scene(client, auth, items=items, release_policy=AUTO, budget_epsilon=10.0, max_query_epsilon=2.0)
    out = held_result(client, auth, engine, settings, scene["id"], epsilon=2.0,
                      sql=f"SELECT district, COUNT(*) AS n FROM {VISITS} GROUP BY district")
    checks = checks_of(out)
    assert checks["min_cell_count"]["verdict"] == "review"      # exact: some district below 45 people
    assert checks["noisy_counts"]["verdict"] == "pass" and checks["budget"]["verdict"] == "pass"
    assert out["status"] == "released" and out["released_by"] == "policy"
    held = held_result(client, auth, engine, settings, scene["id"], epsilon=2.0,
                       sql=f"SELECT department, COUNT(*) AS n FROM {VISITS} WHERE icd10_chapter = 'V' "
                           "GROUP BY department")
    assert held["status"] == "held" and checks_of(held)["noisy_counts"]["verdict"] == "review"
    # the noisy counts that held it are the ones a reviewer sees (and, once released, the tenant)
    low = {c["department"] for c in checks_of(held)["noisy_counts"]["cells"]}
    assert low and all(row["n"] < MINIMUM for row in held["rows"] if row["department"] in low)


def test_two_close_row_answers_released_at_once_are_checked_one_after_the_other(client, auth, engine, settings,
                                                                                 loaded, synth_files, monkeypatch):
    """Two reviewers release the two held answers one day apart at the same moment: each result row
    is its own, so the scene's row is taken too, and the second release sees the first."""
    import threading

    from pdao.kernel.errors import PdaoError
    from pdao.kernel.identity import service as identities

    second_reviewer(engine, settings)
    day = one_visit_day(synth_files)
    scene = active_scene(client, auth, items=ROWS_ITEMS)
    sql = f"SELECT department, person_id FROM {VISITS} WHERE icd10_chapter = 'V' AND visit_date < DATE '{{}}'"
    ids = [held_result(client, auth, engine, settings, scene["id"], sql=sql.format(d.isoformat()))["id"]
           for d in (day, day + dt.timedelta(days=1))]
    barrier = threading.Barrier(2, timeout=1.5)
    real = export._reviewable

    def slow(*a, **kw):   # both pass the per-result checks together if nothing else serialised them
        out = real(*a, **kw)
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            pass
        return out

    monkeypatch.setattr(export, "_reviewable", slow)
    outcomes = {}

    def release(who: str, rid: int) -> None:
        with Session(engine) as s:
            p = identities.principal_for(s, who)
            try:
                outcomes[rid] = export.review(s, p, rid, "release", f"release by {who}", settings=settings).status
            except PdaoError as e:
                outcomes[rid] = e.code

    threads = [threading.Thread(target=release, args=a) for a in (("reviewer1", ids[0]), ("reviewer2", ids[1]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(outcomes.values()) == ["release_needs_override", "released"], outcomes
    with Session(engine) as s:
        assert sorted(s.get(QueryResult, i).status for i in ids) == ["held", "released"]


def test_row_answers_are_compared_across_scenes_and_companies(client, auth, engine, settings, loaded, synth_files):
    """The second review: the same company asked A in one scene and A minus one person's visit in
    another identical scene; each report compared only within its own scene, both were released, and
    their difference was the visit. Two companies could do the same together."""
    day = one_visit_day(synth_files)
    sql = f"SELECT department, person_id FROM {VISITS} WHERE icd10_chapter = 'V' AND visit_date < DATE '{{}}'"
    scene_1 = active_scene(client, auth, items=ROWS_ITEMS)
    scene_2 = active_scene(client, auth, items=ROWS_ITEMS)
    scene_b = active_scene(client, auth, applicant="insurer_b", items=ROWS_ITEMS)
    first = held_result(client, auth, engine, settings, scene_1["id"], sql=sql.format(day.isoformat()))
    assert review(client, auth("reviewer1"), first["id"]).json()["status"] == "released"
    later = sql.format((day + dt.timedelta(days=1)).isoformat())
    for scene, who in ((scene_2, "insurer_a"), (scene_b, "insurer_b")):
        r = client.post(f"/api/v1/scenes/{scene['id']}/queries", headers=auth(who),
                        json={"sql": later, "mode": "prod"})
        assert r.status_code == 202, r.text
        assert work_once(engine, settings)
        rid = client.get(f"/api/v1/queries/{r.json()['id']}", headers=auth(who)).json()["result_id"]
        res = client.get(f"/api/v1/results/{rid}", headers=auth("reviewer1")).json()
        diff = checks_of(res)["differencing"]
        assert diff["verdict"] == "fail" and {"result_id": first["id"], "difference": 1} in diff["cells"], diff
        r = review(client, auth("reviewer1"), rid)
        assert r.status_code == 409 and r.json()["code"] == "release_needs_override"
