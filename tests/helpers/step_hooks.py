"""Freezing a `bism train` subprocess at a chosen step, so that a signal or a SIGKILL lands at a
known place (test_signals.py, test_fault_injection.py): not timed, made certain.

A sitecustomize.py on the subprocess's PYTHONPATH (active only with $BISM_TEST_BLOCK_AT) makes
`RunLogger.metrics` stop for good once it has logged step BISM_TEST_BLOCK_AT, after writing the
file $BISM_TEST_MARKER. Ray's workers inherit PYTHONPATH, so it works under strategy ddp too
(there rank 0's worker blocks). `Driver` runs the subprocess in a session of its own and kills
what is left of its process tree by PID."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

HOOK = '''
import importlib.abc, os, sys, time


def _patch(RunLogger):
    at, marker, metrics = int(os.environ["BISM_TEST_BLOCK_AT"]), os.environ["BISM_TEST_MARKER"], RunLogger.metrics

    def blocking(self, values, step, **kwargs):  # kwargs: RunLogger.metrics's own (model_id=, as bism eval passes)
        metrics(self, values, step, **kwargs)
        if step >= at:
            with open(marker, "w") as f:
                f.write(str(os.getpid()))
            while True:  # until a signal
                time.sleep(0.05)

    RunLogger.metrics = blocking


class _Hook(importlib.abc.MetaPathFinder):
    """Patch distributed_bism.tracking as it is imported, without importing it anywhere else
    (Ray's helper processes inherit PYTHONPATH too)."""

    def find_spec(self, name, path, target=None):
        if name != "distributed_bism.tracking":
            return None
        for finder in sys.meta_path:
            spec = None if finder is self else getattr(finder, "find_spec", lambda *a: None)(name, path, target)
            if spec is not None:
                break
        else:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _patch(module.RunLogger)

        spec.loader.exec_module = exec_and_patch
        return spec


if os.environ.get("BISM_TEST_BLOCK_AT"):
    sys.meta_path.insert(0, _Hook())
'''


class Driver:
    """`python -m distributed_bism.cli ARGS` in a session of its own, output to `log`."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str]):
        self.log = log
        self.seen: list[psutil.Process] = []  # descendants found by `snapshot`, killed by `stop` too
        self.proc = subprocess.Popen([sys.executable, "-m", "distributed_bism.cli", *args], stdout=log.open("w"),
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def output(self) -> str:
        return self.log.read_text()

    def wait_for(self, marker: Path, timeout: float) -> None:
        """Until the hook wrote `marker` (fails, with the log, if the driver ended or took too long)."""
        deadline = time.monotonic() + timeout
        while not marker.exists():
            assert self.proc.poll() is None, f"driver ended (status {self.proc.returncode}):\n{self.output()}"
            assert time.monotonic() < deadline, f"no step logged within {timeout} s:\n{self.output()}"
            time.sleep(0.2)

    def snapshot(self) -> list[psutil.Process]:
        """The driver's descendants now (Ray's processes, its workers), remembered for `stop`: once
        the driver is SIGKILLed they are orphans, no longer found under it."""
        try:
            found = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            found = []
        self.seen += [p for p in found if p not in self.seen]
        return found

    def stop(self) -> None:
        """Kill what is left of the driver's process tree, by PID (a failed test's leftovers), and
        every descendant `snapshot` saw."""
        left = self.snapshot() + self.seen
        if self.proc.poll() is None:
            self.proc.kill()
        for p in left:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc.wait(timeout=60)


def hook_env(tmp_path: Path, *, block_at: int | None, extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment for a `bism` subprocess, with `extra`; with `block_at`, the hook
    (in tmp_path/hook) freezes the run once step `block_at` is logged and writes tmp_path/blocked."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "BISM_TEST_BLOCK_AT")}
    env |= extra or {}
    if block_at is not None:
        hook = tmp_path / "hook"
        hook.mkdir(exist_ok=True)
        (hook / "sitecustomize.py").write_text(HOOK)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(hook), env.get("PYTHONPATH")) if p)
        env |= {"BISM_TEST_BLOCK_AT": str(block_at), "BISM_TEST_MARKER": str(tmp_path / "blocked")}
    return env
