"""Queries that join the tenant's own upload (issue #6 wiring): the newest version is pinned at
submission and recorded in the lineage; another tenant's upload is indistinguishable from none;
a join on anything but the upload's declared key is refused."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from sqlmodel import Session

from sandbox.engine.store import load_version
from tests.scene_helpers import active_scene
from tests.test_queries import work_once
from tests.test_tenant_uploads import APPLICANTS, TODAY, to_csv

RESIDENTS = "health.resident"
JOINED = (f"SELECT r.district, COUNT(*) AS n FROM {RESIDENTS} r JOIN applicants a ON r.id_number = a.id_number "
          "GROUP BY r.district")
ITEMS = [{"dataset": RESIDENTS, "field": "district", "usage": "group_by"},
         {"dataset": RESIDENTS, "field": "id_number", "usage": "join_key"}]


@pytest.fixture
def residents(engine, settings, synth_files):
    with Session(engine) as s:
        for env in ("prod", "dev"):
            load_version(s, settings, RESIDENTS, synth_files[env][RESIDENTS], env=env, source="synth")
    return pq.read_table(synth_files["prod"][RESIDENTS], columns=["id_number"]).column(0).to_pylist()


def upload_applicants(client, headers, ids):
    from datetime import timedelta

    rows = [{"applicant_ref": f"A{i:05d}", "id_number": x, "consent_ref": f"C-{i:04d}",
             "consent_signed_on": (TODAY - timedelta(days=10)).isoformat(),
             "consent_valid_until": (TODAY + timedelta(days=300)).isoformat(), "note": ""}
            for i, x in enumerate(ids)]
    r = client.post("/api/v1/uploads", headers=headers, data={"schema": json.dumps(APPLICANTS)},
                    files={"file": ("applicants.csv", to_csv(rows), "text/csv")})
    assert r.status_code == 201, r.text
    return r.json()


def test_a_query_joins_the_tenants_own_upload_pinned_and_traced_in_lineage(client, auth, engine, settings, residents):
    upload_applicants(client, auth("insurer_a"), residents[:60])
    scene = active_scene(client, auth, items=ITEMS)
    r = client.post(f"/api/v1/scenes/{scene['id']}/queries", headers=auth("insurer_a"),
                    json={"sql": JOINED, "mode": "prod", "epsilon": 0.5})
    assert r.status_code == 202, r.text
    # a second version uploaded after submission does not change what the query reads
    upload_applicants(client, auth("insurer_a"), residents[100:110])
    assert work_once(engine, settings)
    q = client.get(f"/api/v1/queries/{r.json()['id']}", headers=auth("insurer_a")).json()
    assert q["status"] == "held", q
    res = client.get(f"/api/v1/results/{q['result_id']}", headers=auth("reviewer1")).json()
    assert len(res["rows"]) == 6 and res["report"]["checks"]
    lin = client.get(f"/api/v1/results/{q['result_id']}/lineage", headers=auth("auditor1")).json()
    assert [(u["name"], u["version"]) for u in lin["uploads"]] == [("applicants", 1)]
    assert len(lin["uploads"][0]["sha256"]) == 64 and lin["uploads"][0]["row_count"] == 60
    # dev: the same SQL on the synthetic twin, at once
    r = client.post(f"/api/v1/scenes/{scene['id']}/queries", headers=auth("insurer_a"),
                    json={"sql": JOINED, "mode": "dev"})
    assert r.status_code == 202 and r.json()["status"] == "done", r.text


def test_another_tenants_upload_is_none_and_the_join_key_is_the_declared_one(client, auth, engine, settings, residents):
    upload_applicants(client, auth("insurer_a"), residents[:20])
    scene_b = active_scene(client, auth, applicant="insurer_b", items=ITEMS)
    r = client.post(f"/api/v1/scenes/{scene_b['id']}/queries", headers=auth("insurer_b"),
                    json={"sql": JOINED, "mode": "prod"})
    assert r.status_code in (404, 422), r.text   # unknown to insurer_b: refused as a missing table
    assert "applicants" not in json.dumps(client.get("/api/v1/uploads", headers=auth("insurer_b")).json())
    scene_a = active_scene(client, auth, items=ITEMS)
    wrong = JOINED.replace("r.id_number = a.id_number", "r.id_number = a.consent_ref")
    r = client.post(f"/api/v1/scenes/{scene_a['id']}/queries", headers=auth("insurer_a"),
                    json={"sql": wrong, "mode": "prod"})
    assert r.status_code == 422 and r.json()["code"] == "upload_join_mismatch", r.text
    assert client.get(f"/api/v1/scenes/{scene_a['id']}", headers=auth("insurer_a")).json()["budget"]["epsilon_spent"] == 0
