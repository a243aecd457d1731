r"""Input pipeline throughput (samples/s per process) against what the train step consumes.

  python benchmarks/input_pipeline.py                      # tiny train step, 0/1/2 grain workers
  python benchmarks/input_pipeline.py --sizes=tiny,small --small_batch=2 --files='/data/codes/*.array_record'

The pipeline's cost per sample does not depend on the model, and a bigger model's step consumes fewer samples/s, so
the tiny ratio is a lower bound for the other sizes. (The small step on CPU needs > 20 GB of host memory.)

Without `--files` it writes `--num_records` records of `--record_seconds` of random codes (synthetic-corpus
descriptions) with the encode job's shard writer, so only the pipeline is measured (reading, decoding, cropping,
metadata merge, T5 tokenization with word dropout, batching). The tokenizer is a sentencepiece model trained on those
descriptions (`magnet_jax.models.t5_weights.write_random_t5`) unless `--t5` names a T5 directory. The train step is the
real one (`train_lib.make_train_step`, random weights, frozen random T5 of the configured width) on this host's devices;
its consumption is global batch / step time. Prints a table and writes JSON to `--output`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from absl import app, flags

flags.DEFINE_string("files", "", "shards to read (default: synthetic records in a temporary directory)")
flags.DEFINE_string("t5", "", "T5 directory for the pipeline's tokenizer (default: one trained on the descriptions)")
flags.DEFINE_integer("num_records", 256, "synthetic records")
flags.DEFINE_float("record_seconds", 30.0, "length of each synthetic record")
flags.DEFINE_list("workers", ["0", "1", "2"], "grain worker counts to measure")
flags.DEFINE_integer("batches", 40, "timed batches per worker count (after 5 warm-up batches)")
flags.DEFINE_list("sizes", ["tiny"], "config sizes whose train step is timed (tiny, small, ...)")
flags.DEFINE_integer("small_batch", 2, "global batch for the train step of sizes other than tiny (CPU memory)")
flags.DEFINE_integer("steps", 5, "timed train steps (after 2 warm-up steps)")
flags.DEFINE_string("output", "benchmarks/results/input_pipeline.json", "JSON results")
FLAGS = flags.FLAGS


def synthetic_shards(directory: Path, num_records: int, seconds: float, card: int) -> str:
    from data_pipelines import synthetic_corpus
    from data_pipelines.encode_audio import write_shard
    from magnet_jax.data.records import CodeRecord, normalize_metadata, shard_name

    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    records = []
    for i in range(num_records):
        spec = synthetic_corpus.draw_spec(rng)
        records.append(
            CodeRecord(
                codes=rng.integers(0, card, (4, int(seconds * 50))).astype(np.int16),
                sample_rate=32000,
                frame_rate=50.0,
                card=card,
                duration=seconds,
                segment_seconds=10.0,
                source=f"clip_{i:05d}.wav",
                metadata=normalize_metadata(spec.sidecar(f"clip {i}")),
            ).to_bytes()
        )
    per_shard = 64
    for s in range(0, num_records, per_shard):
        write_shard(directory / shard_name(0, 1, s // per_shard), records[s : s + per_shard])
    return str(directory / "*.array_record")


def pipeline_rate(settings, tokenizer, batches: int) -> dict:
    from magnet_jax.data import input_pipeline

    iterator = input_pipeline.make_iterator(settings, tokenizer, process_index=0, process_count=1)
    start = time.perf_counter()
    for _ in range(5):
        next(iterator)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    elapsed = time.perf_counter() - start
    iterator.close()
    return {
        "workers": settings.worker_count,
        "samples_per_s": batches * settings.global_batch_size / elapsed,
        "startup_s": first,
    }


def train_step_rate(size: str, t5_dir: str, batch: int, steps: int) -> dict:
    import jax

    from configs.magnet import get_config
    from magnet_jax import sharding
    from magnet_jax.checkpoints.t5_weights import load_t5
    from magnet_jax.models import t5
    from magnet_jax.training import train_lib

    config = get_config(f"size={size}")
    config.data.batch_size = batch
    config.mesh.fsdp = -1
    config.conditioner.t5 = t5_dir
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.logical_rules(config)
    t5_config, t5_params = load_t5(t5_dir)
    t5_params = jax.device_put(t5_params, t5.param_shardings(t5_config, mesh, rules))
    state = train_lib.create_train_state(config, jax.random.key(0), mesh=mesh)
    step = train_lib.make_train_step(config, mesh, t5_config)
    rng = np.random.default_rng(0)
    put = sharding.batch_sharding(mesh, rules)
    codes = rng.integers(0, config.codec.card, (batch, 4, config.data.seq_len)).astype(np.int32)
    data = {
        "codes": jax.device_put(codes, put),
        "text_ids": jax.device_put(np.tile(np.arange(2, 34, dtype=np.int32), (batch, 1)), put),
        "text_mask": jax.device_put(np.ones((batch, 32), np.int32), put),
    }
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        state, metrics = step(state, t5_params, data, jax.random.key(i))
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times[2:])
    return {
        "size": size,
        "global_batch": batch,
        "seq_len": config.data.seq_len,
        "step_s": step_s,
        "samples_per_s": batch / step_s,
        "devices": len(jax.devices()),
    }


def main(argv):
    del argv
    with tempfile.TemporaryDirectory(prefix="pipeline_bench_") as tmp:
        results = benchmark(Path(tmp))
    out = Path(FLAGS.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")


def benchmark(work: Path) -> dict:
    """Measures the pipeline and the train steps, prints the table, returns the results."""
    from configs.magnet import get_config
    from magnet_jax.checkpoints.t5_weights import write_random_t5
    from magnet_jax.data import input_pipeline
    from magnet_jax.data.records import CodeRecord, read_header
    from magnet_jax.data.tokenizer import TextTokenizer

    files = FLAGS.files or synthetic_shards(
        work / "codes", FLAGS.num_records, FLAGS.record_seconds, get_config("size=tiny").codec.card
    )
    source = input_pipeline.open_source(files)
    descriptions = [CodeRecord.from_bytes(source[i]).description or "" for i in range(min(len(source), 256))]
    results = {"host": platform.node(), "cpus": os.cpu_count(), "records": len(source), "pipeline": [], "train": []}

    def random_t5(width: int, layers: int) -> str:  # random T5 encoder + a tokenizer of the descriptions
        path = work / f"t5_{width}"
        if not path.is_dir():
            heads = max(4, width // 64)
            write_random_t5(
                path,
                corpus=descriptions * 4,
                d_model=width,
                num_layers=layers,
                num_heads=heads,
                d_kv=width // heads,
                d_ff=4 * width,
                vocab_size=1000,
            )
        return str(path)

    for size in FLAGS.sizes:
        size_config = get_config(f"size={size}")
        batch = size_config.data.batch_size if size == "tiny" else FLAGS.small_batch
        layers = 2 if size == "tiny" else 12  # t5-base depth for the real sizes
        results["train"].append(
            train_step_rate(size, random_t5(size_config.conditioner.t5_dim, layers), batch, FLAGS.steps)
        )

    config = get_config("size=tiny")  # the pipeline settings: 10 s crops, batch 8, word dropout 0.3, merge 0.25
    config.data.train_files = files
    tokenizer = TextTokenizer(
        FLAGS.t5 or random_t5(config.conditioner.t5_dim, 2),
        max_length=config.conditioner.max_length,
        word_dropout=config.conditioner.word_dropout,
    )
    head = read_header(source[0])  # the codec the records come from
    base = dataclasses.replace(
        input_pipeline.PipelineConfig.from_config(config, train=True),
        sample_rate=head["sample_rate"],
        frame_rate=head["frame_rate"],
        card=head["card"],
        n_q=head["codes_shape"][0],
    )
    for workers in map(int, FLAGS.workers):
        settings = dataclasses.replace(base, worker_count=workers)
        results["pipeline"].append(pipeline_rate(settings, tokenizer, FLAGS.batches))

    print(
        f"\nrecords: {len(source)}, crop {base.seq_len} frames, batch "
        f"{base.global_batch_size}, text {base.max_text_len} tokens, host cpus {os.cpu_count()}"
    )
    print(f"{'pipeline':<24}{'samples/s':>12}{'startup s':>12}")
    for r in results["pipeline"]:
        print(f"{str(r['workers']) + ' workers':<24}{r['samples_per_s']:>12.1f}{r['startup_s']:>12.2f}")
    print(f"{'train step':<24}{'samples/s':>12}{'step s':>12}{'best pipeline / step':>24}")
    best = max(r["samples_per_s"] for r in results["pipeline"])
    for r in results["train"]:
        r["pipeline_over_step"] = best / r["samples_per_s"]
        print(
            f"{r['size'] + ' (batch ' + str(r['global_batch']) + ')':<24}{r['samples_per_s']:>12.1f}"
            f"{r['step_s']:>12.3f}{r['pipeline_over_step']:>23.1f}x"
        )
    return results


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    app.run(main)
