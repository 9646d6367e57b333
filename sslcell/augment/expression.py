"""Batched expression augmentation on the device: every function takes a whole batch ``(B, G)``.

Counts-space operations (raw counts, integer-valued, any dtype): :func:`library_size_scaling` (binomial
thinning), :func:`negative_binomial_noise` (gamma-Poisson resampling), :func:`gene_dropout`.
Then :func:`normalize_log1p`, then masking of the normalised profile: :func:`random_mask` (a uniformly random
``round(rate * G)`` genes per cell, by noise ranking as in MAE) or :func:`programme_mask` (whole gene programmes).
:class:`ExpressionAugment` chains them as configured by :class:`ExpressionAugmentConfig`.

Randomness: every function takes ``generator``; draws happen on the generator's device and results are
moved to the data's device, so pass a generator on the data's device for speed (``torch.Generator(device=x.device)``).
``generator=None`` uses torch's global generator (not reproducible unless globally seeded).
Shape, dtype and device of the input are kept; integer counts come back as integers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from sslcell.errors import ConfigError, GeneMismatchError, InputError


def normalize_log1p(counts: Tensor, target_sum: float = 1e4) -> Tensor:
    """``(B, G)`` raw counts -> ``log1p(counts / library_size * target_sum)``, as scanpy's ``normalize_total``
    followed by ``log1p``. Rows with zero library size stay zero. Integer input gives float32."""
    _check_2d(counts, "counts")
    x = _work(counts)  # half-precision sums could overflow: compute in float32, return the input's float dtype
    library = x.sum(1, keepdim=True)
    scale = torch.where(library > 0, target_sum / library.clamp_min(1e-12), torch.zeros_like(library))
    out = torch.log1p(x * scale)
    return out.to(counts.dtype) if counts.is_floating_point() else out


def random_mask(x: Tensor, rate: float, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Mask exactly ``round(rate * G)`` uniformly chosen genes per cell (top-k of uniform noise, as MAE).

    Returns ``x`` ``(B, G)`` with masked entries set to 0, and the bool mask ``(B, G)`` (True = masked).
    """
    _check_2d(x, "x")
    _check_rate(rate, "rate")
    mask = _random_mask(x.shape[0], x.shape[1], rate, generator, x.device)
    return x.masked_fill(mask, 0), mask


def _random_mask(b: int, g: int, rate: float, generator: torch.Generator | None, device: torch.device) -> Tensor:
    n_mask = round(rate * g)
    mask = torch.zeros(b, g, dtype=torch.bool, device=device)
    if n_mask:
        noise = _rand((b, g), generator, device)
        mask.scatter_(1, noise.topk(n_mask, dim=1).indices, True)  # topk breaks ties by index: exact count
    return mask


class ProgrammeMasks(nn.Module):
    """Gene programmes over ``n_genes`` genes, stored as (programme, gene) membership pairs.

    Build from a list of gene-index arrays (e.g. from :func:`sslcell.data.genesets.programme_index`) with
    ``n_genes``, or from a bool membership matrix ``(P, G)``. A module, so ``.to(device)`` moves it with a model;
    pass one to :func:`programme_mask` to avoid rebuilding (and a host sync on GPU) at every step.
    """

    def __init__(self, programmes: Sequence[Tensor | np.ndarray] | Tensor, n_genes: int | None = None) -> None:
        super().__init__()
        if isinstance(programmes, Tensor) and programmes.dim() == 2:
            if n_genes is not None and n_genes != programmes.shape[1]:
                raise GeneMismatchError(f"membership matrix has {programmes.shape[1]} genes, n_genes={n_genes}")
            prog, gene = programmes.bool().nonzero(as_tuple=True)
            n_programmes, n_genes = programmes.shape
        else:
            if n_genes is None:
                raise InputError("ProgrammeMasks: n_genes is required with a list of gene-index arrays")
            index = [torch.as_tensor(p, dtype=torch.long).reshape(-1).cpu() for p in programmes]
            for i, idx in enumerate(index):
                if idx.numel() and (idx.min() < 0 or idx.max() >= n_genes):
                    raise InputError(
                        f"programme {i}: gene index out of range [0, {n_genes}) "
                        f"(min {idx.min().item()}, max {idx.max().item()})"
                    )
            n_programmes = len(index)
            prog = torch.repeat_interleave(torch.arange(n_programmes), torch.tensor([len(i) for i in index]))
            gene = torch.cat(index) if index else torch.zeros(0, dtype=torch.long)
        self.n_programmes, self.n_genes = int(n_programmes), int(n_genes)
        self.register_buffer("programme_idx", prog.long(), persistent=False)
        self.register_buffer("gene_idx", gene.long(), persistent=False)

    def membership(self) -> Tensor:
        """Bool membership matrix ``(P, G)``."""
        out = torch.zeros(self.n_programmes, self.n_genes, dtype=torch.bool, device=self.gene_idx.device)
        out[self.programme_idx, self.gene_idx] = True
        return out


