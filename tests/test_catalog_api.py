"""The catalog over HTTP: who sees which datasets, search and filters, dataset detail without
storage paths, registering and updating descriptors (JSON and YAML), loading versions, and the
refusals (other department, applicants, incompatible changes)."""

from __future__ import annotations

import hashlib
import json

import pyarrow.parquet as pq
import pytest
import yaml
from sqlmodel import Session

from catalog.descriptor import PACKAGED_DESCRIPTORS
from pdao.kernel.identity import service as identities
from tests.conftest import DEMO_PASSWORD, first_also_on_postgresql, login

OPEN_HEALTH = {"health.resident", "health.chronic_condition", "health.outpatient_visit", "health.inpatient_stay",
               "health.insurance_settlement"}
PROHIBITED = "health.notifiable_disease"
ALL = OPEN_HEALTH | {PROHIBITED}


def packaged(code: str) -> dict:
    d = yaml.safe_load((PACKAGED_DESCRIPTORS / f"{code}.yaml").read_text(encoding="utf-8"))
    return json.loads(json.dumps(d, default=str, ensure_ascii=False))


PACKAGED = {code: packaged(code) for code in ALL}


def codes(client, headers, **params) -> set[str]:
    r = client.get("/api/v1/datasets", params={"limit": 500, **params}, headers=headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["total"] == len(body["items"])
    return {d["code"] for d in body["items"]}


def assert_error(r, status: int, code: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.json()["code"] == code, r.text


@pytest.fixture
def provider_ybj(engine, client):
    """A provider of the healthcare security administration (ycybj), another department."""
    with Session(engine) as s:
        identities.create_user(s, "provider_ybj", DEMO_PASSWORD, "ycybj", "provider")
        s.commit()
    return login(client, "provider_ybj")


# --- who sees what ------------------------------------------------------------------------------

def test_an_applicant_sees_the_open_health_datasets_but_not_the_prohibited_one(client, auth):
    h = auth("insurer_a")
    assert codes(client, h) == OPEN_HEALTH
    r = client.get(f"/api/v1/datasets/{PROHIBITED}", headers=h)
    assert_error(r, 404, "not_found")
    # exactly the answer of a dataset that does not exist (only the code differs)
    other = client.get("/api/v1/datasets/health.does_not_exist", headers=h).json()
    assert r.json()["message"].replace(PROHIBITED, "X") == other["message"].replace("health.does_not_exist", "X")
    # nor can it be found by searching or filtering
    assert codes(client, h, q="传染病") == set()
    assert codes(client, h, opening_class="prohibited") == set()
    assert codes(client, h, grade=5) == set()
    assert codes(client, auth("insurer_b")) == OPEN_HEALTH


@pytest.mark.parametrize("username", first_also_on_postgresql(["office1", "auditor1", "operator1", "reviewer1",
                                                               "provider1"]))
def test_overseers_and_the_owning_provider_see_the_prohibited_dataset(client, auth, username):
    h = auth(username)
    assert codes(client, h) == ALL
    r = client.get(f"/api/v1/datasets/{PROHIBITED}", headers=h)
    assert r.status_code == 200, r.text
    assert r.json()["opening_class"] == "prohibited"
    assert codes(client, h, q="传染病") == {PROHIBITED}


def test_a_reviewer_employed_by_a_company_sees_the_catalog_a_tenant_sees(client, engine):
    """Visibility by organization, not role alone: a company's own reviewer is tenant-scoped
    (`policies.visibility.tenant_scoped`); the whole flow is in tests/test_org_visibility.py."""
    with Session(engine) as s:
        identities.create_user(s, "reviewer_a", DEMO_PASSWORD, "company_a", "reviewer")
        s.commit()
    h = login(client, "reviewer_a")
    assert codes(client, h) == OPEN_HEALTH
    assert_error(client.get(f"/api/v1/datasets/{PROHIBITED}", headers=h), 404, "not_found")
    assert codes(client, h, q="传染病") == set()


def test_a_provider_of_another_department_does_not_see_it(client, provider_ybj):
    assert codes(client, provider_ybj) == OPEN_HEALTH
    assert_error(client.get(f"/api/v1/datasets/{PROHIBITED}", headers=provider_ybj), 404, "not_found")


# --- search and filters --------------------------------------------------------------------------

def test_search_by_title_code_and_field_name(client, auth):
    h = auth("insurer_a")
    assert "health.inpatient_stay" in codes(client, h, q="住院")
    assert "health.outpatient_visit" not in codes(client, h, q="住院")
    assert "health.resident" in codes(client, h, q="id_number")
    assert codes(client, h, q="insurance_type") == {"health.resident", "health.insurance_settlement"}
    assert codes(client, h, q="INPATIENT STAYS") == {"health.inpatient_stay"}  # case-insensitive, English title
    assert codes(client, h, q="health.chronic") == {"health.chronic_condition"}
    assert codes(client, h, q="chief_complaint") == {"health.outpatient_visit"}
    assert codes(client, h, q="慢性病") == {"health.chronic_condition"}
    assert codes(client, h, q="no such thing anywhere") == set()


def test_search_wildcards_are_literal(client, auth):
    h = auth("insurer_a")
    assert codes(client, h, q="id_number") == {"health.resident"}
    assert codes(client, h, q="%") == set()


def _expected(role_sees_prohibited: bool, pred) -> set[str]:
    return {c for c, d in PACKAGED.items() if (role_sees_prohibited or d["opening_class"] != "prohibited") and pred(d)}


FILTERS = [
    ({"department": "ycwjw"}, lambda d: d["source_department"] == "ycwjw"),
    ({"department": "ycybj"}, lambda d: d["source_department"] == "ycybj"),
    ({"department": "company_a"}, lambda d: False),
    ({"category": "medical_application"}, lambda d: d["category"] == "medical_application"),
    ({"category": "public_health"}, lambda d: d["category"] == "public_health"),
    ({"grade": 4}, lambda d: d["grade"] == 4),
    ({"grade": 3}, lambda d: d["grade"] == 3),
    ({"max_grade": 3}, lambda d: d["grade"] <= 3),
    ({"max_grade": 4}, lambda d: d["grade"] <= 4),
    ({"opening_class": "conditional"}, lambda d: d["opening_class"] == "conditional"),
    ({"opening_class": "prohibited"}, lambda d: d["opening_class"] == "prohibited"),
    ({"sensitivity": "free_text"}, lambda d: any(f["sensitivity"] == "free_text" for f in d["fields"])),
    ({"sensitivity": "public"}, lambda d: any(f["sensitivity"] == "public" for f in d["fields"])),
    ({"department": "ycwjw", "max_grade": 3}, lambda d: d["source_department"] == "ycwjw" and d["grade"] <= 3),
]


def test_each_filter(client, auth):
    applicant, office = auth("insurer_a"), auth("office1")
    nonempty = 0
    for params, pred in FILTERS:
        assert codes(client, applicant, **params) == _expected(False, pred), params
        assert codes(client, office, **params) == _expected(True, pred), params
        nonempty += bool(_expected(True, pred))
    assert nonempty >= 10  # the filters were exercised on real differences
    # the named examples, spelled out
    assert codes(client, applicant, department="ycybj") == {"health.insurance_settlement"}
    assert codes(client, applicant, sensitivity="free_text") == {"health.outpatient_visit", "health.inpatient_stay"}
    assert codes(client, applicant, max_grade=3) == {"health.outpatient_visit", "health.inpatient_stay",
                                                     "health.insurance_settlement"}


def test_paging_with_total(client, auth):
    h = auth("office1")
    seen = []
    for offset in range(0, 8, 2):
        r = client.get("/api/v1/datasets", params={"limit": 2, "offset": offset}, headers=h)
        body = r.json()
        assert body["total"] == 6 and body["limit"] == 2 and body["offset"] == offset
        assert len(body["items"]) == max(0, min(2, 6 - offset))
        seen += [d["code"] for d in body["items"]]
    assert seen == sorted(ALL)  # stable order, no overlap, nothing missed
    body = client.get("/api/v1/datasets", params={"limit": 1, "q": "health"}, headers=auth("insurer_a")).json()
    assert body["total"] == 5 and len(body["items"]) == 1


# --- detail --------------------------------------------------------------------------------------

def test_dataset_detail_describes_fields_and_versions_without_storage_paths(client, auth, settings, synth_files):
    prov = auth("provider1")
    twin = {"file": ("r.parquet", synth_files["dev"]["health.resident"].read_bytes())}
    r = client.post("/api/v1/datasets/health.resident/versions", headers=prov, data={"env": "dev"}, files=twin)
    assert r.status_code == 422 and r.json()["code"] == "dev_is_synthetic", "the dev twin only comes from pdao synth"
    r = client.post("/api/v1/datasets/health.resident/versions", headers=prov, data={"note": "twin"}, files=twin)
    assert r.status_code == 201, r.text
    r = client.get("/api/v1/datasets/health.resident", headers=auth("insurer_a"))
    assert r.status_code == 200
    d = r.json()
    assert d["source_department"]["code"] == "ycwjw" and d["grade"] == 4 and d["privacy_unit"] == "person_id"
    fields = {f["name"]: f for f in d["fields"]}
    assert list(fields) == [f["name"] for f in PACKAGED["health.resident"]["fields"]]
    assert fields["id_number"]["sensitivity"] == "identifier" and fields["id_number"]["pii_kind"] == "cn_id"
    assert fields["id_number"]["masking"] == "partial_id"
    assert fields["district"]["domain"] == ["兴庆区", "金凤区", "西夏区", "永宁县", "贺兰县", "灵武市"]
    assert fields["district"]["grade"] == 2
    assert fields["birth_date"]["bounds"] == {"min": "1900-01-01", "max": "2026-12-31"}
    assert fields["birth_date"]["masking"] == "age_band"
    for f in d["fields"]:
        assert {"sensitivity", "pii_kind", "masking", "domain", "bounds", "type", "grade"} <= set(f)
    [v] = d["versions"]
    assert (v["env"], v["number"], v["note"], v["row_count"]) == ("prod", 1, "twin", pq.ParquetFile(
        synth_files["dev"]["health.resident"]).metadata.num_rows)
    assert "storage_path" not in v and "path" not in json.dumps(v)
    for text in (r.text, client.get("/api/v1/datasets", headers=prov).text):
        assert str(settings.home) not in text and str(settings.domain_dir) not in text
        assert ".parquet" not in text and "storage" not in text


# --- register and update -------------------------------------------------------------------------

def new_descriptor(code: str = "health.vaccination", **changes) -> dict:
    d = {
        "code": code,
        "title": {"zh": "预防接种记录", "en": "Vaccinations"},
        "source_department": "ycwjw",
        "standard": "WS 376.1-2013",
        "update_cycle": "daily",
        "category": "public_health",
        "grade": 3,
        "opening_class": "conditional",
        "privacy_unit": "person_id",
        "fields": [
            {"name": "person_id", "type": "integer", "sensitivity": "identifier", "pii_kind": "person_key",
             "masking": "pseudonym", "nullable": False, "description": {"zh": "居民主索引", "en": "Person key"}},
            {"name": "vaccine", "type": "string", "sensitivity": "sensitive", "domain": ["HepB", "MMR"],
             "description": {"zh": "疫苗", "en": "Vaccine"}},
        ],
    }
    d.update(changes)
    return d


def test_register_by_json_then_unchanged_then_updated(client, auth):
    prov = auth("provider1")
    desc = new_descriptor()
    r = client.post("/api/v1/datasets", json=desc, headers=prov)
    assert r.status_code == 201, r.text
    assert r.json() == {"code": "health.vaccination", "action": "created", "revision": 1}
    assert client.post("/api/v1/datasets", json=desc, headers=prov).json() == {
        "code": "health.vaccination", "action": "unchanged", "revision": 1}
    desc["title"]["en"] = "Vaccination records"
    assert client.post("/api/v1/datasets", json=desc, headers=prov).json() == {
        "code": "health.vaccination", "action": "updated", "revision": 2}
    d = client.get("/api/v1/datasets/health.vaccination", headers=auth("insurer_a")).json()
    assert d["title_en"] == "Vaccination records" and d["revision"] == 2
    assert [f["name"] for f in d["fields"]] == ["person_id", "vaccine"]
    assert "health.vaccination" in codes(client, auth("insurer_a"), q="接种")


def test_register_by_yaml_then_unchanged_then_updated(client, auth):
    prov = {**auth("provider1"), "Content-Type": "application/yaml; charset=utf-8"}
    text = yaml.safe_dump(new_descriptor("health.vaccination_yaml"), allow_unicode=True, sort_keys=False)
    r = client.post("/api/v1/datasets", content=text.encode(), headers=prov)
    assert r.status_code == 201, r.text
    assert (r.json()["action"], r.json()["revision"]) == ("created", 1)
    assert client.post("/api/v1/datasets", content=text.encode(), headers=prov).json()["action"] == "unchanged"
    # the same descriptor sent as JSON is the same descriptor
    r = client.post("/api/v1/datasets", json=new_descriptor("health.vaccination_yaml"), headers=auth("provider1"))
    assert r.json()["action"] == "unchanged"
    changed = text.replace("grade: 3", "grade: 4")
    assert changed != text
    assert client.post("/api/v1/datasets", content=changed.encode(), headers=prov).json() == {
        "code": "health.vaccination_yaml", "action": "updated", "revision": 2}
    assert client.get("/api/v1/datasets/health.vaccination_yaml", headers=prov).json()["grade"] == 4


def test_a_packaged_yaml_file_can_be_posted_as_is(client, auth):
    text = (PACKAGED_DESCRIPTORS / "health.resident.yaml").read_bytes()
    r = client.post("/api/v1/datasets", content=text, headers={**auth("provider1"), "Content-Type": "text/yaml"})
    assert r.status_code == 200, r.text
    assert r.json() == {"code": "health.resident", "action": "unchanged", "revision": 1}


def test_a_provider_of_another_department_cannot_change_it(client, auth, provider_ybj):
    desc = PACKAGED["health.resident"]
    desc = {**desc, "title": {"zh": "被改了", "en": "hijacked"}}
    assert_error(client.post("/api/v1/datasets", json=desc, headers=provider_ybj), 403, "not_your_department")
    # nor move it to its own department
    assert_error(client.post("/api/v1/datasets", json={**desc, "source_department": "ycybj"}, headers=provider_ybj),
                 403, "not_your_department")
    d = client.get("/api/v1/datasets/health.resident", headers=auth("office1")).json()
    assert d["title_en"] != "hijacked" and d["revision"] == 1 and d["source_department"]["code"] == "ycwjw"
    # but it may manage its own
    own = {**PACKAGED["health.insurance_settlement"], "title": {"zh": "医保结算", "en": "Settlements"}}
    r = client.post("/api/v1/datasets", json=own, headers=provider_ybj)
    assert r.status_code == 200 and r.json()["action"] == "updated", r.text
    # and provider1 may not touch ycybj's
    own["title"] = {"zh": "x", "en": "y"}
    assert_error(client.post("/api/v1/datasets", json=own, headers=auth("provider1")), 403, "not_your_department")


@pytest.mark.parametrize("username", first_also_on_postgresql(["insurer_a", "office1", "auditor1", "reviewer1",
                                                               "operator1"]))
def test_only_providers_register(client, auth, username):
    assert_error(client.post("/api/v1/datasets", json=new_descriptor(), headers=auth(username)), 403,
                 "role_not_permitted")
    assert_error(client.get("/api/v1/datasets/health.vaccination", headers=auth("office1")), 404, "not_found")


# --- versions ------------------------------------------------------------------------------------

def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_load_a_version_then_incompatible_changes_are_refused(client, auth, settings, synth_files):
    prov = auth("provider1")
    src = synth_files["prod"]["health.resident"]
    r = client.post("/api/v1/datasets/health.resident/versions", headers=prov, data={"env": "prod"},
                    files={"file": ("health.resident.parquet", src.read_bytes(), "application/octet-stream")})
    assert r.status_code == 201, r.text
    v = r.json()
    assert v["code"] == "health.resident" and v["env"] == "prod" and v["number"] == 1
    assert v["row_count"] == pq.ParquetFile(src).metadata.num_rows > 0
    stored = sorted((settings.domain_dir / "health.resident" / "prod").glob("*.parquet"))
    assert len(stored) == 1
    assert v["sha256"] == _sha256(stored[0]) and v["size_bytes"] == stored[0].stat().st_size
    assert str(settings.domain_dir) not in r.text and ".parquet" not in r.text
    # a second load is a second, immutable version
    r2 = client.post("/api/v1/datasets/health.resident/versions", headers=prov,
                     files={"file": ("again.parquet", src.read_bytes())})
    assert r2.status_code == 201 and r2.json()["number"] == 2
    assert _sha256(stored[0]) == v["sha256"]
    listed = client.get("/api/v1/datasets", params={"q": "health.resident"}, headers=prov).json()["items"]
    assert listed[0]["latest_version"] == {"prod": 2, "dev": None}

    desc = PACKAGED["health.resident"]
    # dropping a field, renaming one, or changing a type would orphan the stored snapshots
    for bad in ({**desc, "fields": desc["fields"][:-1]},
                {**desc, "fields": [{**desc["fields"][0], "type": "string"}] + desc["fields"][1:]},
                {**desc, "fields": [desc["fields"][1], desc["fields"][0]] + desc["fields"][2:]}):
        assert_error(client.post("/api/v1/datasets", json=bad, headers=prov), 409, "descriptor_incompatible")
    d = client.get("/api/v1/datasets/health.resident", headers=prov).json()
    assert d["revision"] == 1 and len(d["fields"]) == len(desc["fields"])
    # a compatible change (wording, masking) still works
    ok = {**desc, "title": {"zh": "居民健康档案", "en": "Resident health record"}}
    r = client.post("/api/v1/datasets", json=ok, headers=prov)
    assert r.status_code == 200 and r.json() == {"code": "health.resident", "action": "updated", "revision": 2}


def test_loading_is_for_the_owning_provider_only(client, auth, provider_ybj, synth_files, settings):
    data = synth_files["prod"]["health.resident"].read_bytes()
    for headers, status, code in ((auth("insurer_a"), 403, "role_not_permitted"),
                                  (auth("office1"), 403, "role_not_permitted"),
                                  (provider_ybj, 403, "not_your_department")):
        r = client.post("/api/v1/datasets/health.resident/versions", headers=headers, files={"file": ("f", data)})
        assert_error(r, status, code)
    # the other department's provider cannot even see the prohibited dataset to load into it
    r = client.post(f"/api/v1/datasets/{PROHIBITED}/versions", headers=provider_ybj, files={"file": ("f", data)})
    assert_error(r, 404, "not_found")
    assert not any(settings.domain_dir.rglob("*.parquet"))
    # ycybj's own dataset: its provider may load
    r = client.post("/api/v1/datasets/health.insurance_settlement/versions", headers=provider_ybj,
                    files={"file": ("s.parquet", synth_files["prod"]["health.insurance_settlement"].read_bytes())})
    assert r.status_code == 201, r.text


def test_a_file_that_does_not_match_is_refused_whole(client, auth, settings, synth_files):
    r = client.post("/api/v1/datasets/health.chronic_condition/versions", headers=auth("provider1"),
                    files={"file": ("wrong.parquet", synth_files["prod"]["health.resident"].read_bytes())})
    assert_error(r, 422, "version_invalid")
    assert r.json()["details"]["problems"]
    assert not any(settings.domain_dir.rglob("*.parquet"))
    d = client.get("/api/v1/datasets/health.chronic_condition", headers=auth("provider1")).json()
    assert d["versions"] == []
