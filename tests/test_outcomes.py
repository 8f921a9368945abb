"""What a tenant can observe about a prod run (rule 6; sandbox/queries/outcomes.py, docs/threat-model.md).

The review's critical finding, run as it was described: a prod query whose failure depended on the
data (a literal compared with a text column of the tenant's upload) told the tenant, for free, the
value a person held. Here: the probe is refused before anything runs; a prod run that fails while
reading the data shows its tenant exactly what a successful one shows and is charged the same; its
outcome appears at the end of a timing class; dev queries are jobs with a rate, a time limit and a
cost limit."""

from __future__ import annotations

import dataclasses
import time

import duckdb
import pytest
from sqlmodel import Session, select

from policies.enforcer import SceneEnforcers
from sandbox.budgets import ledger
from sandbox.queries import outcomes
from sandbox.results.models import Query
from sandbox.worker import claim, run_one, worker_name
from tests.scene_helpers import BY_DISTRICT, SCENE_ITEMS, VISITS, active_scene, budget
from tests.test_upload_joins import ITEMS as JOIN_ITEMS  # noqa: F401
from tests.test_upload_joins import RESIDENTS, residents, upload_applicants  # noqa: F401 - `residents` is a fixture

# What differs between two runs of the same query whatever happens: who they are and when.
RUN_IDENTITY = {"id", "query_id", "result_id", "created_at", "started_at", "finished_at", "decided_at"}


def work_once(engine, settings) -> bool:
    return run_one(engine, settings, SceneEnforcers(engine), worker_name())


def tenant_view(client, auth, query_id: int) -> tuple[dict, dict]:
    q = client.get(f"/api/v1/queries/{query_id}", headers=auth("insurer_a")).json()
    r = client.get(f"/api/v1/results/{q['result_id']}", headers=auth("insurer_a")).json()
    return ({k: v for k, v in q.items() if k not in RUN_IDENTITY}, {k: v for k, v in r.items() if k not in RUN_IDENTITY})


def test_the_reviews_failing_query_probe_is_refused_before_anything_runs(client, auth, engine, residents):  # noqa: F811
    """`d.district = '兴庆区' OR u.tag = 1` on a text upload column: DuckDB would cast the column only
    where the dataset condition is false, failing exactly when the target's value is not the guess."""
    upload_applicants(client, auth("insurer_a"), residents[:20])
    scene = active_scene(client, auth, items=JOIN_ITEMS + [{"dataset": RESIDENTS, "field": "district", "usage": "filter"}])
    probe = (f"SELECT COUNT(*) AS n FROM {RESIDENTS} d JOIN applicants u ON d.id_number = u.id_number "
             "WHERE d.district = '兴庆区' OR u.note = 1")
    for mode in ("prod", "dev"):
        r = client.post(f"/api/v1/scenes/{scene['id']}/queries", headers=auth("insurer_a"),
                        json={"sql": probe, "mode": mode, "epsilon": 0.01})
        assert r.status_code == 422 and r.json()["code"] == "query_refused", r.text
        assert "upload applicants.note" in r.text and r.json()["message_zh"]
    assert budget(client, auth, scene["id"])["epsilon_spent"] == 0
    with Session(engine) as s:
        assert s.exec(select(Query)).all() == []
    ok = probe.replace("u.note = 1", "u.note = '1'")   # the column's own type: accepted, and total
    r = client.post(f"/api/v1/scenes/{scene['id']}/queries", headers=auth("insurer_a"),
                    json={"sql": ok, "mode": "dev", "epsilon": 0.01})
    assert r.status_code == 202 and r.json()["status"] == "done", r.text


