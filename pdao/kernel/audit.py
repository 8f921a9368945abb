"""The audit log: append-only and hash-chained (docs/audit.md).

One event per request and per security decision (login, failed login, token use, CLI change),
allowed or denied. Never put raw cell values in an event; SQL text is fine.

The chain
---------
Every event carries `seq` (1, 2, 3, … with no gaps), `prev_hash` (the `hash` of event seq-1;
64 zeros for seq 1) and `hash`: the hex SHA-256 of the event's *canonical serialization* —
the JSON object of exactly the fields in `CHAINED_FIELDS`, keys sorted, no spaces, UTF-8
(non-ASCII characters as themselves), `at` as ISO 8601 UTC with microseconds and a `Z`
(`2026-11-28T11:27:36.831378Z`). Every value is normalized before it is hashed and stored
(strings cut to their column's length, `detail` reduced to plain JSON), so the row read back
from SQLite or PostgreSQL serializes to exactly the bytes that were hashed.

The one-row table `audit_head` holds the last `seq` and `hash`. An append locks it (PostgreSQL:
`SELECT … FOR UPDATE`; SQLite: a no-op `UPDATE` that takes the database's write lock before
reading), reads it, inserts event head+1 and moves the head, all in one transaction: the order
of `seq` is the order of the chain whatever the number of server processes, and a rolled-back
transaction leaves neither an event nor a moved head.

`append(session, **fields)` appends inside the caller's transaction (a decision and its event
commit together; call it last, just before the commit, since it holds the log's lock until
then); `record(engine, **fields)` appends in a transaction of its own, retried a few times when
the database is busy. `verify` / `verify_lines` find the first broken link; `export_jsonl`
writes the log as JSON lines that `verify_lines`, `pdao audit verify --file` or the stdlib-only
snippet in docs/audit.md check without the database.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import random
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import IO, Any

from sqlalchemy import JSON, CheckConstraint, Column, insert, select, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlmodel import Field, Session, SQLModel
from sqlmodel import select as sm_select

from pdao.kernel.db import utcnow

GENESIS_HASH = "0" * 64  # the prev_hash of event 1
EXPORT_FORMAT = "pdao-audit-export/1"

# The fields a hash covers, in the order of the table (the canonical JSON sorts them anyway).
CHAINED_FIELDS = ("seq", "prev_hash", "at", "request_id", "actor", "org", "role", "auth_method", "action",
                  "object", "scene_id", "decision", "status", "reason", "method", "path", "client", "detail")
# What a caller may give: the chained fields but the three the chain assigns.
EVENT_FIELDS = tuple(f for f in CHAINED_FIELDS if f not in ("seq", "prev_hash"))
DECISIONS = ("allow", "deny", "error")
_STRINGS = {"request_id": 64, "actor": 64, "org": 64, "role": 20, "auth_method": 20, "action": 80,
            "object": 200, "decision": 10, "reason": 500, "method": 10, "path": 400, "client": 64}
_INTEGERS = ("scene_id", "status")
_MAX_INT = 2_147_483_647      # INTEGER on PostgreSQL
_REQUIRED = ("action", "decision")
_RETRIES = 4


class AuditEvent(SQLModel, table=True):
    __tablename__ = "audit_event"

    seq: int | None = Field(default=None, primary_key=True)
    at: datetime = Field(default_factory=utcnow, index=True)
    request_id: str | None = Field(default=None, max_length=64)
    actor: str | None = Field(default=None, max_length=64, index=True)
    org: str | None = Field(default=None, max_length=64, index=True)
    role: str | None = Field(default=None, max_length=20)
    auth_method: str | None = Field(default=None, max_length=20)  # password | token | api_key | cli
    action: str = Field(max_length=80, index=True)
    object: str | None = Field(default=None, max_length=200)
    scene_id: int | None = Field(default=None, index=True)
    decision: str = Field(max_length=10, index=True)  # allow | deny | error
    status: int | None = None
    reason: str | None = Field(default=None, max_length=500)
    method: str | None = Field(default=None, max_length=10)
    path: str | None = Field(default=None, max_length=400)
    client: str | None = Field(default=None, max_length=64)
    detail: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    prev_hash: str = Field(max_length=64)  # the hash of event seq-1 (GENESIS_HASH for seq 1)
    hash: str = Field(max_length=64)  # SHA-256 of canonical_bytes(the chained fields)


class AuditHead(SQLModel, table=True):
    """The last event's seq and hash (one row, id 1): the lock appends take, and the anchor that
    shows a truncated tail. seq 0 and GENESIS_HASH while the log is empty."""

    __tablename__ = "audit_head"
    __table_args__ = (CheckConstraint("id = 1", name="ck_audit_head_one_row"),)

    id: int = Field(default=1, primary_key=True, sa_column_kwargs={"autoincrement": False})
    seq: int
    hash: str = Field(max_length=64)


class AuditChainError(RuntimeError):
    """The log cannot be appended to (missing head row, events beyond the head)."""


# --- canonical serialization ---------------------------------------------------------------------

def format_at(value: datetime) -> str:
    """ISO 8601 UTC with microseconds and a Z; a naive value (SQLite) is UTC already."""
    if value.tzinfo is not None and value.utcoffset():
        value = value.astimezone(UTC)
    return value.isoformat(timespec="microseconds")[:26] + "Z"  # without the "+00:00" of an aware value


# One encoder, built once (json.dumps with options builds a new one on every call).
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
_LINE = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def canonical_bytes(record: Mapping[str, Any]) -> bytes:
    """Sorted keys, no spaces, UTF-8, no NaN/Infinity: the bytes a hash is taken of — in Python,
    json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")."""
    return _CANONICAL.encode(record).encode("utf-8")


