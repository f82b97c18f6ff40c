"""`bism diagnose CHECKPOINT`: the gradient-bias diagnostic (diagnostics.py) run on a trained model.

Loads the model with `load_trained`, takes `batches` training batches of the run's batch size,
measures the K-step hypergradient against the reference for each K, and reports it: a text
table, a plot (cos-sim and relative error against K) and a JSON file, and, when the checkpoint
belongs to an MLflow run, metrics `unroll_bias/cos_sim_k{K}`, `unroll_bias/rel_error_k{K}` (mean over
batches, at the checkpoint's step) and the two files as artifacts under diagnose/ in that run.
Artifact names carry the checkpoint step and the time, so a second diagnosis adds files and
never replaces one.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import cast

import torch
from torch import Tensor

from distributed_bism.commands.trained import TrainedModel, load_trained
from distributed_bism.core.diagnostics import BiasReport, gradient_bias
from distributed_bism.core.unroll import torch_optimizer_state
from distributed_bism.data.prepare import prepare_data
from distributed_bism.models import BernoulliPosterior, GaussianRBM, Posterior
from distributed_bism.progress_bars import bar
from distributed_bism.registry.objectives import objective_spec
from distributed_bism.training.checkpointing import CheckpointError

DEFAULT_KS = (0, 1, 5, 10)


@dataclass
class Diagnosis:
    """A report with where it went: the plot and JSON files, and the MLflow run (or None)."""

    report: BiasReport
    plot: Path | None
    json: Path | None
    run_id: str | None


def training_batches(trained: TrainedModel, num_batches: int, *, seed: int) -> list[Tensor]:
    """`num_batches` batches (batch_size, *data_shape) of the run's training split, drawn by a
    permutation seeded with `seed` (without replacement, cycling if the set is small)."""
    train = prepare_data(trained.cfg).train
    bs = trained.cfg.trainer.batch_per_worker(trained.cfg.trainer.max_workers)  # one worker's batch
    g = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(len(train), generator=g) for _ in range(-(-num_batches * bs // len(train)))])
    return [train[order[i * bs : (i + 1) * bs]] for i in range(num_batches)]


def _posterior_betas(trained: TrainedModel) -> tuple[float, float]:
    """The run's posterior Adam (β1, β2); the config has checked that there are two."""
    beta1, beta2 = trained.cfg.optim.posterior_betas
    return beta1, beta2


def posterior_optimizer_state(trained: TrainedModel) -> dict[str, dict] | None:
    """The checkpoint's posterior Adam state by parameter name (the unroll continues from it, as in
    training); None when the checkpoint has none (ZeRO-sharded, or a single-level objective)."""
    saved = trained.posterior_optimizer
    if not saved or trained.posterior is None:
        return None
    opt = torch.optim.Adam(
        trained.posterior.parameters(), lr=trained.cfg.optim.posterior_lr, betas=_posterior_betas(trained)
    )
    opt.load_state_dict(saved)
    return torch_optimizer_state(opt, dict(trained.posterior.named_parameters()))


def default_reference(trained: TrainedModel) -> str:
    """exact for a GRBM with a Bernoulli posterior, a long unroll otherwise."""
    return (
        "exact"
        if isinstance(trained.energy, GaussianRBM) and isinstance(trained.posterior, BernoulliPosterior)
        else "unroll"
    )


DIAGNOSE_TABLE = "diagnose_gradient_bias.json"  # MLflow table of the run's diagnoses, one row per K


