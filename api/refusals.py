"""Refused requests that name nobody (no principal: no or a bad token, a refused login, a 404 without
credentials), per client address and minute, in this process.

Every request is audited (rule 3), but one event per anonymous refusal let one client write 269
chained events a second under the log's lock (22 GB a day) and slow every tenant (review r5 #4). So,
per address and calendar minute:

- the first `audited_per_minute` refusals are audited one by one, as any request;
- past that, they are counted and written as one `request.refused_summary` event when the minute
  is over (its count, statuses, busiest paths): still audited, in one row;
- past `answered_per_minute`, an anonymous request is not even run: `429 too_many_refused_requests`
  at once, counted the same way.

Whether a request names someone is decided by what it proves, not by what it carries: before it
runs, only a token whose signature is ours (bearer or the console's session cookie) or a
well-formed API key exempts it from the cut-off; after it ran, only a resolved principal exempts its
refusal from the count (a made-up `Authorization: Bearer x` wrote one event per request; review r6).
A summary keeps the names typed in refused logins with their counts, so the `failed_logins` alert
still sees guesses that went into a summary.
The counts live in memory; a process that stops writes what it holds at shutdown (`flush_all`), and
one that crashes loses at most its current minute's summary of anonymous refusals — never a
request that changed anything.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from sandbox.alerts import REFUSALS_SUMMARY_ACTION

AUDITED_PER_MINUTE = 30
ANSWERED_PER_MINUTE = 600
SUMMARY_ACTION = REFUSALS_SUMMARY_ACTION     # the alerts read these events (one name for both)


@dataclass
class _Minute:
    window: int                      # the minute, as int(epoch seconds // 60)
    refused: int = 0                 # every anonymous refusal this minute
    counted: int = 0                 # of those, the ones not audited one by one
    statuses: Counter = field(default_factory=Counter)
    paths: Counter = field(default_factory=Counter)
    names: Counter = field(default_factory=Counter)     # refused logins: the names typed


MAX_NAMES = 50      # names kept per summary (the rest counted together)


@dataclass(frozen=True)
class Summary:
    """One address's anonymous refusals of one minute that were not audited one by one."""

    client: str
    window_start: int                # epoch seconds of the minute's start
    count: int
    statuses: dict[str, int]
    paths: dict[str, int]
    names: dict[str, int] = field(default_factory=dict)

    def audit_fields(self) -> dict:
        from datetime import UTC, datetime

        start = datetime.fromtimestamp(self.window_start, UTC)
        return {"actor": None, "action": SUMMARY_ACTION, "object": None, "decision": "deny",
                "reason": "repeated_refusals", "status": 429 if "429" in self.statuses else None,
                "client": self.client[:64],
                "detail": {"count": self.count, "minute": start.isoformat().replace("+00:00", "Z"),
                           "statuses": self.statuses, "paths": self.paths,
                           **({"attempted_usernames": self.names} if self.names else {})}}


class AnonymousRefusals:
    def __init__(self, audited_per_minute: int = AUDITED_PER_MINUTE,
                 answered_per_minute: int = ANSWERED_PER_MINUTE) -> None:
        self.audited_per_minute = audited_per_minute
        self.answered_per_minute = answered_per_minute
        self._lock = threading.Lock()
        self._by_client: dict[str, _Minute] = {}
        self._done: list[Summary] = []

    @staticmethod
    def _window(now: float | None) -> int:
        return int((time.time() if now is None else now) // 60)

    def _minute(self, client: str, window: int) -> _Minute:
        m = self._by_client.get(client)
        if m is None or m.window != window:
            if m is not None and m.counted:
                self._done.append(_summary(client, m))
            m = self._by_client[client] = _Minute(window)
        return m

    def admit(self, client: str, now: float | None = None) -> bool:
        """Before an anonymous request runs: False when its address is past `answered_per_minute`
        refusals this minute (the caller answers 429 and counts it with `refused`)."""
        with self._lock:
            m = self._by_client.get(client)
            return m is None or m.window != self._window(now) or m.refused < self.answered_per_minute

    def refused(self, client: str, status: int, path: str, now: float | None = None,
                attempted_username: str | None = None) -> bool:
        """An anonymous request was refused: True when it is to be audited one by one, False when
        it is counted for the minute's summary (with the name typed, for a refused login)."""
        with self._lock:
            m = self._minute(client, self._window(now))
            m.refused += 1
            if m.refused <= self.audited_per_minute:
                return True
            m.counted += 1
            m.statuses[str(status)] += 1
            m.paths[path[:200]] += 1
            if attempted_username:
                name = attempted_username[:64]
                if name in m.names or len(m.names) < MAX_NAMES:
                    m.names[name] += 1
                else:
                    m.names["…"] += 1
            return False

    def due(self, now: float | None = None) -> list[Summary]:
        """The summaries of minutes that are over (taken: each is handed out once)."""
        window = self._window(now)
        with self._lock:
            for client, m in list(self._by_client.items()):
                if m.window < window:
                    if m.counted:
                        self._done.append(_summary(client, m))
                    del self._by_client[client]
            out, self._done = self._done, []
        return out

    def flush_all(self) -> list[Summary]:
        """Every summary held, the current minute's too (at shutdown)."""
        with self._lock:
            for client, m in self._by_client.items():
                if m.counted:
                    self._done.append(_summary(client, m))
            self._by_client.clear()
            out, self._done = self._done, []
        return out


def _summary(client: str, m: _Minute) -> Summary:
    return Summary(client, m.window * 60, m.counted, dict(m.statuses), dict(m.paths.most_common(5)), dict(m.names))


def proves_someone(headers: Mapping[str, str], cookies: Mapping[str, str], secret: str) -> bool:
    """Whether a request carries a credential worth running it for, before it runs: one of our
    tokens (its signature and expiry checked, no database) or a well-formed API key."""
    from api.console.auth import SESSION_COOKIE
    from pdao.kernel.identity import tokens

    auth = headers.get("authorization") or ""
    scheme, _, token = auth.partition(" ")
    candidates = [token.strip()] if scheme.lower() == "bearer" else []
    if cookies.get(SESSION_COOKIE):
        candidates.append(cookies[SESSION_COOKIE])
    if any(c and tokens.decode_token(c, secret) is not None for c in candidates):
        return True
    key = headers.get("x-api-key")
    return bool(key) and tokens.api_key_prefix(key) is not None


__all__ = ["ANSWERED_PER_MINUTE", "AUDITED_PER_MINUTE", "AnonymousRefusals", "SUMMARY_ACTION", "Summary",
           "proves_someone"]
