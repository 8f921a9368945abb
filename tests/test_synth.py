"""Tests for sandbox.synth, the synthetic Yinchuan health data generator."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections import Counter
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import sandbox.synth as synth
from catalog.identifiers import (
    CN_ID_CANDIDATE_RE,
    CN_MOBILE_CANDIDATE_RE,
    cn_id_birth_date,
    cn_id_sex,
    is_cn_mobile,
    is_valid_cn_id,
)
from sandbox.synth import (
    CONDITION_ICD10,
    CONDITIONS,
    DATASET_CODES,
    DEPARTMENTS,
    DISTRICT_REGION_CODES,
    DISTRICTS,
    HOSPITALS,
    ICD10_CHAPTERS,
    INSURANCE_TYPES,
    generate,
    icd10_chapter,
)

REPO = Path(__file__).resolve().parents[1]
SCALE = 20_000

# The column contract, written out here independently of synth.SCHEMAS.
CONTRACT = {
    "health.resident": [
        ("person_id", pa.int64()), ("id_number", pa.string()), ("name", pa.string()), ("phone", pa.string()),
        ("sex", pa.string()), ("birth_date", pa.date32()), ("district", pa.string()), ("address", pa.string()),
        ("insurance_type", pa.string()),
    ],
    "health.chronic_condition": [
        ("person_id", pa.int64()), ("condition", pa.string()), ("icd10", pa.string()), ("diagnosed_on", pa.date32()),
    ],
    "health.outpatient_visit": [
        ("visit_id", pa.int64()), ("person_id", pa.int64()), ("hospital", pa.string()), ("district", pa.string()),
        ("department", pa.string()), ("visit_date", pa.date32()), ("icd10", pa.string()),
        ("icd10_chapter", pa.string()), ("chief_complaint", pa.string()), ("fee", pa.float64()),
    ],
    "health.inpatient_stay": [
        ("stay_id", pa.int64()), ("person_id", pa.int64()), ("hospital", pa.string()), ("district", pa.string()),
        ("department", pa.string()), ("admit_date", pa.date32()), ("discharge_date", pa.date32()),
        ("length_of_stay", pa.int64()), ("main_icd10", pa.string()), ("icd10_chapter", pa.string()),
        ("total_cost", pa.float64()), ("notes", pa.string()),
    ],
    "health.insurance_settlement": [
        ("settlement_id", pa.int64()), ("person_id", pa.int64()), ("stay_id", pa.int64()), ("visit_id", pa.int64()),
        ("settled_on", pa.date32()), ("insurance_type", pa.string()), ("total_amount", pa.float64()),
        ("fund_paid", pa.float64()), ("self_paid", pa.float64()),
    ],
}
NULLABLE = {("health.insurance_settlement", "stay_id"), ("health.insurance_settlement", "visit_id")}


def _load(paths: dict[str, Path]) -> dict[str, dict[str, list]]:
    return {code: pq.read_table(p).to_pydict() for code, p in paths.items()}


@pytest.fixture(scope="module")
def prod_paths(tmp_path_factory) -> dict[str, Path]:
    return generate(tmp_path_factory.mktemp("prod"), SCALE, 7)


@pytest.fixture(scope="module")
def prod(prod_paths) -> dict[str, dict[str, list]]:
    return _load(prod_paths)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- contract


def test_files_and_codes(prod_paths):
    assert tuple(prod_paths) == DATASET_CODES
    for code, p in prod_paths.items():
        assert p.name == f"{code}.parquet"
        assert p.exists()
    assert not [p for p in prod_paths["health.resident"].parent.iterdir() if p.name.endswith(".tmp")]


def test_schema_exact(prod_paths):
    for code, path in prod_paths.items():
        schema = pq.read_schema(path)
        assert [(f.name, f.type) for f in schema] == CONTRACT[code], code
        assert schema.metadata in (None, {}) or b"pandas" not in schema.metadata
        assert synth.SCHEMAS[code].names == [n for n, _ in CONTRACT[code]]


def test_no_nulls_except_settlement_links(prod_paths):
    for code, path in prod_paths.items():
        t = pq.read_table(path)
        for name in t.column_names:
            if (code, name) not in NULLABLE:
                assert t.column(name).null_count == 0, (code, name)


def test_row_counts_near_scale(prod):
    visits = len(prod["health.outpatient_visit"]["visit_id"])
    assert abs(visits - SCALE) <= 0.15 * SCALE
    residents = len(prod["health.resident"]["person_id"])
    assert residents == round(SCALE / 20)


def test_row_counts_other_scales(tmp_path):
    for scale in (1_000, 5_000, 60_000):
        p = generate(tmp_path / str(scale), scale, 3)
        n = pq.read_metadata(p["health.outpatient_visit"]).num_rows
        assert abs(n - scale) <= 0.15 * scale, (scale, n)


def test_constants():
    assert DISTRICTS == ("兴庆区", "金凤区", "西夏区", "永宁县", "贺兰县", "灵武市")
    assert set(DISTRICT_REGION_CODES) == set(DISTRICTS)
    assert DISTRICT_REGION_CODES["金凤区"] == "640106" and DISTRICT_REGION_CODES["灵武市"] == "640181"
    assert len(HOSPITALS) >= 12 and {d for _, d in HOSPITALS} == set(DISTRICTS)
    assert len({h for h, _ in HOSPITALS}) == len(HOSPITALS)
    assert len(DEPARTMENTS) == 10 and INSURANCE_TYPES == ("城镇职工", "城乡居民", "未参保")
    assert CONDITIONS == ("hypertension", "diabetes", "coronary", "cancer", "copd", "stroke", "ckd")
    roman = "I II III IV V VI VII VIII IX X XI XII XIII XIV XV XVI XVII XVIII XIX XX XXI XXII".split()
    assert set(ICD10_CHAPTERS) <= set(roman)
    assert list(ICD10_CHAPTERS) == sorted(ICD10_CHAPTERS, key=roman.index)
    assert icd10_chapter("I10") == "IX" and icd10_chapter("U07.1") == "XXII" and icd10_chapter("C50") == "II"
    assert icd10_chapter("D64") == "III" and icd10_chapter("H66") == "VIII" and icd10_chapter("T14") == "XIX"


def test_bad_arguments(tmp_path):
    for scale in (0, -5, 1.5, True):
        with pytest.raises(ValueError):
            generate(tmp_path, scale, 1)
    with pytest.raises(ValueError):
        generate(tmp_path, 100, -1)


# ----------------------------------------------------------------------------- residents


def test_resident_ids_valid_consistent_unique(prod):
    r = prod["health.resident"]
    assert len(set(r["id_number"])) == len(r["id_number"])
    assert r["person_id"] == list(range(1, len(r["person_id"]) + 1))
    for idn, born, sex, district in zip(r["id_number"], r["birth_date"], r["sex"], r["district"]):
        assert len(idn) == 18 and is_valid_cn_id(idn), idn
        assert cn_id_birth_date(idn) == born
        assert cn_id_sex(idn) == sex
        assert idn[:6] == DISTRICT_REGION_CODES[district]
        assert int(idn[14:17]) < 500  # production half of the sequence numbers


def test_resident_fields(prod):
    r = prod["health.resident"]
    n = len(r["person_id"])
    assert all(is_cn_mobile(p) and len(p) == 11 for p in r["phone"])
    assert all(2 <= len(nm) <= 3 and all("\u4e00" <= ch <= "\u9fff" for ch in nm) for nm in r["name"])
    assert set(r["sex"]) == {"M", "F"}
    assert all(date(1925, 1, 1) <= b <= date(2024, 12, 31) for b in r["birth_date"])
    assert set(r["district"]) == set(DISTRICTS)
    assert all(a.startswith(d) and len(a) > len(d) + 4 for a, d in zip(r["address"], r["district"]))
    assert set(r["insurance_type"]) <= set(INSURANCE_TYPES)
    # Population-weighted districts: 兴庆区 is the largest.
    counts = Counter(r["district"])
    assert counts.most_common(1)[0][0] == "兴庆区"
    # A plausible age pyramid: most people are adults, some are old, some are children.
    ages = np.array([(date(2025, 12, 31) - b).days / 365.25 for b in r["birth_date"]])
    assert 0.10 < (ages < 18).mean() < 0.30 and 0.12 < (ages >= 60).mean() < 0.35
    # Children are not employees.
    assert not any(t == "城镇职工" and a < 18 for t, a in zip(r["insurance_type"], ages))
    assert n == len(set(r["person_id"]))


# ----------------------------------------------------------------------------- chronic conditions


def test_chronic_conditions(prod):
    r, c = prod["health.resident"], prod["health.chronic_condition"]
    born = dict(zip(r["person_id"], r["birth_date"]))
    pairs = list(zip(c["person_id"], c["condition"]))
    assert len(pairs) == len(set(pairs))
    assert set(c["condition"]) <= set(CONDITIONS) and len(set(c["condition"])) >= 5
    sex = dict(zip(r["person_id"], r["sex"]))
    for pid, cond, code, on in zip(c["person_id"], c["condition"], c["icd10"], c["diagnosed_on"]):
        assert code in CONDITION_ICD10[cond]
        assert born[pid] < on <= date(2025, 12, 31)
        if code == "C50":
            assert sex[pid] == "F"
    # Prevalence rises with age.
    having = {p for p in c["person_id"]}
    old = [p for p, b in born.items() if b.year <= 1960]
    young = [p for p, b in born.items() if 1985 <= b.year <= 2000]
    assert sum(p in having for p in old) / len(old) > 2 * sum(p in having for p in young) / len(young)


# ----------------------------------------------------------------------------- visits


def test_visits(prod):
    r, v = prod["health.resident"], prod["health.outpatient_visit"]
    born = dict(zip(r["person_id"], r["birth_date"]))
    home = dict(zip(r["person_id"], r["district"]))
    hospital_district = dict(HOSPITALS)
    assert len(set(v["visit_id"])) == len(v["visit_id"])
    assert set(v["person_id"]) <= set(r["person_id"])
    for h, d, dep, on, pid, code, chap, fee in zip(
        v["hospital"], v["district"], v["department"], v["visit_date"], v["person_id"], v["icd10"],
        v["icd10_chapter"], v["fee"],
    ):
        assert hospital_district[h] == d
        assert dep in DEPARTMENTS
        assert date(2019, 1, 1) <= on <= date(2025, 12, 31) and on >= born[pid]
        assert chap == icd10_chapter(code) and chap in ICD10_CHAPTERS
        assert 0 <= fee <= 5000 and round(fee, 2) == fee
    own = sum(home[p] == d for p, d in zip(v["person_id"], v["district"])) / len(v["person_id"])
    assert own > 0.55
    assert 30 <= len(set(v["icd10"])) <= 60
    assert set(v["department"]) == set(DEPARTMENTS)


def test_visit_skew(prod):
    per_person = Counter(prod["health.outpatient_visit"]["person_id"])
    counts = np.array(list(per_person.values()))
    assert counts.max() >= 10 * np.median(counts)
    # Older people and chronic patients visit more.
    r = prod["health.resident"]
    chronic = set(prod["health.chronic_condition"]["person_id"])
    old = [p for p, b in zip(r["person_id"], r["birth_date"]) if b.year <= 1955]
    mid = [p for p, b in zip(r["person_id"], r["birth_date"]) if 1975 <= b.year <= 1995]
    assert np.mean([per_person[p] for p in old]) > np.mean([per_person[p] for p in mid])
    with_c = [per_person[p] for p in r["person_id"] if p in chronic]
    without = [per_person[p] for p in r["person_id"] if p not in chronic]
    assert np.mean(with_c) > np.mean(without)


def test_chronic_patients_get_their_codes(prod):
    c, v = prod["health.chronic_condition"], prod["health.outpatient_visit"]
    codes_of = {}
    for pid, code in zip(c["person_id"], c["icd10"]):
        codes_of.setdefault(pid, set()).add(code)
    registered = {code for codes in CONDITION_ICD10.values() for code in codes}
    for pid, code in zip(v["person_id"], v["icd10"]):
        if code in registered:
            assert code in codes_of.get(pid, set())
    with_codes = sum(code in codes_of.get(pid, ()) for pid, code in zip(v["person_id"], v["icd10"]))
    assert with_codes > 0.1 * len(v["person_id"])


def test_children_get_pediatric_codes(prod):
    r, v = prod["health.resident"], prod["health.outpatient_visit"]
    born = dict(zip(r["person_id"], r["birth_date"]))
    kids = [(code, dep) for pid, code, dep, on in zip(v["person_id"], v["icd10"], v["department"], v["visit_date"])
            if (on - born[pid]).days < 6 * 365]
    assert kids
    assert not {code for code, _ in kids} & {"I10", "E11", "Z34", "M81", "H25", "M17"}
    assert Counter(dep for _, dep in kids).most_common(1)[0][0] == "儿科"


# ----------------------------------------------------------------------------- stays


def test_stays(prod):
    r, s = prod["health.resident"], prod["health.inpatient_stay"]
    hospital_district = dict(HOSPITALS)
    born = dict(zip(r["person_id"], r["birth_date"]))
    n = len(s["stay_id"])
    assert len(set(s["stay_id"])) == n
    for h, d, dep, a, b, los, code, chap, cost, pid in zip(
        s["hospital"], s["district"], s["department"], s["admit_date"], s["discharge_date"], s["length_of_stay"],
        s["main_icd10"], s["icd10_chapter"], s["total_cost"], s["person_id"],
    ):
        assert hospital_district[h] == d and dep in DEPARTMENTS
        assert born[pid] <= a <= b and (b - a).days == los and 0 <= los <= 180
        assert date(2019, 1, 1) <= a and b <= date(2025, 12, 31)
        assert chap == icd10_chapter(code)
        assert 0 <= cost <= 500_000 and round(cost, 2) == cost
    # One hospital at a time: a person's stays do not overlap.
    by_person: dict[int, list] = {}
    for pid, a, b in zip(s["person_id"], s["admit_date"], s["discharge_date"]):
        by_person.setdefault(pid, []).append((a, b))
    for spans in by_person.values():
        spans.sort()
        assert all(prev[1] < nxt[0] for prev, nxt in zip(spans, spans[1:]))
    # ~0.05–0.15 stays per person-year over the seven years.
    rate = n / (len(r["person_id"]) * 7)
    assert 0.05 <= rate <= 0.15, rate
    # Heavy-tailed costs.
    costs = np.array(s["total_cost"])
    assert costs.max() > 5 * np.median(costs)


# ----------------------------------------------------------------------------- free text


def _embedded(texts: list[str]) -> tuple[int, int, set[str]]:
    with_id = with_phone = 0
    ids: set[str] = set()
    for t in texts:
        found = [x for x in CN_ID_CANDIDATE_RE.findall(t) if is_valid_cn_id(x)]
        ids.update(found)
        with_id += bool(found)
        with_phone += any(is_cn_mobile(x) for x in CN_MOBILE_CANDIDATE_RE.findall(t))
    return with_id, with_phone, ids


def test_free_text_with_personal_data(prod):
    r = prod["health.resident"]
    residents_ids = set(r["id_number"])
    names = set(r["name"])
    complaints = prod["health.outpatient_visit"]["chief_complaint"]
    notes = prod["health.inpatient_stay"]["notes"]
    for texts, lo, hi in ((complaints, 0.03, 0.05), (notes, 0.025, 0.08)):
        with_id, with_phone, ids = _embedded(texts)
        assert with_id > 0 and with_phone > 0
        assert ids <= residents_ids  # embedded IDs are valid and belong to residents (self or relative)
        pii = [t for t in texts if CN_ID_CANDIDATE_RE.search(t) or CN_MOBILE_CANDIDATE_RE.search(t)]
        assert lo <= len(pii) / len(texts) <= hi, len(pii) / len(texts)
    # Most complaints are short clinical Chinese text without personal data.
    plain = [t for t in complaints if not CN_MOBILE_CANDIDATE_RE.search(t) and not CN_ID_CANDIDATE_RE.search(t)]
    assert all(2 <= len(t) <= 40 for t in plain)
    # Some texts name a resident.
    assert any(any(nm in t for nm in names if len(nm) == 3) for t in complaints if "患者" in t)


# ----------------------------------------------------------------------------- settlements


def test_settlements(prod):
    r, v, s, st = (prod[c] for c in ("health.resident", "health.outpatient_visit", "health.inpatient_stay",
                                      "health.insurance_settlement"))
    ins = dict(zip(r["person_id"], r["insurance_type"]))
    stays = {sid: (pid, b, cost) for sid, pid, b, cost in zip(s["stay_id"], s["person_id"], s["discharge_date"], s["total_cost"])}
    visits = {vid: (pid, d, fee) for vid, pid, d, fee in zip(v["visit_id"], v["person_id"], v["visit_date"], v["fee"])}
    assert len(set(st["settlement_id"])) == len(st["settlement_id"])
    settled_stays, settled_visits = Counter(), Counter()
    shares = []
    for sid, pid, stay, visit, on, itype, total, fund, own in zip(
        st["settlement_id"], st["person_id"], st["stay_id"], st["visit_id"], st["settled_on"], st["insurance_type"],
        st["total_amount"], st["fund_paid"], st["self_paid"],
    ):
        assert (stay is None) != (visit is None)
        epid, when, amount = stays[stay] if stay is not None else visits[visit]
        (settled_stays if stay is not None else settled_visits)[stay if stay is not None else visit] += 1
        assert epid == pid and itype == ins[pid] and itype != "未参保"
        assert when <= on <= when + timedelta(days=60) and on <= date(2026, 3, 31)
        assert total == amount
        assert round(fund * 100) + round(own * 100) == round(total * 100)
        assert fund >= 0 and own >= 0 and round(fund, 2) == fund and round(own, 2) == own
        if total >= 10:
            shares.append(fund / total)
    assert 0.49 <= min(shares) and max(shares) <= 0.91
    # One settlement per stay of an insured person, none for the uninsured.
    for sid, (pid, _, _) in stays.items():
        assert settled_stays[sid] == (0 if ins[pid] == "未参保" else 1)
    assert max(settled_visits.values()) == 1
    insured_visits = sum(ins[pid] != "未参保" for pid, _, _ in visits.values())
    assert 0.25 <= len(settled_visits) / insured_visits <= 0.35


# ----------------------------------------------------------------------------- determinism, twin


def test_deterministic_bytes(tmp_path):
    a = generate(tmp_path / "a", 5_000, 11)
    b = generate(tmp_path / "b", 5_000, 11)
    c = generate(tmp_path / "c", 5_000, 12)
    for code in DATASET_CODES:
        assert _sha(a[code]) == _sha(b[code]), code
        assert _sha(a[code]) != _sha(c[code]), code


def test_twin_disjoint(tmp_path, prod):
    r = prod["health.resident"]
    prod_pids, prod_ids = set(r["person_id"]), set(r["id_number"])
    for seed in (7, 8):  # the same seed as production, and another
        t = _load(generate(tmp_path / f"twin{seed}", SCALE, seed, twin=True))
        tr = t["health.resident"]
        assert [(f.name, f.type) for f in pq.read_schema(tmp_path / f"twin{seed}" / "health.resident.parquet")] \
            == CONTRACT["health.resident"]
        assert not prod_pids & set(tr["person_id"])
        assert not prod_ids & set(tr["id_number"])
        assert min(tr["person_id"]) > synth.TWIN_PERSON_OFFSET
        assert all(is_valid_cn_id(x) and int(x[14:17]) >= 500 for x in tr["id_number"])
        assert len(set(tr["id_number"])) == len(tr["id_number"])
        assert not set(prod["health.outpatient_visit"]["visit_id"]) & set(t["health.outpatient_visit"]["visit_id"])
        assert not set(prod["health.inpatient_stay"]["stay_id"]) & set(t["health.inpatient_stay"]["stay_id"])
        # Embedded IDs in the twin's free text are twin IDs.
        _, _, ids = _embedded(t["health.outpatient_visit"]["chief_complaint"])
        assert ids and not ids & prod_ids
    # The twin of another production seed is disjoint too.
    other = _load(generate(tmp_path / "prod9", SCALE, 9))["health.resident"]
    assert not set(other["id_number"]) & set(tr["id_number"])


def test_many_chunks_and_full_id_cells(tmp_path):
    """Small chunks and only two sequence slots per (region, date, sex): IDs stay unique and valid
    across chunks (birth dates move on when a cell is full), and ids keep counting across chunks."""
    saved = synth.CHUNK_PEOPLE, synth._SEQ_SLOTS
    synth.CHUNK_PEOPLE, synth._SEQ_SLOTS = 150, 2
    try:
        d = _load(generate(tmp_path, 30_000, 5))
    finally:
        synth.CHUNK_PEOPLE, synth._SEQ_SLOTS = saved
    r = d["health.resident"]
    assert len(set(r["id_number"])) == len(r["id_number"]) == 1500
    for idn, born, sex in zip(r["id_number"], r["birth_date"], r["sex"]):
        assert is_valid_cn_id(idn) and cn_id_birth_date(idn) == born and cn_id_sex(idn) == sex
    for code, key in (("health.outpatient_visit", "visit_id"), ("health.inpatient_stay", "stay_id"),
                      ("health.insurance_settlement", "settlement_id")):
        ids = d[code][key]
        assert ids == list(range(1, len(ids) + 1))


# ----------------------------------------------------------------------------- memory


@pytest.mark.slow
def test_peak_memory_bounded(tmp_path):
    code = (
        "import json, resource, sys, time\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from sandbox.synth import generate\n"
        "t = time.time()\n"
        f"generate({str(tmp_path)!r}, 2_000_000, 1)\n"
        "print(json.dumps({'seconds': time.time() - t,"
        " 'maxrss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=600)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["maxrss_mb"] < 1536, result
    n = pq.read_metadata(tmp_path / "health.outpatient_visit.parquet").num_rows
    assert abs(n - 2_000_000) < 0.1 * 2_000_000
