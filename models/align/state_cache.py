"""Hidden states entering the first trainable layer, per token sequence, computed once.

When only the top k of L decoder layers train, the lower L - k layers give the same output for a text
at every step; caching it turns each training step into a k-layer forward and backward. A state is
batch-invariant (positions count real tokens, padding is masked), so it is stored unpadded per
sequence and re-padded into whatever batch the text lands in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from models.hf_encoder import PaddingSide


def sequence_key(ids: Sequence[int]) -> str:
    return hashlib.sha1(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()


class LowerStateCache:
    """``(seq, hidden)`` states keyed by token ids, stored in ``dtype`` (bfloat16 halves the memory).

    ``source`` names the weights that produced them (the base model's fingerprint), so a saved cache
    is never reused with another model.
    """

    def __init__(self, layer: int, source: str, dtype: torch.dtype = torch.float32) -> None:
        self.layer = layer
        self.source = source
        self.dtype = dtype
        self._states: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, ids: Sequence[int]) -> bool:
        return sequence_key(ids) in self._states

    def put(self, ids: Sequence[int], state: torch.Tensor) -> None:
        if state.shape[0] != len(ids):
            raise ValueError(f"state has {state.shape[0]} positions for {len(ids)} tokens")
        self._states[sequence_key(ids)] = state.detach().to(self.dtype).contiguous()

    def batch(self, rows: Sequence[Sequence[int]], side: PaddingSide) -> torch.Tensor:
        """(batch, longest, hidden) float32, zero where padded, laid out like ``pad_batch``."""
        states = [self._states[sequence_key(ids)] for ids in rows]
        width = max(len(s) for s in states)
        out = torch.zeros((len(states), width, states[0].shape[1]), dtype=torch.float32)
        for i, state in enumerate(states):
            span = slice(width - len(state), width) if side == "left" else slice(0, len(state))
            out[i, span] = state.float()
        return out

    def save(self, path: Path) -> None:
        save_file(self._states, str(path), metadata={"layer": str(self.layer), "source": self.source})

    def load(self, path: Path) -> None:
        """Add the states saved in ``path``; they must come from the same weights and layer."""
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
        saved = (metadata.get("source"), metadata.get("layer"))
        if saved != (self.source, str(self.layer)):
            raise ValueError(
                f"{path} holds states of {saved[0]!r} entering layer {saved[1]}, "
                f"not of {self.source!r} entering layer {self.layer}"
            )
        self._states.update({k: v.to(self.dtype) for k, v in load_file(str(path)).items()})
