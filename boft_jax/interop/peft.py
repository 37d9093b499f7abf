"""PEFT BOFT and OFT adapters <-> boft_jax, without torch and without pickle.

A PEFT BOFT adapter is a directory with

- ``adapter_config.json``: ``peft_type: "BOFT"``, ``boft_block_size`` *or* ``boft_block_num``,
  ``boft_n_butterfly_factor``, ``target_modules``, ``boft_dropout``, ``bias``,
  ``modules_to_save``, ``fan_in_fan_out``, ...;
- ``adapter_model.safetensors`` with, for every adapted ``torch.nn.Linear`` named ``<mod>``:
  ``base_model.model.<mod>.boft_R`` of shape ``(m, k, b, b)`` (full matrices ``A``; PEFT uses
  their skew part ``0.5 (A - A^T)``) and ``base_model.model.<mod>.boft_s`` of shape ``(d_out, 1)``;
  trainable biases (``bias="boft_only"``: ``<mod>.base_layer.bias`` of adapted layers;
  ``bias="all"``: every ``<module>.bias``); and the full weights of ``modules_to_save`` modules
  (``<module>.<param>``; PEFT strips its ``modules_to_save.<adapter>`` infix when saving).

A PEFT OFT adapter (``peft_type: "OFT"``, the format of PEFT >= 0.14) holds ``<mod>.oft_R.weight``
of shape ``(r, b(b-1)/2)``, the packed strict upper triangles of its skew blocks (the order of
``numpy.triu_indices(b, 1)``, as ours), or ``(1, b(b-1)/2)`` with ``block_share``.  It is BOFT with
one factor and no output scale; see :func:`load_peft_adapter` for how each OFT option maps.

``<mod>`` is the module name in the *transformers* model: transformers 5 names
(``vit.layers.0.attention.q_proj``, ``vit.layers.0.mlp.fc1``) or transformers 4 ones
(``vit.encoder.layer.0.attention.attention.query``, ``...intermediate.dense``), T5's
``encoder.block.0.layer.0.SelfAttention.q`` in both.  The mapping to our module paths
(``encoder/layer_0/attention/query``) is the models' own ``hf_torch_key`` /
``HF_KEY_ALIASES`` (transformers 5 -> 4 names) / ``HF_KEY_ALIASES_V5`` (4 -> 5).

:func:`load_peft_adapter` gives ``(boft.wrap(module, config), params)`` whose outputs equal
PEFT's (float32, ~1e-6); :func:`save_peft_adapter` writes the inverse, which PEFT loads and
runs to the same outputs.  ``.bin`` adapters (pickles) are refused.

Things PEFT does that we do not copy (each is reported, never silently changed):

- Without its CUDA extension PEFT silently trains with ONE butterfly factor while
  ``adapter_config.json`` still says ``boft_n_butterfly_factor = m``.  The tensors are the
  truth: :func:`load_peft_adapter` warns and uses their factor count.  Conversely PEFT on a
  machine without the extension cannot load an adapter with ``m > 1`` (it builds ``(1, k, b, b)``
  parameters): load it where the extension works, or with an equivalent block-diagonal op (see
  ``tests/fixtures/make_peft_fixtures.py``).
- PEFT's BOFT has only the exact Cayley map; :func:`save_peft_adapter` refuses ``cayley="neumann"``
  for BOFT.  PEFT's OFT has both; its Cayley-Neumann series approximates the *transpose* of its
  exact map, ``(I + S)(I - S)^(-1)``, so its parameters are negated on the way in and out (the
  rotations are then equal term for term).

Example::

    from boft_jax.models import vit
    from boft_jax.interop import load_peft_adapter, save_peft_adapter
    module, params = vit.from_pretrained("path/to/vit")
    model, params = load_peft_adapter("path/to/peft_adapter", module, params)
    logits = model.apply({"params": params}, pixels)
    save_peft_adapter("out_adapter", model, params, base_model_name_or_path="google/vit-base-patch16-224")
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np

from boft_jax.checkpoint import sibling_leftovers
from boft_jax.config import _DEFAULT_NEUMANN_TERMS, BOFTConfig
from boft_jax.linen import BOFTModule, combine, split, wrap
from boft_jax.models import hf, t5, vit
from boft_jax.orthogonal import block_size_from_num_params, pack_skew, unpack_skew

__all__ = [
    "load_peft_adapter",
    "save_peft_adapter",
    "read_peft_adapter",
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "PEFT_PREFIX",
]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
_PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
PEFT_PREFIX = "base_model.model."

KeyStyle = Literal["transformers5", "transformers4"]

_TASK_TYPES = {"vit": None, "t5": "SEQ_2_SEQ_LM"}
_LAYER_RE = re.compile(r"layer_(\d+)")
_BOFT_KEY = re.compile(r"^(?P<mod>.+)\.(?P<kind>boft_R|boft_s)(?:\.(?P<adapter>[^.]+))?$")
_OFT_KEY = re.compile(r"^(?P<mod>.+)\.oft_R(?:\.(?P<adapter>[^.]+))?\.weight$")
_PEFT_TYPES = ("BOFT", "OFT")
PeftType = Literal["BOFT", "OFT"]

Path_ = tuple[str, ...]


# ---------------------------------------------------------------------------------------------
# Model-specific key mapping (delegated to boft_jax.models.<model>)
# ---------------------------------------------------------------------------------------------
def _model_kind(module: Any) -> str:
    if isinstance(module, vit.ViT):
        return "vit"
    if isinstance(module, t5.T5):
        return "t5"
    raise TypeError(
        "PEFT interop needs a boft_jax.models ViT or T5 module (from boft_jax.models.*.from_pretrained),"
        f" got {type(module).__name__}"
    )


class _KeyMap:
    """Hugging Face parameter keys <-> our unrolled param paths, for one model config."""

    def __init__(self, module: Any):
        self.kind = _model_kind(module)
        self.lib = {"vit": vit, "t5": t5}[self.kind]
        self.scan = bool(getattr(module, "scan_layers", False))
        self.shapes: dict[Path_, tuple[int, ...]] = self.lib.param_shapes(module.config)
        self.to_path: dict[str, Path_] = {self.lib.hf_torch_key(p): p for p in self.shapes}
        self.aliases = tuple(getattr(self.lib, "HF_KEY_ALIASES", ()))  # transformers 5 -> 4 names
        self.aliases_v5 = tuple(getattr(self.lib, "HF_KEY_ALIASES_V5", ()))  # transformers 4 -> 5 names
        # known modules of the checkpoints that our model leaves out (the ViT pooler)
        self.left_out_keys = [re.compile(p) for p in getattr(self.lib, "HF_LEFT_OUT_KEYS", ())]
        # A ViT without a head (num_labels = 0) is a bare ViTModel for PEFT: its module names have no "vit."
        self.bare = self.kind == "vit" and module.config.num_labels == 0

    def _candidates(self, key: str) -> list[str]:
        if self.kind == "vit" and not key.startswith(("vit.", "classifier.")):
            return [key, "vit." + key]  # an adapter made on a bare ViTModel
        return [key]

    def path(self, key: str) -> Path_ | None:
        """Our param path for a Hugging Face param key (transformers 4 or 5 names), or None."""
        for k in self._candidates(key):
            for pattern, repl in self.aliases:
                k = re.sub(pattern, repl, k)
            if k in self.to_path:
                return self.to_path[k]
        return None

    def left_out(self, key: str) -> bool:
        """Whether ``key`` belongs to a known module that our model leaves out (the ViT pooler)."""
        return any(p.fullmatch(k) for k in self._candidates(key) for p in self.left_out_keys)

    def key(self, path: Path_, style: KeyStyle) -> str:
        """The Hugging Face param key of our unrolled param ``path`` (a headless ViT's without ``vit.``)."""
        k = self.lib.hf_torch_key(path)
        if style == "transformers5":
            for pattern, repl in self.aliases_v5:
                k = re.sub(pattern, repl, k)
        elif style != "transformers4":
            raise ValueError(f"key_style must be 'transformers5' or 'transformers4', got {style!r}")
        return k.removeprefix("vit.") if self.bare else k

    def module_name(self, module_path: Path_, style: KeyStyle) -> str:
        """Hugging Face module name of our Dense at ``module_path`` (via its kernel's key)."""
        k = self.key((*module_path, "kernel"), style)
        assert k.endswith(".weight"), k
        return k[: -len(".weight")]


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
def _adapter_dir(adapter_dir: str | os.PathLike) -> Path:
    p = Path(adapter_dir)
    if not p.is_dir():
        olds = sorted((q for q in sibling_leftovers(p, "old") if q.is_dir()), key=lambda q: q.stat().st_mtime)
        hint = (f" A save_peft_adapter that replaced it was interrupted: the previous adapter is in {olds[-1]};"
                " rename it back" if olds and not p.exists() else "")
        raise FileNotFoundError(
            f"{os.fspath(adapter_dir)!r} is not a directory; expected a PEFT adapter directory with"
            f" {ADAPTER_CONFIG_NAME} and {ADAPTER_WEIGHTS_NAME}.{hint}"
        )
    return p


def named_adapters_hint(folder: Path) -> str:
    """A sentence naming the PEFT adapters in ``folder``'s subfolders (PEFT's ``save_pretrained``
    of a model with several named adapters writes all but "default" there), or ``""``."""
    named = sorted(q.name for q in folder.iterdir() if (q / ADAPTER_CONFIG_NAME).is_file()) if folder.is_dir() else []
    if not named:
        return ""
    return (f" Its subfolders {named} are PEFT adapters (PEFT saves several named adapters that way): pass one"
            f" of them, e.g. {str(folder / named[0])!r}")


def read_adapter_config(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``adapter_config.json`` of a PEFT adapter directory as a dict (a ``ValueError`` naming the
    file when it is not readable JSON or not an object)."""
    cfg_file = Path(adapter_dir) / ADAPTER_CONFIG_NAME
    try:
        with open(cfg_file, encoding="utf-8") as f:
            config = json.load(f)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{str(cfg_file)!r} is not readable JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{str(cfg_file)!r} holds a JSON {type(config).__name__}, not the object of a PEFT adapter config")
    return config


def _cfg_field(cfg: Mapping[str, Any], key: str, default: Any, kind: type, where: str) -> Any:
    """``cfg[key]`` (``default`` when absent or null) as ``kind`` (int, float or bool), or a
    ``ValueError`` naming the field.  JSON booleans only for ``bool`` (``bool("false")`` is True);
    integral numbers only for ``int``."""
    v = cfg.get(key)
    if v is None:  # a JSON null is falsy to PEFT (``if config.coft:``); an absent field is its default
        return False if kind is bool and key in cfg else default
    if kind is bool:
        ok = isinstance(v, bool)
    elif kind is int:
        ok = isinstance(v, int) and not isinstance(v, bool) or isinstance(v, float) and v.is_integer()
    else:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool)
    if not ok:
        want = {bool: "true or false", int: "an integer", float: "a number"}[kind]
        raise ValueError(f"{where}: adapter_config.json field {key!r} is {v!r}; expected {want}")
    return kind(v)


# The fields of PEFT's (0.21) BOFTConfig / OFTConfig, those of its PeftConfig base included.
_PEFT_COMMON_FIELDS = frozenset({
    "auto_mapping", "base_model_name_or_path", "bias", "exclude_modules", "fan_in_fan_out", "inference_mode",
    "init_weights", "layers_pattern", "layers_to_transform", "modules_to_save", "peft_type", "peft_version",
    "revision", "target_modules", "task_type",
})
_PEFT_FIELDS = {
    "BOFT": _PEFT_COMMON_FIELDS | {"boft_block_num", "boft_block_size", "boft_dropout", "boft_n_butterfly_factor"},
    "OFT": _PEFT_COMMON_FIELDS | {"block_share", "coft", "eps", "module_dropout", "num_cayley_neumann_terms",
                                  "oft_block_size", "r", "use_cayley_neumann"},
}


def _check_config_fields(config: Mapping[str, Any], peft_type: str, where: str) -> None:
    """The module-selecting fields have the JSON types PEFT reads (an error naming the field
    otherwise); fields PEFT's config does not have are warned about (PEFT ignores them too, with a
    warning; one from a newer PEFT might change what the adapter computes)."""
    def one_or_list(v, is_item):  # an item, or a list of items
        return is_item(v) or (isinstance(v, list) and all(map(is_item, v)))

    def strings(v):
        return one_or_list(v, lambda x: isinstance(x, str))

    def ints(v):
        return one_or_list(v, lambda x: isinstance(x, int) and not isinstance(x, bool))

    checks = {
        "target_modules": ("a string (a regex) or a list of module names", strings),
        "exclude_modules": ("a string (a regex) or a list of module names", strings),
        "modules_to_save": ("a list of module names", strings),
        "layers_pattern": ("a string or a list of strings", strings),
        "layers_to_transform": ("an integer or a list of integers", ints),
    }
    for key, (want, ok) in checks.items():
        if config.get(key) is not None and not ok(config[key]):
            raise ValueError(f"{where}: adapter_config.json field {key!r} is {config[key]!r}; expected {want} (or null)")
    size, num = ("boft_block_size", "boft_block_num") if peft_type == "BOFT" else ("oft_block_size", "r")
    if _cfg_field(config, size, 0, int, where) and _cfg_field(config, num, 0, int, where):
        raise ValueError(
            f"{where}: adapter_config.json sets both {size} = {config[size]} and {num} = {config[num]}; PEFT"
            " refuses a config with both (one of them must be 0). Set the one the adapter was trained with"
        )
    unknown = sorted(set(config) - _PEFT_FIELDS[peft_type])
    if unknown:
        warnings.warn(
            f"{where}: adapter_config.json has field(s) {unknown} that PEFT 0.21's {peft_type}Config does not have;"
            " boft_jax ignores them (as PEFT does, with a warning). If they come from a newer PEFT and change what"
            " the adapter computes, the loaded adapter may differ from PEFT's",
            UserWarning,
            stacklevel=3,
        )


def read_peft_adapter(adapter_dir: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(adapter_config, tensors)`` of a PEFT BOFT or OFT adapter directory, checked, nothing unpickled.

    Raises:
      FileNotFoundError: missing files; only a pickled ``adapter_model.bin`` is present.
      ValueError: ``peft_type`` is neither ``"BOFT"`` nor ``"OFT"``; an OFT adapter in the format of
        PEFT < 0.14 (no ``oft_block_size``); ``fan_in_fan_out`` is set.

    Example (an adapter written by :func:`save_peft_adapter` for a tiny random ViT):
      >>> import os, tempfile, jax, jax.numpy as jnp, numpy as np
      >>> import boft_jax as boft
      >>> from boft_jax.models import vit
      >>> from boft_jax.interop import read_peft_adapter, save_peft_adapter
      >>> base = vit.ViT(vit.ViTConfig(image_size=8, patch_size=4, hidden_size=8, num_hidden_layers=1,
      ...                              num_attention_heads=2, intermediate_size=16, num_labels=3))
      >>> cfg = boft.BOFTConfig(block_size=4, n_factors=2, targets=vit.TARGET_PRESETS["attention_qv"])
      >>> model, x = boft.wrap(base, cfg), jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
      >>> rng = np.random.default_rng(0)            # random weights stand in for vit.from_pretrained's
      >>> frozen = jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32),
      ...                       jax.eval_shape(base.init, jax.random.key(0), x)["params"])
      >>> adapter = jax.tree.map(lambda a: a + 0.1, boft.init_adapter(model, frozen, x))  # as if trained
      >>> params = boft.combine(frozen, adapter)
      >>> with tempfile.TemporaryDirectory() as d:
      ...     save_peft_adapter(d, model, params)
      ...     peft_config, tensors = read_peft_adapter(d)
      >>> peft_config["peft_type"], peft_config["boft_block_size"], peft_config["boft_n_butterfly_factor"]
      ('BOFT', 4, 2)
      >>> {k: v.shape for k, v in sorted(tensors.items())}  # boft_R: (m, k, b, b); boft_s: (d_out, 1)
      {'base_model.model.vit.layers.0.attention.q_proj.boft_R': (2, 2, 4, 4),
       'base_model.model.vit.layers.0.attention.q_proj.boft_s': (8, 1),
       'base_model.model.vit.layers.0.attention.v_proj.boft_R': (2, 2, 4, 4),
       'base_model.model.vit.layers.0.attention.v_proj.boft_s': (8, 1)}
    """
    p = _adapter_dir(adapter_dir)
    cfg_file, weights = p / ADAPTER_CONFIG_NAME, p / ADAPTER_WEIGHTS_NAME
    if not cfg_file.is_file():
        raise FileNotFoundError(
            f"{str(p)!r} has no {ADAPTER_CONFIG_NAME}; found {sorted(x.name for x in p.iterdir())}.{named_adapters_hint(p)}"
        )
    config = read_adapter_config(p)
    peft_type = config.get("peft_type")
    if peft_type not in _PEFT_TYPES:
        raise ValueError(
            f"{str(cfg_file)!r} has peft_type {peft_type!r}; load_peft_adapter reads only BOFT and OFT adapters"
            " (peft_type 'BOFT' or 'OFT')"
        )
    where = f"PEFT {peft_type} adapter {str(p)!r}"
    _check_config_fields(config, peft_type, where)
    if peft_type == "OFT" and "oft_block_size" not in config:
        raise ValueError(
            f"{str(cfg_file)!r} is an OFT adapter in the format of PEFT < 0.14 (no 'oft_block_size'), whose"
            " parameters mean something else; PEFT >= 0.14 refuses it too. Retrain it with PEFT >= 0.14."
        )
    if _cfg_field(config, "fan_in_fan_out", False, bool, where):
        raise ValueError(
            f"{str(cfg_file)!r} has fan_in_fan_out = true (weights stored (fan_in, fan_out), e.g. GPT-2's"
            " Conv1D); only PEFT Linear layers with fan_in_fan_out = false are supported"
        )
    if not weights.is_file():
        pickled = [name for name in _PICKLE_NAMES if (p / name).is_file()]
        if pickled:
            raise FileNotFoundError(
                f"{str(p)!r} holds the adapter weights only as {pickled[0]}, a pickle, which boft_jax never"
                f" loads. Re-save it as {ADAPTER_WEIGHTS_NAME} with PEFT:"
                " `PeftModel.from_pretrained(base, path).save_pretrained(path, safe_serialization=True)`"
            )
        raise FileNotFoundError(
            f"{str(p)!r} has no {ADAPTER_WEIGHTS_NAME}; found {sorted(x.name for x in p.iterdir())}"
        )
    from boft_jax.models.hf import _load_safetensors  # a damaged file is a ValueError naming it

    tensors = _load_safetensors(weights)
    bad = [f"{k} ({int(np.size(v) - np.isfinite(v).sum())} of {np.size(v)})" for k, v in sorted(tensors.items())
           if jnp.issubdtype(np.asarray(v).dtype, jnp.inexact) and not np.isfinite(v).all()]
    if bad:
        raise ValueError(
            f"{str(weights)!r}: {len(bad)} tensor(s) hold NaN or infinite values, which would make every output"
            f" of the adapted layers NaN: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}. The training run"
            " that wrote them diverged; use an earlier checkpoint of it"
        )
    return config, tensors


def _strip_prefix(key: str) -> str:
    return key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key


def _fmt(items, limit: int = 40) -> str:
    items = list(items)
    shown = "\n    ".join(items[:limit])
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"\n    {shown}{more}"


def _unflatten(flat: Mapping[Path_, Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value
    return tree


def _flatten(tree: Mapping, prefix: Path_ = ()) -> dict[Path_, Any]:
    out: dict[Path_, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, (*prefix, str(k))))
        else:
            out[(*prefix, str(k))] = v
    return out


def _stack_path(path: Path_) -> Path_:
    """``encoder/layer_3/...`` -> ``encoder/layers/...`` (the scan_layers layout)."""
    for j, part in enumerate(path):
        if _LAYER_RE.fullmatch(part):
            return (*path[:j], "layers", *path[j + 1:])
    return path


def _check_stackable(flat: Mapping[Path_, Any], shapes: Mapping[Path_, Any], what: str) -> None:
    """A scan_layers model needs every entry to exist on every layer of its stack."""
    n_layers: dict[Path_, set[int]] = {}
    for p in shapes:
        for j, part in enumerate(p):
            if m := _LAYER_RE.fullmatch(part):
                n_layers.setdefault(p[:j], set()).add(int(m.group(1)))
                break
    groups: dict[tuple[Path_, Path_], set[int]] = {}
    for p in flat:
        for j, part in enumerate(p):
            if m := _LAYER_RE.fullmatch(part):
                groups.setdefault((p[:j], p[j + 1:]), set()).add(int(m.group(1)))
                break
    bad = [
        f"{'/'.join((*head, 'layer_*', *tail))}: layers {sorted(idx)} of {len(n_layers[head])}"
        for (head, tail), idx in sorted(groups.items())
        if idx != n_layers[head]
    ]
    if bad:
        raise ValueError(
            f"the model was built with scan_layers=True, whose stacked params need the same {what} on every"
            f" layer, but this adapter has:{_fmt(bad)}\n  Load the base model with scan_layers=False."
        )


def _t5_saved_modules(
    module: Any, params: Mapping, keymap: _KeyMap, plain: dict, mts_names: list, where: str, adapted: set[str]
):
    """PEFT's ``modules_to_save`` copies of T5's embedding and tied head, read as PEFT runs them.

    - ``shared`` in ``modules_to_save``: PEFT swaps ``model.shared`` for a wrapper, but T5's encoder
      and decoder read their own ``embed_tokens`` (the original module) and a tied head keeps the
      original weight, so PEFT's outputs never depend on the saved copy.  It is not applied here
      either, and a warning says so.
    - ``lm_head.weight`` for a tied base (original T5): PEFT's copy is an untied head, and the
      decoder output keeps its ``d_model**-0.5`` scaling; the module is rebuilt that way, its base
      ``lm_head`` being the tied one (the shared embedding, transposed).  The same for an adapted
      ``lm_head`` (in ``adapted``, the HF names of adapted modules): PEFT rotates the input of the
      tied head, which the untied copy reproduces.
    """
    plain = dict(plain)
    stacks = sorted(k for k in plain if re.fullmatch(r"(encoder|decoder)\.embed_tokens\.weight", k))
    if stacks:
        raise ValueError(
            f"{where}: holds PEFT's modules_to_save copies of T5's per-stack token embeddings ({', '.join(stacks)};"
            f" modules_to_save {mts_names}). PEFT trains a separate copy of the shared embedding for each of"
            " encoder.embed_tokens and decoder.embed_tokens (the tied head keeps the original), which boft_jax's T5"
            " cannot represent: its encoder, decoder and tied head read one 'shared' embedding. Retrain without"
            " 'embed_tokens' in modules_to_save (or finetune the embedding in full outside PEFT)."
        )
    if "shared" in mts_names and "shared.weight" in plain:
        value = plain.pop("shared.weight")
        mts_names = [n for n in mts_names if n != "shared"]
        warnings.warn(
            f"{where}: modules_to_save holds T5's 'shared' embedding; its saved copy (shape"
            f" {tuple(value.shape)}) is not applied, because PEFT never uses it either (T5's encoder"
            " and decoder read their own embed_tokens, which PEFT leaves as they are), so applying it"
            " would make the outputs differ from PEFT's. It is not written back by save_peft_adapter.",
            UserWarning,
            stacklevel=3,
        )
    if module.config.tie_word_embeddings and ("lm_head.weight" in plain or "lm_head" in adapted):
        module, params = t5.untie_head(module, params)
        keymap = _KeyMap(module)
    return module, params, keymap, plain, mts_names


def _check_base_copies(
    copies: Mapping[str, np.ndarray], keymap: _KeyMap, params: Mapping
) -> tuple[list[str], list[str]]:
    """PEFT's copies of adapted layers' frozen weights (``<mod>.base_layer.weight``; it saves them
    for layers it counts as embeddings, e.g. ``lm_head``): they must equal the base model's, which
    then stays as it is.  Returns ``(keys the model lacks, copies that differ)``."""
    if not copies:
        return [], []
    base_flat = hf.flatten_params(hf.unstack_layers(params) if keymap.scan else params)
    missing, differing = [], []
    for key, value in sorted(copies.items()):
        path = keymap.path(key)
        if path is None or path not in base_flat:
            missing.append(f"{key} (shape {tuple(value.shape)}; a base weight under base_layer of a module the model lacks)")
            continue
        ours = np.asarray(base_flat[path], np.float32)
        theirs = np.asarray(hf.from_torch_layout(path, value), np.float32)
        eps = float(jnp.finfo(base_flat[path].dtype).eps)  # the base's own precision (bf16 or float32)
        if ours.shape != theirs.shape or np.abs(ours - theirs).max() > 4 * eps * max(1.0, float(np.abs(ours).max())):
            diff = "shape " + str(theirs.shape) if ours.shape != theirs.shape else f"max |diff| {np.abs(ours - theirs).max():.3g}"
            differing.append(
                f"{key} -> '{'/'.join(path)}': PEFT's copy of this adapted layer's base weight differs from the"
                f" model's ({diff}), so it was made for another base model"
            )
    return missing, differing


def _left_out(module: str) -> str:
    """The problem of an adapter entry for a module that the base checkpoint has but our model leaves
    out (``HF_LEFT_OUT_KEYS``: the ViT pooler)."""
    return (f"{module}: the adapter trains the ViT pooler of a ViTModel checkpoint, which ViTForImageClassification"
            " does not use and boft_jax's ViT does not have; boft_jax cannot load an adapter on it (retrain"
            " without it, or drop its tensors if the output you use does not read it)")


def _boft_layer(entry: Mapping[str, np.ndarray], d_in: int, d_out: int, here: str):
    """``(problem, None)`` or ``(None, (packed skew (m, k, n), scale (d_out,)))`` of one PEFT BOFT layer."""
    if set(entry) != {"boft_R", "boft_s"}:
        missing = {"boft_R", "boft_s"} - set(entry)
        return f"{here}: has {sorted(entry)} but no {sorted(missing)}", None
    R, s = entry["boft_R"], entry["boft_s"]
    if R.ndim != 4 or R.shape[-1] != R.shape[-2]:
        return f"{here}: boft_R has shape {tuple(R.shape)}, expected (m, k, b, b)", None
    m, k, b, _ = R.shape
    if k * b != d_in:
        return (
            f"{here}: boft_R {tuple(R.shape)} covers k * b = {k} * {b} = {k * b} input features, but the layer"
            f" has d_in = {d_in}"
        ), None
    if s.shape not in ((d_out, 1), (d_out,)):
        return f"{here}: boft_s has shape {tuple(s.shape)}, expected ({d_out}, 1) for d_out = {d_out}", None
    return None, (np.asarray(pack_skew(jnp.asarray(R, jnp.float32))), s.reshape(d_out).astype(np.float32))


@dataclasses.dataclass(frozen=True)
class _OftOptions:
    """What a PEFT OFT ``adapter_config.json`` asks for, and how each layer's ``oft_R`` maps to ours.

    PEFT's OFT layer computes ``base(x @ blockdiag(R_0 .. R_{r-1}))``: BOFT with one factor and no
    output scale (ours is set to 1).  Its rotation: exact ``R = (I - S)(I + S)^(-1)`` (our exact
    map), or with ``use_cayley_neumann`` the series ``R = I + 2S + 2S^2 + ... + 2S^(t-1) + S^t =
    (I + S) sum_{j<t} S^j``, which approximates ``(I + S)(I - S)^(-1)``, the transpose: our Neumann
    map of ``-S`` with ``t`` terms, term for term.  ``t`` is ``num_cayley_neumann_terms - 1``, except
    that PEFT 0.18-0.21 computes 3 terms for both 3 and 4.  With 2 terms PEFT computes ``I + 2S``:
    our one-term map ``I - S'`` of ``S' = -2S``.  With 1 term PEFT computes ``I`` (the adapter does
    nothing), which is refused.  Our two-term map ``(I - S)^2`` has no PEFT counterpart.
    """

    neumann_terms: int | None  # ours; None: exact
    coft_eps: float | None
    block_share: bool

    @staticmethod
    def ours_from_peft_terms(n: int) -> int:
        """Our ``neumann_terms`` for PEFT's ``num_cayley_neumann_terms = n >= 2``."""
        return {2: 1, 3: 3}.get(n, n - 1)

    @staticmethod
    def peft_from_our_terms(t: int) -> int:
        """PEFT's ``num_cayley_neumann_terms`` for our ``neumann_terms = t`` (1 or >= 3; inverse of the above)."""
        return 2 if t == 1 else t + 1

    @staticmethod
    def factor(neumann_terms: int | None) -> float:
        """Our packed parameters = factor * PEFT's, for our ``neumann_terms`` (None: the exact map).

        1 for the exact map; -1 for the Neumann map (PEFT's approximates the transpose); -2 for one
        term (PEFT's two-term ``I + 2S`` is our ``I - S'`` with ``S' = -2S``).
        """
        if neumann_terms is None:
            return 1.0
        return -2.0 if neumann_terms == 1 else -1.0

    @staticmethod
    def read(cfg: Mapping[str, Any], where: str) -> _OftOptions:
        terms = None
        if "use_cayley_neumann" not in cfg:
            warnings.warn(
                f"{where}: adapter_config.json has no use_cayley_neumann (an OFT adapter from before PEFT added that"
                " option); PEFT >= 0.16 then uses its default, the Cayley-Neumann map with"
                f" {cfg.get('num_cayley_neumann_terms', 5)} terms, and so does boft_jax. If the adapter was trained with"
                " the exact Cayley map, set \"use_cayley_neumann\": false in adapter_config.json",
                UserWarning,
                stacklevel=3,
            )
        if _cfg_field(cfg, "use_cayley_neumann", True, bool, where):
            n = _cfg_field(cfg, "num_cayley_neumann_terms", 5, int, where)
            if n <= 1:
                raise ValueError(
                    f"{where}: use_cayley_neumann with num_cayley_neumann_terms = {n}: PEFT then uses the"
                    " rotation I (the adapter does nothing), which no rotation map of boft_jax reproduces from"
                    " these parameters; num_cayley_neumann_terms >= 2 or use_cayley_neumann = false can be loaded"
                )
            terms = _OftOptions.ours_from_peft_terms(n)
            version = str(cfg.get("peft_version") or "0").partition("@")[0]
            if "use_cayley_neumann" in cfg and _version_tuple(version) < (0, 18):
                warnings.warn(
                    f"{where}: uses the Cayley-Neumann map but was written by PEFT {version if version != '0' else '< 0.18'};"
                    " PEFT changed that map in 0.18, so this adapter was trained with another rotation. It is loaded"
                    " with the new map, as PEFT >= 0.18 does (retrain it to get what you trained)",
                    UserWarning,
                    stacklevel=3,
                )
        coft = _cfg_field(cfg, "coft", False, bool, where)
        return _OftOptions(
            neumann_terms=terms,
            coft_eps=_cfg_field(cfg, "eps", 6e-5, float, where) if coft else None,
            block_share=_cfg_field(cfg, "block_share", False, bool, where),
        )

    def layer(self, weight: np.ndarray, d_in: int, d_out: int, here: str):
        """``(problem, None)`` or ``(None, (packed skew (1, k, n), scale = ones (d_out,)))``."""
        if weight.ndim != 2:
            return f"{here}: oft_R.weight has shape {tuple(weight.shape)}, expected (r, b(b-1)/2)", None
        try:
            b = block_size_from_num_params(weight.shape[1])
        except ValueError as e:
            return f"{here}: oft_R.weight has shape {tuple(weight.shape)}: {e}", None
        rows = weight.shape[0]
        if d_in % b:
            return f"{here}: oft_R.weight {tuple(weight.shape)} holds blocks of size b = {b}, which do not divide d_in = {d_in}", None
        k = d_in // b
        if rows != (1 if self.block_share else k):
            expected = "1 row (block_share = true)" if self.block_share else f"r = d_in / b = {d_in} / {b} = {k} rows"
            return f"{here}: oft_R.weight has shape {tuple(weight.shape)}, expected {expected}", None
        w = weight.astype(np.float32)
        if self.coft_eps is not None:
            # PEFT projects the weight (in place, at every forward) onto the ball ||S||_F <= eps / sqrt(rows)
            # around 0; ||S||_F = sqrt(2) |w| for a skew S built from its packed upper triangle w.
            radius = np.float32(self.coft_eps) / np.sqrt(np.float32(rows))
            norm = np.sqrt(np.float32(2.0) * np.sum(w * w, axis=-1, keepdims=True))
            w = np.where(norm <= radius, w, radius * (w / np.maximum(norm, np.finfo(np.float32).tiny)))
        w = np.float32(self.factor(self.neumann_terms)) * w
        w = np.broadcast_to(w, (k, w.shape[1])) if self.block_share else w
        return None, (np.ascontiguousarray(w[None]), np.ones((d_out,), np.float32))


def _oft_structure(
    cfg_bs: int, cfg_bn: int, bs: list[int], ks: list[int], layers: Mapping, where: str, show, block_share: bool = False
) -> dict:
    """``{"block_size": b}`` or ``{"block_num": r}`` for a PEFT OFT adapter, plus
    ``block_size_overrides`` where no single value describes every layer.

    PEFT's OFT silently adjusts an ``oft_block_size`` / ``r`` that does not divide a layer's width
    (with a warning when the adapter is made) and records the requested value, so the tensors are
    the truth: this warns when they disagree with the config.  When the layers differ in both block
    size and block count (layers of different widths, some adjusted), the requested value stays the
    config's and each layer it does not describe gets its tensors' block size as an override.
    """
    want = {"block_num": cfg_bn} if cfg_bn > 0 and not cfg_bs else {"block_size": cfg_bs}
    (field, value), = want.items()
    have = bs if field == "block_size" else ks
    if have == [value]:
        return want
    if len(bs) == 1:
        structure = {"block_size": bs[0]}
    elif len(ks) == 1:
        structure = {"block_num": ks[0]}
    else:
        overrides = {}
        for p, (w, _) in sorted(layers.items()):
            k, b = w.shape[1], block_size_from_num_params(w.shape[2])
            if (b if field == "block_size" else k) != value:
                overrides["^" + re.escape("/".join(show(p)))] = b
        structure = {**want, "block_size_overrides": tuple(overrides.items())}
    name = {"block_size": "oft_block_size", "block_num": "r"}[field]
    using = (
        f"{next(iter(structure))} = {next(iter(structure.values()))}"
        if "block_size_overrides" not in structure
        else f"{name} where it divides the layer's width, and each other layer's own block size"
        f" (block_size_overrides, {len(structure['block_size_overrides'])} layer(s))"
    )
    warnings.warn(
        f"{where}: adapter_config.json says {name} = {value}, but its oft_R tensors hold"
        f" {'blocks of size' if field == 'block_size' else 'block counts'} {have}"
        f"{' (block_share: a layer stores one block of size b and uses it d_in / b times)' if block_share else ''}"
        f" (PEFT adjusts a value that does not divide a layer's width); using the tensors: {using}",
        UserWarning,
        stacklevel=3,
    )
    return structure


def _peft_oft_adjusted(d_in: int, value: int) -> int:
    """The ``oft_block_size`` or ``r`` PEFT's OFT uses for a layer of width ``d_in`` when asked for
    ``value``: ``value`` if it divides ``d_in``, else the nearest divisor (the lower one on a tie;
    ``d_in`` if ``value`` exceeds it), as PEFT's ``adjust_oft_parameters`` does."""
    if d_in % value == 0 and value <= d_in:
        return value
    if value >= d_in:
        return d_in
    higher = next(h for h in range(value, d_in + 1) if d_in % h == 0)
    lower = next(h for h in range(value, 0, -1) if d_in % h == 0)
    return lower if value - lower <= higher - value else higher


def _peft_structure_field(config: BOFTConfig, dims: Mapping[Path_, tuple[int, int, int]], oft: bool) -> tuple[str, int]:
    """The one ``("block_size" | "block_num", value)`` PEFT's config can hold that gives every
    adapted layer (``path -> (d_in, block size, block count)``) its block structure: exactly for
    BOFT, through PEFT's per-layer adjustment for OFT.  The config's own value is tried first."""
    own = ("block_size", config.block_size) if config.block_size is not None else ("block_num", config.block_num)
    candidates = [own]
    for _, b, k in dims.values():
        candidates += [("block_size", b), ("block_num", k)]

    def gives(field: str, value: int) -> bool:
        for d_in, b, k in dims.values():
            want = b if field == "block_size" else k
            if (_peft_oft_adjusted(d_in, value) if oft else value) != want:
                return False
        return True

    for field, value in dict.fromkeys(candidates):
        if gives(field, value):
            return field, value
    listed = [f"{'/'.join(p)}: d_in = {d}, block size {b}, {k} blocks" for p, (d, b, k) in sorted(dims.items())]
    rule = (
        "one oft_block_size or r for all layers, adjusted per layer to the nearest divisor of its width"
        if oft
        else "one boft_block_size or boft_block_num for all layers"
    )
    raise ValueError(f"PEFT's {'OFT' if oft else 'BOFT'} config holds {rule}; no single value gives these layers' blocks:{_fmt(listed)}")


def _version_tuple(version: str) -> tuple[int, ...]:
    out = []
    for part in version.split(".")[:3]:
        digits = re.match(r"\d*", part).group()
        out.append(int(digits) if digits else 0)
    return tuple(out)


def _peft_saves(module_name: str, mts_names: list[str]) -> bool:
    """Whether PEFT (0.21, ``_set_trainable``) puts the module ``module_name`` in modules_to_save: its
    name ends with one of the entries, as a plain string (``"embeddings"`` also selects
    ``"vit.embeddings.patch_embeddings"``)."""
    return any(module_name.endswith(e) for e in mts_names)


def _peft_nested_saved_modules(plain: Mapping[str, Any], mts_names: list[str]) -> list[tuple[str, str]]:
    """``(outer, inner)`` module names, both selected by :func:`_peft_saves`, ``inner`` inside ``outer``,
    among the modules that own the parameter keys ``plain`` (outermost selected module first)."""
    modules = sorted({".".join(k.split(".")[:i]) for k in plain for i in range(1, len(k.split(".")))})
    selected = [m for m in modules if _peft_saves(m, mts_names)]
    return sorted({(o, i) for o in selected for i in selected if i.startswith(o + ".")})


def _selected_without_tensors(cfg: Mapping[str, Any], keymap: _KeyMap, found: Mapping[str, Any]) -> list[str]:
    """Linear modules of the model that ``cfg`` selects (as PEFT would) but ``found`` holds no tensors
    for, named as the file names its modules (transformers 4 or 5 names, with or without ``vit.``).
    Empty when the config leaves the targets to PEFT's defaults or the file names no known module."""
    targets = cfg.get("target_modules")
    if not found or targets is None or (isinstance(targets, str) and targets.lower() == "all-linear"):
        return []
    # every 2-D (Linear) kernel's module name in each naming: transformers 4 / 5, with / without "vit."
    styles = []
    for p, shape in keymap.shapes.items():
        if p[-1] == "kernel" and len(shape) == 2:
            names = [keymap.module_name(p[:-1], s) for s in ("transformers4", "transformers5")]
            styles.append(names + [n.removeprefix("vit.") for n in names])
    have = set(found)
    # the naming the file uses: the one that spells its adapted modules
    counts = [sum(names[i] in have for names in styles) for i in range(4)]
    style = int(np.argmax(counts))
    if counts[style] == 0:
        return []
    return [n for n in (names[style] for names in styles) if n not in have and _peft_selects(cfg, n)]


def _peft_selects(cfg: Mapping[str, Any], name: str) -> bool:
    """Whether PEFT (0.21) would put an adapter on the module ``name`` given ``adapter_config.json``'s
    ``target_modules`` / ``exclude_modules`` / ``layers_to_transform`` / ``layers_pattern``, as its
    ``check_target_module_exists`` decides.  ``True`` when the config leaves it to PEFT's defaults
    (``target_modules`` absent or ``"all-linear"``), which this check does not model."""
    exclude = cfg.get("exclude_modules")
    if isinstance(exclude, str) and re.fullmatch(exclude, name):
        return False
    if isinstance(exclude, (list, tuple)) and (name in exclude or any(name.endswith(f".{e}") for e in exclude)):
        return False
    saved = cfg.get("modules_to_save") or []
    if any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in ([saved] if isinstance(saved, str) else saved)):
        return False  # PEFT never adapts a module it trains in full
    targets = cfg.get("target_modules")
    if targets is None or (isinstance(targets, str) and targets.lower() == "all-linear"):
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    if name in targets:
        return True
    if not any(name.endswith(f".{t}") for t in targets):
        return False
    layers = cfg.get("layers_to_transform")
    if layers is None or (isinstance(layers, list) and not layers):
        return True
    patterns = cfg.get("layers_pattern")
    if not patterns:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        m = None
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            if m := re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name):
                break
    if m is None:
        return False
    return int(m.group("idx")) == layers if isinstance(layers, int) else int(m.group("idx")) in layers


