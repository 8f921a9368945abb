"""sandbox/results/disclosure.py: the automatic disclosure checks, cell by cell against ACRO's own verdicts.

The crafted microdata are in tests/data/disclosure (tables.json says how each file is grouped and
under which thresholds); ACRO's verdicts on the same tables, recorded by
bench/peers/acro_verdicts.py in the peers venv, are in acro_verdicts.json. The slow test re-runs
that script and compares, so a new ACRO that judges differently is caught.
"""

from __future__ import annotations

import json
import subprocess
from datetime import date
from decimal import Decimal
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

from sandbox.results.disclosure import (
    AUTO_RELEASE_CHECKS,
    DEFAULTS,
    Check,
    Thresholds,
    aggregate_checks,
    auto_releasable,
    budget_check,
    cell_stats_from_frame,
    differencing_check,
    failed_run,
    failing_checks,
    linked_rows,
    noisy_count_check,
    pii_check,
    report,
    round_values,
    rows_checks,
    stricter_than_defaults,
    suppress,
)

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data" / "disclosure"
VERDICTS = DATA / "acro_verdicts.json"
PEERS_PY = REPO / "bench" / ".peers-venv" / "bin" / "python"
PEER_SCRIPT = REPO / "bench" / "peers" / "acro_verdicts.py"

#: ACRO check -> our check, per output ACRO made (frequency table "count", sum table "sum")
MIRRORED = {
    "count": {"MinimumThresholdCheck": "min_cell_count", "PresenceOfZeroCheck": "zeros"},
    "sum": {"MinimumThresholdCheck": "min_cell_count", "NKCheck": "dominance", "PPercentCheck": "p_percent",
            "MissingCheck": "missing"},
}
#: ACRO checks that always pass with an all-false mask: notes for a human, not per-cell rules
NOT_MIRRORED = {"PresenceOfLinkedTableCheck", "RequiredZeroCheck"}
_SEVERITY = {"pass": 0, "review": 1, "fail": 2}


def read_csv(name: str) -> pd.DataFrame:
    return pd.read_csv(DATA / name, keep_default_na=False, na_values=[""])


def our_checks(file: str, keys: list[str], value: str, t: Thresholds, *, dp: bool = False) -> dict[str, Check]:
    df = read_csv(file)
    # a two-way ACRO table has every combination of the observed levels, as pdao has every public cell
    domains = {k: sorted(df[k].unique()) for k in keys} if len(keys) > 1 else None
    stats = cell_stats_from_frame(df, keys, [value], domains=domains, top=t.dominance_n)
    return {c.name: c for c in aggregate_checks(stats, keys, [value], t, dp=dp)}


def cell_set(cells: list[dict], keys: list[str]) -> set[tuple]:
    return {tuple(c[k] for k in keys) for c in cells}


def acro_runs() -> list[tuple[str, dict]]:
    recorded = json.loads(VERDICTS.read_text(encoding="utf-8"))
    return [(f"{t['file']}:{'x'.join(t['keys'])}:{i}", t) for i, t in enumerate(recorded["tables"])]


# --------------------------------------------------------------------------------------------
# Against ACRO

def test_recorded_verdicts_cover_the_manifest():
    manifest = json.loads((DATA / "tables.json").read_text(encoding="utf-8"))
    recorded = json.loads(VERDICTS.read_text(encoding="utf-8"))
    expected = [(e["file"], k) for e in manifest["tables"] for k in e["keys"]]
    assert [(t["file"], t["keys"]) for t in recorded["tables"]] == expected
    assert recorded["acro_version"].startswith("1.")
    assert recorded["command"] == "bench/.peers-venv/bin/python bench/peers/acro_verdicts.py"


def test_defaults_are_acros():
    recorded = json.loads(VERDICTS.read_text(encoding="utf-8"))
    ours = DEFAULTS.as_dict()
    assert {k: ours[k] for k in recorded["acro_defaults"]} == recorded["acro_defaults"]