def test_a_prod_run_that_fails_reading_the_data_shows_its_tenant_what_any_held_run_shows(
        client, auth, engine, settings, loaded, monkeypatch):
    import sandbox.engine.execute

    scene = active_scene(client, auth)
    ids = []
    for _ in range(2):
        r = client.post(f"/api/v1/scenes/{scene['id']}/queries", headers=auth("insurer_a"),
                        json={"sql": BY_DISTRICT, "mode": "prod", "epsilon": 0.3})
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
    assert work_once(engine, settings)                 # the first runs as usual

    real = sandbox.engine.execute.domain_connection

    def failing_on_a_row(*args, **kwargs):   # as a cast failing on some row of the data would
        raise duckdb.ConversionException("Could not convert string '兴庆区' to INT32")

    monkeypatch.setattr(sandbox.engine.execute, "domain_connection", failing_on_a_row)
    assert work_once(engine, settings)                 # the second fails inside the domain
    monkeypatch.setattr(sandbox.engine.execute, "domain_connection", real)

    ok, failed = tenant_view(client, auth, ids[0]), tenant_view(client, auth, ids[1])
    assert ok == failed and ok[0]["status"] == "held" and ok[1]["status"] == "held"
    assert "兴庆区" not in str(failed) and ok[1]["row_count"] == 6 and ok[1]["noise"]
    assert budget(client, auth, scene["id"])["epsilon_spent"] == pytest.approx(0.6)     # both charged
    with Session(engine) as s:
        assert [e.state for e in ledger.entries(s, scene["id"])] == ["charged", "charged"]
    # staff see why, and nobody can release a run that failed
    rid = client.get(f"/api/v1/queries/{ids[1]}", headers=auth("insurer_a")).json()["result_id"]
    staff = client.get(f"/api/v1/results/{rid}", headers=auth("reviewer1")).json()
    assert outcomes.is_failed_run(staff["report"]) and staff["report"]["failed"] == "query_failed"


def test_a_refusal_before_the_data_is_read_is_told_and_refunded(client, auth, engine, settings, loaded):
    """A scene suspended between submission and run: the job is refused on the scene alone."""
    scene = active_scene(client, auth)
    q = client.post(f"/api/v1/scenes/{scene['id']}/queries", headers=auth("insurer_a"),
                    json={"sql": BY_DISTRICT, "mode": "prod", "epsilon": 0.3}).json()
    assert client.post(f"/api/v1/scenes/{scene['id']}/suspend", headers=auth("office1"),
                       json={"reason": "check"}).status_code == 200
    assert work_once(engine, settings)
    got = client.get(f"/api/v1/queries/{q['id']}", headers=auth("insurer_a")).json()
    assert got["status"] == "failed" and got["error"]["code"] == "scene_not_active" and got["result_id"] is None
    assert budget(client, auth, scene["id"])["epsilon_spent"] == 0


def test_timing_classes():
    assert [outcomes.timing_class_end(t, 1.0) for t in (0.0, 0.3, 1.0, 1.01, 3.9, 4.1)] == [1, 1, 1, 2, 4, 8]
    assert outcomes.timing_class_end(0.3, 0.0) == 0.3
    started = time.monotonic()
    assert outcomes.wait_for_class_end(started, 0.2) and time.monotonic() - started >= 0.2
    assert not outcomes.wait_for_class_end(time.monotonic(), 5.0, stop=lambda: True)
    started = time.monotonic()   # the plan's floor: a run predicted to take 0.5 s shows at its class, 0.8 s
    assert outcomes.wait_for_class_end(started, 0.2, at_least=0.5) and time.monotonic() - started >= 0.8
    started = time.monotonic()   # classes off: no padding, floor or not
    assert outcomes.wait_for_class_end(started, 0.0, at_least=5.0) and time.monotonic() - started < 0.5


