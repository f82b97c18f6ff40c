"""The training loop and what it drives: replicas (local, DDP, DeepSpeed), optimisers, checkpoints."""
