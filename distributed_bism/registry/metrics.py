"""The metrics `eval.metrics` and `eval.final_metrics` accept: name → its Metric, one line each.

Each path names a `Metric` (distributed_bism.evaluation.metrics), defined next to the estimator it
wraps. A leaf: `distributed_bism.evaluation.metrics.get_metric` imports a metric's module only
when an evaluation runs it.
"""

from __future__ import annotations

METRICS: dict[str, str] = {
    "test_loglik": "distributed_bism.evaluation.loglik:test_loglik",
    "fisher": "distributed_bism.evaluation.fisher:fisher_metric",
    "samples": "distributed_bism.evaluation.sample_grid:samples_metric",
    "classifier_fid": "distributed_bism.evaluation.sample_quality:classifier_fid_metric",
    "classifier_kid": "distributed_bism.evaluation.sample_quality:classifier_kid_metric",
    "fid": "distributed_bism.evaluation.sample_quality:fid_metric",
    "ood_auroc": "distributed_bism.evaluation.ood:ood_auroc",
    "denoise": "distributed_bism.evaluation.learning_signal:denoise_metric",
    "energy_gap": "distributed_bism.evaluation.learning_signal:energy_gap_metric",
}
