"""The web console's pages: thin, like the API's routes, over the same service functions, behind the
same authentication and casbin checks (`api/console/auth.py`), audited by the same middleware.

No page decides who may see what by itself: whose objects a caller reaches is `policies.access`, read
by the services the pages call — scenes from `sandbox.scenes.service` (get_visible, list_visible,
to_out), queries and results from `sandbox.queries.service` / `sandbox.results.export` (may_see,
list_results, cells_visible through `result_out`), uploads and budgets through their scopes — and the
catalog through `policies.catalog_rules`.
Cells reach a page only as `result_out(...)["rows"]`, which is None unless `cells_visible`.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Form, Request
from fastapi import Path as PathParam
from fastapi import Query as QueryParam
from fastapi.responses import Response
from pydantic import ValidationError

from api.console import svg
from api.console.auth import (
    CSRF_COOKIE,
    CSRF_FIELD,
    PREFIX,
    SESSION_COOKIE,
    action,
    check_csrf,
    check_origin,
    check_token,
    optional_principal,
    page,
    scene_action,
    scene_page,
)
from api.console.i18n import LANGS, pick, translator
from api.console.render import lang_of, redirect, render, safe_next, set_lang, url
from api.deps import SessionDep, SettingsDep
from api.routes.auth import checking_password, client_address, password_login
from catalog import service as catalog_service
from catalog.descriptor import Category
from pdao.kernel import audit
from pdao.kernel.db import MAX_ID, id_in_range, utcnow
from pdao.kernel.errors import PdaoError, invalid
from pdao.kernel.identity import service as identity
from pdao.kernel.identity.models import Role
from policies.catalog_rules import catalog_scope
from policies.rules import item_verdict
from sandbox import worker
from sandbox.alerts import AlertThresholds, collect_alerts
from sandbox.engine.sql import MAX_SQL_CHARS
from sandbox.queries import service as queries
from sandbox.results import export
from sandbox.scenes import service as scenes
from sandbox.scenes.schemas import ReviewIn, SceneIn
from sandbox.scenes.states import today_in_city

router = APIRouter(prefix=PREFIX, include_in_schema=False)

MAX_TIMELINE = 1000


def _form_error(e: ValidationError) -> PdaoError:
    details = [{"loc": [str(p) for p in err.get("loc", ())], "message": err.get("msg", ""), "type": err.get("type", "")}
               for err in e.errors()]
    return invalid("invalid_request", "The form is invalid; see the problems below.", "表单内容无效，详见下列问题。",
                   details=details)


# --- session --------------------------------------------------------------------------------------

@router.get("/login", name="console.login_page")
def login_page(request: Request, session: SessionDep, settings: SettingsDep, next: str | None = None) -> Response:  # noqa: A002
    request.state.action = "console.login_page"
    who = optional_principal(request, session, settings)
    if who is not None:
        request.state.principal = who
        return redirect(request, safe_next(next))
    return render(request, "login.html", next=safe_next(next), error=None)


@router.post("/login", name="auth.login")
async def login(request: Request, username: Annotated[str, Form(max_length=64)],
                password: Annotated[str, Form(max_length=256)], csrf_token: Annotated[str, Form(max_length=128)] = "",
                next: Annotated[str, Form(max_length=400)] = "") -> Response:  # noqa: A002
    """The API's login (`api.routes.auth.password_login`: the same per-address rate, hash slots,
    lockout and audit), its token kept in an HttpOnly SameSite=Strict cookie."""
    request.state.action = "auth.login"
    request.state.audit_detail = {"attempted_username": username[:64]}
    check_csrf(request, csrf_token)
    try:
        token, principal, expires_at = await password_login(request, username, password)
    except PdaoError as e:
        request.state.reason = e.code
        page_ = render(request, "login.html", http_status=e.status, next=safe_next(next), error=e)
        if e.headers and "Retry-After" in e.headers:
            page_.headers["Retry-After"] = e.headers["Retry-After"]
        return page_
    resp = redirect(request, safe_next(next))
    max_age = max(int((expires_at - datetime.now(UTC)).total_seconds()), 0)
    resp.set_cookie(SESSION_COOKIE, token, httponly=True, samesite="strict", path=PREFIX, max_age=max_age,
                    secure=request.url.scheme == "https")
    # a fresh CSRF token for the new session: one planted before login is worth nothing after it
    resp.set_cookie(CSRF_COOKIE, secrets.token_urlsafe(32), httponly=True, samesite="strict", path=PREFIX,
                    secure=request.url.scheme == "https")
    return resp


@router.post("/logout", name="console.logout")
def logout(request: Request, principal: action("me", "read"), session: SessionDep) -> Response:
    """The API's logout: every token issued to this user so far stops working, not only this cookie."""
    identity.logout(session, principal)
    session.commit()
    resp = redirect(request, url("/login"))
    resp.delete_cookie(SESSION_COOKIE, path=PREFIX)
    return resp


@router.get("/lang/{lang}", name="console.language")
def language(lang: str, request: Request, next: str | None = None) -> Response:  # noqa: A002
    """Switch the language (a preference cookie only) and go back."""
    request.state.action = "console.language"
    if lang not in LANGS:
        raise invalid("unknown_language", "Languages: zh, en.", "可选语言：zh、en。")
    resp = redirect(request, safe_next(next))
    set_lang(request, resp, lang)
    return resp


# --- home --------------------------------------------------------------------------------------------

@router.get("", name="console.home_bare")
@router.get("/", name="console.home")
def home(request: Request, principal: page("me", "read"), session: SessionDep, settings: SettingsDep) -> Response:
    ctx: dict[str, Any] = {"scenes": [], "queries": [], "released": [], "submitted": [], "queue": [],
                           "company_budgets": []}
    if principal.role is Role.applicant:
        ctx["scenes"] = [_scene_card(session, settings, s.id, principal) for s in scenes.list_visible(session, principal)]
        ctx["company_budgets"] = _company_budgets_of(session, settings, principal)
        ctx["queries"] = [queries.query_out(q, principal, session)
                          for q in queries.list_queries(session, principal, None, 20)]
        ctx["released"] = [queries.result_out(settings, principal, r, with_rows=False, session=session)
                           for r in export.list_results(session, principal, "released", 50)]
    elif principal.role is Role.office:
        ctx["submitted"] = scenes.list_visible(session, principal, "submitted")
    elif principal.role is Role.reviewer:
        ctx["queue"] = [queries.result_out(settings, principal, r, with_rows=False, session=session)
                        for r in export.review_queue(session, principal, 50)]
    return render(request, "home.html", **ctx)


def _scene_card(session, settings, scene_id: int, principal) -> dict[str, Any]:  # noqa: ANN001
    scene = scenes.get_visible(session, principal, scene_id)
    out = scenes.to_out(session, settings, scene)
    return {"scene": out, "expected_error": _expected_error(session, settings, principal, scene_id)}


