"""MLflow tracking, one module per concept:

stores.py      the store a config names (tracking_uri), its checks before a run opens, a client
runs.py        the driver's run: open_run, close_run, close_children; system_metrics; run tags
run_logger.py  RunLogger: rank 0's metrics, images, tables, artifacts and models to the run
models.py      logged models: log_model, register_model, resolve_model, download_model
locks.py       writes retried while another writer holds a sqlite store's lock

MLflow is imported inside the functions that use it: importing this package does not load it.
"""

from __future__ import annotations

from distributed_bism.tracking.models import (
    ModelNotFound,
    ModelSource,
    checkpoint_tag,
    download_model,
    is_model_ref,
    register_model,
    resolve_model,
)
from distributed_bism.tracking.run_logger import RunLogger
from distributed_bism.tracking.runs import (
    ENDED_BY_TAG,
    EXPERIMENT_KIND_TAG,
    RUN_TAG,
    TRAINING_KIND,
    artifact_stamp,
    close_children,
    close_run,
    experiment_of,
    open_run,
    sanitize,
    system_metrics,
)
from distributed_bism.tracking.stores import (
    check_tracking,
    check_tracking_uri,
    tracking_uri,
    tracking_uri_key,
    uri_scheme,
)

__all__ = [
    "ENDED_BY_TAG",
    "EXPERIMENT_KIND_TAG",
    "RUN_TAG",
    "TRAINING_KIND",
    "ModelNotFound",
    "ModelSource",
    "RunLogger",
    "artifact_stamp",
    "check_tracking",
    "check_tracking_uri",
    "checkpoint_tag",
    "close_children",
    "close_run",
    "download_model",
    "experiment_of",
    "is_model_ref",
    "open_run",
    "register_model",
    "resolve_model",
    "sanitize",
    "system_metrics",
    "tracking_uri",
    "tracking_uri_key",
    "uri_scheme",
]
