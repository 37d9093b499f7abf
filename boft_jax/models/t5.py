"""T5 encoder-decoder, numerically equal to Hugging Face's ``T5ForConditionalGeneration``.

Covers the original T5 (ReLU FFN, LM head tied to the shared embedding, decoder output scaled by
``d_model**-0.5`` before it) and T5 v1.1 / FLAN-T5 (gated-GELU FFN with the tanh GELU, untied
``lm_head``, no scaling). Relative position buckets (bidirectional in the encoder,
unidirectional in the decoder) feed one bias table per stack, which Hugging Face stores in the
first layer and shares with the rest; here it sits at the stack level. Layer norms are T5's RMS
norm (no mean subtraction, no bias); no Dense has a bias.

Param tree (unrolled; ``scan_layers=True`` turns the ``layer_{i}`` subtrees of each stack into
one ``layers`` subtree with a leading layer axis)::

    shared/embedding (vocab, d_model)
    encoder/relative_attention_bias/embedding (num_buckets, num_heads)
    encoder/layer_{i}/self_attention_norm/scale
    encoder/layer_{i}/self_attention/{q,k,v,o}/kernel                 nn.Dense
    encoder/layer_{i}/mlp_norm/scale
    encoder/layer_{i}/mlp/{wi | wi_0,wi_1}/kernel, mlp/wo/kernel       nn.Dense
    encoder/final_norm/scale
    decoder/relative_attention_bias/embedding
    decoder/layer_{i}/self_attention_norm, self_attention/{q,k,v,o}
    decoder/layer_{i}/cross_attention_norm, cross_attention/{q,k,v,o}
    decoder/layer_{i}/mlp_norm, mlp/...
    decoder/final_norm/scale
    lm_head/kernel (d_model, vocab)                                    only if untied

Example::

    module, params = t5.from_pretrained("path/to/flan-t5")
    logits = module.apply({"params": params}, input_ids, attention_mask, decoder_input_ids)
    tokens = jax.jit(module.generate, static_argnames="max_new_tokens")(
        params, input_ids, attention_mask, max_new_tokens=32)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from boft_jax.models import hf

Dtype = Any
Cache = dict[str, jax.Array]
_NEG = float(np.finfo(np.float32).min)

# Regexes for BOFT targets, matched against the '/'-joined module path P of each nn.Dense as
# re.search(rf"(?:^|/)(?:{pattern})$", P); the same layers with and without scan_layers.
# "all_linear" leaves out lm_head.
TARGET_PRESETS: dict[str, str] = {
    "attention_qv": r"(?:self|cross)_attention/(?:q|v)",
    "attention": r"(?:self|cross)_attention/(?:q|k|v|o)",
    "mlp": r"mlp/(?:wi|wi_0|wi_1|wo)",
    "all_linear": r"(?:self|cross)_attention/(?:q|k|v|o)|mlp/(?:wi|wi_0|wi_1|wo)",
}


MODEL_TYPES = {"t5": "T5ForConditionalGeneration", "mt5": "MT5ForConditionalGeneration"}  # model_type -> class


# config.json keys that transformers' T5Config reads as other names (its attribute_map)
_HF_ALIASES = {"hidden_size": "d_model", "num_attention_heads": "num_heads", "num_hidden_layers": "num_layers",
               "head_dim": "d_kv"}


@dataclasses.dataclass(frozen=True)
class T5Config:
    """The fields of Hugging Face's ``T5Config`` that define ``T5ForConditionalGeneration``.

    ``tie_word_embeddings``: the LM head is the shared embedding (original T5); otherwise an
    untied ``lm_head`` (v1.1, FLAN-T5, mT5). ``scale_decoder_outputs`` (default: equal to
    ``tie_word_embeddings``, as in transformers 4) multiplies the decoder output by
    ``d_model**-0.5`` before the head.  ``model_type``: ``"t5"`` or ``"mt5"`` (transformers'
    ``MT5ForConditionalGeneration``: the same architecture and weight names), kept so that
    :func:`boft_jax.models.save_pretrained` writes the class the checkpoint came from.
    """

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int | None = None
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    # transformers derives these two from feed_forward_proj, and a config.json that holds them
    # overrides that (transformers 4 and 5 alike); None: derived here as transformers does
    dense_act_fn: str | None = None
    is_gated_act: bool | None = None
    tie_word_embeddings: bool = True
    scale_decoder_outputs: bool | None = None
    pad_token_id: int | None = 0  # None: config.json's null (generate then pads with the first EOS id, as transformers)
    eos_token_id: int | tuple[int, ...] | None = 1  # None: config.json's null, decoding never stops at a token
    decoder_start_token_id: int = 0
    model_type: str = "t5"

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"T5Config.model_type must be one of {list(MODEL_TYPES)}, got {self.model_type!r}")
        if self.num_decoder_layers is None:
            object.__setattr__(self, "num_decoder_layers", self.num_layers)
        if self.scale_decoder_outputs is None:
            object.__setattr__(self, "scale_decoder_outputs", self.tie_word_embeddings)
        if isinstance(self.eos_token_id, (list, tuple)):
            object.__setattr__(self, "eos_token_id", tuple(int(e) for e in self.eos_token_id))
        if not isinstance(self.relative_attention_num_buckets, (int, np.integer)) or self.relative_attention_num_buckets < 4:
            raise ValueError(_bucket_error(self.relative_attention_num_buckets))
        if not isinstance(self.relative_attention_max_distance, (int, np.integer)) or self.relative_attention_max_distance < 1:
            raise ValueError(
                f"T5Config.relative_attention_max_distance must be a positive integer, got {self.relative_attention_max_distance!r}"
            )
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ValueError(
                f"feed_forward_proj {self.feed_forward_proj!r} is not 'ACT' or 'gated-ACT' "
                f"(e.g. 'relu', 'gated-gelu')"
            )
        if self.dense_act_fn is None:
            # As transformers: "gated-gelu" means the tanh GELU (gelu_new); other names are literal.
            derived = "gelu_new" if self.feed_forward_proj == "gated-gelu" else parts[-1]
            object.__setattr__(self, "dense_act_fn", derived)
        if self.is_gated_act is None:
            object.__setattr__(self, "is_gated_act", parts[0] == "gated" and len(parts) == 2)
        if not isinstance(self.is_gated_act, (bool, np.bool_)):
            raise ValueError(f"T5Config.is_gated_act must be true or false, got {self.is_gated_act!r}")
        if not isinstance(self.dense_act_fn, str):
            raise ValueError(f"T5Config.dense_act_fn must be an activation name, got {self.dense_act_fn!r}")
        hf.activation(self.dense_act_fn)

    @property
    def is_gated(self) -> bool:
        """Whether the MLP is gated (``wi_0``, ``wi_1``): ``is_gated_act``."""
        return bool(self.is_gated_act)

    @property
    def activation(self) -> str:
        """The MLP's activation name: ``dense_act_fn``."""
        return self.dense_act_fn

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """The EOS ids as a tuple (empty when ``eos_token_id`` is None)."""
        e = self.eos_token_id
        return () if e is None else e if isinstance(e, tuple) else (int(e),)

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> "T5Config":
        """From a Hugging Face ``config.json`` dict (unknown keys are ignored).

        transformers 5 writes ``tie_word_embeddings: true`` for every T5 and records the head
        scaling as ``scale_decoder_outputs``; whether the head is tied is then decided by the
        weights (see ``from_pretrained``).
        """
        d = dict(d)
        for alias, name in _HF_ALIASES.items():  # transformers' T5Config.attribute_map
            if alias in d and d[alias] is not None:
                if name in d and d[name] is not None and d[name] != d[alias]:
                    raise ValueError(
                        f"this T5 config.json sets both {name} = {d[name]!r} and its alias {alias} = {d[alias]!r};"
                        " transformers reads them as one setting: keep one of them"
                    )
                d[name] = d[alias]
        kwargs = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d and d[f.name] is not None}
        hf.refuse_nulls(cls, d, "T5", nullable=("pad_token_id", "eos_token_id", "decoder_start_token_id"))
        hf.check_field_types(cls, d, "T5")
        for key in ("pad_token_id", "eos_token_id"):  # an explicit null is kept: transformers reads it as "none"
            if key in d and d[key] is None:
                kwargs[key] = None
        if "scale_decoder_outputs" in d and d["scale_decoder_outputs"] is None:
            kwargs["scale_decoder_outputs"] = False  # transformers keeps the null, which its model reads as false
        if "decoder_start_token_id" not in kwargs:
            pad = kwargs.get("pad_token_id", 0)
            start = 0 if pad is None else pad
            warnings.warn(
                f"this T5 config.json sets no decoder_start_token_id; boft_jax starts decoding with {start}"
                " (pad_token_id, T5's convention), while transformers refuses to generate or to shift labels"
                " without one. Add decoder_start_token_id to config.json to make the choice explicit",
                UserWarning, stacklevel=2,
            )
            kwargs["decoder_start_token_id"] = start
        if kwargs.get("model_type") == "mt5":
            # transformers' MT5 never scales the decoder output, whatever the file says: transformers
            # 5 forces tie_word_embeddings = true in its config, and its model never reads a
            # scale_decoder_outputs key (which an edited or converted config.json may carry)
            kwargs["scale_decoder_outputs"] = False
        return cls(**kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        """A ``config.json`` dict that transformers' ``T5ForConditionalGeneration`` (or
        ``MT5ForConditionalGeneration``) loads."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if self.model_type == "mt5":
            if self.scale_decoder_outputs:
                raise ValueError(
                    "this T5Config has model_type='mt5' and scale_decoder_outputs=True, but transformers'"
                    " MT5ForConditionalGeneration never scales the decoder output; use model_type='t5'"
                )
            del d["scale_decoder_outputs"]
        scaled = self.scale_decoder_outputs and self.model_type != "mt5"
        if scaled != self.tie_word_embeddings:
            warnings.warn(
                f"this T5 config has tie_word_embeddings={self.tie_word_embeddings} but the decoder output is"
                f" {'' if scaled else 'not '}scaled by d_model^-0.5: transformers >= 5 reads that from the"
                " config and loads the export exactly; transformers 4 scales exactly when the head is tied, so"
                f" it would load this export with logits off by a factor sqrt(d_model) = {self.d_model ** 0.5:.3g}"
                " (greedy tokens unchanged; losses and probabilities wrong). Load it with transformers >= 5",
                UserWarning, stacklevel=2,
            )
        d.update(
            architectures=[MODEL_TYPES[self.model_type]],
            is_encoder_decoder=True,
            initializer_factor=1.0,
            eos_token_id=list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
        )
        return d


# --------------------------------------------------------------------------------------------
# Relative position buckets.
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def relative_position_buckets(bidirectional: bool, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bucket of each relative position ``r = key_pos - query_pos``, as a table over ``[-h, h]``.

    Returns an int32 table ``t`` of shape ``(2 * h + 1,)`` with bucket(r) = ``t[clip(r, -h, h) + h]``;
    positions beyond ``h`` (``max_distance`` in a usual setting) share the last bucket, so clipping
    changes nothing.  Computed once in numpy with the float32 arithmetic of transformers'
    ``_relative_position_bucket`` (the log-spaced bucket edges fall exactly on integers for the
    default 32/128 setting, so the rounding must match; the table makes the result independent of
    the accelerator's ``log``, not of numpy's against torch's).  Neither float32 ``log`` is
    correctly rounded everywhere, so at a few settings where an edge falls exactly on an integer
    they land on either side of it: a review sweeping 77 bucket counts x 69 values of
    ``max_distance`` (8248 settings transformers defines) found 7 where one relative distance gets
    the neighbouring bucket (bidirectional 34 or 35 buckets with max_distance 27, 38 or 39 with 49;
    causal 17 / 27, 19 / 49, 51 / 49; e.g. ``9 log(18/8) / log(27/8)`` is exactly 6, and torch's
    value truncates to 5).  The default 32/128 and every other setting agreed.  (Degenerate
    settings, with ``max_distance`` inside the exact range, warn below.)

    When ``max_distance`` is not above the exact range (``max_exact = num_buckets // 2``, halved
    again when bidirectional), transformers' formula divides by ``log(max_distance / max_exact) <=
    0``: its buckets then fall as the distance grows and become negative or undefined (an index
    error in its embedding).  This table keeps every bucket transformers defines and puts the
    positions where it has none in the last bucket of their direction, with a warning.

    >>> relative_position_buckets(True, 8, 16)[16 - 3: 16 + 4].tolist()  # r = -3 .. 3
    [2, 2, 1, 0, 5, 6, 6]
    """
    if num_buckets < (4 if bidirectional else 2):
        raise ValueError(_bucket_error(num_buckets, bidirectional))
    n = num_buckets // 2 if bidirectional else num_buckets
    max_exact = n // 2
    h = max(max_distance, max_exact)
    while True:  # the buckets are constant beyond h: after max_distance, or once transformers' are undefined
        table, undefined = _bucket_table(bidirectional, num_buckets, max_distance, h)
        if max_distance > max_exact or (undefined[0] and (undefined[-1] or not bidirectional)):
            break
        h *= 2
    if undefined.any():
        warnings.warn(
            f"T5 relative_attention_max_distance = {max_distance} is not above the {max_exact} exact"
            f" {'bidirectional' if bidirectional else 'causal'} buckets of relative_attention_num_buckets ="
            f" {num_buckets}: transformers' bucket ids are negative or undefined for positions {int(np.abs(np.arange(-h, h + 1)[undefined]).min())}"
            f" or more apart; boft_jax puts them in the last bucket of their direction",
            UserWarning,
            stacklevel=2,
        )
    table.setflags(write=False)  # cached and shared
    return table


def _bucket_table(bidirectional: bool, num_buckets: int, max_distance: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    """transformers' buckets for ``r`` in ``[-h, h]`` and where they are undefined (replaced)."""
    r = np.arange(-h, h + 1, dtype=np.int64)
    offset = np.zeros_like(r)
    n = num_buckets
    if bidirectional:
        n //= 2
        offset += (r > 0).astype(np.int64) * n
        r = np.abs(r)
    else:
        r = -np.minimum(r, 0)
    max_exact = n // 2
    with np.errstate(divide="ignore", invalid="ignore"):  # log(0) at r = 0 (exact); 0/0 when degenerate
        scaled = (
            np.log(r.astype(np.float32) / np.float32(max_exact))
            / np.float32(math.log(max_distance / max_exact) if max_distance != max_exact else 0.0)
            * np.float32(n - max_exact)
        )
    finite = np.isfinite(scaled)
    large = np.minimum(max_exact + np.where(finite, scaled, 0).astype(np.int64), n - 1)
    undefined = (r >= max_exact) & (~finite | (offset + large < 0))
    large = np.where(undefined, n - 1, large)
    return (offset + np.where(r < max_exact, r, large)).astype(np.int32), undefined


def _bucket_error(num_buckets: int, bidirectional: bool = True) -> str:
    need = (
        "the encoder's bidirectional buckets need at least 4 (2 per direction, of which 1 exact"
        if bidirectional
        else "the decoder's causal buckets need at least 2 (of which 1 exact"
    )
    return (
        f"T5Config.relative_attention_num_buckets = {num_buckets}: {need};"
        " transformers divides by zero below that)"
    )


def _position_bias(
    table: nn.Embed, q_pos: jax.Array, k_pos: jax.Array, *, bidirectional: bool, config: T5Config
) -> jax.Array:
    """Relative position bias (1, heads, q, k) in float32."""
    lookup = relative_position_buckets(
        bidirectional, config.relative_attention_num_buckets, config.relative_attention_max_distance
    )
    h = (lookup.shape[0] - 1) // 2
    rel = jnp.clip(k_pos[None, :] - q_pos[:, None], -h, h) + h
    values = table(jnp.asarray(lookup)[rel])  # (q, k, heads)
    return jnp.transpose(values, (2, 0, 1))[None].astype(jnp.float32)


# --------------------------------------------------------------------------------------------
# Layers.
# --------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """T5 layer norm: ``x / sqrt(mean(x**2) + eps) * scale`` (statistics in float32)."""

    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
        return y.astype(self.dtype) * scale.astype(self.dtype)


class T5Attention(nn.Module):
    """Attention without score scaling, with an additive bias (position bias and mask)."""

    config: T5Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        kv_input: jax.Array | None,
        bias: jax.Array,
        *,
        kv: tuple[jax.Array, jax.Array] | None = None,
        cache: tuple[jax.Array, jax.Array] | None = None,
        cache_index: jax.Array | None = None,
        deterministic: bool = True,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """Attend from ``x`` (B, T, d) to ``kv_input`` (B, S, d).

        Args:
          bias: float32, broadcastable to (B, heads, T, S'), added to the scores.
          kv: precomputed (k, v), each (B, S, heads, d_kv): skip the k/v projections.
          cache: (k, v) buffers (B, L, heads, d_kv); the new k/v are written at ``cache_index``
            and attention runs over all L slots (``bias`` masks the unwritten ones).

        Returns:
          output (B, T, d) and the (k, v) attended over (the updated buffers with a cache).
        """
        cfg = self.config
        inner = cfg.num_heads * cfg.d_kv
        dense = lambda features, name: nn.Dense(features, use_bias=False, dtype=self.dtype, name=name)
        split = lambda y: y.reshape(*y.shape[:-1], cfg.num_heads, cfg.d_kv)
        q = split(dense(inner, "q")(x))
        if kv is None:
            k, v = split(dense(inner, "k")(kv_input)), split(dense(inner, "v")(kv_input))
        else:
            k, v = kv
        if cache is not None:
            start = (0, cache_index, 0, 0)
            k = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), start)
            v = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), start)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) + bias
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        probs = nn.Dropout(cfg.dropout_rate)(probs, deterministic=deterministic)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(*x.shape[:-1], inner)
        return dense(cfg.d_model, "o")(out), (k, v)


