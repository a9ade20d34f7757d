"""Budgets: limits per agent and task, usage per period, open reservations by call id.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "budgets",
        sa.Column("scope", sa.String(8), primary_key=True),
        sa.Column("subject", sa.String(128), primary_key=True),
        sa.Column("limit_value", sa.Float, nullable=False),
        sa.Column("period", sa.String(8), nullable=False),
        sa.Column("created_at", sa.String(32), nullable=False),
        sa.Column("updated_at", sa.String(32), nullable=False),
    )
    op.create_table(
        "budget_usage",
        sa.Column("scope", sa.String(8), primary_key=True),
        sa.Column("subject", sa.String(128), primary_key=True),
        sa.Column("period", sa.String(8), primary_key=True),
        sa.Column("period_start", sa.String(32), primary_key=True),
        sa.Column("spent", sa.Float, nullable=False),
        sa.Column("reserved", sa.Float, nullable=False),
    )
    op.create_table(
        "budget_reservations",
        sa.Column("call_id", sa.String(64), primary_key=True),
        sa.Column("scope", sa.String(8), primary_key=True),
        sa.Column("subject", sa.String(128), nullable=False),
        sa.Column("period", sa.String(8), nullable=False),
        sa.Column("period_start", sa.String(32), nullable=False),
        sa.Column("amount", sa.Float, nullable=False),
        sa.Column("instance", sa.String(64), nullable=False, index=True),
        sa.Column("created_at", sa.String(32), nullable=False, index=True),
    )


def downgrade() -> None:
    for table in ("budget_reservations", "budget_usage", "budgets"):
        op.drop_table(table)
