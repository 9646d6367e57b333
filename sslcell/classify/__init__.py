"""Cell-type and fate prediction on top of a pretrained encoder.

* :func:`finetune` trains a :class:`CellClassifier`: a linear probe on frozen embeddings (``head="linear"``) or
  full fine-tuning with a lower encoder learning rate, oversampling and a dropout head (``head="full"``).
* :func:`predict` scores crops with it: predicted label and per-class probabilities in ``obs``, and, where
  labels are known, accuracy, macro-F1, balanced accuracy, per-class ROC-AUC, a confusion matrix and plots.
"""

from sslcell.classify.classifier import CellClassifier, load_classifier, save_classifier
from sslcell.classify.finetune import FinetuneConfig, finetune
from sslcell.classify.predict import predict

__all__ = ["CellClassifier", "FinetuneConfig", "finetune", "load_classifier", "predict", "save_classifier"]
