r"""Audio → EnCodec codes: reads audio files, encodes them on every local device, writes ArrayRecord shards.

  python -m data_pipelines.encode_audio --input=/data/music --output=/data/codes --codec=facebook/encodec_32khz

Input is a directory (searched recursively for .wav/.flac/.ogg/.mp3, each with an audiocraft-style sidecar
`<name>.json` holding `description` and optional `genre`/`bpm`/`key`/`moods`/`keywords`/`instrument`/`title`/
`artist`) or a JSONL manifest (one object per line: `path` (relative to the manifest's folder or absolute), optional
`offset`/`excerpt_seconds` to encode part of a file, optional metadata fields that override the sidecar; audiocraft's
manifest keys `duration`/`sample_rate` are checked against the file). Each file is read with soundfile, downmixed
to mono (channel mean) and resampled to the codec rate with soxr VHQ (`magnet_jax.data.audio.to_codec_audio`), then
encoded in fixed windows of `--chunk_seconds` batched across files and sharded over `jax.local_devices()`; long files
are the concatenation of their windows' codes (as `magnet_jax.models.encodec.encode_long`). A file shorter than
`--segment_seconds` but at least `--min_segment_ratio` of it is zero-padded to the segment (as audiocraft pads short
training segments); shorter, empty, unreadable or non-finite files are skipped and listed with their reason.

Multi-host: process i of n (`jax.process_index()/process_count()` after `--distributed`, or `--process_index/
--process_count` for independent jobs) takes files i, i+n, ... of the sorted input and writes
`codes-p{i:05d}-of-{n:05d}-s{shard:05d}.array_record` plus a `.json` sidecar per shard (its records and skipped
files). Shards are written under a temporary name and renamed when complete, so a restarted job skips finished
shards and redoes the rest; `encode_job.json` pins the settings, and resuming with different ones is refused.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging as std_logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from absl import logging

from magnet_jax.cli import define_distributed_flags, initialize_distributed, quiet_logs
from magnet_jax.data import records
from magnet_jax.data.audio import to_codec_audio
from magnet_jax.fileio import TMP_PREFIX, LockError, atomic_file, directory_lock, file_sha256, pin_settings, write_json

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")
# Manifest keys that are not text metadata (audiocraft's AudioMeta fields and our excerpt fields).
MANIFEST_KEYS = ("path", "offset", "excerpt_seconds", "duration", "sample_rate", "amplitude", "weight", "info_path")
JOB_FILE = "encode_job.json"


class EncodeJobError(ValueError):
    """The job cannot start or resume (bad input location, manifest, settings); the message is one line."""


class EncodeJobLocked(EncodeJobError):
    """Another job is encoding into the output dir (exit status 2)."""


@dataclasses.dataclass(frozen=True)
class AudioItem:
    """One input: an audio file (or an excerpt of it) and metadata given inline by a manifest."""

    path: str
    offset: float = 0.0
    excerpt_seconds: float | None = None
    inline: dict | None = None  # manifest fields: metadata overrides plus declared duration/sample_rate


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that determines the bytes of the output (pinned in `encode_job.json`)."""

    codec: str
    codec_fingerprint: str
    sample_rate: int
    frame_rate: float
    hop_length: int
    n_q: int
    card: int
    chunk_samples: int
    segment_seconds: float
    min_segment_ratio: float
    records_per_shard: int
    allow_missing_metadata: bool
    process_count: int
    inputs_fingerprint: str
    num_inputs: int


# ---- inputs -------------------------------------------------------------------------------------------


