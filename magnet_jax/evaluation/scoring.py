"""The paper's metrics over sets of clips: embedders loaded from a config section, per-file embeddings cached on
disk, and FAD / KL / CLAP of generated samples against a reference set and their prompts.

Shared by the evaluation job (`magnet_jax.evaluate`) and in-training evaluation (`magnet_jax.train`). Three
embedders serve three metrics (docs/design.md §12):

  fad   VGGish windows  [W, 128] per clip; Fréchet distance of the samples' statistics to the reference's
  kl    PaSST label probabilities [S, 527] per clip (one row per segment); KL(reference || sample), per segment pair
  clap  CLAP audio embedding [512] per clip against its prompt's text embedding; cosine similarity

The weight files are the released ones, named by config fields (`embedder_config`); nothing is downloaded.
Network inputs are sharded over this host's devices (rows), so `batch_size` is a multiple of their count; with
several hosts each embeds its share of the files (`embed_files`) and process 0 computes the metrics.

KL pairs the segments of a sample with those of its prompt's reference clip in time order (the first
min(S_ref, S_sample) of each; equal-length clips pair all, as audiocraft's metric does); the reported value is the
mean over all segment pairs (audiocraft's `kld`), the per-sample value the mean over that sample's pairs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import ml_collections
import numpy as np
import soundfile as sf
import tqdm
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from magnet_jax.cli import reason
from magnet_jax.data.audio import AudioError, audio_files, read_audio
from magnet_jax.evaluation import clap, passt, vggish
from magnet_jax.evaluation.clap_audio import CLIP_SAMPLES, HtsatConfig
from magnet_jax.evaluation.clap_audio import SAMPLE_RATE as CLAP_RATE
from magnet_jax.evaluation.clap_text import RobertaConfig
from magnet_jax.evaluation.metrics import (
    embedding_statistics,
    frechet_distance,
    kl_divergence,
    load_statistics,
    save_statistics,
)
from magnet_jax.fileio import local_file, pin_settings, remove_temporaries, write_atomic

METRICS = ("fad", "kl", "clap")
EMBEDDER_OF = {"fad": "vggish", "kl": "passt", "clap": "clap"}
EMBEDDERS = ("vggish", "passt", "clap")


class EvaluationError(ValueError):
    """An evaluation cannot run with these settings or inputs (message is one line)."""


def embedder_config() -> ml_collections.ConfigDict:
    """The config section naming the embedders' weight files and architectures (configs/evaluate.py, and the
    training config's `train.eval_audio`)."""
    c = ml_collections.ConfigDict()
    c.batch_size = 8  # clips per embedding step on this host (a multiple of its device count)
    c.vggish = ml_collections.ConfigDict({"weights": ""})  # torchvggish's vggish-10086976.pth
    c.passt = ml_collections.ConfigDict(
        {"weights": "", "model": dataclasses.asdict(passt.PASST_20S)}  # passt-s-f128-20sec-p16-s10-ap.474-swa.pt
    )
    c.clap = ml_collections.ConfigDict(
        {
            "weights": "",  # music_audioset_epoch_15_esc_90.14.pt (file or a directory holding it)
            "tokenizer": "",  # a directory with roberta-base's vocab.json and merges.txt
            "audio": dataclasses.asdict(HtsatConfig()),
            "text": dataclasses.asdict(RobertaConfig()),
            "joint_dim": clap.CLAP_MUSIC.joint_dim,
        }
    )
    return c


def check_metrics(metrics: Sequence[str], *, field: str = "config.metrics") -> tuple[str, ...]:
    """The requested metrics in canonical order; unknown or none is an EvaluationError."""
    metrics = tuple(metrics)
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown or not metrics:
        raise EvaluationError(
            f"{field}={list(metrics)}: expected a non-empty subset of {', '.join(METRICS)}"
            + (f" (unknown: {', '.join(unknown)})" if unknown else "")
        )
    return tuple(m for m in METRICS if m in metrics)


def _weight_fields(config, metrics: Sequence[str]) -> list[tuple[str, str, str]]:
    """(config field, path, what) of every file the metrics need."""
    fields = []
    if "fad" in metrics:
        fields.append(("vggish.weights", config.vggish.weights, "VGGish weights (vggish-10086976.pth)"))
    if "kl" in metrics:
        fields.append(
            ("passt.weights", config.passt.weights, "PaSST weights (passt-s-f128-20sec-p16-s10-ap.474-swa.pt)")
        )
    if "clap" in metrics:
        fields.append(("clap.weights", config.clap.weights, f"CLAP checkpoint ({clap.CHECKPOINT_NAME})"))
        fields.append(
            ("clap.tokenizer", config.clap.tokenizer, "CLAP tokenizer (roberta-base vocab.json + merges.txt)")
        )
    return fields


