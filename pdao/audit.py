"""Audit events: one row per request and per security event (login, failed login, token use).

Issue #5 turns this into a hash-chained, verifiable log; the recording points already exist:
every HTTP request passes through `api.app`'s audit middleware, which calls `record` exactly once.
Never put raw cell values in an event.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Column
from sqlalchemy.engine import Engine
from sqlmodel import Field, Session, SQLModel

from pdao.db import utcnow


class AuditEvent(SQLModel, table=True):
    __tablename__ = "audit_event"

    seq: int | None = Field(default=None, primary_key=True)
    at: datetime = Field(default_factory=utcnow, index=True)
    request_id: str | None = Field(default=None, max_length=64)
    actor: str | None = Field(default=None, max_length=64, index=True)
    org: str | None = Field(default=None, max_length=64, index=True)
    role: str | None = Field(default=None, max_length=20)
    auth_method: str | None = Field(default=None, max_length=20)  # password | token | api_key
    action: str = Field(max_length=80, index=True)
    object: str | None = Field(default=None, max_length=200)
    scene_id: int | None = Field(default=None, index=True)
    decision: str = Field(max_length=10, index=True)  # allow | deny | error
    status: int | None = None
    reason: str | None = Field(default=None, max_length=500)
    method: str | None = Field(default=None, max_length=10)
    path: str | None = Field(default=None, max_length=400)
    client: str | None = Field(default=None, max_length=64)
    detail: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))


def record(engine: Engine, **fields: Any) -> AuditEvent:
    """Append one event in its own transaction, so that it survives a rolled-back business change."""
    event = AuditEvent(**fields)
    with Session(engine, expire_on_commit=False) as session:
        session.add(event)
        session.commit()
    return event
