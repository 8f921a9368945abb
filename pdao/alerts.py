"""Alerts for the security reviewer (issue 5): patterns in the audit trail worth a look.

Four kinds, each decided by a pure function over plain records, so the rules can be read and
tested without a database:

- `many_denials` (`denial_bursts`): one actor refused at least N times within a window (default
  10 in 1 hour) — probing, a brute-forced login, a script gone wrong. Rests on audit seqs.
- `budget_nearly_spent` (`budgets_nearly_spent`): a usable scene that has spent at least a share
  of its privacy budget (default 90%, ε or δ). Rests on the scene's prod query ids.
- `differencing` (`differencing_suspects`): one organization sent at least N near-identical prod
  queries through one scene within a window (default 5 in 24 hours). Near-identical: the same
  query apart from literal values, or apart from one WHERE condition more or less — the classic
  differencing attack asks the same aggregate with and without one person's condition, or the
  same DP query again and again to average the noise away. Rests on query ids.
- `download_off_hours` (`off_hours_downloads`): results downloaded outside office hours
  (default 08:00–20:00, Monday to Friday, Asia/Shanghai; public holidays are not modelled), one
  alert per actor and off-hours stretch. Downloads of synthetic (dev twin) answers are left out.
  Rests on audit seqs.

An alert carries who, which scene, when, how many and the audit seqs or query ids it rests on,
with an English and a Chinese message — metadata only, never a cell value: SQL is reduced to a
skeleton whose literals are placeholders.

`collect_alerts` is the one function that reads the database (audit events, scenes and their
ledger, prod queries) and hands plain records to the pure functions.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import sqlglot
from sqlglot import exp

SQL_DIALECT = "duckdb"   # sandbox/sql.py's DIALECT (kept literal: pdao imports no room at load time)

KINDS = ("many_denials", "budget_nearly_spent", "differencing", "download_off_hours")
DOWNLOAD_ACTIONS = ("results.download", "result.download")  # route name, and the casbin resource.action
LIVE_SCENE_STATUSES = frozenset({"active", "approved", "suspended"})   # a scene that can still spend
_WEEKDAY_EN = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_WEEKDAY_ZH = ("周一", "周二", "周三", "周四", "周五", "周六", "周日")


@dataclass(frozen=True)
class AlertThresholds:
    denials: int = 10
    denial_window: timedelta = timedelta(hours=1)
    budget_share: float = 0.9
    near_identical: int = 5
    near_identical_window: timedelta = timedelta(hours=24)
    office_start: time = time(8, 0)      # inclusive
    office_end: time = time(20, 0)       # exclusive: 20:00 is already after hours
    office_days: frozenset[int] = frozenset(range(5))   # datetime.weekday(): Monday = 0
    timezone: str = "Asia/Shanghai"
    skip_synthetic_downloads: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"denials": self.denials, "denial_window_seconds": int(self.denial_window.total_seconds()),
                "budget_share": self.budget_share, "near_identical": self.near_identical,
                "near_identical_window_seconds": int(self.near_identical_window.total_seconds()),
                "office_start": self.office_start.isoformat("minutes"),
                "office_end": self.office_end.isoformat("minutes"),
                "office_days": sorted(self.office_days), "timezone": self.timezone,
                "skip_synthetic_downloads": self.skip_synthetic_downloads}


# ---------------------------------------------------------------------------------------------
# Plain records (collect_alerts builds them; tests build them by hand)


@dataclass(frozen=True)
class EventRecord:
    """What the alerts need of an audit event."""
    seq: int
    at: datetime
    actor: str | None
    action: str
    decision: str
    org: str | None = None
    role: str | None = None
    scene_id: int | None = None
    object: str | None = None
    status: int | None = None
    reason: str | None = None
    synthetic: bool | None = None   # downloads: whether the result came from the dev twin (None: unknown)


@dataclass(frozen=True)
class SceneRecord:
    id: int
    org: str | None
    budget_epsilon: float
    epsilon_spent: float
    budget_delta: float = 0.0
    delta_spent: float = 0.0
    status: str = "active"            # the effective status (policies.states.effective_status)
    title: str = ""
    last_spent_at: datetime | None = None   # the last ledger movement
    query_ids: tuple[int, ...] = ()   # the prod queries that spent it


@dataclass(frozen=True)
class QueryRecord:
    id: int
    org: str | None
    scene_id: int
    sql: str
    created_at: datetime
    mode: str = "prod"
    requester: str | None = None


@dataclass(frozen=True)
class Alert:
    kind: str
    severity: str                      # warning | high
    actor: str | None
    org: str | None
    scene_id: int | None
    first_at: datetime | None
    last_at: datetime | None
    count: int
    message: str
    message_zh: str
    audit_seqs: tuple[int, ...] = ()
    query_ids: tuple[int, ...] = ()
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """Stable identity of the alert (the same pattern gives the same key on every read)."""
        anchor = (self.audit_seqs[:1] or self.query_ids[:1] or (None,))[0]
        return f"{self.kind}:{self.actor or self.org or '-'}:{self.scene_id or '-'}:{anchor or '-'}"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["key"] = self.key
        for k in ("first_at", "last_at"):
            out[k] = out[k].isoformat() if out[k] is not None else None
        out["audit_seqs"] = list(self.audit_seqs)
        out["query_ids"] = list(self.query_ids)
        return out


# ---------------------------------------------------------------------------------------------
# Helpers


def _utc(at: datetime) -> datetime:
    """Aware UTC (the metadata database returns aware UTC; a naive value is taken as UTC)."""
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def _episodes(times: Sequence[datetime], window: timedelta, threshold: int) -> list[tuple[int, int]]:
    """Index ranges [start, end] (inclusive) of sorted `times` where at least `threshold` items fall
    within `window` of each other; overlapping qualifying windows merge into one episode."""
    out: list[tuple[int, int]] = []
    if threshold < 1:
        threshold = 1
    i = 0
    for j, tj in enumerate(times):
        while tj - times[i] > window:
            i += 1
        if j - i + 1 >= threshold:
            if out and i <= out[-1][1]:
                out[-1] = (out[-1][0], j)
            else:
                out.append((i, j))
    return out


def _severity(count: int, threshold: int) -> str:
    return "high" if count >= 2 * threshold else "warning"


def _duration(d: timedelta) -> tuple[str, str]:
    secs = int(d.total_seconds())
    if secs % 3600 == 0:
        h = secs // 3600
        return (f"{h} hour" + ("s" if h != 1 else ""), f"{h} 小时")
    m = secs // 60
    return (f"{m} minutes", f"{m} 分钟")


def _common(values: Iterable[str | None]) -> str | None:
    """The one value all share, else None."""
    distinct = {v for v in values}
    return distinct.pop() if len(distinct) == 1 else None


# ---------------------------------------------------------------------------------------------
# many_denials


def denial_bursts(events: Iterable[EventRecord], t: AlertThresholds = AlertThresholds()) -> list[Alert]:
    """One alert per actor and burst: at least `t.denials` denials within `t.denial_window`.
    Events without an actor (anonymous requests) are left out: nobody to look at."""
    by_actor: dict[str, list[EventRecord]] = defaultdict(list)
    for e in events:
        if e.decision == "deny" and e.actor:
            by_actor[e.actor].append(e)
    alerts = []
    window_en, window_zh = _duration(t.denial_window)
    for actor, evs in by_actor.items():
        evs.sort(key=lambda e: (_utc(e.at), e.seq))
        times = [_utc(e.at) for e in evs]
        for start, end in _episodes(times, t.denial_window, t.denials):
            burst = evs[start:end + 1]
            n = len(burst)
            reasons = Counter(e.reason or "unknown" for e in burst).most_common(5)
            why = ", ".join(f"{r} ×{c}" for r, c in reasons)
            alerts.append(Alert(
                kind="many_denials", severity=_severity(n, t.denials), actor=actor,
                org=_common(e.org for e in burst), scene_id=_common(e.scene_id for e in burst),
                first_at=times[start], last_at=times[end], count=n,
                audit_seqs=tuple(e.seq for e in burst),
                detail={"reasons": dict(reasons), "actions": dict(Counter(e.action for e in burst).most_common(5)),
                        "threshold": t.denials, "window_seconds": int(t.denial_window.total_seconds())},
                message=f"{actor} was refused {n} times within {window_en} ({why}).",
                message_zh=f"用户 {actor} 在 {window_zh} 内被拒绝 {n} 次（{why}）。"))
    return alerts


# ---------------------------------------------------------------------------------------------
# budget_nearly_spent


def budgets_nearly_spent(scenes: Iterable[SceneRecord], t: AlertThresholds = AlertThresholds()) -> list[Alert]:
    """One alert per usable scene (active, approved or suspended) that has spent at least
    `t.budget_share` of its ε budget (or of its δ budget, when it has one)."""
    alerts = []
    for s in scenes:
        if s.status not in LIVE_SCENE_STATUSES:
            continue
        eps_share = s.epsilon_spent / s.budget_epsilon if s.budget_epsilon > 0 else 0.0
        delta_share = s.delta_spent / s.budget_delta if s.budget_delta > 0 else 0.0
        share = max(eps_share, delta_share)
        if share + 1e-9 < t.budget_share:
            continue
        pct = min(share, 9.99) * 100
        eps_left = max(s.budget_epsilon - s.epsilon_spent, 0.0)
        title = f" ({s.title})" if s.title else ""
        title_zh = f"（{s.title}）" if s.title else ""
        at = _utc(s.last_spent_at) if s.last_spent_at else None
        what_en = f"ε {s.epsilon_spent:g} of {s.budget_epsilon:g}, {eps_left:g} left"
        what_zh = f"ε 已用 {s.epsilon_spent:g} / {s.budget_epsilon:g}，剩余 {eps_left:g}"
        if delta_share > eps_share:
            what_en += f"; δ {s.delta_spent:g} of {s.budget_delta:g}"
            what_zh += f"；δ 已用 {s.delta_spent:g} / {s.budget_delta:g}"
        alerts.append(Alert(
            kind="budget_nearly_spent", severity="high" if share >= 1 - 1e-9 else "warning",
            actor=None, org=s.org, scene_id=s.id, first_at=at, last_at=at, count=len(s.query_ids),
            query_ids=tuple(s.query_ids),
            detail={"share": round(share, 6), "epsilon_spent": s.epsilon_spent, "budget_epsilon": s.budget_epsilon,
                    "epsilon_left": eps_left, "delta_spent": s.delta_spent, "budget_delta": s.budget_delta,
                    "status": s.status, "threshold": t.budget_share},
            message=f"Scene {s.id}{title} of {s.org or '?'} has spent {pct:.0f}% of its privacy budget ({what_en}).",
            message_zh=f"{s.org or '?'} 的场景 {s.id}{title_zh} 已用去隐私预算的 {pct:.0f}%（{what_zh}）。"))
    return alerts


# ---------------------------------------------------------------------------------------------
# differencing


@dataclass(frozen=True)
class SqlShape:
    """A query without its literals: the frame (everything but the top-level WHERE) and the WHERE
    conjuncts, each a skeleton in which every literal is a placeholder `?`."""
    frame: str
    conjuncts: tuple[str, ...]   # sorted (a multiset)


def _skeleton(node: exp.Expression) -> str:
    def blank(n: exp.Expression) -> exp.Expression:
        if isinstance(n, exp.In) and n.expressions and all(isinstance(x, exp.Literal) for x in n.expressions):
            # `x IN (1, 2, 3)` and `x IN (1, 2)` are the same question about different values
            return exp.In(this=n.this.transform(blank), expressions=[exp.Placeholder()])
        if isinstance(n, (exp.Literal, exp.Boolean)) or (isinstance(n, exp.Neg) and isinstance(n.this, exp.Literal)):
            return exp.Placeholder()
        return n
    return node.transform(blank).sql(dialect=SQL_DIALECT, comments=False).lower()


def _conjuncts(node: exp.Expression) -> list[exp.Expression]:
    node = node.unnest()
    if isinstance(node, exp.And):
        return _conjuncts(node.this) + _conjuncts(node.expression)
    return [node]


def sql_shape(sql: str) -> SqlShape | None:
    """The shape of one query (DuckDB dialect), or None unless the text parses as exactly one
    SELECT (or set operation of SELECTs)."""
    try:
        statements = [s for s in sqlglot.parse(sql, dialect=SQL_DIALECT) if s is not None]
    except Exception:  # noqa: BLE001 - sqlglot raises several kinds; an unreadable query is skipped
        return None
    if len(statements) != 1 or not isinstance(statements[0], exp.Query):
        return None
    tree = statements[0].copy()
    where = tree.args.get("where")
    conjuncts: list[str] = []
    try:
        if isinstance(where, exp.Where):
            conjuncts = sorted(_skeleton(c) for c in _conjuncts(where.this))
            tree.set("where", None)
        frame = _skeleton(tree)
    except Exception:  # noqa: BLE001
        return None
    return SqlShape(frame, tuple(conjuncts))


def near_identical(a: SqlShape, b: SqlShape) -> bool:
    """The same frame, and WHERE conjuncts that differ at most by literal values and by one
    condition more or less."""
    if a.frame != b.frame:
        return False
    ca, cb = Counter(a.conjuncts), Counter(b.conjuncts)
    return sum(((ca - cb) + (cb - ca)).values()) <= 1


def differencing_suspects(queries: Iterable[QueryRecord], t: AlertThresholds = AlertThresholds()) -> list[Alert]:
    """One alert per (org, scene) and cluster: at least `t.near_identical` prod queries, linked by
    `near_identical` (transitively), within `t.near_identical_window`. Dev queries (synthetic twin)
    and SQL that does not parse are left out."""
    groups: dict[tuple[str | None, int], list[tuple[QueryRecord, SqlShape]]] = defaultdict(list)
    for q in queries:
        if q.mode != "prod":
            continue
        shape = sql_shape(q.sql)
        if shape is not None:
            groups[(q.org, q.scene_id)].append((q, shape))
    alerts = []
    window_en, window_zh = _duration(t.near_identical_window)
    for (org, scene_id), members in groups.items():
        for cluster in _near_identical_clusters(members):
            cluster.sort(key=lambda m: (_utc(m[0].created_at), m[0].id))
            times = [_utc(q.created_at) for q, _ in cluster]
            for start, end in _episodes(times, t.near_identical_window, t.near_identical):
                part = cluster[start:end + 1]
                n = len(part)
                shapes = Counter(s for _, s in part)
                skeleton = _render_shape(shapes.most_common(1)[0][0])
                requesters = sorted({q.requester for q, _ in part if q.requester})
                alerts.append(Alert(
                    kind="differencing", severity=_severity(n, t.near_identical),
                    actor=requesters[0] if len(requesters) == 1 else None, org=org, scene_id=scene_id,
                    first_at=times[start], last_at=times[end], count=n, query_ids=tuple(q.id for q, _ in part),
                    detail={"skeleton": skeleton, "distinct_shapes": len(shapes), "requesters": requesters,
                            "threshold": t.near_identical,
                            "window_seconds": int(t.near_identical_window.total_seconds())},
                    message=(f"{org or '?'} sent {n} near-identical prod queries through scene {scene_id} within "
                             f"{window_en} (the same query, apart from literal values or one WHERE condition): "
                             "a possible differencing or averaging attack."),
                    message_zh=(f"{org or '?'} 在 {window_zh} 内通过场景 {scene_id} 提交了 {n} 条近似相同的生产查询"
                                "（除字面值或一个 WHERE 条件外完全相同），可能是差分攻击或平均去噪攻击。")))
    return alerts


def _render_shape(shape: SqlShape) -> str:
    return shape.frame + (" where " + " and ".join(shape.conjuncts) if shape.conjuncts else "")


def _near_identical_clusters(members: list[tuple[QueryRecord, SqlShape]]) -> list[list[tuple[QueryRecord, SqlShape]]]:
    """Connected components of the `near_identical` relation, found through buckets rather than
    pairwise: equal (frame, conjunct multiset), and a multiset equal to another minus one conjunct."""
    parent = list(range(len(members)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i: int, j: int) -> None:
        parent[find(i)] = find(j)

    full: dict[tuple[str, tuple[str, ...]], int] = {}
    for i, (_, s) in enumerate(members):
        key = (s.frame, s.conjuncts)
        if key in full:
            union(i, full[key])
        else:
            full[key] = i
    for i, (_, s) in enumerate(members):
        for k in range(len(s.conjuncts)):
            smaller = (s.frame, s.conjuncts[:k] + s.conjuncts[k + 1:])
            if smaller in full:
                union(i, full[smaller])
    clusters: dict[int, list[tuple[QueryRecord, SqlShape]]] = defaultdict(list)
    for i, m in enumerate(members):
        clusters[find(i)].append(m)
    return list(clusters.values())


# ---------------------------------------------------------------------------------------------
# download_off_hours


def is_download(action: str | None) -> bool:
    return bool(action) and action.startswith(DOWNLOAD_ACTIONS)


def in_office_hours(at: datetime, t: AlertThresholds = AlertThresholds()) -> bool:
    local = _utc(at).astimezone(ZoneInfo(t.timezone))
    return local.weekday() in t.office_days and t.office_start <= local.time().replace(tzinfo=None) < t.office_end


def off_hours_stretch(at: datetime, t: AlertThresholds = AlertThresholds()) -> datetime:
    """When the off-hours stretch containing `at` began (local time): the last office closing
    before it, e.g. Friday 20:00 for anything up to Monday 08:00."""
    tz = ZoneInfo(t.timezone)
    local = _utc(at).astimezone(tz)
    day = local.date()
    if not (local.weekday() in t.office_days and local.time().replace(tzinfo=None) >= t.office_end):
        day -= timedelta(days=1)
        for _ in range(7):
            if day.weekday() in t.office_days:
                break
            day -= timedelta(days=1)
    return datetime.combine(day, t.office_end, tzinfo=tz)


def off_hours_downloads(events: Iterable[EventRecord], t: AlertThresholds = AlertThresholds()) -> list[Alert]:
    """One alert per actor and off-hours stretch with allowed downloads outside office hours."""
    groups: dict[tuple[str | None, datetime], list[EventRecord]] = defaultdict(list)
    for e in events:
        if e.decision != "allow" or not is_download(e.action):
            continue
        if t.skip_synthetic_downloads and e.synthetic:
            continue
        if in_office_hours(e.at, t):
            continue
        groups[(e.actor, off_hours_stretch(e.at, t))].append(e)
    alerts = []
    tz = ZoneInfo(t.timezone)
    for (actor, stretch), evs in groups.items():
        evs.sort(key=lambda e: (_utc(e.at), e.seq))
        first, last = _utc(evs[0].at), _utc(evs[-1].at)
        local = first.astimezone(tz)
        when = f"{_WEEKDAY_EN[local.weekday()]} {local:%Y-%m-%d %H:%M}"
        when_zh = f"{local:%Y-%m-%d} {_WEEKDAY_ZH[local.weekday()]} {local:%H:%M}"
        n = len(evs)
        objects = sorted({e.object for e in evs if e.object})
        who = actor or "?"
        alerts.append(Alert(
            kind="download_off_hours", severity="warning", actor=actor, org=_common(e.org for e in evs),
            scene_id=_common(e.scene_id for e in evs), first_at=first, last_at=last, count=n,
            audit_seqs=tuple(e.seq for e in evs),
            detail={"objects": objects, "local_first": local.isoformat(), "timezone": t.timezone,
                    "stretch_began": stretch.isoformat(),
                    "office_hours": f"{t.office_start:%H:%M}-{t.office_end:%H:%M}"},
            message=(f"{who} downloaded {n} result{'s' if n != 1 else ''} outside office hours, "
                     f"first at {when} ({t.timezone})."),
            message_zh=f"{who} 在办公时间外下载了 {n} 个结果，首次为 {when_zh}（{t.timezone}）。"))
    return alerts


# ---------------------------------------------------------------------------------------------
# All of them


def decide_alerts(events: Iterable[EventRecord], scenes: Iterable[SceneRecord], queries: Iterable[QueryRecord],
                  t: AlertThresholds = AlertThresholds()) -> list[Alert]:
    """Every alert over the records, newest first (by the last time each rests on)."""
    events = list(events)
    alerts = (denial_bursts(events, t) + budgets_nearly_spent(scenes, t) + differencing_suspects(queries, t)
              + off_hours_downloads(events, t))
    return sort_newest_first(alerts)


def sort_newest_first(alerts: list[Alert]) -> list[Alert]:
    oldest = datetime.min.replace(tzinfo=UTC)
    return sorted(alerts, key=lambda a: (a.last_at or oldest, KINDS.index(a.kind), a.key), reverse=True)


def collect_alerts(session: Any, now: datetime, since: datetime, t: AlertThresholds = AlertThresholds()) -> list[Alert]:
    """Read what the alerts need from the metadata database, between `since` and `now`, and decide.

    - denials: audit events with decision `deny` and an actor;
    - downloads: allowed audit events whose action starts with `results.download` (the route's
      name) or `result.download` (the resource.action the audit middleware records), marked
      synthetic when their `result:<id>` object is a dev-twin answer;
    - budgets: usable scenes whose last ledger movement (or last update) falls in the window;
    - differencing: prod queries created in the window.
    """
    from sqlalchemy import func, or_
    from sqlmodel import select

    from catalog.models import Organization
    from pdao.audit import AuditEvent
    from pdao.identity.models import User
    from policies.models import Scene
    from policies.states import effective_status
    from sandbox.ledger import BudgetEntry
    from sandbox.models import Query, QueryResult

    now, since = _utc(now), _utc(since)
    cols = (AuditEvent.seq, AuditEvent.at, AuditEvent.actor, AuditEvent.action, AuditEvent.decision,
            AuditEvent.org, AuditEvent.role, AuditEvent.scene_id, AuditEvent.object, AuditEvent.status,
            AuditEvent.reason)
    in_window = (AuditEvent.at >= since, AuditEvent.at <= now)
    denial_rows = session.exec(select(*cols).where(*in_window, AuditEvent.decision == "deny",
                                                   AuditEvent.actor.is_not(None))).all()
    download_rows = session.exec(select(*cols).where(
        *in_window, AuditEvent.decision == "allow",
        or_(*(AuditEvent.action.startswith(a) for a in DOWNLOAD_ACTIONS)))).all()

    result_ids = {rid for row in download_rows if (rid := _result_id(row.object)) is not None}
    synthetic: dict[int, bool] = {}
    if result_ids:
        synthetic = dict(session.exec(select(QueryResult.id, QueryResult.synthetic)
                                      .where(QueryResult.id.in_(result_ids))).all())

    def event(row: Any) -> EventRecord:
        rid = _result_id(row.object) if is_download(row.action) else None
        return EventRecord(seq=row.seq, at=row.at, actor=row.actor, action=row.action, decision=row.decision,
                           org=row.org, role=row.role, scene_id=row.scene_id, object=row.object,
                           status=row.status, reason=row.reason, synthetic=synthetic.get(rid) if rid else None)

    events = [event(r) for r in denial_rows] + [event(r) for r in download_rows]

    orgs = dict(session.exec(select(Organization.id, Organization.code)).all())

    # scenes that can still spend, with the last ledger movement (reservation, charge or refund)
    live = session.exec(select(Scene).where(Scene.status.in_(("approved", "suspended")))).all()
    movements = {scene_id: max(_utc(a) for a in (created, settled) if a is not None)
                 for scene_id, created, settled in session.exec(
                     select(BudgetEntry.scene_id, func.max(BudgetEntry.created_at), func.max(BudgetEntry.settled_at))
                     .where(BudgetEntry.scene_id.in_([s.id for s in live])).group_by(BudgetEntry.scene_id)).all()}
    candidates = []
    for s in live:
        last = movements.get(s.id) or (_utc(s.updated_at) if s.updated_at else None)
        if last is not None and since <= last <= now:
            candidates.append((s, last))
    spent_by: dict[int, list[int]] = defaultdict(list)
    if candidates:
        for qid, scene_id in session.exec(select(Query.id, Query.scene_id).where(
                Query.scene_id.in_([s.id for s, _ in candidates]), Query.mode == "prod",
                Query.status.not_in(("failed", "cancelled"))).order_by(Query.id)).all():
            spent_by[scene_id].append(qid)
    scenes = [SceneRecord(id=s.id, org=orgs.get(s.org_id), budget_epsilon=s.budget_epsilon,
                          epsilon_spent=s.epsilon_spent, budget_delta=s.budget_delta, delta_spent=s.delta_spent,
                          status=effective_status(s.status, s.valid_from, s.valid_to, now),
                          title=s.title, last_spent_at=last, query_ids=tuple(spent_by.get(s.id, ())))
              for s, last in candidates]

    users = dict(session.exec(select(User.id, User.username)).all())
    queries = [QueryRecord(id=q.id, org=orgs.get(q.org_id), scene_id=q.scene_id, sql=q.sql_text,
                           created_at=q.created_at, mode=q.mode, requester=users.get(q.requester_id))
               for q in session.exec(select(Query).where(Query.mode == "prod", Query.created_at >= since,
                                                         Query.created_at <= now)).all()]
    return decide_alerts(events, scenes, queries, t)


def _result_id(obj: str | None) -> int | None:
    if obj and obj.startswith("result:"):
        try:
            return int(obj.split(":", 1)[1])
        except ValueError:
            return None
    return None


__all__ = ["Alert", "AlertThresholds", "EventRecord", "QueryRecord", "SceneRecord", "SqlShape", "budgets_nearly_spent",
           "collect_alerts", "decide_alerts", "denial_bursts", "differencing_suspects", "in_office_hours",
           "near_identical", "off_hours_downloads", "off_hours_stretch", "sort_newest_first", "sql_shape"]
