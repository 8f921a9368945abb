"""The scene service: applications, the review workflow, suspension and revocation, and the one
function that decides whether a tenant may use a field a certain way in a scene now.

Every change to a scene's authorization writes its casbin rows in the same transaction as its
status, and bumps `policy_version` so every process reloads that scene on its next request.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, or_
from sqlalchemy import update as sql_update
from sqlmodel import Session, select

from catalog.models import Dataset, DatasetField
from pdao.kernel.config import Settings
from pdao.kernel.db import id_in_range, utcnow
from pdao.kernel.errors import PdaoError, conflict, forbidden, invalid, not_found
from pdao.kernel.identity.models import Organization, Role, User
from pdao.kernel.identity.service import Principal
from policies import access
from policies.catalog_rules import CatalogScope, catalog_scope
from policies.enforcer import SceneEnforcers, role_may, scene_domain, scene_policy_rows
from policies.models import CasbinRule
from policies.rules import FieldFacts, Verdict, item_verdict
from sandbox.budgets.ledger import (
    SceneDatasetBudget,
    budget_scope,
    scene_dataset_budgets,
)
from sandbox.scenes import states
from sandbox.scenes.models import (
    Scene,
    SceneEvent,
    SceneItem,
    SceneReview,
    SceneTemplate,
)
from sandbox.scenes.schemas import (
    Approvals,
    Budget,
    EffectiveItem,
    EventOut,
    Explanation,
    ItemIn,
    ItemOut,
    Problem,
    ReleasePolicy,
    ReviewIn,
    ReviewOut,
    SceneIn,
    SceneOut,
    ScenePatch,
    SceneSummary,
    TemplateIn,
    TemplateOut,
)
from sandbox.scenes.states import today_in_city

MAX_EPSILON = 10.0      # a scene's whole budget
MAX_DELTA = 1e-5


class SceneView(SceneOut):
    """A scene as `GET /scenes/{id}` shows it: with, per dataset on its data list, the company's
    budget across all its scenes (`sandbox.budgets.ledger.scene_dataset_budgets`) for those who may read
    that company's budgets (the office, auditors, the tenant itself); None for everyone else."""

    company_budgets: list[SceneDatasetBudget] | None = None


# --- rules that refuse an application -------------------------------------------------------

def has_public_domain(f: DatasetField) -> bool:
    """Whether a field's values can be listed from the catalog alone (what a group key needs):
    a category list, a boolean, or an integer or date range given by its bounds."""
    return bool(f.domain) or f.type == "boolean" or (f.type in ("integer", "date", "timestamp") and bool(f.bounds))


def field_facts(session: Session, pairs: Iterable[tuple[str, str]], scope: CatalogScope | None = None
                ) -> dict[tuple[str, str], FieldFacts]:
    """Catalog facts of (dataset, field) pairs, in two queries. With the caller's `scope`, a dataset
    outside it has no facts, exactly like a missing one: a tenant's application, or explain, must not
    tell a prohibited dataset (or its fields) from one that does not exist."""
    pairs = set(pairs)
    codes = {d for d, _ in pairs}
    if not codes:
        return {}
    rows = session.exec(select(Dataset, DatasetField).join(DatasetField, DatasetField.dataset_id == Dataset.id)
                        .where(Dataset.code.in_(sorted(codes)))).all()
    if scope is not None:
        rows = [(ds, f) for ds, f in rows if scope.allows(ds.opening_class, ds.source_org_id)]
    return {(ds.code, f.name): FieldFacts(
        dataset=ds.code, field=f.name, dataset_grade=ds.grade, opening_class=ds.opening_class, field_grade=f.grade,
        sensitivity=f.sensitivity, masking=f.masking, has_domain=has_public_domain(f),
        is_privacy_unit=ds.privacy_unit == f.name,
    ) for ds, f in rows if (ds.code, f.name) in pairs}


