"""audit hash chain: prev_hash and hash on every event, the one-row audit_head

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29 09:00:00.000000

Existing events are chained in seq order (a data migration, in batches). Gaps that rolled-back
inserts left in seq are closed first, in order: the chain needs seq 1, 2, 3, … The hashing here
is a frozen copy of the canonical serialization of format 1 (docs/audit.md), so this revision
keeps producing what it produced when it was written.
"""
import hashlib
import json
from datetime import UTC

from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None

GENESIS_HASH = "0" * 64
CHAINED_FIELDS = ("seq", "prev_hash", "at", "request_id", "actor", "org", "role", "auth_method", "action",
                  "object", "scene_id", "decision", "status", "reason", "method", "path", "client", "detail")
BATCH = 5000


def _hash(rec: dict) -> str:
    at = rec["at"]
    if at.tzinfo is not None:
        at = at.astimezone(UTC).replace(tzinfo=None)
    rec = dict(rec, at=at.isoformat(timespec="microseconds") + "Z")
    body = json.dumps(rec, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def _events() -> sa.Table:
    s = sqlmodel.sql.sqltypes.AutoString
    return sa.table(
        'audit_event',
        sa.column('seq', sa.Integer()), sa.column('at', sqlmodel.sql.sqltypes.UTCDateTime()),
        *(sa.column(name, s()) for name in ('request_id', 'actor', 'org', 'role', 'auth_method', 'action',
                                             'object')),
        sa.column('scene_id', sa.Integer()), sa.column('decision', s()), sa.column('status', sa.Integer()),
        *(sa.column(name, s()) for name in ('reason', 'method', 'path', 'client')),
        sa.column('detail', sa.JSON()), sa.column('prev_hash', s()), sa.column('hash', s()),
    )


def _backfill(conn) -> tuple[int, str]:  # noqa: ANN001
    t = _events()
    cols = [t.c[f] for f in CHAINED_FIELDS if f != 'prev_hash']
    update = (sa.update(t).where(t.c.seq == sa.bindparam('old_seq'))
              .values(seq=sa.bindparam('new_seq'), prev_hash=sa.bindparam('new_prev'), hash=sa.bindparam('new_hash')))
    seq, prev, last_old = 0, GENESIS_HASH, 0
    while True:
        rows = conn.execute(sa.select(*cols).where(t.c.seq > last_old).order_by(t.c.seq).limit(BATCH)).all()
        if not rows:
            return seq, prev
        params = []
        for row in rows:
            rec = dict(zip([c.name for c in cols], row))
            last_old = rec['seq']
            seq += 1  # new seq <= old seq, and rows are renumbered in ascending order: never a clash
            rec.update(seq=seq, prev_hash=prev)
            prev = _hash(rec)
            params.append({'old_seq': last_old, 'new_seq': seq, 'new_prev': rec['prev_hash'], 'new_hash': prev})
        conn.execute(update, params)


def upgrade() -> None:
    with op.batch_alter_table('audit_event', schema=None) as batch_op:
        batch_op.add_column(sa.Column('prev_hash', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))
        batch_op.add_column(sa.Column('hash', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))
    op.create_table('audit_head',
    sa.Column('id', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('seq', sa.Integer(), nullable=False),
    sa.Column('hash', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.CheckConstraint('id = 1', name='ck_audit_head_one_row'),
    sa.PrimaryKeyConstraint('id')
    )
    conn = op.get_bind()
    head_seq, head_hash = _backfill(conn)
    conn.execute(sa.text("INSERT INTO audit_head (id, seq, hash) VALUES (1, :seq, :hash)"),
                 {'seq': head_seq, 'hash': head_hash})
    with op.batch_alter_table('audit_event', schema=None) as batch_op:
        batch_op.alter_column('prev_hash', existing_type=sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False)
        batch_op.alter_column('hash', existing_type=sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False)


def downgrade() -> None:
    op.drop_table('audit_head')
    with op.batch_alter_table('audit_event', schema=None) as batch_op:
        batch_op.drop_column('hash')
        batch_op.drop_column('prev_hash')
