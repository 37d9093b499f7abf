"""The Flax linen transformation: wrap any model, intercept its Dense kernels, train only BOFT.

``wrap(model, config)`` returns a linen Module with ``model``'s call signature (and every other
public method, e.g. ``method="encode"``).  Inside its ``__call__`` it enters
``flax.linen.intercept_methods`` and replaces the computation of each targeted ``nn.Dense`` /
``nn.DenseGeneral`` by ``y = ((x M) K) * s + bias`` (or, equivalently, ``x ((M K) * s) + bias``).

Parameters.  An adapted layer's ``"kernel"`` entry holds a :class:`BOFTKernel` pytree node with
three leaves: the frozen ``kernel`` (unchanged layout), the packed skew blocks ``skew`` of shape
``(m, k, b(b-1)/2)`` and the output scale ``scale`` of shape ``(d_out,)``.  Because they live in
the intercepted module's own scope, ``nn.scan``-ed models get stacked adapter params (layer axis
first) for free.  The node also makes mistakes loud: applying such a params tree to the bare model
raises a ``TypeError`` that says what to do, instead of silently ignoring the adapter.

Use :func:`split` to get ``(frozen, adapter)`` (``frozen`` in the base model's own layout) and
:func:`combine` to put them back; :func:`merge` folds the adapter into plain kernels.

Optax recipe (gradients and optimizer state only for the adapter)::

  config = boft.BOFTConfig(block_size=8, n_factors=2, targets="query|value")
  model = boft.wrap(base_model, config)
  params = model.init(jax.random.key(0), x)["params"]      # or boft.combine(pretrained, adapter)
  frozen, adapter = boft.split(params, config)
  opt = optax.adamw(1e-3)
  opt_state = opt.init(adapter)                            # state for the adapter only

  @jax.jit
  def step(adapter, opt_state, frozen, x, y):
      def loss_fn(adapter):
          logits = model.apply({"params": boft.combine(frozen, adapter)}, x)
          return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      loss, grads = jax.value_and_grad(loss_fn)(adapter)   # no gradient for frozen weights
      updates, opt_state = opt.update(grads, opt_state, adapter)
      return optax.apply_updates(adapter, updates), opt_state, loss
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import re
import types
import warnings
from typing import Any, Callable, Mapping, Sequence

import flax.core.lift as flax_lift
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from boft_jax.butterfly import rotate, rotate_kernel
from boft_jax.config import BOFTConfig, _path_matches, layer_label, path_repr, paths_label
from boft_jax import _ops
from boft_jax.orthogonal import block_size_from_num_params, cayley

__all__ = [
    "BOFTKernel", "BOFTModule", "wrap", "split", "combine", "merge", "unmerge", "count_params", "layer_paths", "init_adapter"
]

_MISUSE = (
    "this params tree holds BOFT adapter params (a BOFTKernel at an adapted layer's 'kernel') where"
    " the model runs a plain Dense. With the bare model: apply it with the wrapped model"
    " (boft.wrap(model, config)), or fold the adapter in first with boft.merge(params, config), or drop"
    " it with boft.split(params)[0]. With a wrapped model: a layer holds adapter params that the"
    " config's targets / exclude do not select; use the config the params were made with"
    " (boft.layer_paths(params) lists the layers that hold adapters). Or the model's own code reads an"
    " adapted layer's kernel directly (a tied weight, e.g. self.layer.variables['params']['kernel']"
    " used as a matrix): the wrapper adapts the layer's call only, so exclude that layer"
    " (BOFTConfig.exclude) or tie the weight another way."
)


# ---------------------------------------------------------------------------------------------
# The adapted-kernel pytree node
# ---------------------------------------------------------------------------------------------
@jax.tree_util.register_dataclass
@dataclasses.dataclass
class BOFTKernel:
    """An adapted layer's kernel together with its BOFT parameters (a pytree with three leaves).

    Attributes:
      kernel: the frozen base kernel, in the base layer's layout (``(d_in, d_out)`` for Dense;
        contracted axes first, then feature axes, for DenseGeneral).
      skew: ``(m, k, b(b-1)/2)`` packed skew-symmetric parameters (float32; float64 in a float64 model).
      scale: ``(d_out,)`` output scale ``s`` (float32; float64 in a float64 model).
    Any of them may carry extra leading axes (e.g. the layer axis of ``nn.scan``).
    """

    kernel: Any
    skew: Any
    scale: Any

    # Reached when a bare Flax layer, or model code that reads the kernel itself (a tied weight),
    # treats this node as the kernel array.
    @property
    def shape(self):
        raise TypeError(_MISUSE)

    @property
    def dtype(self):
        raise TypeError(_MISUSE)

    @property
    def T(self):
        raise TypeError(_MISUSE)

    def __jax_array__(self):
        raise TypeError(_MISUSE)

    def __getitem__(self, index):
        raise TypeError(_MISUSE)

    def __matmul__(self, other):
        raise TypeError(_MISUSE)

    def __rmatmul__(self, other):
        raise TypeError(_MISUSE)


def _is_node(x) -> bool:
    return isinstance(x, BOFTKernel)


# ---------------------------------------------------------------------------------------------
# Layer geometry
# ---------------------------------------------------------------------------------------------
def _canon(v) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,)


@dataclasses.dataclass(frozen=True)
class _Geometry:
    """How a Dense/DenseGeneral call maps to ``(..., d_in) @ (d_in, d_out)``."""

    axis: tuple[int, ...]  # contracted input axes (normalized, ascending)
    features: tuple[int, ...]
    d_in: int
    d_out: int

    def kernel_shape(self, inputs: jax.Array) -> tuple[int, ...]:
        """The layer's kernel shape for ``inputs``: the contracted input axes, then the features."""
        return tuple(inputs.shape[a] for a in self.axis) + self.features


def _geometry(module: nn.Module, inputs: jax.Array, path: str) -> _Geometry:
    if isinstance(module, nn.Dense):
        return _Geometry((inputs.ndim - 1,), (module.features,), inputs.shape[-1], module.features)
    if _canon(module.batch_dims):
        raise NotImplementedError(
            f"{layer_label(path)}: DenseGeneral with batch_dims={module.batch_dims} is not supported by BOFT;"
            " exclude it with BOFTConfig.exclude"
        )
    axis = tuple(sorted(a % inputs.ndim for a in _canon(module.axis)))  # as flax orders the kernel's axes
    features = _canon(module.features)
    d_in = int(np.prod([inputs.shape[a] for a in axis]))
    return _Geometry(axis, features, d_in, int(np.prod(features)))


def _reshape_maybe_boxed(value: Any, shape: tuple[int, ...]) -> Any:
    """``value`` reshaped; an initializer's boxed result (e.g. ``nn.with_partitioning``) stays boxed,
    as in flax's own DenseGeneral."""
    if isinstance(value, nn.meta.AxisMetadata):
        return nn.meta.replace_boxed(value, jnp.reshape(value.unbox(), shape))
    return jnp.reshape(value, shape)


def _init_kernel(module: nn.Module, geo: _Geometry, kernel_shape: tuple[int, ...]) -> Callable:
    """The base layer's own kernel initializer (DenseGeneral initializes the flattened matrix)."""
    if isinstance(module, nn.Dense):
        return module.kernel_init

    def init(rng, shape, dtype=jnp.float32):
        return _reshape_maybe_boxed(module.kernel_init(rng, (geo.d_in, geo.d_out), dtype), shape)

    return init


def _init_bias(module: nn.Module, geo: _Geometry) -> Callable:
    if isinstance(module, nn.Dense):
        return module.bias_init

    def init(rng, shape, dtype=jnp.float32):
        return _reshape_maybe_boxed(module.bias_init(rng, (geo.d_out,), dtype), shape)

    return init


# ---------------------------------------------------------------------------------------------
# The adapted forward pass
# ---------------------------------------------------------------------------------------------
def _blocks(skew: jax.Array, config: BOFTConfig) -> jax.Array:
    return cayley(skew, method=config.cayley, neumann_terms=config.neumann_terms)


_RANK_BY_COMPARISON_MAX = 1024  # _dropout_blocks: ranks by pairwise comparison up to this many blocks


def _dropout_blocks(blocks: jax.Array, p: float, rng: jax.Array) -> jax.Array:
    """PEFT's multiplicative dropout: one random factor gets int(p * k) random identity blocks.

    Which factor, and which ``int(p k)`` of its ``k`` blocks (a uniformly random subset), come from
    one draw of ``k + 1`` random words: the blocks with the ``int(p k)`` smallest words (ties go to
    the lower index) are replaced.  Up to ``k = 1024`` the ranks are counted by pairwise
    comparison, above by one stable sort; both give the same subset.  ``jax.random.permutation``
    (a shuffle by several rounds of sorting) plus separate draws for the factor compiled to
    0.15-0.5 s per adapted layer on XLA:CPU: the training gradient of ViT-B shapes (72 adapted
    layers) compiled in 69 s with it and in 34 s with this (BENCHMARKS.md, compile_time).
    """
    m, k, b, _ = blocks.shape
    n_drop = int(p * k)
    if n_drop == 0:
        return blocks
    words = jax.random.bits(rng, (k + 1,), jnp.uint32)
    u, factor = words[:k], words[k] % jnp.uint32(m)  # modulo bias <= m / 2**32
    if k <= _RANK_BY_COMPARISON_MAX:
        idx = jnp.arange(k)
        before = (u[None, :] < u[:, None]) | ((u[None, :] == u[:, None]) & (idx[None, :] < idx[:, None]))
        drop = jnp.sum(before, axis=1) < n_drop  # rank of block i among the k words
    else:
        drop = jnp.zeros(k, bool).at[jnp.argsort(u, stable=True)[:n_drop]].set(True)
    mask = (jnp.arange(m, dtype=jnp.uint32)[:, None] == factor) & drop[None, :]
    return jnp.where(mask[:, :, None, None], jnp.eye(b, dtype=blocks.dtype), blocks)


