"""blob claims (state, touched_at) and corrupt versions

Blob rows now exist before their bytes reach the store (``pending``) and gc claims a row
(``deleting``) before it removes an object, so gc can never remove bytes a commit references.
Existing rows describe bytes already in the store: they become ``ready``.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29 17:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('blobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('state', sa.String(length=16), nullable=False, server_default='ready'))
        batch_op.add_column(sa.Column('touched_at', sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE blobs SET touched_at = created_at")
    with op.batch_alter_table('blobs', schema=None) as batch_op:
        batch_op.alter_column('touched_at', existing_type=sa.DateTime(timezone=True), nullable=False)
        batch_op.alter_column('state', existing_type=sa.String(length=16), server_default=None)
        batch_op.create_check_constraint(op.f('ck_blobs_state'), "state in ('pending','ready','deleting')")
    with op.batch_alter_table('model_versions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('corrupt_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('model_versions', schema=None) as batch_op:
        batch_op.drop_column('corrupt_at')
    op.execute("DELETE FROM blobs WHERE state <> 'ready'")
    with op.batch_alter_table('blobs', schema=None) as batch_op:
        batch_op.drop_constraint(op.f('ck_blobs_state'), type_='check')
        batch_op.drop_column('touched_at')
        batch_op.drop_column('state')
