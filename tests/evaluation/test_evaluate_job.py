"""The evaluation job (`magnet_jax.evaluate`) end to end on real files: a random 6 s tiny MAGNeT generates from a
MusicCaps-style CSV through the generation job, and random-weight embedders written in the released formats
(torchvggish's full VGGish, a small hear21passt PaSST, a small LAION-CLAP checkpoint and a BPE tokenizer) score
the samples against a synthesized reference set. The numbers are meaningless; the pipeline is the real one."""

import csv
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from configs import magnet
from configs.evaluate import get_config
from data_pipelines.make_tiny_assets import make_random_lm
from data_pipelines.synthetic_corpus import generate_corpus
from magnet_jax import evaluate
from magnet_jax.data.audio import AudioError, audio_files, read_audio
from magnet_jax.data.records import CodeRecord
from magnet_jax.evaluation import clap, clap_audio, passt, scoring, vggish
from magnet_jax.evaluation.captions import CaptionError
from magnet_jax.evaluation.clap_text import RobertaConfig, load_clap_tokenizer
from magnet_jax.evaluation.metrics import (
    StatisticsError,
    embedding_statistics,
    frechet_distance,
    kl_divergence,
    vggish_embeddings,
)
from magnet_jax.fileio import WeightsError
from magnet_jax.train import SetupError, train_and_evaluate
from references import clap as clap_reference
from references.evaluation_tools import write_random_clap, write_random_passt

REPO = Path(__file__).resolve().parents[2]
SECONDS = 6.0
SMALL_PASST = dataclasses.replace(passt.PASST_20S, embed_dim=32, depth=1, num_heads=2, time_positions=60, max_seconds=6)
SMALL_CLAP = clap.ClapConfig(
    audio=clap_audio.HtsatConfig(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4)),
    text=RobertaConfig(vocab_size=400, num_layers=1),
)
MUSICCAPS_HEADER = (
    "ytid,start_s,end_s,audioset_positive_labels,aspect_list,caption,author_id,is_balanced_subset,is_audioset_eval"
)


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny):
    """12 reference clips of 6 s at 32 kHz (one with a YouTube-style id starting with '-'; 12 x 11 VGGish windows,
    just above FAD's 128), a MusicCaps-style CSV of 6 of their captions, and a random tiny MAGNeT of 6 s segments."""
    root = tmp_path_factory.mktemp("evaluate")
    reference = root / "reference"
    paths = generate_corpus(reference, num_clips=12, seconds=SECONDS, seed=5)
    dashed = paths[0].with_name("-Ab3_x.wav")
    paths[0].rename(dashed)
    paths[0] = dashed
    for sidecar in reference.glob("*.json"):
        sidecar.unlink()
    rows = [MUSICCAPS_HEADER]
    for i, path in enumerate(paths[:6]):
        caption = f"a synthesized piece number {i}, with chords, tempo and timbre"
        rows.append(f'{path.stem},30,40,"/m/04rlf","[\'synth\']","{caption}",4,False,True')
    (root / "musiccaps.csv").write_text("\n".join(rows) + "\n")
    lm = make_random_lm(root / "lm", {k: tiny[k] for k in ("codec", "t5")}, segment_seconds=SECONDS)
    return {"root": root, "reference": reference, "csv": root / "musiccaps.csv", "lm": lm}


@pytest.fixture(scope="module")
def weights(torch_vggish, tmp_path_factory, data):
    root = tmp_path_factory.mktemp("eval_weights")
    captions = [r["caption"] for r in csv.DictReader(data["csv"].open())]
    return {
        "vggish": torch_vggish[1],
        "passt": write_random_passt(root / "passt-s-f128-20sec-p16-s10-ap.474-swa.pt", SMALL_PASST, seed=1),
        "clap": write_random_clap(root / clap.CHECKPOINT_NAME, SMALL_CLAP, seed=2),
        "tokenizer": clap_reference.write_tokenizer(root / "roberta", captions * 4, 400),
    }


def set_embedders(c, weights):
    """Points an embedder section (`scoring.embedder_config`) at the random weights and their architectures."""
    c.vggish.weights = str(weights["vggish"])
    c.passt.weights = str(weights["passt"])
    c.passt.model.update(dataclasses.asdict(SMALL_PASST))
    c.clap.weights = str(weights["clap"])
    c.clap.tokenizer = str(weights["tokenizer"])
    c.clap.audio.update(dataclasses.asdict(SMALL_CLAP.audio))
    c.clap.text.update(dataclasses.asdict(SMALL_CLAP.text))
    return c


