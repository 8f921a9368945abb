"""Running an approved analysis template on the tenant's own upload (issue 6): the only way
per-person values come out, and only as the template's declared derived values.

A run is checked like a query (the scene active and the tenant's, the template the one the office
approved — its digest —, every field it reads still on the scene's effective data list, the upload
the tenant's own), pinned to the newest dataset versions and the newest upload version, and run
inside the domain (`sandbox.templates.library.run_template`: consent filter added by the sandbox). A prod
answer is stored held for export review like any row-level answer (never released by policy); a
dev answer runs on the synthetic twin and is the tenant's at once.

A run answers in its request, bounded like a query job (`sandbox.worker`):

1. **Checks, reads only.** Every refusal that needs no data answers at once and writes nothing:
   the tenant's query rate (`sandbox.queries.service.check_rate`: a run is a query), the scene, the
   template, the data list, the upload's columns (its schema), the parameters, the versions.
2. **Admission, one short transaction.** The tenant is locked (`_lock_tenant`), its runs in flight
   are counted — at most `query_jobs_per_tenant` (429 `template_run_busy`, nothing written) — and
   the run's query row is inserted `running`, with a lease, and committed with its audit event
   (`template.start`). "In flight" is that row: it is seen by every process, and a run that dies
   stops renewing its lease, after which it no longer counts and the worker's lease expiry ends it
   (`sandbox.worker.requeue_expired`; its one attempt is its last, so it is never requeued).
3. **The heavy phase, no transaction open.** Staging the upload, the engine, storing the answer
   file, the PII and consent checks and the content fingerprint run while nothing in the metadata
   database is locked, so no other request waits for them. A heartbeat (`sandbox.leases.Heartbeat`)
   renews the lease and interrupts the engine on a cancel or past the time limit
   (`query_time_limit_seconds` prod, `dev_query_time_limit_seconds` dev), which is also checked
   between the phases that run in Python.
4. **The end, one short transaction**: the result row, the query's outcome and the `template.run`
   audit event, only while this run still holds its row (not cancelled, lease not taken over).

What a tenant sees of a prod run follows `sandbox.queries.outcomes`: a run that fails inside the domain (the
engine, the time limit, a store error) is held like any answer, at the end of its timing class; only
refusals about the tenant's own upload (`TOLD_REFUSALS`) are told.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy import func, update
from sqlmodel import Session, select

from catalog.models import Dataset, DatasetVersion
from pdao.kernel import audit
from pdao.kernel.config import Settings
from pdao.kernel.db import utcnow
from pdao.kernel.errors import PdaoError, conflict, forbidden, not_found
from pdao.kernel.identity.models import Organization, Role
from pdao.kernel.identity.service import Principal
from sandbox.engine.execute import PlannedAnswer
from sandbox.engine.store import snapshot_path
from sandbox.queries import leases, outcomes
from sandbox.queries import service as queries
from sandbox.queries.service import effective_grants
from sandbox.results import disclosure, export
from sandbox.results.models import Query, QueryResult
from sandbox.scenes import states
from sandbox.scenes.models import Scene, SceneTemplate
from sandbox.templates import library as templates
from sandbox.uploads import service as uploads
from sandbox.uploads.models import TenantUpload

TEMPLATE_KIND = "template"
RETRY_AFTER_SECONDS = 5      # what a busy tenant is told to wait before trying again

# Refusals of a prod run that are told at once: they are about the tenant's own upload (or a missing
# snapshot), never about the city's data. Anything else that stops a prod run is held (sandbox.queries.outcomes).
TOLD_REFUSALS = ("template_upload_invalid", "template_dataset_missing", "upload_altered")

ROLE_OF_SPEC = {"key": "join_key", "ref": "row_ref", "consent_ref": "consent_ref",
               "valid_from": "consent_valid_from", "valid_until": "consent_valid_until"}


@dataclass(frozen=True)
class _Plan:
    """Everything a run needs, decided before it is admitted (reads only)."""

    scene: Scene
    row: SceneTemplate
    template: templates.Template
    reads: set[tuple[str, str]]
    upload: TenantUpload
    columns: dict[str, str]                  # the template's upload column -> the upload's column
    versions: dict[str, DatasetVersion]
    params: dict[str, Any]
    as_of: date
    mode: str
    shown: tuple[str, str]                   # the query's sql_text and checked_sql


class _Stopped(Exception):
    """The heartbeat's reason to stop a run ("cancelled", "time_limit"), found between phases."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Lost(Exception):
    """The run's row is no longer this run's to end (cancel asked, or its lease was taken over)."""


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
    """Check, admit, run and store one template run (commits). A refusal before admission writes
    nothing; after it, the run's row ends `failed` (told), `held` (a prod run that failed inside the
    domain) or `cancelled`."""
    plan = _plan(session, settings, principal, scene, name, upload_name, params, mode)
    runner = f"{leases.worker_name()}:template"
    q = _admit(session, settings, principal, plan, runner, request_id)
    beat = leases.Heartbeat(session.get_bind(), settings, q.id, runner, time_limit=leases.time_limit(settings, q))
    beat.start()
    try:
        return _run_admitted(session, settings, principal, plan, q, runner, beat, request_id)
    finally:
        beat.stop.set()


