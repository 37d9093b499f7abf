"""The main job: end to end, sharding on 8 simulated devices, crash-safe resume, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from train import finetune

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--steps", "30", "--eval-every", "0", "--save-every", "10", "--no-progress", "--batch-size", "32"]


def _env(devices: int | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2")
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


# ---------------------------------------------------------------------------------------------
# Bad input: one clear line, exit status 2, nothing written
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra,fragment",
    [
        (["--checkpoint", "/nonexistent/ckpt"], "--checkpoint /nonexistent/ckpt: not a directory"),
        (["--data", "/nonexistent/data.npz"], "--data /nonexistent/data.npz"),
        (["--block-size", "7"], "is odd"),
        (["--block-size", "7", "--factors", "1"], "does not fit"),
        (["--factors", "9"], "does not fit"),
        (["--mesh", "data=3"], "--mesh"),
        (["--mesh", "pipeline=1"], "--mesh"),
        (["--batch-size", "5000"], "exceeds"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message_and_writes_nothing(tmp_path, capsys, extra, fragment):
    out = tmp_path / "run"
    assert finetune.main(["--output", str(out), *SMALL, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and fragment in err, err
    assert not out.exists()


def test_existing_run_is_not_overwritten_without_consent(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "keep.txt").write_text("x")
    assert finetune.main(["--output", str(out), *SMALL]) == 2
    assert "--resume" in capsys.readouterr().err
    assert (out / "adapter" / "keep.txt").read_text() == "x"


def test_help_lists_the_options():
    r = subprocess.run([sys.executable, "-m", "train.finetune", "--help"], capture_output=True, text=True, env=_env(), cwd=ROOT)
    assert r.returncode == 0
    for opt in ("--model", "--checkpoint", "--data", "--block-size", "--factors", "--targets", "--mesh", "--resume", "--precision"):
        assert opt in r.stdout


# ---------------------------------------------------------------------------------------------
# End to end on the bundled default
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_default_vit_job_end_to_end(tmp_path):
    import boft_jax as boft
    from boft_jax.checkpoint import load_adapter
    from boft_jax.models import from_pretrained
    from train.data import FINETUNE_CLASSES, digits

    out = tmp_path / "run"
    res = finetune.run(["--output", str(out), "--steps", "120", "--eval-every", "60", "--no-progress"])
    assert res["trainable"] / res["base"] < 0.02
    assert res["acc_before"] < 0.2 < 0.8 < res["acc_after"]  # new classes: from nothing to most
    for f in ("metrics.jsonl", "curves.png", "summary.md", "adapter", "merged/config.json", "merged/model.safetensors"):
        assert (out / f).exists(), f
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_accuracy" in r for r in rows) and rows[0]["loss"] > rows[-2]["loss"]
    # the saved adapter reproduces the run; the merged HF directory equals the wrapped model
    adapter, config, meta = load_adapter(out / "adapter")
    module, base = from_pretrained(meta["base_checkpoint"])
    merged_module, merged = from_pretrained(out / "merged")
    x = digits(FINETUNE_CLASSES).test.inputs["pixel_values"][:32]
    wrapped = boft.wrap(module, config).apply({"params": boft.combine(base, adapter)}, x)
    np.testing.assert_allclose(merged_module.apply({"params": merged}, x), wrapped, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Sharding on 8 simulated CPU devices
# ---------------------------------------------------------------------------------------------
SHARDED_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    import boft_jax as boft
    from boft_jax import sharding as sh
    from boft_jax.models import vit
    from train import loop, vit_task, make_base
    from train.data import digits, FINETUNE_CLASSES

    assert jax.device_count() == 8, jax.devices()
    module, params = vit.from_pretrained(make_base.VIT_BASE)
    cfg = boft.BOFTConfig(block_size=4, n_factors=2, targets=vit.TARGET_PRESETS["all_linear"], modules_to_save="classifier")
    model = boft.wrap(module, cfg)
    data = digits(FINETUNE_CLASSES)
    adapter = boft.init_adapter(model, params, *vit_task.example_inputs(data))
    frozen, _ = boft.split(boft.combine(params, adapter), cfg)
    out = {}
    for name, mesh in [("single", sh.make_mesh("data=1", jax.devices()[:1])),
                       ("fsdp", sh.make_mesh("data=8")), ("tp", sh.make_mesh("model=8")),
                       ("both", sh.make_mesh("data=2,model=4"))]:
        task = vit_task.make_task(model, frozen, adapter, data)
        opts = loop.TrainOptions(steps=20, batch_size=32, eval_every=0, save_every=1000, mesh=mesh, progress=False)
        res = loop.fit(task, opts, sys.argv[1] + "/" + name)
        sharded = sh.shard_frozen(frozen, mesh)
        per_dev = sh.bytes_per_device(sharded)
        out[name] = {"losses": res["losses"], "max_bytes": max(per_dev.values()), "n_dev": len(per_dev),
                     "adapter": [np.asarray(l).tolist() for l in jax.tree.leaves(res["adapter"])[:2]]}
    out["total_bytes"] = sum(np.asarray(l).nbytes for l in jax.tree.leaves(frozen))
    print("RESULT" + json.dumps(out))
    """
)