def make_config(weights, metrics="fad+kl+clap"):
    c = set_embedders(get_config(f"metrics={metrics},duration={SECONDS}"), weights)
    c.generation.flags = ("--config.generate.decoding_steps=(2,2,2,2)", "--config.num_samples=2")
    return c


@pytest.fixture(scope="module")
def generated(data, weights):
    """The job run on the model source: it generates 12 samples (6 prompts x 2) with the generation job, then
    scores them; (output dir, metrics)."""
    out = data["root"] / "out"
    result = evaluate.run(make_config(weights), str(data["csv"]), str(data["reference"]), str(data["lm"]), str(out))
    return out, result


def test_generates_from_a_model_and_writes_metrics_and_table(generated, data):
    out, result = generated
    stored = json.loads((out / evaluate.METRICS_FILE).read_text())
    assert stored == json.loads(json.dumps(result))
    assert result["counts"] == {
        "prompts": 6,
        "samples": 12,
        "reference_files": 12,
        "fad_windows": 12 * 11,
        "kl_segment_pairs": 12,
        "kl_samples_without_reference": 0,
    }
    assert result["fad"] > 0 and result["kl"] > 0 and result["kl_qp"] > 0 and -1 <= result["clap"] <= 1
    table = list(csv.DictReader((out / evaluate.TABLE_FILE).open()))
    assert len(table) == 12 and {r["prompt_id"] for r in table} >= {"-Ab3_x"}
    assert table[0]["id"] == "yt-Ab3_x-0" and table[0]["file"] == "yt-Ab3_x-0.wav"
    assert np.mean([float(r["clap"]) for r in table]) == pytest.approx(result["clap"], rel=1e-12)
    assert np.mean([float(r["kl"]) for r in table]) == pytest.approx(result["kl"], rel=1e-12)
    assert (out / "samples" / "manifest.jsonl").is_file() and (out / evaluate.REFERENCE_FILE).is_file()


def test_metrics_equal_the_embedders_applied_directly(generated, data, weights):
    """The job's numbers from its cached embeddings and from the public embedding functions applied to four
    samples and their reference clips (no cache, no sharding, no pairing code of the job)."""
    out, result = generated
    cache = {kind: out / "embeddings" / kind / "vggish" for kind in ("reference", "samples")}
    statistics = [
        embedding_statistics(np.concatenate([np.load(p)["embedding"] for p in sorted(cache[kind].glob("*.npz"))]))
        for kind in ("reference", "samples")
    ]
    assert len(list(cache["reference"].glob("*.npz"))) == len(list(cache["samples"].glob("*.npz"))) == 12
    assert result["fad"] == pytest.approx(frechet_distance(*statistics[0], *statistics[1]), rel=1e-9)
    vggish_params = vggish.load_vggish(weights["vggish"])
    pairs = [
        (data["reference"] / "-Ab3_x.wav", cache["reference"] / "-Ab3_x.wav.npz"),
        (out / "samples" / "yt-Ab3_x-1.wav", cache["samples"] / "yt-Ab3_x-1.npz"),
    ]
    direct = vggish_embeddings(vggish_params, [p for p, _ in pairs], batch_size=8).reshape(2, 11, 128)
    for (_, entry), windows in zip(pairs, direct):
        cached = np.load(entry)["embedding"]
        assert np.abs(cached - windows).max() <= 1e-5 * np.abs(windows).max()

    table = list(csv.DictReader((out / evaluate.TABLE_FILE).open()))[:4]
    mono = [read_audio(out / "samples" / row["file"])[0].mean(axis=0) for row in table]
    ref_mono = [read_audio(data["reference"] / f"{row['prompt_id']}.wav")[0].mean(axis=0) for row in table]
    probs = passt.passt_label_probs(
        passt.load_passt(weights["passt"], SMALL_PASST),
        np.stack(ref_mono + mono),
        32_000,
        config=SMALL_PASST,
        batch_size=8,
    ).probs  # one segment per clip
    np.testing.assert_allclose([float(r["kl"]) for r in table], kl_divergence(probs[:4], probs[4:]), rtol=1e-5)

    clap_params = clap.load_clap(weights["clap"], SMALL_CLAP)
    scores, _ = clap.clap_score(
        clap.embed_audio(clap_params, np.stack(mono), 32_000, config=SMALL_CLAP),
        clap.embed_text(
            clap_params, load_clap_tokenizer(weights["tokenizer"]), [r["text"] for r in table], config=SMALL_CLAP
        ),
    )
    np.testing.assert_allclose([float(r["clap"]) for r in table], scores, rtol=1e-5)