def _expected_error(session, settings, principal, scene_id: int) -> list[dict[str, Any]]:  # noqa: ANN001
    """The 95% error bounds of the scene's newest answered query (what the next one like it will
    carry), read through the views the API gives this caller (`query_out`, `result_out`)."""
    for q in queries.list_queries(session, principal, scene_id, 20):
        seen = queries.query_out(q, principal, session)
        if seen["result_id"] is None:
            continue
        r = queries.result_out(settings, principal, export.get_result(session, principal, seen["result_id"]),
                               with_rows=False, session=session)
        return [{"query_id": seen["id"], "alias": alias, "function": n.get("function"), "epsilon": n.get("epsilon"),
                 "error": n.get("error95"), "unit": n.get("error_unit")} for alias, n in (r["noise"] or {}).items()]
    return []


# --- catalog -------------------------------------------------------------------------------------------

@router.get("/catalog", name="console.catalog")
def catalog_page(request: Request, principal: page("catalog", "read"), session: SessionDep, settings: SettingsDep,
                 q: Annotated[str | None, QueryParam(max_length=100)] = None,
                 department: Annotated[str | None, QueryParam(max_length=64)] = None,
                 category: Annotated[str | None, QueryParam(max_length=64)] = None,
                 grade: Annotated[str | None, QueryParam(max_length=2)] = None) -> Response:
    grade_n = int(grade) if grade and grade.isdigit() and 1 <= int(grade) <= 5 else None
    category_v = category if category in {c.value for c in Category} else None
    scope = catalog_scope(principal.role, principal.org_id, principal.org_kind)
    everything = catalog_service.list_datasets(session, scope, catalog_service.DatasetFilters(limit=500))
    shown = catalog_service.list_datasets(session, scope, catalog_service.DatasetFilters(
        q=q or None, department=department or None, category=category_v, grade=grade_n, limit=500))
    departments = sorted({(d.source_department.code, d.source_department.name_zh, d.source_department.name_en)
                          for d in everything.items})
    by_department: dict[str, list[Any]] = {}
    for d in shown.items:
        by_department.setdefault(d.source_department.code, []).append(d)
    resource_map = _resource_map(request, session, settings, principal, everything.items)
    return render(request, "catalog.html", datasets=shown.items, by_department=by_department,
                  departments=departments, categories=[c.value for c in Category], resource_map=resource_map,
                  f={"q": q or "", "department": department or "", "category": category_v or "",
                     "grade": grade_n or ""})


def _resource_map(request: Request, session, settings, principal, datasets) -> Any:  # noqa: ANN001
    """Departments → datasets → active scenes → tenants, from what this caller may see."""
    lang = lang_of(request)
    t, _ = translator(lang)
    g = svg.Graph()
    depts: dict[str, svg.Node] = {}
    ds_nodes = []
    for d in datasets:
        dep = d.source_department
        depts.setdefault(dep.code, svg.Node(f"dep:{dep.code}", pick(lang, dep.name_zh, dep.name_en), dep.code))
        ds_nodes.append(svg.Node(f"ds:{d.code}", pick(lang, d.title_zh, d.title_en), f"{d.code} · G{d.grade}",
                                 href=url(f"/catalog/{d.code}"),
                                 tone="bad" if d.opening_class == "prohibited" else "n"))
        g.edges.append((f"dep:{dep.code}", f"ds:{d.code}"))
    scene_nodes, tenants = [], {}
    for s in scenes.list_visible(session, principal, "active"):
        out = scenes.to_out(session, settings, scenes.get_visible(session, principal, s.id))
        scene_nodes.append(svg.Node(f"sc:{s.id}", f"#{s.id} {s.title}", s.org, href=url(f"/scenes/{s.id}"), tone="ok"))
        for code in sorted({i.dataset for i in out.effective_items}):
            g.edges.append((f"ds:{code}", f"sc:{s.id}"))
        tenants.setdefault(s.org, svg.Node(f"org:{s.org}", s.org, t("catalog.map_tenants"), tone="warn"))
        g.edges.append((f"sc:{s.id}", f"org:{s.org}"))
    g.columns = [(t("catalog.map_departments"), list(depts.values())), (t("catalog.map_datasets"), ds_nodes),
                 (t("catalog.map_scenes"), scene_nodes), (t("catalog.map_tenants"), list(tenants.values()))]
    return svg.columns_graph(g, t("catalog.map"))


@router.get("/catalog/{code}", name="console.dataset")
def dataset_page(code: str, request: Request, principal: page("catalog", "read"), session: SessionDep) -> Response:
    request.state.object = f"dataset:{code}"[:200]
    ds = catalog_service.get_dataset(session, code,
                                     catalog_scope(principal.role, principal.org_id, principal.org_kind))
    return render(request, "dataset.html", ds=ds)


# --- scenes --------------------------------------------------------------------------------------------

@router.get("/scenes", name="console.scenes")
def scenes_page(request: Request, principal: page("scene", "read"), session: SessionDep,
                status: Annotated[str | None, QueryParam(max_length=12)] = None) -> Response:
    return render(request, "scenes.html", scenes=scenes.list_visible(session, principal, status or None),
                  status=status or "")


@router.get("/scenes/new", name="console.scene_new")
def scene_new(request: Request, principal: page("scene", "create")) -> Response:
    today = today_in_city(utcnow())
    return render(request, "scene_new.html", today=today, until=today + timedelta(days=180))


def _parse_items(text: str) -> list[dict[str, str]]:
    items = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.replace(",", " ").split()
        if len(parts) != 2 or "." not in parts[0]:
            raise invalid("bad_item_line", f"Line {n}: write 'dataset.field usage'.", f"第 {n} 行：应写作“数据集.字段 用途”。")
        dataset, _, fld = parts[0].rpartition(".")
        items.append({"dataset": dataset, "field": fld, "usage": parts[1]})
    return items


