"""row answers — pseudonym linkage per scene, reviewers' overrides

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07 21:40:00
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN (no batch rebuild: SQLite would drop and copy `scene`, which other tables
    # point at; it refuses once rows reference it).
    # one pseudonym key for all the scene's answers only when the office approved linkage
    op.add_column('scene', sa.Column('link_pseudonyms', sa.Boolean(), server_default=sa.false(), nullable=False))
    # a release overriding failing checks, and which checks failed then
    op.add_column('result_review', sa.Column('override', sa.Boolean(), server_default=sa.false(), nullable=False))
    op.add_column('result_review', sa.Column('overridden_checks', sa.JSON(), nullable=True))


def downgrade() -> None:
    # Plain DROP COLUMN (SQLite 3.35+, PostgreSQL): a batch rebuild of `scene` would drop the table
    # that queries, results and reviews point at, which SQLite refuses once rows reference it.
    for table, column in (("result_review", "overridden_checks"), ("result_review", "override"),
                          ("scene", "link_pseudonyms")):
        op.execute(f'ALTER TABLE {table} DROP COLUMN "{column}"')
