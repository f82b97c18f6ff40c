"""Ray Train worker functions for test_retention_ray.py: the package's own worker_main with a
fault injected in the worker process (where a test's monkeypatch does not reach)."""

from __future__ import annotations

import errno
from typing import Any

from distributed_bism.launch import ray_backend

FAIL_AT = "checkpoint_00000008"


def upload_fails_at_8(loop_config: dict[str, Any]) -> Any:
    """worker_main, with Ray's copy of checkpoint_00000008 into storage failing as on a full disk
    (in Ray's upload, after its barrier, where a real ENOSPC or EACCES would be raised)."""
    from ray.train.v2._internal.execution import storage

    real = storage._pyarrow_fs_copy_files

    def copy_files(source: str, destination: str, **kwargs: Any) -> Any:
        if FAIL_AT in str(destination):
            raise OSError(errno.ENOSPC, "No space left on device", str(destination))
        return real(source, destination, **kwargs)

    storage._pyarrow_fs_copy_files = copy_files
    return ray_backend.worker_main(loop_config)
