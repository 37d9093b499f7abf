"""Data for the finetuning job: the bundled tasks, user data sets, and resumable batching.

Bundled (no downloads):
* ViT: scikit-learn's digits (1797 8x8 grey images).  The base ViT is pretrained on digits 0-4;
  the default finetuning task is digits 5-9: new classes the base has never been trained on.
* T5: a synthetic byte-level text task (see :mod:`train.text_tasks`).

User data: ``--data`` is an ``.npz`` file (``images`` (N, H, W, C) and ``labels`` (N,) int, or
``train_images``/``train_labels``/``test_images``/``test_labels``), an image folder (one
sub-folder per class), or for T5 a JSONL file of ``{"source": ..., "target": ...}`` lines.
Decoded image files and ``uint8`` arrays are 0-255 pixels: they are preprocessed as the
checkpoint's ``preprocessor_config.json`` says (:class:`PixelPrep`: rescale, normalize, resize
filter), or scaled to [0, 1] without one; float arrays are taken as already preprocessed.

Batches are a pure function of ``(seed, step)``: an epoch is a seeded permutation, so a resumed run
sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

PRETRAIN_CLASSES = (0, 1, 2, 3, 4)
FINETUNE_CLASSES = (5, 6, 7, 8, 9)


@dataclass(frozen=True)
class PixelPrep:
    """How 0-255 pixels ``(..., C)`` become ``pixel_values``: ``(x * rescale - mean) / std``.

    :func:`pixel_prep` reads it from a Hugging Face checkpoint's ``preprocessor_config.json``
    (``do_rescale`` / ``rescale_factor``, ``do_normalize`` / ``image_mean`` / ``image_std``,
    ``resample``: PIL's filter number, used when an image folder's files are resized); keys it lacks
    take ``ViTImageProcessor``'s defaults (rescale by 1/255, normalize with mean = std = 0.5,
    bilinear).  Without that file: ``x / 255``, no normalization, PIL's default filter.
    """

    rescale: float = 1 / 255
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    resample: int | None = None

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        x = np.asarray(pixels, np.float32) * np.float32(self.rescale)
        if self.mean is not None:
            x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return x.astype(np.float32)


def pixel_prep(checkpoint: str | Path | None, channels: int) -> PixelPrep:
    """The :class:`PixelPrep` of a checkpoint directory (default when it has no ``preprocessor_config.json``)."""
    f = Path(checkpoint) / "preprocessor_config.json" if checkpoint is not None else None
    if f is None or not f.is_file():
        return PixelPrep()
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
        if not isinstance(cfg, dict):
            raise TypeError(f"a JSON {type(cfg).__name__}, not an object")
        rescale = float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else 1.0
        mean = std = None
        if cfg.get("do_normalize", True):
            mean, std = (tuple(float(v) for v in np.broadcast_to(cfg.get(k, 0.5), (channels,))) for k in ("image_mean", "image_std"))
            if not all(v > 0 for v in std):
                raise ValueError(f"image_std {list(std)} must be positive")
        resample = cfg.get("resample", 2)
        if resample is not None and (not isinstance(resample, int) or not 0 <= resample <= 5):
            raise ValueError(f"resample {resample!r} is not a PIL filter number (0-5)")
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{f}: unusable image preprocessing settings ({type(e).__name__}: {e})") from None
    return PixelPrep(rescale, mean, std, resample)


@dataclass
class Split:
    """Arrays of one split: ``inputs`` is a dict of arrays with a leading example axis."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, idx: np.ndarray) -> "Split":
        return Split({k: v[idx] for k, v in self.inputs.items()}, self.labels[idx])


@dataclass
class Dataset:
    train: Split
    test: Split
    description: str
    kind: str = ""  # for JSONL text data: "text" (byte-level encoded) or "ids" (pre-tokenized)
    # {label id: class name} where the data names its classes (an image folder's sub-folders)
    class_names: dict[int, str] | None = None