def _choose_mode(config: BOFTConfig, tokens: int, d_out: int) -> str:
    """``"input"`` or ``"weight"`` for one layer call: ``config.mode``, or the cheaper one for ``"auto"``.

    Both modes compute ``y = ((x M) K) * s`` exactly, applying ``M`` as ``d_in / S`` dense
    ``S x S`` diagonal blocks (``S = b 2^(m-1)``, see :mod:`boft_jax._ops`), and both have the same
    structured backward pass (``dx = u M^T`` and block gradients reduced over the tokens, with
    ``u = (dy s) K^T`` the frozen layer's own input gradient; no weight gradient ``x^T dy``).
    They differ only in the forward pass (and, for the exact Cayley map at ``T >= 16 d_out``, weight
    mode keeps ``M K`` and saves the backward's token-side ``u M^T``: :func:`boft_jax._ops.boft_dense`):

    - ``"input"`` rotates the ``T`` token rows: ``2 S d_in T`` FLOPs, plus on XLA:CPU a transpose
      of the ``(T, d_in)`` activations into a ``(d_in / S, T, S)`` view and back;
    - ``"weight"`` rotates the ``d_in x d_out`` kernel once per call: ``2 S d_in d_out`` FLOPs,
      no transposes (:func:`boft_jax._ops.boft_dense`).

    So training and inference are decided by the same comparison, ``d_out`` kernel columns vs
    ``T`` token rows.  Rule: ``"weight"`` when ``d_out <= 2 T``, else ``"input"``.  The factor 2
    is the measured cost of a token row relative to a kernel column on XLA:CPU (transposes in and
    out; benchmarks/train_step.py).  The previous rule (``T > d_out`` from the forward FLOPs
    only) was right in spirit for the new backward but its old autodiff weight mode paid a full
    ``x^T dy`` matmul per training step, which made "weight" 1.3-2x slower than "input" there.
    Examples: ViT-B, batch 4 (T = 788): weight for query/key/value/out and fc2 (d_out 768),
    input for fc1 (d_out 3072); batch 1 (T = 197): input everywhere; T >= 1536: weight everywhere.
    """
    if config.mode != "auto":
        return config.mode
    return "weight" if d_out <= 2 * tokens else "input"


def _rotation_of(skew, drop_key, method: str, neumann_terms: int, p_drop: float) -> jax.Array:
    """``M`` for the products of :mod:`boft_jax._ops`: Cayley blocks, dropout, span or factor form."""
    blocks = cayley(skew, method=method, neumann_terms=neumann_terms)
    if drop_key is not None:
        blocks = _dropout_blocks(blocks, p_drop, drop_key)
    return _ops.rotation_operand(blocks)  # (d_in / S, S, S) diagonal blocks of M, or its factors


def _adapted_dense(x2, k2, skew, scale, drop_key, *, config: BOFTConfig, mode: str, precision) -> jax.Array:
    """``((x M) K) * s`` for ``x2 (T, d_in)``, ``k2 (d_in, d_out)`` (bias added by the caller)."""
    return _adapted_dense_jit(x2, k2, skew, scale, drop_key, config.cayley, config.neumann_terms, config.dropout,
                              mode, precision)


# One compiled program per layer shape and math setting, also when the model runs eagerly (op-by-op
# dispatch would compile every small primitive of the adapter separately); inlined under an outer jit.
@functools.partial(jax.jit, static_argnums=(5, 6, 7, 8, 9))
def _adapted_dense_jit(x2, k2, skew, scale, drop_key, method, neumann_terms, p_drop, mode, precision) -> jax.Array:
    B = _rotation_of(skew, drop_key, method, neumann_terms, p_drop)
    if mode == "weight":
        return _ops.boft_dense(x2, k2, B, scale, precision, method == "exact")
    rotated = _ops.rotate_rows(x2, B, precision).astype(x2.dtype)
    return _ops.scaled_dot(rotated, k2, scale, precision)


def _pattern_rule(paths: Sequence[str] = ()) -> str:
    """How BOFTConfig's targets / exclude patterns select layers, for the errors that depend on it,
    with examples made from the model's own layer paths (the first of ``paths``, if any).

    >>> _pattern_rule(["encoder/block_0/layer_0/SelfAttention/q"]).split("(e.g. ")[1]
    "'q', 'SelfAttention/q' or 'layer_0/.*'), not a part of a name"
    """
    parts = next((p.split("/") for p in paths if p), ["layer_3", "attention", "query"])
    examples = [repr(parts[-1])]
    if len(parts) > 1:
        examples.append(repr("/".join(parts[-2:])))
    if len(parts) > 2:
        examples.append(repr(f"{parts[-3]}/.*"))
    listed = examples[0] if len(examples) == 1 else ", ".join(examples[:-1]) + " or " + examples[-1]
    return ("A pattern is a regex that must match a whole '/'-joined module path or a trailing run of its"
            f" components (e.g. {listed}), not a part of a name")