def plot_report(report: BiasReport, path: Path, *, title: str) -> Path:
    """cos-sim (left) and relative error (right) against K: per-batch mean ± sd and pooled."""
    from distributed_bism.evaluation.figures import finish_figure, pyplot

    plt = pyplot()
    rows = report.rows()
    ks = [r["k"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, label in ((axes[0], "cos", "cosine similarity"), (axes[1], "rel", "relative error")):
        ax.errorbar(
            ks,
            [r[f"{key}_mean"] for r in rows],
            yerr=[r[f"{key}_sd"] for r in rows],
            marker="o",
            capsize=3,
            label=f"per batch (mean ± sd, {report.num_batches} batches)",
        )
        ax.plot(ks, [r[f"pooled_{key}"] for r in rows], "s--", label="pooled over batches")
        ax.set(xlabel="unrolled steps K", ylabel=f"{label} to the reference")
        ax.legend(fontsize=7)
    fig.suptitle(f"{title}\nreference: {report.reference}", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    finish_figure(fig, path, dpi=110)
    return path


def diagnose(
    ref: str,
    *,
    ks: list[int] | tuple[int, ...] = DEFAULT_KS,
    num_batches: int = 5,
    reference: str | None = None,
    reference_steps: int = 50,
    seed: int = 0,
    tracking_uri: str | None = None,
    output_dir: Path | None = None,
    log: bool = True,
) -> Diagnosis:
    """Diagnose the model `ref` names (a checkpoint or run directory, or an MLflow model: see
    commands/trained.py). Input
    errors (a bad reference, a single-level model, K < 0) are raised before any measurement."""
    if num_batches < 1:
        raise ValueError(f"--batches must be >= 1, got {num_batches}")
    if not ks or min(ks) < 0:
        raise ValueError(f"--k needs unroll depths >= 0, got {list(ks)}")
    trained = load_trained(ref, tracking_uri=tracking_uri)
    cfg = trained.cfg
    if not objective_spec(cfg.objective.name).bilevel or trained.posterior is None:
        raise CheckpointError(
            f"{trained.source}: objective {cfg.objective.name} is not bi-level, "
            "so there is no hypergradient to diagnose"
        )
    reference = reference or default_reference(trained)
    if reference == "exact" and default_reference(trained) != "exact":
        raise ValueError("--reference exact needs a Gaussian RBM with a Bernoulli posterior; use --reference unroll")
    torch.manual_seed(seed)
    posterior = cast(Posterior, trained.posterior)  # any q(h|v) module with Posterior's interface
    report = gradient_bias(
        trained.energy,
        posterior,
        cfg.objective,
        bar(training_batches(trained, num_batches, seed=seed), "diagnose", total=num_batches, unit="batch"),
        ks,
        posterior_lr=cfg.optim.posterior_lr,
        posterior_betas=_posterior_betas(trained),
        reference=reference,
        reference_steps=reference_steps,
        optimizer_state=posterior_optimizer_state(trained),
    )
    return _publish(report, trained, tracking_uri=tracking_uri, output_dir=output_dir, log=log)


def _publish(
    report: BiasReport, trained: TrainedModel, *, tracking_uri: str | None, output_dir: Path | None, log: bool
) -> Diagnosis:
    """Write the plot and JSON (into output_dir, else a temporary directory when logging), and log
    them with the metrics to the checkpoint's MLflow run."""
    from distributed_bism.tracking import RunLogger, artifact_stamp
    from distributed_bism.tracking import tracking_uri as default_uri

    run_id = trained.run_id if log else None
    if output_dir is None and run_id is None:
        return Diagnosis(report, None, None, None)
    stem = f"gradient_bias_{artifact_stamp(trained.step)}"
    with tempfile.TemporaryDirectory(prefix="bism_diagnose_") as tmp:
        where = output_dir or Path(tmp)
        title = (
            f"{trained.cfg.objective.name}, {trained.cfg.model.name} on {trained.cfg.data.name}, step {trained.step}"
        )
        png = plot_report(report, where / f"{stem}.png", title=title)
        js = where / f"{stem}.json"
        js.write_text(
            json.dumps(
                {"checkpoint": trained.source, "step": trained.step, "rows": report.rows(), **asdict(report)},
                indent=1,
            )
        )
        if run_id:
            logger = RunLogger(tracking_uri or default_uri(trained.cfg), run_id)
            metrics = {}
            for r in report.rows():
                metrics[f"unroll_bias/cos_sim_k{r['k']}"] = r["cos_mean"]
                metrics[f"unroll_bias/rel_error_k{r['k']}"] = r["rel_mean"]
            logger.metrics(metrics, trained.step)
            # the same rows as an MLflow table, one row per K and diagnosis (the file gains rows)
            logger.table([{"diagnosis": stem, "step": trained.step, **r} for r in report.rows()], DIAGNOSE_TABLE)
            logger.artifact(png, "diagnose")
            logger.artifact(js, "diagnose")
        kept = output_dir is not None
        return Diagnosis(report, png if kept else None, js if kept else None, run_id)