# ---------------------------------------------------------------------------------------------
# 1. Checks (reads only)


def _plan(session: Session, settings: Settings, principal: Principal, scene: Scene, name: str, upload_name: str,
          params: dict[str, Any] | None, mode: str) -> _Plan:
    if principal.role is not Role.applicant or scene.org_id != principal.org_id:
        raise forbidden("not_your_scene", "Only the scene's own organization may run its templates.",
                        "只有场景的申请单位可以运行其分析模板。")
    status = states.effective_status(scene.status, scene.valid_from, scene.valid_to, utcnow())
    if status != "active":
        raise conflict("scene_not_active", f"The scene is {status}, not active: no template can run.",
                       f"场景状态为 {status}，未生效，不能运行分析模板。", details={"status": status})
    queries.check_rate(session, settings, scene.org_id)     # a run is a query: the tenant's rate
    if mode == "dev":
        queries.check_dev_storage(session, settings, scene.org_id)
    _check_in_flight(session, settings, scene.org_id)       # cheap early answer; decided again at admission
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
    columns = _upload_columns(settings, template, upload)
    as_of = states.today_in_city(utcnow())
    params = dict(params or {})
    if template.param("as_of") is not None and "as_of" not in params:
        params["as_of"] = as_of.isoformat()    # as run_template does: the run's own date
    templates.validate_params(template, params)    # data-independent refusals answer at once (422)
    env = "dev" if mode == "dev" else "prod"
    versions = _versions(session, {d for d, _ in reads}, env)
    # what the run's query shows, decided before any data is read (the template, the parameters,
    # the names of the columns staged from the tenant's own upload): its refusals are told
    shown = _shown(template, *_rendered(settings, template, params, list(columns), as_of))
    return _Plan(scene, row, template, reads, upload, columns, versions, params, as_of, mode, shown)


def _upload_columns(settings: Settings, template: templates.Template, upload: TenantUpload) -> dict[str, str]:
    """The template's upload columns and the upload's column each is taken from: by role (the
    insurer calls its consent date `consent_signed_on`, the template `consent_valid_from`) or by
    name. Taking only these, by role first, means a same-named ordinary column can never stand in
    for a role column. Read from the file's schema only; 422 when one is missing."""
    roles = uploads.upload_roles(upload)
    spec = template.upload
    source = {getattr(spec, attr): roles[role] for attr, role in ROLE_OF_SPEC.items()
              if getattr(spec, attr, None) and role in roles}
    try:
        present = set(pq.read_schema(uploads.upload_path(settings, upload)).names)
    except Exception:  # noqa: BLE001 - its file gone or damaged: told (the tenant's own upload)
        raise _upload_altered() from None
    wanted = list(dict.fromkeys(spec.columns))
    missing = [c for c in wanted if source.get(c, c) not in present]
    if missing:
        raise PdaoError(422, "template_upload_invalid",
                        f"The upload lacks the template's columns: {', '.join(missing)}.",
                        f"上传数据缺少模板所需的列：{'、'.join(missing)}。", details={"missing_columns": missing})
    return {c: source.get(c, c) for c in wanted}


