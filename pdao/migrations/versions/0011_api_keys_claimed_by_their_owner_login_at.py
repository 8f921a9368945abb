"""api keys claimed by their owner; login attempts counted before the check

API keys: an operator's grant is a row without a secret (prefix and digest empty) until the owner
claims it; `claim_by` (a grant lapses unclaimed), `claimed_at`, `valid_days` (counted from the
claim) and `revoked_by` are new. Keys made before this step were answered to their issuing
operator and are revoked. The login counters keep their columns; they now count attempts when
they start (pdao/identity/service.py), which needs no schema change.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07 21:40:00
"""
from datetime import UTC, datetime

from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A grant is a row without a secret until its owner claims it: prefix and digest become optional.
    with op.batch_alter_table('api_key', schema=None) as batch_op:
        batch_op.alter_column('prefix', existing_type=sqlmodel.sql.sqltypes.AutoString(length=16), nullable=True)
        batch_op.alter_column('key_sha256', existing_type=sqlmodel.sql.sqltypes.AutoString(length=64),
                              nullable=True)
        batch_op.add_column(sa.Column('valid_days', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('claim_by', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column('claimed_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column('revoked_by', sa.Integer(), nullable=True))
        batch_op.create_foreign_key('fk_api_key_revoked_by', 'app_user', ['revoked_by'], ['id'])
    # Every key made before this step was answered to the operator who issued it, so it may be
    # held by someone other than its owner: it is revoked, and its owner claims a new one.
    api_key = sa.table('api_key', sa.column('created_at', sqlmodel.sql.sqltypes.UTCDateTime()),
                       sa.column('claimed_at', sqlmodel.sql.sqltypes.UTCDateTime()),
                       sa.column('revoked_at', sqlmodel.sql.sqltypes.UTCDateTime()))
    op.execute(api_key.update().values(claimed_at=api_key.c.created_at))
    op.execute(api_key.update().where(api_key.c.revoked_at.is_(None))
               .values(revoked_at=datetime.now(UTC)))


def downgrade() -> None:
    # Grants that were never claimed have no key: the earlier schema cannot hold them.
    api_key = sa.table('api_key', sa.column('prefix', sqlmodel.sql.sqltypes.AutoString(length=16)))
    op.execute(api_key.delete().where(api_key.c.prefix.is_(None)))
    with op.batch_alter_table('api_key', schema=None) as batch_op:
        batch_op.drop_constraint('fk_api_key_revoked_by', type_='foreignkey')
        for col in ('revoked_by', 'claimed_at', 'claim_by', 'valid_days'):
            batch_op.drop_column(col)
        batch_op.alter_column('key_sha256', existing_type=sqlmodel.sql.sqltypes.AutoString(length=64),
                              nullable=False)
        batch_op.alter_column('prefix', existing_type=sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False)
