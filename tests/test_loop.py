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


def test_a_non_finite_step_stops_the_run_and_nothing_non_finite_is_saved(tmp_path):
    """One example with a huge (finite) input makes step 7's loss or gradient non-finite: fit raises
    Diverged naming the step, that step's update is not applied, the step checkpoints and the log
    hold only finite values (and are valid JSON), and the newest checkpoint is the one before it."""
    import json

    rng = np.random.default_rng()
    module = TinyClassifier()
    x = rng.normal(size=(160, 8)).astype(np.float32)  # 10 batches: the 9 steps stay in the first epoch
    labels = rng.integers(0, 3, size=160).astype(np.int32)
    params = jax.tree.map(lambda a: a.astype(jnp.float32), module.init(jax.random.key(3), x[:1])["params"])
    cfg = boft.BOFTConfig(block_size=4, targets="fc1")
    model = boft.wrap(module, cfg)
    adapter = boft.init_adapter(model, params, x[:1])
    frozen, _ = boft.split(boft.combine(params, adapter), cfg)
    opts = loop.TrainOptions(steps=9, batch_size=16, learning_rate=1e-3, warmup_steps=0, eval_every=0,
                             save_every=3, progress=False, mesh="data=1", seed=5)
    bad_step = 7  # 1-based: the batch of loop step 6
    poisoned = x.copy()
    poisoned[int(loop.batch_indices(160, 16, opts.seed, bad_step - 1)[0])] = 3e38
    split = Split(inputs={"x": poisoned}, labels=labels)
    task = loop.Task("tiny", model, frozen, adapter, Dataset(split, split, "poisoned"), _loss, lambda *a: 0.0)
    try:
        loop.fit(task, opts, tmp_path / "run")
    except loop.Diverged as e:
        msg = str(e)
    else:
        raise AssertionError("fit did not stop at the non-finite step")
    assert f"diverged at step {bad_step}" in msg and "not applied" in msg and "step 6" in msg, msg
    ckpt = boft.checkpoint.TrainCheckpointer(tmp_path / "run" / "checkpoints")
    assert ckpt.all_steps() == [3, 6]
    state = ckpt.restore_latest(adapter, loop.make_optimizer(opts).init(adapter))
    ckpt.close()
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(state))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1] and all(np.isfinite(r["loss"]) for r in rows)
    # the same data without the poisoned example trains to the end
    clean = Split(inputs={"x": x}, labels=labels)
    task = loop.Task("tiny", model, frozen, adapter, Dataset(clean, clean, "clean"), _loss, lambda *a: 0.0)
    res = loop.fit(task, opts, tmp_path / "clean")
    assert len(res["losses"]) == 2 and all(np.isfinite(res["losses"]))


def test_runs_recorded_by_path_before_content_hashes_still_resume():
    """Checkpoints written before the data and base were identified by content recorded their paths
    (and data sizes): those entries are not compared; every other option still is."""
    stored = {"checkpoint": "/old/base", "data": "digits (80%/20% split)", "data_sizes": [672, 224], "seed": 0,
              "boft": {"block_size": 4, "n_factors": 2}}
    now = {"checkpoint": {"sha256": "ab" * 32}, "data": {"sha256": "cd" * 32, "train": 672, "test": 224}, "seed": 0,
           "boft": {"block_size": 4, "n_factors": 2}}
    assert loop._identity_diff(stored, now) == []
    diff = loop._identity_diff(stored, {**now, "seed": 3, "boft": {"block_size": 8, "n_factors": 2}})
    assert diff == ["boft.block_size: checkpoint 4, now 8", "seed: checkpoint 0, now 3"]
    other_sizes = {**now, "data": {**now["data"], "train": 600}}
    assert loop._identity_diff(stored, other_sizes) == ["data_sizes: checkpoint [672, 224], now [600, 224]"]
    # an entry the checkpoint records and this run does not (an option on then, off now) is a difference
    assert loop._identity_diff({**stored, "scan_layers": True}, now) == ["scan_layers: checkpoint true, now false"]
    # content hashes on both sides are compared
    assert loop._identity_diff({**now, "data": {**now["data"], "sha256": "ef" * 32}}, now)[0].startswith("data.sha256:")


def test_a_stop_request_raises_the_exception_it_carries_after_the_steps_checkpoint(tmp_path, monkeypatch):
    """request_stop(exc) (SIGTERM: Terminated; Ctrl-C, whose own KeyboardInterrupt can be lost where
    the handler raised it: KeyboardInterrupt) stops fit after the current step and its checkpoint,
    raising that exception; clear_stop forgets it."""
    rng = np.random.default_rng()
    module = TinyClassifier()
    x = rng.normal(size=(64, 8)).astype(np.float32)
    labels = rng.integers(0, 3, size=64).astype(np.int32)
    params = jax.tree.map(lambda a: a.astype(jnp.float32), module.init(jax.random.key(3), x[:1])["params"])
    cfg = boft.BOFTConfig(block_size=4, targets="fc1")
    model = boft.wrap(module, cfg)
    adapter = boft.init_adapter(model, params, x[:1])
    frozen, _ = boft.split(boft.combine(params, adapter), cfg)
    split = Split(inputs={"x": x}, labels=labels)
    task = loop.Task("tiny", model, frozen, adapter, Dataset(split, split, "random"), _loss, lambda *a: 0.0)
    opts = loop.TrainOptions(steps=6, batch_size=16, learning_rate=1e-3, warmup_steps=0, eval_every=0,
                             save_every=100, progress=False, mesh="data=1")
    real = loop.batch_indices
    for exc, run in ((KeyboardInterrupt, "ctrl_c"), (loop.Terminated, "sigterm")):
        def indices(n, batch, seed, step, exc=exc):
            if step == 2:
                loop.request_stop(exc)
                loop.request_stop(loop.Terminated if exc is KeyboardInterrupt else KeyboardInterrupt)  # the first wins
            return real(n, batch, seed, step)

        monkeypatch.setattr(loop, "batch_indices", indices)
        try:
            loop.fit(task, opts, tmp_path / run)
        except KeyboardInterrupt as e:
            assert type(e) is exc, (type(e), exc)
        else:
            raise AssertionError("fit did not stop")
        finally:
            loop.clear_stop()
        ckpt = boft.checkpoint.TrainCheckpointer(tmp_path / run / "checkpoints")
        assert ckpt.all_steps() == [3]  # the step that was running is complete and saved
        ckpt.close()
    assert not loop.STOP.is_set() and loop._stop_exc is loop.Terminated
