r"""Batch offline generation: a prompts file in, one audio file per sample and a JSONL manifest out.

  python -m magnet_jax.generate --config=configs/generate.py:source=facebook/magnet-small-10secs \
      --prompts=prompts.jsonl --output_dir=/tmp/magnet_out [--config.batch_size=16] [--distributed]

The prompts file (`.txt`, or `.jsonl` with `text`, `audio`, `seed`, `num_samples`, `id`) and the outputs
(`<id>-<j>.wav`, optional codes `.npy`, `manifest.jsonl`, `job.json`) are described in the README. Sample j of a
prompt uses the key `fold_in(key(seed), j)`, so outputs do not depend on batching; every file is written atomically,
a restart skips finished samples and refuses changed settings, and with several hosts each writes the rows it holds
while process 0 writes the manifest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import ml_collections
import numpy as np
import soundfile as sf
import tqdm
from absl import logging

from magnet_jax.api import MAGNeT, local_rows, resolve_sources, row_keys
from magnet_jax.checkpoints.sources import CHECKPOINTS_DIR, load_lm
from magnet_jax.cli import define_distributed_flags, fail, initialize_distributed, one_line, parse_flags, quiet_logs
from magnet_jax.data.audio import read_audio
from magnet_jax.fileio import (
    LockError,
    WeightsError,
    absolute_path,
    barrier,
    check_writable,
    directory_lock,
    file_sha256,
    local_source,
    pin_settings,
    remove_temporaries,
    write_atomic,
)

PROMPT_KEYS = ("text", "audio", "seed", "num_samples", "id")
MANIFEST = "manifest.jsonl"
JOB_FILE = "job.json"
AUDIO_FORMATS = {"wav": "WAV", "flac": "FLAC"}
_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class JobError(ValueError):
    """The job cannot start or resume (bad flags, prompts file, output dir or settings); the message is one line."""


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One valid line of the prompts file."""

    line: int  # 1-based line number in the prompts file
    id: str  # output name stem
    text: str | None  # None = unconditional
    audio: str | None  # absolute path of the audio prompt
    seed: int
    num_samples: int


@dataclasses.dataclass(frozen=True)
class Sample:
    """Sample `index` of `prompt` (key `fold_in(key(prompt.seed), index)`)."""

    prompt: Prompt
    index: int

    @property
    def name(self) -> str:
        return f"{self.prompt.id}-{self.index}"


# ------------------------------------------------------------------------------------------------------------
# Prompts file


def read_prompts(path: str | os.PathLike, *, seed: int, num_samples: int) -> tuple[list[Prompt], list[str]]:
    """Parses a `.txt` or `.jsonl` prompts file.

    Returns:
      The valid prompts in file order, and one `"<file>:<line>: <problem>"` message per malformed line.
    Raises:
      JobError: the file cannot be read, has another extension, or holds no prompt at all.
    """
    path = Path(path)
    if path.suffix not in (".txt", ".jsonl"):
        raise JobError(f"prompts file {path}: expected a .txt or .jsonl file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise JobError(f"prompts file {path}: cannot read it ({e})") from e
    prompts, errors, ids = [], [], set()
    for number, line in enumerate(lines, start=1):
        if not line.strip() or (path.suffix == ".txt" and line.lstrip().startswith("#")):
            continue
        try:
            if path.suffix == ".txt":
                prompt = Prompt(number, f"line{number:05d}", line.strip(), None, seed, num_samples)
            else:
                prompt = _parse_json_prompt(line, number, path.parent, seed=seed, num_samples=num_samples)
            if prompt.id in ids:
                raise ValueError(f"id {prompt.id!r} is used by an earlier line")
        except ValueError as e:
            errors.append(f"{path}:{number}: {e}")
            continue
        ids.add(prompt.id)
        prompts.append(prompt)
    if not prompts:
        raise JobError(
            f"prompts file {path}: no valid prompt"
            + (f" ({len(errors)} malformed lines)" if errors else " (the file is empty)")
        )
    return prompts, errors


def _parse_json_prompt(line: str, number: int, base: Path, *, seed: int, num_samples: int) -> Prompt:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(PROMPT_KEYS))
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(map(repr, unknown))}; expected {', '.join(PROMPT_KEYS)}")
    text = obj.get("text")
    if text is not None and not isinstance(text, str):
        raise ValueError(f"'text' must be a string or null, got {type(text).__name__}")
    seed = obj.get("seed", seed)
    if not _is_int(seed) or not 0 <= seed < 2**32:
        raise ValueError(f"'seed' must be an integer in [0, 2**32), got {seed!r}")
    num_samples = obj.get("num_samples", num_samples)
    if not _is_int(num_samples) or num_samples < 1:
        raise ValueError(f"'num_samples' must be a positive integer, got {num_samples!r}")
    prompt_id = obj.get("id", f"line{number:05d}")
    if not isinstance(prompt_id, str) or not _ID_PATTERN.fullmatch(prompt_id):
        raise ValueError(
            f"'id' must be a file-name-safe string ([A-Za-z0-9._-], not starting with a dot), got {prompt_id!r}"
        )
    audio = obj.get("audio")
    if audio is not None:
        if not isinstance(audio, str) or not audio:
            raise ValueError(f"'audio' must be a path string, got {audio!r}")
        audio_path = (base / Path(audio).expanduser()).resolve()
        if not audio_path.is_file():
            raise ValueError(f"audio prompt {audio_path} does not exist")
        audio = str(audio_path)
    return Prompt(number, prompt_id, text or None, audio, int(seed), int(num_samples))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ------------------------------------------------------------------------------------------------------------
