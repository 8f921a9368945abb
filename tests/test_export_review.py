"""Export review through HTTP: prod results are checked and held; reviewers release, reject,
suppress or round; only released results download, each file stamped with an export id and a keyed
fingerprint; lineage and trace name everyone involved."""

from __future__ import annotations

import hashlib
import io
import json

import pyarrow.parquet as pq
import pytest
from sqlmodel import Session, select

from pdao.kernel.audit import AuditEvent
from pdao.kernel.identity import service as identities
from sandbox.results.models import Query, QueryResult, ResultExport
from tests.conftest import DEMO_PASSWORD, first_also_on_postgresql, login
from tests.scene_helpers import SCENE_ITEMS, VISITS, active_scene
from tests.test_cli import pdao  # noqa: F401 - the `pdao` command fixture
from tests.test_queries import work_once

BY_DISTRICT_COUNT = f"SELECT district, COUNT(*) AS n FROM {VISITS} GROUP BY district"
BY_DISTRICT_FEES = (f"SELECT district, COUNT(*) AS n, SUM(fee) AS total FROM {VISITS} "
                    "WHERE visit_date >= DATE '2018-01-01' GROUP BY district")

# The disclosure checks, revisions, the release policy, tracing a file and the sweep are Python and
# DuckDB over the result files; the database records versions and decisions through the same code
# as the review flow that runs on both backends (test_a_held_result_is_reviewed_released_downloaded_stamped_and_traced,
# test_reviewer_refusals, test_two_independent_reviewers_when_the_scene_asks,
# test_no_path_downloads_an_unreleased_result, test_decisions_on_one_result_run_one_after_the_other,
# test_trace_names_the_right_tenant_when_two_hold_the_same_cells,
# test_malformed_revisions_are_refused_clearly_and_change_nothing). The tests marked CHECKS_ONLY run
# on SQLite by default and on PostgreSQL in `make test-slow`.
CHECKS_ONLY = pytest.mark.default_backend("sqlite")


def held_result(client, auth, engine, settings, scene_id: int, sql: str = BY_DISTRICT_FEES, epsilon: float = 0.5) -> dict:
    r = client.post(f"/api/v1/scenes/{scene_id}/queries", headers=auth("insurer_a"),
                    json={"sql": sql, "mode": "prod", "epsilon": epsilon})
    assert r.status_code == 202, r.text
    assert work_once(engine, settings)
    q = client.get(f"/api/v1/queries/{r.json()['id']}", headers=auth("insurer_a")).json()
    assert q["result_id"], q
    return client.get(f"/api/v1/results/{q['result_id']}", headers=auth("reviewer1")).json()


def _prod_result_id(client, headers, engine, settings, scene_id: int, sql: str) -> int:
    r = client.post(f"/api/v1/scenes/{scene_id}/queries", headers=headers, json={"sql": sql, "mode": "prod"})
    assert r.status_code == 202, r.text
    assert work_once(engine, settings)
    return client.get(f"/api/v1/queries/{r.json()['id']}", headers=headers).json()["result_id"]


def make_user(engine, settings, username: str, org: str, role: str) -> None:
    with Session(engine) as s:
        identities.create_user(s, username, DEMO_PASSWORD, org, role)
        s.commit()


def review(client, who_headers, rid: int, decision: str = "release", reason: str = "checked: DP, cells fine"):
    return client.post(f"/api/v1/results/{rid}/review", headers=who_headers, json={"decision": decision, "reason": reason})


