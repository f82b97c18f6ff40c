"""Elastic runs without a cluster: trainer.num_workers: [min, max] and trainer.global_batch_size
(config errors, one line, before Ray), relaunching a run on another number of workers (allowed
while the global batch stays; a per-rank ZeRO checkpoint only on its own number), Ray's
ScalingConfig, and what a checkpoint's per-rank parts become on another world size.
The checkpoints themselves across world sizes: tests/distributed/test_elastic_checkpoints.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from distributed_bism.config import Config, ConfigError, from_dict
from distributed_bism.launch.preflight import RUN_CONFIG_FILE, check_resume, local_run_dir
from distributed_bism.training.resize import reseed, resplit_objective_states
from tests.helpers.bad_input import TINY, bism_error, config_file, no_ray  # noqa: F401 (fixtures)


def trainer(**keys: Any) -> Config:
    return from_dict(Config, {**TINY, "trainer": {**TINY["trainer"], "strategy": "ddp", **keys}})


def test_a_range_of_workers_with_a_global_batch() -> None:
    t = trainer(num_workers=[1, 4], global_batch_size=24).trainer
    assert t.elastic and t.worker_range == (1, 4) and (t.min_workers, t.max_workers) == (1, 4)
    assert [t.batch_per_worker(w) for w in (1, 2, 3, 4)] == [24, 12, 8, 6]
    assert all(t.global_batch(w) == 24 for w in (1, 2, 3, 4))
    fixed = trainer(num_workers=2, batch_size=8).trainer
    assert not fixed.elastic and fixed.worker_range == (2, 2) and fixed.global_batch(2) == 16
    assert trainer(num_workers=2, global_batch_size=16).trainer.batch_per_worker(2) == 8


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (["trainer.num_workers=[1,2]"], "trainer.global_batch_size: must be set when trainer.num_workers is a range"),
        (["trainer.num_workers=[1,3]", "trainer.global_batch_size=16"], "does not split evenly over 3 workers"),
        (["trainer.num_workers=[2,4]", "trainer.global_batch_size=20"], "choose a multiple of 12"),
        (["trainer.num_workers=[2,1]", "trainer.global_batch_size=4"], "a range is [min, max] with 1 <= min <= max"),
        (["trainer.num_workers=[0,2]", "trainer.global_batch_size=4"], "a range is [min, max]"),
        (["trainer.num_workers=[1,2,3]", "trainer.global_batch_size=6"], "a range is [min, max]"),
        (["trainer.num_workers=[1,2]", "trainer.global_batch_size=0"], "trainer.global_batch_size: must be > 0"),
        (["trainer.num_workers=[1,2]", "trainer.global_batch_size=4"], "strategy local runs one process"),
        (["trainer.elastic_resize_interval_s=-1"], "trainer.elastic_resize_interval_s: must be >= 0"),
    ],
)
def test_bad_ranges_are_one_line_before_ray(
    config_file: Path, capsys: pytest.CaptureFixture[str], override: list[str], expected: str
) -> None:
    strategy = [] if "strategy local" in expected else ["trainer.strategy=ddp"]
    line = bism_error(capsys, ["train", str(config_file), *strategy, *override])
    assert expected in line, line


def test_a_global_batch_larger_than_a_workers_share_is_refused(
    config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A global batch of 96 rows from 64 training rows: refused at 1 worker already, naming the key."""
    line = bism_error(
        capsys,
        [
            "train",
            str(config_file),
            "trainer.num_workers=[1,2]",
            "trainer.global_batch_size=96",
            "trainer.strategy=ddp",
        ],
    )
    assert "trainer.global_batch_size: 96 per worker × 1 worker(s)" in line and "64" in line


def recorded(tmp_path: Path, **keys: Any) -> Config:
    """A run of TINY under tmp_path (ddp, `keys`), its bism_config.yaml written as a first launch would."""
    cfg = trainer(output_dir=str(tmp_path / "out"), **keys)
    run_dir = local_run_dir(cfg)
    assert run_dir is not None
    run_dir.mkdir(parents=True)
    (run_dir / RUN_CONFIG_FILE).write_text(cfg.to_yaml())
    return cfg


def test_relaunch_on_another_number_of_workers_with_the_same_global_batch(tmp_path: Path) -> None:
    first = recorded(tmp_path, num_workers=2, batch_size=8)  # global batch 16
    for keys in ({"num_workers": [1, 2], "global_batch_size": 16}, {"num_workers": 1, "batch_size": 16}):
        again = trainer(output_dir=first.trainer.output_dir, **keys)
        assert check_resume(again, local_run_dir(again))  # type: ignore[arg-type]


def test_an_older_record_without_the_new_keys_still_resumes(tmp_path: Path) -> None:
    first = recorded(tmp_path, num_workers=2, batch_size=8)
    run_dir = local_run_dir(first)
    assert run_dir is not None
    record = yaml.safe_load((run_dir / RUN_CONFIG_FILE).read_text())
    for key in ("global_batch_size", "elastic_resize_interval_s"):
        del record["trainer"][key]
    (run_dir / RUN_CONFIG_FILE).write_text(yaml.safe_dump(record))
    again = trainer(output_dir=first.trainer.output_dir, num_workers=[1, 2], global_batch_size=16)
    assert check_resume(again, run_dir)


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({"num_workers": [1, 2], "global_batch_size": 8}, "trainer.batch_size: run 'bad-input'"),
        ({"num_workers": 1, "batch_size": 8}, "global batch of 16 rows"),
        ({"num_workers": [1, 2], "global_batch_size": 16, "seed": 3}, "trainer.seed"),
    ],
)
def test_relaunch_that_changes_the_global_batch_or_more_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], keys: dict[str, Any], expected: str
) -> None:
    first = recorded(tmp_path, num_workers=2, batch_size=8)
    path = tmp_path / "again.yaml"
    path.write_text(yaml.safe_dump({**TINY, "trainer": {**first.to_dict()["trainer"], **keys}}))
    line = bism_error(capsys, ["train", str(path)])
    assert expected in line, line


