"""Code records: one encoded audio item (EnCodec codes + text metadata) as the bytes of one ArrayRecord entry.

Written by `data_pipelines.encode_audio`, read by `magnet_jax.data.input_pipeline` and `data_pipelines.tfds_builder`.

Byte layout (no pickle): `b"MJCR"`, a little-endian uint32 header length, a UTF-8 JSON header, then the codes as
little-endian int16 in C order (`[K, T]`). The header carries the shape and a CRC-32 of the codes so a damaged record
is an error naming its source instead of silently wrong tokens.

Metadata follows audiocraft's music dataset sidecar format (`<audio>.json`): `description`, `title`, `artist`,
`key`, `bpm`, `genre`, `moods`, `keywords`, `instrument`; `normalize_metadata` applies audiocraft's per-field
cleaning once, at encode time, so training only draws the random merge of docs/design.md §3.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import struct
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

MAGIC = b"MJCR"
FORMAT_VERSION = 1
SHARD_SUFFIX = ".array_record"
_HEADER_LEN = struct.Struct("<I")

STRING_FIELDS = ("title", "artist", "description")  # stripped
KEYWORD_FIELDS = ("genre", "instrument")  # stripped, lower-cased
KEYWORD_LIST_FIELDS = ("moods", "keywords")  # split on commas/whitespace, lower-cased
METADATA_FIELDS = ("title", "artist", "key", "bpm", "genre", "moods", "keywords", "description", "instrument")


class RecordError(ValueError):
    """A record or shard cannot be read or does not match what the reader expects (message is one line)."""


def shard_name(process_index: int, process_count: int, shard_index: int, prefix: str = "codes") -> str:
    """`codes-p00001-of-00004-s00012.array_record`: shard 12 written by process 1 of 4."""
    return f"{prefix}-p{process_index:05d}-of-{process_count:05d}-s{shard_index:05d}{SHARD_SUFFIX}"


@dataclasses.dataclass(frozen=True)
class CodeRecord:
    """One encoded item.

    Attributes:
      codes: int16 `[K, T]` codebook indices at `frame_rate`.
      sample_rate: codec sample rate the audio was resampled to.
      frame_rate: code frames per second.
      card: codebook size (every code is in `[0, card)`).
      duration: seconds of real audio in `codes` (before any zero padding).
      segment_seconds: the encode job's training segment; shorter items were zero-padded to it, so
        `T >= segment_seconds * frame_rate`.
      source: path of the audio file as the job saw it.
      offset: seconds into `source` where the encoded audio starts.
      metadata: normalized text fields (see `normalize_metadata`); absent fields are omitted.
    """

    codes: np.ndarray
    sample_rate: int
    frame_rate: float
    card: int
    duration: float
    segment_seconds: float
    source: str
    offset: float = 0.0
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def description(self) -> str | None:
        return self.metadata.get("description")

    def to_bytes(self) -> bytes:
        codes = np.asarray(self.codes)
        if codes.ndim != 2 or not np.issubdtype(codes.dtype, np.integer):
            raise RecordError(f"{self.source}: codes must be an integer [K, T] array, got {codes.dtype} {codes.shape}")
        if codes.size and (codes.min() < 0 or codes.max() >= self.card):
            raise RecordError(f"{self.source}: codes outside [0, {self.card})")
        payload = np.ascontiguousarray(codes, dtype="<i2").tobytes()
        header = {
            "version": FORMAT_VERSION,
            "codes_shape": list(codes.shape),
            "crc32": zlib.crc32(payload),
            "sample_rate": int(self.sample_rate),
            "frame_rate": float(self.frame_rate),
            "card": int(self.card),
            "duration": float(self.duration),
            "segment_seconds": float(self.segment_seconds),
            "source": str(self.source),
            "offset": float(self.offset),
            "metadata": dict(self.metadata),
        }
        head = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        return MAGIC + _HEADER_LEN.pack(len(head)) + head + payload

    @classmethod
    def from_bytes(cls, data: bytes, *, where: str = "record") -> CodeRecord:
        """Parses `to_bytes` output; `where` names the record in error messages."""
        header, payload = _split(data, where)
        shape = tuple(header["codes_shape"])
        if len(payload) != 2 * math.prod(shape) or zlib.crc32(payload) != header["crc32"]:
            raise RecordError(
                f"{where} ({header.get('source')}): codes payload is damaged "
                f"(length or CRC-32 mismatch for shape {shape})"
            )
        codes = np.frombuffer(payload, dtype="<i2").reshape(shape)
        return cls(
            codes=codes,
            sample_rate=header["sample_rate"],
            frame_rate=header["frame_rate"],
            card=header["card"],
            duration=header["duration"],
            segment_seconds=header["segment_seconds"],
            source=header["source"],
            offset=header["offset"],
            metadata=header["metadata"],
        )

    @classmethod
    def from_example(cls, example: Mapping[str, Any]) -> CodeRecord:
        """Builds a record from a TFDS example dict (text features arrive as bytes)."""

        def text(v):
            return v.decode("utf-8") if isinstance(v, bytes) else str(v)

        metadata = json.loads(text(example["metadata"]))
        return cls(
            codes=np.asarray(example["codes"]),
            sample_rate=int(example["sample_rate"]),
            frame_rate=float(example["frame_rate"]),
            card=int(example["card"]),
            duration=float(example["duration"]),
            segment_seconds=float(example["segment_seconds"]),
            source=text(example["source"]),
            offset=float(example["offset"]),
            metadata=metadata,
        )


def read_header(data: bytes, *, where: str = "record") -> dict:
    """The JSON header of a record without decoding its codes (cheap checks on shards)."""
    return _split(data, where)[0]


def _split(data: bytes, where: str) -> tuple[dict, bytes]:
    if len(data) < len(MAGIC) + _HEADER_LEN.size or data[: len(MAGIC)] != MAGIC:
        raise RecordError(
            f"{where}: not a magnet_jax code record (bad magic bytes; "
            "shards must come from data_pipelines.encode_audio)"
        )
    (n,) = _HEADER_LEN.unpack_from(data, len(MAGIC))
    start = len(MAGIC) + _HEADER_LEN.size
    try:
        header = json.loads(data[start : start + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecordError(f"{where}: record header is damaged ({e})") from None
    if header.get("version") != FORMAT_VERSION:
        raise RecordError(
            f"{where}: record format version {header.get('version')!r}, this reader expects {FORMAT_VERSION}"
        )
    return header, data[start + n :]


# ---- metadata cleaning (audiocraft data/info_audio_dataset.py + music_dataset.py attribute getters) ----


def _string(value) -> str | None:
    if value is None or not isinstance(value, str) or not value or value == "None":
        return None
    return value.strip()


def _keyword(value) -> str | None:
    value = _string(value)
    return None if value is None else value.lower()


def _keyword_list(values) -> list[str] | None:
    if isinstance(values, str):
        values = [v.strip() for v in re.split(r"[,\s]", values)]
    elif isinstance(values, float) and math.isnan(values):
        values = []
    if not isinstance(values, list):
        values = [str(values)]
    kept = [k for k in map(_keyword, values) if k is not None]
    return kept or None


def _musical_key(value) -> str | None:
    if value is None or not isinstance(value, str) or not value or value == "None" or "," in value:
        return None  # several keys ("C, G") are discarded
    return value.strip().lower()


def _bpm(value) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def normalize_metadata(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Cleans sidecar fields as audiocraft's `MusicInfo.from_dict` does; drops empty and unknown fields.

    `instruments` (plural) is accepted as an alias of audiocraft's `instrument`.
    """
    raw = dict(raw)
    if "instrument" not in raw and "instruments" in raw:
        value = raw["instruments"]
        raw["instrument"] = ", ".join(map(str, value)) if isinstance(value, list) else value
    cleaners = {"key": _musical_key, "bpm": _bpm}
    cleaners.update({f: _string for f in STRING_FIELDS})
    cleaners.update({f: _keyword for f in KEYWORD_FIELDS})
    cleaners.update({f: _keyword_list for f in KEYWORD_LIST_FIELDS})
    out = {}
    for name in METADATA_FIELDS:
        if name in raw:
            value = cleaners[name](raw[name])
            if value is not None:
                out[name] = value
    return out
