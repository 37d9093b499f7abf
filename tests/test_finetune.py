"""The main job: end to end, sharding on 8 simulated devices, crash-safe resume, bad input."""

from __future__ import annotations

import json
import os
import re
import signal
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jobs import ROOT, job_summary
from jobs import job_env as _env
from train import finetune

SMALL = ["--steps", "30", "--eval-every", "0", "--save-every", "10", "--no-progress", "--batch-size", "32"]
# Jobs whose checks do not depend on which layers are adapted adapt 8 of the default 16 (query and
# value): their time goes into compiling, which grows with the number of adapted layers.
FEW = ["--targets", "attention_qv"]


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
        (["--batch-size", "0"], "--batch-size 0: must be an integer >= 1"),
        (["--steps", "0"], "--steps 0: must be an integer >= 1"),
        (["--steps", "-5"], "--steps -5: must be"),
        (["--lr", "0"], "--lr 0.0: must be a finite number > 0"),
        (["--lr", "nan"], "--lr nan: must be a finite number > 0"),
        (["--clip", "-1"], "--clip -1.0: must be a finite number > 0"),
        (["--weight-decay", "-1"], "--weight-decay -1.0"),
        (["--warmup", "-3"], "--warmup -3"),
        (["--eval-every", "-1"], "--eval-every -1"),
        (["--save-every", "0"], "--save-every 0"),
        (["--keep", "0"], "--keep 0"),
        (["--seed", "-1"], "--seed -1"),
        (["--block-size", "0"], "--block-size 0"),
        (["--block-size", "4", "--block-num", "8"], "give one of them, not both"),
        (["--neumann-terms", "7"], "only used with --cayley neumann"),
        (["--mesh", ""], "--mesh ''"),
        (["--resume", "--overwrite"], "--resume and --overwrite"),
        (["--modules-to-save", "no_such_module"], "matches no module of the model"),
        (["--checkpoint", ""], "--checkpoint '': empty; give a model directory"),
        (["--data", " "], "--data ' ': empty"),
        (["--output", ""], "--output '': empty"),
        (["--targets", ""], "--targets '': empty"),
        (["--exclude", ""], "--exclude '': empty"),
        (["--exclude", "layer_1"], "exclude pattern(s) ['layer_1'] remove none of the layers"),
        (["--warmup", "30"], "--warmup 30: warmup of 30 steps in a run of 30 steps: the warmup must be shorter"),
        (["--output", "/nonexistent/runs[1]/x"], "cannot read back a checkpoint whose path contains"),
        # the library's messages in the command's terms: flags, not BOFTConfig fields; a misspelt preset named
        (["--dropout", "1.5"], "BOFT options: --dropout must be a number in [0, 1], got 1.5"),
        (["--exclude", "(["], "BOFT options: --exclude: '([' is not a valid regular expression"),
        (["--targets", "all-linear"], "(--targets 'all-linear' is not a preset; did you mean 'all_linear'? --list-presets lists them)"),
        (["--targets", "zzz"], "(--targets 'zzz' is not a preset; --list-presets lists them)"),
        (["--image-size", "12x"], "--image-size '12x': expected a size in pixels, S (square) or HxW"),
        (["--image-size", "0"], "--image-size '0': expected a size in pixels"),
        (["--image-size", "1x16"], "--image-size 1x16: smaller than one patch of --checkpoint"),
        (["--model", "t5", "--image-size", "16"], "--image-size 16: only for --model vit"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message_and_writes_nothing(tmp_path, capsys, extra, fragment):
    out = tmp_path / "run"
    assert finetune.main(["--output", str(out), *SMALL, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and fragment in err, err
    assert not out.exists()


def test_the_command_line_ignores_a_sigterm_that_comes_after_the_job_is_over(tmp_path, capsys):
    """python -m train.finetune calls main(exiting=True): once main returns, SIGTERM is ignored for the
    rest of the interpreter's shutdown (a finished job must exit 0, not 143); an in-process caller gets
    its own handler back."""
    import signal

    before = signal.getsignal(signal.SIGTERM)
    try:
        assert finetune.main(["--output", str(tmp_path / "a"), *SMALL, "--keep", "0"]) == 2
        assert signal.getsignal(signal.SIGTERM) is before
        assert finetune.main(["--output", str(tmp_path / "b"), *SMALL, "--keep", "0"], exiting=True) == 2
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before)
    capsys.readouterr()


def test_overwrite_keeps_the_previous_run_when_an_option_is_bad(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    assert finetune.main(["--output", str(out), *SMALL, "--overwrite", "--keep", "0"]) == 2
    assert "--keep 0" in capsys.readouterr().err
    assert (out / "checkpoints").is_dir() and (out / "metrics.jsonl").read_text() == '{"step": 1}\n'
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    assert finetune.main(["--output", str(not_a_dir), *SMALL]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err


def test_sigterm_and_ctrl_c_end_with_a_resume_hint_not_a_traceback(monkeypatch, capsys):
    import signal

    from train import loop

    def killed(argv):  # the first SIGTERM only asks the loop to stop after its step
        os.kill(os.getpid(), signal.SIGTERM)  # what a scheduler sends
        assert loop.STOP.is_set()
        raise loop.Terminated()  # what the training loop does after the step

    def killed_twice(argv):  # a second SIGTERM stops at once, raised in this frame
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("the second SIGTERM was not turned into an exception")

    def killed_twice_while_writing(argv):  # ... but not inside a checkpoint write: right after it
        with loop._checkpoint_write():
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
            assert loop.stop_pending()
        raise AssertionError("the second SIGTERM was not raised after the checkpoint write")

    before = signal.getsignal(signal.SIGTERM)
    for run in (killed, killed_twice, killed_twice_while_writing):
        monkeypatch.setattr(finetune, "run", run)
        assert finetune.main([]) == 143
        err = capsys.readouterr().err
        assert "terminated (SIGTERM)" in err
        assert ("as soon as the checkpoint being written is complete" in err) == (run is killed_twice_while_writing)
        assert signal.getsignal(signal.SIGTERM) == before  # the handler is removed again
        assert not loop.STOP.is_set() and not loop.stop_pending() and not loop.writing_checkpoint()

    def interrupted(argv):
        raise KeyboardInterrupt

    def ctrl_c_while_writing(argv):  # Ctrl-C inside a checkpoint write is raised right after it
        with loop._checkpoint_write():
            os.kill(os.getpid(), signal.SIGINT)
            assert loop.stop_pending()
        raise AssertionError("Ctrl-C was not raised after the checkpoint write")

    # Ctrl-C as in a terminal, whatever this process inherited: a run started in the background by a
    # non-interactive shell (`.ci/run &`, nohup) inherits SIGINT ignored, and the job then rightly
    # leaves it alone (checked last)
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        for run in (interrupted, ctrl_c_while_writing):
            monkeypatch.setattr(finetune, "run", run)
            assert finetune.main([]) == 130
            err = capsys.readouterr().err
            assert "interrupted: step checkpoints saved so far are complete; rerun the same command with --resume" in err
            assert ("Ctrl-C: stopping as soon as the checkpoint" in err) == (run is ctrl_c_while_writing)
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler and not loop.stop_pending()
        # a Ctrl-C that lands where Python only reports it (a GC callback of JAX's, here a __del__)
        # is not reported as a traceback: its stop request is already recorded and ends the job
        # after the step.  Other such exceptions are still reported.
        reported = []

        def recorder(info):
            reported.append(type(info.exc_value))

        monkeypatch.setattr(sys, "unraisablehook", recorder)

        class RaisesWhenCollected:
            def __init__(self, exc):
                self.exc = exc

            def __del__(self):
                raise self.exc

        def ctrl_c_lost_in_a_callback(argv):
            RaisesWhenCollected(ValueError("unrelated"))  # no stop requested yet: reported
            try:
                os.kill(os.getpid(), signal.SIGINT)  # records the stop request and raises
                raise AssertionError("Ctrl-C did not raise")
            except KeyboardInterrupt as e:
                RaisesWhenCollected(e)  # ... where only the unraisable hook sees it
            assert loop.STOP.is_set()
            raise KeyboardInterrupt  # what fit raises after the step

        monkeypatch.setattr(finetune, "run", ctrl_c_lost_in_a_callback)
        assert finetune.main([]) == 130
        err = capsys.readouterr().err
        assert reported == [ValueError] and "Traceback" not in err, (reported, err)
        assert sys.unraisablehook is recorder  # the job's hook is removed again
        # where Ctrl-C is ignored (a background job) the job leaves it ignored
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        seen = []
        monkeypatch.setattr(finetune, "run", lambda argv: seen.append(signal.getsignal(signal.SIGINT)))
        assert finetune.main([]) == 0 and seen == [signal.SIG_IGN]
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, outer)


@pytest.mark.slow
def test_ctrl_c_while_the_train_step_compiles_exits_130(tmp_path):
    """A Ctrl-C that lands while XLA compiles the train step raises inside JAX's C++ code; the
    interpreter's shutdown then crashed (segfault, exit 139 in 8 of 8 tries).  The job now leaves
    without it after an interrupt: exit 130 with its message."""
    out = tmp_path / "log"
    with open(out, "w") as log:
        # Ctrl-C as in a terminal: Python's own handler first (a shell's background jobs inherit it
        # ignored, and then the job leaves it alone), then the job as `python -m train.finetune`
        # (and SIGINT unblocked: a blocked signal mask is inherited through fork and exec, and the
        # test process's threads may block it)
        start = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler);"
                 " signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT});"
                 " sys.argv = sys.argv[:1] + sys.argv[2:]; runpy.run_module('train.finetune', run_name='__main__')")
        # Without the suite's compilation cache (an earlier test compiled this step: the job then
        # finished its 30 steps within the second below, exit 0, in CI), and with more steps than
        # can run before the signal, so the job cannot end on its own whatever the machine's speed.
        env = {k: v for k, v in _env().items() if k != "JAX_COMPILATION_CACHE_DIR"}
        args = [*SMALL, *FEW]
        args[args.index("--steps") + 1] = "100000"
        job = subprocess.Popen([sys.executable, "-u", "-c", start, "--", "--output", str(tmp_path / "run"), *args],
                               stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        try:
            deadline = time.monotonic() + 300
            while "before finetuning" not in out.read_text():  # printed right before the train step compiles
                assert job.poll() is None and time.monotonic() < deadline, out.read_text()[-2000:]
                time.sleep(0.2)
            time.sleep(1.0)
            job.send_signal(signal.SIGINT)
            try:
                rc = job.wait(timeout=300)
            except subprocess.TimeoutExpired:
                rc = "still running 300 s after the signal"
        finally:
            job.kill()
    text = out.read_text()
    assert rc == 130, (rc, text[-2000:])
    assert "interrupted: step checkpoints saved so far are complete" in text and "Traceback" not in text


@pytest.mark.slow
def test_sigterm_during_training_stops_after_the_step_and_resumes(tmp_path, monkeypatch, capsys):
    """SIGTERM in the middle of a step: the step and its checkpoint complete, then exit 143; the
    same command with --resume finishes the run."""
    import signal

    from boft_jax.checkpoint import TrainCheckpointer
    from train import loop

    real = loop.batch_indices

    def indices(n, batch, seed, step):
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(n, batch, seed, step)

    monkeypatch.setattr(loop, "batch_indices", indices)
    # --save-every 100: no step of this run is due for a save; the stop request saves step 2 anyway
    args = ["--output", str(tmp_path / "run"), *SMALL, *FEW, "--steps", "4", "--save-every", "100"]
    assert finetune.main(args) == 143
    assert "stopping after the current training step" in capsys.readouterr().err
    ck = TrainCheckpointer(tmp_path / "run" / "checkpoints", save_every=100)
    assert ck.all_steps() == [2]  # step index 1 ran to the end and was saved
    ck.close()
    monkeypatch.setattr(loop, "batch_indices", real)
    assert finetune.main([*args, "--resume"]) == 0
    assert (tmp_path / "run" / "adapter").is_dir()


@pytest.mark.slow
# the damaged step's abandoned tensorstore reads finish later; the job's hook drops their echoes, pytest's reports them
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_full_disk_during_a_checkpoint_save_is_one_line_exit_3_and_resumable(tmp_path, monkeypatch, capsys):
    """A step checkpoint that cannot be written (a full disk): one line naming the newest complete
    step, exit status 3 (not 1, "diverged"), no traceback; --resume continues from that step."""
    import errno

    from boft_jax.checkpoint import TrainCheckpointer

    real = TrainCheckpointer.save

    def save(self, step, *a, **k):
        if step == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, step, *a, **k)

    monkeypatch.setattr(TrainCheckpointer, "save", save)
    args = ["--output", str(tmp_path / "run"), *SMALL, *FEW, "--steps", "6", "--save-every", "2"]
    assert finetune.main(args) == 3
    err = capsys.readouterr().err
    assert "error: writing step checkpoints in" in err and "failed at step 4 (No space left on device); the newest" \
        " complete one, step 2, is intact: rerun the same command with --resume" in err and "Traceback" not in err
    monkeypatch.setattr(TrainCheckpointer, "save", real)
    # a damaged step is reported before the (on a large model, long) evaluation of the base adapter
    steps = tmp_path / "run" / "checkpoints"
    shutil.copytree(steps, tmp_path / "intact")
    biggest = max((p for p in (steps / "2" / "opt_state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    assert finetune.main([*args, "--resume"]) == 2
    out, err = capsys.readouterr()
    assert "step 2" in err and "damaged" in err and "before finetuning" not in out and "TensorStore details" not in err
    shutil.rmtree(steps)
    shutil.copytree(tmp_path / "intact", steps)
    assert finetune.main([*args, "--resume"]) == 0
    assert "resumed at step 2" in (tmp_path / "run" / "summary.md").read_text()
    capsys.readouterr()
    assert finetune.main([*args, "--resume"]) == 0  # a finished run: said so, outputs written again
    assert "already finished all 6 steps; nothing to train" in capsys.readouterr().out


def test_io_failures_are_told_apart_and_their_echoes_kept_short(monkeypatch, capsys):
    """What counts as an I/O failure (exit 3, one line) and what does not (a device out of memory
    is XLA's RESOURCE_EXHAUSTED too, and propagates); orbax's logged tracebacks of I/O failures and
    asyncio's closed-loop echoes are left out, other records keep theirs."""
    import asyncio
    import logging

    from boft_jax.checkpoint import abandoned_io_echo
    from train import loop

    class SafetensorError(Exception):  # (safetensors' wrapper of an OS error, by its message)
        pass

    full = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    store = ValueError('RESOURCE_EXHAUSTED: Error writing local file "x/_sharding": Failed writing')
    oom = RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1073741824 bytes.")
    chained = RuntimeError("save failed")
    chained.__cause__ = OSError(122, "Disk quota exceeded", "/x/y")
    assert loop.io_failure(OSError(28, "No space left on device")) == "No space left on device"
    assert loop.io_failure(chained) == "Disk quota exceeded: /x/y"
    assert "No space left" in loop.io_failure(full) and "RESOURCE_EXHAUSTED" in loop.io_failure(store)
    assert loop.io_failure(oom) is None and loop.io_failure(ValueError("bad block size")) is None

    def raising(exc):
        def run(argv):
            raise exc
        return run

    monkeypatch.setattr(finetune, "run", raising(full))
    assert finetune.main([]) == 3
    assert "error: writing or reading files failed (SafetensorError: Error while serializing: I/O error: No space" \
        in capsys.readouterr().err
    monkeypatch.setattr(finetune, "run", raising(oom))
    with pytest.raises(RuntimeError, match="Out of memory"):
        finetune.main([])

    def record(exc):
        try:
            raise exc
        except BaseException:
            return logging.LogRecord("absl", logging.ERROR, __file__, 1, "write failed", (), sys.exc_info())

    terse = loop.TerseIOFailures()
    for exc, kept in ((store, False), (OSError(28, "No space left on device"), False), (ValueError("a bug"), True)):
        r = record(exc)
        assert terse.filter(r) and (r.exc_info is not None) == kept and r.getMessage() == "write failed"

    def closed_loop():  # what tensorstore's callback meets once orbax's loop is gone
        lp = asyncio.new_event_loop()
        lp.close()
        try:
            lp.call_soon_threadsafe(print)
        except RuntimeError as e:
            return e, e.__traceback__

    assert abandoned_io_echo(*closed_loop())
    assert not abandoned_io_echo(RuntimeError("Event loop is closed"), None)  # raised elsewhere: reported


@pytest.mark.slow
def test_a_second_sigterm_during_a_checkpoint_save_waits_for_it(tmp_path, monkeypatch, capsys, caplog):
    """Two SIGTERMs while step 2's checkpoint is being written: the write completes (no
    half-written step directory, no logged failure of orbax's background threads), then exit 143;
    --resume continues from step 2."""
    import signal

    from boft_jax.checkpoint import TrainCheckpointer
    from train import loop

    real_save = TrainCheckpointer.save

    def save(self, step, *a, **k):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        return real_save(self, step, *a, **k)

    monkeypatch.setattr(TrainCheckpointer, "save", save)
    args = ["--output", str(tmp_path / "run"), *SMALL, *FEW, "--steps", "4", "--save-every", "1"]
    assert finetune.main(args) == 143
    err = capsys.readouterr().err
    assert "stopping as soon as the checkpoint being written is complete" in err and "Traceback" not in err, err
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["1", "2"]
    monkeypatch.setattr(TrainCheckpointer, "save", real_save)
    assert finetune.main([*args, "--resume"]) == 0
    assert "resumed from step 2" in capsys.readouterr().out


def test_unreadable_checkpoint_or_data_file_exits_2_with_a_clear_message(tmp_path, capsys):
    import shutil

    from train.make_base import VIT_BASE

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copy(Path(VIT_BASE) / "config.json", ckpt / "config.json")
    good = (Path(VIT_BASE) / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(good[: len(good) // 2])  # truncated mid-file
    out = tmp_path / "run"
    assert finetune.main(["--output", str(out), *SMALL, "--checkpoint", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --checkpoint {ckpt}: ") and "not a readable safetensors file" in err, err
    bad = tmp_path / "data.npz"
    bad.write_bytes(np.random.default_rng().bytes(256))
    assert finetune.main(["--output", str(out), *SMALL, "--data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "not an .npz archive" in err and "pickle" not in err, err
    assert err.count(str(bad)) == 1, err  # the path once: "--data X: ...", not "--data X: X: ..."
    assert not out.exists()
    # the suffix's case does not matter; a missing path and a non-.npz file are told apart
    from boft_jax.models import vit
    from train import vit_task

    module, _ = vit.from_pretrained(VIT_BASE)
    rng = np.random.default_rng()
    np.savez(tmp_path / "ok.npz", images=rng.random((20, 8, 8, 1)).astype(np.float32), labels=rng.integers(0, 10, 20))
    shutil.copy(tmp_path / "ok.npz", tmp_path / "OK.NPZ")
    a, b = (vit_task.load_data(str(tmp_path / n), module, VIT_BASE) for n in ("ok.npz", "OK.NPZ"))
    np.testing.assert_array_equal(a.train.inputs["pixel_values"], b.train.inputs["pixel_values"])
    with pytest.raises(ValueError, match="no such file or folder"):
        vit_task.load_data(str(tmp_path / "missing.npz"), module, VIT_BASE)
    (tmp_path / "data.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match=r"without the .npz suffix \(.csv\)"):
        vit_task.load_data(str(tmp_path / "data.csv"), module, VIT_BASE)


def test_mesh_that_does_not_divide_the_weights_exits_2_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run(  # 5 devices: no dimension of the bundled ViT's kernels (96, 384, ...) divides by 5
        [sys.executable, "-m", "train.finetune", "--output", str(out), *SMALL, "--mesh", "data=5", "--batch-size", "35"],
        capture_output=True, text=True, env=_env(5), cwd=ROOT, timeout=600,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.startswith("error: --mesh data=5: mesh {'data': 5} does not divide"), r.stderr[-2000:]
    assert "encoder/layer_0/attention/query/kernel (96, 96) (axis sizes that divide it: 2, 3, 4," in r.stderr
    assert "or pass --replicate-unsplit to keep them whole on every device" in r.stderr, r.stderr[-2000:]
    assert not out.exists()


@pytest.mark.slow
def test_replicate_unsplit_runs_on_any_device_count_and_matches_one_device(tmp_path):
    """5 devices and weights of even sizes: no mesh of 5 splits them, so the job is refused (above)
    unless --replicate-unsplit keeps them whole on every device; that run says so and trains as one
    device does (the same losses)."""
    job = [*SMALL[:-2], "--batch-size", "35", "--steps", "3", "--save-every", "3", *FEW]
    losses = {}
    for name, devices, extra in (("five", 5, ["--replicate-unsplit"]), ("one", 1, [])):
        r = subprocess.run(
            [sys.executable, "-m", "train.finetune", "--output", str(tmp_path / name), *job, *extra],
            capture_output=True, text=True, env=_env(devices, fast_compile=True), cwd=ROOT, timeout=600,
        )
        assert r.returncode == 0, r.stderr[-2000:]
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [row["loss"] for row in rows if "loss" in row]
        if devices == 5:
            assert "note: --replicate-unsplit:" in r.stdout and "cannot split are held whole by every device" in r.stdout
            assert "encoder/layer_0/attention/key/kernel (96, 96)" in r.stdout, r.stdout[:2000]
            assert "mesh                        | data=5" in r.stdout
    assert len(losses["one"]) >= 2  # the logged steps (first and last)
    np.testing.assert_allclose(losses["five"], losses["one"], rtol=2e-5)


def test_npz_and_image_folder_data_load_exactly(tmp_path, capsys):
    from PIL import Image

    from train import data as data_lib

    rng = np.random.default_rng()
    imgs = rng.random((40, 8, 8, 1), dtype=np.float32)
    labels = rng.integers(0, 5, size=40).astype(np.int32)
    np.savez(tmp_path / "one.npz", images=imgs, labels=labels)
    ds = data_lib.load_npz(tmp_path / "one.npz")
    assert len(ds.train) + len(ds.test) == 40 and len(ds.test) == 8
    both = np.concatenate([ds.train.inputs["pixel_values"], ds.test.inputs["pixel_values"]])
    got = {(x.tobytes(), int(y)) for x, y in zip(both, np.concatenate([ds.train.labels, ds.test.labels]))}
    assert got == {(x.tobytes(), int(y)) for x, y in zip(imgs, labels)}
    np.savez(tmp_path / "two.npz", train_images=imgs[:30], train_labels=labels[:30], test_images=imgs[30:], test_labels=labels[30:])
    ds = data_lib.load_npz(tmp_path / "two.npz")
    np.testing.assert_array_equal(ds.test.inputs["pixel_values"], imgs[30:])
    np.testing.assert_array_equal(ds.train.labels, labels[:30])
    # labels that do not fit the images: refused, never truncated or cast silently
    for bad, fragment in (({"images": imgs, "labels": labels[:10]}, "with the same N"),
                          ({"images": imgs, "labels": labels + 0.5}, "labels must be integers"),
                          ({"images": np.where(imgs > 0.9, np.nan, imgs), "labels": labels}, "finite"),
                          ({"train_images": imgs, "train_labels": labels, "test_images": imgs[:0], "test_labels": labels[:0]},
                           "no examples")):
        np.savez(tmp_path / "bad.npz", **bad)
        with pytest.raises(ValueError, match=fragment):
            data_lib.load_npz(tmp_path / "bad.npz")
    raw = bytearray((tmp_path / "one.npz").read_bytes())  # a damaged member: found only when read
    raw[len(raw) // 3] ^= 0xFF
    (tmp_path / "damaged.npz").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="damaged.npz: unreadable .npz archive"):
        data_lib.load_npz(tmp_path / "damaged.npz")
    np.savez(tmp_path / "bad.npz", pictures=imgs)
    with pytest.raises(ValueError, match="needs arrays 'images'"):
        data_lib.load_npz(tmp_path / "bad.npz")
    # arrays outside the layout used (a user's own test set next to images/labels, both layouts,
    # unknown names) are an error naming them, never dropped
    split4 = {"train_images": imgs, "train_labels": labels, "test_images": imgs[:5], "test_labels": labels[:5]}
    for extra, unused in (({"images": imgs, "labels": labels, "test_images": imgs[:5], "test_labels": labels[:5]},
                           "['test_images', 'test_labels']"),
                          ({**split4, "images": imgs, "labels": labels}, "['images', 'labels']"),
                          ({"images": imgs, "labels": labels, "val_images": imgs[:5]}, "['val_images']")):
        np.savez(tmp_path / "extra.npz", **extra)
        with pytest.raises(ValueError, match=re.escape(f"would not use, {unused}")):
            data_lib.load_npz(tmp_path / "extra.npz")
    # an image folder: one sub-folder per class, lossless PNGs, labels by sorted class name
    pix = rng.integers(0, 256, size=(12, 8, 8), dtype=np.uint8)
    for i, p in enumerate(pix):
        (tmp_path / "imgs" / f"class_{i % 3}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(p, mode="L").save(tmp_path / "imgs" / f"class_{i % 3}" / f"{i}.png")
    capsys.readouterr()
    ds = data_lib.load_image_folder(tmp_path / "imgs", (8, 8), 1)
    assert "class folders sorted by name get labels 0..2: class_0 -> 0, class_1 -> 1, class_2 -> 2" in capsys.readouterr().out
    both = np.concatenate([ds.train.inputs["pixel_values"], ds.test.inputs["pixel_values"]])
    got = {(np.round(x[..., 0] * 255).astype(np.uint8).tobytes(), int(y)) for x, y in zip(both, np.concatenate([ds.train.labels, ds.test.labels]))}
    assert got == {(p.tobytes(), i % 3) for i, p in enumerate(pix)}
    # folders named after the model's classes (id2label) keep those ids; a partial match is refused
    named = data_lib.load_image_folder(tmp_path / "imgs", (8, 8), 1, class_names=["x", "class_2", "class_0", "class_1"])
    assert {(x.tobytes(), int(y)) for x, y in zip(named.train.inputs["pixel_values"], named.train.labels)} == {
        (x.tobytes(), {0: 2, 1: 3, 2: 1}[int(y)]) for x, y in zip(ds.train.inputs["pixel_values"], ds.train.labels)}
    with pytest.raises(ValueError, match=r"class folders \['class_0'\] are named after the model's classes"
                                         r" \(id2label\) but \['class_1', 'class_2'\] are not"):
        data_lib.load_image_folder(tmp_path / "imgs", (8, 8), 1, class_names=["class_0", "other"])
    none = data_lib.load_image_folder(tmp_path / "imgs", (8, 8), 1, class_names=["cat", "dog", "emu"])  # sorted order
    assert none.class_names == ds.class_names == {0: "class_0", 1: "class_1", 2: "class_2"}
    assert named.class_names == {1: "class_2", 2: "class_0", 3: "class_1"}
    # labels an int32 cannot hold would wrap around: refused
    np.savez(tmp_path / "huge.npz", images=imgs, labels=labels.astype(np.int64) + 2**32)
    with pytest.raises(ValueError, match=r"labels must be class indices < 2\^31, found 429496"):
        data_lib.load_npz(tmp_path / "huge.npz")
    # 16-bit pixels would be clipped to 8 bits by Pillow's convert: refused, not saturated
    Image.fromarray((rng.integers(0, 65535, (8, 8))).astype(np.uint16)).save(tmp_path / "imgs" / "class_1" / "deep.png")
    with pytest.raises(ValueError, match=r"deep.png: 'I;16' image \(16/32-bit integer or float pixels\)"):
        data_lib.load_image_folder(tmp_path / "imgs", (8, 8), 1)
    (tmp_path / "imgs" / "class_1" / "deep.png").unlink()
    # a decompression bomb (a header claiming 60000 x 60000 pixels) is a one-line error, not a traceback
    bomb = bytearray((tmp_path / "imgs" / "class_1" / "1.png").read_bytes())
    bomb[16:24] = (60000).to_bytes(4, "big") * 2  # IHDR width, height
    import zlib
    bomb[29:33] = zlib.crc32(bytes(bomb[12:29])).to_bytes(4, "big")
    (tmp_path / "imgs" / "class_1" / "bomb.png").write_bytes(bytes(bomb))
    with pytest.raises(ValueError, match="bomb.png: unreadable image .*DecompressionBombError"):
        data_lib.load_image_folder(tmp_path / "imgs", (8, 8), 1)
    (tmp_path / "imgs" / "class_1" / "bomb.png").unlink()
    (tmp_path / "imgs" / "class_0" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png: unreadable image"):
        data_lib.load_image_folder(tmp_path / "imgs", (8, 8), 1)


def test_pixels_are_preprocessed_as_the_checkpoint_says_and_nothing_is_skipped_silently(tmp_path, capsys):
    """uint8 arrays and image files: ``(x * rescale - mean) / std`` from the checkpoint's
    preprocessor_config.json (x / 255 without one); float arrays as stored.  An image folder lists
    what it does not read and refuses a class folder without images."""
    from PIL import Image

    from train import data as data_lib

    rng = np.random.default_rng()
    pix = rng.integers(0, 256, size=(10, 4, 4, 3), dtype=np.uint8)
    labels = np.arange(10, dtype=np.int32) % 2
    mean, std = rng.uniform(0.2, 0.8, 3), rng.uniform(0.2, 0.8, 3)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "preprocessor_config.json").write_text(json.dumps(
        {"do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": mean.tolist(),
         "image_std": std.tolist(), "resample": 0}))
    want = (pix.astype(np.float64) / 255 - mean) / std
    np.savez(tmp_path / "u8.npz", train_images=pix, train_labels=labels, test_images=pix, test_labels=labels)
    prep = data_lib.pixel_prep(ckpt, 3)
    assert prep.resample == 0
    np.testing.assert_allclose(data_lib.load_npz(tmp_path / "u8.npz", prep=prep).test.inputs["pixel_values"], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(data_lib.load_npz(tmp_path / "u8.npz").test.inputs["pixel_values"], pix / 255.0, rtol=1e-6)
    as_float = (pix / 255.0).astype(np.float32) * 7  # float arrays: taken as already preprocessed
    np.savez(tmp_path / "f32.npz", images=as_float, labels=labels)
    both = data_lib.load_npz(tmp_path / "f32.npz", prep=prep)
    assert {x.tobytes() for x in np.concatenate([both.train.inputs["pixel_values"], both.test.inputs["pixel_values"]])} == {
        x.tobytes() for x in as_float}
    folder = tmp_path / "imgs"
    for i, p in enumerate(pix):
        (folder / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(p, mode="RGB").save(folder / f"c{i % 2}" / f"{i}.png")
    (folder / "c0" / "notes.txt").write_text("x")
    (folder / "c1" / "nested").mkdir()
    (folder / "stray.png").write_bytes((folder / "c0" / "0.png").read_bytes())
    ds = data_lib.load_image_folder(folder, (4, 4), 3, prep=prep)  # same size: the resize changes nothing
    got = {x.tobytes() for x in np.concatenate([ds.train.inputs["pixel_values"], ds.test.inputs["pixel_values"]])}
    assert got == {x.astype(np.float32).tobytes() for x in data_lib.PixelPrep(1 / 255, tuple(mean), tuple(std))(pix)}
    out = capsys.readouterr().out
    assert "3 entries not read as training images" in out and "c0/notes.txt" in out and "c1/nested" in out and "stray.png" in out, out
    (folder / "c2").mkdir()
    with pytest.raises(ValueError, match=r"class folder\(s\) \['c2'\] hold no images"):
        data_lib.load_image_folder(folder, (4, 4), 3)
    (ckpt / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5, 0.5], "image_std": [0.5, 0.5]}))
    with pytest.raises(ValueError, match="preprocessor_config.json: unusable image preprocessing settings"):
        data_lib.pixel_prep(ckpt, 3)
    (ckpt / "preprocessor_config.json").write_text("{}")  # missing keys: ViTImageProcessor's defaults
    assert data_lib.pixel_prep(ckpt, 3) == data_lib.PixelPrep(1 / 255, (0.5,) * 3, (0.5,) * 3, 2)
    assert data_lib.pixel_prep(tmp_path, 3) == data_lib.PixelPrep()  # no preprocessor_config.json


@pytest.mark.slow
def test_cli_options_reach_the_adapter_and_keep_and_resume_mismatch(tmp_path, capsys):
    """bf16, Neumann, input mode, --block-num, --bias boft_only, --keep; a --resume with another seed."""
    from boft_jax.checkpoint import load_adapter

    out = tmp_path / "run"
    args = ["--output", str(out), "--steps", "8", "--save-every", "2", "--keep", "2", "--eval-every", "0", "--no-progress",
            "--batch-size", "16", "--precision", "bf16", "--cayley", "neumann", "--neumann-terms", "3", "--mode", "input",
            "--block-num", "8", "--bias", "boft_only", "--factors", "1", "--dropout", "0", *FEW]
    res = finetune.run([*args, "--resume"])  # nothing to resume: said at once, before the first evaluation
    printed = capsys.readouterr().out
    notice = printed.find(f"--resume: no checkpoint in {out / 'checkpoints'}: a new run from step 0 (is --output")
    assert 0 <= notice < printed.index("before finetuning"), printed
    # the summary says how it trained (these options differ from the defaults)
    assert "| training                    | cayley=neumann (3 terms), mode=input, dropout=0, bias=boft_only, bf16," in (
        (out / "summary.md").read_text())
    adapter, config, _ = load_adapter(out / "adapter")
    assert (config.block_num, config.block_size, config.n_factors) == (8, None, 1)
    assert (config.cayley, config.neumann_terms, config.mode, config.bias) == ("neumann", 3, "input", "boft_only")
    leaves = jax.tree_util.tree_leaves_with_path(adapter)
    skews = [l for p, l in leaves if "skew" in jax.tree_util.keystr(p)]
    biases = [l for p, l in leaves if "bias" in jax.tree_util.keystr(p) and "classifier" not in jax.tree_util.keystr(p)]
    assert skews and all(s.shape[:2] == (1, 8) for s in skews)  # block_num 8 -> 8 blocks of 64/8
    assert biases and any(np.abs(b).max() > 0 for b in biases)  # boft_only: biases trained
    assert res["acc_after"] >= 0.0 and np.isfinite(np.concatenate([np.ravel(s) for s in skews])).all()
    steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [6, 8]  # --keep 2
    # the interop CLI finds the base model the job recorded (no --base needed)
    from boft_jax.interop.__main__ import main as interop_main

    assert interop_main(["export-merged", "--adapter", str(out / "adapter"), "--out", str(tmp_path / "exported")]) == 0
    assert (tmp_path / "exported" / "config.json").is_file()
    capsys.readouterr()
    before = {p.name: p.stat().st_mtime_ns for p in (out / "adapter").rglob("*")}
    assert finetune.main([*args, "--resume", "--seed", "5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --resume: the checkpoint at step 8 in"), err
    assert "(1 difference(s)): seed: checkpoint 0, now 5." in err, err
    other = [*args, "--resume"]
    other[other.index("--block-num") + 1] = "4"  # other adapter shapes than the checkpoint's
    assert finetune.main(other) == 2
    captured = capsys.readouterr()
    assert "(1 difference(s)): boft.block_num: checkpoint 8, now 4." in captured.err, captured.err
    assert "before finetuning" not in captured.out  # refused before any evaluation
    # several differences at once: every one named (not only the first found)
    several = [*args, "--resume", "--lr", "1e-2", "--seed", "3", "--dropout", "0.1"]
    several[several.index("--block-num") + 1] = "4"
    assert finetune.main(several) == 2
    err = capsys.readouterr().err
    for shown in ("4 difference(s)", "seed: checkpoint 0, now 3", "learning_rate: checkpoint 0.005, now 0.01",
                  "boft.dropout: checkpoint 0.0, now 0.1", "boft.block_num: checkpoint 8, now 4"):
        assert shown in err, (shown, err)
    # other training options (same adapter shapes): named, refused
    for flag, value, shown in (("--lr", "1e-2", "learning_rate: checkpoint 0.005, now 0.01"),
                               ("--steps", "12", "steps: checkpoint 8, now 12"),
                               ("--cayley", "exact", 'boft.cayley: checkpoint "neumann", now "exact"'),
                               ("--precision", "float32", 'precision: checkpoint "bf16", now "float32"')):
        changed = [*args, "--resume", flag, value]
        if flag == "--cayley":
            changed = [a for i, a in enumerate(changed) if a != "--neumann-terms" and changed[i - 1] != "--neumann-terms"]
        assert finetune.main(changed) == 2, flag
        err = capsys.readouterr().err
        assert "belongs to a run with other options" in err and shown in err, (flag, err)
    assert finetune.main([*args, "--resume", "--steps", "6"]) == 2  # fewer steps than already done
    assert "belongs to a run with other options" in capsys.readouterr().err
    assert before == {p.name: p.stat().st_mtime_ns for p in (out / "adapter").rglob("*")}
    # resuming the finished run changes nothing in metrics.jsonl (no second final row); a last line
    # cut short by a crash is dropped
    rows = (out / "metrics.jsonl").read_text()
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "loss": 0.1')
    assert finetune.main([*args, "--resume"]) == 0
    assert (out / "metrics.jsonl").read_text() == rows
    assert "| 0 x batch 16 (resumed at step 8 of 8) |" in (out / "summary.md").read_text()
    assert sum('"final": true' in line for line in rows.splitlines()) == 1
    # a foreign step directory newer than the last checkpoint: named, not a traceback
    (out / "checkpoints" / "500").mkdir()
    assert finetune.main([*args, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "checkpoints/500 is the newest step directory but not a complete training checkpoint" in err, err


def test_existing_run_is_not_overwritten_without_consent(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "keep.txt").write_text("x")
    assert finetune.main(["--output", str(out), *SMALL]) == 2
    assert "--resume" in capsys.readouterr().err
    assert (out / "adapter" / "keep.txt").read_text() == "x"
    for name in ("summary.md", "curves.png"):  # the job writes these too: a user's own file is kept
        own = tmp_path / name
        own.mkdir()
        (own / name).write_text("my notes")
        assert finetune.main(["--output", str(own), *SMALL]) == 2
        assert f"already holds a run ({name})" in capsys.readouterr().err
        assert (own / name).read_text() == "my notes"
    # --resume over a finished run's outputs with no step checkpoint would restart and replace them
    assert finetune.main(["--output", str(out), *SMALL, "--resume"]) == 2
    assert "holds a finished run's outputs (adapter) but no step checkpoint" in capsys.readouterr().err
    assert (out / "adapter" / "keep.txt").read_text() == "x"


def test_a_second_job_on_the_same_output_is_refused_while_the_first_runs(tmp_path, capsys):
    """Two jobs writing one --output would interleave their metrics and share checkpoints: while
    another process holds the job lock on it, a job exits 2 and writes nothing."""
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(  # what a running job holds: an exclusive flock on the --output directory
        [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY);"
         " fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(120)", str(out)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert finetune.main(["--output", str(out), *SMALL]) == 2
        assert "another job is writing to it now" in capsys.readouterr().err
        assert list(out.iterdir()) == []
    finally:
        holder.kill()
        holder.wait()


def test_a_file_system_without_locks_is_named_not_taken_for_another_job(tmp_path, capsys, monkeypatch):
    """flock fails with ENOLCK on NFS without its lock service (Lustre without -o flock: EINVAL): that
    is not a held lock; the job says it cannot guard the --output and goes on."""
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    finetune._lock_output(tmp_path / "run")
    err = capsys.readouterr().err
    assert f"note: --output {tmp_path / 'run'}: its file system does not support file locks (No locks available)" in err
    assert "another job" not in err and (tmp_path / "run").is_dir()

    def held(fd, op):
        raise BlockingIOError(errno.EWOULDBLOCK, os.strerror(errno.EWOULDBLOCK))

    monkeypatch.setattr(fcntl, "flock", held)
    with pytest.raises(finetune.UsageError, match="another job is writing to it now"):
        finetune._lock_output(tmp_path / "run")


def _base_with_preprocessor(tmp_path, content) -> Path:
    """A copy of the bundled base ViT with ``content`` (a dict as JSON, or raw text) as its
    preprocessor_config.json."""
    import shutil

    from train.make_base import VIT_BASE

    ckpt = tmp_path / "ckpt"
    shutil.copytree(VIT_BASE, ckpt)
    (ckpt / "preprocessor_config.json").write_text(content if isinstance(content, str) else json.dumps(content))
    return ckpt


def test_merged_model_keeps_the_checkpoints_preprocessing(tmp_path):
    """merged/ is a model directory to use in place of the base: the base's preprocessor_config.json
    (how uint8 images become inputs) comes along; without it the same data would be read differently."""
    from train import data as data_lib

    rng = np.random.default_rng()
    ckpt = _base_with_preprocessor(tmp_path, {
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": rng.uniform(0.2, 0.8, 1).tolist(), "image_std": rng.uniform(0.2, 0.8, 1).tolist()})
    out = tmp_path / "run"
    assert finetune.main(["--output", str(out), *SMALL, *FEW, "--checkpoint", str(ckpt)]) == 0
    assert (out / "merged" / "preprocessor_config.json").read_bytes() == (ckpt / "preprocessor_config.json").read_bytes()
    assert data_lib.pixel_prep(out / "merged", 1) == data_lib.pixel_prep(ckpt, 1)


@pytest.mark.slow
def test_image_size_trains_at_another_size_and_writes_a_model_of_that_size(tmp_path, capsys):
    """--image-size: the bundled digits resized, the base's position embeddings resized once; the
    merged model is a checkpoint of the new size equal to the base + adapter called with
    interpolate_pos_encoding=True; its preprocessor config says the new size; a resume at another
    size is refused."""
    import boft_jax as boft
    from boft_jax.checkpoint import load_adapter
    from boft_jax.models import from_pretrained

    prep = {"do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5],
            "image_std": [0.5], "size": {"height": 8, "width": 8}, "resample": 2}
    ckpt = _base_with_preprocessor(tmp_path, prep)
    out = tmp_path / "run"
    args = ["--output", str(out), *SMALL, *FEW, "--checkpoint", str(ckpt), "--steps", "10"]
    assert finetune.main([*args, "--image-size", "12x16"]) == 0
    said = capsys.readouterr().out
    assert "resized bicubically to 12x16 pixels (6x8 patches)" in said and "resized to 12x16" in said
    assert json.loads((out / "merged" / "config.json").read_text())["image_size"] == [12, 16]
    merged_prep = json.loads((out / "merged" / "preprocessor_config.json").read_text())
    assert merged_prep == {**prep, "size": {"height": 12, "width": 16}}
    adapter, config, meta = load_adapter(out / "adapter")
    assert meta["image_size"] == [12, 16]
    module, base = from_pretrained(ckpt)  # the checkpoint at its own 8 x 8
    merged_module, merged = from_pretrained(out / "merged")
    assert merged_module.config.image_size == (12, 16)
    x = np.random.default_rng().uniform(0, 1, (16, 12, 16, 1)).astype(np.float32)
    wrapped = boft.wrap(module, config).apply({"params": boft.combine(base, adapter)}, x, interpolate_pos_encoding=True)
    np.testing.assert_allclose(merged_module.apply({"params": merged}, x), wrapped, atol=1e-5)
    for other in (["--image-size", "16"], []):  # another size, or the checkpoint's own: not this run
        assert finetune.main([*args, "--resume", *other]) == 2
        err = capsys.readouterr().err
        assert "image_size: checkpoint [12, 16], now" in err and "(--image-size; null: the base checkpoint's own size)" in err


@pytest.mark.parametrize("content", ['{"size": 8,', '["not", "an object"]'])
def test_image_size_with_an_unreadable_preprocessor_config_exits_2_before_training(tmp_path, capsys, content):
    """merged/ gets the checkpoint's preprocessor_config.json with the new size: a file that cannot
    be read is an error before anything is trained or written, not a crash after training."""
    ckpt = _base_with_preprocessor(tmp_path, content)
    out = tmp_path / "run"
    assert finetune.main(["--output", str(out), *SMALL, "--checkpoint", str(ckpt), "--image-size", "12"]) == 2
    err = capsys.readouterr().err
    assert "preprocessor_config.json is unreadable" in err and "fix or remove the file" in err, err
    assert not out.exists()


def test_image_size_keeps_a_cropping_preprocessor_config_as_it_is_and_says_so(tmp_path, capsys):
    prep = {"size": 10, "crop_size": 8, "do_center_crop": True}
    ckpt = _base_with_preprocessor(tmp_path, prep)
    out = tmp_path / "run"
    args = ["--output", str(out), *SMALL, *FEW, "--steps", "2", "--checkpoint", str(ckpt), "--image-size", "12"]
    assert finetune.main(args) == 0
    said = capsys.readouterr().out
    assert "merged/preprocessor_config.json will be the checkpoint's, unchanged: it resizes and then crops" in said
    assert "set its input size to 12x12" in said
    assert json.loads((out / "merged" / "preprocessor_config.json").read_text()) == prep


def test_npz_images_of_another_size_name_the_image_size_option(tmp_path, capsys):
    data = tmp_path / "d.npz"
    rng = np.random.default_rng()
    np.savez(data, images=rng.uniform(0, 1, (40, 12, 16, 1)).astype(np.float32), labels=rng.integers(0, 5, 40))
    out = tmp_path / "run"
    assert finetune.main(["--output", str(out), *SMALL, "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert "have shape (12, 16, 1) but the model expects (H, W, C) = (8, 8, 1)" in err
    assert "not resized" in err and "--image-size HxW" in err


def test_bundled_digits_are_resized_as_bicubic_matrices_say():
    """``vit_task.resized`` applies the 1-D bicubic weights along height and along width (a
    non-square size catches swapped axes), keeps labels and names, and clips to the data's range."""
    from boft_jax.models.vit import bicubic_matrix
    from train import data as data_lib
    from train import vit_task

    ds = data_lib.digits(data_lib.FINETUNE_CLASSES)
    out = vit_task.resized(ds, (11, 20))
    x, y = ds.test.inputs["pixel_values"], out.test.inputs["pixel_values"]
    assert y.shape == (len(x), 11, 20, 1) and y.dtype == x.dtype
    rows, cols = bicubic_matrix(8, 11), bicubic_matrix(8, 20)
    i = np.random.default_rng().integers(len(x))
    expected = np.clip(rows @ x[i, :, :, 0].astype(np.float64) @ cols.T, x.min(), x.max())
    np.testing.assert_allclose(y[i, :, :, 0], expected, rtol=1e-6, atol=1e-6)
    assert y.min() >= x.min() and y.max() <= x.max()
    np.testing.assert_array_equal(out.test.labels, ds.test.labels)
    assert out.description == ds.description + ", resized to 11x20"
    assert vit_task.resized(ds, (8, 8)) is ds


def test_too_little_or_empty_npz_data_exits_2_with_the_reason(tmp_path, capsys):
    rng = np.random.default_rng()
    np.savez(tmp_path / "one.npz", images=rng.random((1, 8, 8, 1)).astype(np.float32), labels=np.array([3]))
    np.savez(tmp_path / "empty.npz")
    for name, said in (("one.npz", "too few examples for a train/held-out split: 0 train and 1 held-out"),
                       ("empty.npz", "an .npz archive with no arrays")):
        assert finetune.main(["--output", str(tmp_path / "run"), *SMALL, "--data", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_a_diverging_run_exits_1_and_writes_no_adapter(tmp_path, capsys):
    """--lr 1e30 makes step 2 non-finite: exit status 1 with the step named, no adapter, merged
    model or summary written, and a metrics log of finite values that is valid JSON."""
    out = tmp_path / "run"
    args = ["--output", str(out), *SMALL, *FEW, "--steps", "12", "--save-every", "1", "--lr", "1e30", "--warmup", "0"]
    assert finetune.main(args) == 1
    err = capsys.readouterr().err
    # (the loss or the gradient norm is not finite: which one depends on how far the rotations still hold)
    assert err.startswith("error: training diverged at step 2: loss ") and "(not finite)" in err and "step 1, in" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "metrics.jsonl"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1] and np.isfinite(rows[1]["loss"])
    assert rows[1]["includes_compile"] is True  # the first row's examples_per_s includes compiling, and says so
    assert rows[0]["before"] and rows[0]["eval_accuracy"] >= 0  # the evaluation before training


def test_resume_knows_the_data_and_the_base_by_content_not_by_path(tmp_path, capsys, monkeypatch):
    """The same .npz given by another path, or a copy of the base model elsewhere, resumes; the
    same path with other examples, or a base whose files changed, is refused by name."""
    import shutil

    from train.make_base import VIT_BASE

    rng = np.random.default_rng()
    (tmp_path / "d").mkdir()
    np.savez(tmp_path / "d" / "data.npz", images=rng.random((48, 8, 8, 1)).astype(np.float32),
             labels=rng.integers(5, 10, 48))
    monkeypatch.chdir(tmp_path)
    base = ["--output", "run", *SMALL, *FEW, "--steps", "4", "--save-every", "2", "--batch-size", "8"]
    assert finetune.main([*base, "--data", "d/data.npz"]) == 0
    copy = tmp_path / "base copy"
    shutil.copytree(VIT_BASE, copy)
    capsys.readouterr()
    assert finetune.main([*base, "--resume", "--data", str(tmp_path / "d" / "data.npz"), "--checkpoint", str(copy)]) == 0
    assert "resumed from step 4" in capsys.readouterr().out
    np.savez(tmp_path / "d" / "data.npz", images=rng.random((48, 8, 8, 1)).astype(np.float32),
             labels=rng.integers(5, 10, 48))
    assert finetune.main([*base, "--resume", "--data", "d/data.npz"]) == 2
    err = capsys.readouterr().err
    assert "(1 difference(s)): data.sha256:" in err and "other files or examples" in err, err
    (copy / "config.json").write_text((copy / "config.json").read_text() + "\n")
    assert finetune.main([*base, "--resume", "--data", "d/data.npz", "--checkpoint", str(copy)]) == 2
    err = capsys.readouterr().err
    assert "(2 difference(s)): checkpoint.sha256:" in err and "data.sha256:" in err, err


def test_output_inside_an_input_is_refused(tmp_path, capsys):
    """An --output inside the --data image folder would add a class to it (the run's curves.png);
    inside --checkpoint, stray files: refused before anything is written."""
    import shutil

    from train.make_base import VIT_BASE

    folder = tmp_path / "images"
    for c in ("5", "6"):
        (folder / c).mkdir(parents=True)
    ckpt = tmp_path / "base"
    shutil.copytree(VIT_BASE, ckpt)
    for flag, given in (("--data", folder), ("--checkpoint", ckpt)):
        out = given / "run"
        assert finetune.main(["--output", str(out), *SMALL, flag, str(given)]) == 2
        err = capsys.readouterr().err
        assert f"--output {out} lies inside {flag} {given}" in err, err
        assert not out.exists()


def test_inputs_inside_what_the_job_writes_are_refused(tmp_path, capsys):
    """--checkpoint / --data inside an output the job writes or --overwrite removes (e.g. the merged
    model of an earlier run as the new base, in that same --output): refused, and nothing is removed."""
    import shutil

    from train.make_base import VIT_BASE

    out = tmp_path / "run"
    shutil.copytree(VIT_BASE, out / "merged")
    for extra in (["--overwrite"], ["--resume"], []):
        assert finetune.main(["--output", str(out), *SMALL, "--checkpoint", str(out / "merged"), *extra]) == 2
        err = capsys.readouterr().err
        assert f"--checkpoint {out / 'merged'} lies in {out / 'merged'}, which this job writes" in err, err
    data = out / "checkpoints" / "data.npz"
    data.parent.mkdir()
    data.write_bytes(b"x")
    assert finetune.main(["--output", str(out), *SMALL, "--data", str(data), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert f"--data {data} lies in {out / 'checkpoints'}, which this job writes" in err and data.exists(), err
    assert sorted(p.name for p in (out / "merged").iterdir()) == sorted(p.name for p in Path(VIT_BASE).iterdir())
    (out / "checkpoints" / "data.npz").unlink()
    (out / "checkpoints").rmdir()
    (out / "checkpoints").write_text("not a directory")
    assert finetune.main(["--output", str(out), *SMALL, "--resume"]) == 2
    assert "checkpoints is a file, not the step-checkpoint directory" in capsys.readouterr().err


@pytest.mark.parametrize("steps,warmup,used", [(1, None, 0), (12, None, 1), (12, 0, 0), (12, 5, 5), (300, None, 20)])
def test_learning_rate_follows_the_warmup_cosine_formula(steps, warmup, used):
    """The rate of every step, read from AdamW's updates for a constant gradient (its update is then
    exactly ``-lr_t sign(g)``), against the formula: ``lr t / W`` during the warmup, then
    ``lr (1 + cos(pi (t - W) / (steps - W))) / 2``.  No warmup starts at the peak, so a 1-step run trains."""
    import jax.numpy as jnp

    from train import loop

    lr = float(np.random.default_rng().uniform(1e-3, 1e-1))
    opts = loop.TrainOptions(steps=steps, learning_rate=lr, warmup_steps=warmup, weight_decay=0.0)
    assert opts.warmup == used and opts.identity()["warmup_steps"] == used
    g = {"w": jnp.asarray(np.abs(np.random.default_rng().standard_normal(6)) + 0.5, jnp.float32)}  # all positive
    opt = loop.make_optimizer(opts)
    state = opt.init(g)
    got = []
    for _ in range(steps):
        upd, state = opt.update(g, state, g)
        got.append(-float(upd["w"][0]))
    t = np.arange(steps, dtype=np.float64)
    want = np.where(t < used, lr * t / max(used, 1), lr * (1 + np.cos(np.pi * (t - used) / (steps - used))) / 2)
    # rtol: AdamW's bias correction 1 - 0.999^t in float32 is off by up to ~3e-5 relative at small t
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-9)
    assert got[0 if used == 0 else used] == pytest.approx(lr, rel=1e-4)  # the peak is reached


def test_warmup_as_long_as_the_run_is_refused():
    from train import loop

    for steps, warmup in ((10, 10), (1, 1), (5, 30)):
        with pytest.raises(ValueError, match=f"warmup of {warmup} steps in a run of {steps} steps: the warmup must be shorter"):
            loop.make_optimizer(loop.TrainOptions(steps=steps, warmup_steps=warmup))


def test_help_lists_the_options():
    r = subprocess.run([sys.executable, "-m", "train.finetune", "--help"], capture_output=True, text=True, env=_env(), cwd=ROOT)
    assert r.returncode == 0
    for opt in ("--model", "--checkpoint", "--data", "--block-size", "--factors", "--targets", "--mesh", "--resume", "--precision"):
        assert opt in r.stdout
    # every option says what it does
    undocumented = [a.option_strings for a in finetune.build_parser()._actions if not (a.help or "").strip()]
    assert not undocumented, undocumented


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
    res = job_summary(["--output", str(out), "--no-progress"], out)  # exactly the README's default job
    assert res["trainable"] / res["base"] < 0.02
    assert res["acc_before"] < 0.2 and res["acc_after"] >= 0.90  # new classes: from nothing to >= 90%
    for f in ("metrics.jsonl", "curves.png", "summary.md", "adapter", "merged/config.json", "merged/model.safetensors"):
        assert (out / f).exists(), f
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert train_rows[0]["loss"] > train_rows[-1]["loss"]
    # held-out accuracy before training (step 0), during (every --eval-every steps) and after (final)
    evals = [r for r in rows if "eval_accuracy" in r]
    assert evals[0]["step"] == 0 and evals[0]["before"] and evals[-1]["final"] and len(evals) >= 3
    # (the summary table that job_summary reads rounds to 3 decimals)
    assert abs(evals[0]["eval_accuracy"] - res["acc_before"]) <= 5e-4 and abs(evals[-1]["eval_accuracy"] - res["acc_after"]) <= 5e-4
    # the saved adapter reproduces the run; the merged HF directory equals the wrapped model
    adapter, config, meta = load_adapter(out / "adapter")
    module, base = from_pretrained(meta["base_checkpoint"], scan_layers=meta["scan_layers"])
    assert meta["scan_layers"] is False  # recorded: a --scan-layers adapter needs a stacked base
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
    # the MLP's two shapes (96 -> 384, 384 -> 96): their kernels get split along d_in and along d_out
    cfg = boft.BOFTConfig(block_size=4, n_factors=2, targets=vit.TARGET_PRESETS["mlp"], modules_to_save="classifier")
    model = boft.wrap(module, cfg)
    data = digits(FINETUNE_CLASSES)
    adapter = boft.init_adapter(model, params, *vit_task.example_inputs(data))
    frozen, _ = boft.split(boft.combine(params, adapter), cfg)
    out = {}
    for name, mesh in [("single", sh.make_mesh("data=1", jax.devices()[:1])),
                       ("fsdp", sh.make_mesh("data=8")), ("tp", sh.make_mesh("model=8")),
                       ("both", sh.make_mesh("data=2,model=4"))]:
        task = vit_task.make_task(model, frozen, adapter, data)
        opts = loop.TrainOptions(steps=12, batch_size=32, eval_every=0, save_every=1000, mesh=mesh, progress=False)
        res = loop.fit(task, opts, sys.argv[1] + "/" + name)
        sharded = sh.shard_frozen(frozen, mesh)
        per_dev = sh.bytes_per_device(sharded)
        out[name] = {"losses": res["losses"], "max_bytes": max(per_dev.values()), "n_dev": len(per_dev),
                     "adapter": [np.asarray(l).tolist() for l in jax.tree.leaves(res["adapter"])[:2]]}
    out["total_bytes"] = sum(np.asarray(l).nbytes for l in jax.tree.leaves(frozen))
    # strict sharding refuses only leaves that some axis could have split: not (), not (5,) on 8
    mesh8 = sh.make_mesh("data=8")
    sh.frozen_sharding({"s": np.zeros(()), "b": np.zeros(5)}, mesh8, min_size=1)
    try:
        sh.frozen_sharding({"k": np.zeros((9, 7))}, mesh8, min_size=1)
        out["refused"] = ""
    except ValueError as e:
        out["refused"] = str(e)
    from jax.sharding import Mesh  # an axis name boft_jax does not shard over: said so
    try:
        sh.frozen_sharding({"k": np.zeros((64, 64))}, Mesh(np.asarray(jax.devices()), ("batch",)))
        out["unknown_axis"] = ""
    except ValueError as e:
        out["unknown_axis"] = str(e)
    print("RESULT" + json.dumps(out))
    """
)


@pytest.mark.slow
def test_sharded_training_matches_single_device_and_splits_the_weights(tmp_path):
    r = subprocess.run(
        [sys.executable, "-c", SHARDED_SCRIPT, str(tmp_path)], capture_output=True, text=True, env=_env(8, fast_compile=True), cwd=ROOT, timeout=900
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.split("RESULT", 1)[1])
    single = np.asarray(res["single"]["losses"])
    assert len(single) >= 3 and single[0] > single[-1]
    assert "k (9, 7) (axis sizes that divide it: 3, 7, 9)" in res["refused"], res["refused"]
    assert "has axes ['batch'] that boft_jax does not shard over" in res["unknown_axis"], res["unknown_axis"]
    total = res["total_bytes"]
    assert res["single"]["max_bytes"] == total
    for name in ("fsdp", "tp", "both"):
        np.testing.assert_allclose(res[name]["losses"], single, rtol=1e-5, atol=1e-5, err_msg=name)
        assert res[name]["n_dev"] == 8
        # about 1/8 of the base weights per device (norms, biases and tiny leaves stay replicated)
        assert res[name]["max_bytes"] < 0.2 * total, (name, res[name]["max_bytes"] / total)


JOB_PLACEMENT_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax
    from train import finetune, loop

    class Measured(Exception):
        pass

    def measure(task, opts, out, **kw):  # the job's state when training starts
        per_dev = {}
        for a in jax.live_arrays():
            for shard in a.addressable_shards:
                per_dev[shard.device.id] = per_dev.get(shard.device.id, 0) + shard.data.nbytes
        big = {tuple(l.shape) for l in jax.tree.leaves(task.frozen) if l.size >= 1024}
        whole = [tuple(a.shape) for a in jax.live_arrays() if tuple(a.shape) in big and len(a.sharding.device_set) == 1]
        total = sum(l.nbytes for l in jax.tree.leaves(task.frozen))
        print("RESULT" + json.dumps({"per_dev": per_dev, "whole": whole, "total": total}))
        raise Measured

    loop.fit = measure
    try:
        finetune.run(["--steps", "1", "--batch-size", "16", "--mesh", "data=8", "--output", sys.argv[1],
                      "--no-progress", "--eval-every", "0"])
    except Measured:
        pass
    """
)


@pytest.mark.slow
def test_the_job_holds_no_whole_copy_of_the_frozen_model_on_a_device(tmp_path):
    """With --mesh data=8 the frozen weights are FSDP-split when training starts, and no device also
    keeps the whole model as loaded (the loader's arrays on the default device did, for the whole run)."""
    r = subprocess.run([sys.executable, "-c", JOB_PLACEMENT_SCRIPT, str(tmp_path / "run")], capture_output=True, text=True,
                       env=_env(8, fast_compile=True), cwd=ROOT, timeout=600)
    assert r.returncode == 0 and "RESULT" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]
    res = json.loads(r.stdout.split("RESULT", 1)[1])
    assert res["whole"] == [], res["whole"]
    per_dev = res["per_dev"]
    assert len(per_dev) == 8
    # every live array on a device: its 1/8 of the base, the replicated adapter, norms and biases
    assert max(per_dev.values()) < 0.25 * res["total"], (per_dev, res["total"])


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_process_job_matches_one_process_and_only_process_0_writes(tmp_path):
    """``jax.distributed`` on CPU (gloo): 2 processes x 1 device (mesh data=2, the batch split
    across processes, the frozen weights FSDP-sharded across them) vs this process, 1 device."""
    from boft_jax.checkpoint import load_adapter

    args = ["--steps", "6", "--eval-every", "0", "--save-every", "3", "--no-progress", "--batch-size", "32", "--seed", "1", *FEW]
    port = _free_port()
    procs = []
    for pid in range(2):
        env = dict(_env(1, fast_compile=True), JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "train.finetune", "--output", str(tmp_path / "multi"), *args],
            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))
    logs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    # progress lines and the summary: process 0 only (process 1's console stays quiet unless it fails)
    assert "devices: 2 cpu" in logs[0] and "| mesh                        | data=2 |" in logs[0]
    for line in ("devices:", "held-out accuracy before", "held-out accuracy after", "| mesh"):
        assert line not in logs[1], (line, logs[1][-2000:])
    single = finetune.run(["--output", str(tmp_path / "single"), *args])

    def rows(run):
        return [json.loads(l) for l in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    multi_rows, single_rows = rows("multi"), rows("single")
    assert [r["step"] for r in multi_rows] == [r["step"] for r in single_rows]  # no line written twice
    for a, b in zip(multi_rows, single_rows):
        for k in ("loss", "accuracy", "eval_accuracy"):
            if k in b:
                np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-5, err_msg=f"step {b['step']} {k}")
    am, _, _ = load_adapter(tmp_path / "multi" / "adapter")
    for x, y in zip(jax.tree.leaves(am), jax.tree.leaves(single["adapter"])):
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-5)
    assert (tmp_path / "multi" / "merged" / "model.safetensors").is_file()
    assert not list((tmp_path / "multi").glob(".adapter.tmp-*"))  # the shared temporary name was renamed


# ---------------------------------------------------------------------------------------------
# Crash safety
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigkill_then_resume_finishes_with_the_same_adapter(tmp_path, capsys):
    """Checkpoints every 2 steps (asynchronous); the kill lands while one is being written."""
    args = ["--steps", "20", "--save-every", "2", "--keep", "3", "--eval-every", "0", "--no-progress",
            "--batch-size", "32", "--seed", "3", *FEW]
    ref = finetune.run(["--output", str(tmp_path / "ref"), *args])["adapter"]

    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "train.finetune", "--output", str(out), *args],
        env=_env(fast_compile=True), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 600
    ckpts = out / "checkpoints"
    while time.time() < deadline:  # past step 10, at a moment when a step is mid-write
        names = [p.name for p in ckpts.iterdir()] if ckpts.exists() else []
        done = [int(n) for n in names if n.isdigit()]
        if done and max(done) >= 10 and any(".orbax-checkpoint-tmp" in n for n in names):
            break
        if done and max(done) >= 16:  # never caught a write in flight (a very fast disk): kill anyway
            break
        if proc.poll() is not None:
            pytest.fail("training finished before it could be killed mid-write")
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "adapter").exists()  # it really died before the end
    complete = max(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())

    capsys.readouterr()
    resumed = finetune.run(["--output", str(out), "--resume", *args])["adapter"]
    assert f"resumed from step {complete} " in capsys.readouterr().out  # the newest complete step
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
    assert not partial.exists()  # the dead save's temporary directory is removed, not kept forever
    assert sorted(p.name for p in tmp_path.iterdir()) == ["10"]
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
    # loading reads the last good checkpoint where it lies, with a warning, and moves nothing
    with pytest.warns(UserWarning, match=r"adapter is missing but \.adapter\.old-.*interrupted"):
        assert float(ck.load_adapter(path)[0]["l"]["kernel"]["skew"].max()) == 1.0
    assert not path.exists()
    # the next save puts it back first, then replaces it; a crash before any rename leaves the last
    # good checkpoint in place
    ck.save_adapter(path, old, cfg)
    assert path.exists() and not list(tmp_path.glob(".adapter.old-*"))
    monkeypatch.setattr(ck.os, "replace", lambda s, d: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        ck.save_adapter(path, new, cfg)
    monkeypatch.setattr(ck.os, "replace", real_replace)
    assert float(ck.load_adapter(path)[0]["l"]["kernel"]["skew"].max()) == 1.0


@pytest.mark.slow
def test_scan_layers_job_matches_the_unrolled_job(tmp_path, capsys):
    """--scan-layers: the same training (dropout 0, so no per-layer random streams) with the layers
    under nn.scan gives the same merged model as the unrolled run; its adapter is stacked per layer,
    and a --resume without the flag is refused."""
    from safetensors.numpy import load_file

    from boft_jax.checkpoint import load_adapter
    from train.make_base import VIT_BASE

    common = ["--steps", "4", "--save-every", "2", "--eval-every", "0", "--no-progress", "--batch-size", "16",
              "--dropout", "0", "--seed", "2", *FEW]
    finetune.run(["--output", str(tmp_path / "unrolled"), *common])
    finetune.run(["--output", str(tmp_path / "scanned"), "--scan-layers", *common])

    def skews(adapter):
        return {jax.tree_util.keystr(p): l for p, l in jax.tree_util.tree_leaves_with_path(adapter) if "skew" in jax.tree_util.keystr(p)}

    skew_u = skews(load_adapter(tmp_path / "unrolled" / "adapter")[0])
    skew_s = skews(load_adapter(tmp_path / "scanned" / "adapter")[0])
    # the adapter records its layout (loading it needs a base with the same one)
    assert [load_adapter(tmp_path / d / "adapter")[2]["scan_layers"] for d in ("unrolled", "scanned")] == [False, True]
    n_layers = len({re.search(r"layer_\d+", k).group() for k in skew_u})
    assert all(s.ndim == 3 for s in skew_u.values())  # (m, k, b(b-1)/2) per layer
    assert n_layers > 1 and skew_s and not any("layer_" in k for k in skew_s), skew_s.keys()
    assert all(s.ndim == 4 and s.shape[0] == n_layers for s in skew_s.values())  # stacked: (layers, m, k, ...)
    assert sum(s.size for s in skew_s.values()) == sum(s.size for s in skew_u.values())

    base = load_file(Path(VIT_BASE) / "model.safetensors")
    merged_u = load_file(tmp_path / "unrolled" / "merged" / "model.safetensors")
    merged_s = load_file(tmp_path / "scanned" / "merged" / "model.safetensors")
    assert merged_u.keys() == merged_s.keys()
    changed = [k for k in merged_u if k in base and merged_u[k].shape == base[k].shape and not np.allclose(merged_u[k], base[k])]
    assert any("attention" in k for k in changed), changed  # training moved the adapted layers
    for k, u in merged_u.items():
        np.testing.assert_allclose(merged_s[k], u, rtol=1e-4, atol=1e-5, err_msg=k)
    capsys.readouterr()
    assert finetune.main(["--output", str(tmp_path / "scanned"), *common, "--resume"]) == 2  # without the flag
    assert "scan_layers: checkpoint true, now false" in capsys.readouterr().err
    assert finetune.main(["--output", str(tmp_path / "unrolled"), *common, "--resume", "--scan-layers"]) == 2  # added
    assert "scan_layers: checkpoint false, now true" in capsys.readouterr().err


@pytest.mark.slow
def test_num_labels_gives_a_headless_checkpoint_a_fresh_trained_head(tmp_path, capsys):
    """A ViTModel checkpoint (no classifier) is refused with the option that fixes it; --num-labels N
    adds a zero head of N classes that trains in full (the held-out accuracy rises from chance), the
    merged model has that head, and a resume with another --num-labels is refused."""
    import shutil

    from safetensors.numpy import load_file, save_file

    from boft_jax.models import vit
    from train.make_base import VIT_BASE

    ckpt = tmp_path / "headless"
    shutil.copytree(VIT_BASE, ckpt)
    state = {k: v for k, v in load_file(ckpt / "model.safetensors").items() if not k.startswith("classifier.")}
    save_file(state, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(architectures=["ViTModel"])
    for k in ("id2label", "label2id"):
        cfg.pop(k, None)
    (ckpt / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "run"
    job = ["--output", str(out), "--checkpoint", str(ckpt), *SMALL, *FEW]
    assert finetune.main(job) == 2
    err = capsys.readouterr().err
    assert "has no classifier head" in err and "--num-labels N" in err, err
    assert finetune.main([*job, "--num-labels", "10", "--modules-to-save", ""]) == 2
    assert "the classifier head is all zeros (a fresh head from --num-labels)" in capsys.readouterr().err
    assert finetune.main(["--model", "t5", "--output", str(tmp_path / "t5"), "--num-labels", "3"]) == 2
    assert "--num-labels 3: only for --model vit" in capsys.readouterr().err
    res = finetune.run([*job, "--num-labels", "10"])
    assert res["acc_after"] > res["acc_before"] + 0.3  # the fresh head learned the new classes
    module, params = vit.from_pretrained(out / "merged")
    assert module.config.num_labels == 10 and np.any(np.asarray(params["classifier"]["kernel"]))
    assert finetune.main([*job, "--num-labels", "12", "--resume"]) == 2
    assert "num_labels: checkpoint 10, now 12" in capsys.readouterr().err
    # the bundled base already has a head of 10 classes: --num-labels 10 keeps it, and says so
    assert finetune.main(["--output", str(tmp_path / "kept"), "--num-labels", "10", "--data", str(tmp_path / "none.npz")]) == 2
    assert ("note: --num-labels 10: the checkpoint's classifier already has 10 classes; it is kept with its trained"
            " weights") in capsys.readouterr().out


def test_t5_data_that_is_a_directory_is_named_so(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    assert finetune.main(["--model", "t5", "--output", str(tmp_path / "run"), "--data", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err
    assert f"--data {tmp_path / 'data'}: a directory (expected a JSONL file" in err, err


@pytest.mark.slow
def test_an_image_folders_class_names_name_the_trained_models_classes(tmp_path, capsys):
    """Folders that are not the base's class names get ids by sorted name (a printed note says which),
    and the merged model's id2label / label2id and the adapter's metadata carry those names (the
    base's names for ids no folder took)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    from boft_jax.checkpoint import load_adapter
    from train.make_base import VIT_BASE

    digits = load_digits()
    folders = {5: "five", 6: "six", 7: "seven"}
    for d, name in folders.items():
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for j, img in enumerate(digits.images[digits.target == d][:30]):
            Image.fromarray((img * 255 / 16).astype(np.uint8), mode="L").save(tmp_path / "imgs" / name / f"{j}.png")
    out = tmp_path / "run"
    finetune.run(["--output", str(out), "--data", str(tmp_path / "imgs"), "--steps", "2", "--eval-every", "0",
                  "--no-progress", "--batch-size", "16", *FEW])
    assert ("no class folder is named after the model's classes (id2label ['0', '1', '2', '3', '4'] ...): folders"
            " sorted by name get labels 0..2: five -> 0, seven -> 1, six -> 2") in capsys.readouterr().out
    base_names = [v for _, v in sorted(json.loads((VIT_BASE / "config.json").read_text())["id2label"].items(), key=lambda kv: int(kv[0]))]
    merged = json.loads((out / "merged" / "config.json").read_text())
    want = ["five", "seven", "six", *base_names[3:]]
    assert [merged["id2label"][str(i)] for i in range(len(want))] == want and len(merged["id2label"]) == len(want)
    assert merged["label2id"] == {n: i for i, n in enumerate(want)}
    assert load_adapter(out / "adapter")[2]["class_names"] == {"0": "five", "1": "seven", "2": "six"}
    # the adapter alone exports the same merged model: same names, same weights
    from boft_jax.interop.__main__ import main as interop_main
    from safetensors.numpy import load_file

    assert interop_main(["export-merged", "--adapter", str(out / "adapter"), "--out", str(tmp_path / "exported")]) == 0
    exported = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert exported["id2label"] == merged["id2label"] and exported["label2id"] == merged["label2id"]
    a, b = load_file(out / "merged" / "model.safetensors"), load_file(tmp_path / "exported" / "model.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
