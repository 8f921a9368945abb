"""The operator's endpoints: users and API keys for scripts."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Request, status
from pydantic import BaseModel, Field
from sqlmodel import select

from api.deps import SessionDep, caller
from pdao.identity import service
from pdao.identity.models import ApiKey, User

router = APIRouter(tags=["admin"])


class UserOut(BaseModel):
    username: str
    display_name: str
    org: str
    role: str
    is_active: bool
    last_login_at: datetime | None


@router.get("/users", name="users.list", response_model=list[UserOut])
def list_users(_principal: caller("user", "read"), session: SessionDep) -> list[UserOut]:
    return [UserOut(username=u.username, display_name=u.display_name, org=o.code, role=u.role,
                    is_active=u.is_active, last_login_at=u.last_login_at) for u, o in service.list_users(session)]


class ApiKeyIn(BaseModel):
    username: str = Field(max_length=64)
    label: str = Field(default="", max_length=200)
    valid_days: Annotated[int, Field(ge=1, le=3650)] = 365


class ApiKeyOut(BaseModel):
    id: int
    username: str
    prefix: str
    label: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None


class ApiKeyIssued(ApiKeyOut):
    key: str  # shown once


def _key_out(row: ApiKey, username: str) -> dict:
    return dict(id=row.id, username=username, prefix=row.prefix, label=row.label, created_at=row.created_at,
                expires_at=row.expires_at, revoked_at=row.revoked_at, last_used_at=row.last_used_at)


@router.post("/api-keys", name="api_keys.issue", response_model=ApiKeyIssued, status_code=status.HTTP_201_CREATED)
def issue_api_key(body: ApiKeyIn, principal: caller("api_key", "issue"), session: SessionDep,
                  request: Request) -> ApiKeyIssued:
    request.state.object = f"user:{body.username}"
    key, row = service.issue_api_key(session, body.username, principal.user_id, body.label, body.valid_days)
    session.commit()
    return ApiKeyIssued(key=key, **_key_out(row, body.username))


@router.get("/api-keys", name="api_keys.list", response_model=list[ApiKeyOut])
def list_api_keys(_principal: caller("api_key", "read"), session: SessionDep) -> list[ApiKeyOut]:
    rows = session.exec(select(ApiKey, User.username).join(User, ApiKey.user_id == User.id).order_by(ApiKey.id)).all()
    return [ApiKeyOut(**_key_out(k, name)) for k, name in rows]


@router.delete("/api-keys/{key_id}", name="api_keys.revoke", response_model=ApiKeyOut)
def revoke_api_key(key_id: int, _principal: caller("api_key", "revoke"), session: SessionDep,
                   request: Request) -> ApiKeyOut:
    request.state.object = f"api_key:{key_id}"
    row = service.revoke_api_key(session, key_id)
    session.commit()
    return ApiKeyOut(**_key_out(row, session.get(User, row.user_id).username))
