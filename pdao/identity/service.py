"""Identities: who a caller is. Decisions here are about authentication only; what a caller may
do is decided in `policies`."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from catalog.models import Organization
from pdao.config import Settings
from pdao.db import utcnow
from pdao.errors import PdaoError, conflict, invalid, not_found, unauthorized
from pdao.identity import passwords, tokens
from pdao.identity.models import ROLE_ORG_KINDS, ApiKey, LoginThrottle, Role, User


@dataclass(frozen=True)
class Principal:
    """The authenticated caller, as every later decision sees it."""

    user_id: int
    username: str
    role: Role
    org_id: int
    org_code: str
    org_kind: str
    auth_method: str  # password | token | api_key
    api_key_id: int | None = None


def _principal(user: User, org: Organization, method: str, api_key_id: int | None = None) -> Principal:
    return Principal(user.id, user.username, Role(user.role), org.id, org.code, org.kind, method,  # type: ignore[arg-type]
                     api_key_id)


def _org(session: Session, org_code: str) -> Organization:
    org = session.exec(select(Organization).where(Organization.code == org_code)).first()
    if org is None:
        raise not_found(f"Organization '{org_code}'", f"机构 {org_code} ")
    return org


def create_user(session: Session, username: str, password: str, org_code: str, role: str,
                display_name: str = "") -> User:
    try:
        role_ = Role(role)
    except ValueError:
        raise invalid("invalid_role", f"Unknown role '{role}'; one of {', '.join(Role)}.",
                      f"未知角色 {role}，可选：{', '.join(Role)}。") from None
    org = _org(session, org_code)
    if org.kind not in ROLE_ORG_KINDS[role_]:
        raise invalid("role_org_mismatch",
                      f"A {role_} must belong to an organization of kind {'/'.join(sorted(ROLE_ORG_KINDS[role_]))}, "
                      f"not {org.kind}.",
                      f"{role_} 角色只能属于 {'/'.join(sorted(ROLE_ORG_KINDS[role_]))} 类机构，而不是 {org.kind}。")
    _check_password(password)
    if session.exec(select(User).where(User.username == username)).first() is not None:
        raise conflict("user_exists", f"User '{username}' already exists.", f"用户 {username} 已存在。")
    user = User(username=username, display_name=display_name or username, org_id=org.id, role=role_.value,
                password_hash=passwords.hash_password(password))
    session.add(user)
    session.flush()
    return user


def _check_password(password: str) -> None:
    if len(password) < passwords.MIN_PASSWORD_LENGTH:
        raise invalid("weak_password", f"A password needs at least {passwords.MIN_PASSWORD_LENGTH} characters.",
                      f"密码至少需要 {passwords.MIN_PASSWORD_LENGTH} 个字符。")


def principal_for(session: Session, username: str, method: str = "cli") -> Principal:
    """A user acting outside HTTP (set-up commands such as the demo), as every decision sees it."""
    user = get_user(session, username)
    return _principal(user, session.get(Organization, user.org_id), method)


def get_user(session: Session, username: str) -> User:
    user = session.exec(select(User).where(User.username == username)).first()
    if user is None:
        raise not_found(f"User '{username}'", f"用户 {username} ")
    return user


def set_password(session: Session, username: str, password: str) -> None:
    _check_password(password)
    user = get_user(session, username)
    user.password_hash = passwords.hash_password(password)
    user.tokens_valid_after = utcnow()  # every token issued before the change stops working
    user.failed_logins = 0
    user.locked_until = None
    session.add(user)


def set_active(session: Session, username: str, active: bool) -> None:
    user = get_user(session, username)
    user.is_active = active
    if not active:
        user.tokens_valid_after = utcnow()
    session.add(user)


def logout(session: Session, principal: Principal) -> None:
    """End every session of the signed-in user: each bearer token issued until now stops working
    (tokens are signed, not stored, so ending one means ending all issued before). API keys are
    revoked on their own."""
    user = session.get(User, principal.user_id)
    if user is not None:
        user.tokens_valid_after = utcnow()
        session.add(user)


def _login_failed() -> PdaoError:
    return PdaoError(401, "login_failed", "Wrong username or password.", "用户名或密码错误。",
                     headers={"WWW-Authenticate": "Bearer"})


def _count_failure(session: Session, settings: Settings, user_id: int, now: datetime) -> None:
    """Count a failed login atomically and lock the account at the limit, committed at once so the
    count survives the error that follows. An UPDATE … SET n = n + 1, not read-modify-write:
    parallel guesses must each be counted, or the lockout could be outrun."""
    session.rollback()  # end the read transaction: a write must start from a fresh snapshot (SQLite WAL)
    session.execute(update(User).where(User.id == user_id).values(failed_logins=User.failed_logins + 1)
                    .execution_options(synchronize_session=False))
    session.execute(update(User).where(User.id == user_id, User.failed_logins >= settings.login_max_failures)
                    .values(failed_logins=0, locked_until=now + timedelta(minutes=settings.login_lock_minutes))
                    .execution_options(synchronize_session=False))
    session.commit()


def _locked(until: datetime) -> PdaoError:
    return PdaoError(429, "login_locked",
                     f"Too many failed logins; try again after {until.isoformat(timespec='seconds')}.",
                     f"登录失败次数过多，请于 {until.isoformat(timespec='seconds')}（UTC）后重试。")


def _count_unknown_failure(session: Session, settings: Settings, username: str, now: datetime) -> None:
    """The same count and lock for a username that does not exist (see LoginThrottle)."""
    session.rollback()
    key = username[:64]
    for _ in range(2):  # insert the first time; a racing insert makes us update instead
        hit = session.execute(update(LoginThrottle).where(LoginThrottle.username == key)
                              .values(failures=LoginThrottle.failures + 1)
                              .execution_options(synchronize_session=False)).rowcount
        if hit:
            break
        try:
            session.add(LoginThrottle(username=key, failures=1))
            session.flush()
            break
        except IntegrityError:
            session.rollback()
    session.execute(update(LoginThrottle).where(LoginThrottle.username == key,
                                                LoginThrottle.failures >= settings.login_max_failures)
                    .values(failures=0, locked_until=now + timedelta(minutes=settings.login_lock_minutes))
                    .execution_options(synchronize_session=False))
    session.commit()


def login(session: Session, settings: Settings, username: str, password: str) -> tuple[str, Principal, datetime]:
    """Check a password; answer a bearer token. Failures count towards a temporary lock, for
    unknown usernames too: a wrong name and a wrong password look the same, locked or not."""
    now = utcnow()
    if "\x00" in username or "\x00" in password:
        raise _login_failed()       # no name holds NUL (PostgreSQL refuses it in text)
    user = session.exec(select(User).where(User.username == username)).first()
    if user is None:
        throttle = session.get(LoginThrottle, username[:64])
        if throttle is not None and throttle.locked_until is not None and throttle.locked_until > now:
            raise _locked(throttle.locked_until)
        passwords.verify_password(password, passwords.dummy_hash())
        _count_unknown_failure(session, settings, username, now)
        raise _login_failed()
    if user.locked_until is not None and user.locked_until > now:
        raise _locked(user.locked_until)  # commit nothing new; the lock simply holds
    if not passwords.verify_password(password, user.password_hash):
        _count_failure(session, settings, user.id, now)
        raise _login_failed()
    if not user.is_active:
        raise PdaoError(401, "user_disabled", "This account is disabled.", "该账号已停用。",
                        headers={"WWW-Authenticate": "Bearer"})
    user.failed_logins = 0
    user.locked_until = None
    user.last_login_at = now
    session.add(user)
    token, claims = tokens.issue_token(user.id, settings.secret_key, timedelta(minutes=settings.token_ttl_minutes))
    org = session.get(Organization, user.org_id)
    return token, _principal(user, org, "password"), claims.expires_at


def principal_from_token(session: Session, settings: Settings, token: str) -> Principal:
    claims = tokens.decode_token(token, settings.secret_key)
    if claims is None:
        raise unauthorized("invalid_token", "The bearer token is invalid or has expired.", "访问令牌无效或已过期。")
    user = session.get(User, claims.user_id)
    if user is None or not user.is_active or claims.issued_at < user.tokens_valid_after:
        err = unauthorized("invalid_token", "The bearer token is no longer valid.", "访问令牌已失效。")
        err.attempted_actor = user.username if user else None  # the signature names who it was
        raise err
    return _principal(user, session.get(Organization, user.org_id), "token")


def principal_from_api_key(session: Session, key: str) -> Principal:
    bad = unauthorized("invalid_api_key", "The API key is invalid, revoked or expired.", "API 密钥无效、已吊销或已过期。")
    prefix = tokens.api_key_prefix(key)
    if prefix is None:
        raise bad
    row = session.exec(select(ApiKey).where(ApiKey.prefix == prefix)).first()
    now = utcnow()
    if (row is None or not tokens.same_digest(row.key_sha256, tokens.api_key_digest(key))
            or row.revoked_at is not None or (row.expires_at is not None and row.expires_at <= now)):
        raise bad
    user = session.get(User, row.user_id)
    if user is None or not user.is_active:
        raise bad
    row.last_used_at = now
    session.add(row)
    return _principal(user, session.get(Organization, user.org_id), "api_key", row.id)


def issue_api_key(session: Session, username: str, issued_by: int | None, label: str = "",
                  valid_days: int | None = 365) -> tuple[str, ApiKey]:
    user = get_user(session, username)
    if Role(user.role) not in API_KEY_ROLES:
        # A key acts as its user; the office, reviewers, auditors and the operator decide in person.
        raise invalid("api_key_role", f"API keys are for the scripts of applicants and providers, not a {user.role}.",
                      f"API 密钥仅供申请企业和数据提供方的脚本使用，不能签发给 {user.role}。")
    key, prefix, digest = tokens.new_api_key()
    row = ApiKey(user_id=user.id, prefix=prefix, key_sha256=digest, label=label, issued_by=issued_by,
                 expires_at=utcnow() + timedelta(days=valid_days) if valid_days else None)
    session.add(row)
    session.flush()
    return key, row


API_KEY_ROLES = frozenset({Role.applicant, Role.provider})


def revoke_api_key(session: Session, key_id: int) -> ApiKey:
    row = session.get(ApiKey, key_id)
    if row is None:
        raise not_found("API key", "API 密钥")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.add(row)
    return row


def list_users(session: Session) -> list[tuple[User, Organization]]:
    return list(session.exec(select(User, Organization).join(Organization, User.org_id == Organization.id)
                             .order_by(User.username)).all())
