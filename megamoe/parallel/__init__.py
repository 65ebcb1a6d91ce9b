"""Parallelism: layout checks, process groups, tensor-parallel layers, DeepSpeed data parallelism."""
