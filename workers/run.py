"""Run one job spec on a Ray cluster: the Ray Job entrypoint the service submits.

    python -m workers.run --spec SPEC.json --job-id ID --tenant TENANT --storage-root URI
    python -m workers.run --spec-json '{"kind": ...}' ...   # what the service submits to Ray

Connects to the running cluster (``RAY_ADDRESS``, else ``auto``; with token auth the usual
``RAY_AUTH_MODE=token`` plus ``RAY_AUTH_TOKEN``/``RAY_AUTH_TOKEN_PATH``), runs a TorchTrainer
to completion and writes ``result.json`` under the job prefix. S3 settings come from
``GREENMIM_S3_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``.

Exit codes: 0 succeeded; 2 the spec or its inputs are invalid (nothing was scheduled; the
message says which field); 1 training failed after it started (``result.json`` has the error);
130 interrupted (SIGINT/SIGTERM, e.g. ``ray job stop``; ``result.json`` says ``cancelled``).

Everything that can be checked without training is checked before Ray is touched: the spec,
the storage root, the dataset listing and size, the initial weights of a fine-tune. Running
the same job id again resumes from its latest checkpoint (Ray Train restores the run named
``checkpoints`` under the job prefix); a different spec under an existing job id is refused.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from .artifacts import (
    CHECKPOINTS,
    SPEC,
    latest_checkpoint,
    next_attempt,
    read_json,
    utc_now,
    write_json,
)
from .images import DataError, clear_data_errors, read_data_errors
from .outcome import error_record, record_result, storage_cause
from .sources import job_problems, open_source
from .spec import JobSpec, load_spec
from .spec_rules import validate_against_cluster
from .storage import S3Settings, StorageRoot, exists, open_root
from .uri_policy import ReadPolicy

logger = logging.getLogger("workers.run")


class SpecError(ValueError):
    """The job cannot run as specified; nothing was scheduled. ``field`` is a dotted spec path
    (``data.uri``, ``finetune.init_from``, ``resources.gpus_per_worker``) or ``storage``/``job_id``."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


@dataclass
class Prepared:
    spec: JobSpec
    root: StorageRoot
    job_prefix: str
    s3: S3Settings | None
    num_train: int
    steps_per_epoch: int
    policy: ReadPolicy


def prepare(
    spec: JobSpec,
    storage_root: str,
    tenant: str,
    job_id: str,
    s3: S3Settings | None = None,
    policy: ReadPolicy | None = None,
) -> Prepared:
    """All checks that need no cluster; writes nothing. Raises ``SpecError``.

    ``policy`` (default: that of ``storage_root`` alone) decides which locations the job may
    read; the service checked it at submit, this checks it again where the data is opened."""
    from .model import resolve_init_from

    try:
        root = open_root(storage_root, s3)
        job_prefix = root.job_prefix(tenant, job_id)
        policy = policy or ReadPolicy.of(storage_root)
    except ValueError as e:
        raise SpecError("storage", str(e)) from e
    try:
        data_uri = policy.check(spec.data.uri, "data.uri")
        source = open_source(spec.data.model_copy(update={"uri": data_uri}), s3)
    except (ValueError, OSError) as e:
        raise SpecError("data.uri", str(e).removeprefix("data.uri: ")) from e
    problems = job_problems(spec, source)
    if problems:
        raise SpecError(*problems[0])
    n_steps = source.steps_per_epoch(spec)
    if spec.kind == "finetune":
        assert spec.finetune is not None
        if spec.finetune.init_from not in (None, "scratch"):
            try:
                resolve_init_from(spec.finetune.init_from, root, tenant, s3, policy)
            except ValueError as e:
                raise SpecError(
                    "finetune.init_from", str(e).removeprefix("finetune.init_from: ")
                ) from e

    spec_path = f"{job_prefix}/{SPEC}"
    if exists(root.fs, spec_path) and read_json(root.fs, spec_path) != json.loads(
        spec.model_dump_json()
    ):
        raise SpecError(
            "job_id", f"job {job_id!r} already exists under {tenant!r} with a different spec"
        )
    return Prepared(spec, root, job_prefix, s3, source.num_train, n_steps, policy)