def load_peft_adapter(
    adapter_dir: str | os.PathLike, module: Any, params: Mapping[str, Any]
) -> tuple[BOFTModule, dict]:
    """Load a PEFT BOFT or OFT adapter onto a boft_jax ViT / T5: ``(wrapped_module, params)``.

    Args:
      adapter_dir: PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``),
        ``peft_type`` ``"BOFT"`` or ``"OFT"`` (PEFT >= 0.14).
      module, params: the base model, from ``boft_jax.models.vit.from_pretrained`` /
        ``t5.from_pretrained`` (``scan_layers`` either way; with ``scan_layers=True`` every layer
        of a stack must carry the same adapter).  A ViT adapter whose ``modules_to_save`` holds a
        new classifier needs a base loaded with that ``num_labels``.

    Returns:
      ``boft.wrap(module, config)`` and the combined params (:class:`boft_jax.BOFTKernel` nodes at
      the adapted layers, PEFT's trained biases and ``modules_to_save`` weights in place).  The
      :class:`boft_jax.BOFTConfig` (``wrapped.config``) has ``block_size`` (or ``block_num``, as in
      the PEFT config) and ``n_factors`` from the tensors, ``targets`` = exact regexes of the
      adapted paths, ``bias``/``dropout`` from the PEFT config and ``modules_to_save`` = exact
      regexes of the saved modules.

    Raises:
      ValueError: not a BOFT / OFT adapter; ``fan_in_fan_out``; adapter tensors of a kind boft_jax
        does not load, e.g. PEFT's OFT on an embedding layer (all listed); keys naming modules the
        model lacks (all listed); tensors that do not fit their layer or the butterfly structure (all listed);
        an OFT Cayley-Neumann series of 1 term (PEFT's rotation is then ``I`` whatever the parameters).
      FileNotFoundError: missing files, or only a pickled ``adapter_model.bin``.

    OFT adapters become ``n_factors = 1`` with every output scale 1 (OFT has none; they train in
    boft_jax unless frozen): ``oft_block_size`` / ``r`` -> ``block_size`` / ``block_num`` (from the
    tensors, with a warning, when PEFT had adjusted a value that did not divide a layer's width);
    ``use_cayley_neumann`` -> ``cayley="neumann"`` with ``neumann_terms = num_cayley_neumann_terms - 1``
    (3 for 3 or 4, as PEFT computes) and negated parameters (PEFT's series approximates the transposed
    map; for 2 terms, PEFT's ``I + 2S``: ``neumann_terms = 1`` and parameters times -2); ``oft_only``
    (as every ``*_only`` value, which PEFT reads as "the adapted layers' biases") -> ``"boft_only"``;
    a dropout outside ``[0, 1]`` (PEFT saves one) -> 0, with a warning; ``module_dropout`` -> ``dropout`` (PEFT 0.21 defines it but never applies it
    in its Linear forward; boft_jax applies it in training); ``block_share`` -> the
    shared block copied to every block; ``coft`` -> the rotations projected as PEFT projects them before
    each forward (both with a warning: training in boft_jax keeps neither constraint).

    T5 specifics, matching what PEFT computes: ``lm_head`` in ``modules_to_save`` or among the
    adapted layers on a tied base (original T5) makes the returned module's head untied
    (``wrapped.model.config``), with the decoder output's ``d_model**-0.5`` scaling kept;
    PEFT's copy of an adapted head's base weight (``lm_head.base_layer.weight``) must equal the
    model's; a saved copy of ``shared`` is not applied (PEFT's
    T5 forward never reads it) and a warning says so.

    Warns:
      UserWarning when ``boft_n_butterfly_factor`` in the config differs from the tensors' factor
      count (PEFT without its CUDA extension trains one factor whatever the config says), when
      T5's ``shared`` copy is left out (above), and for the OFT cases above.

    Example (a round trip through :func:`save_peft_adapter` on a tiny random ViT):
      >>> import os, tempfile, jax, jax.numpy as jnp, numpy as np
      >>> import boft_jax as boft
      >>> from boft_jax.models import vit
      >>> from boft_jax.interop import load_peft_adapter, save_peft_adapter
      >>> base = vit.ViT(vit.ViTConfig(image_size=8, patch_size=4, hidden_size=8, num_hidden_layers=1,
      ...                              num_attention_heads=2, intermediate_size=16, num_labels=3))
      >>> cfg = boft.BOFTConfig(block_size=4, n_factors=2, targets=vit.TARGET_PRESETS["attention_qv"])
      >>> model, x = boft.wrap(base, cfg), jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
      >>> rng = np.random.default_rng(0)            # random weights stand in for vit.from_pretrained's
      >>> frozen = jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32),
      ...                       jax.eval_shape(base.init, jax.random.key(0), x)["params"])
      >>> adapter = jax.tree.map(lambda a: a + 0.1, boft.init_adapter(model, frozen, x))  # as if trained
      >>> params = boft.combine(frozen, adapter)
      >>> with tempfile.TemporaryDirectory() as d:
      ...     save_peft_adapter(d, model, params)
      ...     loaded, loaded_params = load_peft_adapter(d, base, frozen)
      >>> loaded.config.block_size, loaded.config.n_factors, loaded.config.targets
      (4, 2, ('^encoder/layer_0/attention/query', '^encoder/layer_0/attention/value'))
      >>> y = loaded.apply({"params": loaded_params}, x)
      >>> y.shape
      (2, 3)
      >>> bool(jnp.allclose(y, model.apply({"params": params}, x), atol=1e-6))
      True
      >>> bool(jnp.allclose(y, base.apply({"params": frozen}, x), atol=1e-3))  # the adapter is applied
      False
    """
    peft_cfg, tensors = read_peft_adapter(adapter_dir)
    peft_type = peft_cfg["peft_type"]
    where = f"PEFT {peft_type} adapter {os.fspath(adapter_dir)!r}"
    keymap = _KeyMap(module)
    oft = _OftOptions.read(peft_cfg, where) if peft_type == "OFT" else None
    ours_key = _OFT_KEY if oft else _BOFT_KEY
    other_prefix = "boft_" if oft else "oft_"

    found: dict[str, dict[str, np.ndarray]] = {}  # HF module name -> {"boft_R"/"boft_s"/"oft_R": ...}
    plain: dict[str, np.ndarray] = {}  # HF param key -> value (biases, modules_to_save)
    adapted_bias: dict[str, np.ndarray] = {}  # HF module name -> bias (from <mod>.base_layer.bias)
    base_copies: dict[str, np.ndarray] = {}  # HF param key -> value (<mod>.base_layer.weight)
    unknown: list[str] = []
    unsupported: list[str] = []  # adapter tensors of a kind boft_jax does not load (e.g. on embeddings)
    for raw, value in sorted(tensors.items()):
        key = _strip_prefix(raw)
        if m := ours_key.match(key):
            found.setdefault(m.group("mod"), {})[m.groupdict().get("kind") or "oft_R"] = np.asarray(value)
            continue
        if ".original_module." in key:
            continue  # PEFT's untouched copy of a modules_to_save module (unused while the adapter is on)
        key = re.sub(r"\.modules_to_save\.(?:default\.)?", ".", key)
        if ".base_layer." in key:
            mod, leaf = key.rsplit(".base_layer.", 1)
            if leaf == "bias":
                adapted_bias[mod] = np.asarray(value)
            else:  # e.g. lm_head.base_layer.weight: PEFT saves an adapted "embedding layer"'s base weight too
                base_copies[f"{mod}.{leaf}"] = np.asarray(value)
            continue
        parts = key.split(".")[-3:]
        if any(part.startswith(("boft_", "oft_")) for part in parts):
            foreign = any(part.startswith(other_prefix) for part in parts)
            embedding = any("embedding" in part for part in parts if part.startswith(("boft_", "oft_")))
            why = (
                f"not a {peft_type} parameter; '{other_prefix}*' tensors belong to the other PEFT type" if foreign
                else f"PEFT's {peft_type} on an embedding layer (nn.Embedding); boft_jax adapts Dense layers only"
                if embedding else f"not a {peft_type} parameter boft_jax knows"
            )
            unsupported.append(f"{raw} (shape {tuple(value.shape)}; {why})")
            continue
        if key in plain and not np.array_equal(plain[key], value):
            raise ValueError(f"{where}: {raw} and another entry for {key} hold different values")
        plain[key] = np.asarray(value)

    unselected = [mod for mod in sorted(found) if not _peft_selects(peft_cfg, mod)]
    if unselected:
        warnings.warn(
            f"{where}: adapter_config.json does not select {len(unselected)} module(s) whose {peft_type} tensors the"
            f" file holds, e.g. {unselected[:4]} (target_modules {peft_cfg.get('target_modules')!r},"
            f" layers_to_transform {peft_cfg.get('layers_to_transform')!r}, exclude_modules"
            f" {peft_cfg.get('exclude_modules')!r}); PEFT leaves those layers unadapted and ignores their tensors,"
            " boft_jax loads them as the file holds them, so the two differ there. Fix the config or the file",
            UserWarning,
            stacklevel=2,
        )
    absent = _selected_without_tensors(peft_cfg, keymap, found)
    if absent:
        init = peft_cfg.get("init_weights", True)
        warnings.warn(
            f"{where}: adapter_config.json selects {len(absent)} module(s) for which the file holds no"
            f" {peft_type} tensors, e.g. {absent[:4]}: boft_jax leaves them unadapted. PEFT warns of missing"
            " adapter keys and starts them as a fresh adapter would, "
            + ("at the identity (init_weights true), so the outputs agree" if init is True else
               f"at random (init_weights {json.dumps(init)}), so its outputs differ from boft_jax's there")
            + ". The file may be incomplete: check it, or fix target_modules",
            UserWarning,
            stacklevel=2,
        )
    mts_names = peft_cfg.get("modules_to_save") or []
    if isinstance(mts_names, str):
        mts_names = [mts_names]
    if keymap.kind == "t5":
        module, params, keymap, plain, mts_names = _t5_saved_modules(
            module, params, keymap, plain, mts_names, where, set(found)
        )
    nested = _peft_nested_saved_modules(plain, mts_names)
    if nested:
        raise ValueError(
            f"{where}: modules_to_save {mts_names} selects modules nested in each other:"
            f"{_fmt([f'{outer} contains {inner}' for outer, inner in nested])}\n"
            "  PEFT selects every module whose name ends with an entry (a plain string suffix) and wraps each of"
            " them, one copy inside the other; its forward pass uses the outer copy, but its saved file holds one"
            " tensor per name, and some of them come from the inner copy, which that forward pass never reads"
            " (PEFT cannot reload such an adapter either). The file does not say what PEFT computed. Retrain with"
            " modules_to_save entries that select no module inside another (e.g. the full name 'vit.embeddings')."
        )
    missing, differing = _check_base_copies(base_copies, keymap, params)
    unknown += missing

    # --- adapted layers ---------------------------------------------------------------------------
    layers: dict[Path_, tuple[np.ndarray, np.ndarray]] = {}  # our module path -> (packed skew (m, k, n), s)
    unfit: list[str] = list(differing)
    for mod, entry in sorted(found.items()):
        path = keymap.path(mod + ".weight")
        if path is None or path[-1] != "kernel":
            name, value = sorted(entry.items())[0]
            if path is None and keymap.left_out(mod + ".weight"):
                unfit.append(_left_out(mod))
            else:
                unknown.append(f"{mod} ({name} {tuple(value.shape)})")
            continue
        kshape = keymap.shapes[path]
        mpath = path[:-1]
        here = f"{mod} -> '{'/'.join(mpath)}'"
        if len(kshape) != 2:
            unfit.append(
                f"{here}: a kernel of shape {kshape} (not a Linear/Dense); {peft_type} on convolutions is not"
                " supported by boft_jax"
            )
            continue
        d_in, d_out = kshape
        if oft:
            problem, layer = oft.layer(entry["oft_R"], d_in, d_out, here)
        else:
            problem, layer = _boft_layer(entry, d_in, d_out, here)
        if problem:
            unfit.append(problem)
        else:
            layers[mpath] = layer

    # --- plain params: biases and modules_to_save -----------------------------------------------
    extra: dict[Path_, np.ndarray] = {}
    saved_modules: dict[str, list[Path_]] = {}  # HF module (ancestor) -> our param paths under it
    bias_paths: list[Path_] = []
    for mod, value in adapted_bias.items():
        plain.setdefault(mod + ".bias", value)
    misshaped: list[str] = []
    for key, value in sorted(plain.items()):
        path = keymap.path(key)
        if path is None:
            if keymap.left_out(key):
                misshaped.append(_left_out(key.rsplit(".", 1)[0]))
            else:
                unknown.append(f"{key} (shape {tuple(value.shape)})")
            continue
        converted = hf.from_torch_layout(path, value)
        if tuple(converted.shape) != tuple(keymap.shapes[path]):
            want = tuple(keymap.shapes[path])
            labels_differ = path[0] == "classifier" and converted.shape[-1:] != want[-1:]
            misshaped.append(
                f"{key} -> '{'/'.join(path)}': shape {tuple(value.shape)}"
                + (f" (as the model lays it out, {tuple(converted.shape)})" if converted.shape != value.shape else "")
                + f" does not fit the model's {want}"
                + (" (load the base with a matching num_labels)" if labels_differ else "")
            )
            continue
        extra[path] = converted
        parts = key.split(".")
        owner = next(
            (".".join(parts[:i]) for i in range(1, len(parts)) if _peft_saves(".".join(parts[:i]), mts_names)),
            None,
        )
        if owner is not None:
            saved_modules.setdefault(owner, []).append(path)
        elif path[-1] == "bias":
            bias_paths.append(path)
        else:  # a full weight outside modules_to_save (e.g. PEFT's save_embedding_layers): save its module
            saved_modules.setdefault(key.rsplit(".", 1)[0], []).append(path)

    if unsupported:
        raise ValueError(
            f"{where} holds {len(unsupported)} tensor(s) that boft_jax cannot load:{_fmt(unsupported)}\n"
            f"  (boft_jax loads {'oft_R' if oft else 'boft_R / boft_s'} tensors of Linear layers, biases and"
            " modules_to_save; an adapter on other kinds of layer has to be retrained without them)"
        )
    if unknown:
        raise ValueError(
            f"{where} names modules that the {keymap.kind} model does not have ({len(unknown)}):{_fmt(unknown)}\n"
            f"  (is the base model the one the adapter was trained on?)"
        )
    if unfit or misshaped:
        raise ValueError(
            f"{where} does not fit the model ({len(unfit) + len(misshaped)} problem(s)):{_fmt(unfit + misshaped)}"
        )
    if not layers:
        raise ValueError(f"{where} holds no {'oft_R' if oft else 'boft_R / boft_s'} tensors")

    # --- the BOFTConfig --------------------------------------------------------------------------
    ms = sorted({w.shape[0] for w, _ in layers.values()})
    bs = sorted({block_size_from_num_params(w.shape[2]) for w, _ in layers.values()})
    ks = sorted({w.shape[1] for w, _ in layers.values()})
    if len(ms) > 1:
        raise ValueError(f"{where}: layers have different butterfly factor counts {ms}; boft_jax uses one for all")
    m = ms[0]
    show = _stack_path if keymap.scan else (lambda p: p)  # a layer path as the model names it
    if oft:
        cfg_bs, cfg_bn = _cfg_field(peft_cfg, "oft_block_size", 0, int, where), _cfg_field(peft_cfg, "r", 0, int, where)
        structure = _oft_structure(cfg_bs, cfg_bn, bs, ks, layers, where, show, oft.block_share)
    else:
        cfg_bs = _cfg_field(peft_cfg, "boft_block_size", 0, int, where)
        cfg_bn = _cfg_field(peft_cfg, "boft_block_num", 0, int, where)
        use_num = cfg_bn > 0 if (cfg_bs > 0) != (cfg_bn > 0) else len(bs) > 1
        if use_num:
            if len(ks) > 1 or (cfg_bn and ks[0] != cfg_bn):
                raise ValueError(
                    f"{where}: boft_block_num = {cfg_bn} in the config, but the tensors hold {ks} blocks per factor"
                )
            structure = {"block_num": ks[0]}
        else:
            if len(bs) > 1 or (cfg_bs and bs[0] != cfg_bs):
                raise ValueError(
                    f"{where}: boft_block_size = {cfg_bs} in the config, but the tensors hold blocks of size {bs}"
                )
            structure = {"block_size": bs[0]}
        cfg_m = _cfg_field(peft_cfg, "boft_n_butterfly_factor", 1, int, where)
        if cfg_m != m and m > 1:
            raise ValueError(
                f"{where}: adapter_config.json says boft_n_butterfly_factor = {cfg_m}, but its boft_R tensors hold"
                f" {m} factors: neither PEFT (which would build {cfg_m} factor(s), or one without its CUDA extension)"
                " nor boft_jax can tell which is meant; fix boft_n_butterfly_factor in the config to the tensors'"
                f" {m}, or use the adapter the config belongs to"
            )
        elif cfg_m != m:  # one factor stored: PEFT's CPU fallback
            warnings.warn(
                f"{where}: adapter_config.json says boft_n_butterfly_factor = {cfg_m}, but its boft_R tensors hold"
                f" {m} factor(s) (PEFT without its CUDA extension trains ONE factor whatever the config says);"
                f" using the tensors: n_factors = {m}",
                UserWarning,
                stacklevel=2,
            )
    if oft and oft.block_share:
        warnings.warn(
            f"{where}: block_share = true: the one shared block of each layer is copied to all of its blocks"
            " (same outputs); boft_jax trains those copies independently, and save_peft_adapter writes them"
            " unshared",
            UserWarning,
            stacklevel=2,
        )
    if oft and oft.coft_eps is not None:
        warnings.warn(
            f"{where}: coft = true: the rotations are projected onto PEFT's ball (eps = {oft.coft_eps:g}) as"
            " PEFT does before every forward, so the outputs match; boft_jax does not keep that constraint"
            " while training",
            UserWarning,
            stacklevel=2,
        )

    bias_mode = peft_cfg.get("bias", "none") or "none"
    if isinstance(bias_mode, str) and bias_mode.endswith("_only"):
        bias_mode = "boft_only"  # PEFT trains the adapted layers' biases for every "*_only" value ("oft_only", "lora_only", ...)
    adapted_paths = sorted(layers)
    if bias_mode == "none" and bias_paths:
        warnings.warn(
            f"{where}: bias = 'none' but the file holds {len(bias_paths)} bias(es); they are loaded as (frozen) values",
            UserWarning,
            stacklevel=2,
        )
    elif bias_mode == "boft_only":
        stray = [p for p in bias_paths if p[:-1] not in layers]
        if stray:
            warnings.warn(
                f"{where}: bias = 'boft_only' but the file holds biases of non-adapted layers"
                f" {['/'.join(p) for p in stray]}; they are loaded as (frozen) values",
                UserWarning,
                stacklevel=2,
            )
        absent = [p for p in adapted_paths if p + ("bias",) in keymap.shapes and p + ("bias",) not in extra]
        if absent:
            warnings.warn(
                f"{where}: bias = 'boft_only' but the file holds no bias for {len(absent)} adapted layer(s)"
                f" (e.g. '{'/'.join(absent[0])}'); those keep the base model's biases",
                UserWarning,
                stacklevel=2,
            )
    if mts_names and not saved_modules:
        warnings.warn(
            f"{where}: modules_to_save = {mts_names} but the file holds no weights for them; the base"
            " model's weights are kept",
            UserWarning,
            stacklevel=2,
        )

    def module_path(paths: list[Path_]) -> Path_:
        if len(paths) == 1:
            return paths[0][:-1]
        common = paths[0]
        for p in paths[1:]:
            n = 0
            while n < min(len(common), len(p)) and common[n] == p[n]:
                n += 1
            common = common[:n]
        return common

    saved_paths = sorted({module_path(ps) for ps in saved_modules.values()})
    overlap = [p for p in saved_paths if any(a[: len(p)] == p for a in adapted_paths)]
    if overlap:
        raise ValueError(
            f"{where}: modules {['/'.join(p) for p in overlap]} are both adapted and in modules_to_save"
        )

    dropout_field = "module_dropout" if oft else "boft_dropout"
    dropout = _cfg_field(peft_cfg, dropout_field, 0.0, float, where)  # (names itself)
    if not 0 <= dropout <= 1 and math.isfinite(dropout):
        # PEFT saves such a value: it drops nothing below 0 and fails at its first training step above 1
        warnings.warn(
            f"{where}: {dropout_field} = {dropout:g} is outside [0, 1] ({'PEFT drops nothing with it' if dropout < 0 else 'PEFT cannot train with it'});"
            " loaded with dropout 0 (it does not change outputs at inference); set BOFTConfig.dropout to train with dropout",
            UserWarning,
            stacklevel=2,
        )
        dropout = 0.0
    try:
        config = BOFTConfig(
            **structure,
            n_factors=m,
            targets=tuple(sorted({"^" + re.escape("/".join(show(p))) for p in adapted_paths})),
            dropout=dropout,
            bias=bias_mode,
            **(
                {"cayley": "neumann", "neumann_terms": oft.neumann_terms}
                if oft and oft.neumann_terms is not None
                else {}
            ),
            modules_to_save=tuple(sorted({"^" + re.escape("/".join(show(p))) for p in saved_paths})) or None,
        )
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    fit = [err for p in adapted_paths if (err := config.fit_error("/".join(show(p)), keymap.shapes[p + ("kernel",)][0]))]
    if fit:
        raise ValueError(f"{where} does not fit the butterfly structure:{_fmt(fit)}")

    # --- the adapter tree ------------------------------------------------------------------------
    flat: dict[Path_, Any] = {}
    for p, (skew, scale) in layers.items():
        flat[(*p, "kernel", "skew")] = skew
        flat[(*p, "kernel", "scale")] = scale
    base_flat = hf.flatten_params(hf.unstack_layers(params) if keymap.scan else params)
    zero = ["/".join(p) for p in adapted_paths if p + ("kernel",) in base_flat and not np.any(np.asarray(base_flat[p + ("kernel",)]))]
    if zero:
        warnings.warn(
            f"{where}: adapted layer(s) {zero} have an all-zero base kernel here (a new head made with"
            " num_labels?). PEFT saves no base weights for an adapted layer, so these layers compute zero"
            " whatever the adapter holds, unlike the model PEFT trained; a new head must be in modules_to_save"
            " to carry its weights",
            UserWarning,
            stacklevel=2,
        )
    rounded = []
    for p, v in extra.items():
        flat[p] = v.astype(base_flat[p].dtype) if p in base_flat else v
        if p in base_flat and not np.array_equal(np.asarray(flat[p], np.float64), np.asarray(v, np.float64)):
            rounded.append(f"{'/'.join(p)} ({np.dtype(v.dtype).name} -> {np.dtype(flat[p].dtype).name})")
    if rounded:  # the base's dtype is kept (as for every other param); say what that rounded
        warnings.warn(
            f"{where}: {len(rounded)} trained bias / saved-module tensor(s) are stored in a wider dtype than the"
            f" base params here and were rounded to the base's:{_fmt(rounded)}\nOutputs then differ from PEFT's by"
            " that rounding; load the base in float32 (cast its params) to keep them exactly",
            UserWarning,
            stacklevel=2,
        )
    if keymap.scan:
        _check_stackable(flat, keymap.shapes, "adapter entries")
        adapter = hf.stack_layers(_unflatten(flat))
    else:
        adapter = _unflatten(flat)
    adapter = jax.tree.map(jnp.asarray, adapter)
    return wrap(module, config), combine(params, adapter)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
