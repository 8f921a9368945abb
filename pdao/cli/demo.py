"""Setting up a home: migrate, import the catalog, synthesize data, create the demo identities."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from catalog.descriptor import PACKAGED_DESCRIPTORS, OrganizationSpec, OrgKind, Text
from catalog.models import Dataset, DatasetVersion
from catalog.service import ImportReport, import_descriptors, upsert_organization
from pdao.kernel.config import Settings
from pdao.kernel.db import make_engine, migrate, session_scope
from pdao.kernel.identity import service as identities
from pdao.kernel.identity.models import User

DEMO_COMPANIES = (
    OrganizationSpec(code="company_a", name=Text(zh="甲保险公司", en="Insurance Company A"), kind=OrgKind.company),
    OrganizationSpec(code="company_b", name=Text(zh="乙保险公司", en="Insurance Company B"), kind=OrgKind.company),
)

# (username, organization code, role) as API.md lists them.
DEMO_USERS = (
    ("provider1", "ycwjw", "provider"),
    ("office1", "office", "office"),
    ("office2", "office", "office"),
    ("reviewer1", "office", "reviewer"),
    ("auditor1", "cac", "auditor"),
    ("operator1", "operator", "operator"),
    ("insurer_a", "company_a", "applicant"),
    ("insurer_b", "company_b", "applicant"),
)

DEFAULT_SCALE = 200_000  # outpatient visit rows: a few seconds on 2 cores
DEFAULT_SEED = 20240113  # the date of 银政办发〔2024〕3 号


def prepare_home(settings: Settings) -> Engine:
    settings.ensure_home()
    migrate(settings.database_url)
    return make_engine(settings.database_url)


def import_catalog(engine: Engine, paths: list[Path] | None = None) -> ImportReport:
    with session_scope(engine) as session:
        return import_descriptors(session, paths or [PACKAGED_DESCRIPTORS])


@dataclass
class SynthReport:
    loaded: list[tuple[str, str, int, int]]  # (code, env, version number, rows)


def synthesize(engine: Engine, settings: Settings, scale: int, seed: int, twin: bool = True,
               only: set[tuple[str, str]] | None = None) -> SynthReport:
    """Generate the synthetic health data and load it as versions: env prod (the stand-in for the
    real data) and, with `twin`, the disjoint twin as env dev. `only` limits the loads to these
    (code, env) pairs."""
    from sandbox.engine.store import load_version
    from sandbox.synth import generate

    settings.ensure_home()
    loaded = []
    for env, is_twin in (("prod", False), ("dev", True)) if twin else (("prod", False),):
        if only is not None and not any(e == env for _, e in only):
            continue
        work = Path(tempfile.mkdtemp(prefix=f"synth-{env}-", dir=settings.staging_dir))
        try:
            files = generate(work, scale=scale, seed=seed, twin=is_twin)
            for code, path in sorted(files.items()):
                if only is not None and (code, env) not in only:
                    continue
                with session_scope(engine) as session:
                    version, report = load_version(session, settings, code, path, env=env, source="synth",
                                                   note=f"pdao synth --scale {scale} --seed {seed}")
                    loaded.append((code, env, version.number, report.row_count))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return SynthReport(loaded)


def missing_synthetic(engine: Engine) -> set[tuple[str, str]]:
    """(code, env) pairs of the synthetic datasets that have no version yet: after a run that
    stopped half-way, the next one loads just these."""
    from sandbox.synth import DATASET_CODES

    with Session(engine) as session:
        have = set(session.exec(select(Dataset.code, DatasetVersion.env)
                                .join(DatasetVersion, DatasetVersion.dataset_id == Dataset.id)).all())
    return {(c, e) for c in DATASET_CODES for e in ("prod", "dev")} - have


def ensure_demo_identities(engine: Engine, settings: Settings) -> list[str]:
    """Create the demo companies and users (idempotent). Answers the usernames created."""
    created = []
    with session_scope(engine) as session:
        for spec in DEMO_COMPANIES:
            upsert_organization(session, spec)
        session.flush()
        for username, org, role in DEMO_USERS:
            if session.exec(select(User).where(User.username == username)).first() is None:
                identities.create_user(session, username, settings.demo_password, org, role)
                created.append(username)
    return created


DEMO_SCENE_TITLE = "门诊费用统计（演示） / Outpatient fees (demo)"


def ensure_demo_scene(engine: Engine, settings: Settings) -> int:
    """An active scene for insurer_a, approved by office1 and office2, so queries can be tried at once
    (`pdao.client` or POST /scenes/{id}/queries). Idempotent: answers the scene's id."""
    from datetime import timedelta

    from pdao.kernel.db import utcnow
    from sandbox.scenes import service as scenes
    from sandbox.scenes.models import Scene
    from sandbox.scenes.schemas import ReviewIn, SceneIn
    from sandbox.scenes.states import today_in_city

    with session_scope(engine) as session:
        existing = session.exec(select(Scene).where(Scene.title == DEMO_SCENE_TITLE)).first()
        if existing is not None:
            return existing.id
        applicant = identities.principal_for(session, "insurer_a")
        today = today_in_city(utcnow())
        ov = "health.outpatient_visit"
        app = SceneIn(
            title=DEMO_SCENE_TITLE, scene_type="other",
            purpose="演示：按区县、科室和月份统计门诊人次与费用，用于险种定价研究 / demo: visits and fees by district, "
                    "department and month for product pricing",
            legal_basis="演示场景，仅使用合成数据 / demo scene on synthetic data",
            emergency_plan="发现异常立即暂停场景并报告协调办 / suspend the scene and notify the office",
            valid_from=today, valid_to=today + timedelta(days=180), budget_epsilon=10.0, budget_delta=0.0,
            max_query_epsilon=1.0, max_contributions=10,
            items=[{"dataset": ov, "field": f, "usage": u} for f, u in (
                ("district", "group_by"), ("district", "filter"), ("department", "group_by"),
                ("department", "filter"), ("visit_date", "group_by"), ("visit_date", "filter"),
                ("fee", "aggregate"), ("person_id", "aggregate"), ("icd10_chapter", "filter"))])
        scene = scenes.create(session, settings, applicant, app)
        scenes.submit(session, settings, applicant, scene)
        for who in ("office1", "office2"):
            scenes.review(session, settings, identities.principal_for(session, who), scene,
                          ReviewIn(decision="approve", comment="演示场景 / demo"))
        return scene.id


