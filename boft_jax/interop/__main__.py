"""Command line: convert BOFT / OFT adapters between PEFT and boft_jax, and export merged models.

    python -m boft_jax.interop convert --from peft --adapter PEFT_DIR --out ORBAX_DIR [--base HF_DIR]
    python -m boft_jax.interop convert --from boft --adapter ORBAX_DIR --out PEFT_DIR [--base HF_DIR]
    python -m boft_jax.interop export-merged --adapter DIR --out HF_DIR [--base HF_DIR]

The base model (a Hugging Face ViT or T5 directory) defaults to the one recorded with the adapter
(``base_model_name_or_path`` in a PEFT ``adapter_config.json``; in an orbax checkpoint's metadata
that key, or ``base_path`` / ``base_checkpoint`` as ``train.finetune`` records them) when that is a
local directory, so ``export-merged --adapter runs/vit-digits/adapter --out m`` needs no ``--base``.  ``--out`` must be new or empty
(``--overwrite`` replaces an existing one of the kind the command writes: an adapter checkpoint, a
PEFT adapter, a model directory; anything else is refused), and is never the base or adapter
directory, inside one, or around one.  A merged export is written aside and swapped in, so a
failure half-way leaves the previous one whole.
No torch is needed; nothing is unpickled.
The functions behind the commands (:func:`load_any_adapter`, :func:`convert`,
:func:`export_merged`) can be imported from ``boft_jax.interop.__main__``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from boft_jax.interop import peft as peft_io

_FORMATS = ("peft", "boft")


def _detect_format(adapter: str | os.PathLike, asked: str = "auto", flag: str = "--from") -> str:
    """The format of ``adapter`` by its files.  ``asked`` (a format, or "auto"): another format's files
    are an error naming the option (``flag``) that reads them; neither format's files leave ``asked`` to its
    loader (which names what is missing), or are an error for "auto"."""
    p = Path(adapter)
    found = ("peft" if (p / peft_io.ADAPTER_CONFIG_NAME).is_file()
             else "boft" if (p / "meta").exists() and (p / "adapter").exists() else None)
    if found is not None and asked not in ("auto", found):
        kinds = {"peft": "a PEFT adapter directory", "boft": "a boft_jax (orbax) adapter checkpoint"}
        raise ValueError(f"adapter {os.fspath(adapter)!r} is {kinds[found]}, not {kinds[asked]}: use {flag} {found}")
    if found is not None or asked != "auto":
        return found or asked
    found = sorted(x.name for x in p.iterdir()) if p.is_dir() else "not a directory"
    raise ValueError(
        f"cannot tell the format of adapter {os.fspath(adapter)!r}: neither a PEFT adapter"
        f" ({peft_io.ADAPTER_CONFIG_NAME}) nor a boft_jax orbax checkpoint ('adapter' + 'meta'); found {found}."
        f"{peft_io.named_adapters_hint(p)}"
    )


def _recorded_bases(adapter: str | os.PathLike, fmt: str) -> list[str]:
    """Base model locations recorded with the adapter, most specific first."""
    if fmt == "peft":
        name = peft_io.read_adapter_config(adapter).get("base_model_name_or_path")
        return [name] if isinstance(name, str) and name else []
    meta = Path(adapter) / "meta" / "metadata"  # boft_jax.checkpoint's JSON metadata entry
    if not meta.is_file():
        return []
    try:
        with open(meta, encoding="utf-8") as f:
            recorded = json.load(f).get("metadata") or {}
    except (ValueError, AttributeError) as e:
        raise ValueError(f"{meta}: unreadable checkpoint metadata ({e})") from None
    if not isinstance(recorded, dict):
        return []
    # base_path / base_model_name_or_path: `convert`; base_checkpoint: the train.finetune job
    keys = ("base_path", "base_model_name_or_path", "base_checkpoint")
    return [v for v in (recorded.get(k) for k in keys) if isinstance(v, str) and v]


def _resolve_base(base: str | None, adapter: str | os.PathLike, fmt: str) -> str:
    if base is not None:
        return os.fspath(base)
    recorded = _recorded_bases(adapter, fmt)
    for candidate in recorded:
        if Path(candidate).is_dir():
            return candidate
    raise ValueError(
        f"no base model given: pass --base HF_DIR (the adapter records {recorded or 'no base model'},"
        " which is not a local directory)"
    )


def _num_labels_hint(adapter: str | os.PathLike, fmt: str, tree: Any = None) -> int | None:
    """Classifier size carried by the adapter (a ViT head in modules_to_save), if any."""
    if fmt == "peft":
        from safetensors import safe_open

        weights = Path(adapter) / peft_io.ADAPTER_WEIGHTS_NAME
        if not weights.is_file():
            return None  # read_peft_adapter says what is missing (or that only a pickle is there)
        from boft_jax.models.hf import safetensors_errors

        with safetensors_errors(weights), safe_open(os.fspath(weights), framework="numpy") as f:
            for key in f.keys():
                if key.removeprefix(peft_io.PEFT_PREFIX) in ("classifier.weight", "classifier.modules_to_save.default.weight"):
                    return int(f.get_slice(key).get_shape()[0])
        return None
    head = (tree or {}).get("classifier", {})
    kernel = head.get("kernel") if isinstance(head, dict) else None
    return int(kernel.shape[-1]) if kernel is not None and hasattr(kernel, "shape") else None


def _is_scanned(tree: Any) -> bool:
    """Whether an adapter tree has the ``scan_layers=True`` layout of boft_jax's ViT / T5 (a stacked
    ``layers`` subtree in a layer stack instead of ``layer_{i}`` subtrees)."""
    return isinstance(tree, dict) and any(
        (key == "layers" and isinstance(sub, dict)) or _is_scanned(sub) for key, sub in tree.items()
    )


def _load_base(base: str, num_labels: int | None, scan_layers: bool):
    from boft_jax.models import hf, vit

    kind = hf.model_type(base)
    if kind == "vit":
        try:
            return vit.from_pretrained(base, num_labels=num_labels, scan_layers=scan_layers)
        except vit.MissingHead:
            # a base without a classifier (a ViTModel) and an adapter that brings none: the model
            # stays headless (it returns the CLS features, as the adapted ViTModel's last_hidden_state[:, 0])
            return vit.from_pretrained(base, num_labels=0, scan_layers=scan_layers)
    return hf.from_pretrained(base, scan_layers=scan_layers)


def load_any_adapter(
    adapter: str | os.PathLike, *, base: str | None = None, fmt: str = "auto", scan_layers: bool = False,
    flag: str = "--from",
):
    """``(wrapped_module, params, base_path, fmt, metadata)`` for a PEFT or orbax adapter + its base.

    An orbax adapter's recorded ``class_names`` and ``image_size`` (``train.finetune`` on an image
    folder, or with ``--image-size``) are applied to a ViT base, as in that run's ``merged/``."""
    import boft_jax as boft

    if not Path(adapter).exists():
        raise FileNotFoundError(f"adapter {os.fspath(adapter)!r} does not exist")
    if fmt not in (*_FORMATS, "auto"):
        raise ValueError(f"adapter format must be one of {_FORMATS} or 'auto', got {fmt!r}")
    fmt = _detect_format(adapter, fmt, flag)
    base = _resolve_base(base, adapter, fmt)
    if fmt == "peft":
        module, params = _load_base(base, _num_labels_hint(adapter, fmt), scan_layers)
        wrapped, params = peft_io.load_peft_adapter(adapter, module, params)
        metadata = {"converted_from": "peft", "peft_config": peft_io.read_adapter_config(adapter)}
        return wrapped, params, base, fmt, metadata
    from boft_jax.checkpoint import load_adapter

    tree, config, metadata = load_adapter(adapter)
    scan_layers = scan_layers or _is_scanned(tree)  # e.g. from train.finetune --scan-layers
    module, frozen = _load_base(base, _num_labels_hint(adapter, fmt, tree), scan_layers)
    if "lm_head" in tree and "lm_head" not in frozen and "shared" in frozen:
        # an adapted (or saved) head of a tied T5, e.g. converted from PEFT: the head is untied, as
        # load_peft_adapter does (PEFT runs a copy of the tied head)
        from boft_jax.models import t5

        module, frozen = t5.untie_head(module, frozen)
    from boft_jax.models import vit

    if metadata.get("class_names") is not None and isinstance(module, vit.ViT):
        # names a train.finetune run on an image folder recorded for its classes (its merged/ has them)
        where = f"adapter {os.fspath(adapter)!r}: metadata class_names"
        module = vit.with_class_names(module, metadata["class_names"], where)
    if metadata.get("image_size") is not None and isinstance(module, vit.ViT):
        # a train.finetune --image-size run: its merged/ is a model of that size, and so is this one
        try:
            module, frozen = vit.with_image_size(module, frozen, metadata["image_size"])
        except ValueError as e:
            raise ValueError(f"adapter {os.fspath(adapter)!r}: metadata image_size {metadata['image_size']!r}: {e}") from None
    return boft.wrap(module, config), boft.combine(frozen, tree), base, fmt, dict(metadata)


