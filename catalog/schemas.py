"""What clients see of the catalog: metadata only, never rows and never storage paths."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel


class OrganizationOut(BaseModel):
    code: str
    name_zh: str
    name_en: str
    kind: str


class FieldOut(BaseModel):
    name: str
    type: str
    sensitivity: str
    pii_kind: str | None
    masking: str
    grade: int
    nullable: bool
    domain: list[str] | None
    bounds: dict[str, Any] | None
    unit: str | None
    description_zh: str
    description_en: str


class VersionOut(BaseModel):
    env: str
    number: int
    dataset_revision: int
    row_count: int
    size_bytes: int
    sha256: str
    source: str
    note: str
    created_at: datetime


class DatasetSummary(BaseModel):
    code: str
    title_zh: str
    title_en: str
    source_department: OrganizationOut
    category: str
    grade: int
    opening_class: str
    update_cycle: str
    field_count: int
    latest_version: dict[str, int | None]  # env -> latest version number
    updated_at: datetime


class DatasetOut(BaseModel):
    code: str
    title_zh: str
    title_en: str
    description_zh: str
    description_en: str
    source_department: OrganizationOut
    standard: str
    update_cycle: str
    category: str
    grade: int
    opening_class: str
    privacy_unit: str | None
    keywords: list[str]
    revision: int
    descriptor_sha256: str
    fields: list[FieldOut]
    versions: list[VersionOut]
    created_at: datetime
    updated_at: datetime


class DatasetPage(BaseModel):
    items: list[DatasetSummary]
    total: int
    limit: int
    offset: int


class DescriptorReport(BaseModel):
    """The answer to a register/update: what happened."""

    code: str
    action: str  # created | updated | unchanged
    revision: int
