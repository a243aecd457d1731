"""Multi-process jobs for real: every entry point run as N cooperating JAX processes on this machine through
`launch/multihost_local.sh` (jax.distributed over 127.0.0.1, gloo CPU collectives, simulated CPU devices per
process), compared with the same job run as one process.

Each job runs once (module fixtures) and several tests assert on it; every process is bounded by the launcher's
timeout and every wait by a deadline, so a hang fails the test.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from array_record.python.array_record_module import ArrayRecordReader

from data_pipelines.synthetic_corpus import generate_corpus
from magnet_jax.checkpoints.pretrained import load_pretrained
from magnet_jax.training.checkpointing import ORBAX_TMP

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch" / "multihost_local.sh"
JOB_TIMEOUT = 420  # seconds for any one job (the launcher kills every process past it)
STEPS = 8
TOLERANCE = 1e-5
HEARTBEAT = 10  # --heartbeat_timeout (seconds) of the run whose process is killed


def environment(cache: Path | None) -> dict:
    """The jobs' environment; `cache`: a persistent compilation cache, for one-process jobs only (processes of one
    CPU job must reach their first collective within gloo's 30 s rendezvous of each other, which a process that
    finds its executables in a cache while another compiles does not)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    if cache is not None:
        env.update({"JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"})
    return env


def launch(n: int, devices: int, args: list[str], logs: Path, cache: Path, *, grace: int = 30) -> subprocess.Popen:
    """Starts `python ARGS...` as `n` processes of `devices` CPU devices each (logs in `logs/process_i.log`)."""
    command = ["bash", str(LAUNCH), str(n), "-d", str(devices), "-l", str(logs), "-t", str(JOB_TIMEOUT)]
    command += ["-g", str(grace), "--", sys.executable, *args]
    env = environment(cache if n == 1 else None)
    return subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=JOB_TIMEOUT + 60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err


def run_job(n: int, devices: int, args: list[str], logs: Path, cache: Path) -> None:
    code, err = finish(launch(n, devices, args, logs, cache))
    assert code == 0, err[-3000:] + "".join(p.read_text()[-3000:] for p in sorted(logs.glob("*.log")))


def log(logs: Path, i: int) -> str:
    path = logs / f"process_{i}.log"
    return path.read_text() if path.exists() else ""


def pid(logs: Path, i: int) -> int:
    return int((logs / f"process_{i}.pid").read_text())


