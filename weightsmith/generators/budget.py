"""Fit budgets that follow the data, and early stopping on a fixed validation batch.

Generators that train (`tile-diffusion`, `zoo-diffusion`) size each network's training to
the examples they get: `budget` scales the steps with the number of distinct examples (crops
or zoo members), between a floor and a cap. The learning rate schedule is laid out over that
budget before training starts, so it does not depend on when training stops. `Plateau` then
stops a loop early when the loss on a validation batch drawn once (the same inputs, noise and
timesteps at every check) has not improved by `min_delta` (relative) for `patience` checks in
a row; the best weights seen at a check are kept. Each network's `FitRecord` (steps taken, why
it stopped: "plateau" or "cap") goes into the fitted state's info.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import torch


def budget(examples: int, steps_per_example: float, floor: int, cap: int) -> int:
    """ceil(examples * steps_per_example) optimiser steps, clipped to [floor, cap] (cap wins)."""
    return max(1, min(cap, max(floor, math.ceil(examples * steps_per_example))))


@dataclass(frozen=True)
class FitRecord:
    """How one network's training ended; JSON-able via `to_dict`."""

    steps: int  # optimiser steps taken
    budget: int  # steps planned (the learning rate schedule's length)
    stopped: str  # "plateau" (validation loss stopped improving) or "cap" (the budget ran out)
    best_step: int  # step whose weights were kept (0: before any step)
    val_loss: float | None  # validation loss at best_step (None without validation)
    train_loss: float  # mean training loss over the last tenth of the steps taken

    def to_dict(self) -> dict:
        return asdict(self)


class Plateau:
    """Tracks the validation loss of a module; says when to stop and restores the best weights."""

    def __init__(self, module: torch.nn.Module, patience: int, min_delta: float):
        self.module, self.patience, self.min_delta = module, patience, min_delta
        self.best = math.inf
        self.best_step = 0
        self.bad = 0  # checks in a row without enough improvement
        self._weights = copy.deepcopy(module.state_dict())

    def check(self, loss: float, step: int) -> bool:
        """Record the validation loss after `step` steps; True when training should stop."""
        if loss < self.best * (1.0 - self.min_delta) or not math.isfinite(self.best):
            self.best, self.best_step, self.bad = loss, step, 0
            self._weights = copy.deepcopy(self.module.state_dict())
        else:
            self.bad += 1
            if loss < self.best:  # better, though not by enough: keep these weights
                self.best, self.best_step = loss, step
                self._weights = copy.deepcopy(self.module.state_dict())
        return self.bad >= self.patience

    def restore(self) -> None:
        self.module.load_state_dict(self._weights)


def finish(
    plateau: Plateau | None, validate, step: int, steps: int, stopped: str, eval_every: int, train_loss: float
) -> FitRecord:
    """End a fit: check the last unchecked steps, restore the best weights, and record the fit."""
    if plateau is not None:
        if step % eval_every:  # the last steps were not checked yet
            plateau.check(validate(), step)
        plateau.restore()
    return FitRecord(
        steps=step,
        budget=steps,
        stopped=stopped,
        best_step=plateau.best_step if plateau else step,
        val_loss=plateau.best if plateau else None,
        train_loss=train_loss,
    )
