"""Shared fixtures: every test that touches the metadata database runs on SQLite and on PostgreSQL
(a case marked `default_backend(...)` on one of them in `make test`, on the other in `make test-slow`).

A migrated template (schema + packaged catalog + demo identities) is built once per backend and
copied for each test: a file copy on SQLite, `CREATE DATABASE … TEMPLATE` on PostgreSQL.
Without a PostgreSQL server the PostgreSQL half is skipped with a clear reason, except under CI
(CI=true), where it fails. A test that uses `loaded` gets a copy of a second template in which the
visits were loaded once (`loaded_template`).
"""

from __future__ import annotations

import itertools
import os
import queue
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from fastapi.testclient import TestClient

from pdao.kernel.config import Settings
from pdao.kernel.db import make_engine
from pdao.kernel.identity import passwords

PG_ADMIN_URL = os.environ.get("PDAO_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
DEMO_PASSWORD = "pdao-demo"
_counter = itertools.count()


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers", "default_backend(name): in the default run the case runs on that backend only; on the other "
                   "backend it is marked slow (`make test-slow` runs it). Say in a comment which tests cover "
                   "the same path on the other backend.")
    config.addinivalue_line(
        "markers", "ahead(fn, *args): start fn(*args) in a second process when the run starts; the test takes "
                   "the answer with ahead(fn, *args) (the same call, made in the test's process if not started).")


# --- work started ahead: a long, pure computation of a selected test runs in a second process
# while the other tests run (the machine has more cores than the one a test run uses).

_AHEAD: dict[tuple, object] = {}
_ahead_pool = None


def _ahead_key(fn, args: tuple) -> tuple:
    return fn.__module__, fn.__qualname__, repr(args)


def pytest_collection_finish(session) -> None:
    global _ahead_pool
    if session.config.option.collectonly:
        return
    jobs = [m.args for item in session.items for m in item.iter_markers("ahead")]
    if not jobs:
        return
    import concurrent.futures
    import multiprocessing

    _ahead_pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    for fn, *args in jobs:
        key = _ahead_key(fn, tuple(args))
        if key not in _AHEAD:
            _AHEAD[key] = _ahead_pool.submit(fn, *args)


def pytest_sessionfinish(session) -> None:
    if _ahead_pool is not None:   # a run stopped early (-x, Ctrl-C) does not wait for unused work
        for proc in list((getattr(_ahead_pool, "_processes", None) or {}).values()):
            proc.terminate()
        _ahead_pool.shutdown(wait=False, cancel_futures=True)


def ahead(fn, *args):
    """fn(*args): the answer of the second process if an `ahead` mark started the same call, else
    computed here."""
    future = _AHEAD.pop(_ahead_key(fn, args), None)
    return fn(*args) if future is None else future.result()


@pytest.hookimpl(tryfirst=True)   # before -m 'not slow' deselects
def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        mark = item.get_closest_marker("default_backend")
        callspec = getattr(item, "callspec", None)
        if mark is None or callspec is None or "backend" not in callspec.params:
            continue
        if callspec.params["backend"] != mark.args[0]:
            item.add_marker(pytest.mark.slow)


def first_also_on_postgresql(cases: list) -> list:
    """Cases for parametrize that repeat one code path with other values (e.g. one role check per
    role): all run on SQLite, the first on PostgreSQL too; the rest run on PostgreSQL in
    `make test-slow`."""
    return [c if i == 0 else pytest.param(*(c if isinstance(c, tuple) else (c,)),
                                          marks=pytest.mark.default_backend("sqlite"))
            for i, c in enumerate(cases)]


PRODUCTION_HASHER = passwords._hasher


