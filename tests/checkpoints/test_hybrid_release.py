"""The released Hybrid-MAGNeT checkpoints (`facebook/hybrid-magnet-small` / `-medium`; audiocraft branch hybrid_magnet).

A tiny checkpoint written exactly as the branch writes one (`references.hybrid_magnet_branch`: its xp.cfg keys, the
MAGNeT LM's state-dict names, fp32 or fp16) is converted and checked
  * against the branch's own model code: the golden logits it produced on the same seeded weights (always), and the
    branch run live when `HYBRID_MAGNET_BRANCH` names a checkout of commit c44e943;
  * through the hub code path: a Hugging Face cache holding `facebook/hybrid-magnet-small` as the hub repository
    holds it, read offline by `python -m magnet_jax.convert --src=facebook/hybrid-magnet-small` and by
    `MAGNeT.from_pretrained("facebook/hybrid-magnet-small")`, which generates it as a Hybrid-MAGNeT model.
"""

import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import yaml

from magnet_jax.api import MAGNeT
from magnet_jax.checkpoints import lm_weights
from magnet_jax.checkpoints.pretrained import load_pretrained
from magnet_jax.fileio import WeightsError
from magnet_jax.generation import hybrid, musicgen
from magnet_jax.models import conditioner, objectives
from magnet_jax.models.conditioner import TextConditioning
from magnet_jax.models.lm import LanguageModel, LMConfig
from references import hybrid_magnet_branch as branch
from references.parity import assert_close, relative_error

REPO = Path(__file__).resolve().parents[2]
RTOL = 1e-5
HUB_ID = "facebook/hybrid-magnet-small"
REVISION = "0123456789abcdef0123456789abcdef01234567"  # a commit hash, as the hub cache names snapshots


@pytest.fixture(scope="module")
def golden():
    data = np.load(branch.GOLDEN)
    assert str(data["commit"]) == branch.BRANCH_COMMIT
    assert [tuple(c) for c in data["boundaries_stages"]] == list(branch.CASES)
    assert int(data["weights_seed"]) == branch.WEIGHTS_SEED
    return data


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return branch.write_release(tmp_path_factory.mktemp("hybrid-release"), branch.release_state())


def forward_fn(config: dict, params, inputs):
    """Jitted `(codes [B, K, T], stage, boundary) -> frame-aligned logits` of our converted model, on the cases'
    conditioning (audiocraft attends the zeroed padded condition positions, so every position is attended)."""
    model = LanguageModel(LMConfig(**config["model"]))
    variables = {"params": params}
    condition = model.apply(variables, inputs["states"], inputs["cond_mask"], method=model.project_condition)
    attend = jnp.ones(inputs["cond_mask"].shape, bool)

    @jax.jit
    def forward(codes, stage, boundary):
        batch = codes.shape[0]
        boundary = jnp.full((batch,), boundary, jnp.int32)
        return objectives.HYBRID.logits(model, variables, codes, stage, condition, attend, boundary=boundary)

    return forward


def hybrid_logits(config: dict, params, inputs) -> np.ndarray:
    """Our logits `[cases, B, K, T, card]` for the golden cases."""
    forward = forward_fn(config, params, inputs)
    return np.stack([np.asarray(forward(codes, k, b)) for (b, k), codes in zip(branch.CASES, inputs["codes"])])


def test_branch_checkpoint_imports_as_a_hybrid_model_with_its_settings(release):
    config, params = lm_weights.import_lm(str(release))
    assert config["objective"] == "hybrid"
    assert config["model"] == LMConfig(**branch.ARCH).to_dict()
    assert config["segment_seconds"] == 30.0 and config["codec"]["source"] == "facebook/encodec_32khz"
    assert config["conditioner"] == {"t5": "t5-base", "t5_dim": branch.ARCH["cond_dim"]}
    assert config["generate"]["decoding_steps"] == [60, 10, 10, 10] and config["generate"]["span_len"] == 3
    assert config["provenance"]["lm_model"] == "transformer_lm_magnet"


def test_converted_logits_match_the_branch_model_golden(release, golden):
    config, params = lm_weights.import_lm(str(release))  # what `convert` writes (the CLI test below runs it whole)
    ours = hybrid_logits(config, params, golden)
    errors = [assert_close(o, g, rtol=RTOL) for o, g in zip(ours, golden["logits"])]
    probs = jax.nn.softmax(golden["logits"], -1).max(-1)
    assert 0.3 < np.median(probs) < 0.95 and probs.min() < 0.2  # confident, and not everywhere
    print("max relative error per case:", errors)
    # the cases discriminate: another boundary, or the MAGNeT (parallel) reading of the same codes, is far off
    i = branch.CASES.index((5, 1))
    forward = forward_fn(config, params, golden)
    assert relative_error(forward(golden["codes"][i], 1, 6), golden["logits"][i]) > 1e-2
    model = LanguageModel(LMConfig(**config["model"]))
    cond = model.apply({"params": params}, golden["states"], golden["cond_mask"], method=model.project_condition)
    parallel = jax.jit(lambda codes: objectives.MAGNET.logits(model, {"params": params}, codes, 1, cond))
    assert relative_error(parallel(golden["codes"][i]), golden["logits"][i]) > 1e-1


