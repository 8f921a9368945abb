"""Queries (jobs persisted in the metadata database) and their results (metadata; the cells live
in the result store, `Settings.results_dir`)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, Text, UniqueConstraint, false
from sqlmodel import Field, SQLModel

from pdao.kernel.db import utcnow

# queued → running → held (prod, waiting for export review) | done (dev) | failed | cancelled;
# held → released (by the scene's release policy at once, or by reviewers) | rejected by export review.
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
    # lineage: every (dataset, field, usage) the checked query relied on, each decided through casbin
    # at submission, and the scene's policy version then
    uses: list[list[str]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False, server_default="[]"))
    policy_version: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
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


# dev: a synthetic answer (never reviewed); held → released | rejected; a reviewer's suppression or
# rounding makes a new version (held, checked again) and the old one `superseded`.
RESULT_STATES = ("dev", "held", "released", "rejected", "superseded")


class QueryResult(SQLModel, table=True):
    """One version of a query's answer. Version 1 is what the engine produced; a reviewer's
    suppression or rounding adds version n+1 (parent_id: the version it was made from)."""

    __tablename__ = "query_result"
    __table_args__ = (UniqueConstraint("query_id", "version", name="uq_query_result_query_id_version"),)

    id: int | None = Field(default=None, primary_key=True)
    query_id: int = Field(foreign_key="query.id", index=True)
    version: int = Field(default=1, sa_column_kwargs={"server_default": "1"})
    parent_id: int | None = Field(default=None, foreign_key="query_result.id")
    revision: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))  # what a reviewer changed
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
    # the disclosure checks (sandbox.results.disclosure.report), computed inside the domain; prod only
    report: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    # the per-cell statistics the checks rest on (aggregates), or one identity per row (rows), stay
    # in the result store, never downloadable
    stats_path: str | None = Field(default=None, max_length=400)
    # keyed fingerprint of the cells (sandbox.results.fingerprint): how a file found outside is traced back
    content_fp: str | None = Field(default=None, max_length=64, index=True)
    released_by: str | None = Field(default=None, max_length=20)   # policy | reviewers
    decided_at: datetime | None = None
    created_at: datetime = Field(default_factory=utcnow)
    # a dev answer's stored bytes (its file), counted against its organization's quota, and when its
    # file was removed as older than PDAO_DEV_ANSWER_DAYS (sandbox.results.export.expire_dev_answers)
    size_bytes: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, server_default="0"))
    expired_at: datetime | None = None


class ResultReview(SQLModel, table=True):
    """One reviewer's decision on one result version."""

    __tablename__ = "result_review"
    __table_args__ = (UniqueConstraint("result_id", "reviewer_id"),)

    id: int | None = Field(default=None, primary_key=True)
    result_id: int = Field(foreign_key="query_result.id", index=True)
    reviewer_id: int = Field(foreign_key="app_user.id")
    reviewer_org_id: int = Field(foreign_key="organization.id")
    decision: str = Field(max_length=10)             # release | reject
    reason: str = Field(sa_column=Column(Text, nullable=False))
    # a release that overrides failing checks (two distinct reviewers' overrides release such a
    # result), and which checks failed when it was decided
    override: bool = Field(default=False, sa_column_kwargs={"server_default": false()})
    overridden_checks: list[str] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    created_at: datetime = Field(default_factory=utcnow)


class ResultExport(SQLModel, table=True):
    """One download of a released result: the file's export id, keyed fingerprint and hash."""

    __tablename__ = "result_export"

    id: int | None = Field(default=None, primary_key=True)
    export_id: str = Field(max_length=40, unique=True, index=True)
    result_id: int = Field(foreign_key="query_result.id", index=True)
    user_id: int = Field(foreign_key="app_user.id")
    org_id: int = Field(foreign_key="organization.id")
    format: str = Field(max_length=10)
    fingerprint: str = Field(max_length=64)           # HMAC(export id, content fingerprint)
    content_fp: str = Field(max_length=64, index=True)
    sha256: str = Field(max_length=64)                # of the bytes sent
    size_bytes: int
    created_at: datetime = Field(default_factory=utcnow)


class TenantRate(SQLModel, table=True):
    """How many queries (and previews) an organization sent in the current minute: one row per
    organization, moved by conditional UPDATEs so parallel requests can never pass the rate
    (`sandbox.queries.service.check_rate`)."""

    __tablename__ = "tenant_rate"

    org_id: int = Field(foreign_key="organization.id", primary_key=True)
    window_start: datetime                       # the minute counted (UTC, seconds and below zero)
    count: int = 0
