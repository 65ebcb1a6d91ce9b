"""megamoe: mixture-of-experts language-model training on Megatron-style parallelism."""

__version__ = "0.1.0"
