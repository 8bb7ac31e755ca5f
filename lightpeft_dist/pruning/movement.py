"""Mask movement unit scores: how far each head and FFN mask travelled over the estimate (`prune.unit_scores:
movement`).

Why: the final mask value is the *net* displacement 1 - m, and under AdamW with an L1 term it mostly measures how
consistently the gradient's sign pointed one way (docs/method.md, "Mask variants"). The path length
sum over steps |m_after - m_before| is the other reading of the same trajectory: a unit whose mask the optimizer
keeps pushing (either way) travels far, one whose gradient flips sign from step to step travels little. It is
recorded at every optimizer step from the masks' full fp32 values (gathered under ZeRO-3, so every rank holds the
same totals and a checkpoint written by N ranks resumes on M), at the cost of two gathers of the masks per step.
Note what it cannot tell apart: a mask pushed down steadily by the L1 term moves as far as one pushed up steadily by
the task; docs/method.md says when to use it.
"""

from __future__ import annotations

import torch

from ..training.zero import full_value


class MovementTracker:
    """Accumulated |delta m| per head and FFN mask element, in float64 on CPU."""

    def __init__(self, head_masks: list[torch.Tensor], ffn_masks: list[torch.Tensor]):
        self.head_masks, self.ffn_masks = head_masks, ffn_masks
        self.head = [torch.zeros(_numel(m), dtype=torch.float64) for m in head_masks]
        self.ffn = [torch.zeros(_numel(m), dtype=torch.float64) for m in ffn_masks]
        self._before: list[torch.Tensor] | None = None

    def _values(self) -> list[torch.Tensor]:
        return [full_value(m).reshape(-1).double() for m in (*self.head_masks, *self.ffn_masks)]

    def before_step(self) -> None:
        """Snapshot the masks before the optimizer step (collective under ZeRO-3)."""
        self._before = self._values()

    def after_step(self) -> None:
        """Add this step's |delta m| to the totals (collective under ZeRO-3)."""
        if self._before is None:
            return
        for total, old, new in zip([*self.head, *self.ffn], self._before, self._values(), strict=True):
            total += (new - old).abs()
        self._before = None

    def results(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(head scores, FFN scores) per layer: the path length of every mask."""
        return [t.float() for t in self.head], [t.float() for t in self.ffn]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**{f"head.{i}": t for i, t in enumerate(self.head)}, **{f"ffn.{i}": t for i, t in enumerate(self.ffn)}}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.head = [state[f"head.{i}"].clone().double() for i in range(len(self.head))]
        self.ffn = [state[f"ffn.{i}"].clone().double() for i in range(len(self.ffn))]


def _numel(param: torch.Tensor) -> int:
    """Elements of a mask, its full size when ZeRO-3 has partitioned it."""
    return int(getattr(param, "ds_numel", param.numel()))
