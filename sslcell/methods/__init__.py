"""Self-supervised methods: one file each, composing an encoder, lightly heads and losses.

:func:`build_method` turns a recipe and an input contract into a trainable :class:`SSLModule`.
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from sslcell.config import METHODS, RecipeConfig
from sslcell.encoders.image import build_image_encoder
from sslcell.encoders.mlp import MLPEncoder
from sslcell.errors import ConfigError
from sslcell.methods.base import SSLModule
from sslcell.methods.contracts import Contract, ExpressionContract, ImageContract, contract_from_dict
from sslcell.methods.inputs import ExpressionInputs, ImageInputs, Inputs


def method_class(modality: str, name: str) -> type[SSLModule]:
    """The :class:`SSLModule` subclass registered as ``name`` for ``modality`` in :data:`sslcell.config.METHODS`."""
    registry = METHODS.get(modality, {})
    if name not in registry:
        raise ConfigError(f"method.name: {name!r} is not available for {modality}; choose from {sorted(registry)}")
    module, cls = registry[name].split(":")
    return getattr(importlib.import_module(f"sslcell.methods.{module}"), cls)


def build_inputs(config: RecipeConfig, contract: Contract | dict[str, Any]) -> Inputs:
    """The modality's input module from the recipe and the (stored) contract, validated."""
    contract = contract_from_dict(contract)
    if isinstance(contract, ExpressionContract):
        return ExpressionInputs(contract, augment=config.method.augment)
    return ImageInputs(contract, augment=config.method.augment)


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


def build_method(config: RecipeConfig, contract: Contract | dict[str, Any]) -> SSLModule:
    """Recipe + input contract -> an untrained model."""
    inputs = build_inputs(config, contract)
    cls = method_class(inputs.modality, config.method.name)
    return cls(config, inputs, build_encoder(config, inputs))


__all__ = [
    "SSLModule",
    "Contract",
    "ExpressionContract",
    "ImageContract",
    "build_method",
    "build_inputs",
    "build_encoder",
    "contract_from_dict",
    "method_class",
]