# By default on sqlite only (timing in the worker; the same path on PostgreSQL: test_a_prod_run_that_fails_reading_the_data_shows_its_tenant_what_any_held_run_shows).
@pytest.mark.default_backend("sqlite")
def test_a_prod_outcome_shows_at_the_end_of_its_timing_class_whether_it_failed_or_not(
        client, auth, engine, settings, loaded, monkeypatch):
    import sandbox.engine.execute

    timed = dataclasses.replace(settings, prod_timing_base_seconds=1.0)
    scene = active_scene(client, auth)
    spans = []
    for broken in (False, True):
        q = client.post(f"/api/v1/scenes/{scene['id']}/queries", headers=auth("insurer_a"),
                        json={"sql": BY_DISTRICT, "mode": "prod", "epsilon": 0.2}).json()
        if broken:
            monkeypatch.setattr(sandbox.engine.execute, "domain_connection", lambda *a, **k: 1 / 0)
        assert work_once(engine, timed)
        got = client.get(f"/api/v1/queries/{q['id']}", headers=auth("insurer_a")).json()
        assert got["status"] == "held" and got["attempts"] is None
        with Session(engine) as s:
            job = s.get(Query, q["id"])
            spans.append((job.finished_at - job.started_at).total_seconds())
    assert all(1.0 <= span < 1.9 for span in spans), spans   # both in the first class (the run itself: ms)


def _times(obj) -> list[str]:
    """Every timestamp in a JSON answer (keys ending in `_at`, and `at`)."""
    if isinstance(obj, dict):
        return [v for k, v in obj.items() if (k == "at" or k.endswith("_at")) and isinstance(v, str)] + \
            [t for v in obj.values() for t in _times(v)]
    if isinstance(obj, list):
        return [t for v in obj for t in _times(v)]
    return []


# By default on sqlite only (timing in the worker; the same path on PostgreSQL: test_a_prod_run_that_fails_reading_the_data_shows_its_tenant_what_any_held_run_shows).
@pytest.mark.default_backend("sqlite")
def test_no_time_a_tenant_sees_of_a_held_answer_falls_inside_its_timing_class(client, auth, engine, settings, loaded):
    """Review r4 #1: the held result's `created_at` was stamped when the engine was done, before the
    wait for the class end, so `created_at - started_at` gave the run's real duration to the
    millisecond (and, through masking time, the hidden size of a row answer). Every time the tenant
    sees of the query, its result and its lineage is before the run started (its submission, the
    scene's approvals, the data's loading), the claim, or at or after the class end."""
    from datetime import datetime, timedelta

    timed = dataclasses.replace(settings, prod_timing_base_seconds=1.0)
    scene = active_scene(client, auth)
    a = auth("insurer_a")
    q = client.post(f"/api/v1/scenes/{scene['id']}/queries", headers=a,
                    json={"sql": BY_DISTRICT, "mode": "prod", "epsilon": 0.2}).json()
    assert work_once(engine, timed)
    got = client.get(f"/api/v1/queries/{q['id']}", headers=a).json()
    assert got["status"] == "held"
    views = [got, client.get(f"/api/v1/results/{got['result_id']}", headers=a).json(),
             client.get(f"/api/v1/results/{got['result_id']}/lineage", headers=a).json(),
             client.get("/api/v1/results", headers=a).json()]
    started = datetime.fromisoformat(got["started_at"])
    seen = [datetime.fromisoformat(t) for v in views for t in _times(v)]
    assert len(seen) >= 4
    inside = [t for t in seen if started < t < started + timedelta(seconds=1.0)]
    assert inside == [], (started, inside)


class _SlowConnection:
    """A DuckDB connection whose statements run until interrupted (a query slower than its limit)."""

    def __init__(self, con) -> None:
        self._con, self._stop = con, False

    def sql(self, *args, **kwargs):
        deadline = time.monotonic() + 20
        while not self._stop and time.monotonic() < deadline:
            time.sleep(0.01)
        raise duckdb.InterruptException("INTERRUPT Error: Interrupted!")

    def interrupt(self) -> None:
        self._stop = True

    def query_progress(self) -> float:
        return -1

    def __getattr__(self, name):
        return getattr(self._con, name)


@pytest.fixture
def slow_engine(monkeypatch):
    from contextlib import contextmanager

    import sandbox.engine.execute

    real = sandbox.engine.execute.domain_connection

    @contextmanager
    def slow(*args, **kwargs):
        with real(*args, **kwargs) as con:
            yield _SlowConnection(con)

    monkeypatch.setattr(sandbox.engine.execute, "domain_connection", slow)


