"""users.language: the console and mail language a user chose ('en', 'de'; NULL: not chosen yet,
the browser's Accept-Language decides in the console and English in mails)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05 18:45:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.add_column(sa.Column('language', sa.String(length=8), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.drop_column('language')
