"""Divergence guard: stops a run whose updates keep being skipped or whose loss keeps spiking (docs/design.md §5.3).

The train step skips an update whose loss or gradients are not finite, or which would make a parameter non-finite
(`skipped_steps` counts them). `DivergenceGuard` reads each step's loss and skip flag, on the host, whenever the
loop fetches metrics (every log step), and raises `DivergenceError` (the CLI exits with status 3) when

  * more than `train.max_skipped_in_a_row` consecutive updates were skipped, or
  * more than `train.max_spikes_in_a_row` consecutive losses were spikes: above `train.spike_factor` times the
    median of the last `train.spike_window` non-spike losses (counted once the window holds a quarter of its size).

A limit of 0 (or `spike_factor` 0) turns that check off.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np


class DivergenceError(RuntimeError):
    """The run diverged (message is one line: what, at which steps, which limit)."""


class DivergenceGuard:
    """Consecutive skipped updates and loss spikes, per step.

    Args:
      skipped_before: the state's `skipped_steps` counter when this run starts (the per-step metric is cumulative).
    """

    def __init__(self, train_cfg, *, skipped_before: int = 0):
        self.max_skipped = int(train_cfg.max_skipped_in_a_row)
        self.max_spikes = int(train_cfg.max_spikes_in_a_row)
        self.spike_factor = float(train_cfg.spike_factor)
        self.window: collections.deque[float] = collections.deque(maxlen=max(int(train_cfg.spike_window), 1))
        self._skipped_total = int(skipped_before)
        self._skipped_run: list[int] = []
        self._spike_run: list[tuple[int, float, float]] = []

    def observe(self, first_step: int, history: Sequence[Mapping[str, Any]]) -> None:
        """Checks the per-step metrics of steps `first_step, first_step + 1, ...` (device or host values).

        Raises:
          DivergenceError: a limit was passed (at the first step that passes it).
        """
        host = jax.device_get([{"loss": h["loss"], "skipped_steps": h["skipped_steps"]} for h in history])
        for step, values in enumerate(host, start=first_step):
            self._step(step, float(np.asarray(values["loss"])), int(np.asarray(values["skipped_steps"])))

    def _step(self, step: int, loss: float, skipped_total: int) -> None:
        skipped = skipped_total > self._skipped_total
        self._skipped_total = skipped_total
        if skipped:
            self._skipped_run.append(step)
            if self.max_skipped and len(self._skipped_run) > self.max_skipped:
                raise DivergenceError(
                    f"diverged: {len(self._skipped_run)} consecutive updates skipped (non-finite loss, gradients or "
                    f"parameters) at steps {self._skipped_run[0]}..{step}; limit "
                    f"train.max_skipped_in_a_row={self.max_skipped}"
                )
            return
        self._skipped_run = []
        median = float(np.median(self.window)) if len(self.window) >= max(self.window.maxlen // 4, 1) else math.nan
        if self.spike_factor > 0 and math.isfinite(median) and loss > self.spike_factor * median:
            self._spike_run.append((step, loss, median))
            if self.max_spikes and len(self._spike_run) > self.max_spikes:
                first = self._spike_run[0]
                raise DivergenceError(
                    f"diverged: {len(self._spike_run)} consecutive loss spikes at steps {first[0]}..{step} (loss "
                    f"{loss:.4g} > {self.spike_factor:g} x running median {median:.4g}); limit "
                    f"train.max_spikes_in_a_row={self.max_spikes}"
                )
            return
        self._spike_run = []
        self.window.append(loss)