class T5MLP(nn.Module):
    config: T5Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        cfg = self.config
        dense = lambda features, name: nn.Dense(features, use_bias=False, dtype=self.dtype, name=name)
        act = hf.activation(cfg.activation)
        if cfg.is_gated:
            h = act(dense(cfg.d_ff, "wi_0")(x)) * dense(cfg.d_ff, "wi_1")(x)
        else:
            h = act(dense(cfg.d_ff, "wi")(x))
        h = nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
        return dense(cfg.d_model, "wo")(h)


class T5Block(nn.Module):
    """One encoder or decoder layer; ``(x, cache) -> (x, cache)`` so that it can be scanned."""

    config: T5Config
    dtype: Dtype = jnp.float32
    is_decoder: bool = False

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        self_bias: jax.Array,
        encoder_hidden_states: jax.Array | None,
        cross_bias: jax.Array | None,
        cache: Cache | None,
        cache_index: jax.Array | None,
        deterministic: bool = True,
    ) -> tuple[jax.Array, Cache | None]:
        cfg = self.config
        norm = lambda name: RMSNorm(cfg.layer_norm_epsilon, self.dtype, name=name)
        drop = lambda y: nn.Dropout(cfg.dropout_rate)(y, deterministic=deterministic)
        attention = lambda name: T5Attention(cfg, self.dtype, name=name)
        new_cache = None

        h = norm("self_attention_norm")(x)
        self_cache = None if cache is None else (cache["self_k"], cache["self_v"])
        h, (k, v) = attention("self_attention")(
            h, h, self_bias, cache=self_cache, cache_index=cache_index, deterministic=deterministic
        )
        x = x + drop(h)
        if cache is not None:
            new_cache = {"self_k": k, "self_v": v}

        if self.is_decoder:
            h = norm("cross_attention_norm")(x)
            kv = None if cache is None or "cross_k" not in cache else (cache["cross_k"], cache["cross_v"])
            h, (k, v) = attention("cross_attention")(
                h, encoder_hidden_states, cross_bias, kv=kv, deterministic=deterministic
            )
            x = x + drop(h)
            if cache is not None:
                new_cache.update(cross_k=k, cross_v=v)

        h = T5MLP(cfg, self.dtype, name="mlp")(norm("mlp_norm")(x), deterministic)
        return x + drop(h), new_cache


