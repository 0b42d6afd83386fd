"""What every query tower shares: its trainable parameters and their state, for checkpoints,
selection snapshots and deltas (models/align/train.py, frozen.py, artifacts.py)."""

from __future__ import annotations

import torch
from torch import nn


class TrainableTower(nn.Module):
    """A module whose trainable parameters are those with ``requires_grad``."""

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {name: p for name, p in self.named_parameters() if p.requires_grad}

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in self.trainable_parameters().items()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        params = self.trainable_parameters()
        if set(state) != set(params):
            raise ValueError("the saved query-side state does not match this configuration")
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)
