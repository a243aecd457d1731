"""One way to resolve a model source: a training workdir, a converted checkpoint, or released weights.

  load_lm(source) -> (config.json dict, host params)

`source` is
  * a training workdir (`magnet_jax.train`; layout below): its params export, or the EMA params of its newest
    verified checkpoint when that is newer than the export or there is none (a run still training or continued past
    its export; logged), with the config.json its export will have;
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
from etils import epath

from magnet_jax.checkpoints import pretrained
from magnet_jax.checkpoints.lm_weights import import_lm, set_layer_layout
from magnet_jax.checkpoints.weights import check_finite
from magnet_jax.cli import reason
from magnet_jax.fileio import IntegrityError, WeightsError, local_source, read_digest, verify_checksums
from magnet_jax.models.lm import LanguageModel, LMConfig, init_params

WORKDIR_CONFIG = "config.json"
CHECKPOINTS_DIR = "checkpoints"
EXPORT_DIR = "export"
# The orbax items of a checkpoint step: the train state {step, params, opt_state, ema_params, skipped_steps}, the input
# pipeline's iterator state, the resolved training config.
STATE_ITEM, DATA_ITEM, CONFIG_ITEM = "state", "data", "config"


def is_workdir(path: Path) -> bool:
    """A training workdir: it has checkpoints or an export, or (a run stopped before its first save) a config.json
    holding a training config (with `train` and `optim` sections)."""
    if (path / CHECKPOINTS_DIR).is_dir() or (path / EXPORT_DIR).is_dir():
        return True
    try:
        config = json.loads((path / WORKDIR_CONFIG).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and {"train", "optim"} <= set(config)


def checkpoint_steps(workdir: str | Path) -> list[int]:
    """The steps of a training workdir's checkpoints, ascending (finished saves only: orbax's temporary
    `<step>.orbax-checkpoint-tmp` directories are not digits)."""
    checkpoints = epath.Path(workdir) / CHECKPOINTS_DIR
    return sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) if checkpoints.is_dir() else []


def export_step(workdir: str | Path) -> int | None:
    """The training step of a workdir's params export (its config.json provenance), None without an export."""
    config = epath.Path(workdir) / EXPORT_DIR / pretrained.CONFIG_FILE
    if not config.is_file():
        return None
    try:
        return int(json.loads(config.read_text())["provenance"]["step"])
    except (ValueError, KeyError, TypeError) as e:
        raise WeightsError(f"{config}: no provenance.step ({reason(e)})") from e


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
    path = Path(local_source(source))
    if is_workdir(path):
        exported, steps = export_step(path), checkpoint_steps(path)
        if checkpoint_step is None and exported is not None and (not steps or exported >= steps[-1]):
            return _load_converted(path / EXPORT_DIR, dtype=dtype, scan_layers=scan_layers, item=EXPORT_DIR)
        if checkpoint_step is None and exported is not None:
            logging.warning(
                "training workdir %s: its export is of step %d, its newest checkpoint of step %d; using the "
                "newest verified checkpoint's EMA params",
                path,
                exported,
                steps[-1],
            )
        config, params = _load_training_checkpoint(path, steps, checkpoint_step)
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


def _load_training_checkpoint(workdir: Path, steps: list[int], step: int | None = None) -> tuple[dict, dict]:
    """EMA params of checkpoint `step` (default: the newest of `steps` that verifies) of a run without an
    up-to-date params export (still training, or continued past its export), and the config its export will have."""
    checkpoints = workdir / CHECKPOINTS_DIR
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