def build_trainer(
    p: Prepared,
    tenant: str,
    job_id: str,
    metrics_flush_s: float = 5.0,
    max_failures: int | None = None,
):
    import ray.train
    from ray.train.torch import TorchTrainer

    from .train import WorkerConfig, train_loop_per_worker

    r = p.spec.resources
    resources: dict[str, float] = {"CPU": r.cpus_per_worker}
    if r.gpus_per_worker:
        resources["GPU"] = r.gpus_per_worker
    config = WorkerConfig(
        spec=json.loads(p.spec.model_dump_json()),
        storage_root=p.root.uri,
        tenant=tenant,
        job_id=job_id,
        s3=None if p.s3 is None else {**p.s3.__dict__},
        metrics_flush_s=metrics_flush_s,
        protected=p.policy.protected,
        allowed_prefixes=p.policy.allowed_prefixes,
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config.to_dict(),
        scaling_config=ray.train.ScalingConfig(
            num_workers=r.num_workers, use_gpu=r.gpus_per_worker > 0, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=CHECKPOINTS,
            storage_path=p.job_prefix,
            storage_filesystem=p.root.fs,
            failure_config=ray.train.FailureConfig(
                max_failures=r.max_failures if max_failures is None else max_failures
            ),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=p.spec.checkpoint.keep_last),
        ),
    )


def run_job(p: Prepared, tenant: str, job_id: str, metrics_flush_s: float = 5.0) -> dict[str, Any]:
    """Check ``p`` (from ``prepare``) against the connected cluster, train, write ``result.json``.

    Raises ``SpecError`` before anything is scheduled; a training failure is recorded in
    ``result.json`` and re-raised. The caller has connected to Ray (``ray.init``)."""
    import ray

    spec = p.spec
    try:
        validate_against_cluster(spec, ray.cluster_resources())
    except ValidationError as e:
        loc = e.errors()[0]["loc"]
        raise SpecError(".".join(map(str, loc)), _format_validation(e)) from e
    spec_path = f"{p.job_prefix}/{SPEC}"
    if exists(p.root.fs, spec_path):
        logger.info("job %s exists: resuming from its latest checkpoint", job_id)
    else:
        write_json(p.root.fs, spec_path, json.loads(spec.model_dump_json()))
    started = time.time()
    result: dict[str, Any] = {
        "job_id": job_id,
        "tenant": tenant,
        "kind": spec.kind,
        "started": utc_now(),
    }
    clear_data_errors(p.root.fs, p.job_prefix)
    try:
        fit = fit_within_budget(p, tenant, job_id, metrics_flush_s)
        # data errors end the workers normally (not retried by Ray Train): fail once here
        data_errors = read_data_errors(p.root.fs, p.job_prefix)
        if data_errors:
            raise DataError(" | ".join(dict.fromkeys(data_errors)))
    except KeyboardInterrupt:
        result.update(status="cancelled")
        raise
    except BaseException as e:
        result.update(status="failed", error=error_record(e))
        raise
    else:
        result.update(status="succeeded", metrics=_plain(fit.metrics or {}))
    finally:
        result.update(finished=utc_now(), wall_s=round(time.time() - started, 3), **_progress(p))
        record_result(p.root.fs, p.job_prefix, result)  # result.json, and the log's last word
    return result


RESTART_BACKOFF_S = (2.0, 60.0)  # first wait, cap; doubling


def fit_within_budget(p: Prepared, tenant: str, job_id: str, metrics_flush_s: float = 5.0):
    """``TorchTrainer.fit`` with one failure budget, ``resources.max_failures``, for all failures.

    Ray Train restarts failed worker groups itself, but fails the run at once when its own
    controller cannot write to the store (its run snapshot) once the store's retries are spent.
    Such a storage failure is restarted here after a doubling backoff; each restart, and each
    worker-group restart that Ray did within the failed run (counted by metric attempts), is
    charged to the budget, and the next run gets what is left."""
    import ray.train

    budget, used, restarts = p.spec.resources.max_failures, 0, 0
    while True:
        left = -1 if budget < 0 else budget - used
        before = _attempts(p)
        try:
            return build_trainer(p, tenant, job_id, metrics_flush_s, max_failures=left).fit()
        except Exception as e:  # worker-group failures were Ray's to restart, within left
            cause = None if isinstance(e, ray.train.WorkerGroupError) else storage_cause(e)
            used += 1 + max(0, _attempts(p) - before - 1)
            if cause is None or (budget >= 0 and used > budget):
                raise
            delay = min(RESTART_BACKOFF_S[0] * 2**restarts, RESTART_BACKOFF_S[1])
            restarts += 1
            logger.warning(
                "storage failure (%s: %s); restarting the run in %.0fs (%d of %s failures used)",
                type(cause).__name__, cause, delay, used, budget if budget >= 0 else "unlimited",
            )  # fmt: skip
            time.sleep(delay)


