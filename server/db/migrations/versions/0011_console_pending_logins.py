"""Several server nodes: a console login waiting for its TOTP code is a row, so the code may be
typed on another node than the password

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06 01:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'console_pending_logins',
        sa.Column('id_hash', sa.String(length=64), nullable=False),
        sa.Column('user_id', sa.Integer(), nullable=False),
        sa.Column('language', sa.String(length=10), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id_hash'))
    op.create_index('ix_console_pending_logins_created_at', 'console_pending_logins',
                    ['created_at'])


def downgrade() -> None:
    op.drop_index('ix_console_pending_logins_created_at', table_name='console_pending_logins')
    op.drop_table('console_pending_logins')
