"""The converted checkpoint format that training exports and generation loads.

A directory holding
  config.json   {"model": LMConfig.to_dict(), "objective": "magnet" | "hybrid" (optional), "conditioner": {"t5",
                 "t5_dim"}, "codec": {"source"}, "segment_seconds", "generate": {...}, "provenance": {...},
                 "audiocraft_cfg": <xp.cfg YAML, optional>}
  params/       the LM param tree (plain arrays, layout of `model.scan_layers`) as an orbax checkpoint.
`model.param_dtype` always states the dtype the params are stored in. "objective" is the training objective
(`config.train.objective`, `magnet_jax.models.objectives`), which decides how the model generates ("magnet" when
absent, as in converted released weights and older exports). Layout details: docs/design.md §10.1. Writes are atomic: a
temporary sibling directory is renamed into place, so a crash never leaves a half-written checkpoint under the final
name.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from magnet_jax.checkpoints.lm_weights import set_layer_layout
from magnet_jax.checkpoints.weights import check_finite, check_state_dict
from magnet_jax.cli import reason
from magnet_jax.fileio import (
    CHECKSUMS_FILE,
    IntegrityError,
    WeightsError,
    absolute_path,
    atomic_directory,
    flatten_dict,
    verify_checksums,
    write_checksums,
)
from magnet_jax.models import objectives
from magnet_jax.models.lm import LanguageModel, LMConfig, init_params

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
REQUIRED_SECTIONS = ("model", "conditioner", "codec", "segment_seconds")


def model_objective(config: Mapping, source: str) -> objectives.Objective:
    """The objective of a config.json dict (MAGNeT when absent); an unknown one is a one-line WeightsError naming
    `source`."""
    try:
        return objectives.of_config(config, source)
    except ValueError as e:
        raise WeightsError(str(e)) from None


def config_from_training(config, *, step: int, weights: str, dtype: str, source: str) -> dict:
    """The config.json of a params export of a run with training config `config`.

    Args:
      config: the training config: its model / conditioner / codec / data / generate sections, `train.objective`
        (top-level "objective": how the model is generated; absent in older configs = "magnet") and
        `masking.span_len` (the "generate" section's `span_len`: decoding re-masks spans of the trained length).
      step: the training step of the params; weights: "ema" or "params"; dtype: the stored params' dtype;
      source: what produced them (goes to "provenance").
    """
    model = LMConfig.from_config(config.model).to_dict()
    model["param_dtype"] = dtype
    return {
        "model": model,
        "objective": config.train.get("objective", objectives.MAGNET.name),
        "conditioner": {"t5": config.conditioner.t5, "t5_dim": config.conditioner.t5_dim},
        "codec": {"source": config.codec.source},
        "segment_seconds": float(config.data.segment_seconds),
        "generate": {**config.generate.to_dict(), "span_len": int(config.masking.span_len)},
        "provenance": {"source": source, "step": int(step), "weights": weights, "dtype": dtype},
    }


def _check_params(params: Mapping, model: LMConfig, source: str) -> None:
    """Strict key/shape check of a param tree against the architecture in `model` (its layer layout)."""
    abstract = jax.eval_shape(lambda k: nn.meta.unbox(init_params(LanguageModel(model), k)), jax.random.key(0))
    expected = {k: tuple(v.shape) for k, v in flatten_dict(abstract).items()}
    check_state_dict(flatten_dict(params), expected, source=source)  # leaves: arrays or orbax metadata (.shape)


def _stored_dtype(params: Mapping, source: str) -> str:
    dtypes = {jnp.dtype(x.dtype).name for x in jax.tree.leaves(params)}
    if len(dtypes) != 1:
        raise WeightsError(f"{source}: params mix dtypes {sorted(dtypes)}; cast them to one dtype first")
    return dtypes.pop()


def save_pretrained(directory: str | Path, params: Mapping, config: Mapping, *, overwrite: bool = False) -> None:
    """Writes `params` (plain or boxed tree, host or sharded device arrays) and `config.json` atomically.

    `config` follows the schema above; `model.param_dtype` is set to the params' dtype. Multi-host: call on every
    process (orbax writes each process's shards).
    """
    missing = [k for k in REQUIRED_SECTIONS if k not in config]
    if missing:
        raise WeightsError(f"save_pretrained({directory}): config lacks {', '.join(missing)}")
    params = nn.meta.unbox(params)
    try:
        config = json.loads(json.dumps(dict(config)))  # a plain copy
    except TypeError as e:
        raise WeightsError(f"save_pretrained({directory}): config is not JSON-serializable ({e})") from e
    config.setdefault("generate", {})
    config["model"]["param_dtype"] = _stored_dtype(params, str(directory))
    try:
        model = LMConfig.from_config(config["model"])
    except (TypeError, ValueError) as e:
        raise WeightsError(f"save_pretrained({directory}): bad model section ({e})") from e
    model_objective(config, f"save_pretrained({directory})")
    _check_params(params, model, f"save_pretrained({directory})")
    try:
        with atomic_directory(absolute_path(directory), overwrite=overwrite) as tmp:
            with ocp.StandardCheckpointer() as checkpointer:
                checkpointer.save(tmp / PARAMS_DIR, params)
            if jax.process_index() == 0:
                (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
                write_checksums(tmp)  # after every file is complete; verified by `load_pretrained`
    except FileExistsError as e:
        raise WeightsError(str(e)) from None


def read_config(directory: str | Path) -> dict:
    """config.json of a converted checkpoint (one-line WeightsError when missing or malformed)."""
    path = Path(directory).expanduser()
    if not path.is_dir():
        raise WeightsError(f"{path}: no such checkpoint directory")
    file = path / CONFIG_FILE
    try:
        config = json.loads(file.read_text())
    except FileNotFoundError:
        raise WeightsError(f"{path}: not a converted checkpoint (no {CONFIG_FILE})") from None
    except (OSError, ValueError) as e:
        raise WeightsError(f"{file}: not valid JSON ({reason(e)})") from e
    missing = [k for k in REQUIRED_SECTIONS if k not in config] if isinstance(config, dict) else REQUIRED_SECTIONS
    if missing:
        raise WeightsError(f"{file}: missing section(s) {', '.join(missing)}")
    try:
        LMConfig.from_config(config["model"])
    except (TypeError, ValueError) as e:
        raise WeightsError(f"{file}: bad model section ({e})") from e
    model_objective(config, str(file))
    return config


def load_pretrained(
    directory: str | Path, *, dtype: Any = None, scan_layers: bool | None = None, shardings: Any = None
) -> tuple[dict, dict]:
    """Reads a converted checkpoint -> (config, params).

    Args:
      dtype: cast the params (e.g. "bfloat16"); None keeps the stored dtype. `config.model.param_dtype` follows.
      scan_layers: re-layout the transformer layers (stacked `blocks` vs `block_{i}`); None keeps the stored layout.
        `config.model.scan_layers` follows.
      shardings: a tree of `jax.sharding.Sharding` matching the returned params: sharded device arrays on any mesh /
        host count (each device reads only its shard when no re-layout is needed). None: host NumPy arrays.
    """
    path = Path(absolute_path(directory))  # orbax takes absolute paths only
    config = read_config(path)
    verify(path)
    model = LMConfig.from_config(config["model"])
    dtype = jnp.dtype(dtype or model.param_dtype)
    try:
        metadata = ocp.PyTreeCheckpointer().metadata(path / PARAMS_DIR).item_metadata.tree
    except Exception as e:  # missing dir, truncated or foreign files: one line
        raise WeightsError(
            f"{path / PARAMS_DIR}: not a readable orbax checkpoint ({type(e).__name__}: {reason(e)})"
        ) from e
    _check_params(metadata, model, str(path / PARAMS_DIR))
    scan_layers = model.scan_layers if scan_layers is None else scan_layers
    direct = shardings is not None and scan_layers == model.scan_layers  # orbax reads each device's shard only
    if direct:
        restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s, dtype=dtype), shardings)
    else:
        restore_args = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype), metadata)
    try:
        params = ocp.PyTreeCheckpointer().restore(
            path / PARAMS_DIR, args=ocp.args.PyTreeRestore(restore_args=restore_args)
        )
    except Exception as e:
        raise WeightsError(f"{path / PARAMS_DIR}: cannot restore ({type(e).__name__}: {reason(e)})") from e
    if not direct:
        params = set_layer_layout(params, scan_layers)
        if shardings is not None:
            params = jax.tree.map(
                lambda x, s: jax.make_array_from_callback(x.shape, s, lambda i: x[i]), params, shardings
            )
    check_finite(params, where=str(path / PARAMS_DIR))
    config["model"].update(param_dtype=dtype.name, scan_layers=scan_layers)
    return config, params


def verify(directory: str | Path) -> str | None:
    """Checks a converted checkpoint's files against the `checksums.json` written with it; returns its digest
    (None for a directory written before checksums were recorded, which is accepted with a warning).

    Raises:
      WeightsError: a file is missing, damaged or not listed (one line naming it).
    """
    path = Path(directory).expanduser()
    if not (path / CHECKSUMS_FILE).is_file():
        logging.warning("%s: no %s (written by an older version); its files are not verified", path, CHECKSUMS_FILE)
        return None
    try:
        return verify_checksums(path)
    except IntegrityError as e:
        raise WeightsError(str(e)) from None
