"""Identities: who a caller is. Decisions here are about authentication only; what a caller may
do is decided in `policies`."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import case, literal, null, or_, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import aliased
from sqlmodel import Session, select

from catalog.models import Organization
from pdao.config import Settings
from pdao import audit
from pdao.db import id_in_range, utcnow
from pdao.errors import PdaoError, conflict, forbidden, invalid, not_found, unauthorized
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


def _locked(until: datetime) -> PdaoError:
    return PdaoError(429, "login_locked",
                     f"Too many failed logins; try again after {until.isoformat(timespec='seconds')}.",
                     f"登录失败次数过多，请于 {until.isoformat(timespec='seconds')}（UTC）后重试。")


# The lockout counts an attempt when it starts, not when its password check has failed. One
# conditional UPDATE, before the slow hash, takes the attempt while the account is not locked;
# the attempt that reaches the limit locks the account in that same statement
# (and the count starts again for after the lock). rowcount 0 = locked: 429 without hashing. A
# failed check keeps its attempt; a success gives the count back (0) and lifts the lock only if its
# own attempt set it. So N guesses in parallel cost N attempts, at most `login_max_failures`
# passwords are checked per lock window, and an attempt that never finishes (a crash) cannot
# leave the account stuck: at worst it locked it for one window. Unknown usernames go through the
# same statement on `login_throttle`, so a wrong name and a wrong password stay indistinguishable.

def _take_attempt(count, locked_until, settings: Settings, now: datetime) -> tuple[list, dict]:  # noqa: ANN001
    """(WHERE, SET) of the one statement that takes an attempt: on an account that is not locked,
    count + 1 — or, when that reaches the limit, count 0 and locked for `login_lock_minutes` from
    now. (Every SET expression reads the row as it was before the statement. A count already
    beyond the limit, after the setting was lowered, locks at the next attempt too.)"""
    reaches = count + 1 >= settings.login_max_failures
    lock_end = literal(now + timedelta(minutes=settings.login_lock_minutes), locked_until.type)
    where = [or_(locked_until.is_(None), locked_until <= now)]
    values = {count: case((reaches, 0), else_=count + 1),
              locked_until: case((reaches, lock_end), else_=null())}
    return where, values


def _refused_until(locked_until: datetime | None, settings: Settings, now: datetime) -> datetime:
    """When an attempt refused as locked may try again."""
    if locked_until is not None and locked_until > now:
        return locked_until
    return now + timedelta(minutes=settings.login_lock_minutes)  # (not reached: a refusal means locked)


def _reserve_attempt(session: Session, settings: Settings, user_id: int, now: datetime) -> tuple[bool, datetime | None]:
    """Take an attempt on a real account before its password is checked, committed at once.
    (taken, lock): `lock` is the lock this attempt set by reaching the limit, or — when not
    taken — the instant the lock ends."""
    session.rollback()  # end the read transaction: a write must start from a fresh snapshot (SQLite WAL)
    where, values = _take_attempt(User.failed_logins, User.locked_until, settings, now)
    taken = session.execute(update(User).where(User.id == user_id, *where).values(values)
                            .execution_options(synchronize_session=False)).rowcount
    until = session.exec(select(User.locked_until).where(User.id == user_id)).first()
    session.commit()
    if not taken:
        return False, _refused_until(until, settings, now)
    return True, until if until is not None and until > now else None


def _reserve_unknown_attempt(session: Session, settings: Settings, username: str, now: datetime) -> datetime | None:
    """`_reserve_attempt` for a username that does not exist (see LoginThrottle): None when taken,
    else the instant the lock ends."""
    session.rollback()
    key = username[:64]
    where, values = _take_attempt(LoginThrottle.failures, LoginThrottle.locked_until, settings, now)
    for _ in range(2):  # insert the first time; a racing insert makes us update instead
        taken = session.execute(update(LoginThrottle).where(LoginThrottle.username == key, *where).values(values)
                                .execution_options(synchronize_session=False)).rowcount
        if taken:
            session.commit()
            return None
        row = session.exec(select(LoginThrottle.username, LoginThrottle.locked_until)
                           .where(LoginThrottle.username == key)).first()
        if row is not None:
            session.rollback()
            return _refused_until(row[1], settings, now)
        first = LoginThrottle(username=key, failures=1)
        if settings.login_max_failures <= 1:
            first.failures, first.locked_until = 0, now + timedelta(minutes=settings.login_lock_minutes)
        try:
            session.add(first)
            session.commit()
            return None
        except IntegrityError:
            session.rollback()
    return _refused_until(None, settings, now)


def login(session: Session, settings: Settings, username: str, password: str) -> tuple[str, Principal, datetime]:
    """Check a password; answer a bearer token. Each attempt is counted before its check (see
    above), for unknown usernames too: a wrong name and a wrong password look the same, locked or
    not. On success the caller commits (the count reset and `last_login_at`)."""
    now = utcnow()
    if "\x00" in username or "\x00" in password:
        raise _login_failed()       # no name holds NUL (PostgreSQL refuses it in text)
    user = session.exec(select(User).where(User.username == username)).first()
    if user is None:
        until = _reserve_unknown_attempt(session, settings, username, now)
        if until is not None:
            raise _locked(until)
        passwords.verify_password(password, passwords.dummy_hash())
        raise _login_failed()       # the attempt stays counted
    user_id, password_hash = user.id, user.password_hash
    taken, lock = _reserve_attempt(session, settings, user_id, now)
    if not taken:
        raise _locked(lock)         # refused before any hashing
    if not passwords.verify_password(password, password_hash):
        raise _login_failed()       # the attempt stays counted
    user = session.get(User, user_id)
    if user is None or not user.is_active:
        raise PdaoError(401, "user_disabled", "This account is disabled.", "该账号已停用。",
                        headers={"WWW-Authenticate": "Bearer"})
    # The count goes back to 0. The lock this attempt set (it was the limit's) is lifted; a lock
    # another attempt set is not: that one stays until it ends.
    lift = case((User.locked_until == literal(lock, User.locked_until.type), null()), else_=User.locked_until) \
        if lock is not None else User.locked_until
    session.execute(update(User).where(User.id == user_id)
                    .values(failed_logins=0, locked_until=lift, last_login_at=now)
                    .execution_options(synchronize_session=False))
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
    if (row is None or row.key_sha256 is None or not tokens.same_digest(row.key_sha256, tokens.api_key_digest(key))
            or row.revoked_at is not None or (row.expires_at is not None and row.expires_at <= now)):
        raise bad
    user = session.get(User, row.user_id)
    if user is None or not user.is_active:
        raise bad
    row.last_used_at = now
    session.add(row)
    return _principal(user, session.get(Organization, user.org_id), "api_key", row.id)


# --- API keys: granted by an operator, claimed by their owner -----------------------------------
#
# An operator grants a key to a user: a row without a secret. The user, signed in with their own
# password (a bearer token, never another API key), claims it: only then is the key made, answered
# to them once and stored as a digest. So the operator never holds a usable key of anyone, and
# every request made with a key is the owner's own. Grant, claim and revocation are each appended
# to the audit chain in the transaction that makes them, naming who really did it.

API_KEY_ROLES = frozenset({Role.applicant, Role.provider})
DEFAULT_CLAIM_DAYS = 7  # an unclaimed grant lapses after this many days (Settings.api_key_claim_days)


def claim_window(settings: Settings) -> timedelta:
    """How long a grant waits for its owner (`PDAO_API_KEY_CLAIM_DAYS`, default 7 days)."""
    return timedelta(days=settings.api_key_claim_days)


def key_status(row: ApiKey, now: datetime) -> str:
    """pending (granted, not yet claimed) | active | expired (the key's life ended) | lapsed (never
    claimed in time) | revoked."""
    if row.revoked_at is not None:
        return "revoked"
    if row.claimed_at is None:
        return "pending" if row.claim_by is not None and row.claim_by > now else "lapsed"
    return "expired" if row.expires_at is not None and row.expires_at <= now else "active"


def may_see_key(principal: Principal, row: ApiKey) -> bool:
    """The operator sees (and may revoke) every key; anyone else only their own. Another user's
    key answers 404 exactly like a missing one."""
    return principal.role == Role.operator or row.user_id == principal.user_id


def _visible_key(session: Session, principal: Principal, key_id: int) -> ApiKey:
    row = session.get(ApiKey, key_id) if id_in_range(key_id) else None
    if row is None or not may_see_key(principal, row):
        raise not_found("API key", "API 密钥")
    return row


def _key_event(session: Session, by: Principal, action: str, row: ApiKey, owner: str, request_id: str | None,
               **detail: object) -> None:
    """The decision in the audit chain, in the change's own transaction (call last, then commit)."""
    audit.append(session, request_id=request_id, actor=by.username, org=by.org_code, role=by.role.value,
                 auth_method=by.auth_method, action=action, object=f"api_key:{row.id}", decision="allow",
                 detail={"owner": owner, **detail})


