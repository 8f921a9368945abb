"""Visibility by organization, not only by role (issue #13, finding 5): a reviewer employed by a
company — a role a company may give its own compliance officer — sees what a tenant sees, in the
uploads and in the catalog, through the API and the console; the office, reviewers outside
companies and auditors still see what they saw."""

from __future__ import annotations

import itertools

import pytest
from sqlmodel import Session

from pdao.kernel.identity import service as identities
from pdao.kernel.identity.models import ROLE_ORG_KINDS, Role
from pdao.kernel.identity.service import Principal
from policies.catalog_rules import ALL_CLASSES, OPEN_CLASSES, catalog_scope
from policies.visibility import tenant_scoped
from sandbox.results import export
from sandbox.uploads.service import upload_scope
from tests.conftest import DEMO_PASSWORD, login
from tests.console_support import CONSOLE, console_client
from tests.test_catalog_api import ALL, OPEN_HEALTH, PROHIBITED, codes
from tests.test_tenant_uploads import APPLICANTS, CLAIMS, IDS, applicant_rows, send, to_csv

API = "/api/v1"
ORG_KINDS = ("department", "company", "office", "operator", "regulator")


@pytest.fixture
def reviewer_b(engine, client):
    """A reviewer employed by company_b (insurer_b's company), created the way operators do."""
    with Session(engine) as s:
        identities.create_user(s, "reviewer_b", DEMO_PASSWORD, "company_b", "reviewer")
        s.commit()
    return login(client, "reviewer_b")


def claim_rows(n: int = 6) -> list[dict]:
    return [{"claim_ref": f"CLM{i:06d}", "id_number": IDS[i], "hospital": "宁夏医科大学总医院",
             "admit_date": "2026-01-02", "discharge_date": "2026-01-09", "amount": "1200.50",
             "consent_ref": f"K{i}", "consent_signed_on": "2025-12-01", "consent_valid_until": "2030-01-01"}
            for i in range(n)]


def test_a_company_reviewer_sees_what_a_tenant_sees(client, auth, reviewer_b):
    a, b = auth("insurer_a"), auth("insurer_b")
    assert send(client, a, to_csv(applicant_rows()), APPLICANTS, note="甲公司内部批次").status_code == 201
    assert send(client, b, to_csv(claim_rows()), CLAIMS, note="乙公司理赔").status_code == 201

    # uploads: only company_b's, with its own note; insurer_a's table answers like a missing one
    listed = client.get(f"{API}/uploads", headers=reviewer_b).json()
    assert [(i["org"], i["name"]) for i in listed["items"]] == [("company_b", "claims")]
    assert listed["items"][0]["note"] == "乙公司理赔"
    theirs = client.get(f"{API}/uploads/applicants", headers=reviewer_b)
    missing = client.get(f"{API}/uploads/no_such_table", headers=reviewer_b)
    assert theirs.status_code == missing.status_code == 404 and theirs.json() == missing.json()
    for query in ("?org=company_a", ""):
        assert client.get(f"{API}/uploads/applicants{query}", headers=reviewer_b).status_code == 404
    assert client.get(f"{API}/uploads?org=company_a", headers=reviewer_b).json() == {"items": [], "total": 0}
    assert client.get(f"{API}/uploads/claims", headers=reviewer_b).status_code == 200

    # catalog: the open datasets only; the prohibited one answers like a missing one, and no search finds it
    assert codes(client, reviewer_b) == OPEN_HEALTH
    prohibited = client.get(f"{API}/datasets/{PROHIBITED}", headers=reviewer_b)
    absent = client.get(f"{API}/datasets/health.does_not_exist", headers=reviewer_b)
    assert prohibited.status_code == absent.status_code == 404 and prohibited.json()["code"] == "not_found"
    assert (prohibited.json()["message"].replace(PROHIBITED, "X")
            == absent.json()["message"].replace("health.does_not_exist", "X"))
    assert codes(client, reviewer_b, q="传染病") == set()
    assert codes(client, reviewer_b, opening_class="prohibited") == set()

    # the office, a reviewer outside any company and the auditors still see every tenant's uploads
    # (metadata, not the notes) and the whole catalog
    for who in ("office1", "reviewer1", "auditor1"):
        items = client.get(f"{API}/uploads", headers=auth(who)).json()["items"]
        assert sorted((i["org"], i["name"]) for i in items) == [("company_a", "applicants"), ("company_b", "claims")]
        assert all(i["note"] is None for i in items)
        assert client.get(f"{API}/uploads/applicants?org=company_a", headers=auth(who)).status_code == 200
        assert codes(client, auth(who)) == ALL
        assert client.get(f"{API}/datasets/{PROHIBITED}", headers=auth(who)).status_code == 200
    # and the tenants see what they saw
    assert [i["name"] for i in client.get(f"{API}/uploads", headers=a).json()["items"]] == ["applicants"]
    assert codes(client, a) == codes(client, b) == OPEN_HEALTH


