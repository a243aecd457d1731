"""Training metrics: interval summaries, throughput and MFU, writers (stdout, JSONL, TensorBoard), profiler window.

Throughput definitions (per optimizer step, global batch B, K codebooks, T frames, segment S seconds):
  tokens/s         = B·K·T / step time        (codebook tokens, the unit audio LMs count)
  audio-seconds/s  = B·S / step time
  MFU              = model FLOPs per step / (step time · peak FLOP/s per device · devices)
Model FLOPs per step come from `magnet_jax.training.flops` (documented formula there). The peak is the device's dense
bf16 peak from `PEAK_FLOPS` (matched on `device.device_kind`); on CPU it is a matmul FLOP/s measured at start-up with
every local device busy at once (`measure_matmul_peak`), so simulated CPU devices sharing cores are not overcounted.

Step time is wall time over a logging interval divided by its steps, measured after the interval's last metrics
are fetched (so it includes dispatch and the device work, and excludes evaluation and checkpoint time).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

# Dense bf16 peak FLOP/s per JAX device, matched as substrings of `device_kind` (first match wins; order matters).
# TPU v4/v5p devices are megacore chips. GPU figures are the SXM parts without sparsity.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("TPU v6", 918e12),  # v6e (Trillium)
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5e", 197e12),
    ("TPU v5", 459e12),  # v5p
    ("TPU v4", 275e12),
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L4", 121e12),
)


def peak_flops(device_kind: str) -> float | None:
    """The table peak for a `device_kind` ("TPU v5", "NVIDIA H100 80GB HBM3"), None when unknown (CPUs included)."""
    return next((flops for name, flops in PEAK_FLOPS if name.lower() in device_kind.lower()), None)


def measure_matmul_peak(
    devices: Sequence[jax.Device], *, size: int = 512, chain: int = 4, repeats: int = 2, dtype=jnp.float32
) -> float:
    """FLOP/s per device of `[size, size]` matmuls in `dtype` (float32 default), accumulated in float32, running on all
    `devices` at once (best of `repeats`)."""
    mesh = Mesh(np.asarray(devices), ("d",))
    x = jax.device_put(jnp.full((len(devices), size, size), 1.0 / size, dtype), NamedSharding(mesh, P("d")))

    @jax.jit
    def chained(a):
        def step(_, b):  # accumulated in float32, as the model's matmuls are (`dot_general_f32_accumulation`)
            return jnp.einsum("bij,bjk->bik", b, a, preferred_element_type=jnp.float32).astype(dtype)

        return jax.lax.fori_loop(0, chain, step, a)

    chained(x).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        chained(x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 * chain / best


def device_peak_flops(devices: Sequence[jax.Device]) -> tuple[float, str]:
    """(peak FLOP/s per device, where it came from) for the devices of this run."""
    peak = peak_flops(devices[0].device_kind)
    if peak is not None:
        return peak, f"table ({devices[0].device_kind}, bf16 dense)"
    local = [d for d in devices if d.process_index == jax.process_index()]
    return measure_matmul_peak(local), f"measured float32 matmul on {len(local)} {devices[0].platform} device(s)"


class Throughput:
    """Per-step sizes of a run; turns an interval's step time into tokens/s, audio-seconds/s and MFU."""

    def __init__(
        self,
        *,
        batch_size: int,
        n_q: int,
        seq_len: int,
        segment_seconds: float,
        flops_per_step: float,
        peak_flops: float,
        num_devices: int,
    ):
        self.tokens_per_step = batch_size * n_q * seq_len
        self.audio_seconds_per_step = batch_size * segment_seconds
        self.flops_per_step = flops_per_step
        self.peak_total = peak_flops * num_devices

    def __call__(self, step_time: float) -> dict[str, float]:
        return {
            "step_time": step_time,
            "tokens_per_s": self.tokens_per_step / step_time,
            "audio_seconds_per_s": self.audio_seconds_per_step / step_time,
            "mfu": self.flops_per_step / (step_time * self.peak_total),
        }


def summarize(history: Sequence[Mapping[str, Any]], *, last: Sequence[str] = ()) -> dict[str, float]:
    """Mean over an interval's per-step metrics, ignoring NaN (a per-stage metric is NaN on steps that trained
    another stage; a key with no finite value in the interval is left out); keys in `last` (counters, the learning
    rate) take their final value. Fetches device values."""
    host = jax.device_get(list(history))
    out = {}
    for key in host[-1]:
        values = np.asarray([float(np.asarray(h[key])) for h in host if key in h], np.float64)
        if key in last:
            out[key] = float(values[-1])
        elif not np.isnan(values).all():
            out[key] = float(np.nanmean(values))
    return out


# The metrics of the log line (when present); every metric goes to metrics.jsonl and TensorBoard.
LOG_KEYS = ("loss", "ppl", "grad_norm", "lr", "step_time")


