"""``greenmim``: the command line. The client commands (jobs over HTTP) and the operator
commands (the local stack, API keys) live in their own rooms; this joins them."""

from __future__ import annotations

from service.client.commands import app
from service.stack.commands import register

register(app)

if __name__ == "__main__":
    app()
