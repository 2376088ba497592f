"""Evaluation of a pretrained backbone (paper §5, DESIGN §4).

``run_evaluation`` (suite.py) runs everything and writes ``<workdir>/eval/``;
the pieces are usable alone: ``extract_features`` / ``pool_to_dim`` (frozen,
pooled features), ``train_linear_probe`` / ``linear_probe_by_layer``,
``knn_accuracy``, ``nmi`` / ``ari`` / ``purity``, ``finetune_few_labels`` and
``save_cluster_grids``.
"""
from deeper_jax.evaluate.cluster_grid import save_cluster_grids
from deeper_jax.evaluate.cluster_metrics import ari, contingency_matrix, nmi, purity
from deeper_jax.evaluate.features import (FEATURES, adaptive_avg_pool, extract_features,
                                          pool_features, pool_to_dim)
from deeper_jax.evaluate.finetune import (class_balanced_subset, finetune_few_labels,
                                          train_classifier)
from deeper_jax.evaluate.knn import knn_accuracy, knn_predict
from deeper_jax.evaluate.linear_probe import (ProbeResult, linear_probe_by_layer,
                                              plot_probe_by_layer, train_linear_probe)
from deeper_jax.evaluate.suite import DEFAULTS, run_evaluation

__all__ = [
    "DEFAULTS", "FEATURES", "ProbeResult", "adaptive_avg_pool", "ari",
    "class_balanced_subset", "contingency_matrix", "extract_features",
    "finetune_few_labels", "knn_accuracy", "knn_predict", "linear_probe_by_layer",
    "nmi", "plot_probe_by_layer", "pool_features", "pool_to_dim", "purity",
    "run_evaluation", "save_cluster_grids", "train_classifier", "train_linear_probe",
]
