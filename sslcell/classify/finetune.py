"""Train a :class:`CellClassifier` on labelled cells, crops or expression: three heads, one API.

* ``head="linear"``: the encoder is frozen; the cells are embedded once, the features standardised, and a
  multinomial logistic regression (scikit-learn, lbfgs) is fitted, with balanced class weights when
  ``oversample`` is on. Its coefficients become the classifier's linear layer.
* ``head="mlp"``: the encoder is frozen; a hidden layer (``hidden_dim``, GELU, dropout) and a linear layer are
  trained on the cached, standardised embeddings (:mod:`sslcell.classify.head`).
* ``head="full"``: encoder and a dropout + linear head are trained together with AdamW (the head at ``lr``,
  the encoder at ``lr * encoder_lr_factor``), warm-up and cosine decay (``schedule="one_cycle"``: torch's
  one-cycle to each group's rate instead), minority classes oversampled so every class is drawn equally often
  (``oversample=0.5``: square-root sampling, in between; ``balance="loss"``: natural draws and a cross-entropy
  weighted by the balanced class weights to that power instead); crops are augmented, counts are not. By default
  (``init_head="linear_probe"``) the head starts from the linear probe's solution on standardised features
  ("LP-FT", Kumar et al. 2022): a random head would first push large, noisy gradients through the pretrained
  encoder. The probe is fitted after the encoder's batch-norm statistics are re-estimated on the training cells,
  so that it sees the features training starts from. After training, the encoder's batch-norm statistics are
  re-estimated on un-augmented training cells drawn as training drew them ("precise BN"), so eval mode matches the
  final weights. A ViT encoder can be fine-tuned as MAE is (He et al. 2022): ``layer_decay < 1`` lowers each
  layer's rate by that factor per layer below the top, and ``drop_path`` sets its stochastic depth while training.
  ``mixup`` / ``cutmix`` blend each batch of crops with a shuffled copy of itself, labels alike (torchvision's
  MixUp / CutMix, MAE's fine-tuning regularisers).

:func:`train_from_scratch` runs the same full loop on a randomly initialised encoder (any image encoder, by
default the plain CNN), with :data:`SCRATCH_RECIPE` by default: issue 14's supervised baseline (one-cycle to 3e-3,
class-weighted cross-entropy, AdamW weight decay 0.01, 30 epochs). A pretrained encoder can be fine-tuned with the
same recipe by giving ``finetune`` those settings.

Options for ``mlp`` and ``full``: ``min_steps`` raises the epochs so that training makes at least that many optimiser
steps (with few labels an epoch is one or two batches; the last partial batch is dropped); ``classifier.info``
records the epochs run. ``supcon_weight > 0`` adds a supervised contrastive loss (pytorch-metric-learning's
``SupConLoss`` with a ``MultiSimilarityMiner``; :mod:`sslcell.classify.objectives`); ``val_fraction > 0`` holds out a
stratified share of the labelled cells, scores macro-F1 on them after every epoch, keeps the best epoch's weights
and stops after ``patience`` epochs without improvement. With the linear head the held-out cells are only scored.

Defaults, chosen on a validation split inside the Jurkat benchmark's training part (never its test split; see
``benchmarks/results/images_jurkat_validation.md``): the augmentation is label-preserving geometry only (flips and
90-degree turns). Rescaling and intensity jitter change cues a label can depend on (cell size tells G1 from G2;
darkfield intensity, granularity) and made fine-tuning worse than the linear probe it starts from. The LSM
study's rates (head 5e-4, backbone at 1%) suit a large ImageNet-pretrained ResNet-50; a small encoder pretrained
on the user's own crops needs to move more (head 2e-3, encoder at a quarter of that).
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from sslcell.classify.classifier import CellClassifier
from sslcell.classify.head import fit_mlp_head
from sslcell.classify.objectives import EarlyStopping
from sslcell.classify.training import calibrate_before_training, fit_full, training_epochs
from sslcell.config import check_types, from_dict
from sslcell.data.expression import CountRows, open_counts
from sslcell.data.images import CellImages
from sslcell.data.labels import class_labels
from sslcell.errors import ConfigError, InputError, SSLCellWarning
from sslcell.evaluate.probes import class_weight, logistic_probe
from sslcell.evaluate.protocols import label_fraction_split
from sslcell.inference import embed_rows
from sslcell.methods import SSLModule
from sslcell.methods.inputs import image_augment_config

log = logging.getLogger(__name__)


# ImageAugmentConfig fields for fine-tuning: the 8 lossless orientations (flips, 90-degree turns), nothing else
LABEL_PRESERVING_AUGMENT: dict[str, Any] = {
    "scale": [1.0, 1.0], "ratio": [1.0, 1.0], "rotation_degrees": 0.0, "brightness": 0.0, "contrast": 0.0,
    "gamma": 0.0, "blur_p": 0.0, "noise_p": 0.0,
}


HEADS = ("linear", "mlp", "full")
INIT_HEADS = ("linear_probe", "random")  # full: the head starts from the linear probe (LP-FT) or random weights
SCHEDULES = ("cosine", "one_cycle")
BALANCES = ("sampling", "loss")

# FinetuneConfig fields of issue 14's supervised baseline, trained from scratch (train_from_scratch's default):
# one-cycle to 3e-3 for 30 epochs, class-weighted cross-entropy, AdamW weight decay 0.01; head and encoder at lr
SCRATCH_RECIPE: dict[str, Any] = {
    "epochs": 30, "lr": 3e-3, "schedule": "one_cycle", "balance": "loss", "oversample": 1.0, "weight_decay": 0.01,
    "init_head": "random", "encoder_lr_factor": 1.0,
}


@dataclass
class FinetuneConfig:
    """Settings of :func:`finetune` (YAML: ``sslcell finetune --config``)."""

    head: str = "full"  # "linear": probe on frozen embeddings; "mlp": MLP on frozen embeddings; "full": fine-tune
    epochs: int = 30
    batch_size: int = 128
    lr: float = 2e-3  # head learning rate
    # full: encoder learning rate = lr * this (0: frozen encoder); linear / mlp heads leave the encoder frozen
    encoder_lr_factor: float = 0.25
    # full, ViT encoders: layer-wise learning-rate decay (MAE's fine-tuning), layer l of L (0: the patch embedding,
    # L: the final norm) at lr * encoder_lr_factor * layer_decay ** (L - l); 1: every layer alike
    layer_decay: float = 1.0
    drop_path: float | None = None  # full, ViT encoders: stochastic depth while fine-tuning; None: the encoder's own
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.05  # schedule "cosine": share of the steps in linear warm-up
    schedule: str = "cosine"  # full: "cosine" (warm-up + cosine decay) or "one_cycle" (torch's OneCycleLR)
    min_steps: int = 0  # mlp / full: raise the epochs so that training makes at least this many optimiser steps
    dropout: float = 0.2
    hidden_dim: int = 256  # mlp: width of the hidden layer
    val_fraction: float = 0.0  # share of labelled cells held out (stratified) to score every epoch; 0: none
    patience: int = 5  # with val_fraction: stop after this many epochs without a better validation macro-F1
    supcon_weight: float = 0.0  # mlp / full: weight of the supervised contrastive loss added to cross-entropy
    supcon_temperature: float = 0.1
    # class balancing, a cell of class k weighted by count_k ** -power: True (power 1) draws every class equally
    # often (full, balance "sampling"), weights the loss by the balanced class weights n / (K count_k) (full,
    # balance "loss") or balances the class weights (linear); a number in [0, 1] is the power (0.5: "square-root
    # sampling", between the natural mix and equal classes); False (0) keeps the natural mix
    oversample: bool | float = True
    balance: str = "sampling"  # full: balance by weighted draws ("sampling") or class-weighted cross-entropy ("loss")
    init_head: str = "linear_probe"  # full: start from the linear probe ("linear_probe") or a random head ("random")
    label_smoothing: float = 0.0
    # full, crops: MixUp (Zhang et al. 2018) and CutMix (Yun et al. 2019), torchvision's, as in MAE's fine-tuning:
    # each batch is blended with a shuffled copy of itself, pixels and labels alike, at a Beta(alpha, alpha) share;
    # the numbers are the alphas (0: off; with both on, each batch gets one of the two at random). Where a label is
    # read from a cell's size or brightness they can hurt: on Jurkat's cell-cycle phases they did (README)
    mixup: float = 0.0
    cutmix: float = 0.0
    C: float = 1.0  # linear: inverse L2 strength of the logistic regression
    max_iter: int = 2000  # linear: lbfgs iterations
    seed: int = 0
    accelerator: str = "auto"
    precision: str = "auto"  # "auto": bf16-mixed on GPU, 32-true on CPU
    progress_bar: bool = True
    augment: dict[str, Any] = field(default_factory=dict)  # full: ImageAugmentConfig fields over the defaults above

    def __post_init__(self) -> None:
        check_types(self)  # FinetuneConfig(epochs="3") in Python: a ConfigError naming the field, as YAML gets
        if self.head not in HEADS:
            raise ConfigError(f"head: must be one of {HEADS}, got {self.head!r}")
        if self.init_head not in INIT_HEADS:
            raise ConfigError(f"init_head: must be 'linear_probe' or 'random', got {self.init_head!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule: must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.balance not in BALANCES:
            raise ConfigError(f"balance: must be one of {BALANCES}, got {self.balance!r}")
        if self.head == "mlp" and self.schedule != "cosine":
            raise ConfigError("schedule: the mlp head trains with warm-up + cosine; 'one_cycle' is for head 'full'")
        if self.head == "mlp" and self.balance != "sampling":
            raise ConfigError("balance: the mlp head balances classes by sampling; 'loss' is for head 'full' (the "
                              "linear probe balances with class weights either way)")
        for name in ("epochs", "batch_size", "max_iter", "hidden_dim", "patience"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if isinstance(self.min_steps, bool) or not isinstance(self.min_steps, int) or self.min_steps < 0:
            raise ConfigError(f"min_steps: must be an integer >= 0, got {self.min_steps!r}")
        if self.lr <= 0 or self.C <= 0 or self.encoder_lr_factor < 0:
            raise ConfigError("lr and C must be > 0 and encoder_lr_factor >= 0")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction: must be in [0, 1), got {self.val_fraction}")
        if self.supcon_weight < 0 or self.supcon_temperature <= 0:
            raise ConfigError("supcon_weight must be >= 0 and supcon_temperature > 0")
        if self.supcon_weight > 0 and self.head == "linear":
            raise ConfigError("supcon_weight: the supervised contrastive loss trains an mlp or full head, not the "
                              "linear probe")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout: must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.warmup_fraction < 1.0 or not 0.0 <= self.label_smoothing < 1.0 or self.weight_decay < 0:
            raise ConfigError("warmup_fraction and label_smoothing must be in [0, 1), weight_decay >= 0")
        if self.mixup < 0 or self.cutmix < 0:
            raise ConfigError(f"mixup and cutmix: Beta alphas >= 0 (0: off), got {self.mixup} and {self.cutmix}")
        if (self.mixup or self.cutmix) and (self.head != "full" or self.supcon_weight > 0):
            raise ConfigError("mixup and cutmix: they blend crops while fine-tuning (head 'full') and give soft "
                              "labels, which the supervised contrastive loss cannot use; set supcon_weight to 0")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ConfigError(f"layer_decay: must be in (0, 1], got {self.layer_decay}")
        if self.drop_path is not None and not 0.0 <= self.drop_path < 1.0:
            raise ConfigError(f"drop_path: must be in [0, 1) or null, got {self.drop_path}")
        given = [name for name, on in (("layer_decay", self.layer_decay != 1.0),
                                       ("drop_path", self.drop_path is not None)) if on]
        if self.head != "full" and given:
            raise ConfigError(f"{' and '.join(given)}: shape(s) the encoder's training, which head {self.head!r} "
                              "leaves frozen; use head 'full'")
        if not isinstance(self.oversample, (bool, int, float)) or not 0.0 <= float(self.oversample) <= 1.0:
            raise ConfigError(f"oversample: must be true, false or a power in [0, 1], got {self.oversample!r}")
        if not isinstance(self.augment, dict):
            raise ConfigError(f"augment: a mapping of image augmentation fields; got {self.augment!r}")
        if self.augment.get("output_size") is not None:  # prediction reads crops at their own size
            raise ConfigError(f"augment.output_size: {self.augment['output_size']!r}: fine-tuning trains on views "
                              "of the crops' own size, as the classifier predicts on them (views of another size "
                              "would show it cells at another scale than at prediction); remove it")
        self.augment = {**LABEL_PRESERVING_AUGMENT, **self.augment}
        image_augment_config(self.augment)  # raises ConfigError naming the bad augment field

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FinetuneConfig:
        return from_dict(cls, values, "finetune")


def finetune(
    data: CellImages | AnnData,
    model: SSLModule,
    label_key: str | np.ndarray = "label",
    config: FinetuneConfig | None = None,
    *,
    channels: Any = None,
    layer: str | None = None,
    max_missing_genes: float | None = None,
    val_group_key: str | np.ndarray | None = None,
    device: str | torch.device | None = None,
    counts_are_log_normalized: bool | None = None,
) -> CellClassifier:
    """Train a classifier on labelled cells; the pretrained ``model`` is left unchanged.

    Args:
        data: image models: labelled crops (:class:`CellImages`; the model's channels are selected by name, or by
            ``channels``). Expression models: an AnnData of counts (``X`` or ``layer``; backed or in memory), aligned
            to the model's genes by name; the labelled cells' counts are read into memory.
        model: a pretrained model (``sslcell.load``).
        label_key: an ``obs`` column name, or an array ``(N,)`` of labels. Cells with a missing label are skipped.
        config: :class:`FinetuneConfig` (default: full fine-tuning).
        max_missing_genes: expression only: the largest share of the model's genes that may be missing from
            ``data`` (default 0.5, as ``tl.embed`` and ``tl.predict``; 1 accepts any overlap).
        counts_are_log_normalized: expression only: ``data`` holds log1p-normalised values (default: as the model
            was trained); for a model of raw counts they are taken back to per-cell shares, as ``tl.embed`` does.
        val_group_key: with ``config.val_fraction``: an ``obs`` column (or an array ``(N,)``) of groups, e.g. the
            image, plate or donor; the validation cells are then whole groups, so cells of one image are never on
            both sides (see :func:`_validation_mask`).

    Returns:
        The trained :class:`CellClassifier` (save it with ``save_classifier``).
    """
    if isinstance(data, SSLModule):  # the pre-0.2 order finetune(model, cells, labels, config), kept for one release
        warnings.warn("finetune(model, cells, ...) is deprecated; call finetune(cells, model, label_key=...)",
                      DeprecationWarning, stacklevel=2)
        data, model = model, data
    config = config or FinetuneConfig()
    if not isinstance(model, SSLModule):
        raise InputError(f"model must be a pretrained sslcell model (sslcell.load); got {type(model).__name__}")
    if model.inputs.modality == "image":
        if not isinstance(data, CellImages):
            raise InputError(f"this model reads image crops (CellImages); got {type(data).__name__}")
        for name, value in (("layer", layer), ("max_missing_genes", max_missing_genes),
                            ("counts_are_log_normalized", counts_are_log_normalized)):
            if value is not None:
                raise InputError(f"{name}: not applicable to image crops; remove the argument")
        data = model.inputs.align(data, channels)
    else:
        if not isinstance(data, AnnData):
            raise InputError(f"this model reads expression counts (an AnnData); got {type(data).__name__}")
        if channels is not None:
            raise InputError("channels: not applicable to expression data; remove the argument")
        if config.mixup or config.cutmix:
            raise ConfigError("mixup and cutmix: they blend crops; expression cells are not augmented, set them to 0")
    classes, codes, rows = _label_codes(data, label_key)
    groups = _val_groups(data, val_group_key, rows, config)
    cells = _labelled(data, rows, layer, model, max_missing_genes, counts_are_log_normalized)  # crops, or counts
    model = copy.deepcopy(model).cpu()

    def build(train_rows: np.ndarray) -> CellClassifier:
        dropout = 0.0 if config.head == "linear" else config.dropout
        return CellClassifier.from_pretrained(model, classes, dropout, config.hidden_dim if config.head == "mlp" else 0)

    return _train(build, cells, codes, config, _describe(data), groups,
                  embed=lambda part: embed_rows(model, part, device=device))  # (N, D): frozen encoder, as is


def train_from_scratch(
    data: CellImages,
    label_key: str | np.ndarray = "label",
    config: FinetuneConfig | None = None,
    *,
    encoder: str = "plain_cnn",
    encoder_options: dict[str, Any] | None = None,
    channels: Any = None,
    val_group_key: str | np.ndarray | None = None,
) -> CellClassifier:
    """Train a randomly initialised crop classifier (:meth:`CellClassifier.from_scratch`) with the full fine-tuning
    loop: the supervised baseline of a pretrained encoder, trained the same way.

    Args:
        data: labelled crops; ``channels`` (indices or names) selects some. Each channel is standardised with the
            training crops' mean and std.
        label_key: an ``obs`` column name, or labels ``(N,)`` (a ``pd.Categorical`` keeps its categories: classes
            without crops are outputs that are never predicted). Crops with a missing label are skipped.
        config: :class:`FinetuneConfig` with ``head="full"``, ``init_head="random"`` and ``encoder_lr_factor > 0``;
            default ``FinetuneConfig(**SCRATCH_RECIPE)``, issue 14's supervised baseline.
        encoder, encoder_options: an image encoder by name and its options, as in a recipe's ``encoder``.
        val_group_key: with ``config.val_fraction``, validation by whole groups, as in :func:`finetune`.

    Returns:
        The trained :class:`CellClassifier`, on the CPU, in eval mode (save it with ``save_classifier``).
    """
    config = config or FinetuneConfig(**SCRATCH_RECIPE)
    if config.head != "full":
        raise ConfigError(f"head: a classifier from scratch trains its encoder; use 'full', got {config.head!r}")
    if config.init_head != "random":
        raise ConfigError("init_head: a classifier from scratch has no pretrained features to probe; set "
                          "init_head: random (SCRATCH_RECIPE does)")
    if config.encoder_lr_factor <= 0:
        raise ConfigError("encoder_lr_factor: 0 would freeze a random encoder; use 1 (SCRATCH_RECIPE does)")
    if not isinstance(data, CellImages):
        raise InputError(f"train_from_scratch trains on image crops (CellImages); got {type(data).__name__}")
    if channels is not None:
        data = data.select_channels(channels)
    classes, codes, rows = _label_codes(data, label_key)
    groups = _val_groups(data, val_group_key, rows, config)
    cells = _labelled(data, rows, None, None)

    def build(train_rows: np.ndarray) -> CellClassifier:
        return CellClassifier.from_scratch(cells[train_rows], classes, encoder, encoder_options,
                                           dropout=config.dropout, seed=config.seed)

    return _train(build, cells, codes, config, _describe(data), groups)


def _label_codes(data: CellImages | AnnData, label_key: str | np.ndarray) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``(classes, codes (n,), rows (n,))`` of the labelled cells of ``data``: their classes as indices into
    ``classes`` (the label categories, those without cells included) and their positions; refused unless at least
    2 classes have cells."""
    y = _labels(data, label_key)
    keep = ~y.isna().to_numpy()
    y = y[keep]
    classes = [str(c) for c in y.cat.categories]
    codes = y.cat.codes.to_numpy().astype(np.int64)
    present = np.bincount(codes, minlength=len(classes))
    absent = [c for c, n in zip(classes, present, strict=True) if n == 0]
    if len(classes) - len(absent) < 2:
        counts = dict(zip(classes, present.tolist(), strict=True))
        raise InputError(f"need labelled cells of at least 2 classes; got counts {counts}")
    if absent:
        log.info("classes without training cells (kept as outputs, never predicted): %s", absent)
    return classes, codes, np.flatnonzero(keep)


