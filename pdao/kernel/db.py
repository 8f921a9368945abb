"""The metadata database: SQLite under PDAO_HOME by default, PostgreSQL when PDAO_DATABASE_URL says so.

Tables are SQLModel classes in each room (catalog, identities, audit); their schema is owned by
the Alembic migrations in pdao/migrations, never by `create_all`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlmodel import Session, create_engine

MIGRATIONS_DIR = Path(__file__).parent.parent / "migrations"   # pdao/migrations, beside the kernel


# The largest id a row can have on both backends (INTEGER on PostgreSQL). An id from a URL beyond it
# names nothing: lookups answer 404 instead of the database's overflow error.
MAX_ID = 2_147_483_647


def id_in_range(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_ID


def utcnow() -> datetime:
    """Aware UTC: SQLModel's datetime columns store and return UTC on SQLite and PostgreSQL alike."""
    return datetime.now(UTC)


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        # As many connections as the server's thread pool (anyio: 40) can ask for at once: a burst
        # of requests waits on SQLite's write lock, not on the pool.
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30},
                               pool_size=10, max_overflow=30)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # noqa: ANN001
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")  # readers don't block the one writer
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=FULL")  # an acknowledged commit survives a power cut too
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=30)


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any error."""
    with Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


def alembic_config(url: str):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def ensure_database(url: str) -> None:
    """Create the SQLite folder, or the PostgreSQL database if the server lacks it."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        return
    if not url.startswith("postgresql"):
        return
    from sqlalchemy.engine import make_url

    target = make_url(url)
    admin = create_engine(target.set(database="postgres").render_as_string(hide_password=False),
                          isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            exists = conn.exec_driver_sql("SELECT 1 FROM pg_database WHERE datname = %s", (target.database,)).first()
            if exists is None:
                name = target.database.replace('"', '""')
                conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    finally:
        admin.dispose()


def migrate(url: str, revision: str = "head") -> None:
    """Bring the metadata schema to `revision` (idempotent)."""
    from alembic import command

    ensure_database(url)
    command.upgrade(alembic_config(url), revision)
