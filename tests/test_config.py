"""BOFTConfig validation and the per-layer fit check."""

from __future__ import annotations

import dataclasses
import json
import warnings

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

import boft_jax as boft


def test_config_is_frozen_and_hashable_with_list_targets():
    a = boft.BOFTConfig(block_size=8, n_factors=2, targets=["query", "value"])
    b = boft.BOFTConfig(block_size=8, n_factors=2, targets=("query", "value"))
    assert a == b and hash(a) == hash(b)
    assert a.targets == ("query", "value") and a.exclude == ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.n_factors = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        (dict(), "exactly one of block_size / block_num"),
        (dict(block_size=4, block_num=4), "exactly one of block_size / block_num"),
        (dict(block_size=0), "block_size must be a positive integer"),
        (dict(block_size=4, n_factors=0), "n_factors must be a positive integer"),
        (dict(block_size=3, n_factors=2), "block_size = 3 is odd"),
        (dict(block_num=6, n_factors=3), "multiple of 2**(n_factors-1) = 4"),
        (dict(block_size=4, dropout=1.5), "dropout must be a number in [0, 1]"),
        (dict(block_size=4, dropout=-0.1), "dropout must be a number in [0, 1]"),
        (dict(block_size=4, dropout=True), "dropout must be a number in [0, 1]"),
        (dict(block_size=np.bool_(True)), "block_size must be a positive integer"),
        (dict(block_size=4.0), "block_size must be a positive integer"),
        (dict(block_size=4, bias="some"), "bias must be one of ('none', 'boft_only', 'all')"),
        (dict(block_size=4, mode="fast"), "mode must be one of ('auto', 'input', 'weight')"),
        (dict(block_size=4, cayley="pade"), "cayley must be one of ('exact', 'neumann')"),
        (dict(block_size=4, targets="("), "not a valid regular expression"),
        (dict(block_size=4, targets=()), "targets is empty"),
        (dict(block_size=4, targets=[3]), "regex strings"),
    ],
)
def test_invalid_configs_raise_naming_what_is_valid(kwargs, fragment):
    with pytest.raises((ValueError, TypeError)) as e:
        boft.BOFTConfig(**kwargs)
    assert fragment in str(e.value)


def test_numpy_scalars_are_accepted_as_python_numbers():
    """Values read from arrays or configs (np.int64, np.float32) mean what they say; the config holds
    plain Python numbers (hashable, equal to the same config written with Python literals)."""
    rng = np.random.default_rng()
    b, m, p = int(rng.choice([2, 4, 8])), int(rng.integers(1, 4)), float(rng.uniform(0, 0.9))
    cfg = boft.BOFTConfig(block_size=np.int64(b), n_factors=np.int32(m), dropout=np.float32(p), cayley="neumann",
                          neumann_terms=np.uint8(3), block_size_overrides={"fc2": np.int16(2 * b)})
    plain = boft.BOFTConfig(block_size=b, n_factors=m, dropout=float(np.float32(p)), cayley="neumann",
                            neumann_terms=3, block_size_overrides={"fc2": 2 * b})
    assert cfg == plain and hash(cfg) == hash(plain)
    assert all(type(v) is int for v in (cfg.block_size, cfg.n_factors, cfg.neumann_terms, cfg.block_size_overrides[0][1]))
    assert type(cfg.dropout) is float
    assert boft.BOFTConfig(block_num=np.int64(4)).block_num == 4


def test_neumann_terms_without_the_neumann_map_warns():
    """``neumann_terms`` only sets the series of ``cayley="neumann"``; with the exact map it would be
    silently ignored, so a non-default value warns (the default, and the neumann map, do not)."""
    terms = int(np.random.default_rng().integers(1, 5))  # never the default 5
    with pytest.warns(UserWarning, match=f"neumann_terms = {terms} has no effect with cayley='exact'"):
        boft.BOFTConfig(block_size=4, neumann_terms=terms)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        boft.BOFTConfig(block_size=4, cayley="neumann", neumann_terms=terms)
        boft.BOFTConfig(block_size=4, cayley="exact")