def list_inputs(source: str | os.PathLike) -> list[AudioItem]:
    """The sorted inputs of a directory (recursive) or a JSONL manifest; raises EncodeJobError if there are none."""
    source = Path(source)
    if source.is_dir():
        paths = sorted(p for p in source.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file())
        if not paths:
            raise EncodeJobError(f"--input={source}: directory has no audio files ({', '.join(AUDIO_EXTENSIONS)})")
        return [AudioItem(str(p)) for p in paths]
    if not source.is_file():
        raise EncodeJobError(f"--input={source}: no such file or directory")
    items = []
    with open(source, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise EncodeJobError(f"{source}:{lineno}: not a JSON object ({e.msg})") from None
            if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
                raise EncodeJobError(f"{source}:{lineno}: expected a JSON object with a string 'path'")
            path = Path(entry["path"]).expanduser()
            path = path if path.is_absolute() else source.parent / path
            try:
                offset = float(entry.get("offset", 0.0))
                excerpt = entry.get("excerpt_seconds")
                excerpt = None if excerpt is None else float(excerpt)
            except (TypeError, ValueError):
                raise EncodeJobError(f"{source}:{lineno}: 'offset'/'excerpt_seconds' must be numbers") from None
            if offset < 0 or (excerpt is not None and excerpt <= 0):
                raise EncodeJobError(f"{source}:{lineno}: need offset >= 0 and excerpt_seconds > 0")
            inline = {k: v for k, v in entry.items() if k not in ("path", "offset", "excerpt_seconds")}
            items.append(AudioItem(str(path), offset, excerpt, inline or None))
    if not items:
        raise EncodeJobError(f"--input={source}: manifest has no entries")
    return sorted(items, key=lambda it: (it.path, it.offset))


def inputs_fingerprint(items: Sequence[AudioItem]) -> str:
    h = hashlib.sha256()
    for it in items:
        h.update(f"{it.path}\0{it.offset}\0{it.excerpt_seconds}\n".encode())
    return h.hexdigest()[:16]


def process_share(items: Sequence[AudioItem], process_index: int, process_count: int) -> list[AudioItem]:
    """Process i's deterministic share: items i, i + n, i + 2n, ... of the sorted list."""
    return list(items[process_index::process_count])


# ---- reading one file ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LoadedAudio:
    wav: np.ndarray | None  # float32 [N] mono at the codec rate, zero-padded to the segment if it was shorter
    duration: float  # seconds of real audio
    metadata: dict


@dataclasses.dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


def read_metadata(item: AudioItem, allow_missing: bool) -> dict | Skipped:
    """Sidecar `<audio>.json` merged with the manifest's inline fields, cleaned by `records.normalize_metadata`."""
    sidecar = Path(item.path).with_suffix(".json")
    raw: dict[str, Any] = {}
    if sidecar.is_file():
        try:
            raw = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            return Skipped(item.path, f"sidecar {sidecar.name} is not valid JSON ({e})")
        if not isinstance(raw, dict):
            return Skipped(item.path, f"sidecar {sidecar.name} is not a JSON object")
    inline = {k: v for k, v in (item.inline or {}).items() if k not in MANIFEST_KEYS}
    if not sidecar.is_file() and not inline and not allow_missing:
        return Skipped(
            item.path,
            f"no sidecar metadata {sidecar.name} (pass --allow_missing_metadata to encode "
            "it with an empty description)",
        )
    raw.update(inline)
    return records.normalize_metadata(raw)


def load_audio(
    item: AudioItem, *, sample_rate: int, segment_seconds: float, min_segment_ratio: float, allow_missing_metadata: bool
) -> LoadedAudio | Skipped:
    """Reads, checks, downmixes, resamples and pads one input; any problem becomes a `Skipped` with its reason."""
    metadata = read_metadata(item, allow_missing_metadata)
    if isinstance(metadata, Skipped):
        return metadata
    try:
        info = sf.info(item.path)
        declared = item.inline or {}
        if "sample_rate" in declared and int(declared["sample_rate"]) != info.samplerate:
            return Skipped(
                item.path,
                f"manifest says sample_rate {declared['sample_rate']} but the file is "
                f"{info.samplerate} Hz (stale manifest?)",
            )
        if "duration" in declared and abs(float(declared["duration"]) - info.duration) > 0.1:
            return Skipped(
                item.path,
                f"manifest says duration {float(declared['duration']):.2f} s but the file "
                f"has {info.duration:.2f} s (stale manifest?)",
            )
        start = int(round(item.offset * info.samplerate))
        if start >= info.frames > 0:
            return Skipped(item.path, f"offset {item.offset:g} s is past the end ({info.duration:.2f} s)")
        frames = -1 if item.excerpt_seconds is None else int(round(item.excerpt_seconds * info.samplerate))
        wav, sr = sf.read(item.path, start=start, frames=frames, dtype="float32", always_2d=True)
    except Exception as e:  # libsndfile/decoder errors come in several types; all mean "unreadable"
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        return Skipped(item.path, f"unreadable audio ({reason})")
    if wav.shape[0] == 0:
        return Skipped(item.path, "empty (no audio samples)")
    if not np.all(np.isfinite(wav)):
        return Skipped(item.path, "audio contains NaN or Inf samples")
    mono = to_codec_audio(wav.T[None], sr, sample_rate)[0, 0]  # channel mean, soxr VHQ
    duration = mono.shape[0] / sample_rate
    segment = int(round(segment_seconds * sample_rate))
    if mono.shape[0] < min_segment_ratio * segment:
        return Skipped(
            item.path, f"too short: {duration:.2f} s < {min_segment_ratio:g} x {segment_seconds:g} s segment"
        )
    if mono.shape[0] < segment:
        mono = np.pad(mono, (0, segment - mono.shape[0]))
    return LoadedAudio(np.ascontiguousarray(mono, dtype=np.float32), duration, metadata)


def prefetch_map(fn: Callable, items: Iterable, workers: int, lookahead: int) -> Iterator:
    """`map(fn, items)` in order, computed by `workers` threads up to `lookahead` items ahead."""
    items = iter(items)
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        pending = []
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) > lookahead:
                yield pending.pop(0).result()
        while pending:
            yield pending.pop(0).result()