@router.post("/scenes", name="scenes.create")
def scene_create(request: Request, principal: action("scene", "create"), session: SessionDep, settings: SettingsDep,
                 title: Annotated[str, Form(max_length=200)], purpose: Annotated[str, Form(max_length=4000)],
                 scene_type: Annotated[str, Form(max_length=32)], valid_from: Annotated[str, Form(max_length=10)],
                 valid_to: Annotated[str, Form(max_length=10)], budget_epsilon: Annotated[str, Form(max_length=20)],
                 max_query_epsilon: Annotated[str, Form(max_length=20)], items: Annotated[str, Form(max_length=50_000)],
                 legal_basis: Annotated[str, Form(max_length=4000)] = "",
                 consent_approach: Annotated[str, Form(max_length=4000)] = "",
                 emergency_plan: Annotated[str, Form(max_length=8000)] = "",
                 budget_delta: Annotated[str, Form(max_length=20)] = "1e-6",
                 link_pseudonyms: Annotated[str, Form(max_length=5)] = "") -> Response:
    linked = _ticked(link_pseudonyms)
    try:
        body = SceneIn(title=title, purpose=purpose, scene_type=scene_type, legal_basis=legal_basis,
                       consent_approach=consent_approach, emergency_plan=emergency_plan, valid_from=valid_from,
                       valid_to=valid_to, budget_epsilon=budget_epsilon, budget_delta=budget_delta or 0,
                       max_query_epsilon=max_query_epsilon, link_pseudonyms=linked, items=_parse_items(items))
    except ValidationError as e:
        raise _form_error(e) from None
    scene = scenes.create(session, settings, principal, body)
    session.commit()
    request.state.scene_id, request.state.object = scene.id, f"scene:{scene.id}"
    return redirect(request, f"/scenes/{scene.id}")


@router.get("/scenes/{scene_id}", name="console.scene")
def scene_page_(scene_id: int, request: Request, ctx: scene_page("read"), session: SessionDep,
                settings: SettingsDep) -> Response:
    return _scene_view(request, ctx, session, settings)


def _scene_view(request: Request, ctx, session, settings, preview: dict | None = None, sql: str = "",  # noqa: ANN001
                mode: str = "dev", epsilon: str = "") -> Response:
    # with the viewer: the company's budgets per dataset for those who may read them (office,
    # auditors, the tenant itself), None for everyone else
    out = scenes.to_out(session, settings, ctx.scene, viewer=ctx.principal)
    facts = scenes.field_facts(session, ((i.dataset, i.field) for i in out.items))
    verdicts = {i.id: item_verdict(facts.get((i.dataset, i.field)), i.usage, i.dataset, i.field) for i in out.items}
    effective = {(e.dataset, e.field, e.usage) for e in out.effective_items}
    p = ctx.principal
    # list_queries is scoped like the API's (a tenant's own, none for providers)
    scene_queries = [queries.query_out(q, p, session) for q in queries.list_queries(session, p, ctx.scene.id, 50)]
    return render(request, "scene.html", s=out, verdicts=verdicts, effective=effective, queries=scene_queries,
                  expected_error=_expected_error(session, settings, p, ctx.scene.id),
                  may_review=_may(p, "scene", "review") and out.stored_status == "submitted",
                  may_control=_may(p, "scene", "suspend"), may_submit=_may(p, "scene", "submit")
                  and out.stored_status in ("draft", "returned"),
                  may_query=_may(p, "scene", "query") and out.status == "active",
                  approvals_required=settings.scene_approvals_required, preview=preview, sql=sql, mode=mode,
                  epsilon=epsilon, upload_names=_own_upload_names(session, p) if out.templates else [],
                  may_set_cap=_may(p, "budget", "write"))


def _own_upload_names(session, principal) -> list[str]:  # noqa: ANN001
    """The tenant's own tables (names only), for the template run form: a run reads only its own."""
    from sandbox.uploads.service import upload_scope, visible_uploads

    if upload_scope(principal.role, principal.org_id, principal.org_kind) != principal.org_id:
        return []
    return sorted({row.name for row, _code in visible_uploads(session, principal.role, principal.org_id,
                                                              principal.org_kind)})


def _may(principal, resource: str, act: str) -> bool:  # noqa: ANN001
    """Whether to show a control: casbin's answer for the role, and a resource a tenant is not refused
    (`policies.access`); the action itself is checked again."""
    from policies import access
    from policies.enforcer import role_may

    return role_may(principal.role.value, resource, act) and access.reach_of(principal, resource) is not access.FORBIDDEN


@router.post("/scenes/{scene_id}/submit", name="scenes.submit")
def scene_submit(scene_id: int, request: Request, ctx: scene_action("submit"), session: SessionDep,
                 settings: SettingsDep) -> Response:
    scenes.submit(session, settings, ctx.principal, ctx.scene)
    session.commit()
    return redirect(request, f"/scenes/{scene_id}")


@router.post("/scenes/{scene_id}/reviews", name="scenes.review")
def scene_review(scene_id: int, request: Request, ctx: scene_action("review"), session: SessionDep,
                 settings: SettingsDep, decision: Annotated[Literal["approve", "reject", "return"], Form()],
                 comment: Annotated[str, Form(max_length=4000)] = "",
                 strike: Annotated[list[int], Form(max_length=500)] = []) -> Response:  # noqa: B006 - FastAPI copies it
    """The office's opinion, item by item: the API's ReviewIn, through scenes.review."""
    body = ReviewIn(decision=decision, struck_items=strike, comment=comment)
    request.state.audit_detail = {"decision": body.decision, "struck_items": body.struck_items}
    scenes.review(session, settings, ctx.principal, ctx.scene, body)
    session.commit()
    return redirect(request, f"/scenes/{scene_id}")


def _reason(reason: str) -> str:
    return reason.strip()[:2000]


@router.post("/scenes/{scene_id}/suspend", name="scenes.suspend")
def scene_suspend(scene_id: int, request: Request, ctx: scene_action("suspend"), session: SessionDep,
                  reason: Annotated[str, Form(max_length=2000)] = "") -> Response:
    scenes.suspend(session, ctx.principal, ctx.scene, _reason(reason))
    session.commit()
    return redirect(request, f"/scenes/{scene_id}")


@router.post("/scenes/{scene_id}/resume", name="scenes.resume")
def scene_resume(scene_id: int, request: Request, ctx: scene_action("resume"), session: SessionDep,
                 reason: Annotated[str, Form(max_length=2000)] = "") -> Response:
    scenes.resume(session, ctx.principal, ctx.scene, _reason(reason))
    session.commit()
    return redirect(request, f"/scenes/{scene_id}")


@router.post("/scenes/{scene_id}/revoke", name="scenes.revoke")
def scene_revoke(scene_id: int, request: Request, ctx: scene_action("revoke"), session: SessionDep,
                 reason: Annotated[str, Form(max_length=2000)] = "") -> Response:
    scenes.revoke(session, ctx.principal, ctx.scene, _reason(reason))
    session.commit()
    return redirect(request, f"/scenes/{scene_id}")


@router.get("/emergency-stop", name="console.emergency_stop_page")
def emergency_page(request: Request, principal: page("emergency_stop", "create")) -> Response:
    return render(request, "emergency.html", done=None)


