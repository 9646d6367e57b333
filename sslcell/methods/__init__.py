"""Self-supervised methods: one file each, composing an encoder, lightly heads and losses.

:func:`build_method` turns a recipe and an input contract into a trainable :class:`SSLModule`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from sslcell.config import RecipeConfig
from sslcell.encoders.mlp import MLPEncoder
from sslcell.errors import ConfigError
from sslcell.methods.barlow_twins import BarlowTwins
from sslcell.methods.base import SSLModule
from sslcell.methods.byol import BYOL
from sslcell.methods.inputs import ExpressionInputs, Inputs
from sslcell.methods.mae import ExpressionMAE
from sslcell.methods.simclr import SimCLR
from sslcell.methods.vicreg import VICReg

EXPRESSION = {"mae": ExpressionMAE, "byol": BYOL, "barlow_twins": BarlowTwins, "simclr": SimCLR, "vicreg": VICReg}


def build_inputs(config: RecipeConfig, contract: dict[str, Any]) -> Inputs:
    """The modality's input module from the recipe and the stored contract."""
    if contract["modality"] == "expression":
        return ExpressionInputs(
            contract["genes"],
            target_sum=contract["target_sum"],
            counts_are_log_normalized=contract["counts_are_log_normalized"],
            gene_mean=contract.get("gene_mean"),
            gene_std=contract.get("gene_std"),
            clip=contract.get("clip", 10.0),
            augment=config.method.augment,
        )
    raise ConfigError(f"modality: {contract['modality']!r} is not supported")


def build_encoder(config: RecipeConfig, inputs: Inputs) -> nn.Module:
    enc = config.encoder
    if inputs.modality == "expression":
        if enc.name != "mlp":
            raise ConfigError(f"encoder.name: expression models use 'mlp', got {enc.name!r}")
        return MLPEncoder(inputs.n_genes, enc.hidden, enc.latent, dropout=enc.dropout, norm=enc.norm)
    raise ConfigError(f"modality: {inputs.modality!r} is not supported")


def build_method(config: RecipeConfig, contract: dict[str, Any]) -> SSLModule:
    """Recipe + input contract -> an untrained model."""
    inputs = build_inputs(config, contract)
    registry = EXPRESSION
    if config.method.name not in registry:
        raise ConfigError(
            f"method.name: {config.method.name!r} is not available for {inputs.modality}; choose from {sorted(registry)}"
        )
    return registry[config.method.name](config, inputs, build_encoder(config, inputs))


__all__ = ["SSLModule", "build_method", "build_inputs", "build_encoder"]
