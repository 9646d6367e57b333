from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scanpy as sc
import torch

from sslcell.augment.expression import (
    ExpressionAugment,
    ExpressionAugmentConfig,
    ProgrammeMasks,
    gene_dropout,
    library_size_scaling,
    negative_binomial_noise,
    normalize_log1p,
    programme_mask,
    random_mask,
)
from sslcell.config import from_dict
from sslcell.errors import ConfigError, GeneMismatchError, InputError

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def gen(seed: int = 0, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def counts(b: int = 64, g: int = 100, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    """Overdispersed integer counts (float32) with one all-zero row."""
    rng = np.random.default_rng(seed)
    mu = rng.lognormal(0.5, 1.0, size=(b, g))
    x = torch.as_tensor(rng.poisson(rng.gamma(2.0, mu / 2.0)), dtype=torch.float32)
    x[3] = 0
    return x.to(device)


@pytest.mark.filterwarnings("ignore:Some cells have zero counts")
def test_normalize_log1p_matches_scanpy():
    x = counts()
    adata = ad.AnnData(x.numpy().copy())
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    out = normalize_log1p(x)
    assert out.dtype == torch.float32 and not out.isnan().any()
    np.testing.assert_allclose(out.numpy(), adata.X, rtol=1e-5, atol=1e-5)
    assert (out[3] == 0).all()
    assert normalize_log1p(x.int()).dtype == torch.float32
    assert normalize_log1p(x.double()).dtype == torch.float64
    np.testing.assert_allclose(normalize_log1p(x, 100.0).expm1().sum(1)[:3].numpy(), 100.0, rtol=1e-5)


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.25, 0.5, 0.999])
def test_random_mask_exact_count(rate):
    x = counts() + 1
    out, mask = random_mask(x, rate, gen())
    assert mask.dtype == torch.bool and mask.shape == x.shape
    assert (mask.sum(1) == round(rate * 100)).all()
    assert (out[mask] == 0).all() and torch.equal(out[~mask], x[~mask])


def test_random_mask_differs_across_cells_reproducible_and_uniform():
    x = torch.ones(2000, 50)
    _, m1 = random_mask(x, 0.3, gen(7))
    _, m2 = random_mask(x, 0.3, gen(7))
    _, m3 = random_mask(x, 0.3, gen(8))
    assert torch.equal(m1, m2) and not torch.equal(m1, m3)
    assert len({tuple(row.tolist()) for row in m1[:100]}) == 100
    freq = m1.float().mean(0)  # every gene masked at rate 0.3 (sd ~0.01)
    assert (freq - 0.3).abs().max() < 0.05


def _reference_programme_mask(programmes: list[list[int]], n_genes: int, rate: float, seed: int, b: int):
    """Per-cell loop: add programmes in the cell's random order until >= round(rate * G) genes are masked.
    Uses the same random order as the implementation (its first draw: uniform noise (B, P), ranked)."""
    noise = torch.rand((b, len(programmes)), generator=gen(seed))
    mask = torch.zeros(b, n_genes, dtype=torch.bool)
    target = round(rate * n_genes)
    for i in range(b):
        for p in noise[i].argsort().tolist():
            if mask[i].sum() >= target:
                break
            mask[i, programmes[p]] = True
    return mask


