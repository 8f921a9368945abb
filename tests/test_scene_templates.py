"""Analysis templates applied for with a scene (issue #6): checked at application and again at
approval; a template that outputs a source field, or reads a field off the data list, is refused;
an approved scene shows each template with the digest its approval covers."""

from __future__ import annotations

import copy

from sandbox.templates.library import library_template, template_digest
from tests.scene_helpers import active_scene, application

RES, CHRONIC, STAY = "health.resident", "health.chronic_condition", "health.inpatient_stay"


def underwriting_items() -> list[dict]:
    from sandbox.templates.library import template_reads

    reads = sorted(template_reads(library_template("underwriting")))
    return [{"dataset": d, "field": f, "usage": "join_key" if f in ("id_number", "person_id") else "filter"} for d, f in reads]


def test_an_approved_scene_carries_its_template_and_digest(client, auth):
    items = underwriting_items()
    scene = active_scene(client, auth, scene_type="underwriting", items=items, templates=[{"library": "underwriting"}])
    got = client.get(f"/api/v1/scenes/{scene['id']}", headers=auth("insurer_a")).json()
    [t] = got["templates"]
    assert t["name"] == "underwriting" and t["digest"] == template_digest(library_template("underwriting"))
    assert {o["kind"] for o in t["outputs"]} >= {"flag", "count_band", "band", "ref"}
    # the office sees the same when it reviews, with what each output depends on; another tenant
    # sees nothing
    office = client.get(f"/api/v1/scenes/{scene['id']}", headers=auth("office1")).json()["templates"][0]
    assert office["sql"]
    assert office["disclosure"]["outputs"]["hypertension"] == [f"{CHRONIC}.(rows)", f"{CHRONIC}.condition",
                                                                f"{CHRONIC}.diagnosed_on"]
    assert office["disclosure"]["datasets"][STAY] == office["disclosure"]["fields"][f"{STAY}.admit_date"] == 320
    assert client.get(f"/api/v1/scenes/{scene['id']}", headers=auth("insurer_b")).status_code == 404


def test_a_template_that_outputs_a_source_field_is_refused_at_application(client, auth):
    bad = copy.deepcopy(library_template("underwriting").as_dict())
    # the "band" of the largest stay is really the cost itself: a source value
    bad["sql"] = bad["sql"].replace("ELSE '50k+' END AS max_inpatient_cost_band",
                                    "ELSE CAST(st.max_cost AS VARCHAR) END AS max_inpatient_cost_band")
    assert "st.max_cost AS VARCHAR" in bad["sql"]
    r = client.post("/api/v1/scenes", headers=auth("insurer_a"),
                    json=application(items=underwriting_items(), templates=[{"definition": bad}]))
    assert r.status_code == 422 and r.json()["code"] == "scene_refused", r.text
    assert any(p["rule"] == "template_refused" for p in r.json()["details"]), r.json()


def test_a_template_reading_a_resident_outside_the_upload_is_refused_at_application(client, auth):
    bad = copy.deepcopy(library_template("underwriting").as_dict())
    # "diabetes" is really: was one chosen resident (by ID number) born before 1980?
    bad["sql"] = bad["sql"].replace(
        "COALESCE(c.diabetes, FALSE) AS diabetes",
        "EXISTS (SELECT 1 FROM health.resident AS z WHERE z.id_number = '640102198001010011' "
        "AND z.birth_date < DATE '1980-01-01') AS diabetes")
    assert "640102198001010011" in bad["sql"]
    items = underwriting_items() + [{"dataset": RES, "field": "birth_date", "usage": "filter"}]
    r = client.post("/api/v1/scenes", headers=auth("insurer_a"),
                    json=application(items=items, templates=[{"definition": bad}]))
    assert r.status_code == 422 and r.json()["code"] == "scene_refused", r.text
    messages = [p["message"] for p in r.json()["details"] if p["rule"] == "template_refused"]
    assert any("direct identifier" in m for m in messages) and any("without tying it" in m for m in messages), messages


def test_a_template_reading_a_field_off_the_data_list_is_refused_and_unknown_names_too(client, auth):
    items = [i for i in underwriting_items() if i["dataset"] != CHRONIC]
    r = client.post("/api/v1/scenes", headers=auth("insurer_a"),
                    json=application(items=items, templates=[{"library": "underwriting"}]))
    assert r.status_code == 422
    assert {p["rule"] for p in r.json()["details"]} == {"template_reads_unlisted"}
    r = client.post("/api/v1/scenes", headers=auth("insurer_a"),
                    json=application(items=items, templates=[{"library": "no_such_template"}]))
    assert r.status_code == 422 and r.json()["details"][0]["rule"] == "template_unknown"
    r = client.post("/api/v1/scenes", headers=auth("insurer_a"),
                    json=application(items=items, templates=[{"library": "underwriting", "definition": {}}]))
    assert r.status_code == 422


def test_striking_a_field_a_template_reads_blocks_approval(client, auth):
    items = underwriting_items()
    s = client.post("/api/v1/scenes", headers=auth("insurer_a"),
                    json=application(scene_type="underwriting", items=items, templates=[{"library": "underwriting"}]))
    assert s.status_code == 201, s.text
    sid = s.json()["id"]
    assert client.post(f"/api/v1/scenes/{sid}/submit", headers=auth("insurer_a")).status_code == 200
    scene = client.get(f"/api/v1/scenes/{sid}", headers=auth("office1")).json()
    chronic = [i["id"] for i in scene["items"] if i["dataset"] == CHRONIC]
    r = client.post(f"/api/v1/scenes/{sid}/reviews", headers=auth("office1"),
                    json={"decision": "approve", "struck_items": chronic, "comment": "no chronic data"})
    assert r.status_code == 200
    r = client.post(f"/api/v1/scenes/{sid}/reviews", headers=auth("office2"), json={"decision": "approve", "comment": "ok"})
    assert r.status_code == 409 and any(p["rule"] == "template_reads_unlisted" for p in r.json()["details"]), r.text
