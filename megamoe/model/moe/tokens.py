"""How a MoE block sees the tokens of its micro-batch: the single-process view (the parallel layer overrides it).

Shape legend: L sequence, l this rank's rows of it, B batch, D width.
Under tensor parallelism a MoE block routes only this rank's slice of the sequence (tokens are
replicated over TP ranks without sequence parallelism and are split first), so sums over the
micro-batch's tokens need the other TP ranks. `sum_tokens` is an all-reduce whose backward is the
identity (each token's gradient stays on its own rank); the single process has nothing to add.
"""

from __future__ import annotations

import torch


class TokenGroup:
    """The identity token group of a single process (also: tensor parallelism of degree 1)."""

    def split(self, x_LBD: torch.Tensor) -> torch.Tensor:
        """The rows this rank routes."""
        return x_LBD

    def merge(self, y_lBD: torch.Tensor) -> torch.Tensor:
        """Back to the block's layout."""
        return y_lBD

    def span(self, rows: int) -> tuple[int, int]:
        """(sequence position of this rank's first routed row, full sequence length)."""
        return 0, rows

    def sum_tokens(self, value: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks holding the other tokens of this micro-batch (forward only)."""
        return value

    def sum_data_parallel(self, value: torch.Tensor) -> torch.Tensor:
        """Sum over the data-parallel ranks (no gradient; the global balance loss's f)."""
        return value

    def shared_param(self, param: torch.Tensor) -> torch.Tensor:
        """A replicated parameter used on this rank's token slice (its grad is summed over the slices)."""
        return param
