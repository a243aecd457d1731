r"""Locally created text encoder and codec for the quickstart and tests (no downloads).

  python -m data_pipelines.make_tiny_assets --corpus=quickstart_out/corpus --output=quickstart_out/assets

Writes, in the on-disk formats the real models use:
  <output>/t5/     a random T5 encoder (`t5_dim` of the tiny preset) with a sentencepiece tokenizer trained on the
                   corpus descriptions (transformers layout: config.json, model.safetensors, spiece.model); the
                   tokenizer is BPE with up to `TOKENIZER_VOCAB` pieces, so a description's words are whole tokens
                   as with the real T5's vocabulary (a 128-piece unigram model cut most words into letters, and the
                   LM then had to find a key among 60 tokens)
  <output>/codec/  a random EnCodec of the tiny preset (configs/magnet.py `CODECS["tiny"]`, 32 kHz, 50 Hz, 4 x 64)
                   whose codebooks are fitted on corpus audio (`encodec.init_encodec`), in the transformers layout
                   (config.json + model.safetensors; plain conv weights, weight norm already folded)
Neither model is trained: they exercise the real pipeline (encode, train, generate) end to end, not music quality.
`make_random_lm` adds an untrained tiny LM in the converted-checkpoint format that names both, a complete model for
generation tests.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import soundfile as sf
from safetensors.numpy import save_file

from configs.magnet import get_config
from magnet_jax.checkpoints.encodec_weights import HF_CONFIG, HF_WEIGHTS, load_encodec, state_dict_from_params
from magnet_jax.checkpoints.pretrained import save_pretrained
from magnet_jax.checkpoints.t5_weights import write_random_t5
from magnet_jax.cli import quiet_logs
from magnet_jax.data.audio import to_codec_audio
from magnet_jax.models import encodec
from magnet_jax.models.encodec import EncodecConfig
from magnet_jax.models.lm import LanguageModel, LMConfig, init_params

TOKENIZER_VOCAB = 256  # the corpus descriptions' words fit in it


def corpus_descriptions(corpus: str | os.PathLike) -> list[str]:
    """The `description` (and other text fields) of every `.json` sidecar in `corpus`, as tokenizer training text."""
    texts = []
    for sidecar in sorted(Path(corpus).glob("*.json")):
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
        texts += [str(v) for k, v in meta.items() if isinstance(v, str)]
        texts += [" ".join(map(str, v)) for v in meta.values() if isinstance(v, list)]
    if not texts:
        raise ValueError(f"{corpus}: no .json sidecars with text (run data_pipelines.synthetic_corpus first)")
    return texts


def calibration_audio(corpus: str | os.PathLike, sample_rate: int, *, max_files: int = 8) -> np.ndarray:
    """Up to `max_files` corpus clips, mono at `sample_rate`, cut to the shortest: `[B, 1, N]` float32."""
    files = sorted(p for p in Path(corpus).iterdir() if p.suffix in (".wav", ".flac", ".ogg", ".mp3"))[:max_files]
    if not files:
        raise ValueError(f"{corpus}: no audio files")
    clips = []
    for f in files:
        wav, sr = sf.read(str(f), dtype="float32", always_2d=True)
        clips.append(to_codec_audio(wav.T[None], sr, sample_rate)[0])
    n = min(c.shape[-1] for c in clips)
    return np.stack([c[..., :n] for c in clips])


def hf_config(config: EncodecConfig) -> dict:
    """A transformers `EncodecConfig` dict describing `config` (the inverse of `EncodecConfig.from_hf_config`)."""
    bits = int(np.ceil(np.log2(config.card)))
    return {
        "model_type": "encodec",
        "sampling_rate": config.sample_rate,
        "audio_channels": config.channels,
        "upsampling_ratios": list(config.ratios),
        "num_filters": config.n_filters,
        "hidden_size": config.dimension,
        "codebook_dim": config.dimension,
        "codebook_size": config.card,
        "target_bandwidths": [config.n_q * np.ceil(config.frame_rate) * bits / 1000],
        "num_lstm_layers": config.num_lstm_layers,
        "pad_mode": config.pad_mode,
        "num_residual_layers": config.n_residual_layers,
        "compress": config.compress,
        "kernel_size": config.kernel_size,
        "last_kernel_size": config.last_kernel_size,
        "residual_kernel_size": config.residual_kernel_size,
        "dilation_growth_rate": config.dilation_base,
        "use_conv_shortcut": not config.true_skip,
        "use_causal_conv": False,
        "normalize": False,
        "norm_type": "weight_norm",
        "chunk_length_s": None,
        "overlap": None,
        "trim_right_ratio": 1.0,
    }


def write_codec(directory: str | os.PathLike, config: EncodecConfig, params) -> Path:
    """Writes codec `params` in the transformers layout (config.json + model.safetensors, for `load_encodec`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state_dict_from_params(config, params), str(directory / HF_WEIGHTS))
    (directory / HF_CONFIG).write_text(json.dumps(hf_config(config), indent=2) + "\n")
    return directory


