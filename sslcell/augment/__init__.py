"""Batched augmentations, one module per modality: :mod:`sslcell.augment.expression` (counts and
log-normalised profiles ``(B, G)``) and :mod:`sslcell.augment.image` (crops ``(B, C, H, W)``)."""
