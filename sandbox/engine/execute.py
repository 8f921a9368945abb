"""The query engine: run one checked query on one snapshot inside the domain, and answer with
differentially private aggregates or masked rows — never with raw cells.

Issue 4, items 2, 3 and 5. The input is a `CheckedQuery` (sandbox.engine.sql: parsed, checked against the
scene's data list, regenerated) and the catalog facts of its dataset (`DatasetMeta`: types, public
value domains, bounds, masking). Nothing here reads user text.

Aggregate queries, in order:

1. **Group cells from public domains.** Every group key needs a public value domain: a category
   field's `domain`, a boolean, an integer or date field with catalog bounds (a date by day, or
   `DATE_TRUNC` to month, quarter or year), plus NULL when the field is nullable. The answer has
   one row per cell of the product, in a fixed order, zero cells included, so which groups exist
   says nothing about the data. (Fields without a public domain are refused as group keys.)
2. **Bounded, clamped aggregates in DuckDB.** Each person keeps at most k rows (`rank <= k` on the
   rank the store computed at load, `sandbox.engine.store.RANK_COLUMN`); every aggregated value is
   clamped to the field's catalog bounds. Money (DECIMAL) is summed as whole cents, so its sum is
   an exact integer with discrete noise and no float-rounding term. A joined upload is reduced to
   one row per join key first (`domain_connection(unique_on=…)`), so a join never multiplies a
   person's rows.
3. **OpenDP noise** (`sandbox.engine.privacy`): the plan is made from public facts only (bounds, k, the
   number of cells, the version's row count as the public bound on a group's rows), then its
   measurements are applied to the exact bounded aggregates. Noisy counts below zero are shown as
   zero (post-processing).
4. **Post-processing.** ORDER BY and LIMIT are applied to the noisy answer.

Rows queries (`masked_output` fields only) select the rows the checked tree describes (at most
`max_rows`), in a fresh random order, and mask each column with its catalog masking
(`sandbox.engine.masking.mask`): keyed pseudonyms with the answer's key (the scene's when it links them),
partial masks, generalization, Presidio redaction, suppression.

Disclosure statistics (issue #5, `Execution.disclosure_stats`): export review's automatic checks
(minimum cell count, dominance, p%, zeros, negatives, missing; k-anonymity for rows) need exact
figures on the very rows the answer used. An aggregate run then also answers `cell_stats` — per
public cell: persons, rows, and per value aggregate the clamped total, the two largest per-person
totals, the smallest value and the NULLs (`cell_stats_sql`, one more statement built from the
checked tree, in the same DuckDB session) — and a rows run answers `persons`, the distinct privacy
units among exactly the rows returned (the unit rides along in the same statement, then is dropped).
These are exact and stay inside the domain: they are for the checks, never for the tenant.

Errors inside DuckDB never reach the client as DuckDB's text (it can quote a cell, e.g. a failed
conversion); they become `query_failed` with a hint about literal types.
"""

from __future__ import annotations

import datetime as dt
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import opendp.prelude as dp
import pyarrow as pa
from sqlglot import exp

from pdao.kernel.errors import PdaoError, invalid
from sandbox.engine import privacy
from sandbox.engine.connection import domain_connection
from sandbox.engine.masking import mask
from sandbox.engine.sql import DATASET_ALIAS, DIALECT, Aggregate, CheckedQuery, DatasetInfo, GroupKey, upload_view_name
from sandbox.engine.store import RANK_COLUMN

MAX_CELLS = 100_000          # group cells of one aggregate answer (the product of the key domains)
# The work an aggregate answer costs, per group cell and aggregate, in units of about one COUNT's noise
# (~6 µs here; bench: a median's exponential mechanism is ~30 of them per cell, whatever its rows).
# A query above MAX_COST is refused before any data is read: 8 medians over 43,830 days took two
# minutes of CPU before this limit (issue 13).
COST_PER_CELL = {"count": 1, "count_distinct": 1, "sum": 4, "avg": 5, "median": 30, "quantile": 30}
# ... and per aggregate, whatever the cells: calibrating its noise (a binary search over OpenDP's
# privacy maps, ~30 ms when not already cached) — 1,000 COUNT(*) on one cell cost 14 s of CPU before.
COST_PER_AGGREGATE = 5_000
MAX_COST = 500_000
MAX_ROWS = 10_000            # rows of one row-level answer
MAX_PROBE_DAYS = 100_000     # pruning by WHERE evaluates at most this many days of a date range
DEFAULT_MAX_CONTRIBUTIONS = 10
NUMBER_TYPES = ("integer", "float", "decimal")
CENTS = 100                  # DECIMAL(18,2) is summed as whole cents


# ---------------------------------------------------------------------------------------------
# What the engine needs to know of a dataset (public catalog facts only)


@dataclass(frozen=True)
class FieldMeta:
    name: str
    type: str                              # catalog.descriptor.FieldType value
    masking: str = "none"                  # catalog.descriptor.Masking value
    nullable: bool = True
    domain: tuple[str, ...] | None = None  # public value domain of a category field
    bounds: tuple[Any, Any] | None = None  # public bounds: numbers, or ISO dates
    sensitivity: str = "public"            # catalog.descriptor.Sensitivity value (disclosure checks)
    pii_kind: str | None = None            # catalog.descriptor PII kind: person_key, cn_id, name, …


