"""The one training loop: AdamW, linear warm-up then linear decay, clipped steps, resumable checkpoints.

Every trainer (the alignment stages in models/align/train.py, the symmetric fine-tuning in
models/finetune.py) supplies its parameter groups and a loss per step; the schedule, the optimizer
grouping, the seeding, the progress bar and the checkpoints are this module's.

Determinism without replaying anything: the items of step s come from a permutation seeded by
(seed, epoch of s) (``batch_items``); a trainer draws its other choices from a generator seeded by
(seed, s); the only other randomness (dropout) comes from the torch RNG, seeded here and kept in the
checkpoint. So a run resumed from the checkpoint of step n takes exactly the steps an uninterrupted
run would.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

CHECKPOINT_FILE = "checkpoint.pt"
StepCallback = Callable[[int, float], None]  # (steps done, loss of the last step)
StepLoss = Callable[[int, list[int]], torch.Tensor]  # (step, item indices) -> loss


class LoopConfig(BaseModel):
    """The knobs of the loop itself; each trainer's config adds its own and refuses any other key."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    steps: int = Field(gt=0)
    seed: int = 0
    batch_size: int = Field(default=8, gt=1, description="Items per step.")
    weight_decay: float = Field(default=0.01, ge=0, description="On weight matrices; none on biases/norms.")
    warmup_steps: int = Field(default=0, ge=0)
    max_grad_norm: float | None = Field(default=1.0, gt=0)


class CheckpointMismatchError(RuntimeError):
    """The checkpoint directory holds a run with another configuration or other data."""


@dataclass(frozen=True)
class ParamGroup:
    params: Sequence[torch.nn.Parameter]
    lr: float


@dataclass(frozen=True)
class Checkpointing:
    """Where and how often a run is saved, what identifies it, and the trained state beyond the
    optimizer's: ``state()`` returns it (a dict of picklable values) and ``load`` puts it back."""

    path: Path
    every: int
    identity: dict[str, str]
    state: Callable[[], dict[str, Any]]
    load: Callable[[dict[str, Any]], None]


@dataclass
class TrainResult:
    steps: int  # steps done in total, including those before a resume
    resumed_from: int  # 0 for a fresh run
    losses: list[float] = field(default_factory=list)  # one per step run by this call


def batch_items(seed: int, step: int, n_items: int, batch_size: int) -> list[int]:
    """Indices of step ``step``: epoch-wise permutations, the incomplete last batch dropped."""
    per_epoch = n_items // batch_size
    if per_epoch == 0:
        raise ValueError(f"{n_items} training items cannot fill one batch of {batch_size}")
    permutation = np.random.default_rng([seed, step // per_epoch]).permutation(n_items)
    offset = (step % per_epoch) * batch_size
    return [int(i) for i in permutation[offset : offset + batch_size]]


def lr_factor(step: int, warmup_steps: int, steps: int) -> float:
    """Linear warm-up over ``warmup_steps``, then linear decay to zero at the last step."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (steps - step) / max(1, steps - warmup_steps))


def adamw(groups: Sequence[ParamGroup], weight_decay: float) -> torch.optim.AdamW:
    """AdamW with one learning rate per group; no weight decay on biases and norm scales."""
    param_groups = []
    for group in groups:
        for decay in (True, False):
            chosen = [p for p in group.params if (p.ndim >= 2) == decay]
            if chosen:
                param_groups.append(
                    {"params": chosen, "lr": group.lr, "weight_decay": weight_decay if decay else 0.0}
                )
    return torch.optim.AdamW(param_groups)


def run_loop(
    config: LoopConfig,
    groups: Sequence[ParamGroup],
    n_items: int,
    step_loss: StepLoss,
    *,
    desc: str,
    train_mode: Sequence[torch.nn.Module] = (),
    checkpoint: Checkpointing | None = None,
    progress: bool = True,
    on_step: StepCallback | None = None,
) -> TrainResult:
    """``config.steps`` steps of ``step_loss`` over ``batch_size`` of ``n_items`` items each.

    ``train_mode``: modules in training mode (dropout on) while the loop runs, in eval mode after.
    With ``checkpoint``, a saved run is resumed (or refused when its identity differs) and the run
    is saved every ``checkpoint.every`` steps and at the end.
    """
    optimizer = adamw(groups, config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, config.warmup_steps, config.steps)
    )
    params = [p for group in optimizer.param_groups for p in group["params"]]

    start = 0
    if checkpoint is not None and checkpoint.path.is_file():
        start = _restore(checkpoint, optimizer, scheduler)
    else:
        torch.manual_seed(config.seed)
    result = TrainResult(steps=start, resumed_from=start)

    for module in train_mode:
        module.train()
    bar = tqdm(total=config.steps, initial=start, desc=desc, unit="step", disable=not progress)
    try:
        for step in range(start, config.steps):
            loss = step_loss(step, batch_items(config.seed, step, n_items, config.batch_size))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            value = float(loss.detach())
            result.losses.append(value)
            result.steps = step + 1
            bar.set_postfix(loss=f"{value:.4f}")
            bar.update()
            if checkpoint is not None and (
                result.steps % checkpoint.every == 0 or result.steps == config.steps
            ):
                _save(checkpoint, result.steps, optimizer, scheduler)
            if on_step is not None:
                on_step(result.steps, value)
    finally:
        bar.close()
        for module in train_mode:
            module.eval()
    return result


def _save(
    checkpoint: Checkpointing,
    step: int,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> None:
    state = {
        **checkpoint.identity,
        **checkpoint.state(),
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
    }
    path = checkpoint.path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    os.replace(partial, path)  # a crash mid-write leaves the previous checkpoint intact


def _restore(
    checkpoint: Checkpointing,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> int:
    path = checkpoint.path
    state = torch.load(path, weights_only=True)
    for key, expected in checkpoint.identity.items():
        if state.get(key) != expected:
            raise CheckpointMismatchError(
                f"{path} was written by a run with other {key}; resume with the same settings or "
                "use another checkpoint directory"
            )
    checkpoint.load(state)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"])