@router.post("/emergency-stop", name="scenes.emergency_stop")
def emergency_stop(request: Request, principal: action("emergency_stop", "create"), session: SessionDep,
                   reason: Annotated[str, Form(min_length=1, max_length=2000)],
                   org: Annotated[str, Form(max_length=64)] = "", dataset: Annotated[str, Form(max_length=128)] = "") -> Response:
    org_, dataset_ = org.strip() or None, dataset.strip() or None
    if (org_ is None) == (dataset_ is None):
        raise invalid("org_or_dataset", "Give an organization or a dataset (one of them).",
                      "请给出单位或数据集（二者之一）。")
    request.state.object = f"org:{org_}" if org_ else f"dataset:{dataset_}"
    stopped, returned = scenes.emergency_stop(session, principal, org_, dataset_, reason)
    session.commit()
    request.state.audit_detail = {"suspended": stopped, "returned": returned}
    return render(request, "emergency.html", done={"suspended": stopped, "returned": returned})


# --- queries -----------------------------------------------------------------------------------------

def _epsilon(text: str) -> float | None:
    text = text.strip()
    if not text:
        return None
    try:
        v = float(text)
    except ValueError:
        raise invalid("bad_epsilon", "ε must be a number.", "ε 必须是数字。") from None
    if not 0 < v <= 100:
        raise invalid("bad_epsilon", "ε must be above 0 and at most 100.", "ε 须大于 0 且不超过 100。")
    return v


@router.post("/scenes/{scene_id}/queries", name="queries.submit")
def query_submit(scene_id: int, request: Request, ctx: scene_action("query"), session: SessionDep,
                 settings: SettingsDep, sql: Annotated[str, Form(min_length=1, max_length=MAX_SQL_CHARS)],
                 mode: Annotated[Literal["dev", "prod"], Form()],
                 epsilon: Annotated[str, Form(max_length=20)] = "",
                 preview: Annotated[str, Form(max_length=10)] = "") -> Response:
    eps = _epsilon(epsilon)
    request.state.audit_detail = {"sql": sql, "mode": mode, "epsilon": eps, **({"preview": True} if preview else {})}
    enforcers = request.app.state.scene_enforcers
    if preview:
        out = queries.preview(session, settings, enforcers, ctx.principal, ctx.scene, sql, mode, eps)
        return _scene_view(request, ctx, session, settings, preview=out, sql=sql, mode=mode, epsilon=epsilon)
    q = worker.submit_query(session, request.app.state.engine, settings, enforcers, ctx.principal, ctx.scene, sql,
                            mode, eps, request.state.request_id)
    request.state.object = f"query:{q.id}"
    return redirect(request, f"/queries/{q.id}")


@router.get("/queries", name="console.queries")
def queries_page(request: Request, principal: page("query", "read"), session: SessionDep) -> Response:
    return render(request, "queries.html", queries=[queries.query_out(q, principal, session)
                                                    for q in queries.list_queries(session, principal, None, 200)])


@router.get("/queries/{query_id}", name="console.query")
def query_page(query_id: int, request: Request, principal: page("query", "read"), session: SessionDep) -> Response:
    request.state.object = f"query:{query_id}"
    q = queries.get_query(session, principal, query_id)
    request.state.scene_id = q.scene_id
    return render(request, "query.html", q=queries.query_out(q, principal, session), may_cancel=_may(principal, "query", "cancel"))


@router.post("/queries/{query_id}/cancel", name="queries.cancel")
def query_cancel(query_id: int, request: Request, principal: action("query", "cancel"), session: SessionDep) -> Response:
    request.state.object = f"query:{query_id}"
    queries.cancel(session, principal, queries.get_query(session, principal, query_id), request.state.request_id)
    return redirect(request, f"/queries/{query_id}")


# --- results and export review ----------------------------------------------------------------------

RESULT_STATUSES = ("dev", "held", "released", "rejected", "superseded")


@router.get("/results", name="console.results")
def results_page(request: Request, principal: page("result", "read"), session: SessionDep, settings: SettingsDep,
                 status: Annotated[str | None, QueryParam(max_length=12)] = None) -> Response:
    st = status if status in RESULT_STATUSES else None
    rows = [queries.result_out(settings, principal, r, with_rows=False, session=session)
            for r in export.list_results(session, principal, st, 200)]
    return render(request, "results.html", results=rows, status=st or "", statuses=RESULT_STATUSES)


@router.get("/reviews", name="console.review_queue")
def review_queue(request: Request, principal: page("result", "review"), session: SessionDep,
                 settings: SettingsDep) -> Response:
    rows = [queries.result_out(settings, principal, r, with_rows=False, session=session)
            for r in export.review_queue(session, principal, 200)]
    return render(request, "reviews.html", results=rows)


def _on(request: Request, result_id: int, scene_id: int | None = None) -> None:
    request.state.object = f"result:{result_id}"
    if scene_id is not None:
        request.state.scene_id = scene_id


CONSOLE_PAGE_ROWS = 500     # rows of a result one console page shows (the API's page is `?limit=`)


@router.get("/results/{result_id}", name="console.result")
def result_page(result_id: int, request: Request, principal: page("result", "read"), session: SessionDep,
                settings: SettingsDep, offset: Annotated[int, QueryParam(ge=0, le=2_147_483_647)] = 0) -> Response:
    _on(request, result_id)
    r = export.get_result(session, principal, result_id)
    _on(request, result_id, r.scene_id)
    # rows: None unless cells_visible; a page of them from `offset` (the API's paging)
    out = queries.result_out(settings, principal, r, session=session, offset=offset, limit=CONSOLE_PAGE_ROWS)
    may_review = _may(principal, "result", "review") and export.may_review(session, principal, r)
    may_download = _may(principal, "result", "download") and out["cells_visible"]
    # the picker: only for the reviewer who may decide, on an aggregate (rows are suppressed by class)
    failing = _failing_cells(out) if may_review and out["kind"] != "rows" else []
    # what releasing takes now (failing checks, overrides given and needed, a failed run): staff
    # only, as the API's lineage gives it — that a check failed rests on exact statistics
    release = (export.release_rule(session, r) if export.is_staff(principal) and r.status == "held"
               and not r.synthetic else None)
    # a row answer is checked again at release (export.review): a check may fail only then, so its
    # reviewer is offered the override too (a form control; the service decides)
    rechecked = may_review and r.kind == "rows" and "template" not in (r.report or {})
    return render(request, "result.html", r=out, may_review=may_review, may_download=may_download,
                  failing=failing, release=release, rechecked_at_release=rechecked, page_rows=CONSOLE_PAGE_ROWS)


@router.post("/results/{result_id}/review", name="results.review")
def result_review(result_id: int, request: Request, principal: action("result", "review"), session: SessionDep,
                  settings: SettingsDep, decision: Annotated[Literal["release", "reject"], Form()],
                  reason: Annotated[str, Form(min_length=1, max_length=4000)],
                  override: Annotated[str, Form(max_length=5)] = "") -> Response:
    """The API's review (`POST /results/{id}/review`): with the settings, so a row answer is checked
    again at release against the scene's released row answers, and with `override` (a ticked box)
    for a result whose checks fail (two distinct reviewers' overrides release it)."""
    _on(request, result_id)
    overriding = _ticked(override)
    request.state.audit_detail = {"decision": decision, "override": overriding}
    r = export.review(session, principal, result_id, decision, reason, request.state.request_id,
                      override=overriding, settings=settings)
    _on(request, result_id, r.scene_id)
    return redirect(request, f"/results/{result_id}")


