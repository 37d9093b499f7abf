"""The T5 text-to-text task for the finetuning job, and the bundled byte-level base T5.

Everything is byte level (``train.data.encode_text``: UTF-8 bytes + 3, 0 pad, 1 EOS, vocabulary
259), so no tokenizer is needed.

Bundled task (no downloads): random lowercase words of 3-7 letters behind a task prefix.

* Pretraining (:func:`make_t5`, ``python -m train.make_base --model t5``: full training of a small
  T5 v1.1, d_model 128, 2+2 layers, saved to ``train/assets/t5-bytes-base``)::

      copy: hello -> hello      rev: hello -> olleh      up: hello -> HELLO

* Finetuning (the default of ``python -m train.finetune --model t5``), an instruction the base
  has never seen, whose outputs it never produced::

      shout: hello -> OLLEH     (reversed and uppercased)

  The base scores ~0 exact match on it; BOFT on the attention projections (~1.4% of the
  weights) learns it.

User data: ``--data file.jsonl`` with ``{"source": ..., "target": ...}`` lines, encoded
byte-level (for a byte-level T5: 259 to 512 ids, pad 0, EOS 1: ByT5 or the bundled base), or with
pre-tokenized ``{"source_ids": [...], "target_ids": [...]}`` lines for any T5 (t5, v1.1, FLAN-T5:
tokenize with the checkpoint's own tokenizer).

The evaluation metric is exact match: greedy generation (KV cache, through the wrapped model,
``labels`` length new tokens) must reproduce the target up to and including its EOS.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from boft_jax.models import t5 as t5_lib
from train import data as data_lib
from train.loop import Task, batched_eval

ASSETS = Path(__file__).resolve().parent / "assets"
T5_BASE = ASSETS / "t5-bytes-base"

DEFAULT_STEPS = 600
DEFAULT_LR = 3e-3
METRIC = "exact_match"
EVAL_BATCH = 128

# Bundled task geometry.
MIN_LETTERS, MAX_LETTERS = 3, 7
SRC_LEN, TGT_LEN = 16, 8
ALPHABET = "abcdefghijklmnopqrstuvwxyz"

TASKS = {
    "copy": lambda s: s,
    "rev": lambda s: s[::-1],
    "up": lambda s: s.upper(),
    "shout": lambda s: s[::-1].upper(),
}
PRETRAIN_TASKS = ("copy", "rev", "up")
FINETUNE_TASK = "shout"
FINETUNE_TRAIN, FINETUNE_TEST = 4096, 512

# Limits for user JSONL data (examples are cut to these many bytes, EOS included).
MAX_SRC_LEN, MAX_TGT_LEN = 512, 256
BYTE_VOCAB_MAX = 512  # larger vocabularies are subword (SentencePiece) ones: text must come pre-tokenized


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def random_words(rng: np.random.Generator, n: int) -> list[str]:
    lengths = rng.integers(MIN_LETTERS, MAX_LETTERS + 1, size=n)
    letters = rng.integers(0, len(ALPHABET), size=(n, MAX_LETTERS))
    return ["".join(ALPHABET[c] for c in row[:k]) for row, k in zip(letters, lengths)]


def pairs(task: str, words: list[str]) -> list[tuple[str, str]]:
    fn = TASKS[task]
    return [(f"{task}: {w}", fn(w)) for w in words]


def task_split(tasks, n: int, seed: int) -> data_lib.Split:
    """``n`` examples of the given tasks (round-robin), deterministic in ``seed``."""
    tasks = (tasks,) if isinstance(tasks, str) else tuple(tasks)
    rng = np.random.default_rng(seed)
    words = random_words(rng, n)
    ps = [pairs(tasks[i % len(tasks)], [w])[0] for i, w in enumerate(words)]
    return data_lib.text_split(ps, SRC_LEN, TGT_LEN)


def bundled(seed: int = 0) -> data_lib.Dataset:
    """The default finetuning task: FINETUNE_TASK on fresh random words (train and test disjoint)."""
    rng = np.random.default_rng([seed, 1])
    words = []
    seen = set()
    while len(words) < FINETUNE_TRAIN + FINETUNE_TEST:
        for w in random_words(rng, FINETUNE_TRAIN + FINETUNE_TEST):
            if w not in seen and len(words) < FINETUNE_TRAIN + FINETUNE_TEST:
                seen.add(w)
                words.append(w)
    tr = data_lib.text_split(pairs(FINETUNE_TASK, words[:FINETUNE_TRAIN]), SRC_LEN, TGT_LEN)
    te = data_lib.text_split(pairs(FINETUNE_TASK, words[FINETUNE_TRAIN:]), SRC_LEN, TGT_LEN)
    return data_lib.Dataset(tr, te, f"synthetic '{FINETUNE_TASK}: abc -> CBA' (new task for the base)")


def _trim(split: data_lib.Split) -> data_lib.Split:
    """Drop the all-pad columns at the end of the source and target arrays."""
    def used(a):
        nz = np.nonzero((a != data_lib.PAD).any(axis=0))[0]
        return int(nz[-1]) + 1 if nz.size else 1

    ids, labels = split.inputs["input_ids"], split.labels
    s, t = used(ids), used(labels)
    return data_lib.id_split(ids[:, :s], labels[:, :t])


def load_data(path, module, checkpoint=None) -> data_lib.Dataset:
    """The bundled task (``path=None``) or a JSONL file of source/target pairs.

    Text lines (``{"source", "target"}``) are encoded byte-level, so they need a byte-level T5
    (259 to 512 ids, pad id 0, EOS id 1, as ByT5 or the bundled base).  For any other T5 (t5,
    t5 v1.1, FLAN-T5) give pre-tokenized lines ``{"source_ids": [...], "target_ids": [...]}``
    made with the checkpoint's own tokenizer; ids are checked against its vocabulary.  Examples
    longer than MAX_SRC_LEN / MAX_TGT_LEN tokens are cut (their count is printed).  ``checkpoint``
    is not used (the same signature as :func:`train.vit_task.load_data`).
    """
    cfg = module.config
    # Byte-level vocabularies have 259 (bundled base) to 384 (ByT5) ids; SentencePiece T5s 32k+.
    byte_level = (
        data_lib.BYTE_VOCAB <= cfg.vocab_size <= BYTE_VOCAB_MAX
        and cfg.pad_token_id == data_lib.PAD
        and data_lib.EOS in cfg.eos_token_ids
    )
    if path is None:
        if not byte_level:
            raise ValueError(
                f"the bundled task is byte-level text but the checkpoint has vocab_size={cfg.vocab_size},"
                f" pad_token_id={cfg.pad_token_id}, eos_token_id={cfg.eos_token_id}: pass --data with"
                ' pre-tokenized JSONL lines {"source_ids": [...], "target_ids": [...]}'
            )
        return bundled()
    p = Path(path)
    if not p.is_file():
        what = "a directory" if p.is_dir() else "no such file"
        raise ValueError(f'{what} (expected a JSONL file of {{"source": ..., "target": ...}} lines)')
    ds = data_lib.load_jsonl(p, MAX_SRC_LEN, MAX_TGT_LEN, vocab_size=cfg.vocab_size)
    if ds.kind == "ids":
        if cfg.pad_token_id != data_lib.PAD or data_lib.EOS not in cfg.eos_token_ids:
            raise ValueError(
                f"{p}: pre-tokenized lines are padded with id {data_lib.PAD} and end with EOS id {data_lib.EOS}"
                f" (every T5 tokenizer's convention), but the checkpoint has pad_token_id={cfg.pad_token_id},"
                f" eos_token_id={cfg.eos_token_id}"
            )
    elif not byte_level:
        raise ValueError(
            f"{p}: holds text, which is encoded byte-level (UTF-8 bytes + 3, pad 0, EOS 1,"
            f" {data_lib.BYTE_VOCAB} ids), but the checkpoint has vocab_size={cfg.vocab_size},"
            f" pad_token_id={cfg.pad_token_id}, eos_token_id={cfg.eos_token_id}: tokenize with the"
            ' checkpoint\'s tokenizer and give lines {"source_ids": [...], "target_ids": [...]} instead'
        )
    if len(ds.test) == 0 or len(ds.train) == 0:
        raise ValueError(f"{p}: too few examples for a train/held-out split")
    return data_lib.Dataset(_trim(ds.train), _trim(ds.test), ds.description, kind=ds.kind)


def example_inputs(ds: data_lib.Dataset) -> tuple:
    """Example ``(input_ids, attention_mask, decoder_input_ids)`` for ``boft.init_adapter``."""
    sp = ds.train.take(np.arange(1))
    dec = t5_lib.shift_right(jnp.asarray(sp.labels), data_lib.PAD, data_lib.PAD)
    return jnp.asarray(sp.inputs["input_ids"]), jnp.asarray(sp.inputs["attention_mask"]), dec


def loss_fn(model, params, inputs, labels, rng, train: bool):
    """Teacher-forced cross entropy on the non-pad label positions (EOS included); token accuracy."""
    return seq2seq_loss(model, params, inputs["input_ids"], inputs["attention_mask"], labels, rng=rng, train=train)


def make_task(model, frozen, adapter, ds: data_lib.Dataset) -> Task:
    """The loss and the exact-match evaluation (greedy generation through the wrapped model)."""
    correct = exact_match_fn(model)

    def evaluate(model_, params, split) -> float:
        return batched_eval(
            lambda inp, lab: correct(params, inp["input_ids"], inp["attention_mask"], lab),
            split, min(EVAL_BATCH, len(split)),
        )

    return Task("t5", model, frozen, adapter, ds, loss_fn, evaluate, metric=METRIC, train_metric="token accuracy")


# ---------------------------------------------------------------------------------------------
# The bundled base
# ---------------------------------------------------------------------------------------------
T5_CONFIG = t5_lib.T5Config(
    vocab_size=data_lib.BYTE_VOCAB,
    d_model=128,
    d_kv=32,
    d_ff=256,
    num_layers=2,
    num_decoder_layers=2,
    num_heads=4,
    dropout_rate=0.0,
    feed_forward_proj="gated-gelu",
    tie_word_embeddings=False,
    pad_token_id=data_lib.PAD,
    eos_token_id=data_lib.EOS,
    decoder_start_token_id=data_lib.PAD,
)


def seq2seq_loss(model, params, input_ids, attention_mask, labels, *, rng=None, train=False):
    """Teacher-forced cross entropy over the non-pad label positions, and token accuracy."""
    # teacher forcing starts where generation starts: the checkpoint's decoder start token
    start = t5_lib._t5_config(model).decoder_start_token_id
    dec_in = t5_lib.shift_right(labels, start, data_lib.PAD)
    logits = model.apply(
        {"params": params}, input_ids, attention_mask, dec_in,
        deterministic=not train, rngs={"dropout": rng} if (train and rng is not None) else {},
    ).astype(jnp.float32)
    mask = (labels != data_lib.PAD).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    n = jnp.maximum(mask.sum(), 1.0)
    loss = (ce * mask).sum() / n
    acc = ((logits.argmax(-1) == labels) * mask).sum() / n
    return loss, acc


def exact_match_fn(model):
    """jitted ``(params, input_ids, attention_mask, labels) -> (B,) bool``: the greedy output of
    ``model`` (bare or wrapped T5), ``labels.shape[1]`` new tokens, equals the labels up to their EOS."""

    @jax.jit
    def correct(params, input_ids, attention_mask, labels):
        tokens = t5_lib.generate(model, params, input_ids, attention_mask, max_new_tokens=labels.shape[1])[:, 1:]
        return matches_up_to_eos(tokens, labels)

    return correct


def matches_up_to_eos(tokens, labels):
    """``(B,) bool``: each row of ``tokens (B, L)`` equals ``labels (B, L)`` at every position up to
    and including the labels' first EOS (what comes after it does not count)."""
    upto = jnp.cumsum(labels == data_lib.EOS, axis=1) - (labels == data_lib.EOS) == 0
    return jnp.all((tokens == labels) | ~upto, axis=1)


