"""The hash-chained audit log (docs/audit.md), on SQLite and PostgreSQL: requests are chained;
each kind of tampering, done with raw SQL, is found at the exact seq by `verify`, by
`GET /audit/verify`, in an export by `verify_lines`, `pdao audit verify --file` and the outsider
snippet of docs/audit.md; appends from two OS processes keep one chain; a rolled-back append
leaves nothing; auditors can filter the events."""

from __future__ import annotations

import io
import json
import multiprocessing
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import inspect, text
from sqlmodel import Session
from typer.testing import CliRunner

from pdao.cli.main import app as cli_app
from pdao.kernel import audit
from pdao.kernel.audit import GENESIS_HASH, AuditChainError
from pdao.kernel.db import alembic_config, make_engine, migrate

REPO = Path(__file__).resolve().parents[1]
API = "/api/v1"


# --- helpers -------------------------------------------------------------------------------------

def chain(engine) -> list[tuple[int, str, str]]:
    with engine.connect() as c:
        return [tuple(r) for r in c.execute(text("SELECT seq, prev_hash, hash FROM audit_event ORDER BY seq"))]


def head(engine) -> tuple[int, str]:
    with engine.connect() as c:
        return tuple(c.execute(text("SELECT seq, hash FROM audit_head WHERE id = 1")).one())


def sql(engine, statement: str, **params) -> None:
    with engine.begin() as c:
        c.execute(text(statement), params)


def row(engine, seq: int) -> dict:
    with engine.connect() as c:
        r = c.execute(audit.AuditEvent.__table__.select().where(audit.AuditEvent.__table__.c.seq == seq)).one()
    return dict(r._mapping)


def exported(engine, **kw) -> list[str]:
    buf = io.StringIO()
    audit.export_jsonl(engine, buf, **kw)
    return buf.getvalue().splitlines(keepends=True)


def snippet() -> str:
    doc = (REPO / "docs" / "audit.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- outsider-check:begin -->\n```python\n(.*?)```\n<!-- outsider-check:end -->", doc, re.S)
    assert block, "docs/audit.md lost its outsider check block"
    return block.group(1)


def run_snippet(path: Path) -> subprocess.CompletedProcess:
    script = path.with_name("check_audit.py")
    script.write_text(snippet(), encoding="utf-8")
    # a bare interpreter: no site packages, nothing of pdao
    return subprocess.run([sys.executable, "-I", "-S", str(script), str(path)], capture_output=True, text=True,
                          timeout=60)


def cli_verify_file(path: Path):  # noqa: ANN201
    return CliRunner().invoke(cli_app, ["audit", "verify", "--file", str(path)])


def some_requests(client, auth, n: int = 3) -> None:
    for _ in range(n):
        client.get(f"{API}/datasets", headers=auth("insurer_a"))
        client.get(f"{API}/users", headers=auth("insurer_a"))  # denied
        client.get(f"{API}/no/such/thing")


# --- the chain after requests --------------------------------------------------------------------

def test_requests_are_chained_and_the_head_is_the_last_event(client, engine, auth):
    before = head(engine)[0]
    some_requests(client, auth)
    rows = chain(engine)
    assert [r[0] for r in rows] == list(range(1, len(rows) + 1))
    assert rows[0][1] == GENESIS_HASH
    for (_, _, h), (_, prev, _) in zip(rows, rows[1:]):
        assert prev == h
    assert head(engine) == (rows[-1][0], rows[-1][2])
    assert rows[-1][0] == before + 3 * 3 + 1  # and the login
    ev = row(engine, rows[-1][0])
    assert ev["hash"] == audit.event_hash(audit.chain_record(ev))
    report = audit.verify(engine)
    assert report.as_dict() == {"ok": True, "checked": len(rows), "first_bad_seq": None, "head_seq": rows[-1][0],
                                "head_hash": rows[-1][2], "reason": None}