def programme_mask(
    x: Tensor,
    programmes: ProgrammeMasks | Sequence[Tensor | np.ndarray] | Tensor,
    rate: float,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    """Mask whole gene programmes, in a random order per cell, until ``>= round(rate * G)`` genes are masked
    (or every programme is used). Genes in no programme are never masked.

    Vectorised: each cell ranks the programmes at random; a gene's "first rank" is the smallest rank among its
    programmes; the cell masks the genes whose first rank is at most the ``n``-th smallest first rank.

    Args:
        x: ``(B, G)`` profiles.
        programmes: :class:`ProgrammeMasks`, a list of gene-index arrays, or a bool membership matrix ``(P, G)``.
    Returns:
        ``x`` with masked entries set to 0, and the bool mask ``(B, G)``.
    """
    _check_2d(x, "x")
    _check_rate(rate, "rate")
    if not isinstance(programmes, ProgrammeMasks):
        programmes = ProgrammeMasks(programmes, None if isinstance(programmes, Tensor) else x.shape[1])
    mask = _programme_mask(x.shape[0], x.shape[1], programmes, rate, generator, x.device)
    return x.masked_fill(mask, 0), mask


def _programme_mask(
    b: int, g: int, programmes: ProgrammeMasks, rate: float, generator: torch.Generator | None, device: torch.device
) -> Tensor:
    if programmes.n_genes != g:
        raise GeneMismatchError(f"programmes are defined over {programmes.n_genes} genes but x has {g}")
    n_target, p = round(rate * g), programmes.n_programmes
    if n_target == 0 or p == 0:
        return torch.zeros(b, g, dtype=torch.bool, device=device)
    prog_idx, gene_idx = programmes.programme_idx.to(device), programmes.gene_idx.to(device)
    rank = _rand((b, p), generator, device).argsort(1).argsort(1)  # (B, P) random programme order per cell
    first = torch.full((b, g), p, dtype=torch.long, device=device)  # first rank per gene; p = in no programme
    first.scatter_reduce_(1, gene_idx.expand(b, -1), rank[:, prog_idx], reduce="amin")
    threshold = first.kthvalue(n_target, dim=1, keepdim=True).values.clamp_max(p - 1)
    return first <= threshold


def negative_binomial_noise(counts: Tensor, dispersion: float | Tensor, generator: torch.Generator | None) -> Tensor:
    """Resample ``(B, G)`` counts as NB(mean = counts, inverse dispersion ``theta = dispersion``), drawn as
    ``Poisson(counts * Gamma(theta, 1) / theta)``.

    Variance is ``mean + mean^2 / theta`` (the NB2 / scVI ``theta`` parameterisation): larger ``dispersion`` means
    less noise. ``dispersion`` is a scalar or a per-gene tensor ``(G,)``. Zero counts stay zero.
    """
    _check_2d(counts, "counts")
    theta = torch.as_tensor(dispersion, dtype=torch.float32)
    if not bool((theta > 0).all()):
        raise ConfigError(f"dispersion must be > 0 (got min {theta.min().item()})")
    x, device = _work(counts), _draw_device(generator, counts)
    theta = theta.to(device).expand(x.shape)
    lam = x.to(device) * torch._standard_gamma(theta, generator=generator) / theta
    return torch.poisson(lam, generator=generator).to(counts.device, counts.dtype)


def gene_dropout(counts: Tensor, rate: float, generator: torch.Generator | None) -> Tensor:
    """Zero each entry of ``(B, G)`` independently with probability ``rate``."""
    _check_2d(counts, "counts")
    _check_rate(rate, "rate")
    return counts.masked_fill(_rand(counts.shape, generator, counts.device) < rate, 0)


def library_size_scaling(counts: Tensor, low: float, high: float, generator: torch.Generator | None) -> Tensor:
    """Downsample each cell's counts ``(B, G)`` to a fraction ``f ~ U(low, high)`` (one per cell) by binomial
    thinning: every count ``n`` becomes ``Binomial(n, f)``, as sequencing that cell ``f`` times as deep would.
    Requires ``0 < low <= high <= 1`` and integer-valued counts."""
    _check_2d(counts, "counts")
    if not 0.0 < low <= high <= 1.0:
        raise ConfigError(f"library scale must satisfy 0 < low <= high <= 1 (got low={low}, high={high})")
    x, device = _work(counts), _draw_device(generator, counts)
    f = _rand((x.shape[0], 1), generator, device) * (high - low) + low
    out = torch.binomial(x.to(device), f.expand(x.shape).contiguous(), generator=generator)
    return out.to(counts.device, counts.dtype)


@dataclass
class ExpressionAugmentConfig:
    """Settings of :class:`ExpressionAugment`; every ``p_*`` is the per-cell probability of applying that step.

    Counts-space steps (``library_scale``, ``nb_dispersion``) need raw counts; ``dropout_rate`` and masking also
    work on log-normalised input. ``mask_mode="programme"`` needs ``programmes`` given to :class:`ExpressionAugment`.
    """

    mask_rate: float = 0.2
    mask_mode: Literal["random", "programme"] = "random"
    p_mask: float = 1.0
    dropout_rate: float = 0.0
    p_dropout: float = 1.0
    nb_dispersion: float | None = None
    p_nb: float = 1.0
    library_scale: tuple[float, float] | None = None
    p_library_scale: float = 1.0

    def __post_init__(self) -> None:
        for name in ("mask_rate", "dropout_rate", "p_mask", "p_dropout", "p_nb", "p_library_scale"):
            _check_rate(getattr(self, name), name)
        if self.mask_mode not in ("random", "programme"):
            raise ConfigError(f"mask_mode: {self.mask_mode!r} is not one of ['random', 'programme']")
        if self.nb_dispersion is not None and self.nb_dispersion <= 0:
            raise ConfigError(f"nb_dispersion: must be > 0 or None, got {self.nb_dispersion}")
        if self.library_scale is not None:
            scale = tuple(float(v) for v in self.library_scale)
            if len(scale) != 2 or not 0.0 < scale[0] <= scale[1] <= 1.0:
                raise ConfigError(
                    f"library_scale: must be (low, high) with 0 < low <= high <= 1, got {self.library_scale}"
                )
            self.library_scale = scale


class ExpressionAugment(nn.Module):
    """Raw counts ``(B, G)`` -> one augmented, normalised log1p view ``(B, G)``.

    Order: library-size thinning, NB noise, dropout (counts space), :func:`normalize_log1p`, masking.
    With ``counts_are_log_normalized`` the input is taken as already normalised: normalisation is skipped, and the
    counts-space steps that need raw counts are refused.
    """

    def __init__(
        self,
        config: ExpressionAugmentConfig | None = None,
        *,
        target_sum: float = 1e4,
        counts_are_log_normalized: bool = False,
        programmes: ProgrammeMasks | Sequence[Tensor | np.ndarray] | Tensor | None = None,
        n_genes: int | None = None,
    ) -> None:
        super().__init__()
        self.config = cfg = config or ExpressionAugmentConfig()
        self.target_sum = float(target_sum)
        self.counts_are_log_normalized = bool(counts_are_log_normalized)
        if counts_are_log_normalized:
            for name in ("library_scale", "nb_dispersion"):
                if getattr(cfg, name) is not None:
                    raise ConfigError(f"{name}: needs raw counts, but the input is log-normalised; set it to null")
        if cfg.mask_mode == "programme" and cfg.mask_rate > 0 and programmes is None:
            raise ConfigError("mask_mode: 'programme' needs gene programmes (pass programmes=...)")
        if programmes is not None and not isinstance(programmes, ProgrammeMasks):
            programmes = ProgrammeMasks(programmes, n_genes)
        self.programmes = programmes

    def forward(
        self, counts: Tensor, generator: torch.Generator | None, *, return_mask: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """``(B, G)`` counts -> view ``(B, G)`` (float), and with ``return_mask`` the bool mask ``(B, G)``."""
        _check_2d(counts, "counts")
        cfg, x = self.config, counts if counts.is_floating_point() else counts.float()
        if cfg.library_scale is not None:
            low, high = cfg.library_scale
            x = self._maybe(x, cfg.p_library_scale, generator, lambda v: library_size_scaling(v, low, high, generator))
        if cfg.nb_dispersion is not None:
            theta = cfg.nb_dispersion
            x = self._maybe(x, cfg.p_nb, generator, lambda v: negative_binomial_noise(v, theta, generator))
        if cfg.dropout_rate > 0:
            rate = cfg.dropout_rate
            x = self._maybe(x, cfg.p_dropout, generator, lambda v: gene_dropout(v, rate, generator))
        if not self.counts_are_log_normalized:
            x = normalize_log1p(x, self.target_sum)
        b, g = x.shape
        mask = torch.zeros(b, g, dtype=torch.bool, device=x.device)
        if cfg.mask_rate > 0 and cfg.p_mask > 0:
            if cfg.mask_mode == "programme":
                mask = _programme_mask(b, g, self.programmes, cfg.mask_rate, generator, x.device)
            else:
                mask = _random_mask(b, g, cfg.mask_rate, generator, x.device)
            if cfg.p_mask < 1:
                mask &= _rand((x.shape[0], 1), generator, x.device) < cfg.p_mask
            x = x.masked_fill(mask, 0)
        return (x, mask) if return_mask else x

    @staticmethod
    def _maybe(x: Tensor, p: float, generator: torch.Generator | None, op) -> Tensor:
        """Apply ``op`` to the cells selected with probability ``p`` (all when ``p == 1``)."""
        if p >= 1:
            return op(x)
        if p <= 0:
            return x
        chosen = _rand((x.shape[0], 1), generator, x.device) < p
        return torch.where(chosen, op(x), x)


def _rand(shape: Sequence[int], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Uniform [0, 1) float32 drawn on the generator's device, returned on ``device``."""
    draw_on = generator.device if generator is not None else device
    return torch.rand(tuple(shape), generator=generator, device=draw_on).to(device)


def _draw_device(generator: torch.Generator | None, like: Tensor) -> torch.device:
    return generator.device if generator is not None else like.device


def _work(counts: Tensor) -> Tensor:
    """float32/float64 counts as they are; anything else as float32 (torch samplers need floating point)."""
    return counts if counts.dtype in (torch.float32, torch.float64) else counts.float()


def _check_2d(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor) or x.dim() != 2:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise InputError(f"{name}: expected a (B, G) tensor, got {shape}")


def _check_rate(value: float, name: str) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name}: must lie in [0, 1], got {value}")
