r"""The quickstart's prompts and its objective check of what the trained model made.

  python -m data_pipelines.quickstart_report --mode=prompts --output=quickstart_out
      writes prompts.jsonl (one prompt per drawn `synthetic_corpus.ClipSpec`, its description as the text, plus one
      continuation of a corpus clip), prompt_specs.json (what each prompt asks for) and prompt_intro.wav
  python -m data_pipelines.quickstart_report --mode=check --output=quickstart_out
      measures every generated sample (`samples/`, and `samples_untrained/` from an untrained model on the same
      prompts) with `audio_measures`, next to the same measure on the corpus rendering of each prompt's spec and
      on that rendering's round trip through the run's codec (`assets/codec`: what any model of its codes can
      reach); compares the continuation's generated part with the rest of the clip its prompt was cut from;
      compares the held-out loss of codebook 0 from the text alone under each description with the same loss under
      the description with its key, drums or timbre swapped (`description_sensitivity`); compares the run's held-out
      loss with the unigram entropy of the training codes; prints the summary and
      writes report.json and spectrograms.png (log-mel: prompt's corpus rendering | trained sample | untrained)

The prompts' specs are drawn with their own seed (`PROMPT_SEED`), so they are not the training clips.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import struct
import sys
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import soundfile as sf

from data_pipelines import audio_measures, synthetic_corpus
from magnet_jax.checkpoints.encodec_weights import load_encodec
from magnet_jax.cli import quiet_logs
from magnet_jax.data.records import CodeRecord
from magnet_jax.fileio import atomic_file, write_atomic, write_json
from magnet_jax.models import encodec

PROMPT_SEED = 777
INTRO_SECONDS = 1.5  # the continuation's audio prompt: the start of corpus clip 0
SAMPLE_RATE = 32000
PROPERTIES = ("key", "tempo", "drums", "brightness")


def prompt_specs(count: int = 8) -> list[synthetic_corpus.ClipSpec]:
    """`count` drawn specs, timbre alternating bright sawtooth / soft sine and drums alternating on / off (so every
    check has both answers)."""
    specs = []
    for i in range(count):
        spec = synthetic_corpus.draw_spec(np.random.default_rng([PROMPT_SEED, i]))
        specs.append(dataclasses.replace(spec, timbre=("sawtooth", "sine")[i % 2], drums=(i // 2) % 2 == 0))
    return specs


def spec_table(specs: Sequence[synthetic_corpus.ClipSpec], seconds: float) -> dict[str, dict]:
    """`{"prompt<i>": spec fields + seconds}`: what each prompt asks for, as prompt_specs.json holds it."""
    return {f"prompt{i}": {**dataclasses.asdict(spec), "seconds": seconds} for i, spec in enumerate(specs)}


def write_prompts(output: str | os.PathLike, *, seconds: float) -> list[dict]:
    """Writes prompts.jsonl, prompt_specs.json and prompt_intro.wav (`INTRO_SECONDS` of corpus clip 0) into
    `output`."""
    out = Path(output)
    wav, sr = sf.read(out / "corpus" / "clip_00000.wav", dtype="float32")
    with atomic_file(out / "prompt_intro.wav") as tmp:
        sf.write(str(tmp), wav[: int(INTRO_SECONDS * sr)], sr, format="WAV")
    prompts = [{"text": spec.description(), "seed": i, "id": f"prompt{i}"} for i, spec in enumerate(prompt_specs())]
    prompts.append({"text": "Continue this clip.", "audio": "prompt_intro.wav", "seed": 99, "id": "continuation"})
    write_atomic(out / "prompts.jsonl", "".join(json.dumps(p) + "\n" for p in prompts))
    write_json(out / "prompt_specs.json", spec_table(prompt_specs(), seconds))
    return prompts


def _records(pattern: str) -> list[CodeRecord]:
    """The code records of the ArrayRecord shards matching `pattern` (none is an error naming the pattern)."""
    from array_record.python.array_record_module import ArrayRecordReader

    records = []
    for path in sorted(glob.glob(pattern)):
        reader = ArrayRecordReader(path)
        records += [CodeRecord.from_bytes(data, where=path) for data in reader.read_all()]
        reader.close()
    if not records:
        raise ValueError(f"{pattern}: no code records")
    return records


def unigram_entropy(pattern: str) -> tuple[list[float], int]:
    """(per-codebook entropy in nats of the codes in the ArrayRecord shards matching `pattern`, codebook size)."""
    records = _records(pattern)
    card = records[0].card
    counts = np.zeros((records[0].codes.shape[0], card))
    for record in records:
        for k, row in enumerate(record.codes):
            counts[k] += np.bincount(row, minlength=card)
    p = counts / counts.sum(1, keepdims=True)
    return [float(-np.sum(row[row > 0] * np.log(row[row > 0]))) for row in p], card


def read_clip(path: str | os.PathLike) -> np.ndarray:
    """A mono `SAMPLE_RATE` audio file `[N]` float32 (another rate is an error naming the file)."""
    wav, sr = sf.read(path, dtype="float32")
    if sr != SAMPLE_RATE:
        raise ValueError(f"{path}: sample rate {sr}, expected {SAMPLE_RATE}")
    return wav


def check_samples(samples: str | os.PathLike, specs: dict) -> dict[str, dict]:
    """Adherence of each sample `<id>-0.wav` (32 kHz) in `samples` to its spec: `{id: {property: bool}}`."""
    return measure_adherence(specs, {i: read_clip(Path(samples) / f"{i}-0.wav") for i in specs})


def check_continuation(output: str | os.PathLike) -> dict[str, dict]:
    """What the continuation's generated part keeps of the clip its prompt was cut from: `{"trained" | "untrained":
    {property: bool}}` (`audio_measures.kept`) of the audio after `INTRO_SECONDS` of `samples/continuation-0.wav`
    and `samples_untrained/continuation-0.wav` (those present) against the same span of corpus clip 0."""
    out = Path(output)
    start = int(INTRO_SECONDS * SAMPLE_RATE)
    clip = read_clip(out / "corpus" / "clip_00000.wav")
    reference = audio_measures.measure(clip[start:], SAMPLE_RATE)
    kept = {}
    for name, samples in (("trained", "samples"), ("untrained", "samples_untrained")):
        path = out / samples / "continuation-0.wav"
        if path.is_file():
            continued = read_clip(path)[start : len(clip)]
            kept[name] = audio_measures.kept(reference, audio_measures.measure(continued, SAMPLE_RATE))
    return kept


def corpus_renderings(specs: dict) -> dict[str, np.ndarray]:
    """Each prompt's spec synthesized as the corpus would (`synthetic_corpus.render`)."""
    out = {}
    for i, (prompt_id, fields) in enumerate(specs.items()):
        spec = synthetic_corpus.ClipSpec(**{k: v for k, v in fields.items() if k != "seconds"})
        out[prompt_id] = synthetic_corpus.render(
            spec, fields["seconds"], SAMPLE_RATE, np.random.default_rng([PROMPT_SEED, 1000 + i])
        )
    return out


def codec_round_trips(config, params, renderings: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each rendering `[N]` encoded and decoded by the codec (`EncodecConfig`, params): `{id: [N]}`."""
    ids = list(renderings)
    decoded = encodec.round_trip(config, params, np.stack([renderings[i] for i in ids])[:, None])
    return {i: decoded[n, 0] for n, i in enumerate(ids)}


def measure_adherence(specs: dict, clips: dict[str, np.ndarray]) -> dict[str, dict]:
    """`{id: {property: bool}}` of each clip `[N]` against its prompt's spec."""
    return {
        i: audio_measures.adherence(
            synthetic_corpus.ClipSpec(**{k: v for k, v in specs[i].items() if k != "seconds"}),
            audio_measures.measure(clip, SAMPLE_RATE),
        )
        for i, clip in clips.items()
    }


def tally(results: dict[str, dict]) -> dict[str, tuple[int, int]]:
    """`{property: (matches, checked)}` over the samples."""
    return {
        p: (sum(r[p] for r in results.values() if p in r), sum(p in r for r in results.values())) for p in PROPERTIES
    }


def _colour(x: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> RGB uint8 (dark blue -> red -> yellow)."""
    anchors = np.array([[0, 0, 32], [90, 20, 120], [220, 60, 60], [255, 220, 60]], np.float64)
    pos = np.clip(x, 0, 1) * (len(anchors) - 1)
    lo = np.minimum(pos.astype(int), len(anchors) - 2)
    frac = (pos - lo)[..., None]
    return ((1 - frac) * anchors[lo] + frac * anchors[lo + 1]).astype(np.uint8)


def write_png(path: str | os.PathLike, rgb: np.ndarray) -> None:
    """An RGB uint8 image `[H, W, 3]` as a PNG file (zlib-compressed scanlines, no extra dependency)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))
    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )
    write_atomic(path, png)


def spectrogram_sheet(rows: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
    """Log-mel images of `rows` of clips side by side (low frequencies at the bottom; each image spans the top 50 dB
    of its own power), white separators: RGB uint8 `[H, W, 3]`."""
    images = []
    for clips in rows:
        mels = [audio_measures.log_mel(c, SAMPLE_RATE, 1024, 64).T[::-1] for c in clips]
        width = max(m.shape[1] for m in mels)
        cells = [np.pad(np.clip((m - m.max() + 5) / 5, 0, 1), ((0, 0), (0, width - m.shape[1]))) for m in mels]
        gap = np.full((64, 4), np.nan)
        images.append(np.concatenate([c for cell in cells for c in (cell, gap)][:-1], axis=1))
    gap = np.full((4, images[0].shape[1]), np.nan)
    sheet = np.concatenate([c for img in images for c in (img, gap)][:-1], axis=0)
    rgb = _colour(np.nan_to_num(sheet))
    rgb[np.isnan(sheet)] = 255
    return np.repeat(np.repeat(rgb, 2, axis=0), 2, axis=1)


def check(output: str | os.PathLike) -> dict:
    """The quickstart's objective check (see the module docstring); returns the report (also report.json)."""
    out = Path(output)
    specs = json.loads((out / "prompt_specs.json").read_text())
    corpus = corpus_renderings(specs)
    on_corpus = measure_adherence(specs, corpus)
    on_codec = measure_adherence(specs, codec_round_trips(*load_encodec(out / "assets" / "codec"), corpus))
    trained = check_samples(out / "samples", specs)
    untrained = check_samples(out / "samples_untrained", specs) if (out / "samples_untrained").is_dir() else None
    rows = [json.loads(line) for line in (out / "workdir" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["split"] == "eval"]
    entropy, card = unigram_entropy(str(out / "codes" / "*.array_record"))
    report = {
        "corpus": tally(on_corpus),
        "codec_round_trip": tally(on_codec),
        "trained": tally(trained),
        "untrained": tally(untrained) if untrained else None,
        "per_sample": {"corpus": on_corpus, "codec_round_trip": on_codec, "trained": trained, "untrained": untrained},
        "eval_loss_first": evals[0]["loss"] if evals else None,
        "eval_loss_last": evals[-1]["loss"] if evals else None,
        "eval_step_last": evals[-1]["step"] if evals else None,
        "unigram_entropy": entropy,
        "uniform_entropy": float(np.log(card)),
        "continuation": check_continuation(out),
        "description_loss": description_sensitivity(out / "workdir", str(out / "codes_eval" / "*.array_record")),
    }
    write_json(out / "report.json", report)
    sheet_rows = []
    for prompt_id in specs:
        row = [corpus[prompt_id], sf.read(out / "samples" / f"{prompt_id}-0.wav", dtype="float32")[0]]
        if untrained:
            row.append(sf.read(out / "samples_untrained" / f"{prompt_id}-0.wav", dtype="float32")[0])
        sheet_rows.append(row)
    write_png(out / "spectrograms.png", spectrogram_sheet(sheet_rows))
    return report


def swapped_descriptions(metadata: dict) -> dict[str, str]:
    """A corpus clip's description (record `metadata`) with one property changed: "key" (the tonic a tritone away:
    another key signature, the same genre and mood words), "drums" (on <-> off), "timbre" (the next timbre of
    `synthetic_corpus.TIMBRES`), and "none" (no description)."""
    description = metadata["description"]
    tonic, mode = metadata["key"].split()
    names = [n.lower() for n in synthetic_corpus.NOTE_NAMES]
    key = f"{synthetic_corpus.NOTE_NAMES[names.index(tonic)]} {mode}"
    other_key = f"{synthetic_corpus.NOTE_NAMES[(names.index(tonic) + 6) % 12]} {mode}"
    drums = "drums" in metadata.get("keywords", [])
    timbres = list(synthetic_corpus.TIMBRES)
    other_timbre = timbres[(timbres.index(metadata["instrument"]) + 1) % len(timbres)]

    def replace_once(old: str, new: str) -> str:
        if description.count(old) != 1:
            raise ValueError(f"description {description!r}: expected {old!r} once (a synthetic_corpus description)")
        return description.replace(old, new)

    return {
        "key": replace_once(f" in {key} ", f" in {other_key} "),
        "drums": replace_once(synthetic_corpus.DRUM_PHRASES[drums], synthetic_corpus.DRUM_PHRASES[not drums]),
        "timbre": replace_once(
            synthetic_corpus.TIMBRES[metadata["instrument"]], synthetic_corpus.TIMBRES[other_timbre]
        ),
        "none": "",
    }


def description_sensitivity(source: str | os.PathLike, pattern: str) -> dict[str, float]:
    """Teacher-forced loss (nats per code) of codebook 0 with all its frames masked (the first decoding pass's
    prediction: from the text alone) over the code records matching `pattern`, under their own descriptions
    ("true") and under `swapped_descriptions` ("key", "drums", "timbre", "none"). A property the model follows
    costs loss when it is swapped."""
    import jax
    import jax.numpy as jnp

    from magnet_jax.checkpoints.sources import load_lm
    from magnet_jax.checkpoints.t5_weights import load_t5
    from magnet_jax.data.tokenizer import TextTokenizer
    from magnet_jax.models import conditioner
    from magnet_jax.models.lm import LanguageModel, LMConfig

    config, params = load_lm(str(source))
    model = LanguageModel(LMConfig.from_config(config["model"]))
    t5_config, t5_params = load_t5(config["conditioner"]["t5"])
    tokenizer = TextTokenizer(config["conditioner"]["t5"])
    records = _records(pattern)
    length = min(r.codes.shape[1] for r in records)
    codes = np.stack([r.codes[:, :length] for r in records]).astype(np.int32)
    inputs = jnp.asarray(np.full_like(codes, model.config.mask_id))

    @jax.jit
    def loss(ids, mask):
        cond = conditioner.row_conditioning(t5_config, tokenizer.pad_id, t5_params, ids, mask)
        condition = model.apply({"params": params}, cond.states, cond.mask, method=model.project_condition)
        logits = model.apply({"params": params}, inputs, condition, cond.attend, 0, head=0)
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(log_probs, jnp.asarray(codes[:, 0])[..., None], axis=-1))

    swaps = [swapped_descriptions(r.metadata) for r in records]
    texts = {"true": [r.metadata["description"] for r in records]}
    texts.update({name: [s[name] for s in swaps] for name in swaps[0]})
    out = {}
    for name, rows in texts.items():
        tokens = tokenizer(rows)
        out[name] = float(loss(jnp.asarray(tokens["ids"]), jnp.asarray(tokens["mask"])))
    return out


def format_report(report: dict) -> str:
    """The summary lines the quickstart prints."""

    def counts(t):
        return "; ".join(f"{p} {m}/{n}" for p, (m, n) in t.items() if n)

    lines = ["prompt adherence (DSP on the audio; key = same key signature, tempo within 10 % or an octave):"]
    lines.append(f"  corpus rendering of each prompt: {counts(report['corpus'])}")
    lines.append(f"  its codec round trip (ceiling):  {counts(report['codec_round_trip'])}")
    lines.append(f"  trained tiny MAGNeT:             {counts(report['trained'])}")
    if report["untrained"]:
        lines.append(f"  untrained tiny MAGNeT:           {counts(report['untrained'])}")
    if report["continuation"]:
        lines.append(f"the continuation after its {INTRO_SECONDS} s prompt vs the rest of the clip it was cut from:")
        for name, kept in report["continuation"].items():
            same = "; ".join(f"{p} {'same' if ok else 'different'}" for p, ok in kept.items())
            lines.append(f"  {name + ' tiny MAGNeT:':<33}{same}")
    entropy = report["unigram_entropy"]
    if report["eval_loss_last"] is not None:
        lines.append(
            f"held-out loss {report['eval_loss_first']:.3f} -> {report['eval_loss_last']:.3f} (step "
            f"{report['eval_step_last']}); unigram entropy of the codes {np.mean(entropy):.3f} nats (per codebook "
            f"{min(entropy):.3f}-{max(entropy):.3f}), uniform {report['uniform_entropy']:.3f}"
        )
    if report["description_loss"]:
        loss = report["description_loss"]
        changes = ", ".join(f"{name} {loss[name] - loss['true']:+.3f}" for name in ("key", "drums", "timbre"))
        lines.append(
            f"held-out loss of codebook 0 from the text alone {loss['true']:.3f}; with one property of each "
            f"description swapped: {changes}; no description {loss['none'] - loss['true']:+.3f} (> 0: followed)"
        )
    return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
    del argv
    quiet_logs()
    try:
        if FLAGS.mode == "prompts":
            write_prompts(FLAGS.output, seconds=FLAGS.seconds)
        else:
            print(format_report(check(FLAGS.output)))
            sheet = Path(FLAGS.output) / "spectrograms.png"
            print(f"spectrograms (corpus rendering | trained | untrained; a row per prompt): {sheet}")
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f"quickstart_report: {e}")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_enum("mode", "check", ["prompts", "check"], "write the prompts, or check the samples")
    flags.DEFINE_string("output", None, "the quickstart's output directory", required=True)
    flags.DEFINE_float("seconds", 4.0, "seconds of the corpus renderings (the generated duration)")
    FLAGS = flags.FLAGS
    app.run(main)
