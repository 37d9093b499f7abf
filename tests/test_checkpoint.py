"""boft_jax.checkpoint.save_adapter / load_adapter: round trips, damaged files, bad metadata, and
configs that do not describe their arrays.  (Crash safety of the training checkpoints and of a
replacement interrupted between its renames: tests/test_finetune.py.)"""

import dataclasses
import json
import os
import shutil
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import boft_jax as boft
from boft_jax import checkpoint as ck

CFG = boft.BOFTConfig(block_size=4, n_factors=2, targets="l", bias="boft_only")  # _adapter trains l's bias
# orbax's reader threads, stopped by a damaged file, report "Event loop is closed" later, during
# garbage collection; the load itself has raised our ValueError by then
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _adapter(seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return {
        "l": {"kernel": {"skew": jnp.asarray(rng.standard_normal((2, 4, 6)), dtype),
                         "scale": jnp.asarray(1 + 0.1 * rng.standard_normal(16), dtype)},
              "bias": jnp.asarray(rng.standard_normal(16), dtype)},
    }


def _save_killed_between_renames(monkeypatch, path, adapter):
    """``save_adapter(path, adapter)`` dying after the old checkpoint moved aside, before the new one
    is renamed into place (as a kill -9 there would)."""
    real_replace = os.replace

    def dying_replace(src, dst):
        if ".tmp-" in str(src) and str(dst) == str(path):
            raise KeyboardInterrupt("killed between the renames")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        ck.save_adapter(path, adapter, CFG)
    monkeypatch.setattr(os, "replace", real_replace)


def _leftovers(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_round_trip_is_exact_with_checksums_and_metadata(tmp_path, dtype):
    adapter = _adapter(1, dtype)
    ck.save_adapter(tmp_path / "a", adapter, CFG, metadata={"note": "x", "acc": 0.5, "nested": {"k": [1, 2]}})
    got, cfg, meta = ck.load_adapter(tmp_path / "a")
    assert cfg == CFG and meta == {"note": "x", "acc": 0.5, "nested": {"k": [1, 2]}}
    for a, b in zip(jax.tree.leaves(adapter), jax.tree.leaves(got)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    stored = json.loads((tmp_path / "a" / "meta" / "metadata").read_text())
    assert set(stored["checksums"]) == {"['l']['bias']", "['l']['kernel']['scale']", "['l']['kernel']['skew']"}


def test_leaves_the_config_does_not_train_are_refused(tmp_path):
    """A bias the config's bias mode does not train, or a module outside modules_to_save, would be
    dropped by boft.split(params, config) on resume: saving such a pair is an error naming them."""
    rng = np.random.default_rng()
    head = {"kernel": jnp.asarray(rng.standard_normal((16, 3)), jnp.float32),
            "bias": jnp.asarray(rng.standard_normal(3), jnp.float32)}
    adapter = {**_adapter(), "head": head}
    for cfg, named in [(dataclasses.replace(CFG, bias="none"), r"\['head/bias', 'head/kernel', 'l/bias'\]"),
                       (CFG, r"\['head/bias', 'head/kernel'\]"),
                       (dataclasses.replace(CFG, bias="all", modules_to_save="other"), r"\['head/kernel'\]")]:
        with pytest.raises(ValueError, match=rf"leaf/leaves its config does not train, e.g. {named}.*bias=") as e:
            ck.save_adapter(tmp_path / "refused", adapter, cfg)
        assert not (tmp_path / "refused").exists()
        # a kernel among them: the tree may be the whole params, and the fix is to save the adapter alone
        assert "save the adapter alone: boft.split(params, config)[1]" in str(e.value)
    with pytest.raises(ValueError, match=r"e.g. \['l/bias'\]") as e:  # only a bias: not the whole params
        ck.save_adapter(tmp_path / "refused", _adapter(), dataclasses.replace(CFG, bias="none"))
    assert "boft.split(params, config)[1]" not in str(e.value)
    ck.save_adapter(tmp_path / "a", adapter, dataclasses.replace(CFG, modules_to_save="head"))
    got, cfg, _ = ck.load_adapter(tmp_path / "a")
    np.testing.assert_array_equal(got["head"]["kernel"], head["kernel"])
    assert cfg.saves_module("head") and cfg.bias == "boft_only"


def test_a_damaged_array_file_is_an_error_not_garbage(tmp_path):
    ck.save_adapter(tmp_path / "a", _adapter(), CFG)
    files = [p for p in (tmp_path / "a" / "adapter").rglob("*") if p.is_file() and "/d/" in str(p)]
    assert files, sorted((tmp_path / "a").rglob("*"))
    for f in files:  # one flipped byte in the middle of every data file
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"(do not match the checksums|damaged or incomplete)"):
        ck.load_adapter(tmp_path / "a")


def test_arrays_swapped_from_another_save_are_detected(tmp_path):
    ck.save_adapter(tmp_path / "a", _adapter(1), CFG)
    ck.save_adapter(tmp_path / "b", _adapter(2), CFG)
    (tmp_path / "a" / "meta").rename(tmp_path / "meta_a")
    (tmp_path / "b" / "meta").rename(tmp_path / "a" / "meta")  # a's arrays with b's meta
    with pytest.raises(ValueError, match=r"3 array\(s\) do not match the checksums"):
        ck.load_adapter(tmp_path / "a")


@pytest.mark.parametrize(
    "metadata,error,fragment",
    [
        ({"x": np.float32(1.0)}, TypeError, "plain JSON"),
        ({"x": float("nan")}, TypeError, "plain JSON"),
        ({"x": object()}, TypeError, "plain JSON"),
        ([("a", 1)], TypeError, "must be a mapping"),
    ],
)
def test_bad_metadata_is_refused_before_anything_is_written(tmp_path, metadata, error, fragment):
    with pytest.raises(error, match=fragment):
        ck.save_adapter(tmp_path / "a", _adapter(), CFG, metadata=metadata)
    assert not (tmp_path / "a").exists() and _leftovers(tmp_path) == []


def test_empty_or_non_numeric_adapters_and_unfitting_configs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="no arrays"):
        ck.save_adapter(tmp_path / "a", {}, CFG)
    with pytest.raises(TypeError, match=r"\['l'\]\['name'\] is not a numeric array"):
        ck.save_adapter(tmp_path / "a", {"l": {"name": np.asarray(["x"])}}, CFG)
    with pytest.raises(ValueError, match=r"n_factors=1.*does not describe its arrays: l/kernel: blocks \(m=2, k=4, b=4\)"):
        ck.save_adapter(tmp_path / "a", _adapter(), boft.BOFTConfig(block_size=4, n_factors=1, targets="l"))
    assert not (tmp_path / "a").exists() and _leftovers(tmp_path) == []
    # a config edited (or damaged) on disk after saving: the load says so, by its checksum ...
    ck.save_adapter(tmp_path / "a", _adapter(), CFG, metadata={"note": "x"})
    meta_file = tmp_path / "a" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    for field, value in (("cayley", "neumann"), ("neumann_terms", meta["config"]["neumann_terms"] + 1),
                         ("block_size", 8)):
        edited = {**meta, "config": {**meta["config"], field: value}}
        meta_file.write_text(json.dumps(edited))
        with pytest.raises(ValueError, match=r"its meta entry \(the config and the arrays' checksums\) does not match"):
            ck.load_adapter(tmp_path / "a")
    meta_file.write_text(json.dumps({**meta, "metadata": {"note": "edited"}}))  # free-form notes are not summed
    assert ck.load_adapter(tmp_path / "a")[2] == {"note": "edited"}
    # ... and without one (a checkpoint written before it existed, or the entry removed): a warning
    # that nothing verifies the config, and what the arrays' shapes can tell
    meta.pop("meta_sha256")
    unsummed = {**meta, "config": {**meta["config"], "dropout": 0.5}}  # fits the arrays
    meta_file.write_text(json.dumps(unsummed))
    with pytest.warns(UserWarning, match=r"carries no checksum \('meta_sha256'.*save the adapter again"):
        assert ck.load_adapter(tmp_path / "a")[1].dropout == 0.5
    meta["config"]["block_size"] = 8
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"block_size=8.*does not describe its arrays"), pytest.warns(UserWarning):
        ck.load_adapter(tmp_path / "a")
    meta["config"]["block_size"] = 4
    for key, value, what in (("checksums", ["x"], "'checksums' is a list"), ("empty_leaves", "x", "'str' object"),
                             ("empty_leaves", {"['l']['bias']": 3}, "'int' object is not subscriptable")):
        meta_file.write_text(json.dumps({**meta, key: value}))
        with pytest.raises(ValueError, match=rf"meta entry's 'checksums' / 'empty_leaves' are malformed \({what}"), \
                pytest.warns(UserWarning):
            ck.load_adapter(tmp_path / "a")
    meta["config"] = None
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="no config object"), pytest.warns(UserWarning):
        ck.load_adapter(tmp_path / "a")
    meta_file.write_text("{not json")
    with pytest.raises(ValueError, match=r"damaged or incomplete adapter checkpoint"):
        ck.load_adapter(tmp_path / "a")


