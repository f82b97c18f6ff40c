"""Launching a run, for api.train: preflight.py (every input check, before any worker starts or
run opens), local.py (strategy=local: the loop in this process), ray_backend.py (ddp / deepspeed:
the Ray session, TorchTrainer and the worker entry). Nothing below training/ imports from here."""
