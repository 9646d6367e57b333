import pytest
import torch

from sslcell.methods import build_method
from tests.conftest import tiny_recipe

N_GENES = 50


def _contract(genes=None):
    genes = genes or [f"g{i}" for i in range(N_GENES)]
    return {"modality": "expression", "genes": genes, "target_sum": 1e4, "counts_are_log_normalized": False}


def _counts(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    rates = torch.rand(4, N_GENES, generator=g) * 5
    types = torch.randint(0, 4, (n,), generator=g)
    return torch.poisson(rates[types], generator=g)


@pytest.mark.parametrize("method", ["mae", "byol", "barlow_twins", "simclr", "vicreg"])
def test_loss_is_finite_and_trains(method):
    torch.manual_seed(0)
    model = build_method(tiny_recipe(method), _contract())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    batch = _counts()
    losses = []
    for step in range(30):
        loss, _ = model.loss(batch, torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    emb = model.embed(batch)
    assert emb.shape == (64, model.embed_dim) and emb.dtype == torch.float32


def test_mae_scores_masked_entries_only():
    model = build_method(tiny_recipe("mae"), _contract())
    x = model.inputs.normalize(_counts())
    g = torch.Generator().manual_seed(0)
    recon, mask = model.reconstruct(x, g)
    loss, logs = model.loss(_counts(), torch.Generator().manual_seed(0))
    expected = ((recon - x) ** 2)[mask].mean()
    assert torch.allclose(loss, expected, atol=1e-6)
    assert mask.float().mean().item() == pytest.approx(0.5, abs=0.02)


def test_programme_masking_masks_whole_programmes(tmp_path):
    genes = [f"g{i}" for i in range(N_GENES)]
    gmt = tmp_path / "p.gmt"
    gmt.write_text(
        "".join(f"{name}\ttest\t" + "\t".join(genes[i * 10 : (i + 1) * 10]) + "\n" for i, name in enumerate("ABC"))
    )
    config = tiny_recipe("mae", method={"masking": "programme", "mask_rate": 0.3, "programmes": str(gmt)})
    model = build_method(config, _contract(genes))
    assert model.programme_names == ["A", "B", "C"]
    _, mask = model.mask(model.inputs.normalize(_counts()), torch.Generator().manual_seed(0))
    for block in (mask[:, :10], mask[:, 10:20], mask[:, 20:30]):
        assert bool(((block.all(1)) | (~block.any(1))).all())  # a programme is masked whole or not at all
    assert not mask[:, 30:].any()


def test_byol_momentum_update_moves_target():
    model = build_method(tiny_recipe("byol"), _contract())
    before = [p.clone() for p in model.encoder_momentum.parameters()]
    for p in model.encoder.parameters():
        p.data.add_(1.0)
    from lightly.models.utils import update_momentum

    update_momentum(model.encoder, model.encoder_momentum, m=0.5)
    after = list(model.encoder_momentum.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(after, before, strict=True))
    assert all(not p.requires_grad for p in model.encoder_momentum.parameters())


def test_embed_is_deterministic_and_eval_mode():
    model = build_method(tiny_recipe("mae", encoder={"dropout": 0.5}), _contract())
    model.train()
    batch = _counts()
    assert torch.equal(model.embed(batch), model.embed(batch))
    assert model.training  # restored
