"""Tenant uploads (issue #6): a company's own table, for joins inside its own scenes. Metadata only:
no endpoint returns a cell of an upload, to anyone, the uploading tenant included."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, status
from pydantic import BaseModel
from sqlmodel import select
from starlette.concurrency import run_in_threadpool

from api.deps import SessionDep, SettingsDep, caller
from api.uploads import receive_file
from pdao.kernel.errors import PdaoError, invalid, too_large
from pdao.kernel.identity.models import Organization, User
from sandbox.uploads.models import TenantUpload
from sandbox.uploads.service import (
    MAX_NOTE,
    PII_MIN_SCORE,
    UploadSlot,
    check_join_targets,
    get_versions,
    latest_upload,
    parse_schema,
    parse_schema_text,
    store_upload,
    upload_scope,
    visible_uploads,
)

router = APIRouter(tags=["uploads"])

Uploader = caller("upload", "create")
Reader = caller("upload", "read")


class UploadColumn(BaseModel):
    name: str
    type: str
    role: str
    pii_kind: str | None = None
    nullable: bool
    joins: str | None = None


class UploadOut(BaseModel):
    """An upload version's metadata. `note` and `warnings` are the tenant's own; others see None."""

    id: int
    org: str
    name: str
    version: int
    columns: list[UploadColumn]
    format: str
    row_count: int
    size_bytes: int
    sha256: str
    uploaded_by: str | None
    created_at: datetime
    note: str | None = None
    warnings: list[dict[str, Any]] | None = None


class UploadSummary(UploadOut):
    version_count: int


class UploadList(BaseModel):
    items: list[UploadSummary]
    total: int


UPLOAD_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary", "description": "CSV (UTF-8, header line) or Parquet"},
        "schema": {"type": "string", "description": "the declared schema, JSON (docs/uploads.md); omitted: the "
                   "schema of the table's latest version"},
        "name": {"type": "string"}, "note": {"type": "string"}}}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}


def _out(session, row: TenantUpload, org_code: str, own: bool, cls=UploadOut, **extra) -> UploadOut:  # noqa: ANN001
    user = session.get(User, row.uploaded_by)
    return cls(id=row.id, org=org_code, name=row.name, version=row.version,
               columns=[UploadColumn(**c) for c in row.columns], format=row.format, row_count=row.row_count,
               size_bytes=row.size_bytes, sha256=row.sha256, uploaded_by=user.username if user else None,
               created_at=row.created_at, note=row.note if own else None,
               warnings=row.warnings if own else None, **extra)


@router.post("/uploads", name="uploads.create", response_model=UploadOut, status_code=status.HTTP_201_CREATED,
             openapi_extra=UPLOAD_BODY)
async def create_upload(request: Request, principal: Uploader, session: SessionDep, settings: SettingsDep,
                        name: Annotated[str | None, Query(max_length=64)] = None,
                        note: Annotated[str, Query(max_length=MAX_NOTE)] = "") -> UploadOut:
    """The company's own table as the next immutable version of `name`: a multipart form with
    `file` (CSV or Parquet), `schema` (JSON) and optional `note`; or the raw body with `?name=`,
    reusing the schema of the table's latest version. Checked against the schema, scanned for
    undeclared personal data, refused whole with a report by line — or stored in the tenant's own
    space. The answer is metadata; no cell is ever returned. Before the body is read, the upload
    is counted against the organization's rate and concurrency (429 `upload_rate_limited`,
    `upload_in_progress`)."""
    request.state.object = "upload"
    settings.ensure_home()
    # counted against the organization's rate and concurrency before a byte of the file is read
    slot = await run_in_threadpool(UploadSlot.take, session.get_bind(), settings, principal.org_id, principal.user_id)
    request.state.upload_slot = slot
    staged = settings.staging_dir / f"upload-{uuid.uuid4().hex}"
    try:
        try:
            received = await receive_file(request, staged, settings.max_tenant_upload_bytes)
        except PdaoError as e:
            if e.status == 413:
                raise too_large(settings.max_tenant_upload_bytes) from None
            raise
        form_name = received.fields.get("name") or name
        note = received.fields.get("note", note)[:MAX_NOTE]
        row, report = await run_in_threadpool(_store, request, session, settings, principal,
                                               received.fields.get("schema"), form_name, note, staged)
    finally:
        staged.unlink(missing_ok=True)
        await run_in_threadpool(slot.release)
    request.state.object = f"upload:{principal.org_code}/{row.name}/v{row.version}"
    request.state.audit_detail = {"upload": row.name, "version": row.version, "rows": row.row_count,
                                  "sha256": row.sha256, "format": row.format}
    return _out(session, row, principal.org_code, True)


def _store(request, session, settings, principal, schema_text: str | None, name: str | None, note: str,  # noqa: ANN001, ANN202
           staged):  # noqa: ANN001
    """Check and store a received file (the API's route and the console's form). A request not yet
    counted against its organization's rate and concurrency (the console's form, which reads its
    body first) is counted here, before any check runs."""
    if getattr(request.state, "upload_slot", None) is not None:
        return _check_and_store(request, session, settings, principal, schema_text, name, note, staged)
    with UploadSlot.take(session.get_bind(), settings, principal.org_id, principal.user_id) as slot:
        request.state.upload_slot = slot
        return _check_and_store(request, session, settings, principal, schema_text, name, note, staged)


def _check_and_store(request, session, settings, principal,  # noqa: ANN001, ANN202
                     schema_text: str | None, name: str | None, note: str, staged):  # noqa: ANN001
    if schema_text is None and name is not None:
        previous = latest_upload(session, principal.org_id, name)
        if previous is None:
            raise invalid("schema_required", f"'{name}' has no version yet: send its declared schema as the form "
                          "field 'schema' (JSON).", f"{name} 尚无版本，请以表单字段 schema（JSON）声明表结构。")
        schema = parse_schema({"name": name, "columns": previous.columns})
    else:
        schema = parse_schema_text(schema_text, name)
    request.state.object = f"upload:{principal.org_code}/{schema.name}"   # a refusal is audited by name too
    check_join_targets(session, schema, principal.role, principal.org_id, principal.org_kind)
    if note:
        from sandbox.engine.pii import find_pii_batch

        if any(f.score >= PII_MIN_SCORE for f in find_pii_batch([note])[0]):
            raise invalid("unexpected_pii", "The note holds personal data; nothing was stored.",
                          "备注含有个人信息，未保存任何数据。", details={"findings": [{"field": "note"}]})
    org = session.exec(select(Organization).where(Organization.id == principal.org_id)).one()
    return store_upload(session, settings, org=org, user_id=principal.user_id, schema=schema, src=staged, note=note)


@router.get("/uploads", name="uploads.list", response_model=UploadList)
def list_uploads(principal: Reader, session: SessionDep,
                 org: Annotated[str | None, Query(max_length=64, description="office and auditors: one tenant")] = None
                 ) -> UploadList:
    """The uploads the caller may see, newest version of each table: a tenant (an applicant, or
    anyone in a company) its own organization's; the office, reviewers and auditors every tenant's
    (metadata); providers and operators none."""
    rows = visible_uploads(session, principal.role, principal.org_id, principal.org_kind, org_code=org)
    latest: dict[tuple[str, str], tuple[TenantUpload, str, int]] = {}
    for row, code in rows:
        k = (code, row.name)
        n = latest[k][2] + 1 if k in latest else 1
        latest[k] = (row, code, n)
    own = upload_scope(principal.role, principal.org_id, principal.org_kind) == principal.org_id
    items = [_out(session, row, code, own, UploadSummary, version_count=n) for row, code, n in latest.values()]
    return UploadList(items=items, total=len(items))


@router.get("/uploads/{name}", name="uploads.versions", response_model=list[UploadOut])
def upload_versions(name: str, principal: Reader, session: SessionDep, request: Request,
                    org: Annotated[str | None, Query(max_length=64, description="office and auditors: one tenant")] = None
                    ) -> list[UploadOut]:
    """Every version of one table (metadata). Another tenant's table is 404, like a missing one."""
    request.state.object = f"upload:{name}"[:200]
    rows = get_versions(session, principal.role, principal.org_id, principal.org_kind, name[:64], org)
    own = upload_scope(principal.role, principal.org_id, principal.org_kind) == principal.org_id
    return [_out(session, row, code, own) for row, code in rows]
