"""Identities: who a caller is. Decisions here are about authentication only; what a caller may
do is decided in `policies`."""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, case, delete, literal, null, or_, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import aliased
from sqlmodel import Session, select

from pdao.kernel import audit
from pdao.kernel.config import Settings
from pdao.kernel.db import id_in_range, utcnow
from pdao.kernel.errors import PdaoError, conflict, forbidden, invalid, not_found, unauthorized
from pdao.kernel.identity import passwords, tokens
from pdao.kernel.identity.models import ROLE_ORG_KINDS, ApiKey, LoginAddress, LoginThrottle, Organization, Role, User


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


@dataclass(frozen=True)
class Actor:
    """Who made a change, as the audit chain names it: a signed-in user (`actor_of`), or whoever
    runs a `pdao` command on the server (`cli_actor`: the OS user, `cli:<name>`, no role — a
    command can name any user, so it is never recorded as one)."""

    name: str
    org: str | None = None
    role: str | None = None
    auth_method: str = "cli"
    user_id: int | None = None


def actor_of(principal: Principal) -> Actor:
    return Actor(principal.username, principal.org_code, principal.role.value, principal.auth_method,
                 principal.user_id)


def cli_actor() -> Actor:
    import getpass

    return Actor(f"cli:{getpass.getuser()}"[:64])


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


def set_password(session: Session, username: str, password: str, by: Actor | None = None,
                 request_id: str | None = None) -> list[int]:
    """Change a password: every token issued before stops working, the lockout count and lock go,
    and the user's active API keys and pending grants are revoked (a reset after a suspected
    compromise must end what the old password could mint). `by` is who changed it (None: the OS
    user of a `pdao` command); each revocation is appended to the audit chain, so the caller
    commits the change and its events together. The ids of the revoked keys."""
    _check_password(password)
    user = get_user(session, username)
    user.password_hash = passwords.hash_password(password)
    user.tokens_valid_after = utcnow()  # every token issued before the change stops working
    user.failed_logins = 0
    user.locked_until = None
    session.add(user)
    # the name's locks, from every address, go with the old password
    session.execute(delete(LoginThrottle).where(LoginThrottle.name == username[:64])
                    .execution_options(synchronize_session=False))
    session.flush()
    return revoke_user_keys(session, user, by or cli_actor(), "password_changed", request_id)


def set_active(session: Session, username: str, active: bool, by: Actor | None = None,
               request_id: str | None = None) -> list[int]:
    """Enable or disable a user. Disabling ends every token and revokes the user's active API keys
    and pending grants (appended to the audit chain under `by`, as in `set_password`: the caller
    commits). The ids of the revoked keys."""
    user = get_user(session, username)
    user.is_active = active
    if active:
        session.add(user)
        return []
    user.tokens_valid_after = utcnow()
    session.add(user)
    session.flush()
    return revoke_user_keys(session, user, by or cli_actor(), "user_disabled", request_id)


def logout(session: Session, principal: Principal) -> None:
    """End every session of the signed-in user: each bearer token issued until now stops working
    (tokens are signed, not stored, so ending one means ending all issued before). API keys are
    for scripts and stay (they are revoked on their own, by a password change or by disabling the
    user); claiming one needs the password, not only a token."""
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