def _train(build: Callable[[np.ndarray], CellClassifier], cells: Any, codes: np.ndarray, config: FinetuneConfig,
           described: str, groups: np.ndarray | None = None,
           embed: Callable[[Any], np.ndarray] | None = None) -> CellClassifier:
    """Hold out the validation cells (whole ``groups (N,)`` when given), build the classifier (``build(training
    rows)``, under ``config.seed``) and train its head (on embeddings ``embed(cells) (N, D)``) or the whole
    network; a class without training cells is never predicted. Returns it in eval mode with ``info`` filled in."""
    val = _validation_mask(codes, config.val_fraction, config.seed, groups)
    train_codes = codes[~val]
    train_rows, val_rows = np.flatnonzero(~val), np.flatnonzero(val)
    with torch.random.fork_rng(devices=[]):  # seeded by config.seed; the caller's global random state is kept
        torch.manual_seed(config.seed)
        classifier = build(train_rows)
        present = np.bincount(train_codes, minlength=len(classifier.classes))
        _hide_absent(classifier, present)
        stopper = EarlyStopping(codes[val], config.patience) if val.any() else None
        run: dict[str, int] = {}
        x = None
        if config.head != "full" or config.init_head == "linear_probe":
            if config.head == "full":  # the probe must see the features training will start from
                calibrate_before_training(classifier, cells[train_rows], train_codes, config)
            x = embed(cells)
        if config.head == "linear" or (config.head == "full" and config.init_head == "linear_probe"):
            _fit_linear(classifier, x[~val], train_codes, config)
            _hide_absent(classifier, present)  # the probe leaves them at logit 0: validation must not pick them
        if config.head == "mlp":
            run["epochs"] = training_epochs(len(train_codes), config)[0]
            fit_mlp_head(classifier, x[~val], train_codes, replace(config, epochs=run["epochs"]),
                         (x[val], stopper) if stopper else None)
        if config.head == "full":
            run = fit_full(classifier, cells[train_rows], train_codes, config,
                           (cells[val_rows], stopper) if stopper else None)
        elif config.head == "linear" and stopper is not None:
            stopper.update(0, _fit_linear_predict(classifier, x[val]), classifier)
    _hide_absent(classifier, present)
    classifier.info = {
        "finetune": asdict(config),
        **run,
        "n_train": int(len(train_codes)),
        "train_class_counts": dict(zip(classifier.classes, present.tolist(), strict=True)),
        "data": described,
    }
    if stopper is not None:
        classifier.info["validation"] = {"n_cells": int(val.sum()), **stopper.summary()}
        if groups is not None:
            classifier.info["validation"]["n_groups"] = int(len(np.unique(groups[val])))
    return classifier.cpu().eval()  # embedding moved the shared encoder to the device: all of it on the CPU


