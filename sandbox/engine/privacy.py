"""Differential privacy for aggregate answers: OpenDP's mechanisms on the engine's bounded aggregates.

Issue 4, item 3 (the noise part; the budget ledger and the job runner are elsewhere). Every noise
scale, privacy loss and sensitivity here comes from OpenDP (`opendp==0.16.0`, low-level API, no
polars); nothing samples noise by hand.

The model
---------
- The privacy unit is the person. The engine keeps at most `max_contributions` (k) rows per person
  and clamps every value to the field's catalog bounds [L, U] *before* aggregating; this module
  receives the exact bounded aggregates and releases them. Neighbouring data sets differ by at most
  k rows (OpenDP: `symmetric_distance()` with d_in = k, what `dp.unit_of(contributions=k)` means).
- Group keys come from public value domains: the engine outputs every one of the `n_groups` cells
  of the domain (product), zero-count cells too, in a fixed order. Nothing is selected by the data,
  so no key selection is needed, and a person's k rows touch at most min(k, n_groups) cells.
- Budget: the query's ε (pure DP, Laplace) or ρ (zCDP, Gaussian) is split evenly over the SELECT's
  aggregates (or by `weights`). Groups are disjoint, so they compose in parallel: no split over
  groups. AVG releases a noisy SUM and a noisy COUNT together, as OpenDP's `dp.mean` does: one
  global factor g, each scale = its one-row sensitivity × g, the smallest g within the share; so
  each spends half (exactly for integer fields; within ~1e-7 for floats, whose rounding term is the
  same at one row and at k rows, so the sum's share is smaller by about that term's weight).

Per aggregate (OpenDP constructors give the sensitivity d_in of the release, and the release's
measurement; its scale is the smallest, found with OpenDP's `binary_search`, for which the
measurement's own privacy map at d_in stays within the share):

  ============== =============================================== =====================================
  aggregate      sensitivity of the released vector (over groups) measurement applied to exact values
  ============== =============================================== =====================================
  COUNT(*)       make_count_by_categories(...).map(k) = k        make_laplace / make_gaussian on the
  COUNT(DISTINCT make_count_distinct(...).map(k) = k             i64 vector of counts (discrete noise)
   person)
  SUM (integer)  clamp >> make_sum: k·max(|L|,|U|)               same, on the i64 vector of sums
  SUM (float)    clamp >> make_bounded_float_checked_sum          make_laplace / make_gaussian on the
                 (max_length, Sequential): k·max(|L|,|U|) + r,    f64 vector of sums
                 plus r per further group (L1; √n_groups·r in
                 L2), r = OpenDP's float-rounding relaxation
  AVG            SUM and COUNT as above, ~half the share each    noisy sum / noisy count
  MEDIAN,        clamp >> make_private_quantile(candidates, q)   invoked on each group's bounded
  QUANTILE_CONT  per group; loss = min(k, n_groups) × map(k)     values (exponential mechanism)
  ============== =============================================== =====================================

This is exactly what OpenDP's own Polars `dp.Context` reports for the equivalent query (a
`group_by(key).agg(...).with_keys(domain)` with `Margin(by=[key], max_length=…, max_groups=n_groups)`):
`tests/test_privacy.py` checks every shape against `summarize()`. Two notes on that equivalence:

- Float sums: OpenDP charges for floating-point rounding in a sum of up to `max_length` values
  (the paper "Widespread Underestimation of Sensitivity…"), once per group. `max_length` is a public
  bound on the rows of any one group (not a count read from the data); it is required for sums over
  non-integer fields. The bound covers any summation order (DuckDB's parallel sums included).
- Quantiles: the Context composes the per-group selections as l0 × (loss at l_inf = k) with
  l0 = min(k, n_groups); we do the same (conservative; Σ over groups of d_g ≤ k would allow less
  noise). The Context reports the selection's scale in raw score units, which are
  `alpha_den` × OpenDP's `make_private_quantile` scale used here (the rank units: a scale of s
  means the score, a distance in records from the target rank, is noised at scale s).

Accuracy: a 95% (1 − alpha) half-width from OpenDP's `*_scale_to_accuracy` for the Laplace and
Gaussian releases. AVG: from the noisy sum and count (post-processing), with each at alpha/2 so the
union bound gives 1 − alpha. Quantiles have no OpenDP accuracy (its summarize shows null): we give
the standard selection bound in records — with probability ≥ 1 − alpha the chosen candidate's
score (its distance in records from the target rank q·n) exceeds the best candidate's by at most
scale · ln((|candidates| − 1) / alpha). In value units add the candidate grid's step
(`candidate_step` in the summary): the best candidate is only as fine as the grid.

Public API: `plan_noise(...) -> NoisePlan`, `apply_noise(plan, exact_values)`, `preview(...)`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Any, Protocol

import numpy as np
import opendp.prelude as dp

from pdao.kernel.errors import PdaoError

dp.enable_features("contrib")

ALPHA = 0.05                 # 95% error bounds
DEFAULT_CANDIDATES = 101     # quantile candidates: an even grid over the bounds, ends included
PURE, ZCDP = "epsilon", "rho"
FUNCTIONS = ("count", "count_distinct", "sum", "avg", "median", "quantile")


class AggregateLike(Protocol):
    """`sandbox.engine.sql.Aggregate`, or anything with the same four attributes."""

    function: str
    q: float | None
    alias: str

    @property
    def field(self) -> str | None: ...


class NoisePlanError(PdaoError):
    """The aggregates cannot be given differential privacy as asked (422 `dp_not_possible`)."""

    def __init__(self, message: str, message_zh: str, alias: str | None = None) -> None:
        super().__init__(422, "dp_not_possible", message, message_zh,
                         details={"aggregate": alias} if alias else None)


# ---------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class NoisePart:
    """One noisy release: the OpenDP measurement applied to an exact bounded aggregate.

    `measurement` takes the exact aggregate vector over the groups (COUNT/SUM), or one group's
    bounded values (quantile: invoked once per group). `sensitivity` is its d_in (L1 for Laplace,
    L2 for Gaussian, over the group vector; for a quantile, the per-group symmetric distance k).
    `loss` is what it spends (ε or ρ), as OpenDP's privacy map says (quantile: × `parallel`)."""

    name: str                        # "count" | "sum" | "quantile"
    distribution: str                # as the Context's summarize() names it
    measurement: dp.Measurement
    stability: dp.Transformation     # the OpenDP transformation whose map gave the sensitivity
    sensitivity: int | float
    scale: float
    loss: float
    integer: bool                    # the released values are integers (discrete noise)
    parallel: int = 1                # quantile: groups one person may touch, charged each
    n_candidates: int = 0            # quantile: how many candidates it selects from

    def accuracy(self, alpha: float = ALPHA) -> float:
        """The (1 − alpha) half-width of the noise: value units, or records for a quantile."""
        if self.name == "quantile":
            n = self.n_candidates
            return 0.0 if n <= 1 else self.scale * math.log((n - 1) / alpha)
        if self.scale == 0:
            return 0.0
        gaussian = "Gaussian" in self.distribution
        if self.integer:
            f = dp.discrete_gaussian_scale_to_accuracy if gaussian else dp.discrete_laplacian_scale_to_accuracy
        else:
            f = dp.gaussian_scale_to_accuracy if gaussian else dp.laplacian_scale_to_accuracy
        return float(f(self.scale, alpha))


