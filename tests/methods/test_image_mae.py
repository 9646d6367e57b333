"""The image MAE (sslcell.methods.image_mae): MAEDecoder, mae_loss, and ImageMAE joining them to the ViT encoder.

The encoder half (patchify, random_masking, the visible-token encoder) is tested in tests/encoders/test_vit.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from sslcell.encoders.vit import ViTEncoder
from sslcell.errors import ConfigError, InputError
from sslcell.methods import build_method
from sslcell.methods.image_mae import ImageMAE, MAEDecoder, mae_loss
from tests.conftest import tiny_image_recipe

SMALL = dict(embed_dim=32, depth=2, num_heads=2)


def _images(n: int, c: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, c, size, size, generator=torch.Generator().manual_seed(seed))


def _ramp_images(n: int, c: int, size: int, seed: int = 0) -> torch.Tensor:
    """Per-image, per-channel planes a*x + b*y + d: masked patches are predictable from the visible ones."""
    coef = torch.randn(n, c, 3, 1, 1, generator=torch.Generator().manual_seed(seed))
    u = torch.linspace(-1, 1, size)
    return coef[:, :, 0] * u.view(1, 1, 1, -1) + coef[:, :, 1] * u.view(1, 1, -1, 1) + coef[:, :, 2]


# ------------------------------------------------------------------------------------------------ MAEDecoder
@pytest.mark.parametrize("c", [1, 2, 5])
@pytest.mark.parametrize("size,patch", [(32, 4), (40, 4), (40, 8), (48, 8), (64, 8)])
def test_decoder_shapes(c, size, patch):
    enc = ViTEncoder(c, size, patch_size=patch, **SMALL)
    x = _images(3, c, size)
    length = (size // patch) ** 2
    tokens, mask, ids_restore = enc.forward_features(x, mask_ratio=0.75, generator=torch.Generator().manual_seed(0))
    assert tokens.shape == (3, 1 + round(length * 0.25), 32)
    assert mask.shape == ids_restore.shape == (3, length)
    dec = MAEDecoder(enc.num_patches, enc.patch_dim, enc.embed_dim, decoder_dim=16, depth=1, num_heads=2)
    assert dec(tokens, ids_restore).shape == (3, length, patch * patch * c)


def test_decoder_bad_config_and_inputs():
    with pytest.raises(ConfigError, match="square"):
        MAEDecoder(12, 48, 32, decoder_dim=16, depth=1, num_heads=2)
    with pytest.raises(ConfigError, match="num_heads"):
        MAEDecoder(16, 48, 32, decoder_dim=16, depth=1, num_heads=3)
    dec = MAEDecoder(16, 48, 32, decoder_dim=16, depth=1, num_heads=2)
    with pytest.raises(InputError, match="ids_restore"):
        dec(torch.zeros(2, 5, 32), torch.zeros(2, 15, dtype=torch.long))


def test_decoder_places_tokens_back_in_image_order():
    """With no decoder blocks, each output patch depends only on its own token (or the mask token) and position."""
    enc = ViTEncoder(2, 32, patch_size=8, **SMALL).eval()
    dec = MAEDecoder(enc.num_patches, enc.patch_dim, enc.embed_dim, decoder_dim=16, depth=0, num_heads=2).eval()
    tokens, mask, ids_restore = enc.forward_features(_images(2, 2, 32), 0.5, torch.Generator().manual_seed(0))
    pred = dec(tokens, ids_restore)
    for n in range(2):
        visible = (mask[n] == 0).nonzero().flatten()  # positions in image order; kept tokens are in shuffle order
        order = ids_restore[n].argsort()[: len(visible)]
        for k, pos in enumerate(order.tolist()):
            ref = dec.pred(dec.norm(dec.decoder_embed(tokens[n, 1 + k]) + dec.pos_embed[0, 1 + pos]))
            torch.testing.assert_close(pred[n, pos], ref)
        for pos in (mask[n] == 1).nonzero().flatten().tolist():
            ref = dec.pred(dec.norm(dec.mask_token[0, 0] + dec.pos_embed[0, 1 + pos]))
            torch.testing.assert_close(pred[n, pos], ref)
        assert sorted(order.tolist()) == visible.tolist()


# -------------------------------------------------------------------------------------------------- mae_loss
def _reference_mae_loss(target, pred, mask, norm_pix_loss):
    total, count = 0.0, 0
    for n in range(target.shape[0]):
        for pos in range(target.shape[1]):
            if mask[n, pos] != 1:
                continue
            t = target[n, pos].tolist()
            if norm_pix_loss:
                mean = sum(t) / len(t)
                var = sum((v - mean) ** 2 for v in t) / (len(t) - 1)
                t = [(v - mean) / math.sqrt(var + 1e-6) for v in t]
            total += sum((a - b) ** 2 for a, b in zip(pred[n, pos].tolist(), t, strict=True)) / len(t)
            count += 1
    return total / count


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_mae_loss_matches_reference_and_ignores_visible_patches(norm_pix_loss):
    g = torch.Generator().manual_seed(0)
    target, pred = 3 * torch.randn(3, 10, 12, generator=g) + 1, torch.randn(3, 10, 12, generator=g)
    mask = (torch.rand(3, 10, generator=g) < 0.6).float()
    loss = mae_loss(target, pred, mask, norm_pix_loss)
    assert loss.item() == pytest.approx(_reference_mae_loss(target, pred, mask, norm_pix_loss), rel=1e-5)
    pred_changed = pred + 50 * (1 - mask).unsqueeze(-1)  # only unmasked predictions change
    assert mae_loss(target, pred_changed, mask, norm_pix_loss).item() == pytest.approx(loss.item(), rel=1e-6)
    assert mae_loss(target, pred, torch.zeros_like(mask), norm_pix_loss).item() == 0.0
    with pytest.raises(InputError, match="mask"):
        mae_loss(target, pred, mask[:, :5])


# ------------------------------------------------------------------------------------- encoder + decoder + loss
def test_gradients_reach_every_parameter():
    enc = ViTEncoder(3, 32, patch_size=8, drop_path=0.1, **SMALL)
    dec = MAEDecoder(enc.num_patches, enc.patch_dim, enc.embed_dim, decoder_dim=16, depth=1, num_heads=2)
    x = _images(4, 3, 32)
    tokens, mask, ids_restore = enc.forward_features(x, 0.75, torch.Generator().manual_seed(0))
    mae_loss(enc.patchify(x), dec(tokens, ids_restore), mask).backward()
    for name, param in [*enc.named_parameters(), *dec.named_parameters()]:
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name
    assert "pos_embed" not in dict(enc.named_parameters()) | enc.state_dict()  # fixed, not saved


def test_mae_training_reduces_loss():
    """A few steps on a tiny batch beat the best prediction that ignores the visible patches (per-position mean)."""
    torch.manual_seed(0)  # parameter initialisation
    enc = ViTEncoder(2, 32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    dec = MAEDecoder(enc.num_patches, enc.patch_dim, enc.embed_dim, decoder_dim=32, depth=1, num_heads=2)
    x = _ramp_images(8, 2, 32)
    target = enc.patchify(x)

    def loss_and_mask(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, mask, ids_restore = enc.forward_features(x, 0.75, torch.Generator().manual_seed(seed))
        return mae_loss(target, dec(tokens, ids_restore), mask, norm_pix_loss=False), mask

    with torch.no_grad():
        before, mask = loss_and_mask(12345)
        position_only = mae_loss(target, target.mean(0, keepdim=True).expand_as(target), mask, norm_pix_loss=False)
    opt = torch.optim.AdamW([*enc.parameters(), *dec.parameters()], lr=3e-3)
    for step in range(60):
        opt.zero_grad()
        loss_and_mask(step)[0].backward()
        opt.step()
    with torch.no_grad():
        after, _ = loss_and_mask(12345)
    assert after < 0.5 * position_only < 0.5 * before, (before, position_only, after)


# --------------------------------------------------------------------------------------------------- ImageMAE
C, S = 4, 16  # channels, crop side of the tiny recipe's crops


def _contract() -> dict:
    return {"modality": "image", "channel_names": ["brightfield", "dna", "darkfield", "actin"],
            "channel_mean": [100.0] * C, "channel_std": [10.0] * C, "image_size": [S, S], "dtype": "uint16"}


def _crops(n: int = 8) -> torch.Tensor:
    return torch.randint(0, 400, (n, C, S, S), generator=torch.Generator().manual_seed(0)).to(torch.uint16)


# ImageMAE's parameter names and shapes for tiny_image_recipe("mae", "vit") as they were before MAEDecoder and
# mae_loss moved here from sslcell/encoders/vit.py: saved checkpoints depend on them.
STATE_DICT = {
    "encoder.cls_token": (1, 1, 32),
    "encoder.patch_embed.weight": (32, 4, 4, 4),
    "encoder.patch_embed.bias": (32,),
    "encoder.blocks.0.ln_1.weight": (32,),
    "encoder.blocks.0.ln_1.bias": (32,),
    "encoder.blocks.0.self_attention.in_proj_weight": (96, 32),
    "encoder.blocks.0.self_attention.in_proj_bias": (96,),
    "encoder.blocks.0.self_attention.out_proj.weight": (32, 32),
    "encoder.blocks.0.self_attention.out_proj.bias": (32,),
    "encoder.blocks.0.ln_2.weight": (32,),
    "encoder.blocks.0.ln_2.bias": (32,),
    "encoder.blocks.0.mlp.0.weight": (128, 32),
    "encoder.blocks.0.mlp.0.bias": (128,),
    "encoder.blocks.0.mlp.3.weight": (32, 128),
    "encoder.blocks.0.mlp.3.bias": (32,),
    "encoder.norm.weight": (32,),
    "encoder.norm.bias": (32,),
    "decoder.mask_token": (1, 1, 16),
    "decoder.decoder_embed.weight": (16, 32),
    "decoder.decoder_embed.bias": (16,),
    "decoder.blocks.0.ln_1.weight": (16,),
    "decoder.blocks.0.ln_1.bias": (16,),
    "decoder.blocks.0.self_attention.in_proj_weight": (48, 16),
    "decoder.blocks.0.self_attention.in_proj_bias": (48,),
    "decoder.blocks.0.self_attention.out_proj.weight": (16, 16),
    "decoder.blocks.0.self_attention.out_proj.bias": (16,),
    "decoder.blocks.0.ln_2.weight": (16,),
    "decoder.blocks.0.ln_2.bias": (16,),
    "decoder.blocks.0.mlp.0.weight": (64, 16),
    "decoder.blocks.0.mlp.0.bias": (64,),
    "decoder.blocks.0.mlp.3.weight": (16, 64),
    "decoder.blocks.0.mlp.3.bias": (16,),
    "decoder.norm.weight": (16,),
    "decoder.norm.bias": (16,),
    "decoder.pred.weight": (64, 16),
    "decoder.pred.bias": (64,),
}


def test_image_mae_state_dict_names_are_unchanged():
    model = build_method(tiny_image_recipe("mae", "vit"), _contract())
    assert isinstance(model, ImageMAE) and type(model.decoder) is MAEDecoder
    state = model.state_dict()
    model_keys = {k: tuple(v.shape) for k, v in state.items() if k.split(".")[0] in ("encoder", "decoder")}
    assert model_keys == STATE_DICT
    assert {k.split(".")[0] for k in state} == {"inputs", "encoder", "decoder"}
    fresh = build_method(tiny_image_recipe("mae", "vit"), _contract())
    fresh.load_state_dict(state)  # strict: raises on any missing or unexpected key
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())


def test_image_mae_loss_is_encoder_then_decoder_then_loss():
    """``loss`` = forward_loss(forward_decoder(forward_encoder(view))), with the generator's draws in that order."""
    model = build_method(tiny_image_recipe("mae", "vit", method={"mask_rate": 0.75}), _contract()).eval()
    batch = _crops()
    loss, logs = model.loss(batch, torch.Generator().manual_seed(3))
    assert logs == {} and loss.ndim == 0
    g = torch.Generator().manual_seed(3)  # replay the same draws
    x = model.inputs.views(batch, g, n=1)[0]
    tokens, mask, ids_restore = model.forward_encoder(x, g)
    assert tokens.shape == (8, 1 + 4, 32) and mask.shape == ids_restore.shape == (8, 16)
    pred = model.forward_decoder(tokens, ids_restore)
    assert pred.shape == (8, 16, 4 * 4 * C)
    torch.testing.assert_close(model.forward_loss(x, pred, mask), loss)
    torch.testing.assert_close(loss, mae_loss(model.encoder.patchify(x), pred, mask, norm_pix_loss=True))
