"""Grain input pipeline: code records → per-process NumPy batches → global `jax.Array`s on the mesh.

Per record (a `MapDataset`, so every step is index-addressable and resumable):
  source (ArrayRecord shards of `data_pipelines.encode_audio`, or a TFDS `array_record` dataset directory)
  → seeded shuffle, reshuffled every epoch → repeat → one random map per record, its RNG derived from (seed, position
  in the repeated stream) so it is the same after a restore: random crop to `seq_len` frames, metadata merge into the
  description (docs/design.md §3), tokenization (with a word-dropout key when training) padded to `max_text_len`
  → `ProcessBlocks` + `grain.experimental.ElasticIterator`: process i of n holds rows [i·B/n, (i+1)·B/n) of every
  global batch of B (the same global batch for any n), batches `global_batch / n`, reads ahead in threads and
  optionally in `worker_count` processes.
The iterator state is the global number of examples consumed, identical on every process: a restore resumes at
exactly the next batch, with any number of workers or processes (`InputCheckpointSave`/`InputCheckpointRestore`).

Batch (per process): `codes` int32 `[B, K, T]`, `text_ids` int32 `[B, L]` (pad id 0, T5's), `text_mask` int32
`[B, L]`; given the batch sharding (`magnet_jax.sharding.batch_sharding(mesh, rules)`), global arrays
`[global_batch, ...]` assembled with `jax.make_array_from_process_local_data`.
"""

from __future__ import annotations

import bisect
import dataclasses
import glob
import json
import os
import random
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from magnet_jax.data.records import CodeRecord, RecordError, read_header

# metadata fields merged into descriptions, in audiocraft's MusicInfo field order
MERGE_FIELDS = ("key", "bpm", "genre", "moods", "keywords", "instrument")

