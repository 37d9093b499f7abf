"""Hugging Face model directories <-> Flax params, with no pickle and no network.

A Hugging Face model directory holds ``config.json`` and the weights as one of (first found wins):

- ``model.safetensors``;
- ``model.safetensors.index.json`` naming shards ``model-00001-of-0000N.safetensors``;
- ``flax_model.msgpack``, the legacy format written by transformers' (removed) Flax models.

``pytorch_model.bin`` is a pickle and is never read.

Weights are handled in three steps, each a small function here:

1. ``load_state_dict(path)`` gives a flat ``{torch_key: np.ndarray}`` dict in PyTorch naming and
   layout, whatever the file format (legacy Flax trees are renamed and transposed back to it).
2. ``params_from_state_dict`` checks that dict against the param shapes of our module (computed
   with ``jax.eval_shape``, so there is one source of truth for shapes) and converts it: Linear
   ``(out, in)`` -> Dense kernel ``(in, out)``, Conv2d ``(out, in, kh, kw)`` -> Conv kernel
   ``(kh, kw, in, out)``, LayerNorm/RMSNorm ``weight`` -> ``scale``, Embedding ``weight`` ->
   ``embedding``. Missing, unexpected and mis-shaped keys are reported together in one
   ``ValueError``.
3. ``stack_layers`` turns the ``layer_{i}`` subtrees into one ``layers`` subtree with a leading
   layer axis, the layout of ``scan_layers=True`` models (``unstack_layers`` undoes it).

The model-specific part, which Flax path is which torch key, lives next to each model
(``vit.hf_torch_key``, ``t5.hf_torch_key``). ``save_pretrained`` runs the same steps backwards and
writes files that ``transformers`` loads (legacy transformers-4 key names, which transformers 5
also writes on disk).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import re
import stat
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
FLAX_MSGPACK_NAME = "flax_model.msgpack"
_SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_LAYER_RE = re.compile(r"layer_(\d+)")

# model_type -> the boft_jax.models family that loads it (mT5 is T5 v1.1's architecture)
MODEL_FAMILIES = {"vit": "vit", "t5": "t5", "mt5": "t5"}
SUPPORTED_MODEL_TYPES = tuple(MODEL_FAMILIES)

def _laplace(x: jax.Array, mu: float = 0.707107, sigma: float = 0.282095) -> jax.Array:
    """MEGA's Laplace activation (the normal CDF with mean ``mu``, deviation ``sigma``)."""
    return 0.5 * (1.0 + jax.lax.erf((x - mu) / (sigma * math.sqrt(2.0))))


_gelu_exact = functools.partial(jax.nn.gelu, approximate=False)
_gelu_tanh = functools.partial(jax.nn.gelu, approximate=True)

# Hugging Face activation names (``hidden_act``, ``feed_forward_proj``; transformers' ACT2FN)
# -> JAX functions, written from their published formulas.  "gelu" / "gelu_python" are the exact
# erf GELU; "gelu_new", "gelu_pytorch_tanh", "gelu_python_tanh", "gelu_fast" and "gelu_accurate"
# the tanh approximation (one formula, arranged differently); "gelu_10" the exact GELU clipped to
# [-10, 10]; "leaky_relu" has torch's default slope 0.01.  ACT2FN's "prelu" and "xielu" carry
# learned parameters and are not supported.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": _gelu_exact,
    "gelu_python": _gelu_exact,
    "gelu_10": lambda x: jnp.clip(_gelu_exact(x), -10.0, 10.0),
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_python_tanh": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "gelu_accurate": _gelu_tanh,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "relu2": lambda x: jnp.square(jax.nn.relu(x)),
    "relu6": jax.nn.relu6,
    "leaky_relu": functools.partial(jax.nn.leaky_relu, negative_slope=0.01),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "hardswish": jax.nn.hard_swish,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
    "sqrtsoftplus": lambda x: jnp.sqrt(jax.nn.softplus(x)),
    "laplace": _laplace,
    "linear": lambda x: x,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The JAX function for a Hugging Face activation name, or a ValueError naming the valid ones.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> activation("relu")(jnp.array([-1.0, 2.0])).tolist()
      [0.0, 2.0]
      >>> x = jax.random.normal(jax.random.key(0), (5,))
      >>> bool(jnp.allclose(activation("gelu_new")(x), jax.nn.gelu(x, approximate=True)))
      True
      >>> activation("prelu")
      Traceback (most recent call last):
      ...
      ValueError: unsupported activation 'prelu'; supported: ['gelu', 'gelu_10', ...]
    """
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}"
        ) from None


Path_ = tuple[str, ...]


# --------------------------------------------------------------------------------------------
# Reading a model directory.
# --------------------------------------------------------------------------------------------


def _model_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(
            f"{str(p)!r} does not exist; expected a Hugging Face model directory holding "
            f"{CONFIG_NAME} and {SAFETENSORS_NAME} (or {SAFETENSORS_INDEX_NAME} with its shards, "
            f"or {FLAX_MSGPACK_NAME})"
        )
    if not p.is_dir():
        raise NotADirectoryError(
            f"{str(p)!r} is a file; expected a Hugging Face model directory holding {CONFIG_NAME} "
            f"and the weights"
        )
    return p


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` of a model directory as a dict (FileNotFoundError naming what is missing).

    Example (a tiny random ViT written by :func:`save_pretrained`):
      >>> import os, tempfile, jax, jax.numpy as jnp, numpy as np
      >>> from boft_jax.models import vit
      >>> config = vit.ViTConfig(image_size=8, patch_size=4, hidden_size=8, num_hidden_layers=2,
      ...                        num_attention_heads=2, intermediate_size=16, num_labels=2, id2label=("cat", "dog"))
      >>> shapes = jax.eval_shape(vit.ViT(config).init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
      >>> rng = np.random.default_rng(0)
      >>> params = jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32), shapes)  # as if trained
      >>> with tempfile.TemporaryDirectory() as d:
      ...     save_pretrained(d, config, params)
      ...     cfg = read_config(d)
      >>> cfg["model_type"], cfg["architectures"], cfg["hidden_size"], cfg["id2label"]
      ('vit', ['ViTForImageClassification'], 8, {'0': 'cat', '1': 'dog'})
    """
    p = _model_dir(path)
    cfg = p / CONFIG_NAME
    if not cfg.is_file():
        raise FileNotFoundError(
            f"{str(p)!r} has no {CONFIG_NAME}; found {sorted(x.name for x in p.iterdir())}"
        )
    return _read_json_object(cfg, "a model's config.json")