def _upload_altered() -> PdaoError:
    return conflict("upload_altered", "The upload's stored file is missing or no longer matches its hash.",
                    "上传数据的存储文件缺失或与其哈希值不符。")


def _rendered(settings: Settings, template: templates.Template, params: dict[str, Any], names: list[str],
              as_of: date) -> tuple[str, dict[str, Any]]:
    """`templates.rendered_run` on a file with the staged columns' names and no rows: what a run
    renders depends on those names only."""
    settings.staging_dir.mkdir(parents=True, exist_ok=True)
    empty = settings.staging_dir / f"template-names-{uuid.uuid4().hex}.parquet"
    try:
        pq.write_table(pa.table({n: pa.array([], pa.string()) for n in names}), empty)
        return templates.rendered_run(template, params, empty, as_of=as_of)
    finally:
        empty.unlink(missing_ok=True)


def _shown(template: templates.Template, sql: str, params: dict[str, Any]) -> tuple[str, str]:
    """(sql_text, checked_sql) of a run's query."""
    return (f"-- template {template.name} v{template.version} {json.dumps(params, ensure_ascii=False)}\n{template.sql}",
            sql)


# ---------------------------------------------------------------------------------------------
# 2. Admission (one short transaction)


def _in_flight(session: Session, org_id: int) -> int:
    """The tenant's template runs in flight: `running`, their lease not expired (a run that died
    stops counting when its lease passes, before the worker ends its row)."""
    return session.exec(select(func.count()).select_from(Query).where(
        Query.org_id == org_id, Query.kind == TEMPLATE_KIND, Query.status == "running",
        Query.lease_until >= utcnow())).one()


