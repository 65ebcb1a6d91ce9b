"""Names shared by the single-process and the DeepSpeed engine."""

OPTIM_KEYS = ("exp_avg", "exp_avg_sq")
"""AdamW's per-parameter state tensors, saved in checkpoints as '<parameter name>.<key>'."""
