"""Evaluation of representations: features without masking (`features`), weighted kNN (`knn`),
top-k accuracy and classifier evaluation on a split (`metrics`)."""

from maelab.evaluate.features import EvalSplit, encode, extract_features, gather_rows
from maelab.evaluate.knn import knn_accuracy, knn_scores
from maelab.evaluate.metrics import evaluate_classifier, topk_correct

__all__ = [
    "EvalSplit",
    "encode",
    "evaluate_classifier",
    "extract_features",
    "gather_rows",
    "knn_accuracy",
    "knn_scores",
    "topk_correct",
]
