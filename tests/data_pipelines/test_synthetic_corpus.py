"""Synthetic corpus: real audio files + audiocraft sidecars whose descriptions match what was synthesized."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from data_pipelines import synthetic_corpus as sc

REPO = Path(__file__).resolve().parents[2]


def _chroma(wav: np.ndarray, sr: int) -> np.ndarray:
    """Spectral energy per pitch class (200 Hz - 2 kHz, above the kick drum)."""
    power = np.abs(np.fft.rfft(wav * np.hanning(len(wav)))) ** 2
    freqs = np.fft.rfftfreq(len(wav), 1 / sr)
    band = (freqs > 200) & (freqs < 2000)
    pitch_class = np.round(12 * np.log2(freqs[band] / 440.0) + 69).astype(int) % 12
    return np.bincount(pitch_class, weights=power[band], minlength=12)


def _onset_period(wav: np.ndarray, sr: int, hop: float = 0.005) -> float:
    """Strongest onset-autocorrelation lag in [0.25, 1] s."""
    h = int(hop * sr)
    x = np.diff(wav)
    envelope = np.sqrt(np.add.reduceat(x**2, np.arange(0, len(x), h)))
    onset = np.maximum(np.diff(envelope), 0)
    onset -= onset.mean()
    ac = np.correlate(onset, onset, "full")[len(onset) - 1 :]
    lo, hi = int(0.25 / hop), int(1.0 / hop)
    return (lo + int(np.argmax(ac[lo:hi]))) * hop


def test_clips_are_readable_files_in_every_format_with_sidecars(tmp_path):
    paths = sc.generate_corpus(
        tmp_path, num_clips=4, seconds=1.5, seed=3, sample_rate=44100, channels=2, formats=["wav", "flac", "ogg", "mp3"]
    )
    assert [p.suffix for p in paths] == [".wav", ".flac", ".ogg", ".mp3"]
    for path in paths:
        wav, sr = sf.read(str(path))
        assert sr == 44100 and wav.shape[1] == 2
        assert abs(len(wav) / sr - 1.5) < 0.01
        assert 0.3 < np.abs(wav).max() <= 1.0 and wav.std() > 0.01
        meta = json.loads(path.with_suffix(".json").read_text())
        assert set(meta) == {"title", "description", "genre", "key", "bpm", "moods", "keywords", "instrument"}
        assert meta["key"] in meta["description"] and f"{meta['bpm']} BPM" in meta["description"]
        assert sc.TIMBRES[meta["instrument"]] in meta["description"]
    assert not list(tmp_path.glob(".*tmp"))  # written under temporary names, then renamed


@pytest.mark.parametrize("index", range(12))
def test_pitch_content_is_in_the_described_key(index):
    rng = np.random.default_rng([0, index])
    spec = sc.draw_spec(rng)
    wav = sc.render(spec, 2.0, 16000, rng)
    scale = sc.MAJOR if spec.mode == "major" else sc.MINOR
    in_key = sorted({(spec.tonic + step) % 12 for step in scale})
    chroma = _chroma(wav, 16000)
    assert set(np.argsort(chroma)[-3:]) <= set(in_key), spec
    assert chroma[in_key].sum() / chroma.sum() > 0.8, spec


def test_drum_beat_follows_the_described_tempo():
    checked = 0
    for index in range(40):
        rng = np.random.default_rng([1, index])
        spec = sc.draw_spec(rng)
        if not spec.drums:
            continue
        wav = sc.render(spec, 3.0, 16000, rng)
        eighths = _onset_period(wav, 16000) / (30.0 / spec.bpm)  # period in eighth notes of the described tempo
        assert abs(eighths - round(eighths)) < 0.03 and round(eighths) >= 1, (spec, eighths)
        checked += 1
    assert checked >= 10


def test_clip_depends_only_on_seed_and_index(tmp_path):
    few = sc.generate_corpus(tmp_path / "few", num_clips=2, seconds=0.5, seed=7)
    more = sc.generate_corpus(tmp_path / "more", num_clips=3, seconds=0.5, seed=7)
    other = sc.generate_corpus(tmp_path / "other", num_clips=2, seconds=0.5, seed=8)
    for a, b in zip(few, more):
        assert np.array_equal(sf.read(str(a))[0], sf.read(str(b))[0])
        assert a.with_suffix(".json").read_text() == b.with_suffix(".json").read_text()
    assert not np.array_equal(sf.read(str(few[0]))[0], sf.read(str(other[0]))[0])


def test_cli_writes_the_corpus_and_rejects_bad_flags(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "data_pipelines.synthetic_corpus",
        f"--output={tmp_path}/c",
        "--num_clips=2",
        "--seconds=0.5",
        "--seed=1",
    ]
    ok = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert len(list((tmp_path / "c").glob("clip_*.wav"))) == 2 and "wrote 2 clips" in ok.stdout
    bad = subprocess.run(cmd + ["--formats=wav,aiff"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines()[-1] == "synthetic_corpus: format 'aiff': expected one of wav, flac, ogg, mp3"


def test_timbres_restrict_the_drawn_clips_and_keep_the_default_corpus(tmp_path):
    sc.generate_corpus(tmp_path / "two", num_clips=12, seconds=0.5, timbres=["sawtooth", "sine"])
    drawn = {json.loads(p.read_text())["instrument"] for p in (tmp_path / "two").glob("*.json")}
    assert drawn == {"sawtooth", "sine"}
    # the default draws exactly the corpus it drew before the option existed (same RNG calls)
    assert sc.draw_spec(np.random.default_rng([0, 3])) == sc.draw_spec(np.random.default_rng([0, 3]), tuple(sc.TIMBRES))
    with pytest.raises(ValueError, match="timbres flute: expected some of sine"):
        sc.generate_corpus(tmp_path / "bad", num_clips=1, seconds=0.5, timbres=["sine", "flute"])
    assert not (tmp_path / "bad").exists()
