"""scene templates: analysis templates applied for and approved with a scene

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-28 19:05:00
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('scene_template',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('scene_id', sa.Integer(), nullable=False),
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('definition', sa.JSON(), nullable=False),
    sa.Column('digest', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['scene_id'], ['scene.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('scene_id', 'name', name='uq_scene_template_scene_id_name')
    )
    with op.batch_alter_table('scene_template', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_scene_template_scene_id'), ['scene_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('scene_template', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_scene_template_scene_id'))
    op.drop_table('scene_template')
