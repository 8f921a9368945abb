"""login lock per (name, client address), and the addresses users signed in from

`login_throttle` now holds one row per typed name and client address (and one per name across
addresses), for real and unknown names alike: its key is a digest of both, and `name` (the typed
name) lets a password reset clear the name's rows. `login_address` remembers (digests of) the
addresses each user signed in from: a name locked across addresses still lets them in from there. Rows of the old kind (one per unknown name) are dropped: they only ever held the
current lock window. (Issue #13's second review: a lock on the name itself let anyone lock anyone
out.)

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-08 02:10:00
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0018'
down_revision = '0017'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("DELETE FROM login_throttle")
    with op.batch_alter_table('login_throttle') as batch:
        batch.add_column(sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))
        batch.create_index(batch.f('ix_login_throttle_name'), ['name'], unique=False)
    op.create_table('login_address',
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('address_key', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('last_login_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['user_id'], ['app_user.id'], ),
    sa.PrimaryKeyConstraint('user_id', 'address_key')
    )


def downgrade() -> None:
    op.drop_table('login_address')
    op.execute("DELETE FROM login_throttle")
    with op.batch_alter_table('login_throttle') as batch:
        batch.drop_index(batch.f('ix_login_throttle_name'))
        batch.drop_column('name')
