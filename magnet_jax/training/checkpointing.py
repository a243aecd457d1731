"""Training checkpoints: an orbax `CheckpointManager` over the train state, the grain iterator and the config.

Layout of `<workdir>/checkpoints/<step>/` (step = number of completed optimizer steps):

  state/    the `TrainState` (params, opt_state, ema_params, step, skipped_steps) as sharded arrays (OCDBT); restored
            onto any mesh or device count through an abstract target whose leaves carry the new shardings
  data/     the input pipeline's iterator state, one small JSON per process (`process_{i}-of-{n}.json`; its handler
            also restores onto another process count)
  config/   the resolved config as JSON; on resume its `model` section must equal the running config's

Saves are asynchronous (the device-to-host copy blocks, the write does not), happen every
`checkpoint.every_steps` and on preemption, and keep the last `checkpoint.keep` checkpoints plus every
`checkpoint.keep_every`-th step. `PreemptionWatcher` tells the train loop when to save and stop: SIGTERM or SIGINT
in a single-process job, JAX's preemption sync point (all processes agree on the step) in a multi-process one.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

from magnet_jax.checkpoints.sources import CONFIG_ITEM, DATA_ITEM, STATE_ITEM
from magnet_jax.cli import reason
from magnet_jax.data.input_pipeline import InputCheckpointRestore, InputCheckpointSave
from magnet_jax.models.lm import config_differences


class CheckpointError(ValueError):
    """A checkpoint cannot be restored into this run (message is one line)."""


def make_manager(directory: str, ckpt_cfg: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    """The orbax manager for `directory` (local path or gs://) with the policies of the `checkpoint` config."""
    if ckpt_cfg.every_steps <= 0 or ckpt_cfg.keep <= 0 or ckpt_cfg.keep_every < 0:
        raise CheckpointError(
            f"checkpoint config: every_steps={ckpt_cfg.every_steps}, keep={ckpt_cfg.keep} must be >= 1 and "
            f"keep_every={ckpt_cfg.keep_every} >= 0"
        )
    keep = policies.LatestN(ckpt_cfg.keep)
    if ckpt_cfg.keep_every:
        keep = policies.AnyPreservationPolicy([keep, policies.EveryNSteps(ckpt_cfg.keep_every)])
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=policies.AnySavePolicy(
            [policies.FixedIntervalPolicy(ckpt_cfg.every_steps), policies.PreemptionCheckpointingPolicy()]
        ),
        preservation_policy=keep,
        enable_async_checkpointing=ckpt_cfg.async_save,
        create=True,
    )
    return ocp.CheckpointManager(directory, item_names=(STATE_ITEM, DATA_ITEM, CONFIG_ITEM), options=options)


