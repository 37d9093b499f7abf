"""BOFT finetuning: the main job.

With no arguments it finetunes the bundled base ViT (pretrained on digits 0-4) to digits 5-9 with
BOFT on the attention projections, on CPU in about a minute, and writes to ``runs/vit-digits``:

  metrics.jsonl          one line per 10 steps (loss, accuracy = the batch's accuracy, token accuracy
                         for T5, grad_norm) and per evaluation (eval_accuracy = held-out accuracy,
                         exact match of greedy generation for T5)
  curves.png             training loss / accuracy and held-out accuracy
  summary.md             the summary table printed at the end
  adapter/               the trained adapter (orbax) with its BOFTConfig
  merged/                the merged model as a Hugging Face directory (plain transformers loads it; the
                         base's preprocessor / tokenizer / generation config files are copied along)
  checkpoints/           step checkpoints (adapter, optimizer state, step, data position)

Examples::

  python -m train.finetune                                   # the default ViT job
  python -m train.finetune --model t5                        # the default T5 job
  python -m train.finetune --checkpoint path/to/hf-vit --data images.npz --targets all_linear
  python -m train.finetune --checkpoint path/to/hf-vit-224 --data image_folder --image-size 384
  python -m train.finetune --mesh data=2,model=4 --steps 1000 --resume --output runs/big

Multi-process (one process per host, or several on one machine): set JAX_COORDINATOR_ADDRESS
(host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID in each process (or launch under
SLURM / Open MPI, which jax detects) and run the same command everywhere with the same files;
--mesh then spans every process's devices, and only process 0 writes logs and outputs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import io
import json
import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path

# Before numpy loads: OpenBLAS's spinning worker threads steal the cores XLA computes on
# (numpy-side work here is small; one BLAS thread is enough).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

DEFAULT_OUTPUT = {"vit": "runs/vit-digits", "t5": "runs/t5-bytes"}
# What a run keeps in --output: their presence means a run is there (--resume or --overwrite needed).
RUN_ENTRIES = ("checkpoints", "adapter", "merged", "metrics.jsonl", "summary.md", "curves.png")


# files of a Hugging Face model directory besides its config and weights, copied into merged/
_SIDE_FILES = ("preprocessor_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "spiece.model", "added_tokens.json", "generation_config.json")
_LOCK: list[int] = []  # the open --output directory this process holds a lock on


def _refuse_a_previous_run(out: Path) -> None:
    """Exit 2 when ``out`` holds a run's outputs (the caller has neither --resume nor --overwrite)."""
    previous = [p for p in RUN_ENTRIES if (out / p).exists()]
    if previous:
        _fail(
            f"--output {out} already holds a run ({', '.join(previous)}); pass --resume to continue it,"
            " --overwrite to replace it, or choose another --output"
        )


