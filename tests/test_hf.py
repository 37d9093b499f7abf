"""Reading and writing Hugging Face model directories (boft_jax.models.hf)."""

import json
import math
import os
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from boft_jax import models
from boft_jax.models import hf, t5, vit

FIXTURES = Path(__file__).parent / "fixtures"


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def copy_with_state(src, dst, mutate=None, config_update=None):
    """A copy of checkpoint ``src`` at ``dst`` with its state dict and config edited."""
    dst.mkdir(parents=True, exist_ok=True)
    config = hf.read_config(src)
    config.update(config_update or {})
    (dst / "config.json").write_text(json.dumps(config))
    state = hf.load_state_dict(src)
    if mutate:
        mutate(state)
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def random_params(shapes, seed=0):
    rng = np.random.default_rng(seed)
    return hf._unflatten({p: rng.standard_normal(s).astype(np.float32) for p, s in shapes.items()})


# ---- reading ------------------------------------------------------------------------------


def test_sharded_checkpoint_equals_single_file():
    assert len(list((FIXTURES / "vit_sharded").glob("model-*-of-*.safetensors"))) > 1
    single, sharded = hf.load_state_dict(FIXTURES / "vit"), hf.load_state_dict(FIXTURES / "vit_sharded")
    assert sorted(single) == sorted(sharded)
    for key in single:
        np.testing.assert_array_equal(single[key], sharded[key])
    assert_trees_equal(vit.from_pretrained(FIXTURES / "vit")[1], vit.from_pretrained(FIXTURES / "vit_sharded")[1])


@pytest.mark.parametrize("name", ["vit", "t5_relu"])
def test_legacy_flax_msgpack_loads_the_same_params(name):
    legacy = FIXTURES / f"{name}_flax_legacy"
    assert (legacy / "flax_model.msgpack").is_file() and not (legacy / "model.safetensors").exists()
    module, params = models.from_pretrained(legacy)
    expected_module, expected = models.from_pretrained(FIXTURES / name)
    assert module == expected_module
    assert_trees_equal(params, expected)


def test_a_msgpack_file_that_is_no_param_tree_is_a_clear_error(tmp_path):
    import shutil

    from flax.serialization import msgpack_serialize

    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(FIXTURES / "vit_flax_legacy" / "config.json", d)
    for value, what in (([1, 2, 3], "list"), (7, "int")):
        (d / "flax_model.msgpack").write_bytes(msgpack_serialize(value))
        with pytest.raises(ValueError, match=rf"holds a msgpack {what}, not a Flax parameter tree"):
            hf.load_state_dict(d)


def test_transformers5_key_names_load_the_same_params():
    keys = set(hf.load_state_dict(FIXTURES / "vit_v5_keys"))
    assert "vit.layers.0.attention.q_proj.weight" in keys and "vit.layers.1.mlp.fc2.bias" in keys
    assert_trees_equal(vit.from_pretrained(FIXTURES / "vit_v5_keys")[1], vit.from_pretrained(FIXTURES / "vit")[1])


def test_transformers5_names_and_aliases_are_inverse():
    legacy = sorted(hf.load_state_dict(FIXTURES / "vit"))
    v5 = sorted(hf.load_state_dict(FIXTURES / "vit_v5_keys"))

    def rename(key, rules):
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        return key

    assert sorted(rename(k, vit.HF_KEY_ALIASES_V5) for k in legacy) == v5
    assert sorted(rename(k, vit.HF_KEY_ALIASES) for k in v5) == legacy


def test_from_pretrained_dispatches_on_model_type():
    module, _ = models.from_pretrained(FIXTURES / "vit", scan_layers=True)
    assert isinstance(module, vit.ViT) and module.scan_layers
    module, params = models.from_pretrained(FIXTURES / "t5_gated", dtype=jnp.bfloat16)
    assert isinstance(module, t5.T5) and module.dtype == jnp.bfloat16 and "lm_head" in params