def chain_record(values: Mapping[str, Any]) -> dict[str, Any]:
    """The chained fields of an event (a row, a model or a dict) in their JSON form."""
    get = values.get if isinstance(values, Mapping) else lambda k: getattr(values, k)
    rec = {k: get(k) for k in CHAINED_FIELDS}
    if isinstance(rec["at"], datetime):
        rec["at"] = format_at(rec["at"])
    return rec


def event_hash(record: Mapping[str, Any]) -> str:
    """hex SHA-256 of the canonical bytes of a chain record (from `chain_record`)."""
    return hashlib.sha256(canonical_bytes(record)).hexdigest()


def event_json(values: Mapping[str, Any] | AuditEvent) -> dict[str, Any]:
    """An event as it is exported and answered: the chained fields plus its hash."""
    rec = chain_record(values)
    rec["hash"] = values["hash"] if isinstance(values, Mapping) else values.hash
    return rec


def export_line(values: Mapping[str, Any] | AuditEvent) -> str:
    """One JSONL line: sorted keys, ASCII-only (\\u escapes), so no character can split a line."""
    return _LINE.encode(event_json(values)) + "\n"


def _clean(s: str) -> str:
    if not s.isascii():
        s = s.encode("utf-8", "replace").decode("utf-8")  # no lone surrogates: they cannot be hashed
    return s.replace("\x00", "\ufffd")  # PostgreSQL refuses NUL in text


def _text(value: Any, limit: int) -> str:
    return _clean(value if isinstance(value, str) else str(value))[:limit]


# Bounds of an event's `detail`, whatever a caller put in it (a request's own JSON is copied into
# some details): a value nested 900 deep overflowed the recursion and the request was answered 503
# with no event at all (review r5 #6). Past a bound the value is cut, with a marker; a cut value is
# within the bounds, so normalizing it again changes nothing.
DETAIL_MAX_DEPTH = 16
DETAIL_MAX_ITEMS = 1000          # per list or mapping
DETAIL_MAX_CHARS = 21_000        # per string (a query's SQL is at most 20,000)


def _cut_text(s: str) -> str:
    s = _clean(s)
    return s if len(s) <= DETAIL_MAX_CHARS else s[:DETAIL_MAX_CHARS - 1] + "…"


