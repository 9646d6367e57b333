"""Multi-layer perceptron encoder for expression profiles (Richter et al. 2024 style)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from torch import Tensor, nn


def mlp(
    widths: Sequence[int], *, dropout: float = 0.0, norm: str = "layernorm", last_activation: bool = True
) -> nn.Sequential:
    """Linear -> norm -> GELU -> dropout blocks through ``widths`` (``widths[0]`` is the input size)."""
    layers: list[nn.Module] = []
    pairs = list(itertools.pairwise(widths))
    for i, (d_in, d_out) in enumerate(pairs):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(pairs) - 1 or last_activation:
            if norm == "layernorm":
                layers.append(nn.LayerNorm(d_out))
            elif norm == "batchnorm":
                layers.append(nn.BatchNorm1d(d_out))
            layers.append(nn.GELU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class MLPEncoder(nn.Module):
    """``(N, G)`` normalised expression -> ``(N, D)`` embedding.

    The default widths, 512-512-256-256-64, follow Richter et al. (2024). The last layer is linear
    (no activation or dropout), so the embedding is not clipped at zero.
    """

    def __init__(
        self,
        n_genes: int,
        hidden: Sequence[int] = (512, 512, 256, 256),
        latent: int = 64,
        dropout: float = 0.1,
        norm: str = "layernorm",
    ) -> None:
        super().__init__()
        self.n_genes = n_genes
        self.embed_dim = latent
        self.body = mlp([n_genes, *hidden], dropout=dropout, norm=norm)
        self.out = nn.Linear(hidden[-1] if hidden else n_genes, latent)

    def forward(self, x: Tensor) -> Tensor:
        """(N, G) -> (N, D)"""
        return self.out(self.body(x))