def make_t5(
    out: Path = T5_BASE, *, steps: int = 1500, batch_size: int = 64, seed: int = 0, lr: float = 1e-3, eval_every: int = 0
) -> dict[str, float]:
    """Train the bundled base T5 in full on PRETRAIN_TASKS and save it (Hugging Face format) to ``out``.

    Reproducible: the init and every batch are functions of ``seed`` (same bytes on a rerun on the
    same machine).  About 4 minutes on 2 CPU cores; reaches ~100% exact match on copy / rev / up
    and 0% on the finetuning task.  Returns the exact match per task on fresh words.
    """
    model = t5_lib.T5(T5_CONFIG)
    x = jnp.zeros((1, SRC_LEN), jnp.int32)
    y = jnp.zeros((1, TGT_LEN), jnp.int32)
    params = model.init(jax.random.key(seed), x, x, y)["params"]
    # Hugging Face's T5 init: queries get std (d_model * d_kv)^-0.5, since T5 does not scale its
    # attention scores (Flax's default lecun init gives d_model^-0.5: saturated softmax at init).
    params = jax.tree_util.tree_map_with_path(
        lambda path, v: v * T5_CONFIG.d_kv**-0.5 if any(getattr(k, "key", None) == "q" for k in path) else v, params
    )
    opt = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, 100, steps, end_value=lr * 0.01), weight_decay=0.01),
    )
    state = opt.init(params)
    correct = exact_match_fn(model)

    @jax.jit
    def step(params, state, ids, mask, labels):
        (loss, acc), g = jax.value_and_grad(lambda p: seq2seq_loss(model, p, ids, mask, labels), has_aux=True)(params)
        u, state = opt.update(g, state, params)
        return optax.apply_updates(params, u), state, loss, acc

    t0 = time.time()
    for s in range(steps):
        b = task_split(PRETRAIN_TASKS, batch_size, seed=[seed, 2, s])
        params, state, loss, acc = step(params, state, b.inputs["input_ids"], b.inputs["attention_mask"], b.labels)
        if s % 250 == 0 or s == steps - 1:
            print(f"step {s} loss {float(loss):.4f} token acc {float(acc):.3f} ({time.time() - t0:.0f} s)", flush=True)
        if eval_every and s and s % eval_every == 0:
            sp = task_split(PRETRAIN_TASKS, 192, seed=[seed, 3])
            em = float(np.mean(correct(params, sp.inputs["input_ids"], sp.inputs["attention_mask"], sp.labels)))
            print(f"step {s}: exact match {em:.3f}", flush=True)
    accs = {}
    for task in (*PRETRAIN_TASKS, FINETUNE_TASK):
        sp = task_split(task, 256, seed=[seed, 3])
        accs[task] = float(np.mean(correct(params, sp.inputs["input_ids"], sp.inputs["attention_mask"], sp.labels)))
    print(f"base T5 ({time.time() - t0:.0f} s): held-out exact match {accs}")
    from boft_jax.models import save_pretrained

    save_pretrained(out, model, jax.tree.map(np.asarray, params))
    print(f"saved to {out}")
    return accs
