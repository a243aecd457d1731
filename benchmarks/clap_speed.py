"""CLAP embedding speed: audio seconds (and prompts) embedded per wall-clock second, ours vs laion_clap.

The music checkpoint's architecture (HTSAT-base + roberta-base) with random weights (speed does not depend on their
values; the test tokenizer of references/clap.py, trained on the prompts), the same batch of 32 kHz
clips (MAGNeT's output rate), float32 both, timed alternately in one run (`timing.interleaved`); the first call of
each side (JAX compilation) is left out.

- audio: ours is `clap.embed_audio` (jitted julius resampling to 48 kHz, then the jitted front end + HTS-AT). The
  reference is what audiocraft's CLAPTextConsistencyMetric runs: julius' `convert_audio`, then laion_clap's
  `CLAP_Module.get_audio_embedding_from_data(use_tensor=True)`.
- text: ours is `clap.embed_text` (tokenizer + jitted RoBERTa); the reference `CLAP_Module.get_text_embedding`.

  python benchmarks/clap_speed.py                     # 10 s clips, batch 4, 3 timed rounds
  python benchmarks/clap_speed.py --batch=16 --repeats=5

Writes `benchmarks/results/clap_speed.json` and `.png`.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
from absl import app, flags
from timing import interleaved, machine, save_figure, write_results

_SECONDS = flags.DEFINE_float("seconds", 10.0, "clip length (s)")
_BATCH = flags.DEFINE_integer("batch", 4, "clips (and prompts) per call")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed calls per side, alternating ours and the reference")
_OUT = flags.DEFINE_string("out", "benchmarks/results/clap_speed", "output path without extension")

RATE = 32_000
PROMPTS = (
    "an upbeat electronic track with a driving drum beat and bright sawtooth synth arpeggios",
    "calm ambient new age piece in C major with soft sine-wave pads",
    "funk bass line under sustained chords",
    "melancholic folk melody on a plucked string over a soft organ",
)


def main(argv):
    del argv
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))  # the repository root, for references/
    import torch

    from references import audiocraft_stubs
    from references import clap as clap_reference

    audiocraft_stubs.install()
    from audiocraft.data.audio_utils import convert_audio

    from magnet_jax.evaluation import clap

    texts = [PROMPTS[i % len(PROMPTS)] for i in range(_BATCH.value)]
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_dir = clap_reference.write_tokenizer(tmp, list(PROMPTS) * 4)
        reference = clap_reference.build_reference(tokenizer_dir)
        tokenizer = clap.load_clap_tokenizer(tokenizer_dir)
    state = {k: v.numpy() for k, v in reference.model.state_dict().items()}
    params = clap.params_from_state_dict(state, source="random laion_clap CLAP")

    rng = np.random.default_rng(0)
    n = int(_SECONDS.value * RATE)
    t = np.arange(n) / RATE
    audio = np.stack(
        [
            0.3 * np.sin(2 * np.pi * rng.uniform(100, 1000) * t) + 0.05 * rng.standard_normal(n)
            for _ in range(_BATCH.value)
        ]
    ).astype(np.float32)

    def reference_audio():
        with torch.no_grad():
            wav = convert_audio(torch.from_numpy(audio)[:, None], RATE, clap.SAMPLE_RATE, 1).mean(dim=1)
            return reference.get_audio_embedding_from_data(wav, use_tensor=True).numpy()

    def reference_text():
        with torch.no_grad():
            return reference.get_text_embedding(texts, use_tensor=True).numpy()

    cases = {
        "audio": (lambda: clap.embed_audio(params, audio, RATE), reference_audio, _BATCH.value * _SECONDS.value),
        "text": (lambda: clap.embed_text(params, tokenizer, texts), reference_text, _BATCH.value),
    }
    rows = []
    for name, (ours, ref, amount) in cases.items():
        ours(), ref()  # compile / warm up both
        ours_s, reference_s = (statistics.median(times) for times in interleaved([ours, ref], _REPEATS.value))
        rows.append(
            {
                "tower": name,
                "unit": "audio s" if name == "audio" else "prompts",
                "batch": _BATCH.value,
                "clip_seconds": _SECONDS.value,
                "ours_s": ours_s,
                "reference_s": reference_s,
                "ours_per_s": amount / ours_s,
                "reference_per_s": amount / reference_s,
                "ratio": reference_s / ours_s,
            }
        )
        print(f"{name}: ours {ours_s:.3f} s, laion_clap {reference_s:.3f} s", flush=True)
    meta = {
        **machine(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "sample_rate": RATE,
        "repeats": _REPEATS.value,
        "dtype": "float32",
        "model": "HTSAT-base + roberta-base",
    }
    print(
        f"\n{meta['device']}, {meta['cpu_count']} CPUs, torch {meta['torch_threads']} threads; batch "
        f"{_BATCH.value} x {_SECONDS.value:g} s at 32 kHz"
    )
    print(f"{'tower':6} {'unit':8} {'ours s':>8} {'torch s':>8} {'ours /s':>9} {'torch /s':>9} {'ratio':>6}")
    for r in rows:
        print(
            f"{r['tower']:6} {r['unit']:8} {r['ours_s']:8.3f} {r['reference_s']:8.3f} {r['ours_per_s']:9.1f} "
            f"{r['reference_per_s']:9.1f} {r['ratio']:6.2f}"
        )
    write_results(
        _OUT.value,
        meta,
        rows,
        plot,
        f"{meta['device']}, {meta['cpu_count']} CPUs, batch {_BATCH.value} x {_SECONDS.value:g} s",
    )


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(3.5 * len(rows), 4))
    for ax, r in zip(np.atleast_1d(axes), rows):
        ax.bar([0], [r["ours_per_s"]], 0.6, label="magnet_jax (JAX)")
        ax.bar([1], [r["reference_per_s"]], 0.6, label="laion_clap (PyTorch)")
        ax.set_xticks([0, 1], labels=["ours", "laion_clap"])
        ax.set(ylabel=f"{r['unit']} embedded per second", title=f"CLAP {r['tower']} tower")
    save_figure(fig, list(np.atleast_1d(axes)), path, title)


if __name__ == "__main__":
    app.run(main)
