"""Typed recipe configuration, loaded from YAML and validated with messages that name the field.

A recipe is one YAML file in ``configs/``::

    modality: expression          # expression | image
    method: {name: mae, mask_rate: 0.5, masking: random}
    encoder: {name: mlp, hidden: [512, 512, 256, 256], latent: 64}
    data: {batch_size: 256, n_top_genes: 2000}
    optim: {lr: 0.001}
    train: {max_epochs: 50, seed: 0}
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from sslcell.errors import ConfigError

ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")  # Lightning's names for what sslcell runs on

# The method registry, the single place that names the methods of each modality: name -> "module:Class" under
# ``sslcell.methods`` (resolved by ``sslcell.methods.build_method``, so reading a config imports no torch).
METHODS: dict[str, dict[str, str]] = {
    "expression": {
        "mae": "mae:ExpressionMAE",
        "byol": "byol:BYOL",
        "barlow_twins": "barlow_twins:BarlowTwins",
        "simclr": "simclr:SimCLR",
        "vicreg": "vicreg:VICReg",
    },
    "image": {"mae": "image_mae:ImageMAE", "simclr": "simclr:SimCLR", "byol": "byol:BYOL", "dino": "dino:DINO"},
}


@dataclass
class DataConfig:
    """How rows are read and batched."""

    batch_size: int = 256
    num_workers: int = 0
    # expression
    layer: str | None = None
    counts_are_log_normalized: bool = False
    n_top_genes: int | None = 2000  # model genes = highly variable genes of the pretraining data; None = all genes
    target_sum: float = 1e4
    scale: bool = True  # standardise each gene with the pretraining data's mean and std (clipped at 10)
    block_size: int = 1024
    buffer_blocks: int = 8
    # images
    channels: list[int | str] | None = None  # channels to train on (indices or names); None = all
    label_key: str | None = (
        None  # npz / zarr array or obs.csv column holding labels (kept in obs, unused by pretraining)
    )
    stats_max_cells: int = 10000  # cells sampled for the per-channel mean / std stored in the model


@dataclass
class EncoderConfig:
    """The encoder: ``mlp`` for expression; ``vit_tiny``, ``resnet18`` ... for images."""

    name: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [512, 512, 256, 256])
    latent: int = 64
    dropout: float = 0.1
    norm: Literal["layernorm", "batchnorm", "none"] = "layernorm"
    options: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments of image encoders


@dataclass
class MethodConfig:
    """The self-supervised objective and its heads."""

    name: str = "mae"  # one of METHODS[modality]
    # masked autoencoding
    mask_rate: float = 0.5
    masking: Literal["random", "programme"] = "random"
    programmes: str | None = None  # GMT path for programme masking; None = the shipped example set
    decoder_hidden: list[int] | None = None  # expression MAE decoder widths; None = the encoder's, reversed
    norm_pix_loss: bool = True  # image MAE: standardise each target patch
    decoder_dim: int = 128  # image MAE decoder width, depth and heads
    decoder_depth: int = 2
    decoder_heads: int = 4
    # joint-embedding methods
    projection_dim: int = 128
    projection_hidden: int = 512
    temperature: float = 0.1  # SimCLR
    momentum: float = 0.99  # BYOL / DINO start momentum (cosine-annealed to 1)
    bottleneck_dim: int = 256  # DINO head bottleneck; projection_dim is its number of prototypes
    teacher_temp: float = 0.04  # DINO teacher temperature (temperature is the student's)
    warmup_teacher_temp_epochs: int = 0  # DINO: teacher temperature ramps up from 0.04 over these epochs
    n_views: int = 2  # DINO: augmented views per cell (the first two are also the teacher's)
    augment: dict[str, Any] = field(default_factory=dict)  # modality augmentation settings


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and cosine decay, stepped per batch."""

    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.05
    min_lr_fraction: float = 0.01


@dataclass
class TrainConfig:
    """Lightning Trainer settings."""

    max_epochs: int = 50
    max_steps: int = -1
    seed: int = 0
    accelerator: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"  # "auto" picks DDP when devices * num_nodes > 1
    precision: str = "auto"  # "auto": bf16-mixed on GPU, 32-true on CPU
    checkpoint_every_n_steps: int = 500
    log_every_n_steps: int = 10
    logger: Literal["csv", "tensorboard"] = "csv"
    progress_bar: bool = True


