"""tenant uploads: a company's own tables, one immutable version per row (issue #6)

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-28 18:43:13
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('tenant_upload',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('org_id', sa.Integer(), nullable=False),
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('columns', sa.JSON(), nullable=False),
    sa.Column('format', sqlmodel.sql.sqltypes.AutoString(length=10), nullable=False),
    sa.Column('row_count', sa.Integer(), nullable=False),
    sa.Column('size_bytes', sa.Integer(), nullable=False),
    sa.Column('sha256', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('storage_path', sqlmodel.sql.sqltypes.AutoString(length=400), nullable=False),
    sa.Column('warnings', sa.JSON(), nullable=False),
    sa.Column('note', sqlmodel.sql.sqltypes.AutoString(length=500), nullable=False),
    sa.Column('uploaded_by', sa.Integer(), nullable=False),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['org_id'], ['organization.id'], ),
    sa.ForeignKeyConstraint(['uploaded_by'], ['app_user.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('org_id', 'name', 'version')
    )
    with op.batch_alter_table('tenant_upload', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_tenant_upload_name'), ['name'], unique=False)
        batch_op.create_index(batch_op.f('ix_tenant_upload_org_id'), ['org_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_tenant_upload_sha256'), ['sha256'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('tenant_upload', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_tenant_upload_sha256'))
        batch_op.drop_index(batch_op.f('ix_tenant_upload_org_id'))
        batch_op.drop_index(batch_op.f('ix_tenant_upload_name'))

    op.drop_table('tenant_upload')