def _ticked(value: str) -> bool:
    """A checkbox: present ("1", "on", "true") or not; anything else is a malformed form."""
    v = value.strip().lower()
    if v in ("", "0", "false", "off"):
        return False
    if v in ("1", "on", "true", "yes"):
        return True
    raise invalid("bad_checkbox", "A checkbox is ticked (1) or not (empty).", "复选框只能为勾选（1）或不勾选（空）。")


@router.post("/results/{result_id}/revisions", name="results.revise")
def result_revise(result_id: int, request: Request, principal: action("result", "review"), session: SessionDep,
                  settings: SettingsDep, revision: Annotated[Literal["suppress", "round"], Form()],
                  reason: Annotated[str, Form(min_length=1, max_length=4000)],
                  columns: Annotated[str, Form(max_length=2000)] = "",
                  base: Annotated[str, Form(max_length=10)] = "",
                  cell: Annotated[list[str], Form(max_length=10_000)] = []) -> Response:  # noqa: B006
    """The API's revision: suppress every failing cell, or the cells ticked (each a JSON object of the
    result's key values, as `POST /results/{id}/revisions` takes them), or round columns."""
    _on(request, result_id)
    cols = [c.strip() for c in columns.split(",") if c.strip()] or None
    cells: list[dict[str, Any]] | str | None = None
    if revision == "suppress":
        cells = _picked_cells(cell) if cell else "failing"
    base_n = None
    if revision == "round":
        if not base.strip().isdigit() or not 1 <= int(base) <= 1_000_000:
            raise invalid("bad_base", "The rounding base is a whole number from 1 to 1,000,000.",
                          "取整基数须为 1 至 1,000,000 的整数。")
        base_n = int(base)
    request.state.audit_detail = {"action": revision, "base": base_n, "columns": cols}
    new = export.revise(session, settings, principal, result_id, revision, reason,
                        cells=cells, columns=cols, base=base_n,
                        request_id=request.state.request_id)
    _on(request, result_id, new.scene_id)
    return redirect(request, f"/results/{new.id}")


def _picked_cells(values: list[str]) -> list[dict[str, Any]]:
    """The ticked cells: each a JSON object of key values (`export.revise` checks them against the
    result: exactly its key columns, plain values, present)."""
    import json

    out = []
    for v in values:
        try:
            c = json.loads(v)
        except (ValueError, RecursionError):
            c = None
        if not isinstance(c, dict):
            raise invalid("bad_cell", "Each cell names exactly the result's key columns, with plain values.",
                          "每个单元格须恰好用结果的全部分组键列指定，取值为简单值。")
        out.append(c)
    return out


def _failing_cells(out: dict[str, Any]) -> list[dict[str, Any]]:
    """The cells the checks did not pass, by key values, once each (what "suppress failing" takes),
    for the reviewer to pick from; from the report `result_out` gives them (reviewers only)."""
    import json

    seen, cells = set(), []
    for c in ((out.get("report") or {}).get("checks") or []):
        if c.get("verdict") in ("fail", "review"):
            for cell in c.get("cells") or []:
                if not isinstance(cell, dict):
                    continue
                marker = json.dumps(cell, sort_keys=True, ensure_ascii=False, default=str)
                if marker not in seen:
                    seen.add(marker)
                    cells.append({"keys": cell, "value": json.dumps(cell, ensure_ascii=False, default=str),
                                  "checks": [c.get("name")]})
                else:
                    next(x for x in cells if json.dumps(x["keys"], sort_keys=True, ensure_ascii=False,
                                                         default=str) == marker)["checks"].append(c.get("name"))
    return cells


@router.get("/results/{result_id}/download", name="results.download")
def result_download(result_id: int, request: Request, principal: page("result", "download"), session: SessionDep,
                    settings: SettingsDep, format: Literal["csv", "parquet", "json"] = "csv") -> Response:  # noqa: A002
    """The API's download: released (or the tenant's own dev) answers only, stamped and recorded."""
    from api.downloads import SpooledDownload, download_headers

    _on(request, result_id)
    f = export.export(session, settings, principal, result_id, format, request.state.request_id, spool=True)
    r = f.export
    request.state.audit_detail = {"export_id": r.export_id, "format": format, "sha256": r.sha256}
    return SpooledDownload(f, download_headers(f, **{"Cache-Control": "no-store"}))


@router.get("/results/{result_id}/lineage", name="console.lineage")
def lineage_page(result_id: int, request: Request, principal: page("result", "read"), session: SessionDep) -> Response:
    _on(request, result_id)
    lin = export.lineage(session, principal, result_id)
    _on(request, result_id, lin["scene"]["id"])
    t, tv = translator(lang_of(request))
    return render(request, "lineage.html", lin=lin, result_id=result_id, graph=_lineage_graph(lin, t, tv))


