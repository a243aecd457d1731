"""The paper's latency / throughput trade-off: MAGNeT (non-autoregressive) vs MusicGen (autoregressive, KV cache).

For one model size and one audio length, on this machine's default JAX device, per batch size: the latency of one
generation call (seconds for the whole batch) and the throughput (samples per second) of

  magnet           MAGNeT decoding, steps [20, 10, 10, 10], top-p 0.9, temperature 3, CFG 10 -> 1 (2B rows / pass)
  magnet+rescore   the same with the MusicGen rescorer (one teacher-forced MusicGen pass per decoding step)
  hybrid           Hybrid-MAGNeT: `--prefix_seconds` generated autoregressively, the rest by MAGNeT decoding
  musicgen         MusicGen: T + K - 1 KV-cache steps, top-k 250, CFG 3.0 (2B rows / step)

All models have the same architecture (`--size`, random weights: speed does not depend on them) and read the
same random T5-shaped conditioning (the text encoder and EnCodec are outside the timed region for every method).
Compile time is reported separately (first call); the methods are then timed alternately, `--repeats` rounds.

  python benchmarks/nar_vs_ar.py                                     # CPU default: 256x4 model, 5 s, batch 1..64
  python benchmarks/nar_vs_ar.py --size=small --duration=10          # the paper's setting, on an accelerator
  python benchmarks/nar_vs_ar.py --methods=magnet,musicgen --batch_sizes=1,8,64

Prints a table with the MAGNeT / MusicGen latency ratio at batch 1 (the paper reports x7 on a GPU) and writes
`benchmarks/results/nar_vs_ar.json` and `.png` (latency vs throughput, one point per batch size, as the paper's
figure; and latency vs batch size).
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from timing import BENCH_SIZES, batch_axis, compile_seconds, interleaved, lm_config, machine, save_figure, write_results

from magnet_jax.generation import musicgen
from magnet_jax.generation.decoding import DecodeParams, generate_codes
from magnet_jax.generation.hybrid import generate_hybrid_codes
from magnet_jax.models.conditioner import TextConditioning
from magnet_jax.models.lm import LanguageModel, cast_params, count_params, init_params

METHODS = ("magnet", "magnet+rescore", "hybrid", "musicgen")
_SIZE = flags.DEFINE_string("size", "256x4", f"model: <dim>x<layers> or a preset ({', '.join(BENCH_SIZES)})")
_DURATION = flags.DEFINE_float("duration", 5.0, "seconds of audio (50 frames per second)")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "2", "4", "8", "16", "32", "64"], "batch sizes")
_METHODS = flags.DEFINE_list("methods", list(METHODS), f"any of {', '.join(METHODS)}")
_STEPS = flags.DEFINE_list("steps", ["20", "10", "10", "10"], "MAGNeT decoding steps per codebook")
_PREFIX_SECONDS = flags.DEFINE_float("prefix_seconds", 1.0, "hybrid: seconds generated autoregressively")
_COND_LENGTH = flags.DEFINE_integer("cond_length", 16, "text tokens per description")
_REPEATS = flags.DEFINE_integer("repeats", 1, "timed calls per point and method")
_DTYPE = flags.DEFINE_string("dtype", "float32", "compute dtype (bfloat16 on accelerators)")
_ATTENTION = flags.DEFINE_enum(
    "attention", "auto", ["auto", "xla", "cudnn", "splash"], "attention kernel (model.attention)"
)
_OUT = flags.DEFINE_string("out", "benchmarks/results/nar_vs_ar", "output path without extension")

FRAME_RATE = 50


def build_runners(methods, batch: int, magnet_model, magnet_params, ar_model, ar_params, dp: DecodeParams, length: int):
    """`{method: fn()}` running one generation of `batch` rows to completion."""
    rng = np.random.default_rng(batch)
    states = jnp.asarray(rng.normal(size=(batch, _COND_LENGTH.value, magnet_model.config.cond_dim)), jnp.float32)
    cond = TextConditioning(states, jnp.ones(states.shape[:2], jnp.int32), None)
    key = jax.random.key(0)
    runners = {}
    if "magnet" in methods:
        runners["magnet"] = lambda: generate_codes(magnet_model, magnet_params, cond, key, dp, length=length)
    if "magnet+rescore" in methods:
        runners["magnet+rescore"] = lambda: generate_codes(
            magnet_model, magnet_params, cond, key, dp, length=length, rescorer=(ar_model, ar_params)
        )
    if "hybrid" in methods:
        prefix_frames = int(_PREFIX_SECONDS.value * FRAME_RATE)
        runners["hybrid"] = lambda: generate_hybrid_codes(
            magnet_model, magnet_params, cond, key, dp, length=length, prefix_frames=prefix_frames
        )
    if "musicgen" in methods:
        run_ar = jax.jit(functools.partial(_musicgen, ar_model, length))
        runners["musicgen"] = lambda: run_ar(ar_params, cond, key)
    return {m: _blocking(fn) for m, fn in runners.items()}


def _musicgen(model: LanguageModel, length: int, params, cond: TextConditioning, key):
    rows = jnp.concatenate([cond.states, jnp.zeros_like(cond.states)])  # [cond; null]: CFG 3.0
    mask = jnp.concatenate([cond.mask, jnp.zeros_like(cond.mask)])
    condition = model.apply({"params": params}, rows, mask, method=model.project_condition)
    return musicgen.generate_ar(
        model, params, condition, None, key, length=length, cfg_coef=3.0, sample_fn=musicgen.sampler(top_k=250)
    )


def _blocking(fn):
    return lambda: jax.block_until_ready(fn())


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_trade, ax_latency) = plt.subplots(1, 2, figsize=(11, 4.2))
    for method in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == method]
        ax_trade.plot([r["throughput"] for r in rs], [r["latency_s"] for r in rs], "o-", label=method)
        for r in rs:
            ax_trade.annotate(
                str(r["batch"]),
                (r["throughput"], r["latency_s"]),
                fontsize=7,
                textcoords="offset points",
                xytext=(3, 3),
            )
        ax_latency.plot([r["batch"] for r in rs], [r["latency_s"] for r in rs], "o-", label=method)
    ax_trade.set(
        xscale="log",
        yscale="log",
        xlabel="throughput (samples / s)",
        ylabel="latency (s)",
        title="latency vs throughput (labels: batch size)",
    )
    ax_latency.set(yscale="log", xlabel="batch size", ylabel="latency (s)", title="latency")
    batch_axis(ax_latency, sorted({r["batch"] for r in rows}))
    save_figure(fig, (ax_trade, ax_latency), path, title)


def main(argv):
    del argv
    methods = [m for m in _METHODS.value]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise app.UsageError(f"--methods: unknown {', '.join(unknown)}; expected some of {', '.join(METHODS)}")
    magnet_config = lm_config(
        _SIZE.value, dtype=_DTYPE.value, param_dtype=_DTYPE.value, attention=_ATTENTION.value
    )  # params held in the compute dtype
    ar_config = dataclasses.replace(magnet_config, causal=True)
    magnet_model, ar_model = LanguageModel(magnet_config), LanguageModel(ar_config)
    magnet_params = jax.tree.map(jnp.asarray, init_params(magnet_model, jax.random.key(0)))
    ar_params = jax.tree.map(jnp.asarray, init_params(ar_model, jax.random.key(1)))
    magnet_params, ar_params = cast_params(
        jax.tree.map(
            lambda x: x.unbox() if hasattr(x, "unbox") else x,
            (magnet_params, ar_params),
            is_leaf=lambda x: hasattr(x, "unbox"),
        ),
        _DTYPE.value,
    )
    length = int(_DURATION.value * FRAME_RATE)
    dp = DecodeParams(decoding_steps=tuple(int(s) for s in _STEPS.value))  # rescore_weight 0.5 (the default)
    meta = {
        **machine(),
        "size": _SIZE.value,
        "params_m": round(count_params(magnet_config) / 1e6, 1),
        "duration_s": _DURATION.value,
        "frames": length,
        "decoding_steps": list(dp.decoding_steps),
        "prefix_seconds": _PREFIX_SECONDS.value,
        "cond_length": _COND_LENGTH.value,
        "dtype": _DTYPE.value,
        "attention": _ATTENTION.value,
        "repeats": _REPEATS.value,
    }
    print(
        f"{_SIZE.value}: {meta['params_m']} M params per model; {meta['device']}, {meta['cpu_count']} CPUs; "
        f"{_DURATION.value:g} s of audio",
        flush=True,
    )
    rows = []
    for batch in (int(b) for b in _BATCH_SIZES.value):
        runners = build_runners(methods, batch, magnet_model, magnet_params, ar_model, ar_params, dp, length)
        compiled = {m: compile_seconds(fn) for m, fn in runners.items()}
        times = dict(zip(runners, interleaved(list(runners.values()), _REPEATS.value)))
        for method in runners:
            latency = statistics.median(times[method])
            row = {
                "method": method,
                "batch": batch,
                "latency_s": round(latency, 3),
                "all_s": [round(t, 3) for t in times[method]],
                "throughput": round(batch / latency, 3),
                "audio_s_per_s": round(batch * _DURATION.value / latency, 2),
                "compile_s": round(compiled[method][0], 2),
                "first_call_s": round(compiled[method][1], 2),
            }
            rows.append(row)
            print(
                f"B={batch:<3} {method:15} latency {row['latency_s']:9.3f} s  throughput "
                f"{row['throughput']:8.3f} samples/s  (compile {row['compile_s']:.1f} s)",
                flush=True,
            )

    print(f"\n{'method':15} {'batch':>5} {'latency s':>10} {'samples/s':>10} {'audio s/s':>10} {'compile s':>10}")
    for r in rows:
        print(
            f"{r['method']:15} {r['batch']:5d} {r['latency_s']:10.3f} {r['throughput']:10.3f} "
            f"{r['audio_s_per_s']:10.2f} {r['compile_s']:10.2f}"
        )
    ratios = {}
    for batch in sorted({r["batch"] for r in rows}):
        by = {r["method"]: r["latency_s"] for r in rows if r["batch"] == batch}
        if "musicgen" in by:
            ratios[batch] = {m: round(by["musicgen"] / by[m], 2) for m in by if m != "musicgen"}
    for batch, rs in ratios.items():
        print(f"MusicGen latency / method latency at batch {batch}: " + ", ".join(f"{m} x{v}" for m, v in rs.items()))
    meta["musicgen_over_method_latency"] = ratios
    write_results(
        _OUT.value,
        meta,
        rows,
        plot,
        f"{meta['device']}, {meta['cpu_count']} CPUs, {_SIZE.value} "
        f"({meta['params_m']} M), {_DURATION.value:g} s, {_DTYPE.value}",
    )


if __name__ == "__main__":
    app.run(main)
