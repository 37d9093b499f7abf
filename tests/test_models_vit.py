"""ViT (boft_jax.models.vit) against transformers' ViTForImageClassification."""

import dataclasses
import functools
import re
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from boft_jax.models import hf, vit

FIXTURES = Path(__file__).parent / "fixtures"
TINY = vit.ViTConfig(
    image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    intermediate_size=64, num_labels=5,
)


def assert_matches_reference(actual, reference, *, tol=1e-5):
    """max |actual - reference| <= tol * max(1, max |reference|)."""
    actual, reference = np.asarray(actual, np.float64), np.asarray(reference, np.float64)
    assert actual.shape == reference.shape
    err, scale = np.abs(actual - reference).max(), max(1.0, np.abs(reference).max())
    assert err <= tol * scale, f"max abs error {err:.3g} > {tol} * {scale:.3g}"


@pytest.fixture(scope="module")
def reference():
    return dict(np.load(FIXTURES / "vit_reference.npz", allow_pickle=False))


@pytest.fixture(scope="module")
def loaded():
    return vit.from_pretrained(FIXTURES / "vit")


@pytest.fixture(scope="module")
def logits(loaded, reference):
    module, params = loaded
    return jax.jit(module.apply)({"params": params}, reference["pixel_values"])


def test_logits_match_transformers(logits, reference):
    assert_matches_reference(logits, reference["logits"])


def test_config_is_read_from_config_json(loaded):
    module, _ = loaded
    assert module.config == dataclasses.replace(TINY, id2label=tuple(f"LABEL_{i}" for i in range(5)))
    assert vit.ViTConfig.from_hf_dict(module.config.to_hf_dict()) == module.config


def test_scan_layers_gives_the_same_logits_as_unrolled(logits, reference):
    scanned, scanned_params = vit.from_pretrained(FIXTURES / "vit", scan_layers=True)
    assert scanned.scan_layers
    # Scan and unrolled compile to different XLA programs: equal up to float32 rounding.
    scanned_logits = jax.jit(scanned.apply)({"params": scanned_params}, reference["pixel_values"])
    np.testing.assert_allclose(scanned_logits, logits, atol=2e-6, rtol=0)


def test_scan_layers_stacks_params_layer_axis_first(loaded):
    _, params = loaded
    _, scanned_params = vit.from_pretrained(FIXTURES / "vit", scan_layers=True)
    assert set(scanned_params["encoder"]) == {"layers"}
    stacked = scanned_params["encoder"]["layers"]["attention"]["query"]["kernel"]
    assert stacked.shape == (2, 32, 32)
    np.testing.assert_array_equal(stacked[1], params["encoder"]["layer_1"]["attention"]["query"]["kernel"])


def test_scan_layers_init_has_the_stacked_layout():
    x = jnp.zeros((1, 16, 16, 3))
    shapes = lambda module: jax.eval_shape(lambda: module.init(jax.random.key(0), x))["params"]
    unrolled = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes(vit.ViT(TINY)))
    expected = jax.tree.map(np.shape, hf.stack_layers(unrolled))
    assert jax.tree.map(np.shape, shapes(vit.ViT(TINY, scan_layers=True))) == expected


def test_dropout_is_active_only_when_not_deterministic(loaded, reference):
    _, params = loaded
    config = dataclasses.replace(TINY, hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3)
    module = vit.ViT(config)

    @jax.jit
    def run(x, seed):
        rngs = {"dropout": jax.random.key(seed, impl="rbg")}  # compiles faster than threefry on CPU
        return module.apply({"params": params}, x), module.apply({"params": params}, x, deterministic=False, rngs=rngs)

    x = reference["pixel_values"]
    plain, drop0 = run(x, 0)
    _, drop1 = run(x, 1)
    assert_matches_reference(plain, reference["logits"])
    assert np.abs(drop0 - plain).max() > 1e-2
    assert np.abs(drop0 - drop1).max() > 1e-2
    np.testing.assert_array_equal(run(x, 0)[1], drop0)


def test_bfloat16_compute_keeps_params_and_stays_close(loaded, reference):
    module, params = loaded
    x = reference["pixel_values"]
    bf16, bf16_params = vit.from_pretrained(FIXTURES / "vit", dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(bf16_params))
    out = jax.jit(bf16.apply)({"params": bf16_params}, x)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), reference["logits"], atol=0.1)


