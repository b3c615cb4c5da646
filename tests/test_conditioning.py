"""The conditioning table: rows at their own token lengths, grouped per model call, or padded on request."""

from __future__ import annotations

import pytest
import torch

from clora_ext.conditioning import ConditioningTable, pad_tokens, stack_conds


def test_rows_of_different_lengths_are_grouped_not_padded():
    short, long = torch.zeros(77, 4), torch.ones(154, 4)
    table = ConditioningTable([short, long, short.clone(), long.clone()])
    index = torch.tensor([3, 0, 1, 2])
    groups = table.row_groups(index)
    assert [g.tolist() for g in groups] == [[1, 3], [0, 2]]  # positions in index: 77-token rows, then 154
    assert table.select(index[groups[1]]).shape == (2, 154, 4)
    with pytest.raises(ValueError, match="different token lengths"):
        table.select(torch.tensor([0, 1]))


def test_padding_on_request_appends_the_empty_chunk():
    empty = torch.full((1, 77, 4), 7.0)
    short, long = torch.zeros(77, 4), torch.ones(154, 4)
    table = ConditioningTable([short, long], pad_with=empty)
    assert len(table.row_groups(torch.tensor([0, 1]))) == 1
    stacked = table.select(torch.tensor([0, 1]))
    assert stacked.shape == (2, 154, 4)
    assert torch.equal(stacked[0, 77:], empty[0]) and torch.equal(stacked[1], long)
    with pytest.raises(ValueError, match="cannot pad"):
        pad_tokens(long, 77, empty)


def test_sdxl_dicts_stack_per_key():
    rows = [{"crossattn": torch.zeros(77, 4), "vector": torch.full((3,), float(i))} for i in range(3)]
    table = ConditioningTable(rows)
    picked = table.select(torch.tensor([2, 0]))
    assert picked["crossattn"].shape == (2, 77, 4) and picked["vector"][:, 0].tolist() == [2.0, 0.0]
    assert stack_conds(rows[:1])["vector"].shape == (1, 3)