def test_a_held_result_is_reviewed_released_downloaded_stamped_and_traced(client, auth, engine, settings, loaded):
    scene = active_scene(client, auth)
    res = held_result(client, auth, engine, settings, scene["id"])
    rid = res["id"]
    assert res["status"] == "held" and res["version"] == 1
    # the reviewer sees what would go out (noised) and the whole report
    assert res["cells_visible"] is True and len(res["rows"]) == 6     # the six districts
    names = {c["name"] for c in res["report"]["checks"]}
    assert {"min_cell_count", "dominance", "p_percent", "budget", "pii", "noisy_counts"} <= names
    assert res["report"]["verdict"] in ("pass", "review", "fail")
    # the tenant: no cells, no report (its verdicts rest on exact counts), no hash to test guesses on
    mine = client.get(f"/api/v1/results/{rid}", headers=auth("insurer_a")).json()
    assert mine["rows"] is None and mine["cells_visible"] is False
    assert mine["report"] is None and mine["sha256"] is None
    lin = client.get(f"/api/v1/results/{rid}/lineage", headers=auth("insurer_a")).json()
    assert lin["result"]["sha256"] is None and lin["result"]["verdict"] is None
    assert lin["result"]["content_fingerprint"] is None
    r = client.get(f"/api/v1/results/{rid}/download", headers=auth("insurer_a"))
    assert r.status_code == 403 and r.json()["code"] == "result_not_released"
    # the auditor: report yes, cells never
    seen = client.get(f"/api/v1/results/{rid}", headers=auth("auditor1")).json()
    assert seen["rows"] is None and seen["report"]["checks"]
    # the queue shows it to the reviewer, not to the tenant
    assert rid in [x["id"] for x in client.get("/api/v1/reviews/queue", headers=auth("reviewer1")).json()]
    assert client.get("/api/v1/reviews/queue", headers=auth("insurer_a")).status_code == 403

    r = review(client, auth("reviewer1"), rid)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "released" and r.json()["released_by"] == "reviewers"
    q = client.get(f"/api/v1/queries/{res['query_id']}", headers=auth("insurer_a")).json()
    assert q["status"] == "released"
    # a released result is no longer shown to the reviewer as cells: it went out
    assert client.get(f"/api/v1/results/{rid}", headers=auth("reviewer1")).json()["rows"] is None

    files = {}
    for fmt in ("csv", "parquet", "json"):
        r = client.get(f"/api/v1/results/{rid}/download?format={fmt}", headers=auth("insurer_a"))
        assert r.status_code == 200, r.text
        assert r.headers["X-Pdao-Export"].startswith("ex-") and len(r.headers["X-Pdao-Fingerprint"]) == 64
        files[fmt] = (r.headers["X-Pdao-Export"], r.headers["X-Pdao-Fingerprint"], r.content)
    export_id, fp, csv = files["csv"]
    assert csv.decode().startswith("#") and export_id in csv.decode().splitlines()[0] and fp in csv.decode()
    meta = json.loads(pq.read_table(io.BytesIO(files["parquet"][2])).schema.metadata[b"pdao"])
    assert meta["export_id"] == files["parquet"][0] and meta["fingerprint"] == files["parquet"][1]
    body = json.loads(files["json"][2])
    assert body["export"]["export_id"] == files["json"][0] and len(body["rows"]) == 6
    with Session(engine) as s:
        exports = {e.export_id: e for e in s.exec(select(ResultExport).where(ResultExport.result_id == rid)).all()}
        events = s.exec(select(AuditEvent).where(AuditEvent.action == "result.export")).all()
    assert set(exports) == {f[0] for f in files.values()}
    for export_id_, _, data in files.values():
        assert exports[export_id_].sha256 == hashlib.sha256(data).hexdigest()
    assert {e.object for e in events} == {f"export:{x}" for x in exports}

    # trace: the stamped file names its export exactly
    t = client.post("/api/v1/trace", headers=auth("auditor1"), files={"file": ("found.csv", csv, "text/csv")}).json()
    assert t["matched"] and t["stamp_valid"] is True and t["export_id"] == export_id
    assert t["requester"]["username"] == "insurer_a" and [x["username"] for x in t["reviewers"]] == ["reviewer1"]
    assert t["lineage"]["scene"]["id"] == scene["id"] and t["lineage"]["datasets"][0]["code"] == VISITS
    # … and with the comment and the header stripped, re-saved with CRLF, by its cells alone
    lines = [ln for ln in csv.decode().splitlines() if not ln.startswith("#")][1:]
    stripped = "\r\n".join(lines).encode()
    t = client.post("/api/v1/trace", headers=auth("office1"), files={"file": ("x.csv", stripped, "text/csv")}).json()
    assert t["matched"] and t["match"] == "content" and t["result_id"] == rid and t["query_id"] == res["query_id"]
    assert export_id in t["candidate_exports"] and t["requester"]["username"] == "insurer_a"
    # one changed cell is not the same file
    first = lines[0].split(",")
    changed = "\r\n".join([",".join(["某区"] + first[1:])] + lines[1:]).encode()
    assert client.post("/api/v1/trace", headers=auth("auditor1"),
                       files={"file": ("x.csv", changed, "text/csv")}).json()["matched"] is False
    # trace is for auditors and the office only
    assert client.post("/api/v1/trace", headers=auth("insurer_a"),
                       files={"file": ("x.csv", stripped, "text/csv")}).status_code == 403

    # lineage: result → query → scene → authorization → dataset versions
    lin = client.get(f"/api/v1/results/{rid}/lineage", headers=auth("auditor1")).json()
    assert lin["query"]["sql"] == BY_DISTRICT_FEES and lin["query"]["requester"]["username"] == "insurer_a"
    assert {a["reviewer"]["username"] for a in lin["scene"]["approvals"]} == {"office1", "office2"}
    assert ["health.outpatient_visit", "fee", "aggregate"] in [[a["dataset"], a["field"], a["usage"]]
                                                              for a in lin["authorization"]]
    assert lin["datasets"][0]["env"] == "prod" and len(lin["datasets"][0]["sha256"]) == 64
    assert [v["decision"] for v in lin["reviews"]] == ["release"] and len(lin["exports"]) == 3
    assert client.get(f"/api/v1/results/{rid}/lineage", headers=auth("insurer_b")).status_code == 404


