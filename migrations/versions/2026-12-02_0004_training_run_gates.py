"""training runs record the trainer's gates between stages

Revision ID: 9c3f51e0a7b2
Revises: 5e1a0c7d2b94
Create Date: 2026-12-02 01:40:00

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "9c3f51e0a7b2"
down_revision: str | Sequence[str] | None = "5e1a0c7d2b94"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("training_run", sa.Column("gates", sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_column("training_run", "gates")