def refuse_nulls(cls, d: Mapping[str, Any], model: str, nullable: Iterable[str] = ()) -> None:
    """A ``config.json`` dict ``d`` must not set a field of dataclass ``cls`` whose default is a value
    to null (transformers keeps such a null, and its model then fails or reads it as false): a
    ``ValueError`` naming them.  ``nullable``: fields where a null means something."""
    nulls = [f.name for f in dataclasses.fields(cls) if f.name in d and d[f.name] is None and f.default is not None
             and f.name not in nullable]
    if nulls:
        raise ValueError(f"this {model} config.json sets {', '.join(map(repr, nulls))} to null; give a value (or leave"
                         " the key out for its default)")


_SCALAR_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def check_field_types(cls, d: Mapping[str, Any], model: str) -> None:
    """A ``config.json`` dict ``d`` must give each plain-typed field of dataclass ``cls`` (``int``,
    ``float``, ``bool``, ``str``, optionally ``| None``; ``cls`` written with ``from __future__ import
    annotations``, so its field types are those strings) a JSON value of that type: a ``ValueError``
    naming every field that is not (``"hidden_size": "96"`` would otherwise fail deep in the model
    with a message that names no field).  Nulls are :func:`refuse_nulls`'s; fields of other types
    (tuples, unions) are checked where they are read."""
    bad = []
    for f in dataclasses.fields(cls):
        if f.name not in d or d[f.name] is None:
            continue
        kind = str(f.type).removesuffix(" | None")
        allowed = _SCALAR_TYPES.get(kind)
        value = d[f.name]
        if allowed and (not isinstance(value, allowed) or (isinstance(value, bool) and kind != "bool")):
            bad.append(f"{f.name} = {value!r} ({type(value).__name__}; expected {'a number' if kind == 'float' else kind})")
    if bad:
        raise ValueError(f"this {model} config.json gives {len(bad)} field(s) a value of the wrong type: {'; '.join(bad)}")


def _read_json_object(file: Path, what: str) -> dict[str, Any]:
    """A JSON object from ``file``; a ``ValueError`` naming the file when it is not one."""
    try:
        with open(file, encoding="utf-8") as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(file)!r} is not readable JSON ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{str(file)!r} holds a JSON {type(obj).__name__}, not the object {what} is")
    return obj


def model_type(path: str | os.PathLike) -> str:
    """``model_type`` from ``config.json``, checked against the supported ones.

    Example:
      >>> import json, tempfile
      >>> def config_dir(d, **config):
      ...     (Path(d) / "config.json").write_text(json.dumps(config))
      ...     return d
      >>> with tempfile.TemporaryDirectory() as d:
      ...     mt = model_type(config_dir(d, model_type="mt5"))
      >>> mt, MODEL_FAMILIES[mt]          # mT5 loads with boft_jax.models.t5
      ('mt5', 't5')
      >>> with tempfile.TemporaryDirectory() as d:
      ...     model_type(config_dir(d, model_type="bert"))
      Traceback (most recent call last):
      ...
      ValueError: '...': config.json has model_type='bert'; supported model types: ['vit', 't5', 'mt5']
    """
    cfg = read_config(path)
    mt = cfg.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{os.fspath(path)!r}: config.json has model_type={mt!r}; supported model types: "
            f"{list(SUPPORTED_MODEL_TYPES)}"
        )
    return mt


