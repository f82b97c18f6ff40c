"""`mlflow server` for tests: on a free loopback port, its store and artifacts in a directory of the
test's, in a session of its own, stopped by that session's process group id (the server and its
uvicorn workers), never by name."""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

MLFLOW = str(Path(sys.executable).parent / "mlflow")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def without_option(argv: list[str], name: str) -> list[str]:
    if name not in argv:
        return argv
    i = argv.index(name)
    return argv[:i] + argv[i + 2 :]


class MlflowServer:
    """`mlflow server` with ARGV (from `server` on), its --host, --port, --backend-store-uri and
    --artifacts-destination replaced: 127.0.0.1, a free port, `store` (default: a sqlite file in
    `workdir`) and workdir/artifacts. Its output goes to workdir/server.log."""

    def __init__(
        self, argv: list[str], env: dict[str, str], workdir: Path, db: Path | None = None, *, store: str | None = None
    ):
        """DB: a sqlite store to start from (a copy of it), already migrated: a fresh sqlite store
        costs a server ~10 s of schema migrations."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        workdir.mkdir()
        self.db = workdir / "mlflow.db"
        if db is not None:
            shutil.copyfile(db, self.db)
        argv = list(argv)
        for name, value in (
            ("--host", "127.0.0.1"),
            ("--port", str(self.port)),
            ("--backend-store-uri", store or f"sqlite:///{self.db}"),
            ("--artifacts-destination", str(workdir / "artifacts")),
        ):
            argv = without_option(argv, name) + [name, value]
        self.log = workdir / "server.log"
        self.proc = subprocess.Popen(
            [MLFLOW, *argv],
            env=env,
            cwd=workdir,
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (
                f"mlflow server exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}"
            )
            try:
                if self.status("127.0.0.1", "/health") == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"mlflow server not up in {timeout} s:\n{self.log.read_text()[-3000:]}")

    def status(self, host: str, path: str) -> int:
        """The HTTP status of GET PATH sent with `Host: HOST`."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request("GET", path, headers={"Host": host})
            return conn.getresponse().status
        finally:
            conn.close()

    def group(self) -> list[psutil.Process]:
        """The live processes of the server's process group."""
        live = []
        for p in psutil.process_iter(["pid", "status"]):
            try:
                if os.getpgid(p.pid) == self.proc.pid and p.status() != psutil.STATUS_ZOMBIE:
                    live.append(p)
            except (ProcessLookupError, psutil.NoSuchProcess):
                pass
        return live

    def stop(self) -> None:
        """End the server's process group (its own session: the server and its uvicorn), by its id."""
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 15
        while self.group() and time.monotonic() < deadline:
            time.sleep(0.2)
        if self.group():
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=15)
