"""Released EnCodec weights -> `magnet_jax.models.encodec` params (weight norm folded, PyTorch layouts transposed).

Two on-disk formats, told apart automatically by `load_encodec(source)`:
  * transformers (`facebook/encodec_32khz`): `config.json` + `model.safetensors`, read without torch. Weight-normed
    convs are `<conv>.weight_g` / `weight_v` (hub files) or `<conv>.parametrizations.weight.original0` /
    `original1` (transformers 5 `save_pretrained`).
  * audiocraft: `compression_state_dict.bin` (torch pickle, read with `weights_only=True`), either
    `{'best_state': state dict, 'xp.cfg': YAML}` or a pointer `{'pretrained': 'facebook/encodec_32khz'}` that is
    loaded through the transformers path (MAGNeT repos ship the pointer).
`source` is a hub id, a local directory holding either layout, or the `.bin` file itself. Every tensor must match
the architecture of the loaded config (`magnet_jax.checkpoints.weights.check_state_dict`); only the quantizer's training
state (`embed_avg`, `cluster_size`, `inited`) is skipped. The padding mode is the one in the loaded config.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import yaml

from magnet_jax.checkpoints.weights import (
    check_state_dict,
    load_safetensors,
    load_torch_pickle,
    resolve_interpolation,
    xp_cfg_value,
)
from magnet_jax.fileio import WeightsError, flatten_dict, resolve_file, unflatten_dict
from magnet_jax.models.encodec import EncodecConfig, abstract_params

WHAT = "EnCodec weights"
AUDIOCRAFT_FILE = "compression_state_dict.bin"
HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
_PRETRAINED_PREFIX = "//pretrained/"
# Weight-norm parameter names: (g, v) as written by torch.nn.utils.weight_norm and by parametrizations.weight_norm.
_WEIGHT_NORM_NAMES = (
    ("weight_g", "weight_v"),
    ("parametrizations.weight.original0", "parametrizations.weight.original1"),
)
_QUANTIZER_TRAINING_STATE = ("embed_avg", "cluster_size", "inited")


def load_encodec(source: str | os.PathLike) -> tuple[EncodecConfig, dict]:
    """Loads EnCodec weights from a hub id, a local directory or a `compression_state_dict.bin` file.

    Returns:
      (config, params): the architecture read from the checkpoint's own config, and a param tree for
      `magnet_jax.models.encodec.encode/decode` (float32 device arrays).
    Raises:
      WeightsError: one-line message naming the file/key when the source is missing, unreadable or mismatched.
    """
    return _load(source, via_pointer=False)


def _load(source, *, via_pointer: bool) -> tuple[EncodecConfig, dict]:
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix == ".safetensors" or path.name == HF_CONFIG:
            raise WeightsError(
                f"{WHAT}: {path} is part of a transformers checkpoint; pass its directory "
                f"(holding {HF_CONFIG} and {HF_WEIGHTS})"
            )
        return _load_audiocraft(path, via_pointer=via_pointer)
    if path.is_dir():
        if (path / AUDIOCRAFT_FILE).is_file():
            return _load_audiocraft(path / AUDIOCRAFT_FILE, via_pointer=via_pointer)
        if (path / HF_CONFIG).is_file():
            return _load_transformers(path)
        raise WeightsError(
            f"{WHAT}: directory {path} has neither {AUDIOCRAFT_FILE} (audiocraft) nor "
            f"{HF_CONFIG} + {HF_WEIGHTS} (transformers)"
        )
    return _load_hub(str(source), via_pointer=via_pointer)


def _load_hub(repo_id: str, *, via_pointer: bool) -> tuple[EncodecConfig, dict]:
    """A hub id: an audiocraft repo (MAGNeT/MusicGen: compression_state_dict.bin) or a transformers one."""
    from huggingface_hub.errors import EntryNotFoundError

    try:
        file = resolve_file(repo_id, AUDIOCRAFT_FILE, what=WHAT)
    except WeightsError as e:
        if not isinstance(e.__cause__, EntryNotFoundError):
            raise  # not a hub id (bad local path) or the hub refused the repository
        try:
            return _load_transformers(repo_id)
        except WeightsError as e2:
            if not isinstance(e2.__cause__, EntryNotFoundError):
                raise
            raise WeightsError(
                f"{WHAT}: hub id {repo_id!r} gave neither {AUDIOCRAFT_FILE} (audiocraft) nor {HF_CONFIG} + "
                f"{HF_WEIGHTS} (transformers) (offline, not cached or not an EnCodec repository: "
                f"{type(e2.__cause__).__name__}); pass a local directory instead"
            ) from e2
    return _load_audiocraft(file, via_pointer=via_pointer)


def _load_transformers(source: str | os.PathLike) -> tuple[EncodecConfig, dict]:
    config_file = resolve_file(source, HF_CONFIG, what=WHAT)
    weights_file = resolve_file(source, HF_WEIGHTS, what=WHAT)
    try:
        hf_config = json.loads(Path(config_file).read_text())
        if not isinstance(hf_config, dict):
            raise ValueError("expected a JSON object")
        config = config_from_hf(hf_config)
    except (ValueError, TypeError, KeyError) as e:  # json.JSONDecodeError is a ValueError
        raise WeightsError(f"{WHAT}: {config_file}: {e}") from e
    state = load_safetensors(weights_file, what=WHAT)
    return config, params_from_state_dict(config, state, layout="transformers", source=str(weights_file))


def _load_audiocraft(file: Path, *, via_pointer: bool) -> tuple[EncodecConfig, dict]:
    package = load_torch_pickle(file, what=WHAT)
    if not isinstance(package, Mapping):
        raise WeightsError(
            f"{WHAT}: {file}: expected a dict with 'best_state' and 'xp.cfg' or 'pretrained', "
            f"got {type(package).__name__}"
        )
    if "pretrained" in package:
        if via_pointer:
            raise WeightsError(f"{WHAT}: {file}: a 'pretrained' pointer leads to another pointer")
        target = str(package["pretrained"])
        target = target[len(_PRETRAINED_PREFIX) :] if target.startswith(_PRETRAINED_PREFIX) else target
        try:
            return _load(target, via_pointer=True)
        except WeightsError as e:
            raise WeightsError(f"{file} points to pretrained {target!r}; {e}") from e
    missing = [key for key in ("best_state", "xp.cfg") if key not in package]
    if missing:
        raise WeightsError(f"{WHAT}: {file}: missing {', '.join(missing)} (keys: {', '.join(map(str, package))})")
    if not isinstance(package["best_state"], Mapping):
        raise WeightsError(
            f"{WHAT}: {file}: best_state is a {type(package['best_state']).__name__}, expected a state dict"
        )
    try:
        xp = package["xp.cfg"]
        xp = yaml.safe_load(xp) if isinstance(xp, str) else xp
        if not isinstance(xp, Mapping):
            raise ValueError("expected a YAML mapping")
        config = config_from_audiocraft(xp)
    except (ValueError, TypeError, KeyError, yaml.YAMLError) as e:
        raise WeightsError(f"{WHAT}: {file}: xp.cfg: {str(e).splitlines()[0]}") from e
    return config, params_from_state_dict(config, package["best_state"], layout="audiocraft", source=str(file))


# ------------------------------------------------------------------------------------------------------------
# Foreign configs -> EncodecConfig

_HF_DEFAULTS = dict(
    target_bandwidths=[1.5, 3.0, 6.0, 12.0, 24.0],
    sampling_rate=24_000,
    audio_channels=1,
    normalize=False,
    chunk_length_s=None,
    hidden_size=128,
    num_filters=32,
    num_residual_layers=1,
    upsampling_ratios=[8, 5, 4, 2],
    norm_type="weight_norm",
    kernel_size=7,
    last_kernel_size=7,
    residual_kernel_size=3,
    dilation_growth_rate=2,
    use_causal_conv=True,
    pad_mode="reflect",
    compress=2,
    num_lstm_layers=2,
    codebook_size=1024,
    codebook_dim=None,
    use_conv_shortcut=True,
)

# Defaults of audiocraft's SEANetEncoder/Decoder and ResidualVectorQuantizer (used for keys absent from xp.cfg).
_SEANET_DEFAULTS = dict(
    channels=1,
    dimension=128,
    n_filters=32,
    n_residual_layers=3,
    ratios=[8, 5, 4, 2],
    activation="ELU",
    activation_params={"alpha": 1.0},
    norm="none",
    kernel_size=7,
    last_kernel_size=7,
    residual_kernel_size=3,
    dilation_base=2,
    causal=False,
    pad_mode="reflect",
    true_skip=True,
    compress=2,
    lstm=0,
    final_activation=None,
)
_RVQ_DEFAULTS = dict(n_q=8, bins=1024)


def config_from_hf(hf: Mapping[str, Any]) -> EncodecConfig:
    """From a transformers `EncodecConfig` dict (`config.json`); absent keys take transformers' defaults.

    K is transformers' `num_quantizers` (all quantizer layers, set by the largest target bandwidth).
    """
    if hf.get("model_type", "encodec") != "encodec":
        raise ValueError(f"model_type={hf['model_type']!r}: expected an 'encodec' config")
    c = {**_HF_DEFAULTS, **hf}
    unsupported = {"use_causal_conv": False, "normalize": False, "norm_type": "weight_norm", "chunk_length_s": None}
    for key, supported in unsupported.items():
        if c[key] != supported:
            raise ValueError(
                f"{key}={c[key]!r} is not supported (expected {supported!r}: the MAGNeT codecs "
                "are non-causal, weight-normed and unchunked)"
            )
    if c["codebook_dim"] not in (None, c["hidden_size"]):
        raise ValueError(f"codebook_dim={c['codebook_dim']} differs from hidden_size={c['hidden_size']}")
    hop = math.prod(c["upsampling_ratios"])
    frame_rate = math.ceil(c["sampling_rate"] / hop)
    bits = math.ceil(math.log2(c["codebook_size"]))
    n_q = int(1000 * c["target_bandwidths"][-1] // (frame_rate * bits))
    return EncodecConfig(
        sample_rate=c["sampling_rate"],
        ratios=c["upsampling_ratios"],
        n_filters=c["num_filters"],
        dimension=c["hidden_size"],
        card=c["codebook_size"],
        n_q=n_q,
        channels=c["audio_channels"],
        num_lstm_layers=c["num_lstm_layers"],
        pad_mode=c["pad_mode"],
        n_residual_layers=c["num_residual_layers"],
        compress=c["compress"],
        kernel_size=c["kernel_size"],
        last_kernel_size=c["last_kernel_size"],
        residual_kernel_size=c["residual_kernel_size"],
        dilation_base=c["dilation_growth_rate"],
        true_skip=not c["use_conv_shortcut"],
    )


def config_from_audiocraft(xp: Mapping[str, Any]) -> EncodecConfig:
    """From audiocraft's training config (`xp.cfg` of `compression_state_dict.bin`, YAML parsed to a dict).

    Reads `sample_rate`, `channels`, `encodec`, `seanet` (with its `encoder`/`decoder` overrides) and `rvq`;
    `${a.b}` interpolations are resolved.
    """

    def get(section: Mapping, key: str, default):
        return xp_cfg_value(section, key, default, root=xp)

    if get(xp, "compression_model", "encodec") != "encodec":
        raise ValueError(f"compression_model={xp['compression_model']!r}: expected 'encodec'")
    encodec = get(xp, "encodec", {})
    for key, supported in (("autoencoder", "seanet"), ("quantizer", "rvq"), ("causal", False), ("renormalize", False)):
        if get(encodec, key, supported) != supported:
            raise ValueError(f"encodec.{key}={encodec[key]!r} is not supported (expected {supported!r})")
    seanet = get(xp, "seanet", {})
    common = {k: get(seanet, k, v) for k, v in _SEANET_DEFAULTS.items()}
    sides = {
        side: {**common, **{k: resolve_interpolation(v, xp) for k, v in (get(seanet, side, None) or {}).items()}}
        for side in ("encoder", "decoder")
    }
    for key in _SEANET_DEFAULTS:
        if key != "final_activation" and sides["encoder"][key] != sides["decoder"][key]:
            raise ValueError(
                f"seanet.encoder.{key}={sides['encoder'][key]!r} differs from "
                f"seanet.decoder.{key}={sides['decoder'][key]!r}; asymmetric codecs are not supported"
            )
    s = sides["decoder"]
    checks = {
        "causal": (s["causal"], False),
        "activation": (s["activation"], "ELU"),
        "activation_params.alpha": (dict(s["activation_params"] or {}).get("alpha", 1.0), 1.0),
        "final_activation": (s["final_activation"], None),
    }
    for key, (value, supported) in checks.items():
        if value != supported:
            raise ValueError(f"seanet.{key}={value!r} is not supported (expected {supported!r})")
    if s["norm"] not in ("weight_norm", "none"):
        raise ValueError(f"seanet.norm={s['norm']!r} is not supported (expected 'weight_norm' or 'none')")
    rvq = {k: get(get(xp, "rvq", {}), k, v) for k, v in _RVQ_DEFAULTS.items()}
    sample_rate = get(xp, "sample_rate", get(encodec, "sample_rate", None))
    if sample_rate is None:
        raise ValueError("sample_rate is missing (expected at the top level or in encodec.sample_rate)")
    return EncodecConfig(
        sample_rate=sample_rate,
        ratios=s["ratios"],
        n_filters=s["n_filters"],
        dimension=s["dimension"],
        card=rvq["bins"],
        n_q=rvq["n_q"],
        channels=s["channels"],
        num_lstm_layers=s["lstm"],
        pad_mode=s["pad_mode"],
        n_residual_layers=s["n_residual_layers"],
        compress=s["compress"],
        kernel_size=s["kernel_size"],
        last_kernel_size=s["last_kernel_size"],
        residual_kernel_size=s["residual_kernel_size"],
        dilation_base=s["dilation_base"],
        true_skip=s["true_skip"],
    )


# ------------------------------------------------------------------------------------------------------------
# State dict -> params


def _module_names(config: EncodecConfig) -> dict[tuple[str, ...], tuple[str, str]]:
    """Flax module path -> (transformers module name, kind in conv|convtr|residual|lstm).

    Both reference models are an `nn.Sequential` whose ELUs take indices too: encoder = conv, per stride
    (residual units, ELU, strided conv), [LSTM], ELU, conv; decoder = conv, [LSTM], per stride (ELU,
    transposed conv, residual units), ELU, conv.
    """
    names = {("encoder", "conv_in"): ("encoder.layers.0", "conv")}
    i = 1
    for b in range(len(config.ratios)):
        for j in range(config.n_residual_layers):
            names[("encoder", f"block_{b}", f"res_{j}")] = (f"encoder.layers.{i}", "residual")
            i += 1
        names[("encoder", f"block_{b}", "down")] = (f"encoder.layers.{i + 1}", "conv")
        i += 2
    if config.num_lstm_layers:
        names[("encoder", "lstm")] = (f"encoder.layers.{i}", "lstm")
        i += 1
    names[("encoder", "conv_out")] = (f"encoder.layers.{i + 1}", "conv")

    names[("decoder", "conv_in")] = ("decoder.layers.0", "conv")
    i = 1
    if config.num_lstm_layers:
        names[("decoder", "lstm")] = ("decoder.layers.1", "lstm")
        i += 1
    for b in range(len(config.ratios)):
        names[("decoder", f"block_{b}", "up")] = (f"decoder.layers.{i + 1}", "convtr")
        i += 2
        for j in range(config.n_residual_layers):
            names[("decoder", f"block_{b}", f"res_{j}")] = (f"decoder.layers.{i}", "residual")
            i += 1
    names[("decoder", "conv_out")] = (f"decoder.layers.{i + 1}", "conv")
    return names


def _conv_prefix(module: str, sub: str, layout: str, transposed: bool) -> str:
    """Tensor-name prefix of a conv (`sub` = "" or "block.1" / "block.3" / "shortcut" inside a residual unit).

    transformers: `encoder.layers.3.conv`; audiocraft: `encoder.model.3.conv.conv` (`.convtr.convtr` if transposed).
    """
    if layout == "transformers":
        return ".".join(filter(None, (module, sub, "conv")))
    module = module.replace(".layers.", ".model.")
    return ".".join(filter(None, (module, sub, "convtr.convtr" if transposed else "conv.conv")))


def params_from_state_dict(config: EncodecConfig, state: Mapping[str, np.ndarray], *, layout: str, source: str) -> dict:
    """Converts a PyTorch EnCodec state dict (`layout` "transformers" or "audiocraft") into params.

    Checks every name and shape against `config` first (WeightsError listing all differences), then folds weight
    norm W = g · v / ‖v‖ (norm over all axes but 0), turns conv weights [out, in, k] and transposed-conv weights
    [in, out, k] into kernels [k, in, out], transposes LSTM matrices and sums their two biases.
    """
    if layout not in ("transformers", "audiocraft"):
        raise ValueError(f"layout={layout!r}: expected 'transformers' or 'audiocraft'")
    shapes = {path: leaf.shape for path, leaf in flatten_dict(nn.unbox(abstract_params(config))).items()}
    convs: dict[str, tuple[str, bool]] = {}  # tensor-name prefix -> (flax module path "a/b", transposed)
    lstms: dict[str, str] = {}
    for path, (module, kind) in _module_names(config).items():
        if kind == "residual":
            subs = [("conv_a", "block.1"), ("conv_b", "block.3")]
            subs += [] if config.true_skip else [("shortcut", "shortcut")]
            for flax_name, sub in subs:
                convs[_conv_prefix(module, sub, layout, False)] = ("/".join(path + (flax_name,)), False)
        elif kind == "lstm":
            module = module if layout == "transformers" else module.replace(".layers.", ".model.")
            lstms[f"{module}.lstm"] = "/".join(path)
        else:
            convs[_conv_prefix(module, "", layout, kind == "convtr")] = ("/".join(path), kind == "convtr")
    codebook = "quantizer.layers.{}.codebook" if layout == "transformers" else "quantizer.vq.layers.{}._codebook"

    expected: dict[str, tuple[int, ...]] = {}
    for prefix, (path, transposed) in convs.items():
        k, c_in, c_out = shapes[f"{path}/kernel"]
        weight = (c_in, c_out, k) if transposed else (c_out, c_in, k)
        norm_names = next(
            ((g, v) for g, v in _WEIGHT_NORM_NAMES if f"{prefix}.{g}" in state or f"{prefix}.{v}" in state), None
        )
        if norm_names:
            expected[f"{prefix}.{norm_names[0]}"] = (weight[0], 1, 1)
            expected[f"{prefix}.{norm_names[1]}"] = weight
        else:
            expected[f"{prefix}.weight"] = weight
        expected[f"{prefix}.bias"] = (c_out,)
    for prefix, path in lstms.items():
        for layer in range(config.num_lstm_layers):
            gates = shapes[f"{path}/layer_{layer}/bias"][0]
            for name in ("weight_ih", "weight_hh"):
                expected[f"{prefix}.{name}_l{layer}"] = (gates, gates // 4)
            for name in ("bias_ih", "bias_hh"):
                expected[f"{prefix}.{name}_l{layer}"] = (gates,)
    for level in range(config.n_q):
        expected[f"{codebook.format(level)}.embed"] = (config.card, config.dimension)
    ignore = [f"{codebook.format(level)}.{name}" for level in range(config.n_q) for name in _QUANTIZER_TRAINING_STATE]
    check_state_dict(state, expected, source=source, ignore=ignore)

    params: dict[str, np.ndarray] = {}
    for prefix, (path, transposed) in convs.items():
        weight = _folded_weight(state, prefix)
        params[f"{path}/kernel"] = weight.transpose(2, 0, 1) if transposed else weight.transpose(2, 1, 0)
        params[f"{path}/bias"] = state[f"{prefix}.bias"]
    for prefix, path in lstms.items():
        for layer in range(config.num_lstm_layers):
            base = f"{path}/layer_{layer}"
            params[f"{base}/input_kernel"] = state[f"{prefix}.weight_ih_l{layer}"].T
            params[f"{base}/recurrent_kernel"] = state[f"{prefix}.weight_hh_l{layer}"].T
            params[f"{base}/bias"] = state[f"{prefix}.bias_ih_l{layer}"] + state[f"{prefix}.bias_hh_l{layer}"]
    params["quantizer/codebooks"] = np.stack([state[f"{codebook.format(level)}.embed"] for level in range(config.n_q)])
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), unflatten_dict(params))


def state_dict_from_params(config: EncodecConfig, params) -> dict[str, np.ndarray]:
    """Params -> a transformers EnCodec state dict (plain `weight`s; the inverse of `params_from_state_dict`).

    Arrays are C-contiguous: safetensors writes an array's memory, so a transposed view would be stored scrambled.
    """
    flat = {k: np.asarray(v, np.float32) for k, v in flatten_dict(params).items()}
    state = {}
    for path, (module, kind) in _module_names(config).items():
        prefix = "/".join(path)
        if kind == "lstm":
            for layer in range(config.num_lstm_layers):
                base = f"{prefix}/layer_{layer}"
                state[f"{module}.lstm.weight_ih_l{layer}"] = flat[f"{base}/input_kernel"].T
                state[f"{module}.lstm.weight_hh_l{layer}"] = flat[f"{base}/recurrent_kernel"].T
                state[f"{module}.lstm.bias_ih_l{layer}"] = flat[f"{base}/bias"]
                state[f"{module}.lstm.bias_hh_l{layer}"] = np.zeros_like(flat[f"{base}/bias"])
            continue
        convs = [("", "")]
        if kind == "residual":
            convs = [("conv_a", "block.1"), ("conv_b", "block.3")]
            convs += [] if config.true_skip else [("shortcut", "shortcut")]
        for flax_name, sub in convs:
            name = _conv_prefix(module, sub, "transformers", kind == "convtr")
            kernel = flat[f"{prefix}/{flax_name}/kernel" if flax_name else f"{prefix}/kernel"]  # [k, in, out]
            state[f"{name}.weight"] = kernel.transpose(1, 2, 0) if kind == "convtr" else kernel.transpose(2, 1, 0)
            state[f"{name}.bias"] = flat[f"{prefix}/{flax_name}/bias" if flax_name else f"{prefix}/bias"]
    for level in range(config.n_q):
        state[f"quantizer.layers.{level}.codebook.embed"] = flat["quantizer/codebooks"][level]
    return {k: np.ascontiguousarray(v) for k, v in state.items()}


def _folded_weight(state: Mapping[str, np.ndarray], prefix: str) -> np.ndarray:
    for g_name, v_name in _WEIGHT_NORM_NAMES:
        if f"{prefix}.{v_name}" in state:
            g = np.asarray(state[f"{prefix}.{g_name}"], np.float64)
            v = np.asarray(state[f"{prefix}.{v_name}"], np.float64)
            norm = np.sqrt((v**2).sum(axis=tuple(range(1, v.ndim)), keepdims=True))
            return (v * (g / norm)).astype(np.float32)
    return np.asarray(state[f"{prefix}.weight"], np.float32)
