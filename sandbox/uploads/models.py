"""Tenant uploads (issue #6): a company's own table, one immutable version per row (metadata only;
the cells live in a read-only Parquet file under PDAO_HOME/tenants/<org>/uploads/<name>/), and what
each company's stored versions add up to (its quota, issue #13)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, UniqueConstraint, event
from sqlmodel import Field, SQLModel

from pdao.kernel.db import utcnow


class TenantUpload(SQLModel, table=True):
    """One version of one of a tenant's tables. Never rewritten or deleted: a new file is a new
    version. `storage_path` is relative to PDAO_HOME and never leaves the server."""

    __tablename__ = "tenant_upload"
    __table_args__ = (UniqueConstraint("org_id", "name", "version"),)

    id: int | None = Field(default=None, primary_key=True)
    org_id: int = Field(foreign_key="organization.id", index=True)   # the tenant
    name: str = Field(max_length=64, index=True)
    version: int
    # the declared schema, checked: [{name, type, role, pii_kind, nullable, joins}]
    columns: list[dict[str, Any]] = Field(sa_column=Column(JSON, nullable=False))
    format: str = Field(max_length=10)        # csv | parquet (what was sent; stored as Parquet)
    row_count: int
    size_bytes: int                           # of the stored Parquet file
    sha256: str = Field(max_length=64, index=True)
    storage_path: str = Field(max_length=400)  # relative to PDAO_HOME; never shown to clients
    # what the checks noted without refusing (counts and row numbers, never values)
    warnings: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    note: str = Field(default="", max_length=500)
    uploaded_by: int = Field(foreign_key="app_user.id")
    created_at: datetime = Field(default_factory=utcnow)


@event.listens_for(TenantUpload, "before_update")
@event.listens_for(TenantUpload, "before_delete")
def _uploads_are_immutable(_mapper, _connection, target: TenantUpload) -> None:  # noqa: ANN001
    raise ValueError(f"tenant_upload {target.org_id}/{target.name}/v{target.version} is immutable")


class TenantUploadUsage(SQLModel, table=True):
    """What one organization's stored upload versions hold together: the sums of their
    `size_bytes` and `row_count`. Raised in the same transaction that stores a version, by one
    conditional UPDATE that also holds the quota (`sandbox.uploads.service.claim_quota`); that UPDATE is
    also what makes two uploads of one organization take their turns. Never lowered: versions are
    never deleted."""

    __tablename__ = "tenant_upload_usage"

    org_id: int = Field(foreign_key="organization.id", primary_key=True)
    stored_bytes: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    stored_rows: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))


class TenantUploadCheck(SQLModel, table=True):
    """One upload an organization started, counted before its file is read
    (`sandbox.uploads.service.admit_upload`): against its rate (`started_at` within the last hour) and,
    while it runs (`finished_at` null and `lease_until` not passed), against the uploads it may
    have checked at once. The request renews its lease while it runs, so a process that died
    mid-check frees the slot when the lease ends. Rows older than the rate's hour are deleted as
    new ones come; nothing here holds a cell or a file name."""

    __tablename__ = "tenant_upload_check"

    id: int | None = Field(default=None, primary_key=True)
    org_id: int = Field(foreign_key="organization.id", index=True)
    user_id: int = Field(foreign_key="app_user.id")
    started_at: datetime = Field(default_factory=utcnow, index=True)
    lease_until: datetime
    finished_at: datetime | None = None
