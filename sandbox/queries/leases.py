"""A running job's lease: who runs it (`worker_name`), how long it may run (`time_limit`), and the
heartbeat that renews its lease, records the engine's progress and interrupts the engine on cancel
or past the time limit. Shared by the worker (`sandbox.worker`) and template runs."""

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

from pdao.kernel.config import Settings
from pdao.kernel.db import utcnow
from sandbox.results.models import Query

log = logging.getLogger("pdao.worker")
HEARTBEAT_SECONDS = 2.0


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Heartbeat(threading.Thread):
    """Renews the lease, records the engine's progress, and interrupts the engine on cancel or when
    the run passes its time limit (`reason` says which)."""

    def __init__(self, engine: Engine, settings: Settings, query_id: int, worker: str, *,
                 time_limit: float = float("inf")) -> None:
        super().__init__(daemon=True, name=f"pdao-heartbeat-{query_id}")
        self.engine, self.settings, self.query_id, self.worker = engine, settings, query_id, worker
        self.time_limit = time_limit
        self.started = time.monotonic()
        self.con: Any = None
        self.reason: str | None = None
        self.stop = threading.Event()

    def attach(self, con: Any) -> None:
        self.con = con

    def run(self) -> None:
        every = min(HEARTBEAT_SECONDS, self.settings.query_lease_seconds / 3, max(self.time_limit / 4, 0.05))
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
        if cancel and self.reason is None:
            self.reason = "cancelled"
        elif self.reason is None and time.monotonic() - self.started > self.time_limit:
            self.reason = "time_limit"
        if self.reason is not None and self.con is not None:
            self.con.interrupt()


def time_limit(settings: Settings, q: Query) -> float:
    return settings.query_time_limit_seconds if q.mode == "prod" else settings.dev_query_time_limit_seconds
