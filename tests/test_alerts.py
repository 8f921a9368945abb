"""Alerts for the security reviewer: the pure decisions (denial bursts, budgets, differencing,
off-hours downloads) on hand-made records, then `GET /audit/alerts` on both backends."""

from __future__ import annotations

import functools
import json
from collections import defaultdict
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlmodel import Session, select

from pdao.kernel import audit
from pdao.kernel.audit import AuditEvent
from sandbox.alerts import (
    Alert,
    AlertThresholds,
    EventRecord,
    QueryRecord,
    SceneRecord,
    budgets_nearly_spent,
    decide_alerts,
    denial_bursts,
    differencing_suspects,
    in_office_hours,
    is_download,
    near_identical,
    off_hours_downloads,
    off_hours_stretch,
    sql_shape,
)
from tests.scene_helpers import BY_DISTRICT, SCENE_ITEMS, VISITS, active_scene
from tests.test_upload_joins import residents  # noqa: F401 - a fixture: the residents loaded (prod and dev)

T0 = datetime(2024, 5, 6, 2, 0, tzinfo=UTC)            # Monday 10:00 in Yinchuan (UTC+8)
CST = timezone(timedelta(hours=8))


def cst(y, mo, d, h, mi=0, s=0) -> datetime:
    """A Beijing-time instant (2024-05-06 is a Monday)."""
    return datetime(y, mo, d, h, mi, s, tzinfo=CST)


def deny(seq, at, actor="insurer_b", reason="role_not_permitted", **kw) -> EventRecord:
    return EventRecord(seq=seq, at=at, actor=actor, action="audit.read", decision="deny", reason=reason,
                       org=kw.pop("org", "company_b"), **kw)


def download(seq, at, actor="insurer_a", **kw) -> EventRecord:
    return EventRecord(seq=seq, at=at, actor=actor, action=kw.pop("action", "result.download"),
                       decision=kw.pop("decision", "allow"), org="company_a", object=f"result:{seq}", **kw)


# ---------------------------------------------------------------------------------------------
# many_denials


def test_ten_denials_within_an_hour_make_one_alert_resting_on_their_seqs():
    events = [deny(i, T0 + timedelta(minutes=6 * i)) for i in range(10)]   # 0 … 54 minutes
    [a] = denial_bursts(events)
    assert a.kind == "many_denials" and a.actor == "insurer_b" and a.org == "company_b" and a.count == 10
    assert a.audit_seqs == tuple(range(10)) and a.first_at == T0 and a.last_at == T0 + timedelta(minutes=54)
    assert a.severity == "warning" and a.detail["reasons"] == {"role_not_permitted": 10}
    assert "insurer_b" in a.message and "10" in a.message and "insurer_b" in a.message_zh and "拒绝" in a.message_zh


def test_nine_denials_or_ten_spread_over_more_than_an_hour_are_not_a_burst():
    assert denial_bursts([deny(i, T0 + timedelta(minutes=i)) for i in range(9)]) == []
    assert denial_bursts([deny(i, T0 + timedelta(minutes=7 * i)) for i in range(10)]) == []   # 63 minutes
    exactly = [deny(i, T0 + timedelta(seconds=400 * i)) for i in range(10)]   # 60 minutes: still within
    assert len(denial_bursts(exactly)) == 1


def test_denials_count_per_actor_and_ignore_anonymous_and_allowed_events():
    events = ([deny(i, T0 + timedelta(minutes=i), actor="insurer_b" if i % 2 else "insurer_a") for i in range(18)]
              + [deny(100 + i, T0, actor=None) for i in range(30)]
              + [EventRecord(seq=200 + i, at=T0, actor="insurer_b", action="x", decision="allow") for i in range(30)]
              + [EventRecord(seq=300 + i, at=T0, actor="insurer_b", action="x", decision="error") for i in range(30)])
    assert denial_bursts(events) == []
    assert [a.actor for a in denial_bursts(events, AlertThresholds(denials=9))] in (["insurer_a", "insurer_b"],
                                                                                      ["insurer_b", "insurer_a"])


def test_separate_bursts_stay_separate_and_overlapping_windows_merge():
    first = [deny(i, T0 + timedelta(minutes=5 * i)) for i in range(15)]                 # 70 minutes, dense
    later = [deny(100 + i, T0 + timedelta(hours=5, minutes=i)) for i in range(10)]
    a, b = sorted(denial_bursts(first + later), key=lambda a: a.first_at)
    assert a.count == 15 and a.audit_seqs == tuple(range(15)) and b.count == 10 and b.first_at == T0 + timedelta(hours=5)
    heavy = denial_bursts([deny(i, T0 + timedelta(seconds=i)) for i in range(20)])
    assert [x.severity for x in heavy] == ["high"]


def test_a_failed_login_storm_counts_for_the_attempted_username():
    events = [EventRecord(seq=i, at=T0 + timedelta(seconds=i), actor="office1", action="auth.token", decision="deny",
                          reason="bad_credentials") for i in range(12)]
    [a] = denial_bursts(events)
    assert a.actor == "office1" and a.org is None and a.detail["actions"] == {"auth.token": 12}


# ---------------------------------------------------------------------------------------------
# budget_nearly_spent


def scene(**kw) -> SceneRecord:
    base = dict(id=7, org="company_a", budget_epsilon=3.0, epsilon_spent=0.0, title="慢病统计",
                last_spent_at=T0, query_ids=(1, 2, 3))
    base.update(kw)
    return SceneRecord(**base)


def test_a_budget_is_flagged_from_ninety_percent_and_high_when_spent():
    assert budgets_nearly_spent([scene(epsilon_spent=2.69)]) == []
    [a] = budgets_nearly_spent([scene(epsilon_spent=0.45 * 6)])          # 2.7000000000000006 or so: 90%
    assert a.kind == "budget_nearly_spent" and a.severity == "warning" and a.scene_id == 7 and a.org == "company_a"
    assert a.query_ids == (1, 2, 3) and a.last_at == T0 and "90%" in a.message and "90%" in a.message_zh
    assert a.detail["epsilon_left"] == pytest.approx(0.3)
    [b] = budgets_nearly_spent([scene(epsilon_spent=3.0)])
    assert b.severity == "high" and "100%" in b.message


