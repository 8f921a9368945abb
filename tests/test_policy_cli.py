"""`pdao policy rules` and `pdao policy explain`, in process (typer's runner), against a scene made
active over HTTP on each backend."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from pdao.cli.main import app
from policies.rules import MAX_GRADE, NEVER_REASON, Usage, rule_table
from tests.scene_helpers import approve, create

SIGNING_KEY = "test-signing-key-of-at-least-32-bytes"  # as tests/conftest.py make_settings

# The explanation is Python over the scene that the service reads; by default on SQLite, on PostgreSQL
# in `make test-slow`. The same decisions on PostgreSQL: GET /scenes/{id}/explain in
# tests/test_scene_matrix.py (the other tenant, every state) and tests/test_scene_processes.py.
pytestmark = pytest.mark.default_backend("sqlite")


@pytest.fixture
def pdao(settings, monkeypatch):
    monkeypatch.setenv("PDAO_HOME", str(settings.home))
    monkeypatch.setenv("PDAO_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("PDAO_SECRET_KEY", SIGNING_KEY)
    runner = CliRunner()

    def run(*args: str, code: int = 0):
        result = runner.invoke(app, list(args))
        assert result.exit_code == code, f"pdao {' '.join(args)} -> {result.exit_code}\n{result.output}"
        return result.output

    return run


@pytest.fixture
def scene(client, auth) -> dict:
    """An active scene of company_a (insurer_a), its id_number join_key item struck by office1."""
    a = auth("insurer_a")
    s = create(client, a)
    r = client.post(f"/api/v1/scenes/{s['id']}/submit", headers=a)
    assert r.status_code == 200, r.text
    struck = next(i["id"] for i in s["items"] if i["field"] == "id_number")
    done = approve(client, auth, s["id"], struck=[struck])
    assert done["status"] == "active"
    return done


def explain(pdao, user: str, sid: int, dataset: str = "health.outpatient_visit", field: str = "district",
            usage: str = "group_by", code: int = 1) -> list[str]:
    out = pdao("policy", "explain", "--user", user, "--scene", str(sid), "--dataset", dataset, "--field", field,
               "--usage", usage, code=code)
    return out.splitlines()


def test_rules_prints_the_grid_with_never_cells_and_the_extra_rules(pdao):
    out = pdao("policy", "rules")
    lines = out.splitlines()
    header = next(ln for ln in lines if ln.startswith("sensitivity"))
    assert header.split()[-len(Usage):] == [u.value for u in Usage]
    columns = [header.index(u.value) for u in Usage]
    for sens, row in MAX_GRADE.items():
        line = next(ln for ln in lines if ln.startswith(sens + " "))
        for start, (use, grade) in zip(columns, row.items()):
            cell = line[start:].split("  ")[0].strip()
            if grade:
                assert cell == f"≤ {grade}", (sens, use, cell)
            else:
                assert cell.startswith("never ["), (sens, use, cell)
                n = cell.removeprefix("never [").rstrip("]")
                explained = next(ln for ln in lines if ln.startswith(f"  [{n}] "))
                assert explained.startswith(f"  [{n}] {sens} × {use.value}: ")
                if (sens, use) in NEVER_REASON:
                    en, zh = NEVER_REASON[sens, use]
                    assert explained.endswith(f"{en} / {zh}")
    never_cells = sum(1 for row in MAX_GRADE.values() for g in row.values() if g == 0)
    assert len(re.findall(r"^  \[\d+\] ", out, flags=re.M)) == never_cells
    for text in rule_table()["also"]:
        assert f"  - {text}" in out
    assert "(rule prohibited_dataset)" in out
    assert json.loads(pdao("policy", "rules", "--json")) == json.loads(json.dumps(rule_table()))


def test_explain_allowed_and_each_kind_of_denial(pdao, scene, client, auth):
    sid = scene["id"]
    ok = explain(pdao, "insurer_a", sid, code=0)
    assert ok[0] == "ALLOWED scene_item"
    assert ok[1].strip() == "health.outpatient_visit.district as group_by is in the approved list of an active scene"
    assert ok[2].strip() == "health.outpatient_visit.district（group_by）在生效场景的已批准清单中"
    assert "insurer_a (applicant of company_a)" in ok[3] and f"scene {sid} (active)" in ok[3]

    struck = explain(pdao, "insurer_a", sid, "health.resident", "id_number", "join_key")
    assert struck[0] == "DENIED not_in_data_list" and "不在该场景已批准的清单中" in struck[2]
    assert explain(pdao, "insurer_a", sid, usage="filter")[0] == "DENIED not_in_data_list"
    by_rule = explain(pdao, "insurer_a", sid, "health.resident", "id_number", "group_by")
    assert by_rule[0] == "DENIED never:identifier:group_by"
    assert by_rule[1].strip() == "health.resident.id_number: an identifier can never be a group key"
    assert by_rule[2].strip() == "health.resident.id_number：标识符不能作为分组键"
    assert explain(pdao, "insurer_a", sid, "health.notifiable_disease", "disease",
                   "aggregate")[0] == "DENIED prohibited_dataset"
    assert explain(pdao, "insurer_a", sid, "health.nope", "x", "aggregate")[0] == "DENIED unknown_field"
    assert explain(pdao, "insurer_a", sid, usage="everything")[0] == "DENIED unknown_usage"

    # the office sees the scene but is not its tenant
    assert explain(pdao, "office1", sid)[0] == "DENIED not_tenant"
    # the decision is the organization's: another applicant of company_a is allowed too
    pdao("users", "create", "analyst7", "--org", "company_a", "--role", "applicant", "--password", "long-enough-1")
    assert explain(pdao, "analyst7", sid, code=0)[0] == "ALLOWED scene_item"

    # suspended, then revoked: the next explain says so
    o = auth("office1")
    assert client.post(f"/api/v1/scenes/{sid}/suspend", headers=o, json={"reason": "audit"}).status_code == 200
    suspended = explain(pdao, "insurer_a", sid)
    assert suspended[0] == "DENIED scene_suspended" and f"scene {sid} (suspended)" in suspended[3]
    assert client.post(f"/api/v1/scenes/{sid}/revoke", headers=o, json={"reason": "x"}).status_code == 200
    assert explain(pdao, "insurer_a", sid)[0] == "DENIED scene_revoked"


def test_explain_to_another_tenant_is_the_same_as_no_scene(pdao, scene):
    sid = scene["id"]
    other = explain(pdao, "insurer_b", sid)
    missing = explain(pdao, "insurer_b", 999_999)
    assert other[0] == missing[0] == "DENIED not_found"
    assert other[1:3] == missing[1:3] == ["  Scene not found.", "  场景不存在。"]
    # the applicant's own organization, asking about a scene that does not exist, gets the same
    assert explain(pdao, "insurer_a", 999_999)[:3] == missing[:3]


def test_explain_unknown_user_is_an_error(pdao, scene):
    out = pdao("policy", "explain", "--user", "nobody", "--scene", str(scene["id"]), "--dataset", "d",
               "--field", "f", "--usage", "filter", code=1)
    assert "error [not_found]: User 'nobody' not found." in out
    assert "ALLOWED" not in out and "DENIED" not in out
