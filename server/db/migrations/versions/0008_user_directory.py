"""users.directory_dn: the directory entry of a user who signs in through LDAP / Active Directory
(NULL: a local account with its own password)

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05 19:05:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.add_column(sa.Column('directory_dn', sa.String(length=1024), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.drop_column('directory_dn')
