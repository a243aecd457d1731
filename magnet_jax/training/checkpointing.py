"""Training checkpoints: an orbax `CheckpointManager` over the train state, the grain iterator and the config.

Layout of `<workdir>/checkpoints/<step>/` (step = number of completed optimizer steps):

  state/    the `TrainState` (params, opt_state, ema_params, step, skipped_steps) as sharded arrays (OCDBT); restored
            onto any mesh or device count through an abstract target whose leaves carry the new shardings
  data/     the input pipeline's iterator state, one small JSON per process (`process_{i}-of-{n}.json`; its handler
            also restores onto another process count)
  config/   the resolved config as JSON; on resume its `model` section must equal the running config's
  checksums.json  size and SHA-256 of every file above, written once orbax has finished the step; only steps that
            verify against it (and restore to a finite state) are resumed from (`Checkpointer`)

Saves are asynchronous (the device-to-host copy blocks, the write does not), happen every
`checkpoint.every_steps` and on preemption, and keep the last `checkpoint.keep` checkpoints plus every
`checkpoint.keep_every`-th step. `PreemptionWatcher` tells the train loop when to save and stop: SIGTERM or SIGINT
in a single-process job, JAX's preemption sync point (all processes agree on the step) in a multi-process one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import threading
import time
from collections.abc import Mapping
from concurrent import futures
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

from magnet_jax.checkpoints.sources import CONFIG_ITEM, DATA_ITEM, STATE_ITEM
from magnet_jax.checkpoints.weights import non_finite_leaves
from magnet_jax.cli import reason
from magnet_jax.data.input_pipeline import InputCheckpointRestore, InputCheckpointSave
from magnet_jax.fileio import IntegrityError, barrier, verify_checksums, write_checksums
from magnet_jax.models.lm import config_differences


class CheckpointError(ValueError):
    """A checkpoint cannot be restored into this run, or a save failed (message is one line, naming the path)."""


ON_CORRUPT = ("fallback", "fail")
ORBAX_TMP = "*.orbax-checkpoint-tmp*"


def make_manager(directory: str, ckpt_cfg: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    """The orbax manager for `directory` (local path or gs://) with the policies of the `checkpoint` config."""
    if ckpt_cfg.every_steps <= 0 or ckpt_cfg.keep <= 0 or ckpt_cfg.keep_every < 0:
        raise CheckpointError(
            f"checkpoint config: every_steps={ckpt_cfg.every_steps}, keep={ckpt_cfg.keep} must be >= 1 and "
            f"keep_every={ckpt_cfg.keep_every} >= 0"
        )
    if ckpt_cfg.get("on_corrupt", "fallback") not in ON_CORRUPT:
        raise CheckpointError(f"checkpoint.on_corrupt={ckpt_cfg.on_corrupt!r}: expected one of {', '.join(ON_CORRUPT)}")
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


def step_dirs(directory: str) -> list[int]:
    """The step numbers of `directory`'s `<step>/` folders, ascending (complete or not)."""
    root = epath.Path(directory)
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.is_dir() else []


def saving_error(path: Any, e: BaseException) -> CheckpointError:
    """One line for an orbax / tensorstore / OS failure while writing under `path` (disk full said so)."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space left" in str(e):
        return CheckpointError(f"{path}: disk full (no space left on device) while saving")
    return CheckpointError(f"{path}: saving the checkpoint failed ({type(e).__name__}: {reason(e)})")


class Checkpointer:
    """Saves, seals and restores (train state, data iterator, config) under one directory.

    A step is *sealed* once orbax has finished writing it: process 0 then writes `<step>/checksums.json` (size and
    SHA-256 of every file, `fileio.write_checksums`) in a background thread. Only a sealed step whose files verify,
    whose config reads and whose restored state is finite is resumed from; any other step is reported in one
    warning line naming the step and the file, moved to `<directory>.corrupt/` and the next older step is tried
    (`checkpoint.on_corrupt='fallback'`), or the run stops with that line (`'fail'`).

    `data_iter` is the input pipeline's `BatchIterator` (any grain `DatasetIterator` works), or None for runs
    without an iterator (the `data` item is then skipped).
    """

    def __init__(self, directory: str, ckpt_cfg: ml_collections.ConfigDict):
        self.directory = directory
        self.on_corrupt = ckpt_cfg.get("on_corrupt", "fallback")
        if jax.process_index() == 0:  # orbax's temporaries of saves a crash interrupted
            for stale in epath.Path(directory).glob(ORBAX_TMP) if epath.Path(directory).is_dir() else ():
                logging.warning("checkpoint: removing %s (an interrupted save)", stale)
                stale.rmtree(missing_ok=True) if stale.is_dir() else stale.unlink(missing_ok=True)
        barrier("checkpointer:clean")
        try:
            self.manager = make_manager(directory, ckpt_cfg)
        except CheckpointError:
            raise
        except Exception as e:  # an unreadable step folder, a permission error: one line
            raise CheckpointError(f"{directory}: cannot open the checkpoints ({type(e).__name__}: {reason(e)})") from e
        self._unsealed: list[int] = []
        self._sealer = futures.ThreadPoolExecutor(1, thread_name_prefix="checkpoint-seal")
        self._sealing: list[futures.Future] = []

    def steps(self) -> list[int]:
        """Every step folder on disk, ascending (sealed or not)."""
        return step_dirs(self.directory)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(
        self, step: int, state: Any, data_iter: Any, config: ml_collections.ConfigDict, *, force: bool = False
    ) -> bool:
        """Saves if the policies say so (interval or preemption) or `force`; returns whether a save started.

        Must be called on every process at every step (orbax synchronizes the decision across processes).
        Raises:
          CheckpointError: this or an earlier asynchronous save failed (one line naming the path).
        """
        self._seal_finished()
        items = {STATE_ITEM: ocp.args.StandardSave(state), CONFIG_ITEM: ocp.args.JsonSave(config_to_json(config))}
        if data_iter is not None:
            items[DATA_ITEM] = InputCheckpointSave(data_iter)
        try:
            saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        except Exception as e:
            raise saving_error(f"{self.directory}/{step}", e) from e
        if saved:
            self._unsealed.append(step)
            logging.info("checkpoint: saving step %d to %s (async)", step, self.directory)
        return saved

    def _seal_finished(self, *, wait: bool = False) -> None:
        """Queues the checksum manifest of every step whose write has finished (all of them with `wait`)."""
        if not self._unsealed:
            return
        try:
            if wait:
                self.manager.wait_until_finished()
            elif self.manager.is_saving_in_progress():
                return
            self.manager.check_for_errors()
        except Exception as e:
            raise saving_error(f"{self.directory}/{self._unsealed[-1]}", e) from e
        steps, self._unsealed = self._unsealed, []
        if jax.process_index() == 0:
            self._sealing.append(self._sealer.submit(self._seal, steps))
        for done in [f for f in self._sealing if f.done()]:
            self._sealing.remove(done)
            done.result()

    def _seal(self, steps: list[int]) -> None:
        for step in steps:
            path = epath.Path(self.directory) / str(step)
            try:
                write_checksums(path)
            except FileNotFoundError:
                if path.exists():  # else the retention policy removed the step meanwhile
                    raise
            except OSError as e:
                raise saving_error(path, e) from e

    def _reject(self, step: int, why: str) -> None:
        """Reports an unusable step in one line; moves it aside (fallback) or raises (fail)."""
        if self.on_corrupt == "fail":
            raise CheckpointError(f"{why} (checkpoint.on_corrupt='fail'; set 'fallback' to resume from an older step)")
        aside = epath.Path(f"{self.directory}.corrupt") / f"{step}-{int(time.time())}"
        logging.warning("checkpoint: skipping step %d: %s; moved to %s", step, why, aside)
        if jax.process_index() == 0:
            aside.parent.mkdir(parents=True, exist_ok=True)
            (epath.Path(self.directory) / str(step)).rename(aside)
        barrier("checkpointer:reject")
        self.manager.reload()

    def _check_step(self, step: int) -> dict:
        """Verifies a step's files against its manifest (process 0 decides for all) and reads its config."""
        path = epath.Path(self.directory) / str(step)
        problem = ""
        if jax.process_index() == 0:
            try:
                verify_checksums(path)
            except IntegrityError as e:
                problem = str(e)
        if jax.process_count() > 1 and not _from_process_0(not problem):
            problem = problem or f"{path} does not verify (reported by process 0)"
        if problem:
            return {"problem": problem}
        try:
            saved = self.manager.restore(step, args=ocp.args.Composite(**{CONFIG_ITEM: ocp.args.JsonRestore()}))
            saved_config = saved[CONFIG_ITEM]
            if not isinstance(saved_config, dict):
                raise ValueError("not a JSON object")
        except Exception as e:  # a verified step whose config still does not parse
            return {"problem": f"{path / CONFIG_ITEM}: unreadable config ({type(e).__name__}: {reason(e)})"}
        return {"config": saved_config}

    def restore(
        self, target: Any, data_iter: Any, config: ml_collections.ConfigDict, *, step: int | None = None
    ) -> Any:
        """Restores `step` (default: the newest step that verifies) onto `target`'s shardings; `data_iter` is set
        to its saved position. Steps that do not verify are skipped (see the class docstring).

        Args:
          target: the abstract train state with shardings (`sharded_target`), for the mesh of *this* run.
          data_iter: the freshly built iterator to restore in place, or None to leave data untouched.
          config: this run's config; the checkpoint's `model` section must match it.
        Returns:
          The restored train state (arrays placed as `target` says); `self.restored_step` is its step. None when
          no step (of several on disk) verifies under `on_corrupt='fallback'`.
        Raises:
          CheckpointError: no checkpoint at all, `step` or (with `on_corrupt='fail'`) the newest step does not
            verify, or a verified checkpoint cannot be restored into this run.
        """
        candidates = self.steps()[::-1] if step is None else [step]
        if not candidates:
            raise CheckpointError(f"checkpoint: no checkpoint in {self.directory}")
        for candidate in candidates:
            where = f"checkpoint {self.directory}/{candidate}"
            checked = self._check_step(candidate)
            if "problem" in checked:
                if step is not None:
                    raise CheckpointError(f"{where} does not verify: {checked['problem']}")
                self._reject(candidate, checked["problem"])
                continue
            check_model_config(checked["config"], config, where=where)
            items = {STATE_ITEM: ocp.args.StandardRestore(target)}
            if data_iter is not None:
                items[DATA_ITEM] = InputCheckpointRestore(data_iter)
            try:
                restored = self.manager.restore(candidate, args=ocp.args.Composite(**items))
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{where}: cannot restore into this run: {reason(e)}") from e
            except Exception as e:  # tensorstore / OS errors on files that verified: one line
                raise CheckpointError(f"{where}: restore failed ({type(e).__name__}: {reason(e)})") from e
            state = restored[STATE_ITEM]
            bad = non_finite_leaves(state)
            if bad:
                problem = f"{where}/{STATE_ITEM}: non-finite values in {', '.join(bad[:3])}"
                if step is not None:
                    raise CheckpointError(problem)
                self._reject(candidate, problem)
                continue
            self.restored_step = candidate
            logging.info("checkpoint: restored step %d from %s", candidate, self.directory)
            return state
        logging.warning("checkpoint: no step in %s verifies; starting from scratch", self.directory)
        return None

    def wait_until_finished(self) -> None:
        """Waits for pending saves and their checksum manifests."""
        self._seal_finished(wait=True)
        for f in self._sealing:
            f.result()
        self._sealing.clear()

    def close(self) -> None:
        try:
            self.wait_until_finished()
        finally:
            self._sealer.shutdown(wait=True)
            self.manager.close()


def _from_process_0(value: bool) -> bool:
    """Process 0's `value` on every process."""
    return bool(multihost_utils.broadcast_one_to_all(np.asarray(value)))


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