def test_values_read_back_from_the_database_hash_as_written(engine):
    """Awkward values are normalized before hashing, so the stored row serializes identically on
    both backends: non-ASCII, line separators, NUL, over-long strings, odd detail values."""
    detail = {"sql": "SELECT district, COUNT(*) FROM t -- 住院\u2028\n", 3: "int key", "nested": {"b": [1, 2.5, None]},
              "tuple": (1, 2), "nan": float("nan"), "big": 2**62, "when": datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC),
              "nul": "a\x00b", "flag": True, "set": {7}}
    at = datetime(2026, 11, 28, 12, 0, 0, 123456, tzinfo=timezone_plus8())
    ev = audit.record(engine, action="test.values", decision="deny", actor="用户\x00名" + "x" * 100, reason="r" * 900,
                      scene_id="12", status=403, detail=detail, at=at)
    stored = row(engine, ev.seq)
    assert stored["actor"] == ("用户\ufffd名" + "x" * 100)[:64] and len(stored["reason"]) == 500
    assert stored["scene_id"] == 12 and stored["detail"]["3"] == "int key" and stored["detail"]["nan"] == "nan"
    assert audit.format_at(stored["at"]) == "2026-11-28T04:00:00.123456Z"
    assert stored["hash"] == ev.hash == audit.event_hash(audit.chain_record(stored))
    assert audit.verify(engine).ok
    lines = exported(engine)
    assert all(line.isascii() for line in lines)
    assert audit.verify_lines(lines).ok


def timezone_plus8():  # noqa: ANN201
    from datetime import timezone

    return timezone(timedelta(hours=8))


def test_any_detail_is_recorded_within_bounds_and_its_hash_holds(engine):
    """Review r5 #6: a request's JSON nested 900 deep made the detail overflow the recursion, and
    the request got 503 with no event. Any detail is cut to the bounds (depth, items, characters),
    with a marker, and the chain verifies."""
    deep: dict = {}
    x = deep
    for _ in range(900):
        x["a"] = {}
        x = x["a"]
    detail = {"deep": deep, "many": list(range(5000)), "wide": {str(i): i for i in range(5000)}, "long": "x" * 50_000}
    with Session(engine) as s:
        audit.append(s, actor="t", action="test.detail", object="x", decision="allow", detail=detail)
        s.commit()
    stored = row(engine, head(engine)[0])["detail"]
    assert len(stored["many"]) == audit.DETAIL_MAX_ITEMS and stored["many"][-1].endswith("more")
    assert len(stored["wide"]) == audit.DETAIL_MAX_ITEMS and len(stored["long"]) == audit.DETAIL_MAX_CHARS
    depth, node = 0, stored["deep"]
    while isinstance(node, dict):
        depth, node = depth + 1, node["a"]
    assert depth == audit.DETAIL_MAX_DEPTH - 1 and node.startswith("…")
    assert audit.verify(engine).ok


def test_bad_events_are_refused(engine):
    with pytest.raises(TypeError):
        audit.record(engine, action="x", decision="allow", seq=5)
    with pytest.raises(ValueError):
        audit.record(engine, action="x", decision="maybe")
    with pytest.raises(ValueError):
        audit.record(engine, decision="allow")
    assert audit.verify(engine).ok


# --- tampering -----------------------------------------------------------------------------------

@dataclass
class Tamper:
    id: str
    do: Callable  # (engine, k, n) -> the seq verify must report
    api_appends: bool = True  # can the log still be appended to afterwards (else: 503, fail closed)
    good_before: int = 1  # the events checked good: the reported seq less this
    later: int = 0  # once more events are appended, the break shows this much further on


def _edit(engine, k, n):
    sql(engine, "UPDATE audit_event SET actor = 'someone_else' WHERE seq = :k", k=k)
    return k


def _edit_detail(engine, k, n):
    sql(engine, "UPDATE audit_event SET status = 200, decision = 'allow' WHERE seq = :k", k=k)
    return k


def _edit_and_rehash(engine, k, n):
    ev = row(engine, k)
    ev["reason"] = "nothing to see"
    sql(engine, "UPDATE audit_event SET reason = :r, hash = :h WHERE seq = :k", r=ev["reason"],
        h=audit.event_hash(audit.chain_record(ev)), k=k)
    return k + 1


def _delete(engine, k, n):
    sql(engine, "DELETE FROM audit_event WHERE seq = :k", k=k)
    return k


