"""Audio → codes job: real audio files in, ArrayRecord shards of EnCodec codes out; resume; bad input."""

import dataclasses
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from array_record.python.array_record_module import ArrayRecordReader

from configs.magnet import get_config
from data_pipelines import encode_audio as ea
from data_pipelines import synthetic_corpus as sc
from magnet_jax import sharding
from magnet_jax.checkpoints.t5_weights import write_random_t5
from magnet_jax.data import input_pipeline
from magnet_jax.data.records import CodeRecord, normalize_metadata
from magnet_jax.data.tokenizer import TextTokenizer
from magnet_jax.models import encodec

REPO = Path(__file__).resolve().parents[2]
SR = 32000  # the tiny codec's rate (50 Hz, hop 640)
JOB = dict(segment_seconds=1.0, chunk_seconds=1.0, batch_size=8, records_per_shard=2, log_every=0.0)


@functools.cache
def tiny_codec():
    """The tiny codec of configs/magnet.py (size=tiny), codebooks fitted on synthetic music."""
    config = encodec.EncodecConfig.from_config(get_config("size=tiny").codec)
    rng = np.random.default_rng(0)
    wavs = [sc.render(sc.draw_spec(rng), 1.5, SR, rng) for _ in range(4)]
    return config, encodec.init_encodec(config, 0, np.stack(wavs)[:, None])


def read_shard(path) -> list[CodeRecord]:
    reader = ArrayRecordReader(str(path))
    try:
        return [CodeRecord.from_bytes(b) for b in reader.read(list(range(reader.num_records())))]
    finally:
        reader.close()


def read_all(out_dir) -> dict[str, CodeRecord]:
    return {r.source: r for p in sorted(Path(out_dir).glob("*.array_record")) for r in read_shard(p)}


