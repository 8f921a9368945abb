"""Alerts for the security reviewer (issue 5): patterns in the audit trail worth a look.

Auditors and the office only (casbin `audit read`); the decisions live in `sandbox.alerts`.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Request
from fastapi import Query as QueryParam

from api.deps import SessionDep, caller, utc_instant
from pdao.kernel.db import utcnow
from pdao.kernel.errors import invalid
from sandbox.alerts import AlertThresholds, collect_alerts

router = APIRouter(tags=["audit"])

DEFAULT_LOOKBACK = timedelta(days=7)
MAX_WINDOW = timedelta(days=366)


@router.get("/audit/alerts", name="audit.alerts")
def list_alerts(principal: caller("audit", "read"), session: SessionDep, request: Request,
                since: Annotated[datetime | None, QueryParam(description="default: `until` minus 7 days")] = None,
                until: Annotated[datetime | None, QueryParam(description="default: now")] = None) -> dict[str, Any]:
    """Many denials from one user, budgets nearly spent, near-identical prod queries (differencing),
    downloads outside office hours — newest first. Metadata, audit seqs and query ids; never cells.
    Times without an offset are UTC."""
    until = utc_instant(until, "until") or utcnow()
    since = utc_instant(since, "since") or until - DEFAULT_LOOKBACK
    if since > until:
        raise invalid("bad_window", "`since` must not be after `until`.", "`since` 不能晚于 `until`。")
    if until - since > MAX_WINDOW:
        raise invalid("window_too_long", "The window may span at most 366 days.", "时间窗口最长 366 天。")
    thresholds = AlertThresholds()
    alerts = collect_alerts(session, until, since, thresholds)
    request.state.audit_detail = {"since": since.isoformat(), "until": until.isoformat(), "alerts": len(alerts)}
    return {"since": since.isoformat(), "until": until.isoformat(), "thresholds": thresholds.to_dict(),
            "count": len(alerts), "alerts": [a.to_dict() for a in alerts]}