def wait_for(condition, what: str, proc: subprocess.Popen, timeout: float = JOB_TIMEOUT, poll: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the job ended before {what}: {proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll)


def records(directory: Path) -> list[bytes]:
    out = []
    for path in sorted(directory.glob("*.array_record")):
        reader = ArrayRecordReader(str(path))
        out += [reader.read([i])[0] for i in range(reader.num_records())]
        reader.close()
    return out


@pytest.mark.parametrize(
    "args, env, expected",
    [
        (
            ["-m", "magnet_jax.train", "--distributed", "--num_processes=2", "--process_id=3"],
            {},
            "train: error: --process_id=3: expected 0 <= process_id < num_processes=2",
        ),
        (
            ["-m", "data_pipelines.encode_audio", "--distributed", "--input=in", "--output=out"],
            {"JAX_NUM_PROCESSES": "two"},
            "encode_audio: error: $JAX_NUM_PROCESSES='two': expected a non-negative integer",
        ),
    ],
)
def test_bad_distributed_settings_are_one_line_errors(args, env, expected, tmp_path):
    if args[1] == "magnet_jax.train":
        args += ["--config=configs/magnet.py:size=tiny", f"--workdir={tmp_path / 'run'}"]
    r = subprocess.run(
        [sys.executable, *args], cwd=REPO, env={**environment(None), **env}, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [expected]
    assert not (tmp_path / "run").exists()


# ---- data: encode_audio and the input pipeline ----------------------------------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny):
    root = tmp_path_factory.mktemp("multihost")
    generate_corpus(root / "corpus", num_clips=8, seconds=1.5, seed=3)
    return {**tiny, "root": root, "cache": root / "cache"}


def encode_args(work, output: Path) -> list[str]:
    return [
        "-m",
        "data_pipelines.encode_audio",
        "--distributed",
        f"--input={work['root'] / 'corpus'}",
        f"--output={output}",
        f"--codec={work['codec']}",
        "--segment_seconds=1",
        "--chunk_seconds=1",
        "--records_per_shard=2",
        "--batch_size=2",
    ]


@pytest.fixture(scope="module")
def encoded(work):
    """The corpus encoded by 1 process, and by 2 processes of which one was killed (SIGKILL) once it had started
    its share (before its first shard was complete), and the job rerun."""
    root, cache = work["root"], work["cache"]
    one, two = root / "codes1", root / "codes2"
    run_job(1, 1, encode_args(work, one), root / "logs_enc1", cache)
    logs = root / "logs_enc2_killed"
    proc = launch(2, 1, encode_args(work, two), logs, cache, grace=5)
    wait_for(lambda: "process 1/2: 4 files in 2 shards" in log(logs, 1), "process 1's start", proc)
    os.kill(pid(logs, 1), signal.SIGKILL)
    killed_status, _ = finish(proc)
    shards_after_kill = sorted(p.name for p in two.glob("*.array_record"))
    run_job(2, 1, encode_args(work, two), root / "logs_enc2", cache)
    return {"one": one, "two": two, "killed_status": killed_status, "after_kill": shards_after_kill}


def test_encode_two_processes_write_the_records_of_one_each_shard_once(encoded):
    assert encoded["killed_status"] != 0
    assert not [name for name in encoded["after_kill"] if "-p00001-" in name]  # the killed share is missing ...
    one, two = records(encoded["one"]), records(encoded["two"])
    assert len(one) == 8 and len(set(one)) == 8
    assert sorted(two) == sorted(one)  # ... and the rerun completed it with the same records, none twice
    names = sorted(p.name for p in encoded["two"].glob("*.array_record"))
    assert names == [f"codes-p{i:05d}-of-00002-s{s:05d}.array_record" for i in range(2) for s in range(2)]


def run_with_flags(n: int, args: list[str], logs: Path) -> None:
    """Runs `python ARGS...` as `n` one-device processes joined by `--coordinator_address`, `--num_processes` and
    `--process_id` (without the launcher and its JAX_* environment variables); every process must exit 0."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    env = {k: v for k, v in environment(None).items() if not k.startswith("JAX_")}
    env.update({"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
    logs.mkdir()
    procs = []
    for i in range(n):
        flags = [f"--coordinator_address={address}", f"--num_processes={n}", f"--process_id={i}"]
        with open(logs / f"process_{i}.log", "w") as out:
            procs.append(subprocess.Popen([sys.executable, *args, *flags], cwd=REPO, env=env, stdout=out, stderr=out))
    deadline = time.monotonic() + JOB_TIMEOUT
    try:
        for i, proc in enumerate(procs):
            code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            assert code == 0, log(logs, i)[-3000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def pipeline_batches(work, encoded):
    """The pipeline's first batches on 1, 2 and 4 processes (the 2 processes joined by the distributed flags, the
    others through the launcher's environment variables)."""
    root = work["root"]
    for n in (1, 2, 4):
        out = root / f"pipeline{n}"
        out.mkdir()
        args = [
            str(REPO / "tests" / "multihost_pipeline.py"),
            "--distributed",
            f"--files={encoded['one']}/*.array_record",
            f"--t5={work['t5']}",
            f"--output={out}",
        ]
        if n == 2:
            run_with_flags(n, args, root / f"logs_pipeline{n}")
        else:
            run_job(n, 1, args, root / f"logs_pipeline{n}", work["cache"])
    return root


def test_per_process_batches_concatenate_to_the_global_batch(pipeline_batches):
    root = pipeline_batches
    for b in range(2):
        reference = dict(np.load(root / "pipeline1" / f"local-{b}-p0-of-1.npz"))
        assert reference["codes"].shape[0] == 8
        for n in (1, 2, 4):
            parts = [np.load(root / f"pipeline{n}" / f"local-{b}-p{i}-of-{n}.npz") for i in range(n)]
            assert all(p["codes"].shape[0] == 8 // n for p in parts)
            gathered = np.load(root / f"pipeline{n}" / f"global-{b}-of-{n}.npz")
            for key, value in reference.items():
                np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), value, err_msg=f"{n} {key}")
                np.testing.assert_array_equal(gathered[key], value, err_msg=f"global {n} {key}")


# ---- training --------------------------------------------------------------------------------------------


def train_args(work, encoded, workdir: Path, *extra: str) -> list[str]:
    codes = f"{encoded['one']}/*.array_record"
    values = {
        "data.train_files": codes,
        "data.eval_files": codes,
        "conditioner.t5": work["t5"],
        "data.segment_seconds": 1.0,
        "conditioner.max_length": 16,
        "optim.warmup_steps": 2,
        "train.num_steps": STEPS,
        "train.log_every": 1,
        "train.eval_every": 3,
        "train.eval_steps": 1,
        "checkpoint.every_steps": 3,
        "checkpoint.keep": 10,
        "mesh.data": 2,
        "mesh.fsdp": 2,
        "mesh.tensor": 2,
    }
    return [
        "-m",
        "magnet_jax.train",
        "--distributed",
        "--config=configs/magnet.py:size=tiny",
        f"--workdir={workdir}",
        *(f"--config.{k}={v}" for k, v in values.items()),
        *extra,
    ]


def metric_rows(workdir: Path, split: str = "train") -> dict[int, dict]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["step"]: r for r in rows if r["split"] == split}


