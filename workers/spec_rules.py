"""Cross-field rules of the job spec, each returning ``(loc, value, message)`` problems that
``workers.spec`` raises together as one ``ValidationError``; and the one check that needs the
cluster. Every rule is O(1) in the spec's (bounded) numbers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

if TYPE_CHECKING:
    from .spec import JobSpec, MIMSpec


def mim_problems(mim: MIMSpec, cfg: Any) -> list[tuple[tuple[str, ...], Any, str]]:
    problems: list[tuple[tuple[str, ...], Any, str]] = []
    stride = cfg.final_stride
    unit = mim.mask_unit if mim.mask_unit is not None else stride
    if unit % stride:
        problems.append(
            (
                ("mim", "mask_unit"),
                unit,
                f"mask_unit {unit} px is not a multiple of {cfg.name}'s final stride {stride} px "
                f"(patch_size {cfg.patch_size}, {len(cfg.depths)} stages)",
            )
        )
    elif cfg.img_size % unit:
        problems.append(
            (
                ("mim", "mask_unit"),
                unit,
                f"mask_unit {unit} px does not divide img_size {cfg.img_size}",
            )
        )
    else:
        from greenmim_core.masking import num_masked_units

        try:
            num_masked_units((cfg.img_size // unit) ** 2, mim.mask_ratio)
        except ValueError as e:
            problems.append((("mim", "mask_ratio"), mim.mask_ratio, str(e)))
    dim, heads = mim.decoder_dim, mim.decoder_heads
    if dim is not None and heads is not None and dim % heads:
        problems.append(
            (
                ("mim", "decoder_heads"),
                heads,
                f"decoder_dim {dim} is not divisible by decoder_heads {heads}",
            )
        )
    return problems


def spec_error(loc: tuple[str | int, ...], value: Any, msg: str) -> InitErrorDetails:
    return InitErrorDetails(
        type=PydanticCustomError("invalid_spec", "{msg}", {"msg": msg}), loc=loc, input=value
    )


def raise_one(title: str, loc: tuple[str | int, ...], value: Any, msg: str) -> None:
    raise ValidationError.from_exception_data(title, [spec_error(loc, value, msg)])


def validate_against_cluster(spec: JobSpec, cluster_resources: dict[str, float]) -> None:
    """Raise ``ValidationError`` (loc under ``resources``) if the cluster cannot hold the job.

    ``cluster_resources`` is ``ray.cluster_resources()`` (totals over the nodes: ``{"CPU": 8.0,
    "GPU": 1.0, ...}``). Pure: no Ray call here.
    """
    r = spec.resources
    errors = []
    for key, per_worker, field in (
        ("GPU", r.gpus_per_worker, "gpus_per_worker"),
        ("CPU", r.cpus_per_worker, "cpus_per_worker"),
    ):
        need = per_worker * r.num_workers
        have = float(cluster_resources.get(key, 0.0))
        if need > have + 1e-9:
            errors.append(
                spec_error(
                    ("resources", field),
                    per_worker,
                    f"{r.num_workers} workers x {per_worker:g} {key} = {need:g} {key}, "
                    f"but the cluster has {have:g}",
                )
            )
    if errors:
        raise ValidationError.from_exception_data("JobSpec", errors)


def dataset_problems(spec: JobSpec) -> list[tuple[tuple[str, ...], Any, str]]:
    """What can be known of the dataset without listing it: a built-in's size, and
    ``max_samples`` as an upper bound. Other datasets are checked by the workers."""
    data = spec.data
    if data.uri.startswith("builtin:"):
        from .data import builtin_train_size

        n_train = builtin_train_size(data)
    elif data.max_samples is not None:
        n_train = data.max_samples
    else:
        return []
    if spec.steps_per_epoch(n_train) >= 1:
        return []
    gbs, n = spec.train.global_batch_size, spec.resources.num_workers
    return [
        (
            ("train", "global_batch_size"),
            gbs,
            f"the dataset gives at most {n_train} training images, which cannot fill one "
            f"step of {gbs} images over {n} worker(s); lower global_batch_size",
        )
    ]
