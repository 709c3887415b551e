"""The GreenMIM model: loss definition, masked-only loss, gradients, reconstructions, configs."""

import pytest
import torch

import greenmim_core as gc
from greenmim_core.mim import GreenMIM, MIMConfig

pytestmark = pytest.mark.unit

SMALL = dict(decoder_dim=32, decoder_depth=1, decoder_heads=4)


def _model(unit=None, norm_pix=True, seed=0):
    torch.manual_seed(seed)
    enc = gc.create_model("swin_micro_patch2_window4_64")
    return GreenMIM(enc, MIMConfig(mask_unit=unit, norm_pix_loss=norm_pix, **SMALL))


def _reference_loss(images, pred, mask, unit, stride, norm_pix):
    """Loss written pixel by pixel: per masked unit, normalise, compare with the predicted pixels."""
    B, C, H, W = images.shape
    total, count = 0.0, 0
    g = H // stride
    for b in range(B):
        for i in range(H // unit):
            for j in range(W // unit):
                if not mask[b, i, j]:
                    continue
                block = images[b, :, i * unit : (i + 1) * unit, j * unit : (j + 1) * unit]
                if norm_pix:
                    block = (block - block.mean()) / (block.var() + 1e-6).sqrt()
                for ti in range(unit // stride):
                    for tj in range(unit // stride):
                        tok = (i * unit // stride + ti) * g + j * unit // stride + tj
                        target = block[
                            :, ti * stride : (ti + 1) * stride, tj * stride : (tj + 1) * stride
                        ]
                        p = pred[b, tok].view(stride, stride, C).permute(2, 0, 1)
                        total += ((p - target) ** 2).mean()
                        count += 1
    return total / count


@pytest.mark.parametrize(("unit", "norm_pix"), [(None, True), (32, True), (None, False)])
def test_loss_equals_pixelwise_reference(unit, norm_pix):
    model = _model(unit, norm_pix)
    images = torch.randn(2, 3, 64, 64)
    loss, pred, mask = model(images)
    expected = _reference_loss(images, pred, mask, model.unit, model.stride, norm_pix)
    assert torch.allclose(loss, expected, atol=1e-5)


def test_loss_ignores_visible_units():
    model = _model()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        _, pred, mask = model(images)
        token_mask = model.token_mask(mask)
        base = model.forward_loss(images, pred, token_mask)
        changed_visible = pred + 5.0 * (~token_mask)[..., None]
        changed_masked = pred + 5.0 * token_mask[..., None]
        assert torch.equal(model.forward_loss(images, changed_visible, token_mask), base)
        assert model.forward_loss(images, changed_masked, token_mask) > base + 1.0


def test_gradients_reach_every_parameter():
    model = _model()
    loss, _, _ = model(torch.randn(4, 3, 64, 64))
    loss.backward()
    missing = [
        n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0
    ]
    assert missing == []


def test_decoder_places_visible_tokens_at_their_positions():
    """The decoder input at visible positions is the embedded encoder token, mask token elsewhere."""
    model = _model()
    images = torch.randn(2, 3, 64, 64)
    mask = model.random_mask(2, generator=torch.Generator().manual_seed(3))
    seen = {}
    hook = model.decoder_blocks.register_forward_pre_hook(
        lambda m, args: seen.setdefault("x", args[0])
    )
    with torch.no_grad():
        latent = model.encoder.forward_visible(images, mask)
        model.forward_decoder(latent, model.token_mask(mask))
    hook.remove()
    x = seen["x"] - model.decoder_pos_embed
    vis = ~model.token_mask(mask)
    assert torch.allclose(x[vis], model.decoder_embed(latent).flatten(0, 1), atol=1e-6)
    assert torch.allclose(
        x[~vis], model.mask_token.expand(int((~vis).sum()), -1, -1)[:, 0], atol=1e-6
    )


def test_patchify_round_trip_and_reconstruction_keeps_visible_pixels():
    model = _model()
    images = torch.randn(2, 3, 64, 64)
    assert torch.equal(model.unpatchify(model.patchify(images)), images)
    with torch.no_grad():
        _, pred, mask = model(images)
        rec = model.reconstruction(images, pred, mask)
    keep = ~mask.repeat_interleave(16, 1).repeat_interleave(16, 2)[:, None].expand_as(images)
    assert torch.equal(rec[keep], images[keep])
    # a perfect prediction reconstructs the masked pixels too
    perfect = model.patchify(model.normalized_images(images)[0])
    assert torch.allclose(model.reconstruction(images, perfect, mask), images, atol=1e-4)


def test_training_reduces_the_loss_on_a_fixed_batch():
    model = _model()
    smooth = torch.nn.functional.interpolate(torch.randn(4, 3, 8, 8), size=64, mode="bilinear")
    images = smooth + 0.05 * torch.randn(4, 3, 64, 64)
    mask = model.random_mask(4, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        loss, _, _ = model(images, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.8 * first


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mask_ratio": 1.0}, "mask_ratio must be in \\(0, 1\\), got 1.0"),
        ({"mask_ratio": 0.0}, "got 0.0"),
        ({"mask_unit": -32}, "mask_unit must be positive, got -32"),
        (
            {"decoder_dim": 30, "decoder_heads": 4},
            "decoder_dim 30 is not divisible by decoder_heads 4",
        ),
    ],
)
def test_bad_mim_configs_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MIMConfig(**kwargs)


def test_mask_unit_must_be_a_multiple_of_the_final_stride():
    enc = gc.create_model("swin_micro_patch2_window4_64")
    with pytest.raises(
        ValueError, match="mask unit 24 is not a multiple of the encoder's final stride 16"
    ):
        GreenMIM(enc, MIMConfig(mask_unit=24, **SMALL))