@dataclass(frozen=True)
class DatasetMeta:
    code: str
    privacy_unit: str | None
    fields: Mapping[str, FieldMeta]
    row_count: int = 0                     # the version's row count: public catalog metadata

    def info(self) -> DatasetInfo:
        """What the SQL checker needs."""
        return DatasetInfo(self.code, tuple(self.fields), self.privacy_unit,
                           {name: f.type for name, f in self.fields.items()})

    @classmethod
    def from_fields(cls, code: str, privacy_unit: str | None, fields: Sequence[Any], row_count: int = 0) -> DatasetMeta:
        """From catalog `DatasetField` rows or descriptor `FieldSpec`s (anything with the attributes)."""
        out = {}
        for f in fields:
            b = f.bounds
            if b is not None and not isinstance(b, Mapping):
                b = b.model_dump() if hasattr(b, "model_dump") else dict(b)
            bounds = (b["min"], b["max"]) if b else None
            sensitivity = getattr(f, "sensitivity", None) or "public"
            pii_kind = getattr(f, "pii_kind", None)
            out[f.name] = FieldMeta(f.name, str(getattr(f.type, "value", f.type)),
                                    str(getattr(f.masking, "value", f.masking)), bool(f.nullable),
                                    tuple(f.domain) if f.domain else None, bounds,
                                    str(getattr(sensitivity, "value", sensitivity)),
                                    str(getattr(pii_kind, "value", pii_kind)) if pii_kind else None)
        return cls(code, privacy_unit, out, row_count)


@dataclass(frozen=True)
class Execution:
    """One run: the checked query, its dataset, the snapshot and what the scene says."""

    checked: CheckedQuery
    dataset: DatasetMeta
    snapshot: Path | None = None                              # None: planning only
    uploads: Mapping[str, Path] = field(default_factory=dict)  # upload name -> its Parquet
    epsilon: float | None = None                              # aggregates: the query's ε
    max_contributions: int = DEFAULT_MAX_CONTRIBUTIONS
    pseudonym_key: bytes | None = None                        # rows: the scene's key
    reference_date: dt.date | None = None                     # rows: for age bands
    max_rows: int = MAX_ROWS
    max_cells: int = MAX_CELLS
    max_cost: int = MAX_COST
    threads: int = 2
    memory_limit: str = "1GB"
    # Also compute the exact statistics export review's disclosure checks need (`Answer.cell_stats`,
    # `Answer.persons`): one more statement in the same session. Off: nothing extra runs.
    disclosure_stats: bool = False


@dataclass
class Answer:
    kind: str                               # "aggregate" | "rows"
    table: pa.Table
    epsilon_spent: float = 0.0              # what OpenDP's maps say the release spent (≤ ε asked)
    noise: dict[str, dict[str, Any]] = field(default_factory=dict)   # alias -> scale, error bound, …
    cells: int = 0                          # aggregate: group cells answered (before LIMIT)
    notes: list[str] = field(default_factory=list)
    # output column -> the dataset field it comes from (None: COUNT(*), an error bound, an upload's column)
    output_fields: dict[str, str | None] = field(default_factory=dict)
    # With `Execution.disclosure_stats` only. EXACT statistics, for the disclosure checks alone: not
    # to be stored with the answer nor shown to the tenant (they are not differentially private).
    cell_stats: pa.Table | None = None      # aggregate: one row per cell of the full cell list (see cell_stats_sql)
    persons: int | None = None              # rows: distinct privacy units among exactly the rows returned
    # rows: one identity per returned row (in table order), the MD5 of the source dataset row's catalog
    # fields, so two answers can be compared row by row (export review's overlap check) — the same row
    # of an unchanged record keeps its identity across versions. Exact: kept inside the domain.
    row_keys: list[str] | None = None


def refused(code: str, en: str, zh: str, **details: Any) -> PdaoError:
    return invalid(code, en, zh, details=details or None)


# ---------------------------------------------------------------------------------------------
# Group cells


def _as_date(v: Any) -> dt.date:
    if isinstance(v, dt.datetime):
        return v.date()
    if isinstance(v, dt.date):
        return v
    return dt.date.fromisoformat(str(v)[:10])


def _periods(lo: dt.date, hi: dt.date, unit: str) -> list[dt.date]:
    months = {"month": 1, "quarter": 3, "year": 12}[unit]
    first = lo.month - 1 - (lo.month - 1) % months
    y, m = lo.year, first
    out = []
    while (y, m + 1) <= (hi.year, hi.month):
        out.append(dt.date(y, m + 1, 1))
        m += months
        y, m = y + m // 12, m % 12
    return out


def key_domain(meta: DatasetMeta, key: GroupKey, max_cells: int = MAX_CELLS) -> list[Any]:
    """The public values of one group key, in answer order; refused when there are none."""
    name = f"{key.column}" + (f" ({key.unit})" if key.unit else "")
    if key.column.upload:
        raise refused("group_key_without_domain",
                      f"{name}: a group key must have a public value domain; an upload's column has none",
                      f"{name}：分组键必须有公开的取值域，上传表字段没有", key=str(key.column))
    f = meta.fields[key.column.field]
    values: list[Any] | None = None
    if key.unit:
        if f.type not in ("date", "timestamp") or not f.bounds:
            raise refused("group_key_without_domain",
                          f"{name}: DATE_TRUNC needs a date field with catalog bounds",
                          f"{name}：DATE_TRUNC 需要有目录上下界的日期字段", key=str(key.column))
        values = _periods(_as_date(f.bounds[0]), _as_date(f.bounds[1]), key.unit)
    elif f.domain:
        values = list(f.domain)
    elif f.type == "boolean":
        values = [False, True]
    elif f.type == "integer" and f.bounds and float(f.bounds[1]) - float(f.bounds[0]) < max_cells:
        values = list(range(math.ceil(float(f.bounds[0])), math.floor(float(f.bounds[1])) + 1))
    elif f.type == "date" and f.bounds:
        lo, hi = _as_date(f.bounds[0]), _as_date(f.bounds[1])
        if (hi - lo).days < max_cells:
            values = [lo + dt.timedelta(days=i) for i in range((hi - lo).days + 1)]
    if values is None:
        raise refused("group_key_without_domain",
                      f"{name} has no public value domain to group by (a category list, a boolean, or an "
                      "integer or date range in the catalog); without one, which groups appear would reveal data",
                      f"{name} 没有可用于分组的公开取值域（目录中的类别列表、布尔值或整数/日期范围）；"
                      "否则出现哪些分组本身就会泄露数据", key=str(key.column))
    if f.nullable:
        values.append(None)
    return values


def _conjuncts(node: exp.Expression | None) -> list[exp.Expression]:
    if node is None:
        return []
    if isinstance(node, exp.Paren):
        return _conjuncts(node.this)
    if isinstance(node, exp.And):
        return _conjuncts(node.this) + _conjuncts(node.expression)
    return [node]


