"""Alerts for the security reviewer (issue 5): patterns in the audit trail worth a look.

Five kinds, each decided by a pure function over plain records, so the rules can be read and
tested without a database:

- `many_denials` (`denial_bursts`): one signed-in actor refused at least N times within a window
  (default 10 in 1 hour) — probing, a script gone wrong. Failed logins are not counted here: nobody
  signed in, and the name typed is not who typed it. Rests on audit seqs.
- `failed_logins` (`failed_login_bursts`): at least N refused logins for one typed name within a
  window (default 10 in 1 hour) — someone guessing that account's password (or a name that does
  not exist), from the client addresses listed; the account's owner is the target, not the
  suspect. Rests on audit seqs.
- `budget_nearly_spent` (`budgets_nearly_spent`): a usable scene that has spent at least a share
  of its privacy budget (default 90%, ε or δ). Rests on the scene's prod query ids.
- `differencing` (`differencing_suspects`): one organization sent at least N near-identical prod
  queries through one scene within a window (default 5 in 24 hours). Near-identical: about
  near-identical populations — the same dataset and join, the WHERE the same apart from literal
  values or one condition more or less — once aliases, the order of select items and conditions
  and the spelling of a condition are set aside (`sql_shape` reads the checked, regenerated SQL);
  row-level and aggregate answers alike; one unchanged population links only the same question
  asked again, so another GROUP BY of it is exploration (`near_identical`). The classic
  differencing attack asks about a population with and without one person's condition, or the
  same DP query again and again to average the noise away. Template runs are left out. Rests on
  query ids.
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

import hashlib
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import sqlglot
from sqlglot import exp

SQL_DIALECT = "duckdb"   # sandbox/engine/sql.py's DIALECT (kept literal: pdao imports no room at load time)

KINDS = ("many_denials", "failed_logins", "budget_nearly_spent", "differencing", "download_off_hours")
LOGIN_ACTION = "auth.login"   # the API's and the console's password login (their route name)
DOWNLOAD_ACTIONS = ("results.download", "result.download")  # route name, and the casbin resource.action
LIVE_SCENE_STATUSES = frozenset({"active", "approved", "suspended"})   # a scene that can still spend
_WEEKDAY_EN = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_WEEKDAY_ZH = ("周一", "周二", "周三", "周四", "周五", "周六", "周日")


@dataclass(frozen=True)
class AlertThresholds:
    denials: int = 10
    denial_window: timedelta = timedelta(hours=1)
    failed_logins: int = 10
    failed_login_window: timedelta = timedelta(hours=1)
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
                "failed_logins": self.failed_logins,
                "failed_login_window_seconds": int(self.failed_login_window.total_seconds()),
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
    client: str | None = None       # the client address
    attempted_username: str | None = None   # a failed login: the name typed (detail.attempted_username)


@dataclass(frozen=True)
class SceneRecord:
    id: int
    org: str | None
    budget_epsilon: float
    epsilon_spent: float
    budget_delta: float = 0.0
    delta_spent: float = 0.0
    status: str = "active"            # the effective status (sandbox.scenes.states.effective_status)
    title: str = ""
    last_spent_at: datetime | None = None   # the last ledger movement
    query_ids: tuple[int, ...] = ()   # the prod queries that spent it


@dataclass(frozen=True)
class QueryRecord:
    id: int
    org: str | None
    scene_id: int
    sql: str                          # as the tenant sent it (read only when there is no checked SQL)
    created_at: datetime
    mode: str = "prod"
    requester: str | None = None
    checked_sql: str = ""             # regenerated from the checked tree (Query.checked_sql)
    kind: str | None = None           # aggregate | rows | template (Query.kind)


# What computing the alerts may read and answer, whatever a flood put into the log (review r5 #5: a
# week of refused logins from one client was ~97M events read into the server's memory): the newest
# ALERT_MAX_EVENTS events of each kind in the window, and ALERT_MAX_SEQS seqs listed per alert.
ALERT_MAX_EVENTS = 50_000
ALERT_MAX_SEQS = 100
SUMMARY_EXPANSION_MAX = 1_000              # refused logins of one name counted from one summary event
REFUSALS_SUMMARY_ACTION = "request.refused_summary"   # written by api/refusals.py


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
        out["audit_seqs"] = list(self.audit_seqs[:ALERT_MAX_SEQS])    # the first ones; `count` says how many
        out["audit_seqs_more"] = max(0, len(self.audit_seqs) - ALERT_MAX_SEQS)
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


def is_failed_login(e: EventRecord) -> bool:
    """A refused password login. Nobody signed in: the name typed is a detail, not an actor (older
    events, written before that was so, carry it as the actor)."""
    return e.action == LOGIN_ACTION and e.decision == "deny"


def denial_bursts(events: Iterable[EventRecord], t: AlertThresholds = AlertThresholds()) -> list[Alert]:
    """One alert per actor and burst: at least `t.denials` denials within `t.denial_window`.
    Events without an actor (anonymous requests) and failed logins (`failed_login_bursts`) are left
    out: there is no signed-in user to look at."""
    by_actor: dict[str, list[EventRecord]] = defaultdict(list)
    for e in events:
        if e.decision == "deny" and e.actor and not is_failed_login(e):
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
# failed_logins


def failed_login_bursts(events: Iterable[EventRecord], t: AlertThresholds = AlertThresholds(),
                        accounts: frozenset[str] | None = None) -> list[Alert]:
    """One alert per typed name and burst: at least `t.failed_logins` refused logins for that name
    within `t.failed_login_window`, whoever sent them. The alert names no actor — the account's
    owner is the one being guessed at, not the one guessing — but the name and the client
    addresses the attempts came from. `accounts`: the usernames that exist (None: unknown), so the
    message says whether a real account is the target."""
    by_name: dict[str, list[EventRecord]] = defaultdict(list)
    for e in events:
        name = (e.attempted_username or e.actor) if is_failed_login(e) else None
        if name:
            by_name[name].append(e)
    alerts = []
    window_en, window_zh = _duration(t.failed_login_window)
    for name, evs in by_name.items():
        evs.sort(key=lambda e: (_utc(e.at), e.seq))
        times = [_utc(e.at) for e in evs]
        for start, end in _episodes(times, t.failed_login_window, t.failed_logins):
            burst = evs[start:end + 1]
            n = len(burst)
            reasons = Counter(e.reason or "unknown" for e in burst).most_common(5)
            clients = Counter(e.client or "unknown" for e in burst).most_common(10)
            why = ", ".join(f"{r} ×{c}" for r, c in reasons)
            where = ", ".join(f"{c} ×{k}" for c, k in clients)
            more = len({e.client for e in burst}) - len(clients)
            if more > 0:
                where += f", +{more}"
            known = None if accounts is None else name in accounts
            what_en = {True: "the account", False: "the unknown name", None: "the name"}[known]
            what_zh = {True: "账号", False: "不存在的用户名", None: "用户名"}[known]
            alerts.append(Alert(
                kind="failed_logins", severity=_severity(n, t.failed_logins), actor=None, org=None, scene_id=None,
                first_at=times[start], last_at=times[end], count=n,
                audit_seqs=tuple(dict.fromkeys(e.seq for e in burst)),   # a summary's seq stands for its many
                detail={"attempted_username": name, "account_exists": known, "clients": dict(clients),
                        "reasons": dict(reasons), "threshold": t.failed_logins,
                        "window_seconds": int(t.failed_login_window.total_seconds())},
                message=(f"{n} failed logins for {what_en} '{name}' within {window_en}, from {where} ({why}). "
                         f"The name is what was typed; its owner is the target, not the sender."),
                message_zh=(f"{window_zh}内针对{what_zh}“{name}”的登录失败 {n} 次，来自 {where}（{why}）。"
                            f"该名称为尝试者所输入，账号本人是被尝试的对象，而非发起者。")))
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
#
# The shape is read from the checked, regenerated SQL (`Query.checked_sql`: catalog view names,
# the fixed table aliases `d`/`u`, quoted identifiers, re-rendered literals) and normalized
# further, so that nothing a tenant may vary freely between two probes — output and table aliases,
# the order of select items and of conditions, the spelling of a condition, ORDER BY, LIMIT —
# makes two questions about one population look different.

DATASET_ALIAS, UPLOAD_ALIAS = "d", "u"   # sandbox/engine/sql.py's fixed table aliases (kept literal, as above)
_DATASET_VIEW, _UPLOAD_VIEW = "v_", "u_"  # sandbox/engine/sql.py view_name / upload_view_name prefixes
_FLIPPED: dict[type[exp.Expression], type[exp.Expression]] = {
    exp.EQ: exp.EQ, exp.NEQ: exp.NEQ, exp.LT: exp.GT, exp.LTE: exp.GTE, exp.GT: exp.LT, exp.GTE: exp.LTE}
_NEGATED: dict[type[exp.Expression], type[exp.Expression]] = {
    exp.EQ: exp.NEQ, exp.NEQ: exp.EQ, exp.LT: exp.GTE, exp.LTE: exp.GT, exp.GT: exp.LTE, exp.GTE: exp.LT}
_SYMBOL = {exp.EQ: "=", exp.NEQ: "<>", exp.LT: "<", exp.LTE: "<=", exp.GT: ">", exp.GTE: ">="}
# Literals blanked, `x > ?` and `x >= ?` ask the same question: a bound from below
_BOUND = {exp.EQ: "=", exp.NEQ: "<>", exp.LT: "<=", exp.LTE: "<=", exp.GT: ">=", exp.GTE: ">="}


@dataclass(frozen=True)
class SqlShape:
    """A query without its literals, aliases and order: every text below is a skeleton in which
    each literal is a placeholder `?` (an IN-list one placeholder).

    source: FROM the dataset [JOIN the upload ON key = key], tables under canonical aliases;
    kind: aggregate | rows (decided as the checker does: GROUP BY or an aggregate function);
    grouping: the distinct group keys, sorted (aggregates; empty for rows);
    measures: what is asked of each group or row, output aliases dropped, sorted (a multiset): the
      aggregates (`count(*)`, `sum(d.fee)`), or a rows query's outputs;
    conjuncts: the top-level WHERE conditions, each normalized (AND/OR operands sorted, comparisons
      with the column first, NOT pushed inwards, `=` as a one-value IN, BETWEEN as two bounds),
      sorted (a multiset);
    population: a digest of the source and the WHERE *with* its literals — equal exactly when two
      queries ask about the same rows. Compared, never shown (it rests on the literals)."""
    source: str
    kind: str
    grouping: tuple[str, ...]
    measures: tuple[str, ...]
    conjuncts: tuple[str, ...]
    population: str = field(default="", repr=False)

    def render(self) -> str:
        """The skeleton as one SELECT (metadata: placeholders, never a literal)."""
        parts = [f"select {', '.join(self.grouping + self.measures)}", self.source]
        if self.conjuncts:
            parts.append("where " + " and ".join(self.conjuncts))
        if self.grouping:
            parts.append("group by " + ", ".join(self.grouping))
        return " ".join(parts)


def _is_literal(node: exp.Expression) -> bool:
    if isinstance(node, (exp.Literal, exp.Boolean, exp.Placeholder)):
        return True
    if isinstance(node, exp.Neg):
        return _is_literal(node.this)
    if isinstance(node, exp.Cast):   # DATE '2020-01-01', CAST('…' AS DATE)
        return _is_literal(node.this)
    return False


def _unparen(node: exp.Expression) -> exp.Expression:
    while isinstance(node, exp.Paren):
        node = node.this
    return node


class _Renderer:
    """Canonical text of the parts of one query: columns under the canonical table aliases,
    identifiers unquoted and lower case, literals blanked (`blank`) or kept (for the population
    digest only). `canon` rewrites a part once (a copy); the other methods read rewritten parts."""

    def __init__(self, qualifiers: dict[str, str], default_alias: str | None, blank: bool) -> None:
        self.qualifiers = qualifiers          # written qualifier (lower case) -> canonical alias
        self.default_alias = default_alias    # for unqualified columns when the query reads one table
        self.blank = blank

    def _canon(self, node: exp.Expression) -> exp.Expression:
        if self.blank and _is_literal(node):
            return exp.Placeholder()
        if isinstance(node, exp.In) and self.blank and node.expressions \
                and all(_is_literal(_unparen(x)) for x in node.expressions):
            # `x IN (1, 2, 3)` and `x IN (1)` are the same question about different values
            return exp.In(this=node.this.transform(self._canon), expressions=[exp.Placeholder()])
        if isinstance(node, exp.Column) and isinstance(node.this, exp.Identifier):
            parts = [node.args.get(k) for k in ("catalog", "db", "table")]
            written = ".".join(p.name for p in parts if p is not None).lower()
            alias = self.qualifiers.get(written, written) if written else self.default_alias
            return exp.column(node.this.name.lower(), table=alias) if alias else exp.column(node.this.name.lower())
        if isinstance(node, exp.Identifier):
            return exp.to_identifier(node.name.lower())
        return node

    def canon(self, node: exp.Expression) -> exp.Expression:
        return node.transform(self._canon)

    def text(self, node: exp.Expression) -> str:
        out = _unparen(node).sql(dialect=SQL_DIALECT, comments=False)
        return out.lower() if self.blank else out

    def values(self, nodes: Sequence[exp.Expression]) -> str:
        if self.blank and all(_is_literal(_unparen(n)) for n in nodes):
            return "(?)"
        return "(" + ", ".join(sorted({self.text(n) for n in nodes})) + ")"

    # -- conditions: ("and" | "or", children) or ("atom", text) ---------------------------------
    def condition(self, node: exp.Expression, negate: bool = False) -> tuple[Any, ...]:
        node = _unparen(node)
        kind = type(node)
        if kind is exp.Not:
            return self.condition(node.this, not negate)
        if kind in (exp.And, exp.Or):
            op = "and" if (kind is exp.And) != negate else "or"   # De Morgan under NOT
            children: list[tuple[Any, ...]] = []
            for side in (node.this, node.expression):
                child = self.condition(side, negate)
                children.extend(child[1] if child[0] == op else [child])
            return (op, tuple(sorted(children, key=self.render)))
        if kind is exp.Between and not node.args.get("symmetric"):
            x = node.this
            return self.condition(exp.and_(exp.GTE(this=x.copy(), expression=node.args["low"].copy()),
                                           exp.LTE(this=x.copy(), expression=node.args["high"].copy())), negate)
        if kind in _FLIPPED:
            return ("atom", self.comparison(node, negate))
        if kind is exp.In and node.expressions and not any(node.args.get(k) for k in ("query", "unnest", "field")):
            values = self.values(node.expressions)
            return ("atom", f"{self.text(node.this)} {'not in' if negate else 'in'} {values}")
        if kind is exp.Is and isinstance(node.expression, exp.Null):
            return ("atom", f"{self.text(node.this)} is {'not ' if negate else ''}null")
        text = self.text(node)
        return ("atom", f"not ({text})" if negate else text)

    def comparison(self, node: exp.Expression, negate: bool) -> str:
        op = type(node)
        left, right = _unparen(node.this), _unparen(node.expression)
        left_text, right_text = self.text(left), self.text(right)
        # the column first: `5 < x` is `x > 5`
        if (_is_literal(left), left_text) > (_is_literal(right), right_text):
            left, right, left_text, right_text, op = right, left, right_text, left_text, _FLIPPED[op]
        if negate:
            op = _NEGATED[op]
        if op in (exp.EQ, exp.NEQ) and _is_literal(right):   # `x = 5` is `x IN (5)`
            return f"{left_text} {'in' if op is exp.EQ else 'not in'} {self.values([right])}"
        return f"{left_text} {(_BOUND if self.blank else _SYMBOL)[op]} {right_text}"

    def render(self, cond: tuple[Any, ...], top: bool = True) -> str:
        if cond[0] == "atom":
            return cond[1]
        joined = f" {cond[0]} ".join(self.render(c, top=False) for c in cond[1])
        return joined if top else f"({joined})"

    def conjuncts(self, where: exp.Expression) -> list[str]:
        cond = self.condition(where)
        parts = cond[1] if cond[0] == "and" else [cond]
        return sorted(self.render(c) for c in parts)


def _tables(select: exp.Select) -> tuple[list[tuple[str, str, exp.Join | None]], dict[str, str]] | None:
    """The tables read, as (canonical name, canonical alias, join) — the FROM table first under
    `d`, joined tables under `u`, `u2`, … — and every qualifier a column may use for each."""
    frm = select.args.get("from_")
    if frm is None:
        return None
    tables: list[tuple[str, str, exp.Join | None]] = []
    qualifiers: dict[str, str] = {}
    for i, (node, join) in enumerate([(frm.this, None)] + [(j.this, j) for j in select.args.get("joins") or []]):
        alias = DATASET_ALIAS if i == 0 else UPLOAD_ALIAS + (str(i) if i > 1 else "")
        if not isinstance(node, exp.Table) or not isinstance(node.this, exp.Identifier):
            return None
        name = node.this.name.lower()
        db = node.args.get("db")
        written = name
        canonical = name if i == 0 or name.startswith(_UPLOAD_VIEW) else _UPLOAD_VIEW + name
        if isinstance(db, exp.Identifier):   # the tenant's text: `health.outpatient_visit`, named as its view
            written = f"{db.name.lower()}.{name}"
            canonical = _DATASET_VIEW + written.replace(".", "_")
        table_alias = node.args.get("alias")
        if isinstance(table_alias, exp.TableAlias) and table_alias.name:
            qualifiers[table_alias.name.lower()] = alias
        else:
            for q in {written, name, canonical}:
                qualifiers[q] = alias
        tables.append((canonical, alias, join))
    return tables, qualifiers


def _group_keys(select: exp.Select, items: list[exp.Expression],
                aliased: dict[str, exp.Expression]) -> list[exp.Expression]:
    """GROUP BY's keys, positions (`GROUP BY 1`) and output aliases resolved to their expressions."""
    group = select.args.get("group")
    keys: list[exp.Expression] = []
    for key in (group.expressions if group is not None else []):
        key = _unparen(key)
        if isinstance(key, exp.Literal) and not key.is_string and key.this.isdigit() \
                and 1 <= int(key.this) <= len(items):
            key = items[int(key.this) - 1]
        elif isinstance(key, exp.Column) and not key.table and key.name.lower() in aliased \
                and not aliased[key.name.lower()].find(exp.AggFunc):
            key = aliased[key.name.lower()]
        keys.append(key)
    return keys