def test_t5_embed_tokens_copies_are_accepted_and_checked(tmp_path):
    def add_copies(state):
        state["encoder.embed_tokens.weight"] = state["shared.weight"].copy()
        state["decoder.embed_tokens.weight"] = state["shared.weight"].copy()
        state["decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"] = np.zeros((8, 4), np.float32)

    _, expected = t5.from_pretrained(FIXTURES / "t5_relu")
    _, params = t5.from_pretrained(copy_with_state(FIXTURES / "t5_relu", tmp_path / "copies", add_copies))
    assert_trees_equal(params, expected)

    def only_encoder_copy(state):
        state["encoder.embed_tokens.weight"] = state.pop("shared.weight")

    _, params = t5.from_pretrained(copy_with_state(FIXTURES / "t5_relu", tmp_path / "renamed", only_encoder_copy))
    assert_trees_equal(params, expected)

    def different_copy(state):
        state["decoder.embed_tokens.weight"] = state["shared.weight"] + 1

    with pytest.raises(ValueError, match=r"decoder\.embed_tokens\.weight differs from shared\.weight"):
        t5.from_pretrained(copy_with_state(FIXTURES / "t5_relu", tmp_path / "bad", different_copy))


def test_tied_head_stored_twice_stays_tied(tmp_path):
    def store_head(state):
        state["lm_head.weight"] = state["shared.weight"].copy()

    module, params = t5.from_pretrained(copy_with_state(FIXTURES / "t5_relu", tmp_path / "t", store_head))
    assert module.config.tie_word_embeddings and "lm_head" not in params


# ---- errors -------------------------------------------------------------------------------


def test_missing_key_is_an_error_naming_it_and_its_shape(tmp_path):
    def drop(state):
        del state["vit.encoder.layer.1.attention.attention.key.weight"]

    path = copy_with_state(FIXTURES / "vit", tmp_path / "m", drop)
    with pytest.raises(ValueError, match=r"missing keys \(1\)") as info:
        vit.from_pretrained(path)
    assert "vit.encoder.layer.1.attention.attention.key.weight (expected shape (32, 32))" in str(info.value)
    assert str(path) in str(info.value)


def test_unexpected_key_is_an_error_naming_it(tmp_path):
    def add(state):
        state["vit.encoder.layer.2.attention.attention.key.weight"] = np.zeros((32, 32), np.float32)

    with pytest.raises(ValueError, match=r"unexpected keys \(1\)") as info:
        vit.from_pretrained(copy_with_state(FIXTURES / "vit", tmp_path / "u", add))
    assert "vit.encoder.layer.2.attention.attention.key.weight (shape (32, 32))" in str(info.value)


def test_misshaped_key_is_an_error_naming_both_shapes(tmp_path):
    def reshape(state):
        state["classifier.weight"] = np.zeros((6, 32), np.float32)

    with pytest.raises(ValueError, match=r"mis-shaped keys \(1\)") as info:
        vit.from_pretrained(copy_with_state(FIXTURES / "vit", tmp_path / "s", reshape))
    assert "classifier.weight: got (6, 32), expected (5, 32)" in str(info.value)


def test_all_mismatches_are_reported_together(tmp_path):
    def break_all(state):
        del state["decoder.final_layer_norm.weight"]
        state["decoder.block.0.layer.0.SelfAttention.q.weight"] = np.zeros((16, 31), np.float32)
        state["encoder.block.0.layer.0.SelfAttention.extra"] = np.zeros((2,), np.float32)

    with pytest.raises(ValueError) as info:
        t5.from_pretrained(copy_with_state(FIXTURES / "t5_relu", tmp_path / "a", break_all))
    message = str(info.value)
    assert "decoder.final_layer_norm.weight (expected shape (32,))" in message
    assert "decoder.block.0.layer.0.SelfAttention.q.weight: got (16, 31), expected (16, 32)" in message
    assert "encoder.block.0.layer.0.SelfAttention.extra (shape (2,))" in message