_ARROW_TYPES = {"string": pa.string(), "integer": pa.int64(), "boolean": pa.bool_(), "date": pa.date32()}


def prune_by_where(meta: DatasetMeta, key: GroupKey, values: list[Any], where: exp.Expression | None) -> list[Any]:
    """Drop the cells the query's own WHERE rules out (e.g. `visit_date >= DATE '2024-01-01'` with
    GROUP BY month): the conditions of the WHERE's top-level AND that read only this key's field
    are evaluated on the public values themselves. Public facts and the query's text alone decide,
    never the data, so the remaining cells still say nothing about it."""
    if key.column.upload:
        return values
    f = meta.fields[key.column.field]
    mine = [c for c in _conjuncts(where) if all(
        col.name == f.name and col.table == DATASET_ALIAS for col in c.find_all(exp.Column)) and c.find(exp.Column)]
    if not mine or f.type not in _ARROW_TYPES:
        return values
    probe = values
    if key.unit:   # months/quarters/years: keep a period if any of its days passes
        lo, hi = _as_date(f.bounds[0]), _as_date(f.bounds[1])  # type: ignore[index]
        if (hi - lo).days >= MAX_PROBE_DAYS:
            return values
        probe = [lo + dt.timedelta(days=i) for i in range((hi - lo).days + 1)] + ([None] if None in values else [])
    cond = exp.and_(*[c.copy() for c in mine])
    for col in cond.find_all(exp.Column):
        col.replace(exp.column("v", quoted=True))
    table = pa.table({"v": pa.array(probe, _ARROW_TYPES[f.type])})   # NULL too: `IS NULL` keeps its cell
    with domain_connection({}) as con:
        con.register("probe", table)
        sql = exp.select(exp.column("v", quoted=True)).from_("probe").where(cond).sql(dialect=DIALECT, identify=True)
        try:
            passing = {r[0] for r in con.execute(sql).fetchall()}
        except duckdb.Error:   # only public values are probed, but the text is never shown
            raise refused("query_refused", f"the WHERE condition on {key.column} cannot be evaluated on its values",
                          f"{key.column} 的 WHERE 条件无法在其取值上求值") from None
    if key.unit:
        passing = {None if d is None else _period_of(d, key.unit) for d in passing}
    return [v for v in values if v in passing]


def _period_of(d: dt.date, unit: str) -> dt.date:
    months = {"month": 1, "quarter": 3, "year": 12}[unit]
    return dt.date(d.year, d.month - (d.month - 1) % months, 1)


def query_cost(checked: CheckedQuery, n_cells: int) -> int:
    """The work an aggregate answer costs (`COST_PER_CELL`, `COST_PER_AGGREGATE`): public facts only."""
    return sum(n_cells * COST_PER_CELL[a.function] + COST_PER_AGGREGATE for a in checked.aggregates)


def answer_columns(checked: CheckedQuery) -> list[str]:
    """The answer's column names, in order, from the plan alone (what a tenant may see of an answer
    still held: the same whether the run succeeded or failed)."""
    if checked.kind == "rows":
        return [out.alias for out in checked.masked]
    names = [k.alias for k in checked.group_keys if k.alias is not None]
    for agg in checked.aggregates:
        names.append(agg.alias)
        if agg.function == "avg":
            names.append(f"{agg.alias}_error95")
    return names


def group_cells(execution: Execution) -> tuple[list[list[Any]], int]:
    """Each group key's cells (its public domain, less what the query's WHERE rules out), and the
    number of cells of their product (1 without GROUP BY)."""
    where = execution.checked.tree.args.get("where")
    domains = [prune_by_where(execution.dataset, k, key_domain(execution.dataset, k, execution.max_cells),
                              where.this if where is not None else None)
               for k in execution.checked.group_keys]
    n = math.prod(len(d) for d in domains) if domains else 1
    if n == 0:
        raise refused("no_cells", "the query's WHERE rules out every value of its group keys' public domains: "
                      "there is nothing to answer", "查询的 WHERE 条件排除了分组键公开取值域中的全部取值，没有可回答的分组")
    cost = query_cost(execution.checked, n)
    if n <= execution.max_cells and cost > execution.max_cost:
        raise refused("query_too_costly",
                      f"the query costs {cost:,} units of work ({n:,} cells × its aggregates, a median or quantile "
                      f"counting {COST_PER_CELL['median']}, and {COST_PER_AGGREGATE:,} per aggregate); at most "
                      f"{execution.max_cost:,} are answered (fewer cells, medians or aggregates)",
                      f"该查询的计算量为 {cost:,} 个单位（{n:,} 个单元格 × 聚合，中位数或分位数每个按 "
                      f"{COST_PER_CELL['median']} 计，另每个聚合 {COST_PER_AGGREGATE:,}），上限为 {execution.max_cost:,}"
                      "（请减少单元格、中位数或聚合）",
                      cost=cost, max_cost=execution.max_cost, cells=n)
    if n > execution.max_cells:
        raise refused("too_many_groups",
                      f"the group keys make {n:,} cells; at most {execution.max_cells:,} are answered "
                      "(group by fewer keys, or by month instead of day)",
                      f"分组键共 {n:,} 个单元格，最多 {execution.max_cells:,} 个（请减少分组键，或按月而非按日分组）",
                      cells=n, max_cells=execution.max_cells)
    return domains, n


# ---------------------------------------------------------------------------------------------
# The noise plan (public facts only: also what a preview reports)


def _value_field(meta: DatasetMeta, agg: Aggregate) -> FieldMeta | None:
    if agg.column is None or agg.function in ("count", "count_distinct"):
        return None
    f = meta.fields[agg.column.field]
    if f.type not in NUMBER_TYPES:
        raise refused("not_a_number", f"{agg.alias}: {agg.function.upper()} needs a number field; "
                      f"{agg.column.field} is {f.type}",
                      f"{agg.alias}：{agg.function.upper()} 需要数值字段，{agg.column.field} 的类型为 {f.type}",
                      aggregate=agg.alias)
    if not f.bounds:
        raise refused("no_bounds", f"{agg.alias}: {agg.column.field} has no catalog bounds to clamp to, so one "
                      "person's contribution cannot be bounded",
                      f"{agg.alias}：{agg.column.field} 在目录中没有上下界，无法限定个人贡献", aggregate=agg.alias)
    return f