def check_model_type(path: str | os.PathLike, config: Mapping[str, Any], expected: str | tuple[str, ...]) -> None:
    """A ``ValueError`` unless ``config["model_type"]`` is ``expected`` (one name or a tuple of them);
    ``path`` is only named in the message.

    Example:
      >>> check_model_type("ckpt", {"model_type": "mt5"}, ("t5", "mt5"))   # passes, returns None
      >>> check_model_type("ckpt", {"model_type": "vit"}, ("t5", "mt5"))
      Traceback (most recent call last):
      ...
      ValueError: 'ckpt': config.json has model_type='vit', but this loader reads 't5' or 'mt5' models; ...
    """
    mt = config.get("model_type")
    expected = (expected,) if isinstance(expected, str) else tuple(expected)
    if mt not in expected:
        reads = " or ".join(repr(e) for e in expected)
        raise ValueError(
            f"{os.fspath(path)!r}: config.json has model_type={mt!r}, but this loader reads "
            f"{reads} models; boft_jax.models.from_pretrained dispatches on model_type "
            f"(supported: {list(SUPPORTED_MODEL_TYPES)})"
        )


@contextlib.contextmanager
def safetensors_errors(file: str | os.PathLike):
    """Reading ``file`` inside this block: any failure of the safetensors library (truncated, a
    damaged header, not safetensors, bad dtypes) becomes a ``ValueError`` naming the file.

    Example:
      >>> import os, tempfile
      >>> from safetensors.numpy import load_file
      >>> with tempfile.TemporaryDirectory() as d:
      ...     bad = os.path.join(d, "model.safetensors")
      ...     with open(bad, "wb") as f:
      ...         _ = f.write(b"not a safetensors file")
      ...     with safetensors_errors(bad):
      ...         load_file(bad)
      Traceback (most recent call last):
      ...
      ValueError: '.../model.safetensors' is not a readable safetensors file: ...
    """
    try:
        yield
    except Exception as e:  # SafetensorError and whatever else the reader raises
        raise ValueError(f"{os.fspath(file)!r} is not a readable safetensors file: {e}") from None


def _load_safetensors(file: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file  # the `train` extra; imported only when needed

    with safetensors_errors(file):
        return dict(load_file(os.fspath(file)))


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Weights of a model directory as ``{torch_key: array}`` in PyTorch naming and layout.

    Reads ``model.safetensors``, else the sharded ``model.safetensors.index.json``, else the legacy
    ``flax_model.msgpack`` (converted with ``state_dict_from_flax_legacy``). Arrays keep their
    stored dtype.

    Example (a tiny random ViT written by :func:`save_pretrained`; Linear weights are ``(out, in)``):
      >>> import os, tempfile, jax, jax.numpy as jnp, numpy as np
      >>> from boft_jax.models import vit
      >>> config = vit.ViTConfig(image_size=8, patch_size=4, hidden_size=8, num_hidden_layers=2,
      ...                        num_attention_heads=2, intermediate_size=16, num_labels=2, id2label=("cat", "dog"))
      >>> shapes = jax.eval_shape(vit.ViT(config).init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
      >>> rng = np.random.default_rng(0)
      >>> params = jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32), shapes)  # as if trained
      >>> with tempfile.TemporaryDirectory() as d:
      ...     save_pretrained(d, config, params)
      ...     state = load_state_dict(d)
      >>> weight = state["vit.encoder.layer.0.intermediate.dense.weight"]
      >>> weight.shape, weight.dtype, params["encoder"]["layer_0"]["mlp"]["fc1"]["kernel"].shape
      ((16, 8), dtype('float32'), (8, 16))
      >>> bool(np.array_equal(weight, params["encoder"]["layer_0"]["mlp"]["fc1"]["kernel"].T))
      True
    """
    p = _model_dir(path)
    single, index, msgpack = p / SAFETENSORS_NAME, p / SAFETENSORS_INDEX_NAME, p / FLAX_MSGPACK_NAME
    if single.is_file():
        return _load_safetensors(single)
    if index.is_file():
        weight_map = _read_json_object(index, "a safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{str(index)!r} has no 'weight_map' object of tensor name -> shard file name")
        files = sorted(set(weight_map.values()))
        absent = [name for name in files if not (p / name).is_file()]
        if absent:
            raise FileNotFoundError(f"{str(index)!r} names shards that are not in {str(p)!r}: {absent}")
        state: dict[str, np.ndarray] = {}
        for name in files:
            state.update(_load_safetensors(p / name))
        lost = sorted(k for k in weight_map if k not in state)
        if lost:
            raise ValueError(f"{str(index)!r} maps keys that its shards do not hold: {lost}")
        return state
    if msgpack.is_file():
        from flax.serialization import msgpack_restore  # msgpack, not pickle

        try:
            tree = msgpack_restore(msgpack.read_bytes())
        except Exception as e:  # truncated or not msgpack
            raise ValueError(f"{str(msgpack)!r} is not a readable Flax msgpack file: {e}") from None
        if not isinstance(tree, dict):
            raise ValueError(
                f"{str(msgpack)!r} holds a msgpack {type(tree).__name__}, not a Flax parameter tree (a nested map of arrays)"
            )
        try:
            return state_dict_from_flax_legacy(tree)
        except (TypeError, AttributeError, ValueError) as e:
            raise ValueError(f"{str(msgpack)!r} is not a Flax parameter tree of arrays: {e}") from None
    found = sorted(x.name for x in p.iterdir())
    hint = ""
    if any(name.endswith((".bin", ".pt", ".pth", ".ckpt")) for name in found):
        hint = (
            " (PyTorch .bin/.pt files are pickles, which boft_jax never loads; convert them with "
            "transformers: `AutoModel.from_pretrained(path).save_pretrained(path)` writes "
            "model.safetensors)"
        )
    raise FileNotFoundError(
        f"{str(p)!r} holds no weights boft_jax can read: expected {SAFETENSORS_NAME}, "
        f"{SAFETENSORS_INDEX_NAME} with its shards, or {FLAX_MSGPACK_NAME}; found {found}{hint}"
    )


def state_dict_from_flax_legacy(tree: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Legacy transformers Flax param tree -> ``{torch_key: array}`` in PyTorch layout.

    transformers' Flax models used the PyTorch module names as tree keys (e.g.
    ``vit/encoder/layer/0/attention/attention/query/kernel``,
    ``encoder/block/0/layer/0/SelfAttention/q/kernel``), with Flax leaf names and layouts:
    ``kernel`` (Dense ``(in, out)``, Conv ``(kh, kw, in, out)``), ``scale`` (LayerNorm),
    ``embedding`` (Embed), and ``weight`` for T5's layer norm. A top-level ``{"params": ...}``
    wrapper is accepted.

    Example:
      >>> import numpy as np
      >>> tree = {"vit": {"encoder": {"layer": {"0": {"output": {"dense": {"kernel": np.zeros((16, 8)),
      ...                                                             "bias": np.zeros(8)}}}}},
      ...                 "layernorm": {"scale": np.ones(8), "bias": np.zeros(8)}}}
      >>> {k: v.shape for k, v in state_dict_from_flax_legacy({"params": tree}).items()}
      {'vit.encoder.layer.0.output.dense.weight': (8, 16), 'vit.encoder.layer.0.output.dense.bias': (8,),
       'vit.layernorm.weight': (8,), 'vit.layernorm.bias': (8,)}
    """
    if set(tree) == {"params"}:
        tree = tree["params"]
    state = {}
    for path, value in _flatten(tree).items():
        *parents, leaf = path
        value = np.asarray(value)
        if leaf == "kernel":
            leaf, value = "weight", _kernel_to_torch(value, "/".join(path))
        elif leaf in ("scale", "embedding"):
            leaf = "weight"
        state[".".join((*parents, leaf))] = value
    return state