def _attempts(p: Prepared) -> int:
    """Attempts begun so far (metric markers); 0 if the store cannot say."""
    try:
        return next_attempt(p.root.fs, p.job_prefix)
    except OSError:
        return 0


def _progress(p: Prepared) -> dict[str, Any]:
    """Epoch, step and name of the newest listed checkpoint (None if the store cannot say)."""
    try:
        ckpt = latest_checkpoint(p.root.fs, p.job_prefix)
    except OSError as e:
        logger.warning("cannot list the checkpoints for the result: %s", e)
        return {"epoch": None, "step": None, "latest_checkpoint": None}
    return {
        "epoch": ckpt.epoch if ckpt else 0,
        "step": ckpt.step if ckpt else 0,
        "latest_checkpoint": ckpt.name if ckpt else None,
    }


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if isinstance(v, int | float | str | bool) or v is None}


def _format_validation(e: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m workers.run", description="Run a GreenMIM job on Ray."
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--spec", help="job spec file (JSON, or YAML by suffix)")
    source.add_argument("--spec-json", help="the job spec itself, as JSON (what the service sends)")
    parser.add_argument("--job-id", required=True)
    parser.add_argument("--tenant", required=True)
    parser.add_argument(
        "--storage-root", required=True, help="/abs/path, file:///abs/path or s3://bucket/prefix"
    )
    parser.add_argument(
        "--protected",
        action="append",
        default=[],
        help="a location jobs may not read (repeatable; the storage root always is)",
    )
    parser.add_argument(
        "--allowed-prefix",
        action="append",
        default=[],
        help="with any given, jobs read only under these (repeatable)",
    )
    parser.add_argument(
        "--address", default=None, help="Ray address (default: $RAY_ADDRESS or auto)"
    )
    parser.add_argument(
        "--metrics-flush-s", type=float, default=5.0, help="seconds between metric writes"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    where = args.spec or "(inline)"
    try:
        spec = load_spec(args.spec) if args.spec else JobSpec.model_validate_json(args.spec_json)
    except ValidationError as e:
        logger.error("invalid spec %s: %s", where, _format_validation(e))
        return 2
    except (OSError, ValueError) as e:
        logger.error("cannot read spec %s: %s", where, e)
        return 2
    s3 = (
        S3Settings.from_env()
        if args.storage_root.startswith("s3://") or spec.data.uri.startswith("s3://")
        else None
    )
    try:
        # fail on bad inputs before connecting to Ray at all
        policy = ReadPolicy.of(args.storage_root, args.protected, args.allowed_prefix)
        prepared = prepare(spec, args.storage_root, args.tenant, args.job_id, s3, policy)
    except (SpecError, ValueError) as e:
        logger.error("job %s rejected: %s", args.job_id, e)
        return 2

    import ray

    # Ray Train's controller polls its workers every 2 s by default, so a finished or failed
    # run is noticed up to 2 s late; 0.5 s is a few cheap calls a second. An operator's own
    # setting wins. Read by the controller, to which Ray Train passes the driver's value.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    ray.init(address=args.address or os.environ.get("RAY_ADDRESS") or "auto", log_to_driver=True)
    # Ray's job stop sends SIGTERM (then SIGKILL): unwind like Ctrl-C so result.json says so.
    # Installed after ray.init, which sets a C++ handler that aborts the process.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        result = run_job(prepared, args.tenant, args.job_id, args.metrics_flush_s)
    except SpecError as e:
        logger.error("job %s rejected: %s", args.job_id, e)
        return 2
    except KeyboardInterrupt:
        logger.error("job %s cancelled", args.job_id)
        return 130
    except Exception as e:
        logger.error("job %s failed: %s: %s", args.job_id, type(e).__name__, e)
        return 1
    logger.info("job %s succeeded: %s", args.job_id, json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
