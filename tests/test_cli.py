"""The `pdao` command, in process (typer's runner) against the test database of each backend."""

from __future__ import annotations

import re

import pytest
from sqlmodel import Session, select
from typer.testing import CliRunner

from catalog.descriptor import PACKAGED_DESCRIPTORS
from catalog.models import Dataset, DatasetVersion
from pdao.cli.main import app
from pdao.kernel.identity.models import ApiKey, User

# `pdao synth` and `pdao data verify` generate, load and hash files; loading on PostgreSQL is
# tests/test_store.py's, and the command itself on PostgreSQL is run by the other tests here. These
# two run on SQLite by default and on PostgreSQL in `make test-slow`.


@pytest.fixture
def pdao(settings, monkeypatch):
    monkeypatch.setenv("PDAO_HOME", str(settings.home))
    monkeypatch.setenv("PDAO_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("PDAO_SECRET_KEY", "test-signing-key-of-at-least-32-bytes")
    runner = CliRunner()

    def run(*args: str, ok: bool = True, input: str | None = None):  # noqa: A002
        result = runner.invoke(app, list(args), input=input)
        assert (result.exit_code == 0) == ok, f"pdao {' '.join(args)} -> {result.exit_code}\n{result.output}"
        return result

    return run


def test_catalog_import_reports_file_and_line_and_imports_nothing(pdao, engine, tmp_path):
    text = (PACKAGED_DESCRIPTORS / "health.resident.yaml").read_text(encoding="utf-8")
    bad = tmp_path / "health.new.yaml"
    bad.write_text(text.replace("health.resident", "health.new").replace("    type: date\n", "    type: datum\n"),
                   encoding="utf-8")
    result = pdao("catalog", "import", str(bad), ok=False)
    line = next(i + 1 for i, ln in enumerate(bad.read_text(encoding="utf-8").splitlines()) if "datum" in ln)
    assert f"{bad}:{line}: fields[5].type:" in result.output
    assert "descriptor_invalid" in result.output
    with Session(engine) as s:
        assert s.exec(select(Dataset).where(Dataset.code == "health.new")).first() is None
    assert "unchanged health.resident" in re.sub(r"\s+", " ", pdao("catalog", "import").output)


@pytest.mark.default_backend("sqlite")
def test_synth_loads_prod_and_dev_twin_deterministically(pdao, engine, settings, tmp_path, monkeypatch):
    out = pdao("synth", "--scale", "2000", "--seed", "5").output
    assert "health.outpatient_visit" in out and " dev " in out
    with Session(engine) as s:
        first = {(v.dataset_id, v.env): v.sha256 for v in s.exec(select(DatasetVersion))}
    assert len(first) == 10  # five datasets, prod and dev
    # the same command into another home gives byte-identical snapshots
    other = tmp_path / "other-home"
    monkeypatch.setenv("PDAO_HOME", str(other))
    monkeypatch.setenv("PDAO_DATABASE_URL", f"sqlite:///{other / 'pdao.db'}")
    pdao("synth", "--scale", "2000", "--seed", "5")
    from pdao.kernel.db import make_engine

    eng2 = make_engine(f"sqlite:///{other / 'pdao.db'}")
    with Session(eng2) as s:
        codes = {d.id: d.code for d in s.exec(select(Dataset))}
        second = {(codes[v.dataset_id], v.env): v.sha256 for v in s.exec(select(DatasetVersion))}
    eng2.dispose()
    with Session(engine) as s:
        codes1 = {d.id: d.code for d in s.exec(select(Dataset))}
    assert {(codes1[k[0]], k[1]): h for k, h in first.items()} == second


def test_data_load_and_refusal(pdao, synth_files, tmp_path):
    path = synth_files["prod"]["health.inpatient_stay"]
    out = pdao("data", "load", "health.inpatient_stay", str(path)).output
    assert re.search(r"loaded health.inpatient_stay prod v1: [\d,]+ rows, sha256 [0-9a-f]{64}", out)
    out = pdao("data", "load", "health.resident", str(path), ok=False).output
    assert "version_invalid" in out and "missing columns" in out
    pdao("data", "load", "health.resident", str(tmp_path / "nope.parquet"), ok=False)


def test_users_and_api_keys(pdao, engine):
    pdao("users", "create", "analyst7", "--org", "company_a", "--role", "applicant", "--password", "long-enough-1")
    out = pdao("users", "create", "analyst7", "--org", "company_a", "--role", "applicant",
               "--password", "long-enough-1", ok=False).output
    assert "user_exists" in out
    assert "role_org_mismatch" in pdao("users", "create", "x1", "--org", "company_a", "--role", "office",
                                       "--password", "long-enough-1", ok=False).output
    assert "weak_password" in pdao("users", "create", "x2", "--org", "company_a", "--role", "applicant",
                                   "--password", "short", ok=False).output
    assert re.search(r"analyst7\s+applicant\s+company_a\s+active", pdao("users", "list").output)
    pdao("users", "set-password", "analyst7", "--password", "another-pass-2")
    pdao("users", "disable", "analyst7")
    assert re.search(r"analyst7\s+applicant\s+company_a\s+disabled", pdao("users", "list").output)
    out = pdao("users", "issue-key", "insurer_a", "--by", "operator1", "--label", "nightly").output
    assert "pdao_" not in out and "claim" in out  # a grant: no key exists until insurer_a claims it
    assert "not_operator" in pdao("users", "issue-key", "insurer_a", "--by", "insurer_b", ok=False).output
    with Session(engine) as s:
        row = s.exec(select(ApiKey)).one()
        assert row.key_sha256 is None and row.prefix is None and f"#{row.id}" in out  # pending, no secret
        operator = s.exec(select(User).where(User.username == "operator1")).one()
        assert row.issued_by == operator.id
    pdao("users", "revoke-key", str(row.id), "--by", "operator1")
    with Session(engine) as s:
        assert s.exec(select(ApiKey)).one().revoked_at is not None


def test_cli_changes_are_audited(pdao, engine):
    from pdao.kernel.audit import AuditEvent

    pdao("users", "create", "analyst9", "--org", "company_b", "--role", "applicant", "--password", "long-enough-1")
    pdao("users", "issue-key", "office1", "--by", "operator1", ok=False)
    with Session(engine) as s:
        events = s.exec(select(AuditEvent).where(AuditEvent.action.like("cli.%")).order_by(AuditEvent.seq)).all()
    got = [(e.action, e.object, e.decision, e.reason, e.auth_method) for e in events]
    assert got[-2:] == [("cli.users.create", "user:analyst9", "allow", None, "cli"),
                        ("cli.users.issue_key", "user:office1", "deny", "api_key_role", "cli")]
    assert all(e.actor.startswith("cli:") for e in events)


@pytest.mark.default_backend("sqlite")
def test_data_verify_finds_an_altered_snapshot(pdao, settings, synth_files):
    pdao("data", "load", "health.chronic_condition", str(synth_files["prod"]["health.chronic_condition"]))
    pdao("data", "load", "health.resident", str(synth_files["prod"]["health.resident"]))
    assert "2 snapshot(s) checked, 0 missing or altered" in pdao("data", "verify").output
    [snap] = (settings.domain_dir / "health.resident" / "prod").glob("v1-*.parquet")
    snap.chmod(0o644)
    data = bytearray(snap.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    snap.write_bytes(bytes(data))
    out = pdao("data", "verify", ok=False).output
    assert re.search(r"ALTERED\s+health\.resident\s+prod v1", out) and re.search(r"OK\s+health\.chronic_condition", out)
    assert "1 missing or altered" in out
    assert "0 missing or altered" in pdao("data", "verify", "health.chronic_condition").output


def test_the_cli_never_records_a_named_user_as_the_actor(pdao, engine, client, auth):
    """Review r2, finding 4: `issue-key … --by operator2` recorded `api_key.granted actor=operator2`,
    `revoke-key … --by insurer_b` recorded `actor=insurer_b`, whoever ran the command. The actor of
    a command's change is the OS user who ran it; --by is a detail (for issue-key the grant's
    operator, who must be one)."""
    import getpass

    me = f"cli:{getpass.getuser()}"
    pdao("users", "create", "operator2", "--org", "operator", "--role", "operator", "--password", "long-enough-1")
    out = pdao("users", "issue-key", "insurer_b", "--by", "operator2", "--label", "never asked for by operator2").output
    key_id = int(re.search(r"#(\d+)", out).group(1))
    pdao("users", "revoke-key", str(key_id), "--by", "insurer_b")
    # what the auditor reads, through the API
    r = client.get("/api/v1/audit/events", params={"order": "desc", "limit": 40}, headers=auth("auditor1"))
    assert r.status_code == 200, r.text
    ours = [e for e in r.json()["items"] if e["object"] in (f"api_key:{key_id}", "user:insurer_b")]
    assert {e["actor"] for e in ours} == {me}, ours
    assert {e["auth_method"] for e in ours} == {"cli"} and {e["role"] for e in ours} == {None}
    by_action = {e["action"]: e for e in ours}
    assert set(by_action) == {"api_key.granted", "api_key.revoked", "cli.users.issue_key", "cli.users.revoke_key"}
    assert by_action["api_key.granted"]["detail"]["issued_by"] == "operator2"
    assert by_action["api_key.revoked"]["detail"]["stated_by"] == "insurer_b"
    with Session(engine) as s:
        row = s.get(ApiKey, key_id)
        operator2 = s.exec(select(User).where(User.username == "operator2")).one()
    assert row.issued_by == operator2.id and row.revoked_by is None   # the grant's operator; nobody's revocation
