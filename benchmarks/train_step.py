"""Train-step time, tokens/s and MFU of the real sharded train step on this machine's devices.

For each preset (configs/magnet.py; its optimizer, dtype and text length), a random-weight LM and a random T5 of the
preset's text-encoder shape: one warm-up step (compile), then `--steps` timed steps on a fixed batch of random codes.

  tokens/s = B·K·T / step time   (codebook tokens; audio frames/s = tokens/s ÷ K)
  MFU      = flops.train_flops(...) / (step time · peak FLOP/s per device · devices)
The peak is `magnet_jax.training.metrics.device_peak_flops`: the device table, or on CPU a float32 matmul FLOP/s,
measured just before and just after each preset's timed steps (the larger of the two: on a shared machine, the
conservative MFU).

  python benchmarks/train_step.py [--sizes=tiny,small] [--batch=tiny:8,small:1] [--steps=3] \
      [--optimizer=adamw] [--out=benchmarks/results/train_step.json]

Memory (XLA CPU, compiled memory analysis, one device): small with D-Adaptation at batch 1, T = 500 needs ~15 GB
(state 8.4 GB + temporaries 6.4 GB); with AdamW ~13 GB.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import app, flags

from configs.magnet import get_config
from magnet_jax import sharding
from magnet_jax.models import t5
from magnet_jax.models.lm import LMConfig, count_params
from magnet_jax.models.t5 import T5Config, T5Encoder
from magnet_jax.training import flops, metrics, train_lib

_SIZES = flags.DEFINE_list("sizes", ["tiny", "small"], "presets to benchmark")
_BATCH = flags.DEFINE_list("batch", ["tiny:8", "small:1"], "global batch per preset (size:batch)")
_STEPS = flags.DEFINE_integer("steps", 3, "timed steps after the warm-up step")
_DURATION = flags.DEFINE_integer("duration", 10, "segment seconds (T = 50 Hz x duration)")
_OPTIMIZER = flags.DEFINE_string("optimizer", "", "override optim.name for every preset ('' = the preset's)")
_TEXT_LEN = flags.DEFINE_integer("text_len", 0, "static text length L (0: the preset's conditioner.max_length)")
_OUT = flags.DEFINE_string("out", "benchmarks/results/train_step.json", "JSON output (a .md table is written beside)")

# T5 shapes by model width (t5-base, t5-large; the tiny preset's random encoder).
_T5_SHAPES = {
    768: dict(),
    1024: dict(d_ff=4096, num_layers=24, num_heads=16),
    32: dict(vocab_size=128, d_kv=8, d_ff=64, num_layers=2, num_heads=4),
}


def random_text_encoder(t5_dim: int, mesh, rules):
    """A random T5 encoder of the preset's shape (the benchmark needs no download), placed on `mesh`."""
    t5_config = T5Config(d_model=t5_dim, **_T5_SHAPES[t5_dim])
    tokens = jnp.zeros((1, 4), jnp.int32)
    init = jax.jit(
        lambda k: nn.meta.unbox(T5Encoder(t5_config).init(k, tokens, tokens)["params"]),
        out_shardings=t5.param_shardings(t5_config, mesh, rules),
    )
    return t5_config, init(jax.random.key(1))


def random_batch(config, t5_config: T5Config, batch: int, text_len: int, mesh, rules) -> dict:
    keys = jax.random.split(jax.random.key(2), 3)
    lengths = jax.random.randint(keys[0], (batch, 1), 4, text_len + 1)
    positions = jnp.arange(text_len)[None]
    ids = jnp.where(positions < lengths, jax.random.randint(keys[1], (batch, text_len), 2, t5_config.vocab_size), 0)
    codes = jax.random.randint(keys[2], (batch, config.model.n_q, config.data.seq_len), 0, config.model.card)
    host = {"codes": codes, "text_ids": ids.astype(jnp.int32), "text_mask": (positions < lengths).astype(jnp.int32)}
    return jax.device_put(host, sharding.batch_sharding(mesh, rules))


def benchmark(size: str, batch: int) -> dict:
    config = get_config(f"size={size},duration={_DURATION.value}")
    config.data.batch_size = batch
    config.optim.name = _OPTIMIZER.value or config.optim.name
    text_len = _TEXT_LEN.value or config.conditioner.max_length
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.logical_rules(config)
    t5_config, t5_params = random_text_encoder(config.conditioner.t5_dim, mesh, rules)
    data = random_batch(config, t5_config, batch, text_len, mesh, rules)
    state = train_lib.create_train_state(config, jax.random.key(0), mesh=mesh)
    step = train_lib.make_train_step(config, mesh, t5_config)
    key = jax.random.key(3)

    start = time.perf_counter()
    state, out = step(state, t5_params, data, key)
    jax.block_until_ready(out)
    first_s = time.perf_counter() - start
    peak_before, peak_source = metrics.device_peak_flops(list(mesh.devices.flat))
    times = []
    for _ in range(_STEPS.value):
        start = time.perf_counter()
        state, out = step(state, t5_params, data, key)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    peak = max(peak_before, metrics.device_peak_flops(list(mesh.devices.flat))[0])
    lm = LMConfig.from_config(config.model)
    model_flops = flops.train_flops(lm, batch=batch, seq_len=config.data.seq_len, cond_len=text_len)
    tokens = batch * lm.n_q * config.data.seq_len
    return {
        "size": size,
        "params_M": round(count_params(lm) / 1e6, 1),
        "optimizer": config.optim.name,
        "dtype": config.model.dtype,
        "batch": batch,
        "T": config.data.seq_len,
        "L": text_len,
        "devices": mesh.size,
        "first_step_s": round(first_s, 2),
        "step_s": round(step_s, 3),
        "step_all_s": [round(t, 3) for t in times],
        "tokens_per_s": round(tokens / step_s, 1),
        "audio_s_per_s": round(batch * config.data.segment_seconds / step_s, 3),
        "model_tflop_per_step": round(model_flops / 1e12, 4),
        "achieved_gflop_per_s": round(model_flops / step_s / 1e9, 1),
        "peak_gflop_per_s": round(peak / 1e9, 1),
        "peak_source": peak_source,
        "mfu": round(model_flops / (step_s * peak * mesh.size), 4),
        "final_loss": round(float(out["loss"]), 4),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def table(rows: list[dict]) -> str:
    cols = [
        "size",
        "params_M",
        "optimizer",
        "batch",
        "T",
        "L",
        "devices",
        "first_step_s",
        "step_s",
        "tokens_per_s",
        "audio_s_per_s",
        "model_tflop_per_step",
        "achieved_gflop_per_s",
        "peak_gflop_per_s",
        "mfu",
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv):
    del argv
    batches = dict(item.split(":") for item in _BATCH.value)
    devices = jax.devices()
    rows = []
    for size in _SIZES.value:
        rows.append(benchmark(size, int(batches.get(size, 1))))
        print(table(rows[-1:]))
    result = {
        "machine": {
            "platform": devices[0].platform,
            "device_kind": devices[0].device_kind,
            "devices": len(devices),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "jax": jax.__version__,
        },
        "steps_timed": _STEPS.value,
        "results": rows,
    }
    out = Path(_OUT.value)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, json.dumps(result, indent=2) + "\n")
    write_atomic(
        out.with_suffix(".md"),
        f"Train step on {len(devices)} {devices[0].platform} device(s) "
        f"(`python {' '.join(sys.argv)}`).\n\n{table(rows)}\n",
    )
    print(table(rows))


if __name__ == "__main__":
    app.run(main)
