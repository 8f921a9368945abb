"""Queries (jobs persisted in the metadata database) and their results (metadata; the cells live
in the result store, `Settings.results_dir`)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Column, Text
from sqlmodel import Field, SQLModel

from pdao.db import utcnow

# queued → running → held (prod, waiting for export review) | done (dev) | failed | cancelled;
# held → released | rejected by export review (issue 5).
QUERY_STATES = ("queued", "running", "held", "done", "released", "rejected", "failed", "cancelled")
FINAL_STATES = ("held", "done", "released", "rejected", "failed", "cancelled")


class Query(SQLModel, table=True):
    __tablename__ = "query"

    id: int | None = Field(default=None, primary_key=True)
    scene_id: int = Field(foreign_key="scene.id", index=True)
    org_id: int = Field(foreign_key="organization.id", index=True)   # the tenant
    requester_id: int = Field(foreign_key="app_user.id")
    mode: str = Field(max_length=4)                  # dev (synthetic twin) | prod
    kind: str = Field(max_length=10)                 # aggregate | rows
    sql_text: str = Field(sa_column=Column(Text, nullable=False))      # as the user sent it (audit: SQL yes)
    checked_sql: str = Field(sa_column=Column(Text, nullable=False))   # regenerated from the checked tree
    dataset: str = Field(max_length=128)
    version_id: int = Field(foreign_key="dataset_version.id")          # pinned at submission
    upload: str | None = Field(default=None, max_length=128)
    epsilon: float = 0.0                             # asked (reserved)
    epsilon_spent: float = 0.0                       # what the release spent by OpenDP's maps
    max_contributions: int = 10
    budget_entry_id: int | None = Field(default=None, foreign_key="budget_entry.id")
    status: str = Field(default="queued", max_length=10, index=True)
    progress: float = 0.0                            # 0..1
    attempts: int = 0
    worker: str | None = Field(default=None, max_length=120)
    lease_until: datetime | None = None
    cancel_requested: bool = False
    error_code: str | None = Field(default=None, max_length=64)
    error_message: str | None = None
    error_message_zh: str | None = None
    result_id: int | None = None
    created_at: datetime = Field(default_factory=utcnow)
    started_at: datetime | None = None
    finished_at: datetime | None = None


class QueryResult(SQLModel, table=True):
    __tablename__ = "query_result"

    id: int | None = Field(default=None, primary_key=True)
    query_id: int = Field(foreign_key="query.id", index=True, unique=True)
    scene_id: int = Field(foreign_key="scene.id", index=True)
    org_id: int = Field(foreign_key="organization.id", index=True)
    synthetic: bool                                   # computed on the dev twin
    kind: str = Field(max_length=10)
    status: str = Field(max_length=10, index=True)   # dev | held | released | rejected
    columns: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    row_count: int = 0
    noise: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    epsilon_spent: float = 0.0
    notes: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    storage_path: str = Field(max_length=400)        # relative to the result store
    sha256: str = Field(max_length=64)
    created_at: datetime = Field(default_factory=utcnow)