def grant_api_key(session: Session, by: Principal, username: str, label: str = "", valid_days: int | None = 365,
                  claim_within: timedelta = timedelta(days=DEFAULT_CLAIM_DAYS),
                  request_id: str | None = None) -> ApiKey:
    """An operator grants `username` an API key: a pending row, no secret. The owner claims it
    (`claim_api_key`) within `claim_within`. The caller commits."""
    if by.role != Role.operator:
        raise PdaoError(403, "not_operator", "Only an operator grants API keys.", "只有运营方可以授予 API 密钥。")
    user = get_user(session, username)
    if Role(user.role) not in API_KEY_ROLES:
        # A key acts as its user; the office, reviewers, auditors and the operator decide in person.
        raise invalid("api_key_role", f"API keys are for the scripts of applicants and providers, not a {user.role}.",
                      f"API 密钥仅供申请企业和数据提供方的脚本使用，不能签发给 {user.role}。")
    now = utcnow()
    row = ApiKey(user_id=user.id, label=label, issued_by=by.user_id, valid_days=valid_days,
                 claim_by=now + claim_within, created_at=now)
    session.add(row)
    session.flush()
    _key_event(session, by, "api_key.granted", row, user.username, request_id, label=label, valid_days=valid_days,
               claim_by=row.claim_by)
    return row


