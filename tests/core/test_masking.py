"""Masks: exact ratio, equal visible counts per sample, shared vs per-sample, validation."""

import pytest
import torch

from greenmim_core.masking import num_masked_units, random_mask, upsample_mask

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.75, 0.9])
def test_per_sample_masks_have_the_same_count_and_differ(ratio):
    g = torch.Generator().manual_seed(0)
    mask = random_mask(64, (7, 7), ratio, generator=g)
    assert mask.dtype == torch.bool and mask.shape == (64, 7, 7)
    assert (mask.flatten(1).sum(1) == round(ratio * 49)).all()
    assert len({tuple(m.flatten().tolist()) for m in mask}) > 60  # almost surely all distinct


def test_masks_are_uniform_over_units():
    mask = random_mask(20000, (4, 4), 0.75, generator=torch.Generator().manual_seed(1))
    freq = mask.float().mean(0)
    assert (freq - 0.75).abs().max() < 0.02


def test_shared_mask_is_one_mask_for_the_batch():
    mask = random_mask(8, (6, 6), 0.5, per_sample=False, generator=torch.Generator().manual_seed(2))
    assert (mask == mask[0]).all() and mask[0].sum() == 18


def test_upsample_mask_covers_blocks():
    mask = torch.tensor([[[True, False], [False, True]]])
    up = upsample_mask(mask, 3)
    assert up.shape == (1, 6, 6)
    assert up[0, :3, :3].all() and not up[0, :3, 3:].any() and up[0, 3:, 3:].all()


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_ratio_outside_open_interval_names_the_value(ratio):
    with pytest.raises(ValueError, match=f"mask ratio must be in \\(0, 1\\), got {ratio}"):
        random_mask(2, (4, 4), ratio)


def test_ratio_that_rounds_to_nothing_is_rejected():
    with pytest.raises(ValueError, match="masks 0 of 4"):
        num_masked_units(4, 0.1)
