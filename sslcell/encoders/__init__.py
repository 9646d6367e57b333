"""Encoders: an MLP for expression; a ViT, a small-image ResNet and a plain CNN for crops with any number of
channels (by name: :func:`sslcell.encoders.image.build_image_encoder`)."""

from sslcell.encoders.cnn import PlainCNN
from sslcell.encoders.mlp import MLPEncoder, mlp

__all__ = ["MLPEncoder", "PlainCNN", "mlp"]
