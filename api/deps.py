"""The one authentication + authorization path every endpoint goes through (FastAPI dependencies).

`Authorized(resource, action)` authenticates the caller (bearer token or X-API-Key), asks casbin
whether the caller's role may do `action` on `resource`, and leaves who and what on
`request.state` for the audit middleware, which records every request, allowed or denied.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Annotated, NamedTuple

from fastapi import Depends, Request
from fastapi.security import OAuth2PasswordBearer
from sqlmodel import Session

from pdao.kernel.config import Settings
from pdao.kernel.db import id_in_range
from pdao.kernel.errors import PdaoError, forbidden, invalid, unauthorized
from pdao.kernel.identity.service import Principal, principal_from_api_key, principal_from_token
from policies import access
from policies.enforcer import role_may
from sandbox.scenes.models import Scene
from sandbox.scenes.service import get_visible

# auto_error=False: a missing token is our own 401 JSON, and API keys are an alternative.
oauth2_scheme = OAuth2PasswordBearer(tokenUrl="/api/v1/auth/token", auto_error=False)


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    """A session per request. Routes commit what they acknowledge before answering."""
    with Session(request.app.state.engine, expire_on_commit=False) as session:
        yield session


SettingsDep = Annotated[Settings, Depends(get_settings)]


def utc_instant(value: datetime | None, field: str) -> datetime | None:
    """A time filter as an aware UTC instant (UTC when no offset is given); 422 `bad_time` for one
    whose offset leaves the calendar or that lies outside 1900–9000 (a window around it must fit)."""
    if value is None:
        return None
    try:
        at = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except OverflowError:
        at = None
    if at is None or not 1900 <= at.year <= 9000:
        raise invalid("bad_time", f"{field}: a time between the years 1900 and 9000, like 2025-01-31T08:00:00+08:00.",
                      f"{field}：请使用 1900 至 9000 年之间的时间，如 2025-01-31T08:00:00+08:00。")
    return at
SessionDep = Annotated[Session, Depends(get_session)]


def _authenticate(request: Request, session: Session, settings: Settings, token: str | None) -> Principal:
    api_key = request.headers.get("x-api-key")
    if token:
        principal = principal_from_token(session, settings, token)
    elif api_key:
        principal = principal_from_api_key(session, api_key)
        session.commit()  # last_used_at
    else:
        raise unauthorized()
    return principal


class Authorized:
    """Dependency: the caller, authenticated and allowed to do `action` on `resource`."""

    def __init__(self, resource: str, action: str) -> None:
        self.resource = resource
        self.action = action

    def __call__(self, request: Request, session: SessionDep, settings: SettingsDep,
                 token: Annotated[str | None, Depends(oauth2_scheme)]) -> Principal:
        principal = self.authenticate(request, session, settings, token)
        self.authorize(principal)
        return principal

    def authenticate(self, request: Request, session: Session, settings: Settings, token: str | None) -> Principal:
        # The audit middleware reads action and principal; the error handlers add the reason.
        request.state.action = f"{self.resource}.{self.action}"
        try:
            principal = _authenticate(request, session, settings, token)
        except PdaoError as e:
            request.state.attempted_actor = getattr(e, "attempted_actor", None)
            raise
        request.state.principal = principal
        return principal

    def authorize(self, principal: Principal) -> None:
        # the role table (casbin), then whose objects the caller reaches (policies/access.py): an
        # auditor employed by a company is a tenant, and a tenant never reads the audit trail
        if not role_may(principal.role.value, self.resource, self.action):
            raise forbidden("role_not_permitted",
                            f"The role '{principal.role}' may not {self.action} {self.resource}.",
                            f"角色 {principal.role} 无权对 {self.resource} 执行 {self.action}。")
        if access.reach_of(principal, self.resource) is access.FORBIDDEN:
            raise forbidden("tenant_not_permitted",
                            f"Anyone employed by a company is a tenant, and a tenant may not {self.action} "
                            f"{self.resource}.",
                            f"企业人员视同数据使用方，不得对 {self.resource} 执行 {self.action}。")


def caller(resource: str, action: str):  # noqa: ANN201 - an Annotated type
    return Annotated[Principal, Depends(Authorized(resource, action))]


class SceneContext(NamedTuple):
    principal: Principal
    scene: Scene


class SceneAccess:
    """Dependency for /scenes/{scene_id}/…: the scene is one the caller may see, and the caller's
    role may `action` scenes. Visibility comes first: another tenant's scene answers 404 to every
    endpoint, exactly like a missing one, whatever the caller's role."""

    def __init__(self, action: str) -> None:
        self._authorized = Authorized("scene", action)

    def __call__(self, scene_id: int, request: Request, session: SessionDep, settings: SettingsDep,
                 token: Annotated[str | None, Depends(oauth2_scheme)]) -> SceneContext:
        principal = self._authorized.authenticate(request, session, settings, token)
        if id_in_range(scene_id):     # (beyond it, the audit row could not hold the id: 404 below)
            request.state.scene_id = scene_id
        request.state.object = f"scene:{scene_id}"
        scene = get_visible(session, principal, scene_id)
        self._authorized.authorize(principal)
        return SceneContext(principal, scene)


def scene_access(action: str):  # noqa: ANN201 - an Annotated type
    return Annotated[SceneContext, Depends(SceneAccess(action))]
