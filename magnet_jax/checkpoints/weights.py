"""Locating and reading released weights: hub ids, local directories and files; strict key checking.

Every importer (LM, T5, EnCodec) goes through these helpers so that the rules are the same everywhere:
torch pickles are read with `weights_only=True` only, safetensors with the NumPy loader (no torch), and a
state dict whose keys or shapes differ from what the model expects is an error that lists every difference.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np


class WeightsError(ValueError):
    """Weights could not be found, read, or matched to the model (message is one line)."""


def resolve_file(source: str | os.PathLike, filename: str, *, what: str) -> Path:
    """Finds `filename` for `source`: a local file, a local directory holding it, or a Hugging Face hub id.

    Args:
      source: path to the file itself, a directory containing `filename`, or a hub id (`facebook/magnet-small-10secs`).
      filename: the file name inside a directory or hub repository (e.g. `state_dict.bin`).
      what: words for error messages (e.g. "MAGNeT LM weights").
    """
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        candidate = path / filename
        if candidate.is_file():
            return candidate
        raise WeightsError(f"{what}: directory {path} has no {filename}")
    if path.exists() or str(source).startswith((".", "/", "~")) or str(source).count("/") > 1:
        raise WeightsError(f"{what}: {source} is neither a file nor a directory holding {filename}")
    return _download(str(source), filename, what=what)


def local_file(path: str | os.PathLike, *, what: str) -> Path:
    """`path` itself, if it is an existing file (weights a user brings; no hub look-up)."""
    if not Path(path).expanduser().is_file():
        raise WeightsError(f"{what}: {path} is not a file")
    return Path(path).expanduser()


def _download(repo_id: str, filename: str, *, what: str) -> Path:
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError as e:  # pragma: no cover - huggingface_hub is a runtime dependency
        raise WeightsError(f"{what}: huggingface_hub is needed to download {repo_id}: {e}") from e
    try:
        return Path(hf_hub_download(repo_id, filename))
    except LocalEntryNotFoundError as e:  # offline (HF_HUB_OFFLINE) or unreachable, and not in the local cache
        raise WeightsError(
            f"{what}: could not fetch {filename} from hub id {repo_id!r} (offline or unreachable, not cached); "
            f"pass a local directory holding {filename} instead") from e
    except (RepositoryNotFoundError, EntryNotFoundError) as e:
        raise WeightsError(f"{what}: hub repository {repo_id} has no {filename} ({type(e).__name__})") from e
    except Exception as e:  # offline mode, no network, proxy errors: all one message
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise WeightsError(
            f"{what}: could not fetch {filename} from hub id {repo_id!r} (offline or unreachable: {reason}); "
            f"pass a local directory holding {filename} instead") from e


def load_safetensors(path: str | os.PathLike, *, what: str) -> dict[str, np.ndarray]:
    """Reads a `.safetensors` file into NumPy arrays (no torch)."""
    from safetensors.numpy import load_file
    try:
        return dict(load_file(str(path)))
    except Exception as e:
        raise WeightsError(f"{what}: cannot read safetensors file {path}: {str(e).splitlines()[0]}") from e


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
            "`python -m magnet_jax.convert` on a machine that has it)") from e
    try:
        with torch.serialization.safe_globals(_numpy_globals() if allow_numpy else []):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"{what}: cannot read {path} as a PyTorch pickle: {str(e).splitlines()[0]}") from e
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


def check_state_dict(found: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]], *,
                     source: str, ignore: Iterable[str] = ()) -> None:
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
    misshaped = sorted(f"{k} {tuple(np.shape(found[k]))} != {tuple(expected[k])}"
                       for k in set(expected) & set(found) if tuple(np.shape(found[k])) != tuple(expected[k]))
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
        if items:
            shown = ", ".join(items[:20]) + (f", ... ({len(items)} in all)" if len(items) > 20 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise WeightsError(f"{source}: state dict does not match the model; " + "; ".join(problems))


def flatten_params(tree: Mapping, prefix: str = "", sep: str = "/") -> dict[str, np.ndarray]:
    """Flattens a nested param dict into `a/b/c` keys."""
    flat = {}
    for k, v in tree.items():
        name = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            flat.update(flatten_params(v, name, sep))
        else:
            flat[name] = v
    return flat


def unflatten_params(flat: Mapping[str, np.ndarray], sep: str = "/") -> dict:
    """Inverse of `flatten_params`."""
    tree: dict = {}
    for name, v in flat.items():
        node = tree
        *parents, leaf = name.split(sep)
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree
