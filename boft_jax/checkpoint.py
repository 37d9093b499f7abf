"""Adapter checkpoints with orbax: only the trainable params (and their config), never the base.

Two things live here:

* :func:`save_adapter` / :func:`load_adapter`: a finished adapter (params + :class:`BOFTConfig`
  + optional JSON metadata) in one directory.  Replacing an existing checkpoint is crash-safe: the
  new one is written completely under a temporary name first and swapped in with renames, so a
  crash at any point leaves the last good checkpoint (or the new one) intact.
* :class:`TrainCheckpointer`: an ``orbax.checkpoint.CheckpointManager`` for training state
  (adapter, optimizer state, step, data position), saving every N steps, keeping the last K,
  asynchronously.  Orbax writes each step under a temporary name and renames it on commit, so an
  interrupted save never replaces the last good step.

Nothing is unpickled: arrays are stored by orbax (tensorstore/OCDBT), configs and metadata as JSON.

Example:
  >>> import tempfile, jax.numpy as jnp, boft_jax as boft
  >>> from boft_jax.checkpoint import save_adapter, load_adapter
  >>> cfg = boft.BOFTConfig(block_size=4, targets="fc1")
  >>> adapter = {"fc1": {"kernel": {"skew": jnp.zeros((1, 4, 6)), "scale": jnp.ones(8)}}}
  >>> path = tempfile.mkdtemp() + "/adapter"
  >>> save_adapter(path, adapter, cfg, metadata={"note": "demo"})
  >>> restored, cfg2, meta = load_adapter(path)
  >>> cfg2 == cfg, meta["note"], restored["fc1"]["kernel"]["skew"].shape
  (True, 'demo', (1, 4, 6))
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from boft_jax.config import BOFTConfig
from boft_jax.sharding import gather_to_host, is_main_process

__all__ = ["save_adapter", "load_adapter", "config_to_dict", "config_from_dict", "TrainCheckpointer"]

_FORMAT = "boft_jax.adapter/1"


def config_to_dict(config: BOFTConfig) -> dict[str, Any]:
    """A JSON-ready dict of a :class:`BOFTConfig` (tuples become lists)."""
    d = dataclasses.asdict(config)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def config_from_dict(d: Mapping[str, Any]) -> BOFTConfig:
    """Inverse of :func:`config_to_dict`; unknown keys are an error naming them."""
    known = {f.name for f in dataclasses.fields(BOFTConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown BOFTConfig fields in checkpoint: {unknown} (known: {sorted(known)})")
    return BOFTConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def save_adapter(
    path: str | os.PathLike,
    adapter: Mapping,
    config: BOFTConfig,
    *,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = True,
) -> None:
    """Write ``adapter`` (from :func:`boft_jax.split`) and its ``config`` to directory ``path``.

    Args:
      path: the checkpoint directory (its parent is created if needed).
      adapter: the adapter params pytree.
      config: the :class:`BOFTConfig` it was trained with.
      metadata: optional JSON-serializable extras (e.g. the base checkpoint path, metrics).
      overwrite: replace an existing checkpoint at ``path`` (crash-safely); else raise.
    """
    path = Path(path).absolute()
    multi = jax.process_count() > 1
    main = is_main_process()
    if main:
        _recover(path)
    if multi:  # every process must see the recovered state before deciding anything
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"boft_jax.save_adapter:recover:{path}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"adapter checkpoint {path} exists; pass overwrite=True to replace it")
    if main:
        path.parent.mkdir(parents=True, exist_ok=True)
    # Every process takes part in orbax's save (it synchronizes them) under one shared temporary
    # name; only process 0 renames.
    tag = uuid.uuid4().int & 0x7FFFFFFF
    if multi:
        from jax.experimental import multihost_utils

        tag = int(multihost_utils.broadcast_one_to_all(np.int32(tag)))
    tmp = path.with_name(f".{path.name}.tmp-{tag:08x}")
    meta = {"format": _FORMAT, "config": config_to_dict(config), "metadata": dict(metadata or {})}
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(
            tmp,
            ocp.args.Composite(adapter=ocp.args.StandardSave(gather_to_host(adapter)), meta=ocp.args.JsonSave(meta)),
        )
    if main:
        if path.exists():
            old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(path, old)  # a crash after this line leaves `old` and the complete `tmp`
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    if multi:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"boft_jax.save_adapter:{tag:08x}")


def _recover(path: Path) -> None:
    """Undo a replacement that crashed between its two renames: bring the last good one back."""
    if path.exists():
        return
    olds = sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds:
        os.replace(olds[-1], path)


def load_adapter(path: str | os.PathLike) -> tuple[dict, BOFTConfig, dict]:
    """Read a checkpoint written by :func:`save_adapter`: ``(adapter, config, metadata)``.

    If a previous :func:`save_adapter` crashed between moving the old checkpoint aside and moving
    the new one in, the old one (the last good checkpoint) is put back and loaded.
    """
    path = Path(path).absolute()
    if is_main_process():  # one process repairs; the others wait for it
        _recover(path)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"boft_jax.load_adapter:recover:{path}")
    if not path.is_dir():
        raise FileNotFoundError(f"no adapter checkpoint directory at {path}")
    if not (path / "meta").exists() or not (path / "adapter").exists():
        raise ValueError(
            f"{path} is not a boft_jax adapter checkpoint (expected 'adapter' and 'meta' entries, found"
            f" {sorted(os.listdir(path))})"
        )
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        restored = ckptr.restore(
            path, ocp.args.Composite(adapter=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore())
        )
    meta = restored["meta"]
    if meta.get("format") != _FORMAT:
        raise ValueError(f"{path}: unsupported adapter format {meta.get('format')!r} (expected {_FORMAT!r})")
    return restored["adapter"], config_from_dict(meta["config"]), meta.get("metadata", {})


_SHAPES_KEY = "_adapter_shapes"


def _shapes(tree) -> dict[str, list[int]]:
    """``{leaf path: shape}`` of a pytree, JSON-ready (the identity of an adapter's structure)."""
    return {jax.tree_util.keystr(p): list(np.shape(x)) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


class TrainCheckpointer:
    """Periodic, asynchronous training checkpoints: adapter, optimizer state and JSON state.

    Args:
      directory: where step directories are written.
      save_every: save when ``step % save_every == 0`` (and whenever ``force=True``).
      keep: how many recent steps to keep.
      async_save: write in a background thread (call :meth:`wait` or :meth:`close` before exit).

    Example::

      ckpt = TrainCheckpointer(out / "checkpoints", save_every=50, keep=3)
      restored = ckpt.restore_latest(adapter, opt_state)    # None when there is nothing to resume
      ...
      ckpt.save(step, adapter, opt_state, {"data_position": step * batch_size})
      ckpt.close()
    """

    def __init__(self, directory: str | os.PathLike, *, save_every: int = 100, keep: int = 3, async_save: bool = True):
        if save_every < 1 or keep < 1:
            raise ValueError(f"save_every and keep must be >= 1, got {save_every}, {keep}")
        self.directory = Path(directory).absolute()
        self.save_every = save_every
        self._mngr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, save_interval_steps=1, enable_async_checkpointing=async_save, create=True
            ),
        )

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mngr.all_steps())

    def save(self, step: int, adapter, opt_state, state: Mapping[str, Any], *, force: bool = False) -> bool:
        """Save if ``step`` is due (or ``force``); returns whether a save was started."""
        if not force and step % self.save_every:
            return False
        if step in self._mngr.all_steps():
            return False
        self._mngr.save(
            step,
            args=ocp.args.Composite(
                adapter=ocp.args.StandardSave(adapter),
                opt_state=ocp.args.StandardSave(opt_state),
                state=ocp.args.JsonSave({**state, _SHAPES_KEY: _shapes(adapter)}),
            ),
            force=True,
        )
        return True

    def restore_latest(self, adapter_like, opt_state_like):
        """``(step, adapter, opt_state, state)`` of the newest complete step, or ``None``.

        ``adapter_like`` / ``opt_state_like`` give the tree structure, shapes, dtypes and
        shardings to restore into (e.g. the freshly initialized values).
        """
        step = self._mngr.latest_step()
        if step is None:
            return None
        # The adapter's shapes are in the JSON state: compare them before orbax restores arrays.
        stored = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.JsonRestore()))["state"]
        want = _shapes(adapter_like)
        if _SHAPES_KEY in stored and stored[_SHAPES_KEY] != want:
            got = stored[_SHAPES_KEY]
            diff = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
            raise ValueError(
                f"step {step} in {self.directory} holds another adapter: {len(diff)} leaves differ, e.g. "
                + "; ".join(f"{k}: stored {got.get(k)}, expected {want.get(k)}" for k in diff[:3])
            )
        abstract = lambda t: jax.tree.map(ocp.utils.to_shape_dtype_struct, t)  # noqa: E731
        r = self._mngr.restore(
            step,
            args=ocp.args.Composite(
                adapter=ocp.args.StandardRestore(abstract(adapter_like)),
                opt_state=ocp.args.StandardRestore(abstract(opt_state_like)),
                state=ocp.args.JsonRestore(),
            ),
        )
        opt_state = jax.tree.unflatten(jax.tree.structure(opt_state_like), jax.tree.leaves(r["opt_state"]))
        state = {k: v for k, v in r["state"].items() if k != _SHAPES_KEY}
        return step, r["adapter"], opt_state, state

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()
