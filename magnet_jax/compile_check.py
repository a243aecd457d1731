r"""Ahead-of-time compile check: lower and compile the real train step for a target topology on a CPU-only host.

  python -m magnet_jax.compile_check --config=configs/magnet.py:size=small --topology=v5p-128 \
      [--num_slices=2] [--config.data.batch_size=576 --config.mesh.fsdp=-1 ...] [--json=report.json]

With the libtpu build matching jax (`pip install 'magnet_jax[tpu]'`, libtpu 0.0.42 for jax 0.10.2),
`jax.experimental.topologies` describes the TPU slice (no TPU needed) and the step is compiled by the TPU compiler:
the per-device memory it reports is what the run will need. Without libtpu (or for GPU targets) the same step is
compiled for a simulated CPU mesh with the same number of devices, and the report says so: shardings and shapes are
checked, but memory figures are the CPU compiler's, a rough guide only.

Report (per device): arguments + outputs - aliased (donated) + temporaries, from `compiled.memory_analysis()`,
against the chip's HBM; XLA's FLOPs (`cost_analysis()`) and the model FLOPs of `magnet_jax.training.flops` divided over
the devices; a compute-bound lower bound on the step time at the chip's peak. Exit code 0 if it fits, 1 if it does not,
2 for a bad config or topology.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from magnet_jax import sharding
from magnet_jax.checkpoints import t5_weights
from magnet_jax.cli import fail, one_line, parse_flags, quiet_logs
from magnet_jax.fileio import resolve_file, write_atomic
from magnet_jax.models import t5
from magnet_jax.models.lm import LMConfig
from magnet_jax.models.t5 import T5Config, T5Encoder
from magnet_jax.training import flops, metrics, train_lib

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Target:
    """An accelerator slice: JAX devices per slice, HBM per device, and its libtpu topology (TPU only)."""

    name: str
    device_kind: str  # as JAX reports it; keys `metrics.PEAK_FLOPS`
    devices: int
    hbm_bytes: int
    topology: str | None = None  # libtpu topology name, e.g. "v5:4x4x4"
    chip_config: str | None = None  # "megacore" (v4, v5p: one device per chip) or "default"
    host_bounds: tuple[int, int, int] | None = None  # chips per host


def _targets() -> dict[str, Target]:
    """Accelerator names (as `gcloud --accelerator-type` spells them) -> Target.

    v4 / v5p names count TensorCores (2 per chip, one megacore device per chip, 3-D torus); v5e (v5litepod) and v6e
    names count chips (one device each, 2-D). HBM is the vendor's nominal figure per device.
    """
    cube = {
        4: "2x2x1",
        8: "2x2x2",
        16: "2x2x4",
        32: "2x4x4",
        64: "4x4x4",
        128: "4x4x8",
        256: "4x8x8",
        512: "8x8x8",
        1024: "8x8x16",
        2048: "8x16x16",
        4096: "16x16x16",
    }
    grid = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
    targets = {}
    for chips, shape in cube.items():
        if chips <= 2048:
            targets[f"v4-{2 * chips}"] = Target(
                f"v4-{2 * chips}", "TPU v4", chips, 32 * GiB, f"v4:{shape}", "megacore", (2, 2, 1)
            )
        targets[f"v5p-{2 * chips}"] = Target(
            f"v5p-{2 * chips}", "TPU v5", chips, 95 * GiB, f"v5:{shape}", "megacore", (2, 2, 1)
        )
    for chips, shape in grid.items():
        bounds = (1, 1, 1) if chips == 1 else (2, 2, 1)
        targets[f"v5litepod-{chips}"] = Target(
            f"v5litepod-{chips}", "TPU v5 lite", chips, 16 * GiB, f"v5e:{shape}", "default", bounds
        )
        targets[f"v6e-{chips}"] = Target(
            f"v6e-{chips}", "TPU v6 lite", chips, 32 * GiB, f"v6e:{shape}", "default", bounds
        )
    targets["8xh100"] = Target("8xh100", "NVIDIA H100 80GB HBM3", 8, 80 * GiB)
    targets["8xh200"] = Target("8xh200", "NVIDIA H200", 8, 141 * GiB)
    return targets


TARGETS = _targets()


class CompileCheckError(ValueError):
    """Bad topology or config for the compile check (message is one line)."""


def get_target(name: str) -> Target:
    if name not in TARGETS:
        families = sorted({n.rsplit("-", 1)[0] + "-N" if "-" in n else n for n in TARGETS})
        raise CompileCheckError(
            f"--topology={name!r}: unknown accelerator; known: {', '.join(families)} "
            "(e.g. v5p-128, v5litepod-256, v6e-64, 8xh100)"
        )
    return TARGETS[name]


def libtpu_available() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def target_devices(target: Target, num_slices: int = 1, *, simulate: bool = False) -> tuple[list, bool]:
    """(devices to compile for, whether they are simulated CPU devices).

    TPU targets use libtpu's topology description when libtpu is installed and `simulate` is off; otherwise the first
    `target.devices` local CPU devices (start the process with `jax_num_cpu_devices` set high enough).
    """
    if target.topology is not None and not simulate and libtpu_available():
        from jax.experimental import topologies

        topo = topologies.get_topology_desc(
            platform="tpu",
            topology_name=target.topology,
            chip_config_name=target.chip_config,
            chips_per_host_bounds=target.host_bounds,
            num_slices=num_slices,
        )
        return list(topo.devices), False
    if num_slices > 1:
        raise CompileCheckError(
            f"--num_slices={num_slices}: multi-slice needs the TPU compiler (pip install "
            "'magnet_jax[tpu]'); the simulated CPU mesh is one slice"
        )
    cpus = jax.devices("cpu")
    if len(cpus) < target.devices:
        raise CompileCheckError(
            f"{target.name} needs {target.devices} simulated CPU devices, this process has "
            f"{len(cpus)} (set jax_num_cpu_devices before JAX initializes)"
        )
    return cpus[: target.devices], True


def text_encoder_config(config: ml_collections.ConfigDict):
    """The T5 architecture of `conditioner.t5` (known hub ids need no download; a directory's config.json)."""
    known = {
        "t5-small": dict(d_model=512, d_ff=2048, num_layers=6, num_heads=8),
        "t5-base": dict(d_model=768, d_ff=3072, num_layers=12, num_heads=12),
        "t5-large": dict(d_model=1024, d_ff=4096, num_layers=24, num_heads=16),
    }
    source, dtype = config.conditioner.t5, config.conditioner.dtype
    name = source.removeprefix("google-t5/")
    if name in known:
        return T5Config(**known[name], dtype=dtype)
    path = resolve_file(source, "config.json", what=f"T5 text encoder {source!r}")
    return t5_weights.config_from_hf(json.loads(Path(path).read_text()), dtype)


def compile_train_step(config: ml_collections.ConfigDict, devices: Sequence) -> tuple[Any, jax.sharding.Mesh]:
    """(compiled train step, its mesh) for a mesh over `devices`, lowered from abstract inputs only."""
    mesh = sharding.make_mesh(config.mesh, devices)
    rules = sharding.logical_rules(config)
    t5_config = text_encoder_config(config)
    abstract_state, state_shardings = train_lib.train_state_shardings(config, mesh)

    def place(tree, shardings):
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)

    tokens = jnp.zeros((1, 4), jnp.int32)
    t5_abstract = jax.eval_shape(lambda k: T5Encoder(t5_config).init(k, tokens, tokens)["params"], jax.random.key(0))
    t5_abstract = place(nn.meta.unbox(t5_abstract), t5.param_shardings(t5_config, mesh, rules))
    batch_sharding = sharding.batch_sharding(mesh, rules)
    b, k, t, length = (config.data.batch_size, config.model.n_q, config.data.seq_len, config.conditioner.max_length)
    batch = {
        "codes": jax.ShapeDtypeStruct((b, k, t), jnp.int32, sharding=batch_sharding),
        "text_ids": jax.ShapeDtypeStruct((b, length), jnp.int32, sharding=batch_sharding),
        "text_mask": jax.ShapeDtypeStruct((b, length), jnp.int32, sharding=batch_sharding),
    }
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=sharding.replicated(mesh))
    step = train_lib.make_train_step(config, mesh, t5_config)
    return step.lower(place(abstract_state, state_shardings), t5_abstract, batch, key).compile(), mesh


