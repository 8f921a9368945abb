"""Template runs are bounded like query jobs (review r3, F4): they hold no lock of the metadata
database while they work, count against the tenant's query rate, run at most
`query_jobs_per_tenant` at once per tenant (across processes: a `running` row with a lease), are
stopped at their time limit, and a run whose request died stops blocking its tenant when its lease
expires. Every attack runs through HTTP, on SQLite and PostgreSQL."""

from __future__ import annotations

import dataclasses
import threading
import time
from contextlib import contextmanager

import duckdb
import pytest
from sqlmodel import Session, select

from pdao.kernel.audit import AuditEvent
from sandbox import worker
from sandbox.results import export
from sandbox.results.models import Query, QueryResult
from sandbox.templates import runs as template_runs
from tests.scene_helpers import BY_DISTRICT, active_scene
from tests.test_scene_templates import underwriting_items
from tests.test_template_runs import applicants, health, upload  # noqa: F401 - `health` is a fixture


def _template_scene(client, auth, who: str = "insurer_a") -> str:
    scene = active_scene(client, auth, applicant=who, scene_type="underwriting", items=underwriting_items(),
                         templates=[{"library": "underwriting"}])
    return f"/api/v1/scenes/{scene['id']}/templates/underwriting/runs"


def _queries(engine, org_code: str = "company_a") -> list[Query]:
    from pdao.kernel.identity.models import Organization

    with Session(engine) as s:
        org = s.exec(select(Organization).where(Organization.code == org_code)).one()
        return list(s.exec(select(Query).where(Query.org_id == org.id).order_by(Query.id)).all())


class _Gate:
    """Holds the first call of a patched step (the run's heavy phase) until released."""

    def __init__(self, real) -> None:
        self.real, self.calls = real, 0
        self.entered, self.release = threading.Event(), threading.Event()

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == 1:
            self.entered.set()
            self.release.wait(30)
        return self.real(*args, **kwargs)


def _in_thread(fn) -> tuple[threading.Thread, dict]:
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(r=fn()))
    t.start()
    return t, out


def test_a_run_locks_nothing_while_it_works(client, auth, engine, health, monkeypatch):
    """F4: the run inserted its query row (opening SQLite's write transaction) before storing the
    file, the PII check and the fingerprint; every other request, each writing its audit event,
    waited up to the 30 s busy timeout. Now another tenant's request is answered at once."""
    upload(client, auth("insurer_a"), applicants(health[:10]))
    url = _template_scene(client, auth)
    a, b = auth("insurer_a"), auth("insurer_b")
    gate = _Gate(export.content_fp)              # the last Python step of the heavy phase
    monkeypatch.setattr(export, "content_fp", gate)
    t, out = _in_thread(lambda: client.post(url, headers=a, json={"upload": "applicants", "mode": "prod"}))
    try:
        assert gate.entered.wait(30)
        started = time.monotonic()
        r = client.get("/api/v1/datasets", headers=b)        # a read that writes its audit event
        took = time.monotonic() - started
    finally:
        gate.release.set()
        t.join(60)
    assert r.status_code == 200 and took < 2.0, took
    assert out["r"].status_code == 201 and out["r"].json()["status"] == "held"
    with Session(engine) as s:
        events = s.exec(select(AuditEvent).where(AuditEvent.actor == "insurer_b", AuditEvent.path == "/api/v1/datasets")
                        ).all()
    assert len(events) == 1 and events[0].status == 200


def test_one_run_in_flight_per_tenant_the_next_answers_429_and_writes_nothing(client, auth, engine, health,
                                                                             monkeypatch):
    """F4: three runs at once by one tenant took 1.4 GB and failed with 500. Now a second run of the
    same tenant answers 429 `template_run_busy` (bilingual, nothing written) while another tenant
    runs its own."""
    upload(client, auth("insurer_a"), applicants(health[:10]))
    upload(client, auth("insurer_b"), applicants(health[10:20]))
    url_a, url_b = _template_scene(client, auth), _template_scene(client, auth, "insurer_b")
    a, b = auth("insurer_a"), auth("insurer_b")
    gate = _Gate(export.content_fp)
    monkeypatch.setattr(export, "content_fp", gate)
    t, out = _in_thread(lambda: client.post(url_a, headers=a, json={"upload": "applicants", "mode": "prod"}))
    try:
        assert gate.entered.wait(30)
        running = _queries(engine)
        assert [q.status for q in running] == ["running"] and running[0].lease_until is not None
        for mode in ("prod", "dev"):
            busy = client.post(url_a, headers=a, json={"upload": "applicants", "mode": mode})
            assert busy.status_code == 429 and busy.json()["code"] == "template_run_busy", busy.text
            assert busy.json()["message_zh"] and busy.headers["retry-after"]
        assert [q.id for q in _queries(engine)] == [running[0].id]           # nothing written
        other = client.post(url_b, headers=b, json={"upload": "applicants", "mode": "dev"})
        assert other.status_code == 201 and other.json()["status"] == "done"  # another tenant's own
    finally:
        gate.release.set()
        t.join(60)
    assert out["r"].status_code == 201 and out["r"].json()["status"] == "held"
    again = client.post(url_a, headers=a, json={"upload": "applicants", "mode": "dev"})
    assert again.status_code == 201 and again.json()["status"] == "done"
    with Session(engine) as s:
        starts = s.exec(select(AuditEvent).where(AuditEvent.action == "template.start")).all()
        ends = s.exec(select(AuditEvent).where(AuditEvent.action == "template.run")).all()
    assert len(starts) == len(ends) == 3                                   # the refused runs left none