# --------------------------------------------------------------------------------------------
# Layout conversion.
# --------------------------------------------------------------------------------------------


def _kernel_to_torch(kernel: np.ndarray, where: str) -> np.ndarray:
    if kernel.ndim == 2:  # Dense (in, out) -> Linear (out, in)
        return kernel.T
    if kernel.ndim == 4:  # Conv (kh, kw, in, out) -> Conv2d (out, in, kh, kw)
        return kernel.transpose(3, 2, 0, 1)
    raise ValueError(f"{where}: kernel of rank {kernel.ndim}; only Dense (2) and Conv2d (4) are handled")


def _kernel_from_torch(weight: np.ndarray) -> np.ndarray:
    if weight.ndim == 2:
        return weight.T
    return weight.transpose(2, 3, 1, 0)


def to_torch_layout(path: Path_, value: np.ndarray) -> np.ndarray:
    """Our leaf at ``path`` in the layout of the torch tensor it corresponds to.

    Example (Dense ``(in, out)`` -> Linear ``(out, in)``; Conv ``(kh, kw, in, out)`` -> Conv2d
    ``(out, in, kh, kw)``; leaves other than ``kernel`` unchanged):
      >>> import numpy as np
      >>> to_torch_layout(("mlp", "fc1", "kernel"), np.zeros((8, 16))).shape
      (16, 8)
      >>> to_torch_layout(("patch_embeddings", "kernel"), np.zeros((4, 4, 3, 8))).shape
      (8, 3, 4, 4)
      >>> to_torch_layout(("mlp", "fc1", "bias"), np.zeros(16)).shape
      (16,)
    """
    value = np.asarray(value)
    return _kernel_to_torch(value, "/".join(path)) if path[-1] == "kernel" else value


def from_torch_layout(path: Path_, value: np.ndarray) -> np.ndarray:
    """A torch tensor in the layout of our leaf at ``path`` (inverse of ``to_torch_layout``).

    Example:
      >>> import jax, numpy as np
      >>> conv = np.asarray(jax.random.normal(jax.random.key(0), (4, 4, 3, 8)))   # (kh, kw, in, out)
      >>> torch_weight = to_torch_layout(("patch_embeddings", "kernel"), conv)
      >>> torch_weight.shape, from_torch_layout(("patch_embeddings", "kernel"), torch_weight).shape
      ((8, 3, 4, 4), (4, 4, 3, 8))
      >>> bool(np.array_equal(from_torch_layout(("patch_embeddings", "kernel"), torch_weight), conv))
      True
    """
    return _kernel_from_torch(value) if path[-1] == "kernel" else value