def _overlapping_programmes(n_genes: int = 60, n_programmes: int = 12, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [sorted(rng.choice(n_genes - 10, rng.integers(2, 9), replace=False).tolist()) for _ in range(n_programmes)]


@pytest.mark.parametrize("rate", [0.05, 0.3, 0.6, 1.0])
def test_programme_mask_matches_reference(rate):
    progs = _overlapping_programmes()
    x = torch.rand(200, 60) + 0.5
    out, mask = programme_mask(x, [torch.tensor(p) for p in progs], rate, gen(5))
    torch.testing.assert_close(mask, _reference_programme_mask(progs, 60, rate, 5, 200))
    assert (out[mask] == 0).all() and torch.equal(out[~mask], x[~mask])
    assert not mask[:, 50:].any()  # genes in no programme are never masked
    covered = len(set().union(*map(set, progs)))
    assert (mask.sum(1) >= min(round(rate * 60), covered)).all()


def test_programme_mask_masks_whole_programmes_only():
    progs = _overlapping_programmes(seed=1)
    _, mask = programme_mask(torch.ones(300, 60), [np.array(p) for p in progs], 0.3, gen(1))
    member = torch.zeros(len(progs), 60, dtype=torch.bool)
    for i, p in enumerate(progs):
        member[i, p] = True
    full = (mask[:, None, :] | ~member[None]).all(-1)  # (B, P): programme entirely masked
    union = (full[:, :, None] & member[None]).any(1)
    assert torch.equal(union, mask)
    assert len({tuple(row.tolist()) for row in mask}) > 50


def test_programme_mask_disjoint_programmes_exact_and_input_forms_agree():
    progs = [list(range(10 * i, 10 * i + 10)) for i in range(10)]
    member = torch.zeros(10, 100, dtype=torch.bool)
    for i, p in enumerate(progs):
        member[i, p] = True
    x = torch.ones(50, 100)
    _, m_list = programme_mask(x, [np.array(p) for p in progs], 0.25, gen(3))
    _, m_dense = programme_mask(x, member, 0.25, gen(3))
    _, m_module = programme_mask(x, ProgrammeMasks(member), 0.25, gen(3))
    assert torch.equal(m_list, m_dense) and torch.equal(m_list, m_module)
    assert (m_list.sum(1) == 30).all()  # 2 programmes give 20 < 25, so 3 are needed
    assert torch.equal(ProgrammeMasks([np.array(p) for p in progs], 100).membership(), member)
    with pytest.raises(GeneMismatchError, match="100 genes but x has 99"):
        programme_mask(torch.ones(2, 99), ProgrammeMasks(member), 0.2, gen())
    with pytest.raises(InputError, match="programme 1: gene index out of range"):
        ProgrammeMasks([np.array([0]), np.array([5, 120])], 100)


@pytest.mark.parametrize("dispersion", [2.0, 10.0])
def test_negative_binomial_noise_mean_and_variance(dispersion):
    mu = torch.tensor([0.0, 1.0, 5.0, 40.0]).repeat(50000, 1)
    out = negative_binomial_noise(mu, dispersion, gen(2))
    assert torch.equal(out, out.round()) and (out[:, 0] == 0).all()
    mean, var = out[:, 1:].double().mean(0), out[:, 1:].double().var(0)
    expected_mean = mu[0, 1:].double()
    expected_var = expected_mean + expected_mean**2 / dispersion
    torch.testing.assert_close(mean, expected_mean, rtol=0.02, atol=0.0)
    torch.testing.assert_close(var, expected_var, rtol=0.05, atol=0.0)


def test_negative_binomial_per_gene_dispersion():
    mu = torch.full((50000, 2), 20.0)
    out = negative_binomial_noise(mu, torch.tensor([1.0, 100.0]), gen(3))
    torch.testing.assert_close(out.var(0), torch.tensor([420.0, 24.0]), rtol=0.06, atol=0.0)
    with pytest.raises(ConfigError, match="dispersion"):
        negative_binomial_noise(mu, 0.0, gen())


def test_gene_dropout_rate():
    x = counts(200, 500) + 1
    out = gene_dropout(x, 0.3, gen(4))
    dropped = out == 0
    assert abs(dropped.float().mean().item() - 0.3) < 0.01
    assert torch.equal(out[~dropped], x[~dropped])


def test_library_size_scaling_fixed_and_random_factor():
    x = counts(400, 300) + 2
    out = library_size_scaling(x, 0.3, 0.3, gen(5))
    assert torch.equal(out, out.round()) and (out <= x).all() and (out >= 0).all()
    ratio = out.sum(1) / x.sum(1)
    assert abs(ratio.mean().item() - 0.3) < 0.005 and ratio.std().item() < 0.03
    ratio = library_size_scaling(x, 0.2, 0.8, gen(6)).sum(1) / x.sum(1)
    assert ratio.min() > 0.17 and ratio.max() < 0.83 and abs(ratio.mean().item() - 0.5) < 0.04
    assert ratio.std().item() > 0.12  # uniform on [0.2, 0.8] has sd 0.17
    with pytest.raises(ConfigError, match="0 < low <= high <= 1"):
        library_size_scaling(x, 0.5, 1.5, gen())


OPS = {  # name: (op, output is float even for integer input)
    "random_mask": (lambda x, g: random_mask(x, 0.3, g)[0], False),
    "programme_mask": (lambda x, g: programme_mask(x, [torch.arange(0, 10), torch.arange(20, 40)], 0.2, g)[0], False),
    "nb": (lambda x, g: negative_binomial_noise(x, 3.0, g), False),
    "dropout": (lambda x, g: gene_dropout(x, 0.2, g), False),
    "library": (lambda x, g: library_size_scaling(x, 0.5, 0.9, g), False),
    "normalize": (lambda x, g: normalize_log1p(x), True),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.int32])