def checkpoint_steps(workdir: Path) -> list[int]:
    directory = workdir / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.exists() else []


def state_params(workdir: Path, step: int) -> dict:
    """The `params` of a checkpoint's train state, as host NumPy arrays."""
    path, checkpointer = workdir / "checkpoints" / str(step) / "state", ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(path).item_metadata.tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))["params"]


def copy_checkpoint(source: Path, step: int, workdir: Path) -> None:
    (workdir / "checkpoints").mkdir(parents=True)
    shutil.copytree(source / "checkpoints" / str(step), workdir / "checkpoints" / str(step))


def sealed(workdir: Path, step: int) -> bool:
    """Whether checkpoint `step` is complete: written by every process and sealed by its checksum manifest."""
    return (workdir / "checkpoints" / str(step) / "checksums.json").is_file()


def step_entries(workdir: Path, step: int) -> list[str]:
    """The names under `checkpoints/` of step `step` (its folder, or orbax's temporary one while it is written)."""
    directory = workdir / "checkpoints"
    return (
        sorted(p.name for p in directory.iterdir() if p.name.split(".")[0] == str(step)) if directory.exists() else []
    )


@pytest.fixture(scope="module")
def reference(work, encoded):
    """1 process × 8 devices from scratch on the (2, 2, 2) mesh: the uninterrupted run every other one is held to."""
    workdir = work["root"] / "train1"
    run_job(1, 8, train_args(work, encoded, workdir), work["root"] / "logs_train1", work["cache"])
    return workdir


@pytest.fixture(scope="module")
def two(work, encoded):
    """2 processes × 4 devices from scratch; process 1 killed with SIGKILL as soon as the save of step 6 has begun
    (step 3 complete), then the same command run again: it resumes from step 3 and runs to the end."""
    root = work["root"]
    workdir, killed_logs, logs = root / "train2", root / "logs_train2_killed", root / "logs_train2"
    args = train_args(work, encoded, workdir, f"--heartbeat_timeout={HEARTBEAT}")
    proc = launch(2, 4, args, killed_logs, work["cache"], grace=120)
    wait_for(lambda: step_entries(workdir, 6), "the save of step 6", proc, poll=0.01)
    os.kill(pid(killed_logs, 1), signal.SIGKILL)
    killed_at = time.monotonic()
    status, _ = finish(proc)
    killed = {"status": status, "seconds": time.monotonic() - killed_at, "log": log(killed_logs, 0)}
    killed.update(entries=step_entries(workdir, 6), sealed=[s for s in (3, 6) if sealed(workdir, s)])
    killed["rows"] = sorted(metric_rows(workdir))
    run_job(2, 4, args, logs, work["cache"])
    return {"workdir": workdir, "logs": logs, "killed": killed}


@pytest.fixture(scope="module")
def preempted(work, encoded, reference):
    """The 1-process step 3 resumed on 2 processes and stopped by SIGTERM to one of them after step 4."""
    root = work["root"]
    workdir, logs = root / "train_resumed2", root / "logs_preempted"
    copy_checkpoint(reference, 3, workdir)
    proc = launch(2, 4, train_args(work, encoded, workdir), logs, work["cache"])
    wait_for(lambda: 4 in metric_rows(workdir), "step 4", proc)
    os.kill(pid(logs, 1), signal.SIGTERM)
    status, err = finish(proc)
    return {
        "workdir": workdir,
        "status": status,
        "stderr": err,
        "logs": [log(logs, i) for i in range(2)],
        "rows": metric_rows(workdir),
        "stopped": checkpoint_steps(workdir)[-1],
        "export": (workdir / "export").exists(),
    }


@pytest.fixture(scope="module")
def moved(work, encoded, preempted):
    """The 2-process checkpoint of the preempted run resumed to the end on 4 processes × 2 devices and on
    1 process × 8 devices, without evaluation (its cadence is not part of the training; no eval step to compile)."""
    root, runs = work["root"], {}
    for n, devices in ((4, 2), (1, 8)):
        runs[n] = root / f"train_resumed{n}"
        copy_checkpoint(preempted["workdir"], preempted["stopped"], runs[n])
        args = train_args(work, encoded, runs[n], "--config.train.eval_every=0")
        run_job(n, devices, args, root / f"logs_resumed{n}", work["cache"])
        runs[n, "log"] = log(root / f"logs_resumed{n}", 0)
    return runs


