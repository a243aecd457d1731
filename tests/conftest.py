"""Test-wide setup (8 simulated CPU devices, no hub access, absl flags parsed for grain workers) and the fixtures
several test folders share."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import pytest  # noqa: E402
from absl import flags  # noqa: E402

from data_pipelines.make_tiny_assets import make_assets, make_random_lm  # noqa: E402
from data_pipelines.synthetic_corpus import generate_corpus  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny model on disk as a user has it: a synthetic corpus, its codec and T5 (`make_assets`), and a random
    converted MAGNeT checkpoint of 1 s segments (`root`, `codec`, `t5`, `lm` paths)."""
    root = tmp_path_factory.mktemp("tiny")
    generate_corpus(root / "corpus", num_clips=4, seconds=1.0, seed=0)
    assets = make_assets(root / "corpus", root / "assets")
    return {"root": root, **assets, "lm": make_random_lm(root / "lm", assets, segment_seconds=1.0)}


@pytest.fixture(scope="session")
def encoded_splits():
    """`encode(root, codec, clips, seconds, segment_seconds, records_per_shard)`: synthetic train (seed 0) and eval
    (seed 1) corpora of `clips = (train, eval)` clips under `root/audio_{split}`, encoded with the codec directory
    `codec` into ArrayRecord shards under `root/codes_{split}`."""
    from data_pipelines import encode_audio
    from magnet_jax.checkpoints.encodec_weights import load_encodec

    def encode(root, codec, clips, seconds, segment_seconds, records_per_shard):
        codec_config, codec_params = load_encodec(codec)
        for split, seed, count in (("train", 0, clips[0]), ("eval", 1, clips[1])):
            generate_corpus(root / f"audio_{split}", num_clips=count, seconds=seconds, seed=seed)
            encode_audio.run(
                str(root / f"audio_{split}"),
                str(root / f"codes_{split}"),
                codec_source=str(codec),
                codec_config=codec_config,
                codec_params=codec_params,
                segment_seconds=segment_seconds,
                chunk_seconds=segment_seconds,
                batch_size=8,
                records_per_shard=records_per_shard,
                log_every=0.0,
            )

    return encode