def make_codec(
    directory: str | os.PathLike, config: EncodecConfig, calibration_wav: np.ndarray, *, seed: int = 0
) -> Path:
    """Writes a random codec with codebooks fitted on `calibration_wav` `[B, 1, N]` (loadable by `load_encodec`)."""
    return write_codec(directory, config, encodec.init_encodec(config, seed, calibration_wav))


def make_assets(
    corpus: str | os.PathLike, output: str | os.PathLike, *, seed: int = 0, codec: str | os.PathLike | None = None
) -> dict[str, Path]:
    """The tiny preset's text encoder and codec, built from the corpus: `{"t5": dir, "codec": dir}`.

    `codec`: a trained tiny codec directory (`data_pipelines.train_tiny_codec`) copied to `<output>/codec` instead
    of creating a random one.
    """
    tiny = get_config("size=tiny")
    output = Path(output)
    codec_config = EncodecConfig.from_config(tiny.codec)
    return {
        "t5": write_random_t5(
            output / "t5",
            corpus=corpus_descriptions(corpus),
            d_model=tiny.conditioner.t5_dim,
            vocab_size=TOKENIZER_VOCAB,
            tokenizer_type="bpe",
            seed=seed,
        ),
        "codec": (
            copy_codec(codec, output / "codec", codec_config)
            if codec
            else make_codec(
                output / "codec", codec_config, calibration_audio(corpus, codec_config.sample_rate), seed=seed
            )
        ),
    }


def copy_codec(source: str | os.PathLike, directory: str | os.PathLike, config: EncodecConfig) -> Path:
    """Copies a trained codec (config.json + model.safetensors) after checking it makes the codes the tiny preset's
    LM reads (sample rate, frame rate, codebooks and their size; its width may differ, as the quickstart's does)."""
    loaded, _ = load_encodec(source)
    fields = ("sample_rate", "hop_length", "card", "n_q", "channels")
    wrong = [
        f"{f} {getattr(loaded, f)} (expected {getattr(config, f)})"
        for f in fields
        if getattr(loaded, f) != getattr(config, f)
    ]
    if wrong:
        raise ValueError(f"codec {source}: not codes of the tiny preset: {', '.join(wrong)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name in (HF_CONFIG, HF_WEIGHTS):
        shutil.copyfile(Path(source) / name, directory / name)
    return directory


def make_random_lm(
    directory: str | os.PathLike, assets: dict[str, Path], *, segment_seconds: float, seed: int = 0
) -> Path:
    """An untrained tiny MAGNeT LM in the converted-checkpoint format (`pretrained.save_pretrained`) whose config
    names the `assets` text encoder and codec: a complete model for generation tests without training. Like the
    other assets it replaces an earlier one (the same seed writes the same model), so a rerun goes through."""
    tiny = get_config("size=tiny")
    model = LMConfig.from_config(tiny.model)
    params = nn.meta.unbox(init_params(LanguageModel(model), jax.random.key(seed)))
    generate = {k: v for k, v in tiny.generate.to_dict().items() if k != "duration"}
    save_pretrained(
        directory,
        params,
        {
            "model": model.to_dict(),
            "conditioner": {"t5": str(assets["t5"]), "t5_dim": tiny.conditioner.t5_dim},
            "codec": {"source": str(assets["codec"])},
            "segment_seconds": float(segment_seconds),
            "generate": {**generate, "span_len": tiny.masking.span_len},
            "provenance": {"source": "data_pipelines.make_tiny_assets", "weights": "random", "seed": seed},
        },
        overwrite=True,
    )
    return Path(directory)


def main(argv: Sequence[str]) -> None:
    del argv
    quiet_logs()
    try:
        paths = make_assets(FLAGS.corpus, FLAGS.output, seed=FLAGS.seed, codec=FLAGS.codec or None)
        if FLAGS.untrained_lm_seconds > 0:
            paths["untrained_lm"] = make_random_lm(
                Path(FLAGS.output) / "untrained_lm", paths, segment_seconds=FLAGS.untrained_lm_seconds, seed=FLAGS.seed
            )
    except (ValueError, OSError) as e:
        sys.exit(f"make_tiny_assets: {e}")
    for name, path in paths.items():
        print(f"{name}: {path.resolve()}")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string(
        "corpus", None, "directory of audio clips with .json sidecars (synthetic_corpus)", required=True
    )
    flags.DEFINE_string("output", None, "directory for t5/ and codec/", required=True)
    flags.DEFINE_integer("seed", 0, "seed of the random weights")
    flags.DEFINE_string("codec", "", "a trained tiny codec directory to use (default: a random codec)")
    flags.DEFINE_float("untrained_lm_seconds", 0.0, "also write untrained_lm/, an untrained tiny LM of this segment")
    FLAGS = flags.FLAGS
    app.run(main)
