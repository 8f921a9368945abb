"""query jobs — dev queue, time limits, failed prod runs held

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-07 21:40:00
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0015'
down_revision = '0014'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # queries (and previews) an organization sent in the current minute: the rate, atomically
    op.create_table('tenant_rate',
    sa.Column('org_id', sa.Integer(), nullable=False),
    sa.Column('window_start', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('count', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['org_id'], ['organization.id'], ),
    sa.PrimaryKeyConstraint('org_id')
    )


def downgrade() -> None:
    op.drop_table('tenant_rate')