def test_reading_never_moves_a_checkpoint(tmp_path):
    """A reader that finds only the last good checkpoint of an interrupted replacement reads it in
    place (a writer may be between its renames right now)."""
    ck.save_adapter(tmp_path / "a", _adapter(3), CFG)
    old = tmp_path / ".a.old-deadbeef"
    os.replace(tmp_path / "a", old)
    with pytest.warns(UserWarning, match="interrupted"):
        got, _, _ = ck.load_adapter(tmp_path / "a")
    np.testing.assert_array_equal(got["l"]["bias"], _adapter(3)["l"]["bias"])
    assert old.is_dir() and not (tmp_path / "a").exists()


def test_stale_temporaries_files_and_symlinks(tmp_path):
    stale = tmp_path / ".a.tmp-0000abcd"  # what a crash before the first rename leaves
    stale.mkdir()
    (stale / "junk").write_text("x")
    ck.save_adapter(tmp_path / "a", _adapter(4), CFG)
    assert _leftovers(tmp_path) == []
    (tmp_path / "file").write_text("not a checkpoint")
    with pytest.raises(FileExistsError, match="exists and is not a directory"):
        ck.save_adapter(tmp_path / "file", _adapter(), CFG)
    assert (tmp_path / "file").read_text() == "not a checkpoint" and _leftovers(tmp_path) == []
    (tmp_path / "link").symlink_to(tmp_path / "a")
    ck.save_adapter(tmp_path / "link", _adapter(5), CFG)  # written through the link, which stays
    assert (tmp_path / "link").is_symlink() and _leftovers(tmp_path) == []
    np.testing.assert_array_equal(ck.load_adapter(tmp_path / "a")[0]["l"]["bias"], _adapter(5)["l"]["bias"])


