"""Shared helpers of the console tests: a logged-in browser-like client per user (its own cookie
jar), the CSRF token of a client, and the users of the walk."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tests.conftest import DEMO_PASSWORD

CONSOLE = "/console"
MISSING_MARK = "⟦"


def csrf_of(c: TestClient) -> str:
    token = c.cookies.get("pdao_csrf")
    if token is None:
        c.get(f"{CONSOLE}/login")
        token = c.cookies.get("pdao_csrf")
    assert token, "the console sets a CSRF cookie on its pages"
    return token


def console_client(app, username: str | None = None, lang: str | None = None) -> TestClient:
    """A client with its own cookies; logged in through the console's form when `username` is given."""
    c = TestClient(app, raise_server_exceptions=False, follow_redirects=False)
    if lang:
        c.cookies.set("pdao_lang", lang, path=CONSOLE)
    if username:
        token = csrf_of(c)
        r = c.post(f"{CONSOLE}/login", data={"username": username, "password": DEMO_PASSWORD, "csrf_token": token,
                                             "next": f"{CONSOLE}/"})
        assert r.status_code == 303, r.text
        assert c.cookies.get("pdao_session")
    return c


def post_form(c: TestClient, path: str, data: dict | list | None = None, **kw):
    """A console form POST with this client's CSRF token (data may be a list of pairs for repeats)."""
    token = csrf_of(c)
    if isinstance(data, list):   # repeated fields: httpx takes a dict of lists
        body: dict = {"csrf_token": token}
        for k, v in data:
            body.setdefault(k, []).append(v)
    else:
        body = {**(data or {}), "csrf_token": token}
    return c.post(f"{CONSOLE}{path}", data=body, **kw)


def post_file(c: TestClient, path: str, files: dict, data: dict | None = None, token: str | None = "", **kw):
    """A console multipart form POST (a file and text fields) with this client's CSRF token; `token=None`
    leaves the token out, any other string replaces it."""
    body = dict(data or {})
    if token is not None:
        body["csrf_token"] = token or csrf_of(c)
    return c.post(f"{CONSOLE}{path}", data=body, files=files, **kw)
