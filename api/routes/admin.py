"""Users (the operator) and API keys: an operator grants one, its owner claims it (pdao/kernel/identity/service.py)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Request, status
from pydantic import BaseModel, Field
from sqlmodel import Session

from api.deps import SessionDep, SettingsDep, caller
from api.routes.auth import checking_password, client_address
from pdao.kernel.db import utcnow
from pdao.kernel.identity import service
from pdao.kernel.identity.models import ApiKey, User

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
    valid_days: Annotated[int, Field(ge=1, le=3650)] = 365   # the key's life, counted from its claim


class ApiKeyOut(BaseModel):
    """A key's metadata, never the key: `status` pending (granted, waiting for its owner), active,
    expired, lapsed (not claimed in time) or revoked; `prefix` names the key once it is claimed."""

    id: int
    username: str            # the owner
    status: str
    prefix: str | None
    label: str
    granted_by: str | None
    created_at: datetime
    claim_by: datetime | None
    claimed_at: datetime | None
    valid_days: int | None
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None


class ApiKeyGranted(ApiKeyOut):
    claim_path: str          # where the owner, signed in, claims the key with their password


class ApiKeyClaimIn(BaseModel):
    # the owner's own, typed again (missing: 422 password_required, after the grant's own refusals)
    password: str | None = Field(default=None, max_length=256)


class ApiKeyClaimed(ApiKeyOut):
    key: str  # shown once, to its owner


def _key_out(row: ApiKey, owner: str, grantor: str | None) -> dict:
    return dict(id=row.id, username=owner, status=service.key_status(row, utcnow()), prefix=row.prefix,
                label=row.label, granted_by=grantor, created_at=row.created_at, claim_by=row.claim_by,
                claimed_at=row.claimed_at, valid_days=row.valid_days, expires_at=row.expires_at,
                revoked_at=row.revoked_at, last_used_at=row.last_used_at)


def _names(session: SessionDep, row: ApiKey) -> tuple[str, str | None]:
    owner = session.get(User, row.user_id)
    grantor = session.get(User, row.issued_by) if row.issued_by is not None else None
    return owner.username, grantor.username if grantor else None


@router.post("/api-keys", name="api_keys.grant", response_model=ApiKeyGranted, status_code=status.HTTP_201_CREATED)
def grant_api_key(body: ApiKeyIn, principal: caller("api_key", "issue"), session: SessionDep, settings: SettingsDep,
                  request: Request) -> ApiKeyGranted:
    """An operator grants a user an API key. No key exists yet: the owner claims it, signed in
    with their own password, at `claim_path` (before `claim_by`)."""
    request.state.object = f"user:{body.username}"
    row = service.grant_api_key(session, principal, body.username, body.label, body.valid_days,
                                service.claim_window(settings), request.state.request_id)
    session.commit()
    return ApiKeyGranted(claim_path=request.url_for("api_keys.claim", key_id=row.id).path,
                         **_key_out(row, *_names(session, row)))


@router.post("/api-keys/{key_id}/claim", name="api_keys.claim", response_model=ApiKeyClaimed)
async def claim_api_key(key_id: int, principal: caller("api_key", "claim"), request: Request,
                        body: ApiKeyClaimIn | None = None) -> ApiKeyClaimed:
    """The owner claims a granted key: signed in (a bearer token from their own login, not an API
    key) and with their password typed again, which counts towards the lockout like a login. The
    key is made now and answered this once."""
    request.state.object = f"api_key:{key_id}"
    settings, request_id = request.app.state.settings, request.state.request_id
    password = body.password if body is not None else None

    def claim(session: Session) -> ApiKeyClaimed:
        key, row = service.claim_api_key(session, settings, principal, key_id, password, request_id,
                                         client_address(request))
        session.commit()
        return ApiKeyClaimed(key=key, **_key_out(row, *_names(session, row)))

    return await checking_password(request, claim, before=lambda session: service.claimable_grant(
        session, principal, key_id, password))


@router.get("/api-keys", name="api_keys.list", response_model=list[ApiKeyOut])
def list_api_keys(principal: caller("api_key", "read"), session: SessionDep) -> list[ApiKeyOut]:
    """The operator: every key's metadata; an applicant or provider: their own, pending and claimed."""
    return [ApiKeyOut(**_key_out(k, owner, grantor)) for k, owner, grantor in service.list_api_keys(session, principal)]


@router.delete("/api-keys/{key_id}", name="api_keys.revoke", response_model=ApiKeyOut)
def revoke_api_key(key_id: int, principal: caller("api_key", "revoke"), session: SessionDep,
                   request: Request) -> ApiKeyOut:
    """Revoke a key or a pending grant: the operator any, an owner their own."""
    request.state.object = f"api_key:{key_id}"
    row = service.revoke_api_key(session, principal, key_id, request.state.request_id)
    session.commit()
    return ApiKeyOut(**_key_out(row, *_names(session, row)))
