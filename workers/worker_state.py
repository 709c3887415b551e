"""What a training worker carries besides the loop: its config (shipped by Ray), its log
buffer, peak memory, and the compatibility check of a checkpoint it resumes from."""

from __future__ import annotations

import io
import logging
import resource
from dataclasses import dataclass
from typing import Any

import torch

from greenmim_core.checkpoint import check_config

from .artifacts import LOGS
from .spec import JobSpec
from .storage import write_bytes
from .uri_policy import ReadPolicy


@dataclass(frozen=True)
class WorkerConfig:
    """``train_loop_config`` of the TorchTrainer (plain data so that Ray can ship it)."""

    spec: dict[str, Any]
    storage_root: str
    tenant: str
    job_id: str
    s3: dict[str, Any] | None = None
    metrics_flush_s: float = 5.0
    protected: tuple[str, ...] = ()  # the read policy (workers.uri_policy), checked again here
    allowed_prefixes: tuple[str, ...] = ()

    def read_policy(self) -> ReadPolicy:
        return ReadPolicy.of(self.storage_root, self.protected, self.allowed_prefixes)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class LogBuffer(logging.Handler):
    """Keeps this attempt's log lines so rank 0 can store them under ``logs/``."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def check_compatible(state: dict[str, Any], spec: JobSpec, built) -> None:
    if state.get("arch") is not None:
        check_config(state["arch"], built.cfg)
    if state.get("kind") not in (None, spec.kind):
        raise ValueError(f"checkpoint is from a {state['kind']} job, this is a {spec.kind} job")


def store_logs(fs, job: str, attempt: int, logs: LogBuffer) -> None:
    buf = io.StringIO()
    buf.write("\n".join(logs.lines) + "\n")
    write_bytes(fs, f"{job}/{LOGS}/rank0-attempt{attempt:04d}.log", buf.getvalue().encode())
