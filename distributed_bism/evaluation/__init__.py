"""Evaluation: the metrics, figures, classifier-FID. The names eval.metrics accepts, and the module
of each metric, are in distributed_bism/registry/metrics.py.

    metrics.py         EvalContext, Metric, register_metric, get_metric, run_metrics
    loglik.py          exact / AIS / RAISE log-likelihood of GRBMs, and the test_loglik metric
    fisher.py          Fisher divergence on sets with a closed-form score, and the fisher metric
    sample_grid.py     samples: sampler-titled grids, samples over training; draw_samples
    sample_quality.py  classifier_fid, classifier_kid, fid (standard, with a local Inception file)
    classifier_fid.py  the project's own feature classifiers and the FID / KID formulas
    feature_stats.py   the Gaussian of feature rows from sums that all-reduce across ranks
    sample_shares.py   each rank's chunks of an evaluation's samples, seeded by chunk index
    inception.py       standard FID features from a TorchScript Inception file
    ood.py             ood_auroc (BiDVL's out-of-distribution detection)
    learning_signal.py denoise and energy_gap: cheap signs that an image model is learning
    progress.py        the test log-likelihood curve of a run
    figures.py         sample grids, strips, curves (PNG)
    commands.py        `bism eval` and `bism sample`
"""

from __future__ import annotations

from distributed_bism.evaluation.figures import save_sample_figure

__all__ = ["save_sample_figure"]
