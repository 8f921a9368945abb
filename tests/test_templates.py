"""Approved analysis templates (sandbox/templates/library.py, issue #6 parts 2–5).

Pure and engine layer only: no metadata database. A small synthetic city (sandbox.synth, scale
3000) is generated once; applicants and claims uploads are built from it (valid, missing, expired,
not-yet-valid and malformed consent; ID numbers that are not in the data; claims copied from real
stays and perturbed for each discrepancy class). The shipped templates' answers are compared with a
plain pandas computation on the same files, and the checker's refusals are named output by output.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from decimal import Decimal
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pdao.kernel.errors import PdaoError
from sandbox.engine.sql import DatasetInfo, upload_view_name, view_name
from sandbox.synth import generate
from sandbox.templates.library import (
    EXCLUSION_REASONS,
    Output,
    Param,
    Template,
    TemplateRefused,
    check_template,
    consent_condition,
    library,
    library_template,
    load_template,
    render,
    run_template,
    template_digest,
    template_from_mapping,
    template_reads,
    validate_params,
)

AS_OF = dt.date(2025, 6, 30)          # the analysis date of the look-back windows
RUN_DATE = dt.date(2026, 1, 15)       # the date consent is checked against
RES, CHR, INP, SET = "health.resident", "health.chronic_condition", "health.inpatient_stay", "health.insurance_settlement"
UW_OUTPUTS = ["applicant_ref", "resident_found", "hypertension", "diabetes", "coronary", "cancer_history",
              "stays_1y", "stays_3y", "stays_5y", "max_inpatient_cost_band"]
UNKNOWN_IDS = ["11010519491231002X", "640104199001010011", "640106198512120022", "640181200002290033"]


# ---------------------------------------------------------------------------------------------
# Data


@pytest.fixture(scope="module")
def city(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return generate(tmp_path_factory.mktemp("city"), scale=3000, seed=7, twin=False)


@pytest.fixture(scope="module")
def frames(city: dict[str, Path]) -> dict[str, pd.DataFrame]:
    return {code: pq.read_table(p).to_pandas() for code, p in city.items()}


def _consent(i: int) -> tuple[str | None, str | None, str | None, str | None]:
    """(consent_ref, valid_from, valid_until, expected exclusion reason) by position, on RUN_DATE."""
    kind = i % 10
    if kind == 1:
        return None, "2025-01-01", "2027-01-01", "no_consent_ref"
    if kind == 2:
        return "  ", "2025-01-01", "2027-01-01", "no_consent_ref"
    if kind == 3:
        return f"AUTH-{i}", "2024-01-01", "2025-12-31", "expired"
    if kind == 4:
        return f"AUTH-{i}", "2026-02-01", "2027-01-01", "not_yet_valid"
    if kind == 5 and i % 20 == 5:
        return f"AUTH-{i}", "not a date", "2027-01-01", "invalid_period"
    return f"AUTH-{i}", "2025-06-01", "2026-06-01", None


@pytest.fixture(scope="module")
def applicants(tmp_path_factory: pytest.TempPathFactory, frames: dict[str, pd.DataFrame]) -> tuple[Path, pd.DataFrame]:
    res = frames[RES]
    with_stays = set(frames[INP].person_id)
    ids = list(res[res.person_id.isin(with_stays)].id_number) + list(res[~res.person_id.isin(with_stays)].id_number[:40])
    ids += UNKNOWN_IDS
    rows = []
    for i, idn in enumerate(ids):
        ref, start, end, reason = _consent(i)
        rows.append({"applicant_ref": f"A{i:04d}", "id_number": idn, "consent_ref": ref,
                     "consent_valid_from": start, "consent_valid_until": end, "extra_note": "ignored", "expect_reason": reason})
    df = pd.DataFrame(rows)
    path = tmp_path_factory.mktemp("up") / "applicants.parquet"
    pq.write_table(pa.Table.from_pandas(df.drop(columns="expect_reason"), preserve_index=False), path)
    return path, df


def _claim_rows(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    res, stays = frames[RES], frames[INP]
    idn = dict(zip(res.person_id, res.id_number))
    hospitals = sorted(set(stays.hospital))
    settled = set(frames[SET].stay_id.dropna())
    rows = []
    for j, s in enumerate(stays.sort_values("stay_id").itertuples()):
        admit, discharge, cost = s.admit_date, s.discharge_date, float(s.total_cost)
        other = next(h for h in hospitals if h != s.hospital)
        kind = ["exact", "dates", "hospital", "amount", "within", "no_stay"][j % 6]
        if s.stay_id not in settled:
            kind = "unsettled"      # a real stay the fund never settled (the person is uninsured)
        claim = {"hospital": s.hospital, "admit_date": admit, "discharge_date": discharge, "amount": cost}
        if kind == "dates":
            claim["discharge_date"] = discharge + dt.timedelta(days=2)
        elif kind == "hospital":
            claim["hospital"] = other
        elif kind == "amount":
            claim["amount"] = round(cost * 1.2 + 100, 2)
        elif kind == "within":
            claim["amount"] = round(cost * 1.03, 2)
        elif kind == "no_stay":
            claim["admit_date"], claim["discharge_date"] = dt.date(2012, 3, 1), dt.date(2012, 3, 9)
        rows.append({"claim_ref": f"C{j:04d}", "id_number": idn[s.person_id], "kind": kind, **claim})
    for k, unknown in enumerate(UNKNOWN_IDS):
        rows.append({"claim_ref": f"X{k}", "id_number": unknown, "kind": "unknown", "hospital": hospitals[0],
                     "admit_date": dt.date(2024, 1, 1), "discharge_date": dt.date(2024, 1, 5), "amount": 1000.0})
    df = pd.DataFrame(rows)
    consent = [_consent(i) if k != "unsettled" else _consent(0) for i, k in enumerate(df.kind)]
    df["consent_ref"] = [c[0] for c in consent]
    df["consent_valid_from"] = [c[1] for c in consent]
    df["consent_valid_until"] = [c[2] for c in consent]
    df["expect_reason"] = [c[3] for c in consent]
    return df


@pytest.fixture(scope="module")
def claims(tmp_path_factory: pytest.TempPathFactory, frames: dict[str, pd.DataFrame]) -> tuple[Path, pd.DataFrame]:
    df = _claim_rows(frames)
    path = tmp_path_factory.mktemp("up") / "claims.parquet"
    pq.write_table(pa.Table.from_pandas(df.drop(columns=["expect_reason", "kind"]), preserve_index=False), path)
    return path, df


# ---------------------------------------------------------------------------------------------
# References in pandas


def _count_band(n: int) -> str:
    return "0" if n == 0 else "1" if n == 1 else "2-3" if n <= 3 else "4+"


def _cost_band(c: float | None) -> str:
    if c is None or pd.isna(c):
        return "none"
    return "<5k" if c < 5000 else "5k-20k" if c < 20000 else "20k-50k" if c < 50000 else "50k+"


def _underwriting_reference(frames: dict[str, pd.DataFrame], upload: pd.DataFrame, as_of: dt.date) -> pd.DataFrame:
    res, chronic, stays = frames[RES], frames[CHR], frames[INP]
    pid = dict(zip(res.id_number, res.person_id))
    chronic = chronic[chronic.diagnosed_on <= as_of]
    ts = pd.Timestamp(as_of)
    admit = pd.to_datetime(stays.admit_date)
    in5 = stays[(admit <= ts) & (admit > ts - pd.DateOffset(years=5))]
    admit5 = pd.to_datetime(in5.admit_date)
    out = []
    for row in upload[upload.expect_reason.isna()].itertuples():
        p = pid.get(row.id_number)
        conds = set(chronic[chronic.person_id == p].condition) if p is not None else set()
        mine = in5[in5.person_id == p] if p is not None else in5.iloc[0:0]
        a = admit5[in5.person_id == p] if p is not None else admit5.iloc[0:0]
        out.append({
            "applicant_ref": row.applicant_ref, "resident_found": p is not None,
            "hypertension": "hypertension" in conds, "diabetes": "diabetes" in conds,
            "coronary": "coronary" in conds, "cancer_history": "cancer" in conds,
            "stays_1y": _count_band(int((a > ts - pd.DateOffset(years=1)).sum())),
            "stays_3y": _count_band(int((a > ts - pd.DateOffset(years=3)).sum())),
            "stays_5y": _count_band(len(mine)),
            "max_inpatient_cost_band": _cost_band(mine.total_cost.max() if len(mine) else None),
        })
    return pd.DataFrame(out).sort_values("applicant_ref").reset_index(drop=True)


def _claims_reference(frames: dict[str, pd.DataFrame], upload: pd.DataFrame, tolerance: float) -> pd.DataFrame:
    res, stays, settle = frames[RES], frames[INP], frames[SET]
    pid = dict(zip(res.id_number, res.person_id))
    out = []
    for c in upload[upload.expect_reason.isna()].itertuples():
        p = pid.get(c.id_number)
        cand = stays[(stays.person_id == p) & (stays.admit_date <= c.discharge_date)
                     & (stays.discharge_date >= c.admit_date)] if p is not None else stays.iloc[0:0]
        best = None
        for s in cand.itertuples():
            same_h = s.hospital == c.hospital
            exact = same_h and s.admit_date == c.admit_date and s.discharge_date == c.discharge_date
            prio = 0 if exact else 1 if same_h else 2
            diff = abs((s.admit_date - c.admit_date).days) + abs((s.discharge_date - c.discharge_date).days)
            key = (prio, diff, s.stay_id)
            if best is None or key < best[0]:
                best = (key, ["match", "dates", "hospital"][prio], s.stay_id)
        stay_match = best[1] if best else "no_stay"
        if best is None:
            settlement = "no_settlement"
        else:
            st = settle[settle.stay_id == best[2]]
            if not len(st):
                settlement = "no_settlement"
            elif ((st.total_amount - c.amount).abs() <= tolerance * st.total_amount).any():
                settlement = "match"
            else:
                settlement = "amount"
        disc = stay_match if stay_match != "match" else settlement if settlement != "match" else "none"
        out.append({"claim_ref": c.claim_ref, "stay_match": stay_match, "settlement_match": settlement,
                    "discrepancy": disc})
    return pd.DataFrame(out).sort_values("claim_ref").reset_index(drop=True)


# ---------------------------------------------------------------------------------------------
# The shipped templates


def test_library_templates_pass_the_check_and_read_what_they_say():
    lib = library()
    assert set(lib) == {"underwriting", "claims"}
    for t in lib.values():
        assert check_template(t) == []
        assert t.level == "individual"
        assert len([o for o in t.outputs if o.kind == "ref"]) == 1
    assert template_reads(lib["underwriting"]) >= {(RES, "id_number"), (RES, "person_id"), (CHR, "condition"),
                                                   (INP, "admit_date"), (INP, "total_cost")}
    assert (RES, "name") not in template_reads(lib["underwriting"])
    assert template_reads(lib["claims"]) >= {(INP, "hospital"), (SET, "total_amount"), (SET, "stay_id")}
    # the digest is what an approval records: stable, and any change is a new template
    uw = lib["underwriting"]
    assert template_digest(uw) == template_digest(load_template(Path("sandbox/templates/template_library/underwriting.yaml")))
    assert template_digest(uw) != template_digest(dataclasses.replace(uw, sql=uw.sql + " "))
    assert template_digest(uw) != template_digest(dataclasses.replace(uw, version=2))
    assert template_digest(uw) != template_digest(lib["claims"])


def test_underwriting_matches_pandas(city, frames, applicants):
    path, df = applicants
    ans = run_template(library_template("underwriting"), {"as_of": AS_OF}, city, path, as_of=RUN_DATE)
    got = ans.table.to_pandas()
    assert list(got.columns) == UW_OUTPUTS
    want = _underwriting_reference(frames, df, AS_OF)
    pd.testing.assert_frame_equal(got, want, check_dtype=False)
    # the data are varied enough for the comparison to mean something
    assert got.hypertension.any() and not got.hypertension.all()
    assert set(got.stays_5y) >= {"0", "1"} and len(set(got.max_inpatient_cost_band)) >= 3
    assert (~got.resident_found).sum() == sum(1 for i in range(len(df)) if df.id_number[i] in UNKNOWN_IDS
                                               and not isinstance(df.expect_reason[i], str))
    assert ans.persons == len(want) == ans.table.num_rows
    assert ans.params == {"as_of": AS_OF} and ans.as_of == RUN_DATE


def test_underwriting_consent_exclusions_are_counted_by_reason(city, applicants):
    path, df = applicants
    ans = run_template(library_template("underwriting"), {"as_of": AS_OF}, city, path, as_of=RUN_DATE)
    expected = {r: int((df.expect_reason == r).sum()) for r in EXCLUSION_REASONS}
    assert all(expected.values()), expected          # every reason is exercised
    assert dict(ans.excluded_by_reason) == expected
    assert ans.excluded == sum(expected.values()) == ans.exclusions.num_rows
    assert ans.upload_rows == len(df) == ans.persons + ans.excluded
    excluded = dict(zip(ans.exclusions.column("ref").to_pylist(), ans.exclusions.column("reason").to_pylist()))
    assert excluded == {r.applicant_ref: r.expect_reason for r in df.itertuples() if isinstance(r.expect_reason, str)}
    assert not set(excluded) & set(ans.table.column("applicant_ref").to_pylist())
    report = ans.report()
    assert report["excluded"] == ans.excluded and report["persons"] == ans.persons
    assert set(report["reasons"]) == set(EXCLUSION_REASONS) and all(v["message_zh"] for v in report["reasons"].values())


def test_no_source_value_in_the_answer(city, frames, applicants):
    path, _ = applicants
    ans = run_template(library_template("underwriting"), {"as_of": AS_OF}, city, path, as_of=RUN_DATE)
    cells = {str(v) for col in ans.table.columns for v in col.to_pylist()}
    res = frames[RES]
    for field in ("id_number", "name", "phone", "address"):
        assert not cells & set(res[field].astype(str))
    assert not cells & set(frames[INP].total_cost.astype(str))
    assert ans.table.schema.field("hypertension").type == pa.bool_()
    assert ans.table.schema.field("stays_1y").type == pa.string()


def test_as_of_parameter_defaults_to_the_run_date(city, frames, applicants):
    path, df = applicants
    ans = run_template(library_template("underwriting"), None, city, path, as_of=dt.date(2025, 12, 31))
    assert ans.params == {"as_of": dt.date(2025, 12, 31)}
    # consent on 2025-12-31: the 'expired' rows (until 2025-12-31) are still valid that day
    assert ans.excluded_by_reason["expired"] == 0
    consented = df.assign(expect_reason=[None if r == "expired" else r for r in df.expect_reason])
    want = _underwriting_reference(frames, consented, dt.date(2025, 12, 31))
    pd.testing.assert_frame_equal(ans.table.to_pandas(), want, check_dtype=False)


def test_claims_match_pandas_and_each_discrepancy_class(city, frames, claims):
    path, df = claims
    ans = run_template(library_template("claims"), {"amount_tolerance": 0.05}, city, path, as_of=RUN_DATE)
    got = ans.table.to_pandas()
    assert list(got.columns) == ["claim_ref", "stay_match", "settlement_match", "discrepancy"]
    want = _claims_reference(frames, df, 0.05)
    pd.testing.assert_frame_equal(got, want, check_dtype=False)
    # the perturbations give the class they were built for
    kinds = dict(zip(df.claim_ref, df.kind))
    by_kind: dict[str, set[str]] = {}
    for r in got.itertuples():
        by_kind.setdefault(kinds[r.claim_ref], set()).add(r.stay_match)
    assert by_kind["exact"] == {"match"} and by_kind["within"] == {"match"} and by_kind["amount"] == {"match"}
    assert by_kind["dates"] == {"dates"} and by_kind["hospital"] == {"hospital"}
    assert by_kind["no_stay"] == {"no_stay"} and by_kind["unknown"] == {"no_stay"}
    assert by_kind["unsettled"] == {"match"}
    assert {r.settlement_match for r in got.itertuples() if kinds[r.claim_ref] == "unsettled"} == {"no_settlement"}
    settled = {r.claim_ref: r.settlement_match for r in got.itertuples()}
    amount_claims = [c for c, k in kinds.items() if k == "amount" and c in settled]
    within_claims = [c for c, k in kinds.items() if k == "within" and c in settled]
    assert {settled[c] for c in amount_claims} <= {"amount", "no_settlement"} and "amount" in {settled[c] for c in amount_claims}
    assert {settled[c] for c in within_claims} <= {"match", "no_settlement"} and "match" in {settled[c] for c in within_claims}
    assert set(got.discrepancy) == {"none", "no_stay", "hospital", "dates", "no_settlement", "amount"}
    # a tighter tolerance turns the 3 % claims into amount discrepancies
    tight = run_template(library_template("claims"), {"amount_tolerance": 0.01}, city, path, as_of=RUN_DATE)
    tight_settled = dict(zip(tight.table.column("claim_ref").to_pylist(), tight.table.column("settlement_match").to_pylist()))
    assert {tight_settled[c] for c in within_claims} <= {"amount", "no_settlement"}
    assert ans.excluded == int(df.expect_reason.notna().sum())


def test_claims_tolerance_defaults(city, claims):
    path, _ = claims
    ans = run_template(library_template("claims"), {}, city, path, as_of=RUN_DATE)
    assert ans.params == {"amount_tolerance": Decimal("0.05")}


def test_rendered_sql_has_the_consent_filter_views_and_no_parameter_text():
    uw = library_template("underwriting")
    sql = render(uw, {"as_of": "2025-06-30"}, as_of=RUN_DATE)
    cond = consent_condition(uw.upload, RUN_DATE).sql(dialect="duckdb", identify=True)
    assert cond in sql
    assert '"consent_ref"' in sql and "'2026-01-15'" in sql and "'2025-06-30'" in sql
    assert ":as_of" not in sql and "$as_of" not in sql and "$" not in sql
    assert f'"{upload_view_name("applicants")}"' in sql and f'"{view_name(RES)}"' in sql
    assert "health.resident" not in sql and "health" + '"."' + "resident" not in sql
    assert sql.rstrip().endswith('ORDER BY "applicant_ref"')
    claims_sql = render(library_template("claims"), {"amount_tolerance": 0.1}, as_of=RUN_DATE)
    assert "0.1 *" in claims_sql and ":amount_tolerance" not in claims_sql
    # the upload is read only through the consent filter
    assert sql.count(f'FROM "{upload_view_name("applicants")}"') == 1


# ---------------------------------------------------------------------------------------------
# Refusals: outputs that are not derived values

BASE_SQL = """
WITH person AS (
  SELECT a.applicant_ref, r.person_id, r.name, r.id_number
  FROM applicants AS a LEFT JOIN health.resident AS r ON r.id_number = a.id_number
)
SELECT p.applicant_ref AS applicant_ref, {expr} AS x
FROM person AS p
LEFT JOIN health.inpatient_stay AS s ON s.person_id = p.person_id
GROUP BY p.applicant_ref, p.name, p.id_number, s.hospital, p.person_id
"""


def _variant(sql: str, outputs: list[Output] | None = None, params: tuple[Param, ...] = (), **kw) -> Template:
    uw = library_template("underwriting")
    outs = outputs if outputs is not None else [Output("applicant_ref", "ref"), Output("x", "band", ("a", "b"))]
    return dataclasses.replace(uw, sql=sql, outputs=tuple(outs), params=params, **kw)


def _refusals(t: Template) -> list[tuple[str, str, str]]:
    return [(p.construct, p.message, p.message_zh) for p in check_template(t)]


@pytest.mark.parametrize("expr, kind, why", [
    ("p.name", "band", "health.resident.name"),
    ("MAX(p.name)", "band", "health.resident.name"),
    ("MAX(s.total_cost)", "band", "MAX of the source field health.inpatient_stay.total_cost"),
    ("p.id_number", "flag", "health.resident.id_number"),
    ("CONCAT(s.hospital, '')", "match", "concatenation"),
    ("s.hospital || ''", "match", "concatenation"),
    ("CASE WHEN p.person_id IS NULL THEN 'a' ELSE s.hospital END", "band", "health.inpatient_stay.hospital"),
    ("CASE WHEN p.person_id IS NULL THEN 'a' ELSE p.name END", "band", "health.resident.name"),
    ("COUNT(*)", "count_band", "COUNT"),
    ("SUM(s.length_of_stay)", "count_band", "SUM"),
    ("COALESCE(s.hospital, 'a')", "band", "health.inpatient_stay.hospital"),
    ("(SELECT MAX(r2.name) FROM health.resident AS r2)", "band", "health.resident.name"),
    ("MAX(s.admit_date) > DATE '2020-01-01' OR MAX(s.length_of_stay)", "band", ""),   # a boolean is not a band
    ("MAX(s.total_cost) > 1000", "band", ""),
    ("2", "flag", "2"),
    ("ROW_NUMBER() OVER (ORDER BY MAX(s.total_cost))", "count_band", "ROW_NUMBER"),
    ("MAX(s.hospital) OVER ()", "band", "health.inpatient_stay.hospital"),
    ("CASE WHEN COUNT(*) > 1 THEN 'a' ELSE 'c' END", "band", "'c'"),
    ("a.id_number", "band", "not accepted"),     # outer query cannot see the upload alias
])
def test_an_output_that_is_not_a_derived_value_is_refused_naming_it(expr, kind, why):
    labels = ("a", "b") if kind in ("band", "count_band", "match") else None
    t = _variant(BASE_SQL.format(expr=expr), [Output("applicant_ref", "ref"), Output("x", kind, labels)])
    problems = _refusals(t)
    assert problems, expr
    if expr.startswith("a.id_number"):
        assert any("could not be resolved" in m for _, m, _ in problems)
        return
    assert any(c == "output x" for c, _, _ in problems), problems
    msg = next(m for c, m, _ in problems if c == "output x")
    assert why in msg, (expr, msg)
    assert all(zh for _, _, zh in problems)


def test_a_cte_column_passing_a_source_value_through_is_refused():
    sql = """
    WITH person AS (SELECT a.applicant_ref, r.district AS band_value
                    FROM applicants AS a JOIN health.resident AS r ON r.id_number = a.id_number),
         again AS (SELECT applicant_ref, band_value AS v FROM person)
    SELECT again.applicant_ref, again.v AS x FROM again"""
    problems = check_template(_variant(sql))
    p = next(p for p in problems if p.construct == "output x")
    assert "health.resident.district" in p.message and "输出列 x" in p.message_zh


def test_derived_values_traced_through_ctes_are_accepted():
    sql = """
    WITH person AS (SELECT a.applicant_ref, r.person_id,
                           CASE WHEN r.district IN ('兴庆区', '金凤区') THEN 'a' ELSE 'b' END AS zone
                    FROM applicants AS a LEFT JOIN health.resident AS r ON r.id_number = a.id_number),
         zoned AS (SELECT applicant_ref, zone, person_id, person_id IS NOT NULL AS found FROM person)
    SELECT z.applicant_ref, COALESCE(z.zone, 'a') AS x,
           CASE WHEN z.found THEN 1 ELSE 0 END AS f,
           EXISTS (SELECT 1 FROM health.chronic_condition AS c
                   WHERE c.person_id = z.person_id AND c.condition = 'copd') AS g
    FROM zoned AS z"""
    t = _variant(sql, [Output("applicant_ref", "ref"), Output("x", "band", ("a", "b")), Output("f", "flag"),
                       Output("g", "flag")])
    assert check_template(t) == []


@pytest.mark.parametrize("outputs, fragment", [
    ([Output("x", "band", ("a", "b"))], "exactly one ref output"),
    ([Output("applicant_ref", "ref"), Output("x", "ref")], "exactly one ref output"),
    ([Output("applicant_ref", "ref"), Output("x", "band")], "needs 1 to"),
    ([Output("applicant_ref", "ref"), Output("x", "flag", ("a",))], "takes no labels"),
    ([Output("applicant_ref", "ref"), Output("x", "band", ("a", "a"))], "distinct labels"),
    ([Output("applicant_ref", "ref"), Output("x", "score")], "kind must be one of"),
])
def test_model_invariants(outputs, fragment):
    sql = BASE_SQL.format(expr="'a'")
    problems = check_template(_variant(sql, outputs))
    assert any(fragment in p.message for p in problems), problems


def test_the_ref_is_the_upload_reference_and_never_the_id_number():
    uw = library_template("underwriting")
    as_key = dataclasses.replace(uw, upload=dataclasses.replace(uw.upload, ref="id_number"))
    assert any("cannot be the ID number" in p.message for p in check_template(as_key))
    sql = BASE_SQL.replace("SELECT p.applicant_ref AS applicant_ref", "SELECT p.id_number AS applicant_ref")
    problems = check_template(_variant(sql.format(expr="'a'")))
    p = next(p for p in problems if p.construct == "output applicant_ref")
    assert "health.resident.id_number" in p.message
    sql = """SELECT a.id_number AS applicant_ref, 'a' AS x FROM applicants AS a
             LEFT JOIN health.resident AS r ON r.id_number = a.id_number"""
    p = next(p for p in check_template(_variant(sql)) if p.construct == "output applicant_ref")
    assert "upload column applicants.id_number" in p.message


def test_undeclared_and_missing_outputs_are_refused():
    sql = BASE_SQL.format(expr="'a'").replace(" AS x", " AS x, 'b' AS y")
    problems = check_template(_variant(sql))
    assert any(p.construct == "output y" and "not a declared output" in p.message for p in problems)
    sql = BASE_SQL.format(expr="'a'").replace(" AS x", " AS z")
    problems = check_template(_variant(sql))
    assert any(p.construct == "output x" and "not in the SELECT" in p.message for p in problems)
    # SELECT * at the top expands to columns that are not declared outputs
    sql = "SELECT a.* FROM applicants AS a LEFT JOIN health.resident AS r ON r.id_number = a.id_number"
    assert any("not a declared output" in p.message for p in check_template(_variant(sql)))
    sql = "SELECT * FROM applicants AS a LEFT JOIN health.resident AS r ON r.id_number = a.id_number"
    assert check_template(_variant(sql))


# ---------------------------------------------------------------------------------------------
# Refusals: statements, tables, functions, parameters

OK_TAIL = " FROM applicants AS a LEFT JOIN health.resident AS r ON r.id_number = a.id_number"


@pytest.mark.parametrize("sql, fragment", [
    ("SELECT a.applicant_ref, 'a' AS x FROM read_parquet('/etc/passwd') AS a", "READ_PARQUET"),
    ("SELECT a.applicant_ref, 'a' AS x FROM read_csv('/etc/passwd') AS a", "READ_CSV"),
    ("SELECT a.applicant_ref, 'a' AS x FROM '/etc/passwd' AS a", "/etc/passwd is neither"),
    ("SELECT a.applicant_ref, 'a' AS x FROM applicants AS a JOIN (SELECT * FROM read_parquet('x.parquet')) AS r "
     "ON r.id_number = a.id_number", "READ_PARQUET"),
    ("SELECT a.applicant_ref, CASE WHEN getenv('HOME') = '' THEN 'a' ELSE 'b' END AS x" + OK_TAIL, "GETENV"),
    ("SELECT a.applicant_ref, CASE WHEN current_date > DATE '2020-01-01' THEN 'a' ELSE 'b' END AS x" + OK_TAIL,
     "CURRENT_DATE"),
    ("SELECT a.applicant_ref, CASE WHEN query('select 1') THEN 'a' END AS x" + OK_TAIL, "QUERY"),
    ("SELECT a.applicant_ref, CASE WHEN CAST(r.name AS INTEGER) > 1 THEN 'a' ELSE 'b' END AS x" + OK_TAIL,
     "use TRY_CAST"),
    ("COPY (SELECT 1) TO '/tmp/x.csv'", "only SELECT"),
    ("ATTACH '/tmp/x.db'", "only SELECT"),
    ("DROP TABLE applicants", "only SELECT"),
    ("INSERT INTO applicants VALUES (1)", "only SELECT"),
    ("SELECT 1; SELECT 2", "one statement"),
    ("SELECT a.applicant_ref, 'a' AS x" + OK_TAIL + " UNION ALL SELECT a.applicant_ref, 'b' AS x" + OK_TAIL, "UNION"),
    ("SELECT a.applicant_ref, 'a' AS x FROM applicants AS a LEFT JOIN health.secret AS r ON r.id_number = a.id_number",
     "health.secret is not a dataset"),
    ("SELECT a.applicant_ref, 'a' AS x FROM applicants AS a LEFT JOIN resident AS r ON r.id_number = a.id_number",
     "did you mean health.resident"),
    ("SELECT a.applicant_ref, CASE WHEN r.no_such_field THEN 'a' END AS x" + OK_TAIL, "could not be resolved"),
    ("WITH applicants AS (SELECT * FROM health.resident) SELECT a.applicant_ref, 'a' AS x" + OK_TAIL, "name is taken"),
    ("WITH u_x AS (SELECT 1 AS y) SELECT a.applicant_ref, 'a' AS x" + OK_TAIL, "name is taken"),
    ("WITH RECURSIVE c AS (SELECT 1 AS n) SELECT a.applicant_ref, 'a' AS x" + OK_TAIL, "recursive"),
    ("SELECT a.applicant_ref, 'a' AS x" + OK_TAIL + " ORDER BY r.birth_date", "ORDER BY is not accepted"),
    ("SELECT a.applicant_ref, 'a' AS x" + OK_TAIL + " LIMIT 5", "LIMIT is not accepted"),
    ("SELECT DISTINCT a.applicant_ref, 'a' AS x" + OK_TAIL, "DISTINCT is not accepted"),
    ("SELECT a.applicant_ref, 'a' AS x FROM applicants AS a", "never joined"),
    ("SELECT a.applicant_ref, 'a' AS x FROM applicants AS a LEFT JOIN health.resident AS r ON r.name = a.id_number",
     "never joined"),
    ("SELECT a.applicant_ref, CASE WHEN r.birth_date < :cutoff THEN 'a' END AS x" + OK_TAIL, ":cutoff is not a declared"),
    # renaming columns in an alias would let a name point at another projection than it seems
    ("SELECT d.applicant_ref, d.y AS x FROM (SELECT a.applicant_ref, 'a' AS y, r.name AS z" + OK_TAIL + ") AS d(applicant_ref, z, y)",
     "may not rename columns"),
    ("WITH d(applicant_ref, z, y) AS (SELECT a.applicant_ref, 'a' AS y, r.name AS z" + OK_TAIL + ") "
     "SELECT d.applicant_ref, d.y AS x FROM d", "rename"),
    ("WITH d AS (SELECT a.applicant_ref, 'a' AS x, r.name AS \"X\"" + OK_TAIL + ") SELECT d.applicant_ref, d.x FROM d",
     "more than once"),
    ("WITH d AS (SELECT * REPLACE (r.name AS id_number)" + OK_TAIL + ") SELECT d.applicant_ref, 'a' AS x FROM d",
     "EXCLUDE / REPLACE"),
    ("SELECT COLUMNS('a.*') AS x" + OK_TAIL, "not accepted"),
    ("WITH b AS (SELECT * FROM applicants) SELECT b.applicant_ref, 'a' AS x" + OK_TAIL + " JOIN b ON b.id_number = r.id_number",
     "read 2 times"),
    ("SELECT a.applicant_ref, LAG(a.applicant_ref) OVER (ORDER BY r.birth_date) AS x" + OK_TAIL, "not accepted"),
    ("SELECT a.applicant_ref, 'a' AS x FROM applicants AS a, LATERAL (SELECT 1) AS l "
     "LEFT JOIN health.resident AS r ON r.id_number = a.id_number", "not accepted"),
])
def test_statements_tables_and_functions_outside_the_subset_are_refused(sql, fragment):
    problems = check_template(_variant(sql))
    assert any(fragment in p.message for p in problems), (sql, problems)
    assert all(p.message_zh for p in problems)


def test_an_unused_parameter_is_refused():
    p = Param("cutoff", "date", dt.date(2000, 1, 1), dt.date(2030, 1, 1))
    problems = check_template(_variant("SELECT a.applicant_ref, 'a' AS x" + OK_TAIL, params=(p,)))
    assert any("never uses it" in q.message for q in problems)


def test_a_template_may_read_only_its_declared_upload_columns():
    sql = "SELECT a.applicant_ref, CASE WHEN a.extra_note = '' THEN 'a' END AS x" + OK_TAIL
    problems = check_template(_variant(sql), upload_columns=["applicant_ref", "id_number", "consent_ref",
                                                             "consent_valid_from", "consent_valid_until", "extra_note"])
    assert any("could not be resolved" in p.message for p in problems)
    problems = check_template(library_template("underwriting"), upload_columns=["applicant_ref", "id_number"])
    assert any("lacks the template's columns" in p.message for p in problems)


# ---------------------------------------------------------------------------------------------
# Parameters


@pytest.mark.parametrize("name, params, fragment", [
    ("underwriting", {"as_of": "2040-01-01"}, "outside the approved range"),
    ("underwriting", {"as_of": "2010-01-01"}, "outside the approved range"),
    ("underwriting", {"as_of": "yesterday"}, "must be a date"),
    ("underwriting", {"as_of": "2025-06-30'; DROP TABLE x; --"}, "must be a date"),
    ("underwriting", {"as_of": dt.datetime(2025, 1, 1)}, "must be a date"),
    ("underwriting", {}, "is required"),
    ("underwriting", {"as_of": "2025-06-30", "other": 1}, "is not a parameter"),
    ("claims", {"amount_tolerance": 0.9}, "outside the approved range"),
    ("claims", {"amount_tolerance": -0.1}, "outside the approved range"),
    ("claims", {"amount_tolerance": "1e400"}, "finite number"),
    ("claims", {"amount_tolerance": True}, "finite number"),
    ("claims", {"amount_tolerance": "0.05 OR 1=1"}, "finite number"),
])
def test_parameters_out_of_range_or_of_the_wrong_type_are_refused(name, params, fragment):
    with pytest.raises(TemplateRefused) as e:
        validate_params(library_template(name), params)
    assert e.value.code == "template_params_invalid" and e.value.status == 422
    assert any(fragment in d["message"] for d in e.value.details), e.value.details
    with pytest.raises(TemplateRefused):
        render(library_template(name), params) if name == "underwriting" else \
            render(library_template(name), params, as_of=RUN_DATE)


def test_string_parameters_take_only_their_choices():
    p = Param("zone", "string", choices=("兴庆区", "金凤区"))
    sql = "SELECT a.applicant_ref, CASE WHEN r.district = :zone THEN 'a' ELSE 'b' END AS x" + OK_TAIL
    t = _variant(sql, params=(p,))
    assert check_template(t) == []
    assert "'金凤区'" in render(t, {"zone": "金凤区"}, as_of=RUN_DATE)
    with pytest.raises(TemplateRefused):
        render(t, {"zone": "' OR 1=1 --"}, as_of=RUN_DATE)
    assert any("needs its choices" in q.message for q in check_template(_variant(sql, params=(Param("zone", "string"),))))


# ---------------------------------------------------------------------------------------------
# Reading templates


def test_template_from_mapping_reports_every_shape_problem():
    with pytest.raises(TemplateRefused) as e:
        template_from_mapping({"name": "Bad Name", "sql": "", "upload": {"name": "x"}, "outputs": [{"kind": "score"}],
                               "params": [{"name": "p", "type": "number"}], "extra": 1})
    messages = " | ".join(d["message"] for d in e.value.details)
    for fragment in ("lower-case name", "template.sql", "upload.columns", "kind", "needs min and max",
                     "not a template field"):
        assert fragment in messages, messages
    assert e.value.code == "template_refused"


def test_a_template_round_trips_through_its_mapping():
    uw = library_template("underwriting")
    again = template_from_mapping(uw.as_dict())
    assert again == uw and template_digest(again) == template_digest(uw)


# ---------------------------------------------------------------------------------------------
# Running: what the engine refuses at run time


def test_an_upload_with_repeated_or_missing_refs_or_columns_is_refused(city, tmp_path):
    rows = {"applicant_ref": ["A1", "A1"], "id_number": ["x", "y"], "consent_ref": ["c", "c"],
            "consent_valid_from": ["2025-01-01"] * 2, "consent_valid_until": ["2027-01-01"] * 2}
    pq.write_table(pa.table(rows), tmp_path / "dup.parquet")
    with pytest.raises(PdaoError) as e:
        run_template(library_template("underwriting"), {"as_of": AS_OF}, city, tmp_path / "dup.parquet", as_of=RUN_DATE)
    assert e.value.code == "template_upload_invalid" and "1 repeated" in e.value.message
    pq.write_table(pa.table({"applicant_ref": ["A1"], "id_number": ["x"]}), tmp_path / "short.parquet")
    with pytest.raises(PdaoError) as e:
        run_template(library_template("underwriting"), {"as_of": AS_OF}, city, tmp_path / "short.parquet", as_of=RUN_DATE)
    assert e.value.code == "template_upload_invalid" and "consent_ref" in e.value.message
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(PdaoError) as e:
        run_template(library_template("underwriting"), {"as_of": AS_OF}, city, tmp_path / "junk.parquet", as_of=RUN_DATE)
    assert e.value.code == "template_upload_invalid"


def test_only_the_snapshots_the_template_reads_are_needed(city, applicants):
    path, _ = applicants
    needed = {c: city[c] for c in (RES, CHR, INP)}
    assert run_template(library_template("underwriting"), {"as_of": AS_OF}, needed, path, as_of=RUN_DATE).persons > 0
    with pytest.raises(PdaoError) as e:
        run_template(library_template("underwriting"), {"as_of": AS_OF}, {RES: city[RES]}, path, as_of=RUN_DATE)
    assert e.value.code == "template_dataset_missing"


def test_a_template_that_multiplies_rows_is_withheld_at_run_time(city, applicants):
    # Passes the check (every output is derived) but answers one row per stay, not per applicant:
    # how many rows came back would say how many stays a person had. The engine withholds it.
    path, _ = applicants
    sql = """SELECT a.applicant_ref, s.total_cost > 10000 AS costly FROM applicants AS a
             LEFT JOIN health.resident AS r ON r.id_number = a.id_number
             LEFT JOIN health.inpatient_stay AS s ON s.person_id = r.person_id"""
    t = _variant(sql, [Output("applicant_ref", "ref"), Output("costly", "flag")], params=())
    assert check_template(t) == []
    with pytest.raises(PdaoError) as e:
        run_template(t, {}, city, path, as_of=RUN_DATE)
    assert e.value.code == "template_output_mismatch"


def test_engine_errors_do_not_quote_the_data(city, applicants):
    path, _ = applicants
    # DuckDB fails on this data (an integer overflow); the message is ours, not DuckDB's
    sql = ("SELECT a.applicant_ref, CASE WHEN ABS(YEAR(r.birth_date) * 9223372036854775807) > 0 THEN 'a' ELSE 'b' END AS x"
           + OK_TAIL)
    t = _variant(sql)
    assert check_template(t) == []
    with pytest.raises(PdaoError) as e:
        run_template(t, {}, city, path, as_of=RUN_DATE)
    assert e.value.code == "template_failed" and "could quote a record" in e.value.message


def test_the_catalog_can_be_given_as_dataset_facts():
    from sandbox.engine.execute import DatasetMeta
    from sandbox.templates.library import descriptor_catalog

    cat = descriptor_catalog()
    uw = library_template("underwriting")
    assert check_template(uw, {c: cat[c] for c in (RES, CHR, INP)}) == []
    # DatasetMeta (fields -> FieldMeta) and plain field lists are accepted too
    metas = {c: DatasetMeta.from_fields(c, cat[c].privacy_unit, [
        type("F", (), {"name": f.name, "type": f.type, "masking": "none", "nullable": f.nullable, "domain": None,
                       "bounds": None, "sensitivity": f.sensitivity, "pii_kind": f.pii_kind})()
        for f in cat[c].fields.values()]) for c in (RES, CHR, INP)}
    assert check_template(uw, metas) == []
    infos = {c: DatasetInfo(c, tuple(cat[c].fields), cat[c].privacy_unit) for c in (RES, CHR, INP)}
    assert check_template(uw, infos) == []      # names only: the packaged descriptors' sensitivity
    # a catalog whose keys are not marked as identifiers cannot tie datasets to the applicant
    public = {c: DatasetMeta.from_fields(c, cat[c].privacy_unit, [
        type("F", (), {"name": f.name, "type": f.type, "masking": "none", "nullable": True, "domain": None,
                       "bounds": None, "sensitivity": "public", "pii_kind": None})()
        for f in cat[c].fields.values()]) for c in (RES, CHR, INP)}
    assert any("joined on keys" in p.message for p in check_template(uw, public))
    assert check_template(uw, {c: list(cat[c].fields) for c in (RES, CHR, INP)}) == []
    problems = check_template(uw, {c: cat[c] for c in (RES, INP)})
    assert any(p.construct == f"table {CHR}" and p.dataset == CHR for p in problems)
    no_cost = {c: cat[c] for c in (RES, CHR)} | {INP: [f for f in cat[INP].fields if f != "total_cost"]}
    assert any("total_cost" in p.message for p in check_template(uw, no_cost))


def test_typed_upload_columns_work_too(city, frames, tmp_path):
    # integer references, DATE consent columns (the tests above use strings)
    res = frames[RES]
    ids = list(res.id_number[:6])
    table = pa.table({
        "applicant_ref": pa.array([10, 11, 12, 13, 14, 15], pa.int64()),
        "id_number": ids,
        "consent_ref": ["a", "b", None, "d", "e", "f"],
        "consent_valid_from": pa.array([dt.date(2025, 1, 1)] * 5 + [dt.date(2026, 6, 1)], pa.date32()),
        "consent_valid_until": pa.array([dt.date(2027, 1, 1)] * 4 + [dt.date(2025, 12, 1), dt.date(2027, 1, 1)],
                                        pa.date32()),
    })
    pq.write_table(table, tmp_path / "typed.parquet")
    ans = run_template(library_template("underwriting"), {"as_of": AS_OF}, city, tmp_path / "typed.parquet",
                       as_of=RUN_DATE)
    assert ans.table.column("applicant_ref").to_pylist() == ["10", "11", "13"]
    assert dict(zip(ans.exclusions.column("ref").to_pylist(), ans.exclusions.column("reason").to_pylist())) == {
        "12": "no_consent_ref", "14": "expired", "15": "not_yet_valid"}
    assert ans.table.column("resident_found").to_pylist() == [True, True, True]


PERSON = ("WITH p AS (SELECT a.applicant_ref, r.person_id, r.district FROM applicants AS a "
          "LEFT JOIN health.resident AS r ON r.id_number = a.id_number) ")


@pytest.mark.parametrize("sql, kind, fragment", [
    # one applicant's reference attached to another applicant's values
    (PERSON + "SELECT p2.applicant_ref, p1.person_id IS NULL AS x FROM p AS p1 JOIN p AS p2 "
     "ON p2.person_id = p1.person_id + 1", "flag", "join them on equal row references"),
    (PERSON + "SELECT p2.applicant_ref, p1.person_id IS NULL AS x FROM p AS p1, p AS p2", "flag",
     "join them on equal row references"),
    (PERSON + "SELECT p2.applicant_ref, p1.person_id IS NULL AS x FROM p AS p1 JOIN p AS p2 "
     "ON p2.applicant_ref = p1.applicant_ref OR p1.person_id > 5", "flag", "join them on equal row references"),
    # counting or comparing across applicants
    (PERSON + ", n AS (SELECT COUNT(*) AS k FROM p) SELECT p.applicant_ref, n.k > 5 AS x FROM p CROSS JOIN n",
     "flag", "must GROUP BY the row reference"),
    (PERSON + ", n AS (SELECT p.district, COUNT(*) AS k FROM p GROUP BY p.district) "
     "SELECT p.applicant_ref, n.k > 1 AS x FROM p LEFT JOIN n ON n.district = p.district", "flag", "must GROUP BY"),
    (PERSON + "SELECT p.applicant_ref, BOOL_OR(p.person_id IS NULL) OVER () AS x FROM p", "flag",
     "must PARTITION BY the row reference"),
    (PERSON + "SELECT p.applicant_ref, EXISTS (SELECT 1 FROM p AS q WHERE q.district = p.district "
     "AND q.applicant_ref <> p.applicant_ref) AS x FROM p", "flag", "compare an applicant with the other"),
])
def test_rows_of_different_applicants_are_never_mixed(sql, kind, fragment):
    t = _variant(sql, [Output("applicant_ref", "ref"), Output("x", kind)])
    problems = check_template(t)
    assert any(fragment in p.message for p in problems), problems


def test_per_applicant_joins_groups_and_windows_are_accepted():
    sql = (PERSON + ", s AS (SELECT p.applicant_ref, COUNT(st.stay_id) AS n, "
           "ROW_NUMBER() OVER (PARTITION BY p.applicant_ref ORDER BY p.district) AS k "
           "FROM p LEFT JOIN health.inpatient_stay AS st ON st.person_id = p.person_id GROUP BY p.applicant_ref, p.district) "
           "SELECT p.applicant_ref, CASE WHEN s.n > 0 THEN 'a' ELSE 'b' END AS x, s.k = 1 AS f "
           "FROM p JOIN s ON s.applicant_ref = p.applicant_ref")
    t = _variant(sql, [Output("applicant_ref", "ref"), Output("x", "band", ("a", "b")), Output("f", "flag")])
    assert check_template(t) == []


# ---------------------------------------------------------------------------------------------
# Refusals: reading people outside the upload, and spelling a value out (security review of #6)

PERSON_CTE = """
WITH person AS (
  SELECT a.applicant_ref, r.person_id
  FROM applicants AS a LEFT JOIN health.resident AS r ON r.id_number = a.id_number
)
"""


@pytest.mark.parametrize("expr, fragment", [
    # one resident picked by a literal ID number, in a scalar subquery or EXISTS
    ("CASE WHEN (SELECT MAX(YEAR(z.birth_date)) FROM health.resident AS z WHERE z.id_number = '640102198001010011')"
     " > 1980 THEN 'a' ELSE 'b' END", "direct identifier"),
    ("CASE WHEN EXISTS (SELECT 1 FROM health.resident AS z WHERE z.id_number = '640102198001010011' "
     "AND z.birth_date < DATE '1980-01-01') THEN 'a' ELSE 'b' END", "direct identifier"),
    # … or by a literal person key
    ("CASE WHEN EXISTS (SELECT 1 FROM health.chronic_condition AS c WHERE c.person_id = 42) THEN 'a' ELSE 'b' END",
     "is a key"),
    # a subquery not tied to the applicant's own row reads the whole population
    ("CASE WHEN EXISTS (SELECT 1 FROM health.chronic_condition AS c WHERE c.condition = 'copd') THEN 'a' ELSE 'b' END",
     "without tying it to the outer row"),
    ("CASE WHEN (SELECT COUNT(*) FROM health.inpatient_stay AS s) > 100 THEN 'a' ELSE 'b' END", "without tying it to the outer row"),
    # a key compared, computed with, or cut into digits
    ("CASE WHEN p.person_id < 1000 THEN 'a' ELSE 'b' END", "is a key"),
    ("CASE WHEN p.person_id + 1 > 1000 THEN 'a' ELSE 'b' END", "is a key"),
    ("CASE WHEN p.person_id IN (1, 2, 3) THEN 'a' ELSE 'b' END", "is a key"),
    # a direct identifier used at all (beyond the key join)
    ("CASE WHEN EXISTS (SELECT 1 FROM health.resident AS z WHERE z.person_id = p.person_id "
     "AND SUBSTRING(z.phone, 4, 1) = '1') THEN 'a' ELSE 'b' END", "direct identifier"),
    ("CASE WHEN EXISTS (SELECT 1 FROM health.resident AS z WHERE z.person_id = p.person_id "
     "AND z.name LIKE '王%') THEN 'a' ELSE 'b' END", "direct identifier"),
    # digits and bits of a value
    ("CASE WHEN EXISTS (SELECT 1 FROM health.resident AS z WHERE z.person_id = p.person_id "
     "AND YEAR(z.birth_date) % 2 = 1) THEN 'a' ELSE 'b' END", "MOD"),
    ("CASE WHEN EXISTS (SELECT 1 FROM health.inpatient_stay AS s WHERE s.person_id = p.person_id "
     "AND SUBSTRING(s.main_icd10, 1, 1) = 'I') THEN 'a' ELSE 'b' END", "SUBSTRING of a catalog field"),
])
def test_reading_others_or_spelling_a_value_out_is_refused(expr, fragment):
    sql = PERSON_CTE + f"SELECT p.applicant_ref AS applicant_ref, {expr} AS x FROM person AS p"
    problems = check_template(_variant(sql))
    assert any(fragment in p.message for p in problems), (expr, problems)
    assert all(p.message_zh for p in problems)


@pytest.mark.parametrize("sql, fragment", [
    # a whole-population aggregate joined to every applicant
    (PERSON_CTE + """, pop AS (SELECT MAX(s.total_cost) AS m FROM health.inpatient_stay AS s)
     SELECT p.applicant_ref AS applicant_ref, CASE WHEN pop.m > 1000 THEN 'a' ELSE 'b' END AS x
     FROM person AS p CROSS JOIN pop""", "must GROUP BY a key"),
    # grouped by something that is not a key
    (PERSON_CTE + """, d AS (SELECT s.district, s.person_id, MAX(s.total_cost) AS m
                              FROM health.inpatient_stay AS s GROUP BY s.district, s.person_id),
     dd AS (SELECT d.district, MAX(d.m) AS m FROM d GROUP BY d.district)
     SELECT p.applicant_ref AS applicant_ref, CASE WHEN dd.m > 1 THEN 'a' ELSE 'b' END AS x
     FROM person AS p LEFT JOIN health.resident AS r ON r.person_id = p.person_id
     LEFT JOIN dd ON dd.district = r.district""", "joined on keys"),
    # another resident joined on a value, not a key
    (PERSON_CTE + """SELECT p.applicant_ref AS applicant_ref, CASE WHEN z.birth_date > DATE '1980-01-01' THEN 'a'
     ELSE 'b' END AS x FROM person AS p LEFT JOIN health.resident AS r ON r.person_id = p.person_id
     LEFT JOIN health.resident AS z ON z.district = r.district""", "joined on keys"),
    # a dataset joined on nothing
    (PERSON_CTE + """SELECT p.applicant_ref AS applicant_ref, CASE WHEN s.total_cost > 1 THEN 'a' ELSE 'b' END AS x
     FROM person AS p LEFT JOIN health.inpatient_stay AS s ON TRUE""", "joined on keys"),
    # a window over a whole dataset
    (PERSON_CTE + """, ranked AS (SELECT s.person_id, RANK() OVER (ORDER BY s.total_cost) AS rk
                                   FROM health.inpatient_stay AS s)
     SELECT p.applicant_ref AS applicant_ref, CASE WHEN MIN(k.rk) < 10 THEN 'a' ELSE 'b' END AS x
     FROM person AS p LEFT JOIN ranked AS k ON k.person_id = p.person_id GROUP BY p.applicant_ref""", "must PARTITION BY a key"),
])
def test_every_row_read_belongs_to_the_applicant(sql, fragment):
    problems = check_template(_variant(sql))
    assert any(fragment in p.message for p in problems), problems


def test_tied_subqueries_and_key_joins_are_accepted():
    sql = PERSON_CTE + """
    SELECT p.applicant_ref AS applicant_ref,
           EXISTS (SELECT 1 FROM health.inpatient_stay AS s WHERE s.person_id = p.person_id AND s.total_cost > 50000) AS big,
           CASE WHEN (SELECT COUNT(*) FROM health.inpatient_stay AS s WHERE s.person_id = p.person_id) > 2 THEN 'a'
                ELSE 'b' END AS x
    FROM person AS p"""
    t = _variant(sql, [Output("applicant_ref", "ref"), Output("big", "flag"), Output("x", "band", ("a", "b"))])
    assert check_template(t) == []


def _bits(n: int) -> str:
    flags = ",\n".join(f"(YEAR(z.birth_date) - 2 * FLOOR(YEAR(z.birth_date) / {2 ** (i + 1)}) * {2 ** i}) "
                       f">= {2 ** i} AS b{i}" for i in range(n))
    return PERSON_CTE + f"SELECT p.applicant_ref AS applicant_ref, {flags} FROM person AS p " \
                        "LEFT JOIN health.resident AS z ON z.person_id = p.person_id"


def test_outputs_may_say_only_so_much_about_one_field():
    many = _variant(_bits(7), [Output("applicant_ref", "ref")] + [Output(f"b{i}", "flag") for i in range(7)])
    problems = check_template(many)
    p = next(p for p in problems if p.construct == "dataset health.resident")
    assert "2,187 combinations" in p.message and "b0, b1" in p.message and "1,024" in p.message_zh
    few = _variant(_bits(6), [Output("applicant_ref", "ref")] + [Output(f"b{i}", "flag") for i in range(6)])
    assert check_template(few) == []


def test_what_each_output_depends_on_is_reported():
    from sandbox.templates.library import template_disclosure

    d = template_disclosure(library_template("underwriting"))
    assert d["outputs"]["hypertension"] == [f"{CHR}.(rows)", f"{CHR}.condition", f"{CHR}.diagnosed_on"]
    assert d["outputs"]["resident_found"] == [f"{RES}.(rows)"] and d["output_values"]["resident_found"] == 2
    assert d["outputs"]["max_inpatient_cost_band"] == [f"{INP}.(rows)", f"{INP}.admit_date", f"{INP}.total_cost"]
    # three count bands of 4 labels and the cost band of 5 (none of them can be NULL)
    assert d["datasets"][INP] == d["fields"][f"{INP}.admit_date"] == 4 * 4 * 4 * 5
    assert d["datasets"][CHR] == 2 ** 4           # COALESCE(…, FALSE): never NULL
    assert d["output_values"]["stays_1y"] == 4 and d["max_combinations"] == 1024
    c = template_disclosure(library_template("claims"))
    assert c["outputs"]["stay_match"] == [f"{INP}.(rows)", f"{INP}.admit_date", f"{INP}.discharge_date",
                                          f"{INP}.hospital", f"{RES}.(rows)"]
    assert c["datasets"] == {INP: 4 * 3 * 6, SET: 3 * 6, RES: 4 * 3 * 6}
    assert f"{SET}.total_amount" in c["outputs"]["settlement_match"]


# The second review of the checker (2026-11-28): each of these passed `check_template` and was
# confirmed end to end with `run_template` before the fix.
REVIEW2 = {
    # F1: a key equality inside a LEFT JOIN's ON does not tie the tables on its left
    "left_join_on_ties_nothing_else": PERSON_CTE + """SELECT p.applicant_ref AS applicant_ref,
       CASE WHEN COUNT(*) > 100 THEN 'a' ELSE 'b' END AS x
     FROM person AS p JOIN health.resident AS z ON TRUE
     LEFT JOIN health.chronic_condition AS c ON c.person_id = p.person_id AND z.person_id = p.person_id
     GROUP BY p.applicant_ref""",
    # F1 between applicants
    "other_applicant_through_left_join": PERSON_CTE + """SELECT p2.applicant_ref AS applicant_ref,
       CASE WHEN BOOL_OR(z.birth_date < DATE '1950-01-01') THEN 'a' ELSE 'b' END AS x
     FROM person AS p2 JOIN person AS p1 ON TRUE
     LEFT JOIN health.chronic_condition AS c ON c.person_id = p2.person_id AND p1.applicant_ref = p2.applicant_ref
     LEFT JOIN health.resident AS z ON z.person_id = p1.person_id
     GROUP BY p2.applicant_ref""",
    # F2: a partition by a key that is NULL on every row is the whole population
    "partition_by_a_null_key": PERSON_CTE + """, w AS (SELECT z.person_id,
         ROW_NUMBER() OVER (PARTITION BY c.person_id ORDER BY z.person_id) AS rn
       FROM health.resident AS z LEFT JOIN health.insurance_settlement AS c
         ON c.person_id = z.person_id AND c.stay_id IS NULL)
     SELECT p.applicant_ref AS applicant_ref, CASE WHEN MIN(w.rn) > 100 THEN 'a' ELSE 'b' END AS x
     FROM person AS p LEFT JOIN w ON w.person_id = p.person_id GROUP BY p.applicant_ref""",
    # F2: grouped by a nullable key (settlements without a stay would form one group)
    "group_by_a_nullable_key": PERSON_CTE + """, g AS (SELECT st.stay_id, MAX(st.total_amount) AS m
       FROM health.insurance_settlement AS st GROUP BY st.stay_id),
     s AS (SELECT i.person_id, i.stay_id FROM health.inpatient_stay AS i)
     SELECT p.applicant_ref AS applicant_ref, CASE WHEN MAX(g.m) > 1000 THEN 'a' ELSE 'b' END AS x
     FROM person AS p LEFT JOIN s ON s.person_id = p.person_id LEFT JOIN g ON g.stay_id = s.stay_id
     GROUP BY p.applicant_ref""",
    # F6: a scalar subquery that can answer several rows fails the run when it does
    "scalar_subquery_not_aggregated": PERSON_CTE + """SELECT p.applicant_ref AS applicant_ref,
       CASE WHEN (SELECT s.total_cost > 1000 FROM health.inpatient_stay AS s WHERE s.person_id = p.person_id)
            THEN 'a' ELSE 'b' END AS x FROM person AS p""",
    # a frame reaches a neighbouring row
    "window_frame": PERSON_CTE + """, w AS (SELECT s.person_id, MAX(s.total_cost) OVER (PARTITION BY s.person_id
         ORDER BY s.admit_date ROWS BETWEEN 1 FOLLOWING AND 1 FOLLOWING) AS nxt FROM health.inpatient_stay AS s)
     SELECT p.applicant_ref AS applicant_ref, CASE WHEN MAX(w.nxt) > 1 THEN 'a' ELSE 'b' END AS x
     FROM person AS p LEFT JOIN w ON w.person_id = p.person_id GROUP BY p.applicant_ref""",
    "right_join": PERSON_CTE + """SELECT p.applicant_ref AS applicant_ref, 'a' AS x
     FROM health.chronic_condition AS c RIGHT JOIN person AS p ON c.person_id = p.person_id""",
    # F4: free text quotes names, ID numbers and phone numbers
    "free_text": PERSON_CTE + """SELECT p.applicant_ref AS applicant_ref,
       CASE WHEN BOOL_OR(s.notes LIKE '%640104198708183524%') THEN 'a' ELSE 'b' END AS x
     FROM person AS p LEFT JOIN health.inpatient_stay AS s ON s.person_id = p.person_id GROUP BY p.applicant_ref""",
}


@pytest.mark.parametrize("case", sorted(REVIEW2))
def test_second_review_findings_are_refused(case):
    problems = check_template(_variant(REVIEW2[case]))
    assert problems, case
    assert all(p.message_zh for p in problems)


def _chains(n: int) -> str:
    """F3: one bit per chain, carried by how many times a LEFT JOIN repeats a row, counted a level up."""
    ctes = []
    outs = []
    for i in range(n):
        ctes.append(f"""b{i} AS (SELECT v.person_id FROM health.outpatient_visit AS v
              JOIN health.resident AS z ON z.person_id = v.person_id
              WHERE DATE_DIFF('day', DATE '1900-01-01', z.birth_date) >= {2 ** i}),
            m{i} AS (SELECT p.applicant_ref FROM person AS p LEFT JOIN b{i} ON b{i}.person_id = p.person_id),
            c{i} AS (SELECT m{i}.applicant_ref, COUNT(*) AS n FROM m{i} GROUP BY m{i}.applicant_ref)""")
        outs.append(f"c{i}.n > 1 AS b{i}")
    joins = " ".join(f"LEFT JOIN c{i} ON c{i}.applicant_ref = p.applicant_ref" for i in range(n))
    return (PERSON_CTE + ", " + ",\n".join(ctes) + f" SELECT p.applicant_ref AS applicant_ref, {', '.join(outs)} "
            f"FROM person AS p {joins}")


def test_row_multiplication_counted_a_level_up_is_a_dependency():
    outs = [Output("applicant_ref", "ref")] + [Output(f"b{i}", "flag") for i in range(7)]
    problems = check_template(_variant(_chains(7), outs))
    assert any(p.construct == "dataset health.resident" for p in problems), problems
    from sandbox.templates.library import template_disclosure
    d = template_disclosure(_variant(_chains(2), outs[:3]))
    assert f"{RES}.birth_date" in d["outputs"]["b0"]


def test_distinct_rows_depend_on_the_values_they_keep():
    sql = PERSON_CTE + """, d AS (SELECT DISTINCT p.applicant_ref, v.icd10 FROM person AS p
         JOIN health.outpatient_visit AS v ON v.person_id = p.person_id),
       n AS (SELECT d.applicant_ref, COUNT(*) AS k FROM d GROUP BY d.applicant_ref)
     SELECT p.applicant_ref AS applicant_ref, CASE WHEN n.k > 3 THEN 'a' ELSE 'b' END AS x
     FROM person AS p LEFT JOIN n ON n.applicant_ref = p.applicant_ref"""
    from sandbox.templates.library import template_disclosure
    assert "health.outpatient_visit.icd10" in template_disclosure(_variant(sql))["outputs"]["x"]


def test_runs_see_only_the_consented_applicants_records(city, frames, applicants):
    """Defence in depth: whatever the checker misses, a run's views hold only the records of the
    persons the consented upload rows name — a population count is the applicants' count."""
    path, table = applicants
    sql = PERSON_CTE + """, n AS (SELECT r.person_id, COUNT(*) OVER (PARTITION BY r.person_id) AS k
                                   FROM health.resident AS r)
     SELECT p.applicant_ref AS applicant_ref, CASE WHEN n.k = 1 THEN 'a' ELSE 'b' END AS x
     FROM person AS p LEFT JOIN n ON n.person_id = p.person_id"""
    assert check_template(_variant(sql)) == []
    from sandbox.templates import library as tpl
    seen = {}
    real = tpl.domain_connection

    def spy(views, **kw):
        cm = real(views, **kw)

        class Con:      # counts what the template's view holds just before each statement
            def __init__(self, con):
                self.con = con

            def sql(self, q, *a, **kw):
                try:
                    seen["resident"] = self.con.sql(f'SELECT COUNT(*) FROM "{view_name(RES)}"').fetchall()[0][0]
                except duckdb.Error:
                    pass
                return self.con.sql(q, *a, **kw)

            def __getattr__(self, name):
                return getattr(self.con, name)

        class Wrap:
            def __enter__(self):
                return Con(cm.__enter__())

            def __exit__(self, *a):
                return cm.__exit__(*a)
        return Wrap()

    import unittest.mock as mock
    with mock.patch.object(tpl, "domain_connection", spy):
        ans = run_template(_variant(sql), {}, city, path, as_of=RUN_DATE)
    assert 0 < seen["resident"] <= ans.persons < len(frames[RES])


