"""jobs.listed_metrics: a job's metrics without the per-module table, for job lists

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

BATCH = 500


def listed(metrics):
    """A copy of app.jobs.repository.listed_metrics as of this revision (a migration does not follow later code)."""
    compression = metrics.get("compression") if isinstance(metrics, dict) else None
    if not isinstance(compression, dict) or "per_module" not in compression:
        return metrics
    return {**metrics, "compression": {k: v for k, v in compression.items() if k != "per_module"}}


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("listed_metrics", sa.JSON(), nullable=True))
    # Backfill in Python, in batches: the same on SQLite and PostgreSQL, and the stored JSON keeps its key order.
    jobs = sa.table("jobs", sa.column("id", sa.Uuid()), sa.column("metrics", sa.JSON()),
                    sa.column("listed_metrics", sa.JSON()))
    conn = op.get_bind()
    last = None
    while True:
        query = sa.select(jobs.c.id, jobs.c.metrics).where(jobs.c.metrics.is_not(None)).order_by(jobs.c.id).limit(BATCH)
        if last is not None:
            query = query.where(jobs.c.id > last)
        rows = conn.execute(query).all()
        if not rows:
            break
        for job_id, metrics in rows:
            if metrics is not None:
                conn.execute(sa.update(jobs).where(jobs.c.id == job_id).values(listed_metrics=listed(metrics)))
        last = rows[-1][0]


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("listed_metrics")
