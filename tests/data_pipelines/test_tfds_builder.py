"""TFDS builder over encode-job shards: array_record output, read back without TensorFlow or the builder class."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_pipelines import tfds_builder
from data_pipelines.encode_audio import write_shard
from magnet_jax.data import input_pipeline as ip
from magnet_jax.data.records import CodeRecord, shard_name

REPO = Path(__file__).resolve().parents[2]


def _records(n, seed):
    rng = np.random.default_rng(seed)
    return [
        CodeRecord(
            codes=rng.integers(0, 64, (4, 60 + i)).astype(np.int16),
            sample_rate=32000,
            frame_rate=50.0,
            card=64,
            duration=1.2 + i / 50,
            segment_seconds=1.0,
            source=f"/audio/{seed}_{i}.wav",
            offset=0.5 * i,
            metadata={
                "description": f"piece {i} – café" if i % 3 else None,
                "genre": "jazz",
                "bpm": 100.0 + i,
                "moods": ["calm", "warm"],
            },
        )
        for i in range(n)
    ]


def _clean(record: CodeRecord) -> CodeRecord:
    return CodeRecord(**{**record.__dict__, "metadata": {k: v for k, v in record.metadata.items() if v is not None}})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    splits = {"train": _records(7, 0), "eval": _records(3, 1)}
    for name, records in splits.items():
        (root / name).mkdir()
        write_shard(root / name / shard_name(0, 1, 0), [_clean(r).to_bytes() for r in records[:4]])
        write_shard(root / name / shard_name(0, 1, 1), [_clean(r).to_bytes() for r in records[4:]])
    path = tfds_builder.build(str(root / "data"), {n: str(root / n / "*.array_record") for n in splits})
    return {"root": root, "dir": path, "splits": {n: [_clean(r) for r in rs] for n, rs in splits.items()}}


def test_builder_writes_array_record_splits_that_decode_to_the_records(prepared):
    import tensorflow_datasets as tfds

    assert prepared["dir"] == prepared["root"] / "data" / "magnet_codes" / "1.0.0"
    assert sorted(p.name for p in prepared["dir"].glob("*.array_record*")) == [
        "magnet_codes-eval.array_record-00000-of-00001",
        "magnet_codes-train.array_record-00000-of-00001",
    ]
    for split, records in prepared["splits"].items():
        source = tfds.data_source("magnet_codes", data_dir=str(prepared["root"] / "data"), split=split)
        assert len(source) == len(records)
        by_source = {r.source: r for r in records}
        for i in range(len(source)):
            example = source[i]
            assert example["codes"].dtype == np.int16
            got = CodeRecord.from_example(example)
            want = by_source.pop(got.source)
            np.testing.assert_array_equal(got.codes, want.codes)
            assert got.metadata == want.metadata and got.description == want.description
            assert example["description"].decode() == (want.description or "")
            assert (got.offset, got.duration, got.segment_seconds, got.sample_rate, got.frame_rate, got.card) == (
                want.offset,
                want.duration,
                want.segment_seconds,
                want.sample_rate,
                want.frame_rate,
                want.card,
            )
        assert not by_source


def test_a_fresh_process_reads_it_with_tfds_data_source_alone(prepared):
    code = (
        "import tensorflow_datasets as tfds, sys; "
        f"ds = tfds.data_source('magnet_codes', data_dir={str(prepared['root'] / 'data')!r}, split='train'); "
        "print(len(ds), ds[0]['codes'].shape[0], 'data_pipelines' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["7", "4", "False"]


def test_input_pipeline_reads_the_prepared_directory(prepared):
    records = prepared["splits"]["eval"]
    settings = ip.PipelineConfig(
        files=str(prepared["dir"]),
        split="eval",
        train=False,
        global_batch_size=1,
        seq_len=50,
        max_text_len=8,
        sample_rate=32000,
        frame_rate=50.0,
        card=64,
        n_q=4,
    )

    def tokenize(descriptions, *, word_dropout_key=None):
        assert word_dropout_key is None  # evaluation: no word dropout
        return {"ids": np.array([[len(descriptions[0] or "") + 2, 1]]), "mask": np.array([[1, 1]])}

    owners = []
    for batch in ip.make_iterator(settings, tokenize, process_index=0, process_count=1):
        (codes,) = batch["codes"]
        (owner,) = [
            r
            for r in records
            if any(np.array_equal(r.codes[:, s : s + 50], codes) for s in range(r.codes.shape[1] - 49))
        ]
        assert batch["text_ids"][0, 0] == len(owner.description or "") + 2
        owners.append(owner.source)
    assert sorted(owners) == sorted(r.source for r in records)  # one pass, every record once


def test_cli_builds_and_reports_bad_flags_in_one_line(prepared, tmp_path):
    base = [sys.executable, "-m", "data_pipelines.tfds_builder", f"--data_dir={tmp_path}"]
    ok = subprocess.run(
        base + [f"--split=train:{prepared['root']}/train/*.array_record"], cwd=REPO, capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert (tmp_path / "magnet_codes" / "1.0.0" / "dataset_info.json").is_file()
    for flag, message in (
        ("--split=train", "tfds_builder: --split='train': expected <name>:<glob>[,<glob>...]"),
        (
            f"--split=train:{tmp_path}/none-*.array_record",
            f"tfds_builder: data files '{tmp_path}/none-*.array_record': no file matches",
        ),
    ):
        bad = subprocess.run(
            base[:-1] + [f"--data_dir={tmp_path}/other", flag], cwd=REPO, capture_output=True, text=True
        )
        assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1] == message, bad.stderr[-2000:]