def _plain(value: Any, depth: int = 0) -> Any:
    """`detail` reduced to what JSON round-trips unchanged on both databases, within the bounds above."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return _cut_text(value)
    if isinstance(value, (Mapping, list, tuple, set, frozenset)) and depth >= DETAIL_MAX_DEPTH:
        return "…(nested deeper)"
    if isinstance(value, Mapping):
        items = list(value.items())
        out = {_cut_text(str(k)): _plain(v, depth + 1) for k, v in items[:DETAIL_MAX_ITEMS - 1]}
        if len(items) >= DETAIL_MAX_ITEMS:
            if len(items) == DETAIL_MAX_ITEMS:
                k, v = items[-1]
                out[_cut_text(str(k))] = _plain(v, depth + 1)
            else:
                out["…"] = f"{len(items) - DETAIL_MAX_ITEMS + 1} more"
        return out
    if isinstance(value, (list, tuple, set, frozenset)):
        seq = list(value)
        if len(seq) <= DETAIL_MAX_ITEMS:
            return [_plain(v, depth + 1) for v in seq]
        return [_plain(v, depth + 1) for v in seq[:DETAIL_MAX_ITEMS - 1]] + [f"…{len(seq) - DETAIL_MAX_ITEMS + 1} more"]
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        f = float(value)
        return f if math.isfinite(f) else str(f)
    if isinstance(value, datetime):
        return format_at(value) if value.tzinfo is not None else value.isoformat()
    return _cut_text(str(value))


def normalize(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The caller's fields as they will be stored and hashed."""
    unknown = set(fields) - set(EVENT_FIELDS)
    if unknown:
        raise TypeError(f"not audit event fields: {sorted(unknown)} (seq, prev_hash and hash are assigned)")
    rec: dict[str, Any] = {}
    for name, limit in _STRINGS.items():
        v = fields.get(name)
        rec[name] = None if v is None else _text(v, limit)
    out_of_range: dict[str, str] = {}
    for name in _INTEGERS:
        v = fields.get(name)
        rec[name] = None if v is None else int(v)
        if rec[name] is not None and not -_MAX_INT <= rec[name] <= _MAX_INT:
            # an id from a URL beyond the column's range: kept as text, so the event is still written
            out_of_range[name] = str(rec[name])[:40]
            rec[name] = None
    for name in _REQUIRED:
        if not rec[name]:
            raise ValueError(f"an audit event needs '{name}'")
    if rec["decision"] not in DECISIONS:
        raise ValueError(f"decision must be one of {DECISIONS}, not {rec['decision']!r}")
    detail = _plain(fields.get("detail"))
    if detail is not None and not isinstance(detail, dict):
        detail = {"value": detail}
    if out_of_range:
        detail = {**(detail or {}), "out_of_range": out_of_range}
    rec["detail"] = detail
    at = fields.get("at")
    if at is not None:
        if not isinstance(at, datetime) or at.tzinfo is None:
            raise ValueError("'at' must be an aware datetime")
        rec["at"] = at.astimezone(UTC)
    return rec


# --- appending -----------------------------------------------------------------------------------

_TABLE = AuditEvent.__table__
_HEAD_TAKE_SQLITE = text("UPDATE audit_head SET seq = seq WHERE id = 1")  # takes SQLite's write lock
_HEAD_READ = text("SELECT seq, hash FROM audit_head WHERE id = 1")
_HEAD_LOCK = text("SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE")
_HEAD_MOVE = text("UPDATE audit_head SET seq = :seq, hash = :hash WHERE id = 1")


def _append(conn: Connection, rec: dict[str, Any]) -> dict[str, Any]:
    """Lock the head, insert event head+1, move the head: inside `conn`'s open transaction."""
    if conn.dialect.name == "sqlite":
        conn.execute(_HEAD_TAKE_SQLITE)
        head = conn.execute(_HEAD_READ).first()
    else:
        head = conn.execute(_HEAD_LOCK).first()
    if head is None:
        raise AuditChainError("The audit head row is missing: the log cannot be appended to. "
                              "Run `pdao audit verify`.")
    rec = dict(rec, seq=head[0] + 1, prev_hash=head[1])
    if rec.get("at") is None:
        rec["at"] = utcnow()  # taken under the lock, so time follows seq
    rec["hash"] = event_hash(chain_record(rec))
    conn.execute(insert(_TABLE).values(**rec))
    conn.execute(_HEAD_MOVE, {"seq": rec["seq"], "hash": rec["hash"]})
    return rec