def _not_an_input(out: str | os.PathLike, given: str | os.PathLike | None, flag: str) -> None:
    """Never write into, over or around an input (the base model given or recorded, or the adapter):
    ``out`` may be neither the input, nor inside it, nor contain it."""
    if given is None or not Path(given).exists():
        return
    o, g = Path(out).resolve(), Path(given).resolve()
    if o == g:
        raise ValueError(f"--out {os.fspath(out)!r} is the {flag} directory itself; write to another directory")
    if g in o.parents or o in g.parents:
        where = "inside" if g in o.parents else "around"
        raise ValueError(
            f"--out {os.fspath(out)!r} lies {where} the {flag} {os.fspath(given)!r}; replacing it could delete or"
            " change that input: write to a directory apart from it"
        )


# What each command writes, and how to recognize a directory of each kind.
_KINDS = {"boft": "a boft_jax adapter checkpoint", "peft": "a PEFT adapter", "hf": "a Hugging Face model directory"}


def _dir_kind(d: Path) -> str | None:
    """``"boft"`` / ``"peft"`` / ``"hf"`` for a directory holding that kind of output, else ``None``."""
    from boft_jax.checkpoint import _is_checkpoint_dir

    if _is_checkpoint_dir(d):
        return "boft"
    if (d / peft_io.ADAPTER_CONFIG_NAME).is_file():
        return "peft"
    if (d / "config.json").is_file():
        return "hf"
    return None