@dataclass(frozen=True)
class AggregateNoise:
    """How one aggregate is released: its share of the budget and its noisy parts."""

    alias: str
    function: str
    field: str | None
    q: float | None
    share: float                     # the budget share given to it
    parts: tuple[NoisePart, ...]     # avg: (sum, count); others: one part
    bounds: tuple[float, float] | None
    candidates: tuple[float, ...] | None = None

    @property
    def loss(self) -> float:
        return sum(p.loss for p in self.parts)

    @property
    def scale(self) -> float:
        """The noise scale of a one-part release (avg: the sum's; see `parts` for both)."""
        return self.parts[0].scale

    def accuracy(self, alpha: float = ALPHA) -> float | None:
        """The (1 − alpha) error bound known before release; None for avg (depends on the count)."""
        if self.function == "avg":
            return None
        return self.parts[0].accuracy(alpha)

    @property
    def accuracy_unit(self) -> str:
        return "records" if self.candidates else "value"

    def summary(self, alpha: float = ALPHA) -> dict[str, Any]:
        out: dict[str, Any] = {
            "alias": self.alias, "function": self.function, "field": self.field, "q": self.q,
            "loss": self.loss, "accuracy": self.accuracy(alpha), "accuracy_unit": self.accuracy_unit,
            "parts": [{"part": p.name, "distribution": p.distribution, "scale": p.scale,
                       "sensitivity": p.sensitivity, "loss": p.loss,
                       "accuracy": p.accuracy(alpha)}
                      for p in self.parts],
        }
        if self.candidates:
            out["candidate_step"] = _grid_step(self.candidates)
        if self.function == "avg":
            out["note"] = ("the mean's error depends on the group's count: about "
                           "(sum accuracy + |mean| × count accuracy) / count")
        return out


