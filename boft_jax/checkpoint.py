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
import glob
import hashlib
import importlib.metadata
import json
import operator
import os
import re
import shutil
import sys
import traceback
import uuid
import warnings
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from boft_jax.config import BOFTConfig, UnusedNeumannTerms, layer_label
from boft_jax.orthogonal import block_size_from_num_params
from boft_jax.sharding import gather_to_host, is_main_process

__all__ = ["save_adapter", "load_adapter", "config_to_dict", "config_from_dict", "TrainCheckpointer", "IncompleteCheckpoint", "check_storable_path"]


class IncompleteCheckpoint(ValueError):
    """A step directory that is not a complete :class:`TrainCheckpointer` checkpoint."""

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
    with warnings.catch_warnings():  # a stored config is rebuilt as saved: the warning was given when it was made
        warnings.simplefilter("ignore", UnusedNeumannTerms)
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

    One writer at a time per ``path`` (a save removes temporary directories that an earlier save
    to the same path left behind when it crashed).

    Args:
      path: the checkpoint directory (its parent is created if needed); a symlink to one is
        written through (the link stays).
      adapter: the adapter params pytree.
      config: the :class:`BOFTConfig` it was trained with.
      metadata: optional plain-JSON extras (e.g. the base checkpoint path, metrics): str, finite
        numbers, bool, None, lists and dicts (keys come back as strings, tuples as lists);
        anything else is refused before writing.
      overwrite: replace an existing checkpoint at ``path`` (crash-safely); else raise.
    """
    path = Path(path).absolute()
    if path.is_symlink():  # write into the checkpoint the link points to, keep the link
        path = path.resolve()
    check_storable_path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory (an adapter checkpoint is a directory)")
    if path.is_dir() and not _is_checkpoint_dir(path) and any(path.iterdir()):
        # Replacing means deleting: only ever delete an adapter checkpoint (or an empty directory).
        found = sorted(os.listdir(path))
        raise FileExistsError(
            f"{path} is a directory that is not a boft_jax adapter checkpoint (it holds {found[:6]}"
            f"{' ...' if len(found) > 6 else ''}, not the 'adapter' and 'meta' entries of one); save_adapter"
            " replaces only adapter checkpoints or empty directories: choose another path"
        )
    if metadata is not None and not isinstance(metadata, Mapping):
        raise TypeError(f"save_adapter metadata must be a mapping (a JSON object), got {type(metadata).__name__}")
    host = gather_to_host(adapter)
    leaves = jax.tree_util.tree_leaves_with_path(host)
    if not leaves:
        raise ValueError("save_adapter got an adapter with no arrays (an empty tree); nothing to save")
    for p, x in leaves:
        dtype = np.asarray(x).dtype
        if not (jnp.issubdtype(dtype, jnp.number) or dtype == np.bool_):  # numbers incl. bfloat16
            raise TypeError(f"adapter leaf {jax.tree_util.keystr(p)} is not a numeric array (dtype {dtype})")
    meta = {
        "format": _FORMAT,
        "config": config_to_dict(config),
        "metadata": dict(metadata or {}),
        "checksums": _checksums(host),
    }
    stored, empties = _without_empty(host)
    if empties:
        meta["empty_leaves"] = empties
    meta[_META_SUM_KEY] = _meta_sum(meta)
    _check_config_fits(path, host, config)
    try:  # checked before anything is written: orbax would fail half-way and leave a temporary dir
        json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"save_adapter metadata must be plain JSON (str, finite numbers, bool, None, lists, dicts): {e}") from None
    multi = jax.process_count() > 1
    main = is_main_process()
    if main:
        _recover(path)
        # left by a crash before the first rename (tmp), while deleting a replaced checkpoint (trash),
        # or by an older version of this function that deleted `.old-*` in place
        stale = sibling_leftovers(path, "tmp") + sibling_leftovers(path, "trash")
        if path.exists():
            stale += _olds(path, complete_only=False)
        for p in stale:
            _remove_or_warn(p)
    if multi:  # every process must see the recovered state before deciding anything
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"boft_jax.save_adapter:recover:{path}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"adapter checkpoint {path} exists; pass overwrite=True to replace it")
    if main:
        blocking = _file_on_path(path)
        if blocking is not None:
            raise NotADirectoryError(
                f"cannot save an adapter checkpoint at {path}: {blocking} is a file; an adapter checkpoint"
                " is a directory, so give a path whose existing parts are directories"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
    # Every process takes part in orbax's save (it synchronizes them) under one shared temporary
    # name; only process 0 renames.
    tag = uuid.uuid4().int & 0x7FFFFFFF
    if multi:
        from jax.experimental import multihost_utils

        tag = int(multihost_utils.broadcast_one_to_all(np.int32(tag)))
    tmp = path.with_name(f".{path.name}.tmp-{tag:08x}")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(tmp, ocp.args.Composite(adapter=ocp.args.StandardSave(stored), meta=ocp.args.JsonSave(meta)))
    if main:
        if path.exists():
            old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(path, old)  # a crash after this line leaves `old` and the complete `tmp`
            os.replace(tmp, path)
            # Renamed before deleting: a crash mid-delete leaves a `.trash-*` (ignored, removed by
            # the next save), never a half-deleted `.old-*` that recovery could take for a checkpoint.
            trash = path.with_name(f".{path.name}.trash-{uuid.uuid4().hex[:8]}")
            os.replace(old, trash)
            _remove_or_warn(trash)
        else:
            os.replace(tmp, path)
    if multi:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"boft_jax.save_adapter:{tag:08x}")


# sha256 of what describes the arrays in the meta entry (format, config, array checksums, empty
# leaves): a damaged or edited config is named as such at load, not read as another adapter.  The
# user's ``metadata`` stays outside it (free-form notes).
_META_SUM_KEY = "meta_sha256"
_META_SUMMED = ("format", "config", "checksums", "empty_leaves")


def _json_sha256(obj: Any) -> str:
    """sha256 of ``obj`` as canonical JSON (sorted keys): the checksum of a stored JSON entry."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, allow_nan=True).encode()).hexdigest()


