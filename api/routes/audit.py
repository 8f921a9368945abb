"""The audit log for auditors and the office (casbin `audit read`): events, verification, export.

Each of these requests is itself one event of the log (the middleware in api/app.py), with the
filters or the verification's outcome in its detail. See docs/audit.md.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from api.deps import SessionDep, caller, utc_instant
from pdao.kernel import audit
from pdao.kernel.db import MAX_ID
from pdao.kernel.errors import invalid

router = APIRouter(tags=["audit"])

Auditor = caller("audit", "read")
MAX_EVENTS = 1000


@router.get("/audit/events", name="audit.events")
def list_events(
    _principal: Auditor, session: SessionDep, request: Request,
    actor: str | None = None,
    org: str | None = None,
    scene: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
    action: Annotated[str | None, Query(max_length=80, description="exact, or a prefix ending in * (scene.*)")] = None,
    decision: Literal["allow", "deny", "error"] | None = None,
    since: Annotated[datetime | None, Query(description="at >= since (ISO 8601; UTC if no offset)")] = None,
    until: Annotated[datetime | None, Query(description="at < until")] = None,
    after_seq: Annotated[int | None, Query(ge=0, le=MAX_ID, description="oldest first: events after this seq")] = None,
    before_seq: Annotated[int | None, Query(ge=1, le=MAX_ID, description="newest first: events before this seq")] = None,
    order: Literal["asc", "desc"] = "asc",
    limit: Annotated[int, Query(ge=1, le=MAX_EVENTS)] = 100,
) -> dict[str, Any]:
    """Events matching every given filter. `order=asc` (default): in seq order, page on with
    `after_seq=next_after_seq`; `order=desc`: newest first, page on with `before_seq=next_before_seq`.
    Each event as exported: the chained fields, `at` in UTC, `prev_hash` and `hash`."""
    if order == "asc" and before_seq is not None or order == "desc" and after_seq is not None:
        raise invalid("bad_cursor", "after_seq pages order=asc, before_seq pages order=desc.",
                      "after_seq 用于 order=asc 分页，before_seq 用于 order=desc 分页。")
    flt = audit.EventFilter(actor=actor, org=org, scene=scene, action=action, decision=decision,
                            since=utc_instant(since, "since"), until=utc_instant(until, "until"), after_seq=after_seq,
                            before_seq=before_seq, newest_first=order == "desc",
                            limit=limit)
    request.state.object = "audit_log"
    request.state.audit_detail = {"filters": {k: _plain(v) for k, v in vars(flt).items()
                                              if v is not None and k not in ("newest_first", "limit")},
                                  "order": order, "limit": limit}
    events = audit.find_events(session, flt)
    full = len(events) == limit
    last = events[-1].seq if events else None
    return {"items": [audit.event_json(e) for e in events], "order": order,
            "next_after_seq": last if full and order == "asc" else None,
            "next_before_seq": last if full and order == "desc" else None}


@router.get("/audit/verify", name="audit.verify")
def verify_chain(
    _principal: Auditor, session: SessionDep, request: Request,
    from_seq: Annotated[int | None, Query(ge=1, le=MAX_ID, description="start here (its prev_hash is taken as given)")] = None,
    anchor_seq: Annotated[int | None, Query(ge=0, le=MAX_ID, description="a head published earlier …")] = None,
    anchor_hash: Annotated[str | None, Query(pattern="^[0-9a-f]{64}$", description="… and its hash")] = None,
) -> dict[str, Any]:
    """Walk the chain (from `from_seq`, default 1) and answer `{ok, checked, first_bad_seq,
    head_seq, head_hash, reason}`: the first event whose hash, link or place is wrong, or a head
    that disagrees with the last event. With an anchor, the log must still hold that event."""
    if (anchor_seq is None) != (anchor_hash is None):
        raise invalid("bad_anchor", "Give anchor_seq and anchor_hash together.",
                      "anchor_seq 与 anchor_hash 须同时给出。")
    anchor = (anchor_seq, anchor_hash) if anchor_seq is not None else None
    request.state.object = "audit_log"
    report = audit.verify(session, from_seq=from_seq, anchor=anchor)
    request.state.audit_detail = {"ok": report.ok, "checked": report.checked, "first_bad_seq": report.first_bad_seq,
                                  "head_seq": report.head_seq, "from_seq": from_seq, "anchor_seq": anchor_seq}
    return report.as_dict()


@router.get("/audit/export", name="audit.export")
def export_chain(
    _principal: Auditor, session: SessionDep, request: Request,
    from_seq: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
    to_seq: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
) -> StreamingResponse:
    """The log as JSON lines, streamed from one snapshot: a header line (`format`, `from_seq`,
    `to_seq`, `head_seq`, `head_hash`, `exported_at`), then one event a line in seq order. Check
    it with `pdao audit verify --file` or the snippet in docs/audit.md."""
    if from_seq is not None and to_seq is not None and to_seq < from_seq:
        raise invalid("bad_range", "to_seq is before from_seq.", "to_seq 早于 from_seq。")
    request.state.object = "audit_log"
    request.state.audit_detail = {"from_seq": from_seq, "to_seq": to_seq}
    engine = session.get_bind()
    name = f"pdao-audit-{from_seq or 1}-{to_seq or 'head'}.jsonl"
    return StreamingResponse(audit.export_lines(engine, from_seq, to_seq), media_type="application/x-ndjson",
                             headers={"Content-Disposition": f'attachment; filename="{name}"'})


@router.get("/audit/head", name="audit.head")
def head(_principal: Auditor, session: SessionDep, request: Request) -> dict[str, Any]:
    """The head (`seq`, `hash`) without a walk: what operators record or publish as an anchor."""
    request.state.object = "audit_log"
    h = audit.read_head(session)
    return {"head_seq": h[0] if h else None, "head_hash": h[1] if h else None,
            "at": audit.format_at(datetime.now(UTC))}


def _plain(v: Any) -> Any:
    return audit.format_at(v.replace(tzinfo=v.tzinfo or UTC)) if isinstance(v, datetime) else v
