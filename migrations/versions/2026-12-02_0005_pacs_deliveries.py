"""issue 15: deliveries of results to DICOM nodes, and pull jobs' source

Revision ID: 4d7e2a9c15f0
Revises: 9c3f51e0a7b2
Create Date: 2026-12-02 06:00:00

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "4d7e2a9c15f0"
down_revision: str | Sequence[str] | None = "9c3f51e0a7b2"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("job", sa.Column("source", sa.JSON(), nullable=True))
    op.create_table(
        "delivery",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("job_id", sa.String(36), nullable=False),
        sa.Column("node", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("instances", sa.Integer(), nullable=True),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("verified_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_delivery"),
        sa.ForeignKeyConstraint(["job_id"], ["job.id"], name="fk_delivery_job_id_job", ondelete="CASCADE"),
        sa.UniqueConstraint("job_id", "node", name="uq_delivery_job_node"),
    )
    op.create_index("ix_delivery_job_id", "delivery", ["job_id"])
    op.create_index("ix_delivery_status_next_attempt_at", "delivery", ["status", "next_attempt_at"])


def downgrade() -> None:
    op.drop_index("ix_delivery_status_next_attempt_at", "delivery")
    op.drop_index("ix_delivery_job_id", "delivery")
    op.drop_table("delivery")
    op.drop_column("job", "source")
