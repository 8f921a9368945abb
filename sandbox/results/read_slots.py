"""How many reads of result cells one user, and one organization, run at once: downloads
(`sandbox.results.export.export`, held until the last byte is sent or the stream is cut) and pages of rows
(`sandbox.queries.service.result_out`). Each is bounded in memory on its own (a page is at most
`queries.MAX_PAGE_ROWS` rows; a download is written to a staged file a batch at a time and streamed
a chunk at a time), and this bounds how many of them a server process holds in parallel: past
`MAX_READS_PER_USER` for the user or `MAX_READS_PER_ORG` for its organization, 429
`too_many_reads`, nothing read, nothing written. A download keeps its slot while it streams (the
review stalled 100 downloads of 14 MB each and pinned 1.4 GB of staged files when the slot ended
with the staging). The count lives in the process whose memory it protects (`pdao serve --workers N`
has N of them).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from pdao.kernel.config import Settings
from pdao.kernel.errors import PdaoError
from pdao.kernel.identity.service import Principal
from pdao.kernel.identity.throttle import refill

MAX_READS_PER_USER = 2
MAX_READS_PER_ORG = 6
RETRY_AFTER_SECONDS = 2

_lock = threading.Lock()
_by_user: dict[int, int] = {}      # user id -> reads running
_by_org: dict[int, int] = {}       # organization id -> reads running


# Rows read per organization and minute (result pages and downloads), a token bucket per
# organization in this process: one tenant reading 10,000-row pages in a loop (279 in 30 s) slowed
# every other tenant's requests 5-10x while within every other limit (review r5 #3). A read costs
# its rows: it may start once the budget holds them (or a whole minute's worth, for a larger one),
# and all its rows are taken, so a large download leaves the budget in debt for the minutes it is
# worth (review r6: capped at a minute's worth, large answers were under-charged).
_rows_lock = threading.Lock()
_rows: dict[tuple[str, int], tuple[float, float]] = {}   # (database, org id) -> (rows left, monotonic time)


def charge_rows(principal: Principal, rows: int, settings: Settings, now: float | None = None) -> None:
    """Take `rows` (at least 1) from the organization's read budget once it holds them (at most a
    minute's worth is waited for; the rest is debt), or 429 `read_rate_limited` with the seconds
    until it does."""
    now = time.monotonic() if now is None else now
    per_minute = settings.read_rows_per_minute
    rows = max(rows, 1)
    cost = float(min(rows, per_minute))
    key = (settings.database_url, principal.org_id)
    with _rows_lock:
        left, at = _rows.get(key, (float(per_minute), now))
        left = refill(left, now - at, per_minute)
        if left < cost:
            _rows[key] = (left, now)
            wait = max(1, math.ceil((cost - left) * 60.0 / per_minute))
            raise PdaoError(429, "read_rate_limited",
                            f"Your organization has read {per_minute} result rows in the last minute, the most "
                            f"allowed; try again in {wait} seconds (or read smaller pages).",
                            f"贵单位最近一分钟已读取 {per_minute} 行结果，已达上限；请 {wait} 秒后重试（或减小每页行数）。",
                            details={"rows_per_minute": per_minute, "retry_after_seconds": wait},
                            headers={"Retry-After": str(wait)})
        _rows[key] = (left - rows, now)


def in_use(principal: Principal) -> int:
    """The reads this user runs now, in this process."""
    with _lock:
        return _by_user.get(principal.user_id, 0)


class Slot:
    """One read slot of a user and its organization; `release()` gives it back (once, whoever calls)."""

    def __init__(self, user_id: int, org_id: int) -> None:
        self._user_id, self._org_id, self._held = user_id, org_id, True

    def release(self) -> None:
        with _lock:
            if not self._held:
                return
            self._held = False
            for counts, key in ((_by_user, self._user_id), (_by_org, self._org_id)):
                left = counts[key] - 1
                if left:
                    counts[key] = left
                else:
                    del counts[key]


def take(principal: Principal, limit: int = MAX_READS_PER_USER, org_limit: int = MAX_READS_PER_ORG) -> Slot:
    """One of the user's read slots, until `release()`; 429 `too_many_reads` when the user's or its
    organization's are all taken."""
    who, org = principal.user_id, principal.org_id
    with _lock:
        if _by_user.get(who, 0) >= limit:
            raise PdaoError(429, "too_many_reads",
                            f"You already have {limit} downloads or result reads in progress; at most {limit} run at "
                            "once. Try again when one has finished.",
                            f"您已有 {limit} 个下载或结果读取正在进行，同时最多 {limit} 个，请待其结束后重试。",
                            details={"limit": limit}, headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        if _by_org.get(org, 0) >= org_limit:
            raise PdaoError(429, "too_many_reads",
                            f"Your organization already has {org_limit} downloads or result reads in progress; at most "
                            f"{org_limit} run at once. Try again when one has finished.",
                            f"贵单位已有 {org_limit} 个下载或结果读取正在进行，同时最多 {org_limit} 个，请待其结束后重试。",
                            details={"limit": org_limit, "scope": "organization"},
                            headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        _by_user[who] = _by_user.get(who, 0) + 1
        _by_org[org] = _by_org.get(org, 0) + 1
    return Slot(who, org)


@contextmanager
def held(principal: Principal, limit: int = MAX_READS_PER_USER) -> Iterator[Slot]:
    """One of the user's read slots while the block runs (see `take`)."""
    slot = take(principal, limit)
    try:
        yield slot
    finally:
        slot.release()


__all__ = ["MAX_READS_PER_ORG", "MAX_READS_PER_USER", "Slot", "charge_rows", "held", "in_use", "take"]
