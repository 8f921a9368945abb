"""What a tenant can observe about a prod run, decided in one place (rule 6 of the house).

A prod run reads the real data, so whatever its tenant can see of it — its status, an error, when it
ended, its size, a refund — either does not depend on the data or is paid for in ε.
`docs/threat-model.md` lists every signal with the test that holds it; these are the rules that
make the code true to it, shared by queries (`sandbox.queries.service`, `sandbox.worker`) and template runs
(`sandbox.templates.runs`):

- **A run that fails after the data was touched is not told.** It is stored `held`, like any answer,
  with a failed `run` check that only reviewers and auditors read, and its ε is charged like any
  run's: a failure, a time limit, a lost worker, a cast the engine could not make all look like a
  held answer to the tenant until a reviewer decides (and a failed run is never released).
  Refusals before any data is read — the scene suspended, an item struck since submission — depend
  on the scene only: they are told (`failed`) and refunded.
- **Cancelling** a queued job refunds it (nothing was read); cancelling a running one stops it and
  charges it (whether it had already finished would depend on how long the data took).
- **Timing**: a prod run's outcome becomes visible at the end of its *timing class*, its duration
  rounded up to `base × 2ⁿ` seconds (`PDAO_PROD_TIMING_BASE_SECONDS`), so its time says which
  class it fell in, never the exact time the data took. Progress is not shown while it runs.
- **Shape**: until a result is released, its tenant sees the planned column names (the same for a
  failed run), never its size, hash or cells.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from pdao.kernel.config import Settings
from sandbox.engine.execute import PlannedAnswer
from sandbox.results import disclosure, export
from sandbox.results.models import Query, QueryResult

RUN_CHECK = "run"            # the check a failed run's report fails (never releasable, not even by override)

# Codes of refusals that happen before a run reads any data (told to the tenant, refunded).
BEFORE_DATA = frozenset({"scene_not_active", "not_permitted", "query_refused", "upload_join_mismatch",
                         "no_version", "not_found"})


def timing_class_end(elapsed: float, base: float) -> float:
    """The end of the timing class a run of `elapsed` seconds falls in: the smallest `base × 2ⁿ`
    (n ≥ 0) not below it. `base` 0 (or less) turns the classes off."""
    if base <= 0:
        return elapsed
    end = base
    while end < elapsed:
        end *= 2
    return end


def wait_for_class_end(started: float, base: float, *, at_least: float = 0.0,
                       stop: Callable[[], bool] | None = None, step: float = 0.1) -> bool:
    """Sleep until the timing class of a run started at `started` (time.monotonic) ends: the class of
    its duration, or of `at_least` seconds (what the plan predicts, `planned_seconds`) when that is
    longer — so a run that fails fast shows when a run of the same plan that succeeds would. False
    when `stop()` became true first."""
    if base <= 0:   # classes off (tests only): no padding at all
        return True
    end = started + timing_class_end(max(time.monotonic() - started, at_least), base)
    while True:
        left = end - time.monotonic()
        if left <= 0:
            return True
        if stop is not None and stop():
            return False
        time.sleep(min(step, left))


# What the plan predicts a run takes, from public facts only: about 6 µs per unit of the cost model
# (sandbox.engine.execute.COST_PER_CELL) and 25 ns per snapshot row per statement, doubled for slack.
SECONDS_PER_COST_UNIT = 12e-6
SECONDS_PER_ROW = 50e-9
SECONDS_PER_MASKED_VALUE = 50e-6


def planned_seconds(execution: Any) -> float:
    """A lower bound for the timing class of a prod run of this plan (public facts: the cost model,
    the version's row count, the masked columns): a run that fails, or is cancelled, early does not
    show earlier than a run of the same plan that succeeds typically would."""
    from sandbox.engine.execute import group_cells, query_cost

    checked = execution.checked
    rows = execution.dataset.row_count * SECONDS_PER_ROW
    if checked.kind == "rows":
        return rows + execution.max_rows * len(checked.masked) * SECONDS_PER_MASKED_VALUE
    try:
        _, cells = group_cells(execution)
    except Exception:  # noqa: BLE001 - a plan refused at submission would not run; no floor
        return rows
    return 2 * rows + query_cost(checked, cells) * SECONDS_PER_COST_UNIT


def failed_run_check(code: str) -> disclosure.Check:
    return disclosure.Check(
        RUN_CHECK, "fail",
        f"The run did not complete inside the domain ({code}); nothing can be released. Reject it.",
        f"运行未能在域内完成（{code}），没有可放行的内容，请驳回。")


def is_failed_run(report: dict[str, Any] | None) -> bool:
    return any(c.get("name") == RUN_CHECK and c.get("verdict") == "fail" for c in (report or {}).get("checks", []))


def held_failure(settings: Settings, q: Query, planned: PlannedAnswer, code: str, *, kind: str,
                 report_extra: dict[str, Any] | None = None) -> QueryResult:
    """The result of a prod run that failed inside the domain: an empty answer with what the plan
    says a tenant sees of any held answer (columns, noise, ε, number of cells), held, its report a
    failed `run` check. The caller adds it (and charges the run) in the transaction that ends the job."""
    empty = pa.table({name: pa.array([], pa.string()) for name in planned.columns})
    path, digest = export.store_table(settings, q.scene_id, f"q{q.id}-failed-{uuid.uuid4().hex[:12]}.parquet", empty)
    report = {**disclosure.report([failed_run_check(code)]), "failed": code,
              "columns": {"keys": [], "values": [], "sums": []} if kind == "aggregate"
              else {"quasi_identifiers": [], "sensitive": []}, **(report_extra or {})}
    return QueryResult(query_id=q.id, scene_id=q.scene_id, org_id=q.org_id, synthetic=False, kind=kind,
                       status="held", columns=[{"name": name, "type": None} for name in planned.columns],
                       row_count=planned.row_count, noise=planned.noise, notes=[],
                       epsilon_spent=planned.epsilon_spent, storage_path=path, sha256=digest, report=report,
                       content_fp=None)


def planned_columns(r: QueryResult) -> list[dict[str, Any]]:
    """The columns a tenant sees of an answer not yet released: names only (their types can follow
    the data, e.g. a column with no value at all)."""
    return [{"name": c["name"], "type": None} for c in r.columns]


__all__ = ["BEFORE_DATA", "RUN_CHECK", "failed_run_check", "held_failure", "is_failed_run", "planned_columns",
           "timing_class_end", "wait_for_class_end"]