def test_only_usable_scenes_and_real_budgets_count():
    assert budgets_nearly_spent([scene(epsilon_spent=3.0, status=s) for s in ("revoked", "expired", "draft")]) == []
    assert budgets_nearly_spent([scene(budget_epsilon=0.0, epsilon_spent=0.0)]) == []
    assert len(budgets_nearly_spent([scene(epsilon_spent=3.0, status="suspended")])) == 1
    [d] = budgets_nearly_spent([scene(epsilon_spent=0.1, budget_delta=1e-6, delta_spent=0.95e-6)])
    assert d.detail["share"] == pytest.approx(0.95) and "δ" in d.message
    assert budgets_nearly_spent([scene(epsilon_spent=2.8)], AlertThresholds(budget_share=0.95)) == []


# ---------------------------------------------------------------------------------------------
# differencing: what counts as near-identical

BASE = (f"SELECT district, COUNT(*) AS n FROM {VISITS} "
        "WHERE visit_date >= DATE '2018-01-01' AND fee > 100 GROUP BY district")


@pytest.mark.parametrize("other", [
    BASE,                                                                           # the same query again
    BASE.replace("2018-01-01", "2019-06-30").replace("100", "250"),                 # other literal values
    BASE.replace("AND fee > 100", "AND fee > 100 AND person_id <> 4711"),            # one person excluded
    BASE.replace("AND fee > 100", "AND fee > 100 AND person_id = 4711"),             # one person alone
    BASE.replace("WHERE visit_date >= DATE '2018-01-01' AND ", "WHERE "),            # one condition dropped
    BASE.replace("WHERE visit_date >= DATE '2018-01-01' AND fee > 100",
                 "WHERE (fee > 7) AND visit_date >= DATE '2020-02-02'"),             # reordered, parenthesized
    BASE.lower().replace("select", "SELECT   ").replace("\n", " "),                 # case and spacing
    BASE.replace("fee > 100", "fee > -3.5"),                                         # a negative number
    BASE.replace("COUNT(*) AS n", "COUNT(*) AS person_4711"),                        # another output alias
    BASE.replace("SELECT district, COUNT(*) AS n", "SELECT COUNT(*), district"),     # select items reordered
    BASE.replace("COUNT(*) AS n", "COUNT(*) AS n, SUM(fee) AS s"),                   # a statistic more
    BASE.replace(f"FROM {VISITS} ", f"FROM {VISITS} AS zq ").replace("fee >", "zq.fee >"),   # a table alias
    BASE.replace("fee > 100", "100 < fee"),                                          # the literal first
    BASE.replace("fee > 100", "fee >= 101"),                                         # the same bound, other strictness
    BASE.replace("fee > 100", "NOT (fee <= 100)"),                                   # NOT pushed inwards
    BASE + " ORDER BY n DESC LIMIT 3",                                               # ORDER BY and LIMIT: presentation
    BASE.replace("GROUP BY district", "GROUP BY 1"),                                 # GROUP BY position
    # another population (a literal changed), another question: still set against each other
    BASE.replace("100", "250").replace("COUNT(*)", "SUM(fee)"),                      # another statistic
    BASE.replace("100", "250").replace("district", "hospital"),                      # another GROUP BY
    f"SELECT person_id FROM {VISITS} WHERE visit_date >= DATE '2018-01-02' AND fee > 100",   # its rows
])
def test_near_identical_pairs(other):
    a, b = sql_shape(BASE), sql_shape(other)
    assert a is not None and b is not None and near_identical(a, b) and near_identical(b, a)


@pytest.mark.parametrize("other", [
    BASE.replace("GROUP BY district", "GROUP BY hospital").replace("SELECT district", "SELECT hospital"),
    BASE.replace("COUNT(*)", "SUM(fee)"),
    BASE.replace("outpatient_visit", "inpatient_stay"),
    BASE.replace("AND fee > 100", "AND fee > 100 AND person_id <> 1 AND sex = 'F'"),   # two conditions more
    BASE.replace("fee > 100", "hospital = 'H1'"),                                        # one condition swapped
    BASE.replace("WHERE visit_date >= DATE '2018-01-01' AND fee > 100 ", ""),            # both dropped
    BASE.replace("fee > 100", "fee < 100"),                                              # a bound from the other side
    f"SELECT person_id FROM {VISITS} WHERE visit_date >= DATE '2018-01-01' AND fee > 100",   # the same rows, listed
])
def test_not_near_identical_pairs(other):
    a, b = sql_shape(BASE), sql_shape(other)
    assert a is not None and b is not None and not near_identical(a, b)


@pytest.mark.parametrize("a, b", [
    ("fee < 5", "5 > fee"),
    ("fee <= 5", "5 >= fee"),
    ("fee > 5 AND hospital = 'H1'", "hospital = 'H1' AND fee > 5"),
    ("(district = 'a' OR hospital = 'b') AND fee > 5", "fee > 5 AND (hospital = 'b' OR district = 'a')"),
    ("NOT (district = 'a' OR hospital = 'b')", "district <> 'a' AND hospital <> 'b'"),
    ("NOT (district = 'a' AND fee < 5)", "fee >= 5 OR district <> 'a'"),
    ("NOT NOT fee < 5", "fee < 5"),
    ("district = 'a'", "district IN ('a')"),
    ("NOT district IN ('a', 'b')", "district NOT IN ('b', 'a')"),
    ("district <> 'a'", "NOT (district = 'a')"),
    ("fee BETWEEN 1 AND 2", "fee >= 1 AND fee <= 2"),
    ("NOT fee BETWEEN 1 AND 2", "fee < 1 OR fee > 2"),
    ("hospital IS NOT NULL", "NOT (hospital IS NULL)"),
    ("visit_date = DATE '2020-01-01'", "CAST('2020-01-01' AS DATE) = visit_date"),
])
def test_one_condition_in_another_spelling_is_the_same_population(a, b):
    """Not only the same skeleton: the same population, literals and all (the digest agrees)."""
    sa, sb = (sql_shape(f"SELECT COUNT(*) FROM {VISITS} WHERE {w}") for w in (a, b))
    assert sa == sb and sa.population == sb.population


