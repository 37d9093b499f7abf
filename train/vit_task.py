"""The ViT image-classification task for the finetuning job."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from train import data as data_lib
from train.loop import Task, batched_eval

DEFAULT_STEPS = 300
DEFAULT_LR = 5e-3
METRIC = "accuracy"
EVAL_BATCH = 128


def load_data(path, module, checkpoint=None) -> data_lib.Dataset:
    """The bundled digits 5-9 task, or a user ``.npz`` / image folder checked against the model.

    Image files and ``uint8`` arrays are preprocessed as ``checkpoint``'s
    ``preprocessor_config.json`` says (:func:`train.data.pixel_prep`).
    """
    cfg = module.config
    if path is None:
        return _checked(resized(data_lib.digits(data_lib.FINETUNE_CLASSES), cfg.image_size), cfg)
    prep = data_lib.pixel_prep(checkpoint, cfg.num_channels)
    from pathlib import Path

    if not Path(path).exists():
        raise ValueError("no such file or folder (expected an .npz file or an image folder)")
    if Path(path).is_file():
        if Path(path).suffix.lower() != ".npz":
            raise ValueError(f"a file without the .npz suffix ({Path(path).suffix or 'none'}); expected an .npz"
                             " file (np.savez) or an image folder")
        ds = data_lib.load_npz(path, prep=prep)
    else:
        if not Path(path).is_dir():
            raise ValueError("not an .npz file or an image folder")
        ds = data_lib.load_image_folder(path, cfg.image_size, cfg.num_channels, prep=prep, class_names=cfg.id2label)
    return _checked(ds, cfg)


def resized(ds: data_lib.Dataset, image_size: tuple[int, int]) -> data_lib.Dataset:
    """``ds`` with its images resized to ``image_size`` (:func:`boft_jax.models.vit.resize_bicubic`,
    clipped to the images' value range); unchanged at their own size.  For the bundled 8 x 8 digits
    on a model of another image size (a checkpoint's or ``--image-size``'s)."""
    import numpy as np

    from boft_jax.models.vit import resize_bicubic

    splits = (ds.train.inputs["pixel_values"], ds.test.inputs["pixel_values"])
    if splits[0].shape[1:3] == tuple(image_size):
        return ds
    lo, hi = min(x.min() for x in splits), max(x.max() for x in splits)  # one range for both splits

    def resize(split: data_lib.Split) -> data_lib.Split:
        y = np.clip(np.asarray(resize_bicubic(split.inputs["pixel_values"], image_size, axes=(1, 2))), lo, hi)
        return data_lib.Split({**split.inputs, "pixel_values": y}, split.labels)

    return dataclasses.replace(ds, train=resize(ds.train), test=resize(ds.test),
                               description=f"{ds.description}, resized to {image_size[0]}x{image_size[1]}")


def _checked(ds: data_lib.Dataset, cfg) -> data_lib.Dataset:
    """``ds`` after checking its image shapes and labels against the model's config."""
    want = (*cfg.image_size, cfg.num_channels)
    sizes = {name: len(split.labels) for name, split in (("train", ds.train), ("test", ds.test))}
    if min(sizes.values()) == 0:
        raise ValueError(f"too few examples for a train/held-out split: {sizes['train']} train and {sizes['test']}"
                         " held-out examples (both must be at least 1; a single set is split 80/20)")
    for name, split in (("train", ds.train), ("test", ds.test)):
        got = split.inputs["pixel_values"].shape[1:]
        if tuple(got) != want:
            hint = ("" if tuple(got[:2]) == want[:2] else
                    " (the checkpoint's image size, or --image-size's); .npz arrays are used as stored, not resized:"
                    " give images of that size, or train at the images' own size with --image-size HxW")
            raise ValueError(f"{name} images have shape {tuple(got)} but the model expects (H, W, C) = {want}{hint}")
        bad = split.labels[(split.labels < 0) | (split.labels >= cfg.num_labels)]
        if bad.size:
            raise ValueError(f"{name} labels {sorted(set(bad.tolist()))[:5]} are outside the model's {cfg.num_labels} classes"
                             " (--num-labels N gives the model a fresh classifier of N classes)")
    return ds


def example_inputs(ds: data_lib.Dataset):
    return (jnp.asarray(ds.train.inputs["pixel_values"][:1]),)


def loss_fn(model, params, inputs, labels, rng, train: bool):
    logits = model.apply(
        {"params": params}, inputs["pixel_values"], deterministic=not train, rngs={"dropout": rng} if train else {}
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()
    return loss, (logits.argmax(-1) == labels).mean()


def make_task(model, frozen, adapter, ds: data_lib.Dataset) -> Task:
    @jax.jit
    def correct(params, pixel_values, labels):
        return model.apply({"params": params}, pixel_values).argmax(-1) == labels

    def evaluate(model_, params, split) -> float:
        return batched_eval(lambda inp, lab: correct(params, inp["pixel_values"], lab), split, EVAL_BATCH)

    return Task("vit", model, frozen, adapter, ds, loss_fn, evaluate, metric=METRIC)