def _delete_and_renumber(engine, k, n):
    sql(engine, "DELETE FROM audit_event WHERE seq = :k", k=k)
    sql(engine, "UPDATE audit_event SET seq = -(seq - 1) WHERE seq > :k", k=k)
    sql(engine, "UPDATE audit_event SET seq = -seq WHERE seq < 0")
    sql(engine, "UPDATE audit_head SET seq = seq - 1")
    return k


def _swap(engine, k, n):
    """Swap the contents (everything but seq) of events k and k+3."""
    t = audit.AuditEvent.__table__
    a, b = row(engine, k), row(engine, k + 3)
    with engine.begin() as c:
        for target, source in ((k, b), (k + 3, a)):
            c.execute(t.update().where(t.c.seq == target).values({c_: v for c_, v in source.items() if c_ != "seq"}))
    return k


def _reorder(engine, k, n):
    """Renumber events k and k+1 into each other's place (rows reordered, contents untouched)."""
    sql(engine, "UPDATE audit_event SET seq = -1 WHERE seq = :k", k=k)
    sql(engine, "UPDATE audit_event SET seq = :k WHERE seq = :k1", k=k, k1=k + 1)
    sql(engine, "UPDATE audit_event SET seq = :k1 WHERE seq = -1", k1=k + 1)
    return k


def _forged(engine, seq: int, prev: str) -> None:
    t = audit.AuditEvent.__table__
    rec = audit.normalize({"action": "scene.review", "decision": "allow", "actor": "office1", "org": "office",
                           "role": "office", "reason": None, "at": datetime.now(UTC)})
    rec.update(seq=seq, prev_hash=prev)
    rec["hash"] = audit.event_hash(audit.chain_record(rec))
    with engine.begin() as c:
        c.execute(t.insert().values(**rec))


def _shift_up(engine, k):
    sql(engine, "UPDATE audit_event SET seq = -(seq + 1) WHERE seq >= :k", k=k)
    sql(engine, "UPDATE audit_event SET seq = -seq WHERE seq < 0")


def _insert_middle(engine, k, n):
    """A well-forged event at k (right prev_hash, right hash), later events shifted, head moved."""
    prev = row(engine, k - 1)["hash"]
    _shift_up(engine, k)
    _forged(engine, k, prev)
    sql(engine, "UPDATE audit_head SET seq = :s, hash = :h", s=n + 1, h=row(engine, n + 1)["hash"])
    return k + 1


def _insert_middle_naive(engine, k, n):
    """A forged event at k with a made-up hash."""
    prev = row(engine, k - 1)["hash"]
    _shift_up(engine, k)
    _forged(engine, k, prev)
    sql(engine, "UPDATE audit_event SET hash = :h WHERE seq = :k", h="ab" * 32, k=k)
    sql(engine, "UPDATE audit_head SET seq = :s, hash = :h", s=n + 1, h=row(engine, n + 1)["hash"])
    return k


def _insert_end(engine, k, n):
    _forged(engine, n + 1, row(engine, n)["hash"])
    return n + 1


def _truncate_tail(engine, k, n):
    sql(engine, "DELETE FROM audit_event WHERE seq > :m", m=n - 2)
    return n - 1


def _head_hash(engine, k, n):
    sql(engine, "UPDATE audit_head SET hash = :h", h="cd" * 32)
    return n


TAMPERING = [
    Tamper("edit_field", _edit),
    Tamper("edit_status_and_decision", _edit_detail),
    Tamper("edit_and_rehash", _edit_and_rehash),
    Tamper("delete_middle", _delete),
    Tamper("delete_and_renumber", _delete_and_renumber),
    Tamper("swap_contents", _swap),
    Tamper("reorder_rows", _reorder),
    Tamper("insert_middle_forged", _insert_middle),
    Tamper("insert_middle_naive", _insert_middle_naive),
    Tamper("insert_end_without_head", _insert_end, api_appends=False),
    Tamper("truncate_tail", _truncate_tail),
    # the head disagrees with event n; the next event links to the forged head hash, so once it
    # exists the first broken link is n+1
    Tamper("head_hash_changed", _head_hash, good_before=0, later=1),
]