def convert(
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    *,
    src: str,
    base: str | None = None,
    base_model_name_or_path: str | None = None,
    key_style: str = "transformers5",
    task_type: str | None = "auto",
    peft_type: str | None = None,
) -> None:
    """PEFT adapter (BOFT or OFT) -> orbax adapter checkpoint (``src="peft"``), or the reverse
    (``src="boft"``, written as PEFT ``peft_type`` "BOFT" or "OFT").

    A checkpoint converted from PEFT records that adapter's config: converted back, it keeps its
    ``peft_type`` (unless ``peft_type`` is given; otherwise "BOFT"), its ``task_type`` (when
    ``task_type="auto"``) and its ``revision``, so a round trip gives the same kind of adapter."""
    import boft_jax as boft

    wrapped, params, base_path, _, metadata = load_any_adapter(adapter, base=base, fmt=src)
    _not_an_input(out, base_path, "--base")  # also a base found through the adapter's record
    name = base_model_name_or_path or metadata.get("base_model_name_or_path") or base_path
    if src == "peft":
        from boft_jax.checkpoint import save_adapter

        _, tree = boft.split(params, wrapped.config)
        recorded = metadata["peft_config"].get("base_model_name_or_path")
        metadata = {
            **metadata,
            "base_model_name_or_path": base_model_name_or_path or recorded or base_path,
            "base_path": os.path.abspath(base_path),  # the local directory this adapter was checked against
        }
        save_adapter(out, tree, wrapped.config, metadata=metadata)
    else:
        recorded = metadata.get("peft_config") if metadata.get("converted_from") == "peft" else None
        recorded = recorded if isinstance(recorded, dict) else {}
        if peft_type is None:
            peft_type = recorded.get("peft_type") if recorded.get("peft_type") in peft_io._PEFT_TYPES else "BOFT"
        if task_type == "auto" and "task_type" in recorded:
            task_type = recorded["task_type"]
        revision = recorded.get("revision") if isinstance(recorded.get("revision"), str) else None
        if metadata.get("image_size") is not None:
            h, w = wrapped.model.config.image_size  # the recorded size, applied by load_any_adapter
            print(f"note: the adapter was trained at {h}x{w} pixels (train.finetune --image-size); a PEFT adapter"
                  " records no image size: give the base model such images with interpolate_pos_encoding=True"
                  " (transformers does this for square patch grids), or use export-merged for a model of that size",
                  file=sys.stderr)
        peft_io.save_peft_adapter(
            out, wrapped, params, base_model_name_or_path=name, key_style=key_style, task_type=task_type,
            peft_type=peft_type, revision=revision,
        )


