"""Converted-checkpoint format, the convert CLI, audiocraft export, and every bad-input case."""

import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
import yaml
from jax.sharding import NamedSharding, PartitionSpec

from magnet_jax.checkpoints import lm_weights
from magnet_jax.checkpoints.pretrained import load_pretrained, save_pretrained
from magnet_jax.checkpoints.sources import load_lm
from magnet_jax.convert import convert
from magnet_jax.fileio import WeightsError, flatten_dict
from magnet_jax.models.lm import LanguageModel, LMConfig, init_params
from references.audiocraft_lm import TINY, audiocraft_lm, state_dict_numpy
from references.parity import assert_close
from references.transformers_musicgen import musicgen_decoder_config

REPO = Path(__file__).resolve().parents[2]


def xp_cfg(causal: bool = False, **changes) -> str:
    """A released-style audiocraft `xp.cfg` (merged Hydra config, the keys the loaders read) for the TINY model."""
    cfg = yaml.safe_load(f"""
device: cuda
dtype: float16
solver: {"musicgen" if causal else "magnet"}
lm_model: {"transformer_lm" if causal else "transformer_lm_magnet"}
sample_rate: 32000
channels: 1
compression_model_checkpoint: //pretrained/facebook/encodec_32khz
efficient_attention_backend: xformers
dataset: {{segment_duration: 1, batch_size: 192}}
classifier_free_guidance: {{training_dropout: 0.3, inference_coef: 3.0}}
attribute_dropout: {{}}
fuser: {{cross_attention_pos_emb: false, cross_attention_pos_emb_scale: 1, sum: [], prepend: [],
        cross: [description], input_interpolate: []}}
conditioners:
  description: {{model: t5, t5: {{name: t5-base, finetune: false, word_dropout: 0.3, normalize_text: false}}}}
codebooks_pattern:
  modeling: {"delay" if causal else "parallel"}
  delay: {{delays: [0, 1, 2, 3], flatten_first: 0, empty_initial: 0}}
  parallel: {{empty_initial: -1}}
transformer_lm:
  dim: {TINY["dim"]}
  num_heads: {TINY["num_heads"]}
  num_layers: {TINY["num_layers"]}
  hidden_scale: 4
  n_q: {TINY["n_q"]}
  card: {TINY["card"]}
  dropout: 0.0
  emb_lr: null
  activation: gelu
  norm_first: true
  bias_ff: false
  bias_attn: false
  bias_proj: false
  past_context: null
  causal: {str(causal).lower()}
  custom: false
  memory_efficient: true
  attention_as_float32: false
  layer_scale: null
  positional_embedding: sin
  xpos: false
  checkpointing: none
  weight_init: gaussian
  depthwise_init: current
  zero_bias_init: true
  norm: layer_norm
  cross_attention: false
  qk_layer_norm: false
  qk_layer_norm_cross: false
  attention_dropout: null
  kv_repeat: 1
  two_step_cfg: false
  subcodes_context: 5
  compression_model_framerate: 50
  segment_duration: 0
  span_len: -1
masking: {{span_len: 3}}
generate:
  audio: {{sample_rate: '${{sample_rate}}'}}
  lm: {{use_sampling: true, temperature: 1.0, temp: 3.0, top_k: 0, top_p: 0.9, max_cfg_coef: 10.0,
        min_cfg_coef: 1.0, decoding_steps: [20, 10, 10, 10], anneal_temp: true, span_scoring: max,
        span_arrangement: nonoverlap}}
""")
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        node[leaf] = value
    return yaml.safe_dump(cfg)


def write_audiocraft_dir(
    directory: Path,
    state: dict,
    *,
    dtype=torch.float32,
    xp: str | None = None,
    codec=("pretrained", "facebook/encodec_32khz"),
) -> Path:
    """An audiocraft release directory: `state_dict.bin` (+ a compression pointer), as on the hub."""
    directory.mkdir(parents=True, exist_ok=True)
    best_state = {k: torch.from_numpy(np.asarray(v)).to(dtype) for k, v in state.items()}
    torch.save(
        {"best_state": best_state, "xp.cfg": xp or xp_cfg(), "version": "1.3.0", "exported": True},
        directory / "state_dict.bin",
    )
    if codec:
        torch.save({codec[0]: codec[1], "exported": True, "version": "1.3.0"}, directory / "compression_state_dict.bin")
    return directory