# By default on sqlite only (the rate's race on PostgreSQL: tests/test_outcomes.py::test_parallel_submissions_and_previews_never_pass_the_rate).
@pytest.mark.default_backend("sqlite")
def test_template_runs_count_against_the_tenants_query_rate(client, app, auth, engine, settings, loaded, health):
    app.state.settings = dataclasses.replace(settings, query_rate_per_minute=2)
    upload(client, auth("insurer_a"), applicants(health[:5]))
    url = _template_scene(client, auth)
    sql_scene = active_scene(client, auth)
    a = auth("insurer_a")
    assert client.post(f"/api/v1/scenes/{sql_scene['id']}/queries", headers=a,
                       json={"sql": BY_DISTRICT, "mode": "dev"}).status_code == 202
    assert client.post(url, headers=a, json={"upload": "applicants", "mode": "dev"}).status_code == 201
    before = len(_queries(engine))
    r = client.post(url, headers=a, json={"upload": "applicants", "mode": "prod"})
    assert r.status_code == 429 and r.json()["code"] == "rate_limited" and r.json()["message_zh"]
    r = client.post(f"/api/v1/scenes/{sql_scene['id']}/queries", headers=a, json={"sql": BY_DISTRICT, "mode": "dev"})
    assert r.status_code == 429 and r.json()["code"] == "rate_limited"
    assert len(_queries(engine)) == before == 2


# By default on sqlite only (lease expiry on PostgreSQL: tests/test_query_jobs.py::test_a_job_whose_worker_keeps_dying_is_held_charged_and_audited).
@pytest.mark.default_backend("sqlite")
def test_a_run_whose_request_died_stops_blocking_its_tenant_when_its_lease_expires(client, app, auth, engine,
                                                                                  settings, health, monkeypatch):
    """A run lives in its request. One that dies (the process killed, a crash) leaves its `running`
    row: it blocks the tenant only until its lease expires, and the worker's lease expiry then ends
    it (held, like a lost prod job) — never back in a queue no request will ever run."""
    short = dataclasses.replace(settings, query_lease_seconds=1)
    app.state.settings = short
    upload(client, auth("insurer_a"), applicants(health[:5]))
    url = _template_scene(client, auth)
    a = auth("insurer_a")

    def dies(*args, **kwargs):
        raise RuntimeError("the request's thread died")

    with monkeypatch.context() as m:
        m.setattr(template_runs, "_run_admitted", dies)
        assert client.post(url, headers=a, json={"upload": "applicants", "mode": "prod"}).status_code == 500
    dead = _queries(engine)[-1]
    assert dead.status == "running"
    busy = client.post(url, headers=a, json={"upload": "applicants", "mode": "prod"})
    assert busy.status_code == 429 and busy.json()["code"] == "template_run_busy"
    time.sleep(1.2)                                          # the dead run's lease expires
    r = client.post(url, headers=a, json={"upload": "applicants", "mode": "prod"})
    assert r.status_code == 201 and r.json()["status"] == "held"
    with Session(engine) as s:
        assert worker.requeue_expired(s, short) == 1
    ended = client.get(f"/api/v1/queries/{dead.id}", headers=a).json()
    assert ended["status"] == "held" and ended["error"] is None    # ended, not requeued
    with Session(engine) as s:
        held = s.get(QueryResult, s.get(Query, dead.id).result_id)
        assert held.status == "held" and held.report["failed"] == "worker_lost"


@contextmanager
def _slow_engine(monkeypatch):
    """DuckDB statements that run until interrupted (a template slower than its time limit)."""
    import sandbox.templates.library
    from tests.test_outcomes import _SlowConnection

    real = sandbox.templates.library.domain_connection

    @contextmanager
    def slow(*args, **kwargs):
        with real(*args, **kwargs) as con:
            yield _SlowConnection(con)

    with monkeypatch.context() as m:
        m.setattr(sandbox.templates.library, "domain_connection", slow)
        yield