def _torch_shape(path: Path_, shape: tuple[int, ...]) -> tuple[int, ...]:
    if path[-1] != "kernel":
        return tuple(shape)
    if len(shape) == 2:
        return (shape[1], shape[0])
    return (shape[3], shape[2], shape[0], shape[1])


# --------------------------------------------------------------------------------------------
# Trees.
# --------------------------------------------------------------------------------------------


def _flatten(tree: Mapping[str, Any], prefix: Path_ = ()) -> dict[Path_, Any]:
    out: dict[Path_, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, (*prefix, str(key))))
        else:
            out[(*prefix, str(key))] = value
    return out


def _unflatten(flat: Mapping[Path_, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def flatten_params(params: Mapping[str, Any]) -> dict[Path_, Any]:
    """``{path_tuple: leaf}`` of a params tree (a top-level ``{"params": ...}`` is unwrapped).

    Example:
      >>> import numpy as np
      >>> tree = {"params": {"dense": {"kernel": np.zeros((4, 3)), "bias": np.zeros(3)}, "scale": np.ones(())}}
      >>> {path: leaf.shape for path, leaf in flatten_params(tree).items()}
      {('dense', 'kernel'): (4, 3), ('dense', 'bias'): (3,), ('scale',): ()}
    """
    if set(params) == {"params"}:
        params = params["params"]
    return _flatten(params)


def stack_layers(params: Mapping[str, Any]) -> dict[str, Any]:
    """``.../layer_{i}/...`` subtrees -> one ``.../layers/...`` subtree, layer axis first.

    This is the param layout of models built with ``scan_layers=True``.

    Example (:func:`unstack_layers` undoes it):
      >>> import numpy as np
      >>> params = {"encoder": {"layer_0": {"w": np.zeros((2, 3))}, "layer_1": {"w": np.ones((2, 3))}},
      ...           "head": {"w": np.ones(3)}}
      >>> stacked = stack_layers(params)
      >>> stacked["encoder"]["layers"]["w"].shape, stacked["head"]["w"].shape
      ((2, 2, 3), (3,))
      >>> back = unstack_layers(stacked)
      >>> sorted(back["encoder"]), bool(np.array_equal(back["encoder"]["layer_1"]["w"], np.ones((2, 3))))
      (['layer_0', 'layer_1'], True)
    """
    groups: dict[tuple[Path_, Path_], dict[int, Any]] = {}
    flat: dict[Path_, Any] = {}
    for path, value in flatten_params(params).items():
        hit = next((j for j, key in enumerate(path) if _LAYER_RE.fullmatch(key)), None)
        if hit is None:
            flat[path] = value
            continue
        index = int(_LAYER_RE.fullmatch(path[hit]).group(1))
        groups.setdefault((path[:hit], path[hit + 1:]), {})[index] = value
    for (head, tail), by_index in groups.items():
        if sorted(by_index) != list(range(len(by_index))):
            raise ValueError(f"{'/'.join(head)}: layers {sorted(by_index)} are not 0..n-1")
        stack = np if all(isinstance(v, np.ndarray) for v in by_index.values()) else jax.numpy
        flat[(*head, "layers", *tail)] = stack.stack([by_index[i] for i in range(len(by_index))])
    return _unflatten(flat)


def unstack_layers(params: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of ``stack_layers``: ``.../layers/...`` (layer axis first) -> ``.../layer_{i}/...``.

    Example:
      >>> import numpy as np
      >>> stacked = {"encoder": {"layers": {"w": np.arange(6).reshape(3, 2)}}}   # 3 layers
      >>> {name: sub["w"].tolist() for name, sub in unstack_layers(stacked)["encoder"].items()}
      {'layer_0': [0, 1], 'layer_1': [2, 3], 'layer_2': [4, 5]}
      >>> again = stack_layers(unstack_layers(stacked))
      >>> bool(np.array_equal(again["encoder"]["layers"]["w"], stacked["encoder"]["layers"]["w"]))
      True
    """
    flat: dict[Path_, Any] = {}
    for path, value in flatten_params(params).items():
        if "layers" not in path:
            flat[path] = value
            continue
        j = path.index("layers")
        for i in range(value.shape[0]):
            flat[(*path[:j], f"layer_{i}", *path[j + 1:])] = value[i]
    return _unflatten(flat)


# --------------------------------------------------------------------------------------------
# Checking and converting.
# --------------------------------------------------------------------------------------------


def _fmt(items: list[str], limit: int = 40) -> str:
    shown = "\n    ".join(items[:limit])
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"\n    {shown}{more}"


def params_from_state_dict(
    state: Mapping[str, np.ndarray],
    expected: Mapping[Path_, tuple[int, ...]],
    torch_key: Callable[[Path_], str],
    *,
    aliases: Iterable[tuple[str, str]] = (),
    ignore: Iterable[str] = (),
    source: str = "checkpoint",
) -> dict[str, Any]:
    """Convert a torch-layout state dict to an (unrolled) Flax params tree of numpy arrays.

    Args:
      state: ``{torch_key: array}``, e.g. from ``load_state_dict``.
      expected: ``{flax_path: shape}`` of the module's params (unrolled layout).
      torch_key: maps a Flax path to its torch key.
      aliases: ``(regex, replacement)`` pairs applied (``re.sub``, in order) to incoming keys
        first, e.g. transformers-5 module names -> transformers-4 ones.
      ignore: regexes (``re.fullmatch``) for incoming keys that are known and unused.
      source: where ``state`` came from, for error messages.

    Raises:
      ValueError listing every missing key (with its expected shape), unexpected key, and
      mis-shaped key (with both shapes).

    Example (the state dict of a tiny random ViT, from :func:`state_dict_from_params`):
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from boft_jax.models import vit
      >>> config = vit.ViTConfig(image_size=8, patch_size=4, hidden_size=8, num_hidden_layers=2,
      ...                        num_attention_heads=2, intermediate_size=16, num_labels=2, id2label=("cat", "dog"))
      >>> shapes = jax.eval_shape(vit.ViT(config).init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
      >>> rng = np.random.default_rng(0)
      >>> params = jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32), shapes)  # as if trained
      >>> state = state_dict_from_params(params, vit.param_shapes(config), vit.hf_torch_key)
      >>> back = params_from_state_dict(state, vit.param_shapes(config), vit.hf_torch_key)
      >>> back["encoder"]["layer_0"]["mlp"]["fc1"]["kernel"].shape   # Linear (16, 8) -> Dense (8, 16)
      (8, 16)
      >>> all(bool(np.array_equal(a, b)) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)))
      True
      >>> del state["classifier.bias"]
      >>> state["vit.extra.weight"] = np.zeros(3)
      >>> params_from_state_dict(state, vit.param_shapes(config), vit.hf_torch_key, source="my checkpoint")
      Traceback (most recent call last):
      ...
      ValueError: my checkpoint does not match the model:
        missing keys (1):
          classifier.bias (expected shape (2,))
        unexpected keys (1):
          vit.extra.weight (shape (3,))
    """
    canonical: dict[str, np.ndarray] = {}
    for key, value in state.items():
        for pattern, repl in aliases:
            key = re.sub(pattern, repl, key)
        canonical[key] = value
    ignore = [re.compile(p) for p in ignore]
    wanted = {torch_key(path): path for path in expected}

    missing, misshaped, flat = [], [], {}
    for key, path in sorted(wanted.items()):
        want = _torch_shape(path, expected[path])
        if key not in canonical:
            missing.append(f"{key} (expected shape {want})")
            continue
        value = canonical[key]
        if tuple(value.shape) != want:
            misshaped.append(f"{key}: got {tuple(value.shape)}, expected {want}")
            continue
        flat[path] = np.ascontiguousarray(from_torch_layout(path, np.asarray(value)))
    unexpected = sorted(
        f"{k} (shape {tuple(v.shape)})"
        for k, v in canonical.items()
        if k not in wanted and not any(p.fullmatch(k) for p in ignore)
    )
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}):{_fmt(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}):{_fmt(unexpected)}")
        if misshaped:
            parts.append(f"mis-shaped keys ({len(misshaped)}):{_fmt(misshaped)}")
        raise ValueError(f"{source} does not match the model:\n  " + "\n  ".join(parts))
    return _unflatten(flat)


def state_dict_from_params(
    params: Mapping[str, Any],
    expected: Mapping[Path_, tuple[int, ...]],
    torch_key: Callable[[Path_], str],
) -> dict[str, np.ndarray]:
    """Flax params (unrolled or stacked) -> ``{torch_key: np.ndarray}`` in PyTorch layout.

    Raises ValueError if ``params`` has leaves the model does not (e.g. adapter params: merge
    them first), lacks some, or has other shapes.

    Example (a tiny random ViT):
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from boft_jax.models import vit
      >>> config = vit.ViTConfig(image_size=8, patch_size=4, hidden_size=8, num_hidden_layers=2,
      ...                        num_attention_heads=2, intermediate_size=16, num_labels=2, id2label=("cat", "dog"))
      >>> shapes = jax.eval_shape(vit.ViT(config).init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
      >>> rng = np.random.default_rng(0)
      >>> params = jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32), shapes)  # as if trained
      >>> state = state_dict_from_params(params, vit.param_shapes(config), vit.hf_torch_key)
      >>> len(state), state["vit.embeddings.patch_embeddings.projection.weight"].shape   # Conv2d (out, in, kh, kw)
      (40, (8, 3, 4, 4))
      >>> type(state["classifier.weight"]).__name__, state["classifier.weight"].shape
      ('ndarray', (2, 8))
    """
    flat = flatten_params(params)
    not_arrays = sorted(
        f"{'/'.join(p)} ({type(v).__name__})" for p, v in flat.items() if not isinstance(v, (np.ndarray, np.generic, jax.Array))
    )
    if not_arrays:
        raise ValueError(
            "params hold leaves that are not arrays (BOFT adapter nodes? fold them into the kernels "
            f"with boft.merge(params, config) first):{_fmt(not_arrays)}"
        )
    flat = flatten_params(unstack_layers(params))
    missing = sorted("/".join(p) + f" (expected shape {expected[p]})" for p in expected if p not in flat)
    extra = sorted("/".join(p) + f" (shape {tuple(np.shape(v))})" for p, v in flat.items() if p not in expected)
    wrong = sorted(
        "/".join(p) + f": got {tuple(np.shape(v))}, expected {expected[p]}"
        for p, v in flat.items()
        if p in expected and tuple(np.shape(v)) != tuple(expected[p])
    )
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"missing params ({len(missing)}):{_fmt(missing)}")
        if extra:
            parts.append(
                f"unexpected params ({len(extra)}; adapter params must be merged first):{_fmt(extra)}"
            )
        if wrong:
            parts.append(f"mis-shaped params ({len(wrong)}):{_fmt(wrong)}")
        raise ValueError("params do not match the model:\n  " + "\n  ".join(parts))
    return {
        torch_key(path): np.ascontiguousarray(to_torch_layout(path, np.asarray(value)))
        for path, value in flat.items()
    }


def param_shapes(module: Any, *init_args: Any) -> dict[Path_, tuple[int, ...]]:
    """``{path: shape}`` of ``module.init(key, *init_args)["params"]``, traced, never run.

    Example (shape structs are enough as inputs):
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> param_shapes(nn.Dense(3), jax.ShapeDtypeStruct((1, 4), jnp.float32))
      {('bias',): (3,), ('kernel',): (4, 3)}
    """
    variables = jax.eval_shape(lambda *args: module.init(jax.random.key(0), *args), *init_args)
    return {path: tuple(leaf.shape) for path, leaf in flatten_params(variables["params"]).items()}


# --------------------------------------------------------------------------------------------
# Writing.
# --------------------------------------------------------------------------------------------


def _atomic_write(target: Path, write: Callable[[str], None]) -> None:
    """Write ``target`` through a temp file in its directory and ``os.replace``.

    The temp file is created with mode ``0o666`` less the umask, as ``open`` would create
    ``target`` (``tempfile.mkstemp`` makes ``0o600`` files: a model directory only its writer
    could read)."""
    tmp = str(target.parent / f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_safetensors(tensors: Mapping[str, np.ndarray], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.numpy.save_file`` (arrays made contiguous: it ignores strides) with the file
    mode a plain ``open`` gives: a new file gets ``0o666`` less the umask, an existing one keeps its
    mode (``save_file`` itself makes ``0o600`` files, which only their writer can read)."""
    from safetensors.numpy import save_file

    path = os.fspath(path)
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o666))
    mode = stat.S_IMODE(os.stat(path).st_mode)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path, metadata=metadata)
    os.chmod(path, mode)


