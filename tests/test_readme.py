"""The README's Python examples run as written and do what their comments say.

The recipe block uses names a user brings (``base_model``, ``pretrained_params``,
``example_input``); the test defines them with the tiny ViT fixture (hidden size 32) and runs the
block's text unchanged.
"""

from __future__ import annotations

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import boft_jax as boft
from boft_jax.models import vit

from reference import dense_rotation, np_cayley_from_packed

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"


def readme_block(marker: str) -> str:
    """The one ```python block of README.md that contains ``marker``."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    found = [b for b in blocks if marker in b]
    assert len(found) == 1, f"README.md: {len(found)} python blocks contain {marker!r} (expected 1)"
    return found[0]


def test_math_block_matches_the_dense_float64_definition():
    ns: dict = {}
    exec(readme_block("boft.rotate(x, blocks)"), ns)
    params, blocks, x, kernel = (np.asarray(ns[k], np.float64) for k in ("params", "blocks", "x", "kernel"))
    b, d = ns["b"], ns["d"]
    assert blocks.shape == (2, d // b, b, b) and ns["y"].shape == x.shape and ns["M"].shape == (d, d)
    np.testing.assert_allclose(blocks, np_cayley_from_packed(params, b), atol=2e-6)
    M = dense_rotation(np_cayley_from_packed(params, b))
    np.testing.assert_allclose(M @ M.T, np.eye(d), atol=1e-10)
    np.testing.assert_allclose(np.asarray(ns["M"]), M, atol=2e-6)
    np.testing.assert_allclose(np.asarray(ns["y"]), x @ M, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(ns["k2"]), M @ kernel, rtol=1e-4, atol=1e-4)
    assert float(np.abs(M - np.eye(d)).max()) > 1e-3  # a real rotation, not the identity


@pytest.fixture(scope="module")
def recipe():
    """The recipe block run on the tiny ViT fixture; returns its namespace."""
    base_model, pretrained_params = vit.from_pretrained(FIXTURES / "vit")
    shape = (*base_model.config.image_size, base_model.config.num_channels)  # (height, width, channels)
    rng = np.random.default_rng(7)
    ns = {
        "base_model": base_model,
        "pretrained_params": pretrained_params,
        "example_input": jnp.asarray(rng.standard_normal((2, *shape)), jnp.float32),
    }
    exec(readme_block("boft.wrap(base_model, config)"), ns)
    ns["images"] = jnp.asarray(rng.standard_normal((8, *shape)), jnp.float32)
    ns["labels"] = jnp.asarray(rng.integers(0, base_model.config.num_labels, 8), jnp.int32)
    return ns


def test_recipe_starts_at_the_base_model_and_merge_is_the_plain_model(recipe):
    ns = recipe
    x = ns["images"]
    base_out = ns["base_model"].apply({"params": ns["pretrained_params"]}, x)
    wrapped = ns["model"].apply({"params": boft.combine(ns["frozen"], ns["adapter"])}, x)
    np.testing.assert_allclose(np.asarray(wrapped), np.asarray(base_out), rtol=1e-5, atol=1e-5)  # "identity"
    merged_out = ns["base_model"].apply({"params": ns["merged"]}, x)
    np.testing.assert_allclose(np.asarray(merged_out), np.asarray(base_out), rtol=1e-5, atol=1e-5)
    # The targets: query and value of every layer, plus the classifier trained in full.
    paths = {"/".join(str(k.key) for k in p[:-1]) for p, _ in jax.tree_util.tree_leaves_with_path(ns["adapter"])}
    layers = ns["base_model"].config.num_hidden_layers
    assert paths == {f"encoder/layer_{i}/attention/{n}/kernel" for i in range(layers) for n in ("query", "value")} | {
        "classifier"
    }


def test_recipe_trains_only_the_adapter_and_merge_keeps_its_outputs(recipe):
    ns = recipe
    adapter, opt_state, x, y = ns["adapter"], ns["opt_state"], ns["images"], ns["labels"]
    # Optimizer state for the adapter only: Adam's first moment has the adapter's size.
    mu = opt_state[0].mu
    assert boft.count_params(mu) == boft.count_params(adapter) < boft.count_params(ns["frozen"]) // 4
    losses = []
    for _ in range(40):
        adapter, opt_state, loss = ns["step"](adapter, opt_state, ns["frozen"], x, y)
        losses.append(float(loss))
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.5 * losses[0], losses[::10]
    # The merge line of the block, on the trained adapter: the plain model gives the wrapped outputs.
    merged = boft.merge(boft.combine(ns["frozen"], adapter), ns["config"])
    wrapped = ns["model"].apply({"params": boft.combine(ns["frozen"], adapter)}, x)
    plain = ns["base_model"].apply({"params": merged}, x)
    np.testing.assert_allclose(np.asarray(plain), np.asarray(wrapped), rtol=1e-4, atol=1e-4)
    base_out = ns["base_model"].apply({"params": ns["pretrained_params"]}, x)
    assert float(jnp.abs(wrapped - base_out).max()) > 1e-2  # training moved the model
    skews = [v for p, v in jax.tree_util.tree_leaves_with_path(adapter) if p[-1].key == "skew"]
    assert skews and all(float(jnp.abs(s).max()) > 0 for s in skews)


def test_oft_mask_keeps_every_scale_at_one(recipe):
    ns = dict(recipe)
    exec(readme_block("optax.masked(optax.set_to_zero(), frozen_scales)"), ns)
    opt, adapter = ns["opt"], ns["adapter"]
    opt_state = opt.init(adapter)
    x, y = ns["images"], ns["labels"]

    @jax.jit
    def step(adapter, opt_state):
        def loss_fn(adapter):
            logits = ns["model"].apply({"params": boft.combine(ns["frozen"], adapter)}, x)
            return ns["optax"].softmax_cross_entropy_with_integer_labels(logits, y).mean()

        grads = jax.grad(loss_fn)(adapter)
        updates, opt_state = opt.update(grads, opt_state, adapter)
        return ns["optax"].apply_updates(adapter, updates), opt_state, grads

    for _ in range(3):
        adapter, opt_state, grads = step(adapter, opt_state)
    for path, value in jax.tree_util.tree_leaves_with_path(adapter):
        if path[-1].key == "scale":
            np.testing.assert_array_equal(np.asarray(value), 1.0)
    scale_grads = [g for p, g in jax.tree_util.tree_leaves_with_path(grads) if p[-1].key == "scale"]
    assert scale_grads and any(float(jnp.abs(g).max()) > 0 for g in scale_grads)  # the mask did the work
    skews = [v for p, v in jax.tree_util.tree_leaves_with_path(adapter) if p[-1].key == "skew"]
    assert skews and all(float(jnp.abs(s).max()) > 0 for s in skews)