def test_reviewer_refusals(client, auth, engine, settings, loaded):
    scene = active_scene(client, auth)
    rid = held_result(client, auth, engine, settings, scene["id"])["id"]
    # an applicant cannot review, even its own result
    r = review(client, auth("insurer_a"), rid)
    assert r.status_code == 403 and r.json()["code"] == "role_not_permitted"
    # a reviewer of the same organization is refused
    make_user(engine, settings, "qa_a", _org_of(engine, "insurer_a"), "reviewer")
    r = review(client, login(client, "qa_a"), rid)
    assert r.status_code == 403 and r.json()["code"] == "reviewer_same_org"
    # a company's reviewer never sees another company's results at all
    make_user(engine, settings, "qa_b", _org_of(engine, "insurer_b"), "reviewer")
    assert review(client, login(client, "qa_b"), rid).status_code == 404
    assert client.get(f"/api/v1/results/{rid}", headers=login(client, "qa_b")).status_code == 404
    # … nor in the review queue (neither does the same company's reviewer: it may decide none of them)
    assert client.get("/api/v1/reviews/queue", headers=login(client, "qa_b")).json() == []
    assert client.get("/api/v1/reviews/queue", headers=login(client, "qa_a")).json() == []
    assert [x["id"] for x in client.get("/api/v1/reviews/queue", headers=auth("reviewer1")).json()] == [rid]
    # a reason is required; bad input changes nothing
    r = client.post(f"/api/v1/results/{rid}/review", headers=auth("reviewer1"), json={"decision": "release"})
    assert r.status_code == 422
    r = client.post(f"/api/v1/results/{rid}/review", headers=auth("reviewer1"), json={"decision": "maybe", "reason": "x"})
    assert r.status_code == 422
    with Session(engine) as s:
        assert s.get(QueryResult, rid).status == "held"
    # reject: nothing goes out, and the decision is final
    r = review(client, auth("reviewer1"), rid, "reject", "cell counts too small for the purpose")
    assert r.status_code == 200 and r.json()["status"] == "rejected"
    assert client.get(f"/api/v1/results/{rid}/download", headers=auth("insurer_a")).status_code == 403
    assert review(client, auth("reviewer1"), rid).status_code == 409
    q = client.get(f"/api/v1/queries/{_query_of(engine, rid)}", headers=auth("insurer_a")).json()
    assert q["status"] == "rejected"


def _org_of(engine, username: str) -> str:
    with Session(engine) as s:
        return identities.principal_for(s, username).org_code


def _query_of(engine, rid: int) -> int:
    with Session(engine) as s:
        return s.get(QueryResult, rid).query_id


def test_two_independent_reviewers_when_the_scene_asks(client, auth, engine, settings, loaded):
    scene = active_scene(client, auth, release_policy={"auto_release": "none", "reviewers_required": 2})
    rid = held_result(client, auth, engine, settings, scene["id"])["id"]
    assert client.get(f"/api/v1/results/{rid}", headers=auth("reviewer1")).json()["rows"]
    r = review(client, auth("reviewer1"), rid)
    assert r.status_code == 200 and r.json()["status"] == "held"
    r = review(client, auth("reviewer1"), rid)
    assert r.status_code == 409 and r.json()["code"] == "already_reviewed"
    # having decided, the first reviewer no longer sees the cells
    mine = client.get(f"/api/v1/results/{rid}", headers=auth("reviewer1")).json()
    assert mine["rows"] is None and mine["cells_visible"] is False and mine["decided_by_me"] is True
    assert client.get(f"/api/v1/results/{rid}/download", headers=auth("insurer_a")).status_code == 403
    make_user(engine, settings, "reviewer2", _org_of(engine, "reviewer1"), "reviewer")
    r = review(client, login(client, "reviewer2"), rid, reason="second look: fine")
    assert r.status_code == 200 and r.json()["status"] == "released"
    assert client.get(f"/api/v1/results/{rid}/download", headers=auth("insurer_a")).status_code == 200


@CHECKS_ONLY
def test_the_release_policy_lets_clean_dp_aggregates_out_at_once(client, auth, engine, settings, loaded):
    # ε = 2: at ε = 0.5 the noise (scale 20) put the smallest district below 10 about one run in 30
    scene = active_scene(client, auth, release_policy={"auto_release": "dp_aggregates"}, budget_epsilon=10.0,
                         max_query_epsilon=2.0)
    res = held_result(client, auth, engine, settings, scene["id"], sql=BY_DISTRICT_COUNT, epsilon=2.0)
    assert res["report"]["verdict"] == "pass", res["report"]
    assert res["status"] == "released" and res["released_by"] == "policy"
    assert client.get(f"/api/v1/results/{res['id']}/download", headers=auth("insurer_a")).status_code == 200
    with Session(engine) as s:
        ev = s.exec(select(AuditEvent).where(AuditEvent.action == "result.release",
                                             AuditEvent.object == f"result:{res['id']}")).one()
        run = s.exec(select(AuditEvent).where(AuditEvent.action == "query.run",
                                              AuditEvent.object == f"query:{res['query_id']}")).one()
    assert ev.actor == "system" and ev.decision == "allow"
    assert run.reason == "released" and run.detail["result_id"] == res["id"] and run.seq < ev.seq