@pytest.mark.parametrize("label,table", acro_runs(), ids=[r[0] for r in acro_runs()])
def test_cell_by_cell_as_acro(label, table):
    keys, value = table["keys"], table["value"]
    t = Thresholds(**table["thresholds"])
    ours = our_checks(table["file"], keys, value, t)
    for output, acro in table["outputs"].items():
        worst = "pass"
        for name, verdict in acro["checks"].items():
            where = f"{label} {output} {name}"
            if name in NOT_MIRRORED:
                assert verdict == {"status": "pass", "cells": []}, where
                continue
            assert name in MIRRORED[output], f"{where}: ACRO runs a check we do not mirror"
            mine = ours[MIRRORED[output][name]]
            if name in ("NKCheck", "PPercentCheck") and verdict["status"] == "review":
                # ACRO's answer when a value is negative: review, masking the cells with negatives —
                # ours are the negative check's cells, and the dominance rule answers review too
                assert ours["negative"].verdict == "review", where
                assert cell_set(ours["negative"].cells, keys) == cell_set(verdict["cells"], keys), where
                assert mine.verdict == "review" and mine.cells == [], where
            else:
                assert mine.verdict == verdict["status"], where
                assert cell_set(mine.cells, keys) == cell_set(verdict["cells"], keys), where
                assert mine.counts == len(verdict["cells"]), where
            worst = max(worst, mine.verdict, key=_SEVERITY.__getitem__)
        assert worst == acro["status"], f"{label} {output}: overall"


