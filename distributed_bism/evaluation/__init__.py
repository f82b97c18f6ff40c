"""Evaluation: the metric registry and the metrics it holds, figures, classifier-FID, commands.

    metrics.py         EvalContext, register_metric, METRICS, run_metrics (what eval.metrics may name)
    likelihood.py      test_loglik: exact (H <= 20) or AIS over every rank's chains, RAISE (GRBMs)
    divergence.py      fisher: Fisher divergence on sets with a closed-form score
    sample_grid.py     samples: sampler-titled grids, samples over training; draw_samples
    sample_quality.py  classifier_fid, classifier_kid, fid (standard, with a local Inception file)
    classifier_fid.py  the project's own feature classifiers and the FID / KID formulas
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
