"""The training loop: Optax on the adapter only, sharded frozen weights, orbax checkpoints, metrics.

Everything here is independent of the model family: a :class:`Task` supplies the loss and the
evaluation; :func:`fit` does the rest.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

import boft_jax as boft
from boft_jax import sharding as sh
from boft_jax.checkpoint import IncompleteCheckpoint, TrainCheckpointer
from train.data import Dataset, batch_indices

# loss_fn(model, params, inputs: dict, labels, rng, train: bool) -> (loss, accuracy)
LossFn = Callable[..., tuple[jax.Array, jax.Array]]
# evaluate(model, params, split) -> accuracy in [0, 1]
EvalFn = Callable[..., float]


@dataclass
class Task:
    name: str
    model: Any  # the wrapped linen module
    frozen: dict
    adapter: dict
    data: Dataset
    loss_fn: LossFn
    evaluate: EvalFn
    extra: dict = field(default_factory=dict)
    metric: str = "accuracy"  # what ``evaluate`` measures (logged as eval_accuracy, named in output)
    train_metric: str = "accuracy"  # what ``loss_fn``'s second output measures (logged as accuracy)


@dataclass
class TrainOptions:
    steps: int = 300
    batch_size: int = 64
    learning_rate: float = 3e-3
    weight_decay: float = 0.0
    warmup_steps: int | None = None  # None: 20, or steps // 10 for runs under 200 steps (see `warmup`)
    clip_norm: float = 1.0
    eval_every: int = 100
    save_every: int = 100
    keep: int = 3
    seed: int = 0
    mesh: str | Mesh | None = None  # spec like 'data=2,model=4', a Mesh, or None for data=<all devices>
    # Frozen weights that no mesh axis divides: False refuses the mesh (sharding.frozen_sharding's
    # strict check); True keeps them whole on every device (plain data parallelism for them).
    replicate_unsplit: bool = False
    progress: bool = True
    # What else defines the run (model, data, adapter config, precision...): stored with every
    # checkpoint; --resume refuses a checkpoint whose run differs from this one in any entry.
    run_identity: dict = field(default_factory=dict)

    @property
    def warmup(self) -> int:
        """The warmup steps used (:func:`resolve_warmup`)."""
        return resolve_warmup(self.steps, self.warmup_steps)

    def identity(self) -> dict:
        """Everything a resumed run must share with the checkpoint's (not logging or saving cadence)."""
        own = {k: getattr(self, k) for k in ("steps", "batch_size", "learning_rate", "weight_decay", "clip_norm", "seed")}
        return {**own, "warmup_steps": self.warmup, **self.run_identity}


