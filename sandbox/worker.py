"""The query worker: claims queued queries (prod, and dev ones their request did not take) from the
metadata database and runs them.

`pdao serve` runs one in a background thread; `pdao worker` runs more, in as many processes as
wanted; the request of a dev query runs its own job when it may (`answer_dev`). Claiming is safe
with any number of runners: PostgreSQL hands each candidate row to one claimant (`FOR UPDATE SKIP
LOCKED`), and the claim itself is a conditional UPDATE (`… WHERE status = 'queued'`) that only one
runner can win on either backend. A tenant has at most `query_jobs_per_tenant` jobs of a mode
running, and the organization that started a job least recently goes first.

A claimed job holds a lease that its runner renews every few seconds (with the engine's progress),
and a time limit (`query_time_limit_seconds`, `dev_query_time_limit_seconds`) after which the
heartbeat interrupts the engine. A runner that dies stops renewing; any worker then finds the lease
expired and puts the job back in the queue (or, after `query_max_attempts`, ends it: a prod run
held and charged like any run that failed reading the data, `sandbox.queries.outcomes`), each move in the
audit chain. The ε reserved at submission stays reserved across retries and is charged once, in the
transaction that ends the job — and only by the runner that still holds it
(`sandbox.queries.service.run_and_store`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine, func, update
from sqlalchemy.orm import aliased
from sqlmodel import Session, select

from pdao.kernel import audit
from pdao.kernel.config import Settings
from pdao.kernel.db import utcnow
from pdao.kernel.errors import PdaoError
from pdao.kernel.identity.models import Organization
from policies.enforcer import SceneEnforcers
from sandbox.budgets import ledger
from sandbox.engine.execute import PlannedAnswer, planned_answer
from sandbox.queries import outcomes
from sandbox.queries import service as queries
from sandbox.queries.leases import Heartbeat, time_limit, worker_name
from sandbox.queries.service import finish_failed, query_plan, run_and_store
from sandbox.results import export
from sandbox.results.models import Query

log = logging.getLogger("pdao.worker")


def requeue_expired(session: Session, settings: Settings) -> int:
    """Jobs whose runner stopped renewing the lease: back to the queue, or ended after
    `query_max_attempts` — a prod run as a held failure, charged (a run that keeps killing its worker
    may do so because of the data: `sandbox.queries.outcomes`), a dev run failed. Each move is a conditional
    UPDATE on the expired lease, so two workers doing this at once move each job once, and each is
    in the audit chain with the change."""
    now = utcnow()
    moved = 0
    expired = session.exec(select(Query).where(Query.status == "running", Query.lease_until < now)).all()
    for q in expired:
        if q.attempts >= settings.query_max_attempts:
            moved += _end_lost(session, settings, q, now)
            continue
        done = session.exec(update(Query).where(Query.id == q.id, Query.status == "running", Query.lease_until < now)
                            .values(status="queued", worker=None, lease_until=None, progress=0.0)
                            .execution_options(synchronize_session=False)).rowcount
        if done == 1:
            audit.append(session, actor="system", auth_method="worker", action="query.requeue",
                         object=f"query:{q.id}", scene_id=q.scene_id, decision="allow", reason="lease_expired",
                         detail={"worker": q.worker, "attempts": q.attempts, "mode": q.mode})
        moved += done
        session.commit()
    return moved


def _end_lost(session: Session, settings: Settings, q: Query, now: Any) -> int:
    held = None
    if q.mode == "prod":
        if q.kind == "template":   # what a held failure of that run shows (imported here: it imports us)
            from sandbox.templates import runs as template_runs
            held = template_runs.lost_run_result(session, settings, q)
        else:
            held = outcomes.held_failure(settings, q, _planned(session, settings, q), "worker_lost", kind=q.kind)
        held.created_at = now
        session.add(held)
        session.flush()
        values: dict[str, Any] = {"status": "held", "result_id": held.id, "epsilon_spent": held.epsilon_spent}
    else:
        values = {"status": "failed", "error_code": "worker_lost",
                  "error_message": f"The query's runner stopped {q.attempts} times; it was not answered.",
                  "error_message_zh": f"执行该查询的进程已中断 {q.attempts} 次，查询未完成。"}
    done = session.exec(update(Query).where(Query.id == q.id, Query.status == "running", Query.lease_until < now)
                        .values(finished_at=now, lease_until=None, progress=1.0, **values)
                        .execution_options(synchronize_session=False)).rowcount
    if done != 1:
        session.rollback()
        if held is not None:
            (settings.results_dir / held.storage_path).unlink(missing_ok=True)
        return 0
    if q.budget_entry_id is not None:
        ledger.charge(session, q.budget_entry_id)
    audit.append(session, actor="system", auth_method="worker", action="query.run", object=f"query:{q.id}",
                 scene_id=q.scene_id, decision="error", reason=values["status"],
                 detail={"worker": q.worker, "attempts": q.attempts, "mode": q.mode, "error": "worker_lost",
                         "lease_expired": True, **({"result_id": held.id} if held is not None else {})})
    session.commit()
    return 1


def _planned(session: Session, settings: Settings, q: Query) -> PlannedAnswer:
    """What the plan says a tenant sees of the job's answer (the same as for any held answer)."""
    try:
        execution = query_plan(session, settings, q)
        return planned_answer(execution)
    except PdaoError:   # the scene changed since: a plan without the data's help, nothing new shown
        return PlannedAnswer([], {}, q.epsilon, 0)


