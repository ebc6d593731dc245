"""derived storage modes and generated files

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 14:37:16.606791
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('derived_files',
    sa.Column('version_id', sa.Integer(), nullable=False),
    sa.Column('format', sa.String(length=16), nullable=False),
    sa.Column('path', sa.String(length=1024), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['version_id'], ['model_versions.id'], name=op.f('fk_derived_files_version_id_model_versions'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('version_id', 'format', 'path', name=op.f('pk_derived_files'))
    )
    with op.batch_alter_table('model_versions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('verified_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.drop_constraint(op.f('ck_model_versions_storage_mode'), type_='check')
        batch_op.create_check_constraint(op.f('ck_model_versions_storage_mode'), "storage_mode in ('stored','derived:basis','derived:diff')")


def downgrade() -> None:
    with op.batch_alter_table('model_versions', schema=None) as batch_op:
        batch_op.drop_column('verified_at')
        batch_op.drop_constraint(op.f('ck_model_versions_storage_mode'), type_='check')
        batch_op.create_check_constraint(op.f('ck_model_versions_storage_mode'), "storage_mode in ('stored','derived')")
    op.drop_table('derived_files')
