"""Sharding for BOFT finetuning: ``jax.jit`` + ``NamedSharding`` over a ``Mesh`` (today's pjit).

* Frozen base weights are sharded: FSDP-style over the ``data`` axis (each weight split along its
  largest divisible axis) and/or tensor-parallel over the ``model`` axis (kernels split along their
  output features, the layout in which ``K -> M K`` needs no communication).
* Adapter params and their optimizer state are replicated (they are tiny).
* The batch is split over ``data``.

Example:
  >>> import jax, boft_jax.sharding as sh
  >>> mesh = sh.make_mesh("data=1")
  >>> dict(mesh.shape)
  {'data': 1}
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = [
    "parse_mesh",
    "make_mesh",
    "frozen_sharding",
    "replicated",
    "batch_sharding",
    "shard_frozen",
    "bytes_per_device",
    "maybe_initialize_distributed",
]

AXES = ("data", "model")


def parse_mesh(spec: str) -> dict[str, int]:
    """``"data=2,model=4"`` -> ``{"data": 2, "model": 4}``; axes are ``data`` and ``model``."""
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, eq, size = part.partition("=")
        name = name.strip()
        if not eq or name not in AXES or not size.strip().isdigit() or int(size) < 1:
            raise ValueError(
                f"bad mesh spec {spec!r} at {part!r}: expected comma-separated AXIS=SIZE with AXIS in"
                f" {AXES} and SIZE a positive integer, e.g. 'data=2,model=4'"
            )
        if name in out:
            raise ValueError(f"bad mesh spec {spec!r}: axis {name!r} given twice")
        out[name] = int(size)
    if not out:
        raise ValueError(f"empty mesh spec {spec!r}; e.g. 'data=8' or 'data=2,model=4'")
    return out


def make_mesh(spec: str | Mapping[str, int], devices=None) -> Mesh:
    """A ``Mesh`` with the named axes; their sizes must multiply to the number of devices."""
    sizes = parse_mesh(spec) if isinstance(spec, str) else dict(spec)
    devices = list(jax.devices() if devices is None else devices)
    total = math.prod(sizes.values())
    if total != len(devices):
        raise ValueError(
            f"mesh {sizes} needs {total} devices but {len(devices)} are available; the axis sizes must"
            f" multiply to {len(devices)} (e.g. 'data={len(devices)}')"
        )
    return Mesh(np.asarray(devices).reshape(tuple(sizes.values())), tuple(sizes))


def replicated(mesh: Mesh) -> NamedSharding:
    """Fully replicated (adapter params, optimizer state, scalars)."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Leading (batch) axis over ``data`` when the mesh has it, other axes replicated."""
    lead = "data" if "data" in mesh.shape else None
    return NamedSharding(mesh, P(lead, *([None] * (ndim - 1))))


def _spec_for(shape: tuple[int, ...], mesh: Mesh, is_kernel: bool, min_size: int) -> P:
    spec: list[Any] = [None] * len(shape)
    if int(np.prod(shape)) < min_size:
        return P(*spec)
    model = mesh.shape.get("model", 1)
    data = mesh.shape.get("data", 1)
    if model > 1 and is_kernel and len(shape) >= 2 and shape[-1] % model == 0:
        spec[-1] = "model"  # output features: M K needs no communication
    if data > 1:
        free = [i for i in range(len(shape)) if spec[i] is None and shape[i] % data == 0]
        if free:
            spec[max(free, key=lambda i: shape[i])] = "data"
    return P(*spec)


def frozen_sharding(frozen: Mapping, mesh: Mesh, *, min_size: int = 1024) -> Any:
    """A ``NamedSharding`` per frozen leaf (same tree structure).

    Leaves with fewer than ``min_size`` elements (norms, biases) are replicated; kernels are split
    along their last axis over ``model`` (if the mesh has it and it divides), then along their
    largest remaining divisible axis over ``data`` (FSDP).  Leaves that no axis divides stay
    replicated on that mesh axis.
    """

    def one(path, leaf):
        name = str(getattr(path[-1], "key", path[-1])) if path else ""
        return NamedSharding(mesh, _spec_for(tuple(np.shape(leaf)), mesh, name in ("kernel", "embedding"), min_size))

    return jax.tree_util.tree_map_with_path(one, frozen)


def shard_frozen(frozen: Mapping, mesh: Mesh, **kwargs) -> Any:
    """``jax.device_put`` of the frozen params with :func:`frozen_sharding`."""
    return jax.device_put(frozen, frozen_sharding(frozen, mesh, **kwargs))


def bytes_per_device(tree) -> dict[Any, int]:
    """Bytes of ``tree``'s arrays held by each device (addressable shards)."""
    out: dict[Any, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out


def maybe_initialize_distributed() -> bool:
    """Call ``jax.distributed.initialize()`` when launched as one process of a multi-host job.

    Detected from the standard variables (``JAX_COORDINATOR_ADDRESS`` or a cluster environment
    that jax auto-detects: SLURM, Open MPI, Cloud TPU), and only when more than one process is
    expected.  Returns whether it initialized.
    """
    multi = (
        "JAX_COORDINATOR_ADDRESS" in os.environ
        or int(os.environ.get("SLURM_NTASKS", "1")) > 1
        or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
        or int(os.environ.get("JAX_NUM_PROCESSES", "1")) > 1
    )
    if multi:
        jax.distributed.initialize()
    return multi