def test_save_replaces_only_an_adapter_checkpoint_or_an_empty_directory(tmp_path):
    """Replacing deletes: a directory holding anything but an adapter checkpoint is refused and kept."""
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "important.py").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"project is a directory that is not a boft_jax adapter checkpoint.*\['src'\]"):
        ck.save_adapter(project, _adapter(1), CFG)
    assert (project / "src" / "important.py").read_text() == "keep me" and _leftovers(tmp_path) == []
    (tmp_path / "empty").mkdir()
    ck.save_adapter(tmp_path / "empty", _adapter(2), CFG)  # an empty directory: written
    ck.save_adapter(tmp_path / "empty", _adapter(3), CFG)  # an adapter checkpoint: replaced
    np.testing.assert_array_equal(ck.load_adapter(tmp_path / "empty")[0]["l"]["bias"], _adapter(3)["l"]["bias"])


def test_two_crashes_in_a_row_keep_the_last_good_checkpoint(tmp_path, monkeypatch):
    """(1) A save killed while deleting the replaced checkpoint, then (2) the next save killed
    between its two renames: the last good checkpoint (v2) is what loads and what comes back."""
    import shutil

    path = tmp_path / "a"
    ck.save_adapter(path, _adapter(1), CFG)
    real_rmtree = shutil.rmtree

    def dying_rmtree(p, *args, **kwargs):  # deletes the contents, dies before the directory itself
        if ".a." in str(p) and not str(p).startswith(str(tmp_path / ".a.tmp-")):
            for e in os.listdir(p):
                q = os.path.join(p, e)
                real_rmtree(q) if os.path.isdir(q) else os.remove(q)
            raise KeyboardInterrupt("killed while deleting")
        return real_rmtree(p, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", dying_rmtree)
    with pytest.raises(KeyboardInterrupt):
        ck.save_adapter(path, _adapter(2), CFG)
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    assert _leftovers(tmp_path) and all(".trash-" in n for n in _leftovers(tmp_path))  # never a half `.old-`

    _save_killed_between_renames(monkeypatch, path, _adapter(3))
    assert not path.exists()
    with pytest.warns(UserWarning, match="interrupted"):
        np.testing.assert_array_equal(ck.load_adapter(path)[0]["l"]["bias"], _adapter(2)["l"]["bias"])
    # a directory an older version left half-deleted, newer than the good one, is not taken for it
    half = tmp_path / ".a.old-0badc0de"
    half.mkdir()
    with pytest.warns(UserWarning, match="interrupted"):
        np.testing.assert_array_equal(ck.load_adapter(path)[0]["l"]["bias"], _adapter(2)["l"]["bias"])
    ck.save_adapter(path, _adapter(4), CFG)  # the next save recovers v2 first, then replaces it
    np.testing.assert_array_equal(ck.load_adapter(path)[0]["l"]["bias"], _adapter(4)["l"]["bias"])
    assert _leftovers(tmp_path) == []  # trash, temporaries and stale `.old-` all gone


def test_the_echo_filter_is_in_place_before_every_restore_starts(tmp_path, monkeypatch):
    """A failing read can echo through sys.unraisablehook while orbax's restore is still running, so
    the filter of those echoes is installed before each restore, not after it failed (it was: 1-3 of
    10 loads of a damaged step also printed a raw 'Event loop is closed' traceback)."""
    import optax

    monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)
    seen = []
    real = ck.ocp.Checkpointer.restore

    def restore(self, *args, **kwargs):
        seen.append(getattr(sys.unraisablehook, "_boft_quiet", False))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ck.ocp.Checkpointer, "restore", restore)
    ck.save_adapter(tmp_path / "a", _adapter(), CFG)
    ck.load_adapter(tmp_path / "a")
    assert seen == [True]
    monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)
    adapter = _adapter()
    opt_state = optax.adam(1e-3).init(adapter)
    tc = ck.TrainCheckpointer(tmp_path / "t", save_every=1, async_save=False)
    tc.save(1, adapter, opt_state, {"step": 1})
    real_restore = tc._restore
    monkeypatch.setattr(tc, "_restore", lambda *a: (seen.append(getattr(sys.unraisablehook, "_boft_quiet", False)),
                                                   real_restore(*a))[1])
    assert tc.restore_latest(adapter, opt_state)[0] == 1
    tc.close()
    assert len(seen) >= 2 and all(seen), seen