def _source(tables: list[tuple[str, str, exp.Join | None]], r: _Renderer) -> str:
    """FROM and JOINs: canonical names and aliases, each ON condition normalized."""
    parts = []
    for name, alias, join in tables:
        if join is None:
            parts.append(f"from {name} {alias}")
            continue
        how = " ".join(str(join.args[k]).lower() for k in ("method", "side", "kind") if join.args.get(k))
        on = join.args.get("on")
        parts.append(f"{how + ' ' if how else ''}join {name} {alias}"
                     + (f" on {r.render(r.condition(r.canon(on)))}" if on is not None else ""))
    return " ".join(parts)


def sql_shape(sql: str) -> SqlShape | None:
    """The shape of one query (DuckDB dialect): the checked SQL, or a tenant's text; None unless it
    parses as exactly one SELECT FROM a table."""
    try:
        statements = [s for s in sqlglot.parse(sql, dialect=SQL_DIALECT) if s is not None]
        if len(statements) != 1 or not isinstance(statements[0], exp.Select):
            return None
        select = statements[0]
        read = _tables(select)
        if read is None:
            return None
        tables, qualifiers = read
        default_alias = DATASET_ALIAS if len(tables) == 1 else None
        blank = _Renderer(qualifiers, default_alias, blank=True)
        exact = _Renderer(qualifiers, default_alias, blank=False)

        items, aliased = [], {}
        for item in select.expressions:
            if isinstance(item, exp.Alias):   # an output alias says nothing about the question
                aliased[item.alias.lower()] = item.this
                item = item.this
            items.append(_unparen(item))
        aggregate = select.args.get("group") is not None or any(i.find(exp.AggFunc) for i in items)
        if aggregate:
            keys = _group_keys(select, items, aliased) + [i for i in items if not i.find(exp.AggFunc)]
            grouping = sorted({blank.text(blank.canon(k)) for k in keys})
            measures = sorted(blank.text(blank.canon(i)) for i in items if i.find(exp.AggFunc))
        else:
            grouping, measures = [], sorted(blank.text(blank.canon(i)) for i in items)

        where = select.args.get("where")
        where_node = where.this if isinstance(where, exp.Where) else None
        conjuncts = blank.conjuncts(blank.canon(where_node)) if where_node is not None else []
        exact_where = exact.conjuncts(exact.canon(where_node)) if where_node is not None else []
        population = hashlib.sha256("\x1f".join([_source(tables, exact), "where", *exact_where])
                                    .encode("utf-8", "surrogatepass")).hexdigest()
        return SqlShape(source=_source(tables, blank), kind="aggregate" if aggregate else "rows",
                        grouping=tuple(grouping), measures=tuple(measures), conjuncts=tuple(conjuncts),
                        population=population)
    except Exception:  # noqa: BLE001 - sqlglot raises several kinds, deep nesting RecursionError: skipped
        return None