def claim_api_key(session: Session, principal: Principal, key_id: int,
                  request_id: str | None = None) -> tuple[str, ApiKey]:
    """The owner claims a pending grant: the key is made now and answered once (only its digest is
    kept). Only with a bearer token from the owner's own password login. Another user's grant is
    404 like a missing one; a claimed, revoked or lapsed grant 409. Two claims at once: one wins
    (a conditional UPDATE), the other is 409. The caller commits."""
    if principal.auth_method != "token":
        raise forbidden("password_login_required",
                        "Claim an API key signed in with your own password (a bearer token), not with an API key.",
                        "请使用本人密码登录后（访问令牌）领取 API 密钥，不能使用 API 密钥领取。")
    row = _visible_key(session, principal, key_id)
    if row.user_id != principal.user_id:   # the operator sees every grant but claims none
        raise not_found("API key", "API 密钥")
    now = utcnow()
    key, prefix, digest = tokens.new_api_key()
    expires_at = now + timedelta(days=row.valid_days) if row.valid_days else None
    claimed = session.execute(
        update(ApiKey).where(ApiKey.id == row.id, ApiKey.user_id == principal.user_id, ApiKey.claimed_at.is_(None),
                             ApiKey.revoked_at.is_(None), ApiKey.claim_by > now)
        .values(prefix=prefix, key_sha256=digest, claimed_at=now, expires_at=expires_at)
        .execution_options(synchronize_session=False)).rowcount
    session.refresh(row)
    if not claimed:
        raise _not_claimable(key_status(row, now))
    _key_event(session, principal, "api_key.claimed", row, principal.username, request_id, prefix=prefix,
               expires_at=expires_at)
    return key, row


def _not_claimable(status: str) -> PdaoError:
    if status == "revoked":
        return conflict("api_key_revoked", "This API key was revoked; ask the operator for a new grant.",
                        "该 API 密钥已被吊销，请向运营方申请新的授予。")
    if status == "lapsed":
        return conflict("api_key_grant_lapsed", "This grant was not claimed in time; ask the operator for a new one.",
                        "该授予未在期限内领取，已失效，请向运营方申请新的授予。")
    return conflict("api_key_claimed", "This API key was claimed already; it is shown only once.",
                    "该 API 密钥已被领取，密钥只显示一次。")


def revoke_api_key(session: Session, by: Principal, key_id: int, request_id: str | None = None) -> ApiKey:
    """Revoke a key or a pending grant: the operator any, an owner their own (another user's is
    404). Revoking twice changes nothing. The caller commits."""
    row = _visible_key(session, by, key_id)
    now = utcnow()
    revoked = session.execute(
        update(ApiKey).where(ApiKey.id == row.id, ApiKey.revoked_at.is_(None))
        .values(revoked_at=now, revoked_by=by.user_id).execution_options(synchronize_session=False)).rowcount
    session.refresh(row)
    if revoked:
        owner = session.get(User, row.user_id)
        _key_event(session, by, "api_key.revoked", row, owner.username if owner else "",
                   request_id, was="active" if row.claimed_at is not None else "pending")
    return row


def list_api_keys(session: Session, principal: Principal) -> list[tuple[ApiKey, str, str | None]]:
    """(key, owner, grantor) of the keys the caller may see, oldest first."""
    grantor = aliased(User)
    q = (select(ApiKey, User.username, grantor.username).join(User, ApiKey.user_id == User.id)
         .outerjoin(grantor, ApiKey.issued_by == grantor.id).order_by(ApiKey.id))
    if principal.role != Role.operator:
        q = q.where(ApiKey.user_id == principal.user_id)
    return [tuple(r) for r in session.exec(q).all()]


def list_users(session: Session) -> list[tuple[User, Organization]]:
    return list(session.exec(select(User, Organization).join(Organization, User.org_id == Organization.id)
                             .order_by(User.username)).all())