def item_problems(session: Session, items: list[ItemIn] | list[SceneItem], scope: CatalogScope | None = None
                  ) -> list[Problem]:
    facts = field_facts(session, ((i.dataset, i.field) for i in items), scope)
    out = []
    seen: set[tuple[str, str, str]] = set()
    for n, i in enumerate(items):
        key = (i.dataset, i.field, i.usage)
        if key in seen:
            out.append(Problem(where=f"items[{n}]", item=n, rule="duplicate_item",
                               message=f"{i.dataset}.{i.field} as {i.usage} is listed twice",
                               message_zh=f"{i.dataset}.{i.field}（{i.usage}）重复列出"))
            continue
        seen.add(key)
        v = item_verdict(facts.get((i.dataset, i.field)), i.usage, i.dataset, i.field)
        if not v.allowed:
            out.append(Problem(where=f"items[{n}]", item=n, rule=v.rule, message=v.message, message_zh=v.message_zh))
    return out


MAX_START_DAYS_AHEAD = 90  # an approval is for a use that starts soon, not a dormant one


def application_problems(app: SceneIn, settings: Settings, *, at_approval: bool = False) -> list[Problem]:
    """Rules on the application itself (not its items). At approval the start may have passed
    while it waited for review; everything else must still hold."""
    out = []
    today = today_in_city(utcnow())

    def no(where: str, rule: str, en: str, zh: str) -> None:
        out.append(Problem(where=where, rule=rule, message=en, message_zh=zh))

    if not app.emergency_plan.strip():
        no("emergency_plan", "emergency_plan_required",
           "every authorization needs an emergency plan (一授权一预案)", "每项授权都必须附应急预案（一授权一预案）")
    if not app.legal_basis.strip():
        no("legal_basis", "legal_basis_required", "the legal basis is required", "必须写明法律依据")
    if app.valid_to < today:
        no("valid_to", "validity_in_past", "the validity window has already ended", "有效期已过")
    elif app.valid_from < today and not at_approval:
        no("valid_from", "validity_backdated", "the validity window cannot start before today", "有效期不能早于今天开始")
    elif (app.valid_from - today).days > MAX_START_DAYS_AHEAD:
        no("valid_from", "validity_starts_too_late",
           f"the validity window must start within {MAX_START_DAYS_AHEAD} days",
           f"有效期须在 {MAX_START_DAYS_AHEAD} 天内开始")
    elif app.valid_to < app.valid_from:
        no("valid_to", "validity_order", "valid_to is before valid_from", "有效期截止日早于起始日")
    elif (app.valid_to - app.valid_from).days + 1 > settings.scene_max_validity_days:
        no("valid_to", "validity_too_long",
           f"the validity window is longer than the maximum of {settings.scene_max_validity_days} days",
           f"有效期超过 {settings.scene_max_validity_days} 天的上限")
    if app.budget_epsilon > MAX_EPSILON:
        no("budget_epsilon", "budget_too_large", f"a scene's ε budget may not exceed {MAX_EPSILON:g}",
           f"场景的 ε 预算不得超过 {MAX_EPSILON:g}")
    if app.budget_delta > MAX_DELTA:
        no("budget_delta", "delta_too_large", f"δ may not exceed {MAX_DELTA:g}", f"δ 不得超过 {MAX_DELTA:g}")
    if app.max_query_epsilon > app.budget_epsilon:
        no("max_query_epsilon", "query_cap_above_budget", "the per-query ε cap is above the scene's budget",
           "单次查询 ε 上限高于场景总预算")
    return out


def resolve_templates(templates: list[TemplateIn]) -> tuple[list[Any], list[Problem]]:
    """The applied-for templates as `sandbox.templates.library.Template`s, and what is wrong with their
    shape (an unknown shipped name, a malformed definition, two with one name)."""
    from sandbox.templates import (
        library as tpl,  # pure: parses and checks, reads no rows
    )

    out, problems, names = [], [], set()
    for n, t in enumerate(templates):
        where = f"templates[{n}]"
        try:
            template = tpl.library_template(t.library) if t.library else tpl.template_from_mapping(t.definition)
        except KeyError:
            problems.append(Problem(where=where, item=n, rule="template_unknown",
                                    message=f"no shipped template is named {t.library!r}",
                                    message_zh=f"没有名为 {t.library!r} 的内置分析模板"))
            continue
        except tpl.TemplateRefused as e:
            problems += [Problem(where=where, item=n, rule="template_refused", message=p.message,
                                 message_zh=p.message_zh) for p in e.problems]
            continue
        if template.name in names:
            problems.append(Problem(where=where, item=n, rule="template_duplicate",
                                    message=f"two templates are named {template.name}",
                                    message_zh=f"有两个模板都名为 {template.name}"))
        names.add(template.name)
        out.append(template)
    return out, problems