def check_weight_files(config, metrics: Sequence[str], *, prefix: str = "config.") -> None:
    """Fails fast (before any generation or JAX work) when a weight file the metrics need is not given or absent."""
    for field, path, what in _weight_fields(config, metrics):
        if not path:
            raise EvaluationError(f"{prefix}{field} is empty: metric(s) {', '.join(metrics)} need the {what}")
        if not Path(path).expanduser().exists():
            raise EvaluationError(f"{prefix}{field}={path}: no such file or directory ({what})")


def _fingerprint(path: str | os.PathLike) -> dict:
    """What identifies a weight file cheaply: its path, size and the SHA-256 of its first MiB."""
    path = Path(path).expanduser()
    if path.is_dir():
        return {"path": str(path.resolve())}
    with open(path, "rb") as f:
        head = hashlib.sha256(f.read(1 << 20)).hexdigest()
    return {"path": str(path.resolve()), "bytes": path.stat().st_size, "sha256_first_mib": head}


def _tupled(d: Mapping) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


class Embedders:
    """The embedders `metrics` need, their params replicated over `devices` (default: this host's)."""

    def __init__(self, config, metrics: Sequence[str], *, devices: Sequence[jax.Device] | None = None):
        self.metrics = check_metrics(metrics)
        self.names = tuple(e for e in EMBEDDERS if e in {EMBEDDER_OF[m] for m in self.metrics})
        check_weight_files(config, self.metrics)
        devices = list(devices or jax.local_devices())
        self.batch_size = int(config.batch_size)
        if self.batch_size < 1 or self.batch_size % len(devices):
            raise EvaluationError(
                f"batch_size={self.batch_size}: expected a positive multiple of {len(devices)} (the devices the "
                "embedding batch is sharded over)"
            )
        mesh = Mesh(np.asarray(devices), ("rows",))
        self.rows = NamedSharding(mesh, PartitionSpec("rows"))
        replicated = NamedSharding(mesh, PartitionSpec())
        self.settings: dict[str, dict] = {}
        if "vggish" in self.names:
            path = local_file(config.vggish.weights, what="VGGish weights")
            self.vggish = jax.device_put(vggish.load_vggish(path), replicated)
            self.settings["vggish"] = {"weights": _fingerprint(path)}
        if "passt" in self.names:
            self.passt_config = passt.PasstConfig(**_tupled(config.passt.model.to_dict()))
            path = local_file(config.passt.weights, what="PaSST weights")
            self.passt = jax.device_put(passt.load_passt(path, self.passt_config), replicated)
            self.settings["passt"] = {"weights": _fingerprint(path), "model": dataclasses.asdict(self.passt_config)}
        if "clap" in self.names:
            self.clap_config = clap.ClapConfig(
                audio=HtsatConfig(**_tupled(config.clap.audio.to_dict())),
                text=RobertaConfig(**_tupled(config.clap.text.to_dict())),
                joint_dim=int(config.clap.joint_dim),
            )
            self.clap = jax.device_put(clap.load_clap(config.clap.weights, self.clap_config), replicated)
            self.tokenizer = clap.load_clap_tokenizer(config.clap.tokenizer)
            self.settings["clap"] = {
                "weights": _fingerprint(config.clap.weights),
                "tokenizer": _fingerprint(config.clap.tokenizer),
                "audio": dataclasses.asdict(self.clap_config.audio),
                "text": dataclasses.asdict(self.clap_config.text),
            }

    def _padded(self, audio: np.ndarray) -> Callable[[int], np.ndarray]:
        """Batches of `batch_size` rows of `audio` `[B, N]`, the last padded with silence (one compiled shape)."""

        def batch(start: int) -> np.ndarray:
            chunk = audio[start : start + self.batch_size]
            out = np.zeros((self.batch_size, audio.shape[1]), np.float32)
            out[: len(chunk)] = chunk
            return out

        return batch

    def embed(self, name: str, audio: np.ndarray, sample_rate: int, clip_names: Sequence[str]) -> list[np.ndarray]:
        """Embedder `name` of mono clips `audio` `[B, N]` (one length, one rate) -> one array per clip.

        vggish: `[W, 128]` windows; passt: `[S, 527]` segment label probabilities; clap: `[512]`. A CLAP clip longer
        than 10 s is cropped at a start drawn from its own `RandomState(crc32(name))`, so its embedding does not
        depend on its batch mates.
        """
        audio = np.asarray(audio, np.float32)
        n, pad = len(audio), self._padded(audio)
        if name == "vggish":
            return [
                row
                for start in range(0, n, self.batch_size)
                for row in vggish.embed_vggish(self.vggish, pad(start), sample_rate, sharding=self.rows)[
                    : min(self.batch_size, n - start)
                ]
            ]
        if name == "passt":
            probs = passt.passt_label_probs(
                self.passt, audio, sample_rate, config=self.passt_config, batch_size=self.batch_size, sharding=self.rows
            )
            return [probs.probs[probs.clip_index == i] for i in range(n)]
        if name == "clap":
            kwargs = {"config": self.clap_config, "sharding": self.rows}
            if audio.shape[1] * CLAP_RATE / sample_rate <= CLIP_SAMPLES:  # repeat-padded: no randomness
                return [
                    row
                    for start in range(0, n, self.batch_size)
                    for row in clap.embed_audio(self.clap, pad(start), sample_rate, **kwargs)[
                        : min(self.batch_size, n - start)
                    ]
                ]
            return [
                clap.embed_audio(
                    self.clap,
                    np.repeat(audio[i : i + 1], self.batch_size, axis=0),
                    sample_rate,
                    crop_rng=np.random.RandomState(zlib.crc32(clip_name.encode("utf-8"))),
                    **kwargs,
                )[0]
                for i, clip_name in enumerate(clip_names)
            ]
        raise ValueError(f"unknown embedder {name!r}; expected one of {', '.join(EMBEDDERS)}")

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """CLAP text embeddings `[N, 512]` of `texts`, in batches of `batch_size`."""
        out = [np.zeros((0, self.clap_config.joint_dim), np.float32)]
        for start in range(0, len(texts), self.batch_size):
            chunk = list(texts[start : start + self.batch_size])
            out.append(clap.embed_text(self.clap, self.tokenizer, chunk, config=self.clap_config))
        return np.concatenate(out)