def claim(session: Session, settings: Settings, worker: str, *, query_id: int | None = None,
          mode: str | None = None) -> Query | None:
    """Take a queued job for this runner, or None: the oldest of the organization that started a
    job least recently (so one tenant's long queue does not hold the others back), and only while
    that organization has fewer than `query_jobs_per_tenant` jobs of its mode running — decided in
    the claiming UPDATE itself, under the organization's row lock on PostgreSQL (SQLite's single
    writer does the same), so parallel claims never pass the limit. `query_id`: that job only."""
    last_start = aliased(Query)
    recency = (select(func.max(last_start.started_at)).where(last_start.org_id == Query.org_id)
               .scalar_subquery())
    stmt = select(Query.id, Query.org_id, Query.mode).where(Query.status == "queued")
    if query_id is not None:
        stmt = stmt.where(Query.id == query_id)
    if mode is not None:
        stmt = stmt.where(Query.mode == mode)
    candidates = session.exec(stmt.order_by(recency.asc().nulls_first(), Query.id).limit(20)).all()
    session.rollback()
    postgres = session.get_bind().dialect.name == "postgresql"
    for qid, org_id, qmode in candidates:
        if postgres:   # one claim per organization at a time: the running count below stays true
            session.exec(select(Organization.id).where(Organization.id == org_id).with_for_update())
        other = aliased(Query)
        running = (select(func.count()).select_from(other)
                   .where(other.org_id == org_id, other.mode == qmode, other.status == "running").scalar_subquery())
        now = utcnow()
        won = session.exec(update(Query).where(Query.id == qid, Query.status == "queued",
                                               running < settings.query_jobs_per_tenant).values(
            status="running", worker=worker, attempts=Query.attempts + 1, started_at=now, progress=0.0,
            lease_until=now + timedelta(seconds=settings.query_lease_seconds))
            .execution_options(synchronize_session=False)).rowcount
        if won == 1:   # the job's start, in the chain with it
            q = session.get(Query, qid)
            audit.append(session, actor="system", auth_method="worker", action="query.start", object=f"query:{qid}",
                         scene_id=q.scene_id, decision="allow", reason="claimed",
                         detail={"worker": worker, "mode": q.mode, "attempt": q.attempts})
            session.commit()
            return session.get(Query, qid)
        session.rollback()
    return None