def template_catalog(session: Session, scope: CatalogScope | None = None) -> dict[str, Any]:
    """The metadata database's catalog as the template checker reads it: every dataset's fields with
    their types, sensitivity and PII kind (keys and direct identifiers are told apart by these); with
    the caller's `scope`, only the datasets it may see (others are unknown to it)."""
    from sandbox.engine.execute import DatasetMeta

    return {ds.code: DatasetMeta.from_fields(ds.code, ds.privacy_unit, session.exec(
                select(DatasetField).where(DatasetField.dataset_id == ds.id).order_by(DatasetField.position)).all())
            for ds in session.exec(select(Dataset)).all()
            if scope is None or scope.allows(ds.opening_class, ds.source_org_id)}


def template_disclosure(session: Session, definition: dict[str, Any]) -> dict[str, Any] | None:
    """What the office sees of a template before approving it: the fields each output depends on,
    and how many value combinations all outputs can take per field (`sandbox.templates.library`)."""
    from sandbox.templates import library as tpl

    try:
        return tpl.template_disclosure(tpl.template_from_mapping(definition), template_catalog(session))
    except PdaoError:
        return None     # a template the catalog no longer accepts: approval refuses it with reasons


def template_problems(session: Session, templates: list[TemplateIn], items: list[ItemIn] | list[SceneItem],
                      scope: CatalogScope | None = None) -> list[Problem]:
    """Each template must be approvable (`sandbox.templates.library.check_template`: every output a
    declared derived value, never a source field; one SELECT; known tables, columns and functions)
    and read only fields on the scene's own data list, so the office reviews every field it touches."""
    from sandbox.templates import library as tpl

    resolved, problems = resolve_templates(templates)
    if not resolved:
        return problems
    catalog = template_catalog(session, scope)
    listed = {(i.dataset, i.field) for i in items}
    for n, template in enumerate(resolved):
        where = f"templates[{template.name}]"
        found = tpl.check_template(template, catalog)
        problems += [Problem(where=where, item=n, rule="template_refused", message=p.message, message_zh=p.message_zh)
                     for p in found]
        if found:
            continue
        for d, f in sorted(tpl.template_reads(template, catalog) - listed):
            problems.append(Problem(where=where, item=n, rule="template_reads_unlisted",
                                    message=f"template {template.name} reads {d}.{f}, which is not on the data list",
                                    message_zh=f"模板 {template.name} 读取 {d}.{f}，但该字段不在数据清单中"))
    return problems


def _replace_templates(session: Session, scene: Scene, templates: list[TemplateIn]) -> None:
    from sandbox.templates import library as tpl

    session.exec(delete(SceneTemplate).where(SceneTemplate.scene_id == scene.id))
    session.flush()
    resolved, _ = resolve_templates(templates)
    for t in resolved:
        session.add(SceneTemplate(scene_id=scene.id, name=t.name, version=t.version, definition=t.as_dict(),
                                  digest=tpl.template_digest(t)))


def scene_templates(session: Session, scene: Scene) -> list[SceneTemplate]:
    return list(session.exec(select(SceneTemplate).where(SceneTemplate.scene_id == scene.id)
                             .order_by(SceneTemplate.id)).all())


def refuse_if_any(problems: list[Problem]) -> None:
    if problems:
        raise invalid("scene_refused", f"The application is refused: {len(problems)} problem(s); see details.",
                      f"申请被拒绝：共 {len(problems)} 处问题，详见 details。",
                      details=[p.model_dump() for p in problems])


# --- visibility -------------------------------------------------------------------------------

def may_see(session: Session, principal: Principal, scene: Scene) -> bool:
    """Applicants see their own organization's scenes only; providers the scenes that use their
    department's data; the office, reviewers, auditors and the operator all — except that anyone
    who belongs to a company (a tenant) sees that company's scenes only."""
    r = access.reach_of(principal, "scene")
    if r is access.DEPARTMENT:
        return session.exec(select(SceneItem.id).join(Dataset, Dataset.code == SceneItem.dataset).where(
            SceneItem.scene_id == scene.id, Dataset.source_org_id == principal.org_id)).first() is not None
    return access.may_read(principal, "scene", scene.org_id)


