"""training runs, model versions

Revision ID: 7814011504c2
Revises: fbc47c4195ba
Create Date: 2026-11-22 03:06:35.121178

"""
from collections.abc import Sequence

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '7814011504c2'
down_revision: str | Sequence[str] | None = 'fbc47c4195ba'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table('training_run',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('owner_id', sa.String(length=36), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('stage', sa.String(length=16), nullable=True),
    sa.Column('progress', sa.Integer(), nullable=False),
    sa.Column('preset', sa.String(length=100), nullable=False),
    sa.Column('dataset', sa.JSON(), nullable=False),
    sa.Column('params', sa.JSON(), nullable=False),
    sa.Column('history', sa.JSON(), nullable=False),
    sa.Column('log_tail', sa.Text(), nullable=False),
    sa.Column('checkpoint', sa.JSON(), nullable=True),
    sa.Column('model_version', sa.String(length=100), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('worker_id', sa.String(length=200), nullable=True),
    sa.Column('fencing_token', sa.String(length=36), nullable=True),
    sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('cancel_requested', sa.Boolean(), nullable=False),
    sa.Column('error_code', sa.String(length=64), nullable=True),
    sa.Column('error_message', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['owner_id'], ['api_key.id'], name=op.f('fk_training_run_owner_id_api_key')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_training_run'))
    )
    with op.batch_alter_table('training_run', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_training_run_owner_id'), ['owner_id'], unique=False)
        batch_op.create_index('ix_training_run_status_created_at', ['status', 'created_at'], unique=False)

    op.create_table('model_version',
    sa.Column('version', sa.String(length=100), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('preset', sa.String(length=100), nullable=True),
    sa.Column('modalities', sa.JSON(), nullable=False),
    sa.Column('storage_prefix', sa.String(length=300), nullable=True),
    sa.Column('local_path', sa.Text(), nullable=True),
    sa.Column('metrics', sa.JSON(), nullable=False),
    sa.Column('training_run_id', sa.String(length=36), nullable=True),
    sa.Column('base_version', sa.String(length=100), nullable=True),
    sa.Column('previous_version', sa.String(length=100), nullable=True),
    sa.Column('promoted_forced', sa.Boolean(), nullable=False),
    sa.Column('promotion_reason', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('promoted_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['training_run_id'], ['training_run.id'], name=op.f('fk_model_version_training_run_id_training_run')),
    sa.PrimaryKeyConstraint('version', name=op.f('pk_model_version'))
    )
    with op.batch_alter_table('model_version', schema=None) as batch_op:
        batch_op.create_index('uq_model_version_serving', ['status'], unique=True, postgresql_where=sa.text("status = 'serving'"), sqlite_where=sa.text("status = 'serving'"))



def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('model_version', schema=None) as batch_op:
        batch_op.drop_index('uq_model_version_serving', postgresql_where=sa.text("status = 'serving'"), sqlite_where=sa.text("status = 'serving'"))

    op.drop_table('model_version')
    with op.batch_alter_table('training_run', schema=None) as batch_op:
        batch_op.drop_index('ix_training_run_status_created_at')
        batch_op.drop_index(batch_op.f('ix_training_run_owner_id'))

    op.drop_table('training_run')