def _check_in_flight(session: Session, settings: Settings, org_id: int) -> None:
    limit = settings.query_jobs_per_tenant
    if _in_flight(session, org_id) >= limit:
        raise PdaoError(429, "template_run_busy",
                        f"Your organization already has {limit} template run(s) in progress; at most {limit} run "
                        "at once. Try again when it has finished.",
                        f"贵单位已有 {limit} 个分析模板运行正在进行，同时最多运行 {limit} 个，请待其结束后重试。",
                        details={"limit": limit}, headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


def _lock_tenant(session: Session, org_id: int) -> None:
    """Serialize the admissions of one tenant until this transaction ends: PostgreSQL locks the
    organization's row; SQLite takes its one write lock (a no-op UPDATE), so the count that follows
    and the insert are one step on either backend."""
    if session.get_bind().dialect.name == "postgresql":
        session.exec(select(Organization.id).where(Organization.id == org_id).with_for_update(key_share=True)).first()
    else:
        session.exec(update(Organization).where(Organization.id == org_id).values(id=Organization.id)
                     .execution_options(synchronize_session=False))


def _admit(session: Session, settings: Settings, principal: Principal, plan: _Plan, runner: str,
           request_id: str | None) -> Query:
    """The run's row, `running` with a lease, and its audit event, committed; 429
    `template_run_busy` (nothing written) when the tenant has `query_jobs_per_tenant` in flight."""
    scene, first = plan.scene, plan.versions[sorted(plan.versions)[0]]
    try:
        _lock_tenant(session, scene.org_id)
        _check_in_flight(session, settings, scene.org_id)
        now = utcnow()
        q = Query(scene_id=scene.id, org_id=scene.org_id, requester_id=principal.user_id, mode=plan.mode,
                  kind=TEMPLATE_KIND, sql_text=plan.shown[0], checked_sql=plan.shown[1], dataset=sorted(plan.versions)[0],
                  version_id=first.id, upload=f"{plan.upload.name}@v{plan.upload.version}",
                  uses=[[d, f, "template"] for d, f in sorted(plan.reads)], policy_version=scene.policy_version,
                  status="running", worker=runner, started_at=now, progress=0.0,
                  lease_until=now + timedelta(seconds=settings.query_lease_seconds),
                  # one attempt, and the last: a run lives in its request, so a run whose lease expired is
                  # ended by the worker (sandbox.worker.requeue_expired), never put back in the queue
                  attempts=settings.query_max_attempts)
        session.add(q)
        session.flush()
        _audit(session, principal, q, request_id, "template.start", "allow", "started", _detail(plan, q))
        session.commit()
    except BaseException:
        session.rollback()
        raise
    return q


# ---------------------------------------------------------------------------------------------
# 3. The heavy phase (nothing locked) and 4. the end


def _run_admitted(session: Session, settings: Settings, principal: Principal, plan: _Plan, q: Query, runner: str,
                  beat: Any, request_id: str | None) -> Query:
    prod = plan.mode == "prod"
    try:
        result, extra = _compute(settings, plan, q, beat)
    except Exception as e:  # noqa: BLE001 - sorted below; nothing of the engine's text leaks
        stop = e.reason if isinstance(e, _Stopped) else _stop_reason(beat)
        if stop == "cancelled":   # by its tenant: a prod run still shows at the end of its class
            if prod:
                outcomes.wait_for_class_end(beat.started, settings.prod_timing_base_seconds)
            return _end_without_result(session, principal, q, runner, request_id, "cancelled", "cancelled",
                                       "The template run was cancelled.", "分析模板运行已取消。")
        code, en, zh, status = _failure_of(e, stop, beat.time_limit)
        told = code in TOLD_REFUSALS
        if not prod or told:   # the twin is synthetic, and the tenant's own upload is the tenant's
            _end_without_result(session, principal, q, runner, request_id, "failed", code, en, zh)
            if isinstance(e, PdaoError) or stop is not None:
                raise PdaoError(status if told else 422, code, en, zh,
                                details=e.details if isinstance(e, PdaoError) else None) from None
            raise
        # Whether a prod run fails can depend on the data: answered like any run (held, after its
        # timing class), so the tenant learns nothing before a reviewer looked (sandbox.queries.outcomes).
        outcomes.wait_for_class_end(beat.started, settings.prod_timing_base_seconds)
        failed = _held_failure(settings, plan, q, code)
        return _finish(session, settings, principal, q, failed, "held", runner, request_id, "error", code,
                       {**_detail(plan, q), "error": code})
    if prod:
        outcomes.wait_for_class_end(beat.started, settings.prod_timing_base_seconds)
    return _finish(session, settings, principal, q, result, "held" if prod else "done", runner, request_id, "allow",
                   None, {**_detail(plan, q), **extra})


def _compute(settings: Settings, plan: _Plan, q: Query, beat: Any) -> tuple[QueryResult, dict[str, Any]]:
    """Stage, run, store and check: the result row (not added) and the audit detail. Reads and
    writes files only; the metadata database is not touched."""
    template, held = plan.template, plan.mode == "prod"
    staged = settings.staging_dir / f"template-{uuid.uuid4().hex}.parquet"
    try:
        if uploads.verify_upload(settings, plan.upload) != "ok":
            raise _upload_altered()
        _stage(settings, plan, staged)
        _check_time(beat)
        answer = templates.run_template(template, plan.params,
                                        {c: snapshot_path(settings, v) for c, v in plan.versions.items()},
                                        staged, as_of=plan.as_of, on_connection=beat.attach)
    finally:
        staged.unlink(missing_ok=True)
    _check_time(beat)
    path, digest = export.store_table(settings, q.scene_id, f"q{q.id}-{uuid.uuid4().hex[:12]}.parquet", answer.table)
    try:
        tpl_report = {**answer.report(), "versions": {c: {"version_id": v.id, "number": v.number, "sha256": v.sha256}
                                                      for c, v in plan.versions.items()},
                      "upload": {"name": plan.upload.name, "version": plan.upload.version,
                                 "sha256": plan.upload.sha256}}
        checks = [_consent_check(answer), disclosure.pii_check(answer.table)]
        _check_time(beat)
        report = {**disclosure.report(checks), "template": tpl_report,
                  "columns": {"quasi_identifiers": [], "sensitive": []}}
        fp = export.content_fp(settings, answer.table)
        _check_time(beat)
    except BaseException:
        (settings.results_dir / path).unlink(missing_ok=True)
        raise
    result = QueryResult(query_id=q.id, scene_id=q.scene_id, org_id=q.org_id, synthetic=not held, kind="rows",
                         status="held" if held else "dev",
                         columns=[{"name": f.name, "type": str(f.type)} for f in answer.table.schema],
                         row_count=answer.table.num_rows, noise={}, epsilon_spent=0.0,
                         notes=[f"template {template.name} v{template.version}; {answer.excluded} upload row(s) left "
                                "out for consent"],
                         storage_path=path, sha256=digest, report=report if held else None, content_fp=fp,
                         size_bytes=(settings.results_dir / path).stat().st_size)
    return result, {"params": tpl_report["params"], "persons": answer.persons, "excluded": answer.excluded}


def _stage(settings: Settings, plan: _Plan, staged: Path) -> None:
    """Exactly the columns the template reads, named as it names them (`_upload_columns`): a staged
    copy inside the domain, removed after the run."""
    table = pq.read_table(uploads.upload_path(settings, plan.upload), columns=sorted(set(plan.columns.values())))
    table = table.select(list(plan.columns.values())).rename_columns(list(plan.columns))
    settings.staging_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, staged)


