"""T5 (boft_jax.models.t5) against transformers' T5ForConditionalGeneration."""

import dataclasses
import functools
import re
import warnings
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from boft_jax.models import t5

FIXTURES = Path(__file__).parent / "fixtures"
# original T5 (tied), v1.1/FLAN style (gated-gelu, untied), and an mT5 (MT5ForConditionalGeneration,
# gated-silu, 3 encoder / 1 decoder layers, d_model 24 with an inner attention dim of 18)
VARIANTS = ["t5_relu", "t5_gated", "mt5"]


def assert_matches_reference(actual, reference, *, tol=1e-5):
    """max |actual - reference| <= tol * max(1, max |reference|)."""
    actual, reference = np.asarray(actual, np.float64), np.asarray(reference, np.float64)
    assert actual.shape == reference.shape
    err, scale = np.abs(actual - reference).max(), max(1.0, np.abs(reference).max())
    assert err <= tol * scale, f"max abs error {err:.3g} > {tol} * {scale:.3g}"


class Loaded:
    """A checkpoint, its reference outputs, and jitted functions shared by the tests."""

    def __init__(self, name, scan_layers=False):
        self.name = name
        self.module, self.params = t5.from_pretrained(FIXTURES / name, scan_layers=scan_layers)
        self.ref = dict(np.load(FIXTURES / f"{name}_reference.npz", allow_pickle=False))
        self.generate = jax.jit(self.module.generate, static_argnames="max_new_tokens")
        module = self.module

        @jax.jit
        def forward(params, ids, mask, dec):
            v = {"params": params}
            return module.apply(v, ids, mask, method="encode"), module.apply(v, ids, mask, dec)

        r = self.ref
        self.encoded, self.logits = forward(self.params, r["input_ids"], r["attention_mask"], r["decoder_input_ids"])


@functools.cache
def load(name):
    return Loaded(name)


@pytest.fixture(scope="module", params=VARIANTS)
def variant(request):
    return load(request.param)


@pytest.fixture(scope="module")
def gated():
    return load("t5_gated")


def test_encoder_output_matches_transformers(variant):
    assert_matches_reference(variant.encoded, variant.ref["encoder_last_hidden_state"])


def test_teacher_forced_logits_match_transformers(variant):
    assert_matches_reference(variant.logits, variant.ref["logits"])


def test_greedy_generation_matches_transformers(variant):
    ref, cfg = variant.ref, variant.module.config
    tokens = variant.generate(variant.params, ref["input_ids"], ref["attention_mask"], max_new_tokens=int(ref["max_new_tokens"]))
    np.testing.assert_array_equal(tokens, ref["generated"])
    # The reference stops a row at its EOS and pads the rest, while the other rows go on.
    row = list(ref["generated"][0])
    assert cfg.eos_token_id in row and set(row[row.index(cfg.eos_token_id) + 1:]) == {cfg.pad_token_id}
    assert int(ref["hf_generated_length"]) == tokens.shape[1]


def test_generation_stops_when_every_row_has_ended(gated):
    ref = gated.ref
    first = np.asarray(ref["generated"][:, 1])
    # With every row's first token as an EOS id, every row ends at step 1; the rest is padding.
    tokens = gated.generate(
        gated.params, ref["input_ids"], ref["attention_mask"], max_new_tokens=int(ref["max_new_tokens"]),
        eos_token_id=jnp.asarray(first),
    )
    np.testing.assert_array_equal(tokens[:, :2], np.stack([np.zeros(3), first], axis=1))
    np.testing.assert_array_equal(tokens[:, 2:], 0)
    # max_new_tokens = 0: the start token alone; a count that is not an int >= 0 is named
    none = gated.generate(gated.params, ref["input_ids"], ref["attention_mask"], max_new_tokens=0)
    np.testing.assert_array_equal(none, np.full((3, 1), gated.module.config.decoder_start_token_id))
    for bad in (-1, 2.0, True):
        with pytest.raises(ValueError, match=r"max_new_tokens must be an int >= 0"):
            gated.generate(gated.params, ref["input_ids"], ref["attention_mask"], max_new_tokens=bad)