def run_claimed(engine: Engine, settings: Settings, enforcers: SceneEnforcers, session: Session, q: Query,
                worker: str) -> Query:
    """Run a job this runner claimed, with its heartbeat (lease, progress, cancel, time limit)."""
    beat = Heartbeat(engine, settings, q.id, worker, time_limit=time_limit(settings, q))
    beat.start()
    try:
        stall = float(os.environ.get("PDAO_TEST_WORKER_STALL", "0") or 0)
        if stall and q.mode == "prod":   # tests only: hold the claimed job, as a worker stuck or about to be killed
            time.sleep(stall)
        if session.exec(select(Query.cancel_requested).where(Query.id == q.id)).first():   # nothing read yet
            return finish_failed(session, q, "cancelled", "The query was cancelled.", "查询已取消。", worker=worker,
                                 status="cancelled", refund=True)
        return run_and_store(session, settings, q, enforcers=enforcers, on_connection=beat.attach, worker=worker,
                             stop_reason=lambda: beat.reason, started=beat.started)
    finally:
        beat.stop.set()


def run_one(engine: Engine, settings: Settings, enforcers: SceneEnforcers, worker: str) -> bool:
    """Requeue expired jobs, claim one and run it. False when the queue was empty."""
    with Session(engine, expire_on_commit=False) as session:
        requeue_expired(session, settings)
        q = claim(session, settings, worker)
        if q is None:
            return False
        q = run_claimed(engine, settings, enforcers, session, q, worker)
        log.info("query %s: %s", q.id, q.status)
        return True


def submit_query(session: Session, engine: Engine, settings: Settings, enforcers: SceneEnforcers, principal: Any,
                 scene: Any, sql: str, mode: str, epsilon: float | None, request_id: str | None = None) -> Query:
    """Submit a query (`sandbox.queries.service.submit`) and commit it; a dev query is then answered by this
    request when it may (`answer_dev`). The query as it stands when the request answers."""
    q = queries.submit(session, settings, enforcers, principal, scene, sql, mode, epsilon, request_id)
    session.commit()
    if q.mode == "dev":
        answer_dev(session, engine, settings, enforcers, q.id)
        try:
            session.refresh(q)
        except Exception:  # noqa: BLE001 - committed and queued: answer that, never a 500 saying nothing changed
            session.rollback()
    return q


def answer_dev(session: Session, engine: Engine, settings: Settings, enforcers: SceneEnforcers, query_id: int) -> None:
    """A dev query, from its own request: claim it and run it now if the tenant has no other dev job
    running; else leave it queued for a worker and answer at once (the client polls). A request
    never waits for a turn: a burst of one tenant's dev queries would hold the server's threads and
    database connections from everyone else. Whatever fails here, the job is committed and stays
    to a worker (a lease that runs out is taken over): the request still answers with its state."""
    name = f"{worker_name()}:request"
    try:
        q = claim(session, settings, name, query_id=query_id, mode="dev")
        if q is not None:
            run_claimed(engine, settings, enforcers, session, q, name)
    except Exception:  # noqa: BLE001 - the job is safe in the queue; the request answers its state
        session.rollback()
        log.exception("dev query %s: left to a worker", query_id)


EXPIRY_EVERY_SECONDS = 600.0


def work(engine: Engine, settings: Settings, *, stop: threading.Event | None = None, poll_seconds: float = 1.0,
         once: bool = False) -> None:
    """Run queued queries until `stop` is set (or the queue is empty, with `once`)."""
    stop = stop or threading.Event()
    enforcers = SceneEnforcers(engine)
    name = worker_name()
    log.info("worker %s started", name)
    next_expiry = 0.0
    while not stop.is_set():
        try:
            if time.monotonic() >= next_expiry:    # dev answers past their days: files removed
                with Session(engine) as session:
                    export.expire_dev_answers(session, settings)
                next_expiry = time.monotonic() + EXPIRY_EVERY_SECONDS
            busy = run_one(engine, settings, enforcers, name)
        except Exception:  # noqa: BLE001 - keep serving; the job's lease will expire and be retried
            log.exception("worker %s: unexpected error", name)
            busy = False
        if once and not busy:
            return
        if not busy:
            stop.wait(poll_seconds)


def start_in_thread(engine: Engine, settings: Settings) -> tuple[threading.Thread, threading.Event]:
    stop = threading.Event()
    t = threading.Thread(target=work, args=(engine, settings), kwargs={"stop": stop}, daemon=True, name="pdao-worker")
    t.start()
    return t, stop


__all__ = ["answer_dev", "claim", "requeue_expired", "run_claimed", "run_one", "work", "start_in_thread",
           "worker_name"]