class T5Stack(nn.Module):
    """Encoder (``is_decoder=False``) or decoder stack on embedded tokens."""

    config: T5Config
    dtype: Dtype = jnp.float32
    is_decoder: bool = False
    scan_layers: bool = False

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        attention_mask: jax.Array | None = None,
        encoder_hidden_states: jax.Array | None = None,
        encoder_attention_mask: jax.Array | None = None,
        *,
        cache: Cache | None = None,
        deterministic: bool = True,
    ) -> tuple[jax.Array, Cache | None]:
        """x: (B, T, d) embeddings. attention_mask: (B, T) (decoder with cache: (B, L)), 1 = keep."""
        cfg = self.config
        num_layers = cfg.num_decoder_layers if self.is_decoder else cfg.num_layers
        table = nn.Embed(
            cfg.relative_attention_num_buckets,
            cfg.num_heads,
            embedding_init=nn.initializers.normal(cfg.d_model**-0.5),
            name="relative_attention_bias",
        )
        T = x.shape[1]
        index = None
        if self.is_decoder and cache is not None:
            index = cache["index"]
            q_pos = index + jnp.arange(T)
            k_pos = jnp.arange(cache["self_k"].shape[2])
        else:
            q_pos = k_pos = jnp.arange(T)
        keep = jnp.ones((1, 1, 1, k_pos.shape[0]), bool)
        if self.is_decoder:
            keep = keep & (k_pos[None, :] <= q_pos[:, None])[None, None]
        if attention_mask is not None:
            keep = keep & attention_mask.astype(bool)[:, None, None, :]
        bias = _position_bias(table, q_pos, k_pos, bidirectional=not self.is_decoder, config=cfg)
        self_bias = jnp.where(keep, bias, _NEG)

        cross_bias = None
        if self.is_decoder:
            if encoder_attention_mask is None:
                cross_bias = jnp.zeros((1, 1, 1, 1), jnp.float32)
            else:
                cross_bias = jnp.where(encoder_attention_mask.astype(bool)[:, None, None, :], 0.0, _NEG)

        layer_cache = None
        if cache is not None:
            layer_cache = {k: v for k, v in cache.items() if k not in ("index", "encoder_mask")}
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        args = (self_bias, encoder_hidden_states, cross_bias)
        if self.scan_layers:
            layers = nn.scan(
                T5Block,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast, nn.broadcast),
                length=num_layers,
            )
            x, new_layer_cache = layers(cfg, self.dtype, self.is_decoder, name="layers")(
                x, *args, layer_cache, index, deterministic
            )
        else:
            outs = []
            for i in range(num_layers):
                c = None if layer_cache is None else {k: v[i] for k, v in layer_cache.items()}
                x, c = T5Block(cfg, self.dtype, self.is_decoder, name=f"layer_{i}")(
                    x, *args, c, index, deterministic
                )
                outs.append(c)
            new_layer_cache = None if layer_cache is None else jax.tree.map(lambda *a: jnp.stack(a), *outs)
        x = RMSNorm(cfg.layer_norm_epsilon, self.dtype, name="final_norm")(x)
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        new_cache = None
        if cache is not None:
            new_cache = dict(cache, **new_layer_cache, index=index + T)
        return x, new_cache