@pytest.fixture(scope="module")
def magnet_state():
    return state_dict_numpy(audiocraft_lm(**TINY))


@pytest.fixture(scope="module")
def magnet_dir(magnet_state, tmp_path_factory):
    return write_audiocraft_dir(tmp_path_factory.mktemp("magnet-release"), magnet_state)


def read_best_state(directory: Path) -> tuple[dict, dict]:
    pkg = torch.load(directory / "state_dict.bin", weights_only=True)
    return pkg, {k: v for k, v in pkg["best_state"].items()}


def comparable(config: dict) -> dict:
    return {k: config[k] for k in ("model", "conditioner", "codec", "segment_seconds", "generate")}


# ---------------------------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("causal,dtype", [(False, torch.float32), (False, torch.float16), (True, torch.float32)])
def test_audiocraft_import_export_import_is_exact(tmp_path, causal, dtype):
    state = state_dict_numpy(audiocraft_lm(**TINY, causal=causal))
    source = write_audiocraft_dir(tmp_path / "release", state, dtype=dtype, xp=xp_cfg(causal=causal))
    config, params = lm_weights.import_lm(str(source))
    assert config["model"] == LMConfig(**TINY, causal=causal).to_dict()
    assert config["codec"]["source"] == "facebook/encodec_32khz" and config["conditioner"]["t5"] == "t5-base"
    assert config["segment_seconds"] == 1.0
    if not causal:
        assert config["generate"] == {
            "use_sampling": True,
            "temperature": 3.0,
            "top_k": 0,
            "top_p": 0.9,
            "max_cfg": 10.0,
            "min_cfg": 1.0,
            "decoding_steps": [20, 10, 10, 10],
            "anneal_temp": True,
            "span_arrangement": "nonoverlap",
            "span_scoring": "max",
            "span_len": 3,
        }
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype("float32")}  # fp16 cast to the param dtype

    name = {torch.float32: "float32", torch.float16: "float16"}[dtype]
    convert(str(source), str(tmp_path / "ours"))
    convert(str(tmp_path / "ours"), str(tmp_path / "exported"), to="audiocraft", dtype=name)
    pkg, exported = read_best_state(tmp_path / "exported")
    original = read_best_state(source)[1]
    assert pkg["exported"] is True and set(exported) == set(original)
    for key, tensor in original.items():
        assert exported[key].dtype == dtype and torch.equal(exported[key], tensor), key

    config2, params2 = lm_weights.import_lm(str(tmp_path / "exported"))
    assert comparable(config2) == comparable(config)
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_converted_checkpoint_round_trip_is_exact(tmp_path, magnet_dir):
    config, params = lm_weights.import_lm(str(magnet_dir))
    save_pretrained(tmp_path / "ckpt", params, config)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary directory left behind
    loaded_config, loaded = load_pretrained(tmp_path / "ckpt")
    assert loaded_config == config
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(loaded))
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_load_pretrained_casts_and_changes_layer_layout(tmp_path, magnet_dir):
    convert(str(magnet_dir), str(tmp_path / "ckpt"))
    config, params = load_pretrained(tmp_path / "ckpt")
    config16, per_layer = load_pretrained(tmp_path / "ckpt", dtype="bfloat16", scan_layers=False)
    assert config16["model"]["param_dtype"] == "bfloat16" and config16["model"]["scan_layers"] is False
    flat = flatten_dict(per_layer)
    assert {x.dtype.name for x in flat.values()} == {"bfloat16"}
    np.testing.assert_array_equal(
        flat["block_1/linear1/kernel"], params["blocks"]["linear1"]["kernel"][1].astype("bfloat16")
    )
    # the bf16 copy is itself a valid checkpoint in the same format
    save_pretrained(tmp_path / "bf16", per_layer, config16)
    assert load_pretrained(tmp_path / "bf16")[0]["model"]["param_dtype"] == "bfloat16"