def test_in_lists_of_any_length_are_the_same_question():
    a = sql_shape(f"SELECT COUNT(*) FROM {VISITS} WHERE district IN ('兴庆区', '金凤区', '西夏区')")
    b = sql_shape(f"SELECT COUNT(*) FROM {VISITS} WHERE district IN ('兴庆区')")
    c = sql_shape(f"SELECT COUNT(*) FROM {VISITS} WHERE district = '金凤区'")
    assert near_identical(a, b) and near_identical(a, c) and a.conjuncts == c.conjuncts == ("d.district in (?)",)
    assert a.population != b.population != c.population
    assert "兴庆区" not in a.render() + repr(a)


@pytest.mark.parametrize("sql", ["SELEC x FROM", "", "   ", "SELECT 1; SELECT 2", "SELECT (", ";;", "\x00", "SELECT 1",
                                 "SELECT * FROM (SELECT 1)", "SELECT 1 UNION SELECT 2", "DELETE FROM t",
                                 f"SELECT COUNT(*) FROM {VISITS} WHERE " + "(" * 5000 + "fee > 1" + ")" * 5000])
def test_sql_that_is_not_one_select_from_a_table_has_no_shape(sql):
    assert sql_shape(sql) is None


# The checked SQL, as sandbox/engine/sql.py regenerates it for a scene over the packaged catalog
@functools.cache
def _dataset_info(code: str):
    from catalog.descriptor import PACKAGED_DESCRIPTORS, parse_descriptor_text
    from sandbox.engine.sql import DatasetInfo

    desc, problems = parse_descriptor_text((PACKAGED_DESCRIPTORS / f"{code}.yaml").read_text(encoding="utf-8"),
                                           f"{code}.yaml")
    assert desc is not None, problems
    return DatasetInfo(desc.code, [f.name for f in desc.fields], desc.privacy_unit,
                       {f.name: str(getattr(f.type, "value", f.type)) for f in desc.fields})


RESIDENTS = "health.resident"
APPLICANTS_COLUMNS = {"applicant_ref": "string", "id_number": "string", "consent_ref": "string",
                      "consent_signed_on": "date", "consent_valid_until": "date", "note": "string"}


def checked(sql: str, code: str = VISITS) -> str:
    from sandbox.engine.sql import check_query

    info = _dataset_info(code)
    grants = {(code, f): ("aggregate", "group_by", "filter", "masked_output", "join_key") for f in info.fields}
    return check_query(sql, grants, [info], {"applicants": APPLICANTS_COLUMNS}).sql


ALIASES = ["r", "u", "x1", "res", "d", "zz", "q7", "base", "p", "t"]   # probe 1: the dataset as `u`, the upload as `d`


def probe(i: int, aliases=True) -> str:
    """The review's probe: one literal changed each time, random output and table aliases (and
    the OR's operands, `=` or IN, in either order)."""
    t, a = (ALIASES[i % len(ALIASES)], ALIASES[(i + 3) % len(ALIASES)]) if aliases else ("r", "a")
    who = f"{a}.applicant_ref = 'A{i:05d}'" if i % 2 else f"{a}.applicant_ref IN ('A{i:05d}')"
    where = f"{t}.district = '兴庆区' OR {who}" if i % 3 else f"{who} OR '兴庆区' = {t}.district"
    return (f"SELECT COUNT(*) AS {'n' if not aliases else f'n_{i}_{t}'} FROM {RESIDENTS} {t} "
            f"JOIN applicants {a} ON {t}.id_number = {a}.id_number WHERE {where}")


def test_the_reviews_probes_with_random_aliases_have_one_skeleton():
    texts = [probe(i) for i in range(8)]
    shapes = [sql_shape(checked(s, RESIDENTS)) for s in texts]
    assert len({s.render() for s in shapes}) == 1 and len({s.population for s in shapes}) == 8
    assert all(near_identical(a, b) for a in shapes for b in shapes)
    assert shapes[0].render() == ("select count(*) from v_health_resident d join u_applicants u on "
                                  "d.id_number = u.id_number where d.district in (?) or u.applicant_ref in (?)")
    # the tenant's own text has the same shape (the fallback when there is no checked SQL)
    assert [sql_shape(s).render() for s in texts] == [s.render() for s in shapes]


def test_rows_and_aggregates_about_near_identical_populations_link():
    day = "SELECT {out} FROM " + VISITS + " WHERE visit_date = DATE '{d}' AND icd10_chapter = 'F'{more}"
    rows = [sql_shape(checked(day.format(out=out, d=d, more=""))) for out, d in
            [("person_id, visit_date", "2024-03-01"), ("visit_date AS v, person_id AS p", "2024-03-02"),
             ("department", "2024-03-03")]]
    aggs = [sql_shape(checked(day.format(out=out, d=d, more=more) + group)) for out, d, more, group in
            [("COUNT(*) AS n", "2024-03-04", "", ""),
             ("district, SUM(fee)", "2024-03-05", " AND fee < 900", " GROUP BY district")]]
    assert [s.kind for s in rows + aggs] == ["rows"] * 3 + ["aggregate"] * 2
    # another population: rows against rows (their number differences), rows against aggregates,
    # aggregates against aggregates whatever they select or group by
    assert all(near_identical(a, b) for a in rows + aggs for b in rows + aggs if a is not b)
    # the same population, another question: exploration, nothing to difference
    same = day.format(out="person_id", d="2024-03-01", more="")
    count_same, sum_same = (same.replace("SELECT person_id", f"SELECT {s}") for s in ("COUNT(*)", "SUM(fee)"))
    assert sql_shape(checked(same)).population == sql_shape(checked(count_same)).population
    assert not near_identical(sql_shape(checked(same)), sql_shape(checked(count_same)))
    assert not near_identical(sql_shape(checked(count_same)), sql_shape(checked(sum_same)))
    assert not near_identical(sql_shape(checked(same)), sql_shape(checked(same.replace("person_id", "department"))))
    # … but the same question again is (averaging), ORDER BY or LIMIT aside
    assert near_identical(sql_shape(checked(count_same)), sql_shape(checked(count_same + " LIMIT 5")))
    assert near_identical(sql_shape(checked(same)), sql_shape(checked(same + " LIMIT 5")))


# ---------------------------------------------------------------------------------------------
# differencing: the detector


def q(i, sql, at=None, org="company_a", scene_id=7, mode="prod", requester="insurer_a", checked_sql="",
      kind=None) -> QueryRecord:
    return QueryRecord(id=i, org=org, scene_id=scene_id, sql=sql, created_at=at or T0 + timedelta(minutes=i),
                       mode=mode, requester=requester, checked_sql=checked_sql, kind=kind)


