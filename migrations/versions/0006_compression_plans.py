"""compression plans: compressions, their members, the derived:plan storage mode, the
compress_collection policy

A compression plan (``registry.weights.compress``) over adapters of one base is a version of
kind ``merge`` holding the plan file; ``compressions`` records its budget and byte counts,
``compression_members`` each member's method, bytes and error. A member that gave up its own
blobs is ``derived:plan``: rebuilt from the plan when served.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

_MODES_BEFORE = "storage_mode in ('stored','derived:basis','derived:diff')"
_MODES_AFTER = "storage_mode in ('stored','derived:basis','derived:diff','derived:plan')"
_POLICIES_BEFORE = "type in ('transfer_on_base_update','refresh_basis')"
_POLICIES_AFTER = "type in ('transfer_on_base_update','refresh_basis','compress_collection')"


def upgrade() -> None:
    op.create_table(
        'compressions',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('collection', sa.String(length=128), nullable=True),
        sa.Column('base_version_id', sa.Integer(), nullable=True),
        sa.Column('version_id', sa.Integer(), nullable=False),
        sa.Column('max_error', sa.Float(), nullable=False),
        sa.Column('methods', sa.JSON(), nullable=False),
        sa.Column('stored_bytes', sa.BigInteger(), nullable=False),
        sa.Column('original_bytes', sa.BigInteger(), nullable=False),
        sa.Column('summary', sa.JSON(), nullable=False),
        sa.Column('job_id', sa.Integer(), nullable=True),
        sa.Column('mlflow_run_id', sa.String(length=64), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('created_by', sa.String(length=128), nullable=True),
        sa.ForeignKeyConstraint(['base_version_id'], ['model_versions.id'],
                                name=op.f('fk_compressions_base_version_id_model_versions'), ondelete='RESTRICT'),
        sa.ForeignKeyConstraint(['version_id'], ['model_versions.id'],
                                name=op.f('fk_compressions_version_id_model_versions'), ondelete='RESTRICT'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_compressions')),
    )
    with op.batch_alter_table('compressions', schema=None) as batch_op:
        batch_op.create_index('ix_compressions_collection', ['collection', 'id'], unique=False)
        batch_op.create_index('ix_compressions_version', ['version_id'], unique=False)
    op.create_table(
        'compression_members',
        sa.Column('compression_id', sa.Integer(), nullable=False),
        sa.Column('position', sa.Integer(), nullable=False),
        sa.Column('version_id', sa.Integer(), nullable=False),
        sa.Column('method', sa.String(length=32), nullable=False),
        sa.Column('parameters', sa.JSON(), nullable=False),
        sa.Column('stored_bytes', sa.BigInteger(), nullable=False),
        sa.Column('original_bytes', sa.BigInteger(), nullable=False),
        sa.Column('error', sa.Float(), nullable=False),
        sa.Column('served_error', sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(['compression_id'], ['compressions.id'],
                                name=op.f('fk_compression_members_compression_id_compressions'), ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['version_id'], ['model_versions.id'],
                                name=op.f('fk_compression_members_version_id_model_versions'), ondelete='RESTRICT'),
        sa.PrimaryKeyConstraint('compression_id', 'position', name=op.f('pk_compression_members')),
    )
    with op.batch_alter_table('compression_members', schema=None) as batch_op:
        batch_op.create_index('ix_compression_members_version', ['version_id'], unique=False)
    with op.batch_alter_table('model_versions', schema=None) as batch_op:
        batch_op.drop_constraint(op.f('ck_model_versions_storage_mode'), type_='check')
        batch_op.create_check_constraint(op.f('ck_model_versions_storage_mode'), _MODES_AFTER)
    with op.batch_alter_table('policies', schema=None) as batch_op:
        batch_op.drop_constraint(op.f('ck_policies_type'), type_='check')
        batch_op.create_check_constraint(op.f('ck_policies_type'), _POLICIES_AFTER)


def downgrade() -> None:
    op.execute("DELETE FROM policies WHERE type = 'compress_collection'")
    with op.batch_alter_table('policies', schema=None) as batch_op:
        batch_op.drop_constraint(op.f('ck_policies_type'), type_='check')
        batch_op.create_check_constraint(op.f('ck_policies_type'), _POLICIES_BEFORE)
    with op.batch_alter_table('model_versions', schema=None) as batch_op:
        batch_op.drop_constraint(op.f('ck_model_versions_storage_mode'), type_='check')
        batch_op.create_check_constraint(op.f('ck_model_versions_storage_mode'), _MODES_BEFORE)
    with op.batch_alter_table('compression_members', schema=None) as batch_op:
        batch_op.drop_index('ix_compression_members_version')
    op.drop_table('compression_members')
    with op.batch_alter_table('compressions', schema=None) as batch_op:
        batch_op.drop_index('ix_compressions_version')
        batch_op.drop_index('ix_compressions_collection')
    op.drop_table('compressions')