# ---- encoding on devices ------------------------------------------------------------------------------


class WindowEncoder:
    """Encodes fixed-length windows `[n, 1, L]` → codes `[n, K, L / hop]`, each batch sharded over local devices.

    Batches are padded to `batch_size` (a multiple of the device count), so one compiled program serves every call.
    """

    def __init__(self, codec_config, params, *, batch_size: int, devices=None):
        import jax
        from jax.sharding import Mesh, NamedSharding
        from jax.sharding import PartitionSpec as P

        devices = list(devices or jax.local_devices())
        self.batch_size = math.ceil(batch_size / len(devices)) * len(devices)
        mesh = Mesh(np.array(devices), ("batch",))
        self._sharding = NamedSharding(mesh, P("batch"))
        self._config = codec_config
        self._params = jax.device_put(params, NamedSharding(mesh, P()))

    def __call__(self, windows: np.ndarray) -> np.ndarray:
        import jax

        from magnet_jax.models.encodec import encode

        out = []
        for start in range(0, len(windows), self.batch_size):
            batch = windows[start : start + self.batch_size]
            n = len(batch)
            if n < self.batch_size:
                batch = np.concatenate([batch, np.zeros((self.batch_size - n, *batch.shape[1:]), batch.dtype)])
            codes = encode(self._config, self._params, jax.device_put(batch, self._sharding))
            out.append(np.asarray(codes)[:n])
        return np.concatenate(out)