def run_demo(settings: Settings, scale: int = DEFAULT_SCALE, seed: int = DEFAULT_SEED, echo=print) -> None:  # noqa: ANN001
    echo(f"pdao home: {settings.home}")
    engine = prepare_home(settings)
    echo("metadata database migrated")
    report = import_catalog(engine)
    echo(f"catalog imported: {len(report.datasets)} datasets, {len(report.organizations)} organizations")
    created = ensure_demo_identities(engine, settings)
    echo(f"demo identities: {len(created)} created, {len(DEMO_USERS) - len(created)} already there")
    missing = missing_synthetic(engine)
    if not missing:
        echo("synthetic data already loaded (delete the home to start over)")
    else:
        echo(f"generating synthetic health data: scale {scale:,} visits, seed {seed} (and its dev twin) ...")
        for code, env, number, rows in synthesize(engine, settings, scale, seed, only=missing).loaded:
            echo(f"  {code:<30} {env:<4} v{number}  {rows:>10,} rows")
    scene_id = ensure_demo_scene(engine, settings)
    echo(f"demo scene {scene_id} is active for insurer_a: try POST /api/v1/scenes/{scene_id}/queries")
    for path in write_demo_uploads(engine, settings):
        echo(f"insurer_a's own sample table for the underwriting / claims flows: {path}")
    engine.dispose()


def write_demo_uploads(engine: Engine, settings: Settings, n: int = 200) -> list[Path]:
    """Sample files an insurer would upload (README: underwriting and claims flows): applicants and
    claims made from people and stays of the synthetic prod data, so the templates find them,
    with a few consents missing or expired. Written under PDAO_HOME/demo; not uploaded."""
    import csv
    from datetime import timedelta

    import pyarrow.parquet as pq

    from pdao.kernel.db import utcnow
    from sandbox.engine.store import snapshot_path
    from sandbox.scenes.states import today_in_city

    def snapshot(code: str) -> Path | None:
        with Session(engine) as session:
            v = session.exec(select(DatasetVersion).join(Dataset, Dataset.id == DatasetVersion.dataset_id)
                             .where(Dataset.code == code, DatasetVersion.env == "prod")
                             .order_by(DatasetVersion.number.desc())).first()
        return None if v is None else snapshot_path(settings, v)

    residents, stays, settled = (snapshot(c) for c in ("health.resident", "health.inpatient_stay",
                                                         "health.insurance_settlement"))
    if residents is None or stays is None or settled is None:
        return []
    folder = settings.home / "demo"
    folder.mkdir(parents=True, exist_ok=True)
    today = today_in_city(utcnow())
    signed, until, expired = (today - timedelta(days=60)).isoformat(), (today + timedelta(days=300)).isoformat(), \
        (today - timedelta(days=1)).isoformat()
    ids = dict(zip(*pq.read_table(residents, columns=["person_id", "id_number"]).to_pydict().values()))

    def consent(i: int) -> dict[str, str]:   # every 10th without consent, every 10th (+5) expired
        return {"consent_ref": "" if i % 10 == 9 else f"SQ-{i:05d}", "consent_signed_on": signed,
                "consent_valid_until": expired if i % 10 == 4 else until}

    people = list(ids.values())[:n]
    applicants = [{"applicant_ref": f"TB{i:05d}", "id_number": x, **consent(i)} for i, x in enumerate(people)]
    amounts = {k: v for k, v in zip(*pq.read_table(settled, columns=["stay_id", "total_amount"]).to_pydict().values())
               if k is not None}
    claims = []
    for i, st in enumerate(pq.read_table(stays, columns=["stay_id", "person_id", "hospital", "admit_date",
                                                          "discharge_date"]).to_pylist()[:n]):
        amount = float(amounts.get(st["stay_id"], 1000)) * (1.5 if i % 7 == 3 else 1.0)   # a few claims ask too much
        claims.append({"claim_ref": f"LP{i:05d}", "id_number": ids[st["person_id"]], "hospital": st["hospital"],
                       "admit_date": st["admit_date"].isoformat(), "discharge_date": st["discharge_date"].isoformat(),
                       "amount": f"{amount:.2f}", **consent(i)})
    out = []
    for name, rows in (("applicants.csv", applicants), ("claims.csv", claims)):
        path = folder / name
        with path.open("w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
            w.writeheader()
            w.writerows(rows)
        out.append(path)
    return out
