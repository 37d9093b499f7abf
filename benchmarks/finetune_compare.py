"""BOFT (m=1, m=2) vs LoRA vs full finetuning on the bundled default task, equal step budget.

Same base (train/assets/vit-digits-base), same data order, same optimizer (AdamW, warmup+cosine,
clipping; learning rate 5e-3, 5e-4 for full finetuning), same steps and batch; BOFT with dropout 0.1
(its multiplicative block dropout, active in training only); the new classifier head trains in full in every variant (as PEFT's
``modules_to_save``).  LoRA and full finetuning are baselines written here, not product features.
Prints one markdown table: held-out accuracy, trainable params, median step time and its ratio to
LoRA's, all measured in this one run.

  python -m benchmarks.finetune_compare            # ~6 minutes on 2 CPU cores
  python -m benchmarks.finetune_compare --steps 50 # quick look
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import boft_jax as boft
from boft_jax.models import vit
from train import loop, make_base
from train.data import FINETUNE_CLASSES, batch_indices, digits


class LoRA(nn.Module):
    """Minimal LoRA through the same kind of interception: y = Dense(x) + (x A) B * alpha / r."""

    model: nn.Module
    targets: str
    rank: int = 8
    alpha: float = 16.0

    def setup(self):
        nn.share_scope(self, self.model)

    def __call__(self, *args, **kwargs):
        cfg = boft.BOFTConfig(block_size=1, targets=self.targets)  # only for its path matching

        def intercept(next_fun, a, k, ctx):
            mod = ctx.module
            if ctx.method_name != "__call__" or not isinstance(mod, nn.Dense) or not cfg.matches("/".join(mod.path)):
                return next_fun(*a, **k)
            x = a[0]
            y = next_fun(*a, **k)
            lora_a = mod.param("lora_a", nn.initializers.normal(1.0 / self.rank), (x.shape[-1], self.rank))
            lora_b = mod.param("lora_b", nn.initializers.zeros, (self.rank, mod.features))
            return y + (x @ lora_a) @ lora_b * (self.alpha / self.rank)

        with nn.intercept_methods(intercept):
            return self.model(*args, **kwargs)


def _flat(tree):
    return {"/".join(str(getattr(k, "key", k)) for k in path): v for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def run_variant(name, apply_fn, trainable, frozen_fn, data, steps, batch, lr, seed=0):
    """Train ``trainable`` with ``loss(apply_fn(frozen_fn(trainable), x, rng))``; returns metrics.

    ``rng`` is the step's dropout key while training and ``None`` for the held-out evaluation."""
    opt = loop.make_optimizer(loop.TrainOptions(steps=steps, learning_rate=lr))  # the job's warmup rule
    state = opt.init(trainable)

    @jax.jit
    def step(tr, state, x, y, rng):
        def loss_fn(t):
            logits = apply_fn(frozen_fn(t), x, rng)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, g = jax.value_and_grad(loss_fn)(tr)
        u, state = opt.update(g, state, tr)
        return optax.apply_updates(tr, u), state, loss

    times = []
    for s in range(steps):
        b = data.train.take(batch_indices(len(data.train), batch, seed, s))
        t0 = time.perf_counter()
        rng = jax.random.fold_in(jax.random.key(seed), s)
        trainable, state, loss = step(trainable, state, b.inputs["pixel_values"], b.labels, rng)
        loss.block_until_ready()
        times.append(time.perf_counter() - t0)
    logits = jax.jit(lambda p, x: apply_fn(p, x, None))(frozen_fn(trainable), data.test.inputs["pixel_values"])
    acc = float((np.asarray(logits).argmax(-1) == data.test.labels).mean())
    n = boft.count_params(trainable)
    return {"name": name, "acc": acc, "params": n, "step_ms": 1e3 * statistics.median(times[min(5, len(times) - 1):]), "loss": float(loss)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args(argv)

    module, base = vit.from_pretrained(make_base.VIT_BASE)
    data = digits(FINETUNE_CLASSES)
    x0 = jnp.asarray(data.train.inputs["pixel_values"][:1])
    n_base = boft.count_params(base)
    targets = vit.TARGET_PRESETS["attention"]
    results = []

    for m in (1, 2):
        cfg = boft.BOFTConfig(block_size=4, n_factors=m, targets=targets, modules_to_save="classifier", dropout=0.1)
        model = boft.wrap(module, cfg)
        adapter = boft.init_adapter(model, base, x0)
        frozen, _ = boft.split(boft.combine(base, adapter), cfg)
        def apply_fn(p, x, rng, model=model):  # BOFT's multiplicative dropout while training
            return model.apply({"params": p}, x, deterministic=rng is None, rngs={} if rng is None else {"dropout": rng})

        results.append(
            run_variant(f"BOFT m={m}, b=4 (attention)", apply_fn, adapter, functools.partial(boft.combine, frozen), data,
                        args.steps, args.batch_size, 5e-3)
        )

    lora = LoRA(module, targets, rank=8)
    init = lora.init(jax.random.key(0), x0)["params"]
    flat = _flat(init)
    trainable = {k: v for k, v in flat.items() if "lora_" in k or k.startswith("classifier/")}
    trainable.update({k: _flat(base)[k] for k in trainable if k.startswith("classifier/")})
    base_flat = _flat(base)

    def lora_params(t):
        merged = dict(base_flat, **t)
        tree: dict = {}
        for k, v in merged.items():
            node = tree
            *parents, leaf = k.split("/")
            for q in parents:
                node = node.setdefault(q, {})
            node[leaf] = v
        return tree

    results.append(
        run_variant("LoRA r=8 (attention)", lambda p, x, rng: lora.apply({"params": p}, x), trainable, lora_params, data,
                    args.steps, args.batch_size, 5e-3)
    )
    results.append(
        run_variant("full finetuning", lambda p, x, rng: module.apply({"params": p}, x), base, lambda t: t, data,
                    args.steps, args.batch_size, 5e-4)
    )
    lora_ms = next(r["step_ms"] for r in results if r["name"].startswith("LoRA"))
    print(f"\nDefault task (digits 5-9, new classes), {args.steps} steps x batch {args.batch_size}, "
          f"{jax.device_count()} {jax.devices()[0].platform} device(s)\n")
    print("| method | held-out accuracy | trainable params | step time (ms) | step time / LoRA |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['name']} | {r['acc']:.3f} | {r['params']:,} ({100 * r['params'] / n_base:.2f}%) | "
              f"{r['step_ms']:.1f} | {r['step_ms'] / lora_ms:.2f}x |")


if __name__ == "__main__":
    main()
