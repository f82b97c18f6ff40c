"""bench/learning_images.py end to end at a toy budget: two methods train, are evaluated, and the
JSON, Markdown, plot and grids are written; a finished method is kept and reused by --resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_learning_images_writes_its_report_and_resumes(tmp_path: Path) -> None:
    cmd = [sys.executable, str(REPO / "bench" / "learning_images.py"), "--budget", "2", "--fractions", "1.0",
           "--n", "20", "--jobs", "1", "--methods", "bimdsm_k0", "ebm_mdsm", "--tag", "t", "--out", str(tmp_path),
           "--override", "eval.langevin_steps=[0,5,5]"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    report = json.loads((tmp_path / "learning_images_digits_t.json").read_text())
    by = {r["method"]: r for r in report["results"]}
    assert set(by) == {"bimdsm_k0", "ebm_mdsm"} and not any(r.get("error") for r in by.values())
    assert by["bimdsm_k0"]["samplers"] == ["conditional", "marginal_langevin"]
    point = by["bimdsm_k0"]["points"][-1]
    # at least the 20 calibration steps; how many more fit in 2 CPU seconds depends on the machine
    # (tests/unit/test_bench_learning_budget.py checks the budget loop on a fake clock)
    assert point["step"] >= 20 and {"cfid_conditional", "cfid_marginal_langevin", "denoise_gain"} <= set(point)
    assert report["reference"]["held_out"] < report["reference"]["uniform_noise"]
    for name in ("learning_images_digits_t.md", "learning_images_digits_t.png",
                 "learning_images_digits_t_bimdsm_k0_marginal_langevin.png",
                 "learning_images_digits_t_ebm_mdsm_marginal_langevin.png"):
        assert (tmp_path / name).is_file(), name
    # --resume trains nothing again: the kept results come back unchanged
    subprocess.run(cmd + ["--resume"], check=True, capture_output=True, timeout=600)
    again = json.loads((tmp_path / "learning_images_digits_t.json").read_text())
    assert again["results"] == report["results"]