# By default on sqlite only (the heartbeat; admission on PostgreSQL: test_simultaneous_runs_of_one_tenant_admit_exactly_one).
@pytest.mark.default_backend("sqlite")
def test_a_run_past_its_time_limit_is_stopped_dev_told_prod_held(client, app, auth, engine, settings, health,
                                                                 monkeypatch):
    """F4: nothing could interrupt a run. Now the heartbeat interrupts DuckDB at the time limit; a
    dev run answers 422 `time_limit`, a prod run is held like any failed prod run."""
    limited = dataclasses.replace(settings, dev_query_time_limit_seconds=0.3, query_time_limit_seconds=0.3)
    app.state.settings = limited
    upload(client, auth("insurer_a"), applicants(health[:10]))
    url = _template_scene(client, auth)
    a = auth("insurer_a")
    ok = client.post(url, headers=a, json={"upload": "applicants", "mode": "prod"})
    with _slow_engine(monkeypatch):
        started = time.monotonic()
        dev = client.post(url, headers=a, json={"upload": "applicants", "mode": "dev"})
        assert time.monotonic() - started < 10
        assert dev.status_code == 422 and dev.json()["code"] == "time_limit" and dev.json()["message_zh"]
        started = time.monotonic()
        prod = client.post(url, headers=a, json={"upload": "applicants", "mode": "prod"})
        assert time.monotonic() - started < 10
    assert prod.status_code == 201 and prod.json()["status"] == "held" and prod.json()["error"] is None
    # the tenant's view of the stopped run is that of any held run
    identity = {"id", "query_id", "result_id", "created_at", "started_at", "finished_at"}
    same = lambda d: {k: v for k, v in d.items() if k not in identity}   # noqa: E731
    assert same(prod.json()) == same(ok.json())
    mine = [client.get(f"/api/v1/results/{x.json()['result_id']}", headers=a).json() for x in (ok, prod)]
    assert same(mine[0]) == same(mine[1]) and mine[1]["rows"] is None
    staff = client.get(f"/api/v1/results/{prod.json()['result_id']}", headers=auth("auditor1")).json()
    assert staff["report"]["failed"] == "time_limit"
    statuses = [(q.mode, q.status, q.error_code) for q in _queries(engine)]
    assert statuses == [("prod", "held", None), ("dev", "failed", "time_limit"), ("prod", "held", None)]


# By default on sqlite only (in-process phases).
@pytest.mark.default_backend("sqlite")
def test_the_time_limit_also_stops_a_run_between_its_python_phases(client, app, auth, engine, settings, health,
                                                                   monkeypatch):
    """What runs in Python (the PII check, the fingerprint) cannot be interrupted; the limit is
    checked again after each phase (review r3 F12b)."""
    app.state.settings = dataclasses.replace(settings, dev_query_time_limit_seconds=0.3)
    upload(client, auth("insurer_a"), applicants(health[:10]))
    url = _template_scene(client, auth)
    real = export.content_fp

    def slow_fingerprint(*args, **kwargs):
        time.sleep(0.6)
        return real(*args, **kwargs)

    monkeypatch.setattr(export, "content_fp", slow_fingerprint)
    r = client.post(url, headers=auth("insurer_a"), json={"upload": "applicants", "mode": "dev"})
    assert r.status_code == 422 and r.json()["code"] == "time_limit"
    [q] = _queries(engine)
    assert q.status == "failed" and q.result_id is None
    with Session(engine) as s:
        assert s.exec(select(QueryResult)).all() == []                   # its file and row gone


def test_a_running_run_can_be_cancelled(client, app, auth, engine, settings, health, monkeypatch):
    app.state.settings = dataclasses.replace(settings, query_lease_seconds=3)    # a beat every second
    upload(client, auth("insurer_a"), applicants(health[:10]))
    url = _template_scene(client, auth)
    a = auth("insurer_a")
    gate = _Gate(export.content_fp)
    monkeypatch.setattr(export, "content_fp", gate)
    t, out = _in_thread(lambda: client.post(url, headers=a, json={"upload": "applicants", "mode": "dev"}))
    try:
        assert gate.entered.wait(30)
        [q] = _queries(engine)
        r = client.post(f"/api/v1/queries/{q.id}/cancel", headers=a)
        assert r.status_code == 200 and r.json()["cancel_requested"] is True
    finally:
        gate.release.set()
        t.join(60)
    assert out["r"].status_code == 201 and out["r"].json()["status"] == "cancelled"
    with Session(engine) as s:
        assert s.exec(select(QueryResult)).all() == []