def _check_structure(path: str, skew_shape: tuple[int, ...], struct) -> None:
    """The block structure of an adapter's skew ``(..., m, k, b(b-1)/2)`` (leading stacked axes
    allowed) is the one the config gives the layer (``struct``, a :class:`LayerStructure`)."""
    m, k, p = skew_shape[-3:]
    want = (struct.n_factors, struct.n_blocks, struct.block_size * (struct.block_size - 1) // 2)
    if (m, k, p) != want:
        raise ValueError(
            f"{layer_label(path)}: its adapter params were made for n_factors={m}, {k} blocks of size"
            f" {block_size_from_num_params(p)} (skew {tuple(skew_shape)}), but the config asks for"
            f" n_factors={struct.n_factors}, {struct.n_blocks} blocks of size {struct.block_size} here (skew {want})."
            " Apply the params with the BOFTConfig they were made with."
        )


def _check_held_kernel(path: str, held, kernel_shape: tuple[int, ...]) -> None:
    """The kernel of the :class:`BOFTKernel` ``held`` has the shape this call needs, ``kernel_shape``."""
    kernel = tuple(jnp.shape(held.kernel))
    if kernel != kernel_shape:
        raise ValueError(
            f"{layer_label(path)}: its kernel has shape {kernel}, but this call needs {kernel_shape} (the input's"
            " contracted axes, then the layer's features): the input does not fit the params"
        )


def _check_held(path: str, held, kernel_shape: tuple[int, ...], want: tuple[int, ...], struct, d_out: int) -> None:
    """The params an adapted layer finds fit this call: a :class:`BOFTKernel` with kernel
    ``kernel_shape``, skew ``want`` and scale ``(d_out,)``."""
    if not _is_node(held):
        raise ValueError(
            f"{layer_label(path)} is targeted by BOFT but its 'kernel' param is a plain array: the params"
            " hold no adapter for it. Build params with boft.combine(frozen, adapter), or init the"
            " wrapped model."
        )
    _check_held_kernel(path, held, kernel_shape)
    skew, scale = (tuple(jnp.shape(a)) for a in (held.skew, held.scale))
    if len(skew) == 3:
        _check_structure(path, skew, struct)
    if skew != want or scale != (d_out,):
        raise ValueError(
            f"{layer_label(path)}: params do not fit the call: skew {skew} (expected {want}), scale {scale}"
            f" (expected {(d_out,)})"
        )


def _adapter_dtype(param_dtype) -> np.dtype:
    """The dtype of a new adapter's skew and scale for a layer with ``param_dtype``: float32, or float64
    for a float64 layer (with ``jax_enable_x64``), so that the rotation is never less precise than the
    model.  A bf16 / f16 layer still gets float32 adapter params (its rotation math runs in float32)."""
    return jax.dtypes.canonicalize_dtype(jnp.promote_types(jnp.float32, param_dtype))


@contextlib.contextmanager
def _no_forward_mode(path: str):
    """JAX's bare "can't apply forward-mode autodiff (jvp) to a custom_vjp function", said in BOFT's terms."""
    try:
        yield
    except TypeError as e:
        if "forward-mode autodiff" not in str(e):
            raise
        raise TypeError(
            f"{layer_label(path)}: forward-mode differentiation (jax.jvp, jax.jacfwd, jax.linearize) through a BOFT"
            " adapted layer is not supported: its structured backward pass is a jax.custom_vjp rule. Use reverse"
            " mode (jax.grad, jax.vjp, jax.jacrev; a Hessian-vector product as jax.jvp of jax.grad), or differentiate"
            " the merged model (boft.merge(params, config)) in forward mode"
        ) from e


def _adapted_call(
    module: nn.Module,
    inputs: jax.Array,
    *,
    path: str,
    config: BOFTConfig,
    dropout: bool,
) -> jax.Array:
    """Dense / DenseGeneral ``__call__`` with the BOFT adapter, in the module's own scope."""
    geo = _geometry(module, inputs, path)
    struct = config.layer_structure(path, geo.d_in)
    kernel_shape = geo.kernel_shape(inputs)
    skew_shape = (struct.n_factors, struct.n_blocks, struct.block_size * (struct.block_size - 1) // 2)
    init_kernel = _init_kernel(module, geo, kernel_shape)

    def init_node(rng, shape, dtype):
        adapter_dtype = _adapter_dtype(dtype)
        return BOFTKernel(
            kernel=init_kernel(rng, shape, dtype),
            skew=jnp.zeros(skew_shape, adapter_dtype),
            scale=jnp.ones((geo.d_out,), adapter_dtype),
        )

    if module.has_variable("params", "kernel"):  # before flax's own check, which calls the skew "kernel"
        held = nn.meta.unbox(module.get_variable("params", "kernel"))
        _check_held(path, held, kernel_shape, skew_shape, struct, geo.d_out)
    node = module.param("kernel", init_node, kernel_shape, module.param_dtype)
    kernel, skew, scale = node.kernel, node.skew, node.scale
    bias = module.param("bias", _init_bias(module, geo), geo.features, module.param_dtype) if module.use_bias else None

    if dropout and not module.has_rng("dropout"):
        # The wrapper was given a 'dropout' rng, but a lifted transform between it and this layer
        # (nn.scan / nn.vmap without 'dropout' in split_rngs) does not pass it down.
        raise ValueError(
            f"{layer_label(path)}: BOFT dropout (config.dropout={config.dropout}) needs the 'dropout' rng here,"
            " but although the wrapped call was given one, this layer cannot see it: a lifted transform around it"
            " (nn.scan, nn.vmap, ...) does not pass it on. Add 'dropout' to that transform's split_rngs,"
            " e.g. nn.scan(..., split_rngs={'params': True, 'dropout': True}), or set config.dropout=0."
        )
    drop_key = module.make_rng("dropout") if dropout else None
    inputs, kernel, bias = module.promote_dtype(inputs, kernel, bias, dtype=module.dtype)
    custom_dot = module.dot_general_cls is not None or module.dot_general is not None
    n_ax = len(geo.axis)
    k2 = kernel.reshape(geo.d_in, geo.d_out)

    if not custom_dot:
        # Contracted axes last, flattened to d_in; the remaining axes keep their order, which is the
        # order of dot_general's output batch axes.
        moved = jnp.moveaxis(inputs, geo.axis, tuple(range(inputs.ndim - n_ax, inputs.ndim)))
        lead = moved.shape[: inputs.ndim - n_ax]
        x2 = moved.reshape(-1, geo.d_in)
        mode = _choose_mode(config, x2.shape[0], geo.d_out)
        y2 = _adapted_dense(x2, k2, skew, scale, drop_key, config=config, mode=mode, precision=module.precision)
        y = y2.reshape(*lead, *geo.features)
    else:
        # A user-supplied dot_general (e.g. quantized or FP8) is kept and differentiated through.  It
        # gets the merged kernel (M K) s whatever config.mode: a dot that is not linear (one that
        # quantizes its operands) would give other outputs on (x M, K), so only this form equals the
        # merged model, at every batch size.
        if module.dot_general_cls is not None:
            dot_general = module.dot_general_cls()
        else:
            dot_general = module.dot_general
        contract = (geo.axis, tuple(range(n_ax)))
        B = _rotation_of(skew, drop_key, config.cayley, config.neumann_terms, config.dropout)
        flat = _ops.rotate_kernel_any(k2, B, module.precision) * scale.astype(B.dtype)
        y = dot_general(inputs, flat.astype(kernel.dtype).reshape(kernel.shape), (contract, ((), ())),
                        precision=module.precision)
    if bias is not None:
        y = y + jnp.reshape(bias, (1,) * (y.ndim - len(geo.features)) + geo.features)
    return y


# ---------------------------------------------------------------------------------------------
# The wrapper module
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _CallState:
    config: BOFTConfig
    dropout: bool
    seen: list = dataclasses.field(default_factory=list)  # every Dense path met
    adapted: list = dataclasses.field(default_factory=list)
    unfit: list = dataclasses.field(default_factory=list)
    overridden: list = dataclasses.field(default_factory=list)  # (path, class) of Dense subclasses' own __call__
    saved_and_targeted: list = dataclasses.field(default_factory=list)  # layers both targeted and in modules_to_save
    initializing: bool = False
    others: dict = dataclasses.field(default_factory=dict)  # {path: class name} of other modules called at init (not Dense)
    weighted: set = dataclasses.field(default_factory=set)  # those of them holding a params matrix of their own


_STOCK_CALLS = (inspect.unwrap(nn.Dense.__call__), inspect.unwrap(nn.DenseGeneral.__call__))


def _refresh_paths(module: nn.Module) -> None:
    """Give the scopes that ``nn.share_scope`` re-parented the path where their variables live.

    Submodules bound before the share (dataclass-field children such as ``nn.Sequential``'s
    layers) keep the ``path`` recorded when they were made (``model/layers_0``, for variables at
    ``layers_0``); flax names the scopes of lifted transforms (``nn.scan``, ``nn.remat``, ...) after
    that path, so the stale prefix would reach layers inside them too.
    """
    for child in module._state.children.values():
        scope = getattr(child, "scope", None) if isinstance(child, nn.Module) else None
        if scope is None or scope.parent is None or not isinstance(scope.name, str):
            continue
        path = (*scope.parent.path, scope.name)
        if tuple(scope.path) != path:
            scope.path = path
            scope.debug_path = (*scope.parent.debug_path, scope.name)
        _refresh_paths(child)


def _unfit_error(unfit: list[tuple[str, str]]) -> ValueError:
    """``unfit``: ``(path, message)`` of every targeted layer that does not fit, each message starting
    with the layer's label.  Layers with the same reason (same width, same config) share one line
    that names them all."""
    unfit = list(dict.fromkeys(unfit))  # a layer called twice (shared, or traced twice by nn.scan) once
    by_reason: dict[str, list[str]] = {}
    for path, msg in unfit:
        label = layer_label(path)
        reason = msg[len(label):] if msg.startswith(label) else f": {msg}"
        by_reason.setdefault(reason, []).append(path)
    lines = [f"{layer_label(paths[0])}{reason}" if len(paths) == 1
             else f"{len(paths)} layers {', '.join(map(path_repr, paths))}{reason}" for reason, paths in by_reason.items()]
    return ValueError(f"{len(unfit)} targeted layer(s) do not fit the BOFT block structure:\n  " + "\n  ".join(lines))


def _holds_adapter(module: nn.Module) -> bool:
    return module.has_variable("params", "kernel") and _is_node(nn.meta.unbox(module.get_variable("params", "kernel")))


def _check_no_adapter(module: nn.Module, path: str, why: str) -> None:
    """A layer the wrapper runs plain (``why``) must not hold adapter params (they would be ignored)."""
    if _holds_adapter(module):
        raise TypeError(
            f"{layer_label(path)} holds BOFT adapter params, but this wrapper runs it as a plain layer: {why}."
            " Apply the params with the BOFTConfig they were made with (boft.layer_paths(params) lists the"
            " layers that hold adapters), or fold the adapter in first with boft.merge(params, config)."
        )


def _intercept(state: _CallState, next_fun, args, kwargs, context):
    module = context.module
    jit = _jit_kind(type(module))
    if jit is not None:
        raise ValueError(f"{type(module).__name__} {module.name!r} {jit} inside a BOFT-wrapped model. {_JIT_REASON}")
    if context.method_name != "__call__" or not isinstance(module, (nn.Dense, nn.DenseGeneral)):
        if state.initializing and context.method_name == "__call__" and module.scope is not None and module.path:
            other = "/".join(module.path)  # (for init's warnings)
            state.others.setdefault(other, type(module).__name__)
            out = next_fun(*args, **kwargs)
            if _holds_matrix(module):
                state.weighted.add(other)
            return out
        return next_fun(*args, **kwargs)
    path = "/".join(module.path)  # the params path (see _refresh_paths)
    if getattr(context.orig_method, "func", None) not in _STOCK_CALLS:
        # A subclass with its own __call__: run its code; the stock Dense.__call__ it calls through
        # super() is what gets adapted (a matched layer that never gets there is an error below).
        state.overridden.append((path, type(module).__name__))
        return next_fun(*args, **kwargs)
    state.seen.append(path)
    if not state.config.matches(path):
        _check_no_adapter(module, path, "the config's targets / exclude do not select it")
        return next_fun(*args, **kwargs)
    if state.config.saved_ancestor(path) is not None:
        # trained in full as (part of) a saved module: BOFT params there would be dropped by split()
        state.saved_and_targeted.append(path)
        _check_no_adapter(module, path, "it lies in one of the config's modules_to_save")
        return next_fun(*args, **kwargs)
    inputs = jnp.asarray(args[0] if args else kwargs["inputs"])  # nn.Dense also takes lists / numpy arrays
    if isinstance(module, nn.DenseGeneral) and _canon(module.batch_dims):
        state.unfit.append((path,
            f"{layer_label(path)}: DenseGeneral with batch_dims={module.batch_dims} (one kernel per batch entry) is"
            " not supported by BOFT; exclude it with BOFTConfig.exclude"
        ))
        return next_fun(*args, **kwargs)
    if isinstance(module, nn.DenseGeneral) and not _canon(module.axis):
        state.unfit.append((path,
            f"{layer_label(path)}: DenseGeneral with axis=() contracts no input axis (an outer product), so it has"
            " no input features to rotate; exclude it with BOFTConfig.exclude"
        ))
        return next_fun(*args, **kwargs)
    geo = _geometry(module, inputs, path)
    err = state.config.fit_error(path, geo.d_in)
    if err is not None:
        state.unfit.append((path, err))
        if not _holds_adapter(module):
            return next_fun(*args, **kwargs)  # keep tracing so that every unfit layer gets listed
        # it holds an adapter, so it cannot run plain: stop here, blaming an input of another width
        # than the params' on the input (that width need not fit the block structure), else the config
        _check_held_kernel(path, nn.meta.unbox(module.get_variable("params", "kernel")), geo.kernel_shape(inputs))
        raise _unfit_error(state.unfit)
    state.adapted.append(path)
    with _no_forward_mode(path):  # every custom_vjp of the layer (products, scale) runs inside
        return _adapted_call(module, inputs, path=path, config=state.config, dropout=state.dropout)


def _holds_matrix(module: nn.Module) -> bool:
    """Whether ``module`` has a params array of rank >= 2 of its own (a Conv's, an Einsum's or an
    Embed's), not only in its submodules.

    Only for init's warning, so it never raises: a param may be any pytree (a tuple of arrays), and
    a module that shares its scope with an adapted Dense (``nn.share_scope``) sees that layer's
    :class:`BOFTKernel` among its own params (adapted, so not counted)."""
    own = module.variables.get("params", {})
    for v in own.values():
        if isinstance(v, Mapping):
            continue  # a submodule's params
        for leaf in jax.tree.leaves(nn.meta.unbox(v), is_leaf=_is_node):
            if not _is_node(leaf) and len(getattr(leaf, "shape", ())) >= 2:
                return True
    return False


def _warn_unadapted_weights(config: BOFTConfig, dense: set[str], others: Mapping[str, str], weighted: set[str]) -> None:
    """Warn (at init) about modules that hold weights, are not Dense, and are selected by a target
    pattern that names them (not a wildcard such as ``".*"`` or ``"encoder/.*"``, which adapts every
    Dense layer there and no more, told by whether it would match a made-up name in their place): a
    pattern such as ``"q_proj|v_proj|o_proj"`` that also names an ``nn.Einsum`` or a hand-written
    linear layer would otherwise adapt fewer layers than it names, silently.  (A pattern that selects
    no Dense layer at all is :func:`_warn_idle_targets`'s.)"""
    idle = config.idle_targets(dense)  # (warned about by _warn_idle_targets)
    active = [t for t in config.targets if t not in idle]

    def names(t: str, path: str) -> bool:  # t selects path by its name: not any name at that place
        parent = path.rpartition("/")[0]
        return _path_matches(t, path) and not _path_matches(t, f"{parent}/x9q_boft_probe".lstrip("/"))

    hit = sorted(p for p in weighted if config.matches(p) and config.saved_ancestor(p) is None
                 and any(names(t, p) for t in active))
    if hit:
        warnings.warn(
            f"BOFT targets {config.targets} select {len(hit)} module(s) that hold weights but are not nn.Dense /"
            f" nn.DenseGeneral, which BOFT does not adapt (they stay frozen): "
            f"{', '.join(f'{path_repr(p)} ({others[p]})' for p in hit[:8])}{' ...' if len(hit) > 8 else ''}."
            " Exclude them (BOFTConfig.exclude) to say so, train them in full (modules_to_save), or write"
            " them as nn.Dense / nn.DenseGeneral layers to adapt them",
            UserWarning,
            stacklevel=4,
        )


def _warn_idle_targets(config: BOFTConfig, dense: set[str], others: Mapping[str, str]) -> None:
    """Warn (at init) about ``targets`` patterns that select none of the Dense layers called, when
    others do (none at all is an error): a misspelt pattern, or one naming a module BOFT does not
    adapt (``nn.Conv``, ``nn.Einsum``, ...), would otherwise train fewer layers than asked for."""
    idle = config.idle_targets(dense)
    if not idle:
        return
    notes = []
    for t in idle:
        hit = sorted(p for p in others if _path_matches(t, p))  # (others holds no Dense layer)
        if hit:
            notes.append(f"{t!r} matches {', '.join(f'{path_repr(p)} ({others[p]})' for p in hit[:4])}"
                         f"{' ...' if len(hit) > 4 else ''}, which BOFT does not adapt: only nn.Dense / nn.DenseGeneral")
    warnings.warn(
        f"BOFT target pattern(s) {idle} select none of the model's Dense/DenseGeneral layers (the other"
        f" targets do), so they adapt nothing{': ' + '; '.join(notes) if notes else ''}. {_pattern_rule(sorted(dense))}."
        f" The Dense layers are {paths_label(sorted(dense)[:12])}{' ...' if len(dense) > 12 else ''}",
        UserWarning,
        stacklevel=4,
    )


class BOFTModule(nn.Module):
    """``model`` with BOFT adapters on its targeted Dense/DenseGeneral layers (see :func:`wrap`).

    Shares ``model``'s scope, so its params are ``model``'s params with :class:`BOFTKernel` nodes
    at adapted layers.  Every public method of ``model`` is available (``method="encode"``), and so
    are its dataclass fields, except ``config``, which is the wrapper's :class:`BOFTConfig` (the base
    model's own is ``wrapped.model.config``).  The base model is the dataclass field
    ``boft_base_model`` (``wrapped.model`` reads it; the field is not called ``model``, a name the
    base's own submodules may use), so construct the wrapper with :func:`wrap`.

    Dropout (``config.dropout > 0``) is active when a ``'dropout'`` rng is given and the call is
    not deterministic: the wrapper reads the base method's ``deterministic`` (or ``train``)
    argument as the method binds it (keyword, position or default) and, when that is absent or
    ``None``, the base module's ``deterministic`` (or ``train``) field, so adapter dropout follows
    the base model's own; ``boft_deterministic=True/False`` overrides it.  A call that passes
    ``deterministic=False`` / ``train=True`` / ``boft_deterministic=False`` without a
    ``'dropout'`` rng is a ``ValueError`` (as flax's ``nn.Dropout`` makes it).
    """

    # Not named ``model``: the field's name is reserved in the scope the wrapper shares with the base
    # model, whose own top-level submodule may be called that (Hugging Face's ``...ForCausalLM``).
    boft_base_model: nn.Module
    config: BOFTConfig

    @property
    def model(self) -> nn.Module:
        """The wrapped base model."""
        return self.boft_base_model

    def setup(self):
        nn.share_scope(self, self.model)
        _refresh_paths(self.model)

    def __call__(self, *args, boft_deterministic: bool | None = None, **kwargs):
        return self._run("__call__", args, kwargs, boft_deterministic)

    @nn.nowrap
    def _deterministic(self, method: str, args, kwargs) -> tuple[bool, bool]:
        """``(deterministic, explicit)``: the call's ``deterministic`` (or ``not train``) argument
        as the base method binds it: by keyword, by position, or its default.  When that is absent
        or ``None`` (flax's ``nn.merge_param`` idiom), the wrapped module's own ``deterministic``
        (or ``train``) field; ``False`` when there is neither (pass ``boft_deterministic`` to say it
        explicitly).  ``explicit``: the value was passed in this call (not a default or a field)."""
        values, given = dict(kwargs), dict(kwargs)
        try:
            sig = inspect.signature(getattr(type(self.model), method))
            bound = sig.bind(self.model, *args, **kwargs)
        except (TypeError, ValueError):  # no signature / a call the method will reject itself
            bound = None
        if bound is not None:
            given = dict(bound.arguments)
            bound.apply_defaults()
            values = dict(bound.arguments)
            for name, param in sig.parameters.items():
                if param.kind is inspect.Parameter.VAR_KEYWORD:
                    values.update(values.pop(name, {}))
                    given.update(given.pop(name, {}))
        for name, deterministic_if in (("deterministic", True), ("train", False)):
            if values.get(name) is not None:
                return bool(values[name]) == deterministic_if, given.get(name) is not None
        for name, deterministic_if in (("deterministic", True), ("train", False)):
            field = getattr(self.model, name, None)
            if isinstance(field, (bool, np.bool_)):
                return bool(field) == deterministic_if, False
        return False, False

    def _run(self, method: str, args, kwargs, deterministic: bool | None = None):
        explicit = deterministic is not None
        if deterministic is None:
            deterministic, explicit = self._deterministic(method, args, kwargs)
        if (self.config.dropout > 0 and not deterministic and explicit and not self.has_rng("dropout")
                and not self.is_initializing()):  # (init: identity blocks, dropout changes nothing)
            # a call that says it trains, without the rng its dropout needs (as flax's nn.Dropout refuses it)
            raise ValueError(
                f"BOFT dropout (config.dropout={self.config.dropout}) is on in this call (it is not deterministic),"
                " but no 'dropout' rng was given, so the adapter would silently train without it. Pass"
                " rngs={'dropout': key} to apply, or make the call deterministic (deterministic=True,"
                " train=False, or boft_deterministic=True)"
            )
        dropout = self.config.dropout > 0 and not deterministic and self.has_rng("dropout")
        state = _CallState(self.config, dropout, initializing=self.is_initializing())
        with nn.intercept_methods(functools.partial(_intercept, state)):
            out = getattr(self.model, method)(*args, **kwargs)
        if state.saved_and_targeted:
            raise ValueError(
                f"layer(s) {sorted(set(state.saved_and_targeted))} are both targeted by BOFT (targets"
                f" {self.config.targets}) and inside modules_to_save {self.config.modules_to_save}, which trains them"
                " in full; exclude them from the targets (BOFTConfig.exclude) or from modules_to_save"
            )
        if state.unfit:
            raise _unfit_error(state.unfit)
        skipped = sorted({(p, c) for p, c in state.overridden if self.config.matches(p) and p not in state.adapted})
        if skipped:
            raise ValueError(
                "BOFT targets match layer(s) whose class overrides __call__ without calling"
                " nn.Dense/nn.DenseGeneral.__call__, so there is no stock Dense computation to adapt: "
                + ", ".join(f"{path_repr(p)} ({c})" for p, c in skipped)
                + ". Exclude them (BOFTConfig.exclude) or let their __call__ use super().__call__."
            )
        if self.is_initializing() and not state.adapted:
            raise ValueError(
                f"BOFT targets {self.config.targets} (exclude {self.config.exclude}) match none of the"
                f" model's Dense/DenseGeneral layers: {paths_label(list(dict.fromkeys(state.seen))) if state.seen else 'none were called'}."
                f" {_pattern_rule(state.seen)}"
            )
        met = set(state.seen) | {p for p, _ in state.overridden}  # the Dense layers called
        if self.is_initializing():
            _warn_idle_targets(self.config, met, state.others)
            _warn_unadapted_weights(self.config, met, state.others, state.weighted)
        if self.is_initializing() and self.config.exclude:
            # (an exclude may name a non-Dense module the targets select: see _warn_unadapted_weights)
            idle = self.config.idle_excludes(sorted(met | state.weighted))
            if idle:
                targeted = self.config.targeted(sorted(met))
                raise ValueError(
                    f"BOFT exclude pattern(s) {idle} remove none of the layers the targets {self.config.targets}"
                    f" select, so they would change nothing. {_pattern_rule(targeted)}; the targeted layers are {paths_label(targeted[:12])}{' ...' if len(targeted) > 12 else ''}"
                )
        return out

    @nn.nowrap
    def _method_name(self, method):
        """``method=Base.encode`` / ``method=base.encode`` (the flax idiom) -> ``"encode"``, which
        runs the base model's method with the adapters; anything else is passed on as it is."""
        if method is None or isinstance(method, str):
            return method
        fn = getattr(method, "__func__", method)
        name = getattr(fn, "__name__", None)
        own = getattr(type(self.model), name, None) if isinstance(name, str) else None
        if own is not None and inspect.unwrap(own) is inspect.unwrap(fn):
            return name
        return method

    @staticmethod
    def _capture(kwargs: dict) -> dict:
        """``capture_intermediates`` without this wrapper: it shares the base model's scope, so its
        own ``__call__`` output would be recorded a second time next to the base model's."""
        flt = kwargs.get("capture_intermediates", False)
        if flt is True:
            kwargs["capture_intermediates"] = lambda mdl, name: name == "__call__" and not isinstance(mdl, BOFTModule)
        elif callable(flt):
            kwargs["capture_intermediates"] = lambda mdl, name: not isinstance(mdl, BOFTModule) and flt(mdl, name)
        return kwargs

    @nn.nowrap
    def apply(self, variables, *args, method=None, **kwargs):
        return super().apply(variables, *args, method=self._method_name(method), **self._capture(kwargs))

    @nn.nowrap
    def init_with_output(self, rngs, *args, method=None, **kwargs):
        out, variables = super().init_with_output(rngs, *args, method=self._method_name(method), **self._capture(kwargs))
        _check_new_nodes(variables)
        return out, variables

    @nn.nowrap
    def init(self, rngs, *args, method=None, **kwargs):  # (flax's init runs init_with_output: checked there)
        return super().init(rngs, *args, method=self._method_name(method), **self._capture(kwargs))

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError as e:
            model = self.__dict__.get("boft_base_model")
            if model is None or name.startswith("_"):
                raise
            fields = getattr(type(model), "__dataclass_fields__", {})
            if name in fields and name not in ("parent", "name"):  # read a base model's field (width, ...)
                value = getattr(model, name)
                if not isinstance(value, nn.Module):
                    return value
            attr = getattr(type(model), name, None)
            if not callable(attr):
                raise AttributeError(
                    f"the BOFT wrapper of {type(model).__name__} has no attribute {name!r}: it forwards the base"
                    " model's methods (run with the adapters) and its dataclass fields, not its submodules. Run a"
                    " submodule through a method of the base model (apply(variables, x, method='encode')); read"
                    f" anything else from the base model itself, wrapped.model.{name}"
                ) from e
            if getattr(attr, "nowrap", False):  # an @nn.nowrap helper, callable unbound
                if getattr(attr, "boft_binds_wrapper", False):  # it runs the model by name: run the adapted one
                    return types.MethodType(attr, self)
                return getattr(model, name)  # the model's own (it would run the bare model on these params)

            def method(module, *args, **kwargs):
                return module._run(name, args, kwargs, kwargs.pop("boft_deterministic", None))

            return types.MethodType(method, self)


def wrap(model: nn.Module, config: BOFTConfig) -> BOFTModule:
    """Wrap an (unbound) linen model so its targeted Dense/DenseGeneral layers carry BOFT adapters.

    Args:
      model: any linen Module, unmodified.
      config: the :class:`BOFTConfig`.

    Returns:
      A linen Module with the same call signature (``method=`` a name or the base model's own
      method, e.g. ``method=Base.encode``, runs that method with the adapters).  ``init`` creates the
      base params (the same tree and shapes as ``model.init``; the same values with the same rng for
      layers made in ``setup`` or ``@nn.compact``, not for layers passed in as dataclass fields, e.g.
      ``nn.Sequential``'s) plus identity adapters (``M = I``, ``s = 1``), so the wrapped model starts
      exactly at the base model whose params it holds.  For pretrained weights use
      :func:`init_adapter` and :func:`combine`.  A subclass of ``nn.Dense`` with its own ``__call__``
      is adapted where that calls ``super().__call__``; one that never does is refused.  ``nn.jit``
      modules in the model are refused (when wrapping for a field or the model itself, else when
      called): flax caches their trace whatever the interceptor.  A Dense with its own
      ``dot_general`` / ``dot_general_cls`` (e.g. quantized) gets the merged kernel ``(M K) s``
      through that dot in every mode, so it equals the merged model.  ``nn.map_variables`` functions in the model
      see the adapter leaves (``skew``, ``scale``) of adapted kernels too: a dtype cast is harmless,
      a transformation of every leaf changes the adapter as well.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> import boft_jax as boft
      >>> base = nn.Sequential([nn.Dense(32), nn.relu, nn.Dense(8)])
      >>> model = boft.wrap(base, boft.BOFTConfig(block_size=4, n_factors=2, exclude="layers_2"))
      >>> x = jnp.ones((2, 16))
      >>> params = model.init(jax.random.key(0), x)["params"]
      >>> frozen, adapter = boft.split(params)
      >>> jax.tree.map(jnp.shape, adapter)
      {'layers_0': {'kernel': {'scale': (32,), 'skew': (2, 4, 6)}}}
      >>> bool(jnp.allclose(model.apply({"params": params}, x), base.apply({"params": frozen}, x)))
      True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"boft.wrap expects a flax.linen Module, got {type(model).__name__}")
    if not isinstance(config, BOFTConfig):
        raise TypeError(f"boft.wrap expects a BOFTConfig, got {type(config).__name__}")
    if model.scope is not None:
        if isinstance(model.parent, nn.Module):  # made inside another module's @nn.compact: bound at once
            raise ValueError(
                f"boft.wrap: this {type(model).__name__} was constructed inside {type(model.parent).__name__}'s"
                " @nn.compact method, which binds it to that module at once; construct it with parent=None"
                f" ({type(model).__name__}(..., parent=None)) and wrap that, or wrap it in setup()"
            )
        raise ValueError("boft.wrap expects an unbound model (as constructed, before init/apply/bind)")
    if isinstance(model, BOFTModule):
        raise ValueError(
            "boft.wrap: this model is already wrapped (a BOFTModule); wrap the base model once, with one"
            " BOFTConfig (several adapters on one base: boft_jax.multi)"
        )
    jitted = _lifted_jit_instances(model)
    if jitted:
        raise ValueError(
            f"boft.wrap: {', '.join(jitted)} {'is an nn.jit module' if len(jitted) == 1 else 'are nn.jit modules'}"
            f" (an attribute of the model, or the model itself). {_JIT_REASON}"
        )
    return BOFTModule(boft_base_model=model, config=config)


_JIT_REASON = (
    "flax caches the trace of an nn.jit class across calls whatever interceptor is active, so the layers"
    " inside it would go unadapted, or run another BOFTConfig's adapter (or another dropout setting)."
    " Leave out nn.jit (make it nn.Dense, nn.remat, ... instead) and jax.jit the whole step or apply"
)


@functools.lru_cache(maxsize=None)
def _jit_kind(cls: type) -> str | None:
    """How ``cls`` is jitted by flax, for the refusals (``None``: not at all): a class made by
    ``nn.jit`` (flax names it ``Jit<Class>``; also under another lifted transform,
    ``nn.remat(nn.jit(Block))``), or one with ``@nn.jit`` methods (it keeps its name; flax's lifting
    wrapper holds ``flax.core.lift.jit`` in its closure).  Checked when wrapping (fields) and on a
    class's first intercepted call: a cached trace of a jitted method no longer calls into it."""
    if any(c.__module__ == nn.jit.__module__ and c.__name__.startswith("Jit") for c in cls.__mro__):
        return "is an nn.jit module"
    methods = [name for name, fn in inspect.getmembers(cls, inspect.isfunction)
               if any(_cell_value(c) is flax_lift.jit for c in (fn.__closure__ or ()))]
    return f"has @nn.jit method(s) {', '.join(methods)}" if methods else None


def _cell_value(cell):
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return None


def _lifted_jit_instances(module: nn.Module, where: str = "", seen: set | None = None) -> list[str]:
    """Where ``nn.jit`` modules sit among ``module`` and its Module-valued dataclass fields (recursively)."""
    seen = set() if seen is None else seen
    if id(module) in seen:
        return []
    seen.add(id(module))
    found = [f"the model's field {where}" if where else "the model itself"] if _jit_kind(type(module)) else []
    for field in dataclasses.fields(module):
        if field.name in ("parent", "name"):
            continue
        value = getattr(module, field.name, None)
        items = value.items() if isinstance(value, Mapping) else enumerate(value) if isinstance(value, (list, tuple)) else None
        if isinstance(value, nn.Module):
            found += _lifted_jit_instances(value, f"{where}.{field.name}".lstrip("."), seen)
        elif items is not None:
            for key, item in items:
                if isinstance(item, nn.Module):
                    found += _lifted_jit_instances(item, f"{where}.{field.name}[{key!r}]".lstrip("."), seen)
    return found


# ---------------------------------------------------------------------------------------------
# Params helpers
# ---------------------------------------------------------------------------------------------
_SHARD_HINT = "shard with jax.jit / NamedSharding instead (e.g. boft_jax.sharding.shard_frozen)"


def _no_boxes(tree, fn: str, arg: str, hint: str = _SHARD_HINT) -> None:
    """Refuse flax's boxed params (``nn.with_partitioning`` -> ``nn.Partitioned``), saying what to do."""
    is_box = lambda v: isinstance(v, nn.meta.AxisMetadata)  # noqa: E731
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_box)[0]
    boxed = [(jax.tree_util.keystr(k), type(v).__name__) for k, v in leaves if is_box(v)]
    if boxed:
        raise TypeError(
            f"boft.{fn}: {arg} holds {len(boxed)} boxed value(s) ({boxed[0][1]} at {boxed[0][0]}"
            f"{', ...' if len(boxed) > 1 else ''}), as flax returns params whose initializers use"
            f" nn.with_partitioning. Unbox them first: {arg} = flax.linen.unbox({arg}); {hint}"
        )


def split(params: Mapping, config: BOFTConfig | None = None) -> tuple[dict, dict]:
    """Split wrapped-model params into ``(frozen, adapter)``.

    Args:
      params: the wrapped model's params (the ``"params"`` collection).
      config: the :class:`BOFTConfig`; decides which biases train (``config.bias``: ``"none"``,
        ``"boft_only"`` = biases of adapted layers, ``"all"`` = every ``bias`` param) and which
        modules train in full (``config.modules_to_save``).  Without it only the BOFT leaves train.
        With it, every adapted layer must be one the config selects, with its block structure
        (``ValueError`` otherwise, as :func:`merge` would raise).

    Returns:
      ``frozen``: the base model's params in its own layout (``model.apply({"params": frozen})``
      works on the bare model); trainable biases and saved modules keep their current values here
      too.  ``adapter``: only the trainable leaves, nested like the params:
      ``{..., layer: {"kernel": {"skew", "scale"}, "bias"?}, saved_module: {...all its params}}``.

    Example (a 16 -> 8 Dense, blocks of 4: skew ``(m, k, b(b-1)/2) = (1, 4, 6)``, scale ``(d_out,)``):
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> cfg = BOFTConfig(block_size=4, targets="layers_0")
      >>> model = wrap(nn.Sequential([nn.Dense(8)]), cfg)
      >>> params = model.init(jax.random.key(0), jnp.ones((1, 16)))["params"]
      >>> frozen, adapter = split(params, cfg)
      >>> jax.tree.map(jnp.shape, adapter)
      {'layers_0': {'kernel': {'scale': (8,), 'skew': (1, 4, 6)}}}
      >>> frozen["layers_0"]["kernel"].shape, count_params(adapter)
      ((16, 8), 32)
      >>> node = combine(frozen, adapter)["layers_0"]["kernel"]  # a BOFTKernel(kernel, skew, scale)
      >>> bool(jnp.array_equal(node.skew, adapter["layers_0"]["kernel"]["skew"]))
      True
    """
    if config is not None and not isinstance(config, BOFTConfig):
        raise TypeError(f"split's config must be a BOFTConfig or None, got {type(config).__name__}")
    _no_boxes(params, "split", "params")

    def frozen_of(tree):
        return {k: v.kernel if _is_node(v) else frozen_of(v) if isinstance(v, Mapping) else v for k, v in tree.items()}

    def adapter_of(tree, path):
        if path and config is not None and config.saves_module("/".join(path)):
            return frozen_of(tree)  # the whole module trains
        out = {}
        adapted = _is_node(tree.get("kernel"))
        for k, v in tree.items():
            if _is_node(v):
                if config is not None:  # as merge and save_adapter would: refuse a config that does not describe it
                    _check_node_config(v, config, "/".join(path), "split")
                out[k] = {"skew": v.skew, "scale": v.scale}
            elif isinstance(v, Mapping):
                sub = adapter_of(v, path + (k,))
                if sub:
                    out[k] = sub
            elif k == "bias" and config is not None and config.trains_bias(adapted):
                out[k] = v
        return out

    adapter = adapter_of(params, ())
    if not adapter:
        warnings.warn(
            "boft.split: these params hold no adapter params (no adapted layer's BOFTKernel, no trainable"
            " bias or saved module), so the adapter is empty and an optimizer would train nothing. Make"
            " params with the wrapped model, boft.wrap(model, config).init(...), or pair pretrained ones"
            " with boft.init_adapter",
            stacklevel=2,
        )
    return frozen_of(params), adapter


def _layer_layout_hint(key: str, base: Mapping) -> str:
    """Where ``key`` is missing from ``base`` because one tree has stacked (nn.scan) layers and the other
    unrolled ones (``layers`` vs ``layer_0``, ``layer_1``, ..., as :func:`boft_jax.models.hf.stack_layers`
    names them): say so."""
    key = str(key)
    m = re.fullmatch(r"(.+)_\d+", key)
    if key.endswith("s") and any(re.fullmatch(re.escape(key[:-1]) + r"_\d+", str(k)) for k in base):
        which = "the adapter's layers are stacked (made on an nn.scan / scan_layers=True model) and the base's are not"
    elif m and f"{m.group(1)}s" in base:
        which = "the adapter's layers are unrolled and the base's are stacked (nn.scan / scan_layers=True)"
    else:
        return ""
    return (f": {which}. Build the base with the adapter's layout (e.g. from_pretrained(..., scan_layers=True)"
            " for a stacked adapter), or convert the adapter with boft_jax.models.hf.stack_layers / unstack_layers")


def combine(frozen: Mapping, adapter: Mapping) -> dict:
    """Inverse of :func:`split`: put ``adapter`` leaves into ``frozen`` (checked against its shapes).

    Raises ``ValueError`` naming the path when the adapter names a layer the base does not have, or
    when shapes disagree (an adapter made for a different base).  Example: :func:`split`.
    """
    _no_boxes(frozen, "combine", "frozen")
    _no_boxes(adapter, "combine", "adapter")

    def go(f, a, path):
        if not isinstance(f, Mapping):
            raise ValueError(f"adapter entry '{'/'.join(path)}' has no matching sub-tree in the base params")
        out = dict(f)
        for k, v in a.items():
            here = path + (k,)
            if k not in f:
                raise ValueError(
                    f"adapter entry '{'/'.join(here)}' has no counterpart in the base params"
                    f" (base keys there: {sorted(f)}){_layer_layout_hint(k, f)}"
                )
            if _is_node(f[k]):
                raise ValueError(
                    f"base params entry '{'/'.join(here)}' already holds BOFT adapter params (a BOFTKernel):"
                    " pass the base params, e.g. frozen from boft.split(params), not params that were combined"
                    " or initialized with the wrapped model"
                )
            if isinstance(v, Mapping) and not isinstance(f[k], Mapping):  # an adapted kernel's entry
                if set(v) != {"skew", "scale"}:
                    raise ValueError(
                        f"adapter entry '{'/'.join(here)}' has {sorted(v)}, but the base has a plain array there:"
                        " an adapted kernel's entry holds exactly 'skew' and 'scale'"
                    )
                kernel = f[k]
                _check_adapter_fits("/".join(path), kernel, v["skew"], v["scale"])
                out[k] = BOFTKernel(kernel=kernel, skew=v["skew"], scale=v["scale"])
            elif isinstance(v, Mapping):
                out[k] = go(f[k], v, here)
            else:
                if jnp.shape(v) != jnp.shape(f[k]):
                    raise ValueError(
                        f"adapter leaf '{'/'.join(here)}' has shape {jnp.shape(v)} but the base has {jnp.shape(f[k])}"
                    )
                out[k] = v
        return out

    return go(frozen, adapter, ())


def _check_adapter_fits(path: str, kernel, skew, scale) -> None:
    for name, leaf in (("skew", skew), ("scale", scale)):
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"{layer_label(path)}: adapter {name} has dtype {dtype}; adapter params are real floating-point"
                " arrays (float32 as boft.init_adapter makes them, or bfloat16 / float16 / float64)"
            )
    lead = jnp.ndim(skew) - 3
    if lead < 0 or jnp.ndim(scale) != lead + 1:
        raise ValueError(f"{layer_label(path)}: adapter skew {jnp.shape(skew)} / scale {jnp.shape(scale)} are malformed")
    k_lead, s_lead, c_lead = (tuple(jnp.shape(a)[:lead]) for a in (kernel, skew, scale))
    if lead and s_lead == c_lead and k_lead != s_lead and sorted(k_lead) != sorted(s_lead):
        raise ValueError(
            f"{layer_label(path)}: the adapter holds {s_lead} stacked layers (leading axes of skew"
            f" {tuple(jnp.shape(skew))} and scale {tuple(jnp.shape(scale))}), the base kernel {tuple(jnp.shape(kernel))}"
            f" {k_lead}: the adapter was made for a base with another number of stacked (nn.scan / nn.vmap) layers"
        )
    if lead and len({k_lead, s_lead, c_lead}) > 1:
        raise ValueError(
            f"{layer_label(path)}: its stacked params disagree on their leading (layer) axes: kernel"
            f" {tuple(jnp.shape(kernel))}, adapter skew {tuple(jnp.shape(skew))} (expected (layers..., m, k, b(b-1)/2)),"
            f" scale {tuple(jnp.shape(scale))} (expected (layers..., d_out)). Stacked layers (nn.scan / nn.vmap) must"
            " keep the layer axis first (variable_axes={'params': 0}); an adapter made for another base would not"
            " share the base's stacked axes either."
        )
    m, k, p = jnp.shape(skew)[lead:]
    try:
        b = block_size_from_num_params(p)
    except ValueError:
        raise ValueError(
            f"{layer_label(path)}: adapter skew {jnp.shape(skew)} does not end in (m, k, b(b-1)/2): its last axis"
            f" ({p}) is no b(b-1)/2 (0, 1, 3, 6, 10, ...)."
            + (" Stacked layers (nn.scan / nn.vmap) must keep the layer axis first (variable_axes={'params': 0})."
               if lead else "")
        ) from None
    d_in, d_out = k * b, jnp.shape(scale)[-1]
    kshape = jnp.shape(kernel)[lead:]
    if _split_point(kshape, d_in, d_out) is None:  # (the stacked axes agree: checked above)
        stacked = (
            f" Stacked layers (nn.scan / nn.vmap) must keep the layer axis first (variable_axes={{'params': 0}});"
            f" here the adapter's stacked axes are {tuple(jnp.shape(skew)[:lead])}."
            if lead
            else ""
        )
        raise ValueError(
            f"{layer_label(path)}: the adapter (m={m}, k={k}, b={b}: d_in={d_in}, d_out={d_out}) does not fit"
            f" the base kernel of shape {tuple(jnp.shape(kernel))}; it was made for a different base model.{stacked}"
        )


