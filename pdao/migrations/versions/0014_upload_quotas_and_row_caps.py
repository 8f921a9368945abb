"""upload quotas and row caps

What each organization's stored upload versions hold together (bytes, rows), for the per-tenant
quota (issue #13). Filled from the versions already stored. The row cap per upload is a setting
and needs no schema.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07 21:40:00
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0014'
down_revision = '0013'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('tenant_upload_usage',
    sa.Column('org_id', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('stored_bytes', sa.BigInteger(), nullable=False),
    sa.Column('stored_rows', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['org_id'], ['organization.id'], ),
    sa.PrimaryKeyConstraint('org_id')
    )
    op.execute("INSERT INTO tenant_upload_usage (org_id, stored_bytes, stored_rows) "
               "SELECT org_id, SUM(size_bytes), SUM(row_count) FROM tenant_upload GROUP BY org_id")


def downgrade() -> None:
    op.drop_table('tenant_upload_usage')