@pytest.mark.parametrize("scan_layers", [True, False])
def test_load_pretrained_restores_onto_a_device_mesh(tmp_path, magnet_dir, scan_layers):
    """Straight into shards (stored layout) or via host re-layout (the other one): same values, requested shardings."""
    convert(str(magnet_dir), str(tmp_path / "ckpt"))
    _, host = load_pretrained(tmp_path / "ckpt", scan_layers=scan_layers)
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    # shard every leaf whose last axis divides by 8 (embed / vocab / mlp dims), replicate the rest
    shardings = jax.tree.map(
        lambda x: NamedSharding(
            mesh, PartitionSpec(*([None] * (x.ndim - 1) + ["fsdp"]) if x.shape[-1] % 8 == 0 else PartitionSpec())
        ),
        host,
    )
    config, sharded = load_pretrained(tmp_path / "ckpt", scan_layers=scan_layers, shardings=shardings)
    assert config["model"]["scan_layers"] is scan_layers
    kernel = sharded["head_0"]["kernel"]
    assert kernel.sharding == shardings["head_0"]["kernel"] and len(kernel.addressable_shards) == 8
    assert kernel.addressable_shards[0].data.shape == (TINY["dim"], TINY["card"] // 8)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), sharded, host)


def test_sharded_transformers_checkpoint_imports_like_a_single_file(tmp_path):
    from transformers import MusicgenForCausalLM

    reference = MusicgenForCausalLM(musicgen_decoder_config())
    reference.save_pretrained(tmp_path / "single")
    reference.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    single = lm_weights.import_lm(str(tmp_path / "single"))[1]
    config, sharded = lm_weights.import_lm(str(tmp_path / "sharded"))
    assert len(config["provenance"]["file"].split(", ")) > 1
    jax.tree.map(np.testing.assert_array_equal, sharded, single)


def test_mha_key_variant_and_file_path_sources_import_the_same(tmp_path, magnet_state):
    renamed = {k.replace("self_attn.", "self_attn.mha."): v for k, v in magnet_state.items()}
    source = write_audiocraft_dir(tmp_path / "mha", renamed, codec=None)
    config, params = lm_weights.import_lm(str(source / "state_dict.bin"))  # the file itself, no sibling codec
    assert config["codec"]["source"] == "facebook/encodec_32khz"  # from xp.cfg compression_model_checkpoint
    expected = lm_weights.params_from_audiocraft(magnet_state, LMConfig(**TINY), source="reference")
    jax.tree.map(np.testing.assert_array_equal, params, expected)


# ---------------------------------------------------------------------------------------------------------------
# audiocraft loads what we export


def test_audiocraft_loader_accepts_export_of_a_model_trained_here(tmp_path, monkeypatch):
    """A model created here (no audiocraft_cfg) -> synthesized xp.cfg -> audiocraft's own MAGNeT loader with strict
    load_state_dict -> the same logits as ours at every stage, on real padded T5 conditioning."""
    from audiocraft.models import loaders
    from audiocraft.modules.conditioners import ConditioningAttributes, T5Conditioner

    from magnet_jax.checkpoints.t5_weights import write_random_t5

    t5_dir = str(
        write_random_t5(
            tmp_path / "t5",
            corpus=["happy rock song with drums", "calm piano", "jazz"] * 20,
            d_model=TINY["cond_dim"],
            num_layers=1,
            num_heads=3,
            d_kv=8,
            d_ff=48,
        )
    )
    model_config = LMConfig(**TINY)
    params = jax.jit(lambda k: nn.meta.unbox(init_params(LanguageModel(model_config), k)))(jax.random.key(3))
    params = jax.tree.map(
        lambda x: x + 0.05 * np.random.default_rng(0).standard_normal(x.shape).astype(x.dtype), params
    )  # move LayerNorms off 1 / 0
    save_pretrained(
        tmp_path / "trained",
        params,
        {
            "model": model_config.to_dict(),
            "conditioner": {"t5": t5_dir, "t5_dim": TINY["cond_dim"]},
            "codec": {"source": "facebook/encodec_32khz"},
            "segment_seconds": 1.0,
            "generate": {"temperature": 3.0, "decoding_steps": [4, 2, 2, 2], "span_len": 3},
        },
    )
    convert(str(tmp_path / "trained"), str(tmp_path / "audiocraft"), to="audiocraft")
    assert torch.load(tmp_path / "audiocraft" / "compression_state_dict.bin")["pretrained"] == "facebook/encodec_32khz"

    monkeypatch.setattr(T5Conditioner, "MODELS", T5Conditioner.MODELS + [t5_dir])  # audiocraft allows hub ids only
    monkeypatch.setitem(T5Conditioner.MODELS_DIMS, t5_dir, TINY["cond_dim"])
    reference = loaders.load_lm_model_magnet(str(tmp_path / "audiocraft"), compression_model_frame_rate=50)
    assert reference.cfg.generate.lm.decoding_steps == [4, 2, 2, 2]

    provider = reference.condition_provider
    tokens = provider.tokenize(
        [
            ConditioningAttributes(text={"description": "happy rock song with drums"}),
            ConditioningAttributes(text={"description": None}),
        ]
    )
    with torch.no_grad():
        condition_tensors = provider(tokens)
        states = provider.conditioners["description"].t5(**tokens["description"]).last_hidden_state.numpy()
    mask = tokens["description"]["attention_mask"].numpy()
    assert mask.sum(1).tolist()[1] == 0 and mask.shape[1] > 2  # padded batch with a null row

    model = LanguageModel(model_config)
    condition = model.apply({"params": params}, states, mask, method=model.project_condition)
    np.testing.assert_allclose(np.asarray(condition), condition_tensors["description"][0].numpy(), atol=1e-5)
    logits = jax.jit(lambda codes, stage: model.apply({"params": params}, codes, condition, None, stage))
    tokens = np.random.default_rng(4).integers(0, TINY["card"] + 1, (2, TINY["n_q"], 30))
    for stage in range(4):
        codes = tokens.copy()
        codes[:, stage + 1 :] = TINY["card"]  # codebooks above the stage are masked
        with torch.no_grad():
            expected = reference(torch.tensor(codes), [], condition_tensors, stage=stage).numpy()
        print(f"stage {stage}: max relative error", assert_close(logits(codes, stage), expected))


# ---------------------------------------------------------------------------------------------------------------
# CLI


def run_cli(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "magnet_jax.convert", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_converts_release_to_checkpoint(tmp_path, magnet_dir):
    result = run_cli(f"--src={magnet_dir}", f"--dst={tmp_path / 'out'}", "--dtype=bfloat16")
    assert result.returncode == 0, result.stderr[-2000:]
    config, params = load_pretrained(tmp_path / "out")
    assert config["model"]["param_dtype"] == "bfloat16"
    assert config["provenance"]["format"] == "audiocraft"


def test_cli_bad_source_prints_one_line_and_exits_2(tmp_path):
    result = run_cli(f"--src={tmp_path / 'missing'}", f"--dst={tmp_path / 'out'}")
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("convert: error:")]
    assert len(lines) == 1 and "missing" in lines[0]
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# bad input: every case is a one-line WeightsError naming what is wrong, and nothing is written


def expect_error(source, dst: Path, match: str, **kwargs):
    with pytest.raises(WeightsError, match=match) as e:
        convert(str(source), str(dst), **kwargs)
    assert "\n" not in str(e.value)
    assert not dst.exists() and not any(p.name.startswith(f".{dst.name}") for p in dst.parent.iterdir())
    return str(e.value)


@pytest.mark.parametrize("case", ["missing", "unexpected", "misshaped"])
def test_key_mismatches_are_listed(tmp_path, magnet_state, case):
    state = dict(magnet_state)
    if case == "missing":
        del state["transformer.layers.1.linear2.weight"], state["emb.3.weight"]
        match = r"missing: emb\.3\.weight, transformer\.layers\.1\.linear2\.weight"
    elif case == "unexpected":
        state["transformer.layers.0.linear1.bias"] = np.zeros(4 * TINY["dim"], np.float32)
        match = r"unexpected: transformer\.layers\.0\.linear1\.bias"
    else:
        state["linears.2.weight"] = state["linears.2.weight"][:-1]
        match = r"wrong shape: linears\.2\.weight \(31, 32\) != \(32, 32\)"
    expect_error(write_audiocraft_dir(tmp_path / "bad", state), tmp_path / "out", match)


def test_missing_weights_file_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    expect_error(tmp_path / "empty", tmp_path / "out", "directory .*empty has no state_dict.bin")


def test_hub_id_offline_is_a_clear_error(tmp_path):
    expect_error(
        "facebook/magnet-small-10secs",
        tmp_path / "out",
        "state_dict.bin of hub id .* is not in the local cache .*HF_HUB_OFFLINE is set",
    )


def test_pickles_are_read_with_weights_only(tmp_path, magnet_state):
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    (tmp_path / "evil").mkdir()
    torch.save(
        {"best_state": {"emb.0.weight": torch.zeros(2)}, "xp.cfg": xp_cfg(), "payload": Payload()},
        tmp_path / "evil" / "state_dict.bin",
    )
    expect_error(tmp_path / "evil", tmp_path / "out", "cannot read .* as a PyTorch pickle")
    assert not marker.exists()


def test_fp16_weights_are_cast_to_the_param_dtype(tmp_path, magnet_state):
    source = write_audiocraft_dir(tmp_path / "fp16", magnet_state, dtype=torch.float16)
    config, params = load_lm(source)
    assert config["model"]["param_dtype"] == "float32" and config["provenance"]["source_dtypes"] == ["float16"]
    np.testing.assert_array_equal(
        params["emb_1"]["embedding"], magnet_state["emb.1.weight"].astype(np.float16).astype(np.float32)
    )


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("transformer_lm.norm_first", False, r"transformer_lm\.norm_first=False is not supported"),
        ("transformer_lm.bias_attn", True, r"transformer_lm\.bias_attn=True is not supported"),
        ("lm_model", "transformer_lm_flow", r"lm_model='transformer_lm_flow' is not supported"),
        ("fuser.prepend", ["description"], r"fuser=.* is not supported"),
        ("transformer_lm.causal", True, r"transformer_lm\.causal=True is not supported for transformer_lm_magnet"),
    ],
)
def test_unsupported_architecture_options_are_named(tmp_path, magnet_state, field, value, match):
    source = write_audiocraft_dir(tmp_path / "odd", magnet_state, xp=xp_cfg(**{field: value}))
    expect_error(source, tmp_path / "out", match)