TokenizeFn = Callable[..., Mapping[str, np.ndarray]]  # (descriptions, *, word_dropout_key=None) -> ids, mask


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Plain settings of one pipeline (`from_config` reads `data`, `codec` and `conditioner` of configs/magnet.py)."""

    files: str  # comma-separated globs of ArrayRecord shards, or a TFDS dataset directory
    global_batch_size: int
    seq_len: int  # T, code frames per example
    max_text_len: int  # L, token ids per description (static)
    sample_rate: int  # codec the records must come from
    frame_rate: float
    card: int
    n_q: int
    train: bool = True  # shuffle + repeat + text augmentation; eval reads once in order, drops the last partial batch
    seed: int = 0
    merge_text_p: float = 0.0
    drop_desc_p: float = 0.0
    drop_other_p: float = 0.0
    word_dropout: bool = False  # pass a per-record word-dropout key to the tokenizer
    split: str = "train"  # TFDS split (ignored for shard globs)
    worker_count: int = 0
    read_threads: int = 4
    prefetch: int = 4
    on_bad_record: str = "fail"  # a record that does not decode or holds codes outside [0, card): "fail" | "skip"

    @classmethod
    def from_config(cls, cfg, *, train: bool = True) -> PipelineConfig:
        data = cfg.data
        return cls(
            files=data.train_files if train else data.eval_files,
            global_batch_size=data.batch_size,
            seq_len=data.seq_len,
            max_text_len=cfg.conditioner.max_length,
            sample_rate=cfg.codec.sample_rate,
            frame_rate=float(cfg.codec.frame_rate),
            card=cfg.codec.card,
            n_q=cfg.codec.n_q,
            train=train,
            seed=data.shuffle_seed,
            merge_text_p=data.merge_text_p if train else 0.0,
            drop_desc_p=data.drop_desc_p,
            drop_other_p=data.drop_other_p,
            word_dropout=train and cfg.conditioner.word_dropout > 0,
            split="train" if train else "eval",
            worker_count=data.worker_count,
            prefetch=data.prefetch,
            on_bad_record=data.get("on_bad_record", "fail"),
        )


# ---- sources ------------------------------------------------------------------------------------------


def find_shards(files: str) -> list[str]:
    """Expands comma-separated globs into a sorted list of shard paths; an empty result is an error."""
    patterns = [p.strip() for p in files.split(",") if p.strip()]
    if not patterns:
        raise RecordError("data files: no shard pattern given (set data.train_files / data.eval_files)")
    paths = sorted({p for pattern in patterns for p in glob.glob(os.path.expanduser(pattern))})
    if not paths:
        raise RecordError(f"data files {files!r}: no file matches")
    return paths


class CodesSource:
    """Random access over the records of several ArrayRecord shards; read errors name the shard and record.

    Opening checks every shard's footer (a truncated or non-ArrayRecord file is an error naming it).
    """

    def __init__(self, paths: Sequence[str]):
        from array_record.python.array_record_module import ArrayRecordReader

        self.paths = list(paths)
        counts = []
        for path in self.paths:
            try:
                reader = ArrayRecordReader(path)
                counts.append(reader.num_records())
                reader.close()
            except Exception as e:
                raise RecordError(f"{path}: not a readable ArrayRecord shard ({_first_line(e)})") from None
            if counts[-1] == 0:
                raise RecordError(
                    f"{path}: shard has no records (truncated or damaged; re-run encode_audio, "
                    "which redoes incomplete shards)"
                )
        self.shard_starts = [int(i) for i in np.cumsum([0] + counts[:-1])]  # index of each shard's first record
        self._len = int(sum(counts))
        self._source = grain.sources.ArrayRecordDataSource(self.paths)

    def __len__(self) -> int:
        return self._len

    def locate(self, index: int) -> str:
        s = bisect.bisect_right(self.shard_starts, index) - 1
        return f"{self.paths[s]} record {index - self.shard_starts[s]}"

    def __getitem__(self, index: int) -> bytes:
        try:
            return self._source[index]
        except Exception as e:
            raise RecordError(f"{self.locate(index)}: cannot be read ({_first_line(e)})") from None

    def __repr__(self) -> str:
        return f"CodesSource({len(self.paths)} shards, {self._len} records)"


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def open_source(files: str, split: str = "train"):
    """A random-access source: `CodesSource` over shard globs, or the TFDS data source of a prepared dataset dir."""
    path = Path(os.path.expanduser(files))
    if path.is_dir() and (path / "dataset_info.json").is_file():
        import tensorflow_datasets as tfds

        try:
            return tfds.builder_from_directory(str(path)).as_data_source(split=split)
        except Exception as e:
            raise RecordError(f"{path}: cannot open TFDS split {split!r} ({_first_line(e)})") from None
    return CodesSource(find_shards(files))


def as_record(element, where: str = "record") -> CodeRecord:
    """A source element (record bytes, or a TFDS example dict) as a `CodeRecord`."""
    if isinstance(element, CodeRecord):
        return element
    if isinstance(element, (bytes, bytearray, memoryview)):
        return CodeRecord.from_bytes(bytes(element), where=where)
    return CodeRecord.from_example(element)


ON_BAD_RECORD = ("fail", "skip")


class BadRecords:
    """What a pipeline does with a record that cannot be used: one that does not decode (damaged bytes, CRC), was
    written for another codebook size, or holds codes outside `[0, card)`.

    `on_bad_record='fail'`: a RecordError naming the shard and record. `'skip'`: a warning line naming it, and the
    next usable record of the source takes its place (so batches keep their size and a resumed run sees the same
    stream); `skipped` maps each place skipped in this process to the reason (grain workers log their own).
    """

    def __init__(self, source, config: PipelineConfig):
        if config.on_bad_record not in ON_BAD_RECORD:
            raise ValueError(f"data.on_bad_record={config.on_bad_record!r}: expected one of {', '.join(ON_BAD_RECORD)}")
        self.source, self.card, self.skip = source, config.card, config.on_bad_record == "skip"
        self.files = config.files
        self.skipped: dict[str, str] = {}

    def locate(self, index: int) -> str:
        return self.source.locate(index) if isinstance(self.source, CodesSource) else f"{self.files} record {index}"

    def __call__(self, index: int, element) -> CodeRecord:
        """Record `index` of the source (`element`), checked; its substitute when it is bad and `skip` is on."""
        for offset in range(len(self.source)):
            i = (index + offset) % len(self.source)
            try:
                return self._check(i, element if offset == 0 else self.source[i])
            except RecordError as e:
                if not self.skip:
                    raise RecordError(f"{e} (data.on_bad_record='fail'; set 'skip' to skip such records)") from None
                where = self.locate(i)
                if where not in self.skipped:
                    self.skipped[where] = str(e)
                    logging.warning("data: skipping a bad record (data.on_bad_record='skip'): %s", e)
        raise RecordError(f"data files {self.files!r}: no usable record among {len(self.source)}")

    def _check(self, index: int, element) -> CodeRecord:
        where = self.locate(index)
        record = as_record(element, where=where)
        if record.card != self.card:
            raise RecordError(f"{where}: record written for card {record.card}, the config's codec has {self.card}")
        codes = np.asarray(record.codes)
        if codes.size and (codes.min() < 0 or codes.max() >= self.card):
            raise RecordError(
                f"{where} ({record.source}): codes outside [0, {self.card}) (min {codes.min()}, max {codes.max()})"
            )
        return record


def check_source(source, config: PipelineConfig) -> None:
    """Fails fast, naming the shard, if records come from another codec or are shorter than `seq_len`.

    Checks the first record of each shard (all records of a shard come from one encode job).
    """
    if len(source) == 0:
        raise RecordError(f"data files {config.files!r}: no records")
    if isinstance(source, CodesSource):
        probes = [
            (source.locate(i), lambda i=i: read_header(source[i], where=source.locate(i))) for i in source.shard_starts
        ]
    else:
        probes = [(f"{config.files} [{config.split}] record 0", lambda: _header_of(as_record(source[0])))]
    for where, get in probes:
        head = get()
        want = {"sample_rate": config.sample_rate, "frame_rate": config.frame_rate, "card": config.card}
        got = {k: head[k] for k in want}
        n_q = head["codes_shape"][0]
        if got != want or n_q != config.n_q:
            raise RecordError(
                f"{where}: records were encoded by a codec with sample_rate {got['sample_rate']}, "
                f"frame_rate {got['frame_rate']:g}, card {got['card']}, {n_q} codebooks; the config "
                f"expects {config.sample_rate}, {config.frame_rate:g}, {config.card}, {config.n_q} "
                "(re-encode with the config's codec)"
            )
        min_frames = int(round(head["segment_seconds"] * head["frame_rate"]))
        if min_frames < config.seq_len:
            raise RecordError(
                f"{where}: encoded with segment_seconds {head['segment_seconds']:g} "
                f"({min_frames} frames) but training crops seq_len {config.seq_len} frames; re-encode "
                "with --segment_seconds >= data.segment_seconds"
            )


def _header_of(record: CodeRecord) -> dict:
    return {
        "sample_rate": record.sample_rate,
        "frame_rate": record.frame_rate,
        "card": record.card,
        "codes_shape": list(record.codes.shape),
        "segment_seconds": record.segment_seconds,
    }


# ---- per-record transforms ----------------------------------------------------------------------------


def random_crop(codes: np.ndarray, seq_len: int, rng: np.random.Generator, where: str = "record") -> np.ndarray:
    """A uniformly placed `[K, seq_len]` window of `[K, T]` codes."""
    frames = codes.shape[-1]
    if frames < seq_len:
        raise RecordError(f"{where}: {frames} frames, fewer than seq_len {seq_len}")
    start = int(rng.integers(0, frames - seq_len + 1))
    return codes[:, start : start + seq_len]


def merge_metadata(
    description: str | None,
    metadata: Mapping[str, Any],
    rng: random.Random,
    *,
    merge_text_p: float,
    drop_desc_p: float,
    drop_other_p: float,
) -> str | None:
    """The description audiocraft's MusicDataset trains on (docs/design.md §3), its draws taken from `rng`.

    `merge_text_p == 0` leaves the description as it is. Otherwise (`augment_music_info_description`): with
    probability `merge_text_p`, "field: value" pairs of key/bpm/genre/moods/keywords/instrument (each kept with
    probability `drop_other_p`, shuffled, joined by ". ") are appended, and the original description is dropped with
    probability `drop_desc_p`; every description then ends with a period.
    """
    if not merge_text_p:
        return description
    metadata_text = ""
    if rng.uniform(0, 1) < merge_text_p:
        pairs = []
        for name in MERGE_FIELDS:
            value = metadata.get(name)
            keep = rng.uniform(0, 1) < drop_other_p
            if keep and value is not None and isinstance(value, (int, float, str, list)):
                pairs.append(f"{name}: {', '.join(value) if isinstance(value, list) else value}")
        rng.shuffle(pairs)
        metadata_text = ". ".join(pairs)
        if rng.uniform(0, 1) < drop_desc_p:
            description = None
    if description is None:
        description = metadata_text if len(metadata_text) > 1 else None
    else:
        description = ". ".join([description.rstrip("."), metadata_text])
    return description.strip() if description else None


@dataclasses.dataclass(frozen=True)
class MakeExample(grain.transforms.RandomMap):
    """Record → `{codes [K, T] int32, text_ids [L] int32, text_mask [L] int32}` (one RNG per record)."""

    seq_len: int
    max_text_len: int
    tokenize: TokenizeFn
    merge_text_p: float = 0.0
    drop_desc_p: float = 0.0
    drop_other_p: float = 0.0
    word_dropout: bool = False

    def random_map(self, element, rng: np.random.Generator) -> dict[str, np.ndarray]:
        record = as_record(element)
        codes = random_crop(record.codes, self.seq_len, rng, where=record.source).astype(np.int32)
        description = merge_metadata(
            record.description,
            record.metadata,
            random.Random(int(rng.integers(2**63))),
            merge_text_p=self.merge_text_p,
            drop_desc_p=self.drop_desc_p,
            drop_other_p=self.drop_other_p,
        )
        key = rng.integers(0, 2**32, size=2, dtype=np.uint32) if self.word_dropout else None
        tokens = self.tokenize([description], word_dropout_key=key)
        return {"codes": codes, **pad_tokens(tokens, self.max_text_len, where=record.source)}


def pad_tokens(tokens: Mapping[str, np.ndarray], length: int, where: str = "record") -> dict[str, np.ndarray]:
    """`ids`/`mask` `[1, L']` from the tokenizer → `text_ids`/`text_mask` `[length]` (pad id 0, mask 0)."""
    ids, mask = np.asarray(tokens["ids"])[0], np.asarray(tokens["mask"])[0]
    if ids.shape[0] > length:
        raise RecordError(f"{where}: tokenizer returned {ids.shape[0]} tokens, more than max_text_len {length}")
    pad = length - ids.shape[0]
    return {"text_ids": np.pad(ids.astype(np.int32), (0, pad)), "text_mask": np.pad(mask.astype(np.int32), (0, pad))}


# ---- datasets and iterators ---------------------------------------------------------------------------


def make_dataset(
    source, config: PipelineConfig, tokenize: TokenizeFn, bad_records: BadRecords | None = None
) -> grain.MapDataset:
    """The per-example `MapDataset` (before the per-process slice and batching); every record goes through
    `bad_records` (a new `BadRecords` when None) at its place in the source, before shuffling."""
    ds = grain.MapDataset.source(source).map_with_index(bad_records or BadRecords(source, config))
    if config.train:
        ds = ds.shuffle(seed=config.seed).repeat()
    return ds.random_map(
        MakeExample(
            seq_len=config.seq_len,
            max_text_len=config.max_text_len,
            tokenize=tokenize,
            merge_text_p=config.merge_text_p,
            drop_desc_p=config.drop_desc_p,
            drop_other_p=config.drop_other_p,
            word_dropout=config.word_dropout,
        ),
        seed=config.seed,
    )


class ProcessBlocks(grain.MapDataset):
    """The stream reordered so that process i of n holds rows [i·B/n, (i+1)·B/n) of every global batch of B.

    `ElasticIterator` gives process i the stream positions i, i + n, ...; this view puts at those positions the
    examples of process i's contiguous block, so the concatenated per-process batches are the same global batch for
    any process count (and the global array `make_array_from_process_local_data` assembles equals the one-process
    batch). A finite stream (eval) is cut to whole global batches, so every process reads the same number.
    """

    _MUTATES_ELEMENT_SPEC = False

    def __init__(self, parent: grain.MapDataset, global_batch_size: int, process_count: int):
        super().__init__(parent)
        self._batch, self._count = global_batch_size, process_count
        length = len(parent)
        self._length = length if length >= sys.maxsize else length - length % global_batch_size

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        batch, row = divmod(index, self._batch)
        block, offset = row % self._count, row // self._count
        return self._parent[batch * self._batch + block * (self._batch // self._count) + offset]


class BatchIterator(grain.DatasetIterator):
    """Per-process batches (NumPy, or global `jax.Array`s when a batch sharding is given); checkpointable with orbax.

    State: the global number of examples consumed (the same on every process) plus the dataset identity
    (record count, seed), so a restore onto another dataset is refused instead of silently changing the stream.
    """

    def __init__(
        self,
        dataset: grain.MapDataset,
        config: PipelineConfig,
        *,
        num_records: int,
        process_index: int,
        process_count: int,
        sharding=None,
    ):
        if config.global_batch_size % process_count:
            raise ValueError(
                f"global batch size {config.global_batch_size} is not divisible by the process count {process_count}"
            )
        mp = (
            grain.MultiprocessingOptions(num_workers=config.worker_count, per_worker_buffer_size=config.prefetch)
            if config.worker_count > 0
            else None
        )
        self._elastic = grain.experimental.ElasticIterator(
            ProcessBlocks(dataset, config.global_batch_size, process_count),
            config.global_batch_size,
            grain.sharding.ShardOptions(process_index, process_count, drop_remainder=True),
            read_options=grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=config.prefetch),
            multiprocessing_options=mp,
        )
        super().__init__(iter(self._elastic))
        self._identity = {"num_records": int(num_records), "seed": int(config.seed), "train": bool(config.train)}
        self._sharding = sharding

    def __next__(self):
        batch = next(self._parent)
        if self._sharding is None:
            return batch
        return {k: jax.make_array_from_process_local_data(self._sharding, v) for k, v in batch.items()}

    def get_state(self) -> dict[str, Any]:
        return {**self._parent.get_state(), **self._identity}

    def set_state(self, state: dict[str, Any]) -> None:
        saved = {k: state.get(k) for k in self._identity}
        if saved != self._identity:
            diffs = ", ".join(f"{k} {saved[k]} -> {v}" for k, v in self._identity.items() if saved[k] != v)
            raise ValueError(
                f"input pipeline state was saved for another dataset ({diffs}); restoring it would not "
                "give the batch after the checkpoint (restore without the data item to restart the "
                "new data from its beginning)"
            )
        self._parent.set_state({k: v for k, v in state.items() if k not in self._identity})


def make_iterator(
    config: PipelineConfig,
    tokenize: TokenizeFn,
    *,
    sharding=None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> BatchIterator:
    """Opens and checks the source, and returns this process's batch iterator.

    Args:
      tokenize: `(descriptions, *, word_dropout_key=None) -> {ids [B, L'], mask [B, L']}` (the conditioner's
        tokenizer); it must be picklable when `worker_count > 0`.
      sharding: the batch `NamedSharding` (`magnet_jax.sharding.batch_sharding(mesh, rules)`); batches are then
        global `jax.Array`s of the global batch, otherwise this process's NumPy arrays.
      process_index, process_count: default to JAX's.
    """
    if process_index is None or process_count is None:
        process_index, process_count = jax.process_index(), jax.process_count()
    source = open_source(config.files, config.split)
    check_source(source, config)
    bad_records = BadRecords(source, config)
    iterator = BatchIterator(
        make_dataset(source, config, tokenize, bad_records),
        config,
        num_records=len(source),
        process_index=process_index,
        process_count=process_count,
        sharding=sharding,
    )
    iterator.bad_records = bad_records  # the skip report of this process
    return iterator


# ---- checkpointing ------------------------------------------------------------------------------------


class InputCheckpointHandler(grain.checkpoint.CheckpointHandler):
    """grain's orbax handler (one `process_{i}-of-{n}.json` per process) that also restores onto another process
    count: `BatchIterator` states are global, so any process's file resumes every process at the same step."""

    def restore(self, directory, item=None, args=None):
        item = item or args.item
        directory = epath.Path(directory)  # local or remote (gs://...)
        own = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if own.exists():
            return super().restore(directory, item=item)
        saved = sorted(directory.glob("process_*-of-*.json"), key=str)
        if not saved:
            raise ValueError(f"{directory}: no input pipeline state (process_*-of-*.json)")
        if not isinstance(item, BatchIterator):
            raise ValueError(
                f"{directory}: saved by {saved[0].name.split('-of-')[1][:-5]} processes, restoring on "
                f"{jax.process_count()}; only magnet_jax.data.input_pipeline.BatchIterator states can move "
                "to another process count"
            )
        item.set_state(json.loads(saved[0].read_text()))
        item.start_prefetch()
        return item


@ocp.args.register_with_handler(InputCheckpointHandler, for_save=True)
@dataclasses.dataclass
class InputCheckpointSave(ocp.args.CheckpointArgs):
    """`ocp.args.Composite(..., data=InputCheckpointSave(iterator))`."""

    item: Any


@ocp.args.register_with_handler(InputCheckpointHandler, for_restore=True)
@dataclasses.dataclass
class InputCheckpointRestore(ocp.args.CheckpointArgs):
    """`ocp.args.Composite(..., data=InputCheckpointRestore(iterator))`: restores `iterator` in place."""

    item: Any
