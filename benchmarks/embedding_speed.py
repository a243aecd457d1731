"""Embedding speed of the metrics' models: seconds of audio embedded per wall-clock second, ours vs PyTorch.

Full-size architectures with random weights (speed does not depend on their values), the same batch of 32 kHz
clips (MAGNeT's output rate), float32 both, timed alternately in one run (`timing.interleaved`: both see the
same machine load); the first call of each side (JAX compilation) is left out.

- VGGish (FAD): ours is `embed_vggish` (jitted resampling to 16 kHz, host float64 normalisation and log-mel,
  jitted network). The reference is the chain audiocraft runs: julius' `resample_frac`, the FAD tool's
  normalisation and 1 s windows every 0.5 s with torchvggish's `mel_features` (numpy), then torchvggish's VGG.
- PaSST (KL): ours is the jitted `passt_logits` + softmax on one segment per clip (clips <= 20 s); the
  reference is hear21passt's `base20sec` model (`AugmentMelSTFT` + `PaSST`, mode="logits") + softmax.

  python benchmarks/embedding_speed.py                          # 10 s clips, batch 4, 3 timed rounds
  python benchmarks/embedding_speed.py --batch=16 --repeats=5

Writes `benchmarks/results/embedding_speed.json` and `.png`.
"""

from __future__ import annotations

import contextlib
import io
import statistics
import sys
from pathlib import Path

import jax
import numpy as np
from absl import app, flags
from timing import interleaved, machine, save_figure, write_results

from magnet_jax.evaluation import passt, vggish

_SECONDS = flags.DEFINE_float("seconds", 10.0, "clip length (s)")
_BATCH = flags.DEFINE_integer("batch", 4, "clips per call")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed calls per side, alternating ours and the reference")
_MODELS = flags.DEFINE_list("models", ["vggish", "passt"], "which models to time")
_OUT = flags.DEFINE_string("out", "benchmarks/results/embedding_speed", "output path without extension")

RATE = 32_000


def install_references() -> None:
    """Makes torchvggish, hear21passt and audiocraft importable here (the test suite's import stubs)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for references/
    from references import audiocraft_stubs

    audiocraft_stubs.install()


def vggish_runners(audio: np.ndarray):
    import torch
    from torchvggish import torchvggish as tv

    from references.evaluation_tools import fad_tool_examples

    torch.manual_seed(0)
    model = tv._vgg().eval()
    params = vggish.params_from_state_dict({k: v.numpy() for k, v in model.state_dict().items()}, source="random")
    pre_activation = torch.nn.Sequential(*list(model.embeddings)[:-1])

    def ours():
        return vggish.embed_vggish(params, audio, RATE)

    def reference():
        examples = np.concatenate([fad_tool_examples(row, RATE) for row in audio]).astype(np.float32)
        with torch.no_grad():
            x = model.features(torch.from_numpy(examples)[:, None])
            return pre_activation(x.permute(0, 2, 3, 1).reshape(len(x), -1)).numpy()

    return ours, reference


def passt_runners(audio: np.ndarray):
    import torch
    from audiocraft.metrics.kld import _patch_passt_stft
    from hear21passt.models.passt import get_model
    from hear21passt.models.preprocess import AugmentMelSTFT
    from hear21passt.wrapper import PasstBasicWrapper

    with contextlib.redirect_stdout(io.StringIO()):  # base20sec.get_basic_model, without the weights download
        mel = AugmentMelSTFT(
            n_mels=128,
            sr=32000,
            win_length=800,
            hopsize=320,
            n_fft=1024,
            freqm=48,
            timem=192,
            htk=False,
            fmin=0.0,
            fmax=None,
            norm=1,
            fmin_aug_range=10,
            fmax_aug_range=2000,
        )
        net = get_model(arch="passt_20sec", pretrained=False, input_tdim=2000)
        model = PasstBasicWrapper(mel=mel, net=net, max_model_window=20000, mode="logits")
    model.eval()
    params = passt.params_from_state_dict(
        {k: v.numpy() for k, v in model.net.state_dict().items()}, passt.PASST_20S, source="random"
    )

    def ours():
        return np.asarray(jax.nn.softmax(passt.passt_logits(passt.PASST_20S, params, audio), axis=-1))

    def reference():
        with torch.no_grad(), _patch_passt_stft(), contextlib.redirect_stdout(io.StringIO()):
            return torch.softmax(model(torch.from_numpy(audio)), dim=-1).numpy()

    return ours, reference


def main(argv):
    del argv
    install_references()
    import torch

    rng = np.random.default_rng(0)
    n = int(_SECONDS.value * RATE)
    t = np.arange(n) / RATE
    audio = np.stack(
        [
            0.3 * np.sin(2 * np.pi * rng.uniform(100, 1000) * t) + 0.05 * rng.standard_normal(n)
            for _ in range(_BATCH.value)
        ]
    ).astype(np.float32)
    audio_seconds = _BATCH.value * _SECONDS.value
    rows = []
    for name in _MODELS.value:
        ours, reference = {"vggish": vggish_runners, "passt": passt_runners}[name](audio)
        ours(), reference()  # compile / warm up both
        ours_s, reference_s = (statistics.median(times) for times in interleaved([ours, reference], _REPEATS.value))
        rows.append(
            {
                "model": name,
                "batch": _BATCH.value,
                "clip_seconds": _SECONDS.value,
                "ours_s": ours_s,
                "reference_s": reference_s,
                "ours_audio_s_per_s": audio_seconds / ours_s,
                "reference_audio_s_per_s": audio_seconds / reference_s,
                "ratio": reference_s / ours_s,
            }
        )
        print(f"{name}: ours {ours_s:.3f} s, reference {reference_s:.3f} s", flush=True)
    meta = {
        **machine(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "sample_rate": RATE,
        "repeats": _REPEATS.value,
        "dtype": "float32",
    }
    print(
        f"\n{meta['device']}, {meta['cpu_count']} CPUs, torch {meta['torch_threads']} threads; batch "
        f"{_BATCH.value} x {_SECONDS.value:g} s at 32 kHz"
    )
    print(f"{'model':7} {'ours s':>8} {'torch s':>8} {'ours audio s/s':>15} {'torch audio s/s':>16} {'ratio':>6}")
    for r in rows:
        print(
            f"{r['model']:7} {r['ours_s']:8.3f} {r['reference_s']:8.3f} {r['ours_audio_s_per_s']:15.1f} "
            f"{r['reference_audio_s_per_s']:16.1f} {r['ratio']:6.2f}"
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

    fig, ax = plt.subplots(figsize=(6, 4))
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["ours_audio_s_per_s"] for r in rows], 0.4, label="magnet_jax (JAX)")
    ax.bar(x + 0.2, [r["reference_audio_s_per_s"] for r in rows], 0.4, label="PyTorch reference")
    ax.set_xticks(x, labels=[r["model"] for r in rows])
    ax.set(ylabel="audio seconds embedded per second", title="embedding speed")
    save_figure(fig, [ax], path, title)


if __name__ == "__main__":
    app.run(main)