def test_untied_t5_without_lm_head_loads_tied_unscaled_as_transformers_5(tmp_path):
    """tie_word_embeddings = false and no lm_head.weight: transformers 5 ties the head to the shared
    embedding (no output scaling); boft_jax does the same, with a warning.  Reference: the same
    checkpoint with an explicit untied head equal to the shared embedding."""
    def drop_head(state):
        del state["lm_head.weight"]

    def shared_head(state):
        state["lm_head.weight"] = state["shared.weight"].copy()

    path = copy_with_state(FIXTURES / "t5_gated", tmp_path / "h", drop_head, {"tie_word_embeddings": False})
    with pytest.warns(UserWarning, match="holds no lm_head.weight: the LM head is the shared embedding"):
        module, params = t5.from_pretrained(path)
    assert module.config.tie_word_embeddings and not module.config.scale_decoder_outputs and "lm_head" not in params
    ref_module, ref_params = t5.from_pretrained(
        copy_with_state(FIXTURES / "t5_gated", tmp_path / "r", shared_head, {"tie_word_embeddings": False})
    )
    assert not ref_module.config.tie_word_embeddings
    rng = np.random.default_rng()
    ids, dec = jnp.asarray(rng.integers(2, 64, (2, 5))), jnp.asarray(rng.integers(2, 64, (2, 4)))
    mask = jnp.ones((2, 5), jnp.int32)
    got = module.apply({"params": params}, ids, mask, dec)
    want = ref_module.apply({"params": ref_params}, ids, mask, dec)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_nonexistent_path_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        models.from_pretrained(missing)
    assert str(missing) in str(info.value) and "config.json" in str(info.value)
    with pytest.raises(FileNotFoundError):
        vit.from_pretrained(missing)
    with pytest.raises(NotADirectoryError):
        t5.from_pretrained(FIXTURES / "vit" / "config.json")


def test_directory_without_config_or_weights_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        models.from_pretrained(tmp_path)
    shutil.copy(FIXTURES / "vit" / "config.json", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no weights .* model\.safetensors"):
        models.from_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match="pickle"):
        models.from_pretrained(tmp_path)


def test_missing_shard_is_a_clear_error(tmp_path):
    shutil.copytree(FIXTURES / "vit_sharded", tmp_path / "v")
    (tmp_path / "v" / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00003.safetensors"):
        vit.from_pretrained(tmp_path / "v")


def test_unsupported_or_mismatched_model_type_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match=r"model_type='bert'.*supported model types: \['vit', 't5', 'mt5'\]"):
        models.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"model_type='t5', but this loader reads 'vit'"):
        vit.from_pretrained(FIXTURES / "t5_relu")


# ---- writing ------------------------------------------------------------------------------


@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("name", ["vit", "t5_relu", "t5_gated", "mt5"])
def test_save_pretrained_round_trips_exactly(tmp_path, name, scan_layers):
    module, params = models.from_pretrained(FIXTURES / name, scan_layers=scan_layers)
    models.save_pretrained(tmp_path, module, params)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]  # no temp files left
    again, again_params = models.from_pretrained(tmp_path, scan_layers=scan_layers)
    assert again == module
    assert_trees_equal(again_params, params)
    # host=True: the same values as host numpy arrays (on no device), to be placed onto a sharding
    _, on_host = models.from_pretrained(tmp_path, scan_layers=scan_layers, host=True)
    assert all(type(leaf) is np.ndarray for leaf in jax.tree.leaves(on_host))
    assert_trees_equal(on_host, params)
    # The same keys and tensors as transformers itself wrote.
    ours, theirs = hf.load_state_dict(tmp_path), hf.load_state_dict(FIXTURES / name)
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        np.testing.assert_array_equal(ours[key], theirs[key])
    written, original = (json.loads((d / "config.json").read_text()) for d in (tmp_path, FIXTURES / name))
    assert (written["model_type"], written["architectures"]) == (original["model_type"], original["architectures"])


@pytest.mark.parametrize(
    "config",
    [
        vit.ViTConfig(image_size=(8, 12), patch_size=4, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                      intermediate_size=24, qkv_bias=False, num_labels=3, id2label=("cat", "dog", "eel"),
                      hidden_act="gelu_new"),
        t5.T5Config(vocab_size=40, d_model=16, d_kv=8, d_ff=24, num_layers=1, num_decoder_layers=3, num_heads=2,
                    feed_forward_proj="gated-silu", tie_word_embeddings=False, eos_token_id=(1, 7)),
    ],
    ids=["vit", "t5"],
)
def test_save_pretrained_round_trips_fresh_random_params(tmp_path, config):
    lib = vit if isinstance(config, vit.ViTConfig) else t5
    params = random_params(lib.param_shapes(config))
    models.save_pretrained(tmp_path, config, params)
    module, loaded = models.from_pretrained(tmp_path)
    assert module.config == config
    assert_trees_equal(loaded, jax.tree.map(jnp.asarray, params))