# The third review (2026-11-28): each passed `check_template` and was confirmed with `run_template`.
REVIEW3 = {
    # F1: a LEFT JOIN tied to two tables on its left connected them
    "left_join_bridges_two_left_tables": PERSON_CTE + """SELECT p.applicant_ref AS applicant_ref,
       CASE WHEN BOOL_OR(z.birth_date < DATE '1950-01-01') THEN 'a' ELSE 'b' END AS x
     FROM person AS p JOIN health.resident AS z ON TRUE
     LEFT JOIN health.chronic_condition AS c ON c.person_id = p.person_id AND c.person_id = z.person_id
     GROUP BY p.applicant_ref""",
    "left_join_bridges_two_applicants": PERSON_CTE + """SELECT p1.applicant_ref AS applicant_ref,
       CASE WHEN BOOL_OR(p2.person_id IS NULL) THEN 'a' ELSE 'b' END AS x
     FROM person AS p1 JOIN person AS p2 ON TRUE
     LEFT JOIN person AS p3 ON p3.applicant_ref = p1.applicant_ref AND p3.applicant_ref = p2.applicant_ref
     GROUP BY p1.applicant_ref""",
    # F2: SEMI / ANTI joins were invisible to the checker
    "semi_join": PERSON_CTE + """, q AS (SELECT p.applicant_ref FROM person AS p
         SEMI JOIN health.resident AS z ON z.birth_date < DATE '1950-01-01')
     SELECT p.applicant_ref AS applicant_ref, CASE WHEN q.applicant_ref IS NULL THEN 'a' ELSE 'b' END AS x
     FROM person AS p LEFT JOIN q ON q.applicant_ref = p.applicant_ref""",
    "anti_join": PERSON_CTE + """, q AS (SELECT p.applicant_ref FROM person AS p
         ANTI JOIN health.resident AS z ON z.birth_date < DATE '1950-01-01')
     SELECT p.applicant_ref AS applicant_ref, CASE WHEN q.applicant_ref IS NULL THEN 'a' ELSE 'b' END AS x
     FROM person AS p LEFT JOIN q ON q.applicant_ref = p.applicant_ref""",
    # F6: a name that is a CTE in one place and an engine table in another
    "nested_with": PERSON_CTE + """SELECT p.applicant_ref AS applicant_ref,
       CASE WHEN EXISTS (WITH duckdb_views AS (SELECT 1 AS view_name) SELECT 1 FROM duckdb_views) THEN 'a'
            ELSE 'b' END AS x FROM person AS p""",
    "cte_read_before_it_is_defined": """WITH person AS (
         SELECT a.applicant_ref, r.person_id FROM applicants AS a
         LEFT JOIN health.resident AS r ON r.id_number = a.id_number
         LEFT JOIN duckdb_views AS dv ON dv.view_name = a.applicant_ref),
       duckdb_views AS (SELECT 'x' AS view_name)
     SELECT p.applicant_ref AS applicant_ref, 'a' AS x FROM person AS p""",
}