def run_job(input_dir, out_dir, **overrides):
    config, params = tiny_codec()
    return ea.run(
        str(input_dir),
        str(out_dir),
        codec_source="tiny",
        codec_config=config,
        codec_params=params,
        **{**JOB, **overrides},
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Five 1.5 s clips, 32 kHz mono WAV (no resampling: codes can be compared with the codec directly)."""
    return sc.generate_corpus(tmp_path_factory.mktemp("corpus"), num_clips=5, seconds=1.5, seed=0, sample_rate=SR)


def test_codes_match_the_codec_on_each_file(corpus, tmp_path):
    summary = run_job(corpus[0].parent, tmp_path)
    assert summary["encoded"] == 5 and summary["skipped"] == 0 and summary["shards"] == 3
    assert sorted(p.name for p in tmp_path.glob("*.array_record")) == [
        f"codes-p00000-of-00001-s0000{s}.array_record" for s in range(3)
    ]
    config, params = tiny_codec()
    found = read_all(tmp_path)
    for path in corpus:
        record = found[str(path)]
        wav = sf.read(str(path), dtype="float32")[0]
        # windows of different files share device batches; each file must still get exactly its own codes
        expected = encodec.encode_long(config, params, wav[None, None], chunk_seconds=1.0)[0]
        assert record.codes.dtype == np.int16 and record.codes.shape == (4, 75)
        np.testing.assert_array_equal(record.codes, expected)
        assert all(len(np.unique(level)) > 5 for level in record.codes)  # not a degenerate codec
        assert record.duration == pytest.approx(1.5) and record.offset == 0.0
        assert (record.sample_rate, record.frame_rate, record.card) == (SR, 50.0, config.card)
        assert record.metadata == normalize_metadata(json.loads(path.with_suffix(".json").read_text()))
        assert record.description.startswith("A ")


def test_encoded_files_come_out_of_the_input_pipeline_as_global_batches(corpus, tmp_path):
    """Audio files → encode job → ArrayRecord shards → grain pipeline → sharded batches on an 8-device mesh."""
    run_job(corpus[0].parent, tmp_path / "codes")
    records = list(read_all(tmp_path / "codes").values())
    t5_dir = write_random_t5(tmp_path / "t5", corpus=[r.description for r in records] * 8, vocab_size=120)
    config = get_config("size=tiny")
    config.data.train_files = str(tmp_path / "codes" / "*.array_record")
    config.data.segment_seconds = 1.0
    config.data.batch_size = 8
    config.data.merge_text_p = 0.0
    config.conditioner.max_length = 48
    settings = input_pipeline.PipelineConfig.from_config(config, train=True)
    assert (settings.seq_len, settings.word_dropout) == (50, True)
    settings = dataclasses.replace(settings, word_dropout=False)  # so the text can be compared exactly below
    tokenizer = TextTokenizer(str(t5_dir), max_length=48)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    batch_sharding = sharding.batch_sharding(mesh, sharding.logical_rules(config))

    batch = next(input_pipeline.make_iterator(settings, tokenizer, sharding=batch_sharding))
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        "codes": ((8, 4, 50), np.int32),
        "text_ids": ((8, 48), np.int32),
        "text_mask": ((8, 48), np.int32),
    }
    for value in batch.values():
        assert value.sharding == batch_sharding and len(value.addressable_shards) == 8
        assert value.addressable_shards[0].data.shape[0] == 1
    seen = set()
    for codes, ids, mask in zip(*(np.asarray(batch[k]) for k in ("codes", "text_ids", "text_mask"))):
        (record,) = [r for r in records if any(np.array_equal(r.codes[:, s : s + 50], codes) for s in range(26))]
        seen.add(record.source)
        expected = tokenizer([record.description])["ids"][0]
        np.testing.assert_array_equal(ids[: len(expected)], expected)
        assert not ids[len(expected) :].any() and mask.sum() == len(expected)
    assert len(seen) == 5  # 8 examples from 5 records: every record once in the first epoch


def test_audio_is_downmixed_and_resampled_to_the_codec_rate(tmp_path):
    t = np.arange(int(44100 * 1.2)) / 44100
    stereo = np.stack([0.5 * np.sin(2 * np.pi * 440 * t), 0.3 * np.sin(2 * np.pi * 440 * t)], axis=1)
    sf.write(str(tmp_path / "a.flac"), stereo, 44100)
    (tmp_path / "a.json").write_text('{"description": "a tone"}')
    loaded = ea.load_audio(
        ea.AudioItem(str(tmp_path / "a.flac")),
        sample_rate=SR,
        segment_seconds=1.0,
        min_segment_ratio=0.8,
        allow_missing_metadata=False,
    )
    assert loaded.wav.shape == (int(1.2 * SR),) and loaded.duration == pytest.approx(1.2)
    expected = 0.4 * np.sin(2 * np.pi * 440 * np.arange(loaded.wav.shape[0]) / SR)  # channel mean
    inner = slice(SR // 10, -SR // 10)  # away from the resampler's edge transients
    np.testing.assert_allclose(loaded.wav[inner], expected[inner], atol=2e-4)


def test_short_files_are_zero_padded_to_the_segment_or_skipped(tmp_path):
    config, params = tiny_codec()
    rng = np.random.default_rng(1)
    music = sc.render(sc.draw_spec(rng), 1.0, SR, rng)
    for name, seconds in (("ok", 0.9), ("short", 0.5)):
        sf.write(str(tmp_path / f"{name}.wav"), music[: int(seconds * SR)], SR, subtype="FLOAT")
        (tmp_path / f"{name}.json").write_text(json.dumps({"description": name}))
    summary = run_job(tmp_path, tmp_path / "out")
    assert summary["skipped_files"] == [
        {"path": str(tmp_path / "short.wav"), "reason": "too short: 0.50 s < 0.8 x 1 s segment"}
    ]
    record = read_all(tmp_path / "out")[str(tmp_path / "ok.wav")]
    assert record.duration == pytest.approx(0.9) and record.codes.shape == (4, 50)  # the full 1 s segment
    padded = np.pad(music[: int(0.9 * SR)], (0, SR - int(0.9 * SR)))
    np.testing.assert_array_equal(record.codes, np.asarray(encodec.encode(config, params, padded[None, None]))[0])


def test_bad_files_are_skipped_with_their_reason_and_the_rest_encoded(corpus, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for path in corpus[:2]:
        (src / path.name).write_bytes(path.read_bytes())
        (src / path.with_suffix(".json").name).write_bytes(path.with_suffix(".json").read_bytes())
    (src / "corrupt.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt garbage" * 20)
    sf.write(str(src / "empty.wav"), np.zeros((0,), np.float32), SR)
    nan = np.full(SR, np.nan, np.float32)
    sf.write(str(src / "nan.wav"), nan, SR, subtype="FLOAT")
    sf.write(str(src / "no_sidecar.wav"), np.ones(SR, np.float32) * 0.1, SR)
    (src / "bad_sidecar.wav").write_bytes((src / corpus[0].name).read_bytes())
    (src / "bad_sidecar.json").write_text("{not json")
    for name in ("corrupt", "empty", "nan"):
        (src / f"{name}.json").write_text('{"description": "x"}')

    summary = run_job(src, tmp_path / "out")
    reasons = {Path(s["path"]).name: s["reason"] for s in summary["skipped_files"]}
    assert reasons.keys() == {"corrupt.wav", "empty.wav", "nan.wav", "no_sidecar.wav", "bad_sidecar.wav"}
    assert reasons["corrupt.wav"].startswith("unreadable audio (")
    assert reasons["empty.wav"] == "empty (no audio samples)"
    assert reasons["nan.wav"] == "audio contains NaN or Inf samples"
    assert reasons["no_sidecar.wav"].startswith("no sidecar metadata no_sidecar.json")
    assert reasons["bad_sidecar.wav"].startswith("sidecar bad_sidecar.json is not valid JSON")
    assert sorted(Path(p).name for p in read_all(tmp_path / "out")) == sorted(p.name for p in corpus[:2])
    saved = json.loads((tmp_path / "out" / "summary-p00000-of-00001.json").read_text())
    assert saved["skipped_files"] == summary["skipped_files"] and saved["encoded"] == 2
    assert "skipped 5 files:" in ea.format_summary(summary)

    again = run_job(src, tmp_path / "out2", allow_missing_metadata=True)
    assert "no_sidecar.wav" not in {Path(s["path"]).name for s in again["skipped_files"]}
    assert read_all(tmp_path / "out2")[str(src / "no_sidecar.wav")].description is None


def test_an_interrupted_job_resumes_and_skips_finished_shards(corpus, tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    run_job(corpus[0].parent, reference)
    out = tmp_path / "out"
    real_write = ea.write_shard
    calls = []

    def crash_on_second_shard(path, payloads):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated preemption")
        real_write(path, payloads)

    monkeypatch.setattr(ea, "write_shard", crash_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        run_job(corpus[0].parent, out)
    monkeypatch.setattr(ea, "write_shard", real_write)
    assert [p.name for p in out.glob("*.array_record")] == ["codes-p00000-of-00001-s00000.array_record"]
    first = out / "codes-p00000-of-00001-s00000.array_record"
    first_mtime = first.stat().st_mtime_ns
    (out / ".tmp-otherhost-99999-codes-p00000-of-00001-s00001.array_record").write_bytes(b"partial")  # a crash's

    summary = run_job(corpus[0].parent, out)
    assert summary["shards_resumed"] == 1 and summary["shards_written"] == 2 and summary["encoded"] == 5
    assert first.stat().st_mtime_ns == first_mtime  # finished shard not redone
    assert not list(out.glob(".*tmp*"))
    for name in ("s00000", "s00001", "s00002"):
        shard = f"codes-p00000-of-00001-{name}.array_record"
        assert (out / shard).read_bytes() == (reference / shard).read_bytes()

    # a damaged finished shard (truncated) is detected and redone
    (out / "codes-p00000-of-00001-s00002.array_record").write_bytes(b"")
    summary = run_job(corpus[0].parent, out)
    assert summary["shards_resumed"] == 2 and summary["shards_written"] == 1
    assert (out / "codes-p00000-of-00001-s00002.array_record").read_bytes() == (
        reference / "codes-p00000-of-00001-s00002.array_record"
    ).read_bytes()


def test_resuming_with_other_settings_is_refused(corpus, tmp_path):
    run_job(corpus[0].parent, tmp_path, records_per_shard=5)
    with pytest.raises(
        ea.EncodeJobError,
        match=r"holds the output of a job with other settings \(segment_seconds: "
        r"1\.0 -> 1\.2\)",
    ):
        run_job(corpus[0].parent, tmp_path, records_per_shard=5, segment_seconds=1.2)


def test_processes_take_disjoint_shares_covering_every_file(corpus, tmp_path):
    for index in range(2):
        run_job(corpus[0].parent, tmp_path, process_index=index, process_count=2)
    names = sorted(p.name for p in tmp_path.glob("*.array_record"))
    assert names == [
        "codes-p00000-of-00002-s00000.array_record",
        "codes-p00000-of-00002-s00001.array_record",
        "codes-p00001-of-00002-s00000.array_record",
    ]
    sources = [r.source for p in sorted(tmp_path.glob("*.array_record")) for r in read_shard(p)]
    assert sorted(sources) == sorted(map(str, corpus))


def test_manifest_entries_with_offsets_inline_metadata_and_stale_fields(corpus, tmp_path):
    config, params = tiny_codec()
    manifest = tmp_path / "train.jsonl"
    rel = os.path.relpath(corpus[0], tmp_path)
    manifest.write_text(
        "\n".join(
            json.dumps(e)
            for e in [
                {"path": rel, "offset": 0.25, "excerpt_seconds": 1.0, "description": "inline text", "bpm": "98"},
                {"path": str(corpus[1]), "duration": 1.5, "sample_rate": SR},  # audiocraft manifest fields, consistent
                {"path": str(corpus[2]), "duration": 1.5, "sample_rate": 44100},  # stale
            ]
        )
        + "\n"
    )
    summary = run_job(manifest, tmp_path / "out")
    assert summary["skipped_files"] == [
        {"path": str(corpus[2]), "reason": "manifest says sample_rate 44100 but the file is 32000 Hz (stale manifest?)"}
    ]
    found = read_all(tmp_path / "out")
    excerpt = found[str(tmp_path / rel)]
    assert excerpt.offset == 0.25 and excerpt.duration == pytest.approx(1.0)
    assert excerpt.description == "inline text" and excerpt.metadata["bpm"] == 98.0
    assert excerpt.metadata["genre"] == json.loads(corpus[0].with_suffix(".json").read_text())["genre"]
    wav = sf.read(str(corpus[0]), dtype="float32")[0][int(0.25 * SR) : int(1.25 * SR)]
    np.testing.assert_array_equal(excerpt.codes, np.asarray(encodec.encode(config, params, wav[None, None]))[0])

    manifest.write_text('{"path": "a.wav"}\nnot json\n')
    with pytest.raises(ea.EncodeJobError, match=r"train\.jsonl:2: not a JSON object"):
        ea.list_inputs(manifest)


def test_empty_or_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(ea.EncodeJobError, match=r"directory has no audio files"):
        ea.list_inputs(tmp_path)
    with pytest.raises(ea.EncodeJobError, match=r"no such file or directory"):
        ea.list_inputs(tmp_path / "missing")


def _write_codec_dir(directory):
    """The tiny codec as a locally created codec directory (transformers layout, as the quickstart writes it)."""
    from safetensors.numpy import save_file

    from data_pipelines.make_tiny_assets import hf_config
    from magnet_jax.checkpoints.encodec_weights import state_dict_from_params

    config, params = tiny_codec()
    directory.mkdir()
    save_file(state_dict_from_params(config, params), str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(hf_config(config)))


def test_cli_encodes_a_directory_and_reports_errors_in_one_line(corpus, tmp_path):
    codec_dir = tmp_path / "codec"
    _write_codec_dir(codec_dir)
    src = tmp_path / "in"
    src.mkdir()
    for path in corpus[:2]:
        (src / path.name).write_bytes(path.read_bytes())
        (src / path.with_suffix(".json").name).write_bytes(path.with_suffix(".json").read_bytes())
    (src / "corrupt.wav").write_bytes(b"not audio at all")
    (src / "corrupt.json").write_text('{"description": "x"}')
    base = [
        sys.executable,
        "-m",
        "data_pipelines.encode_audio",
        f"--codec={codec_dir}",
        "--segment_seconds=1",
        "--chunk_seconds=1",
        "--records_per_shard=2",
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}

    ok = subprocess.run(
        base + [f"--input={src}", f"--output={tmp_path}/out"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "encoded 2/3 files" in ok.stdout and f"{src / 'corrupt.wav'}: unreadable audio" in ok.stdout
    found = read_all(tmp_path / "out")
    assert sorted(found) == sorted(str(src / p.name) for p in corpus[:2])
    in_process = read_all(run_job(src, tmp_path / "in_process", records_per_shard=2)["output"])
    for source, record in found.items():  # the loaded codec directory encodes exactly like the in-memory codec
        np.testing.assert_array_equal(record.codes, in_process[source].codes)

    (tmp_path / "empty").mkdir()
    for args, message in (
        (
            [f"--input={tmp_path}/empty", f"--output={tmp_path}/o"],
            f"encode_audio: --input={tmp_path}/empty: directory has no audio files (.wav, .flac, .ogg, .mp3)",
        ),
        (
            [f"--input={src}", f"--output={tmp_path}/o", f"--codec={tmp_path}/nowhere"],
            f"encode_audio: EnCodec weights: {tmp_path}/nowhere is neither",
        ),
    ):
        bad = subprocess.run(base + args, cwd=REPO, env=env, capture_output=True, text=True)
        assert bad.returncode == 1
        assert bad.stderr.strip().splitlines()[-1].startswith(message), bad.stderr[-2000:]


def test_a_damaged_record_inside_a_finished_shard_is_found_by_its_checksum_and_the_shard_redone(corpus, tmp_path):
    out = tmp_path / "out"
    run_job(corpus[0].parent, out)
    shard = out / "codes-p00000-of-00001-s00001.array_record"
    original = shard.read_bytes()
    assert json.loads(shard.with_suffix(".json").read_text())["shard"]["size"] == len(original)
    damaged = bytearray(original)
    damaged[len(damaged) // 3] ^= 0x40  # inside a record's codes: the record count is unchanged
    shard.write_bytes(bytes(damaged))
    assert shard_record_count(shard) == 2  # what a count-only resume check accepted

    summary = run_job(corpus[0].parent, out)
    assert summary["shards_resumed"] == 2 and summary["shards_written"] == 1
    assert shard.read_bytes() == original


def shard_record_count(path) -> int:
    reader = ArrayRecordReader(str(path))
    try:
        return reader.num_records()
    finally:
        reader.close()


def test_a_second_encode_job_on_the_same_output_is_refused(corpus, tmp_path):
    import socket

    out = tmp_path / "out"
    out.mkdir()
    lock = out / ".lock-p00000-of-00001"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid(), "since": "now"}))
    with pytest.raises(ea.EncodeJobLocked, match=rf"{out} is in use by another job \(pid {os.getppid()} on this"):
        run_job(corpus[0].parent, out)
    assert not list(out.glob("*.array_record"))
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": 2**22 + 7, "since": "then"}))  # died
    assert run_job(corpus[0].parent, out)["encoded"] == 5
    assert not lock.exists()