# Every tampering on SQLite; on PostgreSQL by default those where the head and the append path are
# involved (the lock on the head, fail-closed) plus a plain edit. Finding a break is Python over the
# rows read back in seq order; on PostgreSQL the read-back is checked by
# test_values_read_back_from_the_database_hash_as_written, and edits, cuts and rewinds by
# test_a_rewound_tail_is_found_only_against_an_anchor, test_reordered_or_cut_export_files_are_found and
# test_cli_verify_export_events_head. The other PostgreSQL cases run in `make test-slow`.
PG_TAMPERING = {"edit_field", "insert_end_without_head", "truncate_tail", "head_hash_changed"}


@pytest.mark.parametrize("case", [pytest.param(t, id=t.id, marks=() if t.id in PG_TAMPERING
                                               else pytest.mark.default_backend("sqlite")) for t in TAMPERING])
def test_each_tampering_is_found_at_its_seq(case, client, engine, auth, tmp_path):
    auditor, applicant = auth("auditor1"), auth("insurer_a")
    some_requests(client, auth, 4)
    n = head(engine)[0]
    k = n // 2
    assert audit.verify(engine).ok
    expected = case.do(engine, k, n)

    report = audit.verify(engine)
    assert (report.ok, report.first_bad_seq) == (False, expected), report
    assert report.checked == expected - case.good_before and report.reason

    # an export of the tampered log, checked three ways: library, command, the doc's snippet
    lines = exported(engine)
    path = tmp_path / "audit.jsonl"
    path.write_text("".join(lines), encoding="utf-8")
    from_file = audit.verify_lines(lines)
    assert (from_file.ok, from_file.first_bad_seq) == (False, expected), from_file
    result = cli_verify_file(path)
    assert result.exit_code == 1 and f"BROKEN at seq {expected}:" in result.output, result.output
    outsider = run_snippet(path)
    assert outsider.returncode == 1 and f"BROKEN at seq {expected}:" in outsider.stdout, outsider

    # through the API, as an auditor; an applicant may not look
    r = client.get(f"{API}/audit/verify", headers=auditor)
    if case.api_appends:
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["ok"], body["first_bad_seq"], body["checked"]) == (False, expected, expected - case.good_before)
        assert client.get(f"{API}/audit/verify", headers=applicant).status_code == 403
        # later appends do not hide the break, and the API export shows it too
        some_requests(client, auth, 1)
        r = client.get(f"{API}/audit/export", headers=auditor)
        assert r.status_code == 200
        assert audit.verify_lines(r.text.splitlines()).first_bad_seq == expected + case.later
        assert audit.verify(engine).first_bad_seq == expected + case.later
    else:
        # the log cannot be appended to: no answer goes out unaudited (fail closed)
        assert r.status_code == 503 and r.json()["code"] == "audit_unavailable"
        with pytest.raises(AuditChainError):
            audit.record(engine, action="x", decision="allow")


def test_a_rewound_tail_is_found_only_against_an_anchor(client, engine, auth, tmp_path):
    """Delete the last events and rewind the head to match: the chain alone is intact; an anchor
    recorded before shows it, and keeps showing it after new events reuse the seqs."""
    auditor = auth("auditor1")
    some_requests(client, auth, 3)
    anchor = head(engine)
    n = anchor[0]
    sql(engine, "DELETE FROM audit_event WHERE seq > :m", m=n - 3)
    sql(engine, "UPDATE audit_head SET seq = :s, hash = :h", s=n - 3, h=row(engine, n - 3)["hash"])
    assert audit.verify(engine).ok
    report = audit.verify(engine, anchor=anchor)
    assert (report.ok, report.first_bad_seq) == (False, n - 2), report
    lines = exported(engine)
    assert audit.verify_lines(lines).ok
    assert audit.verify_lines(lines, anchor=anchor).first_bad_seq == n - 2
    path = tmp_path / "a.jsonl"
    path.write_text("".join(lines), encoding="utf-8")
    res = CliRunner().invoke(cli_app, ["audit", "verify", "--file", str(path), "--anchor-seq", str(n),
                                       "--anchor-hash", anchor[1]])
    assert res.exit_code == 1 and f"BROKEN at seq {n - 2}:" in res.output, res.output

    some_requests(client, auth, 2)  # new events take seqs n-2 … again, with other hashes
    r = client.get(f"{API}/audit/verify", headers=auditor, params={"anchor_seq": n, "anchor_hash": anchor[1]})
    assert r.status_code == 200, r.text
    assert r.json()["first_bad_seq"] == n and "anchor" in r.json()["reason"]
    assert client.get(f"{API}/audit/verify", headers=auditor).json()["ok"] is True