def _stop_reason(beat: Any) -> str | None:
    """Why the run must stop now: its heartbeat's reason (a cancel, the time limit), or the time
    limit passed while a phase ran in Python (which nothing can interrupt)."""
    if beat.reason is not None:
        return beat.reason
    return "time_limit" if time.monotonic() - beat.started > beat.time_limit else None


def _check_time(beat: Any) -> None:
    reason = _stop_reason(beat)
    if reason is not None:
        raise _Stopped(reason)


def _failure_of(e: Exception, stop: str | None, limit: float) -> tuple[str, str, str, int]:
    """(code, message, message_zh, status) of a run that did not answer."""
    if stop == "time_limit":
        return ("time_limit", f"The template run passed its time limit ({limit:g} s) and was stopped.",
                f"分析模板运行超过时间上限（{limit:g} 秒），已被终止。", 422)
    if isinstance(e, PdaoError):
        return e.code, e.message, e.message_zh, e.status
    return ("template_failed", "The template could not be run on this data.", "分析模板无法在该数据上运行。", 500)


def _held_failure(settings: Settings, plan: _Plan, q: Query, code: str) -> QueryResult:
    return _failure_result(settings, q, plan.template, plan.row.digest, code)


def _failure_result(settings: Settings, q: Query, template: templates.Template | None, digest: str | None,
                    code: str) -> QueryResult:
    """A prod run that failed inside the domain, as any held template answer looks to its tenant:
    the template's output names, kind rows, the template's section of the report (`outcomes`)."""
    names = [o.name for o in template.outputs] if template is not None else []
    planned = PlannedAnswer(names, {}, 0.0, 0)
    section = {"template": template.name if template else None, "version": template.version if template else None,
               "digest": digest, "failed": code}
    return outcomes.held_failure(settings, q, planned, code, kind="rows", report_extra={"template": section})


_SHOWN_HEAD = re.compile(r"-- template (\S+) v\d+ ")


