"""One way to resolve a model source: a training workdir, a converted checkpoint, or released weights.

  load_lm(source) -> (config.json dict, host params)

`source` is
  * a training workdir (`magnet_jax.train`; layout below): its params export, else the EMA params of its newest
    checkpoint (a run still training), with the config.json its export will have;
  * a converted checkpoint directory (`magnet_jax.checkpoints.pretrained`);
  * released weights: a hub id, directory or file in audiocraft's (`state_dict.bin`) or transformers' (MusicGen)
    format, converted on the fly (`magnet_jax.checkpoints.lm_weights`).

Training workdir layout (docs/design.md §10.2): `config.json` (the resolved training config), `checkpoints/<step>/`
(orbax items `state`, `data`, `config`), `export/` (a converted checkpoint written when training completes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from magnet_jax.checkpoints import pretrained
from magnet_jax.checkpoints.lm_weights import import_lm, set_layer_layout
from magnet_jax.checkpoints.weights import check_finite
from magnet_jax.cli import reason
from magnet_jax.fileio import IntegrityError, WeightsError, read_digest, verify_checksums
from magnet_jax.models.lm import LanguageModel, LMConfig, init_params

WORKDIR_CONFIG = "config.json"
CHECKPOINTS_DIR = "checkpoints"
EXPORT_DIR = "export"
# The orbax items of a checkpoint step: the train state {step, params, opt_state, ema_params, skipped_steps}, the input
# pipeline's iterator state, the resolved training config.
STATE_ITEM, DATA_ITEM, CONFIG_ITEM = "state", "data", "config"


def is_workdir(path: Path) -> bool:
    return (path / CHECKPOINTS_DIR).is_dir() or (path / EXPORT_DIR).is_dir()


def load_lm(
    source: str | Path, *, dtype: Any = None, scan_layers: bool | None = None, checkpoint_step: int | None = None
) -> tuple[dict, dict]:
    """Any LM source -> (config.json dict, host params).

    `config["provenance"]` says which files were read: `checksum` (the digest of their checksum manifest, when
    they have one), and for a training workdir `item` ("export" or "checkpoints/<step>") and `step`.

    Args:
      dtype: cast the params (e.g. "bfloat16"); None keeps the stored dtype (`config.model.param_dtype` follows).
      scan_layers: re-layout the transformer layers (stacked vs per layer); None keeps the stored layout (released
        weights: stacked).
      checkpoint_step: a training workdir's checkpoint step to read (a job pinned to it), instead of its export or
        newest verified step.
    """
    path = Path(source).expanduser()
    if is_workdir(path):
        export = path / EXPORT_DIR
        if checkpoint_step is None and (export / pretrained.CONFIG_FILE).is_file():
            return _load_converted(export, dtype=dtype, scan_layers=scan_layers, item=EXPORT_DIR)
        config, params = _load_training_checkpoint(path, checkpoint_step)
    elif path.is_dir() and (path / pretrained.CONFIG_FILE).is_file() and (path / pretrained.PARAMS_DIR).is_dir():
        return _load_converted(path, dtype=dtype, scan_layers=scan_layers, item=None)
    else:
        config, params = import_lm(str(source), scan_layers=True if scan_layers is None else scan_layers)
    if scan_layers is not None and scan_layers != config["model"]["scan_layers"]:
        params = set_layer_layout(params, scan_layers)
        config["model"]["scan_layers"] = scan_layers
    if dtype is not None:
        dtype = jnp.dtype(dtype)
        params = jax.tree.map(lambda x: np.asarray(x).astype(dtype), params)
        config["model"]["param_dtype"] = dtype.name
    return config, params


def _load_converted(path: Path, *, dtype, scan_layers, item: str | None) -> tuple[dict, dict]:
    """A converted checkpoint (verified by `load_pretrained`), its provenance naming the files read."""
    config, params = pretrained.load_pretrained(path, dtype=dtype, scan_layers=scan_layers)
    config.setdefault("provenance", {}).update(item=item, checksum=read_digest(path))
    return config, params


def _load_training_checkpoint(workdir: Path, step: int | None = None) -> tuple[dict, dict]:
    """EMA params of checkpoint `step` (default: the newest that verifies) of a run without a params export yet
    (still training), and the config its export will have."""
    checkpoints = workdir / CHECKPOINTS_DIR
    steps = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) if checkpoints.is_dir() else []
    if not steps or not (workdir / WORKDIR_CONFIG).is_file():
        raise WeightsError(f"training workdir {workdir}: no params export and no checkpoint with a config.json")
    if step is None:
        step, digest = newest_verified_step(checkpoints, steps)
    elif step not in steps:
        raise WeightsError(f"training workdir {workdir}: checkpoint step {step} is gone (steps now: {steps})")
    else:
        try:
            digest = verify_checksums(checkpoints / str(step))
        except IntegrityError as e:
            raise WeightsError(f"training workdir {workdir}: checkpoint step {step} does not verify: {e}") from None
    train_config = ml_collections.ConfigDict(json.loads((workdir / WORKDIR_CONFIG).read_text()))
    model = LanguageModel(LMConfig.from_config(train_config.model))
    abstract = nn.meta.unbox(jax.eval_shape(lambda k: init_params(model, k), jax.random.key(0)))
    target = {"ema_params": abstract}
    state_dir = checkpoints / str(step) / STATE_ITEM
    try:
        restored = ocp.PyTreeCheckpointer().restore(
            state_dir,
            args=ocp.args.PyTreeRestore(
                item=target,
                restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target),
                partial_restore=True,
            ),
        )
    except Exception as e:  # missing or truncated checkpoint files: one line
        raise WeightsError(f"{state_dir}: cannot restore the EMA params ({type(e).__name__}: {reason(e)})") from e
    check_finite(restored["ema_params"], where=f"{state_dir} (EMA params)")
    config = pretrained.config_from_training(
        train_config, step=step, weights="ema", dtype=train_config.model.param_dtype, source=str(workdir)
    )
    config["provenance"].update(checksum=digest, item=f"{CHECKPOINTS_DIR}/{step}")
    return config, restored["ema_params"]


def newest_verified_step(checkpoints: Path, steps: list[int]) -> tuple[int, str]:
    """(step, checksum digest) of the newest step of `steps` whose files match its checksum manifest; the steps
    that do not (a save still running, damage) are reported in one warning line each."""
    for step in sorted(steps, reverse=True):
        try:
            return step, verify_checksums(checkpoints / str(step))
        except IntegrityError as e:
            logging.warning("checkpoint step %d skipped: %s", step, e)
    raise WeightsError(f"{checkpoints}: no checkpoint step verifies (steps {steps}; see the warnings above)")
