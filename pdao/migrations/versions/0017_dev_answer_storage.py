"""dev answer storage — each answer's stored bytes and when its file expired

A dev answer's file is counted against its organization's quota (PDAO_DEV_ANSWER_QUOTA_MB) and
removed after PDAO_DEV_ANSWER_DAYS; the row stays, marked `expired_at`. (Issue #13's second review.)

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-08 02:00:00
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0017'
down_revision = '0016'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('query_result') as batch:
        batch.add_column(sa.Column('size_bytes', sa.BigInteger(), nullable=False, server_default='0'))
        batch.add_column(sa.Column('expired_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('query_result') as batch:
        batch.drop_column('expired_at')
        batch.drop_column('size_bytes')