def lost_run_result(session: Session, settings: Settings, q: Query, code: str = "worker_lost") -> QueryResult:
    """The held result of a prod template run whose request died (its lease expired): what a held
    failure of that run shows its tenant (for `sandbox.worker`, which ends such a row)."""
    m = _SHOWN_HEAD.match(q.sql_text or "")
    row = None if m is None else session.exec(select(SceneTemplate).where(SceneTemplate.scene_id == q.scene_id,
                                                                          SceneTemplate.name == m.group(1))).first()
    template = templates.template_from_mapping(row.definition) if row is not None else None
    return _failure_result(settings, q, template, row.digest if row is not None else None, code)


def _finish(session: Session, settings: Settings, principal: Principal, q: Query, result: QueryResult, status: str,
            runner: str, request_id: str | None, decision: str, reason: str | None, detail: dict[str, Any]) -> Query:
    """The result, the query's outcome and their audit event in one transaction — only while this
    run still holds its row and nobody asked to cancel it (the file removed otherwise)."""
    try:
        finished = result.created_at = utcnow()    # the outcome's time, after the timing class (see queries.run)
        session.add(result)
        session.flush()
        owned = session.exec(update(Query).where(Query.id == q.id, Query.status == "running", Query.worker == runner,
                                                 Query.cancel_requested == False)  # noqa: E712
                             .values(status=status, result_id=result.id, progress=1.0, finished_at=finished,
                                     lease_until=None)
                             .execution_options(synchronize_session=False)).rowcount
        if owned != 1:
            raise _Lost()
        _audit(session, principal, q, request_id, "template.run", decision, reason, detail)
        session.commit()
    except _Lost:
        session.rollback()
        (settings.results_dir / result.storage_path).unlink(missing_ok=True)
        # a cancel acknowledged is never followed by a result (a no-op when the lease was taken over)
        return _end_without_result(session, principal, q, runner, request_id, "cancelled", "cancelled",
                                   "The template run was cancelled.", "分析模板运行已取消。")
    except BaseException:
        session.rollback()
        (settings.results_dir / result.storage_path).unlink(missing_ok=True)
        raise
    session.refresh(q)
    return q


def _end_without_result(session: Session, principal: Principal, q: Query, runner: str, request_id: str | None,
                        status: str, code: str, message: str, message_zh: str) -> Query:
    """End the run's row `failed` or `cancelled`, with its audit event, while it is still this run's."""
    session.rollback()
    done = session.exec(update(Query).where(Query.id == q.id, Query.status == "running", Query.worker == runner)
                        .values(status=status, error_code=code, error_message=message, error_message_zh=message_zh,
                                finished_at=utcnow(), lease_until=None)
                        .execution_options(synchronize_session=False)).rowcount
    if done == 1:
        _audit(session, principal, q, request_id, "template.run", "allow" if status == "cancelled" else "error",
               status, {"mode": q.mode, "upload": q.upload, "error": code})
    session.commit()
    session.refresh(q)
    return q


def _detail(plan: _Plan, q: Query) -> dict[str, Any]:
    return {"template": plan.template.name, "digest": plan.row.digest, "upload": q.upload, "mode": plan.mode}


def _audit(session: Session, principal: Principal, q: Query, request_id: str | None, action: str, decision: str,
           reason: str | None, detail: dict[str, Any]) -> None:
    audit.append(session, request_id=request_id, actor=principal.username, org=principal.org_code,
                 role=principal.role.value, auth_method=principal.auth_method, action=action,
                 object=f"query:{q.id}", scene_id=q.scene_id, decision=decision, reason=reason, detail=detail)


def _consent_check(answer: templates.TemplateAnswer) -> disclosure.Check:
    by = ", ".join(f"{k}: {n}" for k, n in sorted(answer.excluded_by_reason.items()) if n) or "none"
    return disclosure.Check(
        "consent", "pass",
        f"Only upload rows with valid consent on {answer.as_of.isoformat()} were answered; "
        f"{answer.excluded} left out ({by}).",
        f"仅对 {answer.as_of.isoformat()} 时授权有效的上传行作答；{answer.excluded} 行未纳入（{by}）。",
        counts=answer.excluded)
