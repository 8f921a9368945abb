"""Login, logout, `/me` — and the one way any route checks a password (`checking_password`)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.security import OAuth2PasswordRequestForm
from pydantic import BaseModel
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from api.deps import SessionDep, caller
from pdao.kernel.errors import PdaoError
from pdao.kernel.identity import service
from pdao.kernel.identity.service import Principal
from pdao.kernel.identity.throttle import UNCHECKED, LoginGuard

router = APIRouter(tags=["auth"])

T = TypeVar("T")
_guard_lock = threading.Lock()


def login_guard(app: FastAPI) -> LoginGuard:
    """This app's bounds on password checks (pdao/kernel/identity/throttle.py), made on first use."""
    guard = getattr(app.state, "login_guard", None)
    if guard is None:
        with _guard_lock:
            guard = getattr(app.state, "login_guard", None)
            if guard is None:
                guard = app.state.login_guard = LoginGuard.from_settings(app.state.settings)
    return guard


def client_address(request: Request) -> str | None:
    """The address a login is counted from: the connection's peer (`pdao serve` trusts no
    forwarding header, so a client cannot choose it)."""
    return request.client.host if request.client else None


async def checking_password(request: Request, check: Callable[[Session], T],
                            before: Callable[[Session], None] | None = None) -> T:
    """Run `check` — work that checks a password (Argon2id) — within the bounds: first a token of
    the client address's bucket (else 429 login_rate_limited, before the database is touched),
    then `before` (refusals that need no hash, e.g. a locked name: they never wait for a turn),
    then one of the process's hash slots (waiting without a thread; else 429 login_busy), then
    `check` on a worker thread with its own session. An attempt that ends without a check gives
    its token back. The API's login, the console's, and both claim forms go through here."""
    engine = request.app.state.engine
    guard = login_guard(request.app)
    host = request.client.host if request.client else None

    def in_session(work: Callable[[Session], T]) -> T:
        with Session(engine, expire_on_commit=False) as session:
            return work(session)

    guard.rate.take(host)
    checking = False
    try:
        if before is not None:
            await run_in_threadpool(in_session, before)
        async with guard.slots.held():
            checking = True
            return await run_in_threadpool(in_session, check)
    except PdaoError as e:
        if not checking or e.code in UNCHECKED:   # refused before any hash: the token goes back
            guard.rate.give_back(host)
        raise


async def password_login(request: Request, username: str, password: str) -> tuple[str, Principal, datetime]:
    """`service.login` within the bounds of `checking_password`, committed. A failed attempt is
    audited with no actor: the name typed goes into `detail.attempted_username` (whoever typed it
    is not that user); a success names the user."""
    settings = request.app.state.settings
    request.state.action = "auth.login"
    request.state.audit_detail = {"attempted_username": username[:64]}

    address = client_address(request)

    def check(session: Session) -> tuple[str, Principal, datetime]:
        out = service.login(session, settings, username, password, address)
        session.commit()
        return out

    token, principal, expires_at = await checking_password(
        request, check, before=lambda session: service.refuse_if_locked(session, settings, username, address))
    request.state.principal = principal
    request.state.audit_detail = None
    return token, principal, expires_at


class TokenOut(BaseModel):
    access_token: str
    token_type: str = "bearer"
    expires_at: str
    role: str
    org: str


@router.post("/auth/token", name="auth.login", response_model=TokenOut)
async def login(request: Request, form: Annotated[OAuth2PasswordRequestForm, Depends()]) -> TokenOut:
    """OAuth2 password flow: username and password in a form, a bearer token back. At most
    `PDAO_LOGIN_RATE_PER_MINUTE` password checks per client address (429 login_rate_limited) and
    `PDAO_LOGIN_CONCURRENT_HASHES` at once (429 login_busy), then the lockout (429 login_locked)."""
    token, principal, expires_at = await password_login(request, form.username, form.password)
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
