"""Automatic disclosure checks on a query answer, as a report an export reviewer can read.

Pure functions: no I/O, no database, no clock. Every check returns a ``Check`` — ``name``,
``verdict`` (``pass`` | ``review`` | ``fail``), ``reason`` / ``reason_zh``, ``cells`` (which group
cells, as dicts of their *key* values: public domain values, fine to show), ``counts`` (how many
cells or classes the check flags) and ``columns`` (which output columns it concerns). A check never
carries a statistic of the data — no count, total or value of a cell — only thresholds, cells and
how many cells (one exception, for staff: ``differencing`` says how many persons the rows two
answers differ by belong to). ``report()`` bundles checks into ``{"verdict", "checks", "summary",
"summary_zh"}``.

Thresholds (``Thresholds``) default to ACRO's (cell count 10, (n, k) = (2, 0.9), p = 10%, zeros
disclosive) plus k-anonymity 5 and l-diversity 2 for row outputs; a scene may only make them
stricter (``stricter_than_defaults`` lists what is looser).

Aggregates: the cell statistics
-------------------------------
An aggregate answer is checked on *cell stats* computed inside the domain on the exact, pre-noise
data: a pyarrow Table, one row per group cell, with the group key columns (``keys``) and

=================  ========================================================================
``__persons``      distinct contributors (privacy units) in the cell; 0 for an empty cell
``__rows``         rows in the cell
``a__total``       sum of the cell's non-null values of summed column alias ``a`` (null when none)
``a__top1``        largest per-contributor total in the cell (null when no contributor has a value)
``a__top2``        second largest (null when fewer than two contributors have a value)
``a__top3`` …      optional, more of the same; used when ``dominance_n`` > 2
``a__min``         smallest single value (null when none)
``a__nulls``       how many of the cell's values are null
=================  ========================================================================

``cell_stats_from_frame`` computes them from pandas microdata (``unit=None``: every row is its own
contributor, as ACRO assumes); the engine computes the same in DuckDB.

Aggregates: what each check does (ACRO 1.0.2's per-cell masks, ``acro/sdcchecks.py``)
-------------------------------------------------------------------------------------
``min_cell_count``  ACRO ``MinimumThresholdCheck``: a cell with fewer than ``min_cell_count``
                    contributors fails (empty cells included). ACRO counts rows; with one row per
                    contributor that is the same number, and per person is what protects people.
``zeros``           ACRO ``PresenceOfZeroCheck`` (frequency tables): a cell with no contributor
                    fails when ``zeros_disclosive`` (class disclosure: "nobody here has it").
                    Checked for every answer here, not only counts: an empty cell's sum or mean
                    tells the same.
``dominance``       ACRO ``NKCheck``: ``top_n_sum / total >= k`` fails (``>=`` is ACRO's code; its
                    docs, like the issue, say "more than"). ``0 / 0`` (no values, or all zero) is
                    NaN in ACRO and so passes. ``top_n_sum`` is exact from ``a__top1..a__top{n}``; when
                    a column is missing it is bounded above by ``min(total, top1 + (n-1)·top2)``,
                    which can only fail more cells.
``p_percent``       ACRO ``PPercentCheck``: ``p_val = (total - (top1 + top2)) / top1``, or
                    ``total - (top1 + top2)`` itself when ``top1 == 0``, or 1.0 when ``top1`` is
                    null (NaN); fails when ``p_val < p``. Note what ACRO's code does with a cell
                    whose values are all zero: its comment says "treat as non-disclosive", its
                    ``where`` keeps ``0``, and ``0 < p`` fails. We follow the code — it is also the
                    sound answer: a zero sum of non-negative values tells every contributor's value.
``negative``        ACRO stops both dominance checks for the *whole table* as soon as one value is
                    negative, answering ``review`` with the cells that hold negatives. Here those
                    cells are this check's (``review``); dominance and p% are still judged on every
                    other cell, and when nothing else fails they answer ``review`` as ACRO does.
                    So a table with a negative value *and* a dominated cell fails here where ACRO
                    says review: stricter, on purpose (a negative elsewhere hides nothing).
``missing``         ACRO ``MissingCheck`` (off by default in ACRO, always on here): a cell with a
                    null value fails its mask and the check answers ``review``. ACRO's mask is also
                    NaN — and so flagged — for an empty cell of a two-way table (the aggregated
                    value of no rows); without DP we do the same.

Aggregates under differential privacy (``dp=True``)
---------------------------------------------------
Every published value of a DP answer carries noise calibrated to the query's ε, which already
bounds what any one person's data can change in it, small or dominated cell alike. The rules above
were made for exact tables, so under DP a cell ACRO would *fail* is sent to ``review`` (the office
decides; suppressing or coarsening stays possible), never failed. A cell with no contributor
*passes* every check: its published value is pure noise, and suppressing it would itself tell that
it is empty; for the same reason no reason given under DP says whether empty cells exist.
``negative`` and ``missing`` answer ``review`` either way (they are notes on the data, not on noise).

Rows (masked ``masked_output`` fields)
--------------------------------------
``k_anonymity``: every equivalence class over the quasi-identifier columns in the output has at
least ``k_anonymity`` rows. ``l_diversity``: within each class, each sensitive column in the output
has at least ``l_diversity`` distinct non-null values (a class whose sensitive values are all null
tells nothing and passes). ``min_persons``: the answer's persons, when known, reach
``min_cell_count``. ACRO has no row-level checks; these follow the usual definitions.

``linked_rows``: when a scene links its pseudonyms, each row of a new answer carries, per field, what
the scene's released row answers say about the same person (joined on the person's pseudonym), so
k-anonymity and l-diversity are judged on what a recipient of all of them can put together.

Row answers against each other (``differencing_check``)
-------------------------------------------------------
Row answers are counting queries in disguise: two answers whose rows differ by one give that row
away. Every row of a prod row answer has an identity, `<person>:<row>` (MD5s of its privacy unit and
of its source record, kept inside the domain), so a new answer is compared with the scene's other
row answers, counting the *persons* the differing rows belong to (ten visits of one person told
apart single that person out as surely as one):

* **pairwise**: the rows of the multiset symmetric difference with each earlier answer belong to no
  one (the same rows) or to at least ``minimum`` persons;
* **regions**: the earlier answers split the rows into regions (rows held by exactly the same
  answers). The new answer may only cut a region into parts whose rows belong to no one or to at
  least ``minimum`` persons, and the same for the rows that no earlier answer holds. This is what
  catches ``C − A − B`` (three answers, each pair far apart). Pairwise closeness implies a small
  region when the earlier answers themselves respect the rule, so released answers kept to it never
  differ by the rows of fewer than ``minimum`` persons, in whatever order they were released.

A subset is judged like any other pair (its difference is what it gives away). The answer's own
size is its difference with "no answer" (its rows that no earlier answer holds); ``min_persons``
already holds a lone answer to the minimum. This check's ``cells`` name the earlier results
(``result_id``) and regions (``results``, ``this_answer``) that are too close, with the size of the
difference (``difference``, ``rows``): exact counts, for export reviewers, the office and auditors
only, like every report. It is the one check that carries a count of the data.

``pii_check`` runs the project's Presidio recognizers (``sandbox.engine.pii.find_pii_batch``) over every
string cell; ``budget_check`` looks at the ε ledger. ``suppress`` and ``round_values`` are the
reviewer's remedies, pure as well.

Automatic release (``auto_releasable``)
---------------------------------------
The checks above run on exact statistics, so "released at once" versus "held" must not depend on
them: it would tell the tenant a free, un-noised bit (is any cell below 10 people?). A DP aggregate
leaves without a person only on public facts and its own noisy answer: ``budget`` (the ledger),
``pii`` (an aggregate's keys come from public domains) and ``noisy_counts`` (every noisy COUNT at
least ``min_cell_count``: post-processing of the DP release, paid for by its ε). The exact-statistic
checks stay in the report for reviewers and auditors, who may still revise or recall.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc

__all__ = [
    "Verdict",
    "Thresholds",
    "DEFAULTS",
    "stricter_than_defaults",
    "Check",
    "PERSONS",
    "ROWS",
    "stat_column",
    "cell_stats_from_frame",
    "aggregate_checks",
    "rows_checks",
    "pii_check",
    "budget_check",
    "noisy_count_check",
    "linked_rows",
    "differencing_check",
    "report",
    "failing_checks",
    "failed_run",
    "AUTO_RELEASE_CHECKS",
    "auto_releasable",
    "suppress",
    "round_values",
]

Verdict = Literal["pass", "review", "fail"]
_SEVERITY = {"pass": 0, "review": 1, "fail": 2}

PERSONS = "__persons"
ROWS = "__rows"


def stat_column(alias: str, stat: str) -> str:
    """The cell-stats column of summed alias ``alias``: ``stat_column("fee", "top1") == "fee__top1"``."""
    return f"{alias}__{stat}"


# ---------------------------------------------------------------------------------------------
# Thresholds

@dataclass(frozen=True, slots=True)
class Thresholds:
    """Disclosure thresholds of a scene. Defaults are ACRO's (``acro/default.yaml``: safe_threshold
    10, safe_nk_n 2, safe_nk_k 0.9, safe_pratio_p 0.1, zeros_are_disclosive) plus k-anonymity 5 and
    l-diversity 2 for row outputs."""

    min_cell_count: int = 10
    dominance_n: int = 2
    dominance_k: float = 0.9
    p_ratio: float = 0.1
    zeros_disclosive: bool = True
    k_anonymity: int = 5
    l_diversity: int = 2

    def __post_init__(self) -> None:
        # impossible values are refused outright; merely loose ones are for stricter_than_defaults
        for name in ("min_cell_count", "dominance_n", "k_anonymity", "l_diversity"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, not {v!r}")
        if not (isinstance(self.dominance_k, int | float) and 0 < self.dominance_k <= 1):
            raise ValueError(f"dominance_k must be in (0, 1], not {self.dominance_k!r}")
        if not (isinstance(self.p_ratio, int | float) and 0 <= self.p_ratio <= 1):
            raise ValueError(f"p_ratio must be in [0, 1], not {self.p_ratio!r}")
        if not isinstance(self.zeros_disclosive, bool):
            raise ValueError(f"zeros_disclosive must be a boolean, not {self.zeros_disclosive!r}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


DEFAULTS = Thresholds()


def stricter_than_defaults(t: Thresholds) -> list[str]:
    """Each threshold of ``t`` that is *looser* than the default, as an English sentence; empty when
    ``t`` is at least as strict everywhere (a scene's policy may only tighten)."""
    d = DEFAULTS
    looser: list[str] = []
    if t.min_cell_count < d.min_cell_count:
        looser.append(f"min_cell_count {t.min_cell_count} is below the default {d.min_cell_count}")
    if t.dominance_n < d.dominance_n:
        looser.append(f"dominance_n {t.dominance_n} is below the default {d.dominance_n}")
    if t.dominance_k > d.dominance_k:
        looser.append(f"dominance_k {t.dominance_k:g} is above the default {d.dominance_k:g}")
    if t.p_ratio < d.p_ratio:
        looser.append(f"p_ratio {t.p_ratio:g} is below the default {d.p_ratio:g}")
    if d.zeros_disclosive and not t.zeros_disclosive:
        looser.append("zeros_disclosive is off, the default treats zero cells as disclosive")
    if t.k_anonymity < d.k_anonymity:
        looser.append(f"k_anonymity {t.k_anonymity} is below the default {d.k_anonymity}")
    if t.l_diversity < d.l_diversity:
        looser.append(f"l_diversity {t.l_diversity} is below the default {d.l_diversity}")
    return looser


# ---------------------------------------------------------------------------------------------
# Check

@dataclass(frozen=True, slots=True)
class Check:
    """One check's outcome. ``cells``: the flagged cells' key values (or, for row checks, the
    flagged quasi-identifier combinations; for PII, ``{"column", "kinds"}``); ``counts``: how many
    cells/classes are flagged; ``columns``: the output columns concerned."""

    name: str
    verdict: Verdict
    reason: str
    reason_zh: str
    cells: list[dict[str, Any]] = field(default_factory=list)
    counts: int = 0
    columns: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.verdict not in _SEVERITY:
            raise ValueError(f"unknown verdict {self.verdict!r}")

    def as_dict(self) -> dict[str, Any]:
        """The check as JSON can hold it (cell values in JSON form: dates as ISO text)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["cells"] = [{k: _json_value(v) for k, v in cell.items()} for cell in self.cells]
        out["columns"] = list(self.columns)
        return out


def _json_value(v: Any) -> Any:
    """A key value as JSON can hold it (dates in ISO 8601, decimals as text, NaN as null)."""
    if isinstance(v, datetime | date | time):
        return v.isoformat()
    if isinstance(v, Decimal):
        return str(v)
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, list | tuple):
        return [_json_value(x) for x in v]
    if hasattr(v, "item") and not isinstance(v, str):   # a numpy scalar
        return _json_value(v.item())
    return v


def _key_dicts(keys: Sequence[str], columns: Mapping[str, list[Any]], rows: Iterable[int]) -> list[dict[str, Any]]:
    return [{k: _json_value(columns[k][i]) for k in keys} for i in rows]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _cells_verb(n: int, one: str, many: str) -> str:
    """``"1 cell has"`` / ``"3 cells have"``."""
    return f"{n} cell {one}" if n == 1 else f"{n} cells {many}"


def _cols_en(cols: Sequence[str]) -> str:
    return ", ".join(cols)


def _cols_zh(cols: Sequence[str]) -> str:
    return "、".join(cols)


# ---------------------------------------------------------------------------------------------
# Cell stats from microdata

def cell_stats_from_frame(df: Any, keys: Sequence[str], values: Sequence[str], unit: str | None = None, *,
                          domains: Mapping[str, Sequence[Any]] | None = None, top: int = 2) -> pa.Table:
    """The cell stats of ``df`` (pandas) grouped by ``keys``, for summed columns ``values`` (each its
    own alias), as ``aggregate_checks`` reads them.

    ``unit``: the contributor column (a person id); ``None`` makes every row its own contributor, as
    ACRO assumes. A row whose unit is null counts as a contributor of its own. ``domains``: for each
    key, the public values the answer shows — every combination becomes a cell, empty ones with
    ``__persons = 0`` (as pdao answers and as ``pd.crosstab`` lays out a two-way table); without it,
    only the observed combinations. ``top``: how many ``a__top{i}`` columns (at least 2)."""
    import numpy as np
    import pandas as pd

    keys, values = list(keys), list(values)
    if not keys:
        raise ValueError("cell stats need at least one key column")
    top = max(2, int(top))
    work = df[keys + values].copy()
    if unit is None:
        work["__unit"] = np.arange(len(df))
    else:
        # a null unit is one contributor per row: unknown people are never merged together
        ids = df[unit].astype(object)
        nulls = ids.isna().to_numpy()
        work["__unit"] = [("__null__", i) if nulls[i] else v for i, v in enumerate(ids.tolist())]
    grouped = work.groupby(keys, dropna=False, sort=True)
    cells = grouped.size().rename(ROWS).to_frame()
    cells[PERSONS] = grouped["__unit"].nunique(dropna=False)
    for v in values:
        col = work[v].astype("float64")
        w = work[keys + ["__unit"]].assign(__v=col)
        by_cell = w.groupby(keys, dropna=False, sort=True)["__v"]
        cells[stat_column(v, "total")] = by_cell.sum(min_count=1)
        cells[stat_column(v, "min")] = by_cell.min()
        cells[stat_column(v, "nulls")] = w.assign(__n=col.isna()).groupby(keys, dropna=False, sort=True)["__n"].sum()
        # per-contributor totals; a contributor with only nulls has none and ranks nowhere
        per_unit = w.groupby(keys + ["__unit"], dropna=False, sort=False)["__v"].sum(min_count=1)
        per_unit = per_unit.dropna().reset_index().sort_values("__v", ascending=False, kind="stable")
        per_unit["__rank"] = per_unit.groupby(keys, dropna=False, sort=False).cumcount()
        ranked = per_unit[per_unit["__rank"] < top]
        for i in range(top):
            ith = ranked[ranked["__rank"] == i].set_index(keys)["__v"]
            cells[stat_column(v, f"top{i + 1}")] = ith.reindex(cells.index)
    cells = cells.reset_index()
    if domains is not None:
        missing = [k for k in keys if k not in domains]
        if missing:
            raise ValueError(f"domains lack the keys {missing}")
        full = pd.MultiIndex.from_product([list(domains[k]) for k in keys], names=keys).to_frame(index=False)
        cells = full.merge(cells, on=keys, how="left")
        cells[[ROWS, PERSONS]] = cells[[ROWS, PERSONS]].fillna(0)
        for v in values:
            cells[stat_column(v, "nulls")] = cells[stat_column(v, "nulls")].fillna(0)
    order = keys + [PERSONS, ROWS]
    for v in values:
        order += [stat_column(v, "total")] + [stat_column(v, f"top{i + 1}") for i in range(top)]
        order += [stat_column(v, "min"), stat_column(v, "nulls")]
    cells = cells[order]
    int_cols = {PERSONS, ROWS} | {stat_column(v, "nulls") for v in values}
    arrays = []
    for c in order:
        s = cells[c]
        if c in int_cols:
            arrays.append(pa.array(s.astype("int64").to_numpy(), pa.int64()))
        elif c in keys:
            arrays.append(pa.array(s.astype(object).where(s.notna(), None).tolist()))
        else:
            f = s.astype("float64").to_numpy()
            arrays.append(pa.array(f, pa.float64(), mask=np.isnan(f)))
    return pa.Table.from_arrays(arrays, names=order)


# ---------------------------------------------------------------------------------------------
# Aggregate checks

def _floats(stats: pa.Table, name: str) -> list[float | None]:
    return pc.cast(stats[name], pa.float64()).to_pylist()


def _top_n_sum(stats: pa.Table, alias: str, n: int, totals: list[float | None]) -> list[float]:
    """Per cell, the sum of the ``n`` largest contributor totals (nulls count 0, like pandas'
    ``nlargest(n).sum()``); bounded above by ``min(total, top1 + (n-1)·top2)`` when the stats
    stop short of ``top{n}``."""
    have = [i for i in range(1, n + 1) if stat_column(alias, f"top{i}") in stats.column_names]
    if have != list(range(1, n + 1)):
        if have[:2] != [1, 2]:
            raise ValueError(f"cell stats lack {stat_column(alias, 'top1')} / {stat_column(alias, 'top2')}")
        t1, t2 = _floats(stats, stat_column(alias, "top1")), _floats(stats, stat_column(alias, "top2"))
        out = []
        for a, b, tot in zip(t1, t2, totals):
            bound = (a or 0.0) + (n - 1) * (b or 0.0)
            out.append(bound if tot is None else min(bound, tot))
        return out
    tops = [_floats(stats, stat_column(alias, f"top{i}")) for i in have]
    out = []
    for row in zip(*tops):
        s = 0.0
        for x in row:
            s += x or 0.0
        out.append(s)
    return out


def _require(stats: pa.Table, names: Iterable[str]) -> None:
    missing = [c for c in names if c not in stats.column_names]
    if missing:
        raise ValueError(f"cell stats lack the columns {missing}")


def aggregate_checks(stats: pa.Table, keys: list[str], sum_columns: list[str], t: Thresholds, *,
                     dp: bool) -> list[Check]:
    """The six aggregate checks — ``min_cell_count``, ``zeros``, ``dominance``, ``p_percent``,
    ``negative``, ``missing`` — on cell stats (see the module docstring for each rule and for the
    ``dp`` mapping). ``sum_columns``: the aliases whose ``a__*`` stats the answer's sums (and
    averages) rest on; none makes the value checks pass as not applicable."""
    _require(stats, list(keys) + [PERSONS])
    for a in sum_columns:
        _require(stats, [stat_column(a, s) for s in ("total", "top1", "top2", "min", "nulls")])
    cols = {k: stats[k].to_pylist() for k in keys}
    persons = [int(p or 0) for p in stats[PERSONS].to_pylist()]
    n_cells = len(persons)
    empty = [p == 0 for p in persons]
    judged = [not (dp and e) for e in empty]   # under DP an empty cell is pure noise: it passes

    checks: list[Check] = []

    # -- minimum cell count (ACRO MinimumThresholdCheck)
    small = [i for i in range(n_cells) if persons[i] < t.min_cell_count and judged[i]]
    m = t.min_cell_count
    if not small:
        en, zh = f"Every cell has at least {m} contributors.", f"每个单元格至少有 {m} 个贡献者。"
        if dp:
            en = f"Every non-empty cell has at least {m} contributors."
            zh = f"每个非空单元格至少有 {m} 个贡献者。"
        checks.append(Check("min_cell_count", "pass", en + _dp_empty_en(dp), zh + _dp_empty_zh(dp)))
    else:
        cnt = len(small)
        if dp:
            checks.append(Check(
                "min_cell_count", "review",
                f"{_cells_verb(cnt, 'with contributors has', 'with contributors have')} fewer than {m} of them. "
                f"Their published values carry differential-privacy noise, which already bounds what they "
                f"reveal; the office decides whether to release, coarsen or suppress them." + _dp_empty_en(dp),
                f"{cnt} 个有贡献者的单元格贡献者少于 {m} 个。其发布值已加差分隐私噪声，噪声已限制其泄露程度；"
                f"由办公室决定发布、合并或抑制。" + _dp_empty_zh(dp),
                _key_dicts(keys, cols, small), cnt))
        else:
            checks.append(Check(
                "min_cell_count", "fail",
                f"{_cells_verb(cnt, 'has', 'have')} fewer than {m} contributors (ACRO's threshold rule); "
                f"suppress them or coarsen the grouping.",
                f"{cnt} 个单元格的贡献者少于 {m} 个（ACRO 阈值规则），需抑制或合并分组。",
                _key_dicts(keys, cols, small), cnt))

    # -- zeros (ACRO PresenceOfZeroCheck)
    if not t.zeros_disclosive:
        checks.append(Check("zeros", "pass", "Zero cells are not treated as disclosive under this scene's policy.",
                            "按本场景策略，零值单元格不视为泄露。"))
    elif dp:
        checks.append(Check(
            "zeros", "pass",
            "Under differential privacy a cell without contributors publishes pure noise, not a true zero, "
            "so zero cells tell nothing.",
            "在差分隐私下，无贡献者的单元格发布的是纯噪声而非真实的零，零值单元格不泄露信息。"))
    else:
        zeros = [i for i in range(n_cells) if empty[i]]
        if zeros:
            cnt = len(zeros)
            checks.append(Check(
                "zeros", "fail",
                f"{_cells_verb(cnt, 'has', 'have')} no contributors: a published zero tells that nobody in the group "
                f"has the attribute (class disclosure).",
                f"{cnt} 个单元格没有贡献者：发布零值会表明该组中无人具有该属性（类别泄露）。",
                _key_dicts(keys, cols, zeros), cnt))
        else:
            checks.append(Check("zeros", "pass", "No cell is empty.", "没有空单元格。"))

    if not sum_columns:
        na_en, na_zh = "The answer has no sums or averages: ", "结果中没有求和或平均值："
        checks.append(Check("dominance", "pass", na_en + "the dominance rule does not apply.", na_zh + "支配规则不适用。"))
        checks.append(Check("p_percent", "pass", na_en + "the p% rule does not apply.", na_zh + "p% 规则不适用。"))
        checks.append(Check("negative", "pass", na_en + "no values to check for negatives.", na_zh + "无需检查负值。"))
        checks.append(Check("missing", "pass", na_en + "no values to check for missing ones.", na_zh + "无需检查缺失值。"))
        return checks

    negative_cells: set[int] = set()
    negative_cols: list[str] = []
    missing_cells: set[int] = set()
    missing_cols: list[str] = []
    nk_cells: set[int] = set()
    nk_cols: list[str] = []
    p_cells: set[int] = set()
    p_cols: list[str] = []
    for a in sum_columns:
        totals = _floats(stats, stat_column(a, "total"))
        mins = _floats(stats, stat_column(a, "min"))
        nulls = [int(x or 0) for x in stats[stat_column(a, "nulls")].to_pylist()]
        top1 = _floats(stats, stat_column(a, "top1"))
        top2 = _floats(stats, stat_column(a, "top2"))
        top_n = _top_n_sum(stats, a, t.dominance_n, totals)
        neg = {i for i in range(n_cells) if mins[i] is not None and mins[i] < 0}
        if neg:
            negative_cells |= neg
            negative_cols.append(a)
        # ACRO's mask is NaN, hence flagged, for the value of an empty two-way cell; not under DP
        miss = {i for i in range(n_cells) if nulls[i] > 0 or (empty[i] and not dp)}
        if miss:
            missing_cells |= miss
            missing_cols.append(a)
        nk = set()
        pp = set()
        for i in range(n_cells):
            if i in neg or not judged[i]:
                continue   # dominance is not defined with negative values; empty DP cells pass
            total = totals[i]
            # NK: top_n_sum / total >= k (0/0 and x/null are NaN in ACRO: pass)
            if total is not None and total != 0 and top_n[i] / total >= t.dominance_k:
                nk.add(i)
            # p%: (total - top1 - top2) / top1 < p, the raw difference when top1 == 0, NaN -> 1.0
            t1 = top1[i]
            if t1 is not None:
                sub = (total or 0.0) - (t1 + (top2[i] or 0.0))
                p_val = sub if t1 == 0 else sub / t1
                if p_val < t.p_ratio:
                    pp.add(i)
        if nk:
            nk_cells |= nk
            nk_cols.append(a)
        if pp:
            p_cells |= pp
            p_cols.append(a)

    n, k, p = t.dominance_n, t.dominance_k, t.p_ratio
    neg_note_en = (f" Dominance is not defined for the {_plural(len(negative_cells), 'cell')} with negative values "
                   f"(see the negative check).") if negative_cells else ""
    neg_note_zh = (f"含负值的 {len(negative_cells)} 个单元格无法定义支配规则（见负值检查）。"
                   if negative_cells else "")

    # -- dominance (ACRO NKCheck)
    checks.append(_dominance_like(
        "dominance", sorted(nk_cells), nk_cols, keys, cols, dp, negative_cells,
        pass_en=f"No cell is dominated: in every cell the largest {n} contributors hold less than k = {k:g} of "
                f"the total.",
        pass_zh=f"没有单元格被支配：每个单元格中最大的 {n} 个贡献者所占份额均低于 k = {k:g}。",
        fail_en=lambda c: f"{_cells_verb(c, 'fails', 'fail')} the (n, k) = ({n}, {k:g}) dominance rule in "
                          f"{_cols_en(nk_cols)}: the largest {n} contributors hold at least k of the cell's total.",
        fail_zh=lambda c: f"{c} 个单元格在 {_cols_zh(nk_cols)} 上未通过 (n, k) = ({n}, {k:g}) 支配规则："
                          f"最大的 {n} 个贡献者占单元格合计的比例不低于 k。",
        neg_en=neg_note_en, neg_zh=neg_note_zh))

    # -- p% (ACRO PPercentCheck)
    checks.append(_dominance_like(
        "p_percent", sorted(p_cells), p_cols, keys, cols, dp, negative_cells,
        pass_en=f"Every cell passes the p% rule (p = {p:g}): the contributors after the two largest add up to "
                f"at least p of the largest.",
        pass_zh=f"每个单元格均通过 p% 规则（p = {p:g}）：除最大两个以外的贡献者合计不少于最大贡献者的 p 倍。",
        fail_en=lambda c: f"{_cells_verb(c, 'fails', 'fail')} the p% rule (p = {p:g}) in {_cols_en(p_cols)}: the "
                          f"contributors after the two largest add up to less than p of the largest, so the "
                          f"second largest could estimate the largest closely (a cell whose values are all "
                          f"zero fails too, as in ACRO: it tells every contributor's value).",
        fail_zh=lambda c: f"{c} 个单元格在 {_cols_zh(p_cols)} 上未通过 p% 规则（p = {p:g}）：除最大两个以外的贡献者"
                          f"合计少于最大贡献者的 p 倍，第二大贡献者可据此精确估计最大者（与 ACRO 相同，全为零的单元格"
                          f"也不通过：它暴露了每个贡献者的值）。",
        neg_en=neg_note_en, neg_zh=neg_note_zh))

    # -- negative values (ACRO: both dominance checks answer review)
    if negative_cells:
        cnt = len(negative_cells)
        checks.append(Check(
            "negative", "review",
            f"{_cells_verb(cnt, 'holds', 'hold')} negative values in {_cols_en(negative_cols)}: the dominance and p% "
            f"rules are not defined there; check these cells by hand.",
            f"{cnt} 个单元格在 {_cols_zh(negative_cols)} 上含负值：支配规则和 p% 规则对其无定义，需人工检查。",
            _key_dicts(keys, cols, sorted(negative_cells)), cnt, negative_cols))
    else:
        checks.append(Check("negative", "pass", "No negative values in the summed columns.", "求和列中没有负值。"))

    # -- missing values (ACRO MissingCheck)
    if missing_cells:
        cnt = len(missing_cells)
        what_en = "missing (null) values, which the sums leave out" + ("" if dp else ", or no values at all")
        what_zh = "缺失（空）值（求和时被忽略）" + ("" if dp else "或完全没有值")
        checks.append(Check(
            "missing", "review",
            f"{_cells_verb(cnt, 'has', 'have')} in {_cols_en(missing_cols)} {what_en}; check that this is expected.",
            f"{cnt} 个单元格在 {_cols_zh(missing_cols)} 上有{what_zh}；请确认符合预期。",
            _key_dicts(keys, cols, sorted(missing_cells)), cnt, missing_cols))
    else:
        checks.append(Check("missing", "pass", "No missing values in the summed columns.", "求和列中没有缺失值。"))
    return checks


def _dp_empty_en(dp: bool) -> str:
    # said whether or not empty cells exist: which cells are empty is itself not to be told under DP
    return (" Cells without contributors, if any, pass: under differential privacy their published value is "
            "pure noise.") if dp else ""


def _dp_empty_zh(dp: bool) -> str:
    return "无贡献者的单元格（如有）通过：在差分隐私下其发布值为纯噪声。" if dp else ""


def _dominance_like(name: str, flagged: list[int], flagged_cols: list[str], keys: Sequence[str],
                    cols: Mapping[str, list[Any]], dp: bool, negative_cells: set[int], *, pass_en: str, pass_zh: str,
                    fail_en, fail_zh, neg_en: str, neg_zh: str) -> Check:
    if flagged:
        cnt = len(flagged)
        if dp:
            return Check(name, "review",
                         fail_en(cnt) + " The values carry differential-privacy noise, which already bounds what "
                                        "one contributor can reveal; the office decides." + neg_en,
                         fail_zh(cnt) + "这些值已加差分隐私噪声，噪声已限制单个贡献者的泄露程度；由办公室决定。" + neg_zh,
                         _key_dicts(keys, cols, flagged), cnt, flagged_cols)
        return Check(name, "fail", fail_en(cnt) + " Suppress or coarsen them." + neg_en,
                     fail_zh(cnt) + "需抑制或合并。" + neg_zh, _key_dicts(keys, cols, flagged), cnt, flagged_cols)
    if negative_cells:
        # ACRO's answer when negatives are present: review (the cells are the negative check's)
        return Check(name, "review", "No cell without negative values fails." + neg_en,
                     "不含负值的单元格均通过。" + neg_zh)
    return Check(name, "pass", pass_en, pass_zh)


# ---------------------------------------------------------------------------------------------
# Row checks

def _class_table(table: pa.Table, qis: list[str], sensitive: list[str]) -> pa.Table:
    aggs: list[tuple] = [([], "count_all")]
    for s in sensitive:
        aggs.append((s, "count_distinct", pc.CountOptions(mode="only_valid")))
    return table.select(qis + sensitive).group_by(qis, use_threads=False).aggregate(aggs)


def rows_checks(table: pa.Table, quasi_identifiers: list[str], sensitive: list[str], t: Thresholds, *,
                persons: int | None) -> list[Check]:
    """``k_anonymity`` and ``l_diversity`` over the quasi-identifier columns present in ``table``
    (a masked row output), and ``min_persons`` when ``persons`` (distinct people in the answer) is
    known. ``cells`` of a failing check are the quasi-identifier combinations of the failing classes
    (masked output values)."""
    qis = [c for c in quasi_identifiers if c in table.column_names]
    sens = [c for c in sensitive if c in table.column_names and c not in qis]
    checks: list[Check] = []
    if not qis:
        checks.append(Check("k_anonymity", "pass", "No quasi-identifier column is in the output.",
                            "输出中没有准标识符列。"))
        checks.append(Check("l_diversity", "pass",
                            "No quasi-identifier column is in the output, so no class can single anyone out.",
                            "输出中没有准标识符列，任何等价类都无法识别个人。"))
    else:
        classes = _class_table(table, qis, sens)
        sizes = classes["count_all"].to_pylist()
        qcols = {q: classes[q].to_pylist() for q in qis}
        k = t.k_anonymity
        small = [i for i, s in enumerate(sizes) if s < k]
        if small:   # which classes, never how many rows they hold (a count of the data)
            checks.append(Check(
                "k_anonymity", "fail",
                f"{_plural(len(small), 'equivalence class')} over {_cols_en(qis)} "
                f"{'has' if len(small) == 1 else 'have'} fewer than k = {k} rows; generalize or suppress these rows.",
                f"按 {_cols_zh(qis)} 划分的 {len(small)} 个等价类少于 k = {k} 行；需泛化或抑制这些行。",
                _key_dicts(qis, qcols, small), len(small), qis))
        else:
            checks.append(Check("k_anonymity", "pass",
                                f"Every equivalence class over {_cols_en(qis)} has at least k = {k} rows.",
                                f"按 {_cols_zh(qis)} 划分的每个等价类至少有 k = {k} 行。", columns=qis))
        l_ = t.l_diversity
        if not sens:
            checks.append(Check("l_diversity", "pass", "No sensitive column is in the output.", "输出中没有敏感列。"))
        else:
            low: set[int] = set()
            low_cols: list[str] = []
            for s in sens:
                distinct = classes[f"{s}_count_distinct"].to_pylist()
                bad = {i for i, d in enumerate(distinct) if 0 < d < l_}   # all-null classes tell nothing
                if bad:
                    low |= bad
                    low_cols.append(s)
            if low:
                checks.append(Check(
                    "l_diversity", "fail",
                    f"{_plural(len(low), 'equivalence class')} over {_cols_en(qis)} "
                    f"{'has' if len(low) == 1 else 'have'} fewer than l = {l_} distinct values of "
                    f"{_cols_en(low_cols)}: the class's sensitive value is known, or nearly, to anyone who can "
                    f"place a person in it.",
                    f"按 {_cols_zh(qis)} 划分的 {len(low)} 个等价类中 {_cols_zh(low_cols)} 的不同取值少于 l = {l_} 个："
                    f"能确定某人所属类别者即可（几乎）得知其敏感值。",
                    _key_dicts(qis, qcols, sorted(low)), len(low), low_cols))
            else:
                checks.append(Check(
                    "l_diversity", "pass",
                    f"Every equivalence class has at least l = {l_} distinct values of {_cols_en(sens)}.",
                    f"每个等价类中 {_cols_zh(sens)} 至少有 l = {l_} 个不同取值。", columns=sens))
    if persons is not None:
        m = t.min_cell_count
        if persons < m:
            checks.append(Check("min_persons", "fail",
                                f"The answer's rows come from fewer than {m} people.",
                                f"结果中的行来自少于 {m} 个人。"))
        else:
            checks.append(Check("min_persons", "pass", f"The answer's rows come from at least {m} people.",
                                f"结果中的行来自至少 {m} 个人。"))
    return checks


LINKED = "linked:"   # prefix of the columns `linked_rows` adds: "linked:visit_date"


def linked_rows(table: pa.Table, pseudonym: str, released: Sequence[tuple[pa.Table, str, Mapping[str, str]]]
                ) -> tuple[pa.Table, list[str]]:
    """``table`` (a new row answer) with one more column per field the ``released`` answers show:
    ``linked:<field>``, the distinct values (as text, sorted, ``" | "``-separated) those answers hold
    for the row's person, joined on the pseudonym column; null when they hold nothing for them.

    ``released``: per answer, its table, its person-pseudonym column and ``{column: field}`` of the
    columns to carry over (its quasi-identifiers and sensitive columns). Answers, and rows of an
    answer, whose pseudonyms never match add nothing: a scene whose answers are keyed apart gets
    ``table`` back with empty columns. Answers the new columns' names, in order."""
    by_person: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    fields: list[str] = []
    for other, other_pseudonym, carried in released:
        if other_pseudonym not in other.column_names:
            continue
        people = other[other_pseudonym].to_pylist()
        for column, field_name in carried.items():
            if column not in other.column_names:
                continue
            if field_name not in fields:
                fields.append(field_name)
            for person, value in zip(people, other[column].to_pylist()):
                if person is not None and value is not None:
                    by_person[str(person)][field_name].add(str(_json_value(value)))
    people = [None if v is None else str(v) for v in table[pseudonym].to_pylist()]
    out, names = table, []
    for field_name in fields:
        values = []
        for person in people:
            held = by_person.get(person, {}).get(field_name) if person is not None else None
            values.append(" | ".join(sorted(held)) if held else None)
        name = LINKED + field_name
        out = out.append_column(name, pa.array(values, pa.string()))
        names.append(name)
    return out, names