def _is_boft_leaf(v) -> bool:
    return isinstance(v, Mapping) and set(v) == {"skew", "scale"}


def _host(x) -> np.ndarray:
    a = np.asarray(jax.device_get(x))
    if a.dtype.kind == "f" and a.dtype not in (np.float16, np.float32, np.float64):
        a = a.astype(np.float32)  # bfloat16 & co.: safetensors.numpy has no such dtype
    return np.ascontiguousarray(a)


def peft_state_dict(
    wrapped_module: BOFTModule,
    params: Mapping[str, Any],
    *,
    key_style: KeyStyle = "transformers5",
    peft_type: PeftType = "BOFT",
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The tensors and config fields :func:`save_peft_adapter` writes (no files touched).

    Returns ``(tensors, fields)``: tensors keyed ``base_model.model.<hf module>.<name>``, and the
    ``adapter_config.json`` entries that depend on the adapter (target_modules, block structure,
    n_factors or the Cayley variant, dropout, bias, modules_to_save).
    """
    if not isinstance(wrapped_module, BOFTModule):
        raise TypeError(
            f"save_peft_adapter needs the wrapped model (boft.wrap(module, config)), got {type(wrapped_module).__name__}"
        )
    if peft_type not in _PEFT_TYPES:
        raise ValueError(f"peft_type must be one of {_PEFT_TYPES}, got {peft_type!r}")
    config = wrapped_module.config
    keymap = _KeyMap(wrapped_module.model)
    oft = peft_type == "OFT"
    if oft and config.n_factors != 1:
        raise ValueError(
            f"PEFT's OFT has one block-diagonal factor, but this adapter has n_factors = {config.n_factors};"
            " save it with peft_type='BOFT'"
        )
    if oft and config.cayley == "neumann" and config.neumann_terms == 2:
        raise ValueError(
            "this adapter uses cayley = 'neumann' with neumann_terms = 2, the rotation (I - S)^2, which PEFT's OFT"
            " Cayley-Neumann series has no setting for (its num_cayley_neumann_terms = 2 is our neumann_terms = 1,"
            " and t + 1 is our t >= 3), so PEFT would compute a different rotation"
        )
    if not oft and config.cayley != "exact":
        raise ValueError(
            f"this adapter uses cayley = {config.cayley!r}, but PEFT's BOFT only has the exact Cayley map, so PEFT"
            " would compute a different rotation. Convert with an exact config if that is intended:"
            f" boft.wrap(model, dataclasses.replace(config, cayley='exact', neumann_terms={_DEFAULT_NEUMANN_TERMS}))"
            f" ({_DEFAULT_NEUMANN_TERMS} is the default: the exact map has no series terms), or save a one-factor adapter with"
            " peft_type='OFT', which has the Neumann variant"
        )
    _, adapter = split(params, config)
    if keymap.scan:
        adapter = hf.unstack_layers(adapter)

    # Walk the adapter: BOFT layers, trainable biases, saved modules.
    layers: dict[Path_, tuple[np.ndarray, np.ndarray]] = {}
    others: dict[Path_, np.ndarray] = {}
    saved: set[Path_] = set()

    def walk(tree, path):
        if path and config.saves_module("/".join(_stack_path(path) if keymap.scan else path)):
            saved.add(path)
            for p, v in _flatten(tree, path).items():
                others[p] = _host(v)
            return
        for k, v in tree.items():
            here = (*path, k)
            if k == "kernel" and _is_boft_leaf(v):
                layers[path] = (_host(v["skew"]), _host(v["scale"]))
            elif isinstance(v, Mapping):
                walk(v, here)
            else:
                others[here] = _host(v)

    walk(adapter, ())
    if not layers:
        raise ValueError("the params hold no BOFT adapter (no BOFTKernel nodes); nothing to save")

    tensors: dict[str, np.ndarray] = {}
    ms: set[int] = set()
    dims: dict[Path_, tuple[int, int, int]] = {}  # (d_in, block size, block count)
    targets = []
    scaled = []  # OFT: layers whose output scale is not 1
    # OFT: PEFT's oft_R.weight = our packed skew / factor
    factor = np.float32(_OftOptions.factor(config.neumann_terms if config.cayley == "neumann" else None))
    for p, (skew, scale) in sorted(layers.items()):
        if p + ("kernel",) not in keymap.shapes:
            raise ValueError(f"adapted layer '{'/'.join(p)}' has no Hugging Face counterpart")
        m, k, n = skew.shape
        b = block_size_from_num_params(n)
        ms.add(m)
        dims[p] = (k * b, b, k)
        name = keymap.module_name(p, key_style)
        targets.append(name)
        if oft:
            if np.any(scale != 1):
                scaled.append(f"{'/'.join(p)}: max |s - 1| = {np.abs(scale.astype(np.float64) - 1).max():.3g}")
            tensors[f"{PEFT_PREFIX}{name}.oft_R.weight"] = skew.astype(np.float32)[0] / factor
        else:
            tensors[f"{PEFT_PREFIX}{name}.boft_R"] = _host(unpack_skew(jnp.asarray(skew, jnp.float32), b))
            tensors[f"{PEFT_PREFIX}{name}.boft_s"] = scale.astype(np.float32).reshape(-1, 1)
    if scaled:
        raise ValueError(
            f"PEFT's OFT has no output scale, but {len(scaled)} adapted layer(s) have scales other than 1, which"
            f" PEFT would drop:{_fmt(scaled)}\n  Save with peft_type='BOFT' (m = 1 is OFT with a scale), or train"
            " with the scales kept at 1 (optax.chain(opt, optax.masked(optax.set_to_zero(), mask)) with mask True at the"
            " 'scale' leaves; see the README)"
        )
    saved_names = []
    for p in sorted(saved):
        leaves = sorted(q for q in others if q[: len(p)] == p)
        hf_keys = [keymap.key(q, key_style) for q in leaves]
        # The HF module of the saved subtree: the common dotted prefix of its param keys.
        parts = [k.split(".")[:-1] for k in hf_keys]
        common = parts[0]
        for q in parts[1:]:
            n = 0
            while n < min(len(common), len(q)) and common[n] == q[n]:
                n += 1
            common = common[:n]
        saved_names.append(".".join(common))
    for p, v in sorted(others.items()):
        key = keymap.key(p, key_style)
        if p[-1] == "bias" and p[:-1] in layers:
            key = key[: -len(".bias")] + ".base_layer.bias"  # PEFT's name for an adapted layer's bias
        tensors[PEFT_PREFIX + key] = np.ascontiguousarray(hf.to_torch_layout(p, v))

    if len(ms) > 1:
        raise ValueError(f"adapted layers have different factor counts {sorted(ms)}; PEFT needs one")
    fields: dict[str, Any] = {
        "target_modules": sorted(targets),
        "bias": config.bias,
        "modules_to_save": sorted(saved_names) or None,
    }
    field, value = _peft_structure_field(config, dims, oft)
    by_size = field == "block_size"
    if oft:
        neumann = config.cayley == "neumann"
        fields.update(
            bias="oft_only" if config.bias == "boft_only" else config.bias,
            module_dropout=float(config.dropout),
            oft_block_size=int(value) if by_size else 0,
            r=0 if by_size else int(value),
            use_cayley_neumann=neumann,
            num_cayley_neumann_terms=_OftOptions.peft_from_our_terms(int(config.neumann_terms)) if neumann else 5,
            coft=False,
            eps=6e-05,
            block_share=False,
            exclude_modules=None,
        )
        if neumann:
            fields["peft_version"] = "0.18.0"  # the Cayley-Neumann form written here is PEFT >= 0.18's
    else:
        fields.update(
            boft_n_butterfly_factor=int(ms.pop()),
            boft_dropout=float(config.dropout),
            boft_block_size=int(value) if by_size else 0,
            boft_block_num=0 if by_size else int(value),
        )
    return tensors, fields


def _link_or_copy(src: Path, dst: Path) -> None:
    """``src`` (a file, link or folder) at ``dst``: hard links for files where the file system allows."""
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        shutil.copytree(src, dst, symlinks=True, copy_function=_link_file)
    else:
        _link_file(src, dst)


def _link_file(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


class _CannotMove(OSError):
    """:func:`replace_dir` could not rename the existing directory aside (nothing was changed)."""


def replace_dir(out: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` into a new sibling directory ``tmp``, then put it in place of ``out`` (a rename,
    or two when ``out`` exists, whose old content is then deleted): a failure while writing leaves
    ``out`` as it was and no temporary directory behind."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        try:
            os.replace(out, old)
        except OSError as e:  # a mount point, a parent without write permission...
            shutil.rmtree(tmp, ignore_errors=True)
            raise _CannotMove(os.fspath(out)) from e
        try:
            os.replace(tmp, out)
        except OSError:
            os.replace(old, out)  # put the old one back
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        try:
            os.replace(tmp, out)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def save_peft_adapter(
    out_dir: str | os.PathLike,
    wrapped_module: BOFTModule,
    params: Mapping[str, Any],
    *,
    base_model_name_or_path: str | None = None,
    key_style: KeyStyle = "transformers5",
    task_type: str | None = "auto",
    revision: str | None = None,
    peft_type: PeftType = "BOFT",
) -> None:
    """Write a PEFT BOFT (or OFT) adapter directory that PEFT loads to the same outputs.

    Args:
      out_dir: directory, created if needed.  It is written complete under a temporary name and
        renamed into place, so it holds the old adapter or the new one, never a mix (an existing
        directory's other files are carried over, hard-linked where possible).
      wrapped_module: ``boft.wrap(base, config)`` with a ViT / T5 base from ``boft_jax.models``.
      params: its params (with adapter), e.g. from :func:`load_peft_adapter` or training.
      base_model_name_or_path: recorded in ``adapter_config.json`` (PEFT's ``AutoPeftModel`` loads
        the base from it).
      key_style: module names of ``"transformers5"`` (``vit.layers.0.attention.q_proj``; what PEFT
        with transformers 5 needs) or ``"transformers4"`` (``vit.encoder.layer.0.attention.attention.query``)
        models.  T5's names are the same in both.  A ViT without a classifier (``num_labels=0``,
        e.g. loaded from a ``ViTModel`` checkpoint) gets the names of a bare ``ViTModel``
        (``layers.0.attention.q_proj``), the model PEFT applies such an adapter to.
      task_type: PEFT task type; ``"auto"``: ``SEQ_2_SEQ_LM`` for T5, none for ViT.
      revision: recorded in ``adapter_config.json``.
      peft_type: ``"BOFT"``, or ``"OFT"`` for PEFT's OFT (PEFT >= 0.14 format), which only an
        adapter with ``n_factors = 1``, every output scale exactly 1 (OFT has none; freeze them while
        training) and the exact map or ``neumann_terms`` 1 or >= 3 can be.

    Writes ``boft_R`` as the full skew-symmetric matrices ``S`` (so PEFT's ``0.5 (S - S^T) = S``),
    ``boft_s`` as ``(d_out, 1)`` (OFT: ``oft_R.weight``, the packed ``(k, b(b-1)/2)`` triangles,
    negated for the Neumann map), trainable biases (``<mod>.base_layer.bias`` for adapted layers,
    ``<module>.bias`` otherwise) and ``modules_to_save`` weights under their module names.
    ``target_modules`` lists the exact module names.  An ``adapter_model.bin`` left in ``out_dir``
    is removed, so that it cannot shadow the new weights.

    Raises:
      ValueError: what PEFT cannot represent: the Neumann map for BOFT; for OFT more than one
        factor, a scale other than 1, fewer than 3 Neumann terms.
      TypeError: ``wrapped_module`` is not a ``boft.wrap`` model.

    Example (a tiny random ViT; :func:`load_peft_adapter` reads it back to the same outputs):
      >>> import os, tempfile, jax, jax.numpy as jnp, numpy as np
      >>> import boft_jax as boft
      >>> from boft_jax.models import vit
      >>> from boft_jax.interop import read_peft_adapter, save_peft_adapter
      >>> base = vit.ViT(vit.ViTConfig(image_size=8, patch_size=4, hidden_size=8, num_hidden_layers=1,
      ...                              num_attention_heads=2, intermediate_size=16, num_labels=3))
      >>> cfg = boft.BOFTConfig(block_size=4, n_factors=2, targets=vit.TARGET_PRESETS["attention_qv"])
      >>> model, x = boft.wrap(base, cfg), jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
      >>> rng = np.random.default_rng(0)            # random weights stand in for vit.from_pretrained's
      >>> frozen = jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32),
      ...                       jax.eval_shape(base.init, jax.random.key(0), x)["params"])
      >>> adapter = jax.tree.map(lambda a: a + 0.1, boft.init_adapter(model, frozen, x))  # as if trained
      >>> params = boft.combine(frozen, adapter)
      >>> with tempfile.TemporaryDirectory() as d:
      ...     out = os.path.join(d, "my_adapter")                 # created
      ...     save_peft_adapter(out, model, params, base_model_name_or_path="google/vit-base-patch16-224")
      ...     files = sorted(os.listdir(out))
      ...     peft_config = read_peft_adapter(out)[0]
      ...     save_peft_adapter(out, model, params, key_style="transformers4")   # replaced in place
      ...     v4_targets = read_peft_adapter(out)[0]["target_modules"]
      >>> files
      ['adapter_config.json', 'adapter_model.safetensors']
      >>> peft_config["peft_type"], peft_config["base_model_name_or_path"]
      ('BOFT', 'google/vit-base-patch16-224')
      >>> peft_config["target_modules"]
      ['vit.layers.0.attention.q_proj', 'vit.layers.0.attention.v_proj']
      >>> v4_targets
      ['vit.encoder.layer.0.attention.attention.query', 'vit.encoder.layer.0.attention.attention.value']
    """
    tensors, fields = peft_state_dict(wrapped_module, params, key_style=key_style, peft_type=peft_type)
    kind = _model_kind(wrapped_module.model)
    if kind == "t5" and "shared" in (fields.get("modules_to_save") or []):
        warnings.warn(
            "save_peft_adapter: modules_to_save holds T5's 'shared' embedding. It is saved, but PEFT's T5"
            " forward never reads that copy (the encoder and decoder keep the original embedding), so PEFT"
            " will not reproduce this adapter's outputs if the embedding was trained; load_peft_adapter"
            " leaves it out for the same reason. Keep a boft_jax checkpoint (boft_jax.checkpoint.save_adapter)"
            " or export the merged model to keep it.",
            UserWarning,
            stacklevel=2,
        )
    config = {
        "peft_type": peft_type,
        "task_type": _TASK_TYPES[kind] if task_type == "auto" else task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": revision,
        "inference_mode": True,
        "fan_in_fan_out": False,
        "init_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        **fields,
    }
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)

    def write_into(d: Path) -> None:
        hf.save_safetensors(tensors, d / ADAPTER_WEIGHTS_NAME, metadata={"format": "pt"})
        with open(d / ADAPTER_CONFIG_NAME, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")

    if out.is_symlink():  # write where the link points, keep the link
        out = out.resolve()
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{os.fspath(out)!r} exists and is not a directory")

    def write_with_the_rest(d: Path) -> None:
        # the directory's other files (a README, the tokenizer...) come along, as hard links where possible;
        # pickled weights do not (they could shadow the new ones)
        if out.exists():
            for entry in out.iterdir():
                if entry.name not in (ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME, *_PICKLE_NAMES):
                    _link_or_copy(entry, d / entry.name)
        write_into(d)

    # a complete new directory swapped in: the weights and the config change together, or not at all
    try:
        replace_dir(out, write_with_the_rest)
    except _CannotMove as e:  # e.g. a mount point: replace the two files in place, weights first
        warnings.warn(f"{os.fspath(out)!r} cannot be renamed ({e.__cause__}); its two adapter files are replaced"
                      " one after the other instead (not as one step)", UserWarning, stacklevel=2)
        with tempfile.TemporaryDirectory(dir=out, prefix=".boft_tmp-") as tmp:
            write_into(Path(tmp))
            os.replace(Path(tmp) / ADAPTER_WEIGHTS_NAME, out / ADAPTER_WEIGHTS_NAME)
            os.replace(Path(tmp) / ADAPTER_CONFIG_NAME, out / ADAPTER_CONFIG_NAME)
        for name in _PICKLE_NAMES:
            if (out / name).is_file():
                (out / name).unlink()
