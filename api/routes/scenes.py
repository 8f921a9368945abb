"""Scenes: application, review, suspension, revocation, emergency stop, and "who may do what"."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, status
from pydantic import BaseModel

from api.deps import SessionDep, SettingsDep, caller, scene_access
from policies.rules import Usage, rule_table
from sandbox.scenes import service as scenes
from sandbox.scenes.schemas import (
    EmergencyStopIn,
    Explanation,
    ReasonIn,
    ReviewIn,
    SceneIn,
    ScenePatch,
    SceneSummary,
)
from sandbox.scenes.service import SceneView

router = APIRouter(tags=["scenes"])


@router.post("/scenes", name="scenes.create", response_model=SceneView, status_code=status.HTTP_201_CREATED)
def create_scene(body: SceneIn, principal: caller("scene", "create"), session: SessionDep, settings: SettingsDep,
                 request: Request) -> SceneView:
    """Draft a scene application. Refused at once, item by item, where the rule table says no."""
    scene = scenes.create(session, settings, principal, body)
    session.commit()
    request.state.scene_id, request.state.object = scene.id, f"scene:{scene.id}"
    return scenes.to_out(session, settings, scene, viewer=principal)


@router.get("/scenes", name="scenes.list", response_model=list[SceneSummary])
def list_scenes(principal: caller("scene", "read"), session: SessionDep,
                status_: Annotated[str | None, Query(alias="status", max_length=12)] = None) -> list[SceneSummary]:
    """The scenes the caller may see (an applicant: its own organization's)."""
    return scenes.list_visible(session, principal, status_)


@router.get("/scenes/{scene_id}", name="scenes.read", response_model=SceneView)
def get_scene(ctx: scene_access("read"), session: SessionDep, settings: SettingsDep) -> SceneView:
    """Status, data list (struck items marked), effective items, budget, reviews and history; per
    dataset, the company's budget across its scenes (the office, auditors and the tenant itself)."""
    return scenes.to_out(session, settings, ctx.scene, viewer=ctx.principal)


@router.patch("/scenes/{scene_id}", name="scenes.edit", response_model=SceneView)
def edit_scene(body: ScenePatch, ctx: scene_access("edit"), session: SessionDep, settings: SettingsDep) -> SceneView:
    """Edit a draft or returned application (`items` replaces the whole list)."""
    scenes.update(session, settings, ctx.principal, ctx.scene, body)
    session.commit()
    return scenes.to_out(session, settings, ctx.scene, viewer=ctx.principal)


@router.post("/scenes/{scene_id}/submit", name="scenes.submit", response_model=SceneView)
def submit_scene(ctx: scene_access("submit"), session: SessionDep, settings: SettingsDep) -> SceneView:
    scenes.submit(session, settings, ctx.principal, ctx.scene)
    session.commit()
    return scenes.to_out(session, settings, ctx.scene, viewer=ctx.principal)


@router.post("/scenes/{scene_id}/reviews", name="scenes.review", response_model=SceneView)
def review_scene(body: ReviewIn, ctx: scene_access("review"), session: SessionDep, settings: SettingsDep,
                 request: Request) -> SceneView:
    """An office member's opinion: approve, reject or return, striking items."""
    request.state.audit_detail = {"decision": body.decision, "struck_items": body.struck_items}
    scenes.review(session, settings, ctx.principal, ctx.scene, body)
    session.commit()
    return scenes.to_out(session, settings, ctx.scene, viewer=ctx.principal)


@router.post("/scenes/{scene_id}/suspend", name="scenes.suspend", response_model=SceneView)
def suspend_scene(ctx: scene_access("suspend"), session: SessionDep, settings: SettingsDep,
                  body: ReasonIn | None = None) -> SceneView:
    scenes.suspend(session, ctx.principal, ctx.scene, body.reason if body else "")
    session.commit()
    return scenes.to_out(session, settings, ctx.scene, viewer=ctx.principal)


@router.post("/scenes/{scene_id}/resume", name="scenes.resume", response_model=SceneView)
def resume_scene(ctx: scene_access("resume"), session: SessionDep, settings: SettingsDep,
                 body: ReasonIn | None = None) -> SceneView:
    scenes.resume(session, ctx.principal, ctx.scene, body.reason if body else "")
    session.commit()
    return scenes.to_out(session, settings, ctx.scene, viewer=ctx.principal)


@router.post("/scenes/{scene_id}/revoke", name="scenes.revoke", response_model=SceneView)
def revoke_scene(ctx: scene_access("revoke"), session: SessionDep, settings: SettingsDep,
                 body: ReasonIn | None = None) -> SceneView:
    """Revoke for good: the scene's policies are deleted and it never becomes active again."""
    scenes.revoke(session, ctx.principal, ctx.scene, body.reason if body else "")
    session.commit()
    return scenes.to_out(session, settings, ctx.scene, viewer=ctx.principal)


class StopOut(BaseModel):
    suspended: list[int]
    returned: list[int]  # submitted applications sent back: they need a new review


@router.post("/emergency-stop", name="scenes.emergency_stop", response_model=StopOut)
def emergency_stop(body: EmergencyStopIn, principal: caller("emergency_stop", "create"), session: SessionDep,
                   request: Request) -> StopOut:
    """Suspend every approved scene of an organization, or touching a dataset, in one transaction."""
    request.state.object = f"org:{body.org}" if body.org else f"dataset:{body.dataset}"
    stopped, returned = scenes.emergency_stop(session, principal, body.org, body.dataset, body.reason)
    session.commit()
    request.state.audit_detail = {"suspended": stopped, "returned": returned}
    return StopOut(suspended=stopped, returned=returned)


@router.get("/policy/rules", name="policy.rules")
def policy_rules(_principal: caller("policy", "read")) -> dict:
    """The rule table (grade × sensitivity × usage) that refuses or admits data-list items."""
    return rule_table()


@router.get("/scenes/{scene_id}/explain", name="scenes.explain", response_model=Explanation)
def explain(ctx: scene_access("read"), session: SessionDep, request: Request,
            dataset: Annotated[str, Query(max_length=128)], field: Annotated[str, Query(max_length=64)],
            usage: Usage) -> Explanation:
    """May the scene's tenant use dataset.field as `usage` now? The decision and the rule that made it."""
    org = scenes.tenant_code(session, ctx.scene)
    return scenes.explain(session, request.app.state.scene_enforcers, ctx.scene, org, dataset, field, usage.value,
                          viewer=ctx.principal)
