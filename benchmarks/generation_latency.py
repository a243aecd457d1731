"""MAGNeT generation latency: the jitted JAX decoder vs audiocraft's PyTorch `MagnetLMModel.generate`.

Both sides run the same work on the same weights: LM decoding of 10 s of codes (T = 500 -> 498 frames,
'nonoverlap' spans) for B descriptions, with CFG (2B rows per forward), top-p 0.9 sampling at temperature 3.0, the
same decoding steps. Text conditioning is a lookup table of L tokens per description on both sides (T5 and EnCodec
are outside the timed region on both sides). The audiocraft model is built first (its own init), its state dict is
converted with `magnet_jax.checkpoints.lm_weights`, and the two are timed alternately in one run on this machine's
default JAX backend and torch's CPU threads, in each of `--dtypes`: float32, and bfloat16 (ours: params cast once,
float32 softmax / logits / sampling, docs/design.md §11.2; audiocraft: `torch.autocast` on the float32 weights).

Per (model size, dtype, batch size): JAX compile time (tracing + lowering + XLA compile, from jax.monitoring events
of the first call; a new batch size compiles a new program), then the min and median JAX and audiocraft latencies of
calls timed alternately (both see the same machine load), their ratio (audiocraft / JAX from the minima, > 1 = JAX
faster; bfloat16 rows also against audiocraft float32), our achieved GFLOP/s (`flops.decode_pass_flops` per pass,
attention counted dense) and its fraction of a `[1024, 1024]` matmul peak in the same dtype measured in the same run
(before and after each size, the higher kept).

  python benchmarks/generation_latency.py              # --quick (default): 512x8 model, batch 1, 2, 4, steps 4,2,2,2
  python benchmarks/generation_latency.py --noquick    # batch 1, 2, 4, 8, 16, steps 20,10,10,10, 3 repeats
  python benchmarks/generation_latency.py --noquick --sizes=512x8,small --batch_sizes=1,4,16 --dtypes=float32
  python benchmarks/generation_latency.py --duration=30 # T = 1500

Writes `benchmarks/results/generation_latency.json` and `.png` (latency and ratio vs batch size).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from timing import BENCH_SIZES, batch_axis, compile_seconds, interleaved, lm_config, machine, save_figure, write_results

from magnet_jax.checkpoints.lm_weights import params_from_audiocraft
from magnet_jax.generation.decoding import DecodeParams, generate_codes
from magnet_jax.models.conditioner import TextConditioning
from magnet_jax.models.lm import LanguageModel, LMConfig, cast_params, count_params
from magnet_jax.training.flops import decode_pass_flops
from magnet_jax.training.metrics import measure_matmul_peak

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for references/
from references.audiocraft_lm import lm_state, magnet_generate, token_conditioned_magnet  # noqa: E402

_QUICK = flags.DEFINE_bool("quick", True, "short run: batch 1,2,4, steps 4,2,2,2, one timed call each")
_SIZES = flags.DEFINE_list(
    "sizes", ["512x8"], f"models: <dim>x<layers> (dim / 64 heads) and/or presets ({', '.join(BENCH_SIZES)})"
)
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", None, "override the batch sizes")
_STEPS = flags.DEFINE_list("steps", None, "override the decoding steps per codebook")
_DURATION = flags.DEFINE_float("duration", 10.0, "seconds of audio (50 frames per second)")
_COND_LENGTH = flags.DEFINE_integer("cond_length", 16, "text tokens per description")
_REPEATS = flags.DEFINE_integer(
    "repeats", None, "timed calls per point and side, alternating JAX and audiocraft (default 1 quick, 3 full)"
)
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "compute dtypes (both sides)")
_OUT = flags.DEFINE_string("out", "benchmarks/results/generation_latency", "output path without extension")

FRAME_RATE = 50
N_BINS = 1000  # lookup-table text vocabulary


def build_audiocraft(config: LMConfig, duration: float):
    """audiocraft's MagnetLMModel (xformers path emulated with SDPA, band mask honoured) + the same params for JAX."""

    def tokenize(texts):  # descriptions are space-separated token ids, all of the same length here
        length = _COND_LENGTH.value
        ids = np.asarray([[int(w) for w in t.split()] if t is not None else [0] * length for t in texts])
        return ids, np.asarray([[int(t is not None)] * length for t in texts], np.int32)

    lm, table = token_conditioned_magnet(
        config, tokenize, n_bins=N_BINS, frame_rate=FRAME_RATE, segment_duration=int(np.ceil(duration))
    )
    params = jax.tree.map(jnp.asarray, params_from_audiocraft(lm_state(lm), config, source="audiocraft benchmark"))
    return lm, params, table