def test_train_checkpoint_with_a_damaged_array_is_an_error_not_garbage(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)
    import optax

    rng = np.random.default_rng(5)  # arrays large enough to be stored as they are (not inlined)
    adapter = {"l": {"kernel": {"skew": jnp.asarray(rng.standard_normal((2, 256, 6)), jnp.float32),
                                "scale": jnp.asarray(rng.standard_normal(1024), jnp.float32)}}}
    opt = optax.adam(1e-3)
    opt_state = opt.init(adapter)
    tc = ck.TrainCheckpointer(tmp_path, save_every=1, async_save=False)
    tc.save(1, adapter, opt_state, {"step": 1})
    tc.save(2, adapter, opt_state, {"step": 2})
    tc.close()
    tc = ck.TrainCheckpointer(tmp_path, save_every=1, async_save=False)
    step, a, _, state = tc.restore_latest(adapter, opt_state)  # intact: restored exactly
    assert step == 2 and state == {"step": 2}
    np.testing.assert_array_equal(a["l"]["kernel"]["skew"], adapter["l"]["kernel"]["skew"])
    tc.close()
    files = sorted((tmp_path / "2" / "adapter").glob("ocdbt.process_0/d/*"), key=lambda p: -p.stat().st_size)
    assert files, sorted(str(p) for p in (tmp_path / "2").rglob("*"))  # the array data files
    raw = bytearray(files[0].read_bytes())
    for i in range(len(raw) // 2, len(raw) // 2 + 4):
        raw[i] ^= 0x7F
    files[0].write_bytes(bytes(raw))
    tc = ck.TrainCheckpointer(tmp_path, save_every=1, async_save=False)
    with pytest.raises(ValueError, match=r"step 2 .*damaged.*step 1"):
        tc.restore_latest(adapter, opt_state)
    tc.close()
    for f in (tmp_path / "2" / "adapter").glob("ocdbt.process_0/d/*"):  # truncated files (a full disk, a partial copy)
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    tc = ck.TrainCheckpointer(tmp_path, save_every=1, async_save=False)
    with pytest.raises(ValueError, match=r"step 2 .*damaged or incomplete.*step 1"):  # orbax raises a bare Exception
        tc.restore_latest(adapter, opt_state)
    tc.close()
    assert getattr(sys.unraisablehook, "_boft_quiet", False)  # its late reads' echoes are dropped (test below)
    (tmp_path / "2" / "state" / "metadata").write_bytes(b"\x94 not json")  # a damaged JSON entry
    tc = ck.TrainCheckpointer(tmp_path, save_every=1, async_save=False)
    with pytest.raises(ValueError, match=r"step 2 .*damaged or incomplete"):
        tc.restore_latest(adapter, opt_state)
    tc.close()



def test_train_checkpoint_of_another_optimizer_is_named_not_called_damaged(tmp_path):
    """A step written with AdamW, restored into SGD with momentum or plain Adam state: the files are
    fine, so the error says the optimizer state differs (which leaves), not "damaged ... remove it"."""
    import optax

    rng = np.random.default_rng()
    adapter = {"l": {"kernel": {"skew": jnp.asarray(rng.standard_normal((2, 8, 6)), jnp.float32),
                                "scale": jnp.asarray(rng.standard_normal(32), jnp.float32)}}}
    written = optax.adamw(1e-3)
    tc = ck.TrainCheckpointer(tmp_path, save_every=1, async_save=False)
    tc.save(3, adapter, written.init(adapter), {"step": 3, "seed": 1})
    tc.close()
    tc = ck.TrainCheckpointer(tmp_path, save_every=1, async_save=False)
    assert tc.latest_state() == (3, {"step": 3, "seed": 1})  # the JSON state alone, no private keys
    for other in (optax.sgd(1e-3, momentum=0.9), optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)),
                  optax.adam(1e-3)):  # adam: adamw's leaves without its leafless entries
        with pytest.raises(ValueError, match=r"step 3 .* holds the state of another optimizer \(its files are intact\)"
                                             r".*Resume with the optimizer") as e:
            tc.restore_latest(adapter, other.init(adapter))
        assert "damaged" not in str(e.value)
    step, _, opt_state, _ = tc.restore_latest(adapter, written.init(adapter))  # the same optimizer: fine
    assert step == 3 and jax.tree.structure(opt_state) == jax.tree.structure(written.init(adapter))
    tc.close()
    assert ck.TrainCheckpointer(tmp_path / "none", save_every=1, async_save=False).latest_state() is None

