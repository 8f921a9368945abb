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
    with op.batch_alter_table('scene', schema=None) as batch_op:
        # one pseudonym key for all the scene's answers only when the office approved linkage
        batch_op.add_column(sa.Column('link_pseudonyms', sa.Boolean(), server_default=sa.false(), nullable=False))
    with op.batch_alter_table('result_review', schema=None) as batch_op:
        # a release overriding failing checks, and which checks failed then
        batch_op.add_column(sa.Column('override', sa.Boolean(), server_default=sa.false(), nullable=False))
        batch_op.add_column(sa.Column('overridden_checks', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('result_review', schema=None) as batch_op:
        batch_op.drop_column('overridden_checks')
        batch_op.drop_column('override')
    with op.batch_alter_table('scene', schema=None) as batch_op:
        batch_op.drop_column('link_pseudonyms')