def matmul_peak(dtype: str) -> float:
    """FLOP/s of `[1024, 1024]` matmuls in `dtype` on this run's devices (best of 3)."""
    return measure_matmul_peak(jax.local_devices(), size=1024, chain=4, repeats=3, dtype=jnp.dtype(dtype))


def measure(size: str, batch_sizes: list[int], dp: DecodeParams, repeats: int) -> list[dict]:
    import torch

    length = int(_DURATION.value * FRAME_RATE)
    out_len = dp.output_length(length)
    lm, params, table = build_audiocraft(lm_config(size), _DURATION.value)  # installs audiocraft's import stubs
    from audiocraft.modules.conditioners import ConditioningAttributes

    with torch.no_grad():  # torch's one-time lazy initialisation, outside the timings
        warm_up = ConditioningAttributes(text={"description": " ".join(["1"] * _COND_LENGTH.value)})
        lm.generate(
            conditions=[warm_up],
            max_gen_len=length,
            use_sampling=True,
            temp=3.0,
            top_k=0,
            top_p=0.9,
            decoding_steps=[1] * lm_config(size).n_q,
        )
    rows = []
    for dtype in _DTYPES.value:
        config = lm_config(size, dtype=dtype, param_dtype=dtype)
        model, cast = LanguageModel(config), cast_params(params, dtype)
        peak_before = matmul_peak(dtype)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")
        dtype_rows = []
        for batch in batch_sizes:
            ids = np.random.default_rng(batch).integers(1, N_BINS, (batch, _COND_LENGTH.value))
            cond = TextConditioning(jnp.asarray(table[ids]), jnp.ones(ids.shape, jnp.int32), None)

            def run_jax():
                generate_codes(model, cast, cond, jax.random.key(0), dp, length=length).block_until_ready()

            descriptions = [" ".join(map(str, r)) for r in ids]

            def run_torch():
                with autocast:
                    magnet_generate(lm, descriptions, dp, length=length)

            compile_s, first_s = compile_seconds(run_jax)
            jax_times, torch_times = interleaved([run_jax, run_torch], repeats)
            jax_s, torch_s = min(jax_times), min(torch_times)
            flops = sum(dp.decoding_steps) * decode_pass_flops(
                config, batch=batch, seq_len=out_len, cond_len=_COND_LENGTH.value
            )
            row = {
                "size": size,
                "dtype": dtype,
                "batch": batch,
                "compile_s": round(compile_s, 2),
                "first_call_s": round(first_s, 2),
                "jax_s": round(jax_s, 3),
                "jax_median_s": round(statistics.median(jax_times), 3),
                "jax_all_s": [round(t, 3) for t in jax_times],
                "torch_s": round(torch_s, 3),
                "torch_median_s": round(statistics.median(torch_times), 3),
                "torch_all_s": [round(t, 3) for t in torch_times],
                "ratio": round(torch_s / jax_s, 2),
                "ratio_median": round(statistics.median(torch_times) / statistics.median(jax_times), 2),
                "gflop": round(flops / 1e9, 1),
                "jax_gflop_per_s": round(flops / jax_s / 1e9, 1),
                "jax_ms_per_forward": round(1e3 * jax_s / sum(dp.decoding_steps), 1),
                "audio_s_per_s": round(batch * _DURATION.value / jax_s, 2),
            }
            print(
                f"{size:6} {dtype:8} B={batch:<3} compile {row['compile_s']:7.2f} s  jax {row['jax_s']:8.3f} s  "
                f"audiocraft {row['torch_s']:8.3f} s  ratio {row['ratio']:5.2f}  {row['jax_gflop_per_s']} GFLOP/s",
                flush=True,
            )
            dtype_rows.append(row)
        peak = max(peak_before, matmul_peak(dtype))
        for row in dtype_rows:
            row["matmul_peak_gflop_per_s"] = round(peak / 1e9, 1)
            row["fraction_of_peak"] = round(row["jax_gflop_per_s"] * 1e9 / peak, 3)
        rows += dtype_rows
    by_batch = {r["batch"]: r for r in rows if r["dtype"] == "float32"}
    for r in rows:
        if r["dtype"] != "float32" and r["batch"] in by_batch:
            r["ratio_vs_torch_float32"] = round(by_batch[r["batch"]]["torch_s"] / r["jax_s"], 2)
    return rows


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_latency, ax_ratio) = plt.subplots(1, 2, figsize=(10, 4))
    for size, dtype in dict.fromkeys((r["size"], r["dtype"]) for r in rows):
        rs = [r for r in rows if (r["size"], r["dtype"]) == (size, dtype)]
        batches = [r["batch"] for r in rs]
        ax_latency.plot(batches, [r["jax_s"] for r in rs], "o-", label=f"{size} {dtype} JAX")
        ax_latency.plot(batches, [r["torch_s"] for r in rs], "s--", label=f"{size} {dtype} audiocraft")
        ax_ratio.plot(batches, [r["ratio"] for r in rs], "o-", label=f"{size} {dtype}")
    ax_latency.set(xlabel="batch size", ylabel="latency (s)", title="generation latency", ylim=(0, None))
    ax_ratio.axhline(1.0, color="gray", lw=0.8)
    ax_ratio.set(xlabel="batch size", ylabel="audiocraft / JAX", title="speed-up (> 1: JAX faster)", ylim=(0, None))
    for ax in (ax_latency, ax_ratio):
        batch_axis(ax, sorted({r["batch"] for r in rows}))
    save_figure(fig, (ax_latency, ax_ratio), path, title)