def with_person(pid: int) -> str:
    return BASE.replace("AND fee > 100", f"AND fee > 100 AND person_id <> {pid}")


def test_five_near_identical_prod_queries_in_a_day_are_a_suspect():
    queries = [q(1, BASE)] + [q(i, with_person(4000 + i)) for i in range(2, 6)]
    [a] = differencing_suspects(queries)
    assert a.kind == "differencing" and a.org == "company_a" and a.scene_id == 7 and a.actor == "insurer_a"
    assert a.query_ids == (1, 2, 3, 4, 5) and a.count == 5 and a.severity == "warning"
    assert a.first_at == T0 + timedelta(minutes=1) and a.last_at == T0 + timedelta(minutes=5)
    # never a literal: neither the person ids nor the date nor the fee bound
    text = json.dumps(a.to_dict(), ensure_ascii=False)
    assert "4002" not in text and "2018-01-01" not in text and "100" not in a.detail["skeleton"]
    assert "?" in a.detail["skeleton"] and "差分" in a.message_zh and "differencing" in a.message
    assert a.detail["kinds"] == {"aggregate": 5} and a.detail["distinct_populations"] == 5
    # the message says what is compared, and what is not
    assert "GROUP BY" in a.message and "GROUP BY" in a.message_zh and "row-level and aggregate" in a.message
    assert "逐行结果与聚合结果" in a.message_zh


def test_the_reviews_probes_are_a_suspect_whatever_their_aliases():
    """The review: 'giving each probe random output and table aliases kept the differencing alert
    silent'. On the checked SQL, as collect_alerts reads it, and on the text alone."""
    probes = [q(i, probe(i), checked_sql=checked(probe(i), RESIDENTS), kind="aggregate") for i in range(6)]
    [a] = differencing_suspects(probes)
    assert a.query_ids == tuple(range(6)) and a.detail["distinct_shapes"] == 1
    text = json.dumps(a.to_dict(), ensure_ascii=False)
    assert "兴庆区" not in text and "A0000" not in text and "n_1_" not in text and "zz" not in a.detail["skeleton"]
    [b] = differencing_suspects([q(i, probe(i)) for i in range(6)])
    assert b.query_ids == a.query_ids and b.detail["skeleton"] == a.detail["skeleton"]


def test_exploration_with_other_group_bys_of_one_population_is_not_a_suspect():
    where = " WHERE visit_date >= DATE '2023-01-01' AND icd10_chapter = 'I'"
    keys = ["district", "hospital", "department", "DATE_TRUNC('month', visit_date)", "DATE_TRUNC('year', visit_date)"]
    explore = [f"SELECT {k} AS k, COUNT(*) AS n, AVG(fee) AS mean FROM {VISITS}{where} GROUP BY 1" for k in keys]
    explore += [f"SELECT COUNT(*) AS n FROM {VISITS}{where}", f"SELECT department, visit_date FROM {VISITS}{where}"]
    records = [q(i, s, checked_sql=checked(s)) for i, s in enumerate(explore)]
    assert differencing_suspects(records) == []
    # the same questions, each about a changed population (one literal): a suspect
    moved = [q(i, s.replace("2023-01-01", f"2023-01-{i + 1:02d}"), checked_sql=checked(s.replace("2023-01-01",
             f"2023-01-{i + 1:02d}"))) for i, s in enumerate(explore)]
    [a] = differencing_suspects(moved)
    assert a.count == 7 and a.detail["kinds"] == {"aggregate": 6, "rows": 1} and a.detail["distinct_populations"] == 7


def test_rows_and_aggregates_about_one_population_are_one_suspect():
    """The review: two row-level queries a day apart give an exact count by difference; rows and
    aggregates of one population, spelled differently each time, are one cluster."""
    sqls = [f"SELECT person_id, visit_date FROM {VISITS} WHERE visit_date = DATE '2024-03-01' AND icd10_chapter = 'F'",
            f"SELECT v.visit_date AS day, v.person_id AS who FROM {VISITS} AS v "
            "WHERE v.icd10_chapter IN ('F') AND DATE '2024-03-02' = v.visit_date",
            f"SELECT COUNT(*) AS n FROM {VISITS} x WHERE x.icd10_chapter = 'F' AND x.visit_date = '2024-03-03'",
            f"SELECT SUM(fee) AS s, COUNT(*) AS c FROM {VISITS} WHERE NOT (icd10_chapter <> 'F') "
            "AND visit_date = '2024-03-04' AND 500 > fee",
            f"SELECT district, COUNT(*) FROM {VISITS} WHERE visit_date = DATE '2024-03-05' AND icd10_chapter = 'F' "
            "AND fee < 800 GROUP BY district"]
    [a] = differencing_suspects([q(i, s, checked_sql=checked(s)) for i, s in enumerate(sqls)])
    assert a.count == 5 and a.detail["kinds"] == {"aggregate": 3, "rows": 2}
    assert "2024-03" not in json.dumps(a.to_dict(), ensure_ascii=False)


def test_template_runs_are_left_out():
    queries = [q(i, with_person(i), kind="template") for i in range(6)]
    assert differencing_suspects(queries) == []
    assert len(differencing_suspects([q(i, with_person(i), kind="aggregate") for i in range(6)])) == 1


def test_four_or_spread_out_or_dev_queries_are_not_a_suspect():
    assert differencing_suspects([q(i, with_person(i)) for i in range(4)]) == []
    spread = [q(i, with_person(i), at=T0 + timedelta(hours=7 * i)) for i in range(5)]   # 28 hours
    assert differencing_suspects(spread) == []
    assert differencing_suspects([q(i, with_person(i), mode="dev") for i in range(10)]) == []


def test_groups_are_per_organization_and_scene():
    queries = ([q(i, with_person(i), org="company_a") for i in range(3)]
               + [q(10 + i, with_person(i), org="company_b") for i in range(3)]
               + [q(20 + i, with_person(i), scene_id=8) for i in range(3)])
    assert differencing_suspects(queries) == []
    found = sorted(differencing_suspects(queries, AlertThresholds(near_identical=3)), key=lambda a: a.query_ids)
    assert [(a.org, a.scene_id, a.query_ids) for a in found] == [
        ("company_a", 7, (0, 1, 2)), ("company_b", 7, (10, 11, 12)), ("company_a", 8, (20, 21, 22))]


