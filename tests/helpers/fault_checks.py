"""What the fault-injection tests check after a fault and a rerun, and the counts they record:
the final parameters against an uninterrupted run's, the checkpoints that were valid before
the rerun against those after it, the MLflow run (one, FINISHED, no step logged twice).

`FaultReport` collects one record per injected fault and writes them as JSON to the path in
$BISM_FAULT_REPORT when set (bench/fault_soak.py aggregates them)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from distributed_bism.training.checkpointing import CheckpointError, LocalCheckpoints, load_state

PARTS = ("energy", "posterior", "ema")
TOLERANCE = 1e-6  # max |Δ| of any parameter against the uninterrupted run


def final_params(output_dir: Path, name: str) -> dict[str, dict[str, torch.Tensor]]:
    """θ, φ and EMA θ of the exported model, <output_dir>/models/<name>/model.pt."""
    model = torch.load(output_dir / "models" / name / "model.pt", weights_only=True)
    return {part: model[part] for part in PARTS} | {"step": model["step"]}


def max_abs_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    """The largest |a − b| over every tensor of θ, φ and EMA θ (inf when a key is missing)."""
    worst = 0.0
    for part in PARTS:
        if set(a[part]) != set(b[part]):
            return float("inf")
        for key, t in a[part].items():
            worst = max(worst, (t.double() - b[part][key].double()).abs().max().item())
    return worst


def valid_checkpoints(run_dir: Path) -> list[int]:
    """Steps of the checkpoints under run_dir whose state.pt loads, oldest first."""
    steps = []
    for p in LocalCheckpoints(run_dir).all():
        try:
            steps.append(int(load_state(p)["step"]))
        except CheckpointError:
            pass
    return steps


def lost_checkpoints(before: list[int], after: list[int], num_to_keep: int) -> list[int]:
    """Checkpoints valid before (steps) that are gone or unreadable after, without num_to_keep
    newer valid ones on disk to have made retention remove them: those are lost."""
    return [s for s in before if s not in after and sum(1 for t in after if t > s) < num_to_keep]


def mlflow_state(uri: str, experiment: str) -> dict[str, Any]:
    """The experiment's runs: their count, the status of each, and the train/loss steps of the
    first (with duplicates kept, to be found)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id]) if exp is not None else []
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")] if runs else []
    return {"runs": len(runs), "statuses": [r.info.status for r in runs], "loss_steps": sorted(steps),
            "run_id": runs[0].info.run_id if runs else None}


@dataclass
class FaultRecord:
    """One fault: injected, then whether the run survived it (FINISHED, one MLflow run, no
    duplicate step after the rerun), whether the final parameters matched, how many valid
    checkpoints were lost."""

    case: str
    injected: int = 0
    survived: bool = False
    params_equal: bool | None = None
    max_abs_diff: float | None = None
    checkpoints_lost: int | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


class FaultReport:
    """The records of one test session, written to $BISM_FAULT_REPORT (if set) as each ends."""

    def __init__(self) -> None:
        self.records: list[FaultRecord] = []
        self.path = os.environ.get("BISM_FAULT_REPORT")

    def start(self, case: str) -> FaultRecord:
        record = FaultRecord(case)
        record.seconds = -time.monotonic()
        self.records.append(record)
        return record

    def close(self) -> None:
        """The open records' time, up to now (at the end of each test, passed or failed)."""
        for r in self.records:
            if r.seconds < 0:
                r.seconds += time.monotonic()

    def write(self) -> None:
        self.close()
        if not self.path:
            return
        Path(self.path).write_text(json.dumps({"records": [asdict(r) for r in self.records]}, indent=1))


def check_outcome(record: FaultRecord, *, reference: dict[str, Any], output_dir: Path, name: str, uri: str,
                  experiment: str, run_dir: Path, valid_before: list[int], num_to_keep: int,
                  steps: int) -> None:
    """Fill `record` from what the run left, then assert it: a single FINISHED MLflow run with
    each train/loss step once, the final parameters within TOLERANCE of `reference`, no valid
    checkpoint of `valid_before` lost, the final checkpoint readable."""
    state = mlflow_state(uri, experiment)
    after = valid_checkpoints(run_dir)
    lost = lost_checkpoints(valid_before, after, num_to_keep)
    record.checkpoints_lost = len(lost)
    record.survived = (state["runs"] == 1 and state["statuses"] == ["FINISHED"]
                       and state["loss_steps"] == list(range(1, steps + 1)) and bool(after) and after[-1] == steps)
    params = final_params(output_dir, name)
    diff = max_abs_diff(reference, params)
    record.max_abs_diff, record.params_equal = diff, diff <= TOLERANCE and params["step"] == reference["step"]
    assert state["runs"] == 1, f"{state['runs']} MLflow runs: {state['statuses']}"
    assert state["statuses"] == ["FINISHED"], state
    steps_logged = state["loss_steps"]
    assert len(steps_logged) == len(set(steps_logged)), f"a step logged twice: {steps_logged}"
    assert steps_logged == list(range(1, steps + 1)), steps_logged
    assert not lost, f"valid checkpoints lost: {lost} (before the rerun {valid_before}, after {after})"
    assert after and after[-1] == steps, f"no readable final checkpoint: {after}"
    assert params["step"] == reference["step"] == steps
    assert diff <= TOLERANCE, f"final parameters differ from the uninterrupted run's: max |Δ| {diff:.3g}"
    final = load_state(run_dir / f"checkpoint_{steps:08d}")
    assert max_abs_diff(reference, final) <= TOLERANCE, "the final checkpoint differs from the uninterrupted run's"