def _split_point(kshape, d_in: int, d_out: int) -> int | None:
    """Number of leading (contracted) kernel axes whose product is d_in, the rest giving d_out."""
    for n in range(1, len(kshape)):
        if int(np.prod(kshape[:n])) == d_in and int(np.prod(kshape[n:])) == d_out:
            return n
    return None


def _key_path(key_path) -> str:
    """'a/b' of the layer owning a ``kernel`` node, from a jax tree key path."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in key_path[:-1])


def _check_new_nodes(variables):
    """At init: every adapter node's stacked axes agree with its kernel's, so that :func:`split`,
    :func:`merge` and the checkpoints can read it (an ``nn.scan`` / ``nn.vmap`` with the layer axis
    elsewhere than first is refused here, not after training).  Returns ``variables``."""

    params = variables.get("params") if isinstance(variables, Mapping) else None
    for path, node in _nodes(params) if isinstance(params, Mapping) else ():
        # (partitioning boxes, which init keeps, are looked through)
        _check_adapter_fits(path, *(nn.unbox(a) for a in (node.kernel, node.skew, node.scale)))
    return variables


def _check_node_config(node: BOFTKernel, config: BOFTConfig, path: str, fn: str) -> None:
    """The adapter node at ``path`` is one that ``config`` describes: the layer is selected by its
    targets and its skew has the config's block structure there (what a wrapped model would check)."""
    _check_adapter_fits(path, node.kernel, node.skew, node.scale)
    if not config.matches(path):
        raise ValueError(
            f"{fn}: {layer_label(path)} holds an adapter, but the config's targets"
            f" {config.targets} (exclude {config.exclude}) do not select it, so a model wrapped with this config"
            " would refuse these params. Pass the BOFTConfig the adapter was made with."
        )
    _, k, p = jnp.shape(node.skew)[-3:]
    _check_structure(path, jnp.shape(node.skew), config.layer_structure(path, k * block_size_from_num_params(p)))


