"""The group_a2a report's counting on hand-made routings, and the routings it evaluates per EP size."""

from __future__ import annotations

import torch

from megamoe.sweep.reports.group_a2a import remote_counts, routing_name, routings


def test_remote_counts_ep2():
    # 4 experts, EP 2: experts 0, 1 on rank 0 and 2, 3 on rank 1; sequence 0 on rank 0, sequence 1 on rank 1.
    choice_LBK = torch.tensor([[[0, 2], [0, 1]]])
    assert remote_counts(choice_LBK, 2, 4) == (1 + 2, 1 + 1)


def test_remote_counts_ep4_counts_a_rank_once():
    # 8 experts, EP 4: expert e on rank e // 2; sequence b on rank b.
    choice_LBK = torch.tensor([[[2, 3], [2, 7], [0, 6], [6, 7]]])
    # rows: both remote (same rank 1), one remote (7 on rank 3), both remote (ranks 0 and 3), none.
    assert remote_counts(choice_LBK, 4, 8) == (2 + 1 + 2 + 0, 1 + 1 + 2 + 0)


def test_remote_counts_wraps_sequences_over_ranks_and_sums_positions():
    # EP 2, 4 experts: sequences 0 and 2 on rank 0, 1 and 3 on rank 1; two positions.
    choice_LBK = torch.tensor([[[0, 1], [0, 1], [2, 3], [2, 3]], [[0, 2], [0, 2], [0, 2], [0, 2]]])
    assert remote_counts(choice_LBK, 2, 4) == (0 + 2 + 2 + 0 + 4 * 1, 0 + 1 + 1 + 0 + 4 * 1)


def test_remote_counts_places_sequences_after_the_first():
    # EP 3, 6 experts (expert e on rank e // 2): a batch starting at the 4th sequence puts its first on rank 1.
    choice_LBK = torch.tensor([[[2, 3], [2, 5], [0, 1]]])
    assert remote_counts(choice_LBK, 3, 6, first=4) == (0 + 1 + 0, 0 + 1 + 0)
    assert remote_counts(choice_LBK, 3, 6) == (2 + 1 + 2, 1 + 1 + 1)


def test_remote_counts_single_rank_is_all_local():
    choice_LBK = torch.randint(0, 8, (5, 3, 2))
    assert remote_counts(choice_LBK, 1, 8) == (0, 0)


def test_routings_per_ep():
    assert routings(1, 8, 2) == [(1, 0)]
    assert routings(2, 8, 2) == [(1, 0), (2, 1)]
    assert routings(4, 8, 2) == [(1, 0), (4, 1), (4, 2)]
    assert routings(8, 8, 2) == [(1, 0), (8, 4)]  # one group of one expert cannot hold k = 2
    assert routings(8, 16, 2) == [(1, 0), (8, 1), (8, 4)]


def test_routing_names():
    names = [routing_name(*r) for r in routings(4, 8, 2)]
    assert names == ["no groups", "4 groups, top-1 group", "4 groups, top-2 groups"]