# ---- files and the cache --------------------------------------------------------------------------------------


class Clip(NamedTuple):
    """An audio file to embed: `name` keys its cache entries (unique within one cache)."""

    name: str
    path: Path


def _source_stamp(path: Path) -> str:
    stat = path.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}"


class EmbeddingCache:
    """Per-file embeddings under `root/<embedder>/<clip name>.npz` (`embedding` and the file's size:mtime stamp),
    each written atomically, so an interrupted job loses at most the batch in flight.

    `root/<embedder>/settings.json` pins the embedder's weights and architecture: a cache made with other
    weights is refused (an EvaluationError naming the differences), not mixed in. Process 0 creates the folders
    and clears temporaries; call it before the other processes open the cache (a barrier).
    """

    def __init__(self, root: str | os.PathLike, settings: Mapping[str, dict], *, primary: bool = True):
        self.root = Path(root)
        for name, embedder_settings in settings.items():
            if primary:
                (self.root / name).mkdir(parents=True, exist_ok=True)
                pin_settings(self.root / name / "settings.json", embedder_settings, error=EvaluationError)
                remove_temporaries(self.root / name)

    def path(self, embedder: str, clip: Clip) -> Path:
        return self.root / embedder / f"{clip.name}.npz"

    def get(self, embedder: str, clip: Clip) -> np.ndarray | None:
        """The cached embedding of `clip`, or None (absent, unreadable, or of an older version of the file)."""
        path = self.path(embedder, clip)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as npz:
                if str(npz["source"]) != _source_stamp(clip.path):
                    return None
                return np.asarray(npz["embedding"])
        except (OSError, ValueError, KeyError):
            return None

    def put(self, embedder: str, clip: Clip, embedding: np.ndarray) -> None:
        buf = io.BytesIO()
        np.savez(buf, embedding=np.asarray(embedding, np.float32), source=np.asarray(_source_stamp(clip.path)))
        write_atomic(self.path(embedder, clip), buf.getvalue())

    def load(self, embedder: str, clips: Sequence[Clip]) -> list[np.ndarray]:
        """Every clip's cached embedding; a missing one is an EvaluationError (its process did not finish)."""
        out = []
        for clip in clips:
            embedding = self.get(embedder, clip)
            if embedding is None:
                raise EvaluationError(f"{self.path(embedder, clip)}: no {embedder} embedding of {clip.path}")
            out.append(embedding)
        return out


def _audio_info(path: Path) -> tuple[int, int]:
    try:
        info = sf.info(str(path))
    except Exception as e:  # libsndfile raises several types; all mean "unreadable"
        raise AudioError(f"{path}: cannot read audio ({reason(e)})") from None
    return int(info.samplerate), int(info.frames)


