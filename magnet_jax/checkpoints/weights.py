"""Reading released weights: safetensors and torch pickles, strict key checking, audiocraft config lookups.

Every importer (LM, T5, EnCodec) goes through these helpers so that the rules are the same everywhere: torch pickles
are read with `weights_only=True` only, safetensors with the NumPy loader (no torch), and a state dict whose keys or
shapes differ from what the model expects is an error that lists every difference. Files are located by
`magnet_jax.fileio.resolve_file`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from magnet_jax.cli import reason
from magnet_jax.fileio import WeightsError


def non_finite_leaves(tree: Any) -> list[str]:
    """Key paths (`['params']['w']`) of the floating-point leaves of `tree` (host or sharded device arrays) that
    hold a NaN or an infinity; one device fetch for the whole tree."""
    leaves = {
        jax.tree_util.keystr(path): x
        for path, x in jax.tree_util.tree_leaves_with_path(tree)
        if jnp.issubdtype(x.dtype, jnp.inexact)
    }
    flags = jax.device_get(_all_finite(leaves))
    return [name for name, ok in flags.items() if not bool(ok)]


@jax.jit
def _all_finite(leaves: dict) -> dict:
    """One compiled program for the whole tree: {name: all elements finite}."""
    return {name: jnp.all(jnp.isfinite(x)) for name, x in leaves.items()}


def check_finite(tree: Any, *, where: str) -> None:
    """Raises WeightsError naming (up to three of) the leaves of `tree` with non-finite values."""
    bad = non_finite_leaves(tree)
    if bad:
        raise WeightsError(f"{where}: non-finite values in {', '.join(bad[:3])}" + (" ..." if len(bad) > 3 else ""))


def load_safetensors(path: str | os.PathLike, *, what: str) -> dict[str, np.ndarray]:
    """Reads a `.safetensors` file into NumPy arrays (no torch)."""
    from safetensors.numpy import load_file

    try:
        return dict(load_file(str(path)))
    except Exception as e:
        raise WeightsError(f"{what}: cannot read safetensors file {path}: {reason(e)}") from e


def load_torch_pickle(path: str | os.PathLike, *, what: str, allow_numpy: bool = False):
    """Reads a PyTorch pickle (`.bin`/`.th`) with `weights_only=True`; tensors become NumPy arrays.

    `allow_numpy` also admits pickled NumPy arrays (some released files store them instead of tensors), still
    through the weights-only unpickler. Needs torch (the `convert` extra); it is never needed to train or
    generate from converted checkpoints.
    """
    try:
        import torch
    except ImportError as e:
        raise WeightsError(
            f"{what}: reading {path} needs torch: pip install 'magnet_jax[convert]' (or convert once with "
            "`python -m magnet_jax.convert` on a machine that has it)"
        ) from e
    try:
        with torch.serialization.safe_globals(_numpy_globals() if allow_numpy else []):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"{what}: cannot read {path} as a PyTorch pickle: {reason(e)}") from e
    return _torch_to_numpy(obj, torch)


def _numpy_globals() -> list:
    """What a pickled ndarray references (its dtype's class too), under NumPy 2 and NumPy 1 module names."""
    reconstruct = np._core.multiarray._reconstruct
    dtype_classes = [type(np.dtype(code)) for code in "?bhilqBHILQefdFD"]
    return [np.ndarray, np.dtype, reconstruct, (reconstruct, "numpy.core.multiarray._reconstruct"), *dtype_classes]


def _torch_to_numpy(obj, torch):
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.float()
        return t.numpy()
    if isinstance(obj, Mapping):
        return {k: _torch_to_numpy(v, torch) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_torch_to_numpy(v, torch) for v in obj)
    return obj


def check_state_dict(
    found: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]], *, source: str, ignore: Iterable[str] = ()
) -> None:
    """Raises WeightsError listing missing, unexpected and mis-shaped keys (nothing is silently dropped).

    Args:
      found: the state dict read from disk (name -> array).
      expected: name -> shape the model needs.
      source: file or id named in the message.
      ignore: keys of `found` that are known training-only state and may be present (e.g. EMA buffers).
    """
    ignore = set(ignore)
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected) - ignore)
    misshaped = sorted(
        f"{k} {tuple(np.shape(found[k]))} != {tuple(expected[k])}"
        for k in set(expected) & set(found)
        if tuple(np.shape(found[k])) != tuple(expected[k])
    )
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
        if items:
            shown = ", ".join(items[:20]) + (f", ... ({len(items)} in all)" if len(items) > 20 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise WeightsError(f"{source}: state dict does not match the model; " + "; ".join(problems))


def xp_cfg_value(tree: Mapping, dotted: str, default: Any = KeyError, *, root: Mapping | None = None) -> Any:
    """`tree['a']['b']` for `dotted` = 'a.b' in a parsed audiocraft (OmegaConf) config, following `${x.y}`
    interpolations against `root` (default `tree`).

    Raises:
      KeyError: the field (or a field an interpolation names) is absent and no `default` is given.
    """
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            if default is KeyError:
                raise KeyError(dotted)
            return default
        node = node[part]
    return resolve_interpolation(node, tree if root is None else root)


def resolve_interpolation(value: Any, root: Mapping) -> Any:
    """`value`, or what a `${a.b}` interpolation string refers to in `root` (followed until a plain value)."""
    while isinstance(value, str) and (match := re.fullmatch(r"\$\{([\w.]+)\}", value)):
        value = xp_cfg_value(root, match.group(1))
    return value