def _merge_node(node: BOFTKernel, config: BOFTConfig, inverse: bool = False, path: str = "?") -> jax.Array:
    _check_node_config(node, config, path, "unmerge" if inverse else "merge")
    if inverse and not isinstance(node.scale, jax.core.Tracer) and not np.all(np.asarray(node.scale) != 0):
        zeros = int(np.sum(np.asarray(node.scale) == 0))
        raise ValueError(
            f"unmerge: {layer_label(path)} has {zeros} zero entries in its scale s: K' = (M K) * s lost those"
            " output columns of the base kernel, so they cannot be recovered from the merged params"
        )
    return _merge_arrays(node.kernel, node.skew, node.scale, config, inverse)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _merge_arrays(kernel, skew_, scale_, config: BOFTConfig, inverse: bool) -> jax.Array:
    # One compiled program per (shapes, config): merging a model's many same-shaped layers costs one
    # compilation, not one per primitive as op-by-op execution would.
    lead = jnp.ndim(skew_) - 3

    def one(kernel, skew, scale):
        m, k, p = skew.shape
        b = block_size_from_num_params(p)
        d_in, d_out = k * b, scale.shape[0]
        flat = kernel.reshape(d_in, d_out)
        blocks = _blocks(skew, config)
        # products in the wider of the kernel's and the rotation's dtypes, rounded to the kernel's once
        # (a bf16 / f16 kernel: M K is not rounded before * s)
        acc = jnp.result_type(flat.dtype, blocks.dtype)
        if not inverse:  # K' = (M K) * s, float32 products at full precision (no TF32 on GPUs)
            out = rotate_kernel(flat.astype(acc), blocks, precision=jax.lax.Precision.HIGHEST) * scale.astype(acc)
        else:
            # K = M^-1 (K' / s).  M^-1 = F_0^-1 ... F_{m-1}^-1 and (M^-1)^T is a butterfly product with
            # blocks Q^-T, so M^-1 K = (K^T (M^-1)^T)^T = rotate(K^T, Q^-T)^T.  Inverting the small
            # blocks (rather than using M^T) keeps this exact for the only-nearly-orthogonal Neumann map.
            inv_t = jnp.swapaxes(jnp.linalg.inv(blocks), -1, -2)
            out = rotate((flat.astype(acc) / scale.astype(acc)).T, inv_t,
                         precision=jax.lax.Precision.HIGHEST).T
        return out.astype(kernel.dtype).reshape(kernel.shape)

    fn = one
    for _ in range(lead):
        fn = jax.vmap(fn)
    return fn(kernel, skew_, scale_)


