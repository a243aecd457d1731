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
  metrics.jsonl         one JSON object per logged (split, step: train, eval, eval_audio); `tensorboard/` event files
                        of the same scalars
  profile/              `jax.profiler` traces of steps [train.profile_start, + train.profile_steps)
  checkpoints.corrupt/  steps that failed verification on resume, moved aside (docs/design.md §5.3.1)
  config_changes.jsonl  config changes accepted with --allow_config_change
  .lock                 the running trainer (host, pid); a second one exits 2
  export/               params-only export (EMA weights; bfloat16 with checkpoint.export_bf16) in the
                        `magnet_jax.checkpoints.pretrained` format that generation loads, written when training
                        completes (rewritten when a run is continued to a larger train.num_steps)
"""

from __future__ import annotations

import contextlib
import json
import os
import time

import jax
import ml_collections
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from magnet_jax import api, sharding
from magnet_jax.checkpoints.pretrained import config_from_training
from magnet_jax.checkpoints.sources import CHECKPOINTS_DIR, EXPORT_DIR, WORKDIR_CONFIG, export_step
from magnet_jax.checkpoints.t5_weights import load_t5
from magnet_jax.cli import define_distributed_flags, fail, initialize_distributed, one_line, parse_flags, quiet_logs
from magnet_jax.data import input_pipeline
from magnet_jax.data.records import RecordError
from magnet_jax.data.tokenizer import TextTokenizer
from magnet_jax.evaluation import scoring, vggish
from magnet_jax.evaluation.captions import read_captions
from magnet_jax.fileio import (
    LockError,
    WeightsError,
    absolute_path,
    check_writable,
    directory_lock,
    flatten_dict,
    local_source,
    write_atomic,
)
from magnet_jax.models import t5
from magnet_jax.models.lm import LMConfig
from magnet_jax.training import checkpointing, flops, guard, metrics, train_lib

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


class AudioEvaluation:
    """`train.eval_metrics`: the fixed prompt set `train.eval_prompts` generated with the EMA weights (the config's
    `generate` settings, seed `train.eval_seed`) and scored with the embedders of `train.eval_audio` against
    `train.eval_reference` (FAD, KL) and the captions (CLAP). Everything it reads is checked when it is built."""

    def __init__(self, config: ml_collections.ConfigDict):
        tc = config.train
        self.config = config
        self.metrics = scoring.check_metrics(tc.eval_metrics, field="train.eval_metrics")
        if not tc.eval_prompts:
            raise SetupError(f"train.eval_metrics={list(self.metrics)}: train.eval_prompts (a captions file) is empty")
        self.captions = read_captions(tc.eval_prompts)
        scoring.check_weight_files(tc.eval_audio, self.metrics, prefix="train.eval_audio.")
        if {"fad", "kl"} & set(self.metrics) and not tc.eval_reference:
            raise SetupError(f"train.eval_metrics={list(self.metrics)}: fad and kl need train.eval_reference")
        if "fad" in self.metrics:
            windows = len(self.captions) * vggish.vggish_windows(
                int(config.generate.duration * config.codec.sample_rate), config.codec.sample_rate
            )
            if windows <= vggish.EMBEDDING_SIZE:
                raise SetupError(
                    f"train.eval_prompts={tc.eval_prompts}: {len(self.captions)} samples of "
                    f"{config.generate.duration:g} s give {windows} VGGish windows; FAD needs more than "
                    f"{vggish.EMBEDDING_SIZE} (more prompts or longer samples)"
                )
        self.embedders = scoring.Embedders(tc.eval_audio, self.metrics)
        self.reference = None
        if {"fad", "kl"} & set(self.metrics):  # embedded once, in memory
            ids = [c.id for c in self.captions]
            self.reference = scoring.reference_of(
                self.embedders, tc.eval_reference, self.metrics, ids, scoring.MemoryCache()
            )
        self.texts = self.embedders.embed_texts([c.text for c in self.captions]) if "clap" in self.metrics else None
        self.model: api.MAGNeT | None = None

    def __call__(self, step: int, ema_params) -> dict[str, float]:
        """Generates the prompt set with `ema_params` and returns the configured metrics."""
        if self.model is None:  # built once (T5, codec, mesh); later evaluations only swap the LM params
            c = self.config
            self.model = api.MAGNeT(
                config_from_training(c, step=step, weights="ema", dtype=c.model.param_dtype, source="training"),
                ema_params,
                api.make_settings(dtype=c.model.dtype, text_length=c.conditioner.max_length),
            )
        else:
            placed = jax.tree.map(lambda x: x.sharding, self.model.lm_params)
            self.model.lm_params = jax.device_put(ema_params, placed)
        audio = self.model.generate([c.text for c in self.captions], seed=self.config.train.eval_seed).audio[:, 0]
        names = [c.name for c in self.captions]
        embedded = {n: self.embedders.embed(n, audio, self.model.sample_rate, names) for n in self.embedders.names}
        scores = {}
        if "fad" in self.metrics:
            scores["fad"] = scoring.fad(self.reference.statistics, embedded["vggish"], source="train.eval_prompts")
        if "kl" in self.metrics:
            probs = [self.reference.label_probs.get(c.id) for c in self.captions]
            scores["kl"] = scoring.kl_scores(probs, embedded["passt"]).mean
        if "clap" in self.metrics:
            scores["clap"] = scoring.clap_scores(embedded["clap"], self.texts)[1]
        return scores


def resolve_paths(config: ml_collections.ConfigDict) -> None:
    """Makes the config's user-given paths absolute in place (`~` and relative ones; hub ids and URLs are kept), so
    checkpoints, config.json and the export name them from any working directory."""
    for section, key, resolve in (
        ("data", "train_files", absolute_path),
        ("data", "eval_files", absolute_path),
        ("conditioner", "t5", local_source),
        ("codec", "source", local_source),
        ("train", "init_from", local_source),
        ("train", "eval_prompts", absolute_path),
        ("train", "eval_reference", absolute_path),
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
        # audio metrics: prompts, weights and reference checked (and embedded) before anything else is built
        self.audio_eval = AudioEvaluation(config) if tc.get("eval_metrics") else None
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
        self.resumed_from, self.state = None, None
        tried = bool(self.checkpointer.steps())
        if tried:  # the newest step that verifies; None when none does
            target = checkpointing.sharded_target(abstract, self.state_shardings)
            self.state = self.checkpointer.restore(target, self.train_iter, config)
        if self.state is None:
            if tried:  # a step rejected after its restore may have moved the iterator
                self.train_iter = input_pipeline.make_iterator(
                    self.train_data, self.tokenizer, sharding=self.batch_sharding
                )
            self.state = train_lib.create_train_state(config, self.init_key, mesh=self.mesh)
        else:
            self.resumed_from = self.checkpointer.restored_step
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


# Config fields a resumed run may change without --allow_config_change: the length of the run (the schedule's
# total follows it), logging, evaluation and profiling cadence, checkpoint cadence and retention, input speed.
RESUMABLE_CHANGES = (
    "train.num_steps",
    "optim.total_steps",
    "train.log_every",
    "train.eval_every",
    "train.eval_steps",
    "train.profile_start",
    "train.profile_steps",
    "checkpoint.every_steps",
    "checkpoint.keep",
    "checkpoint.keep_every",
    "checkpoint.async_save",
    "checkpoint.on_corrupt",
    "data.worker_count",
    "data.prefetch",
)
CONFIG_CHANGES = "config_changes.jsonl"


def check_config_change(config: ml_collections.ConfigDict, workdir: str, *, allow: bool) -> None:
    """Refuses to continue a workdir whose `config.json` differs from `config` beyond `RESUMABLE_CHANGES`, unless
    `allow`; an allowed change is appended to `<workdir>/config_changes.jsonl` (time; each field: [old, new])."""
    path = epath.Path(workdir) / WORKDIR_CONFIG
    if not path.exists():
        return
    try:
        stored = flatten_dict(json.loads(path.read_text()), sep=".")
    except (OSError, ValueError) as e:
        raise SetupError(f"{path}: unreadable ({one_line(e)}); restore it or start another workdir") from e
    current = flatten_dict(checkpointing.config_to_json(config), sep=".")
    diffs = {
        k: [stored.get(k), current.get(k)]
        for k in sorted(set(stored) | set(current))
        if stored.get(k) != current.get(k) and k not in RESUMABLE_CHANGES
    }
    if not diffs:
        return
    listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diffs.items())
    if not allow:
        raise SetupError(
            f"{workdir} was trained with another config ({listed}); rerun with the same config, pass "
            "--allow_config_change to continue with the new one (recorded in config_changes.jsonl), or use another "
            "workdir"
        )
    logging.warning("train: continuing %s with a changed config (%s)", workdir, listed)
    if jax.process_index() == 0:
        log = epath.Path(workdir) / CONFIG_CHANGES
        previous = log.read_text() if log.exists() else ""
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "changes": diffs}
        write_atomic(log, previous + json.dumps(entry) + "\n")


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    run_steps: int | None = None,
    allow_config_change: bool = False,
    force_unlock: bool = False,
) -> dict[str, float]:
    """Trains (resuming from `workdir` when it holds a checkpoint) until `config.train.num_steps`.

    Args:
      config: the full config (`configs/magnet.py`).
      workdir: run directory (see the module docstring for its layout).
      run_steps: stop after this many steps in this invocation, checkpointing first (e.g. to fit a job's time
        limit); the schedule still spans `train.num_steps`. None = run to the end.
      allow_config_change: continue a workdir whose config differs beyond `RESUMABLE_CHANGES` (recorded).
      force_unlock: take the workdir's lock even when another host holds it.
    Returns:
      The last logged train metrics (and `eval_*` of the last evaluation).
    Raises:
      SetupError: the config or an input it names is unusable, the workdir is locked or was trained with another
        config (raised before the first step).
      guard.DivergenceError: the run diverged (nothing is saved or exported from the diverged state).
    """
    workdir = absolute_path(workdir)
    try:
        check_writable(workdir, what="--workdir")
        resolve_paths(config)
    except (ValueError, TypeError, KeyError, OSError) as e:
        raise SetupError(one_line(e)) from e
    lock = directory_lock(workdir, force=force_unlock) if jax.process_index() == 0 else contextlib.nullcontext()
    try:
        with lock:
            check_config_change(config, workdir, allow=allow_config_change)
            return _train(config, workdir, run_steps)
    except LockError as e:  # raised only when taking the lock
        raise SetupError(str(e)) from None


def _train(config: ml_collections.ConfigDict, workdir: str, run_steps: int | None) -> dict[str, float]:
    tc = config.train
    preemption = checkpointing.PreemptionWatcher()
    logging.info("train: setting up the run in %s", workdir)
    try:
        with preemption.during_setup():
            run = Run(config, workdir)
            write_config(config, workdir)
    except (ValueError, TypeError, KeyError, OSError) as e:
        preemption.close()
        raise SetupError(one_line(e)) from e
    except checkpointing.Interrupted as e:
        preemption.close()
        logging.warning("train: stopped by signal %d during setup; nothing was trained", e.signum)
        return {}

    start = run.resumed_from or 0
    if preemption.reached(start):  # a multi-process job told to stop during its setup
        preemption.close()
        run.checkpointer.close()
        logging.warning("train: stopped by a preemption notice during setup; nothing was trained")
        return {}
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

    state, last = run.state, {}
    history, timed_steps, timer, in_flight = [], 0, None, None
    run_timer, run_start = None, start
    step = start
    divergence = guard.DivergenceGuard(tc, skipped_before=int(jax.device_get(state.skipped_steps)))
    try:
        while step < end:
            profiler.step(step, state)
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                batch = next(run.train_iter)
                state, step_metrics = run.train_step(state, run.t5_params, batch, run.step_key)
            # At most one step in flight: the loop never runs ahead of the devices, so a stop signal is acted on
            # (a checkpoint of this step) within one step.
            jax.block_until_ready(in_flight)
            in_flight = step_metrics
            step += 1
            history.append(step_metrics)
            if timer is None:  # the first step compiles: time from its end
                jax.block_until_ready(step_metrics)
                logging.info("train: first step done in this process (includes compilation)")
                timer = run_timer = time.perf_counter()
                run_start = step
            else:
                timed_steps += 1
            if step % tc.log_every == 0 or step == end:
                last = metrics.summarize(history, last=LAST_VALUE_METRICS)
                if timed_steps:
                    last.update(throughput((time.perf_counter() - timer) / timed_steps))
                # the ETA is wall time per step since the first step: evaluations and checkpoint saves included
                wall_per_step = (time.perf_counter() - run_timer) / (step - run_start) if step > run_start else None
                writer.write(step, "train", last, note=metrics.progress_note(step, end, wall_per_step))
                divergence.observe(step - len(history) + 1, history)  # raises before anything is saved
                history = []
                timer, timed_steps = time.perf_counter(), 0
            if run.eval_data is not None and tc.eval_every > 0 and (step % tc.eval_every == 0 or step == tc.num_steps):
                eval_metrics = run.evaluate(state.ema_params)  # the reference validates with its EMA weights
                writer.write(step, "eval", eval_metrics)
                last.update({f"eval_{k}": v for k, v in eval_metrics.items()})
                timer, timed_steps = time.perf_counter(), 0  # step_time leaves out evaluations and saves
            if run.audio_eval is not None and tc.eval_every > 0 and (step % tc.eval_every == 0 or step == tc.num_steps):
                audio_metrics = run.audio_eval(step, state.ema_params)
                writer.write(step, "eval_audio", audio_metrics)
                last.update({f"eval_audio_{k}": v for k, v in audio_metrics.items()})
                timer, timed_steps = time.perf_counter(), 0  # step_time leaves out evaluations and saves
            stop = preemption.reached(step)
            if run.checkpointer.save(step, state, run.train_iter, config, force=stop or step == end):
                timer, timed_steps = time.perf_counter(), 0  # step_time leaves out evaluations and saves
            if stop:
                logging.warning("train: stopping at step %d after a preemption notice (checkpoint saved)", step)
                break
    finally:
        profiler.close(state)
        preemption.close()
        run.checkpointer.close()
        writer.close()

    skipped = getattr(run.train_iter, "bad_records", None)
    if skipped is not None and skipped.skipped:
        logging.warning(
            "data: skipped %d bad record(s) in this run: %s",
            len(skipped.skipped),
            "; ".join(f"{where}: {why}" for where, why in skipped.skipped.items()),
        )
    export_dir = os.path.join(workdir, EXPORT_DIR)
    if step == tc.num_steps and export_step(workdir) != step:  # none yet, or of a run since continued
        dtype = "bfloat16" if config.checkpoint.export_bf16 else "float32"
        try:
            train_lib.export_params(state, export_dir, config, use_ema=True, dtype=dtype, overwrite=True)
        except WeightsError as e:  # non-finite params
            raise guard.DivergenceError(str(e)) from e
        except Exception as e:  # orbax / tensorstore / OS errors while writing: one line naming the directory
            raise checkpointing.saving_error(export_dir, e) from e
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
        initialize_distributed("train")
    try:
        train_and_evaluate(
            FLAGS.config,
            FLAGS.workdir,
            run_steps=FLAGS.run_steps,
            allow_config_change=FLAGS.allow_config_change,
            force_unlock=FLAGS.force_unlock,
        )
    except (SetupError, checkpointing.CheckpointError, RecordError) as e:
        fail("train", str(e))
    except guard.DivergenceError as e:
        fail("train", str(e), status=3)
    except OSError as e:  # metrics, config or lock writes (a full disk, a read-only mount): one line with the path
        fail("train", one_line(e))


if __name__ == "__main__":
    config_flags.DEFINE_config_file(
        "config", None, "config file and preset, e.g. configs/magnet.py:size=small,duration=10", lock_config=True
    )
    flags.DEFINE_string("workdir", None, "run directory (local path or gs://...)")
    define_distributed_flags()
    flags.DEFINE_integer(
        "run_steps",
        None,
        "stop after this many steps in this invocation (checkpoint first); the "
        "schedule still spans config.train.num_steps",
    )
    flags.DEFINE_bool(
        "allow_config_change",
        False,
        "continue a workdir whose config.json differs (beyond run length, logging and checkpoint cadence); the "
        "change is recorded in config_changes.jsonl",
    )
    flags.DEFINE_bool("force_unlock", False, "take the workdir's lock even if a job on another host holds it")
    app.run(main, flags_parser=lambda argv: parse_flags(argv, prog="train"))
