"""upload checks — a rate and a concurrency limit per company

One row per upload a company started, counted before its file is read: the uploads started in the
last hour (PDAO_UPLOAD_RATE_PER_HOUR) and those still running under a lease
(PDAO_UPLOAD_CONCURRENCY). In the database, so that every server process counts the same uploads.
(Number provisional: issue #13's second review; the lead assigns the final one.)

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-07 23:40:00
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0016'
down_revision = '0015'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('tenant_upload_check',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('org_id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('started_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('lease_until', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('finished_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.ForeignKeyConstraint(['org_id'], ['organization.id'], ),
    sa.ForeignKeyConstraint(['user_id'], ['app_user.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index(op.f('ix_tenant_upload_check_org_id'), 'tenant_upload_check', ['org_id'], unique=False)
    op.create_index(op.f('ix_tenant_upload_check_started_at'), 'tenant_upload_check', ['started_at'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_tenant_upload_check_started_at'), table_name='tenant_upload_check')
    op.drop_index(op.f('ix_tenant_upload_check_org_id'), table_name='tenant_upload_check')
    op.drop_table('tenant_upload_check')
