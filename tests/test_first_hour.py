"""What a newcomer runs into first: relative paths at every entry point, continuing a finished run, bad optimizer
fields, offline hub ids, unwritable outputs, and quiet, readable logs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from configs import generate as generate_config
from configs.magnet import get_config
from data_pipelines import encode_audio, synthetic_corpus
from magnet_jax import convert, generate, train
from magnet_jax.api import MAGNeT
from magnet_jax.checkpoints.encodec_weights import load_encodec
from magnet_jax.checkpoints.sources import export_step
from magnet_jax.fileio import WeightsError, absolute_path, local_source
from magnet_jax.training import metrics, optim

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def codes(tiny):
    """The tiny corpus (4 clips of 1 s) encoded into one ArrayRecord shard by the tiny codec."""
    codec_config, codec_params = load_encodec(tiny["codec"])
    out = tiny["root"] / "codes"
    encode_audio.run(
        str(tiny["root"] / "corpus"),
        str(out),
        codec_source=str(tiny["codec"]),
        codec_config=codec_config,
        codec_params=codec_params,
        segment_seconds=1.0,
        chunk_seconds=1.0,
        batch_size=4,
        records_per_shard=8,
        log_every=0.0,
    )
    return out


def relative_train_config(num_steps: int):
    """A tiny run whose data, text encoder and codec are named relative to the `tiny` root (the working dir)."""
    c = get_config("size=tiny,duration=1")
    c.data.train_files = "codes/*.array_record"
    c.conditioner.t5 = "assets/t5"
    c.codec.source = "assets/codec"
    c.conditioner.max_length = 32
    c.train.num_steps = num_steps
    c.train.log_every = 2
    c.optim.warmup_steps = 1
    c.checkpoint.every_steps = 2
    return c


def test_relative_paths_work_everywhere_and_the_export_follows_a_continued_run(tiny, codes, monkeypatch, caplog):
    del codes
    monkeypatch.chdir(tiny["root"])
    caplog.set_level("INFO")
    train.train_and_evaluate(relative_train_config(2), "rel_run")
    run = tiny["root"] / "rel_run"
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["2"]  # saved under a relative workdir
    saved = json.loads((run / "config.json").read_text())
    assert saved["conditioner"]["t5"] == str(tiny["root"] / "assets" / "t5")  # absolute: usable from anywhere
    assert saved["data"]["train_files"] == str(tiny["root"] / "codes" / "*.array_record")
    assert export_step(run) == 2
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[train] step 2")]
    assert lines and lines[0].startswith("[train] step 2 2/2 (100%), ETA 0s: loss=") and len(lines[0]) < 120

    # Continuing the finished run to more steps rewrites its export.
    train.train_and_evaluate(relative_train_config(4), "rel_run")
    assert export_step(run) == 4

    # Every entry point takes the relative workdir as a model source and relative outputs.
    model = MAGNeT.from_pretrained("rel_run")
    assert model.config["provenance"]["step"] == 4
    assert convert.convert("rel_run", "converted") == tiny["root"] / "converted"
    assert json.loads((tiny["root"] / "converted" / "config.json").read_text())["provenance"]["step"] == 4
    Path("prompts.txt").write_text("calm piano\n")
    config = generate_config.get_config("source=rel_run,duration=1")
    config.generate.decoding_steps = (2, 2, 2, 2)
    summary = generate.run(config, "prompts.txt", "samples", model=model)
    assert summary["finished"] == 1 and (tiny["root"] / "samples" / "line00001-0.wav").is_file()
    assert json.loads((tiny["root"] / "samples" / "job.json").read_text())["source"] == str(run)


def test_path_helpers_resolve_user_paths_and_keep_hub_ids_and_urls(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "facebook").mkdir()
    assert absolute_path("out/x") == str(tmp_path / "out" / "x")
    assert absolute_path("~/x") == os.path.join(os.path.expanduser("~"), "x")
    assert absolute_path("gs://bucket/run") == "gs://bucket/run" and absolute_path("") == ""
    assert local_source("facebook/magnet-small-10secs") == "facebook/magnet-small-10secs"  # not a local path
    assert local_source("./facebook/magnet-small-10secs") == str(tmp_path / "facebook" / "magnet-small-10secs")
    assert local_source("facebook") == str(tmp_path / "facebook")


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("lr", -1.0, "optim.lr=-1.0: expected > 0"),
        ("lr", 0.0, "optim.lr=0.0: expected > 0"),
        ("b2", 1.0, r"optim.b2=1.0: expected in \[0, 1\)"),
        ("ema_every", 0, "optim.ema_every=0: expected >= 1"),
        ("clip_norm", -1.0, "optim.clip_norm=-1.0: expected >= 0"),
    ],
)
def test_optimizer_fields_out_of_range_are_refused(field, value, expected):
    c = get_config("size=tiny")
    c.optim[field] = value
    with pytest.raises(ValueError, match=expected):
        optim.make_optimizer(c.optim)


def test_a_run_shorter_than_the_preset_warm_up_names_the_field_to_set():
    c = get_config("size=tiny")
    c.train.num_steps = 20  # the tiny preset warms up for 20 steps
    with pytest.raises(ValueError, match=r"train.num_steps=20\): set --config.optim.warmup_steps below it, e.g. "):
        optim.make_optimizer(c.optim)
    c.optim.warmup_steps = 2
    optim.make_optimizer(c.optim)


def test_convert_takes_a_workdir_stopped_before_its_first_checkpoint(tiny, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(get_config("size=tiny").to_dict()))
    with pytest.raises(WeightsError, match=f"training workdir {run}: no params export and no checkpoint"):
        convert.convert(str(run), str(tmp_path / "out"))


def test_unwritable_outputs_are_refused_before_the_model_loads(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    config = generate_config.get_config(f"source={tmp_path / 'no_model'}")
    (tmp_path / "p.txt").write_text("calm piano\n")
    with pytest.raises(generate.JobError, match=f"--output_dir {blocker}: exists and is not a directory"):
        generate.run(config, tmp_path / "p.txt", blocker)
    with pytest.raises(WeightsError, match=f"--dst {blocker / 'x'}: {blocker} is a file, not a directory"):
        convert.convert(str(tmp_path / "no_model"), str(blocker / "x"))
    with pytest.raises(train.SetupError, match=f"--workdir {blocker}: exists and is not a directory"):
        train.train_and_evaluate(get_config("size=tiny"), str(blocker))


def test_an_unreachable_hub_fails_in_seconds_and_names_hf_hub_offline(tmp_path):
    script = (
        "import time; from magnet_jax.fileio import resolve_file, WeightsError\n"
        "t = time.perf_counter()\n"
        "try:\n    resolve_file('facebook/magnet-small-10secs', 'state_dict.bin', what='LM weights')\n"
        "except WeightsError as e:\n    print(f'{time.perf_counter() - t:.2f}'); print(e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE" and "PROXY" not in k.upper()}
    env.update(HF_ENDPOINT="https://hub.invalid", HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    seconds, message = r.stdout.splitlines()
    assert float(seconds) < 6, seconds
    assert "not in the local cache (the hub cannot be used: hub.invalid:443 is unreachable" in message
    assert "HF_HUB_OFFLINE=1" in message


def test_progress_note_shows_steps_percent_and_eta():
    assert metrics.progress_note(40, 300, 0.5) == " 40/300 (13%), ETA 2m10s"
    assert metrics.progress_note(1, 10, None) == " 1/10 (10%)"
    assert metrics.format_duration(3725) == "1h02m"


def test_data_pipeline_entry_points_print_no_library_chatter(tmp_path):
    synthetic_corpus.generate_corpus(tmp_path / "corpus", num_clips=1, seconds=1.0, seed=0)  # too short to fit
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "data_pipelines.make_tiny_assets",
            f"--corpus={tmp_path}/corpus",
            f"--output={tmp_path}/a",
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1
    assert (r.stdout + r.stderr).strip().splitlines() == [
        "make_tiny_assets: 50 latent frames cannot fit 64 codebook entries: need at least 128 (longer or more "
        "calibration audio)"
    ]