def _lock_output(out: Path) -> None:
    """Hold an exclusive lock on ``out`` (created if needed) for the rest of the process, or exit 2
    naming the other job: two jobs writing one --output would interleave their metrics and mix their
    checkpoints.  A later job in the same process (tests, notebooks) releases the previous lock."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return
    while _LOCK:
        os.close(_LOCK.pop())
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out, os.O_RDONLY)
    except OSError as e:
        _fail(f"--output {out}: cannot write there ({e.strerror or e})")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # EWOULDBLOCK / EAGAIN: the lock is held
        os.close(fd)
        _fail(f"--output {out}: another job is writing to it now; wait for it to finish, or choose another --output")
    except OSError as e:  # ENOLCK, EOPNOTSUPP, ...: a file system without locks (NFS without its lock service, ...)
        os.close(fd)
        print(f"note: --output {out}: its file system does not support file locks ({e.strerror or e}), so this job"
              " cannot guard against a second job writing the same --output at the same time; make sure none does",
              file=sys.stderr)
        return
    _LOCK.append(fd)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train.finetune",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("model and data")
    g.add_argument("--model", choices=["vit", "t5"], default="vit", help="model family (default: vit)")
    g.add_argument("--checkpoint", help="Hugging Face model directory (default: the bundled base)")
    g.add_argument(
        "--num-labels", type=int, default=None,
        help="ViT: a classifier of N classes: a fresh zero-initialized one for a ViTModel checkpoint without"
        " a head, or one whose head has another number of classes; a head of N classes already there is"
        " kept (a note says so). It trains in full with the default --modules-to-save. Default: the"
        " checkpoint's head",
    )
    g.add_argument(
        "--image-size", default=None, metavar="S or HxW",
        help="ViT: train at another image size than the checkpoint's, e.g. 384 or 384x512: the position"
        " embeddings are resized to the new patch grid once, bicubically (as transformers'"
        " interpolate_pos_encoding=True), the bundled digits and image folders are resized to it (.npz arrays"
        " must have it), and merged/ is a model of that size (transformers runs it without the flag), with its"
        " preprocessor_config.json's size set to it. Default: the checkpoint's",
    )
    g.add_argument(
        "--data",
        help="ViT: an .npz file with arrays 'images' (N,H,W,C) and 'labels' (N,) (split 80/20 here) or"
        " 'train_images', 'train_labels', 'test_images', 'test_labels'; or an image folder with one sub-folder"
        " of images per class. T5: a JSONL file of {\"source\": ..., \"target\": ...} lines (byte-level"
        " models) or {\"source_ids\": [...], \"target_ids\": [...]} (token ids of the checkpoint's own"
        " tokenizer). Default: the bundled task (digits 5-9, resized to the model's image size if it is not"
        " 8x8; byte-level string tasks)",
    )
    g.add_argument("--output", help="output directory (default: runs/vit-digits or runs/t5-bytes)")
    g.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output")
    g.add_argument("--overwrite", action="store_true", help="replace a previous run in --output")
    b = p.add_argument_group("BOFT")
    b.add_argument("--block-size", type=int, help="b, features per block (default: 4 unless --block-num)")
    b.add_argument("--block-num", type=int, help="k, blocks per factor (instead of --block-size)")
    b.add_argument("--factors", type=int, default=2, help="m, butterfly factors (1 = OFT; default 2)")
    b.add_argument("--targets", default=None, help="a preset name (see --list-presets) or a regex (default: 'attention')")
    b.add_argument("--exclude", default=None, help="regex of layers to leave alone")
    b.add_argument("--modules-to-save", default=None,
                   help="regex of modules trained in full (default: ViT 'classifier', T5 none; '' for none)")
    b.add_argument("--dropout", type=float, default=0.25, help="multiplicative dropout p (default 0.25: regularizes the small default task)")
    b.add_argument("--bias", choices=["none", "boft_only", "all"], default="none",
                   help="which biases train: none (default), those of adapted layers, or every bias")
    b.add_argument("--mode", choices=["auto", "input", "weight"], default="auto",
                   help="how the rotation is applied, same results: rotate the activations (input), the kernel"
                   " once per step (weight), or the cheaper of the two per layer (auto, default)")
    b.add_argument("--cayley", choices=["exact", "neumann"], default="exact",
                   help="the Cayley map: exact linear solve (default) or its Neumann series (--neumann-terms)")
    b.add_argument("--neumann-terms", type=int, default=None, help="series terms for --cayley neumann (default 5)")
    b.add_argument("--list-presets", action="store_true", help="print the target presets and exit")
    o = p.add_argument_group("optimization")
    o.add_argument("--steps", type=int, default=None, help="training steps (default: ViT 300, T5 600)")
    o.add_argument("--batch-size", type=int, default=64, help="examples per step (default 64)")
    o.add_argument("--lr", type=float, default=None, help="peak learning rate (default: ViT 5e-3, T5 3e-3)")
    o.add_argument("--weight-decay", type=float, default=0.0,
                   help="AdamW weight decay of every trained leaf (default 0): it pulls the skew parameters toward"
                   " the identity rotation, but the output scales (which start at 1) toward 0, as PEFT's"
                   " boft_s under a Trainer")
    o.add_argument("--warmup", type=int, default=None,
                   help="linear warmup steps before the cosine decay, fewer than --steps (default: 20, or steps/10"
                   " for runs under 200 steps; 0: none, the run starts at the peak learning rate)")
    o.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip (default 1.0)")
    o.add_argument("--eval-every", type=int, default=100,
                   help="evaluate on the held-out split every N steps (default 100; 0: only before and after)")
    o.add_argument("--save-every", type=int, default=100,
                   help="write a step checkpoint (adapter, optimizer state, data position) every N steps (default 100)")
    o.add_argument("--keep", type=int, default=3, help="step checkpoints to keep (default 3)")
    o.add_argument("--seed", type=int, default=0, help="seed of the batch order and of dropout (default 0)")
    o.add_argument("--precision", choices=["float32", "bf16"], default="float32",
                   help="computation dtype of the base model (default float32; the rotations are always float32)")
    o.add_argument(
        "--scan-layers", action="store_true",
        help="run the encoder/decoder layers under nn.scan: one compiled layer body (about 3x less compile"
        " time for a 12-layer model); the adapter is then stacked per layer.  Dropout draws its masks from"
        " other random streams than the unrolled layers (the same seed gives other masks), so runs with and"
        " without it train to different numbers; with --dropout 0 and no base-model dropout they agree",
    )
    o.add_argument("--mesh", default=None, help="device mesh, e.g. 'data=2,model=4' (default: data=<all devices>)")
    o.add_argument(
        "--replicate-unsplit", action="store_true",
        help="keep frozen weights that no mesh axis divides whole on every device (plain data parallelism"
        " for them: more memory per device, same results) instead of refusing the mesh; e.g. 3 devices"
        " and weights of even sizes",
    )
    o.add_argument("--no-progress", action="store_true",
                   help="no progress bar; print the logged steps (every 10) as lines instead (e.g. in logs)")
    o.add_argument(
        "--system-malloc", action="store_true",
        help="leave glibc's allocator as it is (default when no accelerator plugin is installed:"
        " boft.keep_freed_memory(), which stops XLA's large buffers from page-faulting anew at every step)",
    )
    return p


def _within(path: Path, root: Path) -> bool:
    """Whether ``path`` is ``root`` or lies inside it (links resolved)."""
    p, r = path.resolve(), root.resolve()
    return p == r or r in p.parents


class UsageError(Exception):
    """Bad input: reported as one clear line and exit status 2, with nothing written."""


def _fail(msg: str) -> None:
    raise UsageError(msg)


# BOFTConfig's fields as this command's flags, for the library's messages
_FLAGS = {"block_size": "--block-size", "block_num": "--block-num", "n_factors": "--factors", "targets": "--targets",
          "exclude": "--exclude", "dropout": "--dropout", "bias": "--bias", "mode": "--mode", "cayley": "--cayley",
          "neumann_terms": "--neumann-terms", "modules_to_save": "--modules-to-save"}


def _in_flags(message: str) -> str:
    """A library message in this command's terms: ``BOFTConfig.dropout`` becomes ``--dropout``."""
    return re.sub(r"BOFTConfig\.(\w+)", lambda m: _FLAGS.get(m.group(1), m.group(0)), message)