def test_reordered_or_cut_export_files_are_found(engine, client, auth, tmp_path):
    some_requests(client, auth, 2)
    lines = exported(engine)
    n = len(lines) - 1
    assert audit.verify_lines(lines).ok and audit.verify_lines(lines).checked == n
    swapped = lines[:3] + [lines[4], lines[3]] + lines[5:]  # events 3 and 4 trade places
    assert audit.verify_lines(swapped).first_bad_seq == 3
    cut = lines[:-2]
    assert audit.verify_lines(cut).first_bad_seq == n - 1
    assert audit.verify_lines(lines[:5] + ["not json\n"] + lines[5:]).first_bad_seq == 5
    header_only_events = lines[1:]  # no header: checked as a chain, no head to compare
    assert audit.verify_lines(header_only_events).ok
    for bad, seq in ((swapped, 3), (cut, n - 1)):
        p = tmp_path / f"x{seq}.jsonl"
        p.write_text("".join(bad), encoding="utf-8")
        assert f"BROKEN at seq {seq}:" in run_snippet(p).stdout


# --- concurrency and transactions ----------------------------------------------------------------

APPENDS_PER_PROCESS = 200


def _appender(url: str, tag: str, start, n: int, ready=None) -> None:  # noqa: ANN001 - runs in a child process
    engine = make_engine(url)
    try:
        if ready is not None:
            ready.set()
        start.wait(60)
        for i in range(n):
            audit.record(engine, action="test.concurrent", decision="allow", actor=tag, detail={"i": i})
    finally:
        engine.dispose()


def test_two_processes_append_to_one_unbroken_chain(engine, database_url):
    before = head(engine)[0]
    ctx = multiprocessing.get_context("spawn")
    start, ready = ctx.Event(), [ctx.Event(), ctx.Event()]
    procs = [ctx.Process(target=_appender, args=(database_url, f"proc{i}", start, APPENDS_PER_PROCESS, ready[i]))
             for i in range(2)]
    for p in procs:
        p.start()
    assert all(r.wait(60) for r in ready)
    start.set()
    for p in procs:
        p.join(180)
        assert p.exitcode == 0, f"appender exited with {p.exitcode}"
    rows = chain(engine)
    assert [r[0] for r in rows] == list(range(1, before + 2 * APPENDS_PER_PROCESS + 1))
    report = audit.verify(engine)
    assert report.ok and report.checked == before + 2 * APPENDS_PER_PROCESS, report
    with engine.connect() as c:
        got = c.execute(text("SELECT actor, COUNT(*), MIN(seq), MAX(seq) FROM audit_event "
                             "WHERE action = 'test.concurrent' GROUP BY actor ORDER BY actor")).all()
        ats = [r[0] for r in c.execute(text("SELECT at FROM audit_event WHERE seq > :b ORDER BY seq"), {"b": before})]
    assert [(a, n) for a, n, _, _ in got] == [("proc0", APPENDS_PER_PROCESS), ("proc1", APPENDS_PER_PROCESS)]
    if engine.dialect.name == "postgresql":
        # interleaved, not one after the other: they really contended for the head (PostgreSQL
        # queues lock waiters; SQLite's busy handler sleeps, so one writer may run all its appends
        # while the other waits — correct, but not reliably interleaved)
        (_, _, lo0, hi0), (_, _, lo1, hi1) = got
        assert lo1 < hi0 and lo0 < hi1
    assert ats == sorted(ats)  # time is taken under the lock: it follows seq


