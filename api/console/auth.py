"""The console's session, CSRF check and dependencies — over the API's own authentication and
casbin authorization (`api.deps.Authorized`, `api.deps.SceneAccess`), never beside them.

The session is the very bearer token `POST /api/v1/auth/token` issues (same `identity.service.login`),
carried in an HttpOnly, SameSite=Strict cookie and handed to `Authorized` exactly where the API hands
it the `Authorization` header. Every unsafe console request also carries a double-submit CSRF token
(a random cookie, the same value in a hidden form field, compared with `hmac.compare_digest`) and,
when the browser sends them, an `Origin` of this very site and no `Sec-Fetch-Site: cross-site`.
"""

from __future__ import annotations

import hmac
import secrets
from typing import Annotated

from fastapi import Depends, Form, Request
from sqlmodel import Session

from api.deps import Authorized, SceneAccess, SceneContext, SessionDep, SettingsDep
from pdao.kernel.config import Settings
from pdao.kernel.errors import PdaoError
from pdao.kernel.identity.service import Principal

PREFIX = "/console"
SESSION_COOKIE = "pdao_session"
CSRF_COOKIE = "pdao_csrf"
LANG_COOKIE = "pdao_lang"
CSRF_FIELD = "csrf_token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def session_token(request: Request) -> str | None:
    token = request.cookies.get(SESSION_COOKIE)
    return token or None


def csrf_token(request: Request) -> str:
    """This browser's CSRF token: the cookie's, or a new one (set on the answer by `render`)."""
    token = request.cookies.get(CSRF_COOKIE) or getattr(request.state, "new_csrf", None)
    if not token or len(token) > 128:
        token = secrets.token_urlsafe(32)
        request.state.new_csrf = token
    return token


def csrf_failed() -> PdaoError:
    return PdaoError(403, "csrf_failed", "The form has expired or did not come from this console; reload the page "
                     "and try again.", "表单已过期或来源不可信，请刷新页面后重试。")


def _own_origin(request: Request) -> str:
    return f"{request.url.scheme}://{request.url.netloc}"


def check_origin(request: Request) -> None:
    """The Origin half of the check: when the browser names them, this very site and not cross-site.
    A file form (`/console/uploads`, `/console/trace`) runs it before a byte of the body is read."""
    origin = request.headers.get("origin")
    if origin is not None and origin != _own_origin(request):
        raise csrf_failed()
    if request.headers.get("sec-fetch-site") == "cross-site":
        raise csrf_failed()


def check_csrf(request: Request, submitted: str | None) -> None:
    """Double-submit token plus Origin: refuse a form that did not come from a console page."""
    if request.method in SAFE_METHODS:
        return
    check_origin(request)
    check_token(request, submitted)


def check_token(request: Request, submitted: str | None) -> None:
    """The double-submit half: the form's hidden token equals the CSRF cookie."""
    cookie = request.cookies.get(CSRF_COOKIE)
    if not cookie or not submitted or not hmac.compare_digest(cookie.encode(), submitted.encode()):
        raise csrf_failed()


class Page:
    """A console page's caller: `Authorized(resource, action)` of the API, with the session cookie as
    the bearer token (401 → the login page; 403 → a bilingual refusal). Audited by the middleware
    like any API request."""

    def __init__(self, resource: str, action: str) -> None:
        self._authorized = Authorized(resource, action)

    def __call__(self, request: Request, session: SessionDep, settings: SettingsDep) -> Principal:
        return self._authorized(request, session, settings, session_token(request))


class Action(Page):
    """A console form POST: the page's caller, then the CSRF check (so a refusal names who it was)."""

    def __call__(self, request: Request, session: SessionDep, settings: SettingsDep,  # type: ignore[override]
                 csrf_token: Annotated[str, Form(max_length=128)] = "") -> Principal:
        principal = super().__call__(request, session, settings)
        check_csrf(request, csrf_token)
        return principal


class ScenePage:
    """A console page under /console/scenes/{scene_id}: the API's `SceneAccess(action)` (another
    tenant's scene is 404, like a missing one), with the session cookie as the bearer token."""

    def __init__(self, action: str) -> None:
        self._access = SceneAccess(action)

    def __call__(self, scene_id: int, request: Request, session: SessionDep, settings: SettingsDep) -> SceneContext:
        return self._access(scene_id, request, session, settings, session_token(request))


class SceneAction(ScenePage):
    def __call__(self, scene_id: int, request: Request, session: SessionDep,  # type: ignore[override]
                 settings: SettingsDep, csrf_token: Annotated[str, Form(max_length=128)] = "") -> SceneContext:
        ctx = super().__call__(scene_id, request, session, settings)
        check_csrf(request, csrf_token)
        return ctx


def page(resource: str, action: str):  # noqa: ANN201 - an Annotated type
    return Annotated[Principal, Depends(Page(resource, action))]


def action(resource: str, action_: str):  # noqa: ANN201
    return Annotated[Principal, Depends(Action(resource, action_))]


def scene_page(action_: str):  # noqa: ANN201
    return Annotated[SceneContext, Depends(ScenePage(action_))]


def scene_action(action_: str):  # noqa: ANN201
    return Annotated[SceneContext, Depends(SceneAction(action_))]


def optional_principal(request: Request, session: Session, settings: Settings) -> Principal | None:
    """Who holds the cookie, if anyone (for the login page's "already signed in"); never raises."""
    token = session_token(request)
    if not token:
        return None
    from pdao.kernel.identity.service import principal_from_token

    try:
        return principal_from_token(session, settings, token)
    except PdaoError:
        return None
