r"""Batch offline generation job config (`python -m magnet_jax.generate`).

  python -m magnet_jax.generate --config=configs/generate.py:source=facebook/magnet-small-10secs \
      --prompts=prompts.jsonl --output_dir=/tmp/magnet_out --config.batch_size=16 --config.output.write_codes

Preset options (the arg string after the file name):
  source:   the model: a hub id (audiocraft release, e.g. facebook/magnet-small-10secs), a converted checkpoint
            directory (`config.json` + params), an audiocraft-format directory (`state_dict.bin` +
            `compression_state_dict.bin`), or a training workdir (its newest params export)
  duration: the model's training segment in seconds (10 or 30 for the released music models): picks the
            per-window defaults (first-stage decoding steps) and the default output length and extend stride
  task:     music | sound: picks the generation defaults (temperature, top-p, CFG) of configs/magnet.py

The `generate` section starts from configs/magnet.py's `generate` section for that duration and task (the released
models' defaults, docs/design.md §6.2); single fields are overridden as usual (`--config.generate.top_p=0.95`,
`--config.generate.decoding_steps='(20,10,10,10)'`). Longer than the segment: `--config.generate.duration=120
[--config.generate.extend_stride=5]`, windows of the segment, each continuing the last `segment - extend_stride`
seconds of the one before (default stride: half the segment).
Rescoring and the composition-mode hybrid take causal MusicGen sources: `--config.rescorer=facebook/musicgen-small
--config.generate.rescore_weight=0.5 [--config.generate.rescore_mode=sample]`,
`--config.ar_model=facebook/musicgen-small --config.generate.prefix_seconds=2`.
A single-model Hybrid-MAGNeT source (trained with `train.objective="hybrid"`) takes neither: it generates its own
first `--config.generate.prefix_seconds` with the `ar_*` sampling settings (0 = MAGNeT decoding only).
"""

from __future__ import annotations

import dataclasses

import ml_collections

from configs import magnet
from configs.common import parse_arg
from magnet_jax import api
from magnet_jax.generation.decoding import DecodeParams, PrefixParams


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, source="facebook/magnet-small-10secs", duration=10.0, task="music")
    if arg.duration <= 0:
        raise ValueError(f"duration={arg.duration}: expected a positive number of seconds")
    base = magnet.get_config(f"size=tiny,duration={arg.duration},task={arg.task}")
    c = ml_collections.ConfigDict()
    c.source = arg.source
    # t5, codec, dtype, mesh, sharding_rules, text_length, rescorer, ar_model: the API's defaults (magnet_jax.api)
    c.update(api.DEFAULT_SETTINGS)
    # (a Hybrid-MAGNeT source generates its prefix itself: no rescorer, no ar_model)

    c.seed = 0  # seed of prompts that give none
    c.num_samples = 1  # samples per prompt when a prompt line gives none
    c.batch_size = 8  # rows per generation step over all devices and hosts (multiple of the data-parallel size)

    generate = base.generate.to_dict()  # references resolved: a plain copy
    generate.update(
        duration=float(arg.duration), decoding_steps=tuple(generate["decoding_steps"])
    )  # a tuple can be overridden by a flag
    generate.update(extend_stride=float(arg.duration) / 2)  # the API's default for a segment of `duration`
    # Rescoring weight w (paper Eq. 5, on MAGNeT's term; used only with a rescorer), how the mixture is used
    # (rescore_mode "rank": ranks the spans to re-mask, Fig. 4; "sample": tokens drawn from it, Eq. 5's text) and
    # the hybrid's AR prefix (prefix_seconds 0 = off; ar_* = MusicGen's sampling defaults; by the ar_model, or by a
    # Hybrid-MAGNeT model itself): the library defaults.
    generate.update(
        rescore_weight=DecodeParams.rescore_weight,
        rescore_mode=DecodeParams.rescore_mode,
        **dataclasses.asdict(PrefixParams()),
    )
    c.generate = ml_collections.ConfigDict(generate)

    c.output = ml_collections.ConfigDict()
    c.output.format = "wav"  # soundfile container: wav | flac
    c.output.subtype = "PCM_16"  # soundfile sample format (PCM_16, PCM_24, FLOAT)
    c.output.write_codes = False  # also write the EnCodec codes `<id>.npy` ([K, T] int16)
    return c