def test_save_pretrained_shards_and_replaces_stale_files(tmp_path):
    module, params = vit.from_pretrained(FIXTURES / "vit")
    models.save_pretrained(tmp_path, module, params, max_shard_bytes=30_000)
    names = sorted(os.listdir(tmp_path))
    shards = [n for n in names if n.startswith("model-")]
    assert len(shards) > 1 and "model.safetensors.index.json" in names and "model.safetensors" not in names
    assert_trees_equal(vit.from_pretrained(tmp_path)[1], params)
    # Saving again as one file removes the shards and the index, which would otherwise shadow it.
    models.save_pretrained(tmp_path, module.config, params)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    assert_trees_equal(vit.from_pretrained(tmp_path)[1], params)


def test_save_pretrained_keeps_bfloat16(tmp_path):
    module, params = t5.from_pretrained(FIXTURES / "t5_relu")
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    models.save_pretrained(tmp_path, module, bf16)
    _, loaded = t5.from_pretrained(tmp_path)
    assert_trees_equal(loaded, bf16)


def test_save_pretrained_rejects_params_the_model_does_not_have(tmp_path):
    module, params = vit.from_pretrained(FIXTURES / "vit")
    params["encoder"]["layer_0"]["attention"]["query"]["boft_R"] = jnp.zeros((2, 8, 6))
    del params["layernorm"]["bias"]
    with pytest.raises(ValueError) as info:
        models.save_pretrained(tmp_path / "out", module, params)
    message = str(info.value)
    assert "encoder/layer_0/attention/query/boft_R (shape (2, 8, 6))" in message and "merged" in message
    assert "layernorm/bias (expected shape (32,))" in message
    assert not (tmp_path / "out").exists()


def test_save_pretrained_rejects_unmerged_adapter_nodes(tmp_path):
    @jax.tree_util.register_static
    class Node:  # stands for an adapter node such as boft.BOFTKernel
        shape = (32, 32)
        dtype = np.float32

    module, params = vit.from_pretrained(FIXTURES / "vit")
    params["encoder"]["layer_1"]["mlp"]["fc1"]["kernel"] = Node()
    with pytest.raises(ValueError, match=r"boft\.merge") as info:
        models.save_pretrained(tmp_path, module, params)
    assert "encoder/layer_1/mlp/fc1/kernel (Node)" in str(info.value)


def test_model_checkpoint_without_head_needs_num_labels(tmp_path):
    def strip(state):
        for key in [k for k in state if k.startswith("classifier.")]:
            del state[key]
        for key in list(state):  # a bare ViTModel: no "vit." prefix
            state[key[len("vit."):]] = state.pop(key)

    path = copy_with_state(FIXTURES / "vit", tmp_path / "bare", strip)
    with pytest.raises(ValueError, match="num_labels"):
        vit.from_pretrained(path)
    module, params = vit.from_pretrained(path, num_labels=7)
    _, expected = vit.from_pretrained(FIXTURES / "vit")
    assert module.config.num_labels == 7 and params["classifier"]["kernel"].shape == (32, 7)
    np.testing.assert_array_equal(params["encoder"]["layer_1"]["mlp"]["fc2"]["kernel"],
                                  expected["encoder"]["layer_1"]["mlp"]["fc2"]["kernel"])


def test_save_pretrained_needs_a_model_or_config(tmp_path):
    with pytest.raises(TypeError, match="ViTConfig"):
        models.save_pretrained(tmp_path, {"model_type": "vit"}, {})


def test_stack_and_unstack_layers_are_inverse():
    _, params = t5.from_pretrained(FIXTURES / "t5_relu")
    stacked = hf.stack_layers(params)
    assert stacked["encoder"]["layers"]["mlp"]["wi"]["kernel"].shape == (2, 32, 64)
    assert_trees_equal(hf.unstack_layers(stacked), params)


# That transformers loads what save_pretrained writes is checked without torch at test time in
# tests/test_interop.py: tests/fixtures/make_peft_fixtures.py exports merged models with our code,
# runs them in plain transformers and stores the logits.


