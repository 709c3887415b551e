"""The job spec: one pydantic schema for HTTP bodies, CLI YAML files and the worker entry point.

Everything that can be checked without a cluster is checked here, so a spec that validates
can run: unknown fields are rejected, every number has documented bounds and must be finite,
and the cross-field rules (``workers.spec_rules``: mask unit against the final stride, batch
against workers, accumulation and a known dataset size, the sections each kind needs) hold.
Every error's ``loc`` names the field, e.g. ``("mim", "mask_unit")``. The bounds keep every
check cheap (the ``accum_steps: auto`` loop runs at most ``isqrt(MAX_BATCH)`` times). No Ray.

    python -m workers.spec --schema       # JSON schema
    python -m workers.spec SPEC.json      # validate a spec file, print the normalised spec
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails

import greenmim_core

from .spec_data import BUILTIN_DATASETS, DataSpec
from .spec_data import STRICT as _STRICT
from .spec_file import read_spec_file
from .spec_rules import dataset_problems, mim_problems, raise_one, spec_error
from .uri_policy import lexical_uri

__all__ = ["BUILTIN_DATASETS", "DataSpec", "JobSpec"]

MAX_BATCH = 65_536  # images per optimiser step, all workers
MAX_MICRO_BATCH = 4_096
MAX_EPOCHS = 100_000


class TrainSpec(BaseModel):
    """Optimisation. The peak learning rate is ``base_lr * global_batch_size / 256``."""

    model_config = _STRICT

    epochs: int = Field(..., ge=1, le=MAX_EPOCHS)
    global_batch_size: int = Field(
        ..., ge=1, le=MAX_BATCH, description="images per optimiser step, all workers"
    )
    base_lr: float = Field(1.5e-4, gt=0.0, le=10.0, description="lr per 256 images")
    min_lr: float = Field(1e-6, ge=0.0, le=10.0, description="floor of the cosine schedule")
    warmup_epochs: float = Field(0.0, ge=0.0, le=MAX_EPOCHS)
    weight_decay: float = Field(0.05, ge=0.0, le=10.0)
    img_size: int | None = Field(None, ge=8, le=4096, description="override the model's image size")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on CUDA, fp32 on CPU"
    )
    compile: bool = Field(
        False, description="torch.compile the encoder blocks' token-wise layers (norms, MLP)"
    )
    grad_clip: float | None = Field(
        None, gt=0.0, le=1e6, description="max global grad norm; none = no clipping"
    )
    accum_steps: int | Literal["auto"] = Field(
        "auto",
        json_schema_extra={"minimum": 1, "maximum": MAX_BATCH},
        description="micro-steps per optimiser step; auto keeps micro batches <= max_micro_batch",
    )
    max_micro_batch: int = Field(
        64, ge=1, le=MAX_MICRO_BATCH, description="per-worker images per forward pass (auto accum)"
    )
    seed: int = Field(0, ge=0, le=2**31 - 1)

    @field_validator("accum_steps")
    @classmethod
    def _check_accum(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 1 <= v <= MAX_BATCH:
            raise ValueError(f"accum_steps must be 1..{MAX_BATCH} or 'auto', got {v}")
        return v

    @model_validator(mode="after")
    def _check_schedule(self) -> TrainSpec:
        if self.warmup_epochs >= self.epochs and self.warmup_epochs > 0:
            raise_one(
                "TrainSpec",
                ("warmup_epochs",),
                self.warmup_epochs,
                f"warmup_epochs ({self.warmup_epochs}) must be shorter than epochs ({self.epochs})",
            )
        if (
            "min_lr" in self.model_fields_set
            and self.min_lr > self.base_lr * self.global_batch_size / 256
        ):
            raise_one(
                "TrainSpec",
                ("min_lr",),
                self.min_lr,
                f"min_lr ({self.min_lr}) exceeds the peak lr base_lr*global_batch_size/256",
            )
        return self


class MIMSpec(BaseModel):
    """GreenMIM pretraining options; ``None`` fields take ``greenmim_core.mim.MIMConfig``'s defaults."""

    model_config = _STRICT

    mask_ratio: float = Field(0.75, gt=0.0, lt=1.0)
    mask_unit: int | None = Field(
        None, ge=1, le=4096, description="pixels; default = the encoder's final stride"
    )
    per_sample_mask: bool = True
    norm_pix_loss: bool = True
    decoder_dim: int | None = Field(None, ge=8, le=4096)
    decoder_depth: int | None = Field(None, ge=1, le=64)
    decoder_heads: int | None = Field(None, ge=1, le=128)

    def config_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``greenmim_core.mim.MIMConfig`` (unset fields left to its defaults)."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


