"""Query jobs under stress: parallel submissions never overspend, and a worker killed while it
holds a job leaves it to be retried (charged once) or, after the last attempt, held and charged like
any run that failed reading the data — never half-charged, every move audited."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update
from sqlmodel import Session, select

from pdao.kernel.audit import AuditEvent
from pdao.kernel.db import utcnow
from policies.enforcer import SceneEnforcers
from sandbox.budgets import ledger
from sandbox.results.models import Query
from sandbox.worker import requeue_expired, run_one, worker_name
from tests.scene_helpers import BY_DISTRICT, active_scene, budget

REPO = Path(__file__).resolve().parents[1]
SIGNING_KEY = "test-signing-key-of-at-least-32-bytes"  # as tests/conftest.py make_settings


# On PostgreSQL by default; on SQLite in `make test-slow` (~10 s): there the race for the budget is
# run by tests/test_ledger.py::test_twenty_parallel_reservations_never_overspend[sqlite], the same
# ledger.reserve that each submission calls.
@pytest.mark.default_backend("postgresql")
def test_twenty_parallel_submissions_never_overspend(client, auth, engine, loaded):
    scene = active_scene(client, auth, budget_epsilon=1.0, max_query_epsilon=0.1)
    headers = auth("insurer_a")

    def submit(_: int) -> int:
        r = client.post(f"/api/v1/scenes/{scene['id']}/queries", headers=headers,
                        json={"sql": BY_DISTRICT, "mode": "prod", "epsilon": 0.1})
        assert r.status_code in (202, 429), r.text
        return r.status_code

    with ThreadPoolExecutor(20) as pool:
        codes = list(pool.map(submit, range(20)))
    assert codes.count(202) == 10 and codes.count(429) == 10, codes
    b = budget(client, auth, scene["id"])
    assert b["epsilon_spent"] == pytest.approx(1.0) and b["epsilon_left"] == pytest.approx(0.0, abs=1e-9)
    with Session(engine) as s:
        entries = ledger.entries(s, scene["id"])
        queued = s.exec(select(Query).where(Query.scene_id == scene["id"])).all()
    assert len(entries) == 10 and sum(e.epsilon for e in entries) == pytest.approx(1.0)
    assert len(queued) == 10 and {q.budget_entry_id for q in queued} == {e.id for e in entries}


def _worker_env(settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PDAO_")}
    env.update(PDAO_HOME=str(settings.home), PDAO_DATABASE_URL=settings.database_url, PDAO_SECRET_KEY=SIGNING_KEY,
               **extra)
    return env


def _kill_worker_holding(engine, settings, query_id: int, tmp_path: Path) -> None:
    """Start `pdao worker` stalled on its claimed job, wait for it to claim, then SIGKILL it."""
    log = (tmp_path / "worker.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "pdao", "worker"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            env=_worker_env(settings, PDAO_TEST_WORKER_STALL="120", PDAO_QUERY_LEASE_SECONDS="1"))
    try:
        deadline = time.monotonic() + 60
        while True:
            with Session(engine) as s:
                q = s.get(Query, query_id)
                if q.status == "running":
                    break
            assert proc.poll() is None, (tmp_path / "worker.log").read_text()
            assert time.monotonic() < deadline, "the worker never claimed the job"
            time.sleep(0.2)
        time.sleep(0.7)   # let it beat at least once (every lease/3 s)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        log.close()
    time.sleep(1.5)       # its lease (1 s) runs out


def test_a_killed_workers_job_is_retried_and_charged_once(client, auth, engine, settings, loaded, tmp_path):
    scene = active_scene(client, auth)
    q = client.post(f"/api/v1/scenes/{scene['id']}/queries", headers=auth("insurer_a"),
                    json={"sql": BY_DISTRICT, "mode": "prod", "epsilon": 0.5}).json()
    _kill_worker_holding(engine, settings, q["id"], tmp_path)
    with Session(engine) as s:
        assert s.get(Query, q["id"]).status == "running"          # the dead worker still "holds" it
        assert [e.state for e in ledger.entries(s, scene["id"])] == ["reserved"]
    assert run_one(engine, settings, SceneEnforcers(engine), worker_name())   # requeued, claimed, run
    with Session(engine) as s:
        job = s.get(Query, q["id"])
        entries = ledger.entries(s, scene["id"])
    assert job.status == "held" and job.attempts == 2 and job.result_id is not None
    assert [(e.state, e.epsilon) for e in entries] == [("charged", 0.5)]
    assert budget(client, auth, scene["id"])["epsilon_spent"] == pytest.approx(0.5)


# By default on postgresql only (a killed worker process; SQLite's lease expiry: test_an_expired_lease_is_requeued_with_an_audit_event).
@pytest.mark.default_backend("postgresql")
def test_a_job_whose_worker_keeps_dying_is_held_charged_and_audited(client, auth, engine, settings, loaded, tmp_path):
    """A run that keeps killing its worker may do so because of the data: it ends like any run that
    failed reading the data (held, charged; sandbox/queries/outcomes.py), and the lease's expiry is audited."""
    scene = active_scene(client, auth)
    q = client.post(f"/api/v1/scenes/{scene['id']}/queries", headers=auth("insurer_a"),
                    json={"sql": BY_DISTRICT, "mode": "prod", "epsilon": 0.5}).json()
    _kill_worker_holding(engine, settings, q["id"], tmp_path)
    once = dataclasses.replace(settings, query_max_attempts=1)
    with Session(engine) as s:
        assert requeue_expired(s, once) == 1
        assert requeue_expired(s, once) == 0          # moved once only
    got = client.get(f"/api/v1/queries/{q['id']}", headers=auth("insurer_a")).json()
    assert got["status"] == "held" and got["error"] is None and got["result_id"] is not None
    res = client.get(f"/api/v1/results/{got['result_id']}", headers=auth("insurer_a")).json()
    assert res["status"] == "held" and res["row_count"] == 6 and res["report"] is None
    staff = client.get(f"/api/v1/results/{got['result_id']}", headers=auth("reviewer1")).json()
    assert [(c["name"], c["verdict"]) for c in staff["report"]["checks"]] == [("run", "fail")]
    with Session(engine) as s:
        assert [e.state for e in ledger.entries(s, scene["id"])] == ["charged"]
        events = s.exec(select(AuditEvent).where(AuditEvent.object == f"query:{q['id']}",
                                                 AuditEvent.action == "query.run")).all()
    assert [(e.decision, e.reason, e.detail["error"]) for e in events] == [("error", "held", "worker_lost")]
    assert budget(client, auth, scene["id"])["epsilon_spent"] == pytest.approx(0.5)


