"""users.totp_last_step (a TOTP code works once, also after a restart) and the protocol anchor
(sessions.protocol_end_seq / protocol_end_hash)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23 05:50:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.add_column(sa.Column('totp_last_step', sa.BigInteger(), nullable=True))
    with op.batch_alter_table('sessions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('protocol_end_seq', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('protocol_end_hash', sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('sessions', schema=None) as batch_op:
        batch_op.drop_column('protocol_end_hash')
        batch_op.drop_column('protocol_end_seq')
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.drop_column('totp_last_step')