def embed_files(
    embedders: Embedders,
    cache: EmbeddingCache,
    work: Sequence[tuple[Clip, Sequence[str]]],
    *,
    process_index: int = 0,
    process_count: int = 1,
    desc: str = "embed",
) -> int:
    """Embeds and caches what `cache` lacks of this process's share (`work[process_index::process_count]`).

    Args:
      work: (clip, embedder names) pairs.
    Returns:
      The number of files embedded now.
    Raises:
      AudioError: a file cannot be read (one line naming it).
    """
    todo = []
    for clip, names in work[process_index::process_count]:
        missing = [n for n in names if cache.get(n, clip) is None]
        if missing:
            todo.append((_audio_info(clip.path), clip, missing))
    todo.sort(key=lambda item: item[0])  # one (rate, length) per batch
    progress = tqdm.tqdm(total=len(todo), unit="file", desc=desc, disable=process_index != 0, dynamic_ncols=True)
    start = 0
    while start < len(todo):
        key = todo[start][0]
        end = start
        while end < len(todo) and end - start < embedders.batch_size and todo[end][0] == key:
            end += 1
        batch = todo[start:end]
        read = [read_audio(clip.path) for _, clip, _ in batch]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (wav, rate) in enumerate(read):  # headers of compressed files can misstate the length
            groups.setdefault((rate, wav.shape[-1]), []).append(i)
        for (rate, _), members in groups.items():
            audio = np.stack([read[i][0].mean(axis=0) for i in members])  # mono: the channel mean
            for name in embedders.names:
                rows = [k for k, i in enumerate(members) if name in batch[i][2]]
                clips = [batch[members[k]][1] for k in rows]
                if clips:
                    for clip, embedding in zip(
                        clips, embedders.embed(name, audio[rows], rate, [c.name for c in clips])
                    ):
                        cache.put(name, clip, embedding)
        progress.update(len(batch))
        start = end
    progress.close()
    return len(todo)


# ---- metrics --------------------------------------------------------------------------------------------------


def fad(reference: tuple[np.ndarray, np.ndarray], windows: Sequence[np.ndarray], *, source: str) -> float:
    """Fréchet distance of the statistics of `windows` (per-clip `[W, 128]`) to `reference` (mu, sigma)."""
    mu, sigma = embedding_statistics(np.concatenate([np.zeros((0, vggish.EMBEDDING_SIZE)), *windows]), source=source)
    return frechet_distance(*reference, mu, sigma)


class KL(NamedTuple):
    """KL(reference || sample) over segment pairs: `per_sample` `[N]` (nan without pairs), `segments` `[N]` pair
    counts, `mean` over all pairs (audiocraft's `kld`) and `mean_qp` with the arguments swapped (`kld_qp`)."""

    per_sample: np.ndarray
    segments: np.ndarray
    mean: float
    mean_qp: float


def kl_scores(reference: Sequence[np.ndarray | None], samples: Sequence[np.ndarray]) -> KL:
    """Pairs sample i's segment distributions `[S, C]` with `reference[i]`'s (None: no reference clip)."""
    per, counts, pq, qp = [], [], [], []
    for ref, gen in zip(reference, samples):
        k = 0 if ref is None else min(len(ref), len(gen))
        counts.append(k)
        if k == 0:
            per.append(np.nan)
            continue
        scores = kl_divergence(ref[:k], gen[:k])
        per.append(float(scores.mean()))
        pq.append(scores)
        qp.append(kl_divergence(gen[:k], ref[:k]))
    if not pq:
        raise EvaluationError("kl: no sample has a reference clip with a segment to compare (longer than 0.15 s)")
    return KL(np.asarray(per), np.asarray(counts), float(np.concatenate(pq).mean()), float(np.concatenate(qp).mean()))


def clap_scores(audio_embeddings: Sequence[np.ndarray], text_embeddings: np.ndarray) -> tuple[np.ndarray, float]:
    """Per-sample CLAP scores `[N]` and their mean (`clap.clap_score` of the stacked embeddings)."""
    return clap.clap_score(np.stack(list(audio_embeddings)), text_embeddings)


# ---- the reference set ----------------------------------------------------------------------------------------


class Reference(NamedTuple):
    """What the samples are compared with: FAD statistics (mu [128], sigma [128, 128]) or None, and the PaSST label
    probabilities `[S, 527]` of reference clips by id (the prompt id they belong to; empty without KL)."""

    statistics: tuple[np.ndarray, np.ndarray] | None
    label_probs: dict[str, np.ndarray]
    files: int


