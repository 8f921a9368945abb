"""Export review (出域审核): what may leave the domain, who let it out, and how a file found outside
is traced back (可溯源).

The life of a prod result:

1. **Checked.** When the worker stores an answer, `assess` runs the disclosure checks
   (`sandbox.results.disclosure`) on the per-cell statistics the engine computed inside the domain (never
   shown: they stay beside the result in the result store), on the output itself (PII, and for row
   outputs k-anonymity and l-diversity over the quasi-identifiers — joined on pseudonyms with the
   scene's released row answers when the scene links them), on the budget, and for row outputs
   against the scene's other row answers (`differencing`: the row identities stay beside the
   result, like the statistics). The report is stored with the result.
2. **Released or held.** The scene's release policy decides what may go out without a person
   (`auto_release: dp_aggregates` — a DP aggregate whose budget, PII and noisy-count checks pass:
   nothing exact decides it); everything else, every row answer included, is held in the
   reviewers' queue.
3. **Reviewed.** `review` releases or rejects with a reason. A reviewer never reviews a result of
   their own organization nor one they asked for, each reviewer decides once, and a scene may need
   two independent releases. A result with a failing check is released only by two reviewers'
   overrides; a failed run never. A row answer is checked again at release against the scene's
   released row answers. `revise` (suppression, rounding) makes a new, checked version.
4. **Downloaded.** Only released results (and a tenant's own synthetic dev answers). Each file
   carries an export id and a keyed fingerprint (`sandbox.results.fingerprint`); the export is recorded
   with the hash of the bytes sent, in the same transaction as its audit event.
5. **Traced.** `trace` names the export, query, scene, datasets and versions, requester and
   reviewers of a file found outside, by its stamp when it survived, else by its cells.

Every decision here (auto-release, review, revision, export) is appended to the audit chain in
the same transaction as the change it records.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import uuid
from dataclasses import dataclass, replace
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from catalog.models import Dataset, DatasetVersion
from pdao.kernel import audit
from pdao.kernel.config import Settings
from pdao.kernel.db import id_in_range, utcnow
from pdao.kernel.errors import PdaoError, conflict, forbidden, invalid, not_found
from pdao.kernel.identity.models import Organization, Role, User
from pdao.kernel.identity.service import Principal
from policies import access
from policies.visibility import tenant_scoped
from sandbox.engine.execute import Answer, Execution
from sandbox.results import disclosure, fingerprint, read_slots
from sandbox.results.models import Query, QueryResult, ResultExport, ResultReview
from sandbox.scenes.models import Scene, SceneReview
from sandbox.scenes.schemas import ReleasePolicy
from sandbox.scenes.service import lock as lock_scene
from sandbox.uploads.models import TenantUpload

VALUE_FUNCTIONS = ("sum", "avg", "median", "quantile")
COUNT_FUNCTIONS = ("count", "count_distinct")
ROW_KEY = "__row_key"          # the column of a row answer's identities file (beside the result)
OVERRIDES_REQUIRED = 2         # distinct reviewers whose overrides release a result with a failing check
FORMATS = {"csv": "text/csv; charset=utf-8", "parquet": "application/vnd.apache.parquet",
           "json": "application/json"}


# ---------------------------------------------------------------------------------------------
# Keys and policy


def fingerprint_key(settings: Settings) -> bytes:
    """The key of content fingerprints and export stamps, derived (a PRF) from the home's own
    fingerprint key — not the token key, so rotating that never orphans a file already out: only
    the server can stamp a file or recognise its cells."""
    return fingerprint.derive_key(settings.fingerprint_key.encode(), "pdao/export/fingerprint v1")


def release_policy(scene: Scene) -> ReleasePolicy:
    return ReleasePolicy(**(scene.release_policy or {}))


def min_difference(scene: Scene) -> int:
    """By how many rows two of a scene's row answers must differ, if at all (`differencing`)."""
    t = release_policy(scene).thresholds
    return t.min_difference if t.min_difference is not None else t.min_cell_count


def thresholds(scene: Scene) -> disclosure.Thresholds:
    t = release_policy(scene).thresholds
    return disclosure.Thresholds(min_cell_count=t.min_cell_count, dominance_n=t.dominance_n,
                                 dominance_k=t.dominance_k, p_ratio=t.p_ratio, k_anonymity=t.k_anonymity,
                                 l_diversity=t.l_diversity)


# ---------------------------------------------------------------------------------------------
# 1–2. Checked, then released or held (called by the worker, inside its store transaction)


@dataclass
class Assessment:
    report: dict[str, Any]
    # kept inside the domain, beside the result: per-cell statistics (aggregates), or one identity
    # per row aligned with the stored table (rows, `ROW_KEY`)
    stats: pa.Table | None
    releasable: bool                # by the scene's policy, without a person


def _stat_keys(execution: Execution) -> list[str]:
    return [k.alias if k.alias is not None else f"__k{i}" for i, k in enumerate(execution.checked.group_keys)]


def _value_aliases(execution: Execution) -> list[str]:
    return [a.alias for a in execution.checked.aggregates if a.function in VALUE_FUNCTIONS]


def _fields_by_sensitivity(execution: Execution, output_fields: dict[str, str | None], sensitivity: str) -> list[str]:
    fields = execution.dataset.fields
    return [alias for alias, f in output_fields.items()
            if f is not None and f in fields and fields[f].sensitivity == sensitivity]


def assess(session: Session, settings: Settings, execution: Execution, answer: Answer, scene: Scene,
           q: Query) -> Assessment:
    """The disclosure report of an answer, and whether the scene lets it out without a person. The
    engine already computed the statistics the checks need; a row answer is also compared with the
    scene's other row answers in the result store (`differencing`, and the linked k-anonymity when
    the scene links pseudonyms). (A reviewer's revision is checked again by `_recheck`.)"""
    t = thresholds(scene)
    checks: list[Any] = []
    stats = answer.cell_stats
    columns = _columns_of(execution, answer)
    if answer.kind == "aggregate":
        if stats is not None:
            checks += disclosure.aggregate_checks(stats, _stat_keys(execution), _value_aliases(execution), t, dp=True)
        checks.append(disclosure.budget_check(answer.epsilon_spent, q.epsilon, scene.epsilon_spent,
                                              scene.budget_epsilon))
        counts = [a.alias for a in execution.checked.aggregates if a.function in COUNT_FUNCTIONS]
        checks.append(disclosure.noisy_count_check(answer.table, counts, columns["keys"], t.min_cell_count))
    else:
        checks += linked_rows_checks(session, settings, scene, q.id, answer.table, columns, persons=answer.persons)
        checks.append(differencing(session, settings, scene, q.id, answer.row_keys, ("held", "released")))
        stats = row_keys_table(answer.row_keys) if answer.row_keys is not None else None
    checks.append(disclosure.pii_check(answer.table))
    report = disclosure.report(checks)
    report["columns"] = columns
    releasable = (release_policy(scene).auto_release == "dp_aggregates"
                  and disclosure.auto_releasable(report, answer.kind, dp=answer.kind == "aggregate"))
    return Assessment(report, stats, releasable)


# ---------------------------------------------------------------------------------------------
# Row answers against each other


def row_keys_table(keys: list[str]) -> pa.Table:
    """A row answer's identities as stored beside it: one per row, in the stored table's order."""
    return pa.table({ROW_KEY: pa.array(keys, pa.string())})


def stored_row_keys(settings: Settings, r: QueryResult) -> list[str] | None:
    """The identities stored beside a row result (None when none were kept: a result from before
    they were, or whose file is gone)."""
    if r.kind != "rows" or not r.stats_path:
        return None
    try:
        table = pq.read_table(settings.results_dir / r.stats_path)
    except OSError:
        return None
    return table[ROW_KEY].to_pylist() if ROW_KEY in table.column_names else None