def append(session: Session, **fields: Any) -> AuditEvent:
    """Append one event inside `session`'s open transaction; the caller commits (or rolls back,
    and then neither the event nor the head move survives). Holds the log's lock until the
    transaction ends, so call it last."""
    rec = normalize(fields)
    return AuditEvent(**_append(session.connection(), rec))


def _retryable(e: DBAPIError) -> bool:
    code = getattr(e.orig, "sqlstate", None)
    if code in ("40001", "40P01", "55P03"):  # serialization failure, deadlock, lock not available
        return True
    msg = str(e.orig).lower()
    return "database is locked" in msg or "database is busy" in msg or "database table is locked" in msg


def record(engine: Engine, **fields: Any) -> AuditEvent:
    """Append one event in its own transaction, so that it survives a rolled-back business change.
    Retried (a few times, with backoff) while the database is busy."""
    rec = normalize(fields)
    for attempt in range(_RETRIES):
        try:
            with engine.begin() as conn:
                return AuditEvent(**_append(conn, rec))
        except IntegrityError as e:
            raise AuditChainError("An event already holds the next seq: the log has events beyond its "
                                  "head. Run `pdao audit verify`.") from e
        except DBAPIError as e:
            if attempt == _RETRIES - 1 or not _retryable(e):
                raise
            time.sleep(0.02 * 2 ** attempt * (1 + random.random()))
    raise AssertionError("unreachable")


# --- reading -------------------------------------------------------------------------------------

_COLUMNS = [_TABLE.c[f] for f in CHAINED_FIELDS] + [_TABLE.c.hash]
_BATCH = 5000


@contextmanager
def _snapshot(source: Session | Engine | Connection) -> Iterator[Connection]:
    """A read-only connection on one consistent snapshot of the log (PostgreSQL: REPEATABLE READ;
    SQLite: one read transaction), so the head and the events agree while appends go on."""
    bind = source.get_bind() if isinstance(source, Session) else source
    if isinstance(bind, Connection):
        yield bind
        return
    with bind.connect() as conn:
        if conn.dialect.name == "sqlite":
            conn.exec_driver_sql("BEGIN")  # pysqlite would not begin before a SELECT
        else:
            conn = conn.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
        try:
            yield conn
        finally:
            conn.rollback()


def _head(conn: Connection) -> tuple[int, str] | None:
    row = conn.execute(_HEAD_READ).first()
    return None if row is None else (int(row[0]), row[1])


def read_head(source: Session | Engine | Connection) -> tuple[int, str] | None:
    """(seq, hash) of the head row: the anchor to publish. None if the row is missing."""
    with _snapshot(source) as conn:
        return _head(conn)


def _rows(conn: Connection, from_seq: int | None, to_seq: int | None) -> Iterator[tuple[dict[str, Any], str]]:
    stmt = select(*_COLUMNS).order_by(_TABLE.c.seq)
    if from_seq is not None:
        stmt = stmt.where(_TABLE.c.seq >= from_seq)
    if to_seq is not None:
        stmt = stmt.where(_TABLE.c.seq <= to_seq)
    result = conn.execution_options(yield_per=_BATCH).execute(stmt)
    n = len(CHAINED_FIELDS)
    for row in result:
        rec = dict(zip(CHAINED_FIELDS, row[:n]))
        if rec["at"] is not None:
            rec["at"] = format_at(rec["at"])
        yield rec, row[n]


# --- verification --------------------------------------------------------------------------------