def test_reference_statistics_file_gives_the_same_metrics(generated, weights, data, tmp_path):
    out, result = generated
    samples = str(out / "samples")
    again = evaluate.run(
        make_config(weights, "fad+kl"),
        str(data["csv"]),
        str(out / evaluate.REFERENCE_FILE),
        samples,
        str(tmp_path / "a"),
    )
    assert again["fad"] == pytest.approx(result["fad"], rel=1e-12) and again["kl"] == pytest.approx(
        result["kl"], rel=1e-12
    )
    clap_only = evaluate.run(make_config(weights, "clap"), str(data["csv"]), "", samples, str(tmp_path / "b"))
    assert clap_only["clap"] == pytest.approx(result["clap"], rel=1e-6) and "fad" not in clap_only


def test_resumes_after_kill_9_with_the_result_of_an_uninterrupted_run(generated, data, weights, tmp_path):
    out, result = generated
    config_flags = [f"--config.{k}={v}" for k, v in _flag_overrides(weights).items()]
    command = [
        sys.executable, "-m", "magnet_jax.evaluate", f"--config={REPO / 'configs' / 'evaluate.py'}:metrics=fad+kl",
        *config_flags, f"--prompts={data['csv']}", f"--reference_audio={data['reference']}",
        f"--samples={out / 'samples'}", f"--output_dir={tmp_path}", "--config.batch_size=8",
    ]  # fmt: skip
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    cache = tmp_path / "embeddings" / "reference" / "vggish"
    deadline = time.monotonic() + 240
    while not list(cache.glob("*.npz")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stderr.close()
    done_before = len(list((tmp_path / "embeddings").rglob("*.npz")))
    assert 0 < done_before < 12 + 6 + 12 * 2  # some entries cached (reference: VGGish 12, PaSST 6), not all
    assert not (tmp_path / evaluate.METRICS_FILE).exists()

    resumed = evaluate.run(
        make_config(weights, "fad+kl"), str(data["csv"]), str(data["reference"]), str(out / "samples"), str(tmp_path)
    )
    assert resumed["counts"] == result["counts"]
    for key in ("fad", "kl", "kl_qp"):
        assert resumed[key] == pytest.approx(result[key], rel=1e-6), key
    tables = [list(csv.DictReader((d / evaluate.TABLE_FILE).open())) for d in (tmp_path, out)]
    assert [r["id"] for r in tables[0]] == [r["id"] for r in tables[1]]
    for column in ("kl", "vggish_windows"):
        np.testing.assert_allclose(*[[float(r[column]) for r in t] for t in tables], rtol=1e-6)
    assert not [p for p in tmp_path.rglob(".tmp-*")]


def _flag_overrides(weights) -> dict:
    return {
        "vggish.weights": weights["vggish"],
        "passt.weights": weights["passt"],
        "passt.model.embed_dim": SMALL_PASST.embed_dim,
        "passt.model.depth": SMALL_PASST.depth,
        "passt.model.num_heads": SMALL_PASST.num_heads,
        "passt.model.time_positions": SMALL_PASST.time_positions,
        "passt.model.max_seconds": SMALL_PASST.max_seconds,
    }


def test_bad_inputs_are_one_line_errors(generated, data, weights, tmp_path):
    out, _ = generated
    samples, csv_path, reference = str(out / "samples"), str(data["csv"]), str(data["reference"])

    def fails(error, match, config=None, prompts=csv_path, ref=reference):
        target = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        shutil.copytree(out / "embeddings" / "samples", target / "embeddings" / "samples")  # only new work is done
        with pytest.raises(error, match=match) as info:
            evaluate.run(config or make_config(weights), prompts, ref, samples, str(target))
        assert "\n" not in str(info.value)
        assert not (target / evaluate.METRICS_FILE).exists() and not (target / evaluate.TABLE_FILE).exists()

    missing = make_config(weights)
    missing.passt.weights = str(tmp_path / "nowhere.pt")
    fails(scoring.EvaluationError, r"config.passt.weights=.*nowhere.pt: no such file", missing)
    wrong = make_config(weights, "kl")
    wrong.passt.weights = str(weights["clap"])  # a CLAP checkpoint given as PaSST weights
    fails(WeightsError, "PaSST|passt|expected", wrong)
    fails(scoring.EvaluationError, r"config.metrics=\['fid'\]", make_config(weights, "fid"))
    fails(scoring.EvaluationError, r"--reference_audio='': fad and kl need", make_config(weights, "kl"), ref="")

    empty = tmp_path / "empty_ref"
    empty.mkdir()
    fails(scoring.EvaluationError, "no audio files", make_config(weights, "fad"), ref=str(empty))
    few = tmp_path / "few_ref"
    few.mkdir()
    for path in audio_files(reference)[:3]:
        shutil.copy(path, few / path.name)
    fails(StatisticsError, r"33 embeddings of dimension 128", make_config(weights, "fad"), ref=str(few))
    broken = tmp_path / "broken_ref"
    shutil.copytree(few, broken)
    (broken / "zz_broken.wav").write_bytes(b"RIFF not really a wav file")
    fails(AudioError, r"zz_broken.wav: cannot read audio", make_config(weights, "fad"), ref=str(broken))

    bad_csv = tmp_path / "captions.csv"
    bad_csv.write_text("ytid,description\nabc,some text\n")
    fails(CaptionError, r"ytid and caption", prompts=str(bad_csv))
    other = tmp_path / "other.csv"
    other.write_text("ytid,caption\nnever_generated,a prompt without samples\n")
    fails(scoring.EvaluationError, r"no sample of 1 of the 1 prompts", prompts=str(other))


def test_cli_reports_a_missing_weight_file_in_one_line_with_status_2(data, tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "magnet_jax.evaluate",
            f"--config={REPO / 'configs' / 'evaluate.py'}:metrics=fad",
            f"--config.vggish.weights={tmp_path / 'vggish.pth'}",
            f"--prompts={data['csv']}",
            f"--reference_audio={data['reference']}",
            f"--samples={data['root'] / 'out' / 'samples'}",
            f"--output_dir={tmp_path / 'out'}",
        ],  # fmt: skip
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"evaluate: error: config.vggish.weights={tmp_path / 'vggish.pth'}: no such file or directory "
        "(VGGish weights (vggish-10086976.pth))"
    ]
    assert not (tmp_path / "out").exists()


