"""BOFT-wrapped ViT and T5 (boft_jax.linen on boft_jax.models): equal to the base model at init,
trainable, mergeable back into plain weights, and exportable with save_pretrained."""

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import boft_jax as boft
from boft_jax import models
from boft_jax.models import t5, vit

FIXTURES = Path(__file__).parent / "fixtures"
# Each test compiles a forward+backward pass of a wrapped model (~10-20 s on a 2-core CPU).
pytestmark = pytest.mark.slow
# The rbg PRNG compiles much faster on CPU than threefry; the base params are replaced anyway.
INIT_KEY = jax.random.key(0, impl="rbg")


def init_adapter(model, config, *inputs):
    params = jax.jit(model.init)(INIT_KEY, *inputs)["params"]
    return boft.layer_paths(params), boft.split(params, config)[1]


def train(model, frozen, adapter, loss_of_output, inputs, steps):
    """Adam on the adapter only. Returns the adapter and, for each step, the loss and the model
    output before that step's update (plus one extra step's, i.e. after the last update)."""
    opt = optax.adam(3e-2)

    @jax.jit
    def step(adapter, opt_state):
        def loss_fn(adapter):
            out = model.apply({"params": boft.combine(frozen, adapter)}, *inputs)
            return loss_of_output(out), out

        (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(adapter)
        updates, opt_state = opt.update(grads, opt_state, adapter)
        return optax.apply_updates(adapter, updates), opt_state, loss, out

    opt_state, losses, outputs = opt.init(adapter), [], []
    for i in range(steps + 1):
        new_adapter, opt_state, loss, out = step(adapter, opt_state)
        losses.append(float(loss))
        outputs.append(np.asarray(out))
        adapter = new_adapter if i < steps else adapter
    return adapter, losses, outputs


def merged_params(frozen, adapter, config):
    return jax.jit(lambda f, a: boft.merge(boft.combine(f, a), config))(frozen, adapter)


def test_boft_vit_starts_at_the_base_model_trains_merges_and_exports(tmp_path):
    base, pretrained = vit.from_pretrained(FIXTURES / "vit")
    ref = np.load(FIXTURES / "vit_reference.npz", allow_pickle=False)
    x = ref["pixel_values"]
    config = boft.BOFTConfig(block_size=4, n_factors=2, targets=vit.TARGET_PRESETS["all_linear"])
    model = boft.wrap(base, config)
    paths, adapter = init_adapter(model, config, x)
    assert sorted(paths) == sorted(
        f"encoder/layer_{i}/{name}"
        for i in range(2)
        for name in ("attention/query", "attention/key", "attention/value", "attention/out", "mlp/fc1", "mlp/fc2")
    )

    labels = jnp.arange(3) % 5
    xent = lambda logits: optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    adapter, losses, outputs = train(model, pretrained, adapter, xent, (x,), steps=3)
    np.testing.assert_allclose(outputs[0], ref["logits"], atol=2e-5)  # identity adapter at init
    assert losses[-1] < losses[0]
    tuned = outputs[-1]
    assert np.abs(tuned - ref["logits"]).max() > 1e-2

    merged = merged_params(pretrained, adapter, config)
    base_apply = jax.jit(base.apply)
    np.testing.assert_allclose(base_apply({"params": merged}, x), tuned, atol=2e-5)
    models.save_pretrained(tmp_path, base, merged)
    exported, exported_params = models.from_pretrained(tmp_path)
    assert exported == base
    np.testing.assert_allclose(base_apply({"params": exported_params}, x), tuned, atol=2e-5)


def test_boft_vit_at_another_image_size_equals_the_merged_model():
    """A wrapped ViT with ``interpolate_pos_encoding=True`` (24 x 24 images, 16 x 16 checkpoint) is
    the merged model at that size, and its gradients reach the adapter."""
    base, pretrained = vit.from_pretrained(FIXTURES / "vit")
    x = np.load(FIXTURES / "vit_interpolate_reference.npz", allow_pickle=False)["pixels_24x24"]
    config = boft.BOFTConfig(block_size=4, n_factors=2, targets=vit.TARGET_PRESETS["attention"])
    model = boft.wrap(base, config)
    _, adapter = init_adapter(model, config, x[:1, :16, :16])
    adapter = _random_adapter(adapter, seed=5)
    wrapped = jax.jit(lambda a: model.apply({"params": boft.combine(pretrained, a)}, x, interpolate_pos_encoding=True))
    merged = merged_params(pretrained, adapter, config)
    expected = jax.jit(lambda p: base.apply({"params": p}, x, interpolate_pos_encoding=True))(merged)
    np.testing.assert_allclose(wrapped(adapter), expected, atol=2e-5)
    grads = jax.grad(lambda a: jnp.sum(wrapped(a) ** 2))(adapter)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree_util.tree_leaves(grads))