def save_reference(path: str | os.PathLike, reference: Reference) -> Path:
    """`reference` as an `.npz`: `mu`, `sigma`, and (with KL) `kl_ids` [R], `kl_counts` [R], `kl_probs` [sum S, C]."""
    ids = sorted(reference.label_probs)
    arrays = {}
    if ids:
        arrays = {
            "kl_ids": np.asarray(ids, dtype=str),
            "kl_counts": np.asarray([len(reference.label_probs[i]) for i in ids], np.int64),
            "kl_probs": np.concatenate([reference.label_probs[i] for i in ids]).astype(np.float32),
        }
    return save_statistics(path, *reference.statistics, files=np.asarray(reference.files), **arrays)


def load_reference(path: str | os.PathLike, metrics: Sequence[str]) -> Reference:
    """A reference `.npz` (`save_reference`, or any file with FAD's `mu` and `sigma`) for `metrics`."""
    statistics = load_statistics(path) if "fad" in metrics else None
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    probs = {}
    if "kl" in metrics:
        if not {"kl_ids", "kl_counts", "kl_probs"} <= set(arrays):
            raise EvaluationError(
                f"{path}: holds no reference label distributions (kl_ids, kl_counts, kl_probs) for the KL metric; "
                "pass the reference audio directory instead"
            )
        offsets = np.concatenate([[0], np.cumsum(arrays["kl_counts"])])
        probs = {str(i): arrays["kl_probs"][offsets[k] : offsets[k + 1]] for k, i in enumerate(arrays["kl_ids"])}
    return Reference(statistics, probs, int(arrays.get("files", 0)))


def reference_work(directory: str | os.PathLike, metrics: Sequence[str], ids: Sequence[str]) -> list[tuple[Clip, list]]:
    """What to embed of a reference directory: VGGish of every audio file (FAD), PaSST of the files whose stem is
    one of `ids` (KL: the reference clip of that prompt)."""
    paths = audio_files(directory)
    if not paths:
        raise EvaluationError(f"reference audio {directory}: no audio files (.wav, .flac, .ogg, .mp3) in it")
    ids = set(ids)
    work = []
    for path in paths:
        names = (["vggish"] if "fad" in metrics else []) + (["passt"] if "kl" in metrics and path.stem in ids else [])
        if names:
            work.append((Clip(path.name, path), names))
    return work


def reference_from_cache(cache: EmbeddingCache, work: Sequence[tuple[Clip, list]], *, source: str) -> Reference:
    """The `Reference` of a directory whose `reference_work` is in `cache` (FAD needs more windows than 128)."""
    vggish_clips = [clip for clip, names in work if "vggish" in names]
    statistics = None
    if vggish_clips:
        windows = cache.load("vggish", vggish_clips)
        statistics = embedding_statistics(
            np.concatenate([np.zeros((0, vggish.EMBEDDING_SIZE)), *windows]), source=f"reference audio {source}"
        )
    passt_clips = [clip for clip, names in work if "passt" in names]
    probs = dict(zip((c.path.stem for c in passt_clips), cache.load("passt", passt_clips)))
    return Reference(statistics, probs, len(work))


class MemoryCache(EmbeddingCache):
    """`EmbeddingCache`'s interface held in memory (in-training evaluation, whose workdir may be remote)."""

    def __init__(self):  # noqa: D107 - nothing on disk
        self.entries: dict[tuple[str, str], np.ndarray] = {}

    def path(self, embedder: str, clip: Clip) -> Path:
        return Path(f"<memory>/{embedder}/{clip.name}")

    def get(self, embedder: str, clip: Clip) -> np.ndarray | None:
        return self.entries.get((embedder, clip.name))

    def put(self, embedder: str, clip: Clip, embedding: np.ndarray) -> None:
        self.entries[(embedder, clip.name)] = np.asarray(embedding, np.float32)


def reference_of(
    embedders: Embedders, path: str | os.PathLike, metrics: Sequence[str], ids: Sequence[str], cache: EmbeddingCache
) -> Reference:
    """One process: the `Reference` of a statistics `.npz`, or of a directory embedded into `cache`."""
    if Path(path).is_dir():
        work = reference_work(path, metrics, ids)
        embed_files(embedders, cache, work, desc="reference")
        return reference_from_cache(cache, work, source=str(path))
    if Path(path).suffix == ".npz" and Path(path).is_file():
        return load_reference(path, metrics)
    raise EvaluationError(f"reference audio {path}: expected a directory of audio files or a statistics .npz")