def _within_one_condition(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    ca, cb = Counter(a), Counter(b)
    return sum(((ca - cb) + (cb - ca)).values()) <= 1


def _same_question(a: SqlShape, b: SqlShape) -> bool:
    """The same kind, the same grouping and a statistic (or row output) in common."""
    return a.kind == b.kind and a.grouping == b.grouping and not set(a.measures).isdisjoint(b.measures)


def near_identical(a: SqlShape, b: SqlShape) -> bool:
    """Two queries about near-identical populations whose answers can be set against each other.

    Near-identical populations: the same source (dataset, join), and WHERE conjuncts that differ at
    most by literal values and by one condition more or less. Then:
    - another population (a literal or a condition changed): always — a row-level answer's rows
      (and their number) or an aggregate's cells, whatever is selected or grouped, set against any
      answer about the other population give the difference;
    - the same population (the same WHERE, literals too): only the same question again (averaging
      the noise away). Another GROUP BY, another statistic, or rows beside aggregates of one
      unchanged population is exploration: nothing to subtract."""
    if a.source != b.source or not _within_one_condition(a.conjuncts, b.conjuncts):
        return False
    return a.population != b.population or _same_question(a, b)


def differencing_suspects(queries: Iterable[QueryRecord], t: AlertThresholds = AlertThresholds()) -> list[Alert]:
    """One alert per (org, scene) and cluster: at least `t.near_identical` prod queries, linked by
    `near_identical` (transitively), within `t.near_identical_window`. Dev queries (synthetic twin),
    template runs and SQL that does not parse are left out."""
    groups: dict[tuple[str | None, int], list[tuple[QueryRecord, SqlShape]]] = defaultdict(list)
    for q in queries:
        if q.mode != "prod" or q.kind == "template":
            continue
        shape = sql_shape(q.checked_sql or q.sql)   # the tenant's text only when nothing was checked
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
                skeletons = Counter(s.render() for _, s in part)
                requesters = sorted({q.requester for q, _ in part if q.requester})
                alerts.append(Alert(
                    kind="differencing", severity=_severity(n, t.near_identical),
                    actor=requesters[0] if len(requesters) == 1 else None, org=org, scene_id=scene_id,
                    first_at=times[start], last_at=times[end], count=n, query_ids=tuple(q.id for q, _ in part),
                    detail={"skeleton": skeletons.most_common(1)[0][0], "distinct_shapes": len(skeletons),
                            "kinds": dict(sorted(Counter(s.kind for _, s in part).items())),
                            "distinct_populations": len({s.population for _, s in part}),
                            "requesters": requesters, "threshold": t.near_identical,
                            "window_seconds": int(t.near_identical_window.total_seconds())},
                    message=(f"{org or '?'} sent {n} prod queries through scene {scene_id} within {window_en} "
                             "about near-identical populations (the same dataset and join; the WHERE the same "
                             "apart from literal values or one condition, aliases and order set aside), "
                             "row-level and aggregate answers alike; one unchanged population counts only for "
                             "the same question asked again, not for another GROUP BY: a possible differencing "
                             "or averaging attack."),
                    message_zh=(f"{org or '?'} 在 {window_zh} 内通过场景 {scene_id} 提交了 {n} 条针对近似相同人群的"
                                "生产查询（同一数据集与关联；忽略别名和顺序后，WHERE 除字面值或一个条件外相同），"
                                "逐行结果与聚合结果一并计入；同一人群不变时，只有重复提出的相同问题才计入，"
                                "更换 GROUP BY 的探索不计入。可能是差分攻击或平均去噪攻击。")))
    return alerts


def _near_identical_clusters(members: list[tuple[QueryRecord, SqlShape]]) -> list[list[tuple[QueryRecord, SqlShape]]]:
    """Connected components of the `near_identical` relation, found through buckets rather than
    pairwise: queries with equal (source, conjunct multiset) form a bucket, and a bucket meets the
    buckets whose multiset is its own minus one conjunct (always another population)."""
    parent = list(range(len(members)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def join(indices: Iterable[int]) -> None:
        it = iter(indices)
        first = next(it, None)
        for j in it:
            parent[find(j)] = find(first)

    shape = [s for _, s in members]
    buckets: dict[tuple[str, tuple[str, ...]], list[int]] = defaultdict(list)
    for i, s in enumerate(shape):
        buckets[(s.source, s.conjuncts)].append(i)
    for bucket in buckets.values():
        if len({shape[i].population for i in bucket}) > 1:
            join(bucket)   # each member has a partner about another population
            continue
        same: dict[tuple[str, tuple[str, ...], str], list[int]] = defaultdict(list)
        for i in bucket:   # one population: the same question again
            for m in set(shape[i].measures):
                same[(shape[i].kind, shape[i].grouping, m)].append(i)
        for indices in same.values():
            join(indices)
    for (source, conjuncts), bucket in buckets.items():
        for fewer in {conjuncts[:k] + conjuncts[k + 1:] for k in range(len(conjuncts))}:
            if (source, fewer) in buckets:   # one condition less: another population, always linked
                join(bucket + buckets[(source, fewer)])
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
                  t: AlertThresholds = AlertThresholds(), accounts: frozenset[str] | None = None) -> list[Alert]:
    """Every alert over the records, newest first (by the last time each rests on)."""
    events = list(events)
    alerts = (denial_bursts(events, t) + failed_login_bursts(events, t, accounts) + budgets_nearly_spent(scenes, t)
              + differencing_suspects(queries, t) + off_hours_downloads(events, t))
    return sort_newest_first(alerts)


def sort_newest_first(alerts: list[Alert]) -> list[Alert]:
    oldest = datetime.min.replace(tzinfo=UTC)
    return sorted(alerts, key=lambda a: (a.last_at or oldest, KINDS.index(a.kind), a.key), reverse=True)


def collect_alerts(session: Any, now: datetime, since: datetime, t: AlertThresholds = AlertThresholds()) -> list[Alert]:
    """Read what the alerts need from the metadata database, between `since` and `now`, and decide.

    - denials: audit events with decision `deny` and an actor, and every refused login (its
      typed name in `detail.attempted_username`, its client address);
    - downloads: allowed audit events whose action starts with `results.download` (the route's
      name) or `result.download` (the resource.action the audit middleware records), marked
      synthetic when their `result:<id>` object is a dev-twin answer;
    - budgets: usable scenes whose last ledger movement (or last update) falls in the window;
    - differencing: prod queries created in the window (their checked SQL), template runs left out.
    """
    from sqlalchemy import func, or_
    from sqlmodel import select

    from pdao.kernel.audit import AuditEvent
    from pdao.kernel.identity.models import Organization, User
    from sandbox.budgets.ledger import BudgetEntry
    from sandbox.results.models import Query, QueryResult
    from sandbox.scenes.models import Scene
    from sandbox.scenes.states import effective_status

    now, since = _utc(now), _utc(since)
    cols = (AuditEvent.seq, AuditEvent.at, AuditEvent.actor, AuditEvent.action, AuditEvent.decision,
            AuditEvent.org, AuditEvent.role, AuditEvent.scene_id, AuditEvent.object, AuditEvent.status,
            AuditEvent.reason, AuditEvent.client)
    in_window = (AuditEvent.at >= since, AuditEvent.at <= now)
    newest = (AuditEvent.seq.desc(),)
    denial_rows = session.exec(select(*cols).where(*in_window, AuditEvent.decision == "deny",
                                                   AuditEvent.actor.is_not(None),
                                                   AuditEvent.action != LOGIN_ACTION)
                               .order_by(*newest).limit(ALERT_MAX_EVENTS)).all()
    login_rows = session.exec(select(*cols, AuditEvent.detail).where(*in_window, AuditEvent.decision == "deny",
                                                                      AuditEvent.action == LOGIN_ACTION)
                              .order_by(*newest).limit(ALERT_MAX_EVENTS)).all()
    download_rows = session.exec(select(*cols).where(
        *in_window, AuditEvent.decision == "allow",
        or_(*(AuditEvent.action.startswith(a) for a in DOWNLOAD_ACTIONS)))
        .order_by(*newest).limit(ALERT_MAX_EVENTS)).all()

    result_ids = {rid for row in download_rows if (rid := _result_id(row.object)) is not None}
    synthetic: dict[int, bool] = {}
    if result_ids:
        synthetic = dict(session.exec(select(QueryResult.id, QueryResult.synthetic)
                                      .where(QueryResult.id.in_(result_ids))).all())

    def event(row: Any) -> EventRecord:
        rid = _result_id(row.object) if is_download(row.action) else None
        detail = getattr(row, "detail", None)
        typed = detail.get("attempted_username") if isinstance(detail, dict) else None
        return EventRecord(seq=row.seq, at=row.at, actor=row.actor, action=row.action, decision=row.decision,
                           org=row.org, role=row.role, scene_id=row.scene_id, object=row.object,
                           status=row.status, reason=row.reason, synthetic=synthetic.get(rid) if rid else None,
                           client=row.client, attempted_username=typed if isinstance(typed, str) else None)

    # refused logins past an address's one-by-one share of a minute are counted in a summary event
    # with the names typed (api/refusals.py): each counts here as that many refused logins
    summary_rows = session.exec(select(AuditEvent.seq, AuditEvent.at, AuditEvent.client, AuditEvent.detail).where(
        *in_window, AuditEvent.action == REFUSALS_SUMMARY_ACTION).order_by(*newest).limit(ALERT_MAX_EVENTS)).all()
    summarized = [EventRecord(seq=row.seq, at=_utc(row.at), actor=None, action=LOGIN_ACTION, decision="deny",
                              reason="summarized", client=row.client, attempted_username=name)
                  for row in summary_rows
                  for name, n in ((row.detail or {}).get("attempted_usernames") or {}).items()
                  if isinstance(name, str) and isinstance(n, int) and name != "…"
                  for _ in range(min(n, SUMMARY_EXPANSION_MAX))]
    events = ([event(r) for r in denial_rows] + [event(r) for r in login_rows] + summarized
              + [event(r) for r in download_rows])

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
    accounts = frozenset(users.values())
    queries = [QueryRecord(id=q.id, org=orgs.get(q.org_id), scene_id=q.scene_id, sql=q.sql_text,
                           created_at=q.created_at, mode=q.mode, requester=users.get(q.requester_id),
                           checked_sql=q.checked_sql or "", kind=q.kind)
               for q in session.exec(select(Query).where(Query.mode == "prod", Query.kind != "template",
                                                         Query.created_at >= since, Query.created_at <= now)).all()]
    return decide_alerts(events, scenes, queries, t, accounts)


def _result_id(obj: str | None) -> int | None:
    if obj and obj.startswith("result:"):
        try:
            return int(obj.split(":", 1)[1])
        except ValueError:
            return None
    return None


__all__ = ["Alert", "AlertThresholds", "EventRecord", "QueryRecord", "SceneRecord", "SqlShape", "budgets_nearly_spent",
           "collect_alerts", "decide_alerts", "denial_bursts", "differencing_suspects", "failed_login_bursts",
           "in_office_hours", "is_failed_login",
           "near_identical", "off_hours_downloads", "off_hours_stretch", "sort_newest_first", "sql_shape"]