def test_head_tying_and_scaling_follow_the_checkpoint(variant):
    cfg, params = variant.module.config, variant.params
    if variant.name == "t5_relu":
        assert cfg.tie_word_embeddings and cfg.scale_decoder_outputs and "lm_head" not in params
        assert cfg.feed_forward_proj == "relu" and not cfg.is_gated
    else:
        # transformers 5 writes tie_word_embeddings=true for every T5; the distinct lm_head.weight
        # in the checkpoint decides, as in transformers.
        assert not cfg.tie_word_embeddings and not cfg.scale_decoder_outputs
        assert params["lm_head"]["kernel"].shape == (cfg.d_model, 64)
        assert cfg.is_gated and cfg.activation == {"t5_gated": "gelu_new", "mt5": "silu"}[variant.name]
        assert cfg.model_type == ("mt5" if variant.name == "mt5" else "t5")


def decode_in_pieces(module, params, encoded, mask, dec, pieces=(3, 1, None)):
    """Logits of ``dec`` decoded with the KV cache: a prefill, one step, then the rest."""
    v = {"params": params}
    cache = module.apply(v, encoded, mask, dec.shape[1] + 1, method="init_cache")
    out, start = [], 0
    for n in pieces:
        n = dec.shape[1] - start if n is None else n
        logits, cache = module.apply(v, dec[:, start:start + n], cache=cache, method="decode")
        out.append(logits)
        start += n
    return jnp.concatenate(out, axis=1), cache["index"]


@pytest.fixture(scope="module")
def scanned_runs(gated):
    """The scan_layers model on the fixture inputs, in one jitted program: teacher-forced logits
    and logits decoded with the cache."""
    module, params = t5.from_pretrained(FIXTURES / "t5_gated", scan_layers=True)
    assert params["decoder"]["layers"]["cross_attention"]["q"]["kernel"].shape == (2, 32, 16)

    @jax.jit
    def run(params, ids, mask, dec):
        v = {"params": params}
        encoded = module.apply(v, ids, mask, method="encode")
        pieces = decode_in_pieces(module, params, encoded, mask, dec, pieces=(4, None))
        return module.apply(v, dec, encoded, mask, method="decode"), pieces

    r = gated.ref
    return run(params, r["input_ids"], r["attention_mask"], r["decoder_input_ids"])


def test_scan_layers_gives_the_same_logits_as_unrolled(gated, scanned_runs):
    # Scan and unrolled compile to different XLA programs: equal up to float32 rounding.
    np.testing.assert_allclose(scanned_runs[0], gated.logits, atol=2e-6, rtol=0)


def test_incremental_decoding_with_cache_matches_teacher_forcing_scanned(gated, scanned_runs):
    logits, index = scanned_runs[1]
    assert_matches_reference(logits, gated.ref["logits"])
    assert int(index) == gated.ref["decoder_input_ids"].shape[1]


def test_incremental_decoding_with_cache_matches_teacher_forcing(gated):
    r = gated.ref
    run = jax.jit(functools.partial(decode_in_pieces, gated.module))
    logits, index = run(gated.params, gated.encoded, r["attention_mask"], r["decoder_input_ids"])
    assert_matches_reference(logits, r["logits"])
    assert int(index) == r["decoder_input_ids"].shape[1]