@dataclass(frozen=True)
class NoisePlan:
    """The noise for one query: built without data; `apply_noise` releases it once. Charge `spent`
    (what OpenDP's privacy maps say the releases cost, ≤ `budget`) before releasing."""

    measure: str                     # "epsilon" (pure DP, Laplace) | "rho" (zCDP, Gaussian)
    budget: float                    # the ε or ρ asked for
    max_contributions: int
    n_groups: int
    max_length: int | None
    alpha: float
    aggregates: tuple[AggregateNoise, ...]
    _applied: list[bool] = dc_field(default_factory=list, repr=False, compare=False)

    @property
    def spent(self) -> float:
        """What the releases spend by OpenDP's privacy maps (≤ `budget`; sequential composition)."""
        return sum(a.loss for a in self.aggregates)

    def by_alias(self, alias: str) -> AggregateNoise:
        for a in self.aggregates:
            if a.alias == alias:
                return a
        raise KeyError(alias)

    def summary(self) -> dict[str, Any]:
        return {"measure": self.measure, "budget": self.budget, "spent": self.spent,
                "max_contributions": self.max_contributions, "n_groups": self.n_groups,
                "confidence": 1 - self.alpha,
                "aggregates": [a.summary(self.alpha) for a in self.aggregates]}


# ---------------------------------------------------------------------------------------------
# OpenDP building blocks


def _records(T: str) -> tuple[dp.Domain, dp.Metric]:
    """A column of records, neighbouring when they differ by added or removed rows."""
    atom = dp.atom_domain(T=T) if T == "i64" else dp.atom_domain(T=T, nan=False)
    return dp.vector_domain(atom), dp.symmetric_distance()


def _noise(measure: str, integer: bool, scale: float) -> dp.Measurement:
    """Laplace (pure DP, L1) or Gaussian (zCDP, L2) noise on a vector of aggregates; discrete on
    integers, OpenDP's exact float sampler on floats."""
    T = "i64" if integer else "f64"
    domain = dp.vector_domain(dp.atom_domain(T=T) if integer else dp.atom_domain(T=T, nan=False))
    if measure == PURE:
        return dp.m.make_laplace(domain, dp.l1_distance(T=T), scale)
    return dp.m.make_gaussian(domain, dp.l2_distance(T=T), scale)


def _distribution(measure: str, integer: bool) -> str:
    return f"{'Integer' if integer else 'Float'} {'Laplace' if measure == PURE else 'Gaussian'}"


@dataclass(frozen=True)
class _Stability:
    """An aggregate's sensitivity, from an OpenDP transformation: at k rows (what the release must
    cover) and at one row (its c-stability: OpenDP's Context scales noise in proportion to it)."""

    name: str
    transformation: dp.Transformation
    at_k: float
    at_one: float
    integer: bool


def _part(measure: str, st: _Stability, scale: float) -> NoisePart:
    m = _noise(measure, st.integer, scale)
    return NoisePart(st.name, _distribution(measure, st.integer), m, st.transformation, st.at_k, scale,
                     float(m.map(st.at_k)), st.integer)


def _calibrated(measure: str, stabilities: Sequence[_Stability], share: float) -> tuple[NoisePart, ...]:
    """Noise for statistics released together, as OpenDP's Context does for one query: each scale is
    its statistic's one-row sensitivity × one global factor g, the smallest g whose total loss (by
    the measurements' own privacy maps at k rows) stays within `share`. For a single statistic this
    is simply the smallest scale within the share."""
    live = tuple((st.integer, st.at_one, st.at_k) for st in stabilities if st.at_k != 0)
    g = _global_factor(measure, live, share) if live else 0.0
    return tuple(_part(measure, st, st.at_one * g if st.at_k != 0 else 0.0) for st in stabilities)