def test_an_append_in_a_rolled_back_transaction_leaves_nothing(engine):
    h0, n0 = head(engine), len(chain(engine))
    with Session(engine) as s:
        ev = audit.append(s, action="result.release", decision="allow", actor="system", object="result:1")
        assert ev.seq == h0[0] + 1 and ev.prev_hash == h0[1]
        s.rollback()
    assert head(engine) == h0 and len(chain(engine)) == n0
    with Session(engine) as s:
        ev = audit.append(s, action="result.release", decision="allow", actor="system", object="result:1")
        ev2 = audit.append(s, action="result.download", decision="allow", actor="system", object="result:1")
        s.commit()
    assert (ev.seq, ev2.seq, ev2.prev_hash) == (h0[0] + 1, h0[0] + 2, ev.hash)
    assert head(engine) == (ev2.seq, ev2.hash)
    report = audit.verify(engine)
    assert report.ok and report.head_seq == ev2.seq


def test_an_append_waits_for_a_transaction_that_holds_the_head(engine, database_url):
    """While one transaction has appended (and holds the head), another process's record waits,
    then chains after it: never the same seq, never a fork."""
    ctx = multiprocessing.get_context("spawn")
    start, ready = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_appender, args=(database_url, "waiter", start, 1, ready))
    p.start()
    assert ready.wait(60)
    with Session(engine) as s:
        held = audit.append(s, action="test.held", decision="allow")
        start.set()
        p.join(1.5)
        assert p.is_alive(), "the other append did not wait for the head"
        s.commit()
    p.join(60)
    assert p.exitcode == 0
    rows = chain(engine)
    assert rows[-1][0] == held.seq + 1 and rows[-1][1] == held.hash
    assert audit.verify(engine).ok


def test_a_missing_head_is_refused_and_reported(engine):
    sql(engine, "DELETE FROM audit_head")
    with pytest.raises(AuditChainError):
        audit.record(engine, action="x", decision="allow")
    report = audit.verify(engine)
    assert not report.ok and report.head_seq is None and "head" in report.reason


# --- the endpoints and commands ------------------------------------------------------------------

def test_events_filters_paging_and_permissions(client, engine, auth):
    auditor = auth("auditor1")
    t0 = datetime.now(UTC)
    marks = []
    for i, (actor, org, scene, action, decision) in enumerate([
            ("alice", "company_a", 7, "scene.review", "allow"),
            ("alice", "company_a", 8, "scene.submit", "deny"),
            ("bob", "company_b", 7, "queries.submit", "allow"),
            ("bob", "company_b", None, "cli.users.create", "error"),
            ("carol", "office", 7, "scene.review", "deny")]):
        marks.append(audit.record(engine, actor=actor, org=org, scene_id=scene, action=action, decision=decision,
                                  at=t0 + timedelta(hours=i + 1)).seq)

    def items(**params):  # noqa: ANN202
        r = client.get(f"{API}/audit/events", headers=auditor, params=params)
        assert r.status_code == 200, r.text
        return r.json()

    seqs = lambda body: [e["seq"] for e in body["items"]]  # noqa: E731
    assert seqs(items(actor="alice")) == marks[:2]
    assert seqs(items(org="company_b")) == marks[2:4]
    assert seqs(items(scene=7)) == [marks[0], marks[2], marks[4]]
    assert seqs(items(action="scene.review")) == [marks[0], marks[4]]
    assert seqs(items(action="scene.*")) == [marks[0], marks[1], marks[4]]
    assert seqs(items(decision="deny", scene=7)) == [marks[4]]
    assert seqs(items(decision="error")) == [marks[3]]
    window = items(since=(t0 + timedelta(hours=2)).isoformat(), until=(t0 + timedelta(hours=4)).isoformat())
    assert seqs(window) == marks[1:3]
    # paging: oldest first with after_seq, newest first with before_seq
    page = items(after_seq=marks[0] - 1, limit=2)
    assert seqs(page) == marks[:2] and page["next_after_seq"] == marks[1]
    assert seqs(items(after_seq=page["next_after_seq"], limit=2)) == marks[2:4]
    newest = items(order="desc", limit=3, actor="bob")
    assert seqs(newest) == [marks[3], marks[2]] and newest["next_before_seq"] is None
    everything = items(order="desc", limit=2)
    assert everything["next_before_seq"] == everything["items"][-1]["seq"]
    # each item is the event as exported, hash and all
    ev = items(actor="carol")["items"][0]
    assert ev["hash"] == audit.event_hash({k: v for k, v in ev.items() if k != "hash"})
    assert ev["at"].endswith("Z") and ev["prev_hash"] == row(engine, ev["seq"] - 1)["hash"]

    for bad in ({"limit": 1001}, {"decision": "maybe"}, {"order": "asc", "before_seq": 3}):
        r = client.get(f"{API}/audit/events", headers=auditor, params=bad)
        assert r.status_code == 422 and set(r.json()) >= {"code", "message", "message_zh"}, r.text
    for who, status in (("office1", 200), ("insurer_a", 403), ("provider1", 403), ("operator1", 403),
                        ("reviewer1", 403)):
        r = client.get(f"{API}/audit/events", headers=auth(who))
        assert r.status_code == status, (who, r.text)
        if status == 403:
            assert r.json()["code"] == "role_not_permitted"
            assert client.get(f"{API}/audit/export", headers=auth(who)).status_code == 403
    # the search itself is in the log, with its filters
    client.get(f"{API}/audit/events", headers=auditor, params={"actor": "alice", "decision": "deny"})
    last = audit.find_events(Session(engine), audit.EventFilter(newest_first=True, limit=1))[0]
    assert (last.actor, last.action, last.path, last.decision, last.object) == (
        "auditor1", "audit.read", f"{API}/audit/events", "allow", "audit_log")
    assert last.detail["filters"] == {"actor": "alice", "decision": "deny"}
    assert audit.verify(engine).ok


