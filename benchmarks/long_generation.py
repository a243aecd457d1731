"""Time and memory of a generation longer than the trained window: windowed LM decoding + EnCodec `decode_long`.

The LM generates `--duration` seconds in windows of `--window` seconds, each after the first continuing the last
`window - stride` seconds of the one before (`magnet_jax.generation.windows`, as `MAGNeT.generate(duration=...)`
does); then EnCodec decodes the joined codes in windows (`encodec.decode_long`, as `MAGNeT.decode_audio`). Random
weights: text conditioning is random T5-sized states (T5 runs once per call in the API and is not timed), the codec
is the 32 kHz music EnCodec's architecture (or the tiny one with `--size=tiny`) with random weights, so the audio is
noise but the compute and memory are the real ones.

Reported: windows and decoder programs compiled, LM seconds (first call with compilation, then a second call),
decode seconds, the process's peak resident memory, and the codec's compiled scratch memory for one decode window
against decoding all frames at once (what `decode_long` avoids).

  python benchmarks/long_generation.py --size=tiny                  # tiny LM (64x2) + tiny codec
  python benchmarks/long_generation.py --size=512x8 --repeats=1     # 512-wide, 8 layers, card 2048, music codec

Writes `benchmarks/results/long_generation_<size>.json`.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from timing import lm_config, machine

from configs.magnet import CODECS, get_config
from magnet_jax.api import DECODE_CHUNK_SECONDS, DECODE_CONTEXT_SECONDS
from magnet_jax.generation import decoding, windows
from magnet_jax.generation.decoding import DecodeParams, generate_codes
from magnet_jax.models import encodec
from magnet_jax.models.conditioner import TextConditioning
from magnet_jax.models.encodec import EncodecConfig
from magnet_jax.models.lm import LanguageModel, LMConfig, init_params

_SIZE = flags.DEFINE_string("size", "tiny", "tiny (the tiny preset LM and codec) or <dim>x<layers> / a preset")
_DURATION = flags.DEFINE_float("duration", 120.0, "seconds of audio")
_WINDOW = flags.DEFINE_float("window", 10.0, "trained window in seconds")
_STRIDE = flags.DEFINE_float("stride", 5.0, "extend stride in seconds")
_BATCH = flags.DEFINE_integer("batch", 1, "rows")
_STEPS = flags.DEFINE_list("steps", ["20", "10", "10", "10"], "decoding steps per codebook")
_REPEATS = flags.DEFINE_integer("repeats", 2, "generations timed (the first includes compilation)")
_OUT = flags.DEFINE_string("out", "benchmarks/results/long_generation", "output path prefix")

FRAME_RATE = 50
TEXT_LENGTH = 16


def _models() -> tuple[LMConfig, EncodecConfig]:
    if _SIZE.value == "tiny":
        tiny = get_config("size=tiny")
        return LMConfig.from_config(tiny.model), EncodecConfig.from_config(tiny.codec)
    codec = {k: v for k, v in CODECS["music"].items() if k != "source"}
    return lm_config(_SIZE.value), EncodecConfig(**codec)


def _random_codec(config: EncodecConfig):
    """Random parameters of the codec's shapes (scaled so activations stay finite)."""
    abstract = nn.meta.unbox(encodec.abstract_params(config))
    leaves, tree = jax.tree.flatten(abstract)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return jax.tree.unflatten(
        tree, [0.05 * jax.random.normal(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves)]
    )


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv) -> None:
    del argv
    lm, codec = _models()
    model = LanguageModel(lm)
    params = jax.jit(lambda key: nn.meta.unbox(init_params(model, key)))(jax.random.key(0))
    codec_params = _random_codec(codec)
    dp = DecodeParams(decoding_steps=tuple(int(s) for s in _STEPS.value))
    window = dp.output_length(int(_WINDOW.value * FRAME_RATE))
    plan = windows.WindowPlan(
        total=dp.output_length(int(_DURATION.value * FRAME_RATE)), window=window, stride=int(_STRIDE.value * FRAME_RATE)
    )
    batch = _BATCH.value
    states = jax.random.normal(jax.random.key(2), (batch, TEXT_LENGTH, lm.cond_dim))
    cond = TextConditioning(states, jnp.ones((batch, TEXT_LENGTH), jnp.int32), None)
    keys = jax.random.split(jax.random.key(3), batch)
    rss_start = _peak_rss_mib()

    def generate() -> jax.Array:
        first = generate_codes(model, params, cond, keys, dp, length=int(_WINDOW.value * FRAME_RATE))
        continuation = windows.continuation(model, params, cond, dp, window=window)
        return windows.extend(first, continuation, keys, plan).block_until_ready()

    lm_seconds, programs_before = [], decoding._generate._cache_size()
    for _ in range(_REPEATS.value):
        start = time.perf_counter()
        codes = generate()
        lm_seconds.append(time.perf_counter() - start)
    programs = decoding._generate._cache_size() - programs_before
    rss_after_lm = _peak_rss_mib()

    chunk = max(window, round(DECODE_CHUNK_SECONDS * FRAME_RATE))
    context = round(DECODE_CONTEXT_SECONDS * FRAME_RATE)
    start = time.perf_counter()
    audio = encodec.decode_long(codec, codec_params, codes, chunk_frames=chunk, context_frames=context)
    audio.block_until_ready()
    decode_seconds = time.perf_counter() - start
    rss_after_decode = _peak_rss_mib()
    core_args = (codec, codec_params, codes, np.int32(0), np.int32(0), chunk + 2 * context, chunk)
    window_bytes = encodec._decode_core.lower(*core_args).compile().memory_analysis().temp_size_in_bytes
    whole_bytes = encodec.decode.lower(codec, codec_params, codes).compile().memory_analysis().temp_size_in_bytes

    result = {
        "size": _SIZE.value,
        "lm": {"dim": lm.dim, "layers": lm.num_layers, "card": lm.card},
        "codec_filters": codec.n_filters,
        "duration_s": _DURATION.value,
        "window_s": _WINDOW.value,
        "stride_s": _STRIDE.value,
        "batch": batch,
        "steps": list(dp.decoding_steps),
        "frames": int(codes.shape[-1]),
        "windows": plan.num_windows,
        "decoder_programs_compiled": programs,
        "lm_seconds": [round(t, 2) for t in lm_seconds],
        "decode_seconds": round(decode_seconds, 2),
        "audio_samples": int(audio.shape[-1]),
        "peak_rss_mib": {
            "before": round(rss_start),
            "after_lm": round(rss_after_lm),
            "after_decode": round(rss_after_decode),
        },
        "codec_scratch_mib": {
            "decode_window": round(window_bytes / 2**20, 1),
            "whole_decode": round(whole_bytes / 2**20, 1),
        },
        "machine": machine(),
    }
    print(json.dumps(result, indent=2))
    path = Path(f"{_OUT.value}_{_SIZE.value}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    app.run(main)