def _row_answers(session: Session, statuses: tuple[str, ...], other_than_query: int, *,
                 scene_id: int | None = None, dataset: str | None = None) -> list[QueryResult]:
    """Current prod row answers of other queries in these statuses (a superseded, rejected or dev
    version is never one of them), of one scene or on one dataset. Template runs are not: their rows
    are values derived per consented applicant of the tenant's own upload, not rows of a dataset."""
    stmt = select(QueryResult).where(
        QueryResult.kind == "rows", QueryResult.synthetic == False,  # noqa: E712
        QueryResult.status.in_(statuses), QueryResult.query_id != other_than_query)
    if scene_id is not None:
        stmt = stmt.where(QueryResult.scene_id == scene_id)
    if dataset is not None:
        stmt = stmt.where(QueryResult.query_id.in_(select(Query.id).where(Query.dataset == dataset)))
    found = session.exec(stmt.order_by(QueryResult.id)).all()
    return [r for r in found if "template" not in (r.report or {})]


def scene_row_answers(session: Session, scene_id: int, other_than_query: int,
                      statuses: tuple[str, ...]) -> list[QueryResult]:
    """The scene's other current prod row answers in these statuses (linkage: `linked_table`)."""
    return _row_answers(session, statuses, other_than_query, scene_id=scene_id)


def differencing(session: Session, settings: Settings, scene: Scene, query_id: int, keys: list[str] | None,
                 statuses: tuple[str, ...]) -> disclosure.Check:
    """The `differencing` check of a row answer (its identities `keys`) against every other row
    answer in `statuses` on the same dataset — of any scene and any company: a company holding
    several scenes, or two companies together, could otherwise subtract answers the check never
    compared (the second review did it across two scenes of one company)."""
    if keys is None:
        return disclosure.Check("differencing", "review",
                                "This answer's row identities were not kept: it cannot be compared with the other "
                                "row answers; compare it by hand.",
                                "该结果未保存行标识，无法与其他行级结果比较；请人工比较。")
    earlier: dict[int, list[str]] = {}
    unknown: list[int] = []
    dataset = session.get(Query, query_id).dataset
    for r in _row_answers(session, statuses, query_id, dataset=dataset):
        theirs = stored_row_keys(settings, r)
        if theirs is None:
            unknown.append(r.id)
        else:
            earlier[r.id] = theirs
    return disclosure.differencing_check(keys, earlier, min_difference(scene), unknown=unknown,
                                         against="released" if statuses == ("released",) else "held or released")


def linked_table(session: Session, settings: Settings, scene: Scene, query_id: int, table: pa.Table,
                 columns: dict[str, Any]) -> tuple[pa.Table, list[str], list[str], list[int]]:
    """When the scene links pseudonyms: `table` joined on the person's pseudonym with what the
    scene's released row answers show of the same person (`disclosure.linked_rows`), the added
    quasi-identifier and sensitive columns, and which results were joined. Else `table` as is."""
    pseudonyms = columns.get("person_pseudonyms") or []
    if not scene.link_pseudonyms or not pseudonyms:
        return table, [], [], []
    released, kinds, joined = [], {}, []
    for r in scene_row_answers(session, scene.id, query_id, ("released",)):
        cols = (r.report or {}).get("columns") or {}
        theirs = cols.get("person_pseudonyms") or []
        if not theirs:
            continue
        fields = cols.get("fields") or {}
        carried = {}
        for kind in ("sensitive", "quasi_identifiers"):   # a field both ways counts as a quasi-identifier
            for c in cols.get(kind) or []:
                carried[c] = fields.get(c, c)
                kinds[fields.get(c, c)] = kind
        if carried:
            released.append((pq.read_table(settings.results_dir / r.storage_path), theirs[0], carried))
            joined.append(r.id)
    if not released:
        return table, [], [], []
    out, names = disclosure.linked_rows(table, pseudonyms[0], released)
    linked_qis = [n for n in names if kinds[n.removeprefix(disclosure.LINKED)] == "quasi_identifiers"]
    linked_sens = [n for n in names if kinds[n.removeprefix(disclosure.LINKED)] == "sensitive"]
    return out, linked_qis, linked_sens, joined


def linked_rows_checks(session: Session, settings: Settings, scene: Scene, query_id: int, table: pa.Table,
                       columns: dict[str, Any], *, persons: int | None) -> list[disclosure.Check]:
    """k-anonymity, l-diversity (and min_persons when `persons` is known) of a row answer — over its
    union with the scene's released row answers, joined on pseudonyms, when the scene links them."""
    joined, qis, sens, with_ids = linked_table(session, settings, scene, query_id, table, columns)
    checks = disclosure.rows_checks(joined, list(columns.get("quasi_identifiers", [])) + qis,
                                    list(columns.get("sensitive", [])) + sens, thresholds(scene), persons=persons)
    if not with_ids:
        return checks
    ids = ", ".join(f"#{i}" for i in with_ids)
    return [replace(c, reason=f"{c.reason} Joined on pseudonyms with the scene's released row answers {ids}.",
                    reason_zh=f"{c.reason_zh}（已按假名与场景中已放行的行级结果 {ids} 关联。）")
            if c.name in ("k_anonymity", "l_diversity") else c for c in checks]


def _columns_of(execution: Execution, answer: Answer) -> dict[str, list[str]]:
    """Which output columns are cell keys and which are values (what a reviewer may suppress or
    round), and for rows which are quasi-identifiers and sensitive: kept in the report so a
    revision can be checked again without the engine."""
    if answer.kind == "aggregate":
        values = []
        for a in execution.checked.aggregates:
            values.append(a.alias)
            if a.function == "avg":
                values.append(f"{a.alias}_error95")
        return {"keys": _stat_keys(execution), "values": values, "sums": _value_aliases(execution)}
    output_fields = answer.output_fields or {}
    fields = execution.dataset.fields
    unit = execution.dataset.privacy_unit
    # a person's pseudonym: how the scene's answers join when it links pseudonyms
    pseudonyms = [alias for alias, f in output_fields.items()
                  if f is not None and f == unit and f in fields and fields[f].masking == "pseudonym"]
    return {"quasi_identifiers": _fields_by_sensitivity(execution, output_fields, "quasi_identifier"),
            "sensitive": _fields_by_sensitivity(execution, output_fields, "sensitive"),
            "person_pseudonyms": pseudonyms,
            "fields": {alias: f for alias, f in output_fields.items() if f is not None}}


def _drop_cells(stats: pa.Table, keys: list[str], cells: list[dict[str, Any]]) -> pa.Table:
    gone = {tuple(_norm(c.get(k)) for k in keys) for c in cells}
    rows = stats.to_pylist()
    keep = [i for i, r in enumerate(rows) if tuple(_norm(r.get(k)) for k in keys) not in gone]
    return stats.take(pa.array(keep, type=pa.int64()))


def _norm(v: Any) -> Any:
    """A cell's key value as JSON would carry it (dates as ISO text, whole floats as ints)."""
    if isinstance(v, dt.datetime):
        return v.isoformat()
    if isinstance(v, dt.date):
        return v.isoformat()
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def store_table(settings: Settings, scene_id: int, name: str, table: pa.Table) -> tuple[str, str]:
    """Write a table into the result store (temporary name, then rename, so a reader never sees
    half a file): its path relative to the store, and the SHA-256 of the file."""
    folder = settings.results_dir / f"scene-{scene_id}"
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.tmp"
    pq.write_table(table, tmp)
    with tmp.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    tmp.replace(folder / name)
    return str((folder / name).relative_to(settings.results_dir)), digest


def write_stats(settings: Settings, stats: pa.Table, result_path: str) -> str:
    """The per-cell statistics beside the result (inside the domain; no endpoint reads this file)."""
    rel = result_path.removesuffix(".parquet") + ".stats.parquet"
    tmp = settings.results_dir / (rel + ".tmp")
    pq.write_table(stats, tmp)
    tmp.replace(settings.results_dir / rel)
    return rel


