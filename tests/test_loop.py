"""train.loop on a half-precision base: the optimizer updates float32 masters of the trained leaves."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import boft_jax as boft
from train import loop
from train.data import Dataset, Split

BF16 = jnp.bfloat16


class TinyClassifier(nn.Module):
    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        h = nn.gelu(nn.Dense(16, dtype=BF16, param_dtype=BF16, name="fc1")(x))
        return nn.Dense(3, dtype=BF16, param_dtype=BF16, name="head")(h)


def _loss(model, params, inputs, labels, rng, train):
    logits = model.apply({"params": params}, inputs["x"], deterministic=not train).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), (logits.argmax(-1) == labels).mean()


def test_bf16_biases_and_saved_modules_train_through_float32_masters(tmp_path):
    rng = np.random.default_rng(11)
    base_module = TinyClassifier()
    x = rng.normal(size=(64, 8)).astype(np.float32)
    params = base_module.init(jax.random.key(3), x[:1])["params"]
    # biases near 1, where a bf16 ulp is 2^-7: an Adam step of ~lr = 4e-4 is far below half of it
    bias = (1.0 + 0.1 * rng.random(16)).astype(np.float32)
    params = {**params, "fc1": {**params["fc1"], "bias": jnp.asarray(bias, BF16)}}
    cfg = boft.BOFTConfig(block_size=4, targets="fc1", bias="boft_only", modules_to_save="head")
    model = boft.wrap(base_module, cfg)
    adapter = boft.init_adapter(model, params, x[:1])
    frozen, _ = boft.split(boft.combine(params, adapter), cfg)
    labels = rng.integers(0, 3, size=64).astype(np.int32)
    split = Split(inputs={"x": x}, labels=labels)
    task = loop.Task("tiny", model, frozen, adapter, Dataset(split, split, "random"), _loss, lambda *a: 0.0)
    opts = loop.TrainOptions(steps=30, batch_size=16, learning_rate=4e-4, warmup_steps=0, eval_every=0,
                             save_every=1000, progress=False, mesh="data=1")

    # what a bf16 parameter would get: the same size of step, rounded away
    lost = optax.apply_updates(adapter["fc1"]["bias"], jnp.full((16,), 4e-4, BF16))
    np.testing.assert_array_equal(np.asarray(lost), np.asarray(adapter["fc1"]["bias"]))

    res = loop.fit(task, opts, tmp_path / "run")
    start = np.asarray(adapter["fc1"]["bias"], np.float32)
    master = res["master"]["fc1"]["bias"]
    assert master.dtype == jnp.float32 and res["master"]["head"]["kernel"].dtype == jnp.float32
    moved = np.abs(np.asarray(master) - start)
    assert moved.max() > 5e-3, moved  # ~30 steps of ~4e-4 accumulated in float32
    # the returned adapter is what the model ran with: the masters in the base's own dtypes
    for a, m, a0 in zip(jax.tree.leaves(res["adapter"]), jax.tree.leaves(res["master"]), jax.tree.leaves(adapter)):
        assert a.dtype == a0.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(m.astype(a0.dtype)))
    assert (np.asarray(res["adapter"]["fc1"]["bias"], np.float32) != start).any()
    # skew / scale were float32 to begin with and stay so
    assert res["adapter"]["fc1"]["kernel"]["skew"].dtype == jnp.float32