@CHECKS_ONLY
def test_a_rows_answer_is_never_released_by_policy(client, auth, engine, settings, loaded):
    items = SCENE_ITEMS + [{"dataset": VISITS, "field": "person_id", "usage": "masked_output"},
                           {"dataset": VISITS, "field": "visit_date", "usage": "masked_output"}]
    scene = active_scene(client, auth, items=items, release_policy={"auto_release": "dp_aggregates"})
    res = held_result(client, auth, engine, settings, scene["id"],
                      sql=f"SELECT person_id, visit_date FROM {VISITS} WHERE visit_date >= DATE '2025-06-01'")
    assert res["status"] == "held" and res["kind"] == "rows"
    checks = {c["name"]: c for c in res["report"]["checks"]}
    assert {"k_anonymity", "l_diversity", "pii"} <= set(checks)


@CHECKS_ONLY
def test_suppression_makes_a_new_checked_version(client, auth, engine, settings, loaded):
    scene = active_scene(client, auth)
    res = held_result(client, auth, engine, settings, scene["id"])
    rid = res["id"]
    cell = {"district": "兴庆区"}
    r = client.post(f"/api/v1/results/{rid}/revisions", headers=auth("reviewer1"),
                    json={"action": "suppress", "cells": [cell], "reason": "policy: suppress the capital"})
    assert r.status_code == 201, r.text
    v2 = r.json()
    assert v2["version"] == 2 and v2["parent_id"] == rid and v2["status"] == "held"
    row = next(x for x in v2["rows"] if x["district"] == "兴庆区")
    assert row["n"] is None and row["total"] is None
    assert all(x["n"] is not None for x in v2["rows"] if x["district"] != "兴庆区")
    old = client.get(f"/api/v1/results/{rid}", headers=auth("reviewer1")).json()
    assert old["status"] == "superseded" and old["rows"] is None
    # the tenant sees the decision, not the deliberation: until a version is released, the first one,
    # held, unrevised; the new version does not exist for it (a revision says a check failed)
    q = client.get(f"/api/v1/queries/{res['query_id']}", headers=auth("insurer_a")).json()
    assert q["result_id"] == rid and q["status"] == "held"
    mine = client.get(f"/api/v1/results/{rid}", headers=auth("insurer_a")).json()
    assert (mine["status"], mine["version"], mine["revision"], mine["decided_at"]) == ("held", 1, None, None)
    assert client.get(f"/api/v1/results/{v2['id']}", headers=auth("insurer_a")).status_code == 404
    assert client.get(f"/api/v1/results/{v2['id']}/lineage", headers=auth("insurer_a")).status_code == 404
    lin = client.get(f"/api/v1/results/{rid}/lineage", headers=auth("insurer_a")).json()
    assert [(v["version"], v["status"], v["revision"]) for v in lin["versions"]] == [(1, "held", None)]
    assert v2["id"] not in [x["id"] for x in client.get("/api/v1/results", headers=auth("insurer_a")).json()]
    # nor do the tenant's status filters tell (review r4 #2: it left `?status=held` for `superseded`)
    listed = {st: [x["id"] for x in client.get("/api/v1/results", headers=auth("insurer_a"),
                                               params={"status": st}).json()]
              for st in ("held", "released", "rejected", "superseded")}
    assert listed == {"held": [rid], "released": [], "rejected": [], "superseded": []}
    # a superseded version can be neither reviewed nor downloaded
    assert review(client, auth("reviewer1"), rid).status_code == 409
    # the same reviewer may release the new version (their revision is not a decision on it)
    assert review(client, auth("reviewer1"), v2["id"]).json()["status"] == "released"
    q = client.get(f"/api/v1/queries/{res['query_id']}", headers=auth("insurer_a")).json()
    assert q["result_id"] == v2["id"] and q["status"] == "released"
    mine = client.get(f"/api/v1/results/{v2['id']}", headers=auth("insurer_a")).json()
    assert mine["revision"]["action"] == "suppress" and mine["revision"]["cells"] == [cell]
    assert client.get(f"/api/v1/results/{rid}/download", headers=auth("insurer_a")).status_code == 403
    csv = client.get(f"/api/v1/results/{v2['id']}/download", headers=auth("insurer_a"))
    assert csv.status_code == 200
    lin = client.get(f"/api/v1/results/{v2['id']}/lineage", headers=auth("auditor1")).json()
    assert [(v["version"], v["status"]) for v in lin["versions"]] == [(1, "superseded"), (2, "released")]
    assert lin["versions"][1]["revision"]["action"] == "suppress"
    # unknown key columns are refused and change nothing
    r = client.post(f"/api/v1/results/{v2['id']}/revisions", headers=auth("reviewer1"),
                    json={"action": "suppress", "cells": [{"hospital": "x"}], "reason": "x"})
    assert r.status_code in (409, 422)


