"""Model directories: ``model.safetensors`` + ``config.json``. Loading never executes code from the files.

``config.json`` holds the recipe (method, encoder, training settings), the input contract (gene list or
channel spec, normalisation), the seed, the library versions and what the model was trained on.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sslcell.config import RecipeConfig
from sslcell.errors import ConfigError, FileFormatError, OverwriteError
from sslcell.methods import SSLModule, build_method
from sslcell.provenance import versions

FORMAT_VERSION = 2  # the format this release writes
# Every format a release has written. Each stays readable by later releases, proved by a model, a classifier and
# their expected outputs committed per format under tests/fixtures/checkpoints/format<N>/. A change to what is
# written bumps FORMAT_VERSION, appends it here, adds the conversion from the older formats to the readers, and
# commits a new fixture folder; old fixture folders are never regenerated.
# 1: the first. 2: the JSON holds "weights_id", the weights' checksum (:func:`state_id`), checked on loading.
READABLE_FORMATS = (1, 2)
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CARD = "README.md"
MODEL_FIELDS = frozenset({"format_version", "recipe", "contract", "embed_dim", "seed", "versions", "trained",
                          "weights_id"})


def save_model(model: SSLModule, directory: str | Path, *, trained: dict[str, Any] | None = None,
               overwrite: bool = False) -> Path:
    """Write ``model`` to ``directory`` (created; each file written atomically). A model already saved there is
    replaced only with ``overwrite=True`` (scvi-tools' convention)."""
    meta = {
        "format_version": FORMAT_VERSION,
        "recipe": model.config.to_dict(),
        "contract": model.inputs.contract.to_dict(),
        "embed_dim": model.embed_dim,
        "seed": model.config.train.seed,
        "versions": versions(),
        "trained": trained or {},
    }
    directory = write_weights(model, meta, directory, WEIGHTS, CONFIG, overwrite=overwrite)
    atomic_write(directory / CARD, lambda p: Path(p).write_text(model_card(meta)))
    return directory


def model_card(meta: dict[str, Any]) -> str:
    """The model directory's README.md: what the model is, what it reads, how it was trained, how to load it."""
    recipe, contract, trained = meta["recipe"], meta["contract"], meta.get("trained", {})
    if contract["modality"] == "expression":
        genes = contract["genes"]
        reads = (f"raw counts of {len(genes)} genes ({', '.join(genes[:5])}{', ...' if len(genes) > 5 else ''}), "
                 f"library size to {contract['target_sum']:g}, log1p"
                 + (", per-gene standardised" if contract.get("gene_mean") is not None else ""))
    else:
        reads = (f"{contract['dtype']} crops of {contract['image_size'][0]} x {contract['image_size'][1]} pixels, "
                 f"channels {contract['channel_names']}")
    image = contract["modality"] == "image"
    embed_call = "sslcell.tl.embed_crops(cells, model)" if image else "sslcell.tl.embed(adata, model)"
    lines = [
        "# sslcell model", "",
        f"- **Method:** {recipe['method']['name']} ({recipe['modality']}), encoder {recipe['encoder']['name']}, "
        f"embedding width {meta['embed_dim']}",
        f"- **Reads:** {reads}",
        f"- **Trained:** {', '.join(f'{k} {v}' for k, v in trained.items()) or 'not recorded'}",
        f"- **Seed:** {meta['seed']}",
        f"- **Versions:** {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}",
        "- **Metrics:** none recorded with the model (see the benchmarks that used it)", "",
        f"Load it with `sslcell.load(\"<this folder>\")`, embed with `{embed_call}`. The settings are in",
        "`config.json` (recipe and input contract) and the weights in `model.safetensors`: nothing here runs code.",
    ]
    return "\n".join(lines) + "\n"


def write_weights(
    module: torch.nn.Module, meta: dict[str, Any], directory: str | Path, weights: str, config: str, *,
    overwrite: bool = False, header: dict[str, str] | None = None,
) -> Path:
    """``module``'s state dict as safetensors ``weights`` and ``meta`` as JSON ``config`` in ``directory``
    (created), each written atomically; files already there are replaced only with ``overwrite``. The JSON also
    gets ``weights_id``, the weights' checksum (:func:`state_id`), which :func:`read_weights` checks. ``header``:
    text entries for the safetensors header (:func:`weights_header` reads them back)."""
    directory = Path(directory)
    check_free_files(directory, (weights, config), overwrite)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    meta = {**meta, "weights_id": state_id(state)}
    atomic_write(directory / weights, lambda p: save_file(state, str(p), metadata={**(header or {}), "format": "pt"}))
    atomic_write(directory / config, lambda p: Path(p).write_text(json.dumps(meta, indent=1)))
    return directory


def check_free_files(directory: Path, names: tuple[str, ...], overwrite: bool) -> None:
    """Raise :class:`OverwriteError` if ``directory`` already holds any of ``names`` and not ``overwrite``."""
    taken = [n for n in names if (directory / n).exists()]
    if taken and not overwrite:
        raise OverwriteError(f"{directory}: already holds {', '.join(taken)}; pass overwrite=True to replace them, "
                             "or save elsewhere")


def read_model_config(directory: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a model directory (or of a run directory's ``model/``)."""
    directory = model_directory(directory)
    meta = _json(directory / CONFIG)
    check_format(meta, directory / CONFIG)
    return meta


def check_format(meta: dict[str, Any], path: Path) -> None:
    """Refuse a JSON description whose ``format_version`` this release cannot read, saying why."""
    version = meta.get("format_version")
    integer = isinstance(version, int) and not isinstance(version, bool)  # JSON true is not format 1
    if integer and version in READABLE_FORMATS:
        return
    readable = ", ".join(map(str, READABLE_FORMATS))
    if integer and version > max(READABLE_FORMATS):
        raise FileFormatError(f"{path}: format_version {version} was written by a newer sslcell; this one reads "
                              f"format(s) {readable}: upgrade sslcell (pip install -U sslcell)")
    raise FileFormatError(f"{path}: format_version {version!r} is not an sslcell format (this sslcell reads "
                          f"format(s) {readable})")


def load(directory: str | Path, *, map_location: str | torch.device = "cpu") -> SSLModule:
    """Restore a model saved by :func:`save_model` (or a run directory of ``sslcell pretrain``).

    Weights come from safetensors and settings from JSON: nothing in the files is executed.
    """
    directory = model_directory(directory)
    meta = read_model_config(directory)
    unknown = sorted(set(meta) - MODEL_FIELDS)
    if unknown:
        raise FileFormatError(f"{directory / CONFIG}: unknown field(s) {unknown}; a model's fields are "
                              f"{sorted(MODEL_FIELDS)}")
    try:
        config = RecipeConfig.from_dict(meta["recipe"])
        model = build_method(config, meta["contract"])
    except (KeyError, TypeError, AttributeError, ConfigError) as err:
        raise FileFormatError(f"{directory / CONFIG}: bad recipe or input contract ({err})") from None
    if meta.get("embed_dim", model.embed_dim) != model.embed_dim:
        raise FileFormatError(f"{directory / CONFIG}: embed_dim {meta['embed_dim']!r} does not match the recipe's "
                              f"encoder ({model.embed_dim})")
    built = model.inputs.contract.to_dict()  # the JSON's statistics, as the input module holds them
    read_weights(model, directory / WEIGHTS, CONFIG, map_location, meta)
    check_statistics(model.inputs, built, directory / CONFIG)
    model.trained_info = meta.get("trained", {})
    model.source = str(directory)
    return model.eval()


def read_weights(module: torch.nn.Module, path: Path, config: str, map_location: str | torch.device = "cpu",
                 meta: dict[str, Any] | None = None) -> None:
    """Load safetensors ``path`` into ``module``, which was built from JSON ``config`` (parsed: ``meta``): every
    tensor must be there with its shape and dtype, finite, and nothing else (no code is executed). From format 2
    the weights must match ``meta["weights_id"]``; on a mismatch both files are read, and checked, once more, in
    case a run was refreshing its model in between (weights first, then the JSON), before they are refused."""
    for attempt in range(2):
        if attempt:
            time.sleep(0.5)
            meta = _json(path.parent / config)
        state = _weights(path)
        _check_state(state, module.state_dict(), path, config)
        expected = _expected_id(meta or {}, path.parent / config)
        if expected is None or state_id(state) == expected:
            break
    else:
        raise FileFormatError(f"{path}: the weights' checksum differs from weights_id in {config}: the file is "
                              f"damaged, or was replaced without its {config}; copy or save the model again")
    module.load_state_dict(state)
    module.to(map_location)


STATISTICS = ("gene_mean", "gene_std", "channel_mean", "channel_std")  # contract fields the weights also hold


def check_statistics(inputs: torch.nn.Module, built: dict[str, Any], path: Path) -> None:
    """Refuse a contract in JSON ``path`` whose normalisation statistics differ from those the loaded weights hold
    as buffers: the weights' would be used, and the edit ignored without a word. ``built``: ``inputs.contract``
    as built from the JSON, before the weights were loaded (the module's own form: a zero std held as 1)."""
    held = inputs.contract.to_dict()
    edited = [k for k in STATISTICS if held.get(k) is not None
              and not np.array_equal(np.asarray(built.get(k), dtype=np.float32), np.asarray(held[k], np.float32))]
    if edited:
        raise FileFormatError(f"{path}: contract.{edited[0]} differs from the one the weights hold (the statistics "
                              "the model was trained with); they are part of the weights and cannot be changed in "
                              "the JSON: restore the file, or pretrain on the data they should come from")


def mismatched_tensors(state: dict[str, Any], expected: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """``(missing or misshapen, unexpected)`` names of ``state`` against ``expected`` (a module's state dict)."""
    wrong = [k for k in expected if k not in state or tuple(state[k].shape) != tuple(expected[k].shape)]
    return wrong, [k for k in state if k not in expected]


def _check_state(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], path: Path, config: str) -> None:
    """Refuse weights ``state`` that lack a tensor of ``expected`` (the module's state dict), hold another, or one of
    another shape or dtype, or a NaN or infinite value."""
    wrong, unexpected = mismatched_tensors(state, expected)
    if wrong or unexpected:
        raise FileFormatError(
            f"{path}: weights do not match the settings in {config} "
            f"(missing or misshapen {wrong[:5]}, unexpected {unexpected[:5]})"
        )
    retyped = [f"{k} ({state[k].dtype}, expected {expected[k].dtype})" for k in expected
               if state[k].dtype != expected[k].dtype]
    if retyped:  # a silent cast would change the model's outputs
        raise FileFormatError(f"{path}: weights of the wrong dtype: {', '.join(retyped[:5])}")
    broken = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:
        raise FileFormatError(f"{path}: weights hold NaN or infinite values: {broken[:5]}")


def weights_header(path: Path) -> dict[str, str]:
    """The text entries of safetensors ``path``'s header (:func:`write_weights`' ``header``)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise FileFormatError(f"{path}: cannot read weights ({err})") from None


def _weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as err:
        raise FileFormatError(f"{path}: cannot read weights ({err})") from None


def _json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; invalid JSON or another top level raise :class:`FileFormatError`."""
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FileFormatError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise FileFormatError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    return meta


def _expected_id(meta: dict[str, Any], path: Path) -> str | None:
    """The weights' checksum ``meta`` records (None for format 1, which had none)."""
    if meta.get("format_version", 1) == 1 and "weights_id" not in meta:
        return None
    expected = meta.get("weights_id")
    if not isinstance(expected, str):
        raise FileFormatError(f"{path}: format {meta.get('format_version')} needs weights_id, the weights' "
                              f"checksum; got {expected!r}")
    return expected


def state_id(state: dict[str, torch.Tensor]) -> str:
    """A fingerprint of a state dict: every tensor, by name, dtype and bytes (blake2b, 16 hex digits); the same
    for the same values however they were stored or loaded."""
    import hashlib

    digest = hashlib.blake2b(digest_size=8)
    for name, tensor in sorted(state.items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def weights_id(module: torch.nn.Module) -> str:
    """A fingerprint of ``module``'s weights (:func:`state_id` of its state dict): equal for the same weights
    however they were loaded, different once any value differs. Recorded with every embedding, so embeddings of
    two different models are never compared as if they shared a space, and in a saved model's JSON."""
    return state_id(module.state_dict())


def model_id(model: SSLModule) -> str:
    """What an embedding's space depends on: :func:`weights_id` and a digest of the input contract (genes and their
    order, normalisation, channels, crop size, dtype), as ``"<weights>+<contract>"``. Two models with the same
    weights but another contract (a hand-edited ``config.json``) embed into different spaces, so their ids differ.
    Recorded with every embedding (``uns["sslcell"][key]["model_id"]``); compared by
    :func:`sslcell.tl._keys.check_same_space`."""
    import hashlib

    contract = json.dumps(model.inputs.contract.to_dict(), sort_keys=True)
    return f"{weights_id(model)}+{hashlib.blake2b(contract.encode(), digest_size=8).hexdigest()}"


def model_directory(directory: str | Path) -> Path:
    """Accept a model directory or a run directory containing ``model/``."""
    directory = Path(directory)
    if (directory / CONFIG).is_file():
        return directory
    if (directory / "model" / CONFIG).is_file():
        return directory / "model"
    if not directory.exists():
        raise FileNotFoundError(f"{directory}: no such model directory")
    raise FileFormatError(f"{directory}: not an sslcell model directory (no {CONFIG} in it or in {directory}/model)")


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` a temporary file in ``path``'s folder, then rename it to ``path``: a killed run never leaves
    half a file, a failed write leaves no temporary file. Those a killed earlier write left are removed first."""
    for stale in path.parent.glob(f".{path.name}.*"):
        stale.unlink(missing_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}"
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # the umask's mode, as open() gives; not
    # mkstemp's owner-only 0600, which os.replace would keep
    mode = stat.S_IMODE(tmp.stat().st_mode)
    try:
        write(tmp)
        os.chmod(tmp, mode)  # a writer that recreates the file (safetensors' save_file: 0600) gets it back
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