def test_train_checkpoint_optimizer_class_and_json_state_are_checked(tmp_path):
    """Adam and AdaBelief states have the same leaves: the state classes tell them apart.  The JSON
    state carries its own checksum: an edited value or a damaged entry name is an error (it was
    restored as is, or turned the array checksums off).  A state that is not JSON fails at save()."""
    import optax

    rng = np.random.default_rng()
    adapter = {"l": {"kernel": {"skew": jnp.asarray(rng.standard_normal((2, 8, 6)), jnp.float32),
                                "scale": jnp.asarray(rng.standard_normal(32), jnp.float32)}}}
    tc = ck.TrainCheckpointer(tmp_path, save_every=1, async_save=False)
    tc.save(1, adapter, optax.adam(1e-3).init(adapter), {"step": 1, "data_position": 128})
    with pytest.raises(TypeError, match=r"the state must be JSON data .*int64"):
        tc.save(2, adapter, optax.adam(1e-3).init(adapter), {"step": np.int64(2)})
    with pytest.raises(ValueError, match=r"keys starting with '_' are reserved"):
        tc.save(2, adapter, optax.adam(1e-3).init(adapter), {"_checksums": 1})
    tc.close()
    assert not list(tmp_path.glob("2*"))
    tc = ck.TrainCheckpointer(tmp_path, save_every=1, async_save=False)
    with pytest.raises(ValueError, match=r"another optimizer .*ScaleByBeliefState") as e:
        tc.restore_latest(adapter, optax.adabelief(1e-3).init(adapter))
    assert "written with optax" not in str(e.value)  # same optax: no version hint
    assert tc.restore_latest(adapter, optax.adam(1e-3).init(adapter))[3] == {"step": 1, "data_position": 128}
    tc.close()
    file = tmp_path / "1" / "state" / "metadata"
    text = file.read_text()
    for damaged in (text.replace('"data_position": 128', '"data_position": 168'), text.replace('"_checksums"', '"_chec{sums"')):
        assert damaged != text
        file.write_text(damaged)
        tc = ck.TrainCheckpointer(tmp_path, save_every=1, async_save=False)
        with pytest.raises(ValueError, match=r"step 1 .*(does not match the checksum stored with it|unknown entries).*damaged"):
            tc.restore_latest(adapter, optax.adam(1e-3).init(adapter))
        with pytest.raises(ValueError, match=r"step 1 .*damaged") as e:
            tc.latest_state()
        assert str(e.value).count("Remove ") == 1 and "_StepError" not in str(e.value)  # said once, not wrapped again
        tc.close()