# The lockout counts an attempt when it starts, not when its password check has failed, at two
# levels. Per (name, client address): `login_max_failures` (5) wrong passwords from one address
# lock the name *from that address* for `login_lock_minutes`. Per name across addresses:
# `login_max_failures_per_name` (10) attempts from addresses the user has not signed in from
# lately lock the name for every such address — but not for the addresses the user did sign in
# from (`login_address`). So a guesser spread over many addresses gets 10 guesses per window in
# all, and still cannot lock the owner out of their usual machine. (Locking the name everywhere let
# anyone lock the office, the auditors or a competitor's analysts out with 25 requests and keep
# them out; review r5 #2.) The `failed_logins` alert reports the name's bursts.
#
# One conditional UPDATE of the (name, address) row of `login_throttle`, before the slow hash,
# takes the attempt while it is not locked; the attempt that reaches the limit locks it in that
# same statement (and the count starts again for after the lock). rowcount 0 = locked: 429 without
# hashing. A failed check keeps its attempt; a success gives the count back (0) and lifts the lock
# only if its own attempt set it. So N guesses in parallel cost N attempts, at most
# `login_max_failures` passwords are checked per address and window, and an attempt that never
# finishes (a crash) cannot leave a name stuck: at worst it locked it for one window. Real and
# unknown names go through the same rows, so a wrong name and a wrong password stay
# indistinguishable.
#
# A row holds a count and one instant (`locked_until`). With a count of 0 and an instant ahead,
# it is locked until then. Otherwise the instant is when the last attempt was taken (or the last
# lock ended): once it is a window old, the count starts again, and the row can be deleted
# (`expire_login_throttle`). (A count with an instant ahead is another attempt's, taken a moment
# later: never a lock.) A password reset deletes the name's rows: an operator's reset unlocks.

def _lock_window(settings: Settings) -> timedelta:
    return timedelta(minutes=settings.login_lock_minutes)


def throttle_key(username: str, address: str | None) -> str:
    """The `login_throttle` row of a name tried from an address (None: outside HTTP)."""
    return hashlib.sha256(f"{username}\x00{address or ''}".encode("utf-8", "replace")).hexdigest()


def is_locked(count: int, locked_until: datetime | None, now: datetime) -> bool:
    """Whether a row refuses logins now (see above)."""
    return count == 0 and locked_until is not None and locked_until > now


def _take_attempt(count, locked_until, settings: Settings, now: datetime,  # noqa: ANN001
                  limit: int | None = None) -> tuple[list, dict]:
    """(WHERE, SET) of the one statement that takes an attempt: on a row that is not locked,
    count + 1 (from 0 once the last attempt is a window old) and the instant now — or, when that
    reaches the limit, count 0 and locked for `login_lock_minutes` from now. (Every SET expression
    reads the row as it was before the statement. A count already beyond the limit, after the
    setting was lowered, locks at the next attempt too.)"""
    window = _lock_window(settings)
    stale = and_(locked_until.is_not(None), locked_until <= now - window)
    base = case((stale, 0), else_=count)
    reaches = base + 1 >= (settings.login_max_failures if limit is None else limit)
    where = [or_(count != 0, locked_until.is_(None), locked_until <= now)]
    values = {count: case((reaches, 0), else_=base + 1),
              locked_until: case((reaches, literal(now + window, locked_until.type)),
                                 else_=literal(now, locked_until.type))}
    return where, values


def _refused_until(locked_until: datetime | None, settings: Settings, now: datetime) -> datetime:
    """When an attempt refused as locked may try again."""
    if locked_until is not None and locked_until > now:
        return locked_until
    return now + _lock_window(settings)  # (not reached: a refusal means locked)


# login_throttle rows are swept at most this often per process, when a new row is made
THROTTLE_SWEEP_SECONDS = 60.0
_sweep = {"next": 0.0}
_sweep_lock = threading.Lock()


def _sweep_due() -> bool:
    with _sweep_lock:
        t = time.monotonic()
        if t < _sweep["next"]:
            return False
        _sweep["next"] = t + THROTTLE_SWEEP_SECONDS
        return True


def expire_login_throttle(session: Session, settings: Settings, now: datetime | None = None) -> int:
    """Delete the `login_throttle` rows that hold nothing a missing row would not: not locked and
    counting nothing, or whose last attempt (or lock) is a window old. So the table holds only
    the (name, address) pairs tried within the last window or locked now. Commits; the number deleted."""
    now = now or utcnow()
    t = LoginThrottle
    over = or_(and_(t.failures == 0, or_(t.locked_until.is_(None), t.locked_until <= now)),
               t.locked_until <= now - _lock_window(settings))
    deleted = session.execute(delete(t).where(over).execution_options(synchronize_session=False)).rowcount
    session.commit()
    return deleted


