"""Label transfer and probes on embeddings: exact faiss kNN, cross-validated / few-label probes, baselines."""

from sslcell.transfer.baselines import pca_baseline
from sslcell.transfer.knn import FaissKNNClassifier, FaissNeighbors, knn_transfer
from sslcell.transfer.probes import cross_validated_scores, few_label_scores, few_label_split, make_probe

__all__ = [
    "FaissKNNClassifier",
    "FaissNeighbors",
    "knn_transfer",
    "cross_validated_scores",
    "few_label_scores",
    "few_label_split",
    "make_probe",
    "pca_baseline",
]