def write_json(target: Path, data: Any) -> None:
    """Write ``data`` as indented JSON with sorted keys to ``target``, atomically (a temporary file
    in the same directory, then ``os.replace``).

    Example:
      >>> import os, tempfile
      >>> with tempfile.TemporaryDirectory() as d:
      ...     write_json(Path(d) / "config.json", {"model_type": "vit", "hidden_size": 8})
      ...     text = (Path(d) / "config.json").read_text()
      ...     files = os.listdir(d)                       # no temporary file left behind
      >>> print(text, end="")
      {
        "hidden_size": 8,
        "model_type": "vit"
      }
      >>> files
      ['config.json']
    """

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")

    _atomic_write(Path(target), write)


def save_state_dict(
    path: str | os.PathLike, state: Mapping[str, np.ndarray], *, max_shard_bytes: int | None = None
) -> list[str]:
    """Write ``{torch_key: array}`` as ``model.safetensors`` (or shards + index) in ``path``.

    Files are written atomically. Weight files of the other layout left in ``path`` by an
    earlier save (``model.safetensors`` vs. ``model.safetensors.index.json`` + shards) are removed
    so they cannot shadow the new ones. Returns the names of the files written.

    Example (:func:`load_state_dict` reads either layout back):
      >>> import os, tempfile, numpy as np
      >>> state = {f"layer.{i}.weight": np.full((16, 16), i, np.float32) for i in range(3)}   # 1 KiB each
      >>> with tempfile.TemporaryDirectory() as d:
      ...     one = save_state_dict(d, state)
      ...     sharded = save_state_dict(d, state, max_shard_bytes=2048)   # replaces model.safetensors
      ...     files = sorted(os.listdir(d))
      ...     back = load_state_dict(d)
      >>> one
      ['model.safetensors']
      >>> sharded
      ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors', 'model.safetensors.index.json']
      >>> files == sorted(sharded)
      True
      >>> all(bool(np.array_equal(back[k], v)) for k, v in state.items())
      True
    """
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt"}  # transformers refuses safetensors files without it
    keys = sorted(state)
    shards: list[list[str]] = [[]]
    size = 0
    for key in keys:
        nbytes = state[key].nbytes
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes

    def write_shard(names: list[str]) -> Callable[[str], None]:
        return lambda tmp: save_safetensors({k: state[k] for k in names}, tmp, metadata)

    if len(shards) == 1:
        written = [SAFETENSORS_NAME]
        _atomic_write(p / SAFETENSORS_NAME, write_shard(shards[0]))
    else:
        n = len(shards)
        written = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for name, names in zip(written, shards):
            _atomic_write(p / name, write_shard(names))
        weight_map = {k: name for name, names in zip(written, shards) for k in names}
        total = int(sum(state[k].nbytes for k in keys))
        write_json(p / SAFETENSORS_INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
        written.append(SAFETENSORS_INDEX_NAME)
    for old in p.iterdir():
        stale = old.name == SAFETENSORS_NAME or old.name == SAFETENSORS_INDEX_NAME or _SHARD_RE.fullmatch(old.name)
        if stale and old.name not in written:
            old.unlink()
    return written


# --------------------------------------------------------------------------------------------
# Entry points, dispatching on the model type.
# --------------------------------------------------------------------------------------------


def _library(model_type_: str):
    from boft_jax.models import t5, vit  # local: vit and t5 import this module

    return {"vit": vit, "t5": t5}[MODEL_FAMILIES[model_type_]]


def _library_for(module_or_config: Any):
    from boft_jax.models import t5, vit

    for lib in (vit, t5):
        if isinstance(module_or_config, (lib.MODULE, lib.CONFIG)):
            return lib
    raise TypeError(
        f"save_pretrained needs a model module or config (ViT, ViTConfig, T5, T5Config); "
        f"got {type(module_or_config).__name__}"
    )


def from_pretrained(path: str | os.PathLike, **kwargs: Any):
    """Load a Hugging Face model directory: ``(module, params)``, dispatching on ``model_type``.

    Keyword arguments go to ``vit.from_pretrained`` or ``t5.from_pretrained``.

    Example (a tiny random ViT written by :func:`save_pretrained`, loaded with stacked layers):
      >>> import os, tempfile, jax, jax.numpy as jnp, numpy as np
      >>> from boft_jax.models import vit
      >>> config = vit.ViTConfig(image_size=8, patch_size=4, hidden_size=8, num_hidden_layers=2,
      ...                        num_attention_heads=2, intermediate_size=16, num_labels=2, id2label=("cat", "dog"))
      >>> shapes = jax.eval_shape(vit.ViT(config).init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
      >>> rng = np.random.default_rng(0)
      >>> params = jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32), shapes)  # as if trained
      >>> with tempfile.TemporaryDirectory() as d:
      ...     save_pretrained(d, config, params)
      ...     module, loaded = from_pretrained(d, scan_layers=True)
      >>> type(module).__name__, module.scan_layers, module.config == config
      ('ViT', True, True)
      >>> loaded["encoder"]["layers"]["mlp"]["fc1"]["kernel"].shape   # (layers, in, out)
      (2, 8, 16)
      >>> bool(jnp.array_equal(loaded["encoder"]["layers"]["mlp"]["fc1"]["kernel"][1],
      ...                      params["encoder"]["layer_1"]["mlp"]["fc1"]["kernel"]))
      True
    """
    return _library(model_type(path)).from_pretrained(path, **kwargs)


def save_pretrained(
    path: str | os.PathLike,
    module_or_config: Any,
    params: Mapping[str, Any],
    *,
    max_shard_bytes: int | None = None,
) -> None:
    """Write ``config.json`` + ``model.safetensors`` (torch naming) that transformers loads.

    Args:
      path: directory, created if needed; existing weight files are replaced.
      module_or_config: a ``ViT``/``T5`` module or a ``ViTConfig``/``T5Config``.
      params: the model's params, unrolled or stacked (``scan_layers``); adapter params must be
        merged into the base weights first (``boft.merge``).
      max_shard_bytes: if given, split the weights into shards of at most this size with a
        ``model.safetensors.index.json``, as transformers does.

    Example (a tiny random ViT; :func:`from_pretrained` loads it back exactly):
      >>> import os, tempfile, jax, jax.numpy as jnp, numpy as np
      >>> from boft_jax.models import vit
      >>> config = vit.ViTConfig(image_size=8, patch_size=4, hidden_size=8, num_hidden_layers=2,
      ...                        num_attention_heads=2, intermediate_size=16, num_labels=2, id2label=("cat", "dog"))
      >>> shapes = jax.eval_shape(vit.ViT(config).init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
      >>> rng = np.random.default_rng(0)
      >>> params = jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32), shapes)  # as if trained
      >>> with tempfile.TemporaryDirectory() as d:
      ...     save_pretrained(d, config, params)              # the module, vit.ViT(config), works too
      ...     files = sorted(os.listdir(d))
      ...     module, loaded = from_pretrained(d)
      >>> files
      ['config.json', 'model.safetensors']
      >>> module.config == config
      True
      >>> all(bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)))
      True
      >>> with tempfile.TemporaryDirectory() as d:
      ...     save_pretrained(d, config, params, max_shard_bytes=4096)
      ...     files = sorted(os.listdir(d))
      >>> files
      ['config.json', 'model-00001-of-...safetensors', ..., 'model.safetensors.index.json']
    """
    lib = _library_for(module_or_config)
    config = getattr(module_or_config, "config", module_or_config)
    state = lib.hf_state_dict(config, params)
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    save_state_dict(p, state, max_shard_bytes=max_shard_bytes)
    write_json(p / CONFIG_NAME, config.to_hf_dict())