def _copies(counts: Counter) -> Iterable[tuple[str, int]]:
    """Each (identity, j) for j = 1..count: the j-th copy of a row that occurs several times."""
    for key, n in counts.items():
        for j in range(1, n + 1):
            yield key, j


def person_of(key: str) -> str:
    """The person a row identity belongs to: `<person>:<row>` (`sandbox.engine.execute.row_key_expr`); a
    dataset without a privacy unit (or an identity kept before persons were) makes each row its own."""
    person, sep, _ = key.partition(":")
    return person if sep else key


def _persons(copies: Iterable[tuple[str, int]]) -> int:
    return len({person_of(key) for key, _ in copies})


def differencing_check(keys: Sequence[str], earlier: Mapping[int, Sequence[str]], minimum: int, *,
                       unknown: Sequence[int] = (), against: str = "held or released") -> Check:
    """Whether a new row answer (``keys``: one identity per row) can be differenced against the
    scene's ``earlier`` row answers (result id -> their identities): fails when the rows it differs
    by from one of them belong to fewer than ``minimum`` persons but more than none, or when it cuts
    the regions they form into a part whose rows belong to fewer than ``minimum`` persons (see the
    module's docstring). Persons, not rows: ten visits of one person told apart still single them
    out. ``unknown``: earlier answers whose identities are not known (never compared): review.
    ``against``: which answers these are, for the reason ("held or released", "released")."""
    new = Counter(keys)
    olds = {rid: Counter(k) for rid, k in sorted(earlier.items())}
    close = []
    for rid, old in olds.items():
        d = _persons(_copies((new - old) + (old - new)))
        if 0 < d < minimum:
            close.append({"result_id": rid, "difference": d})
    # which earlier answers hold each copy of each row, then the region sizes, split by the new answer
    holders: dict[tuple[str, int], list[int]] = defaultdict(list)
    for rid, old in olds.items():
        for copy in _copies(old):
            holders[copy].append(rid)
    pieces: dict[tuple[tuple[int, ...], bool], list[tuple[str, int]]] = defaultdict(list)
    for copy, rids in holders.items():
        pieces[(tuple(rids), copy[1] <= new.get(copy[0], 0))].append(copy)
    for copy in _copies(new):
        if copy not in holders:
            pieces[((), True)].append(copy)
    small = []
    for (rids, inside), copies in sorted(pieces.items()):
        cut = not rids or (rids, not inside) in pieces   # the new answer drew this boundary
        n = _persons(copies)
        if cut and n < minimum:
            small.append({"results": list(rids), "this_answer": inside, "persons": n})
    compared = len(olds)
    named = sorted({c["result_id"] for c in close} | {r for c in small for r in c["results"]})
    if close or small:
        ids = ", ".join(f"#{r}" for r in named) or "none"
        return Check(
            "differencing", "fail",
            f"Compared with {compared} other {against} row {'answer' if compared == 1 else 'answers'} on the dataset, "
            f"this answer can be differenced: some rows are told apart by rows of fewer than {minimum} persons "
            f"(results {ids}). Reject it, or one of them, or widen the answer.",
            f"与该数据集上其他 {compared} 个{'已放行' if against == 'released' else '待审核或已放行'}的行级结果相比，"
            f"该结果可被差分：部分行的差异涉及少于 {minimum} 人（结果 {ids}）。请拒绝该结果或其中之一，或扩大结果范围。",
            (close + small)[:200], len(close) + len(small))
    if unknown:
        ids = ", ".join(f"#{r}" for r in unknown)
        return Check("differencing", "review",
                     f"Results {ids} hold rows whose identities were not kept: they could not be compared with "
                     f"this answer; compare them by hand.",
                     f"结果 {ids} 未保存行标识，无法与该结果比较；请人工比较。",
                     [{"result_id": r} for r in unknown], len(unknown))
    return Check("differencing", "pass",
                 f"Compared with {compared} other {against} row "
                 f"{'answer' if compared == 1 else 'answers'} on the dataset: no rows are told apart by rows of fewer than "
                 f"{minimum} persons.",
                 f"与该数据集上其他 {compared} 个{'已放行' if against == 'released' else '待审核或已放行'}的行级结果相比，"
                 f"没有涉及少于 {minimum} 人的差异。")


