"""Simple DSP measures of mono audio: codec round-trip quality and the musical properties a synthetic clip's prompt
asks for, read back from the audio.

  mel_filterbank(sample_rate, n_fft, n_mels) -> [n_fft // 2 + 1, n_mels]   triangular HTK-mel filters (the codec
                                                                          trainer's spectral loss uses it too)
  snr_db(reference, estimate) -> float          10 log10(|x|^2 / |x - y|^2)
  mel_distance(reference, estimate, sr) -> float mean |log10 mel_x - log10 mel_y| over a few STFT sizes
  measure(wav, sr) -> Properties                tonic pitch class (chroma vs key profiles), tempo (onset-envelope
                                                autocorrelation), drums (flat, loud treble),
                                                brightness (spectral centroid)
  adherence(spec, properties) -> dict[str, bool] which of a `synthetic_corpus.ClipSpec`'s properties were found

Everything is NumPy on the host; clips are a few seconds long.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Krumhansl–Kessler key profiles (major, minor), tonic first.
_MAJOR_PROFILE = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
_MINOR_PROFILE = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])
MEL_SIZES = (256, 512, 1024, 2048)  # STFT sizes of `mel_distance` (and the trainer's multi-scale mel loss)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """Triangular filters on the HTK mel scale from 0 Hz to Nyquist: `[n_fft // 2 + 1, n_mels]` float32."""
    mel = np.linspace(0.0, 2595.0 * np.log10(1.0 + sample_rate / 2 / 700.0), n_mels + 2)
    edges = 700.0 * (10.0 ** (mel / 2595.0) - 1.0)
    freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (freqs[:, None] - lower) / np.maximum(centre - lower, 1e-9)
    falling = (upper - freqs[:, None]) / np.maximum(upper - centre, 1e-9)
    return np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)


def _frames(wav: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    """Hann-windowed frames `[F, n_fft]` of a 1-D signal (zero-padded to a whole frame)."""
    wav = np.pad(np.asarray(wav, np.float64), (0, max(0, n_fft - len(wav))))
    count = 1 + (len(wav) - n_fft) // hop
    index = np.arange(n_fft)[None] + hop * np.arange(count)[:, None]
    return wav[index] * np.hanning(n_fft)


def power_spectrogram(wav: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    """|STFT|^2 `[F, n_fft // 2 + 1]`."""
    return np.abs(np.fft.rfft(_frames(wav, n_fft, hop), axis=-1)) ** 2


def log_mel(wav: np.ndarray, sample_rate: int, n_fft: int = 2048, n_mels: int = 64) -> np.ndarray:
    """log10 mel power `[F, n_mels]` (hop n_fft / 4, floor 1e-5)."""
    mel = power_spectrogram(wav, n_fft, n_fft // 4) @ mel_filterbank(sample_rate, n_fft, n_mels)
    return np.log10(np.maximum(mel, 1e-5))


def snr_db(reference: np.ndarray, estimate: np.ndarray) -> float:
    """Signal-to-noise ratio of `estimate` against `reference` (same length), in dB."""
    reference, estimate = np.asarray(reference, np.float64), np.asarray(estimate, np.float64)
    noise = np.sum((reference - estimate) ** 2)
    return float(10 * np.log10(np.sum(reference**2) / max(noise, 1e-12)))


def mel_distance(reference: np.ndarray, estimate: np.ndarray, sample_rate: int) -> float:
    """Mean absolute log10-mel difference over the `MEL_SIZES` STFTs (0 = identical spectra; 1 = a factor 10)."""
    return float(
        np.mean(
            [
                np.mean(
                    np.abs(log_mel(reference, sample_rate, n, n // 16) - log_mel(estimate, sample_rate, n, n // 16))
                )
                for n in MEL_SIZES
            ]
        )
    )


@dataclasses.dataclass(frozen=True)
class Properties:
    """What `measure` reads from a clip."""

    tonic: int  # pitch class 0..11 of the best-matching key profile
    mode: str  # "major" | "minor"
    bpm: float  # tempo estimate in [60, 180)
    drums: bool  # percussive noise present
    centroid_hz: float  # mean spectral centroid (brightness)


def chroma(wav: np.ndarray, sample_rate: int, n_fft: int = 8192) -> np.ndarray:
    """Mean pitch-class energy `[12]` (C first) of 55 Hz–2 kHz partials, normalised to sum 1."""
    spec = power_spectrogram(wav, n_fft, n_fft // 4).mean(0)
    freqs = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
    band = (freqs >= 55.0) & (freqs <= 2000.0)
    pitch_class = np.round(12 * np.log2(freqs[band] / 440.0) + 69).astype(int) % 12
    out = np.bincount(pitch_class, weights=np.sqrt(spec[band]), minlength=12)
    return out / max(out.sum(), 1e-12)


def key_of(chroma_: np.ndarray) -> tuple[int, str]:
    """(tonic, mode) whose rotated key profile correlates best with `chroma_`."""
    scores = [
        (np.corrcoef(np.roll(profile, tonic), chroma_)[0, 1], tonic, mode)
        for mode, profile in (("major", _MAJOR_PROFILE), ("minor", _MINOR_PROFILE))
        for tonic in range(12)
    ]
    _, tonic, mode = max(scores)
    return tonic, mode


def onset_envelope(wav: np.ndarray, sample_rate: int, hop: int = 256) -> tuple[np.ndarray, float]:
    """Half-wave-rectified log-spectral flux `[F - 1]` and its frame rate (Hz)."""
    spec = np.log1p(1000 * power_spectrogram(wav, 1024, hop))
    flux = np.maximum(np.diff(spec, axis=0), 0.0).sum(1)
    return flux - flux.mean(), sample_rate / hop


def tempo(wav: np.ndarray, sample_rate: int) -> float:
    """Beats per minute in [60, 180): the lag of the onset envelope's autocorrelation peak, weighted towards
    120 BPM (a log-normal prior) so the octave ambiguity favours moderate tempi."""
    env, rate = onset_envelope(wav, sample_rate)
    ac = np.correlate(env, env, mode="full")[len(env) - 1 :]
    lags = np.arange(len(ac))
    valid = (lags >= rate * 60 / 180) & (lags <= rate * 60 / 60)
    if not valid.any() or ac[0] <= 0:
        return 120.0
    bpm = 60 * rate / np.maximum(lags, 1)
    weight = np.exp(-0.5 * (np.log2(bpm / 120.0) / 0.9) ** 2)
    best = lags[valid][np.argmax((ac * weight)[valid])]
    return float(60 * rate / best)


def has_drums(wav: np.ndarray, sample_rate: int) -> bool:
    """Noise-like treble: synthetic drums (hi-hats, snares) put broadband noise into 8–15 kHz. True when that band
    holds more than 10^-1.8 of the mean spectral power and over 10 % of its frames are spectrally flat (flatness
    > 0.3; tonal timbres give near-zero flatness there)."""
    spec = power_spectrogram(wav, 1024, 512)
    freqs = np.fft.rfftfreq(1024, 1.0 / sample_rate)
    high = spec[:, (freqs >= 8000) & (freqs <= 15000)] + 1e-12
    flatness = np.exp(np.log(high).mean(1)) / high.mean(1)
    loud = np.log10(high.mean() / (spec.mean() + 1e-12)) > -1.8
    return bool(loud and np.mean(flatness > 0.3) > 0.1)


def centroid(wav: np.ndarray, sample_rate: int) -> float:
    """Energy-weighted mean spectral centroid in Hz."""
    spec = power_spectrogram(wav, 2048, 512)
    freqs = np.fft.rfftfreq(2048, 1.0 / sample_rate)
    energy = spec.sum(1) + 1e-12
    return float(np.sum((spec @ freqs) / energy * energy) / energy.sum())


def measure(wav: np.ndarray, sample_rate: int) -> Properties:
    """The properties of a mono clip `[N]`."""
    wav = np.asarray(wav, np.float64).reshape(-1)
    tonic, mode = key_of(chroma(wav, sample_rate))
    return Properties(tonic, mode, tempo(wav, sample_rate), has_drums(wav, sample_rate), centroid(wav, sample_rate))


BRIGHT_TIMBRES, SOFT_TIMBRES = ("sawtooth", "square"), ("sine",)  # "bright ..." / "soft ..." in the descriptions
BRIGHT_HZ = 900.0  # spectral centroid splitting them (corpus clips: sawtooth ~1250 Hz, sine ~600 Hz)


def key_signature(tonic: int, mode: str) -> int:
    """The pitch class of the major key with the same notes (a minor key and its relative major share it)."""
    return tonic % 12 if mode == "major" else (tonic + 3) % 12


def adherence(spec, properties: Properties) -> dict[str, bool]:
    """Which prompted properties of `spec` (a `synthetic_corpus.ClipSpec`) `properties` show.

    key:        the same key signature (tonic, or its relative major / minor: both use the same notes)
    tempo:      within 10 % of the prompted BPM, or of its double or half (beat-level octave errors)
    drums:      drums present exactly when prompted
    brightness: centroid above `BRIGHT_HZ` for a bright timbre, below for a soft one (other timbres: absent)
    """
    out = {
        "key": key_signature(spec.tonic, spec.mode) == key_signature(properties.tonic, properties.mode),
        "tempo": tempo_matches(properties.bpm, spec.bpm),
        "drums": properties.drums == spec.drums,
    }
    if spec.timbre in BRIGHT_TIMBRES + SOFT_TIMBRES:
        out["brightness"] = (properties.centroid_hz > BRIGHT_HZ) == (spec.timbre in BRIGHT_TIMBRES)
    return out


def tempo_matches(bpm: float, target: float) -> bool:
    """`bpm` within 10 % of `target`, or of its double or half (beat-level octave errors)."""
    return min(abs(bpm - target * f) / (target * f) for f in (0.5, 1.0, 2.0)) <= 0.1


def kept(reference: Properties, properties: Properties) -> dict[str, bool]:
    """Which properties measured on `reference` `properties` shares, read as `adherence` reads a prompt: the key
    signature, the tempo (10 % or an octave), drums, and the side of `BRIGHT_HZ` the centroid is on."""
    return {
        "key": key_signature(reference.tonic, reference.mode) == key_signature(properties.tonic, properties.mode),
        "tempo": tempo_matches(properties.bpm, reference.bpm),
        "drums": properties.drums == reference.drums,
        "brightness": (properties.centroid_hz > BRIGHT_HZ) == (reference.centroid_hz > BRIGHT_HZ),
    }
