"""Evaluation: the metric registry (metrics.py) and the metrics it holds, figures, classifier-FID.

    metrics.py         EvalContext, register_metric, METRICS, run_metrics
    likelihood.py      test_loglik (exact or AIS, Gaussian RBMs)
    sample_grid.py     samples: labelled sample grids, samples over training
    figures.py         sample grids, strips, curves (PNG)
"""

from __future__ import annotations

from distributed_bism.evaluation.figures import save_sample_figure

__all__ = ["save_sample_figure"]