def resolve_warmup(steps: int, warmup_steps: int | None) -> int:
    """The warmup of a run of ``steps`` steps: ``warmup_steps``, or by default 20 (``steps // 10``
    for runs under 200 steps, so that a short run is not all warmup).  ``ValueError`` unless
    ``0 <= warmup < steps``: a warmup as long as the run never reaches the peak learning rate."""
    warmup = min(20, steps // 10) if warmup_steps is None else warmup_steps
    if not 0 <= warmup < steps:
        raise ValueError(
            f"warmup of {warmup} steps in a run of {steps} steps: the warmup must be shorter than the run"
            " (0 <= warmup < steps; 0 means none), or the learning rate never reaches its peak"
        )
    return warmup


class ResumeMismatch(ValueError):
    """``--resume`` found a checkpoint of another run (options, adapter shapes) or a damaged one."""


# run-identity entries that runs from before the option existed do not hold, and the value that meant
ABSENT_MEANS = {"scan_layers": False, "num_labels": None, "image_size": None}


def _identity_diff(stored: dict, current: dict, prefix: str = "") -> list[str]:
    """Every entry where the checkpoint's run differs from this one, nested dicts (the BOFT config)
    by field: ``["boft.dropout: checkpoint 0.0, now 0.1", "learning_rate: ..."]``."""
    current = json.loads(json.dumps(current))  # compare as the JSON state stores them
    if not prefix:  # options older runs did not record: the value they had then
        stored, current = {**ABSENT_MEANS, **stored}, {**ABSENT_MEANS, **current}
    out = []
    for k in sorted(set(stored) | set(current), key=str):
        a, b = stored.get(k), current.get(k)
        if k == "data_sizes" and k not in current and isinstance(current.get("data"), dict):
            b = [current["data"].get("train"), current["data"].get("test")]  # recorded so before 2026-12-02
        if a == b or k not in stored:
            continue  # an entry this run records and the checkpoint's does not (a newer option) is not compared
        if isinstance(a, str) and isinstance(b, dict) and "sha256" in b:
            continue  # recorded by path by jobs before 2026-12-02 (now by content): nothing to compare
        if isinstance(a, dict) and isinstance(b, dict):
            out += _identity_diff(a, b, f"{prefix}{k}.")
        else:
            what = {"sha256": " (content hash: other files or examples than the checkpoint's run's)",
                    "image_size": " (--image-size; null: the base checkpoint's own size)"}.get(k, "")
            out.append(f"{prefix}{k}: checkpoint {json.dumps(a)}, now {json.dumps(b)}{what}")
    return out


class Diverged(RuntimeError):
    """A training step gave a non-finite loss or gradient (raised by :func:`fit`).

    The step's update was not applied (the jitted step keeps the adapter and optimizer state it
    was given when the loss or the gradient norm is not finite), so every step checkpoint holds
    finite values; no checkpoint is written for the step that diverged."""


class CheckpointWriteError(RuntimeError):
    """Writing a step checkpoint failed with an OS error (a full disk, a quota, a lost mount), raised
    by :func:`fit`; the message names the newest complete step checkpoint, which is intact (orbax
    commits a step by renaming a complete directory)."""


def _complete_steps(directory: Path) -> list[int]:
    """The committed step directories (plain numbers; half-written ones carry orbax's tmp suffix)."""
    try:
        return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())
    except OSError:
        return []


def io_failure(e: BaseException | None) -> str | None:
    """A one-line account of ``e`` if it, or what caused it, is an OS-level I/O failure: an ``OSError``
    (a full disk, a quota, a lost mount) or a library's wrapper of one (tensorstore's
    ``RESOURCE_EXHAUSTED ... No space left on device``, safetensors' ``I/O error``); else ``None``."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError):
            return f"{e.strerror or e}{': ' + str(e.filename) if e.filename else ''}"
        text = str(e)
        # (tensorstore says RESOURCE_EXHAUSTED for a full disk; XLA for device memory, which is no I/O failure)
        if any(k in text for k in ("I/O error", "No space left on device", "Disk quota exceeded")) or (
                "RESOURCE_EXHAUSTED" in text and "Error writing" in text):
            return f"{type(e).__name__}: {text.strip().splitlines()[0][:300]}"
        e = e.__cause__ or e.__context__
    return None


class TerseIOFailures(logging.Filter):
    """A logging filter that keeps the message of a record whose exception is an I/O failure
    (:func:`io_failure`) but drops its traceback: orbax's background threads log one per failed
    write, and the job reports the failure itself in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and io_failure(exc) is not None:
            record.exc_info, record.exc_text = None, None
        return True