def training_config(tiny, data, weights, root: Path, metrics):
    """A 2-step tiny run on random code records (the tiny codec's card) that evaluates `metrics` at step 2 on two
    captions whose reference clips are in the reference directory."""
    from array_record.python.array_record_module import ArrayRecordWriter

    c = magnet.get_config("size=tiny")
    root.mkdir(parents=True, exist_ok=True)
    writer = ArrayRecordWriter(str(root / "codes-p00000-of-00001-s00000.array_record"), "group_size:1")
    rng = np.random.default_rng(0)
    for i in range(8):
        record = CodeRecord(
            codes=rng.integers(0, c.codec.card, size=(c.codec.n_q, 60)).astype(np.int16),
            sample_rate=c.codec.sample_rate,
            frame_rate=float(c.codec.frame_rate),
            card=c.codec.card,
            duration=1.2,
            segment_seconds=1.0,
            source=f"clip{i}.wav",
            metadata={"description": f"calm piano {i}"},
        )
        writer.write(record.to_bytes())
    writer.close()
    prompts = root / "eval_prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"clip_0000{i}", "text": f"calm piano {i}"}) + "\n" for i in (1, 2)))
    c.data.train_files = str(root / "*.array_record")
    c.data.segment_seconds = 1.0
    c.conditioner.t5, c.codec.source = str(tiny["t5"]), str(tiny["codec"])
    c.conditioner.max_length = 16
    c.train.update(num_steps=2, log_every=1, eval_every=2, eval_metrics=metrics, eval_prompts=str(prompts))
    c.train.eval_reference = str(data["reference"])
    c.checkpoint.every_steps = 100
    c.optim.warmup_steps = 1
    c.generate.decoding_steps = [2, 2, 2, 2]
    set_embedders(c.train.eval_audio, weights)
    return c, prompts