def test_a_chain_of_one_more_condition_each_time_is_one_cluster():
    conds = ["fee > 1", "person_id <> 2", "hospital = 'x'", "sex = 'F'", "icd10 = 'I10'"]
    chain = [q(i, f"SELECT COUNT(*) FROM {VISITS} WHERE " + " AND ".join(conds[:i + 1])) for i in range(5)]
    [a] = differencing_suspects(chain)
    assert a.query_ids == (0, 1, 2, 3, 4) and a.detail["distinct_shapes"] == 5


def test_unparseable_sql_is_skipped_and_other_shapes_do_not_join():
    queries = ([q(i, with_person(i)) for i in range(4)] + [q(50, "SELEC nonsense"), q(51, "SELECT 1; SELECT 2")]
               + [q(60 + i, f"SELECT hospital, COUNT(*) FROM {VISITS} WHERE fee > {i} GROUP BY hospital")
                  for i in range(4)])
    assert differencing_suspects(queries) == []


def test_many_requesters_leave_the_actor_open():
    queries = [q(i, with_person(i), requester=f"user{i % 2}") for i in range(10)]
    [a] = differencing_suspects(queries)
    assert a.actor is None and a.detail["requesters"] == ["user0", "user1"] and a.severity == "high"


def _random_query(rng) -> str:
    conds = ["fee > {v}", "{v} > fee", "district = 'd{v}'", "hospital IN ('h{v}', 'h9')", "visit_date >= DATE '2020-01-0{v}'",
             "NOT (department = 'x{v}')", "icd10_chapter = 'A' OR district = 'd{v}'"]
    where = [rng.choice(conds).format(v=rng.randint(1, 3)) for _ in range(rng.randint(0, 3))]
    if rng.random() < 0.3:
        out = rng.choice(["person_id", "visit_date", "person_id, department"])
        group = ""
    else:
        key = rng.choice(["", "district", "hospital"])
        stats = rng.sample(["COUNT(*)", "SUM(fee)", "AVG(fee)"], rng.randint(1, 2))
        out = ", ".join(([key] if key else []) + stats)
        group = f" GROUP BY {key}" if key else ""
    table = rng.choice([VISITS, VISITS, "health.inpatient_stay"])
    return f"SELECT {out} FROM {table}" + (" WHERE " + " AND ".join(f"({w})" for w in where) if where else "") + group


def test_the_clusters_are_the_transitive_closure_of_near_identical():
    """The bucketed clustering links exactly what pairwise near_identical, taken transitively, links."""
    import random

    rng = random.Random(13)
    for _ in range(25):
        sqls = [_random_query(rng) for _ in range(rng.randint(2, 60))]
        records = [q(i, s, at=T0) for i, s in enumerate(sqls)]
        shapes = [sql_shape(s) for s in sqls]
        parent = list(range(len(sqls)))

        def find(i):
            while parent[i] != i:
                i = parent[i]
            return i
        for i in range(len(sqls)):
            for j in range(i):
                if near_identical(shapes[i], shapes[j]):
                    parent[find(i)] = find(j)
        expected = defaultdict(set)
        for i in range(len(sqls)):
            expected[find(i)].add(i)
        found = differencing_suspects(records, AlertThresholds(near_identical=1))
        assert sorted(sorted(a.query_ids) for a in found) == sorted(sorted(c) for c in expected.values())



# ---------------------------------------------------------------------------------------------
# download_off_hours


@pytest.mark.parametrize("at, inside", [
    (cst(2024, 5, 6, 7, 59, 59), False),        # Monday before opening
    (cst(2024, 5, 6, 8, 0), True),              # Monday 08:00 sharp: open
    (cst(2024, 5, 6, 19, 59, 59), True),
    (cst(2024, 5, 6, 20, 0), False),            # 20:00 sharp: closed
    (cst(2024, 5, 10, 12, 0), True),            # Friday noon
    (cst(2024, 5, 10, 20, 30), False),          # Friday evening
    (cst(2024, 5, 11, 12, 0), False),           # Saturday noon
    (cst(2024, 5, 12, 9, 0), False),            # Sunday morning
    (datetime(2024, 5, 6, 0, 0, tzinfo=UTC), True),        # = Monday 08:00 in Yinchuan
    (datetime(2024, 5, 5, 23, 59, tzinfo=UTC), False),     # = Monday 07:59 in Yinchuan (Sunday in UTC)
    (datetime(2024, 5, 10, 12, 30, tzinfo=UTC), False),    # Friday 12:30 UTC = Friday 20:30 in Yinchuan
    (datetime(2024, 5, 10, 8, 0, tzinfo=UTC), True),       # = Friday 16:00 in Yinchuan
    (datetime(2024, 5, 6, 2, 0), True),                    # naive = UTC: Monday 10:00 in Yinchuan
    (datetime(2024, 5, 5, 20, 0, tzinfo=timezone(timedelta(hours=-4))), True),   # New York Sunday 20:00 = Mon 08:00
])
def test_office_hours_are_counted_in_yinchuan_time(at, inside):
    assert in_office_hours(at) is inside


def test_an_off_hours_stretch_runs_from_the_last_closing():
    fri_close = cst(2024, 5, 10, 20, 0)
    for at in (cst(2024, 5, 10, 20, 0), cst(2024, 5, 11, 3, 0), cst(2024, 5, 12, 23, 0), cst(2024, 5, 13, 7, 59)):
        assert off_hours_stretch(at) == fri_close
    assert off_hours_stretch(cst(2024, 5, 7, 6, 0)) == cst(2024, 5, 6, 20, 0)      # Tuesday dawn ← Monday 20:00
    assert off_hours_stretch(cst(2024, 5, 6, 6, 0)) == cst(2024, 5, 3, 20, 0)      # Monday dawn ← Friday 20:00