def test_ops_keep_shape_dtype_device_and_zero_rows(name, device, dtype):
    op, float_out = OPS[name]
    x = counts(device=device).to(dtype)
    out = op(x, gen(0, device))
    assert out.shape == x.shape and out.device == x.device
    assert out.dtype == (torch.float32 if float_out else dtype)
    assert not out.float().isnan().any() and (out[3] == 0).all()
    assert torch.equal(out, op(x, gen(0, device)))  # reproducible for a seeded generator


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cpu_generator_with_gpu_data_is_accepted():
    x = counts(device="cuda")
    for name, (op, _) in OPS.items():
        out = op(x, torch.Generator().manual_seed(0))
        assert out.device == x.device, name
        torch.testing.assert_close(out.cpu(), op(x.cpu(), torch.Generator().manual_seed(0)), msg=name)


def test_expression_augment_pipeline_and_reproducibility():
    x = counts(128, 100).int()
    off = ExpressionAugment(ExpressionAugmentConfig(mask_rate=0.0))
    torch.testing.assert_close(off(x, gen()), normalize_log1p(x))
    cfg = ExpressionAugmentConfig(mask_rate=0.2, dropout_rate=0.1, nb_dispersion=5.0, library_scale=(0.5, 1.0))
    aug = ExpressionAugment(cfg)
    view, mask = aug(x, gen(9), return_mask=True)
    assert view.dtype == torch.float32 and view.shape == x.shape and not view.isnan().any()
    assert (mask.sum(1) == 20).all() and (view[mask] == 0).all()
    assert torch.equal(view, aug(x, gen(9)))
    assert not torch.equal(view, aug(x, gen(10)))
    assert (view.expm1().sum(1) <= 1e4 * (1 + 1e-5)).all()  # masking only removes normalised mass
    assert (view[3] == 0).all()


def test_expression_augment_per_cell_probability_and_programmes():
    x = counts(400, 100) + 1
    aug = ExpressionAugment(ExpressionAugmentConfig(mask_rate=0.3, p_mask=0.5))
    _, mask = aug(x, gen(1), return_mask=True)
    masked_cells = mask.any(1)
    assert 0.4 < masked_cells.float().mean() < 0.6 and (mask[masked_cells].sum(1) == 30).all()
    progs = [np.arange(0, 10), np.arange(10, 30), np.arange(40, 45)]
    cfg = ExpressionAugmentConfig(mask_rate=0.1, mask_mode="programme")
    aug = ExpressionAugment(cfg, programmes=progs, n_genes=100)
    _, mask = aug(x, gen(2), return_mask=True)
    assert not mask[:, 30:40].any() and not mask[:, 45:].any() and (mask.sum(1) >= 10).all()


def test_expression_augment_log_normalized_input():
    x = normalize_log1p(counts())
    aug = ExpressionAugment(ExpressionAugmentConfig(mask_rate=0.1, dropout_rate=0.2), counts_are_log_normalized=True)
    view = aug(x, gen())
    assert ((view == x) | (view == 0)).all()
    with pytest.raises(ConfigError, match="nb_dispersion: needs raw counts"):
        ExpressionAugment(ExpressionAugmentConfig(nb_dispersion=2.0), counts_are_log_normalized=True)


def test_config_validation_and_from_dict():
    cfg = from_dict(ExpressionAugmentConfig, {"mask_rate": 0.4, "library_scale": [0.2, 1], "nb_dispersion": None})
    assert cfg.library_scale == (0.2, 1.0) and cfg.mask_rate == 0.4
    for bad, field in [
        ({"mask_rate": 1.5}, "mask_rate"),
        ({"p_nb": -0.1}, "p_nb"),
        ({"nb_dispersion": 0.0}, "nb_dispersion"),
        ({"library_scale": (0.8, 0.2)}, "library_scale"),
        ({"mask_mode": "genes"}, "mask_mode"),
    ]:
        with pytest.raises(ConfigError, match=field):
            ExpressionAugmentConfig(**bad)
    with pytest.raises(ConfigError, match="programme"):
        ExpressionAugment(ExpressionAugmentConfig(mask_mode="programme"))
    with pytest.raises(InputError, match=r"expected a \(B, G\) tensor"):
        normalize_log1p(torch.ones(3))
