"""Cell-type and fate classifiers on top of a pretrained encoder.

* :func:`finetune` trains a :class:`CellClassifier`: a linear probe on frozen embeddings (``head="linear"``, image
  and expression models) or full fine-tuning with a lower encoder learning rate, oversampling and a dropout head
  (``head="full"``, image models).
* :func:`sslcell.tl.predict` applies it: predicted label, confidence and per-class probabilities in the AnnData,
  and metrics where labels are known (:func:`sslcell.tl.score`); plots in :mod:`sslcell.pl`.
"""

from __future__ import annotations

from sslcell.classify.classifier import CellClassifier, load_classifier, save_classifier
from sslcell.classify.finetune import FinetuneConfig, finetune
from sslcell.classify.predict import predict  # deprecated (moved to sslcell.tl.predict); kept for one release

__all__ = ["CellClassifier", "FinetuneConfig", "finetune", "load_classifier", "predict", "save_classifier"]
