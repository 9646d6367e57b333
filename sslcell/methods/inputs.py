"""What a model reads, as a module: the normalisation of its typed input contract
(:mod:`sslcell.methods.contracts`) and its augmented views.

The contract is stored in every checkpoint's ``config.json`` and checked against every input. ``normalize`` is
the one normalisation routine: pretraining, ``tl.embed``, classifiers and prediction all call it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from sslcell.augment.expression import ExpressionAugment, ExpressionAugmentConfig, normalize_log1p
from sslcell.augment.image import ImageAugment, ImageAugmentConfig
from sslcell.config import from_dict
from sslcell.data.images import CellImages, placeholder_names
from sslcell.errors import ChannelMismatchError, InputError, SSLCellWarning
from sslcell.methods.contracts import ExpressionContract, ImageContract, contract_from_dict


def _divisor(std: torch.Tensor) -> torch.Tensor:
    """What standardisation divides by: a std of 0 (a gene or channel that never varied in pretraining) counts as 1,
    as scanpy's ``scale`` has it, so a value it takes later stays on the scale of the others instead of being
    multiplied by a million; a tiny positive std is clamped at 1e-6."""
    return torch.where(std > 0, std, torch.ones_like(std)).clamp_min(1e-6)


class Inputs(nn.Module):
    """Base class: ``normalize`` for inference, ``views`` for training; ``contract`` is the typed contract."""

    modality: str = ""
    contract: ExpressionContract | ImageContract

    def normalize(self, batch: Tensor) -> Tensor:
        raise NotImplementedError

    def views(self, batch: Tensor, generator: torch.Generator, n: int = 2) -> list[Tensor]:
        raise NotImplementedError


class ExpressionInputs(Inputs):
    """Counts ``(N, G)`` over the model's genes -> library-size normalised log1p values ``(N, G)``.

    Normalisation runs per batch on the model's device: library size (total counts over the model's genes)
    to ``target_sum``, ``log1p``, then, when ``gene_mean``/``gene_std`` are given, each gene is standardised
    with the statistics of the pretraining data and clipped to ``[-clip, clip]`` (as ``sc.pp.scale``), so the
    encoder and the reconstruction loss weigh every gene alike. A masked entry is 0 after this: the gene's mean.
    With ``counts_are_log_normalized`` the input is taken as already ``log1p(count / library * target_sum)``.
    """

    modality = "expression"

    def __init__(self, contract: ExpressionContract | dict[str, Any], *, augment: dict[str, Any] | None = None) -> None:
        super().__init__()
        contract = contract_from_dict(contract)
        if not isinstance(contract, ExpressionContract):
            raise InputError(f"ExpressionInputs needs an expression contract, got a {contract.modality} one")
        self.genes = list(contract.genes)
        self.clip = contract.clip
        self.scaled = contract.scaled
        if self.scaled:
            self.register_buffer("gene_mean", torch.tensor(contract.gene_mean, dtype=torch.float32))
            self.register_buffer("gene_std", _divisor(torch.tensor(contract.gene_std, dtype=torch.float32)))
        self.target_sum = contract.target_sum
        self.counts_are_log_normalized = contract.counts_are_log_normalized
        self.augment_config = from_dict(ExpressionAugmentConfig, dict(augment or {}), "method.augment")
        self.augment = ExpressionAugment(
            self.augment_config,
            target_sum=self.target_sum,
            counts_are_log_normalized=self.counts_are_log_normalized,
        )

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    def normalize(self, batch: Tensor, *, counts_are_log_normalized: bool | None = None) -> Tensor:
        """(N, G) counts over the model's genes -> (N, G) normalised float32 model input.

        ``counts_are_log_normalized`` declares the batch already ``log1p`` of counts scaled per cell (default: as
        the model was trained); other values are first read as the model was trained to read them
        (:meth:`as_trained`).
        """
        batch = self.as_trained(batch, counts_are_log_normalized).float()
        return self.scale(batch if self.counts_are_log_normalized else normalize_log1p(batch, self.target_sum))

    def as_trained(self, batch: Tensor, counts_are_log_normalized: bool | None = None) -> Tensor:
        """(N, G) raw counts, or log-normalised values (``counts_are_log_normalized``; default: as the model was
        trained), -> the same cells as the model reads them by default, zeros kept zero.

        Raw counts for a model of log-normalised values become ``log1p`` of counts scaled per cell over the model's
        genes. Log values for a model of raw counts become per-cell scaled counts (``expm1``): the model normalises
        each cell over its genes, so scanpy's ``normalize_total`` (over all genes, to any target sum: 1e4, CPM,
        the median) + ``log1p`` then gives the same input as the raw counts, where the values as they are would sit
        on another scale.
        """
        if counts_are_log_normalized is None or bool(counts_are_log_normalized) == self.counts_are_log_normalized:
            return batch
        if self.counts_are_log_normalized:
            return normalize_log1p(batch.float(), self.target_sum)
        return torch.expm1(batch.float())

    def scale(self, x: Tensor) -> Tensor:
        """(N, G) log-normalised -> standardised and clipped (identity for an unscaled model)."""
        if not self.scaled:
            return x
        return ((x - self.gene_mean) / self.gene_std).clamp(-self.clip, self.clip)

    def views(self, batch: Tensor, generator: torch.Generator, n: int = 2) -> list[Tensor]:
        """n independently augmented, normalised views of the same cells, each (N, G)."""
        batch = batch.float()
        views = []
        for _ in range(n):
            x, mask = self.augment(batch, generator, return_mask=True)
            views.append(self.scale(x).masked_fill(mask, 0.0))
        return views

    @property
    def contract(self) -> ExpressionContract:
        """The typed contract, with the statistics as held now (a loaded checkpoint's buffers included)."""
        return ExpressionContract(
            genes=tuple(self.genes),
            target_sum=self.target_sum,
            counts_are_log_normalized=self.counts_are_log_normalized,
            gene_mean=tuple(self.gene_mean.tolist()) if self.scaled else None,
            gene_std=tuple(self.gene_std.tolist()) if self.scaled else None,
            clip=self.clip,
        )


class ImageInputs(Inputs):
    """Crops ``(N, C, H, W)`` uint8 / uint16 / float32 -> per-channel standardised float32 ``(N, C, H, W)``.

    The channel spec (names, in order) and each channel's mean and std over the pretraining crops are the
    contract: a uint16 brightfield channel and a uint8 one both reach the encoder at zero mean, unit variance.
    Views are made by :class:`ImageAugment` (settings from ``method.augment``) on the model's device.
    """

    modality = "image"

    def __init__(self, contract: ImageContract | dict[str, Any], *, augment: dict[str, Any] | None = None) -> None:
        super().__init__()
        contract = contract_from_dict(contract)
        if not isinstance(contract, ImageContract):
            raise InputError(f"ImageInputs needs an image contract, got a {contract.modality} one")
        self.channel_names = list(contract.channel_names)
        n = len(self.channel_names)
        mean = torch.tensor(contract.channel_mean, dtype=torch.float32)
        std = torch.tensor(contract.channel_std, dtype=torch.float32)
        self.register_buffer("channel_mean", mean.view(1, n, 1, 1))
        self.register_buffer("channel_std", _divisor(std).view(1, n, 1, 1))
        self.image_size = list(contract.image_size)
        self.dtype = contract.dtype
        self.augment_config = image_augment_config(augment)
        self.augment = ImageAugment(self.augment_config)

    @property
    def n_channels(self) -> int:
        return len(self.channel_names)

    def align(self, cells: CellImages, channels: Sequence[int | str] | None = None) -> CellImages:
        """Select the model's channels from ``cells``: ``channels`` (indices or names) when given, else by the
        model's channel names. Crops stored without channel names (``channel_0``...) and selected by index are
        taken, in the order given, as the model's channels. Raises :class:`ChannelMismatchError` when the result
        differs from the model's channel spec in count or names, or when the crop size differs."""
        if channels is not None:
            cells = cells.select_channels(channels)
            if cells.unnamed_channels and cells.n_channels == self.n_channels:
                # crops stored without channel names, selected explicitly by position: take them as the model's
                if placeholder_names(self.channel_names) and cells.channel_names != list(self.channel_names):
                    warnings.warn(
                        f"{cells.source}: channels {cells.channel_names} are taken as the model's "
                        f"{list(self.channel_names)} (positions in the crops it was trained on); if these crops "
                        "hold their channels at the same positions, select those", SSLCellWarning, stacklevel=3)
                cells = cells.rename_channels(self.channel_names)
        elif cells.channel_names != self.channel_names and set(self.channel_names) <= set(cells.channel_names):
            unnamed_model = list(self.channel_names) == [f"channel_{i}" for i in range(self.n_channels)]
            if unnamed_model and cells.unnamed_channels:  # channel_0 names a position, not a stain: no match by name
                raise ChannelMismatchError(
                    f"{cells.source}: {cells.n_channels} unnamed channels, the model {self.n_channels} unnamed ones; "
                    f"say which of the crops' channels it reads, in its order (channels=[...] / --channels)"
                )
            cells = cells.select_channels(self.channel_names)
        if cells.channel_names != self.channel_names:
            raise ChannelMismatchError(
                f"{cells.source}: channels {cells.channel_names} do not match the model's {self.channel_names}; "
                "select matching channels (channels=... / --channels) or name them as the model does"
            )
        if list(cells.shape[2:]) != self.image_size:
            raise InputError(
                f"{cells.source}: crops are {tuple(cells.shape[2:])} pixels; the model expects {tuple(self.image_size)}"
            )
        self._check_dtype(str(cells.dtype), cells.source)
        self._warn_if_rescaled(cells)
        return cells

    def _warn_if_rescaled(self, cells: CellImages, sample: int = 256, factor: float = 1.5, spread: float = 3.0) -> None:
        """Warn when a channel's mean over up to ``sample`` evenly spaced crops is ``factor`` or more times off the
        model's and more than ``spread`` of the model's standard deviations away: crops on another scale (8-bit
        values in a uint16 array, a 14-bit camera's values stretched to 16 bits, twice the exposure) pass every
        dtype check, yet the model reads them far outside what it was trained on (a 2x brighter Jurkat brightfield
        lies 11 standard deviations off, and a classifier then calls one class for every crop). A sparse channel
        (a stain's bright spots on a dark field) has a spread as wide as its mean and only warns when far off."""
        if len(cells) == 0:
            return
        import numpy as np

        rows = np.unique(np.linspace(0, len(cells) - 1, min(len(cells), sample)).round().astype(np.intp))
        means = cells.batch(rows).mean(axis=(0, 2, 3), dtype=np.float64)
        off = []
        for name, mean, ref, std in zip(self.channel_names, means, self.channel_mean.flatten().tolist(),
                                        self.channel_std.flatten().tolist(), strict=True):
            ratio = np.inf if min(mean, ref) <= 0 else max(mean / ref, ref / mean)
            if mean != ref and ratio >= factor and abs(mean - ref) > spread * std:
                off.append(f"{name} {mean:.4g} (model {ref:.4g} \u00b1 {std:.4g})")
        if off:
            from sslcell._warn import warn_user

            hint = "e.g. 8-bit values stored as uint16, or another exposure" if self.dtype == "uint16" else \
                "e.g. another exposure or normalisation"
            warn_user(f"{cells.source}: channel means {', '.join(off)} are {factor:g}x or more and over {spread:g} "
                      f"standard deviations off those of the crops the model was trained on ({len(rows)} crops "
                      f"sampled): if the intensities are on another scale ({hint}), convert them to the training "
                      "crops' scale; the model reads them as it never saw crops, and its embeddings and predictions "
                      "mean little")

    def check(self, batch: Tensor) -> None:
        """Raise if ``batch`` is not ``(N, C, H, W)`` with the model's channel count and crop size."""
        if batch.ndim != 4:
            raise InputError(f"images must be 4-D (N, C, H, W); got shape {tuple(batch.shape)}")
        if batch.shape[1] != self.n_channels:
            raise ChannelMismatchError(
                f"images have {batch.shape[1]} channels; the model expects {self.n_channels} {self.channel_names}"
            )
        if list(batch.shape[2:]) != self.image_size:
            raise InputError(
                f"images are {tuple(batch.shape[2:])} pixels (H, W); the model expects {tuple(self.image_size)}"
            )
        self._check_dtype(str(batch.dtype).removeprefix("torch."))

    def _check_dtype(self, dtype: str, where: str | None = None) -> None:
        """Raise unless crops of ``dtype`` (numpy's name) are on the scale of the model's statistics; ``where``:
        the crops' source, named in the message."""
        images = f"{where}: images" if where else "images"
        floating = dtype.startswith(("float", "bfloat"))
        if floating and self.dtype in _INTEGER_DTYPES:
            raise InputError(
                f"{images} are {dtype}; the model was trained on {self.dtype} crops and its per-channel statistics "
                f"are in {self.dtype} units: pass the crops as {self.dtype} at the stored scale (float crops "
                "rescaled, e.g. to [0, 1], would collapse every embedding to one point)"
            )
        if not floating and self.dtype not in _INTEGER_DTYPES:
            means = ", ".join(f"{m:.3g}" for m in self.channel_mean.flatten().tolist())
            raise InputError(
                f"{images} are {dtype}; the model was trained on {self.dtype} crops and its per-channel statistics "
                f"are on their scale (channel means {means}): pass {self.dtype} crops at that scale (integer crops "
                "at another scale would be read silently wrong)"
            )
        if dtype in _INTEGER_DTYPES and self.dtype in _INTEGER_DTYPES and dtype != self.dtype:
            raise InputError(
                f"{images} are {dtype}; the model was trained on {self.dtype} crops and its per-channel statistics "
                f"are in {self.dtype} units (convert the crops to {self.dtype} at the same scale)"
            )

    def normalize(self, batch: Tensor) -> Tensor:
        """(N, C, H, W) raw crops -> (N, C, H, W) float32, standardised per channel."""
        self._check_values(batch)
        return (batch.float() - self.channel_mean) / self.channel_std

    def views(self, batch: Tensor, generator: torch.Generator, n: int = 2,
              augment: ImageAugment | None = None) -> list[Tensor]:
        """n independently augmented views of the same raw crops, each (N, C, h, w) float32 and standardised per
        channel, made in one batched call by ``augment`` (default: the method's); on CPU the standardisation is fused
        into the augmentation (no float copy of the batch)."""
        self._check_values(batch)
        augment = self.augment if augment is None else augment
        # n repeats of the batch without concatenating them, as two_views does
        views = augment._augment(batch, generator, n, self.channel_mean.flatten(), self.channel_std.flatten())
        return list(views.chunk(n))

    def _check_values(self, batch: Tensor) -> None:
        if batch.is_floating_point() and not torch.isfinite(batch).all():
            raise InputError("images contain NaN or inf")
        self.check(batch)

    @property
    def contract(self) -> ImageContract:
        """The typed contract, with the statistics as held now (a loaded checkpoint's buffers included)."""
        return ImageContract(
            channel_names=tuple(self.channel_names),
            channel_mean=tuple(self.channel_mean.flatten().tolist()),
            channel_std=tuple(self.channel_std.flatten().tolist()),
            image_size=tuple(self.image_size),
            dtype=self.dtype,
        )


_INTEGER_DTYPES = ("uint8", "uint16")


def image_augment_config(values: dict[str, Any] | None) -> ImageAugmentConfig:
    """``method.augment`` -> :class:`ImageAugmentConfig` (YAML lists become the tuples the config expects)."""
    config = from_dict(ImageAugmentConfig, dict(values or {}), "method.augment")
    for name in ("scale", "ratio", "blur_sigma", "output_size"):
        value = getattr(config, name)
        if isinstance(value, list):
            setattr(config, name, tuple(value))
    return config
