"""LM compile and forward times on this machine's default backend.

- tiny and small presets (configs/magnet.py), batch 2, T = 500 (10 s at 50 Hz), stage 1 (band attention; stage is a
  traced argument so one program serves every stage): lowering + compile time, then the median of timed forwards;
- nn.scan vs an unrolled layer loop for a 48-layer medium-shaped model: lowering + compile time only (abstract
  arguments, no parameters are allocated).

  python benchmarks/lm_forward.py [--sizes=tiny,small] [--repeats=3] [--out=benchmarks/results/lm_forward.json]
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import app, flags

from configs.magnet import get_config
from magnet_jax.models.lm import LanguageModel, LMConfig, count_params, init_params
from magnet_jax.training.flops import forward_flops

_SIZES = flags.DEFINE_list("sizes", ["tiny", "small"], "presets to time end to end")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed forwards per size (after one warm-up)")
_BATCH = flags.DEFINE_integer("batch", 2, "batch size")
_LENGTH = flags.DEFINE_integer("length", 500, "frames T")
_COND_LENGTH = flags.DEFINE_integer("cond_length", 20, "text tokens L")
_OUT = flags.DEFINE_string("out", "benchmarks/results/lm_forward.json", "JSON output")


def forward_fn(config: LMConfig):
    model = LanguageModel(config)

    def forward(params, codes, states, mask, stage):
        condition = model.apply({"params": params}, states, mask, method=model.project_condition)
        return model.apply({"params": params}, codes, condition, None, stage)

    return forward


def abstract_inputs(config: LMConfig, params):
    b, t, length = _BATCH.value, _LENGTH.value, _COND_LENGTH.value
    return (
        params,
        jax.ShapeDtypeStruct((b, config.n_q, t), jnp.int32),
        jax.ShapeDtypeStruct((b, length, config.cond_dim), jnp.float32),
        jax.ShapeDtypeStruct((b, length), jnp.int32),
        jax.ShapeDtypeStruct((), jnp.int32),
    )


def compile_times(config: LMConfig, params) -> tuple[float, float, jax.stages.Compiled]:
    start = time.perf_counter()
    lowered = jax.jit(forward_fn(config)).lower(*abstract_inputs(config, params))
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    return lowered_at - start, time.perf_counter() - lowered_at, compiled


def time_size(size: str) -> dict:
    config = LMConfig.from_config(get_config(f"size={size}").model)
    params = jax.jit(lambda k: nn.meta.unbox(init_params(LanguageModel(config), k)))(jax.random.key(0))
    lower_s, compile_s, compiled = compile_times(config, params)
    keys = jax.random.split(jax.random.key(1), 2)
    codes = jax.random.randint(keys[0], (_BATCH.value, config.n_q, _LENGTH.value), 0, config.card + 1)
    states = jax.random.normal(keys[1], (_BATCH.value, _COND_LENGTH.value, config.cond_dim))
    mask = jnp.ones((_BATCH.value, _COND_LENGTH.value), jnp.int32)
    stage = jnp.int32(1)
    compiled(params, codes, states, mask, stage).block_until_ready()  # warm-up
    times = []
    for _ in range(_REPEATS.value):
        start = time.perf_counter()
        compiled(params, codes, states, mask, stage).block_until_ready()
        times.append(time.perf_counter() - start)
    forward_s = statistics.median(times)
    gflop = forward_flops(config, batch=_BATCH.value, seq_len=_LENGTH.value, cond_len=_COND_LENGTH.value) / 1e9
    return {
        "size": size,
        "params_M": round(count_params(config) / 1e6, 1),
        "lower_s": round(lower_s, 2),
        "compile_s": round(compile_s, 2),
        "forward_s": round(forward_s, 3),
        "forward_all_s": [round(t, 3) for t in times],
        "gflop": round(gflop, 1),
        "gflop_per_s": round(gflop / forward_s, 1),
    }


def time_layer_loop() -> list[dict]:
    rows = []
    for scan_layers in (True, False):
        config = LMConfig.from_config({**get_config("size=medium").model, "scan_layers": scan_layers})
        params = jax.eval_shape(lambda k: nn.meta.unbox(init_params(LanguageModel(config), k)), jax.random.key(0))
        lower_s, compile_s, _ = compile_times(config, params)
        rows.append(
            {
                "model": f"medium-shaped, {config.num_layers} layers",
                "scan_layers": scan_layers,
                "lower_s": round(lower_s, 2),
                "compile_s": round(compile_s, 2),
            }
        )
    return rows


def main(argv):
    del argv
    device = jax.devices()[0]
    result = {
        "device": f"{device.platform}: {device.device_kind}",
        "num_devices": jax.device_count(),
        "host": platform.processor() or platform.machine(),
        "jax": jax.__version__,
        "batch": _BATCH.value,
        "length": _LENGTH.value,
        "cond_length": _COND_LENGTH.value,
        "forward": [time_size(s) for s in _SIZES.value],
        "layer_loop_compile": time_layer_loop(),
    }
    print(f"device {result['device']}; batch {_BATCH.value}, T {_LENGTH.value}, L {_COND_LENGTH.value}, stage 1")
    print(f"{'size':8} {'params M':>9} {'lower s':>8} {'compile s':>10} {'forward s':>10} {'GFLOP':>8} {'GFLOP/s':>8}")
    for r in result["forward"]:
        print(
            f"{r['size']:8} {r['params_M']:9.1f} {r['lower_s']:8.2f} {r['compile_s']:10.2f} {r['forward_s']:10.3f} "
            f"{r['gflop']:8.1f} {r['gflop_per_s']:8.1f}"
        )
    print(f"\n{'model':28} {'scan':>5} {'lower s':>8} {'compile s':>10}")
    for r in result["layer_loop_compile"]:
        print(f"{r['model']:28} {str(r['scan_layers']):>5} {r['lower_s']:8.2f} {r['compile_s']:10.2f}")
    out = Path(_OUT.value)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    app.run(main)
