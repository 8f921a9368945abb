"""No API path returns raw rows, and the audit log holds no cell values.

Every synthetic file is loaded as a prod and a dev version. Then every GET route of the app (found
by enumerating the app, so a new route is covered the day it is added) is called as every demo
role, with an API key and without credentials, with real path parameters; and the POST answers
of this test (logins, loads, refused loads built from real cells, registration, key issue) are
kept too. No answer, and no column of any audit row, may contain a sensitive cell value: ID
numbers, names, phones, addresses, chief complaints and discharge notes."""

from __future__ import annotations

import csv
import io
import re

import pyarrow.parquet as pq
import pytest
from sqlalchemy import text
from sqlmodel import Session
from starlette.routing import Route

from catalog.descriptor import PACKAGED_DESCRIPTORS
from pdao.cli.demo import DEMO_USERS
from policies.enforcer import SceneEnforcers
from sandbox.engine.store import load_version
from sandbox.worker import run_one, worker_name
from tests.conftest import DEMO_PASSWORD
from tests.scene_helpers import SCENE_ITEMS, active_scene

SENSITIVE_COLUMNS = {
    "health.resident": ("id_number", "name", "phone", "address"),
    "health.outpatient_visit": ("chief_complaint",),
    "health.inpatient_stay": ("notes",),
}
# Loaded through the API by provider1 (its department's datasets); the rest through the store.
VIA_API = ("health.resident", "health.outpatient_visit", "health.inpatient_stay", "health.chronic_condition")


def sensitive_values(synth_files) -> set[str]:
    out: set[str] = set()
    for env in ("prod", "dev"):
        for code, cols in SENSITIVE_COLUMNS.items():
            table = pq.read_table(synth_files[env][code], columns=list(cols))
            for col in cols:
                out.update(v for v in table.column(col).to_pylist() if isinstance(v, str) and v.strip())
    return out


def innocent_collisions(values: set[str]) -> set[str]:
    """Values that also occur in the packaged catalog text (a short complaint like a common word):
    finding those in metadata proves nothing. They must be few."""
    catalog_text = "\n".join(p.read_text(encoding="utf-8") for p in PACKAGED_DESCRIPTORS.glob("*.yaml"))
    return {v for v in values if v in catalog_text}


def get_paths(app) -> set[str]:
    """Every GET path of the app: the OpenAPI paths plus the app's own non-API routes (docs)."""
    paths = {p for p, ops in app.openapi()["paths"].items() if "get" in ops}
    paths |= {r.path for r in app.routes if isinstance(r, Route) and "GET" in (r.methods or ())}
    return paths


def fill(path: str, values: dict[str, list[str]]) -> list[str]:
    """Every combination of real values for the path's parameters; unknown parameters get '1'."""
    out = [path]
    for m in re.finditer(r"\{([^}:]+)(:[^}]*)?\}", path):
        out = [p.replace(m.group(0), v, 1) for p in out for v in values.get(m.group(1), ["1"])]
    return out


def leaked(bodies: list[str], values: set[str]) -> list[str]:
    big = "\x00".join(set(bodies))
    return sorted(v for v in values if v in big)


def _csv(rows: list[dict], header: bool = True) -> bytes:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    if header:
        w.writeheader()
    w.writerows(rows)
    return buf.getvalue().encode()