# Calibrations depend on public facts only (the measure, sensitivities, the share of ε): each is
# searched once per process and reused (a binary search over OpenDP's privacy maps costs ~30 ms, and a
# query of many like aggregates, or the same plan at submission and at run, would repeat it).
@functools.lru_cache(maxsize=4096)
def _global_factor(measure: str, live: tuple[tuple[bool, float, float], ...], share: float) -> float:
    def loss(g: float) -> float:
        return sum(float(_noise(measure, integer, at_one * g).map(at_k)) for integer, at_one, at_k in live)

    return float(dp.binary_search(lambda g: loss(g) <= share, T=float))


def _up(x: float) -> float:
    return math.nextafter(x, math.inf)


@functools.lru_cache(maxsize=1024)
def _count_stability(measure: str, k: int, n_groups: int, distinct: bool) -> _Stability:
    space = _records("i64")
    metric = dp.L1Distance["i64"] if measure == PURE else dp.L2Distance["i64"]
    if distinct:
        # distinct persons: a person's k rows add at most 1 to each of at most k cells
        t = dp.t.make_count_distinct(*space, TO="i64")
    else:
        # COUNT(*) by a public key domain: the group index of each row, counted per category
        t = dp.t.make_count_by_categories(*space, categories=list(range(n_groups)), null_category=False,
                                          MO=metric, TOA="i64")
    return _Stability("count", t, int(t.map(k)), int(t.map(1)), True)


def _sum_stability(measure: str, k: int, n_groups: int, bounds: tuple[float, float], integer: bool,
                   max_length: int | None, alias: str) -> _Stability:
    if not integer and max_length is None:
        raise NoisePlanError(
            f"{alias}: a sum of a non-integer field needs max_length, a public bound on the rows of any "
            "one group (OpenDP charges for floating-point rounding in sums up to that length)",
            f"{alias}：非整数字段求和需要 max_length（任一分组行数的公开上界，OpenDP 据此计入浮点舍入误差）", alias)
    return _sum_stability_of(measure, k, n_groups, (float(bounds[0]), float(bounds[1])), integer, max_length)


@functools.lru_cache(maxsize=1024)
def _sum_stability_of(measure: str, k: int, n_groups: int, bounds: tuple[float, float], integer: bool,
                      max_length: int | None) -> _Stability:
    if integer:
        lo, hi = int(bounds[0]), int(bounds[1])
        t = _records("i64") >> dp.t.then_clamp((lo, hi)) >> dp.t.then_sum()
        # integer sums are exact: no rounding to pay for in any group
        return _Stability("sum", t, int(t.map(k)), int(t.map(1)), True)
    lo, hi = float(bounds[0]), float(bounds[1])
    t_sum = dp.t.make_bounded_float_checked_sum(max_length, (lo, hi), S="Sequential<f64>")
    t = _records("f64") >> dp.t.then_clamp((lo, hi)) >> t_sum
    relaxation = float(t_sum.map(0))      # r: the rounding of one group's sum, paid by every group
    extra = (n_groups - 1) if measure == PURE else math.sqrt(n_groups) - 1

    def over_groups(d: int) -> float:     # one group's k·max(|L|,|U|) + r, plus r per further group
        one = float(t.map(d))
        return _up(one + _up(extra * relaxation)) if n_groups > 1 else one

    return _Stability("sum", t, over_groups(k), over_groups(1), False)


def _quantile_part(measure: str, k: int, n_groups: int, share: float, bounds: tuple[float, float],
                   candidates: Sequence[float], q: float) -> NoisePart:
    om = dp.max_divergence() if measure == PURE else dp.zero_concentrated_divergence()
    prefix = _records("f64") >> dp.t.then_clamp((float(bounds[0]), float(bounds[1])))
    cands = [float(c) for c in candidates]
    parallel = min(k, n_groups)

    def chain(s: float) -> dp.Measurement:
        return prefix >> dp.m.then_private_quantile(om, cands, q, s)

    scale = _quantile_scale(measure, k, n_groups, share, (float(bounds[0]), float(bounds[1])), tuple(cands), float(q))
    m = chain(scale)
    dist = "ExponentialMin" if measure == PURE else "GumbelMin"
    return NoisePart("quantile", dist, m, prefix, k, scale, parallel * float(m.map(k)), False,
                     parallel, len(cands))


