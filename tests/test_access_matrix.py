"""Who sees what (issue 14): one table of role × resource × tenant, every list and read endpoint of
every resource, for every persona — two companies' applicants, the office, a reviewer and an auditor
outside the companies and employed by company A, the operator and a provider.

The table (`MATRIX`) is the expectation, written from the documented rules, not from the code:
docs/architecture.md "Where each rule of the house is enforced", rule 5 (who is a tenant is one
predicate, `policies/visibility.tenant_scoped`: an applicant, or anyone in a company), docs/threat-model.md
(a tenant "cannot read the audit log, the alerts, the review queue, other tenants' objects"), the role
table `policies/permissions.csv`, and the rules' docstrings (`sandbox/scenes/service.may_see`,
`sandbox/results/export.may_see` / `cells_visible`, `sandbox/uploads/service.upload_scope`,
`sandbox/budgets/ledger.budget_scope`, `policies/catalog_rules.catalog_scope`).

Each cell of the table is one test case (`pytest.mark.parametrize` over the rows): adding a row or a
persona adds cases. The objects — of company A and of company B: scenes, dev and held prod queries
with their results, template runs, uploads, downloads (exports), API key grants, company budgets —
are built once per module and backend (`world`), over HTTP through the FastAPI TestClient, on a copy
of the suite's `loaded_template` made the way conftest's `database_url` and `settings` make one.

What each expectation means (`VISIBLE`):

- `own`: the persona's own organization's objects only. A list holds its own objects and nothing of
  another organization; another tenant's object answers 404 with exactly the body of a missing one.
- `self`: the persona's own objects as a user (API keys).
- `all`: every tenant's objects (for staff: metadata; cells follow `cells_expected`).
- `department`: a provider sees the scenes that use its department's data, and no other.
- `none`: nothing: lists hold none of the objects, each object answers like a missing one.
- `forbidden`: 403 `role_not_permitted` by role (casbin, `policies/permissions.csv`), or
  `tenant_not_permitted` for anyone employed by a company (`policies/access.REACH`).

Where the product disagrees with the documented rule, the table still says the documented rule and
the case is `xfail(strict=True)`, with the reason in `DISAGREEMENTS`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from pdao.kernel.db import make_engine
from pdao.kernel.errors import PdaoError
from pdao.kernel.identity import passwords
from pdao.kernel.identity import service as identities
from pdao.kernel.identity.models import Organization, User
from tests.conftest import DEMO_PASSWORD, login, make_settings
from tests.scene_helpers import SCENE_ITEMS, VISITS, active_scene, create
from tests.test_queries import work_once
from tests.test_scene_templates import underwriting_items
from tests.test_template_runs import applicants
from tests.test_tenant_uploads import APPLICANTS

API = "/api/v1"
PROHIBITED = "health.notifiable_disease"
BY_DISTRICT_FEES = (f"SELECT district, COUNT(*) AS n, SUM(fee) AS total FROM {VISITS} "
                    "WHERE visit_date >= DATE '2018-01-01' GROUP BY district")


# ---------------------------------------------------------------------------------------------
# The personas


@dataclass(frozen=True)
class Persona:
    username: str
    org: str          # organization code
    role: str


PERSONAS: dict[str, Persona] = {p.username: p for p in (
    Persona("insurer_a", "company_a", "applicant"),    # demo user, applicant of company A
    Persona("insurer_b", "company_b", "applicant"),    # demo user, applicant of company B
    Persona("office1", "office", "office"),            # demo user, the coordination office
    Persona("reviewer1", "office", "reviewer"),        # demo user, export reviewer outside companies
    Persona("reviewer_a", "company_a", "reviewer"),    # company A's own compliance reviewer
    Persona("auditor1", "cac", "auditor"),             # demo user, auditor outside companies
    Persona("auditor_a", "company_a", "auditor"),      # an auditor employed by company A (see `world`)
    Persona("operator1", "operator", "operator"),      # demo user, the operating entity
    Persona("provider1", "ycwjw", "provider"),         # demo user, the health commission (data provider)
)}
COLUMNS = tuple(PERSONAS)
COMPANIES = frozenset({"company_a", "company_b"})    # the organizations of kind `company`


# ---------------------------------------------------------------------------------------------
# THE TABLE: for each endpoint, what each persona must get (columns in the order of COLUMNS).
#
#                                insurer_a insurer_b office1 reviewer1 reviewer_a auditor1 auditor_a operator1 provider1
MATRIX: dict[str, tuple[str, ...]] = {
    # scenes: sandbox/scenes/service.may_see — a tenant its own organization's; a provider those using
    # its department's data; the office, reviewers, auditors and the operator all (casbin: anyone reads)
    "scenes.list":          ("own", "own", "all", "all", "own", "all", "own", "all", "department"),
    "scenes.read":          ("own", "own", "all", "all", "own", "all", "own", "all", "department"),
    "scenes.explain":       ("own", "own", "all", "all", "own", "all", "own", "all", "department"),
    # queries (template runs included): sandbox/results/export.may_see — tenants their own
    # organization's, providers none, the office, reviewers, auditors and the operator metadata
    "queries.list":         ("own", "own", "all", "all", "own", "all", "own", "all", "none"),
    "queries.read":         ("own", "own", "all", "all", "own", "all", "own", "all", "none"),
    "queries.list_scene":   ("own", "own", "all", "all", "own", "all", "own", "all", "none"),
    # results (template runs included), their lineage (with its exports: a tenant its own's) and the
    # export review queue (reviewers only; a reviewer inside a company sees none)
    "results.list":         ("own", "own", "all", "all", "own", "all", "own", "all", "none"),
    "results.read":         ("own", "own", "all", "all", "own", "all", "own", "all", "none"),
    "results.lineage":      ("own", "own", "all", "all", "own", "all", "own", "all", "none"),
    "reviews.queue":        ("forbidden", "forbidden", "forbidden", "all", "none", "forbidden", "forbidden",
                             "forbidden", "forbidden"),
    # exports: a download (applicants, their own organization's answers) makes one; trace names one
    # (the office and auditors: casbin `trace create`; a tenant never reads the audit trail)
    "results.download":     ("own", "own", "forbidden", "forbidden", "forbidden", "forbidden", "forbidden",
                             "forbidden", "forbidden"),
    "trace":                ("forbidden", "forbidden", "all", "forbidden", "forbidden", "all", "forbidden",
                             "forbidden", "forbidden"),
    # uploads: sandbox/uploads/service.upload_scope — anyone tenant-scoped its own company's; the
    # office, reviewers outside companies and auditors metadata of all; providers and operators none
    "uploads.list":         ("own", "own", "all", "all", "own", "all", "own", "none", "none"),
    "uploads.list_by_org":  ("own", "own", "all", "all", "own", "all", "own", "none", "none"),
    "uploads.versions":     ("own", "own", "all", "all", "own", "all", "own", "none", "none"),
    "uploads.versions_org": ("own", "own", "all", "all", "own", "all", "own", "none", "none"),
    # company budgets: casbin `budget read` for the office, auditors and applicants;
    # sandbox/budgets/ledger.budget_scope — anyone in a company its own company's
    "budgets.list":         ("own", "own", "all", "forbidden", "forbidden", "all", "own", "forbidden", "forbidden"),
    "budgets.list_by_org":  ("own", "own", "all", "forbidden", "forbidden", "all", "own", "forbidden", "forbidden"),
    "budgets.read":         ("own", "own", "all", "forbidden", "forbidden", "all", "own", "forbidden", "forbidden"),
    # the audit trail and its alerts: the office and auditors (casbin `audit read`); never a tenant
    "audit.events":         ("forbidden", "forbidden", "all", "forbidden", "forbidden", "all", "forbidden",
                             "forbidden", "forbidden"),
    "audit.alerts":         ("forbidden", "forbidden", "all", "forbidden", "forbidden", "all", "forbidden",
                             "forbidden", "forbidden"),
    "audit.head":           ("forbidden", "forbidden", "all", "forbidden", "forbidden", "all", "forbidden",
                             "forbidden", "forbidden"),
    "audit.verify":         ("forbidden", "forbidden", "all", "forbidden", "forbidden", "all", "forbidden",
                             "forbidden", "forbidden"),
    "audit.export":         ("forbidden", "forbidden", "all", "forbidden", "forbidden", "all", "forbidden",
                             "forbidden", "forbidden"),
    # the catalog: a tenant never sees a prohibited dataset (404 like a missing one); a provider sees
    # its own department's; the office, reviewers, auditors and the operator the whole catalog
    "datasets.list":        ("none", "none", "all", "all", "none", "all", "none", "all", "all"),
    "datasets.read":        ("none", "none", "all", "all", "none", "all", "none", "all", "all"),
    # API keys: the operator every key's metadata; an applicant or a provider their own; nobody else
    "api_keys.list":        ("self", "self", "forbidden", "forbidden", "forbidden", "forbidden", "forbidden",
                             "all", "self"),
    "users.list":           ("forbidden", "forbidden", "forbidden", "forbidden", "forbidden", "forbidden",
                             "forbidden", "all", "forbidden"),
}

# Cases where the product does not do what the table (the documented rule) says: strict xfails.
# (None today. An auditor employed by a company — which `create_user` refuses, the case inserts one —
# read the audit trail and traced exports by role alone until the reach table (policies/access.py)
# made it a tenant's `forbidden`.)
DISAGREEMENTS: dict[tuple[str, str], str] = {}


# ---------------------------------------------------------------------------------------------
# The objects and what an expectation makes visible


@dataclass(frozen=True)
class Obj:
    key: str                       # what goes into the path
    org: str | None                # the owning organization's code
    ident: str = ""                # how a list names it (default: key)
    tags: frozenset[str] = frozenset()
    extra: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def listed_as(self) -> str:
        return self.ident or self.key


VISIBLE: dict[str, Callable[[Persona, Obj], bool]] = {
    "own": lambda p, o: o.org == p.org,
    "self": lambda p, o: o.key == p.username,
    "all": lambda p, o: True,
    "none": lambda p, o: False,
    "department": lambda p, o: "department_data" in o.tags,
}


def cells_expected(p: Persona, o: Obj) -> bool:
    """Who reads a result's cells (README "Export review", `sandbox/results/export.cells_visible`): its
    tenant's applicants their own dev (synthetic) answers; an export reviewer outside companies a prod
    answer held for review (what would go out); nobody else — auditors, the office, anyone in a
    company but applicants, never."""
    if p.role == "applicant":
        return o.org == p.org and "dev" in o.tags
    if p.role == "reviewer" and not in_company(p):
        return "held" in o.tags
    return False


def in_company(p: Persona) -> bool:
    return p.org in COMPANIES


def staff(p: Persona) -> bool:
    """Who reads whole disclosure reports and a held answer's hash (docs/threat-model.md "disclosure
    report", "hash, fingerprint"; `sandbox/results/export.is_staff`): the office, export reviewers and
    auditors — never anyone in a company, nor the operator."""
    return p.role in ("office", "reviewer", "auditor") and not in_company(p)


def expectation(endpoint: str, p: Persona) -> str:
    return MATRIX[endpoint][COLUMNS.index(p.username)]


# ---------------------------------------------------------------------------------------------
# The endpoints


@dataclass(frozen=True)
class Endpoint:
    kind: str                      # list | read | filter | scene_list | once | trace
    path: str                      # formatted with key= and org= of an object
    objects: str = ""              # which of the world's objects
    missing: Obj | None = None     # a read of this answers like a missing object
    items: Callable[[Any], list] = lambda body: body
    item_ident: Callable[[dict], str] = lambda item: str(item["id"])
    item_owner: Callable[[World, dict], Obj | None] = lambda world, item: None
    check: Callable[[World, Persona, str, Obj, Any], None] | None = None   # more checks of a 200 response


def _by_scene(world: World, item: dict) -> Obj | None:
    org = world.scene_org.get(item["scene_id"])
    return None if org is None else Obj(str(item["id"]), org)


def _by_org(world: World, item: dict) -> Obj:
    return Obj(item["org"], item["org"])


def _result_read(world: World, p: Persona, expect: str, o: Obj, r: Any) -> None:
    body = r.json()
    assert body["id"] == int(o.key) and body["scene_id"] in world.scene_org
    want = cells_expected(p, o)
    assert body["cells_visible"] is want and (body["rows"] is not None) is want, (
        f"cells of {o.tags} result {o.key} of {o.org}: expected {'visible' if want else 'hidden'}, "
        f"got cells_visible={body['cells_visible']} rows={'present' if body['rows'] is not None else 'none'}")
    if "held" in o.tags:   # the report's verdicts and the file's hash rest on the held cells: staff only
        report, sha = body["report"] or {}, body["sha256"]
        assert ("checks" in report) is staff(p), f"report of held {o.key} to {p.username}: {report}"
        assert (sha is not None) is staff(p), f"hash of held {o.key} to {p.username}: {sha}"


def _lineage(world: World, p: Persona, expect: str, o: Obj, r: Any) -> None:
    body = r.json()
    assert body["result"]["id"] == int(o.key)
    if "held" in o.tags:
        assert (body["result"]["verdict"] is not None) is staff(p), f"verdict of held {o.key} to {p.username}"
    exports = body["exports"]
    for e in exports:   # a tenant sees its own organization's exports only
        assert VISIBLE[expect](p, Obj(e["export_id"], e["by"]["org"])), f"export {e} shown to {p.username}"
    if "dev" in o.tags:   # every dev result was downloaded by its tenant while the world was built
        assert o.extra["export_id"] in {e["export_id"] for e in exports}, exports


def _download(world: World, p: Persona, expect: str, o: Obj, resp: Any) -> None:
    assert resp.headers["X-Pdao-Export"].startswith("ex-")


def _upload_rows(world: World, p: Persona, expect: str, o: Obj, r: Any) -> None:
    rows = r.json()
    assert rows and {(row["org"], row["name"]) for row in rows} == {(o.org, o.key)}, rows
    # a table name both companies use: its versions as the persona may see them, never another tenant's
    shared = world.client.get(f"{API}/uploads/applicants", headers=world.headers[p.username])
    assert shared.status_code == 200, shared.text
    orgs = {row["org"] for row in shared.json()}
    assert orgs == {c for c in ("company_a", "company_b") if VISIBLE[expect](p, Obj("applicants", c))}, (
        f"/uploads/applicants as {p.username} lists the versions of {orgs}")


def _scene_read(world: World, p: Persona, expect: str, o: Obj, r: Any) -> None:
    body = r.json()
    assert body["id"] == int(o.key)
    # the company's budgets in the scene: to whoever the budgets rows of the table let read them
    budgets = expectation("budgets.read", p)
    want = budgets != "forbidden" and VISIBLE[budgets](p, Obj(o.org, o.org))
    assert (body["company_budgets"] is not None) is want, (
        f"scene {o.key} of {o.org} shows {p.username} the company budgets: {body['company_budgets']}")


def _events(world: World, p: Persona, expect: str, o: Obj, r: Any) -> None:
    body = r.json()
    assert body["items"] and {e["org"] for e in body["items"]} == {o.org}


ENDPOINTS: dict[str, Endpoint] = {
    "scenes.list": Endpoint("list", "/scenes", "scenes", item_owner=lambda w, i: w.scene_obj(i["id"])),
    "scenes.read": Endpoint("read", "/scenes/{key}", "scenes", Obj("987654", None), check=_scene_read),
    "scenes.explain": Endpoint("read", "/scenes/{key}/explain?dataset=health.outpatient_visit&field=district"
                                       "&usage=group_by", "scenes", Obj("987654", None)),
    "queries.list": Endpoint("list", "/queries?limit=500", "queries", item_owner=_by_scene),
    "queries.read": Endpoint("read", "/queries/{key}", "queries", Obj("987654", None)),
    "queries.list_scene": Endpoint("scene_list", "/scenes/{key}/queries?limit=500", "query_scenes",
                                   Obj("987654", None), item_owner=_by_scene),
    "results.list": Endpoint("list", "/results?limit=500", "results", item_owner=_by_scene),
    "results.read": Endpoint("read", "/results/{key}", "results", Obj("987654", None), check=_result_read),
    "results.lineage": Endpoint("read", "/results/{key}/lineage", "results", Obj("987654", None), check=_lineage),
    "reviews.queue": Endpoint("list", "/reviews/queue?limit=500", "held_results", item_owner=_by_scene),
    "results.download": Endpoint("read", "/results/{key}/download", "dev_results", Obj("987654", None),
                                 check=_download),
    "trace": Endpoint("trace", "/trace", "exports"),
    "uploads.list": Endpoint("list", "/uploads", "uploads", items=lambda b: b["items"],
                             item_ident=lambda i: f"{i['org']}/{i['name']}", item_owner=_by_org),
    "uploads.list_by_org": Endpoint("filter", "/uploads?org={key}", "orgs", items=lambda b: b["items"],
                                    item_owner=_by_org),
    "uploads.versions": Endpoint("read", "/uploads/{key}", "uploads_by_name", Obj("no_such_table", None),
                                 check=_upload_rows),
    "uploads.versions_org": Endpoint("read", "/uploads/{key}?org={org}", "uploads",
                                     Obj("no_such_table", "company_b"), check=_upload_rows),
    "budgets.list": Endpoint("list", "/budgets", "budgets", items=lambda b: b["items"],
                             item_ident=lambda i: f"{i['org']}/{i['dataset']}", item_owner=_by_org),
    "budgets.list_by_org": Endpoint("filter", "/budgets?org={key}", "orgs", items=lambda b: b["items"],
                                    item_owner=_by_org),
    "budgets.read": Endpoint("read", f"/budgets/{{key}}/{VISITS}", "budgets", Obj("no_such_org", None)),
    "audit.events": Endpoint("read", "/audit/events?org={key}&limit=5", "orgs", check=_events),
    "audit.alerts": Endpoint("once", "/audit/alerts"),
    "audit.head": Endpoint("once", "/audit/head"),
    "audit.verify": Endpoint("once", "/audit/verify"),
    "audit.export": Endpoint("once", "/audit/export"),
    "datasets.list": Endpoint("list", "/datasets?limit=500", "prohibited", items=lambda b: b["items"],
                              item_ident=lambda i: i["code"]),
    "datasets.read": Endpoint("read", "/datasets/{key}", "prohibited", Obj("health.no_such_dataset", None)),
    "api_keys.list": Endpoint("list", "/api-keys", "api_keys", item_ident=lambda i: i["username"],
                              item_owner=lambda w, i: Obj(i["username"], None)),
    "users.list": Endpoint("list", "/users", "users", item_ident=lambda i: i["username"]),
}


def _table_is_whole() -> None:
    assert set(MATRIX) == set(ENDPOINTS), set(MATRIX) ^ set(ENDPOINTS)
    for name, row in MATRIX.items():
        assert len(row) == len(COLUMNS), name
        assert set(row) <= set(VISIBLE) | {"forbidden"}, name
        ep = ENDPOINTS[name]
        if ep.kind in ("once", "trace") or ep.kind == "read" and ep.missing is None:
            assert set(row) <= {"all", "forbidden"}, f"{name}: only all or forbidden make sense"
    assert set(DISAGREEMENTS) <= {(e, p) for e in MATRIX for p in COLUMNS}


_table_is_whole()


# On PostgreSQL by default: the tenant's column (the organization filters are SQL); the other columns
# repeat the same queries with other principals and run there in `make test-slow`.
ON_POSTGRESQL_BY_DEFAULT = "insurer_a"


def _cases() -> list:
    out = []
    for name, row in MATRIX.items():
        for persona, expect in zip(COLUMNS, row, strict=True):
            reason = DISAGREEMENTS.get((name, persona))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            if persona != ON_POSTGRESQL_BY_DEFAULT:
                marks.append(pytest.mark.default_backend("sqlite"))
            out.append(pytest.param(name, persona, expect, id=f"{name}-{persona}-{expect}", marks=marks))
    return out


# ---------------------------------------------------------------------------------------------
# The world: both companies' objects, built once per module and backend


@dataclass
class World:
    client: TestClient
    headers: dict[str, dict[str, str]]
    objects: dict[str, list[Obj]]
    scene_org: dict[int, str]
    queries_by_scene: dict[int, set[str]]
    scenes: dict[int, Obj]

    def scene_obj(self, scene_id: int) -> Obj | None:
        return self.scenes.get(scene_id)


def _resident_ids(synth_files) -> list[str]:
    return pq.read_table(synth_files["prod"]["health.resident"], columns=["id_number"]).column(0).to_pylist()


def _scene_items() -> list[dict]:
    seen, items = set(), []
    for i in SCENE_ITEMS + underwriting_items():
        k = (i["dataset"], i["field"], i["usage"])
        if k not in seen:
            seen.add(k)
            items.append(i)
    return items


def _add_users(engine) -> None:
    with Session(engine) as s:
        identities.create_user(s, "reviewer_a", DEMO_PASSWORD, "company_a", "reviewer")
        # ROLE_ORG_KINDS lets no auditor into a company (test_an_auditor_cannot_be_employed_by_a_company);
        # the matrix asks what such a user would see if one existed, so it is inserted directly
        org = s.exec(select(Organization).where(Organization.code == "company_a")).one()
        s.add(User(username="auditor_a", display_name="auditor_a", org_id=org.id, role="auditor",
                   password_hash=passwords.hash_password(DEMO_PASSWORD)))
        s.commit()


def _ok(r, status: int = 200) -> Any:
    assert r.status_code == status, f"{r.request.method} {r.request.url}: {r.status_code} {r.text}"
    return r.json()


def _build(client: TestClient, engine, settings, synth_files) -> World:
    from sandbox.engine.store import load_version

    with Session(engine) as s:   # what the underwriting template reads (the visits are in the template)
        for code in ("health.resident", "health.chronic_condition", "health.inpatient_stay"):
            load_version(s, settings, code, synth_files["prod"][code], env="prod", source="synth")
    _add_users(engine)
    h = {u: login(client, u) for u in PERSONAS}
    others: dict[str, dict[str, str]] = {}

    def auth(username: str) -> dict[str, str]:   # scene_helpers' `auth`: office2 approves too
        if username not in h and username not in others:
            others[username] = login(client, username)
        return h.get(username) or others[username]

    ids = _resident_ids(synth_files)

    objects: dict[str, list[Obj]] = {k: [] for k in (
        "scenes", "query_scenes", "queries", "results", "held_results", "dev_results", "exports", "uploads",
        "uploads_by_name", "budgets", "api_keys")}
    scene_org: dict[int, str] = {}
    queries_by_scene: dict[int, set[str]] = {}
    prod_queries: list[tuple[str, int, str]] = []
    for n, (user, org) in enumerate((("insurer_a", "company_a"), ("insurer_b", "company_b"))):
        # uploads: a table of the same name in both companies, and one of each company's own
        for name in ("applicants", f"applicants_{org[-1]}"):
            schema = json.dumps({**APPLICANTS, "name": name})
            r = client.post(f"{API}/uploads", headers=h[user], data={"schema": schema},
                            files={"file": (f"{name}.csv", applicants(ids[n * 20:n * 20 + 15]), "text/csv")})
            _ok(r, 201)
            objects["uploads"].append(Obj(name, org, f"{org}/{name}"))
        objects["uploads_by_name"].append(Obj(f"applicants_{org[-1]}", org))
        # an active scene using the health commission's data, with the underwriting template
        scene = active_scene(client, auth, applicant=user, title=f"matrix {org}", scene_type="underwriting",
                             items=_scene_items(), templates=[{"library": "underwriting"}])
        sid = scene["id"]
        scene_org[sid] = org
        objects["scenes"].append(Obj(str(sid), org, tags=frozenset({"department_data"})))
        objects["query_scenes"].append(Obj(str(sid), org))
        # a dev query, answered at once on the twin
        q = _ok(client.post(f"{API}/scenes/{sid}/queries", headers=h[user],
                            json={"sql": BY_DISTRICT_FEES, "mode": "dev", "epsilon": 0.5}), 202)
        assert q["status"] == "done" and q["result_id"], q
        objects["queries"].append(Obj(str(q["id"]), org, tags=frozenset({"dev"})))
        queries_by_scene.setdefault(sid, set()).add(str(q["id"]))
        # its export: a download of the dev answer
        dl = client.get(f"{API}/results/{q['result_id']}/download", headers=h[user])
        assert dl.status_code == 200, dl.text
        export_id = dl.headers["X-Pdao-Export"]
        objects["dev_results"].append(Obj(str(q["result_id"]), org, tags=frozenset({"dev"})))
        objects["results"].append(Obj(str(q["result_id"]), org, tags=frozenset({"dev"}),
                                      extra={"export_id": export_id}))
        objects["exports"].append(Obj(export_id, org, extra={"file": dl.content, "result_id": q["result_id"]}))
        # a prod template run on the tenant's own upload, held for export review
        t = _ok(client.post(f"{API}/scenes/{sid}/templates/underwriting/runs", headers=h[user],
                            json={"upload": "applicants", "params": {}}), 201)
        assert t["status"] == "held" and t["kind"] == "template", t
        objects["queries"].append(Obj(str(t["id"]), org, tags=frozenset({"template"})))
        queries_by_scene[sid].add(str(t["id"]))
        for key in ("results", "held_results"):
            objects[key].append(Obj(str(t["result_id"]), org, tags=frozenset({"held", "template"})))
        # a prod query, run by the worker below and held for export review
        q = _ok(client.post(f"{API}/scenes/{sid}/queries", headers=h[user],
                            json={"sql": BY_DISTRICT_FEES, "mode": "prod", "epsilon": 0.5}), 202)
        prod_queries.append((user, q["id"], org))
        queries_by_scene[sid].add(str(q["id"]))
        objects["budgets"].append(Obj(org, org, f"{org}/{VISITS}"))
    # a draft of company B on another department's data (医保局): not the health commission's business
    draft = create(client, h["insurer_b"], title="matrix draft on settlements", scene_type="underwriting",
                   items=[{"dataset": "health.insurance_settlement", "field": "insurance_type", "usage": "group_by"}])
    scene_org[draft["id"]] = "company_b"
    objects["scenes"].append(Obj(str(draft["id"]), "company_b"))

    while work_once(engine, settings):
        pass
    for user, qid, org in prod_queries:
        q = _ok(client.get(f"{API}/queries/{qid}", headers=h[user]))
        assert q["status"] == "held" and q["result_id"], q
        objects["queries"].append(Obj(str(qid), org, tags=frozenset({"prod"})))
        for key in ("results", "held_results"):
            objects[key].append(Obj(str(q["result_id"]), org, tags=frozenset({"held", "prod"})))

    for user in ("insurer_a", "insurer_b", "provider1"):   # API key grants (pending: never claimed)
        _ok(client.post(f"{API}/api-keys", headers=h["operator1"], json={"username": user, "label": "matrix"}), 201)
        objects["api_keys"].append(Obj(user, PERSONAS[user].org))
    objects["users"] = [Obj("insurer_a", "company_a"), Obj("insurer_b", "company_b")]
    objects["orgs"] = [Obj("company_a", "company_a"), Obj("company_b", "company_b")]
    objects["prohibited"] = [Obj(PROHIBITED, None)]
    scenes = {int(o.key): o for o in objects["scenes"]}
    return World(client, h, objects, scene_org, queries_by_scene, scenes)


@pytest.fixture(scope="module")
def world(loaded_template, synth_files, tmp_path_factory) -> Iterator[World]:
    """The objects of both companies, built once per backend on a copy of the loaded template (the
    database as `database_url` copies it, the home as `settings` does)."""
    from api.app import create_app
    from tests import conftest

    kind, template, home = loaded_template
    work = tmp_path_factory.mktemp(f"matrix-{kind}")
    pg_name = None
    if kind == "sqlite":
        db = work / "pdao.db"
        shutil.copyfile(template, db)
        url = f"sqlite:///{db}"
    else:
        pg_name = conftest._pg_copies[template].take()
        url = conftest._pg_url(pg_name)
    settings = make_settings(work / "home", url)
    shutil.copytree(home, settings.home, symlinks=True)
    settings.ensure_home()
    app = create_app(settings)
    engine = make_engine(url)
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            yield _build(client, engine, settings, synth_files)
    finally:
        engine.dispose()
        app.state.engine.dispose()
        if pg_name is not None:
            conftest._pg_copies[template].drop(pg_name)


# ---------------------------------------------------------------------------------------------
# The cases


def _body(r) -> Any:
    try:
        return r.json()
    except ValueError:
        return r.text


def _like_missing(ep_name: str, p: Persona, o: Obj, got, missing, missing_obj: Obj) -> None:
    """`got` (another tenant's object, or one hidden from the persona) answers exactly as a missing one."""
    def norm(body: Any, key: str) -> str:
        text = json.dumps(body, ensure_ascii=False, sort_keys=True)
        return text if key.isdigit() else text.replace(key, "<key>")

    assert got.status_code == 404, (f"{ep_name} as {p.username}: {o.org}'s {o.key} must answer 404 like a "
                                    f"missing one, got {got.status_code} {got.text[:300]}")
    assert missing.status_code == 404, f"{ep_name}: the missing {missing_obj.key} answered {missing.status_code}"
    assert norm(_body(got), o.key) == norm(_body(missing), missing_obj.key), (
        f"{ep_name} as {p.username}: {o.org}'s {o.key} answers {got.text} but a missing one {missing.text}")


def _path(ep: Endpoint, o: Obj | None = None) -> str:
    return API + (ep.path if o is None else ep.path.format(key=o.key, org=o.org))


@pytest.mark.parametrize(("endpoint", "persona", "expect"), _cases())
def test_access(world: World, endpoint: str, persona: str, expect: str) -> None:
    ep, p = ENDPOINTS[endpoint], PERSONAS[persona]
    client, h = world.client, world.headers[persona]
    objs = world.objects.get(ep.objects, [])
    where = f"{endpoint} as {persona} (expected {expect})"

    if expect == "forbidden":
        targets = [None] if ep.kind in ("list", "once") else objs
        for o in targets:
            path = _path(ep, None if ep.kind == "trace" else o)
            if ep.kind == "trace":
                r = client.post(path, headers=h, files={"file": ("found.csv", o.extra["file"], "text/csv")})
            else:
                r = client.get(path, headers=h)
            assert r.status_code == 403, f"{where}: GET {path} answered {r.status_code} {r.text[:300]}"
            # by the role table, or (anyone employed by a company) by the reach table
            assert r.json()["code"] in ("role_not_permitted", "tenant_not_permitted"), f"{where}: {r.text}"
        return

    visible = VISIBLE[expect]
    if ep.kind == "once":
        r = client.get(_path(ep), headers=h)
        assert r.status_code == 200, f"{where}: {r.status_code} {r.text[:300]}"
        return

    if ep.kind == "trace":
        for o in objs:
            r = client.post(_path(ep), headers=h, files={"file": ("found.csv", o.extra["file"], "text/csv")})
            assert r.status_code == 200, f"{where}: {r.status_code} {r.text[:300]}"
            t = r.json()
            assert t["matched"] and t["export_id"] == o.key and t["result_id"] == o.extra["result_id"], f"{where}: {t}"
        return

    if ep.kind == "list":
        r = client.get(_path(ep), headers=h)
        assert r.status_code == 200, f"{where}: {r.status_code} {r.text[:300]}"
        items = ep.items(r.json())
        listed = {ep.item_ident(i) for i in items}
        for o in objs:
            if visible(p, o):
                assert o.listed_as in listed, f"{where}: {o.org}'s {o.listed_as} is missing from the list"
            else:
                assert o.listed_as not in listed, f"{where}: {o.org}'s {o.listed_as} is listed"
        for i in items:
            owner = ep.item_owner(world, i)
            if owner is not None:
                assert visible(p, owner), f"{where}: lists {ep.item_ident(i)} of {owner.org}"
        return

    if ep.kind == "filter":   # a list filtered by organization: another's filter lists nothing
        for o in objs:
            r = client.get(_path(ep, o), headers=h)
            assert r.status_code == 200, f"{where}: {r.status_code} {r.text[:300]}"
            items = ep.items(r.json())
            if visible(p, o):
                assert items and all(ep.item_owner(world, i).org == o.org for i in items), f"{where}: {o.key}: {items}"
            else:
                assert items == [], f"{where}: filtered on {o.key}, lists {items}"
        return

    missing_obj = ep.missing
    missing = client.get(_path(ep, missing_obj), headers=h) if missing_obj is not None else None
    for o in objs:
        r = client.get(_path(ep, o), headers=h)
        if ep.kind == "scene_list" and not visible(p, o) and expect == "none":
            # the scene is the persona's to see (a provider: its department's data), its queries are not
            assert r.status_code == 200 and r.json() == [], f"{where}: scene {o.key}: {r.status_code} {r.text[:300]}"
        elif visible(p, o):
            assert r.status_code == 200, f"{where}: {o.org}'s {o.key}: {r.status_code} {r.text[:300]}"
            if ep.kind == "scene_list":
                got = {str(q["id"]) for q in r.json()}
                assert got == world.queries_by_scene[int(o.key)], f"{where}: scene {o.key} lists {got}"
            elif ep.check is not None:
                ep.check(world, p, expect, o, r)
        else:
            _like_missing(endpoint, p, o, r, missing, missing_obj)


def test_an_auditor_cannot_be_employed_by_a_company(engine):
    """The guard that keeps the `auditor_a` rows of the table latent: auditors sit in regulators."""
    with Session(engine) as s:
        with pytest.raises(PdaoError) as e:
            identities.create_user(s, "auditor_x", DEMO_PASSWORD, "company_a", "auditor")
        assert e.value.code == "role_org_mismatch"


def test_the_reach_table_agrees_with_the_role_table():
    """`policies/access.REACH` and casbin's permissions never disagree for a role outside companies:
    a role the role table lets read a resource reaches something of it (`forbidden` is only ever a
    tenant's), and a role it refuses is `forbidden` in the reach table too — so what callers see is
    what the table says (review r7)."""
    from pdao.kernel.identity.models import Role
    from policies.access import FORBIDDEN, REACH
    from policies.enforcer import role_may

    read_action = {"audit": "read", "trace": "create"}
    for resource, row in REACH.items():
        for role in Role:
            if role is Role.applicant:       # always tenant-scoped: the `tenant` column
                continue
            allowed = role_may(role.value, resource, read_action.get(resource, "read"))
            assert allowed == (row[role.value] is not FORBIDDEN), (resource, role.value, row[role.value], allowed)


def test_the_console_offers_an_auditor_employed_by_a_company_no_audit_pages():
    """The console's navigation follows the reach table too (review r7: it still linked such a
    caller to pages that answer 403)."""
    from types import SimpleNamespace

    from api.console.render import NAV, _shown
    from pdao.kernel.identity.models import Role

    def paths(org_kind: str) -> set[str]:
        who = SimpleNamespace(role=Role.auditor, org_kind=org_kind)
        return {entry[1] for entry in NAV if _shown(who, entry)}

    assert {"/audit", "/audit/alerts", "/trace"} <= paths("regulator")
    assert not {"/audit", "/audit/alerts", "/trace"} & paths("company")
