"""The batch generation job under fault injection, on a tiny local model and real files: damaged or deleted WAVs,
duplicate manifest lines, a prompt changed under an existing id, a second job on a locked output dir, and a job
pinned to the checkpoint step of a training workdir that keeps training."""

import json
import os
import shutil
import socket

import jax
import numpy as np
import pytest

from configs import magnet
from configs.generate import get_config
from magnet_jax.api import MAGNeT
from magnet_jax.checkpoints.sources import load_lm
from magnet_jax.fileio import LOCK_FILE, WeightsError, verify_checksums
from magnet_jax.generate import JobError, run
from magnet_jax.training import checkpointing, train_lib


@pytest.fixture(scope="module")
def config(tiny):
    c = get_config(f"source={tiny['lm']},duration=1")
    c.generate.decoding_steps = (2, 2, 2, 2)
    c.batch_size = 8
    c.lock()
    return c


@pytest.fixture(scope="module")
def model(config):
    return MAGNeT(*load_lm(config.source), config)


def manifest(out):
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_a_damaged_or_deleted_wav_is_made_again_with_one_manifest_line_per_id(config, model, tmp_path):
    out, prompts = tmp_path / "out", tmp_path / "p.txt"
    prompts.write_text("rock anthem\ncalm piano\nfast drums\n")
    run(config, prompts, out, model=model)
    first = {r["id"]: r for r in manifest(out)}
    assert all(r["checksums"][r["file"]]["size"] == (out / r["file"]).stat().st_size for r in first.values())
    original = (out / "line00001-0.wav").read_bytes()
    (out / "line00001-0.wav").write_bytes(original[:1000])  # truncated, header intact
    (out / "line00002-0.wav").unlink()
    damaged = bytearray((out / "line00003-0.wav").read_bytes())
    damaged[-10] ^= 0xFF  # one sample changed: the size still matches
    (out / "line00003-0.wav").write_bytes(bytes(damaged))

    summary = run(config, prompts, out, model=model)
    assert (summary["generated"], summary["finished"]) == (3, 3)
    records = manifest(out)
    assert sorted(r["id"] for r in records) == ["line00001-0", "line00002-0", "line00003-0"]  # one line each
    assert (out / "line00001-0.wav").read_bytes() == original  # regenerated bit for bit
    again = run(config, prompts, out, model=model)
    assert again["generated"] == 0 and len(manifest(out)) == 3


def test_a_prompt_changed_under_an_existing_id_is_refused_in_one_line(config, model, tmp_path):
    out, prompts = tmp_path / "out", tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "intro", "text": "rock anthem"}) + "\n")
    run(config, prompts, out, model=model)
    prompts.write_text(json.dumps({"id": "intro", "text": "string quartet"}) + "\n")
    with pytest.raises(JobError) as refused:
        run(config, prompts, out, model=model)
    assert str(refused.value) == (
        f"{prompts}:1: sample 'intro-0' was generated from another prompt (text 'rock anthem', audio prompt None, "
        "seed 0); give the changed prompt a new id or use another output directory"
    )
    assert [r["text"] for r in manifest(out)] == ["rock anthem"]


def test_a_second_job_on_a_locked_output_dir_is_refused_and_a_stale_lock_taken_over(config, model, tmp_path):
    out, prompts = tmp_path / "out", tmp_path / "p.txt"
    prompts.write_text("rock anthem\n")
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid(), "since": "now"}))
    with pytest.raises(JobError, match=rf"{out} is in use by another job \(pid {os.getppid()} on this host"):
        run(config, prompts, out, model=model)
    assert not (out / "manifest.jsonl").exists()
    (out / LOCK_FILE).write_text(json.dumps({"host": "other-host", "pid": 1, "since": "now"}))
    with pytest.raises(JobError, match="pass --force_unlock if that job is gone"):
        run(config, prompts, out, model=model)
    assert run(config, prompts, out, model=model, force_unlock=True)["finished"] == 1
    assert not (out / LOCK_FILE).exists()


def training_workdir(tiny, tmp_path):
    """A training workdir (config.json, orbax checkpoints) of an untrained tiny run with checkpoint step 5."""
    train_config = magnet.get_config("size=tiny,duration=1")
    train_config.conditioner.t5, train_config.codec.source = str(tiny["t5"]), str(tiny["codec"])
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps(checkpointing.config_to_json(train_config)))
    return workdir, train_config


def save_step(workdir, train_config, step, seed):
    ckpt = checkpointing.Checkpointer(str(workdir / "checkpoints"), train_config.checkpoint)
    ckpt.save(step, train_lib.create_train_state(train_config, jax.random.key(seed)), None, train_config, force=True)
    ckpt.close()


def test_a_job_from_a_training_workdir_stays_on_its_pinned_checkpoint_step(tiny, tmp_path):
    workdir, train_config = training_workdir(tiny, tmp_path)
    save_step(workdir, train_config, 5, seed=1)
    c = get_config(f"source={workdir},duration=1")
    c.generate.decoding_steps = (2, 2, 2, 2)
    out, prompts = tmp_path / "out", tmp_path / "p.txt"
    prompts.write_text("rock anthem\n")
    run(c, prompts, out)
    digest = verify_checksums(workdir / "checkpoints" / "5")
    pin = {"item": "checkpoints/5", "step": 5, "checksum": digest}
    assert json.loads((out / "job.json").read_text())["source_pin"] == pin
    assert manifest(out)[0]["source_pin"] == pin

    save_step(workdir, train_config, 6, seed=2)  # the trainer moves on; the job does not
    prompts.write_text("rock anthem\ncalm piano\n")
    assert run(c, prompts, out)["generated"] == 1
    assert [r["source_pin"] for r in manifest(out)] == [pin, pin]

    shutil.rmtree(workdir / "checkpoints" / "5")  # retention removed the pinned step: refuse, never mix
    prompts.write_text("rock anthem\ncalm piano\nfast drums\n")
    with pytest.raises(WeightsError, match=r"checkpoint step 5 is gone \(steps now: \[6\]\)"):
        run(c, prompts, out)
    assert len(manifest(out)) == 2
    assert np.all([r["source_pin"]["step"] == 5 for r in manifest(out)])