class CodesAssembler:
    """Cuts mono wavs into `chunk_samples` windows (the last zero-padded), encodes them a device batch at a time
    (batches mix files), and hands back each file's codes `[K, ceil(N / hop)]`: its windows' codes concatenated.

    Memory stays at about one batch of windows plus the files not yet complete.
    """

    def __init__(
        self, encoder: Callable[[np.ndarray], np.ndarray], *, batch_size: int, chunk_samples: int, hop_length: int
    ):
        self._encoder, self._batch_size = encoder, batch_size
        self._chunk, self._hop = chunk_samples, hop_length
        self._queue: list[tuple[Any, np.ndarray]] = []  # (key, window [1, L])
        self._parts: dict[Any, list[np.ndarray]] = {}
        self._need: dict[Any, tuple[int, int]] = {}  # key -> (windows, frames)

    def add(self, key, wav: np.ndarray) -> list[tuple[Any, np.ndarray]]:
        """Queues one file; returns the files completed by the batches this triggered."""
        n_chunks = max(1, math.ceil(len(wav) / self._chunk))
        padded = np.pad(wav, (0, n_chunks * self._chunk - len(wav)))
        self._need[key] = (n_chunks, math.ceil(len(wav) / self._hop))
        self._parts[key] = []
        self._queue += [(key, w) for w in padded.reshape(n_chunks, 1, self._chunk)]
        done = []
        while len(self._queue) >= self._batch_size:
            done += self._run(self._batch_size)
        return done

    def flush(self) -> list[tuple[Any, np.ndarray]]:
        """Encodes what is queued (a padded batch) and returns the remaining files."""
        return self._run(len(self._queue)) if self._queue else []

    def _run(self, n: int) -> list[tuple[Any, np.ndarray]]:
        batch, self._queue = self._queue[:n], self._queue[n:]
        codes = self._encoder(np.stack([w for _, w in batch]))
        done = []
        for (key, _), c in zip(batch, codes):
            self._parts[key].append(c)
            n_chunks, frames = self._need[key]
            if len(self._parts[key]) == n_chunks:
                done.append((key, np.concatenate(self._parts.pop(key), axis=-1)[:, :frames]))
                del self._need[key]
        return done


# ---- shards and resume --------------------------------------------------------------------------------


def write_shard(path: Path, payloads: Sequence[bytes]) -> None:
    """Writes an ArrayRecord shard under a temporary name, then renames it into place."""
    from array_record.python.array_record_module import ArrayRecordWriter

    with atomic_file(path) as tmp:
        writer = ArrayRecordWriter(str(tmp), "group_size:1")
        try:
            for payload in payloads:
                writer.write(payload)
        finally:
            writer.close()


def shard_is_complete(path: Path) -> bool:
    """A shard counts as done when its sidecar (written last) exists and the shard's bytes match the size and
    SHA-256 the sidecar lists; a damaged, truncated or replaced shard is encoded again (with a warning)."""
    sidecar = path.with_suffix(".json")
    if not sidecar.is_file():
        return False
    try:
        listing = json.loads(sidecar.read_text(encoding="utf-8"))
        if not listing["records"]:
            return True  # every file of the shard was skipped: no .array_record is written
        expected = listing["shard"]
        if path.stat().st_size == expected["size"] and file_sha256(path) == expected["sha256"]:
            return True
    except (OSError, ValueError, KeyError, TypeError):  # missing or garbled shard/sidecar (or an older sidecar)
        pass
    logging.warning("%s: does not match its sidecar %s; encoding the shard again", path, sidecar.name)
    return False


@dataclasses.dataclass
class Progress:
    """Counts for the progress log and the summary (resumed shards count as files, not as this run's rate)."""

    total_files: int
    files: int = 0
    encoded: int = 0
    audio_seconds: float = 0.0  # all encoded audio, resumed shards included
    new_audio_seconds: float = 0.0  # encoded by this run
    shards_written: int = 0
    shards_resumed: int = 0
    skipped: list = dataclasses.field(default_factory=list)
    start: float = dataclasses.field(default_factory=time.monotonic)
    last_log: float = 0.0

    @property
    def hours_per_second(self) -> float:
        return self.new_audio_seconds / 3600 / max(time.monotonic() - self.start, 1e-9)

    def add_encoded(self, seconds: float) -> None:
        self.files += 1
        self.encoded += 1
        self.audio_seconds += seconds
        self.new_audio_seconds += seconds

    def add_skipped(self, skipped: dict) -> None:
        logging.warning("skipped %s: %s", skipped["path"], skipped["reason"])
        self.files += 1
        self.skipped.append(skipped)

    def log(self, every: float = 0.0) -> None:
        now = time.monotonic()
        if now - self.last_log >= every:
            self.last_log = now
            logging.info(
                "files %d/%d (%d encoded, %d skipped), %.3f h of audio, %.4f h/s, %.0f s elapsed",
                self.files,
                self.total_files,
                self.encoded,
                len(self.skipped),
                self.audio_seconds / 3600,
                self.hours_per_second,
                now - self.start,
            )


