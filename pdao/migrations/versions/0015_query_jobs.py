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
    pass


def downgrade() -> None:
    pass