def memory_report(compiled, target: Target) -> dict[str, float]:
    """Per-device bytes from XLA's memory analysis; `total` = arguments + outputs - aliased + temporaries, and
    whether that fits the target's HBM."""
    m = compiled.memory_analysis()
    report = {
        "argument_bytes": m.argument_size_in_bytes,
        "output_bytes": m.output_size_in_bytes,
        "alias_bytes": m.alias_size_in_bytes,
        "temp_bytes": m.temp_size_in_bytes,
        "generated_code_bytes": m.generated_code_size_in_bytes,
    }
    report["total_bytes"] = (
        report["argument_bytes"] + report["output_bytes"] - report["alias_bytes"] + report["temp_bytes"]
    )
    report["hbm_bytes"] = target.hbm_bytes
    report["hbm_fraction"] = report["total_bytes"] / target.hbm_bytes
    report["fits"] = report["total_bytes"] <= target.hbm_bytes
    return report


def check(
    config: ml_collections.ConfigDict, target: Target, *, num_slices: int = 1, simulate: bool = False
) -> dict[str, Any]:
    """Compiles the train step of `config` for `target` and returns the report (see the module docstring).

    A compiler that refuses the program for lack of memory (the TPU compiler does) gives `fits: False` and its
    message under `compile_error`, without the memory breakdown.
    """
    devices, simulated = target_devices(target, num_slices, simulate=simulate)
    mesh = sharding.make_mesh(config.mesh, devices)
    model_flops = flops.train_flops(
        LMConfig.from_config(config.model),
        batch=config.data.batch_size,
        seq_len=config.data.seq_len,
        cond_len=config.conditioner.max_length,
    )
    peak = metrics.peak_flops(target.device_kind)
    report = {
        "topology": target.name,
        "num_slices": num_slices,
        "devices": len(devices),
        "compiler": "cpu (simulated mesh)" if simulated else devices[0].platform,
        "device_kind": target.device_kind,
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "batch_size": config.data.batch_size,
        "seq_len": config.data.seq_len,
        "hbm_bytes": target.hbm_bytes,
        "model_flops_per_device": model_flops / len(devices),
    }
    report["min_step_seconds"] = report["model_flops_per_device"] / peak if peak else float("nan")
    try:
        compiled, _ = compile_train_step(config, devices)
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return {**report, "fits": False, "compile_error": one_line(e)}
    report.update(memory_report(compiled, target))
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    report["xla_flops_per_device"] = float(cost.get("flops", float("nan"))) if cost else float("nan")
    return report


