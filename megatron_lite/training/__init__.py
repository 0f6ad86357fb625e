"""Optimizer, LR schedule, precision, checkpoints, metrics and the training loop."""
