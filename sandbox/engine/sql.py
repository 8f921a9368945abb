"""User SQL, checked: parse, check every column use against the scene's data list, regenerate.

Rule 2 of the house: user SQL never reaches the engine as text. `check_query` parses the text with
sqlglot (DuckDB dialect), accepts one `SELECT` of a small subset, checks every column use against
the scene's effective items (`Grants`), and builds a *new* sqlglot tree from what it accepted:
catalog field names (never the user's spelling), our view names for datasets and uploads
(`view_name`, `upload_view_name`), fixed table aliases, every identifier quoted, literals parsed and
re-rendered, and no comments (sqlglot keeps comments in its tree; a rebuilt tree has none). The
answer is a `CheckedQuery`: the plan for the later stages (privacy, engine, masking) and the SQL.

The accepted subset (issue 4, item 1):

- an *aggregate* query: `SELECT` of group keys and aggregates — `COUNT(*)`,
  `COUNT(DISTINCT <privacy unit>)`, `SUM(f)`, `AVG(f)`, `MEDIAN(f)`, `QUANTILE_CONT(f, q)` with a
  literal q in [0, 1] — `FROM` one dataset (`health.outpatient_visit`), an optional
  `[INNER] JOIN <own upload> ON <dataset join_key field> = <upload column>`, `WHERE` with
  `= <> < <= > >=`, `IN (literals)`, `BETWEEN`, `IS [NOT] NULL`, `AND/OR/NOT` over columns and
  string/number/date/boolean literals, `GROUP BY` columns or `DATE_TRUNC('year'|'quarter'|'month',
  <date field>)` (a group key, so it needs `group_by`), `ORDER BY` selected outputs, `LIMIT n`;
- a *rows* query: `SELECT` of `masked_output` fields, no aggregates, same FROM/JOIN/WHERE/LIMIT
  (no ORDER BY: the output is masked later, an order on raw values would say more than the mask).

The tenant's own upload columns need no grant, with two limits: they are never aggregated (no
catalog bounds to bound a contribution), and a rows query uses the upload only in JOIN ON (its
columns beside per-row output would tie the tenant's own records to the dataset's rows).

Where a column is used decides the usage it needs; `REQUIRED_USAGE` is the one table of that and
`_Checker.use` the one function that applies it. Anything else is refused with `QueryRefused`
(422 `query_refused`), whose details name each construct, the missing item (dataset, field,
usage) when the data list lacks one, in English and Chinese.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dc_field
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from typing import Any

import sqlglot
from sqlglot import exp
from sqlglot.errors import ParseError, TokenError

from pdao.kernel.errors import PdaoError
from policies.rules import Usage

DIALECT = "duckdb"
MAX_SQL_CHARS = 20_000
MAX_ALIAS_CHARS = 64
MAX_STRING_CHARS = 1_000
MAX_LIMIT = 2**31 - 1
DATASET_ALIAS = "d"   # the dataset's table alias in the regenerated SQL
UPLOAD_ALIAS = "u"    # the upload's table alias in the regenerated SQL

# (dataset code, field) -> the usages the scene's effective data list grants for it.
Grants = Mapping[tuple[str, str], Iterable[str]]
# upload name -> its columns and their declared types (sandbox.uploads.service TYPES), of the version joined
UploadSchemas = Mapping[str, Mapping[str, str]]

# A number column's type -> (its storage type, the decimal places it holds (None: any), the largest
# magnitude accepted): sandbox.engine.store.DUCK_TYPES, which catalog snapshots and uploads share.
NUMBER_TYPES = {"integer": ("BIGINT", 0, Decimal(2**63 - 1)),
                "decimal": ("DECIMAL(18,2)", 2, Decimal("9999999999999999.99")),
                "float": ("DOUBLE", None, Decimal("1e300"))}

# A column's type -> the kind of literal it may be compared with (catalog and upload types alike).
_LITERAL_KIND = {"string": "string", "integer": "number", "float": "number", "decimal": "number",
                 "date": "date", "timestamp": "date", "boolean": "boolean"}


@dataclass(frozen=True)
class DatasetInfo:
    """What the checker needs of a dataset: its catalog code, its fields and its privacy unit."""

    code: str
    fields: tuple[str, ...]
    privacy_unit: str | None   # None: COUNT(DISTINCT …) is never accepted
    # field -> catalog type (catalog.descriptor.FieldType values). Given, every literal a field is
    # compared with must be of its type: DuckDB would otherwise cast the *column* row by row, and
    # whether that fails would depend on the data (a failure on the first row that passes the
    # other conditions says such a row exists).
    types: Mapping[str, str] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "fields", tuple(self.fields))


def view_name(code: str) -> str:
    """The view the engine binds for a dataset: `health.outpatient_visit` -> `v_health_outpatient_visit`.
    (A query reads one dataset, so the name is unambiguous within a query.)"""
    return "v_" + code.replace(".", "_")


def upload_view_name(name: str) -> str:
    """The view the engine binds for one of the tenant's own uploads."""
    return "u_" + name


# ---------------------------------------------------------------------------------------------
# Refusals

USAGE_ZH = {"aggregate": "聚合", "group_by": "分组", "filter": "筛选", "join_key": "关联键",
            "masked_output": "脱敏输出"}


@dataclass(frozen=True)
class Problem:
    """One reason a query is refused. `dataset`/`field`/`usage` name the missing item of the
    scene's data list when that is the reason (a grants problem)."""

    construct: str
    message: str
    message_zh: str
    dataset: str | None = None
    field: str | None = None
    usage: str | None = None

    def as_dict(self) -> dict[str, Any]:
        missing = None
        if self.dataset is not None:
            missing = {"dataset": self.dataset, "field": self.field, "usage": self.usage}
        return {"construct": self.construct, "message": self.message, "message_zh": self.message_zh,
                "missing": missing}


class QueryRefused(PdaoError):
    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = tuple(problems)
        first, more = self.problems[0], len(self.problems) - 1
        en = f"The query was refused: {first.message}"
        zh = f"查询被拒绝：{first.message_zh}"
        if more:
            en += f" (and {more} more problem{'s' if more > 1 else ''}; see details)"
            zh += f"（另有 {more} 个问题，见 details）"
        super().__init__(422, "query_refused", en, zh, details=[p.as_dict() for p in self.problems])


# ---------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class ColumnRef:
    table: str            # dataset code, or upload name when `upload`
    field: str
    upload: bool = False

    def __str__(self) -> str:
        return f"{'upload ' if self.upload else ''}{self.table}.{self.field}"


@dataclass(frozen=True)
class Aggregate:
    function: str               # count | count_distinct | sum | avg | median | quantile
    column: ColumnRef | None    # None for COUNT(*)
    q: float | None             # the quantile (0.5 for median), else None
    alias: str                  # its output name

    @property
    def field(self) -> str | None:
        return self.column.field if self.column else None


@dataclass(frozen=True)
class GroupKey:
    column: ColumnRef
    alias: str | None           # its output name when selected, None when only grouped on
    unit: str | None = None     # DATE_TRUNC unit (year | quarter | month), None for the value itself


@dataclass(frozen=True)
class MaskedOutput:
    column: ColumnRef
    alias: str