def test_off_hours_downloads_group_per_actor_and_stretch():
    events = [
        download(1, cst(2024, 5, 10, 21, 0)),                      # Friday night
        download(2, cst(2024, 5, 11, 10, 0)),                      # Saturday: same stretch
        download(3, cst(2024, 5, 13, 7, 0)),                       # Monday dawn: same stretch
        download(4, cst(2024, 5, 13, 9, 0)),                       # Monday office hours: fine
        download(5, cst(2024, 5, 13, 22, 0)),                      # Monday night: a new stretch
        download(6, cst(2024, 5, 11, 10, 0), actor="insurer_b"),   # another actor
        download(7, cst(2024, 5, 11, 11, 0), decision="deny"),     # refused: no download happened
        download(8, cst(2024, 5, 11, 11, 0), action="results.read"),
        download(9, cst(2024, 5, 11, 12, 0), synthetic=True),      # the dev twin's answer
        download(10, cst(2024, 5, 11, 13, 0), action="results.download.csv"),
    ]
    alerts = sorted(off_hours_downloads(events), key=lambda a: a.audit_seqs)
    assert [(a.actor, a.audit_seqs) for a in alerts] == [("insurer_a", (1, 2, 10, 3)), ("insurer_a", (5,)),
                                                         ("insurer_b", (6,))]
    a = alerts[0]
    assert a.kind == "download_off_hours" and a.count == 4 and a.first_at == cst(2024, 5, 10, 21, 0)
    assert "2024-05-10 21:00" in a.message and "Fri" in a.message and "周五" in a.message_zh
    assert a.detail["objects"] == ["result:1", "result:10", "result:2", "result:3"]   # sorted names
    kept = off_hours_downloads(events, AlertThresholds(skip_synthetic_downloads=False))
    assert sum(a.count for a in kept) == 7


def test_office_hours_are_configurable():
    t = AlertThresholds(office_start=datetime.min.time(), office_end=datetime.max.time(), office_days=frozenset(range(7)))
    assert off_hours_downloads([download(1, cst(2024, 5, 11, 3, 0))], t) == []


# ---------------------------------------------------------------------------------------------
# All together


def test_decide_alerts_sorts_newest_first_and_serializes():
    events = ([deny(i, T0 + timedelta(minutes=i)) for i in range(10)]
              + [download(100, cst(2024, 5, 4, 12, 0))])
    alerts = decide_alerts(events, [scene(epsilon_spent=3.0, last_spent_at=T0 + timedelta(days=1))],
                           [q(i, with_person(i), at=T0 - timedelta(hours=1, minutes=-i)) for i in range(5)])
    assert [a.kind for a in alerts] == ["budget_nearly_spent", "many_denials", "differencing", "download_off_hours"]
    assert all(isinstance(a, Alert) for a in alerts)
    dumped = json.loads(json.dumps([a.to_dict() for a in alerts], ensure_ascii=False))
    assert {d["key"] for d in dumped} == {a.key for a in alerts} and len(dumped) == 4
    assert dumped[0]["last_at"].endswith("+00:00")


# ---------------------------------------------------------------------------------------------
# HTTP: GET /audit/alerts


def alerts_of(client, auth, who="auditor1", **params):
    r = client.get("/api/v1/audit/alerts", headers=auth(who), params=params)
    assert r.status_code == 200, r.text
    return r.json()


def test_many_denials_are_visible_to_auditors_and_the_office_only(client, auth):
    for _ in range(10):
        r = client.get("/api/v1/audit/alerts", headers=auth("insurer_b"))
        assert r.status_code == 403 and r.json()["code"] == "role_not_permitted"
    body = alerts_of(client, auth)
    [a] = [a for a in body["alerts"] if a["kind"] == "many_denials"]
    assert a["actor"] == "insurer_b" and a["org"] == "company_b" and a["count"] == 10 and len(a["audit_seqs"]) == 10
    assert a["detail"]["reasons"] == {"role_not_permitted": 10} and a["message_zh"]
    assert body["thresholds"]["denials"] == 10 and body["count"] == len(body["alerts"])
    assert [x["key"] for x in alerts_of(client, auth, "office1")["alerts"]] == [x["key"] for x in body["alerts"]]
    for who in ("insurer_a", "provider1", "reviewer1", "operator1"):
        r = client.get("/api/v1/audit/alerts", headers=auth(who))
        assert r.status_code == 403 and r.json()["message_zh"], who
    assert client.get("/api/v1/audit/alerts").status_code == 401
    # a window that ends before the denials shows none of them
    early = alerts_of(client, auth, until="2000-01-01T00:00:00Z", since="1999-12-01T00:00:00+08:00")
    assert early["alerts"] == []


def test_the_window_is_checked(client, auth):
    r = client.get("/api/v1/audit/alerts", headers=auth("auditor1"),
                   params={"since": "2024-05-02T00:00:00Z", "until": "2024-05-01T00:00:00Z"})
    assert r.status_code == 422 and r.json()["code"] == "bad_window" and r.json()["message_zh"]
    r = client.get("/api/v1/audit/alerts", headers=auth("auditor1"),
                   params={"since": "2020-01-01T00:00:00Z", "until": "2024-05-01T00:00:00Z"})
    assert r.status_code == 422 and r.json()["code"] == "window_too_long"
    r = client.get("/api/v1/audit/alerts", headers=auth("auditor1"), params={"since": "yesterday"})
    assert r.status_code == 422
    body = alerts_of(client, auth, since="2024-05-01T00:00:00", until="2024-05-02T00:00:00")   # naive = UTC
    assert body["since"] == "2024-05-01T00:00:00+00:00" and body["until"] == "2024-05-02T00:00:00+00:00"


def test_downloads_outside_office_hours_are_flagged(client, auth, engine):
    sat_night = cst(2024, 5, 11, 23, 30)
    for at, actor, action, decision in [
        (sat_night, "insurer_a", "result.download", "allow"),
        (sat_night + timedelta(minutes=5), "insurer_a", "results.download", "allow"),
        (cst(2024, 5, 13, 10, 0), "insurer_a", "result.download", "allow"),     # Monday office hours
        (sat_night, "insurer_b", "result.download", "deny"),
    ]:   # through the audit log's own writer, dated in the past
        audit.record(engine, at=at, actor=actor, org="company_a", role="applicant", action=action,
                     object="result:424242", decision=decision, status=200 if decision == "allow" else 403)
    body = alerts_of(client, auth, since="2024-05-10T00:00:00Z", until="2024-05-14T00:00:00Z")
    [a] = body["alerts"]
    assert a["kind"] == "download_off_hours" and a["actor"] == "insurer_a" and a["count"] == 2
    assert a["first_at"] == sat_night.astimezone(UTC).isoformat() and "周六" in a["message_zh"]


