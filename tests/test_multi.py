"""boft_jax.multi: many adapters in one batch (stack / apply_multi / generate_multi)."""

from __future__ import annotations

import dataclasses
import functools
import warnings
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import boft_jax as boft
from boft_jax import multi
from boft_jax.models import t5, vit

FIXTURES = Path(__file__).parent / "fixtures"
TOL = 1e-5


def _random_adapter(template, seed, scale=0.3):
    """A random (never identity) adapter with ``template``'s structure (arrays or shape structs):
    noise on every skew, scale (around 1) and bias.  numpy only: no per-shape compilations."""
    rng = np.random.default_rng(seed)

    def leaf(path, t):
        noise = scale * rng.standard_normal(np.shape(t)).astype(np.float32)
        names = [getattr(k, "key", None) for k in path[-2:]]
        return jnp.asarray(1.0 + noise if names == ["kernel", "scale"] else noise)

    return jax.tree_util.tree_map_with_path(leaf, template)


def _adapter_template(model, config, *args):
    """The adapter structure of ``model`` (shape structs only: nothing is computed)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), *args)["params"]
    return boft.split(shapes, config)[1]


def _close(a, b, tol=TOL):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    err = np.abs(a - b).max()
    assert err <= tol * max(1.0, np.abs(b).max()), f"max abs error {err:.3g}"


# ---------------------------------------------------------------------------------------------
# ViT (committed fixture: hidden 32, 2 layers, 16x16 images -> 17 tokens; adapters on every
# linear layer, every bias trains, the classifier is a saved module: non-BOFT adapter leaves, which
# the BASE id must take from the frozen params)
# ---------------------------------------------------------------------------------------------
class VitCase:
    def __init__(self, scan_layers: bool, mode: str, n_adapters: int = 3):
        self.base, self.frozen = vit.from_pretrained(FIXTURES / "vit", scan_layers=scan_layers)
        self.config = boft.BOFTConfig(
            block_size=4, n_factors=2, targets=vit.TARGET_PRESETS["all_linear"], bias="all", mode=mode,
            modules_to_save="classifier",
        )
        self.model = boft.wrap(self.base, self.config)
        self.x = jnp.asarray(np.random.default_rng(1).standard_normal((7, 16, 16, 3)), jnp.float32)
        template = _adapter_template(self.model, self.config, self.x[:1])
        self.adapters = [_random_adapter(template, 10 + i) for i in range(n_adapters)]
        self.stacked = multi.stack(self.adapters)
        model, base = self.model, self.base
        self.one = jax.jit(lambda p, x: model.apply({"params": p}, x))
        self.base_one = jax.jit(lambda p, x: base.apply({"params": p}, x))
        self.traces = []

        @jax.jit
        def run(frozen, stacked, ids, x):  # apply_multi under the user's own jit
            self.traces.append(1)  # a Python side effect: runs once per trace
            return multi.apply_multi(model, frozen, stacked, ids, x)

        self.run = run

    def reference(self, ids):
        """Each example alone (batch 1) with its adapter, or the bare base model for BASE."""
        rows = []
        for j, i in enumerate(np.asarray(ids)):
            xj = self.x[j : j + 1]
            if i == multi.BASE:
                rows.append(self.base_one(self.frozen, xj)[0])
            else:
                rows.append(self.one(boft.combine(self.frozen, self.adapters[i]), xj)[0])
        return np.stack(rows)


@functools.cache
def vit_case(scan_layers=False):
    # The unrolled case is wrapped with mode="weight" (apply_multi must re-wrap it to the input
    # side; the batch-1 reference then really runs the weight side); the scanned one with "auto".
    return VitCase(scan_layers, "auto" if scan_layers else "weight")


@pytest.mark.parametrize("scan_layers", [False, True])
def test_vit_apply_multi_equals_each_adapter_alone(scan_layers):
    case = vit_case(scan_layers)
    rng = np.random.default_rng(0)
    for _ in range(2):  # random mixes, always with the base id and a repeated id
        ids = rng.integers(-1, 3, size=7)
        ids[:2] = [multi.BASE, ids[2]]
        rng.shuffle(ids)
        y = multi.apply_multi(case.model, case.frozen, case.stacked, jnp.asarray(ids), case.x)
        _close(y, case.reference(ids))
    # the adapters really differ from each other and from the base
    ref = case.reference(np.array([0, 1, 2, -1, 0, 1, 2]))
    assert min(np.abs(ref[i] - ref[3]).max() for i in range(3)) > 1e-2
    assert np.abs(ref[0] - ref[1]).max() > 1e-2


def test_vit_apply_multi_at_another_image_size_passes_interpolate_pos_encoding():
    """A keyword of the model (here a static bool) reaches every example: 24 x 24 images through the
    16 x 16 fixture with its position embeddings resized, each row as its adapter alone."""
    case = vit_case(False)
    x = jnp.asarray(np.random.default_rng().standard_normal((4, 24, 24, 3)), jnp.float32)
    ids = np.array([2, multi.BASE, 0, 2])
    y = multi.apply_multi(case.model, case.frozen, case.stacked, jnp.asarray(ids), x, interpolate_pos_encoding=True)
    rows = []
    for j, i in enumerate(ids):
        params = case.frozen if i == multi.BASE else boft.combine(case.frozen, case.adapters[i])
        model = case.base if i == multi.BASE else case.model
        rows.append(model.apply({"params": params}, x[j : j + 1], interpolate_pos_encoding=True)[0])
    _close(y, np.stack(rows))
    with pytest.raises(ValueError, match="interpolate_pos_encoding=True"):  # without it: the size error
        multi.apply_multi(case.model, case.frozen, case.stacked, jnp.asarray(ids), x)


def _shapes_in_jaxpr(jaxpr) -> set[tuple[int, ...]]:
    shapes = set()
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            shapes.add(tuple(getattr(v.aval, "shape", ())))
        for p in eqn.params.values():
            for sub in p if isinstance(p, (list, tuple)) else [p]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    shapes |= _shapes_in_jaxpr(inner)
    return shapes


def test_no_per_example_kernel_copies(monkeypatch):
    """Nothing of shape (batch, d_in, d_out) is ever built: frozen kernels stay shared, although
    the model was wrapped with mode="weight"."""
    case = vit_case(False)
    assert case.model.config.mode == "weight"
    ids = jnp.array([0, 1, 2, -1, 0, 1, 2])
    # shapes of the BOFT-adapted frozen kernels (the saved classifier's kernel is an adapter leaf:
    # each example has its own, by design)
    params = boft.combine(case.frozen, case.adapters[0])
    kernels = {
        tuple(np.shape(node.kernel))
        for node in jax.tree.leaves(params, is_leaf=lambda v: isinstance(v, boft.BOFTKernel))
        if isinstance(node, boft.BOFTKernel)
    }
    assert kernels == {(32, 32), (32, 64), (64, 32)}

    def per_example_kernels():
        jaxpr = jax.make_jaxpr(
            lambda f, s, i, x: multi._apply_multi_impl(f, s, i, (x,), {}, model=case.model, method=None, static_kw=())
        )(case.frozen, case.stacked, ids, case.x)
        return {s for s in _shapes_in_jaxpr(jaxpr.jaxpr) if len(s) >= 3 and s[0] == 7 and s[-2:] in kernels}

    assert per_example_kernels() == set()
    # The check sees them when they exist: without the input-mode re-wrap, the weight side
    # rotates one kernel per example.
    monkeypatch.setattr(multi, "_input_mode", lambda model: model)
    assert per_example_kernels()


def test_id_mix_does_not_recompile():
    case = vit_case(False)
    mixes = [[0, 0, 0, 0, 0, 0, 0], [2, 1, -1, 0, 2, 1, -1], [-1] * 7, [1, 2, 0, 1, 2, 0, 1]]
    for ids in mixes:
        y = case.run(case.frozen, case.stacked, jnp.asarray(ids, jnp.int32), case.x)
    assert len(case.traces) == 1
    _close(y, case.reference(mixes[-1]))
    # the self-jitted eager entry point too
    before = multi._apply_multi_jit._cache_size()
    for ids in mixes:
        multi.apply_multi(case.model, case.frozen, case.stacked, jnp.asarray(ids, jnp.int32), case.x)
    assert multi._apply_multi_jit._cache_size() - before <= 1


def test_out_of_range_ids():
    case = vit_case(False)
    with pytest.raises(ValueError, match=r"adapter_ids\[1\] = 3.*adapter_ids\[4\] = -2.*0\.\.2"):
        multi.apply_multi(case.model, case.frozen, case.stacked, jnp.array([0, 3, 1, -1, -2, 0, 0]), case.x)
    with pytest.raises(ValueError, match="7 entries but the inputs have batch size 6"):
        multi.apply_multi(case.model, case.frozen, case.stacked, jnp.zeros(7, jnp.int32), case.x[:6])
    # Under jit: out-of-range examples give NaN, the others are untouched.
    ids = np.array([0, 3, -1, -2, 2, 100, 1])
    y = np.asarray(case.run(case.frozen, case.stacked, jnp.asarray(ids, jnp.int32), case.x))
    bad = np.array([1, 3, 5])
    assert np.isnan(y[bad]).all()
    good = np.setdiff1d(np.arange(7), bad)
    assert np.isfinite(y[good]).all()
    _close(y[good], case.reference(np.where(np.isin(np.arange(7), bad), 0, ids))[good])
    # ids that an int32 cast would wrap onto valid ones (2**32 - 1 -> BASE, 2**32 -> adapter 0)
    # are out of range in their own dtype: NaN too
    ids_u = jnp.asarray([0, 2**32 - 1, 1, 0, 2, 1, 0], jnp.uint32)
    y = np.asarray(case.run(case.frozen, case.stacked, ids_u, case.x))
    assert np.isnan(y[1]).all() and np.isfinite(np.delete(y, 1, axis=0)).all()
    with jax.enable_x64(True):
        ids_64 = jnp.asarray([2**32, 2**32 + 1, 2**32 - 1, 0, 1, 2, -1], jnp.int64)
        y = np.asarray(case.run(case.frozen, case.stacked, ids_64, case.x))
    assert np.isnan(y[:3]).all() and np.isfinite(y[3:]).all()
    # a Python scalar among the batched positional inputs: said so
    with pytest.raises(ValueError, match=r"scalar\(s\) \['bool'\].*keyword arguments"):
        multi.apply_multi(case.model, case.frozen, case.stacked, jnp.zeros(7, jnp.int32), case.x, True)


def test_other_methods_kwargs_and_none_inputs():
    """method=..., keyword args and batched pytree inputs pass through."""

    class Two(nn.Module):
        def setup(self):
            self.fc = nn.Dense(8)

        def __call__(self, x, extra=None, *, double=False):
            y = self.fc(x)
            if extra is not None:
                y = y + extra["shift"]
            return 2 * y if double else y

        def project(self, x):
            return jnp.tanh(self.fc(x))

    cfg = boft.BOFTConfig(block_size=4, n_factors=2)
    model = boft.wrap(Two(), cfg)
    x = jax.random.normal(jax.random.key(0), (5, 3, 16))
    frozen, template = boft.split(jax.jit(model.init)(jax.random.key(1), x)["params"])
    adapters = [_random_adapter(template, i) for i in range(2)]
    stacked = multi.stack(adapters)
    ids = np.array([1, -1, 0, 0, 1])
    shift = {"shift": jnp.arange(5.0)[:, None, None]}
    y = multi.apply_multi(model, frozen, stacked, jnp.asarray(ids), x, shift, double=True)
    y_none = multi.apply_multi(model, frozen, stacked, jnp.asarray(ids), x, None)
    p = multi.apply_multi(model, frozen, stacked, jnp.asarray(ids), x, method="project")
    for j, i in enumerate(ids):
        a = adapters[i] if i >= 0 else multi.identity_adapter(frozen, template)
        params = {"params": boft.combine(frozen, a)}
        ref = model.apply(params, x[j : j + 1])[0]
        _close(y_none[j], ref)
        _close(y[j], 2 * (ref + j))
        _close(p[j], model.apply(params, x[j : j + 1], method="project")[0])


def test_invalid_ids_mark_integer_and_bool_outputs_and_numpy_scalars_are_static():
    """Under jit an out-of-range id marks every output leaf: NaN, -1 for signed integers (e.g. a
    predicted class), the dtype's maximum for unsigned, False for bool; valid rows are what each
    adapter alone gives.  A NumPy scalar keyword argument is static like a Python one.  An array
    keyword argument with a per-example axis gets an error that says where such arrays go."""

    class Classifier(nn.Module):
        @nn.compact
        def __call__(self, x, *, deterministic: bool = True):
            return nn.Dense(8, name="fc")(x)

        def predict(self, x, *, deterministic: bool = True):
            logits = self(x, deterministic=deterministic)
            return {"cls": jnp.argmax(logits, -1), "u": jnp.argmax(logits, -1).astype(jnp.uint8),
                    "pos": logits[..., 0] > 0, "logits": logits}

    cfg = boft.BOFTConfig(block_size=4, n_factors=2)
    model = boft.wrap(Classifier(), cfg)
    x = jax.random.normal(jax.random.key(3), (4, 16))
    frozen, template = boft.split(jax.jit(model.init)(jax.random.key(1), x)["params"])
    adapters = [_random_adapter(template, 20 + i) for i in range(2)]
    stacked = multi.stack(adapters)
    run = jax.jit(lambda ids: multi.apply_multi(model, frozen, stacked, ids, x, method="predict"))
    out = jax.tree.map(np.asarray, run(jnp.array([0, 7, 1, -3])))
    assert out["cls"][1] == -1 and out["cls"][3] == -1 and out["u"][1] == 255 and not out["pos"][1]
    assert np.isnan(out["logits"][[1, 3]]).all()
    for j, i in ((0, 0), (2, 1)):
        ref = model.apply({"params": boft.combine(frozen, adapters[i])}, x[j : j + 1], method="predict")
        assert out["cls"][j] == int(ref["cls"][0]) and out["pos"][j] == bool(ref["pos"][0])
        _close(out["logits"][j], ref["logits"][0])
    ids = jnp.array([1, 0, 1, 0])
    y_np = multi.apply_multi(model, frozen, stacked, ids, x, deterministic=np.bool_(True))
    _close(y_np, multi.apply_multi(model, frozen, stacked, ids, x, deterministic=True), tol=0)

    class WithExtra(nn.Module):
        @nn.compact
        def __call__(self, x, *, extra=None):
            return nn.Dense(8, name="fc")(x) + extra

    with pytest.raises(ValueError, match=r"keyword argument\(s\) \['extra'\] are passed whole to every example.*\*inputs"):
        multi.apply_multi(boft.wrap(WithExtra(), cfg), frozen, stacked, ids, x, extra=jnp.zeros((4, 8)))


def test_frozendict_adapters_0d_flags_and_unhashable_models():
    """FrozenDict adapter / frozen trees serve like dicts; a concrete 0-d bool array flag is static
    like ``True``; a model that cannot be hashed (nn.Sequential: a list of layers) gives the same
    rows with a warning that it runs uncompiled."""
    from flax.core import freeze

    class Classifier(nn.Module):
        @nn.compact
        def __call__(self, x, *, deterministic: bool = True):
            return nn.Dense(8, name="fc")(x)

    cfg = boft.BOFTConfig(block_size=4, n_factors=2)
    model = boft.wrap(Classifier(), cfg)
    x = jax.random.normal(jax.random.key(3), (4, 16))
    frozen, template = boft.split(jax.jit(model.init)(jax.random.key(1), x)["params"])
    adapters = [_random_adapter(template, 30 + i) for i in range(2)]
    ids = jnp.array([1, multi.BASE, 0, 1])
    want = multi.apply_multi(model, frozen, multi.stack(adapters), ids, x)
    for i, j in ((1, 0), (0, 2)):
        _close(want[j], model.apply({"params": boft.combine(frozen, adapters[i])}, x[j : j + 1])[0])
    stacked = multi.stack([freeze(a) for a in adapters])
    assert type(stacked) is dict
    _close(multi.apply_multi(model, freeze(frozen), freeze(stacked), ids, x), want, tol=0)
    for flag in (np.array(True), jnp.array(True)):
        _close(multi.apply_multi(model, frozen, stacked, ids, x, deterministic=flag), want, tol=0)
    seq = boft.wrap(nn.Sequential([nn.Dense(8, name="fc")]), cfg)
    seq_frozen = {"layers_0": frozen["fc"]}
    seq_stacked = {"layers_0": stacked["fc"]}
    with pytest.warns(UserWarning, match="cannot be hashed.*runs op by op.*jax.jit.*layers as a tuple"):
        got = multi.apply_multi(seq, seq_frozen, seq_stacked, ids, x)
    _close(got, want)
    tup = boft.wrap(nn.Sequential((nn.Dense(8, name="fc"),)), cfg)  # a tuple of layers hashes: compiled, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _close(multi.apply_multi(tup, seq_frozen, seq_stacked, ids, x), want)


# ---------------------------------------------------------------------------------------------
# stack
# ---------------------------------------------------------------------------------------------
def test_stack_layout_and_roundtrip():
    case = vit_case(False)
    leaf = case.stacked["encoder"]["layer_0"]["attention"]["query"]["kernel"]["skew"]
    one = case.adapters[0]["encoder"]["layer_0"]["attention"]["query"]["kernel"]["skew"]
    assert leaf.shape == (3, *one.shape)
    assert multi.num_adapters(case.stacked) == 3
    for a, b in zip(multi.unstack(case.stacked), case.adapters):
        jax.tree.map(np.testing.assert_array_equal, a, b)


def test_stack_mismatch_names_adapter_and_leaf():
    case = vit_case(False)
    a = case.adapters[0]
    # another block structure (b = 8 instead of 4)
    other_cfg = dataclasses.replace(case.config, block_size=8)
    other = _random_adapter(_adapter_template(boft.wrap(case.base, other_cfg), other_cfg, case.x[:1]), 0)
    with pytest.raises(ValueError) as e:
        multi.stack([a, a, other])
    msg = str(e.value)
    assert "adapter 2" in msg and "kernel/skew" in msg and "(2, 8, 6)" in msg and "(2, 4, 28)" in msg
    # a missing leaf
    b = jax.tree.map(lambda v: v, a)
    del b["encoder"]["layer_1"]["mlp"]["fc2"]["bias"]
    with pytest.raises(ValueError, match=r"adapter 1 .*'encoder/layer_1/mlp/fc2/bias'.* missing from adapter 1"):
        multi.stack([a, b])
    with pytest.raises(ValueError, match=r"adapter 1 has leaf 'encoder/layer_1/mlp/fc2/bias'"):
        multi.stack([b, a])
    # a dtype change
    c = jax.tree.map(lambda v: v, a)
    c["classifier"]["bias"] = c["classifier"]["bias"].astype(jnp.bfloat16)
    with pytest.raises(ValueError, match=r"adapter 1, leaf 'classifier/bias': dtype bfloat16"):
        multi.stack([a, c])
    with pytest.raises(ValueError, match="at least one"):
        multi.stack([])


def test_identity_adapter_is_the_base_model():
    case = vit_case(False)
    ident = multi.identity_adapter(case.frozen, case.adapters[0])
    y = case.one(boft.combine(case.frozen, ident), case.x[:1])
    _close(y, case.base_one(case.frozen, case.x[:1]))


# ---------------------------------------------------------------------------------------------
# T5 greedy generation, one adapter per sequence (fixture t5_relu, random adapters)
# ---------------------------------------------------------------------------------------------
class T5Case:
    def __init__(self):
        self.base, pretrained = t5.from_pretrained(FIXTURES / "t5_relu")
        # q, v of self- and cross-attention (cross v is used only when the cache is filled) and
        # the MLP input: 16 adapted layers, enough coverage at a modest compile time.
        self.config = boft.BOFTConfig(block_size=4, n_factors=2, targets=[t5.TARGET_PRESETS["attention_qv"], "mlp/wi"])
        self.model = boft.wrap(self.base, self.config)
        self.input_ids = jnp.array(
            [[5, 6, 7, 8, 9, 1], [10, 11, 12, 1, 0, 0], [13, 14, 1, 0, 0, 0], [20, 21, 22, 23, 1, 0], [30, 1, 0, 0, 0, 0]],
            jnp.int32,
        )
        self.mask = (self.input_ids != 0).astype(jnp.int32)
        self.frozen = pretrained
        template = _adapter_template(self.model, self.config, self.input_ids, self.mask, self.input_ids)
        self.adapters = [_random_adapter(template, 20 + i, scale=0.5) for i in range(3)]
        self.stacked = multi.stack(self.adapters)
        model, base = self.model, self.base
        self.forward = jax.jit(lambda p, ids, mask, dec: model.apply({"params": p}, ids, mask, dec))
        self.base_forward = jax.jit(lambda p, ids, mask, dec: base.apply({"params": p}, ids, mask, dec))

    def reference(self, ids, n, eos):
        """Greedy decoding of each sequence alone, without a KV cache: the full decoder prefix is
        recomputed every step (a fixed-length, causally masked decoder input)."""
        cfg = self.base.config
        eos = np.atleast_1d(eos)
        rows = []
        for j, i in enumerate(np.asarray(ids)):
            src, mask = self.input_ids[j : j + 1], self.mask[j : j + 1]
            if i == multi.BASE:
                fwd = functools.partial(self.base_forward, self.frozen)
            else:
                fwd = functools.partial(self.forward, boft.combine(self.frozen, self.adapters[i]))
            dec = np.full((1, n + 1), cfg.pad_token_id, np.int32)
            dec[0, 0] = cfg.decoder_start_token_id
            for t in range(n):
                nxt = int(np.argmax(np.asarray(fwd(src, mask, jnp.asarray(dec))[0, t])))
                dec[0, t + 1] = nxt
                if nxt in eos:
                    break
            rows.append(dec[0])
        return np.stack(rows)


@functools.cache
def t5_case():
    return T5Case()


N_NEW = 8  # max_new_tokens of every generate_multi call here (one compilation)


def test_t5_generate_multi_equals_each_adapter_alone():
    case = t5_case()
    never = 10**6  # an EOS that never occurs: first find tokens, then pick a real EOS from them
    ids = np.array([2, -1, 0, 1, 2])
    free = case.reference(ids, N_NEW, never)
    out = multi.generate_multi(
        case.model, case.frozen, case.stacked, jnp.asarray(ids), case.input_ids, case.mask,
        max_new_tokens=N_NEW, eos_token_id=never,
    )
    np.testing.assert_array_equal(out, free)
    assert len({tuple(r) for r in free}) >= 4  # adapters make the rows differ

    # now with an EOS that row 0 produces early (by its 3rd new token): padding after it
    eos = int(free[0, 3])
    ref = case.reference(ids, N_NEW, [case.base.config.eos_token_id, eos])
    out = multi.generate_multi(
        case.model, case.frozen, case.stacked, jnp.asarray(ids), case.input_ids, case.mask,
        max_new_tokens=N_NEW, eos_token_id=(case.base.config.eos_token_id, eos),
    )
    np.testing.assert_array_equal(out, ref)
    assert (ref[:, -1] == case.base.config.pad_token_id).any()


def test_t5_generate_multi_ids_and_recompiles():
    case = t5_case()
    before = multi._generate_multi_jit._cache_size()
    mixes = ([0, 0, 0, 0, 0], [1, -1, 2, 0, 1], [-1, -1, -1, -1, -1])
    outs = [
        multi.generate_multi(case.model, case.frozen, case.stacked, jnp.asarray(ids), case.input_ids, case.mask, max_new_tokens=N_NEW)
        for ids in mixes
    ]
    assert multi._generate_multi_jit._cache_size() - before <= 1
    np.testing.assert_array_equal(outs[1], case.reference(mixes[1], N_NEW, case.base.config.eos_token_id))
    # and each adapted row equals the library's own single-adapter generation (t5.generate on the
    # wrapped model, with the KV cache), run on that sequence alone
    one = jax.jit(functools.partial(t5.generate, case.model), static_argnames="max_new_tokens")
    for j, i in enumerate(mixes[1]):
        if i != multi.BASE:
            row = one(boft.combine(case.frozen, case.adapters[i]), case.input_ids[j : j + 1], case.mask[j : j + 1], max_new_tokens=N_NEW)
            np.testing.assert_array_equal(outs[1][j], row[0])

    with pytest.raises(TypeError, match=r"expects the wrapped model of an encoder-decoder .*got T5$"):
        multi.generate_multi(case.base, case.frozen, case.stacked, jnp.asarray(mixes[1]), case.input_ids, case.mask, max_new_tokens=N_NEW)
    with pytest.raises(ValueError, match=r"adapter_ids\[2\] = 5"):
        multi.generate_multi(
            case.model, case.frozen, case.stacked, jnp.array([0, 1, 5, 0, 0]), case.input_ids, case.mask, max_new_tokens=N_NEW
        )
    # Traced ids (what runs under the user's jit; the same compiled program as above): the invalid
    # row is all INVALID_TOKEN, the others are unaffected.
    eos = jnp.atleast_1d(jnp.asarray(case.base.config.eos_token_id, jnp.int32))
    cfg = case.base.config
    out = multi._generate_multi_jit(
        case.frozen, case.stacked, jnp.array([1, -1, 7, 0, 1], jnp.int32), case.input_ids, case.mask, eos,
        model=case.model, max_new_tokens=N_NEW, pad=cfg.pad_token_id, start=cfg.decoder_start_token_id,
    )
    assert multi._generate_multi_jit._cache_size() - before <= 1
    out = np.asarray(out)
    assert (out[2] == multi.INVALID_TOKEN).all()
    np.testing.assert_array_equal(np.delete(out, 2, 0), np.delete(np.asarray(outs[1]), 2, 0))
    # max_new_tokens = 0, as T5.generate: the decoder start token alone, in every row
    zero = multi.generate_multi(case.model, case.frozen, case.stacked, jnp.asarray(mixes[1]), case.input_ids, case.mask,
                                max_new_tokens=0)
    single = one(boft.combine(case.frozen, case.adapters[1]), case.input_ids[:1], case.mask[:1], max_new_tokens=0)
    assert zero.shape == (5, 1) and single.shape == (1, 1)
    np.testing.assert_array_equal(zero, np.full((5, 1), single[0, 0]))
    for bad in (-1, 2.0, True):
        with pytest.raises(ValueError, match=r"max_new_tokens must be an int >= 0"):
            multi.generate_multi(case.model, case.frozen, case.stacked, jnp.asarray(mixes[1]), case.input_ids, case.mask,
                                 max_new_tokens=bad)