def _reserve_attempt(session: Session, settings: Settings, username: str, address: str | None,
                     now: datetime, limit: int | None = None) -> tuple[bool, datetime | None]:
    """Take an attempt on (name, address) before its password is checked, committed at once.
    (taken, lock): `lock` is the lock this attempt set by reaching the limit (`login_max_failures`
    unless given), or — when not taken — the instant the lock ends."""
    session.rollback()  # end the read transaction: a write must start from a fresh snapshot (SQLite WAL)
    key = throttle_key(username, address)
    limit = settings.login_max_failures if limit is None else limit
    own_lock = now + _lock_window(settings)
    where, values = _take_attempt(LoginThrottle.failures, LoginThrottle.locked_until, settings, now, limit)
    for _ in range(2):  # insert the first time; a racing insert makes us update instead
        taken = session.execute(update(LoginThrottle).where(LoginThrottle.username == key, *where).values(values)
                                .execution_options(synchronize_session=False)).rowcount
        if taken:
            until = session.exec(select(LoginThrottle.locked_until).where(LoginThrottle.username == key)).first()
            session.commit()
            return True, own_lock if until == own_lock else None
        row = session.exec(select(LoginThrottle.username, LoginThrottle.locked_until)
                           .where(LoginThrottle.username == key)).first()
        if row is not None:
            session.rollback()
            return False, _refused_until(row[1], settings, now)
        first = LoginThrottle(username=key, name=username[:64], failures=1, locked_until=now)
        if limit <= 1:
            first.failures, first.locked_until = 0, own_lock
        try:
            session.add(first)
            session.commit()
        except IntegrityError:
            session.rollback()
            continue
        if _sweep_due():   # a new row: the moment to drop the ones nobody needs any more
            expire_login_throttle(session, settings, now)
        return True, own_lock if first.failures == 0 else None
    return False, _refused_until(None, settings, now)


ANY_ADDRESS = "*"            # the name's row across addresses (a real address never reads so)
KNOWN_ADDRESS_DAYS = 90      # an address the user signed in from within this many days is known


def _address_key(address: str) -> str:
    return hashlib.sha256(address.encode("utf-8", "replace")).hexdigest()


def _known_address(session: Session, user_id: int | None, address: str | None, now: datetime) -> bool:
    """Whether the user signed in from this address lately (then a lock on the name from other
    addresses does not keep them out)."""
    if user_id is None or address is None:
        return False
    last = session.exec(select(LoginAddress.last_login_at).where(
        LoginAddress.user_id == user_id, LoginAddress.address_key == _address_key(address))).first()
    return last is not None and last > now - timedelta(days=KNOWN_ADDRESS_DAYS)


def _remember_address(session: Session, user_id: int, address: str | None, now: datetime) -> None:
    if address is None:
        return
    key = _address_key(address)
    moved = session.execute(update(LoginAddress).where(LoginAddress.user_id == user_id, LoginAddress.address_key == key)
                            .values(last_login_at=now).execution_options(synchronize_session=False)).rowcount
    if not moved:
        try:
            with session.begin_nested():
                session.add(LoginAddress(user_id=user_id, address_key=key, last_login_at=now))
        except IntegrityError:   # a parallel login of the same user from the same address
            pass