def test_training_logs_audio_metrics_of_the_ema_weights(tiny, data, weights, tmp_path):
    config, prompts = training_config(tiny, data, weights, tmp_path / "data", ("kl", "clap"))
    workdir = tmp_path / "run"
    last = train_and_evaluate(config, str(workdir))
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    audio = [line for line in lines if line["split"] == "eval_audio"]
    assert [(line["step"], sorted(line)) for line in audio] == [(2, ["clap", "kl", "split", "step"])]
    assert last["eval_audio_clap"] == audio[0]["clap"] and audio[0]["kl"] > 0
    assert list((workdir / "tensorboard").glob("events.*"))

    assert (workdir / "export" / "config.json").is_file()  # the EMA weights that were scored, exported


def test_training_refuses_fad_on_too_few_prompt_windows(tiny, data, weights, tmp_path):
    config, prompts = training_config(tiny, data, weights, tmp_path / "data", ("fad",))
    with pytest.raises(SetupError, match=r"2 samples of 1 s give 2 VGGish windows; FAD needs more than 128"):
        train_and_evaluate(config, str(tmp_path / "run"))


def test_plots_metrics_vs_decoding_steps_and_training_step(generated, tmp_path):
    import matplotlib.image

    from benchmarks import plot_metrics

    out, result = generated
    curves = plot_metrics.decoding_sweep([out])
    assert curves == {k: [(8, result[k])] for k in ("fad", "kl", "clap")}  # decoding steps (2, 2, 2, 2)
    assert plot_metrics.main(["--evaluations", str(out), "--out", str(tmp_path / "sweep.png")]) == 0
    jsonl = tmp_path / "metrics.jsonl"
    jsonl.write_text(
        "".join(
            json.dumps(line) + "\n"
            for line in [
                {"step": 10, "split": "train", "loss": 5.0},
                {"step": 10, "split": "eval", "loss": 4.5},
                {"step": 10, "split": "eval_audio", "clap": 0.1, "kl": 2.0},
                {"step": 20, "split": "eval_audio", "clap": 0.2, "kl": 1.5},
            ]
        )
    )
    assert plot_metrics.training_curves(jsonl) == {
        "loss": [(10, 4.5)],
        "clap": [(10, 0.1), (20, 0.2)],
        "kl": [(10, 2.0), (20, 1.5)],
    }
    assert plot_metrics.main(["--metrics", str(jsonl), "--out", str(tmp_path / "train.png")]) == 0
    for name in ("sweep.png", "train.png"):
        image = matplotlib.image.imread(tmp_path / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.std() > 0


def test_hosts_split_the_files_and_fill_one_cache(generated, data, weights, tmp_path):
    """Process i of n embeds work items i, i+n, ...; the union is the single-process cache, which a cache pinned
    to other weights refuses to mix with."""
    out, _ = generated
    embedders = scoring.Embedders(make_config(weights, "kl"), ("kl",))
    ids = [row["ytid"] for row in csv.DictReader(data["csv"].open())]
    work = scoring.reference_work(data["reference"], ("kl",), ids)
    assert len(work) == 6
    cache = scoring.EmbeddingCache(tmp_path, embedders.settings)
    assert scoring.embed_files(embedders, cache, work, process_index=1, process_count=2) == 3
    assert sorted(p.name for p in (tmp_path / "passt").glob("*.npz")) == sorted(f"{c.name}.npz" for c, _ in work[1::2])
    assert scoring.embed_files(embedders, cache, work, process_index=0, process_count=2) == 3
    assert scoring.embed_files(embedders, cache, work) == 0  # everything cached
    single = scoring.EmbeddingCache(out / "embeddings" / "reference", embedders.settings)
    for clip, _ in work:
        np.testing.assert_allclose(cache.get("passt", clip), single.get("passt", clip), rtol=1e-6)

    other = {"passt": {**embedders.settings["passt"], "weights": {"path": "/elsewhere/passt.pt"}}}
    with pytest.raises(scoring.EvaluationError, match=r"other settings \(weights.*/elsewhere/passt.pt"):
        scoring.EmbeddingCache(tmp_path, other)