@dataclass(frozen=True)
class JoinPlan:
    upload: str                 # the upload's name
    dataset_key: str            # the dataset's join_key field
    upload_key: str             # the upload's column


@dataclass(frozen=True)
class OrderItem:
    output: str                 # an output name (group key or aggregate alias)
    descending: bool = False
    nulls_first: bool = False


@dataclass(frozen=True)
class CheckedQuery:
    """A checked query: the plan, and `sql` regenerated from the checked tree (never the input text).

    `tree` is the regenerated sqlglot tree: copy it before changing it. Note for the DP stage:
    `sql` includes ORDER BY and LIMIT as written; on noisy answers they are to be applied after the
    noise (post-processing), not on the exact aggregates."""

    kind: str                                   # "aggregate" | "rows"
    dataset: str
    view: str
    join: JoinPlan | None
    outputs: tuple[str, ...]                    # output column names, in SELECT order
    group_keys: tuple[GroupKey, ...]
    aggregates: tuple[Aggregate, ...]
    masked: tuple[MaskedOutput, ...]
    filters: tuple[ColumnRef, ...]              # the columns WHERE uses, in first-use order
    where: str | None                           # the regenerated WHERE condition
    order_by: tuple[OrderItem, ...]
    limit: int | None
    uses: frozenset[tuple[str, str, str]]       # every (dataset, field, usage) the query relies on
    sql: str
    tree: exp.Select = dc_field(repr=False, compare=False)


def referenced_fields(checked: CheckedQuery) -> set[tuple[str, str]]:
    """Every (dataset, field) the query reads."""
    return {(d, f) for d, f, _ in checked.uses}


# ---------------------------------------------------------------------------------------------
# Where a column is used, and the usage that needs


class Place(StrEnum):
    select_key = "select_key"           # a bare column output by an aggregate query: a group key
    select_row = "select_row"           # a bare column output by a rows query
    aggregate = "aggregate"             # inside SUM / AVG / MEDIAN / QUANTILE_CONT
    count_distinct = "count_distinct"   # inside COUNT(DISTINCT …)
    where = "where"
    group_by = "group_by"
    join_on = "join_on"


REQUIRED_USAGE: dict[Place, Usage] = {
    Place.select_key: Usage.group_by,
    Place.select_row: Usage.masked_output,
    Place.aggregate: Usage.aggregate,
    Place.count_distinct: Usage.aggregate,
    Place.where: Usage.filter,
    Place.group_by: Usage.group_by,
    Place.join_on: Usage.join_key,
}

PLACE_TEXT: dict[Place, tuple[str, str]] = {
    Place.select_key: ("SELECT", "SELECT 输出列"),
    Place.select_row: ("SELECT", "SELECT 输出列"),
    Place.aggregate: ("an aggregate", "聚合函数"),
    Place.count_distinct: ("COUNT(DISTINCT)", "COUNT(DISTINCT)"),
    Place.where: ("WHERE", "WHERE 条件"),
    Place.group_by: ("GROUP BY", "GROUP BY 分组"),
    Place.join_on: ("JOIN ON", "JOIN ON 关联条件"),
}


def required_usage(place: Place) -> Usage:
    return REQUIRED_USAGE[place]


# ---------------------------------------------------------------------------------------------
# Describing what we refuse

_CLAUSES: dict[str, tuple[str, str, str]] = {
    # Select arg -> (construct, message, message_zh)
    "with_": ("WITH (CTE)", "common table expressions (WITH) are not supported; query one dataset directly",
              "不支持公用表表达式（WITH）；请直接查询一个数据集"),
    "having": ("HAVING", "HAVING is not supported: it would pick groups by their exact aggregates before any "
               "noise is added; filter rows with WHERE instead",
               "不支持 HAVING：它会在加噪之前按精确聚合值筛选分组；请用 WHERE 筛选行"),
    "qualify": ("QUALIFY", "QUALIFY (window filtering) is not supported", "不支持 QUALIFY（窗口筛选）"),
    "distinct": ("SELECT DISTINCT", "SELECT DISTINCT is not supported; use GROUP BY with an aggregate",
                 "不支持 SELECT DISTINCT；请使用 GROUP BY 加聚合函数"),
    "offset": ("OFFSET", "OFFSET is not supported", "不支持 OFFSET"),
    "windows": ("WINDOW", "window definitions are not supported", "不支持窗口定义（WINDOW）"),
    "sample": ("USING SAMPLE", "sampling is not supported", "不支持抽样（USING SAMPLE）"),
}

_SELECT_ARGS = {"expressions", "from_", "joins", "where", "group", "order", "limit"}
_COMPARISONS: dict[type[exp.Expression], type[exp.Expression]] = {
    exp.EQ: exp.EQ, exp.NEQ: exp.NEQ, exp.LT: exp.LT, exp.LTE: exp.LTE, exp.GT: exp.GT, exp.GTE: exp.GTE,
}
TRUNC_UNITS = ("year", "quarter", "month")
_TRUNCS = (exp.TimestampTrunc, exp.DateTrunc)
_AGGREGATES = "COUNT(*), COUNT(DISTINCT <privacy unit>), SUM, AVG, MEDIAN, QUANTILE_CONT(field, q)"
_AGGREGATES_ZH = "COUNT(*)、COUNT(DISTINCT <隐私单位>)、SUM、AVG、MEDIAN、QUANTILE_CONT(字段, q)"


def _function_name(node: exp.Expression) -> str:
    if isinstance(node, exp.Anonymous):
        return str(node.this).upper()
    head = node.sql(dialect=DIALECT, comments=False).split("(", 1)[0].strip()
    return head if head.replace("_", "").isalnum() else node.sql_name()


def _construct(node: exp.Expression | None) -> str:
    """A short name for a construct we do not accept, as a user would recognize it."""
    if node is None:
        return "missing argument"
    if isinstance(node, (exp.Subquery, exp.Select, exp.Exists, exp.Union, exp.Intersect, exp.Except)):
        return "subquery"
    if isinstance(node, exp.Window):
        return "window function"
    if isinstance(node, exp.Filter):
        return "aggregate FILTER"
    if isinstance(node, exp.WithinGroup):
        return "WITHIN GROUP"
    if isinstance(node, exp.Star) or (isinstance(node, exp.Column) and isinstance(node.this, exp.Star)):
        return "SELECT *"
    if isinstance(node, (exp.Cast, exp.TryCast)):
        return "CAST"
    if isinstance(node, (exp.Case, exp.If)):
        return "CASE"
    if isinstance(node, (exp.Placeholder, exp.Parameter)):
        return "query parameter"
    if isinstance(node, exp.Literal):
        return "constant"
    if isinstance(node, exp.Func):
        return f"function {_function_name(node)}"
    if isinstance(node, (exp.Binary, exp.Unary)):
        return f"operator {node.key.upper()}"
    return node.key.upper()


def _unparen(node: exp.Expression) -> exp.Expression:
    while isinstance(node, exp.Paren):
        node = node.this
    return node


def _ident(name: str) -> exp.Identifier:
    return exp.to_identifier(name, quoted=True)


def _canonical_number(text: str) -> str | None:
    try:
        d = Decimal(text)
    except InvalidOperation:
        return None
    if not d.is_finite() or abs(d.adjusted()) > 30:
        return None
    return format(d, "f")


