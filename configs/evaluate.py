r"""Evaluation job config (`python -m magnet_jax.evaluate`): which metrics, the embedders' weight files, and how
samples are generated when `--samples` names a model.

  python -m magnet_jax.evaluate --config=configs/evaluate.py:metrics=fad+kl+clap \
      --config.vggish.weights=weights/vggish-10086976.pth \
      --config.passt.weights=weights/passt-s-f128-20sec-p16-s10-ap.474-swa.pt \
      --config.clap.weights=weights/music_audioset_epoch_15_esc_90.14.pt --config.clap.tokenizer=weights/roberta-base \
      --prompts=musiccaps-public.csv --reference_audio=musiccaps_wav/ --samples=out/samples --output_dir=out/eval

Preset options (the arg string after the file name):
  metrics:  `+`-separated subset of fad, kl, clap (default all three)
  duration: seconds per generated sample when `--samples` is a model (default 10)

The weight files are the released ones (a user brings them; nothing is downloaded): torchvggish's VGGish state
dict, hear21passt's 20 s PaSST checkpoint (the one audiocraft's KL metric loads), LAION-CLAP's music checkpoint and
roberta-base's tokenizer files. The `passt.model` and `clap.audio` / `clap.text` sections are the architectures of
those files (tests use smaller ones).
"""

from __future__ import annotations

import ml_collections

from configs.common import parse_arg
from magnet_jax.evaluation import scoring


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, metrics="fad+kl+clap", duration=10.0)
    c = scoring.embedder_config()
    c.metrics = tuple(m for m in arg.metrics.split("+") if m)  # checked by the job (one-line error)
    # Generation when --samples is a model source: the batch generation job runs on --prompts with this config
    # file, `:source=<--samples>,duration=<whole seconds>` and `preset` appended, `--config.generate.duration`
    # and the extra `flags` (e.g. ("--config.batch_size=16", "--config.num_samples=2")); its output goes to
    # <output_dir>/samples.
    c.generation = ml_collections.ConfigDict()
    c.generation.config = ""  # "" = configs/generate.py of this installation
    c.generation.duration = float(arg.duration)
    c.generation.preset = ""  # further preset options, e.g. "task=sound"
    c.generation.flags = ("--config.seed=0",)
    return c