# Outputs


def audio_bytes(wav: np.ndarray, sample_rate: int, fmt: str, subtype: str) -> bytes:
    """`wav` `[C, N]` (clipped to [-1, 1]) encoded as a `fmt` file."""
    buf = io.BytesIO()
    sf.write(buf, np.clip(wav, -1.0, 1.0).T, sample_rate, format=AUDIO_FORMATS[fmt], subtype=subtype)
    return buf.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


class Manifest:
    """`manifest.jsonl`: one JSON line per finished sample id, written after the sample's files exist.

    A new id is appended (and fsynced); a sample written again (its file was missing or damaged) replaces its line
    (the file is rewritten atomically), so there is exactly one line per id. A line cut short by a crash (the only
    way a line can be incomplete) and the older of duplicate lines (left by an older version) are dropped when the
    manifest is opened with `repair` (process 0); other processes open it read-only.
    """

    def __init__(self, path: Path, *, repair: bool):
        self.path = path
        self.records: dict[str, dict] = {}
        if not path.exists():
            return
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines(keepends=True)
        for i, line in enumerate(lines):
            try:
                record = json.loads(line)
                if not line.endswith("\n"):
                    raise ValueError("no newline")
            except ValueError:
                if i != text.count("\n"):  # only the last line may be torn
                    raise JobError(f"{path}:{i + 1}: not a manifest record; the output dir is damaged") from None
                logging.warning("%s: dropping the incomplete last line (interrupted write)", path)
                break
            self.records.pop(record["id"], None)  # a later line for an id wins
            self.records[record["id"]] = record
        if repair and len(self.records) != len(lines):
            self._rewrite()

    def _rewrite(self) -> None:
        write_atomic(self.path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.records.values()))

    def append(self, records: Sequence[dict]) -> None:
        replaces = any(r["id"] in self.records for r in records)
        for record in records:
            self.records.pop(record["id"], None)
            self.records[record["id"]] = record
        if replaces:
            self._rewrite()
            return
        with open(self.path, "a", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())


def same_prompt(record: Mapping, prompt: Prompt) -> bool:
    return (record["text"], record["audio_prompt"], record["seed"]) == (prompt.text, prompt.audio, prompt.seed)


def is_finished(sample: Sample, manifest: Manifest, output_dir: Path) -> bool:
    """Whether the manifest lists `sample` with the same prompt and its files verify: the size and SHA-256 the
    manifest recorded (a truncated, damaged or missing file means the sample is made again)."""
    record = manifest.records.get(sample.name)
    if record is None or not same_prompt(record, sample.prompt):
        return False
    for key in ("file", "codes_file"):
        if record.get(key):
            path, expected = output_dir / record[key], record.get("checksums", {}).get(record[key])
            if not path.is_file() or expected is None:
                return False
            if path.stat().st_size != expected["size"] or file_sha256(path) != expected["sha256"]:
                logging.warning("generate: %s does not match its manifest line (damaged); generating it again", path)
                return False
    return True


def check_prompt_ids(samples: Sequence[Sample], manifest: Manifest, prompts: str | os.PathLike) -> None:
    """Refuses a prompts file that gives an id already in the manifest another prompt (text, audio prompt, seed)."""
    for s in samples:
        record = manifest.records.get(s.name)
        if record is not None and not same_prompt(record, s.prompt):
            raise JobError(
                f"{prompts}:{s.prompt.line}: sample {s.name!r} was generated from another prompt (text "
                f"{record['text']!r}, audio prompt {record['audio_prompt']!r}, seed {record['seed']}); give the "
                "changed prompt a new id or use another output directory"
            )


