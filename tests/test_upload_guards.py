"""Uploads are read only after authentication and authorization, only into the domain's staging
folder; and an answer that cannot be audited is not given."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from sqlmodel import Session, select

from catalog.models import DatasetVersion


def _tmp_files() -> set[Path]:
    return {p for p in Path(tempfile.gettempdir()).iterdir() if p.is_file()}


@pytest.mark.parametrize("who", [None, "insurer_a", "office1"])
def test_an_unauthorized_upload_is_never_read(client, auth, settings, synth_files, who):
    body = synth_files["prod"]["health.resident"].read_bytes()
    before = _tmp_files()
    headers = auth(who) if who else {}
    r = client.post("/api/v1/datasets/health.resident/versions", headers=headers,
                    files={"file": ("r.parquet", body)})
    assert r.status_code == (401 if who is None else 403)
    assert list(settings.staging_dir.iterdir()) == []
    assert not {p for p in _tmp_files() - before if p.stat().st_size >= len(body) // 2}, "spooled outside the home"


def test_raw_body_upload_and_media_types(client, auth, engine, synth_files):
    prov = auth("provider1")
    data = synth_files["prod"]["health.chronic_condition"].read_bytes()
    r = client.post("/api/v1/datasets/health.chronic_condition/versions?note=nightly", headers={
        **prov, "Content-Type": "application/octet-stream"}, content=data)
    assert r.status_code == 201, r.text
    assert (r.json()["env"], r.json()["note"]) == ("prod", "nightly")
    r = client.post("/api/v1/datasets/health.chronic_condition/versions",
                    headers={**prov, "Content-Type": "image/png"}, content=data)
    assert r.status_code == 415 and r.json()["code"] == "unsupported_media_type"
    r = client.post("/api/v1/datasets/health.chronic_condition/versions", headers={
        **prov, "Content-Type": "multipart/form-data; boundary=xyz"}, content=b"--xyz\r\nbroken")
    assert r.status_code == 400 and r.json()["code"] in ("bad_multipart", "no_file")
    with Session(engine) as s:
        assert len(s.exec(select(DatasetVersion)).all()) == 1


def test_an_answer_that_cannot_be_audited_is_not_given(client, auth, monkeypatch):
    headers = auth("operator1")

    def broken(*_a, **_k):
        raise RuntimeError("audit store down")

    monkeypatch.setattr("pdao.kernel.audit.record", broken)
    r = client.get("/api/v1/users", headers=headers)
    assert r.status_code == 503 and r.json()["code"] == "audit_unavailable"
    assert "insurer_a" not in r.text