def _plan_bounds(f: FieldMeta) -> tuple[float, float]:
    lo, hi = float(f.bounds[0]), float(f.bounds[1])  # type: ignore[index]
    if f.type == "decimal":
        return round(lo * CENTS), round(hi * CENTS)
    return lo, hi


def noise_plan(execution: Execution, n_cells: int) -> privacy.NoisePlan:
    checked, meta = execution.checked, execution.dataset
    if execution.epsilon is None:
        raise refused("epsilon_required", "an aggregate query needs ε", "聚合查询需要指定 ε")
    bounds, integers = {}, set()
    for agg in checked.aggregates:
        f = _value_field(meta, agg)
        if f is not None:
            bounds[f.name] = _plan_bounds(f)
            if f.type in ("integer", "decimal"):
                integers.add(f.name)
    k = execution.max_contributions if meta.privacy_unit else 1
    taken = set(checked.outputs)
    for agg in checked.aggregates:
        if agg.function == "avg" and f"{agg.alias}_error95" in taken:
            raise refused("output_name_taken", f"{agg.alias}_error95 holds the error bound of {agg.alias}: "
                          "give the other output another name", f"{agg.alias}_error95 用于 {agg.alias} 的误差界：请给另一个输出列换名",
                          output=f"{agg.alias}_error95")
        if agg.function in ("sum", "avg") and agg.field in integers:
            lo, hi = bounds[agg.field]
            if max(meta.row_count, 1) * max(abs(lo), abs(hi)) >= 2**62:   # an exact BIGINT sum could overflow
                raise refused("bounds_too_wide", f"{agg.alias}: the bounds of {agg.field} are too wide to sum exactly "
                              "over this version", f"{agg.alias}：{agg.field} 的上下界过宽，无法在该版本上精确求和",
                              aggregate=agg.alias)
    try:
        return privacy.plan_noise(checked.aggregates, epsilon=execution.epsilon, bounds=bounds, max_contributions=k,
                                  n_groups=n_cells, max_length=max(meta.row_count, 1), integer_fields=integers)
    except PdaoError:
        raise
    except (dp.OpenDPException, ValueError, OverflowError, ArithmeticError):   # e.g. a scale beyond any float
        raise refused("dp_not_possible", "the noise for this query cannot be calibrated (is ε very small?)",
                      "无法为该查询校准噪声（ε 是否过小？）") from None


def _unit_factor(meta: DatasetMeta, agg_field: str | None) -> int:
    f = meta.fields.get(agg_field) if agg_field else None
    return CENTS if f is not None and f.type == "decimal" else 1


def describe_noise(plan: privacy.NoisePlan, meta: DatasetMeta) -> dict[str, dict[str, Any]]:
    """Per aggregate: noise scale(s) and the 95% error bound, in the field's own units."""
    out = {}
    for a in plan.aggregates:
        factor = _unit_factor(meta, a.field) if a.function in ("sum", "avg") else 1
        acc = a.accuracy(plan.alpha)
        out[a.alias] = {
            "function": a.function, "field": a.field, "mechanism": a.parts[0].distribution,
            "scale": a.scale / factor, "scales": [p.scale / (factor if p.name == "sum" else 1) for p in a.parts],
            "error95": None if acc is None else acc / factor,
            "error_unit": a.accuracy_unit, "epsilon": a.loss,
        }
        if a.candidates:
            f = _unit_factor(meta, a.field)
            out[a.alias]["candidate_step"] = privacy._grid_step(a.candidates) / f
        if a.function == "avg":
            out[a.alias]["error95_column"] = f"{a.alias}_error95"
    return out


@dataclass(frozen=True)
class PlannedAnswer:
    """What the plan alone (public facts) says of an answer: all a tenant sees of a prod answer
    before it is released, so a run that failed inside the domain can show exactly the same."""
    columns: list[str]
    noise: dict[str, dict[str, Any]]
    epsilon_spent: float
    row_count: int            # aggregate: the cells answered (after LIMIT); rows: 0 (not shown)


def planned_answer(execution: Execution) -> PlannedAnswer:
    checked = execution.checked
    columns = answer_columns(checked)
    if checked.kind == "rows":
        return PlannedAnswer(columns, {}, 0.0, 0)
    _, n = group_cells(execution)
    plan = noise_plan(execution, n)
    cells = n if checked.limit is None else min(n, checked.limit)
    return PlannedAnswer(columns, describe_noise(plan, execution.dataset), plan.spent, cells)


def preview(execution: Execution) -> dict[str, Any]:
    """What the query would cost and how accurate it would be; reads no data, spends nothing."""
    checked = execution.checked
    if checked.kind == "rows":
        return {"kind": "rows", "epsilon": 0.0, "max_rows": execution.max_rows,
                "note": "row-level answers carry masked fields only and spend no ε; they wait for export review"}
    _, n = group_cells(execution)
    plan = noise_plan(execution, n)
    if execution.disclosure_stats:
        cell_stats_names(execution)
    return {"kind": "aggregate", "epsilon": execution.epsilon, "epsilon_spent": plan.spent, "cells": n,
            "max_contributions": plan.max_contributions, "confidence": 1 - plan.alpha,
            "aggregates": describe_noise(plan, execution.dataset)}


# ---------------------------------------------------------------------------------------------
# SQL for the engine, built from the checked tree


def _col(name: str, table: str = DATASET_ALIAS) -> exp.Column:
    return exp.Column(this=exp.to_identifier(name, quoted=True), table=exp.to_identifier(table, quoted=True))


