"""Grain input pipeline over code records: epochs, crops, exact resume (orbax, workers, process count), audiocraft
metadata parity, bad shards and records. (Audio files → codes → batches end to end: test_encode_audio.py.)"""

import dataclasses
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from data_pipelines import synthetic_corpus as sc
from data_pipelines.encode_audio import write_shard
from magnet_jax.checkpoints.t5_weights import write_random_t5
from magnet_jax.data import input_pipeline as ip
from magnet_jax.data.records import CodeRecord, RecordError, normalize_metadata, read_header, shard_name
from magnet_jax.data.tokenizer import TextTokenizer

NUM_CLIPS = 12


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """12 records (75 frames of random codes, synthetic-corpus metadata) in 3 shards written by the encode job's
    shard writer, and a tiny T5 tokenizer directory. (Audio → codes → batches end to end: test_encode_audio.py.)"""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    records = []
    for i in range(NUM_CLIPS):
        spec = sc.draw_spec(rng)
        records.append(
            CodeRecord(
                codes=rng.integers(0, 64, (4, 75)).astype(np.int16),
                sample_rate=32000,
                frame_rate=50.0,
                card=64,
                duration=1.5,
                segment_seconds=1.0,
                source=f"clip_{i:05d}.wav",
                metadata=normalize_metadata(spec.sidecar(f"clip {i}")),
            )
        )
    (root / "codes").mkdir()
    for s in range(3):
        write_shard(root / "codes" / shard_name(0, 1, s), [r.to_bytes() for r in records[4 * s : 4 * s + 4]])
    descriptions = [r.description for r in records] + ["key: bpm: genre: moods: keywords: instrument:"]
    t5_dir = write_random_t5(root / "t5", corpus=descriptions * 4, vocab_size=200)
    return {"files": str(root / "codes" / "*.array_record"), "records": records, "t5": str(t5_dir)}


def pipeline_config(data, **overrides) -> ip.PipelineConfig:
    base = dict(
        files=data["files"],
        global_batch_size=4,
        seq_len=50,
        max_text_len=48,
        sample_rate=32000,
        frame_rate=50.0,
        card=64,
        n_q=4,
        seed=0,
    )
    return ip.PipelineConfig(**{**base, **overrides})


def owner(records, window):
    """(record index, crop start) of a `[K, T]` window."""
    hits = [
        (i, s)
        for i, r in enumerate(records)
        for s in range(r.codes.shape[1] - window.shape[1] + 1)
        if np.array_equal(r.codes[:, s : s + window.shape[1]], window)
    ]
    assert len(hits) == 1, hits
    return hits[0]


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_every_epoch_visits_each_record_once_in_a_new_order(data):
    iterator = ip.make_iterator(
        pipeline_config(data), TextTokenizer(data["t5"], max_length=48), process_index=0, process_count=1
    )
    per_epoch = NUM_CLIPS // 4
    epochs = [[owner(data["records"], c)[0] for b in take(iterator, per_epoch) for c in b["codes"]] for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(NUM_CLIPS))
    assert epochs[0] != epochs[1]


def test_crops_are_seeded_uniform_windows(data):
    tokenizer = TextTokenizer(data["t5"], max_length=48)

    def batches(seed, n=9):
        iterator = ip.make_iterator(pipeline_config(data, seed=seed), tokenizer, process_index=0, process_count=1)
        return take(iterator, n)

    first = batches(0)
    starts = [owner(data["records"], c)[1] for b in first for c in b["codes"]]
    assert min(starts) >= 0 and max(starts) <= 25 and len(set(starts)) > 10  # T = 75 frames, crop 50
    assert_same_batches(first, batches(0))
    assert not np.array_equal(first[0]["codes"], batches(1, n=1)[0]["codes"])


