"""Released EnCodec weights -> `magnet_jax.models.encodec` params (weight norm folded, PyTorch layouts transposed).

Two on-disk formats, told apart automatically by `load_encodec(source)`:
  * transformers (`facebook/encodec_32khz`): `config.json` + `model.safetensors`, read without torch. Weight-normed
    convs are `<conv>.weight_g` / `weight_v` (hub files) or `<conv>.parametrizations.weight.original0` /
    `original1` (transformers 5 `save_pretrained`).
  * audiocraft: `compression_state_dict.bin` (torch pickle, read with `weights_only=True`), either
    `{'best_state': state dict, 'xp.cfg': YAML}` or a pointer `{'pretrained': 'facebook/encodec_32khz'}` that is
    loaded through the transformers path (MAGNeT repos ship the pointer).
`source` is a hub id, a local directory holding either layout, or the `.bin` file itself. Every tensor must match
the architecture of the loaded config (`magnet_jax.checkpoints.weights.check_state_dict`); only the quantizer's training state
(`embed_avg`, `cluster_size`, `inited`) is skipped. The padding mode is the one in the loaded config.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import yaml

from magnet_jax.models.encodec import EncodecConfig, abstract_params
from magnet_jax.checkpoints.weights import (WeightsError, check_state_dict, flatten_params, load_safetensors, load_torch_pickle,
                                resolve_file, unflatten_params)

WHAT = "EnCodec weights"
AUDIOCRAFT_FILE = "compression_state_dict.bin"
HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
_PRETRAINED_PREFIX = "//pretrained/"
# Weight-norm parameter names: (g, v) as written by torch.nn.utils.weight_norm and by parametrizations.weight_norm.
_WEIGHT_NORM_NAMES = (("weight_g", "weight_v"),
                      ("parametrizations.weight.original0", "parametrizations.weight.original1"))
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
            raise WeightsError(f"{WHAT}: {path} is part of a transformers checkpoint; pass its directory "
                               f"(holding {HF_CONFIG} and {HF_WEIGHTS})")
        return _load_audiocraft(path, via_pointer=via_pointer)
    if path.is_dir():
        if (path / AUDIOCRAFT_FILE).is_file():
            return _load_audiocraft(path / AUDIOCRAFT_FILE, via_pointer=via_pointer)
        if (path / HF_CONFIG).is_file():
            return _load_transformers(path)
        raise WeightsError(f"{WHAT}: directory {path} has neither {AUDIOCRAFT_FILE} (audiocraft) nor "
                           f"{HF_CONFIG} + {HF_WEIGHTS} (transformers)")
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
                f"{type(e2.__cause__).__name__}); pass a local directory instead") from e2
    return _load_audiocraft(file, via_pointer=via_pointer)


def _load_transformers(source: str | os.PathLike) -> tuple[EncodecConfig, dict]:
    config_file = resolve_file(source, HF_CONFIG, what=WHAT)
    weights_file = resolve_file(source, HF_WEIGHTS, what=WHAT)
    try:
        hf_config = json.loads(Path(config_file).read_text())
        if not isinstance(hf_config, dict):
            raise ValueError("expected a JSON object")
        config = EncodecConfig.from_hf_config(hf_config)
    except (ValueError, TypeError, KeyError) as e:  # json.JSONDecodeError is a ValueError
        raise WeightsError(f"{WHAT}: {config_file}: {e}") from e
    state = load_safetensors(weights_file, what=WHAT)
    return config, params_from_state_dict(config, state, layout="transformers", source=str(weights_file))


def _load_audiocraft(file: Path, *, via_pointer: bool) -> tuple[EncodecConfig, dict]:
    package = load_torch_pickle(file, what=WHAT)
    if not isinstance(package, Mapping):
        raise WeightsError(f"{WHAT}: {file}: expected a dict with 'best_state' and 'xp.cfg' or 'pretrained', "
                           f"got {type(package).__name__}")
    if "pretrained" in package:
        if via_pointer:
            raise WeightsError(f"{WHAT}: {file}: a 'pretrained' pointer leads to another pointer")
        target = str(package["pretrained"])
        target = target[len(_PRETRAINED_PREFIX):] if target.startswith(_PRETRAINED_PREFIX) else target
        try:
            return _load(target, via_pointer=True)
        except WeightsError as e:
            raise WeightsError(f"{file} points to pretrained {target!r}; {e}") from e
    missing = [key for key in ("best_state", "xp.cfg") if key not in package]
    if missing:
        raise WeightsError(f"{WHAT}: {file}: missing {', '.join(missing)} (keys: {', '.join(map(str, package))})")
    if not isinstance(package["best_state"], Mapping):
        raise WeightsError(f"{WHAT}: {file}: best_state is a {type(package['best_state']).__name__}, expected a "
                           "state dict")
    try:
        xp = package["xp.cfg"]
        xp = yaml.safe_load(xp) if isinstance(xp, str) else xp
        if not isinstance(xp, Mapping):
            raise ValueError("expected a YAML mapping")
        config = EncodecConfig.from_audiocraft_config(xp)
    except (ValueError, TypeError, KeyError, yaml.YAMLError) as e:
        raise WeightsError(f"{WHAT}: {file}: xp.cfg: {str(e).splitlines()[0]}") from e
    return config, params_from_state_dict(config, package["best_state"], layout="audiocraft", source=str(file))


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


def params_from_state_dict(config: EncodecConfig, state: Mapping[str, np.ndarray], *, layout: str,
                           source: str) -> dict:
    """Converts a PyTorch EnCodec state dict (`layout` "transformers" or "audiocraft") into params.

    Checks every name and shape against `config` first (WeightsError listing all differences), then folds weight
    norm W = g · v / ‖v‖ (norm over all axes but 0), turns conv weights [out, in, k] and transposed-conv weights
    [in, out, k] into kernels [k, in, out], transposes LSTM matrices and sums their two biases.
    """
    if layout not in ("transformers", "audiocraft"):
        raise ValueError(f"layout={layout!r}: expected 'transformers' or 'audiocraft'")
    shapes = {path: leaf.shape for path, leaf in flatten_params(nn.unbox(abstract_params(config))).items()}
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
        norm_names = next(((g, v) for g, v in _WEIGHT_NORM_NAMES
                           if f"{prefix}.{g}" in state or f"{prefix}.{v}" in state), None)
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
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), unflatten_params(params))


def state_dict_from_params(config: EncodecConfig, params) -> dict[str, np.ndarray]:
    """Params -> a transformers EnCodec state dict (plain `weight`s; the inverse of `params_from_state_dict`).

    Arrays are C-contiguous: safetensors writes an array's memory, so a transposed view would be stored scrambled.
    """
    flat = {k: np.asarray(v, np.float32) for k, v in flatten_params(params).items()}
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
            norm = np.sqrt((v ** 2).sum(axis=tuple(range(1, v.ndim)), keepdims=True))
            return (v * (g / norm)).astype(np.float32)
    return np.asarray(state[f"{prefix}.weight"], np.float32)