@contextlib.contextmanager
def _write_errors(directory: Path, step: int | None = None):
    """An I/O failure (:func:`io_failure`) of a step checkpoint's save or of its background write as
    :class:`CheckpointWriteError`, naming the newest complete step; other exceptions pass unchanged."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - only I/O failures are converted
        why = io_failure(e)
        if why is None:
            raise
        done = _complete_steps(directory)
        last = (f"the newest complete one, step {done[-1]}, is intact: rerun the same command with --resume once"
                " the cause is fixed" if done else "no step checkpoint is complete, so a rerun starts from the beginning")
        when = f" at step {step}" if step is not None else ""
        raise CheckpointWriteError(
            f"writing step checkpoints in {directory} failed{when} ({why});"
            f" {last}"
        ) from e


def _finite_json(row: dict) -> dict:
    """``row`` with non-finite floats as ``null`` (``json.dumps`` would write ``NaN``, which is not JSON)."""
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in row.items()}


class Terminated(KeyboardInterrupt):
    """A stop request (SIGTERM): raised by :func:`fit` between two steps, after the step's
    checkpoint, or by ``train.finetune``'s handler at once on a second SIGTERM (once the
    checkpoint being written, if any, is complete: see :func:`stop_now`)."""


STOP = threading.Event()  # set by a signal handler (train.finetune); checked after every step
_pending: type[KeyboardInterrupt] | None = None  # a "stop now" that came while a checkpoint was being written
_stop_exc: type[KeyboardInterrupt] = Terminated  # what fit raises when it stops at STOP
_writing = 0  # depth of the checkpoint calls (save / wait / close) running on this thread


@contextlib.contextmanager
def _checkpoint_write():
    """Marks orbax calls that an exception raised by a signal handler must not cut short.

    Raising inside orbax's save or wait leaves a half-written ``.orbax-checkpoint-tmp`` step
    directory and logs its background threads' failures; so :func:`stop_now` only records the
    request while such a call runs, and it is raised here, when the call has returned.
    """
    global _writing, _pending
    _writing += 1
    try:
        yield
    finally:
        _writing -= 1
    if not _writing and _pending is not None:
        exc, _pending = _pending, None
        raise exc()


def writing_checkpoint() -> bool:
    """Whether a checkpoint call (save / wait / close) is running: a :func:`stop_now` then waits for it."""
    return _writing > 0


def stop_pending() -> bool:
    """Whether a :func:`stop_now` is waiting for the checkpoint being written."""
    return _pending is not None


def stop_now(exc: type[KeyboardInterrupt] = Terminated) -> None:
    """Stop at once (a second SIGTERM, or Ctrl-C with ``KeyboardInterrupt``): raises ``exc``, or,
    while a checkpoint is being written, records it (the first request wins) so that it is raised
    as soon as that write is complete."""
    global _pending
    if not _writing:
        raise exc()
    _pending = _pending or exc


def clear_stop() -> None:
    """Forget every stop request (:func:`request_stop` and a pending :func:`stop_now`)."""
    global _pending, _stop_exc
    STOP.clear()
    _pending = None
    _stop_exc = Terminated


def request_stop(exc: type[KeyboardInterrupt] = Terminated) -> None:
    """Ask the running :func:`fit` to stop after its current step, raising ``exc`` there (safe from
    a signal handler: nothing is raised inside JAX/XLA code, which a raising handler could crash).
    The first request's ``exc`` wins."""
    global _stop_exc
    if not STOP.is_set():
        _stop_exc = exc
    STOP.set()


def _global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def make_optimizer(opts: TrainOptions) -> optax.GradientTransformation:
    """AdamW with linear warmup and cosine decay to 0 at ``opts.steps``, after global-norm gradient clipping.

    The learning rate rises linearly from 0 (at step 0) to ``opts.learning_rate`` over
    ``opts.warmup`` steps; with no warmup it starts at the peak.  Raises ``ValueError`` when the
    warmup would take the whole run (``warmup >= steps``): the rate would never reach its peak.
    """
    warmup = opts.warmup
    if warmup == 0:
        schedule = optax.cosine_decay_schedule(opts.learning_rate, opts.steps)
    else:
        schedule = optax.warmup_cosine_decay_schedule(0.0, opts.learning_rate, warmup, opts.steps, end_value=0.0)
    return optax.chain(optax.clip_by_global_norm(opts.clip_norm), optax.adamw(schedule, weight_decay=opts.weight_decay))


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="finetune", unit="step", dynamic_ncols=True)


def _master_copy(tree):
    """``tree`` with float leaves narrower than float32 (bf16 / f16 biases and saved modules of a
    half-precision base) as float32: the optimizer updates these master copies, so steps smaller
    than a bf16 ulp are not rounded away.  The model sees them cast back (:func:`_cast_like`)."""
    def up(x):
        dt = jnp.dtype(x.dtype)
        return x.astype(jnp.float32) if jnp.issubdtype(dt, jnp.floating) and dt.itemsize < 4 else x

    return jax.tree.map(up, tree)


