"""Batch offline generation job (`magnet_jax.generate`) on a tiny locally created model and real files.

The prompts, audio prompt, WAVs, codes, manifest and job.json are real files in tmp dirs; generation runs sharded
over the 8 simulated CPU devices of conftest.py.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import soundfile as sf

from configs import magnet
from configs.generate import get_config
from magnet_jax import fileio
from magnet_jax.api import MAGNeT
from magnet_jax.checkpoints.sources import load_lm
from magnet_jax.fileio import WeightsError
from magnet_jax.generate import JobError, Manifest, read_prompts, run
from magnet_jax.training import train_lib

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def config(tiny):
    c = get_config(f"source={tiny['lm']},duration=1")
    c.generate.decoding_steps = (2, 2, 2, 2)
    c.output.write_codes = True
    c.lock()
    return c


@pytest.fixture(scope="module")
def model(config):
    return MAGNeT(*load_lm(config.source), config)


@pytest.fixture(scope="module")
def prompts(tiny):
    """9 valid samples (one continuation of a 0.3 s 44.1 kHz stereo clip) and 4 malformed lines."""
    d = tiny["root"] / "prompts"
    d.mkdir()
    rng = np.random.default_rng(0)
    sf.write(d / "intro.wav", 0.2 * rng.standard_normal((13230, 2)), 44100)
    lines = [
        {"text": "a calm piano piece", "seed": 1, "num_samples": 3},
        {"text": "fast techno with drums", "seed": 2},
        "{broken json",
        {"text": "jazz trio", "audio": "intro.wav", "seed": 3, "id": "jazz"},
        {"txt": "a typo in the key"},
        {"text": None, "seed": 4},
        {"text": "slow blues", "seed": -1},
        {"text": "ambient pads", "seed": 5, "num_samples": 2},
        {"text": "missing prompt", "audio": "nowhere.wav"},
        {"text": "a calm piano piece", "seed": 1},
    ]
    path = d / "prompts.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def codes_by_id(directory: Path) -> dict[str, np.ndarray]:
    return {p.stem: np.load(p) for p in directory.glob("*.npy")}


def test_malformed_lines_are_reported_with_their_line_numbers(prompts):
    valid, errors = read_prompts(prompts, seed=0, num_samples=1)
    assert [p.line for p in valid] == [1, 2, 4, 6, 8, 10]
    assert [e.split(": ", 1)[0] for e in errors] == [f"{prompts}:{n}" for n in (3, 5, 7, 9)]
    assert "not valid JSON" in errors[0] and "unknown key(s) 'txt'" in errors[1]
    assert "'seed' must be an integer in [0, 2**32)" in errors[2] and "nowhere.wav does not exist" in errors[3]
    jazz = valid[2]
    assert (jazz.id, jazz.audio, jazz.seed, jazz.num_samples) == ("jazz", str(prompts.parent / "intro.wav"), 3, 1)
    assert valid[3].text is None and valid[0].id == "line00001"


def test_txt_prompts_and_empty_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("# comment\nrock anthem\n\n  lo-fi beat  \n")
    valid, errors = read_prompts(txt, seed=9, num_samples=2)
    assert [(p.line, p.text, p.seed, p.num_samples) for p in valid] == [
        (2, "rock anthem", 9, 2),
        (4, "lo-fi beat", 9, 2),
    ]
    assert errors == []
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(JobError, match="no valid prompt"):
        read_prompts(tmp_path / "empty.jsonl", seed=0, num_samples=1)
    with pytest.raises(JobError, match="expected a .txt or .jsonl"):
        read_prompts(tmp_path / "p.csv", seed=0, num_samples=1)


def test_job_writes_every_sample_and_a_complete_manifest(config, model, prompts, tmp_path):
    out = tmp_path / "out"
    summary = run(config, prompts, out, model=model)
    assert (summary["samples"], summary["finished"], summary["generated"]) == (9, 9, 9)
    assert len(summary["malformed_lines"]) == 4
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in records) == sorted(
        [
            "line00001-0",
            "line00001-1",
            "line00001-2",
            "line00002-0",
            "jazz-0",
            "line00006-0",
            "line00008-0",
            "line00008-1",
            "line00010-0",
        ]
    )
    jazz = next(r for r in records if r["id"] == "jazz-0")
    assert (jazz["line"], jazz["text"], jazz["seed"], jazz["prompt_frames"]) == (4, "jazz trio", 3, 15)
    assert jazz["audio_prompt"] == str(prompts.parent / "intro.wav")
    for r in records:
        assert r["params"]["decoding_steps"] == [2, 2, 2, 2] and r["params"]["top_p"] == 0.9
        assert r["model"] == config.source and r["frames"] == 48 and r["sample_rate"] == 32000
        assert r["objective"] == "magnet"
        assert r["timing"]["batch_seconds"] > 0 and 1 <= r["timing"]["batch_rows"] <= config.batch_size
        wav, sr = sf.read(out / r["file"], dtype="float32")
        assert sr == 32000 and wav.shape == (48 * 640,) and np.abs(wav).max() > 1e-3
        codes = np.load(out / r["codes_file"])
        assert codes.shape == (4, 48) and codes.dtype == np.int16 and len(np.unique(codes)) > 8
    job = json.loads((out / "job.json").read_text())
    assert job["generate"]["decoding_steps"] == [2, 2, 2, 2] and job["objective"] == "magnet"
    assert not list(out.glob(".tmp-*"))

    # Determinism: a sample is a function of its prompt, seed and index only.
    codes = codes_by_id(out)
    np.testing.assert_array_equal(codes["line00010-0"], codes["line00001-0"])  # same text and seed, other line
    assert not np.array_equal(codes["line00001-1"], codes["line00001-0"])
    np.testing.assert_array_equal(
        codes["jazz-0"][:, :15],
        model.encode_audio(sf.read(prompts.parent / "intro.wav", dtype="float32")[0].T[None], 44100)[0],
    )

    again = run(config, prompts, tmp_path / "again", model=model)
    assert again["generated"] == 9
    for name, c in codes_by_id(tmp_path / "again").items():
        np.testing.assert_array_equal(c, codes[name], err_msg=name)
    assert (tmp_path / "again" / "jazz-0.wav").read_bytes() == (out / "jazz-0.wav").read_bytes()


class Interrupt(RuntimeError):
    pass


def test_restart_after_a_crash_skips_finished_samples_and_leaves_no_partial_file(
    config, model, prompts, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    replace, calls = os.replace, []

    def crash_in_second_batch(src, dst):  # job.json, 16 files of the first batch, then dies in the second
        calls.append(dst)
        if len(calls) == 19:
            raise Interrupt("killed")
        replace(src, dst)

    monkeypatch.setattr(fileio.os, "replace", crash_in_second_batch)
    with pytest.raises(Interrupt):
        run(config, prompts, out, model=model)
    monkeypatch.setattr(fileio.os, "replace", replace)

    first = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(first) == 8  # the first batch finished; the second did not reach its manifest lines
    assert not list(out.glob(".tmp-*"))  # the interrupted write removed its temporary file
    for wav in out.glob("*.wav"):  # every file under a final name is complete
        assert sf.info(wav).frames == 48 * 640
    (out / ".tmp-otherhost-123-line00008-0.wav").write_bytes(b"RIFF")  # what a kill -9 mid-write leaves
    with open(out / "manifest.jsonl", "a") as f:  # and a manifest line cut short by the crash
        f.write('{"id": "line00008-0", "file": "line0')
    mtimes = {r["id"]: (out / r["file"]).stat().st_mtime_ns for r in first}

    summary = run(config, prompts, out, model=model)
    assert (summary["generated"], summary["finished"]) == (1, 9)
    assert not list(out.glob(".tmp-*"))
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in records) == sorted({r["id"] for r in records}) and len(records) == 9
    assert {r["id"]: (out / r["file"]).stat().st_mtime_ns for r in first} == mtimes  # not regenerated

    uninterrupted = tmp_path / "uninterrupted"
    run(config, prompts, uninterrupted, model=model)
    reference = codes_by_id(uninterrupted)
    assert codes_by_id(out).keys() == reference.keys()
    for name, c in codes_by_id(out).items():
        np.testing.assert_array_equal(c, reference[name], err_msg=name)


def test_other_settings_are_refused(config, model, tmp_path):
    out, prompts = tmp_path / "out", tmp_path / "p.txt"
    prompts.write_text("rock anthem\n")
    run(config, prompts, out, model=model)  # a changed prompt: tests/test_generate_faults.py

    other = config.copy_and_resolve_references()
    other.generate.top_p = 0.5
    with pytest.raises(JobError, match=r"other settings \(generate.top_p: 0.9 -> 0.5\)"):
        run(other, prompts, out, model=model)


def test_manifest_keeps_complete_lines_and_rejects_damage(tmp_path):
    path = tmp_path / "manifest.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c", "fi')
    assert list(Manifest(path, repair=True).records) == ["a", "b"]
    assert path.read_text() == '{"id": "a"}\n{"id": "b"}\n'
    path.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(JobError, match="manifest.jsonl:2: not a manifest record"):
        Manifest(path, repair=True)


def test_cli_reports_bad_input_in_one_line_with_exit_code_2(tiny, tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    missing = subprocess.run(
        [
            sys.executable,
            "-m",
            "magnet_jax.generate",
            f"--config=configs/generate.py:source={tiny['lm']}",
            f"--prompts={tmp_path / 'nothing.jsonl'}",
            f"--output_dir={tmp_path / 'out'}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines()[-1].startswith("generate: error: prompts file")
    typo = subprocess.run(
        [
            sys.executable,
            "-m",
            "magnet_jax.generate",
            "--config=configs/generate.py",
            "--config.generate.top_q=1",
            "--prompts=x.txt",
            f"--output_dir={tmp_path / 'out'}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert typo.returncode == 2 and "unknown config key" in typo.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "arg,steps,temperature",
    [("", [20, 10, 10, 10], 3.0), ("duration=30", [60, 10, 10, 10], 3.0), ("task=sound", [20, 10, 10, 10], 3.5)],
)
def test_generation_defaults_are_the_released_models(arg, steps, temperature):
    c = get_config(arg)
    assert c.source == "facebook/magnet-small-10secs"
    assert (list(c.generate.decoding_steps), c.generate.temperature) == (steps, temperature)
    assert c.generate.duration == (30.0 if "30" in arg else 10.0)
    c.lock()
    c.generate.decoding_steps = (3, 3, 3, 3)  # a tuple field: overridable from the command line
    with pytest.raises(AttributeError):
        c.generate.top_q = 0.5


def test_job_generates_beyond_the_training_window_like_the_api(config, model, tmp_path):
    c = config.copy_and_resolve_references()
    c.generate.duration, c.generate.extend_stride = 2.2, 0.6  # 108 frames: windows of 48, each 30 new frames
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"text": "rock anthem", "seed": 4, "num_samples": 2}) + "\n")
    try:
        summary = run(c, prompts, tmp_path / "out", model=model)
        expected = model.generate(["rock anthem", "rock anthem"], seed=4).codes  # sample j = row j, key (seed, j)
    finally:
        model.set_generation_params(**config.generate)
    assert summary["finished"] == 2
    records = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert all(r["frames"] == 108 and r["duration"] == 108 / 50 for r in records)
    assert all((r["params"]["duration"], r["params"]["extend_stride"]) == (2.2, 0.6) for r in records)
    assert json.loads((tmp_path / "out" / "job.json").read_text())["generate"]["extend_stride"] == 0.6
    codes = codes_by_id(tmp_path / "out")
    for j in range(2):
        np.testing.assert_array_equal(codes[f"line00001-{j}"], expected[j])
        assert sf.info(tmp_path / "out" / f"line00001-{j}.wav").frames == 108 * 640


def test_job_with_a_transformers_musicgen_rescorer_and_ar_prefix_matches_the_api(config, tiny, tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import MusicgenDecoderConfig, MusicgenForCausalLM

    torch.manual_seed(0)  # a tiny MusicGen in the transformers format: 4 codebooks of 64, T5 width 32
    MusicgenForCausalLM(
        MusicgenDecoderConfig(
            vocab_size=64,
            num_codebooks=4,
            hidden_size=32,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            pad_token_id=64,
            bos_token_id=64,
            decoder_start_token_id=64,
        )
    ).save_pretrained(tmp_path / "musicgen")
    c = config.copy_and_resolve_references()
    c.rescorer = c.ar_model = str(tmp_path / "musicgen")
    c.generate.rescore_weight, c.generate.rescore_mode, c.generate.prefix_seconds = 0.5, "sample", 0.2
    c.num_samples = 2
    model = MAGNeT(*load_lm(c.source), c)
    assert model.rescorer is model.ar_model
    prompts = tmp_path / "p.txt"
    prompts.write_text("rock anthem\n")
    summary = run(c, prompts, tmp_path / "out", model=model)
    assert summary["finished"] == 2
    records = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert all(r["rescorer"] == r["ar_model"] == c.rescorer for r in records)
    assert all(r["params"]["rescore_weight"] == 0.5 and r["params"]["prefix_seconds"] == 0.2 for r in records)
    assert all(r["params"]["rescore_mode"] == "sample" for r in records)
    expected = model.generate(["rock anthem", "rock anthem"], seed=0).codes  # sample j = row j, key (seed, j)
    codes = codes_by_id(tmp_path / "out")
    for j in range(2):
        np.testing.assert_array_equal(codes[f"line00001-{j}"], expected[j])
    assert not np.array_equal(expected[0, :, :10], expected[1, :, :10])  # sampled prefixes, one key per sample

    plain = config.copy_and_resolve_references()
    plain.generate.prefix_seconds = 0.2
    with pytest.raises(JobError, match="config.generate: prefix_seconds=0.2: needs an AR model"):
        run(plain, prompts, tmp_path / "plain", model=MAGNeT(*load_lm(plain.source), plain))


def test_job_with_a_hybrid_training_workdir_generates_its_prefix_and_records_the_objective(tiny, prompts, tmp_path):
    train_config = magnet.get_config("size=tiny,duration=1,objective=hybrid")  # an untrained Hybrid-MAGNeT run
    train_config.conditioner.t5, train_config.codec.source = str(tiny["t5"]), str(tiny["codec"])
    workdir = tmp_path / "run"
    train_lib.export_params(
        train_lib.create_train_state(train_config, jax.random.key(3)), str(workdir / "export"), train_config
    )
    c = get_config(f"source={workdir},duration=1")
    c.generate.decoding_steps, c.generate.prefix_seconds = (2, 2, 2, 2), 0.2
    c.output.write_codes = True
    model = MAGNeT(*load_lm(c.source), c)
    lines = tmp_path / "p.jsonl"
    lines.write_text(
        json.dumps({"text": "rock anthem", "num_samples": 2})
        + "\n"
        + json.dumps({"text": "jazz trio", "audio": str(prompts.parent / "intro.wav")})
        + "\n"
    )
    summary = run(c, lines, tmp_path / "out", model=model)
    assert (summary["samples"], summary["finished"]) == (3, 2)
    assert summary["malformed_lines"] == [
        f"{lines}:2: audio prompt {prompts.parent / 'intro.wav'}: not supported with a Hybrid-MAGNeT model"
    ]
    assert json.loads((tmp_path / "out" / "job.json").read_text())["objective"] == "hybrid"
    records = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert [(r["objective"], r["params"]["prefix_seconds"]) for r in records] == [("hybrid", 0.2)] * 2
    expected = model.generate(["rock anthem", "rock anthem"], seed=0).codes  # the API's hybrid generation
    codes = codes_by_id(tmp_path / "out")
    for j in range(2):
        np.testing.assert_array_equal(codes[f"line00001-{j}"], expected[j])
    assert expected.shape == (2, 4, 48) and len(np.unique(expected)) > 8
    assert not np.array_equal(expected[0, :, :6], expected[1, :, :6])  # sampled prefixes, one key per sample

    bad = c.copy_and_resolve_references()
    bad.ar_model = str(tiny["lm"])
    with pytest.raises(WeightsError, match="Hybrid-MAGNeT model .*rescorer and ar_model are not supported"):
        run(bad, lines, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