def merge(params: Mapping, config: BOFTConfig) -> dict:
    """Plain params for the unwrapped model: every adapted kernel becomes ``K' = (M K) * s``.

    Zero inference overhead: ``model.apply({"params": merge(params, config)}, x)`` equals the wrapped
    model's output (dropout off).  Works on stacked (``nn.scan``) params too.

    Example (a trained adapter: skew and scale moved away from the identity):
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> cfg = BOFTConfig(block_size=4, n_factors=2, targets="layers_0")
      >>> base = nn.Sequential([nn.Dense(8)])
      >>> model, x = wrap(base, cfg), jax.random.normal(jax.random.key(1), (3, 16))
      >>> frozen, adapter = split(model.init(jax.random.key(0), x)["params"], cfg)
      >>> adapter = jax.tree.map(lambda a: a + 0.1, adapter)
      >>> params = combine(frozen, adapter)
      >>> merged = merge(params, cfg)            # plain params of the bare model
      >>> y = model.apply({"params": params}, x)
      >>> bool(jnp.allclose(base.apply({"params": merged}, x), y, atol=1e-5))
      True
      >>> recovered = unmerge(merged, adapter, cfg)   # the base params again
      >>> bool(jnp.allclose(recovered["layers_0"]["kernel"], frozen["layers_0"]["kernel"], atol=1e-5))
      True
    """
    _check_config(config, "merge")
    _no_boxes(params, "merge", "params")
    if not any(_is_node(l) for l in jax.tree.leaves(params, is_leaf=_is_node)):
        warnings.warn(
            "merge got params without BOFT adapter params (no adapted kernel): they are returned unchanged."
            " To merge an adapter, pass the wrapped model's params (e.g. boft.combine(frozen, adapter))",
            UserWarning,
            stacklevel=2,
        )
    return jax.tree_util.tree_map_with_path(
        lambda kp, v: _merge_node(v, config, path=_key_path(kp)) if _is_node(v) else v, params, is_leaf=_is_node
    )