def fingerprint(ds: Dataset) -> str:
    """SHA-256 of the examples as loaded (both splits' arrays, names, dtypes and shapes): the same
    data gives the same value whatever path it was read from; other data, another value."""
    h = hashlib.sha256()
    for name, split in (("train", ds.train), ("test", ds.test)):
        for key, a in sorted({**split.inputs, "<labels>": split.labels}.items()):
            a = np.ascontiguousarray(a)
            h.update(f"{name}/{key}:{a.dtype.str}:{a.shape};".encode())
            h.update(memoryview(a).cast("B"))  # no copy of the data
    return h.hexdigest()


MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".msgpack")  # what boft_jax.models reads from a directory
_SAMPLE = 1 << 24  # bytes hashed at each end of a weights file over _FULL_HASH_MAX
_FULL_HASH_MAX = 1 << 30


def fingerprint_files(directory: str | Path) -> str:
    """SHA-256 of the files a model directory is loaded from (``config.json``, ``*.safetensors`` or
    ``flax_model.msgpack``, index files): names, sizes and contents.  Files over 1 GiB contribute
    their first and last 16 MiB (with their size), so that a start of a large model's job costs
    well under a second; other files (``pytorch_model.bin``, a README) are not read."""
    h = hashlib.sha256()
    files = sorted(p for p in Path(directory).iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.suffix in MODEL_FILE_SUFFIXES)
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size};".encode())
        with open(f, "rb") as fh:
            if size <= _FULL_HASH_MAX:
                for chunk in iter(lambda: fh.read(_SAMPLE), b""):
                    h.update(chunk)
            else:
                h.update(fh.read(_SAMPLE))
                fh.seek(size - _SAMPLE)
                h.update(fh.read(_SAMPLE))
    return h.hexdigest()


