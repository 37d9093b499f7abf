"""Many BOFT adapters in one batch: each example uses its own adapter (``jax.vmap`` over examples).

Serving many finetuned variants of one base model usually means one batch per adapter, or one
set of merged weights per adapter.  Here a batch mixes adapters freely::

  stacked = boft.stack([adapter_a, adapter_b, adapter_c])     # leading adapter axis
  ids = jnp.array([0, 2, boft.BASE, 1, 0])                   # one id per example
  logits = boft.apply_multi(model, frozen, stacked, ids, pixel_values)

``model`` is the wrapped module (``boft.wrap(base, config)``), ``frozen`` the base params (base
layout, from :func:`boft_jax.split`), ``stacked`` from :func:`stack`.  Example ``j`` gets exactly
what ``model.apply({"params": boft.combine(frozen, adapter_{ids[j]})}, x[j:j+1])`` gives.

How it works.  The per-example adapter is gathered by id (a few KB to MB: the adapter, never the
frozen weights) and ``jax.vmap`` maps one example at a time through the wrapped model, with the
batch axis of 1 restored inside.  The frozen params are closed over (``in_axes=None``), so there is
one copy of them, and every Dense still runs one matmul over all examples' tokens.  Exception:
modules trained in full (``modules_to_save``, e.g. a new classifier head or T5's ``lm_head``) are
part of the adapter, so their weights are gathered per example too (``batch`` copies of each, and
one matmul per example there); keep such modules small or the batches of many adapters modest.  The adapter is
applied on the **input side** (``x -> x M``, then ``* s``): the wrapped model is re-wrapped with
``mode="input"`` whatever its config says.  The weight side would build one rotated copy of every
adapted kernel per example; the input side costs ``2 S d_in`` FLOPs per token, ``S = b 2^(m-1)``
(``2 m b d_in`` for ``m <= 2``; about ``S / d_out`` of the layer's own matmul, 2% for ViT-B with
``m = 2, b = 8``) and no kernel copies.

Ids are data: any mix of ids, including :data:`BASE`, runs the same compiled program.
:func:`apply_multi` and :func:`generate_multi` jit themselves (keyed on the module, ``method``
and the non-array keyword arguments) and can also be called inside your own ``jax.jit``.  A
module or keyword argument that cannot be hashed (e.g. ``nn.Sequential([...])``, whose layers are a
list; ``nn.Sequential((...))`` with a tuple hashes) cannot key a compilation cache:
:func:`apply_multi` then runs op by op and warns; call it inside your own ``jax.jit`` (with the
model closed over) to compile it.

Id rules:
  * ``0 <= id < K`` (``K`` adapters in ``stacked``): that adapter.
  * :data:`BASE` (``-1``): the base model.  Implemented by appending an identity adapter (zero
    skew, unit scale; non-BOFT adapter leaves such as trained biases or ``modules_to_save``
    modules take their values from ``frozen``) as entry ``K`` of the stack.
  * anything else: with concrete ids (an eager call) a ``ValueError`` naming the positions and
    values.  Under ``jax.jit`` (traced ids) no exception is possible; such an example gets a
    NaN-filled adapter (``jnp.take(..., mode="fill")``, so it never silently uses another
    adapter), and its outputs are marked (:func:`apply_multi`: floating-point leaves NaN, signed
    integer leaves ``-1``, unsigned ones their dtype's maximum, boolean ones ``False``, which
    cannot be told from a real ``False``: check such ids yourself) or its tokens set to ``-1``
    (:func:`generate_multi`).  Other examples are unaffected.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import unfreeze

from boft_jax.config import UnusedNeumannTerms
from boft_jax.linen import BOFTModule, combine, wrap

__all__ = ["BASE", "stack", "unstack", "num_adapters", "identity_adapter", "apply_multi", "generate_multi"]

BASE: int = -1
"""The reserved adapter id meaning "the base model, no adapter"."""

#: Token id written into every position of a :func:`generate_multi` row whose adapter id is out of
#: range (only possible under ``jax.jit``; eager calls raise).
INVALID_TOKEN: int = -1


# ---------------------------------------------------------------------------------------------
# Stacking
# ---------------------------------------------------------------------------------------------
def _key_str(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _path_str(path) -> str:
    return "/".join(_key_str(k) for k in path) or "<root>"


def _leaves_by_path(tree) -> dict[str, Any]:
    return {_path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def stack(adapters: Sequence[Mapping]) -> dict:
    """Stack adapters (from :func:`boft_jax.split`) along a new leading adapter axis.

    The arrays carry no config: adapters trained with another Cayley variant (``cayley``,
    ``neumann_terms``) or dropout have the same shapes and are stacked alike, then served with
    the serving model's config; stack only adapters trained with that config's rotation.

    Args:
      adapters: ``K >= 1`` adapter trees of one structure (same layers, same block structure, same
        trainable biases / saved modules).

    Returns:
      The adapter tree with every leaf of shape ``(K, *leaf_shape)``; adapter ``i`` is entry ``i``
      (its id for :func:`apply_multi`).

    Raises:
      ValueError: naming the first adapter index that differs from adapter 0 and the leaf path
        (``'encoder/layer_0/attention/query/kernel/skew'``) that is missing, extra, or of another
        shape (both shapes given) or dtype.

    Example (:func:`num_adapters` reads ``K`` back, :func:`unstack` undoes the stacking):
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> import boft_jax as boft
      >>> cfg = boft.BOFTConfig(block_size=4, n_factors=2, targets="layers_0")
      >>> model = boft.wrap(nn.Sequential((nn.Dense(8),)), cfg)
      >>> frozen, adapter = boft.split(model.init(jax.random.key(0), jnp.ones((1, 16)))["params"], cfg)
      >>> adapters = [jax.tree.map(lambda a: a + 0.1 * i, adapter) for i in (1, 2, 3)]  # as if trained
      >>> stacked = stack(adapters)
      >>> jax.tree.map(jnp.shape, stacked)
      {'layers_0': {'kernel': {'scale': (3, 8), 'skew': (3, 2, 4, 6)}}}
      >>> num_adapters(stacked)
      3
      >>> back = unstack(stacked)
      >>> all(bool(jnp.array_equal(b, a)) for i in range(3)
      ...     for b, a in zip(jax.tree.leaves(back[i]), jax.tree.leaves(adapters[i])))
      True
    """
    if isinstance(adapters, Mapping) or not isinstance(adapters, Sequence):
        raise TypeError(f"boft.stack expects a sequence of adapter trees, got {type(adapters).__name__}")
    adapters = [unfreeze(a) for a in adapters]  # FrozenDicts too; the result is plain dicts
    if not adapters:
        raise ValueError("boft.stack needs at least one adapter")
    ref = _leaves_by_path(adapters[0])
    if not ref:
        raise ValueError("adapter 0 has no leaves (an empty adapter tree)")
    ref_def = jax.tree.structure(adapters[0])
    for i, a in enumerate(adapters[1:], start=1):
        cur = _leaves_by_path(a)
        missing = [p for p in ref if p not in cur]
        extra = [p for p in cur if p not in ref]
        if missing:
            raise ValueError(
                f"adapter {i} differs from adapter 0: leaf '{missing[0]}' (shape {tuple(jnp.shape(ref[missing[0]]))})"
                f" is missing from adapter {i}" + (f" ({len(missing)} leaves missing in all)" if len(missing) > 1 else "")
            )
        if extra:
            raise ValueError(
                f"adapter {i} differs from adapter 0: adapter {i} has leaf '{extra[0]}' (shape"
                f" {tuple(jnp.shape(cur[extra[0]]))}) that adapter 0 does not have"
                + (f" ({len(extra)} extra leaves in all)" if len(extra) > 1 else "")
            )
        for p, v in ref.items():
            w = cur[p]
            if jnp.shape(v) != jnp.shape(w):
                raise ValueError(
                    f"adapter {i}, leaf '{p}': shape {tuple(jnp.shape(w))} but adapter 0 has {tuple(jnp.shape(v))}"
                    " (adapters made with different block structures or for different base models)"
                )
            if jnp.result_type(v) != jnp.result_type(w):
                raise ValueError(
                    f"adapter {i}, leaf '{p}': dtype {jnp.result_type(w)} but adapter 0 has {jnp.result_type(v)}"
                )
        if jax.tree.structure(a) != ref_def:  # same paths, different containers (e.g. tuple vs list)
            raise ValueError(f"adapter {i} differs from adapter 0 in its tree structure: {jax.tree.structure(a)} vs {ref_def}")
    return jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *adapters)


def num_adapters(stacked: Mapping) -> int:
    """``K``, the length of the leading adapter axis of a :func:`stack` result (checked consistent)."""
    sizes = {p: (jnp.shape(v)[0] if jnp.ndim(v) else None) for p, v in _leaves_by_path(stacked).items()}
    if not sizes:
        raise ValueError("the stacked adapters have no leaves")
    distinct = set(sizes.values())
    if len(distinct) != 1 or None in distinct:
        detail = ", ".join(f"'{p}': {s}" for p, s in list(sizes.items())[:6])
        raise ValueError(f"stacked adapter leaves disagree on the adapter axis (leading sizes {detail}); build it with boft.stack")
    return int(distinct.pop())


def unstack(stacked: Mapping) -> list[dict]:
    """Inverse of :func:`stack`: the list of ``K`` adapter trees."""
    return [jax.tree.map(lambda v, i=i: v[i], stacked) for i in range(num_adapters(stacked))]


def identity_adapter(frozen: Mapping, adapter: Mapping) -> dict:
    """The adapter with ``adapter``'s structure that leaves the base model unchanged.

    BOFT leaves (``{"skew", "scale"}`` at an adapted layer's ``"kernel"``) become zero skew and unit
    scale (``M = I``, ``s = 1``); every other leaf (trainable biases, ``modules_to_save`` modules)
    takes its value from ``frozen`` at the same path (so ``combine(frozen, identity_adapter(...))``
    is the base model).  ``adapter`` is a single (unstacked) adapter; only its structure is used.

    Example (with ``bias="all"`` the adapter also holds the Dense bias, a non-BOFT leaf):
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> import boft_jax as boft
      >>> cfg = boft.BOFTConfig(block_size=4, targets="layers_0", bias="all")
      >>> base = nn.Sequential((nn.Dense(8),))
      >>> model, x = boft.wrap(base, cfg), jax.random.normal(jax.random.key(1), (2, 16))
      >>> frozen, adapter = boft.split(model.init(jax.random.key(0), x)["params"], cfg)
      >>> trained = jax.tree.map(lambda a: a + 0.1, adapter)   # stands in for a trained adapter
      >>> ident = identity_adapter(frozen, trained)
      >>> jax.tree.map(jnp.shape, ident)
      {'layers_0': {'bias': (8,), 'kernel': {'scale': (8,), 'skew': (1, 4, 6)}}}
      >>> bool(jnp.array_equal(ident["layers_0"]["bias"], frozen["layers_0"]["bias"]))  # not trained's
      True
      >>> y = model.apply({"params": boft.combine(frozen, ident)}, x)
      >>> bool(jnp.allclose(y, base.apply({"params": frozen}, x), atol=1e-6))
      True
    """
    return _identity_like(frozen, adapter, lead=0)


def _identity_like(frozen: Mapping, adapter: Mapping, lead: int) -> dict:
    def go(f, a, path):
        out = {}
        for k, v in a.items():
            here = path + (k,)
            if not isinstance(f, Mapping) or k not in f:
                raise ValueError(f"adapter entry '{'/'.join(here)}' has no counterpart in the base params")
            if isinstance(v, Mapping) and set(v) == {"skew", "scale"} and not isinstance(f[k], Mapping):
                skew, scale = v["skew"], v["scale"]
                out[k] = {
                    "skew": jnp.zeros(jnp.shape(skew)[lead:], jnp.result_type(skew)),
                    "scale": jnp.ones(jnp.shape(scale)[lead:], jnp.result_type(scale)),
                }
            elif isinstance(v, Mapping):
                out[k] = go(f[k], v, here)
            else:
                want = jnp.shape(v)[lead:]
                if jnp.shape(f[k]) != want:
                    raise ValueError(
                        f"adapter leaf '{'/'.join(here)}' has shape {want} but the base has {jnp.shape(f[k])}"
                    )
                out[k] = jnp.asarray(f[k]).astype(jnp.result_type(v))
        return out

    return go(frozen, adapter, ())


# ---------------------------------------------------------------------------------------------
# Ids
# ---------------------------------------------------------------------------------------------
def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_ids(adapter_ids, k: int, batch: int | None) -> jax.Array:
    ids = adapter_ids
    if _is_concrete(ids):
        arr = np.asarray(ids)
        if arr.ndim != 1:
            raise ValueError(f"adapter_ids must be a 1-D int array (batch,), got shape {arr.shape}")
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"adapter_ids must be integers, got dtype {arr.dtype}")
        bad = np.nonzero((arr != BASE) & ((arr < 0) | (arr >= k)))[0]
        if bad.size:
            shown = ", ".join(f"adapter_ids[{j}] = {arr[j]}" for j in bad[:8])
            raise ValueError(
                f"adapter id(s) out of range: {shown}{' ...' if bad.size > 8 else ''}; valid ids are 0..{k - 1}"
                f" ({k} stacked adapters) and boft.BASE = {BASE} for the base model"
            )
        ids = jnp.asarray(arr.astype(np.int32))
    else:
        if jnp.ndim(ids) != 1:
            raise ValueError(f"adapter_ids must be a 1-D int array (batch,), got shape {jnp.shape(ids)}")
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"adapter_ids must be integers, got dtype {ids.dtype}")
    if batch is not None and jnp.shape(ids)[0] != batch:
        raise ValueError(f"adapter_ids has {jnp.shape(ids)[0]} entries but the inputs have batch size {batch}")
    return ids


def _gather(frozen: Mapping, stacked: Mapping, ids: jax.Array) -> tuple[dict, jax.Array]:
    """Per-example adapters ``(batch, ...)`` and the validity mask (traceable)."""
    k = num_adapters(stacked)
    ident = _identity_like(frozen, stacked, lead=1)
    ext = jax.tree.map(lambda s, e: jnp.concatenate([s, e[None]], axis=0), stacked, ident)  # entry k = BASE
    # validity on the ids' own dtype: a cast first would wrap 2**32 - 1 (uint32) to BASE, or
    # 2**32 (int64) to adapter 0
    base = ids == BASE if jnp.issubdtype(ids.dtype, jnp.signedinteger) else jnp.zeros(ids.shape, bool)
    valid = base | ((ids >= 0) & (ids < k))
    idx = jnp.where(base, k, jnp.where(valid, ids, k + 1).astype(jnp.int32))  # k + 1: out of bounds -> filled
    per = jax.tree.map(lambda s: jnp.take(s, idx, axis=0, mode="fill"), ext)  # NaN for inexact leaves
    return per, valid


def _input_mode(model) -> BOFTModule:
    if not isinstance(model, BOFTModule):
        raise TypeError(
            f"expected the wrapped model (boft.wrap(base, config)), got {type(model).__name__}; apply_multi"
            " needs it to run each example with its own adapter"
        )
    if model.config.mode == "input":
        return model
    # Per-example weight-side rotation would materialize one rotated kernel per example.
    with warnings.catch_warnings():  # (a config's unused neumann_terms were warned about when it was made)
        warnings.simplefilter("ignore", UnusedNeumannTerms)
        return wrap(model.model, dataclasses.replace(model.config, mode="input"))


def _batch_size(tree) -> int | None:
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return None
    scalars = [type(x).__name__ for x in leaves if not jnp.ndim(x)]
    if scalars:
        raise ValueError(
            f"every positional input of apply_multi is batched along axis 0, but got scalar(s) {scalars}; pass"
            " per-call flags and other non-batched values as keyword arguments (e.g. train=False)"
        )
    sizes = {jnp.shape(x)[0] for x in leaves}
    if len(sizes) != 1:
        raise ValueError(
            f"every positional input of apply_multi is batched along axis 0, but their leading sizes differ:"
            f" {[jnp.shape(x) for x in leaves]}"
        )
    return int(sizes.pop())


def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray))


def _split_kwargs(kwargs: dict) -> tuple[tuple, dict]:
    static, dynamic = [], {}
    for name, v in kwargs.items():
        if isinstance(v, np.generic):  # a NumPy scalar (np.bool_(True), np.int32(3)): static, as a Python value
            static.append((name, v.item()))
        elif _is_array(v) and jnp.ndim(v) == 0 and v.dtype == bool and not _tracing(v):
            static.append((name, bool(v)))  # a concrete 0-d flag (np.array(True)): as a Python bool
        elif any(_is_array(leaf) for leaf in jax.tree.leaves(v)):
            dynamic[name] = v
        else:
            static.append((name, v))
    return tuple(sorted(static, key=lambda kv: kv[0])), dynamic


def _tracing(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def _hashable(*xs) -> bool:
    try:
        hash(xs)
    except TypeError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# apply_multi
# ---------------------------------------------------------------------------------------------
def apply_multi(
    model: BOFTModule,
    frozen: Mapping,
    stacked: Mapping,
    adapter_ids,
    *inputs,
    method: str | Callable | None = None,
    **kwargs,
):
    """``model.apply`` where example ``j`` uses adapter ``adapter_ids[j]`` of ``stacked``.

    Args:
      model: the wrapped module, ``boft.wrap(base, config)`` (run in ``mode="input"``; see the
        module docstring).  A layer with its own ``dot_general`` / ``dot_general_cls`` runs the
        merged kernel through that dot in every mode (:class:`boft_jax.BOFTConfig`'s ``mode``), so
        here it builds one rotated ``d_in x d_out`` kernel per example.
      frozen: the base params (base layout), shared by every example; never copied per example.
        :data:`BASE` rows run exactly these, so pass the original base params there (e.g. from
        ``from_pretrained``): the ``frozen`` half of :func:`boft.split` of trained params holds the
        trained biases and ``modules_to_save`` modules, and BASE rows would run with those.
      stacked: adapters from :func:`stack` (leading adapter axis ``K``).
      adapter_ids: int array ``(batch,)``; ``0..K-1`` or :data:`BASE` (``-1``) for the base model.
      *inputs: the positional inputs of ``method``; every array leaf is batched along axis 0 (size
        ``batch``; ``None`` is allowed).  Each example is run with a batch axis of size 1.
      method: as for ``Module.apply`` (e.g. ``"encode"``); default ``__call__``.
      **kwargs: keyword arguments of ``method``, the same for every example (e.g.
        ``deterministic=True``).  Non-array values are static (part of the compilation key); array
        values are passed whole to every example (not split per example: a per-example mask
        goes in ``*inputs``).

    Only the ``params`` collection is served: models with other variable collections (e.g.
    ``BatchNorm``'s ``batch_stats``) are not supported.

    Returns:
      ``method``'s output with the batch axis first, example ``j`` equal to
      ``model.apply({"params": combine(frozen, adapter_{ids[j]})}, x[j:j+1], ...)`` (to float
      rounding).  Every output leaf must carry the batch as its leading axis.

    Raises:
      ValueError: out-of-range ids when ``adapter_ids`` is concrete (see the module docstring for
        the traced case: NaN / -1 outputs for those examples), mismatched batch sizes.

    Example (three adapters and the base model in one batch of four):
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> import boft_jax as boft
      >>> cfg = boft.BOFTConfig(block_size=4, n_factors=2, targets="layers_0")
      >>> base = nn.Sequential((nn.Dense(8),))
      >>> model, x = boft.wrap(base, cfg), jax.random.normal(jax.random.key(1), (4, 16))
      >>> frozen, adapter = boft.split(model.init(jax.random.key(0), x)["params"], cfg)
      >>> adapters = [jax.tree.map(lambda a: a + 0.1 * i, adapter) for i in (1, 2, 3)]  # as if trained
      >>> ids = jnp.array([2, 0, boft.BASE, 1])
      >>> y = apply_multi(model, frozen, stack(adapters), ids, x)
      >>> y.shape
      (4, 8)

      Example ``j`` is what the single-adapter model gives for ``x[j]`` alone; ``BASE`` is the
      bare base model:

      >>> alone = lambda i, j: model.apply({"params": boft.combine(frozen, adapters[i])}, x[j:j + 1])[0]
      >>> all(bool(jnp.allclose(y[j], alone(i, j), atol=1e-5)) for j, i in [(0, 2), (1, 0), (3, 1)])
      True
      >>> bool(jnp.allclose(y[2], base.apply({"params": frozen}, x[2:3])[0], atol=1e-5))
      True
      >>> bool(jnp.allclose(y[0], y[1]))   # different adapters, different outputs
      False
    """
    frozen, stacked = unfreeze(frozen), unfreeze(stacked)
    k = num_adapters(stacked)
    ids = _check_ids(adapter_ids, k, _batch_size(inputs))
    static_kw, dynamic_kw = _split_kwargs(kwargs)
    if _hashable(model, method, static_kw):
        return _apply_multi_jit(frozen, stacked, ids, inputs, dynamic_kw, model=model, method=method, static_kw=static_kw)
    if not _tracing(ids):
        warnings.warn(
            f"apply_multi: the model ({type(model.model).__name__}), method or a keyword argument cannot be hashed,"
            " so no compiled program can be cached for it and the call runs op by op (much slower); call"
            " apply_multi inside your own jax.jit, with the model closed over"
            + (" (or give nn.Sequential its layers as a tuple, which hashes)"
               if isinstance(model.model, nn.Sequential) and isinstance(model.model.layers, list) else ""),
            stacklevel=2,
        )
    return _apply_multi_impl(frozen, stacked, ids, inputs, dynamic_kw, model=model, method=method, static_kw=static_kw)


def _apply_multi_impl(frozen, stacked, ids, inputs, dynamic_kw, *, model, method, static_kw):
    model = _input_mode(model)
    kwargs = dict(static_kw, **dynamic_kw)
    per, valid = _gather(frozen, stacked, ids)

    def one(adapter, xs):
        params = combine(frozen, adapter)
        xs = jax.tree.map(lambda x: jnp.expand_dims(x, 0), xs)
        out = model.apply({"params": params}, *xs, method=method, **kwargs)

        def unbatch(path, y):
            if jnp.ndim(y) == 0 or jnp.shape(y)[0] != 1:
                raise ValueError(
                    f"apply_multi: output leaf '{_path_str(path)}' has shape {jnp.shape(y)} for one example;"
                    " every output must have the batch as its leading axis (for T5 generation with a KV cache"
                    " use boft.generate_multi)"
                    + (f"; the array keyword argument(s) {sorted(dynamic_kw)} are passed whole to every example:"
                       " per-example arrays (e.g. a (batch, ...) mask) go in *inputs" if dynamic_kw else "")
                )
            return y[0]

        return jax.tree_util.tree_map_with_path(unbatch, out)

    out = jax.vmap(one)(per, inputs)

    def poison(y):
        if jnp.issubdtype(y.dtype, jnp.inexact):
            mark = jnp.nan
        elif jnp.issubdtype(y.dtype, jnp.signedinteger):
            mark = -1
        elif jnp.issubdtype(y.dtype, jnp.unsignedinteger):
            mark = jnp.iinfo(y.dtype).max
        else:  # bool
            mark = False
        return jnp.where(valid.reshape((-1,) + (1,) * (y.ndim - 1)), y, jnp.array(mark, y.dtype))

    return jax.tree.map(poison, out)


_apply_multi_jit = jax.jit(_apply_multi_impl, static_argnames=("model", "method", "static_kw"))


# ---------------------------------------------------------------------------------------------
# T5 generation, one adapter per sequence
# ---------------------------------------------------------------------------------------------
def generate_multi(
    model: BOFTModule,
    frozen: Mapping,
    stacked: Mapping,
    adapter_ids,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | jax.Array | None = None,
    pad_token_id: int | None = None,
    decoder_start_token_id: int | None = None,
) -> jax.Array:
    """Greedy decoding of a wrapped encoder-decoder (``boft_jax.models.t5.T5``), sequence ``j``
    with adapter ``adapter_ids[j]`` (or the base model for :data:`BASE`).

    Same contract as ``T5.generate``: returns ``(batch, 1 + max_new_tokens)`` int32 tokens starting
    with the decoder start token, padding after a row's EOS; the loop stops when every row is done.
    Row ``j`` equals greedy decoding of sequence ``j`` alone with ``combine(frozen, adapter)``.

    Built from the model's ``encode`` / ``init_cache`` / ``decode(cache=...)`` methods: the encoder
    and cache prefill are vmapped over sequences; then one ``while_loop`` whose body vmaps a
    one-token decoder step over sequences, each with its own adapter and its own KV cache (cache
    leaves carry the sequence axis first; the step index is shared).  Frozen weights are closed
    over, adapters applied on the input side (see the module docstring).

    Rows whose id is out of range (possible only under ``jax.jit``; eager calls raise) are all
    :data:`INVALID_TOKEN` (``-1``) and do not keep the loop running.

    Example (a tiny random T5; row ``j`` equals ``t5.generate`` of sequence ``j`` alone):
      >>> import functools, jax, jax.numpy as jnp, numpy as np
      >>> import boft_jax as boft
      >>> from boft_jax.models import t5
      >>> base = t5.T5(t5.T5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2))
      >>> cfg = boft.BOFTConfig(block_size=4, targets=t5.TARGET_PRESETS["attention_qv"])
      >>> model = boft.wrap(base, cfg)
      >>> ids = jnp.array([[5, 6, 7, 8, 1], [9, 10, 1, 0, 0], [3, 4, 11, 1, 0]])  # 1: EOS, 0: padding
      >>> mask = (ids != 0).astype(jnp.int32)
      >>> rng = np.random.default_rng(0)               # random weights stand in for t5.from_pretrained's
      >>> frozen = jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32),
      ...                       jax.eval_shape(base.init, jax.random.key(0), ids, mask, ids)["params"])
      >>> adapter = boft.init_adapter(model, frozen, ids, mask, ids)
      >>> adapters = [jax.tree.map(lambda a: a + 0.2 * i, adapter) for i in (1, 2)]  # as if trained
      >>> out = generate_multi(model, frozen, stack(adapters), jnp.array([1, boft.BASE, 0]), ids, mask,
      ...                      max_new_tokens=4)
      >>> out.shape, out.dtype
      ((3, 5), dtype('int32'))

      Each row is the single-adapter generation of that sequence alone; the ``BASE`` row is the
      base model's (the :func:`identity_adapter`'s):

      >>> one = jax.jit(functools.partial(t5.generate, model), static_argnames="max_new_tokens")
      >>> alone = lambda a, j: one(boft.combine(frozen, a), ids[j:j + 1], mask[j:j + 1], max_new_tokens=4)[0]
      >>> bool((out[0] == alone(adapters[1], 0)).all() and (out[2] == alone(adapters[0], 2)).all())
      True
      >>> bool((out[1] == alone(identity_adapter(frozen, adapters[0]), 1)).all())
      True
    """
    if not isinstance(model, BOFTModule):
        raise TypeError(
            "generate_multi expects the wrapped model of an encoder-decoder"
            f" (boft.wrap(boft_jax.models.t5.T5(...), config)), got {type(model).__name__}"
        )
    base = model.model
    cfg = getattr(base, "config", None)
    if not all(hasattr(base, m) for m in ("encode", "init_cache", "decode")) or cfg is None:
        raise TypeError(
            "generate_multi needs a wrapped encoder-decoder with encode / init_cache / decode(cache=...)"
            f" methods (boft.wrap(boft_jax.models.t5.T5(...), config)), got {type(base).__name__}"
        )
    from boft_jax.models.t5 import check_max_new_tokens, generation_ids  # lazily: `import boft_jax` does not load the model zoo

    check_max_new_tokens(max_new_tokens)
    eos_ids, pad, start = generation_ids(cfg, eos_token_id, pad_token_id, decoder_start_token_id)
    pad, start = int(pad), int(start)  # static arguments of the compiled loop
    if jnp.ndim(input_ids) != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {jnp.shape(input_ids)}")
    if attention_mask is not None and jnp.shape(attention_mask) != jnp.shape(input_ids):
        raise ValueError(f"attention_mask {jnp.shape(attention_mask)} does not match input_ids {jnp.shape(input_ids)}")
    frozen, stacked = unfreeze(frozen), unfreeze(stacked)
    k = num_adapters(stacked)
    ids = _check_ids(adapter_ids, k, jnp.shape(input_ids)[0])
    return _generate_multi_jit(
        frozen, stacked, ids, input_ids, attention_mask, eos_ids,
        model=model, max_new_tokens=int(max_new_tokens), pad=pad, start=start,
    )


def _generate_multi_impl(frozen, stacked, ids, input_ids, attention_mask, eos_ids, *, model, max_new_tokens, pad, start):
    model = _input_mode(model)
    per, valid = _gather(frozen, stacked, ids)
    batch = input_ids.shape[0]

    def prefill(adapter, ids_j, mask_j):
        variables = {"params": combine(frozen, adapter)}
        ids1 = ids_j[None]
        mask1 = None if mask_j is None else mask_j[None]
        enc = model.apply(variables, ids1, mask1, method="encode")
        cache = dict(model.apply(variables, enc, mask1, max(max_new_tokens, 1), method="init_cache"))
        cache.pop("index")  # the step index is shared by every sequence: kept out of the vmap
        return cache

    cache = jax.vmap(prefill)(per, input_ids, attention_mask)

    def decode_one(adapter, token, cache, index):
        variables = {"params": combine(frozen, adapter)}
        logits, new = model.apply(variables, token[None, None], cache=dict(cache, index=index), method="decode")
        new = dict(new)
        new.pop("index")
        return logits[0, -1], new

    def cond(state):
        i, _, _, done = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def step(state):
        i, tokens, cache, done = state
        current = jax.lax.dynamic_index_in_dim(tokens, i, axis=1, keepdims=False)
        logits, cache = jax.vmap(decode_one, in_axes=(0, 0, 0, None))(per, current, cache, i)
        nxt = jnp.argmax(logits.astype(jnp.float32), axis=-1).astype(jnp.int32)
        nxt = jnp.where(done, pad, nxt)
        tokens = jax.lax.dynamic_update_slice(tokens, nxt[:, None], (0, i + 1))
        done = done | jnp.any(nxt[:, None] == eos_ids[None, :], axis=-1)
        return i + 1, tokens, cache, done

    tokens = jnp.full((batch, max_new_tokens + 1), pad, jnp.int32).at[:, 0].set(start)
    state = (jnp.array(0, jnp.int32), tokens, cache, ~valid)  # invalid rows never hold the loop
    tokens = jax.lax.while_loop(cond, step, state)[1]
    return jnp.where(valid[:, None], tokens, INVALID_TOKEN)


_generate_multi_jit = jax.jit(_generate_multi_impl, static_argnames=("model", "max_new_tokens", "pad", "start"))