@pytest.mark.slow
def test_sharded_training_matches_single_device_and_splits_the_weights(tmp_path):
    r = subprocess.run(
        [sys.executable, "-c", SHARDED_SCRIPT, str(tmp_path)], capture_output=True, text=True, env=_env(8), cwd=ROOT, timeout=900
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.split("RESULT", 1)[1])
    single = np.asarray(res["single"]["losses"])
    assert len(single) >= 3 and single[0] > single[-1]
    total = res["total_bytes"]
    assert res["single"]["max_bytes"] == total
    for name in ("fsdp", "tp", "both"):
        np.testing.assert_allclose(res[name]["losses"], single, rtol=1e-5, atol=1e-5, err_msg=name)
        assert res[name]["n_dev"] == 8
        # about 1/8 of the base weights per device (norms, biases and tiny leaves stay replicated)
        assert res[name]["max_bytes"] < 0.2 * total, (name, res[name]["max_bytes"] / total)


# ---------------------------------------------------------------------------------------------
# Crash safety
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigkill_then_resume_finishes_with_the_same_adapter(tmp_path):
    args = ["--steps", "40", "--save-every", "10", "--eval-every", "0", "--no-progress", "--batch-size", "32", "--seed", "3"]
    ref = finetune.run(["--output", str(tmp_path / "ref"), *args])["adapter"]

    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "train.finetune", "--output", str(out), *args],
        env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 600
    ckpts = out / "checkpoints"
    while time.time() < deadline:
        steps = [int(p.name) for p in ckpts.glob("[0-9]*") if p.name.isdigit()] if ckpts.exists() else []
        if steps and max(steps) >= 20:
            break
        if proc.poll() is not None:
            pytest.fail("training finished before it could be killed")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "adapter").exists()  # it really died before the end

    resumed = finetune.run(["--output", str(out), "--resume", *args])["adapter"]
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(resumed)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


def test_interrupted_step_checkpoint_never_replaces_the_last_good_one(tmp_path):
    import jax.numpy as jnp

    from boft_jax.checkpoint import TrainCheckpointer

    adapter = {"l": {"kernel": {"skew": jnp.arange(6.0).reshape(1, 1, 6), "scale": jnp.ones(3)}}}
    opt_state = (jnp.zeros(3), {"mu": jnp.ones(2)})
    ck = TrainCheckpointer(tmp_path, save_every=1, async_save=False)
    ck.save(10, adapter, opt_state, {"step": 10})
    ck.close()
    # a save of step 20 that died mid-write: orbax's temporary directory, half written
    partial = tmp_path / "20.orbax-checkpoint-tmp-1234567"
    (partial / "adapter").mkdir(parents=True)
    (partial / "adapter" / "garbage").write_bytes(b"\x00" * 100)
    ck = TrainCheckpointer(tmp_path, save_every=1, async_save=False)
    step, a, o, state = ck.restore_latest(adapter, opt_state)
    assert step == 10 and state["step"] == 10
    np.testing.assert_array_equal(a["l"]["kernel"]["skew"], adapter["l"]["kernel"]["skew"])
    ck.close()


def test_save_adapter_crash_mid_replace_keeps_a_loadable_checkpoint(tmp_path, monkeypatch):
    import jax.numpy as jnp

    import boft_jax as boft
    from boft_jax import checkpoint as ck

    cfg = boft.BOFTConfig(block_size=4)
    old = {"l": {"kernel": {"skew": jnp.ones((1, 2, 6)), "scale": jnp.ones(4)}}}
    new = {"l": {"kernel": {"skew": 2 * jnp.ones((1, 2, 6)), "scale": jnp.ones(4)}}}
    path = tmp_path / "adapter"
    ck.save_adapter(path, old, cfg)

    real_replace, calls = os.replace, []

    def crash_on_second(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated crash between the two renames")
        return real_replace(src, dst)

    monkeypatch.setattr(ck.os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        ck.save_adapter(path, new, cfg)
    monkeypatch.setattr(ck.os, "replace", real_replace)
    assert not path.exists()  # the crash hit between moving the old one aside and moving the new one in
    # loading puts the last good checkpoint back
    assert float(ck.load_adapter(path)[0]["l"]["kernel"]["skew"].max()) == 1.0
    # and a crash before any rename leaves the last good checkpoint in place
    ck.save_adapter(path, old, cfg)
    monkeypatch.setattr(ck.os, "replace", lambda s, d: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        ck.save_adapter(path, new, cfg)
    monkeypatch.setattr(ck.os, "replace", real_replace)
    assert float(ck.load_adapter(path)[0]["l"]["kernel"]["skew"].max()) == 1.0
