r"""Synthetic music corpus: short synthesized clips with matching descriptions, as real audio files + sidecars.

Each clip is a chord progression in a random key and tempo, played in one of a few patterns (sustained chords,
arpeggio, melody over a pad, bass line) on one of a few timbres (sine, square, sawtooth, organ, pluck, FM electric
piano), with or without a drum beat. Its description and audiocraft-format sidecar (`clip_00003.json`: description,
genre, key, bpm, moods, keywords, instrument, title) say exactly what was synthesized, so audio → codes → training is
exercised on real files with text that matches the audio.

  python -m data_pipelines.synthetic_corpus --output=/tmp/corpus --num_clips=64 --seconds=10 --seed=0

Clip i depends only on (seed, i), so growing `--num_clips` keeps the earlier clips identical.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import soundfile as sf

from magnet_jax.cli import quiet_logs
from magnet_jax.fileio import atomic_file, write_json

NOTE_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
MAJOR, MINOR = (0, 2, 4, 5, 7, 9, 11), (0, 2, 3, 5, 7, 8, 10)
PROGRESSIONS = {
    "major": ((0, 4, 5, 3), (0, 3, 4, 0), (0, 5, 3, 4)),  # scale degrees (I-V-vi-IV, ...)
    "minor": ((0, 5, 2, 6), (0, 3, 4, 0), (0, 6, 5, 4)),
}
TIMBRES = {  # name -> words used in the description
    "sine": "soft sine-wave synth",
    "square": "retro square-wave synth",
    "sawtooth": "bright sawtooth synth",
    "organ": "electric organ",
    "pluck": "plucked string",
    "epiano": "FM electric piano",
}
PATTERNS = {
    "chords": "sustained chords",
    "arpeggio": "arpeggios",
    "melody": "a simple melody over soft chords",
    "bass": "a bass line under sustained chords",
}
GENRES = {
    "chords": ("ambient", "new age"),
    "arpeggio": ("electronic", "synthwave"),
    "melody": ("pop", "folk"),
    "bass": ("funk", "electronic"),
}
DRUM_PHRASES = {True: " with a steady drum beat", False: ", no drums"}  # how a description ends
FORMATS = {
    "wav": ("WAV", "PCM_16"),
    "flac": ("FLAC", "PCM_16"),
    "ogg": ("OGG", "VORBIS"),
    "mp3": ("MP3", "MPEG_LAYER_III"),
}


@dataclasses.dataclass(frozen=True)
class ClipSpec:
    """What one clip contains (drawn from the clip's RNG)."""

    tonic: int  # pitch class 0..11
    mode: str  # major | minor
    bpm: int
    progression: tuple[int, ...]
    pattern: str
    timbre: str
    drums: bool

    @property
    def key(self) -> str:
        return f"{NOTE_NAMES[self.tonic]} {self.mode}"

    @property
    def mood(self) -> str:
        if self.bpm < 90:
            return "calm" if self.mode == "major" else "melancholic"
        if self.bpm < 125:
            return "relaxed" if self.mode == "major" else "moody"
        return "energetic" if self.mode == "major" else "tense"

    @property
    def genre(self) -> str:
        return GENRES[self.pattern][self.tonic % 2]

    def description(self) -> str:
        tempo = "slow" if self.bpm < 90 else "mid-tempo" if self.bpm < 125 else "fast"
        return (
            f"A {tempo} {self.mood} {self.genre} piece: {PATTERNS[self.pattern]} on a {TIMBRES[self.timbre]} "
            f"in {self.key} at {self.bpm} BPM{DRUM_PHRASES[self.drums]}."
        )

    def sidecar(self, title: str) -> dict:
        keywords = [self.timbre, self.pattern] + (["drums"] if self.drums else [])
        return {
            "title": title,
            "description": self.description(),
            "genre": self.genre,
            "key": self.key,
            "bpm": self.bpm,
            "moods": [self.mood],
            "keywords": keywords,
            "instrument": self.timbre,
        }


def draw_spec(rng: np.random.Generator, timbres: Sequence[str] = tuple(TIMBRES)) -> ClipSpec:
    """A clip's spec drawn from `rng`, its timbre one of `timbres`."""
    mode = str(rng.choice(["major", "minor"]))
    progs = PROGRESSIONS[mode]
    return ClipSpec(
        tonic=int(rng.integers(12)),
        mode=mode,
        bpm=int(rng.integers(14, 33)) * 5,
        progression=progs[int(rng.integers(len(progs)))],
        pattern=str(rng.choice(list(PATTERNS))),
        timbre=str(rng.choice(list(timbres))),
        drums=bool(rng.random() < 0.5),
    )


# ---- synthesis ----------------------------------------------------------------------------------------


def _midi_hz(note: float) -> float:
    return 440.0 * 2.0 ** ((note - 69) / 12)


def _tone(timbre: str, freq: float, n: int, sr: int) -> np.ndarray:
    """One note of `n` samples with its envelope, band-limited below Nyquist."""
    t = np.arange(n) / sr
    nyquist = sr / 2

    def harmonics(weights):
        out = np.zeros(n)
        for h, w in weights:
            if h * freq < nyquist:
                out += w * np.sin(2 * np.pi * h * freq * t)
        return out

    if timbre == "sine":
        wave = np.sin(2 * np.pi * freq * t)
    elif timbre == "square":
        wave = harmonics([(h, 1.0 / h) for h in range(1, 40, 2)]) * 0.8
    elif timbre == "sawtooth":
        wave = harmonics([(h, 1.0 / h) for h in range(1, 40)]) * 0.6
    elif timbre == "organ":
        wave = harmonics([(1, 1.0), (2, 0.6), (3, 0.4), (4, 0.25), (6, 0.15), (8, 0.1)]) * 0.5
    elif timbre == "pluck":
        out = np.zeros(n)
        for h in range(1, 16):
            if h * freq < nyquist:
                out += np.exp(-t * (3.0 + 2.5 * h)) * np.sin(2 * np.pi * h * freq * t) / h
        return out
    elif timbre == "epiano":  # FM with a 1:1 modulator (harmonic partials) and a decaying index
        index = 2.0 * np.exp(-4.0 * t)
        return np.sin(2 * np.pi * freq * t + index * np.sin(2 * np.pi * freq * t)) * np.exp(-2.0 * t)
    else:
        raise ValueError(f"unknown timbre {timbre!r}; expected one of {', '.join(TIMBRES)}")
    attack, release = min(n, int(0.01 * sr)), min(n, int(0.05 * sr))
    env = np.ones(n)
    env[:attack] = np.linspace(0.0, 1.0, attack)
    if release:
        env[n - release :] *= np.linspace(1.0, 0.0, release)
    return wave * env


def _drum(kind: str, n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(n) / sr
    if kind == "kick":
        phase = 2 * np.pi * np.cumsum(50.0 + 100.0 * np.exp(-t * 30.0)) / sr
        return np.sin(phase) * np.exp(-t * 12.0)
    noise = rng.standard_normal(n)
    if kind == "snare":
        return (0.6 * noise + 0.5 * np.sin(2 * np.pi * 185.0 * t)) * np.exp(-t * 25.0)
    return np.diff(noise, prepend=0.0) * 0.3 * np.exp(-t * 60.0)  # hi-hat: high-passed noise


def render(spec: ClipSpec, seconds: float, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Synthesizes `spec` as float32 mono `[seconds * sr]`, peak 0.8."""
    n = int(round(seconds * sr))
    out = np.zeros(n)
    beat = 60.0 / spec.bpm
    scale = MAJOR if spec.mode == "major" else MINOR
    root = 48 + spec.tonic  # C3..B3

    def add(sig, start_s, gain):
        i = int(start_s * sr)
        if i < n:
            m = min(len(sig), n - i)
            out[i : i + m] += gain * sig[:m]

    def chord_notes(degree):
        return [root + scale[(degree + k) % 7] + 12 * ((degree + k) // 7) for k in (0, 2, 4)]

    bar = 2 * beat if seconds < 4 else 4 * beat  # short clips still hear the progression
    n_bars = int(np.ceil(seconds / bar))
    for b in range(n_bars):
        degree = spec.progression[b % len(spec.progression)]
        notes, t0 = chord_notes(degree), b * bar
        if spec.pattern in ("chords", "melody", "bass"):
            gain = 0.25 if spec.pattern == "chords" else 0.12
            for note in notes:
                add(_tone(spec.timbre, _midi_hz(note + 12), int(bar * sr), sr), t0, gain)
        if spec.pattern == "arpeggio":
            steps = int(round(bar / (beat / 2)))
            for s in range(steps):
                note = notes[s % 3] + 12 * (1 + (s // 3) % 2)
                add(_tone(spec.timbre, _midi_hz(note), int(beat / 2 * sr), sr), t0 + s * beat / 2, 0.35)
        if spec.pattern == "melody":
            degree_now = degree + 7
            for s in range(int(round(bar / (beat / 2)))):
                degree_now += int(rng.choice([-2, -1, 0, 1, 2]))
                degree_now = int(np.clip(degree_now, 5, 14))
                note = root + 12 + scale[degree_now % 7] + 12 * (degree_now // 7)
                add(_tone(spec.timbre, _midi_hz(note), int(beat / 2 * sr), sr), t0 + s * beat / 2, 0.3)
        if spec.pattern == "bass":
            for s in range(int(round(bar / beat))):
                note = notes[0] - 12 + (7 if s % 2 else 0)
                add(_tone(spec.timbre, _midi_hz(note), int(beat * 0.9 * sr), sr), t0 + s * beat, 0.45)
    if spec.drums:
        for s in range(int(np.ceil(seconds / (beat / 2)))):
            t0 = s * beat / 2
            add(_drum("hihat", int(0.05 * sr), sr, rng), t0, 0.25)
            if s % 4 == 0:
                add(_drum("kick", int(0.3 * sr), sr, rng), t0, 0.8)
            if s % 4 == 2:
                add(_drum("snare", int(0.2 * sr), sr, rng), t0, 0.5)
    fade = min(n // 2, int(0.01 * sr))
    if fade:
        out[:fade] *= np.linspace(0.0, 1.0, fade)
        out[n - fade :] *= np.linspace(1.0, 0.0, fade)
    peak = np.max(np.abs(out))
    return (out * (0.8 / peak if peak > 0 else 1.0)).astype(np.float32)


# ---- corpus -------------------------------------------------------------------------------------------


def write_clip(path: Path, wav: np.ndarray, sr: int, fmt: str) -> None:
    """Writes `wav` (`[N]` or `[N, C]`) atomically: a temporary name, then a rename."""
    major, subtype = FORMATS[fmt]
    with atomic_file(path) as tmp:
        sf.write(str(tmp), wav, sr, format=major, subtype=subtype)


def generate_corpus(
    output: str | os.PathLike,
    num_clips: int,
    seconds: float,
    seed: int = 0,
    *,
    sample_rate: int = 32000,
    channels: int = 1,
    formats: Sequence[str] = ("wav",),
    timbres: Sequence[str] = tuple(TIMBRES),
) -> list[Path]:
    """Writes `num_clips` clips `clip_{i:05d}.<fmt>` + `clip_{i:05d}.json` into `output`; returns the audio paths.

    Args:
      seconds: clip length.
      sample_rate, channels: of the written files (the encode job downmixes and resamples).
      formats: cycled over the clips (`wav`, `flac`, `ogg`, `mp3`), to exercise every reader.
      timbres: the timbres clips are drawn from (`TIMBRES` keys; the default is all of them).
    """
    for fmt in formats:
        if fmt not in FORMATS:
            raise ValueError(f"format {fmt!r}: expected one of {', '.join(FORMATS)}")
    unknown = [t for t in timbres if t not in TIMBRES]
    if unknown or not timbres:
        raise ValueError(f"timbres {', '.join(unknown) or '(none)'}: expected some of {', '.join(TIMBRES)}")
    if num_clips < 1 or seconds <= 0 or channels < 1:
        raise ValueError(f"need num_clips >= 1, seconds > 0, channels >= 1 (got {num_clips}, {seconds}, {channels})")
    out_dir = Path(output)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(num_clips):
        rng = np.random.default_rng([seed, i])
        spec = draw_spec(rng, timbres)
        wav = render(spec, seconds, sample_rate, rng)
        if channels > 1:  # slightly different gains per channel: a real stereo file whose mean is the mix
            wav = np.stack([wav * (1.0 - 0.1 * c / channels) for c in range(channels)], axis=1)
        fmt = formats[i % len(formats)]
        path = out_dir / f"clip_{i:05d}.{fmt}"
        write_json(path.with_suffix(".json"), spec.sidecar(title=f"synthetic clip {i}"))
        write_clip(path, wav, sample_rate, fmt)
        paths.append(path)
    return paths


def main(argv):
    del argv
    quiet_logs()
    try:
        paths = generate_corpus(
            FLAGS.output,
            FLAGS.num_clips,
            FLAGS.seconds,
            FLAGS.seed,
            sample_rate=FLAGS.sample_rate,
            channels=FLAGS.channels,
            formats=FLAGS.formats,
            timbres=FLAGS.timbres,
        )
    except (ValueError, OSError) as e:
        sys.exit(f"synthetic_corpus: {e}")
    print(
        f"wrote {len(paths)} clips of {FLAGS.seconds:g} s ({len(paths) * FLAGS.seconds / 3600:.3f} h) to {FLAGS.output}"
    )


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("output", None, "directory to write clips and sidecars into", required=True)
    flags.DEFINE_integer("num_clips", 16, "number of clips")
    flags.DEFINE_float("seconds", 10.0, "clip length in seconds")
    flags.DEFINE_integer("seed", 0, "corpus seed (clip i depends only on seed and i)")
    flags.DEFINE_integer("sample_rate", 32000, "sample rate of the written files")
    flags.DEFINE_integer("channels", 1, "channels of the written files")
    flags.DEFINE_list("formats", ["wav"], "audio formats cycled over the clips: wav, flac, ogg, mp3")
    flags.DEFINE_list("timbres", list(TIMBRES), f"timbres the clips are drawn from: {', '.join(TIMBRES)}")
    FLAGS = flags.FLAGS
    app.run(main)
