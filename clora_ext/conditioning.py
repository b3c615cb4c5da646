"""The conditioning of every row of a CLoRA model call, each at its own token length.

The host runs a prompt and its negative prompt at their own lengths: when they
differ (a long negative prompt, or a trigger that pushes a variant past 75 tokens),
A1111 calls the model once for the cond rows and once for the uncond rows, unless
"Pad prompt/negative prompt" is on. Padding a row with empty-prompt chunks changes
what its cross-attention sees, so CLoRA does the same: rows of equal length share
a model call, rows of other lengths get their own (``ConditioningTable.row_groups``).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .tokens import CHUNK_LENGTH

Cond = torch.Tensor | dict  # (T, D), or SDXL's {"crossattn": (T, D), "vector": (A,)}


def token_length(cond: Cond) -> int:
    return (cond["crossattn"] if isinstance(cond, dict) else cond).shape[-2]


def pad_tokens(cond: Cond, length: int, empty: torch.Tensor) -> Cond:
    """Append empty-prompt chunks (``empty``: (1, 77, D)) up to ``length`` tokens, as the host pads cond/uncond."""
    if isinstance(cond, dict):
        return {**cond, "crossattn": pad_tokens(cond["crossattn"], length, empty)}
    missing = length - cond.shape[-2]
    if missing == 0:
        return cond
    if missing < 0 or missing % CHUNK_LENGTH:
        raise ValueError(f"cannot pad {cond.shape[-2]} tokens to {length}")
    filler = empty.reshape(CHUNK_LENGTH, -1).to(cond.device, cond.dtype).repeat(missing // CHUNK_LENGTH, 1)
    return torch.cat([cond, filler], dim=-2)


def stack_conds(conds: Sequence[Cond]) -> Cond:
    """Stack conds of equal token length: (N, T, D), or a dict of stacked SDXL entries."""
    if len({token_length(c) for c in conds}) > 1:
        raise ValueError("conds of different token lengths cannot share a model call")
    if isinstance(conds[0], dict):
        return {k: torch.stack([c[k] for c in conds]) for k in conds[0]}
    return torch.stack(list(conds))


class ConditioningTable:
    """Conds indexed by table row, each at its own token length.

    ``pad_with`` (the empty prompt's (1, 77, D) encoding) pads every row to the longest
    instead: the host's "Pad prompt/negative prompt" option.
    """

    def __init__(self, conds: Sequence[Cond], pad_with: torch.Tensor | None = None):
        if not conds:
            raise ValueError("an empty conditioning table")
        if pad_with is not None:
            longest = max(token_length(c) for c in conds)
            conds = [pad_tokens(c, longest, pad_with) for c in conds]
        self.conds = list(conds)
        self.lengths = torch.tensor([token_length(c) for c in self.conds])

    def __len__(self) -> int:
        return len(self.conds)

    def row_groups(self, index: torch.Tensor | Sequence[int]) -> list[torch.Tensor]:
        """Positions in ``index`` (table rows of a call's rows) grouped by token length, shortest first."""
        rows = index.tolist() if isinstance(index, torch.Tensor) else list(index)
        lengths = self.lengths.tolist()
        groups: dict[int, list[int]] = {}
        for position, row in enumerate(rows):
            groups.setdefault(lengths[row], []).append(position)
        device = index.device if isinstance(index, torch.Tensor) else None
        return [torch.tensor(groups[n], dtype=torch.long, device=device) for n in sorted(groups)]

    def select(self, index: torch.Tensor | Sequence[int]) -> Cond:
        """The stacked conds of table rows ``index`` (all of one token length)."""
        rows = index.tolist() if isinstance(index, torch.Tensor) else list(index)
        return stack_conds([self.conds[i] for i in rows])