def _meta_sum(meta: Mapping[str, Any]) -> str:
    return _json_sha256({k: meta[k] for k in _META_SUMMED if k in meta})


def _remove_or_warn(p: Path) -> None:
    """Delete a replaced or stale checkpoint copy; one that cannot be deleted (permissions, a busy
    file system) is left in place with a warning naming it, not silently (it holds disk space)."""
    errors: list[str] = []
    if sys.version_info >= (3, 12):
        shutil.rmtree(p, onexc=lambda fn, name, exc: errors.append(f"{name}: {exc}"))
    else:
        shutil.rmtree(p, onerror=lambda fn, name, info: errors.append(f"{name}: {info[1]}"))
    if p.exists():
        warnings.warn(
            f"could not delete {p}, a replaced or stale copy of an adapter checkpoint ({len(errors)} error(s),"
            f" e.g. {errors[0] if errors else 'unknown'}); the new checkpoint is complete, but this copy stays"
            " on disk until it is removed by hand or a later save can delete it",
            stacklevel=3,
        )


def _checksums(tree) -> dict[str, str]:
    """``{leaf path: sha256 of dtype, shape and bytes}``: orbax/tensorstore do not detect a damaged file."""
    out = {}
    for p, x in jax.tree_util.tree_leaves_with_path(tree):
        a = np.ascontiguousarray(np.asarray(x))
        h = hashlib.sha256(f"{a.dtype.name}{a.shape}".encode())
        h.update(a.view(np.uint8).reshape(-1) if a.size else b"")
        out[jax.tree_util.keystr(p)] = h.hexdigest()
    return out


def _without_empty(tree, placeholder=lambda dtype: np.zeros((1,), dtype)):
    """``(tree', empties)``: orbax cannot store zero-size arrays (the skew of a layer with block size
    1, e.g. where PEFT's OFT adjusted ``r`` to the layer's width, and its optimizer state), so each
    becomes a one-element ``placeholder`` and ``empties`` (``{leaf path: [shape, dtype]}``, JSON)
    records it for :func:`_with_empty`.  A tree without zero-size leaves comes back unchanged."""
    empties = {}

    def swap(p, x):
        if np.size(x) == 0:
            dtype = np.dtype(x.dtype)
            empties[jax.tree_util.keystr(p)] = [list(np.shape(x)), dtype.name]
            return placeholder(dtype)
        return x

    out = jax.tree_util.tree_map_with_path(swap, tree)
    return (out if empties else tree), empties