def test_a_held_failure_of_a_lost_run_looks_like_any_held_run(client, auth, engine, settings, health):
    """`template_runs.lost_run_result`: what the worker should store for a prod template run whose
    lease expired (see the report of this change) — to its tenant, the same as any held run."""
    from pdao.kernel.identity.service import principal_for
    from sandbox.queries import service as queries

    upload(client, auth("insurer_a"), applicants(health[:10]))
    url = _template_scene(client, auth)
    ok, other = (client.post(url, headers=auth("insurer_a"), json={"upload": "applicants", "mode": "prod"}).json()
                 for _ in range(2))
    with Session(engine) as s:
        s.delete(s.get(QueryResult, other["result_id"]))      # the other run, as if its request had died
        s.flush()
        lost = template_runs.lost_run_result(s, settings, s.get(Query, other["id"]))
        s.add(lost)
        s.flush()
        tenant = principal_for(s, "insurer_a", "token")
        views = [queries.result_out(settings, tenant, r, session=s) for r in (s.get(QueryResult, ok["result_id"]), lost)]
        s.rollback()
    identity = {"id", "query_id", "created_at"}
    assert [{k: v for k, v in view.items() if k not in identity} for view in views][0] == \
           {k: v for k, v in views[1].items() if k not in identity}
    assert lost.report["failed"] == "worker_lost" and lost.kind == "rows"


@pytest.mark.parametrize("failure", [duckdb.InterruptException("INTERRUPT Error: Interrupted!"),
                                     OSError("disk full")])
def test_a_prod_run_failing_inside_the_domain_ends_its_row_held(client, auth, engine, health, monkeypatch, failure):
    from sandbox.templates import library as templates

    upload(client, auth("insurer_a"), applicants(health[:5]))
    url = _template_scene(client, auth)

    def broken(*args, **kwargs):
        raise failure

    monkeypatch.setattr(templates, "run_template", broken)
    r = client.post(url, headers=auth("insurer_a"), json={"upload": "applicants", "mode": "prod"})
    assert r.status_code == 201 and r.json()["status"] == "held"
    [q] = _queries(engine)
    assert q.status == "held" and q.lease_until is None


def test_simultaneous_runs_of_one_tenant_admit_exactly_one(client, auth, engine, health, monkeypatch):
    """The count and the insert are one step under the tenant's lock (PostgreSQL: its organization's
    row; SQLite: the write lock), so runs sent at the same instant cannot all see an empty slot."""
    upload(client, auth("insurer_a"), applicants(health[:5]))
    url = _template_scene(client, auth)
    a = auth("insurer_a")
    release = threading.Event()
    real = export.content_fp

    def held(*args, **kwargs):
        release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(export, "content_fp", held)
    start = threading.Barrier(4)
    out: list = []

    def send():
        start.wait(10)
        out.append(client.post(url, headers=a, json={"upload": "applicants", "mode": "dev"}))

    threads = [threading.Thread(target=send) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 30
        while len(out) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sorted(r.status_code for r in out) == [429, 429, 429]
        assert [q.status for q in _queries(engine)] == ["running"]
    finally:
        release.set()
        for t in threads:
            t.join(60)
    assert sorted(r.status_code for r in out) == [201, 429, 429, 429]


def test_the_worker_ends_a_lost_prod_run_as_any_held_run(client, auth, engine, settings, health):  # noqa: F811
    """A prod run whose request died is ended by the worker's lease expiry, and its tenant sees what
    any held run shows (not a bare held failure without the template's columns and report)."""
    from datetime import timedelta

    from pdao.kernel.db import utcnow

    upload(client, auth("insurer_a"), applicants(health[:10]))
    url = _template_scene(client, auth)
    ok, other = (client.post(url, headers=auth("insurer_a"), json={"upload": "applicants", "mode": "prod"}).json()
                 for _ in range(2))
    with Session(engine) as s:   # the other run, as if its request had died while running
        s.delete(s.get(QueryResult, other["result_id"]))
        q = s.get(Query, other["id"])
        q.status, q.result_id, q.lease_until = "running", None, utcnow() - timedelta(seconds=1)
        s.commit()
        assert worker.requeue_expired(s, settings) == 1
    got = client.get(f"/api/v1/queries/{other['id']}", headers=auth("insurer_a")).json()
    assert got["status"] == "held" and got["result_id"]
    identity = {"id", "query_id", "result_id", "created_at", "started_at", "finished_at"}
    views = [client.get(f"/api/v1/results/{rid}", headers=auth("insurer_a")).json()
             for rid in (ok["result_id"], got["result_id"])]
    assert [{k: v for k, v in v.items() if k not in identity} for v in views][0] == \
           {k: v for k, v in views[1].items() if k not in identity}
