"""Alembic's environment: always run from ``service.server.adapters.db.migrate``, on the connection it passes."""

from alembic import context

from service.server.adapters.db import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
