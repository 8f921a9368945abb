"""The scene life cycle as data, and the pure function that says where a scene stands now.

Stored statuses change only by a person's action; `active` and `expired` are derived from the
validity window and the clock, so expiry takes effect without any job having to run.

    draft ─submit─▶ submitted ─return─▶ returned ─submit─▶ submitted
                        │ └─reject─▶ rejected
                        └─approve (enough distinct office approvers)─▶ approved
    approved ≡ active while valid_from ≤ today ≤ valid_to, expired after
    approved/active ─suspend─▶ suspended ─resume─▶ approved/active
    approved/active/suspended ─revoke─▶ revoked (final)
"""

from __future__ import annotations

from datetime import date, datetime
from zoneinfo import ZoneInfo

# action -> (stored statuses it may start from, stored status it leads to)
TRANSITIONS: dict[str, tuple[frozenset[str], str]] = {
    "submit": (frozenset({"draft", "returned"}), "submitted"),
    "return": (frozenset({"submitted"}), "returned"),
    "reject": (frozenset({"submitted"}), "rejected"),
    "approve": (frozenset({"submitted"}), "approved"),
    "suspend": (frozenset({"approved"}), "suspended"),
    "resume": (frozenset({"suspended"}), "approved"),
    "revoke": (frozenset({"approved", "suspended"}), "revoked"),
}
EDITABLE = frozenset({"draft", "returned"})
FINAL = frozenset({"rejected", "revoked"})

CITY_TZ = ZoneInfo("Asia/Shanghai")  # validity dates are the city's calendar days


def today_in_city(now: datetime) -> date:
    return now.astimezone(CITY_TZ).date()


def effective_status(stored: str, valid_from: date, valid_to: date, now: datetime) -> str:
    """draft, submitted, returned, rejected, approved (not yet valid), active, suspended, expired, revoked."""
    if stored in ("approved", "suspended"):
        today = today_in_city(now)
        if today > valid_to:
            return "expired"
        if stored == "approved":
            return "active" if today >= valid_from else "approved"
    return stored


def may_transition(action: str, stored: str, valid_to: date, now: datetime) -> bool:
    """Whether `action` applies to a scene in `stored` status now (an expired scene only gets revoked)."""
    sources, _ = TRANSITIONS[action]
    if stored not in sources:
        return False
    if action in ("suspend", "resume") and today_in_city(now) > valid_to:
        return False
    return True