# By default on sqlite only (the heartbeat's limit; on PostgreSQL: tests/test_template_run_bounds.py::test_simultaneous_runs_of_one_tenant_admit_exactly_one runs the same heartbeat).
@pytest.mark.default_backend("sqlite")
def test_a_run_past_its_time_limit_is_stopped_dev_told_prod_held(client, app, auth, engine, settings, loaded,
                                                                slow_engine):
    limited = dataclasses.replace(settings, dev_query_time_limit_seconds=0.3, query_time_limit_seconds=0.3)
    app.state.settings = limited
    scene = active_scene(client, auth)
    started = time.monotonic()
    r = client.post(f"/api/v1/scenes/{scene['id']}/queries", headers=auth("insurer_a"),
                    json={"sql": BY_DISTRICT, "mode": "dev"})
    assert r.status_code == 202 and time.monotonic() - started < 10
    assert r.json()["status"] == "failed" and r.json()["error"]["code"] == "time_limit", r.json()
    q = client.post(f"/api/v1/scenes/{scene['id']}/queries", headers=auth("insurer_a"),
                    json={"sql": BY_DISTRICT, "mode": "prod", "epsilon": 0.2}).json()
    assert work_once(engine, limited)
    got = client.get(f"/api/v1/queries/{q['id']}", headers=auth("insurer_a")).json()
    assert got["status"] == "held" and got["error"] is None
    staff = client.get(f"/api/v1/results/{got['result_id']}", headers=auth("auditor1")).json()
    assert staff["report"]["failed"] == "time_limit"
    assert budget(client, auth, scene["id"])["epsilon_spent"] == pytest.approx(0.2)


def test_dev_queries_are_rate_limited_per_tenant_and_nothing_is_written_past_the_rate(client, app, auth, engine,
                                                                                       settings, loaded):
    app.state.settings = dataclasses.replace(settings, query_rate_per_minute=3)
    scene = active_scene(client, auth)
    scene_b = active_scene(client, auth, applicant="insurer_b")
    url = f"/api/v1/scenes/{scene['id']}/queries"
    for _ in range(3):
        assert client.post(url, headers=auth("insurer_a"), json={"sql": BY_DISTRICT, "mode": "dev"}).status_code == 202
    r = client.post(url, headers=auth("insurer_a"), json={"sql": BY_DISTRICT, "mode": "prod", "epsilon": 0.2})
    assert r.status_code == 429 and r.json()["code"] == "rate_limited" and r.headers["retry-after"] == "60"
    assert r.json()["message_zh"] and budget(client, auth, scene["id"])["epsilon_spent"] == 0
    with Session(engine) as s:
        assert len(s.exec(select(Query)).all()) == 3
    # another tenant's rate is its own
    r = client.post(f"/api/v1/scenes/{scene_b['id']}/queries", headers=auth("insurer_b"),
                    json={"sql": BY_DISTRICT, "mode": "dev"})
    assert r.status_code == 202 and r.json()["status"] == "done"


def test_parallel_requests_at_a_new_minute_are_all_counted_none_refused(engine, settings):
    """The minute turns while requests race: the first to move the row starts the new minute, the
    others count on it. (On PostgreSQL the others re-read the row after the first's commit, found the
    minute already started, and were refused with `rate_limited` far below the rate.)"""
    from concurrent.futures import ThreadPoolExecutor
    from datetime import timedelta

    from pdao.kernel.db import utcnow
    from pdao.kernel.identity import service as identities
    from sandbox.queries.service import check_rate
    from sandbox.results.models import TenantRate

    with Session(engine) as s:
        org_id = identities.principal_for(s, "insurer_a").org_id
        s.add(TenantRate(org_id=org_id, window_start=utcnow().replace(second=0, microsecond=0) - timedelta(minutes=1),
                         count=settings.query_rate_per_minute))     # last minute, full
        s.commit()

    def one(_):
        with Session(engine) as s:
            check_rate(s, settings, org_id)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(16)))      # raises if any was refused
    with Session(engine) as s:
        row = s.get(TenantRate, org_id)
        assert row.count in (16, *range(1, 16))   # the minute may turn again mid-test: then it restarted
        assert row.window_start >= utcnow().replace(second=0, microsecond=0) - timedelta(minutes=1)


