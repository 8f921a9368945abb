"""Queries through a scene: check, authorize, plan, reserve, run, store — the service behind
`POST /scenes/{id}/queries`, the preview, the worker and the result endpoints.

The order of a submission (each step refuses with a clear JSON error and changes nothing):

1. the scene is active and the caller's organization holds it (`sandbox.scenes.service.decide`);
2. the SQL is checked against the scene's effective data list (`sandbox.engine.sql.check_query`, 422
   `query_refused` naming each construct and missing item), and every (dataset, field, usage) the
   checked query relies on is decided again through casbin — the one authorization path;
3. the dataset version is pinned: the latest `prod` version, or for `mode=dev` the synthetic twin;
4. an aggregate's noise is planned from public facts (422 if it cannot be given DP);
5. the query is queued as a job; a prod query's ε is reserved in the ledger in the same
   transaction (429 when the budget cannot pay; 429 `rate_limited` past the tenant's rate). A
   worker (`sandbox.worker`) runs prod jobs; a dev job is run by its own request at once when the
   tenant has no other dev job running (`sandbox.worker.answer_dev`), on the twin, spending
   nothing, its result marked synthetic. Every run has a time limit. What the tenant can observe of
   a prod run follows `sandbox.queries.outcomes`: a run that fails while reading the data is held and
   charged like any other, and its outcome shows at the end of its timing class.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy import func, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from catalog.models import Dataset, DatasetField, DatasetVersion
from pdao.kernel import audit
from pdao.kernel.config import Settings
from pdao.kernel.db import id_in_range, utcnow
from pdao.kernel.errors import PdaoError, conflict, forbidden, invalid, not_found
from pdao.kernel.identity.models import Role
from pdao.kernel.identity.service import Principal
from policies import access
from policies.enforcer import SceneEnforcers
from policies.rules import item_verdict
from sandbox.budgets import ledger
from sandbox.engine.execute import Answer, DatasetMeta, Execution, PlannedAnswer, answer_columns
from sandbox.engine.execute import preview as plan_preview
from sandbox.engine.sql import CheckedQuery, check_query
from sandbox.engine.store import snapshot_path
from sandbox.queries import outcomes
from sandbox.results import export, read_slots
from sandbox.results.models import Query, QueryResult, TenantRate
from sandbox.scenes import service as scenes
from sandbox.scenes import states
from sandbox.scenes.models import Scene, SceneItem
from sandbox.uploads import service as uploads
from sandbox.uploads.models import TenantUpload

CHINA = ZoneInfo("Asia/Shanghai")
DEFAULT_EPSILON = 0.5       # when a query names none (never above the scene's per-query cap)
# Below this an answer is noise only (and at 1e-20 OpenDP's search overflows); it also keeps every
# repetition of a prod run paid for: a thousand runs cost at least ε 1 (docs/threat-model.md, timing).
MIN_EPSILON = 1e-3


@dataclass
class Prepared:
    checked: CheckedQuery
    version: DatasetVersion
    execution: Execution
    upload: TenantUpload | None = None    # the tenant's own table the query joins, pinned


def _joined_upload(session: Session, scene: Scene, checked: CheckedQuery) -> TenantUpload | None:
    """The scene's tenant's own upload a query joins (its newest version, pinned at submission),
    joined on its declared join key to the field that key names: 404 for an upload the tenant
    does not hold (another tenant's is indistinguishable), 422 for a join on another column."""
    if checked.join is None:
        return None
    u = uploads.latest_upload(session, scene.org_id, checked.join.upload)
    if u is None:
        raise not_found("Upload", "上传数据")
    key, target = uploads.join_key_of(u)
    if checked.join.upload_key != key or target != f"{checked.dataset}.{checked.join.dataset_key}":
        raise invalid("upload_join_mismatch",
                      f"The upload {u.name} joins only on its key {key} = {target}.",
                      f"上传数据 {u.name} 只能以其关联键 {key} 关联 {target}。", details={"key": key, "joins": target})
    return u


def upload_schema(upload: TenantUpload) -> dict[str, str]:
    """An upload version's columns and their declared types: what the checker types literals by."""
    return {c["name"]: c["type"] for c in upload.columns}


def tenant_upload_schemas(session: Session, org_id: int) -> dict[str, dict[str, str]]:
    """name -> the schema of its newest version: the uploads a query of the tenant may join."""
    newest: dict[str, TenantUpload] = {}
    for u in session.exec(select(TenantUpload).where(TenantUpload.org_id == org_id)).all():
        if u.name not in newest or u.version > newest[u.name].version:
            newest[u.name] = u
    return {name: upload_schema(u) for name, u in sorted(newest.items())}


def _upload_files(settings: Settings, upload: TenantUpload | None) -> dict[str, Path]:
    return {} if upload is None else {upload.name: uploads.upload_path(settings, upload)}


# ---------------------------------------------------------------------------------------------
# What a scene may read


def effective_grants(session: Session, scene: Scene) -> dict[tuple[str, str], set[str]]:
    """(dataset, field) -> usages: the scene's items not struck and still allowed by the rule table
    on today's catalog (the same list `GET /scenes/{id}` shows as effective)."""
    items = session.exec(select(SceneItem).where(SceneItem.scene_id == scene.id, SceneItem.struck == False)).all()  # noqa: E712
    facts = scenes.field_facts(session, ((i.dataset, i.field) for i in items))
    grants: dict[tuple[str, str], set[str]] = {}
    for i in items:
        if item_verdict(facts.get((i.dataset, i.field)), i.usage, i.dataset, i.field).allowed:
            grants.setdefault((i.dataset, i.field), set()).add(i.usage)
    return grants


def dataset_meta(session: Session, dataset: Dataset, row_count: int = 0) -> DatasetMeta:
    fields = session.exec(select(DatasetField).where(DatasetField.dataset_id == dataset.id)
                          .order_by(DatasetField.position)).all()
    return DatasetMeta.from_fields(dataset.code, dataset.privacy_unit, fields, row_count)


def pseudonym_key(settings: Settings, scene_id: int, query_id: int | None = None) -> bytes:
    """The pseudonym key of one query's answer: derived from the server secret with HMAC-SHA256 (a
    PRF), so it is never stored. Two answers never share one — their pseudonyms never join — unless
    the scene approved linkage (`query_id=None`: one key for the whole scene, never shared with
    another scene or tenant)."""
    label = f"pdao/pseudonym/scene/{scene_id}" + ("" if query_id is None else f"/query/{query_id}")
    return hmac.new(settings.secret_key.encode(), label.encode(), hashlib.sha256).digest()


def answer_pseudonym_key(settings: Settings, scene: Scene, query_id: int) -> bytes:
    """Per answer, unless the office approved linkage of the scene's answers (`link_pseudonyms`)."""
    return pseudonym_key(settings, scene.id, None if scene.link_pseudonyms else query_id)


def _latest_version(session: Session, dataset_id: int, env: str) -> DatasetVersion | None:
    return session.exec(select(DatasetVersion).where(DatasetVersion.dataset_id == dataset_id, DatasetVersion.env == env)
                        .order_by(DatasetVersion.number.desc())).first()


def _today() -> dt.date:
    return dt.datetime.now(CHINA).date()


def authorize_uses(session: Session, enforcers: SceneEnforcers, scene: Scene, org: str, checked: CheckedQuery) -> None:
    """The one authorization path: every (dataset, field, usage) the checked query relies on is
    decided through casbin (`sandbox.scenes.service.decide`); 403 `not_permitted` naming each refusal."""
    denied = []
    for d, f, usage in sorted(checked.uses):
        decision = scenes.decide(session, enforcers, scene, org, d, f, usage)
        if not decision.allowed:
            denied.append({"dataset": d, "field": f, "usage": usage, "rule": decision.rule,
                           "message": decision.message, "message_zh": decision.message_zh})
    if denied:
        raise PdaoError(403, "not_permitted", f"The scene does not permit this query: {denied[0]['message']}.",
                        f"该场景不允许此查询：{denied[0]['message_zh']}。", details=denied)


# ---------------------------------------------------------------------------------------------
# Submission


def prepare(session: Session, settings: Settings, enforcers: SceneEnforcers, principal: Principal, scene: Scene,
            sql: str, mode: str, epsilon: float | None) -> Prepared:
    """Steps 1–4 of a submission (no writes)."""
    if principal.role is not Role.applicant or scene.org_id != principal.org_id:
        raise forbidden("not_your_scene", "Only the scene's own organization may query through it.",
                        "只有场景的申请单位可以通过该场景查询。")
    org = scenes.tenant_code(session, scene)
    status = states.effective_status(scene.status, scene.valid_from, scene.valid_to, utcnow())
    if status != "active":
        raise conflict("scene_not_active", f"The scene is {status}, not active: no query can run through it.",
                       f"场景状态为 {status}，未生效，不能查询。", details={"status": status})

    grants = effective_grants(session, scene)
    codes = sorted({d for d, _ in grants})
    datasets = {ds.code: ds for ds in session.exec(select(Dataset).where(Dataset.code.in_(codes))).all()}
    metas = {code: dataset_meta(session, ds) for code, ds in datasets.items()}
    checked = check_query(sql, grants, [m.info() for m in metas.values()],
                          uploads=tenant_upload_schemas(session, scene.org_id))

    authorize_uses(session, enforcers, scene, org, checked)
    upload = _joined_upload(session, scene, checked)

    env = "dev" if mode == "dev" else "prod"
    ds = datasets[checked.dataset]
    version = _latest_version(session, ds.id, env)
    if version is None:
        raise conflict("no_version", f"{checked.dataset} has no {env} version loaded yet.",
                       f"{checked.dataset} 尚未加载{'合成孪生' if env == 'dev' else '生产'}版本。",
                       details={"dataset": checked.dataset, "env": env})
    meta = dataset_meta(session, ds, version.row_count)
    if checked.kind == "aggregate":
        if epsilon is None:
            epsilon = min(DEFAULT_EPSILON, scene.max_query_epsilon)
        if epsilon < MIN_EPSILON:
            raise invalid("epsilon_too_small", f"ε={epsilon:g} is below the smallest accepted, {MIN_EPSILON:g}: "
                          "the answer would be noise only.", f"ε={epsilon:g} 低于可接受的最小值 {MIN_EPSILON:g}：结果将只剩噪声。")
        if mode == "prod" and epsilon > scene.max_query_epsilon + ledger.TOLERANCE:
            raise invalid("epsilon_above_query_cap",
                          f"ε={epsilon:g} is above the scene's per-query cap of {scene.max_query_epsilon:g}.",
                          f"ε={epsilon:g} 超过场景单次查询上限 {scene.max_query_epsilon:g}。")
    # no pseudonym key yet: an answer's key needs its query (`answer_pseudonym_key`)
    execution = Execution(checked, meta, snapshot_path(settings, version), epsilon=epsilon,
                          max_contributions=scene.max_contributions, reference_date=_today(),
                          uploads=_upload_files(settings, upload))
    return Prepared(checked, version, execution, upload)


def preview(session: Session, settings: Settings, enforcers: SceneEnforcers, principal: Principal, scene: Scene,
            sql: str, mode: str, epsilon: float | None) -> dict[str, Any]:
    """What the query would cost and how accurate it would be; spends nothing, reads no data (it
    plans the noise: it counts against the organization's rate like a query)."""
    check_rate(session, settings, scene.org_id)
    p = prepare(session, settings, enforcers, principal, scene, sql, mode, epsilon)
    out = plan_preview(p.execution)
    left = max(scene.budget_epsilon - scene.epsilon_spent, 0.0)
    company = ledger.company_budget(session, settings, scene.org_id, scenes.tenant_code(session, scene),
                                    p.checked.dataset).epsilon_left
    cost = 0.0 if mode == "dev" or p.checked.kind == "rows" else float(p.execution.epsilon or 0)
    out.update({"mode": mode, "synthetic": mode == "dev", "epsilon_cost": cost, "checked_sql": p.checked.sql,
                "dataset": p.checked.dataset,
                "budget": {"epsilon_left": left, "epsilon_left_after": max(left - cost, 0.0),
                           "company_epsilon_left": company,   # the company's on this dataset, across its scenes
                           "affordable": cost <= min(left, company) + ledger.TOLERANCE}})
    return out


def check_rate(session: Session, settings: Settings, org_id: int) -> None:
    """One more query or preview of the organization this minute, counted at once and committed on
    its own (refused attempts count too): 429 `rate_limited` past `query_rate_per_minute`. The count
    moves by conditional UPDATEs of the organization's one row (`TenantRate`), so parallel requests
    never pass the rate (a count-then-insert did: 82 of 100 parallel submissions got in)."""
    limit = settings.query_rate_per_minute
    window = utcnow().replace(second=0, microsecond=0)
    with Session(session.get_bind()) as s:
        for _ in range(3):
            took = s.exec(update(TenantRate).where(TenantRate.org_id == org_id, TenantRate.window_start == window,
                                                   TenantRate.count < limit)
                          .values(count=TenantRate.count + 1).execution_options(synchronize_session=False)).rowcount
            if not took:   # a new minute: start it again
                took = s.exec(update(TenantRate).where(TenantRate.org_id == org_id, TenantRate.window_start < window)
                              .values(window_start=window, count=1)
                              .execution_options(synchronize_session=False)).rowcount
            if took:
                s.commit()
                return
            current = s.exec(select(TenantRate.window_start, TenantRate.count)
                             .where(TenantRate.org_id == org_id)).first()
            s.rollback()
            if current is not None and current.window_start >= window and current.count >= limit:
                raise PdaoError(429, "rate_limited",
                                f"Your organization sent {limit} queries or previews this minute, the most accepted. "
                                "Try again in a minute.",
                                f"贵单位本分钟已提交 {limit} 条查询或预览，已达上限，请一分钟后重试。",
                                details={"limit_per_minute": limit}, headers={"Retry-After": "60"})
            if current is not None:   # another request started this minute between the two UPDATEs: count again
                continue
            try:
                s.add(TenantRate(org_id=org_id, window_start=window, count=1))
                s.commit()
                return
            except IntegrityError:   # another request made the row first: count on it
                s.rollback()
    raise PdaoError(503, "rate_unavailable", "The request could not be counted; try again.", "请求无法计数，请重试。")


def check_dev_storage(session: Session, settings: Settings, org_id: int) -> None:
    """A dev answer is stored (and kept `dev_answer_days`): past `dev_answer_quota_bytes` of the
    organization's kept dev answers, 429 `dev_answers_full` before anything runs. (A tenant that sent
    dev answers at its rate stored 22 GB a day; review r5 #7.) Dev answers only: they are synthetic,
    so their sizes may be told; a prod answer's size depends on the data."""
    used = session.exec(select(func.coalesce(func.sum(QueryResult.size_bytes), 0)).where(
        QueryResult.org_id == org_id, QueryResult.synthetic == True,  # noqa: E712
        QueryResult.expired_at.is_(None))).one()
    quota = settings.dev_answer_quota_bytes
    if used >= quota:
        mb = quota // 1024**2
        raise PdaoError(429, "dev_answers_full",
                        f"Your organization's dev answers hold {used / 1024**2:.0f} MB, the most kept ({mb} MB); "
                        f"they are removed {settings.dev_answer_days} days after they were made. Try again then, "
                        "or ask for fewer rows.",
                        f"贵单位开发模式结果已占用 {used / 1024**2:.0f} MB，已达上限（{mb} MB）；结果在生成 "
                        f"{settings.dev_answer_days} 天后删除，届时再试，或减少返回行数。",
                        details={"used_bytes": int(used), "quota_bytes": quota, "days": settings.dev_answer_days})


def check_held_rows(session: Session, settings: Settings, org_id: int) -> None:
    """A prod row answer waits for a reviewer (never released by policy) and is compared with every
    other on its dataset: an organization has at most `held_row_answers_per_tenant` of them queued,
    running or held at once (429 `too_many_held_row_answers`)."""
    waiting = session.exec(select(func.count()).select_from(Query).where(
        Query.org_id == org_id, Query.mode == "prod", Query.kind == "rows",
        Query.status.in_(("queued", "running", "held")))).one()
    if waiting >= settings.held_row_answers_per_tenant:
        raise PdaoError(429, "too_many_held_row_answers",
                        f"Your organization has {waiting} row-level answers waiting for export review, the most "
                        "accepted; wait for reviewers to decide on some.",
                        f"贵单位已有 {waiting} 个逐行结果等待出域审核，已达上限；请待审核员处理后再提交。",
                        details={"limit": settings.held_row_answers_per_tenant})


def submit(session: Session, settings: Settings, enforcers: SceneEnforcers, principal: Principal, scene: Scene,
           sql: str, mode: str, epsilon: float | None, request_id: str | None = None) -> Query:
    """Check, authorize, plan and queue a query; a prod query's ε is reserved in the same
    transaction (the caller commits). Dev and prod queries are jobs alike: a worker, or the request
    itself for a dev query (`sandbox.worker.answer_dev`), runs them with a time limit."""
    check_rate(session, settings, scene.org_id)
    p = prepare(session, settings, enforcers, principal, scene, sql, mode, epsilon)
    if p.checked.kind == "aggregate":
        plan_preview(p.execution)   # refuse a query DP cannot answer, or too costly, before anything is written
    elif mode == "prod":
        check_held_rows(session, settings, scene.org_id)
    if mode == "dev":
        check_dev_storage(session, settings, scene.org_id)
    q = Query(scene_id=scene.id, org_id=scene.org_id, requester_id=principal.user_id, mode=mode, kind=p.checked.kind,
              sql_text=sql, checked_sql=p.checked.sql, dataset=p.checked.dataset, version_id=p.version.id,
              # the ε the noise is calibrated to; only a prod query's is reserved and charged
              epsilon=float(p.execution.epsilon or 0.0) if p.checked.kind == "aggregate" else 0.0,
              max_contributions=scene.max_contributions, status="queued",
              uses=[list(u) for u in sorted(p.checked.uses)], policy_version=scene.policy_version,
              upload=None if p.upload is None else f"{p.upload.name}@v{p.upload.version}")
    session.add(q)
    session.flush()
    if mode == "prod" and q.epsilon > 0:
        entry = ledger.reserve(session, scene.id, q.epsilon, query_ref=f"query:{q.id}", dataset=p.checked.dataset,
                               settings=settings)
        q.budget_entry_id = entry.id
    # the job and its reservation, in the chain with them (the log's lock last: the caller commits)
    audit.append(session, request_id=request_id, actor=principal.username, org=principal.org_code,
                 role=principal.role.value, auth_method=principal.auth_method, action="query.queue",
                 object=f"query:{q.id}", scene_id=scene.id, decision="allow", reason="queued",
                 detail={"mode": mode, "kind": q.kind, "dataset": q.dataset, "epsilon_reserved":
                         q.epsilon if q.budget_entry_id is not None else 0.0, "budget_entry": q.budget_entry_id})
    return q


# ---------------------------------------------------------------------------------------------
# Running and storing (a worker, or the request of a dev query)


def query_plan(session: Session, settings: Settings, q: Query) -> Execution:
    """A job's execution: its SQL checked again against the scene's effective list as it is now, on
    the version (and upload version) pinned at submission. No authorization here: `execution_for`."""
    scene = session.get(Scene, q.scene_id)
    version = session.get(DatasetVersion, q.version_id)
    ds = session.get(Dataset, version.dataset_id)
    meta = dataset_meta(session, ds, version.row_count)
    upload = export.pinned_upload(session, q)
    schemas = {} if upload is None else {upload.name: upload_schema(upload)}
    checked = check_query(q.sql_text, effective_grants(session, scene), [meta.info()], uploads=schemas)
    return Execution(checked, meta, snapshot_path(settings, version), epsilon=q.epsilon or None,
                     max_contributions=q.max_contributions, pseudonym_key=answer_pseudonym_key(settings, scene, q.id),
                     reference_date=_today(), disclosure_stats=q.mode == "prod", uploads=_upload_files(settings, upload),
                     # a dev answer may run in its tenant's own request: one core, the other stays
                     # free for everyone else's requests (review r5 #3)
                     threads=1 if q.mode == "dev" else 2)


def execution_for(session: Session, settings: Settings, enforcers: SceneEnforcers, q: Query) -> Execution:
    """Rebuild a queued query's execution: its SQL is checked and authorized again against the
    scene as it is now (a scene suspended or an item struck since refuses the job), on the version
    pinned at submission."""
    scene = session.get(Scene, q.scene_id)
    status = states.effective_status(scene.status, scene.valid_from, scene.valid_to, utcnow())
    if status != "active":
        raise conflict("scene_not_active", f"The scene became {status} before the query ran.",
                       f"查询执行前场景状态已变为 {status}。", details={"status": status})
    execution = query_plan(session, settings, q)
    authorize_uses(session, enforcers, scene, scenes.tenant_code(session, scene), execution.checked)
    return execution


def _json_safe(v: Any) -> Any:
    if isinstance(v, (dt.date, dt.datetime)):
        return v.isoformat()
    if isinstance(v, float) and v != v:
        return None
    return v


def write_answer(settings: Settings, answer: Answer, q: Query) -> tuple[str, str]:
    """Write the answer's table to the result store (temporary name, then rename); its relative
    path and SHA-256."""
    meta = {b"pdao": json.dumps({"query_id": q.id, "scene_id": q.scene_id, "synthetic": q.mode == "dev"}).encode()}
    return export.store_table(settings, q.scene_id, f"q{q.id}-{uuid.uuid4().hex[:12]}.parquet",
                              answer.table.replace_schema_metadata(meta))


def result_row(q: Query, answer: Answer, path: str, digest: str) -> QueryResult:
    columns = [{"name": f.name, "type": str(f.type)} for f in answer.table.schema]
    return QueryResult(query_id=q.id, scene_id=q.scene_id, org_id=q.org_id, synthetic=q.mode == "dev", kind=q.kind,
                       status="dev" if q.mode == "dev" else "held", columns=columns, row_count=answer.table.num_rows,
                       noise=answer.noise, notes=answer.notes,
                       # a dev answer is calibrated like a prod one (see `noise`) but charges nothing
                       epsilon_spent=0.0 if q.mode == "dev" else answer.epsilon_spent,
                       storage_path=path, sha256=digest)


def run_and_store(session: Session, settings: Settings, q: Query, *, enforcers: SceneEnforcers,
                  on_connection: Any = None, worker: str | None = None,
                  stop_reason: Callable[[], str | None] | None = None, started: float | None = None) -> Query:
    """Run a claimed job (`running`) and end it in one transaction, the rules of `sandbox.queries.outcomes`:

    - refused before reading any data (the scene or its list changed since submission): `failed`,
      told, refunded;
    - answered: the result and the charge (`done` dev / `held` or `released` prod, after export
      review's checks); a prod outcome becomes visible at the end of its timing class;
    - failed while reading the data: dev `failed` (synthetic: told); prod stored `held` with a
      failed `run` check and charged — the tenant sees what any held answer shows;
    - stopped by a cancel: `cancelled`, a prod run charged (it read the data).

    `stop_reason()` says why the engine was interrupted ("cancelled", "time_limit"). With `worker`,
    only while this worker still holds the job (one whose lease was taken over is left alone)."""
    from sandbox.engine.execute import planned_answer, run

    started = time.monotonic() if started is None else started
    try:
        execution = execution_for(session, settings, enforcers, q)
    except PdaoError as e:   # before any data is read: depends on the scene, not the data
        return finish_failed(session, q, e.code, e.message, e.message_zh, worker=worker, refund=True)
    result: QueryResult | None = None
    releasable = False
    failure: str | None = None
    try:
        stop = None if stop_reason is None else (lambda: stop_reason() is not None)
        answer = run(execution, on_connection=on_connection, stop=stop)
        path, digest = write_answer(settings, answer, q)
        result = result_row(q, answer, path, digest)
        result.size_bytes = (settings.results_dir / path).stat().st_size
        result.content_fp = export.content_fp(settings, answer.table)
        if stop is not None and stop():
            raise duckdb.InterruptException("INTERRUPT Error: stopped before export review")
        if q.mode == "prod":   # export review starts here: checked inside the domain, released or held
            assessment = export.assess(session, settings, execution, answer, session.get(Scene, q.scene_id), q)
            result.report = assessment.report
            if assessment.stats is not None:
                result.stats_path = export.write_stats(settings, assessment.stats, path)
            releasable = assessment.releasable
    except Exception as e:  # noqa: BLE001 - a job never takes its runner down; no internals leak
        session.rollback()
        if result is not None:
            _remove_files(settings, result)
        reason = stop_reason() if stop_reason is not None else None
        if reason == "cancelled":   # stopped by its tenant: still shown at the end of its class
            if q.mode == "prod":
                outcomes.wait_for_class_end(started, settings.prod_timing_base_seconds,
                                            at_least=outcomes.planned_seconds(execution))
            return finish_failed(session, q, "cancelled", "The query was cancelled.", "查询已取消。", worker=worker,
                                 status="cancelled", refund=False)
        failure, en, zh = _failure_of(e, reason, q.mode)
        if q.mode == "dev":   # synthetic data: its failures may be told
            return finish_failed(session, q, failure, en, zh, worker=worker, refund=False)
        try:
            planned = planned_answer(execution)
        except PdaoError:   # the plan was made at submission; a fallback that shows nothing new
            planned = PlannedAnswer(answer_columns(execution.checked), {}, q.epsilon, 0)
        result = outcomes.held_failure(settings, q, planned, failure, kind=q.kind)
        releasable = False
    if q.mode == "prod":   # a cancel asked meanwhile ends it below (`_LostLease`), at the same moment
        outcomes.wait_for_class_end(started, settings.prod_timing_base_seconds,
                                    at_least=outcomes.planned_seconds(execution))
    final = "done" if q.mode == "dev" else ("released" if releasable else "held")
    try:
        # the result's time is the outcome's, after the timing class (stamped when the engine was done,
        # it showed the tenant the run's real duration)
        finished = result.created_at = utcnow()
        session.add(result)
        session.flush()
        # Only while this worker still holds the job and nobody asked to cancel it: a cancel that
        # was acknowledged is never followed by a result.
        owned = session.exec(update(Query).where(*_held_by(q, worker), Query.cancel_requested == False).values(  # noqa: E712
            status=final, result_id=result.id, progress=1.0, finished_at=finished, epsilon_spent=result.epsilon_spent,
            lease_until=None).execution_options(synchronize_session=False)).rowcount
        if owned != 1:
            raise _LostLease()
        if q.budget_entry_id is not None:
            ledger.charge(session, q.budget_entry_id)
        # the runner's decisions, in the chain with the change (the log's lock last)
        _audit_run(session, q, worker, "error" if failure else "allow", final, result_id=result.id,
                   epsilon_spent=result.epsilon_spent, verdict=(result.report or {}).get("verdict"),
                   **({"error": failure} if failure else {}))
        if releasable:
            export.record_auto_release(session, result, q)
        session.commit()
    except _LostLease:
        session.rollback()
        _remove_files(settings, result)
        return finish_failed(session, q, "cancelled", "The query was cancelled.", "查询已取消。", worker=worker,
                             status="cancelled", refund=False)   # a no-op unless it is still ours and cancel was asked
    except BaseException:
        session.rollback()
        _remove_files(settings, result)
        raise
    session.refresh(q)
    return q


def _failure_of(e: Exception, reason: str | None, mode: str) -> tuple[str, str, str]:
    """(code, message, message_zh) of a run that failed while reading the data."""
    if reason == "time_limit":
        return ("time_limit", "The query ran longer than its time limit and was stopped.",
                "查询运行超过时间上限，已被终止。")
    if isinstance(e, PdaoError):
        return e.code, e.message, e.message_zh
    if isinstance(e, duckdb.InterruptException):
        return "interrupted", "The query was interrupted.", "查询被中断。"
    if isinstance(e, OSError):
        return "result_not_stored", "The answer could not be stored.", "结果无法保存。"
    return "query_failed", "The query failed inside the sandbox.", "查询在沙箱内执行失败。"


class _LostLease(Exception):
    pass


def _audit_run(session: Session, q: Query, worker: str | None, decision: str, outcome: str, **detail: Any) -> None:
    audit.append(session, actor="system", role=None, auth_method="worker", action="query.run",
                 object=f"query:{q.id}", scene_id=q.scene_id, decision=decision, reason=outcome,
                 detail={"worker": worker, "mode": q.mode, "epsilon": q.epsilon, **detail})


def _remove_files(settings: Settings, result: QueryResult) -> None:
    for rel in (result.storage_path, result.stats_path):
        if rel:
            (settings.results_dir / rel).unlink(missing_ok=True)


def _held_by(q: Query, worker: str | None) -> list[Any]:
    cond = [Query.id == q.id, Query.status == "running"]
    if worker is not None:
        cond.append(Query.worker == worker)
    return cond


def finish_failed(session: Session, q: Query, code: str, message: str, message_zh: str, *, worker: str | None = None,
                  status: str = "failed", refund: bool) -> Query:
    """End a running job without a result, in one transaction: `failed` (told) or `cancelled`. Its
    reservation is refunded when the run never read the data (`refund`), else charged
    (`sandbox.queries.outcomes`)."""
    session.rollback()
    charged = not refund and q.budget_entry_id is not None
    done = session.exec(update(Query).where(*_held_by(q, worker)).values(
        status=status, error_code=code, error_message=message, error_message_zh=message_zh, finished_at=utcnow(),
        lease_until=None, **({"epsilon_spent": q.epsilon} if charged else {}))
        .execution_options(synchronize_session=False)).rowcount
    if done == 1 and q.budget_entry_id is not None:
        (ledger.refund if refund else ledger.charge)(session, q.budget_entry_id)
    if done == 1:
        _audit_run(session, q, worker, "allow" if status == "cancelled" else "error", status, error=code,
                   refunded=refund and q.budget_entry_id is not None)
    session.commit()
    session.refresh(q)
    return q


def cancel(session: Session, principal: Principal, q: Query, request_id: str | None = None) -> Query:
    """A queued job is cancelled at once (and refunded: nothing was read); a running one is asked to
    stop (its worker interrupts the engine and cancels it; a prod run is charged, `sandbox.queries.outcomes`).
    Finished jobs answer 409."""
    if principal.role is not Role.applicant or q.org_id != principal.org_id:
        raise forbidden("not_your_query", "Only the query's own organization may cancel it.", "只有查询所属单位可以取消该查询。")
    done = session.exec(update(Query).where(Query.id == q.id, Query.status == "queued").values(
        status="cancelled", error_code="cancelled", error_message="The query was cancelled.",
        error_message_zh="查询已取消。", finished_at=utcnow()).execution_options(synchronize_session=False)).rowcount
    if done == 1:
        if q.budget_entry_id is not None:
            ledger.refund(session, q.budget_entry_id)
        audit.append(session, request_id=request_id, actor=principal.username, org=principal.org_code,
                     role=principal.role.value, auth_method=principal.auth_method, action="query.cancel", object=f"query:{q.id}",
                     scene_id=q.scene_id, decision="allow", reason="cancelled_while_queued",
                     detail={"mode": q.mode, "refunded": q.budget_entry_id is not None})
    else:
        asked = session.exec(update(Query).where(Query.id == q.id, Query.status == "running")
                             .values(cancel_requested=True).execution_options(synchronize_session=False)).rowcount
        if asked != 1:
            session.refresh(q)
            raise conflict("query_finished", f"The query is already {q.status}.", f"查询已处于 {q.status} 状态。",
                           details={"status": q.status})
    session.commit()
    session.refresh(q)
    return q


# ---------------------------------------------------------------------------------------------
# Reading


def get_query(session: Session, principal: Principal, query_id: int) -> Query:
    q = session.get(Query, query_id) if id_in_range(query_id) else None
    if q is None or not access.may_read(principal, "query", q.org_id):
        raise not_found("Query", "查询")
    return q


get_result = export.get_result
cells_visible = export.cells_visible


def list_queries(session: Session, principal: Principal, scene_id: int | None = None, limit: int = 100) -> list[Query]:
    stmt = access.readable(select(Query), principal, "query", Query.org_id)
    if scene_id is not None:
        stmt = stmt.where(Query.scene_id == scene_id)
    return list(session.exec(stmt.order_by(Query.id.desc()).limit(limit)).all())


PAGE_ROWS = 1_000          # rows of a result one read answers unless it asks for another page size
MAX_PAGE_ROWS = 10_000     # and at most
_PAGE_BATCH_ROWS = 8_192   # rows decoded at a time while a page is read


def read_table(settings: Settings, r: QueryResult, offset: int = 0, limit: int | None = None) -> pa.Table:
    """The result's rows from `offset`, at most `limit` of them (all when None)."""
    return read_page(settings, r, offset, limit)[0]


def read_page(settings: Settings, r: QueryResult, offset: int, limit: int | None) -> tuple[pa.Table, int]:
    """(rows [offset, offset + limit) of the result, its number of rows), read from its Parquet file:
    only the row groups that hold them, a batch at a time, so a page of a large answer never
    decodes the whole file."""
    with pq.ParquetFile(settings.results_dir / r.storage_path) as f:
        meta, schema = f.metadata, f.schema_arrow
        total = meta.num_rows
        end = total if limit is None else min(total, offset + max(limit, 0))
        groups, first, start = [], 0, 0
        for i in range(meta.num_row_groups):
            n = meta.row_group(i).num_rows
            if start < end and start + n > offset:
                if not groups:
                    first = start
                groups.append(i)
            start += n
        skip, need, batches = offset - first, end - offset, []
        if groups and need > 0:
            for b in f.iter_batches(batch_size=_PAGE_BATCH_ROWS, row_groups=groups):
                if skip >= b.num_rows:
                    skip -= b.num_rows
                    continue
                b = b.slice(skip, need)
                skip, need = 0, need - b.num_rows
                batches.append(b)
                if need == 0:
                    break
    return pa.Table.from_batches(batches, schema=schema), total


def rows_of(table: pa.Table) -> list[dict[str, Any]]:
    return [{k: _json_safe(v) for k, v in row.items()} for row in table.to_pylist()]


def query_out(q: Query, principal: Principal, session: Session) -> dict[str, Any]:
    """A query as `principal` may see it. Of a prod run, its tenant sees neither the progress nor the
    attempts while it runs (timing and worker deaths can follow the data: `sandbox.queries.outcomes`), and
    its answer's first version until one is released (`sandbox.results.export.tenant_result_id`)."""
    told = export.is_staff(principal) or q.mode == "dev"
    running = q.status in ("queued", "running")
    result_id = q.result_id if told else export.tenant_result_id(session, q)
    return {"query_id": q.id, "id": q.id, "scene_id": q.scene_id, "mode": q.mode, "synthetic": q.mode == "dev",
            "kind": q.kind, "status": q.status,
            "progress": round(q.progress, 4) if told or not running else None, "sql": q.sql_text,
            "checked_sql": q.checked_sql, "dataset": q.dataset, "version_id": q.version_id,
            "epsilon": q.epsilon, "epsilon_spent": q.epsilon_spent, "max_contributions": q.max_contributions,
            "attempts": q.attempts if told else None, "cancel_requested": q.cancel_requested, "result_id": result_id,
            "error": None if q.error_code is None else {"code": q.error_code, "message": q.error_message,
                                                        "message_zh": q.error_message_zh},
            "created_at": q.created_at, "started_at": q.started_at, "finished_at": q.finished_at}


def report_view(principal: Principal, r: QueryResult) -> dict[str, Any] | None:
    """The disclosure report, for the office, export reviewers and auditors only. Its verdicts rest
    on exact statistics (is a cell below 10 persons?), which the noise of a DP answer exists to
    hide, so the tenant is shown none of them: only the result's status, and what a reviewer
    did (`revision_view`)."""
    if r.report is None:
        return None
    if not export.is_staff(principal):
        # a template run's section is about the tenant's own upload (consent exclusions): theirs
        # to see once released
        if "template" not in r.report:
            return None
        section = r.report["template"]
        if r.status != "released":   # whether a prod run failed may depend on the data: not before review
            section = {k: section.get(k) for k in ("template", "version", "digest")}
        return {"template": section}
    return r.report


def result_out(settings: Settings, principal: Principal, r: QueryResult, *, with_rows: bool = True,
               session: Session, offset: int = 0, limit: int = PAGE_ROWS) -> dict[str, Any]:
    """A result as `principal` may see it. `rows` (when the cells are visible and `with_rows`): a
    page of at most `limit` (≤ MAX_PAGE_ROWS) rows from `offset`, with `rows_total` and
    `next_offset` (None after the last page) — given only with the cells, where the caller sees
    the size anyway. Reading a page takes one of the user's read slots (`sandbox.results.read_slots`)."""
    if not export.is_staff(principal):   # a tenant sees the decision, not the deliberation
        r = export.as_tenant_sees(session, r)
    decided = principal.role is Role.reviewer and export.decided_by(session, principal, r)
    visible = cells_visible(principal, r, decided_by_me=decided)
    staff = export.is_staff(principal)
    # A row-level answer's size says how many rows matched: the tenant learns it with the cells
    # (after export review); the office, reviewers and auditors see it to review.
    size_shown = visible or r.kind != "rows" or staff
    # The file's hash would confirm a guess of the held cells: the tenant gets it with the cells.
    hash_shown = visible or staff
    out: dict[str, Any] = {
        "id": r.id, "query_id": r.query_id, "scene_id": r.scene_id, "kind": r.kind, "synthetic": r.synthetic,
        "status": r.status, "row_count": r.row_count if size_shown else None, "noise": r.noise,
        # until released, its tenant sees the planned column names only (a failed run shows the same)
        "columns": r.columns if visible or staff or r.synthetic else outcomes.planned_columns(r),
        "epsilon_spent": r.epsilon_spent, "notes": r.notes if size_shown else [],
        # the ε the noise was calibrated to (a dev answer is calibrated alike but charges nothing)
        "epsilon": sum(float(n.get("epsilon", 0.0)) for n in (r.noise or {}).values()),
        "sha256": r.sha256 if hash_shown else None, "created_at": r.created_at,
        "cells_visible": visible, "version": r.version, "parent_id": r.parent_id, "released_by": r.released_by,
        "decided_at": r.decided_at, "report": report_view(principal, r), "revision": export.revision_view(principal, r),
        "decided_by_me": decided if principal.role is Role.reviewer else None,
    }
    if r.synthetic:
        out["notice"] = "synthetic: computed on the dev twin, not on real data"
        out["notice_zh"] = "合成数据：基于开发孪生数据计算，并非真实数据"
    out.update(rows=None, rows_total=None, offset=None, next_offset=None, expired_at=r.expired_at)
    if visible and with_rows and r.expired_at is None:
        offset, limit = max(offset, 0), min(max(limit, 1), MAX_PAGE_ROWS)
        read_slots.charge_rows(principal, min(limit, max(r.row_count - offset, 0)), settings)
        with read_slots.held(principal):
            page, total = read_page(settings, r, offset, limit)
            rows = rows_of(page)
        out.update(rows=rows, rows_total=total, offset=offset,
                   next_offset=offset + len(rows) if offset + len(rows) < total else None)
    return out
