r"""Trains the quickstart's tiny EnCodec (configs/magnet.py `CODECS["tiny"]`: SEANet + 4 x 64 RVQ, 32 kHz, 50 Hz,
widened to `N_FILTERS` = 8 first-layer channels) on synthetic music, so the quickstart's codes carry pitch, rhythm
and timbre instead of the noise a random codec gives.

  python -m data_pipelines.train_tiny_codec --output=data_pipelines/tiny_codec [--steps=3000] [--seed=0]

Training (fixed seed, deterministic on one CPU host):
  * data: `--clips` clips of `synthetic_corpus` (seed `--seed` + 1000, so the quickstart corpus, seed 0, stays
    held out), random `--segment_seconds` crops;
  * phase 1 (the first `--ae_steps`): encoder + decoder as a plain autoencoder (no quantizer), so the latents
    learn the audio first;
  * then the codebooks are refitted by residual k-means on the trained latents (`encodec.fit_codebooks`), and
  * phase 2: the full codec, the RVQ with straight-through gradients, codebook loss ‖sg(r) − e‖² and commitment
    β ‖r − sg(e)‖² per level;
  * reconstruction loss: L1 on the waveform + L1 on log-mel spectrograms at the `audio_measures.MEL_SIZES` STFT
    sizes (multi-scale mel) + `CONVERGENCE_WEIGHT` × spectral convergence ‖|X| − |Y|‖ / ‖|X|‖ of linear-frequency
    STFT magnitudes at `CONVERGENCE_SIZES`; Adam with global-norm clipping.
    The convergence term is what teaches pitch: log spectra weigh every bin alike, so the near-silent bins between
    the partials dominate them, and the mel bands are wider than a semitone below 1 kHz; without it, or weighted
    1 (the mel term then dominates), the decoder played partials on a fixed 200 Hz grid whatever the notes (key
    kept in 2 of 24 round trips; weighted 10: 17 of 24).
The result is written as `make_tiny_assets.write_codec` writes a codec (transformers layout: config.json +
model.safetensors, loadable by `load_encodec`), with `training.json` (settings, loss history, round-trip quality
of the trained and of the random codec on held-out corpus clips, and the quickstart check's key / tempo / drums /
brightness matches on 24 prompt renderings and on their round trips: `round_trip_adherence`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from configs.magnet import get_config
from data_pipelines import audio_measures, synthetic_corpus
from magnet_jax.cli import quiet_logs
from magnet_jax.fileio import write_json
from magnet_jax.models import encodec
from magnet_jax.models.encodec import EncodecConfig, EncodecModel

N_FILTERS = 8  # the test suite's tiny codec has 4: at 8 the decoder learns pitch within minutes of CPU
TINY = dataclasses.replace(EncodecConfig.from_config(get_config("size=tiny").codec), n_filters=N_FILTERS)
CONVERGENCE_SIZES = (256, 1024, 4096)  # STFT sizes of the spectral-convergence loss (4096: 7.8 Hz bins at 32 kHz)
CONVERGENCE_WEIGHT = 10.0  # at 1 the mel term dominates and 64 clips keep their key only in a few round trips
SAMPLE_RATE = TINY.sample_rate
TRAIN_SEED_OFFSET = 1000  # training clips use corpus seed `seed + 1000`; the quickstart's corpus uses seed 0


def corpus_clips(num_clips: int, seconds: float, seed: int) -> np.ndarray:
    """`num_clips` synthetic corpus clips (as `synthetic_corpus.generate_corpus` draws them) `[num_clips, N]`."""
    clips = []
    for i in range(num_clips):
        rng = np.random.default_rng([seed, i])
        clips.append(synthetic_corpus.render(synthetic_corpus.draw_spec(rng), seconds, SAMPLE_RATE, rng))
    return np.stack(clips)


def _magnitude(wav: jax.Array, n_fft: int) -> jax.Array:
    """STFT magnitudes `[B, F, n_fft // 2 + 1]` of `[B, N]` (Hann window, hop n_fft / 4)."""
    hop = n_fft // 4
    index = np.arange(n_fft)[None] + hop * np.arange(1 + (wav.shape[-1] - n_fft) // hop)[:, None]
    return jnp.abs(jnp.fft.rfft(wav[:, index] * jnp.asarray(np.hanning(n_fft), wav.dtype), axis=-1))


def _log_mel(wav: jax.Array, n_fft: int, filters: np.ndarray) -> jax.Array:
    """log mel power `[B, F, M]` of `[B, N]` (Hann window, hop n_fft / 4)."""
    return jnp.log(_magnitude(wav, n_fft) ** 2 @ jnp.asarray(filters) + 1e-5)


def reconstruction_loss(x: jax.Array, y: jax.Array) -> dict[str, jax.Array]:
    """Of `[B, N]` audio: `l1` of the waveforms, `mel` the mean L1 of log-mel spectrograms over the `MEL_SIZES`
    STFTs, `convergence` the mean spectral convergence over the `CONVERGENCE_SIZES` STFTs."""
    mel = [
        jnp.mean(jnp.abs(_log_mel(x, n, f) - _log_mel(y, n, f)))
        for n, f in ((n, audio_measures.mel_filterbank(SAMPLE_RATE, n, n // 16)) for n in audio_measures.MEL_SIZES)
    ]
    convergence = []
    for n in CONVERGENCE_SIZES:
        a, b = _magnitude(x, n), _magnitude(y, n)
        convergence.append(jnp.sqrt(jnp.sum((a - b) ** 2) / (jnp.sum(a**2) + 1e-7)))
    return {
        "l1": jnp.mean(jnp.abs(x - y)),
        "mel": sum(mel) / len(mel),
        "convergence": sum(convergence) / len(convergence),
    }


def quantize(codebooks: jax.Array, z: jax.Array, beta: float) -> tuple[jax.Array, jax.Array]:
    """Residual VQ of latents `[B, T, D]` with codebooks `[K, card, D]`: (straight-through quantized latents,
    codebook + β·commitment loss summed over the levels)."""
    residual, quantized, loss = z, jnp.zeros_like(z), 0.0
    for book in codebooks:
        dist = jnp.sum(residual**2, -1, keepdims=True) - 2 * residual @ book.T + jnp.sum(book**2, -1)
        chosen = book[jnp.argmin(dist, -1)]
        loss += jnp.mean((jax.lax.stop_gradient(residual) - chosen) ** 2)
        loss += beta * jnp.mean((residual - jax.lax.stop_gradient(chosen)) ** 2)
        quantized += chosen
        residual = residual - chosen
    return z + jax.lax.stop_gradient(quantized - z), loss


def _decode_latents(module: EncodecModel, z: jax.Array) -> jax.Array:
    return jnp.swapaxes(module.decoder(z), 1, 2)


def losses(params, wav: jax.Array, *, quantized: bool, beta: float = 0.25) -> dict[str, jax.Array]:
    """Loss terms of a batch `[B, 1, N]`: l1, mel, convergence (`reconstruction_loss`), vq (0 when not
    `quantized`), and `total`, their sum with convergence weighted `CONVERGENCE_WEIGHT`."""
    model = EncodecModel(TINY)
    z = model.apply({"params": params}, wav, method=EncodecModel.latents)
    vq = jnp.zeros(())
    if quantized:
        z, vq = quantize(params["quantizer"]["codebooks"], z, beta)
    y = model.apply({"params": params}, z, method=_decode_latents)[:, 0]
    terms = {**reconstruction_loss(wav[:, 0], y), "vq": vq}
    return {**terms, "total": sum(terms.values()) + (CONVERGENCE_WEIGHT - 1) * terms["convergence"]}


@functools.partial(jax.jit, static_argnames=("quantized",))
def _train_step(params, opt_state, wav, *, quantized: bool):
    def total(p):
        terms = losses(p, wav, quantized=quantized)
        return terms["total"], terms

    (_, terms), grads = jax.value_and_grad(total, has_aux=True)(params)
    updates, opt_state = _OPTIMIZER.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, terms


_OPTIMIZER = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(2e-3))


def _crops(clips: np.ndarray, batch: int, length: int, rng: np.random.Generator) -> np.ndarray:
    rows = rng.integers(len(clips), size=batch)
    starts = rng.integers(clips.shape[-1] - length + 1, size=batch)
    return np.stack([clips[r, s : s + length] for r, s in zip(rows, starts)])[:, None]


def train(
    clips: np.ndarray,
    *,
    steps: int,
    ae_steps: int,
    batch_size: int = 8,
    segment_seconds: float = 0.5,
    seed: int = 0,
    log_every: int = 100,
) -> tuple[dict, list[dict]]:
    """Trains the tiny codec on `clips` `[N, samples]`; returns (params, loss history: one dict per log).

    Deterministic for a given seed (crops from `np.random.default_rng(seed)`, init `encodec.init_encodec`).
    """
    if not 0 < ae_steps < steps:
        raise ValueError(f"ae_steps={ae_steps}: expected 0 < ae_steps < steps={steps}")
    rng = np.random.default_rng(seed)
    length = int(segment_seconds * SAMPLE_RATE) // TINY.hop_length * TINY.hop_length
    params = encodec.init_encodec(TINY, seed, clips[:8, None])
    opt_state = _OPTIMIZER.init(params)
    history, t0 = [], time.perf_counter()
    for step in range(steps):
        if step == ae_steps:  # codebooks for the trained latents, then the quantized phase
            frames = np.asarray(encodec.latents(TINY, params, clips[:, None])).reshape(-1, TINY.dimension)
            books = encodec.fit_codebooks(frames, TINY.card, TINY.n_q, seed=seed)
            params = {**params, "quantizer": {"codebooks": jnp.asarray(books)}}
        wav = jnp.asarray(_crops(clips, batch_size, length, rng))
        params, opt_state, terms = _train_step(params, opt_state, wav, quantized=step >= ae_steps)
        if (step + 1) % log_every == 0 or step + 1 == steps:
            row = {"step": step + 1, **{k: float(v) for k, v in terms.items()}, "seconds": time.perf_counter() - t0}
            history.append(row)
            print(
                f"train_tiny_codec: step {step + 1}/{steps} ({'rvq' if step >= ae_steps else 'autoencoder'}) "
                f"l1 {row['l1']:.4f} mel {row['mel']:.3f} convergence {row['convergence']:.3f} vq {row['vq']:.4f} "
                f"({row['seconds']:.0f} s)",
                flush=True,
            )
    return jax.device_get(params), history


def round_trip_quality(params, clips: np.ndarray) -> dict[str, float]:
    """Mean SNR (dB) and mel distance (`audio_measures.mel_distance`) of encode → decode over `clips` `[N, S]`."""
    out = encodec.round_trip(TINY, params, np.asarray(clips, np.float32)[:, None])[:, 0]
    return {
        "snr_db": float(np.mean([audio_measures.snr_db(x, y) for x, y in zip(clips, out)])),
        "mel_distance": float(np.mean([audio_measures.mel_distance(x, y, SAMPLE_RATE) for x, y in zip(clips, out)])),
    }


def round_trip_adherence(params, count: int = 24, seconds: float = 4.0) -> dict[str, dict[str, list[int]]]:
    """The quickstart check's property matches (`quickstart_report.tally`: key, tempo, drums, brightness) on the
    corpus renderings of `count` prompt specs (`quickstart_report.prompt_specs`, not training clips) and on their
    round trips through the codec: `{"corpus" | "round_trip": {property: [matches, checked]}}`."""
    from data_pipelines import quickstart_report

    specs = quickstart_report.spec_table(quickstart_report.prompt_specs(count), seconds)
    renderings = quickstart_report.corpus_renderings(specs)
    trips = quickstart_report.codec_round_trips(TINY, params, renderings)
    return {
        name: {p: list(t) for p, t in quickstart_report.tally(quickstart_report.measure_adherence(specs, c)).items()}
        for name, c in (("corpus", renderings), ("round_trip", trips))
    }


def main(argv: Sequence[str]) -> None:
    del argv
    quiet_logs()
    from data_pipelines.make_tiny_assets import write_codec

    start = time.perf_counter()
    clips = corpus_clips(FLAGS.clips, FLAGS.clip_seconds, FLAGS.seed + TRAIN_SEED_OFFSET)
    try:
        params, history = train(
            clips,
            steps=FLAGS.steps,
            ae_steps=FLAGS.ae_steps,
            batch_size=FLAGS.batch_size,
            segment_seconds=FLAGS.segment_seconds,
            seed=FLAGS.seed,
            log_every=FLAGS.log_every,
        )
    except ValueError as e:
        sys.exit(f"train_tiny_codec: {e}")
    held_out = corpus_clips(8, 4.0, 0)  # the first clips of the quickstart's corpus
    random_codec = encodec.init_encodec(TINY, FLAGS.seed, held_out[:, None])
    quality = {"trained": round_trip_quality(params, held_out), "random": round_trip_quality(random_codec, held_out)}
    adherence = round_trip_adherence(params)
    out = write_codec(FLAGS.output, TINY, params)
    settings = {k: FLAGS[k].value for k in ("steps", "ae_steps", "batch_size", "segment_seconds", "clips", "seed")}
    write_json(
        Path(out) / "training.json",
        {
            "settings": {**settings, "clip_seconds": FLAGS.clip_seconds},
            "history": history,
            "held_out_round_trip": quality,
            "prompt_adherence": adherence,
            "seconds": time.perf_counter() - start,
        },
    )
    print(json.dumps({"held_out_round_trip": quality, "prompt_adherence": adherence}))
    print(f"train_tiny_codec: wrote {out} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("output", None, "directory for the trained codec", required=True)
    flags.DEFINE_integer("steps", 3000, "training steps (both phases)")
    flags.DEFINE_integer("ae_steps", 1500, "autoencoder steps before the quantizer is switched on")
    flags.DEFINE_integer("batch_size", 8, "crops per step")
    flags.DEFINE_float("segment_seconds", 0.5, "crop length")
    flags.DEFINE_integer("clips", 64, "synthetic training clips")
    flags.DEFINE_float("clip_seconds", 4.0, "length of each training clip")
    flags.DEFINE_integer("seed", 0, "seed of the init, the crops and the training corpus (seed + 1000)")
    flags.DEFINE_integer("log_every", 100, "steps between loss lines")
    FLAGS = flags.FLAGS
    app.run(main)
