"""The one error type clients see: an HTTP status, a stable code and a message in English and Chinese."""

from __future__ import annotations

from typing import Any


class PdaoError(Exception):
    status: int = 400

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        message_zh: str,
        details: Any | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.message_zh = message_zh
        self.details = details
        self.headers = headers

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "message": self.message, "message_zh": self.message_zh}
        if self.details is not None:
            out["details"] = self.details
        return out


def bad_request(code: str, message: str, message_zh: str, details: Any = None) -> PdaoError:
    return PdaoError(400, code, message, message_zh, details)


def unauthorized(code: str = "not_authenticated", message: str = "Missing or invalid credentials.",
                 message_zh: str = "缺少或无效的身份凭证。") -> PdaoError:
    return PdaoError(401, code, message, message_zh, headers={"WWW-Authenticate": "Bearer"})


def forbidden(code: str, message: str, message_zh: str) -> PdaoError:
    return PdaoError(403, code, message, message_zh)


def not_found(what: str, what_zh: str) -> PdaoError:
    # One wording for "missing" and "not yours", so existence never leaks across tenants.
    return PdaoError(404, "not_found", f"{what} not found.", f"{what_zh}不存在。")


def conflict(code: str, message: str, message_zh: str, details: Any = None) -> PdaoError:
    return PdaoError(409, code, message, message_zh, details)


def invalid(code: str, message: str, message_zh: str, details: Any = None) -> PdaoError:
    return PdaoError(422, code, message, message_zh, details)


def describe_size(n: int) -> str:
    if n >= 1024 * 1024:
        return f"{n / (1024 * 1024):g} MB"
    if n >= 1024:
        return f"{n / 1024:g} KB"
    return f"{n} bytes"


def too_large(limit_bytes: int) -> PdaoError:
    size = describe_size(limit_bytes)
    return PdaoError(413, "too_large", f"The request is larger than the limit of {size}; nothing was changed.",
                     f"请求内容超过 {size} 的上限，未做任何更改。", details={"limit_bytes": limit_bytes})