def test_an_optimizer_state_from_another_optax_version_is_said_to_be_possibly_that(tmp_path, monkeypatch):
    import optax

    rng = np.random.default_rng()
    adapter = {"l": {"kernel": {"skew": jnp.asarray(rng.standard_normal((2, 8, 6)), jnp.float32),
                                "scale": jnp.asarray(rng.standard_normal(32), jnp.float32)}}}
    monkeypatch.setattr(ck, "_optax_version", lambda: "0.0.1")  # as if written by another optax
    tc = ck.TrainCheckpointer(tmp_path, save_every=1, async_save=False)
    tc.save(1, adapter, optax.adam(1e-3).init(adapter), {"step": 1})
    tc.close()
    monkeypatch.undo()
    tc = ck.TrainCheckpointer(tmp_path, save_every=1, async_save=False)
    with pytest.raises(ValueError, match=r"another optimizer .*written with optax 0\.0\.1 and this is optax"
                                         r" \S+: .*pip install optax==0\.0\.1"):
        tc.restore_latest(adapter, optax.adabelief(1e-3).init(adapter))
    assert tc.restore_latest(adapter, optax.adam(1e-3).init(adapter))[3] == {"step": 1}  # same classes: fine
    tc.close()


def test_block_size_one_layers_zero_size_skews_save_and_restore(tmp_path):
    """A layer with block size 1 (PEFT's OFT adjusts r to d_in on narrow layers) has a zero-size
    skew, which orbax cannot store; adapter and training checkpoints keep it (shape and dtype) next
    to the other leaves, which come back exactly."""
    import optax

    rng = np.random.default_rng(7)
    cfg = boft.BOFTConfig(block_size=4, targets=("l", "narrow"), block_size_overrides={"narrow": 1})
    adapter = {
        "l": {"kernel": {"skew": jnp.asarray(rng.standard_normal((1, 4, 6)), jnp.float32),
                         "scale": jnp.asarray(1 + 0.1 * rng.standard_normal(16), jnp.float32)}},
        "narrow": {"kernel": {"skew": jnp.zeros((1, 4, 0), jnp.float32),
                              "scale": jnp.asarray(1 + 0.1 * rng.standard_normal(5), jnp.float32)}},
    }
    ck.save_adapter(tmp_path / "a", adapter, cfg)
    got, got_cfg, _ = ck.load_adapter(tmp_path / "a")
    assert got_cfg == cfg
    assert jax.tree.structure(got) == jax.tree.structure(adapter)
    for a, b in zip(jax.tree.leaves(adapter), jax.tree.leaves(got)):
        assert (a.shape, a.dtype) == (b.shape, b.dtype)
        np.testing.assert_array_equal(a, b)
    stored = json.loads((tmp_path / "a" / "meta" / "metadata").read_text())
    assert stored["empty_leaves"] == {"['narrow']['kernel']['skew']": [[1, 4, 0], "float32"]}

    opt = optax.adam(1e-2)
    opt_state = opt.init(adapter)
    grads = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), adapter)
    updates, opt_state = opt.update(grads, opt_state, adapter)
    adapter = optax.apply_updates(adapter, updates)
    tc = ck.TrainCheckpointer(tmp_path / "train", save_every=1, async_save=False)
    tc.save(1, adapter, opt_state, {"step": 1})
    tc.close()
    tc = ck.TrainCheckpointer(tmp_path / "train", save_every=1, async_save=False)
    fresh = jax.tree.map(jnp.zeros_like, adapter)
    step, a, o, state = tc.restore_latest(fresh, opt.init(fresh))
    tc.close()
    assert (step, state) == (1, {"step": 1})
    for want, have in ((adapter, a), (opt_state, o)):
        assert jax.tree.structure(have) == jax.tree.structure(want)
        for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(have)):
            assert (x.shape, x.dtype) == (y.shape, y.dtype)
            np.testing.assert_array_equal(x, y)


def test_a_replaced_checkpoint_that_cannot_be_deleted_is_named_and_a_file_in_the_path_is_refused(tmp_path, monkeypatch):
    """Overwriting: the old copy is renamed, then deleted; when deletion fails (permissions, a busy
    file system) the new checkpoint is still complete and a warning names the copy left on disk.
    A path under a file is refused with a message naming the file, before anything is written."""
    path = tmp_path / "ckpt"
    ck.save_adapter(path, _adapter(1), CFG)

    real_rmtree = shutil.rmtree

    def failing_rmtree(p, *args, **kwargs):  # what rmtree does when the files are not ours to delete
        handler = kwargs.get("onexc") or kwargs.get("onerror")
        if handler is None or ".trash-" not in str(p):  # anyone else's call (orbax's) works as usual
            return real_rmtree(p, *args, **kwargs)
        handler(os.unlink, str(p), PermissionError(13, "Permission denied") if "onexc" in kwargs
                else (PermissionError, PermissionError(13, "Permission denied"), None))

    monkeypatch.setattr(ck.shutil, "rmtree", failing_rmtree)
    with pytest.warns(UserWarning, match=r"could not delete .*\.ckpt\.trash-.*Permission denied.*new checkpoint is complete"):
        ck.save_adapter(path, _adapter(2), CFG, overwrite=True)
    monkeypatch.undo()
    np.testing.assert_array_equal(ck.load_adapter(path)[0]["l"]["bias"], _adapter(2)["l"]["bias"])
    ck.save_adapter(path, _adapter(3), CFG, overwrite=True)  # the next save removes the leftover
    assert _leftovers(tmp_path) == []
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"afile is a file; an adapter checkpoint is a directory"):
        ck.save_adapter(tmp_path / "afile" / "sub" / "ckpt", _adapter(1), CFG)
    assert (tmp_path / "afile").read_text() == "x"