def content_fp(settings: Settings, table: pa.Table) -> str:
    return fingerprint.content_fingerprint(fingerprint_key(settings), table)


def record_auto_release(session: Session, result: QueryResult, q: Query) -> None:
    result.status, result.released_by, result.decided_at = "released", "policy", utcnow()
    audit.append(session, actor="system", action="result.release", object=f"result:{result.id}",
                 scene_id=result.scene_id, decision="allow", reason="release_policy:dp_aggregates",
                 detail={"query_id": q.id, "verdict": (result.report or {}).get("verdict"), "by": "policy"})


# ---------------------------------------------------------------------------------------------
# Who may see what


def _tenant_scoped(principal: Principal) -> bool:
    return tenant_scoped(principal.role, principal.org_kind)


def may_see(principal: Principal, org_id: int) -> bool:
    """Whose queries and results a caller sees (`policies.access`, resource `result`): tenants (anyone
    in a company) their own organization's; providers none; the office, reviewers, auditors and the
    operator metadata. Cells: `cells_visible`."""
    return access.may_read(principal, "result", org_id)


def cells_visible(principal: Principal, r: QueryResult, *, decided_by_me: bool = False) -> bool:
    """The cells of a result: its tenant's own synthetic (dev) answers at once, prod answers once
    released; an export reviewer those of a result waiting for their decision (what would go out:
    already noised or masked) — not once they decided. Nobody else — auditors never."""
    if principal.role is Role.applicant:
        return r.org_id == principal.org_id and (r.synthetic or r.status == "released")
    if principal.role is Role.reviewer:
        return (r.status == "held" and not r.synthetic and r.org_id != principal.org_id
                and not _tenant_scoped(principal) and not decided_by_me)
    return False


def decided_by(session: Session, principal: Principal, r: QueryResult) -> bool:
    return session.exec(select(ResultReview.id).where(ResultReview.result_id == r.id,
                                                      ResultReview.reviewer_id == principal.user_id)).first() is not None


def is_staff(principal: Principal) -> bool:
    """Who reads whole disclosure reports: the office, export reviewers and auditors (never anyone
    in a company, nor the operator). The reports rest on exact statistics."""
    return principal.role in (Role.office, Role.reviewer, Role.auditor) and not _tenant_scoped(principal)


# ---------------------------------------------------------------------------------------------
# What a tenant sees of export review: the decision, not the deliberation
#
# A reviewer's revision (suppressing the cells or rows a check failed), a first release that waits
# for a second reviewer's override, a rejection's path: each follows the exact statistics. So until
# a query's answer is released, its tenant sees its first version only, as held or rejected, and no
# per-reviewer decision (a rejection's reason excepted: it is what the reviewer tells the tenant).


def current_and_first(session: Session, r: QueryResult) -> tuple[QueryResult, QueryResult]:
    """(the version export review is at now, the first version) of r's query's answer."""
    q = session.get(Query, r.query_id)
    current = session.get(QueryResult, q.result_id) if q is not None and q.result_id else None
    first = r if r.version == 1 else session.exec(select(QueryResult).where(
        QueryResult.query_id == r.query_id, QueryResult.version == 1)).first()
    return current or r, first or r


def hidden_from(principal: Principal, session: Session, r: QueryResult) -> bool:
    """A later version of an answer not yet released: its tenant does not know it exists."""
    if r.version == 1 or not _tenant_scoped(principal):
        return False
    return current_and_first(session, r)[0].status != "released"


def tenant_result_id(session: Session, q: Query) -> int | None:
    """The result a tenant is shown for its query: the first version until one is released."""
    if q.result_id is None:
        return None
    current, first = current_and_first(session, session.get(QueryResult, q.result_id))
    return current.id if current.synthetic or current.status == "released" else first.id


def get_result(session: Session, principal: Principal, result_id: int, *, lock: bool = False) -> QueryResult:
    """A result the caller may see (else 404). With `lock`, the row is taken for this transaction
    first: a no-op UPDATE locks it on PostgreSQL and takes SQLite's write lock (which ignores
    FOR UPDATE), so two decisions on one result run one after the other, each seeing the other's."""
    r = session.get(QueryResult, result_id) if id_in_range(result_id) else None
    if r is None or not may_see(principal, r.org_id) or hidden_from(principal, session, r):
        raise not_found("Result", "结果")
    if lock:
        session.exec(update(QueryResult).where(QueryResult.id == result_id).values(status=QueryResult.status)
                     .execution_options(synchronize_session=False))
        session.refresh(r)
    return r


def review_queue(session: Session, principal: Principal, limit: int = 100) -> list[QueryResult]:
    """Held results waiting for this reviewer: not their organization's, not yet decided by them.
    A reviewer inside a company sees none: every other tenant's result is hidden from them (404),
    and their own company's they may not decide."""
    if _tenant_scoped(principal):
        return []
    decided = select(ResultReview.result_id).where(ResultReview.reviewer_id == principal.user_id)
    stmt = (select(QueryResult).where(QueryResult.status == "held", QueryResult.org_id != principal.org_id,
                                      QueryResult.id.not_in(decided)).order_by(QueryResult.id).limit(limit))
    return list(session.exec(stmt).all())


TENANT_LIST_SCAN = 5_000     # a tenant's newest results a status filter looks through


def list_results(session: Session, principal: Principal, status: str | None, limit: int = 100) -> list[QueryResult]:
    """The results a principal may list, newest first. A tenant's `status` filter is on the status it
    is shown (`as_tenant_sees`), never the stored one: filtering on the stored status told a tenant
    that a reviewer had revised its held answer (it left `held` for `superseded`; review r4 #2)."""
    stmt = access.readable(select(QueryResult), principal, "result", QueryResult.org_id)
    stmt = stmt.order_by(QueryResult.id.desc())
    if not _tenant_scoped(principal):
        if status is not None:
            stmt = stmt.where(QueryResult.status == status)
        return list(session.exec(stmt.limit(limit)).all())
    out: list[QueryResult] = []
    for r in session.exec(stmt.limit(TENANT_LIST_SCAN)).all():
        if hidden_from(principal, session, r):
            continue
        if status is None or as_tenant_sees(session, r).status == status:
            out.append(r)
            if len(out) == limit:
                break
    return out


# ---------------------------------------------------------------------------------------------
# 3. Review and revisions


def _reviewable(session: Session, principal: Principal, r: QueryResult) -> Query:
    """The refusals every reviewer action shares (403/409, naming the rule)."""
    if principal.role is not Role.reviewer:
        raise forbidden("role_not_permitted", "Only export reviewers review results.", "只有出域审核员可以审核结果。")
    if r.org_id == principal.org_id:
        raise forbidden("reviewer_same_org", "A reviewer never reviews a result of their own organization.",
                        "审核员不得审核本单位的结果。")
    q = session.get(Query, r.query_id)
    if q.requester_id == principal.user_id:
        raise forbidden("reviewer_is_requester", "A reviewer never reviews a result they asked for.",
                        "审核员不得审核本人提交查询的结果。")
    if r.synthetic or r.status != "held":
        raise conflict("result_not_held", f"Only held results are reviewed; this one is {r.status}.",
                       f"只能审核待审核的结果，该结果状态为 {r.status}。", details={"status": r.status})
    already = session.exec(select(ResultReview.id).where(ResultReview.result_id == r.id,
                                                         ResultReview.reviewer_id == principal.user_id)).first()
    if already is not None:
        raise conflict("already_reviewed", "You already decided on this result; a second reviewer must be someone else.",
                       "您已审核过该结果；第二位审核员须为他人。")
    return q