def ar_phase_greedy(config: dict, params, inputs, frames: int) -> np.ndarray:
    """Our AR phase, greedy with CFG 3, streaming the layout rows that complete `frames` whole frames."""
    model = LanguageModel(LMConfig(**config["model"]))
    cond = TextConditioning(jnp.asarray(inputs["states"]), jnp.asarray(inputs["cond_mask"]))
    keys = jax.random.split(jax.random.key(0), len(inputs["states"]))  # unused by greedy decoding
    return np.asarray(greedy_prefix(model, frames, frames + model.config.n_q - 1)(params, cond, keys))


def greedy_prefix(model: LanguageModel, length: int, prefix_frames: int):
    """Jitted greedy AR phase `(params, cond, keys) -> [B, K, length]` (`hybrid.autoregressive_prefix`, CFG 3)."""
    return jax.jit(
        functools.partial(
            hybrid.autoregressive_prefix, model, length=length, prefix_frames=prefix_frames, sample_fn=musicgen.greedy
        )
    )


def test_greedy_ar_phase_matches_the_branch_ar_generate_golden(release, golden):
    config, params = lm_weights.import_lm(str(release))
    expected = golden["ar_codes"]
    ours = ar_phase_greedy(config, params, golden, expected.shape[-1])
    np.testing.assert_array_equal(ours, expected)
    assert all(len(np.unique(row)) > 3 for row in expected.reshape(-1, expected.shape[-1]))  # not one token repeated


def test_fp16_release_converts_within_half_precision_of_the_golden(tmp_path, golden):
    source = branch.write_release(tmp_path / "fp16", branch.release_state(), dtype=torch.float16)
    config, params = lm_weights.import_lm(str(source))
    assert config["provenance"]["source_dtypes"] == ["float16"]
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype("float32")}
    assert relative_error(hybrid_logits(config, params, golden), golden["logits"]) < 2e-2


@pytest.mark.skipif(not os.environ.get(branch.BRANCH_ENV), reason=f"{branch.BRANCH_ENV} names no branch checkout")
def test_logits_match_the_branch_model_run_live(release, golden, tmp_path):
    src = os.environ[branch.BRANCH_ENV]
    lm = branch.branch_lm(src, release)
    expected = branch.branch_logits(src, lm, golden)
    np.testing.assert_allclose(expected, golden["logits"], rtol=0, atol=1e-5 * np.abs(expected).max())
    config, params = lm_weights.import_lm(str(release))
    ours = hybrid_logits(config, params, golden)
    print("max relative error vs the live branch:", [assert_close(o, e, rtol=RTOL) for o, e in zip(ours, expected)])
    ar_codes = branch.branch_ar_greedy(src, lm, golden)
    np.testing.assert_array_equal(ar_codes, golden["ar_codes"])
    np.testing.assert_array_equal(ar_phase_greedy(config, params, golden, ar_codes.shape[-1]), ar_codes)
    # our audiocraft export of the converted model: the branch's loader reads it strictly, with the same logits
    lm_weights.export_audiocraft(tmp_path / "exported", params, config)
    exported = branch.branch_lm(src, tmp_path / "exported")
    np.testing.assert_allclose(branch.branch_logits(src, exported, golden), expected, rtol=0, atol=0)


def test_audiocraft_export_of_a_hybrid_model_round_trips_exactly(tmp_path, release):
    config, params = lm_weights.import_lm(str(release))
    lm_weights.export_audiocraft(tmp_path / "out", params, config)
    pkg = torch.load(tmp_path / "out" / "state_dict.bin", weights_only=True)
    xp = yaml.safe_load(pkg["xp.cfg"])
    assert (xp["solver"], xp["lm_model"], xp["codebooks_pattern"]["modeling"]) == (
        "hybrid_magnet",
        "transformer_lm_magnet",
        "delay",
    )
    config2, params2 = lm_weights.import_lm(str(tmp_path / "out"))
    assert config2["objective"] == "hybrid" and config2["model"] == config["model"]
    jax.tree.map(np.testing.assert_array_equal, params2, params)
    without = {k: v for k, v in config.items() if k not in ("objective", "audiocraft_cfg")}
    lm_weights.export_audiocraft(tmp_path / "synth", params, {**without, "objective": "hybrid"})
    assert lm_weights.import_lm(str(tmp_path / "synth"))[0]["objective"] == "hybrid"  # synthesized xp.cfg too


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"codebooks_pattern": {"modeling": "parallel"}}, "codebooks_pattern='parallel' is not supported for Hybrid"),
        ({"lm_model": "transformer_lm"}, "solver='hybrid_magnet' needs lm_model='transformer_lm_magnet'"),
        ({"transformer_lm": {"causal": True}}, "transformer_lm.causal=True is not supported"),
    ],
)
def test_inconsistent_hybrid_xp_cfg_is_a_one_line_error(tmp_path, changes, match):
    xp = yaml.safe_load(branch.xp_cfg())
    for key, value in changes.items():
        xp[key] = {**xp[key], **value} if isinstance(value, dict) else value
    source = branch.write_release(tmp_path / "bad", branch.release_state(), xp=yaml.safe_dump(xp))
    with pytest.raises(WeightsError, match=re.escape(str(source / "state_dict.bin")) + ".*" + match) as e:
        lm_weights.import_lm(str(source))
    assert "\n" not in str(e.value)