@CHECKS_ONLY
def test_rounding_makes_a_new_checked_version(client, auth, engine, settings, loaded):
    scene = active_scene(client, auth)
    res = held_result(client, auth, engine, settings, scene["id"])
    r = client.post(f"/api/v1/results/{res['id']}/revisions", headers=auth("reviewer1"),
                    json={"action": "round", "columns": ["n"], "base": 10, "reason": "round counts to 10"})
    assert r.status_code == 201, r.text
    v2 = r.json()
    assert all(x["n"] % 10 == 0 for x in v2["rows"])
    assert v2["report"]["revision"]["base"] == 10
    r = client.post(f"/api/v1/results/{v2['id']}/revisions", headers=auth("reviewer1"),
                    json={"action": "round", "columns": ["district"], "base": 10, "reason": "x"})
    assert r.status_code == 422 and r.json()["code"] == "not_a_value_column"


def test_no_path_downloads_an_unreleased_result(client, auth, engine, settings, loaded):
    scene = active_scene(client, auth)
    held = held_result(client, auth, engine, settings, scene["id"])["id"]
    rejected = held_result(client, auth, engine, settings, scene["id"])["id"]
    assert review(client, auth("reviewer1"), rejected, "reject", "no").status_code == 200
    for rid in (held, rejected):
        for who in ("insurer_a", "insurer_b", "reviewer1", "auditor1", "office1", "provider1", "operator1"):
            for fmt in ("csv", "parquet", "json"):
                r = client.get(f"/api/v1/results/{rid}/download?format={fmt}", headers=auth(who))
                assert r.status_code in (403, 404), (rid, who, fmt, r.status_code)
            body = client.get(f"/api/v1/results/{rid}", headers=auth(who))
            if body.status_code == 200 and who != "reviewer1":
                assert body.json()["rows"] is None, who
    with Session(engine) as s:
        assert s.exec(select(ResultExport)).all() == []
        q = s.exec(select(Query).where(Query.mode == "prod")).all()
    assert {x.status for x in q} == {"held", "rejected"}


@CHECKS_ONLY
def test_trace_survives_a_spreadsheet_and_refuses_garbage_clearly(client, auth, engine, settings, loaded):
    scene = active_scene(client, auth)
    rid = held_result(client, auth, engine, settings, scene["id"])["id"]
    assert review(client, auth("reviewer1"), rid).status_code == 200
    csv = client.get(f"/api/v1/results/{rid}/download", headers=auth("insurer_a")).content.decode()
    rows = [ln.split(",") for ln in csv.splitlines() if not ln.startswith("#")][1:]
    # a spreadsheet's "General" format keeps about 6–10 significant digits of the sums
    resaved = "\n".join(",".join(f"{float(c):.6g}" if c.replace(".", "").lstrip("-").isdigit() else c for c in row)
                        for row in rows).encode("gbk")
    t = client.post("/api/v1/trace", headers=auth("auditor1"), files={"file": ("excel.csv", resaved)}).json()
    assert t["matched"] and t["match"] == "similar" and t["result_id"] == rid and t["similarity"] >= 0.99
    assert t["cells_intact"] is False
    for junk in (b"", b"\x00\x01\x02PK\x03\x04garbage", b"PAR1not really"):
        r = client.post("/api/v1/trace", headers=auth("auditor1"), files={"file": ("x.bin", junk)})
        assert r.status_code in (413, 422) and r.json()["code"] and r.json()["message_zh"], r.text


@CHECKS_ONLY
def test_a_rows_answer_failing_k_anonymity_is_fixed_by_suppressing_its_small_classes(client, auth, engine, settings,
                                                                                      loaded):
    items = SCENE_ITEMS + [{"dataset": VISITS, "field": "person_id", "usage": "masked_output"},
                           {"dataset": VISITS, "field": "visit_date", "usage": "masked_output"}]
    scene = active_scene(client, auth, items=items)
    # visit_date is a quasi-identifier, output as its month: the few late-October visits form a small class
    res = held_result(client, auth, engine, settings, scene["id"],
                      sql=f"SELECT person_id, visit_date FROM {VISITS} WHERE visit_date >= DATE '2025-10-29'")
    checks = {c["name"]: c for c in res["report"]["checks"]}
    assert checks["k_anonymity"]["verdict"] == "fail" and res["report"]["verdict"] == "fail"
    assert checks["min_persons"]["verdict"] == "pass" and checks["differencing"]["verdict"] == "pass"
    # a failing check is not released by one reviewer's plain decision
    r = client.post(f"/api/v1/results/{res['id']}/review", headers=auth("reviewer1"),
                    json={"decision": "release", "reason": "looks fine"})
    assert r.status_code == 409 and r.json()["code"] == "release_needs_override"
    months = {r["visit_date"] for r in res["rows"]}
    r = client.post(f"/api/v1/results/{res['id']}/revisions", headers=auth("reviewer1"),
                    json={"action": "suppress", "cells": "failing", "reason": "drop classes below k"})
    assert r.status_code == 201, r.text
    v2 = r.json()
    assert {c["name"]: c["verdict"] for c in v2["report"]["checks"]}["k_anonymity"] == "pass"
    assert {x["visit_date"] for x in v2["rows"]} < months and v2["row_count"] < res["row_count"]
    # the new version keeps the identities of the rows it kept, in its own file beside it
    from sandbox.results import export
    with Session(engine) as s:
        new, old = s.get(QueryResult, v2["id"]), s.get(QueryResult, res["id"])
        kept, before = export.stored_row_keys(settings, new), export.stored_row_keys(settings, old)
    assert len(kept) == new.row_count and set(kept) < set(before) and new.stats_path != old.stats_path
    # naming cells is for aggregates; rows are suppressed by class
    r = client.post(f"/api/v1/results/{v2['id']}/revisions", headers=auth("reviewer1"),
                    json={"action": "suppress", "cells": [{"visit_date": "2025-11"}], "reason": "x"})
    assert r.status_code == 422 and r.json()["code"] == "suppress_rows_failing_only"


