"""``BOFTConfig``: what to adapt and how, plus the per-layer fit check.

Example:
  >>> import boft_jax as boft
  >>> cfg = boft.BOFTConfig(block_size=8, n_factors=2, targets=r"attention/(query|value)")
  >>> cfg.layer_structure("encoder/layer_0/attention/query", d_in=768)
  LayerStructure(block_size=8, n_blocks=96, n_factors=2)
  >>> cfg.matches("encoder/layer_0/attention/query")
  True
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import re
import warnings
from collections.abc import Mapping
from typing import Literal, NamedTuple, Sequence

import numpy as np

from boft_jax.butterfly import _short, max_factors, structure_error, valid_block_sizes

__all__ = ["BOFTConfig", "LayerStructure", "BiasMode", "ApplyMode"]

BiasMode = Literal["none", "boft_only", "all"]
ApplyMode = Literal["auto", "input", "weight"]
_BIAS_MODES = ("none", "boft_only", "all")
_APPLY_MODES = ("auto", "input", "weight")
_CAYLEY = ("exact", "neumann")
_DEFAULT_NEUMANN_TERMS = 5


class UnusedNeumannTerms(UserWarning):
    """``BOFTConfig.neumann_terms`` set with ``cayley="exact"``, which has no series (filterable by class)."""


def layer_label(path: str) -> str:
    """How error messages name the layer at the '/'-joined module ``path``.

    >>> layer_label("encoder/layer_0/query"), layer_label("")
    ("layer 'encoder/layer_0/query'", "the root layer (the wrapped module itself, path '')")
    """
    return f"layer '{path}'" if path else "the root layer (the wrapped module itself, path '')"


def path_repr(path: str) -> str:
    """One module path in an error message's list: ``'a/b'``, the root module's ``''`` spelled out."""
    return repr(path) if path else "'' (the root module)"


def paths_label(paths: Sequence[str]) -> str:
    """A list of module paths for an error message (:func:`path_repr` each)."""
    return "[" + ", ".join(map(path_repr, paths)) + "]"


class LayerStructure(NamedTuple):
    """The resolved block structure of one layer (``d_in = n_blocks * block_size``)."""

    block_size: int
    n_blocks: int
    n_factors: int


def _as_patterns(value, name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = (value,)
    try:
        patterns = tuple(value)
    except TypeError:
        raise TypeError(f"BOFTConfig.{name} must be a regex string or a sequence of them, got {value!r}") from None
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"BOFTConfig.{name} entries must be regex strings, got {p!r}")
        try:
            re.compile(p)
            _path_regex(p)
        except re.error as e:
            raise ValueError(f"BOFTConfig.{name}: {p!r} is not a valid regular expression ({e})") from None
    return patterns


_GLOBAL_FLAGS = re.compile(r"^(?:\(\?[aiLmsux]+\))+")


@functools.lru_cache(maxsize=4096)
def _path_regex(pattern: str) -> re.Pattern:
    """``pattern`` matched against the whole path or a trailing run of its components.

    Leading global flags (``"(?i)query"``) stay in front, where Python's ``re`` requires them.
    """
    flags = _GLOBAL_FLAGS.match(pattern)
    lead = flags.group(0) if flags else ""
    return re.compile(rf"{lead}(?:^|/)(?:{pattern[len(lead):]})$")


def _path_matches(pattern: str, path: str) -> bool:
    return _path_regex(pattern).search(path) is not None


def _integer(v):
    """A Python / NumPy integer (not a bool) as ``int``; anything else unchanged (refused later)."""
    if isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_)):
        return int(v)
    return v


@dataclasses.dataclass(frozen=True)
class BOFTConfig:
    """Configuration of a BOFT adapter (frozen and hashable, so it can be a static jit argument).

    Exactly one of ``block_size`` / ``block_num`` must be set (as in PEFT's ``boft_block_size`` /
    ``boft_block_num``).

    Attributes:
      block_size: ``b``, features per orthogonal block.
      block_num: ``k``, blocks per factor (then ``b = d_in / k`` per layer).
      n_factors: ``m``, butterfly factors (PEFT's ``boft_n_butterfly_factor``). ``1`` is OFT.
      targets: regexes choosing layers by '/'-joined module path.  A pattern selects a layer when
        it matches the whole path or a trailing run of its components: ``"query"`` and
        ``"attention/(query|value)"`` both select ``encoder/layer_0/attention/query``; ``"que"``
        does not.  The anchoring is implied, so a ``^`` in a pattern pins it to the path's first
        component (``"^query"`` selects only a top-level ``query``); leading global flags such as
        ``"(?i)"`` apply to the whole pattern.  Default: every ``Dense``/``DenseGeneral`` layer.
      exclude: regexes (same matching rule) removing layers from ``targets``.
      dropout: multiplicative dropout probability ``p`` in ``[0, 1]``.  As in PEFT's reference,
        each training call picks one random factor and replaces ``int(p * k)`` random blocks of it
        with the identity (no rescaling; ``p = 1`` replaces all of that factor's blocks, as PEFT
        allows).
      bias: ``"none"`` (biases frozen), ``"boft_only"`` (biases of adapted layers train) or
        ``"all"`` (every bias in the model trains).
      mode: ``"input"`` rotates activations (``x -> x M``, ``2 S d_in`` FLOPs per token with
        ``S = b 2^(m-1)`` for ``m <= 4``, i.e. ``2 m b d_in`` for ``m <= 2``; ``2 m b d_in`` for
        deeper butterflies), ``"weight"`` rotates the kernel once per call (``K -> M K``,
        ``2 S d_in d_out`` FLOPs, likewise),
        ``"auto"`` picks the cheaper one per layer and call from the number of tokens.  A layer with
        its own ``dot_general`` / ``dot_general_cls`` (e.g. quantized) runs the merged kernel
        ``(M K) s`` through that dot in every mode, so that it equals the merged model.
      cayley: ``"exact"`` or ``"neumann"`` (see :func:`boft_jax.cayley`).
      neumann_terms: series terms for ``cayley="neumann"`` (a warning if set with ``cayley="exact"``).
      modules_to_save: regexes (same matching rule) of modules whose params all train in full,
        e.g. a new classifier head (PEFT's ``modules_to_save``).  :func:`boft_jax.split` puts
        them in the adapter tree; they are checkpointed with it.
      block_size_overrides: ``(regex, block_size)`` pairs (or a ``{regex: block_size}`` dict),
        same matching rule: a layer matched by one takes that block size instead of
        ``block_size`` / ``block_num`` (the first matching pair wins).  For layers of different
        widths that no single block size or count fits, e.g. a PEFT OFT adapter whose ``r`` PEFT
        adjusted per layer (:func:`boft_jax.interop.load_peft_adapter` sets these).

    Example of overrides:
      >>> cfg = BOFTConfig(block_num=3, targets=("q", "wo"), block_size_overrides={"wo": 20})
      >>> cfg.layer_structure("decoder/mlp/wo", d_in=40), cfg.layer_structure("decoder/attention/q", d_in=24)
      (LayerStructure(block_size=20, n_blocks=2, n_factors=1), LayerStructure(block_size=8, n_blocks=3, n_factors=1))
    """

    block_size: int | None = None
    block_num: int | None = None
    n_factors: int = 1
    targets: str | Sequence[str] = (".*",)
    exclude: str | Sequence[str] | None = None
    dropout: float = 0.0
    bias: BiasMode = "none"
    mode: ApplyMode = "auto"
    cayley: Literal["exact", "neumann"] = "exact"
    neumann_terms: int = _DEFAULT_NEUMANN_TERMS
    modules_to_save: str | Sequence[str] | None = None
    block_size_overrides: Mapping[str, int] | Sequence[tuple[str, int]] | None = None

    def __post_init__(self):
        object.__setattr__(self, "block_size_overrides", _as_overrides(self.block_size_overrides))
        # Sequences become tuples so the config stays hashable.
        object.__setattr__(self, "targets", _as_patterns(self.targets, "targets"))
        object.__setattr__(self, "exclude", _as_patterns(self.exclude, "exclude"))
        object.__setattr__(self, "modules_to_save", _as_patterns(self.modules_to_save, "modules_to_save"))
        if not self.targets:
            raise ValueError("BOFTConfig.targets is empty: give at least one regex (e.g. '.*' for every layer)")
        if (self.block_size is None) == (self.block_num is None):
            raise ValueError(
                "BOFTConfig needs exactly one of block_size / block_num, got"
                f" block_size={self.block_size!r}, block_num={self.block_num!r}"
                " (e.g. block_size=8, or block_num=4)"
            )
        for name in ("block_size", "block_num", "n_factors", "neumann_terms"):
            object.__setattr__(self, name, _integer(getattr(self, name)))
            v = getattr(self, name)
            optional = name in ("block_size", "block_num")  # exactly one of the two is given
            if (v is not None or not optional) and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"BOFTConfig.{name} must be a positive integer, got {v!r}")
        if self.n_factors > 1:
            for name in ("block_size", "block_num"):
                v = getattr(self, name)
                if v is not None and v % 2:
                    raise ValueError(
                        f"BOFTConfig.{name} = {v} is odd, but n_factors = {self.n_factors} > 1 needs it"
                        f" even (use an even {name}, or n_factors = 1 for plain OFT)"
                    )
            if self.block_num is not None and self.block_num % 2 ** (self.n_factors - 1):
                raise ValueError(
                    f"BOFTConfig.block_num = {self.block_num} must be a multiple of"
                    f" 2**(n_factors-1) = {2 ** (self.n_factors - 1)} for n_factors = {self.n_factors};"
                    f" valid n_factors for block_num = {self.block_num}:"
                    f" 1..{_max_factors_for_block_num(self.block_num)}"
                )
        is_number = isinstance(self.dropout, numbers.Real) and not isinstance(self.dropout, (bool, np.bool_))
        if not (is_number and 0.0 <= self.dropout <= 1.0):
            raise ValueError(f"BOFTConfig.dropout must be a number in [0, 1], got {self.dropout!r}")
        object.__setattr__(self, "dropout", float(self.dropout))
        if self.bias not in _BIAS_MODES:
            raise ValueError(f"BOFTConfig.bias must be one of {_BIAS_MODES}, got {self.bias!r}")
        if self.mode not in _APPLY_MODES:
            raise ValueError(f"BOFTConfig.mode must be one of {_APPLY_MODES}, got {self.mode!r}")
        if self.cayley not in _CAYLEY:
            raise ValueError(f"BOFTConfig.cayley must be one of {_CAYLEY}, got {self.cayley!r}")
        if self.cayley == "exact" and self.neumann_terms != _DEFAULT_NEUMANN_TERMS:
            warnings.warn(
                f"BOFTConfig.neumann_terms = {self.neumann_terms} has no effect with cayley='exact' (the exact"
                " Cayley map has no series); pass cayley='neumann' to use that many terms",
                UnusedNeumannTerms,
                stacklevel=3,
            )

    # ----------------------------------------------------------------------------------------
    def matches(self, path: str) -> bool:
        """Whether the layer at '/'-joined module ``path`` is adapted (in targets, not excluded)."""
        return any(_path_matches(p, path) for p in self.targets) and not any(
            _path_matches(p, path) for p in self.exclude
        )

    def targeted(self, paths) -> list[str]:
        """The ``paths`` that ``targets`` selects, before ``exclude`` removes any."""
        return [p for p in paths if any(_path_matches(t, p) for t in self.targets)]

    def idle_targets(self, paths) -> list[str]:
        """The ``targets`` patterns that select none of ``paths``."""
        return [t for t in self.targets if not any(_path_matches(t, p) for p in paths)]

    def idle_excludes(self, paths) -> list[str]:
        """The ``exclude`` patterns that remove none of the targeted layers among ``paths``."""
        targeted = self.targeted(paths)
        return [e for e in self.exclude if not any(_path_matches(e, p) for p in targeted)]

    def trains_bias(self, adapted: bool) -> bool:
        """Whether a layer's ``bias`` trains: every bias for ``bias="all"``, those of adapted layers for
        ``"boft_only"``, none for ``"none"`` (:func:`boft_jax.split` and the checkpoint checks)."""
        return self.bias == "all" or (self.bias == "boft_only" and adapted)

    def saves_module(self, path: str) -> bool:
        """Whether the module at ``path`` is in ``modules_to_save`` (all its params train)."""
        return any(_path_matches(p, path) for p in self.modules_to_save)

    def saved_ancestor(self, path: str) -> str | None:
        """The module at ``path`` or its nearest enclosing module that is in ``modules_to_save``
        (so everything at ``path`` trains in full), or ``None``."""
        parts = path.split("/")
        return next((p for p in ("/".join(parts[:i]) for i in range(len(parts), 0, -1)) if self.saves_module(p)), None)

    def block_size_override(self, path: str) -> int | None:
        """The block size of the first ``block_size_overrides`` pair matching ``path``, or ``None``."""
        return next((b for pattern, b in self.block_size_overrides if _path_matches(pattern, path)), None)

    def layer_structure(self, path: str, d_in: int) -> LayerStructure:
        """Block structure for a layer with ``d_in`` input features, or a ``ValueError``.

        The error names the layer path, its ``d_in`` and the valid block sizes / block numbers /
        factor counts for it.  Nothing is ever silently changed.
        """
        err = self.fit_error(path, d_in)
        if err is not None:
            raise ValueError(err)
        b = self.block_size_override(path) or (self.block_size if self.block_size is not None else d_in // self.block_num)
        return LayerStructure(block_size=b, n_blocks=d_in // b, n_factors=self.n_factors)

    def fit_error(self, path: str, d_in: int) -> str | None:
        """The message :meth:`layer_structure` would raise for this layer, or ``None`` if it fits."""
        m = self.n_factors
        override = self.block_size_override(path)
        if self.block_size is not None or override is not None:
            b = override or self.block_size
            err = structure_error(d_in, b, m)
            if err is None:
                return None
            alt_m = max_factors(d_in, b)
            what = "block_size" if override is None else "its block_size_overrides entry, block_size"
            return (
                f"{layer_label(path)} (d_in = {d_in}) does not fit {what} = {b}, n_factors = {m}: {err}."
                f" Valid block_size for n_factors = {m}: {_short(valid_block_sizes(d_in, m))}"
                + (f"; valid n_factors for block_size = {b}: 1..{alt_m}" if alt_m else "")
                + _fewer_factors_hint(d_in, m)
                + ". Exclude the layer with BOFTConfig.exclude if it should not be adapted."
            )
        k = self.block_num
        if d_in % k:
            err = f"block_num = {k} does not divide d_in = {d_in}"
        else:
            err = structure_error(d_in, d_in // k, m)
            if err is None:
                return None
        valid_k = _valid_block_nums(d_in, m)
        return (
            f"{layer_label(path)} (d_in = {d_in}) does not fit block_num = {k}, n_factors = {m}: {err}."
            f" Valid block_num for n_factors = {m}: {_short(valid_k)}"
            + _fewer_factors_hint(d_in, m, by_size=False)
            + ". Exclude the layer with BOFTConfig.exclude if it should not be adapted."
        )


def _valid_block_nums(d_in: int, m: int) -> list[int]:
    """All block numbers ``k`` that fit ``d_in`` features with ``m`` factors, ascending."""
    return [d_in // b for b in valid_block_sizes(d_in, m)][::-1]


def _fewer_factors_hint(d_in: int, m: int, by_size: bool = True) -> str:
    """When no block structure at all fits ``d_in`` with ``m`` factors: the most factors that fit, and how."""
    if valid_block_sizes(d_in, m):
        return ""
    fit = next(f for f in range(m - 1, 0, -1) if valid_block_sizes(d_in, f))  # m = 1 always fits (b = 1)
    sizes = valid_block_sizes(d_in, fit)
    ways = f"block_size {_short(sizes)}" if by_size else f"block_num {_short(_valid_block_nums(d_in, fit))}"
    return f". No block structure fits d_in = {d_in} with {m} factors; at most n_factors = {fit} does, with {ways}"


def _as_overrides(value) -> tuple[tuple[str, int], ...]:
    """``block_size_overrides`` as a hashable tuple of ``(regex, block_size)`` pairs, checked."""
    if value is None:
        return ()
    pairs = list(value.items()) if isinstance(value, Mapping) else value
    try:
        pairs = [tuple(p) for p in pairs]
    except TypeError:
        raise TypeError(
            f"BOFTConfig.block_size_overrides must be a {{regex: block_size}} dict or (regex, block_size) pairs, got {value!r}"
        ) from None
    for pair in pairs:
        if len(pair) != 2 or not isinstance(pair[0], str):
            raise TypeError(f"BOFTConfig.block_size_overrides entries must be (regex, block_size) pairs, got {pair!r}")
        b = _integer(pair[1])
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ValueError(f"BOFTConfig.block_size_overrides: block size for {pair[0]!r} must be a positive integer, got {b!r}")
    _as_patterns([p for p, _ in pairs], "block_size_overrides")
    return tuple((p, int(b)) for p, b in pairs)


def _max_factors_for_block_num(k: int) -> int:
    m = 1
    while k % 2 == 0:
        k //= 2
        m += 1
    return m