def test_a_checkpoint_with_per_rank_zero_shards_resumes_only_on_its_own_count(tmp_path: Path) -> None:
    first = recorded(tmp_path, num_workers=2, global_batch_size=16, strategy="deepspeed")
    run_dir = local_run_dir(first)
    assert run_dir is not None
    old = run_dir / "checkpoint_00000004"
    old.mkdir()
    for name in ("state.pt", "optim_rank0.pt", "optim_rank1.pt"):
        (old / name).write_bytes(b"")
    same = trainer(output_dir=first.trainer.output_dir, num_workers=2, global_batch_size=16, strategy="deepspeed")
    assert check_resume(same, run_dir)
    elastic = trainer(
        output_dir=first.trainer.output_dir, num_workers=[1, 2], global_batch_size=16, strategy="deepspeed"
    )
    with pytest.raises(ConfigError, match=r"trainer.num_workers: .* 2 workers, .* trainer.num_workers=2"):
        check_resume(elastic, run_dir)


def test_ray_gets_an_elastic_scaling_config() -> None:
    from distributed_bism.launch.ray_backend import scaling_config

    elastic = scaling_config(trainer(num_workers=[1, 2], global_batch_size=8, elastic_resize_interval_s=5.0), False)
    assert elastic.elasticity_enabled and (elastic.min_workers, elastic.max_workers) == (1, 2)
    assert elastic.elastic_resize_monitor_interval_s == 5.0
    fixed = scaling_config(trainer(num_workers=2), False)
    assert not fixed.elasticity_enabled and fixed.num_workers == 2


class FakeRay:
    """What check_resources asks of ray: a cluster of `cpus` CPUs on one node."""

    def __init__(self, cpus: float) -> None:
        self.cpus = cpus

    def cluster_resources(self) -> dict[str, float]:
        return {"CPU": self.cpus}

    def nodes(self) -> list[dict[str, Any]]:
        return [{"Alive": True}]


def test_an_elastic_run_needs_room_for_its_minimum_only() -> None:
    from distributed_bism.launch.ray_backend import check_resources

    assert check_resources(trainer(num_workers=[1, 4], global_batch_size=12), FakeRay(1)) is False
    with pytest.raises(ConfigError, match=r"2 workers \(the least of trainer.num_workers \[2, 4\]\)"):
        check_resources(trainer(num_workers=[2, 4], global_batch_size=12), FakeRay(1))
    with pytest.raises(ConfigError, match="trainer.num_workers: 4 workers"):
        check_resources(trainer(num_workers=4), FakeRay(2))


def test_reseeding_is_a_function_of_seed_rank_and_step() -> None:
    draws = []
    for seed, rank, step in ((0, 1, 10), (0, 1, 10), (0, 0, 10), (0, 1, 11), (1, 1, 10)):
        reseed(seed, rank, step)
        draws.append(torch.rand(3))
    assert torch.equal(draws[0], draws[1])
    assert all(not torch.equal(draws[0], d) for d in draws[2:])


def test_pcd_chains_are_dealt_out_again() -> None:
    chains = torch.arange(16.0).view(8, 2)  # 2 ranks × 4 chains of 2 values
    saved = [{"chains": chains[:4]}, {"chains": chains[4:]}]
    assert torch.equal(resplit_objective_states(saved, 0, 1)["chains"], chains)
    four = [resplit_objective_states(saved, r, 4)["chains"] for r in range(4)]
    assert torch.equal(torch.cat(four), chains) and all(c.shape == (2, 2) for c in four)
    assert resplit_objective_states([{}, {}], 0, 1) == {}  # no chains: nothing to carry


def test_a_checkpoint_of_another_world_size_reseeds_and_redeals_the_chains(tmp_path: Path) -> None:
    """TrainLoop.load of a checkpoint whose world size differs (here: one written by 1 worker,
    relabelled as 2 workers' with two chain sets): the RNG is reseed(seed, rank, step), not the
    saved stream, and the PCD chains of both saved ranks carry on, dealt out again."""
    from distributed_bism.training.checkpointing import load_state, save_state
    from distributed_bism.training.loop import TrainLoop
    from tests.helpers.local_runs import tiny

    cfg = tiny(tmp_path / "out", **{"objective.name": "pcd", "objective.cd_steps": 1})
    loop = TrainLoop.from_config(cfg)
    for _ in range(3):
        loop.run_step(loop.batches(loop.step))
    loop.save(tmp_path)
    state = load_state(tmp_path)
    chains = state["objective"][0]["chains"]
    half = len(chains) // 2
    state["world_size"] = 2
    state["rng"] = [state["rng"][0], state["rng"][0]]
    state["objective"] = [{"chains": chains[:half] + 1.0}, {"chains": chains[half:] - 1.0}]
    save_state(tmp_path, {k: v for k, v in state.items() if k != "format"})

    resumed = TrainLoop.from_config(cfg)
    resumed.load(tmp_path)
    assert resumed.step == 3
    after = torch.rand(4)
    reseed(cfg.trainer.seed, 0, 3)
    assert torch.equal(after, torch.rand(4)), "the noise after the resume is reseed(seed, rank, step)'s"
    torch.set_rng_state(state["rng"][0])
    assert not torch.equal(after, torch.rand(4)), "not the saved stream of rank 0"
    carried = resumed.objective.state_dict()["chains"]
    assert torch.equal(carried, torch.cat([chains[:half] + 1.0, chains[half:] - 1.0]))
