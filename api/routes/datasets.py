"""Catalog endpoints: metadata only. No endpoint here, or anywhere, returns rows."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response, status
from starlette.concurrency import run_in_threadpool

from api.deps import SessionDep, SettingsDep, caller
from api.uploads import receive_file
from catalog import service
from catalog.descriptor import Category, OpeningClass, Sensitivity, parse_descriptor_dict, parse_descriptor_text
from catalog.schemas import DatasetOut, DatasetPage, DescriptorReport, VersionOut
from pdao.kernel.db import MAX_ID
from pdao.kernel.errors import bad_request, forbidden, invalid
from pdao.kernel.identity.service import Principal
from policies.catalog_rules import CatalogScope, catalog_scope, may_manage_dataset
from sandbox.engine.store import load_version

router = APIRouter(tags=["catalog"])

Reader = caller("catalog", "read")
Writer = caller("catalog", "write")
Loader = caller("dataset_version", "create")


def _scope(principal: Principal) -> CatalogScope:
    """The caller's part of the catalog, by role and organization (a company's reviewer sees what a
    tenant sees: `policies.catalog_rules.catalog_scope`)."""
    return catalog_scope(principal.role, principal.org_id, principal.org_kind)


@router.get("/datasets", name="datasets.list", response_model=DatasetPage)
def list_datasets(
    principal: Reader,
    session: SessionDep,
    q: Annotated[str | None, Query(max_length=100, description="text in code, titles, descriptions or field names")] = None,
    department: Annotated[str | None, Query(max_length=64)] = None,
    category: Category | None = None,
    grade: Annotated[int | None, Query(ge=1, le=5)] = None,
    max_grade: Annotated[int | None, Query(ge=1, le=5)] = None,
    opening_class: OpeningClass | None = None,
    sensitivity: Sensitivity | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
) -> DatasetPage:
    """Datasets the caller may see, with search and filters."""
    flt = service.DatasetFilters(q=q, department=department, category=category, grade=grade, max_grade=max_grade,
                                 opening_class=opening_class, sensitivity=sensitivity, limit=limit, offset=offset)
    return service.list_datasets(session, _scope(principal), flt)


@router.get("/datasets/{code}", name="datasets.read", response_model=DatasetOut)
def get_dataset(code: str, principal: Reader, session: SessionDep, request: Request) -> DatasetOut:
    request.state.object = f"dataset:{code}"[:200]
    return service.get_dataset(session, code, _scope(principal))


YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")


@router.post("/datasets", name="datasets.register", response_model=DescriptorReport,
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/json": {"schema": {"type": "object"}},
                 "application/yaml": {"schema": {"type": "string"}}}}})
async def register_dataset(request: Request, response: Response, principal: Writer,
                           session: SessionDep) -> DescriptorReport:
    """Register or update a dataset descriptor (JSON, or the YAML of `catalog/descriptors`)."""
    body = await request.body()  # at most 1 MiB: api.limits refuses larger bodies before they are read
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype in YAML_TYPES:
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise bad_request("bad_encoding", "The descriptor must be UTF-8.", "描述文件必须为 UTF-8 编码。") from None
        desc, problems = parse_descriptor_text(text, "request")
    else:
        data = _json_object(body)
        desc, problems = parse_descriptor_dict(data)
    if desc is None:
        raise service.DescriptorsRefused(problems)
    request.state.object = f"dataset:{desc.code}"
    report = await run_in_threadpool(_register, session, principal, desc)
    if report.action == "created":
        response.status_code = status.HTTP_201_CREATED
    return report


def _register(session, principal, desc) -> DescriptorReport:  # noqa: ANN001
    owner = service.source_department_of(session, desc.code)
    if not may_manage_dataset(principal.role, principal.org_code, owner or desc.source_department):
        raise forbidden("not_your_department", "Only a provider of the source department may register or change "
                        "this dataset.", "只有数据提供部门本部门的人员可以登记或修改该数据集。")
    action = service.apply_descriptor(session, desc)
    session.commit()
    ds = service.find_dataset(session, desc.code)
    return DescriptorReport(code=desc.code, action=action, revision=ds.revision)


def _json_object(body: bytes) -> dict[str, Any]:
    import json

    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise bad_request("bad_json", "The body is not valid JSON.", "请求体不是有效的 JSON。") from None
    if not isinstance(data, dict):
        raise bad_request("bad_json", "The descriptor must be a JSON object.", "描述必须是 JSON 对象。")
    return data


class LoadedVersion(VersionOut):
    code: str
    warnings: list[dict[str, Any]]


UPLOAD_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary"}, "note": {"type": "string"}}}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}


@router.post("/datasets/{code}/versions", name="datasets.load_version", response_model=LoadedVersion,
             status_code=status.HTTP_201_CREATED, openapi_extra=UPLOAD_BODY)
async def add_version(code: str, principal: Loader, session: SessionDep, settings: SettingsDep, request: Request,
                      note: Annotated[str, Query(max_length=500)] = "") -> LoadedVersion:
    """Load a data file (Parquet, or CSV with a header) as the next immutable `prod` version: as a
    multipart form (`file`, optional `note`) or as the raw body. The dev twin is synthetic and only
    `pdao synth` makes it."""
    request.state.object = f"dataset:{code}"[:200]
    await run_in_threadpool(_may_load, session, principal, code)
    settings.ensure_home()
    staged = settings.staging_dir / f"upload-{uuid.uuid4().hex}"
    try:
        received = await receive_file(request, staged, settings.max_upload_bytes)
        note = received.fields.get("note", note)[:500]
        if received.fields.get("env", "prod") != "prod":
            raise invalid("dev_is_synthetic", "Uploads are real data (env prod); the dev twin comes only from "
                          "`pdao synth`.", "上传的数据均为真实数据（prod）；开发孪生数据只能由 pdao synth 生成。")
        version, report = await run_in_threadpool(
            load_version, session, settings, code, staged, env="prod", source="upload", note=note,
            loaded_by=principal.user_id)
    finally:
        staged.unlink(missing_ok=True)
    request.state.object = f"dataset:{code}:prod:v{version.number}"
    return LoadedVersion(code=code, warnings=report.warnings,
                         **version.model_dump(include=set(VersionOut.model_fields)))


def _may_load(session, principal, code: str) -> None:  # noqa: ANN001
    service.find_dataset(session, code, _scope(principal))
    if not may_manage_dataset(principal.role, principal.org_code, service.source_department_of(session, code) or ""):
        raise forbidden("not_your_department", "Only a provider of the source department may load data.",
                        "只有数据提供部门本部门的人员可以加载数据。")