class FinetuneSpec(BaseModel):
    """Fine-tuning of the dense encoder plus a linear head."""

    model_config = _STRICT

    init_from: str | None = Field(
        None,
        description="'job:<id>' (a finished pretrain job of the same tenant), a checkpoint URI "
        "(path, file://, s3:// to model.safetensors, a .pth/.pt/.bin file or a checkpoint "
        "folder), or 'scratch' for random initialisation",
    )
    num_classes: int | None = Field(
        None, ge=2, le=100_000, description="default: the dataset's classes"
    )
    layer_decay: float = Field(0.9, gt=0.0, le=1.0, description="layer-wise lr decay")
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)
    mixup: float = Field(0.8, ge=0.0, le=100.0, description="mixup alpha (0 = off)")
    cutmix: float = Field(1.0, ge=0.0, le=100.0, description="cutmix alpha (0 = off)")
    mixup_prob: float = Field(1.0, ge=0.0, le=1.0)
    drop_path_rate: float = Field(0.1, ge=0.0, lt=1.0)

    @field_validator("init_from")
    @classmethod
    def _check_init(cls, v: str | None) -> str | None:
        if v is None or v == "scratch":
            return v
        if v.startswith("job:"):
            if not v.removeprefix("job:").strip():
                raise ValueError("init_from 'job:<id>' needs a job id")
            return v
        if v.startswith("builtin:"):
            raise ValueError("init_from names weights: 'job:<id>', a checkpoint URI or 'scratch'")
        lexical_uri(v)  # raises naming the accepted forms
        return v


class ResourcesSpec(BaseModel):
    """What each Ray Train worker asks the cluster for."""

    model_config = _STRICT

    num_workers: int = Field(1, ge=1, le=1024)
    gpus_per_worker: float = Field(0.0, ge=0.0, le=16.0)
    cpus_per_worker: float = Field(1.0, gt=0.0, le=256.0)
    max_failures: int = Field(
        2, ge=-1, le=1000, description="worker-group restarts allowed (-1 = unlimited)"
    )

    @field_validator("gpus_per_worker")
    @classmethod
    def _whole_or_fraction(cls, v: float) -> float:
        if v > 1 and v != int(v):
            raise ValueError(f"gpus_per_worker above 1 must be a whole number, got {v}")
        return v


class CheckpointSpec(BaseModel):
    model_config = _STRICT

    every_epochs: int = Field(
        1, ge=1, le=MAX_EPOCHS, description="checkpoint interval; the last epoch is always saved"
    )
    keep_last: int = Field(2, ge=1, le=1000, description="checkpoints kept (oldest deleted)")