def encode_shard(
    path: Path,
    items: Sequence[AudioItem],
    loaded_stream: Iterator,
    assembler: CodesAssembler,
    settings: Settings,
    progress: Progress,
    log_every: float,
) -> None:
    """Encodes one shard's files (taken in order from `loaded_stream`) and writes its sidecar, then the shard."""
    loaded, codes, skipped = {}, {}, []
    for i in range(len(items)):
        result = next(loaded_stream)
        if isinstance(result, Skipped):
            skipped.append(dataclasses.asdict(result))
            progress.add_skipped(skipped[-1])
            continue
        codes.update(assembler.add(i, result.wav))
        loaded[i] = dataclasses.replace(result, wav=None)  # the wav is queued; keep only its metadata
        progress.add_encoded(result.duration)
        progress.log(every=log_every)
    codes.update(assembler.flush())
    payloads, listing = [], []
    for i, r in loaded.items():
        record = records.CodeRecord(
            codes=codes[i].astype(np.int16),
            sample_rate=settings.sample_rate,
            frame_rate=settings.frame_rate,
            card=settings.card,
            duration=r.duration,
            segment_seconds=settings.segment_seconds,
            source=items[i].path,
            offset=items[i].offset,
            metadata=r.metadata,
        )
        payloads.append(record.to_bytes())
        listing.append(
            {
                "source": record.source,
                "offset": record.offset,
                "duration": record.duration,
                "frames": int(record.codes.shape[-1]),
            }
        )
    shard = None
    if payloads:
        write_shard(path, payloads)
        shard = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    # The sidecar last: it marks the shard done and records its checksum (`shard_is_complete`).
    write_json(path.with_suffix(".json"), {"records": listing, "skipped": skipped, "shard": shard})
    progress.shards_written += 1


