"""Communication that BOFT adds under a sharded mesh: collectives in the compiled gradient program.

Counts the all-gather / all-reduce / collective-permute / reduce-scatter / all-to-all ops (and
their result bytes) that XLA's SPMD partitioner puts into one jitted gradient computation of a
ViT whose frozen weights are sharded by :func:`boft_jax.sharding.shard_frozen`, for

  bare         the model without adapters, gradient w.r.t. the images (the floor: what the frozen
               model itself communicates forward and backward)
  boft MODE    BOFT on every Dense layer (``all_linear``), gradient w.r.t. the adapter

on each mesh given.  Counts come from the compiled program, not from timing, so they do not depend
on the machine's load; the devices are simulated CPU devices
(``--xla_force_host_platform_device_count``), set before jax is imported.

    python benchmarks/collectives.py                       # hidden 256, 8 devices
    python benchmarks/collectives.py --hidden 768 --meshes model=8 data=2,model=4
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, ".."))
sys.path.insert(0, _HERE)

# jax is imported here but starts its backend (and reads XLA_FLAGS) only in main()
from _util import machine_description, markdown_table  # noqa: E402
from peak_buffers import shape_bytes, tuple_elements  # noqa: E402

COLLECTIVES = ("all-gather", "all-reduce", "collective-permute", "reduce-scatter", "all-to-all")
# one instruction per line: "%name = TYPE OP(" or "OP-start("; TYPE holds no "=" (metadata does)
_OP = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<type>[^=]+?)\s+(?P<op>" + "|".join(COLLECTIVES) + r")(?P<start>-start)?\(",
    re.M,
)
_COMMENT = re.compile(r"/\*.*?\*/")  # e.g. the /*index=5*/ markers inside long tuple types


def collectives(hlo_text: str) -> dict[str, tuple[int, int]]:
    """``{op: (count, result bytes)}`` over compiled HLO text.

    A synchronous op counts its result (every array of a tuple result, e.g. a combined
    all-reduce).  An asynchronous pair (``all-gather-start`` / ``all-gather-done``) counts once, at
    its start: an ``all-reduce-start`` returns its results; the other starts return an
    ``(operands, results)`` tuple, of which the second half is counted.  Shapes are sized by
    :func:`peak_buffers.shape_bytes`.
    """
    count, size = collections.Counter(), collections.Counter()
    for m in _OP.finditer(_COMMENT.sub("", hlo_text)):
        parts = tuple_elements(m.group("type"))
        op = m.group("op")
        if m.group("start") and op != "all-reduce" and len(parts) > 1:
            parts = parts[len(parts) // 2 :]
        count[op] += 1
        size[op] += sum(shape_bytes(p) for p in parts)
    return {op: (count[op], size[op]) for op in COLLECTIVES if count[op]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--meshes", nargs="+", default=["data=8", "model=8", "data=2,model=4"])
    p.add_argument("--hidden", type=int, default=256, help="ViT hidden size (MLP 4x, 8 heads, 2 layers)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--block-size", type=int, default=4)
    p.add_argument("--factors", type=int, default=2)
    p.add_argument("--modes", nargs="+", default=["input", "weight", "auto"])
    args = p.parse_args(argv)

    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.devices}".strip()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # SPMD's warnings about tiny adapter arrays
    import jax
    import jax.numpy as jnp
    import numpy as np

    import boft_jax as boft
    from boft_jax import sharding as sh
    from boft_jax.models import vit

    h = args.hidden
    module = vit.ViT(vit.ViTConfig(hidden_size=h, num_hidden_layers=2, num_attention_heads=8, intermediate_size=4 * h,
                                   image_size=(8, 8), patch_size=(4, 4), num_channels=1, num_labels=8))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(args.batch, 8, 8, 1)), jnp.float32)
    params = module.init(jax.random.key(0), x[:1])["params"]
    frozen_bytes = sum(np.asarray(l).nbytes for l in jax.tree.leaves(params))
    print(machine_description())
    print(f"ViT hidden {h}, MLP {4 * h}, 2 layers, batch {args.batch} x 5 tokens; BOFT b={args.block_size}"
          f" m={args.factors} on all Dense layers; frozen weights {frozen_bytes / 2**20:.2f} MiB\n")
    table = []
    for spec in args.meshes:
        mesh = sh.make_mesh(spec)
        rep = sh.replicated(mesh)
        xs = jax.device_put(x, sh.batch_sharding(mesh, x.ndim))
        rows = []
        for name in ["bare", *args.modes]:
            if name == "bare":
                fz = sh.shard_frozen(params, mesh)
                fn = jax.jit(jax.grad(lambda f, x: jnp.mean(module.apply({"params": f}, x) ** 2), argnums=1),
                             out_shardings=sh.batch_sharding(mesh, x.ndim))
                lowered = fn.lower(fz, xs)
            else:
                cfg = boft.BOFTConfig(block_size=args.block_size, n_factors=args.factors,
                                      targets=vit.TARGET_PRESETS["all_linear"], mode=name)
                model = boft.wrap(module, cfg)
                adapter = boft.init_adapter(model, params, x[:1])
                frozen, _ = boft.split(boft.combine(params, adapter), cfg)
                fz = sh.shard_frozen(frozen, mesh)

                def loss(a, f, x, model=model):
                    return jnp.mean(model.apply({"params": boft.combine(f, a)}, x) ** 2)

                lowered = jax.jit(jax.grad(loss), out_shardings=rep).lower(jax.device_put(adapter, rep), fz, xs)
            found = collectives(lowered.compile().as_text())
            total = sum(b for _, b in found.values())
            rows.append((name if name == "bare" else f"boft {name}", found, total))
        bare_total = rows[0][2]
        for name, found, total in rows:
            cells = [f"{found[op][0]} / {found[op][1] / 2**10:.0f} KiB" if op in found else "-" for op in COLLECTIVES]
            ratio = f"{total / bare_total:.2f}x" if bare_total else "-"
            table.append([spec, name, *cells, f"{total / 2**20:.2f}", ratio])
        print(f"{spec}: done", file=sys.stderr, flush=True)
    print(markdown_table(["mesh", "program", *COLLECTIVES, "total MiB", "vs bare"], table, align="ll" + "r" * (len(COLLECTIVES) + 2)))


if __name__ == "__main__":
    main()
