"""Masks and encoder plans made ahead of the training step, e.g. in data-loader processes.

Planning is pure CPU work on the mask alone (``GreenSwin.plan``); done with the batch in the
loader's worker processes it never delays the step. ``MaskPlanner`` is a small picklable
description (the frozen configs); each process builds, once, a weightless model on the
``meta`` device and calls the very methods the model would call itself, so a plan made here
is the plan the model would make.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from .mim import GreenMIM, MIMConfig
from .swin import EncoderPlan


@functools.lru_cache(maxsize=4)
def _meta_model(arch: Any, mim: MIMConfig) -> GreenMIM:
    with torch.device("meta"):
        return GreenMIM(arch.build(), mim)


@dataclass(frozen=True)
class MaskPlanner:
    """``mask, plan = planner(batch, generator)``: ``GreenMIM.random_mask`` + ``encoder.plan``.

    arch: the encoder's frozen config (e.g. ``SwinConfig``, anything with ``build()``).
    mim:  the ``MIMConfig`` of the model that will consume the masks.
    The mask is (B, Hu, Wu) bool, True = masked, as everywhere in the package.
    """

    arch: Any
    mim: MIMConfig

    def model(self) -> GreenMIM:
        """The weightless model this process plans with (built once; a forked loader process
        inherits it when the parent built it first)."""
        return _meta_model(self.arch, self.mim)

    def __call__(
        self, batch: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, EncoderPlan]:
        model = self.model()
        mask = model.random_mask(batch, generator=generator)
        return mask, model.encoder.plan(mask)