@pytest.mark.parametrize("worker_count", [0, 2])
def test_restore_from_an_orbax_checkpoint_resumes_at_the_next_batch(data, tmp_path, worker_count):
    tokenizer = TextTokenizer(data["t5"], max_length=48, word_dropout=0.5)
    settings = pipeline_config(
        data, merge_text_p=0.5, drop_desc_p=0.5, drop_other_p=0.5, word_dropout=True, worker_count=worker_count
    )

    def new_iterator():
        return ip.make_iterator(settings, tokenizer, process_index=0, process_count=1)

    iterator = new_iterator()
    take(iterator, 5)  # crosses an epoch boundary (3 batches per epoch)
    manager = ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",))
    manager.save(5, args=ocp.args.Composite(data=ip.InputCheckpointSave(iterator)))
    manager.wait_until_finished()
    expected = take(iterator, 4)
    iterator.close()

    restored = new_iterator()
    manager.restore(5, args=ocp.args.Composite(data=ip.InputCheckpointRestore(restored)))
    assert_same_batches(take(restored, 4), expected)
    restored.close()
    assert [p.name for p in (tmp_path / "ckpt" / "5" / "data").glob("process_*")] == ["process_0-of-1.json"]
    if worker_count:  # the stream does not depend on the number of workers
        in_process = ip.make_iterator(
            dataclasses.replace(settings, worker_count=0), tokenizer, process_index=0, process_count=1
        )
        take(in_process, 5)
        assert_same_batches(take(in_process, 4), expected)


def test_restore_onto_another_process_count_continues_the_global_stream(data, tmp_path):
    tokenizer = TextTokenizer(data["t5"], max_length=48)
    settings = pipeline_config(data, global_batch_size=8)
    single = ip.make_iterator(settings, tokenizer, process_index=0, process_count=1)
    take(single, 2)
    manager = ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",))
    manager.save(2, args=ocp.args.Composite(data=ip.InputCheckpointSave(single)))
    manager.wait_until_finished()
    expected = take(single, 2)

    # as if written by a 2-process job: restoring in this 1-process run must fall back to their (global) state
    state_dir = tmp_path / "ckpt" / "2" / "data"
    saved = (state_dir / "process_0-of-1.json").read_text()
    (state_dir / "process_0-of-1.json").unlink()
    for i in range(2):
        (state_dir / f"process_{i}-of-2.json").write_text(saved)
    restored = ip.make_iterator(settings, tokenizer, process_index=0, process_count=1)
    manager.restore(2, args=ocp.args.Composite(data=ip.InputCheckpointRestore(restored)))
    assert_same_batches(take(restored, 2), expected)

    # two processes resuming from that state: each global batch holds the same examples as before
    halves = []
    for index in range(2):
        part = ip.make_iterator(settings, tokenizer, process_index=index, process_count=2)
        part.set_state(restored.get_state() | {"global_next_index": 16})
        halves.append(take(part, 2))
    for step in range(2):
        whole = Counter(expected[step]["codes"][i].tobytes() for i in range(8))
        split = Counter(halves[p][step]["codes"][i].tobytes() for p in range(2) for i in range(4))
        assert whole == split

    plain = ip.make_dataset(ip.open_source(data["files"]), settings, tokenizer)
    grain_iterator = plain.to_iter_dataset().__iter__()
    with pytest.raises(ValueError, match=r"saved by 2 processes, restoring on 1; only magnet_jax"):
        manager.restore(2, args=ocp.args.Composite(data=ip.InputCheckpointRestore(grain_iterator)))


def test_restoring_the_state_of_another_dataset_is_refused(data):
    tokenizer = TextTokenizer(data["t5"], max_length=48)
    iterator = ip.make_iterator(pipeline_config(data), tokenizer, process_index=0, process_count=1)
    state = iterator.get_state()
    other = ip.make_iterator(pipeline_config(data, seed=3), tokenizer, process_index=0, process_count=1)
    with pytest.raises(ValueError, match=r"saved for another dataset \(seed 0 -> 3\)"):
        other.set_state(state)
    with pytest.raises(ValueError, match=r"num_records 99 -> 12"):
        iterator.set_state(state | {"num_records": 99})


