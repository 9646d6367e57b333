"""Train a :class:`CellClassifier` on labelled crops: a linear probe or full fine-tuning.

* ``head="linear"``: the encoder is frozen; the crops are embedded once, the features standardised, and a
  multinomial logistic regression (scikit-learn, lbfgs) is fitted, with balanced class weights when
  ``oversample`` is on. Its coefficients become the classifier's linear layer.
* ``head="full"``: encoder and a dropout + linear head are trained together with AdamW (the head at ``lr``,
  the encoder at ``lr * encoder_lr_factor``), warm-up and cosine decay, augmented crops, and minority classes
  oversampled so every class is drawn equally often (``oversample=0.5``: square-root sampling, in between). By
  default (``init_head="linear_probe"``) the head starts from the linear probe's solution on standardised
  features ("LP-FT", Kumar et al. 2022): a random head would first push large, noisy gradients through the
  pretrained encoder. After training, the encoder's batch-norm
  statistics are re-estimated on un-augmented training crops drawn as training drew them ("precise BN"), so
  eval mode matches the final weights even after a short run.

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
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from torch import Tensor

from sslcell.augment.image import ImageAugment
from sslcell.classify.classifier import CellClassifier
from sslcell.config import from_dict
from sslcell.data.image_loader import make_image_dataloader
from sslcell.data.images import CellImages
from sslcell.errors import ConfigError, InputError
from sslcell.methods import SSLModule
from sslcell.methods.base import warmup_cosine
from sslcell.methods.inputs import image_augment_config

log = logging.getLogger(__name__)


# ImageAugmentConfig fields for fine-tuning: the 8 lossless orientations (flips, 90-degree turns), nothing else
LABEL_PRESERVING_AUGMENT: dict[str, Any] = {
    "scale": [1.0, 1.0], "ratio": [1.0, 1.0], "rotation_degrees": 0.0, "brightness": 0.0, "contrast": 0.0,
    "gamma": 0.0, "blur_p": 0.0, "noise_p": 0.0,
}


@dataclass
class FinetuneConfig:
    """Settings of :func:`finetune` (YAML: ``sslcell finetune --config``)."""

    head: str = "full"  # "linear": probe on frozen embeddings; "full": fine-tune encoder + head
    epochs: int = 30
    batch_size: int = 128
    lr: float = 2e-3  # head learning rate
    encoder_lr_factor: float = 0.25  # encoder learning rate = lr * this (0: frozen encoder)
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.05
    dropout: float = 0.2
    # class balancing, a cell of class k weighted by count_k ** -power: True (power 1) draws every class equally
    # often (full) or balances the class weights (linear); a number in [0, 1] is the power (0.5: "square-root
    # sampling", between the natural mix and equal classes); False (0) keeps the natural mix
    oversample: bool | float = True
    init_head: str = "linear_probe"  # full: start from the linear probe ("linear_probe") or a random head ("random")
    label_smoothing: float = 0.0
    C: float = 1.0  # linear: inverse L2 strength of the logistic regression
    max_iter: int = 2000  # linear: lbfgs iterations
    seed: int = 0
    accelerator: str = "auto"
    precision: str = "auto"  # "auto": bf16-mixed on GPU, 32-true on CPU
    progress_bar: bool = True
    augment: dict[str, Any] = field(default_factory=dict)  # full: ImageAugmentConfig fields over the defaults above

    def __post_init__(self) -> None:
        if self.head not in ("linear", "full"):
            raise ConfigError(f"head: must be 'linear' or 'full', got {self.head!r}")
        if self.init_head not in ("linear_probe", "random"):
            raise ConfigError(f"init_head: must be 'linear_probe' or 'random', got {self.init_head!r}")
        for name in ("epochs", "batch_size", "max_iter"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.C <= 0 or self.encoder_lr_factor < 0:
            raise ConfigError("lr and C must be > 0 and encoder_lr_factor >= 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout: must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.warmup_fraction < 1.0 or not 0.0 <= self.label_smoothing < 1.0 or self.weight_decay < 0:
            raise ConfigError("warmup_fraction and label_smoothing must be in [0, 1), weight_decay >= 0")
        if not isinstance(self.oversample, (bool, int, float)) or not 0.0 <= float(self.oversample) <= 1.0:
            raise ConfigError(f"oversample: must be true, false or a power in [0, 1], got {self.oversample!r}")
        self.augment = {**LABEL_PRESERVING_AUGMENT, **self.augment}
        image_augment_config(self.augment)  # raises ConfigError naming the bad augment field

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FinetuneConfig:
        return from_dict(cls, values, "finetune")


def finetune(
    model: SSLModule,
    cells: CellImages,
    labels: Any = "label",
    config: FinetuneConfig | None = None,
    *,
    channels: Any = None,
    device: str | torch.device | None = None,
) -> CellClassifier:
    """Train a classifier on ``cells`` with ``labels``; the pretrained ``model`` is left unchanged.

    Args:
        model: a pretrained image model (``sslcell.load``).
        cells: labelled crops; the model's channels are selected by name (or ``channels``).
        labels: an ``obs`` column name, or an array ``(N,)`` of labels. Cells with a missing label are skipped.
        config: :class:`FinetuneConfig` (default: full fine-tuning).

    Returns:
        The trained :class:`CellClassifier` (save it with ``save_classifier``).
    """
    config = config or FinetuneConfig()
    if model.inputs.modality != "image":
        raise InputError(f"finetune reads image crops; this model reads {model.inputs.modality} data")
    cells = model.inputs.align(cells, channels)
    y = _labels(cells, labels)
    keep = ~y.isna()
    if not keep.all():
        cells, y = cells[np.flatnonzero(keep.to_numpy())], y[keep.to_numpy()]
    classes = [str(c) for c in y.cat.categories]
    codes = y.cat.codes.to_numpy().astype(np.int64)
    present = np.bincount(codes, minlength=len(classes))
    absent = [c for c, n in zip(classes, present) if n == 0]
    if len(classes) - len(absent) < 2:
        raise InputError(f"need labelled cells of at least 2 classes; got counts {dict(zip(classes, present.tolist()))}")
    if absent:
        log.info("classes without training cells (kept as outputs, never predicted): %s", absent)
    model = copy.deepcopy(model).cpu()
    with torch.random.fork_rng(devices=[]):  # seeded by config.seed; the caller's global random state is kept
        torch.manual_seed(config.seed)
        classifier = CellClassifier.from_pretrained(
            model, classes, dropout=config.dropout if config.head == "full" else 0.0
        )
        if config.head == "linear" or config.init_head == "linear_probe":
            _fit_linear(classifier, model, cells, codes, config, device)
        if config.head == "full":
            _fit_full(classifier, cells, codes, config)
    with torch.no_grad():  # a class without training cells is never predicted
        classifier.head.bias[torch.from_numpy(present == 0)] = -1e4
    classifier.info = {
        "finetune": asdict(config),
        "n_train": int(len(codes)),
        "train_class_counts": dict(zip(classes, present.tolist())),
        "data": str(cells.source),
    }
    return classifier.eval()


def _labels(cells: CellImages, labels: Any) -> pd.Series:
    if isinstance(labels, str):
        if labels not in cells.obs.columns:
            raise InputError(f"{cells.source}: no obs column {labels!r}; columns are {list(cells.obs.columns)}")
        values = cells.obs[labels]
    else:
        labels = np.asarray(labels)
        if labels.shape != (len(cells),):
            raise InputError(f"labels has shape {labels.shape} for {len(cells)} cells; expected ({len(cells)},)")
        values = pd.Series(labels, index=cells.obs.index)
    if not isinstance(values.dtype, pd.CategoricalDtype):
        values = values.astype("category")
    return values


def _fit_linear(
    classifier: CellClassifier, model: SSLModule, cells: CellImages, codes: np.ndarray, config: FinetuneConfig, device
) -> None:
    """Fit the probe on ``model``'s embeddings; ``classifier`` shares ``model``'s inputs and encoder."""
    from sslcell.tl import embed_array

    x = embed_array(model, cells, device=device)  # (N, D), frozen encoder, no augmentation
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6
    z = (x - mean) / std
    logistic = LogisticRegression(
        C=config.C, max_iter=config.max_iter, class_weight=class_weight(codes, config.oversample)
    )
    logistic.fit(z, codes)
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


def class_weight(y: np.ndarray, oversample: bool | float) -> dict | str | None:
    """scikit-learn ``class_weight`` for ``FinetuneConfig.oversample``: the "balanced" weights
    ``n / (K * count_k)`` (K: the classes present in ``y`` (N,)) raised to the power ``oversample``.

    ``True`` (power 1) gives "balanced", ``False`` (0) gives None, any other power a dict keyed by label.
    """
    power = float(oversample)
    if power in (0.0, 1.0):
        return "balanced" if power else None
    classes, counts = np.unique(y, return_counts=True)
    return {k: (len(y) / (len(classes) * n)) ** power for k, n in zip(classes.tolist(), counts.tolist())}


class _FinetuneModule(pl.LightningModule):
    def __init__(self, classifier: CellClassifier, codes: np.ndarray, config: FinetuneConfig) -> None:
        super().__init__()
        self.classifier, self.config = classifier, config
        self.register_buffer("codes", torch.from_numpy(codes.astype(np.int64)), persistent=False)
        self.augment = ImageAugment(image_augment_config(config.augment))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, rows = batch
        seed = (self.config.seed * 1_000_003 + self.global_step * 7919) % (2**63 - 1)
        torch.manual_seed(seed)
        generator = torch.Generator(device=images.device).manual_seed(seed)
        x = self.classifier.inputs.views(images, generator, n=1, augment=self.augment)[0]
        logits = self.classifier(x)
        loss = F.cross_entropy(logits.float(), self.codes[rows], label_smoothing=self.config.label_smoothing)
        accuracy = (logits.argmax(1) == self.codes[rows]).float().mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=len(rows))
        self.log("train/accuracy", accuracy, prog_bar=True, batch_size=len(rows))
        return loss

    def on_train_epoch_start(self) -> None:
        self.trainer.train_dataloader.dataset.set_epoch(self.current_epoch)
        if self.config.encoder_lr_factor == 0:  # a frozen encoder stays as it is: no batch-norm statistics updates
            self.classifier.encoder.eval()

    def configure_optimizers(self) -> Any:
        c = self.config
        head = list(self.classifier.head.parameters())
        encoder = [p for p in self.classifier.encoder.parameters() if p.requires_grad]
        groups = [{"params": head, "lr": c.lr}]
        if c.encoder_lr_factor > 0:
            groups.append({"params": encoder, "lr": c.lr * c.encoder_lr_factor})
        else:
            for p in encoder:
                p.requires_grad_(False)
        optimizer = torch.optim.AdamW(groups, weight_decay=c.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = int(total * c.warmup_fraction)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, total, warmup, 0.01))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _fit_full(classifier: CellClassifier, cells: CellImages, codes: np.ndarray, config: FinetuneConfig) -> None:
    weights = None
    if config.oversample:
        counts = np.bincount(codes)
        weights = counts[codes] ** -float(config.oversample)
    batch_size = min(config.batch_size, len(codes))
    loader = make_image_dataloader(
        cells, batch_size=batch_size, seed=config.seed, weights=weights, return_index=True
    )
    on_gpu = config.accelerator in ("gpu", "cuda") or (config.accelerator == "auto" and torch.cuda.is_available())
    precision = config.precision if config.precision != "auto" else ("bf16-mixed" if on_gpu else "32-true")
    trainer = pl.Trainer(
        max_epochs=config.epochs,
        accelerator=config.accelerator,
        devices=1,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=config.progress_bar,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    module = _FinetuneModule(classifier, codes, config)
    module.train()  # a loaded model comes in eval mode; dropout and batch norm must train here
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*`IterableDataset` has `__len__` defined.*")  # exact here
        trainer.fit(module, loader)
    if config.encoder_lr_factor > 0:
        device = torch.device("cuda") if on_gpu else torch.device("cpu")
        _recalibrate_batch_norm(classifier.to(device), cells, weights, batch_size, config.seed)
    classifier.cpu()


@torch.no_grad()
def _recalibrate_batch_norm(classifier: CellClassifier, cells: CellImages, weights: np.ndarray | None,
                            batch_size: int, seed: int, max_cells: int = 8192) -> None:
    """Re-estimate the encoder's batch-norm statistics for the final weights ("precise BN").

    During fine-tuning batch norm normalises with each batch's statistics, while its running averages trail the
    changing weights (momentum 0.1). After a short run they no longer match the final encoder and its
    predictions in eval mode can collapse to one class. One pass in train mode with cumulative averaging
    (``momentum=None``) over at most ``max_cells`` un-augmented training crops, drawn (seeded) as training drew
    them: with the oversampling ``weights`` when given. The layers after batch norm were trained on
    statistics of class-balanced batches; statistics of the natural class mix would shift their inputs.
    """
    norms = [m for m in classifier.encoder.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    rng = np.random.default_rng(seed)
    n = min(len(cells), max_cells)
    if weights is not None:
        rows = rng.choice(len(cells), n, replace=True, p=weights / weights.sum())
    else:
        rows = rng.permutation(len(cells))[:n]
    device = next(classifier.parameters()).device
    classifier.encoder.train()
    for start in range(0, len(rows), batch_size):
        batch = torch.from_numpy(cells.batch(np.sort(rows[start:start + batch_size]))).to(device)
        classifier.encoder(classifier.inputs.normalize(batch))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    classifier.encoder.eval()
