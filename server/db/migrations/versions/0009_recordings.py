"""Session recordings (issue 12): the recordings index, and the recording policy (off | on |
required) per tenant and per host group (NULL: inherit)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05 19:20:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('tenants', schema=None) as batch_op:
        batch_op.add_column(sa.Column('recording_policy', sa.String(length=16), nullable=True))
    with op.batch_alter_table('host_groups', schema=None) as batch_op:
        batch_op.add_column(sa.Column('recording_policy', sa.String(length=16), nullable=True))
    op.create_table(
        'recordings',
        sa.Column('id', sa.String(length=36), nullable=False),
        sa.Column('session_id', sa.String(length=36), nullable=False),
        sa.Column('tenant_id', sa.Integer(), nullable=True),
        sa.Column('party', sa.String(length=20), nullable=False),
        sa.Column('storage', sa.String(length=10), nullable=False),
        sa.Column('location', sa.String(length=500), nullable=False),
        sa.Column('key_id', sa.String(length=32), nullable=False),
        sa.Column('policy', sa.String(length=16), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('size', sa.BigInteger(), nullable=False),
        sa.Column('records', sa.Integer(), nullable=False),
        sa.Column('sha256', sa.String(length=64), nullable=True),
        sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('ended_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('last_chunk_at', sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(['session_id'], ['sessions.id']),
        sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id']),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('session_id', 'party'),
    )
    with op.batch_alter_table('recordings', schema=None) as batch_op:
        batch_op.create_index('ix_recordings_session_id', ['session_id'], unique=False)
        batch_op.create_index('ix_recordings_tenant_id', ['tenant_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('recordings', schema=None) as batch_op:
        batch_op.drop_index('ix_recordings_tenant_id')
        batch_op.drop_index('ix_recordings_session_id')
    op.drop_table('recordings')
    with op.batch_alter_table('host_groups', schema=None) as batch_op:
        batch_op.drop_column('recording_policy')
    with op.batch_alter_table('tenants', schema=None) as batch_op:
        batch_op.drop_column('recording_policy')