@dataclass
class VerifyReport:
    ok: bool
    checked: int  # events whose hash and link were found good, before the first bad one
    first_bad_seq: int | None
    head_seq: int | None  # the head the log claims (the head row, or an export's header)
    head_hash: str | None
    reason: str | None  # why first_bad_seq is bad

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Chain:
    """Walks events in order; stops at the first that does not continue the chain."""

    def __init__(self, from_seq: int, anchor: tuple[int, str] | None) -> None:
        self.expected = from_seq
        self.link: str | None = GENESIS_HASH if from_seq == 1 else None  # else: the first prev_hash is taken
        self.checked = 0
        self.bad: int | None = None
        self.reason: str | None = None
        self.anchor = anchor

    def fail(self, seq: int, reason: str) -> None:
        if self.bad is None:
            self.bad, self.reason = seq, reason

    def feed(self, rec: Mapping[str, Any], claimed: Any) -> bool:
        seq = rec.get("seq")
        if not isinstance(seq, int) or seq != self.expected:
            if isinstance(seq, int) and seq > self.expected:
                self.fail(self.expected, f"event {self.expected} is missing (the next event is {seq})")
            else:
                self.fail(self.expected, f"expected event {self.expected}, found seq {seq!r} (out of order)")
            return False
        try:
            good = event_hash(rec) == claimed
        except (TypeError, ValueError):
            good = False
        if not good:
            self.fail(seq, f"event {seq} does not match its hash: its content was altered")
            return False
        if self.link is not None and rec.get("prev_hash") != self.link:
            self.fail(seq, f"event {seq} is not linked to event {seq - 1}: prev_hash differs from that event's hash")
            return False
        if self.anchor is not None and self.anchor[0] == seq and self.anchor[1] != claimed:
            self.fail(seq, f"event {seq} differs from the anchor's hash")
            return False
        self.link = claimed
        self.expected += 1
        self.checked += 1
        return True

    @property
    def last(self) -> int:
        return self.expected - 1

    def finish(self, head: tuple[int, str] | None, end: int | None) -> None:
        """`head`: what the log claims as its last event; `end`: the last seq that must be present
        (None: up to the head)."""
        if self.bad is not None:
            return
        if head is None:
            self.fail(self.expected, "the head row is missing: the last event cannot be checked")
            return
        head_seq, head_hash = head
        if self.last > head_seq:
            self.checked -= self.last - head_seq  # the events beyond the head are not good ones
            self.fail(head_seq + 1, f"event {head_seq + 1} lies beyond the head ({head_seq}): "
                                    "events were added outside the chain")
            return
        must_reach = head_seq if end is None else min(end, head_seq)
        if self.last < must_reach:
            self.fail(self.last + 1, f"event {self.last + 1} is missing: the log ends at {self.last} but its head "
                                     f"says {head_seq} (the tail was removed)")
            return
        if self.last == head_seq and self.link is not None and self.link != head_hash:
            self.fail(head_seq, f"event {head_seq} differs from the head's hash" if head_seq else
                      "the log is empty but its head hash is not the genesis hash")
            return
        if self.anchor is not None and self.anchor[0] > self.last:
            self.fail(self.last + 1, f"the log ends at {self.last}, before the anchor at {self.anchor[0]} "
                                     "(the tail was removed, head and all)")

    def report(self, head: tuple[int, str] | None) -> VerifyReport:
        return VerifyReport(ok=self.bad is None, checked=self.checked, first_bad_seq=self.bad,
                            head_seq=head[0] if head else None, head_hash=head[1] if head else None,
                            reason=self.reason)


def verify(source: Session | Engine | Connection, from_seq: int | None = None,
           anchor: tuple[int, str] | None = None) -> VerifyReport:
    """Check the stored chain from `from_seq` (default 1) to the head, in batches on one snapshot:
    each event's hash, its link to the one before, no missing seq, and that the last event is the
    head. Stops at the first bad event. From a `from_seq` > 1 the first event's prev_hash is taken
    as given. `anchor` (seq, hash) — a head published earlier — must still be in the log."""
    start = max(1, from_seq or 1)
    chain = _Chain(start, anchor)
    with _snapshot(source) as conn:
        head = _head(conn)
        for rec, claimed in _rows(conn, start, None):
            if not chain.feed(rec, claimed):
                break
    chain.finish(head, None)
    return chain.report(head)


