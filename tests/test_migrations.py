"""The Alembic migrations are the schema: they build an empty database to exactly what the models
say, on SQLite and PostgreSQL, and can be rolled back."""

from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect
from sqlmodel import SQLModel

from pdao.kernel.db import alembic_config, make_engine, migrate
from pdao.models import import_all_models


def test_migrations_match_the_models_and_roll_back(empty_url):
    migrate(empty_url)
    migrate(empty_url)  # idempotent
    import_all_models()
    engine = make_engine(empty_url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), SQLModel.metadata)
        assert diff == [], f"models and migrations disagree; run alembic revision --autogenerate: {diff}"
        tables = set(inspect(engine).get_table_names())
        assert {"organization", "dataset", "dataset_field", "dataset_version", "app_user", "api_key",
                "audit_event", "alembic_version"} <= tables
    finally:
        engine.dispose()
    command.downgrade(alembic_config(empty_url), "base")
    engine = make_engine(empty_url)
    try:
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    finally:
        engine.dispose()
    migrate(empty_url)
