"""Cell-type and fate classifiers on top of a pretrained encoder, or trained from scratch.

* :func:`finetune` trains a :class:`CellClassifier`: a linear probe on frozen embeddings (``head="linear"``, image
  and expression models) or full fine-tuning with a lower encoder learning rate, oversampling and a dropout head
  (``head="full"``, image models).
* :func:`train_from_scratch` trains a randomly initialised crop classifier (the plain CNN by default) with the same
  full fine-tuning loop; :data:`SCRATCH_RECIPE` holds issue 14's supervised-baseline settings.
* :func:`sslcell.tl.predict` applies it: predicted label, confidence and per-class probabilities in the AnnData,
  and metrics where labels are known (:func:`sslcell.tl.score`); plots in :mod:`sslcell.pl`.
"""

from __future__ import annotations

from sslcell._namespace import public_dir
from sslcell.classify.classifier import CellClassifier, load_classifier, save_classifier
from sslcell.classify.finetune import SCRATCH_RECIPE, FinetuneConfig, finetune, train_from_scratch
from sslcell.classify.predict import predict  # deprecated (moved to sslcell.tl.predict); kept for one release

__all__ = ["SCRATCH_RECIPE", "CellClassifier", "FinetuneConfig", "finetune", "load_classifier", "predict",
           "save_classifier", "train_from_scratch"]


def __dir__() -> list[str]:
    return public_dir(globals())