def _cast_like(tree, dtypes):
    """``tree``'s leaves cast to ``dtypes`` (a tree of dtypes of the same structure)."""
    return jax.tree.map(lambda x, d: x if x.dtype == d else x.astype(d), tree, dtypes)


def _fresh_copy(tree):
    """New buffers for every array leaf (``device_put`` may alias a buffer into one of the shards)."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True) if isinstance(x, (jax.Array, np.ndarray)) else x, tree)


def _restore_for_resume(ckpt: TrainCheckpointer, adapter, opt_state, opts: TrainOptions, out_dir: Path):
    """The newest checkpoint as ``(step, adapter, opt_state, state)`` (``None`` when there is none), or
    :class:`ResumeMismatch` when it is damaged or belongs to a run with other options."""
    if _compare_with_checkpoint(ckpt, opts, out_dir) is None:
        return None
    try:
        return ckpt.restore_latest(adapter, opt_state)
    except ValueError as e:  # incomplete, shapes or tree structure differ from this run's, or damaged files
        raise ResumeMismatch(f"--resume: the checkpoint in {out_dir / 'checkpoints'} cannot be resumed here: {e}") from None


def check_resume(out_dir: Path, opts: TrainOptions) -> int | None:
    """The step a resume of the run in ``out_dir`` would start from (``None``: no checkpoint), after
    comparing the newest checkpoint's recorded options with ``opts``; no arrays are read, so a job
    can call it before any work.  :class:`ResumeMismatch` lists *every* difference: batch size,
    seed, learning-rate schedule, the run identity (model, data, each BOFT config field...)."""
    out_dir = Path(out_dir)
    if not (out_dir / "checkpoints").is_dir():
        return None
    ckpt = TrainCheckpointer(out_dir / "checkpoints", save_every=opts.save_every, keep=opts.keep)
    try:
        return _compare_with_checkpoint(ckpt, opts, out_dir)
    finally:
        ckpt.close()


def _compare_with_checkpoint(ckpt: TrainCheckpointer, opts: TrainOptions, out_dir: Path) -> int | None:
    """:func:`check_resume` on an open checkpointer."""
    try:
        latest = ckpt.latest_state()
    except ValueError as e:  # IncompleteCheckpoint too
        raise ResumeMismatch(f"--resume: {e}") from None
    if latest is None:
        return None
    start, state = latest
    # batch size and seed are also top-level state entries (the data position depends on them)
    recorded = {"batch_size": state.get("batch_size"), "seed": state.get("seed"), **state.get("run", {})}
    diff = _identity_diff(recorded, opts.identity())
    if diff:
        raise ResumeMismatch(
            f"--resume: the checkpoint at step {start} in {out_dir / 'checkpoints'} belongs to a run with other"
            f" options, so resuming would not continue it ({len(diff)} difference(s)): {'; '.join(diff)}. Use the"
            " same options, or start a new run (another --output, or --overwrite)"
        )
    if start > opts.steps:
        raise ResumeMismatch(f"--resume: the checkpoint is at step {start}, past --steps {opts.steps}")
    return start


def fit(task: Task, opts: TrainOptions, out_dir: Path, *, resume: bool = False,
        eval_before: float | Callable[[], float] | None = None) -> dict[str, Any]:
    """Train ``task.adapter`` for ``opts.steps`` steps; returns the final state and metrics.

    Writes ``metrics.jsonl`` (one line per logged step / eval) and step checkpoints under
    ``out_dir/checkpoints`` (adapter, optimizer state, step, data position).  With ``resume`` the
    newest complete checkpoint is restored and training continues exactly where it stopped.
    ``eval_before`` (the held-out metric of the untrained adapter, if the caller measured it) is
    logged as the step-0 row ``{"step": 0, "eval_accuracy": ..., "before": true}`` of a run that
    starts at step 0 (a resumed run keeps the row its first part wrote).  A callable is called once,
    after a resume's checkpoint is restored (a damaged or mismatched one is reported before that
    evaluation runs); the value is returned as ``"eval_before"``.

    Mixed precision: adapter leaves narrower than float32 (the biases and saved modules of a bf16 /
    f16 base) are trained as float32 masters, cast to their own dtypes for every forward pass, so
    small updates accumulate instead of being rounded away.  Checkpoints hold the masters; the
    returned ``"adapter"`` is cast back (what the model ran with), ``"master"`` is the float32 copy.
    """
    out_dir = Path(out_dir)
    mesh = opts.mesh if isinstance(opts.mesh, Mesh) else sh.make_mesh(opts.mesh or f"data={jax.device_count()}")
    data_size = mesh.shape.get("data", 1)
    if opts.batch_size % data_size:
        raise ValueError(f"batch size {opts.batch_size} is not divisible by the mesh's data axis ({data_size})")
    rep = sh.replicated(mesh)
    frozen = sh.shard_frozen(task.frozen, mesh, strict=not opts.replicate_unsplit)
    optimizer = make_optimizer(opts)
    # The step donates the adapter and optimizer state; copy them so that donation never deletes
    # arrays the caller still holds (e.g. modules_to_save leaves shared with the frozen tree).
    # The model runs with the adapter in its own dtypes; training updates float32 masters of them.
    dtypes = jax.tree.map(lambda x: jnp.dtype(x.dtype), task.adapter)
    adapter = jax.device_put(_fresh_copy(_master_copy(task.adapter)), rep)
    opt_state = jax.device_put(_fresh_copy(optimizer.init(adapter)), rep)
    model, loss_fn = task.model, task.loss_fn
    base_key = jax.random.key(opts.seed)

    def step_fn(adapter, opt_state, frozen, inputs, labels, step):
        rng = jax.random.fold_in(base_key, step)

        def objective(a):
            return loss_fn(model, boft.combine(frozen, _cast_like(a, dtypes)), inputs, labels, rng, True)

        (loss, acc), grads = jax.value_and_grad(objective, has_aux=True)(adapter)
        grad_norm = _global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt_state = optimizer.update(grads, opt_state, adapter)
        new_adapter = optax.apply_updates(adapter, updates)
        # a non-finite step changes nothing: fit stops with Diverged when it reads the flag
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        adapter, opt_state = jax.tree.map(keep, (new_adapter, new_opt_state), (adapter, opt_state))
        return adapter, opt_state, {"loss": loss, "accuracy": acc, "grad_norm": grad_norm, "finite": finite}

    step_jit = jax.jit(step_fn, out_shardings=(rep, rep, rep), donate_argnums=(0, 1))

    ckpt = TrainCheckpointer(out_dir / "checkpoints", save_every=opts.save_every, keep=opts.keep)
    start = 0
    identity = opts.identity()
    main = sh.is_main_process()  # in a multi-process job only process 0 writes logs and prints progress
    if resume:
        try:
            restored = _restore_for_resume(ckpt, adapter, opt_state, opts, out_dir)
        except ResumeMismatch:
            ckpt.close()
            raise
        if restored is None:
            if main:
                print(f"--resume: no checkpoint in {out_dir / 'checkpoints'}; starting from step 0")
        else:
            start, adapter, opt_state, state = restored
            adapter = jax.device_put(_fresh_copy(adapter), rep)
            opt_state = jax.device_put(_fresh_copy(opt_state), rep)
            if main:
                print(f"resumed from step {start} (data position {state.get('data_position')})")

    metrics_path = out_dir / "metrics.jsonl"
    if main and start == 0 and metrics_path.exists():
        metrics_path.unlink()
    elif main and start > 0 and metrics_path.exists():  # drop lines logged after the checkpoint we resume from
        kept = _metrics_until(metrics_path, start)
        tmp = metrics_path.with_name(f".{metrics_path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, metrics_path)  # a crash mid-write leaves the old log, never half of it

    def log(row):
        if main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(_finite_json(row)) + "\n")

    if callable(eval_before):
        try:
            eval_before = eval_before()
        except BaseException:  # (Ctrl-C while evaluating: no save is pending, the manager is closed)
            ckpt.close()
            raise
    if start == 0 and eval_before is not None:
        log({"step": 0, "eval_accuracy": float(eval_before), "before": True})

    def say(line: str) -> None:  # one line on the console, above the progress bar when there is one
        if main:
            (bar.write if bar is not None else print)(line)

    def check_finite(done: int, m: dict) -> None:
        if bool(m["finite"]):
            return
        with _checkpoint_write():
            ckpt.wait()  # a save still being written counts (it holds finite values)
        newest = ckpt.latest_step()
        kept = (f"the newest step checkpoint (step {newest}, in {out_dir / 'checkpoints'}) holds the adapter"
                f" before it" if newest is not None else "no step checkpoint was written")
        raise Diverged(
            f"training diverged at step {done}: loss {float(m['loss']):.4g}, gradient norm"
            f" {float(m['grad_norm']):.4g} (not finite). That step's update was not applied and nothing"
            f" was saved after it; {kept}. A resume keeps the run's options, so start a new run with a lower"
            f" learning rate than {opts.learning_rate:g}, data checked for extreme values, or (for a bf16 run)"
            " float32"
        )

    bsh = lambda x: jax.device_put(x, sh.batch_sharding(mesh, x.ndim))  # noqa: E731
    train_split = task.data.train
    bar = _progress(opts.steps, start, opts.progress and main)
    t0, last, last_done = time.time(), time.time(), start
    history = []
    step = start
    pending = None  # the previous step's (step, metrics), its finiteness not yet read
    try:
        for step in range(start, opts.steps):
            idx = batch_indices(len(train_split), opts.batch_size, opts.seed, step)
            batch = train_split.take(idx)
            inputs = {k: bsh(v) for k, v in batch.inputs.items()}
            adapter, opt_state, m = step_jit(adapter, opt_state, frozen, inputs, bsh(batch.labels), jnp.int32(step))
            done = step + 1
            if pending is not None:  # read one step late, so the host never waits on the step it just queued
                check_finite(*pending)
            pending = (done, m)
            logged = done % 10 == 0 or done == opts.steps or done == 1
            evaluated = bool(opts.eval_every) and done % opts.eval_every == 0 and done != opts.steps
            stop = STOP.is_set()  # read once: a step is saved only after its finiteness was checked
            saving = done % opts.save_every == 0 or done == opts.steps or stop
            if logged or evaluated or saving:  # nothing of a diverged step is logged, evaluated or saved
                check_finite(done, m)
                pending = None
            if logged:
                m = {k: float(v) for k, v in m.items() if k != "finite"}
                now = time.time()
                # examples per second since the previous row (the first row of a run includes compiling)
                row = {"step": done, **m, "examples_per_s": opts.batch_size * (done - last_done) / max(now - last, 1e-9)}
                if not history:  # said in the row, for whoever plots the rate
                    row["includes_compile"] = True
                last, last_done = now, done
                log(row)
                history.append(row)
                if bar is not None:
                    post = {"loss": f"{m['loss']:.4f}", "acc": f"{m['accuracy']:.3f}"}
                    if len(history) > 1:  # the run's first row's rate includes compiling
                        post["ex_s"] = f"{row['examples_per_s']:.0f}"
                    bar.set_postfix(post)
                else:
                    say(f"step {done}/{opts.steps}: loss {m['loss']:.4f}, batch {task.train_metric} {m['accuracy']:.3f},"
                        f" gradient norm {m['grad_norm']:.3g}")
            if evaluated:
                acc = task.evaluate(model, boft.combine(frozen, _cast_like(adapter, dtypes)), task.data.test)
                log({"step": done, "eval_accuracy": acc})
                history.append({"step": done, "eval_accuracy": acc})
                say(f"step {done}/{opts.steps}: held-out {task.metric} {acc:.3f}")
            with _checkpoint_write(), _write_errors(ckpt.directory, done):
                ckpt.save(done, adapter, opt_state, {"step": done, "data_position": done * opts.batch_size,
                                                     "batch_size": opts.batch_size, "seed": opts.seed, "run": identity},
                          force=done == opts.steps or stop)  # a stop request saves the step it stops at
            if bar is not None:
                bar.update(1)
            if stop and done < opts.steps:
                raise _stop_exc()
    finally:
        if bar is not None:
            bar.close()
        with _checkpoint_write(), _write_errors(ckpt.directory):  # finishes a save still in the background, even when stopping now
            ckpt.close()
    losses = [r["loss"] for r in history if "loss" in r]
    return {
        "losses": losses,
        "adapter": _cast_like(adapter, dtypes),  # what the model ran with (the masters are in the checkpoints)
        "master": adapter,
        "opt_state": opt_state,
        "frozen": frozen,
        "history": history,
        "train_seconds": time.time() - t0,
        "steps_run": opts.steps - start,
        "start_step": start,  # > 0: resumed from a step checkpoint
        "eval_before": eval_before,
        "mesh": dict(mesh.shape),
    }


def _metrics_until(path: Path, step: int) -> list[dict]:
    """The rows of ``metrics.jsonl`` up to ``step``, for a run resumed there.

    Drops rows logged after the checkpoint and the final evaluation row of a finished run (marked
    ``"final"``; the resumed run writes it again).  A last line cut short by a crash is dropped
    with a note; any other unreadable line is an error naming it.
    """
    lines = path.read_text().splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                print(f"{path}: dropping its last line, cut short (a crash while it was written): {line[:60]!r}")
                continue
            raise ResumeMismatch(f"--resume: {path} line {i + 1} is not JSON: {line[:60]!r}") from None
        if isinstance(row, dict) and row.get("step", 0) <= step and not row.get("final"):
            rows.append(row)
    return rows


def plot_curves(metrics_path: Path, out_png: Path, title: str, *, metric: str = "accuracy",
                train_metric: str = "accuracy") -> None:
    """Training loss, the batch metric (``train_metric``, the log's ``accuracy``) and the held-out
    ``metric`` (the log's ``eval_accuracy``) against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(l) for l in Path(metrics_path).read_text().splitlines() if l.strip()]
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_accuracy" in r]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=100)
    a1.plot([r["step"] for r in train], [r["loss"] for r in train], color="C0")
    a1.set_xlabel("step"), a1.set_ylabel("training loss"), a1.set_yscale("log"), a1.grid(alpha=0.3)
    a2.plot([r["step"] for r in train], [r["accuracy"] for r in train], color="C1", label=f"train batch {train_metric}")
    if evals:
        a2.plot([r["step"] for r in evals], [r["eval_accuracy"] for r in evals], "o-", color="C2", label=f"held-out {metric}")
    ylabel = metric if metric == train_metric else f"{train_metric} / {metric}"
    a2.set_xlabel("step"), a2.set_ylabel(ylabel), a2.set_ylim(0, 1.02), a2.grid(alpha=0.3), a2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)


def summary_table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    lines = [f"| {'':<{width}} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {k:<{width}} | {v} |" for k, v in rows]
    return "\n".join(lines)


def fmt_params(n: int, total: int) -> str:
    return f"{n:,} ({100 * n / total:.2f}% of {total:,})"


def batched_eval(predict: Callable, split, batch_size: int) -> float:
    """Accuracy of ``predict(inputs) -> correct (B,) bools`` over a split, padding the last batch."""
    n = len(split)
    correct = 0
    for lo in range(0, n, batch_size):
        idx = np.arange(lo, min(lo + batch_size, n))
        pad = batch_size - len(idx)
        idx_p = np.concatenate([idx, np.full(pad, idx[-1])]) if pad else idx
        part = split.take(idx_p)
        ok = np.asarray(predict(part.inputs, part.labels))
        correct += int(ok[: len(idx)].sum())
    return correct / max(n, 1)


__all__ = ["Task", "TrainOptions", "ResumeMismatch", "Diverged", "CheckpointWriteError", "io_failure", "TerseIOFailures",
           "fit", "make_optimizer", "resolve_warmup", "plot_curves", "summary_table", "fmt_params", "batched_eval"]