def _lineage_graph(lin: dict[str, Any], t, tv) -> Any:  # noqa: ANN001
    g = svg.Graph()
    sources = []
    for d in lin["datasets"]:
        key = f"v:{d.get('dataset') or d.get('code')}:{d.get('env')}:{d.get('number') or d.get('version')}"
        sources.append(svg.Node(key, str(d.get("dataset") or d.get("code") or "?"),
                                f"{t('lineage.node_version')} {d.get('env', '')} v{d.get('number') or d.get('version') or '?'}",
                                href=url(f"/catalog/{d.get('dataset') or d.get('code')}")))
    for u in lin.get("uploads") or []:
        sources.append(svg.Node(f"u:{u.get('name')}:{u.get('version')}", str(u.get("name")),
                                f"{t('lineage.node_upload')} v{u.get('version')}", tone="warn"))
    sc = lin["scene"]
    scene_node = svg.Node(f"s:{sc['id']}", f"{t('lineage.node_scene')} #{sc['id']} {sc['title']}",
                          str((sc.get("org") or {}).get("code") or ""), href=url(f"/scenes/{sc['id']}"), tone="ok")
    q = lin["query"]
    requester = (q.get("requester") or {}).get("username") or ""
    query_node = svg.Node(f"q:{q['id']}", f"{t('lineage.node_query')} #{q['id']} ({tv('mode', q['mode'])})",
                          f"{requester} · ε {q.get('epsilon_spent') or 0:.3g}", href=url(f"/queries/{q['id']}"))
    results = [svg.Node(f"r:{v['id']}", f"{t('lineage.node_result')} #{v['id']} v{v['version']}",
                        tv("result_status", v["status"]), href=url(f"/results/{v['id']}"),
                        tone={"released": "ok", "rejected": "bad", "held": "warn", "superseded": "dim"}.get(v["status"], "n"))
               for v in lin["versions"]]
    after = []
    for i, rv in enumerate(lin["reviews"]):
        who = (rv.get("reviewer") or {}).get("username") or "?"
        if rv.get("override"):      # None for a tenant: that a check failed is for staff
            who = f"{who} · {t('lineage.node_override')}"
        after.append(svg.Node(f"rv:{i}", f"{t('lineage.node_review')}: {tv('decision', rv['decision'])}", who,
                              tone="ok" if rv["decision"] == "release" else "bad"))
        g.edges.append((f"r:{rv['result_id']}", f"rv:{i}"))
    for e in lin["exports"]:
        who = (e.get("by") or {}).get("username") or "?"
        after.append(svg.Node(f"e:{e['export_id']}", f"{t('lineage.node_export')} {e['export_id'][:12]}",
                              f"{who} · {e['format']}", tone="warn"))
        g.edges.append((f"r:{e['result_id']}", f"e:{e['export_id']}"))
    for s in sources:
        g.edges.append((s.key, query_node.key))
    g.edges.append((scene_node.key, query_node.key))
    for v in lin["versions"]:
        g.edges.append((query_node.key, f"r:{v['id']}") if v.get("parent_id") is None
                       else (f"r:{v['parent_id']}", f"r:{v['id']}"))
    g.columns = [(t("lineage.datasets"), sources + [scene_node]), (t("lineage.node_query"), [query_node]),
                 (t("lineage.node_result"), results), (f"{t('lineage.reviews')} / {t('lineage.exports')}", after)]
    return svg.columns_graph(g, t("lineage.graph"), box_w=220)


# --- audit ---------------------------------------------------------------------------------------------

def _when(text: str | None, field: str) -> datetime | None:
    if not text:
        return None
    try:
        v = datetime.fromisoformat(text)
        v = v if v.tzinfo else v.replace(tzinfo=UTC)
        v.astimezone(UTC)      # an offset that leaves the calendar (9999-12-31T23:59-23:00) fails here
    except (ValueError, OverflowError):
        raise invalid("bad_time", f"{field}: use a date or time like 2025-01-31 or 2025-01-31T08:00.",
                      f"{field}：请使用 2025-01-31 或 2025-01-31T08:00 这样的日期或时间。") from None
    return v if v.tzinfo else v.replace(tzinfo=UTC)


@router.get("/audit", name="audit.events")
def audit_page(request: Request, principal: page("audit", "read"), session: SessionDep,
               actor: Annotated[str | None, QueryParam(max_length=64)] = None,
               org: Annotated[str | None, QueryParam(max_length=64)] = None,
               scene: Annotated[str | None, QueryParam(max_length=12)] = None,
               action_: Annotated[str | None, QueryParam(alias="action", max_length=80)] = None,
               decision: Annotated[str | None, QueryParam(max_length=5)] = None,
               since: Annotated[str | None, QueryParam(max_length=32)] = None,
               until: Annotated[str | None, QueryParam(max_length=32)] = None,
               before_seq: Annotated[int | None, QueryParam(ge=1, le=MAX_ID)] = None) -> Response:
    """The API's event filter (audit.EventFilter / find_events), newest first, and its timeline."""
    scene_n = int(scene) if scene and scene.isdigit() and id_in_range(int(scene)) else None
    decision_v = decision if decision in ("allow", "deny", "error") else None
    base = dict(actor=actor or None, org=org or None, scene=scene_n, action=action_ or None, decision=decision_v,
                since=_when(since, "since"), until=_when(until, "until"))
    flt = audit.EventFilter(**base, before_seq=before_seq, newest_first=True, limit=100)
    request.state.object = "audit_log"
    request.state.audit_detail = {"filters": {k: (audit.format_at(v) if isinstance(v, datetime) else v)
                                              for k, v in base.items() if v is not None},
                                  "order": "desc", "limit": 100, "before_seq": before_seq}
    events = [audit.event_json(e) for e in audit.find_events(session, flt)]
    recent = audit.find_events(session, audit.EventFilter(**base, newest_first=True, limit=MAX_TIMELINE))
    t, _ = translator(lang_of(request))
    chart = svg.timeline([(e.at, e.decision) for e in recent], t("audit.timeline"), t("audit.legend_allow"),
                         t("audit.legend_deny"))
    next_before = events[-1]["seq"] if len(events) == 100 else None
    f = {"actor": actor or "", "org": org or "", "scene": scene_n or "", "action": action_ or "",
         "decision": decision_v or "", "since": since or "", "until": until or ""}
    return render(request, "audit.html", events=events, chart=chart, shown=len(recent), f=f, next_before=next_before)


@router.get("/audit/verify", name="audit.verify")
def audit_verify(request: Request, principal: page("audit", "read"), session: SessionDep) -> Response:
    request.state.object = "audit_log"
    report = audit.verify(session)
    request.state.audit_detail = {"ok": report.ok, "checked": report.checked, "first_bad_seq": report.first_bad_seq,
                                  "head_seq": report.head_seq, "from_seq": None, "anchor_seq": None}
    return render(request, "verify.html", report=report)


@router.get("/audit/alerts", name="audit.alerts")
def alerts_page(request: Request, principal: page("audit", "read"), session: SessionDep,
                days: Annotated[int, QueryParam(ge=1, le=366)] = 7) -> Response:
    until = utcnow()
    since = until - timedelta(days=days)
    alerts = collect_alerts(session, until, since, AlertThresholds())
    request.state.audit_detail = {"since": since.isoformat(), "until": until.isoformat(), "alerts": len(alerts)}
    return render(request, "alerts.html", alerts=[a.to_dict() for a in alerts], since=since, until=until, days=days)


@router.get("/audit/lineage", name="console.lineage_lookup")
def lineage_lookup(request: Request, principal: page("result", "read"),
                   result: Annotated[int, QueryParam(ge=1)]) -> Response:
    """The auditor's "open the lineage of result N" box."""
    return redirect(request, f"/results/{result}/lineage")


__all__ = ["router"]


# --- tenant uploads (metadata only) --------------------------------------------------------------------