@pytest.mark.parametrize("case", sorted(REVIEW3))
def test_third_review_findings_are_refused(case):
    problems = check_template(_variant(REVIEW3[case]))
    assert problems, case
    assert all(p.message_zh for p in problems)


def test_a_left_joined_value_can_be_null_and_counts_so():
    """F3: ten COALESCE'd flags from LEFT-joined CTEs take 3 values each (NULL when no match), not 2."""
    ctes = ",\n".join(f"""c{i} AS (SELECT z.person_id, COALESCE(YEAR(z.birth_date) > {1940 + 5 * i}, FALSE) AS f
                          FROM health.resident AS z WHERE YEAR(z.birth_date) <> {1930 + i})""" for i in range(7))
    sql = PERSON_CTE + ", " + ctes + " SELECT p.applicant_ref AS applicant_ref, " + \
        ", ".join(f"c{i}.f AS b{i}" for i in range(7)) + " FROM person AS p " + \
        " ".join(f"LEFT JOIN c{i} ON c{i}.person_id = p.person_id" for i in range(7))
    outs = [Output("applicant_ref", "ref")] + [Output(f"b{i}", "flag") for i in range(7)]
    problems = check_template(_variant(sql, outs))
    assert any("2,187 combinations" in p.message for p in problems), problems