def main(argv):
    del argv
    quick = _QUICK.value
    batch_sizes = [int(b) for b in _BATCH_SIZES.value or ((1, 2, 4) if quick else (1, 2, 4, 8, 16))]
    steps = tuple(int(s) for s in _STEPS.value or ((4, 2, 2, 2) if quick else (20, 10, 10, 10)))
    repeats = _REPEATS.value or (1 if quick else 3)
    dp = DecodeParams(decoding_steps=steps)  # music defaults: top-p 0.9, temperature 3, CFG 10 -> 1, nonoverlap
    import torch

    meta = {
        **machine(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "duration_s": _DURATION.value,
        "decoding_steps": list(steps),
        "cond_length": _COND_LENGTH.value,
        "repeats": repeats,
        "dtypes": _DTYPES.value,
        "sampling": "top-p 0.9, temperature 3.0, CFG 10->1, nonoverlap spans",
    }
    rows = []
    for size in _SIZES.value:
        print(f"{size}: {count_params(lm_config(size)) / 1e6:.1f} M params", flush=True)
        rows += measure(size, batch_sizes, dp, repeats)

    print(f"\n{meta['device']}, {meta['cpu_count']} CPUs; {_DURATION.value:g} s of audio, steps {list(steps)}")
    print(
        f"{'model':7} {'dtype':8} {'batch':>5} {'compile s':>10} {'JAX s':>9} {'audiocraft s':>13} {'ratio':>6} "
        f"{'vs ac f32':>9} {'GFLOP/s':>8} {'of peak':>8} {'audio s/s':>10}"
    )
    for r in rows:
        print(
            f"{r['size']:7} {r['dtype']:8} {r['batch']:5d} {r['compile_s']:10.2f} {r['jax_s']:9.3f} "
            f"{r['torch_s']:13.3f} {r['ratio']:6.2f} {r.get('ratio_vs_torch_float32', r['ratio']):9.2f} "
            f"{r['jax_gflop_per_s']:8.1f} {r['fraction_of_peak']:8.2f} {r['audio_s_per_s']:10.2f}"
        )
    write_results(
        _OUT.value,
        meta,
        rows,
        plot,
        f"{meta['device']}, {meta['cpu_count']} CPUs, {_DURATION.value:g} s, steps {list(steps)}",
    )


if __name__ == "__main__":
    app.run(main)