def test_dev_answers_are_kept_within_a_quota_and_for_so_many_days(client, app, auth, engine, settings, loaded):
    """Review r5 #7: dev answers were kept forever with no quota (20 answers in 5 s stored 5.2 MB;
    at the rate, 22 GB a day). Each records its bytes; past the organization's quota the next dev
    query is refused before it runs (bilingual 429, nothing written), another company is not
    affected; after `dev_answer_days` the files go and reading one answers 410."""
    from datetime import timedelta

    from pdao.kernel.db import utcnow
    from sandbox.results import export
    from sandbox.results.models import QueryResult

    scene = active_scene(client, auth)
    scene_b = active_scene(client, auth, applicant="insurer_b")
    url = f"/api/v1/scenes/{scene['id']}/queries"
    a = auth("insurer_a")
    first = client.post(url, headers=a, json={"sql": BY_DISTRICT, "mode": "dev"}).json()
    assert first["status"] == "done"
    with Session(engine) as s:
        stored = s.get(QueryResult, first["result_id"])
        assert stored.size_bytes == (settings.results_dir / stored.storage_path).stat().st_size > 0
    app.state.settings = dataclasses.replace(settings, dev_answer_quota_bytes=stored.size_bytes + 1)
    assert client.post(url, headers=a, json={"sql": BY_DISTRICT, "mode": "dev"}).json()["status"] == "done"
    r = client.post(url, headers=a, json={"sql": BY_DISTRICT, "mode": "dev"})
    assert r.status_code == 429 and r.json()["code"] == "dev_answers_full" and r.json()["message_zh"], r.text
    with Session(engine) as s:
        assert len(s.exec(select(Query).where(Query.org_id == stored.org_id)).all()) == 2
    r = client.post(f"/api/v1/scenes/{scene_b['id']}/queries", headers=auth("insurer_b"),
                    json={"sql": BY_DISTRICT, "mode": "dev"})
    assert r.status_code == 202 and r.json()["status"] == "done"
    # a week on, the files go; the rows say so; the quota is free again
    with Session(engine) as s:
        assert export.expire_dev_answers(s, settings, utcnow() + timedelta(days=settings.dev_answer_days, seconds=1)) == 3
    assert not (settings.results_dir / stored.storage_path).exists()
    got = client.get(f"/api/v1/results/{first['result_id']}", headers=a).json()
    assert got["expired_at"] and got["rows"] is None
    r = client.get(f"/api/v1/results/{first['result_id']}/download", headers=a)
    assert r.status_code == 410 and r.json()["code"] == "answer_expired" and r.json()["message_zh"]
    assert client.post(url, headers=a, json={"sql": BY_DISTRICT, "mode": "dev"}).json()["status"] == "done"


def test_a_tenants_second_dev_query_waits_for_its_first_and_a_worker_answers_it(client, app, auth, engine, settings,
                                                                               loaded):
    """The request never waits for a turn (a burst of dev queries held every server thread and
    database connection in the review): the second answers `queued` at once; a worker runs it."""
    scene = active_scene(client, auth)
    scene_b = active_scene(client, auth, applicant="insurer_b")
    url = f"/api/v1/scenes/{scene['id']}/queries"
    first = client.post(url, headers=auth("insurer_a"), json={"sql": BY_DISTRICT, "mode": "dev"}).json()
    with Session(engine) as s:   # as if the first were still running: put it back and take it
        s.get(Query, first["id"]).status = "queued"
        s.commit()
        assert claim(s, settings, "busy", mode="dev").id == first["id"]
    started = time.monotonic()
    r = client.post(url, headers=auth("insurer_a"), json={"sql": BY_DISTRICT, "mode": "dev"})
    assert r.status_code == 202 and r.json()["status"] == "queued" and r.json()["result_id"] is None
    assert time.monotonic() - started < 2
    # the other tenant is not held back by insurer_a's running job
    r_b = client.post(f"/api/v1/scenes/{scene_b['id']}/queries", headers=auth("insurer_b"),
                      json={"sql": BY_DISTRICT, "mode": "dev"})
    assert r_b.json()["status"] == "done"
    with Session(engine) as s:   # the first finishes
        s.get(Query, first["id"]).status = "done"
        s.commit()
    assert work_once(engine, settings)
    got = client.get(f"/api/v1/queries/{r.json()['id']}", headers=auth("insurer_a")).json()
    assert got["status"] == "done" and got["result_id"]