def format_duration(seconds: float) -> str:
    """`seconds` as `1h02m`, `3m05s` or `42s`."""
    seconds = max(int(round(seconds)), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def progress_note(step: int, total: int, seconds_per_step: float | None) -> str:
    """` 40/300 (13%), ETA 1m31s`: a train log line's progress; no ETA without a step time yet."""
    note = f" {step}/{total} ({100 * step / max(total, 1):.0f}%)"
    if seconds_per_step is not None and seconds_per_step == seconds_per_step:
        note += f", ETA {format_duration((total - step) * seconds_per_step)}"
    return note


class MetricWriter:
    """Writes scalars to `<logdir>/metrics.jsonl` and TensorBoard (`<logdir>/tensorboard`), and a short line of the
    `LOG_KEYS` metrics to stdout (absl log).

    Only process 0 writes (others get a no-op writer). `resume_step` drops JSONL entries logged after the checkpoint
    a run resumes from, so the file stays one line per (split, step). `logdir` may be remote (gs://, through
    etils.epath); object stores cannot append, so there the JSONL file is rewritten whole at each write.
    """

    def __init__(self, logdir: str, *, resume_step: int | None = None, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._jsonl = epath.Path(logdir) / "metrics.jsonl"
        self._remote = "://" in str(logdir)
        self._lines: list[str] = []
        self._tb = None
        if not self.enabled:
            return
        self._jsonl.parent.mkdir(parents=True, exist_ok=True)
        if self._jsonl.exists():
            self._lines = self._readable_lines()
            if resume_step is not None:
                self._lines = [line for line in self._lines if json.loads(line)["step"] <= resume_step]
            self._rewrite()
        from tensorboardX import SummaryWriter

        tb_dir = epath.Path(logdir) / "tensorboard"
        if resume_step is not None and tb_dir.is_dir():  # rebuilt from the JSONL lines kept: no step twice
            for events in tb_dir.glob("events.out.tfevents.*"):
                events.unlink()
        self._tb = SummaryWriter(str(tb_dir))
        if resume_step is not None:
            for line in self._lines:
                row = json.loads(line)
                for key, value in row.items():
                    if key not in ("step", "split"):
                        self._tb.add_scalar(f"{row['split']}/{key}", value, row["step"])
            self._tb.flush()

    def _readable_lines(self) -> list[str]:
        """The JSONL lines, each ending in a newline; a line that does not parse (a crash mid-write tears the last
        one) is dropped with a warning naming it."""
        kept = []
        for number, line in enumerate(self._jsonl.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                int(row["step"]), str(row["split"])
            except (ValueError, KeyError, TypeError) as e:
                logging.warning("metrics: dropping line %d of %s (%s): %.80r", number, self._jsonl, e, line)
                continue
            kept.append(line + "\n")
        return kept

    def _rewrite(self) -> None:
        tmp = self._jsonl.parent / f".{self._jsonl.name}.tmp"
        tmp.write_text("".join(self._lines))
        tmp.replace(self._jsonl)

    def write(self, step: int, split: str, scalars: Mapping[str, float], *, note: str = "") -> None:
        """Writes `scalars` of (`split`, `step`); the log line shows `note` (e.g. `progress_note`) after the step."""
        if not self.enabled:
            return
        scalars = {k: float(v) for k, v in scalars.items()}
        shown = "  ".join(f"{k}={_fmt(scalars[k])}" for k in LOG_KEYS if k in scalars)
        logging.info("[%s] step %d%s: %s", split, step, note, shown)
        line = json.dumps({"step": int(step), "split": split, **scalars}) + "\n"
        self._lines.append(line)
        if self._remote:
            self._rewrite()
        else:
            with self._jsonl.open("a") as f:
                f.write(line)
        for key, value in scalars.items():
            self._tb.add_scalar(f"{split}/{key}", value, step)
        self._tb.flush()

    def write_text(self, tag: str, text: str) -> None:
        if self.enabled:
            self._tb.add_text(tag, text, 0)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _fmt(value: float) -> str:
    return f"{value:.4g}" if value == value and abs(value) < 1e6 else f"{value:.4e}"


class ProfileWindow:
    """A `jax.profiler` trace of steps [start, start + num_steps) on every process, written under `logdir`
    (`plugins/profile/<run>/<host>.xplane.pb`, for TensorBoard's profile plugin or XProf).

    Call `step(step, outputs)` before running step `step` (0-based), with the outputs of the previous step: the
    trace starts before step `start` and stops, after blocking on `outputs`, before step `start + num_steps`.
    `start < 0` disables it.
    """

    def __init__(self, logdir: str, start: int, num_steps: int):
        self.logdir, self.start, self.stop = logdir, start, start + max(num_steps, 1)
        self.active = False

    def step(self, step: int, outputs: Any = None) -> None:
        if self.start < 0:
            return
        if step >= self.stop:
            self.close(outputs)
        elif step == self.start and not self.active:
            logging.info("profiler: tracing steps %d..%d to %s", self.start, self.stop - 1, self.logdir)
            jax.profiler.start_trace(self.logdir)
            self.active = True

    def close(self, outputs: Any = None) -> None:
        if self.active:
            jax.block_until_ready(outputs)
            jax.profiler.stop_trace()
            self.active = False