def test_layer_norms_stay_accurate_when_hidden_states_share_a_large_offset(loaded, reference):
    """LayerNorm's variance as transformers computes it, mean((x - mean)^2): with every hidden state
    shifted by 300, the float32 logits stay within 1e-3 of the float64 ones (E[x^2] - E[x]^2, flax's
    fast variance, was 1.6e-2 off, found by review against transformers)."""
    module, params = loaded
    shift = 300.0 + np.random.default_rng().standard_normal()
    params = jax.tree_util.tree_map_with_path(
        lambda kp, v: v + shift if "position_embeddings" in jax.tree_util.keystr(kp) else v, params)
    x = reference["pixel_values"]
    y32 = np.asarray(jax.jit(module.apply)({"params": params}, x), np.float64)
    with jax.enable_x64(True):
        f64 = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), params)
        y64 = np.asarray(jax.jit(module.clone(dtype=jnp.float64).apply)({"params": f64}, jnp.asarray(x, jnp.float64)))
    assert_matches_reference(y32, y64, tol=1e-3)


def test_problem_type_is_kept_for_transformers(tmp_path):
    """config.json's problem_type decides transformers' loss (e.g. MSE for "regression" rather than
    the BCE it infers from float labels): read, written back by save_pretrained, validated."""
    module, params = vit.from_pretrained(FIXTURES / "vit")
    cfg = dataclasses.replace(module.config, problem_type="regression")
    from boft_jax.models import save_pretrained

    save_pretrained(tmp_path / "r", vit.ViT(cfg), params)
    import json

    assert json.loads((tmp_path / "r" / "config.json").read_text())["problem_type"] == "regression"
    again, _ = vit.from_pretrained(tmp_path / "r")
    assert again.config == cfg
    with pytest.raises(ValueError, match=r"problem_type must be one of \[None, 'regression'"):
        dataclasses.replace(cfg, problem_type="ranking")


def test_wrong_image_size_is_an_error(loaded):
    module, params = loaded
    with pytest.raises(ValueError, match=r"expected \(batch, 16, 16, 3\)"):
        module.apply({"params": params}, jnp.zeros((1, 3, 16, 16)))


# ---- other image sizes: interpolate_pos_encoding -------------------------------------------

INTERPOLATE_SIZES = [(24, 24), (12, 12), (20, 28), (18, 17), (40, 8), (16, 16)]  # make_fixtures.py


@pytest.fixture(scope="module")
def interpolated():
    return dict(np.load(FIXTURES / "vit_interpolate_reference.npz", allow_pickle=False))


