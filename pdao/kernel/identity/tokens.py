"""OAuth2 bearer tokens (signed JWT via PyJWT) and API keys (random secrets, stored as SHA-256)."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import jwt

ALGORITHM = "HS256"
API_KEY_PREFIX = "pdao_"


@dataclass(frozen=True)
class TokenClaims:
    user_id: int
    issued_at: datetime  # aware UTC
    expires_at: datetime
    token_id: str


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _micros(t: datetime) -> int:
    return (t - _EPOCH) // timedelta(microseconds=1)


def issue_token(user_id: int, secret: str, ttl: timedelta, now: datetime | None = None) -> tuple[str, TokenClaims]:
    """A signed token. Besides the standard `iat` (whole seconds) it carries `iat_us`, the issue
    instant in microseconds: a password change or a disable must invalidate a token issued
    earlier in the same second, and one second of slack would let it live on."""
    now = now or datetime.now(UTC)
    expires_at = (now + ttl).replace(microsecond=0)  # `exp` is whole seconds
    claims = TokenClaims(user_id, now, expires_at, uuid.uuid4().hex)
    token = jwt.encode(
        {"sub": str(user_id), "iat": now, "iat_us": _micros(now), "exp": expires_at, "jti": claims.token_id,
         "iss": "pdao"},
        secret,
        algorithm=ALGORITHM,
    )
    return token, claims


def decode_token(token: str, secret: str) -> TokenClaims | None:
    """The claims of a valid, unexpired token signed by us, else None."""
    try:
        data = jwt.decode(token, secret, algorithms=[ALGORITHM], issuer="pdao",
                          options={"require": ["sub", "exp", "iat", "iat_us", "jti", "iss"]})
        iat_us = data["iat_us"]
        if not isinstance(iat_us, int) or isinstance(iat_us, bool):
            return None
        issued_at = _EPOCH + timedelta(microseconds=iat_us)
        if abs(issued_at.timestamp() - float(data["iat"])) > 1:  # both claims must tell the same time
            return None
        return TokenClaims(
            int(data["sub"]),
            issued_at,
            datetime.fromtimestamp(data["exp"], UTC),
            str(data["jti"]),
        )
    except (jwt.PyJWTError, ValueError, KeyError, TypeError, OverflowError):
        return None


def new_api_key() -> tuple[str, str, str]:
    """A new key: (the full key shown once, its lookup prefix, its SHA-256). A 256-bit random
    secret needs no slow hash; the prefix finds the row without scanning."""
    prefix = secrets.token_hex(6)
    key = f"{API_KEY_PREFIX}{prefix}_{secrets.token_urlsafe(32)}"
    return key, prefix, api_key_digest(key)


def api_key_prefix(key: str) -> str | None:
    if not key.startswith(API_KEY_PREFIX):
        return None
    parts = key[len(API_KEY_PREFIX):].split("_", 1)
    return parts[0] if len(parts) == 2 and len(parts[0]) == 12 else None


def api_key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def same_digest(a: str, b: str) -> bool:
    return secrets.compare_digest(a, b)
