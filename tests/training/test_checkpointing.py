"""Checkpoints: exact resume through `train_and_evaluate`, restore onto other meshes, retention, clear errors.

Runs on the 8 simulated CPU devices of conftest.py, with real ArrayRecord shards and a random local T5.
"""

import json
import os
import shutil
import signal

import jax
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from configs.magnet import get_config
from magnet_jax import sharding
from magnet_jax.checkpoints.t5_weights import write_random_t5
from magnet_jax.data import input_pipeline
from magnet_jax.data.records import CodeRecord
from magnet_jax.data.tokenizer import TextTokenizer
from magnet_jax.train import train_and_evaluate
from magnet_jax.training import checkpointing, train_lib

WORDS = ["calm", "piano", "bright", "synth", "slow", "drums", "warm", "pad", "fast", "bass"]


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """Runs of one config compile the same programs: a persistent cache makes the repeated runs cheap."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    saved = {
        name: getattr(jax.config, name)
        for name in ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    }
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    yield
    for name, value in saved.items():
        jax.config.update(name, value)
    cc.reset_cache()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two ArrayRecord shards of 12 records (codes [4, 60] of a 64-entry codebook, 50 Hz) and a random local T5."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    texts = []
    for shard in range(2):
        writer = ArrayRecordWriter(str(root / f"codes-p00000-of-00001-s{shard:05d}.array_record"), "group_size:1")
        for i in range(6):
            base = rng.integers(0, 64, size=(4, 1))
            codes = (base + np.arange(60) // rng.integers(1, 4)) % 64  # slow ramps: learnable structure
            text = " ".join(rng.choice(WORDS, size=4))
            texts.append(text)
            writer.write(
                CodeRecord(
                    codes=codes.astype(np.int16),
                    sample_rate=32000,
                    frame_rate=50.0,
                    card=64,
                    duration=1.2,
                    segment_seconds=1.0,
                    source=f"clip{shard}_{i}.wav",
                    metadata={"description": text},
                ).to_bytes()
            )
        writer.close()
    t5_dir = write_random_t5(root / "t5", corpus=texts * 8, vocab_size=48)
    return root, t5_dir


def tiny_config(corpus, **mesh):
    root, t5_dir = corpus
    c = get_config("size=tiny")
    c.data.train_files = str(root / "*.array_record")
    c.data.segment_seconds = 1.0
    c.data.batch_size = 8
    c.conditioner.t5 = str(t5_dir)
    c.conditioner.max_length = 16
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 2
    c.optim.ema_every = 2  # the EMA changes within a few steps, so the comparison covers it
    c.train.num_steps = 6
    c.train.log_every = 3
    c.checkpoint.every_steps = 3
    c.checkpoint.async_save = True
    c.mesh.update(mesh)
    return c


def restore(config, workdir, mesh=None, *, step=None, with_data=True):
    """(state, data iterator) restored from `workdir` onto `mesh` (default: the config's)."""
    mesh = mesh or sharding.make_mesh(config.mesh)
    abstract, shardings = train_lib.train_state_shardings(config, mesh)
    data = None
    if with_data:
        tokenizer = TextTokenizer(
            config.conditioner.t5,
            max_length=config.conditioner.max_length,
            word_dropout=config.conditioner.word_dropout,
        )
        data = input_pipeline.make_iterator(
            input_pipeline.PipelineConfig.from_config(config),
            tokenizer,
            sharding=sharding.batch_sharding(mesh, sharding.logical_rules(config)),
        )
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), config.checkpoint)
    try:
        state = ckpt.restore(checkpointing.sharded_target(abstract, shardings), data, config, step=step)
    finally:
        ckpt.close()
    return state, data


def assert_trees_equal(a, b):
    leaves_a, leaves_b = jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def stopped_at_3(corpus, tmp_path_factory):
    """(config, workdir) of a 6-step run on the mesh fsdp=8 stopped after step 3 (checkpoint saved), as a job
    killed there would leave it. Every run of this module uses this config, so compiles are shared."""
    config = tiny_config(corpus, fsdp=8)
    workdir = str(tmp_path_factory.mktemp("stopped"))
    train_and_evaluate(config, workdir, run_steps=3)
    return config, workdir