def get_visible(session: Session, principal: Principal, scene_id: int) -> Scene:
    scene = session.get(Scene, scene_id) if id_in_range(scene_id) else None
    if scene is None or not may_see(session, principal, scene):
        raise not_found("Scene", "场景")  # another tenant's scene is indistinguishable from none
    return scene


def list_visible(session: Session, principal: Principal, status: str | None = None,
                 now: datetime | None = None) -> list[SceneSummary]:
    now = now or utcnow()
    stmt = access.readable(
        select(Scene, Organization.code).join(Organization, Organization.id == Scene.org_id), principal, "scene",
        Scene.org_id, department=Scene.id.in_(select(SceneItem.scene_id).join(Dataset, Dataset.code == SceneItem.dataset)
                                              .where(Dataset.source_org_id == principal.org_id)))
    out = []
    for s, org in session.exec(stmt.order_by(Scene.id.desc())).all():
        eff = states.effective_status(s.status, s.valid_from, s.valid_to, now)
        if status is None or eff == status:
            out.append(SceneSummary(id=s.id, org=org, title=s.title, scene_type=s.scene_type, status=eff,
                                    valid_from=s.valid_from, valid_to=s.valid_to, updated_at=s.updated_at))
    return out


# --- the application ----------------------------------------------------------------------------

_SCALARS = ("title", "purpose", "scene_type", "legal_basis", "consent_approach", "emergency_plan", "valid_from",
            "valid_to", "budget_epsilon", "budget_delta", "max_query_epsilon", "max_contributions", "link_pseudonyms")


def _replace_items(session: Session, scene: Scene, items: list[ItemIn]) -> None:
    session.exec(delete(SceneItem).where(SceneItem.scene_id == scene.id))
    session.flush()
    for i in items:
        session.add(SceneItem(scene_id=scene.id, dataset=i.dataset, field=i.field, usage=i.usage))


def _event(session: Session, scene: Scene, action: str, from_status: str, actor: Principal | None,
           reason: str = "") -> None:
    session.add(SceneEvent(scene_id=scene.id, action=action, from_status=from_status, to_status=scene.status,
                           actor_id=actor.user_id if actor else None, reason=reason))


def create(session: Session, settings: Settings, principal: Principal, app: SceneIn) -> Scene:
    scope = _scope(principal)
    refuse_if_any(application_problems(app, settings) + item_problems(session, app.items, scope)
                  + template_problems(session, app.templates, app.items, scope))
    scene = Scene(org_id=principal.org_id, applicant_id=principal.user_id, status="draft",
                  release_policy=app.release_policy.model_dump(), **app.model_dump(include=set(_SCALARS)))
    session.add(scene)
    session.flush()
    _replace_items(session, scene, app.items)
    _replace_templates(session, scene, app.templates)
    _event(session, scene, "create", "", principal)
    return scene


def _as_application(session: Session, scene: Scene) -> SceneIn:
    items = session.exec(select(SceneItem).where(SceneItem.scene_id == scene.id).order_by(SceneItem.id)).all()
    return SceneIn(release_policy=ReleasePolicy(**scene.release_policy),
                   items=[ItemIn(dataset=i.dataset, field=i.field, usage=i.usage) for i in items],
                   templates=[TemplateIn(definition=t.definition) for t in scene_templates(session, scene)],
                   **{k: getattr(scene, k) for k in _SCALARS})


def lock(session: Session, scene: Scene) -> Scene:
    """Take the scene's row for this transaction and re-read it. A no-op UPDATE locks the row on
    PostgreSQL and takes SQLite's write lock, so concurrent reviews or transitions of one scene
    run one after the other and each sees the other's result."""
    session.exec(sql_update(Scene).where(Scene.id == scene.id).values(updated_at=Scene.updated_at))
    session.refresh(scene)
    return scene


def _own(principal: Principal, scene: Scene) -> None:
    if principal.role is not Role.applicant or scene.org_id != principal.org_id:
        raise forbidden("not_your_scene", "Only the applicant's organization may change or submit this scene.",
                        "只有申请单位可以修改或提交该场景。")