def test_relative_position_buckets_match_transformers():
    """Every bucket transformers defines, at usual and odd settings; where max_distance is not above
    the exact buckets, transformers' ids turn negative far out, and those positions (only those)
    take the last bucket of their direction, with a warning."""
    ref = np.load(FIXTURES / "t5_buckets_reference.npz", allow_pickle=False)
    r = ref["relative_position"]
    settings = sorted({tuple(map(int, re.fullmatch(r"b(\d+)_d(\d+)_(?:bi|uni)", k).groups())) for k in ref.files if k != "relative_position"})
    assert len(settings) >= 10
    degenerate = 0
    for nb, md in settings:
        for direction in ("bi", "uni"):
            t5.relative_position_buckets.cache_clear()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                table = t5.relative_position_buckets(direction == "bi", nb, md)
            h = (table.shape[0] - 1) // 2
            ours, theirs = table[np.clip(r, -h, h) + h], ref[f"b{nb}_d{md}_{direction}"]
            defined = (theirs >= 0) & (theirs < nb)
            np.testing.assert_array_equal(ours[defined], theirs[defined], err_msg=f"{nb} {md} {direction}")
            n = nb // 2 if direction == "bi" else nb
            last = np.where((r > 0) & (direction == "bi"), 2 * n - 1, n - 1)
            np.testing.assert_array_equal(ours[~defined], last[~defined], err_msg=f"{nb} {md} {direction}")
            assert bool(caught) == (not defined.all()), (nb, md, direction)
            degenerate += not defined.all()
    assert degenerate >= 4  # the fixture covers the settings where transformers breaks down


def test_too_few_buckets_are_refused():
    with pytest.raises(ValueError, match="relative_attention_num_buckets = 3: the encoder's bidirectional buckets need at least 4"):
        t5.T5Config(relative_attention_num_buckets=3)
    with pytest.raises(ValueError, match="relative_attention_max_distance must be a positive integer, got 0"):
        t5.T5Config(relative_attention_max_distance=0)
    with pytest.raises(ValueError, match=r"= 1: the decoder's causal buckets need at least 2 \(of which 1 exact"):
        t5.relative_position_buckets(False, 1, 8)
    t5.relative_position_buckets(False, 2, 8)  # the causal minimum itself is fine


def test_dropout_is_active_only_when_not_deterministic(gated):
    ref = gated.ref
    module = t5.T5(dataclasses.replace(gated.module.config, dropout_rate=0.2))

    @jax.jit
    def encode(seed):
        v, args = {"params": gated.params}, (ref["input_ids"], ref["attention_mask"])
        # The "rbg" PRNG compiles much faster on CPU than the default threefry.
        rngs = {"dropout": jax.random.key(seed, impl="rbg")}
        return (
            module.apply(v, *args, method="encode"),
            module.apply(v, *args, deterministic=False, rngs=rngs, method="encode"),
        )

    plain, drop0 = encode(0)
    assert_matches_reference(plain, ref["encoder_last_hidden_state"])
    assert np.abs(drop0 - plain).max() > 1e-2
    assert np.abs(encode(1)[1] - drop0).max() > 1e-2