class JobSpec(BaseModel):
    """A pretraining or fine-tuning job. Field order matters: later checks read earlier fields."""

    model_config = _STRICT

    kind: Literal["pretrain", "finetune"]
    model: str = Field(..., description="a registered architecture (GET /v1/models)")
    data: DataSpec
    train: TrainSpec
    resources: ResourcesSpec = Field(default_factory=lambda: ResourcesSpec.model_validate({}))
    checkpoint: CheckpointSpec = Field(default_factory=lambda: CheckpointSpec.model_validate({}))
    mim: MIMSpec | None = Field(None, description="pretrain only; defaults apply when omitted")
    finetune: FinetuneSpec | None = Field(None, description="finetune only; required there")

    @field_validator("model")
    @classmethod
    def _check_model(cls, name: str) -> str:
        valid = greenmim_core.list_models()
        if name not in valid:
            raise ValueError(f"unknown model {name!r}; valid names: {', '.join(valid)}")
        return name

    @model_validator(mode="before")
    @classmethod
    def _default_mim(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("kind") == "pretrain" and data.get("mim") is None:
            return {**data, "mim": {}}
        return data

    @model_validator(mode="after")
    def _check_cross_fields(self) -> JobSpec:
        errors: list[InitErrorDetails] = []

        def err(loc: tuple[str | int, ...], value: Any, msg: str) -> None:
            errors.append(spec_error(loc, value, msg))

        cfg = None
        try:
            cfg = self.arch_config()
        except ValueError as e:
            where: tuple[str, ...] = ("train", "img_size") if self.train.img_size else ("model",)
            err(where, self.train.img_size or self.model, str(e))

        if self.kind == "pretrain":
            if self.finetune is not None:
                err(("finetune",), "...", "a pretrain job takes no 'finetune' section")
            if cfg is not None and self.mim is not None:
                for loc, value, msg in mim_problems(self.mim, cfg):
                    err(loc, value, msg)
        else:
            if self.mim is not None:
                err(("mim",), "...", "a finetune job takes no 'mim' section")
            if self.finetune is None:
                err(("finetune",), None, "a finetune job needs a 'finetune' section with init_from")
            elif self.finetune.init_from is None:
                err(
                    ("finetune", "init_from"),
                    None,
                    "init_from is required: 'job:<id>', a checkpoint URI, or 'scratch'",
                )

        n = self.resources.num_workers
        gbs = self.train.global_batch_size
        if gbs % n:
            err(
                ("train", "global_batch_size"),
                gbs,
                f"global_batch_size {gbs} is not divisible by resources.num_workers {n}",
            )
        elif isinstance(self.train.accum_steps, int) and (gbs // n) % self.train.accum_steps:
            err(
                ("train", "accum_steps"),
                self.train.accum_steps,
                f"per-worker batch {gbs // n} is not divisible by accum_steps {self.train.accum_steps}",
            )
        elif self._uses_mixup() and self.micro_batch % 2:
            err(
                ("train", "global_batch_size"),
                gbs,
                f"mixup/cutmix need an even micro batch; {gbs} images over {n} workers and "
                f"{self.accum_steps} accumulation steps give {self.micro_batch}",
            )
        if not errors:
            for loc, value, msg in dataset_problems(self):
                err(loc, value, msg)
        if errors:
            raise ValidationError.from_exception_data(type(self).__name__, errors)
        return self

    # derived values (used by the workers; all valid once the spec validated)

    def _uses_mixup(self) -> bool:
        ft = self.finetune
        return ft is not None and (ft.mixup > 0 or ft.cutmix > 0)

    def arch_config(self) -> Any:
        """The ``greenmim_core`` encoder config of this job (image size and drop path applied)."""
        overrides: dict[str, Any] = {}
        if self.train.img_size is not None:
            overrides["img_size"] = self.train.img_size
        if self.kind == "finetune" and self.finetune is not None:
            overrides["drop_path_rate"] = self.finetune.drop_path_rate
        return greenmim_core.get_config(self.model, **overrides)

    @property
    def per_worker_batch(self) -> int:
        return self.train.global_batch_size // self.resources.num_workers

    @property
    def accum_steps(self) -> int:
        """Micro-steps per optimiser step; ``auto`` = fewest that keep micro batches <= max_micro_batch."""
        if isinstance(self.train.accum_steps, int):
            return self.train.accum_steps
        b = self.per_worker_batch
        lowest = -(-b // self.train.max_micro_batch)
        # the smallest divisor of b that is >= lowest, from the divisor pairs (d, b // d)
        pairs = (k for d in range(1, math.isqrt(b) + 1) if b % d == 0 for k in (d, b // d))
        return min(k for k in pairs if k >= lowest)

    @property
    def micro_batch(self) -> int:
        return self.per_worker_batch // self.accum_steps

    def steps_per_epoch(self, num_train: int) -> int:
        """Optimiser steps per epoch: each worker gets ``num_train // W`` images, drop-last."""
        return num_train // self.resources.num_workers // self.per_worker_batch

    @property
    def peak_lr(self) -> float:
        return self.train.base_lr * self.train.global_batch_size / 256


def job_spec_schema() -> dict[str, Any]:
    return JobSpec.model_json_schema()  # what POST /v1/jobs accepts


def load_spec(path: str | Path) -> JobSpec:
    """Read (``workers.spec_file``) and validate a JSON or YAML spec file."""
    return JobSpec.model_validate(read_spec_file(path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser("python -m workers.spec", description=__doc__.split("\n")[0])
    parser.add_argument("--schema", action="store_true", help="print the JSON schema of JobSpec")
    parser.add_argument("spec", nargs="?", help="a spec file to validate")
    args = parser.parse_args(argv)
    if args.schema:
        sys.stdout.write(json.dumps(job_spec_schema(), indent=2) + "\n")
        return 0
    if not args.spec:
        parser.error("give --schema or a spec file")  # exits
    try:
        sys.stdout.write(load_spec(args.spec).model_dump_json(indent=2) + "\n")
    except ValidationError as e:
        sys.stderr.write(f"invalid spec {args.spec}:\n{e}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