def assert_rows_close(rows: dict[int, dict], reference: dict[int, dict], steps, keys=("loss", "grad_norm")) -> None:
    for step in steps:
        for key in keys:
            assert rows[step][key] == pytest.approx(reference[step][key], abs=TOLERANCE), (step, key)


def assert_params_close(a: dict, b: dict) -> None:
    flat_a, flat_b = ocp.tree.to_flat_dict(a), ocp.tree.to_flat_dict(b)
    assert flat_a.keys() == flat_b.keys()
    for k in flat_a:
        np.testing.assert_allclose(np.asarray(flat_a[k]), np.asarray(flat_b[k]), atol=TOLERANCE, rtol=0, err_msg=k)


def test_two_processes_train_like_one(reference, two):
    one, two = reference, two["workdir"]
    assert_rows_close(metric_rows(two), metric_rows(one), range(1, STEPS + 1))
    assert sorted(metric_rows(two, "eval")) == [3, 6, 8]
    assert_rows_close(metric_rows(two, "eval"), metric_rows(one, "eval"), [3, 6, 8], keys=("loss",))
    assert checkpoint_steps(two) == checkpoint_steps(one) == [3, 6, 8]
    assert all(sealed(two, s) for s in (3, 6, 8))
    assert_params_close(state_params(two, STEPS), state_params(one, STEPS))
    assert_params_close(load_pretrained(two / "export")[1], load_pretrained(one / "export")[1])


def test_only_process_zero_writes_logs_metrics_and_config(two):
    workdir = two["workdir"]
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == len({(r["split"], r["step"]) for r in lines}) == STEPS + 3
    assert json.loads((workdir / "config.json").read_text())["mesh"]["tensor"] == 2
    assert len(list((workdir / "tensorboard").rglob("*tfevents*"))) == 1
    assert "[train] step" in log(two["logs"], 0)
    assert "[train] step" not in log(two["logs"], 1)


def test_a_killed_process_stops_the_others_in_one_line_within_the_heartbeat_timeout(two):
    killed = two["killed"]
    assert killed["status"] != 0
    assert killed["seconds"] < HEARTBEAT + 50, killed["seconds"]
    last = killed["log"].strip().splitlines()[-1]
    assert last.startswith("train: error: process 0: another process of the job died"), killed["log"][-2000:]
    assert f"--heartbeat_timeout={HEARTBEAT}" in last
    assert "Check failure stack trace" not in killed["log"]


def test_the_rerun_after_a_kill_resumes_from_the_last_complete_checkpoint(two):
    killed, rerun = two["killed"], log(two["logs"], 0)
    # The kill left step 6 begun but not complete (step 7 needs every process, and a step is sealed after it) ...
    assert killed["entries"] and killed["sealed"] == [3] and max(killed["rows"]) == 6, killed
    # ... so the rerun cleaned or set it aside and resumed from step 3; the results equal the uninterrupted run's
    # (test_two_processes_train_like_one).
    assert "resuming from step 3 to 8" in rerun, rerun[-2000:]
    if killed["entries"] == ["6"]:  # orbax had finished writing it: no checksum manifest, skipped
        assert "checkpoint: skipping step 6" in rerun
        assert [p.name.split("-")[0] for p in (two["workdir"] / "checkpoints.corrupt").iterdir()] == ["6"]
    else:  # still orbax's temporary folder: removed
        assert "checkpoint: removing" in rerun and "an interrupted save" in rerun
    assert not list((two["workdir"] / "checkpoints").glob(ORBAX_TMP))


def test_sigterm_to_one_process_saves_the_same_step_on_all_and_exits_0(preempted):
    p = preempted
    assert p["status"] == 0, p["stderr"][-2000:]
    stopped = p["stopped"]
    assert 4 <= stopped < STEPS and not p["export"]
    for text in p["logs"]:
        assert f"train: stopping at step {stopped} after a preemption notice" in text
    data = p["workdir"] / "checkpoints" / str(stopped) / "data"
    assert sorted(f.name for f in data.glob("*.json")) == ["process_0-of-2.json", "process_1-of-2.json"]


