"""MAGNeT generation latency: the jitted JAX decoder vs audiocraft's PyTorch `MagnetLMModel.generate`.

Both sides run the same work on the same weights: LM decoding of 10 s of codes (T = 500 -> 498 frames,
'nonoverlap' spans) for B descriptions, with CFG (2B rows per forward), top-p 0.9 sampling at temperature 3.0, the
same decoding steps. Text conditioning is a lookup table of L tokens per description on both sides (T5 and EnCodec
are outside the timed region on both sides). The audiocraft model is built first (its own init), its state dict is
converted with `magnet_jax.checkpoints.lm_weights`, and the two are timed alternately in one run on this machine's
default JAX backend and torch's CPU threads, float32 both.

Per (model size, batch size): JAX compile time (tracing + lowering + XLA compile, from jax.monitoring events of the
first call; a new batch size compiles a new program), then the median JAX and audiocraft latencies of calls timed
alternately (both see the same machine load), and their ratio (audiocraft / JAX, > 1 = JAX faster).

  python benchmarks/generation_latency.py              # --quick (default): 512x8 model, batch 1, 2, 4, steps 4,2,2,2
  python benchmarks/generation_latency.py --noquick    # batch 1, 2, 4, 8, 16, steps 20,10,10,10, 3 repeats
  python benchmarks/generation_latency.py --noquick --sizes=512x8,small --batch_sizes=1,4,16

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
from magnet_jax.models.lm import LanguageModel, LMConfig, count_params

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


def measure(size: str, batch_sizes: list[int], dp: DecodeParams, repeats: int) -> list[dict]:
    import torch
    from audiocraft.modules.conditioners import ConditioningAttributes

    config = lm_config(size)
    length = int(_DURATION.value * FRAME_RATE)
    lm, params, table = build_audiocraft(config, _DURATION.value)
    model = LanguageModel(config)
    with torch.no_grad():  # torch's one-time lazy initialisation, outside the timings
        warm_up = ConditioningAttributes(text={"description": " ".join(["1"] * _COND_LENGTH.value)})
        lm.generate(
            conditions=[warm_up],
            max_gen_len=length,
            use_sampling=True,
            temp=3.0,
            top_k=0,
            top_p=0.9,
            decoding_steps=[1] * config.n_q,
        )
    rows = []
    for batch in batch_sizes:
        ids = np.random.default_rng(batch).integers(1, N_BINS, (batch, _COND_LENGTH.value))
        cond = TextConditioning(jnp.asarray(table[ids]), jnp.ones(ids.shape, jnp.int32), None)

        def run_jax():
            generate_codes(model, params, cond, jax.random.key(0), dp, length=length).block_until_ready()

        descriptions = [" ".join(map(str, r)) for r in ids]

        def run_torch():
            magnet_generate(lm, descriptions, dp, length=length)

        compile_s, first_s = compile_seconds(run_jax)
        jax_times, torch_times = interleaved([run_jax, run_torch], repeats)
        jax_s, torch_s = statistics.median(jax_times), statistics.median(torch_times)
        row = {
            "size": size,
            "batch": batch,
            "compile_s": round(compile_s, 2),
            "first_call_s": round(first_s, 2),
            "jax_s": round(jax_s, 3),
            "jax_all_s": [round(t, 3) for t in jax_times],
            "torch_s": round(torch_s, 3),
            "torch_all_s": [round(t, 3) for t in torch_times],
            "ratio": round(torch_s / jax_s, 2),
            "jax_ms_per_forward": round(1e3 * jax_s / sum(dp.decoding_steps), 1),
            "audio_s_per_s": round(batch * _DURATION.value / jax_s, 2),
        }
        print(
            f"{size:6} B={batch:<3} compile {row['compile_s']:7.2f} s  jax {row['jax_s']:8.3f} s  "
            f"audiocraft {row['torch_s']:8.3f} s  ratio {row['ratio']:5.2f}",
            flush=True,
        )
        rows.append(row)
    return rows


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_latency, ax_ratio) = plt.subplots(1, 2, figsize=(10, 4))
    for size in dict.fromkeys(r["size"] for r in rows):
        rs = [r for r in rows if r["size"] == size]
        batches = [r["batch"] for r in rs]
        ax_latency.plot(batches, [r["jax_s"] for r in rs], "o-", label=f"{size} JAX")
        ax_latency.plot(batches, [r["torch_s"] for r in rs], "s--", label=f"{size} audiocraft")
        ax_ratio.plot(batches, [r["ratio"] for r in rs], "o-", label=size)
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
        "dtype": "float32",
        "sampling": "top-p 0.9, temperature 3.0, CFG 10->1, nonoverlap spans",
    }
    rows = []
    for size in _SIZES.value:
        print(f"{size}: {count_params(lm_config(size)) / 1e6:.1f} M params", flush=True)
        rows += measure(size, batch_sizes, dp, repeats)

    print(f"\n{meta['device']}, {meta['cpu_count']} CPUs; {_DURATION.value:g} s of audio, steps {list(steps)}")
    print(
        f"{'model':7} {'batch':>5} {'compile s':>10} {'JAX s':>9} {'audiocraft s':>13} {'ratio':>6} "
        f"{'ms/forward':>11} {'audio s/s':>10}"
    )
    for r in rows:
        print(
            f"{r['size']:7} {r['batch']:5d} {r['compile_s']:10.2f} {r['jax_s']:9.3f} {r['torch_s']:13.3f} "
            f"{r['ratio']:6.2f} {r['jax_ms_per_forward']:11.1f} {r['audio_s_per_s']:10.2f}"
        )
    write_results(
        _OUT.value,
        meta,
        rows,
        plot,
        f"{meta['device']}, {meta['cpu_count']} CPUs, {_DURATION.value:g} s, steps {list(steps)}, float32",
    )


if __name__ == "__main__":
    app.run(main)