def _clamped(f: FieldMeta, col: exp.Expression) -> exp.Expression:
    lo, hi = (exp.Literal.number(repr(float(b)) if f.type == "float" else str(b)) for b in f.bounds)  # type: ignore[union-attr]
    if f.type == "decimal":
        lo, hi = exp.Literal.number(format(float(f.bounds[0]), ".2f")), exp.Literal.number(format(float(f.bounds[1]), ".2f"))  # type: ignore[index]
    clamped: exp.Expression = exp.Anonymous(
        this="least", expressions=[exp.Anonymous(this="greatest", expressions=[col, lo]), hi])
    if f.nullable:   # LEAST/GREATEST skip NULLs in DuckDB (a NULL would become a bound): keep NULL as NULL
        clamped = exp.Case(ifs=[exp.If(this=exp.Is(this=col.copy(), expression=exp.Null()), true=exp.Null())],
                           default=clamped)
    if f.type == "decimal":   # exact: DECIMAL(18,2) × 100 is whole
        return exp.Cast(this=exp.Mul(this=clamped, expression=exp.Literal.number(CENTS)), to=exp.DataType.build("BIGINT"))
    if f.type == "integer":
        return exp.Cast(this=clamped, to=exp.DataType.build("BIGINT"))
    return exp.Cast(this=clamped, to=exp.DataType.build("DOUBLE"))


def _key_expr(key: GroupKey) -> exp.Expression:
    col = _col(key.column.field, "u" if key.column.upload else DATASET_ALIAS)
    if key.unit:
        return exp.Cast(this=exp.TimestampTrunc(this=col, unit=exp.Var(this=key.unit.upper())),
                        to=exp.DataType.build("DATE"))
    return col


def _where(execution: Execution, tree: exp.Select) -> None:
    """Keep each person's first k rows (by the load-time rank): AND-ed to the checked WHERE."""
    if not execution.dataset.privacy_unit:
        return
    bound = exp.LTE(this=_col(RANK_COLUMN), expression=exp.Literal.number(execution.max_contributions))
    where = tree.args.get("where")
    cond = exp.And(this=exp.Paren(this=where.this.copy()), expression=bound) if where is not None else bound
    tree.set("where", exp.Where(this=cond))


def aggregate_sql(execution: Execution) -> str:
    """The bounded, clamped exact aggregates per present group (keys k0…, values a0…)."""
    checked, meta = execution.checked, execution.dataset
    tree = checked.tree.copy()
    for arg in ("order", "limit", "group"):
        tree.set(arg, None)
    select: list[exp.Expression] = []
    keys = [_key_expr(k) for k in checked.group_keys]
    for i, k in enumerate(keys):
        select.append(exp.Alias(this=k.copy(), alias=exp.to_identifier(f"k{i}", quoted=True)))
    for j, agg in enumerate(checked.aggregates):
        name = f"a{j}"
        if agg.function == "count":
            select.append(exp.Alias(this=exp.Count(this=exp.Star()), alias=exp.to_identifier(name, quoted=True)))
            continue
        if agg.function == "count_distinct":
            d = exp.Count(this=exp.Distinct(expressions=[_col(agg.column.field)]))  # type: ignore[union-attr]
            select.append(exp.Alias(this=d, alias=exp.to_identifier(name, quoted=True)))
            continue
        f = _value_field(meta, agg)
        value = _clamped(f, _col(f.name))  # type: ignore[arg-type]
        if agg.function in ("sum", "avg"):
            total = exp.Sum(this=value)
            if f.type in ("integer", "decimal"):  # type: ignore[union-attr]
                total = exp.Cast(this=total, to=exp.DataType.build("BIGINT"))
            select.append(exp.Alias(this=total, alias=exp.to_identifier(name, quoted=True)))
            if agg.function == "avg":
                select.append(exp.Alias(this=exp.Count(this=_col(f.name)),  # type: ignore[union-attr]
                                        alias=exp.to_identifier(f"{name}_n", quoted=True)))
        else:   # quantiles need each group's values
            values = exp.Filter(this=exp.ArrayAgg(this=exp.Cast(this=value, to=exp.DataType.build("DOUBLE"))),
                                expression=exp.Where(this=exp.Not(this=exp.Is(this=_col(f.name), expression=exp.Null()))))  # type: ignore[union-attr]
            select.append(exp.Alias(this=values, alias=exp.to_identifier(name, quoted=True)))
    tree.set("expressions", select)
    if keys:
        tree.set("group", exp.Group(expressions=[k.copy() for k in keys]))
    _where(execution, tree)
    return tree.sql(dialect=DIALECT, identify=True, comments=False)


def row_key_expr(meta: DatasetMeta) -> exp.Expression:
    """The identity of a dataset row, `<person>:<row>`: the MD5 of its privacy unit, then the MD5 of
    its catalog fields as a JSON list of text (NULL stays null, so no two different rows share the
    text). Without a privacy unit, the row part alone (each row its own person)."""
    def md5(node: exp.Expression) -> exp.Expression:
        return exp.Anonymous(this="md5", expressions=[node])

    values = [exp.Cast(this=_col(name), to=exp.DataType.build("VARCHAR")) for name in meta.fields]
    row = md5(exp.Anonymous(this="to_json", expressions=[exp.Array(expressions=values)]))
    if not meta.privacy_unit:
        return row
    person = md5(exp.Cast(this=_col(meta.privacy_unit), to=exp.DataType.build("VARCHAR")))
    return exp.DPipe(this=exp.DPipe(this=person, expression=exp.Literal.string(":")), expression=row)


def rows_sql(execution: Execution, unit_alias: str | None = None, key_alias: str | None = None) -> str:
    """The checked SELECT with its LIMIT (≤ max_rows). With `unit_alias` (`key_alias`), the privacy
    unit (the row's identity, `row_key_expr`) is one more column of the same statement, so it is read
    from exactly the rows returned: the caller drops it, it never reaches the answer."""
    tree = execution.checked.tree.copy()
    asked = execution.checked.limit
    limit = min(asked if asked is not None else execution.max_rows, execution.max_rows)
    tree.set("limit", exp.Limit(expression=exp.Literal.number(limit)))
    extra = []
    if unit_alias is not None and execution.dataset.privacy_unit:
        extra.append(_alias(_col(execution.dataset.privacy_unit), unit_alias))
    if key_alias is not None:
        extra.append(_alias(row_key_expr(execution.dataset), key_alias))
    if extra:
        tree.set("expressions", [*tree.expressions, *extra])
    return tree.sql(dialect=DIALECT, identify=True, comments=False)