def test_metadata_cleaning_and_merge_match_audiocraft():
    from references import audiocraft_stubs

    audiocraft_stubs.install()
    from audiocraft.data.audio_dataset import AudioMeta
    from audiocraft.data.music_dataset import MusicInfo, augment_music_info_description

    segment = dict(
        meta=AudioMeta(path="a.wav", duration=10.0, sample_rate=32000),
        seek_time=0.0,
        n_frames=320000,
        total_frames=320000,
        sample_rate=32000,
        channels=1,
    )  # what MusicDataset merges in

    infos = [
        {
            "description": "Calm piano piece.",
            "key": "c major",
            "bpm": 92.0,
            "genre": "classical",
            "moods": ["calm", "soft"],
            "keywords": ["piano"],
            "instrument": "piano",
        },
        {"description": "No metadata at all"},
        {"key": "a minor", "genre": "rock", "moods": ["dark"]},  # no description
        {"description": "Only bpm", "bpm": 120.0},
    ]

    sidecars = [  # audiocraft's per-field cleaning, applied once by the encode job (records.normalize_metadata)
        {
            "description": "  A song.  ",
            "genre": " Rock ",
            "bpm": "120",
            "key": "C, G",
            "moods": "Happy, upbeat",
            "keywords": ["Guitar", "None", ""],
            "instrument": "Piano",
            "title": "None",
            "artist": "",
        },
        {"genre": ["not", "a", "string"], "bpm": "fast", "key": " A Minor ", "moods": float("nan"), "keywords": 3},
    ]
    for raw in sidecars:
        reference = MusicInfo.from_dict({**raw, **segment}, fields_required=False)
        expected = {
            k: getattr(reference, k)
            for k in ("title", "artist", "key", "bpm", "genre", "moods", "keywords", "description", "instrument")
        }
        assert normalize_metadata(raw) == {k: v for k, v in expected.items() if v is not None}

    def pieces(text):
        return None if text is None else sorted(text.split(". "))

    for info in infos:
        for p in [(0.0, 0.0, 0.0), (1.0, 0.0, 1.0), (1.0, 1.0, 1.0), (1.0, 0.0, 0.0), (1.0, 1.0, 0.0), (0.0, 1.0, 1.0)]:
            ours = ip.merge_metadata(
                info.get("description"), info, random.Random(0), merge_text_p=p[0], drop_desc_p=p[1], drop_other_p=p[2]
            )
            music_info = MusicInfo.from_dict({**info, **segment}, fields_required=False)
            if p[0]:  # MusicDataset only augments when merge_text_p is non-zero
                music_info = augment_music_info_description(music_info, *p)
            reference = music_info.description
            assert pieces(ours) == pieces(reference), (info, p, ours, reference)

    # rates: a field is merged with probability merge_text_p * drop_other_p, the description dropped with
    # merge_text_p * drop_desc_p (4000 draws: standard error 0.005)
    rng = random.Random(1)
    outs = [
        ip.merge_metadata("Desc", infos[0], rng, merge_text_p=0.25, drop_desc_p=0.5, drop_other_p=0.5) or ""
        for _ in range(4000)
    ]
    assert abs(np.mean(["genre: classical" in o for o in outs]) - 0.125) < 0.02
    assert abs(np.mean([not o.startswith("Desc") for o in outs]) - 0.125) < 0.02


def _write_records(path, records):
    writer = ArrayRecordWriter(str(path), "group_size:1")
    for r in records:
        writer.write(r if isinstance(r, bytes) else r.to_bytes())
    writer.close()