def _load_data(task_lib, data, module, checkpoint, main: bool):
    """The task's data set; the loaders' notes (duplicates, cut examples, class mapping) are printed
    by process 0 only: every process of a multi-process job loads the same files."""
    with contextlib.nullcontext() if main else contextlib.redirect_stdout(io.StringIO()):
        return task_lib.load_data(data, module, checkpoint=checkpoint)


def _check_options(args) -> None:
    """Every number and combination of options, before anything is imported, read or written."""
    import math

    bad = []

    def need(ok: bool, msg: str) -> None:
        if not ok:
            bad.append(msg)

    def positive_int(name: str, value, minimum: int = 1) -> None:
        if value is not None:
            need(value >= minimum, f"--{name} {value}: must be an integer >= {minimum}")

    positive_int("steps", args.steps)
    positive_int("batch-size", args.batch_size)
    positive_int("save-every", args.save_every)
    positive_int("keep", args.keep)
    positive_int("warmup", args.warmup, 0)
    positive_int("eval-every", args.eval_every, 0)
    positive_int("block-size", args.block_size)
    positive_int("block-num", args.block_num)
    positive_int("neumann-terms", args.neumann_terms)
    positive_int("num-labels", args.num_labels)
    need(args.num_labels is None or args.model == "vit", f"--num-labels {args.num_labels}: only for --model vit"
         " (a classifier head); T5 predicts tokens")
    if args.image_size is not None:
        need(args.model == "vit", f"--image-size {args.image_size}: only for --model vit")
        need(_image_size(args.image_size) is not None, f"--image-size {args.image_size!r}: expected a size in pixels,"
             " S (square) or HxW (height x width), e.g. 384 or 384x512")
    need(0 <= args.seed < 2**32, f"--seed {args.seed}: must be an integer in [0, 2^32)")
    if args.lr is not None:
        need(math.isfinite(args.lr) and args.lr > 0, f"--lr {args.lr}: must be a finite number > 0")
    need(math.isfinite(args.weight_decay) and args.weight_decay >= 0, f"--weight-decay {args.weight_decay}: must be a finite number >= 0")
    need(math.isfinite(args.clip) and args.clip > 0, f"--clip {args.clip}: must be a finite number > 0 (the global gradient-norm bound)")
    need(args.block_size is None or args.block_num is None, "--block-size and --block-num: give one of them, not both")
    need(args.neumann_terms is None or args.cayley == "neumann", f"--neumann-terms {args.neumann_terms}: only used with --cayley neumann")
    need(not (args.resume and args.overwrite), "--resume and --overwrite: give one of them (continue the run in --output, or replace it)")
    need(args.mesh is None or bool(args.mesh.strip()), "--mesh '': give axis sizes such as 'data=2,model=4', or leave --mesh out")
    for name, what in (("checkpoint", "a model directory"), ("data", "a data file or folder"), ("output", "a directory"),
                       ("targets", "a preset name or a regex"), ("exclude", "a regex")):
        value = getattr(args, name)
        need(value is None or bool(value.strip()), f"--{name} {value!r}: empty; give {what}, or leave --{name} out for the default")
    if bad:
        _fail("; ".join(bad))