def _labelled(data: CellImages | AnnData, rows: np.ndarray, layer: str | None, model: SSLModule | None,
              max_missing_genes: float | None = None, log_normalized: bool | None = None) -> Any:
    """The labelled cells, in order: aligned crops, or the AnnData's counts over the model's genes read into memory
    (:class:`CountRows`; a backed file is read chunk-wise) as the model reads them by default
    (:meth:`~sslcell.methods.inputs.ExpressionInputs.as_trained`: raw counts for a model of log-normalised values,
    or log values (``log_normalized``) for a model of raw counts, are converted), so that training, batch-norm
    re-estimation and validation read them as ``tl.embed`` reads ``data``."""
    if isinstance(data, CellImages):
        return data if len(rows) == len(data) else data[rows]
    log_normalized = model.inputs.counts_are_log_normalized if log_normalized is None else log_normalized
    dataset = open_counts(data, model.inputs.genes, layer=layer, max_missing_genes=max_missing_genes,
                          counts_are_log_normalized=log_normalized)
    try:
        cells = CountRows.read(dataset, rows)
    finally:
        dataset.close()
    if log_normalized == model.inputs.counts_are_log_normalized:
        return cells
    return cells.map_rows(lambda block: model.inputs.as_trained(torch.from_numpy(block), log_normalized).numpy())


