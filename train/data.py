"""Data for the finetuning job: the bundled tasks, user data sets, and resumable batching.

Bundled (no downloads):
* ViT: scikit-learn's digits (1797 8x8 grey images).  The base ViT is pretrained on digits 0-4;
  the default finetuning task is digits 5-9: new classes the base has never been trained on.
* T5: a synthetic byte-level text task (see :mod:`train.text_tasks`).

User data: ``--data`` is an ``.npz`` file (``images`` (N, H, W, C) float and ``labels`` (N,) int, or
``train_images``/``train_labels``/``test_images``/``test_labels``), an image folder (one
sub-folder per class), or for T5 a JSONL file of ``{"source": ..., "target": ...}`` lines.

Batches are a pure function of ``(seed, step)``: an epoch is a seeded permutation, so a resumed run
sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PRETRAIN_CLASSES = (0, 1, 2, 3, 4)
FINETUNE_CLASSES = (5, 6, 7, 8, 9)


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


def _image_split(path: Path, arrays: dict, images_key: str, labels_key: str) -> Split:
    """Checked images ``(N, H, W, C)`` float32 and labels ``(N,)`` int32 (integral, >= 0)."""
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
    return Split({"pixel_values": images.astype(np.float32)}, labels.astype(np.int32))


def load_npz(path: str | Path, *, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    path = Path(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":  # np.load would otherwise try (and refuse) to unpickle it
        raise ValueError(f"{path}: not an .npz archive (np.savez writes one; this file starts with {magic!r})")
    names = ("train_images", "train_labels", "test_images", "test_labels", "images", "labels")
    try:  # the zip directory, then each member (a damaged member fails only when read)
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            arrays = {k: z[k] for k in names if k in keys}
    except Exception as e:  # BadZipFile, bad CRC, zlib errors, object arrays (pickles), truncation
        raise ValueError(f"{path}: unreadable .npz archive ({type(e).__name__}: {e})") from None
    if {"train_images", "train_labels", "test_images", "test_labels"} <= keys:
        return Dataset(
            _image_split(path, arrays, "train_images", "train_labels"),
            _image_split(path, arrays, "test_images", "test_labels"),
            f"{path}",
        )
    if {"images", "labels"} <= keys:
        full = _image_split(path, arrays, "images", "labels")
        tr, te = _train_test(len(full), test_fraction, seed)
        return Dataset(full.take(tr), full.take(te), f"{path} ({1 - test_fraction:.0%}/{test_fraction:.0%} split)")
    raise ValueError(
        f"{path}: an .npz data set needs arrays 'images' (N,H,W,C) and 'labels' (N,), or"
        f" 'train_images', 'train_labels', 'test_images', 'test_labels'; found {sorted(keys)}"
    )


def load_image_folder(path: str | Path, image_size: tuple[int, int], channels: int, *, test_fraction=0.2, seed=0):
    """Images in ``path/<class name>/*.png|jpg``; classes sorted by name get labels 0, 1, ..."""
    from PIL import Image

    path = Path(path)
    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{path}: an image folder needs one sub-folder per class; found none")
    images, labels = [], []
    for label, name in enumerate(classes):
        for f in sorted((path / name).iterdir()):
            if f.suffix.lower() not in (".png", ".jpg", ".jpeg", ".bmp", ".gif"):
                continue
            try:
                img = Image.open(f).convert("L" if channels == 1 else "RGB").resize(image_size[::-1])
            except OSError as e:  # PIL.UnidentifiedImageError, truncated files
                raise ValueError(f"{f}: unreadable image ({e})") from None
            arr = np.asarray(img, np.float32) / 255.0
            images.append(arr[..., None] if channels == 1 else arr)
            labels.append(label)
    if not images:
        raise ValueError(f"{path}: no images (.png/.jpg/.jpeg/.bmp/.gif) in the class folders {classes}")
    full = Split({"pixel_values": np.stack(images)}, np.asarray(labels, np.int32))
    tr, te = _train_test(len(full), test_fraction, seed)
    return Dataset(full.take(tr), full.take(te), f"image folder {path} ({len(classes)} classes)")


# ------------------------------------------------------------------------------------------------
# Byte-level text (T5)
# ------------------------------------------------------------------------------------------------
PAD, EOS, UNK = 0, 1, 2
BYTE_OFFSET = 3
BYTE_VOCAB = 256 + BYTE_OFFSET


def encode_text(text: str, length: int) -> np.ndarray:
    """UTF-8 bytes + 3 (ByT5's layout: 0 pad, 1 eos, 2 unk), then EOS, padded/cut to ``length``."""
    return ids_row([b + BYTE_OFFSET for b in text.encode("utf-8")], length)


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


def load_jsonl(path: str | Path, src_len: int, tgt_len: int, *, test_fraction=0.2, seed=0) -> Dataset:
    """Source/target pairs, one JSON object per line, in either form (not mixed):

    - text: ``{"source": "...", "target": "..."}``, encoded byte-level (:func:`encode_text`);
    - pre-tokenized: ``{"source_ids": [...], "target_ids": [...]}``, token ids of the model's own
      tokenizer (T5 convention: pad 0, EOS 1; EOS is appended when missing).
    Longer examples are cut to ``src_len`` / ``tgt_len``.
    """
    path = Path(path)
    rows, kinds = [], set()
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if isinstance(row, dict) and "source_ids" in row:
                    src, tgt = row["source_ids"], row["target_ids"]
                    if not (isinstance(src, list) and isinstance(tgt, list)) or not all(
                        isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 2**31 for i in [*src, *tgt]
                    ):
                        raise TypeError("source_ids / target_ids must be lists of non-negative integers below 2^31")
                    kinds.add("ids")
                    rows.append((ids_row(src, src_len), ids_row(tgt, tgt_len)))
                else:
                    if not (isinstance(row["source"], str) and isinstance(row["target"], str)):
                        raise TypeError("'source' and 'target' must be strings")
                    kinds.add("text")
                    rows.append((encode_text(row["source"], src_len), encode_text(row["target"], tgt_len)))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(
                    f"{path}:{n}: each line must be a JSON object with 'source' and 'target' (text) or"
                    f" 'source_ids' and 'target_ids' (token ids) ({type(e).__name__}: {e})"
                ) from None
    if len(kinds) > 1:
        raise ValueError(f"{path}: mixes text lines and pre-tokenized lines; use one form")
    if len(rows) < 2:
        raise ValueError(f"{path}: needs at least 2 source/target pairs, found {len(rows)}")
    full = id_split(np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows]))
    tr, te = _train_test(len(full), test_fraction, seed)
    form = "token ids" if kinds == {"ids"} else "byte-level text"
    return Dataset(full.take(tr), full.take(te), f"{path} ({len(rows)} pairs, {form})", kind=kinds.pop())


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