@functools.lru_cache(maxsize=1024)
def _quantile_scale(measure: str, k: int, n_groups: int, share: float, bounds: tuple[float, float],
                    cands: tuple[float, ...], q: float) -> float:
    """The smallest scale of the private quantile within the share (see `_quantile_part`; cached)."""
    om = dp.max_divergence() if measure == PURE else dp.zero_concentrated_divergence()
    prefix = _records("f64") >> dp.t.then_clamp(bounds)
    parallel = min(k, n_groups)

    def chain(s: float) -> dp.Measurement:
        return prefix >> dp.m.then_private_quantile(om, list(cands), q, s)

    return float(dp.binary_search(lambda s: parallel * chain(s).map(k) <= share, T=float))


def _grid_step(candidates: Sequence[float]) -> float:
    return float(np.max(np.diff(candidates))) if len(candidates) > 1 else 0.0


def quantile_candidates(bounds: tuple[float, float], n: int = DEFAULT_CANDIDATES,
                        integer: bool = False) -> tuple[float, ...]:
    """Candidates from the public bounds alone: an even grid, ends included (whole numbers for an
    integer field)."""
    lo, hi = float(bounds[0]), float(bounds[1])
    grid = np.linspace(lo, hi, max(n, 2)) if hi > lo else np.array([lo])
    if integer:
        grid = np.unique(np.round(grid))
    return tuple(float(x) for x in grid)


# ---------------------------------------------------------------------------------------------
# Entry points


