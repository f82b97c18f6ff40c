"""Distributed layer: Ray Train worker groups (DDP, DeepSpeed), torch.distributed process groups
of forked or spawned ranks, a worker killed mid-run, Ray Tune sweeps."""
