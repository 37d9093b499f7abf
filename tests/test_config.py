"""BOFTConfig validation and the per-layer fit check."""

from __future__ import annotations

import dataclasses

import pytest

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
        (dict(block_size=4, dropout=1.0), "dropout must be in [0, 1)"),
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
