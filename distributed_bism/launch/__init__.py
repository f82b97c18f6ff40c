"""Launching a run: preflight checks, the Ray session and TorchTrainer, and the worker entry."""
