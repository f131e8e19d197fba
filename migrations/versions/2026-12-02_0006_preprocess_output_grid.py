"""issue 14: jobs record the preprocess mode and the output grid (raw clinical studies)

Revision ID: 14a7e2c5d0b1
Revises: 4d7e2a9c15f0
Create Date: 2026-12-02 06:15:00

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "14a7e2c5d0b1"
down_revision: str | Sequence[str] | None = "4d7e2a9c15f0"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("job", sa.Column("preprocess", sa.String(8), nullable=False, server_default="auto"))
    op.add_column("job", sa.Column("output_grid", sa.String(16), nullable=False, server_default="reference"))


def downgrade() -> None:
    op.drop_column("job", "output_grid")
    op.drop_column("job", "preprocess")