def plan_noise(aggregates: Sequence[AggregateLike], *, epsilon: float | None = None,
               rho: float | None = None, bounds: Mapping[str, tuple[float, float]],
               max_contributions: int, n_groups: int = 1, max_length: int | None = None,
               integer_fields: Collection[str] = (), weights: Sequence[float] | None = None,
               candidates: Mapping[str, Sequence[float]] | None = None,
               n_candidates: int = DEFAULT_CANDIDATES, alpha: float = ALPHA) -> NoisePlan:
    """Plan the noise for one aggregate query; nothing is released and nothing is spent.

    aggregates: the checked query's aggregates (`CheckedQuery.aggregates`);
    epsilon | rho: the query's budget: ε for pure DP (Laplace), or ρ for zCDP (Gaussian);
    bounds: field -> (L, U), the catalog bounds the engine clamps to (numbers);
    max_contributions: k, the rows kept per person;
    n_groups: the cells of the group keys' public domain (1 without GROUP BY);
    max_length: a public bound on the rows of any one group (needed for sums of non-integer fields);
    integer_fields: fields whose values (and bounds) are whole numbers: exact integer sums with
      discrete noise;
    weights: split the budget over the aggregates by these weights (default: evenly);
    candidates / n_candidates: quantile candidates per field (default: an even grid over the bounds);
    alpha: 1 − the confidence of the error bounds.
    """
    if (epsilon is None) == (rho is None):
        raise ValueError("give exactly one of epsilon (pure DP) or rho (zCDP)")
    measure, budget = (PURE, float(epsilon)) if epsilon is not None else (ZCDP, float(rho))  # type: ignore[arg-type]
    if not (budget > 0 and math.isfinite(budget)):
        raise ValueError(f"the budget must be a positive number, not {budget!r}")
    if int(max_contributions) != max_contributions or max_contributions < 1:
        raise ValueError("max_contributions must be a whole number ≥ 1")
    if int(n_groups) != n_groups or n_groups < 1:
        raise ValueError("n_groups must be a whole number ≥ 1")
    if max_length is not None and (int(max_length) != max_length or max_length < 1):
        raise ValueError("max_length must be a whole number ≥ 1")
    if not 0 < alpha < 1:
        raise ValueError("alpha must be in (0, 1)")
    if not aggregates:
        raise ValueError("no aggregates to plan")
    k, n_groups = int(max_contributions), int(n_groups)
    if weights is None:
        weights = [1.0] * len(aggregates)
    if len(weights) != len(aggregates) or any(not (w > 0) for w in weights):
        raise ValueError("weights: one positive weight per aggregate")
    total = float(sum(weights))
    shares = [budget * w / total for w in weights]
    while sum(shares) > budget:   # float rounding must never hand out more than the budget
        shares = [math.nextafter(x, 0.0) for x in shares]
    candidates = candidates or {}

    planned: list[AggregateNoise] = []
    for agg, share in zip(aggregates, shares):
        fn, field, alias = agg.function, agg.field, agg.alias
        if fn not in FUNCTIONS:
            raise NoisePlanError(f"{alias}: {fn} has no differentially private release",
                                 f"{alias}：{fn} 不支持差分隐私发布", alias)
        if fn == "count":
            parts = _calibrated(measure, [_count_stability(measure, k, n_groups, False)], share)
            planned.append(AggregateNoise(alias, fn, field, None, share, parts, None))
            continue
        if fn == "count_distinct":
            parts = _calibrated(measure, [_count_stability(measure, k, n_groups, True)], share)
            planned.append(AggregateNoise(alias, fn, field, None, share, parts, None))
            continue
        b = bounds.get(field) if field is not None else None
        if b is None or len(b) != 2 or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in b) \
                or b[0] > b[1]:
            raise NoisePlanError(
                f"{alias}: {fn.upper()} needs numeric bounds [L, U] for {field} to bound each person's "
                "contribution", f"{alias}：{fn.upper()} 需要字段 {field} 的数值上下界 [L, U] 以限制每人贡献", alias)
        b = (float(b[0]), float(b[1]))
        integer = field in integer_fields
        if integer and not all(float(x).is_integer() for x in b):
            raise ValueError(f"{field}: an integer field needs whole-number bounds, got {b}")
        if fn == "sum":
            parts = _calibrated(measure, [_sum_stability(measure, k, n_groups, b, integer, max_length, alias)],
                                share)
            planned.append(AggregateNoise(alias, fn, field, None, share, parts, b))
        elif fn == "avg":
            # noisy sum / noisy count, released together with one global scale (OpenDP's dp.mean)
            parts = _calibrated(measure, [_sum_stability(measure, k, n_groups, b, integer, max_length, alias),
                                          _count_stability(measure, k, n_groups, False)], share)
            planned.append(AggregateNoise(alias, fn, field, None, share, parts, b))
        else:  # median | quantile
            q = 0.5 if fn == "median" else agg.q
            if q is None or not 0 <= q <= 1:
                raise ValueError(f"{alias}: the quantile must be in [0, 1], got {q!r}")
            cands = tuple(float(c) for c in candidates[field]) if field in candidates \
                else quantile_candidates(b, n_candidates, integer)
            if any(not (b[0] <= c <= b[1]) for c in cands) or any(x >= y for x, y in zip(cands, cands[1:])):
                raise ValueError(f"{alias}: candidates must be increasing and within the bounds {b}")
            parts = (_quantile_part(measure, k, n_groups, share, b, cands, float(q)),)
            planned.append(AggregateNoise(alias, fn, field, float(q), share, parts, b, cands))
    plan = NoisePlan(measure, budget, k, n_groups, max_length, alpha, tuple(planned))
    # each part's loss is within its share by construction; sequential composition adds them up
    if plan.spent > budget:
        raise RuntimeError(f"planned releases spend {plan.spent} > budget {budget}")
    return plan


def preview(aggregates: Sequence[AggregateLike], **kwargs: Any) -> dict[str, Any]:
    """What a query would cost and how accurate it would be, without touching data or the budget.
    Takes `plan_noise`'s arguments; answers `NoisePlan.summary()` (budget, spent, per aggregate:
    loss, scale(s), (1 − alpha) error bound)."""
    return plan_noise(aggregates, **kwargs).summary()


@dataclass(frozen=True)
class NoisyAggregate:
    """One aggregate's released values (post-processing such as ORDER BY/LIMIT comes after)."""

    alias: str
    function: str
    values: list[Any]                # one per group, in the domain's order (avg: None if no estimate)
    scale: float                     # the noise scale (avg: the sum's; `scales` has all)
    scales: tuple[float, ...]
    accuracy: list[float | None]     # (1 − alpha) error bound, per group
    accuracy_unit: str               # "value" | "records" (quantile: distance from the target rank)
    loss: float


