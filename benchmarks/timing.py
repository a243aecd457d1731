"""Shared by the benchmark scripts: model sizes, compile-time measurement, interleaved timing, machine facts."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import jax

from configs.magnet import SIZES, get_config
from magnet_jax.models.lm import LMConfig

BENCH_SIZES = ("256x4", "512x8") + tuple(s for s in SIZES if s != "tiny")


def lm_config(size: str, **overrides) -> LMConfig:
    """`<dim>x<layers>` (dim / 64 heads, card 2048, T5-base conditioning) or a preset of configs/magnet.py."""
    if "x" in size:
        dim, layers = (int(v) for v in size.split("x"))
        return LMConfig(dim=dim, num_heads=dim // 64, num_layers=layers, card=2048, cond_dim=768, **overrides)
    if size not in SIZES or size == "tiny":
        raise ValueError(f"unknown model size {size!r}: expected <dim>x<layers> or one of {', '.join(BENCH_SIZES)}")
    return LMConfig.from_config({**get_config(f"size={size}").model, **overrides})


def compile_seconds(fn) -> tuple[float, float]:
    """Runs `fn` once; returns (seconds spent tracing, lowering and compiling, total seconds)."""
    events = []

    def listener(name, seconds, **_):
        if name.startswith("/jax/core/compile/"):
            events.append(seconds)

    jax.monitoring.register_event_duration_secs_listener(listener)
    start = time.perf_counter()
    fn()
    total = time.perf_counter() - start
    jax.monitoring.unregister_event_duration_listener(listener)
    return sum(events), total


def interleaved(fns, repeats: int, clock=time.perf_counter) -> list[list[float]]:
    """Times the functions alternately (so all see the same machine load), `repeats` rounds; seconds per call.

    `clock`: wall time by default; `time.process_time` counts this process's CPU time (all its threads), which other
    processes on a shared machine do not inflate (meaningful for single-threaded sides).
    """
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times):
            start = clock()
            fn()
            out.append(clock() - start)
    return times


def machine() -> dict:
    device = jax.devices()[0]
    return {
        "device": f"{device.platform}: {device.device_kind}",
        "jax_devices": jax.device_count(),
        "host": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
    }


def write_results(out: str, meta: dict, rows: list[dict], plot, title: str) -> None:
    """Writes `<out>.json` ({"meta", "results"}) and `<out>.png` (`plot(rows, path, title)`)."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    plot(rows, path.with_suffix(".png"), title)
    print(f"\nwrote {path.with_suffix('.json')} and {path.with_suffix('.png')}")


def batch_axis(ax, batches: list[int]) -> None:
    """A log2 batch-size x axis with one labelled tick per measured batch size."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, labels=[str(b) for b in batches])
    ax.minorticks_off()


def save_figure(fig, axes, path: Path, title: str) -> None:
    for ax in axes:
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