def refuse_if_locked(session: Session, settings: Settings, username: str, address: str | None = None) -> None:
    """429 login_locked when the name is locked from this address now (its own lock, or the name's
    lock across addresses when this one is not known) — a real account or not, the same reads and
    the same answer — so a refusal never waits for a password check's turn. Only a shortcut:
    `login` still takes its attempts atomically."""
    if "\x00" in username:
        return                      # login answers it (no name holds NUL)
    now = utcnow()
    keys = [throttle_key(username, address)]
    if address is not None:
        user_id = session.exec(select(User.id).where(User.username == username)).first()
        if not _known_address(session, user_id, address, now):
            keys.append(throttle_key(username, ANY_ADDRESS))
    rows = session.exec(select(LoginThrottle.failures, LoginThrottle.locked_until)
                        .where(LoginThrottle.username.in_(keys))).all()
    session.rollback()
    for row in rows:
        if is_locked(row[0], row[1], now):
            raise _locked(row[1])


def _counted_check(session: Session, settings: Settings, username: str, user_id: int | None, address: str | None,
                   password_hash: str, password: str, now: datetime) -> tuple[bool, datetime | None]:
    """Take an attempt on (name, address) — and, from an address the user has not signed in from
    lately, one on the name across addresses (`login_max_failures_per_name`) — then check the
    password (429 login_locked without hashing when either is locked). (matches, the lock this
    attempt set on (name, address))."""
    taken, lock = _reserve_attempt(session, settings, username, address, now)
    if not taken:
        raise _locked(lock)         # refused before any hashing
    if address is not None and not _known_address(session, user_id, address, now):
        taken, until = _reserve_attempt(session, settings, username, ANY_ADDRESS, now,
                                        limit=settings.login_max_failures_per_name)
        if not taken:
            raise _locked(until)
    return passwords.verify_password(password, password_hash), lock


def _give_count_back(session: Session, user_id: int, username: str, address: str | None, lock: datetime | None,
                     now: datetime, signed_in: bool = True, across: bool = False) -> None:
    """After a right password: the (name, address) count goes back to 0. The lock this attempt set
    (it was the limit's) is lifted; a lock another attempt set meanwhile (count 0, its end ahead)
    stays. With `across`, the attempt it took on the name across addresses is given back too (that
    count's lock stays). Rows left holding nothing go. `signed_in`: a login (`last_login_at`), not
    a claim's re-check."""
    t = LoginThrottle
    other_lock = t.failures == 0
    if lock is not None:
        other_lock = and_(other_lock, t.locked_until != literal(lock, t.locked_until.type))
    own = throttle_key(username, address)
    session.execute(update(t).where(t.username == own)
                    .values({"failures": 0, "locked_until": case((other_lock, t.locked_until), else_=null())})
                    .execution_options(synchronize_session=False))
    keys = [own]
    if across:
        keys.append(throttle_key(username, ANY_ADDRESS))
        session.execute(update(t).where(t.username == keys[-1], t.failures > 0).values(failures=t.failures - 1)
                        .execution_options(synchronize_session=False))
    session.execute(delete(t).where(t.username.in_(keys), t.failures == 0,
                                    or_(t.locked_until.is_(None), t.locked_until <= literal(now, t.locked_until.type)))
                    .execution_options(synchronize_session=False))
    if signed_in:
        session.execute(update(User).where(User.id == user_id).values(last_login_at=now)
                        .execution_options(synchronize_session=False))
    _remember_address(session, user_id, address, now)


def login(session: Session, settings: Settings, username: str, password: str,
          address: str | None = None) -> tuple[str, Principal, datetime]:
    """Check a password; answer a bearer token. Each attempt is counted before its check, per
    (name, client `address`) (see above), for unknown usernames too: a wrong name and a wrong
    password look the same, locked or not. A disabled account answers exactly like a wrong
    password, whatever the password (the same check runs and the attempt stays counted), so a
    guess at a departed employee's password is never confirmed. On success the caller commits
    (the count reset and `last_login_at`)."""
    now = utcnow()
    if "\x00" in username or "\x00" in password:
        raise _login_failed()       # no name holds NUL (PostgreSQL refuses it in text)
    user = session.exec(select(User).where(User.username == username)).first()
    user_id, password_hash = (user.id, user.password_hash) if user is not None else (None, passwords.dummy_hash())
    known = _known_address(session, user_id, address, now)
    matches, lock = _counted_check(session, settings, username, user_id, address, password_hash, password, now)
    user = session.get(User, user_id) if user_id is not None else None
    if not matches or user is None or not user.is_active:
        raise _login_failed()       # the attempt stays counted
    _give_count_back(session, user_id, username, address, lock, now, across=not known and address is not None)
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
# An operator grants a key to a user: a row without a secret. The user claims it with a bearer
# token from their own login (never another API key) AND their password typed again, counted like
# a login: a token alone — lifted from a proxy log, a shared machine — mints nothing. Only then is
# the key made, answered to them once and stored as a digest. So the operator never holds a usable
# key of anyone, and every request made with a key is the owner's own. A password change or
# disabling the user revokes their keys and grants. Grant, claim and revocation are each appended
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


