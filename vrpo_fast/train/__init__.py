"""Training loop, configs and checkpoints."""