# ---------------------------------------------------------------------------------------------
# The checker


@dataclass
class _Table:
    kind: str                 # "dataset" | "upload"
    name: str                 # dataset code or upload name
    columns: dict[str, str]   # lower-case name -> catalog / upload spelling
    qualifiers: set[str]      # how a column may name this table (lower case)
    alias: str                # our alias in the regenerated SQL
    view: str
    types: Mapping[str, str] = dc_field(default_factory=dict)   # upload column -> its declared type


@dataclass
class _Item:
    """One SELECT item, checked."""

    output: str
    node: exp.Expression                  # the rebuilt expression (without its alias)
    column: ColumnRef | None = None       # a bare column (or a truncated date, with `unit`)
    unit: str | None = None               # DATE_TRUNC unit of a group key
    aggregate: tuple[str, ColumnRef | None, float | None] | None = None


class _Checker:
    def __init__(self, grants: Grants, datasets: Iterable[DatasetInfo] | Mapping[str, DatasetInfo],
                 uploads: UploadSchemas | None) -> None:
        infos = datasets.values() if isinstance(datasets, Mapping) else datasets
        self.datasets = {d.code.lower(): d for d in infos}
        self.grants = {(d, f): {str(u) for u in us} for (d, f), us in grants.items()}
        self.uploads = {name.lower(): (name, dict(cols)) for name, cols in (uploads or {}).items()}
        self.problems: list[Problem] = []
        self._seen: set[tuple] = set()
        self.uses: set[tuple[str, str, str]] = set()
        self.kind = "rows"
        self.dataset: _Table | None = None
        self.upload: _Table | None = None
        self.filters: list[ColumnRef] = []

    # -- problems ---------------------------------------------------------------------------
    def refuse(self, construct: str, message: str, message_zh: str, *, dataset: str | None = None,
               field: str | None = None, usage: str | None = None) -> None:
        key = ("grant", dataset, field, usage) if usage else ("other", construct, message)
        if key not in self._seen:
            self._seen.add(key)
            self.problems.append(Problem(construct, message, message_zh, dataset, field, usage))

    def refuse_node(self, node: exp.Expression, where: str, where_zh: str) -> None:
        what = _construct(node)
        hints = {
            "subquery": ("subqueries are not supported", "不支持子查询"),
            "window function": ("window functions are not supported", "不支持窗口函数"),
            "SELECT *": ("SELECT * is not supported: name the fields you may use", "不支持 SELECT *：请列出可用的字段"),
        }
        en, zh = hints.get(what, (f"{what} is not supported", f"不支持 {what}"))
        self.refuse(what, f"{en} (in {where})", f"{zh}（位于 {where_zh}）")

    def fail(self) -> QueryRefused:
        if not self.problems:   # every refusal path names its problem; this is the safety net
            self.refuse("query", "the query could not be checked", "无法检查该查询")
        return QueryRefused(self.problems)

    # -- the one place a column use meets the data list ----------------------------------------
    def use(self, ref: ColumnRef, place: Place, clause: str | None = None) -> bool:
        """Check one use of a column at a place; record it. False (with a problem) if refused."""
        where_en, where_zh = PLACE_TEXT[place]
        if clause:
            where_en, where_zh = clause, clause
        construct = f"column {ref} in {where_en}"
        if ref.upload:
            if place is Place.join_on:
                return True
            if self.kind == "rows":
                self.refuse(construct, f"{ref}: a row-level query may use the upload only to join; its columns "
                            "would tie your own records to the dataset's rows",
                            f"{ref}：逐行查询中上传表只能用于关联，其字段会把自有记录与数据集的行对应起来")
                return False
            if place in (Place.aggregate, Place.count_distinct):
                self.refuse(construct, f"{ref} cannot be aggregated: an uploaded column has no catalog bounds to "
                            "bound its contribution",
                            f"{ref} 不能参与聚合：上传表的字段没有数据目录中的取值范围，无法限定其贡献")
                return False
            return True   # the tenant's own column: group key or filter
        usage = required_usage(place).value
        if usage not in self.grants.get((ref.table, ref.field), set()):
            self.refuse(construct,
                        f"{ref} in {where_en} needs the usage '{usage}', which this scene's data list does not grant",
                        f"{ref} 用于 {where_zh} 需要“{USAGE_ZH[usage]}”（{usage}）授权，本场景数据清单未授予",
                        dataset=ref.table, field=ref.field, usage=usage)
            return False
        self.uses.add((ref.table, ref.field, usage))
        return True

    # -- tables ---------------------------------------------------------------------------------
    def table(self, node: exp.Expression, role: str) -> _Table | None:
        place_en, place_zh = ("FROM", "FROM") if role == "dataset" else ("JOIN", "JOIN")
        if not isinstance(node, exp.Table):
            self.refuse_node(node, place_en, place_zh)
            return None
        if not isinstance(node.this, exp.Identifier):
            name = _function_name(node.this) if isinstance(node.this, exp.Func) else node.this.key.upper()
            self.refuse(f"table function {name}", f"table functions such as {name} are not supported: read a "
                        "dataset of this scene by its code", f"不支持 {name} 等表函数：请按代码读取本场景的数据集")
            return None
        extra = [k for k, v in node.args.items() if v and k not in ("this", "db", "alias")]
        if extra:
            what = extra[0].rstrip("_").upper()
            self.refuse(f"table {what}", f"{what} on a table is not supported", f"不支持对表使用 {what}")
            return None
        alias = None
        if node.args.get("alias") is not None:
            ta = node.args["alias"]
            if ta.args.get("columns") or not isinstance(ta.this, exp.Identifier):
                self.refuse("table alias with columns", "a table alias may not rename columns", "表别名不能重命名列")
                return None
            alias = ta.this.name.lower()
        name = node.this.name
        db = node.args.get("db")
        written = f"{db.name}.{name}" if isinstance(db, exp.Identifier) else name
        if isinstance(db, exp.Identifier):
            written = written.lower()
            info = self.datasets.get(written)
            if info is None:
                self.refuse(f"table {written}", f"{written} is not a dataset of this scene",
                            f"{written} 不是本场景的数据集", dataset=written)
                return None
            if role != "dataset":
                self.refuse(f"JOIN {info.code}", "a query reads one dataset; JOIN only the tenant's own uploads",
                            "一个查询只读取一个数据集；JOIN 只能关联本企业上传的数据")
                return None
            quals = {alias} if alias else {name.lower(), info.code.lower()}
            return _Table("dataset", info.code, {f.lower(): f for f in info.fields}, quals, DATASET_ALIAS,
                          view_name(info.code))
        up = self.uploads.get(name.lower())
        if up is None:
            hint_en = hint_zh = ""
            matches = [c for c in self.datasets if c.split(".", 1)[1] == name.lower()]
            if len(matches) == 1:
                hint_en, hint_zh = f" (did you mean {matches[0]}?)", f"（是否指 {matches[0]}？）"
            self.refuse(f"table {name}", f"{name} is neither a dataset of this scene nor one of your uploads{hint_en}",
                        f"{name} 既不是本场景的数据集，也不是本企业的上传数据{hint_zh}")
            return None
        if role != "upload":
            self.refuse(f"FROM {name}", "FROM must name a dataset; JOIN your upload to it",
                        "FROM 必须是数据集；请用 JOIN 关联上传数据")
            return None
        uname, cols = up
        quals = {alias} if alias else {uname.lower()}
        return _Table("upload", uname, {c.lower(): c for c in cols}, quals, UPLOAD_ALIAS, upload_view_name(uname),
                      types=dict(cols))

    def from_node(self, t: _Table) -> exp.Table:
        return exp.Table(this=_ident(t.view), alias=exp.TableAlias(this=_ident(t.alias)))

    # -- columns --------------------------------------------------------------------------------
    def resolve(self, col: exp.Column, where: str) -> ColumnRef | None:
        if not isinstance(col.this, exp.Identifier):
            self.refuse_node(col, where, where)
            return None
        name = col.this.name.lower()
        parts = [col.args.get(k) for k in ("catalog", "db", "table")]
        qualifier = ".".join(p.name for p in parts if p is not None).lower()
        tables = [t for t in (self.dataset, self.upload) if t is not None]
        if qualifier:
            tables = [t for t in tables if qualifier in t.qualifiers]
            if not tables:
                self.refuse(f"column {qualifier}.{name} in {where}", f"{qualifier} is not a table of this query",
                            f"{qualifier} 不是本查询中的表")
                return None
        found = [t for t in tables if name in t.columns]
        if len(found) > 1:
            self.refuse(f"column {name} in {where}", f"column {name} is ambiguous: qualify it with its table",
                        f"列 {name} 有歧义：请加上表名")
            return None
        if not found:
            owner = " or ".join(t.name for t in tables)
            self.refuse(f"column {name} in {where}", f"{name} is not a field of {owner}", f"{name} 不是 {owner} 的字段")
            return None
        t = found[0]
        return ColumnRef(t.name, t.columns[name], upload=t.kind == "upload")

    def column_node(self, ref: ColumnRef) -> exp.Column:
        alias = UPLOAD_ALIAS if ref.upload else DATASET_ALIAS
        return exp.Column(this=_ident(ref.field), table=_ident(alias))

    def column_use(self, node: exp.Expression, place: Place, clause: str | None = None) -> ColumnRef | None:
        where_en, _ = PLACE_TEXT[place]
        ref = self.resolve(node, clause or where_en)
        if ref is None or not self.use(ref, place, clause):
            return None
        return ref

    def truncation(self, node: exp.Expression, place: Place) -> tuple[ColumnRef, str] | None:
        """`DATE_TRUNC('year' | 'quarter' | 'month', <date field>)` as a group key: its field and unit."""
        unit = node.args.get("unit")
        unit_name = unit.name.lower() if isinstance(unit, (exp.Var, exp.Literal)) else ""
        arg = _unparen(node.this) if node.this is not None else None
        if unit_name not in TRUNC_UNITS or not isinstance(arg, exp.Column):
            self.refuse("DATE_TRUNC", "DATE_TRUNC takes a unit ('year', 'quarter' or 'month') and one date field",
                        "DATE_TRUNC 只接受单位（'year'、'quarter' 或 'month'）和一个日期字段")
            return None
        ref = self.column_use(arg, place, clause="DATE_TRUNC" if place is not Place.group_by else None)
        return (ref, unit_name) if ref is not None else None

    def key_node(self, ref: ColumnRef, unit: str | None) -> exp.Expression:
        col = self.column_node(ref)
        return exp.TimestampTrunc(this=col, unit=exp.Var(this=unit.upper())) if unit else col

    # -- literals -------------------------------------------------------------------------------
    def literal(self, node: exp.Expression, where: str) -> exp.Expression | None:
        node = _unparen(node)
        if type(node) is exp.Literal and node.is_string:
            value = node.this
            if len(value) > MAX_STRING_CHARS:
                self.refuse("string literal", f"a string literal is longer than {MAX_STRING_CHARS} characters",
                            f"字符串常量超过 {MAX_STRING_CHARS} 个字符")
                return None
            return exp.Literal.string(value)
        if type(node) is exp.Literal:
            return self.number(node.this)
        if type(node) is exp.Neg and type(node.this) is exp.Literal and not node.this.is_string:
            n = self.number(node.this.this)
            return exp.Neg(this=n) if n is not None else None
        if type(node) is exp.Boolean:
            return exp.Boolean(this=bool(node.this))
        if type(node) is exp.Cast and type(node.this) is exp.Literal and node.this.is_string \
                and not any(v for k, v in node.args.items() if k not in ("this", "to", "_type")):
            for kind, parse in (("DATE", dt.date.fromisoformat), ("TIMESTAMP", dt.datetime.fromisoformat)):
                if node.to.is_type(kind, "TIMESTAMPNTZ" if kind == "TIMESTAMP" else kind):
                    try:
                        value = parse(node.this.this)
                    except ValueError:
                        self.refuse(f"{kind} literal", f"'{node.this.this}' is not a valid {kind.lower()} "
                                    "(YYYY-MM-DD)", f"“{node.this.this}”不是有效的日期（YYYY-MM-DD）")
                        return None
                    text = value.isoformat() if kind == "DATE" else value.isoformat(sep=" ")
                    return exp.Cast(this=exp.Literal.string(text), to=exp.DataType.build(kind))
        if isinstance(node, exp.Null):
            self.refuse("NULL comparison", "a comparison with NULL is never true: use IS [NOT] NULL",
                        "与 NULL 比较永远不成立：请使用 IS [NOT] NULL")
            return None
        self.refuse_node(node, where, where)
        return None

    def number(self, text: str) -> exp.Literal | None:
        canon = _canonical_number(text)
        if canon is None:
            self.refuse("number literal", f"{text} is not a number in range", f"{text} 不是有效范围内的数字")
            return None
        return exp.Literal.number(canon)

    # -- aggregates -----------------------------------------------------------------------------
    def aggregate(self, node: exp.Expression) -> tuple[tuple[str, ColumnRef | None, float | None],
                                                       exp.Expression] | None:
        """Check an aggregate call; answer its (function, column, q) and the rebuilt call."""
        name = _function_name(node)
        if type(node) is exp.Count:
            arg = node.this
            if node.args.get("expressions"):
                self.refuse("COUNT", "COUNT takes one argument", "COUNT 只接受一个参数")
                return None
            if isinstance(arg, exp.Star):
                return ("count", None, None), exp.Count(this=exp.Star())
            if isinstance(arg, exp.Distinct) and len(arg.expressions) == 1 and not arg.args.get("on") \
                    and isinstance(_unparen(arg.expressions[0]), exp.Column):
                ref = self.resolve(_unparen(arg.expressions[0]), "COUNT(DISTINCT)")
                if ref is None:
                    return None
                unit = self.dataset and not ref.upload and ref.field == self.datasets[ref.table.lower()].privacy_unit
                if not unit:
                    self.refuse(f"COUNT(DISTINCT {ref.field})",
                                f"COUNT(DISTINCT …) counts persons only: {ref} is not the privacy unit",
                                f"COUNT(DISTINCT …) 只能统计人数：{ref} 不是隐私单位")
                    return None
                if not self.use(ref, Place.count_distinct):
                    return None
                return ("count_distinct", ref, None), exp.Count(this=exp.Distinct(expressions=[self.column_node(ref)]))
            shown = "" if arg is None else arg.name if isinstance(arg, exp.Column) else _construct(arg)
            self.refuse(f"COUNT({shown})",
                        "only COUNT(*) and COUNT(DISTINCT <privacy unit>) are supported; to count non-empty values "
                        "write COUNT(*) with WHERE field IS NOT NULL",
                        "只支持 COUNT(*) 和 COUNT(DISTINCT <隐私单位>)；统计非空值请用 COUNT(*) 加 WHERE 字段 IS NOT NULL")
            return None
        kinds = {exp.Sum: ("sum", exp.Sum), exp.Avg: ("avg", exp.Avg), exp.Median: ("median", exp.Median),
                 exp.PercentileCont: ("quantile", exp.PercentileCont)}
        if type(node) not in kinds:
            en = f"{name} is not a supported aggregate; use {_AGGREGATES}"
            zh = f"不支持聚合函数 {name}；可用：{_AGGREGATES_ZH}"
            if isinstance(node, (exp.Quantile, exp.PercentileDisc)):
                en += " (write QUANTILE_CONT(field, q))"
                zh += "（请写 QUANTILE_CONT(字段, q)）"
            self.refuse(f"function {name}", en, zh)
            return None
        function, cls = kinds[type(node)]
        arg = _unparen(node.this)
        if not isinstance(arg, exp.Column):
            what = "DISTINCT" if isinstance(arg, exp.Distinct) else _construct(arg)
            self.refuse(f"{what} inside {name}", f"{name} takes one field, not {what}",
                        f"{name} 只接受一个字段，不接受 {what}")
            return None
        q: float | None = 0.5 if function == "median" else None
        q_node = None
        if function == "quantile":
            ql = node.args.get("expression")
            canon = (_canonical_number(ql.this) if type(ql) is exp.Literal and not ql.is_string else None)
            if canon is None or not 0 <= Decimal(canon) <= 1:
                self.refuse(f"{name} quantile", f"{name} needs a literal quantile between 0 and 1",
                            f"{name} 需要 0 到 1 之间的常量分位数")
                return None
            q, q_node = float(canon), exp.Literal.number(canon)
        ref = self.column_use(arg, Place.aggregate, clause=name)
        if ref is None:
            return None
        col = self.column_node(ref)
        rebuilt = cls(this=col, expression=q_node) if q_node is not None else cls(this=col)
        return (function, ref, q), rebuilt

    # -- WHERE ----------------------------------------------------------------------------------
    def where_column(self, node: exp.Expression) -> tuple[exp.Expression, ColumnRef] | None:
        ref = self.column_use(_unparen(node), Place.where)
        if ref is None:
            return None
        self.filters.append(ref)
        return self.column_node(ref), ref

    def field_type(self, ref: ColumnRef) -> str | None:
        """A dataset field's catalog type, or an upload column's declared type (None: unknown)."""
        if ref.upload:
            table = self.upload if self.upload is not None and self.upload.name == ref.table else None
            return table.types.get(ref.field) if table is not None else None
        info = self.datasets.get(ref.table.lower())
        return (info.types or {}).get(ref.field) if info is not None else None

    def typed_literal(self, ref: ColumnRef, node: exp.Expression, where: str) -> exp.Expression | None:
        """A literal compared with `ref`, of the column's own type (a date may be written as
        'YYYY-MM-DD'); anything else is refused before the engine could cast the column. A column
        of unknown type is never compared: the engine would pick a cast, and whether that cast
        fails on some row would depend on the data (an oracle on a failing prod run)."""
        node = _unparen(node)
        lit = self.literal(node, where)
        if lit is None:
            return None
        ftype = self.field_type(ref)
        if ftype not in _LITERAL_KIND:
            self.refuse(f"literal for {ref}", f"{ref} has no known type to compare a literal with",
                        f"{ref} 没有已知类型，不能与常量比较")
            return None
        if type(lit) is exp.Literal and lit.is_string:
            kind = "string"
        elif type(lit) in (exp.Literal, exp.Neg):
            kind = "number"
        elif type(lit) is exp.Boolean:
            kind = "boolean"
        else:
            kind = "date"
        want = _LITERAL_KIND[ftype]
        if want == "date" and kind == "string":   # '2024-01-01' for a date field: read as a date
            try:
                value = dt.date.fromisoformat(lit.this) if ftype == "date" else dt.datetime.fromisoformat(lit.this)
            except ValueError:
                value = None
            if value is not None:
                kind_name = "DATE" if ftype == "date" else "TIMESTAMP"
                text = value.isoformat() if ftype == "date" else value.isoformat(sep=" ")
                return exp.Cast(this=exp.Literal.string(text), to=exp.DataType.build(kind_name))
        if want is not None and kind != want:
            shown = {"string": "text in quotes", "number": "a number", "date": "DATE 'YYYY-MM-DD'",
                     "boolean": "TRUE or FALSE"}
            shown_zh = {"string": "加引号的文本", "number": "数字", "date": "DATE 'YYYY-MM-DD'", "boolean": "TRUE 或 FALSE"}
            self.refuse(f"{kind} literal for {ref}", f"{ref} is a {ftype} field: compare it with {shown[want]}, "
                        f"not {shown[kind]}", f"{ref} 是 {ftype} 类型字段：只能与{shown_zh[want]}比较，不能与{shown_zh[kind]}比较")
            return None
        if kind == "number":
            return self.number_of_type(ref, ftype, lit)
        return lit

    def number_of_type(self, ref: ColumnRef, ftype: str, lit: exp.Expression) -> exp.Expression | None:
        """A number literal cast to the column's own storage type when that type holds it exactly,
        else to DOUBLE (into which every number column widens without loss of range): either way the
        engine never narrows the column. (0.1000…01 beside DECIMAL(18,2) money made DuckDB cast the
        column to DECIMAL(38,37), which fails on any row ≥ 10: a failure that depended on the data.)"""
        negative = type(lit) is exp.Neg
        value = Decimal(lit.this.this if negative else lit.this)
        value = -value if negative else value
        storage, places, limit = NUMBER_TYPES[ftype]
        if abs(value) > Decimal("1e300"):
            self.refuse(f"number literal for {ref}", f"{value:g} is too large to compare with {ref}",
                        f"{value:g} 过大，不能与 {ref} 比较")
            return None
        fits = abs(value) <= limit and (places is None or value == value.quantize(Decimal(1).scaleb(-places)))
        if not fits or ftype == "float":
            return exp.Cast(this=exp.Literal.number(repr(float(value))), to=exp.DataType.build("DOUBLE"))
        text = str(int(value)) if places == 0 else format(value.quantize(Decimal(1).scaleb(-places)), "f")
        return exp.Cast(this=exp.Literal.number(text), to=exp.DataType.build(storage))

    def comparison(self, a: exp.Expression, b: exp.Expression, op: str) -> tuple[exp.Expression, exp.Expression] | None:
        """`<field> op <literal>` (either way round), the literal of the field's type."""
        a, b = _unparen(a), _unparen(b)
        columns = [isinstance(x, exp.Column) for x in (a, b)]
        if all(columns):
            self.refuse(f"field {op} field", "a condition compares a field with a literal, not with another field",
                        "条件只能把字段与常量比较，不能与另一个字段比较")
            return None
        if not any(columns):
            odd = [x for x in (a, b) if not isinstance(x, (exp.Literal, exp.Neg, exp.Boolean, exp.Cast, exp.Null))]
            if odd:   # a function or an expression: name it as such
                self.refuse_node(odd[0], "WHERE", "WHERE")
                return None
            self.refuse(f"literal {op} literal", "a condition must compare a field with a literal",
                        "条件必须把字段与常量比较")
            return None
        col_node, lit_node = (a, b) if columns[0] else (b, a)
        got = self.where_column(col_node)
        if got is None:
            return None
        col, ref = got
        lit = self.typed_literal(ref, lit_node, op)
        if lit is None:
            return None
        return (col, lit) if columns[0] else (lit, col)

    def condition(self, node: exp.Expression) -> exp.Expression | None:
        node = _unparen(node)
        if type(node) in (exp.And, exp.Or):
            left, right = self.condition(node.this), self.condition(node.expression)
            if left is None or right is None:
                return None
            # Parenthesize a child connective of the other kind, so precedence never depends on
            # how the tree happens to print.
            def wrap(e: exp.Expression) -> exp.Expression:
                return exp.Paren(this=e) if isinstance(e, (exp.And, exp.Or)) and type(e) is not type(node) else e
            return type(node)(this=wrap(left), expression=wrap(right))
        if type(node) is exp.Not:
            inner = self.condition(node.this)
            return exp.Not(this=exp.Paren(this=inner)) if inner is not None else None
        if type(node) in _COMPARISONS:
            pair = self.comparison(node.this, node.expression, node.key.upper())
            if pair is None:
                return None
            return _COMPARISONS[type(node)](this=pair[0], expression=pair[1])
        if type(node) is exp.In:
            extra = [k for k in ("query", "unnest", "field", "is_global") if node.args.get(k)]
            if extra:
                what = "subquery" if extra[0] == "query" else f"IN {extra[0].upper()}"
                self.refuse(what, f"IN takes a list of literals, not a {what}", f"IN 只接受常量列表，不接受 {what}")
                return None
            if not isinstance(_unparen(node.this), exp.Column):
                self.refuse_node(_unparen(node.this), "IN", "IN")
                return None
            if not node.expressions:
                self.refuse("IN ()", "IN needs at least one value", "IN 至少需要一个值")
                return None
            got = self.where_column(node.this)
            if got is None:
                return None
            values = [self.typed_literal(got[1], v, "IN") for v in node.expressions]
            if any(v is None for v in values):
                return None
            return exp.In(this=got[0], expressions=values)
        if type(node) is exp.Between:
            if node.args.get("symmetric"):
                self.refuse("BETWEEN SYMMETRIC", "BETWEEN SYMMETRIC is not supported", "不支持 BETWEEN SYMMETRIC")
                return None
            if not isinstance(_unparen(node.this), exp.Column):
                self.refuse_node(_unparen(node.this), "BETWEEN", "BETWEEN")
                return None
            got = self.where_column(node.this)
            if got is None:
                return None
            low, high = (self.typed_literal(got[1], node.args[k], "BETWEEN") for k in ("low", "high"))
            if low is None or high is None:
                return None
            return exp.Between(this=got[0], low=low, high=high)
        if type(node) is exp.Is and isinstance(node.expression, exp.Null) and not node.args.get("negate") \
                and isinstance(_unparen(node.this), exp.Column):
            got = self.where_column(node.this)
            return exp.Is(this=got[0], expression=exp.Null()) if got is not None else None
        if isinstance(node, exp.Column):
            self.refuse("bare column in WHERE", "a condition must compare a field (=, <>, <, <=, >, >=, IN, BETWEEN, "
                        "IS NULL)", "条件必须对字段进行比较（=、<>、<、<=、>、>=、IN、BETWEEN、IS NULL）")
            return None
        self.refuse_node(node, "WHERE", "WHERE")
        return None

    # -- the query ------------------------------------------------------------------------------
    def check(self, select: exp.Select) -> CheckedQuery:
        for key, value in select.args.items():
            if value and key not in _SELECT_ARGS:
                construct, en, zh = _CLAUSES.get(key, (key.rstrip("_").upper(), f"{key.rstrip('_').upper()} is not "
                                                       "supported", f"不支持 {key.rstrip('_').upper()}"))
                self.refuse(construct, en, zh)

        # FROM one dataset, optionally JOIN one upload
        frm = select.args.get("from_")
        if frm is None:
            self.refuse("FROM", "a query reads FROM one dataset of this scene", "查询必须 FROM 本场景的一个数据集")
            raise self.fail()
        self.dataset = self.table(frm.this, "dataset")
        joins = select.args.get("joins") or []
        join_node = None
        if len(joins) > 1:
            self.refuse("more than one JOIN", "a query may JOIN one of your uploads, once", "一个查询只能关联一个上传表")
        elif joins:
            join_node = joins[0]
            how = " ".join(str(join_node.args[k]).upper() for k in ("method", "side", "kind") if join_node.args.get(k))
            odd = [k for k, v in join_node.args.items() if v and k not in ("this", "on", "kind")]
            if odd or how not in ("", "INNER") or join_node.args.get("on") is None:
                what = f"{how} JOIN" if how else "JOIN without ON"
                if join_node.args.get("using"):
                    what = "JOIN USING"
                self.refuse(what, "only [INNER] JOIN <upload> ON <dataset join key> = <upload column> is supported",
                            "只支持 [INNER] JOIN <上传表> ON <数据集关联键> = <上传表字段>")
            else:
                self.upload = self.table(join_node.this, "upload")
        if self.problems:
            raise self.fail()
        assert self.dataset is not None

        join_plan, join_on = None, None
        if self.upload is not None:
            join_plan, join_on = self.join_condition(join_node.args["on"])

        items = select.expressions
        aggregates = select.args.get("group") or any(i.find(exp.AggFunc) for i in items)
        self.kind = "aggregate" if aggregates else "rows"

        checked = [self.select_item(i) for i in items]
        outputs = [c for c in checked if c is not None]
        seen: dict[str, str] = {}
        for c in outputs:
            if c.output.lower() in seen:
                self.refuse(f"output {c.output}", f"two outputs are named {c.output}: give one an alias (AS)",
                            f"两个输出列都叫 {c.output}：请用 AS 起别名")
            seen[c.output.lower()] = c.output

        group_refs: list[tuple[ColumnRef, str | None]] = []
        group_complete = True
        group = select.args.get("group")
        if group is not None:
            group_refs, group_complete = self.group_by(group, items, outputs)
        if self.kind == "aggregate" and group_complete:
            if not any(c.aggregate for c in outputs) and len(outputs) == len(checked):
                self.refuse("GROUP BY without aggregate", "an aggregate query needs at least one aggregate: "
                            f"{_AGGREGATES}", f"聚合查询至少需要一个聚合函数：{_AGGREGATES_ZH}")
            for c in outputs:
                if c.column is not None and (c.column, c.unit) not in group_refs:
                    self.refuse(f"column {c.column} in SELECT without GROUP BY",
                                f"{c.column} is output beside aggregates but is not in GROUP BY",
                                f"{c.column} 与聚合函数一起输出，但不在 GROUP BY 中")

        where_node = None
        if select.args.get("where") is not None:
            where_node = self.condition(select.args["where"].this)

        order = self.order_by(select.args["order"], outputs) if select.args.get("order") else []
        limit = self.limit(select.args["limit"]) if select.args.get("limit") else None

        # Every clause that was written must have been rebuilt: nothing is dropped silently.
        written = [select.args.get(k) is not None for k in ("where", "group", "order", "limit")]
        rebuilt = [where_node is not None, bool(group_refs), bool(order), limit is not None]
        if self.problems or len(outputs) != len(checked) or written != rebuilt \
                or (join_node is not None and join_on is None):
            raise self.fail()

        tree = exp.Select(expressions=[exp.Alias(this=c.node, alias=_ident(c.output)) for c in outputs])
        tree.set("from_", exp.From(this=self.from_node(self.dataset)))
        if self.upload is not None:
            tree.set("joins", [exp.Join(this=self.from_node(self.upload), on=join_on)])
        if where_node is not None:
            tree.set("where", exp.Where(this=where_node))
        if group_refs:
            tree.set("group", exp.Group(expressions=[self.key_node(r, u) for r, u in group_refs]))
        if order:
            tree.set("order", exp.Order(expressions=[
                exp.Ordered(this=exp.Column(this=_ident(o.output)), desc=o.descending, nulls_first=o.nulls_first)
                for o in order]))
        if limit is not None:
            tree.set("limit", exp.Limit(expression=exp.Literal.number(limit)))

        out_of = {(c.column, c.unit): c.output for c in outputs if c.column is not None}
        return CheckedQuery(
            kind=self.kind,
            dataset=self.dataset.name,
            view=self.dataset.view,
            join=join_plan,
            outputs=tuple(c.output for c in outputs),
            group_keys=tuple(GroupKey(r, out_of.get((r, u)), u) for r, u in group_refs),
            aggregates=tuple(Aggregate(c.aggregate[0], c.aggregate[1], c.aggregate[2], c.output)
                             for c in outputs if c.aggregate),
            masked=tuple(MaskedOutput(c.column, c.output) for c in outputs
                         if self.kind == "rows" and c.column is not None),
            filters=tuple(dict.fromkeys(self.filters)),
            where=where_node.sql(dialect=DIALECT, identify=True, comments=False) if where_node is not None else None,
            order_by=tuple(order),
            limit=limit,
            uses=frozenset(self.uses),
            sql=tree.sql(dialect=DIALECT, identify=True, comments=False),
            tree=tree,
        )

    def join_condition(self, on: exp.Expression) -> tuple[JoinPlan | None, exp.Expression | None]:
        on = _unparen(on)
        sides = [_unparen(on.this), _unparen(on.expression)] if type(on) is exp.EQ else []
        if len(sides) != 2 or not all(isinstance(s, exp.Column) for s in sides):
            self.refuse("JOIN ON", "JOIN ON must be one equality: <dataset join key> = <upload column>",
                        "JOIN ON 只能是一个等式：<数据集关联键> = <上传表字段>")
            return None, None
        refs = [self.resolve(s, "JOIN ON") for s in sides]
        if any(r is None for r in refs):
            return None, None
        ds = [r for r in refs if not r.upload]
        up = [r for r in refs if r.upload]
        if len(ds) != 1 or len(up) != 1:
            self.refuse("JOIN ON", "JOIN ON must compare one dataset field with one upload column",
                        "JOIN ON 必须把一个数据集字段与一个上传表字段比较")
            return None, None
        if not self.use(ds[0], Place.join_on):
            return None, None
        return (JoinPlan(up[0].table, ds[0].field, up[0].field),
                exp.EQ(this=self.column_node(ds[0]), expression=self.column_node(up[0])))

    def alias_name(self, ident: exp.Expression) -> str | None:
        name = ident.name if isinstance(ident, exp.Identifier) else None
        if not name or len(name) > MAX_ALIAS_CHARS or any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
            self.refuse("alias", f"an alias must be 1 to {MAX_ALIAS_CHARS} printable characters",
                        f"别名必须是 1 到 {MAX_ALIAS_CHARS} 个可打印字符")
            return None
        return name

    def select_item(self, item: exp.Expression) -> _Item | None:
        alias = None
        if isinstance(item, exp.Alias):
            alias = self.alias_name(item.args.get("alias"))
            if alias is None:
                return None
            item = item.this
        node = _unparen(item)
        if isinstance(node, exp.Column) and isinstance(node.this, exp.Identifier):
            # In an aggregate query a bare column is a group key (that it is in GROUP BY is checked
            # once GROUP BY is read); in a rows query it is a masked output.
            ref = self.resolve(node, "SELECT")
            if ref is None:
                return None
            ok = self.use(ref, Place.select_key if self.kind == "aggregate" else Place.select_row)
            if not ok and self.kind == "rows":
                return None
            return _Item(alias or ref.field, self.column_node(ref), column=ref)
        if isinstance(node, _TRUNCS) and self.kind == "aggregate":
            key = self.truncation(node, Place.select_key)
            if key is None:
                return None
            ref, unit = key
            return _Item(alias or f"{ref.field}_{unit}", self.key_node(ref, unit), column=ref, unit=unit)
        if isinstance(node, exp.AggFunc):
            got = self.aggregate(node)
            if got is None:
                return None
            (function, ref, q), rebuilt = got
            return _Item(alias or _default_name(function, ref, q), rebuilt, aggregate=(function, ref, q))
        self.refuse_node(node, "SELECT", "SELECT")
        return None

    def group_by(self, group: exp.Group, items: list[exp.Expression],
                 outputs: list[_Item]) -> tuple[list[tuple[ColumnRef, str | None]], bool]:
        """The group keys, and whether every key was understood."""
        odd = [k for k, v in group.args.items() if v and k != "expressions"]
        if odd:
            what = "GROUP BY " + odd[0].rstrip("_").upper().replace("_", " ")
            self.refuse(what, f"{what} is not supported: list the group keys", f"不支持 {what}：请列出分组键")
            return [], False
        by_alias = {c.output.lower(): c for c in outputs}
        refs: list[tuple[ColumnRef, str | None]] = []
        complete = True   # every key understood: only then is "not in GROUP BY" worth saying
        for key in group.expressions:
            key = _unparen(key)
            target: exp.Expression = key
            if type(key) is exp.Literal and not key.is_string and key.this.isdigit():
                n = int(key.this)
                if not 1 <= n <= len(items):
                    self.refuse(f"GROUP BY {n}", f"GROUP BY {n}: there is no output {n}", f"GROUP BY {n}：没有第 {n} 个输出列")
                    complete = False
                    continue
                target = _unparen(items[n - 1].this if isinstance(items[n - 1], exp.Alias) else items[n - 1])
            elif isinstance(key, exp.Column) and not key.table and key.name.lower() in by_alias \
                    and not any(key.name.lower() in t.columns for t in (self.dataset, self.upload) if t):
                c = by_alias[key.name.lower()]
                if c.column is None:
                    self.refuse("GROUP BY an aggregate", "GROUP BY cannot name an aggregate", "GROUP BY 不能引用聚合值")
                    complete = False
                    continue
                if (c.column, c.unit) not in refs:
                    refs.append((c.column, c.unit))
                continue
            if isinstance(target, _TRUNCS):
                key_ = self.truncation(target, Place.group_by)
                if key_ is None:
                    complete = False
                elif key_ not in refs:
                    refs.append(key_)
                continue
            if not isinstance(target, exp.Column):
                complete = False
                if isinstance(target, (exp.Rollup, exp.Cube, exp.GroupingSets)):
                    what = f"GROUP BY {target.key.upper().replace('GROUPINGSETS', 'GROUPING SETS')}"
                    self.refuse(what, f"{what} is not supported: list the group keys", f"不支持 {what}：请列出分组键")
                elif isinstance(target, exp.AggFunc):
                    self.refuse("GROUP BY an aggregate", "GROUP BY cannot name an aggregate", "GROUP BY 不能引用聚合值")
                else:
                    self.refuse_node(target, "GROUP BY", "GROUP BY")
                continue
            ref = self.column_use(target, Place.group_by)
            if ref is None:
                complete = False
            elif (ref, None) not in refs:
                refs.append((ref, None))
        return refs, complete

    def order_by(self, order: exp.Order, outputs: list[_Item]) -> list[OrderItem]:
        if self.kind == "rows":
            self.refuse("ORDER BY in a row-level query", "a row-level query cannot be ordered: its fields are masked "
                        "after the query, and an order on raw values would reveal more than the masked values",
                        "逐行查询不能排序：字段在查询后才脱敏，按原始值排序会泄露比脱敏值更多的信息")
            return []
        if order.args.get("siblings"):
            self.refuse("ORDER SIBLINGS BY", "ORDER SIBLINGS BY is not supported", "不支持 ORDER SIBLINGS BY")
            return []
        by_alias = {c.output.lower(): c for c in outputs}
        result: list[OrderItem] = []
        for o in order.expressions:
            if not isinstance(o, exp.Ordered) or o.args.get("with_fill"):
                self.refuse("ORDER BY WITH FILL", "ORDER BY … WITH FILL is not supported", "不支持 ORDER BY … WITH FILL")
                continue
            key = _unparen(o.this)
            hit: _Item | None = None
            if type(key) is exp.Literal and not key.is_string and key.this.isdigit():
                n = int(key.this)
                hit = outputs[n - 1] if 1 <= n <= len(outputs) else None
            elif isinstance(key, exp.Column) and not key.table and key.name.lower() in by_alias:
                hit = by_alias[key.name.lower()]
            elif isinstance(key, exp.Column):
                ref = self.resolve(key, "ORDER BY")
                if ref is None:
                    continue
                hit = next((c for c in outputs if c.column == ref and c.unit is None), None)
            elif isinstance(key, exp.AggFunc):
                got = self.aggregate(key)
                if got is None:
                    continue
                hit = next((c for c in outputs if c.aggregate == got[0]), None)
            else:
                self.refuse_node(key, "ORDER BY", "ORDER BY")
                continue
            if hit is None:
                self.refuse("ORDER BY", "ORDER BY must name an output: a selected group key or an aggregate's alias",
                            "ORDER BY 必须引用输出列：已选择的分组键或聚合值的别名")
                continue
            result.append(OrderItem(hit.output, bool(o.args.get("desc")), bool(o.args.get("nulls_first"))))
        return result

    def limit(self, limit: exp.Expression) -> int | None:
        value = limit.args.get("expression")
        odd = [k for k, v in limit.args.items() if v and k != "expression"]
        if odd or not (type(value) is exp.Literal and not value.is_string and value.this.isdigit()):
            self.refuse("LIMIT", "LIMIT takes a whole number literal", "LIMIT 只接受整数常量")
            return None
        n = int(value.this)
        if n > MAX_LIMIT:
            self.refuse("LIMIT", f"LIMIT is at most {MAX_LIMIT}", f"LIMIT 最大为 {MAX_LIMIT}")
            return None
        return n