def test_export_endpoint_ranges_and_head(client, engine, auth):
    auditor = auth("auditor1")
    some_requests(client, auth, 2)
    r = client.get(f"{API}/audit/export", headers=auditor)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    lines = r.text.splitlines()
    header = json.loads(lines[0])
    assert header["format"] == audit.EXPORT_FORMAT and header["to_seq"] is None
    assert [json.loads(x)["seq"] for x in lines[1:]] == list(range(1, header["head_seq"] + 1))
    assert audit.verify_lines(lines).ok
    part = client.get(f"{API}/audit/export", headers=auditor, params={"from_seq": 3, "to_seq": 6}).text.splitlines()
    assert [json.loads(x)["seq"] for x in part[1:]] == [3, 4, 5, 6]
    rep = audit.verify_lines(part)
    assert rep.ok and rep.checked == 4
    assert audit.verify_lines(part[:1] + part[2:]).first_bad_seq == 3  # the range's first event cut
    assert client.get(f"{API}/audit/export", headers=auditor, params={"from_seq": 5, "to_seq": 2}).status_code == 422
    h = client.get(f"{API}/audit/head", headers=auditor).json()
    assert h["head_seq"] == head(engine)[0] - 1 and h["head_hash"] == row(engine, h["head_seq"])["hash"]
    assert client.get(f"{API}/audit/verify", headers=auditor, params={"from_seq": 4}).json()["ok"] is True
    assert client.get(f"{API}/audit/verify", headers=auditor,
                      params={"anchor_seq": 2, "anchor_hash": row(engine, 2)["hash"]}).json()["ok"] is True
    assert client.get(f"{API}/audit/verify", headers=auditor, params={"anchor_seq": 2}).status_code == 422
    # seqs past what the databases store are refused as input (review r5 #6: 500, and a 200 that broke mid-stream)
    for path, params in (("verify", {"from_seq": 10**20}), ("verify", {"anchor_seq": 10**20, "anchor_hash": "0" * 64}),
                         ("export", {"from_seq": 10**20}), ("export", {"to_seq": 10**20})):
        r = client.get(f"{API}/audit/{path}", headers=auditor, params=params)
        assert r.status_code == 422 and r.json()["message_zh"], (path, params, r.text)