class T5(nn.Module):
    """``T5ForConditionalGeneration``.

    Methods (all through ``module.apply(variables, ..., method=...)`` except ``generate``):
      ``encode(input_ids, attention_mask)`` -> encoder states (B, S, d_model);
      ``decode(decoder_input_ids, encoder_hidden_states, encoder_attention_mask,
      decoder_attention_mask, cache=None)`` -> logits (B, T, vocab), or ``(logits, cache)`` when a
      cache from ``init_cache`` is given (incremental decoding);
      ``__call__(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask)`` -> logits;
      ``generate(params, input_ids, attention_mask, max_new_tokens=...)`` greedy decoding.

    Attributes:
      config: the architecture.
      dtype: computation dtype; params keep their own dtype; softmax and norm statistics run in
        float32.
      scan_layers: layers of each stack under ``nn.scan`` (stacked params, layer axis first).
    """

    config: T5Config
    dtype: Dtype = jnp.float32
    scan_layers: bool = False

    def setup(self):
        cfg = self.config
        self.shared = nn.Embed(
            cfg.vocab_size, cfg.d_model, embedding_init=nn.initializers.normal(1.0), dtype=self.dtype
        )
        self.encoder = T5Stack(cfg, self.dtype, is_decoder=False, scan_layers=self.scan_layers)
        self.decoder = T5Stack(cfg, self.dtype, is_decoder=True, scan_layers=self.scan_layers)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Dense(cfg.vocab_size, use_bias=False, dtype=self.dtype)

    def encode(
        self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *, deterministic: bool = True
    ) -> jax.Array:
        """input_ids, attention_mask: (B, S) -> encoder states (B, S, d_model)."""
        x, _ = self.encoder(self.shared(input_ids), attention_mask, deterministic=deterministic)
        return x

    def decode(
        self,
        decoder_input_ids: jax.Array,
        encoder_hidden_states: jax.Array | None = None,
        encoder_attention_mask: jax.Array | None = None,
        decoder_attention_mask: jax.Array | None = None,
        *,
        cache: Cache | None = None,
        deterministic: bool = True,
    ):
        """Decoder logits (B, T, vocab) for ``decoder_input_ids`` (B, T) under teacher forcing.

        With ``cache`` (from ``init_cache``), the T tokens continue the cached prefix; the
        encoder states and mask come from the cache, ``decoder_attention_mask`` (if any) covers
        all ``max_length`` cache slots, and ``(logits, new_cache)`` is returned.
        """
        if cache is not None:
            encoder_attention_mask = cache["encoder_mask"]
        x, new_cache = self.decoder(
            self.shared(decoder_input_ids),
            decoder_attention_mask,
            encoder_hidden_states,
            encoder_attention_mask,
            cache=cache,
            deterministic=deterministic,
        )
        logits = self._lm_head(x)
        return logits if cache is None else (logits, new_cache)

    def _lm_head(self, x: jax.Array) -> jax.Array:
        if self.config.scale_decoder_outputs:
            x = x * (self.config.d_model**-0.5)
        if self.config.tie_word_embeddings:
            return self.shared.attend(x)
        return self.lm_head(x)

    def init_cache(
        self, encoder_hidden_states: jax.Array, encoder_attention_mask: jax.Array | None, max_length: int
    ) -> Cache:
        """Cache for decoding up to ``max_length`` tokens: empty self-attention buffers and the
        cross-attention keys/values of every decoder layer, computed once here."""
        cfg = self.config
        B, S = encoder_hidden_states.shape[:2]
        if encoder_attention_mask is None:
            encoder_attention_mask = jnp.ones((B, S), bool)
        shape = (cfg.num_decoder_layers, B, max_length, cfg.num_heads, cfg.d_kv)
        empty = {
            "index": jnp.array(0, jnp.int32),
            "encoder_mask": encoder_attention_mask.astype(bool),
            "self_k": jnp.zeros(shape, self.dtype),
            "self_v": jnp.zeros(shape, self.dtype),
        }
        # A throw-away step fills the cross-attention entries; its self-attention write at slot 0
        # is overwritten by the first real step, since the index goes back to 0.
        _, cache = self.decoder(
            self.shared(jnp.full((B, 1), cfg.decoder_start_token_id, jnp.int32)),
            None,
            encoder_hidden_states,
            encoder_attention_mask,
            cache=empty,
        )
        return dict(cache, index=empty["index"], self_k=empty["self_k"], self_v=empty["self_v"])

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None,
        decoder_input_ids: jax.Array,
        decoder_attention_mask: jax.Array | None = None,
        *,
        deterministic: bool = True,
    ) -> jax.Array:
        """Logits (B, T, vocab) of ``decoder_input_ids`` (B, T) given ``input_ids`` (B, S)."""
        enc = self.encode(input_ids, attention_mask, deterministic=deterministic)
        return self.decode(
            decoder_input_ids, enc, attention_mask, decoder_attention_mask, deterministic=deterministic
        )

    @nn.nowrap
    def generate(
        self,
        params: Mapping[str, Any],
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        max_new_tokens: int,
        eos_token_id: int | tuple[int, ...] | jax.Array | None = None,
        pad_token_id: int | None = None,
        decoder_start_token_id: int | None = None,
    ) -> jax.Array:
        """Greedy decoding with the KV cache, as transformers' greedy ``generate``.

        Call on the unbound module: ``module.generate(params, ...)``, or on ``boft.wrap(module, cfg)``
        with the adapted params (it then decodes with the adapter applied); jit it with
        ``static_argnames="max_new_tokens"``. Shapes are fixed: the result is
        ``(B, 1 + max_new_tokens)`` int32, starting with the decoder start token; once a row has
        produced EOS the rest of the row is padding, and the loop stops early when every row has.
        (transformers returns the same tokens, but trims the columns after the last EOS.)
        ``eos_token_id`` (default: the config's) may be one id or several, also as an array.
        """
        return generate(
            self,
            params,
            input_ids,
            attention_mask,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            decoder_start_token_id=decoder_start_token_id,
        )

    # On boft.wrap(t5) the wrapper binds this helper to itself: wrapped.generate(params, ...) decodes
    # with the adapter (generate() runs encode / decode through the wrapper by name).
    generate.boft_binds_wrapper = True