def test_a_company_reviewer_in_the_console(app, client, reviewer_b):
    assert send(client, login(client, "insurer_a"), to_csv(applicant_rows()), APPLICANTS).status_code == 201
    c = console_client(app, "reviewer_b")
    catalog = c.get(f"{CONSOLE}/catalog")
    assert catalog.status_code == 200 and PROHIBITED not in catalog.text and "health.resident" in catalog.text
    assert c.get(f"{CONSOLE}/catalog/{PROHIBITED}").status_code == 404
    uploads = c.get(f"{CONSOLE}/uploads")
    assert uploads.status_code == 200 and "company_a" not in uploads.text and "applicants" not in uploads.text
    office = console_client(app, "office1")
    assert PROHIBITED in office.get(f"{CONSOLE}/catalog").text
    assert "applicants" in office.get(f"{CONSOLE}/uploads").text


def _principal(role: Role, kind: str) -> Principal:
    return Principal(1, "u", role, 7, "org", kind, "password")


def test_one_predicate_for_every_role_and_organization_kind():
    """`tenant_scoped` means what `sandbox.results.export` decides queries and results by, for every role in
    every kind of organization (possible or not), and the uploads and the catalog follow it."""
    for role, kind in itertools.product(Role, ORG_KINDS):
        scoped = tenant_scoped(role, kind)
        assert scoped == export._tenant_scoped(_principal(role, kind)), (role, kind)
        assert scoped == (role is Role.applicant or kind == "company")
        if scoped:
            assert upload_scope(role, 7, kind) == 7
            assert catalog_scope(role, 7, kind).opening_classes == OPEN_CLASSES
            assert catalog_scope(role, 7, kind).own_org_id is None
    # the combinations that exist: only applicants and reviewers sit in companies
    in_companies = {r for r, kinds in ROLE_ORG_KINDS.items() if "company" in kinds}
    assert in_companies == {Role.applicant, Role.reviewer}
    assert upload_scope(Role.reviewer, 7, "office") is None and upload_scope(Role.reviewer, 7, "operator") is None
    assert catalog_scope(Role.reviewer, 7, "office").opening_classes == ALL_CLASSES
    assert upload_scope(Role.provider, 7, "department") is False
    assert upload_scope(Role.operator, 7, "operator") is False


def test_a_tenant_cannot_tell_a_prohibited_dataset_or_its_fields_from_a_missing_one(client, auth):
    """The second review: explain, a draft application and the budgets endpoints answered a prohibited
    dataset's fields differently from missing ones (`prohibited_dataset` vs `unknown_field`, 200 vs
    404), so a tenant mapped it by guessing. Now a tenant's view of them is the view of nothing."""
    from tests.scene_helpers import active_scene, application

    scene = active_scene(client, auth)
    a = auth("insurer_a")

    def explained(dataset: str, field: str) -> dict:
        r = client.get(f"{API}/scenes/{scene['id']}/explain", headers=a,
                       params={"dataset": dataset, "field": field, "usage": "filter"})
        assert r.status_code == 200, r.text
        return r.json()

    def drafted(dataset: str, field: str) -> dict:
        body = application(items=[{"dataset": dataset, "field": field, "usage": "filter"}])
        r = client.post(f"{API}/scenes", headers=a, json=body)
        assert r.status_code == 422, r.text
        return r.json()

    def strip(body: dict, dataset: str) -> str:   # the same answer but for the name asked about
        return str(body).replace(dataset, "D")

    real, ghost = PROHIBITED, "health.no_such_dataset"
    for field in ("disease", "person_id"):
        assert strip(explained(real, field), real) == strip(explained(ghost, field), ghost)
        assert strip(drafted(real, field), real) == strip(drafted(ghost, field), ghost)
    assert explained(real, "disease")["rule"] == "unknown_field"
    for path in (f"{API}/budgets/company_a/{real}", f"{API}/budgets/company_a/{ghost}"):
        r = client.get(path, headers=a)
        assert r.status_code == 404 and r.json()["code"] == "not_found", r.text
    # the office caps it: a tenant's list still does not name it; the office's does
    r = client.put(f"{API}/budgets/company_a/{real}", headers=auth("office1"), json={"epsilon": 1})
    assert r.status_code == 200, r.text
    assert real not in str(client.get(f"{API}/budgets", headers=a).json())
    assert real in str(client.get(f"{API}/budgets", headers=auth("office1")).json())
    # the office, explaining the same scene, sees the catalog as it is
    r = client.get(f"{API}/scenes/{scene['id']}/explain", headers=auth("office1"),
                   params={"dataset": real, "field": "disease", "usage": "filter"})
    assert r.json()["rule"] == "prohibited_dataset"