def test_counts_of_rows_are_a_dependency():
    """F4: flags over a per-person COUNT(*) depend on which rows there are (the dataset's `(rows)`)."""
    sql = PERSON_CTE + """, n AS (SELECT v.person_id, COUNT(*) AS k FROM health.outpatient_visit AS v
                                   GROUP BY v.person_id)
     SELECT p.applicant_ref AS applicant_ref, """ + ", ".join(
        f"FLOOR(n.k / {2 ** i}) - 2 * FLOOR(n.k / {2 ** (i + 1)}) = 1 AS b{i}" for i in range(7)) + \
        " FROM person AS p LEFT JOIN n ON n.person_id = p.person_id"
    outs = [Output("applicant_ref", "ref")] + [Output(f"b{i}", "flag") for i in range(7)]
    problems = check_template(_variant(sql, outs))
    p = next(p for p in problems if p.construct == "dataset health.outpatient_visit")
    assert "2,187" in p.message


def test_natural_flags_fit_the_bound():
    """No false positive for what an underwriter would write: seven condition flags as EXISTS."""
    conds = ["hypertension", "diabetes", "coronary", "cancer", "copd", "stroke", "ckd"]
    sql = PERSON_CTE + "SELECT p.applicant_ref AS applicant_ref, " + ", ".join(
        f"EXISTS (SELECT 1 FROM health.chronic_condition AS c WHERE c.person_id = p.person_id "
        f"AND c.condition = '{c}') AS {c}" for c in conds) + " FROM person AS p"
    t = _variant(sql, [Output("applicant_ref", "ref")] + [Output(c, "flag") for c in conds])
    assert check_template(t) == []
    from sandbox.templates.library import template_disclosure
    assert template_disclosure(t)["datasets"][CHR] == 2 ** 7


def test_one_id_number_is_asked_about_at_most_so_many_times(city, frames, tmp_path):
    """F5: each row asks again about the same person, so repeated ID numbers are capped per run."""
    idn = frames[RES].id_number.iloc[0]
    rows = [{"applicant_ref": f"R{i}", "id_number": idn, "consent_ref": f"C{i}", "consent_valid_from": "2025-01-01",
             "consent_valid_until": "2027-01-01"} for i in range(2)]
    path = tmp_path / "twice.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(PdaoError) as e:
        run_template(library_template("underwriting"), {"as_of": AS_OF}, city, path, as_of=RUN_DATE)
    assert e.value.code == "template_upload_invalid" and "at most 1 per person" in e.value.message
    assert library_template("claims").upload.max_rows_per_person == 12
    assert "max_rows_per_person" not in library_template("underwriting").as_dict()["upload"]   # digest unchanged
