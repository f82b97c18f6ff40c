"""A sweep's logging load on one MLflow store, without Ray, run as its own process:

    python -m tests.helpers.tracking_load OUT.json OUTPUT_DIR PARENT_RUN_ID --trials 8 --steps 60
        [--tracking-uri URI] [--hold-lock SECONDS]

It imports MLflow once, then forks TRIALS processes that start together, each what a trial of
`bism tune` does against the store: open_run (a child run of the sweep's run PARENT_RUN_ID, as
tune/runner.py's trial_driver opens it) and a RunLogger that logs STEPS steps of KEYS, one
log_batch per step (the trainer's logging with log_every 1), as fast as it can. Without
--tracking-uri the trials use the default store of OUTPUT_DIR (sqlite:///OUTPUT_DIR/mlflow.db).

--hold-lock S: once every trial has opened its run and logged a step, this process takes sqlite's
exclusive lock on that mlflow.db and holds it S seconds (another writer slower than MLflow's 20 s
busy timeout), then lets the trials finish.

OUT.json: {trial: {"run_id": ..., "error": traceback or null}}. Each value logged is
`expected_value(trial, key, step)`, so a reader can check every point, not only count them.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sqlite3
import sys
import time
import traceback
from pathlib import Path
from typing import Any

KEYS = ("train/loss", "train/lr", "train/grad_norm", "train/samples_per_s")


def expected_value(trial: int, key: str, step: int) -> float:
    return trial * 10_000 + step + KEYS.index(key) / 10


def trial_config(output_dir: str, name: str, uri: str | None) -> Any:
    from distributed_bism.config import load_config

    overrides = [f"trainer.output_dir={output_dir}", f"trainer.name={name}", "tracking.experiment=load"]
    return load_config(None, overrides + ([f"tracking.tracking_uri={uri}"] if uri else []))


def _trial(trial: int, args: argparse.Namespace, start: Any, logging: Any, go_on: Any, results: Any) -> None:
    from distributed_bism.tracking import RunLogger, open_run, tracking_uri

    start.wait()
    run_id = None
    try:
        cfg = trial_config(args.output_dir, f"load-{trial}", args.tracking_uri)
        run_id, _ = open_run(cfg, f"load-{trial}", parent_run_id=args.parent)
        logger = RunLogger(tracking_uri(cfg), run_id)
        for step in range(args.steps):
            logger.metrics({k: expected_value(trial, k, step) for k in KEYS}, step)
            if step == 0:
                logging.release()
                go_on.wait()  # with --hold-lock, until the lock is held
        results.put((trial, run_id, None))
    except BaseException:
        logging.release()
        results.put((trial, run_id, traceback.format_exc()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("output_dir")
    parser.add_argument("parent")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--tracking-uri")
    parser.add_argument("--hold-lock", type=float, default=0.0)
    args = parser.parse_args(argv)
    # MLflow imported here, before the fork, so that no trial pays the import; no store is opened
    # here (a forked child must not share this process's database connections).
    import mlflow.store.tracking.rest_store  # noqa: F401
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401

    import distributed_bism.tracking  # noqa: F401

    ctx = mp.get_context("fork")
    start, go_on, logging = ctx.Event(), ctx.Event(), ctx.Semaphore(0)
    results = ctx.Queue()
    procs = [ctx.Process(target=_trial, args=(i, args, start, logging, go_on, results)) for i in range(args.trials)]
    for p in procs:
        p.start()
    start.set()
    for _ in procs:
        logging.acquire()  # every trial has logged its first step (or failed)
    if args.hold_lock:
        db = sqlite3.connect(Path(args.output_dir) / "mlflow.db", timeout=60, isolation_level=None)
        db.execute("BEGIN EXCLUSIVE")
        go_on.set()
        print(
            f"tracking_load: holding the store's exclusive lock for {args.hold_lock:g} s", file=sys.stderr, flush=True
        )
        time.sleep(args.hold_lock)
        db.execute("COMMIT")
        db.close()
    go_on.set()
    got = {}
    for _ in procs:
        trial, run_id, error = results.get()
        got[trial] = {"run_id": run_id, "error": error}
    for p in procs:
        p.join()
    Path(args.out).write_text(json.dumps(got, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
