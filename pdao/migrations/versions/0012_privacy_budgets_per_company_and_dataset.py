"""privacy budgets per company and dataset across scenes

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07 21:40:00
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('company_dataset_budget',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('org_id', sa.Integer(), nullable=False),
    sa.Column('dataset', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('epsilon_cap', sa.Float(), nullable=True),
    sa.Column('delta_cap', sa.Float(), nullable=True),
    sa.Column('epsilon_spent', sa.Float(), nullable=False),
    sa.Column('delta_spent', sa.Float(), nullable=False),
    sa.Column('set_by_id', sa.Integer(), nullable=True),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('updated_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['org_id'], ['organization.id'], ),
    sa.ForeignKeyConstraint(['set_by_id'], ['app_user.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('org_id', 'dataset', name='uq_company_dataset_budget_org_dataset')
    )
    # Plain columns (no foreign key): SQLite adds them in place, without copying the table, which
    # other tables' rows (query.budget_entry_id) refer to.
    op.add_column('budget_entry', sa.Column('org_id', sa.Integer(), nullable=True))
    op.add_column('budget_entry', sa.Column('dataset', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True))
    _backfill()


_entry = sa.table("budget_entry", sa.column("id", sa.Integer), sa.column("scene_id", sa.Integer),
                  sa.column("query_ref", sa.String), sa.column("epsilon", sa.Float), sa.column("delta", sa.Float),
                  sa.column("state", sa.String), sa.column("org_id", sa.Integer), sa.column("dataset", sa.String))
_query = sa.table("query", sa.column("id", sa.Integer), sa.column("dataset", sa.String))
_scene = sa.table("scene", sa.column("id", sa.Integer), sa.column("org_id", sa.Integer))
_budget = sa.table("company_dataset_budget", sa.column("org_id", sa.Integer), sa.column("dataset", sa.String),
                   sa.column("epsilon_spent", sa.Float), sa.column("delta_spent", sa.Float),
                   sa.column("created_at", sqlmodel.sql.sqltypes.UTCDateTime()),
                   sa.column("updated_at", sqlmodel.sql.sqltypes.UTCDateTime()))


def _backfill() -> None:
    """What companies already spent before their budgets existed: each ledger entry paying for a
    query names that query's dataset and the scene's tenant, and the reserved and charged ones
    count toward the company's total on the dataset (refunding one later credits it back)."""
    from datetime import UTC, datetime

    conn = op.get_bind()
    datasets = dict(conn.execute(sa.select(_query.c.id, _query.c.dataset)).all())
    tenants = dict(conn.execute(sa.select(_scene.c.id, _scene.c.org_id)).all())
    spent: dict[tuple[int, str], list[float]] = {}
    for e in conn.execute(sa.select(_entry)).mappings().all():
        ref = e["query_ref"] or ""
        dataset = datasets.get(int(ref[6:])) if ref.startswith("query:") and ref[6:].isdigit() else None
        org_id = tenants.get(e["scene_id"])
        conn.execute(_entry.update().where(_entry.c.id == e["id"]).values(org_id=org_id, dataset=dataset))
        if dataset is not None and e["state"] in ("reserved", "charged"):
            total = spent.setdefault((org_id, dataset), [0.0, 0.0])
            total[0] += e["epsilon"]
            total[1] += e["delta"]
    now = datetime.now(UTC)
    for (org_id, dataset), (epsilon, delta) in sorted(spent.items()):
        conn.execute(_budget.insert().values(org_id=org_id, dataset=dataset, epsilon_spent=epsilon, delta_spent=delta,
                                             created_at=now, updated_at=now))


def downgrade() -> None:
    # ALTER TABLE … DROP COLUMN, also on SQLite (3.35+): a batch copy would drop the old table,
    # which SQLite refuses while query rows refer to it.
    op.drop_column('budget_entry', 'dataset')
    op.drop_column('budget_entry', 'org_id')
    op.drop_table('company_dataset_budget')