def _upload_tables(session, principal) -> list[dict[str, Any]]:  # noqa: ANN001
    """The uploads the caller may see (`sandbox.uploads.service.visible_uploads`, as `GET /api/v1/uploads`),
    every version, as the API's `UploadOut` (note and warnings: the tenant's own only). Never a cell."""
    from api.routes.uploads import _out as upload_out
    from sandbox.uploads.service import upload_scope, visible_uploads

    own = upload_scope(principal.role, principal.org_id, principal.org_kind) == principal.org_id
    tables: dict[tuple[str, str], dict[str, Any]] = {}
    for row, code in visible_uploads(session, principal.role, principal.org_id, principal.org_kind):
        t = tables.setdefault((code, row.name), {"org": code, "name": row.name, "versions": []})
        t["versions"].append(upload_out(session, row, code, own))
    for t in tables.values():
        t["versions"].sort(key=lambda v: v.version, reverse=True)
        t["latest"] = t["versions"][0]
    return list(tables.values())


@router.get("/uploads", name="console.uploads")
def uploads_page(request: Request, principal: page("upload", "read"), session: SessionDep,
                 stored: Annotated[str | None, QueryParam(max_length=80)] = None) -> Response:
    request.state.object = "upload"
    return render(request, "uploads.html", tables=_upload_tables(session, principal),
                  may_upload=_may(principal, "upload", "create"), stored=stored)


@router.post("/uploads", name="uploads.create")
async def upload_create(request: Request, principal: page("upload", "create"), session: SessionDep,
                        settings: SettingsDep) -> Response:
    """`POST /api/v1/uploads` from a form: the same streaming into the domain's staging folder, the
    same schema, join-target, note and PII checks (`api.routes.uploads._store` → `store_upload`),
    the same audit detail. The Origin is checked before the body is read, the form's CSRF token
    (a field of the multipart body) before anything is stored."""
    import uuid

    from starlette.concurrency import run_in_threadpool

    from api.routes.uploads import _store
    from api.uploads import receive_file
    from pdao.kernel.errors import too_large
    from sandbox.uploads.service import MAX_NOTE, UploadSlot

    request.state.object = "upload"
    check_origin(request)
    settings.ensure_home()
    # counted against the organization's upload rate and concurrency before a byte of the file is read
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
        check_token(request, received.fields.get(CSRF_FIELD))
        fields = received.fields
        schema_text = fields.get("schema") or None
        name = (fields.get("name") or "").strip() or None
        note = fields.get("note", "")[:MAX_NOTE]
        row, _report = await run_in_threadpool(_store, request, session, settings, principal, schema_text, name,
                                               note, staged)
    finally:
        staged.unlink(missing_ok=True)
        await run_in_threadpool(slot.release)
    request.state.object = f"upload:{principal.org_code}/{row.name}/v{row.version}"
    request.state.audit_detail = {"upload": row.name, "version": row.version, "rows": row.row_count,
                                  "sha256": row.sha256, "format": row.format}
    return redirect(request, f"/uploads?stored={row.name}%20v{row.version}")


# --- analysis templates ----------------------------------------------------------------------------

@router.post("/scenes/{scene_id}/templates/{name}/runs", name="templates.run")
def template_run(scene_id: int, name: str, request: Request, ctx: scene_action("query"), session: SessionDep,
                 settings: SettingsDep, upload: Annotated[str, Form(min_length=1, max_length=63)],
                 mode: Annotated[Literal["dev", "prod"], Form()],
                 params: Annotated[str, Form(max_length=4000)] = "") -> Response:
    """`POST /api/v1/scenes/{id}/templates/{name}/runs` from a form: the API's `TemplateRunIn`, then
    `sandbox.templates.runs.run` (which checks the scene, the approved digest, the data list and the
    upload); the run's query page follows."""
    import json

    from api.routes.queries import TemplateRunIn
    from sandbox.templates import runs as template_runs

    try:
        parsed = json.loads(params) if params.strip() else {}
    except (ValueError, RecursionError):
        raise invalid("bad_params", "The parameters are not valid JSON (an object, e.g. {\"as_of\": \"2025-06-30\"}).",
                      "参数不是有效的 JSON（应为对象，如 {\"as_of\": \"2025-06-30\"}）。") from None
    try:
        body = TemplateRunIn(upload=upload.strip(), params=parsed, mode=mode)
    except ValidationError as e:
        raise _form_error(e) from None
    request.state.audit_detail = {"template": name, "upload": body.upload, "mode": body.mode, "params": body.params}
    q = template_runs.run(session, settings, ctx.principal, ctx.scene, name[:64], body.upload, body.params, body.mode,
                          request.state.request_id)
    request.state.object = f"query:{q.id}"
    return redirect(request, f"/queries/{q.id}")


# --- trace a found file ------------------------------------------------------------------------------

@router.get("/trace", name="console.trace_page")
def trace_page(request: Request, principal: page("trace", "create")) -> Response:
    return render(request, "trace.html", out=None)


@router.post("/trace", name="trace.create")
async def trace_file(request: Request, principal: page("trace", "create"), session: SessionDep,
                     settings: SettingsDep) -> Response:
    """`POST /api/v1/trace` from a form: the file streamed into the domain's staging folder (never
    the system's temp), then `sandbox.results.export.trace`, the same audit detail; the match on a page."""
    import uuid

    from starlette.concurrency import run_in_threadpool

    from api.routes.results import MAX_TRACE_BYTES
    from api.uploads import receive_file

    check_origin(request)
    settings.ensure_home()
    staged = settings.staging_dir / f"trace-{uuid.uuid4().hex}"
    try:
        try:
            received = await receive_file(request, staged, MAX_TRACE_BYTES)
        except PdaoError as e:
            if e.status == 413:
                raise PdaoError(413, "file_too_large", f"A traced file may be at most {MAX_TRACE_BYTES // 1024 // 1024} MB.",
                                f"待溯源文件不得超过 {MAX_TRACE_BYTES // 1024 // 1024} MB。") from None
            raise
        check_token(request, received.fields.get(CSRF_FIELD))
        data = staged.read_bytes()
    finally:
        staged.unlink(missing_ok=True)
    # the part's file name is not kept by the streaming reader: the format comes from the content
    # (the name only breaks ties between delimiters, sandbox.results.fingerprint.read_found)
    out = await run_in_threadpool(export.trace, session, settings, data, None)
    request.state.audit_detail = {"matched": out["matched"], "match": out.get("match"),
                                  "export_id": out.get("export_id"), "result_id": out.get("result_id")}
    if out.get("result_id"):
        request.state.object = f"result:{out['result_id']}"
        request.state.scene_id = out.get("scene_id")
    return render(request, "trace.html", out=out)


# --- company budgets per dataset (docs/queries.md) ----------------------------------------------------

@router.get("/budgets", name="console.budgets")
def budgets_page(request: Request, principal: page("budget", "read"), session: SessionDep, settings: SettingsDep,
                 org: Annotated[str | None, QueryParam(max_length=64)] = None,
                 dataset: Annotated[str | None, QueryParam(max_length=128)] = None) -> Response:
    """`GET /api/v1/budgets` as a page: every company's budget per dataset for the office and
    auditors, a tenant its own company's (`ledger.budget_scope`); the office's cap forms."""
    from api.routes.budgets import list_budgets

    request.state.object = "budget"
    out = list_budgets(principal, session, settings, org or None, dataset or None)
    return render(request, "budgets.html", budgets=out, may_set_cap=_may(principal, "budget", "write"),
                  f={"org": org or "", "dataset": dataset or ""})