def update(session: Session, settings: Settings, principal: Principal, scene: Scene, patch: ScenePatch) -> Scene:
    _own(principal, scene)
    lock(session, scene)
    if scene.status not in states.EDITABLE:
        raise _wrong_state("edit", scene)
    merged = _as_application(session, scene).model_dump()
    merged.update(patch.model_dump(exclude_unset=True, exclude_none=True))
    app = SceneIn.model_validate(merged)
    scope = _scope(principal)
    refuse_if_any(application_problems(app, settings) + item_problems(session, app.items, scope)
                  + template_problems(session, app.templates, app.items, scope))
    for k in _SCALARS:
        setattr(scene, k, getattr(app, k))
    scene.release_policy = app.release_policy.model_dump()
    if patch.items is not None:
        _replace_items(session, scene, app.items)
    if patch.templates is not None:
        _replace_templates(session, scene, app.templates)
    scene.updated_at = utcnow()
    session.add(scene)
    _event(session, scene, "edit", scene.status, principal)
    return scene


def _wrong_state(action: str, scene: Scene, now: datetime | None = None) -> PdaoError:
    eff = states.effective_status(scene.status, scene.valid_from, scene.valid_to, now or utcnow())
    return conflict("wrong_state", f"A scene that is {eff} does not allow '{action}'.",
                    f"场景当前状态为 {eff}，不能执行 {action}。", details={"status": eff, "action": action})


def _transition(session: Session, scene: Scene, action: str, actor: Principal, reason: str = "") -> None:
    lock(session, scene)
    now = utcnow()
    if not states.may_transition(action, scene.status, scene.valid_to, now):
        raise _wrong_state(action, scene, now)
    before = scene.status
    scene.status = states.TRANSITIONS[action][1]
    scene.updated_at = now
    session.add(scene)
    _event(session, scene, action, before, actor, reason)


def submit(session: Session, settings: Settings, principal: Principal, scene: Scene) -> Scene:
    _own(principal, scene)
    lock(session, scene)
    if not states.may_transition("submit", scene.status, scene.valid_to, utcnow()):
        raise _wrong_state("submit", scene)
    # The catalog may have changed since drafting: check again.
    refuse_if_any(application_problems(_as_application(session, scene), settings)
                  + item_problems(session, _items(session, scene), _scope(principal)))
    scene.round += 1
    _transition(session, scene, "submit", principal)
    return scene


def _items(session: Session, scene: Scene) -> list[SceneItem]:
    return list(session.exec(select(SceneItem).where(SceneItem.scene_id == scene.id).order_by(SceneItem.id)).all())


def _approvers(session: Session, scene: Scene) -> list[int]:
    """Approvers of this round who are still active office members outside the tenant: an
    approval by someone disabled or moved since no longer counts."""
    return list(session.exec(select(SceneReview.reviewer_id).join(User, User.id == SceneReview.reviewer_id).where(
        SceneReview.scene_id == scene.id, SceneReview.round == scene.round, SceneReview.decision == "approve",
        User.is_active == True, User.role == Role.office.value, User.org_id != scene.org_id)).all())  # noqa: E712