def source_pin(model: MAGNeT) -> dict:
    """Which files of `config.source` the model was read from: `item` ("export", "checkpoints/<step>" for a
    training workdir), `step` and `checksum` (the digest of their checksum manifest); None where unknown."""
    provenance = model.config.get("provenance", {})
    return {k: provenance.get(k) for k in ("item", "step", "checksum")}


def job_settings(config: ml_collections.ConfigDict, model: MAGNeT) -> dict:
    """What determines the output bytes (pinned in `job.json`): the config fields (batch size and mesh do not), the
    model's objective ("magnet" or "hybrid": how it generates) and the files it was read from (`source_pin`)."""
    c = json.loads(config.to_json())
    return {
        **{
            k: c[k]
            for k in ("source", "t5", "codec", "dtype", "text_length", "rescorer", "ar_model", "generate", "output")
        },
        "objective": model.objective.name,
        "source_pin": source_pin(model),
    }


def pinned_checkpoint_step(job_file: Path) -> int | None:
    """The training checkpoint step an earlier run of the job was pinned to (None: not pinned to a checkpoint)."""
    try:
        pin = json.loads(job_file.read_text(encoding="utf-8")).get("source_pin") or {}
    except (OSError, ValueError):
        return None  # absent, or unreadable (pin_settings says so)
    item = str(pin.get("item") or "")
    return int(pin["step"]) if item.startswith(f"{CHECKPOINTS_DIR}/") and pin.get("step") is not None else None


# ------------------------------------------------------------------------------------------------------------
# The job