def verify_lines(lines: Iterable[str | bytes], anchor: tuple[int, str] | None = None) -> VerifyReport:
    """Check an exported JSONL file (its header line first, then one event a line) the same way.
    Without a header, the lines are checked as a chain from their first event, with no head."""
    chain: _Chain | None = None
    header: dict[str, Any] | None = None
    for n, raw in enumerate(lines, 1):
        line = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            seq = chain.expected if chain else (header or {}).get("from_seq", 1)
            return VerifyReport(False, chain.checked if chain else 0, seq, _hs(header), _hh(header),
                                f"line {n} is not a JSON object")
        if chain is None and header is None and "format" in obj:
            header = obj
            if header.get("format") != EXPORT_FORMAT:
                return VerifyReport(False, 0, None, None, None, f"unknown export format {header.get('format')!r}")
            continue
        if chain is None:
            first = header.get("from_seq") if header else obj.get("seq")
            chain = _Chain(first if isinstance(first, int) and first >= 1 else 1, anchor)
        claimed = obj.pop("hash", None)
        if not chain.feed(obj, claimed):
            break
    if chain is None:
        chain = _Chain(header.get("from_seq", 1) if header else 1, anchor)
    if header is not None:
        chain.finish((header.get("head_seq"), header.get("head_hash")), header.get("to_seq"))
        return chain.report((header.get("head_seq"), header.get("head_hash")))
    if chain.bad is None and chain.anchor is not None and chain.anchor[0] > chain.last:
        chain.fail(chain.last + 1, f"the file ends at {chain.last}, before the anchor at {chain.anchor[0]}")
    return chain.report((chain.last, chain.link) if chain.checked else None)


def _hs(header: dict | None) -> int | None:
    return header.get("head_seq") if header else None


def _hh(header: dict | None) -> str | None:
    return header.get("head_hash") if header else None


# --- export --------------------------------------------------------------------------------------

def export_lines(source: Session | Engine | Connection, from_seq: int | None = None,
                 to_seq: int | None = None) -> Iterator[str]:
    """The export, line by line, from one snapshot: a header (format, range, the head at export
    time), then one event a line in seq order. Streams: memory stays bounded."""
    start = max(1, from_seq or 1)
    with _snapshot(source) as conn:
        head = _head(conn)
        yield json.dumps({"format": EXPORT_FORMAT, "from_seq": start, "to_seq": to_seq,
                          "head_seq": head[0] if head else None, "head_hash": head[1] if head else None,
                          "exported_at": format_at(utcnow())},
                         sort_keys=True, separators=(",", ":")) + "\n"
        for rec, claimed in _rows(conn, start, to_seq):
            rec["hash"] = claimed
            yield _LINE.encode(rec) + "\n"


def export_jsonl(source: Session | Engine | Connection, out: IO[str], from_seq: int | None = None,
                 to_seq: int | None = None) -> int:
    """Write the export to the text stream `out`; the number of events written."""
    n = -1
    for line in export_lines(source, from_seq, to_seq):
        out.write(line)
        n += 1
    return n


# --- searching -----------------------------------------------------------------------------------

@dataclass
class EventFilter:
    actor: str | None = None
    org: str | None = None
    scene: int | None = None
    action: str | None = None  # exact, or a prefix ending in '*' ("scene.*")
    decision: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    after_seq: int | None = None
    before_seq: int | None = None
    newest_first: bool = False
    limit: int = 100


def find_events(session: Session, flt: EventFilter) -> list[AuditEvent]:
    """Events matching every given filter, in seq order (or newest first), at most `limit`."""
    t = AuditEvent
    stmt = sm_select(t)
    if flt.actor is not None:
        stmt = stmt.where(t.actor == flt.actor)
    if flt.org is not None:
        stmt = stmt.where(t.org == flt.org)
    if flt.scene is not None:
        stmt = stmt.where(t.scene_id == flt.scene)
    if flt.action is not None:
        if flt.action.endswith("*"):
            prefix = flt.action[:-1].replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            stmt = stmt.where(t.action.like(prefix + "%", escape="\\"))
        else:
            stmt = stmt.where(t.action == flt.action)
    if flt.decision is not None:
        stmt = stmt.where(t.decision == flt.decision)
    if flt.since is not None:
        stmt = stmt.where(t.at >= _aware(flt.since))
    if flt.until is not None:
        stmt = stmt.where(t.at < _aware(flt.until))
    if flt.after_seq is not None:
        stmt = stmt.where(t.seq > flt.after_seq)
    if flt.before_seq is not None:
        stmt = stmt.where(t.seq < flt.before_seq)
    stmt = stmt.order_by(t.seq.desc() if flt.newest_first else t.seq).limit(flt.limit)
    return list(session.exec(stmt).all())


def _aware(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
