"""Catalog tables: datasets, their fields and immutable versions (metadata only)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Column, UniqueConstraint, event
from sqlmodel import Field, SQLModel

from pdao.kernel.db import utcnow


class Dataset(SQLModel, table=True):
    __tablename__ = "dataset"

    id: int | None = Field(default=None, primary_key=True)
    code: str = Field(index=True, unique=True, max_length=128)
    title_zh: str = Field(max_length=200)
    title_en: str = Field(max_length=200)
    description_zh: str = ""
    description_en: str = ""
    source_org_id: int = Field(foreign_key="organization.id", index=True)
    standard: str = Field(max_length=200)
    update_cycle: str = Field(max_length=20)
    category: str = Field(max_length=40, index=True)
    grade: int = Field(index=True)
    opening_class: str = Field(max_length=20, index=True)
    privacy_unit: str | None = Field(default=None, max_length=64)
    keywords: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    # Bumped whenever the descriptor changes, only by a conditional UPDATE on this row
    # (catalog.service.apply_descriptor), so concurrent writers never lose a revision.
    revision: int = 1
    # How many versions (all envs) were loaded: a load bumps it, in the transaction that inserts
    # the version, only while `revision` is still the one its file was checked against. A
    # descriptor change that is only allowed without versions requires it to be 0 in its own
    # UPDATE. Both sides condition on this one row, so neither can slip past the other.
    version_count: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    descriptor_sha256: str = Field(max_length=64)
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class DatasetRevision(SQLModel, table=True):
    """The descriptor of each revision of a dataset, as registered. Immutable: written when a
    dataset is created and on every descriptor change, never rewritten or deleted. A version's
    `dataset_revision` names the row its file was checked against."""

    __tablename__ = "dataset_revision"
    __table_args__ = (UniqueConstraint("dataset_id", "revision"),)

    id: int | None = Field(default=None, primary_key=True)
    dataset_id: int = Field(foreign_key="dataset.id", index=True)
    revision: int
    descriptor: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    sha256: str = Field(max_length=64)
    created_at: datetime = Field(default_factory=utcnow)


@event.listens_for(DatasetRevision, "before_update")
@event.listens_for(DatasetRevision, "before_delete")
def _revisions_are_immutable(_mapper, _connection, target: DatasetRevision) -> None:  # noqa: ANN001
    raise ValueError(f"dataset_revision {target.dataset_id}/{target.revision} is immutable")


class DatasetField(SQLModel, table=True):
    __tablename__ = "dataset_field"
    __table_args__ = (UniqueConstraint("dataset_id", "name"),)

    id: int | None = Field(default=None, primary_key=True)
    dataset_id: int = Field(foreign_key="dataset.id", index=True)
    position: int
    name: str = Field(max_length=64)
    type: str = Field(max_length=20)
    sensitivity: str = Field(max_length=20)
    pii_kind: str | None = Field(default=None, max_length=20)
    masking: str = Field(max_length=20)
    grade: int
    nullable: bool = True
    domain: list[str] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    bounds: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    unit: str | None = Field(default=None, max_length=20)
    description_zh: str = ""
    description_en: str = ""


class DatasetVersion(SQLModel, table=True):
    """An immutable snapshot in the domain store. Rows are never rewritten; a new load is a new version."""

    __tablename__ = "dataset_version"
    __table_args__ = (UniqueConstraint("dataset_id", "env", "number"),)

    id: int | None = Field(default=None, primary_key=True)
    dataset_id: int = Field(foreign_key="dataset.id", index=True)
    env: str = Field(max_length=8)  # prod: the real data; dev: the synthetic twin
    number: int
    dataset_revision: int
    row_count: int
    size_bytes: int
    sha256: str = Field(max_length=64, index=True)
    storage_path: str = Field(max_length=400)  # relative to the domain store; never shown to clients
    source: str = Field(max_length=20)  # upload | cli | synth
    note: str = ""
    loaded_by: int | None = Field(default=None, foreign_key="app_user.id")
    created_at: datetime = Field(default_factory=utcnow)