def review(session: Session, settings: Settings, principal: Principal, scene: Scene, body: ReviewIn) -> Scene:
    """An office member's opinion. Approval takes `scene_approvals_required` distinct approvers of
    this round, none from the applicant's organization; any reject or return decides at once."""
    if principal.role is not Role.office:
        raise forbidden("role_not_permitted", "Only the coordination office reviews scenes.", "只有协调小组办公室可以审核场景。")
    lock(session, scene)
    if principal.org_id == scene.org_id:
        raise forbidden("own_org_review", "A scene cannot be reviewed by the applicant's own organization.",
                        "申请单位不能审核本单位的场景。")
    if scene.status != "submitted":
        raise _wrong_state("review", scene)
    if session.exec(select(SceneReview.id).where(SceneReview.scene_id == scene.id, SceneReview.round == scene.round,
                                                 SceneReview.reviewer_id == principal.user_id)).first() is not None:
        raise conflict("already_reviewed", "You have already given your opinion in this round.",
                       "您已在本轮给出审核意见。")
    items = {i.id: i for i in _items(session, scene)}
    unknown = [n for n in body.struck_items if n not in items]
    if unknown:
        raise invalid("unknown_item", f"Items {unknown} are not in this scene's data list.",
                      f"条目 {unknown} 不在该场景的清单中。")
    for n in body.struck_items:
        item = items[n]
        if not item.struck:
            item.struck, item.struck_by = True, principal.user_id
            item.struck_reason = body.comment[:500]
            session.add(item)
    session.add(SceneReview(scene_id=scene.id, round=scene.round, reviewer_id=principal.user_id,
                            decision=body.decision, struck_items=list(body.struck_items), comment=body.comment))
    session.flush()
    if body.decision in ("reject", "return"):
        _transition(session, scene, body.decision, principal, body.comment)
        return scene
    if len(set(_approvers(session, scene))) < settings.scene_approvals_required:
        _event(session, scene, "approve_opinion", scene.status, principal, body.comment)
        return scene
    # The last approval: the application and every item that stays must still pass the rules,
    # and something must stay.
    effective = [i for i in items.values() if not i.struck]
    app = _as_application(session, scene)
    problems = application_problems(app, settings, at_approval=True) + item_problems(session, effective) \
        + template_problems(session, app.templates, effective)
    if problems:
        raise conflict("items_not_allowed", "Some items no longer pass the rules; strike them before approving.",
                       "部分条目已不符合规则，请先划去再批准。", details=[p.model_dump() for p in problems])
    if not effective:
        raise conflict("no_items_left", "Every item is struck; reject the application instead.",
                       "所有条目均已划去，请改为驳回。")
    _transition(session, scene, "approve", principal, body.comment)
    _write_policies(session, scene, tenant_holds=True)
    return scene


def _org_code(session: Session, org_id: int) -> str:
    return session.get(Organization, org_id).code


def _write_policies(session: Session, scene: Scene, *, tenant_holds: bool, revoked: bool = False) -> None:
    """Replace the scene's casbin rows (struck items excluded; none once revoked) in the caller's
    transaction, and bump the version every process keys its cache on."""
    dom = scene_domain(scene.id)
    session.exec(delete(CasbinRule).where(or_(CasbinRule.v1 == dom, CasbinRule.v2 == dom)))
    items = [] if revoked else [(i.dataset, i.field, i.usage) for i in _items(session, scene) if not i.struck]
    for row in scene_policy_rows(scene.id, _org_code(session, scene.org_id), items,
                                 tenant_holds=tenant_holds and not revoked):
        session.add(row)
    scene.policy_version += 1
    session.add(scene)


def _office_only(principal: Principal) -> None:
    if principal.role is not Role.office:
        raise forbidden("role_not_permitted", "Only the coordination office may do this.", "只有协调小组办公室可以执行此操作。")


def suspend(session: Session, principal: Principal, scene: Scene, reason: str) -> Scene:
    _office_only(principal)
    _transition(session, scene, "suspend", principal, reason)
    _write_policies(session, scene, tenant_holds=False)
    return scene


def resume(session: Session, principal: Principal, scene: Scene, reason: str) -> Scene:
    _office_only(principal)
    _transition(session, scene, "resume", principal, reason)
    _write_policies(session, scene, tenant_holds=True)
    return scene


def revoke(session: Session, principal: Principal, scene: Scene, reason: str) -> Scene:
    _office_only(principal)
    _transition(session, scene, "revoke", principal, reason)
    _write_policies(session, scene, tenant_holds=False, revoked=True)
    return scene