@pytest.mark.slow
@pytest.mark.skipif(not PEERS_PY.exists(), reason="no bench/.peers-venv (see bench/peers-requirements.txt)")
def test_acro_live_matches_the_recorded_verdicts(tmp_path):
    out = subprocess.run([str(PEERS_PY), str(PEER_SCRIPT), str(DATA), "--stdout"], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path, check=True).stdout
    assert json.loads(out) == json.loads(VERDICTS.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------
# Thresholds

def test_thresholds_defaults_and_looser_ones():
    assert stricter_than_defaults(DEFAULTS) == []
    strict = Thresholds(min_cell_count=20, dominance_n=3, dominance_k=0.8, p_ratio=0.2, k_anonymity=10,
                        l_diversity=3)
    assert stricter_than_defaults(strict) == []
    loose = {"min_cell_count": 5, "dominance_n": 1, "dominance_k": 0.95, "p_ratio": 0.05,
             "zeros_disclosive": False, "k_anonymity": 3, "l_diversity": 1}
    for name, value in loose.items():
        found = stricter_than_defaults(Thresholds(**{name: value}))
        assert len(found) == 1 and name in found[0], name
    assert len(stricter_than_defaults(Thresholds(**loose))) == len(loose)


@pytest.mark.parametrize("bad", [{"min_cell_count": 0}, {"dominance_k": 0}, {"dominance_k": 1.5},
                                 {"p_ratio": -0.1}, {"dominance_n": 2.5}, {"zeros_disclosive": "yes"},
                                 {"k_anonymity": True}])
def test_thresholds_refuse_impossible_values(bad):
    with pytest.raises(ValueError):
        Thresholds(**bad)


# --------------------------------------------------------------------------------------------
# Cell stats

def test_cell_stats_per_person_and_empty_cells():
    df = pd.DataFrame({
        "district": ["A", "A", "A", "A", "B", "B"],
        "person": [1, 1, 1, 2, 3, None],
        "fee": [5.0, 6.0, None, 4.0, -2.0, 8.0],
    })
    stats = cell_stats_from_frame(df, ["district"], ["fee"], unit="person", domains={"district": ["A", "B", "C"]})
    rows = {r["district"]: r for r in stats.to_pylist()}
    assert rows["A"] == {"district": "A", "__persons": 2, "__rows": 4, "fee__total": 15.0, "fee__top1": 11.0,
                         "fee__top2": 4.0, "fee__min": 4.0, "fee__nulls": 1}
    # a null person is a contributor of its own
    assert rows["B"]["__persons"] == 2 and rows["B"]["fee__top1"] == 8.0 and rows["B"]["fee__min"] == -2.0
    assert rows["C"] == {"district": "C", "__persons": 0, "__rows": 0, "fee__total": None, "fee__top1": None,
                         "fee__top2": None, "fee__min": None, "fee__nulls": 0}
    assert stats.schema.field("__persons").type == pa.int64()
    assert stats.schema.field("fee__total").type == pa.float64()
    # without a unit, every row is its own contributor (ACRO's assumption)
    per_row = {r["district"]: r for r in cell_stats_from_frame(df, ["district"], ["fee"]).to_pylist()}
    assert per_row["A"]["__persons"] == 4 and per_row["A"]["fee__top1"] == 6.0 and per_row["A"]["fee__top2"] == 5.0


def test_min_cell_count_counts_people_not_rows():
    df = pd.DataFrame({"district": ["A"] * 30, "person": [1, 2, 3] * 10, "fee": [10.0] * 30})
    by_person = {c.name: c for c in aggregate_checks(cell_stats_from_frame(df, ["district"], ["fee"], unit="person"),
                                                     ["district"], ["fee"], DEFAULTS, dp=False)}
    by_row = {c.name: c for c in aggregate_checks(cell_stats_from_frame(df, ["district"], ["fee"]),
                                                  ["district"], ["fee"], DEFAULTS, dp=False)}
    assert by_person["min_cell_count"].verdict == "fail" and by_row["min_cell_count"].verdict == "pass"
    # three people with 100 each: the top two hold 2/3 of the total — passes; the p% rule fails
    assert by_person["dominance"].verdict == "pass" and by_person["p_percent"].verdict == "pass"


# --------------------------------------------------------------------------------------------
# Aggregate checks, by hand

def stats_table(cells: list[dict], alias: str = "fee") -> pa.Table:
    """Cell stats written out: each dict has key 'k' and persons/total/top1/top2/min/nulls."""
    return pa.table({
        "k": [c["k"] for c in cells],
        "__persons": pa.array([c["persons"] for c in cells], pa.int64()),
        "__rows": pa.array([c["persons"] for c in cells], pa.int64()),
        f"{alias}__total": pa.array([c.get("total") for c in cells], pa.float64()),
        f"{alias}__top1": pa.array([c.get("top1") for c in cells], pa.float64()),
        f"{alias}__top2": pa.array([c.get("top2") for c in cells], pa.float64()),
        f"{alias}__min": pa.array([c.get("min") for c in cells], pa.float64()),
        f"{alias}__nulls": pa.array([c.get("nulls", 0) for c in cells], pa.int64()),
    })


CLEAN = {"persons": 40, "total": 400.0, "top1": 20.0, "top2": 19.0, "min": 1.0}


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


#: the checks that decide automatic release, all passing: none rests on an exact statistic
PUBLIC_OK = [budget_check(0.5, 0.5, 0.5, 4.0), pii_check(pa.table({"k": ["A"]})),
             noisy_count_check(pa.table({"k": ["A"], "n": [50]}), ["n"], ["k"], 10)]


def test_each_aggregate_check_passes_on_a_clean_table():
    checks = aggregate_checks(stats_table([{"k": "A", **CLEAN}, {"k": "B", **CLEAN}]), ["k"], ["fee"], DEFAULTS,
                              dp=False)
    assert [c.name for c in checks] == ["min_cell_count", "zeros", "dominance", "p_percent", "negative", "missing"]
    assert all(c.verdict == "pass" and c.cells == [] and c.counts == 0 for c in checks)
    assert all(c.reason and c.reason_zh for c in checks)
    # the exact checks alone never let an answer out: only the public ones decide
    assert not auto_releasable(report(checks), "aggregate", dp=True)
    assert auto_releasable(report(checks + PUBLIC_OK), "aggregate", dp=True)


def test_each_aggregate_check_fails_or_asks_for_review():
    cells = [
        {"k": "small", **CLEAN, "persons": 3},
        {"k": "empty", "persons": 0},
        {"k": "dominated", **CLEAN, "top1": 395.0, "top2": 2.0},       # NK and p% fail
        {"k": "two", **CLEAN, "top1": 190.0, "top2": 180.0},           # NK 0.925 fails, p% 30/190 passes
        {"k": "negative", **CLEAN, "min": -3.0, "top1": 395.0},        # dominance not judged here
        {"k": "nulls", **CLEAN, "nulls": 2},
        {"k": "zero", **CLEAN, "total": 0.0, "top1": 0.0, "top2": 0.0, "min": 0.0},   # ACRO's p%: fails
    ]
    checks = by_name(aggregate_checks(stats_table(cells), ["k"], ["fee"], DEFAULTS, dp=False))
    assert checks["min_cell_count"].verdict == "fail"
    assert checks["min_cell_count"].cells == [{"k": "small"}, {"k": "empty"}]
    assert checks["zeros"].verdict == "fail" and checks["zeros"].cells == [{"k": "empty"}]
    assert checks["dominance"].verdict == "fail"
    assert checks["dominance"].cells == [{"k": "dominated"}, {"k": "two"}] and checks["dominance"].columns == ["fee"]
    assert checks["p_percent"].verdict == "fail" and checks["p_percent"].cells == [{"k": "dominated"}, {"k": "zero"}]
    assert checks["negative"].verdict == "review" and checks["negative"].cells == [{"k": "negative"}]
    # an empty cell's sum is ACRO's NaN, flagged with the null values
    assert checks["missing"].verdict == "review" and checks["missing"].cells == [{"k": "empty"}, {"k": "nulls"}]
    rep = report(list(checks.values()))
    assert rep["verdict"] == "fail" and not auto_releasable(rep, "aggregate", dp=True)


def test_negative_values_alone_make_dominance_review_as_in_acro():
    cells = [{"k": "A", **CLEAN}, {"k": "B", **CLEAN, "min": -1.0}]
    checks = by_name(aggregate_checks(stats_table(cells), ["k"], ["fee"], DEFAULTS, dp=False))
    assert checks["dominance"].verdict == "review" and checks["p_percent"].verdict == "review"
    assert checks["dominance"].cells == [] and "negative" in checks["dominance"].reason
    assert report(list(checks.values()))["verdict"] == "review"


def test_boundaries_follow_acros_comparisons():
    # NK: top2 / total == k fails (>=); p%: remainder / top1 == p passes (<)
    cells = [{"k": "nk", "persons": 10, "total": 100.0, "top1": 45.0, "top2": 45.0, "min": 1.25},
             {"k": "p", "persons": 10, "total": 160.0, "top1": 100.0, "top2": 50.0, "min": 1.25}]
    checks = by_name(aggregate_checks(stats_table(cells), ["k"], ["fee"], DEFAULTS, dp=False))
    assert checks["dominance"].cells == [{"k": "nk"}, {"k": "p"}]
    assert checks["p_percent"].verdict == "pass"


def test_dominance_n_beyond_the_stats_is_bounded_conservatively():
    # no fee__top3: top-3 sum <= min(total, top1 + 2*top2) = 90 of 100 -> fails k = 0.9
    cells = [{"k": "A", "persons": 20, "total": 100.0, "top1": 50.0, "top2": 20.0, "min": 1.0}]
    t = Thresholds(dominance_n=3)
    assert by_name(aggregate_checks(stats_table(cells), ["k"], ["fee"], t, dp=False))["dominance"].verdict == "fail"
    exact = stats_table(cells).append_column("fee__top3", pa.array([5.0]))    # 75 of 100 passes
    assert by_name(aggregate_checks(exact, ["k"], ["fee"], t, dp=False))["dominance"].verdict == "pass"


def test_dp_turns_fails_into_review_and_empty_cells_into_passes():
    cells = [{"k": "small", **CLEAN, "persons": 3}, {"k": "empty", "persons": 0},
             {"k": "dominated", **CLEAN, "top1": 395.0, "top2": 2.0}, {"k": "ok", **CLEAN}]
    checks = by_name(aggregate_checks(stats_table(cells), ["k"], ["fee"], DEFAULTS, dp=True))
    assert checks["min_cell_count"].verdict == "review" and checks["min_cell_count"].cells == [{"k": "small"}]
    assert "noise" in checks["min_cell_count"].reason
    assert checks["zeros"].verdict == "pass" and checks["zeros"].cells == []
    assert checks["dominance"].verdict == "review" and checks["dominance"].cells == [{"k": "dominated"}]
    assert checks["p_percent"].verdict == "review"
    assert checks["missing"].verdict == "pass"      # the empty cell is noise, not a missing value
    rep = report(list(checks.values()))
    assert rep["verdict"] == "review" and not auto_releasable(rep, "aggregate", dp=True)
    # an empty cell changes nothing under DP: the report is the same as without it
    with_empty = aggregate_checks(stats_table([{"k": "ok", **CLEAN}, {"k": "E9", "persons": 0}]), ["k"], ["fee"],
                                  DEFAULTS, dp=True)
    without = aggregate_checks(stats_table([{"k": "ok", **CLEAN}]), ["k"], ["fee"], DEFAULTS, dp=True)
    assert report(with_empty) == report(without)
    assert all(c.verdict == "pass" and not c.cells for c in with_empty)
    assert auto_releasable(report(with_empty + PUBLIC_OK), "aggregate", dp=True)


def test_dp_on_the_crafted_tables():
    ours = our_checks("dominance.csv", ["district", "sex"], "fee", DEFAULTS, dp=True)
    assert ours["dominance"].verdict == "review" and len(ours["dominance"].cells) == 5
    ours = our_checks("zeros.csv", ["district", "sex"], "fee", DEFAULTS, dp=True)
    assert ours["zeros"].verdict == "pass" and ours["min_cell_count"].verdict == "pass"
    assert ours["missing"].verdict == "pass" and ours["p_percent"].verdict == "review"


def test_counts_only_and_zeros_not_disclosive():
    t = Thresholds(zeros_disclosive=False)
    checks = by_name(aggregate_checks(stats_table([{"k": "A", **CLEAN}, {"k": "B", "persons": 0}]), ["k"], [], t,
                                      dp=False))
    assert checks["zeros"].verdict == "pass"
    assert checks["min_cell_count"].verdict == "fail"
    for name in ("dominance", "p_percent", "negative", "missing"):
        assert checks[name].verdict == "pass" and "no sums" in checks[name].reason


def test_missing_stats_columns_are_an_error():
    with pytest.raises(ValueError, match="lack"):
        aggregate_checks(stats_table([{"k": "A", **CLEAN}]).drop_columns(["fee__top2"]), ["k"], ["fee"], DEFAULTS,
                         dp=False)


def test_no_check_carries_a_statistic_value():
    # distinctive numbers, and a stricter threshold so that small cells can have them
    cells = [{"k": "A", "persons": 37, "total": 7331.25, "top1": 6113.0, "top2": 911.0, "min": -17.5, "nulls": 29},
             {"k": "B", "persons": 41, "total": 9173.5, "top1": 8219.0, "top2": 403.0, "min": 0.0, "nulls": 0},
             {"k": "C", "persons": 0}]
    t = Thresholds(min_cell_count=50)
    for dp in (False, True):
        checks = aggregate_checks(stats_table(cells), ["k"], ["fee"], t, dp=dp)
        checks.append(budget_check(0.5, 0.5, 1.0, 4.0))
        text = json.dumps(report(checks), ensure_ascii=False)
        for secret in ("37", "41", "7331", "9173", "6113", "8219", "911", "403", "17.5", "29"):
            assert secret not in text, (dp, secret)
        assert {"k": "A"} in by_name(checks)["min_cell_count"].cells


# --------------------------------------------------------------------------------------------
# Rows

def rows_table() -> pa.Table:
    return pa.Table.from_pandas(read_csv("rows_k.csv"), preserve_index=False)


def test_k_anonymity_and_l_diversity():
    checks = by_name(rows_checks(rows_table(), ["age_band", "district", "birth_year"], ["diagnosis"], DEFAULTS,
                                 persons=20))
    k = checks["k_anonymity"]
    assert k.verdict == "fail" and k.cells == [{"age_band": "35-39", "district": "金凤区"}] and k.counts == 1
    assert "k = 5" in k.reason and k.columns == ["age_band", "district"]
    l_ = checks["l_diversity"]
    assert l_.verdict == "fail" and l_.cells == [{"age_band": "40-44", "district": "西夏区"}]
    assert l_.columns == ["diagnosis"]
    assert checks["min_persons"].verdict == "pass"
    assert "艾滋病" not in json.dumps(report(list(checks.values())), ensure_ascii=False)


def test_rows_checks_pass_and_edge_cases():
    t = Thresholds(k_anonymity=5, l_diversity=1)
    table = rows_table().filter(pa.compute.not_equal(rows_table()["district"], "金凤区"))
    assert all(c.verdict == "pass" for c in rows_checks(table, ["age_band", "district"], ["diagnosis"], t,
                                                        persons=None))
    # no quasi-identifier in the output
    checks = rows_checks(rows_table().select(["person", "diagnosis"]), ["age_band"], ["diagnosis"], DEFAULTS,
                         persons=None)
    assert [(c.name, c.verdict) for c in checks] == [("k_anonymity", "pass"), ("l_diversity", "pass")]
    # too few people
    few = by_name(rows_checks(rows_table(), ["age_band"], [], DEFAULTS, persons=4))
    assert few["min_persons"].verdict == "fail" and "4" not in few["min_persons"].reason
    # an empty answer is k-anonymous (no class), but has no people
    empty = by_name(rows_checks(rows_table().slice(0, 0), ["age_band"], ["diagnosis"], DEFAULTS, persons=0))
    assert empty["k_anonymity"].verdict == "pass" and empty["min_persons"].verdict == "fail"


# --------------------------------------------------------------------------------------------
# PII

def test_pii_found_without_quoting_it():
    table = pa.Table.from_pandas(read_csv("pii.csv"), preserve_index=False).append_column(
        "n", pa.array([1, 2, 3, 4, 5]))
    check = pii_check(table)
    assert check.verdict == "fail" and check.counts == 3 and check.columns == ["complaint"]
    assert check.cells == [{"column": "complaint", "kinds": ["cn_id", "name", "phone"]}]
    text = json.dumps(check.as_dict(), ensure_ascii=False)
    for secret in ("13912345678", "640104198503121231", "张伟", "王芳", "0013"):
        assert secret not in text


def test_pii_clean_and_dictionary_columns():
    table = pa.table({"district": pa.array(["兴庆区", "金凤区", None]).dictionary_encode(),
                      "note": ["复诊", "咳嗽三天", None]})
    assert pii_check(table).verdict == "pass"
    dirty = pa.table({"note": pa.array(["电话13912345678", "电话13912345678", "复诊"]).dictionary_encode()})
    check = pii_check(dirty)
    assert check.verdict == "fail" and check.counts == 2 and check.cells == [{"column": "note", "kinds": ["phone"]}]


# --------------------------------------------------------------------------------------------
# Budget, report

def test_budget_check():
    assert budget_check(0.5, 0.5, 1.0, 4.0).verdict == "pass"
    assert budget_check(0.5 + 1e-12, 0.5, 1.0, 4.0).verdict == "pass"
    over = budget_check(0.6, 0.5, 1.0, 4.0)
    assert over.verdict == "fail" and "0.6" in over.reason
    assert budget_check(0.5, 0.5, 3.6, 4.0).verdict == "review"      # exactly 90%
    near = budget_check(0.5, 0.5, 3.9, 4.0)
    assert near.verdict == "review" and "90%" in near.reason and near.reason_zh
    assert budget_check(0.5, 0.5, 3.5, 4.0).verdict == "pass"


def test_report_shape_and_auto_release():
    ok = Check("a", "pass", "fine", "好")
    rv = Check("b", "review", "look", "看")
    bad = Check("c", "fail", "no", "否", [{"k": date(2024, 1, 1)}], 1)
    rep = report([ok, rv, bad])
    assert rep["verdict"] == "fail" and set(rep) == {"verdict", "checks", "summary", "summary_zh"}
    assert rep["checks"][2] == {"name": "c", "verdict": "fail", "reason": "no", "reason_zh": "否",
                                "cells": [{"k": "2024-01-01"}], "counts": 1, "columns": []}
    json.dumps(rep)
    assert "c" in rep["summary"] and "b" in rep["summary"] and "未通过" in rep["summary_zh"]
    assert report([ok, rv])["verdict"] == "review"
    passing = report([ok])
    json.dumps(passing)
    assert passing["verdict"] == "pass" and "all 1 checks" in passing["summary"]
    assert not auto_releasable(passing, "aggregate", dp=True)      # no public check vouches for it
    public = report([ok, *PUBLIC_OK])
    assert auto_releasable(public, "aggregate", dp=True)
    assert not auto_releasable(public, "aggregate", dp=False)
    assert not auto_releasable(public, "rows", dp=True)
    assert report([])["verdict"] == "review" and not auto_releasable(report([]), "aggregate", dp=True)
    assert failing_checks(rep) == ["c"] and failing_checks(None) == [] and not failed_run(rep)
    assert failed_run(report([Check("run", "fail", "failed", "失败")]))
    with pytest.raises(ValueError):
        Check("x", "maybe", "", "")


def test_check_cells_are_json_values():
    df = pd.DataFrame({"month": [date(2024, 1, 1)] * 3 + [date(2024, 2, 1)] * 12, "fee": [1.0] * 15})
    checks = by_name(aggregate_checks(cell_stats_from_frame(df, ["month"], ["fee"]), ["month"], ["fee"], DEFAULTS,
                                      dp=False))
    assert checks["min_cell_count"].cells == [{"month": "2024-01-01"}]
    json.dumps(report(list(checks.values())))


# --------------------------------------------------------------------------------------------
# Remedies

def test_suppress_the_flagged_cells():
    table = pa.table({"district": ["A", "A", "B", "C"], "month": [date(2024, 1, 1), date(2024, 2, 1)] * 2,
                      "n": pa.array([12, 3, 40, 7], pa.int64()), "total": [10.5, 2.0, 30.0, 1.0]})
    cells = [{"district": "A", "month": "2024-02-01"}, {"district": "C", "month": "2024-02-01"}]
    out = suppress(table, cells, ["district", "month"], ["n", "total"])
    assert out["n"].to_pylist() == [12, None, 40, None]
    assert out["total"].to_pylist() == [10.5, None, 30.0, None]
    assert out.schema == table.schema and table["n"].to_pylist() == [12, 3, 40, 7]   # pure
    assert suppress(table, [], ["district"], ["n"]).equals(table)
    with pytest.raises(ValueError):
        suppress(table, [{"district": "A"}], ["district", "month"], ["n"])


def test_round_values_to_a_base():
    table = pa.table({"n": pa.array([12, 13, None, 15, 25], pa.int32()),
                      "x": [1.2, 2.5, 7.5, None, 12.49],
                      "money": pa.array([Decimal("12.34"), Decimal("17.50"), None, Decimal("22.50"),
                                         Decimal("0.00")], pa.decimal128(10, 2)),
                      "label": ["a", "b", "c", "d", "e"]})
    out = round_values(table, ["n", "x", "money"], 5)
    assert out["n"].type == pa.int32() and out["n"].to_pylist() == [10, 15, None, 15, 25]
    assert out["x"].to_pylist() == [0.0, 0.0, 10.0, None, 10.0]     # ties to even, as ACRO's round_table
    assert round_values(table, ["n"], 10)["n"].to_pylist() == [10, 10, None, 20, 20]
    assert out["money"].type == pa.decimal128(10, 2)
    assert out["money"].to_pylist() == [Decimal("10.00"), Decimal("20.00"), None, Decimal("20.00"), Decimal("0.00")]
    assert table["n"].to_pylist() == [12, 13, None, 15, 25]                      # pure
    assert round_values(table, ["x"], 0.5)["x"].to_pylist() == [1.0, 2.5, 7.5, None, 12.5]
    with pytest.raises(ValueError):
        round_values(table, ["n"], 2.5)
    with pytest.raises(ValueError):
        round_values(table, ["label"], 5)
    with pytest.raises(ValueError):
        round_values(table, ["x"], 0)


# --------------------------------------------------------------------------------------------
# Automatic release: public facts and the noisy answer only

def test_auto_release_is_decided_by_public_checks_only():
    assert AUTO_RELEASE_CHECKS == ("budget", "pii", "noisy_counts")
    exact = aggregate_checks(stats_table([{"k": "small", **CLEAN, "persons": 3},
                                          {"k": "dominated", **CLEAN, "top1": 395.0, "top2": 2.0}]),
                             ["k"], ["fee"], DEFAULTS, dp=True)
    assert {c.verdict for c in exact} >= {"review"}
    # exact statistics that would have held it do not decide: the answer goes out on public facts
    assert auto_releasable(report(exact + PUBLIC_OK), "aggregate", dp=True)
    # each public check, when it does not pass, holds it; and each must be there
    low = noisy_count_check(pa.table({"k": ["A", "B"], "n": [50, 9]}), ["n"], ["k"], 10)
    near_budget = budget_check(0.5, 0.5, 3.9, 4.0)
    dirty = pii_check(pa.table({"k": ["电话 13912345678"]}))
    for bad in (low, near_budget, dirty):
        checks = [c for c in PUBLIC_OK if c.name != bad.name] + [bad]
        assert bad.verdict != "pass" and not auto_releasable(report(exact + checks), "aggregate", dp=True), bad.name
    for name in AUTO_RELEASE_CHECKS:
        assert not auto_releasable(report([c for c in PUBLIC_OK if c.name != name]), "aggregate", dp=True), name


def test_noisy_counts_name_the_cells_below_the_minimum():
    table = pa.table({"district": ["A", "B", "C"], "n": pa.array([12, 9, None], pa.int64()),
                      "visits": [100, 100, 3], "total": [5.0, 1.0, 2.0]})
    check = noisy_count_check(table, ["n", "visits"], ["district"], 10)
    assert check.verdict == "review" and check.cells == [{"district": "B"}, {"district": "C"}]
    assert check.columns == ["n", "visits"] and check.counts == 2 and "10" in check.reason and check.reason_zh
    assert noisy_count_check(table, ["visits"], ["district", "hidden"], 3).verdict == "pass"
    assert noisy_count_check(table, [], ["district"], 10).verdict == "pass"   # no COUNT: nothing to hold
    # a key the output does not show names no cell (its values are not in the answer)
    assert noisy_count_check(table, ["n"], ["hidden"], 10).cells == [{}, {}]


# --------------------------------------------------------------------------------------------
# Row answers against each other

def keys(*spans: tuple[int, int]) -> list[str]:
    return [f"row{i}" for a, b in spans for i in range(a, b)]


def test_differencing_counts_persons_not_rows():
    """Ten visits of one person told apart single that person out as surely as one visit."""
    first = [f"p{i // 3}:row{i}" for i in range(60)]            # 20 persons, 3 rows each
    one_more = first + [f"p99:row{100 + j}" for j in range(10)]   # ten more rows, all of one person
    check = differencing_check(one_more, {7: first}, 10)
    assert check.verdict == "fail" and {"result_id": 7, "difference": 1} in check.cells
    many = first + [f"p{100 + j}:row{100 + j}" for j in range(10)]   # ten more rows of ten persons
    assert differencing_check(many, {7: first}, 10).verdict == "pass"


def test_differencing_one_row_apart_fails_naming_the_earlier_answer():
    first = keys((0, 40))
    check = differencing_check(keys((0, 41)), {7: first}, 10)
    assert check.verdict == "fail" and check.name == "differencing"
    assert {"result_id": 7, "difference": 1} in check.cells
    assert {"results": [], "this_answer": True, "persons": 1} in check.cells
    assert "#7" in check.reason and "#7" in check.reason_zh
    # the same rows, or far enough apart, pass; so does an unrelated answer
    assert differencing_check(list(reversed(first)), {7: first}, 10).verdict == "pass"
    assert differencing_check(keys((0, 50)), {7: first}, 10).verdict == "pass"
    assert differencing_check(keys((100, 140)), {7: first}, 10).verdict == "pass"
    # a subset is judged by its difference like any pair
    assert differencing_check(keys((0, 35)), {7: first}, 10).verdict == "fail"
    assert differencing_check(keys((0, 30)), {7: first}, 10).verdict == "pass"


def test_differencing_sees_three_answers_that_no_pair_gives_away():
    a, b = keys((0, 20)), keys((21, 41))           # each pair is far apart …
    c = keys((0, 41))                              # … but C − A − B is row 20 alone
    assert differencing_check(c, {1: a}, 10).verdict == "pass"
    assert differencing_check(c, {2: b}, 10).verdict == "pass"
    check = differencing_check(c, {1: a, 2: b}, 10)
    assert check.verdict == "fail" and check.cells == [{"results": [], "this_answer": True, "persons": 1}]
    # a region the new answer cuts into a small part fails too (A's rows: 19 kept, 1 left out)
    check = differencing_check(keys((0, 19), (21, 41)), {1: a, 2: b}, 10)
    assert check.verdict == "fail" and {"results": [1], "this_answer": False, "persons": 1} in check.cells


def test_differencing_counts_identical_rows_and_unknown_answers():
    # two identical records are two rows: one more copy is a difference of one
    assert differencing_check(["x"] * 12, {3: ["x"] * 11}, 10).cells[0] == {"result_id": 3, "difference": 1}
    assert differencing_check(["x"] * 12, {3: ["x"] * 12}, 10).verdict == "pass"
    check = differencing_check(keys((0, 40)), {}, 10, unknown=[4, 5])
    assert check.verdict == "review" and check.cells == [{"result_id": 4}, {"result_id": 5}]
    # the first answer of a scene is judged by its own size: its rows no other answer holds
    assert differencing_check(keys((0, 9)), {}, 10).verdict == "fail"
    assert differencing_check([], {1: keys((0, 40))}, 10).verdict == "pass"     # nothing new, nothing cut
    assert differencing_check(keys((0, 40)), {}, 10, against="released").reason.count("released") == 1


def test_linked_rows_carry_what_released_answers_say_of_the_same_person():
    new = pa.table({"p": ["a", "b", "c", None], "month": ["2024-01"] * 4})
    released = [(pa.table({"p": ["a", "a", "b"], "month": ["2023-05", "2023-07", "2023-05"],
                           "chapter": ["V", "X", "IX"]}), "p", {"month": "visit_date", "chapter": "icd10_chapter"}),
                (pa.table({"q": ["c"], "month": ["2022-01"]}), "q", {"month": "visit_date"})]
    out, names = linked_rows(new, "p", released)
    assert names == ["linked:visit_date", "linked:icd10_chapter"]
    assert out["linked:visit_date"].to_pylist() == ["2023-05 | 2023-07", "2023-05", "2022-01", None]
    assert out["linked:icd10_chapter"].to_pylist() == ["V | X", "IX", None, None]
    assert out.select(["p", "month"]).equals(new)
    # joined, the answer's only class splits into classes of one person: k-anonymity fails
    checks = by_name(rows_checks(out, ["month", "linked:visit_date"], [], Thresholds(k_anonymity=2), persons=None))
    assert by_name(rows_checks(new, ["month"], [], Thresholds(k_anonymity=2), persons=None))["k_anonymity"].verdict \
        == "pass"
    assert checks["k_anonymity"].verdict == "fail"
    # pseudonyms that never match add only empty columns
    out, _ = linked_rows(new, "p", [(pa.table({"p": ["zz"], "month": ["2023-05"]}), "p", {"month": "visit_date"})])
    assert out["linked:visit_date"].null_count == 4
