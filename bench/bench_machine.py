"""What the benchmarks record about the machine: its description, the busy CPU time of the whole
machine (/proc/stat), and a sampler of the cores a process tree uses against everything else."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import threading
import time
from typing import Any

import psutil


def package_version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """Platform, CPU model and cores, torch and CUDA, load averages and the time at the start."""
    import torch

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "loadavg_start": os.getloadavg(),
        "time_start": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def machine_cpu_s() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, all cores (/proc/stat)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
    hz = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / hz, steal / hz


def busy_cores_now(seconds: float = 1.0) -> float:
    """Cores the whole machine keeps busy over the next `seconds` (this process sleeps meanwhile)."""
    busy0 = machine_cpu_s()[0]
    time.sleep(seconds)
    return (machine_cpu_s()[0] - busy0) / seconds


class CpuSampler(threading.Thread):
    """Every `interval` s: the machine's busy CPU time and that of each process in this process's
    tree (what a benchmark starts: a Ray cluster, its workers, child processes). Gives, for any
    interval, the cores the benchmark used and the cores everything else used."""

    def __init__(self, interval: float = 0.5):
        super().__init__(daemon=True)
        self.interval = interval
        self.samples: list[tuple[float, float, dict[int, float]]] = []  # (time.time(), machine busy s, {pid: cpu s})
        self._halt = threading.Event()
        self._me = psutil.Process()

    def _tree(self) -> dict[int, float]:
        out = {}
        for p in [self._me, *self._me.children(recursive=True)]:
            try:
                c = p.cpu_times()
                out[p.pid] = c.user + c.system
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return out

    def sample(self) -> None:
        self.samples.append((time.time(), machine_cpu_s()[0], self._tree()))

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)

    def cores(self, t0: float, t1: float) -> dict[str, float] | None:
        """Cores kept busy between wall times t0 and t1 (time.time()): by the whole machine, by
        this process tree, and by everything else. None when too few samples fall inside."""
        s = [x for x in self.samples if t0 - self.interval <= x[0] <= t1 + self.interval]
        if len(s) < 2 or s[-1][0] - s[0][0] <= 0:
            return None
        (ta, ba, pa), (tb, bb, _) = s[0], s[-1]
        dt = tb - ta
        # Each process's last CPU time seen in the interval: a process born inside it spent all its
        # time inside it, and one that died inside it (a pool worker at the end) still counts, short
        # of at most one sampling interval.
        last: dict[int, float] = {}
        for _, _, tree in s:
            last.update(tree)
        own = sum(cpu - pa.get(pid, 0.0) for pid, cpu in last.items())
        machine = (bb - ba) / dt
        return {"machine": machine, "benchmark": own / dt, "other_processes": max(0.0, machine - own / dt)}
