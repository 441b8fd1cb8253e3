"""sessions.end_cause / ended_by: why a session ended and who ended it, beside the one-line
end_reason (protocol.session_end.EndReason), so the protocol, session list, CSV and console name
the same reason; the first reason reported wins

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05 18:50:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('sessions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('end_cause', sa.String(length=40), nullable=True))
        batch_op.add_column(sa.Column('ended_by', sa.String(length=20), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('sessions', schema=None) as batch_op:
        batch_op.drop_column('ended_by')
        batch_op.drop_column('end_cause')
