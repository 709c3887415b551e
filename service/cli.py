"""``greenmim``: the command line. The client commands (jobs over HTTP, datasets) and the
operator commands (the local stack, API keys) live in their own rooms; this joins them."""

from __future__ import annotations

from service.client.commands import app
from service.client.data_commands import data_app
from service.stack.commands import register

register(app)
app.add_typer(data_app, name="data")

if __name__ == "__main__":
    app()