# By default on sqlite only (refused before any write).
@pytest.mark.default_backend("sqlite")
def test_a_query_above_the_cost_limit_is_refused_before_anything_runs(client, auth, engine, loaded):
    """The review's CPU exhaustion: eight medians over every day × district, in dev, at no ε."""
    items = SCENE_ITEMS + [{"dataset": VISITS, "field": "visit_date", "usage": "group_by"}]
    scene = active_scene(client, auth, items=items)
    medians = ", ".join(f"MEDIAN(fee) AS m{i}" for i in range(8))
    sql = f"SELECT visit_date, district, {medians} FROM {VISITS} GROUP BY visit_date, district"
    url = f"/api/v1/scenes/{scene['id']}/queries"
    for path, mode in ((url, "dev"), (url + "/preview", "dev"), (url, "prod")):
        started = time.monotonic()
        r = client.post(path, headers=auth("insurer_a"), json={"sql": sql, "mode": mode, "epsilon": 0.5})
        assert r.status_code == 422 and r.json()["code"] == "query_too_costly", r.text
        assert r.json()["details"]["max_cost"] == 500_000 and time.monotonic() - started < 5
    with Session(engine) as s:
        assert s.exec(select(Query)).all() == []
    one = f"SELECT visit_date, MEDIAN(fee) AS m FROM {VISITS} GROUP BY visit_date"   # 4,383 days: within the limit
    r = client.post(url, headers=auth("insurer_a"), json={"sql": one, "mode": "dev"})
    assert r.status_code == 202 and r.json()["status"] == "done", r.text


def test_every_status_and_ledger_change_of_a_job_is_in_the_audit_chain(client, auth, engine, settings, loaded):
    """Queued with its reservation, started, ended (charged), or cancelled while queued (refunded): each
    appended in the transaction that makes the change, by its real actor."""
    from pdao.kernel.audit import AuditEvent

    scene = active_scene(client, auth)
    url = f"/api/v1/scenes/{scene['id']}/queries"
    ran = client.post(url, headers=auth("insurer_a"), json={"sql": BY_DISTRICT, "mode": "prod", "epsilon": 0.3}).json()
    assert work_once(engine, settings)
    dropped = client.post(url, headers=auth("insurer_a"), json={"sql": BY_DISTRICT, "mode": "prod", "epsilon": 0.3}).json()
    assert client.post(f"/api/v1/queries/{dropped['id']}/cancel", headers=auth("insurer_a")).status_code == 200
    dev = client.post(url, headers=auth("insurer_a"), json={"sql": BY_DISTRICT, "mode": "dev"}).json()

    def trail(query_id: int) -> list[tuple]:
        with Session(engine) as s:
            events = s.exec(select(AuditEvent).where(AuditEvent.object == f"query:{query_id}",
                                                     AuditEvent.method.is_(None))   # decisions, not requests
                            .order_by(AuditEvent.seq)).all()
        return [(e.action, e.actor, e.reason, e.detail.get("epsilon_reserved")) for e in events]

    assert trail(ran["id"]) == [("query.queue", "insurer_a", "queued", 0.3), ("query.start", "system", "claimed", None),
                                ("query.run", "system", "held", None)]
    assert trail(dropped["id"]) == [("query.queue", "insurer_a", "queued", 0.3),
                                    ("query.cancel", "insurer_a", "cancelled_while_queued", None)]
    assert trail(dev["id"]) == [("query.queue", "insurer_a", "queued", 0.0), ("query.start", "system", "claimed", None),
                                ("query.run", "system", "done", None)]
    assert client.get("/api/v1/audit/verify", headers=auth("auditor1")).json()["ok"] is True