def test_a_one_process_checkpoint_resumes_on_two_and_the_data_continues(reference, preempted):
    # Resumed from the 1-process step 3: the same losses (same batches, same masks) up to the stop.
    assert "resuming from step 3" in preempted["logs"][0]
    assert_rows_close(preempted["rows"], metric_rows(reference), range(4, preempted["stopped"] + 1))


@pytest.mark.parametrize("n", [4, 1])
def test_a_two_process_checkpoint_resumes_on_n_processes_and_the_data_continues(n, reference, preempted, moved):
    stopped, resumed = preempted["stopped"], moved[n]
    assert f"resuming from step {stopped} to {STEPS} on 8 devices" in moved[n, "log"]
    assert_rows_close(metric_rows(resumed), metric_rows(reference), range(stopped + 1, STEPS + 1))
    assert_params_close(state_params(resumed, STEPS), state_params(reference, STEPS))
    data = resumed / "checkpoints" / str(STEPS) / "data"
    assert sorted(f.name for f in data.glob("*.json")) == [f"process_{i}-of-{n}.json" for i in range(n)]


# ---- stop signals on one process -------------------------------------------------------------------------


def start_single(work, encoded, workdir: Path) -> subprocess.Popen:
    # The reference run's config (its executables are in the persistent compilation cache), saving only on a stop.
    args = [
        a for a in train_args(work, encoded, workdir, "--config.checkpoint.every_steps=100") if a != "--distributed"
    ]
    env = {**environment(work["cache"]), "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    return subprocess.Popen(
        [sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def stderr_until(proc: subprocess.Popen, text: str, timeout: float = JOB_TIMEOUT) -> str:
    """Reads the process's stderr until a line contains `text` (fails on a timeout or an early exit)."""
    seen, deadline = [], time.monotonic() + timeout
    for line in proc.stderr:
        seen.append(line)
        if text in line:
            return "".join(seen)
        assert time.monotonic() < deadline, f"timed out waiting for {text!r}"
    pytest.fail(f"exited before {text!r}: {''.join(seen)[-2000:]}")


def test_sigterm_during_setup_exits_0_and_says_nothing_was_trained(work, encoded):
    workdir = work["root"] / "stopped_in_setup"
    proc = start_single(work, encoded, workdir)
    try:
        stderr_until(proc, "train: setting up the run")
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, rest[-2000:]
    assert "during setup; nothing was trained" in rest
    assert not (workdir / "config.json").exists() and not checkpoint_steps(workdir)


def test_ctrl_c_saves_the_step_being_run_and_exits_0(work, encoded, reference):
    workdir = work["root"] / "interrupted"
    proc = start_single(work, encoded, workdir)
    try:
        stderr_until(proc, "[train] step 2 ")
        at_signal = max(metric_rows(workdir))
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, rest[-2000:]
    saved = checkpoint_steps(workdir)
    assert len(saved) == 1 and at_signal <= saved[0] <= at_signal + 2, (at_signal, saved)
    assert f"train: stopping at step {saved[0]} after a preemption notice" in rest


# ---- generation ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def generated(work):
    root = work["root"]
    prompts = root / "prompts.jsonl"
    rows = [{"text": "a calm piano piece", "seed": 1, "num_samples": 3}, {"text": "fast techno", "seed": 2}]
    rows += [{"text": "slow blues", "seed": 5, "num_samples": 2}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    outputs = {}
    for n, devices in ((1, 4), (2, 2)):
        outputs[n] = root / f"generated{n}"
        args = [
            "-m",
            "magnet_jax.generate",
            "--distributed",
            f"--config=configs/generate.py:source={work['lm']},duration=1",
            "--config.generate.decoding_steps=(2,2,2,2)",
            "--config.batch_size=4",
            f"--prompts={prompts}",
            f"--output_dir={outputs[n]}",
        ]
        run_job(n, devices, args, root / f"logs_generate{n}", work["cache"])
    return outputs


def test_generate_two_processes_write_each_sample_once_identical_to_one(generated):
    one, two = generated[1], generated[2]
    wavs = sorted(p.name for p in one.glob("*.wav"))
    assert len(wavs) == 6 and sorted(p.name for p in two.glob("*.wav")) == wavs
    for name in wavs:
        assert (two / name).read_bytes() == (one / name).read_bytes(), name
    lines = {
        n: [json.loads(line) for line in (d / "manifest.jsonl").read_text().splitlines()] for n, d in generated.items()
    }
    assert len(lines[2]) == len({line["id"] for line in lines[2]}) == 6
    for line in lines[1] + lines[2]:  # the only field that differs: how long the batch took
        assert line["timing"].pop("batch_seconds") > 0
    assert lines[2] == lines[1]
