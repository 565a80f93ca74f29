"""Learning-rate schedule: linear warm-up then cosine decay to min_lr (as a LambdaLR multiplier)."""

from __future__ import annotations

import math


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate used for optimizer step `step` (0-based count of steps already taken)."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def schedule_of(train) -> dict:
    """The schedule TrainSpec `train` trains with, as recorded in each checkpoint manifest: the span is
    `train.schedule_steps`, or `train.steps` when that is null (a resume fills it from the manifest)."""
    total = train.schedule_steps if train.schedule_steps is not None else train.steps
    return {"lr": train.lr, "min_lr": train.min_lr, "warmup_steps": train.warmup_steps, "total_steps": total}


def lr_multiplier(train) -> callable:
    """A LambdaLR multiplier for TrainSpec `train` (base lr = train.lr)."""
    schedule = schedule_of(train)

    def multiplier(step: int) -> float:
        return lr_at(step, **schedule) / train.lr

    return multiplier