def test_leading_global_regex_flags_apply_to_the_whole_pattern():
    # Python's re wants global flags at the very start; the path anchoring wraps the pattern, so
    # the flags are kept in front of it (they used to pass validation and then fail at init).
    cfg = boft.BOFTConfig(block_size=4, targets=r"(?i)attention/(QUERY|Value)", exclude=r"(?i)LAYER_1/.*",
                          modules_to_save="(?i)HEAD", block_size_overrides={"(?i)(?x) attention / value": 2})
    assert cfg.matches("encoder/layer_0/attention/query") and cfg.matches("encoder/Layer_0/Attention/VALUE")
    assert not cfg.matches("encoder/layer_0/attention/key") and not cfg.matches("encoder/layer_1/attention/query")
    assert not cfg.matches("encoder/layer_0/xattention/query")  # still whole components
    assert cfg.saves_module("classifier/head")
    assert cfg.layer_structure("encoder/layer_0/attention/value", d_in=8).block_size == 2
    assert cfg.layer_structure("encoder/layer_0/attention/query", d_in=8).block_size == 4
    with pytest.raises(ValueError, match="not a valid regular expression"):
        boft.BOFTConfig(block_size=4, targets="query(?i)")  # a flag in the middle: refused up front


def test_targets_match_whole_path_or_trailing_components():
    cfg = boft.BOFTConfig(block_size=4, targets=[r"attention/(query|value)", "fc1"], exclude=["layer_1/.*"])
    assert cfg.matches("encoder/layer_0/attention/query")
    assert cfg.matches("encoder/layer_0/attention/value")
    assert cfg.matches("encoder/layer_0/mlp/fc1")
    assert not cfg.matches("encoder/layer_0/attention/key")
    assert not cfg.matches("encoder/layer_0/attention/query_norm")
    assert not cfg.matches("encoder/layer_0/attention/out/query")  # 'attention/(query)' must be adjacent
    assert not cfg.matches("encoder/layer_1/attention/query")  # excluded
    assert not boft.BOFTConfig(block_size=4, targets="que").matches("attention/query")
    assert boft.BOFTConfig(block_size=4).matches("anything/at/all")