@pytest.fixture(scope="session", autouse=True)
def cheap_password_hashes() -> Iterator[None]:
    """Argon2id (the same library, algorithm and code path) at its minimum cost parameters.

    At the production parameters (m=64 MiB, t=3, p=4) a hash or a check costs ~0.35 s here, and
    nearly every test logs in, several users at a time. A check reads its cost from the stored hash, so the
    template's demo users and every user a test creates are checked at the same cheap cost, and an
    unknown username still costs the same as a wrong password (dummy_hash is cheap too).
    `production_password_hashing` puts the production parameters back for one test.
    """
    from pwdlib import PasswordHash
    from pwdlib.hashers.argon2 import Argon2Hasher

    cheap = PasswordHash((Argon2Hasher(time_cost=1, memory_cost=8, parallelism=1),))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(passwords, "_hasher", lambda: cheap)
        passwords.dummy_hash.cache_clear()
        yield
    passwords.dummy_hash.cache_clear()


@pytest.fixture
def production_password_hashing(monkeypatch) -> Iterator[None]:
    """The production Argon2id parameters for this test (hashes made during it are slow to check)."""
    monkeypatch.setattr(passwords, "_hasher", PRODUCTION_HASHER)
    passwords.dummy_hash.cache_clear()
    yield
    passwords.dummy_hash.cache_clear()


def _pg_available() -> str | None:
    try:
        with psycopg.connect(PG_ADMIN_URL, connect_timeout=3):
            return None
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}".splitlines()[0]


def _pg_url(dbname: str) -> str:
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    return f"postgresql+psycopg://{base.split('://', 1)[1]}/{dbname}"


def _pg_admin(sql: str) -> None:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql)


class _PgCopies:
    """Fresh copies of the PostgreSQL template, made ahead of need by one background thread.

    `CREATE DATABASE … TEMPLATE` takes 0.1-0.6 s here (it copies and fsyncs the whole database,
    system catalogs included), longer than many tests. The thread keeps `depth` copies ready and drops
    the used ones, so a test still gets a database nobody has touched, just without waiting for it.
    The copies commit without waiting for the WAL flush (synchronous_commit = off): what a commit
    makes visible, and every lock, are the same; only a crash of the server could lose the last
    commits, and a test's database does not outlive the test.
    """

    def __init__(self, template: str, depth: int = 2) -> None:
        self.template = template
        self.jobs: queue.Queue[str | None] = queue.Queue()      # "" = make one; a name = drop it
        self.ready: queue.Queue[str | BaseException] = queue.Queue()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True, name="pdao-test-pg-copies")
        for _ in range(depth):
            self.jobs.put("")
        self.thread.start()

    def _run(self) -> None:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            while (job := self.jobs.get()) is not None:
                try:
                    if job:
                        conn.execute(f"DROP DATABASE IF EXISTS {job} WITH (FORCE)")
                    else:
                        name = f"pdao_t_{os.getpid()}_{next(_counter)}"
                        conn.execute(f"CREATE DATABASE {name} TEMPLATE {self.template}")
                        conn.execute(f"ALTER DATABASE {name} SET synchronous_commit = off")
                        self.ready.put(name)
                except BaseException as e:  # noqa: BLE001 - handed to the test that waits
                    (self.errors.append if job else self.ready.put)(e)

    def take(self) -> str:
        if self.errors:
            raise self.errors.pop()
        self.jobs.put("")   # the next one
        got = self.ready.get(timeout=300)
        if isinstance(got, BaseException):
            raise got
        return got

    def drop(self, name: str) -> None:
        self.jobs.put(name)

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join(300)
        while not self.ready.empty():
            got = self.ready.get_nowait()
            if isinstance(got, str):
                _pg_admin(f"DROP DATABASE IF EXISTS {got} WITH (FORCE)")


_pg_copies: dict[str, _PgCopies] = {}


def _build_template(settings: Settings) -> None:
    from pdao.cli.demo import ensure_demo_identities, import_catalog, prepare_home

    engine = prepare_home(settings)
    import_catalog(engine)
    ensure_demo_identities(engine, settings)
    engine.dispose()