@pytest.mark.parametrize("thresholds", first_also_on_postgresql([{"min_cell_count": 5}, {"dominance_k": 0.95},
                                                                  {"p_ratio": 0.05}, {"k_anonymity": 2},
                                                                  {"l_diversity": 1}, {"dominance_n": 1}]))
def test_a_scene_may_only_make_the_thresholds_stricter(client, auth, thresholds):
    from tests.scene_helpers import application

    r = client.post("/api/v1/scenes", headers=auth("insurer_a"),
                    json=application(release_policy={"thresholds": thresholds}))
    assert r.status_code == 422 and r.json()["code"] and r.json()["message_zh"], r.text
    r = client.post("/api/v1/scenes", headers=auth("insurer_a"),
                    json=application(release_policy={"thresholds": {"min_cell_count": 20, "p_ratio": 0.2}}))
    assert r.status_code == 201, r.text
    got = client.get(f"/api/v1/scenes/{r.json()['id']}", headers=auth("insurer_a")).json()["release_policy"]
    assert got["thresholds"]["min_cell_count"] == 20 and got["thresholds"]["dominance_k"] == 0.9


@CHECKS_ONLY
def test_a_stricter_scene_threshold_holds_what_the_default_would_release(client, auth, engine, settings, loaded):
    scene = active_scene(client, auth, release_policy={"auto_release": "dp_aggregates",
                                                       "thresholds": {"min_cell_count": 1000}})
    res = held_result(client, auth, engine, settings, scene["id"], sql=BY_DISTRICT_COUNT)
    checks = {c["name"]: c for c in res["report"]["checks"]}
    assert checks["min_cell_count"]["verdict"] == "review" and res["status"] == "held"
    assert "1000" in checks["min_cell_count"]["reason"] and len(checks["min_cell_count"]["cells"]) == 6
    # what held it is the noisy answer (every district's noisy count is below 1000), not the exact counts
    assert checks["noisy_counts"]["verdict"] == "review" and len(checks["noisy_counts"]["cells"]) == 6
    assert all(row["n"] < 1000 for row in res["rows"])


def test_a_clean_dp_aggregate_is_released_by_policy_and_audited(client, auth, engine, settings, loaded):
    """Automatic release on public facts: the worker records it in the chain as the system's."""
    # ε = 2: noise of scale 5 on counts of 90 and more, never near the minimum of 10
    scene = active_scene(client, auth, release_policy={"auto_release": "dp_aggregates"}, budget_epsilon=10.0,
                         max_query_epsilon=2.0)
    res = held_result(client, auth, engine, settings, scene["id"], sql=BY_DISTRICT_COUNT, epsilon=2.0)
    checks = {c["name"]: c["verdict"] for c in res["report"]["checks"]}
    assert {checks[n] for n in ("budget", "pii", "noisy_counts")} == {"pass"}
    assert res["status"] == "released" and res["released_by"] == "policy"
    with Session(engine) as s:
        ev = s.exec(select(AuditEvent).where(AuditEvent.action == "result.release",
                                             AuditEvent.object == f"result:{res['id']}")).one()
    assert ev.actor == "system" and ev.reason == "release_policy:dp_aggregates"
    assert client.get(f"/api/v1/results/{res['id']}/download", headers=auth("insurer_a")).status_code == 200


