"""Masked autoencoding of expression profiles (Richter et al. 2024).

Mask a fraction of genes per cell (random genes, or whole gene programmes), encode the masked profile,
decode all genes, and score the reconstruction on the masked entries only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sslcell.augment.expression import ProgrammeMasks, programme_mask, random_mask
from sslcell.config import RecipeConfig
from sslcell.data.genesets import example_programmes, programme_index, read_gmt
from sslcell.encoders.mlp import MLPEncoder, mlp
from sslcell.errors import ConfigError
from sslcell.methods.base import SSLModule
from sslcell.methods.inputs import ExpressionInputs


class ExpressionMAE(SSLModule):
    """MLP encoder ``(N, G) -> (N, D)`` and MLP decoder ``(N, D) -> (N, G)`` trained to fill in masked genes."""

    def __init__(self, config: RecipeConfig, inputs: ExpressionInputs, encoder: MLPEncoder) -> None:
        super().__init__(config, inputs, encoder)
        method = config.method
        hidden = method.decoder_hidden or list(reversed(config.encoder.hidden))
        self.decoder = mlp(
            [encoder.embed_dim, *hidden, inputs.n_genes],
            dropout=0.0,
            norm=config.encoder.norm,
            last_activation=False,
        )
        self.mask_rate = method.mask_rate
        self.masking = method.masking
        if self.masking == "programme":
            programmes = read_gmt(method.programmes) if method.programmes else example_programmes()
            names, index = programme_index(programmes, inputs.genes)
            if not names:
                raise ConfigError(
                    "method.programmes: no gene programme has enough genes among the model's "
                    f"{inputs.n_genes} genes; use masking: random or another GMT file"
                )
            self.programmes = ProgrammeMasks(index, inputs.n_genes)
            self.programme_names = names

    def mask(self, x: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(N, G) -> masked input (N, G) and bool mask (N, G), True where masked."""
        if self.masking == "programme":
            return programme_mask(x, self.programmes, self.mask_rate, generator)
        return random_mask(x, self.mask_rate, generator)

    def reconstruct(self, x: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(N, G) normalised -> reconstruction (N, G) of the masked input, and the mask."""
        masked, mask = self.mask(x, generator)
        return self.decoder(self.encoder(masked)), mask

    def loss(self, batch: Tensor, generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        x = self.inputs.normalize(batch)
        recon, mask = self.reconstruct(x, generator)
        weight = mask.float()
        err = (recon.float() - x) ** 2
        masked_mse = (err * weight).sum() / weight.sum().clamp_min(1.0)
        with torch.no_grad():
            visible_mse = (err * (1 - weight)).sum() / (1 - weight).sum().clamp_min(1.0)
        return masked_mse, {"masked_mse": masked_mse.detach(), "visible_mse": visible_mse}