def export_merged(
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    *,
    base: str | None = None,
    fmt: str = "auto",
    max_shard_bytes: int | None = None,
) -> None:
    """Fold the adapter into the base weights (``boft.merge``) and write a Hugging Face model
    directory (config.json + model.safetensors) that plain transformers loads, with the base's
    generation, tokenizer and preprocessor files (:data:`_COMPANIONS`) copied alongside."""
    import boft_jax as boft
    from boft_jax.models import hf, save_pretrained

    wrapped, params, base_path, _, metadata = load_any_adapter(adapter, base=base, fmt=fmt, flag="--format")
    _not_an_input(out, base_path, "--base")
    merged = boft.merge(params, wrapped.config)
    # the size load_any_adapter gave the model from the adapter's record
    prep = _resized_preprocessor(Path(base_path), wrapped.model.config.image_size) if metadata.get("image_size") else None

    def write(d: Path) -> None:
        save_pretrained(d, wrapped.model, merged, max_shard_bytes=max_shard_bytes)
        _copy_companions(Path(base_path), d)
        if prep is not None:
            hf.write_json(d / "preprocessor_config.json", prep)

    # written aside and swapped in: a failure half-way never leaves a mix of old and new shards
    peft_io.replace_dir(Path(out), write)


# Files of a base model directory that describe how to use the model, not its weights: copied into a
# merged export so that it generates, tokenizes and preprocesses as the base does.
_COMPANIONS = ("generation_config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "added_tokens.json", "spiece.model", "sentencepiece.bpe.model",
               "vocab.json", "vocab.txt", "merges.txt")


def _resized_preprocessor(base: Path, image_size: tuple[int, int]) -> dict | None:
    """The base's ``preprocessor_config.json`` for a ViT of ``image_size``
    (:func:`boft_jax.models.vit.preprocessor_for_image_size`), or None (copied as it is) when there
    is none, or with a note on stderr when it cannot be read or rewritten."""
    from boft_jax.models import hf
    from boft_jax.models.vit import preprocessor_for_image_size

    f = base / "preprocessor_config.json"
    if not f.is_file():
        return None
    try:
        return preprocessor_for_image_size(hf._read_json_object(f, "a preprocessor config"), image_size)
    except (OSError, ValueError) as e:
        print(f"note: the adapter was trained at {image_size[0]}x{image_size[1]} pixels, but the base's {f.name} is"
              f" copied unchanged ({type(e).__name__}: {e}); set its input size to {image_size[0]}x{image_size[1]}"
              " before preprocessing images for this model", file=sys.stderr)
        return None


def _copy_companions(base: Path, out: Path) -> None:
    """Copy the base's :data:`_COMPANIONS` that exist into ``out``."""
    import shutil

    for name in _COMPANIONS:
        if (base / name).is_file():
            shutil.copyfile(base / name, out / name)


_TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")  # PEFT's


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m boft_jax.interop",
        description="Convert BOFT adapters between PEFT (BOFT or OFT; adapter_config.json + adapter_model.safetensors)"
        " and boft_jax orbax checkpoints, or export a merged Hugging Face model. Supports the boft_jax"
        " ViT and T5 models; no torch needed, nothing unpickled.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{convert,export-merged}")

    conv = sub.add_parser(
        "convert",
        help="PEFT adapter <-> boft_jax orbax adapter checkpoint",
        description="Convert a BOFT adapter. --from peft: read a PEFT BOFT or OFT adapter directory, write an orbax"
        " checkpoint (boft_jax.checkpoint.save_adapter). --from boft: read an orbax checkpoint, write a PEFT"
        " adapter directory that PEFT loads to the same outputs.",
    )
    conv.add_argument("--from", dest="src", choices=_FORMATS, required=True, help="format of --adapter")
    conv.add_argument("--adapter", required=True, help="input adapter directory")
    conv.add_argument("--out", required=True, help="output directory")
    conv.add_argument(
        "--base",
        help="Hugging Face base model directory (ViT or T5); default: the adapter's recorded"
        " base_model_name_or_path if it is a local directory",
    )
    conv.add_argument(
        "--base-name",
        dest="base_name",
        help="base_model_name_or_path to record in the output (default: the input's, else --base)",
    )
    conv.add_argument(
        "--key-style",
        choices=("transformers5", "transformers4"),
        default="transformers5",
        help="--from boft: module names in the PEFT file (transformers 5: vit.layers.0.attention.q_proj;"
        " transformers 4: vit.encoder.layer.0.attention.attention.query). Default: transformers5",
    )
    conv.add_argument(
        "--task-type",
        default="auto",
        help="--from boft: PEFT task_type, one of " + ", ".join(_TASK_TYPES) + " (any case; default auto:"
        " SEQ_2_SEQ_LM for T5, none for ViT; 'none' for none)",
    )
    conv.add_argument(
        "--peft-type",
        dest="peft_type",
        choices=("BOFT", "OFT"),
        default=None,
        help="--from boft: write a PEFT BOFT adapter or an OFT one (needs n_factors = 1 and every output scale"
        " 1). Default: the type the checkpoint was converted from (it records the PEFT config), else BOFT."
        " --task-type auto and the revision likewise follow that record",
    )

    exp = sub.add_parser(
        "export-merged",
        help="write base + adapter merged into a Hugging Face model directory",
        description="Merge a BOFT adapter into its base model (K' = (M K) * s, trained biases and"
        " modules_to_save included) and write config.json + model.safetensors that plain transformers"
        " loads, with no adapter code at inference.",
    )
    exp.add_argument("--adapter", required=True, help="adapter directory (PEFT or orbax checkpoint)")
    exp.add_argument("--format", dest="fmt", choices=("auto",) + _FORMATS, default="auto", help="adapter format (default: auto-detect)")
    exp.add_argument("--out", required=True, help="output model directory")
    exp.add_argument("--base", help="Hugging Face base model directory (default: the adapter's recorded base)")
    exp.add_argument("--max-shard-bytes", type=int, help="split the weights into shards of at most this size")
    for p in (conv, exp):
        p.add_argument("--overwrite", action="store_true",
                       help="replace an existing, non-empty --out of the kind this command writes (an adapter"
                       " checkpoint, a PEFT adapter or a model directory); other directories are refused")
    return parser


def _check_out(out: str, adapter: str, base: str | None, overwrite: bool, writes: str) -> None:
    """Refuse an output that would overwrite something without --overwrite, anything but the kind of
    directory the command writes (``writes``, a key of ``_KINDS``) with it, or ever the inputs."""
    if not out.strip():
        raise ValueError("--out '': empty; give the output directory")
    target = Path(out).absolute()
    for parent in target.parents:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"--out {out!r}: {str(parent)!r} is a file, not a directory")
    if target.exists() and not target.is_dir():
        raise ValueError(f"--out {out!r} exists and is not a directory")
    for flag, given in (("--adapter", adapter), ("--base", base)):
        _not_an_input(target, given, flag)
    if target.is_dir() and any(target.iterdir()):
        if not overwrite:
            raise ValueError(
                f"--out {out!r} exists and is not empty ({len(list(target.iterdir()))} entries); pass --overwrite to"
                " replace it, or choose another directory"
            )
        kind = _dir_kind(target)
        if kind != writes:
            found = sorted(p.name for p in target.iterdir())
            raise ValueError(
                f"--out {out!r} holds {_KINDS[kind] if kind else 'other files'} ({found[:6]}{' ...' if len(found) > 6 else ''}),"
                f" and this command writes {_KINDS[writes]}: --overwrite replaces only a directory of that kind;"
                " choose another --out"
            )


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "export-merged" and args.max_shard_bytes is not None and args.max_shard_bytes < 1:
        parser.error(f"--max-shard-bytes must be a positive number of bytes, got {args.max_shard_bytes}")
    try:
        writes = "hf" if args.command == "export-merged" else ("boft" if args.src == "peft" else "peft")
        _check_out(args.out, args.adapter, args.base, args.overwrite, writes)
        if args.command == "convert":
            task_type = args.task_type.upper() if args.task_type.lower() not in ("auto", "none") else args.task_type.lower()
            if task_type not in (*_TASK_TYPES, "auto", "none"):
                raise ValueError(f"--task-type {args.task_type!r}: expected one of {', '.join(_TASK_TYPES)}, auto or none")
            task_type = None if task_type == "none" else task_type
            convert(
                args.adapter, args.out, src=args.src, base=args.base, base_model_name_or_path=args.base_name,
                key_style=args.key_style, task_type=task_type, peft_type=args.peft_type,
            )
        else:
            export_merged(args.adapter, args.out, base=args.base, fmt=args.fmt, max_shard_bytes=args.max_shard_bytes)
    except (ValueError, OSError, TypeError) as e:  # OSError: missing, unwritable, a file in the way
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
