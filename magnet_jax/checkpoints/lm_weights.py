"""LM weights: audiocraft `state_dict.bin` and transformers MusicGen files <-> our param tree (docs/design.md §10).

Formats read:
- audiocraft (MAGNeT, Hybrid-MAGNeT and MusicGen releases, `facebook/magnet-*`, `facebook/hybrid-magnet-*`,
  `facebook/musicgen-*`): `state_dict.bin`, a torch pickle `{'best_state': {name: tensor}, 'xp.cfg': <Hydra YAML>,
  ...}`. The model config comes from `xp.cfg` (Hybrid-MAGNeT: `solver: hybrid_magnet`, the delay pattern, the MAGNeT
  LM's tensor names; config.json "objective": "hybrid"); the codec from the sibling `compression_state_dict.bin` (or
  the hub id it points to).
- transformers MusicGen (AR model): `config.json` + `model.safetensors` (or a sharded index) of
  `MusicgenForConditionalGeneration` (`decoder.model.decoder.*`, `decoder.lm_heads.*`, `enc_to_dec_proj.*`) or
  `MusicgenForCausalLM` (`model.decoder.*`, `lm_heads.*`).
Format written: audiocraft `state_dict.bin` with a synthesized (or updated original) `xp.cfg`, loadable by
audiocraft's own `loaders.load_lm_model_magnet` / `load_lm_model` with strict `load_state_dict`.

Mapping (docs/design.md §10.3): torch Linear `[out, in]` -> kernel `[in, out]`; packed `in_proj_weight` rows q/k/v ->
three `[D, H, Dh]` kernels; `out_proj` -> `[H, Dh, D]`; embeddings as is; T5 `output_proj` -> `cond_proj`. Every
importer checks keys and shapes strictly (`weights.check_state_dict`) and casts to the config's `param_dtype` (fp16
releases).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import yaml

from magnet_jax.checkpoints.weights import check_state_dict, load_safetensors, load_torch_pickle, xp_cfg_value
from magnet_jax.fileio import WeightsError, atomic_directory, flatten_dict, resolve_file, unflatten_dict
from magnet_jax.models import objectives
from magnet_jax.models.lm import LMConfig

AUDIOCRAFT_LM_FILE = "state_dict.bin"
AUDIOCRAFT_CODEC_FILE = "compression_state_dict.bin"
HF_CONFIG_FILE = "config.json"
HF_WEIGHTS_FILE = "model.safetensors"
HF_WEIGHTS_INDEX = "model.safetensors.index.json"
COND_PROJ = "condition_provider.conditioners.description.output_proj"
MAGNET, MUSICGEN = "transformer_lm_magnet", "transformer_lm"
HYBRID_SOLVER = "hybrid_magnet"  # xp.cfg `solver` of Hybrid-MAGNeT checkpoints (audiocraft branch hybrid_magnet)

# Per-layer tensors: audiocraft name suffix -> (our path inside a block, conversion kind).
_LAYER = (
    ("norm1.weight", "norm1/scale", "copy"),
    ("norm1.bias", "norm1/bias", "copy"),
    ("norm_cross.weight", "norm_cross/scale", "copy"),
    ("norm_cross.bias", "norm_cross/bias", "copy"),
    ("norm2.weight", "norm2/scale", "copy"),
    ("norm2.bias", "norm2/bias", "copy"),
    ("self_attn.in_proj_weight", "self_attn", "qkv"),
    ("self_attn.out_proj.weight", "self_attn/out/kernel", "out"),
    ("cross_attention.in_proj_weight", "cross_attn", "qkv"),
    ("cross_attention.out_proj.weight", "cross_attn/out/kernel", "out"),
    ("linear1.weight", "linear1/kernel", "linear"),
    ("linear2.weight", "linear2/kernel", "linear"),
)
_QKV = ("query", "key", "value")


# ------------------------------------------------------------------------------------------------------------------
# Layer layout (scanned `blocks/...` with a leading [N] axis, or `block_{i}/...`)


def set_layer_layout(params: Mapping, scan_layers: bool) -> dict:
    """Returns `params` with the transformer layers stacked (`scan_layers`) or split per layer.

    A tree already in the requested layout is returned as is; re-laid-out leaves are host NumPy arrays.
    """
    params = dict(params)
    if scan_layers == ("blocks" in params):
        return params
    if scan_layers:
        names = sorted((k for k in params if k.startswith("block_")), key=lambda k: int(k.split("_")[1]))
        layers = [flatten_dict(params.pop(k)) for k in names]
        params["blocks"] = unflatten_dict({p: np.stack([np.asarray(layer[p]) for layer in layers]) for p in layers[0]})
    else:
        stacked = {p: np.asarray(v) for p, v in flatten_dict(params.pop("blocks")).items()}
        num_layers = len(next(iter(stacked.values())))
        for i in range(num_layers):
            params[f"block_{i}"] = unflatten_dict({p: v[i] for p, v in stacked.items()})
    return params


# ------------------------------------------------------------------------------------------------------------------
# audiocraft state dict <-> params


def audiocraft_shapes(config: LMConfig) -> dict[str, tuple[int, ...]]:
    """Every `best_state` key of the LM (incl. the T5 output projection) and its shape (docs/design.md §10.3)."""
    d, f = config.dim, config.ffn_dim
    shapes = {f"emb.{k}.weight": (config.card + 1, d) for k in range(config.n_q)}
    shapes.update({f"linears.{k}.weight": (config.card, d) for k in range(config.n_q)})
    shapes.update(
        {
            "out_norm.weight": (d,),
            "out_norm.bias": (d,),
            f"{COND_PROJ}.weight": (d, config.cond_dim),
            f"{COND_PROJ}.bias": (d,),
        }
    )
    per_layer = {
        "in_proj_weight": (3 * d, d),
        "out_proj.weight": (d, d),
        "linear1.weight": (f, d),
        "linear2.weight": (d, f),
    }
    for i in range(config.num_layers):
        for suffix, _, _ in _LAYER:
            shape = next((s for end, s in per_layer.items() if suffix.endswith(end)), (d,))
            shapes[f"transformer.layers.{i}.{suffix}"] = shape
    return shapes


def params_from_audiocraft(state: Mapping[str, np.ndarray], config: LMConfig, *, source: str) -> dict:
    """audiocraft-named LM state dict -> our param tree (layout and dtype from `config`).

    Raises WeightsError listing missing / unexpected / mis-shaped keys.
    """
    state = {re.sub(r"\.mha\.", ".", k): v for k, v in state.items()}  # torch-MHA variant of the same tensors
    check_state_dict(state, audiocraft_shapes(config), source=source)
    dtype = jnp.dtype(config.param_dtype)
    d, h = config.dim, config.num_heads
    flat = {}
    for k in range(config.n_q):
        flat[f"emb_{k}/embedding"] = state[f"emb.{k}.weight"]
        flat[f"head_{k}/kernel"] = state[f"linears.{k}.weight"].T
    flat.update(
        {
            "out_norm/scale": state["out_norm.weight"],
            "out_norm/bias": state["out_norm.bias"],
            "cond_proj/kernel": state[f"{COND_PROJ}.weight"].T,
            "cond_proj/bias": state[f"{COND_PROJ}.bias"],
        }
    )
    for i in range(config.num_layers):
        for suffix, path, kind in _LAYER:
            w = state[f"transformer.layers.{i}.{suffix}"]
            if kind == "qkv":
                for j, name in enumerate(_QKV):
                    flat[f"block_{i}/{path}/{name}/kernel"] = w[j * d : (j + 1) * d].T.reshape(d, h, d // h)
            elif kind == "out":
                flat[f"block_{i}/{path}"] = w.T.reshape(h, d // h, d)
            else:
                flat[f"block_{i}/{path}"] = w.T if kind == "linear" else w
    flat = {p: np.ascontiguousarray(np.asarray(v).astype(dtype)) for p, v in flat.items()}
    return set_layer_layout(unflatten_dict(flat), config.scan_layers)


def audiocraft_from_params(params: Mapping, config: LMConfig) -> dict[str, np.ndarray]:
    """Inverse of `params_from_audiocraft`: our param tree (either layout) -> audiocraft-named host arrays."""
    flat = flatten_dict(set_layer_layout(params, scan_layers=False))
    flat = {p: np.asarray(v) for p, v in flat.items()}
    d = config.dim
    state = {}
    for k in range(config.n_q):
        state[f"emb.{k}.weight"] = flat[f"emb_{k}/embedding"]
        state[f"linears.{k}.weight"] = flat[f"head_{k}/kernel"].T
    state.update(
        {
            "out_norm.weight": flat["out_norm/scale"],
            "out_norm.bias": flat["out_norm/bias"],
            f"{COND_PROJ}.weight": flat["cond_proj/kernel"].T,
            f"{COND_PROJ}.bias": flat["cond_proj/bias"],
        }
    )
    for i in range(config.num_layers):
        for suffix, path, kind in _LAYER:
            if kind == "qkv":
                w = np.concatenate([flat[f"block_{i}/{path}/{n}/kernel"].reshape(d, d).T for n in _QKV])
            elif kind == "out":
                w = flat[f"block_{i}/{path}"].reshape(d, d).T
            else:
                w = flat[f"block_{i}/{path}"]
                w = w.T if kind == "linear" else w
            state[f"transformer.layers.{i}.{suffix}"] = w
    return {k: np.ascontiguousarray(v) for k, v in state.items()}


# ------------------------------------------------------------------------------------------------------------------
# xp.cfg (audiocraft Hydra YAML) <-> config.json

# transformer_lm flags the port implements, with audiocraft's class default when the key is absent.
_REQUIRED_FLAGS = (
    ("norm_first", False, True),
    ("norm", "layer_norm", "layer_norm"),
    ("activation", None, "gelu"),
    ("bias_ff", True, False),
    ("bias_attn", True, False),
    ("bias_proj", True, False),
    ("positional_embedding", "sin", "sin"),
    ("positional_scale", 1.0, 1.0),
    ("layer_scale", None, None),
    ("qk_layer_norm", False, False),
    ("qk_layer_norm_cross", False, False),
    ("kv_repeat", 1, 1),
    ("past_context", None, None),
)
_GENERATE_KEYS = (  # xp.cfg generate.lm key -> config.json generate key
    ("use_sampling", "use_sampling"),
    ("temp", "temperature"),
    ("top_k", "top_k"),
    ("top_p", "top_p"),
    ("max_cfg_coef", "max_cfg"),
    ("min_cfg_coef", "min_cfg"),
    ("decoding_steps", "decoding_steps"),
    ("anneal_temp", "anneal_temp"),
    ("span_arrangement", "span_arrangement"),
    ("span_scoring", "span_scoring"),
)


def config_from_xp_cfg(xp: Mapping, *, cond_dim: int, source: str, scan_layers: bool = True) -> dict:
    """The config.json sections `model`, `conditioner`, `segment_seconds`, `generate` from a parsed `xp.cfg`.

    Architecture options the port does not implement are an error naming the field (never silently ignored).
    """

    def get(key, default=KeyError):
        try:
            return xp_cfg_value(xp, key, default)
        except KeyError as e:
            raise WeightsError(f"{source}: xp.cfg has no field {e.args[0]}") from None

    lm_model = get("lm_model")
    if lm_model not in (MAGNET, MUSICGEN):
        raise WeightsError(f"{source}: xp.cfg lm_model={lm_model!r} is not supported (expected {MAGNET} or {MUSICGEN})")
    for key, default, expected in _REQUIRED_FLAGS:
        value = get(f"transformer_lm.{key}", default)
        if value != expected:
            raise WeightsError(
                f"{source}: xp.cfg transformer_lm.{key}={value!r} is not supported (expected {expected!r})"
            )
    conditioners = get("conditioners", None) or {}
    if set(conditioners) != {"description"} or xp_cfg_value(conditioners, "description.model", None, root=xp) != "t5":
        raise WeightsError(
            f"{source}: xp.cfg conditioners={sorted(conditioners)} is not supported "
            "(expected one T5 conditioner named 'description')"
        )
    fuser = {k: list(get(f"fuser.{k}", None) or []) for k in ("cross", "prepend", "sum", "input_interpolate")}
    if fuser != {"cross": ["description"], "prepend": [], "sum": [], "input_interpolate": []} or get(
        "fuser.cross_attention_pos_emb", False
    ):
        raise WeightsError(
            f"{source}: xp.cfg fuser={fuser} is not supported (expected cross: [description] only, "
            "no cross_attention_pos_emb)"
        )
    pattern = get("codebooks_pattern.modeling", None)
    n_q = int(get("transformer_lm.n_q"))
    objective = _xp_objective(xp, lm_model, source)
    if (lm_model == MUSICGEN or objective.delay_layout) and (
        pattern != "delay"
        or list(get("codebooks_pattern.delay.delays")) != list(range(n_q))
        or int(get("codebooks_pattern.delay.flatten_first", 0)) != 0
        or int(get("codebooks_pattern.delay.empty_initial", 0)) != 0
    ):
        raise WeightsError(
            f"{source}: xp.cfg codebooks_pattern={pattern!r} is not supported for "
            f"{'MusicGen' if lm_model == MUSICGEN else objective.title} "
            f"(expected delay with delays {list(range(n_q))}, flatten_first 0, empty_initial 0)"
        )
    if lm_model == MAGNET and not objective.delay_layout and pattern != "parallel":
        raise WeightsError(
            f"{source}: xp.cfg codebooks_pattern.modeling={pattern!r} is not supported for MAGNeT (expected parallel)"
        )
    causal = bool(get("transformer_lm.causal", False))
    if causal == (lm_model == MAGNET):
        raise WeightsError(
            f"{source}: xp.cfg transformer_lm.causal={causal} is not supported for {lm_model} (expected {not causal})"
        )
    dim, hidden_scale = int(get("transformer_lm.dim")), get("transformer_lm.hidden_scale", 4)
    if float(hidden_scale) != int(hidden_scale):
        raise WeightsError(f"{source}: xp.cfg transformer_lm.hidden_scale={hidden_scale} must be an integer")
    model = LMConfig(
        dim=dim,
        num_heads=int(get("transformer_lm.num_heads")),
        num_layers=int(get("transformer_lm.num_layers")),
        hidden_scale=int(hidden_scale),
        n_q=n_q,
        card=int(get("transformer_lm.card")),
        cond_dim=cond_dim,
        causal=causal,
        subcodes_context=int(get("transformer_lm.subcodes_context", 5)),
        max_period=float(get("transformer_lm.max_period", 10000.0)),
        scan_layers=scan_layers,
    )
    generate = {
        ours: get(f"generate.lm.{theirs}")
        for theirs, ours in _GENERATE_KEYS
        if get(f"generate.lm.{theirs}", None) is not None
    }
    if "temperature" not in generate and get("generate.lm.temperature", None) is not None:
        generate["temperature"] = get("generate.lm.temperature")
    if "decoding_steps" in generate:
        generate["decoding_steps"] = [int(s) for s in generate["decoding_steps"]]
    if lm_model == MAGNET:
        generate["span_len"] = int(get("masking.span_len", 3))
    else:
        generate["cfg_coef"] = float(get("classifier_free_guidance.inference_coef", 3.0))
    config = {
        "model": model.to_dict(),
        "conditioner": {"t5": str(get("conditioners.description.t5.name")), "t5_dim": cond_dim},
        "segment_seconds": float(get("dataset.segment_duration")),
        "generate": generate,
    }
    if objective.delay_layout:  # MAGNeT is the default of a config.json without "objective"
        config["objective"] = objective.name
    return config


def _xp_objective(xp: Mapping, lm_model: str, source: str) -> objectives.Objective:
    """The objective of an audiocraft MAGNeT LM: Hybrid-MAGNeT when `solver` is the hybrid solver of audiocraft's
    `hybrid_magnet` branch (which keeps `lm_model: transformer_lm_magnet`), MAGNeT otherwise (docs/design.md §7.4)."""
    solver = xp_cfg_value(xp, "solver", None)
    if solver == HYBRID_SOLVER and lm_model != MAGNET:
        raise WeightsError(f"{source}: xp.cfg solver={solver!r} needs lm_model={MAGNET!r} (found {lm_model!r})")
    return objectives.HYBRID if solver == HYBRID_SOLVER else objectives.MAGNET


def _xp_cfg_template(config: Mapping) -> dict:
    """A complete audiocraft config for a model trained here (the keys audiocraft's builders and loaders read)."""
    model = config["model"]
    magnet, hybrid = not model["causal"], objectives.of_config(config, "config.json").delay_layout
    n_q = model["n_q"]
    pattern = (
        {"modeling": "parallel", "parallel": {"empty_initial": -1}}
        if magnet and not hybrid
        else {"modeling": "delay", "delay": {"delays": list(range(n_q)), "flatten_first": 0, "empty_initial": 0}}
    )
    return {
        "lm_model": MAGNET if magnet else MUSICGEN,
        "solver": HYBRID_SOLVER if hybrid else "magnet" if magnet else "musicgen",
        "device": "cpu",
        "dtype": "float32",
        "efficient_attention_backend": "xformers",
        "codebooks_pattern": pattern,
        "transformer_lm": {
            "dropout": 0.0,
            "emb_lr": None,
            "activation": "gelu",
            "norm_first": True,
            "bias_ff": False,
            "bias_attn": False,
            "bias_proj": False,
            "past_context": None,
            "custom": False,
            "memory_efficient": True,
            "attention_as_float32": False,
            "layer_scale": None,
            "positional_embedding": "sin",
            "xpos": False,
            "checkpointing": "none",
            "weight_init": "gaussian",
            "depthwise_init": "current",
            "zero_bias_init": True,
            "norm": "layer_norm",
            "cross_attention": True,
            "qk_layer_norm": False,
            "qk_layer_norm_cross": False,
            "attention_dropout": None,
            "kv_repeat": 1,
            "two_step_cfg": False,
            # audiocraft's MAGNeT loader overwrites these three from the codec and dataset/masking sections
            **({"compression_model_framerate": 50, "segment_duration": 0, "span_len": -1} if magnet else {}),
        },
        "classifier_free_guidance": {"training_dropout": 0.3, "inference_coef": 3.0},
        "attribute_dropout": {},
        "fuser": {
            "cross_attention_pos_emb": False,
            "cross_attention_pos_emb_scale": 1,
            "sum": [],
            "prepend": [],
            "cross": ["description"],
            "input_interpolate": [],
        },
        "conditioners": {
            "description": {
                "model": "t5",
                "t5": {"name": "", "finetune": False, "word_dropout": 0.3, "normalize_text": False},
            }
        },
        "dataset": {},
        "masking": {"span_len": 3},
        "generate": {"lm": {}},
    }


def xp_cfg_from_config(config: Mapping) -> str:
    """`xp.cfg` YAML for a config.json: the original audiocraft config (if imported) updated with our values."""
    original = config.get("audiocraft_cfg")
    xp = yaml.safe_load(original) if original else _xp_cfg_template(config)
    model, magnet = config["model"], not config["model"]["causal"]
    if model["norm_eps"] != 1e-5:
        raise WeightsError(f"model.norm_eps={model['norm_eps']}: audiocraft's LayerNorms are fixed at 1e-5")
    if original and (xp.get("lm_model") == MAGNET) != magnet:
        raise WeightsError(f"audiocraft_cfg lm_model={xp.get('lm_model')!r} contradicts model.causal={not magnet}")
    objective = objectives.of_config(config, "config.json")
    if original and magnet and (xp.get("solver") == HYBRID_SOLVER) != objective.delay_layout:
        raise WeightsError(f"audiocraft_cfg solver={xp.get('solver')!r} contradicts objective={objective.name!r}")
    lm = xp.setdefault("transformer_lm", {})
    lm.update({k: model[k] for k in ("dim", "num_heads", "num_layers", "hidden_scale", "n_q", "card", "causal")})
    if magnet:
        lm["subcodes_context"] = model["subcodes_context"]
    if model["max_period"] != 10000.0 or "max_period" in lm:
        lm["max_period"] = model["max_period"]
    xp["conditioners"]["description"]["t5"]["name"] = config["conditioner"]["t5"]
    codec = str(config.get("codec", {}).get("source", ""))
    if codec and not Path(codec).expanduser().exists():  # a hub id: how audiocraft's solver names its codec
        xp["compression_model_checkpoint"] = f"//pretrained/{codec}"
    seconds = float(config["segment_seconds"])
    xp.setdefault("dataset", {})["segment_duration"] = int(seconds) if seconds.is_integer() else seconds
    generate = dict(config.get("generate", {}))
    if "span_len" in generate:
        xp.setdefault("masking", {})["span_len"] = generate.pop("span_len")
    if "cfg_coef" in generate:
        xp.setdefault("classifier_free_guidance", {})["inference_coef"] = generate.pop("cfg_coef")
    lm_gen = xp.setdefault("generate", {}).setdefault("lm", {})
    lm_gen.update({theirs: generate[ours] for theirs, ours in _GENERATE_KEYS if ours in generate})
    return yaml.safe_dump(xp, sort_keys=False)


# ------------------------------------------------------------------------------------------------------------------
# transformers MusicGen


def _hf_names(config: LMConfig, prefix: str, heads: str, cond_proj: bool) -> dict[str, tuple[str, ...]]:
    """transformers key -> audiocraft key(s) it forms (q/k/v projections concatenate into `in_proj_weight`)."""
    names: dict[str, tuple[str, ...]] = {}
    for k in range(config.n_q):
        names[f"{prefix}embed_tokens.{k}.weight"] = (f"emb.{k}.weight",)
        names[f"{heads}lm_heads.{k}.weight"] = (f"linears.{k}.weight",)
    for ours, theirs in (("out_norm.weight", "layer_norm.weight"), ("out_norm.bias", "layer_norm.bias")):
        names[prefix + theirs] = (ours,)
    if cond_proj:
        names.update(
            {"enc_to_dec_proj.weight": (f"{COND_PROJ}.weight",), "enc_to_dec_proj.bias": (f"{COND_PROJ}.bias",)}
        )
    for i in range(config.num_layers):
        ours, theirs = f"transformer.layers.{i}.", f"{prefix}layers.{i}."
        for attn, hf_attn in (("self_attn", "self_attn"), ("cross_attention", "encoder_attn")):
            for j, p in enumerate("qkv"):
                names[f"{theirs}{hf_attn}.{p}_proj.weight"] = (f"{ours}{attn}.in_proj_weight", str(j))
            names[f"{theirs}{hf_attn}.out_proj.weight"] = (f"{ours}{attn}.out_proj.weight",)
        for norm, hf_norm in (
            ("norm1", "self_attn_layer_norm"),
            ("norm_cross", "encoder_attn_layer_norm"),
            ("norm2", "final_layer_norm"),
        ):
            for w in ("weight", "bias"):
                names[f"{theirs}{hf_norm}.{w}"] = (f"{ours}{norm}.{w}",)
        names[f"{theirs}fc1.weight"] = (f"{ours}linear1.weight",)
        names[f"{theirs}fc2.weight"] = (f"{ours}linear2.weight",)
    return names


def config_from_hf(hf: Mapping, *, source: str, scan_layers: bool = True) -> tuple[dict, str, str, bool]:
    """(config.json sections, key prefix, heads prefix, has enc_to_dec_proj) for a MusicGen transformers config."""
    kind = hf.get("model_type")
    if kind not in ("musicgen", "musicgen_decoder"):
        raise WeightsError(
            f"{source}: config.json model_type={kind!r} is not supported (expected musicgen or musicgen_decoder)"
        )
    dec = hf["decoder"] if kind == "musicgen" else hf
    for key, expected in (("activation_function", "gelu"), ("scale_embedding", False)):
        if dec.get(key, expected) != expected:
            raise WeightsError(f"{source}: config.json {key}={dec.get(key)!r} is not supported (expected {expected!r})")
    dim, ffn = int(dec["hidden_size"]), int(dec["ffn_dim"])
    if ffn % dim:
        raise WeightsError(f"{source}: config.json ffn_dim={ffn} is not a multiple of hidden_size={dim}")
    text = hf.get("text_encoder", {}) if kind == "musicgen" else {}
    cond_dim = int(text.get("d_model", text.get("hidden_size", dim))) if kind == "musicgen" else dim
    model = LMConfig(
        dim=dim,
        num_heads=int(dec["num_attention_heads"]),
        num_layers=int(dec["num_hidden_layers"]),
        hidden_scale=ffn // dim,
        n_q=int(dec["num_codebooks"]),
        card=int(dec["vocab_size"]),
        cond_dim=cond_dim,
        causal=True,
        scan_layers=scan_layers,
    )
    config = {
        "model": model.to_dict(),
        "conditioner": {"t5": text.get("_name_or_path") or "", "t5_dim": cond_dim},
        "codec": {"source": hf.get("audio_encoder", {}).get("_name_or_path") or ""},
        # the file has no training segment or sampling settings: MusicGen's API defaults (docs/design.md §8)
        "segment_seconds": 30.0,
        "generate": {"use_sampling": True, "top_k": 250, "top_p": 0.0, "temperature": 1.0, "cfg_coef": 3.0},
    }
    if kind == "musicgen":
        return config, "decoder.model.decoder.", "decoder.", cond_dim != dim
    return config, "model.decoder.", "", False


def audiocraft_from_hf(
    state: Mapping[str, np.ndarray], config: LMConfig, *, prefix: str, heads: str, cond_proj: bool, source: str
) -> dict[str, np.ndarray]:
    """transformers MusicGen state dict -> audiocraft names (strict check in the file's own key names).

    Text/audio encoder keys (`text_encoder.*`, `audio_encoder.*`) belong to T5 / EnCodec and are ignored by name.
    Without `enc_to_dec_proj` (text dim == LM dim, or a decoder-only file) the projection is the identity.
    """
    names = _hf_names(config, prefix, heads, cond_proj)
    d, shapes = config.dim, audiocraft_shapes(config)
    hf_shapes = {theirs: (d, d) if part else shapes[ours] for theirs, (ours, *part) in names.items()}
    ignore = [k for k in state if k.startswith(("text_encoder.", "audio_encoder."))]
    check_state_dict(state, hf_shapes, source=source, ignore=ignore)
    out: dict[str, Any] = {}
    for theirs, (ours, *part) in names.items():
        if part:
            out.setdefault(ours, [None] * 3)[int(part[0])] = state[theirs]
        else:
            out[ours] = state[theirs]
    out = {k: np.concatenate(v) if isinstance(v, list) else v for k, v in out.items()}
    if not cond_proj:
        out[f"{COND_PROJ}.weight"] = np.eye(d, dtype=np.float32)
        out[f"{COND_PROJ}.bias"] = np.zeros((d,), np.float32)
    return out


# ------------------------------------------------------------------------------------------------------------------
# File-level import / export


def import_lm(source: str, *, scan_layers: bool = True) -> tuple[dict, dict]:
    """Reads released LM weights (audiocraft or transformers format) -> (config.json dict, params).

    `source`: a hub id, a directory, or the `state_dict.bin` / `model.safetensors` file itself. A directory or hub
    repo holding `state_dict.bin` is read as audiocraft (the MusicGen hub repos hold both formats).
    """
    path = Path(source).expanduser()
    if path.is_file():
        hf = path.suffix == ".safetensors" or path.name == HF_CONFIG_FILE
    elif path.is_dir():
        if (path / "params").is_dir():
            raise WeightsError(
                f"{path} is already a converted magnet_jax checkpoint (read it with "
                "magnet_jax.checkpoints.pretrained.load_pretrained)"
            )
        hf = not (path / AUDIOCRAFT_LM_FILE).exists() and (path / HF_CONFIG_FILE).exists()
    else:
        return _import_hub(str(source), scan_layers=scan_layers)
    return (import_transformers if hf else import_audiocraft)(source, scan_layers=scan_layers)


def _import_hub(repo_id: str, *, scan_layers: bool) -> tuple[dict, dict]:
    """A hub id: audiocraft `state_dict.bin` if the repository has one, else the transformers files."""
    try:
        return import_audiocraft(repo_id, scan_layers=scan_layers)
    except WeightsError as e:
        if not _hub_file_missing(e):  # offline, unreachable, no such repository: that error says it all
            raise
    try:
        return import_transformers(repo_id, scan_layers=scan_layers)
    except WeightsError as e:
        if not _hub_file_missing(e):
            raise
        raise WeightsError(
            f"LM weights: hub repository {repo_id} has neither {AUDIOCRAFT_LM_FILE} (audiocraft) nor "
            f"{HF_CONFIG_FILE} + {HF_WEIGHTS_FILE} (transformers)"
        ) from e


def _hub_file_missing(error: WeightsError) -> bool:
    """The hub answered that the repository lacks the file (not: offline and uncached, which subclasses it)."""
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    cause = error.__cause__
    return isinstance(cause, EntryNotFoundError) and not isinstance(cause, LocalEntryNotFoundError)


def import_audiocraft(source: str, *, scan_layers: bool = True) -> tuple[dict, dict]:
    """audiocraft `state_dict.bin` (hub id, directory or file) -> (config.json dict, params)."""
    what = "audiocraft LM weights"
    lm_file = resolve_file(source, AUDIOCRAFT_LM_FILE, what=what)
    pkg = load_torch_pickle(lm_file, what=what)
    if (
        not isinstance(pkg, Mapping)
        or not isinstance(pkg.get("best_state"), Mapping)
        or not isinstance(pkg.get("xp.cfg"), str)
    ):
        found = sorted(pkg) if isinstance(pkg, Mapping) else type(pkg).__name__
        raise WeightsError(
            f"{lm_file}: expected an exported audiocraft checkpoint with 'best_state' (dict) and "
            f"'xp.cfg' (YAML string); found {found}"
        )
    state = pkg["best_state"]
    try:
        xp = yaml.safe_load(pkg["xp.cfg"])
    except yaml.YAMLError as e:
        raise WeightsError(f"{lm_file}: xp.cfg is not valid YAML: {str(e).splitlines()[0]}") from e
    proj = state.get(f"{COND_PROJ}.weight")
    cond_dim = int(np.shape(proj)[1]) if np.ndim(proj) == 2 else 0  # the T5 width; 0 = missing, reported below
    config = config_from_xp_cfg(xp, cond_dim=cond_dim, source=str(lm_file), scan_layers=scan_layers)
    params = params_from_audiocraft(state, LMConfig(**config["model"]), source=str(lm_file))
    codec_source, codec_file = _codec_source(source, lm_file, xp)
    dtypes = sorted({str(np.asarray(v).dtype) for v in state.values()})
    config.update(
        codec={"source": codec_source},
        provenance={
            "source": str(source),
            "format": "audiocraft",
            "file": str(lm_file),
            "codec_file": codec_file,
            "lm_model": xp["lm_model"],
            "source_dtypes": dtypes,
            "version": str(pkg.get("version", "")),
        },
        audiocraft_cfg=pkg["xp.cfg"],
    )
    return config, params


def _codec_source(source: str, lm_file: Path, xp: Mapping) -> tuple[str, str]:
    """(codec source for `load_encodec`, the compression file read or ""): the sibling compression file, the hub id
    it points to, or the xp.cfg `compression_model_checkpoint`."""
    path = Path(source).expanduser()
    hub = not path.exists()
    try:
        codec_file = resolve_file(source if hub else lm_file.parent, AUDIOCRAFT_CODEC_FILE, what="audiocraft codec")
    except WeightsError:
        checkpoint = str(xp.get("compression_model_checkpoint") or "")
        return checkpoint.removeprefix("//pretrained/"), ""
    pkg = load_torch_pickle(codec_file, what="audiocraft codec")
    if isinstance(pkg, Mapping) and isinstance(pkg.get("pretrained"), str):
        return pkg["pretrained"], str(codec_file)
    return (source if hub else str(codec_file.resolve())), str(codec_file)


def import_transformers(source: str, *, scan_layers: bool = True) -> tuple[dict, dict]:
    """transformers MusicGen (`MusicgenForConditionalGeneration` / `MusicgenForCausalLM`) -> (config, params)."""
    what = "transformers MusicGen weights"
    path = Path(source).expanduser()
    location = path.parent if path.is_file() else source
    config_file = resolve_file(location, HF_CONFIG_FILE, what=what)
    try:
        hf = json.loads(Path(config_file).read_text())
    except (OSError, ValueError) as e:
        raise WeightsError(f"{config_file}: not a readable JSON config: {str(e).splitlines()[0]}") from e
    config, prefix, heads, cond_proj = config_from_hf(hf, source=str(config_file), scan_layers=scan_layers)
    state, files = _read_safetensors(location, what=what)
    lm_config = LMConfig(**config["model"])
    state = audiocraft_from_hf(state, lm_config, prefix=prefix, heads=heads, cond_proj=cond_proj, source=files[0])
    params = params_from_audiocraft(state, lm_config, source=files[0])
    config["provenance"] = {
        "source": str(source),
        "format": "transformers",
        "file": ", ".join(files),
        "model_type": hf["model_type"],
    }
    return config, params


def _read_safetensors(location, *, what: str) -> tuple[dict[str, np.ndarray], list[str]]:
    """`model.safetensors`, or every shard named by `model.safetensors.index.json`."""
    try:
        file = resolve_file(location, HF_WEIGHTS_FILE, what=what)
        return load_safetensors(file, what=what), [str(file)]
    except WeightsError as single_error:
        if not Path(str(location)).expanduser().exists() and not _hub_file_missing(single_error):
            raise  # offline / unreachable hub: no point asking for the index
        try:
            index_file = resolve_file(location, HF_WEIGHTS_INDEX, what=what)
        except WeightsError:
            raise single_error from None
    try:
        shards = sorted(set(json.loads(Path(index_file).read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, AttributeError) as e:
        raise WeightsError(f"{index_file}: not a safetensors index with a weight_map ({e})") from e
    state, files = {}, []
    for shard in shards:
        file = resolve_file(location, shard, what=what)
        state.update(load_safetensors(file, what=what))
        files.append(str(file))
    return state, files


def export_audiocraft(
    directory: str | Path, params: Mapping, config: Mapping, *, dtype: str = "float32", overwrite: bool = False
) -> Path:
    """Writes an audiocraft model directory: `state_dict.bin` (`best_state`, `xp.cfg`, `version`, `exported`) and,
    when the codec source is a hub id or an audiocraft file, `compression_state_dict.bin` (pointer or copy).

    Atomic: everything is written to a temporary sibling directory that is renamed into place.
    """
    try:
        import torch  # the `convert` extra
    except ImportError as e:
        raise WeightsError("writing audiocraft checkpoints needs torch: pip install 'magnet_jax[convert]'") from e

    lm_config = LMConfig(**config["model"])
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    state = audiocraft_from_params(params, lm_config)
    best_state = {k: torch.from_numpy(v.astype(np.float32)).to(torch_dtype) for k, v in state.items()}
    pkg = {"best_state": best_state, "xp.cfg": xp_cfg_from_config(config), "version": "1.3.0", "exported": True}
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        torch.save(pkg, tmp / AUDIOCRAFT_LM_FILE)
        codec = str(config.get("codec", {}).get("source", ""))
        codec_path = Path(codec).expanduser()
        if codec and (codec_path.is_file() or (codec_path / AUDIOCRAFT_CODEC_FILE).is_file()):
            shutil.copyfile(resolve_file(codec_path, AUDIOCRAFT_CODEC_FILE, what="codec"), tmp / AUDIOCRAFT_CODEC_FILE)
        elif codec and not codec_path.exists():
            torch.save({"pretrained": codec, "exported": True, "version": "1.3.0"}, tmp / AUDIOCRAFT_CODEC_FILE)
        else:
            logging.warning(
                "codec source %r is not a hub id or an audiocraft compression file; %s not written",
                codec,
                AUDIOCRAFT_CODEC_FILE,
            )
    return Path(directory)