def _t5_config(module: nn.Module) -> T5Config:
    """The T5Config of a T5 module or of a wrapper that keeps it as ``.model`` (``boft.wrap``)."""
    cfg = getattr(module, "config", None)
    if not isinstance(cfg, T5Config):
        cfg = getattr(getattr(module, "model", None), "config", None)
    if not isinstance(cfg, T5Config):
        raise TypeError(
            f"generate needs a T5 module or a wrapper of one (with .model), got {type(module).__name__}"
        )
    return cfg


def check_max_new_tokens(max_new_tokens) -> None:
    """``ValueError`` unless ``max_new_tokens`` is an int >= 0 (the generated length, static under jit)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0 (static under jax.jit), got {max_new_tokens!r}")


def generation_ids(
    cfg: T5Config, eos_token_id=None, pad_token_id: int | None = None, decoder_start_token_id: int | None = None
) -> tuple[jax.Array, Any, Any]:
    """``(eos_ids (n,) int32, pad, start)`` for greedy decoding: the arguments given, else the config's
    (``eos_token_ids``, ``pad_token_id``, ``decoder_start_token_id``).  With no pad id in either,
    the pad is the first EOS id used (the argument's when given, as transformers' generate does)."""
    eos = cfg.eos_token_ids if eos_token_id is None else eos_token_id
    pad = pad_token_id if pad_token_id is not None else cfg.pad_token_id
    if pad is None:  # as transformers: the first EOS id this call uses (an eos_token_id argument's), else 0
        pad = int(np.ravel(eos)[0]) if np.size(eos) else 0
    start = cfg.decoder_start_token_id if decoder_start_token_id is None else decoder_start_token_id
    return jnp.atleast_1d(jnp.asarray(eos, jnp.int32)), pad, start


def generate(
    module: nn.Module,
    params: Mapping[str, Any],
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    max_new_tokens: int,
    eos_token_id: int | tuple[int, ...] | jax.Array | None = None,
    pad_token_id: int | None = None,
    decoder_start_token_id: int | None = None,
) -> jax.Array:
    """Greedy decoding with the KV cache for any module with T5's methods, bare or wrapped.

    ``module`` is an unbound :class:`T5` or a wrapper that forwards ``encode`` / ``init_cache`` /
    ``decode`` by name and keeps the T5 as ``.model`` (``boft.wrap(t5_module, config)``), so
    ``generate(boft.wrap(module, cfg), boft.combine(frozen, adapter), ids, mask, max_new_tokens=n)``
    decodes with the adapter applied. Same result and shapes as :meth:`T5.generate`: a
    ``(B, 1 + max_new_tokens)`` int32 array starting with the decoder start token, padded after
    each row's EOS. Jit it with ``static_argnames="max_new_tokens"`` (and ``module`` static, e.g.
    via ``functools.partial``).
    """
    check_max_new_tokens(max_new_tokens)
    eos_ids, pad, start = generation_ids(_t5_config(module), eos_token_id, pad_token_id, decoder_start_token_id)
    variables = {"params": params}
    B = input_ids.shape[0]
    enc = module.apply(variables, input_ids, attention_mask, method="encode")
    cache = module.apply(variables, enc, attention_mask, max(max_new_tokens, 1), method="init_cache")
    tokens = jnp.full((B, max_new_tokens + 1), pad, jnp.int32).at[:, 0].set(start)

    def cond(state):
        i, _, _, done = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def step(state):
        i, tokens, cache, done = state
        current = jax.lax.dynamic_slice_in_dim(tokens, i, 1, axis=1)
        logits, cache = module.apply(variables, current, cache=cache, method="decode")
        nxt = jnp.argmax(logits[:, -1].astype(jnp.float32), axis=-1).astype(jnp.int32)
        nxt = jnp.where(done, pad, nxt)
        tokens = jax.lax.dynamic_update_slice(tokens, nxt[:, None], (0, i + 1))
        done = done | jnp.any(nxt[:, None] == eos_ids[None, :], axis=-1)
        return i + 1, tokens, cache, done

    state = (jnp.array(0, jnp.int32), tokens, cache, jnp.zeros((B,), bool))
    return jax.lax.while_loop(cond, step, state)[1]


def shift_right(labels: jax.Array, decoder_start_token_id: int = 0, pad_token_id: int = 0) -> jax.Array:
    """Decoder inputs for teacher forcing from ``labels`` (B, T): prepend the start token, drop
    the last label, and replace -100 (ignored labels) by the pad token, as transformers does."""
    shifted = jnp.concatenate(
        [jnp.full((*labels.shape[:-1], 1), decoder_start_token_id, labels.dtype), labels[..., :-1]], axis=-1
    )
    return jnp.where(shifted == -100, pad_token_id, shifted)


# --------------------------------------------------------------------------------------------
# Hugging Face checkpoints.
# --------------------------------------------------------------------------------------------

MODULE, CONFIG = T5, T5Config

# Known keys that T5ForConditionalGeneration does not use (transformers ignores the first; the
# embed_tokens copies must equal shared.weight, which from_pretrained checks).
HF_IGNORED_KEYS: tuple[str, ...] = (
    r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight",
    r"(?:encoder|decoder)\.embed_tokens\.weight",
)

# transformers 5 kept T5's module names: nothing to rename either way.
HF_KEY_ALIASES: tuple[tuple[str, str], ...] = ()
HF_KEY_ALIASES_V5: tuple[tuple[str, str], ...] = ()

_ATTENTION = {"self_attention": "SelfAttention", "cross_attention": "EncDecAttention"}


def hf_torch_key(path: tuple[str, ...]) -> str:
    """Our unrolled param path -> its key in a transformers ``T5ForConditionalGeneration``.

    >>> hf_torch_key(("decoder", "layer_1", "cross_attention", "q", "kernel"))
    'decoder.block.1.layer.1.EncDecAttention.q.weight'
    """
    p = "/".join(path)
    if path == ("shared", "embedding"):
        return "shared.weight"
    if path == ("lm_head", "kernel"):
        return "lm_head.weight"
    stack = path[0]
    if len(path) == 3 and path[1:] == ("relative_attention_bias", "embedding"):
        return f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    if path[1:] == ("final_norm", "scale"):
        return f"{stack}.final_layer_norm.weight"
    m = re.fullmatch(r"(encoder|decoder)/layer_(\d+)/(\w+)/(?:(\w+)/)?(kernel|scale)", p)
    if m:
        stack, i, module, sub, _ = m.groups()
        mlp_index = 2 if stack == "decoder" else 1
        sublayer = {
            "self_attention": 0,
            "self_attention_norm": 0,
            "cross_attention": 1,
            "cross_attention_norm": 1,
            "mlp": mlp_index,
            "mlp_norm": mlp_index,
        }[module]
        head = f"{stack}.block.{i}.layer.{sublayer}"
        if module.endswith("_norm"):
            return f"{head}.layer_norm.weight"
        if module == "mlp":
            return f"{head}.DenseReluDense.{sub}.weight"
        return f"{head}.{_ATTENTION[module]}.{sub}.weight"
    raise KeyError(f"no Hugging Face key for param {p!r}")


@functools.lru_cache(maxsize=16)
def _param_shapes(config: T5Config) -> dict[tuple[str, ...], tuple[int, ...]]:
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return hf.param_shapes(T5(config), ids, None, ids)


def param_shapes(config: T5Config) -> dict[tuple[str, ...], tuple[int, ...]]:
    """``{path: shape}`` of the unrolled model's params (traced once per config, then cached)."""
    return dict(_param_shapes(config))