# By default on SQLite (~10 s; `make test-slow` runs it on PostgreSQL too). On PostgreSQL, no cell in
# any console page: tests/test_console_no_rows.py; every API route refuses without credentials:
# tests/test_api_errors.py::test_every_api_route_but_health_and_login_needs_credentials; error
# answers leak nothing: tests/test_api_errors.py::test_error_table.
@pytest.mark.default_backend("sqlite")
def test_no_response_and_no_audit_row_contains_a_cell_value(app, client, engine, settings, synth_files):
    values = sensitive_values(synth_files)
    innocent = innocent_collisions(values)
    assert len(values) > 1000 and len(innocent) <= len(values) // 100, sorted(innocent)[:20]
    values -= innocent
    bodies: list[str] = []

    def keep(r, status: int | None = None):  # noqa: ANN202
        if status is not None:
            assert r.status_code == status, r.text
        bodies.append(r.text)
        return r

    users = [u for u, _org, _role in DEMO_USERS]
    tokens = {}
    for u in users:
        r = keep(client.post("/api/v1/auth/token", data={"username": u, "password": "pdao-demo"}), 200)
        tokens[u] = {"Authorization": f"Bearer {r.json()['access_token']}"}
    prov = tokens["provider1"]

    # load everything, prod and dev
    for code in VIA_API:
        keep(client.post(f"/api/v1/datasets/{code}/versions", headers=prov, data={"note": "synth"},
                         files={"file": (f"{code}.parquet", synth_files["prod"][code].read_bytes())}), 201)
    for env in ("prod", "dev"):
        if env == "dev":  # the dev twin is loaded as pdao synth does
            for code in VIA_API:
                with Session(engine) as s:
                    load_version(s, settings, code, synth_files[env][code], env=env, source="synth")
        with Session(engine) as s:
            load_version(s, settings, "health.insurance_settlement", synth_files[env]["health.insurance_settlement"],
                         env=env, source="synth")

    # refused loads built from real cells must not echo them
    residents = pq.read_table(synth_files["prod"]["health.resident"]).to_pylist()[:20]
    for r in residents:
        r["birth_date"] = str(r["birth_date"])
    shifted = [{**r, "sex": r["id_number"], "district": r["name"], "insurance_type": r["address"]} for r in residents]
    for data in (_csv(shifted), _csv(residents, header=False), _csv([{**r, "extra": r["phone"]} for r in residents]),
                 b"PAR1" + _csv(residents)):
        keep(client.post("/api/v1/datasets/health.resident/versions", headers=prov,
                         files={"file": ("bad.csv", data, "text/csv")}), 422)
    visits = pq.read_table(synth_files["prod"]["health.outpatient_visit"]).to_pylist()[:50]
    bad_visits = [{**{k: str(v) for k, v in r.items()}, "district": r["chief_complaint"]} for r in visits]
    keep(client.post("/api/v1/datasets/health.outpatient_visit/versions", headers=prov,
                     files={"file": ("bad.csv", _csv(bad_visits), "text/csv")}), 422)

    # search for cell values: the answer must not echo the question
    probes = sorted(values)[:5]
    for q in probes:
        keep(client.get("/api/v1/datasets", params={"q": q[:100]}, headers=tokens["insurer_a"]), 200)

    grant = keep(client.post("/api/v1/api-keys", json={"username": "insurer_a"}, headers=tokens["operator1"]), 201).json()
    key = keep(client.post(grant["claim_path"], json={"password": DEMO_PASSWORD}, headers=tokens["insurer_a"]),
               200).json()  # its owner claims it, with its password

    # queries through a scene: dev answers (aggregate and masked rows), a prod answer held for review
    ov = "health.outpatient_visit"
    scene = active_scene(client, tokens.__getitem__, items=SCENE_ITEMS + [
        {"dataset": ov, "field": "person_id", "usage": "masked_output"},
        {"dataset": ov, "field": "visit_date", "usage": "masked_output"}])
    by_district = f"SELECT district, COUNT(*) AS n, AVG(fee) AS mean FROM {ov} GROUP BY district"
    submitted = [keep(client.post(f"/api/v1/scenes/{scene['id']}/queries", headers=tokens["insurer_a"], json=body), 202)
                 .json() for body in ({"sql": by_district, "mode": "dev"}, {"sql": by_district, "mode": "prod"},
                                      {"sql": f"SELECT person_id, visit_date FROM {ov} LIMIT 50", "mode": "dev"})]
    assert run_one(engine, settings, SceneEnforcers(engine), worker_name())
    query_ids = [str(q["id"]) for q in submitted]
    result_ids = [str(client.get(f"/api/v1/queries/{i}", headers=tokens["insurer_a"]).json()["result_id"])
                  for i in query_ids]

    # every GET route, every role, real parameters
    codes = [d["code"] for d in client.get("/api/v1/datasets?limit=500", headers=tokens["office1"]).json()["items"]]
    assert len(codes) == 6
    params = {"code": codes, "key_id": [str(key["id"])], "scene_id": [str(scene["id"])], "query_id": query_ids,
              "result_id": result_ids}
    paths = get_paths(app)
    assert {"/api/v1/health", "/api/v1/me", "/api/v1/datasets", "/api/v1/datasets/{code}", "/api/v1/users",
            "/api/v1/api-keys", "/api/v1/openapi.json"} <= paths, paths
    callers = {**tokens, "api_key": {"X-API-Key": key["key"]}, "anonymous": {}}
    calls = 0
    for path in sorted(paths):
        for url in fill(path, params):
            for who, headers in callers.items():
                r = keep(client.get(url, headers=headers))
                assert r.status_code < 500, (url, who, r.text)
                calls += 1
    assert calls >= len(paths) * len(callers)
    # the loads happened and are visible as metadata
    d = client.get("/api/v1/datasets/health.resident", headers=tokens["auditor1"]).json()
    assert {(v["env"], v["number"]) for v in d["versions"]} == {("prod", 1), ("dev", 1)}

    found = leaked(bodies, values)
    assert found == [], f"{len(found)} cell values in API answers, e.g. {found[:5]}"

    # the audit log: every column of every row
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT * FROM audit_event")).all()
    assert len(rows) >= calls
    audit_text = ["\x00".join("" if v is None else str(v) for v in row) for row in rows]
    found = leaked(audit_text, values)
    assert found == [], f"{len(found)} cell values in the audit log, e.g. {found[:5]}"


def test_the_leak_detector_detects(synth_files):
    """The scan above can fail: a body quoting one cell is caught, in a JSON-escaped body too."""
    import json

    values = sensitive_values(synth_files) - innocent_collisions(sensitive_values(synth_files))
    some = sorted(values)[len(values) // 2]
    assert some in leaked(['{"ok": true}', json.dumps({"x": f"... {some} ..."}, ensure_ascii=False)], values)
    assert leaked(['{"ok": true}'], values) == []
    ids = {v for v in values if re.fullmatch(r"\d{17}[\dX]", v)}
    names = {v for v in values if re.fullmatch(r"[\u4e00-\u9fff]{2,4}", v)}
    phones = {v for v in values if re.fullmatch(r"1[3-9]\d{9}", v)}
    assert len(ids) >= 100 and len(names) >= 50 and len(phones) >= 50


def test_fill():
    vals = {"code": ["a", "b"], "key_id": ["7"]}
    assert fill("/api/v1/datasets/{code}", vals) == ["/api/v1/datasets/a", "/api/v1/datasets/b"]
    assert fill("/x/{code}/y/{scene_id}", vals) == ["/x/a/y/1", "/x/b/y/1"]
    assert fill("/api/v1/datasets", vals) == ["/api/v1/datasets"]
