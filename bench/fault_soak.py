"""Fault soak: run the fault-injection suite (tests/distributed/test_fault_injection.py) N times
and count, per fault kind, how often it was injected, how often the run survived it (FINISHED,
one MLflow run, no step logged twice), how often the final parameters equalled the
uninterrupted run's, and how many valid checkpoints were lost.

Each round is one `pytest` of that file (under `nice`), with $BISM_FAULT_REPORT naming a JSON file
that the suite writes its records to; the rounds' records are summed into
bench/results/fault_soak.json with the machine's description.

    python bench/fault_soak.py --rounds 3            # the CI-sized cases
    python bench/fault_soak.py --rounds 1 --slow     # also the driver signals and the 10 SIGKILLs
    python bench/fault_soak.py --rounds 20 --slow --minutes 60   # as many rounds as fit in ~60 min

The JSON is rewritten after every round, so a soak stopped early still leaves what it counted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_machine import machine_info  # noqa: E402

SUITE = "tests/distributed/test_fault_injection.py"


def one_round(slow: bool, timeout: float) -> tuple[int, list[dict[str, Any]], float]:
    """pytest of the suite once: its exit status, the records it wrote, its wall time."""
    with tempfile.TemporaryDirectory(prefix="fault_soak_") as tmp:
        report = Path(tmp) / "report.json"
        env = {
            **os.environ,
            "BISM_FAULT_REPORT": str(report),
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
        }
        cmd = ["nice", sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", SUITE]
        cmd += [] if slow else ["-m", "not slow"]
        start = time.perf_counter()
        try:
            status = subprocess.run(cmd, cwd=ROOT, env=env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            status = -1
        seconds = time.perf_counter() - start
        records = json.loads(report.read_text())["records"] if report.exists() else []
    return status, records, seconds


def summarize(rounds: list[tuple[int, list[dict[str, Any]], float]]) -> dict[str, Any]:
    """Per fault kind and in total: injected, survived, params_equal, checkpoints_lost, plus
    the largest parameter difference seen."""
    cases: dict[str, dict[str, Any]] = defaultdict(
        lambda: {
            "injected": 0,
            "survived": 0,
            "params_equal": 0,
            "checkpoints_lost": 0,
            "max_abs_diff": 0.0,
            "records": 0,
        }
    )
    for _, records, _ in rounds:
        for r in records:
            c = cases[r["case"]]
            c["records"] += 1
            c["injected"] += r["injected"]
            c["survived"] += int(bool(r["survived"]))
            c["params_equal"] += int(bool(r["params_equal"]))
            c["checkpoints_lost"] += r["checkpoints_lost"] or 0
            if r["max_abs_diff"] is not None:
                c["max_abs_diff"] = max(c["max_abs_diff"], r["max_abs_diff"])
    total = {
        k: sum(c[k] for c in cases.values())
        for k in ("injected", "survived", "params_equal", "checkpoints_lost", "records")
    }
    return {"cases": dict(cases), "total": total}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--slow", action="store_true", help="also the slow cases (driver signals, 10 SIGKILLs)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per round")
    p.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="start no round that would likely end after this many minutes (judged by the longest "
        "round so far); at most --rounds rounds",
    )
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fault_soak.json")
    a = p.parse_args()
    machine = machine_info()
    rounds: list[tuple[int, list[dict[str, Any]], float]] = []
    start = time.monotonic()
    for i in range(a.rounds):
        longest = max((t for _, _, t in rounds), default=0.0)
        if a.minutes is not None and rounds and time.monotonic() - start + longest > a.minutes * 60:
            print(f"stopping after {len(rounds)} rounds: another would end past {a.minutes:g} minutes", flush=True)
            break
        status, records, seconds = one_round(a.slow, a.timeout)
        print(f"round {i + 1}/{a.rounds}: pytest exit {status}, {len(records)} faults, {seconds:.0f} s", flush=True)
        rounds.append((status, records, seconds))
        write(a, rounds, machine)
    t = write(a, rounds, machine)["total"]
    print(
        f"{t['injected']} faults injected, {t['survived']} survived, {t['params_equal']} with equal parameters, "
        f"{t['checkpoints_lost']} checkpoints lost -> {a.out}"
    )


def write(
    a: argparse.Namespace, rounds: list[tuple[int, list[dict[str, Any]], float]], machine: dict[str, Any]
) -> dict[str, Any]:
    """The summary of the rounds so far, written to a.out (replacing it)."""
    result = {
        "suite": SUITE,
        "slow_cases": a.slow,
        "rounds": len(rounds),
        "minutes_budget": a.minutes,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "round_exit_status": [s for s, _, _ in rounds],
        "round_seconds": [round(t, 1) for _, _, t in rounds],
        **summarize(rounds),
        "note": "nonfinite_skip: params_equal means the skipped step left θ, φ, EMA θ and Adam's state exactly "
        "unchanged (by design its final parameters differ from the uninterrupted run's)",
        "machine": machine,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