@router.post("/budgets/{org}/{dataset}", name="budgets.set")
def budget_set(org: Annotated[str, PathParam(max_length=64)], dataset: Annotated[str, PathParam(max_length=128)],
               request: Request, principal: action("budget", "write"), session: SessionDep, settings: SettingsDep,
               epsilon: Annotated[str, Form(min_length=1, max_length=20)],
               delta: Annotated[str, Form(max_length=20)] = "", reason: Annotated[str, Form(max_length=500)] = "",
               next: Annotated[str, Form(max_length=400)] = "") -> Response:  # noqa: A002
    """`PUT /api/v1/budgets/{org}/{dataset}` from a form: the API's `CapIn`, then its very route
    (`ledger.set_company_cap` and the `budget.cap_set` event in one transaction; never below what
    is spent: 409 `cap_below_spent`); back to the page the form was on."""
    from api.routes.budgets import CapIn, set_budget

    try:
        body = CapIn(epsilon=epsilon.strip(), delta=delta.strip() or None, reason=reason.strip())
    except ValidationError as e:
        raise _form_error(e) from None
    set_budget(org, dataset, body, principal, session, settings, request)
    return redirect(request, safe_next(next) if next else url("/budgets"))


def _company_budgets_of(session, settings, principal) -> list[Any]:  # noqa: ANN001
    """The tenant's own company's budget per dataset (`ledger.company_budgets`), for its gauges."""
    from sandbox.budgets import ledger

    if not _may(principal, "budget", "read"):
        return []
    return ledger.company_budgets(session, settings,
                                  org_id=ledger.budget_scope(principal.role, principal.org_id, principal.org_kind))


# --- API keys: granted by an operator, claimed by their owner (docs/identity.md) ---------------------

def _key_view(row, owner: str, grantor: str | None, now: datetime) -> dict[str, Any]:  # noqa: ANN001
    """A key's metadata as `GET /api/v1/api-keys` gives it: never the key (only its digest is kept)."""
    return {"id": row.id, "owner": owner, "status": identity.key_status(row, now), "prefix": row.prefix,
            "label": row.label, "granted_by": grantor, "created_at": row.created_at, "claim_by": row.claim_by,
            "claimed_at": row.claimed_at, "valid_days": row.valid_days, "expires_at": row.expires_at,
            "revoked_at": row.revoked_at, "last_used_at": row.last_used_at}


@router.get("/api-keys", name="console.api_keys")
def api_keys_page(request: Request, principal: page("api_key", "read"), session: SessionDep,
                  granted: Annotated[int | None, QueryParam(ge=1, le=MAX_ID)] = None) -> Response:
    """The operator: every key, the grant form, revoke; an applicant or provider: their own keys,
    claim a pending grant (the key is shown once), revoke."""
    request.state.object = "api_key"
    now = utcnow()
    keys = [_key_view(k, owner, grantor, now) for k, owner, grantor in identity.list_api_keys(session, principal)]
    just = next((k for k in keys if k["id"] == granted), None) if granted else None
    return render(request, "api_keys.html", keys=keys, granted=just, may_grant=_may(principal, "api_key", "issue"),
                  may_claim=_may(principal, "api_key", "claim"), may_revoke=_may(principal, "api_key", "revoke"))


@router.post("/api-keys", name="api_keys.grant")
def api_key_grant(request: Request, principal: action("api_key", "issue"), session: SessionDep,
                  settings: SettingsDep, username: Annotated[str, Form(min_length=1, max_length=64)],
                  label: Annotated[str, Form(max_length=200)] = "",
                  valid_days: Annotated[str, Form(max_length=5)] = "365") -> Response:
    """`POST /api/v1/api-keys`: the operator grants a pending key (no secret exists); its owner
    claims it here, signed in with their own password, before `claim_by`."""
    from api.routes.admin import ApiKeyIn

    try:
        body = ApiKeyIn(username=username.strip(), label=label.strip(), valid_days=valid_days.strip() or 365)
    except ValidationError as e:
        raise _form_error(e) from None
    request.state.object = f"user:{body.username}"
    row = identity.grant_api_key(session, principal, body.username, body.label, body.valid_days,
                                 identity.claim_window(settings), request.state.request_id)
    session.commit()
    return redirect(request, f"/api-keys?granted={row.id}")


@router.post("/api-keys/{key_id}/claim", name="api_keys.claim")
async def api_key_claim(key_id: int, request: Request, principal: action("api_key", "claim"),
                        password: Annotated[str, Form(max_length=256)] = "") -> Response:
    """`POST /api/v1/api-keys/{id}/claim`: the owner, signed in, claims a pending grant with their
    password typed again (counted like a login, through the same bounds); the key is made now and
    shown on this answer only (`no-store`): a reload posts again and is refused (409 `api_key_claimed`)."""
    request.state.object = f"api_key:{key_id}"
    settings, request_id = request.app.state.settings, request.state.request_id

    def claim(session) -> tuple[str, dict[str, Any]]:  # noqa: ANN001
        key, row = identity.claim_api_key(session, settings, principal, key_id, password, request_id,
                                          client_address(request))
        session.commit()
        owner, grantor = _key_names(session, row)
        return key, _key_view(row, owner, grantor, utcnow())

    def refusals(session) -> None:  # noqa: ANN001 - what is refused before any password check
        identity.claimable_grant(session, principal, key_id, password)

    key, view = await checking_password(request, claim, before=refusals)
    resp = render(request, "api_key_claimed.html", key=key, k=view)
    resp.headers["Cache-Control"] = "no-store"
    resp.headers["Pragma"] = "no-cache"
    return resp


def _key_names(session, row) -> tuple[str, str | None]:  # noqa: ANN001
    from pdao.kernel.identity.models import User

    owner = session.get(User, row.user_id)
    grantor = session.get(User, row.issued_by) if row.issued_by is not None else None
    return (owner.username if owner else "?"), (grantor.username if grantor else None)


@router.post("/api-keys/{key_id}/revoke", name="api_keys.revoke")
def api_key_revoke(key_id: int, request: Request, principal: action("api_key", "revoke"),
                   session: SessionDep) -> Response:
    """`DELETE /api/v1/api-keys/{id}` from a form: the operator any key, an owner their own
    (another user's answers 404, like a missing one); at once, also a pending grant."""
    request.state.object = f"api_key:{key_id}"
    identity.revoke_api_key(session, principal, key_id, request.state.request_id)
    session.commit()
    return redirect(request, "/api-keys")