# By default on sqlite only (refusals before any write).
@pytest.mark.default_backend("sqlite")
def test_a_tiny_epsilon_and_an_odd_time_filter_are_clear_refusals_not_crashes(client, auth, engine, loaded):
    """The second review: ε 1e-20 crashed the noise plan, a time at the calendar's edge the audit filters."""
    scene = active_scene(client, auth)
    url = f"/api/v1/scenes/{scene['id']}/queries"
    for path in (url, url + "/preview"):
        for eps in (1e-300, 1e-20, 1e-7, 5e-4):
            r = client.post(path, headers=auth("insurer_a"), json={"sql": BY_DISTRICT, "mode": "prod", "epsilon": eps})
            assert r.status_code == 422 and r.json()["code"] == "epsilon_too_small" and r.json()["message_zh"], r.text
    assert budget(client, auth, scene["id"])["epsilon_spent"] == 0
    with Session(engine) as s:
        assert s.exec(select(Query)).all() == []
    for path, params in [("/api/v1/audit/events", {"since": "0001-01-01T00:00:00+14:00"}),
                         ("/api/v1/audit/events", {"until": "0001-01-01T00:00:00+14:00"}),
                         ("/api/v1/audit/alerts", {"since": "9999-12-31T23:59:59-12:00"}),
                         ("/api/v1/audit/alerts", {"until": "0001-01-03T00:00:00"})]:
        r = client.get(path, params=params, headers=auth("auditor1"))
        assert r.status_code == 422 and r.json()["code"] == "bad_time", (path, params, r.text)


# By default on sqlite only (timing in the worker; cancels on PostgreSQL: tests/test_query_jobs.py::test_cancel_a_running_query_stops_it_and_refunds).
@pytest.mark.default_backend("sqlite")
def test_a_cancelled_prod_run_still_ends_at_a_class_end_and_shows_its_charge(client, auth, engine, settings, loaded,
                                                                            slow_engine):
    """The second review: a cancel let the outcome show the moment the computation ended (its exact
    duration); and a cancelled run showed ε 0 spent although it was charged."""
    import threading

    timed = dataclasses.replace(settings, prod_timing_base_seconds=1.0)
    scene = active_scene(client, auth)
    q = client.post(f"/api/v1/scenes/{scene['id']}/queries", headers=auth("insurer_a"),
                    json={"sql": BY_DISTRICT, "mode": "prod", "epsilon": 0.2}).json()
    runner = threading.Thread(target=work_once, args=(engine, timed))
    runner.start()
    deadline = time.monotonic() + 30
    while client.get(f"/api/v1/queries/{q['id']}", headers=auth("insurer_a")).json()["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.3)
    assert client.post(f"/api/v1/queries/{q['id']}/cancel", headers=auth("insurer_a")).status_code == 200
    runner.join(60)
    got = client.get(f"/api/v1/queries/{q['id']}", headers=auth("insurer_a")).json()
    assert got["status"] == "cancelled" and got["epsilon_spent"] == pytest.approx(0.2)
    with Session(engine) as s:
        job = s.get(Query, q["id"])
        span = (job.finished_at - job.started_at).total_seconds()
    assert any(c <= span < c + 0.6 for c in (1, 2, 4, 8)), span    # a class end, not when the engine stopped


@pytest.mark.default_backend("postgresql")   # the race that matters; SQLite's single writer serialises it anyway
def test_parallel_submissions_and_previews_never_pass_the_rate(client, app, auth, engine, settings, loaded):
    """The third review: the rate was counted, then the query inserted later, so 82 of 100 parallel
    submissions got in against a limit of 60. Previews (they plan noise) counted for nothing."""
    from concurrent.futures import ThreadPoolExecutor

    app.state.settings = dataclasses.replace(settings, query_rate_per_minute=5)
    scene = active_scene(client, auth)
    url = f"/api/v1/scenes/{scene['id']}/queries"
    headers = auth("insurer_a")

    def send(i: int) -> int:
        path = url + "/preview" if i % 2 else url
        return client.post(path, headers=headers, json={"sql": BY_DISTRICT, "mode": "prod", "epsilon": 0.1}).status_code

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(send, range(16)))
    assert sorted(codes).count(429) == 11 and len([c for c in codes if c in (200, 202)]) == 5, codes