def test_bfloat16_compute_keeps_params_and_stays_close(gated):
    ref = gated.ref
    module, params = t5.from_pretrained(FIXTURES / "t5_gated", dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    logits = jax.jit(module.apply)({"params": params}, ref["input_ids"], ref["attention_mask"], ref["decoder_input_ids"])
    assert logits.dtype == jnp.bfloat16
    err = np.abs(np.asarray(logits, np.float32) - ref["logits"])
    # bfloat16 keeps 8 bits of mantissa; through 2+2 layers the logits move by a few percent.
    assert err.mean() < 0.02 * np.abs(ref["logits"]).mean() + 0.01 and err.max() < 0.1 * np.abs(ref["logits"]).max()


def test_shift_right_prepends_start_and_replaces_ignored_labels():
    labels = jnp.array([[5, 6, 7], [8, -100, -100]])
    np.testing.assert_array_equal(t5.shift_right(labels, 0, 0), [[0, 5, 6], [0, 8, 0]])


def test_config_round_trips_through_hf_dict(variant):
    config = variant.module.config
    assert t5.T5Config.from_hf_dict(config.to_hf_dict()) == config


def test_encoder_only_checkpoint_is_refused_by_name(tmp_path):
    """A T5EncoderModel directory (no decoder weights): one error naming the architecture, before
    any weight is read, not a list of every missing decoder tensor."""
    import json
    import shutil

    shutil.copytree(FIXTURES / "t5_gated", tmp_path / "enc")
    cfg = json.loads((tmp_path / "enc" / "config.json").read_text())
    cfg["architectures"] = ["T5EncoderModel"]
    (tmp_path / "enc" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "enc" / "model.safetensors").write_bytes(b"not read")
    with pytest.raises(ValueError, match=r"architectures=\['T5EncoderModel'\], an encoder-only checkpoint") as e:
        t5.from_pretrained(tmp_path / "enc")
    assert "T5ForConditionalGeneration, MT5ForConditionalGeneration" in str(e.value)
    for head in ("T5ForSequenceClassification", "MT5ForQuestionAnswering", "T5ForTokenClassification"):
        cfg["architectures"] = [head]
        (tmp_path / "enc" / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ValueError, match=rf"architectures=\['{head}'\]: a T5 with a task head"):
            t5.from_pretrained(tmp_path / "enc")


def test_generation_config_eos_ids_are_used_as_transformers_does(tmp_path):
    """generation_config.json's eos_token_id (what transformers' generate uses) wins over
    config.json's: a row stops at the extra EOS id; a pad / start id set only there is not taken, and
    a warning says so."""
    import json
    import shutil

    ref, eos = load("t5_gated").ref, load("t5_gated").module.config.eos_token_id
    shutil.copytree(FIXTURES / "t5_gated", tmp_path / "g")
    # a row whose first new token is not an EOS, and a later token of it that is neither EOS nor pad
    j, row = next((j, [int(t) for t in r]) for j, r in enumerate(ref["generated"]) if r[1] != eos and any(
        int(t) not in (0, eos) for t in r[2:]))
    extra = next(t for t in row[2:] if t not in (0, eos))
    cut = row.index(extra)
    (tmp_path / "g" / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos, extra], "pad_token_id": 0}))
    module, params = t5.from_pretrained(tmp_path / "g")
    assert set(module.config.eos_token_ids) == {eos, extra}
    tokens = np.asarray(jax.jit(module.generate, static_argnames="max_new_tokens")(
        params, ref["input_ids"], ref["attention_mask"], max_new_tokens=int(ref["max_new_tokens"])))
    np.testing.assert_array_equal(tokens[j, : cut + 1], row[: cut + 1])
    assert not tokens[j, cut + 1 :].any() and cut + 1 < tokens.shape[1]  # padding after the new EOS
    (tmp_path / "g" / "generation_config.json").write_text(json.dumps({"decoder_start_token_id": 5}))
    with pytest.warns(UserWarning, match=r"sets decoder_start_token_id 5 \(config.json: 0\)"):
        module, _ = t5.from_pretrained(tmp_path / "g")
    assert module.config.decoder_start_token_id == 0 and module.config.eos_token_ids == (eos,)
    # settings that change transformers' output and that greedy generate does not apply: named
    (tmp_path / "g" / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": eos, "num_beams": 4, "no_repeat_ngram_size": 3, "max_length": 64, "do_sample": False}))
    with pytest.warns(UserWarning, match=r"sets \{'num_beams': 4, 'no_repeat_ngram_size': 3\}: transformers' generate"):
        t5.from_pretrained(tmp_path / "g")
    (tmp_path / "g" / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": eos, "num_beams": 1, "max_length": 64, "transformers_version": "5.24.0"}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only neutral settings: no warning
        t5.from_pretrained(tmp_path / "g")


def test_null_eos_and_pad_ids_are_kept_as_transformers_reads_them(tmp_path):
    """config.json's "eos_token_id": null means no EOS (transformers then generates the full length)
    and "pad_token_id": null makes generate pad with the EOS id; both were read as the defaults 1 / 0.
    A config without decoder_start_token_id warns (transformers refuses it)."""
    import json
    import shutil

    ref, eos = load("t5_gated").ref, load("t5_gated").module.config.eos_token_id
    n = int(ref["max_new_tokens"])
    d = tmp_path / "g"
    shutil.copytree(FIXTURES / "t5_gated", d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "generation_config.json").unlink()
    (d / "config.json").write_text(json.dumps({**cfg, "eos_token_id": None, "pad_token_id": None}))
    module, params = t5.from_pretrained(d)
    assert module.config.eos_token_id is None and module.config.pad_token_id is None
    assert module.config.to_hf_dict()["eos_token_id"] is None and module.config.to_hf_dict()["pad_token_id"] is None
    tokens = np.asarray(module.generate(params, ref["input_ids"], ref["attention_mask"], max_new_tokens=n))
    # reference: one teacher-forced forward pass of the generated rows (the decoder is causal): every
    # token after the start is the argmax of the full model's logits for its prefix, none stops early
    assert tokens.shape[1] == n + 1 and (tokens[:, 0] == module.config.decoder_start_token_id).all()
    logits = module.apply({"params": params}, ref["input_ids"], ref["attention_mask"], jnp.asarray(tokens[:, :-1]))
    np.testing.assert_array_equal(tokens[:, 1:], np.argmax(np.asarray(logits), -1))
    ended = [r for r in ref["generated"] if eos in list(r)[1:-1]]
    assert ended and any(set(list(t)[list(t).index(eos) + 1:]) != {0} for t in tokens if eos in list(t)[1:-1])
    # pad null, eos set: rows that ended are filled with the EOS id (transformers' fallback)
    (d / "config.json").write_text(json.dumps({**cfg, "pad_token_id": None}))
    module, params = t5.from_pretrained(d)
    tokens = np.asarray(module.generate(params, ref["input_ids"], ref["attention_mask"], max_new_tokens=n))
    for got, want in zip(tokens, ref["generated"]):
        want = list(want)
        cut = want.index(eos) + 1 if eos in want[1:] else len(want)
        np.testing.assert_array_equal(got[:cut], want[:cut])
        assert set(got[cut:]) <= {eos}
    # ... and with an eos_token_id argument, with that id (the first EOS id the call uses), as transformers
    row = next(i for i, t in enumerate(tokens) if t[1] != eos)
    other = int(tokens[row, 1])  # the first token of that row: it ends there
    tokens = np.asarray(module.generate(params, ref["input_ids"], ref["attention_mask"], max_new_tokens=n, eos_token_id=other))
    assert tokens[row, 1] == other and set(tokens[row, 2:]) == {other}
    (d / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "decoder_start_token_id"}))
    with pytest.warns(UserWarning, match=r"sets no decoder_start_token_id; boft_jax starts decoding with 0"):
        module, _ = t5.from_pretrained(d)
    assert module.config.decoder_start_token_id == 0


