"""Input contracts: what a model reads, fixed at pretraining, stored in its ``config.json`` and checked on load.

* :class:`ExpressionContract`: the model's genes (in order) and the normalisation (library size to ``target_sum``,
  ``log1p``, per-gene standardisation with the pretraining data's mean and std, clipped at ``clip``).
* :class:`ImageContract`: the channel names (in order), each channel's mean and std over the pretraining crops,
  the crop size ``(H, W)`` and the stored dtype.

Both are frozen dataclasses; :func:`contract_from_dict` validates a stored mapping (names the bad field) and
``to_dict`` gives the JSON form. The normalisation itself runs in :mod:`sslcell.methods.inputs`.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

from sslcell.errors import ConfigError

IMAGE_DTYPES = ("uint8", "uint16", "float32")


class _JSONContract:
    """What both contracts share: their JSON form (``modality`` first, tuples as lists)."""

    modality: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        out = {"modality": self.modality, **dataclasses.asdict(self)}  # type: ignore[call-overload]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


@dataclass(frozen=True)
class ExpressionContract(_JSONContract):
    """Counts ``(N, G)`` over ``genes`` -> normalised model input ``(N, G)``."""

    genes: tuple[str, ...]
    target_sum: float = 1e4
    counts_are_log_normalized: bool = False
    gene_mean: tuple[float, ...] | None = None
    gene_std: tuple[float, ...] | None = None
    clip: float = 10.0
    modality: ClassVar[str] = "expression"

    def __post_init__(self) -> None:
        genes = _names(self.genes, "contract.genes", "gene")
        object.__setattr__(self, "genes", genes)
        _positive(self.target_sum, "contract.target_sum")
        _positive(self.clip, "contract.clip")
        if (self.gene_mean is None) != (self.gene_std is None):
            raise ConfigError("contract.gene_mean / gene_std: give both or neither")
        if self.gene_mean is not None:
            object.__setattr__(self, "gene_mean", _vector(self.gene_mean, len(genes), "contract.gene_mean"))
            std = _vector(self.gene_std, len(genes), "contract.gene_std", nonnegative=True)
            object.__setattr__(self, "gene_std", std)

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    @property
    def scaled(self) -> bool:
        """Whether each gene is standardised with the pretraining statistics."""
        return self.gene_mean is not None


@dataclass(frozen=True)
class ImageContract(_JSONContract):
    """Crops ``(N, C, H, W)`` with ``channel_names`` -> per-channel standardised model input."""

    channel_names: tuple[str, ...]
    channel_mean: tuple[float, ...]
    channel_std: tuple[float, ...]
    image_size: tuple[int, int]
    dtype: str = "uint8"
    modality: ClassVar[str] = "image"

    def __post_init__(self) -> None:
        names = _names(self.channel_names, "contract.channel_names", "channel")
        object.__setattr__(self, "channel_names", names)
        object.__setattr__(self, "channel_mean", _vector(self.channel_mean, len(names), "contract.channel_mean"))
        std = _vector(self.channel_std, len(names), "contract.channel_std", nonnegative=True)
        object.__setattr__(self, "channel_std", std)
        size = tuple(self.image_size)
        if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
            raise ConfigError(f"contract.image_size: expected two positive integers (H, W), got {self.image_size!r}")
        object.__setattr__(self, "image_size", size)
        if self.dtype not in IMAGE_DTYPES:
            raise ConfigError(f"contract.dtype: {self.dtype!r} is not one of {list(IMAGE_DTYPES)}")

    @property
    def n_channels(self) -> int:
        return len(self.channel_names)


Contract = ExpressionContract | ImageContract
CONTRACTS: dict[str, type] = {"expression": ExpressionContract, "image": ImageContract}


def contract_from_dict(values: Any) -> Contract:
    """A stored contract mapping -> the typed contract; a :class:`ConfigError` names the bad field."""
    if isinstance(values, (ExpressionContract, ImageContract)):
        return values
    if not isinstance(values, dict):
        raise ConfigError(f"contract: expected a mapping, got {type(values).__name__}")
    modality = values.get("modality")
    if modality not in CONTRACTS:
        raise ConfigError(f"contract.modality: {modality!r} is not one of {list(CONTRACTS)}")
    cls = CONTRACTS[modality]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields - {"modality"})
    if unknown:
        raise ConfigError(f"contract.{unknown[0]}: unknown field for a {modality} model; valid: {sorted(fields)}")
    required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
    missing = [name for name in required if name not in values]
    if missing:
        raise ConfigError(f"contract.{missing[0]}: missing (a {modality} model needs {required})")
    kwargs = {k: v for k, v in values.items() if k != "modality"}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"contract: {err}") from None


def _names(values: Any, where: str, what: str) -> tuple[str, ...]:
    """At least one name, all distinct, as a tuple of strings."""
    names = tuple(str(v) for v in values)
    if not names:
        raise ConfigError(f"{where}: the model needs at least one {what}")
    if len(set(names)) != len(names):
        repeated = sorted(name for name, count in Counter(names).items() if count > 1)
        raise ConfigError(f"{where}: names must be unique; repeated: {repeated[:10]}")
    return names


def _positive(value: Any, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{where}: expected a positive finite number, got {value!r}")


def _vector(values: Any, n: int, where: str, *, nonnegative: bool = False) -> tuple[float, ...]:
    """``n`` finite floats (``>= 0`` with ``nonnegative``; a zero std is clamped where it is used)."""
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected {n} numbers, got {values!r:.80}") from None
    if len(out) != n:
        raise ConfigError(f"{where}: expected one value per gene or channel ({n}), got {len(out)}")
    bad = [i for i, v in enumerate(out) if not math.isfinite(v) or (nonnegative and v < 0)]
    if bad:
        rule = "finite and >= 0" if nonnegative else "finite"
        raise ConfigError(f"{where}: values must be {rule}; entry {bad[0]} is {out[bad[0]]}")
    return out