def test_magnet_config_contradicting_a_hybrid_objective_is_refused_on_export(tmp_path, release):
    config, params = lm_weights.import_lm(str(release))
    magnet_cfg = yaml.safe_load(config["audiocraft_cfg"])
    magnet_cfg.update(solver="magnet")
    with pytest.raises(WeightsError, match="audiocraft_cfg solver='magnet' contradicts objective='hybrid'"):
        lm_weights.export_audiocraft(tmp_path / "out", params, {**config, "audiocraft_cfg": yaml.safe_dump(magnet_cfg)})
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------------------
# The hub code path: a Hugging Face cache laid out as `huggingface_hub` writes it, read offline


def hub_cache(root: Path, tiny: dict) -> Path:
    """`root/hub/models--facebook--hybrid-magnet-small/{refs/main, snapshots/<rev>/...}` holding a tiny hybrid release
    in the tiny assets' sizes (its codec pointer names the tiny codec: the hub's points at facebook/encodec_32khz)."""
    repo = root / "hub" / ("models--" + HUB_ID.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    xp = branch.xp_cfg(segment_duration=1)
    branch.write_release(repo / "snapshots" / REVISION, branch.release_state(), xp=xp, codec=str(tiny["codec"]))
    return root / "hub"


@pytest.fixture(scope="module")
def cached_hub(tiny, tmp_path_factory):
    return hub_cache(tmp_path_factory.mktemp("hf"), tiny)


def test_convert_cli_reads_the_hub_id_from_the_cache_offline(tmp_path, cached_hub):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cached_hub), "JAX_PLATFORMS": "cpu"}
    env["PYTHONPATH"] = str(REPO)
    run = subprocess.run(
        [sys.executable, "-m", "magnet_jax.convert", f"--src={HUB_ID}", f"--dst={tmp_path / 'out'}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["objective"] == "hybrid" and saved["provenance"]["source"] == HUB_ID
    assert saved["provenance"]["file"].endswith(f"snapshots/{REVISION}/state_dict.bin")
    _, params = load_pretrained(tmp_path / "out")
    _, expected = lm_weights.import_lm(str(Path(saved["provenance"]["file"]).parent))
    jax.tree.map(np.testing.assert_array_equal, params, expected)


def test_from_pretrained_hub_id_generates_as_a_hybrid_model(cached_hub, tiny, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cached_hub))
    m = MAGNeT.from_pretrained(HUB_ID, t5=str(tiny["t5"]))
    assert m.objective.name == "hybrid" and m.codec_source == str(tiny["codec"])
    assert m.decode_params.decoding_steps == (60, 10, 10, 10) and m.decode_params.temperature == 3.0
    m.set_generation_params(decoding_steps=[2, 2, 2, 2], ar_use_sampling=False)
    texts = ["lo-fi beat", "jazz trio"]
    out = m.generate(texts, seed=3, prefix_seconds=0.2)  # 10 layout steps autoregressively, then MAGNeT
    assert out.codes.shape == (2, 4, 48) and out.audio.shape == (2, 1, 48 * 640)
    assert 0 <= out.codes.min() and out.codes.max() < 64
    # the prefix (codebook q's frames t < 10 - q) is the model's own greedy AR phase, kept by MAGNeT's decoding
    tokens = m.tokenizer(texts)
    pad = ((0, 0), (0, m.text_length - tokens["ids"].shape[1]))
    ids, mask = np.pad(tokens["ids"], pad, constant_values=m.tokenizer.pad_id), np.pad(tokens["mask"], pad)
    cond = conditioner.row_conditioning(m.t5_config, m.tokenizer.pad_id, m.t5_params, ids, mask)
    keys = jax.random.split(jax.random.key(0), 2)
    prefix = np.asarray(greedy_prefix(m.model, 48, 10)(m.lm_params, cond, keys))
    staircase = np.arange(48)[None, :] < 10 - np.arange(4)[:, None]
    np.testing.assert_array_equal(np.where(staircase, out.codes, -1), np.where(staircase, prefix, -1))
    assert (prefix[:, ~staircase] == 64).all()  # the mask id beyond: nothing else came from the AR phase
