r"""EnCodec encode/decode speed: seconds of audio processed per wall-clock second.

Random weights of the chosen architecture (speed does not depend on their values); each case is compiled first
(reported separately), then timed `--repeats` times and the median is kept. Optionally times transformers'
PyTorch EncodecModel on the same architecture and input for reference.

  python benchmarks/encodec_speed.py --codec=music --seconds=10 --batch_sizes=1,4 --torch_reference
  python benchmarks/encodec_speed.py --codec=tiny --long_seconds=60

Writes a table to stdout and JSON to --out (default benchmarks/results/encodec_speed.json).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

flags.DEFINE_enum("codec", "music", ["music", "sound", "tiny"], "codec preset of configs/magnet.py")
flags.DEFINE_float("seconds", 10.0, "audio length per batch item for encode/decode")
flags.DEFINE_list("batch_sizes", ["1", "4"], "batch sizes to time")
flags.DEFINE_float("long_seconds", 60.0, "length of one file for encode_long (0: skip)")
flags.DEFINE_float("chunk_seconds", 10.0, "encode_long chunk length")
flags.DEFINE_integer("repeats", 3, "timed runs per case (median reported)")
flags.DEFINE_bool("torch_reference", False, "also time transformers' PyTorch EncodecModel (needs torch)")
flags.DEFINE_string("out", "benchmarks/results/encodec_speed.json", "JSON output path")
FLAGS = flags.FLAGS


def _time(fn, repeats: int) -> tuple[float, float]:
    """(first-call seconds, median seconds of `repeats` further calls)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return first, statistics.median(runs)


def _random_params(config, seed: int = 0):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from magnet_jax.models.encodec import abstract_params

    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray(rng.standard_normal(s.shape) * 0.02, jnp.float32), nn.unbox(abstract_params(config))
    )


def _torch_model(config):
    import torch
    import transformers

    torch.manual_seed(0)
    hf = transformers.EncodecConfig(
        sampling_rate=config.sample_rate,
        audio_channels=config.channels,
        upsampling_ratios=list(config.ratios),
        num_filters=config.n_filters,
        hidden_size=config.dimension,
        codebook_size=config.card,
        target_bandwidths=[config.n_q * config.frame_rate * (config.card - 1).bit_length() / 1000],
        num_lstm_layers=config.num_lstm_layers,
        pad_mode=config.pad_mode,
        use_causal_conv=False,
        normalize=False,
        use_conv_shortcut=not config.true_skip,
        num_residual_layers=config.n_residual_layers,
        compress=config.compress,
    )
    model = transformers.EncodecModel(hf).eval()
    with torch.no_grad():
        for layer in model.quantizer.layers:
            layer.codebook.embed.normal_()
    return model, hf.target_bandwidths[0]


def main(argv):
    del argv
    import jax
    import numpy as np

    from configs.magnet import get_config
    from magnet_jax.models import encodec

    preset = "size=tiny" if FLAGS.codec == "tiny" else f"size=small,task={FLAGS.codec}"
    config = encodec.EncodecConfig.from_config(get_config(preset).codec)
    params = _random_params(config)
    rng = np.random.default_rng(0)
    n = int(FLAGS.seconds * config.sample_rate)
    rows = []

    def add(impl, op, batch, seconds, first, median):
        rows.append(
            dict(
                impl=impl,
                op=op,
                batch=batch,
                audio_seconds=batch * seconds,
                first_call_s=first,
                median_s=median,
                audio_s_per_s=batch * seconds / median,
            )
        )

    torch_model = _torch_model(config) if FLAGS.torch_reference else None
    for batch in map(int, FLAGS.batch_sizes):
        wav = (0.1 * rng.standard_normal((batch, config.channels, n))).astype(np.float32)
        wav_device = jax.device_put(wav)
        add(
            "jax",
            "encode",
            batch,
            FLAGS.seconds,
            *_time(lambda: encodec.encode(config, params, wav_device).block_until_ready(), FLAGS.repeats),
        )
        codes = encodec.encode(config, params, wav_device)
        add(
            "jax",
            "decode",
            batch,
            FLAGS.seconds,
            *_time(lambda: encodec.decode(config, params, codes).block_until_ready(), FLAGS.repeats),
        )
        if torch_model is not None:
            import torch

            model, bandwidth = torch_model
            x = torch.from_numpy(wav)
            with torch.no_grad():
                torch_codes = model.encode(x, bandwidth=bandwidth).audio_codes
                add(
                    "torch",
                    "encode",
                    batch,
                    FLAGS.seconds,
                    *_time(lambda: model.encode(x, bandwidth=bandwidth), FLAGS.repeats),
                )
                add(
                    "torch",
                    "decode",
                    batch,
                    FLAGS.seconds,
                    *_time(lambda: model.decode(torch_codes, [None]), FLAGS.repeats),
                )
    if FLAGS.long_seconds > 0:
        wav = 0.1 * rng.standard_normal((1, config.channels, int(FLAGS.long_seconds * config.sample_rate)))
        wav = wav.astype(np.float32)
        add(
            "jax",
            f"encode_long({FLAGS.chunk_seconds:g}s chunks)",
            1,
            FLAGS.long_seconds,
            *_time(lambda: encodec.encode_long(config, params, wav, FLAGS.chunk_seconds), FLAGS.repeats),
        )

    load = os.getloadavg()[0]  # other processes on a shared host slow every row down
    print(
        f"EnCodec {FLAGS.codec} (sr {config.sample_rate}, hop {config.hop_length}, K {config.n_q}), "
        f"{jax.devices()[0].device_kind} x{jax.device_count()}, {os.cpu_count()} CPUs, load average {load:.1f}"
    )
    print(f"{'impl':6} {'op':28} {'batch':>5} {'audio s':>8} {'first s':>8} {'median s':>9} {'audio s/s':>10}")
    for r in rows:
        print(
            f"{r['impl']:6} {r['op']:28} {r['batch']:>5} {r['audio_seconds']:>8.1f} {r['first_call_s']:>8.2f} "
            f"{r['median_s']:>9.3f} {r['audio_s_per_s']:>10.1f}"
        )
    out = Path(FLAGS.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = dict(
        codec=FLAGS.codec,
        config=config.__dict__,
        device=jax.devices()[0].device_kind,
        device_count=jax.device_count(),
        cpu_count=os.cpu_count(),
        platform=platform.platform(),
        load_average=load,
        jax=jax.__version__,
        seconds=FLAGS.seconds,
        repeats=FLAGS.repeats,
        rows=rows,
        timestamp=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=list))
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    app.run(main)