def test_a_config_that_does_not_select_the_stored_layers_is_refused(tmp_path):
    """save_adapter with a config whose targets miss a stored layer: a model wrapped with it would not
    adapt that layer (the mismatch would surface only at apply time); refused, naming the layer."""
    wrong = boft.BOFTConfig(block_size=4, n_factors=2, targets="nothing")
    with pytest.raises(ValueError, match=r"does not describe its arrays: layer 'l' is not selected by its targets \('nothing',\)"):
        ck.save_adapter(tmp_path / "a", _adapter(1), wrong)
    excluded = boft.BOFTConfig(block_size=4, n_factors=2, targets=".*", exclude="l")
    with pytest.raises(ValueError, match=r"layer 'l' is not selected"):
        ck.save_adapter(tmp_path / "a", _adapter(1), excluded)
    assert not (tmp_path / "a").exists()


def test_train_checkpoint_restored_into_other_dtypes_is_named_not_called_damaged(tmp_path):
    """A bf16 adapter step restored into float32 like-trees: the files are fine (orbax would cast and
    the checksums then differ), so the error names the dtypes, not "damaged ... remove it"."""
    import optax

    rng = np.random.default_rng()
    adapter = {"l": {"kernel": {"skew": jnp.asarray(rng.standard_normal((2, 8, 6)), jnp.bfloat16),
                                "scale": jnp.asarray(rng.standard_normal(32), jnp.bfloat16)}}}
    opt = optax.adam(1e-3)
    tc = ck.TrainCheckpointer(tmp_path, save_every=1, async_save=False)
    tc.save(2, adapter, opt.init(adapter), {"step": 2})
    as_f32 = jax.tree.map(lambda a: a.astype(jnp.float32), adapter)
    with pytest.raises(ValueError, match=r"holds adapter leaves of other dtypes \(its files are intact\).*stored bfloat16,"
                                         r" expected float32") as e:
        tc.restore_latest(as_f32, opt.init(adapter))
    assert "damaged" not in str(e.value)
    step, restored, _, _ = tc.restore_latest(adapter, opt.init(adapter))
    assert step == 2 and restored["l"]["kernel"]["skew"].dtype == jnp.bfloat16
    tc.close()


def test_names_with_glob_characters_recover_only_their_own_leftovers(tmp_path, monkeypatch):
    """Leftovers are matched by the literal name: 'exp?' never takes exp1's last good copy (a glob
    would, and the next save of 'exp?' deleted it)."""
    exp1 = tmp_path / "exp1"
    ck.save_adapter(exp1, _adapter(1), CFG)
    _save_killed_between_renames(monkeypatch, exp1, _adapter(2))
    with pytest.raises(FileNotFoundError):
        ck.load_adapter(tmp_path / "exp?")
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"notes.md is a file, not an adapter checkpoint directory"):
        ck.load_adapter(tmp_path / "notes.md")
    ck.save_adapter(tmp_path / "exp?", _adapter(3), CFG)
    np.testing.assert_array_equal(ck.load_adapter(tmp_path / "exp?")[0]["l"]["bias"], _adapter(3)["l"]["bias"])
    with pytest.warns(UserWarning, match="interrupted"):  # exp1's last good copy is still there
        np.testing.assert_array_equal(ck.load_adapter(exp1)[0]["l"]["bias"], _adapter(1)["l"]["bias"])


