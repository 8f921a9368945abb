"""How many reads of result cells one user runs at once: downloads (`sandbox.export.export`) and pages
of rows (`sandbox.queries.result_out`). Each is bounded in memory on its own (a page is at most
`queries.MAX_PAGE_ROWS` rows; a download is written to a file a batch at a time), and this bounds
how many of them one user can make a server process do in parallel: past `MAX_READS_PER_USER`, 429
`too_many_reads`, nothing read, nothing written. The count lives in the process whose memory it
protects (`pdao serve --workers N` has N of them).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from pdao.errors import PdaoError
from pdao.identity.service import Principal

MAX_READS_PER_USER = 2
RETRY_AFTER_SECONDS = 2

_lock = threading.Lock()
_running: dict[int, int] = {}      # user id -> reads running


def in_use(principal: Principal) -> int:
    """The reads this user runs now, in this process."""
    with _lock:
        return _running.get(principal.user_id, 0)


@contextmanager
def held(principal: Principal, limit: int = MAX_READS_PER_USER) -> Iterator[None]:
    """One of the user's read slots while the block runs; 429 `too_many_reads` when all are taken."""
    who = principal.user_id
    with _lock:
        if _running.get(who, 0) >= limit:
            raise PdaoError(429, "too_many_reads",
                            f"You already have {limit} downloads or result reads in progress; at most {limit} run at "
                            "once. Try again when one has finished.",
                            f"您已有 {limit} 个下载或结果读取正在进行，同时最多 {limit} 个，请待其结束后重试。",
                            details={"limit": limit}, headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        _running[who] = _running.get(who, 0) + 1
    try:
        yield
    finally:
        with _lock:
            left = _running[who] - 1
            if left:
                _running[who] = left
            else:
                del _running[who]


__all__ = ["MAX_READS_PER_USER", "held", "in_use"]
