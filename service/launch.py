"""A Ray job's entrypoint: unpack the spec carried in the command and run the workers.

    python -m service.launch --spec-b64 B64 --job-id ID --tenant T --storage-root URI

The spec travels inside the command (a few KiB) so the driver needs nothing from the API's
disk; it is written to a private temporary file for ``python -m workers.run --spec FILE``.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import tempfile


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m service.launch")
    p.add_argument("--spec-b64", required=True)
    p.add_argument("--job-id", required=True)
    p.add_argument("--tenant", required=True)
    p.add_argument("--storage-root", required=True)
    args, rest = p.parse_known_args(argv)  # the rest (the read policy) goes to workers.run
    spec = json.loads(base64.urlsafe_b64decode(args.spec_b64))
    fd, path = tempfile.mkstemp(prefix=f"{args.job_id}-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(spec, f)
    cmd = [
        sys.executable,
        "-m",
        "workers.run",
        "--spec",
        path,
        "--job-id",
        args.job_id,
        "--tenant",
        args.tenant,
        "--storage-root",
        args.storage_root,
        *rest,
    ]
    sys.stdout.flush()
    os.execv(sys.executable, cmd)
    return 127  # not reached: execv replaces this process


if __name__ == "__main__":
    sys.exit(main())
