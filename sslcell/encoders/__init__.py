"""Encoders: an MLP for expression; a ViT and a small-image ResNet for crops with any number of channels."""

from sslcell.encoders.mlp import MLPEncoder, mlp

__all__ = ["MLPEncoder", "mlp"]
