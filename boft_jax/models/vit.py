"""Vision Transformer for image classification, numerically equal to Hugging Face's
``ViTForImageClassification``.

Inputs are NHWC: ``pixel_values`` of shape ``(batch, height, width, channels)`` (transpose
Hugging Face's NCHW ``pixel_values`` with ``x.transpose(0, 2, 3, 1)``).

Param tree (unrolled). With ``scan_layers=True`` the ``layer_{i}`` subtrees are one ``layers``
subtree whose leaves carry a leading layer axis; outputs are identical::

    embeddings/patch_embeddings/{kernel (p, p, C, D), bias}      nn.Conv
    embeddings/cls_token (1, 1, D)
    embeddings/position_embeddings (1, 1 + num_patches, D)
    encoder/layer_{i}/layernorm_before/{scale, bias}
    encoder/layer_{i}/attention/{query,key,value,out}/{kernel, bias}  nn.Dense
    encoder/layer_{i}/layernorm_after/{scale, bias}
    encoder/layer_{i}/mlp/{fc1,fc2}/{kernel, bias}                     nn.Dense
    layernorm/{scale, bias}
    classifier/{kernel, bias}                                          nn.Dense

Example::

    module, params = vit.from_pretrained("path/to/vit")
    logits = module.apply({"params": params}, pixel_values_nhwc)
    # BOFT on the attention query/value projections:
    targets = vit.TARGET_PRESETS["attention_qv"]
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import warnings
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from boft_jax.models import hf

Dtype = Any

# Regexes for BOFT targets, matched against the '/'-joined module path P of each nn.Dense as
# re.search(rf"(?:^|/)(?:{pattern})$", P); they match the same layers with and without
# scan_layers. "all_linear" leaves out the classifier head (and the patch embedding, a Conv).
TARGET_PRESETS: dict[str, str] = {
    "attention_qv": r"attention/(?:query|value)",
    "attention": r"attention/(?:query|key|value|out)",
    "mlp": r"mlp/(?:fc1|fc2)",
    "all_linear": r"attention/(?:query|key|value|out)|mlp/(?:fc1|fc2)",
}


def _pair(x: Any) -> tuple[int, int]:
    return (int(x[0]), int(x[1])) if isinstance(x, (list, tuple)) else (int(x), int(x))


_PROBLEM_TYPES = (None, "regression", "single_label_classification", "multi_label_classification")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """The fields of Hugging Face's ``ViTConfig`` that define ``ViTForImageClassification``."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    layer_norm_eps: float = 1e-12
    image_size: tuple[int, int] = (224, 224)
    patch_size: tuple[int, int] = (16, 16)
    num_channels: int = 3
    qkv_bias: bool = True
    # width of one attention head; None: hidden_size // num_attention_heads (transformers >= 5 reads
    # a head_dim key; query/key/value then map hidden_size -> heads * head_dim, out maps it back)
    head_dim: int | None = None
    num_labels: int = 2
    id2label: tuple[str, ...] | None = None  # class names, index = label id
    # transformers' loss for the head (None: inferred from num_labels and the label dtype); kept so
    # that save_pretrained writes it back (the logits do not depend on it)
    problem_type: str | None = None

    def __post_init__(self):
        if self.problem_type not in _PROBLEM_TYPES:
            raise ValueError(f"ViTConfig.problem_type must be one of {list(_PROBLEM_TYPES)}, got {self.problem_type!r}")
        object.__setattr__(self, "image_size", _pair(self.image_size))
        object.__setattr__(self, "patch_size", _pair(self.patch_size))
        if self.id2label is not None:
            object.__setattr__(self, "id2label", tuple(self.id2label))
            if len(self.id2label) != self.num_labels:
                raise ValueError(f"id2label has {len(self.id2label)} names for {self.num_labels} labels")
        if self.num_attention_heads < 1 or self.attention_head_dim < 1:
            raise ValueError(
                f"ViTConfig: num_attention_heads {self.num_attention_heads} with head_dim {self.head_dim} and"
                f" hidden_size {self.hidden_size} gives heads of width {self.attention_head_dim}; give at least"
                " one head of width >= 1 (head_dim None means hidden_size // num_attention_heads)"
            )
        hf.activation(self.hidden_act)  # validates the name

    @property
    def attention_head_dim(self) -> int:
        """The width of one head: ``head_dim``, or ``hidden_size // num_attention_heads`` (as
        transformers >= 5; transformers 4 refuses a hidden_size that heads do not divide)."""
        if self.head_dim is not None:
            return int(self.head_dim)
        return self.hidden_size // max(self.num_attention_heads, 1)

    @property
    def label_names(self) -> tuple[str, ...]:
        """``id2label``, or transformers' default names ``LABEL_0, LABEL_1, ...`` without one."""
        return self.id2label or tuple(f"LABEL_{i}" for i in range(self.num_labels))

    @property
    def grid_size(self) -> tuple[int, int]:
        """The patch grid ``(H // ph, W // pw)`` of ``image_size``."""
        (h, w), (ph, pw) = self.image_size, self.patch_size
        return h // ph, w // pw

    @property
    def num_patches(self) -> int:
        gh, gw = self.grid_size
        return gh * gw

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> "ViTConfig":
        """From a Hugging Face ``config.json`` dict (unknown keys are ignored)."""
        hf.refuse_nulls(cls, d, "ViT")
        hf.check_field_types(cls, d, "ViT")  # before num_labels is read below
        id2label = d.get("id2label")
        if id2label:
            labels = tuple(str(id2label[k]) for k in sorted(id2label, key=int))
            num_labels = len(labels)
        elif id2label is not None:  # {}: no labels, as transformers reads it (a headless model)
            labels, num_labels = None, 0
        else:
            labels, num_labels = None, int(d.get("num_labels", 2))
        kwargs = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}
        kwargs.update(num_labels=num_labels, id2label=labels)
        return cls(**kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        """A ``config.json`` dict that transformers' ``ViTForImageClassification`` loads."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        labels = self.label_names
        d.update(
            model_type="vit",
            architectures=["ViTForImageClassification"],
            image_size=list(self.image_size) if self.image_size[0] != self.image_size[1] else self.image_size[0],
            patch_size=list(self.patch_size) if self.patch_size[0] != self.patch_size[1] else self.patch_size[0],
            id2label={str(i): name for i, name in enumerate(labels)},
            label2id={name: i for i, name in enumerate(labels)},
            initializer_range=0.02,
        )
        d.pop("num_labels")  # transformers derives it from id2label
        if d["problem_type"] is None:
            del d["problem_type"]  # transformers' default: inferred from the labels
        if d["head_dim"] is None:
            del d["head_dim"]  # transformers' default: hidden_size // num_attention_heads
        return d


class ViTAttention(nn.Module):
    """Multi-head self-attention with separate ``query``/``key``/``value``/``out`` Dense layers."""

    config: ViTConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        """x: (batch, tokens, hidden) -> (batch, tokens, hidden)."""
        cfg = self.config
        heads, head_dim = cfg.num_attention_heads, cfg.attention_head_dim
        inner = heads * head_dim  # hidden_size unless head_dim says otherwise
        split = lambda y: y.reshape(*y.shape[:-1], heads, head_dim)
        q = split(nn.Dense(inner, use_bias=cfg.qkv_bias, dtype=self.dtype, name="query")(x))
        k = split(nn.Dense(inner, use_bias=cfg.qkv_bias, dtype=self.dtype, name="key")(x))
        v = split(nn.Dense(inner, use_bias=cfg.qkv_bias, dtype=self.dtype, name="value")(x))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (head_dim**-0.5)
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(self.dtype)
        probs = nn.Dropout(cfg.attention_probs_dropout_prob)(probs, deterministic=deterministic)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(*x.shape[:-1], heads * head_dim)
        return nn.Dense(cfg.hidden_size, dtype=self.dtype, name="out")(out)


class ViTMLP(nn.Module):
    config: ViTConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        x = nn.Dense(cfg.intermediate_size, dtype=self.dtype, name="fc1")(x)
        x = hf.activation(cfg.hidden_act)(x)
        return nn.Dense(cfg.hidden_size, dtype=self.dtype, name="fc2")(x)


class ViTLayer(nn.Module):
    """Pre-LN transformer block. Returns ``(x, None)`` so that it can be ``nn.scan``-ned."""

    config: ViTConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> tuple[jax.Array, None]:
        cfg = self.config
        ln = lambda name: nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, use_fast_variance=False, name=name)
        drop = nn.Dropout(cfg.hidden_dropout_prob)
        h = ViTAttention(cfg, self.dtype, name="attention")(ln("layernorm_before")(x), deterministic)
        x = x + drop(h, deterministic=deterministic)
        h = ViTMLP(cfg, self.dtype, name="mlp")(ln("layernorm_after")(x))
        x = x + drop(h, deterministic=deterministic)
        return x, None


class ViTEncoder(nn.Module):
    config: ViTConfig
    dtype: Dtype = jnp.float32
    scan_layers: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        cfg = self.config
        if self.scan_layers:
            layers = nn.scan(
                ViTLayer,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast,),
                length=cfg.num_hidden_layers,
            )
            x, _ = layers(cfg, self.dtype, name="layers")(x, deterministic)
        else:
            for i in range(cfg.num_hidden_layers):
                x, _ = ViTLayer(cfg, self.dtype, name=f"layer_{i}")(x, deterministic)
        return x


def bicubic_matrix(size_in: int, size_out: int) -> np.ndarray:
    """``(size_out, size_in)`` float64 weights of PyTorch's 1-D bicubic resize
    (``F.interpolate(mode="bicubic", align_corners=False)`` given a ``size``).

    Output ``o`` samples the input at ``(o + 0.5) size_in / size_out - 0.5`` with the cubic
    convolution kernel of Keys (``A = -0.75``) on the 4 nearest inputs, indices beyond the edges
    clamped to the edge (border replication); no antialiasing when shrinking.  Each row sums to 1,
    and ``size_in == size_out`` gives the identity exactly.

    Example:
      >>> from boft_jax.models.vit import bicubic_matrix
      >>> bicubic_matrix(3, 3).tolist() == np.eye(3).tolist()
      True
      >>> bool(np.allclose(bicubic_matrix(4, 7).sum(axis=1), 1.0))
      True
    """
    if size_in < 1 or size_out < 1:
        raise ValueError(f"bicubic_matrix needs sizes >= 1, got {size_in} -> {size_out}")
    a = -0.75
    near = lambda t: ((a + 2) * t - (a + 3)) * t * t + 1  # |t| <= 1
    far = lambda t: ((a * t - 5 * a) * t + 8 * a) * t - 4 * a  # 1 < |t| < 2
    out = np.zeros((size_out, size_in))
    for o in range(size_out):
        src = (o + 0.5) * size_in / size_out - 0.5
        base = int(np.floor(src))
        t = src - base
        for tap, weight in zip(range(base - 1, base + 3), (far(1 + t), near(t), near(1 - t), far(2 - t))):
            out[o, min(max(tap, 0), size_in - 1)] += weight
    return out


def resize_bicubic(x: jax.Array, size: tuple[int, int], axes: tuple[int, int] = (0, 1)) -> jax.Array:
    """``x`` resized along ``axes`` to ``size`` by :func:`bicubic_matrix` (PyTorch's bicubic,
    ``align_corners=False``), one axis after the other, in at least float32 at full matmul
    precision; returned in ``x``'s dtype.  The other axes are batch / channels.

    Example:
      >>> resize_bicubic(np.ones((2, 4, 3, 1), np.float32), (6, 5), axes=(1, 2)).shape
      (2, 6, 5, 1)
    """
    acc = jnp.promote_types(jnp.float32, x.dtype)
    y = jnp.moveaxis(jnp.asarray(x, acc), axes, (0, 1))
    rows, cols = (jnp.asarray(bicubic_matrix(n, m), acc) for n, m in zip(y.shape[:2], size))
    hi = jax.lax.Precision.HIGHEST
    y = jnp.einsum("xw,yw...->yx...", cols, jnp.einsum("yh,h...->y...", rows, y, precision=hi), precision=hi)
    return jnp.moveaxis(y, (0, 1), axes).astype(x.dtype)


def interpolate_pos_encoding(position_embeddings: jax.Array, grid: tuple[int, int], new_grid: tuple[int, int]) -> jax.Array:
    """Resize ViT position embeddings to another patch grid, as transformers'
    ``ViTEmbeddings.interpolate_pos_encoding``: the CLS position is kept, the patch positions
    ``(1, gh * gw, D)`` are seen as a ``(gh, gw)`` image of ``D`` channels and resized bicubically
    (:func:`resize_bicubic`) to ``new_grid``.

    Args:
      position_embeddings: ``(1, 1 + gh * gw, D)``.
      grid: ``(gh, gw)``, the grid the embeddings were trained for.
      new_grid: ``(nh, nw)``.

    Returns:
      ``(1, 1 + nh * nw, D)`` in ``position_embeddings``' dtype (resized in at least float32).

    Example:
      >>> import jax.numpy as jnp
      >>> from boft_jax.models.vit import interpolate_pos_encoding
      >>> pos = jnp.arange(17 * 2, dtype=jnp.float32).reshape(1, 17, 2)  # CLS + a 4 x 4 grid, D = 2
      >>> interpolate_pos_encoding(pos, (4, 4), (6, 5)).shape
      (1, 31, 2)
      >>> bool((interpolate_pos_encoding(pos, (4, 4), (4, 4)) == pos).all())
      True
    """
    (gh, gw), (nh, nw) = grid, new_grid
    dim = position_embeddings.shape[-1]
    if position_embeddings.shape != (1, 1 + gh * gw, dim):
        raise ValueError(
            f"position_embeddings has shape {tuple(position_embeddings.shape)}; a ({gh}, {gw}) patch grid needs"
            f" (1, {1 + gh * gw}, D)"
        )
    if (nh, nw) == (gh, gw):
        return position_embeddings
    resized = resize_bicubic(position_embeddings[0, 1:].reshape(gh, gw, dim), (nh, nw)).reshape(1, nh * nw, dim)
    return jnp.concatenate([position_embeddings[:, :1], resized], axis=1)


class ViTEmbeddings(nn.Module):
    config: ViTConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, pixel_values: jax.Array, deterministic: bool = True, interpolate: bool = False
    ) -> jax.Array:
        """pixel_values: (batch, H, W, C) -> tokens (batch, 1 + num_patches, hidden).

        ``interpolate``: resize the position embeddings to the image's patch grid
        (:func:`interpolate_pos_encoding`) when it differs from the configured one.
        """
        cfg = self.config
        batch = pixel_values.shape[0]
        patches = nn.Conv(
            cfg.hidden_size,
            kernel_size=cfg.patch_size,
            strides=cfg.patch_size,
            padding="VALID",
            dtype=self.dtype,
            name="patch_embeddings",
        )(pixel_values)
        new_grid = patches.shape[1:3]
        patches = patches.reshape(batch, -1, cfg.hidden_size)
        init = nn.initializers.truncated_normal(0.02)
        cls = self.param("cls_token", init, (1, 1, cfg.hidden_size))
        pos = self.param("position_embeddings", init, (1, cfg.num_patches + 1, cfg.hidden_size))
        if interpolate:
            pos = interpolate_pos_encoding(pos, cfg.grid_size, new_grid)
        cls = jnp.broadcast_to(cls.astype(self.dtype), (batch, 1, cfg.hidden_size))
        x = jnp.concatenate([cls, patches], axis=1) + pos.astype(self.dtype)
        return nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)


class ViT(nn.Module):
    """``ViTForImageClassification``: logits from the final CLS token.

    Attributes:
      config: the architecture.
      dtype: computation dtype (e.g. ``jnp.bfloat16``); params keep their own dtype, and the
        attention softmax runs in float32.
      scan_layers: put the layers under ``nn.scan`` (params stacked, layer axis first).
    """

    config: ViTConfig
    dtype: Dtype = jnp.float32
    scan_layers: bool = False

    @nn.compact
    def __call__(
        self, pixel_values: jax.Array, *, deterministic: bool = True, interpolate_pos_encoding: bool = False
    ) -> jax.Array:
        """pixel_values: (batch, H, W, C) -> logits (batch, num_labels).

        With ``num_labels == 0`` (no head) returns the final CLS features (batch, hidden).
        Dropout is active when ``deterministic=False`` (pass a ``"dropout"`` rng).
        ``interpolate_pos_encoding=True`` accepts images of another size than ``config.image_size``
        (at least one patch each way; pixels beyond a whole patch are dropped, as by the patch
        convolution) and resizes the position embeddings bicubically to their patch grid, as
        transformers' ``ViTForImageClassification(..., interpolate_pos_encoding=True)``: e.g. a
        checkpoint trained at 224 x 224 finetuned at 384 x 384.
        """
        cfg = self.config
        want = (*cfg.image_size, cfg.num_channels)
        shape = tuple(pixel_values.shape)
        if interpolate_pos_encoding:
            (ph, pw), c = cfg.patch_size, cfg.num_channels
            if len(shape) != 4 or shape[3] != c or shape[1] < ph or shape[2] < pw:
                raise ValueError(
                    f"pixel_values has shape {shape}; expected (batch, H, W, {c}) (NHWC) with H >= {ph} and"
                    f" W >= {pw} (patch_size {cfg.patch_size}) when interpolate_pos_encoding=True"
                )
        elif len(shape) != 4 or shape[1:] != want:
            raise ValueError(
                f"pixel_values has shape {shape}; expected (batch, {want[0]}, "
                f"{want[1]}, {want[2]}) (NHWC, image_size {cfg.image_size}); for another image size pass"
                " interpolate_pos_encoding=True"
            )
        x = ViTEmbeddings(cfg, self.dtype, name="embeddings")(pixel_values, deterministic, interpolate_pos_encoding)
        x = ViTEncoder(cfg, self.dtype, self.scan_layers, name="encoder")(x, deterministic)
        x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, use_fast_variance=False, name="layernorm")(x)
        if cfg.num_labels == 0:
            return x[:, 0]
        return nn.Dense(cfg.num_labels, dtype=self.dtype, name="classifier")(x[:, 0])


# --------------------------------------------------------------------------------------------
# Hugging Face checkpoints.
# --------------------------------------------------------------------------------------------

MODULE, CONFIG = ViT, ViTConfig

# transformers-5 module names (what ViTForImageClassification holds in memory, and what a
# state_dict saved without save_pretrained carries) -> transformers-4 names (what both write).
HF_KEY_ALIASES: tuple[tuple[str, str], ...] = (
    (r"^vit\.layers\.(\d+)\.attention\.q_proj\.", r"vit.encoder.layer.\1.attention.attention.query."),
    (r"^vit\.layers\.(\d+)\.attention\.k_proj\.", r"vit.encoder.layer.\1.attention.attention.key."),
    (r"^vit\.layers\.(\d+)\.attention\.v_proj\.", r"vit.encoder.layer.\1.attention.attention.value."),
    (r"^vit\.layers\.(\d+)\.attention\.o_proj\.", r"vit.encoder.layer.\1.attention.output.dense."),
    (r"^vit\.layers\.(\d+)\.mlp\.fc1\.", r"vit.encoder.layer.\1.intermediate.dense."),
    (r"^vit\.layers\.(\d+)\.mlp\.fc2\.", r"vit.encoder.layer.\1.output.dense."),
    (r"^vit\.layers\.(\d+)\.", r"vit.encoder.layer.\1."),
)
# The inverse: transformers-4 key names -> transformers-5 module names (e.g. for adapters saved
# by PEFT under transformers 5).
HF_KEY_ALIASES_V5: tuple[tuple[str, str], ...] = (
    (r"^vit\.encoder\.layer\.(\d+)\.attention\.attention\.query\.", r"vit.layers.\1.attention.q_proj."),
    (r"^vit\.encoder\.layer\.(\d+)\.attention\.attention\.key\.", r"vit.layers.\1.attention.k_proj."),
    (r"^vit\.encoder\.layer\.(\d+)\.attention\.attention\.value\.", r"vit.layers.\1.attention.v_proj."),
    (r"^vit\.encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"vit.layers.\1.attention.o_proj."),
    (r"^vit\.encoder\.layer\.(\d+)\.intermediate\.dense\.", r"vit.layers.\1.mlp.fc1."),
    (r"^vit\.encoder\.layer\.(\d+)\.output\.dense\.", r"vit.layers.\1.mlp.fc2."),
    (r"^vit\.encoder\.layer\.(\d+)\.", r"vit.layers.\1."),
)
# The pooler of a ViTModel checkpoint is not part of ViTForImageClassification: a known module this
# ViT leaves out (loading it warns; a PEFT adapter on it is refused as such).
HF_LEFT_OUT_KEYS: tuple[str, ...] = (r"vit\.pooler\..*",)
HF_IGNORED_KEYS: tuple[str, ...] = HF_LEFT_OUT_KEYS

_LEAF = {"kernel": "weight", "bias": "bias", "scale": "weight"}
_LAYER_MODULES = {
    "layernorm_before": "layernorm_before",
    "layernorm_after": "layernorm_after",
    "attention/query": "attention.attention.query",
    "attention/key": "attention.attention.key",
    "attention/value": "attention.attention.value",
    "attention/out": "attention.output.dense",
    "mlp/fc1": "intermediate.dense",
    "mlp/fc2": "output.dense",
}


def with_class_names(module: "ViT", class_names: Mapping[Any, str], where: str = "class_names") -> "ViT":
    """``module`` whose config names the classes in ``class_names`` (``{label id: name}``, ids as
    ints or their strings, e.g. an adapter's recorded metadata); the other classes keep their names.

    Example:
      >>> m = with_class_names(ViT(ViTConfig(num_labels=3)), {"0": "five", 2: "seven"})
      >>> m.config.id2label
      ('five', 'LABEL_1', 'seven')
    """
    names = list(module.config.label_names)
    if not isinstance(class_names, Mapping):
        raise ValueError(f"{where}: expected a mapping of label id to class name, got {type(class_names).__name__}")
    for key, name in class_names.items():
        try:
            i = int(key)
        except (TypeError, ValueError):
            i = None
        if i is None or not 0 <= i < len(names) or not isinstance(name, str):
            raise ValueError(
                f"{where}: entry {key!r}: {name!r} is not a label id in 0..{len(names) - 1} with a class name"
                f" (the model has {len(names)} labels)"
            )
        names[i] = name
    return module.clone(config=dataclasses.replace(module.config, id2label=tuple(names)))


def with_image_size(module: "ViT", params: Mapping[str, Any], image_size: int | tuple[int, int]) -> tuple["ViT", dict]:
    """``(module, params)`` for another input size: the config's ``image_size`` set to
    ``image_size`` and the position embeddings resized to its patch grid once, by the same
    bicubic resize as ``interpolate_pos_encoding=True`` (:func:`interpolate_pos_encoding`).

    The result at the new size equals the original model called with
    ``interpolate_pos_encoding=True`` (the same float32 resize, rounded once to the params' dtype),
    but it is a plain model of that size: no resize per call, and
    :func:`boft_jax.models.save_pretrained` writes a checkpoint that transformers runs at the new
    size without the flag (as ViT checkpoints finetuned at 384 x 384 are stored).  The other leaves
    (a wrapped model's adapter params too) are passed through unchanged; ``image_size`` equal to the
    config's returns the inputs as they are.

    Args:
      module: a :class:`ViT`.
      params: its params (``{"embeddings": {"position_embeddings": (1, 1 + gh * gw, D), ...}, ...}``),
        NumPy or JAX arrays (NumPy in, NumPy out).
      image_size: ``S`` or ``(H, W)``, at least one patch each way; pixels beyond a whole patch are
        dropped by the patch convolution, as in transformers.

    Example:
      >>> m = ViT(ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
      ...                   image_size=8, patch_size=2, num_channels=1))
      >>> p = m.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
      >>> m16, p16 = with_image_size(m, p, 16)
      >>> m16.config.image_size, p16["embeddings"]["position_embeddings"].shape
      ((16, 16), (1, 65, 8))
      >>> x = jax.random.normal(jax.random.key(1), (2, 16, 16, 1))
      >>> bool(jnp.allclose(m16.apply({"params": p16}, x),
      ...                   m.apply({"params": p}, x, interpolate_pos_encoding=True), atol=1e-6))
      True
    """
    if not isinstance(module, ViT):
        raise TypeError(f"with_image_size: expected a boft_jax.models.vit.ViT, got {type(module).__name__}")
    cfg = module.config
    is_int = lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, bool)
    if is_int(image_size):
        size = (image_size, image_size)
    elif isinstance(image_size, (tuple, list)) and len(image_size) == 2 and all(map(is_int, image_size)):
        size = tuple(image_size)
    else:
        size = None
    (ph, pw) = cfg.patch_size
    if size is None or size[0] < ph or size[1] < pw:
        raise ValueError(
            f"with_image_size: image_size {image_size!r}: expected an integer S or (H, W) with H >= {ph} and"
            f" W >= {pw} (at least one {ph} x {pw} patch each way)"
        )
    if size == cfg.image_size:
        return module, params
    emb = params.get("embeddings") if isinstance(params, Mapping) else None
    pos = emb.get("position_embeddings") if isinstance(emb, Mapping) else None
    if pos is None:
        raise ValueError("with_image_size: params has no embeddings/position_embeddings (expected the ViT's own"
                         " params, as from_pretrained or init gives, not wrapped in {'params': ...})")
    new_cfg = dataclasses.replace(cfg, image_size=size)
    resized = interpolate_pos_encoding(jnp.asarray(pos), cfg.grid_size, new_cfg.grid_size)
    if isinstance(pos, np.ndarray):
        resized = np.asarray(resized)
    new_params = dict(params)
    new_params["embeddings"] = {**emb, "position_embeddings": resized}
    return module.clone(config=new_cfg), new_params


# Image processors whose ``size`` is the model's input size (resize to it, no crop): what
# preprocessor_for_image_size rewrites.
_VIT_PROCESSORS = ("ViTImageProcessor", "ViTImageProcessorFast", "ViTFeatureExtractor")


def preprocessor_for_image_size(preprocessor: Mapping[str, Any], image_size: tuple[int, int]) -> dict:
    """A Hugging Face ``preprocessor_config.json`` (as a dict) for a ViT that takes ``(H, W)``
    images: ``size`` set to ``image_size`` (an int when it was one and the size is square, else
    ``{"height": H, "width": W}``), everything else kept.  The model directory that
    :func:`with_image_size` + ``save_pretrained`` writes then preprocesses images to its own size.

    Raises ``ValueError`` naming the reason for a config this cannot rewrite faithfully: another
    processor than ViT's (``image_processor_type``), resize-then-crop settings (``crop_size``,
    ``crop_pct``: the margin between the two would have to be chosen), or a ``size`` other than an
    int, ``{"height", "width"}`` or ``{"shortest_edge"}``.

    Example:
      >>> preprocessor_for_image_size({"do_resize": True, "size": {"height": 224, "width": 224}}, (384, 384))
      {'do_resize': True, 'size': {'height': 384, 'width': 384}}
      >>> preprocessor_for_image_size({"size": 224}, (384, 512))["size"]
      {'height': 384, 'width': 512}
    """
    if not isinstance(preprocessor, Mapping):
        raise ValueError(f"expected a JSON object, got a JSON {type(preprocessor).__name__}")
    kind = preprocessor.get("image_processor_type", preprocessor.get("feature_extractor_type"))
    if kind is not None and kind not in _VIT_PROCESSORS:
        raise ValueError(f"image_processor_type {kind!r} is not one of {list(_VIT_PROCESSORS)}, whose size is the"
                         " model's input size")
    crop = [k for k in ("crop_size", "crop_pct") if preprocessor.get(k) is not None]
    if crop:
        raise ValueError(f"it resizes and then crops ({', '.join(crop)}); the margin between the two at the new size"
                         " is a choice this does not make")
    size = preprocessor.get("size")
    h, w = image_size
    is_int = isinstance(size, int) and not isinstance(size, bool)
    if not (size is None or is_int or (isinstance(size, Mapping) and set(size) in ({"height", "width"}, {"shortest_edge"}))):
        raise ValueError(f"size {size!r} is not an int, {{'height', 'width'}} or {{'shortest_edge'}}")
    return {**preprocessor, "size": h if is_int and h == w else {"height": h, "width": w}}


def hf_torch_key(path: tuple[str, ...]) -> str:
    """Our unrolled param path -> its key in a transformers ``ViTForImageClassification``.

    >>> hf_torch_key(("encoder", "layer_3", "attention", "query", "kernel"))
    'vit.encoder.layer.3.attention.attention.query.weight'
    """
    p = "/".join(path)
    if path[0] == "embeddings":
        if path[1] == "patch_embeddings":
            return f"vit.embeddings.patch_embeddings.projection.{_LEAF[path[2]]}"
        return f"vit.embeddings.{path[1]}"
    m = re.fullmatch(r"encoder/layer_(\d+)/(.+)/(kernel|bias|scale)", p)
    if m and m.group(2) in _LAYER_MODULES:
        return f"vit.encoder.layer.{m.group(1)}.{_LAYER_MODULES[m.group(2)]}.{_LEAF[m.group(3)]}"
    if path[0] == "layernorm":
        return f"vit.layernorm.{_LEAF[path[1]]}"
    if path[0] == "classifier":
        return f"classifier.{_LEAF[path[1]]}"
    raise KeyError(f"no Hugging Face key for param {p!r}")


def _normalize_prefix(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    # A bare ViTModel checkpoint has no "vit." prefix.
    if any(k.startswith("vit.") for k in state):
        return dict(state)
    return {(k if k.startswith("classifier.") else f"vit.{k}"): v for k, v in state.items()}


@functools.lru_cache(maxsize=16)
def _param_shapes(config: ViTConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    h, w = config.image_size
    x = jax.ShapeDtypeStruct((1, h, w, config.num_channels), jnp.float32)
    return hf.param_shapes(ViT(config), x)


def param_shapes(config: ViTConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """``{path: shape}`` of the unrolled model's params (traced once per config, then cached)."""
    return dict(_param_shapes(config))


def hf_state_dict(config: ViTConfig, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Params (unrolled or stacked) -> transformers state dict (torch naming and layout)."""
    return hf.state_dict_from_params(params, param_shapes(config), hf_torch_key)


def params_from_hf(
    config: ViTConfig, state: Mapping[str, np.ndarray], *, scan_layers: bool = False, source: str = "checkpoint"
) -> dict[str, Any]:
    """A transformers state dict (4.x or 5.x names) -> our params tree (numpy arrays).

    A ViTModel checkpoint's pooler (``vit.pooler.dense``, behind its ``pooler_output``) is not
    loaded, with a warning: this ViT ends, as ViTForImageClassification does, with the final
    LayerNorm, whose CLS row the classifier reads.
    """
    state = _normalize_prefix(state)
    pooler = sorted(k for k in state if any(re.fullmatch(p, k) for p in HF_LEFT_OUT_KEYS))
    if pooler:
        warnings.warn(
            f"ViT {source}: its pooler ({', '.join(pooler)}; ViTModel's pooler_output) is not loaded: boft_jax's"
            " ViT, like ViTForImageClassification, ends with the final LayerNorm, whose CLS row its classifier"
            " reads (a model with num_labels=0 returns that row, not pooler_output)",
            UserWarning,
            stacklevel=2,
        )
    params = hf.params_from_state_dict(
        state,
        param_shapes(config),
        hf_torch_key,
        aliases=HF_KEY_ALIASES,
        ignore=HF_IGNORED_KEYS,
        source=source,
    )
    return hf.stack_layers(params) if scan_layers else params


_LOADABLE = ("ViTForImageClassification", "ViTModel")


class MissingHead(ValueError):
    """:func:`from_pretrained` of a checkpoint without a classifier, given no ``num_labels``."""


def from_pretrained(
    path: str | os.PathLike,
    *,
    dtype: Dtype = jnp.float32,
    scan_layers: bool = False,
    num_labels: int | None = None,
    host: bool = False,
) -> tuple[ViT, dict[str, Any]]:
    """Load a Hugging Face ViT directory as ``(module, params)``.

    Args:
      path: directory with ``config.json`` and ``model.safetensors`` (or shards + index, or
        legacy ``flax_model.msgpack``); a ``ViTForImageClassification`` or bare ``ViTModel``.
      dtype: computation dtype; params keep the checkpoint's dtype.
      scan_layers: build the model with layers under ``nn.scan`` (stacked params).
      num_labels: if given and different from the checkpoint's head (or the checkpoint has no
        head), the classifier gets a fresh zero-initialized ``(hidden, num_labels)`` head; ``0``
        drops the head (the model returns the final CLS features), as does a checkpoint whose
        ``config.json`` has no labels (``id2label: {}``).
      host: return the params as host numpy arrays instead of device arrays, to place them
        straight onto a sharding (``boft_jax.sharding.shard_frozen``) so that no device ever holds
        the whole model; by default they are on the default device.
    """
    cfg_dict = hf.read_config(path)
    hf.check_model_type(path, cfg_dict, "vit")
    archs = cfg_dict.get("architectures") or []
    if archs and not set(archs) & set(_LOADABLE):
        raise ValueError(
            f"{os.fspath(path)!r}: config.json has architectures={archs}; boft_jax's ViT loads"
            f" {' and '.join(_LOADABLE)} checkpoints (the encoder and an image classifier), not the heads"
            " or decoders of other ViT variants"
        )
    config = ViTConfig.from_hf_dict(cfg_dict)
    state = _normalize_prefix(hf.load_state_dict(path))
    has_head = "classifier.weight" in state
    if num_labels is None and config.num_labels == 0:
        num_labels = 0
    if num_labels is None and not has_head:
        raise MissingHead(
            f"{os.fspath(path)!r} has no classifier head (a ViTModel checkpoint?); pass num_labels=N "
            f"to add a fresh zero-initialized one, or num_labels=0 for a model that returns the CLS features"
        )
    if num_labels is not None and (not has_head or state["classifier.weight"].shape[0] != num_labels):
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
        if num_labels:  # a fresh head; 0: headless
            dt = state["vit.layernorm.weight"].dtype if "vit.layernorm.weight" in state else np.float32
            state["classifier.weight"] = np.zeros((num_labels, config.hidden_size), dt)
            state["classifier.bias"] = np.zeros((num_labels,), dt)
        config = dataclasses.replace(config, num_labels=num_labels, id2label=None)
    params = params_from_hf(config, state, scan_layers=scan_layers, source=f"{os.fspath(path)!r}")
    return ViT(config, dtype=dtype, scan_layers=scan_layers), jax.tree.map(np.asarray if host else jnp.asarray, params)