def _train_test(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    n_test = max(1, int(round(n * test_fraction)))
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def digits(classes=FINETUNE_CLASSES, *, test_fraction: float = 0.25, seed: int = 0) -> Dataset:
    """scikit-learn's digits restricted to ``classes``; images (N, 8, 8, 1) in [0, 1], labels 0-9."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn, no download

    d = load_digits()
    keep = np.isin(d.target, classes)
    images = (d.images[keep] / 16.0).astype(np.float32)[..., None]
    labels = d.target[keep].astype(np.int32)
    tr, te = _train_test(len(labels), test_fraction, seed)
    full = Split({"pixel_values": images}, labels)
    return Dataset(full.take(tr), full.take(te), f"sklearn digits, classes {list(classes)}")


def _image_split(path: Path, arrays: dict, images_key: str, labels_key: str, prep: PixelPrep) -> Split:
    """Checked images ``(N, H, W, C)`` float32 and labels ``(N,)`` int32 (integral, >= 0); ``uint8``
    images are 0-255 pixels, preprocessed by ``prep``."""
    images, labels = np.asarray(arrays[images_key]), np.asarray(arrays[labels_key])
    where = f"{path}: '{images_key}' {images.shape} / '{labels_key}' {labels.shape}"
    if images.ndim != 4 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{where}: expected images (N, H, W, C) and labels (N,) with the same N")
    if len(labels) == 0:
        raise ValueError(f"{where}: no examples")
    if images.dtype.kind not in "biuf" or not np.isfinite(images.astype(np.float32)).all():
        raise ValueError(f"{where}: images must be finite numbers (found {images.dtype}"
                         f"{'' if images.dtype.kind not in 'f' else ' with NaN/inf'})")
    if labels.dtype.kind not in "biuf" or (labels.dtype.kind == "f" and not np.array_equal(labels, np.round(labels))):
        raise ValueError(f"{where}: labels must be integers (class indices), found {labels.dtype} values such as"
                         f" {labels.ravel()[:3].tolist()}")
    if labels.min() < 0:
        raise ValueError(f"{where}: labels must be class indices >= 0, found {labels.min()}")
    if labels.max() > np.iinfo(np.int32).max:  # int32 below: a larger index would wrap around
        raise ValueError(f"{where}: labels must be class indices < 2^31, found {labels.max()}")
    pixels = prep(images) if images.dtype == np.uint8 else images.astype(np.float32)
    return Split({"pixel_values": pixels}, labels.astype(np.int32))


def load_npz(path: str | Path, *, prep: PixelPrep = PixelPrep(), test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """An ``.npz`` image data set (see the module docstring); ``uint8`` images go through ``prep``."""
    path = Path(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"PK\x05\x06":  # a zip with nothing in it: np.savez() with no arrays
        raise ValueError(f"{path}: an .npz archive with no arrays; expected 'images' and 'labels' (or train_/test_ pairs)")
    if magic != b"PK\x03\x04":  # np.load would otherwise try (and refuse) to unpickle it
        raise ValueError(f"{path}: not an .npz archive (np.savez writes one; this file starts with {magic!r})")
    names = ("train_images", "train_labels", "test_images", "test_labels", "images", "labels")
    try:  # the zip directory, then each member (a damaged member fails only when read)
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            arrays = {k: z[k] for k in names if k in keys}
    except Exception as e:  # BadZipFile, bad CRC, zlib errors, object arrays (pickles), truncation
        raise ValueError(f"{path}: unreadable .npz archive ({type(e).__name__}: {e})") from None
    split_layout = {"train_images", "train_labels", "test_images", "test_labels"}
    layout = split_layout if split_layout <= keys else {"images", "labels"} if {"images", "labels"} <= keys else None
    if layout is not None and keys - layout:  # a user's own test set (or anything else) is never dropped quietly
        raise ValueError(
            f"{path}: holds arrays this loader would not use, {sorted(keys - layout)}, besides {sorted(layout)};"
            " give exactly one layout: 'images' and 'labels' (split 80/20 here), or 'train_images',"
            " 'train_labels', 'test_images' and 'test_labels' (your own held-out set)"
        )
    if layout == split_layout:
        return Dataset(
            _image_split(path, arrays, "train_images", "train_labels", prep),
            _image_split(path, arrays, "test_images", "test_labels", prep),
            f"{path}",
        )
    if layout is not None:
        full = _image_split(path, arrays, "images", "labels", prep)
        tr, te = _train_test(len(full), test_fraction, seed)
        return Dataset(full.take(tr), full.take(te), f"{path} ({1 - test_fraction:.0%}/{test_fraction:.0%} split)")
    raise ValueError(
        f"{path}: an .npz data set needs arrays 'images' (N,H,W,C) and 'labels' (N,), or"
        f" 'train_images', 'train_labels', 'test_images', 'test_labels'; found {sorted(keys)}"
    )


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def load_image_folder(path: str | Path, image_size: tuple[int, int], channels: int, *, prep: PixelPrep = PixelPrep(),
                      test_fraction=0.2, seed=0, class_names: Sequence[str] | None = None):
    """Images in ``path/<class name>/*`` (``IMAGE_SUFFIXES``), resized to ``image_size`` and
    preprocessed by ``prep``.

    Labels: with ``class_names`` (the model's ``id2label``, index = label id) and every folder named
    after one of them, each folder gets that class's id (a checkpoint that already knows the classes
    keeps its head's meaning); a folder set that matches only some of the names is an error (which
    id would the others get?).  Otherwise classes sorted by name get labels 0, 1, ... .  Either way
    a printed note gives the mapping, and the returned ``Dataset.class_names`` holds it (``{id:
    folder name}``), for the trained model's ``id2label``.

    A class folder without images is an error (its label would go unused and shift the others);
    anything else that is not read (other files, nested folders, files next to the class folders,
    hidden files) is listed in a printed note, never dropped silently.
    """
    from PIL import Image

    path = Path(path)
    classes = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{path}: an image folder needs one sub-folder per class; found none")
    skipped = [p for p in sorted(path.iterdir()) if not (p.is_dir() and p.name in classes)]
    ids = {name: i for i, name in enumerate(classes)}
    if class_names:
        known = {str(n): i for i, n in enumerate(class_names)}
        matched = [c for c in classes if c in known]
        if len(matched) == len(classes):
            ids = {c: known[c] for c in classes}
            print(f"note: {path}: class folders labelled by the model's class names (id2label): " + _mapping(ids))
        elif matched:
            raise ValueError(
                f"{path}: class folders {matched[:5]} are named after the model's classes (id2label) but"
                f" {[c for c in classes if c not in known][:5]} are not; name every folder after one of"
                f" {list(known)[:10]}{' ...' if len(known) > 10 else ''}, or none of them (then folders sorted by"
                " name get labels 0, 1, ...)"
            )
        else:
            print(f"note: {path}: no class folder is named after the model's classes (id2label"
                  f" {list(known)[:5]}{' ...' if len(known) > 5 else ''}): folders sorted by name get labels"
                  f" 0..{len(classes) - 1}: " + _mapping(ids))
    else:
        print(f"note: {path}: class folders sorted by name get labels 0..{len(classes) - 1}: " + _mapping(ids))
    images, labels, empty = [], [], []
    for name in classes:
        label = ids[name]
        count = 0
        for f in sorted((path / name).iterdir()):
            if not f.is_file() or f.suffix.lower() not in IMAGE_SUFFIXES or f.name.startswith("."):
                skipped.append(f)
                continue
            try:
                img = Image.open(f)
                if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
                    # Pillow's convert() clips these to 0-255 instead of scaling them: refuse, do not saturate
                    raise ValueError(
                        f"{f}: {img.mode!r} image (16/32-bit integer or float pixels), which would be clipped to"
                        " 8 bits; convert the data set to 8-bit images (or an .npz of float pixels in [0, 1])"
                    )
                img = img.convert("L" if channels == 1 else "RGB").resize(image_size[::-1], resample=prep.resample)
            except (OSError, Image.DecompressionBombError) as e:  # UnidentifiedImageError, truncated, huge
                raise ValueError(f"{f}: unreadable image ({type(e).__name__}: {e})") from None
            arr = prep(np.asarray(img, np.uint8))
            images.append(arr[..., None] if channels == 1 else arr)
            labels.append(label)
            count += 1
        if not count:
            empty.append(name)
    if empty:
        raise ValueError(
            f"{path}: class folder(s) {empty} hold no images ({'/'.join(IMAGE_SUFFIXES)}); every sub-folder is a"
            f" class, labelled by sorted name ({classes}): add images or remove them"
        )
    if skipped:
        shown = ", ".join(str(p.relative_to(path)) for p in skipped[:5])
        print(f"note: {path}: {len(skipped)} entr{'y' if len(skipped) == 1 else 'ies'} not read as training images"
              f" (not an image file ({'/'.join(IMAGE_SUFFIXES)}) inside a class folder): {shown}"
              f"{', ...' if len(skipped) > 5 else ''}")
    full = Split({"pixel_values": np.stack(images)}, np.asarray(labels, np.int32))
    tr, te = _train_test(len(full), test_fraction, seed)
    return Dataset(full.take(tr), full.take(te), f"image folder {path} ({len(classes)} classes)",
                   class_names={i: c for c, i in ids.items()})


def _mapping(ids: Mapping[str, int], limit: int = 10) -> str:
    """``'a -> 0, b -> 1, ...'`` for a note (the first ``limit`` classes; ids in label order)."""
    items = sorted(ids.items(), key=lambda kv: kv[1])
    return ", ".join(f"{c} -> {i}" for c, i in items[:limit]) + (", ..." if len(items) > limit else "")


# ------------------------------------------------------------------------------------------------
# Byte-level text (T5)
# ------------------------------------------------------------------------------------------------
PAD, EOS, UNK = 0, 1, 2
BYTE_OFFSET = 3
BYTE_VOCAB = 256 + BYTE_OFFSET


def encode_text(text: str, length: int) -> np.ndarray:
    """UTF-8 bytes + 3 (ByT5's layout: 0 pad, 1 eos, 2 unk), then EOS, padded/cut to ``length``.

    A text too long is cut at a character boundary (never inside a multi-byte character, which
    would train the model to emit invalid UTF-8), so it may keep a few bytes fewer than fit.
    """
    return encode_utf8(text.encode("utf-8"), length)


def encode_utf8(raw: bytes, length: int) -> np.ndarray:
    """:func:`encode_text` of text already encoded as UTF-8 bytes ``raw``."""
    if len(raw) + 1 > length:
        raw = raw[: length - 1].decode("utf-8", errors="ignore").encode("utf-8")  # drops a cut character's bytes
    return ids_row([b + BYTE_OFFSET for b in raw], length)


def decode_ids(ids) -> str:
    out = bytearray()
    for i in np.asarray(ids).tolist():
        if i == EOS:
            break
        if i >= BYTE_OFFSET:
            out.append(i - BYTE_OFFSET)
    return out.decode("utf-8", errors="replace")


def id_split(src: np.ndarray, tgt: np.ndarray) -> Split:
    """Encoder ids ``(N, S)`` (mask: non-pad) and label ids ``(N, L)`` as a :class:`Split`."""
    return Split({"input_ids": src, "attention_mask": (src != PAD).astype(np.int32)}, tgt)


def text_split(pairs: list[tuple[str, str]], src_len: int, tgt_len: int) -> Split:
    src = np.stack([encode_text(s, src_len) for s, _ in pairs])
    tgt = np.stack([encode_text(t, tgt_len) for _, t in pairs])
    return id_split(src, tgt)


def ids_row(ids, length: int) -> np.ndarray:
    """Pre-tokenized ids -> ``(length,)``: EOS appended if missing, cut to ``length`` (EOS kept last), PAD-padded."""
    ids = [int(i) for i in ids]
    if not ids or ids[-1] != EOS:
        ids.append(EOS)
    if len(ids) > length:
        ids = ids[: length - 1] + [EOS]
    return np.asarray(ids + [PAD] * (length - len(ids)), np.int32)


def load_jsonl(path: str | Path, src_len: int, tgt_len: int, *, test_fraction=0.2, seed=0,
               vocab_size: int | None = None) -> Dataset:
    """Source/target pairs, one JSON object per line, in either form (not mixed):

    - text: ``{"source": "...", "target": "..."}``, encoded byte-level (:func:`encode_text`);
    - pre-tokenized: ``{"source_ids": [...], "target_ids": [...]}``, token ids of the model's own
      tokenizer (T5 convention: pad 0, EOS 1; EOS is appended when missing).  Trailing pad ids (a
      tokenizer's ``padding="max_length"``) are dropped; a pad id before a sequence's last token, or
      an EOS before a target's last token, is an error (the attention mask and the loss skip pad
      ids, and generation stops at the first EOS, so such a line would not train what it says).
    Longer examples are cut to ``src_len`` / ``tgt_len``.  With ``vocab_size``, a token id at or
    above it is an error naming the line.
    """
    path = Path(path)
    rows, kinds, cut, unused = [], set(), [], {}
    keys, lines = [], []  # each pair's (source, target) digests and its line (for the notes on duplicates)
    with open(path, "rb") as f:
        data = f.read()
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark (some editors write one): not part of the JSON
        data = data[3:]
    for n, raw in enumerate(data.splitlines(), 1):  # \n, \r\n and \r line ends
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(
                f"{path}:{n}: not valid UTF-8 (byte {raw[e.start]:#04x} at byte {e.start} of the line: {e.reason});"
                " JSONL is UTF-8: save the file as UTF-8"
            ) from None
        if not line.strip():
            continue
        try:
            try:
                row = json.loads(line, object_pairs_hook=_unique_keys)
            except json.JSONDecodeError:
                if line.strip() in ("[", "{"):
                    raise _BadIds(
                        f"the line is just {line.strip()!r}: this looks like pretty-printed JSON, but JSONL holds one"
                        " whole JSON object per line" + _JSONL_HINT
                    ) from None
                raise
            if not isinstance(row, dict):
                what = "a JSON array" if isinstance(row, list) else f"the JSON value {_short_json(row)}"
                raise _BadIds(
                    f"the line holds {what}, not an object; JSONL holds one JSON object per line, e.g."
                    ' {"source": "...", "target": "..."}' + (_JSONL_HINT if isinstance(row, list) else "")
                )
            if ({"source_ids", "target_ids"} & row.keys()) and ({"source", "target"} & row.keys()):
                raise _BadIds(
                    f"holds keys of both forms, {sorted(row.keys() & {'source', 'target', 'source_ids', 'target_ids'})};"
                    " give 'source' and 'target' (text) or 'source_ids' and 'target_ids' (token ids)"
                )
            for k in row.keys() - {"source", "target", "source_ids", "target_ids"}:
                unused.setdefault(k, n)
            if "source_ids" in row:
                src, tgt = row["source_ids"], row["target_ids"]
                if not (isinstance(src, list) and isinstance(tgt, list)) or not all(
                    isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 2**31 for i in [*src, *tgt]
                ):
                    raise TypeError("source_ids / target_ids must be lists of non-negative integers below 2^31")
                for key, ids in (("source_ids", src), ("target_ids", tgt)) if vocab_size is not None else ():
                    big = next(((j, i) for j, i in enumerate(ids) if i >= vocab_size), None)
                    if big is not None:
                        raise _BadIds(f"'{key}' holds token id {big[1]} (at position {big[0]}), outside the"
                                      f" checkpoint's vocabulary (vocab_size={vocab_size}, ids 0..{vocab_size - 1})")
                src, tgt = _clean_ids(src, "source_ids"), _clean_ids(tgt, "target_ids")
                kinds.add("ids")
                rows.append((ids_row(src, src_len), ids_row(tgt, tgt_len)))
                if _with_eos(src) > src_len or _with_eos(tgt) > tgt_len:
                    cut.append(n)
            else:
                raw = {}
                for key in ("source", "target"):
                    text = row[key]
                    if not isinstance(text, str):
                        raise _BadIds(f"'{key}' is {_short_json(text)} ({type(text).__name__}); give a string"
                                      " (text), or use 'source_ids' / 'target_ids' for token ids")
                    try:
                        raw[key] = text.encode("utf-8")
                    except UnicodeEncodeError as e:
                        raise _BadIds(
                            f"'{key}' holds a lone surrogate {text[e.start]!r} at character {e.start} (a"
                            " \\ud800-\\udfff escape without its pair), which is no text UTF-8 can encode"
                        ) from None
                kinds.add("text")
                rows.append((encode_utf8(raw["source"], src_len), encode_utf8(raw["target"], tgt_len)))
                if len(raw["source"]) + 1 > src_len or len(raw["target"]) + 1 > tgt_len:
                    cut.append(n)
            # what is trained (after EOS, padding and cuts), as 16-byte digests: duplicates are judged on it
            keys.append(tuple(hashlib.blake2b(r.tobytes(), digest_size=16).digest() for r in rows[-1]))
            lines.append(n)
        except _BadIds as e:
            raise ValueError(f"{path}:{n}: {e}") from None
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(
                f"{path}:{n}: each line must be a JSON object with 'source' and 'target' (text) or"
                f" 'source_ids' and 'target_ids' (token ids) ({type(e).__name__}: {e})"
            ) from None
    if len(kinds) > 1:
        raise ValueError(f"{path}: mixes text lines and pre-tokenized lines; use one form")
    if unused:
        print(f"note: {path}: keys not used for training: "
              + ", ".join(f"{k!r} (first on line {n})" for k, n in sorted(unused.items(), key=lambda kv: kv[1])))
    if len(rows) < 2:
        raise ValueError(f"{path}: needs at least 2 source/target pairs, found {len(rows)}")
    full = id_split(np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows]))
    tr, te = _train_test(len(full), test_fraction, seed)
    form = "token ids" if kinds == {"ids"} else "byte-level text"
    if cut:
        print(f"note: {path}: {len(cut)} of {len(rows)} pairs are longer than {src_len} source / {tgt_len} target"
              f" tokens (EOS included) and are cut to that length ({_lines(cut)})")
    _note_duplicates(path, keys, lines, tr, te)
    note = f", {len(cut)} cut to {src_len}/{tgt_len} tokens" if cut else ""
    return Dataset(full.take(tr), full.take(te), f"{path} ({len(rows)} pairs, {form}{note})", kind=kinds.pop())


_JSONL_HINT = (
    "; convert a JSON array of objects with: python -c \"import json,sys; [print(json.dumps(o)) for o in"
    ' json.load(open(sys.argv[1]))]\" FILE.json > FILE.jsonl'
)


def _short_json(value, limit: int = 40) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _lines(ns: list[int], limit: int = 5) -> str:
    """``'line 3'`` or ``'lines 1, 4, 9, ...'``."""
    return ("line " if len(ns) == 1 else "lines ") + ", ".join(map(str, ns[:limit])) + (", ..." if len(ns) > limit else "")


def _note_duplicates(path, keys: list, lines: list[int], tr: np.ndarray, te: np.ndarray) -> None:
    """Notes (no change to the data) on pairs that repeat an earlier line, sources given different
    targets, and held-out pairs that also occur in the training split (the held-out score then
    partly measures memorization), all judged on the rows as trained (``keys``: digests of the
    encoded source and target)."""
    first: dict = {}
    repeats = []
    for key, n in zip(keys, lines):
        if key in first:
            repeats.append((n, first[key]))
        else:
            first[key] = n
    if repeats:
        shown = ", ".join(f"line {n} repeats line {m}" for n, m in repeats[:3])
        print(f"note: {path}: {len(repeats)} pair(s) repeat an earlier line ({shown}{', ...' if len(repeats) > 3 else ''});"
              " they are kept as given")
    targets: dict = {}
    for (src, tgt), n in zip(keys, lines):
        targets.setdefault(src, {}).setdefault(tgt, n)
    conflicting = sorted((sorted(t.values()) for t in targets.values() if len(t) > 1), key=lambda ls: ls[0])
    if conflicting:
        shown = "; ".join(_lines(ls, 3) for ls in conflicting[:3])
        print(f"note: {path}: {len(conflicting)} source(s) are given different targets ({shown}"
              f"{'; ...' if len(conflicting) > 3 else ''}): no model can match all of them")
    train_keys = {keys[i] for i in tr}
    seen = [lines[i] for i in te if keys[i] in train_keys]
    if seen:
        print(f"note: {path}: {len(seen)} of the {len(te)} held-out pairs also occur in the training split"
              f" ({_lines(seen)}), so the held-out score partly measures memorization; remove the duplicates for a"
              " clean held-out set")


def _unique_keys(pairs: list) -> dict:
    """``json.loads`` object hook: a key given twice in one object is an error (JSON keeps the last)."""
    seen = {}
    for k, v in pairs:
        if k in seen:
            raise _BadIds(f"the key {k!r} appears twice in one object (JSON would keep the last silently)")
        seen[k] = v
    return seen


class _BadIds(ValueError):
    """A pre-tokenized line whose ids are well typed but cannot mean what they say."""


def _clean_ids(ids: list, field: str) -> list:
    """``ids`` without trailing pad ids; pad inside (or EOS inside a target) -> :class:`_BadIds`."""
    end = len(ids)
    while end and ids[end - 1] == PAD:
        end -= 1
    ids = ids[:end]
    if PAD in ids:
        raise _BadIds(
            f"{field} has the pad id {PAD} at position {ids.index(PAD)}, before its last token {ids[-1]} (position"
            f" {end - 1}); pad ids are masked out of the attention and the loss, so they may only trail the"
            " sequence (padding): remove them or use the tokenizer's ids for the text they stand for"
        )
    if field == "target_ids" and EOS in ids[:-1]:
        raise _BadIds(
            f"target_ids has EOS ({EOS}) at position {ids.index(EOS)}, before its last token (position"
            f" {end - 1}); the model would learn to go on after the end of the sequence, which generation"
            " never reaches: end each target at its first EOS"
        )
    return ids


def _with_eos(ids: list) -> int:
    """The length of pre-tokenized ``ids`` once EOS is appended (when missing)."""
    return len(ids) + (0 if ids and ids[-1] == EOS else 1)


# ------------------------------------------------------------------------------------------------
# Batching
# ------------------------------------------------------------------------------------------------
def batch_indices(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Indices of the batch for ``step``: epochs are seeded permutations, last partial batch dropped."""
    per_epoch = n // batch_size
    if per_epoch < 1:
        raise ValueError(f"batch size {batch_size} exceeds the {n} training examples")
    epoch, i = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return order[i * batch_size : (i + 1) * batch_size]
