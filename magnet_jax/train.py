r"""MAGNeT training entry point: `train_and_evaluate(config, workdir)` and its absl CLI.

  python -m magnet_jax.train --config=configs/magnet.py:size=small --workdir=/runs/small-10s \
      --config.data.train_files='/data/codes/train-*.array_record' --config.data.eval_files='/data/codes/valid-*'

The config is locked: an unknown override key or a value of the wrong type is a one-line error (exit code 2), as is
any configuration or input problem found before the first step (missing data, weights, bad mesh degrees).
Multi-host jobs pass `--distributed` (`jax.distributed.initialize()`, which reads TPU / slurm / Open MPI
environments). Every process runs the same program; only process 0 writes the resolved config and the logs.

Workdir layout:
  config.json           the resolved config (process 0)
  checkpoints/<step>/   train state + input pipeline state + config (`magnet_jax.training.checkpointing`), resumed from
                        automatically when present
  metrics.jsonl         one JSON object per logged (split, step); `tensorboard/` event files of the same scalars
  profile/              `jax.profiler` traces of steps [train.profile_start, + train.profile_steps)
  export/               params-only export (EMA weights; bfloat16 with checkpoint.export_bf16) in the
                        `magnet_jax.checkpoints.pretrained` format that generation loads, written when training
                        completes (rewritten when a run is continued to a larger train.num_steps)
"""

from __future__ import annotations

import json
import os
import time

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from magnet_jax import sharding
from magnet_jax.checkpoints.sources import CHECKPOINTS_DIR, EXPORT_DIR, WORKDIR_CONFIG, export_step
from magnet_jax.checkpoints.t5_weights import load_t5
from magnet_jax.cli import fail, one_line, parse_flags, quiet_logs
from magnet_jax.data import input_pipeline
from magnet_jax.data.tokenizer import TextTokenizer
from magnet_jax.fileio import absolute_path, check_writable, local_source, write_atomic
from magnet_jax.models import t5
from magnet_jax.models.lm import LMConfig
from magnet_jax.training import checkpointing, flops, metrics, train_lib

# Per-interval values that are not averaged: the schedule's learning rate and the skipped-steps counter.
LAST_VALUE_METRICS = ("lr", "skipped_steps")


