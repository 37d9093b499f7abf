"""boft_jax.sharding on this process's devices: mesh specs and their errors.  (Sharded training on 8
fake devices, the FSDP / tensor-parallel split and the refusal of meshes that cannot split the
weights: tests/test_finetune.py, in a subprocess.)"""

import re

import jax
import numpy as np
import pytest

from boft_jax import sharding as sh


def test_mesh_specs_string_and_mapping():
    n = jax.device_count()
    for spec in (f"data={n}", {"data": n}, {"data": n, "model": 1}):
        mesh = sh.make_mesh(spec)
        assert mesh.shape["data"] == n
    assert sh.parse_mesh(" data=2 , model=4 ") == {"data": 2, "model": 4}


@pytest.mark.parametrize(
    "spec,fragment",
    [
        ({"foo": 1}, "expected axes ('data', 'model')"),
        ({"data": -2, "model": -4}, "positive integer sizes"),
        ({"data": 2.0}, "positive integer sizes"),
        ({"data": True}, "positive integer sizes"),
        ({}, "positive integer sizes"),
        ("data=²", "SIZE a positive integer"),
        ("data=0", "SIZE a positive integer"),
        ("pipeline=1", "AXIS in ('data', 'model')"),
        ("data=1,data=1", "given twice"),
        ("", "empty mesh spec"),
    ],
)
def test_bad_mesh_specs_are_named(spec, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        sh.make_mesh(spec)


def test_repeated_devices_and_unbatched_arrays_are_refused():
    d = jax.devices()[0]
    with pytest.raises(ValueError, match="a device more than once"):
        sh.make_mesh("data=2", devices=[d, d])
    mesh = sh.make_mesh(f"data={jax.device_count()}")
    with pytest.raises(ValueError, match="leading batch axis"):
        sh.batch_sharding(mesh, 0)
    assert tuple(sh.batch_sharding(mesh, 3).spec) == ("data", None, None)


def test_no_devices_and_boxed_params_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="got no devices"):
        sh.make_mesh("data=1", devices=[])
    import flax.linen as nn

    class Boxed(nn.Module):
        @nn.compact
        def __call__(self, x):
            init = nn.with_partitioning(nn.initializers.lecun_normal(), (None, "model"))
            return nn.Dense(64, kernel_init=init, name="d")(x)

    params = Boxed().init(jax.random.key(0), jax.numpy.ones((1, 64)))["params"]
    mesh = sh.make_mesh("data=1", jax.devices()[:1])
    for fn in (sh.frozen_sharding, sh.shard_frozen):
        with pytest.raises(TypeError, match=r"1 boxed value\(s\) \(Partitioned at \['d'\]\['kernel'\]\).*flax.linen.unbox"):
            fn(params, mesh)
    assert tuple(sh.frozen_sharding(nn.unbox(params), mesh)["d"]["kernel"].spec) == (None, None)


def test_gather_to_host_gives_numpy():
    tree = {"a": jax.numpy.arange(6.0).reshape(2, 3), "b": [jax.numpy.ones(2)]}
    out = sh.gather_to_host(tree)
    assert isinstance(out["a"], np.ndarray) and out["a"].shape == (2, 3)
    np.testing.assert_array_equal(out["b"][0], np.ones(2))


def test_a_model_axis_that_splits_no_weight_is_refused():
    """``data=2,model=3`` over weights of even sizes: the data axis splits them, the model axis none
    (its devices would repeat each other's work); refused with ``strict``, kept replicated without.
    On 8 simulated devices, in a subprocess."""
    import subprocess
    import sys
    import textwrap

    from jobs import ROOT, job_env

    code = textwrap.dedent("""
        import jax, jax.numpy as jnp, numpy as np
        from boft_jax import sharding as sh
        frozen = {"a": {"kernel": jnp.zeros((64, 32))}, "b": {"kernel": jnp.zeros((32, 16))}}
        mesh = sh.make_mesh("data=2,model=3", jax.devices()[:6])
        try:
            sh.frozen_sharding(frozen, mesh, min_size=256)
            print("ACCEPTED")
        except ValueError as e:
            print("REFUSED", e)
        specs = sh.frozen_sharding(frozen, mesh, min_size=256, strict=False)
        print("LOOSE", tuple(specs["a"]["kernel"].spec), tuple(specs["b"]["kernel"].spec))
        ok = sh.frozen_sharding(frozen, sh.make_mesh("data=2,model=4", jax.devices()), min_size=256)
        print("SPLIT", tuple(ok["a"]["kernel"].spec), tuple(ok["b"]["kernel"].spec))
        three = sh.make_mesh("data=3", jax.devices()[:3])
        mixed = {"a": {"kernel": jnp.zeros((64, 32))}, "c": {"kernel": jnp.zeros((48, 10), jnp.bfloat16)}}
        # (7, 300): only the output axis divides; data=2,model=2 splits it over both (a quarter per device)
        tall = {"k": {"kernel": jnp.asarray(np.random.default_rng().normal(size=(7, 300)), jnp.float32)}}
        both = sh.make_mesh("data=2,model=2", jax.devices()[:4])
        placed = sh.shard_frozen(tall, both, min_size=256)
        x = np.random.default_rng().normal(size=(6, 7)).astype(np.float32)
        got = jax.jit(lambda p, x: x @ p["k"]["kernel"])(placed, x)
        print("BOTH", tuple(placed["k"]["kernel"].sharding.spec), max(sh.bytes_per_device(placed).values()),
              float(np.abs(np.asarray(got) - x @ np.asarray(tall["k"]["kernel"])).max()))
        print("WHOLE", sh.unsplit_weights(mixed, three, min_size=256), sh.unsplit_weights(mixed, sh.make_mesh("data=2,model=4", jax.devices()), min_size=256))
        # devices as a 2-D array (as jax.experimental.mesh_utils.create_device_mesh gives), taken row-major
        grid = np.asarray(jax.devices()[::-1], dtype=object).reshape(2, 4)
        m2 = sh.make_mesh("data=4,model=2", grid)
        print("GRID", dict(m2.shape), [d.id for d in m2.devices.reshape(-1)] == [d.id for d in grid.reshape(-1)])
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=job_env(8, fast_compile=True),
                       cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "REFUSED mesh {'data': 2, 'model': 3}: the model axis (size 3) splits none of the 2 frozen weight(s)" in r.stdout, r.stdout
    assert "a/kernel (64, 32)" in r.stdout
    assert "LOOSE ('data', None) ('data', None)" in r.stdout, r.stdout
    assert "SPLIT ('data', 'model') ('data', 'model')" in r.stdout, r.stdout
    both = re.search(r"BOTH \(None, \('model', 'data'\)\) (\d+) (\S+)", r.stdout)
    assert both, r.stdout
    assert int(both.group(1)) == 7 * 300 * 4 // 4 and float(both.group(2)) < 1e-5
    # what strict=False leaves whole on every device, with its bytes: (64, 32) has no axis divisible by 3
    assert "WHOLE [('a/kernel (64, 32)', 8192)] []" in r.stdout, r.stdout
    assert "GRID {'data': 4, 'model': 2} True" in r.stdout, r.stdout
