"""What the CLI does with a trained model: load it, evaluate, sample, diagnose."""