def test_boft_t5_with_scanned_layers_starts_at_the_base_model_trains_and_merges():
    base, pretrained = t5.from_pretrained(FIXTURES / "t5_gated", scan_layers=True)
    ref = np.load(FIXTURES / "t5_gated_reference.npz", allow_pickle=False)
    inputs = (ref["input_ids"], ref["attention_mask"], ref["decoder_input_ids"])
    config = boft.BOFTConfig(block_size=4, n_factors=2, targets=t5.TARGET_PRESETS["attention"])
    model = boft.wrap(base, config)
    paths, adapter = init_adapter(model, config, *inputs)
    assert sorted(paths) == sorted(
        f"{stack}/layers/{attention}/{p}"
        for stack, attention in [("encoder", "self_attention"), ("decoder", "self_attention"), ("decoder", "cross_attention")]
        for p in "qkvo"
    )
    # Under nn.scan the adapter params are stacked like the layers: (layers, m, k, b(b-1)/2).
    assert adapter["decoder"]["layers"]["cross_attention"]["o"]["kernel"]["skew"].shape == (2, 2, 4, 6)

    targets = jnp.asarray(np.roll(ref["decoder_input_ids"], -1, axis=1))
    xent = lambda logits: optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    adapter, losses, outputs = train(model, pretrained, adapter, xent, inputs, steps=2)
    np.testing.assert_allclose(outputs[0], ref["logits"], atol=5e-5)  # identity adapter at init
    assert losses[-1] < losses[0]
    merged = merged_params(pretrained, adapter, config)
    np.testing.assert_allclose(jax.jit(base.apply)({"params": merged}, *inputs), outputs[-1], atol=5e-5)

    # Greedy decoding through the wrapper (adapter applied on the fly) == on the merged weights.
    ids, mask = ref["input_ids"], ref["attention_mask"]
    generate = lambda module, params: jax.jit(functools.partial(t5.generate, module, max_new_tokens=6))(params, ids, mask)
    tokens = generate(model, boft.combine(pretrained, adapter))
    np.testing.assert_array_equal(tokens, generate(base, merged))
    # ... and so does the wrapper's own generate method (bound to the wrapper, not to the bare T5)
    method = jax.jit(model.generate, static_argnames="max_new_tokens")
    np.testing.assert_array_equal(method(boft.combine(pretrained, adapter), ids, mask, max_new_tokens=6), tokens)


# ---------------------------------------------------------------------------------------------
# One optimizer step on the full params tree, masked to the adapter, moves only the adapter
# ---------------------------------------------------------------------------------------------
def _names(path):
    return tuple(getattr(k, "key", getattr(k, "name", None)) for k in path)