def _with_empty(tree, empties: Mapping[str, Any]):
    """Inverse of :func:`_without_empty`: the recorded zero-size leaves back in place of their placeholders."""
    if not empties:
        return tree

    def back(p, x):
        rec = empties.get(jax.tree_util.keystr(p))
        if rec is None:
            return x
        empty = np.zeros(tuple(rec[0]), jnp.dtype(rec[1]))
        return jnp.asarray(empty) if isinstance(x, jax.Array) else empty

    return jax.tree_util.tree_map_with_path(back, tree)


def _leaf_checksums(tree) -> list[str]:
    """sha256 of every leaf (dtype, shape, bytes), in leaf order, gathered to the host."""
    return list(_checksums(gather_to_host(tree)).values())


def abandoned_io_echo(exc: BaseException | None, tb) -> bool:
    """Whether ``exc`` (with traceback ``tb``) is an echo of an orbax read or write that was abandoned
    when another part of it failed: an exception of orbax's serialization coroutines, or asyncio's
    "Event loop is closed" raised in ``call_soon_threadsafe`` (a tensorstore callback finding orbax's
    event loop gone).  The failure itself is reported once, by whoever called orbax."""
    frames = traceback.extract_tb(tb)
    return any("orbax" in f.filename and "serialization" in f.filename for f in frames) or (
        isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"
        and any(f.name == "call_soon_threadsafe" for f in frames)
    )


def _quiet_abandoned_reads() -> None:
    """Installed before the first orbax restore (and kept for the process): when a restore fails
    (reported as one clear error), drop the echoes of its other reads: tensorstore reads still in flight fail later, as "Exception ignored in: <coroutine
    ... _read_array_index_and_device_put>" or "RuntimeError: Event loop is closed" (a read finishing
    after orbax closed its event loop), printed one traceback each (hundreds of lines) through
    ``sys.unraisablehook``, often at interpreter exit.  Only those are dropped; any other unraisable
    exception still reaches the hook that was installed before."""
    previous = sys.unraisablehook
    if getattr(previous, "_boft_quiet", False):
        return

    def hook(unraisable):
        if not abandoned_io_echo(unraisable.exc_value, unraisable.exc_traceback):
            previous(unraisable)

    hook._boft_quiet = True
    sys.unraisablehook = hook


def _brief(e: Exception, limit: int = 300) -> str:
    """``'Type: first line of the message'``, cut at ``limit`` characters (tensorstore's errors
    append a many-line dump of the store's spec, announced by "See full TensorStore details:").

    >>> _brief(ValueError("Encountered error while reading array index. See full TensorStore details: <bound"))
    'ValueError: Encountered error while reading array index.'
    """
    first = (str(e).strip().splitlines() or [""])[0]
    first = first.split(" See full TensorStore details:")[0]  # what follows is a dump of the store's spec
    first = first if len(first) <= limit else first[: limit - 3] + "..."
    return f"{type(e).__name__}: {first}"


def _is_checkpoint_dir(path: Path) -> bool:
    """Whether ``path`` holds the two entries :func:`save_adapter` writes."""
    return (path / "adapter").is_dir() and (path / "meta").exists()


def _file_on_path(path: Path) -> Path | None:
    """The nearest existing one of ``path`` and its parents when it is not a directory (then nothing
    can be written at ``path``), else ``None``."""
    for p in (path, *path.parents):
        if p.exists():
            return None if p.is_dir() else p
    return None


def check_storable_path(path: Path) -> None:
    """Refuse a directory that orbax-checkpoint (tensorstore) writes but cannot read back: one whose
    absolute path holds a backslash (on POSIX) or a name with a non-empty ``[...]`` pair (measured
    with orbax 0.11 / tensorstore: the save succeeds, every later read fails as if the arrays were
    missing; ``a[``, ``b]``, ``[]`` and brackets in different names are fine)."""
    text = os.fspath(path)
    bracketed = any(re.search(r"\[[^\]]+\]", part) for part in Path(path).parts)  # a pair inside one name
    if (os.sep != "\\" and "\\" in text) or bracketed:
        raise ValueError(
            f"{text!r}: orbax-checkpoint cannot read back a checkpoint whose path contains a backslash or"
            " brackets '[...]' (the arrays would be written but not found again); choose a directory path"
            " without them"
        )


