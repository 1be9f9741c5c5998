"""The training loop (one), its losses, checkpoints, logs and plots."""