def sharded_target(abstract_state: Any, shardings: Any) -> Any:
    """`ShapeDtypeStruct` leaves carrying `shardings`: the restore target that places arrays on a (new) mesh."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)


class Checkpointer:
    """Saves and restores (train state, data iterator, config) under one directory.

    `data_iter` is the input pipeline's `BatchIterator` (any grain `DatasetIterator` works), or None for runs
    without an iterator (the `data` item is then skipped).
    """

    def __init__(self, directory: str, ckpt_cfg: ml_collections.ConfigDict):
        self.directory = directory
        self.manager = make_manager(directory, ckpt_cfg)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(
        self, step: int, state: Any, data_iter: Any, config: ml_collections.ConfigDict, *, force: bool = False
    ) -> bool:
        """Saves if the policies say so (interval or preemption) or `force`; returns whether a save started.

        Must be called on every process at every step (orbax synchronizes the decision across processes).
        """
        items = {STATE_ITEM: ocp.args.StandardSave(state), CONFIG_ITEM: ocp.args.JsonSave(config_to_json(config))}
        if data_iter is not None:
            items[DATA_ITEM] = InputCheckpointSave(data_iter)
        saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        if saved:
            logging.info("checkpoint: saving step %d to %s (async)", step, self.directory)
        return saved

    def restore(
        self, target: Any, data_iter: Any, config: ml_collections.ConfigDict, *, step: int | None = None
    ) -> Any:
        """Restores `step` (default: latest) onto `target`'s shardings; `data_iter` is set to its saved position.

        Args:
          target: the abstract train state with shardings (`sharded_target`), for the mesh of *this* run.
          data_iter: the freshly built iterator to restore in place, or None to leave data untouched.
          config: this run's config; the checkpoint's `model` section must match it.
        Returns:
          The restored train state (arrays placed as `target` says).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"checkpoint: no checkpoint in {self.directory}")
        where = f"checkpoint {self.directory}/{step}"
        saved_config = self.manager.restore(step, args=ocp.args.Composite(**{CONFIG_ITEM: ocp.args.JsonRestore()}))[
            CONFIG_ITEM
        ]
        check_model_config(saved_config, config, where=where)
        items = {STATE_ITEM: ocp.args.StandardRestore(target)}
        if data_iter is not None:
            items[DATA_ITEM] = InputCheckpointRestore(data_iter)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
            raise CheckpointError(f"{where}: cannot restore into this run: {reason(e)}") from e
        logging.info("checkpoint: restored step %d from %s", step, self.directory)
        return restored[STATE_ITEM]

    def wait_until_finished(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def config_to_json(config: ml_collections.ConfigDict) -> dict:
    """The resolved config as plain JSON types (FieldReferences evaluated, tuples as lists)."""
    return json.loads(config.to_json())


def check_model_config(saved: Mapping[str, Any], config: ml_collections.ConfigDict, *, where: str) -> None:
    """Raises CheckpointError naming every `model.*` field that differs between a checkpoint and this run."""
    diffs = [
        f"model.{k}: checkpoint {a!r} vs config {b!r}"
        for k, a, b in config_differences(saved.get("model", {}), config_to_json(config)["model"])
    ]
    if diffs:
        raise CheckpointError(f"{where} was written by a different model ({'; '.join(diffs)})")


class Interrupted(BaseException):
    """A stop signal arrived while `PreemptionWatcher.during_setup` was active (nothing was trained)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class PreemptionWatcher:
    """Tells the train loop when the job is being stopped, so it saves a checkpoint and exits cleanly.

    SIGTERM (what Kubernetes, slurm `--signal=TERM@...` and preemptible VMs send) and SIGINT (Ctrl-C) stop a run:
    - single process: the handler sets a flag that `reached(step)` returns at the next step;
    - multi-process: JAX's preemption service (started by `jax.distributed.initialize`) catches SIGTERM on any
      process, and `reached(step)` turns True on every process at the same step; SIGINT is turned into a SIGTERM
      of this process so it takes the same path.
    Call `reached` once per step on every process. Inside `during_setup()` (single process) a signal raises
    `Interrupted` at once instead, so a job stopped before its first step exits without waiting for the setup.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        self._flag = threading.Event()
        self._previous = {}
        self._in_setup = False
        self._multi = jax.process_count() > 1
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                if self._multi and sig == signal.SIGTERM:
                    continue  # JAX's preemption service owns SIGTERM
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame):
        del frame
        if self._multi:  # JAX's preemption notifier listens to SIGTERM only
            os.kill(os.getpid(), signal.SIGTERM)
            return
        if self._in_setup:
            raise Interrupted(signum)
        if not self._flag.is_set():
            logging.warning("preemption: received signal %d; saving a checkpoint at this step", signum)
        self._flag.set()

    @contextlib.contextmanager
    def during_setup(self):
        """Within the block a stop signal raises `Interrupted` (single process; multi-process jobs see the notice
        at their first `reached`)."""
        self._in_setup = True
        try:
            if self._flag.is_set():
                raise Interrupted(signal.SIGTERM)
            yield
        finally:
            self._in_setup = False

    def reached(self, step: int) -> bool:
        if self._flag.is_set():
            return True
        try:
            return bool(multihost_utils.reached_preemption_sync_point(step))
        except RuntimeError:  # the preemption service is disabled
            return False

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