def make_settings(home: Path, url: str, **kw) -> Settings:
    # Prod runs' timing classes are off in the suite (they pad a run to a whole class: seconds per run);
    # tests/test_outcomes.py turns them on where they are the point.
    kw.setdefault("prod_timing_base_seconds", 0.0)
    # The per-organization rate (60 a minute) is its own tests' subject (tests/test_outcomes.py); tests
    # that submit many queries in one minute are about something else.
    kw.setdefault("query_rate_per_minute", 10_000)
    kw.setdefault("read_rows_per_minute", 100_000_000)
    return Settings(home=home, database_url=url, demo_password=DEMO_PASSWORD, secret_key_override="test-signing-key-of-at-least-32-bytes",
                    **kw)


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def backend(request, tmp_path_factory) -> Iterator[tuple[str, str]]:
    """(backend name, template locator): a SQLite file path, or a PostgreSQL template database."""
    if request.param == "sqlite":
        work = tmp_path_factory.mktemp("tpl-sqlite")
        db = work / "template.db"
        _build_template(make_settings(work / "home", f"sqlite:///{db}"))
        yield "sqlite", str(db)
        return
    reason = _pg_available()
    if reason is not None:
        msg = f"PostgreSQL not reachable at {PG_ADMIN_URL} ({reason})"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{msg}; under CI the PostgreSQL half of the suite must run", pytrace=False)
        pytest.skip(f"{msg}; the PostgreSQL half of the suite is skipped (set PDAO_TEST_PG_URL)")
    name = f"pdao_tpl_{os.getpid()}"
    _pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    _pg_admin(f"CREATE DATABASE {name}")
    _build_template(make_settings(tmp_path_factory.mktemp("tpl-pg") / "home", _pg_url(name)))
    _pg_copies[name] = _PgCopies(name)
    yield "postgresql", name
    _pg_copies.pop(name).close()
    _pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_url(request, tmp_path):
    """An empty database (no schema) on each backend, for migration tests."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
        return
    reason = _pg_available()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL not reachable: {reason}", pytrace=False)
        pytest.skip(f"PostgreSQL not reachable: {reason}")
    name = f"pdao_mig_{os.getpid()}_{next(_counter)}"
    _pg_admin(f"CREATE DATABASE {name}")
    yield _pg_url(name)
    _pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def database_url(request, backend, tmp_path) -> Iterator[str]:
    """A fresh copy of the template for this test (of the loaded template if the test uses `loaded`)."""
    kind, template = backend
    if "loaded" in request.fixturenames:
        kind, template, _home = request.getfixturevalue("loaded_template")
    if kind == "sqlite":
        db = tmp_path / "pdao.db"
        shutil.copyfile(template, db)
        yield f"sqlite:///{db}"
        return
    copies = _pg_copies[template]
    name = copies.take()
    yield _pg_url(name)
    copies.drop(name)


@pytest.fixture
def settings(request, database_url, tmp_path) -> Settings:
    s = make_settings(tmp_path / "home", database_url)
    if "loaded" in request.fixturenames:   # the snapshots the loaded template's versions name
        shutil.copytree(request.getfixturevalue("loaded_template")[2], s.home, symlinks=True)
    s.ensure_home()
    return s


@pytest.fixture
def engine(settings):
    eng = make_engine(settings.database_url)
    yield eng
    eng.dispose()


@pytest.fixture
def app(settings):
    from api.app import create_app

    application = create_app(settings)
    yield application
    application.state.engine.dispose()


@pytest.fixture
def client(app) -> Iterator[TestClient]:
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def login(client: TestClient, username: str, password: str = DEMO_PASSWORD) -> dict[str, str]:
    r = client.post("/api/v1/auth/token", data={"username": username, "password": password})
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['access_token']}"}


@pytest.fixture
def auth(client):
    """auth('insurer_a') -> headers with a fresh bearer token (cached per user in the test)."""
    cache: dict[str, dict[str, str]] = {}

    def get(username: str) -> dict[str, str]:
        if username not in cache:
            cache[username] = login(client, username)
        return cache[username]

    return get


@pytest.fixture(scope="session")
def synth_files(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """Small synthetic data, generated once: {'prod': {code: path}, 'dev': {code: path}}."""
    from sandbox.synth import generate

    root = tmp_path_factory.mktemp("synth")
    return {"prod": generate(root / "prod", scale=3000, seed=7, twin=False),
            "dev": generate(root / "dev", scale=3000, seed=7, twin=True)}


def _load_visits(engine, settings: Settings, synth_files) -> None:
    from sqlmodel import Session

    from sandbox.engine.store import load_version

    with Session(engine) as s:
        for env in ("prod", "dev"):
            load_version(s, settings, "health.outpatient_visit", synth_files[env]["health.outpatient_visit"],
                         env=env, source="synth")


@pytest.fixture(scope="session")
def loaded_template(backend, synth_files, tmp_path_factory) -> Iterator[tuple[str, str, Path]]:
    """(backend, template locator, home): the template with `loaded`'s versions in it, and the home
    holding their snapshots. Loading costs ~0.3 s a test; the result is the same every time (the
    same files into the same template), so it is done once per backend and copied like the template:
    the database by `database_url`, the home by `settings`."""
    kind, template = backend
    work = tmp_path_factory.mktemp(f"loaded-{kind}")
    if kind == "sqlite":
        db = work / "loaded.db"
        shutil.copyfile(template, db)
        url, locator = f"sqlite:///{db}", str(db)
    else:
        locator = f"pdao_tpl_loaded_{os.getpid()}"
        _pg_admin(f"DROP DATABASE IF EXISTS {locator} WITH (FORCE)")
        _pg_admin(f"CREATE DATABASE {locator} TEMPLATE {template}")
        url = _pg_url(locator)
    s = make_settings(work / "home", url)
    s.ensure_home()
    eng = make_engine(url)
    try:
        _load_visits(eng, s, synth_files)
    finally:
        eng.dispose()
    if kind == "postgresql":
        _pg_copies[locator] = _PgCopies(locator)
    yield kind, locator, s.home
    if kind == "postgresql":
        _pg_copies.pop(locator).close()
        _pg_admin(f"DROP DATABASE IF EXISTS {locator} WITH (FORCE)")


@pytest.fixture
def loaded(engine, settings, synth_files):
    """health.outpatient_visit loaded as a prod version and its dev twin (for queries).

    The test's database and home are copies of `loaded_template`, where _load_visits ran once
    (see database_url and settings); this checks that they are there."""
    from sqlmodel import Session, select

    from catalog.models import Dataset, DatasetVersion
    from sandbox.engine.store import snapshot_path, verify_snapshot

    with Session(engine) as s:
        versions = s.exec(select(DatasetVersion).join(Dataset, Dataset.id == DatasetVersion.dataset_id)
                          .where(Dataset.code == "health.outpatient_visit")).all()
        assert sorted((v.env, v.number) for v in versions) == [("dev", 1), ("prod", 1)], versions
        assert all(verify_snapshot(settings, v) == "ok" and snapshot_path(settings, v).is_relative_to(settings.home)
                   for v in versions)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def live_server(app, engine, settings) -> Iterator[str]:
    """The app served by uvicorn on a free port in a thread, with one query worker (as `pdao serve`)."""
    import uvicorn

    from sandbox.worker import start_in_thread

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           server_header=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    worker, stop = start_in_thread(engine, settings)
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop.set()
        server.should_exit = True
        thread.join(timeout=15)
        worker.join(timeout=15)


def throttle(engine, name: str, address: str | None = "testclient"):
    """The login lockout's row of (name, address) (`"*"`: the name across addresses), or None."""
    from sqlmodel import Session

    from pdao.kernel.identity.models import LoginThrottle
    from pdao.kernel.identity.service import throttle_key

    with Session(engine) as s:
        return s.get(LoginThrottle, throttle_key(name, address))


def set_throttle_instant(engine, name: str, instant) -> None:  # noqa: ANN001
    """Move every lockout row of a name to `instant` (a lock's end, or its last attempt)."""
    from sqlalchemy import update
    from sqlmodel import Session

    from pdao.kernel.identity.models import LoginThrottle

    with Session(engine) as s:
        s.execute(update(LoginThrottle).where(LoginThrottle.name == name).values(locked_until=instant))
        s.commit()