def test_resume_after_a_stop_equals_an_uninterrupted_run(stopped_at_3, tmp_path):
    config, stopped = stopped_at_3
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    train_and_evaluate(config, straight)
    shutil.copytree(stopped, split)
    first, _ = restore(config, split, with_data=False)
    assert int(first.step) == 3
    train_and_evaluate(config, split)  # the restarted job resumes from step 3 and runs 3 more

    a, data_a = restore(config, straight)
    b, data_b = restore(config, split)
    assert int(a.step) == int(b.step) == 6
    assert_trees_equal(a, b)  # params, optimizer state, EMA, step and skipped-step counters, bit for bit
    # The runs really trained: parameters and EMA moved away from step 3, and the EMA differs from the params.
    moved = jax.tree.map(lambda x, y: float(np.abs(np.asarray(x) - np.asarray(y)).max()), a.params, first.params)
    assert max(jax.tree.leaves(moved)) > 1e-3
    assert (
        max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.abs(np.asarray(x - y)).max()), a.params, a.ema_params)))
        > 0
    )
    # Data order: both iterators resume at the same next batch (the 7th), and it is not the 1st.
    batch_a, batch_b = next(data_a), next(data_b)
    for key in batch_a:
        np.testing.assert_array_equal(np.asarray(batch_a[key]), np.asarray(batch_b[key]))
    fresh = next(restore_fresh_iterator(config))
    assert not np.array_equal(np.asarray(fresh["codes"]), np.asarray(batch_a["codes"]))
    # The logged training losses of steps 4..6 are the same too.
    assert train_losses(straight)[6] == pytest.approx(train_losses(split)[6], rel=1e-6)


def restore_fresh_iterator(config):
    tokenizer = TextTokenizer(
        config.conditioner.t5, max_length=config.conditioner.max_length, word_dropout=config.conditioner.word_dropout
    )
    return input_pipeline.make_iterator(input_pipeline.PipelineConfig.from_config(config), tokenizer)


def train_losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def test_checkpoint_restores_onto_a_different_mesh_and_device_count(corpus, stopped_at_3):
    config, workdir = stopped_at_3
    saved, _ = restore(config, workdir, with_data=False)
    kernel = saved.params["blocks"]["linear1"]["kernel"]
    assert kernel.sharding.spec[1] == "fsdp" and len(kernel.sharding.device_set) == 8

    other = tiny_config(corpus, data=2, fsdp=2, tensor=2)
    mesh = sharding.make_mesh(other.mesh)
    moved, _ = restore(other, workdir, mesh, with_data=False)
    assert_trees_equal(saved, moved)
    moved_kernel = moved.params["blocks"]["linear1"]["kernel"]  # [layers, embed, mlp]
    assert tuple(moved_kernel.sharding.spec)[1:] == ("fsdp", "tensor")
    assert moved_kernel.addressable_shards[0].data.shape == (2, 32, 128)

    single = tiny_config(corpus, fsdp=1)
    one_device = sharding.make_mesh(single.mesh, jax.devices()[:1])
    alone, _ = restore(single, workdir, one_device, with_data=False)
    assert_trees_equal(saved, alone)
    assert all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(alone))


def test_checkpoint_from_another_model_is_a_clear_error(stopped_at_3):
    config, workdir = stopped_at_3
    config = config.copy_and_resolve_references()
    config.model.num_layers = 3
    with pytest.raises(checkpointing.CheckpointError, match=r"model.num_layers: checkpoint 2 vs config 3"):
        restore(config, workdir, with_data=False)


def test_keeps_the_last_n_and_every_kth_checkpoint(tmp_path):
    cfg = get_config("size=tiny").checkpoint
    cfg.update(every_steps=1, keep=2, keep_every=4, async_save=False)
    ckpt = checkpointing.Checkpointer(str(tmp_path), cfg)
    config = get_config("size=tiny")
    for step in range(1, 11):
        assert ckpt.save(step, {"w": np.full((2,), step, np.float32)}, None, config)
    ckpt.close()
    assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [4, 8, 9, 10]


def test_sigterm_marks_preemption_and_handlers_are_restored():
    previous = signal.getsignal(signal.SIGTERM)
    watcher = checkpointing.PreemptionWatcher()
    try:
        assert not watcher.reached(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert watcher.reached(2)
    finally:
        watcher.close()
    assert signal.getsignal(signal.SIGTERM) is previous


def test_bad_checkpoint_policy_is_a_clear_error(tmp_path):
    cfg = get_config("size=tiny").checkpoint
    cfg.keep = 0
    with pytest.raises(checkpointing.CheckpointError, match="keep=0"):
        checkpointing.Checkpointer(str(tmp_path), cfg)