def test_not_an_exported_checkpoint_is_explained(tmp_path):
    (tmp_path / "train").mkdir()
    torch.save({"model": {"w": torch.zeros(1)}}, tmp_path / "train" / "state_dict.bin")
    expect_error(
        tmp_path / "train", tmp_path / "out", r"expected an exported audiocraft checkpoint .*found \['model'\]"
    )


def test_corrupt_converted_checkpoints_are_clear_errors(tmp_path, magnet_dir):
    convert(str(magnet_dir), str(tmp_path / "ckpt"))
    (tmp_path / "ckpt" / "config.json").write_text("{not json")
    with pytest.raises(WeightsError, match=r"config\.json: not valid JSON"):
        load_pretrained(tmp_path / "ckpt")
    convert(str(magnet_dir), str(tmp_path / "ckpt2"))
    for f in (tmp_path / "ckpt2" / "params").iterdir():
        if f.is_file():
            f.unlink()
    with pytest.raises(WeightsError, match=r"params/\S+: missing \(listed in checksums\.json\)"):
        load_pretrained(tmp_path / "ckpt2")
    with pytest.raises(WeightsError, match="no such checkpoint directory"):
        load_pretrained(tmp_path / "nothing")


def test_existing_destination_needs_overwrite(tmp_path, magnet_dir):
    convert(str(magnet_dir), str(tmp_path / "ckpt"))
    with pytest.raises(WeightsError, match="already exists"):
        convert(str(magnet_dir), str(tmp_path / "ckpt"))
    convert(str(magnet_dir), str(tmp_path / "ckpt"), overwrite=True, dtype="bfloat16")
    assert load_pretrained(tmp_path / "ckpt")[0]["model"]["param_dtype"] == "bfloat16"
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_save_pretrained_rejects_params_that_do_not_fit_the_config(tmp_path, magnet_dir):
    config, params = load_lm(magnet_dir)
    params["head_0"]["kernel"] = params["head_0"]["kernel"][:, :-1]
    with pytest.raises(WeightsError, match=r"wrong shape: head_0/kernel \(32, 31\) != \(32, 32\)"):
        save_pretrained(tmp_path / "ckpt", params, config)
    with pytest.raises(WeightsError, match="config lacks codec"):
        save_pretrained(tmp_path / "ckpt", params, {k: v for k, v in config.items() if k != "codec"})
    assert not list(tmp_path.iterdir())