@dataclass
class RecipeConfig:
    """A whole pretraining recipe."""

    modality: Literal["expression", "image"] = "expression"
    method: MethodConfig = field(default_factory=MethodConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RecipeConfig:
        config = from_dict(cls, values)
        config.check()
        return config

    def check(self) -> None:
        """Field types (for a recipe built in Python) and the cross-field checks that types alone cannot express."""
        check_types(self)
        allowed = METHODS[self.modality]
        if self.method.name not in allowed:
            raise ConfigError(
                f"method.name: {self.method.name!r} is not available for modality {self.modality!r}; "
                f"choose one of {list(allowed)}"
            )
        if self.method.n_views < 2:
            raise ConfigError(f"method.n_views: must be >= 2, got {self.method.n_views}")
        if not 0.0 < self.method.mask_rate < 1.0:
            raise ConfigError(f"method.mask_rate: must lie in (0, 1), got {self.method.mask_rate}")
        for name in ("batch_size", "block_size", "buffer_blocks"):
            if getattr(self.data, name) < 1:
                raise ConfigError(f"data.{name}: must be >= 1, got {getattr(self.data, name)}")
        if self.data.n_top_genes is not None and self.data.n_top_genes < 1:
            raise ConfigError(f"data.n_top_genes: must be >= 1 or null, got {self.data.n_top_genes}")
        if self.train.max_epochs < 1 and self.train.max_steps < 1:
            raise ConfigError("train.max_epochs / train.max_steps: at least one must be positive")
        for name in ("devices", "num_nodes"):
            if getattr(self.train, name) < 1:
                raise ConfigError(f"train.{name}: must be >= 1, got {getattr(self.train, name)}")
        if self.train.accelerator not in ACCELERATORS:
            raise ConfigError(f"train.accelerator: must be one of {list(ACCELERATORS)}, got {self.train.accelerator!r}")
        if any(width < 1 for width in self.encoder.hidden) or self.encoder.latent < 1:
            raise ConfigError(f"encoder.hidden and encoder.latent: layer widths must be >= 1, got "
                              f"{self.encoder.hidden} and {self.encoder.latent}")
        if not 0.0 <= self.encoder.dropout < 1.0:
            raise ConfigError(f"encoder.dropout: must lie in [0, 1), got {self.encoder.dropout}")
        if self.optim.lr <= 0:
            raise ConfigError(f"optim.lr: must be positive, got {self.optim.lr}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: the base class says so
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice in one mapping", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path, what: str = "config") -> dict[str, Any]:
    """The mapping at the top of a YAML file (``{}`` for an empty file); a missing or unreadable file, malformed
    YAML or another top level raise :class:`ConfigError` naming the file (``what``: its role, for the message)."""
    path = Path(path)
    try:
        values = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such {what} file") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the {what} file ({err.strerror or err})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(values).__name__}")
    return values


def load_config(path: str | Path) -> RecipeConfig:
    """Read a recipe from YAML; errors name the file and the field."""
    path = Path(path)
    values = read_yaml(path)
    try:
        return RecipeConfig.from_dict(values)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def from_dict(cls: type, values: Any, where: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, checking names and types recursively."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{_join(where, unknown[0])}: unknown field; valid fields are {sorted(known)}")
    kwargs = {name: _coerce(hints[name], value, _join(where, name)) for name, value in values.items()}
    return cls(**kwargs)


def check_types(config: Any, where: str = "") -> None:
    """Check the fields of dataclass ``config`` built in Python against their types, as :func:`from_dict` checks
    YAML (ConfigError naming the field; numbers become floats where the field is a float), nested ones included."""
    hints = typing.get_type_hints(type(config))
    for item in dataclasses.fields(config):
        value, name = getattr(config, item.name), _join(where, item.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_types(value, name)
        else:
            setattr(config, item.name, _coerce(hints[item.name], value, name))


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _coerce(tp: Any, value: Any, where: str) -> Any:
    if type(value).__module__ == "numpy" and hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()  # a NumPy scalar (np.int64(3), np.float32(0.1)) as the Python number it holds
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, where)
            except ConfigError as err:
                errors.append(str(err))
        names = ", ".join(getattr(a, "__name__", str(a)) for a in args if a is not type(None))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} is none of the types {names}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML reads 1e-3 as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):  # YAML's .nan / .inf, or float("nan") from Python
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported field type {tp}")  # pragma: no cover - a bug in this module