def sibling_leftovers(path: Path, kind: str) -> list[Path]:
    """The leftovers ``.<name>.<kind>-<id>`` of saves of ``path`` (its name taken literally: a name
    with glob characters such as ``run[1]`` must not match another checkpoint's leftovers)."""
    prefix = f".{path.name}.{kind}-"
    return [p for p in path.parent.glob(f"{glob.escape(prefix)}*") if p.name.startswith(prefix)]


def _olds(path: Path, complete_only: bool = True) -> list[Path]:
    """Checkpoints moved aside by a replacement (oldest first); by default only complete ones (with
    both entries), so that a directory an older version left half-deleted is never taken for one."""
    olds = sorted(sibling_leftovers(path, "old"), key=lambda p: p.stat().st_mtime)
    if complete_only:
        olds = [p for p in olds if _is_checkpoint_dir(p)]
    return olds


def _recover(path: Path) -> None:
    """Undo a replacement that crashed between its two renames: bring the last good one back.

    Only writers (:func:`save_adapter`) call this; one writer at a time per path.
    """
    if path.exists():
        return
    olds = _olds(path)
    if olds:
        os.replace(olds[-1], path)


def load_adapter(path: str | os.PathLike) -> tuple[dict, BOFTConfig, dict]:
    """Read a checkpoint written by :func:`save_adapter`: ``(adapter, config, metadata)``.

    Every array is checked against the checksum stored when it was written, the config and those
    checksums against their own, and the config against the arrays' shapes, so a damaged file is an
    error naming it, never silent garbage.
    If a previous :func:`save_adapter` crashed between moving the old checkpoint aside and moving
    the new one in, the old one (the last good checkpoint) is read where it lies, with a warning
    (the next :func:`save_adapter` to this path puts it back); reading never moves anything, so it
    is safe while a writer is at work.
    """
    path = Path(path).absolute()
    source = path
    if not path.exists() and _olds(path):
        source = _olds(path)[-1]
        warnings.warn(
            f"{path} is missing but {source.name} (the last good checkpoint of a replacement that was"
            " interrupted) is there; loading it",
            UserWarning,
            stacklevel=2,
        )
    if not source.is_dir():
        if source.exists():
            raise NotADirectoryError(f"{path} is a file, not an adapter checkpoint directory (what boft.save_adapter"
                                     " writes: a directory holding 'adapter' and 'meta')")
        raise FileNotFoundError(f"no adapter checkpoint directory at {path}")
    check_storable_path(source.resolve())
    if not (source / "meta").exists() or not (source / "adapter").exists():
        raise ValueError(
            f"{path} is not a boft_jax adapter checkpoint (expected 'adapter' and 'meta' entries, found"
            f" {sorted(os.listdir(source))})"
        )
    _quiet_abandoned_reads()  # before the restore: a failing read can echo while it is still running
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
            both = ckptr.restore(source, ocp.args.Composite(adapter=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
        restored, meta = both["adapter"], both["meta"]
    except Exception as e:  # orbax / tensorstore: ValueError, OSError, KeyError, or a bare Exception (a truncated file)
        raise ValueError(f"{path}: damaged or incomplete adapter checkpoint ({_brief(e)})") from None
    if not isinstance(meta, Mapping) or meta.get("format") != _FORMAT:
        got = meta.get("format") if isinstance(meta, Mapping) else type(meta).__name__
        raise ValueError(f"{path}: unsupported adapter format {got!r} (expected {_FORMAT!r})")
    if _META_SUM_KEY not in meta:
        warnings.warn(
            f"{path}: its meta entry carries no checksum ({_META_SUM_KEY!r}: checkpoints saved before"
            " 2026-12-03 have none, or it was removed), so damage or an edit of its config cannot be detected;"
            " save the adapter again with boft_jax.checkpoint.save_adapter to add one",
            UserWarning,
            stacklevel=2,
        )
    elif meta[_META_SUM_KEY] != _meta_sum(meta):
        raise ValueError(
            f"{path}: its meta entry (the config and the arrays' checksums) does not match the checksum stored"
            " with it: the file is damaged or was edited after saving. Restore it from a copy, or save the"
            " adapter again with boft_jax.checkpoint.save_adapter"
        )
    if not isinstance(meta.get("config"), Mapping) or not isinstance(meta.get("metadata", {}), Mapping):
        raise ValueError(f"{path}: its meta entry has no config object (or a metadata that is not an object)")
    sums = meta.get("checksums")
    try:
        if sums is not None and not isinstance(sums, Mapping):
            raise TypeError(f"'checksums' is a {type(sums).__name__}")
        restored = _with_empty(restored, meta.get("empty_leaves") or {})
    except (TypeError, ValueError, IndexError, AttributeError) as e:
        raise ValueError(
            f"{path}: its meta entry's 'checksums' / 'empty_leaves' are malformed ({e}): the file is damaged or"
            " was edited after saving"
        ) from None
    if sums is not None:  # checkpoints written before checksums were stored have none
        got = _checksums(restored)
        bad = sorted(k for k in set(sums) | set(got) if sums.get(k) != got.get(k))
        if bad:
            raise ValueError(
                f"{path}: {len(bad)} array(s) do not match the checksums stored when the checkpoint was written"
                f" ({', '.join(bad[:4])}{', ...' if len(bad) > 4 else ''}): the files are damaged, or were replaced"
                " while being read"
            )
    config = config_from_dict(meta["config"])
    _check_config_fits(path, restored, config)
    return restored, config, dict(meta.get("metadata", {}))


def _check_config_fits(path: Path, adapter, config: BOFTConfig) -> None:
    """The stored config must describe the stored blocks (factor count, block size / count), select
    every stored layer (targets / exclude), and train every other stored leaf (a ``bias`` by
    ``config.bias``, anything else by ``modules_to_save``): what ``boft.split(params, config)`` keeps,
    so that a resumed run or a re-save does not drop trained leaves."""
    problems = []
    untrained = []

    def walk(tree, where):
        if isinstance(tree, Mapping):
            if where and config.saves_module(where):
                return  # the whole module trains
            if set(tree) == {"skew", "scale"}:
                shape = np.shape(tree["skew"])
                m, k, b = shape[-3], shape[-2], block_size_from_num_params(shape[-1])
                layer = where.removesuffix("/kernel")  # the module path the config's regexes match
                try:
                    fits = config.layer_structure(layer, k * b) == (b, k, m)
                except ValueError:
                    fits = False
                if not fits:
                    problems.append(f"{where}: blocks (m={m}, k={k}, b={b})")
                elif not config.matches(layer):  # a model wrapped with this config would not adapt it
                    problems.append(f"{layer_label(layer)} is not selected by its targets {config.targets}"
                                    f" (exclude {config.exclude})")
                return
            adapted = isinstance(tree.get("kernel"), Mapping) and set(tree["kernel"]) == {"skew", "scale"}
            for key, v in tree.items():
                here = f"{where}/{key}" if where else str(key)
                if isinstance(v, Mapping):
                    walk(v, here)
                elif not (key == "bias" and config.trains_bias(adapted)):
                    untrained.append(here)
    walk(adapter, "")
    if problems:
        raise ValueError(
            f"{path}: its config (n_factors={config.n_factors}, block_size={config.block_size},"
            f" block_num={config.block_num}"
            + (f", block_size_overrides={list(config.block_size_overrides)}" if config.block_size_overrides else "")
            + f") does not describe its arrays: {'; '.join(problems[:4])}"
        )
    if untrained:
        raise ValueError(
            f"{path}: the adapter holds {len(untrained)} leaf/leaves its config does not train, e.g."
            f" {untrained[:4]} (config bias={config.bias!r}, modules_to_save={list(config.modules_to_save)});"
            " boft.split(params, config) would drop them, so a resumed run or a re-save would lose them."
            " Use the config the adapter was trained with: bias='boft_only' trains the biases of adapted"
            " layers, bias='all' every bias, modules_to_save (regexes on module paths) whole modules."
            + (" If the tree is the model's whole params (frozen weights included), save the adapter alone:"
               " boft.split(params, config)[1]." if any(p.rsplit("/", 1)[-1] in ("kernel", "embedding") for p in untrained)
               else "")
        )


_SHAPES_KEY = "_adapter_shapes"
_OPT_SHAPES_KEY = "_opt_state_shapes"  # the optimizer state's leaves: another optimizer is named, not "damaged"
_SUMS_KEY = "_checksums"  # sha256 of every adapter and optimizer-state leaf: orbax does not detect damage
# leaf dtypes: restoring into other dtypes (orbax casts) is named as such, not as damaged files
_DTYPES_KEY, _OPT_DTYPES_KEY = "_adapter_dtypes", "_opt_state_dtypes"
# the optimizer state's tree structure with its state classes (adam and adabelief states have the same
# leaves; adamw's differs from adam's only by leafless entries)
_OPT_TREE_KEY = "_opt_state_tree"
_STATE_SUM_KEY = "_state_sha256"  # sha256 of the JSON state itself (without this entry): a damaged value is named
# the optax version that wrote the state: a state class renamed by another optax is said to be possibly that
_OPTAX_KEY = "_optax_version"
_PRIVATE_KEYS = (_SHAPES_KEY, _OPT_SHAPES_KEY, _SUMS_KEY, _DTYPES_KEY, _OPT_DTYPES_KEY, _OPT_TREE_KEY, _STATE_SUM_KEY,
                 _OPTAX_KEY)


def _optax_version() -> str | None:
    try:
        return importlib.metadata.version("optax")
    except importlib.metadata.PackageNotFoundError:
        return None


def _state_sum(state: Mapping[str, Any]) -> str:
    return _json_sha256({k: v for k, v in state.items() if k != _STATE_SUM_KEY})


def _public(state: Mapping[str, Any]) -> dict[str, Any]:
    """A step's JSON state without the entries the checkpointer adds (shapes, checksums)."""
    return {k: v for k, v in state.items() if k not in _PRIVATE_KEYS}


def _shapes(tree) -> dict[str, list[int]]:
    """``{leaf path: shape}`` of a pytree, JSON-ready (the identity of an adapter's structure)."""
    return {jax.tree_util.keystr(p): list(np.shape(x)) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _tree_repr(tree) -> str:
    """The pytree structure with its node classes (e.g. ``ScaleByAdamState``), JSON-ready."""
    return str(jax.tree.structure(tree))


def _dtypes(tree) -> dict[str, str]:
    """``{leaf path: dtype name}`` of a pytree, JSON-ready."""
    return {jax.tree_util.keystr(p): jnp.result_type(x).name for p, x in jax.tree_util.tree_leaves_with_path(tree)}


class _StepError(ValueError):
    """A training checkpoint step that reads back but is not the one expected (raised as is)."""


def _whole(value, what: str, least: int) -> int:
    """``value`` as a Python int: any integer, also a 0-d integer numpy / JAX array (a flax
    ``TrainState.step``); a bool, a float or anything below ``least`` is a ``ValueError``."""
    try:
        if isinstance(value, (bool, np.bool_)):
            raise TypeError
        n = operator.index(value)
    except TypeError:
        n = None
    if n is None or n < least:
        raise ValueError(f"{what} must be an integer >= {least}, got {value!r}")
    return n


class TrainCheckpointer:
    """Periodic, asynchronous training checkpoints: adapter, optimizer state and JSON state.

    Args:
      directory: where step directories are written.
      save_every: save when ``step % save_every == 0`` (and with ``force=True``, unless the step is
        saved already).
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
        save_every, keep = (_whole(v, f"TrainCheckpointer: {name}", 1) for name, v in (("save_every", save_every), ("keep", keep)))
        self.directory = Path(directory).absolute()
        blocker = _file_on_path(self.directory)
        if blocker is not None:
            within = "" if blocker == self.directory else f" (on the path {self.directory})"
            raise ValueError(
                f"TrainCheckpointer: {blocker} is a file, not a directory{within}; give a directory for the step"
                " checkpoints (an existing one, or a path that does not exist yet)"
            )
        check_storable_path(self.directory)
        self.save_every = save_every
        self._mngr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                save_interval_steps=1,
                enable_async_checkpointing=async_save,
                create=True,
                cleanup_tmp_directories=True,  # a save that died mid-write leaves one; --keep must not miss it
            ),
        )

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mngr.all_steps())

    def save(self, step: int, adapter, opt_state, state: Mapping[str, Any], *, force: bool = False) -> bool:
        """Save if ``step`` is due (or ``force``); returns whether a save was started.

        A step that is already saved is not written again, also with ``force`` (returns ``False``):
        a step's checkpoint is never replaced in place.
        """
        step = _whole(step, "TrainCheckpointer.save: step", 0)
        if not force and step % self.save_every:
            return False
        if step in self._mngr.all_steps():
            return False
        private = sorted(k for k in state if k.startswith("_"))
        if private:
            raise ValueError(f"TrainCheckpointer.save: state keys starting with '_' are reserved, got {private}")
        try:  # here, not in the background thread that writes it
            json.dumps(dict(state), allow_nan=True)
        except (TypeError, ValueError) as e:
            raise TypeError(
                f"TrainCheckpointer.save: the state must be JSON data (str, int, float, bool, None, lists, dicts"
                f" with str keys; e.g. int(x) for a numpy or JAX scalar): {e}"
            ) from None
        sums = {"adapter": _leaf_checksums(adapter), "opt_state": _leaf_checksums(opt_state)}
        (adapter_out, _), (opt_out, _) = _without_empty(adapter), _without_empty(opt_state)
        full = {**state, _SHAPES_KEY: _shapes(adapter), _OPT_SHAPES_KEY: _shapes(opt_state), _SUMS_KEY: sums,
                _DTYPES_KEY: _dtypes(adapter), _OPT_DTYPES_KEY: _dtypes(opt_state),
                _OPT_TREE_KEY: _tree_repr(opt_state), _OPTAX_KEY: _optax_version()}
        full[_STATE_SUM_KEY] = _state_sum(full)
        self._mngr.save(
            step,
            args=ocp.args.Composite(
                adapter=ocp.args.StandardSave(adapter_out),
                opt_state=ocp.args.StandardSave(opt_out),
                state=ocp.args.JsonSave(full),
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
        step_dir = self._require(step, ("adapter", "opt_state", "state"))
        _quiet_abandoned_reads()  # before the restore: a failing read can echo while it is still running
        try:
            return self._restore(step, adapter_like, opt_state_like)
        except _StepError:
            raise
        except Exception as e:  # orbax / tensorstore on bad files: ValueError, OSError, KeyError, or a bare Exception (a truncated file)
            raise ValueError(
                f"step {step} in {self.directory}: damaged or incomplete training checkpoint ({_brief(e)})."
                f" Remove {step_dir} to resume from {self._fallback()}"
            ) from None

    def latest_state(self) -> tuple[int, dict[str, Any]] | None:
        """``(step, state)`` of the newest step, its JSON state alone (no arrays are read), or ``None``
        when there is no step: what a resume can compare with its own options before restoring."""
        step = self._mngr.latest_step()
        if step is None:
            return None
        step_dir = self._require(step, ("state",))
        try:
            return step, _public(self._read_state(step))
        except _StepError:  # already says what is wrong and what to remove
            raise
        except Exception as e:
            raise ValueError(
                f"step {step} in {self.directory}: unreadable training state ({_brief(e)})."
                f" Remove {step_dir} to resume from {self._fallback()}"
            ) from None

    def _require(self, step: int, items: tuple[str, ...]) -> Path:
        """The step's directory; :class:`IncompleteCheckpoint` when one of ``items`` is missing."""
        step_dir = self.directory / str(step)
        missing = [item for item in items if not (step_dir / item).exists()]
        if missing:  # orbax commits a step by renaming a complete directory: this one came from elsewhere
            found = sorted(p.name for p in step_dir.iterdir()) if step_dir.is_dir() else []
            raise IncompleteCheckpoint(
                f"{step_dir} is the newest step directory but not a complete training checkpoint (missing"
                f" {missing}, found {found}); remove it to resume from {self._fallback()}"
            )
        return step_dir

    def _read_state(self, step: int) -> dict[str, Any]:
        """The step's JSON state as stored (with the private shape and checksum entries), checked against
        its own checksum (steps written before it existed have none, and no other private entry either)."""
        state = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.JsonRestore()))["state"]
        where = f"step {step} in {self.directory}"
        unknown = sorted(k for k in state if k.startswith("_") and k not in _PRIVATE_KEYS)
        if unknown:
            raise _StepError(f"{where}: its JSON state has unknown entries {unknown}: the file is damaged."
                             f" Remove {self.directory / str(step)} to resume from {self._fallback()}")
        if _STATE_SUM_KEY in state and state[_STATE_SUM_KEY] != _state_sum(state):
            raise _StepError(f"{where}: its JSON state does not match the checksum stored with it: the file is"
                             f" damaged. Remove {self.directory / str(step)} to resume from {self._fallback()}")
        return state

    def _fallback(self) -> str:
        """Where a resume goes once the newest step is removed: "step N" or "the start"."""
        earlier = sorted(self.all_steps())[:-1]
        return f"step {earlier[-1]}" if earlier else "the start"

    def _restore(self, step: int, adapter_like, opt_state_like):
        # The adapter's and optimizer state's shapes are in the JSON state: compare them before orbax
        # restores arrays (a mismatch is another run's checkpoint, not a damaged one).
        stored = self._read_state(step)
        where = f"step {step} in {self.directory}"
        for key, want, what, leaves, advice in (
            (_SHAPES_KEY, _shapes(adapter_like), "another adapter", "adapter", ""),
            (_OPT_SHAPES_KEY, _shapes(opt_state_like), "the state of another optimizer (its files are intact)",
             "optimizer-state", ". Resume with the optimizer (and its options) the checkpoint was written with"),
            (_DTYPES_KEY, _dtypes(adapter_like), "adapter leaves of other dtypes (its files are intact)", "adapter",
             ". Restore into arrays of the stored dtypes (e.g. the same precision), then cast"),
            (_OPT_DTYPES_KEY, _dtypes(opt_state_like), "optimizer-state leaves of other dtypes (its files are intact)",
             "optimizer-state", ". Restore into arrays of the stored dtypes (e.g. the same precision), then cast"),
        ):
            if key in stored and stored[key] != want:
                got = stored[key]
                diff = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
                raise _StepError(
                    f"{where} holds {what}: {len(got)} {leaves} leaves stored, {len(want)} expected, {len(diff)} differ,"
                    " e.g. "
                    + "; ".join(f"{k}: stored {got.get(k, 'absent')}, expected {want.get(k, 'absent')}" for k in diff[:3])
                    + advice
                )
        tree = _tree_repr(opt_state_like)  # same leaves, other state classes (adam / adabelief, adam / adamw)
        if _OPT_TREE_KEY in stored and stored[_OPT_TREE_KEY] != tree:
            written, now = stored.get(_OPTAX_KEY), _optax_version()
            other_optax = (
                f" It was written with optax {written} and this is optax {now}: if the optimizer is the same, its"
                f" state classes may differ between those versions; resume with optax {written}"
                f" (pip install optax=={written})."
                if written is not None and written != now
                else ""
            )
            raise _StepError(f"{where} holds the state of another optimizer (its files are intact): stored"
                             f" {stored[_OPT_TREE_KEY]}, expected {tree}. Resume with the optimizer (and its"
                             f" options) the checkpoint was written with.{other_optax}")
        abstract = lambda t: jax.tree.map(ocp.utils.to_shape_dtype_struct, t)  # noqa: E731
        # zero-size leaves were stored as one-element placeholders (_without_empty); the like trees say where
        one = lambda dtype: jnp.zeros((1,), dtype)  # noqa: E731
        (adapter_ph, adapter_empty), (opt_ph, opt_empty) = _without_empty(adapter_like, one), _without_empty(opt_state_like, one)
        r = self._mngr.restore(
            step,
            args=ocp.args.Composite(
                adapter=ocp.args.StandardRestore(abstract(adapter_ph)),
                opt_state=ocp.args.StandardRestore(abstract(opt_ph)),
                state=ocp.args.JsonRestore(),
            ),
        )
        r = {**r, "adapter": _with_empty(r["adapter"], adapter_empty)}
        opt_state = jax.tree.unflatten(jax.tree.structure(opt_state_like), jax.tree.leaves(r["opt_state"]))
        opt_state = _with_empty(opt_state, opt_empty)
        sums = r["state"].get(_SUMS_KEY)
        if sums is not None:  # steps written before checksums were stored have none
            got = {"adapter": _leaf_checksums(r["adapter"]), "opt_state": _leaf_checksums(opt_state)}
            bad = [f"{part} leaf {i}" for part in ("adapter", "opt_state")
                   for i, (a, b) in enumerate(zip(sums[part], got[part])) if a != b]
            if bad or any(len(sums[part]) != len(got[part]) for part in got):
                raise _StepError(
                    f"step {step} in {self.directory}: {len(bad)} array(s) ({', '.join(bad[:4])}) do not match the"
                    " checksums stored when the step was written: its files are damaged. Remove"
                    f" {self.directory / str(step)} to resume from {self._fallback()}"
                )
        return step, r["adapter"], opt_state, _public(r["state"])

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()
