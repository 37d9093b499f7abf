"""Make the bundled base checkpoints (committed under ``train/assets/``), reproducibly.

* ``vit-digits-base``: a small ViT (8x8 grey images, patch 2, hidden 96, 4 layers) trained in full
  on scikit-learn's digits 0-4.  The finetuning job then teaches it digits 5-9.
* ``t5-bytes-base``: see :mod:`train.text_tasks` (made by ``--model t5``).

Both are saved in Hugging Face format (``config.json`` + ``model.safetensors``), so the main job
loads them through ``boft_jax.models.from_pretrained`` like any real checkpoint.

Usage::

  python -m train.make_base --model vit     # ~1 minute on 2 CPU cores
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from boft_jax.models import save_pretrained
from boft_jax.models.vit import ViT, ViTConfig
from train.data import PRETRAIN_CLASSES, batch_indices, digits

ASSETS = Path(__file__).resolve().parent / "assets"
VIT_BASE = ASSETS / "vit-digits-base"

VIT_CONFIG = ViTConfig(
    hidden_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=384,
    image_size=(8, 8),
    patch_size=(2, 2),
    num_channels=1,
    num_labels=10,
    id2label=tuple(str(i) for i in range(10)),
    layer_norm_eps=1e-12,
)


def make_vit(out: Path = VIT_BASE, *, steps: int = 800, seed: int = 0) -> float:
    data = digits(PRETRAIN_CLASSES, seed=seed)
    model = ViT(VIT_CONFIG)
    x0 = jnp.zeros((1, 8, 8, 1))
    params = model.init(jax.random.key(seed), x0)["params"]
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(optax.warmup_cosine_decay_schedule(0, 2e-3, 50, steps), weight_decay=0.01))
    state = opt.init(params)

    @jax.jit
    def step(params, state, x, y):
        def loss_fn(p):
            logits = model.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, g = jax.value_and_grad(loss_fn)(params)
        u, state = opt.update(g, state, params)
        return optax.apply_updates(params, u), state, loss

    t0 = time.time()
    for s in range(steps):
        b = data.train.take(batch_indices(len(data.train), 64, seed, s))
        params, state, loss = step(params, state, b.inputs["pixel_values"], b.labels)
        if s % 200 == 0:
            print(f"step {s} loss {float(loss):.4f}")
    logits = jax.jit(model.apply)({"params": params}, data.test.inputs["pixel_values"])
    acc = float((np.asarray(logits).argmax(-1) == data.test.labels).mean())
    print(f"base ViT: held-out accuracy on digits {list(PRETRAIN_CLASSES)}: {acc:.3f} ({time.time() - t0:.0f} s)")
    save_pretrained(out, model, jax.tree.map(np.asarray, params))
    print(f"saved to {out}")
    return acc


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["vit", "t5", "all"], default="all")
    args = p.parse_args(argv)
    if args.model in ("vit", "all"):
        make_vit()
    if args.model in ("t5", "all"):
        from train.text_tasks import make_t5

        make_t5()


if __name__ == "__main__":
    main()
