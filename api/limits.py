"""Request body size limits, answered with the JSON error of API.md.

A pure ASGI middleware: a declared Content-Length over the limit is refused before anything is
read; a body without one (chunked) is counted as it streams in, and reading past the limit raises
`BodyTooLarge`, which the error handlers turn into the same 413. Nothing downstream ever sees more
than the limit, so a refused upload stores nothing.

(Starlette's own body limiter answers in plain text and replaces any other answer once the declared
length is too large, so it is not used.)
"""

from __future__ import annotations

import re
from collections.abc import Callable

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pdao.kernel.errors import too_large


class BodyTooLarge(StarletteHTTPException):
    """Raised from `receive` when a streamed body passes its limit. An HTTPException subclass so
    that FastAPI's body parsing re-raises it instead of turning it into a 400."""

    def __init__(self, limit_bytes: int) -> None:
        super().__init__(status_code=413)
        self.error = too_large(limit_bytes)


class BodySizeLimit:
    def __init__(self, app: ASGIApp, limit_for: Callable[[str, str], int]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["method"], scope["path"])
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            from api.errors import error_response  # a cycle otherwise

            scope.setdefault("state", {})["reason"] = "too_large"
            await error_response(too_large(limit))(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, limited_receive, send)


def _content_length(scope: Scope) -> int | None:
    for k, v in scope.get("headers", ()):
        if k == b"content-length":
            try:
                return int(v)
            except ValueError:
                return None
    return None


def limits_by_path(default: int, rules: list[tuple[str, str, int]]) -> Callable[[str, str], int]:
    """(method, path regex, limit) rules, first match wins; `default` for everything else."""
    compiled = [(m.upper(), re.compile(p), n) for m, p, n in rules]

    def limit_for(method: str, path: str) -> int:
        for m, rx, n in compiled:
            if method == m and rx.fullmatch(path):
                return n
        return default

    return limit_for
