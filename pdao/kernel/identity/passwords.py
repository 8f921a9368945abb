"""Password hashing with a maintained library (pwdlib, Argon2id)."""

from __future__ import annotations

from functools import lru_cache

from pwdlib import PasswordHash

MIN_PASSWORD_LENGTH = 8


@lru_cache(maxsize=1)
def _hasher() -> PasswordHash:
    return PasswordHash.recommended()


def hash_password(password: str) -> str:
    return _hasher().hash(password)


def verify_password(password: str, password_hash: str) -> bool:
    return _hasher().verify(password, password_hash)


# A hash of a random string: verified against when the user does not exist, so that a wrong
# username costs the same time as a wrong password and usernames cannot be probed by timing.
@lru_cache(maxsize=1)
def dummy_hash() -> str:
    import secrets

    return hash_password(secrets.token_urlsafe(16))