@pytest.mark.parametrize("size", INTERPOLATE_SIZES, ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_interpolated_logits_match_transformers(loaded, interpolated, size):
    module, params = loaded
    h, w = size
    logits = jax.jit(functools.partial(module.apply, interpolate_pos_encoding=True))(
        {"params": params}, interpolated[f"pixels_{h}x{w}"]
    )
    assert_matches_reference(logits, interpolated[f"logits_{h}x{w}"])


@pytest.mark.parametrize("size", INTERPOLATE_SIZES, ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_interpolated_position_embeddings_match_transformers(loaded, interpolated, size):
    module, params = loaded
    (h, w), (ph, pw) = size, module.config.patch_size
    grid = module.config.grid_size
    pos = vit.interpolate_pos_encoding(params["embeddings"]["position_embeddings"], grid, (h // ph, w // pw))
    assert_matches_reference(pos, interpolated[f"pos_{h}x{w}"], tol=2e-6)


def _keys_kernel(x, a=-0.75):
    """The cubic convolution kernel of Keys (1981), as published, for distances ``x``."""
    x = np.abs(x)
    return np.where(x <= 1, (a + 2) * x**3 - (a + 3) * x**2 + 1,
                    np.where(x < 2, a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a, 0.0))


@pytest.mark.parametrize("seed", range(4))
def test_bicubic_matrix_is_keys_kernel_with_edge_replication(seed):
    rng = np.random.default_rng(seed)
    n_in, n_out = (int(v) for v in rng.integers(1, 40, size=2))
    signal = rng.standard_normal(n_in)
    # Dense reference: the replicated signal (2 samples past each edge suffice for a kernel of
    # support 2) convolved with the kernel at every output's source position.
    padded = np.concatenate([np.full(3, signal[0]), signal, np.full(3, signal[-1])])
    taps = np.arange(-3, n_in + 3)
    src = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
    expected = (_keys_kernel(src[:, None] - taps[None, :]) * padded[None, :]).sum(axis=1)
    np.testing.assert_allclose(vit.bicubic_matrix(n_in, n_out) @ signal, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(vit.bicubic_matrix(n_in, n_out).sum(axis=1), 1.0, rtol=1e-12)
    assert np.array_equal(vit.bicubic_matrix(n_in, n_in), np.eye(n_in))


def test_interpolating_to_the_trained_grid_is_the_identity(loaded, reference):
    module, params = loaded
    apply = jax.jit(module.apply, static_argnames="interpolate_pos_encoding")
    np.testing.assert_array_equal(
        apply({"params": params}, reference["pixel_values"], interpolate_pos_encoding=True),
        apply({"params": params}, reference["pixel_values"]),
    )


def test_another_image_size_without_interpolation_names_the_flag(loaded):
    module, params = loaded
    with pytest.raises(ValueError, match=r"expected \(batch, 16, 16, 3\).*interpolate_pos_encoding=True"):
        module.apply({"params": params}, jnp.zeros((1, 24, 24, 3)))


@pytest.mark.parametrize("shape", [(1, 3, 24, 3), (1, 24, 24, 1), (24, 24, 3)])
def test_interpolation_needs_a_whole_patch_and_the_channels(loaded, shape):
    module, params = loaded
    with pytest.raises(ValueError, match=r"expected \(batch, H, W, 3\) \(NHWC\) with H >= 4 and W >= 4"):
        module.apply({"params": params}, jnp.zeros(shape), interpolate_pos_encoding=True)


def test_interpolate_pos_encoding_checks_the_grid():
    with pytest.raises(ValueError, match=r"a \(4, 4\) patch grid needs \(1, 17, D\)"):
        vit.interpolate_pos_encoding(jnp.zeros((1, 10, 8)), (4, 4), (5, 5))


@pytest.mark.parametrize("size", INTERPOLATE_SIZES, ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_with_image_size_is_a_plain_model_of_that_size_matching_transformers(loaded, interpolated, size):
    """The resized model, called without the flag, gives transformers' interpolated logits, and
    the same as the original model with ``interpolate_pos_encoding=True``."""
    module, params = loaded
    resized_module, resized = vit.with_image_size(module, params, size)
    assert resized_module.config.image_size == size
    assert resized_module.config == dataclasses.replace(module.config, image_size=size)
    pixels = interpolated[f"pixels_{size[0]}x{size[1]}"]
    logits = jax.jit(resized_module.apply)({"params": resized}, pixels)
    assert_matches_reference(logits, interpolated[f"logits_{size[0]}x{size[1]}"])
    on_the_fly = jax.jit(functools.partial(module.apply, interpolate_pos_encoding=True))({"params": params}, pixels)
    np.testing.assert_allclose(logits, on_the_fly, rtol=1e-6, atol=1e-6)


def test_with_image_size_round_trips_through_a_checkpoint_of_that_size(loaded, tmp_path):
    module, params = loaded
    resized_module, resized = vit.with_image_size(module, params, (20, 28))
    hf.save_pretrained(tmp_path / "vit-20x28", resized_module, resized)
    back_module, back = vit.from_pretrained(tmp_path / "vit-20x28")
    assert back_module.config.image_size == (20, 28) and back_module.config.grid_size == (5, 7)
    x = jax.random.normal(jax.random.key(np.random.randint(2**31)), (2, 20, 28, 3))
    np.testing.assert_array_equal(back_module.apply({"params": back}, x), resized_module.apply({"params": resized}, x))


def test_with_image_size_changes_only_the_position_embeddings():
    module = vit.ViT(TINY)
    params = jax.tree.map(np.asarray, module.init(jax.random.key(np.random.randint(2**31)), jnp.zeros((1, 16, 16, 3)))["params"])
    params["encoder"]["layer_0"]["attention"]["query"]["extra"] = np.ones(3)  # e.g. an adapter's leaf
    new_module, new = vit.with_image_size(module, params, (8, 12))
    pos = new["embeddings"]["position_embeddings"]
    assert isinstance(pos, np.ndarray) and pos.shape == (1, 1 + 2 * 3, 32)  # NumPy in, NumPy out
    np.testing.assert_array_equal(pos[:, 0], params["embeddings"]["position_embeddings"][:, 0])  # CLS kept
    flat, new_flat = (dict(jax.tree_util.tree_flatten_with_path(t)[0]) for t in (params, new))
    changed = [k for k in flat if new_flat[k] is not flat[k]]
    assert [jax.tree_util.keystr(k) for k in changed] == ["['embeddings']['position_embeddings']"]
    assert params["embeddings"]["position_embeddings"].shape == (1, 17, 32)  # the input is not modified
    same_module, same = vit.with_image_size(module, params, 16)
    assert same_module is module and same is params


@pytest.mark.parametrize("size", [3, (3, 16), (16, 0), 16.5, True, "16", (16,), (16, 16, 16), None])
def test_with_image_size_names_a_bad_size(size):
    module = vit.ViT(TINY)
    params = {"embeddings": {"position_embeddings": np.zeros((1, 17, 32))}}
    with pytest.raises(ValueError, match=r"image_size .*: expected an integer S or \(H, W\) with H >= 4 and W >= 4"):
        vit.with_image_size(module, params, size)


@pytest.mark.parametrize(
    "size,image_size,expected",
    [
        (224, (384, 384), 384),
        (224, (384, 512), {"height": 384, "width": 512}),
        ({"height": 224, "width": 224}, (96, 64), {"height": 96, "width": 64}),
        ({"shortest_edge": 224}, (96, 96), {"height": 96, "width": 96}),
        (None, (96, 96), {"height": 96, "width": 96}),  # absent: transformers' default 224 would be wrong
    ],
)
def test_preprocessor_for_image_size_sets_the_models_input_size(size, image_size, expected):
    prep = {"image_processor_type": "ViTImageProcessor", "do_resize": True, "resample": 2, "image_mean": [0.5] * 3}
    if size is not None:
        prep["size"] = size
    out = vit.preprocessor_for_image_size(prep, image_size)
    assert out == {**prep, "size": expected}
    assert prep.get("size") == size  # the input is not modified


@pytest.mark.parametrize(
    "prep,fragment",
    [
        ({"image_processor_type": "ConvNextImageProcessor", "size": 224}, "'ConvNextImageProcessor' is not one of"),
        ({"size": 256, "crop_size": 224, "do_center_crop": True}, "resizes and then crops (crop_size)"),
        ({"size": {"shortest_edge": 224}, "crop_pct": 0.875}, "resizes and then crops (crop_pct)"),
        ({"size": {"longest_edge": 224}}, "is not an int, {'height', 'width'} or {'shortest_edge'}"),
        ({"size": True}, "is not an int"),
        (["not", "an object"], "expected a JSON object, got a JSON list"),
    ],
)
def test_preprocessor_for_image_size_refuses_what_it_cannot_rewrite(prep, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        vit.preprocessor_for_image_size(prep, (96, 96))


def test_with_image_size_names_a_wrong_module_or_params():
    with pytest.raises(TypeError, match="expected a boft_jax.models.vit.ViT, got Dense"):
        vit.with_image_size(nn.Dense(3), {}, 16)
    with pytest.raises(ValueError, match="no embeddings/position_embeddings .*not wrapped in {'params': ...}"):
        vit.with_image_size(vit.ViT(TINY), {"params": {}}, 24)


def test_num_labels_gives_a_fresh_zero_head(loaded):
    _, params = loaded
    module, new = vit.from_pretrained(FIXTURES / "vit", num_labels=3)
    assert module.config.num_labels == 3 and module.config.id2label is None
    assert new["classifier"]["kernel"].shape == (32, 3)
    assert not np.any(new["classifier"]["kernel"]) and not np.any(new["classifier"]["bias"])
    np.testing.assert_array_equal(new["layernorm"]["scale"], params["layernorm"]["scale"])


def test_num_labels_zero_loads_a_headless_model_that_round_trips(loaded, reference, tmp_path):
    """num_labels=0: the final CLS features, which the checkpoint's own head maps to its logits;
    saved with id2label {} (as transformers writes a headless config) and loaded back headless."""
    from boft_jax.models import save_pretrained

    module, params = vit.from_pretrained(FIXTURES / "vit", num_labels=0)
    assert module.config.num_labels == 0 and "classifier" not in params
    feats = jax.jit(module.apply)({"params": params}, reference["pixel_values"])
    head = loaded[1]["classifier"]
    assert_matches_reference(np.asarray(feats, np.float64) @ np.asarray(head["kernel"], np.float64) + np.asarray(head["bias"]),
                             reference["logits"])
    save_pretrained(tmp_path / "headless", module, params)
    module2, params2 = vit.from_pretrained(tmp_path / "headless")
    assert module2.config.num_labels == 0
    np.testing.assert_array_equal(jax.jit(module2.apply)({"params": params2}, reference["pixel_values"]), feats)


def test_a_pooler_in_the_checkpoint_is_left_out_with_a_warning(loaded):
    """A ViTModel checkpoint with a pooler (bare names, no "vit." prefix): the pooler is not loaded,
    and the warning says so; everything else loads as without it."""
    module, params = loaded
    state = {k[len("vit."):] if k.startswith("vit.") else k: v
             for k, v in vit.hf_state_dict(module.config, params).items() if not k.startswith("classifier.")}
    rng = np.random.default_rng(5)
    d = module.config.hidden_size
    pooler = {"pooler.dense.weight": rng.standard_normal((d, d), np.float32), "pooler.dense.bias": rng.standard_normal(d, np.float32)}
    with pytest.warns(UserWarning, match=r"its pooler \(vit\.pooler\.dense\.bias, vit\.pooler\.dense\.weight; ViTModel's pooler_output\) is not loaded"):
        got = vit.params_from_hf(dataclasses.replace(module.config, num_labels=0, id2label=()), {**state, **pooler})
    want = {k: v for k, v in params.items() if k != "classifier"}
    jax.tree.map(np.testing.assert_array_equal, got, jax.tree.map(np.asarray, want))


def test_unreadable_json_names_the_file(tmp_path):
    import shutil

    for i, (name, content, fragment) in enumerate((("config.json", "{not json", "config.json' is not readable JSON"),
                                                   ("config.json", "[1, 2]", "config.json' holds a JSON list"),
                                                   ("model.safetensors.index.json", "{}", "has no 'weight_map' object"))):
        d = tmp_path / f"case{i}"
        shutil.copytree(FIXTURES / "vit_sharded", d)
        (d / name).write_text(content)
        with pytest.raises(ValueError, match=re.escape(fragment)):
            vit.from_pretrained(d)


# ---- BOFT target presets ------------------------------------------------------------------


def dense_paths(module, *args):
    """'/'-joined module paths of every nn.Dense / nn.DenseGeneral the model calls."""
    paths = set()

    def record(next_fun, args_, kwargs_, context):
        if isinstance(context.module, (nn.Dense, nn.DenseGeneral)) and context.method_name == "__call__":
            paths.add("/".join(context.module.path))
        return next_fun(*args_, **kwargs_)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda: module.init(jax.random.key(0), *args))
    return paths


def select(pattern, paths):
    return {p for p in paths if re.search(rf"(?:^|/)(?:{pattern})$", p)}


@pytest.mark.parametrize("scan_layers", [False, True])
def test_target_presets_select_exactly_the_intended_dense_layers(scan_layers):
    paths = dense_paths(vit.ViT(TINY, scan_layers=scan_layers), jnp.zeros((1, 16, 16, 3)))
    layers = ["encoder/layers"] if scan_layers else ["encoder/layer_0", "encoder/layer_1"]
    under = lambda names: {f"{layer}/{name}" for layer in layers for name in names}
    qv = under(["attention/query", "attention/value"])
    attention = under(["attention/query", "attention/key", "attention/value", "attention/out"])
    mlp = under(["mlp/fc1", "mlp/fc2"])
    assert paths == attention | mlp | {"classifier"}
    expected = {"attention_qv": qv, "attention": attention, "mlp": mlp, "all_linear": attention | mlp}
    assert set(vit.TARGET_PRESETS) == set(expected)
    for name, pattern in vit.TARGET_PRESETS.items():
        assert select(pattern, paths) == expected[name], name


@pytest.mark.parametrize("name", ["vit_uneven_heads", "vit_head_dim"])
def test_heads_that_do_not_tile_hidden_size_match_transformers(name, tmp_path):
    """transformers >= 5: head_dim = config.json's head_dim or hidden_size // heads, and query /
    key / value map hidden_size -> heads * head_dim (hidden 20 with 3 heads: 18; hidden 16 with 2
    heads of head_dim 12: 24).  Logits equal transformers'; save_pretrained writes head_dim back
    only where the checkpoint had it; BOFT on those layers merges exactly."""
    import json

    import boft_jax as boft
    from boft_jax.models import save_pretrained

    ref = np.load(FIXTURES / "vit_heads_reference.npz", allow_pickle=False)
    module, params = vit.from_pretrained(FIXTURES / name)
    cfg = module.config
    inner = cfg.num_attention_heads * cfg.attention_head_dim
    assert inner != cfg.hidden_size and (cfg.head_dim is not None) == (name == "vit_head_dim")
    layer = params["encoder"]["layer_0"]["attention"]
    assert layer["query"]["kernel"].shape == (cfg.hidden_size, inner)
    assert layer["out"]["kernel"].shape == (inner, cfg.hidden_size)
    logits = module.apply({"params": params}, ref["pixel_values"])
    assert_matches_reference(logits, ref[name])
    save_pretrained(tmp_path / "again", module, params)
    written = json.loads((tmp_path / "again" / "config.json").read_text())
    assert written.get("head_dim") == cfg.head_dim and ("head_dim" in written) == (cfg.head_dim is not None)
    again, params2 = vit.from_pretrained(tmp_path / "again")
    assert again.config == cfg
    np.testing.assert_array_equal(again.apply({"params": params2}, ref["pixel_values"]), logits)
    # BOFT with two blocks per layer (b = d_in / 2 on query/key/value and on out): merged == wrapped
    config = boft.BOFTConfig(block_num=2, n_factors=1, targets=vit.TARGET_PRESETS["attention"])
    wrapped = boft.wrap(module, config)
    adapter = boft.init_adapter(wrapped, params, ref["pixel_values"])
    rng = np.random.default_rng()
    adapter = jax.tree.map(lambda a: jnp.asarray(a + 0.2 * rng.standard_normal(a.shape), a.dtype), adapter)
    tuned = boft.combine(params, adapter)
    out = wrapped.apply({"params": tuned}, ref["pixel_values"])
    merged = module.apply({"params": boft.merge(tuned, config)}, ref["pixel_values"])
    assert_matches_reference(merged, out, tol=2e-5)
    assert np.abs(np.asarray(out) - np.asarray(logits)).max() > 1e-3  # the adapter changed the outputs


def test_checkpoints_of_other_vit_architectures_are_refused_by_name(tmp_path):
    """A ViTForMaskedImageModeling (or any other ViT head) directory is refused naming its
    architecture before any weight is read, not with advice to add a classifier."""
    import json
    import shutil

    shutil.copytree(FIXTURES / "vit", tmp_path / "mim")
    cfg = json.loads((tmp_path / "mim" / "config.json").read_text())
    cfg["architectures"] = ["ViTForMaskedImageModeling"]
    (tmp_path / "mim" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "mim" / "model.safetensors").write_bytes(b"not read")
    with pytest.raises(ValueError, match=r"architectures=\['ViTForMaskedImageModeling'\]; boft_jax's ViT loads"
                                         r" ViTForImageClassification and ViTModel checkpoints"):
        vit.from_pretrained(tmp_path / "mim")


def test_with_class_names_renames_given_ids_and_names_bad_entries():
    from boft_jax.models.vit import ViT, ViTConfig, with_class_names

    m = ViT(ViTConfig(num_labels=4, id2label=("a", "b", "c", "d")))
    assert with_class_names(m, {1: "x", "3": "y"}).config.id2label == ("a", "x", "c", "y")
    for bad in ({"4": "x"}, {"-1": "x"}, {"one": "x"}, {"0": 5}):
        with pytest.raises(ValueError, match=r"meta: entry .* is not a label id in 0\.\.3 with a class name"):
            with_class_names(m, bad, "meta")
    with pytest.raises(ValueError, match="meta: expected a mapping of label id to class name, got list"):
        with_class_names(m, ["x"], "meta")