# Every activation name against its published formula, in float64 numpy (independent of jax.nn).
_SQRT2 = np.sqrt(2.0)
_ERF = np.vectorize(math.erf)


def _np_gelu(x):
    return 0.5 * x * (1.0 + _ERF(x / _SQRT2))


def _np_gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def _np_softplus(x):
    return np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0.0)


NP_ACTIVATIONS = {
    "gelu": _np_gelu,
    "gelu_python": _np_gelu,
    "gelu_10": lambda x: np.clip(_np_gelu(x), -10.0, 10.0),
    "gelu_new": _np_gelu_tanh,
    "gelu_pytorch_tanh": _np_gelu_tanh,
    "gelu_python_tanh": _np_gelu_tanh,
    "gelu_fast": _np_gelu_tanh,
    "gelu_accurate": _np_gelu_tanh,
    "quick_gelu": lambda x: x / (1.0 + np.exp(-1.702 * x)),
    "relu": lambda x: np.maximum(x, 0.0),
    "relu2": lambda x: np.maximum(x, 0.0) ** 2,
    "relu6": lambda x: np.minimum(np.maximum(x, 0.0), 6.0),
    "leaky_relu": lambda x: np.where(x >= 0, x, 0.01 * x),
    "silu": lambda x: x / (1.0 + np.exp(-x)),
    "swish": lambda x: x / (1.0 + np.exp(-x)),
    "hardswish": lambda x: x * np.minimum(np.maximum(x + 3.0, 0.0), 6.0) / 6.0,
    "mish": lambda x: x * np.tanh(_np_softplus(x)),
    "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)),
    "tanh": np.tanh,
    "sqrtsoftplus": lambda x: np.sqrt(_np_softplus(x)),
    "laplace": lambda x: 0.5 * (1.0 + _ERF((x - 0.707107) / (0.282095 * _SQRT2))),
    "linear": lambda x: x,
}


def test_activation_names_match_their_published_formulas():
    assert sorted(hf.ACTIVATIONS) == sorted(NP_ACTIVATIONS)
    rng = np.random.default_rng()
    x = np.concatenate([rng.normal(0.0, 3.0, 500), rng.uniform(-30.0, 30.0, 100), [0.0, -3.0, 3.0, 6.0]])
    for name, ref in NP_ACTIVATIONS.items():
        got = np.asarray(hf.activation(name)(jnp.asarray(x, jnp.float32)), np.float64)
        want = ref(x.astype(np.float32).astype(np.float64))
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6, err_msg=name)
    with pytest.raises(ValueError, match=r"unsupported activation 'prelu'; supported: \[.*'gelu_fast'.*\]"):
        hf.activation("prelu")


def test_mt5_config_never_scales_the_decoder_output():
    """transformers' MT5ForConditionalGeneration never scales, even when a config.json of
    model_type "mt5" (edited or converted) says scale_decoder_outputs = true."""
    base = dict(vocab_size=40, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2, feed_forward_proj="gated-gelu",
                decoder_start_token_id=0)
    for extra in ({}, {"scale_decoder_outputs": True}, {"tie_word_embeddings": True, "scale_decoder_outputs": True}):
        assert t5.T5Config.from_hf_dict({**base, "model_type": "mt5", **extra}).scale_decoder_outputs is False
    assert t5.T5Config.from_hf_dict({**base, "model_type": "t5", "scale_decoder_outputs": True}).scale_decoder_outputs
    # an explicit null: transformers 5 keeps None, which its T5 reads as "do not scale" (a review measured
    # logits sqrt(d_model) apart when boft_jax took the tied default); an absent key keeps that default
    for tie in (True, False):
        cfg = {**base, "model_type": "t5", "tie_word_embeddings": tie}
        assert t5.T5Config.from_hf_dict({**cfg, "scale_decoder_outputs": None}).scale_decoder_outputs is False
        assert t5.T5Config.from_hf_dict(cfg).scale_decoder_outputs is tie
    with pytest.raises(ValueError, match=r"this T5 config.json sets 'layer_norm_epsilon', 'tie_word_embeddings' to null"):
        t5.T5Config.from_hf_dict({**base, "layer_norm_epsilon": None, "tie_word_embeddings": None})