def _key_event(session: Session, by: Actor, action: str, row: ApiKey, owner: str, request_id: str | None,
               **detail: object) -> None:
    """The decision in the audit chain, in the change's own transaction (call last, then commit)."""
    audit.append(session, request_id=request_id, actor=by.name, org=by.org, role=by.role,
                 auth_method=by.auth_method, action=action, object=f"api_key:{row.id}", decision="allow",
                 detail={"owner": owner, **detail})


def grant_api_key(session: Session, by: Principal, username: str, label: str = "", valid_days: int | None = 365,
                  claim_within: timedelta = timedelta(days=DEFAULT_CLAIM_DAYS),
                  request_id: str | None = None, actor: Actor | None = None) -> ApiKey:
    """An operator (`by`, recorded as the grant's `issued_by`) grants `username` an API key: a
    pending row, no secret. The owner claims it (`claim_api_key`) within `claim_within`. The audit
    event names `actor` — `by` itself over HTTP; the OS user for `pdao users issue-key`, with the
    operator it named as `detail.issued_by`. The caller commits."""
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
    named = {"issued_by": by.username} if actor is not None else {}
    _key_event(session, actor or actor_of(by), "api_key.granted", row, user.username, request_id, label=label,
               valid_days=valid_days, claim_by=row.claim_by, **named)
    return row


def _wrong_password() -> PdaoError:
    return forbidden("wrong_password", "The password is wrong; claiming an API key needs your own current password.",
                     "密码错误：领取 API 密钥需要输入您本人的当前密码。")


def claimable_grant(session: Session, principal: Principal, key_id: int, password: str | None) -> ApiKey:
    """The caller's own pending grant, checked before any password: with an API key 403
    password_login_required (a leaked key mints no more keys); another user's grant 404 like a
    missing one; a claimed, revoked or lapsed grant 409; no password 422 password_required."""
    if principal.auth_method != "token":
        raise forbidden("password_login_required",
                        "Claim an API key signed in with your own password (a bearer token), not with an API key.",
                        "请使用本人密码登录后（访问令牌）领取 API 密钥，不能使用 API 密钥领取。")
    row = _visible_key(session, principal, key_id)
    if row.user_id != principal.user_id:   # the operator sees every grant but claims none
        raise not_found("API key", "API 密钥")
    status = key_status(row, utcnow())
    if status != "pending":
        raise _not_claimable(status)
    if not password:
        raise invalid("password_required", "Claiming an API key needs your password: send {\"password\": ...}.",
                      "领取 API 密钥需要输入您的密码：请提交 {\"password\": ...}。")
    return row