class SetupError(ValueError):
    """The config or the inputs it names cannot start a run (message is one line)."""


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Process 0 writes the resolved config to `<workdir>/config.json` (temp name, then rename)."""
    if jax.process_index() == 0:
        write_atomic(
            os.path.join(workdir, WORKDIR_CONFIG),
            json.dumps(checkpointing.config_to_json(config), indent=2, sort_keys=True),
        )


def resolve_paths(config: ml_collections.ConfigDict) -> None:
    """Makes the config's user-given paths absolute in place (`~` and relative ones; hub ids and URLs are kept), so
    checkpoints, config.json and the export name them from any working directory."""
    for section, key, resolve in (
        ("data", "train_files", absolute_path),
        ("data", "eval_files", absolute_path),
        ("conditioner", "t5", local_source),
        ("codec", "source", local_source),
        ("train", "init_from", local_source),
    ):
        config[section][key] = resolve(config[section][key])


class Run:
    """Everything a run sets up before its first step (mesh, text encoder, data, state, compiled steps)."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        self.config, self.workdir = config, workdir
        tc = config.train
        if min(tc.num_steps, tc.log_every, tc.eval_steps) < 1:
            raise ValueError(
                f"train.num_steps={tc.num_steps}, train.log_every={tc.log_every} and "
                f"train.eval_steps={tc.eval_steps} must be >= 1"
            )
        self.mesh = sharding.make_mesh(config.mesh)
        rules = sharding.logical_rules(config)
        # Frozen text encoder (weights placed by their logical axes) and its tokenizer for the input pipeline.
        self.t5_config, t5_params = load_t5(config.conditioner.t5, dtype=config.conditioner.dtype)
        self.t5_params = jax.device_put(t5_params, t5.param_shardings(self.t5_config, self.mesh, rules))
        self.tokenizer = TextTokenizer(
            config.conditioner.t5,
            max_length=config.conditioner.max_length,
            word_dropout=config.conditioner.word_dropout,
        )
        self.train_data = input_pipeline.PipelineConfig.from_config(config, train=True)
        self.eval_data = (
            input_pipeline.PipelineConfig.from_config(config, train=False) if config.data.eval_files else None
        )
        self.batch_sharding = sharding.batch_sharding(self.mesh, rules)
        self.train_iter = input_pipeline.make_iterator(self.train_data, self.tokenizer, sharding=self.batch_sharding)
        if self.eval_data is not None:  # read once here so a bad or too small eval split fails before training
            self._eval_batches()

        self.init_key, self.step_key, self.eval_key = jax.random.split(jax.random.key(config.seed), 3)
        abstract, self.state_shardings = train_lib.train_state_shardings(config, self.mesh)
        self.checkpointer = checkpointing.Checkpointer(os.path.join(workdir, CHECKPOINTS_DIR), config.checkpoint)
        self.resumed_from = self.checkpointer.latest_step()
        if self.resumed_from is None:
            self.state = train_lib.create_train_state(config, self.init_key, mesh=self.mesh)
        else:
            target = checkpointing.sharded_target(abstract, self.state_shardings)
            self.state = self.checkpointer.restore(target, self.train_iter, config)
        self.train_step = train_lib.make_train_step(config, self.mesh, self.t5_config)
        self.eval_step = train_lib.make_eval_step(config, self.mesh, self.t5_config)

    def _eval_batches(self):
        """The first `train.eval_steps` batches of the held-out split (at least one)."""
        data = input_pipeline.make_iterator(self.eval_data, self.tokenizer, sharding=self.batch_sharding)
        batches = [batch for _, batch in zip(range(self.config.train.eval_steps), data)]
        if not batches:
            raise SetupError(
                f"data.eval_files={self.config.data.eval_files!r}: fewer records than one batch of "
                f"{self.eval_data.global_batch_size}"
            )
        return batches

    def evaluate(self, params) -> dict[str, float]:
        """Mean eval metrics of `params` over `train.eval_steps` batches of the held-out split, read from its start
        with the same masks every time."""
        return metrics.summarize(
            [
                self.eval_step(params, self.t5_params, batch, jax.random.fold_in(self.eval_key, i))
                for i, batch in enumerate(self._eval_batches())
            ]
        )


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, run_steps: int | None = None
) -> dict[str, float]:
    """Trains (resuming from `workdir` when it holds a checkpoint) until `config.train.num_steps`.

    Args:
      config: the full config (`configs/magnet.py`).
      workdir: run directory (see the module docstring for its layout).
      run_steps: stop after this many steps in this invocation, checkpointing first (e.g. to fit a job's time
        limit); the schedule still spans `train.num_steps`. None = run to the end.
    Returns:
      The last logged train metrics (and `eval_*` of the last evaluation).
    Raises:
      SetupError: the config or an input it names is unusable (raised before the first step).
    """
    tc = config.train
    workdir = absolute_path(workdir)
    try:
        check_writable(workdir, what="--workdir")
        resolve_paths(config)
        run = Run(config, workdir)
        write_config(config, workdir)
    except (ValueError, TypeError, KeyError, OSError) as e:
        raise SetupError(one_line(e)) from e

    start = run.resumed_from or 0
    end = tc.num_steps if run_steps is None else min(tc.num_steps, start + run_steps)
    logging.info(
        "train: %s from step %d to %d on %d devices, mesh %s",
        "resuming" if start else "starting",
        start,
        end,
        jax.device_count(),
        dict(run.mesh.shape),
    )
    writer = metrics.MetricWriter(workdir, resume_step=start)
    writer.write_text("config", "```\n" + config.to_json(indent=2) + "\n```")
    peak, peak_source = metrics.device_peak_flops(jax.devices())
    lm_config = LMConfig.from_config(config.model)
    throughput = metrics.Throughput(
        batch_size=config.data.batch_size,
        n_q=lm_config.n_q,
        seq_len=config.data.seq_len,
        segment_seconds=config.data.segment_seconds,
        peak_flops=peak,
        num_devices=jax.device_count(),
        flops_per_step=flops.train_flops(
            lm_config, batch=config.data.batch_size, seq_len=config.data.seq_len, cond_len=config.conditioner.max_length
        ),
    )
    logging.info(
        "train: %.3g model FLOPs per step; peak %.3g FLOP/s per device (%s)",
        throughput.flops_per_step,
        peak,
        peak_source,
    )
    profiler = metrics.ProfileWindow(os.path.join(workdir, "profile"), tc.profile_start, tc.profile_steps)
    preemption = checkpointing.PreemptionWatcher()

    state, last = run.state, {}
    history, timed_steps, timer = [], 0, None
    step = start
    try:
        while step < end:
            profiler.step(step, state)
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                batch = next(run.train_iter)
                state, step_metrics = run.train_step(state, run.t5_params, batch, run.step_key)
            step += 1
            history.append(step_metrics)
            if timer is None:  # the first step compiles: time from its end
                jax.block_until_ready(step_metrics)
                logging.info("train: first step done in this process (includes compilation)")
                timer = time.perf_counter()
            else:
                timed_steps += 1
            if step % tc.log_every == 0 or step == end:
                last = metrics.summarize(history, last=LAST_VALUE_METRICS)
                if timed_steps:
                    last.update(throughput((time.perf_counter() - timer) / timed_steps))
                writer.write(step, "train", last, note=metrics.progress_note(step, end, last.get("step_time")))
                history, timed_steps = [], 0
                timer = time.perf_counter()
            if run.eval_data is not None and tc.eval_every > 0 and (step % tc.eval_every == 0 or step == tc.num_steps):
                eval_metrics = run.evaluate(state.ema_params)  # the reference validates with its EMA weights
                writer.write(step, "eval", eval_metrics)
                last.update({f"eval_{k}": v for k, v in eval_metrics.items()})
                timer = time.perf_counter()
            stop = preemption.reached(step)
            if run.checkpointer.save(step, state, run.train_iter, config, force=stop or step == end):
                timer = time.perf_counter()
            if stop:
                logging.warning("train: stopping at step %d after a preemption notice (checkpoint saved)", step)
                break
    finally:
        profiler.close(state)
        preemption.close()
        run.checkpointer.close()
        writer.close()

    export_dir = os.path.join(workdir, EXPORT_DIR)
    if step == tc.num_steps and export_step(workdir) != step:  # none yet, or of a run since continued
        dtype = "bfloat16" if config.checkpoint.export_bf16 else "float32"
        train_lib.export_params(state, export_dir, config, use_ema=True, dtype=dtype, overwrite=True)
        logging.info("train: exported EMA params (%s) to %s", dtype, export_dir)
    return last


# ---- CLI ------------------------------------------------------------------------------------------------


def main(argv: list[str]) -> None:
    del argv
    quiet_logs()
    FLAGS = flags.FLAGS
    if FLAGS.config is None or not FLAGS.workdir:
        fail("train", "--config and --workdir are required")
    if FLAGS.distributed:
        jax.distributed.initialize()
    try:
        train_and_evaluate(FLAGS.config, FLAGS.workdir, run_steps=FLAGS.run_steps)
    except SetupError as e:
        fail("train", str(e))


if __name__ == "__main__":
    config_flags.DEFINE_config_file(
        "config", None, "config file and preset, e.g. configs/magnet.py:size=small,duration=10", lock_config=True
    )
    flags.DEFINE_string("workdir", None, "run directory (local path or gs://...)")
    flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (multi-host jobs)")
    flags.DEFINE_integer(
        "run_steps",
        None,
        "stop after this many steps in this invocation (checkpoint first); the "
        "schedule still spans config.train.num_steps",
    )
    app.run(main, flags_parser=lambda argv: parse_flags(argv, prog="train"))