def format_report(report: dict[str, Any]) -> str:
    gib = lambda b: f"{b / GiB:.2f} GiB"  # noqa: E731
    lines = [
        f"compile check: {report['topology']} x{report['num_slices']} slice(s), {report['devices']} devices "
        f"({report['device_kind']}), compiler: {report['compiler']}",
        f"  mesh {report['mesh']}, global batch {report['batch_size']}, seq_len {report['seq_len']}",
    ]
    if "compile_error" in report:
        lines.append(f"  DOES NOT FIT: the compiler ran out of memory ({report['compile_error']})")
    else:
        lines += [
            "  per-device memory:",
            f"    arguments   {gib(report['argument_bytes'])}",
            f"    outputs     {gib(report['output_bytes'])}",
            f"    aliased    -{gib(report['alias_bytes'])}  (donated state)",
            f"    temporaries {gib(report['temp_bytes'])}",
            f"    total       {gib(report['total_bytes'])} of {gib(report['hbm_bytes'])} HBM "
            f"({100 * report['hbm_fraction']:.1f}%): {'fits' if report['fits'] else 'DOES NOT FIT'}",
            f"  per-device FLOPs per step: XLA {report['xla_flops_per_device']:.4g} (frozen T5 included; a scanned "
            f"layer stack counted once), model {report['model_flops_per_device']:.4g} (magnet_jax.training.flops)",
        ]
    lines.append(f"  compute-bound step time at the chip's peak: {report['min_step_seconds'] * 1e3:.3g} ms")
    if report["compiler"].startswith("cpu"):
        lines.append(
            "  NOTE: simulated on CPU devices (no libtpu, or a GPU target): memory is the CPU compiler's, "
            "a rough guide; install 'magnet_jax[tpu]' for TPU numbers"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    del argv
    quiet_logs()
    FLAGS = flags.FLAGS
    try:
        report = check(FLAGS.config, get_target(FLAGS.topology), num_slices=FLAGS.num_slices, simulate=FLAGS.simulate)
    except (ValueError, TypeError, KeyError, OSError) as e:
        fail("compile_check", one_line(e))
    print(format_report(report))
    if FLAGS.json:
        write_atomic(FLAGS.json, json.dumps(report, indent=2, default=float))
    sys.exit(0 if report["fits"] else 1)


if __name__ == "__main__":
    config_flags.DEFINE_config_file(
        "config", None, "config file and preset (as for magnet_jax.train)", lock_config=True
    )
    flags.DEFINE_string(
        "topology", None, "accelerator name: v4-N, v5p-N, v5litepod-N, v6e-N, 8xh100, 8xh200", required=True
    )
    flags.DEFINE_integer("num_slices", 1, "TPU slices (multi-slice; the config's dcn_* degrees span them)")
    flags.DEFINE_bool("simulate", False, "compile for a simulated CPU mesh even when libtpu is installed")
    flags.DEFINE_string("json", None, "also write the report as JSON to this file")

    def _parse(argv):
        rest = parse_flags(argv, prog="compile_check")
        target = TARGETS.get(flags.FLAGS.topology)
        if target is not None and (target.topology is None or flags.FLAGS.simulate or not libtpu_available()):
            jax.config.update("jax_num_cpu_devices", target.devices)  # before JAX initializes its CPU backend
        return rest

    app.run(main, flags_parser=_parse)
