"""`bism` as a subprocess for end-to-end tests: its own session, its own Ray temp dir, and a new
local Ray (RAY_ADDRESS=local) that neither joins nor disturbs any other cluster. `stop` kills
what is left of exactly that process tree, by PID (never `ray stop`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil


class BismProcess:
    def __init__(self, args: list[str], log: Path):
        self.ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths have a length limit
        env = {**os.environ, "RAY_TMPDIR": self.ray_tmp, "RAY_ADDRESS": "local"}
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "distributed_bism.cli", *args], stdout=log.open("w"),
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def workers(self) -> list[psutil.Process]:
        """The Ray Train worker processes of this run."""
        found = []
        for p in self.descendants():
            try:
                if "RayTrainWorker" in " ".join(p.cmdline()):
                    found.append(p)
            except psutil.NoSuchProcess:
                pass
        return found

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        left = self.descendants()
        if self.proc.poll() is None:
            self.proc.kill()
        for p in left:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc.wait(timeout=30)
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


def run_bism(args: list[str], log: Path, timeout: float) -> int:
    """Run `bism ARGS` to the end and clean up; its exit status."""
    run = BismProcess(args, log)
    try:
        return run.wait(timeout)
    finally:
        run.stop()
