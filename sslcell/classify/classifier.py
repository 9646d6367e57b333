"""A pretrained encoder with a classification head, saved as safetensors + JSON (nothing executable)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sslcell.augment.image import dihedral_views
from sslcell.checkpoint import (
    FORMAT_VERSION,
    check_format,
    check_statistics,
    read_weights,
    versions,
    weights_header,
    write_weights,
)
from sslcell.config import RecipeConfig
from sslcell.data.images import CellImages
from sslcell.errors import ConfigError, FileFormatError, InputError
from sslcell.methods import SSLModule, build_encoder, build_inputs
from sslcell.methods.inputs import Inputs, image_augment_config
from sslcell.train import image_contract

WEIGHTS = "classifier.safetensors"
CONFIG = "classifier.json"


class CellClassifier(nn.Module):
    """Raw cells (crops ``(N, C, H, W)`` or counts ``(N, G)``) -> class logits ``(N, K)``: input normalisation,
    encoder, standardised features, then the head: dropout and a linear layer, with ``hidden > 0`` preceded by
    a hidden layer (linear ``D -> hidden``, GELU, dropout).

    ``feature_mean`` / ``feature_std`` ``(D,)`` standardise the embedding (a linear probe is fitted on
    standardised features); they are 0 / 1 for a fine-tuned head. ``base`` holds the input contract and the
    encoder's description, so :func:`load_classifier` can rebuild the encoder from JSON: the pretrained model's
    recipe (:meth:`from_pretrained`), or the encoder's name and options (:meth:`from_scratch`).
    """

    def __init__(self, inputs: Inputs, encoder: nn.Module, classes: list[str], base: dict[str, Any],
                 dropout: float = 0.0, hidden: int = 0) -> None:
        super().__init__()
        if len(classes) < 2:
            raise ConfigError(f"a classifier needs at least 2 classes, got {classes}")
        if len({str(c) for c in classes}) != len(classes):
            raise ConfigError(f"a classifier's classes must be distinct, got {[str(c) for c in classes]}")
        if int(hidden) != hidden or hidden < 0:
            raise ConfigError(f"hidden: must be an integer >= 0, got {hidden!r}")
        self.inputs, self.encoder, self.classes, self.base = inputs, encoder, [str(c) for c in classes], base
        dim = encoder.embed_dim
        self.register_buffer("feature_mean", torch.zeros(dim))
        self.register_buffer("feature_std", torch.ones(dim))
        self.dropout = nn.Dropout(dropout)
        self.hidden_dim = int(hidden)
        self.hidden = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout)) if hidden else None
        self.head = nn.Linear(hidden or dim, len(self.classes))
        self.dropout_rate = float(dropout)
        self.info: dict[str, Any] = {}

    @classmethod
    def from_pretrained(cls, model: SSLModule, classes: list[str], dropout: float = 0.0,
                        hidden: int = 0) -> CellClassifier:
        base = {"recipe": model.config.to_dict(), "contract": model.inputs.contract.to_dict(),
                "source": getattr(model, "source", None)}
        return cls(model.inputs, model.encoder, classes, base, dropout, hidden)

    @classmethod
    def from_scratch(cls, cells: CellImages, classes: list[str], encoder: str = "plain_cnn",
                     encoder_options: dict[str, Any] | None = None, dropout: float = 0.0, hidden: int = 0,
                     stats_max_cells: int = 10000, seed: int = 0) -> CellClassifier:
        """A randomly initialised classifier for crops like ``cells`` (train it with
        :func:`~sslcell.classify.train_from_scratch`).

        The input contract standardises each channel with the mean and std of ``cells`` (at most
        ``stats_max_cells`` crops, sampled with ``seed``), as pretraining does; ``encoder`` / ``encoder_options``
        name an image encoder as a recipe's ``encoder.name`` / ``encoder.options`` do (e.g. ``"plain_cnn"``,
        ``{"widths": [32, 64, 128]}``). Weights are drawn from torch's global random state.
        """
        if not isinstance(cells, CellImages):
            raise InputError(f"from_scratch builds a classifier for image crops (CellImages); got "
                             f"{type(cells).__name__}")
        description = {"name": encoder, "options": dict(encoder_options or {})}
        contract = image_contract(cells, max_cells=stats_max_cells, seed=seed)
        inputs, net = _build_encoder(description, contract.to_dict())
        base = {"encoder": description, "contract": contract.to_dict(), "source": None}
        return cls(inputs, net, classes, base, dropout, hidden)

    def features(self, x: Tensor) -> Tensor:
        """Normalised input -> standardised embedding ``(N, D)``."""
        return self.standardize(self.encoder(x))

    def standardize(self, embedding: Tensor) -> Tensor:
        """Embedding ``(N, D)`` -> standardised with ``feature_mean`` / ``feature_std``, float32."""
        return (embedding.float() - self.feature_mean) / self.feature_std

    def head_output(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """Standardised embedding ``(N, D)`` -> (what the last linear layer reads, logits ``(N, K)``). The first is
        the embedding itself, or the hidden layer's output ``(N, hidden)``; supervised contrastive fine-tuning pulls
        it together by class."""
        h = features if self.hidden is None else self.hidden(self.dropout(features))
        return h, self.head(self.dropout(h))

    def forward(self, x: Tensor) -> Tensor:
        """Normalised input -> logits ``(N, K)``."""
        return self.head_output(self.features(x))[1]

    def tta_caveat(self) -> str | None:
        """Why test-time augmentation may lower this classifier's accuracy, or None: a linear or mlp head was
        fitted on each crop in one orientation (TTA helps only where the frozen encoder's features do not change
        with it), or fine-tuning drew no flips or 90-degree turns. None when ``info`` does not say how it was
        trained."""
        config = self.info.get("finetune") or {}
        if not config or self.inputs.modality != "image":
            return None
        if config.get("head") != "full":
            return (f"its {config.get('head')} head was fitted on each crop in one orientation: averaging over flips "
                    "and turns helps only where the frozen encoder's features do not change with orientation")
        augment = image_augment_config(config.get("augment") or {})  # the fields given over the defaults
        if not (augment.hflip or augment.vflip) or not augment.rot90:
            return "it was fine-tuned without flips and 90-degree turns, so other orientations are new to it"
        return None

    @torch.no_grad()
    def predict_proba(self, batch: Tensor, tta: bool = False, **normalize: Any) -> Tensor:
        """Raw batch ``(N, C, H, W)`` (or counts ``(N, G)``) -> class probabilities ``(N, K)`` float32 (eval mode);
        ``normalize`` goes to ``inputs.normalize`` (e.g. ``counts_are_log_normalized`` for expression).

        ``tta``: average the probabilities over the crop's lossless orientations (8 flips and 90-degree turns
        for square crops, 4 otherwise; :func:`~sslcell.augment.image.dihedral_views`); 8 (or 4) forward passes.
        It suits a classifier trained on those orientations (full fine-tuning does, by default). A linear probe
        sees only the crops as they are: where the embedding is not orientation-invariant, or the crops do have
        an orientation (imaging flow cytometry: the flow direction), TTA can make it worse.
        """
        was_training = self.training
        self.eval()
        try:
            device = next(self.parameters()).device
            x = self.inputs.normalize(batch.to(device), **normalize)
            if not tta:
                return self(x).float().softmax(dim=1)
            if self.inputs.modality != "image":
                raise InputError("tta: test-time augmentation applies to image crops only")
            views = dihedral_views(x)
            return sum(self(v).float().softmax(dim=1) for v in views) / len(views)
        finally:
            self.train(was_training)


def save_classifier(classifier: CellClassifier, directory: str | Path, *, info: dict[str, Any] | None = None,
                    overwrite: bool = False) -> Path:
    """Write the classifier's safetensors weights and JSON settings into ``directory`` (atomically each); a
    classifier already saved there is replaced only with ``overwrite=True``."""
    meta = {
        "format_version": FORMAT_VERSION,
        "kind": "classifier",
        "classes": classifier.classes,
        "dropout": classifier.dropout_rate,
        "hidden": classifier.hidden_dim,
        "base": classifier.base,
        "versions": versions(),
        "info": {**classifier.info, **(info or {})},
    }
    return write_weights(classifier, meta, directory, WEIGHTS, CONFIG, overwrite=overwrite,
                         header={"classes": json.dumps(classifier.classes)})  # the order the head's outputs follow


def load_classifier(directory: str | Path, *, map_location: str | torch.device = "cpu") -> CellClassifier:
    """Restore a classifier written by :func:`save_classifier`; weights from safetensors, settings from JSON."""
    directory = Path(directory)
    if not (directory / CONFIG).is_file():
        if not directory.exists():
            raise FileNotFoundError(f"{directory}: no such classifier directory")
        raise FileFormatError(
            f"{directory}: not an sslcell classifier (no {CONFIG}; was it made by `sslcell finetune`?)"
        )
    try:
        meta = json.loads((directory / CONFIG).read_text())
        if not isinstance(meta, dict) or meta.get("kind") != "classifier":
            kind = meta.get("kind") if isinstance(meta, dict) else type(meta).__name__
            raise FileFormatError(f"{directory / CONFIG}: kind {kind!r} is not an sslcell classifier")
        check_format(meta, directory / CONFIG)
        base = meta["base"]
        inputs, encoder = _build_encoder(base.get("encoder", base.get("recipe")), base["contract"])
        classifier = CellClassifier(inputs, encoder, meta["classes"], base, meta.get("dropout", 0.0),
                                    meta.get("hidden", 0))
    except (ValueError, KeyError, TypeError, AttributeError, ConfigError) as err:  # ValueError covers bad JSON
        raise FileFormatError(f"{directory / CONFIG}: not a valid classifier description ({err})") from None
    built = classifier.inputs.contract.to_dict()  # the JSON's statistics, as the input module holds them
    read_weights(classifier, directory / WEIGHTS, CONFIG, map_location, meta)
    check_statistics(classifier.inputs, built, directory / CONFIG)
    trained = weights_header(directory / WEIGHTS).get("classes")  # absent in classifiers saved before 0.2
    if trained is not None and json.loads(trained) != classifier.classes:
        raise FileFormatError(f"{directory / CONFIG}: classes {classifier.classes} are not those the weights were "
                              f"trained on, in their order ({json.loads(trained)}): each output of the head is one "
                              "class, so an edited list would relabel every prediction; restore the file")
    classifier.info = meta.get("info", {})
    classifier.source = str(directory)
    return classifier.eval()


def _build_encoder(description: dict[str, Any], contract: dict[str, Any]) -> tuple[Inputs, nn.Module]:
    """The input module and an untrained encoder: ``description`` is a pretraining recipe, or (a classifier from
    scratch) an image encoder's ``{"name", "options"}``."""
    if "modality" in description:
        recipe = RecipeConfig.from_dict(description)
    else:
        recipe = RecipeConfig.from_dict({"modality": "image", "encoder": description})
    inputs = build_inputs(recipe, contract)
    return inputs, build_encoder(recipe, inputs)
