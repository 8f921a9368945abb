"""Running an approved analysis template on the tenant's own upload (issue 6): the only way
per-person values come out, and only as the template's declared derived values.

A run is checked like a query (the scene active and the tenant's, the template the one the office
approved — its digest —, every field it reads still on the scene's effective data list, the upload
the tenant's own), pinned to the newest dataset versions and the newest upload version, and run
inside the domain (`sandbox.templates.run_template`: consent filter added by the sandbox). A prod
answer is stored held for export review like any row-level answer (never released by policy); a
dev answer runs on the synthetic twin and is the tenant's at once. The run answers in the request:
a template reads the upload once and the datasets' per-person facts, seconds at the demo's size.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from sqlmodel import Session, select

from catalog.models import Dataset, DatasetVersion
from pdao import audit
from pdao.config import Settings
from pdao.db import utcnow
from pdao.errors import PdaoError, conflict, forbidden, not_found
from pdao.identity.models import Role
from pdao.identity.service import Principal
from policies import states
from policies.models import Scene, SceneTemplate
from sandbox import disclosure, export, outcomes, templates, uploads
from sandbox.execute import PlannedAnswer
from sandbox.models import Query, QueryResult
from sandbox.queries import effective_grants
from sandbox.store import snapshot_path

TEMPLATE_KIND = "template"


def _template(session: Session, scene: Scene, name: str) -> tuple[SceneTemplate, templates.Template]:
    row = session.exec(select(SceneTemplate).where(SceneTemplate.scene_id == scene.id,
                                                   SceneTemplate.name == name)).first()
    if row is None:
        raise not_found("Template", "分析模板")
    template = templates.template_from_mapping(row.definition)
    if templates.template_digest(template) != row.digest:   # what runs is what the office approved
        raise conflict("template_changed", "The template differs from the one approved; it cannot run.",
                       "分析模板与批准时不一致，不能运行。")
    return row, template


def _versions(session: Session, codes: set[str], env: str) -> dict[str, DatasetVersion]:
    out = {}
    for code in sorted(codes):
        v = session.exec(select(DatasetVersion).join(Dataset, Dataset.id == DatasetVersion.dataset_id)
                         .where(Dataset.code == code, DatasetVersion.env == env)
                         .order_by(DatasetVersion.number.desc())).first()
        if v is None:
            raise conflict("no_version", f"{code} has no {env} version loaded yet.",
                           f"{code} 尚未加载{'合成孪生' if env == 'dev' else '生产'}版本。",
                           details={"dataset": code, "env": env})
        out[code] = v
    return out


def run(session: Session, settings: Settings, principal: Principal, scene: Scene, name: str, upload_name: str,
        params: dict[str, Any] | None, mode: str, request_id: str | None = None) -> Query:
    """Check, run and store one template run (commits). Refusals change nothing."""
    if principal.role is not Role.applicant or scene.org_id != principal.org_id:
        raise forbidden("not_your_scene", "Only the scene's own organization may run its templates.",
                        "只有场景的申请单位可以运行其分析模板。")
    status = states.effective_status(scene.status, scene.valid_from, scene.valid_to, utcnow())
    if status != "active":
        raise conflict("scene_not_active", f"The scene is {status}, not active: no template can run.",
                       f"场景状态为 {status}，未生效，不能运行分析模板。", details={"status": status})
    row, template = _template(session, scene, name)
    reads = templates.template_reads(template)
    granted = set(effective_grants(session, scene))
    missing = sorted(reads - granted)
    if missing:   # an item struck or a dataset closed since approval
        raise PdaoError(403, "not_permitted", f"The scene no longer permits {missing[0][0]}.{missing[0][1]}.",
                        f"该场景已不再允许使用 {missing[0][0]}.{missing[0][1]}。",
                        details=[{"dataset": d, "field": f} for d, f in missing])
    upload = uploads.latest_upload(session, scene.org_id, upload_name)
    if upload is None:
        raise not_found("Upload", "上传数据")
    if uploads.verify_upload(settings, upload) != "ok":
        raise conflict("upload_altered", "The upload's stored file is missing or no longer matches its hash.",
                       "上传数据的存储文件缺失或与其哈希值不符。")
    as_of = states.today_in_city(utcnow())
    params = dict(params or {})
    if template.param("as_of") is not None and "as_of" not in params:
        params["as_of"] = as_of.isoformat()    # as run_template does: the run's own date
    templates.validate_params(template, params)    # data-independent refusals answer at once (422)
    env = "dev" if mode == "dev" else "prod"
    versions = _versions(session, {d for d, _ in reads}, env)
    staged = settings.staging_dir / f"template-{uuid.uuid4().hex}.parquet"
    try:
        _as_template_reads_it(settings, template, upload, staged)
        # what the run's query shows, decided before any data is read (the template, the parameters,
        # the tenant's own upload's names): its refusals are told
        shown = _shown(template, *templates.rendered_run(template, params, staged, as_of=as_of))
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    started = time.monotonic()
    try:
        answer = templates.run_template(template, params, {c: snapshot_path(settings, v) for c, v in versions.items()},
                                        staged, as_of=as_of)
    except Exception as e:  # noqa: BLE001 - sorted below; nothing of the engine's text leaks
        told = isinstance(e, PdaoError) and e.code in TOLD_REFUSALS
        if mode != "prod" or told:   # the twin is synthetic, and the tenant's own upload is the tenant's
            if isinstance(e, PdaoError):
                raise PdaoError(e.status if told else 422, e.code, e.message, e.message_zh, details=e.details) from None
            raise
        # Whether a prod run fails can depend on the data: answered like any run (held, after its
        # timing class), so the tenant learns nothing before a reviewer looked (sandbox.outcomes).
        outcomes.wait_for_class_end(started, settings.prod_timing_base_seconds)
        code = e.code if isinstance(e, PdaoError) else "template_failed"
        return _store_failure(session, settings, principal, scene, row, template, upload, versions, shown, code,
                              request_id)
    finally:
        staged.unlink(missing_ok=True)
    if mode == "prod":
        outcomes.wait_for_class_end(started, settings.prod_timing_base_seconds)

    first = versions[sorted(versions)[0]]
    q = Query(scene_id=scene.id, org_id=scene.org_id, requester_id=principal.user_id, mode=mode, kind=TEMPLATE_KIND,
              sql_text=shown[0], checked_sql=shown[1], dataset=sorted(versions)[0], version_id=first.id,
              upload=f"{upload.name}@v{upload.version}", uses=[[d, f, "template"] for d, f in sorted(reads)],
              policy_version=scene.policy_version, status="running", attempts=1, started_at=utcnow())
    session.add(q)
    session.flush()
    path, digest = export.store_table(settings, q.scene_id, f"q{q.id}-{uuid.uuid4().hex[:12]}.parquet", answer.table)
    held = mode == "prod"
    tpl_report = {**answer.report(), "versions": {c: {"version_id": v.id, "number": v.number, "sha256": v.sha256}
                                                  for c, v in versions.items()},
                  "upload": {"name": upload.name, "version": upload.version, "sha256": upload.sha256}}
    checks = [_consent_check(answer), disclosure.pii_check(answer.table)]
    report = {**disclosure.report(checks), "template": tpl_report, "columns": {"quasi_identifiers": [], "sensitive": []}}
    result = QueryResult(query_id=q.id, scene_id=scene.id, org_id=scene.org_id, synthetic=not held, kind="rows",
                         status="held" if held else "dev",
                         columns=[{"name": f.name, "type": str(f.type)} for f in answer.table.schema],
                         row_count=answer.table.num_rows, noise={}, epsilon_spent=0.0,
                         notes=[f"template {template.name} v{template.version}; {answer.excluded} upload row(s) left "
                                "out for consent"],
                         storage_path=path, sha256=digest, report=report if held else None,
                         content_fp=export.content_fp(settings, answer.table))
    return _commit(session, settings, principal, q, result, "held" if held else "done", request_id, "allow", None,
                   {"template": template.name, "digest": row.digest, "upload": q.upload, "mode": mode,
                    "params": tpl_report["params"], "persons": answer.persons, "excluded": answer.excluded})


def _commit(session: Session, settings: Settings, principal: Principal, q: Query, result: QueryResult, status: str,
            request_id: str | None, decision: str, reason: str | None, detail: dict[str, Any]) -> Query:
    """The result, the query's outcome and their audit event in one transaction (the file removed
    if it does not commit)."""
    try:
        session.add(result)
        session.flush()
        q.status, q.result_id, q.progress, q.finished_at = status, result.id, 1.0, utcnow()
        session.add(q)
        audit.append(session, request_id=request_id, actor=principal.username, org=principal.org_code,
                     role=principal.role.value, auth_method=principal.auth_method, action="template.run",
                     object=f"query:{q.id}", scene_id=q.scene_id, decision=decision, reason=reason, detail=detail)
        session.commit()
    except BaseException:
        session.rollback()
        (settings.results_dir / result.storage_path).unlink(missing_ok=True)
        raise
    session.refresh(q)
    return q


ROLE_OF_SPEC = {"key": "join_key", "ref": "row_ref", "consent_ref": "consent_ref",
               "valid_from": "consent_valid_from", "valid_until": "consent_valid_until"}


# Refusals of a prod run that are told at once: they are about the tenant's own upload (or a missing
# snapshot), never about the city's data. Anything else that stops a prod run is held (sandbox.outcomes).
TOLD_REFUSALS = ("template_upload_invalid", "template_dataset_missing")


def _as_template_reads_it(settings: Settings, template: templates.Template, upload: Any, staged: Path) -> None:
    """Exactly the columns the template reads, named as it names them, taken from the upload by
    role (the insurer calls its consent date `consent_signed_on`, the template `consent_valid_from`)
    or by name: a staged copy inside the domain, removed after the run. Taking only these columns
    means a same-named ordinary column can never stand in for a role column."""
    roles = uploads.upload_roles(upload)
    spec = template.upload
    source = {getattr(spec, attr): roles[role] for attr, role in ROLE_OF_SPEC.items()
              if getattr(spec, attr, None) and role in roles}
    table = pq.read_table(uploads.upload_path(settings, upload))
    wanted = list(dict.fromkeys(spec.columns))
    missing = [c for c in wanted if source.get(c, c) not in table.column_names]
    if missing:
        raise PdaoError(422, "template_upload_invalid",
                        f"The upload lacks the template's columns: {', '.join(missing)}.",
                        f"上传数据缺少模板所需的列：{'、'.join(missing)}。", details={"missing_columns": missing})
    table = table.select([source.get(c, c) for c in wanted]).rename_columns(wanted)
    settings.staging_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, staged)


def _shown(template: templates.Template, sql: str, params: dict[str, Any]) -> tuple[str, str]:
    """(sql_text, checked_sql) of a run's query."""
    return (f"-- template {template.name} v{template.version} {json.dumps(params, ensure_ascii=False)}\n{template.sql}",
            sql)