def may_review(session: Session, principal: Principal, r: QueryResult) -> bool:
    """Whether `review` would accept a decision of this principal on this result (pages offer the
    review form only then)."""
    try:
        _reviewable(session, principal, r)
    except PdaoError:
        return False
    return True


def _audit_decision(session: Session, principal: Principal, action: str, r: QueryResult, reason: str,
                    request_id: str | None, **detail: Any) -> None:
    audit.append(session, request_id=request_id, actor=principal.username, org=principal.org_code,
                 role=principal.role.value, auth_method=principal.auth_method, action=action,
                 object=f"result:{r.id}", scene_id=r.scene_id, decision="allow", reason=reason[:500],
                 detail={"query_id": r.query_id, "version": r.version, **detail})


def release_rule(session: Session, r: QueryResult, report: dict[str, Any] | None = None) -> dict[str, Any]:
    """What releasing this result takes now (for staff: the API's lineage, the console's result
    page): the failing checks, whether each release must be an override, how many releases and
    overrides it has and needs, and whether it can be released at all (a failed run never)."""
    scene = session.get(Scene, r.scene_id)
    failing = disclosure.failing_checks(report if report is not None else r.report)
    reviews = session.exec(select(ResultReview).where(ResultReview.result_id == r.id)).all()
    releases = [v for v in reviews if v.decision == "release"]
    required = release_policy(scene).reviewers_required
    return {"failing": failing, "failed_run": disclosure.failed_run(report if report is not None else r.report),
            "needs_override": bool(failing), "releases": len(releases),
            "overrides": sum(1 for v in releases if v.override),
            "required": max(required, OVERRIDES_REQUIRED) if failing else required}


def _released_enough(rule: dict[str, Any]) -> bool:
    """With a failing check, only overrides count (two distinct reviewers at least); else releases."""
    return (rule["overrides"] if rule["needs_override"] else rule["releases"]) >= rule["required"]


def _report_at_release(session: Session, settings: Settings | None, scene: Scene, r: QueryResult) -> dict[str, Any]:
    """A row answer's report with the checks that depend on the scene's other answers run again
    against its RELEASED row answers as they are now (releases need not come in the order of
    runs): `differencing`, and the linked k-anonymity / l-diversity when the scene links
    pseudonyms. Other results' reports are returned as they are."""
    report = dict(r.report or {})
    if r.kind != "rows" or r.synthetic or "template" in report:
        return report
    if settings is None:   # the row identities live in the result store
        raise conflict("release_needs_recheck",
                       "A row answer is checked again at release against the scene's released row answers; "
                       "release it through POST /api/v1/results/{id}/review.",
                       "行级结果放行时须与场景中已放行的行级结果重新比对；请通过 POST /api/v1/results/{id}/review 放行。")
    columns = report.get("columns") or {}
    table = pq.read_table(settings.results_dir / r.storage_path)
    fresh: dict[str, disclosure.Check] = {}
    if scene.link_pseudonyms:
        for c in linked_rows_checks(session, settings, scene, r.query_id, table, columns, persons=None):
            if c.name in ("k_anonymity", "l_diversity"):
                fresh[c.name] = c
    fresh["differencing"] = differencing(session, settings, scene, r.query_id, stored_row_keys(settings, r),
                                         ("released",))
    checks = [c for c in report.get("checks") or [] if c.get("name") not in fresh]
    checks += [c.as_dict() for c in fresh.values()]
    summary = disclosure.report([disclosure.Check(**c) for c in checks])
    return {**report, **summary, "checked_at_release": utcnow().isoformat()}


def review(session: Session, principal: Principal, result_id: int, decision: str, reason: str,
           request_id: str | None = None, *, override: bool = False, settings: Settings | None = None) -> QueryResult:
    """Release or reject a held result (the result row is locked: two reviewers deciding at once
    are serialised; a row answer's release also takes its scene's row, so two of the scene's row
    answers are never released past each other's check). Released once the scene's
    `reviewers_required` distinct reviewers released it; one rejection rejects it.

    A result whose report has a `fail` verdict is released only by overrides: each releasing
    reviewer says `override` (with their reason), and two distinct reviewers must (409
    `release_needs_override` for a plain release, which changes nothing). An override where
    nothing fails is refused (409 `nothing_to_override`). A failed run is never released (409
    `failed_run_not_releasable`). A row answer's scene-dependent checks are run again first
    (`_report_at_release`): what they find now is what counts, and is stored with the decision.
    Commits."""
    if override and decision != "release":
        raise invalid("override_is_for_release", "Only a release can override failing checks.",
                      "只有放行决定可以覆盖未通过的检查。")
    r = get_result(session, principal, result_id, lock=True)
    q = _reviewable(session, principal, r)
    scene = session.get(Scene, r.scene_id)
    report = r.report
    if decision == "release":
        if disclosure.failed_run(r.report):
            raise conflict("failed_run_not_releasable",
                           "The run failed inside the domain: there is nothing to release, override or not.",
                           "该运行在域内失败：没有可放行的内容，覆盖亦不可。")
        if r.kind == "rows" and not r.synthetic:
            lock_scene(session, scene)
            report = _report_at_release(session, settings, scene, r)
        failing = disclosure.failing_checks(report)
        if failing and not override:
            raise conflict("release_needs_override",
                           f"Checks failed ({', '.join(failing)}): the result is released only by the overrides of "
                           f"{OVERRIDES_REQUIRED} reviewers, each with a reason (\"override\": true).",
                           f"检查未通过（{'、'.join(failing)}）：须由 {OVERRIDES_REQUIRED} 位审核员分别覆盖并说明理由"
                           f"（\"override\": true）才能放行。",
                           details={"failing": failing,
                                    "checks": [c for c in report.get("checks") or [] if c.get("name") in failing]})
        if override and not failing:
            raise conflict("nothing_to_override", "No check fails: release it without an override.",
                           "没有未通过的检查：请直接放行，无需覆盖。")
    overridden = disclosure.failing_checks(report) if override else None
    session.add(ResultReview(result_id=r.id, reviewer_id=principal.user_id, reviewer_org_id=principal.org_id,
                             decision=decision, reason=reason, override=override, overridden_checks=overridden))
    try:
        session.flush()
    except IntegrityError:   # the same reviewer twice at once: the unique (result, reviewer) decides
        session.rollback()
        raise conflict("already_reviewed", "You already decided on this result.", "您已审核过该结果。") from None
    if report is not r.report:
        r.report = report
    rule = release_rule(session, r, report)
    if decision == "reject":
        r.status, r.decided_at = "rejected", utcnow()
        q.status = "rejected"
    elif _released_enough(rule):
        r.status, r.released_by, r.decided_at = "released", "reviewers", utcnow()
        q.status = "released"
    session.add(r)
    session.add(q)
    _audit_decision(session, principal, f"result.{decision}", r, reason, request_id,
                    releases=rule["releases"], required=rule["required"], status=r.status, override=override,
                    overrides=rule["overrides"], overridden=overridden, failing=rule["failing"])
    session.commit()
    session.refresh(r)
    return r


