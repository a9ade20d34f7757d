"""On behalf of users: delegations, and the user a call acted for in every audit record.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "delegations",
        sa.Column("user_id", sa.String(128), primary_key=True),
        sa.Column("agent_id", sa.String(64), primary_key=True),
        sa.Column("capabilities", sa.Text, nullable=False),
        sa.Column("expires_at", sa.String(32), nullable=True),
        sa.Column("created_at", sa.String(32), nullable=False),
        sa.Column("created_by", sa.String(200), nullable=False),
    )
    with op.batch_alter_table("audit_events") as batch:
        batch.add_column(sa.Column("user_id", sa.String(128), nullable=True))
    op.create_index("ix_audit_events_user_id", "audit_events", ["user_id"])


def downgrade() -> None:
    op.drop_index("ix_audit_events_user_id", table_name="audit_events")
    with op.batch_alter_table("audit_events") as batch:
        batch.drop_column("user_id")
    op.drop_table("delegations")
