"""Rendering console pages: Jinja2 templates from the package (autoescaped), the language, the CSRF
token, and the headers every page carries (no caching, no framing, nothing loaded from elsewhere)."""

from __future__ import annotations

from datetime import date, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from api.console import svg
from api.console.auth import CSRF_COOKIE, LANG_COOKIE, PREFIX, csrf_token
from api.console.i18n import DEFAULT_LANG, LANGS, pick, translator
from pdao.kernel.identity.models import Role
from policies import access

HERE = Path(__file__).parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"

_env = Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=select_autoescape(default=True),
                   undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)

# Nothing but this site: styles from /console/static, no scripts at all, forms only to ourselves.
CSP = ("default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",   # no-referrer would make the browser send `Origin: null` on our own forms
    "Cache-Control": "no-store",
}


def lang_of(request: Request) -> str:
    chosen = request.query_params.get("lang") or request.cookies.get(LANG_COOKIE)
    return chosen if chosen in LANGS else DEFAULT_LANG


def _fmt_time(v: Any) -> str:
    if isinstance(v, datetime):
        return v.strftime("%Y-%m-%d %H:%M:%S") + (" UTC" if v.tzinfo else "")
    if isinstance(v, date):
        return v.isoformat()
    if isinstance(v, str) and "T" in v:
        return v.replace("T", " ")[:19] + " UTC"
    return "" if v is None else str(v)


def _fmt_num(v: Any, digits: int = 4) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


_env.globals["gauge"] = svg.gauge
_env.filters["when"] = _fmt_time
_env.filters["num"] = _fmt_num


# (label, path, the roles it is for, the resource whose reach may still refuse it: policies/access.py)
NAV: list[tuple[str, str, tuple[Role, ...] | None] | tuple[str, str, tuple[Role, ...] | None, str]] = [
    ("nav.home", "/", None),
    ("nav.catalog", "/catalog", None),
    ("nav.scenes", "/scenes", None),
    ("nav.queries", "/queries", (Role.applicant, Role.office, Role.reviewer, Role.auditor, Role.operator)),
    ("nav.results", "/results", (Role.applicant, Role.office, Role.reviewer, Role.auditor, Role.operator)),
    ("nav.budgets", "/budgets", (Role.applicant, Role.office, Role.auditor)),
    ("nav.uploads", "/uploads", (Role.applicant,)),
    ("nav.uploads_staff", "/uploads", (Role.office, Role.reviewer, Role.auditor)),
    ("nav.reviews", "/reviews", (Role.reviewer,)),
    ("nav.trace", "/trace", (Role.auditor, Role.office), "trace"),
    ("nav.audit", "/audit", (Role.auditor, Role.office), "audit"),
    ("nav.alerts", "/audit/alerts", (Role.auditor, Role.office), "audit"),
    ("nav.emergency", "/emergency-stop", (Role.office,)),
    ("nav.api_keys", "/api-keys", (Role.applicant, Role.provider, Role.operator)),
]


def _shown(principal: Any, entry: tuple) -> bool:
    """A nav entry for this caller: its role is one the entry is for, and (an auditor employed by a
    company) the resource is not one a tenant is refused."""
    roles = entry[2]
    if roles is not None and principal.role not in roles:
        return False
    return len(entry) < 4 or access.reach_of(principal, entry[3]) is not access.FORBIDDEN


def url(path: str) -> str:
    return PREFIX + (path if path.startswith("/") else "/" + path)


def render(request: Request, template: str, http_status: int = 200, **ctx: Any) -> HTMLResponse:
    lang = lang_of(request)
    t, tv = translator(lang)
    principal = getattr(request.state, "principal", None)
    nav = [(t(entry[0]), url(entry[1])) for entry in NAV if principal is not None and _shown(principal, entry)]
    here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    other = "en" if lang == "zh" else "zh"
    context = {
        "t": t, "tv": tv, "lang": lang, "pick": lambda zh, en: pick(lang, zh, en), "principal": principal,
        "csrf": csrf_token(request), "nav": nav, "url": url, "here": request.url.path,
        "switch_lang_url": url(f"/lang/{other}?next={quote(here, safe='')}"), "Role": Role,
    }
    context.update(ctx)
    html = _env.get_template(template).render(**context)
    response = HTMLResponse(html, status_code=http_status)
    finish(request, response)
    return response


def finish(request: Request, response: Response) -> Response:
    """Headers of every console answer; the CSRF cookie where the page made a new token."""
    for k, v in SECURITY_HEADERS.items():
        response.headers.setdefault(k, v)
    new = getattr(request.state, "new_csrf", None)
    if new:
        response.set_cookie(CSRF_COOKIE, new, httponly=True, samesite="strict", path=PREFIX,
                            secure=request.url.scheme == "https")
    if request.query_params.get("lang") in LANGS:
        set_lang(request, response, request.query_params["lang"])
    return response


def set_lang(request: Request, response: Response, lang: str) -> None:
    response.set_cookie(LANG_COOKIE, lang, httponly=True, samesite="strict", path=PREFIX,
                        max_age=365 * 24 * 3600, secure=request.url.scheme == "https")


def redirect(request: Request, path: str) -> Response:
    """After a form POST: see the page (303), with the console's headers."""
    return finish(request, RedirectResponse(path if path.startswith(PREFIX) else url(path), status_code=303))


def safe_next(next_: str | None) -> str:
    """Only a console path: never an open redirect (no scheme, no host, no //)."""
    if not next_ or not next_.startswith(PREFIX + "/") and next_ != PREFIX or next_.startswith("//") or "\\" in next_:
        return url("/")
    if any(c in next_ for c in "\r\n"):
        return url("/")
    return next_