def revise(session: Session, settings: Settings, principal: Principal, result_id: int, action: str, reason: str,
           *, cells: list[dict[str, Any]] | str | None = None, columns: list[str] | None = None,
           base: int | None = None, request_id: str | None = None) -> QueryResult:
    """A reviewer's suppression or rounding: a new version of the result (held, checked again);
    the old one is superseded. `cells="failing"` suppresses every cell a check did not pass."""
    r = get_result(session, principal, result_id, lock=True)
    q = _reviewable(session, principal, r)
    scene = session.get(Scene, r.scene_id)
    table = pq.read_table(settings.results_dir / r.storage_path)
    stats = pq.read_table(settings.results_dir / r.stats_path) if r.stats_path else None
    kept: list[int] | None = None          # rows: which rows the new version keeps (identities follow)
    key_names, value_names = _result_columns(r)
    revision: dict[str, Any] = {"action": action, "by": principal.username, "reason": reason, "from_version": r.version}
    suppressed: list[dict[str, Any]] | None = None
    if action == "suppress":
        if r.kind == "rows":
            if cells != "failing":
                raise invalid("suppress_rows_failing_only", "Rows are suppressed by class: send cells='failing'.",
                              "行级结果只能按等价类抑制：请发送 cells='failing'。")
            joined = linked_table(session, settings, scene, r.query_id, table, (r.report or {}).get("columns") or {})[0]
            kept = _rows_outside_failing_classes(r, joined)
            revision["rows_removed"] = table.num_rows - len(kept)
            table = table.take(pa.array(kept, type=pa.int64()))
        else:
            hidden = [k for k in key_names if k not in table.column_names]
            if hidden:   # a cell the output cannot name cannot be suppressed in it
                raise invalid("suppress_needs_selected_keys",
                              "Cells can be suppressed only when every group key is an output column.",
                              "只有当每个分组键都是输出列时才能抑制单元格。", details={"keys": key_names})
            chosen = _failing_cells(r) if cells == "failing" else list(cells or [])
            if not chosen:
                raise invalid("nothing_to_suppress", "No cells to suppress.", "没有需要抑制的单元格。")
            matched = _match_cells(table, key_names, chosen)
            table = disclosure.suppress(table, matched, key_names, [v for v in value_names if v in table.column_names])
            suppressed = matched + list((r.revision or {}).get("suppressed_cells", []))
            revision["cells"] = matched
        revision["suppressed_cells"] = suppressed or []
    else:   # round
        if not base or base < 1:
            raise invalid("bad_rounding_base", "Rounding needs a base of at least 1.", "取整需要不小于 1 的基数。")
        cols = columns or value_names
        bad = [c for c in cols if c not in value_names]
        if bad:
            raise invalid("not_a_value_column", f"Only value columns are rounded: {', '.join(bad)}.",
                          f"只能对数值列取整：{', '.join(bad)}。", details={"value_columns": value_names})
        table = disclosure.round_values(table, cols, base)
        revision.update(columns=cols, base=base)
        suppressed = list((r.revision or {}).get("suppressed_cells", [])) or None
        revision["suppressed_cells"] = suppressed or []

    if r.kind == "rows" and stats is not None and ROW_KEY in stats.column_names:
        # the identities stay aligned with the rows the new version keeps
        stats = stats if kept is None else stats.take(pa.array(kept, type=pa.int64()))
    new = _store_version(session, settings, r, q, scene, table, stats, revision, suppressed)
    try:
        r.status, r.decided_at = "superseded", utcnow()
        q.result_id = new.id
        session.add_all([r, q])
        _audit_decision(session, principal, f"result.{action}", r, reason, request_id, new_result_id=new.id,
                        new_version=new.version)
        session.commit()
    except BaseException:
        session.rollback()
        _remove_version_files(settings, new, r)
        raise
    session.refresh(new)
    return new


def _remove_version_files(settings: Settings, new: QueryResult, parent: QueryResult) -> None:
    """The files of a version that was not recorded (its statistics only when they are its own)."""
    (settings.results_dir / new.storage_path).unlink(missing_ok=True)
    if new.stats_path and new.stats_path != parent.stats_path:
        (settings.results_dir / new.stats_path).unlink(missing_ok=True)


def _result_columns(r: QueryResult) -> tuple[list[str], list[str]]:
    """(key columns, value columns) of an aggregate result, from its stored column list and notes."""
    meta = (r.report or {}).get("columns") or {}
    keys = list(meta.get("keys", []))
    values = list(meta.get("values", []))
    return keys, values


SCALARS = (str, int, float, bool, type(None))


def _match_cells(table: pa.Table, keys: list[str], cells: list[Any]) -> list[dict[str, Any]]:
    """The named cells as they are in the table (422 for a cell that is malformed or not there):
    each names exactly the key columns, with plain values."""
    present = {tuple(_norm(v) for v in row): row for row in
               (tuple(r[k] for k in keys) for r in table.select(keys).to_pylist())}
    out = []
    for c in cells:
        if (not isinstance(c, dict) or set(c) != set(keys)
                or not all(isinstance(v, SCALARS) for v in c.values())):
            raise invalid("bad_cell", "Each cell names exactly the result's key columns, with plain values.",
                          "每个单元格须恰好用结果的全部分组键列指定，取值为简单值。", details={"keys": keys})
        at = tuple(_norm(c[k]) for k in keys)
        if at not in present:
            raise invalid("unknown_cell", "A named cell is not in the result.", "指定的单元格不在结果中。",
                          details={"keys": keys})
        out.append(dict(zip(keys, (_jsonable(v) for v in present[at]))))
    return out


def _jsonable(v: Any) -> Any:
    return v.isoformat() if isinstance(v, (dt.date, dt.datetime)) else v


def _failing_cells(r: QueryResult) -> list[dict[str, Any]]:
    """The cells `cells="failing"` suppresses. Of a DP aggregate, only those a check on the released
    answer itself names (`noisy_counts`): suppressing the cells an exact-statistic check names would
    publish that check's verdict — which cells hold fewer than k persons — whatever the ε."""
    on_the_answer = disclosure.AUTO_RELEASE_CHECKS if r.kind == "aggregate" else None
    seen, out = set(), []
    for c in (r.report or {}).get("checks", []):
        if on_the_answer is not None and c.get("name") not in on_the_answer:
            continue
        if c.get("verdict") in ("fail", "review"):
            for cell in c.get("cells") or []:
                marker = tuple(sorted((k, str(v)) for k, v in cell.items()))
                if marker not in seen:
                    seen.add(marker)
                    out.append(cell)
    return out


def _rows_outside_failing_classes(r: QueryResult, table: pa.Table) -> list[int]:
    """The rows of `table` in no class that fails k-anonymity or l-diversity (`table` carries the
    linked columns when the scene links pseudonyms: the classes may name them)."""
    failing = [c for c in (r.report or {}).get("checks", []) if c.get("name") in ("k_anonymity", "l_diversity")
               and c.get("verdict") != "pass"]
    classes = {tuple(sorted((k, str(v)) for k, v in cell.items())) for c in failing for cell in c.get("cells") or []}
    if not classes:
        raise invalid("nothing_to_suppress", "No row fails k-anonymity or l-diversity.", "没有违反 k-匿名或 l-多样性的行。")
    keep = []
    for i, row in enumerate(table.to_pylist()):
        for cls in classes:
            if all(str(disclosure._json_value(row.get(k))) == v for k, v in cls):
                break
        else:
            keep.append(i)
    return keep


def _store_version(session: Session, settings: Settings, parent: QueryResult, q: Query, scene: Scene,
                   table: pa.Table, stats: pa.Table | None, revision: dict[str, Any],
                   suppressed: list[dict[str, Any]] | None) -> QueryResult:
    rel, digest = store_table(settings, q.scene_id, f"q{q.id}-v{parent.version + 1}-{uuid.uuid4().hex[:12]}.parquet",
                              table)
    # an aggregate's versions share the statistics (a revision drops cells when checking); a row
    # answer's version has its own identities, aligned with its rows
    stats_path = parent.stats_path
    try:
        if parent.kind == "rows" and stats is not None and ROW_KEY in stats.column_names:
            stats_path = write_stats(settings, stats, rel)
        return _version_row(session, settings, parent, q, scene, table, stats, revision, suppressed, rel, digest,
                            stats_path)
    except BaseException:
        (settings.results_dir / rel).unlink(missing_ok=True)
        if stats_path and stats_path != parent.stats_path:
            (settings.results_dir / stats_path).unlink(missing_ok=True)
        raise


