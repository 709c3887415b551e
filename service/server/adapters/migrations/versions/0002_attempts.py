"""Attempts: a job whose Ray job vanished runs again under a new Ray submission id.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("attempt", sa.Integer, nullable=False, server_default="1"))
        batch.add_column(sa.Column("ray_submission_id", sa.String(64), nullable=True))
    with op.batch_alter_table("job_events") as batch:
        batch.add_column(sa.Column("attempt", sa.Integer, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("job_events") as batch:
        batch.drop_column("attempt")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("ray_submission_id")
        batch.drop_column("attempt")