# ---------------------------------------------------------------------------------------------
# PII in string cells

def _is_text(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        return _is_text(t.value_type)
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def pii_check(table: pa.Table) -> Check:
    """Personal data (ID numbers, phones, names after a cue, …: ``sandbox.engine.pii``) in any string cell.
    Fails naming the columns, the kinds and how many cells; never the text."""
    from sandbox.engine.pii import find_pii_batch

    found: list[dict[str, Any]] = []
    cells_with_pii = 0
    for name in table.column_names:
        col = table[name]
        if not _is_text(col.type):
            continue
        if pa.types.is_dictionary(col.type):
            col = pc.cast(col, pa.large_string())
        # each distinct text once, then weighted by how many cells hold it
        counts = pc.value_counts(col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col)
        texts = counts.field("values").to_pylist()
        weights = counts.field("counts").to_pylist()
        kinds: set[str] = set()
        n = 0
        for w, findings in zip(weights, find_pii_batch(texts)):
            if findings:
                n += w
                kinds.update(f.kind for f in findings)
        if n:
            cells_with_pii += n
            found.append({"column": name, "kinds": sorted(kinds)})
    if not found:
        return Check("pii", "pass", "No personal data found in any text cell.", "文本单元格中未发现个人信息。")
    where_en = "; ".join(f"{f['column']} ({', '.join(f['kinds'])})" for f in found)
    where_zh = "；".join(f"{f['column']}（{'、'.join(f['kinds'])}）" for f in found)
    return Check("pii", "fail",
                 f"{_plural(cells_with_pii, 'text cell')} {'contains' if cells_with_pii == 1 else 'contain'} personal "
                 f"data: {where_en}. Mask or drop these columns.",
                 f"{cells_with_pii} 个文本单元格含个人信息：{where_zh}。需脱敏或删除这些列。",
                 found, cells_with_pii, [f["column"] for f in found])


# ---------------------------------------------------------------------------------------------
# Budget

def budget_check(epsilon_spent: float, epsilon_reserved: float, scene_spent: float, scene_budget: float) -> Check:
    """The ε ledger: fail if the answer spent more than it reserved; review once the scene has spent
    90% or more of its budget; pass otherwise. (ε values are the ledger's, not the data's.)"""
    if epsilon_spent > epsilon_reserved + 1e-9:
        return Check("budget", "fail",
                     f"The answer spent ε = {epsilon_spent:g}, more than the ε = {epsilon_reserved:g} reserved for it.",
                     f"该结果消耗 ε = {epsilon_spent:g}，超过为其预留的 ε = {epsilon_reserved:g}。")
    if scene_budget <= 0 or scene_spent >= 0.9 * scene_budget - 1e-12:
        share = 1.0 if scene_budget <= 0 else scene_spent / scene_budget
        return Check("budget", "review",
                     f"The scene has spent ε = {scene_spent:g} of its ε = {scene_budget:g} ({share:.0%}), 90% or more "
                     f"of its budget: consider whether more answers should leave.",
                     f"该场景已消耗 ε = {scene_spent:g}（预算 ε = {scene_budget:g}，{share:.0%}），达到或超过预算的 90%："
                     f"请考虑是否继续放行结果。")
    return Check("budget", "pass",
                 f"The answer spent ε = {epsilon_spent:g} of the ε = {epsilon_reserved:g} reserved; the scene has "
                 f"spent ε = {scene_spent:g} of ε = {scene_budget:g}.",
                 f"该结果消耗 ε = {epsilon_spent:g}（预留 ε = {epsilon_reserved:g}）；场景已消耗 ε = {scene_spent:g}"
                 f"（预算 ε = {scene_budget:g}）。")


def noisy_count_check(table: pa.Table, count_columns: Sequence[str], keys: Sequence[str], minimum: int) -> Check:
    """Every noisy COUNT of a DP answer (``table``, as released) at least ``minimum``: decided on the
    answer itself (post-processing of the DP release), never on an exact statistic. Below it: review,
    naming the cells by the key columns ``table`` shows."""
    counts = [c for c in count_columns if c in table.column_names]
    if not counts:
        return Check("noisy_counts", "pass", "The answer has no COUNT column.", "结果中没有计数列。")
    shown = [k for k in keys if k in table.column_names]
    cols = {k: table[k].to_pylist() for k in shown}
    found: set[int] = set()
    low_cols: list[str] = []
    for c in counts:
        bad = {i for i, v in enumerate(table[c].to_pylist()) if v is None or v < minimum}
        if bad:
            low_cols.append(c)
            found |= bad
    low = sorted(found)
    if low:
        return Check("noisy_counts", "review",
                     f"{_cells_verb(len(low), 'has', 'have')} a noisy count below {minimum} in {_cols_en(low_cols)}: "
                     f"not released without a person.",
                     f"{len(low)} 个单元格在 {_cols_zh(low_cols)} 上的加噪计数低于 {minimum}：须经人工审核。",
                     _key_dicts(shown, cols, low), len(low), low_cols)
    return Check("noisy_counts", "pass", f"Every noisy count is at least {minimum}.",
                 f"每个加噪计数都不低于 {minimum}。", columns=counts)


# ---------------------------------------------------------------------------------------------
# Report

def report(checks: list[Check]) -> dict[str, Any]:
    """``{"verdict", "checks", "summary", "summary_zh"}``, JSON-serializable. The verdict is the
    worst check's; with no check at all it is ``review`` (nothing vouches for the answer)."""
    if not checks:
        return {"verdict": "review", "checks": [], "summary": "review: no check ran.",
                "summary_zh": "需复核：未运行任何检查。"}
    verdict: Verdict = max((c.verdict for c in checks), key=_SEVERITY.__getitem__)
    failed = [c.name for c in checks if c.verdict == "fail"]
    review = [c.name for c in checks if c.verdict == "review"]
    total = len(checks)
    if verdict == "pass":
        en, zh = f"pass: all {total} checks passed.", f"通过：{total} 项检查全部通过。"
    else:
        parts_en, parts_zh = [], []
        if failed:
            parts_en.append(f"{len(failed)} of {total} failed ({', '.join(failed)})")
            parts_zh.append(f"{total} 项中 {len(failed)} 项未通过（{'、'.join(failed)}）")
        if review:
            parts_en.append(f"{len(review)} of {total} to review ({', '.join(review)})")
            parts_zh.append(f"{total} 项中 {len(review)} 项需复核（{'、'.join(review)}）")
        word_zh = "未通过" if verdict == "fail" else "需复核"
        en, zh = f"{verdict}: " + "; ".join(parts_en) + ".", f"{word_zh}：" + "；".join(parts_zh) + "。"
    return {"verdict": verdict, "checks": [c.as_dict() for c in checks], "summary": en, "summary_zh": zh}


def failing_checks(report: Mapping[str, Any] | None) -> list[str]:
    """The names of a report's checks that answered ``fail``."""
    return [c.get("name") for c in (report or {}).get("checks") or [] if c.get("verdict") == "fail"]


def failed_run(report: Mapping[str, Any] | None) -> bool:
    """A report stored for a prod run that failed inside the domain (its ``run`` check failed):
    there is nothing to release."""
    return "run" in failing_checks(report)


#: the checks that decide automatic release: none rests on an exact statistic of the data
AUTO_RELEASE_CHECKS = ("budget", "pii", "noisy_counts")


def auto_releasable(report: Mapping[str, Any], kind: str, dp: bool) -> bool:
    """Whether an answer may leave without a reviewer: only a DP aggregate whose budget, PII and
    noisy-count checks passed. The exact-statistic checks (cell count, dominance, …) are for the
    reviewers and auditors and do not decide it: "released at once" would otherwise tell the tenant
    an un-noised bit about the data."""
    verdicts = {c.get("name"): c.get("verdict") for c in report.get("checks") or []}
    return (kind == "aggregate" and dp
            and all(verdicts.get(name) == "pass" for name in AUTO_RELEASE_CHECKS))


# ---------------------------------------------------------------------------------------------
# Reviewers' remedies

def suppress(table: pa.Table, cells: Iterable[Mapping[str, Any]], keys: Sequence[str],
             value_columns: Sequence[str]) -> pa.Table:
    """``table`` with ``value_columns`` set to null in the rows whose ``keys`` match one of ``cells``
    (dicts as the checks give them: key values in JSON form, dates as ISO text)."""
    keys = list(keys)
    wanted = set()
    for cell in cells:
        missing = [k for k in keys if k not in cell]
        if missing:
            raise ValueError(f"a cell lacks the keys {missing}")
        wanted.add(tuple(_json_value(cell[k]) for k in keys))
    key_values = [[_json_value(v) for v in table[k].to_pylist()] for k in keys]
    hit = pa.array([tuple(row) in wanted for row in zip(*key_values)] if keys else [False] * table.num_rows,
                   pa.bool_())
    out = table
    for c in value_columns:
        i = out.schema.get_field_index(c)
        if i < 0:
            raise ValueError(f"no column {c!r}")
        col = out[c]
        out = out.set_column(i, out.schema.field(i), pc.if_else(hit, pa.scalar(None, col.type), col))
    return out


def round_values(table: pa.Table, columns: Sequence[str], base: float | int | Decimal) -> pa.Table:
    """``table`` with ``columns`` rounded to the nearest multiple of ``base`` (half to even, as
    ACRO's ``round_table``); integer columns stay integers (``base`` must then be whole), decimals
    stay decimals, nulls stay null."""
    if not (isinstance(base, int | float | Decimal) and not isinstance(base, bool) and base > 0):
        raise ValueError(f"base must be a positive number, not {base!r}")
    out = table
    for c in columns:
        i = out.schema.get_field_index(c)
        if i < 0:
            raise ValueError(f"no column {c!r}")
        col = out[c]
        typ = col.type
        if pa.types.is_integer(typ):
            if Decimal(str(base)) != Decimal(str(base)).to_integral_value():
                raise ValueError(f"an integer column cannot be rounded to a multiple of {base}")
            rounded = pc.round_to_multiple(col, multiple=int(base), round_mode="half_to_even")
            rounded = pc.cast(rounded, typ)
        elif pa.types.is_decimal(typ):
            b = Decimal(str(base))
            wide = pa.decimal128(38, typ.scale) if typ.precision < 38 else typ
            rounded = pc.round_to_multiple(pc.cast(col, wide), multiple=pa.scalar(b.quantize(Decimal(1).scaleb(
                -typ.scale)), wide), round_mode="half_to_even")
            rounded = pc.cast(rounded, typ)
        elif pa.types.is_floating(typ):
            rounded = pc.round_to_multiple(col, multiple=float(base), round_mode="half_to_even")
        else:
            raise ValueError(f"column {c!r} is not numeric")
        out = out.set_column(i, out.schema.field(i), rounded)
    return out
