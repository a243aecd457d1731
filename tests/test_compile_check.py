"""Ahead-of-time compile check: topology table, the real train step compiled for a target mesh, memory report."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from configs.magnet import get_config
from magnet_jax import compile_check
from magnet_jax.checkpoints.t5_weights import write_random_t5

REPO = Path(__file__).resolve().parents[1]


def test_accelerator_names_map_to_libtpu_topologies():
    v5p = compile_check.get_target("v5p-128")
    assert (v5p.topology, v5p.chip_config, v5p.host_bounds, v5p.devices) == ("v5:4x4x4", "megacore", (2, 2, 1), 64)
    assert compile_check.get_target("v4-8").topology == "v4:2x2x1" and compile_check.get_target("v4-8").devices == 4
    v5e = compile_check.get_target("v5litepod-256")
    assert (v5e.topology, v5e.chip_config, v5e.devices, v5e.hbm_bytes) == ("v5e:16x16", "default", 256, 16 * 2**30)
    assert compile_check.get_target("v6e-64").topology == "v6e:8x8"
    assert compile_check.get_target("8xh100").topology is None  # GPU targets are always simulated
    with pytest.raises(compile_check.CompileCheckError, match="unknown accelerator.*v5p-N"):
        compile_check.get_target("v5p-100")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    config = get_config("size=tiny")
    config.conditioner.t5 = str(
        write_random_t5(tmp_path_factory.mktemp("t5"), corpus=["a calm piano"] * 20, vocab_size=24)
    )
    config.conditioner.max_length = 16
    config.data.segment_seconds = 1.0
    return config


def test_train_step_compiles_for_a_simulated_v5p_8(tiny):
    target = compile_check.get_target("v5p-8")
    devices, simulated = compile_check.target_devices(target, simulate=True)
    assert simulated and len(devices) == 4
    compiled, mesh = compile_check.compile_train_step(tiny, devices)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 1}
    report = compile_check.memory_report(compiled, target)
    assert report["total_bytes"] == (
        report["argument_bytes"] + report["output_bytes"] - report["alias_bytes"] + report["temp_bytes"]
    )
    assert report["argument_bytes"] > 0 and report["temp_bytes"] > 0 and report["fits"]
    # A chip with too little memory is reported as not fitting.
    small_chip = dataclasses.replace(target, hbm_bytes=report["total_bytes"] - 1)
    assert not compile_check.memory_report(compiled, small_chip)["fits"]


def test_multislice_needs_the_tpu_compiler(tiny):
    if compile_check.libtpu_available():
        pytest.skip("libtpu installed: multi-slice is compiled for real")
    with pytest.raises(compile_check.CompileCheckError, match="multi-slice needs the TPU compiler"):
        compile_check.check(tiny, compile_check.get_target("v5p-8"), num_slices=2)


@pytest.mark.skipif(not compile_check.libtpu_available(), reason="needs libtpu (pip install 'magnet_jax[tpu]')")
def test_train_step_compiles_for_a_real_v5p_8_topology(tiny):
    report = compile_check.check(tiny, compile_check.get_target("v5p-8"))
    assert report["compiler"] == "tpu" and report["devices"] == 4 and report["fits"]


def test_cli_reports_memory_against_hbm(tiny, tmp_path):
    out = tmp_path / "report.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("XLA_FLAGS", None)  # the CLI sizes the simulated CPU mesh itself
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "magnet_jax.compile_check",
            "--config=configs/magnet.py:size=tiny",
            f"--config.conditioner.t5={tiny.conditioner.t5}",
            "--config.conditioner.max_length=16",
            "--config.data.segment_seconds=1.0",
            "--topology=8xh100",
            f"--json={out}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "8xh100 x1 slice(s), 8 devices" in r.stdout and "of 80.00 GiB HBM" in r.stdout and "fits" in r.stdout
    report = json.loads(out.read_text())
    assert report["devices"] == 8 and report["mesh"]["fsdp"] == 8 and report["fits"]
    assert report["model_flops_per_device"] > 0 and report["xla_flops_per_device"] > 0

    bad = subprocess.run(
        [sys.executable, "-m", "magnet_jax.compile_check", "--config=configs/magnet.py:size=tiny", "--topology=v9-1"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("compile_check: error: --topology='v9-1': unknown")
