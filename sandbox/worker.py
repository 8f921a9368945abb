"""The query worker: claims queued prod queries from the metadata database and runs them.

`pdao serve` runs one in a background thread; `pdao worker` runs more, in as many processes as
wanted. Claiming is safe with any number of workers: PostgreSQL hands each candidate row to one
claimant (`FOR UPDATE SKIP LOCKED`), and the claim itself is a conditional UPDATE
(`… WHERE status = 'queued'`) that only one worker can win on either backend.

A claimed job holds a lease that its worker renews every few seconds (with the engine's progress).
A worker that dies stops renewing; any worker then finds the lease expired and puts the job back
in the queue (or, after `query_max_attempts`, fails it and refunds its ε). The ε reserved at
submission stays reserved across retries and is charged once, in the transaction that stores
the result — and only by the worker that still holds the job (`sandbox.queries.run_and_store`).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine, update
from sqlmodel import Session, select

from pdao.config import Settings
from pdao.db import utcnow
from policies.enforcer import SceneEnforcers
from sandbox import ledger
from sandbox.models import Query
from sandbox.queries import run_and_store

log = logging.getLogger("pdao.worker")
HEARTBEAT_SECONDS = 2.0


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def requeue_expired(session: Session, settings: Settings) -> int:
    """Jobs whose worker stopped renewing the lease: back to the queue, or failed (and refunded)
    after `query_max_attempts`. Each move is a conditional UPDATE on the expired lease, so two
    workers doing this at once move each job once."""
    now = utcnow()
    moved = 0
    expired = session.exec(select(Query).where(Query.status == "running", Query.mode == "prod",
                                               Query.lease_until < now)).all()
    for q in expired:
        if q.attempts >= settings.query_max_attempts:
            done = session.exec(update(Query).where(Query.id == q.id, Query.status == "running", Query.lease_until < now)
                                .values(status="failed", error_code="worker_lost",
                                        error_message=f"The query's worker stopped {q.attempts} times; it was not run.",
                                        error_message_zh=f"执行该查询的工作进程已中断 {q.attempts} 次，查询未执行。",
                                        finished_at=now, lease_until=None)
                                .execution_options(synchronize_session=False)).rowcount
            if done == 1 and q.budget_entry_id is not None:
                ledger.refund(session, q.budget_entry_id)
        else:
            done = session.exec(update(Query).where(Query.id == q.id, Query.status == "running", Query.lease_until < now)
                                .values(status="queued", worker=None, lease_until=None, progress=0.0)
                                .execution_options(synchronize_session=False)).rowcount
        moved += done
        session.commit()
    # A dev query runs inside its request, without a lease: one still "running" an hour on lost
    # its process. Failed (it reserved nothing).
    stale = now - timedelta(seconds=max(3600, settings.query_lease_seconds))
    moved += session.exec(update(Query).where(Query.status == "running", Query.mode == "dev", Query.started_at < stale)
                          .values(status="failed", error_code="worker_lost",
                                  error_message="The process running this dev query stopped.",
                                  error_message_zh="执行该开发模式查询的进程已中断。", finished_at=now)
                          .execution_options(synchronize_session=False)).rowcount
    session.commit()
    return moved


def claim(session: Session, settings: Settings, worker: str) -> Query | None:
    """Take the oldest queued prod query for this worker, or None."""
    stmt = select(Query.id).where(Query.status == "queued", Query.mode == "prod").order_by(Query.id).limit(1)
    if session.get_bind().dialect.name == "postgresql":
        stmt = stmt.with_for_update(skip_locked=True)
    for _ in range(5):
        qid = session.exec(stmt).first()
        if qid is None:
            session.rollback()
            return None
        now = utcnow()
        won = session.exec(update(Query).where(Query.id == qid, Query.status == "queued").values(
            status="running", worker=worker, attempts=Query.attempts + 1, started_at=now, progress=0.0,
            lease_until=now + timedelta(seconds=settings.query_lease_seconds))
            .execution_options(synchronize_session=False)).rowcount
        session.commit()
        if won == 1:
            return session.get(Query, qid)
    return None


class _Heartbeat(threading.Thread):
    """Renews the lease, records the engine's progress, and interrupts the engine on cancel."""

    def __init__(self, engine: Engine, settings: Settings, query_id: int, worker: str) -> None:
        super().__init__(daemon=True, name=f"pdao-heartbeat-{query_id}")
        self.engine, self.settings, self.query_id, self.worker = engine, settings, query_id, worker
        self.con: Any = None
        self.stop = threading.Event()

    def run(self) -> None:
        every = min(HEARTBEAT_SECONDS, self.settings.query_lease_seconds / 3)   # several beats per lease
        while not self.stop.wait(every):
            try:
                self.beat()
            except Exception:  # noqa: BLE001 - a missed beat is retried; the lease has slack
                log.exception("heartbeat failed for query %s", self.query_id)

    def beat(self) -> None:
        progress = None
        if self.con is not None:
            try:
                p = self.con.query_progress()
                progress = max(0.0, min(float(p) / 100.0, 0.99)) if p is not None and p >= 0 else None
            except Exception:  # noqa: BLE001 - progress is best effort
                progress = None
        values: dict[str, Any] = {"lease_until": utcnow() + timedelta(seconds=self.settings.query_lease_seconds)}
        if progress is not None:
            values["progress"] = progress
        with Session(self.engine) as s:
            s.exec(update(Query).where(Query.id == self.query_id, Query.status == "running", Query.worker == self.worker)
                   .values(**values).execution_options(synchronize_session=False))
            s.commit()
            cancel = s.exec(select(Query.cancel_requested).where(Query.id == self.query_id)).first()
        if cancel and self.con is not None:
            self.con.interrupt()


def run_one(engine: Engine, settings: Settings, enforcers: SceneEnforcers, worker: str) -> bool:
    """Requeue expired jobs, claim one and run it. False when the queue was empty."""
    with Session(engine, expire_on_commit=False) as session:
        requeue_expired(session, settings)
        q = claim(session, settings, worker)
        if q is None:
            return False
        stall = float(os.environ.get("PDAO_TEST_WORKER_STALL", "0") or 0)
        beat = _Heartbeat(engine, settings, q.id, worker)

        def on_connection(con: Any) -> None:
            beat.con = con

        beat.start()
        try:
            if stall:   # tests only: hold the claimed job, as a worker stuck or about to be killed would
                time.sleep(stall)
            if session.exec(select(Query.cancel_requested).where(Query.id == q.id)).first():
                from sandbox.queries import finish_failed
                finish_failed(session, q, "cancelled", "The query was cancelled.", "查询已取消。", worker=worker,
                              status="cancelled")
            else:
                run_and_store(session, settings, q, enforcers=enforcers, on_connection=on_connection, worker=worker)
        finally:
            beat.stop.set()
        log.info("query %s: %s", q.id, q.status)
        return True


def work(engine: Engine, settings: Settings, *, stop: threading.Event | None = None, poll_seconds: float = 1.0,
         once: bool = False) -> None:
    """Run queued queries until `stop` is set (or the queue is empty, with `once`)."""
    stop = stop or threading.Event()
    enforcers = SceneEnforcers(engine)
    name = worker_name()
    log.info("worker %s started", name)
    while not stop.is_set():
        try:
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


__all__ = ["claim", "requeue_expired", "run_one", "work", "start_in_thread", "worker_name"]