def run(
    input: str,
    output: str,
    *,
    codec_source: str,
    codec_config,
    codec_params,
    segment_seconds: float = 10.0,
    min_segment_ratio: float = 0.8,
    chunk_seconds: float = 10.0,
    batch_size: int = 8,
    records_per_shard: int = 256,
    read_workers: int = 4,
    allow_missing_metadata: bool = False,
    process_index: int = 0,
    process_count: int = 1,
    devices=None,
    log_every: float = 10.0,
    force_unlock: bool = False,
) -> dict:
    """Encodes this process's share of `input` into `output`; returns the summary (also written as JSON).

    Args:
      codec_source: how the codec was named (recorded in `encode_job.json`).
      codec_config, codec_params: `magnet_jax.models.encodec.EncodecConfig` and its params.
      batch_size: windows per device step over all local devices (rounded up to a multiple of their count).
      records_per_shard: input files per shard (skipped files leave their shard shorter).
      log_every: seconds between progress lines.
      force_unlock: take the output dir's lock of this process index even when a job on another host holds it.
    Raises:
      EncodeJobLocked: another job encodes the same process index into `output`.
    """
    if not 0 < min_segment_ratio <= 1:
        raise EncodeJobError(f"--min_segment_ratio={min_segment_ratio}: expected 0 < ratio <= 1")
    if segment_seconds <= 0 or chunk_seconds <= 0 or records_per_shard < 1 or batch_size < 1:
        raise EncodeJobError("--segment_seconds, --chunk_seconds, --records_per_shard and --batch_size must be > 0")
    if not 0 <= process_index < process_count:
        raise EncodeJobError(f"process index {process_index} is not in [0, {process_count})")
    hop = int(codec_config.hop_length)
    items = list_inputs(input)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        try:  # one job per (output dir, process index): processes of one job write their own shards
            stack.enter_context(
                directory_lock(out, name=f".lock-p{process_index:05d}-of-{process_count:05d}", force=force_unlock)
            )
        except LockError as e:
            raise EncodeJobLocked(str(e)) from None
        settings = Settings(
            codec=str(codec_source),
            codec_fingerprint=params_fingerprint(codec_params),
            sample_rate=int(codec_config.sample_rate),
            frame_rate=float(codec_config.frame_rate),
            hop_length=hop,
            n_q=int(codec_config.n_q),
            card=int(codec_config.card),
            chunk_samples=max(1, round(chunk_seconds * codec_config.frame_rate)) * hop,  # as encodec.encode_long
            segment_seconds=float(segment_seconds),
            min_segment_ratio=float(min_segment_ratio),
            records_per_shard=int(records_per_shard),
            allow_missing_metadata=bool(allow_missing_metadata),
            process_count=int(process_count),
            inputs_fingerprint=inputs_fingerprint(items),
            num_inputs=len(items),
        )
        pin_settings(out / JOB_FILE, dataclasses.asdict(settings), error=EncodeJobError)

        share = process_share(items, process_index, process_count)
        shards = [share[s : s + records_per_shard] for s in range(0, len(share), records_per_shard)]
        names = [out / records.shard_name(process_index, process_count, s) for s in range(len(shards))]
        progress = Progress(total_files=len(share))
        todo = []
        for s, path in enumerate(names):
            if not shard_is_complete(path):
                todo.append(s)
                continue
            done = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
            progress.shards_resumed += 1
            progress.files += len(shards[s])
            progress.encoded += len(done["records"])
            progress.audio_seconds += sum(r["duration"] for r in done["records"])
            progress.skipped += done["skipped"]
        for stale in out.glob(f"{TMP_PREFIX}*-codes-p{process_index:05d}-of-{process_count:05d}-*"):
            stale.unlink()  # temporary files of an interrupted run of this process
        logging.info(
            "process %d/%d: %d files in %d shards (%d already done) -> %s",
            process_index,
            process_count,
            len(share),
            len(shards),
            progress.shards_resumed,
            out,
        )

        if todo:
            encoder = WindowEncoder(codec_config, codec_params, batch_size=batch_size, devices=devices)
            assembler = CodesAssembler(
                encoder, batch_size=encoder.batch_size, chunk_samples=settings.chunk_samples, hop_length=hop
            )
            load = functools.partial(
                load_audio,
                sample_rate=settings.sample_rate,
                segment_seconds=segment_seconds,
                min_segment_ratio=min_segment_ratio,
                allow_missing_metadata=allow_missing_metadata,
            )
            loaded_stream = prefetch_map(
                load, (it for s in todo for it in shards[s]), read_workers, lookahead=2 * read_workers + 2
            )
            for s in todo:
                encode_shard(names[s], shards[s], loaded_stream, assembler, settings, progress, log_every)
        progress.log()

        summary = {
            "process_index": process_index,
            "process_count": process_count,
            "output": str(out),
            "files": progress.files,
            "encoded": progress.encoded,
            "skipped": len(progress.skipped),
            "audio_hours": progress.audio_seconds / 3600,
            "elapsed_seconds": time.monotonic() - progress.start,
            "hours_per_second": progress.hours_per_second,
            "shards": len(shards),
            "shards_written": progress.shards_written,
            "shards_resumed": progress.shards_resumed,
            "skipped_files": progress.skipped,
        }
        write_json(out / f"summary-p{process_index:05d}-of-{process_count:05d}.json", summary)
        return summary