@pytest.mark.parametrize("d_in,m", [(768, 1), (768, 2), (768, 4), (96, 3)])
def test_layer_structure_block_size(d_in, m):
    s = boft.BOFTConfig(block_size=8, n_factors=m).layer_structure("a/b", d_in)
    assert s == boft.LayerStructure(block_size=8, n_blocks=d_in // 8, n_factors=m)


def test_layer_structure_block_num():
    s = boft.BOFTConfig(block_num=4, n_factors=3).layer_structure("x", 96)
    assert s == boft.LayerStructure(block_size=24, n_blocks=4, n_factors=3)


def test_layer_that_does_not_fit_names_path_d_in_and_alternatives():
    cfg = boft.BOFTConfig(block_size=8, n_factors=3)
    with pytest.raises(ValueError) as e:
        cfg.layer_structure("encoder/layer_0/mlp/fc2", 40)
    msg = str(e.value)
    assert "encoder/layer_0/mlp/fc2" in msg and "d_in = 40" in msg
    assert "Valid block_size for n_factors = 3: 2, 10" in msg
    assert "valid n_factors for block_size = 8: 1..1" in msg
    for b in (2, 10):
        assert boft.structure_error(40, b, 3) is None
    assert "exclude" in msg


def test_block_num_that_does_not_fit_names_valid_block_nums():
    cfg = boft.BOFTConfig(block_num=16, n_factors=2)
    with pytest.raises(ValueError) as e:
        cfg.layer_structure("head", 40)
    msg = str(e.value)
    assert "head" in msg and "d_in = 40" in msg and "block_num = 16 does not divide d_in = 40" in msg
    listed = [int(t) for t in msg.split("Valid block_num for n_factors = 2: ")[1].split(".")[0].split(", ")]
    assert listed and all(boft.structure_error(40, 40 // k, 2) is None for k in listed)
    assert cfg.fit_error("ok", 64) is None


# ---------------------------------------------------------------------------------------------
# Property: construct + fit exactly when the structure is valid, otherwise a useful ValueError
# ---------------------------------------------------------------------------------------------
# The butterfly rule, re-derived from the definition (boft_jax.butterfly's docstring) rather than taken from
# boft_jax: d features are cut into k blocks of b (so b | d).  For m > 1, factor i pairs half-blocks
# (b / 2 features each, so b is even) inside chunks of b 2^i features, and the widest chunks (i = m-1)
# must tile the features: b 2^(m-1) | d, i.e. 2^(m-1) | k (which for m > 1 makes k even).
def _valid(d: int, b: int, m: int) -> bool:
    if b < 1 or d % b:
        return False
    if m == 1:
        return True
    k = d // b
    return b % 2 == 0 and k % 2 == 0 and k % 2 ** (m - 1) == 0


def _max_m(d: int, b: int) -> int:
    m = 0
    while _valid(d, b, m + 1) and m < 64:
        m += 1
    return m


def _listed(msg: str, prefix: str) -> tuple[list[int], int | None]:
    """The integers listed after ``prefix`` (up to '.' or ';'), and the '(N in all)' total if any."""
    text = msg.split(prefix, 1)[1]
    text = text.split(";", 1)[0]
    total = None
    if "in all)" in text:
        total = int(text.split("(", 1)[1].split(" in all", 1)[0])
        text = text.split(", ...", 1)[0]
    text = text.split(". ", 1)[0].rstrip(".")
    if text.strip() == "none":
        return [], total
    return [int(t) for t in text.split(", ")], total


def _assert_alternatives(msg: str, prefix: str, expected: list[int]):
    got, total = _listed(msg, prefix)
    if len(expected) <= 16:
        assert got == expected and total is None, (msg, expected)
    else:  # long lists are cut after 16 entries, with the count
        assert got == expected[:16] and total == len(expected), (msg, expected)


@st.composite
def _structures(draw):
    by_size = draw(st.booleans())
    m = draw(st.integers(1, 6))
    # block_size or block_num: a third arbitrary, else even (block_size) / a multiple of 2^j (block_num)
    if draw(st.integers(0, 2)) == 0:
        value = draw(st.integers(1, 40))
    elif by_size:
        value = 2 * draw(st.integers(1, 20))
    else:
        value = draw(st.integers(1, 5)) * 2 ** draw(st.integers(0, m))
    # d: arbitrary, or built to be likely valid (value * 2^e * c), or one off from that
    how = draw(st.integers(0, 2))
    if how == 0:
        d = draw(st.integers(1, 1024))
    else:
        d = value * 2 ** draw(st.integers(0, 6)) * draw(st.integers(1, 3))
        if not by_size:
            d *= draw(st.sampled_from([1, 2, 3, 4, 8]))  # block_num: b = d / k
        d += how == 2  # near miss
    path = "/".join(draw(st.lists(st.sampled_from(["encoder", "layer_3", "mlp", "fc1", "attention", "query"]),
                                  min_size=1, max_size=4)))
    return by_size, value, m, d, path


@settings(max_examples=80, deadline=None)
@given(_structures())
def test_property_config_fits_exactly_the_valid_structures(structure):
    by_size, value, m, d, path = structure
    field = "block_size" if by_size else "block_num"
    b = value if by_size else (d // value if d % value == 0 else None)
    valid = b is not None and _valid(d, b, m)
    # A config that no d can fit (m > 1 with an odd b, or a k that 2^(m-1) does not divide) may be
    # refused already when it is built; it must then say which values work.
    never_fits = m > 1 and (value % 2 if by_size else value % 2 ** (m - 1))
    try:
        cfg = boft.BOFTConfig(**{field: value}, n_factors=m)
    except ValueError as e:
        event("refused when built")
        assert never_fits, (structure, str(e))
        msg = str(e)
        assert f"BOFTConfig.{field} = {value}" in msg
        if value % 2:  # odd b or k: needs an even value, or plain OFT
            assert f"use an even {field}" in msg and "n_factors = 1" in msg
        else:  # even k: the valid factor counts for it are 1 .. 1 + (number of factors 2 in k)
            assert not by_size
            max_m = max(mm for mm in range(1, 12) if value % 2 ** (mm - 1) == 0)
            assert f"valid n_factors for block_num = {value}: 1..{max_m}" in msg
        return
    assert not never_fits, structure  # checked at fit time instead; the fit must then refuse it

    event(f"{field}: {'fits' if valid else 'refused at fit'}")
    if valid:
        assert cfg.fit_error(path, d) is None
        assert cfg.layer_structure(path, d) == boft.LayerStructure(block_size=b, n_blocks=d // b, n_factors=m)
        return
    assert cfg.fit_error(path, d) is not None
    with pytest.raises(ValueError) as e:
        cfg.layer_structure(path, d)
    msg = str(e.value)
    assert msg == cfg.fit_error(path, d)
    assert f"layer '{path}' (d_in = {d})" in msg and f"{field} = {value}" in msg
    assert "exclude" in msg
    # The alternatives named are exactly the valid ones (b = 1, i.e. block_num = d_in, included:
    # it trains only the scale, and PEFT accepts it).
    if by_size:
        _assert_alternatives(msg, f"Valid block_size for n_factors = {m}: ",
                             [bb for bb in range(1, d + 1) if _valid(d, bb, m)])
        if d % value == 0:
            assert f"valid n_factors for block_size = {value}: 1..{_max_m(d, value)}" in msg
        else:
            assert "valid n_factors" not in msg
    else:
        _assert_alternatives(msg, f"Valid block_num for n_factors = {m}: ",
                             [k for k in range(1, d + 1) if d % k == 0 and _valid(d, d // k, m)])
    # When no structure at all fits d with m factors, the most factors that do fit are named, with their sizes.
    if not any(_valid(d, bb, m) for bb in range(1, d + 1)):
        fit = max(mm for mm in range(1, m) if any(_valid(d, bb, mm) for bb in range(1, d + 1)))
        assert f"at most n_factors = {fit} does, with " in msg
        field_values = [bb for bb in range(1, d + 1) if _valid(d, bb, fit)]
        if not by_size:
            field_values = sorted(d // bb for bb in field_values)
        _assert_alternatives(msg, f"at most n_factors = {fit} does, with {field} ", field_values)
    else:
        assert "No block structure fits" not in msg


def test_saved_ancestor_finds_the_enclosing_saved_module():
    cfg = boft.BOFTConfig(block_size=4, modules_to_save=["head", r"encoder/layer_\d+/mlp"])
    assert cfg.saved_ancestor("head") == "head"
    assert cfg.saved_ancestor("head/dense") == "head"
    assert cfg.saved_ancestor("encoder/layer_3/mlp/fc1") == "encoder/layer_3/mlp"
    assert cfg.saved_ancestor("encoder/layer_3/attention/query") is None
    assert boft.BOFTConfig(block_size=4).saved_ancestor("head") is None


def test_block_size_overrides_take_precedence_per_layer_and_round_trip_through_json():
    from boft_jax.checkpoint import config_from_dict, config_to_dict

    cfg = boft.BOFTConfig(block_num=3, targets=("q", "o", "wo"), block_size_overrides={"mlp/wo": 20, "wo": 5})
    assert cfg.block_size_overrides == (("mlp/wo", 20), ("wo", 5))
    # the first matching pair wins; other layers follow block_num
    assert cfg.layer_structure("decoder/layer_0/mlp/wo", 40) == (20, 2, 1)
    assert cfg.layer_structure("decoder/layer_0/attn/wo", 40) == (5, 8, 1)
    assert cfg.layer_structure("decoder/layer_0/attn/o", 18) == (6, 3, 1)
    assert cfg.block_size_override("decoder/layer_0/attn/q") is None
    same = boft.BOFTConfig(block_num=3, targets=("q", "o", "wo"), block_size_overrides=[("mlp/wo", 20), ["wo", 5]])
    assert same == cfg and hash(same) == hash(cfg)
    again = config_from_dict(json.loads(json.dumps(config_to_dict(cfg))))
    assert again == cfg
    # an override that does not fit names the override, the layer and the valid sizes
    msg = cfg.fit_error("decoder/layer_0/mlp/wo", 30)
    assert "layer 'decoder/layer_0/mlp/wo' (d_in = 30) does not fit its block_size_overrides entry, block_size = 20" in msg
    assert "Valid block_size for n_factors = 1: 1, 2, 3, 5, 6, 10, 15, 30" in msg


@pytest.mark.parametrize(
    "overrides,error,fragment",
    [
        ({"wo": 0}, ValueError, "block size for 'wo' must be a positive integer, got 0"),
        ({"wo": 2.5}, ValueError, "got 2.5"),
        ([("wo",)], TypeError, "must be (regex, block_size) pairs"),
        ({"(": 4}, ValueError, "block_size_overrides: '(' is not a valid regular expression"),
        (7, TypeError, "must be a {regex: block_size} dict or (regex, block_size) pairs"),
    ],
)
def test_bad_block_size_overrides_are_refused(overrides, error, fragment):
    with pytest.raises(error) as e:
        boft.BOFTConfig(block_size=4, block_size_overrides=overrides)
    assert fragment in str(e.value)