def _vector(values: Any, n: int, integer: bool, alias: str, what: str) -> Any:
    arr = np.asarray(values)
    if arr.shape != (n,):
        raise ValueError(f"{alias}: expected {n} exact {what} (one per group), got shape {arr.shape}")
    if integer:
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr) & (arr == np.round(arr))):
            raise ValueError(f"{alias}: exact {what} must be whole numbers")
        return [int(x) for x in arr]
    if not np.all(np.isfinite(arr.astype(float))):
        raise ValueError(f"{alias}: exact {what} must be finite numbers")
    return [float(x) for x in arr]


def apply_noise(plan: NoisePlan, exact_values: Mapping[str, Any]) -> dict[str, NoisyAggregate]:
    """Release the query: invoke each planned OpenDP measurement on the exact bounded aggregates.

    exact_values: alias -> for count / count_distinct / sum, a sequence of `n_groups` exact values;
    for avg, a pair (sums, counts) (or {"sum": …, "count": …}); for median / quantile, a sequence of
    `n_groups` arrays, each group's (bounded) values. Spends `plan.spent`: charge it before calling.
    A plan releases once: a second call is refused (it would spend the budget again)."""
    if plan._applied:
        raise RuntimeError("this plan has already been released; plan again (and charge again) to re-release")
    missing = [a.alias for a in plan.aggregates if a.alias not in exact_values]
    if missing:
        raise ValueError(f"no exact values for {', '.join(missing)}")
    n = plan.n_groups
    inputs: list[Any] = []
    for a in plan.aggregates:       # check every input before anything is released
        raw = exact_values[a.alias]
        if a.function in ("count", "count_distinct", "sum"):
            inputs.append(_vector(raw, n, a.parts[0].integer, a.alias, "values"))
        elif a.function == "avg":
            sums, counts = (raw["sum"], raw["count"]) if isinstance(raw, Mapping) else raw
            inputs.append((_vector(sums, n, a.parts[0].integer, a.alias, "sums"),
                           _vector(counts, n, True, a.alias, "counts")))
        else:
            if len(raw) != n:
                raise ValueError(f"{a.alias}: expected {n} groups of values, got {len(raw)}")
            groups = []
            for g in raw:
                arr = np.array(g, dtype=np.float64, copy=True).ravel()   # OpenDP wants a writable array
                if np.isnan(arr).any():
                    raise ValueError(f"{a.alias}: values must not be NaN (fill or drop them in the engine)")
                groups.append(arr)
            inputs.append(groups)
    plan._applied.append(True)

    out: dict[str, NoisyAggregate] = {}
    for a, x in zip(plan.aggregates, inputs):
        scales = tuple(p.scale for p in a.parts)
        if a.function in ("count", "count_distinct", "sum"):
            p = a.parts[0]
            values = list(p.measurement(x))
            acc = p.accuracy(plan.alpha)
            out[a.alias] = NoisyAggregate(a.alias, a.function, values, p.scale, scales, [acc] * n, "value", a.loss)
        elif a.function == "avg":
            ps, pc = a.parts
            noisy_sums, noisy_counts = ps.measurement(x[0]), pc.measurement(x[1])
            acc_s, acc_c = ps.accuracy(plan.alpha / 2), pc.accuracy(plan.alpha / 2)
            lo, hi = a.bounds  # type: ignore[misc]
            values, accs = [], []
            for s, c in zip(noisy_sums, noisy_counts):
                if c <= 0:   # post-processing: no estimate from a non-positive noisy count
                    values.append(None)
                    accs.append(None)
                    continue
                mean = min(max(s / c, lo), hi)   # the exact mean of clamped values lies in [L, U]
                bound = (acc_s + abs(s / c) * acc_c) / (c - acc_c) if c > acc_c else math.inf
                values.append(mean)
                accs.append(min(bound, hi - lo))
            out[a.alias] = NoisyAggregate(a.alias, a.function, values, ps.scale, scales, accs, "value", a.loss)
        else:
            p = a.parts[0]
            values = [float(p.measurement(g)) for g in x]
            acc = p.accuracy(plan.alpha)
            out[a.alias] = NoisyAggregate(a.alias, a.function, values, p.scale, scales, [acc] * n, "records",
                                          a.loss)
    return out