def _store_failure(session: Session, settings: Settings, principal: Principal, scene: Scene, row: SceneTemplate,
                   template: templates.Template, upload: Any, versions: dict[str, DatasetVersion],
                   shown: tuple[str, str], code: str, request_id: str | None) -> Query:
    first = versions[sorted(versions)[0]]
    sql_text, checked_sql = shown
    q = Query(scene_id=scene.id, org_id=scene.org_id, requester_id=principal.user_id, mode="prod", kind=TEMPLATE_KIND,
              sql_text=sql_text, checked_sql=checked_sql,
              dataset=sorted(versions)[0], version_id=first.id, upload=f"{upload.name}@v{upload.version}",
              uses=[[d, f, "template"] for d, f in sorted(templates.template_reads(template))],
              policy_version=scene.policy_version, status="running", attempts=1, started_at=utcnow())
    session.add(q)
    session.flush()
    planned = PlannedAnswer([o.name for o in template.outputs], {}, 0.0, 0)
    result = outcomes.held_failure(settings, q, planned, code, kind="rows", report_extra={
        "template": {"template": template.name, "version": template.version, "digest": row.digest, "failed": code}})
    return _commit(session, settings, principal, q, result, "held", request_id, "error", code,
                   {"template": template.name, "digest": row.digest, "upload": q.upload, "mode": "prod"})


def _consent_check(answer: templates.TemplateAnswer) -> disclosure.Check:
    by = ", ".join(f"{k}: {n}" for k, n in sorted(answer.excluded_by_reason.items()) if n) or "none"
    return disclosure.Check(
        "consent", "pass",
        f"Only upload rows with valid consent on {answer.as_of.isoformat()} were answered; "
        f"{answer.excluded} left out ({by}).",
        f"仅对 {answer.as_of.isoformat()} 时授权有效的上传行作答；{answer.excluded} 行未纳入（{by}）。",
        counts=answer.excluded)