# ---------------------------------------------------------------------------------------------
# Exact statistics for the disclosure checks (export review, issue #5)


def _alias(node: exp.Expression, name: str) -> exp.Alias:
    return exp.Alias(this=node, alias=exp.to_identifier(name, quoted=True))


def _ref(name: str) -> exp.Column:
    return exp.Column(this=exp.to_identifier(name, quoted=True))


def _stats_fields(execution: Execution) -> list[FieldMeta]:
    """The value fields the aggregates read (SUM, AVG, MEDIAN, QUANTILE), each once, in first use."""
    seen: dict[str, FieldMeta] = {}
    for agg in execution.checked.aggregates:
        f = _value_field(execution.dataset, agg)
        if f is not None:
            seen.setdefault(f.name, f)
    return list(seen.values())


STATS_SUFFIXES = ("__total", "__top1", "__top2", "__min", "__nulls")


def cell_stats_names(execution: Execution) -> list[str]:
    """The columns of `Answer.cell_stats`, in order; refused when one would take another's name
    (e.g. a group key called `s__total` beside `SUM(fee) AS s`)."""
    checked = execution.checked
    names = [k.alias if k.alias is not None else f"__k{i}" for i, k in enumerate(checked.group_keys)]
    names += ["__persons", "__rows"]
    for agg in checked.aggregates:
        if _value_field(execution.dataset, agg) is not None:
            names += [agg.alias + s for s in STATS_SUFFIXES]
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise refused("output_name_taken", f"the disclosure checks need a column called {name}, which is also an "
                          "output's name: give that output another name",
                          f"披露检查需要名为 {name} 的统计列，与某个输出列重名：请给该输出列换名", output=name)
        seen.add(name)
    return names


def cell_stats_sql(execution: Execution) -> str:
    """Exact per-cell statistics on the rows the aggregate uses (the checked FROM/JOIN/WHERE, each
    person's first k rows, values clamped, DECIMAL in cents), built from the checked tree like
    `aggregate_sql`. Two levels: per cell and person (each row its own contributor without a
    privacy unit), then per cell. Columns: k0… (keys), p (persons), r (rows), and per value field
    j (`_stats_fields`): t{j} total, x{j}/y{j} the largest/second-largest per-person total,
    m{j} smallest value, z{j} NULLs — in the field's own units, as DOUBLE (counts BIGINT)."""
    checked, meta = execution.checked, execution.dataset
    unit = meta.privacy_unit
    fields = _stats_fields(execution)
    inner = checked.tree.copy()
    for arg in ("order", "limit", "group"):
        inner.set(arg, None)
    keys = [_key_expr(k) for k in checked.group_keys]
    select: list[exp.Expression] = [_alias(k.copy(), f"k{i}") for i, k in enumerate(keys)]
    select.append(_alias(exp.Count(this=exp.Star()) if unit else exp.Literal.number(1), "n"))
    for j, f in enumerate(fields):
        value = _clamped(f, _col(f.name))
        if unit:
            select += [_alias(exp.Sum(this=value), f"s{j}"), _alias(exp.Min(this=value.copy()), f"l{j}"),
                       _alias(exp.Sub(this=exp.Count(this=exp.Star()), expression=exp.Count(this=_col(f.name))), f"e{j}")]
        else:
            null = exp.Case(ifs=[exp.If(this=exp.Is(this=_col(f.name), expression=exp.Null()),
                                        true=exp.Literal.number(1))], default=exp.Literal.number(0))
            select += [_alias(value, f"s{j}"), _alias(value.copy(), f"l{j}"), _alias(null, f"e{j}")]
    inner.set("expressions", select)
    if unit:
        inner.set("group", exp.Group(expressions=[k.copy() for k in keys] + [_col(unit)]))
    _where(execution, inner)

    def natural(node: exp.Expression, f: FieldMeta) -> exp.Expression:
        out: exp.Expression = exp.Cast(this=node, to=exp.DataType.build("DOUBLE"))
        if f.type == "decimal":   # summed in cents: back to yuan
            out = exp.Div(this=out, expression=exp.Literal.number(CENTS))
        return out

    outer: list[exp.Expression] = [_ref(f"k{i}") for i in range(len(keys))]
    outer += [_alias(exp.Count(this=exp.Star()), "p"),
              _alias(exp.Cast(this=exp.Sum(this=_ref("n")), to=exp.DataType.build("BIGINT")), "r")]
    for j, f in enumerate(fields):
        top = exp.Anonymous(this="max", expressions=[_ref(f"s{j}"), exp.Literal.number(2)])   # the 2 largest, descending
        outer += [_alias(natural(exp.Sum(this=_ref(f"s{j}")), f), f"t{j}"),
                  _alias(natural(exp.Anonymous(this="list_extract", expressions=[top, exp.Literal.number(1)]), f), f"x{j}"),
                  _alias(natural(exp.Anonymous(this="list_extract", expressions=[top.copy(), exp.Literal.number(2)]), f),
                         f"y{j}"),
                  _alias(natural(exp.Min(this=_ref(f"l{j}")), f), f"m{j}"),
                  _alias(exp.Cast(this=exp.Sum(this=_ref(f"e{j}")), to=exp.DataType.build("BIGINT")), f"z{j}")]
    tree = exp.select(*outer).from_(exp.Subquery(this=inner, alias=exp.TableAlias(this=exp.to_identifier("c", quoted=True))))
    if keys:
        tree = tree.group_by(*[_ref(f"k{i}") for i in range(len(keys))])
    return tree.sql(dialect=DIALECT, identify=True, comments=False)


