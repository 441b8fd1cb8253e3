"""The revoked certificates, which every server polls for every few seconds, have an index of
their own (a partial one): the poll no longer reads the whole certificates table

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06 04:30:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_certificates_revoked', 'certificates', ['revoked_at'],
                    postgresql_where=sa.text('revoked_at IS NOT NULL'),
                    sqlite_where=sa.text('revoked_at IS NOT NULL'))


def downgrade() -> None:
    op.drop_index('ix_certificates_revoked', table_name='certificates')
