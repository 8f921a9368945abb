"""Bounds on password checks, before any is computed: how many one client address may start per
minute, and how many run at once in this process.

A password check is Argon2id at ~0.35 s of CPU and 64 MiB. The account lockout (service.py) limits
guesses per *name*, but every made-up name has its own allowance, so without these bounds anyone
could keep the CPU busy with fresh names. Both bounds live in memory, per server process (a restart
forgets them; each of several processes has its own): they protect this process's CPU, they are not
a security record — the lockout and the audit log are in the database.

- `AddressRate`: a token bucket per client address (an IPv6 address counts by its /64, what one
  host usually holds): `rate` checks per minute, at most `rate` at once after a quiet spell. A
  refused attempt touches neither the database nor the hash; an attempt that ends without a
  check (the account is locked, no slot) gets its token back.
- `HashSlots`: at most `n` checks at once; a login waits a short while for its turn, then is
  refused (429 login_busy). The async wait holds no worker thread, so waiting logins never take
  the thread pool from other requests.
"""

from __future__ import annotations

import ipaddress
import math
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

import anyio

from pdao.kernel.config import Settings
from pdao.kernel.errors import PdaoError

MAX_ADDRESSES = 100_000   # buckets kept; beyond this the full ones, then the oldest, are forgotten
_POLL_SECONDS = 0.005      # a waiting login looks for a free slot after this, then less and less often
_POLL_MAX_SECONDS = 0.05


def address_key(host: str | None) -> str:
    """Whose bucket an address fills: the address itself, an IPv6 address by its /64 (an
    IPv4-mapped one as the IPv4 address), anything else (a test client's name) as given."""
    if not host:
        return "unknown"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host[:64]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def refill(tokens: float, elapsed_seconds: float, rate_per_minute: int) -> float:
    """A bucket's tokens after `elapsed_seconds`: `rate_per_minute` come back a minute, up to the
    bucket's size (`rate_per_minute`)."""
    return min(float(rate_per_minute), tokens + max(elapsed_seconds, 0.0) * rate_per_minute / 60.0)


def wait_for_token(tokens: float, rate_per_minute: int) -> float:
    """Seconds until a bucket holding `tokens` (< 1) holds one."""
    return max(1.0 - tokens, 0.0) * 60.0 / rate_per_minute


def rate_limited(retry_after: float) -> PdaoError:
    seconds = max(1, math.ceil(retry_after))
    return PdaoError(429, "login_rate_limited",
                     f"Too many login attempts from your address; try again in {seconds} seconds.",
                     f"您所在地址的登录尝试过于频繁，请 {seconds} 秒后重试。",
                     headers={"Retry-After": str(seconds)})


def busy() -> PdaoError:
    return PdaoError(429, "login_busy", "Too many logins are being checked right now; try again in a moment.",
                     "当前正在校验的登录过多，请稍后重试。", headers={"Retry-After": "1"})


class AddressRate:
    """Token buckets per client address (thread-safe)."""

    def __init__(self, rate_per_minute: int, max_addresses: int = MAX_ADDRESSES) -> None:
        self.rate = rate_per_minute
        self.max_addresses = max_addresses
        self._buckets: dict[str, tuple[float, float]] = {}   # key -> (tokens, monotonic time), oldest first
        self._lock = threading.Lock()

    def take(self, host: str | None, now: float | None = None) -> None:
        """Take a token for one password check, or raise 429 login_rate_limited."""
        key, now = address_key(host), time.monotonic() if now is None else now
        with self._lock:
            tokens, at = self._buckets.pop(key, (float(self.rate), now))
            tokens = refill(tokens, now - at, self.rate)
            if tokens < 1.0:
                self._buckets[key] = (tokens, now)
                raise rate_limited(wait_for_token(tokens, self.rate))
            self._buckets[key] = (tokens - 1.0, now)   # re-inserted: the dict stays in order of use
            if len(self._buckets) > self.max_addresses:
                self._forget(now)

    def give_back(self, host: str | None, now: float | None = None) -> None:
        """An attempt that ended without a password check returns its token."""
        key, now = address_key(host), time.monotonic() if now is None else now
        with self._lock:
            if key in self._buckets:
                tokens, at = self._buckets[key]
                self._buckets[key] = (min(float(self.rate), refill(tokens, now - at, self.rate) + 1.0), now)

    def __len__(self) -> int:
        return len(self._buckets)

    def _forget(self, now: float) -> None:
        """Drop the buckets that are full again (they hold nothing a new one would not), then the
        least recently used until a tenth of the room is free."""
        self._buckets = {k: (t, at) for k, (t, at) in self._buckets.items()
                         if refill(t, now - at, self.rate) < self.rate}
        while len(self._buckets) > self.max_addresses * 9 // 10:
            del self._buckets[next(iter(self._buckets))]


class HashSlots:
    """At most `n` password checks at once in this process."""

    def __init__(self, n: int, wait_seconds: float) -> None:
        self._slots = threading.BoundedSemaphore(n)
        self.wait_seconds = wait_seconds

    @asynccontextmanager
    async def held(self) -> AsyncIterator[None]:
        """For async routes: wait (without a thread) up to `wait_seconds`, else 429 login_busy."""
        deadline = time.monotonic() + self.wait_seconds
        pause = _POLL_SECONDS
        while not self._slots.acquire(blocking=False):
            if time.monotonic() >= deadline:
                raise busy()
            await anyio.sleep(pause)
            pause = min(pause * 2, _POLL_MAX_SECONDS)   # many waiters: fewer wake-ups each
        try:
            yield
        finally:
            self._slots.release()

    @contextmanager
    def held_blocking(self) -> Iterator[None]:
        """For code already on a worker thread."""
        if not self._slots.acquire(timeout=self.wait_seconds):
            raise busy()
        try:
            yield
        finally:
            self._slots.release()


@dataclass
class LoginGuard:
    """The two bounds of one server process (one per app)."""

    rate: AddressRate
    slots: HashSlots

    @classmethod
    def from_settings(cls, settings: Settings) -> "LoginGuard":
        return cls(AddressRate(settings.login_rate_per_minute),
                   HashSlots(settings.login_max_concurrent_hashes, settings.login_hash_wait_seconds))


# Refusals of work that checks a password, before it has computed one: the attempt gives its
# address token back.
UNCHECKED = frozenset({"login_locked", "login_busy"})