def unmerge(merged: Mapping, adapter: Mapping, config: BOFTConfig) -> dict:
    """Recover the base params from merged params and the adapter: ``K = M^-1 (K' / s)``.

    Only the rotated kernels are recovered.  What else the adapter trained (biases,
    ``modules_to_save`` such as a new classifier head) holds its trained values in ``merged`` and
    cannot be un-trained: it is returned as it is in ``merged``, with a warning naming it (take
    those entries from the base params you trained from).  A zero entry of a scale is an error
    (that output column of ``K`` is lost); under ``jax.jit`` the scale is a tracer and cannot be
    checked, so that column comes back NaN instead (check ``scale != 0`` before, or unmerge
    outside jit).  Example: :func:`merge`.
    """
    _check_config(config, "unmerge")
    kernels = _kernel_only(adapter) if isinstance(adapter, Mapping) else {}
    if not kernels:
        combined = isinstance(adapter, Mapping) and any(_is_node(leaf) for leaf in jax.tree.leaves(adapter, is_leaf=_is_node))
        raise ValueError(
            "unmerge needs the adapter (the second tree of boft.split(params, config), holding each adapted"
            " layer's {'skew', 'scale'}), but the tree given holds no BOFT layer params"
            + (" (it holds BOFTKernel nodes: the combined params, not the adapter; pass"
               " boft.split(params, config)[1])" if combined else "")
        )
    in_kernels = {jax.tree_util.keystr(kp) for kp, _ in jax.tree_util.tree_leaves_with_path(kernels)}
    trained = [_key_path(kp + ("",)) for kp, _ in jax.tree_util.tree_leaves_with_path(adapter)
               if jax.tree_util.keystr(kp) not in in_kernels]
    if trained:
        warnings.warn(
            f"boft.unmerge: the adapter also trained {len(trained)} entr{'y' if len(trained) == 1 else 'ies'} that"
            f" are not rotated kernels ({', '.join(trained[:5])}{', ...' if len(trained) > 5 else ''}; biases or"
            " modules_to_save): merged params hold their trained values, which are returned as they are, not the"
            " base's; take them from the base params you trained from",
            UserWarning,
            stacklevel=2,
        )
    node_tree = combine(merged, {**kernels})
    return jax.tree_util.tree_map_with_path(
        lambda kp, v: _merge_node(v, config, inverse=True, path=_key_path(kp)) if _is_node(v) else v,
        node_tree,
        is_leaf=_is_node,
    )