def test_differencing_and_budget_from_real_prod_queries(client, auth, engine, loaded):
    scene = active_scene(client, auth)                       # budget ε 3, at most 0.5 a query
    url = f"/api/v1/scenes/{scene['id']}/queries"
    variants = [BY_DISTRICT] + [BY_DISTRICT.replace("2018-01-01", f"2018-0{m}-01") for m in range(2, 5)] + [
        BY_DISTRICT.replace("GROUP BY", "AND visit_date < DATE '2024-01-01' GROUP BY")]
    ids = []
    for sql in variants + [BY_DISTRICT]:
        r = client.post(url, headers=auth("insurer_a"), json={"sql": sql, "mode": "prod", "epsilon": 0.45})
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
    # a dev answer downloaded now: audited as a download, but synthetic, so never an alert
    r = client.post(url, headers=auth("insurer_a"), json={"sql": BY_DISTRICT, "mode": "dev"})
    rid = r.json()["result_id"]
    assert client.get(f"/api/v1/results/{rid}/download", headers=auth("insurer_a")).status_code == 200

    body = alerts_of(client, auth)
    kinds = {a["kind"]: a for a in body["alerts"]}
    assert set(kinds) == {"differencing", "budget_nearly_spent"}, body
    d = kinds["differencing"]
    assert d["org"] == "company_a" and d["scene_id"] == scene["id"] and d["actor"] == "insurer_a"
    assert d["query_ids"] == ids and d["count"] == 6 and "2018" not in json.dumps(d)
    b = kinds["budget_nearly_spent"]
    assert b["scene_id"] == scene["id"] and b["query_ids"] == ids and b["detail"]["share"] == pytest.approx(0.9)
    assert b["severity"] == "warning"
    with Session(engine) as s:
        downloads = [e for e in s.exec(select(AuditEvent)).all() if is_download(e.action)]
    assert [(e.decision, e.object) for e in downloads] == [("allow", f"result:{rid}")]


def differencing_of(client, auth, scene_id):
    return [a for a in alerts_of(client, auth)["alerts"] if a["kind"] == "differencing" and a["scene_id"] == scene_id]


def test_the_reviews_probes_through_http_raise_the_alert(client, auth, residents):
    """The review's attack as it was run: prod COUNTs over the tenant's own upload joined to the
    residents, one literal changed each time, random output and table aliases, the OR's operands
    and `=`/IN varied. The alert names every probe and no literal."""
    from tests.test_upload_joins import ITEMS, upload_applicants

    upload_applicants(client, auth("insurer_a"), residents[:40])
    scene = active_scene(client, auth, items=ITEMS + [{"dataset": RESIDENTS, "field": "district", "usage": "filter"}])
    ids = []
    for i in range(6):
        r = client.post(f"/api/v1/scenes/{scene['id']}/queries", headers=auth("insurer_a"),
                        json={"sql": probe(i), "mode": "prod", "epsilon": 0.1})
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
    [d] = differencing_of(client, auth, scene["id"])
    assert d["query_ids"] == ids and d["actor"] == "insurer_a" and d["detail"]["distinct_shapes"] == 1
    assert d["detail"]["distinct_populations"] == 6 and d["detail"]["kinds"] == {"aggregate": 6}
    assert "u.applicant_ref in (?)" in d["detail"]["skeleton"]
    text = json.dumps(d, ensure_ascii=False)
    assert "兴庆区" not in text and "A0000" not in text and "n_3_" not in text


def test_rows_and_aggregates_of_one_population_through_http_raise_the_alert(client, auth, loaded):
    """Row-level and aggregate prod queries about one population a day apart each time, spelled
    differently (aliases, order, `5 > a` for `a < 5`, NOT, IN): one alert. Another scene's
    exploration of one unchanged population with other GROUP BYs (and a look at its rows): none."""
    items = SCENE_ITEMS + [{"dataset": VISITS, "field": f, "usage": u} for f, u in
                           [("district", "filter"), ("fee", "filter"), ("person_id", "masked_output"),
                            ("visit_date", "masked_output"), ("visit_date", "group_by"), ("department", "group_by")]]
    scene = active_scene(client, auth, items=items)
    sqls = [f"SELECT person_id, visit_date FROM {VISITS} WHERE visit_date = DATE '2024-03-01' AND district = '兴庆区'",
            f"SELECT v.visit_date AS day, v.person_id AS who FROM {VISITS} AS v "
            "WHERE v.district IN ('兴庆区') AND DATE '2024-03-02' = v.visit_date",
            f"SELECT COUNT(*) AS n FROM {VISITS} x WHERE x.district = '兴庆区' AND x.visit_date = '2024-03-03'",
            f"SELECT SUM(fee) AS s, COUNT(*) AS c FROM {VISITS} WHERE NOT (district <> '兴庆区') "
            "AND visit_date = '2024-03-04' AND 500 > fee",
            f"SELECT district, COUNT(*) FROM {VISITS} WHERE visit_date = DATE '2024-03-05' AND district = '兴庆区' "
            "AND fee < 800 GROUP BY district"]
    ids = []
    for sql in sqls:
        body = {"sql": sql, "mode": "prod"} | ({"epsilon": 0.2} if "COUNT" in sql else {})
        r = client.post(f"/api/v1/scenes/{scene['id']}/queries", headers=auth("insurer_a"), json=body)
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
    [d] = differencing_of(client, auth, scene["id"])
    assert d["query_ids"] == ids and d["count"] == 5 and d["detail"]["kinds"] == {"aggregate": 3, "rows": 2}
    assert "2024-03" not in json.dumps(d, ensure_ascii=False) and "兴庆区" not in json.dumps(d, ensure_ascii=False)

    other = active_scene(client, auth, items=items)
    where = " WHERE visit_date >= DATE '2023-01-01' AND district = '兴庆区'"
    explore = [f"SELECT {k} AS k, COUNT(*) AS n FROM {VISITS}{where} GROUP BY 1"
               for k in ("district", "department", "DATE_TRUNC('month', visit_date)", "DATE_TRUNC('year', visit_date)")]
    explore += [f"SELECT COUNT(*) AS n FROM {VISITS}{where}", f"SELECT person_id, visit_date FROM {VISITS}{where}"]
    for sql in explore:
        body = {"sql": sql, "mode": "prod"} | ({"epsilon": 0.2} if "COUNT" in sql else {})
        r = client.post(f"/api/v1/scenes/{other['id']}/queries", headers=auth("insurer_a"), json=body)
        assert r.status_code == 202, r.text
    assert differencing_of(client, auth, other["id"]) == []