@pytest.fixture
def pdao_cli(settings, monkeypatch):
    monkeypatch.setenv("PDAO_HOME", str(settings.home))
    monkeypatch.setenv("PDAO_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("PDAO_SECRET_KEY", "test-signing-key-of-at-least-32-bytes")
    runner = CliRunner()
    return lambda *args: runner.invoke(cli_app, list(args))


def test_cli_verify_export_events_head(pdao_cli, engine, tmp_path):
    audit.record(engine, action="scene.review", decision="deny", actor="office2", org="office", reason="nope")
    r = pdao_cli("audit", "verify")
    assert r.exit_code == 0 and r.output.startswith("OK:"), r.output
    out = tmp_path / "log.jsonl"
    r = pdao_cli("audit", "export", str(out))
    assert r.exit_code == 0, r.output
    assert cli_verify_file(out).exit_code == 0
    assert run_snippet(out).returncode == 0
    r = pdao_cli("audit", "events", "--actor", "office2", "--json")
    assert r.exit_code == 0 and json.loads(r.output.splitlines()[0])["reason"] == "nope"
    seq, h = pdao_cli("audit", "head").output.split()
    assert (int(seq), h) == head(engine)
    # the commands are in the log themselves
    with engine.connect() as c:
        actions = [a for (a,) in c.execute(text("SELECT action FROM audit_event WHERE action LIKE 'cli.audit.%' "
                                                "ORDER BY seq"))]
    assert actions == ["cli.audit.verify", "cli.audit.export", "cli.audit.events"]
    sql(engine, "UPDATE audit_event SET reason = 'yes' WHERE seq = 2")
    r = pdao_cli("audit", "verify")
    assert r.exit_code == 1 and "BROKEN at seq 2:" in r.output
    r = pdao_cli("audit", "verify", "--json")
    assert r.exit_code == 1 and json.loads(r.output.splitlines()[-1])["first_bad_seq"] == 2
    assert pdao_cli("audit", "verify", "--file", str(tmp_path / "missing.jsonl")).exit_code == 2


def test_the_outsider_snippet_is_short_and_stdlib_only():
    code = snippet()
    assert len(code.rstrip("\n").splitlines()) <= 25
    imported = set(re.findall(r"^import (.+)$", code, re.M)[0].replace(" ", "").split(","))
    assert imported == {"hashlib", "json", "sys"} and "from " not in code


# --- the migration -------------------------------------------------------------------------------



def test_migration_chains_existing_events_and_rolls_back(empty_url):
    migrate(empty_url, "0006")
    engine = make_engine(empty_url)
    try:
        with engine.begin() as c:
            for seq in (1, 2, 5, 6, 9):  # gaps, as rolled-back inserts leave them
                c.execute(text("INSERT INTO audit_event (seq, at, action, decision, actor, detail) "
                               "VALUES (:s, :at, 'auth.login', 'allow', '王五', :d)"),
                          {"s": seq, "at": datetime(2026, 11, 1, 8, 0, seq, 1000 * seq, tzinfo=UTC),
                           "d": json.dumps({"n": seq, "sql": "SELECT 1"})})
        migrate(empty_url)
        rows = chain(engine)
        assert [r[0] for r in rows] == [1, 2, 3, 4, 5]
        report = audit.verify(engine)
        assert report.ok and report.checked == 5 and head(engine) == (5, rows[-1][2]), report
        with engine.connect() as c:
            assert [d for (d,) in c.execute(text("SELECT detail FROM audit_event ORDER BY seq"))][2] is not None
        audit.record(engine, action="after", decision="allow")
        assert audit.verify(engine).checked == 6
        engine.dispose()
        command.downgrade(alembic_config(empty_url), "0006")
        assert "audit_head" not in inspect(engine).get_table_names()
        assert not {"prev_hash", "hash"} & {c["name"] for c in inspect(engine).get_columns("audit_event")}
        engine.dispose()
        migrate(empty_url)  # and up again, on the six events now there
        assert audit.verify(engine).ok and head(engine)[0] == 6
    finally:
        engine.dispose()


def test_an_empty_log_migrates_to_the_genesis_head(empty_url):
    migrate(empty_url)
    engine = make_engine(empty_url)
    try:
        assert head(engine) == (0, GENESIS_HASH)
        report = audit.verify(engine)
        assert report.ok and report.checked == 0 and report.head_seq == 0
        lines = exported(engine)
        assert len(lines) == 1 and audit.verify_lines(lines).ok
    finally:
        engine.dispose()