def _check_config(config, fn: str) -> None:
    if not isinstance(config, BOFTConfig):
        raise TypeError(f"boft.{fn} needs the adapter's BOFTConfig, got {type(config).__name__}")


def _kernel_only(adapter: Mapping) -> dict:
    out = {}
    for k, v in adapter.items():
        if isinstance(v, Mapping):
            if set(v) == {"skew", "scale"}:
                out[k] = v
            else:
                sub = _kernel_only(v)
                if sub:
                    out[k] = sub
    return out


def count_params(tree) -> int:
    """Total number of scalars in a pytree of arrays (e.g. an adapter from :func:`split`).

    >>> count_params({"skew": jnp.zeros((1, 4, 6)), "scale": jnp.ones((8,))})
    32
    """
    leaves = jax.tree.leaves(tree)
    bad = sorted({type(x).__name__ for x in leaves if not hasattr(x, "shape")})
    if tree is None or bad:
        got = "None" if tree is None else f"a tree with leaves that are not arrays ({', '.join(bad)})"
        raise TypeError(f"boft.count_params expects a tree of arrays (e.g. an adapter from boft.split), got {got}")
    return int(sum(np.prod(jnp.shape(x)) for x in leaves))


def _nodes(tree: Mapping, prefix: tuple = ()):
    """``('/'-joined layer path, BOFTKernel)`` of every adapted layer in params ``tree``, in order."""
    for k, v in tree.items():
        if _is_node(v):
            yield "/".join(prefix), v
        elif isinstance(v, Mapping):
            yield from _nodes(v, prefix + (k,))


def layer_paths(params: Mapping) -> list[str]:
    """'/'-joined paths of the adapted layers in a wrapped model's params."""
    return [path for path, _ in _nodes(params)]


def _check_example_shapes(shapes: Mapping, frozen: Mapping) -> None:
    """The params that the example inputs give the model must have ``frozen``'s shapes: a wrong input
    width shows up as a kernel of another shape, named here as such (not as an adapter made for
    another base model, which is what :func:`combine` would say)."""

    def flat(tree):
        leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=_is_node)
        return {_key_path(kp + ("",)): tuple(jnp.shape(v.kernel if _is_node(v) else v)) for kp, v in leaves}

    got, want = flat(shapes), flat(frozen)
    wrong = [f"{p}: {got[p]} from the example inputs, {want[p]} in frozen" for p in got if p in want and got[p] != want[p]]
    if wrong:
        raise ValueError(
            f"boft.init_adapter: the example inputs give the model params of other shapes than the pretrained ones"
            f" ({len(wrong)}): {'; '.join(wrong[:4])}{'; ...' if len(wrong) > 4 else ''}. Pass example inputs of the"
            " shapes the base model takes (e.g. its input width), or the params of the model being wrapped."
        )


def _check_base_example_shapes(model: BOFTModule, frozen: Mapping, args, kwargs, error: Exception) -> None:
    """After the wrapped model's init failed with ``error``: if the *base* model's params for the same
    example inputs have other shapes than ``frozen``'s, raise that (the inputs are wrong, not the config)."""
    try:
        base = nn.unbox(jax.eval_shape(lambda: model.model.init(jax.random.key(0), *args, **kwargs))["params"])
    except Exception:  # noqa: BLE001 - the base cannot tell either: the caller re-raises the original error
        return
    try:
        _check_example_shapes(base, frozen)
    except ValueError as wrong:
        raise wrong from error


def init_adapter(model: BOFTModule, frozen: Mapping, *args, **kwargs) -> dict:
    """The identity adapter (``M = I``, ``s = 1``) for pretrained ``frozen`` params.

    Traces ``model.init`` abstractly (``jax.eval_shape``: no base weights are initialized) to find
    the adapted layers and their shapes; saved modules and trainable biases start from ``frozen``.

    Args:
      model: the wrapped model.
      frozen: the pretrained base params (base layout).
      *args, **kwargs: example inputs for the model's ``__call__`` (shapes matter, values do not).

    Returns:
      The adapter tree, ready for ``boft.combine(frozen, adapter)`` and an optimizer.
    """
    if not isinstance(model, BOFTModule):
        raise TypeError(
            f"boft.init_adapter expects the wrapped model, boft.wrap(model, config), got {type(model).__name__}"
        )
    _no_boxes(frozen, "init_adapter", "frozen")
    try:
        shapes = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs))["params"])
    except ValueError as e:
        # Example inputs of another width than frozen's can misfit the block structure: say what is wrong
        _check_base_example_shapes(model, frozen, args, kwargs, e)
        raise

    def identity(tree):
        out = {}
        for k, v in tree.items():
            if _is_node(v):
                out[k] = {"skew": jnp.zeros(v.skew.shape, v.skew.dtype), "scale": jnp.ones(v.scale.shape, v.scale.dtype)}
            elif isinstance(v, Mapping):
                sub = identity(v)
                if sub:
                    out[k] = sub
        return out

    _check_example_shapes(shapes, frozen)
    params = combine(frozen, identity(shapes))
    adapter = split(params, model.config)[1]
    cfg = model.config
    if cfg.modules_to_save and not any(
        cfg.saved_ancestor(_key_path(kp)) for kp, _ in jax.tree_util.tree_leaves_with_path(adapter)
    ):
        # a model whose config ties its output head to the embeddings (a T5, as its config says)
        tied = any("lm_head" in p for p in cfg.modules_to_save) and bool(
            getattr(getattr(model.model, "config", None), "tie_word_embeddings", False))
        raise ValueError(
            f"modules_to_save {cfg.modules_to_save} matches no module of the model (e.g. 'classifier' for a ViT"
            " head); nothing would train in full"
            + (". This model has no lm_head module: its config ties the output head to the embeddings (a tied T5"
               " computes its logits with the shared embedding); boft_jax.models.t5.untie_head(module, params)"
               " gives a T5 a separate lm_head to train"
               if tied else "")
        )
    return adapter
