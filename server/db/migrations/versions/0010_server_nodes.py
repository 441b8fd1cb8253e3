"""Several server nodes on one PostgreSQL (issue 15 part 3): console sessions in the database,
the node registry (servers and relay processes), nameplates unique across nodes, relay tokens
single-use across relay processes, and which node holds a host and set a session up

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05 21:50:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('hosts', schema=None) as batch_op:
        batch_op.add_column(sa.Column('node', sa.String(length=64), nullable=True))
    with op.batch_alter_table('sessions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('node', sa.String(length=64), nullable=True))
    op.create_index('ix_sessions_unfinished_node', 'sessions', ['node'],
                    postgresql_where=sa.text('ended_at IS NULL'),
                    sqlite_where=sa.text('ended_at IS NULL'))
    op.create_table(
        'console_sessions',
        sa.Column('id_hash', sa.String(length=64), nullable=False),
        sa.Column('csrf', sa.String(length=64), nullable=False),
        sa.Column('user_name', sa.String(length=200), nullable=False),
        sa.Column('user_id', sa.Integer(), nullable=True),
        sa.Column('role', sa.String(length=20), nullable=False),
        sa.Column('tenant_id', sa.Integer(), nullable=True),
        sa.Column('tenant', sa.String(length=200), nullable=True),
        sa.Column('operator', sa.Boolean(), nullable=False),
        sa.Column('language', sa.String(length=10), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('last_active', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id_hash'))
    op.create_index('ix_console_sessions_user_name', 'console_sessions', ['user_name'])
    op.create_index('ix_console_sessions_last_active', 'console_sessions', ['last_active'])
    op.create_table(
        'server_nodes',
        sa.Column('name', sa.String(length=64), nullable=False),
        sa.Column('kind', sa.String(length=10), nullable=False),
        sa.Column('pid', sa.Integer(), nullable=False),
        sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('seen_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('sessions', sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint('name'))
    op.create_table(
        'nameplates',
        sa.Column('code', sa.String(length=8), nullable=False),
        sa.Column('node', sa.String(length=64), nullable=False),
        sa.Column('supporter', sa.String(length=255), nullable=False),
        sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('code'))
    op.create_index('ix_nameplates_expires_at', 'nameplates', ['expires_at'])
    op.create_table(
        'relay_token_uses',
        sa.Column('nonce', sa.String(length=32), nullable=False),
        sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('nonce'))
    op.create_index('ix_relay_token_uses_expires_at', 'relay_token_uses', ['expires_at'])


def downgrade() -> None:
    op.drop_index('ix_relay_token_uses_expires_at', table_name='relay_token_uses')
    op.drop_table('relay_token_uses')
    op.drop_index('ix_nameplates_expires_at', table_name='nameplates')
    op.drop_table('nameplates')
    op.drop_table('server_nodes')
    op.drop_index('ix_console_sessions_last_active', table_name='console_sessions')
    op.drop_index('ix_console_sessions_user_name', table_name='console_sessions')
    op.drop_table('console_sessions')
    op.drop_index('ix_sessions_unfinished_node', table_name='sessions')
    with op.batch_alter_table('sessions', schema=None) as batch_op:
        batch_op.drop_column('node')
    with op.batch_alter_table('hosts', schema=None) as batch_op:
        batch_op.drop_column('node')