def _random_adapter(adapter, seed):
    """A fresh random (non-identity) adapter: skew ~ 0.05 N(0, 1), scale ~ 1 + U(-0.1, 0.1)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        if _names(path)[-1] == "skew":
            return jnp.asarray(0.05 * rng.normal(size=leaf.shape), leaf.dtype)
        return jnp.asarray(1.0 + rng.uniform(-0.1, 0.1, size=leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, adapter)


def one_masked_step_changes_only_the_adapter(model, config, pretrained, loss_of_output, inputs, seed):
    _, adapter = init_adapter(model, config, *inputs)
    adapter = _random_adapter(adapter, seed)
    params = boft.combine(pretrained, adapter)
    # Trainable = the skew / scale fields of the adapted-kernel nodes (config.bias = "none"; note
    # that LayerNorm params are also called "scale"), checked against boft.split's adapter.
    def label(path, _):
        last = path[-1]
        return "adapter" if isinstance(last, jax.tree_util.GetAttrKey) and last.name in ("skew", "scale") else "frozen"

    labels = jax.tree_util.tree_map_with_path(label, params)
    flat_labels = {_names(p): l for p, l in jax.tree_util.tree_leaves_with_path(labels)}
    assert {_names(p) for p, _ in jax.tree_util.tree_leaves_with_path(adapter)} == {
        p for p, l in flat_labels.items() if l == "adapter"
    }
    # Adam's first step is lr * g / (|g| + eps): with the default eps = 1e-8 an entry whose gradient
    # is itself ~1e-8 (round-off of a cancellation) moves by an amount set by that round-off, which
    # differs between the two compiled programs compared below; eps = 1e-3 keeps the step a smooth
    # function of the gradient (at most lr / eps = 10x a gradient difference).
    adam = lambda: optax.adam(1e-2, eps=1e-3)  # noqa: E731
    opt = optax.multi_transform({"adapter": adam(), "frozen": optax.set_to_zero()}, labels)

    @jax.jit
    def step(params, opt_state):
        def loss_fn(params):  # gradients w.r.t. the full tree, frozen weights included
            return loss_of_output(model.apply({"params": params}, *inputs))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), grads

    new_params, grads = step(params, opt.init(params))
    old = {_names(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(params)}
    new = {_names(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(new_params)}
    grad = {_names(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(grads)}
    assert old.keys() == new.keys() == grad.keys() == flat_labels.keys()

    frozen_with_grad = adapter_leaves = frozen_leaves = 0
    for name, label in flat_labels.items():
        g, before, after = grad[name], old[name], new[name]
        assert after.dtype == before.dtype and after.shape == before.shape, name
        if label == "frozen":
            frozen_leaves += 1
            assert after.tobytes() == before.tobytes(), f"frozen leaf {'/'.join(map(str, name))} changed"
            frozen_with_grad += bool(np.any(g != 0))
        else:
            adapter_leaves += 1
            assert np.any(g != 0), f"adapter leaf {'/'.join(map(str, name))} got no gradient"
            assert np.any(after != before), f"adapter leaf {'/'.join(map(str, name))} did not change"
            moved = np.abs(g) > 1e-6  # Adam's first step moves each such entry by >= lr * 1e-3 = 1e-5
            assert np.all(after[moved] != before[moved]), name
    assert adapter_leaves == len(jax.tree.leaves(adapter))
    # the frozen weights do get gradients here: only the masked optimizer keeps them in place
    assert frozen_leaves > 0 and frozen_with_grad >= frozen_leaves // 2, (frozen_with_grad, frozen_leaves)

    # Same step as the README's Optax recipe (gradients and Adam state for the adapter only).
    frozen = boft.split(params, config)[0]
    recipe_opt = adam()

    @jax.jit
    def recipe_step(adapter):
        grads = jax.grad(lambda a: loss_of_output(model.apply({"params": boft.combine(frozen, a)}, *inputs)))(adapter)
        updates, _ = recipe_opt.update(grads, recipe_opt.init(adapter), adapter)
        return optax.apply_updates(adapter, updates), grads

    new_frozen, new_adapter = boft.split(new_params, config)
    for a, b in zip(jax.tree.leaves(new_frozen), jax.tree.leaves(frozen)):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    recipe_adapter, recipe_grads = recipe_step(adapter)
    assert jax.tree.structure(new_adapter) == jax.tree.structure(recipe_adapter)
    # The two compiled programs (gradients of the whole tree vs of the adapter alone) sum in
    # different orders: their float32 gradients agree to ~1e-5 of each leaf's largest entry, and
    # the step (at most lr / eps = 10x a gradient difference) to 10x that.
    masked_grads = boft.split(grads, config)[1]
    for a, b, ga, gb in zip(*map(jax.tree.leaves, (new_adapter, recipe_adapter, masked_grads, recipe_grads))):
        tol = 1e-5 * float(np.abs(gb).max())
        np.testing.assert_allclose(ga, gb, rtol=1e-4, atol=tol)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=10 * tol + 1e-7)


def test_one_masked_optax_step_changes_only_the_adapter_vit():
    base, pretrained = vit.from_pretrained(FIXTURES / "vit")
    ref = np.load(FIXTURES / "vit_reference.npz", allow_pickle=False)
    config = boft.BOFTConfig(block_size=4, n_factors=2, targets=vit.TARGET_PRESETS["all_linear"])
    labels = jnp.arange(3) % 5
    xent = lambda logits: optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    one_masked_step_changes_only_the_adapter(boft.wrap(base, config), config, pretrained, xent, (ref["pixel_values"],), 61)


def test_one_masked_optax_step_changes_only_the_adapter_t5_scanned():
    base, pretrained = t5.from_pretrained(FIXTURES / "t5_gated", scan_layers=True)
    ref = np.load(FIXTURES / "t5_gated_reference.npz", allow_pickle=False)
    inputs = (ref["input_ids"], ref["attention_mask"], ref["decoder_input_ids"])
    config = boft.BOFTConfig(block_size=4, n_factors=2, targets=r"(?:self|cross)_attention/(?:q|v)|mlp/wo")
    targets = jnp.asarray(np.roll(ref["decoder_input_ids"], -1, axis=1))
    xent = lambda logits: optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    one_masked_step_changes_only_the_adapter(boft.wrap(base, config), config, pretrained, xent, inputs, 62)


def test_training_the_lm_head_of_a_tied_t5_points_to_untie_head():
    """A tied T5 has no lm_head module (the shared embedding computes the logits): modules_to_save
    'lm_head' trains nothing, and the error says how to get a separate head."""
    base, pretrained = t5.from_pretrained(FIXTURES / "t5_relu")
    assert "lm_head" not in pretrained
    ref = np.load(FIXTURES / "t5_relu_reference.npz", allow_pickle=False)
    inputs = (ref["input_ids"], ref["attention_mask"], ref["decoder_input_ids"])
    config = boft.BOFTConfig(block_size=4, targets="q", modules_to_save="lm_head")
    with pytest.raises(ValueError, match=r"no lm_head module.*t5\.untie_head\(module, params\)"):
        boft.init_adapter(boft.wrap(base, config), pretrained, *inputs)
    untied, untied_params = t5.untie_head(base, pretrained)
    adapter = boft.init_adapter(boft.wrap(untied, config), untied_params, *inputs)
    np.testing.assert_array_equal(adapter["lm_head"]["kernel"], untied_params["lm_head"]["kernel"])


def test_a_t5_target_that_matches_nothing_gets_examples_in_t5_names():
    """The matching rule's examples come from the model's own layer paths, not ViT's 'query'."""
    base, pretrained = t5.from_pretrained(FIXTURES / "t5_relu")
    ref = np.load(FIXTURES / "t5_relu_reference.npz", allow_pickle=False)
    inputs = (ref["input_ids"], ref["attention_mask"], ref["decoder_input_ids"])
    with pytest.raises(ValueError, match="match none of") as e:
        boft.init_adapter(boft.wrap(base, boft.BOFTConfig(block_size=4, targets="query|value")), pretrained, *inputs)
    rule = str(e.value).split("A pattern is")[1]
    assert "(e.g. 'q', 'self_attention/q' or 'layer_0/.*')" in rule and "query" not in rule


def test_the_untie_hint_is_only_for_a_t5():
    base, pretrained = vit.from_pretrained(FIXTURES / "vit")
    x = np.zeros((1, *base.config.image_size, base.config.num_channels), np.float32)
    config = boft.BOFTConfig(block_size=4, targets="query", modules_to_save="lm_head")
    with pytest.raises(ValueError, match="matches no module of the model") as e:
        boft.init_adapter(boft.wrap(base, config), pretrained, x)
    assert "untie_head" not in str(e.value)
