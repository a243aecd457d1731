r"""TFDS builder over the code records of `data_pipelines.encode_audio` (`file_format='array_record'`, no TensorFlow).

  python -m data_pipelines.tfds_builder --data_dir=/data/tfds \
      --split=train:/data/codes/train/codes-*.array_record --split=eval:/data/codes/eval/codes-*.array_record

Then, from any process (the builder class is not needed to read):

  tfds.data_source("magnet_codes", data_dir="/data/tfds", split="train")   # random access, plugs into grain
  # or in training: config.data.train_files = "/data/tfds/magnet_codes/1.0.0"

Features: `codes` int16 `[K, T]`, `description` (text, "" when none), `metadata` (JSON text of the cleaned sidecar
fields), `source`, `offset`, `duration`, `segment_seconds`, `sample_rate`, `frame_rate`, `card`. Text arrives as
bytes; `magnet_jax.data.records.CodeRecord.from_example` turns an example back into a record.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from magnet_jax.cli import quiet_logs
from magnet_jax.data.records import CodeRecord, RecordError


class MagnetCodes(tfds.core.GeneratorBasedBuilder):
    """EnCodec code records as a TFDS dataset; `splits` maps a split name to shard globs (comma-separated)."""

    VERSION = tfds.core.Version("1.0.0")
    # tfds 4.9.10 resolves the source path of a builder that lives in a package through `importlib_resources`,
    # which it only installs on Python < 3.9; it only needs this file's path (to look for a checksums file).
    code_path = tfds.core.utils.classproperty(classmethod(lambda cls: epath.Path(__file__)))
    RELEASE_NOTES = {"1.0.0": "Code records of data_pipelines.encode_audio (record format version 1)."}

    def __init__(self, *, splits: Mapping[str, str] | None = None, **kwargs):
        self._split_files = dict(splits or {})
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        def scalar(dtype):  # stored as raw bytes: tf.train.Example floats would round float64 to float32
            return tfds.features.Tensor(shape=(), dtype=dtype, encoding="bytes")

        return tfds.core.DatasetInfo(
            builder=self,
            description="EnCodec codes of music/audio with text descriptions, for MAGNeT training (magnet_jax).",
            features=tfds.features.FeaturesDict(
                {
                    "codes": tfds.features.Tensor(shape=(None, None), dtype=np.int16, encoding="zlib"),
                    "description": tfds.features.Text(),
                    "metadata": tfds.features.Text(),
                    "source": tfds.features.Text(),
                    "offset": scalar(dtype=np.float64),
                    "duration": scalar(dtype=np.float64),
                    "segment_seconds": scalar(dtype=np.float64),
                    "sample_rate": scalar(dtype=np.int32),
                    "frame_rate": scalar(dtype=np.float64),
                    "card": scalar(dtype=np.int32),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing is downloaded: the shards are local
        if not self._split_files:
            raise RecordError("MagnetCodes needs splits={'train': '<glob of encode_audio shards>', ...}")
        return {name: self._generate_examples(files) for name, files in self._split_files.items()}

    def _generate_examples(self, files: str):
        from array_record.python.array_record_module import ArrayRecordReader

        from magnet_jax.data.input_pipeline import find_shards

        for path in find_shards(files):
            reader = ArrayRecordReader(path)
            try:
                for i in range(reader.num_records()):
                    record = CodeRecord.from_bytes(reader.read([i])[0], where=f"{path} record {i}")
                    yield f"{Path(path).name}/{i}", example_of(record)
            finally:
                reader.close()


def example_of(record: CodeRecord) -> dict:
    """The TFDS example of a record (inverse of `CodeRecord.from_example`)."""
    return {
        "codes": np.asarray(record.codes, np.int16),
        "description": record.description or "",
        "metadata": json.dumps(dict(record.metadata), ensure_ascii=False),
        "source": record.source,
        "offset": record.offset,
        "duration": record.duration,
        "segment_seconds": record.segment_seconds,
        "sample_rate": record.sample_rate,
        "frame_rate": record.frame_rate,
        "card": record.card,
    }


def build(data_dir: str, splits: Mapping[str, str]) -> Path:
    """Prepares the dataset under `data_dir`; returns its directory (`<data_dir>/magnet_codes/1.0.0`)."""
    builder = MagnetCodes(data_dir=data_dir, file_format="array_record", splits=splits)
    builder.download_and_prepare()
    return Path(builder.data_dir)


def main(argv):
    del argv
    quiet_logs()
    splits = {}
    for spec in FLAGS.split:
        name, sep, files = spec.partition(":")
        if not sep or not name or not files:
            sys.exit(f"tfds_builder: --split={spec!r}: expected <name>:<glob>[,<glob>...]")
        splits[name] = files
    try:
        path = build(FLAGS.data_dir, splits)
    except (RecordError, OSError) as e:
        sys.exit(f"tfds_builder: {e}")
    print(f"prepared {', '.join(splits)} in {path}")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("data_dir", None, "TFDS data directory to write into", required=True)
    flags.DEFINE_multi_string("split", None, "<split name>:<glob of encode_audio shards>", required=True)
    FLAGS = flags.FLAGS
    app.run(main)
