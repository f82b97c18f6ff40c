"""What the CLI does beyond training: load a trained model, evaluate, sample, diagnose (trained.py,
evaluate.py, diagnose.py), and show configs and their keys (config_cmd.py)."""
