"""export review, lineage and trace: result versions, reports, reviews, exports; the query's uses

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-28 17:50:00
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('query', schema=None) as batch_op:
        batch_op.add_column(sa.Column('uses', sa.JSON(), server_default='[]', nullable=False))
        batch_op.add_column(sa.Column('policy_version', sa.Integer(), server_default='0', nullable=False))

    with op.batch_alter_table('query_result', schema=None) as batch_op:
        # a query may now have several versions of its result (a reviewer's suppression or rounding)
        batch_op.drop_index(batch_op.f('ix_query_result_query_id'))
        batch_op.create_index(batch_op.f('ix_query_result_query_id'), ['query_id'], unique=False)
        batch_op.add_column(sa.Column('version', sa.Integer(), server_default='1', nullable=False))
        batch_op.add_column(sa.Column('parent_id', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('revision', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('report', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('stats_path', sqlmodel.sql.sqltypes.AutoString(length=400), nullable=True))
        batch_op.add_column(sa.Column('content_fp', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))
        batch_op.add_column(sa.Column('released_by', sqlmodel.sql.sqltypes.AutoString(length=20), nullable=True))
        batch_op.add_column(sa.Column('decided_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True))
        batch_op.create_index(batch_op.f('ix_query_result_content_fp'), ['content_fp'], unique=False)
        batch_op.create_foreign_key('fk_query_result_parent_id', 'query_result', ['parent_id'], ['id'])
        batch_op.create_unique_constraint('uq_query_result_query_id_version', ['query_id', 'version'])

    op.create_table('result_review',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('result_id', sa.Integer(), nullable=False),
    sa.Column('reviewer_id', sa.Integer(), nullable=False),
    sa.Column('reviewer_org_id', sa.Integer(), nullable=False),
    sa.Column('decision', sqlmodel.sql.sqltypes.AutoString(length=10), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['result_id'], ['query_result.id'], ),
    sa.ForeignKeyConstraint(['reviewer_id'], ['app_user.id'], ),
    sa.ForeignKeyConstraint(['reviewer_org_id'], ['organization.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('result_id', 'reviewer_id')
    )
    with op.batch_alter_table('result_review', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_result_review_result_id'), ['result_id'], unique=False)

    op.create_table('result_export',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('export_id', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
    sa.Column('result_id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('org_id', sa.Integer(), nullable=False),
    sa.Column('format', sqlmodel.sql.sqltypes.AutoString(length=10), nullable=False),
    sa.Column('fingerprint', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('content_fp', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('sha256', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('size_bytes', sa.Integer(), nullable=False),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['org_id'], ['organization.id'], ),
    sa.ForeignKeyConstraint(['result_id'], ['query_result.id'], ),
    sa.ForeignKeyConstraint(['user_id'], ['app_user.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('result_export', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_result_export_content_fp'), ['content_fp'], unique=False)
        batch_op.create_index(batch_op.f('ix_result_export_export_id'), ['export_id'], unique=True)
        batch_op.create_index(batch_op.f('ix_result_export_result_id'), ['result_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('result_export', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_result_export_result_id'))
        batch_op.drop_index(batch_op.f('ix_result_export_export_id'))
        batch_op.drop_index(batch_op.f('ix_result_export_content_fp'))
    op.drop_table('result_export')
    with op.batch_alter_table('result_review', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_result_review_result_id'))
    op.drop_table('result_review')
    with op.batch_alter_table('query_result', schema=None) as batch_op:
        batch_op.drop_constraint('uq_query_result_query_id_version', type_='unique')
        batch_op.drop_constraint('fk_query_result_parent_id', type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_query_result_content_fp'))
        for col in ('decided_at', 'released_by', 'content_fp', 'stats_path', 'report', 'revision', 'parent_id', 'version'):
            batch_op.drop_column(col)
        batch_op.drop_index(batch_op.f('ix_query_result_query_id'))
        batch_op.create_index(batch_op.f('ix_query_result_query_id'), ['query_id'], unique=True)
    with op.batch_alter_table('query', schema=None) as batch_op:
        batch_op.drop_column('policy_version')
        batch_op.drop_column('uses')