# ---------------------------------------------------------------------------------------------
# failed_logins (review r2, finding 2): a failed login is nobody's denial


def failed_login(seq, at, name="insurer_b", client="203.0.113.7", reason="login_failed", legacy=False) -> EventRecord:
    """A refused login as the audit log holds it: no actor, the typed name in the detail (an event
    written before that was so carries the name as its actor)."""
    return EventRecord(seq=seq, at=at, actor=name if legacy else None, action="auth.login", decision="deny",
                       reason=reason, status=401 if reason == "login_failed" else 429, client=client,
                       attempted_username=None if legacy else name)


def test_failed_logins_are_their_own_alert_naming_the_target_and_the_addresses_not_an_actor():
    from sandbox.alerts import failed_login_bursts

    events = ([failed_login(i, T0 + timedelta(minutes=i)) for i in range(5)]
              + [failed_login(5 + i, T0 + timedelta(minutes=5 + i), reason="login_locked") for i in range(4)]
              + [failed_login(9, T0 + timedelta(minutes=9), client="198.51.100.4", reason="login_locked")])
    assert denial_bursts(events) == []           # nobody signed in: no one's many_denials
    [a] = failed_login_bursts(events, accounts=frozenset({"insurer_b"}))
    assert (a.kind, a.actor, a.org, a.count, a.audit_seqs) == ("failed_logins", None, None, 10, tuple(range(10)))
    assert a.detail["attempted_username"] == "insurer_b" and a.detail["account_exists"] is True
    assert a.detail["clients"] == {"203.0.113.7": 9, "198.51.100.4": 1}
    assert a.detail["reasons"] == {"login_failed": 5, "login_locked": 5}
    assert a.message.startswith("10 failed logins for the account 'insurer_b' within 1 hour, from 203.0.113.7 ×9")
    assert "target, not the sender" in a.message and "insurer_b" in a.message_zh and "登录失败 10 次" in a.message_zh
    # a name that does not exist says so; nine are not a burst; legacy events (the name as actor) count alike
    [u] = failed_login_bursts([failed_login(i, T0, name="ghost") for i in range(10)], accounts=frozenset({"insurer_b"}))
    assert "unknown name 'ghost'" in u.message and u.detail["account_exists"] is False
    assert failed_login_bursts([failed_login(i, T0) for i in range(9)]) == []
    [legacy] = failed_login_bursts([failed_login(i, T0, legacy=True) for i in range(10)])
    assert legacy.detail["attempted_username"] == "insurer_b" and legacy.actor is None
    assert denial_bursts([failed_login(i, T0, legacy=True) for i in range(10)]) == []
    assert "failed_logins" in [k.kind for k in decide_alerts(events, [], [])]


def test_a_flood_of_refused_logins_keeps_the_alerts_bounded(client, auth, engine, monkeypatch):
    """Review r5 #5: computing the alerts read every refused login of the window into memory and
    listed every seq of a burst (4,803 refused logins took the page from 63 to 531 ms, ~97M a week).
    The alerts read the newest ALERT_MAX_EVENTS events of each kind and list ALERT_MAX_SEQS seqs per
    alert, saying how many more."""
    import sandbox.alerts
    from pdao.kernel import audit

    monkeypatch.setattr(sandbox.alerts, "ALERT_MAX_EVENTS", 40)
    monkeypatch.setattr(sandbox.alerts, "ALERT_MAX_SEQS", 7)
    with Session(engine) as s:
        for i in range(60):
            audit.append(s, actor=None, action="auth.login", object=None, decision="deny", reason="login_failed",
                         status=401, client="203.0.113.9", detail={"attempted_username": "office1"})
        s.commit()
    [a] = [a for a in alerts_of(client, auth, "auditor1")["alerts"] if a["kind"] == "failed_logins"]
    assert a["count"] == 40 and len(a["audit_seqs"]) == 7 and a["audit_seqs_more"] == 33


def test_anonymous_guesses_no_longer_name_their_victim_in_many_denials(client, auth, engine):
    """The attack: 11 anonymous logins as insurer_b made the office's alert say insurer_b was
    refused 11 times (and locked the account). Now the alert is `failed_logins` for the name
    insurer_b, from the guesser's address, with no actor; insurer_b's own refusals (signed in)
    still make a many_denials alert that names them."""
    codes = [client.post("/api/v1/auth/token", data={"username": "insurer_b", "password": f"guess-{i}-xx"}).status_code
             for i in range(11)]
    assert codes == [401] * 5 + [429] * 6
    body = alerts_of(client, auth, "office1")
    assert [a for a in body["alerts"] if a["actor"] == "insurer_b"] == []
    [a] = [a for a in body["alerts"] if a["kind"] == "failed_logins"]
    assert (a["actor"], a["count"], a["detail"]["attempted_username"], a["detail"]["account_exists"]) == (
        None, 11, "insurer_b", True)
    assert a["detail"]["clients"] == {"testclient": 11}
    assert a["detail"]["reasons"] == {"login_failed": 5, "login_locked": 6}
    assert body["thresholds"]["failed_logins"] == 10
    with Session(engine) as s:
        logins = s.exec(select(AuditEvent).where(AuditEvent.action == "auth.login")).all()
    assert {e.actor for e in logins if e.decision == "deny"} == {None}
    # the real user's own refusals are still theirs
    with Session(engine) as s:   # (the guesses locked insurer_b: an operator resets the password)
        from pdao.kernel.identity.service import set_password

        set_password(s, "insurer_b", "a-new-pass-1")
        s.commit()
    token = client.post("/api/v1/auth/token", data={"username": "insurer_b", "password": "a-new-pass-1"}).json()
    for _ in range(10):
        client.get("/api/v1/audit/alerts", headers={"Authorization": f"Bearer {token['access_token']}"})
    kinds = {(a["kind"], a["actor"]) for a in alerts_of(client, auth)["alerts"]}
    assert kinds == {("failed_logins", None), ("many_denials", "insurer_b")}