def test_damaged_or_foreign_shards_are_clear_errors(data, tmp_path):
    tokenizer = TextTokenizer(data["t5"], max_length=48)
    good = Path(data["files"]).parent / "codes-p00000-of-00001-s00000.array_record"

    def open_iterator(files, **overrides):
        return ip.make_iterator(
            pipeline_config(data, files=files, **overrides), tokenizer, process_index=0, process_count=1
        )

    truncated = tmp_path / "truncated.array_record"
    truncated.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(RecordError, match=rf"{re.escape(str(truncated))}: not a readable ArrayRecord shard"):
        open_iterator(str(truncated))
    empty = tmp_path / "empty.array_record"
    _write_records(empty, [])
    with pytest.raises(RecordError, match=rf"{re.escape(str(empty))}: shard has no records"):
        open_iterator(str(empty))
    garbage = tmp_path / "garbage.array_record"
    garbage.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(RecordError, match=rf"{re.escape(str(garbage))}: not a readable ArrayRecord shard"):
        open_iterator(str(garbage))
    with pytest.raises(RecordError, match=r"no file matches"):
        open_iterator(str(tmp_path / "none-*.array_record"))

    # a damaged chunk inside an otherwise valid shard: the read names the shard and the record
    payload = bytearray(good.read_bytes())
    payload[200] ^= 0xFF  # inside the first record's (compressed, hashed) chunk
    damaged = tmp_path / "damaged.array_record"
    damaged.write_bytes(bytes(payload))
    source = ip.CodesSource([str(damaged)])
    assert CodeRecord.from_bytes(source[1]).source == data["records"][1].source  # the other records still read
    with pytest.raises(RecordError, match=rf"{re.escape(str(damaged))} record 0: cannot be read \(Corrupted Riegeli"):
        source[0]

    foreign = tmp_path / "foreign.array_record"
    _write_records(foreign, [b'{"some": "json"}'])
    with pytest.raises(RecordError, match=rf"{re.escape(str(foreign))} record 0: not a magnet_jax code record"):
        open_iterator(str(foreign))

    record = data["records"][0]
    other_codec = tmp_path / "other.array_record"
    _write_records(other_codec, [dataclasses.replace(record, sample_rate=16000, frame_rate=50.0)])
    with pytest.raises(
        RecordError,
        match=r"encoded by a codec with sample_rate 16000, frame_rate 50, card 64, 4 "
        r"codebooks; the config expects 32000, 50, 64, 4",
    ):
        open_iterator(str(other_codec))
    with pytest.raises(
        RecordError,
        match=r"encoded with segment_seconds 1 \(50 frames\) but training crops "
        r"seq_len 100",
    ):
        open_iterator(data["files"], seq_len=100)


def test_records_round_trip_and_detect_damage():
    record = CodeRecord(
        codes=np.arange(40, dtype=np.int16).reshape(4, 10) % 7,
        sample_rate=16000,
        frame_rate=50.0,
        card=7,
        duration=0.2,
        segment_seconds=0.2,
        source="a/b.flac",
        offset=1.5,
        metadata={"description": "déjà vu", "moods": ["x"]},
    )
    data = record.to_bytes()
    back = CodeRecord.from_bytes(data)
    np.testing.assert_array_equal(back.codes, record.codes)
    assert back.codes.dtype == np.int16 and back.description == "déjà vu"
    assert {k: v for k, v in back.__dict__.items() if k != "codes"} == {
        k: v for k, v in record.__dict__.items() if k != "codes"
    }
    assert read_header(data)["codes_shape"] == [4, 10]

    flipped = bytearray(data)
    flipped[-3] ^= 0x01
    with pytest.raises(RecordError, match=r"shard.ar record 3 \(a/b.flac\): codes payload is damaged"):
        CodeRecord.from_bytes(bytes(flipped), where="shard.ar record 3")
    with pytest.raises(RecordError, match=r"codes payload is damaged"):
        CodeRecord.from_bytes(data[:-2])
    with pytest.raises(RecordError, match=r"record format version 2, this reader expects 1"):
        CodeRecord.from_bytes(data.replace(b'"version":1', b'"version":2'))
    with pytest.raises(RecordError, match=r"a/b.flac: codes outside \[0, 7\)"):
        CodeRecord(**{**record.__dict__, "codes": record.codes + 1}).to_bytes()
