r"""Evaluation job: FAD, KL and CLAP score of generated samples against a reference set and their prompts.

  python -m magnet_jax.evaluate --config=configs/evaluate.py[:metrics=fad+kl+clap] \
      --prompts=<captions .csv | .jsonl | .txt> --reference_audio=<directory | statistics .npz> \
      --samples=<generation output dir | model source> --output_dir=<dir> [--distributed]

`--samples` is either the output of `magnet_jax.generate` (a directory with `manifest.jsonl`) or a model source
(hub id, converted checkpoint, training workdir), in which case the generation job runs first on `--prompts`
(writing `<output_dir>/samples`; resumable like any generation job). Each sample belongs to the caption whose
name is its manifest `prompt_id`; the reference clip of a caption is `<reference_audio>/<id>.<ext>` (KL).

Outputs in `--output_dir` (every file written atomically): `embeddings/{samples,reference}/<embedder>/<file>.npz`
(the per-file cache: a restarted job embeds only what is missing; `settings.json` there pins the weights),
`reference_statistics.npz` (FAD statistics and reference label distributions, reusable as `--reference_audio`),
`metrics.json` (FAD, KL, CLAP, counts, settings) and `samples.csv` (one row per sample). With several hosts
(`--distributed`) each embeds every n-th file on its devices and process 0 computes and writes the metrics. A bad
input is one line on stderr and exit status 2, with no metrics written.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import ml_collections
import numpy as np
from absl import logging

from magnet_jax.cli import (
    define_distributed_flags,
    distributed_argv,
    fail,
    initialize_distributed,
    parse_flags,
    quiet_logs,
)
from magnet_jax.data.audio import AudioError
from magnet_jax.evaluation import scoring
from magnet_jax.evaluation.captions import Caption, CaptionError, read_captions
from magnet_jax.evaluation.metrics import StatisticsError
from magnet_jax.fileio import WeightsError, barrier, write_atomic, write_json

MANIFEST = "manifest.jsonl"  # the generation job's manifest
METRICS_FILE = "metrics.json"
TABLE_FILE = "samples.csv"
REFERENCE_FILE = "reference_statistics.npz"
ERRORS = (scoring.EvaluationError, CaptionError, StatisticsError, WeightsError, AudioError)


def generation_command(config: ml_collections.ConfigDict, source: str, prompts: Path, output: Path) -> list[str]:
    """The `magnet_jax.generate` command that writes the samples of `prompts` from the model `source`."""
    config_file = config.generation.config or str(Path(__file__).resolve().parents[1] / "configs" / "generate.py")
    duration = float(config.generation.duration)
    preset = f"source={source},duration={max(1, round(duration))}"  # the preset takes whole seconds
    if config.generation.preset:
        preset += f",{config.generation.preset}"
    return [
        sys.executable,
        "-m",
        "magnet_jax.generate",
        f"--config={config_file}:{preset}",
        f"--prompts={prompts}",
        f"--output_dir={output}",
        f"--config.generate.duration={duration:g}",
        *config.generation.flags,
    ]


def generate_samples(
    config: ml_collections.ConfigDict,
    source: str,
    prompts: Path,
    captions: Sequence[Caption],
    out: Path,
    *,
    distributed,
) -> Path:
    """Runs the generation job on the captions (as its `.jsonl` prompts, named as `read_captions` names them) into
    `<out>/samples`; it resumes what an earlier run started."""
    out.mkdir(parents=True, exist_ok=True)
    job_prompts = out / "prompts.jsonl"
    write_atomic(job_prompts, "".join(json.dumps({"id": c.name, "text": c.text}) + "\n" for c in captions))
    command = generation_command(config, source, job_prompts, out / "samples") + (
        distributed_argv() if distributed else []
    )
    logging.info("evaluate: generating the samples: %s", " ".join(command))
    done = subprocess.run(command, check=False)
    if done.returncode != 0:
        raise scoring.EvaluationError(
            f"--samples={source}: generating the samples with magnet_jax.generate failed (exit status "
            f"{done.returncode}; its error is printed above)"
        )
    return out / "samples"


def read_samples(samples_dir: Path, captions: Sequence[Caption]) -> list[tuple[scoring.Clip, Caption]]:
    """The samples of a generation output dir that belong to `captions` (by manifest `prompt_id`), in caption
    order; every caption needs at least one."""
    manifest = samples_dir / MANIFEST
    lines = manifest.read_text(encoding="utf-8").splitlines(keepends=True)
    by_name: dict[str, list[dict]] = {}
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            if not line.endswith("\n") or not isinstance(record, dict):
                raise ValueError
            by_name.setdefault(str(record["prompt_id"]), []).append(record)
        except (ValueError, KeyError):
            if number == len(lines):  # a line cut short by a crash of the generation job
                break
            raise scoring.EvaluationError(f"{manifest}:{number}: not a generation manifest record") from None
    missing = [c.name for c in captions if c.name not in by_name]
    if missing:
        raise scoring.EvaluationError(
            f"--samples={samples_dir}: no sample of {len(missing)} of the {len(captions)} prompts (first: "
            f"{missing[0]!r}); generate them or pass the prompts file they were generated from"
        )
    samples = []
    for caption in captions:
        for record in sorted(by_name[caption.name], key=lambda r: r["id"]):
            path = samples_dir / record["file"]
            if not path.is_file():
                raise scoring.EvaluationError(f"{manifest}: sample {record['id']} has no file {path}")
            samples.append((scoring.Clip(record["id"], path), caption))
    return samples


def run(
    config: ml_collections.ConfigDict,
    prompts: str,
    reference_audio: str,  # "" when only clap is computed
    samples: str,
    output_dir: str,
    *,
    distributed: bool = False,
) -> dict | None:
    """Evaluates the samples; returns the metrics (process 0; None on the others).

    Raises:
      one of `ERRORS` (one-line message) for a bad input; nothing of metrics.json / samples.csv is written then.
    """
    start = time.perf_counter()
    metrics = scoring.check_metrics(config.metrics)
    captions = read_captions(prompts)
    scoring.check_weight_files(config, metrics)
    needs_reference = bool({"fad", "kl"} & set(metrics))
    reference_path = Path(reference_audio or ".")
    if needs_reference and not (
        reference_audio and (reference_path.is_dir() or (reference_path.is_file() and reference_path.suffix == ".npz"))
    ):
        raise scoring.EvaluationError(
            f"--reference_audio={reference_audio!r}: fad and kl need a directory of audio files or a statistics .npz"
        )
    out = Path(output_dir)
    samples_dir = Path(samples)
    if not (samples_dir / MANIFEST).is_file():  # a model source: generate first (before JAX starts here)
        samples_dir = generate_samples(config, samples, Path(prompts), captions, out, distributed=distributed)
    if distributed:  # after the generation subprocess: it runs a multi-process job of its own
        initialize_distributed("evaluate")
    sample_list = read_samples(samples_dir, captions)
    primary, rank, count = jax.process_index() == 0, jax.process_index(), jax.process_count()

    embedders = scoring.Embedders(config, metrics)
    caches = {}
    if primary:
        out.mkdir(parents=True, exist_ok=True)
    for kind in ("samples", "reference"):
        settings = {k: v for k, v in embedders.settings.items() if kind == "samples" or k != "clap"}
        caches[kind] = scoring.EmbeddingCache(out / "embeddings" / kind, settings, primary=primary)
    barrier("evaluate:prepared")

    reference_work = []
    if needs_reference and reference_path.is_dir():
        reference_work = scoring.reference_work(reference_path, metrics, [c.id for c in captions])
        scoring.embed_files(
            embedders, caches["reference"], reference_work, process_index=rank, process_count=count, desc="reference"
        )
    scoring.embed_files(
        embedders,
        caches["samples"],
        [(clip, embedders.names) for clip, _ in sample_list],
        process_index=rank,
        process_count=count,
        desc="samples",
    )
    barrier("evaluate:embedded")
    if not primary:
        return None

    reference = scoring.Reference(None, {}, 0)
    if needs_reference and reference_path.is_dir():
        reference = scoring.reference_from_cache(caches["reference"], reference_work, source=str(reference_path))
        if reference.statistics is not None:
            scoring.save_reference(out / REFERENCE_FILE, reference)
    elif needs_reference:
        reference = scoring.load_reference(reference_path, metrics)
    result, table = _score(embedders, caches["samples"], sample_list, reference, metrics)
    result["counts"].update(prompts=len(captions), samples=len(sample_list), reference_files=reference.files)
    result["settings"] = {
        "metrics": list(metrics),
        "prompts": str(Path(prompts).resolve()),
        "reference_audio": str(reference_path.resolve()) if needs_reference else None,
        "samples": str(samples_dir.resolve()),
        "embedders": embedders.settings,
    }
    _write_table(out / TABLE_FILE, table)
    write_json(out / METRICS_FILE, result)
    logging.info("evaluate: done in %.1f s", time.perf_counter() - start)
    return result


def _score(embedders, cache, sample_list, reference: scoring.Reference, metrics) -> tuple[dict, list[dict]]:
    clips = [clip for clip, _ in sample_list]
    table = [
        {"id": clip.name, "prompt_id": caption.id, "file": clip.path.name, "text": caption.text}
        for clip, caption in sample_list
    ]
    result: dict = {"counts": {}}
    if "fad" in metrics:
        windows = cache.load("vggish", clips)
        result["fad"] = scoring.fad(reference.statistics, windows, source="the samples' VGGish windows")
        result["counts"]["fad_windows"] = int(sum(len(w) for w in windows))
        for row, w in zip(table, windows):
            row["vggish_windows"] = len(w)
    if "kl" in metrics:
        kl = scoring.kl_scores(
            [reference.label_probs.get(caption.id) for _, caption in sample_list], cache.load("passt", clips)
        )
        result.update(kl=kl.mean, kl_qp=kl.mean_qp)
        result["counts"].update(
            kl_segment_pairs=int(kl.segments.sum()), kl_samples_without_reference=int((kl.segments == 0).sum())
        )
        for row, value, segments in zip(table, kl.per_sample, kl.segments):
            row.update(kl=None if np.isnan(value) else float(value), kl_segments=int(segments))
    if "clap" in metrics:
        texts = embedders.embed_texts([caption.text for _, caption in sample_list])
        scores, mean = scoring.clap_scores(cache.load("clap", clips), texts)
        result["clap"] = mean
        for row, value in zip(table, scores):
            row["clap"] = float(value)
    return result, table


def _write_table(path: Path, table: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(table[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(table)
    write_atomic(path, buf.getvalue())


def main(argv: Sequence[str]) -> None:
    del argv
    quiet_logs()
    if FLAGS.config is None or not all((FLAGS.prompts, FLAGS.samples, FLAGS.output_dir)):
        fail(
            "evaluate",
            "--config, --prompts, --samples and --output_dir are required (and --reference_audio for fad, kl)",
        )
    try:
        result = run(
            FLAGS.config,
            FLAGS.prompts,
            FLAGS.reference_audio or "",
            FLAGS.samples,
            FLAGS.output_dir,
            distributed=FLAGS.distributed,
        )
    except ERRORS as e:
        fail("evaluate", " ".join(str(e).split()))
    if result is not None:
        summary = ", ".join(f"{k.upper()} {result[k]:.4f}" for k in ("fad", "kl", "clap") if k in result)
        print(f"evaluate: {summary} over {result['counts']['samples']} samples -> {FLAGS.output_dir}/{METRICS_FILE}")


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", None, "config file and preset, e.g. configs/evaluate.py", lock_config=True
    )
    flags.DEFINE_string("prompts", None, "captions: MusicCaps-style .csv (ytid, caption), .jsonl or .txt")
    flags.DEFINE_string("reference_audio", None, "reference audio directory or statistics .npz (fad, kl)")
    flags.DEFINE_string("samples", None, "generation output dir (manifest.jsonl), or a model source to generate from")
    flags.DEFINE_string("output_dir", None, "directory for the embedding cache, metrics.json and samples.csv")
    define_distributed_flags()
    FLAGS = flags.FLAGS
    app.run(main, flags_parser=lambda argv: parse_flags(argv, prog="evaluate"))
