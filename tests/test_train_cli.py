"""`python -m magnet_jax.train`: config errors, bad inputs, and an end-to-end run on encoded audio that is preempted
(SIGTERM), resumes, learns, logs and exports."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from configs.magnet import get_config
from data_pipelines import encode_audio, synthetic_corpus
from magnet_jax.checkpoints.pretrained import load_pretrained
from magnet_jax.checkpoints.t5_weights import write_random_t5
from magnet_jax.models import encodec
from magnet_jax.training import metrics

REPO = Path(__file__).resolve().parents[1]
SECONDS = 1.5  # clip length; training segments are 1 s = 50 frames


def env(cache_dir):
    return {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "HF_HUB_OFFLINE": "1",
        "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }


def train_command(*args):
    return [sys.executable, "-m", "magnet_jax.train", *args]


def error_lines(stderr: str) -> list[str]:
    """stderr without absl's log lines (`I1124 ...`, `W1124 ...`)."""
    return [line for line in stderr.splitlines() if line.strip() and not (line[:1] in "IWE" and line[1:5].isdigit())]


@pytest.mark.parametrize(
    "override, expected",
    [
        ("--config.model.dimx=3", "train: error: --config.model.dimx: unknown config key 'dimx' (did you mean 'dim'?)"),
        (
            "--config.optim.lr=fast",
            "train: error: flag --config.optim.lr=fast: could not convert string to float: 'fast'",
        ),
        (
            "--config=configs/magnet.py:size=huge",
            "train: error: flag --config=configs/magnet.py:size=huge: Error whilst "
            "parsing config file ValueError: size='huge': expected one of tiny, small, medium, large",
        ),
    ],
)
def test_bad_config_is_a_one_line_error(override, expected, tmp_path):
    workdir = tmp_path / "run"
    r = subprocess.run(
        train_command("--config=configs/magnet.py:size=tiny", f"--workdir={workdir}", override),
        cwd=REPO,
        env=env(tmp_path / "cache"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2
    assert error_lines(r.stderr) == [expected]
    assert not workdir.exists()


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    """Synthetic music clips encoded by the data pipeline's encode job (tiny local codec) into ArrayRecord shards
    (train and eval splits), and a random local T5 whose tokenizer was trained on the descriptions."""
    root = tmp_path_factory.mktemp("data")
    codec_config = encodec.EncodecConfig.from_config(get_config("size=tiny").codec)
    rng = np.random.default_rng(0)
    calibration = np.stack(
        [synthetic_corpus.render(synthetic_corpus.draw_spec(rng), SECONDS, 32000, rng) for _ in range(4)]
    )[:, None]
    codec_params = encodec.init_encodec(codec_config, 0, calibration)
    texts = []
    for split, clips, seed in (("train", 4, 0), ("eval", 8, 1)):
        paths = synthetic_corpus.generate_corpus(root / f"audio_{split}", num_clips=clips, seconds=SECONDS, seed=seed)
        texts += [json.loads(p.with_suffix(".json").read_text())["description"] for p in paths]
        summary = encode_audio.run(
            str(root / f"audio_{split}"),
            str(root / f"codes_{split}"),
            codec_source="tiny",
            codec_config=codec_config,
            codec_params=codec_params,
            segment_seconds=1.0,
            chunk_seconds=1.0,
            batch_size=8,
            records_per_shard=4,
            log_every=0.0,
        )
        assert summary["encoded"] == clips
    t5_dir = write_random_t5(root / "t5", corpus=texts * 16, vocab_size=64)
    return root, t5_dir


def run_flags(encoded, workdir, **overrides):
    root, t5_dir = encoded
    values = {
        "data.train_files": f"{root}/codes_train/*.array_record",
        "data.eval_files": f"{root}/codes_eval/*.array_record",
        "conditioner.t5": t5_dir,
        "data.segment_seconds": 1.0,
        "conditioner.max_length": 32,
        "optim.lr": 5e-3,
        "optim.warmup_steps": 10,
        "train.num_steps": 100,
        "train.log_every": 10,
        "train.eval_every": 50,
        "train.eval_steps": 1,
        "checkpoint.every_steps": 40,
        **overrides,
    }
    return [
        "--config=configs/magnet.py:size=tiny",
        f"--workdir={workdir}",
        *(f"--config.{k}={v}" for k, v in values.items()),
    ]


def read_metrics(workdir: Path) -> list[dict]:
    if not (workdir / "metrics.jsonl").exists():
        return []
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_missing_training_data_is_a_one_line_error(encoded, tmp_path):
    workdir = tmp_path / "run"
    r = subprocess.run(
        train_command(*run_flags(encoded, workdir, **{"data.train_files": f"{tmp_path}/none-*"})),
        cwd=REPO,
        env=env(tmp_path / "cache"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2
    assert error_lines(r.stderr) == [f"train: error: data files '{tmp_path}/none-*': no file matches"]
    assert not list(workdir.glob("*")), "a run that cannot start writes nothing"


def test_preempted_run_resumes_learns_and_exports(encoded, tmp_path):
    workdir, cache = tmp_path / "run", tmp_path / "cache"
    command = train_command(*run_flags(encoded, workdir))

    # 1) Preemption: SIGTERM once training is under way -> a checkpoint at the current step, clean exit.
    proc = subprocess.Popen(
        command, cwd=REPO, env=env(cache), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 600
        while not any(m["split"] == "train" and m["step"] >= 20 for m in read_metrics(workdir)):
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "training did not reach step 20"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        log, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, log[-3000:]
    assert "after a preemption notice" in log
    stopped = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert 20 <= stopped < 100
    assert not (workdir / "export").exists()

    # 2) The same command resumes from that checkpoint and finishes.
    r = subprocess.run(command, cwd=REPO, env=env(cache), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming from step {stopped} to 100" in r.stderr

    rows = read_metrics(workdir)
    train = [m for m in rows if m["split"] == "train"]
    steps = [m["step"] for m in train]
    assert steps == sorted(set(steps)) and steps[-1] == 100  # one line per step, none repeated after the resume
    for key in ("loss", "ppl", "grad_norm", "lr", "step_time", "tokens_per_s", "audio_seconds_per_s", "mfu"):
        assert all(np.isfinite(m[key]) for m in train[1:]), key
    assert train[-1]["tokens_per_s"] == pytest.approx(8 * 4 * 50 / train[-1]["step_time"], rel=1e-6)
    assert train[-1]["audio_seconds_per_s"] == pytest.approx(8 * 1.0 / train[-1]["step_time"], rel=1e-6)
    assert 0 < train[-1]["mfu"] < 1
    assert {f"ppl_stage{s}" for s in range(4)} <= set().union(*train)
    # The tiny model learns: the loss of the last 20 steps is well below that of the first 10 (4 training clips:
    # it memorises them; the 8 held-out clips are not expected to improve).
    first, last = train[0]["loss"], np.mean([m["loss"] for m in train[-2:]])
    print(f"train loss: first 10 steps {first:.3f}, last 20 steps {last:.3f}")
    assert last < first - 1.0, (first, last)
    evals = [m for m in rows if m["split"] == "eval"]
    assert [m["step"] for m in evals] == [50, 100]  # held-out loss of the EMA weights, every stage scored
    assert all(np.isfinite(m[f"loss_stage{s}"]) for m in evals for s in range(4))

    config = json.loads((workdir / "config.json").read_text())
    assert config["model"]["dim"] == 64 and config["data"]["seq_len"] == 50
    scalars = tensorboard_scalars(workdir / "tensorboard")
    assert scalars["train/loss"][-1] == (100, pytest.approx(train[-1]["loss"], rel=1e-5))
    assert {"train/mfu", "train/tokens_per_s", "eval/loss", "eval/ppl_stage3"} <= set(scalars)
    exported, params = load_pretrained(workdir / "export")
    assert exported["model"]["dim"] == 64 and exported["provenance"]["step"] == 100
    assert params["head_0"]["kernel"].shape == (64, 64)


def test_metric_writer_keeps_one_line_per_step_across_a_resume(tmp_path):
    writer = metrics.MetricWriter(str(tmp_path), enabled=True)
    for step in (10, 20, 30):
        writer.write(step, "train", {"loss": 4.0 - step / 100})
    writer.close()
    # A crash after step 30 with the last checkpoint at 20: the resumed run logs 30 again.
    writer = metrics.MetricWriter(str(tmp_path), resume_step=20, enabled=True)
    writer.write(30, "train", {"loss": 3.5})
    writer.close()
    assert [(m["step"], m["loss"]) for m in read_metrics(tmp_path)] == [(10, 3.9), (20, 3.8), (30, 3.5)]
    assert (30, 3.5) in tensorboard_scalars(tmp_path / "tensorboard")["train/loss"]


def tensorboard_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars of the TFRecord event files in `logdir` (length, crc, Event proto, crc per record)."""
    from tensorboardX.proto.event_pb2 import Event

    found = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            length = int.from_bytes(data[pos : pos + 8], "little")
            event = Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                found.setdefault(value.tag, []).append((event.step, round(value.simple_value, 6)))
    return found


def test_interval_summary_skips_nan_and_keeps_last_counters():
    nan = float("nan")
    history = [
        {"loss": 2.0, "loss_stage0": 2.0, "loss_stage1": nan, "lr": 0.1, "skipped_steps": 0.0},
        {"loss": 4.0, "loss_stage0": nan, "loss_stage1": 4.0, "lr": 0.2, "skipped_steps": 1.0},
        {"loss": 3.0, "loss_stage0": 1.0, "loss_stage1": nan, "lr": 0.3, "skipped_steps": 1.0},
    ]
    history = [{k: np.float32(v) for k, v in h.items()} for h in history]
    history[0]["loss_stage3"] = np.float32(nan)  # a stage never trained in the interval is left out
    out = metrics.summarize(history, last=("lr", "skipped_steps"))
    assert out == pytest.approx({"loss": 3.0, "loss_stage0": 1.5, "loss_stage1": 4.0, "lr": 0.3, "skipped_steps": 1.0})


def test_profile_window_traces_the_configured_steps(tmp_path):
    import jax
    import jax.numpy as jnp

    window = metrics.ProfileWindow(str(tmp_path), start=2, num_steps=2)
    step_fn = jax.jit(lambda x: x @ x / 64)
    x = jnp.ones((64, 64))
    started = []
    for step in range(6):
        window.step(step, x)
        started.append(window.active)
        x = step_fn(x)
    window.close(x)
    assert started == [False, False, True, True, False, False]
    assert len(list(tmp_path.glob("plugins/profile/*/*.xplane.pb"))) == 1
