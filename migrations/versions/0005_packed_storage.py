"""packed storage: chunks, blob segments, blob form and stored sizes

A file can be kept packed: its bytes are the concatenation of content-addressed chunks, each
held as a coded payload (its own blob row), possibly XOR-coded against a reference chunk.
``blobs.stored_size`` is what the store holds under a row right now; ``model_versions.
stored_bytes`` what a version added to the store. Existing rows are raw files: each blob's size
is counted at the first version that references it.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29 19:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('blobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('form', sa.String(length=8), nullable=False, server_default='raw'))
        batch_op.add_column(sa.Column('packed_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('stored_size', sa.BigInteger(), nullable=False, server_default='0'))
    op.execute("UPDATE blobs SET stored_size = size WHERE state = 'ready'")
    with op.batch_alter_table('blobs', schema=None) as batch_op:
        batch_op.alter_column('form', existing_type=sa.String(length=8), server_default=None)
        batch_op.alter_column('stored_size', existing_type=sa.BigInteger(), server_default=None)
        batch_op.create_check_constraint(op.f('ck_blobs_form'), "form in ('raw','packed')")
    with op.batch_alter_table('model_versions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('stored_bytes', sa.BigInteger(), nullable=False, server_default='0'))
    op.execute(
        "UPDATE model_versions SET stored_bytes = COALESCE((SELECT SUM(b.size) FROM blobs b WHERE "
        "(SELECT MIN(vf.version_id) FROM version_files vf WHERE vf.blob_sha256 = b.sha256) = model_versions.id), 0)")
    with op.batch_alter_table('model_versions', schema=None) as batch_op:
        batch_op.alter_column('stored_bytes', existing_type=sa.BigInteger(), server_default=None)
    op.create_table(
        'chunks',
        sa.Column('sha256', sa.String(length=64), nullable=False),
        sa.Column('size', sa.BigInteger(), nullable=False),
        sa.Column('object_sha256', sa.String(length=64), nullable=False),
        sa.Column('ref_sha256', sa.String(length=64), nullable=True),
        sa.Column('depth', sa.Integer(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['object_sha256'], ['blobs.sha256'], name=op.f('fk_chunks_object_sha256_blobs'),
                                ondelete='RESTRICT'),
        sa.ForeignKeyConstraint(['ref_sha256'], ['chunks.sha256'], name=op.f('fk_chunks_ref_sha256_chunks'),
                                ondelete='RESTRICT'),
        sa.PrimaryKeyConstraint('sha256', name=op.f('pk_chunks')),
    )
    with op.batch_alter_table('chunks', schema=None) as batch_op:
        batch_op.create_index('ix_chunks_object', ['object_sha256'], unique=False)
        batch_op.create_index('ix_chunks_ref', ['ref_sha256'], unique=False)
    op.create_table(
        'blob_segments',
        sa.Column('blob_sha256', sa.String(length=64), nullable=False),
        sa.Column('offset', sa.BigInteger(), nullable=False),
        sa.Column('length', sa.BigInteger(), nullable=False),
        sa.Column('chunk_sha256', sa.String(length=64), nullable=False),
        sa.Column('key', sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(['blob_sha256'], ['blobs.sha256'], name=op.f('fk_blob_segments_blob_sha256_blobs'),
                                ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['chunk_sha256'], ['chunks.sha256'],
                                name=op.f('fk_blob_segments_chunk_sha256_chunks'), ondelete='RESTRICT'),
        sa.PrimaryKeyConstraint('blob_sha256', 'offset', name=op.f('pk_blob_segments')),
    )
    with op.batch_alter_table('blob_segments', schema=None) as batch_op:
        batch_op.create_index('ix_blob_segments_chunk', ['chunk_sha256'], unique=False)


def downgrade() -> None:
    packed = op.get_bind().execute(sa.text("SELECT COUNT(*) FROM blobs WHERE form = 'packed'")).scalar()
    if packed:
        raise RuntimeError(f"{packed} files are kept packed; an older schema cannot read them "
                           "(unpack them first, or restore from a backup)")
    op.drop_table('blob_segments')
    op.drop_table('chunks')
    with op.batch_alter_table('model_versions', schema=None) as batch_op:
        batch_op.drop_column('stored_bytes')
    with op.batch_alter_table('blobs', schema=None) as batch_op:
        batch_op.drop_constraint(op.f('ck_blobs_form'), type_='check')
        batch_op.drop_column('stored_size')
        batch_op.drop_column('packed_at')
        batch_op.drop_column('form')