def test_decisions_on_one_result_run_one_after_the_other(engine, settings, client, auth, loaded, monkeypatch):
    """A release racing a reject (or a revision) never leaves a rejected or superseded version
    released: the result row is taken first, on SQLite as on PostgreSQL."""
    import threading

    from pdao.kernel.errors import PdaoError
    from sandbox.results import export

    scene = active_scene(client, auth)
    rid = held_result(client, auth, engine, settings, scene["id"])["id"]
    make_user(engine, settings, "reviewer2", _org_of(engine, "reviewer1"), "reviewer")
    barrier = threading.Barrier(2, timeout=1.5)
    real = export._reviewable

    def slow(*a, **kw):   # both would pass the checks together if nothing serialised them
        out = real(*a, **kw)
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            pass
        return out

    monkeypatch.setattr(export, "_reviewable", slow)
    outcomes = {}

    def decide(who: str, decision: str) -> None:
        with Session(engine) as s:
            p = identities.principal_for(s, who)
            try:
                outcomes[who] = export.review(s, p, rid, decision, f"{decision} by {who}").status
            except PdaoError as e:
                outcomes[who] = e.code

    threads = [threading.Thread(target=decide, args=a) for a in (("reviewer1", "reject"), ("reviewer2", "release"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(outcomes.values()) in (["rejected", "result_not_held"], ["released", "result_not_held"]), outcomes
    with Session(engine) as s:
        final = s.get(QueryResult, rid).status
        reviews = s.exec(select(export.ResultReview).where(export.ResultReview.result_id == rid)).all()
    assert len(reviews) == 1 and final == {"reject": "rejected", "release": "released"}[reviews[0].decision]


def test_trace_names_the_right_tenant_when_two_hold_the_same_cells(client, auth, engine, settings, loaded):
    items = SCENE_ITEMS + [{"dataset": VISITS, "field": "visit_date", "usage": "masked_output"}]
    sql = f"SELECT visit_date FROM {VISITS} WHERE visit_date >= DATE '2025-11-01'"
    stamped = {}
    for tenant in ("insurer_a", "insurer_b"):
        scene = active_scene(client, auth, applicant=tenant, items=items)
        r = client.post(f"/api/v1/scenes/{scene['id']}/queries", headers=auth(tenant), json={"sql": sql, "mode": "prod"})
        assert work_once(engine, settings)
        rid = client.get(f"/api/v1/queries/{r.json()['id']}", headers=auth(tenant)).json()["result_id"]
        assert review(client, auth("reviewer1"), rid).status_code == 200
        d = client.get(f"/api/v1/results/{rid}/download", headers=auth(tenant))
        stamped[tenant] = (rid, d.headers["X-Pdao-Export"], d.content)
    rid_a, export_a, csv_a = stamped["insurer_a"]
    t = client.post("/api/v1/trace", headers=auth("auditor1"), files={"file": ("a.csv", csv_a)}).json()
    assert t["match"] == "stamp" and t["export_id"] == export_a and t["result_id"] == rid_a
    assert t["requester"]["username"] == "insurer_a" and t["stamp_matches_cells"] is True
    # without the stamp the cells cannot tell the two apart: both are named, neither is picked
    bare = b"\n".join(ln for ln in csv_a.splitlines() if not ln.startswith(b"#"))
    t = client.post("/api/v1/trace", headers=auth("auditor1"), files={"file": ("a.csv", bare)}).json()
    assert t["ambiguous"] is True and t["result_id"] is None
    assert {m["requester"]["username"] for m in t["matches"]} == {"insurer_a", "insurer_b"}
    # other cells of insurer_b under insurer_a's genuine stamp: the stamp is real, but not these cells'
    scene_b = client.get("/api/v1/scenes", headers=auth("insurer_b")).json()
    scene_b = (scene_b["items"] if isinstance(scene_b, dict) else scene_b)[0]["id"]
    other = _prod_result_id(client, auth("insurer_b"), engine, settings, scene_b,
                            f"SELECT visit_date FROM {VISITS} WHERE visit_date >= DATE '2025-12-01'")
    assert review(client, auth("reviewer1"), other).status_code == 200
    csv_b = client.get(f"/api/v1/results/{other}/download", headers=auth("insurer_b")).content
    transplanted = csv_a.splitlines()[0] + b"\n" + b"\n".join(csv_b.splitlines()[1:])
    t = client.post("/api/v1/trace", headers=auth("auditor1"), files={"file": ("t.csv", transplanted)}).json()
    assert t["stamp_valid"] is True and t["stamp_matches_cells"] is False
    assert t["match"] == "content" and t["result_id"] == other and t["requester"]["username"] == "insurer_b"
    # the genuine stamp on altered cells: its export, flagged as altered
    altered = csv_a.replace(b"2025-12", b"2024-12")
    t = client.post("/api/v1/trace", headers=auth("auditor1"), files={"file": ("t.csv", altered)}).json()
    assert t["match"] == "stamp_only" and t["export_id"] == export_a and t["cells_intact"] is False
    # a forged stamp on cells that match nothing matches nothing
    forged = (csv_a.splitlines()[0].replace(b"fingerprint ", b"fingerprint 0") + b"\nvisit_date\n1999-01\n")
    t = client.post("/api/v1/trace", headers=auth("auditor1"), files={"file": ("f.csv", forged)}).json()
    assert t["matched"] is False and t["stamp_valid"] is False


def test_malformed_revisions_are_refused_clearly_and_change_nothing(client, auth, engine, settings, loaded):
    scene = active_scene(client, auth)
    rid = held_result(client, auth, engine, settings, scene["id"])["id"]
    for cells in ([{"district": ["兴庆区"]}], [{"district": {"a": 1}}], [{}], [{"district": "兴庆区", "x": 1}],
                  [{"district": "no such district"}], ["兴庆区"], []):
        r = client.post(f"/api/v1/results/{rid}/revisions", headers=auth("reviewer1"),
                        json={"action": "suppress", "cells": cells, "reason": "x"})
        assert r.status_code == 422 and r.json()["code"] and r.json()["message_zh"], (cells, r.text)
    # a key grouped on but not selected: the output cannot name the cell, so nothing is suppressed
    hidden = held_result(client, auth, engine, settings, scene["id"],
                         sql=f"SELECT COUNT(*) AS n FROM {VISITS} GROUP BY district")["id"]
    r = client.post(f"/api/v1/results/{hidden}/revisions", headers=auth("reviewer1"),
                    json={"action": "suppress", "cells": "failing", "reason": "x"})
    assert r.status_code == 422 and r.json()["code"] in ("suppress_needs_selected_keys", "nothing_to_suppress")
    with Session(engine) as s:
        assert {x.status for x in s.exec(select(QueryResult)).all()} == {"held"}
        assert all(x.version == 1 for x in s.exec(select(QueryResult)).all())


@CHECKS_ONLY
def test_pdao_trace_names_a_stripped_file_and_is_audited(client, auth, engine, settings, loaded, pdao, tmp_path):
    scene = active_scene(client, auth)
    rid = held_result(client, auth, engine, settings, scene["id"])["id"]
    assert review(client, auth("reviewer1"), rid).status_code == 200
    csv = client.get(f"/api/v1/results/{rid}/download", headers=auth("insurer_a")).content
    found = tmp_path / "found.csv"
    found.write_bytes(b"\n".join([ln for ln in csv.splitlines() if not ln.startswith(b"#")][1:]))   # no header
    out = pdao("trace", str(found)).output
    assert "matched by content" in out and "requester: insurer_a" in out and "reviewers: reviewer1" in out
    assert f"result:    {rid}" in out and VISITS in out
    as_json = json.loads(pdao("trace", str(found), "--json").output)
    assert as_json["result_id"] == rid and as_json["requester"]["username"] == "insurer_a"
    nothing = tmp_path / "other.csv"
    nothing.write_text("a,b\n1,2\n")
    assert "no match" in pdao("trace", str(nothing), ok=False).output
    with Session(engine) as s:
        events = s.exec(select(AuditEvent).where(AuditEvent.action == "cli.trace")).all()
    assert len(events) == 3 and {e.object for e in events} == {"found.csv", "other.csv"}


@CHECKS_ONLY
def test_orphan_result_files_are_swept_and_referenced_ones_kept(client, auth, engine, settings, loaded):
    import os
    import time

    from sandbox.results import export

    scene = active_scene(client, auth)
    res = held_result(client, auth, engine, settings, scene["id"])
    with Session(engine) as s:
        r = s.get(QueryResult, res["id"])
        kept = [settings.results_dir / r.storage_path, settings.results_dir / r.stats_path]
    folder = kept[0].parent
    orphan, fresh = folder / "q999-crashed.parquet", folder / "q998-being-written.parquet"
    for f in (orphan, fresh):
        f.write_bytes(b"PAR1")
    day_ago = time.time() - 2 * 24 * 3600
    for f in (orphan, *kept):
        os.utime(f, (day_ago, day_ago))
    with Session(engine) as s:
        assert export.sweep_orphans(s, settings) == 1
    assert not orphan.exists() and fresh.exists() and all(f.exists() for f in kept)


@CHECKS_ONLY
def test_suppressing_failing_cells_of_a_dp_aggregate_never_follows_an_exact_statistic(client, auth, engine, settings,
                                                                                      loaded):
    """The second review: SUM(fee) by district at a tiny ε is pure noise, yet "suppress failing" nulled
    exactly the cells with fewer than 10 persons — an exact fact published whatever the ε. Of a DP
    aggregate, `failing` names only what a check on the released answer itself names."""
    scene = active_scene(client, auth)
    sql = (f"SELECT district, SUM(fee) AS total FROM {VISITS} WHERE visit_date >= DATE '2025-12-20' "
           "GROUP BY district")
    res = held_result(client, auth, engine, settings, scene["id"], sql=sql, epsilon=0.01)
    small = {c["name"]: c for c in res["report"]["checks"]}["min_cell_count"]
    assert small["verdict"] != "pass" and small["cells"]          # exact: some districts are small
    r = client.post(f"/api/v1/results/{res['id']}/revisions", headers=auth("reviewer1"),
                    json={"action": "suppress", "cells": "failing", "reason": "suppress what fails"})
    assert r.status_code == 422 and r.json()["code"] == "nothing_to_suppress", r.text