def _cell_rows(table: pa.Table, n_keys: int, index: Mapping[tuple, int]) -> dict[int, int]:
    """Cell number -> its row in an engine table keyed k0…; values outside the public domain are dropped."""
    keys = zip(*(table.column(f"k{i}").to_pylist() for i in range(n_keys))) if n_keys else [()] * table.num_rows
    at_row = {}
    for r, key in enumerate(keys):
        at = index.get(tuple(key))
        if at is not None:
            at_row[at] = r
    return at_row


def _cell_stats(execution: Execution, cells: list[tuple], index: Mapping[tuple, int], stats: pa.Table) -> pa.Table:
    """`Answer.cell_stats`: one row per cell of the full cell list, in the answer's cell order;
    a cell without rows has 0 persons, rows and NULLs, and NULL values."""
    checked = execution.checked
    names = cell_stats_names(execution)
    at_row = _cell_rows(stats, len(checked.group_keys), index)
    n = len(cells)

    def column(name: str, zero: Any, typ: pa.DataType) -> pa.Array:
        values = stats.column(name).to_pylist()
        return pa.array([(values[at_row[i]] if values[at_row[i]] is not None else zero) if i in at_row else zero
                         for i in range(n)], typ)

    out: list[pa.Array] = [pa.array([c[i] for c in cells]) for i in range(len(checked.group_keys))]
    out += [column("p", 0, pa.int64()), column("r", 0, pa.int64())]
    position = {f.name: j for j, f in enumerate(_stats_fields(execution))}
    for agg in checked.aggregates:
        f = _value_field(execution.dataset, agg)
        if f is None:
            continue
        j = position[f.name]
        out += [column(f"t{j}", None, pa.float64()), column(f"x{j}", None, pa.float64()),
                column(f"y{j}", None, pa.float64()), column(f"m{j}", None, pa.float64()),
                column(f"z{j}", 0, pa.int64())]
    return pa.table(out, names=names)


# ---------------------------------------------------------------------------------------------
# Running


def _views(execution: Execution) -> tuple[dict[str, Path], dict[str, str]]:
    checked = execution.checked
    if execution.snapshot is None:
        raise ValueError("no snapshot to run on")
    views = {checked.view: execution.snapshot}
    unique_on: dict[str, str] = {}
    if checked.join is not None:
        path = execution.uploads.get(checked.join.upload)
        if path is None:
            raise refused("upload_not_found", f"the upload {checked.join.upload} is not available",
                          f"上传数据 {checked.join.upload} 不可用")
        view = upload_view_name(checked.join.upload)
        views[view] = path
        unique_on[view] = checked.join.upload_key
    return views, unique_on


class _Statements:
    """What `on_connection` gets when one run has several statements (a connection for the
    caller's purposes: `query_progress`, `interrupt`, anything else passed through). Progress runs
    over all of them (0–100, never backwards), and an interrupt also stops the statements not yet
    started (DuckDB forgets an interrupt that arrives between two)."""

    def __init__(self, con: duckdb.DuckDBPyConnection, statements: int) -> None:
        self._con, self._statements = con, statements
        self.done = 0
        self.interrupted = False

    def query_progress(self) -> float:
        p = self._con.query_progress()
        if p is None or p < 0:   # between statements
            return 100.0 * self.done / self._statements
        return (100.0 * self.done + min(float(p), 100.0)) / self._statements

    def interrupt(self) -> None:
        self.interrupted = True
        self._con.interrupt()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._con, name)


def _fetch_all(execution: Execution, sqls: Sequence[str],
               on_connection: Callable[[duckdb.DuckDBPyConnection], None] | None) -> list[pa.Table]:
    """Run the statements one after the other in one domain session (the snapshot opened once)."""
    views, unique_on = _views(execution)
    with domain_connection(views, threads=execution.threads, memory_limit=execution.memory_limit,
                           unique_on=unique_on) as con:
        watch = _Statements(con, len(sqls)) if len(sqls) > 1 else None
        if on_connection is not None:
            on_connection(watch if watch is not None else con)  # type: ignore[arg-type]
        out = []
        for sql in sqls:
            if watch is not None and watch.interrupted:
                raise duckdb.InterruptException("interrupted")
            try:
                out.append(con.sql(sql).to_arrow_table())
            except duckdb.InterruptException:
                raise
            except duckdb.Error:
                # DuckDB's text may quote a cell (a failed conversion names the value): never shown.
                raise refused("query_failed",
                              "The engine could not run the query. Check that each literal matches its field's type "
                              "(text in quotes, numbers bare, dates as DATE 'YYYY-MM-DD').",
                              "引擎无法执行该查询。请检查每个常量是否与字段类型一致（文本加引号、数字不加引号、"
                              "日期写作 DATE 'YYYY-MM-DD'）。") from None
            if watch is not None:
                watch.done += 1
        return out


def _fetch(execution: Execution, sql: str, on_connection: Callable[[duckdb.DuckDBPyConnection], None] | None
           ) -> pa.Table:
    return _fetch_all(execution, [sql], on_connection)[0]


def run(execution: Execution, *, on_connection: Callable[[duckdb.DuckDBPyConnection], None] | None = None,
        stop: Callable[[], bool] | None = None) -> Answer:
    """Run the query and answer; an aggregate answer spends `epsilon_spent` (charge it first).
    `on_connection` gets the DuckDB connection before the query starts (progress, interrupt);
    `stop()` is asked between the Python phases (noise, masking), which an engine interrupt does not
    reach: true raises `duckdb.InterruptException`, like an interrupted statement."""
    if execution.checked.kind == "rows":
        return _run_rows(execution, on_connection, stop)
    return _run_aggregate(execution, on_connection, stop)


def _check(stop: Callable[[], bool] | None) -> None:
    if stop is not None and stop():
        raise duckdb.InterruptException("INTERRUPT Error: stopped between phases")