def test_an_organization_has_at_most_so_many_prod_row_answers_waiting(client, app, auth, engine, settings, loaded):
    """The third review: prod row answers are free, every one is compared with every other, and 40 of
    them filled the reviewers' queue."""
    app.state.settings = dataclasses.replace(settings, held_row_answers_per_tenant=2)
    items = SCENE_ITEMS + [{"dataset": VISITS, "field": "person_id", "usage": "masked_output"}]
    scene = active_scene(client, auth, items=items)
    url = f"/api/v1/scenes/{scene['id']}/queries"
    rows = {"sql": f"SELECT person_id FROM {VISITS} WHERE visit_date >= DATE '2020-01-01' LIMIT 50", "mode": "prod"}
    assert [client.post(url, headers=auth("insurer_a"), json=rows).status_code for _ in range(2)] == [202, 202]
    r = client.post(url, headers=auth("insurer_a"), json=rows)
    assert r.status_code == 429 and r.json()["code"] == "too_many_held_row_answers" and r.json()["message_zh"]
    # aggregates and dev row answers are not held back by it
    assert client.post(url, headers=auth("insurer_a"), json={"sql": BY_DISTRICT, "mode": "prod"}).status_code == 202
    assert client.post(url, headers=auth("insurer_a"), json={**rows, "mode": "dev"}).status_code == 202


@pytest.mark.default_backend("postgresql")
def test_parallel_claims_never_pass_the_jobs_per_tenant(client, auth, engine, settings, loaded):
    """The third review: the running count was read by the SELECT, the claiming UPDATE only asked for
    `queued`, and a tenant had 4 dev jobs running at once against a limit of 1."""
    from concurrent.futures import ThreadPoolExecutor

    scene = active_scene(client, auth)
    url = f"/api/v1/scenes/{scene['id']}/queries"
    for _ in range(6):
        assert client.post(url, headers=auth("insurer_a"), json={"sql": BY_DISTRICT, "mode": "prod"}).status_code == 202

    def take(i: int):
        with Session(engine, expire_on_commit=False) as s:
            q = claim(s, settings, f"w{i}", mode="prod")
            return None if q is None else q.id

    with ThreadPoolExecutor(6) as pool:
        won = [x for x in pool.map(take, range(6)) if x is not None]
    assert len(won) == 1, won
    with Session(engine) as s:
        assert len(s.exec(select(Query).where(Query.status == "running")).all()) == 1


# By default on sqlite only (in-process phases; no database difference).
@pytest.mark.default_backend("sqlite")
def test_python_phases_are_stopped_at_the_time_limit_too(client, app, auth, engine, settings, loaded, monkeypatch):
    """The third review: a 300-median query ran 8 s past a 5 s limit (the heartbeat interrupts only
    DuckDB); the run now asks between phases whether to stop."""
    import sandbox.engine.privacy

    real = sandbox.engine.privacy.apply_noise

    def slow_noise(*args, **kwargs):
        time.sleep(1.2)   # a noise phase past the limit (beats every limit/4 s)
        return real(*args, **kwargs)

    monkeypatch.setattr(sandbox.engine.privacy, "apply_noise", slow_noise)
    app.state.settings = dataclasses.replace(settings, dev_query_time_limit_seconds=0.4)
    scene = active_scene(client, auth)
    r = client.post(f"/api/v1/scenes/{scene['id']}/queries", headers=auth("insurer_a"),
                    json={"sql": BY_DISTRICT, "mode": "dev"})
    assert r.status_code == 202 and r.json()["status"] == "failed" and r.json()["error"]["code"] == "time_limit", r.json()