def test_paths_orbax_cannot_read_back_are_refused_before_writing(tmp_path):
    for bad in (tmp_path / "run[1]", tmp_path / "sub[x]" / "a", tmp_path / "a\\b"):
        with pytest.raises(ValueError, match="cannot read back a checkpoint whose path contains"):
            ck.save_adapter(bad, _adapter(1), CFG)
        assert not bad.exists()
        with pytest.raises(ValueError, match="cannot read back"):
            ck.TrainCheckpointer(bad, save_every=1)
    for ok in (tmp_path / "a[", tmp_path / "b]", tmp_path / "c{d}", tmp_path / "e[]", tmp_path / "f[" / "g]"):  # fine
        ck.save_adapter(ok, _adapter(1), CFG)
        np.testing.assert_array_equal(ck.load_adapter(ok)[0]["l"]["bias"], _adapter(1)["l"]["bias"])


def test_a_failed_restore_drops_only_the_echoes_of_its_abandoned_reads(monkeypatch):
    """After a failed orbax restore (one clear error), tensorstore reads still in flight fail later and
    print one traceback each through sys.unraisablehook ("Event loop is closed", orbax coroutines never
    awaited): hundreds of lines after the error.  The hook installed then drops those, and only those."""
    import types

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u.exc_value))
    ck._quiet_abandoned_reads()
    ck._quiet_abandoned_reads()  # installed once

    def call_soon_threadsafe():  # where a late read meets orbax's closed event loop
        raise RuntimeError("Event loop is closed")

    def unraisable(fn):
        try:
            fn()
        except Exception as e:
            return types.SimpleNamespace(exc_type=type(e), exc_value=e, exc_traceback=e.__traceback__,
                                         err_msg=None, object=None)

    def other():
        raise RuntimeError("Event loop is closed")  # not from a late callback: kept

    def unrelated():
        raise ValueError("something else")

    ns = {}  # a read of orbax's serialization module that failed after the restore gave up
    exec(compile("def read():\n    raise Exception('Encountered error while reading array index: ()')\n",
                 "/site-packages/orbax/checkpoint/_src/serialization/serialization.py", "exec"), ns)
    for fn in (call_soon_threadsafe, ns["read"], other, unrelated):
        sys.unraisablehook(unraisable(fn))
    assert [str(e) for e in seen] == ["Event loop is closed", "something else"]


def test_train_checkpointer_refuses_bad_arguments_with_what_would_do(tmp_path):
    import optax

    afile = tmp_path / "a-file"
    afile.write_text("x")
    with pytest.raises(ValueError, match=r"a-file is a file, not a directory;"):
        ck.TrainCheckpointer(afile)
    with pytest.raises(ValueError, match=r"a-file is a file, not a directory \(on the path .*a-file/sub/ckpts\)"):
        ck.TrainCheckpointer(afile / "sub" / "ckpts")
    for name, bad in (("save_every", 2.5), ("save_every", True), ("keep", 0), ("keep", "3")):
        with pytest.raises(ValueError, match=rf"{name} must be an integer >= 1, got {bad!r}"):
            ck.TrainCheckpointer(tmp_path / "c", **{name: bad})
    tc = ck.TrainCheckpointer(tmp_path / "c", save_every=np.int64(2), keep=jnp.asarray(3), async_save=False)
    adapter = _adapter()
    opt_state = optax.adam(1e-3).init(adapter)
    for bad in (-1, 1.0, True, np.float32(2), jnp.asarray(2.0), jnp.asarray([2])):
        with pytest.raises(ValueError, match=r"step must be an integer >= 0, got"):
            tc.save(bad, adapter, opt_state, {})
    assert tc.save(np.int32(2), adapter, opt_state, {"v": 1})
    assert tc.save(jnp.asarray(4), adapter, opt_state, {"v": 4})  # a flax TrainState.step is a 0-d array
    assert tc.all_steps() == [2, 4]
    # a saved step is not replaced, also with force (documented); the first values stay
    assert not tc.save(2, jax.tree.map(lambda a: a + 1, adapter), opt_state, {"v": 2}, force=True)
    tc.wait()
    step, restored, _, state = tc.restore_latest(adapter, opt_state)
    tc.close()
    assert (step, state) == (4, {"v": 4})
    np.testing.assert_array_equal(restored["l"]["bias"], adapter["l"]["bias"])


def test_a_stored_exact_config_with_series_terms_loads_without_the_warning(tmp_path):
    """neumann_terms with cayley='exact' warns when a config is made; a checkpoint of such a config
    is rebuilt as saved, without warning again on every load."""
    with pytest.warns(UserWarning, match="has no effect with cayley='exact'"):
        cfg = dataclasses.replace(CFG, neumann_terms=3)
    ck.save_adapter(tmp_path / "a", _adapter(), cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ck.load_adapter(tmp_path / "a")[1] == cfg