def test_an_expired_lease_is_requeued_with_an_audit_event(client, auth, engine, settings, loaded):
    from sandbox.worker import claim

    scene = active_scene(client, auth)
    q = client.post(f"/api/v1/scenes/{scene['id']}/queries", headers=auth("insurer_a"),
                    json={"sql": BY_DISTRICT, "mode": "prod", "epsilon": 0.5}).json()
    with Session(engine) as s:
        assert claim(s, settings, "gone").id == q["id"]
        s.exec(update(Query).where(Query.id == q["id"]).values(lease_until=utcnow() - timedelta(seconds=1)))
        s.commit()
        assert requeue_expired(s, settings) == 1
        assert s.get(Query, q["id"]).status == "queued"
        ev = s.exec(select(AuditEvent).where(AuditEvent.action == "query.requeue")).one()
    assert (ev.object, ev.decision, ev.reason, ev.detail["worker"]) == (f"query:{q['id']}", "allow", "lease_expired", "gone")


def test_cancel_a_running_query_stops_it_and_refunds(client, auth, engine, settings, loaded, monkeypatch):
    import threading

    scene = active_scene(client, auth)
    q = client.post(f"/api/v1/scenes/{scene['id']}/queries", headers=auth("insurer_a"),
                    json={"sql": BY_DISTRICT, "mode": "prod", "epsilon": 0.5}).json()
    monkeypatch.setenv("PDAO_TEST_WORKER_STALL", "1.5")   # time enough to see it running and cancel
    worker = threading.Thread(target=run_one, args=(engine, settings, SceneEnforcers(engine), worker_name()))
    worker.start()
    deadline = time.monotonic() + 30
    while client.get(f"/api/v1/queries/{q['id']}", headers=auth("insurer_a")).json()["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    r = client.post(f"/api/v1/queries/{q['id']}/cancel", headers=auth("insurer_a"))
    assert r.status_code == 200 and r.json()["cancel_requested"] is True
    worker.join(60)
    got = client.get(f"/api/v1/queries/{q['id']}", headers=auth("insurer_a")).json()
    assert got["status"] == "cancelled" and got["result_id"] is None
    assert budget(client, auth, scene["id"])["epsilon_spent"] == 0
    with Session(engine) as s:
        assert [e.state for e in ledger.entries(s, scene["id"])] == ["refunded"]


def test_the_heartbeat_interrupts_the_engine_on_cancel_and_at_the_time_limit(client, auth, engine, settings, loaded):
    from sandbox.queries.leases import Heartbeat
    from sandbox.worker import claim

    scene = active_scene(client, auth)
    q = client.post(f"/api/v1/scenes/{scene['id']}/queries", headers=auth("insurer_a"),
                    json={"sql": BY_DISTRICT, "mode": "prod", "epsilon": 0.5}).json()
    with Session(engine) as s:
        job = claim(s, settings, "me")
    assert job.id == q["id"]

    class Connection:       # stands in for DuckDB's: progress and interrupt are all the heartbeat uses
        interrupted = 0

        def query_progress(self) -> float:
            return 42.0

        def interrupt(self) -> None:
            self.interrupted += 1

    beat = Heartbeat(engine, settings, job.id, "me", time_limit=3600)
    beat.con = Connection()
    beat.beat()
    # staff see the progress; the tenant does not while a prod run runs (a timing signal, sandbox/queries/outcomes.py)
    assert client.get(f"/api/v1/queries/{q['id']}", headers=auth("auditor1")).json()["progress"] == pytest.approx(0.42)
    assert client.get(f"/api/v1/queries/{q['id']}", headers=auth("insurer_a")).json()["progress"] is None
    assert beat.con.interrupted == 0 and beat.reason is None
    client.post(f"/api/v1/queries/{q['id']}/cancel", headers=auth("insurer_a"))
    beat.beat()
    assert beat.con.interrupted == 1 and beat.reason == "cancelled"

    late = Heartbeat(engine, settings, job.id, "me", time_limit=0.0)
    late.con = Connection()
    late.reason = None
    with Session(engine) as s:   # a job that was not asked to stop
        s.exec(update(Query).where(Query.id == job.id).values(cancel_requested=False))
        s.commit()
    late.beat()
    assert late.con.interrupted == 1 and late.reason == "time_limit"


def test_a_cancel_acknowledged_while_the_answer_is_being_stored_leaves_no_result_and_is_charged(client, auth, engine,
                                                                                             settings, loaded):
    """A running prod job that its tenant cancels read the data: it ends `cancelled`, with no result,
    charged (a refund would depend on whether the data had been read in time: sandbox/queries/outcomes.py)."""
    from sandbox.queries.service import run_and_store
    from sandbox.worker import claim

    scene = active_scene(client, auth)
    q = client.post(f"/api/v1/scenes/{scene['id']}/queries", headers=auth("insurer_a"),
                    json={"sql": BY_DISTRICT, "mode": "prod", "epsilon": 0.5}).json()
    with Session(engine, expire_on_commit=False) as s:
        job = claim(s, settings, "me")
        # the engine has finished (an interrupt would come too late) when the cancel arrives
        assert client.post(f"/api/v1/queries/{q['id']}/cancel", headers=auth("insurer_a")).status_code == 200
        run_and_store(s, settings, job, enforcers=SceneEnforcers(engine), worker="me")
    got = client.get(f"/api/v1/queries/{q['id']}", headers=auth("insurer_a")).json()
    assert got["status"] == "cancelled" and got["result_id"] is None
    with Session(engine) as s:
        assert [e.state for e in ledger.entries(s, scene["id"])] == ["charged"]
    assert not list(settings.results_dir.rglob("*.parquet"))