def _run_aggregate(execution: Execution, on_connection: Any, stop: Callable[[], bool] | None = None) -> Answer:
    checked, meta = execution.checked, execution.dataset
    domains, n = group_cells(execution)
    sqls = [aggregate_sql(execution)]
    if execution.disclosure_stats:
        cell_stats_names(execution)            # refused before any data is read
        sqls.append(cell_stats_sql(execution))
    # The plan depends on public facts only, and submission already checked it can be made: it is
    # calibrated (OpenDP) while DuckDB scans, and nothing is released if it fails.
    with ThreadPoolExecutor(1) as pool:
        planning = pool.submit(noise_plan, execution, n)
        exact, *stats = _fetch_all(execution, sqls, on_connection)
        plan = planning.result()
    _check(stop)

    cells = list(itertools.product(*domains)) if domains else [()]
    index = {c: i for i, c in enumerate(cells)}
    at_row = _cell_rows(exact, len(checked.group_keys), index)   # cell -> its row in the engine's answer

    def per_cell(column: str, zero: Any, cast: Callable[[Any], Any]) -> list[Any]:
        values = exact.column(column).to_pylist()
        return [cast(values[at_row[i]] or zero) if i in at_row else zero for i in range(n)]

    inputs: dict[str, Any] = {}
    for j, agg in enumerate(checked.aggregates):
        name = f"a{j}"
        integer = agg.function in ("count", "count_distinct") or plan.by_alias(agg.alias).parts[0].integer
        if agg.function in ("count", "count_distinct", "sum"):
            inputs[agg.alias] = per_cell(name, 0, int) if integer else per_cell(name, 0.0, float)
        elif agg.function == "avg":
            sums = per_cell(name, 0, int) if integer else per_cell(name, 0.0, float)
            inputs[agg.alias] = (sums, per_cell(f"{name}_n", 0, int))
        else:   # each cell's values, as arrays straight from Arrow (no Python floats)
            lists = exact.column(name).combine_chunks()
            empty = np.zeros(0)
            inputs[agg.alias] = [lists[at_row[i]].values.to_numpy(zero_copy_only=False)
                                 if i in at_row and lists[at_row[i]].is_valid else empty for i in range(n)]

    _check(stop)
    released = privacy.apply_noise(plan, inputs)
    _check(stop)
    columns: dict[str, list[Any]] = {}
    for i, key in enumerate(checked.group_keys):
        if key.alias is not None:
            columns[key.alias] = [c[i] for c in cells]
    for agg in checked.aggregates:
        r = released[agg.alias]
        factor = _unit_factor(meta, agg.field) if agg.function in ("sum", "avg", "median", "quantile") else 1
        values = r.values
        if agg.function in ("count", "count_distinct"):
            values = [max(int(v), 0) for v in values]   # post-processing: no negative counts
        elif factor != 1:
            values = [None if v is None else v / factor for v in values]
        columns[agg.alias] = values
        if agg.function == "avg":
            columns[f"{agg.alias}_error95"] = [None if a is None else a / factor for a in r.accuracy]
    order = list(range(n))
    for o in reversed(checked.order_by):   # stable sorts, last key first
        vals = columns[o.output]
        order.sort(key=lambda i, v=vals, o=o: _sort_key(v[i], o.descending, o.nulls_first), reverse=o.descending)
    if checked.limit is not None:
        order = order[:checked.limit]
    table = pa.table({name: [vals[i] for i in order] for name, vals in columns.items()})
    sources: dict[str, str | None] = {}
    for key in checked.group_keys:
        if key.alias is not None:
            sources[key.alias] = None if key.column.upload else key.column.field
    for agg in checked.aggregates:
        sources[agg.alias] = None if agg.column is None or agg.column.upload else agg.column.field
        if agg.function == "avg":
            sources[f"{agg.alias}_error95"] = None
    answer = Answer("aggregate", table, plan.spent, describe_noise(plan, meta), n,
                    output_fields={name: sources.get(name) for name in table.column_names})
    if stats:
        answer.cell_stats = _cell_stats(execution, cells, index, stats[0])
    return answer


def _sort_key(v: Any, descending: bool, nulls_first: bool) -> tuple:
    # Python's reverse=True flips the null position too; compensate so NULLS FIRST/LAST hold.
    null_rank = 0 if nulls_first else 1
    if descending:
        null_rank = 1 - null_rank
    return (null_rank, 0) if v is None else (1 - null_rank, v)


def _run_rows(execution: Execution, on_connection: Any, stop: Callable[[], bool] | None = None) -> Answer:
    checked, meta = execution.checked, execution.dataset
    unit_alias = key_alias = None
    if execution.disclosure_stats:   # names no output has
        free = (a for a in (f"__pdao_{i}" for i in itertools.count()) if a not in checked.outputs)
        unit_alias = next(free) if meta.privacy_unit else None
        key_alias = next(free)
    table = _fetch(execution, rows_sql(execution, unit_alias, key_alias), on_connection)
    # A fresh random order per answer: two answers holding the same rows cannot be lined up by
    # position (their pseudonyms are keyed apart), and the order says nothing about the storage.
    table = table.take(pa.array(np.random.default_rng().permutation(table.num_rows), pa.int64()))
    persons = row_keys = None
    if execution.disclosure_stats:
        persons = table.num_rows if unit_alias is None else len(set(table.column(unit_alias).to_pylist()))
        row_keys = table.column(key_alias).to_pylist()
    reference = execution.reference_date or dt.date.today()
    columns = {}
    for out in checked.masked:
        _check(stop)
        f = meta.fields[out.column.field]
        values = table.column(out.alias).combine_chunks()
        if f.masking == "round" and f.bounds:
            width = max((float(f.bounds[1]) - float(f.bounds[0])) / 20, 1)
            columns[out.alias] = mask(values, f.masking, width=width)
        else:
            columns[out.alias] = mask(values, f.masking, key=execution.pseudonym_key, reference_date=reference)
    notes = []
    if (checked.limit is None or checked.limit > execution.max_rows) and table.num_rows >= execution.max_rows:
        notes.append(f"the answer stops at {execution.max_rows} rows (the most one answer holds)")
    sources = {out.alias: None if out.column.upload else out.column.field for out in checked.masked}
    return Answer("rows", pa.table(columns), 0.0, {}, 0, notes, output_fields=sources, persons=persons,
                  row_keys=row_keys)