def test_export_warns_when_transformers_4_would_scale_the_output_otherwise():
    """transformers 4 scales the decoder output exactly when the head is tied; an untied scaled head
    (t5.untie_head on an original T5) or a tied unscaled one loads right only in transformers >= 5."""
    cfg = t5.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg.to_hf_dict()  # tied and scaled: both versions agree
        dataclasses.replace(cfg, tie_word_embeddings=False, scale_decoder_outputs=False).to_hf_dict()
    for kw in (dict(tie_word_embeddings=False, scale_decoder_outputs=True), dict(scale_decoder_outputs=False)):
        with pytest.warns(UserWarning, match="transformers 4 scales exactly when the head is tied.*sqrt\\(d_model\\) = 4"):
            dataclasses.replace(cfg, **kw).to_hf_dict()


def test_invalid_feed_forward_proj_is_an_error():
    with pytest.raises(ValueError, match="feed_forward_proj"):
        t5.T5Config(feed_forward_proj="relu-gated")



def _np_gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


@pytest.mark.parametrize("file_keys,gated,act", [
    ({"dense_act_fn": "silu"}, True, lambda x: x / (1 + np.exp(-x))),  # gated, but SiLU, not gated-gelu's gelu_new
    ({"is_gated_act": False}, False, _np_gelu_tanh),  # one 'wi', gelu_new
    ({}, True, _np_gelu_tanh),  # derived from feed_forward_proj alone
])
def test_dense_act_fn_and_is_gated_act_in_config_json_override_feed_forward_proj(file_keys, gated, act):
    """transformers derives dense_act_fn / is_gated_act from feed_forward_proj and lets config.json's
    own values override them; the MLP follows them (checked against the formula in float64), and
    to_hf_dict writes them so that an export loads the same MLP."""
    d = {"vocab_size": 40, "d_model": 8, "d_kv": 4, "d_ff": 12, "num_layers": 1, "num_heads": 2,
         "feed_forward_proj": "gated-gelu", "decoder_start_token_id": 0, **file_keys}
    cfg = t5.T5Config.from_hf_dict(d)
    assert cfg.is_gated == gated
    assert t5.T5Config.from_hf_dict(cfg.to_hf_dict()) == cfg
    assert {k: cfg.to_hf_dict()[k] for k in ("dense_act_fn", "is_gated_act")} == {
        "dense_act_fn": file_keys.get("dense_act_fn", "gelu_new"), "is_gated_act": gated}
    rng = np.random.default_rng()
    x = rng.normal(size=(3, 8))
    mlp = t5.T5MLP(cfg)
    params = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), jnp.float32),
                          mlp.init(jax.random.key(0), jnp.zeros((1, 8)))["params"])
    w = {k: np.asarray(v["kernel"], np.float64) for k, v in params.items()}
    assert set(w) == ({"wi_0", "wi_1", "wo"} if gated else {"wi", "wo"})
    h = act(x @ w["wi_0"]) * (x @ w["wi_1"]) if gated else act(x @ w["wi"])
    got = mlp.apply({"params": params}, jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(np.asarray(got, np.float64), h @ w["wo"], rtol=2e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unsupported activation 'nope'"):
        t5.T5Config.from_hf_dict({**d, "dense_act_fn": "nope"})
    with pytest.raises(ValueError, match=r"is_gated_act = 'yes' \(str; expected bool\)"):
        t5.T5Config.from_hf_dict({**d, "is_gated_act": "yes"})
    with pytest.raises(ValueError, match="is_gated_act must be true or false"):
        t5.T5Config(is_gated_act="yes")


def test_untied_config_without_lm_head_weights_loads_tied_unscaled_as_transformers_5():
    """config.json with tie_word_embeddings = false (transformers-4 v1.1 configs) over a checkpoint with
    no lm_head.weight: transformers 5 ties the head to the shared embedding without scaling; so does
    boft_jax, with a warning saying so (transformers 4 would start from a random head)."""
    cfg = t5.T5Config.from_hf_dict({"vocab_size": 40, "d_model": 8, "d_kv": 4, "d_ff": 12, "num_layers": 1,
                                    "num_heads": 2, "tie_word_embeddings": False, "decoder_start_token_id": 0})
    state = {"shared.weight": np.ones((40, 8), np.float32)}
    with pytest.warns(UserWarning, match="holds no lm_head.weight: the LM head is the shared embedding, without"):
        tied = t5.resolve_tying(cfg, state)
    assert tied.tie_word_embeddings and not tied.scale_decoder_outputs
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a head of its own: untied, no warning
        assert t5.resolve_tying(cfg, {**state, "lm_head.weight": np.zeros((40, 8), np.float32)}) == cfg

# ---- BOFT target presets ------------------------------------------------------------------


def dense_paths(module):
    paths = set()

    def record(next_fun, args_, kwargs_, context):
        if isinstance(context.module, (nn.Dense, nn.DenseGeneral)) and context.method_name == "__call__":
            paths.add("/".join(context.module.path))
        return next_fun(*args_, **kwargs_)

    ids = jnp.zeros((1, 3), jnp.int32)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda: module.init(jax.random.key(0), ids, None, ids))
    return paths


def select(pattern, paths):
    return {p for p in paths if re.search(rf"(?:^|/)(?:{pattern})$", p)}


@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("ff,tied", [("relu", True), ("gated-gelu", False)])
def test_target_presets_select_exactly_the_intended_dense_layers(ff, tied, scan_layers):
    config = t5.T5Config(
        vocab_size=64, d_model=32, d_kv=4, d_ff=64, num_layers=2, num_heads=4,
        feed_forward_proj=ff, tie_word_embeddings=tied,
    )
    paths = dense_paths(t5.T5(config, scan_layers=scan_layers))
    layers = ["layers"] if scan_layers else ["layer_0", "layer_1"]
    blocks = {
        "encoder": [f"encoder/{x}" for x in layers],
        "decoder": [f"decoder/{x}" for x in layers],
    }
    attn = [("encoder", "self_attention"), ("decoder", "self_attention"), ("decoder", "cross_attention")]
    wi = ["wi"] if ff == "relu" else ["wi_0", "wi_1"]
    qv = {f"{b}/{a}/{p}" for s, a in attn for b in blocks[s] for p in "qv"}
    attention = {f"{b}/{a}/{p}" for s, a in attn for b in blocks[s] for p in "qkvo"}
    mlp = {f"{b}/mlp/{w}" for bs in blocks.values() for b in bs for w in [*wi, "wo"]}
    assert paths == attention | mlp | (set() if tied else {"lm_head"})
    expected = {"attention_qv": qv, "attention": attention, "mlp": mlp, "all_linear": attention | mlp}
    assert set(t5.TARGET_PRESETS) == set(expected)
    for name, pattern in t5.TARGET_PRESETS.items():
        assert select(pattern, paths) == expected[name], name


def test_config_json_with_transformers_alias_names_loads_the_same_model(tmp_path):
    """transformers' T5Config reads hidden_size / num_attention_heads / num_hidden_layers / head_dim
    as d_model / num_heads / num_layers / d_kv (its attribute_map): a config.json written with the
    aliases loads the same model (the reference logits), and one that gives both names different
    values is refused naming both."""
    import json
    import shutil

    ref = load("t5_gated")
    shutil.copytree(FIXTURES / "t5_gated", tmp_path / "alias")
    cfg = json.loads((tmp_path / "alias" / "config.json").read_text())
    for alias, name in (("hidden_size", "d_model"), ("num_attention_heads", "num_heads"),
                        ("num_hidden_layers", "num_layers"), ("head_dim", "d_kv")):
        cfg[alias] = cfg.pop(name)
    (tmp_path / "alias" / "config.json").write_text(json.dumps(cfg))
    module, params = t5.from_pretrained(tmp_path / "alias")
    assert module.config == ref.module.config
    r = ref.ref
    logits = jax.jit(module.apply)({"params": params}, r["input_ids"], r["attention_mask"], r["decoder_input_ids"])
    assert_matches_reference(logits, r["logits"])
    with pytest.raises(ValueError, match=r"sets both d_kv = 4 and its alias head_dim = 8"):
        t5.T5Config.from_hf_dict({**cfg, "d_kv": 4, "head_dim": 8})
    # both names, agreeing: the same config as the aliases alone
    assert t5.T5Config.from_hf_dict({**cfg, "d_kv": cfg["head_dim"]}) == t5.T5Config.from_hf_dict(cfg)