def hf_state_dict(config: T5Config, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Params (unrolled or stacked) -> transformers state dict (torch naming and layout)."""
    return hf.state_dict_from_params(params, param_shapes(config), hf_torch_key)


def resolve_tying(config: T5Config, state: Mapping[str, np.ndarray]) -> T5Config:
    """Whether the LM head is tied, decided as transformers does: a checkpoint that holds an
    ``lm_head.weight`` different from ``shared.weight`` is untied whatever config.json says
    (transformers 5 writes ``tie_word_embeddings: true`` for FLAN-T5 too)."""
    if config.tie_word_embeddings and "lm_head.weight" in state and "shared.weight" in state:
        if not np.array_equal(state["lm_head.weight"], state["shared.weight"]):
            return dataclasses.replace(config, tie_word_embeddings=False)
    if not config.tie_word_embeddings and "lm_head.weight" not in state and "shared.weight" in state:
        # transformers 5 always ties the head (a config's tie_word_embeddings = false only turns off
        # the output scaling), so such a checkpoint loads there with the shared embedding as head
        warnings.warn(
            "config.json says tie_word_embeddings = false, but the checkpoint holds no lm_head.weight: the LM"
            " head is the shared embedding, without the d_model^-0.5 scaling, as transformers 5 loads it"
            " (transformers 4 would start from a random head instead)",
            UserWarning,
            stacklevel=3,
        )
        return dataclasses.replace(config, tie_word_embeddings=True)
    return config


def untie_head(module: T5, params: Mapping[str, Any]) -> tuple[T5, dict[str, Any]]:
    """A tied T5 (its LM head is the shared embedding) as the same model with an untied head.

    The returned module has ``tie_word_embeddings=False`` and keeps the decoder output's
    ``d_model**-0.5`` scaling; its params gain ``lm_head/kernel = shared/embedding^T``.  The outputs
    are unchanged, but the head is now a layer of its own: what PEFT runs when a tied T5's
    ``lm_head`` is adapted or in ``modules_to_save``.  A module whose head is already untied is
    returned as it is.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> cfg = T5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2)
      >>> model = T5(cfg)
      >>> ids, mask = jnp.array([[5, 7, 1]]), jnp.ones((1, 3), jnp.int32)
      >>> params = model.init(jax.random.key(0), ids, mask, ids)["params"]
      >>> untied, untied_params = untie_head(model, params)
      >>> untied.config.tie_word_embeddings, untied_params["lm_head"]["kernel"].shape
      (False, (8, 32))
      >>> run = lambda module, p: module.apply({"params": p}, ids, mask, ids)
      >>> bool(jnp.allclose(run(untied, untied_params), run(model, params)))
      True
    """
    if not module.config.tie_word_embeddings:
        return module, dict(params)
    # scale_decoder_outputs was resolved (True) when the tied config was made and stays as it is
    untied = module.clone(config=dataclasses.replace(module.config, tie_word_embeddings=False))
    return untied, {**params, "lm_head": {"kernel": jnp.asarray(params["shared"]["embedding"]).T}}


def params_from_hf(
    config: T5Config, state: Mapping[str, np.ndarray], *, scan_layers: bool = False, source: str = "checkpoint"
) -> dict[str, Any]:
    """A transformers state dict -> our params tree (numpy arrays)."""
    state = dict(state)
    if "shared.weight" not in state:
        # Checkpoints may store the embedding only under the stacks' names.
        for name in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
            if name in state:
                state["shared.weight"] = state[name]
                break
    for name in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        if name in state and "shared.weight" in state and not np.array_equal(state[name], state["shared.weight"]):
            raise ValueError(
                f"{source}: {name} differs from shared.weight; T5 shares one input embedding "
                f"between encoder and decoder"
            )
    if config.tie_word_embeddings and "lm_head.weight" in state and "shared.weight" in state:
        if np.array_equal(state["lm_head.weight"], state["shared.weight"]):
            del state["lm_head.weight"]  # a tied head stored twice
    params = hf.params_from_state_dict(
        state, param_shapes(config), hf_torch_key, aliases=HF_KEY_ALIASES, ignore=HF_IGNORED_KEYS, source=source
    )
    return hf.stack_layers(params) if scan_layers else params


_OTHER_HEADS = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering")


def from_pretrained(
    path: str | os.PathLike, *, dtype: Dtype = jnp.float32, scan_layers: bool = False, host: bool = False
) -> tuple[T5, dict[str, Any]]:
    """Load a Hugging Face T5 / T5 v1.1 / FLAN-T5 / mT5 directory as ``(module, params)``.

    Args:
      path: directory with ``config.json`` and ``model.safetensors`` (or shards + index, or
        legacy ``flax_model.msgpack``).
      dtype: computation dtype; params keep the checkpoint's dtype.
      scan_layers: build the stacks with layers under ``nn.scan`` (stacked params).
      host: return the params as host numpy arrays instead of device arrays, to place them
        straight onto a sharding (``boft_jax.sharding.shard_frozen``) so that no device ever holds
        the whole model; by default they are on the default device.
    """
    cfg_dict = hf.read_config(path)
    hf.check_model_type(path, cfg_dict, tuple(MODEL_TYPES))
    encoder_only = [a for a in cfg_dict.get("architectures") or [] if str(a).endswith("EncoderModel")]
    if encoder_only:
        raise ValueError(
            f"{os.fspath(path)!r}: config.json has architectures={encoder_only}, an encoder-only checkpoint"
            f" (no decoder weights); this loader reads encoder-decoder checkpoints ({', '.join(MODEL_TYPES.values())})."
            " For an encoder alone, wrap your own linen encoder with boft.wrap"
        )
    heads = [a for a in cfg_dict.get("architectures") or [] if str(a).endswith(_OTHER_HEADS)]
    if heads:
        raise ValueError(
            f"{os.fspath(path)!r}: config.json has architectures={heads}: a T5 with a task head"
            " (classification / question answering) that this loader does not build; it reads"
            f" {', '.join(MODEL_TYPES.values())} (and T5Model) checkpoints"
        )
    cfg_dict = _with_generation_eos(path, cfg_dict)
    state = hf.load_state_dict(path)
    config = resolve_tying(T5Config.from_hf_dict(cfg_dict), state)
    params = params_from_hf(config, state, scan_layers=scan_layers, source=f"{os.fspath(path)!r}")
    return T5(config, dtype=dtype, scan_layers=scan_layers), jax.tree.map(np.asarray if host else jnp.asarray, params)


def _with_generation_eos(path, cfg_dict: dict) -> dict:
    """``cfg_dict`` with the ``eos_token_id`` of the directory's ``generation_config.json``, which
    transformers' ``generate`` uses over ``config.json``'s.  Its ``pad_token_id`` /
    ``decoder_start_token_id`` are not taken (``config.json``'s also define the training inputs);
    where they differ a warning says so (``generate`` / ``boft.generate_multi`` take them as
    arguments).  Other generation settings (``min_length``, beams, sampling, ...) are not applied:
    :meth:`T5.generate` is plain greedy decoding; a file setting one that changes transformers'
    output (:data:`_GREEDY_CHANGING`) gets a warning naming it.
    """
    file = Path(path) / "generation_config.json"
    if not file.is_file():
        return cfg_dict
    gen = hf._read_json_object(file, "a generation config")
    out = dict(cfg_dict)
    if gen.get("eos_token_id") is not None:
        out["eos_token_id"] = gen["eos_token_id"]
    differ = [f"{k} {gen[k]} (config.json: {cfg_dict.get(k)})" for k in ("pad_token_id", "decoder_start_token_id")
              if gen.get(k) is not None and gen[k] != cfg_dict.get(k)]
    if differ:
        warnings.warn(
            f"{str(file)!r} sets {', '.join(differ)}; boft_jax uses config.json's for the model and"
            " for generate (pass them to generate_multi, or edit config.json, to decode as transformers would)",
            UserWarning, stacklevel=3,
        )
    ignored = {k: v for k, v in gen.items() if k in _GREEDY_CHANGING and v != _GREEDY_CHANGING[k]}
    if ignored:
        warnings.warn(
            f"{str(file)!r} sets {ignored}: transformers' generate applies these, boft_jax's generate (plain"
            " greedy decoding, length from its max_new_tokens argument) does not, so their outputs can differ",
            UserWarning, stacklevel=3,
        )
    return out


# generation_config.json settings that change what transformers' generate returns, with the value
# that leaves greedy decoding as boft_jax's generate does it (max_length / max_new_tokens: the
# caller's max_new_tokens sets the length; sampling knobs matter only with do_sample)
_GREEDY_CHANGING = {
    "num_beams": 1, "do_sample": False, "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0,
    "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "min_length": 0, "min_new_tokens": None,
    "forced_eos_token_id": None, "forced_bos_token_id": None, "suppress_tokens": None,
    "begin_suppress_tokens": None, "bad_words_ids": None, "sequence_bias": None, "force_words_ids": None,
    "constraints": None, "exponential_decay_length_penalty": None, "renormalize_logits": False,
    "num_beam_groups": 1, "penalty_alpha": None, "dola_layers": None,
}
