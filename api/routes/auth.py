from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.security import OAuth2PasswordRequestForm
from pydantic import BaseModel

from api.deps import SessionDep, SettingsDep, caller
from pdao.identity import service

router = APIRouter(tags=["auth"])


class TokenOut(BaseModel):
    access_token: str
    token_type: str = "bearer"
    expires_at: str
    role: str
    org: str


@router.post("/auth/token", name="auth.login", response_model=TokenOut)
def login(request: Request, form: Annotated[OAuth2PasswordRequestForm, Depends()], session: SessionDep,
          settings: SettingsDep) -> TokenOut:
    """OAuth2 password flow: username and password in a form, a bearer token back."""
    request.state.action = "auth.login"
    request.state.attempted_actor = form.username[:64]
    token, principal, expires_at = service.login(session, settings, form.username, form.password)
    session.commit()
    request.state.principal = principal
    return TokenOut(access_token=token, expires_at=expires_at.isoformat(), role=principal.role.value,
                    org=principal.org_code)


@router.post("/auth/logout", name="auth.logout", status_code=204)
def logout(principal: caller("me", "read"), session: SessionDep) -> None:
    """End every session of the caller: the bearer tokens issued to them so far stop working."""
    service.logout(session, principal)
    session.commit()


class MeOut(BaseModel):
    username: str
    role: str
    org: str
    org_kind: str
    auth_method: str


@router.get("/me", name="me.read", response_model=MeOut)
def me(principal: caller("me", "read")) -> MeOut:
    return MeOut(username=principal.username, role=principal.role.value, org=principal.org_code,
                 org_kind=principal.org_kind, auth_method=principal.auth_method)