def make_batches(samples: Sequence[Sample], batch_size: int, prompt_frames: dict[int, int]) -> list[list[Sample]]:
    """Consecutive samples in batches of at most `batch_size`, samples of one audio-prompt length per batch.

    `prompt_frames` maps a prompt's line to its prompt length in frames (absent: no audio prompt).
    """
    groups: dict[int, list[Sample]] = {}
    for s in samples:
        groups.setdefault(prompt_frames.get(s.prompt.line, 0), []).append(s)
    return [group[i : i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]


def run(
    config: ml_collections.ConfigDict,
    prompts: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    model: MAGNeT | None = None,
    force_unlock: bool = False,
) -> dict:
    """Generates every sample of `prompts` not yet in `output_dir`'s manifest; returns the job summary.

    Args:
      config: a configs/generate.py config.
      prompts: the prompts file (`.txt` or `.jsonl`).
      output_dir: where audio, codes, `manifest.jsonl` and `job.json` go.
      model: an already loaded model (else `config.source` is loaded, also when nothing is left to do: job.json
        records its objective); from a training workdir, the checkpoint step pinned in job.json by an earlier run.
      force_unlock: take the output dir's lock even when a job on another host holds it.
    Raises:
      JobError: bad prompts file, output dir or settings, a prompt id reused for another prompt, the output dir
        in use by another job (malformed lines only skip themselves).
      WeightsError: the model cannot be loaded.
    """
    start = time.perf_counter()
    out, primary = Path(absolute_path(output_dir)), jax.process_index() == 0
    config.source = local_source(config.source)  # pinned in job.json: the same model from any working directory
    resolve_sources(config)
    fmt, subtype = config.output.format, config.output.subtype
    if fmt not in AUDIO_FORMATS or not sf.check_format(AUDIO_FORMATS[fmt], subtype):
        raise JobError(
            f"config.output.format={fmt!r} / subtype={subtype!r}: expected format one of "
            f"{', '.join(AUDIO_FORMATS)} with a subtype soundfile writes for it (PCM_16, PCM_24, FLOAT)"
        )
    prompt_list, errors = read_prompts(absolute_path(prompts), seed=config.seed, num_samples=config.num_samples)
    try:  # before the model loads: a bad output dir is found in seconds
        check_writable(out, what="--output_dir")
    except ValueError as e:
        raise JobError(str(e)) from None
    if model is None:  # a training workdir: the checkpoint step an earlier run of this job used, if any
        model = MAGNeT(*load_lm(config.source, checkpoint_step=pinned_checkpoint_step(out / JOB_FILE)), config)
    try:
        model.set_generation_params(**config.generate)
    except ValueError as e:
        raise JobError(f"config.generate: {e}") from e
    if config.batch_size < 1 or config.batch_size % model.batch_multiple:
        raise JobError(
            f"config.batch_size={config.batch_size}: expected a positive multiple of "
            f"{model.batch_multiple} (the devices the batch is sharded over)"
        )
    lock = directory_lock(out, force=force_unlock) if primary else contextlib.nullcontext()  # before any write
    try:
        with lock:
            return _run_locked(config, prompts, out, model, prompt_list, errors, start)
    except LockError as e:
        raise JobError(str(e)) from None


def _run_locked(config, prompts, out: Path, model: MAGNeT, prompt_list, errors, start) -> dict:
    primary = jax.process_index() == 0
    if primary:
        out.mkdir(parents=True, exist_ok=True)
        pin_settings(out / JOB_FILE, job_settings(config, model), error=JobError)
        remove_temporaries(out)
        manifest = Manifest(out / MANIFEST, repair=True)
    barrier("generate:prepared")
    if not primary:
        manifest = Manifest(out / MANIFEST, repair=False)
    samples = [Sample(p, j) for p in prompt_list for j in range(p.num_samples)]
    check_prompt_ids(samples, manifest, prompts)
    todo = [s for s in samples if not is_finished(s, manifest, out)]
    logging.info(
        "generate: %d prompts, %d samples, %d already done, %d malformed lines",
        len(prompt_list),
        len(samples),
        len(samples) - len(todo),
        len(errors),
    )

    timings = {"first_batch_seconds": None, "steady_seconds": 0.0, "steady_samples": 0}
    if todo:
        prompt_codes = _encode_prompts(model, todo, prompts, errors)
        todo = [s for s in todo if s.prompt.audio is None or s.prompt.line in prompt_codes]
        _generate_all(model, config, todo, prompt_codes, out, manifest, timings)

    finished = sum(is_finished(s, manifest, out) for s in samples)
    summary = {
        "output_dir": str(out),
        "prompts": len(prompt_list),
        "samples": len(samples),
        "finished": finished,
        "generated": len(todo),
        "malformed_lines": errors,
        "elapsed_seconds": time.perf_counter() - start,
        **timings,
        "samples_per_second": (
            timings["steady_samples"] / timings["steady_seconds"] if timings["steady_seconds"] else None
        ),
    }
    for error in errors:
        logging.warning("generate: skipped %s", error)
    return summary


def _encode_prompts(model: MAGNeT, todo: Sequence[Sample], prompts_file, errors: list[str]) -> dict[int, np.ndarray]:
    """Codes `[K, Tp]` of every audio prompt `todo` needs, by prompt line; a bad prompt becomes an error line."""
    codes = {}
    for prompt in {s.prompt.line: s.prompt for s in todo if s.prompt.audio}.values():
        try:
            if model.objective.generates_prefix:
                raise ValueError(f"audio prompt {prompt.audio}: not supported with a {model.objective.title} model")
            wav, sample_rate = read_audio(prompt.audio)
            c = model.encode_audio(wav[None], sample_rate)[0]
            first_window = min(model.num_frames, model.window_frames)
            if c.shape[-1] >= first_window:
                raise ValueError(
                    f"audio prompt {prompt.audio} is {c.shape[-1] / model.frame_rate:.2f} s, not "
                    f"shorter than the {first_window / model.frame_rate:.2f} s of the first window"
                )
        except ValueError as e:
            errors.append(f"{prompts_file}:{prompt.line}: {e}")
            continue
        codes[prompt.line] = c
    return codes


def _generate_all(
    model: MAGNeT,
    config,
    todo: Sequence[Sample],
    prompt_codes: dict[int, np.ndarray],
    out: Path,
    manifest: Manifest,
    timings: dict,
) -> None:
    primary = jax.process_index() == 0
    params = {**model.generation_params, "decoding_steps": list(model.decode_params.decoding_steps)}
    fmt = config.output.format
    progress = tqdm.tqdm(total=len(todo), unit="sample", disable=not primary, dynamic_ncols=True)
    for number, batch in enumerate(
        make_batches(todo, config.batch_size, {line: c.shape[-1] for line, c in prompt_codes.items()})
    ):
        t0 = time.perf_counter()
        rows = batch + batch[:1] * (config.batch_size - len(batch))  # the last batch is padded with copies
        keys = row_keys([(s.prompt.seed, s.index) for s in rows])
        prompt = np.stack([prompt_codes[s.prompt.line] for s in rows]) if batch[0].prompt.audio else None
        codes = model.generate_codes([s.prompt.text for s in rows], keys, prompt)
        local_codes, local_audio = local_rows(codes), local_rows(model.decode_audio(codes))
        seconds = time.perf_counter() - t0
        for i, s in enumerate(batch):
            if i in local_audio:
                write_atomic(
                    out / f"{s.name}.{fmt}", audio_bytes(local_audio[i], model.sample_rate, fmt, config.output.subtype)
                )
                if config.output.write_codes:
                    write_atomic(out / f"{s.name}.npy", npy_bytes(local_codes[i].astype(np.int16)))
        barrier(f"generate:batch{number}")
        if number == 0:
            timings["first_batch_seconds"] = seconds  # includes compilation
        else:
            timings["steady_seconds"] += seconds
            timings["steady_samples"] += len(batch)
        if primary:
            manifest.append(
                [
                    {
                        **_record(s, model, params, config, prompt_codes, seconds, len(batch), number),
                        "checksums": file_checksums(out, s, config),
                    }
                    for s in batch
                ]
            )
        progress.update(len(batch))
    progress.close()


def file_checksums(out: Path, s: Sample, config) -> dict[str, dict]:
    """`{file name: {size, sha256}}` of a sample's files as written (read back by process 0 after the barrier, so
    samples written by other hosts are covered too)."""
    names = [f"{s.name}.{config.output.format}"] + ([f"{s.name}.npy"] if config.output.write_codes else [])
    return {name: {"size": (out / name).stat().st_size, "sha256": file_sha256(out / name)} for name in names}


def _record(
    s: Sample, model: MAGNeT, params: dict, config, prompt_codes, seconds: float, batch_rows: int, batch_number: int
) -> dict:
    p = s.prompt
    return {
        "id": s.name,
        "file": f"{s.name}.{config.output.format}",
        "codes_file": f"{s.name}.npy" if config.output.write_codes else None,
        "line": p.line,
        "prompt_id": p.id,
        "sample": s.index,
        "text": p.text,
        "audio_prompt": p.audio,
        "prompt_frames": int(prompt_codes[p.line].shape[-1]) if p.audio else 0,
        "seed": p.seed,
        "frames": model.num_frames,
        "duration": model.num_frames / model.frame_rate,
        "sample_rate": model.sample_rate,
        "model": config.source,
        "source_pin": source_pin(model),
        "objective": model.objective.name,
        "rescorer": config.rescorer or None,
        "ar_model": config.ar_model or None,
        "params": params,
        "timing": {"batch": batch_number, "batch_rows": batch_rows, "batch_seconds": round(seconds, 4)},
    }


def format_summary(summary: dict) -> str:
    rate = summary["samples_per_second"]
    lines = [
        f"generate: {summary['finished']}/{summary['samples']} samples of {summary['prompts']} prompts in "
        f"{summary['output_dir']} ({summary['generated']} generated now in {summary['elapsed_seconds']:.1f} s"
        + (
            f"; first batch {summary['first_batch_seconds']:.1f} s incl. compilation"
            if summary["first_batch_seconds"] is not None
            else ""
        )
        + (f"; {rate:.3f} samples/s after it" if rate else "")
        + ")"
    ]
    if summary["malformed_lines"]:
        lines.append(f"skipped {len(summary['malformed_lines'])} malformed prompt lines:")
        lines += [f"  {e}" for e in summary["malformed_lines"]]
    return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
    del argv
    quiet_logs()
    if FLAGS.config is None or not FLAGS.prompts or not FLAGS.output_dir:
        fail("generate", "--config, --prompts and --output_dir are required")
    if FLAGS.distributed:
        initialize_distributed("generate")
    try:
        summary = run(FLAGS.config, FLAGS.prompts, FLAGS.output_dir, force_unlock=FLAGS.force_unlock)
    except (JobError, WeightsError) as e:
        fail("generate", str(e))
    except OSError as e:  # a full disk or read-only output dir while writing: one line with the path
        fail("generate", one_line(e))
    if jax.process_index() == 0:
        print(format_summary(summary))


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config",
        None,
        "config file and preset, e.g. configs/generate.py:source=facebook/magnet-small-10secs",
        lock_config=True,
    )
    flags.DEFINE_string("prompts", None, "prompts file: .txt (one description per line) or .jsonl")
    flags.DEFINE_string("output_dir", None, "directory for the audio files, manifest.jsonl and job.json")
    define_distributed_flags()
    flags.DEFINE_bool("force_unlock", False, "take the output dir's lock even if a job on another host holds it")
    FLAGS = flags.FLAGS
    app.run(main, flags_parser=lambda argv: parse_flags(argv, prog="generate"))