def params_fingerprint(params) -> str:
    """A short hash of every parameter array (resuming with other codec weights is refused)."""
    import jax

    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        arr = np.asarray(leaf)
        h.update(f"{jax.tree_util.keystr(path)}{arr.shape}{arr.dtype}".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()[:16]


def format_summary(summary: dict) -> str:
    lines = [
        f"encoded {summary['encoded']}/{summary['files']} files ({summary['audio_hours']:.3f} h of audio, "
        f"{summary['hours_per_second']:.4f} h/s) into {summary['shards']} shards "
        f"({summary['shards_written']} written, {summary['shards_resumed']} already done) in {summary['output']}"
    ]
    if summary["skipped_files"]:
        lines.append(f"skipped {summary['skipped']} files:")
        lines += [f"  {s['path']}: {s['reason']}" for s in summary["skipped_files"]]
    return "\n".join(lines)


def main(argv):
    del argv
    quiet_logs()
    import jax

    from magnet_jax.checkpoints.encodec_weights import load_encodec
    from magnet_jax.fileio import WeightsError

    if FLAGS.distributed:
        initialize_distributed("encode_audio")
    process_index = jax.process_index() if FLAGS.process_index is None else FLAGS.process_index
    process_count = jax.process_count() if FLAGS.process_count is None else FLAGS.process_count
    try:
        codec_config, codec_params = load_encodec(FLAGS.codec)
        summary = run(
            FLAGS.input,
            FLAGS.output,
            codec_source=FLAGS.codec,
            codec_config=codec_config,
            codec_params=codec_params,
            segment_seconds=FLAGS.segment_seconds,
            min_segment_ratio=FLAGS.min_segment_ratio,
            chunk_seconds=FLAGS.chunk_seconds,
            batch_size=FLAGS.batch_size,
            records_per_shard=FLAGS.records_per_shard,
            read_workers=FLAGS.read_workers,
            allow_missing_metadata=FLAGS.allow_missing_metadata,
            process_index=process_index,
            process_count=process_count,
            force_unlock=FLAGS.force_unlock,
        )
    except EncodeJobLocked as e:
        print(f"encode_audio: {e}", file=sys.stderr)
        sys.exit(2)
    except (EncodeJobError, WeightsError, OSError) as e:
        sys.exit(f"encode_audio: {e}")
    print(format_summary(summary))


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string(
        "input", None, "directory of audio files with .json sidecars, or a JSONL manifest", required=True
    )
    flags.DEFINE_string("output", None, "directory for the ArrayRecord shards", required=True)
    flags.DEFINE_string(
        "codec",
        "facebook/encodec_32khz",
        "EnCodec weights: hub id, or a local directory (transformers format, or audiocraft compression_state_dict.bin)",
    )
    flags.DEFINE_float("segment_seconds", 10.0, "training segment; shorter files are zero-padded to it")
    flags.DEFINE_float("min_segment_ratio", 0.8, "files shorter than this fraction of the segment are skipped")
    flags.DEFINE_float("chunk_seconds", 10.0, "encoding window; long files are encoded window by window")
    flags.DEFINE_integer("batch_size", 8, "windows per encoder step over all local devices")
    flags.DEFINE_integer("records_per_shard", 256, "input files per output shard")
    flags.DEFINE_integer("read_workers", 4, "threads reading and resampling audio")
    flags.DEFINE_bool(
        "allow_missing_metadata", False, "encode files without a sidecar (empty description) instead of skipping them"
    )
    define_distributed_flags()
    flags.DEFINE_integer("process_index", None, "override jax.process_index() (independent jobs)")
    flags.DEFINE_integer("process_count", None, "override jax.process_count() (independent jobs)")
    flags.DEFINE_bool("force_unlock", False, "take the output dir's lock even if a job on another host holds it")
    FLAGS = flags.FLAGS
    std_logging.getLogger("jax").setLevel(std_logging.WARNING)
    app.run(main)
