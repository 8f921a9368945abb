"""Users, their organization and role, and the API keys an operator grants and their owners claim."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlmodel import Field, SQLModel

from pdao.kernel.db import utcnow


class Organization(SQLModel, table=True):
    """A department, company, the office, the operator or the regulator: whom users act for."""

    __tablename__ = "organization"

    id: int | None = Field(default=None, primary_key=True)
    code: str = Field(index=True, unique=True, max_length=64)
    name_zh: str = Field(max_length=200)
    name_en: str = Field(max_length=200)
    kind: str = Field(max_length=20)  # department | company | office | operator | regulator
    credit_code: str | None = Field(default=None, max_length=18)  # GB 32100 unified social credit code
    created_at: datetime = Field(default_factory=utcnow)


class Role(StrEnum):
    provider = "provider"    # data steward of a source department
    applicant = "applicant"  # analyst of a data-using company (a tenant)
    office = "office"        # coordination office
    reviewer = "reviewer"    # export reviewer
    auditor = "auditor"      # security reviewer
    operator = "operator"    # operating entity


# Which organization kinds a role may belong to: an applicant is always a company (a tenant), etc.
ROLE_ORG_KINDS: dict[Role, frozenset[str]] = {
    Role.provider: frozenset({"department"}),
    Role.applicant: frozenset({"company"}),
    Role.office: frozenset({"office"}),
    # export reviewers sit in the office or the operating entity; a company may name its own
    # compliance reviewer, who still can never review (or see) another company's results, nor release its own
    Role.reviewer: frozenset({"office", "operator", "company"}),
    Role.auditor: frozenset({"regulator"}),
    Role.operator: frozenset({"operator"}),
}


class User(SQLModel, table=True):
    __tablename__ = "app_user"

    id: int | None = Field(default=None, primary_key=True)
    username: str = Field(index=True, unique=True, max_length=64)
    display_name: str = Field(default="", max_length=200)
    org_id: int = Field(foreign_key="organization.id", index=True)
    role: str = Field(max_length=20)
    password_hash: str = Field(max_length=300)
    is_active: bool = True
    # Login attempts since the last success or lock, counted when an attempt starts (before the
    # password is checked), so parallel guesses cannot outrun the limit.
    failed_logins: int = 0
    # With failed_logins 0 and an instant ahead: locked until then. Otherwise the instant the last
    # attempt was taken: a window (login_lock_minutes) later the count starts again
    # (pdao/kernel/identity/service.py, "The lockout").
    locked_until: datetime | None = None
    # Tokens issued before this instant are refused (password change, disable).
    tokens_valid_after: datetime = Field(default_factory=utcnow)
    last_login_at: datetime | None = None
    created_at: datetime = Field(default_factory=utcnow)


class ApiKey(SQLModel, table=True):
    """An API key for a user's scripts. An operator grants it (a pending row: no secret exists
    yet); the owner claims it signed in with their own password, and only then is the key made,
    shown to the owner once and kept here as a digest. So no one but the owner ever holds it."""

    __tablename__ = "api_key"

    id: int | None = Field(default=None, primary_key=True)
    user_id: int = Field(foreign_key="app_user.id", index=True)  # the owner
    # None while pending; set by the claim
    prefix: str | None = Field(default=None, index=True, unique=True, max_length=16)
    key_sha256: str | None = Field(default=None, max_length=64)  # the key itself is shown once and never stored
    label: str = Field(default="", max_length=200)
    issued_by: int | None = Field(default=None, foreign_key="app_user.id")  # the operator who granted it
    created_at: datetime = Field(default_factory=utcnow)
    valid_days: int | None = None        # the key's life, counted from the claim (None: no end)
    claim_by: datetime | None = None     # an unclaimed grant lapses at this instant
    claimed_at: datetime | None = None
    expires_at: datetime | None = None   # set by the claim: claimed_at + valid_days
    revoked_at: datetime | None = None
    revoked_by: int | None = Field(default=None, foreign_key="app_user.id")
    last_used_at: datetime | None = None


class LoginAddress(SQLModel, table=True):
    """An address a user signed in from (a digest of it) and when last: while the name is locked
    across addresses by guesses from elsewhere, the user still signs in from a known address."""

    __tablename__ = "login_address"

    user_id: int = Field(foreign_key="app_user.id", primary_key=True)
    address_key: str = Field(primary_key=True, max_length=64)
    last_login_at: datetime


class LoginThrottle(SQLModel, table=True):
    """Login attempts per (typed name, client address), real names and unknown ones alike, so the
    answers never tell which usernames exist (service: "The lockout counts ..."). A row that no
    longer counts or locks anything (its lock and window are over) is deleted
    (service.expire_login_throttle)."""

    __tablename__ = "login_throttle"

    username: str = Field(primary_key=True, max_length=64)   # the key: service.throttle_key(name, address)
    name: str | None = Field(default=None, max_length=64, index=True)   # the name typed (a reset clears its rows)
    failures: int = 0  # attempts since the last lock
    locked_until: datetime | None = None  # a lock's end (failures 0), or the last attempt