def _validation_mask(codes: np.ndarray, fraction: float, seed: int, groups: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask ``(N,)`` of held-out cells: a stratified ``fraction`` of every class, at least one and at most
    ``c - 1`` of its ``c`` cells (:func:`~sslcell.evaluate.protocols.label_fraction_split` with ``keep_one``).

    With ``groups (N,)``: whole groups, one fold of scikit-learn's ``StratifiedGroupKFold`` with
    ``round(1 / fraction)`` folds (at most one per group), the folds balanced by class as far as the groups allow:
    about ``fraction`` of the cells (a warning where it is more than twice that). A class whose cells all fall in
    the held-out groups would get no training cells: refused."""
    val = np.zeros(len(codes), dtype=bool)
    if fraction <= 0:
        return val
    if groups is None:
        val[label_fraction_split(codes, fraction, seed, keep_one=True)] = True
        return val
    from sklearn.model_selection import StratifiedGroupKFold

    n_groups = len(np.unique(groups))
    if n_groups < 2:
        raise InputError(f"val_group_key: the labelled cells come from {n_groups} group; whole-group validation "
                         "needs at least 2")
    folds = StratifiedGroupKFold(n_splits=min(max(2, round(1 / fraction)), n_groups), shuffle=True,
                                 random_state=seed)
    with warnings.catch_warnings():  # "the least populated class has only k members": expected with few labels
        warnings.simplefilter("ignore", UserWarning)
        _, held_out = next(folds.split(np.zeros(len(codes)), codes, groups))
    val[held_out] = True
    lost = sorted(set(np.unique(codes[val]).tolist()) - set(np.unique(codes[~val]).tolist()))
    if lost:
        raise InputError(f"val_group_key: every labelled cell of class index(es) {lost} falls in the held-out "
                         "groups, so those classes would get no training cells; give more groups (or that class "
                         "in more of them), or drop val_group_key")
    if val.mean() > 2 * fraction:
        warnings.warn(f"val_group_key: the held-out groups hold {val.mean():.0%} of the labelled cells "
                      f"(val_fraction {fraction}): {n_groups} groups of uneven size cannot be split finer",
                      SSLCellWarning, stacklevel=4)
    return val


def _val_groups(data: CellImages | AnnData, key: str | np.ndarray | None, rows: np.ndarray,
                config: FinetuneConfig) -> np.ndarray | None:
    """The groups ``(n,)`` of the labelled ``rows`` for whole-group validation, or None without ``key``."""
    if key is None:
        return None
    if config.val_fraction <= 0:
        raise ConfigError("val_group_key: sets how validation cells are held out; give val_fraction > 0 too")
    values = _per_cell(data, key, "val_group_key").to_numpy()[rows]
    missing = pd.isna(values)
    if missing.any():
        raise InputError(f"{_describe(data)}: val_group_key has no group for {int(missing.sum())} labelled "
                         f"cell(s), e.g. row {int(rows[np.flatnonzero(missing)[0]])}; give every labelled cell a group")
    return pd.factorize(values)[0]


def _describe(data: CellImages | AnnData) -> str:
    if isinstance(data, CellImages):
        return str(data.source)
    return str(data.filename) if data.isbacked else f"<AnnData {data.n_obs} x {data.n_vars}>"


def _per_cell(data: CellImages | AnnData, values: Any, what: str) -> pd.Series:
    """``values``, an obs column's name or one value per cell ``(N,)``, as a Series on ``data.obs``'s index; ``what``
    names the argument in errors."""
    if isinstance(values, str):
        if values not in data.obs.columns:
            raise InputError(f"{_describe(data)}: no obs column {values!r} for {what}; columns are "
                             f"{list(data.obs.columns)}")
        return data.obs[values]
    if isinstance(values, pd.Series):  # matched to the cells by its index, as pandas aligns
        if not values.index.equals(data.obs.index):
            if values.index.has_duplicates or set(values.index) != set(data.obs.index):
                raise InputError(f"{what}: a Series is matched to the cells by its index, which is not the cells' "
                                 "(obs names); pass .to_numpy() for values in row order")
            values = values.reindex(data.obs.index)
        values = values.array  # a categorical keeps its categories
    if not isinstance(values, pd.Categorical):
        values = np.asarray(values)
    n = len(data.obs)
    if values.shape != (n,):
        raise InputError(f"{what} has shape {values.shape} for {n} cells; expected ({n},)")
    return pd.Series(values, index=data.obs.index)


def _labels(data: CellImages | AnnData, labels: Any) -> pd.Series:
    name = f"obs column {labels!r}" if isinstance(labels, str) else "labels"
    return class_labels(_per_cell(data, labels, "labels"), f"{_describe(data)}: {name}")


def _hide_absent(classifier: CellClassifier, present: np.ndarray) -> None:
    """A class without training cells (``present (K,)`` counts) is never predicted: its logit bias is -1e4, set
    before any validation scoring or training (its softmax gradient is then ~0, so training leaves it there; with
    label smoothing the logged loss carries a constant for its smoothed share) and again at the end."""
    with torch.no_grad():
        classifier.head.bias[torch.from_numpy(present == 0)] = -1e4


def _fit_linear(classifier: CellClassifier, x: np.ndarray, codes: np.ndarray, config: FinetuneConfig) -> None:
    """Fit the logistic probe (:func:`~sslcell.evaluate.probes.logistic_probe`) on embeddings ``x (N, D)`` of the
    training cells, classes ``codes (N,)``; its scaler and coefficients become ``classifier``'s linear layer."""
    probe = logistic_probe(C=config.C, max_iter=config.max_iter, class_weight=class_weight(codes, config.oversample))
    probe.fit(x, codes)
    scaler, logistic = probe[0], probe[-1]
    mean, std = scaler.mean_.astype(np.float32), scaler.scale_.astype(np.float32)
    weight = np.zeros((len(classifier.classes), x.shape[1]), dtype=np.float32)
    bias = np.zeros(len(classifier.classes), dtype=np.float32)
    fitted = logistic.classes_
    if len(fitted) == 2:  # sklearn keeps one row for a binary problem: logit of class 1 vs class 0
        weight[fitted[1]], bias[fitted[1]] = logistic.coef_[0], logistic.intercept_[0]
    else:
        weight[fitted], bias[fitted] = logistic.coef_, logistic.intercept_
    with torch.no_grad():
        classifier.cpu()
        classifier.feature_mean.copy_(torch.from_numpy(mean))
        classifier.feature_std.copy_(torch.from_numpy(std))
        classifier.head.weight.copy_(torch.from_numpy(weight))
        classifier.head.bias.copy_(torch.from_numpy(bias))


def _fit_linear_predict(classifier: CellClassifier, x: np.ndarray) -> np.ndarray:
    """Classes ``(N,)`` the fitted linear head predicts for embeddings ``x (N, D)``."""
    with torch.no_grad():
        return classifier.eval().head_output(classifier.standardize(torch.from_numpy(x)))[1].argmax(1).numpy()
