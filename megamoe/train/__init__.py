"""Training: optimizer, schedule, checkpoints, metrics, the trainer loop."""