def test_a_null_vit_config_field_is_named():
    from boft_jax.models import vit

    good = vit.ViTConfig(image_size=8, patch_size=4, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=16, num_labels=3).to_hf_dict()
    assert vit.ViTConfig.from_hf_dict(good).layer_norm_eps == good["layer_norm_eps"]
    with pytest.raises(ValueError, match=r"this ViT config.json sets 'layer_norm_eps', 'qkv_bias' to null; give a value"):
        vit.ViTConfig.from_hf_dict({**good, "layer_norm_eps": None, "qkv_bias": None})
    assert vit.ViTConfig.from_hf_dict({**good, "head_dim": None}).head_dim is None  # a field whose default is null


def test_config_fields_of_the_wrong_type_are_named():
    """A string, float or bool where config.json needs an int (and the like) is named with its field,
    instead of failing deep in the model; a whole number for a float field is fine, as in transformers."""
    from boft_jax.models import vit

    good = vit.ViTConfig(image_size=8, patch_size=4, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=16, num_labels=3).to_hf_dict()
    assert vit.ViTConfig.from_hf_dict({**good, "layer_norm_eps": 1, "hidden_dropout_prob": 0}).layer_norm_eps == 1
    with pytest.raises(ValueError, match=r"this ViT config.json gives 3 field\(s\) a value of the wrong type:"
                                         r" hidden_size = '8' \(str; expected int\); num_hidden_layers = True \(bool;"
                                         r" expected int\); qkv_bias = 1 \(int; expected bool\)"):
        vit.ViTConfig.from_hf_dict({**good, "hidden_size": "8", "num_hidden_layers": True, "qkv_bias": 1})
    with pytest.raises(ValueError, match=r"layer_norm_eps = '1e-12' \(str; expected a number\)"):
        vit.ViTConfig.from_hf_dict({**good, "layer_norm_eps": "1e-12"})
    no_labels = {k: v for k, v in good.items() if k not in ("id2label", "label2id")}  # num_labels is read then
    with pytest.raises(ValueError, match=r"num_labels = 'three' \(str; expected int\)"):
        vit.ViTConfig.from_hf_dict({**no_labels, "num_labels": "three"})
    assert vit.ViTConfig.from_hf_dict({**no_labels, "num_labels": 3}).num_labels == 3
    base = dict(vocab_size=40, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2, decoder_start_token_id=0)
    with pytest.raises(ValueError, match=r"T5 config.json .* num_heads = 2.0 \(float; expected int\); feed_forward_proj ="
                                         r" 3 \(int; expected str\)"):
        t5.T5Config.from_hf_dict({**base, "num_heads": 2.0, "feed_forward_proj": 3})
    with pytest.raises(ValueError, match=r"num_decoder_layers = '1' \(str; expected int\)"):
        t5.T5Config.from_hf_dict({**base, "num_decoder_layers": "1"})


def test_written_files_get_the_mode_open_would_give(tmp_path):
    """safetensors' save_file and tempfile.mkstemp make 0o600 files: a merged model or a PEFT
    adapter would be readable only by its writer.  Every file gets 0o666 less the umask."""
    import stat

    from boft_jax import BOFTConfig, combine, init_adapter, wrap
    from boft_jax.interop import peft as peft_io

    old = os.umask(0o022)
    try:
        module, params = vit.from_pretrained(FIXTURES / "vit")
        models.save_pretrained(tmp_path / "one", module, params)
        models.save_pretrained(tmp_path / "sharded", module, params, max_shard_bytes=30_000)
        model = wrap(module, BOFTConfig(block_size=4, n_factors=2, targets=".*query"))
        c = module.config
        size = c.image_size if isinstance(c.image_size, tuple) else (c.image_size, c.image_size)
        adapter = init_adapter(model, params, np.zeros((1, *size, c.num_channels), np.float32))
        peft_io.save_peft_adapter(tmp_path / "peft", model, combine(params, adapter))
        files = [f for f in tmp_path.rglob("*") if f.is_file()]
        assert len(files) >= 6
        modes = {str(f.relative_to(tmp_path)): oct(stat.S_IMODE(f.stat().st_mode)) for f in files}
        assert modes == dict.fromkeys(modes, "0o644")
    finally:
        os.umask(old)
