from __future__ import annotations

import pytest
import torch

from sslcell.encoders import vit
from sslcell.encoders.vit import ViTEncoder
from sslcell.errors import ChannelMismatchError, ConfigError, InputError

SMALL = dict(embed_dim=32, depth=2, num_heads=2)


def _images(n: int, c: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, c, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("c", [1, 2, 5])
@pytest.mark.parametrize("size,patch", [(32, 4), (40, 4), (40, 8), (48, 8), (64, 8)])
def test_shapes(c, size, patch):
    enc = ViTEncoder(c, size, patch_size=patch, **SMALL)
    x = _images(3, c, size)
    length = (size // patch) ** 2
    assert enc.num_patches == length and enc.patch_dim == patch * patch * c
    assert enc(x).shape == (3, 32) and enc.embed_dim == 32
    tokens, mask, ids_restore = enc.forward_features(x, mask_ratio=0.75, generator=torch.Generator().manual_seed(0))
    assert tokens.shape == (3, 1 + round(length * 0.25), 32)
    assert mask.shape == ids_restore.shape == (3, length)
    # the decoder's output shape over the same grids: tests/methods/test_image_mae.py::test_decoder_shapes


def test_bad_config_and_inputs():
    with pytest.raises(ConfigError, match="patch_size"):
        ViTEncoder(2, 36, patch_size=8)
    with pytest.raises(ConfigError, match="num_heads"):
        ViTEncoder(2, 32, embed_dim=32, num_heads=3)
    with pytest.raises(ConfigError, match="divisible by 4"):
        ViTEncoder(2, 32, embed_dim=30, num_heads=2)
    with pytest.raises(ConfigError, match="pool"):
        ViTEncoder(2, 32, pool="max", **SMALL)
    enc = ViTEncoder(2, 32, **SMALL)
    with pytest.raises(ChannelMismatchError, match="3 channels"):
        enc(_images(1, 3, 32))
    with pytest.raises(InputError, match=r"\(40, 40\)"):
        enc(_images(1, 2, 40))
    with pytest.raises(InputError, match="floating"):
        enc(torch.zeros(1, 2, 32, 32, dtype=torch.uint8))
    with pytest.raises(ConfigError, match="mask_ratio"):
        enc.forward_features(_images(1, 2, 32), mask_ratio=1.0)


def test_patchify_matches_reference_and_round_trips():
    c, size, p = 3, 16, 4
    enc = ViTEncoder(c, size, patch_size=p, **SMALL)
    x = _images(2, c, size)
    patches = enc.patchify(x)
    g = size // p
    for i in range(g):
        for j in range(g):
            block = x[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p]  # (N, C, p, p)
            torch.testing.assert_close(patches[:, i * g + j], block.permute(0, 2, 3, 1).reshape(2, -1),
                                       rtol=0, atol=0)
    assert torch.equal(enc.unpatchify(patches), x)


def test_patch_embedding_token_order_matches_patchify():
    """Changing patch l (in patchify order) changes exactly token l of the patch embedding."""
    enc = ViTEncoder(2, 32, patch_size=8, **SMALL)
    x = _images(1, 2, 32)
    patches = enc.patchify(x)
    patches[:, 5] += 1.0
    before = enc.patch_embed(x).flatten(2).transpose(1, 2)
    after = enc.patch_embed(enc.unpatchify(patches)).flatten(2).transpose(1, 2)
    changed = (after - before).abs().amax(dim=-1)[0] > 1e-6
    assert changed.nonzero().flatten().tolist() == [5]


@pytest.mark.parametrize("length,ratio", [(64, 0.75), (25, 0.6), (100, 0.5), (16, 0.1)])
def test_random_masking(length, ratio):
    n, d = 4, 3
    tokens = torch.arange(length, dtype=torch.float32).view(1, length, 1).expand(n, length, d).contiguous()
    tokens = tokens + 1000 * torch.arange(n).view(n, 1, 1)  # distinct per sample
    kept, mask, ids_restore = ViTEncoder.random_masking(tokens, ratio, torch.Generator().manual_seed(1))
    len_keep = round(length * (1 - ratio))
    assert kept.shape == (n, len_keep, d)
    assert mask.dtype == torch.float32 and torch.all(mask.sum(1) == length - len_keep)
    positions = (kept[..., 0] - 1000 * torch.arange(n).view(n, 1)).long()  # (N, L_vis) original positions
    assert torch.all(mask.gather(1, positions) == 0)  # kept tokens are exactly the unmasked ones
    # ids_restore un-shuffles: cat(kept, masked) gathered with ids_restore is the original sequence
    ids_shuffle = ids_restore.argsort(dim=1)
    assert torch.equal(ids_shuffle[:, :len_keep], positions)
    shuffled = tokens.gather(1, ids_shuffle.unsqueeze(-1).expand(-1, -1, d))
    assert torch.equal(shuffled.gather(1, ids_restore.unsqueeze(-1).expand(-1, -1, d)), tokens)
    # seeded: the same generator seed gives the same mask, another seed a different one
    _, mask_again, _ = ViTEncoder.random_masking(tokens, ratio, torch.Generator().manual_seed(1))
    _, mask_other, _ = ViTEncoder.random_masking(tokens, ratio, torch.Generator().manual_seed(2))
    assert torch.equal(mask, mask_again) and not torch.equal(mask, mask_other)


def test_no_masking_keeps_order():
    enc = ViTEncoder(2, 32, **SMALL).eval()
    x = _images(2, 2, 32)
    tokens, mask, ids_restore = enc.forward_features(x)
    assert tokens.shape == (2, 1 + 64, 32) and not mask.any()
    assert torch.equal(ids_restore, torch.arange(64).expand(2, -1))


def test_only_visible_patches_are_encoded():
    enc = ViTEncoder(2, 32, patch_size=4, **SMALL).eval()
    x = _images(2, 2, 32)
    seed = 3
    tokens, mask, _ = enc.forward_features(x, 0.75, torch.Generator().manual_seed(seed))
    noise = 100 * _images(2, 2, 32, seed=9)
    masked_pixels = enc.unpatchify(mask.unsqueeze(-1).expand(-1, -1, enc.patch_dim))  # (N, C, H, W), 1 = masked
    x_masked_changed = x + noise * masked_pixels
    tokens2, mask2, _ = enc.forward_features(x_masked_changed, 0.75, torch.Generator().manual_seed(seed))
    assert torch.equal(mask, mask2)
    torch.testing.assert_close(tokens2, tokens)
    # and the test is not vacuous: changing a visible patch does change the output
    x_visible_changed = x + noise * (1 - masked_pixels)
    tokens3, _, _ = enc.forward_features(x_visible_changed, 0.75, torch.Generator().manual_seed(seed))
    assert not torch.allclose(tokens3, tokens)


def test_samples_are_independent():
    enc = ViTEncoder(5, 40, patch_size=8, **SMALL).eval()
    x = _images(4, 5, 40)
    with torch.no_grad():
        full = enc(x)
        single = torch.cat([enc(x[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(full, single, rtol=1e-5, atol=1e-5)


def test_mean_pool():
    enc = ViTEncoder(2, 32, pool="mean", **SMALL).eval()
    x = _images(2, 2, 32)
    tokens, _, _ = enc.forward_features(x)
    torch.testing.assert_close(enc(x), tokens[:, 1:].mean(1))


def test_parameter_names_do_not_depend_on_drop_path():
    a = ViTEncoder(2, 32, drop_path=0.0, **SMALL)
    b = ViTEncoder(2, 32, drop_path=0.2, **SMALL)
    b.load_state_dict(a.state_dict())  # raises on any key mismatch
    x = _images(2, 2, 32)
    torch.testing.assert_close(a.eval()(x), b.eval()(x))  # drop path is the identity in eval mode


def test_drop_path_rises_linearly_over_the_blocks_and_can_be_set_later():
    enc = ViTEncoder(2, 32, embed_dim=32, depth=3, num_heads=2, drop_path=0.2)

    def rates():
        return [p for b in enc.blocks for p in (b.dropout.p, b.mlp[-1].p)]

    assert rates() == pytest.approx([0.0, 0.0, 0.1, 0.1, 0.2, 0.2])
    assert enc.drop_path == pytest.approx(0.2)
    enc.set_drop_path(0.4)
    assert rates() == pytest.approx([0.0, 0.0, 0.2, 0.2, 0.4, 0.4]) and enc.drop_path == pytest.approx(0.4)
    with pytest.raises(ConfigError, match="drop_path"):
        enc.set_drop_path(1.0)
    enc.set_drop_path(0.5)
    x = _images(64, 2, 32)
    assert not torch.allclose(enc.train()(x), enc(x))  # active in training: each call drops other rows
    enc.set_drop_path(0.0)
    torch.testing.assert_close(enc(x), enc(x))


def test_layer_ids_are_maes_embeddings_blocks_then_norm():
    enc = ViTEncoder(2, 32, embed_dim=32, depth=3, num_heads=2)
    assert enc.num_layers == 4
    ids = {name: enc.layer_id(name) for name, _ in enc.named_parameters()}
    assert ids["patch_embed.weight"] == ids["patch_embed.bias"] == ids["cls_token"] == 0
    for name, layer in ids.items():
        if name.startswith("blocks."):
            assert layer == int(name.split(".")[1]) + 1
    assert ids["norm.weight"] == ids["norm.bias"] == 4
    assert set(ids.values()) == {0, 1, 2, 3, 4}


def test_old_mae_import_path_still_works_and_warns():
    """``MAEDecoder`` and ``mae_loss`` moved to sslcell.methods.image_mae; the old path forwards for one release."""
    from sslcell.methods import image_mae

    with pytest.warns(DeprecationWarning, match=r"sslcell\.methods\.image_mae\.MAEDecoder"):
        from sslcell.encoders.vit import MAEDecoder
    with pytest.warns(DeprecationWarning, match=r"sslcell\.methods\.image_mae\.mae_loss"):
        from sslcell.encoders.vit import mae_loss
    assert MAEDecoder is image_mae.MAEDecoder and mae_loss is image_mae.mae_loss
    with pytest.raises(AttributeError, match="no_such_name"):
        vit.no_such_name  # noqa: B018