def _version_row(session: Session, settings: Settings, parent: QueryResult, q: Query, scene: Scene,
                 table: pa.Table, stats: pa.Table | None, revision: dict[str, Any],
                 suppressed: list[dict[str, Any]] | None, path: str, digest: str, stats_path: str | None) -> QueryResult:
    report = _recheck(session, settings, parent, scene, q, table, stats, suppressed, revision)
    new = QueryResult(query_id=q.id, version=parent.version + 1, parent_id=parent.id, revision=revision,
                      scene_id=parent.scene_id, org_id=parent.org_id, synthetic=False, kind=parent.kind, status="held",
                      columns=[{"name": f.name, "type": str(f.type)} for f in table.schema], row_count=table.num_rows,
                      noise=parent.noise, epsilon_spent=parent.epsilon_spent, notes=parent.notes,
                      storage_path=path, sha256=digest,
                      report=report, stats_path=stats_path, content_fp=content_fp(settings, table))
    session.add(new)
    session.flush()
    return new


def _recheck(session: Session, settings: Settings, parent: QueryResult, scene: Scene, q: Query, table: pa.Table,
             stats: pa.Table | None, suppressed: list[dict[str, Any]] | None, revision: dict[str, Any]) -> dict[str, Any]:
    """The checks again on the new version: the same statistics without the suppressed cells, the
    output's own checks on the new output (a row answer's against the scene's other row answers
    too, with the identities of the rows it kept)."""
    t = thresholds(scene)
    old = parent.report or {}
    keys, values = _result_columns(parent)
    checks: list[Any] = []
    if parent.kind == "aggregate":
        if stats is not None:
            s = _drop_cells(stats, keys, suppressed) if suppressed else stats
            checks += disclosure.aggregate_checks(s, keys, old.get("columns", {}).get("sums", values), t, dp=True)
        checks.append(disclosure.budget_check(parent.epsilon_spent, q.epsilon, scene.epsilon_spent,
                                              scene.budget_epsilon))
    elif "template" in old:   # a template run: its rows are not a dataset's (see scene_row_answers)
        cols = old.get("columns", {})
        checks += disclosure.rows_checks(table, cols.get("quasi_identifiers", []), cols.get("sensitive", []), t,
                                         persons=None)
    else:
        cols = old.get("columns", {})
        checks += linked_rows_checks(session, settings, scene, q.id, table, cols, persons=None)
        keys = stats[ROW_KEY].to_pylist() if stats is not None and ROW_KEY in stats.column_names else None
        checks.append(differencing(session, settings, scene, q.id, keys, ("held", "released")))
    checks.append(disclosure.pii_check(table))
    report = disclosure.report(checks)
    report["columns"] = old.get("columns", {})
    report["revision"] = {k: v for k, v in revision.items() if k != "suppressed_cells"}
    return report


# ---------------------------------------------------------------------------------------------
# 4. Download


@dataclass
class ExportFile:
    """A download: its bytes (`data`), or with `spool=True` an open file of them (`file`, already
    removed from the staging folder: it is gone once closed) and their `size`."""

    data: bytes
    media_type: str
    filename: str
    export: ResultExport
    synthetic: bool
    file: BinaryIO | None = None
    size: int = 0
    slot: read_slots.Slot | None = None   # with `file`: the user's read slot, held until the stream ends

    def close(self) -> None:
        """The stream ended (sent, cut or failed): the file goes, the read slot comes back."""
        try:
            if self.file is not None:
                self.file.close()
        finally:
            if self.slot is not None:
                self.slot.release()


EXPORT_BATCH_ROWS = 16_384     # rows of a result read, converted and written at a time by a download