def claim_api_key(session: Session, settings: Settings, principal: Principal, key_id: int, password: str | None,
                  request_id: str | None = None, address: str | None = None) -> tuple[str, ApiKey]:
    """The owner claims a pending grant with their password, typed again: the key is made now and
    answered once (only its digest is kept). The password check counts towards the lockout like a
    login (a wrong one 403 wrong_password and the attempt stays counted; locked 429 login_locked
    without a check; a right one gives the count back). Refusals before it: `claimable_grant`. Two
    claims at once: one wins (a conditional UPDATE), the other is 409. The caller commits."""
    claimable_grant(session, principal, key_id, password)
    if "\x00" in password:
        raise _wrong_password()
    user = session.get(User, principal.user_id)
    if user is None or not user.is_active:
        raise not_found("API key", "API 密钥")
    now = utcnow()
    known = _known_address(session, user.id, address, now)
    matches, lock = _counted_check(session, settings, user.username, user.id, address, user.password_hash, password,
                                   now)
    if not matches:
        raise _wrong_password()     # the attempt stays counted
    _give_count_back(session, user.id, user.username, address, lock, now, signed_in=False,
                     across=not known and address is not None)
    session.commit()                # the right password is a success whatever the claim's outcome
    key, prefix, digest = tokens.new_api_key()
    row = session.get(ApiKey, key_id)
    expires_at = now + timedelta(days=row.valid_days) if row.valid_days else None
    claimed = session.execute(
        update(ApiKey).where(ApiKey.id == row.id, ApiKey.user_id == principal.user_id, ApiKey.claimed_at.is_(None),
                             ApiKey.revoked_at.is_(None), ApiKey.claim_by > now)
        .values(prefix=prefix, key_sha256=digest, claimed_at=now, expires_at=expires_at)
        .execution_options(synchronize_session=False)).rowcount
    session.refresh(row)
    if not claimed:
        raise _not_claimable(key_status(row, now))
    _key_event(session, actor_of(principal), "api_key.claimed", row, principal.username, request_id, prefix=prefix,
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


def _revoke(session: Session, row: ApiKey, by: Actor, request_id: str | None, **detail: object) -> bool:
    """Revoke one key or grant (a conditional UPDATE: twice changes nothing) and append the event.
    Whether this call revoked it."""
    revoked = session.execute(
        update(ApiKey).where(ApiKey.id == row.id, ApiKey.revoked_at.is_(None))
        .values(revoked_at=utcnow(), revoked_by=by.user_id).execution_options(synchronize_session=False)).rowcount
    session.refresh(row)
    if revoked:
        owner = session.get(User, row.user_id)
        _key_event(session, by, "api_key.revoked", row, owner.username if owner else "",
                   request_id, was="active" if row.claimed_at is not None else "pending", **detail)
    return bool(revoked)


def revoke_api_key(session: Session, by: Principal, key_id: int, request_id: str | None = None) -> ApiKey:
    """Revoke a key or a pending grant: the operator any, an owner their own (another user's is
    404). Revoking twice changes nothing. The caller commits."""
    row = _visible_key(session, by, key_id)
    _revoke(session, row, actor_of(by), request_id)
    return row


def revoke_api_key_by_command(session: Session, key_id: int, actor: Actor, stated_by: str | None = None) -> ApiKey:
    """`pdao users revoke-key`: whoever runs it on the server revokes any key (`actor`, the OS
    user); the operator it names, if any, is only a stated detail (`stated_by`), never the actor.
    The caller commits."""
    row = session.get(ApiKey, key_id) if id_in_range(key_id) else None
    if row is None:
        raise not_found("API key", "API 密钥")
    if stated_by is not None:
        get_user(session, stated_by)    # a name that exists, at least
    _revoke(session, row, actor, None, **({"stated_by": stated_by} if stated_by is not None else {}))
    return row


def revoke_user_keys(session: Session, user: User, by: Actor, because: str, request_id: str | None = None) -> list[int]:
    """Revoke every active key and pending grant of `user` (after a password change, on disable),
    each with its event naming `by` and `detail.because`. The caller commits. The ids revoked."""
    now = utcnow()
    rows = session.exec(select(ApiKey).where(ApiKey.user_id == user.id, ApiKey.revoked_at.is_(None))
                        .order_by(ApiKey.id)).all()
    return [row.id for row in rows
            if key_status(row, now) in ("pending", "active") and _revoke(session, row, by, request_id, because=because)]


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