def _image_size(text: str) -> tuple[int, int] | None:
    """``"384"`` -> ``(384, 384)``, ``"384x512"`` -> ``(384, 512)``; None when not that form (or not
    positive)."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", text)
    if not m:
        return None
    h = int(m.group(1))
    w = int(m.group(2)) if m.group(2) else h
    return (h, w) if h > 0 and w > 0 else None


def run(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    _check_options(args)
    # Heavy imports after argument parsing, so --help is instant.
    import jax
    import jax.numpy as jnp
    import numpy as np

    import boft_jax as boft
    from boft_jax import sharding as sh
    from boft_jax.checkpoint import config_to_dict, save_adapter
    from boft_jax.models import hf, save_pretrained
    from boft_jax.models.vit import MissingHead
    from train import loop

    allocator = boft.host_memory.configure(args.system_malloc)
    try:
        sh.maybe_initialize_distributed()
    except ValueError as e:
        _fail(f"multi-process set-up: {e}")
    main = sh.is_main_process()
    # Progress lines go to the console of process 0 only (every process of a multi-process job runs
    # this same code); errors (_fail) are printed by every process, to stderr.
    info = print if main else (lambda *a, **k: None)
    kind = args.model
    family = __import__(f"boft_jax.models.{kind}", fromlist=["TARGET_PRESETS"])
    if args.list_presets:
        for k, v in family.TARGET_PRESETS.items():
            print(f"{k:14s} {v}")
        return {}

    # ---- validate everything before writing anything ---------------------------------------
    if kind == "vit":
        from train.make_base import VIT_BASE as default_ckpt
    else:
        from train.text_tasks import T5_BASE as default_ckpt
    ckpt_path = Path(args.checkpoint or default_ckpt)
    out = Path(args.output or DEFAULT_OUTPUT[kind])
    if out.exists() and not out.is_dir():
        _fail(f"--output {out}: exists and is not a directory")
    from boft_jax.checkpoint import check_storable_path

    try:
        check_storable_path(out.absolute())
    except ValueError as e:
        _fail(f"--output {out}: {e}")
    # What the job writes in --output (and what --overwrite removes): never where its inputs are.
    written = [out / p for p in RUN_ENTRIES]
    for flag, given in (("--checkpoint", ckpt_path), ("--data", Path(args.data) if args.data else None)):
        clash = [w for w in written if given is not None and _within(given, w)]
        if clash:
            _fail(f"{flag} {given} lies in {clash[0]}, which this job writes (or replaces) in --output {out};"
                  " copy it elsewhere first, or choose another --output")
        if given is not None and given.exists() and _within(out, given):
            _fail(f"--output {out} lies inside {flag} {given}: the job's files would become part of its input"
                  " (an image folder would gain a class, a model directory stray files); choose an --output"
                  " outside it")
    if args.resume and (out / "checkpoints").exists() and not (out / "checkpoints").is_dir():
        _fail(f"--resume: {out / 'checkpoints'} is a file, not the step-checkpoint directory;"
              " remove it, or pass --overwrite instead of --resume to replace the run")
    if args.resume:
        steps_there = (out / "checkpoints").is_dir() and any(p.name.isdigit() for p in (out / "checkpoints").iterdir())
        finished = [p for p in ("adapter", "merged", "summary.md") if (out / p).exists()]
        if finished and not steps_there:
            _fail(f"--resume: --output {out} holds a finished run's outputs ({', '.join(finished)}) but no step"
                  " checkpoint to continue from, so a resume would start from step 0 and replace them. Pass"
                  " --overwrite to replace the run, or choose another --output")
    if not ckpt_path.is_dir():
        _fail(f"--checkpoint {ckpt_path}: not a directory (expected a Hugging Face model directory with config.json)")
    try:
        mtype = hf.model_type(ckpt_path)
    except Exception as e:  # unreadable config.json
        _fail(f"--checkpoint {ckpt_path}: {e}")
    if hf.MODEL_FAMILIES[mtype] != kind:
        _fail(f"--checkpoint {ckpt_path} holds a '{mtype}' model but --model is '{kind}'")
    dtype = jnp.bfloat16 if args.precision == "bf16" else jnp.float32
    try:
        head = {"num_labels": args.num_labels} if args.num_labels is not None else {}
        # host arrays: the frozen weights go straight to their sharding below, so no device ever
        # holds the whole model (with the default device's copy kept, FSDP would save nothing there)
        module, params = family.from_pretrained(ckpt_path, dtype=dtype, scan_layers=args.scan_layers, host=True, **head)
    except (ValueError, OSError, TypeError) as e:  # TypeError: a config.json field of the wrong type
        hint = " (here: --num-labels N)" if isinstance(e, MissingHead) else ""
        _fail(f"--checkpoint {ckpt_path}: {e}{hint}")

    image_size = merged_prep = None
    if args.image_size is not None:
        from boft_jax.models.vit import preprocessor_for_image_size, with_image_size

        image_size = _image_size(args.image_size)
        trained_at, trained_grid = module.config.image_size, module.config.grid_size
        (ph, pw) = module.config.patch_size
        if image_size[0] < ph or image_size[1] < pw:
            _fail(f"--image-size {args.image_size}: smaller than one patch of --checkpoint {ckpt_path} (patch_size"
                  f" {ph}x{pw}); give a height >= {ph} and a width >= {pw}")
        module, params = with_image_size(module, params, image_size)
        if image_size == trained_at:
            info(f"note: --image-size {args.image_size} is the checkpoint's own image size: nothing to resize")
            image_size = None
        elif module.config.grid_size == trained_grid:
            info(f"note: --image-size {args.image_size}: the same {trained_grid[0]}x{trained_grid[1]} patch grid as the"
                 f" checkpoint's {trained_at[0]}x{trained_at[1]} pixels (the pixels beyond whole patches are dropped):"
                 " the position embeddings stay as they are")
        else:
            info(f"note: --image-size {args.image_size}: the checkpoint's position embeddings ({trained_at[0]}x"
                 f"{trained_at[1]} pixels, a {trained_grid[0]}x{trained_grid[1]} patch grid) resized bicubically to"
                 f" {image_size[0]}x{image_size[1]} pixels ({module.config.grid_size[0]}x{module.config.grid_size[1]}"
                 " patches)")
        prep_file = ckpt_path / "preprocessor_config.json"
        if image_size and prep_file.is_file():  # merged/ gets it with the new size: read it now, not after training
            try:
                prep = hf._read_json_object(prep_file, "a preprocessor config")
            except (OSError, ValueError) as e:
                _fail(f"--checkpoint {ckpt_path}: {prep_file.name} is unreadable: {e}; --image-size writes it with the"
                      " new size into merged/: fix or remove the file")
            try:
                merged_prep = preprocessor_for_image_size(prep, image_size)
            except ValueError as e:
                info(f"note: --image-size: merged/{prep_file.name} will be the checkpoint's, unchanged: {e}; set its"
                     f" input size to {image_size[0]}x{image_size[1]} before preprocessing images for merged/ with"
                     " transformers")

    trained_head = kind == "vit" and "classifier" in params and bool(np.any(params["classifier"]["kernel"]))
    if args.num_labels and trained_head:
        info(f"note: --num-labels {args.num_labels}: the checkpoint's classifier already has {args.num_labels}"
             " classes; it is kept with its trained weights (and class names), not replaced by a fresh one")
    targets = args.targets or "attention"
    targets = family.TARGET_PRESETS.get(targets, targets)
    if args.modules_to_save is not None:
        saved = args.modules_to_save or None
    else:
        saved = "classifier" if kind == "vit" else None
    block_size = 4 if args.block_size is None and args.block_num is None else args.block_size
    try:
        config = boft.BOFTConfig(
            block_size=block_size,
            block_num=args.block_num,
            n_factors=args.factors,
            targets=targets,
            exclude=args.exclude,
            dropout=args.dropout,
            bias=args.bias,
            mode=args.mode,
            cayley=args.cayley,
            neumann_terms=5 if args.neumann_terms is None else args.neumann_terms,
            modules_to_save=saved,
        )
    except (ValueError, TypeError) as e:
        _fail(f"BOFT options: {_in_flags(str(e))}")
    if kind == "vit" and "classifier" in params and not trained_head:
        if not config.saves_module("classifier"):
            _fail(f"the classifier head is all zeros (a fresh head{' from --num-labels' if args.num_labels else ''}) but"
                  f" --modules-to-save {args.modules_to_save!r} does not train it: a zero head gives every class the"
                  " same score whatever the adapter does. Keep 'classifier' in --modules-to-save (the default)")

    if kind == "vit":
        from train import vit_task as task_lib
    else:
        from train import text_tasks as task_lib
    try:
        data = _load_data(task_lib, args.data, module, ckpt_path, main)
    except (OSError, ValueError) as e:
        if args.data is None:
            _fail(f"the bundled data: {e}")
        said = str(e)  # the loaders' own messages start with the path (and a line number: "d.jsonl:3: ...")
        named = any(said.startswith(f"{p}:") for p in (args.data, Path(args.data)))
        _fail(f"--data {said}" if named else f"--data {args.data}: {said}")

    model = boft.wrap(module, config)
    try:
        adapter = boft.init_adapter(model, params, *task_lib.example_inputs(data))
    except ValueError as e:
        hint = ""
        if ("match none of" in str(e) and args.targets and args.targets not in family.TARGET_PRESETS
                and re.fullmatch(r"[\w-]+", args.targets)):
            near = difflib.get_close_matches(args.targets.replace("-", "_"), family.TARGET_PRESETS, n=1)
            hint = (f"\n(--targets {args.targets!r} is not a preset{f'; did you mean {near[0]!r}?' if near else ';'}"
                    " --list-presets lists them)")
        _fail(f"BOFT config does not fit the model: {_in_flags(str(e))}{hint}")
    try:
        mesh = sh.make_mesh(args.mesh or f"data={jax.device_count()}")
    except ValueError as e:
        _fail(f"--mesh: {e}")
    if args.batch_size % mesh.shape.get("data", 1):
        _fail(f"--batch-size {args.batch_size} is not divisible by the mesh's data axis ({mesh.shape.get('data', 1)})")
    if args.batch_size > len(data.train):
        _fail(f"--batch-size {args.batch_size} exceeds the {len(data.train)} training examples")
    frozen, _ = boft.split(boft.combine(params, adapter), config)
    del params  # (frozen holds the base weights from here on)
    try:
        # a mesh that cannot split the weights: say so now
        sh.frozen_sharding(frozen, mesh, strict=not args.replicate_unsplit)
    except ValueError as e:
        # the library's advice, in this command's terms
        advice = str(e).replace("strict=False", "pass --replicate-unsplit")
        _fail(f"--mesh {args.mesh or f'(default: data={jax.device_count()})'}: {advice}")
    if args.replicate_unsplit and (whole := sh.unsplit_weights(frozen, mesh)):
        mib = sum(n for _, n in whole) / 2**20
        info(
            f"note: --replicate-unsplit: {len(whole)} frozen weight(s) ({mib:.1f} MiB) that mesh {dict(mesh.shape)}"
            f" cannot split are held whole by every device, e.g. {', '.join(p for p, _ in whole[:3])}"
        )

    steps = task_lib.DEFAULT_STEPS if args.steps is None else args.steps
    try:
        loop.resolve_warmup(steps, args.warmup)
    except ValueError as e:
        _fail(f"--warmup {args.warmup}: {e}")
    if not (args.resume or args.overwrite):
        _refuse_a_previous_run(out)
    if main:
        _lock_output(out)
        if not (args.resume or args.overwrite):
            _refuse_a_previous_run(out)  # again, under the lock: a job that just finished may have written
    if args.overwrite and not args.resume and main:
        for q in written:  # the previous run's outputs, its summary and curves too
            if q.is_dir() and not q.is_symlink():
                shutil.rmtree(q)
            elif q.exists() or q.is_symlink():
                q.unlink()
    if main:
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / f".write-test-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            _fail(f"--output {out}: cannot write there ({e.strerror or e})")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("boft_jax.finetune: output directory ready")

    # ---- train --------------------------------------------------------------------------------
    from train import data as data_lib

    opts = loop.TrainOptions(
        steps=steps,
        batch_size=args.batch_size,
        learning_rate=task_lib.DEFAULT_LR if args.lr is None else args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup,
        clip_norm=args.clip,
        eval_every=args.eval_every,
        save_every=args.save_every,
        keep=args.keep,
        seed=args.seed,
        mesh=mesh,
        replicate_unsplit=args.replicate_unsplit,
        progress=not args.no_progress,
        run_identity={
            "model": kind,
            # by content: the same files / examples resume from any path; changed ones are refused
            "checkpoint": {"sha256": data_lib.fingerprint_files(ckpt_path)},
            "data": {"sha256": data_lib.fingerprint(data), "train": len(data.train), "test": len(data.test)},
            "precision": args.precision,
            # the adapter's tree (stacked or per layer) differs; runs started before the option existed
            # have no entry, read as false (loop.ABSENT_MEANS)
            "scan_layers": bool(args.scan_layers),
            "num_labels": args.num_labels,  # a fresh head of this size (None: the checkpoint's head)
            "image_size": list(image_size) if image_size else None,  # None: the checkpoint's
            # the adapter's definition; "mode" only changes how it is computed, not the result
            "boft": {k: v for k, v in config_to_dict(config).items() if k != "mode"},
        },
    )
    # Place the weights once, as training does (frozen sharded over the mesh, adapter replicated):
    # the evaluation before training then runs on the same placement as training and the final
    # evaluation (one compilation of the evaluation step, not two; no full copy on one device).
    frozen = sh.shard_frozen(frozen, mesh, strict=not args.replicate_unsplit)
    adapter = jax.device_put(adapter, sh.replicated(mesh))
    task = task_lib.make_task(model, frozen, adapter, data)
    n_base = boft.count_params(frozen)
    n_train = boft.count_params(adapter)
    info(
        f"{kind}: {ckpt_path} | data: {data.description} ({len(data.train)} train / {len(data.test)} held-out)\n"
        f"BOFT: b={config.block_size or '-'} k={config.block_num or '-'} m={config.n_factors} on"
        f" {len(boft.layer_paths(boft.combine(frozen, adapter)))} layers ({targets}); trainable"
        f" {loop.fmt_params(n_train, n_base)}; devices: {jax.device_count()} {jax.devices()[0].platform};"
        f" host allocator: {allocator}"
    )
    resume = args.resume
    if resume:  # every difference from the checkpoint's run, before any evaluation or training
        try:
            start = loop.check_resume(out, opts)
        except loop.ResumeMismatch as e:
            _fail(str(e))
        resume = start is not None
        if resume and start >= opts.steps:  # nothing to train: the outputs are written again from its last step
            info(f"--resume: the run in {out} already finished all {opts.steps} steps; nothing to train, its outputs"
                 " (adapter, merged model, summary) are written again from the step-checkpoint")
        if not resume:  # said before the evaluation and the training, not after
            info(f"--resume: no checkpoint in {out / 'checkpoints'}: a new run from step 0 (is --output {out} the run"
                 " to continue?)")
    t_start = time.time()

    def evaluate_before() -> float:  # called by fit after a resume's checkpoint is restored (a damaged one is found first)
        acc = task.evaluate(model, boft.combine(frozen, adapter), data.test)
        info(f"held-out {task_lib.METRIC} before finetuning: {acc:.3f}")
        return acc

    try:
        result = loop.fit(task, opts, out, resume=resume, eval_before=evaluate_before)
    except loop.ResumeMismatch as e:
        _fail(str(e))
    acc_before = result["eval_before"]
    adapter = result["adapter"]
    final_params = boft.combine(result["frozen"], adapter)
    acc_after = task.evaluate(model, final_params, data.test)
    if main:
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": opts.steps, "eval_accuracy": acc_after, "final": True}) + "\n")

    # ---- outputs ------------------------------------------------------------------------------
    extra = {}
    if kind == "vit" and data.class_names:  # an image folder's class names name the merged model's classes
        from boft_jax.models.vit import with_class_names

        module = with_class_names(module, data.class_names)
        extra["class_names"] = {str(i): n for i, n in sorted(data.class_names.items())}
    adapter_host = sh.gather_to_host(adapter)
    save_adapter(
        out / "adapter",
        adapter_host,
        config,
        metadata={"base_checkpoint": str(ckpt_path), "base_path": str(ckpt_path.absolute()), "model": kind,
                  "scan_layers": bool(args.scan_layers), "steps": opts.steps, task_lib.METRIC: acc_after,
                  # the adapter applies to the base at any size; it was trained at this one
                  # (boft_jax.models.vit.with_image_size, or interpolate_pos_encoding=True)
                  **({"image_size": list(image_size)} if image_size else {}), **extra},
    )
    merged = sh.gather_to_host(boft.merge(final_params, config))
    if main:
        save_pretrained(out / "merged", module, merged)
        for name in _SIDE_FILES:  # how inputs are prepared and decoded: the merged model needs them as the base did
            if (ckpt_path / name).is_file() and not (out / "merged" / name).exists():
                if name == "preprocessor_config.json" and merged_prep is not None:
                    hf.write_json(out / "merged" / name, merged_prep)
                else:
                    shutil.copyfile(ckpt_path / name, out / "merged" / name)
        loop.plot_curves(out / "metrics.jsonl", out / "curves.png", f"BOFT(m={config.n_factors}) finetuning: {data.description}",
                         metric=task.metric, train_metric=task.train_metric)
    wall = time.time() - t_start
    table = loop.summary_table(
        [
            ("model", f"{kind} ({ckpt_path.name})" + (f" at {image_size[0]}x{image_size[1]} pixels" if image_size else "")),
            ("task", data.description),
            ("BOFT", f"m={config.n_factors}, b={config.block_size or '-'}, k={config.block_num or '-'},"
                     f" targets={args.targets or 'attention'}" + (f", exclude={args.exclude}" if args.exclude else "")),
            ("training", f"cayley={config.cayley}"
                         + (f" ({config.neumann_terms} terms)" if config.cayley == "neumann" else "")
                         + f", mode={config.mode}, dropout={config.dropout:g}, bias={config.bias},"
                           f" {args.precision}, lr={opts.learning_rate:g}"),
            ("trainable params", loop.fmt_params(n_train, n_base)),
            (f"held-out {task_lib.METRIC} before", f"{acc_before:.3f}"),
            (f"held-out {task_lib.METRIC} after", f"{acc_after:.3f}"),
            ("steps (this run)", f"{result['steps_run']} x batch {opts.batch_size}"
                                 + (f" (resumed at step {result['start_step']} of {opts.steps})" if result["start_step"] else "")),
            ("train time (incl. compile)", f"{result['train_seconds']:.1f} s"),
            ("wall time (eval+train+save)", f"{wall:.1f} s"),
            ("mesh", ", ".join(f"{k}={v}" for k, v in result["mesh"].items())),
            ("outputs", f"{out}/{{adapter,merged,curves.png,metrics.jsonl,summary.md,checkpoints}}"),
        ]
    )
    if main:
        (out / "summary.md").write_text(table + "\n")
        print("\n" + table)
    return {
        "acc_before": acc_before,
        "acc_after": acc_after,
        "trainable": n_train,
        "base": n_base,
        "output": str(out),
        "adapter": adapter_host,
        "config": dataclasses.asdict(config),
    }


_IO_LOGGERS = ("absl", "asyncio")  # where orbax's and tensorstore's failed background writes are logged


def main(argv=None, *, exiting: bool = False) -> int:
    """The job; returns its exit status.  ``exiting=True`` (the command line): the process exits right
    after, so SIGTERM is then ignored instead of given back to its previous handler; a SIGTERM during
    the interpreter's (slow, with JAX loaded) shutdown would otherwise turn a finished job into exit 143."""
    import signal

    from boft_jax.checkpoint import abandoned_io_echo  # (train.loop imports that module anyway)
    from train import loop

    loop.clear_stop()

    def on_sigterm(signum, frame):
        # The first SIGTERM asks the training loop to stop after its current step (and that step's
        # checkpoint): raising here could land inside JAX/XLA code (a compile, a GC callback) and
        # crash the process.  A second one stops at once.
        if not loop.STOP.is_set():
            loop.request_stop()
            print("\nSIGTERM: stopping after the current training step (send it again to stop now)",
                  file=sys.stderr, flush=True)
            return
        _stop_now("SIGTERM again", loop.Terminated)  # the second one

    def on_sigint(signum, frame):  # Ctrl-C: at once, as Python's default, but never inside a checkpoint write
        # Also a stop after the current step: the exception raised here can be lost where it lands
        # (a callback that JAX or the garbage collector runs and whose exceptions are only printed),
        # and the job then ran on (CI: still training 300 s after a Ctrl-C during the first compile).
        loop.request_stop(KeyboardInterrupt)
        _stop_now("Ctrl-C", KeyboardInterrupt)

    def _stop_now(what, exc):
        if loop.writing_checkpoint():
            print(f"\n{what}: stopping as soon as the checkpoint being written is complete", file=sys.stderr,
                  flush=True)
        loop.stop_now(exc)  # at once, or right after the checkpoint being written

    try:
        previous = signal.signal(signal.SIGTERM, on_sigterm)
        # only where Ctrl-C raises KeyboardInterrupt now (not where it is ignored, e.g. a job started with &)
        previous_int = signal.getsignal(signal.SIGINT)
        if previous_int is signal.default_int_handler:
            signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread: leave signals alone
        previous = previous_int = None
    previous_hook = sys.unraisablehook

    def on_unraisable(info):
        # A stop exception raised by the handlers above can land where Python only reports it
        # ("Exception ignored in: <function _xla_gc_callback ...>" and a traceback): the request it
        # carries is already recorded (loop.request_stop) and is raised after the current step, so
        # nothing is lost and the report would only look like a crash.  Everything else is reported.
        if isinstance(info.exc_value, KeyboardInterrupt) and loop.STOP.is_set():
            return
        if abandoned_io_echo(info.exc_value, info.exc_traceback):  # see on_uncaught
            return
        previous_hook(info)

    sys.unraisablehook = on_unraisable
    previous_excepthook = sys.excepthook

    def on_uncaught(kind, value, tb):
        # A failed asynchronous checkpoint write (a full disk) leaves orbax coroutines and tensorstore
        # callbacks that fail later (the event loop is closed); they are printed (through
        # sys.unraisablehook, or this hook), one traceback each.  The failure itself is reported in
        # one line; these echoes say nothing more.
        if abandoned_io_echo(value, tb):
            return
        previous_excepthook(kind, value, tb)

    sys.excepthook = on_uncaught
    # orbax's threads log a full traceback per failed write (a full disk: hundreds of lines), and asyncio
    # one per abandoned write task: the messages stay, the tracebacks of I/O failures go
    terse = loop.TerseIOFailures()
    for name in _IO_LOGGERS:
        logging.getLogger(name).addFilter(terse)
    try:
        run(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except loop.Diverged as e:  # no adapter or merged model is written for a diverged run
        print(f"error: {e}", file=sys.stderr)
        return 1
    except loop.CheckpointWriteError as e:  # a full disk, a quota: the complete step checkpoints are intact
        print(f"error: {e}", file=sys.stderr)
        return 3
    except Exception as e:  # noqa: BLE001 - only I/O failures (a full disk while writing the outputs) get a line
        why = loop.io_failure(e)
        if why is None:
            raise
        print(f"error: writing or reading files failed ({why}); the step checkpoints already complete are intact:"
              " rerun the same command with --resume once the cause is fixed", file=sys.stderr)
        return 3
    except KeyboardInterrupt as e:
        term = isinstance(e, loop.Terminated)
        what = "terminated (SIGTERM)" if term else "interrupted"
        print(f"\n{what}: step checkpoints saved so far are complete; rerun the same command with --resume to"
              " continue (from the start if no step was saved yet)", file=sys.stderr)
        return 143 if term else 130
    finally:
        if not exiting:  # (the CLI keeps them: orbax's failed background writes may still report at exit)
            for name in _IO_LOGGERS:
                logging.getLogger(name).removeFilter(terse)
            sys.excepthook = previous_excepthook
            sys.unraisablehook = previous_hook
        if previous is not None:
            signal.signal(signal.SIGTERM, signal.SIG_IGN if exiting else previous)
            if previous_int is signal.default_int_handler:
                signal.signal(signal.SIGINT, previous_int)
        stopped = loop.STOP.is_set()
        loop.clear_stop()
    if stopped:  # SIGTERM after the last step: the job finished anyway
        print("the stop request (SIGTERM or Ctrl-C) came after the last training step: the job finished", file=sys.stderr)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    code = main(exiting=True)
    if code in (3, 130, 143):
        # Interrupted (every checkpoint written is complete and closed by now), or a failed write (3:
        # orbax's background writes of that step may still be failing): leave without the
        # interpreter's shutdown.  A Ctrl-C that lands while XLA compiles raises inside JAX's C++
        # code, and the shutdown then crashed (segfault, exit 139 instead of 130; 8 of 8 tries).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
