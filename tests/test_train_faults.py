"""`python -m magnet_jax.train` under fault injection, in subprocesses: a damaged checkpoint step (refused with one
line, or skipped for the previous one), a diverging run (exit 3, nothing exported), a record with out-of-range codes
inside a shard (named; skipped on request), a changed config on resume, a second job on a locked workdir, and the
metrics file after a torn write."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from magnet_jax.checkpoints.t5_weights import write_random_t5
from magnet_jax.data.records import CodeRecord
from magnet_jax.fileio import CHECKSUMS_FILE, LOCK_FILE, verify_checksums
from magnet_jax.training import metrics

REPO = Path(__file__).resolve().parents[1]
WORDS = ["calm", "piano", "bright", "synth", "slow", "drums", "warm", "pad"]


def record_bytes(codes: np.ndarray, text: str, card: int = 64) -> bytes:
    """A code record; codes outside [0, card) are written as they are (what a damaged encode would leave)."""
    valid = CodeRecord(
        codes=np.zeros_like(codes, np.int16),
        sample_rate=32000,
        frame_rate=50.0,
        card=card,
        duration=1.2,
        segment_seconds=1.0,
        source=f"{text}.wav",
        metadata={"description": text},
    ).to_bytes()
    payload = np.ascontiguousarray(codes, dtype="<i2").tobytes()
    head_len = int.from_bytes(valid[4:8], "little")
    header = json.loads(valid[8 : 8 + head_len])
    header["crc32"] = zlib.crc32(payload)
    head = json.dumps(header, separators=(",", ":")).encode()
    return valid[:4] + len(head).to_bytes(4, "little") + head + payload


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two good shards of 6 records (codes [4, 60], card 64), a third whose record 2 holds code 1000, a T5."""
    root = tmp_path_factory.mktemp("faults")
    rng = np.random.default_rng(0)
    texts = []
    for shard in range(3):
        writer = ArrayRecordWriter(str(root / f"codes-s{shard}.array_record"), "group_size:1")
        for i in range(6):
            codes = (rng.integers(0, 64, size=(4, 1)) + np.arange(60)) % 64
            if shard == 2 and i == 2:
                codes[1, 7] = 1000
            text = " ".join(rng.choice(WORDS, size=3))
            texts.append(text)
            writer.write(record_bytes(codes, text))
        writer.close()
    return root, write_random_t5(root / "t5", corpus=texts * 8, vocab_size=40)


def env(cache):
    return {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "HF_HUB_OFFLINE": "1",
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }


def command(corpus, workdir, *extra, files="codes-s[01].array_record", **overrides):
    root, t5 = corpus
    values = {
        "data.train_files": f"{root}/{files}",
        "conditioner.t5": t5,
        "data.segment_seconds": 1.0,
        "data.batch_size": 4,
        "conditioner.max_length": 16,
        "optim.warmup_steps": 2,
        "train.num_steps": 6,
        "train.log_every": 2,
        "checkpoint.every_steps": 2,
        "checkpoint.keep": 5,
        **overrides,
    }
    return [
        sys.executable,
        "-m",
        "magnet_jax.train",
        "--config=configs/magnet.py:size=tiny",
        f"--workdir={workdir}",
        *(f"--config.{k}={v}" for k, v in values.items()),
        *extra,
    ]


def run(args, cache, timeout=600):
    return subprocess.run(args, cwd=REPO, env=env(cache), capture_output=True, text=True, timeout=timeout)


def error_lines(stderr: str) -> list[str]:
    """stderr without absl's log lines (`I1124 ...`, `W1124 ...`)."""
    return [line for line in stderr.splitlines() if line.strip() and not (line[:1] in "IWE" and line[1:5].isdigit())]


def warnings(stderr: str, text: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("W") and text in line]


def flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def largest_file(directory: Path) -> Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_a_damaged_checkpoint_is_refused_or_skipped_and_a_changed_config_refused(corpus, tmp_path):
    workdir, cache = tmp_path / "run", tmp_path / "cache"
    first = run(command(corpus, workdir, "--run_steps=4"), cache)
    assert first.returncode == 0, first.stderr[-3000:]
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [2, 4]
    for step in (2, 4):
        verify_checksums(workdir / "checkpoints" / str(step))
    assert not (workdir / LOCK_FILE).exists()  # released at exit

    damaged = largest_file(workdir / "checkpoints" / "4" / "state")
    flip_bit(damaged)
    refused = run(command(corpus, workdir, **{"checkpoint.on_corrupt": "fail"}), cache)
    assert refused.returncode == 2
    [line] = error_lines(refused.stderr)
    assert line.startswith("train: error: ") and f"{damaged}: SHA-256 differs" in line, line

    changed = run(command(corpus, workdir, **{"optim.lr": 1e-2, "data.batch_size": 2}), cache)
    assert changed.returncode == 2
    assert error_lines(changed.stderr) == [
        f"train: error: {workdir} was trained with another config (data.batch_size: 4 -> 2; optim.lr: 0.0001 -> "
        "0.01); rerun with the same config, pass --allow_config_change to continue with the new one (recorded in "
        "config_changes.jsonl), or use another workdir"
    ]

    # A torn last metrics line (a crash mid-write) and the damaged step: both dropped, the run resumes from step 2.
    with open(workdir / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "split": "tra')
    resumed = run(command(corpus, workdir, **{"train.num_steps": 8}), cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert len(warnings(resumed.stderr, "checkpoint: skipping step 4")) == 1
    assert "resuming from step 2 to 8" in resumed.stderr
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6, 8]  # 4 logged once: the one of the resumed run
    tb = tensorboard_steps(workdir / "tensorboard", "train/loss")
    assert tb == [2, 4, 6, 8]  # no step twice after the resume
    assert (workdir / "export" / CHECKSUMS_FILE).is_file()
    assert len(list((workdir / "checkpoints.corrupt").iterdir())) == 1

    allowed = run(command(corpus, workdir, "--allow_config_change", **{"optim.lr": 1e-2, "train.num_steps": 8}), cache)
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    [change] = [json.loads(line) for line in (workdir / "config_changes.jsonl").read_text().splitlines()]
    assert change["changes"] == {"optim.lr": [0.0001, 0.01]}
    assert json.loads((workdir / "config.json").read_text())["optim"]["lr"] == 0.01


def tensorboard_steps(logdir: Path, tag: str) -> list[int]:
    from tensorboardX.proto.event_pb2 import Event

    steps = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            length = int.from_bytes(data[pos : pos + 8], "little")
            event = Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            steps += [event.step for v in event.summary.value if v.tag == tag]
    return steps


def test_a_diverging_run_stops_with_status_3_and_exports_nothing(corpus, tmp_path):
    workdir = tmp_path / "run"
    r = run(
        command(corpus, workdir, **{"optim.lr": 1e30, "train.num_steps": 12, "train.max_skipped_in_a_row": 3}),
        tmp_path / "cache",
    )
    assert r.returncode == 3, r.stderr[-3000:]
    [line] = error_lines(r.stderr)
    assert line.startswith("train: error: diverged: 4 consecutive updates skipped (non-finite loss, gradients or "), (
        line
    )
    assert line.endswith("limit train.max_skipped_in_a_row=3")
    assert not (workdir / "export").exists()


def test_a_record_with_out_of_range_codes_is_named_or_skipped(corpus, tmp_path):
    root, _ = corpus
    files = "codes-s*.array_record"
    # 6 steps of 4 records cover the 18 records of the shuffled epoch, so the bad one is read.
    failed = run(command(corpus, tmp_path / "a", files=files), tmp_path / "cache")
    assert failed.returncode == 2
    [line] = error_lines(failed.stderr)
    assert line.startswith(f"train: error: {root}/codes-s2.array_record record 2 ("), line
    assert line.endswith(
        "codes outside [0, 64) (min 0, max 1000) (data.on_bad_record='fail'; set 'skip' to skip such records)"
    ), line
    assert not (tmp_path / "a" / "export").exists()
    skipped = run(
        command(corpus, tmp_path / "b", files=files, **{"data.on_bad_record": "skip"}),
        tmp_path / "cache",
    )
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    assert len(warnings(skipped.stderr, f"skipping a bad record (data.on_bad_record='skip'): {root}/codes-s2")) == 1
    assert warnings(skipped.stderr, "data: skipped 1 bad record(s) in this run")
    losses = [json.loads(line)["loss"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(losses))


def test_a_second_trainer_on_a_locked_workdir_exits_2_and_a_dead_ones_lock_is_taken_over(corpus, tmp_path):
    workdir, cache = tmp_path / "run", tmp_path / "cache"
    args = command(corpus, workdir, **{"train.num_steps": 400, "train.log_every": 1})
    proc = subprocess.Popen(args, cwd=REPO, env=env(cache), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not (workdir / "metrics.jsonl").exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        lock = json.loads((workdir / LOCK_FILE).read_text())
        assert lock["pid"] == proc.pid
        second = run(args, cache)
        assert second.returncode == 2
        [line] = error_lines(second.stderr)
        assert line.startswith(f"train: error: {workdir} is in use by another job (pid {proc.pid} on this host, ")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (workdir / LOCK_FILE).exists()  # left by kill -9
    other_host = {"host": "tpu-host-7", "pid": 1, "since": "2026-01-01T00:00:00"}
    (workdir / LOCK_FILE).write_text(json.dumps(other_host))
    respected = run(command(corpus, workdir, **{"train.num_steps": 4}), cache)
    assert respected.returncode == 2 and "pass --force_unlock if that job is gone" in respected.stderr
    (workdir / LOCK_FILE).write_text(json.dumps({**other_host, "host": socket.gethostname(), "pid": 2**22 + 7}))
    taken = run(command(corpus, workdir, **{"train.num_steps": 4}), cache)
    assert taken.returncode == 0, taken.stderr[-3000:]
    assert warnings(taken.stderr, "that process is gone")
    assert not (workdir / LOCK_FILE).exists()


def test_a_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path, caplog):
    (tmp_path / "metrics.jsonl").write_text('{"step": 10, "split": "train", "loss": 3.0}\n{"step": 20, "spl')
    with caplog.at_level("WARNING"):
        writer = metrics.MetricWriter(str(tmp_path), resume_step=10, enabled=True)
        writer.write(20, "train", {"loss": 2.5})
        writer.close()
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [10, 20]
    assert any("dropping line 2 of" in r.getMessage() for r in caplog.records)
