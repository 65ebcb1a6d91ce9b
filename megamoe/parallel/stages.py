"""Which blocks each pipeline chunk holds: an explicit parallel.pipeline_split, or a balanced one.

Chunk c (0 … pp·v − 1) is pipeline stage c of torch.distributed.pipelining; with v virtual stages
per rank, rank r holds chunks r, r + pp, r + 2·pp, … (the looped placement of interleaved 1F1B).
The balanced split minimizes the largest chunk's parameter count, with the embedding counted on
the first chunk and the LM head on the last (a tied head's matrix too: the last stage keeps a copy).
"""

from __future__ import annotations

from megamoe.config import Config
from megamoe.errors import ConfigError


def block_params(cfg: Config) -> list[int]:
    """Parameters of each block (a meta-device model: no memory)."""
    import dataclasses

    import torch

    from megamoe.model import Transformer

    shape = dataclasses.replace(cfg.model, vocab_size=cfg.model.vocab_size or 1)  # blocks do not depend on it
    with torch.device("meta"):
        model = Transformer(shape, moe=cfg.moe)
    return [sum(p.numel() for p in layer.parameters()) for layer in model.layers]


def _partition(costs: list[int], chunks: int, part_cost) -> list[int]:
    """Blocks per chunk (each ≥ 1, in order) minimizing the sum of part_cost over chunks (None = not allowed)."""
    n, prefix = len(costs), [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(chunks + 1)]
    cut = [[0] * (n + 1) for _ in range(chunks + 1)]
    best[0][0] = 0
    for k in range(1, chunks + 1):
        for end in range(k, n + 1):
            for start in range(k - 1, end):
                value = part_cost(best[k - 1][start], prefix[end] - prefix[start])
                if value < best[k][end]:
                    best[k][end], cut[k][end] = value, start
    sizes, end = [], n
    for k in range(chunks, 0, -1):
        sizes.append(end - cut[k][end])
        end = cut[k][end]
    return sizes[::-1]


def balanced(costs: list[int], chunks: int) -> list[int]:
    """Blocks per chunk minimizing the largest chunk's cost, then (among those) the sum of squared costs."""
    worst = max(_chunk_costs(costs, _partition(costs, chunks, max)))
    return _partition(costs, chunks, lambda acc, part: acc + part * part if part <= worst else float("inf"))


def _chunk_costs(costs: list[int], sizes: list[int]) -> list[int]:
    """Summed cost of each chunk."""
    out, start = [], 0
    for size in sizes:
        out.append(sum(costs[start : start + size]))
        start += size
    return out


def split_layers(cfg: Config, chunks: int) -> list[tuple[int, int]]:
    """[start, stop) block range of every chunk, or a ConfigError naming the key."""
    layers = cfg.model.num_layers
    if chunks > layers:
        raise ConfigError(
            "parallel.pipeline_parallel",
            f"× parallel.virtual_stages = {chunks} pipeline chunks, more than model.num_layers ({layers})",
        )
    if cfg.parallel.pipeline_split:
        sizes = _explicit(cfg.parallel.pipeline_split, chunks, layers)
    else:
        costs = block_params(cfg)
        head = cfg.model.vocab_size * cfg.model.d_model
        costs[0] += head  # the embedding
        costs[-1] += head  # the LM head (or the tied copy the last stage keeps)
        sizes = balanced(costs, chunks)
    bounds, start = [], 0
    for size in sizes:
        bounds.append((start, start + size))
        start += size
    return bounds


def _explicit(text: str, chunks: int, layers: int) -> list[int]:
    """parallel.pipeline_split parsed and checked."""
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError("parallel.pipeline_split", f"must be comma-separated block counts, got {text!r}") from None
    if len(sizes) != chunks or min(sizes) < 1 or sum(sizes) != layers:
        raise ConfigError(
            "parallel.pipeline_split",
            f"{text!r} must list {chunks} block counts (pipeline_parallel × virtual_stages), each ≥ 1, summing to "
            f"model.num_layers ({layers})",
        )
    return sizes


def chunks_of_rank(rank: int, pp: int, vpp: int) -> list[int]:
    """Pipeline chunk indices held by pipeline rank `rank` (looped placement)."""
    return [rank + k * pp for k in range(vpp)]
