"""The T5 half of the main job: the bundled byte-level task and base, generation through the BOFT
wrapper, JSONL data, and the default job end to end."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import boft_jax as boft
from boft_jax.models import t5
from train import data as data_lib
from train import finetune, text_tasks

FIXTURES = Path(__file__).parent / "fixtures"


@functools.cache
def base():
    return t5.from_pretrained(text_tasks.T5_BASE)


@functools.cache
def exact_match(task: str, n: int = 64) -> float:
    module, params = base()
    sp = text_tasks.task_split(task, n, seed=123)
    ok = text_tasks.exact_match_fn(module)(params, sp.inputs["input_ids"], sp.inputs["attention_mask"], sp.labels)
    return float(np.mean(ok))


# ---------------------------------------------------------------------------------------------
# The bundled task and base
# ---------------------------------------------------------------------------------------------
def test_bundled_task_is_deterministic_with_disjoint_splits():
    a, b = text_tasks.bundled(), text_tasks.bundled()
    for x, y in ((a.train, b.train), (a.test, b.test)):
        np.testing.assert_array_equal(x.inputs["input_ids"], y.inputs["input_ids"])
        np.testing.assert_array_equal(x.labels, y.labels)
    src = lambda sp: {data_lib.decode_ids(r) for r in sp.inputs["input_ids"]}  # noqa: E731
    assert not src(a.train) & src(a.test)
    assert len(a.train) == text_tasks.FINETUNE_TRAIN and len(a.test) == text_tasks.FINETUNE_TEST
    for ids, label in zip(a.test.inputs["input_ids"][:20], a.test.labels[:20]):
        prefix, word = data_lib.decode_ids(ids).split(": ")
        assert prefix == text_tasks.FINETUNE_TASK and data_lib.decode_ids(label) == word[::-1].upper()
    # labels end with EOS within the fixed length; the mask marks the source bytes
    assert (a.train.labels == data_lib.EOS).sum(axis=1).min() == 1
    np.testing.assert_array_equal(a.train.inputs["attention_mask"], a.train.inputs["input_ids"] != data_lib.PAD)


def test_finetuning_task_is_new_to_the_base():
    assert text_tasks.FINETUNE_TASK not in text_tasks.PRETRAIN_TASKS
    # the base has learned its pretraining tasks ...
    for task in text_tasks.PRETRAIN_TASKS:
        assert exact_match(task) >= 0.8, task
    # ... but not the finetuning task
    assert exact_match(text_tasks.FINETUNE_TASK) <= 0.05


def test_bundled_base_is_small_and_byte_level():
    module, params = base()
    assert module.config.vocab_size == data_lib.BYTE_VOCAB
    assert sum(f.stat().st_size for f in text_tasks.T5_BASE.iterdir()) < 4 * 2**20


# ---------------------------------------------------------------------------------------------
# Generation through the wrapped model
# ---------------------------------------------------------------------------------------------
def _wrapped(targets="attention"):
    module, params = base()
    config = boft.BOFTConfig(block_size=4, n_factors=2, targets=t5.TARGET_PRESETS[targets])
    model = boft.wrap(module, config)
    ds = text_tasks.bundled()
    adapter = boft.init_adapter(model, params, *text_tasks.example_inputs(ds))
    return module, params, model, config, adapter, ds.test.take(np.arange(16))


def _gen(model, params, sp):
    fn = jax.jit(functools.partial(t5.generate, model), static_argnames="max_new_tokens")
    return np.asarray(fn(params, sp.inputs["input_ids"], sp.inputs["attention_mask"], max_new_tokens=sp.labels.shape[1]))


def test_wrapped_generation_at_identity_equals_the_bare_model():
    module, params, model, _, adapter, sp = _wrapped()
    bare = np.asarray(
        jax.jit(module.generate, static_argnames="max_new_tokens")(
            params, sp.inputs["input_ids"], sp.inputs["attention_mask"], max_new_tokens=sp.labels.shape[1]
        )
    )
    np.testing.assert_array_equal(_gen(model, boft.combine(params, adapter), sp), bare)
    np.testing.assert_array_equal(_gen(module, params, sp), bare)  # the function form on the bare model


def test_wrapped_generation_uses_the_adapter():
    module, params, model, config, adapter, sp = _wrapped()
    rng = np.random.default_rng(0)
    noisy = jax.tree.map(lambda x: x + 0.3 * rng.standard_normal(x.shape).astype(np.float32), adapter)
    wrapped_params = boft.combine(params, noisy)
    tokens = _gen(model, wrapped_params, sp)
    assert not np.array_equal(tokens, _gen(module, params, sp))
    # the same tokens as the bare model with the adapter merged in
    np.testing.assert_array_equal(tokens, _gen(module, boft.merge(wrapped_params, config), sp))


def test_loss_is_masked_to_labels_and_starts_at_the_base():
    _, params, model, _, adapter, sp = _wrapped()
    labels = jnp.asarray(sp.labels)
    inputs = {k: jnp.asarray(v) for k, v in sp.inputs.items()}
    loss, acc = text_tasks.loss_fn(model, boft.combine(params, adapter), inputs, labels, jax.random.key(0), True)
    # padding the labels further (more pad columns) changes nothing
    wider = jnp.pad(labels, ((0, 0), (0, 3)))
    loss2, acc2 = text_tasks.loss_fn(model, boft.combine(params, adapter), inputs, wider, jax.random.key(0), True)
    np.testing.assert_allclose(loss, loss2, rtol=1e-5)
    np.testing.assert_allclose(acc, acc2, rtol=1e-6)
    assert np.isfinite(float(loss)) and 0 <= float(acc) <= 1
    # teacher forcing starts with the checkpoint's decoder start token, as generation does
    import dataclasses

    import optax

    other = boft.wrap(model.model.clone(config=dataclasses.replace(model.model.config, decoder_start_token_id=5)),
                      model.config)
    full = boft.combine(params, adapter)
    got, _ = text_tasks.loss_fn(other, full, inputs, labels, jax.random.key(0), False)
    dec = jnp.concatenate([jnp.full((labels.shape[0], 1), 5, labels.dtype), labels[:, :-1]], axis=1)
    logits = other.apply({"params": full}, inputs["input_ids"], inputs["attention_mask"], dec).astype(jnp.float32)
    mask = np.asarray(labels) != data_lib.PAD
    ce = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
    np.testing.assert_allclose(float(got), ce[mask].mean(), rtol=1e-5)
    assert abs(float(got) - float(text_tasks.loss_fn(model, full, inputs, labels, jax.random.key(0), False)[0])) > 1e-4


# ---------------------------------------------------------------------------------------------
# User data (JSONL)
# ---------------------------------------------------------------------------------------------
def test_jsonl_loads_and_trims_to_the_longest_example(tmp_path):
    module, _ = base()
    rows = [{"source": f"add: {i} {i}", "target": str(2 * i)} for i in range(20)] + [{"source": "é ü", "target": "ok"}]
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    ds = text_tasks.load_data(str(p), module)
    assert len(ds.train) + len(ds.test) == 21
    both = [*zip(ds.train.inputs["input_ids"], ds.train.labels), *zip(ds.test.inputs["input_ids"], ds.test.labels)]
    assert {(data_lib.decode_ids(s), data_lib.decode_ids(t)) for s, t in both} == {(r["source"], r["target"]) for r in rows}
    longest_src = max(len(r["source"].encode()) for r in rows) + 1
    assert max(ds.train.inputs["input_ids"].shape[1], ds.test.inputs["input_ids"].shape[1]) == longest_src
    assert ds.train.labels.shape[1] <= 3 and ds.test.labels.shape[1] <= 3


@pytest.mark.parametrize(
    "content,fragment",
    [
        ('{"source": "a", "target": "b"}\nnot json\n', ":2: each line must be a JSON object with 'source' and 'target'"),
        ('{"source": "a", "target": "b"}\n{"source": "a"}\n', ":2: each line must be a JSON object"),
        ('{"source": "a", "target": "b"}\n', "needs at least 2 source/target pairs"),
        ("", "needs at least 2 source/target pairs"),
        ('{"source": "a", "target": "b"}\n{"source": "a", "target": null}\n', ":2: 'target' is null (NoneType); give a string"),
    ],
)
def test_bad_jsonl_is_a_clear_error(tmp_path, content, fragment):
    module, _ = base()
    p = tmp_path / "d.jsonl"
    p.write_text(content)
    with pytest.raises(ValueError) as e:
        text_tasks.load_data(str(p), module)
    assert fragment in str(e.value), str(e.value)


def test_missing_data_file_and_non_byte_level_model_are_clear_errors(tmp_path):
    module, _ = base()
    with pytest.raises(ValueError, match="no such file"):
        text_tasks.load_data(str(tmp_path / "nope.jsonl"), module)
    wordpiece = t5.T5(t5.T5Config(vocab_size=100, d_model=8, d_kv=4, d_ff=8, num_layers=1, num_heads=2))
    with pytest.raises(ValueError, match="byte-level"):
        text_tasks.load_data(None, wordpiece)


def test_pretokenized_jsonl_equals_the_text_form_and_serves_any_vocabulary(tmp_path, capsys):
    module, _ = base()
    rng = np.random.default_rng()
    words = ["".join(rng.choice(list("abcdefgh"), size=rng.integers(1, 9))) for _ in range(30)]
    text = [{"source": f"rev: {w}", "target": w[::-1]} for w in words]
    ids = [  # what a tokenizer would give; EOS left off on some lines (it is appended)
        {"source_ids": [b + data_lib.BYTE_OFFSET for b in r["source"].encode()] + ([data_lib.EOS] if i % 2 else []),
         "target_ids": [b + data_lib.BYTE_OFFSET for b in r["target"].encode()]}
        for i, r in enumerate(text)
    ]
    (tmp_path / "text.jsonl").write_text("\n".join(map(json.dumps, text)))
    (tmp_path / "ids.jsonl").write_text("\n".join(map(json.dumps, ids)))
    a = text_tasks.load_data(str(tmp_path / "text.jsonl"), module)
    b = text_tasks.load_data(str(tmp_path / "ids.jsonl"), module)
    for x, y in ((a.train, b.train), (a.test, b.test)):
        np.testing.assert_array_equal(x.inputs["input_ids"], y.inputs["input_ids"])
        np.testing.assert_array_equal(x.inputs["attention_mask"], y.inputs["attention_mask"])
        np.testing.assert_array_equal(x.labels, y.labels)
    assert "token ids" in b.description
    # a sentencepiece-style T5 (vocab 100): ids are fine, text is not, ids past the vocab are an error
    small = t5.T5(t5.T5Config(vocab_size=100, d_model=8, d_kv=4, d_ff=8, num_layers=1, num_heads=2))
    rows = [{"source_ids": rng.integers(3, 100, size=rng.integers(2, 12)).tolist(),
             "target_ids": rng.integers(3, 100, size=rng.integers(1, 6)).tolist()} for _ in range(12)]
    (tmp_path / "sp.jsonl").write_text("\n".join(map(json.dumps, rows)))
    ds = text_tasks.load_data(str(tmp_path / "sp.jsonl"), small)
    got = {tuple(r[r != data_lib.PAD].tolist()) for sp in (ds.train, ds.test) for r in sp.labels}
    assert got == {tuple(r["target_ids"] + [data_lib.EOS]) for r in rows}
    with pytest.raises(ValueError, match="source_ids"):
        text_tasks.load_data(str(tmp_path / "text.jsonl"), small)
    # t5 / FLAN-T5 (32,128 SentencePiece ids, pad 0, EOS 1): text and the bundled task are refused,
    # whatever the file is called
    flan = t5.T5(t5.T5Config(vocab_size=32128, d_model=8, d_kv=4, d_ff=8, num_layers=1, num_heads=2))
    (tmp_path / "token ids").mkdir()
    (tmp_path / "token ids" / "t.jsonl").write_text((tmp_path / "text.jsonl").read_text())
    for path in (tmp_path / "text.jsonl", tmp_path / "token ids" / "t.jsonl", None):
        with pytest.raises(ValueError, match="source_ids") as e:
            text_tasks.load_data(None if path is None else str(path), flan)
        # a loader's message starts with "path:", which the job does not repeat
        assert path is None or str(e.value).startswith(f"{path}: holds text"), str(e.value)
    assert len(text_tasks.load_data(str(tmp_path / "ids.jsonl"), flan).train) == len(b.train)
    long_rows = [{"source_ids": list(range(3, 3 + n)), "target_ids": [4]} for n in (511, 512, 600)]
    (tmp_path / "long.jsonl").write_text("\n".join(map(json.dumps, long_rows)))
    capsys.readouterr()
    assert "2 cut to 512/256 tokens" in text_tasks.load_data(str(tmp_path / "long.jsonl"), flan).description
    assert "2 of 3 pairs are longer than 512 source / 256 target tokens" in capsys.readouterr().out
    (tmp_path / "huge.jsonl").write_text('{"source_ids": [3000000000], "target_ids": [4]}\n' * 3)
    with pytest.raises(ValueError, match=":1: .*below 2\\^31"):
        text_tasks.load_data(str(tmp_path / "huge.jsonl"), flan)
    rows[3]["target_ids"].append(100)
    (tmp_path / "oov.jsonl").write_text("\n".join(map(json.dumps, rows)))
    with pytest.raises(ValueError, match=r"oov.jsonl:4: 'target_ids' holds token id 100 \(at position \d+\), outside the"
                                         r" checkpoint's vocabulary \(vocab_size="):
        text_tasks.load_data(str(tmp_path / "oov.jsonl"), small)
    (tmp_path / "mixed.jsonl").write_text(json.dumps(text[0]) + "\n" + json.dumps(ids[1]) + "\n" + json.dumps(text[2]))
    with pytest.raises(ValueError, match="mixes text lines and pre-tokenized lines"):
        text_tasks.load_data(str(tmp_path / "mixed.jsonl"), module)
    (tmp_path / "neg.jsonl").write_text('{"source_ids": [5, -1], "target_ids": [4]}\n' * 3)
    with pytest.raises(ValueError, match=":1: .*non-negative integers"):
        text_tasks.load_data(str(tmp_path / "neg.jsonl"), module)
    # trailing pad ids (a tokenizer's max_length padding) are dropped: the same data as unpadded
    padded = [{"source_ids": r["source_ids"] + [data_lib.PAD] * int(rng.integers(0, 5)),
               "target_ids": r["target_ids"] + [data_lib.EOS] + [data_lib.PAD] * int(rng.integers(1, 5))}
              for r in ids]
    (tmp_path / "padded.jsonl").write_text("\n".join(map(json.dumps, padded)))
    c = text_tasks.load_data(str(tmp_path / "padded.jsonl"), module)
    for x, y in ((b.train, c.train), (b.test, c.test)):
        np.testing.assert_array_equal(x.inputs["input_ids"], y.inputs["input_ids"])
        np.testing.assert_array_equal(x.labels, y.labels)
    # a pad id inside a sequence, or EOS inside a target, is refused with the line and position
    bad_rows = {"mid_pad_src": ({"source_ids": [5, 0, 6], "target_ids": [4]}, "source_ids has the pad id 0 at position 1"),
                "mid_pad_tgt": ({"source_ids": [5], "target_ids": [4, 0, 7, 1, 0]}, "target_ids has the pad id 0 at position 1"),
                "mid_eos_tgt": ({"source_ids": [5], "target_ids": [4, 1, 7]}, "target_ids has EOS \\(1\\) at position 1")}
    for name, (row, msg) in bad_rows.items():
        lines = [json.dumps(r) for r in ids[:4]]
        lines.insert(2, json.dumps(row))
        (tmp_path / f"{name}.jsonl").write_text("\n".join(lines))
        with pytest.raises(ValueError, match=f"{name}.jsonl:3: {msg}"):
            text_tasks.load_data(str(tmp_path / f"{name}.jsonl"), module)
    # EOS inside a source is the user's business (kept as given)
    (tmp_path / "eos_src.jsonl").write_text("\n".join([json.dumps({"source_ids": [5, 1, 6], "target_ids": [4]})] * 3))
    d = text_tasks.load_data(str(tmp_path / "eos_src.jsonl"), module)
    np.testing.assert_array_equal(d.train.inputs["input_ids"][0, :4], [5, 1, 6, 1])
    # long examples are cut with EOS kept last
    row = data_lib.ids_row(rng.integers(3, 50, size=20).tolist(), 8)
    assert row.shape == (8,) and row[-1] == data_lib.EOS and (row[:-1] != data_lib.PAD).all()


def test_jsonl_lines_that_cannot_mean_one_thing_are_refused_with_their_line(tmp_path, capsys):
    """Invalid UTF-8, a lone surrogate escape, a key given twice, keys of both forms on one line:
    an error naming the file and line (and the byte or key); keys the loader does not read: a note."""
    module, _ = base()
    good = [json.dumps({"source": f"s{i}", "target": f"t{i}"}) for i in range(30)]
    cases = {
        "latin1": (b'{"source": "caf\xe9", "target": "x"}', ":7: not valid UTF-8 \\(byte 0xe9 at byte 15"),
        "surrogate": (b'{"source": "\\ud800", "target": "x"}', ":7: 'source' holds a lone surrogate"),
        "twice": (b'{"source": "a", "source": "b", "target": "c"}', ":7: the key 'source' appears twice"),
        "both": (b'{"source": "a", "target": "b", "target_ids": [5]}', ":7: holds keys of both forms"),
    }
    for name, (line, msg) in cases.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_bytes(b"\n".join([g.encode() for g in good[:6]] + [line] + [g.encode() for g in good[6:]]))
        with pytest.raises(ValueError, match=f"{name}.jsonl{msg}"):
            data_lib.load_jsonl(path, 64, 32)
    # a byte-order mark and \r or \r\n line ends read as the plain file does
    plain = "\n".join(good).encode()
    (tmp_path / "plain.jsonl").write_bytes(plain)
    ref = data_lib.load_jsonl(tmp_path / "plain.jsonl", 64, 32)
    for name, raw in (("bom", b"\xef\xbb\xbf" + plain), ("cr", plain.replace(b"\n", b"\r")),
                      ("crlf", plain.replace(b"\n", b"\r\n") + b"\r\n")):
        (tmp_path / f"{name}.jsonl").write_bytes(raw)
        got = data_lib.load_jsonl(tmp_path / f"{name}.jsonl", 64, 32)
        np.testing.assert_array_equal(got.train.inputs["input_ids"], ref.train.inputs["input_ids"])
        np.testing.assert_array_equal(got.test.labels, ref.test.labels)
    extra = [json.dumps({"source": f"s{i}", "target": f"t{i}", **({"id": i} if i > 2 else {})}) for i in range(30)]
    (tmp_path / "extra.jsonl").write_text("\n".join(extra))
    capsys.readouterr()
    ds = data_lib.load_jsonl(tmp_path / "extra.jsonl", 64, 32)
    assert len(ds.train) + len(ds.test) == 30
    assert "keys not used for training: 'id' (first on line 4)" in capsys.readouterr().out


def test_mt5_checkpoint_finetunes_with_pretokenized_data(tmp_path):
    """--model t5 takes an mT5 directory (model_type "mt5"); the merged export stays an mT5."""
    rng = np.random.default_rng()
    rows = [{"source_ids": rng.integers(3, 64, size=rng.integers(2, 8)).tolist(),
             "target_ids": rng.integers(3, 64, size=rng.integers(1, 4)).tolist()} for _ in range(40)]
    (tmp_path / "ids.jsonl").write_text("\n".join(map(json.dumps, rows)))
    ckpt = tmp_path / "mt5"  # the fixture with EOS id 1, the tokenizers' convention the JSONL loader checks
    shutil.copytree(FIXTURES / "mt5", ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "eos_token_id": 1}))
    gen = json.loads((ckpt / "generation_config.json").read_text())  # which generate reads first
    (ckpt / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": 1}))
    out = tmp_path / "run"
    finetune.run(["--model", "t5", "--checkpoint", str(ckpt), "--data", str(tmp_path / "ids.jsonl"),
                  "--output", str(out), "--steps", "2", "--batch-size", "8", "--eval-every", "0", "--no-progress",
                  "--block-size", "2", "--factors", "1"])
    merged = json.loads((out / "merged" / "config.json").read_text())
    assert (merged["model_type"], merged["architectures"]) == ("mt5", ["MT5ForConditionalGeneration"])


def test_bad_data_through_the_cli_exits_2_and_writes_nothing(tmp_path, capsys):
    p = tmp_path / "d.jsonl"
    p.write_text('{"source": "a"}\n{"source": "b", "target": "c"}\n')
    out = tmp_path / "run"
    assert finetune.main(["--model", "t5", "--data", str(p), "--output", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --data {p}:1: each line must be") and err.count(str(p)) == 1, err
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# The default T5 job end to end
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_default_t5_job_end_to_end(tmp_path):
    from boft_jax.checkpoint import load_adapter
    from boft_jax.models import from_pretrained

    out = tmp_path / "run"
    res = finetune.run(
        ["--model", "t5", "--output", str(out), "--steps", "80", "--eval-every", "0", "--save-every", "40", "--no-progress"]
    )
    assert res["trainable"] / res["base"] < 0.02
    assert res["acc_before"] <= 0.05 and res["acc_after"] >= 0.5, res  # measured 0.81 at 80 steps (0.994 at the default 600)
    for f in ("metrics.jsonl", "curves.png", "summary.md", "adapter", "merged/config.json", "merged/model.safetensors"):
        assert (out / f).exists(), f
    assert "exact_match after" in (out / "summary.md").read_text()
    # the merged HF directory generates the same tokens as the wrapped model with the saved adapter
    adapter, config, meta = load_adapter(out / "adapter")
    module, params = from_pretrained(meta["base_checkpoint"])
    merged_module, merged = from_pretrained(out / "merged")
    sp = text_tasks.bundled().test.take(np.arange(64))
    wrapped = _gen(boft.wrap(module, config), boft.combine(params, adapter), sp)
    np.testing.assert_array_equal(_gen(merged_module, merged, sp), wrapped)
    ok = np.asarray(text_tasks.exact_match_fn(merged_module)(merged, sp.inputs["input_ids"], sp.inputs["attention_mask"], sp.labels))
    assert ok.mean() >= 0.5


def test_jsonl_duplicates_cuts_and_non_objects_are_said(tmp_path, capsys):
    """Duplicates stay as given but are noted (with the held-out pairs the training split also holds,
    and sources given different targets); cut lines are named and a text is cut at a character
    boundary; a JSON array, pretty-printed JSON, a bare value or a non-string field is refused by name."""
    rng = np.random.default_rng()
    n = int(rng.integers(4, 8))
    rows = [{"source": f"s{i}", "target": f"t{i}"} for i in range(n)] * 12 + [{"source": "s0", "target": "other"}]
    (tmp_path / "dups.jsonl").write_text("\n".join(map(json.dumps, rows)))
    capsys.readouterr()
    ds = data_lib.load_jsonl(tmp_path / "dups.jsonl", 64, 32)
    out = capsys.readouterr().out
    assert len(ds.train) + len(ds.test) == len(rows)  # nothing dropped
    assert f"{len(rows) - n - 1} pair(s) repeat an earlier line (line {n + 1} repeats line 1," in out
    assert f"1 source(s) are given different targets (lines 1, {len(rows)})" in out
    train_pairs = {(tuple(s), tuple(t)) for s, t in zip(ds.train.inputs["input_ids"].tolist(), ds.train.labels.tolist())}
    overlap = sum((tuple(s), tuple(t)) in train_pairs for s, t in zip(ds.test.inputs["input_ids"].tolist(), ds.test.labels.tolist()))
    assert overlap and f"{overlap} of the {len(ds.test)} held-out pairs also occur in the training split" in out
    # in a multi-process job only process 0 prints the notes (every process loads the same file)
    module = base()[0]
    for main in (False, True):
        got = finetune._load_data(text_tasks, tmp_path / "dups.jsonl", module, None, main)
        assert (len(got.train), len(got.test)) == (len(ds.train), len(ds.test))
        assert ("repeat an earlier line" in capsys.readouterr().out) == main
    # unique pairs: no notes
    (tmp_path / "unique.jsonl").write_text("\n".join(map(json.dumps, rows[:n])))
    data_lib.load_jsonl(tmp_path / "unique.jsonl", 64, 32)
    assert "note" not in capsys.readouterr().out
    # long targets ending in multi-byte characters placed so that the 31 bytes that fit end inside one:
    # cut before that character (a byte cut would leave a partial character)
    k = 2 * int(rng.integers(0, 10)) + 1
    texts = ["x" * (31 - k) + "é" * k,  # 2-byte characters: byte 31 is the first half of one
             "x" * 30 + "€" * 3,  # 3-byte: 30 ASCII bytes, then one byte of a euro sign
             "x" * 29 + "😀" * 2]  # 4-byte: two bytes of an emoji
    lines = [json.dumps({"source": f"a{i}", "target": t}) for i, t in enumerate(texts)] + [json.dumps({"source": "b", "target": "y"})]
    (tmp_path / "cut.jsonl").write_text("\n".join(lines))
    ds = data_lib.load_jsonl(tmp_path / "cut.jsonl", 64, 32)
    assert "3 of 4 pairs are longer than 64 source / 32 target tokens (EOS included) and are cut to that length (lines 1, 2, 3)" in capsys.readouterr().out
    decoded = set()
    for row in np.concatenate([ds.train.labels, ds.test.labels]):
        raw = bytes(int(i) - data_lib.BYTE_OFFSET for i in row[: list(row).index(data_lib.EOS)])
        decoded.add(raw.decode("utf-8"))  # valid UTF-8: no character cut in half
    want = {t.encode()[:31].decode("utf-8", errors="ignore") for t in texts} | {"y"}
    assert decoded == want and all(len(w.encode()) < 31 for w in want - {"y"})
    # duplicates are judged on what is trained: ids with and without their EOS, texts equal up to a cut
    same = [{"source_ids": [5, 6], "target_ids": [7]}, {"source_ids": [5, 6, 1], "target_ids": [7, 1]},
            {"source_ids": [8], "target_ids": [9]}]
    (tmp_path / "eos.jsonl").write_text("\n".join(map(json.dumps, same)))
    data_lib.load_jsonl(tmp_path / "eos.jsonl", 16, 16)
    assert "1 pair(s) repeat an earlier line (line 2 repeats line 1)" in capsys.readouterr().out
    cut_same = [{"source": "a" * 20 + "X", "target": "t"}, {"source": "a" * 20 + "Y", "target": "u"}, {"source": "b", "target": "c"}]
    (tmp_path / "cut_same.jsonl").write_text("\n".join(map(json.dumps, cut_same)))
    data_lib.load_jsonl(tmp_path / "cut_same.jsonl", 16, 16)
    assert "1 source(s) are given different targets (lines 1, 2)" in capsys.readouterr().out
    bad = {
        "array": (json.dumps(rows[:3]), r"array.jsonl:1: the line holds a JSON array, not an object.*json\.dumps\(o\)"),
        "pretty": (json.dumps(rows[:3], indent=2), r"pretty.jsonl:1: the line is just '\[': this looks like pretty-printed JSON"),
        "null": (json.dumps(rows[0]) + "\nnull", r"null.jsonl:2: the line holds the JSON value null, not an object"),
        "int": (json.dumps(rows[0]) + "\n" + json.dumps({"source": "a", "target": 5}), r"int.jsonl:2: 'target' is 5 \(int\); give a string"),
    }
    for name, (content, msg) in bad.items():
        (tmp_path / f"{name}.jsonl").write_text(content)
        with pytest.raises(ValueError, match=msg):
            data_lib.load_jsonl(tmp_path / f"{name}.jsonl", 64, 32)