def _default_name(function: str, ref: ColumnRef | None, q: float | None) -> str:
    if ref is None:
        return "count"
    if function == "quantile":
        return f"quantile_{ref.field}_{format(Decimal(str(q)), 'f').replace('.', '_')}"
    return f"{function}_{ref.field}"


# ---------------------------------------------------------------------------------------------
# Entry points


def parse_statement(sql: str) -> exp.Select:
    """Parse exactly one SELECT statement (DuckDB dialect), or refuse."""
    def refuse(construct: str, en: str, zh: str) -> QueryRefused:
        return QueryRefused([Problem(construct, en, zh)])

    if len(sql) > MAX_SQL_CHARS:
        raise refuse("query text", f"the query is longer than {MAX_SQL_CHARS} characters",
                     f"查询超过 {MAX_SQL_CHARS} 个字符")
    try:
        statements = [s for s in sqlglot.parse(sql, dialect=DIALECT) if s is not None]
    except ParseError as e:
        err = e.errors[0] if e.errors else {}
        where = f"line {err.get('line')}, column {err.get('col')}: " if err.get("line") else ""
        desc = err.get("description") or str(e).splitlines()[0]
        raise refuse("syntax", f"the query does not parse: {where}{desc}",
                     f"查询无法解析：{where}{desc}") from None
    except TokenError as e:
        raise refuse("syntax", f"the query does not parse: {str(e).splitlines()[0]}",
                     f"查询无法解析：{str(e).splitlines()[0]}") from None
    except RecursionError:
        raise refuse("syntax", "the query is nested too deeply", "查询嵌套过深") from None
    if not statements:
        raise refuse("empty query", "the query is empty", "查询为空")
    if len(statements) > 1:
        raise refuse("more than one statement", f"send one statement, not {len(statements)}",
                     f"只能发送一条语句，而不是 {len(statements)} 条")
    stmt = statements[0]
    if isinstance(stmt, (exp.Union, exp.Intersect, exp.Except)):
        what = stmt.key.upper()
        raise refuse(what, f"{what} is not supported: send one SELECT", f"不支持 {what}：只能发送一条 SELECT")
    if isinstance(stmt, exp.Subquery):
        raise refuse("subquery", "subqueries are not supported", "不支持子查询")
    if not isinstance(stmt, exp.Select):
        what = f"statement {stmt.key.upper()}"
        raise refuse(what, f"only SELECT is accepted, not {stmt.key.upper()}", f"只接受 SELECT，不接受 {stmt.key.upper()}")
    return stmt


def check_query(sql: str, grants: Grants, datasets: Iterable[DatasetInfo] | Mapping[str, DatasetInfo],
                uploads: UploadSchemas | None = None) -> CheckedQuery:
    """Parse `sql`, check it against the scene's data list, and regenerate it; or raise QueryRefused.

    grants: (dataset code, field) -> usages the scene's effective items grant;
    datasets: the scene's datasets (code, fields, privacy unit);
    uploads: the tenant's own uploads that may be joined, name -> {column: declared type}.
    """
    statement = parse_statement(sql)
    try:
        return _Checker(grants, datasets, uploads).check(statement)
    except RecursionError:
        raise QueryRefused([Problem("syntax", "the query is nested too deeply", "查询嵌套过深")]) from None