def export(session: Session, settings: Settings, principal: Principal, result_id: int, fmt: str,
           request_id: str | None = None, *, spool: bool = False) -> ExportFile:
    """A stamped file of a released result (or the tenant's own dev answer), recorded with its hash
    and its audit event in one transaction. Commits.

    The file is written into the staging folder a batch of rows at a time (`fingerprint.write_*`:
    the same bytes as the whole table at once), then hashed, recorded, and handed back as bytes or,
    with `spool`, as an open file for the route to stream: memory stays at a batch whatever the
    result's size. A user runs at most `read_slots.MAX_READS_PER_USER` downloads and reads at once
    (429 `too_many_reads`); a spooled download keeps its slot until the caller's `ExportFile.close()`."""
    r = get_result(session, principal, result_id)
    if not (principal.role is Role.applicant and cells_visible(principal, r)):
        raise forbidden("result_not_released", "Only released results (or your own dev answers) can be downloaded.",
                        "只能下载已放行的结果（或本单位的开发模式结果）。")
    if r.expired_at is not None:
        raise answer_expired(r)
    read_slots.charge_rows(principal, r.row_count, settings)
    source = settings.results_dir / r.storage_path
    slot = read_slots.take(principal)
    try:
        key = fingerprint_key(settings)
        content = r.content_fp or fingerprint.content_fingerprint(key, pq.read_table(source))
        export_id = f"ex-{uuid.uuid4().hex[:20]}"
        stamp = {"export_id": export_id, "fingerprint": fingerprint.export_stamp(key, export_id, content),
                 "result_id": r.id, "query_id": r.query_id, "version": r.version, "synthetic": r.synthetic}
        settings.staging_dir.mkdir(parents=True, exist_ok=True)
        staged = settings.staging_dir / f"{export_id}.{fmt}"
        try:
            with pq.ParquetFile(source) as f, staged.open("wb") as out:
                schema = f.schema_arrow.remove_metadata()
                batches = (b.replace_schema_metadata(None) for b in f.iter_batches(batch_size=EXPORT_BATCH_ROWS))
                if fmt == "parquet":
                    fingerprint.write_parquet(out, schema, batches, stamp)
                elif fmt == "json":
                    fingerprint.write_json(out, schema, batches, stamp, {"result_id": r.id, "query_id": r.query_id,
                                                                          "synthetic": r.synthetic, "noise": r.noise})
                else:
                    fingerprint.write_csv(out, schema, batches, stamp)
            with staged.open("rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            size = staged.stat().st_size
            row = ResultExport(export_id=export_id, result_id=r.id, user_id=principal.user_id, org_id=principal.org_id,
                               format=fmt, fingerprint=stamp["fingerprint"], content_fp=content, sha256=digest,
                               size_bytes=size)
            session.add(row)
            session.flush()
            audit.append(session, request_id=request_id, actor=principal.username, org=principal.org_code,
                         role=principal.role.value, auth_method=principal.auth_method, action="result.export",
                         object=f"export:{export_id}", scene_id=r.scene_id, decision="allow", reason=None,
                         detail={"result_id": r.id, "format": fmt, "sha256": row.sha256, "synthetic": r.synthetic})
            session.commit()
            handle = staged.open("rb") if spool else None
            data = b"" if spool else staged.read_bytes()
        except BaseException:
            session.rollback()
            raise
        finally:
            staged.unlink(missing_ok=True)     # an open handle still reads it; the name is gone
    except BaseException:
        slot.release()
        raise
    if not spool:
        slot.release()
    return ExportFile(data, FORMATS[fmt], f"result-{r.id}-{export_id}.{fmt}", row, r.synthetic, handle, size,
                      slot if spool else None)


# ---------------------------------------------------------------------------------------------
# 5. Lineage and trace


def _user(session: Session, user_id: int | None) -> dict[str, Any] | None:
    if user_id is None:
        return None
    u = session.get(User, user_id)
    org = session.get(Organization, u.org_id)
    return {"username": u.username, "org": org.code, "org_name": org.name_zh, "role": u.role}


def lineage(session: Session, principal: Principal, result_id: int) -> dict[str, Any]:
    """Result → query → scene → authorization → dataset versions, with the reviews and exports."""
    r = get_result(session, principal, result_id)
    return _lineage(session, r, principal)


def _lineage(session: Session, r: QueryResult, principal: Principal | None) -> dict[str, Any]:
    q = session.get(Query, r.query_id)
    scene = session.get(Scene, r.scene_id)
    versions = session.exec(select(QueryResult).where(QueryResult.query_id == q.id).order_by(QueryResult.version)).all()
    ids = [v.id for v in versions]
    reviews = session.exec(select(ResultReview).where(ResultReview.result_id.in_(ids)).order_by(ResultReview.id)).all()
    tenant = principal is not None and _tenant_scoped(principal)
    if tenant:   # the decision, not the deliberation (see `current_and_first`)
        current, _ = current_and_first(session, r)
        if current.status != "released":
            versions = [v for v in versions if v.version == 1]
            r = as_tenant_sees(session, r)
            versions = [as_tenant_sees(session, v) for v in versions]
        reviews = [v for v in reviews if v.decision == "reject"]
    exports = session.exec(select(ResultExport).where(ResultExport.result_id.in_(ids)).order_by(ResultExport.id)).all()
    approvals = session.exec(select(SceneReview).where(SceneReview.scene_id == scene.id, SceneReview.round == scene.round)
                             .order_by(SceneReview.id)).all()
    staff = principal is None or is_staff(principal)

    def shown(v: QueryResult) -> bool:   # a held file's hash would confirm a guess of its cells
        return staff or v.synthetic or v.status == "released"

    return {
        "result": {"id": r.id, "version": r.version, "status": r.status, "kind": r.kind, "synthetic": r.synthetic,
                   "sha256": r.sha256 if shown(r) else None,
                   "content_fingerprint": r.content_fp if shown(r) else None, "released_by": r.released_by,
                   "decided_at": r.decided_at, "created_at": r.created_at,
                   "verdict": (r.report or {}).get("verdict") if staff else None},
        "versions": [{"id": v.id, "version": v.version, "status": v.status, "parent_id": v.parent_id,
                      "revision": revision_view(principal, v), "sha256": v.sha256 if shown(v) else None,
                      "created_at": v.created_at}
                     for v in versions],
        "query": {"id": q.id, "mode": q.mode, "kind": q.kind, "sql": q.sql_text, "checked_sql": q.checked_sql,
                  "epsilon": q.epsilon, "epsilon_spent": q.epsilon_spent, "max_contributions": q.max_contributions,
                  "status": q.status, "requester": _user(session, q.requester_id), "created_at": q.created_at,
                  "finished_at": q.finished_at},
        "scene": {"id": scene.id, "title": scene.title, "org": _user_org(session, scene.org_id),
                  "status": scene.status, "valid_from": scene.valid_from, "valid_to": scene.valid_to,
                  "policy_version_at_query": q.policy_version, "release_policy": release_policy(scene).model_dump(),
                  "approvals": [{"reviewer": _user(session, a.reviewer_id), "decision": a.decision,
                                 "comment": a.comment, "at": a.created_at} for a in approvals]},
        "authorization": [{"dataset": d, "field": f, "usage": u} for d, f, u in (q.uses or [])],
        "uploads": _upload_lineage(session, q),
        "datasets": [_version_lineage(session, v) for v in _query_versions(session, q, r)],
        # an override says a check failed (an exact statistic): staff only, like the report
        "reviews": [{"result_id": v.result_id, "reviewer": _user(session, v.reviewer_id), "decision": v.decision,
                     "reason": v.reason, "override": v.override if staff else None,
                     "overridden_checks": v.overridden_checks if staff else None, "at": v.created_at}
                    for v in reviews],
        "release": release_rule(session, r) if staff and r.status == "held" and not r.synthetic else None,
        "exports": [{"export_id": e.export_id, "result_id": e.result_id, "format": e.format,
                     "by": _user(session, e.user_id), "sha256": e.sha256, "size_bytes": e.size_bytes,
                     "at": e.created_at} for e in exports
                    if principal is None or not _tenant_scoped(principal) or e.org_id == principal.org_id],
    }


def revision_view(principal: Principal | None, r: QueryResult) -> dict[str, Any] | None:
    """What a reviewer changed. Staff see it all; the tenant learns what was suppressed or rounded
    only with the cells, once released (before, a revision would say which check failed)."""
    rev = r.revision
    if not rev:
        return None
    if principal is None or is_staff(principal):
        return public_revision(rev)
    if r.status != "released":
        return None
    return {k: v for k, v in rev.items() if k in ("action", "from_version", "columns", "base", "cells", "rows_removed")}


def as_tenant_sees(session: Session, r: QueryResult) -> QueryResult:
    """The first version of an answer not yet released, as its tenant sees it: held (or rejected,
    when the review ended so), undecided by anyone in particular, never revised. A detached copy."""
    if r.synthetic or r.version != 1:
        return r
    current, first = current_and_first(session, r)
    if current.status == "released":
        return r
    shown = QueryResult.model_validate(first.model_dump())
    shown.status = "rejected" if current.status == "rejected" else "held"
    shown.decided_at = current.decided_at if current.status == "rejected" else None
    shown.released_by, shown.revision = None, None
    return shown


def _query_versions(session: Session, q: Query, r: QueryResult) -> list[DatasetVersion]:
    """Every dataset version a query read: one for a query, each a template read (its report
    records them)."""
    pinned = ((r.report or {}).get("template") or {}).get("versions") or {}
    ids = [v["version_id"] for _, v in sorted(pinned.items())] or [q.version_id]
    return [session.get(DatasetVersion, i) for i in ids]


def _version_lineage(session: Session, v: DatasetVersion) -> dict[str, Any]:
    ds = session.get(Dataset, v.dataset_id)
    return {"code": ds.code, "title": ds.title_zh, "version": v.number, "version_id": v.id, "env": v.env,
            "dataset_revision": v.dataset_revision, "sha256": v.sha256, "row_count": v.row_count,
            "loaded_at": v.created_at, "loaded_by": _user(session, v.loaded_by)}


def pinned_upload(session: Session, q: Query) -> TenantUpload | None:
    """The version of the tenant's own table a query joins (`Query.upload` = "name@v<n>")."""
    if not q.upload:
        return None
    name, _, version = q.upload.rpartition("@v")
    return session.exec(select(TenantUpload).where(TenantUpload.org_id == q.org_id, TenantUpload.name == name,
                                                   TenantUpload.version == int(version))).first()


def _upload_lineage(session: Session, q: Query) -> list[dict[str, Any]]:
    """The tenant's own table a query joined, pinned at submission (metadata only)."""
    u = pinned_upload(session, q)
    if u is None:
        return []
    return [{"name": u.name, "version": u.version, "sha256": u.sha256, "row_count": u.row_count,
             "uploaded_by": _user(session, u.uploaded_by), "at": u.created_at}]


def public_revision(revision: dict[str, Any] | None) -> dict[str, Any] | None:
    if not revision:
        return None
    return {k: v for k, v in revision.items() if k in ("action", "by", "reason", "from_version", "cells", "columns",
                                                      "base", "rows_removed")}


def _user_org(session: Session, org_id: int) -> dict[str, Any]:
    org = session.get(Organization, org_id)
    return {"code": org.code, "name": org.name_zh}


def trace(session: Session, settings: Settings, data: bytes, filename: str | None = None) -> dict[str, Any]:
    """Name the export, query, scene, datasets and versions, requester and reviewers of a file found
    outside.

    1. A stamp (export id + keyed fingerprint) that is genuine AND belongs to these cells names its
       export exactly (`match: "stamp"`).
    2. Else the cells: every result whose content fingerprint they match (`match: "content"`). Two
       tenants can get identical cells from the same query; then all are listed (`ambiguous`) and
       none is picked. A genuine stamp of other cells is reported (`stamp_matches_cells: false`).
    3. Else the nearest exported result of the same shape, if nearly every row matches
       (`match: "similar"`: a spreadsheet that kept fewer digits).
    4. A genuine stamp on altered cells names its export as `match: "stamp_only"`; a stamp that is
       not genuine matches nothing."""
    try:
        found = fingerprint.read_found(data, filename)
    except fingerprint.FoundFileError as e:
        raise PdaoError(e.status, e.code, e.message, e.message_zh) from None
    key = fingerprint_key(settings)
    candidates = set(fingerprint.match_candidates(key, found))
    stamp = found.stamp or None
    stamped, stamp_valid = _stamped_export(session, key, stamp)
    stamp_matches_cells = None if stamped is None or not stamp_valid else stamped.content_fp in candidates
    base = {"stamp": _stamp_view(stamp), "stamp_valid": stamp_valid, "stamp_matches_cells": stamp_matches_cells}

    if stamped is not None and stamp_valid and stamp_matches_cells:
        r = session.get(QueryResult, stamped.result_id)
        return _traced(session, r, base, "stamp", export_id=stamped.export_id)
    results = []
    if candidates:
        # only results that left the domain: a found file came from a download, and matching results
        # never exported would let a tracer confirm a guess of cells they may not see
        exported = select(ResultExport.result_id).distinct()
        results = list(session.exec(select(QueryResult).where(QueryResult.content_fp.in_(sorted(candidates)),
                                                              QueryResult.id.in_(exported))
                                    .order_by(QueryResult.id)).all())
    if len(results) == 1:
        return _traced(session, results[0], base, "content")
    if len(results) > 1:
        return {**base, "matched": True, "match": "content", "ambiguous": True, "cells_intact": True,
                "export_id": None, "result_id": None,
                "matches": [_traced(session, r, {}, "content") for r in results],
                "message": f"{len(results)} results hold exactly these cells; each is listed.",
                "message_zh": f"共有 {len(results)} 个结果的内容与该文件完全相同，均已列出。"}
    similar = _most_similar(session, settings, found)
    if similar is not None:
        return _traced(session, similar[0], base, "similar", similarity=round(similar[1], 4))
    if stamped is not None and stamp_valid:
        r = session.get(QueryResult, stamped.result_id)
        return _traced(session, r, base, "stamp_only", export_id=stamped.export_id)
    return {**base, "matched": False, "match": None,
            "message": "No export matches this file's cells or stamp.",
            "message_zh": "没有与该文件内容或标记相符的导出记录。"}


def _stamped_export(session: Session, key: bytes, stamp: dict[str, Any] | None) -> tuple[ResultExport | None, bool | None]:
    """The export a stamp names, and whether the stamp is genuine (the fingerprint recorded for
    that export, and the server's HMAC over its id and recorded content)."""
    if not stamp or not stamp.get("export_id"):
        return None, None
    e = session.exec(select(ResultExport).where(ResultExport.export_id == str(stamp["export_id"])[:40])).first()
    if e is None:
        return None, False
    genuine = (hmac.compare_digest(str(stamp.get("fingerprint", "")), e.fingerprint)
               and fingerprint.verify_stamp(key, stamp, e.content_fp))
    return e, genuine


def _traced(session: Session, r: QueryResult, base: dict[str, Any], match: str, *, export_id: str | None = None,
            similarity: float | None = None) -> dict[str, Any]:
    exports = session.exec(select(ResultExport).where(ResultExport.result_id == r.id).order_by(ResultExport.id)).all()
    lineage_ = _lineage(session, r, None)
    if export_id is None and len(exports) == 1:
        export_id = exports[0].export_id   # the only file of these cells that ever left
    return {
        **base, "matched": True, "match": match, "ambiguous": False, "cells_intact": match in ("stamp", "content"),
        "similarity": similarity, "export_id": export_id, "candidate_exports": [e.export_id for e in exports],
        "result_id": r.id, "query_id": r.query_id, "scene_id": r.scene_id,
        "org": lineage_["scene"]["org"], "requester": lineage_["query"]["requester"],
        "reviewers": [v["reviewer"] for v in lineage_["reviews"]], "released_by": r.released_by,
        "lineage": lineage_,
    }


SIMILAR_ENOUGH = 0.99       # share of rows matching (numbers within 1e-5) for a "similar" match
SIMILARITY_SCAN = 200       # released results compared at most, newest first


def _most_similar(session: Session, settings: Settings, found: Any) -> tuple[QueryResult, float] | None:
    """The fallback when no fingerprint matches (a spreadsheet kept fewer digits): compare with
    the newest exported results of the same shape, and name one only if nearly every row matches."""
    ncols = {len(c[0]) for c in found.candidates if c}
    nrows = {len(c) for c in found.candidates}
    if not ncols:
        return None
    exported = select(ResultExport.result_id).distinct()
    stmt = (select(QueryResult).where(QueryResult.id.in_(exported)).order_by(QueryResult.id.desc())
            .limit(SIMILARITY_SCAN))
    best: tuple[QueryResult, float] | None = None
    for r in session.exec(stmt).all():
        if len(r.columns) not in ncols or not any(abs(r.row_count - n) <= 1 for n in nrows):
            continue
        score = fingerprint.similarity(found, pq.read_table(settings.results_dir / r.storage_path))
        if score >= SIMILAR_ENOUGH and (best is None or score > best[1]):
            best = (r, score)
    return best


def _stamp_view(stamp: dict[str, Any] | None) -> dict[str, Any] | None:
    if not stamp:
        return None
    return {k: stamp.get(k) for k in ("export_id", "fingerprint", "result_id", "query_id", "version") if k in stamp}


# ---------------------------------------------------------------------------------------------
# Housekeeping


def expire_dev_answers(session: Session, settings: Settings, now: dt.datetime | None = None) -> int:
    """Remove the files of dev answers made more than `dev_answer_days` ago; their rows stay, marked
    `expired_at` (rows and downloads then answer 410 `answer_expired`). Commits; how many expired."""
    now = now or utcnow()
    old = session.exec(select(QueryResult).where(QueryResult.synthetic == True,  # noqa: E712
                                                 QueryResult.expired_at.is_(None),
                                                 QueryResult.created_at < now - dt.timedelta(days=settings.dev_answer_days))
                       .limit(1000)).all()
    for r in old:
        r.expired_at = now
        session.add(r)
    session.commit()       # marked first: a file is never missing under a row that says it is there
    for r in old:
        for rel in (r.storage_path, r.stats_path):
            if rel:
                (settings.results_dir / rel).unlink(missing_ok=True)
    return len(old)


def answer_expired(r: QueryResult) -> PdaoError:
    return PdaoError(410, "answer_expired",
                     "This dev answer was removed (dev answers are kept for a limited time); run the query again.",
                     "该开发模式结果已删除（开发模式结果仅保留一段时间），请重新运行查询。",
                     details={"expired_at": r.expired_at.isoformat() if r.expired_at else None})


def sweep_orphans(session: Session, settings: Settings, older_than_seconds: float = 24 * 3600) -> int:
    """Remove result-store files no result row points at: what a crash between writing a file and
    committing its row left behind (a worker's answer, a reviewer's version). Only files older
    than a day: a live store step takes seconds. Answers how many were removed."""
    import time

    root = settings.results_dir
    if not root.exists():
        return 0
    known = set()
    for path, stats in session.exec(select(QueryResult.storage_path, QueryResult.stats_path)).all():
        known.add(path)
        if stats:
            known.add(stats)
    cutoff = time.time() - older_than_seconds
    removed = 0
    for f in root.glob("scene-*/*"):
        rel = str(f.relative_to(root))
        if f.is_file() and rel not in known and f.lstat().st_mtime < cutoff:
            f.unlink(missing_ok=True)
            removed += 1
    return removed

