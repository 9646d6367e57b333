"""Self-supervised methods: one file each, composing an encoder, lightly heads and losses.

:func:`build_method` turns a recipe and an input contract into a trainable :class:`SSLModule`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from sslcell.config import RecipeConfig
from sslcell.encoders.image import build_image_encoder
from sslcell.encoders.mlp import MLPEncoder
from sslcell.errors import ConfigError
from sslcell.methods.barlow_twins import BarlowTwins
from sslcell.methods.base import SSLModule
from sslcell.methods.byol import BYOL
from sslcell.methods.dino import DINO
from sslcell.methods.image_mae import ImageMAE
from sslcell.methods.inputs import ExpressionInputs, ImageInputs, Inputs
from sslcell.methods.mae import ExpressionMAE
from sslcell.methods.simclr import SimCLR
from sslcell.methods.vicreg import VICReg

EXPRESSION = {"mae": ExpressionMAE, "byol": BYOL, "barlow_twins": BarlowTwins, "simclr": SimCLR, "vicreg": VICReg}
IMAGE = {"mae": ImageMAE, "simclr": SimCLR, "byol": BYOL, "dino": DINO}


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
    if contract["modality"] == "image":
        return ImageInputs(
            contract["channel_names"],
            contract["channel_mean"],
            contract["channel_std"],
            contract["image_size"],
            dtype=contract.get("dtype", "uint8"),
            augment=config.method.augment,
        )
    raise ConfigError(f"modality: {contract['modality']!r} is not supported")


def build_encoder(config: RecipeConfig, inputs: Inputs) -> nn.Module:
    enc = config.encoder
    if inputs.modality == "expression":
        if enc.name != "mlp":
            raise ConfigError(f"encoder.name: expression models use 'mlp', got {enc.name!r}")
        return MLPEncoder(inputs.n_genes, enc.hidden, enc.latent, dropout=enc.dropout, norm=enc.norm)
    if inputs.modality == "image":
        height, width = inputs.image_size
        size = inputs.augment_config.output_size
        if size is not None and tuple((size, size) if isinstance(size, int) else size) != (height, width):
            raise ConfigError(
                f"method.augment.output_size: {size} differs from the crops' {height}x{width}; views must keep the "
                "crop size the encoder is built for (leave output_size unset)"
            )
        if enc.name.startswith("vit") and height != width:
            raise ConfigError(f"encoder.name: {enc.name} needs square crops, got {height}x{width}")
        return build_image_encoder(enc.name, inputs.n_channels, height, **enc.options)
    raise ConfigError(f"modality: {inputs.modality!r} is not supported")


def build_method(config: RecipeConfig, contract: dict[str, Any]) -> SSLModule:
    """Recipe + input contract -> an untrained model."""
    inputs = build_inputs(config, contract)
    registry = EXPRESSION if inputs.modality == "expression" else IMAGE
    if config.method.name not in registry:
        raise ConfigError(
            f"method.name: {config.method.name!r} is not available for {inputs.modality}; choose from {sorted(registry)}"
        )
    return registry[config.method.name](config, inputs, build_encoder(config, inputs))


__all__ = ["SSLModule", "build_method", "build_inputs", "build_encoder"]
