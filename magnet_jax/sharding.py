"""Device mesh `('data', 'fsdp', 'tensor')` and logical-axis shardings (docs/design.md §5.1).

Parameters and activations carry logical axis names (`embed`, `mlp`, `batch`, ...); the sharding rules map them to
mesh axes. The same code runs on 1 device, 8 simulated CPU devices, a GPU node or cluster and a TPU pod: only the
degrees in `config.mesh` change.

Mesh degrees (`config.mesh`): `data`, `fsdp`, `tensor` within a slice (ICI); `dcn_data`, `dcn_fsdp`, `dcn_tensor`
across slices (data-centre network; TPU multi-slice, or processes on GPU clusters). In each group one degree may be
-1, meaning "the rest": devices per slice for ICI, the number of slices for DCN. Each mesh axis has size
ICI degree × DCN degree.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
# Logical axis -> mesh axes: batch over data and fsdp, weights fully sharded over fsdp, heads/mlp/vocab over tensor.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("layers", None),
    ("length", None),
    ("norm", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv", None),
    ("act_vocab", "tensor"),
    ("cond_length", None),
    ("cond_embed", None),
)


def _fill_degrees(degrees: Sequence[int], total: int, names: Sequence[str], what: str) -> list[int]:
    """Replaces a single -1 in `degrees` so that their product is `total`; errors name the config fields."""
    degrees = [int(d) for d in degrees]
    fields = ", ".join(f"mesh.{n}={d}" for n, d in zip(names, degrees))
    if degrees.count(-1) > 1 or any(d == 0 or d < -1 for d in degrees):
        raise ValueError(f"{fields}: expected positive degrees, at most one of them -1 (= the rest)")
    known = math.prod(d for d in degrees if d != -1)
    if -1 in degrees:
        if total % known:
            raise ValueError(f"{fields}: {total} {what} are not divisible by {known}")
        degrees[degrees.index(-1)] = total // known
    elif known != total:
        raise ValueError(f"{fields}: product {known} != {total} {what}")
    return degrees


def device_grid(mesh_cfg: Mapping[str, Any], devices: Sequence[Any] | None = None) -> np.ndarray:
    """Devices arranged as `(data, fsdp, tensor)` for the degrees of `mesh_cfg`.

    Slices are the devices' `slice_index` (TPU multi-slice) or, where devices have none, their `process_index`.
    With every DCN degree 1 the whole device set is one ICI mesh (`mesh_utils.create_device_mesh`, topology-aware on
    TPU); otherwise `mesh_utils.create_hybrid_device_mesh` puts the DCN degrees across slices.
    """
    devices = list(jax.devices() if devices is None else devices)
    dcn_names = tuple(f"dcn_{a}" for a in MESH_AXES)
    dcn_given = [mesh_cfg.get(n, 1) for n in dcn_names]
    by_slice = hasattr(devices[0], "slice_index")
    slices = len({getattr(d, "slice_index" if by_slice else "process_index") for d in devices})
    if all(d == 1 for d in dcn_given):
        if by_slice and slices > 1:
            raise ValueError(f"the devices span {slices} slices: set a mesh.dcn_* degree (e.g. mesh.dcn_data=-1)")
        ici = _fill_degrees([mesh_cfg[a] for a in MESH_AXES], len(devices), MESH_AXES, "devices")
        return _arranged(lambda: mesh_utils.create_device_mesh(ici, devices), ici, None)
    dcn = _fill_degrees(dcn_given, slices, dcn_names, "slices" if by_slice else "processes (slices)")
    if len(devices) % slices:
        raise ValueError(f"{len(devices)} devices do not split evenly over {slices} slices")
    ici = _fill_degrees([mesh_cfg[a] for a in MESH_AXES], len(devices) // slices, MESH_AXES, "devices per slice")
    return _arranged(
        lambda: mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=not by_slice), ici, dcn
    )


def _arranged(create, ici: Sequence[int], dcn: Sequence[int] | None) -> np.ndarray:
    """Runs a `mesh_utils` constructor; its NotImplementedError for degrees that do not map onto the TPU torus
    becomes a ValueError naming the mesh fields."""
    try:
        return create()
    except NotImplementedError as e:
        fields = ", ".join(f"mesh.{a}={d}" for a, d in zip(MESH_AXES, ici))
        if dcn is not None:
            fields += ", " + ", ".join(f"mesh.dcn_{a}={d}" for a, d in zip(MESH_AXES, dcn))
        raise ValueError(
            f"{fields}: these degrees do not map onto the device topology (each mesh axis must be a "
            f"product of torus axes): {' '.join(str(e).split())}"
        ) from e


def make_mesh(mesh_cfg: Mapping[str, Any], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The training/generation mesh with axes `('data', 'fsdp', 'tensor')` (Auto axis types, for Linen)."""
    return Mesh(device_grid(mesh_cfg, devices), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def single_device_mesh() -> Mesh:
    """A mesh of this process's first device (host-side init and restore)."""
    return make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.local_devices()[:1])


def logical_rules(config) -> tuple[tuple[str, Any], ...]:
    """`config.sharding_rules` as the hashable tuple flax expects (lists of mesh axes become tuples)."""
    return tuple(
        (str(name), tuple(axes) if isinstance(axes, (list, tuple)) else axes) for name, axes in config.sharding_rules
    )


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules) -> Any:
    """NamedShardings for a tree whose leaves carry Linen logical-axis metadata (others are replicated).

    `abstract_tree` is typically `jax.eval_shape` of an init function that returns boxed (`nn.Partitioned`) params;
    the result has the structure of the unboxed tree. A dimension whose size is not divisible by the devices of its
    mesh axes (e.g. the `card + 1` rows of the code embeddings over `tensor`) is replicated instead.
    """
    specs = nn.get_partition_spec(abstract_tree)
    shapes = nn.meta.unbox(abstract_tree)

    def fit(spec: PartitionSpec, leaf) -> NamedSharding:
        spec = nn.logical_to_mesh_axes(spec, rules) if spec else PartitionSpec()
        entries = []
        for size, axes in zip(leaf.shape, tuple(spec) + (None,) * (leaf.ndim - len(spec))):
            names = (axes,) if isinstance(axes, str) else tuple(axes or ())
            entries.append(axes if size % math.prod(mesh.shape[n] for n in names) == 0 else None)
        return NamedSharding(mesh, PartitionSpec(*entries))

    return jax.tree.map(fit, specs, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
    """Sharding of batch arrays (`[B, ...]`): the leading axis over the mesh axes of the `batch` rule."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes(("batch",), rules))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every mesh axis replicated (scalars, keys, metrics)."""
    return NamedSharding(mesh, PartitionSpec())