def emergency_stop(session: Session, principal: Principal, org: str | None, dataset: str | None,
                   reason: str) -> tuple[list[int], list[int]]:
    """In one transaction: suspend every approved scene of an organization, or touching a dataset,
    and return every submitted one to its applicant, so none goes live on the next approval.
    Answers (suspended ids, returned ids)."""
    _office_only(principal)
    if (org is None) == (dataset is None):
        raise invalid("org_or_dataset", "Name exactly one of org or dataset.", "org 与 dataset 须且只须指定一个。")
    stmt = select(Scene).where(Scene.status.in_(("approved", "submitted")))
    if org is not None:
        o = session.exec(select(Organization).where(Organization.code == org)).first()
        if o is None:
            raise not_found(f"Organization '{org}'", f"机构 {org} ")
        stmt = stmt.where(Scene.org_id == o.id)
    else:
        if session.exec(select(Dataset.id).where(Dataset.code == dataset)).first() is None:
            raise not_found(f"Dataset '{dataset}'", f"数据集 {dataset} ")
        stmt = stmt.where(Scene.id.in_(select(SceneItem.scene_id).where(
            SceneItem.dataset == dataset, SceneItem.struck == False)))  # noqa: E712 - SQL, not Python
    now = utcnow()
    stopped, returned = [], []
    for scene in session.exec(stmt.order_by(Scene.id)).all():
        lock(session, scene)
        if scene.status == "submitted":
            _transition(session, scene, "return", principal, f"emergency stop: {reason}")
            returned.append(scene.id)
        elif states.may_transition("suspend", scene.status, scene.valid_to, now):
            _transition(session, scene, "suspend", principal, f"emergency stop: {reason}")
            _write_policies(session, scene, tenant_holds=False)
            stopped.append(scene.id)
    return stopped, returned


# --- the decision -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Decision:
    allowed: bool
    rule: str
    message: str
    message_zh: str
    scene_status: str


def _scope(principal: Principal) -> CatalogScope:
    """The part of the catalog a caller may name (`policies.catalog_rules.catalog_scope`)."""
    return catalog_scope(principal.role, principal.org_id, principal.org_kind)


def decide(session: Session, enforcers: SceneEnforcers, scene: Scene, org_code: str, dataset: str, field: str,
           usage: str, now: datetime | None = None, scope: CatalogScope | None = None) -> Decision:
    """May `org_code` use dataset.field as `usage` in this scene now? Status first (derived from the
    clock, so expiry needs no job), then the rule table on today's catalog (a dataset closed since
    approval is refused at once), then the scene's casbin policies."""
    now = now or utcnow()
    status = states.effective_status(scene.status, scene.valid_from, scene.valid_to, now)
    if status != "active":
        return Decision(False, f"scene_{status}", f"the scene is {status}, not active", f"场景状态为 {status}，未生效",
                        status)
    if _org_code(session, scene.org_id) != org_code:
        return Decision(False, "not_tenant", "the scene belongs to another organization", "该场景属于其他单位", status)
    facts = field_facts(session, [(dataset, field)], scope).get((dataset, field))
    verdict: Verdict = item_verdict(facts, usage, dataset, field)
    if not verdict.allowed:
        return Decision(False, verdict.rule, verdict.message, verdict.message_zh, status)
    if not enforcers.may(scene.id, scene.policy_version, org_code, dataset, field, usage):
        return Decision(False, "not_in_data_list", f"{dataset}.{field} as {usage} is not in the scene's approved list",
                        f"{dataset}.{field}（{usage}）不在该场景已批准的清单中", status)
    return Decision(True, "scene_item", f"{dataset}.{field} as {usage} is in the approved list of an active scene",
                    f"{dataset}.{field}（{usage}）在生效场景的已批准清单中", status)


def explain(session: Session, enforcers: SceneEnforcers, scene: Scene, org_code: str, dataset: str, field: str,
            usage: str, viewer: Principal | None = None) -> Explanation:
    """`decide`, for a person asking. A dataset on the scene's own list is explained as it is; any
    other only as far as the asker may see the catalog (a tenant: a prohibited dataset is unknown)."""
    listed = session.exec(select(SceneItem.id).where(SceneItem.scene_id == scene.id,
                                                     SceneItem.dataset == dataset)).first() is not None
    scope = None if viewer is None or listed else _scope(viewer)
    d = decide(session, enforcers, scene, org_code, dataset, field, usage, scope=scope)
    return Explanation(allowed=d.allowed, rule=d.rule, message=d.message, message_zh=d.message_zh,
                       scene_status=d.scene_status)


# --- the answer -----------------------------------------------------------------------------------

def company_budgets_for(session: Session, settings: Settings, viewer: Principal | None, scene: Scene,
                        now: datetime) -> list[SceneDatasetBudget] | None:
    """The scene's company budgets if `viewer` may read that company's budgets (casbin `budget read`,
    then its scope: a tenant its own company's only), else None."""
    if viewer is None or not role_may(viewer.role.value, "budget", "read"):
        return None
    scope = budget_scope(viewer.role, viewer.org_id, viewer.org_kind)
    if scope is not None and scope != scene.org_id:
        return None
    return scene_dataset_budgets(session, settings, scene, _org_code(session, scene.org_id), now)


def to_out(session: Session, settings: Settings, scene: Scene, now: datetime | None = None,
           viewer: Principal | None = None) -> SceneView:
    """The scene as the API shows it; the company's budgets only with a `viewer` allowed to read them."""
    now = now or utcnow()
    status = states.effective_status(scene.status, scene.valid_from, scene.valid_to, now)
    items = _items(session, scene)
    # What the scene may do now: not struck, and still passing the rule table on today's catalog
    # (a dataset closed since approval drops out at once).
    facts = field_facts(session, ((i.dataset, i.field) for i in items)) if status == "active" else {}
    effective = [i for i in items if not i.struck
                 and item_verdict(facts.get((i.dataset, i.field)), i.usage, i.dataset, i.field).allowed]
    reviews = session.exec(select(SceneReview).where(SceneReview.scene_id == scene.id).order_by(SceneReview.id)).all()
    events = session.exec(select(SceneEvent).where(SceneEvent.scene_id == scene.id).order_by(SceneEvent.id)).all()
    user_ids = {scene.applicant_id} | {r.reviewer_id for r in reviews} | {e.actor_id for e in events if e.actor_id}
    users = dict(session.exec(select(User.id, User.username).where(User.id.in_(user_ids))).all())
    approvers = sorted({users.get(r) or "?" for r in _approvers(session, scene)}) if scene.status == "submitted" else []
    return SceneView(
        id=scene.id, org=_org_code(session, scene.org_id), applicant=users.get(scene.applicant_id, "?"),
        title=scene.title, purpose=scene.purpose, scene_type=scene.scene_type, legal_basis=scene.legal_basis,
        consent_approach=scene.consent_approach, emergency_plan=scene.emergency_plan, valid_from=scene.valid_from,
        valid_to=scene.valid_to, status=status, stored_status=scene.status, round=scene.round,
        budget=Budget(epsilon=scene.budget_epsilon, delta=scene.budget_delta, max_query_epsilon=scene.max_query_epsilon,
                      max_contributions=scene.max_contributions,
                      epsilon_spent=scene.epsilon_spent, epsilon_left=max(scene.budget_epsilon - scene.epsilon_spent, 0),
                      delta_spent=scene.delta_spent, delta_left=max(scene.budget_delta - scene.delta_spent, 0)),
        release_policy=ReleasePolicy(**scene.release_policy),
        link_pseudonyms=scene.link_pseudonyms,
        items=[ItemOut(id=i.id, dataset=i.dataset, field=i.field, usage=i.usage, struck=i.struck,
                       struck_reason=i.struck_reason) for i in items],
        effective_items=[EffectiveItem(dataset=i.dataset, field=i.field, usage=i.usage)
                         for i in effective] if status == "active" else [],
        templates=[TemplateOut(name=t.name, version=t.version, level=t.definition.get("level", ""),
                               title=t.definition.get("title", {}), upload=t.definition.get("upload", {}),
                               params=t.definition.get("params", []), outputs=t.definition.get("outputs", []),
                               sql=t.definition.get("sql", ""), digest=t.digest,
                               disclosure=template_disclosure(session, t.definition))
                   for t in scene_templates(session, scene)],
        approvals=Approvals(required=settings.scene_approvals_required, this_round=approvers),
        reviews=[ReviewOut(round=r.round, reviewer=users.get(r.reviewer_id, "?"), decision=r.decision,
                           struck_items=r.struck_items, comment=r.comment, created_at=r.created_at) for r in reviews],
        history=[EventOut(action=e.action, from_status=e.from_status, to_status=e.to_status,
                          actor=users.get(e.actor_id) if e.actor_id else None, reason=e.reason, at=e.at) for e in events],
        created_at=scene.created_at, updated_at=scene.updated_at,
        company_budgets=company_budgets_for(session, settings, viewer, scene, now),
    )



def tenant_code(session: Session, scene: Scene) -> str:
    return _org_code(session, scene.org_id)
