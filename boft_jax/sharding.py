"""Sharding for BOFT finetuning: ``jax.jit`` + ``NamedSharding`` over a ``Mesh`` (today's pjit).

* Frozen base weights are sharded: FSDP-style over the ``data`` axis (each weight split along its
  largest divisible axis) and/or tensor-parallel over the ``model`` axis (kernels split along their
  output features, the layout in which ``K -> M K`` needs no communication).
* Adapter params and their optimizer state are replicated (they are tiny).
* The batch is split over ``data``.

Example:
  >>> import jax, boft_jax.sharding as sh
  >>> dict(sh.make_mesh(f"data={jax.device_count()}").shape) == {"data": jax.device_count()}  # all devices
  True
  >>> mesh = sh.make_mesh("data=1", jax.devices()[:1])  # or a subset of them
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

from boft_jax.linen import _no_boxes

__all__ = [
    "parse_mesh",
    "make_mesh",
    "frozen_sharding",
    "replicated",
    "batch_sharding",
    "shard_frozen",
    "unsplit_weights",
    "bytes_per_device",
    "maybe_initialize_distributed",
    "is_main_process",
    "gather_to_host",
]

AXES = ("data", "model")


def parse_mesh(spec: str) -> dict[str, int]:
    """``"data=2,model=4"`` -> ``{"data": 2, "model": 4}``; axes are ``data`` and ``model``."""
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, eq, size = part.partition("=")
        name = name.strip()
        if not eq or name not in AXES or not size.strip().isascii() or not size.strip().isdigit() or int(size) < 1:
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
    """A ``Mesh`` with the named axes; their sizes must multiply to the number of devices.

    ``devices``: a sequence of devices or an array of them of any shape (e.g. from
    ``jax.experimental.mesh_utils.create_device_mesh``), taken in row-major order; default: all.
    """
    if isinstance(spec, str):
        sizes = parse_mesh(spec)
    else:
        sizes = dict(spec)
        bad = {k: v for k, v in sizes.items() if k not in AXES or isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1}
        if bad or not sizes:
            raise ValueError(
                f"bad mesh {sizes}: expected axes {AXES} with positive integer sizes, e.g. {{'data': 2, 'model': 4}}"
            )
    devices = list(np.asarray(jax.devices() if devices is None else devices, dtype=object).reshape(-1))
    if not devices:
        raise ValueError("make_mesh got no devices (an empty devices list); pass None for all of jax.devices()")
    if len({id(d) for d in devices}) != len(devices):
        raise ValueError(f"make_mesh got a device more than once: {devices}")
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
    if ndim < 1:
        raise ValueError(f"batch_sharding needs arrays with a leading batch axis (ndim >= 1), got ndim={ndim}")
    lead = "data" if "data" in mesh.shape else None
    return NamedSharding(mesh, P(lead, *([None] * (ndim - 1))))


def _spec_for(shape: tuple[int, ...], mesh: Mesh, is_kernel: bool, min_size: int) -> P:
    spec: list[Any] = [None] * len(shape)
    if int(np.prod(shape)) < min_size:
        return P(*spec)
    model = mesh.shape.get("model", 1)
    data = mesh.shape.get("data", 1)
    if model > 1:
        if is_kernel and len(shape) >= 2 and shape[-1] % model == 0:
            spec[-1] = "model"  # output features: M K needs no communication
        else:  # e.g. a 10-class head: split another axis (GSPMD adds the communication)
            free = [i for i in range(len(shape)) if shape[i] % model == 0]
            if free:
                spec[max(free, key=lambda i: shape[i])] = "model"
    if data > 1:
        free = [i for i in range(len(shape)) if spec[i] is None and shape[i] % data == 0]
        if free:
            spec[max(free, key=lambda i: shape[i])] = "data"
        elif "model" in spec and shape[spec.index("model")] % (model * data) == 0:
            # no other axis divisible by data: split the model-split axis over both (e.g. (7, 300) on
            # data=2,model=2 -> 300 / 4 per device, instead of 300 / 2 repeated over data)
            spec[spec.index("model")] = ("model", "data")
    return P(*spec)


def _mesh_axes(spec) -> set[str]:
    """The mesh axes a PartitionSpec uses (entries are None, an axis name, or a tuple of names)."""
    return {a for entry in spec if entry is not None for a in ((entry,) if isinstance(entry, str) else entry)}


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def frozen_sharding(frozen: Mapping, mesh: Mesh, *, min_size: int = 1024, strict: bool = True) -> Any:
    """A ``NamedSharding`` per frozen leaf (same tree structure).

    Leaves with fewer than ``min_size`` elements (norms, biases) are replicated.  Kernels are split
    along their last axis over ``model`` (if the mesh has it and it divides; otherwise along their
    largest axis that it divides), then along their largest remaining divisible axis over ``data``
    (FSDP), or, if no other axis divides, the ``model`` axis over both (``("model", "data")``).  A
    leaf with at least ``min_size`` elements that no mesh axis of size > 1 can split, although one
    of its dimensions is at least that axis size, would be held whole by every device:
    with ``strict`` (the default) that is a ``ValueError`` naming those leaves, their shapes and the
    axis sizes that would divide them; with ``strict=False`` they stay replicated.  So is, with
    ``strict``, a ``model`` axis of size > 1 that splits none of those leaves (e.g. ``data=2,model=3``
    for weights of even sizes: its devices would only repeat each other's work).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> mesh = make_mesh("data=1", jax.devices()[:1])
      >>> tuple(frozen_sharding({"w": {"kernel": jnp.zeros((64, 64))}}, mesh)["w"]["kernel"].spec)
      (None, None)
    """
    _no_boxes(frozen, "sharding.frozen_sharding", "frozen",
              "boft_jax places every weight by its own rule (a kernel's output features over 'model'), not by"
              " the boxes' axis names")
    unknown = [k for k, v in mesh.shape.items() if k not in AXES and v > 1]
    if unknown:
        raise ValueError(
            f"mesh {dict(mesh.shape)} has axes {unknown} that boft_jax does not shard over; name the axes"
            f" {AXES} ('data': batch and FSDP, 'model': tensor parallel), e.g. make_mesh('data=2,model=4')"
        )
    axes = {k: v for k, v in mesh.shape.items() if v > 1}
    bad: list[str] = []
    large: list[str] = []  # leaves of at least min_size elements
    model_split = False  # whether the model axis splits any of them

    def one(path, leaf):
        nonlocal model_split
        name = str(getattr(path[-1], "key", path[-1])) if path else ""
        shape = tuple(np.shape(leaf))
        spec = _spec_for(shape, mesh, name in ("kernel", "embedding"), min_size)
        if int(np.prod(shape)) >= min_size:
            large.append(f"{_path_str(path)} {shape}")
            model_split = model_split or "model" in _mesh_axes(spec)
        splittable = any(n >= min(axes.values()) for n in shape) if axes else False  # not (), not (5,) on 8
        if splittable and int(np.prod(shape)) >= min_size and not _mesh_axes(spec):
            divisors = sorted({q for n in shape for q in range(2, n + 1) if n % q == 0})
            bad.append(f"{_path_str(path)} {shape} (axis sizes that divide it: {_short(divisors)})")
        return NamedSharding(mesh, spec)

    out = jax.tree_util.tree_map_with_path(one, frozen)
    if bad and strict:
        listing = "\n  ".join(bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
        raise ValueError(
            f"mesh {dict(mesh.shape)} does not divide {len(bad)} frozen weight(s): no axis of them is"
            f" divisible by {' or '.join(f'{k}={v}' for k, v in axes.items())}, so every device would"
            f" hold them whole:\n  {listing}\nchoose mesh axis sizes that divide the weights' dimensions, or"
            " strict=False to keep them whole on every device (plain data parallelism for them)"
        )
    if strict and "model" in axes and large and not model_split:
        # tensor parallelism that splits nothing: every model-axis device computes the same thing
        raise ValueError(
            f"mesh {dict(mesh.shape)}: the model axis (size {axes['model']}) splits none of the"
            f" {len(large)} frozen weight(s) with >= {min_size} elements (no dimension of them is divisible"
            f" by {axes['model']}), so its devices would all hold and compute the same: e.g."
            f" {', '.join(large[:4])}; choose a model size that divides the weights' dimensions, or drop the axis"
        )
    return out


def unsplit_weights(frozen: Mapping, mesh: Mesh, *, min_size: int = 1024) -> list[tuple[str, int]]:
    """``(path and shape, bytes)`` of the frozen leaves with at least ``min_size`` elements that
    :func:`frozen_sharding` (``strict=False``) leaves whole on every device of a mesh of more than
    one device: what ``strict=True`` would refuse, and what a data-parallel run then holds per device.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> unsplit_weights({"w": {"kernel": jnp.zeros((64, 64))}}, make_mesh("data=1", jax.devices()[:1]))
      []
    """
    if mesh.devices.size <= 1:
        return []
    specs = frozen_sharding(frozen, mesh, min_size=min_size, strict=False)
    out = []
    for (path, leaf), spec in zip(jax.tree_util.tree_leaves_with_path(frozen), jax.tree.leaves(specs)):
        size = int(np.prod(np.shape(leaf)))
        if size >= min_size and not _mesh_axes(spec.spec):
            out.append((f"{_path_str(path)} {tuple(np.shape(leaf))}", size * np.dtype(leaf.dtype).itemsize))
    return out


def _short(values: list[int], limit: int = 8) -> str:
    return ", ".join(map(str, values[:limit])) + (", ..." if len(values) > limit else "") if values else "none"


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
    """Call ``jax.distributed.initialize`` when launched as one process of a multi-process job.

    Either set ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0), ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID`` in every process, or launch under a cluster manager that jax detects by
    itself (SLURM, Open MPI, Cloud TPU).  Does nothing for a single process; returns whether it
    initialized.  Every process must see the same files (checkpoint, data, output directory);
    only process 0 writes the run's outputs (see :func:`is_main_process`).
    """
    multi = (
        "JAX_COORDINATOR_ADDRESS" in os.environ
        or int(os.environ.get("SLURM_NTASKS", "1")) > 1
        or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
        or int(os.environ.get("JAX_NUM_PROCESSES", "1")) > 1
    )
    if not multi:
        return False
    kwargs: dict[str, Any] = {}
    if os.environ.get("JAX_NUM_PROCESSES", "").strip() == "1" and "JAX_PROCESS_ID" not in os.environ:
        os.environ["JAX_PROCESS_ID"] = "0"  # a one-process "cluster" needs no id
    for var, key in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
        if var in os.environ:
            try:
                kwargs[key] = int(os.environ[var])
            except ValueError:
                raise ValueError(f"{var}={os.environ[var]!r} is not an integer") from None
    jax.distributed.initialize(**kwargs)
    return True


def gather_to_host(tree) -> Any:
    """Every array leaf as a whole ``numpy`` array in every process (a collective in multi-process
    jobs: all processes must call it).  Leaves sharded across processes are all-gathered."""

    def one(x):
        if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(one, tree)


def is_main_process() -> bool:
    """True in process 0 (the one that writes logs and outputs in a multi-process job)."""
    return jax.process_index() == 0
