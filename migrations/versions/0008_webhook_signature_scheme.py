"""webhook signature scheme: the registry's own, or Standard Webhooks

``webhooks.signature_scheme`` says how deliveries are signed: ``registry`` (``X-Registry-Signature:
sha256=<hex HMAC>``, what every existing webhook keeps) or ``standard-webhooks`` (``webhook-id``,
``webhook-timestamp``, ``webhook-signature: v1,<base64 HMAC>`` with a ``whsec_`` base64 secret).

Revision ID: 0008
Revises: 0006
Create Date: 2026-12-01 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('webhooks', schema=None) as batch_op:
        batch_op.add_column(sa.Column('signature_scheme', sa.String(length=32), nullable=False,
                                      server_default='registry'))
    with op.batch_alter_table('webhooks', schema=None) as batch_op:
        batch_op.alter_column('signature_scheme', existing_type=sa.String(length=32), server_default=None)
        batch_op.create_check_constraint(op.f('ck_webhooks_signature_scheme'),
                                         "signature_scheme in ('registry','standard-webhooks')")


def downgrade() -> None:
    standard = op.get_bind().execute(
        sa.text("SELECT COUNT(*) FROM webhooks WHERE signature_scheme <> 'registry'")).scalar()
    if standard:
        raise RuntimeError(f"{standard} webhooks sign per Standard Webhooks; an older schema would sign their "
                           "deliveries with the registry's scheme, which their receivers reject (delete them first)")
    with op.batch_alter_table('webhooks', schema=None) as batch_op:
        batch_op.drop_constraint(op.f('ck_webhooks_signature_scheme'), type_='check')
        batch_op.drop_column('signature_scheme')
